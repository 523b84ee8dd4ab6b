"""`make run` as people meet it: an ordinary user with their own clone, on a
machine root has set up once (packages installed, the dpkg foreign
architectures added): `make setup` and `make run` work without root; and
root, where the machine is not set up yet, is told what changes before it
does.

The user's clone is kept between runs in /var/tmp, keyed on what builds
it (pyproject.toml, the Makefile and the set-up scripts), so only the first
run pays for the user's venv (pip, about three minutes on 2 cores)."""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qusd.client import Client
from qusd.errors import QusdError
from tests.conftest import ROOT, busybox_path, needs_sandbox
from tests.test_make_run import printed_commands

INPUTS = ("pyproject.toml", "Makefile", "tools/setup-system.sh", "tools/fetch-foreign.sh")


@pytest.fixture(scope="module")
def user() -> Iterator[pwd.struct_passwd]:
    if os.getuid() != 0:
        pytest.skip("making an ordinary user needs root (the tests run as they are)")
    name = f"qusdrun{uuid.uuid4().hex[:6]}"
    subprocess.run(["useradd", "--no-create-home", "--home-dir", "/nonexistent", "--shell",
                    "/bin/sh", name], check=True, timeout=60)  # fmt: skip
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], check=False, timeout=60)
        subprocess.run(["userdel", name], check=False, timeout=60)


@pytest.fixture(scope="module")
def clone(user: pwd.struct_passwd) -> Path:
    """The user's clone of this tree: the files git knows, with their times
    (the Makefile's stamps stay valid), in a directory of the user's."""
    key = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in INPUTS)).hexdigest()[:12]
    home = Path(f"/var/tmp/qusd-make-run-{key}")
    for old in Path("/var/tmp").glob("qusd-make-run-*"):  # made from other inputs
        if old != home:
            shutil.rmtree(old, ignore_errors=True)
    home.mkdir(mode=0o755, exist_ok=True)
    tree = home / "qusd"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    for f in files:
        if (ROOT / f).is_file():
            (tree / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, tree / f)
    shutil.rmtree(tree / "run", ignore_errors=True)
    subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(home)], check=True,
                   timeout=300)  # fmt: skip
    return tree


def as_user(user: pwd.struct_passwd, argv: list[str], cwd: Path) -> list[str]:
    """argv as the user, in a login-like environment: no root's PATH or pyenv."""
    env = ["env", "-i", f"HOME={cwd.parent}", f"USER={user.pw_name}",
           "PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"]  # fmt: skip
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
            *env, *argv]  # fmt: skip


@needs_sandbox
def test_make_run_as_an_ordinary_user(user: pwd.struct_passwd, clone: Path) -> None:
    known = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True,
                           text=True, check=True).stdout.split()  # fmt: skip
    busybox_path("arm64")  # root's `make` added the architectures and fetched once
    assert {"arm64", "s390x"} <= set(known)
    setup = subprocess.run(as_user(user, ["make", "setup"], clone), cwd=clone,
                           capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
    assert "need root" not in setup.stdout + setup.stderr
    assert (clone / ".cache/foreign/arm64/busybox").stat().st_uid == user.pw_uid

    proc = subprocess.Popen(as_user(user, ["make", "run"], clone), cwd=clone, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    sock = clone / "run/qusd.sock"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "make run did not serve in 60 s"
            try:
                if Client(str(sock), timeout=5).get("/v1/health") == {"status": "ok"}:
                    break
            except QusdError:
                time.sleep(0.1)
        # the walk-through it printed, pasted by the user
        outputs = []
        banner_so_far = ""
        commands: list[list[str]] = []
        while not commands:
            line = proc.stdout.readline() if proc.stdout else ""
            banner_so_far += line
            if "Ctrl-C stops it" in line:
                commands = printed_commands(banner_so_far)
        for c in commands:
            argv = as_user(user, ["sh", "-c", shlex.join(c)], clone)
            res = subprocess.run(argv, cwd=clone, capture_output=True, text=True, timeout=60,
                                 check=False)  # fmt: skip
            assert res.returncode == 0, (c, res.stderr)
            outputs.append(res.stdout)
        assert outputs[-1].strip() == "aarch64"
        assert sock.stat().st_uid == user.pw_uid
    finally:
        proc.send_signal(signal.SIGINT)
        subprocess.run(["pkill", "-INT", "-u", user.pw_name, "-f", "qusd --sandbox"],
                       check=False, timeout=60)  # fmt: skip
        log, _ = proc.communicate(timeout=60)
    assert "stopped; the sandbox's registrations go away with it" in log
    assert not re.search(r"Traceback|need root", log), log


def test_root_is_told_what_changes_before_it_changes(tmp_path: Path) -> None:
    """tools/fetch-foreign.sh as root on a machine that lacks an
    architecture: the announcement comes before dpkg --add-architecture
    (dpkg and apt are stand-ins that log their calls: nothing changes here)."""
    if os.getuid() != 0:
        pytest.skip("the root path of the script")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "calls"
    for tool, body in {
        "dpkg": 'case "$1" in --print-architecture) echo amd64;; '
                "--print-foreign-architectures) ;; *) echo \"CALLED dpkg $*\";; esac",
        "apt-get": 'echo "CALLED apt-get $*" >>' + str(log) + "; exit 1",
        "apt-cache": "exit 1",
    }.items():  # fmt: skip
        (stubs / tool).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / tool).chmod(0o755)
    res = subprocess.run(
        ["sh", str(ROOT / "tools/fetch-foreign.sh"), str(tmp_path / "foreign")],
        env={"PATH": f"{stubs}:/usr/bin:/bin", "FOREIGN_ARCHS": "riscv64 loong64"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    out = res.stdout
    said = out.index("this changes the machine: adding the dpkg foreign architectures riscv64 "
                     "loong64")  # fmt: skip
    assert said < out.index("CALLED dpkg --add-architecture riscv64")
    assert "undo: dpkg --remove-architecture" in out
    assert "apt-get update" in log.read_text()


def test_an_ordinary_user_is_told_the_one_root_command(user: pwd.struct_passwd) -> None:
    """Where root has not added an architecture, the user learns the exact
    command, and nothing is attempted."""
    tmp_path = Path(tempfile.mkdtemp(prefix="qusd-fetch-", dir="/tmp"))
    tmp_path.chmod(0o777)
    try:
        told(user, tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def told(user: pwd.struct_passwd, tmp_path: Path) -> None:
    script = tmp_path / "fetch.sh"
    shutil.copy(ROOT / "tools/fetch-foreign.sh", script)
    script.chmod(0o755)
    res = subprocess.run(
        as_user(user, ["env", "FOREIGN_ARCHS=riscv64", "sh", str(script),
                       str(tmp_path / "foreign")], tmp_path),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 1
    assert "dpkg does not know the architectures: riscv64" in res.stderr
    assert "sudo sh -c 'dpkg --add-architecture riscv64; apt-get update'" in res.stderr
