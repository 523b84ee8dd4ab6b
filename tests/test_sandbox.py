"""Sandboxes: private tables, uid maps for root and for everyone else."""

from __future__ import annotations

import os
import subprocess

import pytest

from qusd import sandbox
from qusd.binfmt import BinfmtMisc
from qusd.errors import SandboxError
from tests.conftest import NOBODY, Sandbox, Shared, needs_sandbox, python_for, run_as


def test_old_kernels_get_a_clear_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "kernel_release", lambda: (6, 6))
    reason = sandbox.unsupported_reason()
    assert reason is not None and "Linux >= 6.7" in reason and "6.6" in reason
    with pytest.raises(SandboxError, match=r"private tables need Linux >= 6\.7"):
        sandbox.create()


def test_uid_map(sbx: Sandbox) -> None:
    res = sbx.run(["cat", "/proc/self/uid_map", "/proc/self/gid_map"])
    fields = [line.split() for line in res.stdout.splitlines()]
    if os.getuid() == 0:  # identity: real users keep their ids inside
        assert fields == [["0", "0", "4294967295"]] * 2
    else:
        assert fields == [["0", str(os.getuid()), "1"], ["0", str(os.getgid()), "1"]]


def test_sandbox_mount_does_not_reach_the_host(sbx: Sandbox) -> None:
    assert sbx.kernel.is_mounted()
    host = BinfmtMisc()
    inside = sbx.run(["stat", "-c", "%d", "/proc/sys/fs/binfmt_misc"]).stdout.strip()
    outside = str(os.stat(host.path).st_dev) if host.path.exists() else None
    assert inside != outside


@needs_sandbox
def test_rootless_user_gets_a_private_table_without_privilege(shared: Shared) -> None:
    """An ordinary user registers emulation in its own table: no privilege."""
    bb = shared.busybox("arm64")
    py = python_for(NOBODY)
    script = f"cat /proc/self/uid_map; {bb} uname -m"
    res = run_as(
        NOBODY,
        NOBODY,
        [py, "-m", "qusd.cli", "sandbox", "--register", "arm64", "--", "sh", "-c", script],
        cwd="/",
        env={"PATH": os.environ["PATH"], "PYTHONPATH": shared.pythonpath},
    )
    assert res.returncode == 0, res.stderr
    uid_map, machine = res.stdout.splitlines()
    assert uid_map.split() == ["0", str(NOBODY), "1"]
    assert machine == "aarch64"


def test_spawned_pid_is_the_sandbox() -> None:
    if sandbox.unsupported_reason():
        pytest.skip(sandbox.unsupported_reason() or "")
    proc = sandbox.spawn(["sleep", "30"], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if os.readlink(f"/proc/{proc.pid}/ns/user") != os.readlink("/proc/self/ns/user"):
                break
            subprocess.run(["sleep", "0.05"], check=True)
        res = subprocess.run(
            sandbox.enter_command(proc.pid, ["cat", "/proc/sys/fs/binfmt_misc/status"]),
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert res.stdout.strip() == "enabled"
    finally:
        proc.kill()
        proc.wait()
