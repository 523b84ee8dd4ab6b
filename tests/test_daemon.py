"""The daemon's lifecycle on the real kernel: restart and restore, crashes,
concurrency, corrupt state, the socket, keep-alive and conflicts.

Every daemon runs in a sandbox of its own (`qusd --sandbox`), or, where a
table must be prepared before the daemon starts, inside a sandbox the test
made first (EnteredDaemon). A new daemon, a new sandbox: an empty table, so
whatever is in it after the start was put there by the restore.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qusd import catalog, interpreters, sandbox
from qusd.binfmt import Rule
from qusd.client import Client
from qusd.errors import EntryExistsError, NoSuchEntryError, QusdError, StateError
from qusd.state import Record, State
from tests.conftest import (
    ROOT,
    SANDBOX_REASON,
    Daemon,
    Sandbox,
    busybox_path,
    interpreter,
    wait_for,
)

QUSD = str(Path(sys.executable).parent / "qusd")
AARCH64 = catalog.builtin().get("aarch64")
#: the targets the concurrency tests pick from: another family than the
#: host's (a native one would send the sandbox's own programs through QEMU)
#: and an interpreter installed
FOREIGN = [
    t.name
    for t in catalog.builtin().foreign(catalog.family_of(catalog.host_machine()))
    if interpreters.find(t) is not None
]
Defs = dict[str, tuple[Rule, bool]]


# -- helpers ------------------------------------------------------------------


class FirstAnswer(Daemon):
    """A daemon whose first request, once the socket answers at all, is
    GET /v1/registrations: what a client sees the moment qusd serves."""

    first: list[dict[str, Any]] | None = None

    def probe(self) -> bool:
        self.first = self.client.get("/v1/registrations")
        return True


class EnteredDaemon(Daemon):
    """`qusd` without --sandbox, run inside an existing sandbox: it sees the
    table the test prepared there. The exec'd daemon keeps the pid of the
    `python -m qusd.sandbox --enter` process, so .inside and .stop work."""

    def __init__(self, box: Sandbox, workdir: Path, *extra: str, state_dir: Path) -> None:
        self.workdir = workdir
        self.socket = str(workdir / "entered.sock")
        self.state_dir = state_dir
        self.config = workdir / "entered.toml"
        self.config.write_text("# empty: built-in defaults\n")
        self.log = workdir / f"entered-{len(list(workdir.glob('entered-*.log')))}.log"
        self.argv = [
            QUSD,
            "--socket", self.socket,
            "--state-dir", str(state_dir),
            "--config", str(self.config),
            "--log-level", "debug",
            *extra,
        ]  # fmt: skip
        self._log = self.log.open("wb")
        self.proc = subprocess.Popen(
            sandbox.enter_command(box.pid, self.argv), stdout=self._log, stderr=subprocess.STDOUT
        )
        self.client = Client(self.socket, timeout=30)
        self._inside = None
        self.wait_ready()


Spawn = Callable[..., Daemon]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start more daemons in the test's directory; all killed at the end."""
    if SANDBOX_REASON:
        pytest.skip(SANDBOX_REASON)
    started: list[Daemon] = []

    def start(*extra: str, state_dir: Path | None = None, cls: type[Daemon] = Daemon) -> Daemon:
        d = cls(tmp_path, *extra, state_dir=state_dir)
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)


def register(d: Daemon, *targets: str, **options: Any) -> Any:
    return d.client.request("POST", "/v1/registrations", {"targets": list(targets), **options})


def set_enabled(d: Daemon, name: str, enabled: bool) -> Any:
    return d.client.request("PATCH", f"/v1/registrations/{name}", {"enabled": enabled})


def kernel_defs(d: Daemon) -> Defs:
    """name -> (definition, enabled) of every entry in the daemon's table."""
    return {e.name: (e.rule(), e.enabled) for e in d.table()}


def state_records(state_dir: Path) -> dict[str, Record]:
    st = State.load(state_dir)
    assert st.warnings == [], st.warnings
    return st.records


def state_defs(state_dir: Path) -> Defs:
    return {n: (r.rule, r.enabled) for n, r in state_records(state_dir).items()}


def assert_kernel_matches_state(d: Daemon) -> None:
    """Entry by entry: the kernel holds exactly the recorded definitions, in
    the recorded enabled state, and the API calls each managed."""
    recorded = state_records(d.state_dir)
    assert kernel_defs(d) == {n: (r.rule, r.enabled) for n, r in recorded.items()}
    regs = {r["name"]: r for r in d.client.get("/v1/registrations")}
    assert set(regs) == set(recorded)
    for name, rec in recorded.items():
        assert regs[name]["managed"] is True, regs[name]
        assert regs[name]["persistent"] is rec.persistent, regs[name]
        assert regs[name]["enabled"] is rec.enabled, regs[name]


def foreign_aarch64() -> Rule:
    """qemu-aarch64 as another tool might define it: another interpreter, no F."""
    return Rule(
        name="qemu-aarch64",
        interpreter="/opt/other/qemu-aarch64",
        magic=AARCH64.magic,
        mask=AARCH64.mask,
        flags="P",
    )


def swap_in(rule: Rule) -> None:
    """Runs inside a sandbox: replace an entry while a keep-alive loop may
    put it back between the removal and the registration."""
    from qusd.binfmt import BinfmtMisc  # noqa: PLC0415

    kernel = BinfmtMisc()
    for _ in range(200):
        with contextlib.suppress(NoSuchEntryError):
            kernel.remove(rule.name)
        try:
            kernel.register(rule)
            return
        except EntryExistsError:
            continue
    raise AssertionError(f"could not put {rule.name} in place")


def op_once(client: Client, rng: random.Random) -> tuple[str, int | None]:
    """One random mutation; (kind, HTTP status), None when nothing answered."""
    chosen = rng.sample(FOREIGN, rng.choice([1, 1, 1, 2, 3]))
    name = f"qemu-{chosen[0]}"
    kind = rng.choice(["register", "register", "disable", "enable", "unregister"])
    try:
        if kind == "register":
            body = {
                "targets": chosen,
                "persistent": rng.random() < 0.7,
                "flags": rng.choice(["F", "F", "OC"]),
                "replace": rng.random() < 0.3,
            }
            client.request("POST", "/v1/registrations", body)
            return kind, 201
        if kind in ("enable", "disable"):
            client.request("PATCH", f"/v1/registrations/{name}", {"enabled": kind == "enable"})
            return kind, 200
        client.request("DELETE", f"/v1/registrations/{name}")
        return kind, 204
    except QusdError as e:
        status: int | None = e.details.get("status")
        return kind, status


def hammer(
    sock: str, seed: int, until: float, stop: threading.Event, out: list[tuple[str, int | None]]
) -> None:
    client = Client(sock, timeout=30)
    rng = random.Random(seed)
    while time.monotonic() < until and not stop.is_set():
        kind, status = op_once(client, rng)
        out.append((kind, status))
        if status is None:
            return  # the daemon is gone


# -- restart and restore ----------------------------------------------------------


def test_sigterm_then_restart_restores_persistent_entries_before_serving(
    daemon: Daemon, spawn: Spawn
) -> None:
    interpreter("aarch64")
    register(daemon, "arm64", "s390x")
    register(daemon, "ppc64le", persistent=False)
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o660
    before = {r["name"]: r for r in daemon.client.get("/v1/registrations")}
    assert set(before) == {"qemu-aarch64", "qemu-s390x", "qemu-ppc64le"}

    assert daemon.stop(signal.SIGTERM) == 0
    assert not os.path.exists(daemon.socket)
    # a sandbox's table goes away with its last process: the log says so
    assert "stopped; the sandbox's registrations go away with it" in daemon.log.read_text()

    d2 = spawn(state_dir=daemon.state_dir, cls=FirstAnswer)
    assert isinstance(d2, FirstAnswer) and d2.first is not None
    first = {r["name"]: r for r in d2.first}
    # the very first answer already has them: same definition, managed, persistent
    assert set(first) == {"qemu-aarch64", "qemu-s390x"}
    for name, reg in first.items():
        assert reg == before[name]
        assert reg["managed"] is True and reg["persistent"] is True
    log = d2.log.read_text()
    serving = log.index("serving on")
    for name in first:
        assert log.index(f"restored {name} (") < serving
    assert "restore: restored 2, adopted 0" in log
    # the non-persistent one is gone from the kernel and from the state
    assert_kernel_matches_state(d2)
    assert "qemu-ppc64le" not in state_records(d2.state_dir)


def test_disabled_persistent_entries_come_back_disabled(daemon: Daemon, spawn: Spawn) -> None:
    bb_arm, bb_s390 = busybox_path("arm64"), busybox_path("s390x")
    register(daemon, "arm64", "s390x")
    set_enabled(daemon, "qemu-s390x", False)
    assert daemon.stop() == 0

    d2 = spawn(state_dir=daemon.state_dir)
    by_name = {e.name: e for e in d2.table()}
    assert by_name["qemu-aarch64"].enabled is True
    assert by_name["qemu-s390x"].enabled is False
    assert d2.client.get("/v1/registrations/qemu-s390x")["enabled"] is False
    # the kernel acts on it: s390x falls through, aarch64 runs
    res = d2.inside.run([bb_s390, "true"])
    assert res.returncode != 0 and "Exec format error" in res.stderr
    assert d2.inside.run([bb_arm, "uname", "-m"]).stdout.strip() == "aarch64"
    assert_kernel_matches_state(d2)


def write_state(state_dir: Path, *records: Record) -> None:
    State(state_dir).save({r.rule.name: r for r in records})


def aarch64_record(**kw: Any) -> Record:
    return Record(AARCH64.rule(interpreter("aarch64")), target="aarch64", **kw)


def s390x_record(**kw: Any) -> Record:
    t = catalog.builtin().get("s390x")
    return Record(t.rule(interpreter("s390x")), target="s390x", **kw)


def ppc_record(**kw: Any) -> Record:
    t = catalog.builtin().get("ppc64le")
    return Record(t.rule(interpreter("ppc64le")), target="ppc64le", **kw)


def test_restore_command_fills_a_fresh_sandbox_and_exits(tmp_path: Path) -> None:
    if SANDBOX_REASON:
        pytest.skip(SANDBOX_REASON)
    state_dir, cfg = tmp_path / "state", tmp_path / "empty.toml"
    cfg.write_text("")
    write_state(
        state_dir,
        aarch64_record(),
        s390x_record(enabled=False),
        ppc_record(persistent=False),
    )
    script = (
        '"$0" restore --state-dir "$1" --config "$2"; echo "rc=$?"; '
        'cd /proc/sys/fs/binfmt_misc && for f in qemu-*; do echo "$f $(head -n1 "$f")"; done'
    )
    res = subprocess.run(
        sandbox.command(["sh", "-c", script, QUSD, str(state_dir), str(cfg)]),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["rc=0", "qemu-aarch64 enabled", "qemu-s390x disabled"]
    assert "restore: restored 2, adopted 0" in res.stderr
    # the non-persistent record, absent from the fresh table, was dropped
    assert set(state_records(state_dir)) == {"qemu-aarch64", "qemu-s390x"}


IMPORTS = """
import sys
from qusd import daemon
rc = daemon.main(["restore", "--state-dir", sys.argv[1], "--config", sys.argv[2]])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("aiohttp", "pydantic", "asyncio"))
assert not heavy, heavy
from qusd.binfmt import BinfmtMisc
print(rc, *BinfmtMisc().names())
import qusd.api, qusd.models  # the control: the check does see them once they are imported
print("aiohttp" in sys.modules and "pydantic" in sys.modules)
"""


def test_restore_command_imports_no_aiohttp_pydantic_or_asyncio(tmp_path: Path) -> None:
    if SANDBOX_REASON:
        pytest.skip(SANDBOX_REASON)
    state_dir, cfg = tmp_path / "state", tmp_path / "empty.toml"
    cfg.write_text("")
    write_state(state_dir, aarch64_record())
    res = subprocess.run(
        sandbox.command([sys.executable, "-c", IMPORTS, str(state_dir), str(cfg)]),
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["0 qemu-aarch64", "True"]


def test_restore_command_fails_when_an_entry_cannot_be_restored(tmp_path: Path) -> None:
    if SANDBOX_REASON:
        pytest.skip(SANDBOX_REASON)
    state_dir, cfg = tmp_path / "state", tmp_path / "empty.toml"
    cfg.write_text("")
    missing = AARCH64.rule("/nonexistent/qemu-aarch64-static")  # F: opened at registration
    write_state(state_dir, Record(missing), s390x_record())
    script = (
        '"$0" restore --state-dir "$1" --config "$2"; echo "rc=$?"; ls /proc/sys/fs/binfmt_misc'
    )
    res = subprocess.run(
        sandbox.command(["sh", "-c", script, QUSD, str(state_dir), str(cfg)]),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    lines = res.stdout.split()
    assert lines[0] == "rc=1", res.stderr
    assert sorted(lines[1:]) == ["qemu-s390x", "register", "status"]  # the rest was restored
    assert "could not restore qemu-aarch64" in res.stderr
    assert "restore: restored 1, adopted 0, 1 failed" in res.stderr
    # the record is kept for the next attempt, not dropped
    assert set(state_records(state_dir)) == {"qemu-aarch64", "qemu-s390x"}


def test_bad_settings_stop_the_daemon_before_it_does_anything(tmp_path: Path) -> None:
    if SANDBOX_REASON:
        pytest.skip(SANDBOX_REASON)
    cfg = tmp_path / "qusd.toml"
    cfg.write_text("reconcile_interval = -1\n")
    base = ["--state-dir", str(tmp_path / "state"), "--socket", str(tmp_path / "s.sock")]
    for argv, message in [
        ([*base, "--config", str(tmp_path / "missing.toml")], "missing.toml does not exist"),
        ([*base, "--config", str(cfg)], "reconcile_interval must be >= 0 seconds"),
    ]:
        res = subprocess.run(
            sandbox.command([QUSD, "restore", *argv]),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert res.returncode == 78, res.stderr
        assert res.stderr.startswith("qusd: ") and message in res.stderr
    assert not (tmp_path / "state").exists()


# -- crashes and concurrency ------------------------------------------------------


def test_sigkill_during_a_burst_leaves_a_valid_state_that_restores(
    daemon: Daemon, spawn: Spawn
) -> None:
    interpreter("aarch64")
    register(daemon, *FOREIGN[:10])
    stop = threading.Event()
    results: list[tuple[str, int | None]] = []
    threads = [
        threading.Thread(
            target=hammer, args=(daemon.socket, seed, time.monotonic() + 30, stop, results)
        )
        for seed in range(8)
    ]
    for t in threads:
        t.start()
    time.sleep(0.3)
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    stop.set()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()
    done = [k for k, status in results if status is not None and status < 300]
    assert len(done) >= 10, Counter(results)
    assert any(s is None for _, s in results), "the kill landed in the middle of traffic"
    assert not [s for _, s in results if s is not None and s >= 500], Counter(results)

    doc = json.loads((daemon.state_dir / "state.json").read_bytes())
    assert doc["version"] == 1
    left = state_records(daemon.state_dir)  # loads with no warnings
    persistent = {n: (r.rule, r.enabled) for n, r in left.items() if r.persistent}
    assert os.path.exists(daemon.socket)  # a stale socket, which the next start replaces

    d2 = spawn(state_dir=daemon.state_dir)
    assert kernel_defs(d2) == persistent
    assert_kernel_matches_state(d2)


def test_fifty_concurrent_clients_get_no_5xx_and_kernel_matches_state(daemon: Daemon) -> None:
    interpreter("aarch64")
    stop = threading.Event()
    per_thread: list[list[tuple[str, int | None]]] = [[] for _ in range(50)]
    until = time.monotonic() + 3
    threads = [
        threading.Thread(target=hammer, args=(daemon.socket, seed, until, stop, per_thread[seed]))
        for seed in range(50)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    results = [r for rs in per_thread for r in rs]
    counts = Counter(results)
    assert {status for _, status in results} <= {200, 201, 204, 404, 409}, counts
    for kind, ok in [("register", 201), ("disable", 200), ("enable", 200), ("unregister", 204)]:
        assert counts[(kind, ok)] > 0, counts
    assert counts[("register", 409)] > 0, counts  # conflicts happened, and were refused whole
    assert all(per_thread), "every client got answers"
    assert_kernel_matches_state(daemon)
    log = daemon.log.read_text()
    assert "internal error" not in log and "Traceback" not in log


# -- corrupt state ------------------------------------------------------------------


def _record_json(**override: Any) -> dict[str, Any]:
    return {**aarch64_record().to_json(), **override}


CORRUPT = {
    "garbage": b"\x00\xff\xfe garbage {{{ \x80",
    "wrong-version": json.dumps({"version": 2, "registrations": []}).encode(),
    "invalid-name": json.dumps(
        {"version": 1, "registrations": [_record_json(name="a/b")]}
    ).encode(),
}


@pytest.mark.parametrize(
    "content",
    [
        *[pytest.param(v, id=k) for k, v in CORRUPT.items()],
        pytest.param(
            b"[" * 100_000,
            id="deeply-nested",
        ),
    ],
)
def test_corrupt_state_is_moved_aside_and_the_daemon_serves(
    spawn: Spawn, tmp_path: Path, content: bytes
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "state.json").write_bytes(content)

    d = spawn(state_dir=state_dir)
    assert d.client.get("/v1/registrations") == []
    aside = sorted(state_dir.glob("state.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert not (state_dir / "state.json").exists()
    warnings = d.client.get("/v1/status")["warnings"]
    assert len(warnings) == 1 and warnings[0]["code"] == "state"
    assert "corrupt" in warnings[0]["message"] and str(aside[0]) in warnings[0]["message"]
    assert f"moved to {aside[0]}" in d.log.read_text()
    # a fresh state is written next to it; the corrupt file stays for a human
    register(d, "arm64")
    assert set(state_records(state_dir)) == {"qemu-aarch64"}
    assert aside[0].read_bytes() == content


def test_state_write_failure_rolls_back_the_kernel(daemon: Daemon) -> None:
    interpreter("aarch64")
    register(daemon, "arm64")
    state_before = daemon.state_files()
    table_before = kernel_defs(daemon)
    # the journal and the snapshot's temp file name taken by directories:
    # every save fails, the journal's line and then the snapshot instead
    blocker = daemon.state_dir / f".state.json.{daemon.pid}.tmp"
    blocker.mkdir()
    journal = daemon.state_dir / "state.journal"
    journal.unlink()
    journal.mkdir()
    attempts: list[Callable[[], Any]] = [
        lambda: register(daemon, "s390x"),
        lambda: register(daemon, "arm64", flags="OC", replace=True),
        lambda: set_enabled(daemon, "qemu-aarch64", False),
        lambda: daemon.client.request("DELETE", "/v1/registrations/qemu-aarch64"),
        lambda: daemon.client.request("POST", "/v1/reset", {"scope": "all"}),
    ]
    for attempt in attempts:
        with pytest.raises(StateError) as info:
            attempt()
        assert info.value.details["status"] == 500
        assert "the change was rolled back" in info.value.message
        assert kernel_defs(daemon) == table_before
        assert daemon.state_files() == {"state.json": state_before["state.json"]}
    blocker.rmdir()
    journal.rmdir()
    register(daemon, "s390x")
    assert_kernel_matches_state(daemon)


# -- the socket ---------------------------------------------------------------------


def test_a_stale_socket_does_not_stop_the_next_start(daemon: Daemon, spawn: Spawn) -> None:
    interpreter("aarch64")
    register(daemon, "arm64")
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    assert stat.S_ISSOCK(os.lstat(daemon.socket).st_mode)  # left behind

    d2 = spawn(state_dir=daemon.state_dir)
    assert f"removed stale socket {d2.socket}" in d2.log.read_text()
    assert [r["name"] for r in d2.client.get("/v1/registrations")] == ["qemu-aarch64"]


def test_a_second_daemon_on_the_same_socket_refuses_to_start(daemon: Daemon) -> None:
    interpreter("aarch64")
    register(daemon, "arm64")
    before = daemon.client.get("/v1/registrations")
    res = subprocess.run(daemon.argv, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 75, res.stderr
    assert f"qusd: another daemon is serving on {daemon.socket}; stop it first" in res.stderr
    # the first one keeps serving, on the same socket, and still changes things
    assert daemon.proc.poll() is None
    assert stat.S_ISSOCK(os.lstat(daemon.socket).st_mode)
    assert daemon.client.get("/v1/registrations") == before
    register(daemon, "s390x")
    assert set(kernel_defs(daemon)) == {"qemu-aarch64", "qemu-s390x"}


def test_a_refused_second_daemon_leaves_the_state_file_alone(daemon: Daemon) -> None:
    interpreter("aarch64")
    register(daemon, "arm64")
    register(daemon, "s390x", persistent=False)
    before = daemon.state_files()
    res = subprocess.run(daemon.argv, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 75, res.stderr
    # the first daemon still manages qemu-s390x; its record must still be there
    assert set(state_records(daemon.state_dir)) == {"qemu-aarch64", "qemu-s390x"}
    assert daemon.state_files() == before


def test_a_file_that_is_not_a_socket_is_not_removed(tmp_path: Path) -> None:
    if SANDBOX_REASON:
        pytest.skip(SANDBOX_REASON)
    sock = tmp_path / "qusd.sock"
    sock.write_text("precious\n")
    cfg = tmp_path / "empty.toml"
    cfg.write_text("")
    argv = [QUSD, "--sandbox", "--socket", str(sock), "--state-dir", str(tmp_path / "state"),
            "--config", str(cfg)]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 75
    assert f"{sock} exists and is not a socket" in res.stderr
    assert sock.read_text() == "precious\n"


def test_a_socket_nobody_listens_on_is_replaced(spawn: Spawn, tmp_path: Path) -> None:
    # a socket file nobody listens on (bound, never listened, closed)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "qusd.sock"))
    s.close()
    d = spawn()
    assert d.client.get("/v1/health") == {"status": "ok"}
    assert "removed stale socket" in d.log.read_text()


# -- keep-alive and conflicts -------------------------------------------------------


def test_keep_alive_brings_back_persistent_entries(spawn: Spawn) -> None:
    interpreter("aarch64")
    d = spawn("--reconcile-interval", "0.2")
    register(d, "arm64", "s390x")
    set_enabled(d, "qemu-s390x", False)
    register(d, "ppc64le", persistent=False)
    want = {n: v for n, v in kernel_defs(d).items() if n != "qemu-ppc64le"}

    d.inside.kernel.remove("qemu-aarch64")  # one entry removed by hand
    wait_for(lambda: "qemu-aarch64" in d.inside.kernel.names(), "qemu-aarch64 back")
    d.inside.kernel.remove_all()  # the whole table flushed, as systemd-binfmt does
    wait_for(lambda: len(d.inside.kernel.names()) >= 2, "the persistent entries back")
    time.sleep(0.6)  # three more rounds: the non-persistent one stays away
    assert kernel_defs(d) == want  # s390x back disabled, ppc64le not back
    assert "qemu-ppc64le" not in state_records(d.state_dir)
    assert_kernel_matches_state(d)
    assert "they had been removed from the kernel" in d.log.read_text()


def test_keep_alive_leaves_a_foreign_definition_alone_and_reports_it(
    spawn: Spawn, tmp_path: Path
) -> None:
    """An entry qusd does not keep (not an admin's: a user's, or one from
    before qusd kept admins' entries) defers to another definition."""
    interpreter("aarch64")
    write_state(tmp_path / "state", aarch64_record())  # kept: no
    d = spawn("--reconcile-interval", "0.2")
    ours = d.inside.kernel.entry("qemu-aarch64").rule()
    d.inside.func("tests.test_daemon:swap_in", foreign_aarch64())

    def conflict_reported() -> bool:
        return any(w["code"] == "conflict" for w in d.client.get("/v1/status")["warnings"])

    wait_for(conflict_reported, "a conflict warning in /v1/status")
    time.sleep(0.6)  # more rounds: still left alone, reported once
    assert d.inside.kernel.entry("qemu-aarch64").rule() == foreign_aarch64().normalized()
    (warning,) = d.client.get("/v1/status")["warnings"]
    assert "qemu-aarch64 is in the kernel with another definition" in warning["message"]
    assert "/opt/other/qemu-aarch64" in warning["message"]
    reg = d.client.get("/v1/registrations/qemu-aarch64")
    assert (reg["managed"], reg["persistent"]) == (False, False)
    assert state_records(d.state_dir)["qemu-aarch64"].rule == ours  # the record is kept
    assert d.log.read_text().count("qemu-aarch64 is in the kernel with another definition") == 1

    # once the other tool's entry is gone, ours comes back and the warning clears
    d.inside.kernel.remove("qemu-aarch64")
    wait_for(lambda: not conflict_reported(), "the conflict warning cleared")
    assert kernel_defs(d) == {"qemu-aarch64": (ours, True)}


def flush_and_reregister(rule: Rule) -> None:
    """Runs inside a sandbox: what systemd-binfmt does at boot and restart,
    flush the whole table and register its binfmt.d rules."""
    from qusd.binfmt import BinfmtMisc  # noqa: PLC0415

    kernel = BinfmtMisc()
    kernel.remove_all()
    kernel.register(rule)


def test_replace_makes_qusd_keep_the_name(spawn: Spawn) -> None:
    """A distribution's binfmt.d rule (Debian's qemu-user-static) holds
    qemu-aarch64; an admin replaces it through qusd: from then on qusd takes
    the name back whenever systemd-binfmt puts the other definition back."""
    interpreter("aarch64")
    d = spawn("--reconcile-interval", "0.2")
    d.inside.kernel.register(foreign_aarch64())
    with pytest.raises(QusdError, match="replace it explicitly"):
        register(d, "arm64")
    register(d, "arm64", replace=True)
    ours = d.inside.kernel.entry("qemu-aarch64").rule()
    assert ours != foreign_aarch64().normalized()
    assert state_records(d.state_dir)["qemu-aarch64"].owned is True

    d.inside.func("tests.test_daemon:flush_and_reregister", foreign_aarch64())
    wait_for(lambda: d.inside.kernel.entry("qemu-aarch64").rule() == ours, "qusd took it back")
    assert "took back qemu-aarch64 from another definition" in d.log.read_text()
    assert d.client.get("/v1/status")["warnings"] == []
    reg = d.client.get("/v1/registrations/qemu-aarch64")
    assert (reg["managed"], reg["persistent"]) == (True, True)


def test_a_conflict_found_at_start_is_reported_and_left_alone(
    daemon: Daemon, sbx: Sandbox, tmp_path: Path
) -> None:
    interpreter("aarch64")
    assert daemon.stop() == 0
    write_state(daemon.state_dir, aarch64_record(), s390x_record())  # not kept: they defer
    ours = state_records(daemon.state_dir)["qemu-aarch64"].rule

    sbx.kernel.register(foreign_aarch64())  # a fresh table with another tool's qemu-aarch64
    d = EnteredDaemon(sbx, tmp_path, "--reconcile-interval", "0", state_dir=daemon.state_dir)
    try:
        log = d.log.read_text()
        assert "restore: restored 1, adopted 0, 1 in conflict" in log
        assert log.index("qemu-aarch64 is in the kernel with another definition") < log.index(
            "serving on"
        )
        assert sbx.kernel.entry("qemu-aarch64").rule() == foreign_aarch64().normalized()
        assert (
            sbx.kernel.entry("qemu-s390x").rule() == state_records(d.state_dir)["qemu-s390x"].rule
        )
        status = d.client.get("/v1/status")
        assert status["sandbox"] is None  # this daemon made no sandbox: it entered ours
        assert [w["code"] for w in status["warnings"]] == ["conflict"]
        regs = {r["name"]: r for r in d.client.get("/v1/registrations")}
        assert regs["qemu-aarch64"]["managed"] is False
        assert regs["qemu-s390x"]["managed"] is True
        assert state_records(d.state_dir)["qemu-aarch64"].rule == ours  # kept, not dropped
    finally:
        d.stop()


def test_registering_again_after_an_external_removal_keeps_state_in_step(
    spawn: Spawn,
) -> None:
    interpreter("aarch64")
    d = spawn("--reconcile-interval", "0")
    register(d, "arm64")
    set_enabled(d, "qemu-aarch64", False)
    d.inside.kernel.remove("qemu-aarch64")  # another tool
    reply = register(d, "arm64")
    assert reply["registered"][0]["enabled"] is True
    assert_kernel_matches_state(d)


# -- the state file -------------------------------------------------------------------


def test_state_file_is_replaced_atomically_with_mode_0644(tmp_path: Path) -> None:
    if SANDBOX_REASON:
        pytest.skip(SANDBOX_REASON)
    interpreter("aarch64")
    old = os.umask(0o022)  # the daemon inherits it, as from systemd
    try:
        d = Daemon(tmp_path)
    finally:
        os.umask(old)
    try:
        register(d, "arm64", "s390x")
        set_enabled(d, "qemu-s390x", False)
        register(d, "ppc64le", persistent=False)
        d.client.request("DELETE", "/v1/registrations/qemu-aarch64")
        # no temp file left (binfmt.conf follows half a second later: test_handoff.py)
        left = sorted(set(os.listdir(d.state_dir)) - {"binfmt.conf"})
        assert left == [".lock", "state.journal", "state.json"]
        for name in ("state.json", "state.journal"):
            assert stat.S_IMODE(os.stat(d.state_dir / name).st_mode) == 0o644
        assert json.loads((d.state_dir / "state.json").read_text())["version"] == 1
        assert [
            (r.rule.name, r.enabled, r.persistent) for r in state_records(d.state_dir).values()
        ] == [
            ("qemu-s390x", False, True),
            ("qemu-ppc64le", True, False),
        ]
        assert_kernel_matches_state(d)
    finally:
        d.stop(signal.SIGKILL)
