"""Hardening, against the real daemon in its sandbox, over its real socket.

Three kinds of attack: injection tries through the API and through qusctl
(every one refused before the kernel sees it, naming the field); property-
based fuzzing of every operation of the OpenAPI document (never a 5xx, never
a change for a refused request, the daemon healthy afterwards); and slow or
flooding clients on the Unix socket (cut at the header and body timeouts, at
most max_connections open, health answered throughout, memory bounded).

"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qusd.api import MAX_BODY
from tests.conftest import NOBODY, ROOT, Daemon, interpreter, needs_sandbox
from tests.test_api import (
    KINDS,
    PROBLEM_JSON,
    WINE,
    Api,
    Bad,
    Reply,
    check,
    connect,
    entry,
    in_kernel,
    ok,
    parse_http,
    refused,
    seed,
    snapshot,
    unchanged,
)
from tests.test_policy import _mount_tmpfs
from tests.test_qusctl_daemon import one_line_error, qusctl

pytestmark = [needs_sandbox]

#: the guarded daemon of the slow-client and flood tests
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
MAX_CONNECTIONS = 32
#: slack on every deadline: a loaded machine, a timer that fires late
MARGIN = 1.5


# -- a raw HTTP/1.1 client on the Unix socket --------------------------------------


def http(
    path_to_socket: str,
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str | None = None,
    *,
    timeout: float = 10.0,
) -> Reply:
    """One request on a connection of its own; the path is sent as it is."""
    head = [f"{method} {path} HTTP/1.1", "Host: qusd", "Connection: close"]
    if content_type is not None:
        head.append(f"Content-Type: {content_type}")
    if body is not None:
        head.append(f"Content-Length: {len(body)}")
    data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b"")
    chunks = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path_to_socket)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)  # the daemon may answer (413) before it read everything
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return parse_http(b"".join(chunks))


def http_json(path_to_socket: str, method: str, path: str, doc: Any) -> Reply:
    return http(path_to_socket, method, path, json.dumps(doc).encode(), "application/json")


def seed_sync(d: Daemon) -> None:
    """A managed qemu-aarch64 and another tool's entry (what refusals must leave alone)."""
    interpreter("aarch64")
    reply = http_json(d.socket, "POST", "/v1/registrations", {"targets": ["aarch64"]})
    assert reply.status == 201, str(reply)
    d.inside.kernel.register(WINE)
    assert sorted(e.name for e in d.table()) == ["DOSWin", "qemu-aarch64"]


# -- interpreters that must not be trusted ---------------------------------------


def _closed_to_others(path: Path) -> bool:
    """Whether path and every directory above it are root's and writable by no one else."""
    for p in (path, *path.parents):
        st_ = p.stat()
        if st_.st_uid != 0 or st_.st_mode & 0o022:
            return False
    return True


@contextlib.contextmanager
def trap_dir() -> Iterator[tuple[str, bool]]:
    """A root-owned directory closed to others, as (path, mount): a fresh one
    under the repository's .cache when the repository's parents allow it,
    else /mnt, where _lay_traps mounts a tmpfs inside the daemon's sandbox."""
    cache = ROOT / ".cache"
    if cache.is_dir() and _closed_to_others(cache):
        where = tempfile.mkdtemp(dir=cache, prefix="hardening-")
        os.chmod(where, 0o755)
        try:
            yield where, False
        finally:
            shutil.rmtree(where, ignore_errors=True)
    else:
        yield "/mnt", True


def _exe(path: Path, mode: int = 0o755) -> str:
    shutil.copy("/bin/true", path)
    path.chmod(mode)
    return str(path)


def _lay_traps(where: str, mount: bool, user_writable: str) -> dict[str, str]:
    """Inside the daemon's sandbox: interpreters in a root-owned directory
    closed to others, each untrusted in one way, and one that is fine."""
    if mount:
        _mount_tmpfs(where)
    base = Path(where)
    traps = {
        "trusted": _exe(base / "qemu-trusted"),
        "group-writable": _exe(base / "qemu-group-writable", 0o775),
        "world-writable": _exe(base / "qemu-world-writable", 0o777),
        "owned-by-nobody": _exe(base / "qemu-nobody"),
    }
    os.chown(traps["owned-by-nobody"], NOBODY, NOBODY)
    public = base / "public"
    public.mkdir()
    public.chmod(0o1777)  # like /tmp
    traps["world-writable-parent"] = _exe(public / "qemu")
    link = base / "qemu-link"
    link.symlink_to(user_writable)
    traps["symlink-to-user-writable"] = str(link)
    # what qusctl register finds for arm64 and for mips64el
    (base / "qemu-aarch64-static").symlink_to(user_writable)
    traps["mips64el"] = _exe(base / "qemu-mips64el-static")
    return traps


def user_writable_file(tmp_path: Path) -> str:
    """An executable anyone may rewrite."""
    return os.path.realpath(_exe(tmp_path / "anyone-may-write", 0o777))


def first_open_ancestor(path: str) -> Path | None:
    """The directory check_trusted blames for path: the nearest one above it
    that is not root's or is writable by others (tmp_path: /tmp, mode 1777)."""
    for p in Path(os.path.realpath(path)).parents:
        st_ = p.stat()
        if st_.st_uid != 0 or st_.st_mode & 0o022:
            return p
    return None


# -- injection tries through the API ---------------------------------------------------


@pytest.fixture(params=KINDS)
async def client(request: pytest.FixtureRequest, daemon: Daemon) -> AsyncIterator[Api]:
    """A client of the `daemon` fixture: aiohttp, then curl."""
    async with connect(request.param, daemon.socket) as c:
        yield c


NAME, INTERP, FLAGS = ("entry", "name"), ("entry", "interpreter"), ("entry", "flags")
MAGIC, MASK, EXT = ("entry", "magic"), ("entry", "mask"), ("entry", "extension")
CONTROL = "must not contain control characters"
HEX = "must be hex digits, two per byte"


def ext_entry(extension: str) -> dict[str, Any]:
    return entry(type="extension", magic=None, extension=extension)


INJECTIONS = [
    # the rule's delimiter: a field that ends early and one that starts a new field
    Bad("name-delimiter", entry(name="qemu:E::x::/tmp/evil:"), loc=NAME,
        msg="must not contain ':', the rule's delimiter"),
    Bad("interpreter-delimiter", entry(interpreter="/bin/true:OCF"), loc=INTERP,
        msg="must not contain ':'"),
    Bad("extension-delimiter", ext_entry("qsh:"), loc=EXT, msg="must not contain ':'"),
    Bad("entry-flags-delimiter", entry(flags="F:"), loc=FLAGS, msg="unknown flag(s) ':'"),
    Bad("flags-delimiter", {"targets": ["arm64"], "flags": "F:X"}, loc=("flags",),
        msg="unknown flag(s) ':X'; use any of P, O, C, F"),
    Bad("target-delimiter", {"targets": ["arm64:x"]}, loc=("targets",),
        msg="unknown target 'arm64:x'"),
    # a newline ends the write: the kernel would parse a second rule
    Bad("name-newline", entry(name="x\n:evil"), loc=NAME, msg="must not contain"),
    Bad("name-only-newline", entry(name="\n"), loc=NAME, msg=CONTROL),
    Bad("interpreter-newline", entry(interpreter="/bin/true\n"), loc=INTERP, msg=CONTROL),
    Bad("interpreter-carriage-return", entry(interpreter="/bin/true\r"), loc=INTERP, msg=CONTROL),
    Bad("extension-newline", ext_entry("q\nsh"), loc=EXT, msg=CONTROL),
    Bad("entry-flags-newline", entry(flags="F\n"), loc=FLAGS, msg="unknown flag(s) '\\n'"),
    Bad("flags-newline", {"targets": ["arm64"], "flags": "\nF"}, loc=("flags",),
        msg="unknown flag(s) '\\n'"),
    Bad("target-newline-inside", {"targets": ["arm\n64"]}, loc=("targets",),
        msg="target 'arm\\n64' has spaces or control characters"),
    # NUL ends a C string: the kernel would see a shorter field than qusd checked
    Bad("name-nul", entry(name="qemu\0evil"), loc=NAME, msg=CONTROL),
    Bad("interpreter-nul", entry(interpreter="/bin/true\0/tmp/evil"), loc=INTERP, msg=CONTROL),
    Bad("extension-nul", ext_entry("qsh\0"), loc=EXT, msg=CONTROL),
    Bad("entry-flags-nul", entry(flags="F\0"), loc=FLAGS, msg="unknown flag(s) '\\x00'"),
    Bad("target-nul", {"targets": ["arm64\0"]}, loc=("targets",),
        msg="target 'arm64\\x00' has spaces or control characters"),
    # other control characters: escape sequences, DEL, tabs
    Bad("name-escape-sequence", entry(name="a\x1b[2Jb"), loc=NAME, msg=CONTROL),
    Bad("name-del", entry(name="a\x7fb"), loc=NAME, msg=CONTROL),
    Bad("interpreter-tab", entry(interpreter="/bin/\ttrue"), loc=INTERP, msg=CONTROL),
    Bad("name-lone-surrogate", entry(name="a\ud800"), loc=NAME, msg="valid string"),
    # paths: entries are files in binfmt_misc, next to register and status
    Bad("name-dotdot", entry(name=".."), loc=NAME, msg="'..' is reserved by binfmt_misc"),
    Bad("name-dot", entry(name="."), loc=NAME, msg="'.' is reserved"),
    Bad("name-slash", entry(name="/"), loc=NAME, msg="must not contain '/'"),
    Bad("name-dotdot-status", entry(name="../status"), loc=NAME, msg="must not contain '/'"),
    Bad("name-deep", entry(name="../../../etc/passwd"), loc=NAME, msg="must not contain '/'"),
    Bad("name-register", entry(name="register"), loc=NAME, msg="'register' is reserved"),
    Bad("name-status", entry(name="status"), loc=NAME, msg="'status' is reserved"),
    Bad("extension-slash", ext_entry("a/b"), loc=EXT, msg="must not contain '/'"),
    Bad("extension-dotdot", ext_entry(".."), loc=EXT, msg="must not contain '.'"),
    Bad("interpreter-relative", entry(interpreter="bin/true"), loc=INTERP,
        msg="must be an absolute path"),
    Bad("interpreter-dotdot", entry(interpreter="../../bin/true"), loc=INTERP,
        msg="must be an absolute path"),
    Bad("target-dotdot", {"targets": ["../arm64"]}, loc=("targets",),
        msg="unknown target '../arm64'"),
    # over-long fields
    Bad("name-256", entry(name="n" * 256), loc=NAME, msg="at most 255 characters"),
    Bad("name-256-bytes", entry(name="é" * 128), loc=NAME, msg="is 256 bytes; at most 255"),
    Bad("interpreter-1025", entry(interpreter="/" + "i" * 1024), loc=INTERP,
        msg="at most 1024 characters"),
    Bad("magic-514", entry(magic="ff" * 257), loc=MAGIC, msg="at most 512"),
    Bad("mask-514", entry(mask="ff" * 257), loc=MASK, msg="at most 512"),
    Bad("magic-past-the-header", entry(magic="ff" * 256, offset=1), loc=MAGIC,
        msg="offset 1 + 256 bytes of magic exceed the 256 bytes the kernel reads"),
    Bad("flags-9", {"targets": ["arm64"], "flags": "F" * 9}, loc=("flags",),
        msg="at most 8 characters"),
    Bad("target-65", {"targets": ["a" * 65]}, loc=("targets", 0), msg="at most 64 characters"),
    Bad("targets-65", {"targets": ["arm64"] * 65}, loc=("targets",), msg="at most 64 items"),
    Bad("rule-over-1920", entry(name="n" * 255, interpreter="/" + "i" * 1023, magic="ff" * 256),
        loc=("entry",), msg="rule: is 2312 bytes; the kernel takes at most 1920"),
    Bad("extension-rule-over-1920", ext_entry("x" * 1900), loc=("entry",),
        msg="the kernel takes at most 1920"),
    # flags outside POCF
    Bad("flags-X", {"targets": ["arm64"], "flags": "X"}, loc=("flags",), msg="unknown flag(s) 'X'"),
    Bad("flags-lower", {"targets": ["arm64"], "flags": "pocf"}, loc=("flags",),
        msg="unknown flag(s) 'cfop'"),
    Bad("flags-space", {"targets": ["arm64"], "flags": "F "}, loc=("flags",),
        msg="unknown flag(s) ' '"),
    Bad("flags-fullwidth", {"targets": ["arm64"], "flags": "\uff26"}, loc=("flags",),
        msg="unknown flag(s) '\uff26'"),
    Bad("entry-flags-X", entry(flags="POCFX"), loc=FLAGS, msg="unknown flag(s) 'X'"),
    # hex: odd length, not hex, hex in disguise
    Bad("magic-odd", entry(magic="7f454c4"), loc=MAGIC, msg=HEX),
    Bad("magic-not-hex", entry(magic="7f45zz46"), loc=MAGIC, msg=HEX),
    Bad("magic-0x", entry(magic="0x7f45"), loc=MAGIC, msg=HEX),
    Bad("magic-space", entry(magic="7f 45"), loc=MAGIC, msg=HEX),
    Bad("magic-newline", entry(magic="7f45\n"), loc=MAGIC, msg=HEX),
    Bad("magic-escaped", entry(magic="\\x7f\\x45"), loc=MAGIC, msg=HEX),
    Bad("magic-arabic-digits", entry(magic="٧٤"), loc=MAGIC, msg=HEX),
    Bad("magic-fullwidth", entry(magic="\uff46\uff46"), loc=MAGIC, msg=HEX),
    Bad("magic-empty", entry(magic=""), loc=MAGIC, msg=HEX),
    Bad("mask-odd", entry(mask="fff"), loc=MASK, msg=HEX),
    Bad("mask-not-hex", entry(mask="ffffffgg"), loc=MASK, msg=HEX),
    Bad("mask-other-length", entry(mask="ffffff"), loc=MASK,
        msg="is 3 bytes, magic is 4: they must be equal"),
]  # fmt: skip


async def test_injections_through_the_api_are_refused_naming_the_field(
    client: Api, daemon: Daemon, subtests: pytest.Subtests
) -> None:
    ids = [c.id for c in INJECTIONS]
    assert len(set(ids)) == len(ids)
    await seed(client, daemon)
    for bad in INJECTIONS:
        with subtests.test(msg=bad.id):
            assert bad.loc is not None
            problem = await check(client, daemon, bad)
            # the field, dotted, leads the detail too
            assert problem["detail"].startswith(".".join(map(str, bad.loc)) + ": "), problem
    assert sorted(in_kernel(daemon)) == ["DOSWin", "qemu-aarch64"]
    assert all(e.enabled for e in daemon.table())
    # the same request with the bad field made good goes through
    done = await ok(client, "POST", "/v1/registrations", entry(), status=201)
    assert [r["name"] for r in done["registered"]] == ["mytool"]


async def test_untrusted_interpreters_are_refused_naming_the_culprit(
    client: Api, daemon: Daemon, tmp_path: Path
) -> None:
    if os.getuid() != 0:
        pytest.skip("chown to another uid needs root's identity-mapped sandbox")
    evil = user_writable_file(tmp_path)
    (tmp_path / "bin").mkdir()
    under_tmp = _exe(tmp_path / "bin" / "qemu-under-tmp")
    await seed(client, daemon)
    with trap_dir() as (where, mount):
        t = daemon.inside.func("tests.test_hardening:_lay_traps", where, mount, evil)
        culprits = {
            "group-writable": f"{t['group-writable']} is writable by group or others (mode 775)",
            "world-writable": f"{t['world-writable']} is writable by group or others (mode 777)",
            "owned-by-nobody": f"{t['owned-by-nobody']} is owned by uid {NOBODY}, not root",
            "world-writable-parent": f"{where}/public (for {t['world-writable-parent']}) is "
            "writable by group or others (mode 1777)",
            "symlink-to-user-writable": f"{evil} (for {t['symlink-to-user-writable']}) is "
            "writable by group or others (mode 777)",
        }
        paths = {name: t[name] for name in culprits}
        blamed = first_open_ancestor(under_tmp)
        if blamed is not None:  # tmp_path under /tmp (mode 1777), as usual
            paths["under-tmp_path"] = under_tmp
            culprits["under-tmp_path"] = f"{blamed} (for {under_tmp}) is writable by group"
        for flags in ("", "F"):
            for case, path in paths.items():
                spec = {"name": "trap", "magic": "cafebabe", "interpreter": path, "flags": flags}
                problem = await forbidden(client, daemon, {"entry": spec})
                assert problem["code"] == "untrusted-interpreter", (case, problem)
                assert culprits[case] in problem["detail"], (case, problem)
        # missing: it could be created later, by whoever may write there
        missing = {"name": "trap", "magic": "cafebabe", "interpreter": f"{where}/missing"}
        problem = await refused(
            client, daemon, "POST", "/v1/registrations", {"entry": missing},
            status=422, code="interpreter",
        )  # fmt: skip
        assert f"interpreter {where}/missing does not exist" in problem["detail"]
        # the same request with a trusted interpreter next to them goes through
        good = {"name": "trap", "magic": "cafebabe", "interpreter": t["trusted"], "flags": "F"}
        done = await ok(client, "POST", "/v1/registrations", {"entry": good}, status=201)
        assert done["registered"][0]["interpreter"] == t["trusted"]
        assert sorted(in_kernel(daemon)) == ["DOSWin", "qemu-aarch64", "trap"]


async def forbidden(client: Api, daemon: Daemon, body: Any) -> dict[str, Any]:
    """POST /v1/registrations refused with 403, changing nothing: test_api's
    refused() without its check that the status is documented (403 is not:
    see test_every_status_the_api_answers_is_documented)."""
    with unchanged(daemon):
        reply = await client.request("POST", "/v1/registrations", body)
    assert (reply.status, reply.content_type) == (403, PROBLEM_JSON), str(reply)
    problem: dict[str, Any] = reply.json()
    assert problem["status"] == 403 and problem["type"] == f"urn:qusd:problem:{problem['code']}"
    assert set(problem) == {"type", "title", "status", "detail", "code", "reason"}, problem
    return problem


# -- injection tries through qusctl ------------------------------------------------------

#: (arguments, exit status, the one line of the message); names cannot carry a
#: NUL: see test_injections_through_qusctl
QUSCTL_INJECTIONS = [
    (["register", "--flags", "F:X", "arm64"], 65,
     "qusctl: flags: unknown flag(s) ':X'; use any of P, O, C, F"),
    (["register", "--flags", "F\nX", "arm64"], 65,
     "qusctl: flags: unknown flag(s) '\\nX'; use any of P, O, C, F"),
    (["register", "--flags", "PPPPPPPPP", "arm64"], 65,
     "qusctl: flags: String should have at most 8 characters"),
    (["register", "arm64:x"], 65, "qusctl: targets: unknown target 'arm64:x'; known targets: "),
    (["register", "arm\n64"], 65, "qusctl: targets: target 'arm"),
    (["register", "../arm64"], 65, "qusctl: targets: unknown target '../arm64'; known targets: "),
    (["register", "arm64\x1b[2J"], 65,
     "qusctl: targets: target 'arm64\\x1b[2J' has spaces or control"),
    (["register", "a" * 65], 65, "qusctl: targets.0: String should have at most 64 characters"),
    (["unregister", "../status"], 66, "qusctl: no binfmt_misc entry named '../status'"),
    (["unregister", "../../../../proc/sys/fs/binfmt_misc/status"], 66,
     "qusctl: no binfmt_misc entry named '../../../../proc/sys/fs/binfmt_misc/status'"),
    (["unregister", "register"], 66, "qusctl: no binfmt_misc entry named 'register'"),
    (["unregister", "status"], 66, "qusctl: no binfmt_misc entry named 'status'"),
    (["unregister", ".."], 66, "qusctl: no binfmt_misc entry named '..'"),
    (["unregister", "qemu-aarch64:x"], 66, "qusctl: no binfmt_misc entry named 'qemu-aarch64:x'"),
    (["unregister", "qemu-aarch64\n"], 66, "qusctl: no binfmt_misc entry named 'qemu-aarch64\\n'"),
    (["enable", "a/b"], 66, "qusctl: no binfmt_misc entry named 'a/b'"),
    (["enable", "/"], 66, "qusctl: no binfmt_misc entry named '/'"),
    (["disable", "../register"], 66, "qusctl: no binfmt_misc entry named '../register'"),
    (["disable", "qemu-aarch64/"], 66, "qusctl: no binfmt_misc entry named 'qemu-aarch64/'"),
]  # fmt: skip


def test_injections_through_qusctl(daemon: Daemon, subtests: pytest.Subtests) -> None:
    seed_sync(daemon)
    with unchanged(daemon):
        for args, status, message in QUSCTL_INJECTIONS:
            with subtests.test(msg=repr(args)[:80]):
                res = qusctl(daemon.socket, *args)
                assert res.stdout == ""
                assert one_line_error(res, status).startswith(message), res.stderr
        # A name with a NUL cannot even be passed: execve() takes C strings, so
        # argv ends at the first NUL and Python refuses to build such a command
        # line. The API cases above send NUL in every field instead.
        with pytest.raises(ValueError, match="embedded null byte"):
            qusctl(daemon.socket, "unregister", "qemu-aarch64\0")
    assert all(e.enabled for e in daemon.table())


def test_qusctl_refuses_untrusted_interpreters_with_77(tmp_path: Path) -> None:
    """The daemon finds arm64's interpreter as a symlink to a file anyone may
    rewrite, s390x's in a directory under /tmp: both refused (77), naming the
    culprit; mips64el's, next to the symlink, is fine."""
    if os.getuid() != 0:
        pytest.skip("needs root's identity-mapped sandbox")
    evil = user_writable_file(tmp_path)
    public = tmp_path / "bin"
    public.mkdir()
    s390x = _exe(public / "qemu-s390x-static")
    with trap_dir() as (where, mount):
        d = Daemon(tmp_path, "--interpreter-dir", where, "--interpreter-dir", str(public))
        try:
            t = d.inside.func("tests.test_hardening:_lay_traps", where, mount, evil)
            d.inside.kernel.register(WINE)  # no seed_sync: its arm64 is the trap here
            with unchanged(d):
                msg = one_line_error(qusctl(d.socket, "register", "arm64"), 77)
                assert msg == (
                    f"qusctl: {evil} (for {where}/qemu-aarch64-static) is writable by group "
                    "or others (mode 777): they could replace the interpreter"
                )
                blamed = first_open_ancestor(s390x)
                if blamed is not None:
                    msg = one_line_error(qusctl(d.socket, "register", "s390x"), 77)
                    assert msg.startswith(f"qusctl: {blamed} (for {s390x}) is writable by group")
            out = qusctl(d.socket, "register", "mips64el")
            assert out.returncode == 0, out.stderr
            registered = {e.name: e for e in d.table()}
            assert registered["qemu-mips64el"].interpreter == t["mips64el"]
        finally:
            d.stop()


# -- bugs the injection tries found ------------------------------------------------------

BY_NAME = ("GET", "PATCH", "DELETE")


def by_name_replies(d: Daemon, name_in_path: str) -> dict[str, Reply]:
    """GET, PATCH and DELETE of /v1/registrations/<name_in_path>, changing nothing."""
    replies = {}
    with unchanged(d):
        for method in BY_NAME:
            body = b'{"enabled": false}' if method == "PATCH" else None
            ctype = "application/json" if body is not None else None
            path = f"/v1/registrations/{name_in_path}"
            replies[method] = http(d.socket, method, path, body, ctype)
    return replies


def assert_not_found(replies: Mapping[str, Reply]) -> None:
    got = {m: (r.status, r.json().get("code")) for m, r in replies.items()}
    assert got == {m: (404, "not-found") for m in replies}, {m: str(r) for m, r in replies.items()}


def test_nul_in_a_name_in_the_path_is_a_404(daemon: Daemon) -> None:
    seed_sync(daemon)
    assert_not_found(by_name_replies(daemon, "qemu-aarch64%00"))


def test_overlong_name_in_the_path_is_a_404(daemon: Daemon) -> None:
    seed_sync(daemon)
    assert_not_found(by_name_replies(daemon, "a" * 256))
    with unchanged(daemon):
        msg = one_line_error(qusctl(daemon.socket, "enable", "a" * 256), 66)
    assert msg == f"qusctl: no binfmt_misc entry named '{'a' * 256}'"


FORGED = (
    "qusd: INFO: audit: uid=0 pid=1 exe=/usr/sbin/init action=DELETE "
    "/v1/registrations/qemu-aarch64 names=qemu-aarch64 result=204"
)


def test_audit_records_cannot_be_forged_with_a_newline(daemon: Daemon) -> None:
    seed_sync(daemon)
    with unchanged(daemon):
        forging = "/v1/registrations/x" + quote("\n" + FORGED + "\n", safe="")
        reply = http(daemon.socket, "DELETE", forging)
    assert reply.status == 404, str(reply)
    lines = daemon.log.read_text(errors="replace").splitlines()
    assert any("audit:" in line and 'action="DELETE /v1/registrations/x' in line for line in lines)
    forged = [line for line in lines if line.startswith("qusd: INFO: audit: uid=0 pid=1 ")]
    assert forged == [], forged


def test_target_names_with_control_characters_are_refused(daemon: Daemon) -> None:
    interpreter("aarch64")
    with unchanged(daemon):
        res = qusctl(daemon.socket, "register", "arm64\n")
        statuses = [
            http_json(daemon.socket, "POST", "/v1/registrations", {"targets": [name]}).status
            for name in ("arm64\n", "\tarm64", "arm64\r\n")
        ]
    assert statuses == [422, 422, 422]
    assert one_line_error(res, 65).startswith("qusctl: targets: target 'arm64\\n' has spaces")


# -- property-based fuzzing of the whole API ---------------------------------------------

#: strings worth trying in any string field: catalog names, real paths, flags,
#: hex, and every injection above
WORDS = [
    "arm64", "aarch64", "s390x", "linux/arm/v7", "ppc64le", "riscv64", "x86_64", "i386",
    "qemu-aarch64", "DOSWin", "mytool", "managed", "qemu", "all",
    "", "F", "P", "OC", "POCF", "X", "f", "F:X", "FF",
    "7f454c46", "cafebabe", "ffffffff", "00", "abc", "zz", "0x7f",
    "/bin/true", "/bin/sh", "/usr/bin/qemu-aarch64-static", "/nonexistent/qemu", "/tmp/x",
    "relative/qemu", "exe", "qsh", "tar.gz",
    ":", "\n", "\0", "..", ".", "/", "register", "status", "a:b", "x\n", "a/b", "../status",
    "\ud800", "\udcff", "\x1b[2J", "\x7f", "é" * 128, "a" * 256, "/" + "i" * 1023,
]  # fmt: skip

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.sampled_from(WORDS)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


def from_schema(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid for a JSON schema: the part of JSON Schema pydantic writes
    for qusd's models; anything else fails, so a new construct is noticed."""
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[1]], defs)
    if "anyOf" in schema and "properties" not in schema:  # beside properties: a constraint
        return st.one_of([from_schema(s, defs) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        low = schema.get("minimum", schema.get("exclusiveMinimum", -(2**70) - 1) + 1)
        high = schema.get("maximum", schema.get("exclusiveMaximum", 2**70 + 1) - 1)
        return st.integers(low, high)
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False)
    if kind == "string":
        low, high = schema.get("minLength", 0), schema.get("maxLength", 2000)
        fitting = [w for w in WORDS if low <= len(w) <= high]
        text = st.text(min_size=low, max_size=min(high, 80))
        return st.sampled_from(fitting) | text if fitting else text
    if kind == "array":
        items = from_schema(schema["items"], defs) if "items" in schema else json_values
        high = min(schema.get("maxItems", 6), 6)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=high)
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        assert schema.get("additionalProperties") is False, schema
        return st.fixed_dictionaries(
            {k: from_schema(v, defs) for k, v in props.items() if k in required},
            optional={k: from_schema(v, defs) for k, v in props.items() if k not in required},
        )
    raise AssertionError(f"a schema construct the fuzzer does not know: {schema}")


@st.composite
def near_valid(draw: st.DrawFn, valid: st.SearchStrategy[Any]) -> Any:
    """A valid body with one field, at the top or in the entry, made hostile."""
    doc = draw(valid)
    if not isinstance(doc, dict):
        return doc
    where = doc["entry"] if isinstance(doc.get("entry"), dict) and draw(st.booleans()) else doc
    key = draw(st.sampled_from([*sorted(where), "no-such-field"]))
    where[key] = draw(json_values)
    return doc


#: JSON texts json.dumps never writes: huge numbers, NaN, duplicate keys, BOMs,
#: UTF-16, escaped surrogates and NULs, deep nesting, and malformed ones
RAW_JSON = [
    b'{"entry": {"name": "x", "magic": "7f", "interpreter": "/bin/true", "offset": 1'
    + b"0" * 5000
    + b"}}",
    b'{"targets": ["arm64"], "persistent": NaN}',
    b'{"enabled": Infinity}',
    b'{"scope": "all", "scope": "managed"}',
    b'{"enabled": true,}',
    b'{"enabled": true} // comment',
    b"\xef\xbb\xbf" + b'{"scope": "all"}',
    '{"scope": "all"}'.encode("utf-16"),
    b'{"entry": {"name": "a\\ud800", "magic": "7f", "interpreter": "/bin/true"}}',
    b'{"targets": ["arm64\\u0000"]}',
    b"[" * 60_000,
    b'{"a":' * 5000 + b"1" + b"}" * 5000,
    b"1e999999",
    b"-0",
    b'"\\udcff"',
]

CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json",
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "",
        None,
    ]
)


@st.composite
def bodies(
    draw: st.DrawFn, schema: st.SearchStrategy[Any] | None
) -> tuple[bytes | None, str | None]:
    """(raw body or None, content type)."""
    docs = [json_values]
    if schema is not None:
        docs += [schema, schema, near_valid(schema)]
    kind = draw(st.sampled_from(["none", "json", "json", "json", "bytes", "raw", "too-large"]))
    if kind == "none":
        return None, draw(st.none() | CONTENT_TYPES)
    if kind == "bytes":
        return draw(st.binary(max_size=3000)), draw(CONTENT_TYPES)
    if kind == "raw":
        return draw(st.sampled_from(RAW_JSON)), "application/json"
    if kind == "too-large":
        return b'{"targets": ["' + b"a" * MAX_BODY + b'"]}', "application/json"
    doc = draw(st.one_of(docs))
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    ctype = "application/json" if draw(st.booleans()) else draw(CONTENT_TYPES)
    return text.encode("utf-8", "surrogatepass"), ctype


def quote_all(name: str | bytes) -> str:
    """Every byte of name %-escaped; lone surrogates as the bytes they stand for."""
    raw = name.encode("utf-8", "surrogatepass") if isinstance(name, str) else name
    return quote(raw, safe="")


#: what fills {name}: entries that exist, binfmt_misc's own files, arbitrary
#: text and bytes (URL-quoted), and unquoted slashes, dots and stray %
path_names = st.one_of(
    st.sampled_from(["qemu-aarch64", "DOSWin", "register", "status", ".", "..", "qemu-none"]).map(
        quote_all
    ),
    st.sampled_from(WORDS).map(quote_all),
    st.text().map(quote_all),
    st.binary().map(quote_all),
    st.text(st.sampled_from("a./:%\n\0 é"), max_size=12).map(lambda s: quote(s, safe="/%")),
)


@dataclass(frozen=True)
class Req:
    method: str
    path: str
    body: bytes | None
    content_type: str | None

    def __str__(self) -> str:
        return f"{self.method} {self.path[:300]} [{self.content_type}] {(self.body or b'')[:300]!r}"


Operation = tuple[str, str, st.SearchStrategy[Any] | None]


def operations(doc: Mapping[str, Any]) -> list[Operation]:
    """Every operation of the OpenAPI document, with a strategy for its body."""
    defs = doc["components"]["schemas"]
    ops = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            schema = from_schema(body["schema"], defs) if body else None
            ops.append((method.upper(), path, schema))
    return ops


@st.composite
def requests(draw: st.DrawFn, ops: list[Operation]) -> Req:
    method, template, schema = draw(st.sampled_from(ops))
    path = template.replace("{name}", draw(path_names))
    body, ctype = draw(bodies(schema))
    return Req(method, path, body, ctype)


READS = (
    "/v1/health",
    "/v1/status",
    "/v1/targets",
    "/v1/registrations",
    "/v1/interpreters",
    "/openapi.json",
    "/metrics",
)
#: the operation groups fuzzed one test each, and their number of examples
GROUPS: dict[str, tuple[set[tuple[str, str]], int]] = {
    "register": ({("POST", "/v1/registrations")}, 250),
    "by-name": (
        {(m, "/v1/registrations/{name}") for m in ("GET", "PATCH", "DELETE")},
        250,
    ),
    "reset": ({("POST", "/v1/reset")}, 200),
    "import": ({("POST", "/v1/import")}, 150),
    "read": ({("GET", p) for p in READS} | {("POST", "/v1/reconcile")}, 120),
    "verify": ({("POST", "/v1/verify")}, 60),
    # with no interpreter_store every valid install is refused (403) before
    # any download: installing (60 MB) is tested in test_provision.py
    "interpreters": ({("POST", "/v1/interpreters")}, 60),
}
#: answers that never end, left to tests/test_events.py
STREAMS = {("GET", "/v1/events")}
#: settings of a group's daemon
GROUP_SETTINGS = {"interpreters": '[qusd]\ninterpreter_store = ""\n'}
#: a request of a group that must go through, tried besides the random ones:
#: a valid body of that group is too rare for random generation to find
KNOWN_GOOD = {
    "import": Req(
        "POST", "/v1/import",
        json.dumps({"entries": [{"name": "qusdt-fuzz", "magic": "5155534400",
                                 "interpreter": "/usr/bin/qemu-aarch64-static"}]}).encode(),
        "application/json",
    ),
}  # fmt: skip


@pytest.mark.parametrize("group", list(GROUPS))
def test_fuzz_every_operation_from_the_openapi_document(group: str, tmp_path: Path) -> None:
    wanted, examples = GROUPS[group]
    if group in GROUP_SETTINGS:
        (tmp_path / "qusd.toml").write_text(GROUP_SETTINGS[group])
    d = Daemon(tmp_path)
    try:
        doc = http(d.socket, "GET", "/openapi.json").json()
        ops = operations(doc)
        every = {(m, p) for m, p, _ in ops}
        groups = set().union(*(g for g, _ in GROUPS.values()))
        assert every == groups | STREAMS, "an operation is in no group"
        ops = [op for op in ops if (op[0], op[1]) in wanted]
        assert {(m, p) for m, p, _ in ops} == wanted
        seed_sync(d)
        baseline = d.table()
        seen: Counter[int] = Counter()

        @settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(requests(ops))
        def fuzz(req: Req) -> None:
            if d.table() != baseline:  # a change went through (or failed midway): reseed
                reset = http_json(d.socket, "POST", "/v1/reset", {"scope": "all"})
                assert reset.status == 200, str(reset)
                seed_sync(d)
            before = snapshot(d)
            reply = http(d.socket, req.method, req.path, req.body, req.content_type)
            after = snapshot(d)
            seen[reply.status] += 1
            assert reply.status < 500, f"{req}\n-> {reply}"
            if reply.status >= 400:
                assert reply.content_type == PROBLEM_JSON, f"{req}\n-> {reply}"
                problem = reply.json()
                assert problem["status"] == reply.status and problem["code"], problem
            if reply.status >= 400 or req.method == "GET":
                assert after == before, f"{req}\n-> {reply}\nchanged the table or the state"

        if group in KNOWN_GOOD:
            fuzz = example(KNOWN_GOOD[group])(fuzz)
        fuzz()
        # the bodies reached the handlers: answers of both kinds came back
        assert any(s < 300 for s in seen) or group in GROUP_SETTINGS, seen
        if group != "read":  # reads take no body and no name: nothing to refuse
            assert any(400 <= s < 500 for s in seen), seen
        health = http(d.socket, "GET", "/v1/health")
        assert (health.status, health.json()) == (200, {"status": "ok"})
        assert d.proc.poll() is None
    finally:
        d.stop()


# -- slow clients and connection floods -------------------------------------------------


@contextlib.contextmanager
def guarded_daemon(tmp_path: Path, **more: float | bool) -> Iterator[Daemon]:
    """A daemon with short timeouts and few connections, from its config file."""
    values = {
        "header_timeout": HEADER_TIMEOUT,
        "body_timeout": BODY_TIMEOUT,
        "max_connections": MAX_CONNECTIONS,
        **more,
    }
    (tmp_path / "qusd.toml").write_text(
        "[qusd]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
    )
    d = Daemon(tmp_path)
    try:
        yield d
    finally:
        d.stop()


@contextlib.contextmanager
def sockets() -> Iterator[list[socket.socket]]:
    """A list of client sockets, every one closed at the end."""
    socks: list[socket.socket] = []
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


def dial(path: str, socks: list[socket.socket], n: int, pause: float = 0.0) -> None:
    """Open n more connections (non-blocking), retrying while the backlog is full."""
    deadline = time.monotonic() + 15
    while n > 0:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:  # the listen backlog is full: the daemon is behind
            s.close()
            assert time.monotonic() < deadline, f"could not connect {n} more in 15 s"
            time.sleep(0.002)
            continue
        socks.append(s)
        n -= 1
        if pause:
            time.sleep(pause)


def closed_by_server(s: socket.socket) -> bool:
    """Whether the daemon closed s (EOF or reset); reads what it sent, never blocks."""
    while True:
        readable, _, _ = select.select([s], [], [], 0)
        if not readable:
            return False
        try:
            if not s.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except BlockingIOError:
            return False


def try_health(path: str, timeout: float = 2.0) -> float | None:
    """Seconds GET /v1/health took, or None when the daemon did not answer 200."""
    start = time.monotonic()
    try:
        reply = http(path, "GET", "/v1/health", timeout=timeout)
    except (OSError, AssertionError):
        return None
    return time.monotonic() - start if reply.status == 200 else None


def wait_for(predicate: Callable[[], bool], timeout: float) -> float:
    """Seconds until predicate held; fails after timeout."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"not within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - start


def vm_rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_slowloris_clients_are_cut_at_the_header_timeout(tmp_path: Path) -> None:
    """20 clients send a request line or headers one byte at a time: each is
    disconnected at header_timeout, while health checks are answered at once."""
    heads = [
        b"GET /v1/" + b"a" * 400,  # a request line that never ends
        b"GET /v1/health HTTP/1.1\r\nHost: qusd\r\nX-Slow: " + b"a" * 400,  # nor the headers
    ]
    with guarded_daemon(tmp_path) as d, sockets() as socks:
        dial(d.socket, socks, 20)
        start = time.monotonic()
        cut: dict[int, float] = {}
        latencies: list[float | None] = []
        sent = 0
        while len(cut) < len(socks) and time.monotonic() - start < HEADER_TIMEOUT + MARGIN + 2:
            for i, s in enumerate(socks):
                if i in cut:
                    continue
                try:
                    if closed_by_server(s):
                        raise ConnectionResetError
                    s.send(heads[i % 2][sent : sent + 1])
                except (ConnectionResetError, BrokenPipeError):
                    cut[i] = time.monotonic() - start
            sent += 1
            if time.monotonic() - start < HEADER_TIMEOUT * 0.8:
                latencies.append(try_health(d.socket))
            time.sleep(0.05)
        assert sorted(cut) == list(range(20)), f"still open: {set(range(20)) - set(cut)}"
        assert max(cut.values()) <= HEADER_TIMEOUT + MARGIN, cut
        assert min(cut.values()) >= HEADER_TIMEOUT * 0.5, cut  # served, then cut
        assert 0 < sent < len(heads[0])  # never a whole head
        assert latencies and all(t is not None and t < 0.5 for t in latencies), latencies
        assert try_health(d.socket) is not None


def complete_answer(data: bytes) -> bool:
    """Whether data holds a whole response: its head and Content-Length bytes of body."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def slow_body(
    d: Daemon,
    socks: list[socket.socket],
    path: bytes,
    start_of_body: bytes,
    *,
    trickle: bool = False,
    method: bytes = b"POST",
) -> tuple[float, bytes, bool]:
    """A request whose body (Content-Length 100) stops after start_of_body, or
    then trickles a byte every 0.1 s: (seconds until the daemon answered or
    closed, the answer, whether it closed)."""
    dial(d.socket, socks, 1)
    s = socks[-1]
    s.setblocking(True)
    s.sendall(
        method + b" " + path + b" HTTP/1.1\r\nHost: qusd\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n" + start_of_body
    )
    s.setblocking(False)
    start = time.monotonic()
    answer, closed = b"", False
    while not closed and not complete_answer(answer):
        assert time.monotonic() - start < BODY_TIMEOUT + MARGIN + 2, "no answer, not closed"
        readable, _, _ = select.select([s], [], [], 0.1)
        if readable:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                chunk = b""
            closed = not chunk
            answer += chunk
        elif trickle:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.send(b" ")
    return time.monotonic() - start, answer, closed


def test_slow_bodies_get_408_at_the_body_timeout(tmp_path: Path) -> None:
    """A body that stops, or trickles, past body_timeout: 408 (or the
    connection closed), and the request it carried did nothing."""
    with guarded_daemon(tmp_path) as d:
        seed_sync(d)
        for path, start_of_body, trickle in [
            (b"/v1/registrations", b'{"targets": ["s390x"]', False),
            (b"/v1/reset", b'{"scope": "all"', True),
        ]:
            with unchanged(d), sockets() as socks:
                elapsed, answer, _ = slow_body(d, socks, path, start_of_body, trickle=trickle)
                assert BODY_TIMEOUT * 0.5 <= elapsed <= BODY_TIMEOUT + MARGIN, (path, elapsed)
                if answer:  # else the daemon just closed the connection
                    reply = parse_http(answer)
                    assert reply.status == 408 and reply.content_type == PROBLEM_JSON, str(reply)
                    assert reply.json()["code"] == "timeout", str(reply)
                    assert f"within {BODY_TIMEOUT:g} s" in reply.json()["detail"]
        assert try_health(d.socket) is not None


def test_the_connection_closes_with_the_408(tmp_path: Path) -> None:
    with guarded_daemon(tmp_path) as d, sockets() as socks:
        _, answer, _ = slow_body(d, socks, b"/v1/reset", b'{"scope": "all"')
        assert parse_http(answer).status == 408
        wait_for(lambda: closed_by_server(socks[-1]), MARGIN)


def test_a_flood_at_capacity_is_refused_at_once(tmp_path: Path) -> None:
    """With max_connections idle clients open, 268 more are closed at once;
    the idle ones go at header_timeout, then health answers again."""
    with guarded_daemon(tmp_path) as d, sockets() as socks:
        time.sleep(0.1)  # the readiness probe's connection is gone
        fds = open_fds(d.pid)
        start = time.monotonic()
        dial(d.socket, socks, MAX_CONNECTIONS, pause=0.01)  # one at a time
        # every one accepted and counted before the flood (see the batch test below)
        wait_for(lambda: open_fds(d.pid) >= fds + MAX_CONNECTIONS - 1, 1.0)
        time.sleep(0.05)
        dial(d.socket, socks, 300 - MAX_CONNECTIONS)
        time.sleep(0.3)
        assert time.monotonic() - start < HEADER_TIMEOUT * 0.9, "too slow to judge"
        open_ = [i for i, s in enumerate(socks) if not closed_by_server(s)]
        assert open_ == list(range(MAX_CONNECTIONS)), open_
        waited = wait_for(lambda: all(closed_by_server(s) for s in socks), HEADER_TIMEOUT + MARGIN)
        assert time.monotonic() - start <= HEADER_TIMEOUT + MARGIN + 0.5, waited
        assert try_health(d.socket) is not None


def test_a_flood_from_idle_keeps_at_most_max_connections(tmp_path: Path) -> None:
    with guarded_daemon(tmp_path) as d, sockets() as socks:
        os.kill(d.pid, signal.SIGSTOP)  # busy: the connections wait in the backlog
        try:
            dial(d.socket, socks, 100)
        finally:
            os.kill(d.pid, signal.SIGCONT)
        dial(d.socket, socks, 200)
        time.sleep(0.3)
        still_open = sum(not closed_by_server(s) for s in socks)
        assert still_open <= MAX_CONNECTIONS, f"{still_open} open, max_connections is 32"


def test_repeated_floods_leave_memory_and_descriptors_bounded(tmp_path: Path) -> None:
    """5 floods of 300 idle connections: every one is dropped by header_timeout,
    health answers then, and the daemon's memory and open files stay bounded."""
    with guarded_daemon(tmp_path) as d:
        assert try_health(d.socket) is not None
        rss, fds = vm_rss(d.pid), open_fds(d.pid)
        for _ in range(5):
            with sockets() as socks:
                start = time.monotonic()
                dial(d.socket, socks, 300)
                wait_for(lambda: all(closed_by_server(s) for s in socks), HEADER_TIMEOUT + MARGIN)
                wait_for(lambda: try_health(d.socket) is not None, 1.0)
                assert time.monotonic() - start <= HEADER_TIMEOUT + MARGIN + 1.0
            wait_for(lambda: open_fds(d.pid) <= fds + 2, 2.0)
        grown = vm_rss(d.pid) - rss
        assert grown < 20 * 2**20, f"VmRSS grew by {grown / 2**20:.1f} MiB"


def test_dropping_idle_connections_logs_no_traceback(tmp_path: Path) -> None:
    with guarded_daemon(tmp_path) as d, sockets() as socks:
        dial(d.socket, socks, 3)
        wait_for(lambda: all(closed_by_server(s) for s in socks), HEADER_TIMEOUT + MARGIN)
        assert try_health(d.socket) is not None
        log = d.log.read_text(errors="replace")
    assert "Traceback" not in log and "Exception in callback" not in log, log[-2000:]


def test_a_slow_second_request_is_cut_like_an_idle_connection(tmp_path: Path) -> None:
    """After a first request, a keep-alive connection may idle for
    keepalive_timeout; a slow second head gets no longer than that."""
    with guarded_daemon(tmp_path, keepalive_timeout=HEADER_TIMEOUT) as d, sockets() as socks:
        dial(d.socket, socks, 1)
        (s,) = socks
        s.setblocking(True)
        s.settimeout(5)
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: qusd\r\n\r\n")
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first
        s.setblocking(False)
        head = b"GET /v1/health HTTP/1.1\r\nHost: qusd\r\nX-Slow: " + b"a" * 400
        start, sent, gone = time.monotonic(), 0, False
        while not gone and time.monotonic() - start < HEADER_TIMEOUT + MARGIN:
            try:
                gone = closed_by_server(s)
                if not gone:
                    s.send(head[sent : sent + 1])
                    sent += 1
            except (ConnectionResetError, BrokenPipeError):
                gone = True
            time.sleep(0.05)
        assert gone, f"still open after {time.monotonic() - start:.1f} s"


def test_every_status_the_api_answers_is_documented(tmp_path: Path) -> None:
    evil = user_writable_file(tmp_path)
    limits = {"rate_limit_admins": True, "rate_burst": 4, "rate_limit": 0.01}
    with guarded_daemon(tmp_path, **limits) as d, sockets() as socks:
        doc = http(d.socket, "GET", "/openapi.json").json()
        answered: list[tuple[str, str, int, str]] = []

        def record(method: str, path: str, reply: Reply) -> None:
            answered.append((method, path, reply.status, reply.json()["code"]))

        untrusted = {"name": "trap", "magic": "cafebabe", "interpreter": evil}
        host_elf = {"name": "elf", "magic": "7f454c46", "interpreter": "/bin/true"}
        for spec in (untrusted, host_elf):
            reply = http_json(d.socket, "POST", "/v1/registrations", {"entry": spec})
            record("post", "/v1/registrations", reply)
        _, answer, _ = slow_body(d, socks, b"/v1/reset", b'{"scope"')
        record("post", "/v1/reset", parse_http(answer))
        _, answer, _ = slow_body(d, socks, b"/v1/registrations/x", b'{"enabled"', method=b"PATCH")
        record("patch", "/v1/registrations/{name}", parse_http(answer))
        reply = http_json(d.socket, "POST", "/v1/reset", {"scope": "managed"})
        record("post", "/v1/reset", reply)
        assert [(s, c) for _, _, s, c in answered] == [
            (403, "untrusted-interpreter"),
            (403, "host-type"),
            (408, "timeout"),
            (408, "timeout"),
            (429, "rate-limited"),
        ]
        undocumented = [
            (m, p, s) for m, p, s, _ in answered if str(s) not in doc["paths"][p][m]["responses"]
        ]
        assert undocumented == []
