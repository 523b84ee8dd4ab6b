"""qusd, the daemon: restore the persistent registrations, then serve the API.

The restore runs before asyncio, aiohttp or pydantic are imported (qusd.server
brings them), so at boot the registrations are in the kernel as early as
Python allows; `qusd restore` does only that step and exits.
"""

from __future__ import annotations

import argparse
import fcntl
import grp
import json
import logging
import os
import socket
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from qusd import __version__, aioweb, catalog, config, feed, sandbox, systemd_glue
from qusd.binfmt import BinfmtMisc
from qusd.config import Config
from qusd.errors import QusdError, SocketInUseError
from qusd.policy import Trust
from qusd.service import Service
from qusd.state import LOCK, State, check_directory
from qusd.text import DIRECTORY, FILE, complete

log = logging.getLogger("qusd")


#: the options that are settings (qusd.toml(5)); the rest pick a command
SETTINGS = (
    "socket", "state_dir", "binfmt_path", "interpreter_dirs", "catalog",
    "reconcile_interval", "log_level", "sandbox",
)  # fmt: skip


def settings_options(p: argparse.ArgumentParser, sub: bool) -> None:
    """The options, accepted before or after the command alike: the
    commands' copies default to SUPPRESS, so a value given before the
    command is not reset after it."""
    none = argparse.SUPPRESS if sub else None

    def add(*args: str, what: str | None = None, **kw: Any) -> None:
        action = p.add_argument(*args, default=none, **kw)
        if what is not None:
            complete(action, what)

    add(
        "--config",
        metavar="FILE",
        what=FILE,
        help="settings file (default $QUSD_CONFIG or /etc/qusd/qusd.toml)",
    )
    add("--socket", metavar="PATH", what=FILE, help="API socket (default /run/qusd/qusd.sock)")
    add(
        "--state-dir", metavar="DIR", what=DIRECTORY, help="state directory (default /var/lib/qusd)"
    )
    add(
        "--binfmt-path",
        metavar="PATH",
        what=DIRECTORY,
        help="binfmt_misc mount (default /proc/sys/fs/binfmt_misc)",
    )
    add(
        "--interpreter-dir",
        action="append",
        metavar="DIR",
        dest="interpreter_dirs",
        what=DIRECTORY,
        help="where interpreters are looked up, in order (repeatable; default /usr/bin, "
        "/usr/local/bin, /usr/libexec/qemu-binfmt)",
    )
    add("--catalog", choices=config.CATALOG_SOURCES, help="target table source")
    add(
        "--reconcile-interval",
        type=float,
        metavar="SECONDS",
        help="how often to re-register persistent entries another tool removed (0: never)",
    )
    add("--log-level", choices=config.LOG_LEVELS)
    add("--sandbox", action="store_const", const=True,
        help="run in a new user + mount namespace with a private binfmt_misc (Linux >= 6.7): "
        "nothing outside it changes; works without privilege")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qusd",
        description="Keep QEMU user-mode binfmt_misc registrations alive and serve them over "
        "a Unix-socket JSON API. Settings come from /etc/qusd/qusd.toml, then QUSD_* "
        "environment variables, then these options (before or after the command).",
    )
    p.add_argument("--version", action="version", version=f"qusd {__version__}")
    settings_options(p, sub=False)
    common = argparse.ArgumentParser(add_help=False)
    settings_options(common, sub=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    p.set_defaults(command="serve")
    sub.add_parser(
        "serve", parents=[common], help="restore, then serve the API (the default)",
        description="Restore the persistent registrations from the state, then serve the "
        "API on the socket until SIGTERM or SIGINT (then finish the requests in flight and "
        "exit 0). While it serves, re-register persistent entries another tool removed.",
    )  # fmt: skip
    sub.add_parser(
        "restore", parents=[common], help="restore the registrations and exit (early boot)",
        description="Restore the persistent registrations from the state into the kernel, "
        "then exit: 0 when every one was restored, 1 when one failed.",
    )  # fmt: skip
    c = sub.add_parser(
        "check-config", parents=[common], help="validate the settings and print them",
        description="Read the settings as the daemon does at start (file, QUSD_* "
        "environment, options), validate them with the same code, and print the result as "
        "a settings file; on a bad setting, name it and exit 78. Changes nothing.",
    )  # fmt: skip
    complete(
        c.add_argument(
            "file", nargs="?", metavar="FILE",
            help="the settings file to check (default: --config, $QUSD_CONFIG or "
            f"{config.DEFAULT_CONFIG_FILE})",
        ),
        FILE,
    )  # fmt: skip
    return p


def check_config(cfg: Config) -> str:
    """The effective settings as a qusd.toml that loads back to cfg."""
    lines = [f"# valid; from {', '.join(cfg.sources)}", "[qusd]"]
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "sources":
            continue
        if f.name == "socket_mode":
            text = f'"{value:o}"'
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        elif isinstance(value, tuple):
            text = "[" + ", ".join(json.dumps(v) for v in value) + "]"
        else:
            text = json.dumps(value)
        lines.append(f"{f.name} = {text}")
    return "\n".join(lines)


def build_service(
    cfg: Config, sandbox_pid: int | None = None, trust: Trust | None = None
) -> Service:
    svc = Service(
        BinfmtMisc(cfg.binfmt_path),
        State.load(cfg.state_dir),
        catalog.load(cfg.catalog),
        cfg,
        sandbox_pid=sandbox_pid,
        trust=trust,
    )
    feed.ring(svc.events)  # the event stream's memory starts with the restore
    return svc


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
                "group %r does not exist: only the socket's owner and root can reach %s "
                "(create it with 'groupadd --system %s')", group, path, group,
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
    fd = os.open(
        os.path.join(state_dir, LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise SocketInUseError(
            f"another qusd uses the state directory {state_dir}; stop it first"
        ) from None
    return fd


def main(argv: Sequence[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    flags = {k: getattr(ns, k) for k in SETTINGS}
    if flags.get("interpreter_dirs"):
        flags["interpreter_dirs"] = tuple(flags["interpreter_dirs"])
    try:
        if ns.command == "check-config":
            print(check_config(config.load(flags, os.environ, ns.file or ns.config)))
            return 0
        cfg = config.load(flags, os.environ, ns.config)
        systemd_glue.setup_logging(cfg.log_level)
        # What the state holds is registered at every start: only root (and
        # the user running a rootless daemon) may change it. Checked before
        # the sandbox, where other users' files and root's look alike.
        check_directory(cfg.state_dir, {0, os.geteuid()})
        sandbox_pid, trust = None, None
        if cfg.sandbox:
            outside = sandbox.create(cfg.binfmt_path, outside=True)
            if outside is not None:  # rootless: owners as the machine knows them
                trust = Trust(frozenset({0, outside.uid}), outside.owner)
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
        svc = build_service(cfg, sandbox_pid, trust)
        svc.ensure_mounted()
        started = time.perf_counter()
        svc.take_back_handoff()
        report = svc.restore()
        # for GET /metrics (qusd_restore_duration_seconds)
        setattr(svc, "restore_seconds", time.perf_counter() - started)  # noqa: B010
        log.info("restore: %s", report.summary())
        if sock is None:
            svc.write_handoff()  # systemd-binfmt's file for the next boot
            return 1 if report.failed else 0
        aioweb.load()  # aiohttp's server, without its client and TLS
        from qusd import server  # noqa: PLC0415 - asyncio, aiohttp: only now

        server.run(cfg, svc, sock, report, passed)
    except QusdError as e:
        print(f"qusd: {e.message}", file=sys.stderr)
        return e.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
