"""The IMAP4rev2 / IMAP4rev1 server (RFC 9051, RFC 3501) as a sans-IO state machine.

Theory of operation
-------------------
Bytes go in with ``receive_data``; ``next_event`` frames them into complete commands (lines
and literals), parses them (:mod:`.parser`), checks them against the state table and returns
events; the app answers with ``send``; every response byte the engine produces on its own
waits in ``data_to_send()``.

Framing: a command is one line, or several when a line ends in a literal marker ``{n}``,
``{n+}`` (RFC 7888) or ``~{n}``; the ``n`` octets after the marker's CRLF are literal data
and are never scanned for line ends. A marker inside a quoted string is not a marker. Lines
end in CRLF (a bare LF is accepted as well).

Invariants
----------
1. **No exception escapes for client input.** A syntax error becomes a tagged ``BAD`` (the
   tag recovered when possible, else ``* BAD``) with a fixed text; only application misuse
   raises (:class:`~.events.ImapUsageError`).
2. **One command at a time, responses in order.** After a :class:`~.events.Request` the app
   owes a tagged response, ``next_event`` returns ``PAUSED`` and reads nothing until ``send``
   gets it. Pipelined commands wait in the input buffer.
3. **Bounded memory.** A command holds at most ``max_line_length`` octets of lines plus
   ``max_literal`` octets of literals (``max_literal_before_auth`` before login). A longer
   line is discarded as it arrives (constant memory) and answered ``BAD``. The input buffer
   holds, besides that, only what the adapter fed and ``next_event`` has not yet consumed —
   adapters feed a read only after ``NEED_DATA`` (or while IDLE).
4. **A literal is data, never a command.** Over-limit literals: a synchronising one is refused
   before ``+`` is sent (``NO [TOOBIG]`` for APPEND, else ``BAD [TOOBIG]``) and the session
   goes on — unless octets after the marker are already buffered: the client did not wait for
   ``+``, its literal is on the way and where it ends cannot be known, so the engine adds
   ``* BYE`` and closes. A non-synchronising one (whose octets arrive regardless) makes the
   engine answer ``BAD [TOOBIG]`` and ``* BYE`` and close, for the same reason. A too-long
   line that ends in a literal marker closes likewise when the marker is ``{n+}`` or octets
   follow it. A synchronising literal of a command that is invalid in the current state (or
   of a LOGIN that would be refused for lack of TLS) is refused before ``+``, so nobody is
   invited to send a password or a message that would be thrown away.
5. **Nothing received before TLS survives STARTTLS** (RFC 9051 6.2.1; CVE-2011-0411). After
   the tagged OK to STARTTLS the input buffer is emptied and input is ignored until
   ``starttls_done()``.
6. **All state changes are in** ``_TRANSITIONS``: (state, verb) → the state after a tagged
   OK and after a NO; a (state, verb) pair missing from it is answered ``BAD`` with no state
   change (SELECT before LOGIN, FETCH without a selected mailbox, LOGIN twice...). A BAD
   leaves the state unchanged.
7. **Budgets.** ``max_bad_commands`` BAD responses in a row (engine or app) end the session
   with ``* BYE``; so do ``max_auth_failures`` failed LOGIN/AUTHENTICATE.
8. Python exception text never reaches the wire; application text is sanitised to one line.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass, field

from .commands import (
    Authenticate,
    AuthenticateStart,
    Capability,
    Command,
    Enable,
    Fetch,
    FetchAtt,
    Id,
    Idle,
    Login,
    Logout,
    Search,
    Select,
    SetQuota,
    StartTls,
    Status,
    Store,
)
from .events import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Event,
    IdleDone,
    ImapParseError,
    ImapUsageError,
    ProtocolViolation,
    Request,
    Sentinel,
)
from .parser import COMMANDS, ParseContext, decode_sasl, parse_command, read_tag_verb, recover_tag
from .responses import (
    Code,
    Continuation,
    ResponseStatus,
    Tagged,
    Untagged,
    bad,
    bye,
    capability,
    enabled,
    id_response,
    no,
    ok,
    untagged_bad,
    untagged_ok,
)

__all__ = ["ImapLimits", "ImapServerConfig", "ImapServerConnection", "Phase", "State"]


@dataclass(frozen=True)
class ImapLimits:
    """Abuse limits, with defaults.

    - ``max_line_length`` 65536: octets of command lines (CRLF included) in one command,
      literals excluded; also one SASL response line or the line ending IDLE.
    - ``max_literal`` 50 MiB: octets of literals in one command (an APPEND's message);
      larger gets ``NO [TOOBIG]`` (synchronising) or ``BAD [TOOBIG]`` + ``* BYE`` (LITERAL+).
    - ``max_literal_before_auth`` 8192: the same before authentication (LOGIN's literals).
    - ``max_bad_commands`` 20: BAD responses in a row before ``* BYE``.
    - ``max_auth_failures`` 5: failed LOGIN/AUTHENTICATE per session before ``* BYE``.
    """

    max_line_length: int = 65536
    max_literal: int = 50 * 1024 * 1024
    max_literal_before_auth: int = 8192
    max_bad_commands: int = 20
    max_auth_failures: int = 5

    def __post_init__(self) -> None:
        if min(self.max_line_length, self.max_literal) < 1024:
            raise ValueError("line and literal limits must be at least 1024 octets")
        if self.max_literal_before_auth < 0:
            raise ValueError("max_literal_before_auth must not be negative")
        if min(self.max_bad_commands, self.max_auth_failures) < 1:
            raise ValueError("counting limits must be positive")


@dataclass(frozen=True)
class ImapServerConfig:
    """What the server offers.

    - ``greeting``: text of the ``* OK`` greeting.
    - ``tls_available``: STARTTLS is offered (until TLS is active).
    - ``allow_plaintext_auth``: LOGIN/AUTHENTICATE work without TLS (otherwise
      ``LOGINDISABLED`` is advertised and they get ``NO [PRIVACYREQUIRED]``).
    - ``auth_mechanisms``: SASL mechanisms offered, among ``PLAIN`` and ``LOGIN``.
    - ``utf8_accept``: UTF8=ACCEPT is advertised and can be enabled.
    - ``server_id``: the ``* ID`` answer's fields (RFC 2971).
    """

    greeting: str = "mailharbor ready"
    tls_available: bool = False
    allow_plaintext_auth: bool = False
    auth_mechanisms: tuple[str, ...] = ("PLAIN",)
    utf8_accept: bool = True
    server_id: tuple[tuple[str, str], ...] = (("name", "mailharbor"),)
    limits: ImapLimits = field(default_factory=ImapLimits)

    def __post_init__(self) -> None:
        if any(m not in ("PLAIN", "LOGIN") for m in self.auth_mechanisms):
            raise ValueError("supported SASL mechanisms: PLAIN, LOGIN")


class State(enum.Enum):
    """The IMAP connection states (RFC 9051 section 3)."""

    NOT_AUTHENTICATED = "not_authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


class Phase(enum.Enum):
    """What the engine is doing within a state."""

    COMMAND = "command"  # reading a command line
    LITERAL = "literal"  # reading a literal's octets
    REPLY = "reply"  # waiting for the app's tagged response
    AUTHENTICATE = "authenticate"  # reading a SASL response line
    IDLE = "idle"  # reading DONE
    TLS_PENDING = "tls_pending"  # OK to STARTTLS queued, waiting for starttls_done()


_N = State.NOT_AUTHENTICATED
_A = State.AUTHENTICATED
_S = State.SELECTED


@dataclass(frozen=True)
class _Edge:
    on_ok: State | None  # None: unchanged
    on_no: State | None


def _build_transitions() -> dict[tuple[State, str], _Edge]:
    same = _Edge(None, None)
    rows: list[tuple[tuple[State, ...], tuple[str, ...], _Edge]] = [
        ((_N, _A, _S), ("CAPABILITY", "NOOP", "ID"), same),
        ((_N, _A, _S), ("LOGOUT",), _Edge(State.LOGOUT, State.LOGOUT)),
        ((_N,), ("STARTTLS",), same),
        ((_N,), ("LOGIN", "AUTHENTICATE"), _Edge(_A, None)),
        ((_A,), ("ENABLE",), same),
        ((_A, _S), ("SELECT", "EXAMINE"), _Edge(_S, _A)),
        (
            (_A, _S),
            (
                "CREATE",
                "DELETE",
                "RENAME",
                "SUBSCRIBE",
                "UNSUBSCRIBE",
                "LIST",
                "LSUB",
                "NAMESPACE",
                "STATUS",
                "APPEND",
                "IDLE",
                "GETQUOTA",
                "GETQUOTAROOT",
                "SETQUOTA",
            ),
            same,
        ),
        ((_S,), ("CHECK", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE", "UID"), same),
        ((_S,), ("CLOSE", "UNSELECT"), _Edge(_A, None)),
    ]
    table: dict[tuple[State, str], _Edge] = {}
    for states, verbs, edge in rows:
        for s in states:
            for v in verbs:
                table[s, v] = edge
    return table


#: (state, verb) → state after OK / after NO. Missing: BAD, no change.
_TRANSITIONS = _build_transitions()
assert {v for _, v in _TRANSITIONS} == COMMANDS

_ENABLEABLE = ("IMAP4REV2", "UTF8=ACCEPT", "CONDSTORE", "QRESYNC")
_ENABLED_NAMES = {"IMAP4REV2": "IMAP4rev2"}
_MARKER_RE = re.compile(rb"(~?)\{([0-9]{1,20})(\+?)\}\Z")
_QUOTED_RE = re.compile(rb'"(?:[^"\\]|\\.)*"')
_LOGIN_USER = "VXNlcm5hbWU6"  # base64("Username:")
_LOGIN_PASS = "UGFzc3dvcmQ6"  # base64("Password:")


def _literal_marker(line: bytes) -> tuple[int, bool, bool] | None:
    """(octets, non-synchronising, literal8) if ``line`` ends in a literal marker outside a
    quoted string."""
    if not line.endswith(b"}"):
        return None
    m = _MARKER_RE.search(line)
    if m is None:
        return None
    if b'"' in _QUOTED_RE.sub(b"", line[: m.start()]):
        return None  # inside an unterminated quoted string: not a literal
    return int(m.group(2)), m.group(3) == b"+", m.group(1) == b"~"


def _condstore_enabling(cmd: Command) -> bool:
    """RFC 7162 3.1: commands that implicitly enable CONDSTORE."""
    if isinstance(cmd, Select):
        return cmd.condstore or cmd.qresync is not None
    if isinstance(cmd, Status):
        return "HIGHESTMODSEQ" in cmd.items
    if isinstance(cmd, Fetch):
        return cmd.changedsince is not None or FetchAtt("MODSEQ") in cmd.items
    if isinstance(cmd, Search):
        return cmd.uses_modseq
    if isinstance(cmd, Store):
        return cmd.unchangedsince is not None
    return False


class ImapServerConnection:
    """One server-side IMAP session. See the module docstring for the invariants.

    ``tls_active``: the connection is already TLS (port 993). The greeting is queued at
    construction: call ``data_to_send()`` first.
    """

    def __init__(self, config: ImapServerConfig | None = None, *, tls_active: bool = False) -> None:
        self.config = config if config is not None else ImapServerConfig()
        self.limits = self.config.limits
        self.tls_active = tls_active
        self.state = State.NOT_AUTHENTICATED
        self.phase = Phase.COMMAND
        self.username: str | None = None
        self._enabled: set[str] = set()
        self._condstore_seen = False
        self._in = bytearray()
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._eof = False
        self._closed_reported = False
        # the command being framed
        self._cmd = bytearray()
        self._cmd_lines = 0  # octets of lines so far
        self._cmd_literals = 0  # octets of literals so far
        self._literal_left = 0
        self._discarding = False
        self._discard_head = b""
        self._discard_tail = b""
        # the command in progress
        self._tag: str | None = None
        self._verb = ""
        self._command: Command | None = None
        # AUTHENTICATE exchange
        self._auth_mech = ""
        self._auth_user: str | None = None
        # budgets
        self._bad_in_row = 0
        self._auth_failures = 0
        caps = Code.capability(self.capabilities())
        self._out += untagged_ok(self.config.greeting, caps).to_bytes()

    # ----------------------------------------------------------------- properties

    @property
    def closing(self) -> bool:
        """The session is over: flush ``data_to_send()`` and close the connection."""
        return self.state is State.LOGOUT

    @property
    def enabled(self) -> frozenset[str]:
        """Extensions in effect: ENABLEd ones (IMAP4rev2, UTF8=ACCEPT, CONDSTORE, QRESYNC —
        QRESYNC implies CONDSTORE) plus CONDSTORE after a CONDSTORE-enabling command."""
        return frozenset(self._enabled)

    @property
    def imap4rev2(self) -> bool:
        return "IMAP4rev2" in self._enabled

    @property
    def utf8(self) -> bool:
        """Mailbox names and strings are UTF-8 (UTF8=ACCEPT or IMAP4rev2 enabled)."""
        return "UTF8=ACCEPT" in self._enabled or "IMAP4rev2" in self._enabled

    @property
    def condstore(self) -> bool:
        """CONDSTORE is in effect: FETCH responses carry MODSEQ, etc. (RFC 7162 3.1)."""
        return "CONDSTORE" in self._enabled

    @property
    def qresync(self) -> bool:
        return "QRESYNC" in self._enabled

    @property
    def current_tag(self) -> str | None:
        """The tag of the command the app is answering (or of the IDLE in progress)."""
        return self._tag

    @property
    def awaiting_reply(self) -> bool:
        return self.phase is Phase.REPLY

    def capabilities(self) -> list[str]:
        """The capability list for the current state and TLS status."""
        caps = ["IMAP4rev1", "IMAP4rev2"]
        if self.state is State.NOT_AUTHENTICATED:
            if self.config.tls_available and not self.tls_active:
                caps.append("STARTTLS")
            if self.tls_active or self.config.allow_plaintext_auth:
                caps += [f"AUTH={m}" for m in self.config.auth_mechanisms]
                caps.append("SASL-IR")
            else:
                caps.append("LOGINDISABLED")
        caps += [
            "LITERAL+", "ID", "ENABLE", "IDLE", "NAMESPACE", "UNSELECT", "UIDPLUS", "MOVE",
            "CHILDREN", "LIST-EXTENDED", "LIST-STATUS", "SPECIAL-USE", "CREATE-SPECIAL-USE",
            "ESEARCH", "CONDSTORE", "QRESYNC", "QUOTA", "QUOTA=RES-STORAGE", "OBJECTID",
            "STATUS=SIZE",
        ]  # fmt: skip
        if self.config.utf8_accept:
            caps.append("UTF8=ACCEPT")
        return caps

    # ----------------------------------------------------------------- public interface

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; ``b""`` means EOF. Ignored while TLS is pending
        (STARTTLS injection) and after the end of the session."""
        if not data:
            self._eof = True
            return
        if self.phase is Phase.TLS_PENDING or self.state is State.LOGOUT:
            return
        self._in += data

    def data_to_send(self) -> bytes:
        """Response bytes queued by the engine (greeting, continuations, its own answers)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def buffered(self) -> int:
        """Octets held: unconsumed input plus the command being framed."""
        return len(self._in) + len(self._cmd)

    def next_event(self) -> Event | Sentinel:
        """The next event, ``NEED_DATA`` or ``PAUSED``. Never raises for any client input."""
        while True:
            if self._events:
                return self._events.popleft()
            if self.state is State.LOGOUT:
                if self._closed_reported:
                    return NEED_DATA
                self._closed_reported = True
                return ConnectionClosed()
            if self.phase is Phase.REPLY:
                return PAUSED
            if self.phase is Phase.TLS_PENDING:
                if self._eof:
                    self._close()
                    continue
                return NEED_DATA
            if self.phase is Phase.IDLE:
                ev = self._step_idle()
            elif self.phase is Phase.AUTHENTICATE:
                ev = self._step_auth()
            else:
                ev = self._step_command()
            if ev is NEED_DATA:
                if self._eof:
                    self._close()
                    continue
                return NEED_DATA
            if ev is not None:
                return ev

    def send(self, *responses: Tagged | Untagged) -> bytes:
        """Queue responses and return every byte to write now.

        Untagged responses may be sent at any time (a ``BYE`` ends the session); a
        :class:`Tagged` completes the command in progress and is allowed only when one is owed
        (``Request.answered`` False, or after :class:`IdleDone` with ``answered`` False).
        After the session ended, untagged responses are dropped silently (a late IDLE
        notification is not a bug)."""
        for r in responses:
            if isinstance(r, Untagged):
                if self.state is State.LOGOUT:
                    continue
                self._out += r.to_bytes(self.utf8)
                if r.status is ResponseStatus.BYE:
                    self._close()
            elif isinstance(r, Tagged):
                self._complete(r)
            else:
                raise ImapUsageError("send() takes Tagged or Untagged responses")
        return self.data_to_send()

    def starttls_done(self) -> None:
        """The adapter finished the TLS handshake after STARTTLS."""
        if self.phase is not Phase.TLS_PENDING:
            raise ImapUsageError("starttls_done() without a STARTTLS")
        self.tls_active = True
        self.phase = Phase.COMMAND
        self._in.clear()

    # ----------------------------------------------------------------- plumbing

    def _ctx(self) -> ParseContext:
        return ParseContext(
            utf8=self.utf8, qresync=self.qresync, utf8_accept="UTF8=ACCEPT" in self._enabled
        )

    def _close(self) -> None:
        self.state = State.LOGOUT
        self.phase = Phase.COMMAND
        self._in.clear()
        self._cmd.clear()

    def _reset_cmd(self) -> None:
        self._cmd.clear()
        self._cmd_lines = 0
        self._cmd_literals = 0
        self._literal_left = 0
        if self.phase is Phase.LITERAL:
            self.phase = Phase.COMMAND

    def _count(self, status: ResponseStatus) -> None:
        if status is ResponseStatus.BAD:
            self._bad_in_row += 1
            if self._bad_in_row >= self.limits.max_bad_commands and self.state is not State.LOGOUT:
                line = bye("Too many invalid commands").to_bytes()
                self._out += line
                self._close()
                self._events.append(ProtocolViolation("too many BAD", line, closing=True))
        else:
            self._bad_in_row = 0

    def _refuse(self, tag: str | None, response: Tagged, reason: str) -> Event:
        """Queue an engine-made tagged (or ``* BAD`` when the tag is unknown) response."""
        if tag is None:
            line = untagged_bad(response.text, response.code).to_bytes()
        else:
            line = response.to_bytes(tag)
        self._out += line
        ev = ProtocolViolation(reason, line)
        self._count(response.status)
        return ev

    def _fatal(self, tag: str | None, response: Tagged, reason: str, bye_text: str) -> Event:
        if tag is None:
            line = untagged_bad(response.text, response.code).to_bytes()
        else:
            line = response.to_bytes(tag)
        line += bye(bye_text).to_bytes()
        self._out += line
        self._close()
        return ProtocolViolation(reason, line, closing=True)

    def _take_line(self) -> bytes | Sentinel | None:
        """A line (without CR LF) for IDLE/AUTHENTICATE; None: wait; PAUSED: too long."""
        limit = self.limits.max_line_length
        idx = self._in.find(b"\n", 0, limit)
        if idx < 0:
            return PAUSED if len(self._in) >= limit else None
        line = bytes(self._in[:idx])
        del self._in[: idx + 1]
        return line[:-1] if line.endswith(b"\r") else line

    # ----------------------------------------------------------------- framing

    def _step_command(self) -> Event | Sentinel | None:
        while True:
            if self._literal_left:
                if not self._in:
                    return NEED_DATA
                n = min(self._literal_left, len(self._in))
                self._cmd += self._in[:n]
                del self._in[:n]
                self._literal_left -= n
                if self._literal_left:
                    return NEED_DATA
                self.phase = Phase.COMMAND
            if self._discarding:
                idx = self._in.find(b"\n")
                if idx < 0:
                    self._discard_tail = (self._discard_tail + bytes(self._in[-64:]))[-64:]
                    self._in.clear()
                    return NEED_DATA
                tail = (self._discard_tail + bytes(self._in[max(0, idx - 64) : idx]))[-64:]
                del self._in[: idx + 1]
                self._discarding = False
                return self._line_too_long(tail.rstrip(b"\r"))
            budget = self.limits.max_line_length - self._cmd_lines
            idx = self._in.find(b"\n", 0, max(budget, 0))
            if idx < 0:
                if len(self._in) >= budget:
                    self._discard_head = bytes(self._cmd[:128] if self._cmd else self._in[:128])
                    self._discard_tail = b""
                    self._discarding = True
                    self._reset_cmd()
                    continue
                return NEED_DATA
            line = bytes(self._in[:idx])
            del self._in[: idx + 1]
            self._cmd_lines += idx + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not self._cmd and not line:
                self._cmd_lines = 0
                continue  # empty lines between commands are ignored
            marker = _literal_marker(line)
            if marker is None:
                self._cmd += line
                data = bytes(self._cmd)
                self._reset_cmd()
                return self._dispatch(data)
            first = not self._cmd
            self._cmd += line
            self._cmd += b"\r\n"
            ev = self._accept_literal(marker, first)
            if ev is not None:
                return ev

    def _accept_literal(self, marker: tuple[int, bool, bool], first: bool) -> Event | None:
        """Decide on a literal announced at the end of the line just framed."""
        size, nonsync, binary = marker
        head = bytes(self._cmd)
        tag = recover_tag(head)
        refusal: tuple[Tagged, str] | None = None
        try:
            _, verb = read_tag_verb(head)
        except ImapParseError as err:
            refusal = (err.response, err.reason)
            verb = ""
        if refusal is None and first:
            refusal = self._precheck(verb)
        authed = self.state in (State.AUTHENTICATED, State.SELECTED)
        limit = self.limits.max_literal if authed else self.limits.max_literal_before_auth
        too_big = self._cmd_literals + size > limit
        if refusal is None and binary and verb != "APPEND":
            refusal = (bad("literal8 is not supported here"), "literal8")
        if nonsync and too_big:
            self._reset_cmd()
            return self._fatal(
                tag,
                bad("Literal too big", Code.TOOBIG),
                "LITERAL+ over limit",
                "Cannot skip a non-synchronising literal",
            )
        if nonsync:
            refusal = None  # within the limit: read it; the command is refused when complete
        if refusal is None and too_big:
            refusal = (
                (
                    no("Message too big", Code.TOOBIG)
                    if verb == "APPEND"
                    else bad("Literal too big", Code.TOOBIG)
                ),
                "literal over limit",
            )
        if refusal is not None:
            self._reset_cmd()
            if self._in:
                # Octets after a refused synchronising literal's marker, sent without waiting
                # for "+": the literal is on its way and its end cannot be known. Close.
                return self._fatal(
                    tag, refusal[0], f"{refusal[1]}, literal sent without waiting",
                    "Literal sent without waiting for a continuation",
                )  # fmt: skip
            return self._refuse(tag, refusal[0], refusal[1])
        self._cmd_literals += size
        self._literal_left = size
        if size:
            self.phase = Phase.LITERAL
        if not nonsync:
            self._out += Continuation("Ready for literal data").to_bytes()
        return None

    def _line_too_long(self, tail: bytes) -> Event:
        tag = recover_tag(self._discard_head)
        self._discard_head = self._discard_tail = b""
        marker = _MARKER_RE.search(tail)
        if marker is not None and (marker.group(3) == b"+" or self._in):
            return self._fatal(
                tag,
                bad("Command line too long"),
                "line too long with LITERAL+",
                "Cannot skip a non-synchronising literal",
            )
        return self._refuse(tag, bad("Command line too long"), "line too long")

    # ----------------------------------------------------------------- dispatch

    def _precheck(self, verb: str) -> tuple[Tagged, str] | None:
        """Refusals that depend only on the verb and the state (before reading literals)."""
        if verb not in COMMANDS:
            return bad("Unknown command"), "unknown command"
        if (self.state, verb) not in _TRANSITIONS:
            if self.state is State.NOT_AUTHENTICATED:
                return bad("Log in first"), f"{verb} before authentication"
            if self.state is State.AUTHENTICATED and (_S, verb) in _TRANSITIONS:
                return bad("No mailbox selected"), f"{verb} without a mailbox"
            return bad("Command not valid in this state"), f"{verb} in wrong state"
        if (
            verb in ("LOGIN", "AUTHENTICATE")
            and not self.tls_active
            and not self.config.allow_plaintext_auth
        ):
            return (
                no("Plaintext authentication is disabled, use STARTTLS", Code.PRIVACYREQUIRED),
                "auth before TLS",
            )
        return None

    def _dispatch(self, data: bytes) -> Event | None:
        try:
            tag, verb = read_tag_verb(data)
        except ImapParseError as err:
            return self._refuse(err.tag, err.response, err.reason)
        refusal = self._precheck(verb)
        if refusal is not None:
            return self._refuse(tag, *refusal)
        try:
            _, cmd = parse_command(data, self._ctx())
        except ImapParseError as err:
            return self._refuse(tag, err.response, err.reason)
        if _condstore_enabling(cmd):
            self._enabled.add("CONDSTORE")
        return self._execute(tag, verb, cmd)

    def _owe(self, tag: str, verb: str, cmd: Command) -> Event:
        self._tag, self._verb, self._command = tag, verb, cmd
        self.phase = Phase.REPLY
        return Request(tag, cmd)

    def _answered(self, tag: str, cmd: Command, *lines: Untagged | Tagged) -> Event:
        for r in lines:
            self._out += r.to_bytes(tag) if isinstance(r, Tagged) else r.to_bytes(self.utf8)
        self._count(ResponseStatus.OK)
        return Request(tag, cmd, answered=True)

    def _execute(self, tag: str, verb: str, cmd: Command) -> Event | None:
        if isinstance(cmd, Capability):
            return self._answered(tag, cmd, capability(self.capabilities()), ok("CAPABILITY done"))
        if isinstance(cmd, Logout):
            ev = self._answered(tag, cmd, bye("Logging out"), ok("LOGOUT completed"))
            self._close()
            return ev
        if isinstance(cmd, Id):
            return self._answered(tag, cmd, id_response(self.config.server_id), ok("ID completed"))
        if isinstance(cmd, SetQuota):
            return self._refuse(
                tag, no("Quotas are set by the administrator", Code.CANNOT), "SETQUOTA"
            )
        if isinstance(cmd, StartTls):
            if self.tls_active or not self.config.tls_available:
                return self._refuse(tag, bad("TLS is not available"), "STARTTLS unavailable")
            ev = self._answered(tag, cmd, ok("Begin TLS negotiation now"))
            self._in.clear()  # CVE-2011-0411: nothing pipelined after STARTTLS survives
            self.phase = Phase.TLS_PENDING
            return ev
        if isinstance(cmd, Enable):
            return self._enable(tag, cmd)
        if isinstance(cmd, AuthenticateStart):
            return self._auth_start(tag, cmd)
        if isinstance(cmd, Idle):
            self._tag, self._verb, self._command = tag, verb, cmd
            self.phase = Phase.IDLE
            self._out += Continuation("idling").to_bytes()
            return Request(tag, cmd)
        return self._owe(tag, verb, cmd)

    def _enable(self, tag: str, cmd: Enable) -> Event:
        done: list[str] = []
        for ext in cmd.extensions:
            if ext not in _ENABLEABLE or (ext == "UTF8=ACCEPT" and not self.config.utf8_accept):
                continue
            name = _ENABLED_NAMES.get(ext, ext)
            if name not in done:
                done.append(name)
            self._enabled.add(name)
            if name == "QRESYNC":
                self._enabled.add("CONDSTORE")
        return self._answered(tag, Enable(tuple(done)), enabled(done), ok("ENABLE completed"))

    def _complete(self, response: Tagged) -> None:
        if self.phase is not Phase.REPLY or self._tag is None:
            raise ImapUsageError("no tagged response is owed")
        tag, verb, cmd = self._tag, self._verb, self._command
        edge = _TRANSITIONS.get((self.state, verb), _Edge(None, None))
        self._tag, self._verb, self._command = None, "", None
        self.phase = Phase.COMMAND
        status = response.status
        nxt = {ResponseStatus.OK: edge.on_ok, ResponseStatus.NO: edge.on_no}.get(status)
        if nxt is not None:
            self.state = nxt
        if verb in ("LOGIN", "AUTHENTICATE") and status is ResponseStatus.OK:
            if isinstance(cmd, Login):
                self.username = cmd.username
            elif isinstance(cmd, Authenticate):
                self.username = cmd.identity
            if response.code is None:  # RFC 9051 6.2.3: tell the post-login capabilities
                response = ok(response.text, Code.capability(self.capabilities()))
        self._out += response.to_bytes(tag)
        if self.state is State.LOGOUT:
            self._close()
        self._count(status)
        if verb in ("LOGIN", "AUTHENTICATE") and status is ResponseStatus.NO:
            self._auth_failed()

    def _auth_failed(self) -> None:
        self._auth_failures += 1
        if self._auth_failures >= self.limits.max_auth_failures:
            line = bye("Too many authentication failures").to_bytes()
            self._out += line
            self._close()
            self._events.append(ProtocolViolation("too many auth failures", line, closing=True))

    # ----------------------------------------------------------------- AUTHENTICATE

    def _auth_start(self, tag: str, cmd: AuthenticateStart) -> Event | None:
        if cmd.mechanism not in self.config.auth_mechanisms:
            return self._refuse(tag, no("Unsupported authentication mechanism"), "mechanism")
        self._tag, self._verb = tag, "AUTHENTICATE"
        self._auth_mech = cmd.mechanism
        self._auth_user = None
        if cmd.initial is None:
            self.phase = Phase.AUTHENTICATE
            prompt = _LOGIN_USER if cmd.mechanism == "LOGIN" else ""
            self._out += Continuation(prompt).to_bytes()
            return None
        return self._auth_response(cmd.initial.encode("ascii"))

    def _step_auth(self) -> Event | Sentinel | None:
        line = self._take_line()
        if line is None:
            return NEED_DATA
        if line is PAUSED:
            return self._fatal(
                self._tag, bad("SASL response too long"), "SASL line too long", "Too long"
            )
        assert isinstance(line, bytes)
        return self._auth_response(line.strip(b" "))

    def _auth_fail(self, text: str, reason: str) -> Event:
        tag = self._tag
        self._tag, self._verb = None, ""
        self.phase = Phase.COMMAND
        return self._refuse(tag, bad(text), reason)

    def _auth_response(self, text: bytes) -> Event | None:
        if text == b"*":
            return self._auth_fail("Authentication canceled", "authentication canceled")
        data = decode_sasl(text)
        if data is None:
            return self._auth_fail("Invalid base64", "invalid SASL base64")
        try:
            value = data.decode("utf-8")
        except UnicodeDecodeError:
            return self._auth_fail("Invalid UTF-8 in credentials", "invalid SASL UTF-8")
        tag = self._tag
        assert tag is not None
        if self._auth_mech == "LOGIN":
            if self._auth_user is None:
                self._auth_user = value
                self.phase = Phase.AUTHENTICATE
                self._out += Continuation(_LOGIN_PASS).to_bytes()
                return None
            return self._owe(tag, "AUTHENTICATE", Authenticate("LOGIN", "", self._auth_user, value))
        parts = value.split("\0")
        if len(parts) != 3 or not parts[1]:
            return self._auth_fail("Invalid PLAIN response", "invalid PLAIN")
        return self._owe(tag, "AUTHENTICATE", Authenticate("PLAIN", parts[0], parts[1], parts[2]))

    # ----------------------------------------------------------------- IDLE

    def _step_idle(self) -> Event | Sentinel | None:
        line = self._take_line()
        if line is None:
            return NEED_DATA
        tag = self._tag
        assert tag is not None
        if isinstance(line, bytes) and line.strip(b" ").upper() == b"DONE":
            self.phase = Phase.REPLY
            return IdleDone(tag)
        # Anything else ends IDLE with BAD; the line is not executed.
        self._tag, self._verb, self._command = None, "", None
        self.phase = Phase.COMMAND
        if line is PAUSED:
            self._events.append(IdleDone(tag, answered=True))
            return self._fatal(tag, bad("Expected DONE"), "IDLE line too long", "Too long")
        self._events.append(IdleDone(tag, answered=True))
        return self._refuse(tag, bad("Expected DONE"), "IDLE without DONE")
