"""qusctl: identify, run, sandbox; exit statuses and messages."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qusd import catalog, interpreters
from qusd.client import DEFAULT_SOCKET
from tests.conftest import DEBIAN_TARGET, FOREIGN_ARCHS, Sandbox, busybox_path, interpreter

QUSCTL = str(Path(sys.executable).parent / "qusctl")
QUSD = str(Path(sys.executable).parent / "qusd")
QUSD_BINFMT = str(Path(sys.executable).parent / "qusd-binfmt")


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
    assert res.returncode == 72 and "no interpreter for aarch64" in res.stderr
    res = qusctl("sandbox", "--register", "arm64", "--flags", "X", "--", "true")
    assert res.returncode == 65 and "flags: unknown flag(s) 'X'" in res.stderr
    res = qusctl("sandbox", "--", "/nonexistent/cmd")
    assert res.returncode == 71 and "cannot run /nonexistent/cmd" in res.stderr


# -- conventions -----------------------------------------------------------------------


def test_options_go_before_or_after_the_command(tmp_path: Path) -> None:
    files = [str(busybox_path("s390x")), str(busybox_path("arm64"))]
    after, before = qusctl("identify", "--json", *files), qusctl("--json", "identify", *files)
    assert after.returncode == before.returncode == 0
    assert json.loads(after.stdout) == json.loads(before.stdout)
    assert [r["target"] for r in json.loads(before.stdout)] == ["s390x", "aarch64"]
    missing = str(tmp_path / "nowhere.sock")
    for args in (["--socket", missing, "list"], ["list", "--socket", missing],
                 ["--json", "list", "--socket", missing]):  # fmt: skip
        res = qusctl(*args)
        assert res.returncode == 69 and f"no socket at {missing}" in res.stderr, args
    # a global option given before the command is not reset after it
    res = qusctl("--socket", missing, "status", "--json")
    assert f"no socket at {missing}" in res.stderr


def test_json_where_nothing_prints_json_is_a_usage_error() -> None:
    res = qusctl("--json", "sandbox", "--", "true")
    assert res.returncode == 2 and "sandbox runs a command and prints no JSON" in res.stderr


def test_an_empty_socket_path_says_what_to_do() -> None:
    env = {k: v for k, v in os.environ.items() if k != "QUSD_SOCKET"}
    res = subprocess.run([QUSCTL, "list"], capture_output=True, text=True, timeout=60,
                         check=False, env={**env, "QUSD_SOCKET": ""})  # fmt: skip
    # empty is unset, as for `QUSD_SOCKET= qusctl list`: the default socket
    assert res.returncode == 69 and "Errno" not in res.stderr
    assert f"no socket at {DEFAULT_SOCKET}" in res.stderr or "permission" in res.stderr
    res = qusctl("--socket", "", "list")
    assert res.returncode == 69
    assert res.stderr == (
        "qusctl: the socket path is empty: pass the daemon's socket with --socket PATH, or "
        f"leave it out for {DEFAULT_SOCKET}\n"
    )
    long = "/tmp/" + "x" * 120
    res = qusctl("--socket", long, "list")
    assert (
        res.returncode == 69 and "more than a Unix socket's 107: use a shorter path" in res.stderr
    )


def closed_pipe(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    """Run argv writing to a pipe whose reader is already gone."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(argv, stdout=w, stderr=subprocess.PIPE, timeout=60, check=False,
                              **kw)  # fmt: skip
    finally:
        os.close(w)


def test_a_closed_pipe_ends_quietly_by_sigpipe() -> None:
    files = [str(busybox_path(a)) for a in sorted(FOREIGN_ARCHS)]
    for args in (["identify", "--json", *files], ["identify", *files]):
        res = closed_pipe([QUSCTL, *args])
        assert (res.returncode, res.stderr) == (-signal.SIGPIPE, b""), res.stderr.decode()
    # and as people meet it, in a shell pipeline: head reads one line
    shell = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f'{QUSCTL} identify --json "$@" | head -n 1', "bash",
         *files * 500],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (shell.returncode, shell.stdout, shell.stderr) == (128 + signal.SIGPIPE, "[\n", "")


def test_commands_run_in_a_sandbox_get_sigpipe_back() -> None:
    """Python ignores SIGPIPE; a command qusctl execs must not inherit that."""
    res = qusctl("sandbox", "--", "grep", "^SigIgn", "/proc/self/status")
    assert res.returncode == 0, res.stderr
    ignored = int(res.stdout.split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1)) and not ignored & (1 << (signal.SIGXFSZ - 1))
    res = qusctl("sandbox", "--", "sh", "-c", "yes | head -n 1")
    assert (res.returncode, res.stdout, res.stderr) == (0, "y\n", "")


def test_sandbox_refuses_the_hosts_own_type_up_front() -> None:
    host = catalog.family_of(catalog.host_machine())
    native = [t for t in catalog.builtin() if t.family == host and os.path.exists(
        f"/usr/bin/qemu-{t.cpu}-static")]  # fmt: skip
    assert native, "no native target with an interpreter to try"
    alias = {"x86_64": "amd64", "aarch64": "arm64"}.get(native[-1].name, native[-1].name)
    res = qusctl("sandbox", "--register", alias, "--", "true")
    assert res.returncode == 77, res.stderr
    assert f"is of the host's own family ({host})" in res.stderr
    assert "Too many levels of symbolic links" in res.stderr
    assert "register foreign targets only" in res.stderr


def test_sandbox_all_registers_every_foreign_target() -> None:
    interpreter("aarch64")
    host = catalog.family_of(catalog.host_machine())
    want = sorted(t.entry_name for t in interpreters.foreign_with_interpreters(
        catalog.builtin(), host))  # fmt: skip
    res = qusctl("sandbox", "--register", "all", "--", "ls", "/proc/sys/fs/binfmt_misc")
    assert res.returncode == 0, res.stderr
    assert sorted(set(res.stdout.split()) - {"register", "status"}) == want
    res = qusctl("sandbox", "--register", "all", "--register", "arm64", "--", "true")
    assert res.returncode == 65 and "'all' means every foreign target" in res.stderr


@pytest.mark.parametrize("command", ["serve", "restore", "check-config"])
def test_qusd_commands_have_their_own_help(command: str) -> None:
    res = subprocess.run([QUSD, command, "--help"], capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert res.returncode == 0 and res.stdout.startswith(f"usage: qusd {command} ")
    top = subprocess.run([QUSD, "--help"], capture_output=True, text=True, timeout=60,
                         check=False).stdout  # fmt: skip
    assert res.stdout != top


def test_qusd_binfmt_commands_are_described() -> None:
    res = subprocess.run([QUSD_BINFMT, "--help"], capture_output=True, text=True, timeout=60,
                         check=False)  # fmt: skip
    listed = re.findall(r"^    (\w+)\s+(\S.*)$", res.stdout, flags=re.M)
    assert [name for name, _ in listed] == [
        "register", "list", "reset", "verify", "doctor", "interpreters"
    ]  # fmt: skip
    for name, _ in listed:
        sub = subprocess.run([QUSD_BINFMT, name, "--help"], capture_output=True, text=True,
                             timeout=60, check=False).stdout  # fmt: skip
        description = sub.split("\n\n")[1]
        assert len(description.split()) >= 5, (name, sub)
