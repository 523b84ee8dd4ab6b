"""qusctl: the command-line client.

A thin shell: it parses arguments, calls the layer below, and turns a
QusdError into a one-line message and the error's exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from qusd import __version__, catalog, interpreters, sandbox
from qusd.binfmt import DEFAULT_PATH, BinfmtMisc
from qusd.errors import QusdError


def table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    """An aligned text table, last column unpadded."""
    cells = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        padded = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)] + [r[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def cmd_identify(ns: argparse.Namespace) -> int:
    cat = catalog.load(ns.catalog)
    family = catalog.family_of(ns.host or catalog.host_machine())
    results: list[dict[str, Any]] = []
    status = 0
    for path in ns.files:
        try:
            header = interpreters.read_header(path)
        except OSError as e:
            print(f"qusctl: {path}: {e.strerror}", file=sys.stderr)
            status = 66
            continue
        ident = catalog.identify(header, cat, family)
        results.append(
            {
                "file": path,
                "target": ident.target.name if ident.target else None,
                "native": ident.native,
                "matches": [t.name for t in ident.matches],
            }
        )
    if ns.json:
        print(json.dumps(results, indent=2))
    else:
        rows = []
        for r in results:
            what = f"native ({r['target']})" if r["native"] else r["target"] or "no match"
            rows.append([r["file"], what])
        if rows:
            print(table(rows, ["FILE", "TARGET"]))
    return status


def cmd_run(ns: argparse.Namespace) -> int:
    argv = _command(ns)
    sandbox.enter(ns.pid)
    sandbox.exec_in(argv)
    return 0  # pragma: no cover


def cmd_sandbox(ns: argparse.Namespace) -> int:
    argv = _command(ns)
    cat = catalog.load(ns.catalog)
    targets = cat.resolve(ns.register) if ns.register else []
    rules = []
    for t in targets:
        interp = interpreters.find(t, ns.interpreter_dir or interpreters.DEFAULT_DIRS)
        if interp is None:
            raise QusdError(
                f"no interpreter for {t.name}: install qemu-user-static or pass --interpreter-dir"
            )
        rules.append(t.rule(interp.path, ns.flags))
    sandbox.create(ns.binfmt_path)
    kernel = BinfmtMisc(ns.binfmt_path)
    for rule in rules:
        kernel.register(rule)
    sandbox.exec_in(argv)
    return 0  # pragma: no cover


def _command(ns: argparse.Namespace) -> list[str]:
    argv: list[str] = ns.argv
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        argv = [os.environ.get("SHELL", "/bin/sh")]
    return argv


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qusctl",
        description="Manage QEMU user-mode emulation (binfmt_misc) with qusd.",
    )
    p.add_argument("--version", action="version", version=f"qusctl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser(
        "identify",
        help="name the target that runs each file",
        description="Print, for each file, the QEMU target whose magic/mask matches its "
        "header, 'native' when the host runs it itself, or 'no match'.",
    )
    s.add_argument("files", nargs="+", metavar="FILE")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument(
        "--catalog",
        choices=["builtin", "binfmt.d"],
        default="builtin",
        help="the target table: qusd's built-in copy of QEMU's, or the system's binfmt.d "
        "qemu-*.conf files (default: builtin)",
    )
    s.add_argument("--host", metavar="MACHINE", help="judge nativeness for this `uname -m`")
    s.set_defaults(func=cmd_identify)

    s = sub.add_parser(
        "run",
        help="run a command inside an existing sandbox",
        description="Run CMD (default: your shell) in the user and mount namespaces of "
        "process PID, so it sees that sandbox's private binfmt_misc table.",
    )
    s.add_argument("--pid", type=int, required=True, help="a process in the sandbox")
    s.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser(
        "sandbox",
        help="run a command in a new sandbox with a private binfmt_misc",
        description="Run CMD (default: your shell) in a new user + mount namespace with its "
        "own binfmt_misc table (Linux >= 6.7; no privilege needed), after registering "
        "the targets given with --register. Nothing outside the sandbox changes.",
    )
    s.add_argument(
        "--register",
        action="append",
        metavar="TARGET",
        help="register this target first (repeatable; aliases such as arm64 work)",
    )
    s.add_argument("--flags", default="F", help="flags for --register (default: F)")
    s.add_argument("--catalog", choices=["builtin", "binfmt.d"], default="builtin")
    s.add_argument(
        "--interpreter-dir",
        action="append",
        metavar="DIR",
        help="where to look for qemu-<cpu>[-static] (repeatable; default: "
        + ", ".join(interpreters.DEFAULT_DIRS)
        + ")",
    )
    s.add_argument("--binfmt-path", default=DEFAULT_PATH, help=argparse.SUPPRESS)
    s.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    s.set_defaults(func=cmd_sandbox)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    try:
        status: int = ns.func(ns)
    except QusdError as e:
        print(f"qusctl: {e.message}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
