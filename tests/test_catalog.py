"""The target catalog: the built-in table, host families, aliases, binfmt.d."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qusd import catalog
from qusd.catalog import Target
from qusd.errors import UnknownTargetError

#: upstream QEMU's table, kept beside the tests (a copy of the project's
#: shared reference), so the comparison runs wherever the checkout is
REFERENCE = Path(__file__).resolve().parent / "data" / "qemu-targets-upstream.tsv"
BUILTIN = catalog.builtin()

QUS_TARGETS = (
    """
    i386 i486 alpha arm armeb sparc32plus ppc ppc64 ppc64le m68k mips mipsel
    mipsn32 mipsn32el mips64 mips64el sh4 sh4eb s390x aarch64 aarch64_be hppa riscv32 riscv64
    xtensa xtensaeb microblaze microblazeel or1k x86_64
    """
).split()


def test_builtin_has_every_upstream_target() -> None:
    assert len(BUILTIN) == 34
    assert set(QUS_TARGETS) | {"sparc", "sparc64", "hexagon", "loongarch64"} == set(BUILTIN.names())


def test_builtin_equals_the_reference_table() -> None:
    with REFERENCE.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["target"] for r in rows] == BUILTIN.names()
    for row, t in zip(rows, BUILTIN, strict=True):
        magic, mask = catalog.unescape(row["magic"]), catalog.unescape(row["mask"])
        if t.name == "microblaze":  # the one deliberate fix (tests/test_probes.py shows why)
            magic, mask = magic[:16] + b"\x00\x02" + magic[18:], mask[:16] + b"\xff\xfe" + mask[18:]
        assert t.family == row["family"]
        assert t.magic == magic
        assert t.mask == mask


def test_interpreter_cpu() -> None:
    assert BUILTIN.get("i486").cpu == "i386"
    assert BUILTIN.get("aarch64").cpu == "aarch64"
    assert BUILTIN.get("aarch64").entry_name == "qemu-aarch64"


@pytest.mark.parametrize(
    ("machine", "family"),
    [
        ("x86_64", "i386"), ("amd64", "i386"), ("i686", "i386"), ("i86pc", "i386"),
        ("aarch64", "arm"), ("arm64", "arm"), ("armv7l", "arm"), ("armv6l", "arm"),
        ("armhf", "arm"), ("armel", "arm"), ("armv5tel", "arm"),
        ("aarch64_be", "armeb"), ("armv7b", "armeb"), ("armeb", "armeb"),
        ("ppc64le", "ppcle"), ("ppc64el", "ppcle"), ("ppc64", "ppc"), ("ppc", "ppc"),
        ("mips64", "mips"), ("mipsel", "mips"), ("sparc64", "sparc"),
        ("loongarch64", "loongarch"), ("s390x", "s390x"), ("riscv64", "riscv64"),
    ],
)  # fmt: skip
def test_family_of(machine: str, family: str) -> None:
    assert catalog.family_of(machine) == family


def test_family_rule_agrees_with_the_table() -> None:
    """family_of() is what binfmt.d targets the table lacks fall back on."""
    assert {t.name for t in BUILTIN if catalog.family_of(t.name) != t.family} == {"sh4eb"}


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("amd64", "x86_64"), ("linux/amd64", "x86_64"), ("arm64", "aarch64"),
        ("linux/arm64", "aarch64"), ("linux/arm64/v8", "aarch64"), ("armhf", "arm"),
        ("armel", "arm"), ("linux/arm/v7", "arm"), ("linux/arm/v6", "arm"),
        ("ppc64el", "ppc64le"), ("linux/ppc64le", "ppc64le"), ("mips64le", "mips64el"),
        ("linux/386", "i386"), ("loong64", "loongarch64"), ("AArch64", "aarch64"),
        ("linux/riscv64", "riscv64"), ("linux/s390x", "s390x"),
    ],
)  # fmt: skip
def test_aliases(alias: str, name: str) -> None:
    assert BUILTIN.get(alias).name == name


def test_unknown_target_names_the_valid_ones() -> None:
    with pytest.raises(UnknownTargetError) as info:
        BUILTIN.get("vax")
    assert "unknown target 'vax'" in info.value.message
    assert "aarch64" in info.value.message and "riscv64" in info.value.message
    assert info.value.details["valid"] == BUILTIN.names()


def test_resolve_dedupes_aliases_in_order() -> None:
    assert [t.name for t in BUILTIN.resolve(["arm64", "s390x", "aarch64", "armhf"])] == [
        "aarch64", "s390x", "arm",
    ]  # fmt: skip


def test_foreign_excludes_the_host_family() -> None:
    foreign = {t.name for t in BUILTIN.foreign("i386")}
    assert not foreign & {"i386", "i486", "x86_64"}
    assert len(foreign) == 31
    arm_host = {t.name for t in BUILTIN.foreign(catalog.family_of("aarch64"))}
    assert not arm_host & {"arm", "aarch64"} and "x86_64" in arm_host


# -- matching: properties ----------------------------------------------------

targets = st.sampled_from(BUILTIN.targets)


def header_for(t: Target, noise: bytes) -> bytes:
    """A header that matches t: its magic, with noise where the mask is 0."""
    head = bytearray(noise.ljust(256, b"\0")[:256])
    for i, (g, m) in enumerate(zip(t.magic, t.mask, strict=True)):
        head[t.offset + i] = (g & m) | (head[t.offset + i] & ~m & 0xFF)
    return bytes(head)


@given(targets, st.binary(min_size=256, max_size=256))
def test_a_header_built_from_a_target_matches_it(t: Target, noise: bytes) -> None:
    header = header_for(t, noise)
    assert t.matches(header)
    assert t in BUILTIN.matching(header)


@given(targets, st.binary(min_size=256, max_size=256), st.data())
def test_flipping_a_masked_bit_breaks_the_match(
    t: Target, noise: bytes, data: st.DataObject
) -> None:
    positions = [(i, bit) for i, m in enumerate(t.mask) for bit in range(8) if m >> bit & 1]
    i, bit = data.draw(st.sampled_from(positions))
    header = bytearray(header_for(t, noise))
    header[t.offset + i] ^= 1 << bit
    assert not t.matches(bytes(header))


@given(st.binary(max_size=300))
def test_matching_agrees_with_matches(header: bytes) -> None:
    assert BUILTIN.matching(header) == [t for t in reversed(BUILTIN.targets) if t.matches(header)]


def test_short_header_never_matches() -> None:
    for t in BUILTIN:
        assert not t.matches(t.magic[:-1])


def test_no_two_builtin_targets_overlap() -> None:
    """Every target's own magic is claimed by that target alone."""
    for t in BUILTIN:
        assert BUILTIN.matching(header_for(t, b"")) == [t]


# -- identify ----------------------------------------------------------------


def test_identify_native_and_foreign() -> None:
    x86 = header_for(BUILTIN.get("x86_64"), b"")
    ident = catalog.identify(x86, BUILTIN, "i386")
    assert (ident.target and ident.target.name, ident.native) == ("x86_64", True)
    ident = catalog.identify(x86, BUILTIN, "arm")
    assert (ident.target and ident.target.name, ident.native) == ("x86_64", False)
    assert catalog.identify(b"#!/bin/sh\n", BUILTIN, "i386").target is None


# -- binfmt.d as a source ----------------------------------------------------


def test_parse_binfmt_d_line() -> None:
    line = r":qemu-arm:M::\x7fELF\x01:\xff\xff\xff\xff\xfe:/usr/bin/qemu-arm-static:OCF"
    assert catalog.parse_binfmt_d_line(line) == (
        "qemu-arm", "M", 0, b"\x7fELF\x01", b"\xff\xff\xff\xff\xfe", "/usr/bin/qemu-arm-static",
        "OCF",
    )  # fmt: skip
    assert catalog.parse_binfmt_d_line("# comment") is None
    assert catalog.parse_binfmt_d_line("; comment") is None
    assert catalog.parse_binfmt_d_line("   ") is None
    ext = catalog.parse_binfmt_d_line(",x,E,,py,,/usr/bin/py,")
    assert ext is not None and ext[:2] == ("x", "E")
    with pytest.raises(ValueError, match="expected 7 fields"):
        catalog.parse_binfmt_d_line(":broken:M:")


def test_binfmt_d_override_order_and_filtering(tmp_path: Path) -> None:
    etc, usr = tmp_path / "etc", tmp_path / "usr"
    etc.mkdir()
    usr.mkdir()
    aarch64 = BUILTIN.get("aarch64")
    magic = "".join(f"\\x{b:02x}" for b in aarch64.magic)
    mask = "".join(f"\\x{b:02x}" for b in aarch64.mask)
    (usr / "qemu-aarch64.conf").write_text(f":qemu-aarch64:M::{magic}:{mask}:/usr/x:OPF\n")
    (etc / "qemu-aarch64.conf").write_text(f"# local\n:qemu-aarch64:M::{magic}:{mask}:/etc/x:F\n")
    (usr / "qemu-cris.conf").write_text(":qemu-cris:M::\\x7fELF\\x01::/usr/cris:\n")
    (usr / "python3.11.conf").write_text(":python3.11:M::\\xa7\\x0d\\x0d\\x0a::/usr/bin/py:\n")
    (usr / "qemu-ext.conf").write_text(":qemu-ext:E::ext::/usr/ext:\n")
    (usr / "junk.conf").write_text("not a rule\n")
    (usr / "README").write_text(":qemu-readme:M::\\x01::/x:\n")
    cat = catalog.from_binfmt_d([etc, usr])
    assert cat.source == "binfmt.d"
    assert cat.names() == ["aarch64", "cris"]
    a = cat.get("arm64")
    assert (a.interpreter, a.flags, a.family, a.magic, a.mask) == (
        "/etc/x", "F", "arm", aarch64.magic, aarch64.mask,
    )  # fmt: skip
    cris = cat.get("cris")
    assert (cris.family, cris.mask, cris.cpu) == ("cris", b"\xff" * 5, "cris")


def test_system_binfmt_d_from_qemu_user_static() -> None:
    if not Path("/usr/lib/binfmt.d/qemu-aarch64.conf").exists():
        pytest.skip("Debian's qemu-user-static is not installed")
    cat = catalog.load("binfmt.d")
    assert {"aarch64", "arm", "s390x", "ppc64le", "mips64el", "riscv64"} <= set(cat.names())
    assert cat.get("aarch64").interpreter == "/usr/libexec/qemu-binfmt/aarch64-binfmt-P"


def test_load_refuses_unknown_source() -> None:
    with pytest.raises(ValueError, match="unknown catalog source"):
        catalog.load("nope")
