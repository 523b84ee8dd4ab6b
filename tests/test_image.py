"""The container image, built from packaging/container/Containerfile with
buildah on a Debian base made here, and run with podman the way the README
shows (`podman run --rm --privileged IMAGE ...`), against a sandbox's private
binfmt_misc: the container lives in the sandbox's user namespace, so the
binfmt_misc it mounts is the sandbox's table (tests/containers.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qusd import catalog
from qusd.binfmt import Rule
from tests import containers
from tests.conftest import Sandbox, busybox_path, interpreter
from tests.containers import Engine

REASON = containers.unsupported_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

#: qusd's modules after `import qusd.entrypoint` (the image's entrypoint), as JSON.
IMPORTS = (
    "import json, sys, qusd.entrypoint; "
    "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'qusd')))"
)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine()


@pytest.fixture(scope="module")
def full(engine: Engine) -> str:
    """The default image (every static interpreter), for the host's arch."""
    return containers.image(engine, "full", containers.host_arch())


@pytest.fixture(scope="module")
def register_only(engine: Engine) -> str:
    """The `register` image: no interpreters."""
    return containers.image(engine, "register", containers.host_arch())


@pytest.fixture
def box(sbx: Sandbox, engine: Engine, register_only: str) -> Sandbox:
    """A sandbox that containers provably join."""
    engine.check_userns(sbx.pid, register_only)
    return sbx


def test_the_image_has_every_module_the_one_shot_imports(
    engine: Engine, register_only: str, full: str
) -> None:
    here = subprocess.run(
        [sys.executable, "-c", IMPORTS], capture_output=True, text=True, check=False
    )
    assert here.returncode == 0, here.stderr
    for image in (register_only, full):
        res = engine.run(["podman", "run", "--rm", "--pull=never",
                          "--entrypoint", "python3", image, "-c", IMPORTS])  # fmt: skip
        assert res.returncode == 0, f"{image}: {res.stderr}"
        assert json.loads(res.stdout) == json.loads(here.stdout)


def test_register_then_a_foreign_program_runs(box: Sandbox, engine: Engine, full: str) -> None:
    """`docker run --rm --privileged qusd-binfmt register aarch64 riscv64`:
    the image's own interpreters, kept open by F after the container is gone."""
    res = engine.container(box.pid, full, "register", "aarch64", "riscv64")
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines()]
    assert rows == [
        ["NAME", "FLAGS", "RESULT", "INTERPRETER"],
        ["qemu-aarch64", "F", "registered", "/usr/bin/qemu-aarch64-static"],
        ["qemu-riscv64", "F", "registered", "/usr/bin/qemu-riscv64-static"],
    ]
    assert box.kernel.names() == ["qemu-aarch64", "qemu-riscv64"]
    assert box.run([busybox_path("arm64"), "uname", "-m"]).stdout.strip() == "aarch64"


def test_list_and_reset_in_fresh_containers(box: Sandbox, engine: Engine, full: str) -> None:
    """`docker run --rm --privileged qusd-binfmt list` and `... reset`: each
    a fresh container, in which nothing has mounted binfmt_misc yet."""
    s390x = catalog.builtin().get("s390x")
    box.kernel.register(s390x.rule(interpreter("s390x"), "F"))
    box.kernel.register(Rule("DOSWin", "/usr/bin/wine", extension="exe"))

    res = engine.container(box.pid, full, "--json", "list")
    assert res.returncode == 0, res.stderr
    assert [(r["name"], r["flags"]) for r in json.loads(res.stdout)] == [
        ("DOSWin", ""),
        ("qemu-s390x", "F"),
    ]
    res = engine.container(box.pid, full, "reset")
    assert res.returncode == 0, res.stderr
    assert [line.split()[:3] for line in res.stdout.splitlines()[1:]] == [
        ["qemu-s390x", "F", "removed"]
    ]
    assert box.kernel.names() == ["DOSWin"]  # qemu-* only, as qus does
    res = engine.container(box.pid, full, "--json", "list")
    assert res.returncode == 0, res.stderr
    assert [r["name"] for r in json.loads(res.stdout)] == ["DOSWin"]


def test_register_only_image_uses_the_hosts_interpreters(
    box: Sandbox, engine: Engine, register_only: str
) -> None:
    """The README's `-v /usr/bin:/host:ro qusd-binfmt:register register
    --interpreter-dir /host aarch64`; without the mount it fails in one line."""
    res = engine.container(box.pid, register_only, "register", "aarch64")
    assert res.returncode == 72, res.stdout + res.stderr
    assert res.stderr.strip().splitlines() == [
        "qusd-binfmt: no interpreter for aarch64: no qemu-aarch64-static or qemu-aarch64 in "
        "/var/lib/qusd/interpreters, /usr/bin, /usr/local/bin, /usr/libexec/qemu-binfmt; use an "
        "image with interpreters, or mount a host directory and pass --interpreter-dir"
    ]
    assert box.kernel.names() == []

    res = engine.container(box.pid, register_only, "register", "--interpreter-dir", "/host",
                           "aarch64", options=["-v", "/usr/bin:/host:ro"])  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert box.kernel.entry("qemu-aarch64").interpreter == "/host/qemu-aarch64-static"
    assert box.run([busybox_path("arm64"), "uname", "-m"]).stdout.strip() == "aarch64"


def test_the_arm64_image_runs_under_emulation(box: Sandbox, engine: Engine) -> None:
    """The arm64 image, built through qusd's own emulation in a sandbox: its
    arm64 Python runs under the sandbox's qemu-aarch64 and registers s390x
    with the image's own arm64 qemu-s390x-static, which F keeps open: an
    s390x program outside the container then runs through it, itself run by
    qemu-aarch64 (O hands it the open file: its path names the host's)."""
    image = containers.image(engine, "full", "arm64")
    arch = engine.check(["podman", "image", "inspect", "--format", "{{.Architecture}}", image])
    assert arch.strip() == "arm64"
    box.kernel.register(catalog.builtin().get("aarch64").rule(interpreter("aarch64"), "OF"))

    res = engine.container(box.pid, image, "-m", options=["--entrypoint", "uname"])
    assert res.stdout.strip() == "aarch64", res.stderr
    res = engine.container(box.pid, image, "--json", "register", "s390x")
    assert res.returncode == 0, res.stderr
    assert [(r["name"], r["result"]) for r in json.loads(res.stdout)] == [
        ("qemu-s390x", "registered")
    ]
    entry = box.kernel.entry("qemu-s390x")
    assert (entry.interpreter, entry.flags) == ("/usr/bin/qemu-s390x-static", "F")
    res = box.run([busybox_path("s390x"), "uname", "-m"])
    assert res.stdout.strip() == "s390x", res.stderr


# -- the other tools' command lines, through the same image -----------------------------


def test_qus_documented_examples(box: Sandbox, engine: Engine, full: str) -> None:
    """aptman/qus' README, with this image: `-s -- -p aarch64`, `-l`, `-h`,
    `-- -r`, and qus' own listing `-l -- -t` (registers nothing)."""
    box.kernel.register(Rule("DOSWin", "/usr/bin/wine", extension="exe"))
    res = engine.container(box.pid, full, "-s", "--", "-p", "aarch64")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[1].split() == [
        "aarch64", "qemu-aarch64", "F", "registered", "/usr/bin/qemu-aarch64-static"
    ]  # fmt: skip
    assert box.run([busybox_path("arm64"), "uname", "-m"]).stdout.strip() == "aarch64"

    res = engine.container(box.pid, full, "-l", "--", "-t")
    assert res.returncode == 0, res.stderr
    lines = [line.split() for line in res.stdout.splitlines()]
    static = "/usr/bin/qemu-aarch64-static"
    assert lines[1:3] == [["DOSWin", "-", "enabled", "/usr/bin/wine"],
                          ["qemu-aarch64", "F", "enabled", static]]  # fmt: skip
    assert ["aarch64", "qemu-aarch64", "F", "provided", static] in lines
    assert box.kernel.names() == ["DOSWin", "qemu-aarch64"]

    res = engine.container(box.pid, full, "-l")
    assert res.returncode == 0, res.stderr
    assert [line.split()[0] for line in res.stdout.splitlines()] == [
        "NAME", "DOSWin", "qemu-aarch64"
    ]  # fmt: skip
    res = engine.container(box.pid, full, "-h")
    assert res.returncode == 0 and res.stdout.startswith("Usage: qus-register"), res.stderr
    res = engine.container(box.pid, full, "--", "-r")
    assert res.returncode == 0, res.stderr
    assert box.kernel.names() == ["DOSWin"]


def test_qus_test_suite_with_the_register_image(
    box: Sandbox, engine: Engine, register_only: str, tmp_path: Path
) -> None:
    """qus' test jobs with aptman/qus:register: `-e QEMU_BIN_DIR=DIR -v
    DIR:DIR ... -s -- -p aarch64` (F keeps the host's file open once the
    container is gone), `-- -r`, `-s -- aarch64` and `-- aarch64` (no F:
    the interpreters, static and Debian's dynamic qemu-user, are not in the
    image; the kernel looks them up at each exec, outside it)."""
    tmp_path.chmod(0o755)
    shutil.copy(interpreter("aarch64"), tmp_path / "qemu-aarch64-static")
    mount = ["-e", f"QEMU_BIN_DIR={tmp_path}", "-v", f"{tmp_path}:{tmp_path}"]
    res = engine.container(box.pid, register_only, "-s", "--", "-p", "aarch64", options=mount)
    assert res.returncode == 0, res.stderr
    entry = box.kernel.entry("qemu-aarch64")
    assert (entry.interpreter, entry.flags) == (f"{tmp_path}/qemu-aarch64-static", "F")
    shutil.rmtree(tmp_path)
    assert box.run([busybox_path("arm64"), "uname", "-m"]).stdout.strip() == "aarch64"

    assert engine.container(box.pid, register_only, "--", "-r").returncode == 0
    res = engine.container(box.pid, register_only, "-s", "--", "aarch64")  # qus' v/V job
    assert res.returncode == 0, res.stderr
    entry = box.kernel.entry("qemu-aarch64")
    assert (entry.interpreter, entry.flags) == ("/usr/bin/qemu-aarch64-static", "")
    assert box.run([busybox_path("arm64"), "uname", "-m"]).stdout.strip() == "aarch64"

    assert engine.container(box.pid, register_only, "--", "-r").returncode == 0
    res = engine.container(box.pid, register_only, "--", "aarch64")
    assert res.returncode == 0, res.stderr
    assert "note: 1 interpreter(s) are not here (/usr/bin/qemu-aarch64)" in res.stderr
    entry = box.kernel.entry("qemu-aarch64")
    assert (entry.interpreter, entry.flags) == ("/usr/bin/qemu-aarch64", "")
    assert box.run([busybox_path("arm64"), "uname", "-m"]).stdout.strip() == "aarch64"


def test_tonistiigi_and_multiarch_spellings(box: Sandbox, engine: Engine, full: str) -> None:
    """`docker run --privileged tonistiigi/binfmt --install arm64,riscv64`
    and `--uninstall`, and `docker run --rm --privileged
    multiarch/qemu-user-static --reset -p yes`, with this image."""
    res = engine.container(box.pid, full, "--install", "arm64,riscv64")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["emulators"] == ["qemu-aarch64", "qemu-riscv64"]
    res = engine.container(box.pid, full, "--uninstall", "qemu-riscv64")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["emulators"] == ["qemu-aarch64"]

    box.kernel.register(Rule("qemu-cris", "/usr/bin/qemu-cris", extension="cris"))
    res = engine.container(box.pid, full, "--reset", "-p", "yes")
    assert res.returncode == 0, res.stderr
    foreign = catalog.builtin().foreign(catalog.family_of(catalog.host_machine()))
    assert box.kernel.names() == sorted(t.entry_name for t in foreign)  # qemu-cris went
    entry = box.kernel.entry("qemu-s390x")
    assert (entry.interpreter, entry.flags) == ("/usr/bin/qemu-s390x-static", "F")
    assert box.run([busybox_path("s390x"), "uname", "-m"]).stdout.strip() == "s390x"
