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

from qusd import catalog, interpreters
from qusd.binfmt import DEFAULT_PATH, BinfmtMisc, Entry
from qusd.cli import table
from qusd.errors import ConflictError, QusdError


def split_targets(values: Sequence[str]) -> list[str]:
    """Targets from arguments that may each hold several, separated by
    spaces, commas or newlines (a YAML block leaves a trailing newline)."""
    return [t for v in values for t in re.split(r"[\s,]+", v) if t]


def _kernel(path: str) -> BinfmtMisc:
    kernel = BinfmtMisc(path)
    if not kernel.is_mounted():
        kernel.mount()  # and never unmount: that would drop the entries again
    return kernel


def _row(e: Entry, result: str) -> dict[str, Any]:
    return {"name": e.name, "interpreter": e.interpreter, "flags": e.flags,
            "enabled": e.enabled, "result": result}  # fmt: skip


def register(ns: argparse.Namespace) -> list[dict[str, Any]]:
    cat = catalog.load(ns.catalog)
    family = catalog.family_of(catalog.host_machine())
    names = split_targets(ns.targets)
    dirs = ns.interpreter_dir or interpreters.DEFAULT_DIRS
    if not names or names == ["all"]:
        targets = interpreters.foreign_with_interpreters(cat, family, dirs)
    else:
        targets = cat.resolve(names)
    fix = "use an image with interpreters, or mount a host directory and pass --interpreter-dir"
    rules = [t.rule(interpreters.require(t, dirs, fix).path, ns.flags) for t in targets]
    kernel = _kernel(ns.binfmt_path)
    done: list[dict[str, Any]] = []
    added: list[str] = []
    try:
        for rule in rules:
            rule.encode()
            existing = kernel.get(rule.name)
            if existing is not None and existing.rule() == rule.normalized():
                done.append(_row(existing, "unchanged"))
                continue
            if existing is not None:
                if not ns.replace:
                    raise ConflictError(
                        f"{rule.name} is already registered ({existing.describe()}); "
                        "pass --replace to overwrite it"
                    )
                kernel.remove(rule.name)
            added.append(rule.name)
            done.append(_row(kernel.register(rule), "registered"))
    except QusdError:
        for name in added:  # all or nothing
            kernel.remove(name)
        raise
    return done


def list_entries(ns: argparse.Namespace) -> list[dict[str, Any]]:
    kernel = BinfmtMisc(ns.binfmt_path)
    return [_row(e, "enabled" if e.enabled else "disabled") for e in kernel.entries()]


def reset(ns: argparse.Namespace) -> list[dict[str, Any]]:
    kernel = BinfmtMisc(ns.binfmt_path)
    if ns.scope == "all":
        gone = kernel.entries()
        kernel.remove_all()
    else:
        gone = [e for e in kernel.entries() if e.name.startswith("qemu-")]
        for e in gone:
            kernel.remove(e.name)
    return [_row(e, "removed") for e in gone]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qusd-binfmt",
        description="Register QEMU user-mode emulation in binfmt_misc without the qusd "
        "daemon (for containers and CI). Exits non-zero on any failure.",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--binfmt-path", default=DEFAULT_PATH, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    s = sub.add_parser("register", help="register targets (default: every foreign one)")
    s.add_argument(
        "targets", nargs="*", metavar="TARGET",
        help="targets or aliases (aarch64, arm64, linux/arm/v7); several per argument may be "
        "separated by spaces, commas or newlines; none or 'all': every target of another "
        "family than the host's that has an interpreter",
    )  # fmt: skip
    s.add_argument("--flags", default="F", help="binfmt_misc flags (default F; C is never implied)")
    s.add_argument("--replace", action="store_true", help="overwrite other definitions")
    s.add_argument("--catalog", choices=["builtin", "binfmt.d"], default="builtin")
    s.add_argument(
        "--interpreter-dir", action="append", metavar="DIR",
        default=[d for d in os.environ.get("QUSD_INTERPRETER_DIRS", "").split(":") if d] or None,
        help="where qemu-<cpu>[-static] are (repeatable; default: $QUSD_INTERPRETER_DIRS or "
        "/usr/bin, /usr/local/bin, /usr/libexec/qemu-binfmt)",
    )  # fmt: skip
    s.set_defaults(func=register)
    s = sub.add_parser("list", help="list every entry")
    s.set_defaults(func=list_entries)
    s = sub.add_parser("reset", help="remove qemu-* entries (or all)")
    s.add_argument("--scope", choices=["qemu", "all"], default="qemu")
    s.set_defaults(func=reset)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    try:
        rows = ns.func(ns)
    except QusdError as e:
        print(f"qusd-binfmt: {e.message}", file=sys.stderr)
        return e.exit_status
    if ns.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        cells = [[r["name"], r["flags"] or "-", r["result"], r["interpreter"]] for r in rows]
        print(table(cells, ["NAME", "FLAGS", "RESULT", "INTERPRETER"]))
    else:
        print("no entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
