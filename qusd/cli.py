"""qusctl: the command-line client.

A thin shell: it parses arguments, calls the layer below, and turns a
QusdError into a one-line message and the error's exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from qusd import __version__, catalog, interchange, interpreters, sandbox
from qusd.binfmt import DEFAULT_PATH, BinfmtMisc, Rule
from qusd.client import DEFAULT_SOCKET, Client, default_socket
from qusd.errors import (
    DaemonUnavailableError,
    HostTypeError,
    NoSuchEntryError,
    QusdError,
)
from qusd.policy import native_headers
from qusd.text import DIRECTORY, FILE, complete, reader_gone, table, words

if TYPE_CHECKING:
    from qusd.doctor import Context, Finding


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
    if not catalog.wants_all(ns.targets):  # no target, or "all": every foreign one
        body["targets"] = ns.targets
    if ns.flags is not None:
        body["flags"] = ns.flags
    doc = Client(ns.socket).request("POST", "/v1/registrations", body)
    rows = [[*row, "registered"] for row in _reg_rows(doc["registered"])]
    rows += [[*row, "unchanged"] for row in _reg_rows(doc["unchanged"])]
    _out(ns, doc, table(rows, [*REG_HEADERS, "RESULT"]) if rows else "nothing to register")
    return 0


def cmd_unregister(ns: argparse.Namespace) -> int:
    client, status, gone = Client(ns.socket), 0, []
    for name in ns.names:
        try:
            client.request("DELETE", f"/v1/registrations/{quote(name, safe='')}")
            gone.append(name)
            if not ns.json:
                print(f"unregistered {name}")
        except QusdError as e:
            print(f"qusctl: {e.message}", file=sys.stderr)
            status = status or e.exit_status
    if ns.json:
        print(json.dumps({"unregistered": gone}, indent=2))
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
            t.get("native_by") or "-",
            t["interpreter"] or "-",
            "-" if t["static"] is None else "static" if t["static"] else "dynamic",
            (t.get("provisioned") or {}).get("version", "-"),
        ]
        for t in ts
    ]
    headers = ["TARGET", "FAMILY", "NATIVE", "DECIDED", "INTERPRETER", "LINKING", "PROVISIONED"]
    _out(ns, ts, table(rows, headers))
    return 0


def cmd_verify(ns: argparse.Namespace) -> int:
    from qusd import verify  # noqa: PLC0415 - what only this command needs

    body = {"targets": ns.targets} if ns.targets else {}
    doc = Client(ns.socket, timeout=600).request("POST", "/v1/verify", body)
    _out(ns, doc, verify.render([verify.Check.from_json(r) for r in doc["results"]]))
    return 0 if doc["ok"] else verify.FAILED


def cmd_doctor(ns: argparse.Namespace) -> int:
    from qusd import doctor  # noqa: PLC0415

    kernel = BinfmtMisc(ns.binfmt_path)
    context, notes = _doctor_context(ns.socket, kernel)
    args = ns.argv if ns.argv or ns.run else None
    findings = notes + doctor.diagnose(ns.file, kernel, root=ns.root, args=args, context=context)
    _out(ns, [f.to_json() for f in findings], doctor.render(findings))
    return doctor.exit_status(findings)


def _doctor_context(socket: str, kernel: BinfmtMisc) -> tuple[Context, list[Finding]]:
    """What the daemon knows, when it answers: how the host runs each target,
    the files its F entries hold, what it manages; else the local view."""
    from qusd import doctor, native  # noqa: PLC0415
    from qusd.errors import DaemonUnavailableError, SocketPermissionError  # noqa: PLC0415

    family = catalog.family_of(catalog.host_machine())
    client = Client(socket, timeout=60)
    try:
        status = client.get("/v1/status")
    except (DaemonUnavailableError, SocketPermissionError) as e:
        note = doctor.Finding(doctor.INFO, "daemon", f"diagnosed without qusd ({e.reason})")
        return doctor.Context(native=native.tried_one_by_one(family, kernel)), [note]
    verdicts = {
        t["name"]: native.Verdict(
            t["native"], t.get("native_by") or native.FAMILY, t.get("native_detail") or ""
        )
        for t in client.get("/v1/targets")
    }
    ctx = doctor.Context(native=native.as_function(verdicts, family))
    notes: list[doctor.Finding] = []
    box = status.get("sandbox")
    if box and not sandbox.same_user_namespace(box["pid"]):
        notes.append(doctor.Finding(doctor.WARNING, "sandbox",
            f"qusd runs in a sandbox (pid {box['pid']}): its entries apply only to programs "
            "run inside it; this diagnosis is of the table outside",
            "run the program inside: qusctl run -- PROGRAM (or qusctl run -- qusctl doctor "
            "FILE)"))  # fmt: skip
        return ctx, notes
    with contextlib.suppress(QusdError):
        ctx.managed = frozenset(r["name"] for r in client.get("/v1/registrations") if r["managed"])
    with contextlib.suppress(QusdError):
        fixed = client.get("/v1/interpreters")["fixed"]
        ctx.fixed = {f["entry"]: interpreters.FileId.from_json(f) for f in fixed}
    return ctx, notes


def cmd_interpreters(ns: argparse.Namespace) -> int:
    client = Client(ns.socket, timeout=1800)  # a download of some 60 MB
    if ns.action == "install":
        body: dict[str, Any] = {"targets": ns.targets}
        if ns.deb:
            body["deb"] = os.path.abspath(ns.deb)
        doc = client.request("POST", "/v1/interpreters", body)
        items = doc["installed"]
    else:
        doc = client.get("/v1/interpreters")
        items = doc["provisioned"]
    rows = [
        [i["path"], ",".join(i["targets"]), i["version"], i["sha256"]] for i in items
    ]  # fmt: skip
    human = table(rows, ["INTERPRETER", "TARGETS", "VERSION", "SHA256"]) if rows else (
        f"no provisioned interpreters in {doc.get('store') or '(no store)'}"
    )  # fmt: skip
    _out(ns, doc, human)
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


SANDBOX_FIX = "install qemu-user-static or pass --interpreter-dir"


def cmd_sandbox(ns: argparse.Namespace) -> int:
    argv = _command(ns)
    cat = catalog.load(ns.catalog)
    family = catalog.family_of(catalog.host_machine())
    dirs = ns.interpreter_dir or interpreters.DEFAULT_DIRS
    targets = (
        interpreters.chosen(cat, ns.register, family, dirs, SANDBOX_FIX) if ns.register else []
    )
    rules = []
    for t in targets:
        interp = interpreters.require(t, dirs, SANDBOX_FIX)
        rule = t.rule(interp.path, ns.flags)
        rule.encode()  # a bad flag fails here, before the sandbox is made
        # The host's own type would send every exec in the sandbox, QEMU's
        # own included, back to QEMU: the kernel gives up with ELOOP.
        if any(rule.matches(h) for h in native_headers(cat, family, [interp.path, "/bin/sh"])):
            raise HostTypeError(
                f"{t.name} is of the host's own family ({family}): in the sandbox every "
                f"program, {interp.path} included, would be handed to {interp.path} and fail "
                "with 'Too many levels of symbolic links'; register foreign targets only"
            )
        rules.append(rule)
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


def _emulation_commands(command: Any, common: argparse.ArgumentParser) -> None:
    """verify, interpreters and doctor: proving and explaining emulation."""
    s = command(
        "verify",
        "prove that registered targets run",
        cmd_verify,
        "Run each registered target's built-in test program (or each TARGET's) through the "
        "kernel, in the daemon's sandbox if it has one, and report ok or the reason it failed, "
        "with the interpreter and the QEMU version behind it. Exit status 1 when one failed.",
    )
    complete(s.add_argument("targets", nargs="*", metavar="TARGET"), TARGETS)
    s = command(
        "interpreters",
        "install or list qusd's own interpreters",
        cmd_interpreters,
        "qusd's own interpreter directory (interpreter_store), searched first.",
    )
    actions = s.add_subparsers(dest="action", metavar="ACTION", required=True)
    i = actions.add_parser(
        "install",
        parents=[common],
        help="extract interpreters from qemu-user-static (admins)",
        description="Extract only the named targets' interpreters from a qemu-user-static "
        "package (--from FILE, or Debian's, downloaded with apt-get by the daemon into its "
        "interpreter_cache) into the daemon's interpreter_store, recording version and sha256.",
    )
    complete(i.add_argument("targets", nargs="+", metavar="TARGET"), TARGETS)
    complete(i.add_argument("--from", dest="deb", metavar="FILE", help="the package file (a .deb)"),
             FILE)  # fmt: skip
    actions.add_parser(
        "list",
        parents=[common],
        help="what interpreters install put there",
        description="The provisioned interpreters, their version and sha256.",
    )
    s = command(
        "doctor",
        "say why a program does not run",
        cmd_doctor,
        "Why does FILE fail to run? Names its target, the binfmt_misc entry the "
        "kernel would pick (newest first) or that none does, and each cause with its fix: "
        "binfmt_misc disabled or not mounted, the entry disabled, the interpreter missing, "
        "not executable, dynamic in a chroot, stale after an upgrade, matching itself, the "
        "program's loader missing. Works without the daemon; uses it when it answers. Exit "
        "status 1 when something is in the way.",
    )
    complete(s.add_argument("file", metavar="FILE"), FILE)
    complete(s.add_argument("--root", default="/", metavar="DIR",
                            help="the program runs chrooted to DIR (FILE is a path inside it)"),
             DIRECTORY)  # fmt: skip
    s.add_argument("--run", action="store_true", help="run it first (implied by -- ARGS)")
    s.add_argument("--binfmt-path", default=DEFAULT_PATH, help=argparse.SUPPRESS)
    s.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- ARGS")


#: target names, for the shell completion (qusd.text.complete)
TARGETS = words("targets", catalog.completion_names())


def global_options(p: argparse.ArgumentParser, sub: bool) -> None:
    """The options that go before or after the command alike. The
    subcommands' copies default to SUPPRESS, so a value given before the
    command is not reset after it."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if sub else value

    complete(
        p.add_argument(
            "--socket",
            default=default(default_socket()),
            metavar="PATH",
            help=f"the daemon's socket (default: $QUSD_SOCKET or {DEFAULT_SOCKET})",
        ),
        FILE,
    )
    p.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON (the API's)"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qusctl",
        description="Manage QEMU user-mode emulation (binfmt_misc) with qusd. Options "
        "go before or after the command.",
    )
    p.add_argument("--version", action="version", version=f"qusctl {__version__}")
    global_options(p, sub=False)
    common = argparse.ArgumentParser(add_help=False)
    global_options(common, sub=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, help: str, func: Any, description: str | None = None, json: bool = True
    ) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=description or help, parents=[common])
        c.set_defaults(func=func, prints_json=json)
        return c

    s = command(
        "register",
        "register targets",
        cmd_register,
        "Register QEMU targets (names or aliases: arm64, linux/arm/v7, ...). With no target, "
        "or 'all', every target of another family than the host's that has an interpreter. "
        "An identical existing entry is left unchanged.",
    )
    complete(s.add_argument("targets", nargs="*", metavar="TARGET"), TARGETS)
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
    s = command("unregister", "remove entries", cmd_unregister)
    s.add_argument("names", nargs="+", metavar="NAME")
    s = command("enable", "enable an entry", cmd_enable)
    s.add_argument("name", metavar="NAME")
    s.set_defaults(enabled=True)
    s = command("disable", "disable an entry (kept, but exec falls through)", cmd_enable)
    s.add_argument("name", metavar="NAME")
    s.set_defaults(enabled=False)
    command("list", "list every entry in the kernel", cmd_list)
    command("status", "the daemon's and the kernel's status", cmd_status)
    command("targets", "the target catalog and interpreters", cmd_targets)
    s = command(
        "reset",
        "remove entries",
        cmd_reset,
        "Remove what qusd registered (managed, default), every qemu-* entry (qemu, as qus' "
        "reset), or the whole table (all).",
    )
    s.add_argument("--scope", choices=["managed", "qemu", "all"], default="managed")
    _repair_and_files(command)

    s = command(
        "identify",
        "name the target that runs each file",
        cmd_identify,
        "Without the daemon: print, for each file, the QEMU target whose magic/mask matches "
        "its header, 'native' when the host runs it itself, or 'no match'.",
    )
    complete(s.add_argument("files", nargs="+", metavar="FILE"), FILE)
    s.add_argument(
        "--catalog",
        choices=["builtin", "binfmt.d"],
        default="builtin",
        help="the target table: qusd's built-in copy of QEMU's, or the system's binfmt.d "
        "qemu-*.conf files (default: builtin)",
    )
    s.add_argument("--host", metavar="MACHINE", help="judge nativeness for this `uname -m`")

    _emulation_commands(command, common)

    s = command(
        "run",
        "run a command inside the daemon's (or another) sandbox",
        cmd_run,
        "Run CMD (default: your shell) in the user and mount namespaces of process PID "
        "(default: the daemon's sandbox, from its status), so it sees that sandbox's private "
        "binfmt_misc table.",
        json=False,
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

    s = command(
        "sandbox",
        "run a command in a new sandbox with a private binfmt_misc",
        cmd_sandbox,
        "Without the daemon and without privilege (Linux >= 6.7): run CMD (default: your "
        "shell) in a new user + mount namespace with its own binfmt_misc table, after "
        "registering the targets given with --register ('all': every foreign target that "
        "has an interpreter). Nothing outside the sandbox changes.",
        json=False,
    )
    complete(
        s.add_argument(
            "--register",
            action="append",
            metavar="TARGET",
            help="register this target first (repeatable; aliases such as arm64 work; "
            "'all': every foreign target with an interpreter)",
        ),
        TARGETS,
    )
    s.add_argument("--flags", default="F", help="flags for --register (default: F)")
    s.add_argument("--catalog", choices=["builtin", "binfmt.d"], default="builtin")
    complete(
        s.add_argument(
            "--interpreter-dir",
            action="append",
            metavar="DIR",
            help="where to look for qemu-<cpu>[-static] (repeatable; default: "
            + ", ".join(interpreters.DEFAULT_DIRS)
            + ")",
        ),
        DIRECTORY,
    )
    s.add_argument("--binfmt-path", default=DEFAULT_PATH, help=argparse.SUPPRESS)
    s.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ...")
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
    complete(s.add_argument("paths", nargs="+", metavar="FILE|DIR"), FILE)
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
    complete(
        s.add_argument("--binfmt-d", required=True, metavar="DIR", help="e.g. /etc/binfmt.d"),
        DIRECTORY,
    )
    s.add_argument("--all", action="store_true", help="the non-persistent ones too")


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    ns = p.parse_args(argv)
    if ns.json and not ns.prints_json:
        p.error(f"{ns.command} runs a command and prints no JSON: drop --json")
    try:
        status: int = ns.func(ns)
        sys.stdout.flush()
    except BrokenPipeError:
        reader_gone()
    except QusdError as e:
        print(f"qusctl: {e.message}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
