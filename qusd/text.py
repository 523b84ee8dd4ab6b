"""Output for people: aligned tables, shared by qusctl and qusd-binfmt
(standard library only: the one-shot image has nothing else)."""

from __future__ import annotations

from collections.abc import Sequence


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
