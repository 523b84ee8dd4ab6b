"""Sandboxes: a user + mount namespace with its own binfmt_misc instance.

Since Linux 6.7 every user namespace that mounts binfmt_misc gets a private
table; exec in that namespace consults it first. A sandbox is therefore a
real kernel binfmt_misc that nothing outside sees: how `make run` and the
tests run qusd, and how a user without privilege gets emulation.

Root gets an identity uid/gid map (real users keep their ids inside, so the
daemon's access policy sees them as they are); anyone else gets root mapped
to themselves. The namespaces are made in the process that then execs the
command, so the PID a caller sees is the sandbox's: `qusctl run --pid PID`
enters it (only a sandbox its own uid owns, unless forced: whoever owns a
namespace decides what its mounts show, /usr/bin/id included).

Inside a rootless sandbox, root's files and every other user's show up as
the overflow uid: who owns a file can then be told only from outside, by
the helper create() leaves there on request (Outside).

    python -m qusd.sandbox [--binfmt-path P] -- CMD ARG...
    python -m qusd.sandbox --enter PID -- CMD ARG...
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from qusd.binfmt import DEFAULT_PATH, BinfmtMisc
from qusd.errors import ForbiddenError, QusdError, SandboxError

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_REC = 0x4000
MS_SLAVE = 1 << 19
MIN_KERNEL = (6, 7)
ID_RANGE = 4294967295  # every id: the identity map of the initial namespace
NS_GET_OWNER_UID = 0xB704  # ioctl_ns(2): the uid that owns a user namespace
NO_UID = 0xFFFFFFFF


def kernel_release() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def unsupported_reason() -> str | None:
    """Why sandboxes cannot work here, or None when they can."""
    if kernel_release() < MIN_KERNEL:
        return (
            f"Linux {'.'.join(map(str, kernel_release()))} has one binfmt_misc table for "
            "the whole machine; private tables need Linux >= 6.7"
        )
    try:
        with open("/proc/sys/user/max_user_namespaces") as f:
            if int(f.read()) == 0:
                return "user namespaces are disabled (user.max_user_namespaces = 0)"
    except OSError:
        pass
    return None


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"{what} failed: {os.strerror(err)}", errno=err)


def _write_file(path: str, data: str) -> None:
    with open(path, "w") as f:
        f.write(data)


def _write_maps(pid: str, uid: int, gid: int, identity: bool) -> None:
    if identity:
        _write_file(f"/proc/{pid}/uid_map", f"0 0 {ID_RANGE}\n")
        _write_file(f"/proc/{pid}/gid_map", f"0 0 {ID_RANGE}\n")
    else:
        # An unprivileged process may map only itself, and only once it has
        # given up setgroups (user_namespaces(7)).
        _write_file(f"/proc/{pid}/setgroups", "deny\n")
        _write_file(f"/proc/{pid}/uid_map", f"0 {uid} 1\n")
        _write_file(f"/proc/{pid}/gid_map", f"0 {gid} 1\n")


class Outside:
    """A helper left in the initial user namespace when a rootless sandbox
    is made: given an open file (SCM_RIGHTS), it answers its owner as the
    machine knows it (fstat there). Inside, the overflow uid stands for root
    and for every other user alike, so trust cannot be decided there. It
    exits when the sandbox's end of the socket closes."""

    def __init__(self, sock: socket.socket, pid: int, uid: int) -> None:
        self.sock = sock
        self.pid = pid
        #: the user who made the sandbox, as the machine knows them
        self.uid = uid

    @classmethod
    def start(cls) -> Outside:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the helper, in its own process
            code = 0
            try:
                ours.close()
                _serve_outside(theirs)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        return cls(ours, pid, os.getuid())

    def owner(self, fd: int, st: os.stat_result | None = None) -> int:
        """The uid owning the open file fd, as the initial namespace sees it."""
        try:
            socket.send_fds(self.sock, [b"?"], [fd])
            answer = self.sock.recv(16)
        except OSError as e:
            raise SandboxError(f"the helper outside the sandbox is gone: {e.strerror}") from None
        if len(answer) != 4:
            raise SandboxError("the helper outside the sandbox is gone")
        (uid,) = struct.unpack("I", answer)
        if uid == NO_UID:
            raise SandboxError("the helper outside the sandbox could not stat a file")
        return int(uid)


def _serve_outside(sock: socket.socket) -> None:  # pragma: no cover - in the helper
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    while True:
        msg, fds, _, _ = socket.recv_fds(sock, 16, 1)
        if not msg:
            return
        uid = NO_UID
        for fd in fds:
            try:
                uid = os.fstat(fd).st_uid
            except OSError:
                uid = NO_UID
            os.close(fd)
        sock.send(struct.pack("I", uid))


def create(
    binfmt_path: str = DEFAULT_PATH, identity: bool | None = None, outside: bool = False
) -> Outside | None:
    """Move this (single-threaded) process into a new sandbox. identity: map
    every id to itself (the default for root) rather than only our own to
    root (which works anywhere, even in a sandbox that maps only one id).
    outside: in a rootless sandbox, leave a helper outside that tells the
    owners of files (None in an identity-mapped sandbox, which sees owners as
    they are)."""
    reason = unsupported_reason()
    if reason:
        raise SandboxError(f"cannot make a sandbox: {reason}")
    libc = _libc()
    uid, gid = os.getuid(), os.getgid()
    if identity is None:
        identity = uid == 0
    left = Outside.start() if outside and not identity else None
    if identity:
        # Only a process with CAP_SETUID in the parent namespace may write a
        # map of more than one id, so a helper left outside writes it.
        go_r, go_w = os.pipe()
        helper = os.fork()
        if helper == 0:  # pragma: no cover - runs in the forked helper
            os.close(go_w)
            code = 1
            try:
                if os.read(go_r, 1) == b"u":
                    _write_maps(str(os.getppid()), 0, 0, True)
                    code = 0
            finally:
                os._exit(code)
        os.close(go_r)
        try:
            _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare")
            os.write(go_w, b"u")
        finally:
            os.close(go_w)
            _, status = os.waitpid(helper, 0)
        if status != 0:
            raise SandboxError("could not write the identity uid/gid map of the sandbox")
    else:
        _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare")
        _write_maps("self", uid, gid, False)
    # Mounts made here must not travel back to the host.
    _check(libc.mount(None, b"/", None, MS_REC | MS_SLAVE, None), "making / a slave mount")
    try:
        BinfmtMisc(binfmt_path).mount()
    except QusdError as e:
        raise SandboxError(f"cannot mount a private binfmt_misc: {e.message}") from None
    return left


def namespace_owner(fd: int) -> int:
    """The uid that owns the user namespace open at fd (NS_GET_OWNER_UID)."""
    buf = bytearray(4)
    fcntl.ioctl(fd, NS_GET_OWNER_UID, buf, True)
    return int(struct.unpack("I", buf)[0])


def enter(pid: int, force: bool = False) -> None:
    """Move this (single-threaded) process into the sandbox of process PID:
    only one whose user namespace our own uid owns, unless force."""
    libc = _libc()
    cwd = os.getcwd()
    try:
        fds = [os.open(f"/proc/{pid}/ns/{ns}", os.O_RDONLY) for ns in ("user", "mnt")]
    except OSError as e:
        raise SandboxError(f"no sandbox to enter at pid {pid}: {e.strerror}") from None
    try:
        if os.stat(f"/proc/{pid}/ns/user").st_ino == os.stat("/proc/self/ns/user").st_ino:
            raise SandboxError(f"process {pid} is not in a sandbox (it shares our user namespace)")
        owner = namespace_owner(fds[0])
        if owner != os.getuid() and not force:
            raise ForbiddenError(
                f"the sandbox of process {pid} is a user namespace owned by uid {owner}, not "
                f"by you (uid {os.getuid()}): its owner decides what every file in it is (a "
                "mount can put their program at /usr/bin/id), and joining it would run that "
                "with your privileges; pass --force if you trust uid "
                f"{owner}"
            )
        _check(libc.setns(fds[0], CLONE_NEWUSER), f"entering the user namespace of {pid}")
        _check(libc.setns(fds[1], CLONE_NEWNS), f"entering the mount namespace of {pid}")
    finally:
        for fd in fds:
            os.close(fd)
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir("/")


def same_user_namespace(pid: int) -> bool:
    """Whether process pid is in our user namespace (sees our binfmt_misc
    table); True when that cannot be told."""
    try:
        return os.stat(f"/proc/{pid}/ns/user").st_ino == os.stat("/proc/self/ns/user").st_ino
    except OSError:
        return True


def command(argv: Sequence[str], binfmt_path: str = DEFAULT_PATH) -> list[str]:
    """The command line that runs argv in a new sandbox."""
    return [sys.executable, "-m", "qusd.sandbox", "--binfmt-path", binfmt_path, "--", *argv]


def enter_command(pid: int, argv: Sequence[str]) -> list[str]:
    """The command line that runs argv in the existing sandbox of PID."""
    return [sys.executable, "-m", "qusd.sandbox", "--enter", str(pid), "--", *argv]


def spawn(
    argv: Sequence[str], binfmt_path: str = DEFAULT_PATH, **kwargs: Any
) -> subprocess.Popen[Any]:
    """Start argv in a new sandbox; its pid is the sandbox's."""
    return subprocess.Popen(command(argv, binfmt_path), **kwargs)


def exec_in(argv: Sequence[str]) -> None:
    """Replace this process with argv; a missing program is a clear error.
    The signals Python ignores (SIGPIPE, SIGXFSZ) get their defaults back
    first, as subprocess does: `yes | head` must end yes."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.execvp(argv[0], list(argv))
    except OSError as e:
        raise SandboxError(f"cannot run {argv[0]}: {e.strerror}") from None


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qusd.sandbox",
        description="Run a command in a new user + mount namespace with a private "
        "binfmt_misc (Linux >= 6.7), or in the sandbox of an existing process.",
    )
    parser.add_argument("--binfmt-path", default=DEFAULT_PATH, help="where to mount binfmt_misc")
    parser.add_argument("--enter", type=int, metavar="PID", help="join the sandbox of PID")
    parser.add_argument("argv", nargs="+", metavar="CMD", help="the command and its arguments")
    ns = parser.parse_args(args)
    try:
        if ns.enter is not None:
            enter(ns.enter)
        else:
            create(ns.binfmt_path)
        exec_in(ns.argv)
    except QusdError as e:
        print(f"qusd sandbox: {e.message}", file=sys.stderr)
        return e.exit_status
    return 0  # pragma: no cover - exec does not return


if __name__ == "__main__":
    sys.exit(main())
