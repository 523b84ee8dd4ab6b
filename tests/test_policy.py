"""Policy building blocks: trusted interpreters and host protection."""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

import pytest

from qusd import catalog, paths, policy
from qusd.binfmt import Rule
from qusd.config import Config
from qusd.errors import HostTypeError, InterpreterError, UntrustedInterpreterError
from qusd.policy import check_trusted
from tests.conftest import Sandbox, interpreter

BUILTIN = catalog.builtin()
HOST_FAMILY = catalog.family_of(catalog.host_machine())


def test_system_interpreters_are_trusted() -> None:
    check_trusted(interpreter("aarch64"))
    check_trusted("/bin/true")  # through the /bin -> usr/bin symlink on merged /usr


def test_relative_missing_and_non_executable() -> None:
    with pytest.raises(InterpreterError, match="not an absolute path"):
        check_trusted("usr/bin/true")
    with pytest.raises(InterpreterError, match="does not exist: install it first"):
        check_trusted("/nonexistent/qemu")
    with pytest.raises(InterpreterError, match="not an executable regular file"):
        check_trusted("/etc/os-release")


def test_world_writable_ancestor_is_named(tmp_path: Path) -> None:
    exe = tmp_path / "qemu-aarch64-static"
    shutil.copy(interpreter("aarch64"), exe)
    with pytest.raises(UntrustedInterpreterError) as info:
        check_trusted(str(exe))
    assert "/tmp" in info.value.message and "writable by group or others" in info.value.message


def _mount_tmpfs(where: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tmpfs", where.encode(), b"tmpfs", 0, b"mode=755") != 0:
        raise OSError(ctypes.get_errno(), f"mount tmpfs on {where}")


def _trust_cases(untrusted_file: str) -> dict[str, str]:
    """Inside a sandbox: a root-owned tmpfs on /mnt (parents root-owned and
    closed), files in it changed one way at a time, and check_trusted's word."""
    _mount_tmpfs("/mnt")
    exe = Path("/mnt/qemu-x")
    shutil.copy("/bin/true", exe)
    results: dict[str, str] = {}

    def verdict(name: str, path: Path = exe) -> None:
        try:
            check_trusted(str(path))
            results[name] = "trusted"
        except UntrustedInterpreterError as e:
            results[name] = e.message

    exe.chmod(0o755)
    verdict("plain")
    exe.chmod(0o775)
    verdict("group-writable")
    exe.chmod(0o755)
    os.chown(exe, 65534, 65534)
    verdict("owned-by-nobody")
    os.chown(exe, 0, 0)
    os.chmod("/mnt", 0o757)
    verdict("parent-writable")
    os.chmod("/mnt", 0o755)
    link = Path("/mnt/qemu-link")
    link.symlink_to(untrusted_file)
    verdict("symlink-out", link)
    return results


def test_owner_mode_parents_and_symlinks(sbx: Sandbox, tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("chown to another uid needs root's identity-mapped sandbox")
    tmp_path.chmod(0o755)
    evil = tmp_path / "evil"
    shutil.copy("/bin/true", evil)
    got = sbx.func("tests.test_policy:_trust_cases", str(evil))
    assert got["plain"] == "trusted"
    assert "/mnt/qemu-x is writable by group or others (mode 775)" in got["group-writable"]
    assert "/mnt/qemu-x is owned by uid 65534, not root" in got["owned-by-nobody"]
    assert (
        "/mnt (for /mnt/qemu-x) is writable by group or others (mode 757)"
        in (got["parent-writable"])
    )
    assert "/tmp" in got["symlink-out"] and "(for /mnt/qemu-link)" in got["symlink-out"]


def test_trusted_owners_in_the_initial_namespace() -> None:
    """Root and whoever runs qusd; never the overflow uid, which stands for
    root and every other user alike inside a rootless sandbox."""
    owners = policy.Trust.here().owners
    assert 0 in owners and os.geteuid() in owners
    assert int(Path("/proc/sys/kernel/overflowuid").read_text()) not in owners


# -- host protection -----------------------------------------------------------------


def test_native_headers_cover_the_host_family() -> None:
    headers = policy.native_headers(BUILTIN, HOST_FAMILY, ["/proc/self/exe"])
    natives = [t for t in BUILTIN if t.family == HOST_FAMILY]
    assert natives
    for t in natives:
        assert any(t.matches(h) for h in headers), t.name
    for t in BUILTIN.foreign(HOST_FAMILY):
        assert not any(t.matches(h) for h in headers), t.name


@pytest.mark.parametrize(
    ("magic", "mask", "offset", "hijacks"),
    [
        (b"\x7fELF", None, 0, True),  # every ELF file
        (b"\x7f", None, 0, True),
        (BUILTIN.get("aarch64").magic, BUILTIN.get("aarch64").mask, 0, False),
        (b"\xa7\x0d\x0d\x0a", None, 0, False),  # python bytecode
        (b"\x00", b"\x00", 0, True),  # matches anything
        (b"ELF", None, 1, True),
    ],
)
def test_host_protection(magic: bytes, mask: bytes | None, offset: int, hijacks: bool) -> None:
    pol = policy.Policy(
        Config(), HOST_FAMILY, BUILTIN,
        policy.native_headers(BUILTIN, HOST_FAMILY, ["/proc/self/exe"]),
    )  # fmt: skip
    rule = Rule("x", "/bin/true", magic=magic, mask=mask, offset=offset)
    if hijacks:
        with pytest.raises(HostTypeError, match="would match the host's own programs"):
            pol.check_host_types(rule)
    else:
        pol.check_host_types(rule)
    pol.check_host_types(Rule("e", "/bin/true", extension="exe"))  # not ELF: never


def test_paths_are_walked_as_the_kernel_walks_them(tmp_path: Path) -> None:
    """`x/lnk/..` is where lnk's target is, not x: the walk follows each
    symlink where it stands, and ends where the kernel's lookup ends."""
    (tmp_path / "x").mkdir()
    (tmp_path / "y" / "z").mkdir(parents=True)
    (tmp_path / "x" / "lnk").symlink_to("../y/z")
    (tmp_path / "y" / "z" / "true").symlink_to("/bin/true")
    for given in (f"{tmp_path}/x/lnk/..", f"{tmp_path}/x/lnk/true", "/bin/true", "/bin/./true"):
        seen, fd = paths.nodes(given)
        os.close(fd)
        assert seen[-1].path == os.path.realpath(given) and seen[-1].last, given
        assert all(not n.last for n in seen[:-1])
    assert os.path.normpath(f"{tmp_path}/x/lnk/..") == f"{tmp_path}/x"  # text gets it wrong
    walked = [n.path for n in paths.nodes(f"{tmp_path}/x/lnk/..")[0]]
    assert walked[-5:] == [f"{tmp_path}/x/lnk", str(tmp_path), f"{tmp_path}/y", f"{tmp_path}/y/z",
                           f"{tmp_path}/y"]  # fmt: skip


def test_dotdot_is_refused_outright() -> None:
    with pytest.raises(UntrustedInterpreterError, match=r"has a '\.\.' component"):
        check_trusted("/usr/bin/../bin/true")
