"""The built-in test programs: what they are (parsed back, checked by readelf,
told apart by the catalog) and that each one runs, under its QEMU
interpreter directly and through a real binfmt_misc registration."""

from __future__ import annotations

import errno
import glob
import os
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qusd import catalog, interpreters, probes
from qusd.binfmt import BINPRM_BUF_SIZE
from qusd.catalog import Target
from qusd.probes import BASE, EXPECTED_OUTPUT, EXPECTED_STATUS, ISA, Arch
from tests.conftest import Sandbox

BUILTIN = catalog.builtin()
HOST_FAMILY = catalog.family_of(catalog.host_machine())
#: Debian's qemu-user-static ships these rules (tools/setup-system.sh installs it)
DEBIAN = catalog.from_binfmt_d(["/usr/lib/binfmt.d"])
TARGETS = probes.available()
ELOOP_TEXT = os.strerror(errno.ELOOP)
ENOEXEC_TEXT = os.strerror(errno.ENOEXEC)


# -- an ELF reader of the tests' own ------------------------------------------


@dataclass(frozen=True)
class Elf:
    bits: int
    big: bool
    type: int
    machine: int
    version: int
    entry: int
    flags: int
    ehsize: int
    phentsize: int
    shnum: int
    #: (p_type, p_flags, p_offset, p_vaddr, p_filesz, p_memsz, p_align)
    segments: tuple[tuple[int, int, int, int, int, int, int], ...]


def parse(data: bytes) -> Elf:
    assert data[:4] == b"\x7fELF" and data[6] == 1
    bits, big = {1: 32, 2: 64}[data[4]], {1: False, 2: True}[data[5]]
    e = ">" if big else "<"
    word = "Q" if bits == 64 else "I"
    etype, machine, version, entry, phoff, _sh, flags, ehsize, phentsize, phnum, _se, shnum, _ = (
        struct.unpack_from(e + f"HHI{word}{word}{word}IHHHHHH", data, 16)
    )
    segments = []
    for i in range(phnum):
        at = phoff + i * phentsize
        if bits == 64:
            p_type, p_flags, off, vaddr, _pa, filesz, memsz, align = struct.unpack_from(
                e + "IIQQQQQQ", data, at
            )
        else:
            p_type, off, vaddr, _pa, filesz, memsz, p_flags, align = struct.unpack_from(
                e + "8I", data, at
            )
        segments.append((p_type, p_flags, off, vaddr, filesz, memsz, align))
    return Elf(
        bits, big, etype, machine, version, entry, flags, ehsize, phentsize, shnum,
        tuple(segments),
    )  # fmt: skip


def code_offset(elf: Elf, data: bytes) -> int:
    """Where execution starts in the file (through an ELFv1 descriptor)."""
    entry = elf.entry
    if elf.bits == 64 and elf.machine == 21 and elf.flags & 3 in (0, 1):  # ppc64 ELFv1
        (entry,) = struct.unpack_from(">Q", data, entry - BASE)
    return entry - BASE


# -- what a probe is ------------------------------------------------------------


def test_every_catalog_target_has_a_probe_or_a_reason() -> None:
    assert set(probes.ARCHES) == set(BUILTIN.names())
    assert set(TARGETS) | set(probes.UNAVAILABLE) == set(BUILTIN.names())
    assert not set(TARGETS) & set(probes.UNAVAILABLE)
    assert probes.UNAVAILABLE == {}  # Debian 12's QEMU runs all 34
    with pytest.raises(KeyError, match="not a catalog target"):
        probes.program("vax")


@pytest.mark.parametrize("name", TARGETS)
def test_probe_parses_back(name: str) -> None:
    arch, data = probes.ARCHES[name], probes.program(name)
    elf = parse(data)
    assert (elf.bits, elf.big, elf.machine, elf.flags) == (
        arch.bits, arch.big, arch.machine, arch.flags,
    )  # fmt: skip
    assert (elf.type, elf.version, elf.shnum) == (2, 1, 0)  # ET_EXEC, EV_CURRENT
    assert (elf.ehsize, elf.phentsize) == ((64, 56) if elf.bits == 64 else (52, 32))
    [(p_type, p_flags, off, vaddr, filesz, memsz, align)] = elf.segments
    assert (p_type, p_flags, off) == (1, 5, 0)  # PT_LOAD, R+X, the whole file
    assert filesz == memsz == len(data) and vaddr % align == 0
    assert vaddr <= elf.entry < vaddr + filesz
    start = code_offset(elf, data)
    assert elf.ehsize + elf.phentsize <= start < len(data) and start % 4 == 0
    assert EXPECTED_OUTPUT in data[:start]


@pytest.mark.parametrize("name", TARGETS)
def test_readelf_agrees(tmp_path: Path, name: str) -> None:
    """binutils' readelf, which reads every architecture, sees a sound file."""
    path = tmp_path / name
    path.write_bytes(probes.program(name))
    res = subprocess.run(
        ["readelf", "--wide", "-h", "-l", str(path)], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0 and res.stderr == "", res.stderr
    elf = parse(path.read_bytes())
    assert f"Entry point address:               {elf.entry:#x}" in res.stdout
    assert "Number of program headers:         1" in res.stdout
    [load] = [line for line in res.stdout.splitlines() if line.split()[:1] == ["LOAD"]]
    assert " R E " in load, load
    assert interpreters.is_static_elf(path) is True  # no PT_INTERP: nothing else to load


@pytest.mark.parametrize("name", TARGETS)
def test_catalog_identifies_each_probe_as_its_own_target(name: str) -> None:
    header = probes.program(name)[:BINPRM_BUF_SIZE]
    assert [t.name for t in BUILTIN.matching(header)] == [name]
    found = catalog.identify(header, BUILTIN, HOST_FAMILY)
    assert found.target is not None and found.target.name == name
    assert found.native == (found.target.family == HOST_FAMILY)


@pytest.mark.parametrize("name", sorted(set(DEBIAN.names()) & set(TARGETS)))
def test_debian_rules_pick_the_same_target(name: str) -> None:
    """The distribution's table (other masks, a fixed microblaze magic)
    hands each probe to the same target as the built-in one."""
    assert DEBIAN.matching(probes.program(name))[0].name == name


def test_upstream_microblaze_rule_matches_no_loadable_program() -> None:
    """Why the built-in microblaze rule differs from upstream QEMU's: the
    header upstream's rule wants (e_type 02 00, big endian), QEMU refuses to
    load; the probe matches the fixed rule, as it matches Debian's."""
    assert len(DEBIAN) >= 28, "Debian's qemu-user-static rules are missing in /usr/lib/binfmt.d"
    prog = probes.program("microblaze")
    assert DEBIAN.get("microblaze").matches(prog) and BUILTIN.get("microblaze").matches(prog)
    ours = BUILTIN.get("microblaze")
    upstream = Target("microblaze", "microblaze", ours.magic[:16] + b"\x02\x00" + ours.magic[18:],
                      ours.mask[:16] + b"\xfe\xff" + ours.mask[18:])  # fmt: skip
    assert not upstream.matches(prog)
    upstreamish = prog[:16] + b"\x02\x00" + prog[18:]  # e_type as upstream's magic has it
    assert upstream.matches(upstreamish)
    res = probes.run(upstreamish, via=["/usr/bin/qemu-microblaze-static"])
    assert res.status != 0 and b"Invalid ELF image" in res.stderr, res


# -- the builder, for any header and code ------------------------------------


def _recording_isa(filler: bytes) -> ISA:
    """Instructions that are just data: the loads of constants are filler,
    the message's address is written down where the code would load it."""
    return ISA(
        li=lambda r, v: filler,
        la=lambda r, a: a.to_bytes(8, "big"),
        trap=lambda nr: filler[:1],
        regs=(0, 1, 2, 3),
    )


@st.composite
def arches(draw: st.DrawFn) -> tuple[Arch, bytes]:
    """Any ELF class, endianness, machine and flags; code of any length."""
    wide = draw(st.booleans())
    filler = draw(st.binary(max_size=40))
    arch = Arch(
        bits=64 if wide else 32,
        big=draw(st.booleans()),
        machine=draw(st.integers(0, 0xFFFF)),
        isa=lambda big: _recording_isa(filler),
        numbers=(1, 2),
        flags=draw(st.integers(0, 0xFFFFFFFF)),
        descriptor=wide and draw(st.booleans()),
    )
    return arch, filler


@given(arches())
def test_builder_round_trip(case: tuple[Arch, bytes]) -> None:
    arch, filler = case
    big = arch.big
    data = probes.build(arch)
    elf = parse(data)
    assert (elf.bits, elf.big, elf.machine, elf.flags) == (arch.bits, big, arch.machine, arch.flags)
    [(_, _, off, vaddr, filesz, memsz, _)] = elf.segments
    assert (off, vaddr, filesz, memsz) == (0, BASE, len(data), len(data))
    assert vaddr <= elf.entry < vaddr + filesz
    start = elf.entry - BASE
    if arch.descriptor:
        (code_at,) = struct.unpack_from((">" if big else "<") + "Q", data, start)
        start = code_at - BASE
    # the code is what the ISA produced for the address the message is at
    at = start + 2 * len(filler)  # after the loads of the call number and the fd
    msg = int.from_bytes(data[at : at + 8], "big")
    assert data[msg - BASE : msg - BASE + len(EXPECTED_OUTPUT)] == EXPECTED_OUTPUT
    assert data[start:] == arch.code(msg)


def test_result_ok() -> None:
    assert probes.Result(EXPECTED_STATUS, EXPECTED_OUTPUT, b"").ok
    assert not probes.Result(0, EXPECTED_OUTPUT, b"").ok
    assert not probes.Result(EXPECTED_STATUS, b"", b"").ok


# -- running them ------------------------------------------------------------


def static_interpreters() -> list[str]:
    """The CPUs of Debian's qemu-user-static, as installed."""
    return sorted(
        p[len("/usr/bin/qemu-") : -len("-static")] for p in glob.glob("/usr/bin/qemu-*-static")
    )


def test_every_target_has_debian_interpreters() -> None:
    """Debian 12's qemu-user-static (and qemu-user) cover every catalog CPU;
    the two extra ones (cris, nios2) are not QEMU binfmt targets."""
    cpus = {t.cpu for t in BUILTIN}
    found = set(static_interpreters())
    assert cpus <= found, f"missing: {sorted(cpus - found)} (install qemu-user-static)"
    assert found - cpus <= {"cris", "nios2"}


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", TARGETS)
def test_probe_runs_under_its_interpreter(name: str, static: bool) -> None:
    cpu = BUILTIN.get(name).cpu
    path = f"/usr/bin/qemu-{cpu}-static" if static else f"/usr/bin/qemu-{cpu}"
    assert interpreters.is_static_elf(path) is static, f"{path}: install qemu-user(-static)"
    res = probes.run(probes.program(name), via=[path])
    assert res.ok, res


def _write(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(probes.program(name))
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("name", TARGETS)
def test_probe_runs_through_a_registration(sbx: Sandbox, tmp_path: Path, name: str) -> None:
    """In an empty private table the probe runs only if the host runs it
    natively; with its target's rule registered (F, the static interpreter)
    the kernel hands it to QEMU."""
    target = BUILTIN.get(name)
    interp = interpreters.find(target)
    assert interp is not None and interp.static, f"no static interpreter for {name}"
    path = _write(tmp_path, name)
    before = sbx.run([path])
    native = before.returncode == EXPECTED_STATUS
    if native:
        assert before.stdout == EXPECTED_OUTPUT.decode()
        assert target.family == HOST_FAMILY, "a foreign architecture ran without QEMU"
    else:
        assert ENOEXEC_TEXT in before.stderr, before
    sbx.kernel.register(target.rule(interp.path, "F"))
    after = sbx.run([path])
    if target.matches(interpreters.read_header(interp.path)):
        # the rule claims its own interpreter (the host's architecture): the
        # kernel hands QEMU to QEMU until it gives up
        assert native and ELOOP_TEXT in after.stderr, after
        return
    assert (after.returncode, after.stdout) == (EXPECTED_STATUS, EXPECTED_OUTPUT.decode())
    # probes.run from bytes (a memfd) inside the sandbox, through the same entry
    assert sbx.func("qusd.probes:run", probes.program(name)).ok


def test_host_architecture_runs_natively_with_an_empty_table(sbx: Sandbox) -> None:
    """What host detection builds on: the machine's own target runs with no
    binfmt_misc entry at all; a target of another family does not."""
    assert sbx.kernel.names() == []
    own = catalog.canonical_name(catalog.host_machine())
    assert sbx.func("qusd.probes:run", probes.program(own)).ok
    foreign = next(t.name for t in BUILTIN if t.family != HOST_FAMILY)
    code = (
        "import sys; from qusd import probes\n"
        f"try: probes.run(probes.program({foreign!r}))\n"
        "except OSError as e: sys.exit(e.errno)\n"
    )
    assert sbx.run([sys.executable, "-c", code]).returncode == errno.ENOEXEC


def test_run_takes_bytes_or_a_path_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    own = catalog.canonical_name(catalog.host_machine())
    fds = len(os.listdir("/proc/self/fd"))
    assert probes.run(probes.program(own)).ok  # a memfd
    assert probes.run(_write(tmp_path, own)).ok  # a file
    assert probes.run(str(_write(tmp_path, "arm")), via=["/usr/bin/qemu-arm-static"]).ok
    assert len(os.listdir("/proc/self/fd")) == fds
    monkeypatch.setattr(probes, "_memfd", lambda data: None)  # no memfd: a temporary file
    (tmp_path / "t").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))
    assert probes.run(probes.program(own)).ok
    assert list((tmp_path / "t").iterdir()) == []
