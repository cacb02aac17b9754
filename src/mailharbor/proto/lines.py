"""Command lines out of a receive buffer, shared by the line-based engines (SMTP/LMTP, POP3).

Invariants
----------
- A line is returned only whole (up to and including its ``<LF>``, which is removed from the
  buffer; the returned bytes keep a ``<CR>`` before it, the engine decides about bare LF).
- A line longer than the limit in force (terminator included) is never buffered: its bytes are
  dropped as they arrive, up to and including its ``<LF>``; then :data:`TOO_LONG` is returned once,
  so the engine answers one error per over-long line, after the client finished sending it.
- The limit is asked for again before each line (it may depend on the engine's state and on the
  line's first bytes, e.g. a longer limit for ``AUTH``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

__all__ = ["TOO_LONG", "LineTaker"]


class _TooLong:
    __slots__ = ()

    def __repr__(self) -> str:
        return "TOO_LONG"


TOO_LONG: Final = _TooLong()
"""An over-long line ended (and was dropped)."""


class LineTaker:
    """Takes lines off a ``bytearray`` (the engine's receive buffer); see the module docstring."""

    __slots__ = ("_discarding", "_limit")

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._discarding = False

    def take(self, buf: bytearray) -> bytes | _TooLong | None:
        """The next line (its ``<LF>`` removed, a ``<CR>`` before it kept), :data:`TOO_LONG`
        once an over-long line has been dropped, or None: more bytes are needed."""
        while True:
            idx = buf.find(b"\n")
            if self._discarding:
                if idx < 0:
                    buf.clear()
                    return None
                del buf[: idx + 1]
                self._discarding = False
                return TOO_LONG
            limit = self._limit()
            if idx < 0:
                if len(buf) >= limit:
                    self._discarding = True
                    continue
                return None
            if idx + 1 > limit:
                self._discarding = True
                continue
            line = bytes(buf[:idx])
            del buf[: idx + 1]
            return line
