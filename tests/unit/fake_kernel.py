"""A binfmt_misc table in a dict, for the fast unit layer only.

It keeps the kernel's rules that matter to qusd's logic (a name is taken
until removed, entries are reported normalized, control writes on missing
names fail) and lets a test make any write fail: an errno from the kernel
(EEXIST, EINVAL, ENOENT, EACCES, ...) or the Nth write. Every promise shown
here is also shown on the real kernel by the integration suite.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

from qusd.binfmt import BinfmtMisc, Entry, Rule
from qusd.errors import NoSuchEntryError, NotMountedError


@dataclass
class Failure:
    """Make a write fail: op is register, remove, enable or disable; name
    None matches any; nth counts matching writes from 1 (None: every one)."""

    op: str
    err: int
    name: str | None = None
    nth: int | None = None
    seen: int = 0

    def hits(self, op: str, name: str) -> bool:
        if op != self.op or self.name not in (None, name):
            return False
        self.seen += 1
        return self.nth is None or self.seen == self.nth


class FakeKernel(BinfmtMisc):
    def __init__(self, *entries: Entry, mounted: bool = True) -> None:
        super().__init__("/fake/binfmt_misc")
        self.table: dict[str, Entry] = {e.name: e for e in entries}
        self.mounted = mounted
        self.global_enabled = True
        self.failures: list[Failure] = []
        self.writes: list[tuple[str, str]] = []  # (op, name), in order
        self._pending: Rule | None = None

    def fail(self, op: str, err: int = errno.EINVAL, name: str | None = None,
             nth: int | None = None) -> None:  # fmt: skip
        self.failures.append(Failure(op, err, name, nth))

    def _write(self, op: str, name: str, done: Callable[[], None]) -> None:
        if not self.mounted:
            raise NotMountedError(f"binfmt_misc is not mounted at {self.path}")
        for f in self.failures:
            if f.hits(op, name):
                e = OSError(f.err, os.strerror(f.err))
                if op == "register" and self._pending is not None:
                    raise self._register_error(self._pending, e)
                raise NoSuchEntryError(f"{op} {name}: {e.strerror}")
        self.writes.append((op, name))
        done()

    # -- the mount --------------------------------------------------------------

    def is_mounted(self) -> bool:
        return self.mounted

    def mount(self) -> None:
        self.mounted = True

    def enabled(self) -> bool:
        self._need_mount()
        return self.global_enabled

    def set_enabled(self, enabled: bool) -> None:
        self._need_mount()
        self.global_enabled = enabled

    def remove_all(self) -> None:
        self._need_mount()
        self.table.clear()

    def _need_mount(self) -> None:
        if not self.mounted:
            raise NotMountedError(f"binfmt_misc is not mounted at {self.path}")

    # -- entries ------------------------------------------------------------------

    def names(self) -> list[str]:
        self._need_mount()
        return sorted(self.table)

    def ordered_names(self) -> list[str]:
        self._need_mount()
        return list(reversed(self.table))  # newest first, as the kernel

    def registered_at(self, name: str) -> int | None:
        return None

    def entries(self) -> list[Entry]:
        return [self.table[n] for n in self.names()]

    def entry(self, name: str) -> Entry:
        self._need_mount()
        try:
            return self.table[name]
        except KeyError:
            raise NoSuchEntryError(f"no binfmt_misc entry named {name!r}") from None

    def register(self, rule: Rule) -> Entry:
        rule.encode()
        self._pending = rule

        def add() -> None:
            if rule.name in self.table:
                raise self._register_error(rule, OSError(errno.EEXIST, "File exists"))
            n = rule.normalized()
            self.table[rule.name] = Entry(
                n.name, True, n.interpreter, n.flags, n.type, n.offset, n.magic, n.mask,
                n.extension,
            )  # fmt: skip

        self._write("register", rule.name, add)
        return self.table[rule.name]

    def get(self, name: str) -> Entry | None:
        self._need_mount()
        return self.table.get(name)

    def _control(self, name: str, value: bytes) -> None:
        op = {b"1": "enable", b"0": "disable", b"-1": "remove"}[value]
        if name not in self.table:
            self._need_mount()
            raise NoSuchEntryError(f"no binfmt_misc entry named {name!r}")

        def change() -> None:
            if op == "remove":
                del self.table[name]
            else:
                self.table[name] = replace(self.table[name], enabled=op == "enable")

        self._write(op, name, change)
