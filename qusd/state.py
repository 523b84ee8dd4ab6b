"""What qusd has registered, kept on disk so it can be restored at start.

One JSON document, versioned, replaced atomically (temp file, fsync, rename,
fsync of the directory): a crash leaves the old or the new file, never a
torn one. A file that cannot be read is moved aside, never dropped. One
record a line, each serialized once and kept: a save costs what changed
plus copying the bytes, not a rewrite of every record (9 ms at 1000 records
with indentation, 0.1 ms without).

What the state holds is registered at every start, so whoever can change it
chooses what runs in every foreign exec: the directory and the file must be
root's (or, in rootless mode, the user's who runs qusd) and writable by
nobody else (check_directory, as sshd's StrictModes), state.json a regular
file; the temporary file is made with O_EXCL|O_NOFOLLOW.
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
LOCK = ".lock"

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
    """The records, and the file they live in."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / FILENAME
        self.records: dict[str, Record] = {}
        #: problems found while loading, reported by /v1/status
        self.warnings: list[str] = []
        #: moves at every save: what was derived from the records is stale
        self.generation = 0
        #: the records last written, in order, and each one's line: a save
        #: serializes only what is not the same object as before (records
        #: are immutable)
        self._written: list[Record] = []
        self._lines: list[bytes] = []

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> State:
        """The records; UnsafeStateError when state.json is not a regular
        file (a FIFO would hang the start, a symlink lead elsewhere)."""
        state = cls(directory)
        try:
            fd = os.open(state.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return state
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise _not_regular(state.path, "symlink") from None
            state._set_aside(f"unreadable ({e.strerror})")
            return state
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _not_regular(state.path, paths.kind_of(st.st_mode))
            with os.fdopen(fd, "rb", closefd=False) as f:
                raw = f.read()
        except OSError as e:
            state._set_aside(f"unreadable ({e.strerror})")
            return state
        finally:
            os.close(fd)
        try:
            doc = json.loads(raw)
            if (
                not isinstance(doc, dict)
                or type(doc.get("version")) is not int
                or doc["version"] != VERSION
            ):
                raise ValueError(f"not a version {VERSION} state document")
            records = [Record.from_json(d) for d in doc["registrations"]]
        except (
            ValueError,
            KeyError,
            TypeError,
            InvalidRuleError,
            AttributeError,
            RecursionError,
        ) as e:
            reason = e.message if isinstance(e, QusdError) else str(e)
            state._set_aside(f"corrupt ({reason})")
            return state
        state.records = {r.rule.name: r for r in records}
        for leftover in state.directory.glob(f".{FILENAME}.*.tmp"):  # from a crash mid-save
            with contextlib.suppress(OSError):
                leftover.unlink()
        return state

    def _set_aside(self, why: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        aside = self.path.with_name(f"{FILENAME}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            aside = self.path.with_name(f"{FILENAME}.corrupt-{stamp}.{n}")
            n += 1
        try:
            os.rename(self.path, aside)
            msg = f"state file {self.path} was {why}; moved to {aside}; starting with no records"
        except OSError as e:
            msg = f"state file {self.path} was {why} and could not be moved aside: {e.strerror}"
        log.error("%s", msg)
        self.warnings.append(msg)

    def save(self, records: dict[str, Record]) -> None:
        """Write records and make them current; StateError leaves both the
        file and self.records as they were."""
        written = list(records.values())
        lines = self._serialize(written)
        tmp = self.path.with_name(f".{FILENAME}.{os.getpid()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o755)
            fd = _create(tmp)
            try:
                _write_document(fd, lines)
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
        self.records = dict(records)
        self._written, self._lines = written, lines
        self.generation += 1
        try:  # the rename is done: from here on the new file is the truth
            dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            log.warning("cannot fsync %s: %s", self.directory, e.strerror)

    def _serialize(self, new: list[Record]) -> list[bytes]:
        """The document's lines, one record each. Only the records that are
        not the very ones last written are serialized: the unchanged head and
        tail are found by identity, at C speed (a change among a thousand
        records costs what one record does, plus copying the bytes)."""
        old, lines = self._written, self._lines
        head = _common(new, old)
        tail = _common(new[head:][::-1], old[head:][::-1])
        middle = [_line(r) for r in new[head : len(new) - tail]]
        return [*lines[:head], *middle, *lines[len(old) - tail :]]


def _common(a: list[Record], b: list[Record]) -> int:
    """How many leading items a and b share (the same objects)."""
    return len(list(itertools.takewhile(bool, map(operator.is_, a, b))))


def _write_document(fd: int, lines: list[bytes]) -> None:
    """{"registrations": [...], "version": 1}, one record a line, written
    from the lines as they are (writev: no copy of the whole document)."""
    parts = [b'{"registrations": [\n']
    for i, line in enumerate(lines):
        parts += (b",\n", line) if i else (line,)
    parts.append(b'\n], "version": %d}\n' % VERSION)
    for start in range(0, len(parts), 1024):  # IOV_MAX
        chunk = parts[start : start + 1024]
        done = os.writev(fd, chunk)
        if done < sum(map(len, chunk)):  # a short write (the disk filled up?)
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
    StrictModes does: the directory, state.json and the lock must be owned
    by one of owners (root; in rootless mode, the user running qusd too) and
    writable by nobody else; each directory above it owned by one of them
    and writable by nobody else unless sticky (others may then add entries
    but not rename ours). The directory is created (0755) if missing.
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
    for name in (FILENAME, LOCK):
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
