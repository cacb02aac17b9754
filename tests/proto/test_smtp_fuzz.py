"""Hypothesis: any byte stream, split anywhere, gives events and well-formed replies only."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from mailharbor.proto.smtp import BareNewline, BdatChunk, DataChunk, SmtpLimits, State

from .test_smtp_helpers import Driver

_TOKENS = [
    b"EHLO c\r\n", b"HELO c\r\n", b"LHLO c\r\n", b"MAIL FROM:<a@b.test>\r\n",
    b"MAIL FROM:<> SIZE=5 RET=FULL ENVID=x+2B\r\n", b"RCPT TO:<x@y.test> NOTIFY=NEVER\r\n",
    b"RCPT TO:<nobody@y.test>\r\n", b"DATA\r\n", b"BDAT 3\r\n", b"BDAT 2 LAST\r\n", b".\r\n",
    b"\r\n.\r\n", b"\n.\n", b"\r", b"\n", b".", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n",
    b"STARTTLS\r\n", b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n", b"AGFsaWNlAHNlY3JldA==\r\n", b"*\r\n",
    b"VRFY x\r\n", b"HELP\r\n", b"\x00\xff", b"x" * 70,
]  # fmt: skip
_REPLY = re.compile(rb"\A[2-5][0-9][0-9][ -][\x20-\x7e]*\Z")

streams = st.lists(st.one_of(st.sampled_from(_TOKENS), st.binary(max_size=20)), max_size=40).map(
    b"".join
)


@given(
    data=streams,
    cuts=st.lists(st.integers(1, 30), max_size=40),
    lmtp=st.booleans(),
    strict=st.booleans(),
    tls=st.booleans(),
)
def test_random_streams_never_raise(
    data: bytes, cuts: list[int], lmtp: bool, strict: bool, tls: bool
) -> None:
    d = Driver.new(
        lmtp=lmtp,
        tls_available=tls,
        auth=True,
        auth_without_tls=not tls,
        bare_newline=BareNewline.STRICT if strict else BareNewline.NORMAL,
        limits=SmtpLimits(
            max_line_length=64, max_auth_line_length=64, max_message_size=200, max_recipients=2,
            max_bad_commands=30, data_chunk_size=32,
        ),
    )  # fmt: skip
    d.feed(data, cuts)
    d.conn.receive_data(b"")
    d.pump()
    assert isinstance(d.conn.state, State)
    assert d.conn.state is State.CLOSED or d.conn.state is State.TLS_PENDING
    for line in d.lines():
        assert _REPLY.match(line), line
    assert all(len(e.data) <= 32 + 4096 for e in d.of(DataChunk) + d.of(BdatChunk))
    assert bytes(d.out).endswith(b"\r\n")


@given(data=streams)
def test_whole_equals_bytewise(data: bytes) -> None:
    whole = Driver.new(auth=True, auth_without_tls=True).feed(data)
    bytewise = Driver.new(auth=True, auth_without_tls=True).bytewise(data)
    assert whole.codes() == bytewise.codes()
    assert whole.message() == bytewise.message()
