"""Rules in other tools' files: binfmt.d(5) for systemd-binfmt, and the
entries of Debian's binfmt-support (update-binfmts' database in
/var/lib/binfmts, and the import files in /usr/share/binfmts).

`qusctl import` reads them into rules (then registered through the API);
`qusctl export --binfmt-d` writes qusd's registrations as binfmt.d files
(and qus-register --systemd / --debian writes both formats, as QEMU's
qemu-binfmt-conf.sh does),
for hosts that want systemd-binfmt to own early boot (qusd then adopts the
entries it finds at start). A binfmt.d line is exactly what is written to
binfmt_misc's `register`, so export writes Rule.encode() and import reads
with catalog.parse_binfmt_d_line. Standard library only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qusd import paths
from qusd.binfmt import Rule
from qusd.catalog import parse_binfmt_d_line, unescape
from qusd.errors import InvalidRuleError, NoSuchEntryError

#: update-binfmts' database: one file per entry, one field a line
ADMIN_FIELDS = (
    "package",
    "type",
    "offset",
    "magic",
    "mask",
    "interpreter",
    "detector",
    "credentials",
    "preserve",
    "fix_binary",
)
#: update-binfmts' import files: "key value" lines
IMPORT_KEYS = frozenset(
    {"package", "interpreter", "magic", "mask", "offset", "extension", "detector",
     "credentials", "preserve", "fix_binary"}
)  # fmt: skip


@dataclass(frozen=True)
class Found:
    """A rule read from a file, and where it came from (for messages)."""

    rule: Rule
    source: str


def _rule(
    name: str, kind: str, offset: int, magic: bytes, mask: bytes | None, *,
    interpreter: str, flags: str, where: str,
) -> Rule:  # fmt: skip
    if kind == "E":
        rule = Rule(name, interpreter, extension=os.fsdecode(magic), flags=flags)
    elif kind == "M":
        rule = Rule(name, interpreter, magic=magic, mask=mask, offset=offset, flags=flags)
    else:
        raise InvalidRuleError(f"{where}: type {kind!r} is neither M (magic) nor E (extension)")
    try:
        rule.encode()
    except InvalidRuleError as e:
        raise InvalidRuleError(f"{where}: {e.message}") from None
    return rule


def read_binfmt_d(text: str, where: str) -> list[Rule]:
    """The rules of a binfmt.d file (comments and blank lines skipped)."""
    rules = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            parsed = parse_binfmt_d_line(line)
        except ValueError as e:
            raise InvalidRuleError(f"{where}:{n}: not a binfmt.d rule ({e})") from None
        if parsed is None:
            continue
        name, kind, offset, magic, mask, interpreter, flags = parsed
        rules.append(_rule(name, kind, offset, magic, mask, interpreter=interpreter,
                           flags=flags, where=f"{where}:{n}"))  # fmt: skip
    return rules


def _yes(value: str) -> bool:
    return value.strip() == "yes"


def _flags(fields: dict[str, str]) -> str:
    flags = "P" if _yes(fields.get("preserve", "")) else ""
    flags += "C" if _yes(fields.get("credentials", "")) else ""
    return flags + ("F" if _yes(fields.get("fix_binary", "")) else "")


def read_binfmts_admin(name: str, text: str, where: str) -> Rule:
    """An entry of update-binfmts' database (/var/lib/binfmts/NAME)."""
    lines = text.split("\n")
    fields = dict(zip(ADMIN_FIELDS, lines, strict=False))
    return _from_fields(name, fields, fields.get("type", "").strip(), where)


def read_binfmts_import(name: str, text: str, where: str) -> Rule:
    """An update-binfmts import file (/usr/share/binfmts/NAME): key value lines."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key in IMPORT_KEYS:
            fields[key] = value.strip()
    kind = "extension" if "extension" in fields else "magic"
    if kind == "extension":
        fields["magic"] = fields["extension"]
    return _from_fields(name, fields, kind, where)


def _from_fields(name: str, fields: dict[str, str], kind: str, where: str) -> Rule:
    if fields.get("detector", "").strip():
        raise InvalidRuleError(
            f"{where}: uses a userspace detector ({fields['detector'].strip()}), which only "
            "binfmt-support can run; leave this entry to update-binfmts"
        )
    if kind not in ("magic", "extension"):
        raise InvalidRuleError(f"{where}: type {kind!r} is neither magic nor extension")
    offset = fields.get("offset", "").strip() or "0"
    if not offset.isdigit():
        raise InvalidRuleError(f"{where}: offset {offset!r} is not a number")
    magic = unescape(fields.get("magic", "").strip())
    mask_text = fields.get("mask", "").strip()
    return _rule(
        name, "M" if kind == "magic" else "E", int(offset), magic,
        unescape(mask_text) if mask_text else None,
        interpreter=fields.get("interpreter", "").strip(), flags=_flags(fields), where=where,
    )  # fmt: skip


def read_file(path: Path) -> list[Rule]:
    """The rules of one file, whichever of the three formats it is in."""
    try:
        text = path.read_text(errors="surrogateescape")
    except FileNotFoundError:
        raise NoSuchEntryError(f"{path} does not exist") from None
    except OSError as e:
        raise NoSuchEntryError(f"cannot read {path}: {e.strerror}") from None
    lines = [line.strip() for line in text.splitlines()]
    if len(lines) >= 2 and lines[1] in ("magic", "extension") and lines[0][:1] not in ":#;":
        return [read_binfmts_admin(path.name, text, str(path))]
    keys = {line.partition(" ")[0] for line in lines if line and line[0] not in "#;"}
    if keys and keys <= IMPORT_KEYS and "interpreter" in keys:
        return [read_binfmts_import(path.name, text, str(path))]
    return read_binfmt_d(text, str(path))


def read_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Found]:
    """Rules from files and directories (a directory's regular files, by
    name; in a binfmt.d directory only its *.conf files)."""
    found: list[Found] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            confs = [f for f in files if f.suffix == ".conf"]
            for file in confs or files:
                found += [Found(r, str(file)) for r in read_file(file)]
        else:
            found += [Found(r, str(p)) for r in read_file(p)]
    names: dict[str, str] = {}
    for f in found:
        if f.rule.name in names:
            raise InvalidRuleError(
                f"{f.rule.name} is defined twice ({names[f.rule.name]} and {f.source}); "
                "import one of them"
            )
        names[f.rule.name] = f.source
    return found


def binfmt_d_text(rule: Rule, note: str = "", by: str = "qusctl export") -> str:
    """A binfmt.d file holding one rule: the line binfmt_misc's register takes."""
    head = f"# Written by {by}" + (f"; {note}" if note else "") + "\n"
    return head + os.fsdecode(rule.encode()) + "\n"


def write_binfmt_d(directory: Path, rule: Rule, note: str = "", by: str = "qusctl export") -> Path:
    """DIR/NAME.conf, written atomically (temp file, rename)."""
    return _write(directory, f"{rule.name}.conf", binfmt_d_text(rule, note, by))


def binfmts_import_text(rule: Rule) -> str:
    """An update-binfmts import file for one rule, as QEMU's
    qemu-binfmt-conf.sh --debian writes them (the package is the entry's
    name); magic and mask in \\xHH escapes, which the kernel decodes."""
    rule.encode()  # refuse what the kernel would refuse
    flags = rule.normalized().flags
    if "O" in flags and "C" not in flags:
        raise InvalidRuleError(
            "update-binfmts cannot express flag O without C (its `credentials` sets both)",
            field="flags",
        )
    lines = [f"package {rule.name}", f"interpreter {rule.interpreter}"]
    if rule.extension is not None:
        lines.append(f"extension {rule.extension}")
    else:
        lines.append("magic " + "".join(f"\\x{b:02x}" for b in rule.magic))
        if rule.mask is not None:
            lines.append("mask " + "".join(f"\\x{b:02x}" for b in rule.mask))
        if rule.offset:
            lines.append(f"offset {rule.offset}")
    for key, flag in (("credentials", "C"), ("preserve", "P"), ("fix_binary", "F")):
        lines.append(f"{key} {'yes' if flag in flags else 'no'}")
    return "\n".join(lines) + "\n"


def write_binfmts_import(directory: Path, rule: Rule) -> Path:
    """DIR/NAME in update-binfmts' import format, written atomically."""
    return _write(directory, rule.name, binfmts_import_text(rule))


def _write(directory: Path, name: str, text: str) -> Path:
    """directory/name, written atomically (paths.write_atomic)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    paths.write_atomic(path, text.encode(errors="surrogateescape"))
    return path
