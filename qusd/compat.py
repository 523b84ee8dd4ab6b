"""What the tools qusd replaces mean, in qusd's terms, and the GitHub Action.

docker/setup-qemu-action and tonistiigi/binfmt speak of OCI platforms
(`linux/arm64`, `linux/arm/v7`) and treat an entry that already serves a
platform as done (qusd.provide decides when one does); qus and the Action
speak of QEMU targets. This module maps one onto the other, and holds
tonistiigi/binfmt's command (`qusd-binfmt --install/--uninstall` and its
status JSON) and the GitHub Action: `python -m qusd.compat github-action` is
the Action's step (run by packaging/action/register.sh as root): it reads
the inputs from QUSD_* variables, registers through qusd.provide, prints
every outcome as a table, annotates failures and writes the step's outputs.

Standard library only, and Python >= 3.10 (what runners and qusd-binfmt have).
"""

from __future__ import annotations

import json
import os
import re
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from qusd import catalog, interpreters, provide, table, verify
from qusd.binfmt import DEFAULT_PATH, BinfmtMisc, Entry, Rule
from qusd.catalog import Catalog, Target, is_qemu_entry
from qusd.errors import InterpreterError, NoSuchEntryError, QusdError
from qusd.provide import Result
from qusd.text import table as text_table

#: QEMU target -> the OCI platforms it runs, in the order buildkit (and so
#: tonistiigi/binfmt and setup-qemu-action) lists them; the Go architectures
#: buildkit does not probe follow.
PLATFORMS: dict[str, tuple[str, ...]] = {
    "x86_64": ("linux/amd64",),
    "aarch64": ("linux/arm64",),
    "riscv64": ("linux/riscv64",),
    "ppc64le": ("linux/ppc64le",),
    "s390x": ("linux/s390x",),
    "i386": ("linux/386",),
    "mips64el": ("linux/mips64le",),
    "mips64": ("linux/mips64",),
    "loongarch64": ("linux/loong64",),
    "arm": ("linux/arm/v7", "linux/arm/v6"),
    "ppc64": ("linux/ppc64",),
    "mips": ("linux/mips",),
    "mipsel": ("linux/mipsle",),
}

_AMD64_LEVEL = re.compile(r"(linux/)?(amd64|x86_64)/v[1-4]")


def split_words(text: str) -> list[str]:
    """Names separated by spaces, commas or newlines (YAML blocks, CSV)."""
    return [w for w in re.split(r"[\s,]+", text) if w]


def platform_target(platform: str) -> str:
    """A target name for an OCI platform or a target name (the catalog knows
    the aliases); amd64's micro-architecture levels all run on qemu-x86_64."""
    if _AMD64_LEVEL.fullmatch(platform.strip().lower()):
        return "x86_64"
    return platform


def platforms_of(target: str) -> tuple[str, ...]:
    return PLATFORMS.get(target, ())


def runs(entry: Entry, target: Target) -> bool:
    """Whether the entry runs the target's programs, in containers too: it
    is enabled, matches them and its interpreter is statically linked."""
    return (
        provide.entry_matches(entry, target)
        and interpreters.is_static_elf(entry.interpreter) is True
    )


def available_platforms(entries: Sequence[Entry], cat: Catalog, host_family: str) -> list[str]:
    """The platforms this host runs, as setup-qemu-action reports them: its
    own first, then every platform an entry runs (whoever registered it)."""
    order = [p for ps in PLATFORMS.values() for p in ps]
    native = [p for t in cat if t.family == host_family for p in platforms_of(t.name)]
    emulated = [
        p
        for t in cat
        if t.family != host_family and any(runs(e, t) for e in entries)
        for p in platforms_of(t.name)
    ]
    found: list[str] = []
    for p in sorted(native, key=order.index) + sorted(emulated, key=order.index):
        if p not in found:
            found.append(p)
    return found


# -- tonistiigi/binfmt ---------------------------------------------------------

#: tonistiigi/binfmt registers with C and F; qusd with F alone (binfmt #342):
#: C runs the interpreter with a set-uid program's privileges.
INSTALL_FLAGS = "F"
INSTALL_INTERPRETER_FIX = "set QEMU_BINARY_PATH to the directory that holds them"
INSTALL_FIX = "remove it first (--uninstall NAME) or register it with `register --replace`"


def status(entries: Sequence[Entry], cat: Catalog, host_family: str) -> dict[str, list[str]]:
    """tonistiigi/binfmt's status: the platforms this host runs, and the
    enabled entries (every one, as it lists them)."""
    return {
        "supported": available_platforms(entries, cat, host_family),
        "emulators": [e.name for e in entries if e.enabled],
    }


def install_targets(spec: str, cat: Catalog, host_family: str, dirs: Sequence[str]) -> list[Target]:
    """--install's targets: platforms or targets, comma separated; `all`:
    every foreign target with an interpreter."""
    names = split_words(spec)
    if "all" in names:
        everything = interpreters.foreign_with_interpreters(cat, host_family, dirs)
        names = [n for n in names if n != "all"] + [t.name for t in everything]
    return cat.resolve(platform_target(n) for n in names)


def uninstall_entries(spec: str, entries: Sequence[Entry], cat: Catalog) -> list[Entry]:
    """--uninstall's entries, for each comma-separated item: the entry of
    that exact name (any entry), else the qemu-* entry of the target or
    platform it names (arm64: qemu-aarch64), else the qemu-* entries the glob
    matches: `*` never reaches another tool's entries (binfmt #315)."""
    chosen: dict[str, Entry] = {}
    for item in split_words(spec):
        found = [e for e in entries if e.name == item]
        if not found:
            t = cat.find(platform_target(item))
            found = [e for e in entries if t is not None and e.name == t.entry_name]
        if not found:
            found = [e for e in entries if is_qemu_entry(e.name) and fnmatchcase(e.name, item)]
        if not found:
            raise NoSuchEntryError(
                f"--uninstall {item}: no entry has that name, and no qemu-* entry matches it "
                "(qusd-binfmt list shows them)",
                name=item,
            )
        chosen.update((e.name, e) for e in found)
    return list(chosen.values())


def binfmt(
    kernel: BinfmtMisc, install: str | None, uninstall: str | None, env: Mapping[str, str],
    dirs: Sequence[str],
) -> int:  # fmt: skip
    """tonistiigi/binfmt's run: uninstall, then install (each all or none),
    a line per entry on stderr, then the status JSON on stdout, always.
    Unlike it: a failure exits non-zero, entries that already serve a
    target are reported and kept, and binfmt_misc stays mounted."""
    cat = catalog.builtin()
    host_family = catalog.family_of(catalog.host_machine())
    code = 0
    try:
        if uninstall:
            gone = uninstall_entries(uninstall, kernel.entries(), cat)
            with table.Transaction(kernel) as tx:
                for e in gone:
                    tx.remove(e)
            for e in gone:
                print(f"uninstalling: {e.name} OK", file=sys.stderr)
        if install:
            if env.get("QEMU_BINARY_PATH"):
                dirs = [env["QEMU_BINARY_PATH"]]
            flags = INSTALL_FLAGS + ("P" if env.get("QEMU_PRESERVE_ARGV0") else "")
            targets = install_targets(install, cat, host_family, dirs)
            steps = provide.ensure(kernel, targets, dirs, flags, fix=INSTALL_FIX,
                                   interpreter_fix=INSTALL_INTERPRETER_FIX)  # fmt: skip
            for step in steps:
                name, flags, interpreter = step.shown()
                print(f"installing: {step.target.name} OK ({step.result.value}: {name}, "
                      f"flags {flags or '(none)'}, {interpreter})", file=sys.stderr)  # fmt: skip
    except QusdError as e:
        print(f"qusd-binfmt: {e.message}", file=sys.stderr)
        code = e.exit_status
    try:
        print(json.dumps(status(kernel.entries(), cat, host_family), indent=2))
    except QusdError as e:
        print(f"qusd-binfmt: {e.message}", file=sys.stderr)
        code = code or e.exit_status
    return code


# -- the GitHub Action --------------------------------------------------------


@dataclass
class Outcome:
    """One requested target and what became of it."""

    target: Target
    entry: str = "-"
    flags: str = "-"
    result: str = "not registered"
    interpreter: str = "-"

    def found(self, name: str, flags: str, interpreter: str, result: str) -> None:
        self.entry, self.flags, self.interpreter = name, flags or "-", interpreter
        self.result = result

    def cells(self) -> list[str]:
        return [self.target.name, self.entry, self.flags, self.result, self.interpreter]


def _truthy(name: str, value: str, default: bool) -> bool:
    v = value.strip().lower()
    if not v:
        return default
    if v in ("true", "yes", "1", "on"):
        return True
    if v in ("false", "no", "0", "off"):
        return False
    raise QusdError(f"input {name}: {value!r} is not a boolean; use true or false")


def _annotate(message: str) -> None:
    """A workflow command: the runner turns it into an error annotation."""
    text = message.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    print(f"::error title=qusd binfmt::{text}", flush=True)


def _set_output(path: str, name: str, value: str) -> None:
    """Append name=value to $GITHUB_OUTPUT, in the multi-line form with a
    delimiter the value cannot contain (as @actions/core does)."""
    delimiter = f"ghadelimiter_{uuid.uuid4()}"
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{name}<<{delimiter}\n{value}\n{delimiter}\n")


def _requested(
    env: Mapping[str, str], cat: Catalog, host_family: str, dirs: Sequence[str]
) -> list[Target]:
    """The targets the inputs name: targets and platforms together; none or
    `all`: every foreign target that has an interpreter."""
    names = split_words(env.get("QUSD_TARGETS", "")) + [
        platform_target(p) for p in split_words(env.get("QUSD_PLATFORMS", ""))
    ]
    if not names or "all" in names:
        everything = interpreters.foreign_with_interpreters(cat, host_family, dirs)
        names = [n for n in names if n != "all"] + [t.name for t in everything]
    return cat.resolve(names)


def _no_interpreter(t: Target, dirs: Sequence[str]) -> InterpreterError:
    return InterpreterError(
        f"no interpreter for {t.name}: no {' or '.join(interpreters.candidates(t))} "
        f"in {', '.join(dirs)}; install qemu-user-static (the "
        f"Action does when no QEMU interpreter is present) or drop {t.name} from the "
        "inputs",
        target=t.name,
    )


def _plan(
    outcomes: list[Outcome], kernel: provide.Listing, flags: str, *, replace: bool,
    host_family: str, dirs: Sequence[str],
) -> tuple[list[provide.Step], list[str]]:  # fmt: skip
    """What registering the foreign targets means (provide.plan), shown in
    the outcomes; and the errors that stop it all."""
    wants: list[tuple[Target, Rule | QusdError]] = []
    for o in outcomes:
        t = o.target
        if t.family == host_family:
            o.result = "native"
            continue
        found = interpreters.find(t, dirs)
        wants.append((t, _no_interpreter(t, dirs) if found is None else t.rule(found.path, flags)))
    steps = provide.plan(kernel, wants, flags, replace)
    errors: list[str] = []
    for step in steps:
        problem = step.problem("set the input `replace: true` to replace it")
        if problem is not None:
            errors.append(problem.message)
        if step.result in (Result.REGISTERED, Result.REPLACED):
            path = step.shown()[2]
            if interpreters.is_static_elf(path) is not True:
                print(
                    f"::warning title=qusd binfmt::{path} is dynamically linked: "
                    f"{step.target.name} programs in containers will not find its libraries; "
                    "install qemu-user-static",
                    flush=True,
                )
    _show(outcomes, steps)
    return steps, errors


def _show(outcomes: list[Outcome], steps: Sequence[provide.Step]) -> None:
    """Each step in its target's outcome. An entry kept as it was is
    "provided" in the Action's words, whoever registered it."""
    by_target = {o.target.name: o for o in outcomes}
    for step in steps:
        o = by_target[step.target.name]
        if step.result is Result.NO_INTERPRETER:
            o.result = step.result.value
        elif step.entry is not None:
            shown = Result.PROVIDED if step.result is Result.UNCHANGED else step.result
            o.found(*step.shown(), shown.value)


def github_action(env: Mapping[str, str], binfmt_path: str = DEFAULT_PATH) -> int:
    """The Action's step: 0 when every requested target is provided, else 1
    with an annotation per problem; the outputs are written either way."""
    flags = env.get("QUSD_FLAGS", "").strip() or "F"
    cat = catalog.builtin()
    host_family = catalog.family_of(catalog.host_machine())
    dirs = provide.interpreter_dirs(env)
    kernel = BinfmtMisc(binfmt_path)
    outcomes: list[Outcome] = []
    steps: list[provide.Step] = []
    errors: list[str] = []
    try:
        replace = _truthy("replace", env.get("QUSD_REPLACE", ""), True)
        outcomes = [Outcome(t) for t in _requested(env, cat, host_family, dirs)]
        kernel = provide.mounted(binfmt_path)  # and left mounted
        steps, errors = _plan(outcomes, kernel, flags, replace=replace,
                              host_family=host_family, dirs=dirs)  # fmt: skip
        if not errors:
            _show(outcomes, provide.apply(kernel, steps))
    except QusdError as e:
        errors.append(e.message)

    if outcomes:
        print(text_table([o.cells() for o in outcomes], ["TARGET", "ENTRY", "FLAGS", "RESULT",
                                                      "INTERPRETER"]), flush=True)  # fmt: skip
    if not errors and _truthy("verify", env.get("QUSD_VERIFY", ""), True):
        # prove it: each target's built-in program through the kernel
        emulated = [o.target for o in outcomes if o.result != "native"]
        checks = verify.verify(kernel, cat, emulated) if emulated else []
        if checks:
            print(verify.render(checks), flush=True)
        errors += [f"verify: {c.target}: {c.reason}" for c in checks if not c.ok]
    for message in errors:
        _annotate(message)

    if env.get("GITHUB_OUTPUT"):
        try:
            after = kernel.entries()
        except QusdError:
            after = []
        _set_output(env["GITHUB_OUTPUT"], "registrations",
                    json.dumps(provide.listing(after), indent=2))  # fmt: skip
        _set_output(env["GITHUB_OUTPUT"], "platforms",
                    ",".join(available_platforms(after, cat, host_family)))  # fmt: skip
    return 1 if errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["github-action"]:
        print("usage: python -m qusd.compat github-action", file=sys.stderr)
        return 64
    return github_action(os.environ)


if __name__ == "__main__":
    sys.exit(main())
