"""Shared fixtures: sandboxes with a private binfmt_misc, and foreign programs.

Every kernel test runs in its own sandbox (a user + mount namespace that
mounted its own binfmt_misc instance): the real kernel, never the host's
table. A session-wide guard checks that the host's table is unchanged.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from qusd import sandbox
from qusd.binfmt import DEFAULT_PATH, BinfmtMisc, Entry
from qusd.client import Client
from qusd.errors import QusdError
from tests import worker

ROOT = Path(__file__).resolve().parent.parent
FOREIGN_DIR = Path(os.environ.get("QUSD_FOREIGN_DIR", ROOT / ".cache" / "foreign"))
#: Debian architecture -> what `uname -m` prints under emulation
FOREIGN_ARCHS = {
    "arm64": "aarch64",
    "armhf": "armv7l",
    "armel": "armv7l",
    "ppc64el": "ppc64le",
    "s390x": "s390x",
    "mips64el": "mips64",
    "i386": os.uname().machine,
}
#: Debian architecture -> the QEMU target that runs it
DEBIAN_TARGET = {
    "arm64": "aarch64",
    "armhf": "arm",
    "armel": "arm",
    "ppc64el": "ppc64le",
    "s390x": "s390x",
    "mips64el": "mips64el",
    "i386": "i386",
}
STATIC_DIR = "/usr/bin"

SANDBOX_REASON = sandbox.unsupported_reason()
needs_sandbox = pytest.mark.skipif(SANDBOX_REASON is not None, reason=SANDBOX_REASON or "")


def busybox_path(arch: str) -> Path:
    path = FOREIGN_DIR / arch / "busybox"
    if not path.exists():
        pytest.skip(f"{path} is missing: `make test` fetches it (tools/fetch-foreign.sh)")
    return path


def interpreter(cpu: str) -> str:
    path = f"{STATIC_DIR}/qemu-{cpu}-static"
    if not os.path.exists(path):
        pytest.skip(f"{path} is missing: install Debian's qemu-user-static")
    return path


class Sandbox:
    """A sandbox kept alive by a worker process; calls run inside it."""

    def __init__(self, binfmt_path: str = DEFAULT_PATH, enter: int | None = None) -> None:
        """A new sandbox, or (enter=PID) a worker inside the sandbox of PID."""
        self.binfmt_path = binfmt_path
        self.entered = enter
        argv = [sys.executable, "-m", "tests.worker", binfmt_path]
        cmd = (
            sandbox.command(argv, binfmt_path)
            if enter is None
            else sandbox.enter_command(enter, argv)
        )
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in: IO[bytes] = self.proc.stdin
        self._out: IO[bytes] = self.proc.stdout
        hello = worker.read_frame(self._out)
        if hello != ("ready", None):
            self.proc.wait()
            raise RuntimeError(f"sandbox worker did not start: {hello!r}")
        self.kernel = _KernelProxy(self)

    @property
    def pid(self) -> int:
        """A process in the sandbox: the worker, or the one it joined."""
        return self.entered if self.entered is not None else self.proc.pid

    def call(self, kind: str, name: str, *args: Any, **kwargs: Any) -> Any:
        worker.write_frame(self._in, (kind, name, args, kwargs))
        reply = worker.read_frame(self._out)
        if reply is None:
            raise RuntimeError("sandbox worker died")
        status, value = reply
        if status == "ok":
            return value
        if status == "qusd":
            module, cls_name, reason, field, details = value
            cls = getattr(importlib.import_module(module), cls_name)
            raise cls(reason, field=field, **details)
        raise AssertionError(f"inside the sandbox: {value}")

    def func(self, qualname: str, *args: Any, **kwargs: Any) -> Any:
        """Call module:function inside the sandbox."""
        return self.call("func", qualname, *args, **kwargs)

    def run(
        self, argv: Sequence[str | os.PathLike[str]], **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the sandbox and capture its output."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 60)
        cmd = sandbox.enter_command(self.pid, [str(a) for a in argv])
        return subprocess.run(cmd, check=False, **kwargs)

    def close(self) -> None:
        self._in.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


class _KernelProxy:
    """Looks like a BinfmtMisc; every method runs inside the sandbox."""

    def __init__(self, box: Sandbox) -> None:
        self._box = box

    def __getattr__(self, name: str) -> Any:
        if not callable(getattr(BinfmtMisc, name, None)):
            raise AttributeError(name)
        return lambda *a, **kw: self._box.call("kernel", name, *a, **kw)


def wait_for(
    pred: Callable[[], object],
    what: str,
    timeout: float = 10,
    explain: Callable[[], str] | None = None,
) -> None:
    """Poll pred until it holds; fail naming what did not happen in time (and
    what explain() says of the moment, when given)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}" + (f"\n{explain()}" if explain else ""))
        time.sleep(0.05)


@pytest.fixture
def sbx() -> Iterator[Sandbox]:
    """A fresh sandbox with an empty private binfmt_misc."""
    if SANDBOX_REASON:
        pytest.skip(SANDBOX_REASON)
    box = Sandbox()
    try:
        yield box
    finally:
        box.close()


def _host_entries() -> list[str] | None:
    try:
        return sorted(os.listdir(DEFAULT_PATH)) if BinfmtMisc().is_mounted() else None
    except OSError:
        return None


@pytest.fixture(scope="session", autouse=True)
def host_table_untouched() -> Iterator[None]:
    """No test may change the host's binfmt_misc table."""
    before = _host_entries()
    yield
    assert _host_entries() == before, "the host's binfmt_misc table changed during the tests"


def run_as(
    uid: int, gid: int, argv: Sequence[str], **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run argv as another user (needs root): setpriv from util-linux."""
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is required"
    cmd = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *argv]
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("timeout", 60)
    return subprocess.run(cmd, check=False, **kwargs)


NOBODY = 65534


@contextlib.contextmanager
def open_dir(prefix: str, parent: str = "/tmp") -> Iterator[Path]:
    """A fresh root-owned directory of mode 0755 under parent, removed
    after: every user may traverse it (pytest's tmp_path is 0700); under
    /run or /opt the trust checks accept what it holds (/tmp is
    world-writable)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory every user can traverse, for a daemon and its socket."""
    with open_dir("qusdt-") as path:
        yield path


def write_settings(workdir: Path, **settings: object) -> None:
    """workdir/qusd.toml with these [qusd] settings (each value written as
    JSON, which TOML reads alike for strings, numbers, booleans and lists)."""
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    (workdir / "qusd.toml").write_text("[qusd]\n" + "\n".join(lines) + "\n")


def python_for(uid: int) -> str:
    """A Python that uid may execute: ours, or the system's (the venv may
    live under a home directory closed to others)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        if run_as(uid, uid, [candidate, "-c", "pass"]).returncode == 0:
            return candidate
    pytest.skip(f"no Python that uid {uid} may run")


class Daemon:
    """`qusd --sandbox` as a subprocess, with its socket and state in a
    directory of the test's; `inside` is a worker in the daemon's sandbox."""

    def __init__(
        self,
        workdir: Path,
        *extra: str,
        state_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.socket = str(workdir / "qusd.sock")
        self.state_dir = state_dir or workdir / "state"
        self.config = workdir / "qusd.toml"
        if not self.config.exists():
            self.config.write_text("# empty: built-in defaults\n")
        self.log = workdir / f"qusd-{len(list(workdir.glob('qusd-*.log')))}.log"
        self.argv = [
            str(Path(sys.executable).parent / "qusd"),
            "--sandbox",
            "--socket", self.socket,
            "--state-dir", str(self.state_dir),
            "--config", str(self.config),
            "--log-level", "debug",
            *extra,
        ]  # fmt: skip
        self._log = self.log.open("wb")
        env = dict(os.environ if env is None else env)
        if "interpreter_store" not in self.config.read_text():
            # never the machine's /var/lib/qusd: no store, unless a test sets one
            env.setdefault("QUSD_INTERPRETER_STORE", "")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.client = Client(self.socket, timeout=30)
        self._inside: Sandbox | None = None
        self.wait_ready()

    def probe(self) -> bool:
        """One request once the socket may answer: True when qusd serves."""
        return bool(self.client.get("/v1/health") == {"status": "ok"})

    def wait_ready(self, timeout: float = 30) -> None:
        """Probe until qusd serves; an HTTP error answer is a failure."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qusd exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                if self.probe():
                    return
            except QusdError as e:
                if "status" in e.details:  # it answered, with an error
                    raise
            time.sleep(0.02)
        raise RuntimeError(f"qusd did not answer in {timeout}s: {self.log.read_text()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def inside(self) -> Sandbox:
        """A worker in the daemon's sandbox: .kernel sees the daemon's table."""
        if self._inside is None:
            self._inside = Sandbox(enter=self.pid)
        return self._inside

    def state_files(self) -> dict[str, bytes]:
        """The bytes of the state's snapshot and journal, to show a change
        wrote nothing."""
        files = sorted(self.state_dir.glob("state.j*"))
        return {p.name: p.read_bytes() for p in files if p.is_file()}

    def table(self) -> list[Entry]:
        """The kernel's entries, as the daemon's sandbox sees them."""
        entries: list[Entry] = self.inside.kernel.entries()
        return entries

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self._inside is not None:
            self._inside.close()
            self._inside = None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=30)
        finally:
            self._log.close()
        return code


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A running `qusd --sandbox` with an empty table and state."""
    if SANDBOX_REASON:
        pytest.skip(SANDBOX_REASON)
    d = Daemon(tmp_path)
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)


@dataclass(frozen=True)
class Shared:
    """Where other users find this checkout's code, its Python packages and
    the foreign programs."""

    root: Path

    @property
    def pythonpath(self) -> str:
        return f"{self.root}:{self.root / 'site'}"

    def busybox(self, arch: str) -> Path:
        busybox_path(arch)  # skips, with the reason, if it was never fetched
        return self.root / "foreign" / arch / "busybox"


@pytest.fixture(scope="session")
def shared() -> Iterator[Shared]:
    """Tests that run code as other users need it where they can read it: the
    checkout (and the venv in it) may sit in a directory closed to them, so a
    copy goes to a fresh directory under /tmp, removed at the end."""
    if os.getuid() != 0:
        pytest.skip("switching to another user needs root (the tests run as they are)")
    root = Path(tempfile.mkdtemp(prefix="qusd-shared-", dir="/tmp"))
    try:
        root.chmod(0o755)
        junk = shutil.ignore_patterns("__pycache__", "__editable__*", "*.pth")
        shutil.copytree(ROOT / "qusd", root / "qusd", ignore=junk)
        shutil.copytree(sysconfig.get_paths()["purelib"], root / "site", ignore=junk)
        if FOREIGN_DIR.is_dir():
            shutil.copytree(FOREIGN_DIR, root / "foreign")
        yield Shared(root)
    finally:
        shutil.rmtree(root)


# -- no skip on CI ----------------------------------------------------------------------

_SKIPPED: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With QUSD_NO_SKIPS=1 (`make test`, so CI), a skip fails the run: every
    prerequisite a skip names is something the Makefile must provide."""
    if os.environ.get("QUSD_NO_SKIPS") == "1" and _SKIPPED:
        print(f"\nQUSD_NO_SKIPS: {len(_SKIPPED)} skipped, which fails the run:", file=sys.stderr)
        for nodeid in _SKIPPED:
            print(f"  {nodeid}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
