"""Serving the API until SIGTERM/SIGINT, with the keep-alive and watchdog
tasks beside it. Imported only once the registrations are restored.

The listening socket is served by a GuardedSite, an aiohttp site, so the
runner's cleanup() owns shutdown as for any aiohttp site; its
ConnectionGuard gives every uid its share of the connections (root and
admins keep room of their own) and keeps slow clients from holding them;
its GuardedHandler answers what aiohttp's HTTP parser refuses as
problem+json, logged on one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    ContentEncodingError,
    ContentLengthError,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)

from qusd import api, systemd_glue
from qusd.config import Config
from qusd.errors import BadRequestError, InternalError, QusdError
from qusd.middleware import GUARD, SERVICE, escaped, log_bad_request, problem_response
from qusd.policy import Caller, Role
from qusd.repair import HandoffWriter
from qusd.service import RestoreReport, Service
from qusd.text import plural

log = logging.getLogger("qusd")

Privileged = Callable[[Caller], bool]


class ConnectionGuard:
    """The protocol factory for the listening socket. Each connection is
    counted under its peer's uid (the kernel's SO_PEERCRED, read once):

    - at most max_connections are open at once (more are closed at once);
    - a uid that is not root's or an admin's holds at most per_uid of them,
      and never the last `reserved` ones, which stay for root and admins;
    - a client that has not sent a whole request head within header_timeout
      is disconnected. (A keep-alive connection's later requests are bounded
      by keepalive_timeout, like an idle one.)

    A connection leaves the books when it closes, whatever happened on it
    (refused, cut at its deadline, closed by the client, finished)."""

    def __init__(
        self, config: Config, privileged: Privileged, handler_args: dict[str, Any]
    ) -> None:
        self.server: web.Server | None = None
        self.max_connections = config.max_connections
        self.per_uid = config.per_uid
        self.reserved = config.reserved
        self.header_timeout = config.header_timeout
        self.privileged = privileged
        self.handler_args = handler_args
        #: connections accepted and not yet closed (counted from the accept,
        #: so that a batch of accepts cannot overshoot max_connections)
        self.open = 0
        #: of those, the ones admitted (their peer known and within its share)
        self.admitted = 0
        self.by_uid: dict[int, int] = {}
        self.refused = 0
        # handlers that have not had a whole request head yet, with their
        # deadline's timer; each leaves (its timer cancelled: the timer would
        # keep the handler and its buffers alive until then) when its head
        # arrives, at its deadline, or when it closes
        self._waiting: dict[GuardedHandler, asyncio.TimerHandle] = {}
        self._told: dict[int, float] = {}  # uid -> when its refusal was last logged

    def __call__(self) -> asyncio.BaseProtocol:
        assert self.server is not None, "the site sets the server when it starts"
        if self.open >= self.max_connections:
            self.refused += 1
            return _Refuse()
        self.open += 1
        return _Gate(self)

    def admit(self, transport: asyncio.Transport) -> GuardedHandler | None:
        """A connection's peer is known: its handler, or None (closed)."""
        assert self.server is not None
        sock = transport.get_extra_info("socket")
        try:
            who = Caller.of_socket(sock)
        except (OSError, AttributeError):
            who = Caller(uid=-1, gid=-1, pid=0)
        held = self.by_uid.get(who.uid, 0)
        crowded = held >= self.per_uid or self.admitted >= self.max_connections - self.reserved
        if who.uid != 0 and crowded and not self.privileged(who):
            self.open -= 1
            self.refused += 1
            self._tell(who, held)
            transport.close()
            return None
        self.by_uid[who.uid] = held + 1
        self.admitted += 1
        handler = GuardedHandler(self.server, guard=self, peer=who, **self.handler_args)
        transport.set_protocol(handler)
        handler.connection_made(transport)
        loop = asyncio.get_running_loop()
        self._waiting[handler] = loop.call_later(self.header_timeout, self._deadline, handler)
        return handler

    def _tell(self, who: Caller, held: int) -> None:
        """Log a refusal, once a second per uid at most (a flood must not
        flood the log)."""
        now = time.monotonic()
        if now - self._told.get(who.uid, 0.0) < 1.0:
            return
        if len(self._told) > 1024:
            self._told.clear()
        self._told[who.uid] = now
        log.warning(
            "uid %d (pid %d) is over its share of connections (%d of %d held; %d of %d open, "
            "%d kept for root and admins): closed at once",
            who.uid, who.pid, held, self.per_uid, self.admitted, self.max_connections,
            self.reserved,
        )  # fmt: skip

    def release(self, handler: GuardedHandler) -> None:
        """A handler's connection closed: off the books."""
        self.open -= 1
        self.admitted -= 1
        uid = handler.peer.uid
        left = self.by_uid.get(uid, 0) - 1
        if left > 0:
            self.by_uid[uid] = left
        else:
            self.by_uid.pop(uid, None)
        self._stop_waiting(handler)

    def started(self, request: web.BaseRequest) -> None:
        """Called for every request whose head arrived."""
        self.head_arrived(request.protocol)

    def head_arrived(self, handler: object) -> None:
        if isinstance(handler, GuardedHandler):
            self._stop_waiting(handler)

    def _stop_waiting(self, handler: GuardedHandler) -> None:
        timer = self._waiting.pop(handler, None)
        if timer is not None:
            timer.cancel()

    def _deadline(self, handler: GuardedHandler) -> None:
        if self._waiting.pop(handler, None) is None:
            return
        if handler.transport is not None:
            log.debug("closing a connection that sent no request in %gs", self.header_timeout)
            handler.force_close()  # closes the transport too


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Gate(asyncio.Protocol):
    """A connection before its peer is known: connection_made asks the guard,
    which hands the transport to a handler or closes it."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.decided = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.decided = True
        assert isinstance(transport, asyncio.Transport)
        self.guard.admit(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.decided:  # closed before it was admitted or refused
            self.decided = True
            self.guard.open -= 1


class GuardedHandler(web.RequestHandler):
    """aiohttp's request handler, with its peer known, its head watched for
    the guard, its books closed when it goes, and every error it answers
    itself (the HTTP parser's, a handler's that escaped) as problem+json."""

    def __init__(
        self, manager: web.Server, *, guard: ConnectionGuard, peer: Caller, **kwargs: Any
    ) -> None:
        super().__init__(manager, loop=asyncio.get_running_loop(), **kwargs)
        self.guard = guard
        self.peer = peer
        self._headed = False
        self._tail = b""
        self._released = False

    def data_received(self, data: bytes) -> None:
        if not self._headed:  # the end of the first head: the guard's deadline is met
            seen = self._tail + data
            if b"\r\n\r\n" in seen or b"\n\n" in seen:
                self._headed = True
                self.guard.head_arrived(self)
            else:
                self._tail = seen[-3:]
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if not self._released:
            self._released = True
            self.guard.release(self)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's own errors: a request its parser refused (400), or an
        exception that escaped the application (500). problem+json, one log
        line, the connection closed."""
        if request.writer.output_size > 0:
            raise ConnectionError("a response was sent already; the connection is broken")
        err: QusdError
        if status < 500 or isinstance(exc, HttpProcessingError):
            err = BadRequestError(_parser_reason(exc))
            log_bad_request(self.peer, err, exc)
        else:
            err = InternalError("internal error; see the daemon's log")
            log.error("internal error serving uid %d: %s", self.peer.uid,
                      escaped(f"{type(exc).__name__}: {exc}" if exc else str(status)))  # fmt: skip
            log.debug("the traceback of that internal error", exc_info=exc)
        resp = problem_response(err)
        resp.force_close()
        return resp


#: what each kind of parser error means, in words that carry none of the
#: client's bytes (aiohttp's messages quote them)
_PARSER_REASONS: list[tuple[type[BaseException], str]] = [
    (BadHttpMethod, "the request line has an invalid method"),
    (LineTooLong, "a request line or header is longer than the daemon takes (8190 bytes)"),
    (InvalidURLError, "the request's URL is malformed"),
    (BadStatusLine, "the request line is malformed"),
    (InvalidHeader, "a header is malformed"),
    (TransferEncodingError, "the chunked body is malformed"),
    (ContentLengthError, "the body is shorter than its Content-Length"),
    (ContentEncodingError, "the body cannot be decoded"),
]


def _parser_reason(exc: BaseException | None) -> str:
    for kind, reason in _PARSER_REASONS:
        if isinstance(exc, kind):
            return f"not a valid HTTP/1.1 request: {reason}"
    said = getattr(exc, "message", "")
    plain = isinstance(said, str) and said.replace(" ", "").replace("-", "").isalnum()
    detail = said if plain and len(said) <= 80 else "malformed"
    return f"not a valid HTTP/1.1 request: {detail}"


class GuardedSite(web.SockSite):
    """An already listening Unix socket, served behind a ConnectionGuard."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket, guard: ConnectionGuard) -> None:
        super().__init__(runner, sock)
        self.guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        self.guard.server = self._runner.server
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self.guard, sock=self._sock)


async def start(
    app: web.Application, sock: socket.socket, cfg: Config
) -> tuple[web.AppRunner, ConnectionGuard]:
    """Serve app on sock; runner.cleanup() stops it."""
    handler_args: dict[str, Any] = {
        "access_log": None,
        "keepalive_timeout": cfg.keepalive_timeout,
        # after an early answer (413, 408) read what the client still sends
        # for a moment only: it must not hold a connection slot
        "lingering_time": 1.0,
        # bodies are taken as they come: a Content-Encoding is refused (415),
        # never decoded (no decompression bomb, no decoder's errors)
        "auto_decompress": False,
    }
    svc = app[SERVICE]
    guard = ConnectionGuard(cfg, lambda c: svc.policy.role(c) is Role.ADMIN, handler_args)
    app[GUARD] = guard
    runner = web.AppRunner(app, shutdown_timeout=10, **handler_args)
    await runner.setup()
    await GuardedSite(runner, sock, guard).start()
    return runner, guard


def run(
    cfg: Config, svc: Service, sock: socket.socket, report: RestoreReport, passed: bool
) -> None:
    asyncio.run(serve(cfg, svc, sock, report, passed))


async def serve(
    cfg: Config, svc: Service, sock: socket.socket, report: RestoreReport, passed: bool
) -> None:
    """Serve until SIGTERM/SIGINT; passed: the socket came from systemd."""
    app = api.make_app(svc, cfg)
    runner, _ = await start(app, sock, cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    where = sock.getsockname()
    regs = svc.registrations() if svc.kernel.is_mounted() else []
    log.info("serving on %s (%s, %d managed)", where, plural(len(regs), "entry", "entries"),
             sum(r.managed for r in regs))  # fmt: skip
    systemd_glue.notify(
        "READY=1",
        f"STATUS={report.summary()}; serving on {where}{_warnings(svc)}",
        f"MAINPID={os.getpid()}",
    )
    reconciler = app[api.RECONCILER]
    reconciler.start()
    boot_file = HandoffWriter(svc)
    boot_file.start()
    # SIGHUP: reconcile now (the Debian package's dpkg trigger sends it when
    # a QEMU interpreter was upgraded)
    loop.add_signal_handler(signal.SIGHUP, reconciler.poke, "SIGHUP")
    tasks = []
    interval = systemd_glue.watchdog_interval()
    if interval:
        tasks.append(asyncio.create_task(watchdog(interval)))
    try:
        await stop.wait()
        log.info("stopping: finishing requests in flight")
        systemd_glue.notify("STOPPING=1", "STATUS=stopping")
    finally:
        await reconciler.stop()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await runner.cleanup()  # stops accepting, then finishes what is in flight
        await boot_file.stop()  # after the last change
        if not passed:  # a socket systemd passed is systemd's to remove
            with contextlib.suppress(FileNotFoundError):
                os.unlink(where)
    if svc.sandbox_pid:
        log.info("stopped; the sandbox's registrations go away with it")
    else:
        log.info("stopped; registrations stay in the kernel")


def _warnings(svc: Service) -> str:
    """What `systemctl status` should not hide: not mounted, conflicts, ..."""
    n = len(svc.warnings)
    return f"; {n} warning{'s' if n > 1 else ''} (qusctl status)" if n else ""


async def watchdog(interval: float) -> None:
    """WATCHDOG=1 from the event loop itself: a wedged loop stops the pings
    and systemd restarts the daemon."""
    while True:
        systemd_glue.notify("WATCHDOG=1")
        await asyncio.sleep(interval)
