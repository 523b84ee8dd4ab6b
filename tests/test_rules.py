"""The rule builder: what it writes, what it refuses, and the round trip
through a real kernel for random rules."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qusd.binfmt import MAX_RULE_LENGTH, Entry, Rule, normalize_flags
from qusd.errors import InvalidRuleError
from tests.conftest import Sandbox, needs_sandbox

# -- what it writes ----------------------------------------------------------


def test_every_magic_and_mask_byte_is_escaped() -> None:
    rule = Rule(name="t", interpreter="/bin/x", magic=b"\x00:A", mask=b"\xff\x0f\x00", offset=4)
    assert rule.encode() == rb":t:M:4:\x00\x3a\x41:\xff\x0f\x00:/bin/x:"


def test_extension_rule() -> None:
    rule = Rule(name="wine", interpreter="/usr/bin/wine", extension="exe", flags="P")
    assert rule.type == "E"
    assert rule.encode() == b":wine:E::exe::/usr/bin/wine:P"


def test_normalize_flags() -> None:
    assert normalize_flags("FCP") == "POCF"
    assert normalize_flags("C") == "OC"
    assert normalize_flags("FF") == "F"
    assert normalize_flags("") == ""


def test_parse_entry_files() -> None:
    m = Entry.parse(
        "qemu-arm",
        "disabled\ninterpreter /usr/bin/qemu arm\nflags: OCF\noffset 3\nmagic 7f45\nmask ff00\n",
    )
    assert m == Entry("qemu-arm", False, "/usr/bin/qemu arm", "OCF", "M", 3, b"\x7fE", b"\xff\x00")
    e = Entry.parse("DOSWin", "enabled\ninterpreter /usr/bin/wine\nflags: \nextension .exe\n")
    assert (e.type, e.extension, e.flags, e.magic, e.mask) == ("E", "exe", "", b"", None)
    with pytest.raises(ValueError, match="unexpected first line"):
        Entry.parse("x", "garbage\n")


# -- what it refuses ---------------------------------------------------------

BASE = Rule(name="qemu-test", interpreter="/usr/bin/qemu-test", magic=b"\x7fELF", mask=b"\xff" * 4)

REFUSED = [
    ("name", {"name": ""}),
    ("name", {"name": "a:b"}),
    ("name", {"name": "a\nb"}),
    ("name", {"name": "a\0b"}),
    ("name", {"name": "a/b"}),
    ("name", {"name": "."}),
    ("name", {"name": ".."}),
    ("name", {"name": "register"}),
    ("name", {"name": "status"}),
    ("name", {"name": "x" * 256}),
    ("name", {"name": "a\x7fb"}),
    ("interpreter", {"interpreter": ""}),
    ("interpreter", {"interpreter": "relative/qemu"}),
    ("interpreter", {"interpreter": "/usr/bin/a:b"}),
    ("interpreter", {"interpreter": "/usr/bin/a\nb"}),
    ("interpreter", {"interpreter": "/usr/bin/a\0"}),
    ("flags", {"flags": "X"}),
    ("flags", {"flags": "F\n"}),
    ("flags", {"flags": "f"}),
    ("mask", {"mask": b"\xff"}),
    ("magic", {"magic": b"", "mask": None}),
    ("magic", {"offset": 253}),
    ("offset", {"offset": -1}),
    ("extension", {"magic": b"", "mask": None, "extension": "a/b"}),
    ("extension", {"magic": b"", "mask": None, "extension": "tar.gz"}),
    ("extension", {"magic": b"", "mask": None, "extension": ""}),
    ("extension", {"magic": b"", "mask": None, "extension": "a:b"}),
    ("type", {"extension": "exe"}),
    ("rule", {"interpreter": "/" + "x" * 1900}),
]


@pytest.mark.parametrize(("field", "change"), REFUSED)
def test_refused_with_the_field_named(field: str, change: dict[str, object]) -> None:
    with pytest.raises(InvalidRuleError) as info:
        dataclasses.replace(BASE, **change).encode()  # type: ignore[arg-type]
    assert info.value.field == field
    assert info.value.message.startswith(f"{field}: ")


def test_limits_are_exact() -> None:
    dataclasses.replace(BASE, offset=252).encode()  # 252 + 4 == 256: fits
    dataclasses.replace(BASE, name="x" * 255).encode()
    longest = dataclasses.replace(BASE, interpreter="/" + "x" * 1000)
    room = MAX_RULE_LENGTH - len(longest.encode())
    assert (
        len(dataclasses.replace(longest, interpreter=longest.interpreter + "y" * room).encode())
        == 1920
    )
    with pytest.raises(InvalidRuleError):
        dataclasses.replace(longest, interpreter=longest.interpreter + "y" * (room + 1)).encode()


# -- strategies ----------------------------------------------------------------

safe_chars = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters=":/")
names = st.text(safe_chars, min_size=1, max_size=40).filter(
    lambda n: n not in {".", "..", "register", "status"}
)
paths = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters=":"), max_size=60
).map(lambda p: "/" + p)
exts = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters=":/."),
    min_size=1,
    max_size=20,
)


@st.composite
def valid_rules(draw: st.DrawFn) -> Rule:
    name = draw(names)
    flags = "".join(draw(st.lists(st.sampled_from("POC"), max_size=4)))
    if draw(st.booleans()):
        # F opens the interpreter at registration: give it a real one
        flags += "F"
        interp = "/bin/true"
    else:
        interp = draw(paths)
    if draw(st.integers(0, 4)) == 0:
        return Rule(name=name, interpreter=interp, extension=draw(exts), flags=flags)
    offset = draw(st.integers(0, 255))
    magic = draw(st.binary(min_size=1, max_size=min(256 - offset, 120)))
    mask = draw(st.none() | st.binary(min_size=len(magic), max_size=len(magic)))
    rule = Rule(name=name, interpreter=interp, magic=magic, mask=mask, offset=offset, flags=flags)
    try:
        rule.encode()
    except InvalidRuleError:
        assume(False)
    return rule


hostile_text = st.one_of(
    st.text(min_size=1).filter(lambda s: any(c in s for c in ":\n\0/") or s in {".", ".."}),
    st.sampled_from([":", "\n", "\0", "..", ".", "/", "register", "status", "a:b", "x\n"]),
    st.text(st.characters(min_codepoint=0, max_codepoint=31), min_size=1),
)


@st.composite
def hostile_rules(draw: st.DrawFn) -> tuple[str, Rule]:
    """A valid rule with one field made hostile; returns (field, rule)."""
    rule = draw(valid_rules())
    field = draw(st.sampled_from(["name", "interpreter", "flags", "mask", "offset", "length"]))
    if field == "name":
        bad = draw(hostile_text | st.text(safe_chars, min_size=256, max_size=300))
        return field, dataclasses.replace(rule, name=bad)
    if field == "interpreter":
        bad = draw(
            st.builds(lambda p, h: p + h, paths, st.sampled_from([":", "\n", "\0", "\x1b"]))
            | st.text(min_size=1).filter(lambda s: not s.startswith("/"))
        )
        return field, dataclasses.replace(rule, interpreter=bad)
    if field == "flags":
        bad = draw(st.text(min_size=1).filter(lambda s: bool(set(s) - set("POCF"))))
        return field, dataclasses.replace(rule, flags=bad)
    magic = rule.magic or b"\x7f"
    base = dataclasses.replace(rule, extension=None, magic=magic, mask=None, offset=0)
    if field == "mask":
        n = draw(st.integers(0, 300).filter(lambda n: n != len(magic)))
        return field, dataclasses.replace(base, mask=b"\xff" * n)
    if field == "offset":
        return "magic", dataclasses.replace(base, offset=draw(st.integers(257 - len(magic), 10**6)))
    return "rule", dataclasses.replace(base, interpreter="/" + "i" * draw(st.integers(1920, 5000)))


@given(valid_rules())
def test_valid_rules_encode_within_limits(rule: Rule) -> None:
    line = rule.encode()
    assert 11 <= len(line) <= MAX_RULE_LENGTH
    assert b"\n" not in line and b"\0" not in line
    assert line.count(b":") == 7  # exactly the seven delimiters


@given(hostile_rules())
def test_hostile_fields_are_refused_by_the_builder(case: tuple[str, Rule]) -> None:
    field, rule = case
    with pytest.raises(InvalidRuleError) as info:
        rule.encode()
    # a hostile value may trip an earlier check first, but never pass
    if field in {"name", "mask", "rule"}:
        assert info.value.field in {field, "rule"}


# -- through the real kernel ----------------------------------------------------


@needs_sandbox
def test_random_valid_rules_round_trip_through_the_kernel() -> None:
    box = Sandbox()
    try:

        @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(valid_rules())
        def round_trip(rule: Rule) -> None:
            entry: Entry = box.kernel.register(rule)
            try:
                assert entry.rule() == rule.normalized()
                assert entry.enabled and entry.type == rule.type
            finally:
                box.kernel.remove(rule.name)

        round_trip()
        assert box.kernel.names() == []
    finally:
        box.close()


@needs_sandbox
def test_random_hostile_rules_never_reach_the_kernel() -> None:
    box = Sandbox()
    try:

        @settings(max_examples=100, deadline=None)
        @given(hostile_rules())
        def refused(case: tuple[str, Rule]) -> None:
            _, rule = case
            with pytest.raises(InvalidRuleError):
                box.kernel.register(rule)
            assert box.kernel.names() == []

        refused()
    finally:
        box.close()
