"""qusd, the daemon: restore the persistent registrations, then serve the API.

The restore runs before aiohttp or pydantic are imported, so at boot the
registrations are in the kernel as early as Python allows; `qusd restore`
does only that step and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import grp
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Sequence

from qusd import __version__, catalog, config, sandbox, systemd_glue
from qusd.binfmt import BinfmtMisc
from qusd.config import Config
from qusd.errors import QusdError, SocketInUseError
from qusd.policy import PolicyConfig
from qusd.service import RestoreReport, Service
from qusd.state import State

log = logging.getLogger("qusd")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qusd",
        description="Keep QEMU user-mode binfmt_misc registrations alive and serve them over "
        "a Unix-socket JSON API. Settings come from /etc/qusd/qusd.toml, then QUSD_* "
        "environment variables, then these options.",
    )
    p.add_argument("--version", action="version", version=f"qusd {__version__}")
    p.add_argument(
        "command",
        nargs="?",
        choices=["serve", "restore"],
        default="serve",
        help="serve (default): restore, then serve the API; restore: restore and exit",
    )
    p.add_argument("--config", metavar="FILE", help="settings file (default /etc/qusd/qusd.toml)")
    p.add_argument("--socket", metavar="PATH", help="API socket (default /run/qusd/qusd.sock)")
    p.add_argument("--state-dir", metavar="DIR", help="state directory (default /var/lib/qusd)")
    p.add_argument(
        "--binfmt-path", metavar="PATH", help="binfmt_misc mount (default /proc/sys/fs/binfmt_misc)"
    )
    p.add_argument(
        "--interpreter-dir",
        action="append",
        metavar="DIR",
        dest="interpreter_dirs",
        help="where interpreters are looked up, in order (repeatable; default /usr/bin, "
        "/usr/local/bin, /usr/libexec/qemu-binfmt)",
    )
    p.add_argument("--catalog", choices=config.CATALOG_SOURCES, help="target table source")
    p.add_argument(
        "--reconcile-interval",
        type=float,
        metavar="SECONDS",
        help="how often to re-register persistent entries another tool removed (0: never)",
    )
    p.add_argument("--log-level", choices=config.LOG_LEVELS)
    p.add_argument(
        "--sandbox",
        action="store_true",
        default=None,
        help="run in a new user + mount namespace with a private binfmt_misc (Linux >= 6.7): "
        "nothing outside it changes; works without privilege",
    )
    return p


def build_service(cfg: Config, sandbox_pid: int | None = None) -> Service:
    return Service(
        kernel=BinfmtMisc(cfg.binfmt_path),
        state=State.load(cfg.state_dir),
        catalog=catalog.load(cfg.catalog),
        interpreter_dirs=cfg.interpreter_dirs,
        sandbox_pid=sandbox_pid,
        policy=PolicyConfig(cfg.admin_group, cfg.user_group, cfg.user_flags),
    )


def bind_unix(path: str, mode: int, group: str | None = None) -> socket.socket:
    """A listening Unix socket at path, owned by root:group with mode; a stale
    file from a crash is replaced, a live daemon is not."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketInUseError(f"{path} exists and is not a socket; remove it or pick another")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: left by a crash
            log.info("removed stale socket %s", path)
        else:
            raise SocketInUseError(f"another daemon is serving on {path}; stop it first")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # never reachable by others before the chmod
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    if group:
        try:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        except KeyError:
            log.warning(
                "group %r does not exist: only root can reach %s (create it with "
                "'groupadd --system %s')", group, path, group,
            )  # fmt: skip
        except OSError as e:
            log.warning("cannot give %s to group %s: %s", path, group, e.strerror)
    os.chmod(path, mode)
    sock.listen(128)
    return sock


def lock_state_dir(state_dir: str) -> int:
    """Hold an exclusive lock on the state directory for the process's life:
    two daemons writing one state file would undo each other."""
    os.makedirs(state_dir, mode=0o755, exist_ok=True)
    fd = os.open(os.path.join(state_dir, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise SocketInUseError(
            f"another qusd uses the state directory {state_dir}; stop it first"
        ) from None
    return fd


async def serve(
    cfg: Config, svc: Service, sock: socket.socket, report: RestoreReport, passed: bool
) -> None:
    """Serve until SIGTERM/SIGINT; passed: the socket came from systemd."""
    from qusd import api  # noqa: PLC0415 - aiohttp only once the registrations are restored

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
        f"STATUS=restored {len(report.restored) + len(report.adopted)} registrations, "
        f"serving on {where}",
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


def main(argv: Sequence[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    flags = {k: v for k, v in vars(ns).items() if k not in ("command", "config")}
    if flags.get("interpreter_dirs"):
        flags["interpreter_dirs"] = tuple(flags["interpreter_dirs"])
    try:
        cfg = config.load(flags, os.environ, ns.config)
        systemd_glue.setup_logging(cfg.log_level)
        sandbox_pid = None
        if cfg.sandbox:
            sandbox.create(cfg.binfmt_path)
            sandbox_pid = os.getpid()
            log.info("in a sandbox (pid %d): a private binfmt_misc at %s", sandbox_pid,
                     cfg.binfmt_path)  # fmt: skip
        # Claim the socket and the state before changing anything: a second
        # daemon must fail without touching the first one's table or state.
        sock, passed = None, False
        if ns.command == "serve":
            sock = systemd_glue.listen_socket()
            passed = sock is not None
            if sock is not None:
                log.info("using the socket systemd passed (%s)", sock.getsockname())
            else:
                sock = bind_unix(cfg.socket, cfg.socket_mode, cfg.socket_group)
        lock_state_dir(cfg.state_dir)
        svc = build_service(cfg, sandbox_pid)
        svc.ensure_mounted()
        report = svc.restore()
        log.info("restore: %s", report.summary())
        if sock is None:
            return 1 if report.failed else 0
        asyncio.run(serve(cfg, svc, sock, report, passed))
    except QusdError as e:
        print(f"qusd: {e.message}", file=sys.stderr)
        return e.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
