"""Proving that registrations work: each registered target's built-in
program (qusd.probes) run through the kernel in a throw-away child, and
the QEMU version behind it.

A failure is explained with doctor's reasoning (the entry disabled,
binfmt_misc disabled, the interpreter missing, a rule that does not match
its own target, ...). The interpreter files F entries were registered with
(the service's records) tell an interpreter upgraded since as stale.

Standard library only: qusd-binfmt and the image use it.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from qusd import doctor, interpreters, probes
from qusd.binfmt import BinfmtMisc, Entry
from qusd.catalog import Catalog, Target
from qusd.doctor import ERROR, WARNING, Table
from qusd.errors import NotMountedError
from qusd.interpreters import FileId
from qusd.text import table

log = logging.getLogger("qusd.verify")

TIMEOUT = 30.0
#: the exit status of a verify in which a target failed
FAILED = 1


# -- the QEMU behind an interpreter ---------------------------------------------------

_VERSIONS: dict[tuple[str, int, int, int, int], str | None] = {}
_VERSION = re.compile(r"\bversion\s+(\S.*)$")


def qemu_version(path: str, timeout: float = 10) -> str | None:
    """What `interpreter -version` says (7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)),
    or None. Kept per file identity, so an upgraded file is asked again.
    Symlinks are followed first: Debian's qemu-binfmt/*-binfmt-P links
    answer only the kernel."""
    real = os.path.realpath(path)
    fid = FileId.of(real)
    if fid is None:
        return None
    key = (real, fid.dev, fid.ino, fid.size, fid.mtime_ns)
    if key not in _VERSIONS:
        _VERSIONS[key] = _ask_version(real, timeout)
    return _VERSIONS[key]


def _ask_version(path: str, timeout: float) -> str | None:
    try:
        res = subprocess.run(
            [path, "-version"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in res.stdout.splitlines()[:1]:
        found = _VERSION.search(line)
        if found:
            return found.group(1).strip()
    return None


# -- checks -------------------------------------------------------------------------------


@dataclass
class Check:
    """One target verified."""

    target: str
    ok: bool
    #: the entry the kernel handed the probe to (else the target's own)
    entry: str | None = None
    #: why it failed, with the fix; or a note when it passed
    reason: str | None = None
    interpreter: str | None = None
    flags: str | None = None
    static: bool | None = None
    qemu_version: str | None = None
    #: it ran with no entry taking it: the host runs the target itself
    native: bool = False
    #: the F interpreter file changed since registration
    stale: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Check:
        fields: dict[str, Any] = {k: doc.get(k) for k in cls.__dataclass_fields__}
        return cls(**fields)


def verify(
    kernel: BinfmtMisc,
    catalog: Catalog,
    targets: Sequence[Target] | None = None,
    fixed: Mapping[str, FileId] | None = None,
    timeout: float = TIMEOUT,
) -> list[Check]:
    """Run the probe of each target (default: every target an entry of the
    table runs) through the kernel, and say why one failed."""
    table = doctor.read_table(kernel)
    if not table.mounted:
        raise NotMountedError(
            f"binfmt_misc is not mounted at {kernel.path}, so no entry can be seen or "
            f"verified: mount it (mount -t binfmt_misc binfmt_misc {kernel.path})"
        )
    own: dict[str, list[Entry]] = {}
    for e in table.entries:
        t = catalog.of_entry(e)
        if t is not None:
            own.setdefault(t.name, []).append(e)
    chosen = list(targets) if targets is not None else [t for t in catalog if t.name in own]
    return [_check(t, table, own.get(t.name, []), fixed or {}, timeout) for t in chosen]


def _check(
    target: Target, table: Table, own: list[Entry], fixed: Mapping[str, FileId], timeout: float
) -> Check:
    name = target.name
    if name not in probes.ARCHES or name in probes.UNAVAILABLE:
        why = probes.UNAVAILABLE.get(name, "not a target qusd has a program for")
        return Check(name, False, reason=f"no built-in program for {name}: {why}")
    program = probes.program(name)
    picked, disabled = doctor.pick(table.entries, program) if table.enabled else (None, [])
    entry = picked or (own[0] if own else None)
    happened, ok = _run(program, timeout)
    check = Check(name, ok, entry.name if entry else None)
    if entry is not None:
        check.interpreter, check.flags = entry.interpreter, entry.flags
        check.static = interpreters.is_static_elf(os.path.realpath(entry.interpreter))
        check.qemu_version = qemu_version(entry.interpreter)
    findings = (
        doctor.interpreter_findings(picked, table, "/", fixed.get(picked.name), _again(target))
        if picked is not None
        else []
    )
    stale = [f for f in findings if f.code == "interpreter-stale"]
    check.stale = str(stale[0]) if stale else None
    if ok:
        if picked is None:
            check.native = True
            check.reason = "it ran with no entry taking it: the host runs it itself"
        elif picked not in own:
            check.reason = f"it ran through {picked.name}, a newer entry that matches it too"
        return check
    cause = _cause(target, table=table, picked=picked, disabled=disabled, own=own,
                   findings=findings)  # fmt: skip
    check.reason = f"{happened}: {cause}" if cause else happened
    return check


def _again(target: Target) -> str:
    return f"qusctl unregister {target.entry_name}, then qusctl register {target.name}"


def _run(program: bytes, timeout: float) -> tuple[str, bool]:
    """What happened when the kernel was asked to run it, in words; and ok."""
    try:
        res = probes.run(program, timeout=timeout)
    except OSError as e:
        return f"the kernel refused it: {e.strerror}", False
    except subprocess.TimeoutExpired:
        return f"it did not finish in {timeout:g} s", False
    if res.ok:
        return "it ran", True
    said = res.stderr.decode(errors="replace").strip().splitlines()[-1:]
    tail = f" ({said[0]})" if said else ""
    if res.status < 0:
        return f"it was killed by signal {-res.status}{tail}", False
    if res.status != probes.EXPECTED_STATUS:
        return f"it exited with status {res.status}{tail}", False
    return f"it printed {res.stdout[:60]!r} instead of the expected words", False


def _cause(
    target: Target,
    *,
    table: Table,
    picked: Entry | None,
    disabled: list[Entry],
    own: list[Entry],
    findings: list[doctor.Finding],
) -> str:
    if not table.enabled:
        return (
            f"binfmt_misc is disabled ({table.path}/status): the kernel skips every entry; "
            f"enable it: echo 1 > {table.path}/status"
        )
    if picked is not None:
        errors = [str(f) for f in findings if f.level == ERROR]
        errors += [str(f) for f in findings if f.level == WARNING]
        return "; ".join(errors)
    if disabled:
        names = ", ".join(e.name for e in disabled)
        return f"{names} is disabled: the kernel skips it; qusctl enable {disabled[0].name}"
    if own:
        return (
            f"{own[0].name}'s rule does not match {target.name} programs; register "
            f"{target.name} from a table whose rule does (qusd's catalog = binfmt.d)"
        )
    return f"no entry runs {target.name}: register it (qusctl register {target.name})"


# -- for people --------------------------------------------------------------------------


def render(checks: Sequence[Check]) -> str:
    """A table, then one line per failure or note."""
    if not checks:
        return "nothing registered to verify"
    rows = [
        [
            c.target,
            "ok" if c.ok else "FAILED",
            c.entry or "-",
            c.interpreter or "-",
            "-" if c.static is None else "static" if c.static else "dynamic",
            c.qemu_version or "-",
        ]
        for c in checks
    ]
    lines = [table(rows, ["TARGET", "RESULT", "ENTRY", "INTERPRETER", "LINKING", "QEMU"])]
    for c in checks:
        lines += [f"{c.target}: {note}" for note in (c.reason, c.stale) if note]
    return "\n".join(lines)
