"""The recent past of the event stream: a bounded ring of the last events,
so a client of `GET /v1/events` that reconnects with `?since=SEQ` gets what
it missed, or is told how much it lost.

It subscribes to the service's Events (qusd.events) as soon as the daemon
builds the service, so the boot restore is in it too. Standard library
only: the boot path attaches it.
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass

from qusd.events import Event, Events

#: events kept for clients that reconnect
RING_SIZE = 1024

_RINGS: weakref.WeakKeyDictionary[Events, Ring] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Backlog:
    """What a client that saw everything up to `since` missed."""

    events: list[Event]
    #: events the ring no longer holds (0: nothing lost)
    lost: int
    #: the client's since was ahead of the daemon: it restarted since
    restarted: bool = False


class Ring:
    """The last `size` events, in order."""

    def __init__(self, events: Events, size: int = RING_SIZE) -> None:
        self._ring: deque[Event] = deque(maxlen=size)
        self.last_seq = 0
        events.subscribe(self._add)

    def _add(self, ev: Event) -> None:
        self._ring.append(ev)
        self.last_seq = ev.seq

    def since(self, seq: int) -> Backlog:
        """The events after seq still held, and how many are gone."""
        if seq > self.last_seq:  # numbered by another life of the daemon
            return Backlog(list(self._ring), self._ring[0].seq - 1 if self._ring else 0, True)
        held = [ev for ev in self._ring if ev.seq > seq]
        first = held[0].seq if held else self.last_seq + 1
        return Backlog(held, max(0, first - seq - 1))


def ring(events: Events, size: int = RING_SIZE) -> Ring:
    """The ring attached to events (made on first use)."""
    found = _RINGS.get(events)
    if found is None:
        found = _RINGS[events] = Ring(events, size)
    return found
