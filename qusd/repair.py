"""The reconciler: runs the service's reconcile when binfmt_misc changed
underneath qusd (the watcher), on SIGHUP (the Debian package's dpkg trigger
after an interpreter upgrade), on `POST /v1/reconcile`, and every
`reconcile_interval` seconds as a fallback. One reconcile at a time, under
the table lock; requests for one that arrive while one runs are served by
the next run.

`reconcile_interval = 0` turns automatic repairs off altogether (no watch,
no ticks); on-demand reconciles still run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import ParamSpec, TypeVar

from qusd import systemd_glue
from qusd.binfmt import BinfmtMisc
from qusd.errors import QusdError
from qusd.events import QUSD
from qusd.service import RestoreReport, Service
from qusd.watch import Notice, ObservedKernel, OwnWrites, TableWatch

log = logging.getLogger("qusd")

#: triggers whose reconcile is always told on the event stream (the others
#: only when they changed something)
ASKED = frozenset({"request", "SIGHUP"})

P = ParamSpec("P")
T = TypeVar("T")


async def in_thread(svc: Service, fn: Callable[P, T], *args: P.args, **kw: P.kwargs) -> T:
    """Run a service call (the caller holds the table lock) in a worker
    thread, so the event loop serves meanwhile: the kernel writes, the
    state's fsync and a reconcile of a thousand entries wait on the disk or
    the CPU, not on the loop. Readers keep to the table as it was until the
    call is done (svc.busy). A cancelled caller still waits for the call to
    end, so the lock is held until it does."""
    if not svc.busy:
        svc.busy_from = svc.table_version()  # the table the change finds
    svc.busy += 1
    call = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kw))
    cancelled = False
    try:
        while True:
            try:
                result = await asyncio.shield(call)
                break
            except asyncio.CancelledError:
                if call.done():
                    raise
                cancelled = True  # the change goes on in its thread: wait for it
    finally:
        svc.busy -= 1
    if cancelled:
        raise asyncio.CancelledError
    return result


class Reconciler:
    def __init__(self, svc: Service, lock: asyncio.Lock, interval: float) -> None:
        self.svc = svc
        self.lock = lock
        self.interval = interval
        self.watch: TableWatch | None = None
        self._wake = asyncio.Event()
        self._why: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        #: reconciles run since start, by trigger (for status and tests)
        self.runs: dict[str, int] = {}
        #: the table's version (Service.version) after the last reconcile
        #: that left nothing to retry: an interval tick finds nothing to do
        #: while it holds
        self._settled: object = None
        #: interval ticks that found the table as the last reconcile left it
        self.skipped = 0

    @property
    def automatic(self) -> bool:
        return self.interval > 0

    def start(self) -> None:
        """Watch binfmt_misc (when it is a real mount and repairs are on) and
        run the loop; one reconcile runs at once, so whatever changed while
        qusd was down (an interpreter upgraded, status 0) is seen."""
        if self.automatic and type(self.svc.kernel) is BinfmtMisc:
            own = OwnWrites()
            # from now on every write qusd makes is noted before it is made
            self.svc.kernel = ObservedKernel(self.svc.kernel.path, own)
            self.watch = TableWatch(self.svc.kernel.path, own)
            try:
                self.watch.start()
            except OSError as e:
                log.warning("cannot watch binfmt_misc (%s): repairs wait for the reconcile "
                            "interval", e.strerror)  # fmt: skip
                self.watch = None
            else:
                self.watch.subscribe(self._changed)
                self.svc.kernel.watch = self.watch  # its events tell when the table changed
        self._task = asyncio.create_task(self._loop())
        if self.automatic:
            self.poke("start")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.watch is not None:
            self.watch.stop()

    def poke(self, why: str) -> None:
        """Ask for a reconcile as soon as the table lock is free."""
        self._why.add(why)
        self._wake.set()

    def _unchanged(self) -> bool:
        """Whether nothing moved since a reconcile that left nothing to
        retry: no event in the table or in an interpreter's directory, no
        write, no save (Service.version, every queued event read first),
        and binfmt_misc still mounted there. Then a tick has nothing to do:
        reading a thousand entries every few seconds only to find them as
        they were is what this spares (what moves, the watcher reports, and
        the reconcile it asks for always runs)."""
        if self._settled is None:
            return False
        version = self.svc.version()
        return version is not None and version == self._settled and self.svc.kernel.is_mounted()

    def _changed(self, notice: Notice) -> None:
        self.poke("unmount" if notice.unmounted else "watch")

    async def _loop(self) -> None:
        while True:
            timeout = self.interval if self.automatic else None
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                self._why.add("interval")
            self._wake.clear()
            why, self._why = self._why or {"interval"}, set()
            try:
                await self.once(why)
            except Exception:  # the loop must outlive a bug in one run
                log.exception("reconcile failed")

    async def once(self, why: Iterable[str], actor: int | str = QUSD) -> RestoreReport:
        """One reconcile now (waiting for the table lock)."""
        triggers = sorted(set(why))
        async with self.lock:
            if triggers == ["interval"] and self._unchanged():
                self.skipped += 1
                return RestoreReport()
            self._settled = None
            try:
                report = await in_thread(self.svc, self.svc.reconcile)
            except QusdError as e:
                log.error("reconcile: %s", e.message)
                report = RestoreReport()
            if self.watch is not None:
                self.watch.arm()  # a new mount needs a new watch
            if not report.failed:
                self._settled = self.svc.version()
        for t in triggers:
            self.runs[t] = self.runs.get(t, 0) + 1
        changed = report.changed()
        if changed:
            if report.restored:
                log.warning("re-registered %s: they had been removed from the kernel",
                            ", ".join(report.restored))  # fmt: skip
            systemd_glue.notify(f"STATUS=repaired {', '.join(changed)}")
        if changed or report.failed or ASKED.intersection(triggers):
            self.svc.events.emit(
                "reconcile",
                f"reconcile ({', '.join(triggers)}): {report.summary()}",
                names=[*report.restored, *report.updated],
                actor=actor,
                level=logging.INFO if changed or actor != QUSD else logging.DEBUG,
            )
        return report


class HandoffWriter:
    """Rewrites the boot hand-off file (qusd/handoff.py) a moment after the
    state changed: every change is told as an event; the first one starts a
    short timer, and the file is written in a worker thread when it fires,
    once for a burst of changes and never on a request's path; the first
    time just after start (the restore's result). stop() writes it a last
    time."""

    def __init__(self, svc: Service, delay: float = 0.5) -> None:
        self.svc = svc
        self.delay = delay
        self._timer: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Task[bool]] = set()
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> None:
        self._unsubscribe = self.svc.events.subscribe(self._changed)
        self._changed(None)

    def _changed(self, _event: object) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        task = asyncio.create_task(asyncio.to_thread(self.svc.write_handoff))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await asyncio.gather(*self._writes, return_exceptions=True)
        await asyncio.to_thread(self.svc.write_handoff)
