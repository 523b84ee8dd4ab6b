"""Who may do what: callers, roles, and the rules that keep binfmt_misc (a
root-level power) out of reach of anyone who is not an admin.

A rule for the host's own ELF type hijacks every exec on the machine; an
interpreter the client chose runs in every process that execs a matching
binary; the C flag runs the interpreter as root for set-uid binaries. So:
admins may do everything (with explicit overrides for the dangerous parts);
users may register catalog targets of a foreign family, with an interpreter
qusd found itself, with harmless flags, and touch only what qusd manages;
everyone else may read.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import grp
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from qusd import paths
from qusd.binfmt import BINPRM_BUF_SIZE, Rule
from qusd.catalog import Catalog, Target
from qusd.config import Config
from qusd.errors import ForbiddenError, HostTypeError, InterpreterError, UntrustedInterpreterError
from qusd.state import Record

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
NGROUPS_MAX = 65536
NEVER_FOR_USERS = frozenset("CO")
#: why users may never ask for these flags
FLAG_RISKS = {
    "C": "C runs the interpreter with the binary's set-uid credentials (root's, for a "
    "root-owned set-uid program)",
    "O": "O hands the interpreter an open descriptor of programs its user may not read",
}


class Role(enum.Enum):
    ADMIN = "admin"
    USER = "user"
    READER = "reader"


@dataclass(frozen=True)
class Caller:
    """Who is asking, from the kernel (SO_PEERCRED), never from the client."""

    uid: int
    gid: int
    pid: int
    groups: frozenset[int] = frozenset()

    @classmethod
    def of_socket(cls, sock: socket.socket) -> Caller:
        pid, uid, gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        )
        return cls(uid=uid, gid=gid, pid=pid, groups=_peer_groups(sock) | {gid})

    @classmethod
    def myself(cls) -> Caller:
        return cls(os.getuid(), os.getgid(), os.getpid(), frozenset(os.getgroups()) | {os.getgid()})

    def exe(self) -> str | None:
        """The peer's program; without CAP_SYS_PTRACE another user's exe link
        cannot be read, and its command name stands in, in brackets."""
        try:
            return os.readlink(f"/proc/{self.pid}/exe")
        except OSError:
            pass
        try:
            with open(f"/proc/{self.pid}/comm") as f:
                return f"[{f.read().strip()}]"
        except OSError:
            return None


_GROUPS: dict[str, tuple[int | None, float]] = {}
GROUP_TTL = 2.0


def group_id(name: str) -> int | None:
    """The gid of a group name, or None when there is no such group; looked
    up again after GROUP_TTL seconds (every request asks: a flood must not
    read /etc/group each time)."""
    now = time.monotonic()
    cached = _GROUPS.get(name)
    if cached is not None and now - cached[1] < GROUP_TTL:
        return cached[0]
    try:
        gid: int | None = grp.getgrnam(name).gr_gid
    except KeyError:
        gid = None
    if len(_GROUPS) > 64:
        _GROUPS.clear()
    _GROUPS[name] = (gid, now)
    return gid


_LIBC: list[Any] = []  # libc, loaded on first use


def _peer_groups(sock: socket.socket) -> frozenset[int]:
    """The peer's supplementary groups. The kernel answers ERANGE when the
    buffer is too small, with the length it needs; Python's getsockopt takes
    at most 1024 bytes (256 groups), so libc's is called, with a buffer as
    big as the kernel says (up to NGROUPS_MAX). Without SO_PEERGROUPS, the
    primary group alone counts."""
    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    libc = _LIBC[0]
    count = 256
    while True:
        buf = (ctypes.c_uint32 * count)()
        size = ctypes.c_uint32(ctypes.sizeof(buf))
        rc = libc.getsockopt(sock.fileno(), socket.SOL_SOCKET, SO_PEERGROUPS, buf,
                              ctypes.byref(size))  # fmt: skip
        if rc == 0:
            return frozenset(buf[: size.value // 4])
        if ctypes.get_errno() == errno.ERANGE and count < NGROUPS_MAX:
            count = min(NGROUPS_MAX, max(2 * count, size.value // 4))
            continue
        return frozenset()


@dataclass
class Policy:
    """The rules, read from the settings by name (admin_group, user_group,
    user_flags)."""

    config: Config
    host_family: str
    catalog: Catalog
    #: headers of the host's own programs, which no rule may capture
    native_headers: list[bytes] = field(default_factory=list)
    #: group name to gid (the unit tests give their own)
    gid_of: Callable[[str], int | None] = group_id
    #: whose files are trusted, and how a file's owner is learnt (rootless
    #: mode asks a helper outside the sandbox)
    trust: Trust = field(default_factory=lambda: Trust.here())  # noqa: PLW0108 - below
    #: raises unless an interpreter is safe to register, else may pin it
    #: (the unit tests, whose files are not root's, give their own); None:
    #: check_trusted with trust
    check_interpreter: Callable[[str], Pinned | None] | None = None
    #: the targets the host runs itself, once found by trying (qusd.native);
    #: until then, the targets of its family
    native_targets: frozenset[str] | None = None

    def is_native(self, target: Target) -> bool:
        if self.native_targets is not None:
            return target.name in self.native_targets
        return target.family == self.host_family

    # -- roles ----------------------------------------------------------------

    def role(self, caller: Caller) -> Role:
        if caller.uid == 0 or self.gid_of(self.config.admin_group) in caller.groups:
            return Role.ADMIN
        if self.gid_of(self.config.user_group) in caller.groups:
            return Role.USER
        return Role.READER

    def _require_writer(self, caller: Caller, action: str) -> Role:
        role = self.role(caller)
        if role is Role.READER:
            raise ForbiddenError(
                f"{action} needs membership in the {self.config.user_group!r} group (users) or "
                f"{self.config.admin_group!r} (admins); uid {caller.uid} may only read"
            )
        return role

    # -- registrations ------------------------------------------------------------

    def check_targets(self, caller: Caller, targets: Iterable[Target], flags: str) -> None:
        if self._require_writer(caller, "registering") is Role.ADMIN:
            return
        check_foreign_request(
            targets, flags, self.host_family, self.config.user_flags, is_native=self.is_native
        )

    def check_entry(self, caller: Caller) -> None:
        if self._require_writer(caller, "registering") is not Role.ADMIN:
            raise ForbiddenError(
                "custom rules (own magic, mask or interpreter) are admin-only: users may "
                "register catalog targets, with the interpreter qusd finds"
            )

    def check_replace(self, caller: Caller, owner: int | None, name: str) -> None:
        """owner: who registered the entry there now through qusd (None: qusd
        did not). Replacing takes a name from whoever holds it: admins may;
        users only their own entries."""
        if self.role(caller) is Role.ADMIN:
            return
        if owner is None:
            raise ForbiddenError(f"{name} was not registered by qusd: only admins may replace it")
        if owner != caller.uid:
            raise ForbiddenError(
                f"{name} was registered by uid {owner}: users may replace only entries they "
                "registered"
            )

    def check_modify(self, caller: Caller, name: str, owner: int | None, action: str) -> None:
        """Enable, disable, unregister: admins any entry, users their own."""
        if self._require_writer(caller, action) is Role.ADMIN:
            return
        if owner is None:
            raise ForbiddenError(
                f"{name} was not registered by qusd: users may {action} only entries qusd manages"
            )
        if owner != caller.uid:
            raise ForbiddenError(
                f"{name} was registered by uid {owner}: users may {action} only entries they "
                "registered"
            )

    def check_reset(self, caller: Caller, scope: str) -> None:
        if self._require_writer(caller, "reset") is Role.ADMIN:
            return
        if scope != "managed":
            raise ForbiddenError(
                f"reset with scope {scope!r} is admin-only; users may reset 'managed'"
            )

    # -- rules anyone must follow -------------------------------------------------

    def check_rule(
        self, caller: Caller, rule: Rule, force: bool, allow_untrusted: bool
    ) -> Pinned | None:
        """Host protection and trusted interpreters, for every caller; admins
        may override each explicitly. The checked interpreter comes back
        pinned: open, to be verified once registered."""
        admin = self.role(caller) is Role.ADMIN
        if force and not admin:
            raise ForbiddenError(
                "force is admin-only (qusctl register --force): only admins may register a "
                "rule that matches the host's own programs"
            )
        if allow_untrusted and not admin:
            raise ForbiddenError(
                "allow_untrusted_interpreter is admin-only (qusctl register "
                "--allow-untrusted-interpreter): only admins may register an interpreter others "
                "could replace"
            )
        if not force:
            self.check_host_types(rule)
        return None if allow_untrusted else self.interpreter(rule.interpreter)

    def check_record(self, record: Record) -> Pinned | None:
        """A record from the state, before it is registered again: the checks
        a request passes that do not depend on who asked (roles were checked
        then), with the overrides the admin gave then."""
        record.rule.encode()
        if not record.force:
            self.check_host_types(record.rule)
        if record.allow_untrusted_interpreter:
            return None
        return self.interpreter(record.rule.interpreter)

    def interpreter(self, path: str) -> Pinned | None:
        if self.check_interpreter is not None:
            return self.check_interpreter(path)
        return check_trusted(path, self.trust)

    def check_host_types(self, rule: Rule) -> None:
        for header in self.native_headers:
            if rule.matches(header):
                raise HostTypeError(
                    f"{rule.name} would match the host's own programs ({self.host_family} "
                    "ELF): every exec on the machine would go to its interpreter; if that is "
                    "really meant, an admin may force it (qusctl register --force)"
                )


def check_foreign_request(
    targets: Iterable[Target],
    flags: str,
    host_family: str,
    allowed_flags: str,
    *,
    who: str = "users",
    refused: str = "admin-only",
    is_native: Callable[[Target], bool] | None = None,
    setting: str = "this daemon's user_flags setting",
    fix: str = "register with --flags {flags} or ask an admin",
) -> None:
    """What anyone short of an admin may register (the daemon's users, the OCI
    hook's containers): targets the host does not run itself (is_native; by
    default, those of another family), with harmless flags, never C or O."""
    for t in targets:
        if is_native(t) if is_native is not None else t.family == host_family:
            own = t.family == host_family
            why = f"of the host's own family ({host_family})" if own else "run natively"
            raise ForbiddenError(f"{t.name} is {why}: {who} may register only foreign targets")
    allowed = set(allowed_flags) - NEVER_FOR_USERS
    bad = sorted(set(flags) - allowed)
    if bad:
        risks = "; ".join(FLAG_RISKS.get(f, f"{f} is not in {setting}") for f in bad)
        usable = "".join(sorted(allowed))
        raise ForbiddenError(
            f"flag(s) {''.join(bad)} are {refused} ({who} may use: {usable or 'none'}): "
            f"{risks}; {fix.format(flags=usable or repr(''))}"
        )


def native_headers(catalog: Catalog, host_family: str, samples: Iterable[str] = ()) -> list[bytes]:
    """Headers the host runs itself: each native catalog target's magic (as
    executable and as shared object) and the headers of real native programs."""
    headers = []
    for t in catalog:
        if t.family != host_family:
            continue
        for e_type in (2, 3):  # ET_EXEC, ET_DYN
            h = bytearray(
                t.offset * b"\0" + bytes(g & m for g, m in zip(t.magic, t.mask, strict=True))
            )
            h = h.ljust(BINPRM_BUF_SIZE, b"\0")
            little = t.magic[5] == 1 if len(t.magic) > 5 else True
            h[16:18] = e_type.to_bytes(2, "little" if little else "big")
            headers.append(bytes(h))
    for path in samples:
        try:
            with open(path, "rb") as f:
                headers.append(f.read(BINPRM_BUF_SIZE))
        except OSError:
            continue
    return headers


# -- trusted interpreters ---------------------------------------------------------


@dataclass(frozen=True)
class Trust:
    """Whose files may hold an interpreter, and how a file's owner is learnt.

    Trusted are root and the user who runs the daemon, as the initial user
    namespace knows them. Inside a rootless sandbox every file of another
    user shows up as the overflow uid (65534), like root's: there the owner
    must be asked of a helper left outside (qusd.sandbox.Outside)."""

    owners: frozenset[int]
    #: the owner of an open file (descriptor and its fstat)
    owner_of: Callable[[int, os.stat_result], int] = field(
        default=lambda fd, st: st.st_uid, compare=False
    )

    @classmethod
    def here(cls) -> Trust:
        """Owners as this process sees them: root, and whoever runs it (root
        in a user namespace: the user who made it; the overflow uid never)."""
        return cls(frozenset({0, os.geteuid()}))

    def names(self) -> str:
        others = sorted(self.owners - {0})
        return "root" + "".join(f" or uid {u} (who runs qusd)" for u in others)


@dataclass
class Pinned:
    """A checked interpreter, held open (O_PATH) until its registration is
    verified: the kernel opens it by name, so the name must still lead to
    the file that was checked (holding it keeps its inode number from being
    reused meanwhile)."""

    path: str
    fd: int
    dev: int
    ino: int

    def verify(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != (self.dev, self.ino):
            raise UntrustedInterpreterError(
                f"{self.path} changed while it was registered (another file is there now): "
                "the registration was undone; find out who changes it, then try again"
            )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


def check_trusted(path: str, trust: Trust | None = None) -> Pinned:
    """The file the kernel will open for path, and every node its lookup
    passes (each directory, each symlink and where its target leads), must
    be owned by a trusted owner, and files and directories writable by
    nobody else: else whoever can write there decides what runs in every
    process that execs a matching program. The path is walked as the kernel
    walks it, never normalised as text, and '..' is refused outright.
    Returns the file, pinned."""
    trust = trust or Trust.here()
    if not os.path.isabs(path):
        raise InterpreterError(f"interpreter {path!r} is not an absolute path")
    if ".." in path.split("/"):
        raise UntrustedInterpreterError(
            f"interpreter {path} has a '..' component: the kernel follows a symlink before "
            "'..', so the path may lead elsewhere than it reads; give it without '..'"
        )
    seen: list[tuple[paths.Node, int]] = []
    try:
        fd = paths.walk(path, lambda node, fd: seen.append((node, trust.owner_of(fd, node.st))))
    except FileNotFoundError:
        raise InterpreterError(
            f"interpreter {path} does not exist: install it first (an admin may register "
            "it before it exists, without F, with qusctl register --allow-untrusted-interpreter)"
        ) from None
    except OSError as e:
        raise InterpreterError(f"interpreter {path}: {e.strerror}") from None
    try:
        last = seen[-1][0]
        if not stat.S_ISREG(last.st.st_mode) or not last.st.st_mode & 0o111:
            raise InterpreterError(f"interpreter {last.path} is not an executable regular file")
        # the file first, then back up the way the lookup came
        for node, owner in [seen[-1], *reversed(seen[:-1])]:
            _check_node(node, owner, trust, path)
    except BaseException:
        os.close(fd)
        raise
    return Pinned(path, fd, last.st.st_dev, last.st.st_ino)


def _check_node(node: paths.Node, owner: int, trust: Trust, path: str) -> None:
    via = f" (for {path})" if node.path != path else ""
    if stat.S_ISLNK(node.st.st_mode):
        if owner not in trust.owners:
            raise UntrustedInterpreterError(
                f"{node.path}{via} is a symlink owned by uid {owner}, not {trust.names()}: its "
                "owner could point it elsewhere"
            )
        return
    if owner not in trust.owners:
        raise UntrustedInterpreterError(
            f"{node.path}{via} is owned by uid {owner}, not {trust.names()}: its owner could "
            "replace the interpreter"
        )
    if node.st.st_mode & 0o022:
        raise UntrustedInterpreterError(
            f"{node.path}{via} is writable by group or others (mode "
            f"{stat.S_IMODE(node.st.st_mode):o}): they could replace the interpreter"
        )


class RateLimiter:
    """A token bucket per key (uid): rate tokens a second, burst at most."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[int, tuple[float, float]] = {}

    def take(self, key: int) -> float:
        """Take a token: 0 when allowed, else the seconds until one is there."""
        now = self.clock()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > 4096:  # forget full buckets: memory stays bounded
            self._buckets = {k: v for k, v in self._buckets.items() if v[0] < self.burst - 1}
        return (1 - tokens) / self.rate
