"""What is made from immutable objects, kept while they stay the same.

Records and registrations are frozen: a line written for one stays right for
as long as it is the very same object, and the layers below hand the same
object back while nothing about it changed (State's records, the
registrations of Service.snapshot). So a listing or a file rebuilt after one
change among a thousand objects makes one line anew and joins the others.
Standard library only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class PerObject(Generic[T, R]):
    """make(item) for each item, the last call's result reused for an item
    that is the same object as then; what the last call did not see is
    forgotten."""

    def __init__(self, make: Callable[[T], R]) -> None:
        self._make = make
        self._kept: dict[int, tuple[T, R]] = {}

    def __call__(self, items: Iterable[T]) -> list[R]:
        kept: dict[int, tuple[T, R]] = {}
        out = []
        for item in items:
            hit = self._kept.get(id(item))
            made = hit[1] if hit is not None and hit[0] is item else self._make(item)
            kept[id(item)] = (item, made)
            out.append(made)
        self._kept = kept
        return out
