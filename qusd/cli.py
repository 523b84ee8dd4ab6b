"""qusctl: the command-line client.

A thin shell: it parses arguments, calls the layer below, and turns a
QusdError into a one-line message and the error's exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from qusd import __version__, catalog, interchange, interpreters, sandbox
from qusd.binfmt import DEFAULT_PATH, BinfmtMisc, Rule
from qusd.client import DEFAULT_SOCKET, Client, default_socket
from qusd.errors import DaemonUnavailableError, NoSuchEntryError, QusdError
from qusd.text import table


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


def _out(ns: argparse.Namespace, doc: Any, human: str) -> None:
    print(json.dumps(doc, indent=2) if ns.json else human)


def _reg_rows(regs: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            r["name"],
            "yes" if r["enabled"] else "no",
            r["target"] or "-",
            r["flags"] or "-",
            "persistent" if r["persistent"] else "managed" if r["managed"] else "-",
            r["interpreter"],
        ]
        for r in regs
    ]


REG_HEADERS = ["NAME", "ENABLED", "TARGET", "FLAGS", "QUSD", "INTERPRETER"]


def cmd_list(ns: argparse.Namespace) -> int:
    regs = Client(ns.socket).get("/v1/registrations")
    _out(ns, regs, table(_reg_rows(regs), REG_HEADERS) if regs else "no entries")
    return 0


def cmd_register(ns: argparse.Namespace) -> int:
    body: dict[str, Any] = {"persistent": not ns.no_persist, "replace": ns.replace}
    if ns.force:
        body["force"] = True
    if ns.allow_untrusted_interpreter:
        body["allow_untrusted_interpreter"] = True
    if ns.targets:
        body["targets"] = ns.targets
    if ns.flags is not None:
        body["flags"] = ns.flags
    doc = Client(ns.socket).request("POST", "/v1/registrations", body)
    rows = [[*row, "registered"] for row in _reg_rows(doc["registered"])]
    rows += [[*row, "unchanged"] for row in _reg_rows(doc["unchanged"])]
    _out(ns, doc, table(rows, [*REG_HEADERS, "RESULT"]) if rows else "nothing to register")
    return 0


def cmd_unregister(ns: argparse.Namespace) -> int:
    client, status = Client(ns.socket), 0
    for name in ns.names:
        try:
            client.request("DELETE", f"/v1/registrations/{quote(name, safe='')}")
            print(f"unregistered {name}")
        except QusdError as e:
            print(f"qusctl: {e.message}", file=sys.stderr)
            status = status or e.exit_status
    return status


def cmd_enable(ns: argparse.Namespace) -> int:
    doc = Client(ns.socket).request(
        "PATCH", f"/v1/registrations/{quote(ns.name, safe='')}", {"enabled": ns.enabled}
    )
    _out(ns, doc, f"{doc['name']} {'enabled' if doc['enabled'] else 'disabled'}")
    return 0


def cmd_status(ns: argparse.Namespace) -> int:
    s = Client(ns.socket).get("/v1/status")
    b, c = s["binfmt_misc"], s["counts"]
    lines = [
        f"qusd {s['version']} on Linux {s['kernel']} ({s['machine']}, family {s['family']})",
        f"binfmt_misc: {b['path']}, "
        + ("not mounted" if not b["mounted"] else "enabled" if b["enabled"] else "disabled"),
        f"sandbox: pid {s['sandbox']['pid']}" if s["sandbox"] else "sandbox: no",
        f"entries: {c['entries']} ({c['managed']} managed, {c['persistent']} persistent)",
        f"catalog: {s['catalog']}; state: {s['state_file']}",
    ]
    lines += [f"warning: {w['message']}" for w in s["warnings"]]
    _out(ns, s, "\n".join(lines))
    return 0


def cmd_targets(ns: argparse.Namespace) -> int:
    ts = Client(ns.socket).get("/v1/targets")
    rows = [
        [
            t["name"],
            t["family"],
            "yes" if t["native"] else "no",
            t["interpreter"] or "-",
            "-" if t["static"] is None else "static" if t["static"] else "dynamic",
        ]
        for t in ts
    ]
    _out(ns, ts, table(rows, ["TARGET", "FAMILY", "NATIVE", "INTERPRETER", "LINKING"]))
    return 0


def cmd_reset(ns: argparse.Namespace) -> int:
    doc = Client(ns.socket).request("POST", "/v1/reset", {"scope": ns.scope})
    removed = doc["removed"]
    _out(ns, doc, "removed " + ", ".join(removed) if removed else "nothing to remove")
    return 0


def cmd_reconcile(ns: argparse.Namespace) -> int:
    doc = Client(ns.socket).request("POST", "/v1/reconcile")
    _out(ns, doc, f"reconciled: {doc['summary']}")
    return 0


def _event_line(ev: dict[str, Any]) -> str:
    actor = ev["actor"]
    who = "" if actor is None else f" by {'qusd' if actor == 'qusd' else f'uid {actor}'}"
    seq = f"#{ev['seq']}" if ev["seq"] else "-"
    return f"{ev['time']} {seq} {ev['kind']}{who}: {ev['message']}"


def cmd_watch(ns: argparse.Namespace) -> int:
    """Print events as they come; reconnect (with since) when the daemon
    restarts or cuts the stream, so nothing recent is missed."""
    client = Client(ns.socket)
    since: int | None = ns.since
    connected = False
    while True:
        query = f"?since={since}" if since is not None else ""
        try:
            for ev in client.stream(f"/v1/events{query}"):
                connected = True
                if ev["seq"]:
                    since = ev["seq"]
                if ev["kind"] == "keep-alive":
                    continue
                print(json.dumps(ev) if ns.json else _event_line(ev), flush=True)
        except DaemonUnavailableError:
            if not connected or ns.once:
                raise
        if ns.once:
            return 0
        if since is None:
            since = 0
        time.sleep(1)


def cmd_import(ns: argparse.Namespace) -> int:
    found = interchange.read_paths(ns.paths)
    if not found:
        raise NoSuchEntryError(f"no rules in {', '.join(ns.paths)}")
    body: dict[str, Any] = {
        "entries": [_entry_spec(f.rule) for f in found],
        "persistent": not ns.no_persist,
        "replace": ns.replace,
    }
    if ns.force:
        body["force"] = True
    if ns.allow_untrusted_interpreter:
        body["allow_untrusted_interpreter"] = True
    doc = Client(ns.socket).request("POST", "/v1/import", body)
    rows = [[*row, "registered"] for row in _reg_rows(doc["registered"])]
    rows += [[*row, "unchanged"] for row in _reg_rows(doc["unchanged"])]
    _out(ns, doc, table(rows, [*REG_HEADERS, "RESULT"]) if rows else "nothing to import")
    return 0


def _entry_spec(rule: Rule) -> dict[str, Any]:
    if rule.extension is not None:
        return {"name": rule.name, "type": "extension", "extension": rule.extension,
                "interpreter": rule.interpreter, "flags": rule.flags}  # fmt: skip
    spec: dict[str, Any] = {"name": rule.name, "type": "magic", "offset": rule.offset,
                            "magic": rule.magic.hex(), "interpreter": rule.interpreter,
                            "flags": rule.flags}  # fmt: skip
    if rule.mask is not None:
        spec["mask"] = rule.mask.hex()
    return spec


def _rule_of(reg: dict[str, Any]) -> Rule:
    if reg["type"] == "extension":
        return Rule(reg["name"], reg["interpreter"], extension=reg["extension"],
                    flags=reg["flags"])  # fmt: skip
    mask = bytes.fromhex(reg["mask"]) if reg["mask"] is not None else None
    return Rule(reg["name"], reg["interpreter"], magic=bytes.fromhex(reg["magic"]), mask=mask,
                offset=reg["offset"], flags=reg["flags"])  # fmt: skip


def cmd_export(ns: argparse.Namespace) -> int:
    regs = Client(ns.socket).get("/v1/registrations")
    chosen = [r for r in regs if r["managed"] and (r["persistent"] or ns.all)]
    written = []
    for reg in chosen:
        note = "" if reg["enabled"] else "disabled in qusd, but binfmt.d registers it enabled"
        if not reg["enabled"]:
            print(f"qusctl: warning: {reg['name']} is disabled; systemd-binfmt will register "
                  "it enabled", file=sys.stderr)  # fmt: skip
        path = interchange.write_binfmt_d(Path(ns.binfmt_d), _rule_of(reg), note)
        written.append({"name": reg["name"], "file": str(path)})
    _out(ns, written, "\n".join(f"wrote {w['file']}" for w in written) or "nothing to export")
    return 0


def cmd_run(ns: argparse.Namespace) -> int:
    argv = _command(ns)
    pid = ns.pid
    if pid is None:
        box = Client(ns.socket).get("/v1/status")["sandbox"]
        if box is None:
            raise QusdError(
                "the daemon is not in a sandbox: programs run anywhere already see its table"
            )
        pid = box["pid"]
    sandbox.enter(pid, force=ns.force)
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
    p.add_argument(
        "--socket",
        default=default_socket(),
        metavar="PATH",
        help=f"the daemon's socket (default: $QUSD_SOCKET or {DEFAULT_SOCKET})",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def daemon_cmd(name: str, help: str, func: Any, description: str | None = None) -> Any:
        c = sub.add_parser(name, help=help, description=description or help)
        c.add_argument("--json", action="store_true", help="print the API's JSON")
        c.set_defaults(func=func)
        return c

    s = daemon_cmd(
        "register",
        "register targets",
        cmd_register,
        "Register QEMU targets (names or aliases: arm64, linux/arm/v7, ...). With no target, "
        "every target of another family than the host's that has an interpreter. An "
        "identical existing entry is left unchanged.",
    )
    s.add_argument("targets", nargs="*", metavar="TARGET")
    s.add_argument("--flags", help="binfmt_misc flags, any of P O C F (default: F)")
    s.add_argument("--no-persist", action="store_true", help="do not restore at start")
    s.add_argument("--replace", action="store_true", help="overwrite other definitions")
    s.add_argument(
        "--force", action="store_true", help="admins: even a rule that matches host programs"
    )
    s.add_argument(
        "--allow-untrusted-interpreter",
        action="store_true",
        help="admins: skip the root-owned-interpreter check",
    )
    s = daemon_cmd("unregister", "remove entries", cmd_unregister)
    s.add_argument("names", nargs="+", metavar="NAME")
    s = daemon_cmd("enable", "enable an entry", cmd_enable)
    s.add_argument("name", metavar="NAME")
    s.set_defaults(enabled=True)
    s = daemon_cmd("disable", "disable an entry (kept, but exec falls through)", cmd_enable)
    s.add_argument("name", metavar="NAME")
    s.set_defaults(enabled=False)
    daemon_cmd("list", "list every entry in the kernel", cmd_list)
    daemon_cmd("status", "the daemon's and the kernel's status", cmd_status)
    daemon_cmd("targets", "the target catalog and interpreters", cmd_targets)
    s = daemon_cmd(
        "reset",
        "remove entries",
        cmd_reset,
        "Remove what qusd registered (managed, default), every qemu-* entry (qemu, as qus' "
        "reset), or the whole table (all).",
    )
    s.add_argument("--scope", choices=["managed", "qemu", "all"], default="managed")
    _repair_and_files(daemon_cmd)

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
        help="run a command inside the daemon's (or another) sandbox",
        description="Run CMD (default: your shell) in the user and mount namespaces of "
        "process PID (default: the daemon's sandbox, from its status), so it sees that "
        "sandbox's private binfmt_misc table.",
    )
    s.add_argument(
        "--pid", type=int, help="a process in the sandbox (default: the daemon's sandbox)"
    )
    s.add_argument(
        "--force",
        action="store_true",
        help="join a sandbox another uid owns (its owner controls what its files are)",
    )
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


def _repair_and_files(daemon_cmd: Any) -> None:
    """reconcile, watch, import, export."""
    daemon_cmd(
        "reconcile",
        "reconcile now (admins)",
        cmd_reconcile,
        "Restore what another tool removed or changed, mount and enable binfmt_misc again, "
        "and register again F entries whose interpreter file was upgraded, now.",
    )
    s = daemon_cmd(
        "watch",
        "print every change as it happens",
        cmd_watch,
        "Print every change to the table (registered, unregistered, enabled, disabled, "
        "restored, drift, conflict, interpreter-updated, reconcile) until interrupted. "
        "When the daemon restarts, reconnect and go on from the last event seen.",
    )
    s.add_argument("--since", type=int, metavar="SEQ", help="first replay the events after SEQ")
    s.add_argument("--once", action="store_true", help="stop when the stream ends")
    s = daemon_cmd(
        "import",
        "register the rules of binfmt.d or update-binfmts files (admins)",
        cmd_import,
        "Read binfmt.d(5) files (as systemd-binfmt does), update-binfmts database entries "
        "(/var/lib/binfmts/NAME) or import files (/usr/share/binfmts/NAME), or every such "
        "file of a directory, and register their rules as qusd's own, all or none.",
    )
    s.add_argument("paths", nargs="+", metavar="FILE|DIR")
    s.add_argument("--no-persist", action="store_true", help="do not restore at start")
    s.add_argument("--replace", action="store_true", help="overwrite other definitions")
    s.add_argument("--force", action="store_true", help="even rules that match host programs")
    s.add_argument(
        "--allow-untrusted-interpreter",
        action="store_true",
        help="skip the root-owned-interpreter check",
    )
    s = daemon_cmd(
        "export",
        "write qusd's persistent registrations as binfmt.d files",
        cmd_export,
        "Write each registration qusd manages and restores as DIR/NAME.conf, for "
        "systemd-binfmt to register at boot (qusd then adopts them at start).",
    )
    s.add_argument("--binfmt-d", required=True, metavar="DIR", help="e.g. /etc/binfmt.d")
    s.add_argument("--all", action="store_true", help="the non-persistent ones too")


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
