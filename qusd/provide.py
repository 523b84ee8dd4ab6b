"""Registering targets on a table someone else may have filled first.

tonistiigi/binfmt and docker/setup-qemu-action treat a target an existing
entry already serves as done, and on a stock CI runner the distribution's
rules (qemu-user-static's: the same names, flags POF) are loaded before any
step runs. So an entry that already provides a target, with the requested
flags and a usable interpreter, is reported ("provided"), neither replaced
nor an error. Everything else is qusd.table's plan: added, replaced,
unchanged, or in conflict. qusd-binfmt register and --install, qus-register
and the GitHub Action all decide here and register through apply().

Standard library only: the one-shot image and the Action run it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from qusd import interpreters, table
from qusd.binfmt import BinfmtMisc, Entry, Rule, normalize_flags
from qusd.catalog import Target
from qusd.errors import ConflictError, InterpreterError, QusdError
from qusd.policy import check_trusted
from qusd.table import Action, Change, Want


class Listing(table.Table, Protocol):
    """A table whose entries can be listed (BinfmtMisc, the unit tests' fake)."""

    def entries(self) -> list[Entry]: ...


def mounted(path: str) -> BinfmtMisc:
    """binfmt_misc at path, mounted if it is not (a fresh privileged
    container has none), and never unmounted: that would drop the entries."""
    kernel = BinfmtMisc(path)
    if not kernel.is_mounted():
        kernel.mount()
    return kernel


def interpreter_dirs(env: Mapping[str, str]) -> list[str]:
    """Where interpreters are looked for: $QUSD_INTERPRETER_DIRS (colon
    separated), else qusd's store and the usual directories."""
    given = [d for d in env.get("QUSD_INTERPRETER_DIRS", "").split(":") if d]
    return given or list(interpreters.search_path())


# -- does an existing entry already provide a target? ------------------------------


def _header(target: Target) -> bytes:
    """A header the target's programs have: its magic (the masked-out bits
    as QEMU's table writes them)."""
    return target.offset * b"\0" + target.magic


def entry_matches(entry: Entry, target: Target) -> bool:
    """Whether the kernel would hand the target's programs to this entry.
    Compared by behaviour, not by text: distributions' masks differ."""
    return entry.enabled and entry.type == "M" and entry.rule().matches(_header(target))


def unusable(entry: Entry, target: Target, flags: str) -> str | None:
    """Why an entry does not already provide target with flags, or None when
    it does: it matches the target's programs, has every requested flag and
    no C unless C was asked for, and its interpreter is a trusted, statically
    linked executable (static, so it works inside containers too)."""
    if not entry.enabled:
        return "it is disabled"
    if not entry_matches(entry, target):
        return f"it does not match {target.name} programs"
    wanted = normalize_flags(flags)
    missing = "".join(f for f in wanted if f not in entry.flags)
    if missing:
        return f"it lacks flag(s) {missing}"
    if "C" in entry.flags and "C" not in wanted:
        return "it has the C flag (set-uid binaries would run their interpreter as root)"
    try:
        check_trusted(entry.interpreter)
    except QusdError as e:
        return e.message
    if interpreters.is_static_elf(entry.interpreter) is not True:
        return f"{entry.interpreter} is not a statically linked program"
    return None


def provider(entries: Sequence[Entry], target: Target, flags: str) -> Entry | None:
    """The entry that already provides target with flags: the one with the
    target's own name first, else any other that qualifies."""
    named = [e for e in entries if e.name == target.entry_name]
    others = [e for e in entries if e.name != target.entry_name]
    for e in [*named, *others]:
        if unusable(e, target, flags) is None:
            return e
    return None


# -- the plan -------------------------------------------------------------------------


class Result(enum.Enum):
    REGISTERED = "registered"
    REPLACED = "replaced"
    UNCHANGED = "unchanged"
    PROVIDED = "provided"
    CONFLICT = "conflict"
    NO_INTERPRETER = "no interpreter"


#: what the table's plan means for a target no other entry provides
_FROM_ACTION = {
    Action.ADD: Result.REGISTERED,
    Action.REPLACE: Result.REPLACED,
    Action.UNCHANGED: Result.UNCHANGED,
    Action.CONFLICT: Result.CONFLICT,
}


@dataclass(frozen=True)
class Step:
    """One requested target and what becomes (or became) of it."""

    target: Target
    result: Result
    flags: str
    #: the entry found (unchanged, provided), the one in the way (conflict),
    #: after apply() the one registered; None before a registration
    entry: Entry | None = None
    #: the table change behind registered, replaced, unchanged, conflict
    change: Change | None = None
    #: no interpreter: the error that says what was looked for, and where
    missing: QusdError | None = None

    def shown(self) -> tuple[str, str, str]:
        """Name, flags and interpreter to show: of the entry found or made
        (for a conflict: the one in the way), else of the rule to register."""
        if self.entry is not None:
            return self.entry.name, self.entry.flags, self.entry.interpreter
        if self.change is not None:
            rule = self.change.rule
            return rule.name, rule.flags, rule.interpreter
        return self.target.entry_name, "", "-"

    def problem(self, fix: str) -> QusdError | None:
        """Why this target cannot be registered (fix: how to replace an entry
        in the way), or None."""
        if self.missing is not None:
            return self.missing
        if self.result is not Result.CONFLICT:
            return None
        old = self.entry
        assert old is not None
        why = unusable(old, self.target, self.flags)
        return ConflictError(
            f"{old.name} is registered ({old.describe()}) but does not provide "
            f"{self.target.name} with flags {self.flags or '(none)'}: {why}; {fix}",
            name=old.name,
        )


def plan(
    kernel: Listing,
    wants: Iterable[tuple[Target, Rule | QusdError]],
    flags: str,
    replace_others: bool = False,
) -> list[Step]:
    """What registering each target (its rule, or the error that says why
    there is none: no interpreter) means against the table: unchanged when
    the same entry is there, provided when another entry already serves it,
    else the table's plan (registered, replaced, conflict), or no
    interpreter. Nothing is written."""
    wanted = list(wants)
    rules = [r for _, r in wanted if isinstance(r, Rule)]
    changes = {c.name: c for c in table.plan(kernel, [Want(r, replace=replace_others)
                                                       for r in rules])}  # fmt: skip
    entries = kernel.entries()
    steps = []
    for target, rule in wanted:
        change = changes.get(rule.name) if isinstance(rule, Rule) else None
        if change is not None and change.action is Action.UNCHANGED:
            steps.append(Step(target, Result.UNCHANGED, flags, change.before, change))
            continue
        have = provider(entries, target, flags)
        if have is not None:
            steps.append(Step(target, Result.PROVIDED, flags, have))
        elif change is None:
            assert isinstance(rule, QusdError)
            steps.append(Step(target, Result.NO_INTERPRETER, flags, missing=rule))
        else:
            result = _FROM_ACTION[change.action]
            shown = change.before if result is Result.CONFLICT else None
            steps.append(Step(target, result, flags, shown, change))
    return steps


def refuse(steps: Sequence[Step], fix: str) -> None:
    """Raise the first step's problem (fix: how to replace an entry in the way)."""
    for step in steps:
        error = step.problem(fix)
        if error is not None:
            raise error


def apply(kernel: table.Table, steps: Sequence[Step]) -> list[Step]:
    """Register what the steps register, all or nothing, through the table
    transaction; the steps with the entries the kernel now reports. Refuse
    problems first (refuse()): a conflict here is a ConflictError."""
    todo = [s.change for s in steps if s.result in (Result.REGISTERED, Result.REPLACED)]
    if any(s.result is Result.CONFLICT for s in steps):
        refuse(steps, "replace it or remove it first")
    done = table.apply(kernel, [c for c in todo if c is not None])
    return [replace(s, entry=done[s.change.name]) if s.change is not None and
            s.change.name in done else s for s in steps]  # fmt: skip


def ensure(
    kernel: Listing,
    targets: Sequence[Target],
    dirs: Sequence[str],
    flags: str,
    *,
    replace_others: bool = False,
    fix: str,
    interpreter_fix: str,
) -> list[Step]:
    """Every target registered or already provided, all or none: each one's
    interpreter found in dirs (unless another entry provides it), then
    plan, refuse (fix: how to replace an entry in the way; interpreter_fix:
    how to get an interpreter), apply."""
    wants: list[tuple[Target, Rule | QusdError]] = []
    for t in targets:
        try:
            wants.append((t, t.rule(interpreters.require(t, dirs, interpreter_fix).path, flags)))
        except InterpreterError as e:
            wants.append((t, e))
    steps = plan(kernel, wants, flags, replace_others)
    refuse(steps, fix)
    return apply(kernel, steps)


def row(entry: Entry, result: str) -> dict[str, Any]:
    """An entry as qusd-binfmt --json and the Action's `registrations` give it."""
    return {"name": entry.name, "interpreter": entry.interpreter, "flags": entry.flags,
            "enabled": entry.enabled, "result": result}  # fmt: skip


def listing(entries: Iterable[Entry]) -> list[dict[str, Any]]:
    """Entries as qusd-binfmt --json list gives them."""
    return [row(e, "enabled" if e.enabled else "disabled") for e in entries]
