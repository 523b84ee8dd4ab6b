"""qusd-oci-hook: a binfmt_misc table of its own for one container.

An OCI runtime hook (podman, CRI-O; stage createRuntime). A container
annotated `run.qusd.emulate=aarch64,riscv64` (or `all`) gets the emulation
it asks for in a private table, without root and without touching the
host's: since Linux 6.7 each user namespace that mounts binfmt_misc has its
own table, and a rootless container runs in a user namespace. Containers
that do not ask are left alone.

How the interpreter gets in, by the kernel's rule for F (fs/binfmt_misc.c,
shown on the real kernel in tests/test_ocihook.py): the interpreter is opened
when the rule is written, with the credentials of whoever opened `register`,
the path resolved against the root of the process that WRITES. So a child
enters the container's user and mount namespaces, mounts binfmt_misc at the
container's /proc/sys/fs/binfmt_misc (creating that user namespace's table)
and hands the mount back as a directory descriptor; the hook, still in the
runtime's namespaces, writes the rules through it with the host's paths, then
the child makes the mount read-only. The container's filesystem never holds
an interpreter and none it holds can be chosen; entries read back with the
host's real path. (Written from inside a container, /proc/self/fd/N and
/proc/HOOKPID/root/... are ENOENT: the hook is not in the container's pid
namespace; a plain path resolves in the image.)

The daemon's rules apply, through the same code: catalog targets only, of a
foreign family, never C or O, F always (the interpreter is not in the
container), static, root-owned and trusted interpreters, rules built and
checked by the kernel layer. Standard library only. A kernel without private
tables fails the container's start with the reason: never the host's table.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import re
import socket
import stat
import sys
import syslog
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from qusd import catalog, interpreters, policy, sandbox
from qusd import table as transaction
from qusd.binfmt import BinfmtMisc, Entry, Rule, check_flags, normalize_flags
from qusd.config import Config
from qusd.errors import (
    ConflictError,
    InterpreterError,
    MalformedRequestError,
    QusdError,
    SandboxError,
)
from qusd.table import Action, Want

PROG = "qusd-oci-hook"
#: the annotation that asks for emulation: targets (commas or spaces) or "all"
ANNOTATION = "run.qusd.emulate"
#: optional binfmt_misc flags; F is always set, P may be added, C and O never
FLAGS_ANNOTATION = "run.qusd.emulate.flags"
ALLOWED_FLAGS = "FP"
#: P (preserve argv[0]): multi-call programs (busybox, as in Alpine images) need it
DEFAULT_FLAGS = "FP"
#: where binfmt_misc goes, under the container's root
CONTAINER_BINFMT = "proc/sys/fs/binfmt_misc"

NS_GET_PARENT = 0xB702  # _IO(0xb7, 0x2), ioctl_ns(2)
PROC_USER_INIT_INO = 0xEFFFFFFD  # the initial user namespace (include/linux/proc_ns.h)
PROC_SUPER_MAGIC = 0x9FA0
BINFMTFS_MAGIC = 0x42494E4D
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND = 0x20, 0x1000
CHILD_TIMEOUT = 30.0


@dataclass(frozen=True)
class State:
    """The part of the OCI state (runtime-spec, on stdin) the hook needs."""

    id: str
    pid: int
    bundle: str
    annotations: Mapping[str, str]

    @classmethod
    def parse(cls, text: str) -> State:
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise MalformedRequestError(f"the OCI state on stdin is not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise MalformedRequestError("the OCI state on stdin is not a JSON object")
        annotations = doc.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise MalformedRequestError("the OCI state's annotations are not an object")
        pid = doc.get("pid", 0)
        return cls(
            id=str(doc.get("id", "")),
            pid=pid if isinstance(pid, int) else 0,
            bundle=str(doc.get("bundle", "")),
            annotations={str(k): str(v) for k, v in annotations.items()},
        )


@dataclass(frozen=True)
class Request:
    names: tuple[str, ...]
    flags: str


def request_of(annotations: Mapping[str, str]) -> Request | None:
    """What the container asks for; None when it does not ask."""
    value = annotations.get(ANNOTATION)
    if value is None:
        return None
    names = tuple(n for n in re.split(r"[\s,]+", value) if n)
    if not names:
        raise MalformedRequestError(
            f"{ANNOTATION} is empty: name targets (aarch64,riscv64 or arm64, ...) or 'all'"
        )
    return Request(names, annotations.get(FLAGS_ANNOTATION, DEFAULT_FLAGS).strip())


def plan(req: Request, cat: catalog.Catalog, host_family: str, dirs: Sequence[str]) -> list[Rule]:
    """The rules for a request, every check done before anything is touched."""
    check_flags(req.flags)
    asked = req.flags if "F" in req.flags else req.flags + "F"
    if req.names == ("all",):
        targets = [
            t
            for t in interpreters.foreign_with_interpreters(cat, host_family, dirs)
            if (found := interpreters.find(t, dirs)) is not None and found.static
        ]
        if not targets:
            raise InterpreterError(
                f"'all' found no static interpreter of a foreign target in {', '.join(dirs)}: "
                "install qemu-user-static"
            )
    else:
        targets = cat.resolve(req.names)
    policy.check_foreign_request(
        targets, asked, host_family, ALLOWED_FLAGS, who="containers", refused="not allowed",
        setting="what the hook registers", fix="annotate run.qusd.emulate.flags={flags}",
    )  # fmt: skip
    flags = normalize_flags(asked)
    guard = policy.Policy(
        Config(),
        host_family,
        cat,
        policy.native_headers(cat, host_family, ["/bin/sh", sys.executable]),
    )
    fix = "install qemu-user-static, or pass the hook --interpreter-dir"
    rules = []
    for t in targets:
        interp = interpreters.require(t, dirs, fix)
        if not interp.static:
            raise InterpreterError(
                f"{interp.path} is dynamically linked: in the container its libraries are "
                "missing; install qemu-user-static (qemu-<cpu>-static)",
                interpreter=interp.path,
            )
        policy.check_trusted(interp.path, hook_trust())
        rule = t.rule(interp.path, flags)
        rule.encode()
        guard.check_host_types(rule)
        rules.append(rule)
    return rules


def hook_trust() -> policy.Trust:
    """Whose interpreters the hook registers. It runs in the runtime's user
    namespace: rootless, real root's files show there as the overflow uid,
    as every unmapped user's do, and nothing outside can be asked. So the
    overflow uid stands for root here, which holds because the hook looks
    only in the system directories its root-owned hooks.d configuration
    names (by default /usr/bin, /usr/local/bin, /usr/libexec/qemu-binfmt,
    which only root can write on any distribution)."""
    try:
        with open("/proc/sys/kernel/overflowuid") as f:
            overflow = int(f.read())
    except (OSError, ValueError):
        overflow = 65534
    return policy.Trust(frozenset({0, os.geteuid(), overflow}))


def check_kernel() -> None:
    """Refuse, with the reason, where the container cannot have a table of its own."""
    reason = sandbox.unsupported_reason()
    if reason:
        raise SandboxError(
            f"cannot give the container a binfmt_misc table of its own: {reason}; "
            "not registering in the host's table instead"
        )


def check_user_namespace(pid: int) -> None:
    """The container's user namespace must not be the host's (rootful podman
    without --userns): its table would be the machine's. Nor may it lie above
    or beside the runtime's: the runtime makes containers in or below its own."""
    path = f"/proc/{pid}/ns/user"
    try:
        ino = os.stat(path).st_ino
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SandboxError(f"cannot open the user namespace of pid {pid}: {e.strerror}") from None
    try:
        if ino == PROC_USER_INIT_INO:
            raise SandboxError(
                "the container runs in the host's user namespace: its binfmt_misc table "
                "would be the machine's; run it rootless, or with a user namespace of its own "
                "(podman run --userns=auto)"
            )
        if ino == os.stat("/proc/self/ns/user").st_ino:
            return  # rootless podman's default: the runtime's own namespace
        try:
            os.close(fcntl.ioctl(fd, NS_GET_PARENT))
        except OSError as e:
            # EPERM: its parent is not at or below our namespace (ioctl_ns(2))
            raise SandboxError(
                f"the container's user namespace is not below the runtime's ({e.strerror}): "
                "refusing to mount a binfmt_misc table there"
            ) from None
    finally:
        os.close(fd)


def container_rootfs(bundle: str) -> str:
    """The container's root, from the bundle's config.json (root.path)."""
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            root = json.load(f)["root"]["path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MalformedRequestError(f"cannot read root.path from {path}: {e}") from None
    return os.path.normpath(os.path.join(bundle, str(root)))


# -- the container's mount ------------------------------------------------------------


def _statfs_type(path: str) -> int | None:
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type comes first
    if ctypes.CDLL(None, use_errno=True).statfs(os.fsencode(path), buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value


def _enter(pid: int) -> None:
    """Join the user and mount namespaces of pid. Both are opened first: once
    in the container's user namespace, its processes may no longer be ours to
    inspect. The user namespace we are in already is skipped (setns refuses
    to re-enter one's own: rootless podman's default)."""
    fds = []
    try:
        for ns, flag in (("user", sandbox.CLONE_NEWUSER), ("mnt", sandbox.CLONE_NEWNS)):
            path = f"/proc/{pid}/ns/{ns}"
            if os.stat(path).st_ino != os.stat(f"/proc/self/ns/{ns}").st_ino:
                fds.append((ns, flag, os.open(path, os.O_RDONLY | os.O_CLOEXEC)))
        libc = ctypes.CDLL(None, use_errno=True)
        for ns, flag, fd in fds:
            if libc.setns(fd, flag) != 0:
                err = ctypes.get_errno()
                raise SandboxError(
                    f"cannot enter the {ns} namespace of pid {pid}: {os.strerror(err)}"
                )
    except OSError as e:
        raise SandboxError(f"cannot open the namespaces of pid {pid}: {e.strerror}") from None
    finally:
        for _, _, fd in fds:
            os.close(fd)


def _mount_inside(pid: int, rootfs: str) -> tuple[int, str]:
    """In the child: join the container, mount its table; the mount's directory."""
    _enter(pid)
    os.chdir("/")
    target = os.path.join(rootfs, CONTAINER_BINFMT)
    proc = os.path.join(rootfs, "proc")
    try:
        is_link = stat.S_ISLNK(os.lstat(proc).st_mode)
    except OSError:
        is_link = False
    found = _statfs_type(target)
    if found == BINFMTFS_MAGIC and not is_link:  # the hook ran in this mount namespace before
        _remount(target, read_only=False)
        return os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), target
    if is_link or found != PROC_SUPER_MAGIC:
        raise SandboxError(
            f"no /proc/sys/fs/binfmt_misc of the container under {rootfs} (its /proc is not "
            "mounted yet, or it left that root already): run the hook at the createRuntime "
            "stage; if /proc is mounted, load binfmt_misc (modprobe binfmt_misc)"
        )
    BinfmtMisc(target).mount()
    if _statfs_type(target) != BINFMTFS_MAGIC:
        raise SandboxError(f"binfmt_misc did not appear at {target} after mounting it")
    return os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), target


def _remount(target: str, read_only: bool) -> None:
    """Read-only once the rules are in: the container's root owns the files of
    its table, and could otherwise register interpreters of its choosing (or C)."""
    flags = (
        MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | MS_NOEXEC | (MS_RDONLY if read_only else 0)
    )
    if ctypes.CDLL(None, use_errno=True).mount(None, os.fsencode(target), None, flags, None):
        err = ctypes.get_errno()
        mode = "read-only" if read_only else "writable"
        raise SandboxError(f"cannot make {target} {mode}: {os.strerror(err)}")


def _child(sock: socket.socket, pid: int, rootfs: str) -> None:  # pragma: no cover - forked
    """Mount, hand the directory over, then seal or just leave on request."""
    dirfd, target = _mount_inside(pid, rootfs)
    socket.send_fds(sock, [b"ok"], [dirfd])
    os.close(dirfd)
    if sock.recv(16) == b"seal":
        _remount(target, read_only=True)
        sock.sendall(b"ok")


class ContainerTable:
    """The container's binfmt_misc, mounted by a child in its namespaces and
    reached from here through a directory descriptor: `kernel` writes with
    the runtime's root, so interpreter paths are the host's."""

    def __init__(self, pid: int, rootfs: str) -> None:
        self._sock, theirs = socket.socketpair()
        self._sock.settimeout(CHILD_TIMEOUT)
        self._child = os.fork()
        if self._child == 0:  # pragma: no cover - the forked child
            self._sock.close()
            code = 0
            try:
                _child(theirs, pid, rootfs)
            except BaseException as e:
                text = e.message if isinstance(e, QusdError) else f"{type(e).__name__}: {e}"
                with contextlib.suppress(OSError):
                    theirs.sendall(b"E" + text.encode(errors="replace"))
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        self._dirfd = -1
        try:
            msg, fds, _, _ = socket.recv_fds(self._sock, 4096, 1)
        except OSError as e:
            self.close()
            raise SandboxError(f"the mount helper did not answer: {e}") from None
        if fds:
            self._dirfd = fds[0]
        if msg != b"ok" or self._dirfd < 0:
            self.close()
            raise SandboxError(msg[1:].decode(errors="replace") or "the mount helper failed")
        self.kernel = BinfmtMisc(f"/proc/self/fd/{self._dirfd}")

    def seal(self) -> None:
        """Make the container's mount read-only (the entries stay)."""
        try:
            self._sock.sendall(b"seal")
            answer = self._sock.recv(4096)
        except OSError as e:
            raise SandboxError(f"the mount helper did not answer: {e}") from None
        if answer != b"ok":
            raise SandboxError(answer[1:].decode(errors="replace") or "sealing failed")

    def close(self) -> None:
        if self._dirfd >= 0:
            os.close(self._dirfd)
            self._dirfd = -1
        self._sock.close()
        if self._child:
            os.waitpid(self._child, 0)
            self._child = 0


# -- registering ------------------------------------------------------------------------


def register_rules(
    kernel: BinfmtMisc, rules: Sequence[Rule], then: Callable[[], object] | None = None
) -> list[tuple[Entry, str]]:
    """Register rules, then call `then` (sealing the table), all or nothing,
    through the table transaction; an identical enabled entry is kept
    (containers sharing a user namespace share its table), anything else
    under the name is refused."""
    shared = "containers that share a user namespace share one table; ask for the same "
    shared += "flags, or give this container its own user namespace (podman run --userns=auto)"
    plan = transaction.plan(kernel, [Want(r) for r in rules])
    for c in plan.of(Action.UNCHANGED):
        if c.before is not None and not c.before.enabled:
            raise ConflictError(f"{c.name} is in this user namespace's table, disabled; {shared}")
    plan.refuse_conflicts(shared)
    done = transaction.apply(kernel, plan.of(Action.ADD), save=then)
    rows = []
    for c in plan:
        entry = done.get(c.name, c.before)
        assert entry is not None
        rows.append((entry, "registered" if c.action is Action.ADD else "unchanged"))
    return rows


def emulate(state: State, req: Request, cat: catalog.Catalog, dirs: Sequence[str]) -> list[str]:
    """Give the container its table; one line per entry, for the log."""
    check_kernel()
    rules = plan(req, cat, catalog.family_of(catalog.host_machine()), dirs)
    if state.pid <= 0:
        raise SandboxError(
            "the OCI state names no container pid: run the hook at the createRuntime stage"
        )
    check_user_namespace(state.pid)
    table = ContainerTable(state.pid, container_rootfs(state.bundle))
    try:
        done = register_rules(table.kernel, rules, then=table.seal)
    finally:
        table.close()
    return [f"{e.name}: {result} ({e.describe()})" for e, result in done]


# -- reporting ----------------------------------------------------------------------------


def _runtime_log() -> tuple[str, str] | None:
    """The log file and format of the runtime that runs us (runc and crun take
    --log PATH and --log-format json|text): where its own errors go."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            args = [os.fsdecode(a) for a in f.read().split(b"\0")]
    except OSError:
        return None
    log, fmt = None, "text"
    for i, a in enumerate(args):
        if a == "--log" and i + 1 < len(args):
            log = args[i + 1]
        elif a.startswith("--log="):
            log = a.split("=", 1)[1]
        elif a == "--log-format" and i + 1 < len(args):
            fmt = args[i + 1]
        elif a.startswith("--log-format="):
            fmt = a.split("=", 1)[1]
    return (log, fmt) if log else None


def report_error(message: str) -> None:
    """Where a runtime's user looks: stderr (runc shows it; crun with
    run.oci.hooks.stderr=FILE), the runtime's own log, and syslog."""
    line = f"{PROG}: {message}"
    print(line, file=sys.stderr, flush=True)
    found = _runtime_log()
    if found:
        log, fmt = found
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        text = json.dumps({"msg": line, "level": "error", "time": now}) if fmt == "json" else line
        with contextlib.suppress(OSError):
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)  # never create it
            try:
                os.write(fd, text.encode() + b"\n")
            finally:
                os.close(fd)
    syslog.openlog(PROG, 0, syslog.LOG_USER)
    syslog.syslog(syslog.LOG_ERR, message)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=f"OCI runtime hook (createRuntime): gives a container annotated "
        f"{ANNOTATION}=TARGET[,TARGET...]|all a binfmt_misc table of its own (Linux >= 6.7) "
        "with the host's static QEMU interpreters. Reads the OCI state on stdin.",
    )
    p.add_argument(
        "--interpreter-dir", action="append", metavar="DIR",
        help="where qemu-<cpu>-static are (repeatable; default: /usr/bin, /usr/local/bin, "
        "/usr/libexec/qemu-binfmt)",
    )  # fmt: skip
    p.add_argument("--catalog", choices=["builtin", "binfmt.d"], default="builtin")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    name = ""
    try:
        state = State.parse(sys.stdin.read())
        name = f"container {state.id[:12]}: " if state.id else ""
        req = request_of(state.annotations)
        if req is None:
            return 0
        dirs = ns.interpreter_dir or interpreters.DEFAULT_DIRS
        for line in emulate(state, req, catalog.load(ns.catalog), dirs):
            print(f"{PROG}: {name}{line}", flush=True)
    except QusdError as e:
        report_error(f"{name}{e.message}")
        return e.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
