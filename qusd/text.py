"""Output for people: aligned tables, shared by qusctl and qusd-binfmt,
and what their shells complete (standard library only: the one-shot image
has nothing else)."""

from __future__ import annotations

import os
import signal
import sys
from argparse import Action
from collections.abc import Sequence
from typing import Any, NoReturn


def table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    """An aligned text table, last column unpadded."""
    cells = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        padded = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)] + [r[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def plural(n: int, word: str, words: str | None = None) -> str:
    """ "1 entry", "2 entries": counts people read."""
    return f"{n} {word if n == 1 else words or word + 's'}"


def reader_gone() -> NoReturn:
    """The reader of stdout went away (`qusctl list --json | head`): end
    quietly, by SIGPIPE, as a C tool does (a shell sees 141), with no
    traceback and no flush error at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    sys.exit(128 + signal.SIGPIPE)  # not reached: SIGPIPE's default ends the process


# -- shell completion ----------------------------------------------------------------
# The completion scripts are generated from the argparse parsers by shtab
# (packaging/completions.sh); an argument's `complete` attribute says what it
# names. argparse ignores it, and nothing here imports shtab.

FILE, DIRECTORY = "file", "directory"


def complete(action: Action, what: str | dict[str, Any]) -> Action:
    """Tell the completion what action's argument names: FILE, DIRECTORY
    or words()."""
    action.complete = what  # type: ignore[attr-defined]
    return action


def words(name: str, values: Sequence[str]) -> dict[str, Any]:
    """A completion from a fixed list of words, in shtab's per-shell form."""
    joined = " ".join(values)
    return {
        "bash": f"_qusd_{name}",
        "zsh": f"({joined})",
        "fish": f"(printf '%s\\n' {joined})",
        "tcsh": f"({joined})",
        "preamble": {"bash": f'_qusd_{name}() {{\n  compgen -W "{joined}" -- "$1"\n}}\n'},
    }
