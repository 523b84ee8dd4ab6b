"""Which interpreter path does binfmt_misc's F flag accept for a container?

Run by tests/test_ocihook.py as an ordinary user inside `podman unshare`
(the namespaces the OCI hook runs in), against a running, pivoted container:

    python3 fflag_probe.py PID INTERPRETER IMAGE_FILE

Standard library only, nothing of qusd: this is the kernel's answer. Each
form writes one aarch64 rule, named after the form, and reports what the
kernel said (ACCEPTED or the errno name) as one JSON object on stdout.

A-C: a child joins the container's user + mount namespaces, mounts its
binfmt_misc and writes the rule itself, naming the interpreter (opened on
the host side first) as /proc/self/fd/N, as /proc/HOOKPID/root/PATH, and as
the plain host PATH, and (C2) as IMAGE_FILE, a path that exists in the
container only. D1: the child opens `register` and hands it over; the
prober, still in the runtime's namespaces, writes the plain PATH. D2 (what
qusd-oci-hook does): the child hands over the mount's directory; the prober
opens `register` through it and writes the plain PATH. E: a child joins the
pid namespace too and forks, so /proc/self exists in the container's /proc.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID = 0x00020000, 0x10000000, 0x20000000
MS_REMOUNT, MS_BIND = 0x20, 0x1000
BINFMT = "/proc/sys/fs/binfmt_misc"
MAGIC = bytes.fromhex("7f454c460201010000000000000000000200b700")
MASK = bytes.fromhex("ffffffffffffff00fffffffffffffffffeffffff")


def esc(data: bytes) -> str:
    return "".join(f"\\x{c:02x}" for c in data)


def rule(name: str, interpreter: str) -> bytes:
    return f":{name}:M::{esc(MAGIC)}:{esc(MASK)}:{interpreter}:F".encode()


def enter(pid: int, *namespaces: tuple[str, int]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for ns, flag in namespaces:
        path = f"/proc/{pid}/ns/{ns}"
        if os.stat(path).st_ino == os.stat(f"/proc/self/ns/{ns}").st_ino:
            continue
        fd = os.open(path, os.O_RDONLY)
        if libc.setns(fd, flag) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        os.close(fd)


def mount_binfmt() -> None:
    """The container's table, writable: mounted, or (EBUSY: its hook mounted
    it, read-only) made writable again."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"binfmt_misc", BINFMT.encode(), b"binfmt_misc", 0, None) == 0:
        return
    if ctypes.get_errno() != errno.EBUSY:
        raise OSError(ctypes.get_errno(), "mount binfmt_misc")
    if libc.mount(None, BINFMT.encode(), None, MS_REMOUNT | MS_BIND, None) != 0:
        raise OSError(ctypes.get_errno(), "remount binfmt_misc writable")


def write(fd: int, data: bytes) -> str:
    try:
        os.write(fd, data)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "ACCEPTED"


def write_path(path: str, data: bytes) -> str:
    fd = os.open(path, os.O_WRONLY)
    try:
        return write(fd, data)
    finally:
        os.close(fd)


def main() -> int:
    pid, interpreter, image_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    host_fd = os.open(interpreter, os.O_RDONLY)  # on the host side, before any setns
    os.set_inheritable(host_fd, True)
    me = os.getpid()
    results: dict[str, str] = {}
    ours, theirs = socket.socketpair()
    ours.settimeout(30)
    child = os.fork()
    if child == 0:  # joins the container; reports on its end of the pair
        out: dict[str, str] = {}
        try:
            enter(pid, ("user", CLONE_NEWUSER), ("mnt", CLONE_NEWNS))
            mount_binfmt()
            register = f"{BINFMT}/register"
            out["A /proc/self/fd/N"] = write_path(
                register, rule("probe-a", f"/proc/self/fd/{host_fd}")
            )
            out["B /proc/HOOKPID/root/PATH"] = write_path(
                register, rule("probe-b", f"/proc/{me}/root{interpreter}")
            )
            out["C PATH, written inside"] = write_path(register, rule("probe-c", interpreter))
            out["C2 a path of the image's, written inside"] = write_path(
                register, rule("probe-c2", image_file)
            )
            out["root inside"] = ",".join(sorted(os.listdir("/")))
            reg = os.open(register, os.O_WRONLY)
            top = os.open(BINFMT, os.O_RDONLY | os.O_DIRECTORY)
            socket.send_fds(theirs, [json.dumps(out).encode()], [reg, top])
            theirs.recv(1)
        except BaseException as e:
            theirs.sendall(json.dumps({"child failed": repr(e)}).encode())
        finally:
            os._exit(0)
    msg, fds, _, _ = socket.recv_fds(ours, 65536, 2)
    results.update(json.loads(msg))
    if len(fds) == 2:
        reg, top = fds
        results["D1 PATH, register opened inside, written outside"] = write(
            reg, rule("probe-d1", interpreter)
        )
        results["D2 PATH, through the mount's directory (the hook)"] = write_path(
            f"/proc/self/fd/{top}/register", rule("probe-d2", interpreter)
        )
        os.close(reg)
        os.close(top)
    ours.sendall(b"x")
    os.waitpid(child, 0)
    results.update(form_e(pid, host_fd))
    print(json.dumps(results))
    return 0


def form_e(pid: int, host_fd: int) -> dict[str, str]:
    """E: join the pid namespace too; only a forked child is in it."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        result = "not run"
        try:
            enter(pid, ("user", CLONE_NEWUSER), ("pid", CLONE_NEWPID), ("mnt", CLONE_NEWNS))
            grandchild = os.fork()
            if grandchild == 0:
                res = write_path(f"{BINFMT}/register", rule("probe-e", f"/proc/self/fd/{host_fd}"))
                os.write(w, res.encode())
                os._exit(0)
            os.waitpid(grandchild, 0)
            result = ""
        except BaseException as e:
            result = f"failed: {e!r}"
        finally:
            if result:
                os.write(w, result.encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        answer = f.read()
    os.waitpid(child, 0)
    return {"E /proc/self/fd/N, writer in the pid namespace too": answer}


if __name__ == "__main__":
    sys.exit(main())
