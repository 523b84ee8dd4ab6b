"""What qusd knows about QEMU's targets: ELF magic/mask, family, interpreter.

Two sources: the table built in here (upstream QEMU's qemu-binfmt-conf.sh)
and the qemu entries of the system's binfmt.d files, so a host can follow
the table its installed QEMU ships. Pure data and pure functions: the boot
path imports this, so it stays free of anything heavy.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qusd.binfmt import Rule, magic_matches
from qusd.errors import UnknownTargetError

# target, family, magic, mask (hex), as in QEMU's scripts/qemu-binfmt-conf.sh,
# but for one fix: upstream's microblaze rule wants bytes 16-17 (e_type, big
# endian) to be 02 00, which no loader accepts, so it matched no program; here
# it is 00 02 with mask ff fe (executables and shared objects), as Debian has it.
_UPSTREAM_TABLE = """\
i386          i386          7f454c4601010100000000000000000002000300 fffffffffffefe00fffffffffffffffffeffffff
i486          i386          7f454c4601010100000000000000000002000600 fffffffffffefe00fffffffffffffffffeffffff
alpha         alpha         7f454c4602010100000000000000000002002690 fffffffffffefe00fffffffffffffffffeffffff
arm           arm           7f454c4601010100000000000000000002002800 ffffffffffffff00fffffffffffffffffeffffff
armeb         armeb         7f454c4601020100000000000000000000020028 ffffffffffffff00fffffffffffffffffffeffff
sparc         sparc         7f454c4601020100000000000000000000020002 ffffffffffffff00fffffffffffffffffffeffff
sparc32plus   sparc         7f454c4601020100000000000000000000020012 ffffffffffffff00fffffffffffffffffffeffff
sparc64       sparc         7f454c460202010000000000000000000002002b ffffffffffffff00fffffffffffffffffffeffff
ppc           ppc           7f454c4601020100000000000000000000020014 ffffffffffffff00fffffffffffffffffffeffff
ppc64         ppc           7f454c4602020100000000000000000000020015 ffffffffffffff00fffffffffffffffffffeffff
ppc64le       ppcle         7f454c4602010100000000000000000002001500 ffffffffffffff00fffffffffffffffffeffff00
m68k          m68k          7f454c4601020100000000000000000000020004 fffffffffffffe00fffffffffffffffffffeffff
mips          mips          7f454c46010201000000000000000000000200080000000100000000000000000000000000000000 ffffffffffffff0000fffffffffffffffffeffffffffffff00000000000000000000000000000020
mipsel        mips          7f454c46010101000000000000000000020008000100000000000000000000000000000000000000 ffffffffffffff0000fffffffffffffffeffffffffffffff00000000000000000000000020000000
mipsn32       mips          7f454c46010201000000000000000000000200080000000100000000000000000000000000000020 ffffffffffffff0000fffffffffffffffffeffffffffffff00000000000000000000000000000020
mipsn32el     mips          7f454c46010101000000000000000000020008000100000000000000000000000000000020000000 ffffffffffffff0000fffffffffffffffeffffffffffffff00000000000000000000000020000000
mips64        mips          7f454c4602020100000000000000000000020008 ffffffffffffff0000fffffffffffffffffeffff
mips64el      mips          7f454c4602010100000000000000000002000800 ffffffffffffff0000fffffffffffffffeffffff
sh4           sh4           7f454c4601010100000000000000000002002a00 ffffffffffffff00fffffffffffffffffeffffff
sh4eb         sh4           7f454c460102010000000000000000000002002a ffffffffffffff00fffffffffffffffffffeffff
s390x         s390x         7f454c4602020100000000000000000000020016 ffffffffffffff00fffffffffffffffffffeffff
aarch64       arm           7f454c460201010000000000000000000200b700 ffffffffffffff00fffffffffffffffffeffffff
aarch64_be    armeb         7f454c46020201000000000000000000000200b7 ffffffffffffff00fffffffffffffffffffeffff
hppa          hppa          7f454c460102010000000000000000000002000f ffffffffffffff00fffffffffffffffffffeffff
riscv32       riscv32       7f454c460101010000000000000000000200f300 ffffffffffffff00fffffffffffffffffeffffff
riscv64       riscv64       7f454c460201010000000000000000000200f300 ffffffffffffff00fffffffffffffffffeffffff
xtensa        xtensa        7f454c4601010100000000000000000002005e00 ffffffffffffff00fffffffffffffffffeffffff
xtensaeb      xtensaeb      7f454c460102010000000000000000000002005e ffffffffffffff00fffffffffffffffffffeffff
microblaze    microblaze    7f454c460102010000000000000000000002baab ffffffffffffff00fffffffffffffffffffeffff
microblazeel  microblazeel  7f454c460101010000000000000000000200abba ffffffffffffff00fffffffffffffffffeffffff
or1k          or1k          7f454c460102010000000000000000000002005c ffffffffffffff00fffffffffffffffffffeffff
x86_64        i386          7f454c4602010100000000000000000002003e00 fffffffffffefe00fffffffffffffffffeffffff
hexagon       hexagon       7f454c460101010000000000000000000200a400 ffffffffffffff00fffffffffffffffffeffffff
loongarch64   loongarch     7f454c4602010100000000000000000002000201 fffffffffffffffc00fffffffffffffffeffffff
"""

#: The prefix of every QEMU entry's name (qemu-aarch64), as QEMU's script
#: and every peer spell it.
ENTRY_PREFIX = "qemu-"


def is_qemu_entry(name: str) -> bool:
    return name.startswith(ENTRY_PREFIX)


def target_part(entry_name: str) -> str | None:
    """The target in a qemu-* entry's name, or None for another entry."""
    return entry_name[len(ENTRY_PREFIX) :] if is_qemu_entry(entry_name) else None


#: Where systemd-binfmt reads rules, most important first (binfmt.d(5)).
BINFMT_D_DIRS: tuple[str, ...] = (
    "/etc/binfmt.d",
    "/run/binfmt.d",
    "/usr/local/lib/binfmt.d",
    "/usr/lib/binfmt.d",
)


@dataclass(frozen=True)
class Target:
    """One QEMU user-mode target and the ELF header pattern it runs."""

    name: str
    family: str
    magic: bytes
    mask: bytes
    offset: int = 0
    #: the CPU in the interpreter's name: qemu-<cpu>[-static]
    cpu: str = ""
    #: the interpreter and flags the catalog source suggests (binfmt.d), if any
    interpreter: str | None = None
    flags: str | None = None

    def __post_init__(self) -> None:
        if not self.cpu:
            object.__setattr__(self, "cpu", "i386" if self.name == "i486" else self.name)

    @property
    def entry_name(self) -> str:
        """The binfmt_misc entry QEMU's script and every peer use."""
        return ENTRY_PREFIX + self.name

    def rule(self, interpreter: str, flags: str = "F") -> Rule:
        """The binfmt_misc rule that hands this target's programs to interpreter."""
        return Rule(
            name=self.entry_name,
            interpreter=interpreter,
            magic=self.magic,
            mask=self.mask,
            offset=self.offset,
            flags=flags,
        )

    def matches(self, header: bytes) -> bool:
        """Whether the kernel would hand a file with this header to the target."""
        return magic_matches(header, self.offset, self.magic, self.mask)


def _parse_table(text: str) -> tuple[Target, ...]:
    targets = []
    for line in text.splitlines():
        name, family, magic, mask = line.split()
        targets.append(Target(name, family, bytes.fromhex(magic), bytes.fromhex(mask)))
    return tuple(targets)


# -- host family ------------------------------------------------------------


def family_of(machine: str) -> str:
    """The family of a `uname -m` (or Debian arch) name, as qemu-binfmt-conf.sh says.

    Targets of the host's family are not registered by default: the host is
    assumed to run them natively.
    """
    m = machine.strip().lower()
    if m in {"amd64", "i386", "i486", "i586", "i686", "i86pc", "bepc", "x86_64"}:
        return "i386"
    if m.startswith("mips"):
        return "mips"
    if m in {"power macintosh", "ppc64", "powerpc", "ppc"}:
        return "ppc"
    if m in {"ppc64el", "ppc64le"}:
        return "ppcle"
    if m in {"arm", "armel", "armhf", "arm64", "aarch64"} or re.fullmatch(r"armv[4-9].*l", m):
        return "arm"
    if m in {"armeb", "aarch64_be"} or re.fullmatch(r"armv[4-9].*b", m):
        return "armeb"
    if m.startswith("sparc"):
        return "sparc"
    if m.startswith("loongarch"):
        return "loongarch"
    return m


def host_machine() -> str:
    return os.uname().machine


# -- names users give -------------------------------------------------------

# Debian architectures, Docker/OCI platforms and `uname -m` spellings.
ALIASES: dict[str, str] = {
    "amd64": "x86_64",
    "x86-64": "x86_64",
    "x64": "x86_64",
    "386": "i386",
    "i586": "i386",
    "i686": "i386",
    "arm64": "aarch64",
    "arm64v8": "aarch64",
    "armhf": "arm",
    "armel": "arm",
    "armv5l": "arm",
    "armv5tel": "arm",
    "armv6l": "arm",
    "armv7l": "arm",
    "armv8l": "arm",
    "arm32v5": "arm",
    "arm32v6": "arm",
    "arm32v7": "arm",
    "arm/v5": "arm",
    "arm/v6": "arm",
    "arm/v7": "arm",
    "arm64/v8": "aarch64",
    "ppc64el": "ppc64le",
    "powerpc": "ppc",
    "powerpc64": "ppc64",
    "powerpc64le": "ppc64le",
    "mips64le": "mips64el",
    "mipsle": "mipsel",
    "loong64": "loongarch64",
    "parisc": "hppa",
    "or1200": "or1k",
}


def canonical_name(name: str) -> str:
    """Map an alias (arm64, linux/arm/v7, ppc64el, ...) to a catalog target name."""
    n = name.strip().lower()
    if n.startswith("linux/"):
        n = n[len("linux/") :]
    return ALIASES.get(n, n)


# -- the catalog -------------------------------------------------------------


@dataclass(frozen=True)
class Catalog:
    """An ordered set of targets; the order is the order they are registered in."""

    targets: tuple[Target, ...]
    source: str = "builtin"
    _by_name: dict[str, Target] = field(init=False, repr=False, compare=False)
    _by_pattern: dict[tuple[int, bytes, bytes], Target] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {t.name: t for t in self.targets})
        patterns = {(t.offset, t.magic, t.mask): t for t in reversed(self.targets)}
        object.__setattr__(self, "_by_pattern", patterns)

    def __iter__(self) -> Iterator[Target]:
        return iter(self.targets)

    def __len__(self) -> int:
        return len(self.targets)

    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    def get(self, name: str) -> Target:
        """The target for a name or alias; UnknownTargetError lists the valid ones."""
        target = self.find(name)
        if target is None:
            raise UnknownTargetError(
                f"unknown target {name!r}; known targets: {', '.join(self.names())}",
                target=name,
                valid=self.names(),
            )
        return target

    def find(self, name: str) -> Target | None:
        """The target for a name or alias, or None."""
        return self._by_name.get(canonical_name(name))

    def with_pattern(self, offset: int, magic: bytes, mask: bytes | None) -> Target | None:
        """The target registered with exactly this offset, magic and mask."""
        if mask is None:
            return None
        return self._by_pattern.get((offset, magic, mask))

    def resolve(self, names: Iterable[str]) -> list[Target]:
        """Targets for names, in the order given, without duplicates."""
        seen: dict[str, Target] = {}
        for n in names:
            t = self.get(n)
            seen.setdefault(t.name, t)
        return list(seen.values())

    def foreign(self, host_family: str) -> list[Target]:
        """Targets of another family than the host's: what `register` with no
        target registers, as qus and QEMU's script do."""
        return [t for t in self.targets if t.family != host_family]

    def matching(self, header: bytes) -> list[Target]:
        """Targets whose magic/mask match the header, in the order the kernel
        would try them had the whole catalog been registered in catalog
        order (binfmt_misc searches the newest entry first)."""
        return [t for t in reversed(self.targets) if t.matches(header)]


def builtin() -> Catalog:
    return _BUILTIN


_BUILTIN = Catalog(_parse_table(_UPSTREAM_TABLE), "builtin")


# -- binfmt.d as a catalog source -------------------------------------------


def binfmt_d_files(dirs: Sequence[str | os.PathLike[str]] = BINFMT_D_DIRS) -> list[Path]:
    """The *.conf files systemd-binfmt would read, a same-named file in an
    earlier directory hiding later ones, sorted by file name."""
    chosen: dict[str, Path] = {}
    for d in dirs:
        p = Path(d)
        if not p.is_dir():
            continue
        for f in p.iterdir():
            if f.suffix == ".conf" and f.name not in chosen:
                chosen[f.name] = f
    return [chosen[n] for n in sorted(chosen)]


def parse_binfmt_d_line(line: str) -> tuple[str, str, int, bytes, bytes | None, str, str] | None:
    """Parse one binfmt.d rule: (name, type, offset, magic, mask, interpreter, flags).

    Returns None for blank lines and comments. Magic and mask are decoded the
    way the kernel decodes them (\\xHH escapes).
    """
    line = line.strip()
    if not line or line[0] in "#;":
        return None
    delim = line[0]
    parts = line[1:].split(delim)
    if len(parts) < 6:
        raise ValueError(f"expected 7 fields, got {len(parts) + 1}")
    name, kind, offset, magic, mask, interpreter = parts[:6]
    flags = parts[6] if len(parts) > 6 else ""
    return (
        name,
        kind,
        int(offset or "0"),
        unescape(magic),
        unescape(mask) if mask else None,
        interpreter,
        flags,
    )


_HEX_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{1,2})")


def unescape(text: str) -> bytes:
    """Decode binfmt_misc's \\xHH escapes; other bytes stand for themselves."""
    return _HEX_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), os.fsencode(text))


def from_binfmt_d(dirs: Sequence[str | os.PathLike[str]] = BINFMT_D_DIRS) -> Catalog:
    """A catalog of the qemu-* magic rules in the system's binfmt.d files.

    Family and interpreter CPU come from the built-in catalog when it knows
    the target, else from the name (QEMU's family rule) and the interpreter.
    """
    targets: list[Target] = []
    for path in binfmt_d_files(dirs):
        for line in path.read_text(errors="replace").splitlines():
            try:
                rule = parse_binfmt_d_line(line)
            except ValueError:
                continue  # systemd-binfmt skips malformed lines too
            if rule is None:
                continue
            name, kind, offset, magic, mask, interpreter, flags = rule
            tname = target_part(name)
            if kind != "M" or tname is None:
                continue
            known = _BUILTIN._by_name.get(tname)
            targets.append(
                Target(
                    name=tname,
                    family=known.family if known else family_of(tname),
                    magic=magic,
                    mask=mask if mask is not None else b"\xff" * len(magic),
                    offset=offset,
                    cpu=known.cpu if known else tname,
                    interpreter=interpreter,
                    flags=flags,
                )
            )
    return Catalog(tuple(targets), "binfmt.d")


def load(source: str = "builtin") -> Catalog:
    """The catalog named by a configuration value: builtin or binfmt.d."""
    if source == "builtin":
        return _BUILTIN
    if source == "binfmt.d":
        return from_binfmt_d()
    raise ValueError(f"unknown catalog source {source!r}; use 'builtin' or 'binfmt.d'")


@dataclass(frozen=True)
class Identification:
    """Which target runs a file: the first match in kernel order, or native."""

    target: Target | None
    native: bool
    matches: tuple[Target, ...]


def identify(header: bytes, catalog: Catalog, host_family: str) -> Identification:
    """What runs a program with this header on a host of host_family.

    Nativeness is the host's business, not the catalog's (Debian's binfmt.d
    leaves out the host's own family), so it is judged on the built-in table.
    """
    matches = tuple(catalog.matching(header))
    native = [t for t in _BUILTIN.matching(header) if t.family == host_family]
    if native:
        return Identification(native[0], True, matches)
    return Identification(matches[0] if matches else None, False, matches)
