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

from qusd.binfmt import BINPRM_BUF_SIZE, Rule
from qusd.catalog import Catalog, Target
from qusd.config import Config
from qusd.errors import ForbiddenError, HostTypeError, InterpreterError, UntrustedInterpreterError

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


def group_id(name: str) -> int | None:
    """The gid of a group name, or None when there is no such group."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _peer_groups(sock: socket.socket) -> frozenset[int]:
    """The peer's supplementary groups. The kernel answers ERANGE when the
    buffer is too small (more groups than it holds), so it grows up to
    NGROUPS_MAX; without SO_PEERGROUPS, the primary group alone counts."""
    size = 4 * 256
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE and size < 4 * NGROUPS_MAX:
                size *= 4
                continue
            return frozenset()
        return frozenset(struct.unpack(f"{len(raw) // 4}I", raw))


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
    #: raises unless an interpreter is safe to register (the unit tests,
    #: whose files are not root's, give their own)
    check_interpreter: Callable[[str], None] = field(default_factory=lambda: check_trusted)
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

    def check_replace(self, caller: Caller, managed: bool, name: str) -> None:
        if not managed and self.role(caller) is not Role.ADMIN:
            raise ForbiddenError(f"{name} was not registered by qusd: only admins may replace it")

    def check_modify(self, caller: Caller, name: str, managed: bool, action: str) -> None:
        if self._require_writer(caller, action) is Role.ADMIN:
            return
        if not managed:
            raise ForbiddenError(
                f"{name} was not registered by qusd: users may {action} only entries qusd manages"
            )

    def check_reset(self, caller: Caller, scope: str) -> None:
        if self._require_writer(caller, "reset") is Role.ADMIN:
            return
        if scope != "managed":
            raise ForbiddenError(
                f"reset with scope {scope!r} is admin-only; users may reset 'managed'"
            )

    # -- rules anyone must follow -------------------------------------------------

    def check_rule(self, caller: Caller, rule: Rule, force: bool, allow_untrusted: bool) -> None:
        """Host protection and trusted interpreters, for every caller; admins
        may override each explicitly."""
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
        if not allow_untrusted:
            self.check_interpreter(rule.interpreter)

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


def trusted_owners() -> frozenset[int]:
    """Root; and, in a user namespace that does not map the host's root (a
    rootless sandbox), the overflow uid that root's files show up as."""
    owners = {0}
    try:
        with open("/proc/self/uid_map") as f:
            maps_root = any(
                int(outside) <= 0 < int(outside) + int(count)
                for _inside, outside, count in (line.split() for line in f)
            )
        if not maps_root:
            with open("/proc/sys/kernel/overflowuid") as f:
                owners.add(int(f.read()))
    except (OSError, ValueError):
        pass
    return frozenset(owners)


def check_trusted(path: str) -> None:
    """The interpreter and every directory above it must be owned by root and
    writable by nobody else, both along the path as given (whoever can write
    a directory on it can swap a symlink there) and after symlinks are
    resolved: else whoever can write there decides what runs in every process
    that execs a matching program."""
    if not os.path.isabs(path):
        raise InterpreterError(f"interpreter {path!r} is not an absolute path")
    given = os.path.normpath(path)
    real = os.path.realpath(given)
    owners = trusted_owners()
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise InterpreterError(
            f"interpreter {path} does not exist: install it first (an admin may register "
            "it before it exists, without F, with qusctl register --allow-untrusted-interpreter)"
        ) from None
    except OSError as e:
        raise InterpreterError(f"interpreter {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
        raise InterpreterError(f"interpreter {real} is not an executable regular file")
    _check_node(real, st, owners, path)
    if given != real:
        link = os.lstat(given)
        if stat.S_ISLNK(link.st_mode) and link.st_uid not in owners:
            raise UntrustedInterpreterError(
                f"{given} is a symlink owned by uid {link.st_uid}, not root"
            )
        _check_dirs(os.path.dirname(given), owners, path)
    _check_dirs(os.path.dirname(real), owners, path)


def _check_dirs(directory: str, owners: frozenset[int], path: str) -> None:
    """directory and each one above it, up to /."""
    while True:
        try:
            st = os.stat(directory)
        except OSError as e:
            raise UntrustedInterpreterError(
                f"interpreter {path}: {directory}: {e.strerror}"
            ) from None
        _check_node(directory, st, owners, path)
        if directory == "/":
            return
        directory = os.path.dirname(directory)


def _check_node(node: str, st: os.stat_result, owners: frozenset[int], path: str) -> None:
    via = f" (for {path})" if node != path else ""
    if st.st_uid not in owners:
        raise UntrustedInterpreterError(
            f"{node}{via} is owned by uid {st.st_uid}, not root: its owner could replace "
            "the interpreter"
        )
    if st.st_mode & 0o022:
        raise UntrustedInterpreterError(
            f"{node}{via} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}): "
            "they could replace the interpreter"
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
