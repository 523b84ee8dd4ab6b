"""Finding a target's QEMU interpreter, and telling whether it is static.

The F flag makes the kernel open the interpreter once, at registration, so
it then works inside chroots and containers; there its shared libraries are
not, so an F registration wants a statically linked interpreter.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from qusd.binfmt import BINPRM_BUF_SIZE
from qusd.catalog import Catalog, Target
from qusd.errors import InterpreterError

DEFAULT_DIRS: tuple[str, ...] = ("/usr/bin", "/usr/local/bin", "/usr/libexec/qemu-binfmt")

_PT_INTERP = 3


@dataclass(frozen=True)
class Interpreter:
    path: str
    static: bool


def read_header(path: str | os.PathLike[str], size: int = BINPRM_BUF_SIZE) -> bytes:
    """The first bytes of a file: what binfmt_misc matches against."""
    with open(path, "rb") as f:
        return f.read(size)


def is_static_elf(path: str | os.PathLike[str]) -> bool | None:
    """True if an ELF file has no PT_INTERP (static or static-pie), False if it
    has one, None if it is not a readable ELF file."""
    try:
        with open(path, "rb") as f:
            ident = f.read(64)
            if len(ident) < 52 or ident[:4] != b"\x7fELF":
                return None
            endian = {1: "<", 2: ">"}.get(ident[5])
            if endian is None:
                return None
            if ident[4] == 2:  # ELFCLASS64
                phoff, phentsize, phnum = (
                    _unpack(endian + "Q", ident, 32),
                    ident[54:56],
                    ident[56:58],
                )
            elif ident[4] == 1:  # ELFCLASS32
                phoff, phentsize, phnum = (
                    _unpack(endian + "I", ident, 28),
                    ident[42:44],
                    ident[44:46],
                )
            else:
                return None
            entsize = struct.unpack(endian + "H", phentsize)[0]
            count = struct.unpack(endian + "H", phnum)[0]
            if entsize < 4:
                return None
            f.seek(phoff)
            table = f.read(entsize * count)
    except OSError:
        return None
    for i in range(len(table) // entsize):
        if struct.unpack_from(endian + "I", table, i * entsize)[0] == _PT_INTERP:
            return False
    return True


def _unpack(fmt: str, data: bytes, offset: int) -> int:
    value: int = struct.unpack_from(fmt, data, offset)[0]
    return value


def candidates(target: Target) -> tuple[str, str]:
    """Interpreter file names for a target, preferred first."""
    return (f"qemu-{target.cpu}-static", f"qemu-{target.cpu}")  # QEMU's binaries' names


def foreign_with_interpreters(
    catalog: Catalog, host_family: str, dirs: Sequence[str] = DEFAULT_DIRS
) -> list[Target]:
    """What registering "everything" means (as for qus and QEMU's script):
    every target of another family than the host's that has an interpreter."""
    return [t for t in catalog.foreign(host_family) if find(t, dirs)]


def require(target: Target, dirs: Sequence[str], fix: str) -> Interpreter:
    """The interpreter for a target, or InterpreterError naming what was
    looked for, where, and fix."""
    found = find(target, dirs)
    if found is None:
        raise InterpreterError(
            f"no interpreter for {target.name}: no {' or '.join(candidates(target))} in "
            f"{', '.join(dirs)}; {fix}",
            target=target.name,
        )
    return found


def find(target: Target, dirs: Sequence[str] = DEFAULT_DIRS) -> Interpreter | None:
    """The interpreter for a target: qemu-<cpu>-static in any directory, else
    qemu-<cpu>, directories searched in order. None when there is none."""
    for name in candidates(target):
        for d in dirs:
            path = os.path.join(d, name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return Interpreter(path, is_static_elf(path) is True)
    return None


#: what identifies an interpreter file: device, inode, size, mtime (ns)
Stamp = tuple[int, int, int, int]


def stamp(path: str | os.PathLike[str]) -> Stamp | None:
    """The file an interpreter path resolves to now (symlinks followed, as
    the kernel's F open does), or None when there is none. A package upgrade
    writes a new file and renames it over the old one: a new inode, so an F
    entry that opened the old one is told apart from the file now there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
