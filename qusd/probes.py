"""Built-in test programs: one tiny static ELF executable per QEMU target.

A probe writes EXPECTED_OUTPUT to stdout with the write system call and
exits with EXPECTED_STATUS, in that architecture's Linux system call ABI.
qusd builds it here as bytes (an ELF header, one PT_LOAD program header,
the message, a few instructions), so proving that a target runs needs no
file shipped and nothing downloaded. Run with no binfmt_misc entry for its
target, a probe tells whether the host executes that architecture itself.

Standard library only: the one-shot tool and the image import this.
"""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

EXPECTED_OUTPUT = b"qusd probe ok\n"
EXPECTED_STATUS = 42
#: Where the one segment is loaded: page-aligned for every architecture's
#: page size (up to 64 KiB), above mmap_min_addr, and such that the message
#: address is (BASE >> 16) << 16 plus a small offset, a two-instruction load.
BASE = 0x400000

_N = len(EXPECTED_OUTPUT)
BIG, LITTLE = True, False


# -- instruction sets ------------------------------------------------------------


@dataclass(frozen=True)
class ISA:
    """The few instructions a probe needs, encoded, and the system call ABI."""

    li: Callable[[int, int], bytes]  # register, small constant
    la: Callable[[int, int], bytes]  # register, the message's address
    trap: Callable[[int], bytes]  # the system call instruction (given the number)
    #: registers: the call number (None: the trap carries it), fd, buffer, count
    regs: tuple[int | None, int, int, int]
    #: the number is loaded in the trap's delay slot (hppa)
    delay: bool = False


def _words(big: bool, fmt: str = "I") -> Callable[..., bytes]:
    return lambda *w: struct.pack((">" if big else "<") + fmt * len(w), *w)


def _mov32(r: int, v: int) -> bytes:  # x86 mov r32, imm32
    return struct.pack("<BI", 0xB8 | r, v)


# registers by number: eax 0, ecx 1, edx 2, ebx 3, esi 6, edi 7
def _i386(big: bool) -> ISA:
    return ISA(_mov32, _mov32, lambda nr: b"\xcd\x80", (0, 3, 1, 2))  # int 0x80


def _x86_64(big: bool) -> ISA:
    return ISA(_mov32, _mov32, lambda nr: b"\x0f\x05", (0, 7, 6, 2))  # syscall


def _aarch64(big: bool) -> ISA:
    w = _words(LITTLE)  # AArch64 fetches instructions little-endian either way

    def movz(r: int, v: int) -> bytes:
        return w(0xD2800000 | v << 5 | r)

    def la(r: int, a: int) -> bytes:  # movz lo; movk hi, lsl #16
        return movz(r, a & 0xFFFF) + w(0xF2A00000 | (a >> 16) << 5 | r)

    return ISA(movz, la, lambda nr: w(0xD4000001), (8, 0, 1, 2))


def _arm(big: bool) -> ISA:
    # ARMv4 immediates only (imm8, rotated), so any ARM CPU runs it; EABI svc 0
    w = _words(big)

    def mov(r: int, v: int, rot: int = 0) -> bytes:
        return w(0xE3A00000 | r << 12 | rot << 8 | v)

    def la(r: int, a: int) -> bytes:  # mov r, #hi ror 16; orr r, r, #lo
        assert a >> 24 == 0 and a & 0xFFFF < 0x100
        return mov(r, a >> 16, 8) + w(0xE3800000 | r << 16 | r << 12 | (a & 0xFF))

    return ISA(mov, la, lambda nr: w(0xEF000000), (7, 0, 1, 2))


def _riscv(big: bool) -> ISA:
    w = _words(LITTLE)

    def addi(r: int, v: int, rs: int = 0) -> bytes:
        return w(v << 20 | rs << 15 | r << 7 | 0x13)

    def la(r: int, a: int) -> bytes:  # lui; addi
        assert a & 0xFFF < 0x800
        return w(a >> 12 << 12 | r << 7 | 0x37) + addi(r, a & 0xFFF, r)

    return ISA(addi, la, lambda nr: w(0x73), (17, 10, 11, 12))


def _s390x(big: bool) -> ISA:
    def lghi(r: int, v: int) -> bytes:
        return struct.pack(">BBH", 0xA7, r << 4 | 9, v)

    def lgfi(r: int, a: int) -> bytes:
        return struct.pack(">BBI", 0xC0, r << 4 | 1, a)

    return ISA(lghi, lgfi, lambda nr: bytes((0x0A, nr)), (None, 2, 3, 4))  # svc NR


def _ppc(big: bool) -> ISA:
    w = _words(big)

    def li(r: int, v: int) -> bytes:  # addi r, 0, v
        return w(14 << 26 | r << 21 | v)

    def la(r: int, a: int) -> bytes:  # lis; ori
        return w(15 << 26 | r << 21 | a >> 16, 24 << 26 | r << 21 | r << 16 | (a & 0xFFFF))

    return ISA(li, la, lambda nr: w(0x44000002), (0, 3, 4, 5))


def _mips(big: bool) -> ISA:
    w = _words(big)

    def addiu(r: int, v: int) -> bytes:
        return w(9 << 26 | r << 16 | v)

    def la(r: int, a: int) -> bytes:  # lui; ori
        return w(15 << 26 | r << 16 | a >> 16, 13 << 26 | r << 21 | r << 16 | (a & 0xFFFF))

    return ISA(addiu, la, lambda nr: w(0x0C), (2, 4, 5, 6))


def _sparc(trap: int) -> Callable[[bool], ISA]:
    # "ta 0x10" for the 32-bit ABI, "ta 0x6d" for the 64-bit one
    def isa(big: bool) -> ISA:
        w = _words(BIG)

        def mov(r: int, v: int, rs: int = 0) -> bytes:  # or rs, v, r
            return w(2 << 30 | r << 25 | 2 << 19 | rs << 14 | 1 << 13 | v)

        def la(r: int, a: int) -> bytes:  # sethi %hi(a); or %lo(a)
            return w(r << 25 | 4 << 22 | a >> 10) + mov(r, a & 0x3FF, r)

        return ISA(mov, la, lambda nr: w(0x91D02000 | trap), (1, 8, 9, 10))

    return isa


def _m68k(big: bool) -> ISA:
    def moveq(r: int, v: int) -> bytes:
        return struct.pack(">H", 0x7000 | r << 9 | v)

    def la(r: int, a: int) -> bytes:  # move.l #a, dr
        return struct.pack(">HI", 0x203C | r << 9, a)

    return ISA(moveq, la, lambda nr: b"\x4e\x40", (0, 1, 2, 3))  # trap #0


def _sh4(big: bool) -> ISA:
    w = _words(big, "H")

    def mov(r: int, v: int) -> bytes:
        assert v < 0x80
        return w(0xE000 | r << 8 | v)

    def la(r: int, a: int) -> bytes:  # mov #hi; shll16; add #lo
        assert a & 0xFFFF < 0x80
        return mov(r, a >> 16) + w(0x4028 | r << 8, 0x7000 | r << 8 | (a & 0xFF))

    return ISA(mov, la, lambda nr: w(0xC313), (3, 4, 5, 6))  # trapa #0x13


def _alpha(big: bool) -> ISA:
    w = _words(LITTLE)

    def lda(r: int, v: int, rb: int = 31, op: int = 0x08) -> bytes:
        return w(op << 26 | r << 21 | rb << 16 | v)

    def la(r: int, a: int) -> bytes:  # ldah; lda
        assert a & 0xFFFF < 0x8000
        return lda(r, a >> 16, op=0x09) + lda(r, a & 0xFFFF, r)

    return ISA(lda, la, lambda nr: w(0x83), (0, 16, 17, 18))  # callsys


def _hppa(big: bool) -> ISA:
    w = _words(BIG)

    def ldo(r: int, v: int, rb: int = 0) -> bytes:  # im14 keeps its sign in bit 0
        return w(0x0D << 26 | rb << 21 | r << 16 | v << 1)

    def la(r: int, a: int) -> bytes:  # ldil L%a (21 bits, scrambled); ldo R%a
        x = a >> 11
        x = (
            (x & 0x100000) >> 20 | (x & 0x0FFE00) >> 8 | (x & 0x000180) << 7
            | (x & 0x00007C) << 14 | (x & 0x000003) << 12
        )  # fmt: skip
        return w(0x08 << 26 | r << 21 | x) + ldo(r, a & 0x7FF, r)

    # ble 0x100(%sr2, %r0): the Linux gateway page
    return ISA(ldo, la, lambda nr: w(0xE4008200), (20, 26, 25, 24), delay=True)


def _loongarch64(big: bool) -> ISA:
    w = _words(LITTLE)

    def addi_w(r: int, v: int) -> bytes:
        return w(0x02800000 | v << 10 | r)

    def la(r: int, a: int) -> bytes:  # lu12i.w; ori
        return w(0x14000000 | (a >> 12) << 5 | r, 0x03800000 | (a & 0xFFF) << 10 | r << 5 | r)

    return ISA(addi_w, la, lambda nr: w(0x002B0000), (11, 4, 5, 6))  # syscall 0


def _xtensa(big: bool) -> ISA:
    # A 24-bit instruction's fields (op0, t, s, r, then op1, op2 or imm8) run
    # from bit 0 up on little-endian cores and from bit 23 down on big ones.
    def insn(*fields: tuple[int, int]) -> bytes:
        word, pos = 0, 0
        for value, width in fields:
            word |= value << (24 - pos - width if big else pos)
            pos += width
        return word.to_bytes(3, "big" if big else "little")

    def movi(t: int, v: int) -> bytes:
        return insn((2, 4), (t, 4), (v >> 8, 4), (0xA, 4), (v & 0xFF, 8))

    def la(r: int, a: int) -> bytes:  # movi hi; slli 12 (coded as 32 - 12); addi lo
        assert a >> 12 < 0x800 and a & 0xFFF < 0x80
        slli = insn((0, 4), (4, 4), (r, 4), (r, 4), (1, 4), (1, 4))
        return movi(r, a >> 12) + slli + insn((2, 4), (r, 4), (r, 4), (0xC, 4), (a & 0xFF, 8))

    syscall = insn((0, 4), (0, 4), (0, 4), (5, 4), (0, 4), (0, 4))
    return ISA(movi, la, lambda nr: syscall, (2, 6, 3, 4))


def _microblaze(big: bool) -> ISA:
    w = _words(big)

    def addik(r: int, v: int) -> bytes:  # addik r, r0, v
        return w(0x30000000 | r << 21 | v)

    def la(r: int, a: int) -> bytes:  # imm hi; addik lo
        return w(0xB0000000 | a >> 16) + addik(r, a & 0xFFFF)

    return ISA(addik, la, lambda nr: w(0xB9CC0008), (12, 5, 6, 7))  # brki r14, 8


def _or1k(big: bool) -> ISA:
    w = _words(BIG)

    def addi(r: int, v: int) -> bytes:  # l.addi r, r0, v
        return w(0x9C000000 | r << 21 | v)

    def la(r: int, a: int) -> bytes:  # l.movhi; l.ori
        return w(0x18000000 | r << 21 | a >> 16, 0xA8000000 | r << 21 | r << 16 | (a & 0xFFFF))

    return ISA(addi, la, lambda nr: w(0x20000001), (11, 3, 4, 5))  # l.sys 1


def _hexagon(big: bool) -> ISA:
    w = _words(LITTLE)  # one instruction a packet: parse bits 11 (0xC000)

    def tfrsi(r: int, v: int) -> bytes:  # r = #v
        assert v < 0x200
        return w(0x7800C000 | v << 5 | r)

    def la(r: int, a: int) -> bytes:  # r.h = #hi; r.l = #lo
        assert a >> 16 < 0x4000 and a & 0xFFFF < 0x4000
        return w(0x7220C000 | r << 16 | a >> 16, 0x7120C000 | r << 16 | (a & 0xFFFF))

    return ISA(tfrsi, la, lambda nr: w(0x5400C004), (6, 0, 1, 2))  # trap0(#1)


def _code(isa: ISA, numbers: tuple[int, int], msg: int) -> bytes:
    """write(1, msg, len); exit(status), in this instruction set."""
    nr, fd, buf, count = isa.regs

    def call(number: int, *loads: bytes) -> bytes:
        set_nr = isa.li(nr, number) if nr is not None else b""
        if isa.delay:
            return b"".join(loads) + isa.trap(number) + set_nr
        return set_nr + b"".join(loads) + isa.trap(number)

    write, exit_ = numbers
    return call(write, isa.li(fd, 1), isa.la(buf, msg), isa.li(count, _N)) + call(
        exit_, isa.li(fd, EXPECTED_STATUS)
    )


# -- the table ----------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """One target's probe: ELF header fields, instruction set, call numbers."""

    bits: int  # ELF class: 32 or 64
    big: bool  # data endianness
    machine: int  # e_machine
    isa: Callable[[bool], ISA]  # given the endianness
    numbers: tuple[int, int]  # the write and exit system calls
    flags: int = 0  # e_flags
    #: ppc64 ELFv1: e_entry names a function descriptor, not code
    descriptor: bool = False

    def code(self, msg: int) -> bytes:
        return _code(self.isa(self.big), self.numbers, msg)


_OLD = (4, 1)  # write and exit in the old tables (i386, arm, m68k, ...)
_GENERIC = (64, 93)  # in asm-generic/unistd.h (aarch64, riscv, loongarch, ...)
_EABI5 = 0x05000000
_MIPS_O32, _MIPS_N32, _MIPS_N64 = 0x70001000, 0x80000020, 0x80000000  # arch | ABI

ARCHES: dict[str, Arch] = {
    "i386": Arch(32, LITTLE, 3, _i386, _OLD),
    "i486": Arch(32, LITTLE, 6, _i386, _OLD),
    "alpha": Arch(64, LITTLE, 0x9026, _alpha, _OLD),
    "arm": Arch(32, LITTLE, 40, _arm, _OLD, _EABI5),
    "armeb": Arch(32, BIG, 40, _arm, _OLD, _EABI5),
    "sparc": Arch(32, BIG, 2, _sparc(0x10), _OLD),
    "sparc32plus": Arch(32, BIG, 18, _sparc(0x10), _OLD, 0x100),  # EF_SPARC_32PLUS
    "sparc64": Arch(64, BIG, 43, _sparc(0x6D), _OLD),
    "ppc": Arch(32, BIG, 20, _ppc, _OLD),
    "ppc64": Arch(64, BIG, 21, _ppc, _OLD, 1, descriptor=True),  # ELFv1
    "ppc64le": Arch(64, LITTLE, 21, _ppc, _OLD, 2),  # ELFv2
    "m68k": Arch(32, BIG, 4, _m68k, _OLD),
    "mips": Arch(32, BIG, 8, _mips, (4004, 4001), _MIPS_O32),
    "mipsel": Arch(32, LITTLE, 8, _mips, (4004, 4001), _MIPS_O32),
    "mipsn32": Arch(32, BIG, 8, _mips, (6001, 6058), _MIPS_N32),
    "mipsn32el": Arch(32, LITTLE, 8, _mips, (6001, 6058), _MIPS_N32),
    "mips64": Arch(64, BIG, 8, _mips, (5001, 5058), _MIPS_N64),
    "mips64el": Arch(64, LITTLE, 8, _mips, (5001, 5058), _MIPS_N64),
    "sh4": Arch(32, LITTLE, 42, _sh4, _OLD),
    "sh4eb": Arch(32, BIG, 42, _sh4, _OLD),
    "s390x": Arch(64, BIG, 22, _s390x, _OLD),
    "aarch64": Arch(64, LITTLE, 183, _aarch64, _GENERIC),
    "aarch64_be": Arch(64, BIG, 183, _aarch64, _GENERIC),
    "hppa": Arch(32, BIG, 15, _hppa, _OLD, 0x210),  # EFA_PARISC_1_1
    "riscv32": Arch(32, LITTLE, 243, _riscv, _GENERIC),
    "riscv64": Arch(64, LITTLE, 243, _riscv, _GENERIC),
    "xtensa": Arch(32, LITTLE, 94, _xtensa, (13, 118)),
    "xtensaeb": Arch(32, BIG, 94, _xtensa, (13, 118)),
    # EM_MICROBLAZE_OLD: what every binfmt rule tests; QEMU takes it and 189
    "microblaze": Arch(32, BIG, 0xBAAB, _microblaze, _OLD),
    "microblazeel": Arch(32, LITTLE, 0xBAAB, _microblaze, _OLD),
    "or1k": Arch(32, BIG, 92, _or1k, _GENERIC),
    "x86_64": Arch(64, LITTLE, 62, _x86_64, (1, 60)),
    "hexagon": Arch(32, LITTLE, 164, _hexagon, _GENERIC, 0x67),  # EF_HEXAGON_MACH_V67
    "loongarch64": Arch(64, LITTLE, 258, _loongarch64, _GENERIC, 0x43),  # LP64D, v1
}

#: Catalog targets without a probe, and why. Empty: Debian 12's QEMU 7.2
#: runs a probe for every one of the 34 (i486 through qemu-i386).
UNAVAILABLE: dict[str, str] = {}


def available() -> list[str]:
    """The targets that have a probe, in table order."""
    return [name for name in ARCHES if name not in UNAVAILABLE]


# -- the ELF builder ----------------------------------------------------------

_PT_LOAD, _PF_X, _PF_R = 1, 1, 4
_PAGE = 0x10000


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


def build(arch: Arch) -> bytes:
    """A static ELF executable: header, one PT_LOAD of the whole file (read +
    execute), the message, then the code (after a function descriptor for
    ELFv1 ppc64)."""
    e = ">" if arch.big else "<"
    wide = arch.bits == 64
    ehsize, phentsize = (64, 56) if wide else (52, 32)
    msg = ehsize + phentsize
    start = _align(msg + len(EXPECTED_OUTPUT), 16)
    code = arch.code(BASE + msg)
    entry = BASE + start
    if arch.descriptor:  # { code address, TOC, environment }
        code = struct.pack(e + "QQQ", entry + 24, 0, 0) + code
    size = start + len(code)
    ident = b"\x7fELF" + bytes((2 if wide else 1, 2 if arch.big else 1, 1)) + bytes(9)
    word = "Q" if wide else "I"
    header = struct.pack(
        e + f"HHI{word}{word}{word}IHHHHHH", 2, arch.machine, 1, entry, ehsize, 0, arch.flags,
        ehsize, phentsize, 1, 0, 0, 0,
    )  # fmt: skip
    load = (_PT_LOAD, 0, BASE, BASE, size, size, _PF_R | _PF_X, _PAGE)
    if wide:  # p_flags moves up to keep the 64-bit fields aligned
        phdr = struct.pack(e + "IIQQQQQQ", _PT_LOAD, _PF_R | _PF_X, *load[1:6], _PAGE)
    else:
        phdr = struct.pack(e + "8I", *load)
    head = ident + header + phdr + EXPECTED_OUTPUT
    return head + bytes(start - len(head)) + code


def program(target: str) -> bytes:
    """The probe for a catalog target name; KeyError names the reason when
    there is none."""
    if target in UNAVAILABLE:
        raise KeyError(f"no probe for {target}: {UNAVAILABLE[target]}")
    arch = ARCHES.get(target)
    if arch is None:
        raise KeyError(f"no probe for {target}: not a catalog target")
    return build(arch)


# -- running one ----------------------------------------------------------------


class Result(NamedTuple):
    status: int  # exit status; -N when killed by signal N
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        """Whether it did what every probe does."""
        return self.status == EXPECTED_STATUS and self.stdout == EXPECTED_OUTPUT


_MFD_EXEC = 0x0010  # Linux >= 6.3: say that this memfd may be executed


def _memfd(data: bytes) -> int | None:
    """A read-only fd of an anonymous file holding data, or None. Read-only:
    the kernel refuses to exec a file someone has open for writing."""
    if not hasattr(os, "memfd_create"):
        return None
    try:
        fd = os.memfd_create("qusd-probe", _MFD_EXEC)
    except OSError as e:
        if e.errno != errno.EINVAL:  # EACCES: memfds may not be executed here
            return None
        try:  # before Linux 6.3 every memfd is executable, and MFD_EXEC unknown
            fd = os.memfd_create("qusd-probe")
        except OSError:
            return None
    try:
        os.write(fd, data)
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    except OSError:
        return None
    finally:
        os.close(fd)


def run(
    program: bytes | str | os.PathLike[str],
    via: Sequence[str] = (),
    timeout: float = 30,
) -> Result:
    """Execute a program (bytes, or a file) through the kernel and capture
    what it does; `via` runs it as `via... PATH` instead (an interpreter
    directly). Bytes go to an anonymous memory file, else to a temporary
    file, so nothing is left behind. OSError when the exec itself fails
    (ENOEXEC: nothing runs this format)."""
    if not isinstance(program, bytes):
        return _run([*via, os.fspath(program)], (), timeout)
    fd = _memfd(program)
    if fd is not None:
        try:
            return _run([*via, f"/proc/self/fd/{fd}"], (fd,), timeout)
        finally:
            os.close(fd)
    with tempfile.TemporaryDirectory(prefix="qusd-probe-") as d:
        path = os.path.join(d, "probe")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755), "wb") as f:
            f.write(program)
        return _run([*via, path], (), timeout)


def _run(argv: list[str], fds: tuple[int, ...], timeout: float) -> Result:
    res = subprocess.run(
        argv,
        check=False,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        pass_fds=fds,
        timeout=timeout,
    )
    return Result(res.returncode, res.stdout, res.stderr)
