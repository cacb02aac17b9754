"""The peer wire protocol: round trips, and rejection of corrupt, truncated, oversized, forged,
replayed and stale-term input; a fuzzed decoder never raises anything undocumented."""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from mailharbor.repl import wire as W
from mailharbor.repl.generations import Generation, NodeView
from mailharbor.repl.state import DiskState, Protocol, Role
from mailharbor.store import format as fmt

from . import SECRET, SETTINGS, A, B, frame

KEY = hashlib.sha256(b"k").digest()

SAMPLES: list[W.Message] = [
    W.Hello(A, b"n" * 32, 1, 3, SETTINGS),
    W.Auth(b"m" * 32),
    W.State(
        NodeView(
            A,
            Role.PRIMARY,
            DiskState.UP_TO_DATE,
            (Generation(1, 1, A, 1, None), Generation(4, 90, B, None, 120)),
            150,
            1,
            True,
        ),
        Protocol.C,
        update=True,
    ),
    W.State(NodeView(B, Role.SECONDARY, DiskState.INCONSISTENT, (), 0), Protocol.A),
    W.Frames(7, W.FramesPurpose.RESYNC, (frame(7), frame(8))),
    W.Frames(1, W.FramesPurpose.LIVE, ()),
    W.Ack(10, 9),
    W.ResyncRequest(5, None),
    W.ResyncRequest(5, 10),
    W.SyncDone(99),
    W.BranchEnd(12),
    W.MergeDone(80, b"d" * 32),
    W.VerifyRequest(1, 1000),
    W.VerifyDigest(1, 1000, b"d" * 32),
    W.VerifyDigest(1, 1000, b""),
    W.Ping(3),
    W.Pong(3),
    W.Refuse(W.RefuseReason.SETTINGS, "cluster settings differ"),
    W.SnapshotRequest(12),
    W.SnapshotData("segment-00000003.log", 4096, b"seg bytes"),
    W.SnapshotData("checkpoint-00000000000000000090.ckpt", 0, b""),
    W.SnapshotEnd(90, 2, 4105, b"s" * 32),
    W.SnapshotAck(4105),
    W.SnapshotResume(77, b"i" * 16, 3, 123456),
    W.SnapshotBegin(b"i" * 16, 78, 3, 123456, 5, 9_000_000),
]


#: Link versions with each kind of message tag: HMAC-SHA256 (1, 2), GMAC (3 on).
TAG_VERSIONS = pytest.mark.parametrize("version", [2, W.GMAC_VERSION], ids=["hmac", "gmac"])


def stream(
    msgs: list[W.Message], key: bytes | None = None, term: int = 5, version: int = W.MAX_VERSION
) -> bytes:
    enc = W.MessageEncoder()
    if key:
        enc.set_key(key, version)
    return b"".join(enc.encode(m, term) for m in msgs)


def decode_all(
    data: bytes, key: bytes | None = None, chunks: int = 0, version: int = W.MAX_VERSION
) -> list[W.Received]:
    dec = W.MessageDecoder(1 << 20)
    if key:
        dec.set_key(key, version)
    out: list[W.Received] = []
    pieces = [data] if chunks <= 0 else [data[i : i + chunks] for i in range(0, len(data), chunks)]
    for p in pieces:
        dec.receive_data(p)
        while (r := dec.next_message()) is not None:
            out.append(r)
    dec.receive_eof()
    assert dec.next_message() is None
    return out


@pytest.mark.parametrize(
    ("key", "version"), [(None, 3), (KEY, 2), (KEY, 3)], ids=["plain", "hmac", "gmac"]
)
@pytest.mark.parametrize("chunks", [0, 1, 7])
def test_every_message_round_trips_whole_and_in_pieces(
    key: bytes | None, version: int, chunks: int
) -> None:
    got = decode_all(stream(SAMPLES, key, version=version), key, chunks, version)
    assert [r.message for r in got] == SAMPLES
    assert [r.seq for r in got] == list(range(len(SAMPLES)))
    assert {r.term for r in got} == {5}


def test_every_message_type_is_sampled() -> None:
    assert {m.TYPE for m in SAMPLES} == set(W.MsgType)


def test_header_layout_is_36_bytes_and_versioned() -> None:
    data = stream([W.Ping(1)])
    assert W.HEADER_SIZE == 36
    assert data[:4] == b"MHRP" and data[4] == 1 and data[5] == W.MsgType.PING


def one_error(
    data: bytes, key: bytes | None = None, max_size: int = 1 << 20, version: int = W.MAX_VERSION
) -> W.WireError:
    dec = W.MessageDecoder(max_size)
    if key:
        dec.set_key(key, version)
    dec.receive_data(data)
    dec.receive_eof()
    with pytest.raises(W.WireError) as ei:
        while dec.next_message() is not None:
            pass
    # It stays failed.
    with pytest.raises(type(ei.value)):
        dec.next_message()
    return ei.value


@pytest.mark.parametrize("pos", [0, 4, 9, 20, 30, 34, 36, 40])
def test_a_flipped_bit_anywhere_is_corrupt(pos: int) -> None:
    data = bytearray(stream([W.Ack(1, 1)]))
    data[pos] ^= 0x10
    assert isinstance(one_error(bytes(data)), W.CorruptMessage)


def test_corruption_under_mac_is_reported_as_corrupt_not_forged() -> None:
    data = bytearray(stream([W.Ack(1, 1)], KEY))
    data[W.HEADER_SIZE + 3] ^= 1
    assert type(one_error(bytes(data), KEY)) is W.CorruptMessage


def test_truncated_stream_at_eof() -> None:
    data = stream([W.Ping(1), W.Ack(3, 2)])
    for cut in (len(data) - 1, len(data) - 10, W.HEADER_SIZE + 8 + 5):
        assert isinstance(one_error(data[:cut]), W.TruncatedMessage)


def test_oversized_message_is_refused_before_its_body_arrives() -> None:
    big = W.Frames(1, W.FramesPurpose.LIVE, (frame(1, size=5000),))
    data = stream([big])
    dec = W.MessageDecoder(1024)
    dec.receive_data(data[: W.HEADER_SIZE])  # the header alone is enough to refuse
    with pytest.raises(W.MessageTooLarge):
        dec.next_message()


def test_unknown_header_version_and_type() -> None:
    data = bytearray(stream([W.Ping(1)]))
    data[4] = 9
    data[32:36] = struct.pack("<I", W.crc32c(bytes(data[:32])))
    assert isinstance(one_error(bytes(data)), W.UnsupportedVersion)
    data = bytearray(stream([W.Ping(1)]))
    data[5] = 200
    data[32:36] = struct.pack("<I", W.crc32c(bytes(data[:32])))
    assert isinstance(one_error(bytes(data)), W.CorruptMessage)


def test_malformed_body_with_right_crc_is_corrupt() -> None:
    enc = W.MessageEncoder()
    good = enc.encode(W.Ack(1, 1), 1)
    body = b"\x01\x02\x03"  # too short for an ACK
    head = W.HEADER.pack(b"MHRP", 1, W.MsgType.ACK, 0, len(body), 1, 0, W.crc32c(body), 0)[:-4]
    head += struct.pack("<I", W.crc32c(head))
    assert isinstance(one_error(head + body), W.CorruptMessage)
    assert decode_all(bytes(good))[0].message == W.Ack(1, 1)


@TAG_VERSIONS
def test_mac_missing_wrong_key_or_unexpected(version: int) -> None:
    plain = stream([W.Ping(1)])
    assert isinstance(one_error(plain, KEY, version=version), W.ForgedMessage)  # no MAC
    other = stream([W.Ping(1)], hashlib.sha256(b"other").digest(), version=version)
    assert isinstance(one_error(other, KEY, version=version), W.ForgedMessage)  # another key
    tagged = stream([W.Ping(1)], KEY, version=version)
    assert isinstance(one_error(tagged), W.ForgedMessage)  # MAC unexpected


def test_a_tag_of_the_other_kind_is_forged() -> None:
    """A version 3 link takes no HMAC-tagged message and a version 2 link no GMAC one, even
    under the right key: the kind is fixed by the negotiated version, not by the sender."""
    hmac_tagged, gmac_tagged = (stream([W.Ping(1)], KEY, version=v) for v in (2, 3))
    assert isinstance(one_error(hmac_tagged, KEY, version=3), W.ForgedMessage)
    assert isinstance(one_error(gmac_tagged, KEY, version=2), W.ForgedMessage)


def test_gmac_tag_is_aes256_gcm_over_header_and_body_with_seq_nonce() -> None:
    """The version 3 tag pinned with cryptography's other (streaming) GCM interface: AES-256-GCM,
    no plaintext, header and body as associated data, nonce = seq (u64 LE) + 4 zero bytes."""
    enc = W.MessageEncoder()
    enc.set_key(KEY, W.GMAC_VERSION)
    enc.encode(W.Ping(0), 1)
    data = enc.encode(W.Ack(7, 5), 1)  # seq 1
    msg, tag = data[: -W.GMAC_SIZE], data[-W.GMAC_SIZE :]
    assert data[6] & W.FLAG_GMAC and len(msg) == W.HEADER_SIZE + len(W.Ack(7, 5).encode())
    nonce = struct.pack("<Q", 1) + bytes(4)
    gcm = Cipher(algorithms.AES(KEY), modes.GCM(nonce)).encryptor()
    gcm.authenticate_additional_data(msg)
    gcm.finalize()
    assert tag == gcm.tag


@TAG_VERSIONS
def test_forged_message_with_recomputed_crc_is_rejected(version: int) -> None:
    """An attacker can fix the CRCs but not the MAC."""
    data = bytearray(stream([W.Ack(1, 1)], KEY, version=version))
    body = W.Ack(1000, 1000).encode()
    data[W.HEADER_SIZE : W.HEADER_SIZE + 16] = body
    data[28:32] = struct.pack("<I", W.crc32c(body))
    data[32:36] = struct.pack("<I", W.crc32c(bytes(data[:32])))
    assert isinstance(one_error(bytes(data), KEY, version=version), W.ForgedMessage)


@TAG_VERSIONS
def test_replayed_dropped_or_reordered_messages_are_out_of_sequence(version: int) -> None:
    enc = W.MessageEncoder()
    enc.set_key(KEY, version)
    m0, m1, m2 = (bytes(enc.encode(W.Ping(i), 1)) for i in range(3))

    def err(data: bytes) -> W.WireError:
        return one_error(data, KEY, version=version)

    assert isinstance(err(m0 + m0), W.ReplayedMessage)  # replay
    assert isinstance(err(m0 + m2), W.ReplayedMessage)  # dropped one
    assert isinstance(err(m1), W.ReplayedMessage)  # reordered
    got = decode_all(m0 + m1 + m2, KEY, version=version)
    assert [r.message for r in got] == [W.Ping(0), W.Ping(1), W.Ping(2)]


def test_a_term_going_down_is_stale() -> None:
    enc = W.MessageEncoder()
    data = enc.encode(W.Ping(1), 7) + enc.encode(W.Ping(2), 6)
    err = one_error(bytes(data))
    assert isinstance(err, W.StaleTerm) and err.reason is W.RefuseReason.STALE_TERM


# --- handshake crypto ---------------------------------------------------------------------


def hello(node: bytes, nonce: bytes, settings: bytes = SETTINGS) -> W.Hello:
    return W.Hello(node, nonce, 1, 1, settings)


def test_auth_mac_binds_both_nonces_ids_and_settings() -> None:
    ha, hb = hello(A, b"a" * 32), hello(B, b"b" * 32)
    mac = W.auth_mac(SECRET, sender=ha, receiver=hb)
    # The verifier computes the same with the same inputs ...
    assert mac == W.auth_mac(SECRET, sender=ha, receiver=hb)
    # ... but not with a fresh nonce of its own (a recorded AUTH replayed to a new session),
    assert mac != W.auth_mac(SECRET, sender=ha, receiver=hello(B, b"c" * 32))
    # nor reflected back to its sender, nor under another secret or other settings.
    assert mac != W.auth_mac(SECRET, sender=hb, receiver=ha)
    assert mac != W.auth_mac(b"other", sender=ha, receiver=hb)
    assert mac != W.auth_mac(SECRET, sender=ha, receiver=hello(B, b"b" * 32, b"x" * 32))


def test_session_keys_differ_per_direction_and_session() -> None:
    ha, hb = hello(A, b"a" * 32), hello(B, b"b" * 32)
    k_ab = W.session_key(SECRET, sender=ha, receiver=hb)
    k_ba = W.session_key(SECRET, sender=hb, receiver=ha)
    k_ab2 = W.session_key(SECRET, sender=ha, receiver=hello(B, b"z" * 32))
    assert len({k_ab, k_ba, k_ab2}) == 3


def test_version_negotiation() -> None:
    a = W.Hello(A, b"a" * 32, 1, 3, SETTINGS)
    assert W.negotiate_version(a, W.Hello(B, b"b" * 32, 2, 5, SETTINGS)) == 3
    assert W.negotiate_version(a, W.Hello(B, b"b" * 32, 4, 5, SETTINGS)) is None


# --- store frames -------------------------------------------------------------------------


@given(
    lsn=st.integers(1, 2**63),
    generation=st.integers(0, 2**63),
    node=st.binary(min_size=16, max_size=16),
    payload=st.binary(max_size=64),
)
def test_peek_frame_agrees_with_the_store_format(
    lsn: int, generation: int, node: bytes, payload: bytes
) -> None:
    raw = fmt.encode_frame(
        lsn=lsn, generation=generation, node_id=node, time_ms=5, payload=payload, nrecords=0
    )
    info = W.peek_frame(raw)
    hdr = fmt.decode_frame_header(raw)
    assert (info.lsn, info.generation, info.origin) == (hdr.lsn, hdr.generation, hdr.node_id)
    assert W.FRAME_HEADER_SIZE == fmt.FRAME_HEADER_SIZE


def test_peek_frame_rejects_damage() -> None:
    raw = frame(3)
    for bad in (raw[:-1], raw + b"x", b"XXXX" + raw[4:], raw[:20] + b"\xff" + raw[21:]):
        with pytest.raises(W.CorruptMessage):
            W.peek_frame(bad)


# --- fuzzing ------------------------------------------------------------------------------


def _consume(dec: W.MessageDecoder, data: bytes, step: int) -> None:
    try:
        for i in range(0, len(data), step):
            dec.receive_data(data[i : i + step])
            while dec.next_message() is not None:
                pass
        dec.receive_eof()
        while dec.next_message() is not None:
            pass
    except W.WireError:
        pass  # the only documented failure


@given(data=st.binary(max_size=400), step=st.integers(1, 64), keyed=st.booleans())
def test_random_bytes_never_raise_anything_but_wire_errors(
    data: bytes, step: int, keyed: bool
) -> None:
    dec = W.MessageDecoder(256)
    if keyed:
        dec.set_key(KEY, W.MAX_VERSION)
    _consume(dec, data, step)
    assert dec.buffered <= 256 + W.HEADER_SIZE + W.MAC_SIZE + 400


@given(
    msgs=st.lists(st.sampled_from(SAMPLES), max_size=6),
    pos=st.integers(0, 10_000),
    xor=st.integers(1, 255),
    step=st.integers(1, 50),
    keyed=st.booleans(),
)
def test_mutated_valid_streams_are_decoded_or_refused(
    msgs: list[W.Message], pos: int, xor: int, step: int, keyed: bool
) -> None:
    key = KEY if keyed else None
    data = bytearray(stream(msgs, key))
    if data:
        data[pos % len(data)] ^= xor
    dec = W.MessageDecoder(1 << 20)
    if key:
        dec.set_key(key, W.MAX_VERSION)
    got: list[W.Message] = []
    try:
        for i in range(0, len(data), step):
            dec.receive_data(bytes(data[i : i + step]))
            while (r := dec.next_message()) is not None:
                got.append(r.message)
        dec.receive_eof()
        while (r := dec.next_message()) is not None:
            got.append(r.message)
    except W.WireError:
        pass
    # Whatever was accepted is a prefix of what was sent: a mutation is never accepted as a
    # different message (bodies are CRC'd; with a key, MAC'd).
    assert got == msgs[: len(got)]
    if keyed and data:
        assert len(got) < len(msgs)


@given(msgs=st.lists(st.sampled_from(SAMPLES), max_size=8), split=st.integers(1, 97))
def test_whole_byte_by_byte_and_split_agree(msgs: list[W.Message], split: int) -> None:
    data = stream(msgs, KEY)
    whole = [r.message for r in decode_all(data, KEY)]
    assert whole == msgs
    assert [r.message for r in decode_all(data, KEY, split)] == msgs


def _feed_by_buffer(dec: W.MessageDecoder, data: bytes, step: int) -> list[W.Message]:
    """Feed as asyncio's BufferedProtocol does: receive into get_buffer, then buffer_updated."""
    got: list[W.Message] = []
    for i in range(0, len(data), step):
        piece = data[i : i + step]
        view = dec.get_buffer(len(piece))
        view[: len(piece)] = piece
        dec.buffer_updated(len(piece))
        while (r := dec.next_message()) is not None:
            got.append(r.message)
    return got


@given(msgs=st.lists(st.sampled_from(SAMPLES), max_size=8), step=st.integers(1, 300))
def test_receiving_into_get_buffer_decodes_the_same(msgs: list[W.Message], step: int) -> None:
    dec = W.MessageDecoder(1 << 20)
    dec.set_key(KEY, W.MAX_VERSION)
    assert _feed_by_buffer(dec, stream(msgs, KEY), step) == msgs
    assert dec.buffered == 0


def test_input_buffer_grows_for_a_big_message_and_shrinks_back() -> None:
    """Messages bigger than the buffer make it grow (a new one: a view handed out before stays
    valid); once it is empty after messages that made it grow past 16 MiB it shrinks back."""
    big = W.Frames(1, W.FramesPurpose.RESYNC, (frame(1) + bytes(20 << 20),))
    small = W.Ping(7)
    enc, dec = W.MessageEncoder(), W.MessageDecoder(64 << 20)
    first = dec.get_buffer()
    data = enc.encode(big, 1) + enc.encode(small, 1)
    assert _feed_by_buffer(dec, bytes(data), 256 * 1024) == [big, small]
    first[:4] = b"MHRP"  # the first view is still writable memory (of the old buffer)
    assert len(dec.get_buffer()) < 2 << 20
    assert _feed_by_buffer(dec, bytes(enc.encode(small, 1)), 3) == [small]


def test_buffer_updated_beyond_the_room_given_is_refused() -> None:
    dec = W.MessageDecoder(1 << 20)
    room = len(dec.get_buffer())
    with pytest.raises(ValueError, match="room"):
        dec.buffer_updated(room + 1)
