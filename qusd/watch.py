"""Watching binfmt_misc: inotify on its directory, so qusd repairs what
another tool changed at once instead of at the next reconcile tick.

binfmt_misc raises inotify events (checked on Linux 6.18): `MODIFY register`
for a registration, `MODIFY NAME` when an entry is enabled, disabled or
removed (and `DELETE NAME` on removal), `MODIFY status` for a global write
(and `DELETE` of every entry on a flush); never `CREATE`. An unmount ends
the watch (`IN_UNMOUNT`, then `IN_IGNORED`).

qusd's own writes raise the same events, and must not look like another
tool's: every write qusd makes goes through an `OwnWrites` ledger first
(`ObservedKernel`, a BinfmtMisc that notes what it is about to write), and
an event the ledger explains is dropped. Whatever is left is a change by
someone else: subscribers hear of it, coalesced (a burst such as a flush
followed by thirty registrations is one notice, once the burst is over).

Subscribers get a `Notice`: the names touched and whether the mount went
away. The daemon's reconciler subscribes; so may a cache of the parsed table
(`TableWatch.subscribe`), which then also hears of qusd's own writes if it
asks (`own=True`): any write at all makes a parsed table stale.

Standard library only (ctypes for inotify, asyncio for the loop's reader).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import select
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from qusd.binfmt import BinfmtMisc, Entry, Rule, read_all

log = logging.getLogger("qusd.watch")

IN_MODIFY = 0x00000002
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

WATCHED = IN_MODIFY | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
#: what replaces or removes a file in a directory (a package upgrade writes
#: a new file and renames it over the old one)
DIRECTORY = (
    IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF
    | IN_ONLYDIR
)  # fmt: skip
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len

#: (file name, kind) pairs: kind is "modify", "delete" or "create"
Touch = tuple[str, str]


class Inotify:
    """One inotify instance (non-blocking), through libc."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd

    def add(self, path: str | os.PathLike[str], mask: int = WATCHED) -> int:
        wd: int = self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        return wd

    def remove(self, wd: int) -> None:
        self._libc.inotify_rm_watch(self.fd, wd)

    def read(self) -> list[tuple[int, int, str]]:
        """Every queued event as (wd, mask, name); [] when there is none."""
        out: list[tuple[int, int, str]] = []
        while True:
            try:
                buf = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            pos = 0
            while pos + _HEADER.size <= len(buf):
                wd, mask, _, size = _HEADER.unpack_from(buf, pos)
                raw = buf[pos + _HEADER.size : pos + _HEADER.size + size].split(b"\0", 1)[0]
                out.append((wd, mask, os.fsdecode(raw)))
                pos += _HEADER.size + size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def touches(mask: int, name: str) -> list[Touch]:
    """The file events an inotify mask stands for."""
    found = []
    if mask & IN_MODIFY:
        found.append((name, "modify"))
    if mask & IN_DELETE:
        found.append((name, "delete"))
    if mask & IN_CREATE:
        found.append((name, "create"))
    return found


class OwnWrites:
    """The events qusd's own writes will raise, not yet seen by the watcher.

    A write is noted before it is made; the event it raises cancels the note.
    A write the kernel refuses raises no event (fsnotify is called only for
    a write that succeeded), so its note is withdrawn."""

    def __init__(self) -> None:
        self._pending: Counter[Touch] = Counter()
        #: qusd's writes seen since start, for status and tests
        self.explained = 0
        # writes are noted in the thread that makes them (changes run off
        # the event loop), events are read in the loop's
        self._lock = threading.Lock()

    def expect(self, touches: list[Touch]) -> None:
        with self._lock:
            self._pending.update(touches)

    def withdraw(self, touches: list[Touch]) -> None:
        with self._lock:
            self._pending.subtract(touches)
            self._pending = +self._pending  # drop what went to zero or below

    def explains(self, touch: Touch) -> bool:
        with self._lock:
            if self._pending[touch] > 0:
                self._pending[touch] -= 1
                self.explained += 1
                return True
            return False

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()

    @contextmanager
    def writing(self, touches: list[Touch]) -> Iterator[None]:
        """Note touches for the write inside the block; withdrawn if it fails."""
        self.expect(touches)
        try:
            yield
        except BaseException:
            self.withdraw(touches)
            raise


class ObservedKernel(BinfmtMisc):
    """A BinfmtMisc whose every write is noted in an OwnWrites ledger first."""

    def __init__(self, path: str | os.PathLike[str], own: OwnWrites) -> None:
        super().__init__(path)
        self.own = own
        #: the watcher reading this mount's events (set once it watches)
        self.watch: TableWatch | None = None
        #: each entry file's bytes as last read in the loop's thread, and
        #: their names in order (kept current from the watcher's events)
        self._files: dict[str, bytes] | None = None
        self._order: list[str] | None = None

    def entries(self) -> list[Entry]:
        """As BinfmtMisc.entries(), but in the event loop's thread, while the
        watch is on, only the files events named since the last call are
        read again (and the directory, when an entry was registered): after
        a change among a thousand entries, one file is read, not a thousand.
        Elsewhere, or when anything may have changed, every file is read."""
        watch = self.watch
        if watch is None or not watch.current():
            return super().entries()
        touched = watch.take_touched()
        files = self._files
        if touched is None or files is None:
            files = dict(self.snapshot())
            self._order = None
        elif touched:
            before = len(files)
            if "register" in touched:  # a new entry: which one, the directory says
                names = set(os.listdir(self.path)) - {"register", "status"}
                for gone in set(files) - names:
                    del files[gone]
                touched = touched | (names - set(files))
            for name in touched - {"register", "status"}:
                data = self._read(name)
                if data is None:
                    files.pop(name, None)
                else:
                    files[name] = data
            if len(files) != before or "register" in touched:
                self._order = None
        self._files = files
        if self._order is None:
            self._order = sorted(files)
        return self._parse([(name, files[name]) for name in self._order])

    def _read(self, name: str) -> bytes | None:
        """An entry file's bytes, or None when there is no such entry."""
        try:
            fd = os.open(self.path / name, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ValueError):
            return None
        return read_all(fd)

    def version(self) -> tuple[int, int] | None:
        """qusd's writes and the events read, once every queued event is read;
        None while nothing is watched (or off the event loop's thread)."""
        watch = self.watch
        if watch is None or not watch.current():
            return None
        return (self.write_count, watch.changes)

    def watch_files(self, directories: frozenset[str]) -> int | None:
        watch = self.watch
        if watch is None or not watch.current() or not watch.watch_directories(directories):
            return None
        return watch.file_changes

    def register(self, rule: Rule) -> Entry:
        with self.own.writing([("register", "modify")]):
            return super().register(rule)

    def _control(self, name: str, value: bytes) -> None:
        expected = [(name, "modify")]
        if value == b"-1":
            if name == "status":
                expected += [(n, "delete") for n in self._names_quietly()]
            else:
                expected.append((name, "delete"))
        with self.own.writing(expected):
            super()._control(name, value)

    def _names_quietly(self) -> list[str]:
        try:
            return self.names()
        except Exception:
            return []


@dataclass(frozen=True)
class Notice:
    """What changed in binfmt_misc since the last notice."""

    #: the files touched: entry names, "register", "status"
    names: frozenset[str] = frozenset()
    #: the mount went away (unmounted, or the watch was lost)
    unmounted: bool = False
    #: the kernel's event queue overflowed: anything may have changed
    overflow: bool = False
    #: only qusd's own writes (sent only to subscribers that asked for them)
    own: bool = False


Subscriber = Callable[[Notice], None]


@dataclass
class _Sub:
    fn: Subscriber
    own: bool


@dataclass
class _Burst:
    names: set[str] = field(default_factory=set)
    unmounted: bool = False
    overflow: bool = False
    own: bool = False
    foreign: bool = False


class TableWatch:
    """inotify on a binfmt_misc directory, read from the event loop.

    Bursts are coalesced: a notice goes out once `quiet` seconds pass with no
    new event, and at the latest `latest` seconds after the burst began."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        own: OwnWrites | None = None,
        *,
        quiet: float = 0.015,
        latest: float = 0.05,
    ) -> None:
        self.path = Path(path)
        self.own = own or OwnWrites()
        self.quiet = quiet
        self.latest = latest
        self._inotify: Inotify | None = None
        self._wd: int | None = None
        self._subs: list[_Sub] = []
        self._burst: _Burst | None = None
        self._burst_start = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self._poll: select.poll | None = None
        #: notices of others' changes sent since start
        self.notices = 0
        #: events about the table read so far, qusd's own included: a parsed
        #: table is current while this (and the kernel's own count of
        #: qusd's writes) has not moved
        self.changes = 0
        #: directories watched for files replaced in them (interpreters),
        #: and the events seen there
        self._dirs: dict[str, int] = {}
        self._watched: frozenset[str] | None = None
        self._dir_wds: dict[int, str] = {}
        self.file_changes = 0
        #: the files of the table events named since the last take_touched()
        #: ("register": a new entry; None: anything, e.g. the queue overflowed)
        self.touched: set[str] | None = None

    # -- subscribers ------------------------------------------------------------

    def subscribe(self, fn: Subscriber, *, own: bool = False) -> Callable[[], None]:
        """Call fn with every coalesced Notice of another process's change
        (own=True: of qusd's own writes too). Returns the unsubscribe."""
        sub = _Sub(fn, own)
        self._subs.append(sub)
        return lambda: self._subs.remove(sub) if sub in self._subs else None

    # -- the watch ----------------------------------------------------------------

    @property
    def watching(self) -> bool:
        return self._wd is not None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start reading in the running loop; arm() adds the watch."""
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.get_ident()
        if self._inotify is None:
            self._inotify = Inotify()
            self._loop.add_reader(self._inotify.fd, self._readable)
            self._poll = select.poll()
            self._poll.register(self._inotify.fd, select.POLLIN)
        self.arm()

    def current(self) -> bool:
        """Whether `changes` and `file_changes` count every event so far:
        the queued ones are read first (one poll(2) when there are none).
        Only the loop's thread reads events; elsewhere this is False."""
        if self._wd is None or self._poll is None or threading.get_ident() != self._thread:
            return False
        if self._poll.poll(0):
            self._readable()
        return self._wd is not None

    def take_touched(self) -> set[str] | None:
        """The files events named since the last call (None: anything may
        have changed, as at the first call); call current() first."""
        touched, self.touched = self.touched, set()
        return touched

    def watch_directories(self, directories: frozenset[str]) -> bool:
        """Watch exactly these directories for files created, removed or
        renamed in them (file_changes counts the events); False when one
        cannot be watched."""
        if self._inotify is None:
            return False
        if directories is self._watched and len(self._dirs) == len(directories):
            return True  # as last time, every one still watched
        self._watched = directories
        ok = True
        for path in set(self._dirs) - directories:
            wd = self._dirs.pop(path)
            self._dir_wds.pop(wd, None)
            if wd != self._wd:
                self._inotify.remove(wd)
        for path in directories - set(self._dirs):
            try:
                wd = self._inotify.add(path, DIRECTORY)
            except OSError:
                ok = False
                continue
            self._dirs[path] = wd
            self._dir_wds[wd] = path
        return ok

    def arm(self) -> bool:
        """Watch the directory if binfmt_misc is mounted there and no watch is
        on; called again after every reconcile (a new mount needs a new
        watch). True when watching."""
        if self._inotify is None or self._wd is not None:
            return self._wd is not None
        if not BinfmtMisc(self.path).is_mounted():
            return False
        self.touched = None  # unwatched until now: anything may have changed
        try:
            self._wd = self._inotify.add(self.path)
        except OSError as e:
            log.warning("cannot watch %s (%s): repairs wait for the reconcile interval",
                        self.path, e.strerror)  # fmt: skip
            return False
        log.debug("watching %s", self.path)
        return True

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._inotify is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._inotify.fd)
            self._inotify.close()
            self._inotify = None
        self._wd = None
        self._poll = None
        self.touched = None
        self._dirs.clear()
        self._dir_wds.clear()

    def _readable(self) -> None:
        assert self._inotify is not None
        try:
            raw = self._inotify.read()
        except OSError as e:
            log.error("reading inotify events failed: %s", e.strerror)
            return
        for wd, mask, name in raw:
            self.feed(wd, mask, name)

    def feed(self, wd: int, mask: int, name: str) -> None:
        """One inotify event: sorted into qusd's own or someone else's."""
        if wd in self._dir_wds:  # a watched interpreter directory
            self.file_changes += 1
            if mask & IN_IGNORED:  # the directory went: watched again on demand
                self._dirs.pop(self._dir_wds.pop(wd), None)
            return
        self.changes += 1
        burst = self._open_burst()
        if mask & IN_Q_OVERFLOW:
            self.file_changes += 1
            self.touched = None
            burst.overflow = burst.foreign = True
            self.own.clear()  # the explanations are lost with the events
            return
        if wd != self._wd:
            return  # a watch already replaced
        if mask & (IN_UNMOUNT | IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
            if mask & IN_IGNORED or mask & IN_UNMOUNT:
                self._wd = None
                self.own.clear()
            self.touched = None
            burst.unmounted = burst.foreign = True
            return
        if self.touched is not None:
            self.touched.add(name)
        for touch in touches(mask, name):
            burst.names.add(touch[0])
            if self.own.explains(touch):
                burst.own = True
            else:
                burst.foreign = True

    def _open_burst(self) -> _Burst:
        loop = self._loop or asyncio.get_running_loop()
        now = loop.time()
        if self._burst is None:
            self._burst = _Burst()
            self._burst_start = now
        if self._timer is not None:
            self._timer.cancel()
        due = min(now + self.quiet, self._burst_start + self.latest)
        self._timer = loop.call_at(due, self._flush)
        return self._burst

    def _flush(self) -> None:
        burst, self._burst, self._timer = self._burst, None, None
        if burst is None or not (burst.foreign or burst.own):
            return
        notice = Notice(frozenset(burst.names), burst.unmounted, burst.overflow,
                        own=not burst.foreign)  # fmt: skip
        if burst.foreign:
            self.notices += 1
            log.debug("binfmt_misc changed by another process: %s",
                      ", ".join(sorted(notice.names)) or "the mount")  # fmt: skip
        for sub in list(self._subs):
            if notice.own and not sub.own:
                continue
            try:
                sub.fn(notice)
            except Exception:
                log.exception("watch subscriber %r failed", sub.fn)
