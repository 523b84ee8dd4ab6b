"""The qus test matrix without Docker: a chroot holding Debian's arm64
busybox stands for a foreign container, the daemon's sandbox for the
machine. One test per qus case (its letters: without and with F):

- f/F: interpreters from the default directory, with F;
- c/C: interpreters from a custom directory, with F;
- v/V: without F, failing while the interpreter is absent from the chroot,
  working once it is bind-mounted at the same path;
- i/I: without F, the interpreter copied into the chroot;
- d/D: Debian's dynamic qemu-aarch64 (qemu-user), without (and with) F;
- r/R: the distribution's qemu-user-static entries (loaded by the real
  systemd-binfmt), then a reset, then a registration.

In each failing step doctor, asked about the program as the chroot runs it,
names the cause and the fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qusd import catalog
from tests.conftest import Daemon, busybox_path, interpreter, needs_sandbox, open_dir

pytestmark = needs_sandbox

QUSCTL = str(Path(sys.executable).parent / "qusctl")
AARCH64 = catalog.builtin().get("aarch64")
STATIC = "/usr/bin/qemu-aarch64-static"
DYNAMIC = "/usr/bin/qemu-aarch64"
ENOENT_CHROOT = "/bin/busybox\u2019: No such file or directory"  # coreutils' quotes


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A foreign root: Debian's static arm64 busybox, and nothing of the host."""
    r = tmp_path / "root"
    (r / "bin").mkdir(parents=True)
    shutil.copy(busybox_path("arm64"), r / "bin" / "busybox")
    (r / "bin" / "sh").symlink_to("busybox")
    return r


@pytest.fixture
def custom() -> Iterator[Path]:
    """A custom interpreter directory the trust check accepts (root's, 755)."""
    with open_dir("qusd-matrix-", "/run") as path:
        yield path


def qusctl(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([QUSCTL, "--socket", d.socket, *args], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip


def in_chroot(d: Daemon, root: Path) -> subprocess.CompletedProcess[str]:
    """`uname -m` of the foreign busybox, chrooted, in the daemon's sandbox."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    return d.inside.run(["chroot", str(root), "/bin/busybox", "uname", "-m"], env=env)


def works(d: Daemon, root: Path) -> None:
    res = in_chroot(d, root)
    assert (res.returncode, res.stdout) == (0, "aarch64\n"), res.stderr
    assert errors(doctor(d, root)) == []


def doctor(d: Daemon, root: Path, status: int | None = None) -> list[dict[str, Any]]:
    """qusctl doctor in the daemon's sandbox (where the chroot runs), for
    /bin/busybox as the chroot names it, run first."""
    argv = [QUSCTL, "--socket", d.socket, "doctor", "--json", "--root", str(root),
            "/bin/busybox", "--", "uname", "-m"]  # fmt: skip
    res = d.inside.run(argv)
    assert res.returncode in (0, 1), res.stderr
    if status is not None:
        assert res.returncode == status, res.stdout
    found: list[dict[str, Any]] = json.loads(res.stdout)
    return found


def errors(found: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(f["code"], f["message"]) for f in found if f["level"] == "error"]


def register_entry(d: Daemon, interp: str, flags: str) -> None:
    """The aarch64 catalog rule with an interpreter of our choice (admin)."""
    spec = {"name": AARCH64.entry_name, "magic": AARCH64.magic.hex(),
            "mask": AARCH64.mask.hex(), "interpreter": interp, "flags": flags}  # fmt: skip
    d.client.request("POST", "/v1/registrations", {"entry": spec})


def test_f_interpreters_from_the_default_directory_with_f(daemon: Daemon, root: Path) -> None:
    res = qusctl(daemon, "register", "aarch64")
    assert res.returncode == 0, res.stderr
    assert daemon.table()[0].interpreter == STATIC and daemon.table()[0].flags == "F"
    works(daemon, root)


def test_c_interpreters_from_a_custom_directory_with_f(
    tmp_path: Path, root: Path, custom: Path
) -> None:
    shutil.copy(interpreter("aarch64"), custom / "qemu-aarch64-static")
    (tmp_path / "qusd.toml").write_text(
        f'[qusd]\ninterpreter_dirs = ["{custom}"]\ninterpreter_store = ""\n'
    )
    d = Daemon(tmp_path)
    try:
        target = {t["name"]: t for t in d.client.get("/v1/targets")}["aarch64"]
        assert target["interpreter"] == f"{custom}/qemu-aarch64-static"
        assert qusctl(d, "register", "aarch64").returncode == 0
        assert d.table()[0].interpreter == f"{custom}/qemu-aarch64-static"
        works(d, root)
    finally:
        d.stop()


def test_v_without_f_the_interpreter_must_be_in_the_chroot(daemon: Daemon, root: Path) -> None:
    d = daemon
    assert qusctl(d, "register", "--flags", "", "aarch64").returncode == 0
    assert d.table()[0].flags == ""
    outside = d.inside.run([busybox_path("arm64"), "uname", "-m"])
    assert outside.stdout == "aarch64\n"  # the host has the interpreter
    res = in_chroot(d, root)
    assert res.returncode == 127 and ENOENT_CHROOT in res.stderr, res
    found = doctor(d, root, status=1)
    assert [c for c, _ in errors(found)] == ["ran", "interpreter-missing"]
    assert "No such file or directory (ENOENT)" in errors(found)[0][1]
    missing = next(f for f in found if f["code"] == "interpreter-missing")
    assert missing["message"] == (
        f"the interpreter {STATIC} does not exist inside the chroot {root}: qemu-aarch64 has "
        "no F flag, so the kernel opens it at every exec, in the program's root"
    )
    assert missing["fix"].startswith("register with F (the kernel then opens it once")
    assert missing["fix"].endswith(f"or bind-mount or copy it to {STATIC} inside the chroot {root}")
    # bound in at the same path, as qus' v case does with a volume
    bind = (
        f"mkdir -p {root}/usr/bin && touch {root}{STATIC} && mount --bind {STATIC} {root}{STATIC}"
    )
    assert d.inside.run(["sh", "-c", bind]).returncode == 0
    works(d, root)


def test_i_without_f_the_interpreter_copied_into_the_chroot(daemon: Daemon, root: Path) -> None:
    d = daemon
    assert qusctl(d, "register", "--flags", "", "aarch64").returncode == 0
    (root / "usr/bin").mkdir(parents=True)
    shutil.copy(STATIC, root / "usr/bin")
    works(d, root)


def test_d_the_dynamic_interpreter_without_f(daemon: Daemon, root: Path) -> None:
    """Debian's qemu-user: fine on the host, whose libraries it uses; in a
    chroot it is missing, and copied in it lacks its loader, even with F."""
    d = daemon
    register_entry(d, DYNAMIC, "")
    outside = d.inside.run([busybox_path("arm64"), "uname", "-m"])
    assert outside.stdout == "aarch64\n", outside.stderr
    res = in_chroot(d, root)
    assert res.returncode == 127 and ENOENT_CHROOT in res.stderr, res
    assert [c for c, _ in errors(doctor(d, root, status=1))] == ["ran", "interpreter-missing"]

    (root / "usr/bin").mkdir(parents=True)
    shutil.copy(DYNAMIC, root / "usr/bin")
    res = in_chroot(d, root)
    assert res.returncode == 127 and ENOENT_CHROOT in res.stderr, res  # its loader
    found = doctor(d, root, status=1)
    [(code, message)] = errors(found)[1:]
    loader = "/lib64/ld-linux-x86-64.so.2"
    assert code == "interpreter-dynamic"
    assert message == (
        f"the interpreter {DYNAMIC} is dynamically linked: its loader {loader} and its "
        f"libraries are looked up inside the chroot {root}, and {loader} is not there"
    )
    fix = next(f["fix"] for f in found if f["code"] == code)
    assert fix == "register the static interpreter (qemu-user-static's qemu-<cpu>-static) with F"

    # D: F keeps the interpreter open, not its libraries
    assert qusctl(d, "unregister", AARCH64.entry_name).returncode == 0
    (root / "usr/bin/qemu-aarch64").unlink()
    register_entry(d, DYNAMIC, "F")
    res = in_chroot(d, root)
    assert res.returncode == 127 and ENOENT_CHROOT in res.stderr, res
    [(code, message)] = errors(doctor(d, root, status=1))[1:]
    assert code == "interpreter-dynamic" and ": even with F, its loader" in message


def test_r_the_distributions_entries_then_a_reset_then_a_registration(
    daemon: Daemon, root: Path
) -> None:
    d = daemon
    res = d.inside.run(["/usr/lib/systemd/systemd-binfmt"])
    assert res.returncode == 0, res.stderr
    debian = {e.name: e for e in d.table()}
    theirs = debian[AARCH64.entry_name]
    assert (theirs.interpreter, theirs.flags) == ("/usr/libexec/qemu-binfmt/aarch64-binfmt-P",
                                                  "POF")  # fmt: skip
    works(d, root)
    picked = next(f for f in doctor(d, root) if f["code"] == "picked")
    assert "(qusd manages it)" not in picked["message"]
    res = qusctl(d, "register", "aarch64")
    assert res.returncode == 73 and "already registered with another definition" in res.stderr

    res = qusctl(d, "reset", "--scope", "qemu", "--json")
    assert res.returncode == 0, res.stderr
    removed = json.loads(res.stdout)["removed"]
    assert sorted(removed) == sorted(n for n in debian if n.startswith("qemu-"))
    assert sorted(e.name for e in d.table()) == sorted(
        n for n in debian if not n.startswith("qemu-"))  # fmt: skip
    res = in_chroot(d, root)
    assert res.returncode == 126 and "Exec format error" in res.stderr, res
    found = doctor(d, root, status=1)
    assert [c for c, _ in errors(found)] == ["ran", "no-entry"]
    no = next(f for f in found if f["code"] == "no-entry")
    assert no["fix"] == "register it: qusctl register aarch64 (or qusd-binfmt register aarch64)"

    assert qusctl(d, "register", "aarch64").returncode == 0
    works(d, root)
    picked = next(f for f in doctor(d, root) if f["code"] == "picked")
    assert "(qusd manages it)" in picked["message"]
    res = qusctl(d, "verify", "aarch64")
    assert res.returncode == 0 and res.stdout.splitlines()[1].split()[1] == "ok"
