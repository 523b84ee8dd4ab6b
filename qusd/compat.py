"""What the tools qusd replaces mean, in qusd's terms, and the GitHub Action.

docker/setup-qemu-action and tonistiigi/binfmt speak of OCI platforms
(`linux/arm64`, `linux/arm/v7`) and treat an entry that already serves a
platform as done; qus and the Action speak of QEMU targets. This module maps
one onto the other and decides when an existing entry already provides a
target. `python -m qusd.compat github-action` is the Action's step (run by
packaging/action/register.sh as root): it reads the inputs from QUSD_*
variables, registers through qusd-binfmt, prints every outcome as a table,
annotates failures and writes the step's outputs.

Standard library only, and Python >= 3.10 (what runners and qusd-binfmt have).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qusd import catalog, interpreters, oneshot, verify
from qusd.binfmt import DEFAULT_PATH, BinfmtMisc, Entry, normalize_flags
from qusd.catalog import Catalog, Target
from qusd.errors import QusdError
from qusd.policy import check_trusted
from qusd.text import table

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


# -- does an existing entry already provide a target? ------------------------


def _header(target: Target) -> bytes:
    """A header the target's programs have: its magic (the masked-out bits
    as QEMU's table writes them)."""
    return target.offset * b"\0" + target.magic


def entry_matches(entry: Entry, target: Target) -> bool:
    """Whether the kernel would hand the target's programs to this entry.
    Compared by behaviour, not by text: distributions' masks differ."""
    return entry.enabled and entry.type == "M" and entry.rule().matches(_header(target))


def unusable(entry: Entry, target: Target, flags: str) -> str | None:
    """Why an entry does not already provide target with flags, or None when
    it does: it matches the target's programs, has every requested flag and
    no C unless C was asked for, and its interpreter is a trusted, statically
    linked executable (static, so it works inside containers too)."""
    if not entry.enabled:
        return "it is disabled"
    if not entry_matches(entry, target):
        return f"it does not match {target.name} programs"
    wanted = normalize_flags(flags)
    missing = "".join(f for f in wanted if f not in entry.flags)
    if missing:
        return f"it lacks flag(s) {missing}"
    if "C" in entry.flags and "C" not in wanted:
        return "it has the C flag (set-uid binaries would run their interpreter as root)"
    try:
        check_trusted(entry.interpreter)
    except QusdError as e:
        return e.message
    if interpreters.is_static_elf(entry.interpreter) is not True:
        return f"{entry.interpreter} is not a statically linked program"
    return None


def provider(entries: Sequence[Entry], target: Target, flags: str) -> Entry | None:
    """The entry that already provides target with flags: the one with the
    target's own name first, else any other that qualifies."""
    named = [e for e in entries if e.name == target.entry_name]
    others = [e for e in entries if e.name != target.entry_name]
    for e in [*named, *others]:
        if unusable(e, target, flags) is None:
            return e
    return None


def runs(entry: Entry, target: Target) -> bool:
    """Whether the entry runs the target's programs, in containers too: it
    is enabled, matches them and its interpreter is statically linked."""
    return entry_matches(entry, target) and interpreters.is_static_elf(entry.interpreter) is True


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


def _oneshot(*argv: str) -> tuple[int, str, str]:
    """qusd-binfmt, through its command line, in this process: (exit status,
    stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = oneshot.main(list(argv))
    return status, out.getvalue(), err.getvalue()


def _requested(env: Mapping[str, str], cat: Catalog, host_family: str) -> list[Target]:
    """The targets the inputs name: targets and platforms together; none or
    `all`: every foreign target that has an interpreter."""
    names = split_words(env.get("QUSD_TARGETS", "")) + [
        platform_target(p) for p in split_words(env.get("QUSD_PLATFORMS", ""))
    ]
    if not names or "all" in names:
        everything = interpreters.foreign_with_interpreters(cat, host_family)
        names = [n for n in names if n != "all"] + [t.name for t in everything]
    return cat.resolve(names)


def _plan(
    outcomes: list[Outcome], before: list[Entry], flags: str, replace: bool, host_family: str
) -> tuple[list[Target], list[str]]:
    """What is left to register, and the errors that stop it all."""
    todo: list[Target] = []
    errors: list[str] = []
    for o in outcomes:
        t = o.target
        if t.family == host_family:
            o.result = "native"
            continue
        have = provider(before, t, flags)
        if have is not None:
            o.found(have.name, have.flags, have.interpreter, "provided")
            continue
        old = next((e for e in before if e.name == t.entry_name), None)
        if old is not None and not replace:
            o.found(old.name, old.flags, old.interpreter, "conflict")
            errors.append(
                f"{old.name} is registered ({old.describe()}) but does not provide "
                f"{t.name} with flags {flags}: {unusable(old, t, flags)}; set the input "
                "`replace: true` to replace it"
            )
            continue
        found = interpreters.find(t)
        if found is None:
            o.result = "no interpreter"
            errors.append(
                f"no interpreter for {t.name}: no {' or '.join(interpreters.candidates(t))} "
                f"in {', '.join(interpreters.DEFAULT_DIRS)}; install qemu-user-static (the "
                f"Action does when no QEMU interpreter is present) or drop {t.name} from the "
                "inputs"
            )
            continue
        if not found.static:
            print(
                f"::warning title=qusd binfmt::{found.path} is dynamically linked: "
                f"{t.name} programs in containers will not find its libraries; "
                "install qemu-user-static",
                flush=True,
            )
        todo.append(t)
    return todo, errors


def github_action(env: Mapping[str, str], binfmt_path: str = DEFAULT_PATH) -> int:
    """The Action's step: 0 when every requested target is provided, else 1
    with an annotation per problem; the outputs are written either way."""
    flags = env.get("QUSD_FLAGS", "").strip() or "F"
    cat = catalog.builtin()
    host_family = catalog.family_of(catalog.host_machine())
    kernel = BinfmtMisc(binfmt_path)
    outcomes: list[Outcome] = []
    errors: list[str] = []
    try:
        replace = _truthy("replace", env.get("QUSD_REPLACE", ""), True)
        outcomes = [Outcome(t) for t in _requested(env, cat, host_family)]
        if not kernel.is_mounted():
            kernel.mount()  # and leave it mounted: unmounting drops the entries
        todo, errors = _plan(outcomes, kernel.entries(), flags, replace, host_family)
    except QusdError as e:
        todo, errors = [], [e.message]

    if todo and not errors:
        existed = set(kernel.names())
        argv = ["--binfmt-path", binfmt_path, "--json", "register", "--flags", flags]
        if replace:
            argv.append("--replace")
        status, stdout, stderr = _oneshot(*argv, "--", *(t.name for t in todo))
        if status == 0:
            rows = {r["name"]: r for r in json.loads(stdout)}
            for o in outcomes:
                row = rows.get(o.target.entry_name)
                if row is not None:
                    replaced = row["result"] == "registered" and row["name"] in existed
                    result = "replaced" if replaced else row["result"]
                    o.found(row["name"], row["flags"], row["interpreter"], result)
        else:
            errors.append(stderr.strip().removeprefix("qusd-binfmt: ") or f"exit status {status}")

    if outcomes:
        print(table([o.cells() for o in outcomes], ["TARGET", "ENTRY", "FLAGS", "RESULT",
                                                      "INTERPRETER"]), flush=True)  # fmt: skip
    if not errors and _truthy("verify", env.get("QUSD_VERIFY", ""), True):
        # prove it: each target's built-in program through the kernel
        emulated = [o.target for o in outcomes if o.result != "native"]
        checks = verify.verify(kernel, cat, emulated) if emulated else []
        if checks:
            print("\n" + verify.render(checks), flush=True)
        errors += [f"verify: {c.target}: {c.reason}" for c in checks if not c.ok]
    for message in errors:
        _annotate(message)

    if env.get("GITHUB_OUTPUT"):
        status, stdout, _ = _oneshot("--binfmt-path", binfmt_path, "--json", "list")
        _set_output(env["GITHUB_OUTPUT"], "registrations", stdout.strip() if status == 0 else "[]")
        try:
            after = kernel.entries()
        except QusdError:
            after = []
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
