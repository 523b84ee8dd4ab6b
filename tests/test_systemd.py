"""systemd integration: the units, socket activation, notify and watchdog."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qusd import catalog
from qusd.client import Client
from qusd.errors import QusdError
from qusd.state import Record, State
from tests.conftest import ROOT, SANDBOX_REASON, Sandbox, interpreter

UNITS = ROOT / "systemd"
QUSD = str(Path(sys.executable).parent / "qusd")
QUSCTL = str(Path(sys.executable).parent / "qusctl")


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian's systemd package)")
    return path


def units_for_this_checkout(tmp_path: Path) -> list[Path]:
    """The units with ExecStart pointing at this checkout's qusd (verify
    checks that the program exists)."""
    out = []
    for name in ("qusd.service", "qusd.socket"):
        text = (UNITS / name).read_text()
        out.append(tmp_path / name)
        text = text.replace("ExecReload=/usr/bin/qusctl", f"ExecReload={QUSCTL}")
        out[-1].write_text(text.replace("ExecStart=/usr/bin/qusd", f"ExecStart={QUSD}"))
    return out


def test_units_verify(tmp_path: Path) -> None:
    need("systemd-analyze")
    service = (UNITS / "qusd.service").read_text()
    assert "ExecStart=/usr/bin/qusd serve" in service
    assert re.search(r"^Type=notify$", service, re.M)
    assert re.search(r"^WatchdogSec=\d+", service, re.M)
    assert re.search(r"^After=.*systemd-binfmt\.service", service, re.M)
    assert re.search(r"^Before=.*docker\.service.*containerd\.service", service, re.M)
    res = subprocess.run(
        ["systemd-analyze", "verify", *map(str, units_for_this_checkout(tmp_path))],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr.strip() == "", res.stderr


def test_security_exposure_is_low(tmp_path: Path) -> None:
    need("systemd-analyze")
    service = units_for_this_checkout(tmp_path)[0]
    res = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(service)],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    m = re.search(r"Overall exposure level for qusd\.service: (\d+\.\d+)", res.stdout)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= 2.5, res.stdout


def test_sysusers_and_tmpfiles(tmp_path: Path) -> None:
    need("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    res = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(UNITS / "qusd.sysusers")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    groups = (tmp_path / "etc" / "group").read_text()
    assert re.search(r"^qusd:x:\d+:$", groups, re.M)
    assert re.search(r"^qusd-admin:x:\d+:$", groups, re.M)
    need("systemd-tmpfiles")
    res = subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(UNITS / "qusd.tmpfiles")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "var/lib/qusd").is_dir() and (tmp_path / "run/qusd").is_dir()


def _persistent_state(state_dir: Path) -> None:
    rule = catalog.builtin().get("aarch64").rule(interpreter("aarch64"))
    State(state_dir).save({rule.name: Record(rule, persistent=True, target="aarch64")})


@pytest.mark.skipif(SANDBOX_REASON is not None, reason=SANDBOX_REASON or "")
def test_socket_activation(tmp_path: Path) -> None:
    activate = need("systemd-socket-activate")
    _persistent_state(tmp_path / "state")
    (tmp_path / "qusd.toml").write_text("")
    sock = tmp_path / "qusd.sock"
    log = (tmp_path / "log").open("wb")
    proc = subprocess.Popen(
        [activate, "-l", str(sock), QUSD, "--sandbox", "--state-dir", str(tmp_path / "state"),
         "--config", str(tmp_path / "qusd.toml")],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.02)
        # the first connection starts the daemon, which answers on systemd's socket
        regs = Client(str(sock), timeout=30).get("/v1/registrations")
        assert [(r["name"], r["persistent"]) for r in regs] == [("qemu-aarch64", True)]
        status = Client(str(sock)).get("/v1/status")
        assert status["sandbox"]["pid"] == proc.pid  # socket-activate exec'd qusd
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        text = (tmp_path / "log").read_text()
        assert f"using the socket systemd passed ({sock})" in text
        assert "restored qemu-aarch64" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.skipif(SANDBOX_REASON is not None, reason=SANDBOX_REASON or "")
def test_notify_ready_after_restore_status_and_watchdog(tmp_path: Path) -> None:
    _persistent_state(tmp_path / "state")
    (tmp_path / "qusd.toml").write_text("")
    notify_path = tmp_path / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(20)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="200000")
    env.pop("WATCHDOG_PID", None)
    log = (tmp_path / "log").open("wb")
    proc = subprocess.Popen(
        [QUSD, "--sandbox", "--socket", str(tmp_path / "qusd.sock"), "--state-dir",
         str(tmp_path / "state"), "--config", str(tmp_path / "qusd.toml")],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    inside: Sandbox | None = None
    try:
        ready = notify.recv(4096).decode()
        # READY=1 is the first message, and the registrations already exist
        lines = dict(line.split("=", 1) for line in ready.splitlines())
        assert lines["READY"] == "1"
        assert lines["MAINPID"] == str(proc.pid)
        assert lines["STATUS"] == f"restored 1, adopted 0; serving on {tmp_path / 'qusd.sock'}"
        inside = Sandbox(enter=proc.pid)
        assert inside.kernel.names() == ["qemu-aarch64"]
        # and the socket answers
        assert Client(str(tmp_path / "qusd.sock")).get("/v1/health") == {"status": "ok"}

        notify.setblocking(False)  # drop the pings queued meanwhile
        with contextlib.suppress(BlockingIOError):
            while True:
                notify.recv(4096)
        notify.settimeout(20)
        pings: list[float] = []
        start = time.monotonic()
        while len(pings) < 5:
            msg = notify.recv(4096).decode()
            if msg == "WATCHDOG=1":
                pings.append(time.monotonic())
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert all(0.05 < g < 0.5 for g in gaps), gaps  # every WatchdogSec/2 = 0.1 s
        assert time.monotonic() - start < 5

        proc.send_signal(signal.SIGTERM)
        seen: list[str] = []
        while "STOPPING=1" not in seen:
            seen += notify.recv(4096).decode().splitlines()
        assert "STATUS=stopping" in seen
        assert proc.wait(timeout=30) == 0
    finally:
        if inside is not None:
            inside.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        log.close()


def test_no_systemd_means_no_notify_and_stderr_logging(tmp_path: Path) -> None:
    """Outside systemd: no NOTIFY_SOCKET, plain lines on stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
    res = subprocess.run(
        [QUSD, "restore", "--state-dir", str(tmp_path / "state"), "--binfmt-path",
         str(tmp_path / "nowhere"), "--config", os.devnull],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert res.stderr.startswith("qusd: "), res.stderr


def test_journal_fields_when_stderr_is_the_journal() -> None:
    """With JOURNAL_STREAM naming our stderr, records go to the journal with
    MESSAGE_ID per event kind."""
    code = r"""
import logging, os, sys
st = os.fstat(2)
os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
sent = []
import systemd.journal
from qusd import systemd_glue
from qusd.events import journal_fields, MESSAGE_IDS
systemd_glue.setup_logging("info")
handler = logging.getLogger().handlers[0]
assert isinstance(handler, systemd.journal.JournalHandler), handler
handler.send = lambda MESSAGE, **kw: sent.append((MESSAGE, kw))
logging.getLogger("qusd.service").info("registered x", extra=journal_fields("registered"))
msg, fields = sent[0]
assert msg == "registered x", msg
assert fields["MESSAGE_ID"] == MESSAGE_IDS["registered"]
assert fields["QUSD_EVENT"] == "registered"
assert fields["SYSLOG_IDENTIFIER"] == "qusd"
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.stdout.strip() == "ok", res.stderr


def test_client_sees_the_socket_activated_daemon_gone_after_stop(tmp_path: Path) -> None:
    """A socket file with nobody behind it is a clear 'not running' error."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "dead.sock"))
    sock.close()
    with pytest.raises(QusdError, match="nothing listens on"):
        Client(str(tmp_path / "dead.sock")).get("/v1/health")
