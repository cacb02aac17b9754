"""The POP3 server (RFC 1939, RFC 2449 CAPA, RFC 2595 STLS, RFC 5034 SASL) as a sans-IO state
machine.

Theory of operation
-------------------
The engine owns the protocol, the application owns the mail. A session starts in
AUTHORIZATION; USER/PASS or AUTH PLAIN produce an :class:`AuthRequest`, which the application
answers with ``send(ok(...), maildrop=DropListing(...))`` (it checked the password and opened
the maildrop: sizes and unique ids of a snapshot) or ``send(err(...))``. From then on, in
TRANSACTION, the engine answers STAT, LIST, UIDL, DELE, RSET, NOOP and CAPA itself from the
listing and its own deletion marks; only RETR/TOP (:class:`Retrieve`: the app supplies the
message, the engine cuts TOP's lines and byte-stuffs) and QUIT (:class:`Update`: the app
removes the marked messages durably, then answers) need the application.

Invariants
----------
1. **No exception escapes for peer input.** ``receive_data`` and ``next_event`` turn any byte
   stream into events and queued replies; what the peer did wrong becomes a
   :class:`ProtocolViolation` with a fixed-text ``-ERR``. Only *application* misuse raises
   :class:`Pop3UsageError`.
2. **Replies leave in command order** (RFC 2449 PIPELINING). The engine stops (``PAUSED``)
   after each event that needs the application and processes nothing more until ``send``.
3. **Bounded memory.** A command line longer than ``max_line_length`` (``max_auth_line_length``
   for AUTH and SASL responses) is discarded as it arrives and answered ``-ERR``; the input
   buffer holds at most one line plus what the adapter fed and ``next_event`` has not reached.
4. **Nothing received before TLS survives STLS** (RFC 2595 4, the STARTTLS command injection
   of CVE-2011-0411): after ``+OK`` to STLS the input buffer is emptied and input is ignored
   until ``starttls_done()``, which restarts AUTHORIZATION (a USER name given before is gone).
5. **No mailbox access before login.** In AUTHORIZATION only CAPA, USER, PASS, AUTH, STLS and
   QUIT exist; anything else is ``-ERR`` without an event. Plaintext authentication (USER/PASS,
   AUTH) before TLS is refused with ``-ERR [AUTH]`` unless ``allow_plaintext_auth``, and CAPA
   advertises USER and SASL only where they would be accepted.
6. **Deletion happens only in UPDATE.** DELE and RSET only change the engine's marks; the
   marked messages reach the application only in :class:`Update`, after QUIT in TRANSACTION.
   EOF, a timeout or a closing error never produce an :class:`Update`.
7. **All transitions are in** ``_TRANSITIONS`` (state, verb) → (handler, next state on
   success); the outcome of an application reply is in ``_AFTER_REPLY``. A known verb in the
   wrong state is ``-ERR`` "not valid in this state", an unknown one "unknown command".
8. Every engine-refused command and every failed login counts against ``max_bad_commands``;
   at the limit the reply is ``-ERR`` and the session closes. Commands in AUTHORIZATION are
   limited to ``max_commands_before_auth``. Python exception text never reaches the wire.

Multi-line responses (RFC 1939 3): every line ends in CRLF, a line starting with ``.`` is sent
with one more ``.``, and ``.CRLF`` ends the response (:func:`~.events.stuff`). A message's LIST
size is what the application says; the maildrop service reports the stored size, which is the
octet count sent before stuffing for a body stored with CRLF line ends (delivery stores that).
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..lines import TOO_LONG, LineTaker
from .events import (
    NEED_DATA,
    PAUSED,
    AuthRequest,
    ConnectionClosed,
    DropListing,
    Event,
    Pop3ProtocolError,
    Pop3UsageError,
    ProtocolViolation,
    Quit,
    Reply,
    Retrieve,
    Sentinel,
    StartTls,
    Update,
    err,
    ok,
)

__all__ = ["Pop3Limits", "Pop3ServerConfig", "Pop3ServerConnection", "State", "top_of"]


@dataclass(frozen=True)
class Pop3Limits:
    """Abuse limits, with defaults.

    - ``max_line_length`` 512: a command line, CRLF included (RFC 2449 4 allows 255; twice
      that leaves room for long user names and passwords).
    - ``max_auth_line_length`` 8192: an ``AUTH`` command or a SASL response line (base64).
    - ``max_bad_commands`` 20: engine-refused commands and failed logins per session.
    - ``max_commands_before_auth`` 50: command lines in AUTHORIZATION before the session is
      closed (a connection that never logs in cannot stay forever by sending CAPA).
    """

    max_line_length: int = 512
    max_auth_line_length: int = 8192
    max_bad_commands: int = 20
    max_commands_before_auth: int = 50

    def __post_init__(self) -> None:
        if min(self.max_line_length, self.max_auth_line_length) < 16:
            raise ValueError("line limits must be at least 16 bytes")
        if min(self.max_bad_commands, self.max_commands_before_auth) < 1:
            raise ValueError("counting limits must be positive")


@dataclass(frozen=True)
class Pop3ServerConfig:
    """What the server offers.

    - ``hostname``: in the greeting.
    - ``tls_available``: STLS is offered (until TLS is active).
    - ``allow_plaintext_auth``: USER/PASS and AUTH work without TLS (else ``-ERR [AUTH]``).
    - ``implementation``: the CAPA IMPLEMENTATION text (RFC 2449 6.9); ``""`` omits it.
    """

    hostname: str
    tls_available: bool = False
    allow_plaintext_auth: bool = False
    implementation: str = "mailharbor"
    limits: Pop3Limits = field(default_factory=Pop3Limits)


class State(enum.Enum):
    AUTHORIZATION = "authorization"  # before a successful login
    SASL = "sasl"  # "+ " sent to AUTH, waiting for the client's response line
    TRANSACTION = "transaction"  # logged in, maildrop open
    UPDATE = "update"  # QUIT received in TRANSACTION, the app is applying the deletions
    TLS_PENDING = "tls_pending"  # +OK to STLS sent, waiting for starttls_done()
    CLOSED = "closed"


class _Owed(enum.Enum):
    """Which application answer the engine is waiting for."""

    LOGIN = "login"
    RETRIEVE = "retrieve"
    UPDATE = "update"


_Transition = tuple[str, State | None]


def _build_transitions() -> dict[tuple[State, str], _Transition]:
    a, t = State.AUTHORIZATION, State.TRANSACTION
    return {
        (a, "CAPA"): ("_on_capa", None),
        (a, "USER"): ("_on_user", None),
        (a, "PASS"): ("_on_pass", None),
        (a, "AUTH"): ("_on_auth", None),
        (a, "STLS"): ("_on_stls", State.TLS_PENDING),
        (a, "QUIT"): ("_on_quit_auth", State.CLOSED),
        (t, "CAPA"): ("_on_capa", None),
        (t, "STAT"): ("_on_stat", None),
        (t, "LIST"): ("_on_list", None),
        (t, "UIDL"): ("_on_uidl", None),
        (t, "RETR"): ("_on_retr", None),
        (t, "TOP"): ("_on_top", None),
        (t, "DELE"): ("_on_dele", None),
        (t, "RSET"): ("_on_rset", None),
        (t, "NOOP"): ("_on_noop", None),
        (t, "QUIT"): ("_on_quit_transaction", State.UPDATE),
    }


_TRANSITIONS = _build_transitions()
_VERBS = frozenset(verb for _, verb in _TRANSITIONS)

#: (what was owed, reply positive?) → next state (None: unchanged).
_AFTER_REPLY: dict[tuple[_Owed, bool], State | None] = {
    (_Owed.LOGIN, True): State.TRANSACTION,
    (_Owed.LOGIN, False): State.AUTHORIZATION,
    (_Owed.RETRIEVE, True): None,
    (_Owed.RETRIEVE, False): None,
    (_Owed.UPDATE, True): State.CLOSED,
    (_Owed.UPDATE, False): State.CLOSED,
}

_R_UNKNOWN = err("Unknown command")
_R_BAD_STATE = err("Command not valid in this state")
_R_TOO_LONG = err("Line too long")
_R_TOO_MANY_ERRORS = err("Too many bad commands, closing connection")
_R_TOO_MANY_COMMANDS = err("Too many commands before login, closing connection")
_R_PLAINTEXT = err("Plaintext authentication disallowed on non-secure connection", "AUTH")
_R_NO_SUCH = err("No such message")
_R_DELETED = err("Message already deleted")
_R_BAD_NUMBER = err("Invalid message number")
_CONTINUE = b"+ \r\n"
_MAX_NUMBER_DIGITS = 10


def _syntax(usage: str) -> Pop3ProtocolError:
    return Pop3ProtocolError(err(f"Syntax: {usage}"))


def _has_control(text: str) -> bool:
    """A C0 control character other than TAB, or DEL (non-ASCII letters are fine)."""
    return any((ord(ch) < 32 and ch != "\t") or ord(ch) == 127 for ch in text)


def top_of(message: bytes, lines: int) -> bytes:
    """RFC 1939 TOP: the header, the blank line after it and the first ``lines`` body lines.

    Line ends are normalised to CRLF first. A message without a blank line is all header.
    """
    if message.count(b"\n") != message.count(b"\r\n"):
        message = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if message.startswith(b"\r\n"):
        body_start = 2
    else:
        sep = message.find(b"\r\n\r\n")
        if sep < 0:
            return message
        body_start = sep + 4
    pos = body_start
    for _ in range(lines):
        nl = message.find(b"\r\n", pos)
        if nl < 0:
            return message
        pos = nl + 2
    return message[:pos]


class Pop3ServerConnection:
    """One server-side POP3 session. See the module docstring for the invariants.

    ``tls_active``: the connection is already TLS (implicit TLS, port 995). The greeting is
    queued at construction: call ``data_to_send()`` first.
    """

    def __init__(self, config: Pop3ServerConfig, *, tls_active: bool = False) -> None:
        self.config = config
        self.limits = config.limits
        self.tls_active = tls_active
        self.state = State.AUTHORIZATION
        #: The identity that logged in (as the client typed it), None before.
        self.user: str | None = None
        self._in = bytearray()
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._eof = False
        self._closed_reported = False
        self._owed: _Owed | None = None
        self._owed_top: int | None = None
        self._bad_commands = 0
        self._commands_before_auth = 0
        self._lines = LineTaker(self._line_limit)
        self._pending_user: str | None = None
        self._login: AuthRequest | None = None
        self._sizes: tuple[int, ...] = ()
        self._uids: tuple[str, ...] = ()
        self._deleted: set[int] = set()
        self._queue(ok(f"{config.hostname} POP3 server ready"))

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
        """Reply bytes the engine queued on its own (greeting, errors, STAT, LIST, …)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def closing(self) -> bool:
        """The session is over: flush ``data_to_send()`` and close the connection."""
        return self.state is State.CLOSED

    @property
    def awaiting_reply(self) -> bool:
        return self._owed is not None

    @property
    def deleted(self) -> frozenset[int]:
        """0-based indexes marked deleted in this session (not yet removed)."""
        return frozenset(self._deleted)

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
            line = self._take_line()
            if line is None:
                if self._eof:
                    self.state = State.CLOSED
                    continue
                return NEED_DATA
            ev = self._dispatch(line)
            if ev is not None:
                return ev
            if self._events:
                return self._events.popleft()

    def send(self, reply: Reply, *, maildrop: DropListing | None = None) -> bytes:
        """Answer the event that left the engine ``PAUSED``; returns every byte to write now
        (replies the engine queued earlier, then this one).

        A positive answer to :class:`AuthRequest` needs ``maildrop``; a positive answer to
        :class:`Retrieve` needs a ``body`` (the whole message; the engine cuts it for TOP).
        """
        owed = self._owed
        if owed is None:
            raise Pop3UsageError("no reply is owed")
        if owed is _Owed.LOGIN and reply.positive and maildrop is None:
            raise Pop3UsageError("a successful login needs the maildrop listing")
        if owed is not _Owed.LOGIN and maildrop is not None:
            raise Pop3UsageError("a maildrop listing only answers a login")
        if owed is _Owed.RETRIEVE and reply.positive:
            if reply.body is None:
                raise Pop3UsageError("a positive RETR/TOP answer needs the message body")
            if self._owed_top is not None:
                reply = Reply(True, reply.text, "", top_of(reply.body, self._owed_top))
        elif reply.body is not None:
            raise Pop3UsageError("only RETR/TOP answers are multi-line")
        self._owed = None
        self._owed_top = None
        login, self._login = self._login, None
        next_state = _AFTER_REPLY[owed, reply.positive]
        if next_state is not None:
            self.state = next_state
        self._queue(reply)
        if owed is _Owed.LOGIN:
            if reply.positive and maildrop is not None and login is not None:
                self.user = login.identity
                self._sizes, self._uids = maildrop.sizes, maildrop.uids
                self._deleted = set()
            else:
                self._count_bad(replace_reply=False)
        if self.state is State.CLOSED:
            self._events.append(ConnectionClosed())
            self._closed_reported = True
        return self.data_to_send()

    def starttls_done(self) -> None:
        """The adapter finished the TLS handshake: AUTHORIZATION starts over (RFC 2595 4)."""
        if self.state is not State.TLS_PENDING:
            raise Pop3UsageError("starttls_done() without a STLS")
        self.tls_active = True
        self.state = State.AUTHORIZATION
        self._pending_user = None
        self._commands_before_auth = 0
        self._in.clear()

    # ----------------------------------------------------------------- plumbing

    def _queue(self, reply: Reply) -> None:
        self._out += reply.to_bytes()

    def _count_bad(self, *, replace_reply: bool) -> bool:
        """Count one bad command; True (and CLOSED) when the budget is spent."""
        self._bad_commands += 1
        if self._bad_commands >= self.limits.max_bad_commands and self.state is not State.CLOSED:
            if replace_reply:
                self._queue(_R_TOO_MANY_ERRORS)
            self.state = State.CLOSED
            return True
        return False

    def _violation(self, exc: Pop3ProtocolError, reason: str) -> Event:
        if exc.closing:
            self._queue(exc.reply)
            self.state = State.CLOSED
            return ProtocolViolation(exc.reply, reason, closing=True)
        if exc.counts and self._count_bad(replace_reply=True):
            return ProtocolViolation(_R_TOO_MANY_ERRORS, reason, closing=True)
        self._queue(exc.reply)
        return ProtocolViolation(exc.reply, reason)

    def _line_limit(self) -> int:
        if self.state is State.SASL or self._in[:5].upper() == b"AUTH ":
            return self.limits.max_auth_line_length
        return self.limits.max_line_length

    def _take_line(self) -> bytes | Event | None:
        """One line without its terminator; an Event for a refused line; None: wait."""
        line = self._lines.take(self._in)
        if line is None:
            return None
        if line is TOO_LONG:
            if self.state is State.SASL:
                self.state = State.AUTHORIZATION
            return self._violation(Pop3ProtocolError(_R_TOO_LONG), "line too long")
        assert isinstance(line, bytes)
        return line[:-1] if line.endswith(b"\r") else line

    # ----------------------------------------------------------------- commands

    def _dispatch(self, raw: bytes | Event) -> Event | None:
        if not isinstance(raw, bytes):
            return raw
        if self.state is State.SASL:
            self.state = State.AUTHORIZATION
            try:
                return self._sasl_response(raw)
            except Pop3ProtocolError as exc:
                return self._violation(exc, "auth exchange")
        if self.state is State.AUTHORIZATION:
            self._commands_before_auth += 1
            if self._commands_before_auth > self.limits.max_commands_before_auth:
                return self._violation(
                    Pop3ProtocolError(_R_TOO_MANY_COMMANDS, closing=True),
                    "too many commands before login",
                )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._violation(
                Pop3ProtocolError(err("Invalid UTF-8 in command")), "invalid UTF-8"
            )
        if _has_control(text):
            return self._violation(
                Pop3ProtocolError(err("Control character in command")), "control character"
            )
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if verb not in _VERBS:
            return self._violation(Pop3ProtocolError(_R_UNKNOWN), "unknown command")
        transition = _TRANSITIONS.get((self.state, verb))
        if transition is None:
            return self._violation(Pop3ProtocolError(_R_BAD_STATE), f"bad state: {verb}")
        handler_name, next_state = transition
        handler: Callable[[str], Event | None] = getattr(self, handler_name)
        if verb != "PASS":
            arg = arg.strip(" \t")
        try:
            ev = handler(arg)
        except Pop3ProtocolError as exc:
            return self._violation(exc, f"refused {verb}")
        if next_state is not None:
            self.state = next_state
        return ev

    def _auth_offered(self) -> bool:
        return self.tls_active or self.config.allow_plaintext_auth

    def _capabilities(self) -> list[str]:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state is State.AUTHORIZATION:
            if self._auth_offered():
                caps += ["USER", "SASL PLAIN"]
            if self.config.tls_available and not self.tls_active:
                caps.append("STLS")
        if self.config.implementation:
            caps.append(f"IMPLEMENTATION {self.config.implementation}")
        return caps

    def _on_capa(self, arg: str) -> None:
        if arg:
            raise _syntax("CAPA")
        body = "".join(c + "\r\n" for c in self._capabilities()).encode("ascii")
        self._queue(ok("Capability list follows", body))

    def _on_stls(self, arg: str) -> Event:
        if arg:
            raise _syntax("STLS")
        if self.tls_active:
            raise Pop3ProtocolError(err("Command not permitted when TLS active"))
        if not self.config.tls_available:
            raise Pop3ProtocolError(err("STLS not available"))
        self._queue(ok("Begin TLS negotiation"))
        self._in.clear()  # CVE-2011-0411: nothing pipelined after STLS survives
        self._pending_user = None
        return StartTls()

    def _on_quit_auth(self, arg: str) -> Event:
        self._queue(ok(f"{self.config.hostname} POP3 server signing off"))
        self._events.append(ConnectionClosed())
        self._closed_reported = True
        return Quit()

    def _on_user(self, arg: str) -> None:
        if not self._auth_offered():
            raise Pop3ProtocolError(_R_PLAINTEXT)
        if not arg:
            raise _syntax("USER name")
        self._pending_user = arg
        self._queue(ok("Send your password"))

    def _on_pass(self, arg: str) -> Event:
        if not self._auth_offered():
            raise Pop3ProtocolError(_R_PLAINTEXT)
        user, self._pending_user = self._pending_user, None
        if user is None:
            raise Pop3ProtocolError(err("USER first"))
        if not arg:
            raise _syntax("PASS password")
        return self._request_login(AuthRequest("USER", "", user, arg))

    def _on_auth(self, arg: str) -> Event | None:
        if not self._auth_offered():
            raise Pop3ProtocolError(_R_PLAINTEXT)
        self._pending_user = None
        if not arg:  # the pre-RFC 5034 listing some clients probe with
            self._queue(ok("Supported mechanisms follow", b"PLAIN\r\n"))
            return None
        parts = arg.split(" ")
        if len(parts) > 2 or not parts[0]:
            raise _syntax("AUTH mechanism [initial-response]")
        if parts[0].upper() != "PLAIN":
            raise Pop3ProtocolError(err("Unsupported authentication mechanism"))
        if len(parts) == 1:
            self.state = State.SASL
            self._out += _CONTINUE
            return None
        if parts[1] == "*":
            raise Pop3ProtocolError(err("Authentication cancelled"), counts=False)
        return self._plain(b"" if parts[1] == "=" else self._b64(parts[1]))

    def _b64(self, text: str) -> bytes:
        try:
            return base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise Pop3ProtocolError(err("Invalid base64 data")) from None

    def _sasl_response(self, raw: bytes) -> Event:
        text = raw.strip(b" \t")
        if text == b"*":
            raise Pop3ProtocolError(err("Authentication cancelled"), counts=False)
        try:
            decoded = text.decode("ascii")
        except UnicodeDecodeError:
            raise Pop3ProtocolError(err("Invalid base64 data")) from None
        return self._plain(self._b64(decoded))

    def _plain(self, data: bytes) -> Event:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise Pop3ProtocolError(err("Invalid PLAIN response")) from None
        parts = text.split("\0")
        if len(parts) != 3 or not parts[1] or _has_control(parts[1]):
            raise Pop3ProtocolError(err("Invalid PLAIN response"))
        return self._request_login(AuthRequest("PLAIN", parts[0], parts[1], parts[2]))

    def _request_login(self, req: AuthRequest) -> Event:
        self._login = req
        self._owed = _Owed.LOGIN
        return req

    # -- TRANSACTION -----------------------------------------------------------------------------

    def _number(self, arg: str) -> int:
        """A message number argument → 0-based index of an existing, undeleted message."""
        if not arg.isdigit() or not arg.isascii() or len(arg) > _MAX_NUMBER_DIGITS:
            raise Pop3ProtocolError(_R_BAD_NUMBER)
        n = int(arg)
        if not 1 <= n <= len(self._sizes):
            raise Pop3ProtocolError(_R_NO_SUCH, counts=False)
        if n - 1 in self._deleted:
            raise Pop3ProtocolError(_R_DELETED, counts=False)
        return n - 1

    def _live(self) -> list[int]:
        return [i for i in range(len(self._sizes)) if i not in self._deleted]

    def _drop_summary(self) -> tuple[int, int]:
        live = self._live()
        return len(live), sum(self._sizes[i] for i in live)

    def _on_stat(self, arg: str) -> None:
        if arg:
            raise _syntax("STAT")
        count, size = self._drop_summary()
        self._queue(ok(f"{count} {size}"))

    def _on_list(self, arg: str) -> None:
        if arg:
            i = self._number(arg)
            self._queue(ok(f"{i + 1} {self._sizes[i]}"))
            return
        count, size = self._drop_summary()
        body = "".join(f"{i + 1} {self._sizes[i]}\r\n" for i in self._live()).encode("ascii")
        self._queue(ok(f"{count} messages ({size} octets)", body))

    def _on_uidl(self, arg: str) -> None:
        if arg:
            i = self._number(arg)
            self._queue(ok(f"{i + 1} {self._uids[i]}"))
            return
        body = "".join(f"{i + 1} {self._uids[i]}\r\n" for i in self._live()).encode("ascii")
        self._queue(ok("Unique-ID listing follows", body))

    def _on_retr(self, arg: str) -> Event:
        if not arg:
            raise _syntax("RETR msg")
        i = self._number(arg)
        self._owed = _Owed.RETRIEVE
        return Retrieve(i + 1)

    def _on_top(self, arg: str) -> Event:
        parts = arg.split()
        if len(parts) != 2:
            raise _syntax("TOP msg n")
        n = parts[1]
        if not n.isdigit() or not n.isascii() or len(n) > _MAX_NUMBER_DIGITS:
            raise _syntax("TOP msg n")
        i = self._number(parts[0])
        self._owed = _Owed.RETRIEVE
        self._owed_top = int(n)
        return Retrieve(i + 1, int(n))

    def _on_dele(self, arg: str) -> None:
        if not arg:
            raise _syntax("DELE msg")
        i = self._number(arg)
        self._deleted.add(i)
        self._queue(ok(f"Message {i + 1} deleted"))

    def _on_rset(self, arg: str) -> None:
        if arg:
            raise _syntax("RSET")
        self._deleted.clear()
        count, size = self._drop_summary()
        self._queue(ok(f"Maildrop has {count} messages ({size} octets)"))

    def _on_noop(self, arg: str) -> None:
        if arg:
            raise _syntax("NOOP")
        self._queue(ok())

    def _on_quit_transaction(self, arg: str) -> Event:
        self._owed = _Owed.UPDATE
        return Update(tuple(sorted(self._deleted)))
