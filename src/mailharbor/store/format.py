"""On-disk formats of the store: segment header, transaction frames, records, checkpoints.

Theory of operation
-------------------
The log is a sequence of segment files. Each starts with a fixed `SegmentHeader` (magic, format
version, segment number, first LSN, creating node) and continues with **frames**. A frame is one
whole transaction: a fixed header (magic, version, kind, record count, payload length, LSN,
generation, writer node, commit time, CRC32C of the payload, CRC32C of the header) followed by the
payload, a concatenation of records (`type u8, length u32, body`). A frame is applied entirely or
not at all: a frame whose header or payload CRC does not match is never decoded.

LSNs number frames: every frame takes exactly one LSN (a `HOLE` frame left by `fsck --repair` takes
`count` of them), consecutive across segments. A record's identity is (LSN, position in frame), and
it carries the frame's generation and writer node by framing.

All layouts are explicit little-endian `struct`s; strings are UTF-8 with a u16 length, lists a u32
count. No pickle. Every decoder validates lengths and raises `FormatError` on anything malformed,
so a bit flip that survives the CRC (impossible in practice) still cannot crash the reader.

Bumping a layout means bumping `FORMAT_VERSION` and keeping a decoder for the old one.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar, TypeAlias

import crc32c as _crc32c

FORMAT_VERSION = 1
SEGMENT_MAGIC = b"MHSEG\r\n\x1a"
FRAME_MAGIC = b"MHTX"
CHECKPOINT_MAGIC = b"MHCKPT\r\n"

GUID_LEN = 16
HASH_LEN = 32


class FormatError(Exception):
    """Bytes that do not decode as the documented layout."""


def crc32c(data: bytes | memoryview) -> int:
    """CRC32C (Castagnoli) of `data`."""
    return int(_crc32c.crc32c(data))


# --- segment header -----------------------------------------------------------------------------

_SEG_HDR = struct.Struct("<8sHHQQ16sqI")  # magic ver rewrites segno first_lsn node created crc
SEGMENT_HEADER_SIZE = _SEG_HDR.size


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    """The fixed header at offset 0 of every segment file. `rewrites` counts compactions of
    the segment (mod 2**16): a checkpoint records it, so a checkpoint taken before a rewrite (whose
    blob offsets are stale) is never trusted after it."""

    segno: int
    first_lsn: int
    node_id: bytes
    created_ms: int
    rewrites: int = 0

    def encode(self) -> bytes:
        body = _SEG_HDR.pack(
            SEGMENT_MAGIC,
            FORMAT_VERSION,
            self.rewrites & 0xFFFF,
            self.segno,
            self.first_lsn,
            self.node_id,
            self.created_ms,
            0,
        )
        return body[:-4] + struct.pack("<I", crc32c(body[:-4]))

    @classmethod
    def decode(cls, data: bytes) -> SegmentHeader:
        if len(data) < SEGMENT_HEADER_SIZE:
            raise FormatError("segment header truncated")
        magic, ver, rewrites, segno, first, node, created, crc = _SEG_HDR.unpack_from(data)
        if magic != SEGMENT_MAGIC:
            raise FormatError("not a mailharbor segment (bad magic)")
        if crc != crc32c(data[: SEGMENT_HEADER_SIZE - 4]):
            raise FormatError("segment header checksum mismatch")
        if ver != FORMAT_VERSION:
            raise FormatError(f"unsupported segment format version {ver}")
        return cls(segno, first, node, created, rewrites)


# --- frames -------------------------------------------------------------------------------------

_FRAME_HDR = struct.Struct("<4sBBHIQQ16sqII")
FRAME_HEADER_SIZE = _FRAME_HDR.size
MAX_FRAME_PAYLOAD = 64 * 1024 * 1024
MAX_RECORDS = 0xFFFF  # the record count is a u16


class FrameKind(IntEnum):
    """What a frame is. Only TXN and HOLE frames exist in version 1."""

    TXN = 0
    HOLE = 1  # written by fsck --repair in place of unreadable frames; covers `count` LSNs


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """Decoded frame header. `end` of a frame = its offset + FRAME_HEADER_SIZE + payload_len."""

    kind: FrameKind
    nrecords: int
    payload_len: int
    lsn: int
    generation: int
    node_id: bytes
    time_ms: int
    payload_crc: int


def encode_frame(
    *,
    lsn: int,
    generation: int,
    node_id: bytes,
    time_ms: int,
    payload: bytes,
    nrecords: int,
    kind: FrameKind = FrameKind.TXN,
) -> bytes:
    """Frame `payload` (already-encoded records) with a checksummed header."""
    if len(payload) > MAX_FRAME_PAYLOAD:
        raise FormatError("transaction too large for one frame")
    head = _FRAME_HDR.pack(
        FRAME_MAGIC,
        FORMAT_VERSION,
        kind,
        nrecords,
        len(payload),
        lsn,
        generation,
        node_id,
        time_ms,
        crc32c(payload),
        0,
    )[:-4]
    return head + struct.pack("<I", crc32c(head)) + payload


def decode_frame_header(data: bytes | memoryview) -> FrameHeader:
    """Decode and verify a frame header (not the payload). Raises FormatError."""
    if len(data) < FRAME_HEADER_SIZE:
        raise FormatError("frame header truncated")
    magic, ver, kind, nrec, plen, lsn, gen, node, tms, pcrc, hcrc = _FRAME_HDR.unpack_from(data)
    if magic != FRAME_MAGIC:
        raise FormatError("bad frame magic")
    if hcrc != crc32c(bytes(data[: FRAME_HEADER_SIZE - 4])):
        raise FormatError("frame header checksum mismatch")
    if ver != FORMAT_VERSION:
        raise FormatError(f"unsupported frame version {ver}")
    if plen > MAX_FRAME_PAYLOAD:
        raise FormatError("frame payload length out of range")
    try:
        fkind = FrameKind(kind)
    except ValueError:
        raise FormatError(f"unknown frame kind {kind}") from None
    return FrameHeader(fkind, nrec, plen, lsn, gen, node, tms, pcrc)


# --- records ------------------------------------------------------------------------------------


class RecordType(IntEnum):
    """Record type codes (u8). Never reuse a retired code."""

    BLOB = 1
    CHUNK = 2
    DELIVER = 3
    FLAGS = 4
    EXPUNGE = 5
    MAILBOX_CREATE = 6
    MAILBOX_RENAME = 7
    MAILBOX_DELETE = 8
    SUBSCRIBE = 9
    ACCOUNT_PUT = 10
    ACCOUNT_DELETE = 11
    DOMAIN_ADD = 12
    DOMAIN_REMOVE = 13
    ALIAS_SET = 14
    ALIAS_REMOVE = 15
    QUEUE_ADD = 16
    QUEUE_ATTEMPT = 17
    QUEUE_DONE = 18
    MIME_META = 19
    HOLE = 20
    RECLAIMED = 21
    RESERVE = 22


class _W:
    """A tiny explicit encoder."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def raw(self, b: bytes, n: int) -> _W:
        if len(b) != n:
            raise FormatError(f"expected {n} bytes, got {len(b)}")
        self.parts.append(b)
        return self

    def u8(self, v: int) -> _W:
        self.parts.append(struct.pack("<B", v))
        return self

    def u32(self, v: int) -> _W:
        self.parts.append(struct.pack("<I", v))
        return self

    def u64(self, v: int) -> _W:
        self.parts.append(struct.pack("<Q", v))
        return self

    def i64(self, v: int) -> _W:
        self.parts.append(struct.pack("<q", v))
        return self

    def s(self, v: str) -> _W:
        b = v.encode("utf-8")
        if len(b) > 0xFFFF:
            raise FormatError("string too long")
        self.parts.append(struct.pack("<H", len(b)) + b)
        return self

    def strs(self, vs: Sequence[str]) -> _W:
        self.u32(len(vs))
        for v in vs:
            self.s(v)
        return self

    def u32s(self, vs: Sequence[int]) -> _W:
        self.u32(len(vs))
        self.parts.append(struct.pack(f"<{len(vs)}I", *vs))
        return self

    def blob(self, b: bytes) -> _W:
        self.parts.append(b)
        return self

    def done(self) -> bytes:
        return b"".join(self.parts)


class _R:
    """The matching decoder; every read is bounds-checked."""

    __slots__ = ("d", "p")

    def __init__(self, d: bytes | memoryview) -> None:
        self.d = d
        self.p = 0

    def _take(self, n: int) -> bytes:
        if n < 0 or self.p + n > len(self.d):
            raise FormatError("record truncated")
        b = bytes(self.d[self.p : self.p + n])
        self.p += n
        return b

    def raw(self, n: int) -> bytes:
        return self._take(n)

    def u8(self) -> int:
        return int(self._take(1)[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self._take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self._take(8))[0])

    def i64(self) -> int:
        return int(struct.unpack("<q", self._take(8))[0])

    def s(self) -> str:
        n = int(struct.unpack("<H", self._take(2))[0])
        try:
            return self._take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError("invalid UTF-8 in record") from None

    def strs(self) -> tuple[str, ...]:
        n = self.u32()
        if n > len(self.d):
            raise FormatError("list length out of range")
        return tuple(self.s() for _ in range(n))

    def u32s(self) -> tuple[int, ...]:
        n = self.u32()
        return tuple(struct.unpack(f"<{n}I", self._take(4 * n)))

    def rest(self) -> bytes:
        b = bytes(self.d[self.p :])
        self.p = len(self.d)
        return b

    def end(self) -> None:
        if self.p != len(self.d):
            raise FormatError("trailing bytes in record")


@dataclass(frozen=True, slots=True)
class Blob:
    """A message body (with the server-added headers), keyed by BLAKE2b-256 of its bytes.
    `nchunks == 0`: `data` is the whole body. Otherwise `data` is the 16-byte stream id of the
    `nchunks` CHUNK records (written in earlier frames) whose concatenation is the body."""

    TYPE: ClassVar[RecordType] = RecordType.BLOB
    hash: bytes
    size: int
    nchunks: int
    data: bytes

    def encode(self) -> bytes:
        return _W().raw(self.hash, HASH_LEN).u64(self.size).u32(self.nchunks).blob(self.data).done()

    @classmethod
    def decode(cls, r: _R) -> Blob:
        return cls(r.raw(HASH_LEN), r.u64(), r.u32(), r.rest())


@dataclass(frozen=True, slots=True)
class Chunk:
    """Part `index` of a large blob being streamed into the log under a random `stream` id (the
    content hash is only known at the end). Invisible until a BLOB record naming the stream
    commits; a chunk whose BLOB never commits is an orphan, reclaimed by compaction."""

    TYPE: ClassVar[RecordType] = RecordType.CHUNK
    stream: bytes
    index: int
    data: bytes

    def encode(self) -> bytes:
        return _W().raw(self.stream, GUID_LEN).u32(self.index).blob(self.data).done()

    @classmethod
    def decode(cls, r: _R) -> Chunk:
        return cls(r.raw(GUID_LEN), r.u32(), r.rest())


@dataclass(frozen=True, slots=True)
class Target:
    """One mailbox entry created by a DELIVER: message GUID, UID and MODSEQ are explicit."""

    mailbox: bytes
    msg_guid: bytes
    uid: int
    modseq: int


_TARGET = struct.Struct("<16s16sIQ")


@dataclass(frozen=True, slots=True)
class Deliver:
    """One body delivered to one or more mailboxes (the compact multi-recipient record)."""

    TYPE: ClassVar[RecordType] = RecordType.DELIVER
    blob: bytes
    internaldate_ms: int
    size: int
    flags: int
    keywords: tuple[str, ...]
    targets: tuple[Target, ...]

    def encode(self) -> bytes:
        w = _W().raw(self.blob, HASH_LEN).i64(self.internaldate_ms).u64(self.size).u8(self.flags)
        w.strs(self.keywords).u32(len(self.targets))
        for t in self.targets:
            w.blob(_TARGET.pack(t.mailbox, t.msg_guid, t.uid, t.modseq))
        return w.done()

    @classmethod
    def decode(cls, r: _R) -> Deliver:
        blob, idate, size, flags, kws, n = (
            r.raw(HASH_LEN),
            r.i64(),
            r.u64(),
            r.u8(),
            r.strs(),
            r.u32(),
        )
        if n > len(r.d):
            raise FormatError("target count out of range")
        targets = tuple(Target(*_TARGET.unpack(r.raw(_TARGET.size))) for _ in range(n))
        return cls(blob, idate, size, flags, kws, targets)


@dataclass(frozen=True, slots=True)
class Flags:
    """A flag delta on some UIDs of one mailbox, all getting `modseq`."""

    TYPE: ClassVar[RecordType] = RecordType.FLAGS
    mailbox: bytes
    modseq: int
    add: int
    remove: int
    add_keywords: tuple[str, ...]
    remove_keywords: tuple[str, ...]
    uids: tuple[int, ...]

    def encode(self) -> bytes:
        w = _W().raw(self.mailbox, GUID_LEN).u64(self.modseq).u8(self.add).u8(self.remove)
        return w.strs(self.add_keywords).strs(self.remove_keywords).u32s(self.uids).done()

    @classmethod
    def decode(cls, r: _R) -> Flags:
        return cls(r.raw(GUID_LEN), r.u64(), r.u8(), r.u8(), r.strs(), r.strs(), r.u32s())


@dataclass(frozen=True, slots=True)
class Expunge:
    """UIDs removed from one mailbox at `modseq`."""

    TYPE: ClassVar[RecordType] = RecordType.EXPUNGE
    mailbox: bytes
    modseq: int
    uids: tuple[int, ...]

    def encode(self) -> bytes:
        return _W().raw(self.mailbox, GUID_LEN).u64(self.modseq).u32s(self.uids).done()

    @classmethod
    def decode(cls, r: _R) -> Expunge:
        return cls(r.raw(GUID_LEN), r.u64(), r.u32s())


@dataclass(frozen=True, slots=True)
class MailboxCreate:
    TYPE: ClassVar[RecordType] = RecordType.MAILBOX_CREATE
    account: bytes
    mailbox: bytes
    uidvalidity: int
    special_use: int
    name: str

    def encode(self) -> bytes:
        w = _W().raw(self.account, GUID_LEN).raw(self.mailbox, GUID_LEN)
        return w.u32(self.uidvalidity).u8(self.special_use).s(self.name).done()

    @classmethod
    def decode(cls, r: _R) -> MailboxCreate:
        return cls(r.raw(GUID_LEN), r.raw(GUID_LEN), r.u32(), r.u8(), r.s())


@dataclass(frozen=True, slots=True)
class MailboxRename:
    TYPE: ClassVar[RecordType] = RecordType.MAILBOX_RENAME
    mailbox: bytes
    name: str

    def encode(self) -> bytes:
        return _W().raw(self.mailbox, GUID_LEN).s(self.name).done()

    @classmethod
    def decode(cls, r: _R) -> MailboxRename:
        return cls(r.raw(GUID_LEN), r.s())


@dataclass(frozen=True, slots=True)
class MailboxDelete:
    TYPE: ClassVar[RecordType] = RecordType.MAILBOX_DELETE
    mailbox: bytes

    def encode(self) -> bytes:
        return _W().raw(self.mailbox, GUID_LEN).done()

    @classmethod
    def decode(cls, r: _R) -> MailboxDelete:
        return cls(r.raw(GUID_LEN))


@dataclass(frozen=True, slots=True)
class Subscribe:
    TYPE: ClassVar[RecordType] = RecordType.SUBSCRIBE
    account: bytes
    subscribed: bool
    name: str

    def encode(self) -> bytes:
        return _W().raw(self.account, GUID_LEN).u8(int(self.subscribed)).s(self.name).done()

    @classmethod
    def decode(cls, r: _R) -> Subscribe:
        return cls(r.raw(GUID_LEN), bool(r.u8()), r.s())


@dataclass(frozen=True, slots=True)
class AccountPut:
    """Create or update an account (address is the canonical lower-case form)."""

    TYPE: ClassVar[RecordType] = RecordType.ACCOUNT_PUT
    account: bytes
    address: str
    password_hash: str
    quota_bytes: int
    flags: int

    def encode(self) -> bytes:
        w = _W().raw(self.account, GUID_LEN).s(self.address).s(self.password_hash)
        return w.u64(self.quota_bytes).u32(self.flags).done()

    @classmethod
    def decode(cls, r: _R) -> AccountPut:
        return cls(r.raw(GUID_LEN), r.s(), r.s(), r.u64(), r.u32())


@dataclass(frozen=True, slots=True)
class AccountDelete:
    TYPE: ClassVar[RecordType] = RecordType.ACCOUNT_DELETE
    account: bytes

    def encode(self) -> bytes:
        return _W().raw(self.account, GUID_LEN).done()

    @classmethod
    def decode(cls, r: _R) -> AccountDelete:
        return cls(r.raw(GUID_LEN))


@dataclass(frozen=True, slots=True)
class DomainAdd:
    TYPE: ClassVar[RecordType] = RecordType.DOMAIN_ADD
    name: str

    def encode(self) -> bytes:
        return _W().s(self.name).done()

    @classmethod
    def decode(cls, r: _R) -> DomainAdd:
        return cls(r.s())


@dataclass(frozen=True, slots=True)
class DomainRemove:
    TYPE: ClassVar[RecordType] = RecordType.DOMAIN_REMOVE
    name: str

    def encode(self) -> bytes:
        return _W().s(self.name).done()

    @classmethod
    def decode(cls, r: _R) -> DomainRemove:
        return cls(r.s())


@dataclass(frozen=True, slots=True)
class AliasSet:
    """`source` (an address, or `@domain` for a catch-all) expands to `targets`."""

    TYPE: ClassVar[RecordType] = RecordType.ALIAS_SET
    source: str
    targets: tuple[str, ...]

    def encode(self) -> bytes:
        return _W().s(self.source).strs(self.targets).done()

    @classmethod
    def decode(cls, r: _R) -> AliasSet:
        return cls(r.s(), r.strs())


@dataclass(frozen=True, slots=True)
class AliasRemove:
    TYPE: ClassVar[RecordType] = RecordType.ALIAS_REMOVE
    source: str

    def encode(self) -> bytes:
        return _W().s(self.source).done()

    @classmethod
    def decode(cls, r: _R) -> AliasRemove:
        return cls(r.s())


@dataclass(frozen=True, slots=True)
class QueueAdd:
    """An outbound message: the body is a blob (referenced once by the queue entry)."""

    TYPE: ClassVar[RecordType] = RecordType.QUEUE_ADD
    entry: bytes
    blob: bytes
    created_ms: int
    sender: str
    recipients: tuple[str, ...]
    params: str  # ESMTP parameters (DSN ENVID/RET, per-recipient NOTIFY), opaque to the store

    def encode(self) -> bytes:
        w = _W().raw(self.entry, GUID_LEN).raw(self.blob, HASH_LEN).i64(self.created_ms)
        return w.s(self.sender).strs(self.recipients).s(self.params).done()

    @classmethod
    def decode(cls, r: _R) -> QueueAdd:
        return cls(r.raw(GUID_LEN), r.raw(HASH_LEN), r.i64(), r.s(), r.strs(), r.s())


@dataclass(frozen=True, slots=True)
class QueueAttempt:
    """An attempt to deliver `recipients`, logged (with the writer's term) before sending."""

    TYPE: ClassVar[RecordType] = RecordType.QUEUE_ATTEMPT
    entry: bytes
    term: int
    at_ms: int
    recipients: tuple[str, ...]

    def encode(self) -> bytes:
        w = _W().raw(self.entry, GUID_LEN).u64(self.term).i64(self.at_ms)
        return w.strs(self.recipients).done()

    @classmethod
    def decode(cls, r: _R) -> QueueAttempt:
        return cls(r.raw(GUID_LEN), r.u64(), r.i64(), r.strs())


class QueueResult(IntEnum):
    DELIVERED = 1
    BOUNCED = 2
    EXPIRED = 3
    DELETED = 4
    DEFERRED = 5  # not final: the next attempt is due at `next_ms`


class QueueDoneFlag(IntFlag):
    """Bits of the optional trailing flags byte of a QUEUE_DONE record."""

    WARNED = 1  # the entry's delay warning (DSN action "delayed") has been sent


QUEUE_DONE_NO_FLAGS = QueueDoneFlag(0)


@dataclass(frozen=True, slots=True)
class QueueDone:
    """The outcome for one recipient of an entry. Final results remove the recipient.

    `flags` is an optional trailing u8, written only when non-zero: a record without it (every
    record written before it existed) decodes with `flags == 0`, and an unflagged record encodes
    exactly as before. A present byte of 0 (not canonical) or with unknown bits is refused."""

    TYPE: ClassVar[RecordType] = RecordType.QUEUE_DONE
    entry: bytes
    recipient: str
    result: QueueResult
    next_ms: int
    detail: str
    flags: QueueDoneFlag = QUEUE_DONE_NO_FLAGS

    def encode(self) -> bytes:
        w = _W().raw(self.entry, GUID_LEN).s(self.recipient).u8(self.result).i64(self.next_ms)
        w.s(self.detail)
        if self.flags:
            w.u8(self.flags)
        return w.done()

    @classmethod
    def decode(cls, r: _R) -> QueueDone:
        entry, rcpt, res, nxt, detail = r.raw(GUID_LEN), r.s(), r.u8(), r.i64(), r.s()
        try:
            result = QueueResult(res)
        except ValueError:
            raise FormatError(f"unknown queue result {res}") from None
        bits = 0
        if r.p < len(r.d):  # the optional flags byte: absent in records written before it
            bits = r.u8()
            if bits == 0 or bits & ~_QUEUE_DONE_FLAGS:
                raise FormatError(f"invalid queue done flags {bits:#x}")
        return cls(entry, rcpt, result, nxt, detail, QueueDoneFlag(bits))


_QUEUE_DONE_FLAGS = int(QueueDoneFlag.WARNED)


@dataclass(frozen=True, slots=True)
class MimeMeta:
    """Parsed MIME metadata of a blob (ENVELOPE/BODYSTRUCTURE), in a versioned opaque encoding
    owned by the service layer."""

    TYPE: ClassVar[RecordType] = RecordType.MIME_META
    blob: bytes
    version: int
    data: bytes

    def encode(self) -> bytes:
        return _W().raw(self.blob, HASH_LEN).u8(self.version).blob(self.data).done()

    @classmethod
    def decode(cls, r: _R) -> MimeMeta:
        return cls(r.raw(HASH_LEN), r.u8(), r.rest())


@dataclass(frozen=True, slots=True)
class Hole:
    """Left by `fsck --repair` where `count` LSNs starting at the frame's LSN were unreadable."""

    TYPE: ClassVar[RecordType] = RecordType.HOLE
    count: int
    reason: str

    def encode(self) -> bytes:
        return _W().u64(self.count).s(self.reason).done()

    @classmethod
    def decode(cls, r: _R) -> Hole:
        return cls(r.u64(), r.s())


@dataclass(frozen=True, slots=True)
class Reclaimed:
    """What compaction leaves of a BLOB, CHUNK or MIME_META record whose data is no longer
    referenced: the record's type and its identifying head, without the data. Node-local: the
    logical content of a frame (what `verify` digests) treats a reclaimed record and its
    original alike by digesting heads, never data (see docs/store.md)."""

    TYPE: ClassVar[RecordType] = RecordType.RECLAIMED
    original: int
    head: bytes
    data_len: int

    def encode(self) -> bytes:
        return _W().u8(self.original).u32(len(self.head)).blob(self.head).u64(self.data_len).done()

    @classmethod
    def decode(cls, r: _R) -> Reclaimed:
        orig = r.u8()
        head = r.raw(r.u32())
        return cls(orig, head, r.u64())


@dataclass(frozen=True, slots=True)
class Reserve:
    """Allocation floors of one mailbox: its UIDNEXT becomes at least ``uidnext`` and its
    HIGHESTMODSEQ at least ``highestmodseq`` (0: that counter is left as it is). Written by
    `Transaction.reserve` so that a floor persists even when nothing is delivered; applying it
    never lowers a counter."""

    TYPE: ClassVar[RecordType] = RecordType.RESERVE
    mailbox: bytes
    uidnext: int
    highestmodseq: int

    def encode(self) -> bytes:
        return _W().raw(self.mailbox, GUID_LEN).u32(self.uidnext).u64(self.highestmodseq).done()

    @classmethod
    def decode(cls, r: _R) -> Reserve:
        return cls(r.raw(GUID_LEN), r.u32(), r.u64())


Record: TypeAlias = (
    Blob
    | Chunk
    | Deliver
    | Flags
    | Expunge
    | MailboxCreate
    | MailboxRename
    | MailboxDelete
    | Subscribe
    | AccountPut
    | AccountDelete
    | DomainAdd
    | DomainRemove
    | AliasSet
    | AliasRemove
    | QueueAdd
    | QueueAttempt
    | QueueDone
    | MimeMeta
    | Hole
    | Reclaimed
    | Reserve
)

_DECODERS: dict[int, type[Record]] = {
    c.TYPE: c
    for c in (
        Blob,
        Chunk,
        Deliver,
        Flags,
        Expunge,
        MailboxCreate,
        MailboxRename,
        MailboxDelete,
        Subscribe,
        AccountPut,
        AccountDelete,
        DomainAdd,
        DomainRemove,
        AliasSet,
        AliasRemove,
        QueueAdd,
        QueueAttempt,
        QueueDone,
        MimeMeta,
        Hole,
        Reclaimed,
        Reserve,
    )
}

# Length of the identifying head (before the data) of the records that carry bulk data.
DATA_HEAD_LEN = {
    RecordType.BLOB: HASH_LEN + 12,
    RecordType.CHUNK: GUID_LEN + 4,
    RecordType.MIME_META: HASH_LEN,  # the data located by the index: version + data
}

_REC_HDR = struct.Struct("<BI")
RECORD_HEADER_SIZE = _REC_HDR.size


def encode_records(records: Sequence[Record]) -> bytes:
    """Concatenate records as `type u8, length u32, body`."""
    out: list[bytes] = []
    for rec in records:
        body = rec.encode()
        out.append(_REC_HDR.pack(rec.TYPE, len(body)))
        out.append(body)
    return b"".join(out)


def iter_record_spans(payload: bytes | memoryview) -> Iterator[tuple[int, int, int]]:
    """Yield (type, body offset, body length) for each record of a payload."""
    p, n = 0, len(payload)
    while p < n:
        if p + RECORD_HEADER_SIZE > n:
            raise FormatError("record header truncated")
        typ, ln = _REC_HDR.unpack_from(payload, p)
        p += RECORD_HEADER_SIZE
        if p + ln > n:
            raise FormatError("record body truncated")
        yield typ, p, ln
        p += ln


def decode_record(typ: int, body: bytes | memoryview) -> Record:
    """Decode one record body. Raises FormatError on an unknown type or a malformed body."""
    cls = _DECODERS.get(typ)
    if cls is None:
        raise FormatError(f"unknown record type {typ}")
    r = _R(body)
    rec = cls.decode(r)
    r.end()
    return rec


def decode_records(payload: bytes | memoryview) -> list[Record]:
    """Decode a whole frame payload."""
    return [decode_record(t, payload[o : o + n]) for t, o, n in iter_record_spans(payload)]
