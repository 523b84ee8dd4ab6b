"""The table transaction: the one way qusd changes binfmt_misc.

plan() compares what is wanted with what the kernel holds: each name is
added, replaced, unchanged or in conflict. A Transaction applies changes
and keeps an undo log that puts back exactly what was there (a replaced or
removed entry with its definition and its enabled state); leaving its
`with` block by an exception undoes everything done inside it, so the
caller's last step, persisting the result, is covered too. The daemon
(register, enable, unregister, reset), the boot restore, the reconcile and
qusd-binfmt all go through here.

Standard library only: the boot-restore path and the one-shot image run it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Protocol

from qusd.binfmt import Entry, Rule
from qusd.errors import ConflictError, QusdError

log = logging.getLogger("qusd.table")


class Table(Protocol):
    """What a transaction needs of a binfmt_misc mount (BinfmtMisc, or the
    unit tests' fake kernel)."""

    def get(self, name: str) -> Entry | None: ...
    def register(self, rule: Rule) -> Entry: ...
    def remove(self, name: str) -> None: ...
    def enable(self, name: str) -> None: ...
    def disable(self, name: str) -> None: ...


class Action(enum.Enum):
    ADD = "add"
    REPLACE = "replace"
    UNCHANGED = "unchanged"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class Want:
    """An entry that should be in the table."""

    rule: Rule
    enabled: bool = True
    #: may take the name from another definition
    replace: bool = False


@dataclass(frozen=True)
class Change:
    """What a Want means against the table as it is."""

    action: Action
    rule: Rule  # normalized: as the kernel will report it
    enabled: bool
    before: Entry | None

    @property
    def name(self) -> str:
        return self.rule.name


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)

    def __iter__(self) -> Iterator[Change]:
        return iter(self.changes)

    def of(self, *actions: Action) -> list[Change]:
        return [c for c in self.changes if c.action in actions]

    def refuse_conflicts(self, fix: str) -> None:
        """ConflictError for the first name in conflict; fix says how to replace."""
        for c in self.of(Action.CONFLICT):
            assert c.before is not None
            raise ConflictError(
                f"{c.name} is already registered with another definition "
                f"({c.before.describe()}); {fix}",
                name=c.name,
            )


def plan(table: Table, wants: Iterable[Want]) -> Plan:
    """Each wanted entry against the table: one lookup per name, so the
    cost does not grow with the table. Rules the kernel would refuse are
    refused here (InvalidRuleError), before anything is written."""
    result = Plan()
    for want in wants:
        want.rule.encode()
        rule = want.rule.normalized()
        before = table.get(rule.name)
        if before is None:
            action = Action.ADD
        elif before.rule() == rule:
            action = Action.UNCHANGED
        elif want.replace:
            action = Action.REPLACE
        else:
            action = Action.CONFLICT
        result.changes.append(Change(action, rule, want.enabled, before))
    return result


class Transaction:
    """Kernel changes, each logged with its undo; `with` undoes them all,
    newest first, when its block raises."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self._undo: list[tuple[str, Callable[[], object]]] = []

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self.rollback()
        else:
            self._undo.clear()

    def put(self, rule: Rule, enabled: bool = True, before: Entry | None = None) -> Entry:
        """Register rule (enabled or not); before, the entry of that name now
        in the table, is removed first."""
        if before is not None:
            self.remove(before)
        entry = self.table.register(rule)
        self._undo.append((f"remove {rule.name}", lambda: self.table.remove(rule.name)))
        if not enabled:
            self.table.disable(rule.name)
            entry = replace(entry, enabled=False)
        return entry

    def remove(self, entry: Entry) -> None:
        self.table.remove(entry.name)
        self._undo.append((f"put back {entry.name}", lambda: _put_back(self.table, entry)))

    def set_enabled(self, entry: Entry, enabled: bool) -> None:
        if entry.enabled == enabled:
            return
        (self.table.enable if enabled else self.table.disable)(entry.name)
        back = self.table.enable if entry.enabled else self.table.disable
        self._undo.append((f"{back.__name__} {entry.name} again", lambda: back(entry.name)))

    def apply(self, change: Change) -> Entry | None:
        """Carry out a planned change: the entry it leaves (None for a conflict)."""
        if change.action is Action.ADD:
            return self.put(change.rule, change.enabled)
        if change.action is Action.REPLACE:
            return self.put(change.rule, change.enabled, change.before)
        return change.before if change.action is Action.UNCHANGED else None

    def rollback(self) -> list[str]:
        """Undo everything, newest first; what could not be undone is logged
        and returned (the kernel then holds a mix, which the log names)."""
        failed = []
        for what, step in reversed(self._undo):
            try:
                step()
            except QusdError as e:
                log.error("rollback: could not %s: %s", what, e.message)
                failed.append(what)
        self._undo.clear()
        return failed


def _put_back(table: Table, entry: Entry) -> None:
    table.register(entry.rule())
    if not entry.enabled:
        table.disable(entry.name)


def apply(
    table: Table, changes: Iterable[Change], save: Callable[[], object] | None = None
) -> dict[str, Entry]:
    """All the changes, then save(), or none of them: the entries they leave."""
    done: dict[str, Entry] = {}
    with Transaction(table) as tx:
        for change in changes:
            entry = tx.apply(change)
            if entry is not None:
                done[change.name] = entry
        if save is not None:
            save()
    return done


def apply_each(
    table: Table, changes: Iterable[Change], after: Callable[[Change], object] | None = None
) -> dict[str, QusdError]:
    """Each change on its own (a restore: one entry that cannot come back
    must not keep the others out); a failed replace puts the old entry back.
    after(change), if given, runs once the change is made and undoes it by
    raising. Returns the failures by name."""
    failed: dict[str, QusdError] = {}
    for change in changes:

        def check(change: Change = change) -> None:
            if after is not None:
                after(change)

        try:
            apply(table, [change], save=check)
        except QusdError as e:
            failed[change.name] = e
    return failed
