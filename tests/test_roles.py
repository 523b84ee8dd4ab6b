"""Roles on the real kernel, with real users: who may do what over the socket.

A module fixture makes two groups and three system users with names no real
account has (qusdt-*-RUN, RUN random per run, so two runs on one machine
keep apart), and removes them at the end. Every user's primary
group is nogroup, so each role comes from a supplementary group, which the
daemon learns only through SO_PEERGROUPS:

- qusdt-admin, in qusdt-admins (and qusdt-users, to reach the socket): admin
- qusdt-user and qusdt-user2, in qusdt-users: users
- qusdt-other, in neither: cannot reach the socket; reads when it can

Each daemon runs in a sandbox whose identity uid map keeps real users' ids,
with its socket in a 0755 directory under /tmp. Clients are curl, run as
those users by setpriv, so the daemon sees real peer credentials. Every
refusal is shown to leave the kernel table and the state file as they were;
every allowed change is looked up in the kernel.
"""

from __future__ import annotations

import contextlib
import grp
import json
import math
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qusd import catalog
from qusd.client import Client
from qusd.config import Config
from qusd.errors import QusdError
from qusd.policy import Caller, Policy, Role
from qusd.state import State
from tests.conftest import (
    NOBODY,
    Daemon,
    Shared,
    interpreter,
    needs_sandbox,
    python_for,
    write_settings,
)
from tests.test_api import (
    NO_BODY,
    PROBLEM_JSON,
    WINE,
    foreign_qemu,
    in_kernel,
    parse_http,
    unchanged,
)

pytestmark = needs_sandbox

CURL = "/usr/bin/curl"
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
NOGROUP = NOBODY  # gid 65534: nogroup, every test user's primary group
#: a suffix of this run's own: two runs on one machine (worktrees, CI beside
#: a developer) must not remove each other's accounts
RUN = secrets.token_hex(3)
USERS = f"qusdt-users-{RUN}"
ADMINS = f"qusdt-admins-{RUN}"
USER, ADMIN, OTHER = f"qusdt-user-{RUN}", f"qusdt-admin-{RUN}", f"qusdt-other-{RUN}"
USER2 = f"qusdt-user2-{RUN}"
#: our accounts and their supplementary groups
ACCOUNTS = {USER: (USERS,), ADMIN: (ADMINS, USERS), OTHER: (), USER2: (USERS,)}
BUILTIN = catalog.builtin()
HOST_FAMILY = catalog.family_of(catalog.host_machine())
AARCH64 = BUILTIN.get("aarch64")
#: what a role test's daemon reads from its qusd.toml
ROLE_SETTINGS: dict[str, object] = {
    "socket_group": USERS,
    "user_group": USERS,
    "admin_group": ADMINS,
    "rate_burst": 1000,  # only the rate-limit tests meet the limit
}
AUDIT = re.compile(
    r'audit: uid="(?P<uid>-?\d+)" pid="(?P<pid>\d+)" exe="(?P<exe>[^"]+)" '
    r'action="(?P<action>\S+ \S+)" names="(?P<names>[^"]+)" result="(?P<result>\d+)"$'
)


# -- accounts --------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """cmd as this user, with the supplementary groups /etc/group gives it."""
        return [SETPRIV, f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--", *cmd]


@dataclass(frozen=True)
class Accounts:
    user: Account
    admin: Account
    other: Account
    users_gid: int
    admins_gid: int
    #: a second user, whose entries the first may not touch
    user2: Account


def _exists(lookup: Any, name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def _remove_accounts() -> None:
    """Remove this run's users and groups."""
    for name in ACCOUNTS:
        if _exists(pwd.getpwnam, name):
            subprocess.run(["userdel", name], capture_output=True, timeout=60, check=False)
    for group in (USERS, ADMINS):
        if _exists(grp.getgrnam, group):
            subprocess.run(["groupdel", group], capture_output=True, timeout=60, check=False)
    left = [n for n in ACCOUNTS if _exists(pwd.getpwnam, n)]
    left += [g for g in (USERS, ADMINS) if _exists(grp.getgrnam, g)]
    assert not left, f"could not remove the test accounts {left} (a process of theirs runs?)"


def _run(argv: Sequence[str]) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, f"{' '.join(argv)}: {res.stderr}"


@pytest.fixture(scope="module")
def accounts() -> Iterator[Accounts]:
    _remove_accounts()
    try:
        for group in (USERS, ADMINS):
            _run(["groupadd", "--system", group])
        for name, groups in ACCOUNTS.items():
            argv = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent"]
            argv += ["--shell", "/usr/sbin/nologin", "--gid", str(NOGROUP)]
            if groups:
                argv += ["--groups", ",".join(groups)]
            _run([*argv, name])
        made = {n: Account(n, pwd.getpwnam(n).pw_uid, NOGROUP) for n in ACCOUNTS}
        gids = {g: grp.getgrnam(g).gr_gid for g in (USERS, ADMINS)}
        # setpriv --init-groups takes numeric ids and still finds the groups
        for name, groups in ACCOUNTS.items():
            res = subprocess.run(
                made[name].argv(["id", "-G"]),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert res.returncode == 0, res.stderr
            assert {int(g) for g in res.stdout.split()} == {NOGROUP, *(gids[g] for g in groups)}
        yield Accounts(made[USER], made[ADMIN], made[OTHER], gids[USERS], gids[ADMINS], made[USER2])
    finally:
        _remove_accounts()


# -- daemons ---------------------------------------------------------------------------


def start(workdir: Path, **settings: object) -> Daemon:
    """`qusd --sandbox` with the test groups and settings in workdir/qusd.toml."""
    write_settings(workdir, **{**ROLE_SETTINGS, **settings})
    return Daemon(workdir)


@contextlib.contextmanager
def running(workdir: Path, **settings: object) -> Iterator[Daemon]:
    d = start(workdir, **settings)
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            d.stop()


@pytest.fixture
def roled(accounts: Accounts, workdir: Path) -> Iterator[Daemon]:
    """A daemon whose user, socket and admin groups are the test groups."""
    with running(workdir) as d:
        yield d


# -- clients ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: Any  # the JSON, None when empty
    pid: int  # curl's: setpriv execs it, so this is the pid the daemon sees

    @property
    def detail(self) -> str:
        return str(self.body.get("detail", "")) if isinstance(self.body, dict) else ""

    def __str__(self) -> str:
        return f"{self.status} {self.headers.get('content-type')}: {self.body!r}"


def request(who: Account | None, sock: str, method: str, path: str, body: Any = NO_BODY) -> Answer:
    """One request with curl, as who (None: root): the status and the JSON."""
    argv = [CURL, "-s", "-S", "-i", "--max-time", "30", "--unix-socket", sock, "-X", method]
    if body is not NO_BODY:
        argv += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
    argv.append("http://qusd" + path)
    proc = subprocess.Popen(
        who.argv(argv) if who else argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
    )
    out, err = proc.communicate(timeout=40)
    name = who.name if who else "root"
    assert proc.returncode == 0, f"curl as {name} exited {proc.returncode}: {err!r}"
    reply = parse_http(out)
    return Answer(
        reply.status, reply.headers, json.loads(reply.body) if reply.body else None, proc.pid
    )


def ok(
    d: Daemon,
    who: Account | None,
    method: str,
    path: str,
    body: Any = NO_BODY,
    *,
    status: int = 200,
) -> Any:
    """The JSON of an answer that must have status."""
    ans = request(who, d.socket, method, path, body)
    assert ans.status == status, f"{who.name if who else 'root'}: {method} {path}: {ans}"
    return ans.body


def refused(
    d: Daemon,
    who: Account | None,
    method: str,
    path: str,
    body: Any = NO_BODY,
    *,
    says: Sequence[str],
    status: int = 403,
    code: str = "forbidden",
) -> Answer:
    """A request that must be refused with a problem naming the rule, and
    leave the kernel table and the state file as they were."""
    with unchanged(d):
        ans = request(who, d.socket, method, path, body)
    assert ans.status == status, f"{who.name if who else 'root'}: {method} {path}: {ans}"
    assert ans.headers.get("content-type", "").startswith(PROBLEM_JSON), str(ans)
    assert ans.body["code"] == code and ans.body["status"] == status, str(ans)
    for words in says:
        assert words in ans.detail, f"{words!r} not in {ans.detail!r}"
    return ans


def recorded(d: Daemon) -> dict[str, dict[str, Any]]:
    """The state's records by name, as the state file writes them."""
    return {n: r.to_json() for n, r in State.load(d.state_dir).records.items()}


def audit_lines(d: Daemon) -> list[dict[str, str]]:
    found = []
    for line in d.log.read_text().splitlines():
        m = AUDIT.search(line)
        if m:
            found.append(m.groupdict())
    return found


def entry_body(
    name: str, interp: str, magic: str | None = "51555344", **more: object
) -> dict[str, Any]:
    """A custom rule; the default magic ("QUSD") matches no real program."""
    return {"entry": {"name": name, "magic": magic, "interpreter": interp, **more}}


# -- peer credentials and the socket ---------------------------------------------------


def test_peer_credentials_carry_supplementary_groups(accounts: Accounts, workdir: Path) -> None:
    """What the daemon learns of a curl run by setpriv: the uid, the pid and,
    through SO_PEERGROUPS, the supplementary groups that make the role."""
    policy = Policy(Config(admin_group=ADMINS, user_group=USERS), HOST_FAMILY, BUILTIN)
    path = str(workdir / "peer.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)
        os.chmod(path, 0o666)
        srv.listen(4)
        srv.settimeout(20)
        want = {
            accounts.user: ({NOGROUP, accounts.users_gid}, Role.USER),
            accounts.admin: ({NOGROUP, accounts.users_gid, accounts.admins_gid}, Role.ADMIN),
            accounts.other: ({NOGROUP}, Role.READER),
        }
        for acc, (groups, role) in want.items():
            argv = [CURL, "-s", "--max-time", "10", "--unix-socket", path, "http://peer/"]
            proc = subprocess.Popen(acc.argv(argv), stdout=subprocess.DEVNULL, cwd="/")
            try:
                conn, _ = srv.accept()
                with conn:
                    who = Caller.of_socket(conn)
            finally:
                proc.wait(timeout=20)
            assert (who.uid, who.gid, who.pid) == (acc.uid, NOGROUP, proc.pid)
            assert who.groups == groups
            assert policy.role(who) is role


def test_socket_is_closed_to_outsiders(accounts: Accounts, roled: Daemon, shared: Shared) -> None:
    st = os.stat(roled.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, accounts.users_gid)
    for who in (accounts.user, accounts.admin, None):
        assert ok(roled, who, "GET", "/v1/health") == {"status": "ok"}
    body = json.dumps({"targets": ["arm64"]})
    with unchanged(roled):
        for extra in ([], ["-X", "POST", "-H", "Content-Type: application/json", "-d", body]):
            argv = [CURL, "-s", "-S", "--unix-socket", roled.socket, *extra]
            res = subprocess.run(
                accounts.other.argv([*argv, "http://qusd/v1/registrations"]),
                capture_output=True,
                text=True,
                timeout=40,
                check=False,
                cwd="/",
            )
            assert res.returncode == 7, (res.returncode, res.stderr)  # could not connect
            assert "Couldn't connect" in res.stderr or "Permission denied" in res.stderr
        # qusctl says why, and how to get in, with the permission exit status
        py = python_for(accounts.other.uid)
        res = subprocess.run(
            accounts.other.argv([py, "-m", "qusd.cli", "--socket", roled.socket, "list"]),
            capture_output=True, text=True, timeout=40, check=False, cwd="/",
            env={"PATH": os.environ["PATH"], "PYTHONPATH": shared.pythonpath},
        )  # fmt: skip
        assert res.returncode == 77, res.stderr
        assert "add you to the qusd group" in res.stderr
    assert audit_lines(roled) == []  # it never reached the daemon


def test_readers_read_and_change_nothing(accounts: Accounts, workdir: Path) -> None:
    """With the socket open to all (666), anyone else may read, never change."""
    other = accounts.other
    with running(workdir, socket_mode="666") as d:
        assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o666
        d.client.request("POST", "/v1/registrations", {"targets": ["arm64"]})
        d.inside.kernel.register(WINE)
        listed = ok(d, other, "GET", "/v1/registrations")
        assert [r["name"] for r in listed] == sorted(in_kernel(d)) == ["DOSWin", "qemu-aarch64"]
        assert ok(d, other, "GET", "/v1/registrations/qemu-aarch64")["managed"] is True
        assert ok(d, other, "GET", "/v1/status")["counts"]["entries"] == 2
        assert len(ok(d, other, "GET", "/v1/targets")) == len(BUILTIN)
        only_read = [
            f"'{USERS}' group (users)",
            f"'{ADMINS}' (admins)",
            f"uid {other.uid} may only read",
        ]
        for method, path, body, action in [
            ("POST", "/v1/registrations", {"targets": ["arm64"]}, "registering"),
            ("POST", "/v1/registrations", {"targets": ["s390x"], "flags": "P"}, "registering"),
            ("POST", "/v1/registrations", {}, "registering"),
            ("POST", "/v1/registrations", entry_body("q", "/bin/true"), "registering"),
            ("PATCH", "/v1/registrations/qemu-aarch64", {"enabled": False}, "disable"),
            ("PATCH", "/v1/registrations/DOSWin", {"enabled": True}, "enable"),
            ("DELETE", "/v1/registrations/qemu-aarch64", NO_BODY, "unregister"),
            ("DELETE", "/v1/registrations/DOSWin", NO_BODY, "unregister"),
            ("POST", "/v1/reset", {}, "reset"),
            ("POST", "/v1/reset", {"scope": "all"}, "reset"),
        ]:
            refused(d, other, method, path, body, says=[f"{action} needs membership", *only_read])


# -- users -----------------------------------------------------------------------------


def test_user_registers_foreign_catalog_targets(accounts: Accounts, roled: Daemon) -> None:
    user, d = accounts.user, roled
    assert ok(d, user, "GET", "/v1/registrations") == []
    assert ok(d, user, "GET", "/v1/status")["family"] == HOST_FAMILY
    assert len(ok(d, user, "GET", "/v1/targets")) == len(BUILTIN)

    done = ok(d, user, "POST", "/v1/registrations", {"targets": ["arm64"]}, status=201)
    [made] = done["registered"]
    assert (made["name"], made["flags"], made["managed"]) == ("qemu-aarch64", "F", True)
    ok(d, user, "POST", "/v1/registrations", {"targets": ["s390x"], "flags": "P"}, status=201)
    ok(d, user, "POST", "/v1/registrations", {"targets": ["riscv64"], "flags": "PF"}, status=201)
    kernel = in_kernel(d)
    assert {n: (e.interpreter, e.flags, e.enabled) for n, e in kernel.items()} == {
        "qemu-aarch64": (interpreter("aarch64"), "F", True),
        "qemu-s390x": (interpreter("s390x"), "P", True),
        "qemu-riscv64": (interpreter("riscv64"), "PF", True),
    }
    assert set(recorded(d)) == set(kernel)

    reg = "/v1/registrations"
    # host-native targets: the whole request is refused, foreign ones in it too
    native = [t.name for t in BUILTIN if t.family == HOST_FAMILY]
    assert {"x86_64", "i386"} <= set(native)
    for name in native:
        refused(
            d,
            user,
            "POST",
            reg,
            {"targets": ["ppc64le", name]},
            says=[
                f"{name} is of the host's own family ({HOST_FAMILY})",
                "users may register only foreign targets",
            ],
        )
    # flags outside the allowlist; C and O never
    for flags, bad in (("C", "C"), ("FC", "C"), ("O", "O"), ("OCF", "CO")):
        refused(
            d,
            user,
            "POST",
            reg,
            {"targets": ["ppc64le"], "flags": flags},
            says=[
                f"flag(s) {bad} are admin-only (users may use: FP)",
                *(["C runs the interpreter with the binary's set-uid credentials"] * ("C" in bad)),
                *(["O hands the interpreter an open descriptor"] * ("O" in bad)),
                "register with --flags FP or ask an admin",
            ],
        )
    # custom rules, and so interpreters the client chose
    custom = "custom rules (own magic, mask or interpreter) are admin-only"
    aarch64 = {"magic": AARCH64.magic.hex(), "mask": AARCH64.mask.hex()}
    for body in (
        entry_body("qemu-aarch64-mine", interpreter("aarch64"), **aarch64),
        entry_body("qemu-aarch64-mine", "/bin/true", **aarch64),
        entry_body("qusdt-ext", "/bin/true", type="extension", extension="qusdt", magic=None),
    ):
        refused(d, user, "POST", reg, body, says=[custom])
    refused(
        d, user, "POST", reg, {"targets": ["ppc64le"], "force": True}, says=["force is admin-only"]
    )
    refused(
        d,
        user,
        "POST",
        reg,
        {"targets": ["ppc64le"], "allow_untrusted_interpreter": True},
        says=["allow_untrusted_interpreter is admin-only"],
    )
    assert set(in_kernel(d)) == {"qemu-aarch64", "qemu-s390x", "qemu-riscv64"}


def test_user_touches_only_what_qusd_manages(accounts: Accounts, roled: Daemon) -> None:
    """...and, of that, only their own entries (tests/test_security.py shows
    the entries of an admin and of another user refused)."""
    user, d = accounts.user, roled
    reg = "/v1/registrations"
    ok(d, user, "POST", reg, {"targets": ["aarch64"]}, status=201)
    for rule in (WINE, foreign_qemu("ppc64le")):  # by other tools
        d.inside.kernel.register(rule)

    # managed, theirs: disable, enable
    assert ok(d, user, "PATCH", f"{reg}/qemu-aarch64", {"enabled": False})["enabled"] is False
    assert in_kernel(d)["qemu-aarch64"].enabled is False
    assert recorded(d)["qemu-aarch64"]["enabled"] is False
    assert ok(d, user, "PATCH", f"{reg}/qemu-aarch64", {"enabled": True})["enabled"] is True
    assert in_kernel(d)["qemu-aarch64"].enabled is True

    # foreign: neither touched nor replaced
    for name in ("DOSWin", "qemu-ppc64le"):
        for enabled, action in ((False, "disable"), (True, "enable")):
            refused(
                d,
                user,
                "PATCH",
                f"{reg}/{name}",
                {"enabled": enabled},
                says=[
                    f"{name} was not registered by qusd: users may {action} only "
                    "entries qusd manages"
                ],
            )
        refused(
            d,
            user,
            "DELETE",
            f"{reg}/{name}",
            says=[f"{name} was not registered by qusd: users may unregister only"],
        )
    refused(
        d,
        user,
        "POST",
        reg,
        {"targets": ["ppc64le"], "flags": "P", "replace": True},
        says=["qemu-ppc64le was not registered by qusd: only admins may replace it"],
    )
    refused(
        d,
        user,
        "POST",
        reg,
        {"targets": ["ppc64le"], "flags": "P"},
        status=409,
        code="conflict",
        says=["already registered"],
    )

    # reset: managed only
    for scope in ("qemu", "all"):
        refused(
            d,
            user,
            "POST",
            "/v1/reset",
            {"scope": scope},
            says=[f"reset with scope '{scope}' is admin-only; users may reset 'managed'"],
        )
    ok(d, user, "POST", reg, {"targets": ["s390x", "riscv64"]}, status=201)
    assert ok(d, user, "DELETE", f"{reg}/qemu-s390x", status=204) is None
    assert "qemu-s390x" not in in_kernel(d) and "qemu-s390x" not in recorded(d)
    removed = ok(d, user, "POST", "/v1/reset", {"scope": "managed"})["removed"]
    assert sorted(removed) == ["qemu-aarch64", "qemu-riscv64"]
    assert sorted(in_kernel(d)) == ["DOSWin", "qemu-ppc64le"]  # foreign ones stay
    assert recorded(d) == {}


def test_user_cannot_adopt_a_foreign_entry(accounts: Accounts, roled: Daemon) -> None:
    user, d, reg = accounts.user, roled, "/v1/registrations"
    d.inside.kernel.register(foreign_qemu("ppc64le"))  # what systemd-binfmt writes
    refused(d, user, "DELETE", f"{reg}/qemu-ppc64le", says=["not registered by qusd"])
    ok(d, user, "POST", reg, {"targets": ["ppc64le"]}, status=201)
    refused(d, user, "DELETE", f"{reg}/qemu-ppc64le", says=["not registered by qusd"])
    assert "qemu-ppc64le" in in_kernel(d)


def test_user_flags_come_from_the_allowlist(accounts: Accounts, workdir: Path) -> None:
    """user_flags narrows what users may ask for; C stays admin-only even if listed."""
    user, reg = accounts.user, "/v1/registrations"
    with running(workdir, user_flags="PC") as d:
        for flags, bad in ((None, "F"), ("F", "F"), ("C", "C"), ("PC", "C")):
            body: dict[str, Any] = {"targets": ["arm64"]}
            if flags is not None:
                body["flags"] = flags
            refused(
                d,
                user,
                "POST",
                reg,
                body,
                says=[f"flag(s) {bad} are admin-only (users may use: P)"],
            )
        ok(d, user, "POST", reg, {"targets": ["arm64"], "flags": "P"}, status=201)
        ok(d, accounts.admin, "POST", reg, {"targets": ["s390x"], "flags": "CF"}, status=201)
        flags_now = {n: e.flags for n, e in in_kernel(d).items()}
        assert flags_now == {"qemu-aarch64": "P", "qemu-s390x": "OCF"}


# -- admins ----------------------------------------------------------------------------


def test_admins_may_do_everything(accounts: Accounts, roled: Daemon) -> None:
    """qusdt-admin (an admin through a supplementary group) and root."""
    admin, d, reg = accounts.admin, roled, "/v1/registrations"
    for rule in (WINE, foreign_qemu("ppc64le")):
        d.inside.kernel.register(rule)
    qemu = interpreter("aarch64")

    ok(d, admin, "POST", reg, {"targets": ["arm64"], "flags": "CF"}, status=201)
    ok(d, admin, "POST", reg, entry_body("qusdt-custom", qemu, mask="ffffffff"), status=201)
    ext = entry_body("qusdt-ext", "/bin/true", type="extension", extension="qusdt", magic=None)
    ok(d, admin, "POST", reg, ext, status=201)
    replaced = ok(
        d, admin, "POST", reg, {"targets": ["ppc64le"], "flags": "P", "replace": True}, status=201
    )
    assert replaced["registered"][0]["managed"] is True
    kernel = in_kernel(d)
    assert {n: (e.interpreter, e.flags) for n, e in kernel.items()} == {
        "DOSWin": ("/usr/bin/wine", ""),
        "qemu-aarch64": (qemu, "OCF"),
        "qemu-ppc64le": (interpreter("ppc64le"), "P"),
        "qusdt-custom": (qemu, ""),
        "qusdt-ext": ("/bin/true", ""),
    }
    assert kernel["qusdt-custom"].magic == b"QUSD" and kernel["qusdt-ext"].extension == "qusdt"

    # foreign entries: disable, enable, remove
    assert ok(d, admin, "PATCH", f"{reg}/DOSWin", {"enabled": False})["enabled"] is False
    assert in_kernel(d)["DOSWin"].enabled is False
    ok(d, admin, "PATCH", f"{reg}/DOSWin", {"enabled": True})
    assert in_kernel(d)["DOSWin"].enabled is True
    ok(d, admin, "DELETE", f"{reg}/DOSWin", status=204)
    assert "DOSWin" not in in_kernel(d)

    # reset qemu: every qemu-* entry, whoever made it
    d.inside.kernel.register(foreign_qemu("s390x"))
    removed = ok(d, admin, "POST", "/v1/reset", {"scope": "qemu"})["removed"]
    assert sorted(removed) == ["qemu-aarch64", "qemu-ppc64le", "qemu-s390x"]
    assert sorted(in_kernel(d)) == ["qusdt-custom", "qusdt-ext"]

    # root is an admin too: reset all empties the table
    d.inside.kernel.register(WINE)
    removed = ok(d, None, "POST", "/v1/reset", {"scope": "all"})["removed"]
    assert sorted(removed) == ["DOSWin", "qusdt-custom", "qusdt-ext"]
    assert d.table() == [] and recorded(d) == {}


# -- trusted interpreters --------------------------------------------------------------


def test_client_chosen_interpreter_must_be_trusted(accounts: Accounts, roled: Daemon) -> None:
    """An admin's custom rule whose interpreter others could replace: refused,
    naming the offending path, unless the admin overrides."""
    admin, user, d, reg = accounts.admin, accounts.user, roled, "/v1/registrations"
    wide = d.workdir / "world-writable"
    wide.mkdir()
    wide.chmod(0o777)
    owned = d.workdir / "user-owned"
    owned.mkdir()
    os.chown(owned, user.uid, NOGROUP)
    owned.chmod(0o755)
    plain = d.workdir / "plain"
    plain.mkdir()
    plain.chmod(0o755)
    wide_exe, owned_exe, user_exe = wide / "qusdt-true", owned / "qusdt-true", plain / "mine"
    for exe in (wide_exe, owned_exe, user_exe):
        shutil.copy("/bin/true", exe)
        exe.chmod(0o755)
    os.chown(user_exe, user.uid, NOGROUP)

    cases = {
        wide_exe: f"{wide} (for {wide_exe}) is writable by group or others (mode 777)",
        owned_exe: f"{owned} (for {owned_exe}) is owned by uid {user.uid}, not root",
        user_exe: f"{user_exe} is owned by uid {user.uid}, not root",
        # a root-owned 0755 directory under /tmp: /tmp is writable by all
        plain / "qusdt-true": f"/tmp (for {plain / 'qusdt-true'}) is writable by group or others",
    }
    shutil.copy("/bin/true", plain / "qusdt-true")
    for exe, says in cases.items():
        for who in (admin, None):
            refused(
                d,
                who,
                "POST",
                reg,
                entry_body("qusdt-true", str(exe)),
                code="untrusted-interpreter",
                says=[says],
            )
    # the admin's explicit override
    for i, exe in enumerate(cases):
        body = entry_body(f"qusdt-true{i}", str(exe))
        ok(d, admin, "POST", reg, {**body, "allow_untrusted_interpreter": True}, status=201)
        assert in_kernel(d)[f"qusdt-true{i}"].interpreter == str(exe)
    # never for users, however they ask
    for extra in ({"allow_untrusted_interpreter": True}, {"force": True}):
        refused(
            d,
            user,
            "POST",
            reg,
            {"targets": ["arm64"], **extra},
            says=[f"{next(iter(extra))} is admin-only"],
        )
        refused(
            d,
            user,
            "POST",
            reg,
            {**entry_body("qusdt-x", str(user_exe)), **extra},
            says=["custom rules (own magic, mask or interpreter) are admin-only"],
        )


def _interpreter_dir(workdir: Path, owner: Account, link: bool) -> tuple[Path, Path]:
    """A directory owned by owner holding qemu-aarch64-static (a root-owned
    copy of the real one, or a symlink to it)."""
    where = workdir / "interpreters"
    where.mkdir()
    os.chown(where, owner.uid, NOGROUP)
    where.chmod(0o755)
    exe = where / "qemu-aarch64-static"
    if link:
        exe.symlink_to(interpreter("aarch64"))
        os.lchown(exe, owner.uid, NOGROUP)
    else:
        shutil.copy(interpreter("aarch64"), exe)
        exe.chmod(0o755)
    return where, exe


def test_interpreter_found_in_an_untrusted_directory(accounts: Accounts, workdir: Path) -> None:
    """interpreter_dirs points at qusdt-user's directory: whatever qusd finds
    there is refused to the user and, unless overridden, to the admin."""
    user, admin, reg = accounts.user, accounts.admin, "/v1/registrations"
    where, exe = _interpreter_dir(workdir, user, link=False)
    with running(workdir, interpreter_dirs=[str(where)]) as d:
        targets = {t["name"]: t for t in ok(d, user, "GET", "/v1/targets")}
        assert targets["aarch64"]["interpreter"] == str(exe)
        says = f"{where} (for {exe}) is owned by uid {user.uid}, not root"
        for who in (user, admin, None):
            refused(
                d,
                who,
                "POST",
                reg,
                {"targets": ["arm64"]},
                code="untrusted-interpreter",
                says=[says],
            )
        refused(
            d,
            user,
            "POST",
            reg,
            {"targets": ["arm64"], "allow_untrusted_interpreter": True},
            says=["allow_untrusted_interpreter is admin-only"],
        )
        body = {"targets": ["arm64"], "allow_untrusted_interpreter": True}
        ok(d, admin, "POST", reg, body, status=201)
        assert in_kernel(d)["qemu-aarch64"].interpreter == str(exe)


def test_symlinked_interpreter_in_an_untrusted_directory(accounts: Accounts, workdir: Path) -> None:
    user = accounts.user
    where, _ = _interpreter_dir(workdir, user, link=True)
    with running(workdir, interpreter_dirs=[str(where)]) as d:
        ans = request(
            user, d.socket, "POST", "/v1/registrations", {"targets": ["arm64"], "flags": "P"}
        )
        assert (ans.status, ans.body.get("code")) == (403, "untrusted-interpreter"), str(ans)
        assert str(where) in ans.detail


# -- host protection -------------------------------------------------------------------


def test_rules_for_the_hosts_own_programs(accounts: Accounts, roled: Daemon) -> None:
    admin, user, d, reg = accounts.admin, accounts.user, roled, "/v1/registrations"
    qemu = interpreter("aarch64")
    for who in (admin, None):
        for name in ("x86_64", "i386"):
            refused(
                d,
                who,
                "POST",
                reg,
                {"targets": [name]},
                code="host-type",
                says=[
                    f"qemu-{name} would match the host's own programs ({HOST_FAMILY} ELF)",
                    "an admin may force it (qusctl register --force)",
                ],
            )
        # every ELF file, and with a mask that ignores everything: every file
        for magic, mask in (("7f454c46", None), ("00", "00")):
            body = entry_body("qusdt-elf", qemu, magic=magic, **({"mask": mask} if mask else {}))
            refused(
                d,
                who,
                "POST",
                reg,
                body,
                code="host-type",
                says=["qusdt-elf would match the host's own programs"],
            )
    refused(
        d,
        user,
        "POST",
        reg,
        {"targets": ["x86_64"], "force": True},
        says=["is of the host's own family"],
    )
    # an admin who means it; removed at once: while it is there every x86_64
    # program started in the sandbox runs under qemu
    try:
        done = ok(d, admin, "POST", reg, {"targets": ["x86_64"], "force": True}, status=201)
        assert done["registered"][0]["name"] == "qemu-x86_64"
        assert in_kernel(d)["qemu-x86_64"].interpreter == interpreter("x86_64")
    finally:
        ok(d, admin, "DELETE", f"{reg}/qemu-x86_64", status=204)
    assert d.table() == [] and recorded(d) == {}


# -- rate limit ------------------------------------------------------------------------


def test_mutations_are_rate_limited_per_uid(accounts: Accounts, workdir: Path) -> None:
    user, admin, other, reg = accounts.user, accounts.admin, accounts.other, "/v1/registrations"
    with running(workdir, rate_limit=1.0, rate_burst=2, socket_mode="666") as d:
        d.table()  # the worker that checks the kernel starts now, not between requests
        ok(d, user, "POST", reg, {"targets": ["arm64"]}, status=201)
        ok(d, user, "POST", reg, {"targets": ["arm64"]}, status=201)  # unchanged: still counts
        ans = refused(
            d,
            user,
            "POST",
            reg,
            {"targets": ["s390x"]},
            status=429,
            code="rate-limited",
            says=[f"uid {user.uid} sent more than 2 changes", "at most 1 a second", "retry in"],
        )
        retry = ans.headers["retry-after"]
        assert retry.isdigit() and 1 <= int(retry) <= 2, retry
        assert f"retry in {retry} s" in ans.detail
        assert ok(d, user, "GET", "/v1/registrations")  # reads have a bucket of their own
        # other uids have buckets of their own; admins have none
        refused(d, other, "POST", reg, {"targets": ["s390x"]}, says=["may only read"])
        for i in range(6):
            ok(d, admin, "PATCH", f"{reg}/qemu-aarch64", {"enabled": bool(i % 2)})
        ok(d, None, "POST", reg, {"targets": ["s390x"]}, status=201)
        time.sleep(math.ceil(float(retry)))
        ok(d, user, "POST", reg, {"targets": ["riscv64"]}, status=201)
        assert sorted(in_kernel(d)) == ["qemu-aarch64", "qemu-riscv64", "qemu-s390x"]
        results = [(a["uid"], a["result"]) for a in audit_lines(d)]
        assert results[:3] == [(str(user.uid), "201")] * 2 + [(str(user.uid), "429")]


def test_admins_are_rate_limited_when_configured(accounts: Accounts, workdir: Path) -> None:
    admin, reg = accounts.admin, "/v1/registrations"
    with running(workdir, rate_limit=1.0, rate_burst=2, rate_limit_admins=True) as d:
        d.table()
        ok(d, admin, "POST", reg, {"targets": ["arm64"]}, status=201)
        ok(d, admin, "POST", reg, {"targets": ["s390x"]}, status=201)
        ans = refused(
            d,
            admin,
            "DELETE",
            f"{reg}/qemu-s390x",
            status=429,
            code="rate-limited",
            says=[f"uid {admin.uid}"],
        )
        assert int(ans.headers["retry-after"]) >= 1
        ok(d, None, "DELETE", f"{reg}/qemu-s390x", status=204)  # root: a bucket of its own


# -- audit -----------------------------------------------------------------------------


def test_every_mutation_is_audited(accounts: Accounts, roled: Daemon) -> None:
    user, admin, d, reg = accounts.user, accounts.admin, roled, "/v1/registrations"
    qemu = interpreter("aarch64")
    steps: list[tuple[Account | None, str, str, Any, str, int]] = [
        (user, "POST", reg, {"targets": ["arm64"]}, "arm64", 201),
        (user, "POST", reg, {"targets": ["x86_64", "s390x"]}, "x86_64,s390x", 403),
        (user, "GET", reg, NO_BODY, "", 200),  # reading: no audit line
        (user, "PATCH", f"{reg}/qemu-aarch64", {"enabled": False}, "qemu-aarch64", 200),
        (user, "POST", reg, {"targets": "arm64"}, "-", 422),
        (admin, "POST", reg, entry_body("qusdt-elf", qemu, magic="7f454c46"), "qusdt-elf", 403),
        (admin, "POST", reg, {"targets": ["s390x"], "flags": "CF"}, "s390x", 201),
        (user, "POST", "/v1/reset", {"scope": "all"}, "scope=all", 403),
        (admin, "DELETE", f"{reg}/qemu-aarch64", NO_BODY, "qemu-aarch64", 204),
        (None, "POST", "/v1/reset", {}, "scope=managed", 200),
    ]
    want = []
    for who, method, path, body, names, status in steps:
        ans = request(who, d.socket, method, path, body)
        assert ans.status == status, f"{method} {path}: {ans}"
        if method != "GET":
            uid = who.uid if who else 0
            want.append((str(uid), str(ans.pid), f"{method} {path}", names, str(status)))
    assert d.table() == []
    lines = audit_lines(d)
    assert [(a["uid"], a["pid"], a["action"], a["names"], a["result"]) for a in lines] == want
    # the executable: a daemon in a sandbox has no CAP_SYS_PTRACE over the
    # processes outside it, so it cannot read their /proc/PID/exe and names
    # their command instead, in brackets; outside a sandbox, the path
    for a in lines:
        assert int(a["pid"]) > 0 and a["exe"] in (os.path.realpath(CURL), "[curl]"), a


# -- rootless --------------------------------------------------------------------------


def _wait_for_socket(proc: subprocess.Popen[bytes], sock: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"qusd exited {proc.returncode}: {log.read_text()}"
        with contextlib.suppress(QusdError):
            if Client(sock, timeout=5).get("/v1/health") == {"status": "ok"}:
                return
        time.sleep(0.05)
    raise AssertionError(f"qusd did not answer in 30 s: {log.read_text()}")


def test_rootless_daemon_of_an_ordinary_user(
    accounts: Accounts, workdir: Path, shared: Shared
) -> None:
    """qusdt-user, with no privilege, runs its own qusd: it is root (so admin)
    in its namespace, registers arm64 there and runs an arm64 program."""
    user = accounts.user
    home = workdir / "rootless"
    home.mkdir()
    config = home / "empty.toml"
    config.write_text("# built-in defaults\n")
    for path in (home, config):
        os.chown(path, user.uid, NOGROUP)
    home.chmod(0o700)
    sock = str(home / "qusd.sock")
    bb = shared.busybox("arm64")
    py = python_for(user.uid)
    # the Python the user may run gets the copy of this checkout's packages
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": shared.pythonpath}
    probe = subprocess.run(
        user.argv([py, "-c", f"import aiohttp, pydantic, qusd.daemon; open({str(bb)!r}).close()"]),
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert probe.returncode == 0, f"{user.name} cannot run qusd with {py}: {probe.stderr}"

    log = workdir / "rootless.log"
    argv = [
        py,
        "-m",
        "qusd.daemon",
        "--sandbox",
        "--socket",
        sock,
        "--state-dir",
        str(home / "state"),
        "--config",
        str(config),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(user.argv(argv), env=env, cwd=home, stdout=out, stderr=out)
    try:
        _wait_for_socket(proc, sock, log)
        status = request(user, sock, "GET", "/v1/status").body
        assert status["sandbox"] == {"pid": proc.pid}
        done = request(user, sock, "POST", "/v1/registrations", {"targets": ["arm64"]})
        assert done.status == 201, str(done)
        assert done.body["registered"][0]["interpreter"] == interpreter("aarch64")
        # the host's root is nobody there: it may only read
        overflow = int(Path("/proc/sys/kernel/overflowuid").read_text())
        root = request(None, sock, "POST", "/v1/registrations", {"targets": ["s390x"]})
        assert root.status == 403 and f"uid {overflow} may only read" in root.detail, str(root)
        run = subprocess.run(
            user.argv(
                [py, "-m", "qusd.cli", "--socket", sock, "run", "--", str(bb), "uname", "-m"]
            ),
            env=env,
            cwd=home,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (run.returncode, run.stdout.strip()) == (0, "aarch64"), run.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert f'audit: uid="0" pid="{done.pid}" ' in log.read_text()  # root in its namespace
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
