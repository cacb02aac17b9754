"""Hypothesis: any byte stream, split anywhere, gives events and well-formed responses only;
memory stays bounded; the state machine follows its table."""

from __future__ import annotations

import re

from hypothesis import assume, given
from hypothesis import strategies as st

from mailharbor.proto.imap import (
    Event,
    ImapLimits,
    ImapParseError,
    ParseContext,
    ProtocolViolation,
    Request,
    State,
    Tagged,
    Untagged,
    bad,
    no,
    ok,
    parse_command,
)

from .test_imap_helpers import Driver
from .test_imap_parser import CASES

LIMITS = ImapLimits(
    max_line_length=1024, max_literal=2048, max_literal_before_auth=64, max_bad_commands=50
)
_TOKENS = [
    b"a LOGIN u p\r\n", b"b SELECT INBOX\r\n", b"c FETCH 1:* (FLAGS BODY.PEEK[HEADER])\r\n",
    b"d APPEND INBOX {5}\r\n", b"e APPEND INBOX {5+}\r\n", b"hello", b"f IDLE\r\n", b"DONE\r\n",
    b"g AUTHENTICATE PLAIN\r\n", b"AGEAYg==\r\n", b"*\r\n", b"h STARTTLS\r\n", b"i LOGOUT\r\n",
    b"j SEARCH OR (FROM x) NOT 1:3\r\n", b"k ENABLE QRESYNC UTF8=ACCEPT\r\n", b"{3}\r\n",
    b"{9999}\r\n", b"{99999+}\r\n", b'"quoted {4}', b"\r\n", b"\n", b"\r", b"(", b")", b" ",
    b"\x00\xff\xc3", b"x" * 300, b"l UID STORE 1 +FLAGS (\\Seen)\r\n", b"m CLOSE\r\n",
    b"n LIST \"\" *\r\n", b"o NOOP\r\n", b"~{4}\r\n",
]  # fmt: skip
#: A response line: continuation, untagged, or tagged status.
_LINE = re.compile(rb"\A(\+ |\* |[\x21-\x7e]+ (OK|NO|BAD) )[\x20-\x7e]*\Z")

streams = st.lists(st.one_of(st.sampled_from(_TOKENS), st.binary(max_size=20)), max_size=40).map(
    b"".join
)


def _responder(choice: int) -> object:
    def respond(ev: Event) -> list[Tagged | Untagged]:
        return [(ok(), no("no"), bad("bad"))[choice]]

    return respond


def _check(d: Driver, piece: int) -> None:
    for line in d.lines():
        assert _LINE.match(line), line
    assert d.max_buffered <= LIMITS.max_line_length + LIMITS.max_literal + piece
    assert isinstance(d.conn.state, State)


@given(
    data=streams,
    cuts=st.lists(st.integers(1, 40), max_size=40),
    tls=st.booleans(),
    plaintext=st.booleans(),
    answer=st.integers(0, 2),
)
def test_random_streams_never_raise(
    data: bytes, cuts: list[int], tls: bool, plaintext: bool, answer: int
) -> None:
    d = Driver.new(
        tls_active=tls,
        tls_available=True,
        allow_plaintext_auth=plaintext,
        limits=LIMITS,
        responder=_responder(answer),  # type: ignore[arg-type]
    )
    d.feed(data, cuts)
    d.eof()
    _check(d, max([len(data), *cuts]))
    assert d.conn.closing or d.conn.phase.value == "tls_pending"
    assert bytes(d.out).endswith(b"\r\n")


@given(data=streams)
def test_whole_equals_bytewise(data: bytes) -> None:
    whole = Driver.new(allow_plaintext_auth=True, limits=LIMITS).feed(data)
    # A refused synchronising literal whose octets came in the same read closes the session,
    # byte by byte they come later: the one place where feeding order shows.
    assume(not any(isinstance(e, ProtocolViolation) and "without waiting" in e.reason
                   for e in whole.events))  # fmt: skip
    bytewise = Driver.new(allow_plaintext_auth=True, limits=LIMITS).bytewise(data)
    assert whole.commands() == bytewise.commands()
    assert whole.lines() == bytewise.lines()
    _check(bytewise, 1)


_VALID = [c[0] for c in CASES]
_NASTY = [b"{", b"}", b'"', b"(", b")", b"\\", b" ", b"\r\n", b"*", b"$", b"~", b"+", b"9" * 12]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_VALID)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 3))
        pos = draw(st.integers(0, len(data)))
        if op == 0 and data:
            del data[min(pos, len(data) - 1)]
        elif op == 1:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=3))
        elif op == 2:
            data[pos:pos] = draw(st.sampled_from(_NASTY))
        else:
            del data[pos:]
    return bytes(data)


@given(cmd=mutated(), ctx=st.sampled_from([ParseContext(), ParseContext(True, True, True)]))
def test_mutated_commands_parse_or_raise_parse_error(cmd: bytes, ctx: ParseContext) -> None:
    try:
        tag, _ = parse_command(cmd, ctx)
    except ImapParseError as err:
        line = err.response.to_bytes(err.tag or "*")
        assert _LINE.match(line[:-2]), line
        return
    assert tag


@given(cmds=st.lists(mutated(), max_size=8), cuts=st.lists(st.integers(1, 30), max_size=20))
def test_mutated_commands_in_a_session(cmds: list[bytes], cuts: list[int]) -> None:
    d = Driver.selected(limits=LIMITS)
    d.feed(b"".join(c + b"\r\n" for c in cmds), cuts)
    _check(d, max([1, *cuts, sum(len(c) + 2 for c in cmds)]))


# ----------------------------------------------------------------------------- state table model

_SCRIPT = [
    b"LOGIN u p", b"SELECT INBOX", b"EXAMINE INBOX", b"CLOSE", b"UNSELECT", b"LOGOUT",
    b"FETCH 1 FLAGS", b"NOOP", b"ENABLE CONDSTORE", b"LIST \"\" *", b"EXPUNGE", b"BOGUS",
]  # fmt: skip
_VALID_IN = {
    b"LOGIN": {State.NOT_AUTHENTICATED},
    b"SELECT": {State.AUTHENTICATED, State.SELECTED},
    b"EXAMINE": {State.AUTHENTICATED, State.SELECTED},
    b"CLOSE": {State.SELECTED},
    b"UNSELECT": {State.SELECTED},
    b"LOGOUT": {State.NOT_AUTHENTICATED, State.AUTHENTICATED, State.SELECTED},
    b"FETCH": {State.SELECTED},
    b"NOOP": {State.NOT_AUTHENTICATED, State.AUTHENTICATED, State.SELECTED},
    b"ENABLE": {State.AUTHENTICATED},
    b"LIST": {State.AUTHENTICATED, State.SELECTED},
    b"EXPUNGE": {State.SELECTED},
    b"BOGUS": set(),
}


def _model(state: State, verb: bytes, answer: int) -> State:
    """RFC 9051 section 3, written independently of the engine's table."""
    if state not in _VALID_IN[verb]:
        return state  # BAD, no change
    if verb == b"LOGOUT":
        return State.LOGOUT
    if answer == 2:
        return state  # BAD from the app: no change
    if verb == b"LOGIN":
        return State.AUTHENTICATED if answer == 0 else state
    if verb in (b"SELECT", b"EXAMINE"):
        return State.SELECTED if answer == 0 else State.AUTHENTICATED
    if verb in (b"CLOSE", b"UNSELECT") and answer == 0:
        return State.AUTHENTICATED
    return state


@given(steps=st.lists(st.tuples(st.sampled_from(_SCRIPT), st.integers(0, 2)), max_size=25))
def test_state_follows_rfc_model(steps: list[tuple[bytes, int]]) -> None:
    answers: list[int] = []

    def respond(ev: Event) -> list[Tagged | Untagged]:
        assert isinstance(ev, Request)
        return [(ok(), no("no"), bad("bad"))[answers[-1]]]

    limits = ImapLimits(max_bad_commands=100, max_auth_failures=100)  # budgets tested elsewhere
    d = Driver.new(allow_plaintext_auth=True, responder=respond, limits=limits)
    state = State.NOT_AUTHENTICATED
    for i, (cmd, answer) in enumerate(steps):
        answers.append(answer)
        d.feed(b"t%d " % i + cmd + b"\r\n")
        state = _model(state, cmd.split()[0], answer)
        assert d.conn.state is state, (cmd, answer)
        if state is State.LOGOUT:
            break
