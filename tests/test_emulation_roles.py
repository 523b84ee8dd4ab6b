"""Who may verify, install interpreters and register what the host does not
run, with real users (setpriv) against a daemon in its sandbox."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import busybox_path, needs_sandbox
from tests.test_roles import (  # noqa: F401 - the fixtures
    ADMINS,
    HOST_FAMILY,
    Accounts,
    accounts,
    ok,
    refused,
    running,
)

pytestmark = needs_sandbox

INSTALL = {"targets": ["arm64"], "deb": "/nonexistent/qemu-user-static.deb"}


def test_readers_may_verify_only_admins_install(
    accounts: Accounts,  # noqa: F811 - the fixture
    workdir: Path,
) -> None:
    store = workdir / "store"  # root's, in a 0755 directory: a store qusd may use
    with running(workdir, socket_mode="666", interpreter_store=str(store)) as d:
        d.client.request("POST", "/v1/registrations", {"targets": ["arm64"]})
        doc = ok(d, accounts.other, "POST", "/v1/verify", {})
        assert doc["ok"] is True and [r["target"] for r in doc["results"]] == ["aarch64"]
        listed = ok(d, accounts.other, "GET", "/v1/interpreters")
        assert listed["provisioned"] == [] and [f["entry"] for f in listed["fixed"]] == [
            "qemu-aarch64"
        ]
        for who in (accounts.other, accounts.user):
            says = f"installing interpreters is admin-only (members of {ADMINS!r})"
            refused(d, who, "POST", "/v1/interpreters", INSTALL, says=[says])
        # an admin gets as far as the package
        refused(d, accounts.admin, "POST", "/v1/interpreters", INSTALL, status=422,
                code="interpreter", says=["/nonexistent/qemu-user-static.deb: no such package "
                                          "file"])  # fmt: skip


@pytest.mark.skipif(HOST_FAMILY != "i386", reason="x86 hosts: elsewhere i386 is foreign anyway")
def test_users_may_register_what_the_host_does_not_run(
    accounts: Accounts,  # noqa: F811 - the fixture
    workdir: Path,
) -> None:
    """i386 counts as foreign here (the setting says the host cannot run
    it), so a user may register it, and an i386 busybox then goes to QEMU;
    x86_64 stays the host's."""
    with running(workdir, emulated_targets=["i386"]) as d:
        ok(d, accounts.user, "POST", "/v1/registrations", {"targets": ["i386"]}, status=201)
        res = d.inside.run([busybox_path("i386"), "uname", "-m"])
        assert res.stdout == "i686\n", res.stderr  # natively it says x86_64
        refused(d, accounts.user, "POST", "/v1/registrations", {"targets": ["x86_64"]},
                says=["x86_64 is of the host's own family (i386): users may register only "
                      "foreign targets"])  # fmt: skip
