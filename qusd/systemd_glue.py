"""systemd glue, at the edge: readiness and status notifications, the
watchdog, socket activation, and the journal with one MESSAGE_ID per kind of
event (qusd.events). Everything degrades to nothing (or stderr) without systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import sys

try:
    import systemd.daemon as _sd
    import systemd.journal as _journal
except ImportError:  # pragma: no cover - systemd-python is a dependency
    _sd = None
    _journal = None


def _stderr_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM to the device:inode of the stream it
    connected stderr to (systemd.exec(5))."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def setup_logging(level: str) -> None:
    """The journal, with structured fields, when stderr goes there; else
    plain lines on stderr."""
    handler: logging.Handler
    if _journal is not None and _stderr_is_journal():
        handler = _journal.JournalHandler(SYSLOG_IDENTIFIER="qusd")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("qusd: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def notify(*lines: str) -> None:
    """Tell the service manager (NOTIFY_SOCKET) something: READY=1, STATUS=..."""
    if _sd is not None and os.environ.get("NOTIFY_SOCKET"):
        _sd.notify("\n".join(lines))


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None


def listen_socket() -> socket.socket | None:
    """The listening Unix stream socket systemd passed (LISTEN_FDS), if any."""
    if _sd is None:
        return None
    fds = _sd.listen_fds(True)
    if not fds:
        return None
    fd = fds[0]
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise OSError(f"file descriptor {fd} from systemd is not a socket")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise OSError("the socket from systemd must be a Unix stream socket (ListenStream=PATH)")
    for extra in fds[1:]:
        os.close(extra)
    return sock
