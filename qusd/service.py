"""The service: every operation on the table, serialized, all or nothing.

Each mutation changes the kernel first and the state second; when the state
cannot be written the kernel change is undone, so the two never disagree
about what qusd manages. Nothing here knows about HTTP or pydantic: the
boot-restore path runs this module too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from qusd import __version__, interpreters
from qusd.binfmt import BinfmtMisc, Entry, Rule
from qusd.catalog import Catalog, Target, family_of, host_machine
from qusd.errors import (
    ConflictError,
    NoSuchEntryError,
    NotMountedError,
    QusdError,
)
from qusd.events import event
from qusd.policy import Caller, Policy, PolicyConfig, Role, native_headers
from qusd.state import Record, State

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("qusd.service")

RESET_SCOPES = ("managed", "qemu", "all")
_TRANSIENT = ("conflict:", "restore:")


@dataclass(frozen=True)
class Registration:
    """A kernel entry as qusd sees it."""

    entry: Entry
    managed: bool
    persistent: bool
    target: str | None


@dataclass
class RegisterResult:
    registered: list[Registration] = field(default_factory=list)
    unchanged: list[Registration] = field(default_factory=list)


@dataclass
class RestoreReport:
    restored: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"restored {len(self.restored)}", f"adopted {len(self.adopted)}"]
        if self.conflicts:
            parts.append(f"{len(self.conflicts)} in conflict")
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        return ", ".join(parts)


@dataclass(frozen=True)
class Overrides:
    """An admin's explicit "I mean it" for the checks anyone must pass."""

    force: bool = False  # a rule that matches the host's own programs
    allow_untrusted_interpreter: bool = False


@dataclass(frozen=True)
class TargetInfo:
    target: Target
    native: bool
    interpreter: interpreters.Interpreter | None


class _Undo:
    """Kernel changes made so far in one operation, undone in reverse."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, step: Callable[[], object]) -> None:
        self._steps.append((what, step))

    def run(self) -> None:
        for what, step in reversed(self._steps):
            try:
                step()
            except QusdError as e:
                log.error("rollback: could not %s: %s", what, e.message)
        self._steps.clear()


class Service:
    def __init__(
        self,
        kernel: BinfmtMisc,
        state: State,
        catalog: Catalog,
        *,
        interpreter_dirs: Sequence[str] = interpreters.DEFAULT_DIRS,
        sandbox_pid: int | None = None,
        policy: PolicyConfig | None = None,
    ) -> None:
        self.kernel = kernel
        self.state = state
        self.catalog = catalog
        self.interpreter_dirs = tuple(interpreter_dirs)
        self.sandbox_pid = sandbox_pid
        self.machine = host_machine()
        self.family = family_of(self.machine)
        self.policy = Policy(
            policy or PolicyConfig(),
            self.family,
            catalog,
            native_headers(catalog, self.family, ["/proc/self/exe", "/bin/sh"]),
        )
        self._lock: asyncio.Lock | None = None
        #: (code, message) pairs for /v1/status: conflicts, corrupt state, ...
        self.warnings: dict[str, str] = {f"state:{i}": w for i, w in enumerate(state.warnings)}

    @property
    def lock(self) -> asyncio.Lock:
        """Serializes mutations; made on first use, so the restore path never
        imports asyncio (40 ms of a boot-time restore)."""
        if self._lock is None:
            import asyncio  # noqa: PLC0415

            self._lock = asyncio.Lock()
        return self._lock

    # -- start-up ---------------------------------------------------------

    def ensure_mounted(self) -> None:
        """Mount binfmt_misc if it is not; say so in status when we may not."""
        if self.kernel.is_mounted():
            return
        try:
            self.kernel.mount()
            log.info("mounted binfmt_misc at %s", self.kernel.path)
            self.warnings.pop("not-mounted", None)
        except QusdError as e:
            self.warnings["not-mounted"] = e.message
            log.error("%s", e.message)

    def restore(self) -> RestoreReport:
        """Bring the kernel in line with the state: register what is missing,
        adopt what is there, leave conflicts alone and report them."""
        report = RestoreReport()
        if not self.kernel.is_mounted():
            return report
        before = self.warnings
        # conflict and restore warnings describe the table now: rebuilt each time
        self.warnings = {k: v for k, v in before.items() if not k.startswith(_TRANSIENT)}
        records = dict(self.state.records)
        for name, rec in self.state.records.items():
            existing = self.kernel.get(name)
            if existing is not None and existing.rule() == rec.rule:
                report.adopted.append(name)
            elif existing is not None and rec.owned and rec.persistent:
                try:  # an admin replaced it once: qusd keeps the name
                    self.kernel.remove(name)
                    self.kernel.register(rec.rule)
                    if not rec.enabled:
                        self.kernel.disable(name)
                except QusdError as e:
                    report.failed.append(name)
                    self._warn(
                        before, f"restore:{name}", f"could not take back {name}: {e.message}"
                    )
                    continue
                report.restored.append(name)
                log.info(
                    "took back %s from another definition (%s)", name, existing.describe(),
                    extra=event("restored"),
                )  # fmt: skip
            elif existing is not None:
                report.conflicts.append(name)
                self._warn(
                    before,
                    f"conflict:{name}",
                    f"{name} is in the kernel with another definition "
                    f"({existing.describe()}); qusd left it alone (register it with "
                    "replace to make qusd keep it)",
                )
            elif not rec.persistent:
                report.dropped.append(name)
                del records[name]
            else:
                try:
                    self.kernel.register(rec.rule)
                    if not rec.enabled:
                        self.kernel.disable(name)
                except QusdError as e:
                    report.failed.append(name)
                    self._warn(before, f"restore:{name}", f"could not restore {name}: {e.message}")
                    continue
                report.restored.append(name)
                log.info("restored %s (%s)", name, rec.rule.interpreter, extra=event("restored"))
        if report.dropped:
            try:
                self.state.save(records)
            except QusdError as e:
                log.error("%s", e.message)
        return report

    def _warn(self, before: dict[str, str], key: str, message: str) -> None:
        """Record a warning; log it only when it is new."""
        if before.get(key) != message:
            kind = "conflict" if key.startswith("conflict:") else None
            log.warning("%s", message, extra=event(kind) if kind else None)
        self.warnings[key] = message

    async def reconcile(self) -> RestoreReport:
        """restore(), under the lock: run periodically so that entries another
        tool flushed (systemd-binfmt does at start) come back."""
        async with self.lock:
            if not self.kernel.is_mounted():
                self.ensure_mounted()
            return self.restore()

    # -- reading ----------------------------------------------------------

    def _target_of(self, entry: Entry) -> str | None:
        if entry.type == "M":
            for t in self.catalog:
                if (t.offset, t.magic, t.mask) == (entry.offset, entry.magic, entry.mask):
                    return t.name
        if entry.name.startswith("qemu-"):
            try:
                return self.catalog.get(entry.name[len("qemu-") :]).name
            except QusdError:
                return None
        return None

    def _view(self, entry: Entry) -> Registration:
        rec = self.state.records.get(entry.name)
        managed = rec is not None and rec.rule == entry.rule()
        return Registration(
            entry=entry,
            managed=managed,
            persistent=managed and rec is not None and rec.persistent,
            target=self._target_of(entry),
        )

    def registrations(self) -> list[Registration]:
        return [self._view(e) for e in self.kernel.entries()]

    def registration(self, name: str) -> Registration:
        return self._view(self.kernel.entry(name))

    def targets(self) -> list[TargetInfo]:
        return [
            TargetInfo(t, t.family == self.family, interpreters.find(t, self.interpreter_dirs))
            for t in self.catalog
        ]

    # -- mutations ----------------------------------------------------------

    def rule_for(self, target: Target, flags: str) -> Rule:
        found = interpreters.require(target, self.interpreter_dirs, "install qemu-user-static")
        return target.rule(found.path, flags)

    def _chosen(self, names: Sequence[str] | None) -> list[Target]:
        """Named targets; with no names, every target of another family than
        the host's that has an interpreter (what qus and QEMU's script do)."""
        if names is not None:
            return self.catalog.resolve(names)
        return interpreters.foreign_with_interpreters(
            self.catalog, self.family, self.interpreter_dirs
        )

    async def register_targets(
        self,
        caller: Caller,
        names: Sequence[str] | None,
        flags: str = "F",
        *,
        persistent: bool = True,
        replace_existing: bool = False,
        overrides: Overrides = Overrides(),
    ) -> RegisterResult:
        targets = self._chosen(names)
        self.policy.check_targets(caller, targets, flags)
        items = [(self.rule_for(t, flags), t.name) for t in targets]
        return await self._register(
            caller,
            items,
            persistent=persistent,
            replace_existing=replace_existing,
            overrides=overrides,
        )

    async def register_entry(
        self,
        caller: Caller,
        rule: Rule,
        *,
        persistent: bool = True,
        replace_existing: bool = False,
        overrides: Overrides = Overrides(),
    ) -> RegisterResult:
        self.policy.check_entry(caller)
        return await self._register(
            caller,
            [(rule, None)],
            persistent=persistent,
            replace_existing=replace_existing,
            overrides=overrides,
        )

    async def _register(
        self,
        caller: Caller,
        items: Sequence[tuple[Rule, str | None]],
        *,
        persistent: bool,
        replace_existing: bool,
        overrides: Overrides,
    ) -> RegisterResult:
        """Register rules (with their catalog target, if any), all or none."""
        for rule, _ in items:
            rule.encode()
            self.policy.check_rule(
                caller, rule, overrides.force, overrides.allow_untrusted_interpreter
            )
        async with self.lock:
            self._require_mounted()
            result = RegisterResult()
            records = dict(self.state.records)
            plan: list[tuple[Rule, Entry | None]] = []
            for given, target in items:
                rule = given.normalized()
                existing = self.kernel.get(rule.name)
                if existing is not None and existing.rule() == rule:
                    view = self._view(existing)
                    result.unchanged.append(view)
                    if not view.managed and self.policy.role(caller) is not Role.ADMIN:
                        continue  # only an admin may adopt another tool's entry
                elif existing is not None and not replace_existing:
                    raise ConflictError(
                        f"{rule.name} is already registered with another definition "
                        f"({existing.describe()}); replace it explicitly "
                        "(qusctl register --replace)",
                        name=rule.name,
                    )
                else:
                    if existing is not None:
                        self.policy.check_replace(caller, self._view(existing).managed, rule.name)
                    plan.append((rule, existing))
                # the record says what the kernel will hold: an entry left
                # unchanged keeps its enabled state, a new one is enabled
                same = existing is not None and existing.rule() == rule
                enabled = existing.enabled if existing is not None and same else True
                old = records.get(rule.name)
                owned = (existing is not None and not same) or (
                    old is not None and old.owned and old.rule == rule
                )
                records[rule.name] = Record(rule, persistent, enabled, target, owned)
            undo = _Undo()
            try:
                for rule, existing in plan:
                    if existing is not None:
                        self.kernel.remove(rule.name)
                        undo.push(f"re-register {rule.name}", _reregister(self.kernel, existing))
                    self.kernel.register(rule)
                    undo.push(f"remove {rule.name}", _remover(self.kernel, rule.name))
                if records != self.state.records:
                    self.state.save(records)
            except QusdError:
                undo.run()
                raise
            for rule, _ in plan:
                log.info(
                    "registered %s (%s, flags %s)", rule.name, rule.interpreter, rule.flags,
                    extra=event("registered"),
                )  # fmt: skip
                result.registered.append(self._view(self.kernel.entry(rule.name)))
            result.unchanged = [
                self._view(self.kernel.entry(r.entry.name)) for r in result.unchanged
            ]
            return result

    async def set_enabled(self, caller: Caller, name: str, enabled: bool) -> Registration:
        async with self.lock:
            entry = self.kernel.entry(name)
            action = "enable" if enabled else "disable"
            self.policy.check_modify(caller, name, self._view(entry).managed, action)
            if entry.enabled != enabled:
                (self.kernel.enable if enabled else self.kernel.disable)(name)
            view = self._view(self.kernel.entry(name))
            rec = self.state.records.get(name)
            if view.managed and rec is not None and rec.enabled != enabled:
                try:
                    self.state.save({**self.state.records, name: replace(rec, enabled=enabled)})
                except QusdError:
                    (self.kernel.enable if entry.enabled else self.kernel.disable)(name)
                    raise
            log.info("%s %s", "enabled" if enabled else "disabled", name)
            return view

    async def unregister(self, caller: Caller, name: str) -> None:
        async with self.lock:
            entry = self.kernel.get(name) if self.kernel.is_mounted() else None
            if entry is None and name not in self.state.records:
                raise NoSuchEntryError(f"no binfmt_misc entry named {name!r}")
            managed = entry is None or self._view(entry).managed
            self.policy.check_modify(caller, name, managed, "unregister")
            await self._remove([entry] if entry else [], forget=[name])
            log.info("unregistered %s", name, extra=event("unregistered"))

    async def reset(self, caller: Caller, scope: str = "managed") -> list[str]:
        """Remove what qusd made, every qemu-* entry, or everything."""
        if scope not in RESET_SCOPES:
            raise ValueError(scope)
        self.policy.check_reset(caller, scope)
        async with self.lock:
            self._require_mounted()
            entries = self.kernel.entries()
            if scope == "managed":
                chosen = [e for e in entries if self._view(e).managed]
                forget = list(self.state.records)
            elif scope == "qemu":
                chosen = [e for e in entries if e.name.startswith("qemu-")]
                forget = [n for n in self.state.records if n.startswith("qemu-")]
            else:
                chosen, forget = entries, list(self.state.records)
            await self._remove(chosen, forget)
            names = [e.name for e in chosen]
            log.info(
                "reset (%s): removed %s", scope, ", ".join(names) or "nothing",
                extra=event("unregistered"),
            )  # fmt: skip
            return names

    async def _remove(self, entries: Iterable[Entry], forget: Iterable[str]) -> None:
        """Remove entries from the kernel and names from the state; the lock is held."""
        gone = set(forget)
        records = {n: r for n, r in self.state.records.items() if n not in gone}
        undo = _Undo()
        try:
            for e in entries:
                self.kernel.remove(e.name)
                undo.push(f"re-register {e.name}", _reregister(self.kernel, e))
            if records != self.state.records:
                self.state.save(records)
        except QusdError:
            undo.run()
            raise

    def _require_mounted(self) -> None:
        if not self.kernel.is_mounted():
            raise NotMountedError(
                self.warnings.get("not-mounted")
                or f"binfmt_misc is not mounted at {self.kernel.path}"
            )

    # -- status -------------------------------------------------------------

    def status(self) -> dict[str, object]:
        mounted = self.kernel.is_mounted()
        regs = self.registrations() if mounted else []
        return {
            "version": __version__,
            "kernel": os.uname().release,
            "machine": self.machine,
            "family": self.family,
            "binfmt_misc": {
                "path": str(self.kernel.path),
                "mounted": mounted,
                "enabled": self.kernel.enabled() if mounted else None,
            },
            "sandbox": {"pid": self.sandbox_pid} if self.sandbox_pid else None,
            "catalog": self.catalog.source,
            "state_file": str(self.state.path),
            "counts": {
                "entries": len(regs),
                "managed": sum(r.managed for r in regs),
                "persistent": sum(r.persistent for r in regs),
                "recorded": len(self.state.records),
            },
            "warnings": [{"code": k.split(":")[0], "message": v} for k, v in self.warnings.items()],
        }


def _remover(kernel: BinfmtMisc, name: str) -> Callable[[], None]:
    return lambda: kernel.remove(name)


def _reregister(kernel: BinfmtMisc, entry: Entry) -> Callable[[], None]:
    def step() -> None:
        kernel.register(entry.rule())
        if not entry.enabled:
            kernel.disable(entry.name)

    return step
