"""IMAP sequence sets (RFC 9051 section 9, ``sequence-set``) and their compact rendering.

A :class:`SequenceSet` is what the client wrote: ranges whose ends are numbers or ``*``
(``None`` here). It is resolved against the mailbox at hand (the largest sequence number or
UID) with :meth:`SequenceSet.resolve`, which orders each range (``5:2`` is ``2:5``) and
replaces ``*`` — as RFC 9051 says, ``*`` is the largest number in use, and ``n:*`` on an empty
mailbox is empty.

:func:`compact` renders numbers as the shortest set (``[1, 2, 3, 7, 9, 10]`` → ``"1:3,7,9:10"``),
for COPYUID, VANISHED and ESEARCH ALL.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = ["SequenceSet", "compact"]

#: The largest value of a sequence number, UID (nz-number) — 2^32 - 1.
MAX_NUMBER = 0xFFFFFFFF


@dataclass(frozen=True)
class SequenceSet:
    """``ranges``: ``(first, last)`` pairs as written, ``None`` standing for ``*``; a single
    number ``n`` is ``(n, n)``. Never empty; numbers are 1..2^32-1."""

    ranges: tuple[tuple[int | None, int | None], ...]

    @classmethod
    def of(cls, numbers: Iterable[int]) -> SequenceSet:
        """The compact set of ``numbers`` (at least one)."""
        ranges = tuple((a, b) for a, b in _runs(numbers))
        if not ranges:
            raise ValueError("empty sequence set")
        return cls(ranges)

    @property
    def uses_star(self) -> bool:
        return any(a is None or b is None for a, b in self.ranges)

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        """Inclusive, ordered ``(low, high)`` ranges with ``*`` = ``largest`` (as written:
        not merged, may overlap). Ranges entirely above ``largest`` are kept — callers filter
        by what exists. With ``largest == 0`` a range using ``*`` is dropped."""
        out: list[tuple[int, int]] = []
        for a, b in self.ranges:
            if (a is None or b is None) and largest <= 0:
                continue  # "*" on an empty mailbox names nothing
            lo = largest if a is None else a
            hi = largest if b is None else b
            if lo > hi:
                lo, hi = hi, lo
            out.append((lo, hi))
        return out

    def contains(self, n: int, largest: int) -> bool:
        """Whether ``n`` is in the set with ``*`` = ``largest``."""
        return any(lo <= n <= hi for lo, hi in self.resolve(largest))

    def iter(self, largest: int) -> Iterator[int]:
        """The distinct numbers of the set, ascending, capped at ``largest`` (what exists
        for message sequence numbers). Cost is O(numbers), so use only with a bound."""
        seen: set[int] = set()
        for lo, hi in self.resolve(largest):
            for n in range(lo, min(hi, largest) + 1):
                seen.add(n)
        return iter(sorted(seen))

    def __str__(self) -> str:
        parts = []
        for a, b in self.ranges:
            sa = "*" if a is None else str(a)
            sb = "*" if b is None else str(b)
            parts.append(sa if a == b else f"{sa}:{sb}")
        return ",".join(parts)


def _runs(numbers: Iterable[int]) -> Iterator[tuple[int, int]]:
    start = prev = -1
    for n in sorted(set(numbers)):
        if n < 1:
            raise ValueError("sequence numbers and UIDs are positive")
        if start < 0:
            start = prev = n
        elif n == prev + 1:
            prev = n
        else:
            yield start, prev
            start = prev = n
    if start >= 0:
        yield start, prev


def compact(numbers: Iterable[int]) -> str:
    """``"1:3,7,9:12"`` for ``[1, 2, 3, 7, 9, 10, 11, 12]`` (any order, duplicates merged);
    ``""`` for no numbers."""
    return ",".join(str(a) if a == b else f"{a}:{b}" for a, b in _runs(numbers))
