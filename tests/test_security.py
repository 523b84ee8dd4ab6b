"""Attacks on the daemon, each reproduced on the real kernel, and the
ownership of entries they led to.

A local attack on `qusd --sandbox` by real users in the qusd and qusd-admin
groups (issue 10) found what these tests replay: a user's replace taking a
name from root, one user holding every connection or slowing everyone's
reads, 500s and text/plain answers with tracebacks in the log, the
trusted-interpreter check bypassed with `..` and, in rootless mode, with
another user's files, a non-UTF-8 entry taking the API down, `qusctl run`
into a user's namespace, forged audit fields, a state directory trusted
blindly. Each test fails on the code before its fix.

Ownership: every record says which uid registered it through qusd. An
admin's entry is qusd's to keep (put back when another tool changes it,
unless drift = "report"); a user's defers to whatever an admin or the
distribution puts there. Users touch only their own entries.

Accounts and daemons come from tests.test_roles (real users by setpriv, a
daemon per test with the test groups); flooding clients are tests/flood.py,
run as those users.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from qusd import catalog, errors
from qusd.binfmt import Rule
from qusd.events import MESSAGE_IDS
from qusd.state import FILENAME, JOURNAL
from tests import test_roles
from tests.conftest import (
    ROOT,
    Daemon,
    Sandbox,
    Shared,
    busybox_path,
    interpreter,
    needs_sandbox,
    open_dir,
    python_for,
    wait_for,
    write_settings,
)
from tests.test_api import NO_BODY, PROBLEM_JSON, PYC, WINE, Reply, in_kernel, parse_http, unchanged
from tests.test_daemon import EnteredDaemon, s390x_record, write_state
from tests.test_hardening import http, http_json, vm_rss
from tests.test_roles import (
    CURL,
    NOGROUP,
    ROLE_SETTINGS,
    RUN,
    Account,
    Accounts,
    entry_body,
    ok,
    recorded,
    refused,
    request,
    running,
)

pytestmark = needs_sandbox

#: test_roles' fixture: this run's accounts
accounts = test_roles.accounts

REG = "/v1/registrations"
BUILTIN = catalog.builtin()
AARCH64 = BUILTIN.get("aarch64")
#: a reconcile every 0.2 s: repairs are seen within a second
FAST: dict[str, object] = {"reconcile_interval": 0.2}
FLOOD = (Path(__file__).parent / "flood.py").read_text()


def debian_rule(target: str) -> Rule:
    """The target as Debian's binfmt.d file defines it (what systemd-binfmt
    writes): another interpreter, flags POF. No F: it need not exist."""
    t = BUILTIN.get(target)
    return replace(t.rule(f"/usr/libexec/qemu-binfmt/{t.cpu}-binfmt-P"), flags="POF")


def flush_and_register(rules: Sequence[Rule]) -> None:
    """Runs inside a sandbox: what systemd-binfmt does, flush the whole
    table and register its rules."""
    from qusd.binfmt import BinfmtMisc  # noqa: PLC0415

    kernel = BinfmtMisc()
    kernel.remove_all()
    for rule in rules:
        kernel.register(rule)


def listing(d: Daemon) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in ok(d, None, "GET", REG)}


def warnings_of(d: Daemon) -> list[dict[str, str]]:
    return list(ok(d, None, "GET", "/v1/status")["warnings"])


@contextlib.contextmanager
def closed_dir(prefix: str) -> Iterator[Path]:
    """A fresh root-owned 0755 directory under /opt (every directory above it
    root's and closed to others, as a trusted interpreter's must be)."""
    with open_dir(f"{prefix}-{RUN}-", "/opt") as path:
        yield path


def run_flood(who: Account, *args: object) -> subprocess.Popen[str]:
    """tests/flood.py as who, in the background; .communicate() for its JSON."""
    argv = [python_for(who.uid), "-c", FLOOD, *map(str, args)]
    return subprocess.Popen(
        who.argv(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/"
    )


def flood_result(proc: subprocess.Popen[str], timeout: float = 120) -> Any:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out)


# -- ownership: who registered each entry ----------------------------------------------


def test_a_users_replace_gives_no_power_over_the_name(accounts: Accounts, workdir: Path) -> None:
    """A user may replace their own entry, but that makes it no more theirs
    to keep: when root writes its own qemu-aarch64, qusd leaves root's
    alone. A user may not replace an admin's or another user's entry."""
    user, user2, admin = accounts.user, accounts.user2, accounts.admin
    with running(workdir, **FAST) as d:
        ok(d, user, "POST", REG, {"targets": ["aarch64"]}, status=201)
        body = {"targets": ["aarch64"], "flags": "FP", "replace": True}
        ok(d, user, "POST", REG, body, status=201)  # their own entry: theirs to change
        assert in_kernel(d)["qemu-aarch64"].flags == "PF"
        roots = AARCH64.rule(interpreter("aarch64"), "POCF")
        d.inside.func("tests.test_daemon:swap_in", roots)  # root, straight to the kernel
        time.sleep(1.0)  # five reconcile rounds
        assert in_kernel(d)["qemu-aarch64"].rule() == roots.normalized(), "qusd fought root"
        wait_for(lambda: [w["code"] for w in warnings_of(d)] == ["conflict"],
                 "the conflict reported")  # fmt: skip
        assert listing(d)["qemu-aarch64"]["managed"] is False
        assert recorded(d)["qemu-aarch64"]["owner"] == user.uid  # kept, deferring

        ok(d, admin, "POST", REG, {"targets": ["s390x"]}, status=201)
        ok(d, user2, "POST", REG, {"targets": ["riscv64"]}, status=201)
        for name, target, owner in (("qemu-s390x", "s390x", admin), ("qemu-riscv64", "riscv64",
                                                                      user2)):  # fmt: skip
            refused(d, user, "POST", REG, {"targets": [target], "flags": "P", "replace": True},
                    says=[f"{name} was registered by uid {owner.uid}",
                          "users may replace only entries they registered"])  # fmt: skip
        ok(d, admin, "POST", REG, {"targets": ["riscv64"], "flags": "P", "replace": True},
           status=201)  # fmt: skip
        assert listing(d)["qemu-riscv64"]["owner"] == admin.uid


def test_entries_have_owners(accounts: Accounts, workdir: Path) -> None:
    """A user changes only the entries they registered; an admin any. The
    listing shows each entry's owner; a user's managed reset removes theirs."""
    user, user2, admin = accounts.user, accounts.user2, accounts.admin
    with running(workdir) as d:
        d.inside.kernel.register(WINE)
        ok(d, admin, "POST", REG, {"targets": ["s390x"]}, status=201)
        ok(d, user, "POST", REG, {"targets": ["aarch64"]}, status=201)
        ok(d, user2, "POST", REG, {"targets": ["riscv64"]}, status=201)
        ok(d, None, "POST", REG, {"targets": ["ppc64le"]}, status=201)
        for name, owner in (("qemu-s390x", admin.uid), ("qemu-riscv64", user2.uid),
                            ("qemu-ppc64le", 0)):  # fmt: skip
            for method, body, action in (("PATCH", {"enabled": False}, "disable"),
                                         ("DELETE", NO_BODY, "unregister")):  # fmt: skip
                refused(d, user, method, f"{REG}/{name}", body,
                        says=[f"{name} was registered by uid {owner}: users may {action} only "
                              "entries they registered"])  # fmt: skip
        for enabled in (False, True):  # their own
            assert ok(d, user, "PATCH", f"{REG}/qemu-aarch64", {"enabled": enabled})["enabled"] is (
                enabled
            )
        ok(d, admin, "PATCH", f"{REG}/qemu-riscv64", {"enabled": False})  # an admin: any
        assert in_kernel(d)["qemu-riscv64"].enabled is False
        ok(d, admin, "PATCH", f"{REG}/qemu-riscv64", {"enabled": True})

        seen = {n: (r["owner"], r["kept"], r["managed"]) for n, r in listing(d).items()}
        assert seen == {
            "DOSWin": (None, False, False),
            "qemu-s390x": (admin.uid, True, True),
            "qemu-aarch64": (user.uid, False, True),
            "qemu-riscv64": (user2.uid, False, True),
            "qemu-ppc64le": (0, True, True),
        }
        assert {n: r["owner"] for n, r in recorded(d).items()} == {
            "qemu-s390x": admin.uid, "qemu-aarch64": user.uid, "qemu-riscv64": user2.uid,
            "qemu-ppc64le": 0,
        }  # fmt: skip

        assert ok(d, user2, "POST", "/v1/reset", {"scope": "managed"})["removed"] == [
            "qemu-riscv64"
        ]
        assert sorted(in_kernel(d)) == ["DOSWin", "qemu-aarch64", "qemu-ppc64le", "qemu-s390x"]
        assert sorted(recorded(d)) == ["qemu-aarch64", "qemu-ppc64le", "qemu-s390x"]
        ok(d, user, "DELETE", f"{REG}/qemu-aarch64", status=204)
        removed = ok(d, admin, "POST", "/v1/reset", {"scope": "managed"})["removed"]
        assert sorted(removed) == ["qemu-ppc64le", "qemu-s390x"]
        assert sorted(in_kernel(d)) == ["DOSWin"] and recorded(d) == {}


def test_an_admins_entry_is_kept_a_users_defers(accounts: Accounts, workdir: Path) -> None:
    """systemd-binfmt flushes the table and registers Debian's rules under
    qusd's names: the admin's entry comes back within a reconcile (event
    drift), the user's defers to Debian's (a conflict, not fought), and
    entries qusd never registered stay as they are."""
    user, admin = accounts.user, accounts.admin
    with running(workdir, **FAST) as d:
        d.inside.kernel.register(PYC)
        ok(d, admin, "POST", REG, {"targets": ["aarch64"]}, status=201)  # into a free name
        ok(d, user, "POST", REG, {"targets": ["s390x"]}, status=201)
        ours = in_kernel(d)["qemu-aarch64"].rule()
        debian = [debian_rule("aarch64"), debian_rule("s390x"), PYC, WINE]
        d.inside.func("tests.test_security:flush_and_register", debian)
        wait_for(lambda: in_kernel(d)["qemu-aarch64"].rule() == ours,
                 "the admin's entry back")  # fmt: skip
        time.sleep(0.6)
        kernel = in_kernel(d)
        assert kernel["qemu-aarch64"].rule() == ours
        assert kernel["qemu-s390x"].rule() == debian_rule("s390x").normalized()
        assert kernel["python3.11"].rule() == PYC.normalized()
        assert kernel["DOSWin"].rule() == WINE.normalized()
        assert [(w["code"], "qemu-s390x" in w["message"]) for w in warnings_of(d)] == [
            ("conflict", True)
        ]
        log = d.log.read_text()
        assert "drift: qemu-aarch64 had another definition" in log  # event drift, then
        assert "took back qemu-aarch64 from another definition" in log  # restored
        # the user's removing their own record does not touch Debian's entry
        ok(d, user, "POST", "/v1/reset", {"scope": "managed"})
        assert in_kernel(d)["qemu-s390x"].rule() == debian_rule("s390x").normalized()
        assert "qemu-s390x" not in recorded(d)


def test_an_admins_entry_is_taken_back_at_start(accounts: Accounts, workdir: Path) -> None:
    """Stopped, then Debian's rules registered in a fresh table: at start
    qusd puts the admin's entry back and lets the user's defer."""
    user, admin = accounts.user, accounts.admin
    with running(workdir) as d:
        ok(d, admin, "POST", REG, {"targets": ["aarch64"]}, status=201)
        ok(d, user, "POST", REG, {"targets": ["s390x"]}, status=201)
        ours = in_kernel(d)["qemu-aarch64"].rule()
    box = Sandbox()
    try:
        box.kernel.register(debian_rule("aarch64"))
        box.kernel.register(debian_rule("s390x"))
        e = EnteredDaemon(box, workdir, "--reconcile-interval", "0", state_dir=workdir / "state")
        try:
            assert box.kernel.entry("qemu-aarch64").rule() == ours
            assert box.kernel.entry("qemu-s390x").rule() == debian_rule("s390x").normalized()
            assert "restore: restored 1, adopted 0, 1 in conflict" in e.log.read_text()
        finally:
            e.stop()
    finally:
        box.close()


def test_drift_report_leaves_an_admins_entry_and_reports_it(
    accounts: Accounts, workdir: Path
) -> None:
    admin = accounts.admin
    with running(workdir, drift="report", **FAST) as d:
        ok(d, admin, "POST", REG, {"targets": ["aarch64"]}, status=201)
        d.inside.func("tests.test_security:flush_and_register", [debian_rule("aarch64")])
        wait_for(lambda: warnings_of(d) != [], "the drift reported")
        time.sleep(0.6)
        assert in_kernel(d)["qemu-aarch64"].rule() == debian_rule("aarch64").normalized()
        (warning,) = warnings_of(d)
        assert warning["code"] == "drift" and 'drift = "report"' in warning["message"]
        assert d.log.read_text().count("drift: qemu-aarch64 has another definition") == 1


OLD_RECORD = {  # a record as qusd wrote them before owners were recorded
    "name": "qemu-aarch64", "type": "M", "offset": 0, "magic": AARCH64.magic.hex(),
    "mask": AARCH64.mask.hex(), "extension": None, "interpreter": "/usr/bin/qemu-aarch64-static",
    "flags": "F", "persistent": True, "enabled": True, "target": "aarch64",
}  # fmt: skip


def test_an_old_state_file_counts_as_roots(accounts: Accounts, workdir: Path) -> None:
    """Records written before owners were recorded load as root's: users may
    not touch them; qusd keeps the names it kept before (owned), no more."""
    interpreter("aarch64")
    s390x = BUILTIN.get("s390x")
    old = [
        OLD_RECORD,
        {**OLD_RECORD, "name": "qemu-s390x", "magic": s390x.magic.hex(),
         "mask": s390x.mask.hex(), "interpreter": interpreter("s390x"), "target": "s390x",
         "owned": True},
    ]  # fmt: skip
    state = workdir / "state"
    state.mkdir(mode=0o755)
    (state / FILENAME).write_text(json.dumps({"version": 1, "registrations": old}))
    with running(workdir) as d:
        seen = {n: (r["owner"], r["kept"]) for n, r in listing(d).items()}
        assert seen == {"qemu-aarch64": (0, False), "qemu-s390x": (0, True)}
        refused(d, accounts.user, "DELETE", f"{REG}/qemu-aarch64",
                says=["qemu-aarch64 was registered by uid 0"])  # fmt: skip


# -- connections: a share per uid, reads limited per uid ------------------------------


def test_one_user_cannot_take_every_connection(accounts: Accounts, workdir: Path) -> None:
    """A user opens max_connections keep-alive connections and keeps them
    busy: they get their share (max_connections_per_uid), and another user
    and root are served all along."""
    with running(workdir, keepalive_timeout=30.0) as d:
        hog = run_flood(accounts.user, "hold", d.socket, 256, 6)
        try:
            time.sleep(3)  # connected, and kept alive
            for who in (accounts.user2, None):
                assert request(who, d.socket, "GET", "/v1/health").status == 200
        finally:
            held = flood_result(hog)
        assert held["served"] == 32, held  # the default share
        assert request(accounts.user, d.socket, "GET", "/v1/health").status == 200


def test_root_and_admins_keep_room(accounts: Accounts, workdir: Path) -> None:
    """Users fill every connection they may: the reserved ones stay for root
    and admins; a third user is turned away at once."""
    limits = {"max_connections": 48, "max_connections_per_uid": 20, "reserved_connections": 8,
              "keepalive_timeout": 30.0, "socket_mode": "666"}  # fmt: skip
    with running(workdir, **limits) as d:
        hogs = [run_flood(who, "hold", d.socket, 30, 8) for who in (accounts.user, accounts.user2)]
        try:
            # Each user refused once holds its whole share: 40 of 48, 8 kept.
            hogged = [f"uid {who.uid} (pid" for who in (accounts.user, accounts.user2)]

            def moment() -> str:
                floods = [
                    f"uid {w.uid}: exit {h.poll()}"
                    for w, h in zip((accounts.user, accounts.user2), hogs, strict=True)
                ]
                tail = d.log.read_text(errors="replace").splitlines()[-40:]
                return "; ".join(floods) + "\nthe daemon's log ends:\n" + "\n".join(tail)

            wait_for(lambda: all(m in d.log.read_text() for m in hogged),
                     "both users held to their share", timeout=20, explain=moment)  # fmt: skip
            third = run_flood(accounts.other, "hold", d.socket, 1, 1)
            assert flood_result(third) == {"served": 0}
            for who in (accounts.admin, None):
                assert request(who, d.socket, "GET", "/v1/health").status == 200
        finally:
            held = [flood_result(h)["served"] for h in hogs]
        assert held == [20, 20], held
        assert "over its share of connections" in d.log.read_text()


def test_a_read_flood_does_not_slow_another_user(accounts: Accounts, workdir: Path) -> None:
    """One user sends GET /v1/status back to back on 200 connections;
    another user's reads stay fast (before: ~600 ms), and the flood meets
    the per-uid read limit (429)."""
    with running(workdir) as d:
        base = flood_result(run_flood(accounts.user2, "latency", d.socket, 20))["latency"]
        assert None not in base, base
        hammer = run_flood(accounts.user, "hammer", d.socket, 200, 8)
        try:
            time.sleep(2)
            under = flood_result(run_flood(accounts.user2, "latency", d.socket, 30))["latency"]
        finally:
            counts = flood_result(hammer)
        assert None not in under, under
        slow = statistics.median(under)
        print(f"median latency: {statistics.median(base) * 1000:.1f} ms alone, "
              f"{slow * 1000:.1f} ms under the flood; flood answers {counts}")  # fmt: skip
        assert slow < max(0.05, 4 * statistics.median(base)), (base, under)
        assert counts.get("429", 0) > 0 and counts.get("200", 0) > 0, counts


def churn(who: Account | None, sock: str, total: int, wave: int) -> dict[str, int]:
    """tests/flood.py churn as who (None: root), late requests 0.6 s late."""
    argv = [sys.executable, "-c", FLOOD, "churn", sock, str(total), str(wave), "0.6"]
    if who is not None:
        argv = who.argv([python_for(who.uid), *argv[1:]])
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False, cwd="/")
    assert res.returncode == 0, res.stderr
    fates: dict[str, int] = json.loads(res.stdout)
    return fates


def test_the_connection_guard_forgets_every_connection(accounts: Accounts, workdir: Path) -> None:
    """20,000 connections with header_timeout 0.3 s: a third closed at once,
    a third asking in time, a third asking 0.6 s late. Memory stays flat;
    and a user whose connections went every way, refusals included, still
    gets their whole share afterwards: the books drained."""
    # room for a wave and the last one's closes the daemon has not seen yet
    settings = {"header_timeout": 0.3, "keepalive_timeout": 30.0, "max_connections": 1024}
    with running(workdir, **settings) as d:
        churn(None, d.socket, 1800, 300)  # warm up: allocator arenas, caches
        before = vm_rss(d.pid)
        growth = []
        for _ in range(3):
            fates = churn(None, d.socket, 6000, 300)
            assert fates.get("1:answered", 0) == 2000, fates
            # a deadline timer may fire late on a loaded machine: a late request
            # then still gets its answer; most must find the connection closed
            assert fates.get("2:closed", 0) + fates.get("2:answered", 0) == 2000, fates
            assert fates.get("2:closed", 0) > 1000, fates
            growth.append(vm_rss(d.pid) - before)
        print(f"VmRSS growth after each 6000 connections: {[g >> 10 for g in growth]} KiB")
        assert growth[-1] < 4 * 2**20, growth
        fates = churn(accounts.user, d.socket, 1200, 39)  # 39 at once: 7 over the share
        assert fates.get("1:answered", 0) + fates.get("2:answered", 0) > 0, fates
        held = flood_result(run_flood(accounts.user, "hold", d.socket, 40, 2))
        assert held["served"] == 32, held


# -- every answer is problem+json; a client that leaves is not a server failure -------


def raw_exchange(sock_path: str, data: bytes, timeout: float = 10) -> bytes:
    """Send data as it is; what came back until the daemon closed."""
    chunks = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def assert_problem(reply: Reply, statuses: Sequence[int]) -> dict[str, Any]:
    assert reply.status in statuses and reply.content_type == PROBLEM_JSON, str(reply)
    problem: dict[str, Any] = reply.json()
    assert problem["code"] in errors.CODES and problem["status"] == reply.status, problem
    assert problem["type"] == f"urn:qusd:problem:{problem['code']}", problem
    return problem


BODY = b'{"scope": "all"}'
ENCODED = {
    "gzip, plain body": ("gzip", BODY),
    "gzip": ("gzip", gzip.compress(BODY)),
    "deflate, undecodable": ("deflate", b"\x00not deflate" * 3),
    "deflate": ("deflate", zlib.compress(BODY)),
    "br, undecodable": ("br", b"\xff\xfe not brotli"),
    "zstd, undecodable": ("zstd", b"\x28\xb5\x2f\xfd garbage"),
    "identity, gzip": ("identity, gzip", gzip.compress(BODY)),
    "unknown": ("x-qusdt", BODY),
}


def test_request_body_encodings_are_refused_with_a_problem(daemon: Daemon) -> None:
    """A body with a Content-Encoding (valid or not): 415 problem+json,
    nothing done; before, gzip on a plain body answered 500 with a traceback."""
    daemon.inside.kernel.register(WINE)
    for case, (encoding, body) in ENCODED.items():
        head = (f"POST /v1/reset HTTP/1.1\r\nHost: qusd\r\nContent-Type: application/json\r\n"
                f"Content-Encoding: {encoding}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()  # fmt: skip
        with unchanged(daemon):
            reply = parse_http(raw_exchange(daemon.socket, head + body))
        problem = assert_problem(reply, (415,))
        assert problem["code"] == "unsupported-media-type", (case, problem)
        assert "send the body without Content-Encoding" in problem["detail"], (case, problem)
        assert reply.headers.get("accept-encoding") == "identity", (case, reply)
    plain = http_json(daemon.socket, "POST", "/v1/reset", {"scope": "all"})
    assert plain.status == 200 and plain.json() == {"removed": ["DOSWin"]}
    log = daemon.log.read_text(errors="replace")
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def test_a_client_that_hangs_up_is_logged_as_gone(daemon: Daemon) -> None:
    """A POST that promises 100 bytes and hangs up: logged as a client that
    went away (one line), audited as such; no 500, no traceback."""
    daemon.inside.kernel.register(WINE)
    with unchanged(daemon):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(daemon.socket)
            s.sendall(b"POST /v1/reset HTTP/1.1\r\nHost: qusd\r\nContent-Type: application/json"
                      b"\r\nContent-Length: 100\r\n\r\n" + b'{"scope":')  # fmt: skip
            time.sleep(0.3)
        wait_for(lambda: "went away" in daemon.log.read_text(), "the departure logged")
    log = daemon.log.read_text(errors="replace")
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    (line,) = [x for x in log.splitlines() if "went away" in x]
    assert "POST /v1/reset" in line, line
    audit = [x for x in log.splitlines() if "audit:" in x and "/v1/reset" in x]
    assert len(audit) == 1 and 'result="client-gone"' in audit[0], audit


#: requests aiohttp's parser refuses; each carries a marker that must show
#: up neither raw in the answer nor as a line of its own in the log
MARK = "qusdt\x1b[2J\rFORGED"
BAD_HTTP = {
    "bad method token": f"G\x01T /v1/health HTTP/1.1\r\nHost: {MARK}\r\n\r\n".encode(),
    "method with the marker": f"{MARK} /v1/health HTTP/1.1\r\nHost: q\r\n\r\n".encode(),
    "CL and TE": b"POST /v1/reset HTTP/1.1\r\nHost: q\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bad chunk": b"POST /v1/reset HTTP/1.1\r\nHost: q\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n" + f"zz{MARK}\r\n{{}}\r\n0\r\n\r\n".encode(),
    "two Content-Lengths": b"POST /v1/reset HTTP/1.1\r\nHost: q\r\nContent-Length: 2\r\n"
    b"Content-Length: 3\r\n\r\n{}",
    "negative Content-Length": b"POST /v1/reset HTTP/1.1\r\nHost: q\r\nContent-Length: -1\r\n\r\n",
    "200 headers": b"GET /v1/health HTTP/1.1\r\nHost: q\r\n"
    + b"".join(b"X-H%d: %s\r\n" % (i, MARK.encode()) for i in range(200))
    + b"\r\n",
    "100 KB header": b"GET /v1/health HTTP/1.1\r\nHost: q\r\nX-Big: "
    + MARK.encode() * (100_000 // len(MARK))
    + b"\r\n\r\n",
    "100 KB URL": b"GET /v1/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: q\r\n\r\n",
    "bad version": f"GET /v1/health HTTP/7.{MARK}\r\nHost: q\r\n\r\n".encode(),
    "TLS hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
}


def test_http_parser_errors_are_problems_logged_on_one_line(daemon: Daemon) -> None:
    """What aiohttp's parser refuses gets a problem+json 400 (not text/plain
    echoing the client), and the log says so in one escaped line, with no
    traceback."""
    for case, data in BAD_HTTP.items():
        raw = raw_exchange(daemon.socket, data)
        assert raw, f"{case}: no answer"
        reply = parse_http(raw)
        problem = assert_problem(reply, (400, 413, 431))
        assert problem["code"] == "bad-request", (case, problem)
        assert b"\x1b" not in reply.body and b"FORGED" not in reply.body, (case, reply)
    assert http(daemon.socket, "GET", "/v1/health").status == 200
    log = daemon.log.read_text(errors="replace")
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]
    lines = log.splitlines()
    assert not [x for x in lines if x.startswith("FORGED")], "a forged log line"
    assert "\x1b" not in log and "\r" not in log
    refusals = [x for x in lines if "bad HTTP request" in x]
    assert len(refusals) == len(BAD_HTTP), refusals


# -- trusted interpreters: the path the kernel opens ----------------------------------


FAKE_QEMU = "#!/bin/sh\necho qusdt-untrusted-interpreter-ran uid=$(id -u)\n"


def test_dotdot_cannot_walk_out_of_a_users_symlink(accounts: Accounts, workdir: Path) -> None:
    """A user owns base/u2dir with lnk -> a/b/c/d: the kernel resolves
    base/u2dir/lnk/../../../../usr/bin/qemu-aarch64-static into the user's
    directory, text normalisation into /usr/bin. Refused: '..' outright,
    and every directory the kernel walks through, symlinks followed as the
    kernel follows them."""
    user, admin = accounts.user, accounts.admin
    with closed_dir("qusdt-dotdot") as base, running(workdir) as d:
        u2dir = base / "u2dir"
        (u2dir / "a" / "b" / "c" / "d").mkdir(parents=True)
        (u2dir / "usr" / "bin").mkdir(parents=True)
        fake = u2dir / "usr" / "bin" / "qemu-aarch64-static"
        fake.write_text(FAKE_QEMU)
        fake.chmod(0o755)
        (u2dir / "lnk").symlink_to("a/b/c/d")
        for p in (u2dir, *u2dir.rglob("*")):
            os.lchown(p, user.uid, NOGROUP)
        sneaky = f"{base}/u2dir/lnk/../../../../usr/bin/qemu-aarch64-static"
        assert os.path.normpath(sneaky) == "/usr/bin/qemu-aarch64-static"
        assert os.path.realpath(sneaky) == str(fake)  # what the kernel opens
        aarch64 = {"magic": AARCH64.magic.hex(), "mask": AARCH64.mask.hex()}
        for flags in ("", "F"):
            ans = refused(d, admin, "POST", REG,
                          entry_body("qemu-aarch64", sneaky, flags=flags, **aarch64),
                          status=422, code="validation", says=["'..'"])  # fmt: skip
            assert ans.body["errors"][0]["loc"] == ["body", "entry", "interpreter"], ans

        # root's tree, with a relative symlink through '..' (as Debian's
        # /usr/libexec/qemu-binfmt links are): fine while every directory
        # the kernel passes is root's and closed
        rooted = base / "root"
        (rooted / "bin").mkdir(parents=True)
        (rooted / "libexec" / "qemu-binfmt").mkdir(parents=True)
        shutil.copy(interpreter("aarch64"), rooted / "bin" / "qemu-aarch64-static")
        good = rooted / "libexec" / "qemu-binfmt" / "aarch64-binfmt-P"
        good.symlink_to("../../bin/qemu-aarch64-static")
        # the same file, reached through the user's directory on the way
        (rooted / "detour").symlink_to("../u2dir/a/../../root/bin/qemu-aarch64-static")
        detour = refused(d, admin, "POST", REG,
                         entry_body("qemu-aarch64", str(rooted / "detour"), flags="F", **aarch64),
                         code="untrusted-interpreter",
                         says=[f"{u2dir} (for {rooted / 'detour'}) is owned by uid "
                               f"{user.uid}"])  # fmt: skip
        assert detour.status == 403
        done = ok(d, admin, "POST", REG, entry_body("qemu-aarch64", str(good), flags="F",
                                                   **aarch64), status=201)  # fmt: skip
        assert done["registered"][0]["interpreter"] == str(good)


def swapped_while_registering(directory: str) -> dict[str, object]:
    """Runs inside a sandbox: the service registers an F entry whose
    interpreter (in a root-owned tmpfs, trusted) is replaced by another file
    between the check and the kernel's open, as a racer would. What the
    service answered, and what the kernel and the state hold after."""
    from qusd import catalog as cat  # noqa: PLC0415
    from qusd.binfmt import BinfmtMisc  # noqa: PLC0415
    from qusd.config import Config  # noqa: PLC0415
    from qusd.errors import QusdError  # noqa: PLC0415
    from qusd.policy import Caller  # noqa: PLC0415
    from qusd.service import Service  # noqa: PLC0415
    from qusd.state import State  # noqa: PLC0415
    from tests.test_policy import _mount_tmpfs  # noqa: PLC0415

    _mount_tmpfs("/mnt")
    exe, other = Path("/mnt/qemu-x"), Path("/mnt/qemu-other")
    for path in (exe, other):
        shutil.copy("/bin/true", path)
        path.chmod(0o755)

    class Racing(BinfmtMisc):
        def register(self, rule: Rule) -> Any:
            os.rename(other, exe)  # after the check, before the kernel opens it
            return super().register(rule)

    svc = Service(Racing(), State(directory), cat.builtin(), Config())
    rule = Rule("qusdt-race", str(exe), magic=b"QUSD", flags="F")
    try:
        svc.register_entry(Caller(0, 0, os.getpid()), rule)
        said = "registered"
    except QusdError as e:
        said = f"{e.code}: {e.message}"
    return {"said": said, "table": BinfmtMisc().names(), "state": State.load(directory).records}


def test_an_interpreter_swapped_while_registering_is_undone(sbx: Sandbox, tmp_path: Path) -> None:
    """The checked file is held open (O_PATH) until the kernel has opened the
    path: if the path leads elsewhere then, the registration is undone."""
    got = sbx.func("tests.test_security:swapped_while_registering", str(tmp_path / "state"))
    assert got["said"].startswith("untrusted-interpreter: /mnt/qemu-x changed while it was "), got
    assert got["table"] == [] and got["state"] == {}, got


def register_through_a_descriptor(busybox: str) -> dict[str, str]:
    """Runs inside a sandbox: register aarch64 with F and the interpreter
    given as /proc/self/fd/N of a descriptor held open, close it, run."""
    from qusd.binfmt import BinfmtMisc  # noqa: PLC0415

    kernel = BinfmtMisc()
    fd = os.open(interpreter("aarch64"), os.O_PATH | os.O_CLOEXEC)
    try:
        entry = kernel.register(AARCH64.rule(f"/proc/self/fd/{fd}", "F"))
    finally:
        os.close(fd)
    ran = subprocess.run([busybox, "uname", "-m"], capture_output=True, text=True, check=False)
    return {"interpreter": entry.interpreter, "fd": str(fd), "ran": ran.stdout.strip()}


def test_the_kernel_takes_a_descriptor_path_but_keeps_it_as_the_name(sbx: Sandbox) -> None:
    """Why qusd pins the checked file itself rather than registering
    /proc/self/fd/N: the kernel accepts that path with F (it opens the very
    file, and emulation works once the descriptor is closed), but the entry
    shows /proc/self/fd/N as its interpreter for good (and the interpreter
    gets it as argv[0]), which no one could read or register again."""
    got = sbx.func("tests.test_security:register_through_a_descriptor",
                   str(busybox_path("arm64")))  # fmt: skip
    assert got["ran"] == "aarch64", got
    assert got["interpreter"] == f"/proc/self/fd/{got['fd']}", got


def test_rootless_daemon_trusts_only_root_and_its_user(
    accounts: Accounts, workdir: Path, shared: Shared
) -> None:
    """A user's own rootless daemon: files of other users (uid 65534 inside
    its namespace, like root's) are not trusted; root's and the user's are."""
    user, other = accounts.user, accounts.other
    with closed_dir("qusdt-rootless") as base:
        dirs = {}
        for name, owner in (("other", other.uid), ("mine", user.uid)):
            dirs[name] = base / name
            dirs[name].mkdir()
            shutil.copy(interpreter("aarch64"), dirs[name] / "qemu-aarch64-static")
            for p in (dirs[name], dirs[name] / "qemu-aarch64-static"):
                os.chown(p, owner, NOGROUP)
        home = workdir / "rootless"
        home.mkdir()
        os.chown(home, user.uid, NOGROUP)
        home.chmod(0o700)
        results = {}
        for name in ("other", "mine", "system"):
            config = home / f"{name}.toml"
            where = [str(dirs[name])] if name in dirs else ["/usr/bin"]
            config.write_text(f"[qusd]\ninterpreter_dirs = {json.dumps(where)}\n")
            os.chown(config, user.uid, NOGROUP)
            with rootless(user, home, config, shared) as sock:
                ans = request(user, sock, "POST", REG, {"targets": ["arm64"], "flags": "F"})
                results[name] = (ans.status, ans.detail)
        assert results["other"][0] == 403, results
        assert f"is owned by uid {other.uid}" in results["other"][1], results
        assert results["mine"][0] == 201 and results["system"][0] == 201, results


@contextlib.contextmanager
def rootless(user: Account, home: Path, config: Path, shared: Shared) -> Iterator[str]:
    """`qusd --sandbox` run by user, without privilege; yields its socket."""
    sock = str(home / "qusd.sock")
    argv = [python_for(user.uid), "-m", "qusd.daemon", "--sandbox", "--socket", sock,
            "--state-dir", str(home / f"state-{config.stem}"), "--config", str(config)]  # fmt: skip
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": shared.pythonpath}
    log = home.parent / f"rootless-{config.stem}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(user.argv(argv), env=env, cwd=home, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock) or request(user, sock, "GET", "/v1/health").status != 200:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)


# -- bytes the kernel shows -------------------------------------------------------------


def test_non_utf8_bytes_in_entries_are_shown_losslessly(tmp_path: Path) -> None:
    """Another tool puts an interpreter with non-UTF-8 bytes under a name qusd
    manages (a conflict, told in /v1/status), and an entry with such bytes in
    its name: status, a conflicting POST and the listing keep working (each
    was a 500 before), and the exact bytes are in `raw`, as hex."""
    write_state(tmp_path / "state", s390x_record())  # not kept: it defers
    d = Daemon(tmp_path)
    try:
        s390x = BUILTIN.get("s390x")
        cafe = "/opt/caf\udce9/qemu"  # b"/opt/caf\xe9/qemu", as os.fsdecode gives it
        theirs = [Rule("qemu-s390x", cafe, s390x.magic, s390x.mask),
                  Rule("qemu-aarch64", cafe, AARCH64.magic, AARCH64.mask)]  # fmt: skip
        for rule in theirs:
            d.inside.func("tests.test_daemon:swap_in", rule)
        d.inside.kernel.register(Rule("x\udcff", "/usr/bin/x\udcfe", extension="qusdt"))

        def told() -> bool:
            reply = http(d.socket, "GET", "/v1/status")
            assert reply.status == 200, str(reply)
            return any("qemu-s390x" in w["message"] for w in reply.json()["warnings"])

        wait_for(told, "the conflict told in /v1/status")
        (warning,) = http(d.socket, "GET", "/v1/status").json()["warnings"]
        assert "/opt/caf\\xe9/qemu" in warning["message"], warning
        conflict = http_json(d.socket, "POST", REG, {"targets": ["aarch64"]})
        problem = assert_problem(conflict, (409,))
        assert "/opt/caf\\xe9/qemu" in problem["detail"], problem

        regs = http(d.socket, "GET", REG)
        assert regs.status == 200, str(regs)
        by_raw_name = {bytes.fromhex(r["raw"]["name"]) if r["raw"] and r["raw"]["name"]
                       else r["name"].encode(): r for r in regs.json()}  # fmt: skip
        aarch64 = by_raw_name[b"qemu-aarch64"]
        assert bytes.fromhex(aarch64["raw"]["interpreter"]) == b"/opt/caf\xe9/qemu"
        assert aarch64["interpreter"] == "/opt/caf\\xe9/qemu"
        odd = by_raw_name[b"x\xff"]
        assert bytes.fromhex(odd["raw"]["interpreter"]) == b"/usr/bin/x\xfe"
        assert odd["name"] == "x\\xff"
        doc = http(d.socket, "GET", "/openapi.json").json()
        raw = doc["components"]["schemas"]["RegistrationOut"]["properties"]["raw"]
        assert "hex" in json.dumps(raw) and "UTF-8" in json.dumps(raw), raw
    finally:
        d.stop()


# -- qusctl run into someone else's namespace -------------------------------------------


def test_run_refuses_a_namespace_another_uid_owns(
    accounts: Accounts, workdir: Path, shared: Shared
) -> None:
    """A user's sandbox, with their own program bind-mounted over /usr/bin/id:
    root's `qusctl run --pid` refuses to join it (their code would run as
    root) unless --force, and says why."""
    user = accounts.user
    fake = workdir / "fake-id"
    fake.write_text("#!/bin/sh\necho qusdt-the-users-program-ran\n")
    fake.chmod(0o755)
    os.chown(fake, user.uid, NOGROUP)
    script = f"mount --bind {fake} /usr/bin/id && echo ready && exec sleep 120"
    argv = [python_for(user.uid), "-m", "qusd.sandbox", "--", "sh", "-c", script]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": shared.pythonpath}
    box = subprocess.Popen(user.argv(argv), env=env, cwd="/", stdout=subprocess.PIPE, text=True)
    try:
        assert box.stdout is not None and box.stdout.readline().strip() == "ready"
        qusctl = [sys.executable, "-m", "qusd.cli", "run", "--pid", str(box.pid)]
        res = subprocess.run([*qusctl, "--", "/usr/bin/id"], capture_output=True, text=True,
                             timeout=60, check=False, cwd=ROOT)  # fmt: skip
        assert "qusdt-the-users-program-ran" not in res.stdout, "root ran the user's program"
        assert res.returncode == 77, res
        assert f"owned by uid {user.uid}" in res.stderr and "--force" in res.stderr, res.stderr
        forced = subprocess.run([*qusctl[:3], "run", "--force", "--pid", str(box.pid), "--",
                                 "/usr/bin/id"], capture_output=True, text=True, timeout=60,
                                check=False, cwd=ROOT)  # fmt: skip
        assert forced.stdout.strip() == "qusdt-the-users-program-ran", forced
    finally:
        box.kill()
        box.wait()


# -- audit records ----------------------------------------------------------------------

AUDIT_LINE = re.compile(r'audit:((?: [a-z]+="(?:[^"\\\x00-\x1f]|\\.)*")+)$')
AUDIT_FIELD = re.compile(r' ([a-z]+)="((?:[^"\\]|\\.)*)"')


def audit_records(log: str) -> list[dict[str, str]]:
    """Every audit line, parsed: each must be key="value" pairs and nothing else."""
    found = []
    for line in log.splitlines():
        if "audit:" not in line:
            continue
        m = AUDIT_LINE.search(line)
        assert m, f"not a structured audit line: {line!r}"
        found.append({k: json.loads(f'"{v}"') for k, v in AUDIT_FIELD.findall(m.group(1))})
    return found


def test_audit_fields_cannot_be_spoofed(accounts: Accounts, workdir: Path) -> None:
    """A name that reads like more fields, a client program whose name does,
    backslashes and quotes: each value stays in its own quoted field."""
    user = accounts.user
    spoof = workdir / "x uid=0 pid=1"
    shutil.copy(os.path.realpath(CURL), spoof)
    spoof.chmod(0o755)
    with running(workdir) as d:
        steps = [
            ("DELETE", f"{REG}/x%20result=204%20uid=0%20", CURL),
            ("DELETE", f"{REG}/a%5Cb%22c", CURL),
            ("DELETE", f"{REG}/qemu-none", str(spoof)),
        ]
        for method, path, client in steps:
            argv = [client, "-s", "-o", "/dev/null", "--path-as-is", "--unix-socket", d.socket,
                    "-X", method, "http://qusd" + path]  # fmt: skip
            subprocess.run(user.argv(argv), check=True, timeout=30, cwd="/")
        records = audit_records(d.log.read_text())
    assert [set(r) for r in records] == [{"uid", "pid", "exe", "action", "names", "result"}] * 3
    assert all(r["uid"] == str(user.uid) and r["result"] == "404" for r in records), records
    assert records[0]["names"] == "x result=204 uid=0 "
    assert records[0]["action"] == "DELETE /v1/registrations/x%20result=204%20uid=0%20"
    assert records[1]["names"] == 'a\\b"c'
    assert records[2]["exe"] in ("[x uid=0 pid=1]", str(spoof)), records[2]


JOURNALD = r"""
import json, os, socket, struct, subprocess, sys
log, journal, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
if os.system("mount -t tmpfs tmpfs /run") != 0:
    sys.exit("cannot mount a tmpfs on /run")
os.makedirs("/run/systemd/journal")
srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
srv.bind("/run/systemd/journal/socket")
out = open(log, "wb")
st = os.fstat(out.fileno())
env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
daemon = subprocess.Popen(argv, stdout=out, stderr=out, env=env)
with open(journal, "a") as j:
    print(json.dumps({"pid": daemon.pid}), file=j, flush=True)
    while True:
        data, fds, _, _ = socket.recv_fds(srv, 1 << 20, 4)
        for fd in fds:  # a big entry comes as a memfd
            data = os.pread(fd, 1 << 24, 0)
            os.close(fd)
        fields = {}
        while data:
            line, nl, rest = data.partition(b"\n")
            if b"=" in line:
                key, _, value = line.partition(b"=")
                data = rest
            else:
                (size,) = struct.unpack("<Q", rest[:8])
                key, value, data = line, rest[8:8 + size], rest[8 + size + 1:]
            fields[key.decode()] = value.decode("utf-8", "replace")
        print(json.dumps(fields), file=j, flush=True)
"""


def test_audit_records_reach_the_journal_as_fields(accounts: Accounts, workdir: Path) -> None:
    """The daemon with its stderr as the journal stream (JOURNAL_STREAM),
    and a journal socket of the test's in a mount namespace of its own:
    every audit record arrives with QUSD_* fields, and events with their
    MESSAGE_ID."""
    user = accounts.user
    write_settings(workdir, **ROLE_SETTINGS)
    sock, journal, log = str(workdir / "qusd.sock"), workdir / "journal.jsonl", workdir / "d.log"
    qusd = [str(Path(sys.executable).parent / "qusd"), "--sandbox", "--socket", sock,
            "--state-dir", str(workdir / "state"),
            "--config", str(workdir / "qusd.toml")]  # fmt: skip
    helper = subprocess.Popen(["unshare", "--mount", "--propagation", "private", sys.executable,
                               "-c", JOURNALD, str(log), str(journal), *qusd])  # fmt: skip
    try:
        wait_for(lambda: os.path.exists(sock)
                 and request(None, sock, "GET", "/v1/health").status == 200,
                 "the daemon serving", 30)  # fmt: skip
        assert request(user, sock, "POST", REG, {"targets": ["aarch64"]}).status == 201
        assert request(user, sock, "DELETE", f"{REG}/x%20uid=0").status == 404
        assert request(user, sock, "POST", "/v1/reset", {"scope": "all"}).status == 403

        def entries() -> list[dict[str, str]]:
            return [json.loads(x) for x in journal.read_text().splitlines()[1:]]

        wait_for(lambda: sum("QUSD_ACTION" in e for e in entries()) == 3,
                 "three audit records")  # fmt: skip
    finally:
        pid = json.loads(journal.read_text().splitlines()[0])["pid"] if journal.exists() else None
        if pid:
            os.kill(pid, signal.SIGTERM)
        helper.kill()
        helper.wait()
    audits = [e for e in entries() if "QUSD_ACTION" in e]
    want = [("POST /v1/registrations", "aarch64", "201"),
            ("DELETE /v1/registrations/x%20uid=0", "x uid=0", "404"),
            ("POST /v1/reset", "scope=all", "403")]  # fmt: skip
    assert [(a["QUSD_ACTION"], a["QUSD_NAMES"], a["QUSD_RESULT"]) for a in audits] == want
    assert all(a["QUSD_UID"] == str(user.uid) and int(a["QUSD_PID"]) > 0 for a in audits)
    assert audits[2]["MESSAGE_ID"] == MESSAGE_IDS["refused"]
    registered = [e for e in entries() if e.get("QUSD_EVENT") == "registered"]
    assert registered and registered[0]["MESSAGE_ID"] == MESSAGE_IDS["registered"]
    assert registered[0]["QUSD_UID"] == str(user.uid)


# -- the state directory ----------------------------------------------------------------


def start_daemon(cwd: Path, state: Path, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """`qusd restore` on state (the same start-up checks as serve), to its end."""
    argv = [str(Path(sys.executable).parent / "qusd"), "restore", "--sandbox",
            "--state-dir", str(state), "--config", os.devnull]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          cwd=cwd)  # fmt: skip


def test_the_state_directory_must_be_closed(accounts: Accounts, workdir: Path) -> None:
    """A state directory or file others may write, or a state.json that is
    not a regular file: the daemon refuses to start (78), naming the fix;
    a FIFO no longer hangs it."""
    state = workdir / "state"
    journal = state / JOURNAL
    good = json.dumps({"version": 1, "registrations": []})

    def fresh(mode: int = 0o755, owner: int = 0) -> None:
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir()
        state.chmod(mode)
        os.chown(state, owner, 0)
        (state / FILENAME).write_text(good)
        (state / FILENAME).chmod(0o644)
        journal.write_bytes(b"")
        journal.chmod(0o644)

    fresh()
    assert start_daemon(workdir, state).returncode == 0
    path = state / FILENAME

    def fifo(at: Path = path) -> None:
        at.unlink()
        os.mkfifo(at)

    def symlink() -> None:
        path.unlink()
        path.symlink_to(workdir / "elsewhere.json")

    cases: dict[str, tuple[Any, str]] = {
        "world-writable directory": (lambda: fresh(0o777), f"chmod go-w {state}"),
        "group-writable directory": (lambda: fresh(0o775), f"chmod go-w {state}"),
        "directory of another user": (lambda: fresh(owner=accounts.other.uid),
                                      f"chown root {state}"),
        "group-writable file": (lambda: path.chmod(0o664), f"chmod go-w {path}"),
        "file of another user": (lambda: os.chown(path, accounts.other.uid, 0),
                                 f"chown root {path}"),
        "FIFO": (fifo, "not a regular file"),
        "symlink": (symlink, "not a regular file"),
        "group-writable journal": (lambda: journal.chmod(0o664), f"chmod go-w {journal}"),
        "journal of another user": (lambda: os.chown(journal, accounts.other.uid, 0),
                                    f"chown root {journal}"),
        "journal FIFO": (lambda: fifo(journal), "not a regular file"),
    }  # fmt: skip
    for case, (make, fix) in cases.items():
        fresh()
        make()
        try:
            res = start_daemon(workdir, state, timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{case}: the daemon hung")
        assert res.returncode == 78, (case, res)
        assert fix in res.stderr and len(res.stderr.strip().splitlines()) == 1, (case, res.stderr)


def test_records_from_the_state_pass_the_checks_requests_pass(
    accounts: Accounts, workdir: Path
) -> None:
    """A state file (restored from a backup, edited by hand) with a rule for
    the host's own programs and one with an interpreter others may replace:
    neither is registered; both are reported. Overrides an admin gave are
    recorded and honoured."""
    evil = workdir / "anyone-may-write"
    shutil.copy("/bin/true", evil)
    evil.chmod(0o777)
    elf = {"name": "qusdt-elf", "type": "M", "offset": 0, "magic": "7f454c46", "mask": None,
           "extension": None, "interpreter": "/bin/true", "flags": "", "persistent": True,
           "enabled": True, "target": None, "owner": 0, "owned": True}  # fmt: skip
    records = [elf, {**elf, "name": "qusdt-evil", "magic": "51555344", "interpreter": str(evil)},
               {**elf, "name": "qusdt-forced", "magic": "51555345", "interpreter": str(evil),
                "allow_untrusted_interpreter": True}]  # fmt: skip
    state = workdir / "state"
    state.mkdir()
    (state / FILENAME).write_text(json.dumps({"version": 1, "registrations": records}))
    with running(workdir) as d:
        assert sorted(in_kernel(d)) == ["qusdt-forced"]
        messages = " ".join(w["message"] for w in warnings_of(d))
        assert "qusdt-elf would match the host's own programs" in messages
        assert f"{evil} is writable by group or others" in messages


def test_peer_with_more_than_256_groups_keeps_its_role(accounts: Accounts, workdir: Path) -> None:
    """An admin in 300 groups: SO_PEERGROUPS needs a bigger buffer, and the
    daemon still finds the admin group (the last of them)."""
    admin = accounts.admin
    groups = [*range(3_000_000, 3_000_299), accounts.admins_gid, accounts.users_gid]
    with running(workdir) as d:
        body = json.dumps(entry_body("qusdt-groups", "/bin/true"))
        argv = [CURL, "-s", "-S", "-i", "--unix-socket", d.socket, "-X", "POST",
                "-H", "Content-Type: application/json", "--data-binary", body,
                "http://qusd/v1/registrations"]  # fmt: skip
        setpriv = ["setpriv", f"--reuid={admin.uid}", f"--regid={NOGROUP}",
                   "--groups=" + ",".join(map(str, groups)), "--"]  # fmt: skip
        check = subprocess.run([*setpriv, "id", "-G"], capture_output=True, text=True, check=True)
        assert len(check.stdout.split()) == 302
        res = subprocess.run([*setpriv, *argv], capture_output=True, timeout=30, check=True,
                             cwd="/")  # fmt: skip
        reply = parse_http(res.stdout)
        assert reply.status == 201, str(reply)
        assert "qusdt-groups" in in_kernel(d)
