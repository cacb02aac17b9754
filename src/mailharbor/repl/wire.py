"""The peer wire protocol: versioned, length-prefixed, checksummed and authenticated messages.

Theory of operation
-------------------
A message is a fixed 36-byte header, a body of ``length`` bytes and, once the handshake has
derived session keys, a tag: 16 bytes of AES-256-GMAC on a version 3 link (flag GMAC), 32 bytes
of HMAC-SHA256 on a version 1 or 2 link (flag MAC)::

    magic "MHRP" | version u8 | type u8 | flags u16 | length u32 | term u64 | seq u64
    | body CRC32C u32 | header CRC32C u32   (then the body, then the tag when flags say so)

All integers are little-endian. ``term`` is the sender's current term (the witness lease number;
generations in store frames are terms too). ``seq`` counts the sender's messages on this link
from 0. The header CRC covers the 32 bytes before it, so a corrupted length is caught before the
decoder waits for a body that never comes; the body CRC covers the body.

Authentication (see :func:`auth_mac` and :func:`session_keys`): both ends send HELLO (node id,
a fresh 32-byte nonce, the range of protocol versions they speak, the hash of the cluster
settings). Each then sends AUTH, an HMAC-SHA256 under the pair's shared secret over a label,
*sender id, receiver id, sender nonce, receiver nonce*, both settings hashes and both version
ranges. The verifier's own fresh nonce is inside the MAC, so a recorded AUTH cannot be replayed
to it; ids are ordered sender-first, so an AUTH reflected back to its sender does not verify.
After both AUTHs, every message in each direction carries a tag under a per-direction key
derived from the secret and both nonces: frames cannot be forged, nor replayed from another
session (another key) or within the session (``seq`` is in the MAC and must be the next one).
The tag covers header and body. Version 3's is GMAC: AES-256-GCM with no plaintext, the
message as associated data and ``seq`` (u64, then 4 zero bytes) as the nonce — each key (one
session, one direction) never sees a nonce twice, which is GCM's one requirement. It is what
TLS 1.3 uses, and here about four times cheaper than HMAC-SHA256 (AES-NI and carry-less
multiply against SHA-NI), which matters for a resync's gigabytes.

Invariants:

* **The decoder never raises anything but** :class:`WireError` subclasses, whatever the bytes,
  and after one error it stays failed (the link must be dropped).
* **Bounded memory**: a header announcing a body over ``max_message_size`` is refused before the
  body is read; the input buffer holds at most one message plus what the adapter fed at once.
* A message is returned only whole, with both CRCs right, its ``seq`` the next expected, its
  MAC right (when keys are set) and its term not below a term the peer already sent.
* Error types say what went wrong (corrupt, too large, forged, replayed, stale term, truncated
  at EOF, unsupported version); each maps to a :class:`RefuseReason` sent in REFUSE with a fixed
  text. Python exception text never goes on the wire.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeAlias, TypeVar

import crc32c as _crc32c
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .generations import NODE_ID_LEN, Generation, NodeView
from .state import DISK_CODES, PROTOCOL_CODES, ROLE_CODES, Protocol

MAGIC = b"MHRP"
#: Versions of the wire protocol this code speaks (negotiated at the handshake; the header's
#: version byte is the layout of the header itself and is 1 for every protocol version so far).
#: Version 2 adds SNAPSHOT_RESUME and SNAPSHOT_BEGIN (a full sync resumes where it stopped);
#: a link negotiated at version 1 never carries them. Version 3 tags messages with GMAC instead
#: of HMAC-SHA256 (same coverage, a quarter of the CPU).
MIN_VERSION = 1
MAX_VERSION = 3
GMAC_VERSION = 3
HEADER_VERSION = 1

HEADER = struct.Struct("<4sBBHIQQII")
HEADER_SIZE = HEADER.size  # 36
MAC_SIZE = 32  # HMAC-SHA256: AUTH, and the message tag on version 1 and 2 links
GMAC_SIZE = 16  # AES-256-GMAC: the message tag on version 3 links
NONCE_SIZE = 32
HASH_SIZE = 32
FLAG_MAC = 0x0001  # an HMAC-SHA256 tag follows the body
FLAG_GMAC = 0x0002  # a GMAC tag follows the body
_TAG_FLAGS = FLAG_MAC | FLAG_GMAC
DEFAULT_MAX_MESSAGE_SIZE = 72 * 1024 * 1024  # a store frame may carry a 64 MiB payload
#: The decoder's input buffer: its first (and usual) size, and the least room get_buffer gives.
_BUF_START = 1 << 20
RECV_ROOM = 256 * 1024
#: A buffer grown past this (by a message above a resync chunk) shrinks back once it empties.
_BUF_KEEP = 16 << 20
NONE64 = 0xFFFF_FFFF_FFFF_FFFF  # "no value" in u64 fields
MAX_DETAIL = 256
MAX_HISTORY = 4096
MAX_DIGEST = 64
SNAPSHOT_ID_SIZE = 16

_AUTH_LABEL = b"mailharbor-repl-auth-v1\x00"
_KEY_LABEL = b"mailharbor-repl-key-v1\x00"


def crc32c(data: bytes | memoryview) -> int:
    return int(_crc32c.crc32c(data))


# --- errors -----------------------------------------------------------------------------------


class RefuseReason(enum.IntEnum):
    """Why a link is refused or dropped (u16 in REFUSE; the text sent is fixed per reason)."""

    SHUTDOWN = 1
    VERSION = 2
    SETTINGS = 3
    AUTH = 4
    SAME_NODE = 5
    UNEXPECTED_PEER = 6
    PROTOCOL = 7
    CORRUPT = 8
    TOO_LARGE = 9
    FORGED = 10
    REPLAY = 11
    STALE_TERM = 12
    DECISION = 13  # the decision says disconnect (split brain, both primary, ...)
    TIMEOUT = 14
    INGEST = 15  # the secondary could not store the frames
    SNAPSHOT = 30  # a full sync's snapshot did not arrive whole (digest, size, layout)


REFUSE_TEXT: dict[RefuseReason, str] = {
    RefuseReason.SHUTDOWN: "shutting down",
    RefuseReason.VERSION: "no common protocol version",
    RefuseReason.SETTINGS: "cluster settings differ",
    RefuseReason.AUTH: "authentication failed",
    RefuseReason.SAME_NODE: "peer has my node id",
    RefuseReason.UNEXPECTED_PEER: "unexpected peer node id",
    RefuseReason.PROTOCOL: "protocol violation",
    RefuseReason.CORRUPT: "corrupt message",
    RefuseReason.TOO_LARGE: "message too large",
    RefuseReason.FORGED: "message authentication failed",
    RefuseReason.REPLAY: "message out of sequence",
    RefuseReason.STALE_TERM: "stale term",
    RefuseReason.DECISION: "connection refused by the reconnect decision",
    RefuseReason.TIMEOUT: "timeout",
    RefuseReason.INGEST: "frames could not be stored",
    RefuseReason.SNAPSHOT: "snapshot transfer failed",
}


class WireError(Exception):
    """Bytes from the peer that cannot be accepted. ``reason`` goes into REFUSE."""

    reason: ClassVar[RefuseReason] = RefuseReason.PROTOCOL


class CorruptMessage(WireError):
    """Bad magic, a CRC mismatch, or a body that does not decode as its type's layout."""

    reason = RefuseReason.CORRUPT


class TruncatedMessage(CorruptMessage):
    """The stream ended inside a message."""


class MessageTooLarge(WireError):
    reason = RefuseReason.TOO_LARGE


class UnsupportedVersion(WireError):
    reason = RefuseReason.VERSION


class ForgedMessage(WireError):
    """A missing or wrong MAC (or a MAC where none is expected)."""

    reason = RefuseReason.FORGED


class ReplayedMessage(WireError):
    """A sequence number other than the next one: replayed, dropped or reordered."""

    reason = RefuseReason.REPLAY


class StaleTerm(WireError):
    """A term below one the peer already used, or frames from a primary of an older term."""

    reason = RefuseReason.STALE_TERM


class SnapshotMismatch(WireError):
    """A full sync's snapshot did not arrive as announced (size, file count or digest)."""

    reason = RefuseReason.SNAPSHOT


class UnexpectedMessage(WireError):
    """A well-formed message the session does not accept in its state."""

    reason = RefuseReason.PROTOCOL


# --- body helpers -----------------------------------------------------------------------------


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _Reader:
    """Bounds-checked reads from a message body. ``d`` may be a memoryview into the decoder's
    buffer: ``take`` returns a copy (``bytes``), so nothing decoded keeps the buffer exported."""

    __slots__ = ("d", "p")

    def __init__(self, d: bytes | memoryview) -> None:
        self.d = d
        self.p = 0

    def _at(self, n: int) -> int:
        p = self.p
        if n < 0 or p + n > len(self.d):
            raise CorruptMessage("body truncated")
        self.p = p + n
        return p

    def take(self, n: int) -> bytes:
        p = self._at(n)
        return bytes(self.d[p : p + n])

    def u8(self) -> int:
        return int(self.d[self._at(1)])

    def u16(self) -> int:
        return int(_U16.unpack_from(self.d, self._at(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack_from(self.d, self._at(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack_from(self.d, self._at(8))[0])

    def opt64(self) -> int | None:
        v = self.u64()
        return None if v == NONE64 else v

    def text(self) -> str:
        n = self.u16()
        if n > MAX_DETAIL:
            raise CorruptMessage("text too long")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptMessage("text is not UTF-8") from None

    def end(self) -> None:
        if self.p != len(self.d):
            raise CorruptMessage("trailing bytes in body")


def _opt64(v: int | None) -> int:
    return NONE64 if v is None else v


def _text(s: str) -> bytes:
    b = s.encode("utf-8")[:MAX_DETAIL]
    b = b.decode("utf-8", "ignore").encode("utf-8")
    return struct.pack("<H", len(b)) + b


_E = TypeVar("_E", bound=enum.Enum)


def _decode_enum(code: int, table: dict[_E, int]) -> _E:
    for k, v in table.items():
        if v == code:
            return k
    raise CorruptMessage("unknown enum code")


# --- messages ---------------------------------------------------------------------------------


class MsgType(enum.IntEnum):
    HELLO = 1
    AUTH = 2
    STATE = 3
    FRAMES = 4
    ACK = 5
    RESYNC_REQUEST = 6
    SYNC_DONE = 7
    BRANCH_END = 8
    VERIFY_REQUEST = 9
    VERIFY_DIGEST = 10
    PING = 11
    PONG = 12
    REFUSE = 13
    # Full sync (numbers from 20 on: a block of their own).
    SNAPSHOT_REQUEST = 20
    SNAPSHOT_DATA = 21
    SNAPSHOT_END = 22
    SNAPSHOT_ACK = 23
    SNAPSHOT_RESUME = 24  # version 2
    SNAPSHOT_BEGIN = 25  # version 2
    # Split-brain merge (a block of its own).
    MERGE_DONE = 30


@dataclass(frozen=True, slots=True)
class Hello:
    TYPE: ClassVar[MsgType] = MsgType.HELLO
    node_id: bytes
    nonce: bytes
    min_version: int
    max_version: int
    settings_hash: bytes

    def encode(self) -> bytes:
        if len(self.node_id) != NODE_ID_LEN or len(self.nonce) != NONCE_SIZE:
            raise ValueError("bad HELLO field length")
        if len(self.settings_hash) != HASH_SIZE:
            raise ValueError("bad HELLO field length")
        return (
            self.node_id
            + self.nonce
            + struct.pack("<HH", self.min_version, self.max_version)
            + self.settings_hash
        )

    @classmethod
    def decode(cls, r: _Reader) -> Hello:
        return cls(r.take(NODE_ID_LEN), r.take(NONCE_SIZE), r.u16(), r.u16(), r.take(HASH_SIZE))


@dataclass(frozen=True, slots=True)
class Auth:
    TYPE: ClassVar[MsgType] = MsgType.AUTH
    mac: bytes

    def encode(self) -> bytes:
        if len(self.mac) != MAC_SIZE:
            raise ValueError("bad AUTH length")
        return self.mac

    @classmethod
    def decode(cls, r: _Reader) -> Auth:
        return cls(r.take(MAC_SIZE))


_GEN = struct.Struct("<QQ16sQQ")


@dataclass(frozen=True, slots=True)
class State:
    """The state exchange (and later updates: ``update`` set): a :class:`NodeView` plus the
    protocol the sender runs."""

    TYPE: ClassVar[MsgType] = MsgType.STATE
    view: NodeView
    protocol: Protocol
    update: bool = False

    def encode(self) -> bytes:
        v = self.view
        if len(v.history) > MAX_HISTORY:
            raise ValueError("history too long")
        flags = (1 if v.discard_my_data else 0) | (2 if self.update else 0)
        parts = [
            v.node_id,
            struct.pack(
                "<BBBBQQI",
                ROLE_CODES[v.role],
                DISK_CODES[v.disk],
                PROTOCOL_CODES[self.protocol],
                flags,
                v.last_lsn,
                v.first_retained_lsn,
                len(v.history),
            ),
        ]
        for g in v.history:
            parts.append(
                _GEN.pack(
                    g.number,
                    g.first_lsn,
                    g.origin,
                    _opt64(g.mirrored_from),
                    _opt64(g.mirrored_until),
                )
            )
        return b"".join(parts)

    @classmethod
    def decode(cls, r: _Reader) -> State:
        node = r.take(NODE_ID_LEN)
        role = _decode_enum(r.u8(), ROLE_CODES)
        disk = _decode_enum(r.u8(), DISK_CODES)
        proto = _decode_enum(r.u8(), PROTOCOL_CODES)
        flags, last, retained, n = r.u8(), r.u64(), r.u64(), r.u32()
        if n > MAX_HISTORY:
            raise CorruptMessage("history too long")
        hist = []
        for _ in range(n):
            num, first, origin, mf, mu = _GEN.unpack(r.take(_GEN.size))
            hist.append(
                Generation(
                    num, first, origin, None if mf == NONE64 else mf, None if mu == NONE64 else mu
                )
            )
        view = NodeView(node, role, disk, tuple(hist), last, retained, bool(flags & 1))
        return cls(view, proto, bool(flags & 2))


class FramesPurpose(enum.IntEnum):
    LIVE = 1  # the primary's new frames, as appended
    RESYNC = 2  # catch-up from the log
    BRANCH = 3  # a split-brain loser's divergent branch, for the merge


@dataclass(frozen=True, slots=True)
class Frames:
    """A batch of store frames (``MHTX`` …, byte for byte) with consecutive LSNs."""

    TYPE: ClassVar[MsgType] = MsgType.FRAMES
    first_lsn: int
    purpose: FramesPurpose
    frames: tuple[bytes, ...]

    def encode(self) -> bytes:
        parts = [struct.pack("<QBI", self.first_lsn, self.purpose, len(self.frames))]
        for f in self.frames:
            parts.append(struct.pack("<I", len(f)))
            parts.append(f)
        return b"".join(parts)

    @classmethod
    def decode(cls, r: _Reader) -> Frames:
        first, purpose, n = r.u64(), r.u8(), r.u32()
        try:
            p = FramesPurpose(purpose)
        except ValueError:
            raise CorruptMessage("unknown frames purpose") from None
        if n > len(r.d):
            raise CorruptMessage("frame count out of range")
        return cls(first, p, tuple(r.take(r.u32()) for _ in range(n)))


@dataclass(frozen=True, slots=True)
class Ack:
    """The secondary's progress: frames received (protocol B acks on this) and durable (C)."""

    TYPE: ClassVar[MsgType] = MsgType.ACK
    received_lsn: int
    durable_lsn: int

    def encode(self) -> bytes:
        return struct.pack("<QQ", self.received_lsn, self.durable_lsn)

    @classmethod
    def decode(cls, r: _Reader) -> Ack:
        return cls(r.u64(), r.u64())


@dataclass(frozen=True, slots=True)
class ResyncRequest:
    """A sync target asks for frames from ``from_lsn`` (resumable: its next missing LSN) up to
    ``to_lsn`` (None: up to the live stream)."""

    TYPE: ClassVar[MsgType] = MsgType.RESYNC_REQUEST
    from_lsn: int
    to_lsn: int | None = None

    def encode(self) -> bytes:
        return struct.pack("<QQ", self.from_lsn, _opt64(self.to_lsn))

    @classmethod
    def decode(cls, r: _Reader) -> ResyncRequest:
        return cls(r.u64(), r.opt64())


@dataclass(frozen=True, slots=True)
class SyncDone:
    """The source has sent every frame up to ``last_lsn`` from its log; what follows is live."""

    TYPE: ClassVar[MsgType] = MsgType.SYNC_DONE
    last_lsn: int

    def encode(self) -> bytes:
        return struct.pack("<Q", self.last_lsn)

    @classmethod
    def decode(cls, r: _Reader) -> SyncDone:
        return cls(r.u64())


@dataclass(frozen=True, slots=True)
class BranchEnd:
    """The split-brain loser has shipped its whole branch (up to ``last_lsn``)."""

    TYPE: ClassVar[MsgType] = MsgType.BRANCH_END
    last_lsn: int

    def encode(self) -> bytes:
        return struct.pack("<Q", self.last_lsn)

    @classmethod
    def decode(cls, r: _Reader) -> BranchEnd:
        return cls(r.u64())


@dataclass(frozen=True, slots=True)
class MergeDone:
    """The split-brain winner has merged the loser's branch up to ``last_lsn`` and every merge
    transaction is durable; ``digest`` is the branch's (:func:`branch_digest` of its frames in
    order). Only now may the loser cut its branch."""

    TYPE: ClassVar[MsgType] = MsgType.MERGE_DONE
    last_lsn: int
    digest: bytes

    def encode(self) -> bytes:
        if len(self.digest) != HASH_SIZE:
            raise ValueError("bad MERGE_DONE digest length")
        return struct.pack("<Q", self.last_lsn) + self.digest

    @classmethod
    def decode(cls, r: _Reader) -> MergeDone:
        return cls(r.u64(), r.take(HASH_SIZE))


def branch_digest_update(h: hashlib._Hash, frames: Sequence[bytes]) -> None:
    """Feed a branch's raw frames (in LSN order) to ``h`` (SHA-256): MERGE_DONE's digest."""
    for f in frames:
        h.update(struct.pack("<I", len(f)))
        h.update(f)


@dataclass(frozen=True, slots=True)
class VerifyRequest:
    TYPE: ClassVar[MsgType] = MsgType.VERIFY_REQUEST
    first_lsn: int
    last_lsn: int

    def encode(self) -> bytes:
        return struct.pack("<QQ", self.first_lsn, self.last_lsn)

    @classmethod
    def decode(cls, r: _Reader) -> VerifyRequest:
        return cls(r.u64(), r.u64())


@dataclass(frozen=True, slots=True)
class VerifyDigest:
    """The digest of the logical records in an LSN range (empty: the range is not available)."""

    TYPE: ClassVar[MsgType] = MsgType.VERIFY_DIGEST
    first_lsn: int
    last_lsn: int
    digest: bytes

    def encode(self) -> bytes:
        if len(self.digest) > MAX_DIGEST:
            raise ValueError("digest too long")
        return struct.pack("<QQB", self.first_lsn, self.last_lsn, len(self.digest)) + self.digest

    @classmethod
    def decode(cls, r: _Reader) -> VerifyDigest:
        first, last, n = r.u64(), r.u64(), r.u8()
        if n > MAX_DIGEST:
            raise CorruptMessage("digest too long")
        return cls(first, last, r.take(n))


@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[MsgType] = MsgType.PING
    token: int

    def encode(self) -> bytes:
        return struct.pack("<Q", self.token)

    @classmethod
    def decode(cls, r: _Reader) -> Ping:
        return cls(r.u64())


@dataclass(frozen=True, slots=True)
class Pong:
    TYPE: ClassVar[MsgType] = MsgType.PONG
    token: int

    def encode(self) -> bytes:
        return struct.pack("<Q", self.token)

    @classmethod
    def decode(cls, r: _Reader) -> Pong:
        return cls(r.u64())


@dataclass(frozen=True, slots=True)
class Refuse:
    """The sender drops the link: a reason code and a fixed text (never exception text)."""

    TYPE: ClassVar[MsgType] = MsgType.REFUSE
    reason: RefuseReason
    detail: str = ""

    def encode(self) -> bytes:
        return struct.pack("<H", self.reason) + _text(self.detail)

    @classmethod
    def decode(cls, r: _Reader) -> Refuse:
        code = r.u16()
        try:
            reason = RefuseReason(code)
        except ValueError:
            reason = RefuseReason.PROTOCOL
        return cls(reason, r.text())


# --- full sync: the snapshot transfer -----------------------------------------------------------

#: A snapshot file name on the wire: a plain file name (the store checks it is a segment or a
#: checkpoint); no path separators, no leading dot.
MAX_SNAPSHOT_NAME = 64


def snapshot_name_ok(name: str) -> bool:
    return (
        0 < len(name) <= MAX_SNAPSHOT_NAME
        and not name.startswith(".")
        and all(c.isascii() and (c.isalnum() or c in "._-") for c in name)
    )


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """A sync target asks for a full sync (its log is behind the source's retention horizon,
    or it was invalidated); ``last_lsn`` is what it holds now (informational)."""

    TYPE: ClassVar[MsgType] = MsgType.SNAPSHOT_REQUEST
    last_lsn: int

    def encode(self) -> bytes:
        return struct.pack("<Q", self.last_lsn)

    @classmethod
    def decode(cls, r: _Reader) -> SnapshotRequest:
        return cls(r.u64())


@dataclass(frozen=True, slots=True)
class SnapshotData:
    """``data`` at ``offset`` of snapshot file ``name`` (files in order, each sequentially)."""

    TYPE: ClassVar[MsgType] = MsgType.SNAPSHOT_DATA
    name: str
    offset: int
    data: bytes

    def encode(self) -> bytes:
        if not snapshot_name_ok(self.name):
            raise ValueError("bad snapshot file name")
        return _text(self.name) + struct.pack("<QI", self.offset, len(self.data)) + self.data

    @classmethod
    def decode(cls, r: _Reader) -> SnapshotData:
        name = r.text()
        if not snapshot_name_ok(name):
            raise CorruptMessage("bad snapshot file name")
        offset, n = r.u64(), r.u32()
        return cls(name, offset, r.take(n))


@dataclass(frozen=True, slots=True)
class SnapshotEnd:
    """Every file was sent: the snapshot holds LSNs up to ``lsn``, ``files`` files of
    ``total_bytes``; ``digest`` is :class:`SnapshotDigest` over every SNAPSHOT_DATA."""

    TYPE: ClassVar[MsgType] = MsgType.SNAPSHOT_END
    lsn: int
    files: int
    total_bytes: int
    digest: bytes

    def encode(self) -> bytes:
        if len(self.digest) != HASH_SIZE:
            raise ValueError("bad snapshot digest length")
        return struct.pack("<QIQ", self.lsn, self.files, self.total_bytes) + self.digest

    @classmethod
    def decode(cls, r: _Reader) -> SnapshotEnd:
        return cls(r.u64(), r.u32(), r.u64(), r.take(HASH_SIZE))


@dataclass(frozen=True, slots=True)
class SnapshotAck:
    """The target has written ``written_bytes`` of the snapshot (flow control)."""

    TYPE: ClassVar[MsgType] = MsgType.SNAPSHOT_ACK
    written_bytes: int

    def encode(self) -> bytes:
        return struct.pack("<Q", self.written_bytes)

    @classmethod
    def decode(cls, r: _Reader) -> SnapshotAck:
        return cls(r.u64())


@dataclass(frozen=True, slots=True)
class SnapshotResume:
    """Version 2, instead of SNAPSHOT_REQUEST: the target holds the first files of snapshot
    ``snapshot_id`` durably, up to byte ``offset`` of file ``index`` (the files before it
    whole), and asks to continue there if the source still has that snapshot."""

    TYPE: ClassVar[MsgType] = MsgType.SNAPSHOT_RESUME
    last_lsn: int
    snapshot_id: bytes
    index: int
    offset: int

    def encode(self) -> bytes:
        if len(self.snapshot_id) != SNAPSHOT_ID_SIZE:
            raise ValueError("bad snapshot id length")
        return (
            struct.pack("<Q", self.last_lsn)
            + self.snapshot_id
            + struct.pack("<IQ", self.index, self.offset)
        )

    @classmethod
    def decode(cls, r: _Reader) -> SnapshotResume:
        lsn = r.u64()
        sid = r.take(SNAPSHOT_ID_SIZE)
        return cls(lsn, sid, r.u32(), r.u64())


@dataclass(frozen=True, slots=True)
class SnapshotBegin:
    """Version 2, the source before the first SNAPSHOT_DATA: snapshot ``snapshot_id`` holds
    LSNs up to ``lsn`` in ``files`` files of ``total_bytes``; the data starts at byte
    ``offset`` of file ``index`` (0, 0: from the start; else the target's resume point)."""

    TYPE: ClassVar[MsgType] = MsgType.SNAPSHOT_BEGIN
    snapshot_id: bytes
    lsn: int
    index: int
    offset: int
    files: int
    total_bytes: int

    def encode(self) -> bytes:
        if len(self.snapshot_id) != SNAPSHOT_ID_SIZE:
            raise ValueError("bad snapshot id length")
        return self.snapshot_id + struct.pack(
            "<QIQIQ", self.lsn, self.index, self.offset, self.files, self.total_bytes
        )

    @classmethod
    def decode(cls, r: _Reader) -> SnapshotBegin:
        sid = r.take(SNAPSHOT_ID_SIZE)
        return cls(sid, r.u64(), r.u32(), r.u64(), r.u32(), r.u64())


class SnapshotDigest:
    """BLAKE2b-256 (personalization ``mh-snapshot-v1``) over every SNAPSHOT_DATA in order:
    name length u16, name, offset u64, data length u32, data. Sender and receiver compute it
    alike; SNAPSHOT_END carries the sender's."""

    def __init__(self) -> None:
        self._h = hashlib.blake2b(digest_size=HASH_SIZE, person=b"mh-snapshot-v1")

    def update(self, name: str, offset: int, data: bytes) -> None:
        self._h.update(_text(name) + struct.pack("<QI", offset, len(data)))
        self._h.update(data)

    def digest(self) -> bytes:
        return self._h.digest()


Message: TypeAlias = (
    Hello
    | Auth
    | State
    | Frames
    | Ack
    | ResyncRequest
    | SyncDone
    | BranchEnd
    | VerifyRequest
    | VerifyDigest
    | Ping
    | Pong
    | Refuse
    | SnapshotRequest
    | SnapshotData
    | SnapshotEnd
    | SnapshotAck
    | SnapshotResume
    | SnapshotBegin
    | MergeDone
)

_DECODERS: dict[int, type[Message]] = {
    c.TYPE: c
    for c in (
        Hello,
        Auth,
        State,
        Frames,
        Ack,
        ResyncRequest,
        SyncDone,
        BranchEnd,
        VerifyRequest,
        VerifyDigest,
        Ping,
        Pong,
        Refuse,
        SnapshotRequest,
        SnapshotData,
        SnapshotEnd,
        SnapshotAck,
        SnapshotResume,
        SnapshotBegin,
        MergeDone,
    )
}


@dataclass(frozen=True, slots=True)
class Received:
    """A decoded message with its envelope."""

    message: Message
    term: int
    seq: int


# --- keys -------------------------------------------------------------------------------------


def auth_mac(
    secret: bytes,
    *,
    sender: Hello,
    receiver: Hello,
) -> bytes:
    """The AUTH MAC ``sender`` proves itself with to ``receiver`` (see the module docstring)."""
    msg = b"".join(
        [
            _AUTH_LABEL,
            sender.node_id,
            receiver.node_id,
            sender.nonce,
            receiver.nonce,
            sender.settings_hash,
            receiver.settings_hash,
            struct.pack(
                "<HHHH",
                sender.min_version,
                sender.max_version,
                receiver.min_version,
                receiver.max_version,
            ),
        ]
    )
    return hmac.new(secret, msg, hashlib.sha256).digest()


def session_key(secret: bytes, *, sender: Hello, receiver: Hello) -> bytes:
    """The key of the messages ``sender`` sends on this session (one per direction)."""
    msg = b"".join([_KEY_LABEL, sender.node_id, receiver.node_id, sender.nonce, receiver.nonce])
    return hmac.new(secret, msg, hashlib.sha256).digest()


def negotiate_version(a: Hello, b: Hello) -> int | None:
    """The highest version both speak, or None."""
    hi = min(a.max_version, b.max_version)
    lo = max(a.min_version, b.min_version)
    return hi if hi >= lo else None


# --- encoder / decoder ------------------------------------------------------------------------


def _gmac_nonce(seq: int) -> bytes:
    return _U64.pack(seq) + b"\0\0\0\0"


class MessageEncoder:
    """Encodes this side's messages: numbers them and, once a key is set, tags them (GMAC from
    :data:`GMAC_VERSION` on, HMAC-SHA256 before)."""

    def __init__(self) -> None:
        self.seq = 0
        self._key: bytes | None = None
        self._gcm: AESGCM | None = None

    def set_key(self, key: bytes, version: int) -> None:
        """Tag every later message under ``key`` (32 bytes), as link ``version`` says."""
        self._key = key
        self._gcm = AESGCM(key) if version >= GMAC_VERSION else None

    def encode(self, msg: Message, term: int) -> bytes | bytearray:
        body = msg.encode()
        n = HEADER_SIZE + len(body)
        if self._gcm is not None:
            flags, tag_size = FLAG_GMAC, GMAC_SIZE
        elif self._key is not None:
            flags, tag_size = FLAG_MAC, MAC_SIZE
        else:
            flags, tag_size = 0, 0
        # One buffer, written in place: the body is copied once, into it.
        out = bytearray(n + tag_size)
        HEADER.pack_into(
            out,
            0,
            MAGIC,
            HEADER_VERSION,
            msg.TYPE,
            flags,
            len(body),
            term,
            self.seq,
            crc32c(body),
            0,
        )
        with memoryview(out) as view:
            _U32.pack_into(out, HEADER_SIZE - 4, crc32c(view[: HEADER_SIZE - 4]))
            view[HEADER_SIZE:n] = body
            if self._gcm is not None:
                view[n:] = self._gcm.encrypt(_gmac_nonce(self.seq), b"", view[:n])
            elif self._key is not None:
                view[n:] = hmac.new(self._key, view[:n], hashlib.sha256).digest()
        self.seq += 1
        return out


class MessageDecoder:
    """Incremental, bounded decoder of the peer's messages.

    ``receive_data(bytes)`` buffers; ``next_message()`` returns one :class:`Received` or None
    (need more bytes) and raises a :class:`WireError` on bad input — after which every call
    raises it again. ``receive_eof()`` then ``next_message()`` raises TruncatedMessage if the
    stream ended inside a message.

    The adapter feeds bytes either with ``receive_data(data)`` or, without a copy of its own,
    by receiving straight into ``get_buffer(n)`` (at least ``n`` free bytes) and then calling
    ``buffer_updated(nbytes)`` — asyncio's BufferedProtocol.

    Copies: received bytes land in one ``bytearray`` that keeps its memory (allocating and
    freeing megabytes per message cost page faults worth more than the copies); a message is
    verified (CRCs, MAC) and decoded through a ``memoryview`` of it in place, so its body is
    copied once more, into the decoded fields (a FRAMES message's frames). Consumed bytes are
    skipped by an offset; when the free space at the end runs out, the unconsumed tail moves
    to the front, into a new, larger buffer if it must grow. The buffer is never resized (a
    view handed out by ``get_buffer`` may outlive the call): it is replaced. It holds at most
    one message plus one receive, and goes back to its first size once it is empty after a
    message that made it grow past 16 MiB.
    """

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        if max_message_size < 64:
            raise ValueError("max_message_size too small")
        self.max_message_size = max_message_size
        self._buf = bytearray(_BUF_START)
        self._pos = 0  # start of the unconsumed bytes in _buf
        self._end = 0  # end of the received bytes in _buf
        self._key: bytes | None = None
        self._gcm: AESGCM | None = None
        self._seq = 0
        self._term = 0
        self._eof = False
        self._failed: WireError | None = None

    @property
    def peer_term(self) -> int:
        """The highest term the peer has sent."""
        return self._term

    @property
    def buffered(self) -> int:
        return self._end - self._pos

    def set_key(self, key: bytes, version: int) -> None:
        """From the next message on, require a tag under ``key``, of the kind link ``version``
        uses (GMAC from :data:`GMAC_VERSION` on, HMAC-SHA256 before)."""
        self._key = key
        self._gcm = AESGCM(key) if version >= GMAC_VERSION else None

    def receive_data(self, data: bytes | bytearray) -> None:
        if self._eof or self._failed is not None:
            return
        n = len(data)
        self._room(n)
        end = self._end
        self._buf[end : end + n] = data
        self._end = end + n

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable view of free bytes at the end of the input; :meth:`buffer_updated` then
        says how many were written. At least ``max(sizehint, RECV_ROOM)`` bytes — except in
        the middle of a big message (:data:`RECV_ROOM` or more still to come), where the view
        ends where the message does: the next message then starts at the front of an empty
        buffer, and no partial message is ever moved."""
        rest = self._rest_of_message()
        if rest >= RECV_ROOM:
            self._room(rest)
            return memoryview(self._buf)[self._end : self._end + rest]
        self._room(max(sizehint, RECV_ROOM))
        return memoryview(self._buf)[self._end :]

    def _rest_of_message(self) -> int:
        """Bytes still to come of the message whose header is at the front of the input (0:
        no whole header yet, or a header the decoder will refuse)."""
        pos, end = self._pos, self._end
        if end - pos < HEADER_SIZE or self._failed is not None:
            return 0
        length: int = _U32.unpack_from(self._buf, pos + 8)[0]
        flags = self._buf[pos + 6]
        if length > self.max_message_size:
            return 0
        tag = GMAC_SIZE if flags & FLAG_GMAC else MAC_SIZE if flags & FLAG_MAC else 0
        return max(0, HEADER_SIZE + length + tag - (end - pos))

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last :meth:`get_buffer` view."""
        if self._eof or self._failed is not None:
            return
        if not 0 <= nbytes <= len(self._buf) - self._end:
            raise ValueError("more bytes than the buffer had room for")
        self._end += nbytes

    def _room(self, n: int) -> None:
        """Make ``n`` bytes free after the received ones: move the unconsumed tail to the
        front, in a new buffer when it and ``n`` do not fit (or to shrink back)."""
        buf, pos, end = self._buf, self._pos, self._end
        if pos == end:  # all consumed: start over at the front (nothing to move)
            pos = end = self._pos = self._end = 0
            if len(buf) > _BUF_KEEP and n <= _BUF_START:
                self._buf = bytearray(_BUF_START)  # an unusually big message is over
                return
        if end + n <= len(buf):
            return
        live = end - pos
        size = len(buf)
        if live + n > size:
            size = max(live + n, 2 * size)
        if size != len(buf):
            new = bytearray(size)
            new[:live] = memoryview(buf)[pos:end]
            self._buf = new
        elif live <= pos:  # the tail to the front: they do not overlap, one copy
            buf[:live] = memoryview(buf)[pos:end]
        elif live:
            buf[:live] = buf[pos:end]  # they overlap: through a copy
        self._pos, self._end = 0, live

    def receive_eof(self) -> None:
        self._eof = True

    def next_message(self) -> Received | None:
        if self._failed is not None:
            raise self._failed
        try:
            return self._next()
        except WireError as e:
            self._failed = e
            self._buf = bytearray()  # drop the input
            self._pos = self._end = 0
            raise

    def _next(self) -> Received | None:
        buf, pos = self._buf, self._pos
        avail = self._end - pos
        if avail < HEADER_SIZE:
            if self._eof and avail:
                raise TruncatedMessage("stream ended inside a header")
            return None
        view = memoryview(buf)
        try:
            return self._decode_at(view, pos, avail)
        finally:
            view.release()

    def _decode_at(self, view: memoryview, pos: int, avail: int) -> Received | None:
        if view[pos : pos + 4] != MAGIC:
            raise CorruptMessage("bad magic")
        magic, ver, typ, flags, length, term, seq, bcrc, hcrc = HEADER.unpack_from(view, pos)
        del magic
        if hcrc != crc32c(view[pos : pos + HEADER_SIZE - 4]):
            raise CorruptMessage("header checksum mismatch")
        if ver != HEADER_VERSION:
            raise UnsupportedVersion("unknown header version")
        if length > self.max_message_size:
            raise MessageTooLarge("message too large")
        if flags & ~_TAG_FLAGS:
            raise CorruptMessage("unknown flags")
        tag_flag = flags & _TAG_FLAGS
        want_flag = 0 if self._key is None else FLAG_GMAC if self._gcm is not None else FLAG_MAC
        if tag_flag != want_flag:
            raise ForgedMessage(
                "MAC missing or of the wrong kind" if want_flag else "unexpected MAC"
            )
        total = (
            HEADER_SIZE
            + length
            + (GMAC_SIZE if tag_flag == FLAG_GMAC else MAC_SIZE if tag_flag else 0)
        )
        if avail < total:
            if self._eof:
                raise TruncatedMessage("stream ended inside a message")
            return None
        self._pos = pos + total  # consumed, whatever follows (an error fails the decoder)
        end = pos + HEADER_SIZE + length
        body = view[pos + HEADER_SIZE : end]
        try:
            if crc32c(body) != bcrc:
                raise CorruptMessage("body checksum mismatch")
            if self._gcm is not None:
                try:  # the tag is the whole "ciphertext" of an empty plaintext
                    self._gcm.decrypt(_gmac_nonce(seq), view[end : pos + total], view[pos:end])
                except InvalidTag:
                    raise ForgedMessage("bad MAC") from None
            elif self._key is not None:
                tag = hmac.new(self._key, view[pos:end], hashlib.sha256).digest()
                if not hmac.compare_digest(tag, view[end : pos + total]):
                    raise ForgedMessage("bad MAC")
            if seq != self._seq:
                raise ReplayedMessage("unexpected sequence number")
            if term < self._term:
                raise StaleTerm("term went down")
            cls = _DECODERS.get(typ)
            if cls is None:
                raise CorruptMessage("unknown message type")
            r = _Reader(body)
            try:
                msg = cls.decode(r)
            except (struct.error, ValueError) as e:
                raise CorruptMessage("malformed body") from e
            r.end()
        finally:
            body.release()
        self._seq += 1
        self._term = term
        return Received(msg, term, seq)


# --- store frames -----------------------------------------------------------------------------

#: The store's frame header (mailharbor.store.format, version 1), read here without importing
#: the store: magic, version, kind, records, payload length, LSN, generation, node, time,
#: payload CRC, header CRC. A test checks this against the store's own encoder.
_FRAME = struct.Struct("<4sBBHIQQ16sqII")
FRAME_HEADER_SIZE = _FRAME.size
FRAME_MAGIC = b"MHTX"


@dataclass(frozen=True, slots=True)
class FrameInfo:
    lsn: int
    generation: int
    origin: bytes
    size: int


def peek_frame(raw: bytes) -> FrameInfo:
    """LSN, generation and writer of a store frame; CorruptMessage if its header does not
    verify or its length disagrees with the header (the payload CRC is the store's check)."""
    if len(raw) < FRAME_HEADER_SIZE or raw[:4] != FRAME_MAGIC:
        raise CorruptMessage("not a store frame")
    _m, _v, _k, _n, plen, lsn, gen, node, _t, _pc, hcrc = _FRAME.unpack_from(raw)
    if hcrc != crc32c(raw[: FRAME_HEADER_SIZE - 4]):
        raise CorruptMessage("store frame header checksum mismatch")
    if len(raw) != FRAME_HEADER_SIZE + plen:
        raise CorruptMessage("store frame length mismatch")
    return FrameInfo(lsn, gen, node, len(raw))


def frames_size(frames: Sequence[bytes]) -> int:
    return sum(len(f) for f in frames)


__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "GMAC_SIZE",
    "GMAC_VERSION",
    "HEADER_SIZE",
    "MAC_SIZE",
    "MAX_VERSION",
    "MIN_VERSION",
    "NONCE_SIZE",
    "REFUSE_TEXT",
    "SNAPSHOT_ID_SIZE",
    "Ack",
    "Auth",
    "BranchEnd",
    "CorruptMessage",
    "ForgedMessage",
    "FrameInfo",
    "Frames",
    "FramesPurpose",
    "Hello",
    "MergeDone",
    "Message",
    "MessageDecoder",
    "MessageEncoder",
    "MessageTooLarge",
    "MsgType",
    "Ping",
    "Pong",
    "Received",
    "Refuse",
    "RefuseReason",
    "ReplayedMessage",
    "ResyncRequest",
    "SnapshotAck",
    "SnapshotBegin",
    "SnapshotData",
    "SnapshotDigest",
    "SnapshotEnd",
    "SnapshotMismatch",
    "SnapshotRequest",
    "SnapshotResume",
    "StaleTerm",
    "State",
    "SyncDone",
    "TruncatedMessage",
    "UnexpectedMessage",
    "UnsupportedVersion",
    "VerifyDigest",
    "VerifyRequest",
    "WireError",
    "auth_mac",
    "branch_digest_update",
    "negotiate_version",
    "peek_frame",
    "session_key",
    "snapshot_name_ok",
]
