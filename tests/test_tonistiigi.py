"""tonistiigi/binfmt's spellings in qusd-binfmt (--install, --uninstall, the
status JSON), and entries that already serve a target reported, not fatal,
by --install and register alike: on the real kernel, in sandboxes (through
the image: tests/test_image.py)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from qusd import catalog
from qusd.binfmt import Rule
from tests.conftest import Sandbox, busybox_path, interpreter
from tests.test_action import load_distribution_rules, native_platforms
from tests.test_oneshot import oneshot

NATIVE = native_platforms()  # what the host runs itself


def status(res: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(res.stdout)
    assert set(doc) == {"supported", "emulators"}
    return doc


def test_install_prints_the_status(sbx: Sandbox) -> None:
    """`--install arm64,riscv64`: registered with F (tonistiigi: CF), a line
    each on stderr, the status JSON on stdout."""
    res = oneshot(sbx, "--install", "arm64,linux/riscv64")
    assert res.returncode == 0, res.stderr
    doc = status(res)
    assert doc["emulators"] == ["qemu-aarch64", "qemu-riscv64"]
    assert doc["supported"] == [*NATIVE, "linux/arm64", "linux/riscv64"]
    assert res.stderr.splitlines() == [
        "installing: aarch64 OK (registered: qemu-aarch64, flags F, /usr/bin/qemu-aarch64-static)",
        "installing: riscv64 OK (registered: qemu-riscv64, flags F, /usr/bin/qemu-riscv64-static)",
    ]
    assert {e.flags for e in sbx.kernel.entries()} == {"F"}
    res = sbx.run([busybox_path("arm64"), "uname", "-m"])
    assert res.stdout.strip() == "aarch64", res.stderr


def test_install_all_then_uninstall_two(sbx: Sandbox) -> None:
    """tonistiigi/binfmt's own test: install all, check the JSON, run
    foreign programs, uninstall two and check they are gone."""
    res = oneshot(sbx, "--install", "all")
    assert res.returncode == 0, res.stderr
    doc = status(res)
    foreign = {
        t.entry_name for t in catalog.builtin().foreign(catalog.family_of(catalog.host_machine()))
    }
    assert set(doc["emulators"]) == foreign
    assert {"linux/arm64", "linux/s390x", "linux/ppc64le", "linux/riscv64",
            "linux/arm/v7", "linux/mips64le"} <= set(doc["supported"])  # fmt: skip
    for arch in ("arm64", "s390x", "ppc64el"):
        assert sbx.run([busybox_path(arch), "true"]).returncode == 0, arch

    res = oneshot(sbx, "--uninstall", "qemu-aarch64,riscv64")
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines() == ["uninstalling: qemu-aarch64 OK",
                                       "uninstalling: qemu-riscv64 OK"]  # fmt: skip
    assert {"qemu-aarch64", "qemu-riscv64"}.isdisjoint(status(res)["emulators"])
    assert set(sbx.kernel.names()) == foreign - {"qemu-aarch64", "qemu-riscv64"}


def test_uninstall_globs_reach_only_qemu_entries(sbx: Sandbox) -> None:
    """`--uninstall '*'` removes the qemu-* entries and leaves other tools'
    (binfmt #315); another tool's entry goes only when named exactly."""
    sbx.kernel.register(catalog.builtin().get("s390x").rule(interpreter("s390x"), "F"))
    sbx.kernel.register(Rule("DOSWin", "/usr/bin/wine", extension="exe"))
    res = oneshot(sbx, "--uninstall", "*")
    assert res.returncode == 0, res.stderr
    assert sbx.kernel.names() == ["DOSWin"]
    assert status(res)["emulators"] == ["DOSWin"]
    res = oneshot(sbx, "--uninstall", "DOSWin")
    assert res.returncode == 0, res.stderr
    assert sbx.kernel.names() == []

    res = oneshot(sbx, "--uninstall", "qemu-nothing*")
    assert res.returncode == 66, res.stderr
    assert "--uninstall qemu-nothing*: no entry has that name" in res.stderr
    assert status(res) == {"supported": NATIVE, "emulators": []}  # printed all the same


def test_entries_that_already_serve_the_target_are_reported(sbx: Sandbox) -> None:
    """A runner with qemu-user-static's rules (flags POF, Debian's names):
    --install and register report them and keep them, exit 0; an entry
    that does not serve the target (C, not asked for) is an error naming
    the fix, and the status is printed all the same."""
    load_distribution_rules(sbx)
    before = sbx.kernel.entries()
    res = oneshot(sbx, "--install", "arm64")
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith("installing: aarch64 OK (provided: qemu-aarch64, flags POF, ")
    res = oneshot(sbx, "--json", "register", "aarch64", "s390x")
    assert res.returncode == 0, res.stderr
    assert [(r["name"], r["flags"], r["result"]) for r in json.loads(res.stdout)] == [
        ("qemu-aarch64", "POF", "provided"),
        ("qemu-s390x", "POF", "provided"),
    ]
    assert sbx.kernel.entries() == before

    sbx.kernel.remove("qemu-riscv64")
    sbx.kernel.register(catalog.builtin().get("riscv64").rule(interpreter("riscv64"), "OCF"))
    res = oneshot(sbx, "--install", "arm64,riscv64")
    assert res.returncode == 73, res.stderr
    assert res.stderr.strip() == (
        "qusd-binfmt: qemu-riscv64 is registered (interpreter /usr/bin/qemu-riscv64-static, "
        "flags OCF) but does not provide riscv64 with flags F: it has the C flag (set-uid "
        "binaries would run their interpreter as root); remove it first (--uninstall NAME) "
        "or register it with `register --replace`"
    )
    assert "qemu-riscv64" in status(res)["emulators"]
    res = oneshot(sbx, "register", "riscv64")
    assert res.returncode == 73 and "pass --replace to replace it" in res.stderr
    res = oneshot(sbx, "--json", "register", "--replace", "riscv64")
    assert res.returncode == 0, res.stderr
    assert [r["result"] for r in json.loads(res.stdout)] == ["replaced"]


def test_bare_command_prints_the_status_and_version(sbx: Sandbox) -> None:
    sbx.kernel.register(catalog.builtin().get("s390x").rule(interpreter("s390x"), "F"))
    sbx.kernel.disable("qemu-s390x")
    res = oneshot(sbx)
    assert res.returncode == 0, res.stderr
    assert status(res) == {"supported": NATIVE, "emulators": []}  # disabled: not listed
    res = oneshot(sbx, "--version")
    assert (res.returncode, res.stdout.split()[0]) == (0, "qusd-binfmt")
    res = oneshot(sbx, "--install", "arm64", "list")
    assert res.returncode == 2 and "take no COMMAND" in res.stderr
    assert sbx.kernel.names() == ["qemu-s390x"]
