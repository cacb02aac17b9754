"""The on-disk formats (`mailharbor.store.format`): records, frames, segment headers.

* every record type round-trips through encode/decode, alone and inside a frame payload;
* a frame verifies (header CRC, payload CRC) and a flipped bit anywhere in it is detected and the
  frame never decodes: checked with the format functions and with the log's own reader;
* truncated or garbage input raises `FormatError`, never another exception;
* segment headers round-trip and are rejected on bad magic, checksum, version or truncation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
from pathlib import Path

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from mailharbor.store import format as fmt
from mailharbor.store import index as ix
from mailharbor.store.fsio import OsFileSystem
from mailharbor.store.log import scan_segment

from . import NODE

# --- strategies ---------------------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
guid = st.binary(min_size=16, max_size=16)
hash32 = st.binary(min_size=32, max_size=32)
data = st.binary(max_size=300)
text = st.text(max_size=24)
texts = st.lists(text, max_size=5).map(tuple)
uids = st.lists(u32, max_size=12).map(tuple)

targets = st.lists(st.builds(fmt.Target, guid, guid, u32, u64), max_size=6).map(tuple)

RECORD_STRATEGIES: dict[fmt.RecordType, st.SearchStrategy[fmt.Record]] = {
    fmt.RecordType.BLOB: st.builds(fmt.Blob, hash32, u64, u32, data),
    fmt.RecordType.CHUNK: st.builds(fmt.Chunk, guid, u32, data),
    fmt.RecordType.DELIVER: st.builds(fmt.Deliver, hash32, i64, u64, u8, texts, targets),
    fmt.RecordType.FLAGS: st.builds(fmt.Flags, guid, u64, u8, u8, texts, texts, uids),
    fmt.RecordType.EXPUNGE: st.builds(fmt.Expunge, guid, u64, uids),
    fmt.RecordType.MAILBOX_CREATE: st.builds(fmt.MailboxCreate, guid, guid, u32, u8, text),
    fmt.RecordType.MAILBOX_RENAME: st.builds(fmt.MailboxRename, guid, text),
    fmt.RecordType.MAILBOX_DELETE: st.builds(fmt.MailboxDelete, guid),
    fmt.RecordType.SUBSCRIBE: st.builds(fmt.Subscribe, guid, st.booleans(), text),
    fmt.RecordType.ACCOUNT_PUT: st.builds(fmt.AccountPut, guid, text, text, u64, u32),
    fmt.RecordType.ACCOUNT_DELETE: st.builds(fmt.AccountDelete, guid),
    fmt.RecordType.DOMAIN_ADD: st.builds(fmt.DomainAdd, text),
    fmt.RecordType.DOMAIN_REMOVE: st.builds(fmt.DomainRemove, text),
    fmt.RecordType.ALIAS_SET: st.builds(fmt.AliasSet, text, texts),
    fmt.RecordType.ALIAS_REMOVE: st.builds(fmt.AliasRemove, text),
    fmt.RecordType.QUEUE_ADD: st.builds(fmt.QueueAdd, guid, hash32, i64, text, texts, text),
    fmt.RecordType.QUEUE_ATTEMPT: st.builds(fmt.QueueAttempt, guid, u64, i64, texts),
    fmt.RecordType.QUEUE_DONE: st.builds(
        fmt.QueueDone,
        guid,
        text,
        st.sampled_from(fmt.QueueResult),
        i64,
        text,
        st.sampled_from([fmt.QueueDoneFlag(0), fmt.QueueDoneFlag.WARNED]),
    ),
    fmt.RecordType.MIME_META: st.builds(fmt.MimeMeta, hash32, u8, data),
    fmt.RecordType.HOLE: st.builds(fmt.Hole, u64, text),
    fmt.RecordType.RECLAIMED: st.builds(fmt.Reclaimed, u8, st.binary(max_size=64), u64),
    fmt.RecordType.RESERVE: st.builds(fmt.Reserve, guid, u32, u64),
}

records = st.one_of(*RECORD_STRATEGIES.values())
record_lists = st.lists(records, min_size=1, max_size=6)

# Records whose last field is "the rest of the body": a shorter body is still a valid record.
TRAILING_DATA = {fmt.RecordType.BLOB, fmt.RecordType.CHUNK, fmt.RecordType.MIME_META}


def frame_of(recs: list[fmt.Record], lsn: int = 7, generation: int = 3, time_ms: int = 42) -> bytes:
    payload = fmt.encode_records(recs)
    return fmt.encode_frame(
        lsn=lsn,
        generation=generation,
        node_id=NODE,
        time_ms=time_ms,
        payload=payload,
        nrecords=len(recs),
    )


def read_frame(raw: bytes) -> tuple[fmt.FrameHeader, list[fmt.Record]]:
    """Verify and decode a whole frame the way the log does: header, length, payload CRC,
    records. Raises FormatError."""
    hdr = fmt.decode_frame_header(raw)
    payload = raw[fmt.FRAME_HEADER_SIZE :]
    if len(payload) != hdr.payload_len:
        raise fmt.FormatError("frame length mismatch")
    if fmt.crc32c(payload) != hdr.payload_crc:
        raise fmt.FormatError("frame payload checksum mismatch")
    return hdr, fmt.decode_records(payload)


# --- records ------------------------------------------------------------------------------------


def test_every_record_type_has_a_strategy() -> None:
    assert set(RECORD_STRATEGIES) == set(fmt.RecordType)


@pytest.mark.parametrize("typ", list(fmt.RecordType), ids=lambda t: t.name)
@given(hypothesis_data=st.data())
def test_record_round_trip(typ: fmt.RecordType, hypothesis_data: st.DataObject) -> None:
    rec = hypothesis_data.draw(RECORD_STRATEGIES[typ])
    assert typ == rec.TYPE
    body = rec.encode()
    assert fmt.decode_record(typ, body) == rec
    assert fmt.decode_record(int(typ), memoryview(body)) == rec
    # And framed as `type u8, length u32, body`.
    enc = fmt.encode_records([rec])
    assert enc[0] == typ and struct.unpack_from("<I", enc, 1)[0] == len(body)
    assert fmt.decode_records(enc) == [rec]


@given(record_lists)
def test_record_list_round_trip(recs: list[fmt.Record]) -> None:
    payload = fmt.encode_records(recs)
    assert fmt.decode_records(payload) == recs
    spans = list(fmt.iter_record_spans(payload))
    assert [t for t, _, _ in spans] == [r.TYPE for r in recs]


def test_record_examples_round_trip_exactly() -> None:
    """Hand-written values at the edges of each field."""
    recs: list[fmt.Record] = [
        fmt.Blob(b"\xff" * 32, 2**64 - 1, 0, b""),
        fmt.Blob(b"\x00" * 32, 10, 3, b"S" * 16),
        fmt.Deliver(
            b"h" * 32,
            -(2**63),
            0,
            0xFF,
            ("$Junk", "ÄÖÜ", ""),
            (fmt.Target(b"m" * 16, b"g" * 16, 0xFFFFFFFF, 2**64 - 1),),
        ),
        fmt.Flags(b"m" * 16, 1, 1, 2, (), ("\\x",), (1, 2, 0xFFFFFFFF)),
        fmt.Subscribe(b"a" * 16, False, "INBOX/ü"),
        fmt.QueueDone(b"q" * 16, "r@x", fmt.QueueResult.DEFERRED, -1, "4.2.0 later"),
        fmt.QueueDone(
            b"q" * 16, "r@x", fmt.QueueResult.DEFERRED, 5, "later", fmt.QueueDoneFlag.WARNED
        ),
        fmt.AccountPut(b"a" * 16, "a@b", "x" * 0xFFFF, 0, 0xFFFFFFFF),
        fmt.Reclaimed(fmt.RecordType.BLOB, b"h" * 44, 123),
        fmt.Reserve(b"m" * 16, 0xFFFFFFFF, 2**64 - 1),
        fmt.Reserve(b"m" * 16, 0, 0),
    ]
    for rec in recs:
        assert fmt.decode_record(rec.TYPE, rec.encode()) == rec


def test_encode_rejects_what_does_not_fit() -> None:
    with pytest.raises(fmt.FormatError):
        fmt.DomainAdd("x" * 0x10000).encode()  # a string longer than its u16 length
    with pytest.raises(fmt.FormatError):
        fmt.Blob(b"short", 1, 0, b"x").encode()  # a hash that is not 32 bytes
    with pytest.raises(fmt.FormatError):
        fmt.MailboxDelete(b"\x00" * 15).encode()


@given(records, st.data())
def test_truncated_record_raises_format_error(rec: fmt.Record, d: st.DataObject) -> None:
    body = rec.encode()
    assume(len(body) > 0)
    cut = d.draw(st.integers(0, len(body) - 1), label="cut")
    if rec.TYPE in TRAILING_DATA:
        # The data runs to the end of the body: a cut inside it still decodes (the frame's
        # payload CRC is what catches that); a cut inside the fixed head never does.
        head = fmt.DATA_HEAD_LEN[rec.TYPE]
        if rec.TYPE == fmt.RecordType.MIME_META:
            head += 1  # the version byte is decoded too (the index locates version + data)
        if cut >= head:
            out = fmt.decode_record(rec.TYPE, body[:cut])
            assert out.TYPE == rec.TYPE
            return
    if isinstance(rec, fmt.QueueDone) and rec.flags and cut == len(body) - 1:
        # Without its optional flags byte a QUEUE_DONE is the record as written before the
        # byte existed: valid, and not flagged (the frame's payload CRC catches such a cut).
        assert fmt.decode_record(rec.TYPE, body[:cut]) == dataclasses.replace(
            rec, flags=fmt.QueueDoneFlag(0)
        )
        return
    with pytest.raises(fmt.FormatError):
        fmt.decode_record(rec.TYPE, body[:cut])


@given(records, st.binary(min_size=1, max_size=8))
def test_trailing_bytes_are_refused(rec: fmt.Record, extra: bytes) -> None:
    assume(rec.TYPE not in TRAILING_DATA)
    if isinstance(rec, fmt.QueueDone) and not rec.flags and len(extra) == 1:
        assume(extra != bytes([fmt.QueueDoneFlag.WARNED]))  # that is the flags byte (tested below)
    with pytest.raises(fmt.FormatError):
        fmt.decode_record(rec.TYPE, rec.encode() + extra)


@given(record_lists, st.data())
def test_truncated_payload_raises_format_error(recs: list[fmt.Record], d: st.DataObject) -> None:
    payload = fmt.encode_records(recs)
    boundaries = {0}
    for _, off, ln in fmt.iter_record_spans(payload):
        boundaries.add(off + ln)
    cut = d.draw(st.integers(0, len(payload) - 1), label="cut")
    if cut in boundaries:
        # A cut between records is a shorter valid payload: the whole records before it decode.
        whole = sum(1 for _, off, ln in fmt.iter_record_spans(payload) if off + ln <= cut)
        assert fmt.decode_records(payload[:cut]) == recs[:whole]
    else:
        with pytest.raises(fmt.FormatError):
            fmt.decode_records(payload[:cut])


@settings(max_examples=300)
@given(u8, st.binary(max_size=200))
@example(int(fmt.RecordType.DELIVER), b"\x00" * 57 + b"\xff\xff\xff\x7f")
@example(int(fmt.RecordType.FLAGS), b"\x00" * 26 + b"\xff\xff\xff\xff")
@example(int(fmt.RecordType.RECLAIMED), b"\x01\xff\xff\xff\xff")
@example(int(fmt.RecordType.QUEUE_DONE), b"\x00" * 16 + b"\x00\x00" + b"\x09" + b"\x00" * 10)
def test_garbage_record_body_raises_only_format_error(typ: int, body: bytes) -> None:
    try:
        rec = fmt.decode_record(typ, body)
    except fmt.FormatError:
        return
    assert typ == rec.TYPE
    # Whatever decodes is a record: it encodes and decodes back to itself.
    assert fmt.decode_record(typ, rec.encode()) == rec


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_garbage_payload_raises_only_format_error(payload: bytes) -> None:
    try:
        recs = fmt.decode_records(payload)
    except fmt.FormatError:
        return
    assert fmt.decode_records(fmt.encode_records(recs)) == recs


def test_unknown_record_type_is_refused() -> None:
    assert 0 not in set(fmt.RecordType)
    for typ in (0, max(fmt.RecordType) + 1, 255):
        with pytest.raises(fmt.FormatError):
            fmt.decode_record(typ, b"")


def test_invalid_utf8_and_unknown_queue_result_are_refused() -> None:
    with pytest.raises(fmt.FormatError):
        fmt.decode_record(fmt.RecordType.DOMAIN_ADD, b"\x02\x00\xff\xfe")
    good = fmt.QueueDone(b"q" * 16, "r", fmt.QueueResult.BOUNCED, 0, "").encode()
    bad = bytearray(good)
    bad[16 + 2 + 1] = 99  # the result byte
    with pytest.raises(fmt.FormatError):
        fmt.decode_record(fmt.RecordType.QUEUE_DONE, bytes(bad))


def test_queue_done_flags_byte_is_optional_and_validated() -> None:
    old = fmt.QueueDone(b"q" * 16, "r@x", fmt.QueueResult.DEFERRED, 9, "451 later")
    body = old.encode()  # the layout before the flags byte: unchanged for unflagged records
    assert body == b"q" * 16 + b"\x03\x00r@x\x05" + struct.pack("<q", 9) + b"\x09\x00451 later"
    got = fmt.decode_record(fmt.RecordType.QUEUE_DONE, body)
    assert got == old and got.flags == 0 and not got.flags & fmt.QueueDoneFlag.WARNED
    warned = dataclasses.replace(old, flags=fmt.QueueDoneFlag.WARNED)
    assert warned.encode() == body + b"\x01"
    assert fmt.decode_record(fmt.RecordType.QUEUE_DONE, body + b"\x01") == warned
    for bad in (b"\x00", b"\x02", b"\x81", b"\x01\x00"):  # not canonical, unknown bits, trailing
        with pytest.raises(fmt.FormatError):
            fmt.decode_record(fmt.RecordType.QUEUE_DONE, body + bad)


# --- frames -------------------------------------------------------------------------------------


@given(record_lists, u64, u64, i64, st.sampled_from(fmt.FrameKind))
def test_frame_round_trip(
    recs: list[fmt.Record], lsn: int, generation: int, time_ms: int, kind: fmt.FrameKind
) -> None:
    payload = fmt.encode_records(recs)
    raw = fmt.encode_frame(
        lsn=lsn,
        generation=generation,
        node_id=NODE,
        time_ms=time_ms,
        payload=payload,
        nrecords=len(recs),
        kind=kind,
    )
    assert len(raw) == fmt.FRAME_HEADER_SIZE + len(payload)
    hdr, out = read_frame(raw)
    assert out == recs
    assert hdr == fmt.FrameHeader(
        kind, len(recs), len(payload), lsn, generation, NODE, time_ms, fmt.crc32c(payload)
    )


@given(record_lists, st.data())
def test_flipped_bit_anywhere_in_a_frame_is_detected(
    recs: list[fmt.Record], d: st.DataObject
) -> None:
    raw = frame_of(recs)
    bit = d.draw(st.integers(0, 8 * len(raw) - 1), label="bit")
    bad = bytearray(raw)
    bad[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(fmt.FormatError):
        read_frame(bytes(bad))


def test_every_single_bit_flip_of_a_frame_is_detected() -> None:
    """Exhaustive over one small frame: header bits fail the header, payload bits the CRC."""
    recs: list[fmt.Record] = [
        fmt.Blob(b"h" * 32, 5, 0, b"hello"),
        fmt.Deliver(b"h" * 32, 1, 5, 1, ("$x",), (fmt.Target(b"m" * 16, b"g" * 16, 1, 2),)),
    ]
    raw = frame_of(recs)
    for bit in range(8 * len(raw)):
        bad = bytearray(raw)
        bad[bit // 8] ^= 1 << (bit % 8)
        if bit < 8 * fmt.FRAME_HEADER_SIZE:
            with pytest.raises(fmt.FormatError):
                fmt.decode_frame_header(bytes(bad))
        else:
            hdr = fmt.decode_frame_header(bytes(bad))
            assert fmt.crc32c(bytes(bad[fmt.FRAME_HEADER_SIZE :])) != hdr.payload_crc, bit


@settings(max_examples=40, deadline=None)
@given(st.lists(record_lists, min_size=2, max_size=4), st.data())
def test_log_reader_never_yields_a_flipped_frame(
    tmp_path_factory: pytest.TempPathFactory, frames: list[list[fmt.Record]], d: st.DataObject
) -> None:
    """The real segment reader (`log.scan_segment`) on a file with one flipped bit yields only
    the intact frames before the damaged one and reports where it stopped."""
    path = tmp_path_factory.mktemp("seg") / "segment-00000001.log"
    raws = [frame_of(recs, lsn=1 + i) for i, recs in enumerate(frames)]
    image = bytearray(fmt.SegmentHeader(1, 1, NODE, 0).encode() + b"".join(raws))
    victim = d.draw(st.integers(0, len(raws) - 1), label="frame")
    start = fmt.SEGMENT_HEADER_SIZE + sum(len(r) for r in raws[:victim])
    bit = d.draw(st.integers(0, 8 * len(raws[victim]) - 1), label="bit")
    image[start + bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(image))
    it, stops = scan_segment(OsFileSystem(), str(path), 1, fmt.SEGMENT_HEADER_SIZE, 1)
    got = [fr.raw for fr in it]
    assert got == raws[:victim]
    assert len(stops) == 1 and stops[0].offset == start and stops[0].expected_lsn == victim + 1
    if victim < len(raws) - 1:
        # Valid frames follow the damage: the reader says so (corrupt, not torn).
        assert not stops[0].torn and stops[0].next_valid_lsn == victim + 2


def _recrc_header(head: bytearray) -> bytes:
    """Rewrite a frame header's own CRC after editing it."""
    n = fmt.FRAME_HEADER_SIZE - 4
    return bytes(head[:n]) + struct.pack("<I", fmt.crc32c(bytes(head[:n])))


def test_frame_header_rejections() -> None:
    raw = frame_of([fmt.DomainAdd("example.org")])
    head = bytearray(raw[: fmt.FRAME_HEADER_SIZE])
    fmt.decode_frame_header(bytes(head))  # sanity: the original is fine
    cases: dict[str, bytes] = {}
    h = bytearray(head)
    h[0:4] = b"XXXX"
    cases["magic"] = _recrc_header(h)
    h = bytearray(head)
    h[4] = fmt.FORMAT_VERSION + 1
    cases["version"] = _recrc_header(h)
    h = bytearray(head)
    h[5] = 7
    cases["kind"] = _recrc_header(h)
    h = bytearray(head)
    h[8:12] = struct.pack("<I", fmt.MAX_FRAME_PAYLOAD + 1)
    cases["payload length"] = _recrc_header(h)
    h = bytearray(head)
    h[-1] ^= 0x80
    cases["header crc"] = bytes(h)
    for what, bad in cases.items():
        with pytest.raises(fmt.FormatError):
            fmt.decode_frame_header(bad)
            pytest.fail(f"a frame header with a bad {what} decoded")


@given(record_lists, st.data())
def test_truncated_frame_raises_format_error(recs: list[fmt.Record], d: st.DataObject) -> None:
    raw = frame_of(recs)
    cut = d.draw(st.integers(0, len(raw) - 1), label="cut")
    with pytest.raises(fmt.FormatError):
        read_frame(raw[:cut])


@settings(max_examples=300)
@given(st.binary(min_size=fmt.FRAME_HEADER_SIZE, max_size=fmt.FRAME_HEADER_SIZE + 16))
def test_garbage_frame_header_raises_only_format_error(raw: bytes) -> None:
    with pytest.raises(fmt.FormatError):
        fmt.decode_frame_header(raw)


def test_oversized_frame_is_refused_at_encode() -> None:
    with pytest.raises(fmt.FormatError):
        fmt.encode_frame(
            lsn=1,
            generation=1,
            node_id=NODE,
            time_ms=0,
            payload=bytes(fmt.MAX_FRAME_PAYLOAD + 1),
            nrecords=1,
        )


# --- segment header -----------------------------------------------------------------------------


@given(u64, u64, guid, i64, st.integers(0, 2**20))
def test_segment_header_round_trip(
    segno: int, first_lsn: int, node: bytes, created: int, rewrites: int
) -> None:
    raw = fmt.SegmentHeader(segno, first_lsn, node, created, rewrites).encode()
    assert len(raw) == fmt.SEGMENT_HEADER_SIZE
    assert raw.startswith(fmt.SEGMENT_MAGIC)
    got = fmt.SegmentHeader.decode(raw + b"frames follow")
    # The rewrite counter is a u16 that wraps.
    assert got == fmt.SegmentHeader(segno, first_lsn, node, created, rewrites & 0xFFFF)


def _recrc_segment(raw: bytearray) -> bytes:
    n = fmt.SEGMENT_HEADER_SIZE - 4
    return bytes(raw[:n]) + struct.pack("<I", fmt.crc32c(bytes(raw[:n])))


def test_segment_header_rejections() -> None:
    good = fmt.SegmentHeader(3, 100, NODE, 1234, 2).encode()
    bad_magic = bytearray(good)
    bad_magic[0] ^= 0x20
    wrong_version = bytearray(good)
    wrong_version[8:10] = struct.pack("<H", fmt.FORMAT_VERSION + 1)
    cases = {
        "magic": _recrc_segment(bad_magic),
        "version": _recrc_segment(wrong_version),
        "empty": b"",
        "truncated": good[:-1],
    }
    for what, raw in cases.items():
        with pytest.raises(fmt.FormatError):
            fmt.SegmentHeader.decode(raw)
            pytest.fail(f"segment header with bad {what} decoded")
    for bit in range(8 * fmt.SEGMENT_HEADER_SIZE):
        flipped = bytearray(good)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(fmt.FormatError):
            fmt.SegmentHeader.decode(bytes(flipped))


@given(st.binary(max_size=fmt.SEGMENT_HEADER_SIZE + 8))
def test_garbage_segment_header_raises_only_format_error(raw: bytes) -> None:
    with pytest.raises(fmt.FormatError):
        fmt.SegmentHeader.decode(raw)


# --- checkpoint body (the serialized index) -----------------------------------------------------


@settings(max_examples=200)
@given(st.binary(max_size=400))
def test_garbage_checkpoint_body_raises_only_format_error(raw: bytes) -> None:
    with contextlib.suppress(fmt.FormatError):
        ix.Index.deserialize(raw)


def _queue_frame(recs: list[fmt.Record], lsn: int) -> tuple[fmt.FrameHeader, bytes]:
    payload = fmt.encode_records(recs)
    raw = fmt.encode_frame(
        lsn=lsn, generation=1, node_id=NODE, time_ms=0, payload=payload, nrecords=len(recs)
    )
    return fmt.decode_frame_header(raw), payload


def test_queue_entry_warned_round_trips_through_the_checkpoint_body() -> None:
    index = ix.Index()
    entries = [bytes([i]) * 16 for i in range(3)]
    adds: list[fmt.Record] = [
        fmt.QueueAdd(g, b"h" * 32, 1, "s@x", ("a@r", "b@r"), "") for g in entries
    ]
    done: list[fmt.Record] = [
        fmt.QueueDone(entries[0], "a@r", fmt.QueueResult.DEFERRED, 5, "later"),
        fmt.QueueDone(
            entries[1], "a@r", fmt.QueueResult.DEFERRED, 5, "later", fmt.QueueDoneFlag.WARNED
        ),
        # A record of an old log: the suffix is how a sent warning was recorded before the flag.
        fmt.QueueDone(
            entries[2], "a@r", fmt.QueueResult.DEFERRED, 5, "later" + ix.LEGACY_WARNED_MARK
        ),
        # An unflagged record after a flagged one does not clear `warned`.
        fmt.QueueDone(entries[1], "a@r", fmt.QueueResult.DELIVERED, 0, "250 ok"),
    ]
    for lsn, recs in enumerate((adds, done), start=1):
        head, payload = _queue_frame(recs, lsn)
        index.apply_frame(head, payload, 1, 0)
    assert [index.queue[g].warned for g in entries] == [False, True, True]
    assert [index.queue[g].last_detail for g in entries] == ["later", "250 ok", "later"]
    body = index.serialize()
    back = ix.Index.deserialize(body)
    assert [back.queue[g].warned for g in entries] == [False, True, True]
    assert back.queue == index.queue and back.serialize() == body


def test_truncated_checkpoint_body_raises_format_error() -> None:
    body = ix.Index().serialize()
    assert ix.Index.deserialize(body).serialize() == body
    for cut in range(len(body)):
        with pytest.raises(fmt.FormatError):
            ix.Index.deserialize(body[:cut])


def test_crc32c_is_castagnoli() -> None:
    # The standard check value of CRC-32C.
    assert fmt.crc32c(b"123456789") == 0xE3069283


def test_scan_of_a_truncated_last_frame_is_torn(tmp_path: Path) -> None:
    """A cut final frame is reported as torn (nothing valid follows), not as corruption."""
    raws = [frame_of([fmt.DomainAdd(f"d{i}.org")], lsn=1 + i) for i in range(3)]
    image = fmt.SegmentHeader(1, 1, NODE, 0).encode() + b"".join(raws)
    path = tmp_path / "segment-00000001.log"
    path.write_bytes(image[:-3])
    it, stops = scan_segment(OsFileSystem(), str(path), 1, fmt.SEGMENT_HEADER_SIZE, 1)
    assert [fr.raw for fr in it] == raws[:2]
    assert len(stops) == 1 and stops[0].torn and stops[0].expected_lsn == 3


def test_writev_appends_every_chunk_in_order(tmp_path: Path) -> None:
    """The log's batched write (more buffers than one writev call takes, empty ones among
    them) leaves the same bytes as writing them joined, and counts them in size()."""
    fs = OsFileSystem()
    path = str(tmp_path / "seg")
    chunks = [bytes([i % 251]) * (i % 7) for i in range(3000)] + [os.urandom(300_000)]
    f = fs.open_append(path)
    try:
        f.write(b"head")
        f.writev(chunks)
        assert f.size() == 4 + sum(map(len, chunks))
    finally:
        f.close()
    assert Path(path).read_bytes() == b"head" + b"".join(chunks)
