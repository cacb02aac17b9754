"""Replies, events and errors of the POP3 server engine (see :mod:`mailharbor.proto.pop3`).

Every event is a frozen dataclass. ``NEED_DATA`` and ``PAUSED`` are sentinels, as in h11.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "AuthRequest",
    "ConnectionClosed",
    "DropListing",
    "Event",
    "Pop3ProtocolError",
    "Pop3UsageError",
    "ProtocolViolation",
    "Quit",
    "Reply",
    "Retrieve",
    "Sentinel",
    "StartTls",
    "Update",
    "err",
    "ok",
    "stuff",
]

_MAX_REPLY_LINE = 510  # RFC 2449 4: a response line is at most 512 octets with CRLF
#: RFC 2449 8: resp-code = "[" resp-level *("/" resp-level) "]"; we use the registered letters.
_RESP_CODE = re.compile(r"[A-Z0-9-]+(?:/[A-Z0-9-]+)*")


def _clean(text: str) -> str:
    """Make ``text`` safe for one reply line: printable ASCII only, bounded length.

    CR, LF and other control characters become spaces, so application text can never inject a
    second reply line; non-ASCII becomes ``?``.
    """
    if text.isascii() and text.isprintable():
        return text[:_MAX_REPLY_LINE]
    out = "".join(ch if 32 <= ord(ch) < 127 else ("?" if ord(ch) >= 127 else " ") for ch in text)
    return out[:_MAX_REPLY_LINE]


def stuff(body: bytes) -> bytes:
    """``body`` as the data of a multi-line response (RFC 1939 3), terminator included.

    Every line end becomes CRLF (a bare LF is sent as CRLF), a final line without its CRLF gets
    one, every line that starts with ``.`` gets one more ``.`` (byte-stuffing), and
    ``.<CR><LF>`` ends the response. An empty body is just the terminator.
    """
    if not body:
        return b".\r\n"
    if body.count(b"\n") != body.count(b"\r\n"):
        body = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    body = body.replace(b"\r\n.", b"\r\n..")
    if body.startswith(b"."):
        body = b"." + body
    return body + b".\r\n"


@dataclass(frozen=True)
class Reply:
    """One POP3 response: ``+OK`` (``positive``) or ``-ERR``, an RFC 2449 response code (e.g.
    ``"IN-USE"``, ``"SYS/TEMP"``, ``"AUTH"``; ``""`` for none, only on ``-ERR``) and text.

    ``body`` makes it a multi-line response: raw lines (CRLF, not yet byte-stuffed), stuffed
    and terminated by :func:`stuff` on output. Text is sanitised on output, so application
    strings are safe in it — but never exception text (DESIGN.md).
    """

    positive: bool
    text: str = ""
    code: str = ""
    body: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.code and (self.positive or not _RESP_CODE.fullmatch(self.code)):
            raise ValueError(f"bad response code {self.code!r}")

    def status_line(self) -> bytes:
        head = "+OK" if self.positive else "-ERR"
        code = f"[{self.code}] " if self.code else ""
        text = _clean(code + self.text).rstrip()
        return (f"{head} {text}\r\n" if text else f"{head}\r\n").encode("ascii")

    def to_bytes(self) -> bytes:
        line = self.status_line()
        if self.body is None:
            return line
        return line + stuff(self.body)


def ok(text: str = "", body: bytes | None = None) -> Reply:
    """A ``+OK`` reply (multi-line when ``body`` is given)."""
    return Reply(True, text, "", body)


def err(text: str, code: str = "") -> Reply:
    """A ``-ERR`` reply with an optional RFC 2449 response code."""
    return Reply(False, text, code)


@dataclass(frozen=True)
class DropListing:
    """What the engine knows of a maildrop after login: per message (number = index + 1) its
    size in octets and its unique id (RFC 1939 7: 1-70 characters in 0x21-0x7E)."""

    sizes: tuple[int, ...]
    uids: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.uids):
            raise ValueError("sizes and uids differ in length")
        for u in self.uids:
            if not 1 <= len(u) <= 70 or not all(0x21 <= ord(c) <= 0x7E for c in u):
                raise ValueError(f"bad unique id {u!r}")


class Pop3ProtocolError(Exception):
    """The peer broke the protocol; ``reply`` is what to send. ``closing``: end the session.

    Raised inside the engine and turned into a queued reply plus a :class:`ProtocolViolation`
    event; it never escapes ``next_event``. Its message is for logs, never for the wire.
    """

    def __init__(self, reply: Reply, *, closing: bool = False, counts: bool = True) -> None:
        super().__init__(f"{reply.code} {reply.text}")
        self.reply = reply
        self.closing = closing
        self.counts = counts


class Pop3UsageError(Exception):
    """The *application* misused the engine (e.g. ``send`` when no reply is owed)."""


class Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"
    PAUSED = "PAUSED"

    def __repr__(self) -> str:
        return self.value


#: ``next_event`` has nothing more to say until ``receive_data`` is called again.
NEED_DATA = Sentinel.NEED_DATA
#: ``next_event`` waits for the application's reply (``send``).
PAUSED = Sentinel.PAUSED


@dataclass(frozen=True)
class AuthRequest:
    """USER/PASS (``mechanism`` ``"USER"``) or AUTH PLAIN finished: the app checks the password,
    opens the maildrop and answers ``send(ok(...), maildrop=...)`` or ``send(err(...))``."""

    mechanism: str
    authzid: str
    identity: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Retrieve:
    """RETR (``lines`` None) or TOP (``lines`` n) of message ``number`` (1-based; ``index`` is
    ``number - 1``), which exists and is not marked deleted. The app answers
    ``send(ok(text, body=<the whole message>))`` — the engine cuts it for TOP — or ``-ERR``."""

    number: int
    lines: int | None = None

    @property
    def index(self) -> int:
        return self.number - 1


@dataclass(frozen=True)
class Update:
    """QUIT in the TRANSACTION state: the UPDATE state. The app removes the messages at
    ``deleted`` (0-based indexes into the listing, ascending), durably, then answers ``+OK``
    (or ``-ERR [SYS/TEMP]`` when it could not); the engine closes after the reply."""

    deleted: tuple[int, ...]


@dataclass(frozen=True)
class StartTls:
    """STLS accepted; ``+OK`` queued and all bytes after the command discarded. Flush
    ``data_to_send()``, wrap the socket in TLS, then call ``starttls_done()``."""


@dataclass(frozen=True)
class Quit:
    """QUIT in the AUTHORIZATION state; ``+OK`` queued, the engine is now closed."""


@dataclass(frozen=True)
class ConnectionClosed:
    """The session is over (EOF, QUIT or a closing error): flush ``data_to_send()``, close.
    After EOF without QUIT nothing is deleted (no UPDATE state)."""


@dataclass(frozen=True)
class ProtocolViolation:
    """The engine refused something on its own and queued ``reply``. ``closing``: the session
    ends after it. ``reason`` is a fixed string for logs."""

    reply: Reply
    reason: str
    closing: bool = False


Event = AuthRequest | Retrieve | Update | StartTls | Quit | ConnectionClosed | ProtocolViolation
