"""Which targets the host runs itself, found by trying.

The family table (qemu-binfmt-conf.sh's) says an x86_64 host runs i386 and
an aarch64 host runs arm. Neither always holds: a kernel booted with
ia32_emulation=0 refuses 32-bit x86 programs, an AArch64-only CPU has no
32-bit arm (qus #4). So each target's built-in program (qusd.probes) is run
with no binfmt_misc entry that could take it: in a fresh sandbox whose table
is empty (Linux >= 6.7), else here for the targets no entry here matches;
what cannot be tried is left to the family table, and the settings override
any target.

    python -m qusd.native [TARGET...]   # in a new sandbox: JSON {target: [native, detail]}

Standard library only: qusd-binfmt and the image use it.
"""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from qusd import doctor, probes, sandbox
from qusd.binfmt import DEFAULT_PATH, BinfmtMisc
from qusd.catalog import Catalog, Target, canonical_name
from qusd.errors import QusdError

PROBE, FAMILY, SETTING = "probe", "family", "setting"
HOW = (PROBE, FAMILY, SETTING)
TIMEOUT = 10.0


@dataclass(frozen=True)
class Verdict:
    """Whether the host runs a target itself, how that was decided, and why."""

    native: bool
    how: str
    detail: str


def by_family(target: Target, host_family: str) -> Verdict:
    same = target.family == host_family
    return Verdict(
        same,
        FAMILY,
        f"by the family table: {target.family} is {'' if same else 'not '}the host's family "
        f"({host_family})",
    )


#: one try: True ran, False the kernel refused it, None undecided; and why
Tried = tuple[bool | None, str]


def try_here(names: Iterable[str], timeout: float = TIMEOUT) -> dict[str, Tried]:
    """Run each target's probe in this process's namespaces."""
    out: dict[str, Tried] = {}
    for name in names:
        try:
            res = probes.run(probes.program(name), timeout=timeout)
        except OSError as e:
            if e.errno == errno.ENOEXEC:
                out[name] = (False, "the kernel answers 'Exec format error'")
            else:
                out[name] = (None, f"it could not be started: {e.strerror}")
            continue
        except subprocess.TimeoutExpired:
            out[name] = (None, f"it did not finish in {timeout:g} s")
            continue
        if res.ok:
            out[name] = (True, "its built-in program ran")
        elif res.status == -signal.SIGSYS:
            # the kernel loaded it; a seccomp filter over us (systemd's
            # SystemCallArchitectures=native) refused its system calls
            out[name] = (True, "the kernel loads its built-in program (a seccomp filter "
                               "here refuses its system calls)")  # fmt: skip
        else:
            out[name] = (False, f"its built-in program was loaded but failed ({_status(res)})")
    return out


def _status(res: probes.Result) -> str:
    if res.status < 0:
        return f"killed by signal {-res.status}"
    return f"exit status {res.status}"


_SANDBOX_CACHE: dict[tuple[str, ...], dict[str, Tried]] = {}


def try_in_sandbox(names: Sequence[str], timeout: float = 60) -> dict[str, Tried] | str:
    """Run the probes in a new sandbox with an empty table; the answer, or
    why no sandbox could be made. The answer does not depend on any table,
    so it is kept for the life of the process."""
    key = tuple(names)
    if key in _SANDBOX_CACHE:
        return _SANDBOX_CACHE[key]
    try:
        res = subprocess.run(
            [sys.executable, "-m", "qusd.native", *names],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the sandbox did not answer: {e}"
    if res.returncode != 0:
        said = res.stderr.strip().splitlines()[-1:] or [f"exit status {res.returncode}"]
        return said[0].removeprefix("qusd native: ")
    try:
        doc = json.loads(res.stdout)
        got = {str(k): (v[0], str(v[1])) for k, v in doc.items()}
    except (ValueError, TypeError, IndexError, AttributeError):
        return "the sandbox answered nonsense"
    _SANDBOX_CACHE[key] = got
    return got


def _free_here(names: Sequence[str], kernel: BinfmtMisc) -> tuple[list[str], str]:
    """The targets whose probe no entry of this table would take (all, when
    binfmt_misc is disabled), or none when the table cannot be read."""
    table = doctor.read_table(kernel)
    if not table.mounted:
        if not table.available:
            return list(names), ""
        return [], f"binfmt_misc is not mounted at {kernel.path}, so its entries are unknown"
    if not table.enabled:
        return list(names), ""
    free = [n for n in names if doctor.pick(table.entries, probes.program(n))[0] is None]
    return free, "an entry here would take its built-in program"


def detect(
    catalog: Catalog,
    host_family: str,
    *,
    native_targets: Iterable[str] = (),
    emulated_targets: Iterable[str] = (),
    probe: bool = True,
    kernel: BinfmtMisc | None = None,
) -> dict[str, Verdict]:
    """A verdict for every catalog target: the settings first, then a probe
    run where no entry can take it, else the family table."""
    forced_native = {canonical_name(n) for n in native_targets}
    forced_emulated = {canonical_name(n) for n in emulated_targets}
    todo = [
        t.name
        for t in catalog
        if t.name in probes.ARCHES
        and t.name not in probes.UNAVAILABLE
        and t.name not in forced_native | forced_emulated
    ]
    tried: dict[str, Tried] = {}
    where, untried = "", "not tried: probing is off in the settings (detect_native)"
    if probe and todo:
        got = try_in_sandbox(todo)
        if isinstance(got, dict):
            tried, where = got, "with an empty binfmt_misc table, in a sandbox"
        else:
            free, why = _free_here(todo, kernel or BinfmtMisc(DEFAULT_PATH))
            tried = try_here(free)
            where = "here, where no binfmt_misc entry takes it"
            untried = f"not tried: no sandbox ({got}) and {why}"
    out: dict[str, Verdict] = {}
    for t in catalog:
        result = tried.get(t.name, (None, untried))
        if t.name in forced_native:
            out[t.name] = Verdict(True, SETTING, "native_targets in the settings")
        elif t.name in forced_emulated:
            out[t.name] = Verdict(False, SETTING, "emulated_targets in the settings")
        elif result[0] is not None:
            out[t.name] = Verdict(result[0], PROBE, f"{result[1]} {where}")
        else:
            fam = by_family(t, host_family)
            out[t.name] = Verdict(fam.native, FAMILY, f"{fam.detail}; {result[1]}")
    return out


def as_function(verdicts: Mapping[str, Verdict], host_family: str) -> Callable[[Target], Verdict]:
    """Verdicts as doctor.Context wants them (the family for the unknown)."""
    return lambda t: verdicts.get(t.name) or by_family(t, host_family)


def tried_one_by_one(host_family: str, kernel: BinfmtMisc) -> Callable[[Target], Verdict]:
    """Verdicts found when first asked for, one target at a time (a
    command that looks at one program need not try all 34)."""
    found: dict[str, Verdict] = {}

    def verdict(target: Target) -> Verdict:
        if target.name not in found:
            found.update(detect(Catalog((target,)), host_family, kernel=kernel))
        return found[target.name]

    return verdict


def main(argv: Sequence[str] | None = None) -> int:
    """In a new sandbox (an empty table), try each target; print JSON."""
    names = list(sys.argv[1:] if argv is None else argv) or probes.available()
    try:
        sandbox.create(DEFAULT_PATH, identity=False)
    except QusdError as e:
        print(f"qusd native: {e.message}", file=sys.stderr)
        return e.exit_status
    print(json.dumps(try_here(names)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
