"""`make run`'s script: the daemon in a sandbox and the walk-through it prints."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

from qusd.client import Client
from qusd.errors import QusdError
from tests.conftest import ROOT, busybox_path, needs_sandbox


def start(run_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["sh", "tools/run.sh"],
        cwd=ROOT,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "RUN_DIR": str(run_dir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_healthy(sock: Path, proc: subprocess.Popen[str]) -> None:
    client = Client(str(sock), timeout=5)
    for _ in range(300):
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if client.get("/v1/health") == {"status": "ok"}:
                return
        except QusdError:
            time.sleep(0.05)
    raise AssertionError("the daemon did not answer")


def printed_commands(banner: str) -> list[list[str]]:
    """The commands the banner tells the user to paste, as argv lists."""
    text = banner.replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines()]
    return [shlex.split(ln) for ln in lines if re.match(r"^(curl|/\S+/qusctl) ", ln)]


@needs_sandbox
def test_make_run_walk_through(tmp_path: Path) -> None:
    busybox_path("arm64")  # the walk-through runs it
    sock = tmp_path / "qusd.sock"
    proc = start(tmp_path)
    wait_healthy(sock, proc)
    proc.send_signal(signal.SIGINT)
    banner, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, banner
    commands = printed_commands(banner)
    assert [c[0].rsplit("/", 1)[-1] for c in commands] == ["curl", "curl", "qusctl", "qusctl"]

    proc = start(tmp_path)
    wait_healthy(sock, proc)
    outputs = [
        subprocess.run(c, capture_output=True, text=True, timeout=30, check=True).stdout
        for c in commands
    ]
    assert json.loads(outputs[0]) == []
    assert [r["name"] for r in json.loads(outputs[1])["registered"]] == ["qemu-aarch64"]
    assert outputs[2].split()[:7] == ["NAME", "ENABLED", "TARGET", "FLAGS", "QUSD", "INTERPRETER",
                                      "qemu-aarch64"]  # fmt: skip
    assert outputs[3].strip() == "aarch64"
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, log
    assert "stopped; the sandbox's registrations go away with it" in log

    # the next start restores it, in a new sandbox
    proc = start(tmp_path)
    wait_healthy(sock, proc)
    regs = Client(str(sock)).get("/v1/registrations")
    assert [(r["name"], r["persistent"]) for r in regs] == [("qemu-aarch64", True)]
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=30)
    assert "restore: restored 1, adopted 0" in log
