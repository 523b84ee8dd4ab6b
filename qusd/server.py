"""Serving the API until SIGTERM/SIGINT, with the keep-alive and watchdog
tasks beside it. Imported only once the registrations are restored."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket

from qusd import api, systemd_glue
from qusd.config import Config
from qusd.errors import QusdError
from qusd.service import RestoreReport, Service

log = logging.getLogger("qusd")


def run(
    cfg: Config, svc: Service, sock: socket.socket, report: RestoreReport, passed: bool
) -> None:
    asyncio.run(serve(cfg, svc, sock, report, passed))


async def serve(
    cfg: Config, svc: Service, sock: socket.socket, report: RestoreReport, passed: bool
) -> None:
    """Serve until SIGTERM/SIGINT; passed: the socket came from systemd."""
    limits = api.Limits(cfg.body_timeout, cfg.rate_limit, cfg.rate_burst, cfg.rate_limit_admins)
    runner, server = await api.start_server(
        api.make_app(svc, limits),
        sock,
        max_connections=cfg.max_connections,
        header_timeout=cfg.header_timeout,
        keepalive_timeout=cfg.keepalive_timeout,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    where = sock.getsockname()
    regs = svc.registrations() if svc.kernel.is_mounted() else []
    log.info("serving on %s (%d entries, %d managed)", where, len(regs),
             sum(r.managed for r in regs))  # fmt: skip
    systemd_glue.notify(
        "READY=1",
        f"STATUS={report.summary()}; serving on {where}{_warnings(svc)}",
        f"MAINPID={os.getpid()}",
    )
    tasks = [asyncio.create_task(keep_alive(svc, cfg.reconcile_interval))]
    interval = systemd_glue.watchdog_interval()
    if interval:
        tasks.append(asyncio.create_task(watchdog(interval)))
    try:
        await stop.wait()
        log.info("stopping: finishing requests in flight")
        systemd_glue.notify("STOPPING=1", "STATUS=stopping")
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        server.close()  # stop accepting; then finish what is in flight
        await runner.cleanup()
        if not passed:  # a socket systemd passed is systemd's to remove
            with contextlib.suppress(FileNotFoundError):
                os.unlink(where)
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


async def keep_alive(svc: Service, interval: float) -> None:
    """Re-register persistent entries that vanished (another tool flushed
    the table: systemd-binfmt does at every start)."""
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        try:
            report = await svc.reconcile()
        except QusdError as e:
            log.error("reconcile: %s", e.message)
            continue
        if report.restored:
            log.warning(
                "re-registered %s: they had been removed from the kernel",
                ", ".join(report.restored),
            )
            systemd_glue.notify(f"STATUS=re-registered {', '.join(report.restored)}")
