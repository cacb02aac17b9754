"""Replies, events and errors of the SMTP/LMTP server engine (see :mod:`mailharbor.proto.smtp`).

Every event is a frozen dataclass. ``NEED_DATA`` and ``PAUSED`` are sentinels, as in h11.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "AuthRequest",
    "BdatChunk",
    "ConnectionClosed",
    "DataAborted",
    "DataChunk",
    "DataEnd",
    "DataStart",
    "Ehlo",
    "Event",
    "Helo",
    "MailFrom",
    "MailParams",
    "Noop",
    "ProtocolViolation",
    "Quit",
    "RcptParams",
    "RcptTo",
    "Reply",
    "Rset",
    "Sentinel",
    "SmtpProtocolError",
    "SmtpUsageError",
    "StartTls",
]

_MAX_REPLY_LINE = 510  # RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with CRLF


def _clean(text: str) -> str:
    """Make ``text`` safe for one reply line: printable ASCII only, bounded length.

    CR, LF and other control characters become spaces, so application text can never inject a
    second reply; non-ASCII becomes ``?``.
    """
    if text.isascii() and text.isprintable():
        return text[:_MAX_REPLY_LINE]  # the common case, without a pass per character
    out = "".join(ch if 32 <= ord(ch) < 127 else ("?" if ord(ch) >= 127 else " ") for ch in text)
    return out[:_MAX_REPLY_LINE]


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: ``code`` (200-599), an RFC 3463 enhanced code or ``""``, and text.

    ``text`` may hold several lines separated by ``"\\n"``: they become a multi-line reply
    (``250-…`` then ``250 …``). Text is sanitised on output (see :func:`_clean`), so it is safe
    to put application strings in it — but never exception text (DESIGN.md).
    """

    code: int
    enhanced: str = ""
    text: str = ""

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code}")
        if self.enhanced:
            parts = self.enhanced.split(".")
            if (
                len(parts) != 3
                or not all(p.isdigit() and p.isascii() and len(p) <= 3 for p in parts)
                or parts[0] != str(self.code // 100)
            ):
                raise ValueError(f"bad enhanced status code {self.enhanced!r} for {self.code}")

    @property
    def positive(self) -> bool:
        """2xx (or 3xx) — the command was accepted."""
        return self.code < 400

    @property
    def closes(self) -> bool:
        """421 and 521 end the session after the reply is sent."""
        return self.code in (421, 521)

    def to_bytes(self) -> bytes:
        wire: bytes | None = self.__dict__.get("_wire")
        if wire is None:  # computed once per Reply (most replies are module constants)
            wire = self._encode()
            object.__setattr__(self, "_wire", wire)
        return wire

    def _encode(self) -> bytes:
        lines = self.text.split("\n") if self.text else [""]
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{_clean(prefix + line).rstrip()}\r\n")
        return "".join(out).encode("ascii")


class SmtpProtocolError(Exception):
    """The peer broke the protocol; ``reply`` is what to send. ``closing``: end the session.

    Raised inside the engine and turned into a queued reply plus a :class:`ProtocolViolation`
    event; it never escapes ``next_event``. Its message is for logs, never for the wire.
    """

    def __init__(self, reply: Reply, *, closing: bool = False, counts: bool = True) -> None:
        super().__init__(f"{reply.code} {reply.enhanced} {reply.text}")
        self.reply = reply
        self.closing = closing or reply.closes
        self.counts = counts


class SmtpUsageError(Exception):
    """The *application* misused the engine (e.g. ``send`` when no reply is owed)."""


class Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"
    PAUSED = "PAUSED"

    def __repr__(self) -> str:
        return self.value


#: ``next_event`` has nothing more to say until ``receive_data`` is called again.
NEED_DATA = Sentinel.NEED_DATA
#: ``next_event`` waits for the application's reply (``send`` / ``send_lmtp_replies``).
PAUSED = Sentinel.PAUSED


@dataclass(frozen=True)
class Ehlo:
    """EHLO (or LHLO in LMTP mode). The engine has queued the capability reply."""

    name: str


@dataclass(frozen=True)
class Helo:
    """HELO. The engine has queued the ``250``."""

    name: str


@dataclass(frozen=True)
class MailParams:
    """ESMTP parameters of MAIL FROM, parsed and validated (xtext already decoded)."""

    size: int | None = None
    body: str | None = None  # "7BIT" or "8BITMIME"
    smtputf8: bool = False
    ret: str | None = None  # DSN: "FULL" or "HDRS"
    envid: str | None = None  # DSN ENVID, decoded
    auth: str | None = None  # RFC 4954 AUTH=, decoded ("<>" when unknown)


@dataclass(frozen=True)
class RcptParams:
    """ESMTP parameters of RCPT TO (DSN, RFC 3461)."""

    notify: frozenset[str] | None = None  # {"NEVER"} or a subset of SUCCESS/FAILURE/DELAY
    orcpt: tuple[str, str] | None = None  # (addr-type, decoded address), e.g. ("rfc822", "a@b")


@dataclass(frozen=True)
class MailFrom:
    """MAIL FROM. ``address`` is ``""`` for the null path. The app answers with ``send``."""

    address: str
    params: MailParams = field(default_factory=MailParams)


@dataclass(frozen=True)
class RcptTo:
    """RCPT TO. The app answers with ``send`` (2xx accepts the recipient)."""

    address: str
    params: RcptParams = field(default_factory=RcptParams)


@dataclass(frozen=True)
class DataStart:
    """DATA was accepted; the engine has queued ``354``. Chunks follow."""


@dataclass(frozen=True)
class DataChunk:
    """A piece of the message, dot-unstuffed, lines ending in CRLF (a piece may end mid-line)."""

    data: bytes


@dataclass(frozen=True)
class DataEnd:
    """``<CR><LF>.<CR><LF>`` was received. The app answers with ``send`` (SMTP) or
    ``send_lmtp_replies`` (LMTP: one reply per accepted recipient, in RCPT order)."""


@dataclass(frozen=True)
class BdatChunk:
    """Raw bytes of a BDAT chunk (RFC 3030). ``last`` is set on the final piece of the message
    (``BDAT n LAST`` fully received): then the app answers as for :class:`DataEnd`. Non-last BDAT
    commands are acknowledged by the engine."""

    data: bytes
    last: bool = False


@dataclass(frozen=True)
class DataAborted:
    """The message in progress was dropped by the engine (e.g. over the size limit); the engine
    has queued ``reply`` (once per recipient in LMTP). Discard what was received."""

    reply: Reply


@dataclass(frozen=True)
class StartTls:
    """STARTTLS accepted; ``220`` queued and all bytes after the command discarded. Flush
    ``data_to_send()``, wrap the socket in TLS, then call ``starttls_done()``."""


@dataclass(frozen=True)
class AuthRequest:
    """AUTH finished its exchange; the app checks the password and answers ``235``/``535``."""

    mechanism: str
    authzid: str
    identity: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Rset:
    """RSET: the transaction was cleared; ``250`` queued."""


@dataclass(frozen=True)
class Noop:
    """NOOP; ``250`` queued."""


@dataclass(frozen=True)
class Quit:
    """QUIT; ``221`` queued, the engine is now closed."""


@dataclass(frozen=True)
class ConnectionClosed:
    """The session is over (EOF, QUIT or a closing error): flush ``data_to_send()``, close."""


@dataclass(frozen=True)
class ProtocolViolation:
    """The engine refused something on its own and queued ``reply``. ``closing``: the session
    ends after it. ``reason`` is a fixed string for logs."""

    reply: Reply
    reason: str
    closing: bool = False


Event = (
    Ehlo
    | Helo
    | MailFrom
    | RcptTo
    | DataStart
    | DataChunk
    | DataEnd
    | BdatChunk
    | DataAborted
    | StartTls
    | AuthRequest
    | Rset
    | Noop
    | Quit
    | ConnectionClosed
    | ProtocolViolation
)
