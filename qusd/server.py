"""Serving the API until SIGTERM/SIGINT, with the keep-alive and watchdog
tasks beside it. Imported only once the registrations are restored.

The listening socket is served by a GuardedSite, an aiohttp site, so the
runner's cleanup() owns shutdown as for any aiohttp site; its
ConnectionGuard keeps slow or flooding clients from holding the daemon's
connections or memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket

from aiohttp import web

from qusd import api, systemd_glue
from qusd.config import Config
from qusd.middleware import GUARD
from qusd.service import RestoreReport, Service
from qusd.text import plural

log = logging.getLogger("qusd")


class ConnectionGuard:
    """The protocol factory for the listening socket: at most max_connections
    open at once (more are closed at once), and a client that has not sent a
    whole request head within header_timeout is disconnected. (A keep-alive
    connection's later requests are bounded by keepalive_timeout, like an
    idle one.)"""

    def __init__(self, max_connections: int, header_timeout: float) -> None:
        self.server: web.Server | None = None
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.refused = 0
        # the server learns of a connection only in connection_made, which
        # asyncio calls on the next loop iteration: handlers made since then
        # count too, so a batch of accepts cannot overshoot
        self._pending = 0
        # handlers that have not had a request yet; each leaves when its first
        # request arrives or at its deadline, whichever is first
        self._waiting: set[object] = set()

    def __call__(self) -> asyncio.BaseProtocol:
        assert self.server is not None, "the site sets the server when it starts"
        if len(self.server.connections) + self._pending >= self.max_connections:
            self.refused += 1
            return _Refuse()
        loop = asyncio.get_running_loop()
        if self._pending == 0:
            loop.call_soon(self._settled)
        self._pending += 1
        handler = self.server()
        self._waiting.add(handler)
        loop.call_later(self.header_timeout, self._deadline, handler)
        return handler

    def _settled(self) -> None:
        self._pending = 0

    def started(self, request: web.BaseRequest) -> None:
        """Called for every request whose head arrived."""
        self._waiting.discard(request.protocol)

    def _deadline(self, handler: web.RequestHandler) -> None:
        if handler not in self._waiting:
            return
        self._waiting.discard(handler)
        if handler.transport is not None:
            log.debug("closing a connection that sent no request in %gs", self.header_timeout)
            handler.force_close()  # closes the transport too


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


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
    guard = ConnectionGuard(cfg.max_connections, cfg.header_timeout)
    app[GUARD] = guard
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=10,
        keepalive_timeout=cfg.keepalive_timeout,
        # after an early answer (413, 408) read what the client still sends
        # for a moment only: it must not hold a connection slot
        lingering_time=1.0,
    )
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
