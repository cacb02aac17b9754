"""The SMTP/ESMTP (RFC 5321) and LMTP (RFC 2033) server as a sans-IO state machine.

Invariants
----------
1. **No exception escapes for peer input.** ``receive_data`` and ``next_event`` turn any byte
   stream into events and queued replies; what the peer did wrong becomes a
   :class:`ProtocolViolation` with a fixed-text reply. Only *application* misuse (``send`` when
   no reply is owed, a wrong number of LMTP replies) raises :class:`SmtpUsageError`.
2. **Replies leave in command order.** The engine stops (``PAUSED``) after each event that
   needs the application's answer (MAIL, RCPT, end of message, AUTH) and processes nothing more
   until ``send``; ``send`` returns everything queued before it plus the answer.
3. **Bounded memory.** A command line longer than its limit is discarded as it arrives and
   answered ``500 5.5.2``; message bytes are streamed in chunks of at most ``data_chunk_size``
   (long lines included); over-size message data is read and discarded, then ``552 5.3.4``.
   The input buffer holds at most one command line (plus whatever the adapter fed and has not
   yet had ``next_event`` process).
4. **One message is one message (SMTP smuggling).** Only ``<CR><LF>.<CR><LF>`` ends DATA; BDAT
   data is counted, never parsed. See "Line endings" below.
5. **Nothing received before TLS survives STARTTLS.** After ``220`` to STARTTLS the input buffer
   is emptied and input is ignored until ``starttls_done()``, which resets the session to its
   pre-EHLO state (RFC 3207 4.2; CVE-2011-0411).
6. **All transitions are in** ``_TRANSITIONS`` (state, verb) → (handler, next state on success);
   the outcome of an application reply is in ``_AFTER_REPLY``. A (state, verb) not in the table
   is ``503 5.5.1`` if the verb exists in this mode, else ``500 5.5.2``.
7. Every engine-generated 4xx/5xx counts against ``max_bad_commands``; past it the engine sends
   ``421 4.7.0`` and closes. Python exception text never reaches the wire.

Line endings (what Postfix does, and what this engine does)
-----------------------------------------------------------
Postfix ≥ 3.9 has ``smtpd_forbid_bare_newline`` (also in 3.8.4+, 3.7.9+, 3.6.13+, 3.5.23+):

- ``normal`` (the 3.9 default): only ``<CR><LF>.<CR><LF>`` ends DATA; otherwise command and
  message lines ending in a bare ``<LF>`` are accepted *as if* they ended in ``<CR><LF>``.
- ``strict``: a command or message line ending in a bare ``<LF>`` is refused with
  ``smtpd_forbid_bare_newline_reject_code`` (550 by default; 521 disconnects), text
  ``5.5.2 … Error: bare <LF> received``.
- ``smtpd_forbid_bare_newline_exclusions`` (default ``$mynetworks``) exempts clients.

A bare ``<CR>`` is not a line terminator for Postfix: in message content it is kept as data;
in a command it is just a (bad) character of the command line.

This engine implements both modes as :class:`BareNewline`; the default is ``STRICT`` with the
reply ``521 5.5.2 Error: bare <LF> received`` followed by closing — what the SMTP issue asks
for, equal to Postfix's ``strict`` with reject code 521. An adapter wanting Postfix's default
(or the exclusions) passes ``NORMAL`` for those clients. In ``NORMAL`` mode a bare-``<LF>``
line is stored with ``<CR><LF>``, and a ``.`` line ends DATA only if it and the line before
it ended in ``<CR><LF>`` (so ``<LF>.<LF>``, ``<LF>.<CR><LF>`` and ``<CR><LF>.<LF>`` are content;
such a ``.`` line is unstuffed to an empty line). Bare ``<CR>`` is kept as data in both modes,
``<CR>.<CR>`` included. In both modes the message is never split in two.

Limits not applied inside DATA: RFC 5321's 1000-octet text line limit (Postfix accepts and
splits longer lines; so do we — they stream in pieces). Only the size limit applies there.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..lines import TOO_LONG, LineTaker
from .events import (
    NEED_DATA,
    PAUSED,
    AuthRequest,
    BdatChunk,
    ConnectionClosed,
    DataAborted,
    DataChunk,
    DataEnd,
    DataStart,
    Ehlo,
    Event,
    Helo,
    MailFrom,
    Noop,
    ProtocolViolation,
    Quit,
    RcptTo,
    Reply,
    Rset,
    Sentinel,
    SmtpProtocolError,
    SmtpUsageError,
    StartTls,
)
from .syntax import decode_base64, parse_mail_params, parse_path, parse_rcpt_params

__all__ = [
    "BareNewline",
    "SmtpLimits",
    "SmtpServerConfig",
    "SmtpServerConnection",
    "State",
]


class BareNewline(enum.Enum):
    """Postfix's ``smtpd_forbid_bare_newline`` modes (see the module docstring)."""

    NORMAL = "normal"
    STRICT = "strict"


@dataclass(frozen=True)
class SmtpLimits:
    """Abuse limits, with defaults.

    - ``max_line_length`` 1000: a command line, CRLF included (RFC 5321 allows 512 plus what
      extensions add; 1000 leaves room for ESMTP parameters).
    - ``max_auth_line_length`` 12288: an ``AUTH`` command or SASL response line (base64).
    - ``max_message_size`` 50 MiB: DATA after unstuffing, or the sum of BDAT chunks; advertised
      as SIZE.
    - ``max_recipients`` 100: accepted RCPTs per transaction; more get ``452 4.5.3``.
    - ``max_bad_commands`` 20: engine-refused commands per session before ``421 4.7.0``.
    - ``max_commands_before_tls`` 10: commands before STARTTLS when TLS is required.
    - ``data_chunk_size`` 65536: the largest DataChunk/BdatChunk.
    """

    max_line_length: int = 1000
    max_auth_line_length: int = 12288
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 100
    max_bad_commands: int = 20
    max_commands_before_tls: int = 10
    data_chunk_size: int = 65536

    def __post_init__(self) -> None:
        if min(self.max_line_length, self.max_auth_line_length, self.data_chunk_size) < 16:
            raise ValueError("line and chunk limits must be at least 16 bytes")
        if min(self.max_recipients, self.max_bad_commands, self.max_commands_before_tls) < 1:
            raise ValueError("counting limits must be positive")


@dataclass(frozen=True)
class SmtpServerConfig:
    """What the server offers.

    - ``hostname``: in the greeting and the EHLO reply.
    - ``tls_available``: STARTTLS is offered (until TLS is active).
    - ``require_tls``: submission-style: only EHLO/HELO, STARTTLS, NOOP, RSET, QUIT, HELP
      work before TLS (``530 5.7.0`` otherwise).
    - ``auth``: AUTH (``auth_mechanisms``) is offered — only under TLS unless
      ``auth_without_tls``. ``require_auth``: MAIL needs a successful AUTH first.
    - ``dsn``: DSN is advertised and its parameters accepted.
    - ``bare_newline``: see :class:`BareNewline`.
    """

    hostname: str
    tls_available: bool = False
    require_tls: bool = False
    auth: bool = False
    auth_without_tls: bool = False
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    require_auth: bool = False
    dsn: bool = True
    bare_newline: BareNewline = BareNewline.STRICT
    limits: SmtpLimits = field(default_factory=SmtpLimits)


class State(enum.Enum):
    GREETED = "greeted"  # before EHLO/HELO/LHLO
    READY = "ready"  # after EHLO, no transaction
    MAIL = "mail"  # MAIL accepted
    RCPT = "rcpt"  # at least one RCPT accepted
    BDAT_TXN = "bdat_txn"  # between BDAT chunks of one message
    DATA = "data"  # reading DATA content
    BDAT = "bdat"  # reading a BDAT chunk's octets
    AUTH = "auth"  # reading a SASL response line
    TLS_PENDING = "tls_pending"  # 220 to STARTTLS sent, waiting for starttls_done()
    CLOSED = "closed"


class _Owed(enum.Enum):
    """Which application answer the engine is waiting for."""

    MAIL = "mail"
    RCPT = "rcpt"
    MESSAGE = "message"
    AUTH = "auth"


_SESSION = (State.GREETED, State.READY, State.MAIL, State.RCPT, State.BDAT_TXN)
_HELLO = _SESSION
_Transition = tuple[str, State | None]


def _build_transitions() -> dict[tuple[State, str], _Transition]:
    t: dict[tuple[State, str], _Transition] = {}
    for s in _SESSION:
        for verb in ("EHLO", "HELO", "LHLO"):
            t[s, verb] = ("_on_hello", State.READY)
        t[s, "RSET"] = ("_on_rset", State.READY if s is not State.GREETED else None)
        t[s, "NOOP"] = ("_on_noop", None)
        t[s, "QUIT"] = ("_on_quit", State.CLOSED)
        t[s, "HELP"] = ("_on_help", None)
        t[s, "VRFY"] = ("_on_vrfy", None)
        t[s, "EXPN"] = ("_on_expn", None)
        # BDAT bytes must always be consumed, even when the command is out of sequence.
        t[s, "BDAT"] = ("_on_bdat_refused", State.BDAT)
    t[State.READY, "MAIL"] = ("_on_mail", None)
    t[State.READY, "STARTTLS"] = ("_on_starttls", State.TLS_PENDING)
    t[State.READY, "AUTH"] = ("_on_auth", None)
    t[State.MAIL, "RCPT"] = ("_on_rcpt", None)
    t[State.RCPT, "RCPT"] = ("_on_rcpt", None)
    t[State.RCPT, "DATA"] = ("_on_data", State.DATA)
    t[State.RCPT, "BDAT"] = ("_on_bdat", State.BDAT)
    t[State.BDAT_TXN, "BDAT"] = ("_on_bdat", State.BDAT)
    return t


_TRANSITIONS = _build_transitions()

#: (what was owed, reply positive?) → next state (None: unchanged).
_AFTER_REPLY: dict[tuple[_Owed, bool], State | None] = {
    (_Owed.MAIL, True): State.MAIL,
    (_Owed.MAIL, False): None,
    (_Owed.RCPT, True): State.RCPT,
    (_Owed.RCPT, False): None,
    (_Owed.MESSAGE, True): State.READY,
    (_Owed.MESSAGE, False): State.READY,
    (_Owed.AUTH, True): State.READY,
    (_Owed.AUTH, False): State.READY,
}

_SMTP_VERBS = frozenset(
    {"EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "HELP", "VRFY",
     "EXPN", "STARTTLS", "AUTH"}
)  # fmt: skip
_LMTP_VERBS = (_SMTP_VERBS - {"EHLO", "HELO"}) | {"LHLO"}
#: Commands allowed before STARTTLS when TLS is required (RFC 3207 4).
_PRE_TLS_OK = frozenset({"EHLO", "HELO", "LHLO", "STARTTLS", "NOOP", "RSET", "QUIT", "HELP"})
_PARTIAL_LINE = 4096  # DATA lines are streamed in pieces of at most this

_R_BAD_SEQUENCE = Reply(503, "5.5.1", "Error: bad sequence of commands")
_R_UNKNOWN = Reply(500, "5.5.2", "Error: command not recognized")
_R_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
_R_BARE_LF = Reply(521, "5.5.2", "Error: bare <LF> received")
_R_TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors")
_R_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
_R_NEED_TLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
_R_OK = Reply(250, "2.0.0", "Ok")
_DATA_START = DataStart()  # field-less events: one instance each
_DATA_END = DataEnd()
_LOGIN_USER = "VXNlcm5hbWU6"  # base64("Username:")
_LOGIN_PASS = "UGFzc3dvcmQ6"  # base64("Password:")


def _syntax(usage: str) -> SmtpProtocolError:
    return SmtpProtocolError(Reply(501, "5.5.4", f"Syntax: {usage}"))


def _has_control(text: str) -> bool:
    """A C0 control character other than TAB, or DEL (non-ASCII letters are fine)."""
    return any((ord(ch) < 32 and ch != "\t") or ord(ch) == 127 for ch in text)


class SmtpServerConnection:
    """One server-side SMTP or LMTP session. See the module docstring for the invariants.

    ``tls_active``: the connection is already TLS (implicit TLS, port 465). The greeting is
    queued at construction: call ``data_to_send()`` first.
    """

    def __init__(
        self, config: SmtpServerConfig, *, lmtp: bool = False, tls_active: bool = False
    ) -> None:
        self.config = config
        self.limits = config.limits
        self.lmtp = lmtp
        self.tls_active = tls_active
        self.state = State.GREETED
        self.helo_name: str | None = None
        self.esmtp = False
        self.authenticated: str | None = None
        self._verbs = _LMTP_VERBS if lmtp else _SMTP_VERBS
        self._in = bytearray()
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._eof = False
        self._closed_reported = False
        self._owed: _Owed | None = None
        self._bad_commands = 0
        self._commands_before_tls = 0
        self._lines = LineTaker(self._line_limit)
        # transaction
        self._smtputf8 = False
        self._accepted = 0
        self._message_size = 0
        self._oversize = False
        # DATA scanning
        self._mid_line = False
        self._prev_crlf = True
        # BDAT
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_refusal: Reply | None = None
        self._bdat_return = State.GREETED
        # AUTH exchange
        self._auth_mech = ""
        self._auth_user: str | None = None
        proto = "LMTP" if lmtp else "ESMTP"
        self._queue(Reply(220, "", f"{config.hostname} {proto}"))

    # ----------------------------------------------------------------- public interface

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means EOF."""
        if not data:
            self._eof = True
            return
        if self.state in (State.TLS_PENDING, State.CLOSED):
            return  # bytes sent before the TLS handshake (or after the end) are discarded
        self._in += data

    def data_to_send(self) -> bytes:
        """Reply bytes the engine queued on its own (greeting, errors, 250 to NOOP, …)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def closing(self) -> bool:
        """The session is over: flush ``data_to_send()`` and close the connection."""
        return self.state is State.CLOSED

    @property
    def accepted_recipients(self) -> int:
        """Recipients accepted in the current transaction (LMTP owes one reply each)."""
        return self._accepted

    @property
    def awaiting_reply(self) -> bool:
        return self._owed is not None

    def next_event(self) -> Event | Sentinel:
        """The next event, ``NEED_DATA`` or ``PAUSED``. Never raises for any peer input."""
        if self._events:
            return self._events.popleft()
        if self._owed is not None:
            return PAUSED
        while True:
            if self.state is State.CLOSED:
                if self._closed_reported:
                    return NEED_DATA
                self._closed_reported = True
                return ConnectionClosed()
            if self.state is State.TLS_PENDING:
                return NEED_DATA
            if self.state is State.DATA:
                ev = self._step_data()
            elif self.state is State.BDAT:
                ev = self._step_bdat()
            else:
                line = self._take_line()
                if line is None:
                    if self._eof:
                        self.state = State.CLOSED
                        continue
                    return NEED_DATA
                ev = self._dispatch(line)
            if ev is NEED_DATA:
                if self._eof:
                    self.state = State.CLOSED
                    continue
                return NEED_DATA
            if ev is not None:
                return ev

    def send(self, reply: Reply) -> bytes:
        """Answer the event that left the engine ``PAUSED``; returns every byte to write now
        (replies the engine queued earlier, then this one)."""
        owed = self._owed
        if owed is None:
            raise SmtpUsageError("no reply is owed")
        if owed is _Owed.MESSAGE and self.lmtp:
            raise SmtpUsageError("LMTP needs send_lmtp_replies() after the message")
        self._owed = None
        if owed is _Owed.RCPT and reply.positive:
            self._accepted += 1
        if owed is _Owed.AUTH and reply.code == 235:
            self.authenticated = self._auth_user or ""
        next_state = _AFTER_REPLY[owed, reply.positive]
        if owed is _Owed.MESSAGE:
            self._reset_transaction()
        if next_state is not None:
            self.state = next_state
        self._queue(reply)
        if reply.code >= 500 and owed is _Owed.AUTH:
            closing_ev = self._count_bad()
            if closing_ev is not None:
                self._events.append(closing_ev)
        if reply.closes:
            self.state = State.CLOSED
        return self.data_to_send()

    def send_lmtp_replies(self, replies: list[Reply]) -> bytes:
        """LMTP: one reply per accepted recipient, in RCPT order, after DataEnd/last BdatChunk."""
        if self._owed is not _Owed.MESSAGE or not self.lmtp:
            raise SmtpUsageError("no LMTP message replies are owed")
        if len(replies) != self._accepted:
            raise SmtpUsageError(f"expected {self._accepted} replies, got {len(replies)}")
        self._owed = None
        self._reset_transaction()
        self.state = State.READY
        for reply in replies:
            self._queue(reply)
        return self.data_to_send()

    def starttls_done(self) -> None:
        """The adapter finished the TLS handshake: the session restarts before EHLO."""
        if self.state is not State.TLS_PENDING:
            raise SmtpUsageError("starttls_done() without a STARTTLS")
        self.tls_active = True
        self.state = State.GREETED
        self.helo_name = None
        self.esmtp = False
        self.authenticated = None
        self._reset_transaction()
        self._in.clear()

    # ----------------------------------------------------------------- plumbing

    def _queue(self, reply: Reply) -> None:
        self._out += reply.to_bytes()

    def _reset_transaction(self) -> None:
        self._smtputf8 = False
        self._accepted = 0
        self._message_size = 0
        self._oversize = False
        self._bdat_refusal = None

    def _count_bad(self) -> Event | None:
        self._bad_commands += 1
        if self._bad_commands >= self.limits.max_bad_commands and self.state is not State.CLOSED:
            self._queue(_R_TOO_MANY_ERRORS)
            self.state = State.CLOSED
            return ProtocolViolation(_R_TOO_MANY_ERRORS, "too many errors", closing=True)
        return None

    def _violation(self, err: SmtpProtocolError, reason: str) -> Event:
        self._queue(err.reply)
        if err.closing:
            self.state = State.CLOSED
            return ProtocolViolation(err.reply, reason, closing=True)
        ev: Event = ProtocolViolation(err.reply, reason)
        if err.counts:
            closing_ev = self._count_bad()
            if closing_ev is not None:
                self._events.append(closing_ev)
        return ev

    def _line_limit(self) -> int:
        if self.state is State.AUTH or (self._in[:1] in b"Aa" and self._in[:5].upper() == b"AUTH "):
            return self.limits.max_auth_line_length
        return self.limits.max_line_length

    def _take_line(self) -> bytes | Event | None:
        """One command line without its terminator; an Event for a refused line; None: wait."""
        line = self._lines.take(self._in)
        if line is None:
            return None
        if line is TOO_LONG:
            if self.state is State.AUTH:
                self.state = State.READY
            return self._violation(SmtpProtocolError(_R_TOO_LONG), "line too long")
        assert isinstance(line, bytes)
        if line.endswith(b"\r"):
            return line[:-1]
        if self.config.bare_newline is BareNewline.STRICT:
            return self._violation(SmtpProtocolError(_R_BARE_LF), "bare LF in command")
        return line

    # ----------------------------------------------------------------- commands

    def _dispatch(self, raw: bytes | Event) -> Event | None:
        if not isinstance(raw, bytes):
            return raw
        if self.state is State.AUTH:
            try:
                return self._auth_step(raw)
            except SmtpProtocolError as err:
                self.state = State.READY
                return self._violation(err, "auth exchange")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._violation(
                SmtpProtocolError(Reply(500, "5.5.2", "Error: invalid UTF-8 in command")),
                "invalid UTF-8",
            )
        if not text.replace("\t", " ").isprintable() and _has_control(text):
            return self._violation(
                SmtpProtocolError(Reply(500, "5.5.2", "Error: control character in command")),
                "control character",
            )
        verb, _, arg = text.strip(" \t").partition(" ")
        verb = verb.upper()
        arg = arg.strip(" \t")
        if verb not in self._verbs:
            return self._violation(SmtpProtocolError(_R_UNKNOWN), "unknown command")
        if self.config.require_tls and not self.tls_active:
            self._commands_before_tls += 1
            if self._commands_before_tls > self.limits.max_commands_before_tls:
                too_many = SmtpProtocolError(Reply(421, "4.7.0", "Error: too many commands"))
                return self._violation(too_many, "too many commands before STARTTLS")
            if verb not in _PRE_TLS_OK:
                return self._violation(SmtpProtocolError(_R_NEED_TLS), "TLS required")
        transition = _TRANSITIONS.get((self.state, verb))
        if transition is None:
            reply = _R_BAD_SEQUENCE
            if self.state is State.GREETED:
                reply = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
            return self._violation(SmtpProtocolError(reply), f"bad sequence: {verb}")
        handler_name, next_state = transition
        handler: Callable[[str, str], Event | None] = getattr(self, handler_name)
        try:
            ev = handler(verb, arg)
        except SmtpProtocolError as err:
            return self._violation(err, f"refused {verb}")
        if next_state is not None:
            self.state = next_state
        return ev

    def _on_hello(self, verb: str, arg: str) -> Event:
        if not arg or " " in arg:
            raise _syntax(f"{verb} hostname")
        self._reset_transaction()
        self.helo_name = arg
        if verb == "HELO":
            self.esmtp = False
            self._queue(Reply(250, "", self.config.hostname))
            return Helo(arg)
        self.esmtp = True
        self._queue(Reply(250, "", "\n".join(self._capabilities())))
        return Ehlo(arg)

    def _auth_offered(self) -> bool:
        return self.config.auth and (self.tls_active or self.config.auth_without_tls)

    def _capabilities(self) -> list[str]:
        caps = [self.config.hostname, "PIPELINING", f"SIZE {self.limits.max_message_size}"]
        if self.config.tls_available and not self.tls_active:
            caps.append("STARTTLS")
        if self._auth_offered() and self.authenticated is None:
            caps.append("AUTH " + " ".join(self.config.auth_mechanisms))
        caps += ["ENHANCEDSTATUSCODES", "8BITMIME"]
        if self.config.dsn:
            caps.append("DSN")
        caps += ["SMTPUTF8", "CHUNKING"]
        return caps

    def _on_rset(self, verb: str, arg: str) -> Event:
        if arg:
            raise _syntax("RSET")
        self._reset_transaction()
        self._queue(_R_OK)
        return Rset()

    def _on_noop(self, verb: str, arg: str) -> Event:
        self._queue(_R_OK)
        return Noop()

    def _on_quit(self, verb: str, arg: str) -> Event:
        if arg:
            raise _syntax("QUIT")
        self._queue(Reply(221, "2.0.0", "Bye"))
        self._events.append(ConnectionClosed())
        self._closed_reported = True
        return Quit()

    def _on_help(self, verb: str, arg: str) -> None:
        self._queue(Reply(214, "2.0.0", "See https://www.rfc-editor.org/rfc/rfc5321"))

    def _on_vrfy(self, verb: str, arg: str) -> None:
        if not arg:
            raise _syntax("VRFY address")
        # Never confirms or denies an account (no enumeration oracle).
        self._queue(Reply(252, "2.0.0", "Send some mail, I'll try my best"))

    def _on_expn(self, verb: str, arg: str) -> None:
        raise SmtpProtocolError(Reply(502, "5.5.1", "Error: command not implemented"))

    def _split_colon(self, arg: str, keyword: str, usage: str) -> str:
        head, colon, rest = arg.partition(":")
        if not colon or head.strip(" ").upper() != keyword:
            raise _syntax(usage)
        return rest.lstrip(" ")

    def _on_mail(self, verb: str, arg: str) -> Event:
        usage = "MAIL FROM:<address>"
        if self.config.require_auth and self.authenticated is None:
            raise SmtpProtocolError(Reply(530, "5.7.0", "Authentication required"))
        rest = self._split_colon(arg, "FROM", usage)
        address, params_text = parse_path(rest, mail=True, utf8=True)
        params = parse_mail_params(
            params_text, dsn=self.config.dsn, max_size=self.limits.max_message_size
        )
        if not address.isascii() and not params.smtputf8:
            raise SmtpProtocolError(
                Reply(553, "5.6.7", "Must declare SMTPUTF8 to send UTF-8 addresses")
            )
        self._reset_transaction()
        self._smtputf8 = params.smtputf8
        self._owed = _Owed.MAIL
        return MailFrom(address, params)

    def _on_rcpt(self, verb: str, arg: str) -> Event:
        rest = self._split_colon(arg, "TO", "RCPT TO:<address>")
        address, params_text = parse_path(rest, mail=False, utf8=True)
        params = parse_rcpt_params(params_text, dsn=self.config.dsn)
        if not address.isascii() and not self._smtputf8:
            raise SmtpProtocolError(
                Reply(553, "5.6.7", "Must declare SMTPUTF8 to send UTF-8 addresses")
            )
        if self._accepted >= self.limits.max_recipients:
            raise SmtpProtocolError(Reply(452, "4.5.3", "Error: too many recipients"))
        self._owed = _Owed.RCPT
        return RcptTo(address, params)

    def _on_data(self, verb: str, arg: str) -> Event:
        if arg:
            raise _syntax("DATA")
        self._queue(Reply(354, "", "End data with <CR><LF>.<CR><LF>"))
        self._message_size = 0
        self._oversize = False
        self._mid_line = False
        self._prev_crlf = True
        return _DATA_START

    def _parse_bdat(self, arg: str) -> None:
        parts = arg.split()
        if (
            not 1 <= len(parts) <= 2
            or not parts[0].isdigit()
            or not parts[0].isascii()
            or len(parts[0]) > 20
            or (len(parts) == 2 and parts[1].upper() != "LAST")
        ):
            # The chunk's length is unknown, so its bytes would be read as commands: close.
            raise SmtpProtocolError(Reply(501, "5.5.4", "Syntax: BDAT count [LAST]"), closing=True)
        self._bdat_left = int(parts[0])
        self._bdat_last = len(parts) == 2

    def _on_bdat_refused(self, verb: str, arg: str) -> None:
        self._parse_bdat(arg)
        self._bdat_refusal = _R_BAD_SEQUENCE
        self._bdat_return = self.state

    def _on_bdat(self, verb: str, arg: str) -> Event | None:
        self._parse_bdat(arg)
        if self.state is not State.BDAT_TXN:
            self._message_size = 0
            self._oversize = False
        return None

    def _on_starttls(self, verb: str, arg: str) -> Event:
        if arg:
            raise _syntax("STARTTLS")
        if not self.config.tls_available or self.tls_active:
            raise SmtpProtocolError(Reply(502, "5.5.1", "Error: command not implemented"))
        self._queue(Reply(220, "2.0.0", "Ready to start TLS"))
        self._in.clear()  # CVE-2011-0411: nothing pipelined after STARTTLS survives
        return StartTls()

    # ----------------------------------------------------------------- AUTH

    def _on_auth(self, verb: str, arg: str) -> Event | None:
        if not self._auth_offered():
            if self.config.auth and self.config.tls_available:
                raise SmtpProtocolError(_R_NEED_TLS)
            raise SmtpProtocolError(Reply(503, "5.5.1", "Error: authentication not enabled"))
        if self.authenticated is not None:
            raise SmtpProtocolError(Reply(503, "5.5.1", "Error: already authenticated"))
        parts = arg.split(" ")
        if not 1 <= len(parts) <= 2 or not parts[0]:
            raise _syntax("AUTH mechanism [initial-response]")
        mech = parts[0].upper()
        if mech not in self.config.auth_mechanisms or mech not in ("PLAIN", "LOGIN"):
            raise SmtpProtocolError(Reply(504, "5.5.4", "Unrecognized authentication type"))
        self._auth_mech = mech
        self._auth_user = None
        initial = parts[1] if len(parts) == 2 else None
        if initial is None:
            self.state = State.AUTH
            self._queue(Reply(334, "", _LOGIN_USER if mech == "LOGIN" else ""))
            return None
        if initial == "*":
            raise SmtpProtocolError(Reply(501, "5.7.0", "Authentication aborted"))
        return self._auth_response(decode_base64(initial))

    def _auth_step(self, raw: bytes) -> Event | None:
        try:
            text = raw.decode("ascii").strip(" ")
        except UnicodeDecodeError:
            raise SmtpProtocolError(Reply(501, "5.5.2", "Cannot decode response")) from None
        if text == "*":
            raise SmtpProtocolError(Reply(501, "5.7.0", "Authentication aborted"))
        return self._auth_response(decode_base64(text))

    def _auth_response(self, data: bytes) -> Event | None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise SmtpProtocolError(Reply(501, "5.5.2", "Cannot decode response")) from None
        if self._auth_mech == "LOGIN":
            if self._auth_user is None:
                self._auth_user = text
                self.state = State.AUTH
                self._queue(Reply(334, "", _LOGIN_PASS))
                return None
            self.state = State.READY
            self._owed = _Owed.AUTH
            return AuthRequest("LOGIN", "", self._auth_user, text)
        parts = text.split("\0")
        if len(parts) != 3 or not parts[1]:
            raise SmtpProtocolError(Reply(501, "5.5.2", "Invalid PLAIN response"))
        self.state = State.READY
        self._auth_user = parts[1]
        self._owed = _Owed.AUTH
        return AuthRequest("PLAIN", parts[0], parts[1], parts[2])

    # ----------------------------------------------------------------- message data

    def _abort_oversize(self) -> Event:
        count = self._accepted if self.lmtp else 1
        self._reset_transaction()
        self.state = State.READY
        for _ in range(max(count, 1)):
            self._queue(_R_TOO_BIG)
        return DataAborted(_R_TOO_BIG)

    def _add_content(self, out: bytearray, piece: bytes | bytearray) -> None:
        self._message_size += len(piece)
        if self._message_size > self.limits.max_message_size:
            self._oversize = True
        if not self._oversize:
            out += piece

    def _step_data(self) -> Event | Sentinel | None:
        """Scan DATA content; return a DataChunk, the end events, a violation, or NEED_DATA.

        Fast path: at the start of a line that does not begin with ``.`` (the line before ended
        in CRLF), the run of complete lines up to the next line that starts with ``.`` (found
        with one search for ``<LF>.``) is taken as it is when every ``<LF>`` in it is preceded by
        ``<CR>`` (two counts): such lines need neither unstuffing nor line-end repair. Everything
        else — a ``.`` line (the end, or a stuffed line), a line with a bare ``<LF>``, a line
        longer than the chunk budget, a partial line — goes through the line-by-line path, whose
        rules are the definition. A bare ``<LF>`` anywhere in reach switches the rest of the
        chunk to that path, so a message full of them costs no repeated scans."""
        out = bytearray()
        buf = self._in
        limit = self.limits.data_chunk_size
        fast = True
        while len(out) < limit:
            if fast and not self._mid_line and self._prev_crlf and buf[:1] != b".":
                end = buf.rfind(b"\n", 0, limit - len(out))
                if end >= 0:
                    dot = buf.find(b"\n.", 0, end)
                    if dot >= 0:
                        end = dot
                    end += 1
                    if buf.count(b"\n", 0, end) == buf.count(b"\r\n", 0, end):
                        self._add_content(out, buf[:end])
                        del buf[:end]
                        continue
                    fast = False
            ev = self._data_line(out)
            if ev is NEED_DATA:
                break
            if ev is not None:
                return ev
        if out:
            return DataChunk(bytes(out))
        return NEED_DATA

    def _data_line(self, out: bytearray) -> Event | Sentinel | None:
        """One DATA line (or a piece of a long one) from the input into ``out``: None when
        consumed, NEED_DATA when more input is needed, or the event that ends the data (after
        ``out``, if it holds content, as a DataChunk)."""
        buf = self._in
        idx = buf.find(b"\n", 0, _PARTIAL_LINE)
        if idx < 0:
            # No complete line: stream long partial lines, keeping a trailing CR (it may
            # start the CRLF) and enough of a line start to recognise "." CR LF.
            if not self._mid_line and len(buf) < _PARTIAL_LINE:
                return NEED_DATA
            take = min(len(buf), _PARTIAL_LINE)
            if buf[take - 1 : take] == b"\r":
                take -= 1
            if take <= 0:
                return NEED_DATA
            start = 1 if not self._mid_line and buf[:1] == b"." else 0
            self._add_content(out, bytes(buf[start:take]))
            del buf[:take]
            self._mid_line = True
            return None
        line = bytes(buf[: idx + 1])
        del buf[: idx + 1]
        content = line[:-1]
        crlf = content.endswith(b"\r")
        if crlf:
            content = content[:-1]
        elif self.config.bare_newline is BareNewline.STRICT:
            self._in.clear()
            self._reset_transaction()
            ev = self._violation(SmtpProtocolError(_R_BARE_LF), "bare LF in DATA")
            if out:  # what came before, as the line-by-line reading would have streamed it
                self._events.append(ev)
                return DataChunk(bytes(out))
            return ev
        if not self._mid_line:
            if content == b"." and crlf and self._prev_crlf:
                if out:
                    self._events.append(self._finish_message())
                    return DataChunk(bytes(out))
                return self._finish_message()
            if content.startswith(b"."):
                content = content[1:]
        self._mid_line = False
        self._prev_crlf = crlf
        self._add_content(out, content + b"\r\n")
        return None

    def _finish_message(self) -> Event:
        if self._oversize:
            return self._abort_oversize()
        self.state = State.DATA  # stays until the app's reply moves it (see _AFTER_REPLY)
        self._owed = _Owed.MESSAGE
        return _DATA_END

    def _step_bdat(self) -> Event | Sentinel | None:
        if self._bdat_left > 0:
            if not self._in:
                return NEED_DATA
            n = min(self._bdat_left, len(self._in), self.limits.data_chunk_size)
            piece = bytes(self._in[:n])
            del self._in[:n]
            self._bdat_left -= n
            out = bytearray()
            if self._bdat_refusal is None:
                self._add_content(out, piece)
            if self._bdat_left > 0:
                return BdatChunk(bytes(out)) if out else None
            return self._bdat_done(bytes(out))
        return self._bdat_done(b"")

    def _bdat_done(self, piece: bytes) -> Event | None:
        """The current BDAT command's octets are all read."""
        if self._bdat_refusal is not None:
            reply = self._bdat_refusal
            self._bdat_refusal = None
            self.state = self._bdat_return
            return self._violation(SmtpProtocolError(reply), "BDAT out of sequence")
        if self._oversize:
            ev = self._abort_oversize()
            if piece:
                self._events.append(ev)
                return BdatChunk(piece)
            return ev
        if self._bdat_last:
            self._owed = _Owed.MESSAGE
            return BdatChunk(piece, last=True)
        self.state = State.BDAT_TXN
        self._queue(Reply(250, "2.0.0", f"{self._message_size} octets received"))
        return BdatChunk(piece) if piece else None
