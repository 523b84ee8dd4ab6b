"""What qusd has registered, kept on disk so it can be restored at start.

Two files: state.json, a snapshot of every record (versioned, one record a
line, replaced atomically: temp file, fsync, rename, fsync of the
directory), and state.journal, the changes since, one line per save
appended and fdatasync'ed. A save costs what changed, not the table's size
(one line instead of a 250 KB document at 1000 records); when the journal
has grown as large as the snapshot (at least JOURNAL_MIN bytes) the next
save writes a new snapshot and empties the journal (compaction), so the
bytes written per save stay flat on average. Every line carries a sequence
number and the snapshot the last one it holds: a crash between the new
snapshot and the emptied journal replays nothing twice, and a line torn by
a crash (no newline yet) is a save that never returned, ignored. A file
that cannot be read is moved aside, never dropped.

What the state holds is registered at every start, so whoever can change it
chooses what runs in every foreign exec: the directory and the files must be
root's (or, in rootless mode, the user's who runs qusd) and writable by
nobody else (check_directory, as sshd's StrictModes), state.json and
state.journal regular files; the temporary file is made with
O_EXCL|O_NOFOLLOW.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import operator
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qusd import paths
from qusd.binfmt import Rule
from qusd.errors import InvalidRuleError, QusdError, StateError, UnsafeStateError
from qusd.interpreters import FileId

VERSION = 1
FILENAME = "state.json"
JOURNAL = "state.journal"
LOCK = ".lock"
#: the journal is compacted when it reaches the snapshot's size, or this
JOURNAL_MIN = 16384

log = logging.getLogger("qusd.state")


@dataclass(frozen=True)
class Record:
    """One registration qusd made (it is "managed")."""

    rule: Rule
    persistent: bool = True
    enabled: bool = True
    target: str | None = None
    #: qusd keeps the name ("kept" in the API): an admin registered it, so
    #: when another tool puts a different definition there (a distribution's
    #: binfmt.d rules, which systemd-binfmt registers at every boot), qusd
    #: puts its own back (drift = "restore"). A user's entry defers.
    owned: bool = False
    #: the interpreter file an F entry holds open (taken when qusd
    #: registered it): another file there now means an upgrade
    stamp: FileId | None = None
    #: the uid that registered it through qusd; users may change only their
    #: own. Records from before owners were recorded load as root's (0).
    owner: int = 0
    #: the overrides an admin gave, honoured again at every restore (the
    #: checks themselves run again: the machine may have changed)
    force: bool = False
    allow_untrusted_interpreter: bool = False

    def to_json(self) -> dict[str, Any]:
        r = self.rule
        return {
            "name": r.name,
            "type": r.type,
            "offset": r.offset,
            "magic": r.magic.hex(),
            "mask": r.mask.hex() if r.mask is not None else None,
            "extension": r.extension,
            "interpreter": r.interpreter,
            "flags": r.flags,
            "persistent": self.persistent,
            "enabled": self.enabled,
            "target": self.target,
            "owned": self.owned,
            "owner": self.owner,
            "force": self.force,
            "allow_untrusted_interpreter": self.allow_untrusted_interpreter,
            **({"interpreter_file": self.stamp.to_json()} if self.stamp is not None else {}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Record:
        rule = Rule(
            name=_typed(d, "name", str),
            interpreter=_typed(d, "interpreter", str),
            magic=bytes.fromhex(_typed(d, "magic", str)),
            mask=bytes.fromhex(m) if (m := d.get("mask")) is not None else None,
            offset=_typed(d, "offset", int),
            extension=d.get("extension"),
            flags=_typed(d, "flags", str),
        )
        rule.encode()  # refuse a record the kernel would refuse
        rule = rule.normalized()
        target = d.get("target")
        if target is not None and not isinstance(target, str):
            raise TypeError("target must be str")
        owner = _typed(d, "owner", int) if "owner" in d else 0  # before owners: root's
        if owner < 0:
            raise ValueError("owner must be a uid")
        return cls(
            rule,
            _typed(d, "persistent", bool),
            _typed(d, "enabled", bool),
            target,
            owned=_flag(d, "owned"),
            stamp=_file_id(d.get("interpreter_file")),
            owner=owner,
            force=_flag(d, "force"),
            allow_untrusted_interpreter=_flag(d, "allow_untrusted_interpreter"),
        )


def _flag(d: dict[str, Any], key: str) -> bool:
    return bool(_typed(d, key, bool)) if key in d else False


def _file_id(value: Any) -> FileId | None:
    """An interpreter file's identity from the state file; one that does not
    parse is dropped (the next reconcile takes a new one)."""
    try:
        return FileId.from_json(value) if isinstance(value, dict) else None
    except (KeyError, TypeError, ValueError):
        return None


def _typed(d: dict[str, Any], key: str, kind: type) -> Any:
    value = d[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{key} must be {kind.__name__}")
    return value


class State:
    """The records, and the files they live in."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / FILENAME
        self.journal = self.directory / JOURNAL
        self.records: dict[str, Record] = {}
        #: problems found while loading, reported by /v1/status
        self.warnings: list[str] = []
        #: moves at every save: what was derived from the records is stale
        self.generation = 0
        #: the sequence number of the last save (snapshot or journal line)
        self.seq = 0
        #: the journal's size after its last good line; None until a
        #: snapshot was written by this process (the first save compacts:
        #: whatever a crash left at the journal's end goes with it)
        self._journal_size: int | None = None
        self._snapshot_size = 0
        #: the records last written to the snapshot, in order, and each
        #: one's line: a compaction serializes only what is not the same
        #: object as before (records are immutable)
        self._written: list[Record] = []
        self._lines: list[bytes] = []

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> State:
        """The records: the snapshot, then the journal's lines after it.
        UnsafeStateError when either is not a regular file (a FIFO would
        hang the start, a symlink lead elsewhere)."""
        state = cls(directory)
        raw = state._read(state.path)
        if raw is not None:
            try:
                doc = json.loads(raw)
                if (
                    not isinstance(doc, dict)
                    or type(doc.get("version")) is not int
                    or doc["version"] != VERSION
                ):
                    raise ValueError(f"not a version {VERSION} state document")
                records = [Record.from_json(d) for d in doc["registrations"]]
                seq = _typed(doc, "seq", int) if "seq" in doc else 0
            except _CORRUPT as e:
                state._set_aside(state.path, f"corrupt ({_reason(e)})")
                if state.journal.exists():  # changes to a snapshot that is gone
                    state._set_aside(state.journal, "left without its snapshot")
                return state
            state.records = {r.rule.name: r for r in records}
            state.seq = seq
        journal = state._read(state.journal)
        if journal and raw is None:  # state.json removed by hand: a reset
            state._set_aside(state.journal, "left without its snapshot")
        elif journal:
            state._replay(journal)
        for leftover in state.directory.glob(f".{FILENAME}.*.tmp"):  # from a crash mid-save
            with contextlib.suppress(OSError):
                leftover.unlink()
        return state

    def _read(self, path: Path) -> bytes | None:
        """A state file's bytes; None when it is missing or unreadable (then
        moved aside)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise _not_regular(path, "symlink") from None
            self._set_aside(path, f"unreadable ({e.strerror})")
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _not_regular(path, paths.kind_of(st.st_mode))
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read()
        except OSError as e:
            self._set_aside(path, f"unreadable ({e.strerror})")
            return None
        finally:
            os.close(fd)

    def _replay(self, journal: bytes) -> None:
        """Apply the journal's lines newer than the snapshot, in order. A
        last line without its newline is a save a crash cut short (its
        caller never heard it succeed): ignored. A line that does not parse
        stops the replay there; the journal is moved aside."""
        *lines, torn = journal.split(b"\n")
        if torn:
            log.warning("%s: ignoring a change cut short by a crash (%d bytes)",
                        self.journal, len(torn))  # fmt: skip
        records = dict(self.records)
        for number, line in enumerate(lines, 1):
            try:
                change = json.loads(line)
                if not isinstance(change, dict):
                    raise ValueError("not a JSON object")
                seq = _typed(change, "seq", int)
                puts = [Record.from_json(d) for d in _typed(change, "put", list)]
                drops = _typed(change, "drop", list)
                if not all(isinstance(name, str) for name in drops):
                    raise TypeError("drop must be names")
            except _CORRUPT as e:
                self._set_aside(self.journal, f"corrupt at line {number} ({_reason(e)})")
                break
            if seq <= self.seq:  # already in the snapshot
                continue
            for name in drops:
                records.pop(name, None)
            for rec in puts:
                records[rec.rule.name] = rec
            self.seq = seq
        self.records = records

    def _set_aside(self, path: Path, why: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        aside = path.with_name(f"{path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            aside = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
            n += 1
        try:
            os.rename(path, aside)
            msg = f"state file {path} was {why}; moved to {aside}; starting with " + (
                "no records" if path == self.path else "the records before it"
            )
        except OSError as e:
            msg = f"state file {path} was {why} and could not be moved aside: {e.strerror}"
        log.error("%s", msg)
        self.warnings.append(msg)

    def save(self, records: dict[str, Record]) -> None:
        """Write records and make them current: one journal line with what
        changed, or a new snapshot when the journal is due for compaction
        (or the order of the records changed, which lines do not carry).
        StateError leaves what a load finds and self.records as they were."""
        puts, drops, in_order = _diff(self.records, records)
        line = b'{"seq":%d,"put":[%s],"drop":%s}\n' % (
            self.seq + 1,
            b",".join(map(_line, puts)),
            json.dumps(drops).encode(),
        )
        size = self._journal_size
        if size is None or size + len(line) > max(self._snapshot_size, JOURNAL_MIN) or not in_order:
            self._compact(records)
            return
        try:
            self._append(line, size)
        except OSError as e:
            log.warning("cannot append to %s (%s): writing a new snapshot instead",
                        self.journal, e.strerror)  # fmt: skip
            self.seq += 1  # the line may be on disk: its number is not used again
            self._journal_size = None  # nor appended after, should the snapshot fail
            self._compact(records)
            return
        self.seq += 1
        self._journal_size = size + len(line)
        self._commit(records)

    def _append(self, line: bytes, size: int) -> None:
        """line at the journal's end, on disk when this returns. On failure
        the journal is cut back to size, so a later line never follows a
        partial one."""
        fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            try:
                _write_all(fd, [line])
                os.fdatasync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)

    def _compact(self, records: dict[str, Record]) -> None:
        """A new snapshot of records, then an empty journal."""
        written = list(records.values())
        lines = self._serialize(written)
        seq = self.seq + 1
        tmp = self.path.with_name(f".{FILENAME}.{os.getpid()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o755)
            fd = _create(tmp)
            try:
                size = _write_document(fd, lines, seq)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
        except OSError as e:
            if e.errno != errno.EEXIST:  # else it is not ours
                with contextlib.suppress(OSError):
                    tmp.unlink()
            raise StateError(
                f"cannot write {self.path}: {e.strerror}; the change was rolled back"
            ) from None
        self.seq, self._snapshot_size = seq, size
        self._written, self._lines = written, lines
        self._commit(records)
        # The rename is done: from here on the new snapshot is the truth. The
        # journal is made (or kept) and fsynced with the directory before it
        # is emptied: its lines are all in the snapshot now (and numbered no
        # later than it), so emptying it needs no fsync of its own.
        self._journal_size = None
        try:
            jfd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o644)  # fmt: skip
        except OSError as e:
            log.warning("cannot open %s: %s", self.journal, e.strerror)
            jfd = -1
        try:
            dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            if jfd >= 0 and stat.S_ISREG(os.fstat(jfd).st_mode):
                os.ftruncate(jfd, 0)
                self._journal_size = 0
        except OSError as e:
            log.warning("cannot fsync %s or empty %s: %s", self.directory, self.journal,
                        e.strerror)  # fmt: skip
        finally:
            if jfd >= 0:
                os.close(jfd)

    def _commit(self, records: dict[str, Record]) -> None:
        self.records = dict(records)
        self.generation += 1

    def _serialize(self, new: list[Record]) -> list[bytes]:
        """The snapshot's lines, one record each. Only the records that are
        not the very ones last written are serialized: the unchanged head and
        tail are found by identity, at C speed (a change among a thousand
        records costs what one record does, plus copying the bytes)."""
        old, lines = self._written, self._lines
        head, tail = _same_ends(new, old)
        middle = [_line(r) for r in new[head : len(new) - tail]]
        return [*lines[:head], *middle, *lines[len(old) - tail :]]


_CORRUPT = (ValueError, KeyError, TypeError, InvalidRuleError, AttributeError, RecursionError)


def _diff(
    held: dict[str, Record], records: dict[str, Record]
) -> tuple[list[Record], list[str], bool]:
    """What a journal line holds to turn held into records: the records to
    put, the names to drop, and whether replaying them keeps records' order
    (kept names in place, new ones after them: the order is the order of
    registration, which decides the entry the kernel matches first). The
    unchanged head and tail are found by identity at C speed: a change
    among a thousand records costs about what one does."""
    old, new = list(held.values()), list(records.values())
    head, tail = _same_ends(new, old)
    old_mid = [r.rule.name for r in old[head : len(old) - tail]]
    new_mid = new[head : len(new) - tail]
    puts = [r for r in new_mid if held.get(r.rule.name) is not r]
    drops = [name for name in old_mid if name not in records]
    kept = [name for name in old_mid if name in records]
    names = [r.rule.name for r in new_mid]
    in_order = names[: len(kept)] == kept and (tail == 0 or len(names) == len(kept))
    return puts, drops, in_order


def _reason(e: Exception) -> str:
    return e.message if isinstance(e, QusdError) else str(e)


def _same_ends(new: list[Record], old: list[Record]) -> tuple[int, int]:
    """How many leading and (of the rest) trailing items new and old share,
    the same objects: found at C speed."""
    head = _common(new, old)
    return head, _common(new[head:][::-1], old[head:][::-1])


def _common(a: list[Record], b: list[Record]) -> int:
    """How many leading items a and b share (the same objects)."""
    return len(list(itertools.takewhile(bool, map(operator.is_, a, b))))


def _write_document(fd: int, lines: list[bytes], seq: int) -> int:
    """{"registrations": [...], "seq": N, "version": 1}, one record a line,
    written from the lines as they are (writev: no copy of the whole
    document). Returns its size."""
    parts = [b'{"registrations": [\n']
    for i, line in enumerate(lines):
        parts += (b",\n", line) if i else (line,)
    parts.append(b'\n], "seq": %d, "version": %d}\n' % (seq, VERSION))
    _write_all(fd, parts)
    return sum(map(len, parts))


def _write_all(fd: int, parts: list[bytes]) -> None:
    """Every byte of parts, however short the writes (a disk filling up)."""
    for start in range(0, len(parts), 1024):  # IOV_MAX
        chunk = parts[start : start + 1024]
        done = os.writev(fd, chunk)
        if done < sum(map(len, chunk)):
            view = memoryview(b"".join(chunk))[done:]
            while view:
                view = view[os.write(fd, view) :]


def _line(rec: Record) -> bytes:
    return json.dumps(rec.to_json(), sort_keys=True, separators=(",", ":")).encode()


def _create(tmp: Path) -> int:
    """A new temporary file, never an existing one and never through a
    symlink (O_EXCL|O_NOFOLLOW): one left by a crash of this pid is removed
    first (unlink removes a symlink itself, not what it points to)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(tmp, flags, 0o644)
    except FileExistsError:
        os.unlink(tmp)
        return os.open(tmp, flags, 0o644)


def _not_regular(path: Path, kind: str) -> UnsafeStateError:
    return UnsafeStateError(
        f"{path} is not a regular file (a {kind}): qusd reads its records from it at start; "
        "remove it (qusd writes a new one)"
    )


def check_directory(directory: str | os.PathLike[str], owners: Iterable[int]) -> None:
    """Refuse a state directory someone else could change, as sshd's
    StrictModes does: the directory, state.json, state.journal and the lock
    must be owned by one of owners (root; in rootless mode, the user running
    qusd too) and writable by nobody else; each directory above it owned by
    one of them and writable by nobody else unless sticky (others may then
    add entries but not rename ours). The directory is created (0755) if missing.
    UnsafeStateError names the fix."""
    trusted = frozenset(owners)
    path = Path(os.path.abspath(directory))
    path.mkdir(parents=True, exist_ok=True, mode=0o755)
    who = "root" if os.geteuid() == 0 else str(os.geteuid())
    try:
        seen, fd = paths.nodes(str(path))
    except OSError as e:
        raise UnsafeStateError(f"state directory {path}: {e.strerror}") from None
    os.close(fd)
    for node in reversed(seen):
        mine = node.last
        if node.st.st_uid not in trusted:
            raise UnsafeStateError(
                f"{node.path}{'' if mine else f' (above the state directory {path})'} is owned "
                f"by uid {node.st.st_uid}: whoever owns it could change what qusd restores; "
                f"chown {who} {node.path}, or choose another state_dir"
            )
        if stat.S_ISLNK(node.st.st_mode):
            continue
        sticky = node.st.st_mode & stat.S_ISVTX and not mine
        if node.st.st_mode & 0o022 and not sticky:
            raise UnsafeStateError(
                f"{node.path}{'' if mine else f' (above the state directory {path})'} is "
                f"writable by group or others (mode {stat.S_IMODE(node.st.st_mode):o}): they "
                f"could change what qusd restores; chmod go-w {node.path}"
            )
    for name in (FILENAME, JOURNAL, LOCK):
        file = path / name
        try:
            st = os.lstat(file)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(file, paths.kind_of(st.st_mode))
        if st.st_uid not in trusted:
            raise UnsafeStateError(
                f"{file} is owned by uid {st.st_uid}: its owner could change what qusd "
                f"restores; chown {who} {file}"
            )
        if st.st_mode & 0o022:
            raise UnsafeStateError(
                f"{file} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}): "
                f"they could change what qusd restores; chmod go-w {file}"
            )
