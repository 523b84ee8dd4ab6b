"""Why a program does not run: the kernel's decision, reasoned out.

Given a file (and the root it runs in, for a chroot), doctor reads what the
kernel reads at exec (the first 256 bytes, the ELF's PT_INTERP loader) and
the binfmt_misc table this process sees, then names each cause with its fix:
which entry the kernel would pick (newest first, disabled ones skipped) or
that none matches; binfmt_misc disabled or not mounted; the interpreter
missing, not executable, dynamic where its libraries are not, stale after an
upgrade (F), or matched by its own rule (QEMU handed to QEMU: ELOOP); the
program's own loader missing; a program the host runs itself. verify
explains a failed probe with the same reasoning.

Standard library only: qusctl, qusd-binfmt and the image use it.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from qusd import catalog as catalogs
from qusd import interpreters
from qusd.binfmt import BINPRM_BUF_SIZE, BinfmtMisc, Entry, magic_matches
from qusd.catalog import Catalog, Target
from qusd.interpreters import FileId

if TYPE_CHECKING:
    from qusd.native import Verdict

ERROR, WARNING, INFO = "error", "warning", "info"
LEVELS = (ERROR, WARNING, INFO)
MAX_LINKS = 40  # as the kernel's path walk


@dataclass(frozen=True)
class Finding:
    """One thing found: its level, a stable code, what and the fix."""

    level: str
    code: str
    message: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.message}: {self.fix}" if self.fix else self.message


def exit_status(findings: Sequence[Finding]) -> int:
    """0 when nothing is in the way, 1 when an error was found."""
    return 1 if worst(findings) == ERROR else 0


def worst(findings: Sequence[Finding]) -> str | None:
    """The most serious level among findings (None when there is none)."""
    for level in LEVELS:
        if any(f.level == level for f in findings):
            return level
    return None


# -- files: identities, and paths inside a root -----------------------------------------


def resolve_in_root(root: str, path: str) -> str | None:
    """Where path, as a process chrooted to root would open it, is from
    here: symlinks are followed inside root (an absolute link restarts at
    root, ".." stops there). None when it does not exist or cannot be looked
    up. With root "/", the path as this process opens it."""
    if not path.startswith("/"):
        path = "/" + path
    parts = deque(p for p in path.split("/") if p not in ("", "."))
    done: list[str] = []
    links = 0
    while parts:
        part = parts.popleft()
        if part == "..":
            if done:
                done.pop()
            continue
        here = os.path.join(root, *done, part)
        try:
            st = os.lstat(here)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_LINKS:
                return None
            try:
                target = os.readlink(here)
            except OSError:
                return None
            if target.startswith("/"):
                done = []
            parts.extendleft(reversed([p for p in target.split("/") if p not in ("", ".")]))
            continue
        done.append(part)
    return os.path.join(root, *done)


def inside(root: str) -> str:
    """Where a path is looked up, in words."""
    return "here" if root == "/" else f"inside the chroot {root}"


# -- the table as the kernel walks it -----------------------------------------------------


@dataclass
class Table:
    """The binfmt_misc table this process's execs go through, in the order
    the kernel tries it."""

    path: str
    available: bool  # the kernel has binfmt_misc at all
    mounted: bool
    enabled: bool | None = None
    #: newest first: the kernel searches its list from the head, and adds there
    entries: list[Entry] = field(default_factory=list)
    #: entry name -> when it was registered (the entry file's ctime, ns)
    registered: dict[str, int] = field(default_factory=dict)


def kernel_has_binfmt_misc() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1:] == ["binfmt_misc"] for line in f)
    except OSError:
        return True  # cannot tell: assume the usual


def read_table(kernel: BinfmtMisc) -> Table:
    """The table at kernel.path, newest entry first: the kernel's search order."""
    path = str(kernel.path)
    if not kernel.is_mounted():
        return Table(path, kernel_has_binfmt_misc(), False)
    table = Table(path, True, True, kernel.enabled())
    for name in kernel.ordered_names():
        entry = kernel.get(name)
        if entry is None:
            continue  # removed while we read
        table.entries.append(entry)
        when = kernel.registered_at(name)
        if when is not None:
            table.registered[name] = when
    return table


def entry_matches(entry: Entry, header: bytes, filename: str) -> bool:
    """Whether the kernel hands a file with this head and name to entry: a
    magic entry compares the first 256 bytes (zeros past the end of the
    file), an extension entry the text after the name's last dot."""
    if entry.type == "E":
        base = filename.rpartition(".")
        return bool(base[1]) and base[2] == entry.extension
    buf = header[:BINPRM_BUF_SIZE].ljust(BINPRM_BUF_SIZE, b"\0")
    return magic_matches(buf, entry.offset, entry.magic, entry.mask)


def pick(
    entries: Sequence[Entry], header: bytes, filename: str = ""
) -> tuple[Entry | None, list[Entry]]:
    """The entry the kernel hands the file to (the first enabled match in
    kernel order), and the disabled entries that match it."""
    disabled: list[Entry] = []
    for e in entries:
        if entry_matches(e, header, filename):
            if e.enabled:
                return e, disabled
            disabled.append(e)
    return None, disabled


# -- the interpreter of an entry --------------------------------------------------------


def _elf_words(loader: str | None) -> str:
    if loader is None:
        return "not an ELF program"
    return "statically linked" if loader == "" else f"dynamically linked (loader {loader})"


def interpreter_findings(
    entry: Entry,
    table: Table,
    root: str = "/",
    fixed: FileId | None = None,
    fix_register: str = "",
) -> list[Finding]:
    """What stands between entry and a working exec in root, as for its
    interpreter: missing, not executable, dynamic without its loader,
    stale (F), or matched by the entry itself.
    fixed: the interpreter file as recorded when the entry was registered."""
    out: list[Finding] = []
    name, interp = entry.name, entry.interpreter
    where = inside(root)
    again = fix_register or f"register {name} again"
    if "F" in entry.flags:
        # the kernel opened the interpreter at registration; the path is not
        # looked up again, but a dynamic one still loads its libraries in root
        host = resolve_in_root("/", interp)
        now = FileId.of(host) if host else None
        if fixed is not None and now is None:
            out.append(Finding(WARNING, "interpreter-stale",
                f"{interp}, the interpreter {name} was registered with (F), is gone: the "
                "kernel still runs the file it opened at registration",
                f"{again} once it is reinstalled"))  # fmt: skip
        elif fixed is not None and not fixed.same_file(now):
            out.append(Finding(WARNING, "interpreter-stale",
                f"{interp} was replaced after {name} was registered with F (an upgrade?): "
                "the kernel still runs the file it opened then, the old QEMU",
                f"{again} to run the new one"))  # fmt: skip
        elif fixed is None and now is None:
            out.append(Finding(WARNING, "interpreter-stale",
                f"{interp} no longer exists: {name} (F) still runs the file the kernel "
                "opened at registration, but cannot be registered again as it is",
                "reinstall the interpreter (qemu-user-static)"))  # fmt: skip
        elif (
            fixed is None
            and now is not None
            and now.ctime_ns > table.registered.get(name, now.ctime_ns)
        ):
            out.append(Finding(WARNING, "interpreter-stale",
                f"{interp} changed after {name} was registered with F (an upgrade?): "
                "the kernel may still run the file it opened then",
                f"{again} to be sure it runs the current one"))  # fmt: skip
        loader = interpreters.program_loader(host) if host else None
        header_path = host
    else:
        host = resolve_in_root(root, interp)
        if host is None:
            if root == "/":
                out.append(Finding(ERROR, "interpreter-missing",
                    f"the interpreter {interp} of {name} does not exist: the kernel opens "
                    "it at every exec and fails with 'No such file or directory'",
                    f"install it (qemu-user-static), or {again} with an interpreter that "
                    "exists"))  # fmt: skip
            else:
                out.append(Finding(ERROR, "interpreter-missing",
                    f"the interpreter {interp} does not exist {where}: {name} has no F "
                    "flag, so the kernel opens it at every exec, in the program's root",
                    f"register with F (the kernel then opens it once, at registration, "
                    f"and it works in chroots and containers), or bind-mount or copy it "
                    f"to {interp} {where}"))  # fmt: skip
            return out + _self_match(entry, None)
        st = os.stat(host)
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
            out.append(Finding(ERROR, "interpreter-not-executable",
                f"the interpreter {interp} of {name} is not an executable file {where}",
                f"make it executable (chmod 755 {interp}) or {again} with another"))  # fmt: skip
        loader = interpreters.program_loader(host)
        header_path = host
    if loader and resolve_in_root(root, loader) is None:
        how = "even with F, " if "F" in entry.flags else ""
        out.append(Finding(ERROR, "interpreter-dynamic",
            f"the interpreter {interp} is dynamically linked: {how}its loader {loader} "
            f"and its libraries are looked up {where}, and {loader} is not there",
            "register the static interpreter (qemu-user-static's qemu-<cpu>-static) "
            "with F"))  # fmt: skip
    return out + _self_match(entry, header_path)


def _self_match(entry: Entry, interpreter_path: str | None) -> list[Finding]:
    """A rule that matches its own interpreter (the host's own type) makes
    the kernel hand QEMU to QEMU until it gives up."""
    if interpreter_path is None or entry.type != "M":
        return []
    try:
        header = interpreters.read_header(interpreter_path)
    except OSError:
        return []
    if not entry_matches(entry, header, interpreter_path):
        return []
    return [Finding(ERROR, "self-match",
        f"{entry.name} matches its own interpreter {entry.interpreter} (a program of the "
        "host's own type): the kernel hands QEMU to QEMU until it gives up with 'Too many "
        "levels of symbolic links' (ELOOP)",
        f"remove {entry.name} (qusctl unregister {entry.name}); the host runs these "
        "programs itself")]  # fmt: skip


# -- the program -----------------------------------------------------------------------

#: QEMU target -> the Debian architecture whose C library provides its loader
DEBIAN_ARCH = {
    "aarch64": "arm64", "arm": "armhf", "i386": "i386", "i486": "i386", "x86_64": "amd64",
    "ppc64le": "ppc64el", "ppc64": "ppc64", "ppc": "powerpc", "s390x": "s390x",
    "mips64el": "mips64el", "mipsel": "mipsel", "mips": "mips", "riscv64": "riscv64",
    "sparc64": "sparc64", "m68k": "m68k", "sh4": "sh4", "alpha": "alpha", "hppa": "hppa",
    "loongarch64": "loong64",
}  # fmt: skip


def family_verdict(target: Target, host_family: str | None = None) -> Verdict:
    """The family table's answer, when nothing better is known."""
    from qusd import native  # noqa: PLC0415 - native imports this module

    return native.by_family(target, host_family or catalogs.family_of(catalogs.host_machine()))


@dataclass
class Context:
    """What else is known: how the host runs each target, the interpreter
    files recorded when F entries were registered, what qusd manages."""

    native: Callable[[Target], Verdict] = family_verdict
    fixed: Mapping[str, FileId] = field(default_factory=dict)
    managed: frozenset[str] = frozenset()
    catalog: Catalog = field(default_factory=catalogs.builtin)


def _run(path: str, args: Sequence[str], root: str, timeout: float) -> Finding:
    """Run the program as a user would (chrooted to root) and say what the
    kernel and the program answered."""

    def enter() -> None:
        os.chroot(root)
        os.chdir("/")

    shown = " ".join([path, *args])
    try:
        res = subprocess.run(
            [path, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
            preexec_fn=enter if root != "/" else None,
        )
    except subprocess.TimeoutExpired:
        return Finding(INFO, "ran", f"{shown} ran for {timeout:g} s and was stopped: it starts")
    except subprocess.SubprocessError:
        return Finding(WARNING, "ran", f"could not run {shown} {inside(root)}",
                       "chroot(2) needs root: run doctor as root to try it")  # fmt: skip
    except OSError as e:
        code = errno.errorcode.get(e.errno or 0, "?")
        return Finding(ERROR, "ran", f"running {shown} fails: {e.strerror} ({code})")
    tail = res.stderr.decode(errors="replace").strip().splitlines()[-1:]
    said = f"; it said: {tail[0]}" if tail else ""
    if res.returncode < 0:
        return Finding(ERROR, "ran", f"{shown} was killed by signal {-res.returncode}{said}")
    level = INFO if res.returncode == 0 else WARNING
    return Finding(level, "ran", f"{shown} ran and exited with status {res.returncode}{said}")


def diagnose(
    path: str,
    kernel: BinfmtMisc,
    *,
    root: str = "/",
    args: Sequence[str] | None = None,
    context: Context | None = None,
    timeout: float = 10,
    _depth: int = 0,
) -> list[Finding]:
    """Every finding about running path (as a process chrooted to root
    names it) through the table of kernel. args: run it with these first."""
    ctx = context or Context()
    where = inside(root)
    out: list[Finding] = []
    if root == "/" and not path.startswith("/"):
        path = os.path.abspath(path)
    host = resolve_in_root(root, path)
    if host is None:
        return [Finding(ERROR, "not-found", f"{path} does not exist {where}",
                        "check the path (inside the chroot, paths start at its root)")]  # fmt: skip
    st = os.stat(host)
    if not stat.S_ISREG(st.st_mode):
        return [Finding(ERROR, "not-a-file", f"{path} is not a regular file {where}")]
    if not st.st_mode & 0o111:
        out.append(Finding(ERROR, "not-executable", f"{path} is not executable (mode "
                           f"{stat.S_IMODE(st.st_mode):o})", f"chmod +x {path}"))  # fmt: skip
    if args is not None:
        out.append(_run(path, args, root, timeout))
    try:
        header = interpreters.read_header(host)
    except OSError as e:
        return [*out, Finding(ERROR, "unreadable", f"cannot read {path}: {e.strerror}")]
    name = os.path.basename(path)
    table = read_table(kernel)
    if header.startswith(b"#!"):
        return out + _script(path, header, kernel, root=root, ctx=ctx, table=table, depth=_depth)
    loader = interpreters.program_loader(host)
    target, verdict = None, None
    if loader is not None:
        found = catalogs.identify(header, catalogs.builtin(), _family())
        target = found.target
        if target is not None:
            verdict = ctx.native(target)
            out.append(Finding(INFO, "target",
                f"{path} is a program for {target.name}, {_elf_words(loader)}; the host "
                f"{'runs' if verdict.native else 'does not run'} {target.name} itself "
                f"({verdict.detail})"))  # fmt: skip
        else:
            machine = int.from_bytes(header[18:20], "big" if header[5:6] == b"\2" else "little")
            out.append(Finding(INFO, "target",
                f"{path} is an ELF program for machine {machine}, which no QEMU target "
                "runs"))  # fmt: skip
    native = verdict is not None and verdict.native
    out += _table_findings(path, name, header, table=table, target=target, native=native,
                           root=root, ctx=ctx)  # fmt: skip
    if loader and resolve_in_root(root, loader) is None:
        arch = DEBIAN_ARCH.get(target.name, "") if target is not None else ""
        lib = f"the C library for {arch} (Debian: libc6:{arch})" if arch else "its C library"
        out.append(Finding(ERROR, "loader-missing",
            f"{path} is dynamically linked and its loader {loader} does not exist {where}: "
            "nothing can start it (the kernel, or QEMU, opens the loader first)",
            f"install {lib} {where}, or use a statically linked build"))  # fmt: skip
    picked = any(f.code == "picked" for f in out)
    if loader is not None and target is None and not picked:
        out.append(Finding(ERROR, "unknown-machine",
            f"no binfmt_misc entry takes {path} and no QEMU target runs its machine: the "
            "kernel answers 'Exec format error'", "use a build for this host"))  # fmt: skip
    if loader is None and not picked:
        out.append(Finding(ERROR, "not-a-program",
            f"{path} is neither an ELF program nor a #! script, and no binfmt_misc entry "
            "takes it: the kernel answers 'Exec format error'",
            "register an entry for its format (an extension or magic rule)"))  # fmt: skip
    if worst(out) == INFO:
        out.append(Finding(INFO, "ok", "nothing in the way found"))
    return out


def _family() -> str:
    return catalogs.family_of(catalogs.host_machine())


def _table_findings(
    path: str,
    name: str,
    header: bytes,
    *,
    table: Table,
    target: Target | None,
    native: bool,
    root: str,
    ctx: Context,
) -> list[Finding]:
    out: list[Finding] = []
    emulated = target is not None and not native
    if not table.available:
        out.append(Finding(ERROR if emulated else INFO, "no-binfmt-misc",
            "this kernel has no binfmt_misc: no foreign program can run",
            "load it: modprobe binfmt_misc (or a kernel with CONFIG_BINFMT_MISC)"))  # fmt: skip
        return out
    if not table.mounted:
        out.append(Finding(ERROR if emulated else INFO, "not-mounted",
            f"binfmt_misc is not mounted at {table.path}: the table this process's programs "
            "go through cannot be read (nor filled)",
            f"mount it: mount -t binfmt_misc binfmt_misc {table.path} (qusd and qusd-binfmt "
            "mount it themselves)"))  # fmt: skip
        return out
    if not table.enabled:
        out.append(Finding(ERROR if emulated else WARNING, "binfmt-disabled",
            f"binfmt_misc is disabled ({table.path}/status): the kernel skips every entry",
            f"enable it: echo 1 > {table.path}/status"))  # fmt: skip
        return out
    picked, disabled = pick(table.entries, header, name)
    tried = [e for e in table.entries if entry_matches(e, header, name)]
    if len(tried) > 1:
        order = ", ".join(e.name + ("" if e.enabled else " (disabled)") for e in tried)
        out.append(Finding(INFO, "matches",
            f"entries that match it, in the order the kernel tries them (newest first): "
            f"{order}"))  # fmt: skip
    tname = target.name if target is not None else "it"
    register = f"qusctl register {tname} (or qusd-binfmt register {tname})"
    if picked is None:
        for e in disabled:
            out.append(Finding(ERROR if emulated else INFO, "entry-disabled",
                f"{e.name} matches it but is disabled: the kernel skips it",
                f"qusctl enable {e.name} (or echo 1 > {table.path}/{e.name})"))  # fmt: skip
        if native:
            out.append(Finding(INFO, "native",
                f"no binfmt_misc entry takes it: the kernel runs it itself, as a "
                f"{tname} program of the host's"))  # fmt: skip
        elif target is not None and not disabled:
            out.append(Finding(ERROR, "no-entry",
                f"no enabled binfmt_misc entry matches this {tname} program: the kernel "
                "answers 'Exec format error'",
                f"register it: {register}"))  # fmt: skip
        return out
    who = " (qusd manages it)" if picked.name in ctx.managed else ""
    out.append(Finding(INFO, "picked",
        f"the kernel hands it to {picked.name}{who}: interpreter {picked.interpreter}, "
        f"flags {picked.flags or '(none)'}"))  # fmt: skip
    if native:
        out.append(Finding(WARNING, "native-captured",
            f"the host runs {tname} programs itself, yet {picked.name} captures them: every "
            f"one goes to {picked.interpreter}",
            f"unless that is meant: qusctl unregister {picked.name}"))  # fmt: skip
    again = (
        f"qusctl unregister {picked.name}, then qusctl register {target.name}"
        if target is not None
        else f"register {picked.name} again"
    )
    out += interpreter_findings(picked, table, root, ctx.fixed.get(picked.name), again)
    return out


def _script(
    path: str,
    header: bytes,
    kernel: BinfmtMisc,
    *,
    root: str,
    ctx: Context,
    table: Table,
    depth: int,
) -> list[Finding]:
    """A #! script: the kernel runs its interpreter, which is diagnosed in turn."""
    line = header[2:].split(b"\n", 1)[0].strip()
    interp = os.fsdecode(line.split()[0]) if line.split() else ""
    out = [Finding(INFO, "script", f"{path} is a script run by {interp or '(nothing)'}")]
    picked, _ = pick(table.entries, header, os.path.basename(path)) if table.mounted else (None, [])
    if picked is not None:
        out.append(Finding(INFO, "picked",
            f"the kernel hands it to {picked.name} (interpreter {picked.interpreter}), "
            "before it reads the #! line"))  # fmt: skip
        return out + interpreter_findings(picked, table, root, ctx.fixed.get(picked.name))
    if not interp.startswith("/"):
        bad = f"its #! line names no absolute interpreter ({interp!r})"
        return [*out, Finding(ERROR, "script-interpreter", bad)]
    if depth >= 1:
        return out
    return out + diagnose(interp, kernel, root=root, context=ctx, _depth=depth + 1)


def render(findings: Sequence[Finding]) -> str:
    """For people: one finding a line, its fix below it."""
    lines = []
    for f in findings:
        lines.append(f"{f.level}: {f.message}")
        if f.fix:
            lines.append(f"  fix: {f.fix}")
    return "\n".join(lines)
