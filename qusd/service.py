"""The service: every operation on the table, with qusd's policy.

Synchronous: whoever serves it (qusd.server) serializes the calls. Every
change goes through one table transaction (qusd.table): the kernel first,
the state last, and the kernel undone when the state cannot be written, so
the two never disagree about what qusd manages. Nothing here knows about
HTTP, pydantic or asyncio: the boot-restore path runs this module too.

Ownership: each record names the uid that registered it through qusd. An
admin's entry is qusd's to keep: when another tool puts a different
definition under its name, restore puts qusd's back (drift = "restore") or
reports it (drift = "report"). A user's entry defers to any other
definition (a conflict, reported). Users change only their own entries.
Entries qusd never registered are never touched by restore, reconcile, a
managed reset or a refused request.
"""

from __future__ import annotations

import logging
import operator
import os
import threading
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from qusd import __version__, handoff, interpreters, table
from qusd.binfmt import BinfmtMisc, Entry, Rule
from qusd.catalog import Catalog, Target, family_of, host_machine, is_qemu_entry, wants_all
from qusd.config import Config
from qusd.errors import ForbiddenError, NoSuchEntryError, NotMountedError, QusdError
from qusd.events import Events
from qusd.interpreters import FileId
from qusd.policy import Caller, Pinned, Policy, Role, Trust, native_headers
from qusd.state import Record, State
from qusd.table import Action, Change, Transaction, Want

if TYPE_CHECKING:  # what verify, install and the native probes need, loaded when asked
    from qusd import provision, verify
    from qusd.native import Verdict

log = logging.getLogger("qusd.service")

RESET_SCOPES = ("managed", "qemu", "all")
#: the temporary entry that serves an F entry's programs while it is
#: registered again with an upgraded interpreter (swap_interpreter)
SWAP_NAME = "qusd-swap"
#: real programs of the host's, which no rule may capture
HOST_SAMPLES = ("/proc/self/exe", "/bin/sh")
#: warnings that describe the table now, rebuilt at every restore
_TRANSIENT = ("conflict:", "restore:", "drift:")


@dataclass(frozen=True)
class Registration:
    """A kernel entry as qusd sees it."""

    entry: Entry
    managed: bool
    persistent: bool
    target: str | None
    #: an F entry holding an interpreter file that has since been replaced
    #: (a package upgrade): re-registered at the next reconcile
    interpreter_stale: bool = False
    #: the uid that registered it through qusd (None: qusd did not)
    owner: int | None = None
    #: qusd keeps the name against other definitions (an admin's entry)
    kept: bool = False


#: the table's (the kernel's version and the state's generation), then the
#: interpreters' directories' (Service.version)
Version = tuple[tuple[Hashable, int], Hashable]


@dataclass(frozen=True)
class Snapshot:
    """Every entry as qusd sees it, at one moment: the same object for as
    long as nothing it shows has changed."""

    #: what it was read at (Service.version), None when that is not known
    version: Version | None
    #: the same tuple for as long as every registration is the same
    registrations: tuple[Registration, ...]


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
    #: F entries registered again to follow an upgraded interpreter file
    updated: list[str] = field(default_factory=list)
    #: binfmt_misc-wide repairs: "mounted", "enabled"
    repaired: list[str] = field(default_factory=list)

    def changed(self) -> list[str]:
        """What a reconcile changed in the kernel."""
        return [*self.restored, *self.updated, *self.repaired]

    def summary(self) -> str:
        parts = [f"restored {len(self.restored)}", f"adopted {len(self.adopted)}"]
        if self.conflicts:
            parts.append(f"{len(self.conflicts)} in conflict")
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        if self.updated:
            parts.append(f"{len(self.updated)} interpreter(s) followed")
        if self.repaired:
            parts.append(" and ".join(self.repaired))
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
    #: how native was decided (a probe, the family table, a setting)
    verdict: Verdict | None = None
    #: the interpreter came from `interpreters install`: its package and sha256
    provisioned: provision.Installed | None = None


class Service:
    def __init__(
        self,
        kernel: BinfmtMisc,
        state: State,
        catalog: Catalog,
        config: Config | None = None,
        *,
        sandbox_pid: int | None = None,
        events: Events | None = None,
        policy: Policy | None = None,
        trust: Trust | None = None,
    ) -> None:
        self.kernel = kernel
        self.state = state
        self.catalog = catalog
        self.config = config or Config()
        self.interpreter_dirs = self.config.search_dirs
        self.sandbox_pid = sandbox_pid
        self.events = events or Events(log)
        self.machine = host_machine()
        self.family = family_of(self.machine)
        self.policy = policy or Policy(
            self.config,
            self.family,
            catalog,
            native_headers(catalog, self.family, HOST_SAMPLES),
            trust=trust or Trust.here(),
        )
        #: (code, message) pairs for /v1/status: conflicts, corrupt state, ...
        self.warnings: dict[str, str] = {f"state:{i}": w for i, w in enumerate(state.warnings)}
        self._native: dict[str, Verdict] | None = None
        self._native_lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        #: each entry's registration, by the entry's identity (the kernel
        #: layer hands the same Entry while its file's bytes stay the same)
        self._views: dict[int, tuple[Entry, Record | None, Registration]] = {}
        #: the directories of the interpreter files F records hold, by state
        #: generation (an upgrade there makes an entry's interpreter stale)
        self._stamp_dirs: tuple[int, frozenset[str]] | None = None
        #: changes in flight in another thread (the API's), and the table's
        #: version when the first began (table_version): readers keep to the
        #: last snapshot meanwhile if it was read at that version
        self.busy = 0
        self.busy_from: tuple[Hashable, int] | None = None
        #: the boot hand-off file as last written, and the state generation
        #: it was written from
        self._handoff: tuple[int, str] | None = None
        self._handoff_lock = threading.Lock()
        self._render_handoff = handoff.Renderer()

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

    # -- the boot hand-off (qusd/handoff.py) --------------------------------

    def take_back_handoff(self) -> list[str]:
        """At start, before the restore: remove the entries the boot file
        registered that qusd no longer keeps (the file was one change behind
        when qusd last stopped: a crash before the daemon rewrote it)."""
        if not self.kernel.is_mounted():
            return []
        rules = handoff.read(self.state.directory)
        entries = {r.name: e for r in rules if (e := self.kernel.get(r.name)) is not None}
        stale = handoff.leftovers(rules, self.state.records, entries)
        if not stale:
            return []
        with Transaction(self.kernel) as tx:
            for entry in stale:
                tx.remove(entry)
        names = [e.name for e in stale]
        self.events.emit("unregistered", f"removed {', '.join(names)}: registered at boot from "
                         f"{self.state.directory / handoff.FILENAME}, which was one change "
                         "behind; qusd no longer keeps them", names=names)  # fmt: skip
        return names

    def write_handoff(self) -> bool:
        """Write the boot hand-off file when the state changed since it was
        last written and its text with it; True when written. An error is
        logged (the file is an accelerator: qusd restores at start anyway)."""
        with self._handoff_lock:
            generation, records = self.state.generation, self.state.records
            if self._handoff is not None and self._handoff[0] == generation:
                return False
            text = self._render_handoff(records.values())
            if self._handoff is not None and self._handoff[1] == text:
                self._handoff = (generation, text)
                return False
            try:
                handoff.write(self.state.directory, text)
            except OSError as e:
                log.warning("cannot write %s: %s", self.state.directory / handoff.FILENAME,
                            e.strerror)  # fmt: skip
                return False
            self._handoff = (generation, text)
            return True

    def restore(self) -> RestoreReport:
        """Bring the kernel in line with the state: register what is missing,
        adopt what is there, put back what qusd keeps (an admin's entries)
        where another definition took its place, leave users' entries in
        conflict alone and report them. Every record passes the checks a
        request passes before it is registered again."""
        report = RestoreReport()
        if not self.kernel.is_mounted():
            return report
        before = self.warnings
        self.warnings = {k: v for k, v in before.items() if not k.startswith(_TRANSIENT)}
        records = dict(self.state.records)
        take_back = self.config.drift == "restore"
        wants = [
            Want(r.rule, r.enabled, replace=r.owned and r.persistent and take_back)
            for r in records.values()
        ]
        todo: list[Change] = []
        pins: dict[str, Pinned] = {}
        try:
            for change in table.plan(self.kernel, wants):
                name, rec = change.name, records[change.name]
                if change.action is Action.UNCHANGED:
                    report.adopted.append(name)
                elif change.action is Action.CONFLICT:
                    assert change.before is not None
                    report.conflicts.append(name)
                    self._conflict(before, rec, change.before)
                elif change.action is Action.ADD and not rec.persistent:
                    report.dropped.append(name)
                    del records[name]
                else:
                    try:
                        pin = self.policy.check_record(rec)
                    except QusdError as e:
                        report.failed.append(name)  # the state's record fails a check
                        self._warn(before, f"restore:{name}",
                                   f"could not restore {name}: {e.message}", "refused")  # fmt: skip
                        continue
                    if pin is not None:
                        pins[name] = pin
                    todo.append(change)
            failed = table.apply_each(self.kernel, todo, after=lambda c: _verify(pins.get(c.name)))
        finally:
            for pin in pins.values():
                pin.close()
        self._tell_restored(before, todo, failed, report)
        if report.dropped:
            try:
                self.state.save(records)
            except QusdError as e:
                log.error("%s", e.message)
        return report

    def _tell_restored(
        self,
        before: dict[str, str],
        todo: Sequence[Change],
        failed: dict[str, QusdError],
        report: RestoreReport,
    ) -> None:
        for change in todo:
            name = change.name
            if change.before is not None:  # another definition where qusd keeps its own
                self.events.emit("drift", f"drift: {name} had another definition "
                                 f"({change.before.describe()}), put there by another "
                                 "process; qusd keeps this name", names=[name],
                                 level=logging.WARNING)  # fmt: skip
            if name in failed:
                report.failed.append(name)
                verb = "take back" if change.action is Action.REPLACE else "restore"
                self._warn(before, f"restore:{name}",
                           f"could not {verb} {name}: {failed[name].message}")  # fmt: skip
            elif change.before is not None:
                report.restored.append(name)
                self.events.emit("restored", f"took back {name} from another definition "
                                 f"({change.before.describe()})", names=[name])  # fmt: skip
            else:
                report.restored.append(name)
                self.events.emit("restored", f"restored {name} ({change.rule.interpreter})",
                                 names=[name])  # fmt: skip

    def _conflict(self, before: dict[str, str], rec: Record, there: Entry) -> None:
        """Another definition under a recorded name, left alone: drift for a
        name qusd keeps (drift = "report"), else a conflict."""
        name = rec.rule.name
        if rec.owned and rec.persistent:
            self._warn(before, f"drift:{name}",
                       f"drift: {name} has another definition ({there.describe()}); "
                       'drift = "report": qusd left it (drift = "restore" puts qusd\'s back)',
                       "drift")  # fmt: skip
            return
        why = (
            "not persistent"
            if rec.owned
            else f"registered by uid {rec.owner} as a user, or before qusd kept admins' entries"
        )
        self._warn(before, f"conflict:{name}",
                   f"{name} is in the kernel with another definition ({there.describe()}); "
                   f"qusd left it alone ({why}; an admin who registers it makes qusd keep it)",
                   "conflict")  # fmt: skip

    def _warn(self, before: dict[str, str], key: str, message: str, kind: str = "") -> None:
        """Record a warning; tell it only when it is new."""
        if before.get(key) != message:
            if kind:
                self.events.emit(kind, message, names=[key.partition(":")[2]],
                                 level=logging.WARNING)  # fmt: skip
            else:
                log.warning("%s", message)
        self.warnings[key] = message

    def reconcile(self) -> RestoreReport:
        """restore(), mounting first if binfmt_misc went away: run when the
        table changed underneath (the watcher), on demand, and periodically,
        so that entries another tool flushed (systemd-binfmt does at start)
        come back; then the global status and upgraded interpreters."""
        mounted = self.kernel.is_mounted()
        if not mounted:
            self.ensure_mounted()
        report = self.restore()
        if not mounted and self.kernel.is_mounted():
            report.repaired.append("mounted")
            self.events.emit("restored", f"binfmt_misc was unmounted; mounted it again at "
                             f"{self.kernel.path}", names=[])  # fmt: skip
        if self.kernel.is_mounted():
            self.keep_enabled(report)
            self.follow_interpreters(report)
        return report

    # -- drift: another process changed what qusd keeps ----------------------------

    def should_restore(self, what: str) -> bool:
        """Whether qusd puts back what another process changed (what: "status",
        or an entry's name), or only reports it: the `drift` setting
        ("restore", the default, or "report")."""
        return getattr(self.config, "drift", "restore") != "report"

    def keep_enabled(self, report: RestoreReport) -> None:
        """binfmt_misc disabled as a whole (`echo 0 > status`): every entry
        falls through. Reported once; set back to 1 when drift is restored."""
        try:
            enabled = self.kernel.enabled()
        except QusdError:
            return
        if enabled:
            self.warnings.pop("disabled:status", None)
            return
        key = "disabled:status"
        if not self.should_restore("status"):
            if key not in self.warnings:
                message = ("binfmt_misc was disabled as a whole (status 0) by another process; "
                           "left so (drift = report): enable it with 'echo 1 > "
                           f"{self.kernel.path}/status'")  # fmt: skip
                self.warnings[key] = message
                self.events.emit("drift", message, names=[], level=logging.WARNING)
            return
        self.events.emit("drift", "binfmt_misc was disabled as a whole (status 0) by another "
                         "process", names=[], level=logging.WARNING)  # fmt: skip
        try:
            self.kernel.set_enabled(True)
        except QusdError as e:
            self.warnings[key] = f"binfmt_misc is disabled and could not be enabled: {e.message}"
            log.error("%s", self.warnings[key])
            return
        self.warnings.pop(key, None)
        report.repaired.append("enabled")
        self.events.emit("restored", "enabled binfmt_misc again (status 1)", names=[])

    # -- interpreter upgrades ---------------------------------------------------------

    def _stale(self, rec: Record | None) -> bool:
        """An F record whose interpreter path now holds another file than the
        one the kernel opened when qusd registered it."""
        if rec is None or rec.stamp is None or "F" not in rec.rule.flags:
            return False
        now = FileId.of(rec.rule.interpreter)
        return now is not None and not rec.stamp.same_file(now)

    def follow_interpreters(self, report: RestoreReport) -> None:
        """F entries keep the interpreter file they opened at registration: after
        a package upgrade renamed a new file over it, emulation would go on
        running the old one. Each such entry is registered again, the new file
        taking over with no moment without an entry (swap_interpreter); the
        records keep the stamp of the file each entry now holds."""
        records = dict(self.state.records)
        fresh = set(report.restored)
        changed = False
        for name, rec in self.state.records.items():
            if "F" not in rec.rule.flags:
                continue
            now = FileId.of(rec.rule.interpreter)
            if now is None or (rec.stamp is not None and rec.stamp.same_file(now)):
                continue  # a missing file is restore's to report
            entry = self.kernel.get(name)
            if entry is None or entry.rule() != rec.rule:
                continue  # not in the kernel as qusd registered it
            if rec.stamp is not None and name not in fresh:
                try:
                    # the new file passes what a registration passes
                    pin = self.policy.check_record(rec)
                    try:
                        self.swap_interpreter(entry)
                    finally:
                        if pin is not None:
                            pin.close()
                except QusdError as e:
                    report.failed.append(name)
                    self._warn(self.warnings, f"restore:{name}",
                               f"could not follow the new {rec.rule.interpreter} for {name}: "
                               f"{e.message}")  # fmt: skip
                    continue
                report.updated.append(name)
                self.events.emit("interpreter-updated",
                                 f"registered {name} again: {rec.rule.interpreter} was "
                                 "replaced (upgraded?) and the entry held the old file",
                                 names=[name])  # fmt: skip
            records[name] = replace(rec, stamp=now)
            changed = True
        if changed:
            try:
                self.state.save(records)
            except QusdError as e:
                log.error("%s", e.message)

    def swap_interpreter(self, entry: Entry) -> None:
        """Register entry again so the kernel opens its interpreter file anew.
        While the name is swapped, a copy under a temporary name (newer, so
        matched first) serves the same programs with the new file: there is
        no moment when they find no entry. One transaction: undone as a whole."""
        rule = entry.rule()
        with Transaction(self.kernel) as tx:
            if not entry.enabled:
                tx.put(rule, enabled=False, before=entry)
                return
            leftover = self.kernel.get(SWAP_NAME)
            if leftover is not None:  # from a crash in the middle of a swap
                tx.remove(leftover)
            bridge = tx.put(replace(rule, name=SWAP_NAME))
            tx.put(rule, before=entry)
            tx.remove(bridge)

    # -- reading ----------------------------------------------------------

    def _target_of(self, entry: Entry) -> str | None:
        found = self.catalog.of_entry(entry)
        return found.name if found is not None else None

    def _view(self, entry: Entry) -> Registration:
        rec = self.state.records.get(entry.name)
        mine = rec if rec is not None and rec.rule == entry.rule() else None
        return Registration(
            entry=entry,
            managed=mine is not None,
            persistent=mine is not None and mine.persistent,
            target=self._target_of(entry),
            interpreter_stale=mine is not None and self._stale(mine),
            owner=mine.owner if mine is not None else None,
            kept=mine is not None and mine.owned,
        )

    def registrations(self) -> list[Registration]:
        return list(self.snapshot().registrations)

    def version(self) -> Version | None:
        """A token that moves whenever what registrations() shows may have
        changed: qusd wrote to the table, the watcher saw an event there or
        in an interpreter's directory, the state was saved. None when that
        cannot be told (no watcher: repairs off, or events unavailable)."""
        table = self.table_version()
        if table is None:
            return None
        files = self._stamp_version()
        if files is None:
            return None
        return (table, files)

    def table_version(self) -> tuple[Hashable, int] | None:
        """version()'s first part, the table's and the state's, without the
        interpreters' directories: cheap enough to take before every change."""
        known = self.kernel.version()
        return None if known is None else (known, self.state.generation)

    def _stamp_version(self) -> Hashable | None:
        """How many times the directories of the interpreters F records
        hold have changed (watched for that), or None when they cannot be."""
        generation = self.state.generation
        if self._stamp_dirs is None or self._stamp_dirs[0] != generation:
            dirs: set[str] = set()
            for rec in self.state.records.values():
                if rec.stamp is not None and "F" in rec.rule.flags:
                    path = rec.rule.interpreter
                    dirs.add(os.path.dirname(path))
                    dirs.add(os.path.dirname(os.path.realpath(path)))
            self._stamp_dirs = (generation, frozenset(dirs))
        return self.kernel.watch_files(self._stamp_dirs[1])

    def snapshot(self, settled: bool = False) -> Snapshot:
        """Every entry as qusd sees it. Read again only when version() moved
        (without a version: read, and the last snapshot kept when it shows
        the same), so that whoever serializes it may keep what it made.
        settled: while a change is in flight in another thread, the last
        snapshot, never one read halfway, if it shows the table the change
        found (busy_from); one older than changes already answered would
        contradict them, so the table is read then."""
        last = self._snapshot
        if (
            settled
            and self.busy
            and last is not None
            and last.version is not None
            and last.version[0] == self.busy_from
        ):
            return last
        version = self.version()
        if version is not None and last is not None and last.version == version:
            return last
        records, known, views = self.state.records, self._views, {}
        found = []
        for entry in self.kernel.entries():
            rec = records.get(entry.name)
            hit = known.get(id(entry))
            if hit is not None and hit[0] is entry and hit[1] is rec:
                reg = hit[2]  # the same entry and record: only the file may have moved
                if reg.managed and rec is not None and self._stale(rec) != reg.interpreter_stale:
                    reg = replace(reg, interpreter_stale=not reg.interpreter_stale)
            else:
                reg = self._view(entry)
            views[id(entry)] = (entry, rec, reg)
            found.append(reg)
        self._views = views
        regs = tuple(found)
        if last is not None and last.registrations == regs:
            snap = last if last.version == version else Snapshot(version, last.registrations)
        else:
            snap = Snapshot(version, regs)
        self._snapshot = snap
        return snap

    def registration(self, name: str) -> Registration:
        return self._view(self.kernel.entry(name))

    def targets(self) -> list[TargetInfo]:
        verdicts = self.native()
        stored = self._stored()
        out = []
        for t in self.catalog:
            found = interpreters.find(t, self.interpreter_dirs)
            v = verdicts[t.name]
            out.append(TargetInfo(t, v.native, found, v, stored.get(found.path) if found else None))
        return out

    # -- mutations ----------------------------------------------------------

    def rule_for(self, target: Target, flags: str) -> Rule:
        found = interpreters.require(target, self.interpreter_dirs, "install qemu-user-static")
        return target.rule(found.path, flags)

    def _chosen(self, names: Sequence[str] | None) -> list[Target]:
        """Named targets; with no names, every target of another family than
        the host's that has an interpreter (what qus and QEMU's script do)."""
        if names is not None:
            return self.catalog.resolve(names)
        verdicts = self.native()
        return interpreters.foreign_with_interpreters(
            self.catalog, self.family, self.interpreter_dirs, lambda t: verdicts[t.name].native
        )

    def register_targets(
        self,
        caller: Caller,
        names: Sequence[str] | None,
        flags: str = "F",
        *,
        persistent: bool = True,
        replace_existing: bool = False,
        overrides: Overrides = Overrides(),
    ) -> RegisterResult:
        self.native()  # the policy's checks follow what the host really runs
        targets = self._chosen(names)
        self.policy.check_targets(caller, targets, flags)
        items = [(self.rule_for(t, flags), t.name) for t in targets]
        return self._register(caller, items, persistent, replace_existing, overrides)

    def register_entry(
        self,
        caller: Caller,
        rule: Rule,
        *,
        persistent: bool = True,
        replace_existing: bool = False,
        overrides: Overrides = Overrides(),
    ) -> RegisterResult:
        self.native()
        self.policy.check_entry(caller)
        return self._register(caller, [(rule, None)], persistent, replace_existing, overrides)

    def register_entries(
        self,
        caller: Caller,
        rules: Sequence[Rule],
        *,
        persistent: bool = True,
        replace_existing: bool = False,
        overrides: Overrides = Overrides(),
    ) -> RegisterResult:
        """Custom rules, all or none (an import of binfmt.d or update-binfmts
        entries); each gets the catalog target its pattern is, if any."""
        self.policy.check_entry(caller)
        items = [(r, self._target_of(_as_entry(r))) for r in rules]
        return self._register(caller, items, persistent, replace_existing, overrides)

    def _register(
        self,
        caller: Caller,
        items: Sequence[tuple[Rule, str | None]],
        persistent: bool,
        replace_existing: bool,
        overrides: Overrides,
    ) -> RegisterResult:
        """Register rules (with their catalog target, if any), all or none.
        The record says who asked: an admin's is kept, a user's defers."""
        pins: list[Pinned] = []
        try:
            for rule, _ in items:
                rule.encode()
                pin = self.policy.check_rule(
                    caller, rule, overrides.force, overrides.allow_untrusted_interpreter
                )
                if pin is not None:
                    pins.append(pin)
            self._require_mounted()
            wants = [Want(r, replace=replace_existing) for r, _ in items]
            plan = table.plan(self.kernel, wants)
            plan.refuse_conflicts("replace it explicitly (qusctl register --replace)")
            records = self._records_for(caller, plan, [t for _, t in items], persistent,
                                        overrides)  # fmt: skip
            changing = plan.of(Action.ADD, Action.REPLACE)

            def verify_and_save() -> None:
                for pin in pins:
                    pin.verify()  # the kernel opened the file that was checked
                self._save(records)

            table.apply(self.kernel, changing, save=verify_and_save)
        finally:
            for pin in pins:
                pin.close()
        result = RegisterResult()
        for change in changing:
            rule = change.rule
            self.events.emit("registered",
                             f"registered {rule.name} ({rule.interpreter}, flags {rule.flags})",
                             names=[rule.name], actor=caller.uid)  # fmt: skip
            result.registered.append(self.registration(rule.name))
        result.unchanged = [self.registration(c.name) for c in plan.of(Action.UNCHANGED)]
        return result

    def _records_for(
        self,
        caller: Caller,
        plan: table.Plan,
        targets: Sequence[str | None],
        persistent: bool,
        overrides: Overrides,
    ) -> dict[str, Record]:
        """The records after a registration: each names the caller as its
        owner. Users replace only their own entries, and take over no record
        of someone else's; an entry left unchanged that is not theirs stays
        as it is."""
        records = dict(self.state.records)
        admin = self.policy.role(caller) is Role.ADMIN
        for change, target in zip(plan, targets, strict=True):
            name = change.name
            owner = self._view(change.before).owner if change.before is not None else None
            old = records.get(name)
            if change.action is Action.REPLACE:
                self.policy.check_replace(caller, owner, name)
            elif change.action is Action.ADD and old is not None:
                # recorded, but not in the kernel now (its restore failed)
                self.policy.check_replace(caller, old.owner, name)
            unchanged = change.action is Action.UNCHANGED
            if unchanged and not admin and owner != caller.uid:
                continue  # another tool's, an admin's or another user's: theirs
            # the record says what the kernel will hold: an entry left
            # unchanged keeps its enabled state, a new one is enabled
            enabled = change.before.enabled if unchanged and change.before else True
            # the interpreter file the entry holds: kept for an entry left as
            # it is, taken now for one the kernel is about to open
            stamp = old.stamp if unchanged and old is not None and old.rule == change.rule else None
            records[name] = Record(
                change.rule, persistent, enabled, target, owned=admin,
                stamp=stamp or FileId.of(change.rule.interpreter), owner=caller.uid,
                force=admin and overrides.force,
                allow_untrusted_interpreter=admin and overrides.allow_untrusted_interpreter,
            )  # fmt: skip
        return records

    def set_enabled(self, caller: Caller, name: str, enabled: bool) -> Registration:
        entry = self.kernel.entry(name)
        action = "enable" if enabled else "disable"
        view = self._view(entry)
        self.policy.check_modify(caller, name, view.owner, action)
        records = dict(self.state.records)
        rec = records.get(name)
        if view.managed and rec is not None:
            records[name] = replace(rec, enabled=enabled)
        with Transaction(self.kernel) as tx:
            tx.set_enabled(entry, enabled)
            self._save(records)
        kind = "enabled" if enabled else "disabled"
        self.events.emit(kind, f"{kind} {name}", names=[name], actor=caller.uid)
        return self.registration(name)

    def unregister(self, caller: Caller, name: str) -> None:
        """Remove the entry and its record. A user's record under another
        tool's definition (deferring) goes alone: that entry is not qusd's."""
        entry = self.kernel.get(name) if self.kernel.is_mounted() else None
        rec = self.state.records.get(name)
        if entry is None and rec is None:
            raise NoSuchEntryError(f"no binfmt_misc entry named {name!r}")
        if entry is None or self._view(entry).managed:
            owner = self._view(entry).owner if entry is not None else rec.owner if rec else None
            self.policy.check_modify(caller, name, owner, "unregister")
            self._remove([entry] if entry else [], forget=[name])
        elif (
            rec is not None
            and rec.owner == caller.uid
            and (self.policy.role(caller) is not Role.ADMIN)
        ):
            self._remove([], forget=[name])  # the kernel's entry is another tool's
        else:
            self.policy.check_modify(caller, name, None, "unregister")
            self._remove([entry], forget=[name])
        self.events.emit("unregistered", f"unregistered {name}", names=[name], actor=caller.uid)

    def reset(self, caller: Caller, scope: str = "managed") -> list[str]:
        """Remove what qusd made (what the caller made, for a user), every
        qemu-* entry, or everything."""
        if scope not in RESET_SCOPES:
            raise ValueError(scope)
        self.policy.check_reset(caller, scope)
        self._require_mounted()
        entries = self.kernel.entries()
        if scope == "managed" and self.policy.role(caller) is not Role.ADMIN:
            chosen = [e for e in entries if self._view(e).owner == caller.uid]
            forget = [n for n, r in self.state.records.items() if r.owner == caller.uid]
        elif scope == "managed":
            chosen = [e for e in entries if self._view(e).managed]
            forget = list(self.state.records)
        elif scope == "qemu":
            chosen = [e for e in entries if is_qemu_entry(e.name)]
            forget = [n for n in self.state.records if is_qemu_entry(n)]
        else:
            chosen, forget = entries, list(self.state.records)
        self._remove(chosen, forget)
        names = [e.name for e in chosen]
        removed = ", ".join(names) or "nothing"
        self.events.emit("unregistered", f"reset ({scope}): removed {removed}", names=names,
                         actor=caller.uid)  # fmt: skip
        return names

    def _remove(self, entries: Iterable[Entry], forget: Iterable[str]) -> None:
        """Remove entries from the kernel and names from the state, all or none."""
        records = dict(self.state.records)
        for name in set(forget):
            records.pop(name, None)
        with Transaction(self.kernel) as tx:
            for e in entries:
                tx.remove(e)
            self._save(records)

    def _save(self, records: dict[str, Record]) -> None:
        """Persist records, unless they are what the state holds already
        (told without comparing every record: most are the same objects)."""
        held = self.state.records
        if len(records) != len(held) or (
            not all(map(operator.is_, records.values(), held.values()))
            and any(held.get(name) != rec for name, rec in records.items())
        ):
            self.state.save(records)

    def _require_mounted(self) -> None:
        if not self.kernel.is_mounted():
            raise NotMountedError(
                self.warnings.get("not-mounted")
                or f"binfmt_misc is not mounted at {self.kernel.path}"
            )

    # -- status -------------------------------------------------------------

    def status(self) -> dict[str, object]:
        mounted = self.kernel.is_mounted()
        regs = self.snapshot(settled=True).registrations if mounted else ()
        warnings = list(self.warnings.items())  # at once: a reconcile may change them
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
            "warnings": [{"code": k.split(":")[0], "message": v} for k, v in warnings],
        }

    # -- emulation: what the host runs, proving entries, interpreters ---------

    def native(self) -> dict[str, Verdict]:
        """Whether the host runs each target itself, found once by trying
        (qusd.native; the settings override it); the policy follows it. The
        first call runs the probes: call it off the event loop."""
        with self._native_lock:
            if self._native is None:
                from qusd import native  # noqa: PLC0415 - the probes: only when asked

                cfg = self.config
                self._native = native.detect(
                    self.catalog, self.family, native_targets=cfg.native_targets,
                    emulated_targets=cfg.emulated_targets, probe=cfg.detect_native,
                    kernel=self.kernel,
                )  # fmt: skip
                own = [t for t in self.catalog if self._native[t.name].native]
                self.policy.native_targets = frozenset(t.name for t in own)
                self.policy.native_headers = native_headers(
                    Catalog(tuple(own)), self.family, HOST_SAMPLES
                )
            return self._native

    def verify(self, names: Sequence[str] | None = None) -> list[verify.Check]:
        """Run each registered target's built-in program (or the named
        targets') through the kernel, in a child of this process (so in its
        sandbox, when there is one). Blocks: call it off the event loop."""
        from qusd import verify  # noqa: PLC0415 - only when asked

        if "not-mounted" in self.warnings and not self.kernel.is_mounted():
            self._require_mounted()  # says why qusd could not mount it
        targets = self.catalog.resolve(names) if names is not None else None
        return verify.verify(self.kernel, self.catalog, targets, self.fixed())

    def install_interpreters(
        self, caller: Caller, names: Sequence[str], deb: str | None = None
    ) -> list[provision.Installed]:
        """Admins: extract the targets' interpreters from a qemu-user-static
        package (default: Debian's, downloaded) into the interpreter store.
        Blocks for the download: call it off the event loop."""
        if self.policy.role(caller) is not Role.ADMIN:
            raise ForbiddenError(
                f"installing interpreters is admin-only (members of {self.config.admin_group!r})"
            )
        store = self.config.interpreter_store
        if not store:
            raise ForbiddenError("no interpreter_store is set in the settings: nowhere to install")
        from qusd import provision  # noqa: PLC0415 - only when asked

        done = provision.install(
            self.catalog.foreign(self.family) if wants_all(names) else self.catalog.resolve(names),
            deb,
            store,
            self.config.interpreter_cache,
        )
        for item in done:
            log.info("uid %d installed %s (%s %s, sha256 %s)", caller.uid, item.path,
                     item.package, item.version, item.sha256)  # fmt: skip
        return done

    def interpreters(self) -> tuple[list[provision.Installed], dict[str, FileId]]:
        """The provisioned interpreters, and the files F entries hold."""
        stored = self._stored()
        return [stored[p] for p in sorted(stored)], self.fixed()

    def fixed(self) -> dict[str, FileId]:
        """The interpreter file each F entry qusd registered holds open, as
        recorded when it was registered."""
        return {
            n: r.stamp
            for n, r in self.state.records.items()
            if r.stamp is not None and "F" in r.rule.flags
        }

    def _stored(self) -> dict[str, provision.Installed]:
        store = self.config.interpreter_store
        if not store:
            return {}
        from qusd import provision  # noqa: PLC0415 - only when asked

        return provision.manifest(store)


def _verify(pin: Pinned | None) -> None:
    if pin is not None:
        pin.verify()


def _as_entry(rule: Rule) -> Entry:
    """A rule as the kernel would report it (to name its catalog target)."""
    n = rule.normalized()
    return Entry(n.name, True, n.interpreter, n.flags, n.type, n.offset, n.magic, n.mask,
                 n.extension)  # fmt: skip
