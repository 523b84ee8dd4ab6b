"""The boot hand-off: the registrations qusd keeps, as a binfmt.d(5) file
systemd-binfmt loads at boot.

systemd-binfmt runs early in boot (sysinit) and registers every line of
the binfmt.d files, in about 5 ms for 31 rules; a Python program needs
that long just to start, and qusd's own restore (its checks, its imports)
about 90 ms, later in boot. So qusd writes its persistent registrations to
`<state_dir>/binfmt.conf`, and the package links it as
/usr/lib/binfmt.d/qusd.conf: at boot (and at every `systemctl restart
systemd-binfmt`, which flushes the table) they are back as early and as
fast as the distribution's own rules, before qusd starts. qusd then starts,
restores what is not there (its users' entries, anything the file did not
have yet) and adopts the rest; an admin who wants none of it masks the
link (`ln -s /dev/null /etc/binfmt.d/qusd.conf`).

Only what qusd would register again without asking anything goes there:
persistent, enabled entries an admin made (qusd keeps them against other
definitions), without an override of the checks (force,
allow_untrusted_interpreter: their checks must run again at every
restore). The file sorts after Debian's qemu-*.conf, so an admin's entry
takes the name from the distribution's, as qusd's own restore does.

The file is written a moment after the state changes (the daemon) or at the
end of a restore, never on a request's path; a crash in between leaves a
file one change behind. What that can bring back at boot, an entry the
admin had removed, qusd takes back at its next start: an entry whose name
qusd has no record of, holding exactly the file's definition for it, was
put there by the file, and is removed (leftovers()).

Standard library only: the boot path writes it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from qusd import paths
from qusd.binfmt import Entry, Rule
from qusd.errors import InvalidRuleError
from qusd.interchange import read_binfmt_d
from qusd.memo import PerObject
from qusd.state import Record

FILENAME = "binfmt.conf"
#: where the Debian package links it (binfmt.d(5))
LINK = "/usr/lib/binfmt.d/qusd.conf"
HEADER = (
    "# Written by qusd: the registrations it keeps, for systemd-binfmt at boot\n"
    f"# (linked as {LINK}). Do not edit: qusd rewrites it. To have\n"
    "# systemd-binfmt leave them to qusd: ln -s /dev/null /etc/binfmt.d/qusd.conf\n"
)

log = logging.getLogger("qusd.handoff")


def eligible(rec: Record) -> bool:
    """Whether systemd-binfmt may register rec at boot on qusd's behalf."""
    return (
        rec.persistent
        and rec.enabled
        and rec.owned
        and not rec.force
        and not rec.allow_untrusted_interpreter
    )


class Renderer:
    """The file's text: one register line per eligible record, in the order
    of registration (the newest entry is matched first, as after qusd's own
    restore). Each record's line is kept while the record is the same
    object (qusd.memo): after one change among a thousand records, the text
    costs a join, not a thousand encodings (3.4 ms, with the GIL held)."""

    def __init__(self) -> None:
        self._lines = PerObject(_line)

    def __call__(self, records: Iterable[Record]) -> str:
        return HEADER + "".join(self._lines(r for r in records if eligible(r)))


def _line(rec: Record) -> str:
    return rec.rule.encode().decode() + "\n"


def render(records: Iterable[Record]) -> str:
    """The file's text, from nothing kept."""
    return Renderer()(records)


def read(directory: Path) -> list[Rule]:
    """The rules the file holds now (what systemd-binfmt loaded at boot, if
    qusd did not rewrite it since); none when it is missing or unreadable."""
    path = directory / FILENAME
    try:
        return read_binfmt_d(path.read_text(), str(path))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, InvalidRuleError) as e:
        log.warning("cannot read %s (%s): rewriting it", path, e)
        return []


def write(directory: Path, text: str) -> None:
    """Replace the file atomically (a half-written file at boot would
    register half the rules, or a torn one). OSError is the caller's to
    report."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    paths.write_atomic(directory / FILENAME, text.encode())


def leftovers(
    rules: Iterable[Rule], records: dict[str, Record], entries: dict[str, Entry]
) -> list[Entry]:
    """The entries the file put back that qusd no longer keeps: named in the
    file, unknown to the state, and holding exactly the file's definition
    (another tool's entry under that name is left alone)."""
    found = []
    for rule in rules:
        entry = entries.get(rule.name)
        if rule.name not in records and entry is not None and entry.rule() == rule.normalized():
            found.append(entry)
    return found
