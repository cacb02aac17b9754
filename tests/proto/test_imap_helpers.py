"""A test driver for the IMAP engine, and tests of the small helpers (sequence sets, mUTF-7)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailharbor.proto.imap import (
    NEED_DATA,
    PAUSED,
    Event,
    Idle,
    IdleDone,
    ImapLimits,
    ImapServerConfig,
    ImapServerConnection,
    Request,
    Sentinel,
    SequenceSet,
    Tagged,
    Untagged,
    compact,
    decode_mutf7,
    encode_mutf7,
    ok,
)

Responder = Callable[[Event], Iterable[Tagged | Untagged]]


def default_responder(ev: Event) -> list[Tagged | Untagged]:
    """Answer every owed command with a plain OK."""
    return [ok()]


@dataclass
class Driver:
    """Feeds bytes to an engine like an adapter would, answering owed commands with
    ``responder`` and collecting events and output bytes."""

    conn: ImapServerConnection
    responder: Responder = default_responder
    out: bytearray = field(default_factory=bytearray)
    events: list[Event] = field(default_factory=list)
    max_buffered: int = 0

    @classmethod
    def new(
        cls,
        *,
        tls_active: bool = False,
        responder: Responder = default_responder,
        limits: ImapLimits | None = None,
        **config: object,
    ) -> Driver:
        cfg = ImapServerConfig(limits=limits or ImapLimits(), **config)  # type: ignore[arg-type]
        d = cls(ImapServerConnection(cfg, tls_active=tls_active), responder)
        d.out += d.conn.data_to_send()
        return d

    @classmethod
    def logged_in(cls, **kwargs: object) -> Driver:
        """A session after ``LOGIN`` (plaintext auth allowed); output so far dropped."""
        kwargs.setdefault("allow_plaintext_auth", True)
        d = cls.new(**kwargs)  # type: ignore[arg-type]
        d.feed(b"L0 LOGIN user pass\r\n")
        d.out.clear()
        d.events.clear()
        return d

    @classmethod
    def selected(cls, **kwargs: object) -> Driver:
        d = cls.logged_in(**kwargs)
        d.feed(b"S0 SELECT INBOX\r\n")
        d.out.clear()
        d.events.clear()
        return d

    def pump(self) -> None:
        while True:
            ev = self.conn.next_event()
            self.max_buffered = max(self.max_buffered, self.conn.buffered)
            if ev is NEED_DATA or ev is PAUSED:  # PAUSED: the responder chose not to answer
                break
            assert not isinstance(ev, Sentinel)
            self.events.append(ev)
            if (
                isinstance(ev, Request) and not ev.answered and not isinstance(ev.command, Idle)
            ) or (isinstance(ev, IdleDone) and not ev.answered):
                self.out += self.conn.send(*self.responder(ev))
        self.out += self.conn.data_to_send()

    def feed(self, data: bytes, cuts: Iterable[int] = ()) -> Driver:
        """Feed ``data`` in pieces of the sizes in ``cuts`` (then the rest), pumping after
        each piece."""
        pos = 0
        for n in cuts:
            if pos >= len(data):
                break
            self.conn.receive_data(data[pos : pos + n])
            self.pump()
            pos += n
        if pos < len(data):
            self.conn.receive_data(data[pos:])
            self.pump()
        return self

    def bytewise(self, data: bytes) -> Driver:
        for i in range(len(data)):
            self.conn.receive_data(data[i : i + 1])
            self.pump()
        return self

    def eof(self) -> Driver:
        self.conn.receive_data(b"")
        self.pump()
        return self

    def lines(self) -> list[bytes]:
        """Response lines (literal contents not split out)."""
        return bytes(self.out).split(b"\r\n")[:-1]

    def tagged(self, tag: str) -> bytes:
        found = [ln for ln in self.lines() if ln.startswith(tag.encode() + b" ")]
        assert len(found) == 1, (tag, self.lines())
        return found[0]

    def of(self, kind: type) -> list[object]:
        return [e for e in self.events if isinstance(e, kind)]

    def commands(self) -> list[object]:
        return [e.command for e in self.events if isinstance(e, Request)]


# ----------------------------------------------------------------------------- sequence sets


def test_compact_merges_runs_in_any_order() -> None:
    assert compact([9, 1, 2, 3, 7, 10, 11, 12, 2]) == "1:3,7,9:12"
    assert compact([]) == ""
    assert compact([5]) == "5"


@given(st.sets(st.integers(1, 200), min_size=1))
def test_compact_round_trips_through_sequence_set(nums: set[int]) -> None:
    s = SequenceSet.of(nums)
    assert list(s.iter(200)) == sorted(nums)
    assert str(s) == compact(nums)


def test_sequence_set_star_and_reversed_ranges() -> None:
    s = SequenceSet(((5, 2), (9, None)))
    assert s.resolve(12) == [(2, 5), (9, 12)]
    assert list(s.iter(10)) == [2, 3, 4, 5, 9, 10]
    assert s.contains(11, 12) and not s.contains(7, 12)
    assert str(s) == "5:2,9:*"
    # "*" on an empty mailbox names nothing
    assert SequenceSet(((1, None),)).resolve(0) == []


def test_sequence_set_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError):
        SequenceSet.of([])


# ----------------------------------------------------------------------------- modified UTF-7


@pytest.mark.parametrize(
    ("encoded", "name"),
    [
        ("&Jjo-!", "☺!"),
        ("Entw&APw-rfe", "Entwürfe"),
        ("~peter/mail/&U,BTFw-/&ZeVnLIqe-", "~peter/mail/台北/日本語"),
        ("Tom &- Jerry", "Tom & Jerry"),
        ("INBOX", "INBOX"),
        ("&2D3eAA-", "\U0001f600"),  # a surrogate pair
        ("", ""),
    ],
)
def test_mutf7_known_vectors(encoded: str, name: str) -> None:
    assert decode_mutf7(encoded) == name
    assert encode_mutf7(name) == encoded


@pytest.mark.parametrize(
    "bad",
    [
        "&Jjo",  # unterminated
        "&AGE-",  # encodes "a", printable ASCII
        "&Jjo-&Jjo-",  # two adjacent encoded runs (should be one)
        "&Jj!-",  # not base64
        "&Jjp-",  # non-zero pad bits
        "&2D0-",  # a lone high surrogate
        "caf\u00e9",  # raw 8-bit in a 7-bit name
        "a\tb",  # control character
        "&Jjo=-",  # padding is not used
    ],
)
def test_mutf7_rejects_non_canonical(bad: str) -> None:
    with pytest.raises(ValueError):
        decode_mutf7(bad)


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"])))
def test_mutf7_round_trip(name: str) -> None:
    encoded = encode_mutf7(name)
    assert encoded.isascii()
    assert decode_mutf7(encoded) == name


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30))
def test_mutf7_decode_is_strict_inverse(text: str) -> None:
    try:
        name = decode_mutf7(text)
    except ValueError:
        return
    assert encode_mutf7(name) == text
