"""The DATA scanner's fast path (runs of whole lines up to the next line starting with '.')
against the line-by-line reading: same content, same replies, whatever the feed and chunk size."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailharbor.proto.smtp import BareNewline, DataChunk, DataEnd, SmtpLimits

from .test_smtp_helpers import Driver

PREFIX = b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n"
_PIECES = [b"\r\n", b"\n", b"\r", b".", b"..", b"text", b"\r\n.\r\n", b"\n.\n", b"x" * 300]


@given(
    body=st.lists(st.sampled_from(_PIECES), max_size=50).map(b"".join),
    strict=st.booleans(),
    chunk=st.sampled_from([16, 64, 65536]),
)
def test_fast_path_equals_bytewise(body: bytes, strict: bool, chunk: int) -> None:
    mode = BareNewline.STRICT if strict else BareNewline.NORMAL
    limits = SmtpLimits(data_chunk_size=chunk)
    whole = Driver.new(bare_newline=mode, limits=limits).feed(PREFIX + body + b"\r\n.\r\n")
    bytewise = Driver.new(bare_newline=mode, limits=limits).bytewise(PREFIX + body + b"\r\n.\r\n")
    assert whole.codes() == bytewise.codes()
    assert whole.message() == bytewise.message()
    assert all(len(e.data) <= chunk + 4098 for e in whole.of(DataChunk))


@pytest.mark.parametrize("chunk", [16, 100, 65536])
def test_unstuffing_and_bare_cr_in_bulk(chunk: int) -> None:
    lines = [b"Subject: s", b"", b"..stuffed", b"plain\rcr", b".", b"..", b"end"]
    wire = b"".join(line + b"\r\n" for line in lines[:4]) + b"..\r\n...\r\nend\r\n.\r\n"
    d = Driver.new(limits=SmtpLimits(data_chunk_size=chunk)).feed(PREFIX + wire + b"NOOP\r\n")
    assert d.message() == b"Subject: s\r\n\r\n.stuffed\r\nplain\rcr\r\n.\r\n..\r\nend\r\n"
    assert len(d.of(DataEnd)) == 1 and d.codes()[-2:] == [250, 250]
