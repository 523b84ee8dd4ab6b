"""The kernel layer against a real, private binfmt_misc instance."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from qusd import catalog
from qusd.binfmt import BinfmtMisc, Entry, Rule
from qusd.errors import (
    EntryExistsError,
    InterpreterError,
    InvalidRuleError,
    NoSuchEntryError,
    NotMountedError,
)
from tests.conftest import (
    NOBODY,
    Sandbox,
    Shared,
    busybox_path,
    interpreter,
    python_for,
    run_as,
)

AARCH64 = catalog.builtin().get("aarch64")


def aarch64_rule(flags: str = "F", name: str = "qemu-aarch64") -> Rule:
    rule = AARCH64.rule(interpreter("aarch64"), flags)
    return Rule(**{**rule.__dict__, "name": name})


def test_sandbox_table_starts_empty_and_enabled(sbx: Sandbox) -> None:
    assert sbx.kernel.is_mounted()
    assert sbx.kernel.names() == []
    assert sbx.kernel.enabled() is True


def test_register_reads_back_every_field(sbx: Sandbox) -> None:
    rule = Rule(
        name="qemu-aarch64",
        interpreter=interpreter("aarch64"),
        magic=AARCH64.magic,
        mask=AARCH64.mask,
        offset=0,
        flags="FP",
    )
    entry: Entry = sbx.kernel.register(rule)
    assert entry == sbx.kernel.entry("qemu-aarch64")
    assert entry.enabled is True
    assert entry.type == "M"
    assert entry.interpreter == rule.interpreter
    assert entry.flags == "PF"  # the kernel reports flags in POCF order
    assert entry.offset == 0
    assert entry.magic == AARCH64.magic
    assert entry.mask == AARCH64.mask
    assert entry.rule() == rule.normalized()


def test_offset_and_unmasked_rule_read_back(sbx: Sandbox) -> None:
    rule = Rule(name="odd", interpreter="/bin/true", magic=b"\x00:\n\\x", offset=200, flags="C")
    entry = sbx.kernel.register(rule)
    assert (entry.offset, entry.magic, entry.mask, entry.flags) == (200, b"\x00:\n\\x", None, "OC")


def test_second_registration_is_a_clear_eexist(sbx: Sandbox) -> None:
    sbx.kernel.register(aarch64_rule("F"))
    with pytest.raises(EntryExistsError) as info:
        sbx.kernel.register(aarch64_rule("OC"))
    msg = info.value.message
    assert "qemu-aarch64 is already registered" in msg
    assert interpreter("aarch64") in msg and "flags F" in msg
    assert sbx.kernel.entry("qemu-aarch64").flags == "F"  # the first one is untouched


def test_disable_enable_change_what_exec_does(sbx: Sandbox) -> None:
    bb = busybox_path("arm64")
    sbx.kernel.register(aarch64_rule())
    assert sbx.run([bb, "uname", "-m"]).stdout.strip() == "aarch64"

    sbx.kernel.disable("qemu-aarch64")
    assert sbx.kernel.entry("qemu-aarch64").enabled is False
    res = sbx.run([bb, "uname", "-m"])
    assert res.returncode != 0 and "Exec format error" in res.stderr

    sbx.kernel.enable("qemu-aarch64")
    assert sbx.run([bb, "uname", "-m"]).stdout.strip() == "aarch64"

    # the global switch: entries kept, exec falls through
    sbx.kernel.set_enabled(False)
    assert sbx.kernel.enabled() is False
    assert "Exec format error" in sbx.run([bb, "true"]).stderr
    sbx.kernel.set_enabled(True)
    assert sbx.run([bb, "true"]).returncode == 0


def foreign_entries() -> list[Rule]:
    """Entries other tools make: an E entry and python's magic entry."""
    return [
        Rule(name="DOSWin", interpreter="/usr/bin/wine", extension="exe"),
        Rule(name="python3.11", interpreter="/usr/bin/python3.11", magic=b"\xa7\x0d\x0d\x0a"),
    ]


def test_foreign_entries_are_listed_parsed_and_survive_qemu_removal(sbx: Sandbox) -> None:
    for rule in foreign_entries():
        sbx.kernel.register(rule)
    sbx.kernel.register(aarch64_rule())
    sbx.kernel.register(catalog.builtin().get("s390x").rule(interpreter("s390x")))

    by_name = {e.name: e for e in sbx.kernel.entries()}
    assert set(by_name) == {"DOSWin", "python3.11", "qemu-aarch64", "qemu-s390x"}
    wine = by_name["DOSWin"]
    assert (wine.type, wine.extension, wine.interpreter, wine.magic) == (
        "E",
        "exe",
        "/usr/bin/wine",
        b"",
    )
    py = by_name["python3.11"]
    assert (py.type, py.magic, py.mask, py.flags) == ("M", b"\xa7\x0d\x0d\x0a", None, "")

    for name in [n for n in by_name if n.startswith("qemu-")]:
        sbx.kernel.remove(name)
    assert sbx.kernel.names() == ["DOSWin", "python3.11"]
    assert [e.rule() for e in sbx.kernel.entries()] == [r.normalized() for r in foreign_entries()]

    with pytest.raises(NoSuchEntryError):
        sbx.kernel.remove("qemu-aarch64")
    sbx.kernel.remove_all()
    assert sbx.kernel.names() == []


def test_f_flag_with_missing_interpreter_is_clear_and_leaves_nothing(sbx: Sandbox) -> None:
    rule = Rule(
        name="qemu-aarch64",
        interpreter="/nonexistent/qemu-aarch64-static",
        magic=AARCH64.magic,
        mask=AARCH64.mask,
        flags="F",
    )
    with pytest.raises(InterpreterError) as info:
        sbx.kernel.register(rule)
    assert info.value.message.startswith(
        "the F flag opens /nonexistent/qemu-aarch64-static at registration and it does not exist"
    )
    assert sbx.kernel.names() == []
    # without F the kernel takes it: the path is looked up at exec time
    assert sbx.kernel.register(Rule(**{**rule.__dict__, "flags": ""})).flags == ""


def test_builder_refusal_never_reaches_the_kernel(sbx: Sandbox) -> None:
    with pytest.raises(InvalidRuleError) as info:
        sbx.kernel.register(Rule(name="a:b", interpreter="/bin/true", magic=b"x"))
    assert info.value.field == "name"
    assert sbx.kernel.names() == []


def test_unmounted_path_is_a_clear_error(sbx: Sandbox, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    assert sbx.func("tests.test_kernel:_is_mounted_at", str(tmp_path)) is False
    with pytest.raises(NotMountedError, match="not mounted at"):
        sbx.func("tests.test_kernel:_names_at", str(tmp_path))
    # mounting again in the same user namespace shows the same instance
    sbx.kernel.register(aarch64_rule())
    sbx.func("tests.test_kernel:_mount_at", str(tmp_path))
    assert sbx.func("tests.test_kernel:_names_at", str(tmp_path)) == ["qemu-aarch64"]


def _is_mounted_at(path: str) -> bool:
    return BinfmtMisc(path).is_mounted()


def _names_at(path: str) -> list[str]:
    return BinfmtMisc(path).names()


def _mount_at(path: str) -> None:
    BinfmtMisc(path).mount()
    assert BinfmtMisc(path).is_mounted()


def make_chroot(root: Path, bb: Path) -> None:
    root.mkdir()
    shutil.copy(bb, root / "busybox")
    os.chmod(root, 0o755)


def test_chroot_runs_only_with_f_or_a_copied_interpreter(sbx: Sandbox, tmp_path: Path) -> None:
    root = tmp_path / "root"
    make_chroot(root, busybox_path("arm64"))
    os.chmod(tmp_path, 0o755)

    sbx.kernel.register(aarch64_rule("F"))
    res = sbx.run(["chroot", root, "/busybox", "uname", "-m"])
    assert (res.returncode, res.stdout.strip()) == (0, "aarch64"), res.stderr

    sbx.kernel.remove("qemu-aarch64")
    sbx.kernel.register(aarch64_rule(""))
    res = sbx.run(["chroot", root, "/busybox", "uname", "-m"])
    assert res.returncode != 0  # the interpreter is not inside the chroot

    interp = interpreter("aarch64")
    (root / Path(interp).parent.relative_to("/")).mkdir(parents=True)
    shutil.copy(interp, root / interp.lstrip("/"))
    res = sbx.run(["chroot", root, "/busybox", "uname", "-m"])
    assert (res.returncode, res.stdout.strip()) == (0, "aarch64"), res.stderr


def test_sandboxes_do_not_share_tables(sbx: Sandbox) -> None:
    bb = busybox_path("arm64")
    sbx.kernel.register(aarch64_rule())
    other = Sandbox()
    try:
        assert other.kernel.names() == []
        res = other.run([bb, "true"])
        assert res.returncode != 0 and "Exec format error" in res.stderr
    finally:
        other.close()
    assert sbx.run([bb, "true"]).returncode == 0


REGISTER = """
import sys
from qusd.binfmt import BinfmtMisc, Rule
from qusd.errors import KernelPermissionError
try:
    BinfmtMisc().register(Rule(name="x", interpreter="/bin/true", magic=b"zz"))
except KernelPermissionError as e:
    print(e.message)
    sys.exit(3)
"""


MOUNT_AS_NOBODY = """
import sys
from qusd.binfmt import BinfmtMisc
from qusd.errors import KernelPermissionError
try:
    BinfmtMisc(sys.argv[1]).mount()
except KernelPermissionError as e:
    print(e.message)
    sys.exit(3)
"""


def test_mount_without_privilege_is_eperm_explained(shared: Shared) -> None:
    if os.getuid() != 0:
        pytest.skip("switching to another user needs root")
    py = python_for(NOBODY)
    with tempfile.TemporaryDirectory(dir="/tmp") as where:  # reachable by nobody
        os.chmod(where, 0o755)
        res = run_as(NOBODY, NOBODY, [py, "-c", MOUNT_AS_NOBODY, where],
                     env={"PYTHONPATH": shared.pythonpath}, cwd="/")  # fmt: skip
    assert res.returncode == 3, res.stderr
    assert "cannot mount binfmt_misc" in res.stdout and "needs CAP_SYS_ADMIN" in res.stdout


def test_unprivileged_user_inside_is_refused(sbx: Sandbox, shared: Shared) -> None:
    if os.getuid() != 0:
        pytest.skip("only root's sandbox maps other users")
    py = python_for(NOBODY)
    res = sbx.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", py, "-c", REGISTER],
        env={"PYTHONPATH": shared.pythonpath}, cwd="/",
    )  # fmt: skip
    assert res.returncode == 3, res.stderr
    assert "not allowed to register" in res.stdout
    assert sbx.kernel.names() == []
