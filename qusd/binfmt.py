"""The kernel interface: one binfmt_misc mount, its entries, and the rules
written to it.

Everything that reaches the kernel passes Rule.encode(), which refuses, before
any write, whatever the kernel would refuse or misread. Kernel errors become
QusdErrors that name the cause and the fix. This module is on the boot-restore
path: it imports nothing heavier than ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass, replace
from pathlib import Path

from qusd.errors import (
    EntryExistsError,
    InterpreterError,
    InvalidRuleError,
    KernelError,
    KernelPermissionError,
    NoSuchEntryError,
    NotMountedError,
)

DEFAULT_PATH = "/proc/sys/fs/binfmt_misc"

FLAG_ORDER = "POCF"
MAX_RULE_LENGTH = 1920  # MAX_REGISTER_LENGTH in fs/binfmt_misc.c
BINPRM_BUF_SIZE = 256  # offset + magic length must fit the bytes the kernel reads
NAME_MAX = 255  # an entry is a file: a longer name could never be opened
RESERVED_NAMES = frozenset({"register", "status", ".", ".."})
DELIMITER = ":"


def printable(text: str) -> str:
    """Text from the kernel as valid UTF-8: bytes that are not (another tool
    may name an entry b"caf\\xe9"; os.fsdecode keeps them as surrogates) are
    shown as \\xHH escapes. Lossy for display only: raw() keeps the bytes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def raw(text: str) -> bytes | None:
    """The exact bytes of text from the kernel, when they are not valid UTF-8
    (None when the text is exact as it is)."""
    data = text.encode("utf-8", "surrogateescape")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return data
    return None


def magic_matches(header: bytes, offset: int, magic: bytes, mask: bytes | None) -> bool:
    """Whether the kernel would match these bytes of a file's head (a mask of
    None compares every bit)."""
    window = header[offset : offset + len(magic)]
    if len(window) < len(magic):
        return False
    if mask is None:
        return window == magic
    return all((h & m) == (g & m) for h, g, m in zip(window, magic, mask, strict=True))


def normalize_flags(flags: str) -> str:
    """Flags as the kernel reports them: in POCF order, once each, C implying O."""
    present = set(flags)
    if "C" in present:
        present.add("O")
    return "".join(f for f in FLAG_ORDER if f in present)


def _check_text(field: str, value: str, *, allow_slash: bool = True) -> bytes:
    """A rule field as bytes; refuses what would break or bend the rule."""
    if not value:
        raise InvalidRuleError("must not be empty", field=field)
    if DELIMITER in value:
        raise InvalidRuleError(f"must not contain {DELIMITER!r}, the rule's delimiter", field=field)
    for ch in value:
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise InvalidRuleError(
                f"must not contain control characters (found {ch!r}: newline, NUL, ...)",
                field=field,
            )
    if not allow_slash and "/" in value:
        raise InvalidRuleError("must not contain '/'", field=field)
    try:
        return os.fsencode(value)
    except UnicodeEncodeError as e:
        raise InvalidRuleError(f"cannot be encoded: {e.reason}", field=field) from None


def _hex_escape(data: bytes) -> bytes:
    """Every byte as \\xHH: the kernel stops decoding at a literal NUL and
    would read a literal delimiter as the end of the field."""
    return b"".join(b"\\x%02x" % b for b in data)


@dataclass(frozen=True)
class Rule:
    """One binfmt_misc registration: type M (magic) when extension is None,
    else type E (file-name extension)."""

    name: str
    interpreter: str
    magic: bytes = b""
    mask: bytes | None = None
    offset: int = 0
    extension: str | None = None
    flags: str = ""

    @property
    def type(self) -> str:
        return "M" if self.extension is None else "E"

    def matches(self, header: bytes) -> bool:
        """Whether a file with this head would go to the interpreter (never,
        for an extension rule: it looks at the name)."""
        return self.extension is None and magic_matches(header, self.offset, self.magic, self.mask)

    def normalized(self) -> Rule:
        """The rule as the kernel will report it back."""
        if self.extension is not None:
            return replace(self, magic=b"", mask=None, offset=0, flags=normalize_flags(self.flags))
        return replace(self, flags=normalize_flags(self.flags))

    def encode(self) -> bytes:
        """The line written to `register`; InvalidRuleError (naming the field)
        for anything the kernel would refuse or misread."""
        name = check_name(self.name)
        interpreter = check_interpreter(self.interpreter)
        flags = check_flags(self.flags)
        if self.extension is not None:
            ext = check_extension(self.extension)
            if self.magic or self.mask is not None or self.offset:
                raise InvalidRuleError(
                    "an extension rule has no magic, mask or offset", field="type"
                )
            fields = [name, b"E", b"", ext, b"", interpreter, flags]
        else:
            check_magic(self.magic, self.mask, self.offset)
            mask = _hex_escape(self.mask) if self.mask is not None else b""
            fields = [name, b"M", b"%d" % self.offset, _hex_escape(self.magic), mask]
            fields += [interpreter, flags]
        line = DELIMITER.encode() + DELIMITER.encode().join(fields)
        if len(line) > MAX_RULE_LENGTH:
            raise InvalidRuleError(
                f"is {len(line)} bytes; the kernel takes at most {MAX_RULE_LENGTH}", field="rule"
            )
        return line


# Field checks, one per field, shared with the API's models.


def check_name(value: str) -> bytes:
    name = _check_text("name", value, allow_slash=False)
    if value in RESERVED_NAMES:
        raise InvalidRuleError(f"{value!r} is reserved by binfmt_misc", field="name")
    if len(name) > NAME_MAX:
        raise InvalidRuleError(f"is {len(name)} bytes; at most {NAME_MAX}", field="name")
    return name


def check_interpreter(value: str) -> bytes:
    interpreter = _check_text("interpreter", value)
    if not value.startswith("/"):
        raise InvalidRuleError("must be an absolute path", field="interpreter")
    return interpreter


def check_flags(value: str) -> bytes:
    bad = set(value) - set(FLAG_ORDER)
    if bad:
        raise InvalidRuleError(
            f"unknown flag(s) {''.join(sorted(bad))!r}; use any of P, O, C, F", field="flags"
        )
    return value.encode()


def check_extension(value: str) -> bytes:
    ext = _check_text("extension", value, allow_slash=False)
    if "." in value:
        raise InvalidRuleError(
            "must not contain '.': the kernel matches after the last dot", field="extension"
        )
    return ext


def check_magic(magic: bytes, mask: bytes | None, offset: int) -> None:
    if not magic:
        raise InvalidRuleError("must not be empty", field="magic")
    if offset < 0:
        raise InvalidRuleError("must not be negative", field="offset")
    if mask is not None and len(mask) != len(magic):
        raise InvalidRuleError(
            f"is {len(mask)} bytes, magic is {len(magic)}: they must be equal", field="mask"
        )
    if offset + len(magic) > BINPRM_BUF_SIZE:
        raise InvalidRuleError(
            f"offset {offset} + {len(magic)} bytes of magic exceed the "
            f"{BINPRM_BUF_SIZE} bytes the kernel reads",
            field="magic",
        )


@dataclass(frozen=True)
class Entry:
    """An entry as the kernel reports it in its file."""

    name: str
    enabled: bool
    interpreter: str
    flags: str
    type: str  # "M" or "E"
    offset: int = 0
    magic: bytes = b""
    mask: bytes | None = None
    extension: str | None = None

    @classmethod
    def parse(cls, name: str, text: str) -> Entry:
        """Parse an entry file (fs/binfmt_misc.c, entry_status())."""
        lines = text.split("\n")
        if not lines or lines[0] not in ("enabled", "disabled"):
            raise ValueError(f"entry {name}: unexpected first line {lines[:1]!r}")
        fields: dict[str, str] = {}
        for line in lines[1:]:
            key, _, value = line.partition(" ")
            if key:
                fields[key.rstrip(":")] = value
        ext = fields.get("extension")
        return cls(
            name=name,
            enabled=lines[0] == "enabled",
            interpreter=fields.get("interpreter", ""),
            flags=fields.get("flags", "").strip(),
            type="E" if ext is not None else "M",
            offset=int(fields.get("offset", "0")),
            magic=bytes.fromhex(fields.get("magic", "")),
            mask=bytes.fromhex(fields["mask"]) if "mask" in fields else None,
            extension=ext[1:] if ext is not None and ext.startswith(".") else ext,
        )

    def rule(self) -> Rule:
        """The rule that registers this entry again."""
        return Rule(
            name=self.name,
            interpreter=self.interpreter,
            magic=self.magic,
            mask=self.mask,
            offset=self.offset,
            extension=self.extension,
            flags=self.flags,
        )

    def describe(self) -> str:
        return f"interpreter {printable(self.interpreter)}, flags {self.flags or '(none)'}"


class BinfmtMisc:
    """One binfmt_misc mount. Every method is one or a few syscalls."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_PATH) -> None:
        self.path = Path(path)
        #: writes made through this object, counted once each is done (the
        #: table may have changed: what was read before is stale)
        self.write_count = 0
        #: entries parsed from their files' exact bytes: a table read again
        #: is parsed again only where it changed
        self._parsed: dict[tuple[str, bytes], Entry] = {}

    def __repr__(self) -> str:
        return f"BinfmtMisc({str(self.path)!r})"

    # -- what may have changed ----------------------------------------------

    def version(self) -> tuple[int, int] | None:
        """A token that moves whenever the table may have changed, or None
        when that cannot be told without reading it (no watcher: see
        qusd.watch.ObservedKernel)."""
        return None

    def watch_files(self, directories: frozenset[str]) -> int | None:
        """How many times files were created, removed or renamed in these
        directories so far, or None when that cannot be told (no watcher)."""
        return None

    # -- the mount --------------------------------------------------------

    def is_mounted(self) -> bool:
        """Whether the topmost mount at the path is a binfmt_misc."""
        target = os.path.realpath(self.path)
        fstype = None
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    pre, _, post = line.partition(" - ")
                    fields = pre.split()
                    if len(fields) > 4 and _unoctal(fields[4]) == target:
                        fstype = post.split(" ", 1)[0]
        except OSError:
            return (self.path / "register").exists()
        return fstype == "binfmt_misc"

    def mount(self) -> None:
        """Mount binfmt_misc at the path. In a user namespace (Linux >= 6.7)
        this creates that namespace's own, empty instance."""
        libc = ctypes.CDLL(None, use_errno=True)
        flags = 0x2 | 0x4 | 0x8  # MS_NOSUID | MS_NODEV | MS_NOEXEC
        rc = libc.mount(b"binfmt_misc", os.fsencode(self.path), b"binfmt_misc", flags, None)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EPERM:
            raise KernelPermissionError(
                f"cannot mount binfmt_misc at {self.path}: it needs CAP_SYS_ADMIN (run as "
                "root, or in a user namespace on Linux >= 6.7) and mount(2) allowed (under "
                "systemd: SystemCallFilter=@mount)"
            )
        if err == errno.ENODEV:
            raise NotMountedError(
                "this kernel has no binfmt_misc: load it with 'modprobe binfmt_misc'"
            )
        raise NotMountedError(f"cannot mount binfmt_misc at {self.path}: {os.strerror(err)}")

    def _require_mounted(self) -> None:
        if not (self.path / "status").exists():
            raise NotMountedError(
                f"binfmt_misc is not mounted at {self.path}: mount it with "
                f"'mount -t binfmt_misc binfmt_misc {self.path}'"
            )

    # -- global status ----------------------------------------------------

    def enabled(self) -> bool:
        self._require_mounted()
        return (self.path / "status").read_text().strip() == "enabled"

    def set_enabled(self, enabled: bool) -> None:
        """Enable or disable every entry at once (entries are kept)."""
        self._control("status", b"1" if enabled else b"0")

    def remove_all(self) -> None:
        """Remove every entry, whoever made it."""
        self._control("status", b"-1")

    # -- entries ----------------------------------------------------------

    def names(self) -> list[str]:
        self._require_mounted()
        return sorted(n for n in os.listdir(self.path) if n not in ("register", "status"))

    def ordered_names(self) -> list[str]:
        """Entry names newest first: the order exec tries them in. The kernel
        adds each entry at the head of its list and lists the directory in
        that same order (tests/test_doctor.py shows both on the real kernel)."""
        self._require_mounted()
        return [n for n in os.listdir(self.path) if n not in ("register", "status")]

    def registered_at(self, name: str) -> int | None:
        """When an entry was registered, in ns (its file's ctime), or None."""
        try:
            return os.stat(self.path / name).st_ctime_ns
        except (OSError, ValueError):
            return None

    def entries(self) -> list[Entry]:
        """Every entry, qemu or not, by name; one removed while listing is
        skipped. The files are read through one descriptor of the directory,
        and only those whose bytes changed since the last call are parsed."""
        return self._parse(sorted(self.snapshot()))

    def _parse(self, files: list[tuple[str, bytes]]) -> list[Entry]:
        """Entries from (name, bytes) of their files; the same Entry as last
        time for a file whose bytes did not change."""
        parsed, fresh = self._parsed, {}
        found = []
        for key in files:
            entry = parsed.get(key)
            if entry is None:
                entry = Entry.parse(key[0], key[1].decode("utf-8", "surrogateescape"))
            fresh[key] = entry
            found.append(entry)
        self._parsed = fresh
        return found

    def snapshot(self) -> list[tuple[str, bytes]]:
        """Every entry's name and the exact bytes of its file, in the
        directory's order (newest first), read through one descriptor of the
        directory: one open, read and close per entry, nothing else."""
        try:
            dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            self._require_mounted()
            raise
        try:
            names = os.listdir(dfd)
            if "status" not in names:  # the directory under the mount point
                self._require_mounted()
            found = []
            for name in names:
                if name in ("register", "status"):
                    continue
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
                except FileNotFoundError:
                    continue  # removed while listing
                found.append((name, read_all(fd)))
            return found
        finally:
            os.close(dfd)

    def entry(self, name: str) -> Entry:
        if not _could_be_entry(name):
            raise NoSuchEntryError(f"no binfmt_misc entry named {name!r}")
        try:
            text = (self.path / name).read_text(errors="surrogateescape")
        except FileNotFoundError:
            self._require_mounted()
            raise NoSuchEntryError(f"no binfmt_misc entry named {name!r}") from None
        return Entry.parse(name, text)

    def get(self, name: str) -> Entry | None:
        try:
            return self.entry(name)
        except NoSuchEntryError:
            return None

    def register(self, rule: Rule) -> Entry:
        """Add an entry; returns it as the kernel reports it."""
        line = rule.encode()
        self._require_mounted()
        try:
            _write(self.path / "register", line)
        except OSError as e:
            raise self._register_error(rule, e) from None
        finally:
            self.write_count += 1
        return self.entry(rule.name)

    def _register_error(self, rule: Rule, e: OSError) -> Exception:
        if e.errno == errno.EEXIST:
            existing = self.get(rule.name)
            what = f" ({existing.describe()})" if existing else ""
            return EntryExistsError(
                f"{rule.name} is already registered{what}: remove it first or choose another name",
                name=rule.name,
            )
        if "F" in rule.flags and e.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC):
            cause = {
                errno.ENOENT: "it does not exist",
                errno.EACCES: "it is not an executable file the kernel may open",
                errno.ENOEXEC: "it is not a program",
            }[e.errno]
            return InterpreterError(
                f"the F flag opens {rule.interpreter} at registration and {cause}; "
                "install the interpreter or register without F",
                interpreter=rule.interpreter,
            )
        if e.errno in (errno.EPERM, errno.EACCES):
            return KernelPermissionError(
                f"not allowed to register in {self.path}: writing binfmt_misc needs "
                "CAP_SYS_ADMIN in the user namespace that mounted it (run as root, "
                "ask the qusd daemon, or use a sandbox)"
            )
        if "F" in rule.flags and e.errno == errno.ETXTBSY:
            return KernelError(
                f"the F flag opens {rule.interpreter} at registration and it is open for "
                "writing (being installed or upgraded?): register again once that is done",
                interpreter=rule.interpreter,
            )
        if e.errno == errno.EINVAL:
            return KernelError(f"the kernel refused the rule for {rule.name} as malformed")
        return KernelError(f"registering {rule.name} failed: {e.strerror}")

    def enable(self, name: str) -> None:
        self._control(name, b"1")

    def disable(self, name: str) -> None:
        self._control(name, b"0")

    def remove(self, name: str) -> None:
        self._control(name, b"-1")

    def _control(self, name: str, value: bytes) -> None:
        if name != "status" and not _could_be_entry(name):
            raise NoSuchEntryError(f"no binfmt_misc entry named {name!r}")
        try:
            _write(self.path / name, value)
        except FileNotFoundError:
            self._require_mounted()
            raise NoSuchEntryError(f"no binfmt_misc entry named {name!r}") from None
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EACCES):
                raise KernelPermissionError(
                    f"not allowed to change {self.path / name}: it needs CAP_SYS_ADMIN in "
                    "the user namespace that mounted binfmt_misc"
                ) from None
            raise KernelError(f"writing {self.path / name} failed: {e.strerror}") from None
        finally:
            self.write_count += 1


def read_all(fd: int) -> bytes:
    """An entry file's bytes, and fd closed. The kernel hands the whole file
    (at most a page) at the first read."""
    try:
        data = os.read(fd, 16384)
        while len(data) % 16384 == 0 and (more := os.read(fd, 16384)):
            data += more
        return data
    finally:
        os.close(fd)


def _could_be_entry(name: str) -> bool:
    """Whether an entry could have this name; anything else is not looked up
    at all (a NUL or an over-long name would make open() fail oddly)."""
    try:
        raw = os.fsencode(name)
    except UnicodeEncodeError:
        return False
    return (
        bool(raw)
        and name not in RESERVED_NAMES
        and b"/" not in raw
        and b"\0" not in raw
        and (len(raw) <= NAME_MAX)
    )


def _write(path: Path, data: bytes) -> None:
    """One write() call: binfmt_misc parses each write as a whole."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _unoctal(s: str) -> str:
    """Undo mountinfo's \\NNN escapes (space, tab, newline, backslash)."""
    if "\\" not in s:
        return s
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and s[i + 1 : i + 4].isdigit() and i + 4 <= len(s):
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)
