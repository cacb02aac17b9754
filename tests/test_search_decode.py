"""RFC 2047 decoding used by SEARCH on header fields (service/search.py): known vectors and
never an exception on arbitrary bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailharbor.service.search import _decode_words, _Fields


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"plain ascii", "plain ascii"),
        (b"=?utf-8?q?caf=C3=A9?=", "caf\u00e9"),
        (b"=?UTF-8?B?w6l0w6k=?= =?UTF-8?B?IQ==?=", "\u00e9t\u00e9!"),  # adjacent words join
        (b"Hello =?iso-8859-1?q?J=F6rg?= x", "Hello J\u00f6rg x"),
        (b"=?utf-8?q?=C3?= =?utf-8?q?=A9?=", "\u00e9"),  # a character split across two words
        (b"=?utf-8?q?a_b?=", "a b"),
        (b"=?utf-8*fr?q?oui?=", "oui"),  # RFC 2231 language suffix
        (b"=?x-unknown?q?abc?=", "abc"),  # unknown charset: bytes as UTF-8
        (b"=?utf-8?b?!!!?=", "!!!"),  # broken base64: kept as is
        (b"a =?utf-8?q?x?= b", "a x b"),
    ],
)
def test_decode_vectors(raw: bytes, text: str) -> None:
    assert _decode_words(raw) == text


@given(st.binary(max_size=200))
def test_decode_never_raises(raw: bytes) -> None:
    assert isinstance(_decode_words(raw), str)


def test_fields_unfold_decode_and_fold() -> None:
    f = _Fields(
        b"From: =?utf-8?q?Bob_M=C3=BCller?= <bob@example.org>\r\n"
        b"Subject: a long\r\n subject\r\nsubject: second\r\n\r\n"
    )
    assert f.get("from") == ["Bob M\u00fcller <bob@example.org>"]
    assert f.folded("subject") == ["a long subject", "second"]
    assert f.get("to") is None
