"""Walking a path the way the kernel does, to judge what it will open.

Who may change a file is decided by every node the kernel's path lookup
passes through: each directory, each symlink and the directories its target
leads through, and the file at the end. Text normalisation gets this wrong
(`a/lnk/..` is `a` as text, but the kernel follows `lnk` first and `..`
leaves its target), so walk() opens one component at a time, relative to
the directory reached so far, never following a symlink by name: a
symlink's target is read from the open link and walked where the kernel
walks it. Every node is shown to a visitor while it is open, so its owner
can be asked of the open file (rootless mode asks a helper outside the user
namespace; see qusd.sandbox.Outside).

Standard library only: the state directory is checked on the boot path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: symlinks followed in one lookup at most (the kernel's MAXSYMLINKS)
MAX_SYMLINKS = 40
_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Node:
    """One node the lookup passed: its path as reached (symlinks resolved
    before it), what fstat said of it, and whether it is the last one."""

    path: str
    st: os.stat_result
    last: bool = False

    @property
    def kind(self) -> str:
        return kind_of(self.st.st_mode)


#: called with each node and an O_PATH descriptor of it, open for the call
Visitor = Callable[[Node, int], None]


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISREG, "regular file"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):  # fmt: skip
        if test(mode):
            return name
    return "special file"


def walk(path: str, visit: Visitor) -> int:
    """Look path up as the kernel does, calling visit for every node on the
    way (/, each directory, each symlink, the last node); returns an O_PATH
    descriptor of the last node, which the caller closes. OSError as the
    kernel would fail (ENOENT, ENOTDIR, ELOOP, EACCES)."""
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not absolute")
    todo = deque(path.split("/"))
    current = _open_root(visit, last=not any(c not in ("", ".") for c in todo))
    where = "/"
    links = 0
    try:
        while todo:
            name = todo.popleft()
            last = not any(c not in ("", ".") for c in todo)
            if name in ("", "."):
                continue
            if name == "..":
                fd = os.open("..", _PATH | os.O_DIRECTORY, dir_fd=current)
                where = os.path.dirname(where)
            else:
                fd = os.open(name, _PATH, dir_fd=current)
                where = os.path.join(where, name)
            try:
                st = os.fstat(fd)
                visit(Node(where, st, last and not stat.S_ISLNK(st.st_mode)), fd)
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                    target = os.readlink("", dir_fd=fd)
                    os.close(fd)
                    fd = -1
                    where = os.path.dirname(where)
                    if target.startswith("/"):
                        os.close(current)
                        current = _open_root(visit, last=False)
                        where = "/"
                    todo.extendleft(reversed(target.split("/")))
                    continue
                if not last and not stat.S_ISDIR(st.st_mode):
                    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), where)
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                raise
            os.close(current)
            current = fd
        return current
    except BaseException:
        os.close(current)
        raise


def _open_root(visit: Visitor, last: bool) -> int:
    fd = os.open("/", _PATH | os.O_DIRECTORY)
    try:
        visit(Node("/", os.fstat(fd), last), fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def nodes(path: str) -> tuple[list[Node], int]:
    """Every node walk() passes, in order, and the last node's descriptor."""
    seen: list[Node] = []
    fd = walk(path, lambda node, _: seen.append(node))
    return seen, fd


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace path with data, all or nothing, also across a crash: a new
    file (mkstemp: O_EXCL, no symlink followed) beside it, written, fsynced,
    given mode, renamed over path, and the directory fsynced. A reader
    (systemd-binfmt at boot, a manifest's next load) finds the old file or
    the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
