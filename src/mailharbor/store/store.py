"""The message store: a log of whole transactions, derived indexes, group commit.

Theory of operation
-------------------
*The log is the truth.* A transaction is built in memory (`Transaction`), validated against the
durable index, encoded into records with explicit UIDs, MODSEQs and GUIDs, framed as a whole with a
CRC32C and appended to the active segment. It becomes **durable** when an fsync covering it
returned (and, with replication, when the durability barrier passed), and only then is it
**applied** to the in-memory index and made **visible**; the committer is told after that. Frames
are applied strictly in LSN order, so what readers see is always a prefix of the log that survives
a crash.

Group commit: in async use, commits append their frames and wait; one flusher task fsyncs whatever
was appended before it started (in a worker thread, the event loop keeps appending), then applies
the whole batch. Synchronous commits (CLI, tests) fsync inline and apply everything pending.

Structural changes (accounts, domains, aliases, mailbox create/rename/delete) are *exclusive*: they
wait until nothing is pending, validate, append, and hold new commits back until they are applied.
Message changes (deliveries, flags, expunges, queue) validate against the durable index plus the
allocation counters and never wait for each other.

Replication support (see docs/store.md, "Replication API"): `read_frames` ships frames byte
for byte (visible ones, or with `durable=True` also those fsynced but still held by the durability
barrier); `ingest` appends a peer's frames (HOLE frames included) byte for byte; `cut_tail` is the
one exception to append-only; `logical_digest` is what verify compares; `begin_generation`,
`generations()`, `retain_from`/`first_retained_lsn` and the opaque `<data>/repl/meta` serve the
replication layer's generations and retention; `freeze_writes`/`thaw_writes` let the fencing
policy refuse local writes (`WritesFrozen`, nothing appended) without closing the store.

The cut (`cut_tail`) is made crash-safe by an intent: the quarantine file (the cut frames verbatim)
is made durable first, then `<data>/log/CUT-INTENT` (written atomically) names the cut position,
then segments after it are removed, the containing one truncated, checkpoints beyond the cut
deleted, and finally the intent is removed. `Store.open` redoes a cut whose intent it finds before
it looks at segments or checkpoints, so after a crash the log holds either the whole tail (no
intent yet) or exactly the cut state (intent found and redone) — never half.

A damaged frame in the middle of the log refuses the open (`CorruptLog`: fsck's job) unless the
opener passes `damaged_tail_dir` (a replicated node, whose peer holds the range): then the raw
bytes from the damaged frame on are copied aside, `<data>/DAMAGED` records the cut (durably,
first) and the log is cut there through the ordinary cut intent; `store.damage` reports it until
`clear_damage()`. A snapshot being received can record durable progress
(`save_snapshot_progress`) and be resumed after a restart (`resume_snapshot_install`).

Invariants:
* only frames with LSN <= the durable LSN are ever applied; a torn or corrupt frame never is;
* UIDs and MODSEQs are allocated at encode time in LSN order, so they ascend in the log;
* `os.fsync`/`os.replace`/dir fsync happen only through `fsio`;
* after any I/O error on the log the store is in state ERROR: no further writes, pending commits
  fail, nothing unsynced is ever reported durable; reopening recovers from what is on disk;
* one process per data directory (an exclusive lock on `<data>/LOCK`);
* the log only grows at its end, except through `cut_tail`, which runs with nothing pending and no
  blob writer streaming, and whose intent is redone at open before anything reads the log;
  `drop_head` (the retention horizon: dead, checkpointed head segments, lowest first) and
  `install_snapshot` (a whole received log, swapped under an intent redone at open before a cut
  intent) — see docs/store.md, "Retention horizon and snapshots";
* a log that does not start at LSN 1 is opened only from a checkpoint, never by replay;
* while writes are frozen (`freeze_writes`) nothing is appended locally (`ingest` still is);
* no checkpoint whose LSN is above the end of the log survives a cut (they are deleted before the
  intent is removed), so a checkpoint never describes frames the log no longer holds;
* generations never decrease along the log for ingested frames, and `Store.generation` never
  decreases while open nor across a reopen once `begin_generation` returned (it is persisted in
  `<data>/repl/generation`); the generation history is derived state: rebuilt by replay, kept in
  checkpoints (format version 3), cut back with the log;
* compaction never rewrites a frame with LSN >= `retain_from`; frames below it may carry
  RECLAIMED records but keep their LSN, generation, writer, time and record count, so their
  logical digest is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType
from typing import Protocol

from mailharbor.store import format as fmt
from mailharbor.store import index as ix
from mailharbor.store.fsio import FileSystem, OsFileSystem, ReadableFile, WritableFile
from mailharbor.store.log import (
    SEGMENT_PREFIX,
    SEGMENT_SUFFIX,
    find_next_valid,
    list_segments,
    scan_segment,
    segment_name,
    segment_path,
)
from mailharbor.store.ops import (
    DEFAULT_MAILBOXES,
    STRUCTURAL,
    Change,
    Delivery,
    Encoder,
    InvalidArgument,
    NewBlob,
    NotFound,
    Op,
    OpAccountAdd,
    OpAccountDelete,
    OpAccountUpdate,
    OpAliasRemove,
    OpAliasSet,
    OpDeliver,
    OpDomainAdd,
    OpDomainRemove,
    OpExpunge,
    OpFlags,
    OpMailboxCreate,
    OpMailboxDelete,
    OpMailboxRename,
    OpQueueAdd,
    OpQueueAttempt,
    OpQueueDone,
    OpReserve,
    OpSubscribe,
    StoreError,
    new_guid,
)

#: Ingested batches up to this size are written on the loop thread (see Store._queue_writes).
INLINE_WRITE_BYTES = 256 * 1024

log = logging.getLogger("mailharbor.store")

LOG_DIR = "log"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINTS_KEPT = 2
CHECKPOINT_VERSION = 3  # 2: the generation history follows the segment list; 3: queue `warned`
REPL_DIR = "repl"  # node-local replication state: `meta` (opaque, the adapter's), `generation`
REPL_META = "meta"
GENERATION_FILE = "generation"
CUT_INTENT = "CUT-INTENT"  # in the log directory while a cut is being applied
SNAPSHOT_STAGING = "snapshot-incoming"  # a snapshot being received (`write_snapshot_file`)
INSTALL_INTENT = "INSTALL-INTENT"  # in the data directory while a snapshot is being installed
SNAPSHOT_PROGRESS = "PROGRESS"  # in snapshot-incoming/: what was received durably (a resume)
_PROGRESS_MAGIC = b"MHSNPRG\x1a"
DAMAGE_MARKER = "DAMAGED"  # in the data directory: the log was cut at a damaged frame (`damage`)
NO_RETENTION = 1 << 63
"""The default `Store.retain_from`: no peer to retain anything for."""

_DOMAIN_RE = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_LOCAL_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")


# --- errors -------------------------------------------------------------------------------------


class StoreLocked(StoreError):
    pass


class StoreReadOnly(StoreError):
    """The store is in ERROR (after an I/O error) or closed — or writes are frozen
    (:class:`WritesFrozen`): no writes."""


class WritesFrozen(StoreReadOnly):
    """Writes are frozen by replication fencing (`Store.freeze_writes`): the peer was lost and
    the policy holds writes until it is Outdated or fenced. Nothing of the refused (or held)
    commit is acknowledged; the store stays open and resumes with `thaw_writes`."""


class StoreIOError(StoreError):
    """An I/O error on the log: the transaction is not durable; the store is now read-only."""


class CorruptLog(StoreError):
    """A bad frame with valid data after it: read-write open refuses; run `store fsck`."""


class CutIntentError(CorruptLog):
    """The cut intent file is unreadable (it is written atomically, so this is damage)."""


class StoreState(Enum):
    OPEN = "open"
    ERROR = "error"
    CLOSED = "closed"


# --- options and reports ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """Tunables (see `[store]` in the configuration reference)."""

    segment_bytes: int = 64 * 1024 * 1024
    cache_bytes: int = 64 * 1024 * 1024
    checkpoint_every_bytes: int = 64 * 1024 * 1024
    chunk_bytes: int = 256 * 1024
    sync: bool = True


@dataclass(frozen=True, slots=True)
class TornTail:
    segno: int
    offset: int
    bytes_dropped: int
    reason: str


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What `Store.open` did: where it started and what it dropped."""

    checkpoint_lsn: int
    replayed_frames: int
    last_lsn: int
    torn_tail: TornTail | None
    checkpoint_rejected: str
    seconds: float
    cut_redone: str = ""  # a cut interrupted by a crash and finished by this open


@dataclass(frozen=True, slots=True)
class CompactReport:
    segments_rewritten: int
    bytes_before: int
    bytes_after: int
    blobs_reclaimed: int
    chunks_reclaimed: int


class DurabilityBarrier(Protocol):
    """What replication plugs in: `wait(lsn)` returns once frames up to `lsn` are as durable as
    the replication protocol requires (protocol C: fsynced by the peer). Raising fails the
    commits in the batch (they are not acknowledged).

    `try_release(lsn)` is the synchronous fast path, asked right after the local fsync when no
    earlier batch is still waiting: True means frames up to `lsn` are released now (exactly as
    if `wait(lsn)` had returned: the barrier counts them as released) and the store applies the
    batch at once; False means nothing changed and the store goes through `wait`."""

    async def wait(self, lsn: int) -> None: ...

    def try_release(self, lsn: int) -> bool: ...


@dataclass(frozen=True, slots=True)
class CommitEvent:
    """Sent to commit listeners after frames are applied (visible)."""

    lsn: int
    mailboxes: frozenset[bytes]


# --- helpers ------------------------------------------------------------------------------------


def blob_hash(data: bytes) -> bytes:
    """The content hash of a blob: BLAKE2b-256."""
    return hashlib.blake2b(data, digest_size=32).digest()


def now_ms() -> int:
    return int(time.time() * 1000)


def normalize_address(address: str) -> str:
    """Lower-case an address and check its syntax; raises InvalidArgument."""
    a = address.strip().lower()
    local, sep, domain = a.rpartition("@")
    if not sep or not _LOCAL_RE.match(local) or not _DOMAIN_RE.match(domain):
        raise InvalidArgument(f"invalid address {address!r}")
    return a


def normalize_domain(name: str) -> str:
    d = name.strip().lower().rstrip(".")
    if not _DOMAIN_RE.match(d):
        raise InvalidArgument(f"invalid domain name {name!r}")
    return d


def check_mailbox_name(name: str) -> str:
    """Validate a mailbox name (hierarchy delimiter '/'); returns it with INBOX canonical."""
    if not name or len(name.encode("utf-8")) > 255:
        raise InvalidArgument("mailbox name must be 1 to 255 bytes")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name) or "*" in name or "%" in name:
        raise InvalidArgument("mailbox name contains a forbidden character")
    if name.startswith("/") or name.endswith("/") or "//" in name:
        raise InvalidArgument("mailbox name has an empty hierarchy level")
    parts = name.split("/")
    if ix.is_inbox(parts[0]):
        parts[0] = "INBOX"
    return "/".join(parts)


def lock_data_dir(data_dir: str) -> int:
    """Take the exclusive lock of a data directory (one writer per data directory); returns the
    fd that holds it (closing it releases the lock). Raises StoreLocked naming the holder."""
    path = os.path.join(data_dir, "LOCK")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        finally:
            os.close(fd)
        raise StoreLocked(
            f"data directory {data_dir} is in use by another process (pid {pid or '?'})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class _Cache:
    """A byte-bounded LRU of blob bodies and metadata, with hit/miss counters."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._d: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, key: bytes) -> bytes | None:
        v = self._d.get(key)
        if v is None:
            self.misses += 1
            return None
        self._d.move_to_end(key)
        self.hits += 1
        return v

    def put(self, key: bytes, value: bytes) -> None:
        if len(value) > self.budget // 4:
            return
        old = self._d.pop(key, None)
        if old is not None:
            self.used -= len(old)
        self._d[key] = value
        self.used += len(value)
        while self.used > self.budget and self._d:
            _, v = self._d.popitem(last=False)
            self.used -= len(v)

    def clear(self) -> None:
        self._d.clear()
        self.used = 0


# --- transactions -------------------------------------------------------------------------------


class BlobWriter:
    """Streams a body into the log: every `chunk_bytes` a CHUNK frame is appended (not yet
    durable, invisible). `finish()` returns the content hash; the owning transaction's commit
    makes it visible. A small body never leaves memory before commit."""

    def __init__(self, txn: Transaction) -> None:
        self._txn = txn
        self._store = txn._store
        self._h = hashlib.blake2b(digest_size=32)
        self._buf = bytearray()
        self._stream = new_guid()
        self._nchunks = 0
        self._size = 0
        self._done = False

    def write(self, data: bytes) -> None:
        if self._done:
            raise InvalidArgument("blob writer already finished")
        self._h.update(data)
        self._buf += data
        self._size += len(data)
        cb = self._store.options.chunk_bytes
        while len(self._buf) >= cb:
            self._store._append_chunk(self._stream, self._nchunks, bytes(self._buf[:cb]))
            del self._buf[:cb]
            self._nchunks += 1

    def finish(self) -> bytes:
        if self._done:
            raise InvalidArgument("blob writer already finished")
        self._done = True
        h = self._h.digest()
        if self._nchunks and self._buf:
            self._store._append_chunk(self._stream, self._nchunks, bytes(self._buf))
            self._nchunks += 1
            self._buf.clear()
        self._txn._blobs[h] = NewBlob(h, self._size, bytes(self._buf), self._nchunks, self._stream)
        if not self._nchunks:
            self._store._open_streams.discard(self._stream)
        return h


class Transaction:
    """Collects operations; `commit` (via `with`/`async with`) validates, encodes and makes them
    durable and visible as one unit, or raises and changes nothing visible.

    Errors about the request (NotFound, AlreadyExists, InvalidArgument) are raised at commit,
    before anything is written."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._ops: list[Op] = []
        self._blobs: dict[bytes, NewBlob] = {}
        self._meta: list[fmt.MimeMeta] = []
        self._writers: list[bytes] = []
        self.committed_lsn = 0
        self._finished = False

    # -- blobs ---------------------------------------------------------------------------------

    def put_blob(self, data: bytes) -> bytes:
        """Add a body; returns its hash. Stored once however often it is delivered."""
        h = blob_hash(data)
        if h not in self._blobs:
            if len(data) > self._store.options.chunk_bytes:
                w = self.blob_writer()
                w.write(data)
                return w.finish()
            self._blobs[h] = NewBlob(h, len(data), bytes(data), 0, b"")
        return h

    def blob_writer(self) -> BlobWriter:
        w = BlobWriter(self)
        self._store._open_streams.add(w._stream)
        self._writers.append(w._stream)
        return w

    def put_mime_meta(self, blob: bytes, version: int, data: bytes) -> None:
        self._meta.append(fmt.MimeMeta(blob, version, data))

    # -- messages ------------------------------------------------------------------------------

    def deliver(
        self,
        blob: bytes,
        mailboxes: Sequence[bytes],
        *,
        flags: int = 0,
        keywords: Sequence[str] = (),
        internaldate_ms: int | None = None,
        msg_guid: bytes | None = None,
    ) -> Delivery:
        """Deliver blob `blob` into each mailbox (one record, one stored body).

        `msg_guid` keeps a message's GUID (its POP3 UIDL) when it is delivered again, e.g. by
        the split-brain merge; it needs exactly one mailbox (by default each mailbox entry
        gets a new GUID)."""
        if not mailboxes:
            raise InvalidArgument("a delivery needs at least one mailbox")
        if len(set(mailboxes)) != len(mailboxes):
            raise InvalidArgument("a mailbox is named twice in one delivery")
        if msg_guid is not None and (len(msg_guid) != fmt.GUID_LEN or len(mailboxes) != 1):
            raise InvalidArgument("a kept message GUID is 16 bytes, for one mailbox")
        d = Delivery()
        self._ops.append(
            OpDeliver(
                blob,
                tuple(mailboxes),
                flags & 0xFF,
                tuple(keywords),
                internaldate_ms,
                d,
                None if msg_guid is None else bytes(msg_guid),
            )
        )
        return d

    def reserve(self, mailbox: bytes, *, uidnext: int = 0, highestmodseq: int = 0) -> None:
        """Allocation floors for `mailbox`: UIDs given after this operation (in this
        transaction and later ones) are >= `uidnext`, MODSEQs are > `highestmodseq`. Never
        lowers a counter. The floors are logged (a RESERVE record, only if they raise
        something), so they persist across a restart even when nothing is delivered."""
        if not 0 <= uidnext <= 0xFFFFFFFF:
            raise InvalidArgument("uidnext out of range")
        if not 0 <= highestmodseq < 1 << 63:
            raise InvalidArgument("highestmodseq out of range")
        self._ops.append(OpReserve(mailbox, uidnext, highestmodseq))

    def store_flags(
        self,
        mailbox: bytes,
        uids: Sequence[int],
        *,
        add: int = 0,
        remove: int = 0,
        add_keywords: Sequence[str] = (),
        remove_keywords: Sequence[str] = (),
        unchanged_since: int | None = None,
    ) -> Change:
        """Add and remove flags/keywords of `uids` (UIDs that do not exist are ignored).

        With `unchanged_since` (CONDSTORE), messages whose MODSEQ is above it are left alone and
        listed in `Change.modified`; the check is made when the transaction is encoded, so no
        concurrent change slips between check and write (a pending change of the same mailbox
        makes the commit raise `Conflict`: settle and retry)."""
        c = Change()
        self._ops.append(
            OpFlags(
                mailbox,
                tuple(uids),
                add & 0xFF,
                remove & 0xFF,
                tuple(add_keywords),
                tuple(remove_keywords),
                c,
                unchanged_since,
            )
        )
        return c

    def expunge(self, mailbox: bytes, uids: Sequence[int]) -> Change:
        c = Change()
        self._ops.append(OpExpunge(mailbox, tuple(uids), c))
        return c

    # -- mailboxes -----------------------------------------------------------------------------

    def create_mailbox(self, account: bytes, name: str, special_use: int = 0) -> bytes:
        g = new_guid()
        self._ops.append(OpMailboxCreate(account, check_mailbox_name(name), special_use, g))
        return g

    def rename_mailbox(self, mailbox: bytes, new_name: str) -> None:
        self._ops.append(OpMailboxRename(mailbox, check_mailbox_name(new_name)))

    def delete_mailbox(self, mailbox: bytes) -> None:
        self._ops.append(OpMailboxDelete(mailbox))

    def subscribe(self, account: bytes, name: str, subscribed: bool = True) -> None:
        self._ops.append(OpSubscribe(account, check_mailbox_name(name), subscribed))

    # -- accounts, domains, aliases ------------------------------------------------------------

    def add_domain(self, name: str) -> None:
        self._ops.append(OpDomainAdd(normalize_domain(name)))

    def remove_domain(self, name: str) -> None:
        self._ops.append(OpDomainRemove(normalize_domain(name)))

    def add_account(self, address: str, password_hash: str, quota_bytes: int = 0) -> bytes:
        """Create an account with INBOX, Sent, Drafts, Trash, Junk, Archive (subscribed)."""
        if quota_bytes < 0:
            raise InvalidArgument("quota must be >= 0")
        g = new_guid()
        boxes = tuple(new_guid() for _ in DEFAULT_MAILBOXES)
        self._ops.append(
            OpAccountAdd(normalize_address(address), password_hash, quota_bytes, g, boxes)
        )
        return g

    def update_account(
        self, address: str, *, password_hash: str | None = None, quota_bytes: int | None = None
    ) -> None:
        if quota_bytes is not None and quota_bytes < 0:
            raise InvalidArgument("quota must be >= 0")
        self._ops.append(OpAccountUpdate(normalize_address(address), password_hash, quota_bytes))

    def delete_account(self, address: str) -> None:
        self._ops.append(OpAccountDelete(normalize_address(address)))

    def set_alias(self, source: str, targets: Sequence[str]) -> None:
        """`source` is an address or `@domain` (catch-all); targets are addresses."""
        if source.startswith("@"):
            src = "@" + normalize_domain(source[1:])
        else:
            src = normalize_address(source)
        tg = tuple(dict.fromkeys(normalize_address(t) for t in targets))
        if not tg:
            raise InvalidArgument("an alias needs at least one target")
        self._ops.append(OpAliasSet(src, tg))

    def remove_alias(self, source: str) -> None:
        src = source.strip().lower()
        self._ops.append(OpAliasRemove(src))

    # -- queue ---------------------------------------------------------------------------------

    def queue_add(
        self, blob: bytes, sender: str, recipients: Sequence[str], params: str = ""
    ) -> bytes:
        if not recipients:
            raise InvalidArgument("a queue entry needs recipients")
        g = new_guid()
        self._ops.append(OpQueueAdd(g, blob, sender, tuple(recipients), params))
        return g

    def queue_attempt(self, entry: bytes, term: int, recipients: Sequence[str]) -> None:
        self._ops.append(OpQueueAttempt(entry, term, tuple(recipients)))

    def queue_done(
        self,
        entry: bytes,
        recipient: str,
        result: fmt.QueueResult,
        detail: str = "",
        next_ms: int = 0,
        *,
        warned: bool = False,
    ) -> None:
        """Record `result` for `recipient` of queue entry `entry`. `warned`: the entry's delay
        warning has been sent (sets `QueueEntry.warned`, which stays set)."""
        self._ops.append(OpQueueDone(entry, recipient, result, detail, next_ms, warned))

    @property
    def exclusive(self) -> bool:
        """True if an operation changes structure (accounts, mailboxes…): see the module doc."""
        return any(isinstance(op, STRUCTURAL) for op in self._ops)

    # -- commit --------------------------------------------------------------------------------

    def commit(self) -> int:
        """Commit synchronously: returns the LSN once durable and visible."""
        if self._finished:
            raise InvalidArgument("transaction already finished")
        self._finished = True
        try:
            return self._store._commit_sync(self)
        finally:
            self._release_streams()

    async def commit_async(self) -> int:
        """Commit with group commit: returns the LSN once durable (barrier passed) and visible."""
        if self._finished:
            raise InvalidArgument("transaction already finished")
        self._finished = True
        try:
            return await self._store._commit_async(self)
        finally:
            self._release_streams()

    def _release_streams(self) -> None:
        """Committed or refused, this transaction streams no more: its chunks are either
        committed or orphans that compaction may reclaim."""
        for b in self._blobs.values():
            self._store._open_streams.discard(b.stream)
        for w in self._writers:
            self._store._open_streams.discard(w)

    def abort(self) -> None:
        self._finished = True
        self._release_streams()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is None:
            self.commit()
        else:
            self.abort()

    async def __aenter__(self) -> Transaction:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is None:
            await self.commit_async()
        else:
            self.abort()


# --- the store ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    lsn: int
    header: fmt.FrameHeader
    payload: bytes | memoryview  # an ingested frame's: a view of the frame (no copy)
    segno: int
    payload_off: int
    blobs: tuple[bytes, ...]
    size: int
    records: Sequence[fmt.Record] | None  # our own frames: spares decoding at apply


@dataclass(slots=True)
class _Overlay:
    """Effects of earlier operations of the same transaction, for validating later ones."""

    accounts: dict[str, bytes] = field(default_factory=dict)
    deleted_accounts: set[bytes] = field(default_factory=set)
    names: dict[bytes, dict[str, bytes | None]] = field(default_factory=dict)
    new_mailboxes: dict[bytes, tuple[bytes, str]] = field(default_factory=dict)
    deleted_mailboxes: set[bytes] = field(default_factory=set)
    domains: dict[str, bool] = field(default_factory=dict)
    uidvalidity: dict[bytes, int] = field(default_factory=dict)


_CKPT_HEAD = struct.Struct("<8sHI")  # magic, version, crc32c of the rest
_CKPT_POS = struct.Struct("<QQIQI")  # lsn, generation, segno, offset, nsegs
_CKPT_SEG = struct.Struct("<IHQ")  # segno, rewrites, size at checkpoint time (sealed) or 0
_CKPT_GEN = struct.Struct("<QQ16s")  # generation, first LSN, writer node (version 2)

GenEntry = tuple[int, int, bytes]
"""One entry of the generation history: (generation, first LSN, writer node)."""


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """A parsed checkpoint file: the LSN it covers, the log position after it, the segments it
    relies on (segno, rewrite counter) and the serialized index."""

    lsn: int
    segno: int
    offset: int
    segments: tuple[tuple[int, int], ...]
    body: bytes
    history: tuple[GenEntry, ...] = ()


def parse_checkpoint(data: bytes) -> CheckpointInfo:
    """Verify and split a checkpoint file. Raises FormatError (also for a checkpoint of an
    older version: it is simply not used, open replays the log instead)."""
    if len(data) < _CKPT_HEAD.size + _CKPT_POS.size:
        raise fmt.FormatError("checkpoint truncated")
    magic, ver, crc = _CKPT_HEAD.unpack_from(data)
    if magic != fmt.CHECKPOINT_MAGIC or ver != CHECKPOINT_VERSION:
        raise fmt.FormatError("not a checkpoint of this format version")
    rest = data[_CKPT_HEAD.size :]
    if fmt.crc32c(rest) != crc:
        raise fmt.FormatError("checkpoint checksum mismatch")
    lsn, _gen, segno, off, nsegs = _CKPT_POS.unpack_from(rest)
    p = _CKPT_POS.size
    if p + nsegs * _CKPT_SEG.size > len(rest):
        raise fmt.FormatError("checkpoint truncated")
    segs = []
    for _ in range(nsegs):
        s, rewrites, _size = _CKPT_SEG.unpack_from(rest, p)
        p += _CKPT_SEG.size
        segs.append((s, rewrites))
    if p + 4 > len(rest):
        raise fmt.FormatError("checkpoint truncated")
    (nhist,) = struct.unpack_from("<I", rest, p)
    p += 4
    if p + nhist * _CKPT_GEN.size > len(rest):
        raise fmt.FormatError("checkpoint truncated")
    hist: list[GenEntry] = []
    for _ in range(nhist):
        g, first, node = _CKPT_GEN.unpack_from(rest, p)
        p += _CKPT_GEN.size
        if hist and first <= hist[-1][1]:
            raise fmt.FormatError("checkpoint generation history out of order")
        hist.append((g, first, node))
    return CheckpointInfo(lsn, segno, off, tuple(segs), rest[p:], tuple(hist))


# --- replication files: the quarantine, the cut intent, the generation ---------------------------

QUARANTINE_MAGIC = b"MHQUAR\r\n"
QUARANTINE_VERSION = 1
_QUAR_HEAD = struct.Struct("<8sHQQQIQ16sqI")
# magic, version, after LSN, first LSN cut, last LSN cut, frame count, frame bytes, node id,
# created ms, CRC32C of the preceding bytes; then the frames verbatim.

_CUT_MAGIC = b"MHCUT\r\n\x1a"
_CUT_VERSION = 1
_CUT_HEAD = struct.Struct("<8sHQIQIQH")
# magic, version, after LSN, cut segment, cut offset, last segment, last LSN, path length;
# then the quarantine path (UTF-8) and a CRC32C of everything before it.

_GEN_MAGIC = b"MHGEN\r\n\x1a"
_GEN_FILE = struct.Struct("<8sQI")  # magic, generation, CRC32C of the preceding bytes


_DAMAGE_MAGIC = b"MHDMG\r\n\x1a"
_DAMAGE_VERSION = 1
_DAMAGE_HEAD = struct.Struct("<8sHQIQQqH")
# magic, version, after LSN, segment, offset, bytes kept, found ms, path length; then the path
# of the kept bytes (UTF-8) and a CRC32C of everything before it.


def _pack_marker(head: struct.Struct, fields: tuple[object, ...], path: str) -> bytes:
    """A marker file (cut intent, damage marker): ``head`` packed from ``fields`` (magic and
    version first) and the path's length, the path in UTF-8, a CRC32C of all before it."""
    raw = path.encode("utf-8")
    body = head.pack(*fields, len(raw)) + raw
    return body + struct.pack("<I", fmt.crc32c(body))


def _unpack_marker(
    data: bytes, head: struct.Struct, magic: bytes, version: int, what: str, path_errors: str
) -> tuple[tuple[int, ...], str]:
    """The fields of a :func:`_pack_marker` file between version and path length, and the path
    (decoded with ``path_errors``). Raises FormatError naming ``what`` when the file is
    truncated, of another magic or version, of the wrong length or fails its checksum."""
    if len(data) < head.size + 4:
        raise fmt.FormatError(f"{what} truncated")
    got_magic, got_version, *fields, plen = head.unpack_from(data)
    if got_magic != magic or got_version != version:
        raise fmt.FormatError(f"not a {what} of this version")
    if len(data) != head.size + plen + 4:
        raise fmt.FormatError(f"{what} has the wrong length")
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if fmt.crc32c(data[:-4]) != crc:
        raise fmt.FormatError(f"{what} checksum mismatch")
    try:
        path = data[head.size : head.size + plen].decode("utf-8", path_errors)
    except UnicodeDecodeError:
        raise fmt.FormatError(f"{what} path is not UTF-8") from None
    return tuple(fields), path


@dataclass(frozen=True, slots=True)
class DamageReport:
    """A damaged frame found at open was cut away with everything after it (`Store.open(...,
    damaged_tail_dir=...)`): the log now ends at `after_lsn` and LSNs above it may be missing
    here until they are fetched again (the replication layer: from the peer). Persisted in
    `<data>/DAMAGED` until `Store.clear_damage()`."""

    after_lsn: int  # the last intact LSN before the damage: the log was cut after it
    segno: int  # where the damage was found
    offset: int
    bytes_kept: int  # raw bytes from the damage to the end of the log, copied to `kept_in`
    found_ms: int
    kept_in: str
    reason: str = ""

    def encode(self) -> bytes:
        fields = (self.after_lsn, self.segno, self.offset, self.bytes_kept, self.found_ms)
        return _pack_marker(_DAMAGE_HEAD, (_DAMAGE_MAGIC, _DAMAGE_VERSION, *fields), self.kept_in)

    @classmethod
    def decode(cls, data: bytes) -> DamageReport:
        (after, segno, off, kept, found), path = _unpack_marker(
            data, _DAMAGE_HEAD, _DAMAGE_MAGIC, _DAMAGE_VERSION, "damage marker", "replace"
        )
        return cls(after, segno, off, kept, found, path)


class _DamageFound(Exception):
    """Raised inside `_recover` (only with a damaged-tail directory) at a bad frame that valid
    data follows; `Store.open` cuts the log there and recovers again."""

    def __init__(self, segno: int, offset: int, lsn: int, reason: str) -> None:
        super().__init__(f"segment {segno} offset {offset} (LSN {lsn}): {reason}")
        self.segno = segno
        self.offset = offset
        self.lsn = lsn
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CutReport:
    """What `Store.cut_tail` did."""

    after_lsn: int  # the log now ends here (may be below the requested LSN: see holes)
    first_lsn: int  # first LSN cut
    last_lsn: int  # last LSN cut (the log's end before the cut)
    frames: int
    bytes: int
    quarantine_path: str
    checkpoints_dropped: int


@dataclass(frozen=True, slots=True)
class QuarantineFile:
    """A parsed quarantine file (see `read_quarantine`)."""

    after_lsn: int
    first_lsn: int
    last_lsn: int
    node_id: bytes
    created_ms: int
    frames: tuple[bytes, ...]


def read_quarantine(data: bytes) -> QuarantineFile:
    """Parse and verify a quarantine file's bytes: header CRC, frame count and size, every frame's
    CRCs, consecutive LSNs. Raises FormatError if anything is missing or damaged."""
    if len(data) < _QUAR_HEAD.size:
        raise fmt.FormatError("quarantine file truncated")
    magic, ver, after, first, last, n, nbytes, node, created, crc = _QUAR_HEAD.unpack_from(data)
    if magic != QUARANTINE_MAGIC or ver != QUARANTINE_VERSION:
        raise fmt.FormatError("not a quarantine file of this version")
    if fmt.crc32c(data[: _QUAR_HEAD.size - 4]) != crc:
        raise fmt.FormatError("quarantine header checksum mismatch")
    if len(data) != _QUAR_HEAD.size + nbytes:
        raise fmt.FormatError(
            f"quarantine file holds {len(data) - _QUAR_HEAD.size} frame bytes, expected {nbytes}"
        )
    frames = []
    off = _QUAR_HEAD.size
    lsn = first
    for _ in range(n):
        hdr = fmt.decode_frame_header(data[off : off + fmt.FRAME_HEADER_SIZE])
        end = off + fmt.FRAME_HEADER_SIZE + hdr.payload_len
        payload = data[off + fmt.FRAME_HEADER_SIZE : end]
        if end > len(data) or fmt.crc32c(payload) != hdr.payload_crc:
            raise fmt.FormatError(f"quarantined frame LSN {hdr.lsn} is damaged")
        if hdr.lsn != lsn:
            raise fmt.FormatError(f"quarantined frame LSN {hdr.lsn}, expected {lsn}")
        lsn += _lsn_count(hdr, payload)
        frames.append(data[off:end])
        off = end
    if off != len(data) or lsn != last + 1:
        raise fmt.FormatError("quarantine file frames do not match its header")
    return QuarantineFile(after, first, last, node, created, tuple(frames))


def _lsn_count(hdr: fmt.FrameHeader, payload: bytes) -> int:
    if hdr.kind == fmt.FrameKind.HOLE:
        recs = fmt.decode_records(payload)
        if recs and isinstance(recs[0], fmt.Hole):
            return max(1, recs[0].count)
    return 1


@dataclass(frozen=True, slots=True)
class _CutIntent:
    after_lsn: int
    segno: int  # the segment truncated at `offset`; later segments are removed
    offset: int
    last_segno: int
    last_lsn: int
    quarantine_path: str

    def encode(self) -> bytes:
        fields = (self.after_lsn, self.segno, self.offset, self.last_segno, self.last_lsn)
        return _pack_marker(_CUT_HEAD, (_CUT_MAGIC, _CUT_VERSION, *fields), self.quarantine_path)

    @classmethod
    def decode(cls, data: bytes) -> _CutIntent:
        (after, segno, off, last_seg, last), path = _unpack_marker(
            data, _CUT_HEAD, _CUT_MAGIC, _CUT_VERSION, "cut intent", "strict"
        )
        return cls(after, segno, off, last_seg, last, path)


class SnapshotExport:
    """A consistent snapshot (`Store.export_snapshot`): `files` lists (name, size) to send in
    order — the segments, then the checkpoint; `read(i, offset, n)` reads file `i`."""

    def __init__(
        self, lsn: int, files: list[tuple[str, int, ReadableFile | None]], checkpoint: bytes
    ) -> None:
        self.lsn = lsn
        self._files = files
        self._checkpoint = checkpoint
        self.files = [(n, size) for n, size, _ in files]
        self.total_bytes = sum(size for _, size in self.files)

    def read(self, i: int, offset: int, n: int) -> bytes:
        _, size, f = self._files[i]
        n = max(0, min(n, size - offset))
        if f is None:
            return self._checkpoint[offset : offset + n]
        return f.pread(n, offset)

    def close(self) -> None:
        for _, _, f in self._files:
            if f is not None:
                f.close()


_SNAPSHOT_NAME_RE = re.compile(r"^(segment-[0-9]{8}\.log|checkpoint-[0-9]{20}\.ckpt)$")


def _snapshot_name_ok(name: str) -> bool:
    return bool(_SNAPSHOT_NAME_RE.match(name))


def _checkpoint_name_lsn(name: str) -> int | None:
    m = re.fullmatch(r"checkpoint-(\d+)\.ckpt", name)
    return int(m.group(1)) if m else None


def _digest_frame(h: hashlib.blake2b, hdr: fmt.FrameHeader, payload: bytes) -> None:
    """Feed one frame's logical content to `h` (see docs/store.md, "Logical digest")."""
    if hdr.kind == fmt.FrameKind.HOLE:
        # Generation, writer, time and reason of a hole are node-local: only the LSNs count.
        h.update(struct.pack("<QBQ", hdr.lsn, hdr.kind, _lsn_count(hdr, payload)))
        return
    h.update(
        struct.pack(
            "<QBQ16sqH", hdr.lsn, hdr.kind, hdr.generation, hdr.node_id, hdr.time_ms, hdr.nrecords
        )
    )
    for typ, off, ln in fmt.iter_record_spans(payload):
        body = payload[off : off + ln]
        if typ == fmt.RecordType.RECLAIMED:
            rec = fmt.decode_record(typ, body)
            assert isinstance(rec, fmt.Reclaimed)
            part = rec.head + struct.pack("<Q", rec.data_len)
            typ = rec.original
        elif typ in fmt.DATA_HEAD_LEN and not (
            typ == fmt.RecordType.BLOB and int.from_bytes(body[40:44], "little") > 0
        ):
            # Bulk data: its head (hash or stream id and index) and its length, never the data,
            # which compaction may reclaim (content is covered by the blob hash).
            head_len = fmt.DATA_HEAD_LEN[fmt.RecordType(typ)]
            part = bytes(body[:head_len]) + struct.pack("<Q", ln - head_len)
        else:
            # Canonical re-encoding: compaction re-encodes the records it keeps.
            part = fmt.encode_records([fmt.decode_record(typ, body)])[fmt.RECORD_HEADER_SIZE :]
        h.update(struct.pack("<BI", typ, len(part)))
        h.update(part)


class Store:
    """See the module docstring. Not thread-safe: one thread (normally the event loop's) owns
    it; only fsync runs in a worker thread."""

    def __init__(
        self, data_dir: str, *, node_id: bytes, options: StoreOptions, fs: FileSystem
    ) -> None:
        self.data_dir = data_dir
        self.node_id = node_id
        self.options = options
        self.fs = fs
        self.state = StoreState.CLOSED
        self.error = ""
        self.generation = 1
        self.index = ix.Index()
        self.recovery: RecoveryReport | None = None
        self.barrier: DurabilityBarrier | None = None
        self.frozen_reason = ""  # non-empty: local writes refused (`freeze_writes`)
        self._staging: dict[str, WritableFile] | None = None  # a snapshot being received
        self._logdir = os.path.join(data_dir, LOG_DIR)
        self._ckptdir = os.path.join(data_dir, CHECKPOINT_DIR)
        self._repldir = os.path.join(data_dir, REPL_DIR)
        self.retain_from = NO_RETENTION
        """Compaction never reclaims data of frames with LSN >= retain_from (the replication
        layer sets it to the first LSN its peer has not acknowledged)."""
        self._gen_history: list[GenEntry] = []
        self._last_txn_gen = 0  # generation of the last appended transaction frame
        self.last_cut: CutReport | None = None
        self.damage: DamageReport | None = None
        """Set while `<data>/DAMAGED` exists: a damaged range was cut away at an open and not
        fetched again yet (see `Store.open`'s `damaged_tail_dir`, `clear_damage`)."""
        self._damaged_tail_dir: str | None = None
        self._lock_fd = -1
        self._segments: dict[int, fmt.SegmentHeader] = {}
        self._active: WritableFile | None = None
        self._active_size = 0  # its size including queued (deferred) writes
        # Deferred writes (ingest): queued on the flusher's one worker thread, in order with
        # its fsyncs; see `_queue_writes`.
        self._batch: list[bytes] = []
        self._write_jobs: list[Future[None]] = []
        self._write_error: OSError | None = None
        self._active_segno = 0
        self._readers: dict[int, ReadableFile] = {}
        self._next_lsn = 1
        self._pending: deque[_Pending] = deque()
        self._unsynced: list[WritableFile] = []
        self._inflight: list[WritableFile] = []
        self._durable_lsn = 0
        self._applied_pos = (0, 0)
        self._written_blobs: dict[bytes, int] = {}
        self._alloc_uid: dict[bytes, int] = {}
        self._alloc_modseq: dict[bytes, int] = {}
        self._open_streams: set[bytes] = set()
        self._exclusive_lsn = 0
        self._exclusive_waiting = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._settle_waiters: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._acker: asyncio.Task[None] | None = None
        self._ack_target = 0  # highest fsynced LSN handed to the ack stage
        self._executor: ThreadPoolExecutor | None = None
        self._frame_listeners: list[Callable[[int, bytes], None]] = []
        self._commit_listeners: list[Callable[[CommitEvent], None]] = []
        self._durable_listeners: list[Callable[[int], None]] = []
        self._cache = _Cache(options.cache_bytes)
        self._bytes_since_ckpt = 0
        self.stats_commits = 0
        self.stats_fsyncs = 0
        self.stats_frames = 0
        self._thread = threading.get_ident()

    # -- open / close --------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        data_dir: str,
        *,
        node_id: bytes,
        options: StoreOptions | None = None,
        fs: FileSystem | None = None,
        damaged_tail_dir: str | None = None,
    ) -> Store:
        """Lock the directory, load the newest valid checkpoint, replay the log after it.
        A torn final transaction is dropped (truncated) and reported in `store.recovery`;
        a bad frame followed by valid ones raises CorruptLog — unless `damaged_tail_dir` is
        given (a replicated node, whose peer holds the range): then the log is cut at the bad
        frame, the raw bytes from it to the end are kept in a new directory under
        `damaged_tail_dir`, `<data>/DAMAGED` records it (durably, before the cut) and
        `store.damage` reports it until `clear_damage()`."""
        opts = options or StoreOptions()
        st = cls(data_dir, node_id=node_id, options=opts, fs=fs or OsFileSystem(sync=opts.sync))
        st._damaged_tail_dir = damaged_tail_dir
        st._lock()
        try:
            for _ in range(8):  # each pass cuts below the previous one; one is the rule
                try:
                    st._recover()
                    break
                except _DamageFound as d:
                    st._cut_damage(d)
            else:
                raise CorruptLog("the log could not be cut back to an intact prefix")
        except BaseException:
            st._close_files()
            st._unlock()
            raise
        st.state = StoreState.OPEN
        return st

    def _lock(self) -> None:
        self._makedirs_durable(self.data_dir)
        self._lock_fd = lock_data_dir(self.data_dir)

    def _makedirs_durable(self, path: str) -> None:
        """Create `path` (and missing parents) so that it survives a power cut: a new
        directory's entry is durable only after an fsync of its parent."""
        path = os.path.abspath(path)
        missing = []
        p = path
        while not self.fs.exists(p):
            missing.append(p)
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
        if not missing:
            return
        self.fs.makedirs(path)
        for d in reversed(missing):
            self.fs.sync_dir(os.path.dirname(d))

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def close(self) -> None:
        """Flush pending commits, write a checkpoint, release files and the lock."""
        if self.state == StoreState.CLOSED:
            return
        try:
            if self.state == StoreState.OPEN:
                self._settle_sync()
                if self._bytes_since_ckpt:
                    self.checkpoint()
        finally:
            self.state = StoreState.CLOSED
            for f in self._unsynced:
                with contextlib.suppress(OSError):
                    f.close()
            if self._active is not None:
                with contextlib.suppress(OSError):
                    self._active.close()
            for r in self._readers.values():
                r.close()
            self._readers.clear()
            if self._executor is not None:
                self._executor.shutdown(wait=False)
            self._unlock()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *a: object) -> None:
        self.close()

    # -- recovery ------------------------------------------------------------------------------

    def _recover(self) -> None:
        t0 = time.monotonic()
        self._makedirs_durable(self._logdir)
        self._makedirs_durable(self._ckptdir)
        for name in self.fs.listdir(self._ckptdir):
            if not name.endswith(".ckpt"):  # a temporary file of an interrupted checkpoint
                self.fs.unlink(os.path.join(self._ckptdir, name))
        for name in self.fs.listdir(self._logdir):
            if name.startswith((CUT_INTENT + ".tmp", "." + CUT_INTENT + ".tmp")):
                self.fs.unlink(os.path.join(self._logdir, name))  # an unfinished intent write
        if self.fs.exists(self._repldir):
            for name in self.fs.listdir(self._repldir):
                if name not in (REPL_META, GENERATION_FILE) and ".tmp" in name:
                    self.fs.unlink(os.path.join(self._repldir, name))
        # Before anything reads segments or checkpoints: finish an install, then a cut, that a
        # crash interrupted.
        installing = self._read_install_intent()
        if installing is not None:
            log.warning("finishing an interrupted snapshot install")
            self._apply_install(installing)
        cut_redone = ""
        intent = self._read_cut_intent()
        if intent is not None:
            cut_redone = (
                f"finished an interrupted cut after LSN {intent.after_lsn} "
                f"(tail up to LSN {intent.last_lsn} is in {intent.quarantine_path})"
            )
            log.warning("%s", cut_redone)
            self._apply_cut(intent)
        segnos = list_segments(self.fs, self._logdir)
        torn: TornTail | None = None
        # A last segment whose header never became durable is an interrupted roll (a segment
        # gets frames only after its header and directory entry are fsynced): remove it —
        # unless valid frames follow, which is damage, not a crash.
        while segnos:
            last = segnos[-1]
            try:
                self._segments[last] = self._read_seg_header(last)
                break
            except fmt.FormatError:
                if self._has_valid_frame(last):
                    raise CorruptLog(
                        f"segment {last}: unreadable header with valid frames after it — "
                        "run `mailharbor store fsck`"
                    ) from None
                torn = TornTail(last, 0, self._segment_size(last), "incomplete segment header")
                self.fs.unlink(segment_path(self._logdir, last))
                self.fs.sync_dir(self._logdir)
                segnos.pop()
        for s in segnos[:-1]:
            try:
                self._segments[s] = self._read_seg_header(s)
            except fmt.FormatError as e:
                raise CorruptLog(f"segment {s}: {e}") from None
        if segnos and segnos != list(range(segnos[0], segnos[-1] + 1)):
            raise CorruptLog(f"missing segment files between {segnos[0]} and {segnos[-1]}")

        index, pos, rejected, hist = self._load_checkpoint(segnos)
        if pos is None and segnos and self._segments[segnos[0]].first_lsn > 1:
            raise CorruptLog(
                f"the log starts at LSN {self._segments[segnos[0]].first_lsn} (its head was "
                f"dropped or it came from a snapshot) and no checkpoint covers it ({rejected}); "
                "move the data directory aside and let the node fetch a full sync from its peer"
            )
        self.index = index
        self._gen_history = list(hist)
        ckpt_lsn = index.last_lsn
        replayed = 0
        if not segnos:
            self._new_segment(1, 1)
            self._applied_pos = (1, fmt.SEGMENT_HEADER_SIZE)
        else:
            segno, off = pos if pos else (segnos[0], fmt.SEGMENT_HEADER_SIZE)
            expected = index.last_lsn + 1 if pos else self._segments[segnos[0]].first_lsn
            if not pos:
                index.last_lsn = expected - 1
            self._applied_pos = (segno, off)
            for s in range(segno, segnos[-1] + 1):
                start = off if s == segno else fmt.SEGMENT_HEADER_SIZE
                if s != segno and self._segments[s].first_lsn != expected:
                    raise CorruptLog(
                        f"segment {s} starts at LSN {self._segments[s].first_lsn}, "
                        f"expected {expected}"
                    )
                frames, stops = scan_segment(
                    self.fs, segment_path(self._logdir, s), s, start, expected
                )
                for fr in frames:
                    self.index.apply_frame(fr.header, fr.payload, s, fr.payload_offset)
                    self._note_generation(fr.header)
                    expected += fr.lsn_count
                    self._applied_pos = (s, fr.end)
                    replayed += 1
                if stops:
                    stop = stops[0]
                    if stop.torn and s == segnos[-1]:
                        size = self._segment_size(s)
                        torn = TornTail(s, stop.offset, size - stop.offset, stop.reason)
                        log.warning(
                            "dropping torn final transaction: segment %d offset %d (%d bytes): %s",
                            s,
                            stop.offset,
                            size - stop.offset,
                            stop.reason,
                        )
                        self.fs.truncate(segment_path(self._logdir, s), stop.offset)
                    elif self._damaged_tail_dir is not None:
                        raise _DamageFound(s, stop.offset, stop.expected_lsn, stop.reason)
                    else:
                        raise CorruptLog(
                            f"segment {s} offset {stop.offset} (LSN {stop.expected_lsn}): "
                            f"{stop.reason}; valid data follows — run `mailharbor store fsck`"
                        )
            last = segnos[-1]
            self._active = self.fs.open_append(segment_path(self._logdir, last))
            self._active_size = self._active.size()
            self._active_segno = last
        self._next_lsn = self.index.last_lsn + 1
        self._durable_lsn = self.index.last_lsn
        self.generation = max(1, self.index.generation, self._read_generation_file())
        self._last_txn_gen = self._gen_history[-1][0] if self._gen_history else 0
        self.recovery = RecoveryReport(
            ckpt_lsn,
            replayed,
            self.index.last_lsn,
            torn,
            rejected,
            time.monotonic() - t0,
            cut_redone,
        )
        self._bytes_since_ckpt = 1 if replayed else 0
        self.damage = self._read_damage_marker()

    # -- a damaged range found at open (replicated nodes) ----------------------------------------

    def _read_damage_marker(self) -> DamageReport | None:
        path = os.path.join(self.data_dir, DAMAGE_MARKER)
        if not self.fs.exists(path):
            return None
        try:
            return DamageReport.decode(self._read_file(path))
        except fmt.FormatError as e:
            # Keep the conservative meaning: something was cut, from an unknown LSN.
            log.error("%s: %s; treating the log as damaged after LSN 0", path, e)
            return DamageReport(0, 0, 0, 0, 0, "", f"unreadable marker: {e}")

    def _cut_damage(self, d: _DamageFound) -> None:
        """Cut the log at the damaged frame `d` (found by `_recover`): copy the raw bytes from
        it to the end of the log into a new directory under `damaged_tail_dir` (fsynced), write
        `<data>/DAMAGED` (atomically; an older marker's lower LSN is kept), then cut through
        the ordinary cut intent and forget the loaded state (the caller recovers again). A
        crash anywhere: the next open finds the damage again or finishes the cut."""
        assert self._damaged_tail_dir is not None
        after = d.lsn - 1
        found = now_ms()
        kept_in = os.path.abspath(
            os.path.join(self._damaged_tail_dir, f"damaged-{found}-after-{after}")
        )
        log.error(
            "damaged frame in the log: segment %d offset %d (LSN %d): %s; cutting the log after "
            "LSN %d (the raw bytes from there on are kept in %s); the range is to be fetched "
            "from the replication peer",
            d.segno,
            d.offset,
            d.lsn,
            d.reason,
            after,
            kept_in,
        )
        self._makedirs_durable(kept_in)
        kept = 0
        segnos = [s for s in list_segments(self.fs, self._logdir) if s >= d.segno]
        for s in segnos:
            start = d.offset if s == d.segno else 0
            src = self.fs.open_read(segment_path(self._logdir, s))
            dst = self.fs.open_append(os.path.join(kept_in, f"{segment_name(s)}.from-{start}"))
            try:
                size, off = src.size(), start
                while off < size:
                    data = src.pread(min(1 << 20, size - off), off)
                    if not data:
                        break
                    dst.write(data)
                    off += len(data)
                    kept += len(data)
                dst.sync()
            finally:
                src.close()
                dst.close()
        self.fs.sync_dir(kept_in)
        old = self._read_damage_marker()
        marker = DamageReport(after, d.segno, d.offset, kept, found, kept_in, d.reason)
        if old is not None and old.after_lsn < after:
            marker = old
        self.fs.write_atomic(os.path.join(self.data_dir, DAMAGE_MARKER), marker.encode())
        intent = _CutIntent(after, d.segno, d.offset, max(segnos), after, kept_in)
        self.fs.write_atomic(os.path.join(self._logdir, CUT_INTENT), intent.encode())
        self._close_files()
        self._apply_cut(intent)
        self._reset_state()

    def clear_damage(self) -> None:
        """The range cut by a damaged open is held again (the replication layer fetched it):
        remove `<data>/DAMAGED` durably."""
        self._check_thread()
        path = os.path.join(self.data_dir, DAMAGE_MARKER)
        if self.fs.exists(path):
            self.fs.unlink(path)
            self.fs.sync_dir(self.data_dir)
        self.damage = None

    def _segment_size(self, segno: int) -> int:
        f = self.fs.open_read(segment_path(self._logdir, segno))
        try:
            return f.size()
        finally:
            f.close()

    def _read_seg_header(self, segno: int) -> fmt.SegmentHeader:
        f = self.fs.open_read(segment_path(self._logdir, segno))
        try:
            h = fmt.SegmentHeader.decode(f.pread(fmt.SEGMENT_HEADER_SIZE, 0))
        finally:
            f.close()
        if h.segno != segno:
            raise fmt.FormatError(f"segment file {segno} says it is segment {h.segno}")
        return h

    def _has_valid_frame(self, segno: int) -> bool:
        f = self.fs.open_read(segment_path(self._logdir, segno))
        try:
            return find_next_valid(f, f.size(), 1, 0) is not None
        finally:
            f.close()

    def _new_segment(self, segno: int, first_lsn: int) -> None:
        """Create the next segment. Its header is fsynced and its directory entry made
        durable before any frame goes into it, and (at a roll) the previous segment is fsynced
        first: so an unsynced tail never spans two segments, and after a power cut only the
        last segment can be torn."""
        hdr = fmt.SegmentHeader(segno, first_lsn, self.node_id, now_ms())
        f = self.fs.open_append(segment_path(self._logdir, segno))
        try:
            f.write(hdr.encode())
            f.sync()
            self.fs.sync_dir(self._logdir)
        except BaseException:
            f.close()
            raise
        self._segments[segno] = hdr
        self._active = f
        self._active_size = f.size()
        self._active_segno = segno

    # -- checkpoints ---------------------------------------------------------------------------

    def _load_checkpoint(
        self, segnos: list[int]
    ) -> tuple[ix.Index, tuple[int, int] | None, str, tuple[GenEntry, ...]]:
        names = sorted(
            (n for n in self.fs.listdir(self._ckptdir) if n.endswith(".ckpt")), reverse=True
        )
        rejected = ""
        for name in names:
            path = os.path.join(self._ckptdir, name)
            try:
                f = self.fs.open_read(path)
                try:
                    data = f.pread(f.size(), 0)
                finally:
                    f.close()
                index, pos, hist = self._decode_checkpoint(data, segnos)
                return index, pos, rejected, hist
            except (fmt.FormatError, OSError) as e:
                rejected += f"{name}: {e}; "
                log.warning("checkpoint %s not used: %s", name, e)
        return ix.Index(), None, rejected, ()

    def _decode_checkpoint(
        self, data: bytes, segnos: list[int]
    ) -> tuple[ix.Index, tuple[int, int], tuple[GenEntry, ...]]:
        ck = parse_checkpoint(data)
        for s, rewrites in ck.segments:
            h = self._segments.get(s)
            if h is None and segnos and s < segnos[0]:
                continue  # dropped by the retention horizon (`drop_head`)
            if h is None or h.rewrites != rewrites:
                raise fmt.FormatError(f"segment {s} changed since the checkpoint")
        if ck.segno not in segnos or ck.offset > self._segment_size(ck.segno):
            raise fmt.FormatError("checkpoint position is beyond the log")
        index = ix.Index.deserialize(ck.body)
        if index.last_lsn != ck.lsn:
            raise fmt.FormatError("checkpoint LSN mismatch")
        if ck.history and ck.history[-1][1] > ck.lsn:
            raise fmt.FormatError("checkpoint generation history beyond its LSN")
        return index, (ck.segno, ck.offset), ck.history

    def _checkpoint_data(self) -> tuple[str, bytes]:
        """The file name and content of a checkpoint of the applied index, as of now."""
        segno, off = self._applied_pos
        body = self.index.serialize()
        segs = [s for s in sorted(self._segments) if s <= segno]
        rest = b"".join(
            [_CKPT_POS.pack(self.index.last_lsn, self.index.generation, segno, off, len(segs))]
            + [_CKPT_SEG.pack(s, self._segments[s].rewrites, 0) for s in segs]
            + [struct.pack("<I", len(self._gen_history))]
            + [_CKPT_GEN.pack(g, first, node) for g, first, node in self._gen_history]
            + [body]
        )
        data = _CKPT_HEAD.pack(fmt.CHECKPOINT_MAGIC, CHECKPOINT_VERSION, fmt.crc32c(rest)) + rest
        return f"checkpoint-{self.index.last_lsn:020d}.ckpt", data

    def checkpoint(self) -> int:
        """Write a node-local checkpoint of the applied index (atomically) and prune old ones.
        Returns its LSN."""
        self._check_thread()
        name, data = self._checkpoint_data()
        try:
            self.fs.write_atomic(os.path.join(self._ckptdir, name), data)
        except OSError as e:  # the log is intact: the store stays open, the caller is told
            raise StoreIOError(f"checkpoint failed: {e.strerror or e}") from None
        olds = sorted(
            (n for n in self.fs.listdir(self._ckptdir) if n.endswith(".ckpt") and n != name),
            reverse=True,
        )
        keep = olds[: CHECKPOINTS_KEPT - 1]
        removed = False
        for n in olds:
            if n not in keep or n > name:
                self.fs.unlink(os.path.join(self._ckptdir, n))
                removed = True
        if removed:
            self.fs.sync_dir(self._ckptdir)
        self._bytes_since_ckpt = 0
        return self.index.last_lsn

    # -- appending -----------------------------------------------------------------------------

    def _check_thread(self) -> None:
        if threading.get_ident() != self._thread:
            raise StoreError("the store is owned by another thread")

    def _check_writable(self) -> None:
        if self.state != StoreState.OPEN:
            raise StoreReadOnly(
                f"store is {self.state.value}" + (f": {self.error}" if self.error else "")
            )

    def _check_not_frozen(self) -> None:
        if self.frozen_reason:
            raise WritesFrozen(f"writes are frozen: {self.frozen_reason}")

    def _append_raw(
        self,
        frame: bytes,
        hdr: fmt.FrameHeader,
        payload: bytes | memoryview,
        blobs: tuple[bytes, ...],
        records: Sequence[fmt.Record] | None = None,
        nlsns: int = 1,
        *,
        defer: bool = False,
    ) -> None:
        """Append one frame. ``defer``: the bytes go to the end of ``_batch`` and are written
        by the flusher's thread (`_queue_writes`, called before control returns to the event
        loop); otherwise they are written here, after every queued write."""
        assert self._active is not None
        if (
            self._active_size + len(frame) > self.options.segment_bytes
            and self._active_size > fmt.SEGMENT_HEADER_SIZE
        ):
            self._settle_writes()
            self._roll()
        off = self._active_size
        if defer:
            self._batch.append(frame)
        else:
            self._settle_writes()
            try:
                self._active.write(frame)
            except OSError as e:
                self._fail(e)
                raise StoreIOError(f"write to the log failed: {e.strerror or e}") from None
        self._active_size += len(frame)
        if not self._unsynced or self._unsynced[-1] is not self._active:
            self._unsynced.append(self._active)
        self._pending.append(
            _Pending(
                hdr.lsn,
                hdr,
                payload,
                self._active_segno,
                off + fmt.FRAME_HEADER_SIZE,
                blobs,
                len(frame),
                records,
            )
        )
        for h in blobs:
            self._written_blobs[h] = hdr.lsn
        self._next_lsn = hdr.lsn + nlsns
        if hdr.kind == fmt.FrameKind.TXN:
            self._last_txn_gen = hdr.generation
        self.stats_frames += 1
        for cb in self._frame_listeners:
            cb(hdr.lsn, frame)

    def _append(self, records: Sequence[fmt.Record], blobs: tuple[bytes, ...] = ()) -> int:
        self._check_writable()
        self._check_not_frozen()
        payload = fmt.encode_records(records)
        if len(payload) > fmt.MAX_FRAME_PAYLOAD:
            raise InvalidArgument(
                f"transaction too large: {len(payload)} bytes (at most {fmt.MAX_FRAME_PAYLOAD})"
            )
        lsn = self._next_lsn
        frame = fmt.encode_frame(
            lsn=lsn,
            generation=self.generation,
            node_id=self.node_id,
            time_ms=now_ms(),
            payload=payload,
            nrecords=len(records),
        )
        hdr = fmt.decode_frame_header(frame)
        self._append_raw(frame, hdr, payload, blobs, records)
        return lsn

    def _append_chunk(self, stream: bytes, idx: int, data: bytes) -> None:
        self._check_thread()
        self._append([fmt.Chunk(stream, idx, data)])

    def _roll(self) -> None:
        old = self._active
        try:
            if old is not None:
                old.sync()  # seal: the previous segment is whole on disk before the next exists
                if old not in self._unsynced and old not in self._inflight:
                    old.close()
                # else: a flush still lists it; it closes the handle after its fsync
        except OSError as e:
            self._fail(e)
            raise StoreIOError(f"fsync of the log failed: {e.strerror or e}") from None
        try:
            self._new_segment(self._active_segno + 1, self._next_lsn)
        except OSError as e:
            self._fail(e)
            raise StoreIOError(
                f"cannot create a log segment (write or fsync failed): {e.strerror or e}"
            ) from None

    def _fail(self, exc: BaseException) -> None:
        """Enter ERROR: fail everything pending; never retry an fsync."""
        if self.state != StoreState.OPEN:
            return
        self.state = StoreState.ERROR
        self.error = f"{type(exc).__name__}: {exc}"
        log.error("store entered ERROR state (read-only until reopened): %s", self.error)
        self._pending.clear()
        err = StoreIOError(f"the log could not be made durable ({self.error})")
        while self._waiters:
            _, fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(err)
        self._wake_settled()

    def _take_unsynced(self) -> list[WritableFile]:
        files, self._unsynced = self._unsynced, []
        return files

    def _sync_files(self, files: list[WritableFile]) -> None:
        """fsync the files (segment creation syncs the directory itself). Runs in a worker
        thread (async) or inline (sync), after every write queued before it (one worker
        thread); a queued write that failed fails this sync. Touches no other state."""
        if self._write_error is not None:
            raise self._write_error
        for f in files:
            f.sync()

    def _queue_writes(self) -> None:
        """Hand ``_batch`` (frames appended with ``defer``, all to the active segment) to the
        flusher's worker thread: written there in order, before any fsync submitted later, so
        the event loop does not wait for the disk (a resync's ingest). A batch of at most
        :data:`INLINE_WRITE_BYTES` with no write queued before it is written at once instead
        (a write error is kept for the next sync alike). Called before control returns to the
        loop, so a flush that takes the file sees its bytes written or queued first."""
        if not self._batch:
            return
        assert self._active is not None
        chunks, self._batch = self._batch, []
        self._write_jobs = [j for j in self._write_jobs if not j.done()]
        if not self._write_jobs and sum(map(len, chunks)) <= INLINE_WRITE_BYTES:
            # A small batch (live replication) is written here: a write of a few KiB costs
            # less than handing it to the thread. Nothing is queued, so the order holds.
            self._write_job(self._active, chunks)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="mh-fsync")
        self._write_jobs.append(self._executor.submit(self._write_job, self._active, chunks))

    def _write_job(self, f: WritableFile, chunks: list[bytes]) -> None:
        """(worker thread) One queued write of the frames in order (one ``writev``, no joined
        copy); an error is kept for the next sync to raise."""
        if self._write_error is not None:
            return  # the log is failing: nothing after the failed write may land
        try:
            f.writev(chunks)
        except OSError as e:
            self._write_error = e

    def _settle_writes(self) -> None:
        """Wait (blocking) until every queued write is done; raise StoreIOError (the store
        fails) if one failed. Called before a write that must follow them on the loop
        thread: a commit's own write, a new segment."""
        self._queue_writes()
        if self._write_jobs:
            futures_wait(self._write_jobs)
            self._write_jobs.clear()
        if self._write_error is not None:
            e = self._write_error
            self._fail(e)
            raise StoreIOError(f"write to the log failed: {e.strerror or e}")

    def _close_sealed(self, files: list[WritableFile]) -> None:
        """After a sync (loop thread): close write handles of sealed segments that no later
        flush still has to sync."""
        for f in files:
            if f is not self._active and f not in self._unsynced and f not in self._inflight:
                f.close()

    def _apply_upto(self, target: int) -> None:
        touched: set[bytes] = set()
        applied = 0
        while self._pending and self._pending[0].lsn <= target:
            p = self._pending.popleft()
            try:
                t = self.index.apply_frame(p.header, p.payload, p.segno, p.payload_off, p.records)
            except fmt.FormatError as e:
                self._fail(e)
                raise StoreIOError(f"a committed frame did not apply: {e}") from None
            touched |= t
            self._note_generation(p.header)
            self._applied_pos = (p.segno, p.payload_off + len(p.payload))
            self._bytes_since_ckpt += p.size
            for h in p.blobs:
                if self._written_blobs.get(h) == p.lsn:
                    del self._written_blobs[h]
            applied = p.lsn
        while self._waiters and self._waiters[0][0] <= target:
            _, fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
        if applied:
            ev = CommitEvent(applied, frozenset(touched))
            for cb in self._commit_listeners:
                cb(ev)
        if not self._pending:
            # Everything allocated is applied now: the index holds the counters again.
            self._alloc_uid.clear()
            self._alloc_modseq.clear()
            self._exclusive_lsn = 0
            self._wake_settled()
            if self._bytes_since_ckpt >= self.options.checkpoint_every_bytes:
                try:
                    self.checkpoint()
                except StoreIOError as e:
                    log.error("%s (the log is intact)", e)

    def _wake_settled(self) -> None:
        ws, self._settle_waiters = self._settle_waiters, []
        for w in ws:
            if not w.done():
                w.set_result(None)

    def _flush_sync(self) -> None:
        if not self._pending:
            return
        if self.barrier is not None:
            raise StoreError(
                "synchronous commits are not allowed while a durability barrier "
                "(replication) is set"
            )
        self._settle_writes()
        target = self._next_lsn - 1
        files = self._take_unsynced()
        # Files an async flush is syncing right now hold frames <= target too.
        files = [f for f in self._inflight if f not in files] + files
        try:
            self._sync_files(files)
        except OSError as e:
            self._fail(e)
            raise StoreIOError(f"fsync of the log failed: {e.strerror or e}") from None
        self._close_sealed(files)
        self.stats_fsyncs += 1
        self._durable_lsn = max(self._durable_lsn, target)
        self._notify_durable(target)
        self._apply_upto(target)

    def _settle_sync(self) -> None:
        self._flush_sync()

    async def settle(self) -> None:
        """Wait until every appended frame is durable and applied."""
        while self._pending and self.state == StoreState.OPEN:
            fut = asyncio.get_running_loop().create_future()
            self._settle_waiters.append(fut)
            self._ensure_flusher()
            await fut
        self._check_writable()

    async def flush_appended(self) -> None:
        """Wait until the frames appended so far (e.g. a blob writer's chunks) are durable and
        applied, which also drops their payloads from memory. Unlike :meth:`settle` it does not
        wait for frames appended later, so it cannot starve under a steady stream of commits."""
        await self.flushed_future()

    def flushed_future(self) -> asyncio.Future[None]:
        """:meth:`flush_appended` as a future (no task needed to wait on it): done when the
        frames appended so far are durable and applied (at once if they are), failed with the
        store's error. Raises at once if the store is not writable."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lsn = self._next_lsn - 1
        if lsn <= self.index.last_lsn:
            fut.set_result(None)
            return fut
        self._check_writable()
        self._check_not_frozen()
        self._waiters.append((lsn, fut))
        self._ensure_flusher()
        return fut

    def _check_sync_allowed(self) -> None:
        if self.barrier is not None:
            raise StoreError(
                "synchronous commits are not allowed while a durability barrier "
                "(replication) is set; use the async API"
            )

    def _commit_sync(self, txn: Transaction) -> int:
        self._check_thread()
        self._check_writable()
        self._check_sync_allowed()
        if self._pending and (self._exclusive_lsn or txn.exclusive):
            self._flush_sync()
        lsn = self._write_txn(txn)
        self._flush_sync()
        return lsn

    async def _commit_async(self, txn: Transaction) -> int:
        self._check_thread()
        self._check_writable()
        if txn.exclusive:
            # Hold new commits back so the pending batch drains (no starvation under load).
            self._exclusive_waiting += 1
            try:
                while self._pending:
                    await self.settle()
            finally:
                self._exclusive_waiting -= 1
        else:
            while self._pending and (self._exclusive_lsn or self._exclusive_waiting):
                await self.settle()
        lsn = self._write_txn(txn)
        if lsn <= self.index.last_lsn:
            return lsn
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((lsn, fut))
        self._ensure_flusher()
        await fut
        return lsn

    def _ensure_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    def _flushing(self) -> bool:
        """A flush or ack stage task is still running."""
        return any(t is not None and not t.done() for t in (self._flusher, self._acker))

    async def _flush_loop(self) -> None:
        """Group commit, the fsync stage: each turn fsyncs what was appended since the last one
        (one fsync for all the transactions in it), tells the durable listeners, then applies
        the batch (visible, its commits return) right here if there is no durability barrier,
        or if the ack stage is idle and the barrier releases the batch at once
        (`try_release`: a secondary, protocol A, or the peer's acknowledgement came first).
        Otherwise the batch goes to the ack stage (:meth:`_ack_loop`) and the next turn starts
        at once: the local fsync of batch N+1 overlaps the wait for the peer's acknowledgement
        of batch N (the frames were shipped when appended). The loop ends when everything
        appended is fsynced."""
        loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="mh-fsync")
        while self._pending and self.state == StoreState.OPEN:
            target = self._next_lsn - 1
            if self.barrier is not None and target <= self._durable_lsn:
                return  # all fsynced; the ack stage holds the rest
            files = self._take_unsynced()
            try:
                if files:
                    self._inflight = files
                    try:
                        # Never on the loop's thread, not even a secondary's: a slow fsync
                        # would stop it answering the peer's pings (the link would drop).
                        await loop.run_in_executor(self._executor, self._sync_files, files)
                    finally:
                        self._inflight = []
                    self.stats_fsyncs += 1
                    self._close_sealed(files)
                self._durable_lsn = max(self._durable_lsn, target)
                self._notify_durable(target)
                if self.barrier is not None and not self._release_now(target):
                    self._ack_target = max(self._ack_target, target)
                    if self._acker is None or self._acker.done():
                        self._acker = loop.create_task(self._ack_loop())
                    continue
                self._apply_upto(target)
            except OSError as e:
                self._fail(e)
            except StoreError:
                pass  # _apply_upto already failed the store

    def _release_now(self, target: int) -> bool:
        """The barrier's fast path: only with the ack stage idle (batches are released in LSN
        order); a barrier that raises fails the store as `wait` raising would."""
        if self.barrier is None:
            return True
        if self._acker is not None and not self._acker.done():
            return False
        try:
            return self.barrier.try_release(target)
        except Exception as e:
            log.error("durability barrier failed: %s", e)
            self._fail(e)
            raise StoreError(f"durability barrier failed: {e}") from None

    async def _ack_loop(self) -> None:
        """Group commit, the ack stage (with a durability barrier): in LSN order, wait until the
        barrier releases the fsynced batches up to ``_ack_target`` (batches fsynced meanwhile
        are waited for together), then apply them. A barrier failure fails the store: nothing
        in the batch is acknowledged."""
        done = 0
        while self.state == StoreState.OPEN:
            target = self._ack_target
            if target <= done or self.barrier is None:
                return
            try:
                await self.barrier.wait(target)
                done = target
                self._apply_upto(target)
            except StoreError:
                pass  # _apply_upto already failed the store
            except Exception as e:
                log.error("durability barrier failed: %s", e)
                self._fail(e)

    # -- encoding a transaction ----------------------------------------------------------------

    def _write_txn(self, txn: Transaction) -> int:
        records, blobs = self._encode(txn)
        self.stats_commits += 1
        if not records:
            return self.index.last_lsn
        lsn = self._append(records, blobs)
        txn.committed_lsn = lsn
        if txn.exclusive:
            self._exclusive_lsn = lsn
        for b in txn._blobs.values():
            self._open_streams.discard(b.stream)
        return lsn

    def _blob_present(self, h: bytes) -> bool:
        if h in self._written_blobs:
            return True
        s = self.index.blobs.slot(h)
        return s is not None and self.index.blobs.has_data(s) and self.index.blobs.refs[s] > 0

    def _encode(self, txn: Transaction) -> tuple[list[fmt.Record], tuple[bytes, ...]]:
        """Validate and encode (raises before any write); advance the allocation counters."""
        enc = Encoder(
            self.index,
            alloc_uid=self._alloc_uid,
            alloc_modseq=self._alloc_modseq,
            blob_present=self._blob_present,
            blob_size=self._blob_size,
            new_blobs=txn._blobs,
            now_ms=now_ms,
        )
        for op in txn._ops:
            enc.add(op)
        out = enc.finish(txn._meta)
        self._alloc_uid.update(enc.new_uid)
        self._alloc_modseq.update(enc.new_modseq)
        return out

    def _blob_size(self, h: bytes) -> int:
        s = self.index.blobs.slot(h)
        if s is not None:
            return int(self.index.blobs.size[s])
        for p in reversed(self._pending):
            if h in p.blobs:
                for rec in fmt.decode_records(p.payload):
                    if isinstance(rec, fmt.Blob) and rec.hash == h:
                        return rec.size
        raise NotFound("blob is not in the store")

    # -- public API ----------------------------------------------------------------------------

    def transaction(self) -> Transaction:
        """A new transaction: `with store.transaction() as t:` (sync) or `async with`."""
        self._check_writable()
        self._check_not_frozen()
        return Transaction(self)

    def freeze_writes(self, reason: str) -> None:
        """Refuse local writes with :class:`WritesFrozen` until :meth:`thaw_writes` (replication
        fencing: the peer was lost and the policy holds writes). New transactions, commits and
        blob chunks are refused before anything is appended; commits already appended and held
        by the durability barrier fail at once with `WritesFrozen` (not acknowledged) — their
        frames stay pending in the log and become visible only if the barrier releases them
        later (a client's retry may then duplicate, as after any lost reply). `ingest` and
        `settle` are not affected. Idempotent."""
        self.frozen_reason = reason or "frozen"
        err = WritesFrozen(f"writes are frozen: {self.frozen_reason}")
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(err)

    def thaw_writes(self) -> None:
        """Accept local writes again (the fencing policy allows it)."""
        self.frozen_reason = ""

    @property
    def last_lsn(self) -> int:
        """LSN of the last appended frame (maybe not durable yet)."""
        return self._next_lsn - 1

    @property
    def durable_lsn(self) -> int:
        """LSN up to which frames are fsynced locally."""
        return self._durable_lsn

    @property
    def visible_lsn(self) -> int:
        """LSN up to which frames are applied and visible (passed the barrier)."""
        return self.index.last_lsn

    def add_frame_listener(self, cb: Callable[[int, bytes], None]) -> None:
        """`cb(lsn, frame_bytes)` for every frame as it is appended (replication ships it)."""
        self._frame_listeners.append(cb)

    def add_commit_listener(self, cb: Callable[[CommitEvent], None]) -> None:
        """`cb(event)` after frames become visible (IDLE notifications)."""
        self._commit_listeners.append(cb)

    def remove_commit_listener(self, cb: Callable[[CommitEvent], None]) -> None:
        with contextlib.suppress(ValueError):
            self._commit_listeners.remove(cb)

    def add_durable_listener(self, cb: Callable[[int], None]) -> None:
        """`cb(lsn)` on the loop's thread each time the frames up to `lsn` are fsynced, right
        after the fsync: before the barrier is asked and before they are applied. A secondary
        acknowledges its peer's frames from it (fsync, acknowledge, apply). `cb` must not
        call back into the store; an exception from it is logged and ignored."""
        self._durable_listeners.append(cb)

    def _notify_durable(self, lsn: int) -> None:
        for cb in self._durable_listeners:
            try:
                cb(lsn)
            except Exception:
                log.exception("a durable listener failed (ignored)")

    def _reader(self, segno: int) -> ReadableFile:
        r = self._readers.get(segno)
        if r is None:
            r = self.fs.open_read(segment_path(self._logdir, segno))
            self._readers[segno] = r
        return r

    def _read_locs(self, locs: list[ix.Location]) -> bytes:
        parts = []
        for loc in locs:
            data = self._reader(loc.segno).pread(loc.length, loc.offset)
            if len(data) != loc.length:
                raise StoreIOError("short read from the log")
            parts.append(data)
        return b"".join(parts)

    def read_blob(self, h: bytes, *, verify: bool = True) -> bytes:
        """The body of a visible blob. Every read from disk re-checks the BLAKE2b hash (cheap
        next to the read), so a body damaged on disk is never served: StoreIOError instead.
        Raises NotFound for an unknown or reclaimed blob."""
        c = self._cache.get(h)
        if c is not None:
            return c
        b = self.index.blobs
        s = b.slot(h)
        if s is None or not b.has_data(s):
            raise NotFound("no such message body")
        data = self._read_locs(b.location(s))
        if verify and blob_hash(data) != h:
            log.error("body %s failed its checksum: damaged on disk; run `store fsck`", h.hex())
            raise StoreIOError("message body failed its checksum (damaged on disk)")
        self._cache.put(h, data)
        return data

    def read_mime_meta(self, h: bytes) -> tuple[int, bytes] | None:
        """(version, data) of the blob's stored MIME metadata, or None."""
        b = self.index.blobs
        s = b.slot(h)
        if s is None or b.meta_len[s] == 0 or not b.has_data(s):
            return None
        # Keyed by location too: a newer record for the same body has another location.
        key = b"m" + h + struct.pack("<IQ", b.meta_seg[s], b.meta_off[s])
        c = self._cache.get(key)
        if c is None:
            c = self._read_locs([ix.Location(b.meta_seg[s], b.meta_off[s], b.meta_len[s])])
            self._cache.put(key, c)
        return c[0], c[1:]

    def read_frames(self, from_lsn: int, *, durable: bool = False) -> Iterator[bytes]:
        """The committed (visible) frames with LSN >= from_lsn, byte for byte as in the log.

        With `durable=True`, also the frames fsynced locally but not applied yet (LSN <=
        `durable_lsn`: what the durability barrier still holds). HOLE frames (left by `fsck
        --repair`) are yielded like any frame; `ingest` accepts them. Frames below
        `retain_from` may have been compacted (RECLAIMED records in place of dead data): same
        LSN, generation, writer, time and logical digest. The limit is taken when iteration
        starts; an iterator must not be used across `cut_tail`."""
        limit = self._durable_lsn if durable else self.index.last_lsn
        if from_lsn > limit:
            return
        segs = sorted(self._segments)
        start = segs[0]
        for s in segs:
            if self._segments[s].first_lsn <= from_lsn:
                start = s
        for s in segs:
            if s < start:
                continue
            frames, _stops = scan_segment(
                self.fs,
                segment_path(self._logdir, s),
                s,
                fmt.SEGMENT_HEADER_SIZE,
                self._segments[s].first_lsn,
            )
            for fr in frames:
                if fr.header.lsn > limit:
                    return
                if fr.header.lsn >= from_lsn:
                    yield fr.raw

    def ingest_blocking(self, frames: Sequence[bytes]) -> int:
        """Append a peer's frames byte for byte (each verified, LSNs consecutive), fsync, apply.
        Returns the last LSN."""
        self._check_thread()
        self._check_sync_allowed()
        self._ingest_all(frames)
        self._flush_sync()
        return self.index.last_lsn

    async def ingest(self, frames: Sequence[bytes]) -> int:
        """Async `ingest_blocking`, sharing group commit."""
        self._check_thread()
        self._ingest_all(frames)
        await self.settle()
        return self.index.last_lsn

    def ingest_nowait(self, frames: Sequence[bytes]) -> int:
        """Verify and append a peer's frames as `ingest` does, without waiting: their write is
        queued to the flusher's thread and :meth:`flush_appended` waits until they are durable
        and applied. Returns the last LSN appended. Lets a secondary verify and append batch
        N+1 while batch N is being written and fsynced."""
        self._check_thread()
        self._ingest_all(frames)
        return self._next_lsn - 1

    def _ingest_all(self, frames: Sequence[bytes]) -> None:
        """Verify every frame first (CRCs, consecutive LSNs, generations not going back), then
        append them all: a bad frame refuses the whole batch, and nothing of it is appended.
        A HOLE frame (what `read_frames` yields where the source's log lost frames to
        `fsck --repair`) is accepted and takes its `count` LSNs, as in the source's log."""
        self._check_writable()
        checked = []
        lsn = self._next_lsn
        last_gen = self._last_txn_gen
        for raw in frames:
            hdr = fmt.decode_frame_header(raw)
            payload = memoryview(raw)[fmt.FRAME_HEADER_SIZE :]
            if len(payload) != hdr.payload_len or fmt.crc32c(payload) != hdr.payload_crc:
                raise fmt.FormatError(f"ingested frame LSN {hdr.lsn}: payload is corrupt")
            if hdr.lsn != lsn:
                raise InvalidArgument(f"ingested frame LSN {hdr.lsn}, expected {lsn}")
            nlsns = 1
            blobs: tuple[bytes, ...] = ()
            if hdr.kind == fmt.FrameKind.HOLE:
                recs = fmt.decode_records(payload)
                if len(recs) != 1 or not isinstance(recs[0], fmt.Hole) or recs[0].count < 1:
                    raise fmt.FormatError(f"ingested hole frame LSN {hdr.lsn} is malformed")
                nlsns = recs[0].count
            else:
                if hdr.generation < last_gen:
                    raise InvalidArgument(
                        f"ingested frame LSN {hdr.lsn} is of generation {hdr.generation}, "
                        f"older than the log's {last_gen}"
                    )
                last_gen = hdr.generation
                blobs = tuple(
                    bytes(payload[o : o + 32])
                    for t, o, _ in fmt.iter_record_spans(payload)
                    if t == fmt.RecordType.BLOB
                )
            checked.append((bytes(raw), hdr, payload, blobs, nlsns))
            lsn += nlsns
        try:
            for raw, hdr, payload, blobs, nlsns in checked:
                self._append_raw(raw, hdr, payload, blobs, nlsns=nlsns, defer=True)
                if hdr.kind == fmt.FrameKind.TXN:
                    self.generation = max(self.generation, hdr.generation)
        finally:
            self._queue_writes()

    # -- replication API -----------------------------------------------------------------------

    @property
    def first_retained_lsn(self) -> int:
        """The lowest LSN whose frame `read_frames` can still yield (1 unless the head of the log
        was dropped by `drop_head`, the retention horizon, or the log came from a snapshot). A
        peer that needs an older LSN needs a full sync. Frames below `retain_from` may be
        compacted, which leaves them shippable."""
        if not self._segments:
            return 1
        return self._segments[min(self._segments)].first_lsn

    def generations(self) -> list[tuple[int, int]]:
        """The generation history of the applied log: (generation, first LSN) per run of frames
        of one generation and writer, in LSN order. Ingested frames count like local ones;
        HOLE frames name no generation. A generation begun (`begin_generation`) but not yet
        written in is not listed: it is `Store.generation`."""
        return [(g, first) for g, first, _ in self._gen_history]

    def generation_history(self) -> list[GenEntry]:
        """`generations()` with each run's writer node: (generation, first LSN, node id)."""
        return list(self._gen_history)

    def _note_generation(self, hdr: fmt.FrameHeader) -> None:
        """Extend the history with an applied frame (called in LSN order)."""
        if hdr.kind != fmt.FrameKind.TXN:
            return
        h = self._gen_history
        if not h or h[-1][0] != hdr.generation or h[-1][2] != hdr.node_id:
            h.append((hdr.generation, hdr.lsn, hdr.node_id))

    def begin_generation(self, gen: int) -> None:
        """Start generation `gen` (> the current one): frames appended from now on carry it.
        Durable before it returns (`<data>/repl/generation`), so the generation never goes
        back, even across a crash. Refused while commits are pending."""
        self._check_thread()
        self._check_writable()
        if gen <= self.generation:
            raise InvalidArgument(f"generation {gen} is not above the current {self.generation}")
        if gen >= 1 << 64:
            raise InvalidArgument("generation out of range")
        if self._pending:
            raise StoreError("cannot begin a generation while commits are pending; settle first")
        body = _GEN_FILE.pack(_GEN_MAGIC, gen, 0)[:-4]
        try:
            self._makedirs_durable(self._repldir)
            self.fs.write_atomic(
                os.path.join(self._repldir, GENERATION_FILE),
                body + struct.pack("<I", fmt.crc32c(body)),
            )
        except OSError as e:
            raise StoreIOError(f"cannot record generation {gen}: {e.strerror or e}") from None
        self.generation = gen
        log.info("generation %d begun", gen)

    def _read_generation_file(self) -> int:
        path = os.path.join(self._repldir, GENERATION_FILE)
        if not self.fs.exists(path):
            return 0
        data = self._read_file(path)
        if len(data) != _GEN_FILE.size:
            raise CorruptLog(f"{path}: damaged (wrong length)")
        magic, gen, crc = _GEN_FILE.unpack(data)
        if magic != _GEN_MAGIC or fmt.crc32c(data[:-4]) != crc:
            raise CorruptLog(f"{path}: damaged (bad magic or checksum)")
        return int(gen)

    def _read_file(self, path: str) -> bytes:
        f = self.fs.open_read(path)
        try:
            return f.pread(f.size(), 0)
        finally:
            f.close()

    def load_repl_meta(self) -> bytes | None:
        """The replication layer's node-local metadata (opaque bytes), or None if never saved."""
        path = os.path.join(self._repldir, REPL_META)
        if not self.fs.exists(path):
            return None
        return self._read_file(path)

    def save_repl_meta(self, data: bytes) -> None:
        """Replace the replication metadata atomically and durably (`<data>/repl/meta`,
        written through fsio.write_atomic: after a crash, the old or the new bytes). Node-local:
        never in the replicated stream. Allowed in state ERROR too (the log is not touched).
        Raises StoreIOError if it could not be made durable."""
        self._check_thread()
        if self.state == StoreState.CLOSED:
            raise StoreReadOnly("store is closed")
        try:
            self._makedirs_durable(self._repldir)
            self.fs.write_atomic(os.path.join(self._repldir, REPL_META), bytes(data))
        except OSError as e:
            raise StoreIOError(f"cannot save replication metadata: {e.strerror or e}") from None

    def logical_digest(self, first_lsn: int, last_lsn: int, *, durable: bool = False) -> bytes:
        """BLAKE2b-256 over the logical content of the frames whose LSN lies in [first_lsn,
        last_lsn] (docs/store.md, "Logical digest"): equal on two nodes holding the same
        logical records, whatever either compacted. The range must be held: first_lsn >=
        `first_retained_lsn`, last_lsn <= the visible LSN (`durable=True`: the durable LSN);
        else InvalidArgument."""
        limit = self._durable_lsn if durable else self.index.last_lsn
        if first_lsn < 1 or last_lsn < first_lsn:
            raise InvalidArgument(f"bad LSN range {first_lsn}..{last_lsn}")
        if first_lsn < self.first_retained_lsn or last_lsn > limit:
            raise InvalidArgument(
                f"LSNs {first_lsn}..{last_lsn} are not all held "
                f"({self.first_retained_lsn}..{limit})"
            )
        h = hashlib.blake2b(digest_size=32, person=b"mh-logical-v1")
        h.update(struct.pack("<QQ", first_lsn, last_lsn))
        for raw in self.read_frames(first_lsn, durable=durable):
            hdr = fmt.decode_frame_header(raw)
            if hdr.lsn > last_lsn:
                break
            _digest_frame(h, hdr, raw[fmt.FRAME_HEADER_SIZE :])
        return h.digest()

    def cut_tail(self, after_lsn: int, quarantine_path: str) -> int:
        """Cut the log after `after_lsn`: every frame with a higher LSN is first written to
        `quarantine_path` (a small header + the frames verbatim, made durable; an existing
        file is replaced: choose unique names), then removed from the log; checkpoints beyond
        the cut are deleted and the index is rebuilt (from an older checkpoint or by replay).
        Returns the number of frames cut (0 if the log ends at or before `after_lsn`).

        If `after_lsn + 1` falls inside a HOLE frame, the whole hole is cut (its LSNs were lost
        anyway) and the log ends before it: `last_lsn` tells where. Crash-safe (module doc):
        after a crash the store opens with the whole tail or exactly the cut state.

        Refused (StoreError) while commits are pending (e.g. held by the durability barrier) or
        a blob writer streams; the store must not be serving sessions (what they saw may be
        cut: `index` is replaced). The generation is not lowered. Synchronous, blocking."""
        self._check_thread()
        self._check_writable()
        if self._pending or self._flushing():
            raise StoreError(
                "cut_tail refused: commits are pending (or held by the durability barrier)"
            )
        if self._open_streams:
            raise StoreError("cut_tail refused: a blob writer is streaming into the log")
        if after_lsn < 0:
            raise InvalidArgument("after_lsn must be >= 0")
        last = self.last_lsn
        if after_lsn >= last:
            return 0
        if after_lsn + 1 < self.first_retained_lsn:
            raise InvalidArgument(f"LSN {after_lsn + 1} is no longer in the log")
        segno, offset, after = self._find_cut(after_lsn)
        if after < after_lsn:
            log.warning(
                "cut after LSN %d falls inside a hole: cutting after LSN %d", after_lsn, after
            )
        t0 = time.monotonic()
        quarantine_path = os.path.abspath(quarantine_path)
        try:
            nframes, nbytes = self._write_quarantine(quarantine_path, segno, offset, after, last)
        except OSError as e:  # the log is untouched: the store stays open
            raise StoreIOError(f"cannot write the quarantine file: {e.strerror or e}") from None
        intent = _CutIntent(after, segno, offset, max(self._segments), last, quarantine_path)
        try:
            self.fs.write_atomic(os.path.join(self._logdir, CUT_INTENT), intent.encode())
        except OSError as e:
            # Maybe durable, maybe not: reopening either redoes the cut or keeps the tail.
            self._fail(e)
            raise StoreIOError(f"cannot record the cut: {e.strerror or e}") from None
        old_generation = self.generation
        recovery = self.recovery
        self._release_files()
        try:
            dropped = self._apply_cut(intent)
            self._segments = {}
            self._gen_history = []
            self.index = ix.Index()
            self._cache.clear()
            self._recover()
        except (OSError, StoreError, fmt.FormatError) as e:
            self._fail(e)
            raise StoreIOError(f"cut failed, reopen the store to finish it: {e}") from None
        self.recovery = recovery
        self.generation = max(self.generation, old_generation)
        self.last_cut = CutReport(after, after + 1, last, nframes, nbytes, quarantine_path, dropped)
        log.warning(
            "cut the log after LSN %d: %d frames (LSNs %d..%d, %d bytes) quarantined in %s "
            "(%.3f s)",
            after,
            nframes,
            after + 1,
            last,
            nbytes,
            quarantine_path,
            time.monotonic() - t0,
        )
        return nframes

    def _find_cut(self, after_lsn: int) -> tuple[int, int, int]:
        """(segment, offset, effective after-LSN) of the first frame that holds an LSN above
        `after_lsn` (a hole holding after_lsn + 1 moves the cut before it)."""
        segs = sorted(self._segments)
        s = segs[0]
        for x in segs:
            if self._segments[x].first_lsn <= after_lsn + 1:
                s = x
        frames, stops = scan_segment(
            self.fs,
            segment_path(self._logdir, s),
            s,
            fmt.SEGMENT_HEADER_SIZE,
            self._segments[s].first_lsn,
        )
        found: tuple[int, int, int] | None = None
        end = fmt.SEGMENT_HEADER_SIZE
        for fr in frames:
            if found is None:
                if fr.header.lsn > after_lsn:
                    found = (s, fr.offset, after_lsn)
                elif fr.header.lsn + fr.lsn_count - 1 > after_lsn:
                    found = (s, fr.offset, fr.header.lsn - 1)
            end = fr.end
        if stops:
            raise CorruptLog(f"segment {s}: {stops[0].reason}; run `mailharbor store fsck`")
        return found if found is not None else (s, end, after_lsn)

    def _write_quarantine(
        self, path: str, segno: int, offset: int, after: int, last: int
    ) -> tuple[int, int]:
        """Write the frames from (segno, offset) to the end of the log to `path`: temporary
        file, fsync, rename, directory fsync. Returns (frames, frame bytes)."""

        def tail() -> Iterator[bytes]:
            expected = after + 1
            for s in sorted(self._segments):
                if s < segno:
                    continue
                start = offset if s == segno else fmt.SEGMENT_HEADER_SIZE
                frames, stops = scan_segment(
                    self.fs, segment_path(self._logdir, s), s, start, expected
                )
                for fr in frames:
                    expected += fr.lsn_count
                    yield fr.raw
                if stops:
                    raise CorruptLog(f"segment {s}: {stops[0].reason}; cannot quarantine")
            if expected != last + 1:
                raise CorruptLog(f"the log ends at LSN {expected - 1}, expected {last}")

        nframes = nbytes = 0
        for raw in tail():
            nframes += 1
            nbytes += len(raw)
        head = _QUAR_HEAD.pack(
            QUARANTINE_MAGIC,
            QUARANTINE_VERSION,
            after,
            after + 1,
            last,
            nframes,
            nbytes,
            self.node_id,
            now_ms(),
            0,
        )[:-4]
        head += struct.pack("<I", fmt.crc32c(head))
        directory = os.path.dirname(path)
        self._makedirs_durable(directory)
        tmp = path + ".tmp"
        if self.fs.exists(tmp):
            self.fs.unlink(tmp)
        f = self.fs.open_append(tmp)
        try:
            f.write(head)
            for raw in tail():
                f.write(raw)
            f.sync()
        finally:
            f.close()
        self.fs.replace(tmp, path)
        self.fs.sync_dir(directory)
        return nframes, nbytes

    def _release_files(self) -> None:
        """Close every handle on the segments (nothing is pending)."""
        if self._active is not None:
            self._active.close()
            self._active = None
        for r in self._readers.values():
            r.close()
        self._readers.clear()

    def _read_cut_intent(self) -> _CutIntent | None:
        path = os.path.join(self._logdir, CUT_INTENT)
        if not self.fs.exists(path):
            return None
        try:
            return _CutIntent.decode(self._read_file(path))
        except fmt.FormatError as e:
            raise CutIntentError(f"{path}: {e}; the log may be half cut") from None

    def _apply_cut(self, intent: _CutIntent) -> int:
        """Carry out a recorded cut; idempotent (redone at open after a crash). Returns how
        many checkpoints were deleted."""
        for s in list_segments(self.fs, self._logdir):
            if s > intent.segno:
                self.fs.unlink(segment_path(self._logdir, s))
        path = segment_path(self._logdir, intent.segno)
        if self.fs.exists(path) and self._segment_size(intent.segno) > intent.offset:
            self.fs.truncate(path, intent.offset)  # fsyncs the file
        self.fs.sync_dir(self._logdir)
        dropped = 0
        for name in self.fs.listdir(self._ckptdir):
            lsn = _checkpoint_name_lsn(name)
            if lsn is None or lsn > intent.after_lsn:
                self.fs.unlink(os.path.join(self._ckptdir, name))
                dropped += 1
        if dropped:
            self.fs.sync_dir(self._ckptdir)
        self.fs.unlink(os.path.join(self._logdir, CUT_INTENT))
        self.fs.sync_dir(self._logdir)
        return dropped

    # -- retention horizon and snapshots -------------------------------------------------------

    def _live_segments(self) -> set[int]:
        """Segments holding data the index still points at (referenced blobs, their MIME
        metadata, chunks of streams not committed yet)."""
        b = self.index.blobs
        out: set[int] = set()
        for slot in range(len(b)):
            if b.refs[slot] == 0 or not b.has_data(slot):
                continue
            out.update(loc.segno for loc in b.location(slot))
            if b.meta_len[slot]:
                out.add(b.meta_seg[slot])
        for parts in b.pending_chunks.values():
            out.update(loc.segno for loc in parts.values())
        return out

    def drop_head(self, before_lsn: int) -> int:
        """The retention horizon: remove whole sealed segments at the head of the log whose
        frames all have LSN < min(`before_lsn`, `retain_from`) and that hold no live data (what
        compaction left there is dead). A checkpoint covering them is written first, so open
        never needs their frames. Returns how many segments were removed;
        `first_retained_lsn` moves up. A peer that needs an older LSN gets a full sync
        (`export_snapshot`). Refused while commits are pending. Crash-safe: segments are removed
        lowest first, so the log stays contiguous."""
        self._check_thread()
        self._check_writable()
        if self._pending:
            raise StoreError("drop_head refused: commits are pending; settle first")
        ck_lsn = self.checkpoint()
        limit = min(before_lsn, self.retain_from, ck_lsn + 1)
        live = self._live_segments()
        segs = sorted(self._segments)
        removed = 0
        for i, segno in enumerate(segs[:-1]):  # never the active (last) segment
            if self._segments[segs[i + 1]].first_lsn > limit or segno in live:
                break
            r = self._readers.pop(segno, None)
            if r is not None:
                r.close()
            self.fs.unlink(segment_path(self._logdir, segno))
            del self._segments[segno]
            removed += 1
        if removed:
            self.fs.sync_dir(self._logdir)
            log.info(
                "retention horizon: %d segment(s) removed; the log now starts at LSN %d",
                removed,
                self.first_retained_lsn,
            )
        return removed

    def head_drop_point(self, keep_bytes: int) -> int:
        """The LSN to pass to `drop_head` to keep at least `keep_bytes` of the newest segments:
        the first LSN of the newest segment at which their sizes reach `keep_bytes` (the
        active segment always counts). `first_retained_lsn` when nothing would go."""
        self._check_thread()
        segs = sorted(self._segments, reverse=True)
        kept = 0
        for segno in segs:
            kept += self._segment_size(segno)
            if kept >= keep_bytes:
                return self._segments[segno].first_lsn
        return self.first_retained_lsn

    def export_snapshot(self) -> SnapshotExport:
        """A consistent snapshot of the applied state for a full sync: a checkpoint of the
        index at the visible LSN and the segment files up to the applied position (the last
        one cut there), opened now — a later compaction renames new files over them, these
        handles keep reading the old ones, which the checkpoint describes. Installed by
        `install_snapshot`, the target then ingests frames from `lsn + 1`. The store keeps
        serving meanwhile; `close()` the export when done."""
        self._check_thread()
        self._check_writable()
        segno, off = self._applied_pos
        name, data = self._checkpoint_data()
        files: list[tuple[str, int, ReadableFile | None]] = []
        try:
            for s in sorted(self._segments):
                if s > segno:
                    break
                f = self.fs.open_read(segment_path(self._logdir, s))
                files.append((segment_name(s), off if s == segno else f.size(), f))
        except BaseException:
            for _, _, opened in files:
                if opened is not None:
                    opened.close()
            raise
        files.append((name, len(data), None))
        return SnapshotExport(self.index.last_lsn, files, data)

    def begin_snapshot_install(self) -> None:
        """Start receiving a snapshot into `<data>/snapshot-incoming/` (emptied first: an
        interrupted transfer is redone from the start)."""
        self._check_thread()
        self._check_writable()
        self._close_staging()
        staging = os.path.join(self.data_dir, SNAPSHOT_STAGING)
        if self.fs.exists(staging):
            for n in self.fs.listdir(staging):
                self.fs.unlink(os.path.join(staging, n))
        self._makedirs_durable(staging)
        self._staging = {}

    def save_snapshot_progress(self, token: bytes) -> list[tuple[str, int]]:
        """Make what was received of the snapshot durable and record it for a resume: every
        received file is fsynced (and the directory), then `snapshot-incoming/PROGRESS`
        (written atomically) names `token` (the sender's snapshot id, opaque here) and each
        file with its size, in the order received. Returns that list."""
        self._check_thread()
        if self._staging is None:
            raise StoreError("no snapshot install in progress")
        staging = os.path.join(self.data_dir, SNAPSHOT_STAGING)
        files = [(name, f.size()) for name, f in self._staging.items()]
        for f in self._staging.values():
            f.sync()
        self.fs.sync_dir(staging)
        body = struct.pack("<8sHH", _PROGRESS_MAGIC, 1, len(token)) + token
        body += struct.pack("<I", len(files))
        for name, size in files:
            raw = name.encode("utf-8")
            body += struct.pack("<H", len(raw)) + raw + struct.pack("<Q", size)
        body += struct.pack("<I", fmt.crc32c(body))
        self.fs.write_atomic(os.path.join(staging, SNAPSHOT_PROGRESS), body)
        return files

    def load_snapshot_progress(self) -> tuple[bytes, list[tuple[str, int]]] | None:
        """(token, files) of the last `save_snapshot_progress`, if it verifies and every file
        it names is still there with at least that size; else None."""
        staging = os.path.join(self.data_dir, SNAPSHOT_STAGING)
        path = os.path.join(staging, SNAPSHOT_PROGRESS)
        if not self.fs.exists(path):
            return None
        try:
            data = self._read_file(path)
            if (
                len(data) < 16
                or fmt.crc32c(data[:-4]) != struct.unpack_from("<I", data, len(data) - 4)[0]
            ):
                return None
            magic, ver, tlen = struct.unpack_from("<8sHH", data)
            if magic != _PROGRESS_MAGIC or ver != 1:
                return None
            pos = 12
            token = data[pos : pos + tlen]
            pos += tlen
            (count,) = struct.unpack_from("<I", data, pos)
            pos += 4
            files = []
            for _ in range(count):
                (n,) = struct.unpack_from("<H", data, pos)
                name = data[pos + 2 : pos + 2 + n].decode("utf-8")
                (size,) = struct.unpack_from("<Q", data, pos + 2 + n)
                pos += 2 + n + 8
                if not _snapshot_name_ok(name):
                    return None
                f = os.path.join(staging, name)
                if not self.fs.exists(f) or self._file_size(f) < size:
                    return None
                files.append((name, size))
        except (OSError, struct.error, UnicodeDecodeError):
            return None
        return token, files

    def resume_snapshot_install(self, files: Sequence[tuple[str, int]]) -> None:
        """Continue receiving a snapshot after `files` (from `load_snapshot_progress`): each
        is cut back to its recorded size and reopened for appending, in that order; any other
        received file is removed."""
        self._check_thread()
        self._check_writable()
        self._close_staging()
        staging = os.path.join(self.data_dir, SNAPSHOT_STAGING)
        keep = dict(files)
        for n in self.fs.listdir(staging):
            if n not in keep and n != SNAPSHOT_PROGRESS:
                self.fs.unlink(os.path.join(staging, n))
        self._staging = {}
        for name, size in files:
            if not _snapshot_name_ok(name):
                raise InvalidArgument(f"snapshot file name {name!r} is not a segment or checkpoint")
            path = os.path.join(staging, name)
            if self._file_size(path) > size:
                self.fs.truncate(path, size)
            f = self.fs.open_append(path)
            self._staging[name] = f
            if f.size() != size:
                raise StoreError(f"snapshot file {name}: {f.size()} bytes held, {size} recorded")
        self.fs.sync_dir(staging)

    def _file_size(self, path: str) -> int:
        f = self.fs.open_read(path)
        try:
            return f.size()
        finally:
            f.close()

    def write_snapshot_file(self, name: str, offset: int, data: bytes) -> None:
        """Append `data` at `offset` (sequential) to the received snapshot file `name` (a
        segment or checkpoint file name as `SnapshotExport.files` lists it)."""
        self._check_thread()
        if self._staging is None:
            raise StoreError("no snapshot install in progress")
        if not _snapshot_name_ok(name):
            raise InvalidArgument(f"snapshot file name {name!r} is not a segment or checkpoint")
        f = self._staging.get(name)
        if f is None:
            f = self.fs.open_append(os.path.join(self.data_dir, SNAPSHOT_STAGING, name))
            self._staging[name] = f
        if offset != f.size():
            raise InvalidArgument(f"snapshot file {name}: offset {offset}, expected {f.size()}")
        f.write(data)

    def install_snapshot(self) -> RecoveryReport:
        """Replace the whole log and checkpoints by the received snapshot, crash-safely, and
        reload. The received files are checked (one checkpoint, contiguous segments, the
        checkpoint's position inside them) and fsynced, then `<data>/INSTALL-INTENT`
        (written atomically) lists them; then the old segments and checkpoints are removed,
        the new ones renamed into place, the directories fsynced and the intent removed.
        `Store.open` redoes an install whose intent it finds, so after a crash the store holds
        the old log (no intent yet) or exactly the snapshot. Refused while commits are
        pending. Returns the reload's recovery report (`last_lsn` is the snapshot's LSN)."""
        self._check_thread()
        self._check_writable()
        if self._pending or self._staging is None:
            raise StoreError("install_snapshot refused: commits pending or nothing received")
        names = sorted(self._staging)
        ckpts = [n for n in names if n.endswith(".ckpt")]
        segnos = sorted(
            int(n[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)]) for n in names if n not in ckpts
        )
        if len(ckpts) != 1 or not segnos or segnos != list(range(segnos[0], segnos[-1] + 1)):
            raise StoreError("the received snapshot is incomplete (checkpoint or segments)")
        try:
            for f in self._staging.values():
                f.sync()
            self.fs.sync_dir(os.path.join(self.data_dir, SNAPSHOT_STAGING))
            ck = parse_checkpoint(
                self._read_file(os.path.join(self.data_dir, SNAPSHOT_STAGING, ckpts[0]))
            )
        except (OSError, fmt.FormatError) as e:
            raise StoreIOError(f"the received snapshot is unusable: {e}") from None
        if ck.segno not in segnos:
            raise StoreError("the received snapshot's checkpoint is outside its segments")
        self._close_staging()
        self._staging = None
        progress = os.path.join(self.data_dir, SNAPSHOT_STAGING, SNAPSHOT_PROGRESS)
        if self.fs.exists(progress):  # nothing to resume once installing
            self.fs.unlink(progress)
        self.fs.write_atomic(
            os.path.join(self.data_dir, INSTALL_INTENT), "\n".join(names).encode() + b"\n"
        )
        self._close_files()
        try:
            self._apply_install(names)
            self._reset_state()
            self._recover()
        except BaseException as e:  # the intent is redone by the next open
            self._fail(e)
            raise
        assert self.recovery is not None
        log.info("snapshot installed: the log now holds LSNs up to %d", self.index.last_lsn)
        return self.recovery

    def _close_staging(self) -> None:
        for f in (self._staging or {}).values():
            with contextlib.suppress(OSError):
                f.close()

    def _read_install_intent(self) -> list[str] | None:
        path = os.path.join(self.data_dir, INSTALL_INTENT)
        if not self.fs.exists(path):
            return None
        names = self._read_file(path).decode("utf-8", "replace").split()
        if not names or not all(_snapshot_name_ok(n) for n in names):
            raise CorruptLog(f"{path}: damaged install intent")
        return names

    def _apply_install(self, names: list[str]) -> None:
        """Carry out a recorded install; idempotent (redone at open after a crash)."""
        staging = os.path.join(self.data_dir, SNAPSHOT_STAGING)
        keep = set(names)
        for d in (self._logdir, self._ckptdir):
            for n in self.fs.listdir(d):
                if n not in keep:  # the old log and checkpoints (and any leftover)
                    self.fs.unlink(os.path.join(d, n))
            self.fs.sync_dir(d)
        for n in names:
            src = os.path.join(staging, n)
            if self.fs.exists(src):
                d = self._ckptdir if n.endswith(".ckpt") else self._logdir
                self.fs.replace(src, os.path.join(d, n))
        self.fs.sync_dir(self._logdir)
        self.fs.sync_dir(self._ckptdir)
        self.fs.sync_dir(staging)
        self.fs.unlink(os.path.join(self.data_dir, INSTALL_INTENT))
        self.fs.sync_dir(self.data_dir)

    def _close_files(self) -> None:
        for f in [*self._unsynced, *self._inflight]:
            with contextlib.suppress(OSError):
                f.close()
        if self._active is not None:
            with contextlib.suppress(OSError):
                self._active.close()
        for r in self._readers.values():
            r.close()

    def _reset_state(self) -> None:
        """Forget the loaded log (before `_recover` reloads it); listeners, the barrier and the
        executor stay."""
        self.index = ix.Index()
        self._segments = {}
        self._readers = {}
        self._active = None
        self._active_segno = 0
        self._next_lsn = 1
        self._unsynced = []
        self._inflight = []
        self._durable_lsn = 0
        self._ack_target = 0
        self._applied_pos = (0, 0)
        self._written_blobs = {}
        self._alloc_uid = {}
        self._alloc_modseq = {}
        self._exclusive_lsn = 0
        self._gen_history = []
        self._last_txn_gen = 0
        self._cache = _Cache(self.options.cache_bytes)
        self._bytes_since_ckpt = 0

    # -- maintenance ---------------------------------------------------------------------------

    def segments(self) -> list[tuple[int, int]]:
        """(segno, size in bytes) of every segment."""
        return [(s, self._segment_size(s)) for s in sorted(self._segments)]

    def stats(self) -> dict[str, int | float | str]:
        """Figures for `mailharbor store stats`."""
        b = self.index.blobs
        live = sum(b.size[s] for s in range(len(b)) if b.refs[s] > 0)
        logical = sum(mb.total_size for mb in self.index.mailboxes.values())
        phys = sum(sz for _, sz in self.segments())
        return {
            "state": self.state.value,
            "last_lsn": self.last_lsn,
            "durable_lsn": self.durable_lsn,
            "visible_lsn": self.visible_lsn,
            "generation": self.generation,
            "segments": len(self._segments),
            "log_bytes": phys,
            "accounts": len(self.index.accounts),
            "domains": len(self.index.domains),
            "aliases": len(self.index.aliases),
            "mailboxes": len(self.index.mailboxes),
            "messages": self.index.message_count,
            "blobs": len(b),
            "blobs_live": sum(1 for s in range(len(b)) if b.refs[s] > 0),
            "logical_bytes": logical,
            "unique_body_bytes": live,
            "dedup_ratio": round(logical / live, 3) if live else 1.0,
            "queue_entries": len(self.index.queue),
            "orphan_chunk_streams": len(b.pending_chunks),
            "cache_bytes": self._cache.used,
            "cache_budget": self._cache.budget,
            "cache_hits": self._cache.hits,
            "cache_misses": self._cache.misses,
            "commits": self.stats_commits,
            "fsyncs": self.stats_fsyncs,
            "frames_appended": self.stats_frames,
        }

    def compact(self) -> CompactReport:
        """Reclaim the space of bodies with no references (and orphaned chunks) in sealed
        segments. Each segment is rewritten atomically with the same frames and LSNs (reclaimed
        data replaced by RECLAIMED records), then a checkpoint is written. Blocking."""
        from mailharbor.store.compact import compact_store

        self._check_thread()
        self._check_writable()
        self._settle_sync()
        return compact_store(self)


def open_store(data_dir: str, node_id: bytes, options: StoreOptions | None = None) -> Store:
    """Convenience for CLI and tests."""
    return Store.open(data_dir, node_id=node_id, options=options)
