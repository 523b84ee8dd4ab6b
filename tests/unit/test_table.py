"""The table transaction on the fake kernel: every branch of plan(), and
undo that puts back exactly what was there, whichever write fails."""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qusd import catalog, table
from qusd.binfmt import Entry, Rule
from qusd.errors import (
    ConflictError,
    EntryExistsError,
    InterpreterError,
    InvalidRuleError,
    KernelError,
    NoSuchEntryError,
    StateError,
)
from qusd.table import Action, Transaction, Want
from tests.unit.fake_kernel import FakeKernel

CAT = catalog.builtin()
AARCH64 = CAT.get("aarch64").rule("/usr/bin/qemu-aarch64-static")
S390X = CAT.get("s390x").rule("/usr/bin/qemu-s390x-static")
RISCV = CAT.get("riscv64").rule("/usr/bin/qemu-riscv64-static")


def entry(rule: Rule, enabled: bool = True) -> Entry:
    n = rule.normalized()
    return Entry(n.name, enabled, n.interpreter, n.flags, n.type, n.offset, n.magic, n.mask,
                 n.extension)  # fmt: skip


def snapshot(k: FakeKernel) -> dict[str, Entry]:
    return dict(k.table)


# -- plan ---------------------------------------------------------------------------


def test_plan_classifies_each_name() -> None:
    debian = entry(replace(S390X, flags="POF"))
    k = FakeKernel(entry(AARCH64), debian)
    plan = table.plan(k, [Want(AARCH64), Want(S390X), Want(RISCV)])
    assert [(c.name, c.action) for c in plan] == [
        ("qemu-aarch64", Action.UNCHANGED),
        ("qemu-s390x", Action.CONFLICT),
        ("qemu-riscv64", Action.ADD),
    ]
    assert plan.of(Action.CONFLICT)[0].before == debian
    replacing = table.plan(k, [Want(S390X, replace=True)])
    assert [c.action for c in replacing] == [Action.REPLACE]
    assert k.writes == []  # planning writes nothing


def test_plan_refuses_what_the_kernel_would_before_any_write() -> None:
    k = FakeKernel()
    with pytest.raises(InvalidRuleError) as e:
        table.plan(k, [Want(AARCH64), Want(Rule("bad:name", "/bin/true", magic=b"x"))])
    assert e.value.field == "name" and "delimiter" in e.value.reason
    assert k.writes == []


def test_plan_compares_normalized_rules() -> None:
    """C implies O and flags come back in POCF order: asking for "CF" when
    the kernel holds "OCF" is no change."""
    rule = Rule("x", "/bin/true", magic=b"QUSD", flags="FC")
    k = FakeKernel(entry(rule))
    assert [c.action for c in table.plan(k, [Want(rule)])] == [Action.UNCHANGED]


def test_refuse_conflicts_names_the_entry_and_the_fix() -> None:
    k = FakeKernel(entry(Rule("qemu-s390x", "/other", magic=b"QUSD")))
    plan = table.plan(k, [Want(AARCH64), Want(S390X)])
    with pytest.raises(ConflictError) as e:
        plan.refuse_conflicts("pass --replace to overwrite it")
    assert e.value.message == (
        "qemu-s390x is already registered with another definition (interpreter /other, "
        "flags (none)); pass --replace to overwrite it"
    )
    assert e.value.exit_status == 73


# -- apply, all or nothing ---------------------------------------------------------------


def test_apply_adds_and_replaces() -> None:
    k = FakeKernel(entry(Rule("qemu-s390x", "/other", magic=b"QUSD"), enabled=False))
    plan = table.plan(k, [Want(AARCH64), Want(S390X, replace=True)])
    done = table.apply(k, plan)
    assert done["qemu-s390x"].interpreter == S390X.interpreter and done["qemu-s390x"].enabled
    assert set(k.table) == {"qemu-aarch64", "qemu-s390x"}
    assert k.writes == [("register", "qemu-aarch64"), ("remove", "qemu-s390x"),
                        ("register", "qemu-s390x")]  # fmt: skip


@pytest.mark.parametrize("nth", [1, 2, 3])
def test_a_failed_register_undoes_everything_before_it(nth: int) -> None:
    """The Nth registration fails: the ones before are removed, a replaced
    entry comes back with its definition and its disabled state."""
    old = entry(Rule("qemu-s390x", "/other", magic=b"QUSD", flags="P"), enabled=False)
    k = FakeKernel(old)
    before = snapshot(k)
    k.fail("register", errno.EINVAL, nth=nth)
    plan = table.plan(k, [Want(AARCH64), Want(S390X, replace=True), Want(RISCV)])
    with pytest.raises(KernelError, match=r"refused the rule .* as malformed"):
        table.apply(k, plan)
    assert snapshot(k) == before
    assert k.table["qemu-s390x"] == old


@pytest.mark.parametrize(
    ("err", "kind"),
    [(errno.ENOENT, InterpreterError), (errno.EACCES, InterpreterError),
     (errno.ETXTBSY, KernelError), (errno.EEXIST, EntryExistsError)],
)  # fmt: skip
def test_the_kernel_error_is_the_one_raised(err: int, kind: type[Exception]) -> None:
    """Whatever the kernel answers for the second rule reaches the caller,
    not an error from the undo."""
    k = FakeKernel()
    k.fail("register", err, name="qemu-s390x")
    with pytest.raises(kind):
        table.apply(k, table.plan(k, [Want(AARCH64), Want(S390X)]))
    assert k.table == {}


def test_a_failed_save_undoes_the_kernel() -> None:
    old = entry(Rule("qemu-s390x", "/other", magic=b"QUSD"), enabled=False)
    k = FakeKernel(old)

    def save() -> None:
        raise StateError("cannot write state.json: No space left on device")

    with pytest.raises(StateError):
        table.apply(k, table.plan(k, [Want(AARCH64), Want(S390X, replace=True)]), save=save)
    assert k.table == {"qemu-s390x": old}


def aborted(k: FakeKernel, steps: Callable[[Transaction], object], error: Exception) -> None:
    """Run steps in a transaction whose block then raises error."""
    with Transaction(k) as tx:
        steps(tx)
        raise error


def test_undo_goes_on_past_a_step_that_fails() -> None:
    """A step of the undo that fails is reported; the others still run."""
    k = FakeKernel(entry(Rule("a", "/bin/true", magic=b"QUSD")))

    def steps(tx: Transaction) -> None:
        tx.put(AARCH64)
        tx.remove(k.table["a"])
        k.fail("register", errno.EEXIST, name="a")  # putting "a" back will fail

    with pytest.raises(RuntimeError):
        aborted(k, steps, RuntimeError("boom"))
    assert "qemu-aarch64" not in k.table  # undone, though "a" could not be


def test_rollback_reports_what_it_could_not_undo() -> None:
    k = FakeKernel(entry(Rule("a", "/bin/true", magic=b"QUSD")))
    tx = Transaction(k)
    tx.remove(k.table["a"])
    k.fail("register", errno.EINVAL, name="a")
    assert tx.rollback() == ["put back a"]


def test_enable_and_disable_are_undone() -> None:
    k = FakeKernel(entry(AARCH64), entry(S390X, enabled=False))

    def steps(tx: Transaction) -> None:
        tx.set_enabled(k.table["qemu-aarch64"], False)
        tx.set_enabled(k.table["qemu-s390x"], True)
        tx.set_enabled(k.table["qemu-s390x"], True)  # no change, no write

    with pytest.raises(StateError):
        aborted(k, steps, StateError("disk full"))
    assert k.table["qemu-aarch64"].enabled and not k.table["qemu-s390x"].enabled
    assert k.writes.count(("enable", "qemu-s390x")) == 1


def test_put_disabled() -> None:
    k = FakeKernel()
    with Transaction(k) as tx:
        assert not tx.put(AARCH64, enabled=False).enabled
    assert not k.table["qemu-aarch64"].enabled


def test_a_failed_disable_removes_the_new_entry() -> None:
    k = FakeKernel()
    k.fail("disable", errno.EINVAL)
    with pytest.raises(NoSuchEntryError), Transaction(k) as tx:
        tx.put(AARCH64, enabled=False)
    assert k.table == {}


def test_apply_each_keeps_going() -> None:
    """A restore: one entry that cannot come back does not keep the others
    out, and a failed replace puts the old entry back."""
    old = entry(Rule("qemu-s390x", "/other", magic=b"QUSD"))
    k = FakeKernel(old)
    k.fail("register", errno.ENOENT, name="qemu-s390x", nth=1)
    plan = table.plan(k, [Want(AARCH64), Want(S390X, replace=True), Want(RISCV)])
    failed = table.apply_each(k, plan)
    assert list(failed) == ["qemu-s390x"] and isinstance(failed["qemu-s390x"], InterpreterError)
    assert set(k.table) == {"qemu-aarch64", "qemu-s390x", "qemu-riscv64"}
    assert k.table["qemu-s390x"] == old


# -- the property: whatever fails, the table is as it was ------------------------------

TARGETS = [t for t in CAT if t.family != "i386"][:8]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Entry], list[Want], str, int]:
    existing = []
    for t in draw(st.lists(st.sampled_from(TARGETS), unique=True, max_size=5)):
        rule = t.rule(draw(st.sampled_from(["/a", "/b"])), draw(st.sampled_from(["", "F", "PF"])))
        existing.append(entry(rule, enabled=draw(st.booleans())))
    wants = [
        Want(t.rule(draw(st.sampled_from(["/a", "/b"])), "F"), draw(st.booleans()), True)
        for t in draw(st.lists(st.sampled_from(TARGETS), unique=True, min_size=1, max_size=6))
    ]
    op = draw(st.sampled_from(["register", "remove", "disable"]))
    return existing, wants, op, draw(st.integers(1, 6))


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_any_failure_leaves_the_table_as_it_was(
    scenario: tuple[list[Entry], list[Want], str, int],
) -> None:
    existing, wants, op, nth = scenario
    k = FakeKernel(*existing)
    before = snapshot(k)
    k.fail(op, errno.EINVAL, nth=nth)
    plan = table.plan(k, wants)
    try:
        done = table.apply(k, plan)
    except (KernelError, NoSuchEntryError):
        assert snapshot(k) == before
    else:
        for w in wants:
            got = k.table[w.rule.name]
            assert got.rule() == w.rule.normalized() and done[w.rule.name] == got
