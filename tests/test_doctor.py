"""doctor on the real kernel: for each way a program fails to run, the
kernel's own answer (the program run with --run) and doctor's finding that
names the cause and the fix; the entry the kernel picks, newest first.

Each case runs in a sandbox, through both doors: qusd-binfmt doctor (the
stdlib tool) and qusctl doctor (no daemon here: it diagnoses from its own
view); they must agree."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qusd import catalog, interpreters
from qusd.binfmt import Rule
from tests.conftest import (
    FOREIGN_DIR,
    ROOT,
    Daemon,
    Sandbox,
    busybox_path,
    interpreter,
    needs_sandbox,
)

pytestmark = needs_sandbox

BUILTIN = catalog.builtin()
AARCH64 = BUILTIN.get("aarch64")
ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "PYTHONPATH": str(ROOT),
    "QUSD_SOCKET": "/nonexistent/qusd.sock",  # no daemon: the local view alone
}
DOORS = {
    "qusd-binfmt": [sys.executable, "-m", "qusd.oneshot", "doctor", "--json"],
    "qusctl": [str(Path(sys.executable).parent / "qusctl"), "doctor", "--json"],
}


def doctor(sbx: Sandbox, *args: str, status: int | None = None) -> list[dict[str, str]]:
    """The findings of both doors (which must agree, but for qusctl's note
    that it ran without the daemon); status: the exit status both give."""
    found = {}
    for door, argv in DOORS.items():
        res = sbx.run([*argv, *args], env=ENV)
        assert res.returncode in (0, 1), (door, res.returncode, res.stderr)
        if status is not None:
            assert res.returncode == status, (door, res.stdout)
        found[door] = [f for f in json.loads(res.stdout) if f["code"] != "daemon"]
    assert found["qusctl"] == found["qusd-binfmt"]
    return found["qusctl"]


def codes(findings: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(f["level"], f["code"]) for f in findings]


def finding(findings: list[dict[str, str]], code: str) -> dict[str, str]:
    [one] = [f for f in findings if f["code"] == code]
    return one


def unmount(path: str) -> None:
    """umount(2) inside the sandbox (called there by the worker)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), 0) != 0:
        raise OSError(ctypes.get_errno(), f"umount {path}")


def script(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


# -- the kernel's order -----------------------------------------------------------------


def test_the_kernel_picks_the_newest_enabled_entry(sbx: Sandbox, tmp_path: Path) -> None:
    """Two entries match an arm64 program: the kernel runs the newer one,
    the older once the newer is disabled; doctor predicts both, and lists
    the table in the same order (its directory lists newest first)."""
    tmp_path.chmod(0o755)
    busybox = str(busybox_path("arm64"))
    older = script(tmp_path / "older", "#!/bin/sh\necho older\n")
    newer = script(tmp_path / "newer", "#!/bin/sh\necho newer\n")
    sbx.kernel.register(Rule("a-older", older, AARCH64.magic, AARCH64.mask))
    sbx.kernel.register(Rule("b-newer", newer, AARCH64.magic, AARCH64.mask))
    sbx.kernel.register(Rule("DOSWin", "/usr/bin/wine", extension="exe"))
    assert sbx.kernel.ordered_names() == ["DOSWin", "b-newer", "a-older"]
    assert sbx.run([busybox]).stdout == "newer\n"
    found = doctor(sbx, busybox, status=0)
    assert finding(found, "matches")["message"].endswith("(newest first): b-newer, a-older")
    assert finding(found, "picked")["message"].startswith(f"the kernel hands it to b-newer: "
                                                          f"interpreter {newer}")  # fmt: skip
    sbx.kernel.disable("b-newer")
    assert sbx.run([busybox]).stdout == "older\n"
    found = doctor(sbx, busybox, status=0)
    assert finding(found, "matches")["message"].endswith(": b-newer (disabled), a-older")
    assert "hands it to a-older" in finding(found, "picked")["message"]
    # taken out and put back, an entry is the newest again
    sbx.kernel.enable("b-newer")
    sbx.kernel.remove("a-older")
    sbx.kernel.register(Rule("a-older", older, AARCH64.magic, AARCH64.mask))
    assert sbx.kernel.ordered_names()[:2] == ["a-older", "DOSWin"]
    assert sbx.run([busybox]).stdout == "older\n"
    assert "hands it to a-older" in finding(doctor(sbx, busybox), "picked")["message"]


# -- the table --------------------------------------------------------------------------


def test_no_entry_then_registered(sbx: Sandbox) -> None:
    busybox = str(busybox_path("arm64"))
    found = doctor(sbx, "--run", busybox, status=1)
    ran = finding(found, "ran")
    assert ran["level"] == "error" and "Exec format error (ENOEXEC)" in ran["message"]
    assert "is a program for aarch64, statically linked" in finding(found, "target")["message"]
    assert (
        "does not run aarch64 itself (the kernel answers 'Exec format error'"
        in (finding(found, "target")["message"])
    )
    no = finding(found, "no-entry")
    assert no["level"] == "error" and "Exec format error" in no["message"]
    assert no["fix"] == "register it: qusctl register aarch64 (or qusd-binfmt register aarch64)"
    sbx.kernel.register(AARCH64.rule(interpreter("aarch64"), "F"))
    found = doctor(sbx, busybox, "--", "uname", "-m", status=0)
    assert codes(found) == [("info", "ran"), ("info", "target"), ("info", "picked"),
                            ("info", "ok")]  # fmt: skip
    assert finding(found, "ran")["message"].endswith("uname -m ran and exited with status 0")


def test_disabled_entry_and_disabled_binfmt_misc(sbx: Sandbox) -> None:
    busybox = str(busybox_path("arm64"))
    sbx.kernel.register(AARCH64.rule(interpreter("aarch64"), "F"))
    sbx.kernel.disable("qemu-aarch64")
    found = doctor(sbx, "--run", busybox, status=1)
    assert "Exec format error" in finding(found, "ran")["message"]
    off = finding(found, "entry-disabled")
    assert off["message"] == "qemu-aarch64 matches it but is disabled: the kernel skips it"
    assert off["fix"].startswith("qusctl enable qemu-aarch64")
    sbx.kernel.enable("qemu-aarch64")
    sbx.kernel.set_enabled(False)
    found = doctor(sbx, "--run", busybox, status=1)
    assert "Exec format error" in finding(found, "ran")["message"]
    assert finding(found, "binfmt-disabled")["fix"] == (
        "enable it: echo 1 > /proc/sys/fs/binfmt_misc/status"
    )


def test_binfmt_misc_not_mounted(sbx: Sandbox) -> None:
    busybox = str(busybox_path("arm64"))
    sbx.func("tests.test_doctor:unmount", "/proc/sys/fs/binfmt_misc")
    found = doctor(sbx, "--run", busybox, status=1)
    assert "Exec format error" in finding(found, "ran")["message"]
    gone = finding(found, "not-mounted")
    assert gone["level"] == "error"
    assert gone["message"].startswith("binfmt_misc is not mounted at /proc/sys/fs/binfmt_misc")
    assert "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc" in gone["fix"]


# -- the interpreter -------------------------------------------------------------------


def test_interpreter_missing_or_not_executable(sbx: Sandbox, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    busybox = str(busybox_path("arm64"))
    copy = tmp_path / "qemu-aarch64-static"
    shutil.copy(interpreter("aarch64"), copy)
    sbx.kernel.register(AARCH64.rule(str(copy), ""))
    assert doctor(sbx, busybox, "--", "true", status=0)[0]["message"].endswith("status 0")
    copy.chmod(0o644)
    found = doctor(sbx, "--run", busybox, status=1)
    assert "Permission denied (EACCES)" in finding(found, "ran")["message"]
    assert finding(found, "interpreter-not-executable")["message"] == (
        f"the interpreter {copy} of qemu-aarch64 is not an executable file here"
    )
    copy.unlink()
    found = doctor(sbx, "--run", busybox, status=1)
    assert "No such file or directory (ENOENT)" in finding(found, "ran")["message"]
    missing = finding(found, "interpreter-missing")
    assert missing["message"].startswith(f"the interpreter {copy} of qemu-aarch64 does not exist")
    assert missing["fix"].startswith("install it (qemu-user-static)")


def test_a_rule_for_the_host_that_matches_its_own_interpreter(sbx: Sandbox) -> None:
    """Registering the host's own type hands QEMU to QEMU until the kernel
    gives up (ELOOP), and sends the host's programs to QEMU. The rule here
    is the host's catalog rule narrowed to the GNU OS/ABI (static glibc
    programs such as QEMU's own; not the sandbox's Python, which must keep
    running to ask doctor)."""
    own = BUILTIN.get(catalog.canonical_name(catalog.host_machine()))
    found_interp = interpreters.find(own)
    assert found_interp is not None
    qemu = found_interp.path
    assert interpreters.read_header(qemu)[7] == 3, "QEMU's static build has OS/ABI GNU"
    assert interpreters.read_header(sys.executable)[7] == 0
    magic = own.magic[:7] + b"\x03" + own.magic[8:]
    mask = own.mask[:7] + b"\xff" + own.mask[8:]
    before = doctor(sbx, qemu, status=0)
    assert codes(before) == [("info", "target"), ("info", "native"), ("info", "ok")]
    sbx.kernel.register(Rule(own.entry_name, qemu, magic, mask, flags="F"))
    found = doctor(sbx, qemu, "--", "-version", status=1)
    assert "Too many levels of symbolic links (ELOOP)" in finding(found, "ran")["message"]
    assert finding(found, "native-captured")["level"] == "warning"
    loop = finding(found, "self-match")
    assert loop["message"].startswith(f"{own.entry_name} matches its own interpreter {qemu}")
    assert "'Too many levels of symbolic links' (ELOOP)" in loop["message"]
    assert loop["fix"].startswith(f"remove {own.entry_name} (qusctl unregister")


def test_a_native_program_needs_nothing(sbx: Sandbox) -> None:
    sbx.kernel.register(AARCH64.rule(interpreter("aarch64"), "F"))
    found = doctor(sbx, "--run", "/bin/true", status=0)
    assert codes(found) == [("info", "ran"), ("info", "target"), ("info", "native"),
                            ("info", "ok")]  # fmt: skip
    own = catalog.canonical_name(catalog.host_machine())
    assert (
        f"the host runs {own} itself (its built-in program ran"
        in (finding(found, "target")["message"])
    )


# -- the program's own loader ------------------------------------------------------------


def dynamic_busybox() -> Path:
    path = FOREIGN_DIR / "arm64" / "busybox-dynamic"
    if not path.exists():
        pytest.skip(f"{path} is missing: `make test` fetches it (tools/fetch-foreign.sh)")
    return path


def test_a_dynamic_foreign_program_without_its_loader(sbx: Sandbox, tmp_path: Path) -> None:
    """Debian's (dynamically linked) arm64 busybox: QEMU runs, and cannot
    open /lib/ld-linux-aarch64.so.1; doctor names the loader and the libc
    to install. With libc6:arm64 in a chroot, as told, it runs."""
    prog = str(dynamic_busybox())
    sbx.kernel.register(AARCH64.rule(interpreter("aarch64"), "F"))
    found = doctor(sbx, prog, "--", "true", status=1)
    assert "Could not open '/lib/ld-linux-aarch64.so.1'" in finding(found, "ran")["message"]
    assert (
        "dynamically linked (loader /lib/ld-linux-aarch64.so.1)"
        in (finding(found, "target")["message"])
    )
    missing = finding(found, "loader-missing")
    assert missing["message"].startswith(
        f"{prog} is dynamically linked and its loader /lib/ld-linux-aarch64.so.1 does not exist"
    )
    assert missing["fix"] == (
        "install the C library for arm64 (Debian: libc6:arm64) here, or use a statically "
        "linked build"
    )
    root = tmp_path / "root"
    shutil.copytree(FOREIGN_DIR / "arm64" / "libc6", root, symlinks=True)
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy(prog, root / "bin" / "busybox")
    res = sbx.run(["chroot", str(root), "/bin/busybox", "uname", "-m"])
    assert (res.returncode, res.stdout) == (0, "aarch64\n"), res.stderr
    found = doctor(sbx, "--root", str(root), "/bin/busybox", "--", "true", status=0)
    assert codes(found)[-1] == ("info", "ok")


def test_a_script_whose_interpreter_is_missing(sbx: Sandbox, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    prog = script(tmp_path / "tool", "#!/opt/nowhere/python3\nprint('hi')\n")
    found = doctor(sbx, "--run", prog, status=1)
    assert "No such file or directory (ENOENT)" in finding(found, "ran")["message"]
    assert finding(found, "script")["message"] == f"{prog} is a script run by /opt/nowhere/python3"
    assert finding(found, "not-found")["message"] == "/opt/nowhere/python3 does not exist here"


def test_a_missing_file(sbx: Sandbox) -> None:
    found = doctor(sbx, "/nonexistent/prog", status=1)
    assert codes(found) == [("error", "not-found")]


# -- with the daemon ---------------------------------------------------------------------


def test_doctor_outside_the_daemons_sandbox_says_so(daemon: Daemon) -> None:
    """qusd's entries live in its sandbox: a program run outside does not
    see them. doctor, asked from outside, says so and how to run it inside;
    asked inside, it sees the daemon's entries and what qusd manages."""
    busybox = str(busybox_path("arm64"))
    assert daemon.client.request("POST", "/v1/registrations", {"targets": ["arm64"]})
    argv = [DOORS["qusctl"][0], "--socket", daemon.socket, "doctor", "--json", busybox]
    outside = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    found = json.loads(outside.stdout)
    note = finding(found, "sandbox")
    assert note["level"] == "warning"
    assert note["message"].startswith(f"qusd runs in a sandbox (pid {daemon.pid}): its entries "
                                      "apply only to programs run inside it")  # fmt: skip
    assert note["fix"].startswith("run the program inside: qusctl run -- PROGRAM")
    assert "the kernel answers 'Exec format error'" in finding(found, "target")["message"]
    inside = json.loads(daemon.inside.run(argv).stdout)
    assert "sandbox" not in [f["code"] for f in inside]
    assert finding(inside, "picked")["message"].startswith(
        "the kernel hands it to qemu-aarch64 (qusd manages it)"
    )
    assert codes(inside)[-1] == ("info", "ok")
