"""GET /v1/events: every change as newline-delimited JSON, for as long as
the client stays connected.

A stream subscribes to the service's Events before it replays the ring
(qusd.feed), so nothing falls between the two. Each stream has a bounded
queue: a client that does not read fills its socket, then the queue, and
is then cut off (its connection aborted, the queue dropped) rather than
let the daemon's memory grow; it may reconnect with `since` and get what
the ring still holds. Idle streams get a `keep-alive` line. An open stream
is an open connection like any other (the connection guard counts it),
but no request timeout applies to it; the daemon ends every stream when
it stops.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from collections import deque
from typing import Any

from qusd.binfmt import printable
from qusd.events import Event, Events

log = logging.getLogger("qusd.api")

NDJSON = "application/x-ndjson"
#: events a stream may hold that its client has not taken; then it is cut off
QUEUE_SIZE = 256
#: seconds between keep-alive lines on an idle stream (default; ?keepalive=)
KEEPALIVE = 15.0
KEEPALIVE_RANGE = (0.05, 3600.0)


def stamp(t: float) -> str:
    return (
        datetime.datetime.fromtimestamp(t, datetime.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def event_doc(ev: Event) -> dict[str, Any]:
    return {
        "seq": ev.seq,
        "time": stamp(ev.time),
        "kind": ev.kind,
        "message": printable(ev.message),
        "names": [printable(n) for n in ev.names],
        "actor": ev.actor,
    }


def meta_doc(kind: str, message: str, t: float, **more: Any) -> dict[str, Any]:
    return {"seq": 0, "time": stamp(t), "kind": kind, "message": message, "names": [],
            "actor": None, **more}  # fmt: skip


class Listener:
    """One stream's queue of events, filled by Events.emit (in the loop)."""

    def __init__(self, events: Events, transport: asyncio.Transport | None,
                 size: int = QUEUE_SIZE) -> None:  # fmt: skip
        self._queue: deque[Event] = deque()
        self._ready = asyncio.Event()
        self._size = size
        self._transport = transport
        self.cut = False
        self.ended = False
        self._unsubscribe = events.subscribe(self._push)

    def _push(self, ev: Event) -> None:
        if self.cut or self.ended:
            return
        if len(self._queue) >= self._size:
            # the client reads less than qusd tells: drop it, with its buffers
            self.cut = True
            self._queue.clear()
            log.warning("cut off an events client that stopped reading (%d events behind)",
                        self._size)  # fmt: skip
            if self._transport is not None:
                self._transport.abort()
        else:
            self._queue.append(ev)
        self._ready.set()

    def end(self) -> None:
        """Finish the stream (the daemon stops)."""
        self.ended = True
        self._ready.set()

    async def next(self, timeout: float) -> Event | None:
        """The next event; None after timeout with none."""
        if not self._queue and not (self.cut or self.ended):
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                return None
        return self._queue.popleft() if self._queue else None

    @property
    def done(self) -> bool:
        return self.cut or (self.ended and not self._queue)

    def close(self) -> None:
        self._unsubscribe()
