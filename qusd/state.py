"""What qusd has registered, kept on disk so it can be restored at start.

One JSON document, versioned, replaced atomically (temp file, fsync, rename,
fsync of the directory): a crash leaves the old or the new file, never a
torn one. A file that cannot be read is moved aside, never dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qusd.binfmt import Rule
from qusd.errors import InvalidRuleError, QusdError, StateError

VERSION = 1
FILENAME = "state.json"

log = logging.getLogger("qusd.state")


@dataclass(frozen=True)
class Record:
    """One registration qusd made (it is "managed")."""

    rule: Rule
    persistent: bool = True
    enabled: bool = True
    target: str | None = None
    #: registered over another definition (replace): qusd keeps the name
    #: against other definitions that come back (a distribution's binfmt.d
    #: rules, which systemd-binfmt registers at every boot and restart)
    owned: bool = False
    #: the interpreter file an F entry holds open (interpreters.stamp, taken
    #: when qusd registered it): another file there now means an upgrade
    stamp: tuple[int, int, int, int] | None = None

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
            **({"interpreter_stamp": list(self.stamp)} if self.stamp is not None else {}),
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
        owned = _typed(d, "owned", bool) if "owned" in d else False
        return cls(rule, _typed(d, "persistent", bool), _typed(d, "enabled", bool), target, owned,
                   _stamp(d.get("interpreter_stamp")))  # fmt: skip


def _stamp(value: Any) -> tuple[int, int, int, int] | None:
    """An interpreter stamp from the state file; one that is not four
    integers is dropped (the next reconcile takes a new one)."""
    if isinstance(value, list) and len(value) == 4 and all(type(v) is int for v in value):
        return (value[0], value[1], value[2], value[3])
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

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> State:
        state = cls(directory)
        try:
            raw = state.path.read_bytes()
        except FileNotFoundError:
            return state
        except OSError as e:
            state._set_aside(f"unreadable ({e.strerror})")
            return state
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
        doc = {"version": VERSION, "registrations": [r.to_json() for r in records.values()]}
        data = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
        tmp = self.path.with_name(f".{FILENAME}.{os.getpid()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o755)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StateError(
                f"cannot write {self.path}: {e.strerror}; the change was rolled back"
            ) from None
        self.records = dict(records)
        try:  # the rename is done: from here on the new file is the truth
            dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            log.warning("cannot fsync %s: %s", self.directory, e.strerror)
