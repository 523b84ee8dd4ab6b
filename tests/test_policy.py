"""Policy building blocks: trusted interpreters and host protection."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from qusd import catalog, policy
from qusd.binfmt import Rule
from qusd.errors import HostTypeError, UntrustedInterpreterError
from qusd.policy import check_trusted
from tests.conftest import ROOT, interpreter

BUILTIN = catalog.builtin()
HOST_FAMILY = catalog.family_of(catalog.host_machine())


@pytest.fixture
def rootdir() -> Iterator[Path]:
    """A directory owned by root, mode 755, in the checkout (not under /tmp)."""
    if os.getuid() != 0:
        pytest.skip("needs root to make root-owned files")
    d = ROOT / ".cache" / f"trust-{os.getpid()}"
    d.mkdir(parents=True, mode=0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def test_system_interpreters_are_trusted() -> None:
    check_trusted(interpreter("aarch64"))
    check_trusted("/bin/true")  # through the /bin -> usr/bin symlink on merged /usr


def test_relative_missing_and_non_executable() -> None:
    with pytest.raises(UntrustedInterpreterError, match="not an absolute path"):
        check_trusted("usr/bin/true")
    with pytest.raises(UntrustedInterpreterError, match="No such file"):
        check_trusted("/nonexistent/qemu")
    with pytest.raises(UntrustedInterpreterError, match="not an executable regular file"):
        check_trusted("/etc/os-release")


def test_world_writable_ancestor_is_named(tmp_path: Path) -> None:
    exe = tmp_path / "qemu-aarch64-static"
    shutil.copy(interpreter("aarch64"), exe)
    with pytest.raises(UntrustedInterpreterError) as info:
        check_trusted(str(exe))
    assert "/tmp" in info.value.message and "writable by group or others" in info.value.message


def test_owner_and_mode_of_the_file(rootdir: Path) -> None:
    if any(os.stat(p).st_mode & 0o022 or os.stat(p).st_uid for p in [rootdir, *rootdir.parents]):
        pytest.skip(f"{rootdir}'s parents are not root-owned and closed")
    exe = rootdir / "qemu-x"
    shutil.copy("/bin/true", exe)
    exe.chmod(0o755)
    check_trusted(str(exe))
    exe.chmod(0o775)
    with pytest.raises(UntrustedInterpreterError, match="mode 775"):
        check_trusted(str(exe))
    exe.chmod(0o755)
    os.chown(exe, 65534, 65534)
    with pytest.raises(UntrustedInterpreterError, match="owned by uid 65534"):
        check_trusted(str(exe))


def test_symlink_to_a_user_writable_file_is_resolved(rootdir: Path, tmp_path: Path) -> None:
    target = tmp_path / "evil"
    shutil.copy("/bin/true", target)
    link = rootdir / "qemu-link"
    link.symlink_to(target)
    with pytest.raises(UntrustedInterpreterError) as info:
        check_trusted(str(link))
    assert str(tmp_path) in info.value.message or "/tmp" in info.value.message


def test_trusted_owners_in_the_initial_namespace() -> None:
    assert 0 in policy.trusted_owners()


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
        policy.PolicyConfig(), HOST_FAMILY, BUILTIN,
        policy.native_headers(BUILTIN, HOST_FAMILY, ["/proc/self/exe"]),
    )  # fmt: skip
    rule = Rule("x", "/bin/true", magic=magic, mask=mask, offset=offset)
    if hijacks:
        with pytest.raises(HostTypeError, match="would match the host's own programs"):
            pol.check_host_types(rule)
    else:
        pol.check_host_types(rule)
    pol.check_host_types(Rule("e", "/bin/true", extension="exe"))  # not ELF: never
