"""Finding a target's QEMU interpreter, and telling whether it is static.

The F flag makes the kernel open the interpreter once, at registration, so
it then works inside chroots and containers; there its shared libraries are
not, so an F registration wants a statically linked interpreter.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from qusd.binfmt import BINPRM_BUF_SIZE
from qusd.catalog import Catalog, Target, wants_all
from qusd.errors import InterpreterError

DEFAULT_DIRS: tuple[str, ...] = ("/usr/bin", "/usr/local/bin", "/usr/libexec/qemu-binfmt")
#: Where `interpreters install` puts the interpreters it extracts (qusd's
#: own, root-owned directory); searched before the others.
STORE_DIR = "/var/lib/qusd/interpreters"

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
    loader = program_loader(path)
    return None if loader is None else loader == ""


def program_loader(path: str | os.PathLike[str]) -> str | None:
    """The loader an ELF program names in its PT_INTERP (the dynamic linker
    the kernel opens, in the program's root, at exec): "" when it names
    none (static), None when the file is not a readable ELF file."""
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
                fields = endian + "IIQQQQ"  # type, flags, offset, vaddr, paddr, filesz
                at_offset, at_size = 2, 5
            elif ident[4] == 1:  # ELFCLASS32
                phoff, phentsize, phnum = (
                    _unpack(endian + "I", ident, 28),
                    ident[42:44],
                    ident[44:46],
                )
                fields = endian + "IIIIII"  # type, offset, vaddr, paddr, filesz, memsz
                at_offset, at_size = 1, 4
            else:
                return None
            entsize = struct.unpack(endian + "H", phentsize)[0]
            count = struct.unpack(endian + "H", phnum)[0]
            if entsize < struct.calcsize(fields):
                return None
            f.seek(phoff)
            table = f.read(entsize * count)
            for i in range(len(table) // entsize):
                ph = struct.unpack_from(fields, table, i * entsize)
                if ph[0] == _PT_INTERP:
                    f.seek(ph[at_offset])
                    raw = f.read(min(ph[at_size], 4096))
                    return os.fsdecode(raw.split(b"\0", 1)[0]) or "?"
    except (OSError, struct.error):
        return None
    return ""


def _unpack(fmt: str, data: bytes, offset: int) -> int:
    value: int = struct.unpack_from(fmt, data, offset)[0]
    return value


def candidates(target: Target) -> tuple[str, str]:
    """Interpreter file names for a target, preferred first."""
    return (f"qemu-{target.cpu}-static", f"qemu-{target.cpu}")  # QEMU's binaries' names


def search_path(
    dirs: Sequence[str] = DEFAULT_DIRS, store: str | None = STORE_DIR
) -> tuple[str, ...]:
    """The directories searched for interpreters: the store of provisioned
    ones first (an admin installed them on purpose), then dirs."""
    first = (store,) if store else ()
    return tuple(dict.fromkeys((*first, *dirs)))


def foreign_with_interpreters(
    catalog: Catalog,
    host_family: str,
    dirs: Sequence[str] = DEFAULT_DIRS,
    native: Callable[[Target], bool] | None = None,
) -> list[Target]:
    """What registering "everything" means (as for qus and QEMU's script):
    every target the host does not run itself that has an interpreter. The
    host runs what native says (found by trying, qusd.native), else the
    targets of its family."""
    if native is None:
        foreign = catalog.foreign(host_family)
    else:
        foreign = [t for t in catalog if not native(t)]
    return [t for t in foreign if find(t, dirs)]


def chosen(
    catalog: Catalog, names: Sequence[str], host_family: str, dirs: Sequence[str], fix: str
) -> list[Target]:
    """The targets names ask for: none or "all", every foreign target that
    has an interpreter (InterpreterError, naming where and fix, when none
    has); else the named ones."""
    if not wants_all(names):
        return catalog.resolve(names)
    targets = foreign_with_interpreters(catalog, host_family, dirs)
    if not targets:
        raise InterpreterError(
            f"no QEMU interpreter (qemu-<cpu>-static or qemu-<cpu>) in {', '.join(dirs)}: "
            f"nothing to register; {fix}"
        )
    return targets


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


@dataclass(frozen=True)
class FileId:
    """Which file a path names: device and inode say which (an F entry holds
    that file open); size, mtime and ctime say when it last changed. A
    package upgrade writes a new file and renames it over the old one: a new
    inode, so an F entry that opened the old one is told apart from the file
    now there, while a chmod or an edit in place (which the kernel's open
    file sees anyway) is not."""

    dev: int
    ino: int
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> FileId | None:
        """The file a path names now (symlinks followed, as the kernel's F
        open does), or None when there is none."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def same_file(self, other: FileId | None) -> bool:
        return other is not None and (self.dev, self.ino) == (other.dev, other.ino)

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> FileId:
        return cls(**{k: int(doc[k]) for k in ("dev", "ino", "size", "mtime_ns", "ctime_ns")})
