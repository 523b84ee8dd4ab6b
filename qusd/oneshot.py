"""qusd-binfmt: register, list and reset without the daemon, in one shot.

For containers and CI, the flow qus, multiarch/qemu-user-static and
tonistiigi/binfmt users know; it uses qusd's kernel layer directly and needs
nothing but the standard library:

    docker run --rm --privileged IMAGE register aarch64 riscv64
    docker run --rm --privileged IMAGE list
    docker run --rm --privileged IMAGE reset

Unlike those tools it fails loudly (non-zero exit, one line per problem),
never registers half of a request, registers with F (not C) by default,
leaves entries it did not make alone unless asked, and never unmounts
binfmt_misc behind itself.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from qusd import (
    __version__,
    catalog,
    compat,
    doctor,
    interpreters,
    native,
    provide,
    provision,
    table,
    verify,
)
from qusd.binfmt import DEFAULT_PATH, BinfmtMisc
from qusd.catalog import is_qemu_entry
from qusd.errors import QusdError
from qusd.text import DIRECTORY, complete, reader_gone, words
from qusd.text import table as text_table

INTERPRETER_FIX = (
    "use an image with interpreters, or mount a host directory and pass --interpreter-dir"
)


def split_targets(values: Sequence[str]) -> list[str]:
    """Targets from arguments that may each hold several, separated by
    spaces, commas or newlines (a YAML block leaves a trailing newline)."""
    return [t for v in values for t in re.split(r"[\s,]+", v) if t]


_kernel = provide.mounted
_row = provide.row


def register(ns: argparse.Namespace) -> list[dict[str, Any]]:
    """Register the targets, all or none, through the table transaction the
    daemon uses; a target another entry already provides is reported, as
    tonistiigi/binfmt does, not registered again."""
    cat = catalog.load(ns.catalog)
    family = catalog.family_of(catalog.host_machine())
    names = split_targets(ns.targets)
    dirs = ns.interpreter_dir or interpreters.search_path()
    targets = interpreters.chosen(cat, names, family, dirs, INTERPRETER_FIX)
    steps = provide.ensure(_kernel(ns.binfmt_path), targets, dirs, ns.flags,
                           replace_others=ns.replace, fix="pass --replace to replace it",
                           interpreter_fix=INTERPRETER_FIX)  # fmt: skip
    return [_row(s.entry, s.result.value) for s in steps if s.entry is not None]


def list_entries(ns: argparse.Namespace) -> list[dict[str, Any]]:
    return provide.listing(_kernel(ns.binfmt_path).entries())


def reset(ns: argparse.Namespace) -> list[dict[str, Any]]:
    """Remove every qemu-* entry (or every entry), all or none."""
    kernel = _kernel(ns.binfmt_path)
    entries = kernel.entries()
    gone = entries if ns.scope == "all" else [e for e in entries if is_qemu_entry(e.name)]
    with table.Transaction(kernel) as tx:
        for e in gone:
            tx.remove(e)
    return [_row(e, "removed") for e in gone]


def verify_targets(ns: argparse.Namespace) -> list[verify.Check]:
    """Run each registered target's built-in program (or each named one's)
    through the kernel."""
    cat = catalog.load(ns.catalog)
    names = split_targets(ns.targets)
    targets = cat.resolve(names) if names else None
    return verify.verify(_kernel(ns.binfmt_path), cat, targets)


def show_checks(ns: argparse.Namespace, checks: list[verify.Check]) -> int:
    if ns.json:
        print(json.dumps([c.to_json() for c in checks], indent=2))
    else:
        print(verify.render(checks))
    return 0 if all(c.ok for c in checks) else verify.FAILED


def diagnose(ns: argparse.Namespace) -> list[doctor.Finding]:
    """Why FILE does not run, from this process's view (nothing is mounted)."""
    kernel = BinfmtMisc(ns.binfmt_path)
    family = catalog.family_of(catalog.host_machine())
    ctx = doctor.Context(native=native.tried_one_by_one(family, kernel))
    args = ns.argv if ns.argv or ns.run else None
    return doctor.diagnose(ns.file, kernel, root=ns.root, args=args, context=ctx)


def show_findings(ns: argparse.Namespace, findings: list[doctor.Finding]) -> int:
    if ns.json:
        print(json.dumps([f.to_json() for f in findings], indent=2))
    else:
        print(doctor.render(findings))
    return doctor.exit_status(findings)


def install_interpreters(ns: argparse.Namespace) -> list[provision.Installed]:
    """Extract the targets' interpreters from a qemu-user-static package."""
    cat = catalog.load(ns.catalog)
    deb = os.path.abspath(ns.deb) if ns.deb else None
    return provision.install(cat.resolve(split_targets(ns.targets)), deb, ns.dir, ns.cache_dir)


def show_installed(ns: argparse.Namespace, items: list[provision.Installed]) -> int:
    if ns.json:
        print(json.dumps([i.to_json() for i in items], indent=2))
    else:
        rows = [[i.path, ",".join(i.targets), i.version, i.sha256] for i in items]
        print(text_table(rows, ["INTERPRETER", "TARGETS", "VERSION", "SHA256"]))
    return 0


def _emulation_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser(
        "verify", parents=[common], help="prove that registered targets run",
        description="Run each registered target's built-in test program (or each TARGET's) "
        "through the kernel and report ok or why it failed, with the interpreter and the "
        "QEMU version behind it. Exit status 1 when one failed. Mounts binfmt_misc when it "
        "is not.",
    )  # fmt: skip
    s.add_argument("targets", nargs="*", metavar="TARGET")
    s.add_argument("--catalog", choices=["builtin", "binfmt.d"], default="builtin")
    s.set_defaults(func=verify_targets, show=show_checks)
    s = sub.add_parser(
        "doctor", parents=[common], help="say why a program does not run",
        description="Why does FILE fail to run? Its target, the entry the kernel would pick "
        "or that none does, and each cause with its fix. Exit status 1 when something is "
        "in the way.",
    )  # fmt: skip
    s.add_argument("file", metavar="FILE")
    s.add_argument("--root", default="/", metavar="DIR",
                   help="the program runs chrooted to DIR (FILE is a path inside it)")  # fmt: skip
    s.add_argument("--run", action="store_true", help="run it first (implied by -- ARGS)")
    s.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- ARGS")
    s.set_defaults(func=diagnose, show=show_findings)
    s = sub.add_parser(
        "interpreters",
        help="install interpreters from qemu-user-static",
        description="Interpreters extracted from qemu-user-static's package.",
    )
    actions = s.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = actions.add_parser(
        "install", parents=[common], help="extract the named targets' interpreters",
        description="Extract only the named targets' interpreters from a qemu-user-static "
        ".deb (--from FILE, or Debian's, downloaded with apt-get into --cache-dir) into --dir, "
        "recording version and sha256; register then finds them there first.",
    )  # fmt: skip
    s.add_argument("targets", nargs="+", metavar="TARGET")
    s.add_argument("--from", dest="deb", metavar="FILE", help="the package file (a .deb)")
    s.add_argument("--dir", default=interpreters.STORE_DIR,
                   help=f"where to put them (default {interpreters.STORE_DIR})")  # fmt: skip
    s.add_argument("--cache-dir", default=provision.CACHE_DIR,
                   help=f"where the download is kept (default {provision.CACHE_DIR})")  # fmt: skip
    s.add_argument("--catalog", choices=["builtin", "binfmt.d"], default="builtin")
    s.set_defaults(func=install_interpreters, show=show_installed)


def _tonistiigi_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "tonistiigi/binfmt's options",
        "Without a COMMAND: uninstall, then install, then print tonistiigi/binfmt's status "
        'JSON ({"supported": [platforms], "emulators": [enabled entries]}); alone, just '
        "the status.",
    )
    g.add_argument("--install", metavar="PLATFORMS",
                   help="register these platforms or targets: arm64,riscv64 or all")  # fmt: skip
    g.add_argument("--uninstall", metavar="NAMES",
                   help="remove these entries: exact names, targets or platforms, or globs "
                   "over the qemu-* entries (qemu-*)")  # fmt: skip
    g.add_argument("--mount", dest="binfmt_path", default=argparse.SUPPRESS, metavar="PATH",
                   help=f"where binfmt_misc is mounted (default {DEFAULT_PATH})")  # fmt: skip


def tonistiigi(ns: argparse.Namespace) -> int:
    """tonistiigi/binfmt's command line, on the same core (qusd.compat)."""
    if ns.command is not None:
        print("qusd-binfmt: --install and --uninstall take no COMMAND", file=sys.stderr)
        return 2
    dirs = provide.interpreter_dirs(os.environ)
    try:
        kernel = _kernel(ns.binfmt_path)
    except QusdError as e:
        print(f"qusd-binfmt: {e.message}", file=sys.stderr)
        return e.exit_status
    return compat.binfmt(kernel, ns.install, ns.uninstall, os.environ, dirs)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qusd-binfmt",
        description="Register QEMU user-mode emulation in binfmt_misc without the qusd "
        "daemon (for containers and CI). Exits non-zero on any failure.",
    )
    p.add_argument("--version", action="version", version=f"qusd-binfmt {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON")  # fmt: skip
    common.add_argument("--binfmt-path", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--binfmt-path", default=DEFAULT_PATH, help=argparse.SUPPRESS)
    _tonistiigi_options(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser(
        "register", parents=[common], help="register targets (default: every foreign one)",
        description="Register QEMU targets in binfmt_misc, all or none: an identical entry "
        "is left unchanged, an entry that already provides a target (it runs its programs "
        "with the flags asked for, no C unless asked, and a static interpreter) is reported "
        "and kept, another definition of the same name is an error unless --replace. Mounts "
        "binfmt_misc when it is not.",
    )  # fmt: skip
    complete(s.add_argument(
        "targets", nargs="*", metavar="TARGET",
        help="targets or aliases (aarch64, arm64, linux/arm/v7); several per argument may be "
        "separated by spaces, commas or newlines; none or 'all': every target of another "
        "family than the host's that has an interpreter",
    ), words("targets", catalog.completion_names()))  # fmt: skip
    s.add_argument("--flags", default="F", help="binfmt_misc flags (default F; C is never implied)")
    s.add_argument("--replace", action="store_true", help="overwrite other definitions")
    s.add_argument("--catalog", choices=["builtin", "binfmt.d"], default="builtin")
    complete(s.add_argument(
        "--interpreter-dir", action="append", metavar="DIR",
        default=[d for d in os.environ.get("QUSD_INTERPRETER_DIRS", "").split(":") if d] or None,
        help="where qemu-<cpu>[-static] are (repeatable; default: $QUSD_INTERPRETER_DIRS or "
        "/var/lib/qusd/interpreters (see interpreters install), /usr/bin, /usr/local/bin, "
        "/usr/libexec/qemu-binfmt)",
    ), DIRECTORY)  # fmt: skip
    s.set_defaults(func=register, empty="nothing to register")
    s = sub.add_parser("list", parents=[common], help="list every entry",
                       description="List every binfmt_misc entry, qemu or not.")  # fmt: skip
    s.set_defaults(func=list_entries, empty="no entries")
    s = sub.add_parser(
        "reset", parents=[common], help="remove qemu-* entries (or all)",
        description="Remove every qemu-* entry (--scope all: every entry), all or none.",
    )  # fmt: skip
    s.add_argument("--scope", choices=["qemu", "all"], default="qemu")
    s.set_defaults(func=reset, empty="nothing to remove")
    _emulation_commands(sub, common)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    if ns.command is None or ns.install or ns.uninstall:
        return tonistiigi(ns)
    try:
        rows = ns.func(ns)
        show = getattr(ns, "show", None)
        if show is not None:
            status: int = show(ns, rows)
            return status
    except QusdError as e:
        print(f"qusd-binfmt: {e.message}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 130
    try:
        if ns.json:
            print(json.dumps(rows, indent=2))
        elif rows:
            cells = [[r["name"], r["flags"] or "-", r["result"], r["interpreter"]] for r in rows]
            print(text_table(cells, ["NAME", "FLAGS", "RESULT", "INTERPRETER"]))
        else:
            print(ns.empty)
        sys.stdout.flush()
    except BrokenPipeError:
        reader_gone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
