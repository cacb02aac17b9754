"""Events, sentinels and errors of the IMAP server engine (see :mod:`mailharbor.proto.imap`).

Every event is a frozen dataclass. ``NEED_DATA`` and ``PAUSED`` are sentinels, as in h11.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .commands import Command
from .responses import Tagged

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "ConnectionClosed",
    "Event",
    "IdleDone",
    "ImapParseError",
    "ImapUsageError",
    "ProtocolViolation",
    "Request",
    "Sentinel",
]


class Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"
    PAUSED = "PAUSED"

    def __repr__(self) -> str:
        return self.value


#: ``next_event`` has nothing more to say until ``receive_data`` is called again (flush
#: ``data_to_send()`` first: it may hold a ``+`` continuation the client waits for).
NEED_DATA = Sentinel.NEED_DATA
#: ``next_event`` waits for the application's tagged response (``send(ok(...))``).
PAUSED = Sentinel.PAUSED


@dataclass(frozen=True)
class Request:
    """A complete, parsed, state-checked client command.

    ``answered`` False: the app owes the tagged completion — it may ``send`` untagged
    responses, then must ``send`` exactly one :class:`~.responses.Tagged` (``ok``/``no``/
    ``bad``); the engine returns ``PAUSED`` until then. ``answered`` True: the engine already
    queued the whole response (CAPABILITY, LOGOUT, STARTTLS, ENABLE, ID, SETQUOTA); the event
    is informational (logging, STARTTLS handshake, LOGOUT cleanup)."""

    tag: str
    command: Command
    answered: bool = False


@dataclass(frozen=True)
class IdleDone:
    """The client ended IDLE. ``answered`` False (it sent ``DONE``): the app completes the
    IDLE command with ``ok()``. ``answered`` True: it sent something else; the engine has
    answered the IDLE with ``BAD`` and the line was not executed."""

    tag: str
    answered: bool = False


@dataclass(frozen=True)
class ProtocolViolation:
    """The engine refused something on its own and queued the answer (``response``: the
    tagged or untagged status line it sent). ``closing``: the session ends after it.
    ``reason`` is a fixed string for logs."""

    reason: str
    response: bytes
    closing: bool = False


@dataclass(frozen=True)
class ConnectionClosed:
    """The session is over (EOF, LOGOUT, BYE, a closing error): flush ``data_to_send()`` and
    close the connection."""


Event = Request | IdleDone | ProtocolViolation | ConnectionClosed


class ImapParseError(Exception):
    """A command could not be parsed (raised by :func:`~.parser.parse_command`; inside the
    engine it becomes a tagged response and never escapes). ``tag``: the command's tag when it
    could be read, else None (answered ``* BAD``). ``response``: what to send. The message is
    for logs, never for the wire."""

    def __init__(self, reason: str, response: Tagged, tag: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.response = response
        self.tag = tag


class ImapUsageError(Exception):
    """The *application* misused the engine (a tagged response when none is owed, ...)."""
