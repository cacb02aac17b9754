"""Hypothesis: any byte stream, split anywhere, gives events and well-formed replies only; the
deletion marks follow a simple model; nothing reaches the application before login."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from mailharbor.proto.pop3 import (
    AuthRequest,
    Pop3Limits,
    ProtocolViolation,
    Retrieve,
    State,
    Update,
)

from .test_pop3_helpers import MESSAGES, Driver, parse_responses

_TOKENS = [
    b"USER alice\r\n", b"PASS secret\r\n", b"PASS wrong\r\n", b"AUTH PLAIN\r\n",
    b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n", b"AGFsaWNlAHNlY3JldA==\r\n", b"*\r\n", b"AUTH\r\n",
    b"STLS\r\n", b"CAPA\r\n", b"STAT\r\n", b"LIST\r\n", b"LIST 1\r\n", b"LIST 9\r\n",
    b"UIDL\r\n", b"UIDL 2\r\n", b"RETR 1\r\n", b"RETR 3\r\n", b"TOP 2 1\r\n", b"TOP 1 0\r\n",
    b"DELE 1\r\n", b"DELE 2\r\n", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"\r\n", b"\n", b"\r",
    b".", b"\x00\xff", b"x" * 70,
]  # fmt: skip
_STATUS = re.compile(rb"\A(\+OK|-ERR|\+)( [\x20-\x7e]*)?\Z")

streams = st.lists(st.one_of(st.sampled_from(_TOKENS), st.binary(max_size=20)), max_size=40).map(
    b"".join
)


@given(
    data=streams,
    cuts=st.lists(st.integers(1, 30), max_size=40),
    tls=st.booleans(),
    plaintext=st.booleans(),
)
def test_random_streams_never_raise(
    data: bytes, cuts: list[int], tls: bool, plaintext: bool
) -> None:
    d = Driver.new(
        tls_available=tls,
        allow_plaintext_auth=plaintext,
        limits=Pop3Limits(max_line_length=64, max_auth_line_length=64, max_bad_commands=30),
    )
    d.feed(data, cuts)
    d.conn.receive_data(b"")
    d.pump()
    assert d.conn.state in (State.CLOSED, State.TLS_PENDING)
    out = bytes(d.out)
    assert out.endswith(b"\r\n") and out.isascii()
    for line, _ in parse_responses(out):
        assert _STATUS.match(line), line
    # Nothing reaches the application before a successful login.
    first_login = next((i for i, e in enumerate(d.events) if isinstance(e, AuthRequest)), None)
    for i, e in enumerate(d.events):
        if isinstance(e, Retrieve | Update):
            assert first_login is not None and i > first_login
    # Without TLS and without plaintext permission there is no login at all.
    if not plaintext and not tls:
        assert not d.of(AuthRequest)
    assert len(d.of(Update)) <= 1


@given(data=streams)
def test_whole_equals_bytewise(data: bytes) -> None:
    whole = Driver.new(allow_plaintext_auth=True).feed(data)
    bytewise = Driver.new(allow_plaintext_auth=True).bytewise(data)
    assert whole.out == bytewise.out
    assert [e for e in whole.events if not isinstance(e, ProtocolViolation)] == [
        e for e in bytewise.events if not isinstance(e, ProtocolViolation)
    ]


_TXN = st.one_of(
    st.tuples(st.just("DELE"), st.integers(0, 4)),
    st.tuples(st.just("RSET"), st.just(0)),
    st.tuples(st.just("STAT"), st.just(0)),
)


@given(ops=st.lists(_TXN, max_size=30), quit_=st.booleans())
def test_deletion_marks_follow_the_model(ops: list[tuple[str, int]], quit_: bool) -> None:
    d = Driver.new(allow_plaintext_auth=True).feed(b"USER a\r\nPASS secret\r\n")
    d.take()
    model: set[int] = set()
    sizes = [len(m) for m in MESSAGES]
    for verb, n in ops:
        if verb == "DELE":
            d.feed(f"DELE {n}\r\n".encode())
            good = 1 <= n <= len(MESSAGES) and n - 1 not in model
            assert d.take().startswith(b"+OK" if good else b"-ERR")
            if good:
                model.add(n - 1)
        elif verb == "RSET":
            d.feed(b"RSET\r\n")
            model.clear()
            assert d.take().startswith(b"+OK")
        else:
            d.feed(b"STAT\r\n")
            live = [i for i in range(len(MESSAGES)) if i not in model]
            assert d.take() == f"+OK {len(live)} {sum(sizes[i] for i in live)}\r\n".encode()
    d.feed(b"QUIT\r\n" if quit_ else b"")
    d.conn.receive_data(b"")
    d.pump()
    assert d.of(Update) == ([Update(tuple(sorted(model)))] if quit_ else [])
