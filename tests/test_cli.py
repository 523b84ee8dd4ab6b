"""qusctl: identify, run, sandbox; exit statuses and messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qusd import catalog
from tests.conftest import DEBIAN_TARGET, FOREIGN_ARCHS, Sandbox, busybox_path, interpreter

QUSCTL = str(Path(sys.executable).parent / "qusctl")


def qusctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QUSCTL, *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("source", ["builtin", "binfmt.d"])
def test_identify_names_each_busybox(source: str) -> None:
    if source == "binfmt.d" and not Path("/usr/lib/binfmt.d/qemu-aarch64.conf").exists():
        pytest.skip("Debian's qemu-user-static is not installed")
    files = [str(busybox_path(a)) for a in sorted(FOREIGN_ARCHS)]
    res = qusctl("identify", "--catalog", source, *files)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["FILE", "TARGET"]
    got = dict(line.split(None, 1) for line in lines[1:])
    host_family = catalog.family_of(catalog.host_machine())
    for arch in FOREIGN_ARCHS:
        target = DEBIAN_TARGET[arch]
        native = catalog.builtin().get(target).family == host_family
        assert got[str(busybox_path(arch))] == (f"native ({target})" if native else target)


def test_identify_json_and_no_match(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")
    res = qusctl("identify", "--json", str(busybox_path("s390x")), str(script), sys.executable)
    assert res.returncode == 0
    data = json.loads(res.stdout)
    assert data[0] == {
        "file": str(busybox_path("s390x")),
        "target": "s390x",
        "native": False,
        "matches": ["s390x"],
    }
    assert data[1]["target"] is None and data[1]["native"] is False
    assert data[2]["native"] is True


def test_identify_on_another_host() -> None:
    res = qusctl("identify", "--host", "aarch64", str(busybox_path("arm64")))
    assert res.stdout.splitlines()[1].split()[1:] == ["native", "(aarch64)"]


def test_identify_unreadable_file_fails_but_reports_the_others() -> None:
    res = qusctl("identify", "/nonexistent", str(busybox_path("arm64")))
    assert res.returncode == 66
    assert "qusctl: /nonexistent: No such file or directory" in res.stderr
    assert "aarch64" in res.stdout


@pytest.mark.parametrize("sub", [[], ["identify"], ["run"], ["sandbox"]])
def test_help(sub: list[str]) -> None:
    res = qusctl(*sub, "--help")
    assert res.returncode == 0 and "usage: qusctl" in res.stdout


def test_usage_error_exit_status() -> None:
    assert qusctl("frobnicate").returncode == 2


def test_run_enters_an_existing_sandbox(sbx: Sandbox) -> None:
    sbx.kernel.register(catalog.builtin().get("aarch64").rule(interpreter("aarch64")))
    res = qusctl("run", "--pid", str(sbx.pid), "--", str(busybox_path("arm64")), "uname", "-m")
    assert (res.returncode, res.stdout.strip()) == (0, "aarch64"), res.stderr
    res = qusctl("run", "--pid", str(sbx.pid), "--", "cat", "/proc/sys/fs/binfmt_misc/qemu-aarch64")
    assert res.stdout.startswith("enabled\ninterpreter ")


def test_run_refuses_a_process_outside_any_sandbox() -> None:
    res = qusctl("run", "--pid", str(os.getpid()), "--", "true")
    assert res.returncode == 71
    assert "is not in a sandbox" in res.stderr
    res = qusctl("run", "--pid", "999999999", "--", "true")
    assert res.returncode == 71 and "no sandbox to enter at pid 999999999" in res.stderr


def test_sandbox_registers_and_runs() -> None:
    res = qusctl(
        "sandbox", "--register", "arm64", "--register", "linux/s390x", "--",
        "sh", "-c", f"{busybox_path('arm64')} uname -m; {busybox_path('s390x')} uname -m",
    )  # fmt: skip
    assert (res.returncode, res.stdout.split()) == (0, ["aarch64", "s390x"]), res.stderr


def test_sandbox_errors(tmp_path: Path) -> None:
    res = qusctl("sandbox", "--register", "vax", "--", "true")
    assert res.returncode == 65 and "unknown target 'vax'" in res.stderr
    res = qusctl("sandbox", "--register", "arm64", "--interpreter-dir", str(tmp_path), "--", "true")
    assert res.returncode == 1 and "no interpreter for aarch64" in res.stderr
    res = qusctl("sandbox", "--register", "arm64", "--flags", "X", "--", "true")
    assert res.returncode == 65 and "flags: unknown flag(s) 'X'" in res.stderr
    res = qusctl("sandbox", "--", "/nonexistent/cmd")
    assert res.returncode == 71 and "cannot run /nonexistent/cmd" in res.stderr
