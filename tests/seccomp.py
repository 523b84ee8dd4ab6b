"""Seccomp filters the tests put over a process tree, as stand-ins for
kernels and service managers this machine is not:

- no-ia32: an x86_64 kernel booted with ia32_emulation=0 (or built without
  IA32_EMULATION) answers execve of a 32-bit x86 program with ENOEXEC,
  unless a binfmt_misc entry takes it (binfmt_misc is tried first). A
  user-notification filter hands every execve/execveat of the tree to a
  supervisor outside it, which reads the file's header and answers ENOEXEC
  for an ELFCLASS32 i386/i486 program that no enabled entry of the caller's
  table matches; every other exec goes on untouched, to the real kernel.
- no-ia32-syscalls: a process is killed (SIGSYS) at its first 32-bit x86
  system call, as under systemd's SystemCallArchitectures=native: the
  kernel still loads 32-bit programs.
- no-userns: unshare(CLONE_NEWUSER) fails with EPERM, as under systemd's
  RestrictNamespaces=yes.

    python -m tests.seccomp no-ia32|no-ia32-syscalls|no-userns -- CMD ARG...

x86_64 only (the machine the tests run on).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import struct
import sys
from collections.abc import Sequence

from qusd import doctor
from qusd.binfmt import Entry

SYS_SECCOMP = 317
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
PR_SET_NO_NEW_PRIVS = 38
AUDIT_ARCH_X86_64, AUDIT_ARCH_I386 = 0xC000003E, 0x40000003
NR_EXECVE, NR_EXECVEAT, NR_UNSHARE = 59, 322, 272
CLONE_NEWUSER = 0x10000000
RET_ALLOW, RET_USER_NOTIF, RET_ERRNO = 0x7FFF0000, 0x7FC00000, 0x00050000
RET_KILL_PROCESS = 0x80000000
NOTIF_RECV, NOTIF_SEND, NOTIF_ID_VALID = 0xC0502100, 0xC0182101, 0x40082102
FLAG_CONTINUE = 1
AT_FDCWD, AT_EMPTY_PATH = -100, 0x1000
LD_W_ABS, JEQ_K, JSET_K, RET_K = 0x20, 0x15, 0x45, 0x06


def insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def install(program: bytes, listener: bool) -> int:
    """Load a BPF program over this process (and what it execs); the
    listener fd when asked for one."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(program)
    prog = SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_char_p))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER if listener else 0
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(prog))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "seccomp(SECCOMP_SET_MODE_FILTER)")
    return int(fd)


# -- no-userns ---------------------------------------------------------------------------

NO_USERNS = b"".join(
    [
        insn(LD_W_ABS, 0, 0, 4),  # arch
        insn(JEQ_K, 0, 4, AUDIT_ARCH_X86_64),
        insn(LD_W_ABS, 0, 0, 0),  # nr
        insn(JEQ_K, 0, 2, NR_UNSHARE),
        insn(LD_W_ABS, 0, 0, 16),  # args[0], low half
        insn(JSET_K, 1, 0, CLONE_NEWUSER),
        insn(RET_K, 0, 0, RET_ALLOW),
        insn(RET_K, 0, 0, RET_ERRNO | errno.EPERM),
    ]
)

NO_IA32_SYSCALLS = b"".join(
    [
        insn(LD_W_ABS, 0, 0, 4),
        insn(JEQ_K, 0, 1, AUDIT_ARCH_I386),
        insn(RET_K, 0, 0, RET_KILL_PROCESS),
        insn(RET_K, 0, 0, RET_ALLOW),
    ]
)

# -- no-ia32 -----------------------------------------------------------------------------

EXECS = b"".join(
    [
        insn(LD_W_ABS, 0, 0, 4),
        insn(JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        insn(LD_W_ABS, 0, 0, 0),
        insn(JEQ_K, 2, 0, NR_EXECVE),
        insn(JEQ_K, 1, 0, NR_EXECVEAT),
        insn(RET_K, 0, 0, RET_ALLOW),
        insn(RET_K, 0, 0, RET_USER_NOTIF),
    ]
)


def _cstring(pid: int, address: int) -> str:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        mem.seek(address)
        raw = mem.read(4096)
    return os.fsdecode(raw.split(b"\0", 1)[0])


def _where(pid: int, dirfd: int, path: str, flags: int) -> str:
    """The file an exec names, as a path this (outside) process can open."""
    if not path and flags & AT_EMPTY_PATH:
        return f"/proc/{pid}/fd/{dirfd}"
    for own in ("/proc/self/", "/proc/thread-self/"):
        if path.startswith(own):
            return f"/proc/{pid}/" + path[len(own) :]
    if path.startswith("/"):
        return f"/proc/{pid}/root{path}"
    base = f"/proc/{pid}/cwd" if dirfd == AT_FDCWD else f"/proc/{pid}/fd/{dirfd}"
    return f"{base}/{path}"


def _ia32(header: bytes) -> bool:
    machine = int.from_bytes(header[18:20], "little")
    return header[:4] == b"\x7fELF" and header[4:6] == b"\x01\x01" and machine in (3, 6)


def _taken(pid: int, header: bytes, name: str) -> bool:
    """Whether an enabled entry of the caller's binfmt_misc table takes it
    (its mount namespace's view, through /proc/PID/root)."""
    table = f"/proc/{pid}/root/proc/sys/fs/binfmt_misc"
    try:
        with open(f"{table}/status") as f:
            if f.read().strip() != "enabled":
                return False
        names = [n for n in os.listdir(table) if n not in ("register", "status")]
        entries = []
        for n in names:
            with open(f"{table}/{n}") as f:
                entries.append(Entry.parse(n, f.read()))
    except OSError:
        return False
    return doctor.pick(entries, header, name)[0] is not None


def _answer(pid: int, nr: int, args: Sequence[int]) -> int | None:
    """ENOEXEC for a 32-bit x86 program nothing takes, else None (go on)."""
    if nr == NR_EXECVE:
        dirfd, address, flags = AT_FDCWD, args[0], 0
    else:
        dirfd, address, flags = ctypes.c_int32(args[0]).value, args[1], args[4]
    try:
        path = _cstring(pid, address)
        with open(_where(pid, dirfd, path, flags), "rb") as f:
            header = f.read(256)
    except OSError:
        return None  # the kernel will say what is wrong
    if _ia32(header) and not _taken(pid, header, os.path.basename(path)):
        return errno.ENOEXEC
    return None


def supervise(listener: int) -> None:
    """Answer the tree's execs until no process of it is left."""
    libc = ctypes.CDLL(None, use_errno=True)
    poll = select.poll()
    poll.register(listener, select.POLLIN)
    while True:
        events = poll.poll()
        if any(ev & (select.POLLHUP | select.POLLERR) for _, ev in events):
            return
        req = ctypes.create_string_buffer(80)
        if libc.ioctl(listener, NOTIF_RECV, req) != 0:
            if ctypes.get_errno() in (errno.EINTR, errno.ENOENT):
                continue
            return
        nid, pid, _flags, nr, _arch, _ip = struct.unpack_from("QIIiIQ", req.raw, 0)
        args = struct.unpack_from("6Q", req.raw, 32)
        err = _answer(pid, nr, args)
        valid = ctypes.c_uint64(nid)
        if libc.ioctl(listener, NOTIF_ID_VALID, ctypes.byref(valid)) != 0:
            continue  # the caller died meanwhile
        resp = struct.pack("QqiI", nid, 0, -err if err else 0, 0 if err else FLAG_CONTINUE)
        libc.ioctl(listener, NOTIF_SEND, ctypes.create_string_buffer(resp, len(resp)))


def no_ia32(argv: Sequence[str]) -> None:
    """Run argv under the filter, with the supervisor in a child that is not."""
    ours, theirs = socket.socketpair()
    child = os.fork()
    if child == 0:  # pragma: no cover - the supervisor
        ours.close()
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(theirs, 1, 1)
            if fds:
                supervise(fds[0])
        finally:
            os._exit(0)
    theirs.close()
    listener = install(EXECS, listener=True)
    socket.send_fds(ours, [b"l"], [listener])
    os.close(listener)
    ours.close()
    os.execvp(argv[0], list(argv))


def main() -> None:
    mode, sep, *argv = sys.argv[1:]
    assert sep == "--" and argv, "usage: python -m tests.seccomp MODE -- CMD..."
    if mode == "no-ia32":
        no_ia32(argv)
    elif mode in ("no-userns", "no-ia32-syscalls"):
        install(NO_USERNS if mode == "no-userns" else NO_IA32_SYSCALLS, listener=False)
        os.execvp(argv[0], argv)
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
