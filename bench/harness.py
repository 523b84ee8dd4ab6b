"""What every benchmark shares: qusd in a sandbox, the bare aiohttp app it
is measured against, a load client, and the figures.

Each benchmark runs qusd and its baseline alternately, round after round,
in one run, and prints medians and ratios: on a shared machine a ratio
measured this way moves much less than either figure. Nothing here is a
test: `make bench` runs the scripts, `make test` never does.

The load client is our own (wrk speaks TCP only): one thread, epoll, one
request in flight per connection, keep-alive, every latency recorded.
"""

from __future__ import annotations

import compileall
import contextlib
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qusd import catalog, interpreters
from qusd.binfmt import Rule
from qusd.state import Record, State

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
QUSD = str(BIN / "qusd")
MiB = 1024 * 1024

# Byte code as an installed qusd has it (the Debian package compiles it at
# install): a start must not be measured compiling modules, whatever
# PYTHONDONTWRITEBYTECODE says.
compileall.compile_dir(str(ROOT / "qusd"), quiet=1)


# -- rules and state ---------------------------------------------------------------


def foreign_rules(flags: str = "F") -> list[Rule]:
    """A rule for every foreign catalog target with an interpreter here
    (31 on an x86_64 host with Debian's qemu-user-static): what a host that
    emulates everything has."""
    cat = catalog.builtin()
    family = catalog.family_of(catalog.host_machine())
    return [t.rule(f.path, flags) for t in cat.foreign(family) if (f := interpreters.find(t))]


def filler_rules(count: int, interpreter: str = "/usr/bin/qemu-aarch64-static") -> list[Rule]:
    """count extension rules (bench-0000, ...): a big table of custom
    entries, as an admin's imports make one."""
    return [Rule(f"bench-{i:04d}", interpreter, extension=f"b{i:04d}") for i in range(count)]


def write_state(directory: Path, rules: Sequence[Rule]) -> None:
    """A state directory whose records qusd restores at start (an admin's
    persistent entries, as `qusctl register` leaves them)."""
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    State(directory).save({r.name: Record(r, persistent=True, owned=True) for r in rules})


# -- processes ---------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """A process's resident set (VmRSS), KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_socket(path: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Until a GET /v1/health on path answers (any status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited {proc.returncode}")
        try:
            request(path, "GET", "/v1/health")
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"nothing answered on {path} in {timeout}s")


class Server:
    """A server process on a Unix socket: qusd, or the bare app."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        sock: str,
        env: dict[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        self.name = name
        self.socket = sock
        self.log = log
        out = log.open("wb") if log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        if log is not None:
            assert not isinstance(out, int)
            out.close()
        wait_socket(sock, self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        return rss_kib(self.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_qusd(
    workdir: Path,
    rules: Sequence[Rule] = (),
    settings: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> Server:
    """`qusd --sandbox` (a private binfmt_misc: the host's table is never
    touched) with rules in its state, restored at start; settings go to its
    qusd.toml."""
    workdir.mkdir(parents=True, exist_ok=True)
    state = workdir / "state"
    write_state(state, rules)
    config = workdir / "qusd.toml"
    lines = ["[qusd]", 'interpreter_store = ""']  # never the machine's store
    for key, value in (settings or {}).items():
        lines.append(f"{key} = {json.dumps(value)}")
    config.write_text("\n".join(lines) + "\n")
    sock = str(workdir / "qusd.sock")
    argv = [
        QUSD,
        "--sandbox",
        "--socket",
        sock,
        "--state-dir",
        str(state),
        "--config",
        str(config),
        "--log-level",
        "warning",
    ]
    server = Server("qusd", argv, sock, env=env, log=workdir / "qusd.log")
    want = len(rules)
    got = len(request_json(sock, "GET", "/v1/registrations"))
    if got != want:
        raise RuntimeError(f"qusd restored {got} of {want} entries; see {workdir / 'qusd.log'}")
    return server


BARE_APP = """
import sys
from aiohttp import web
body = open(sys.argv[2], "rb").read()
async def serve(request):
    return web.Response(body=body, content_type="application/json")
app = web.Application()
for path in sys.argv[3:]:
    app.router.add_get(path, serve)
web.run_app(app, path=sys.argv[1], access_log=None, print=None)
"""


def start_bare(workdir: Path, body: bytes, paths: Sequence[str] = ("/v1/registrations",)) -> Server:
    """The baseline: a bare aiohttp app answering body on paths, on a Unix
    socket, with the same Python and aiohttp."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "body.json"
    data.write_bytes(body)
    sock = str(workdir / "bare.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    paths = list(paths) if "/v1/health" in paths else [*paths, "/v1/health"]
    argv = [sys.executable, "-c", BARE_APP, sock, str(data), *paths]
    return Server("bare aiohttp", argv, sock, log=workdir / "bare.log")


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="qusd-bench-") as tmp:
        yield Path(tmp)


# -- one request -------------------------------------------------------------------------


def request(
    path: str, method: str, target: str, body: bytes | None = None, timeout: float = 30
) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a fresh connection: (status, body)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(http_request(method, target, body, close=True))
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head[9:12]), rest


def request_json(path: str, method: str, target: str, doc: Any = None) -> Any:
    status, body = request(path, method, target, json.dumps(doc).encode() if doc else None)
    if status >= 400:
        raise RuntimeError(f"{method} {target}: {status} {body[:300]!r}")
    return json.loads(body) if body else None


def http_request(method: str, target: str, body: bytes | None = None, close: bool = False) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode() + (body or b"")


# -- load ----------------------------------------------------------------------------------


@dataclass
class Load:
    """What a load run saw."""

    requests: int
    seconds: float
    errors: int
    latencies_ns: list[int] = field(repr=False)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def percentile(self, p: float) -> float:
        """Latency at percentile p, ms."""
        if not self.latencies_ns:
            return float("nan")
        ordered = sorted(self.latencies_ns)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] / 1e6

    @property
    def worst(self) -> float:
        return max(self.latencies_ns, default=0) / 1e6


class _Conn:
    """One keep-alive connection with one request in flight."""

    __slots__ = ("buf", "need", "requests", "sent", "sock", "turn")

    def __init__(self, path: str, requests: Sequence[bytes], turn: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.buf = bytearray()
        self.need = -1
        self.sent = 0
        self.turn = turn % len(requests)
        self.requests = requests

    def send(self, now: int) -> None:
        self.sent = now
        self.sock.send(self.requests[self.turn])

    def answers(self, data: bytes) -> Iterator[bool]:
        """Each whole answer data completes: whether it was a success."""
        self.buf += data
        while True:
            if self.need < 0:
                head_end = self.buf.find(b"\r\n\r\n")
                if head_end < 0:
                    return
                head = bytes(self.buf[:head_end]).lower()
                at = head.find(b"content-length:")
                size = int(head[at + 15 : head.find(b"\r\n", at)]) if at >= 0 else 0
                self.need = head_end + 4 + size
            if len(self.buf) < self.need:
                return
            ok = self.buf[9] in b"23"
            del self.buf[: self.need]
            self.need = -1
            self.turn = (self.turn + 1) % len(self.requests)
            yield ok


def load(
    path: str,
    requests: Sequence[bytes],
    connections: int,
    seconds: float,
    *,
    warmup: float = 0.3,
    limit: int | None = None,
) -> Load:
    """Keep `connections` keep-alive connections busy, each sending the
    requests in turn (one in flight), for `seconds` after `warmup` (or until
    `limit` answers); every answer's latency is recorded."""
    conns = [_Conn(path, requests, i) for i in range(connections)]
    by_fd = {c.sock.fileno(): c for c in conns}
    ep = select.epoll()
    for fd in by_fd:
        ep.register(fd, select.EPOLLIN)
    got = Load(0, 0.0, 0, [])
    now = time.perf_counter_ns
    measuring_from = now() + int(warmup * 1e9)
    end = measuring_from + int(seconds * 1e9)
    for c in conns:
        c.send(now())
    try:
        while now() < end and (limit is None or got.requests < limit):
            for fd, _ in ep.poll(0.5):
                c = by_fd[fd]
                try:
                    data = c.sock.recv(1 << 18)
                except BlockingIOError:
                    continue
                if not data:
                    raise RuntimeError("the server closed a keep-alive connection")
                for ok in c.answers(data):
                    t = now()
                    if t >= measuring_from:
                        got.latencies_ns.append(t - c.sent)
                        got.requests += 1
                        got.errors += not ok
                    c.send(t)
    finally:
        for c in conns:
            c.sock.close()
        ep.close()
    got.seconds = (min(now(), end) - measuring_from) / 1e9
    return got


# -- figures -----------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def alternate(
    rounds: int, runs: dict[str, Callable[[], dict[str, float]]]
) -> dict[str, dict[str, list[float]]]:
    """Run each measurement once per round, in turn; every figure each
    returns, collected by measurement."""
    out: dict[str, dict[str, list[float]]] = {name: {} for name in runs}
    for r in range(rounds):
        for name, run in runs.items():
            for key, value in run().items():
                out[name].setdefault(key, []).append(value)
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return out


def show(title: str, rows: Sequence[Sequence[str]]) -> None:
    """A plain table, columns padded."""
    print(title)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)))


def span(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    """median [min-max]"""
    if not values:
        return "-"
    return f"{fmt.format(median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def machine() -> str:
    """Where the figures come from."""
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs ({cpu}), Linux "
        f"{os.uname().release}, Python {sys.version.split()[0]}"
    )
