"""What happens to the table, published once: logged (with a stable journal
MESSAGE_ID per kind, so `journalctl MESSAGE_ID=...` finds every
registration, refusal or conflict, and QUSD_UID, QUSD_NAMES fields) and
handed to subscribers (an event stream, metrics). Text from the kernel is
made printable first. Standard library only: the boot-restore path emits too.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from qusd.binfmt import printable

MESSAGE_IDS = {
    "restored": "6f1c5d5e0b8a4f0e9d2f3b7a1c4e8d01",
    "registered": "6f1c5d5e0b8a4f0e9d2f3b7a1c4e8d02",
    "unregistered": "6f1c5d5e0b8a4f0e9d2f3b7a1c4e8d03",
    "refused": "6f1c5d5e0b8a4f0e9d2f3b7a1c4e8d04",
    "conflict": "6f1c5d5e0b8a4f0e9d2f3b7a1c4e8d05",
    "enabled": "6f1c5d5e0b8a4f0e9d2f3b7a1c4e8d06",
    "disabled": "6f1c5d5e0b8a4f0e9d2f3b7a1c4e8d07",
    #: another process changed what qusd keeps (an admin's entry, the status)
    "drift": "6f1c5d5e0b8a4f0e9d2f3b7a1c4e8d08",
    "interpreter-updated": "6f1c5d5e0b8a4f0e9d2f3b7a1c4e8d09",
    "reconcile": "6f1c5d5e0b8a4f0e9d2f3b7a1c4e8d0a",
}

#: the actor of a change qusd made on its own (a restore, a repair)
QUSD = "qusd"


@dataclass(frozen=True)
class Event:
    """One change, as subscribers receive it."""

    kind: str
    message: str
    names: tuple[str, ...] = ()
    #: the uid that asked, or QUSD for qusd's own repairs
    actor: int | str = QUSD
    seq: int = 0
    time: float = field(default_factory=time.time)


Subscriber = Callable[[Event], None]


def journal_fields(kind: str) -> dict[str, Any]:
    """logging `extra` for an event: the MESSAGE_ID and QUSD_EVENT fields."""
    return {"MESSAGE_ID": MESSAGE_IDS[kind], "QUSD_EVENT": kind}


class Loop(Protocol):
    """What Events needs of an event loop (asyncio's)."""

    def call_soon_threadsafe(self, callback: Callable[[Event], object], ev: Event, /) -> object: ...


class Events:
    """The one place a change is told: emit() logs it and hands it to every
    subscriber, numbered so a subscriber that missed some can tell.

    Subscribers (event streams, metrics) live in the event loop: once bound
    to it, an event emitted in another thread (the daemon changes the table
    in a worker thread) reaches them through the loop, in order."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger("qusd")
        self._subscribers: list[Subscriber] = []
        self._seq = itertools.count(1)
        self._loop: Loop | None = None
        self._loop_thread: int | None = None

    def bind(self, loop: Loop) -> None:
        """Hand events to subscribers in this loop's thread from now on."""
        self._loop, self._loop_thread = loop, threading.get_ident()

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call subscriber with every event from now on; returns the unsubscribe."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def emit(
        self,
        kind: str,
        message: str,
        *,
        names: Sequence[str] = (),
        actor: int | str = QUSD,
        level: int = logging.INFO,
    ) -> Event:
        message, names = printable(message), [printable(n) for n in names]
        ev = Event(kind, message, tuple(names), actor, next(self._seq))
        fields = journal_fields(kind)
        if isinstance(actor, int):
            fields["QUSD_UID"] = str(actor)
        if names:
            fields["QUSD_NAMES"] = ",".join(names)
        self.log.log(level, "%s", message, extra=fields)
        if self._loop is not None and threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self._deliver, ev)
        else:
            self._deliver(ev)
        return ev

    def _deliver(self, ev: Event) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(ev)
            except Exception:  # a broken subscriber must not undo a change
                self.log.exception("event subscriber %r failed", subscriber)
