"""qus-register: qus' register.sh and QEMU's qemu-binfmt-conf.sh, on qusd's core.

qus (dbhi/qus) images run `register.sh [OPTIONS] [-- ARGS]`, a wrapper
that hands ARGS to a patched qemu-binfmt-conf.sh; CI scripts and READMEs
everywhere spell these command lines:

    docker run --rm --privileged aptman/qus -s -- -p aarch64
    docker run --rm --privileged aptman/qus -- -r
    docker run --rm --privileged multiarch/qemu-user-static --reset -p yes

qus-register takes the same options with the same meaning (register.sh's
before `--`, the script's after it, the QEMU_* variables), but every
registration goes through the table transaction (all targets or none), an
entry that already provides a target is reported and kept, an entry in the
way is an error instead of "write error: File exists", the exit status is
non-zero when any target fails, a reset removes every qemu-* entry, and
arguments are never split or lost. The export modes write binfmt.d files
(--systemd, --exportdir) or update-binfmts import files (--debian).

Standard library only: the one-shot image runs it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qusd import __version__, catalog, interchange, provide, table
from qusd.binfmt import DEFAULT_PATH, BinfmtMisc, Entry, Rule
from qusd.catalog import Target, is_qemu_entry
from qusd.errors import InterpreterError, QusdError
from qusd.provide import Result
from qusd.text import table as text_table

PROG = "qus-register"
#: register.sh's default QEMU_BIN_DIR
BIN_DIR = "/usr/bin"
#: qemu-binfmt-conf.sh's default export directories
SYSTEMD_DIR = "/etc/binfmt.d"
DEBIAN_DIR = "/usr/share/binfmts"
#: exit status of a command line qus-register cannot read
USAGE = 2

USAGE_TEXT = f"""\
Usage: {PROG} [-h] [-i [CMD [ARG...]]] [-l] [-e] [-r] [-s] [-t TARGETS] [TARGET...]
                    [-- [-Q DIR] [-F SUFFIX] [-p [yes|no]] [-c [yes|no]]
                        [--preserve-argv0 [yes|no]] [-r] [-t]
                        [-s | -d] [-e DIR] [TARGET...]]

Register QEMU user-mode emulation in binfmt_misc, as qus' register.sh and
QEMU's qemu-binfmt-conf.sh do, through qusd's table transaction (all or
none, honest exit statuses). Options are done in order.

register.sh's options (before --):
  -h, --help, -help          print this and exit
  -i, --interactive, -interactive [CMD [ARG...]]
                             run a shell (or sh -c CMD ARG...) and exit with its status
  -l, --list, -list          list every binfmt_misc entry (alone: list and stop)
  -e, --exit, -exit          stop here, successfully
  -r, --reset, -reset        remove every qemu-* entry, then go on (-r -e: only remove)
  -s, --static, -static      interpreters are qemu-CPU-static (suffix -static)
  -t, --targets, -targets TARGETS
                             targets to register (comma or space separated)

qemu-binfmt-conf.sh's options (after --):
  -Q, --path, --qemu-path DIR      interpreter directory (default $QEMU_BIN_DIR, else
                                   $QEMU_PATH, else {BIN_DIR})
  -F, --suffix, --qemu-suffix S    interpreter name suffix (qemu-CPU + S)
  -p, --persistent [yes|no]        flag F: the kernel opens the interpreter now
  -c, --credential [yes|no]        flags OC: credentials from the program (set-uid)
  -g, --preserve-argv0 [yes|no]    flag P: keep the program's argv[0]
  -r, --clear                      remove the targets' entries (none named: every
                                   qemu-* entry), then stop
  -t, --test                       check and print what would be done; change nothing
  -s, --systemd [TARGET|ALL]       write binfmt.d files instead (DIR/qemu-CPU.conf)
  -d, --debian                     write update-binfmts import files instead (DIR/qemu-CPU)
  -e, --exportdir DIR              where to write them (default {SYSTEMD_DIR}, or
                                   {DEBIAN_DIR} with --debian); alone: binfmt.d files
  TARGET...                        QEMU targets or aliases (aarch64, arm64, ...; ALL);
                                   none: every target of another family than the host's
                                   (with -p: those whose interpreter is there)

Environment: QEMU_BIN_DIR, and qemu-binfmt-conf.sh's QEMU_TARGETS, QEMU_PATH,
QEMU_SUFFIX, QEMU_PERSISTENT, QEMU_CREDENTIAL, QEMU_PRESERVE_ARGV0, QEMU_CLEAR,
QEMU_TEST (yes or no), EXPORTDIR and HOST_ARCH (the host's `uname -m`).

In qusd's container image, a first argument that is not one of these options
is qusd-binfmt's (register, list, reset, verify, ...; --install, --uninstall):
see `qusd-binfmt --help`.

Exit status: 0 when everything asked for was done (or, with --test, could be),
2 for a command line it cannot read, else qusd's status for the first failure
(65 unknown target, 72 no interpreter, 73 an entry in the way, ...); nothing
is registered then. See qus-register(1).
"""


#: the environment variables qus-register reads (qus-register(1) has each)
ENVIRONMENT = (
    "QEMU_BIN_DIR", "QEMU_TARGETS", "QEMU_PATH", "QEMU_SUFFIX", "QEMU_PERSISTENT",
    "QEMU_CREDENTIAL", "QEMU_PRESERVE_ARGV0", "QEMU_CLEAR", "QEMU_TEST", "EXPORTDIR",
    "HOST_ARCH",
)  # fmt: skip


class UsageError(Exception):
    """A command line qus-register cannot read."""


@dataclass
class Request:
    """What a command line asks for."""

    #: register.sh's steps, in order: ("list"|"exit"|"reset", "") or ("shell", ...)
    steps: list[tuple[str, list[str]]] = field(default_factory=list)
    static: bool = False
    targets: list[str] = field(default_factory=list)
    #: whether qemu-binfmt-conf.sh's part runs (not when -l was alone)
    configure: bool = True
    path: str | None = None
    suffix: str | None = None
    persistent: bool = False
    credential: bool = False
    preserve_argv0: bool = False
    clear: bool = False
    test: bool = False
    mode: str = "kernel"  # or "systemd", "debian"
    #: -e DIR (EXPORTDIR in the environment only picks the directory)
    exportdir: str | None = None


_LONG = {
    "--help": "h", "-help": "h",
    "--interactive": "i", "-interactive": "i",
    "--list": "l", "-list": "l",
    "--exit": "e", "-exit": "e",
    "--reset": "r", "-reset": "r",
    "--static": "s", "-static": "s",
    "--targets": "t", "-targets": "t",
}  # fmt: skip


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[\s,]+", text) if w]


def _yes(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("yes", "y", "true", "1", "on"):
        return True
    if v in ("no", "n", "false", "0", "off", ""):
        return False
    raise UsageError(f"{name}={value!r}: use yes or no")


def parse(argv: Sequence[str], env: Mapping[str, str]) -> Request:
    """The request of a command line: register.sh's options up to `--`, then
    qemu-binfmt-conf.sh's; the environment fills in what they leave."""
    args = list(argv)
    split = args.index("--") if "--" in args else len(args)
    mine, theirs = args[:split], args[split + 1 :]
    req = Request(
        persistent=_yes("QEMU_PERSISTENT", env.get("QEMU_PERSISTENT", "")),
        credential=_yes("QEMU_CREDENTIAL", env.get("QEMU_CREDENTIAL", "")),
        preserve_argv0=_yes("QEMU_PRESERVE_ARGV0", env.get("QEMU_PRESERVE_ARGV0", "")),
        clear=_yes("QEMU_CLEAR", env.get("QEMU_CLEAR", "")),
        test=_yes("QEMU_TEST", env.get("QEMU_TEST", "")),
    )
    only_list = _register_sh(mine, args, req)
    if split < len(args):
        _conf(theirs, req)
    elif only_list:
        req.configure = False
    if not req.targets:
        req.targets = _words(env.get("QEMU_TARGETS", ""))
    if any(t.lower() == "all" for t in req.targets):
        req.targets = []  # QEMU's ALL: every target (of another family than the host's)
    return req


def _register_sh(mine: list[str], whole: list[str], req: Request) -> bool:
    """register.sh's options (getopts' letters may be bundled: -sl); True
    when -l was all there was."""
    i = 0
    others = False
    while i < len(mine):
        word = mine[i]
        i += 1
        if word in _LONG:
            letters = _LONG[word]
        elif word.startswith("--") and "=" in word and word.split("=")[0] in ("--targets",):
            req.targets += _words(word.split("=", 1)[1])
            others = True
            continue
        elif word.startswith("-") and len(word) > 1 and not word.startswith("--"):
            letters = word[1:]
        else:
            req.targets += _words(word)
            others = True
            continue
        for n, letter in enumerate(letters):
            if letter == "h":
                req.steps.append(("help", []))
            elif letter == "i":
                if letters[n + 1 :]:
                    raise UsageError(f"-i takes the rest of the command line: split {word}")
                req.steps.append(("shell", whole[i:]))  # all that follows, as given
                return False
            elif letter == "l":
                req.steps.append(("list", []))
            elif letter in "er":
                req.steps.append(({"e": "exit", "r": "reset"}[letter], []))
                others = True
            elif letter == "s":
                req.static = True
                others = True
            elif letter == "t":
                value = letters[n + 1 :]
                if not value:
                    if i >= len(mine):
                        raise UsageError("option -t requires an argument: TARGETS")
                    value = mine[i]
                    i += 1
                req.targets += _words(value)
                others = True
                break
            else:
                raise UsageError(f"invalid option: -{letter}")
    return not others and ("list", []) in req.steps


#: qemu-binfmt-conf.sh's options: long and short spellings -> (name, takes)
#: where takes is "value" (required), "yesno" (an optional yes|no) or "flag"
_CONF: dict[str, tuple[str, str]] = {
    "-Q": ("path", "value"), "--path": ("path", "value"), "--qemu-path": ("path", "value"),
    "-F": ("suffix", "value"), "--suffix": ("suffix", "value"),
    "--qemu-suffix": ("suffix", "value"),
    "-p": ("persistent", "yesno"), "--persistent": ("persistent", "yesno"),
    "-c": ("credential", "yesno"), "--credential": ("credential", "yesno"),
    "-g": ("preserve_argv0", "yesno"), "--preserve-argv0": ("preserve_argv0", "yesno"),
    "-r": ("clear", "flag"), "--clear": ("clear", "flag"),
    "-t": ("test", "flag"), "--test": ("test", "flag"),
    "-s": ("systemd", "flag"), "--systemd": ("systemd", "flag"),
    "-d": ("debian", "flag"), "--debian": ("debian", "flag"),
    "-e": ("exportdir", "value"), "--exportdir": ("exportdir", "value"),
    "-h": ("help", "flag"), "--help": ("help", "flag"),
}  # fmt: skip


def _conf(words: list[str], req: Request) -> None:
    """qemu-binfmt-conf.sh's options, as GNU getopt reads them (options
    anywhere, --opt=value, bundled short flags), plus QEMU's own spellings
    (--persistent yes, --systemd CPU)."""
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "--":
            req.targets += [t for w in words[i:] for t in _words(w)]
            return
        if not word.startswith("-") or word == "-":
            req.targets += _words(word)
            continue
        value: str | None = None
        if word.startswith("--") and "=" in word:
            word, value = word.split("=", 1)
        elif not word.startswith("--") and len(word) > 2:
            # bundled: -pc, or a value glued to its letter: -Q/dir, -F-static
            head, tail = word[:2], word[2:]
            if head in _CONF and _CONF[head][1] == "value":
                word, value = head, tail
            else:
                words[i:i] = [f"-{c}" for c in tail]
                word = head
        if word not in _CONF:
            raise UsageError(f"invalid option after --: {word}")
        name, takes = _CONF[word]
        if takes == "value" and value is None:
            if i >= len(words):
                raise UsageError(f"option {word} requires an argument")
            value, i = words[i], i + 1
        if takes == "yesno" and value is None and words[i : i + 1] in (["yes"], ["no"]):
            value, i = words[i], i + 1
        _set(req, name, word, value)


def _set(req: Request, name: str, word: str, value: str | None) -> None:
    if name == "help":
        req.steps.append(("help", []))
    elif name == "path":
        req.path = value
    elif name == "suffix":
        req.suffix = value
    elif name in ("persistent", "credential", "preserve_argv0"):
        setattr(req, name, True if value is None else _yes(word, value))
    elif name in ("clear", "test"):
        setattr(req, name, True)
    elif name == "systemd":
        req.mode = "systemd"
        if value:  # --systemd=CPU, as QEMU's script spells it
            req.targets += _words(value)
    elif name == "debian":
        req.mode = "debian"
    elif name == "exportdir":
        req.exportdir = value


# -- doing it ----------------------------------------------------------------------


@dataclass
class Context:
    """Where: the binfmt_misc mount, the environment, the output streams."""

    env: Mapping[str, str]
    binfmt_path: str = DEFAULT_PATH
    out: Callable[[str], None] = print
    err: Callable[[str], None] = lambda line: print(line, file=sys.stderr)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    ctx = Context(os.environ if env is None else env)
    try:
        req = parse(args, ctx.env)
        return run(req, ctx)
    except UsageError as e:
        ctx.err(f"{PROG}: {e}; see {PROG} -h")
        return USAGE
    except QusdError as e:
        ctx.err(f"{PROG}: {e.message}")
        return e.exit_status
    except BrokenPipeError:  # the reader is gone (| head): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def run(req: Request, ctx: Context) -> int:
    """register.sh's steps in order, then qemu-binfmt-conf.sh's part."""
    for step, args in req.steps:
        if step == "help":
            ctx.out(USAGE_TEXT.rstrip("\n"))
            return 0
        if step == "shell":
            return subprocess.call(["sh", "-c", args[0], "sh", *args[1:]] if args else ["sh"])
        if step == "exit":
            return 0
        kernel = provide.mounted(ctx.binfmt_path)
        if step == "list":
            _print_entries(ctx, provide.listing(kernel.entries()), "no entries")
        elif step == "reset":
            _print_entries(ctx, reset(kernel, None), "no qemu-* entry to remove")
    if not req.configure:
        return 0
    if req.mode != "kernel" or req.exportdir:
        return export(req, ctx)
    kernel = provide.mounted(ctx.binfmt_path)
    if req.clear:
        names = catalog.builtin().resolve(req.targets) if req.targets else None
        gone = clear_plan(kernel, names)
        if req.test:
            _print_entries(ctx, [provide.row(e, "would remove") for e in gone], "nothing to remove")
            return 0
        _print_entries(ctx, reset(kernel, names), "nothing to remove")
        return 0
    return register(req, ctx, kernel)


def _print_entries(ctx: Context, rows: list[dict[str, object]], empty: str) -> None:
    """Rows as qusd-binfmt prints them."""
    if not rows:
        ctx.out(empty)
        return
    cells = [[str(r["name"]), str(r["flags"] or "-"), str(r["result"]), str(r["interpreter"])]
             for r in rows]  # fmt: skip
    ctx.out(text_table(cells, ["NAME", "FLAGS", "RESULT", "INTERPRETER"]))


def clear_plan(kernel: BinfmtMisc, targets: Sequence[Target] | None) -> list[Entry]:
    """What -- -r removes: the named targets' qemu-* entries, or every qemu-*
    entry (not a fixed list: distributions' and other tools' too)."""
    entries = kernel.entries()
    if targets is None:
        return [e for e in entries if is_qemu_entry(e.name)]
    names = {t.entry_name for t in targets}
    return [e for e in entries if e.name in names]


def reset(kernel: BinfmtMisc, targets: Sequence[Target] | None) -> list[dict[str, object]]:
    """Remove them, all or none."""
    gone = clear_plan(kernel, targets)
    with table.Transaction(kernel) as tx:
        for e in gone:
            tx.remove(e)
    return [provide.row(e, "removed") for e in gone]


@dataclass(frozen=True)
class Setup:
    """The interpreter each target gets, and the flags."""

    targets: list[Target]
    directory: str
    suffix: str
    flags: str
    #: the targets were named (not "every foreign one")
    named: bool

    def interpreter(self, t: Target) -> str:
        return os.path.join(self.directory, f"qemu-{t.cpu}{self.suffix}")


def setup(req: Request, env: Mapping[str, str], *, present_only: bool) -> Setup:
    """The targets (named, or every target of another family than the
    host's, which HOST_ARCH may name; present_only: of those, the ones whose
    interpreter is there), the interpreter directory and suffix, the flags."""
    directory = req.path or env.get("QEMU_BIN_DIR") or env.get("QEMU_PATH") or BIN_DIR
    suffix = req.suffix if req.suffix is not None else (
        "-static" if req.static else env.get("QEMU_SUFFIX", "")
    )  # fmt: skip
    flags = ("OC" if req.credential else "") + ("F" if req.persistent else "")
    flags += "P" if req.preserve_argv0 else ""
    cat = catalog.builtin()
    if req.targets:
        targets = catalog.builtin().resolve(req.targets)
    else:
        host = env.get("HOST_ARCH") or catalog.host_machine()
        targets = cat.foreign(catalog.family_of(host))
    made = Setup(targets, os.path.abspath(directory), suffix, flags, bool(req.targets))
    if present_only and not made.named:
        here = [t for t in targets if os.path.isfile(made.interpreter(t))]
        made = dataclasses.replace(made, targets=here)
    return made


def _missing(s: Setup, t: Target) -> InterpreterError:
    path = s.interpreter(t)
    return InterpreterError(
        f"no interpreter for {t.name}: {path} does not exist, and the F flag (-p) opens it "
        "at registration; put it there, point QEMU_BIN_DIR (or -- -Q DIR) at the directory "
        "that holds it, add -s for the qemu-CPU-static names, or register without -p",
        target=t.name,
    )


def register(req: Request, ctx: Context, kernel: BinfmtMisc) -> int:
    """The targets through provide.plan: unchanged, provided, or registered
    (all or none); with --test only printed. Without F an interpreter that is
    not here is registered all the same (QEMU's script does: the kernel looks
    for it at each exec, e.g. inside a container that has it), with a note."""
    s = setup(req, ctx.env, present_only=req.persistent)
    if not s.targets:
        raise InterpreterError(
            f"no interpreter qemu-CPU{s.suffix} in {s.directory}: nothing to register with "
            "-p; point QEMU_BIN_DIR (or -- -Q DIR) at the interpreters (-s: the -static ones)"
        )
    wants: list[tuple[Target, Rule | QusdError]] = []
    absent = []
    for t in s.targets:
        path = s.interpreter(t)
        if not os.path.isfile(path):
            if "F" in s.flags:
                wants.append((t, _missing(s, t)))
                continue
            absent.append(path)
        wants.append((t, t.rule(path, s.flags)))
    steps = provide.plan(kernel, wants, s.flags, replace_others=False)
    fix = f"remove it first ({PROG} -- -r {{target}}, or -r for every qemu-* entry)"
    problems = [p for st in steps if (p := st.problem(fix.format(target=st.target.name)))]
    if not req.test and not problems:
        steps = provide.apply(kernel, steps)
    _print_steps(ctx, steps, test=req.test)
    for p in problems:
        ctx.err(f"{PROG}: {p.message}")
    if absent and not problems:
        ctx.err(
            f"{PROG}: note: {len(absent)} interpreter(s) are not here ({', '.join(absent[:3])}"
            f"{', ...' if len(absent) > 3 else ''}): their programs run only where they exist "
            "(a container that has them); -p with interpreters here works everywhere"
        )
    return problems[0].exit_status if problems else 0


_WOULD = {Result.REGISTERED: "would register", Result.REPLACED: "would replace"}


def _print_steps(ctx: Context, steps: Sequence[provide.Step], *, test: bool = False) -> None:
    """A row per target; a registration not applied says what it would do
    (test) or that it was not done (another target failed)."""
    rows = []
    for st in steps:
        name, flags, interpreter = st.shown()
        result = st.result.value
        if st.entry is None and st.result in _WOULD:
            result = _WOULD[st.result] if test else "not registered"
        rows.append([st.target.name, name, flags or "-", result, interpreter])
    ctx.out(text_table(rows, ["TARGET", "NAME", "FLAGS", "RESULT", "INTERPRETER"]))


def export(req: Request, ctx: Context) -> int:
    """qemu-binfmt-conf.sh's --systemd / --debian / --exportdir: a file per
    target, as QEMU's script writes them, for systemd-binfmt (binfmt.d) or
    update-binfmts (--importdir); nothing is registered."""
    if req.clear:
        raise UsageError(
            "--clear removes kernel entries; with --systemd, --debian or --exportdir remove "
            "the files you do not want"
        )
    debian = req.mode == "debian"
    default = DEBIAN_DIR if debian else SYSTEMD_DIR
    directory = Path(req.exportdir or ctx.env.get("EXPORTDIR") or default)
    s = setup(req, ctx.env, present_only=False)
    rows = []
    for t in s.targets:
        rule = t.rule(s.interpreter(t), s.flags)
        name = rule.name if debian else f"{rule.name}.conf"
        if req.test:
            rule.encode()
            path = directory / name
        else:
            try:
                path = (
                    interchange.write_binfmts_import(directory, rule)
                    if debian
                    else interchange.write_binfmt_d(directory, rule, by=f"{PROG} {__version__}")
                )
            except OSError as e:
                ctx.err(f"{PROG}: cannot write {directory / name}: {e.strerror}; pick a "
                        "directory you can write with --exportdir DIR")  # fmt: skip
                return 73
        rows.append([t.name, rule.normalized().flags or "-",
                     "would write" if req.test else "written", str(path)])  # fmt: skip
    ctx.out(text_table(rows, ["TARGET", "FLAGS", "RESULT", "FILE"]) if rows else "no target")
    if not req.test:
        hint = (
            f"update-binfmts --importdir {directory} --import NAME"
            if debian
            else f"systemd-binfmt loads them at boot if {directory} is one of its directories "
            "(/etc/binfmt.d, /run/binfmt.d, /usr/lib/binfmt.d), or now: "
            f"/usr/lib/systemd/systemd-binfmt {directory}/NAME.conf"
        )
        ctx.err(f"{PROG}: {hint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
