"""Split-brain merge: the losing branch replayed on the winner as new operations.

Theory of operation
-------------------
After a true split brain (both nodes acknowledged writes after the divergence LSN ``d``) under
the ``merge`` policy, the loser ships the frames of its branch (LSNs ``d+1`` ..) to the winner
(``rule:split-brain-merge``, repl/generations.py); it cuts them into quarantine and catches up
only once the winner answered MERGE_DONE (sent when :func:`merge_branch` returned).
The winner's adapter spools the frames to a file (:class:`BranchSpool`, bounded memory) and calls
:func:`merge_branch`, which never appends the loser's frames: it replays their *effects* in new
store transactions, with the winner's allocation of GUIDs, UIDs and MODSEQs, so the winner's log
stays one history that the loser then catches up from. Three passes:

1. **Read the branch** (:class:`_Branch`): every record is decoded except bulk data (BLOB, CHUNK,
   MIME_META data are only *located* in the spool file). Messages delivered on the branch are
   folded into their end state (flag deltas applied in order; expunged, or deleted with their
   mailbox or account); changes to messages of the common prefix are kept as an ordered list of
   deltas; structural records (accounts, mailboxes, domains, aliases, subscriptions) and queue
   records are kept in order.
2. **Look at the winner's own branch** (:class:`_WinnerSide`, its frames after ``d``): which
   mailboxes received mail, which were renamed or deleted, which accounts/aliases changed. For a
   mailbox or account that the winner deleted, its name/address is looked up in the common prefix
   of the winner's log (:class:`_Catalog`, scanned only when needed).
3. **Replay** on the winner, in this order: structural changes (in branch order), the UID
   collisions, the re-deliveries (in branch order), the prefix flag/expunge deltas (in branch
   order), the queue, then the quota check. Each decision writes one JSON line to the audit log
   ``<data>/merge-audit.log`` (rule name, GUIDs, old → new UIDs). The rule table is in
   docs/replication.md ("Merge rules").

Invariants:

* **Nothing lost.** Every message present at the end of the loser's branch is delivered on the
  winner exactly once (same body, INTERNALDATE, flags and keywords), unless its target can't be
  resolved at all — then an ``merge:unresolvable`` line names it (its body stays in the loser's
  quarantine file). Deliveries beat deletes: a mailbox or account the other side deleted is kept
  or recreated, never a reason to drop mail.
* **No UID means two messages.** In a mailbox both sides held at ``d``, every re-delivered UID is
  above both sides' UIDNEXT, and every MODSEQ the merge gives is above both sides'
  HIGHESTMODSEQ. A UID the loser gave to a message in such a mailbox is not left on the winner
  for a different message: the winner's message at that UID is expunged and re-delivered under a
  fresh UID (Dovecot dsync's rule), so no client cache of either side confuses them. Mailboxes
  the merge creates have a new UIDVALIDITY (clients resync them).
* **Only the winner writes**, only through store transactions (validated by the store as any
  client change); quota is not checked (the store does not enforce it; the merge never refuses
  mail for quota and audits accounts it pushed over).
* **Bounded memory**: bodies are read from the spool one at a time (chunked bodies streamed),
  transactions are batched by count and body bytes; the branch's metadata (per message a small
  record) is what stays in memory.
* **Queue entries at least once**: an entry queued on the loser is re-added with the recipients
  the loser did not finish; a recipient the loser finished on an entry of the common prefix is
  marked done on the winner if still pending there.

* **Resumable, nothing twice.** Progress goes to a journal (:class:`_Journal`,
  ``<data>/merge-journal``, each line durable before the merge goes on): the branch's identity,
  the winner's last LSN before the merge (the winner's side is read only up to it), then per
  durable merge transaction the branch items it replayed and the mappings it made. A merge run
  again on the same branch skips what is journalled; a transaction durable but not journalled
  yet is recognized by the message GUID it kept (``deliver(msg_guid=)``) or by the GUID its
  ``intent`` line named; the rest (collisions, flag deltas, expunges, renames, deletes) is
  idempotent. A branch whose merge is ``done`` is not replayed at all.
* **UIDL stable**: re-delivered messages keep their message GUID; UID and MODSEQ floors go
  through ``Transaction.reserve`` (persisted by a RESERVE record).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from mailharbor.store import (
    InvalidArgument,
    Store,
    StoreError,
    StoreState,
    Transaction,
    normalize_address,
)
from mailharbor.store import format as fmt
from mailharbor.store import index as ix
from mailharbor.store.fsio import FileSystem, OsFileSystem, ReadableFile, WritableFile

__all__ = [
    "AUDIT_FILE",
    "JOURNAL_FILE",
    "RECOVERED",
    "BranchSpool",
    "MergeError",
    "MergeReport",
    "merge_branch",
]

log = logging.getLogger("mailharbor.merge")

AUDIT_FILE = "merge-audit.log"
"""The audit log, in the data directory: one JSON object per line."""

JOURNAL_FILE = "merge-journal"
"""The merge's progress journal, in the data directory (see :class:`_Journal`)."""

RECOVERED = "Recovered"
"""The folder that takes mail whose mailbox was deleted and whose name is now taken."""

BATCH_MESSAGES = 200
BATCH_BODY_BYTES = 8 * 1024 * 1024
BATCH_CHANGES = 500


class MergeError(Exception):
    """The merge cannot run or continue (a corrupt spool, the store left OPEN)."""


# --- the spool --------------------------------------------------------------------------------


class BranchSpool:
    """The losing branch's frames, appended to a file as they arrive (memory stays bounded
    however long the branch). ``finish()`` makes it durable; ``discard()`` removes it."""

    def __init__(self, path: str, fs: FileSystem | None = None) -> None:
        self.path = path
        self.fs = fs or OsFileSystem()
        if self.fs.exists(path):
            self.fs.unlink(path)
        self._f: WritableFile | None = self.fs.open_append(path)
        self.frames = 0
        self.bytes = 0
        self.first_lsn = 0
        self.last_lsn = 0

    def add(self, frames: Sequence[bytes]) -> None:
        """Append frames (each checked: header and payload CRC). Raises MergeError."""
        if self._f is None:
            raise MergeError("the spool is closed")
        for raw in frames:
            try:
                hdr = fmt.decode_frame_header(raw)
            except fmt.FormatError as e:
                raise MergeError(f"branch frame: {e}") from None
            payload = raw[fmt.FRAME_HEADER_SIZE :]
            if len(payload) != hdr.payload_len or fmt.crc32c(payload) != hdr.payload_crc:
                raise MergeError(f"branch frame LSN {hdr.lsn}: payload is corrupt")
            if not self.first_lsn:
                self.first_lsn = hdr.lsn
            self.last_lsn = hdr.lsn
            self._f.write(bytes(raw))
            self.frames += 1
            self.bytes += len(raw)

    def finish(self) -> None:
        if self._f is not None:
            self._f.sync()
            self._f.close()
            self._f = None

    def discard(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        with contextlib.suppress(OSError):
            self.fs.unlink(self.path)


def _iter_spool(f: ReadableFile) -> Iterator[tuple[fmt.FrameHeader, bytes, int]]:
    """(header, payload, payload offset in the file) per frame; MergeError if damaged."""
    off, size = 0, f.size()
    while off < size:
        head = f.pread(fmt.FRAME_HEADER_SIZE, off)
        try:
            hdr = fmt.decode_frame_header(head)
        except fmt.FormatError as e:
            raise MergeError(f"spool offset {off}: {e}") from None
        payload = f.pread(hdr.payload_len, off + fmt.FRAME_HEADER_SIZE)
        if len(payload) != hdr.payload_len or fmt.crc32c(payload) != hdr.payload_crc:
            raise MergeError(f"spool frame LSN {hdr.lsn}: payload is corrupt")
        yield hdr, payload, off + fmt.FRAME_HEADER_SIZE
        off += fmt.FRAME_HEADER_SIZE + hdr.payload_len


# --- pass 1: the loser's branch ---------------------------------------------------------------


@dataclass(slots=True)
class _BMsg:
    """A message delivered on the loser's branch, folded to its end state."""

    lsn: int
    mailbox: bytes
    uid: int
    guid: bytes
    blob: bytes
    size: int
    idate: int
    flags: int
    keywords: list[str]
    gone: str = ""
    deltas: list[tuple[int, fmt.Flags]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _PrefixOp:
    """A flag delta or expunge of messages of the common prefix, in branch order."""

    lsn: int
    mailbox: bytes
    uids: tuple[int, ...]
    flags: fmt.Flags | None  # None: expunge


@dataclass(slots=True)
class _BQueue:
    lsn: int
    entry: bytes
    blob: bytes
    sender: str
    recipients: list[str]
    params: str


@dataclass(frozen=True, slots=True)
class _Loc:
    offset: int
    length: int


@dataclass(slots=True)
class _BlobLoc:
    size: int
    nchunks: int
    data: _Loc | None = None
    stream: bytes = b""


def _kw_add(kws: list[str], add: Sequence[str]) -> None:
    low = {k.lower() for k in kws}
    for k in add:
        if k.lower() not in low:
            kws.append(k)
            low.add(k.lower())


def _kw_remove(kws: list[str], rm: Sequence[str]) -> None:
    gone = {k.lower() for k in rm}
    kws[:] = [k for k in kws if k.lower() not in gone]


_STRUCTURAL = (
    fmt.MailboxCreate,
    fmt.MailboxRename,
    fmt.MailboxDelete,
    fmt.Subscribe,
    fmt.AccountPut,
    fmt.AccountDelete,
    fmt.DomainAdd,
    fmt.DomainRemove,
    fmt.AliasSet,
    fmt.AliasRemove,
)
_FINAL = frozenset(r for r in fmt.QueueResult if r is not fmt.QueueResult.DEFERRED)


class _Branch:
    """What the loser's branch did (see pass 1 in the module docstring)."""

    def __init__(self) -> None:
        self.first_lsn = 0
        self.last_lsn = 0
        self.frames = 0
        self.holes = 0
        self.order: list[_BMsg] = []
        self.live: dict[tuple[bytes, int], _BMsg] = {}
        self.delivered: dict[bytes, dict[int, bytes]] = {}  # mailbox -> UID -> body hash
        self.max_uid: dict[bytes, int] = {}
        self.max_modseq: dict[bytes, int] = {}
        self.prefix_ops: list[_PrefixOp] = []
        self.structural: list[tuple[int, fmt.Record]] = []
        self.mailbox_info: dict[bytes, tuple[bytes | None, str]] = {}  # latest account, name
        self.created_mailboxes: set[bytes] = set()
        self.deleted_mailboxes: set[bytes] = set()
        self.account_puts: dict[bytes, fmt.AccountPut] = {}
        self.deleted_accounts: set[bytes] = set()
        self.queue_new: dict[bytes, _BQueue] = {}
        self.queue_done: list[tuple[int, fmt.QueueDone]] = []
        self.blobs: dict[bytes, _BlobLoc] = {}
        self.chunks: dict[bytes, dict[int, _Loc]] = {}
        self.meta: dict[bytes, tuple[int, _Loc]] = {}
        self.digest = ""  # SHA-256 of (LSN, kind, length, payload) of every frame
        self.prefix_digest = ""  # of its first `prefix_frames` frames (a journal's branch)

    def load(self, f: ReadableFile, prefix_frames: int = 0) -> None:
        h = hashlib.sha256()
        for hdr, payload, poff in _iter_spool(f):
            if not self.first_lsn:
                self.first_lsn = hdr.lsn
            self.last_lsn = hdr.lsn
            self.frames += 1
            h.update(struct.pack("<QBI", hdr.lsn, hdr.kind, len(payload)))
            h.update(payload)
            if self.frames == prefix_frames:
                self.prefix_digest = h.hexdigest()
            if hdr.kind is fmt.FrameKind.HOLE:
                self.holes += 1
                continue
            try:
                self._frame(hdr.lsn, payload, poff)
            except fmt.FormatError as e:
                raise MergeError(f"branch frame LSN {hdr.lsn}: {e}") from None
        self.digest = h.hexdigest()

    def _frame(self, lsn: int, payload: bytes, poff: int) -> None:
        for typ, off, ln in fmt.iter_record_spans(payload):
            body = payload[off : off + ln]
            if typ == fmt.RecordType.BLOB:
                h = body[:32]
                size, nchunks = struct.unpack_from("<QI", body, 32)
                if nchunks:
                    self.blobs[h] = _BlobLoc(size, nchunks, stream=body[44:60])
                else:
                    self.blobs[h] = _BlobLoc(size, 0, _Loc(poff + off + 44, ln - 44))
            elif typ == fmt.RecordType.CHUNK:
                (idx,) = struct.unpack_from("<I", body, 16)
                self.chunks.setdefault(body[:16], {})[idx] = _Loc(poff + off + 20, ln - 20)
            elif typ == fmt.RecordType.MIME_META:
                if ln > 32:
                    self.meta[body[:32]] = (body[32], _Loc(poff + off + 33, ln - 33))
            elif typ in (fmt.RecordType.RECLAIMED, fmt.RecordType.HOLE):
                continue
            else:
                self._record(lsn, fmt.decode_record(typ, body))

    def _modseq(self, mailbox: bytes, modseq: int) -> None:
        self.max_modseq[mailbox] = max(self.max_modseq.get(mailbox, 0), modseq)

    def _record(self, lsn: int, rec: fmt.Record) -> None:
        if isinstance(rec, fmt.Deliver):
            for t in rec.targets:
                m = _BMsg(
                    lsn,
                    t.mailbox,
                    t.uid,
                    t.msg_guid,
                    rec.blob,
                    rec.size,
                    rec.internaldate_ms,
                    rec.flags,
                    list(rec.keywords),
                )
                self.order.append(m)
                self.live[(t.mailbox, t.uid)] = m
                self.delivered.setdefault(t.mailbox, {})[t.uid] = rec.blob
                self.max_uid[t.mailbox] = max(self.max_uid.get(t.mailbox, 0), t.uid)
                self._modseq(t.mailbox, t.modseq)
        elif isinstance(rec, fmt.Flags | fmt.Expunge):
            self._modseq(rec.mailbox, rec.modseq)
            mine = self.delivered.get(rec.mailbox, {})
            prefix = []
            for u in rec.uids:
                bm = self.live.get((rec.mailbox, u))
                if bm is None:
                    if u not in mine:
                        prefix.append(u)
                    continue
                if isinstance(rec, fmt.Expunge):
                    bm.gone = "expunged on the loser"
                    del self.live[(rec.mailbox, u)]
                else:
                    bm.deltas.append((lsn, rec))
                    bm.flags = (bm.flags | rec.add) & ~rec.remove & 0xFF
                    _kw_add(bm.keywords, rec.add_keywords)
                    _kw_remove(bm.keywords, rec.remove_keywords)
            if prefix:
                flags = rec if isinstance(rec, fmt.Flags) else None
                self.prefix_ops.append(_PrefixOp(lsn, rec.mailbox, tuple(prefix), flags))
        elif isinstance(rec, fmt.Reserve):  # a floor the loser reserved (e.g. its own merge)
            if rec.uidnext:
                self.max_uid[rec.mailbox] = max(self.max_uid.get(rec.mailbox, 0), rec.uidnext - 1)
            self._modseq(rec.mailbox, rec.highestmodseq)
        elif isinstance(rec, _STRUCTURAL):
            self.structural.append((lsn, rec))
            if isinstance(rec, fmt.MailboxCreate):
                self.created_mailboxes.add(rec.mailbox)
                self.mailbox_info[rec.mailbox] = (rec.account, rec.name)
            elif isinstance(rec, fmt.MailboxRename):
                acct = self.mailbox_info.get(rec.mailbox, (None, ""))[0]
                self.mailbox_info[rec.mailbox] = (acct, rec.name)
            elif isinstance(rec, fmt.MailboxDelete):
                self.deleted_mailboxes.add(rec.mailbox)
            elif isinstance(rec, fmt.AccountPut):
                self.account_puts[rec.account] = rec
            elif isinstance(rec, fmt.AccountDelete):
                self.deleted_accounts.add(rec.account)
        elif isinstance(rec, fmt.QueueAdd):
            self.queue_new[rec.entry] = _BQueue(
                lsn, rec.entry, rec.blob, rec.sender, list(rec.recipients), rec.params
            )
        elif isinstance(rec, fmt.QueueDone):
            q = self.queue_new.get(rec.entry)
            if q is None:
                if rec.result in _FINAL:
                    self.queue_done.append((lsn, rec))
            elif rec.result in _FINAL and rec.recipient in q.recipients:
                q.recipients.remove(rec.recipient)
        # QUEUE_ATTEMPT: bookkeeping of the loser's runner; a recipient without a final result
        # stays pending on the winner (at least once).


# --- pass 2: the winner's side ----------------------------------------------------------------

_WINNER_TYPES = frozenset(
    {
        fmt.RecordType.DELIVER,
        fmt.RecordType.MAILBOX_RENAME,
        fmt.RecordType.MAILBOX_DELETE,
        fmt.RecordType.ACCOUNT_PUT,
        fmt.RecordType.ACCOUNT_DELETE,
        fmt.RecordType.ALIAS_SET,
        fmt.RecordType.ALIAS_REMOVE,
        fmt.RecordType.DOMAIN_ADD,
        fmt.RecordType.DOMAIN_REMOVE,
    }
)


class _WinnerSide:
    """What the winner changed after ``d`` (its own frames)."""

    def __init__(self) -> None:
        self.delivered_mailboxes: set[bytes] = set()
        self.delivered: dict[bytes, set[int]] = {}
        self.renamed: set[bytes] = set()
        self.deleted_mailboxes: set[bytes] = set()
        self.account_puts: set[bytes] = set()
        self.deleted_accounts: set[bytes] = set()
        self.aliases: set[str] = set()
        self.domains: set[str] = set()

    def load(self, store: Store, after: int, upto: int) -> None:
        for raw in store.read_frames(after + 1):
            hdr = fmt.decode_frame_header(raw)
            if hdr.lsn > upto:
                break  # the merge's own transactions (a resumed merge) are not the winner's
            if hdr.kind is not fmt.FrameKind.TXN:
                continue
            payload = raw[fmt.FRAME_HEADER_SIZE :]
            for typ, off, ln in fmt.iter_record_spans(payload):
                if typ not in _WINNER_TYPES:
                    continue
                rec = fmt.decode_record(typ, payload[off : off + ln])
                if isinstance(rec, fmt.Deliver):
                    for tg in rec.targets:
                        self.delivered_mailboxes.add(tg.mailbox)
                        self.delivered.setdefault(tg.mailbox, set()).add(tg.uid)
                elif isinstance(rec, fmt.MailboxRename):
                    self.renamed.add(rec.mailbox)
                elif isinstance(rec, fmt.MailboxDelete):
                    self.deleted_mailboxes.add(rec.mailbox)
                elif isinstance(rec, fmt.AccountPut):
                    self.account_puts.add(rec.account)
                elif isinstance(rec, fmt.AccountDelete):
                    self.deleted_accounts.add(rec.account)
                elif isinstance(rec, fmt.AliasSet | fmt.AliasRemove):
                    self.aliases.add(rec.source)
                elif isinstance(rec, fmt.DomainAdd | fmt.DomainRemove):
                    self.domains.add(rec.name)


class _Catalog:
    """Names in the common prefix (the winner's log up to ``d``): for mailboxes and accounts the
    winner deleted since. Scanned once, on first use."""

    def __init__(self, store: Store, upto: int) -> None:
        self._store = store
        self._upto = upto
        self._loaded = False
        self.mailboxes: dict[bytes, tuple[bytes, str, int]] = {}
        self.accounts: dict[bytes, fmt.AccountPut] = {}

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        want = (
            fmt.RecordType.MAILBOX_CREATE,
            fmt.RecordType.MAILBOX_RENAME,
            fmt.RecordType.ACCOUNT_PUT,
        )
        for raw in self._store.read_frames(1):
            hdr = fmt.decode_frame_header(raw)
            if hdr.lsn > self._upto:
                break
            if hdr.kind is not fmt.FrameKind.TXN:
                continue
            payload = raw[fmt.FRAME_HEADER_SIZE :]
            for typ, off, ln in fmt.iter_record_spans(payload):
                if typ not in want:
                    continue
                rec = fmt.decode_record(typ, payload[off : off + ln])
                if isinstance(rec, fmt.MailboxCreate):
                    self.mailboxes[rec.mailbox] = (rec.account, rec.name, rec.special_use)
                elif isinstance(rec, fmt.MailboxRename) and rec.mailbox in self.mailboxes:
                    a, _, su = self.mailboxes[rec.mailbox]
                    self.mailboxes[rec.mailbox] = (a, rec.name, su)
                elif isinstance(rec, fmt.AccountPut):
                    self.accounts[rec.account] = rec

    def mailbox(self, g: bytes) -> tuple[bytes, str, int] | None:
        self._load()
        return self.mailboxes.get(g)

    def account(self, g: bytes) -> fmt.AccountPut | None:
        self._load()
        return self.accounts.get(g)


# --- the audit log ----------------------------------------------------------------------------


class _Audit:
    """One JSON object per line: time, merge id, rule, then the decision's fields."""

    def __init__(
        self, path: str, fs: FileSystem, merge_id: str, clock: Callable[[], float]
    ) -> None:
        self.path = path
        self._f = fs.open_append(path)
        self._id = merge_id
        self._clock = clock
        self.counts: dict[str, int] = {}

    def __call__(self, rule: str, **fields: object) -> None:
        self.counts[rule] = self.counts.get(rule, 0) + 1
        rec: dict[str, object] = {"time": round(self._clock(), 3), "merge": self._id}
        rec["rule"] = rule
        for k, v in fields.items():
            if v is None:
                continue
            rec[k] = v.hex() if isinstance(v, bytes) else v
        self._f.write(json.dumps(rec, sort_keys=False).encode() + b"\n")

    def close(self) -> None:
        self._f.sync()
        self._f.close()


# --- the progress journal ---------------------------------------------------------------------


class _Journal:
    """The merge's progress, one JSON object per line, each made durable (fsio) before the
    merge goes on: ``start`` (the branch's identity and the winner's last LSN before the
    merge), ``unit`` (keys of branch items whose transaction is durable, with the map entries
    it made), ``intent`` (a queue entry about to be added, named before its commit) and
    ``done``. A torn last line (a crash while writing it) is ignored."""

    def __init__(self, path: str, fs: FileSystem) -> None:
        self.path = path
        self.fs = fs
        self.header: dict[str, object] | None = None
        self.done_keys: set[str] = set()
        self.intents: dict[str, str] = {}
        self.maps: list[tuple[str, str, str]] = []  # (map, key hex, value hex or "")
        self.finished: dict[str, object] | None = None
        self._f: WritableFile | None = None

    def load(self) -> None:
        if not self.fs.exists(self.path):
            return
        f = self.fs.open_read(self.path)
        try:
            text = f.pread(f.size(), 0)
        finally:
            f.close()
        for line in text.split(b"\n"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line
            if not isinstance(rec, dict):
                continue
            kind = rec.get("t")
            if kind == "start":
                self.header = rec
            elif kind == "unit":
                self.done_keys.update(str(k) for k in rec.get("keys", ()))
                self.maps += [(str(a), str(b), str(c)) for a, b, c in rec.get("maps", ())]
            elif kind == "intent":
                self.intents[str(rec.get("key"))] = str(rec.get("entry"))
            elif kind == "done":
                self.finished = rec

    def begin(self, header: dict[str, object]) -> None:
        """Start a new journal (replacing any other, atomically)."""
        self.header = header
        self.done_keys, self.intents, self.maps, self.finished = set(), {}, [], None
        self.fs.write_atomic(self.path, json.dumps({"t": "start", **header}).encode() + b"\n")

    def append(self, rec: dict[str, object]) -> None:
        if self._f is None:
            self._f = self.fs.open_append(self.path)
        self._f.write(json.dumps(rec).encode() + b"\n")
        self._f.sync()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class _MapLog(dict[bytes, bytes | None]):
    """A dict that remembers the entries set since the last `take` (journalled per unit)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.dirty: list[tuple[str, str, str]] = []

    def __setitem__(self, k: bytes, v: bytes | None) -> None:
        super().__setitem__(k, v)
        self.dirty.append((self.name, k.hex(), v.hex() if v is not None else ""))


class _SetLog(set[bytes]):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.dirty: list[tuple[str, str, str]] = []

    def add(self, v: bytes) -> None:
        super().add(v)
        self.dirty.append((self.name, v.hex(), ""))


# --- the report -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MergeReport:
    merge_id: str
    divergence_lsn: int
    branch_first_lsn: int
    branch_last_lsn: int
    branch_frames: int
    redelivered: int
    collisions: int
    changes: int
    unresolved: int
    audit_path: str
    rules: dict[str, int] = field(default_factory=dict)
    digest: str = ""  # of the branch's frames (the journal's identity of the branch)
    resumed: bool = False  # a merge interrupted earlier was resumed (the journal)
    already_merged: bool = False  # the journal says this branch was merged before: no replay


# --- pass 3: the replay -----------------------------------------------------------------------


@dataclass(slots=True)
class _Item:
    """One delivery to make on the winner."""

    rule: str
    target: bytes
    blob: bytes
    flags: int
    keywords: list[str]
    idate: int
    old_uid: int
    old_mailbox: bytes
    old_guid: bytes
    lsn: int = 0
    detail: str = ""
    expunge_uid: int = 0  # a collision: the winner's message at this UID goes
    key: str = ""  # the journal's name of this item


def _op_key(op: _PrefixOp) -> str:
    kind = "x" if op.flags is None else "f"
    return f"p:{op.lsn}:{op.mailbox.hex()}:{kind}:{','.join(map(str, op.uids))}"


class _Merge:
    def __init__(
        self,
        store: Store,
        spool: ReadableFile,
        branch: _Branch,
        winner: _WinnerSide,
        catalog: _Catalog,
        audit: _Audit,
        journal: _Journal,
        fault: Callable[[str], None] | None = None,
    ) -> None:
        self.st = store
        self.ix = store.index
        self.spool = spool
        self.b = branch
        self.w = winner
        self.catalog = catalog
        self.audit = audit
        self.journal = journal
        self._fault = fault
        self.resumed = False
        self.acct_map = _MapLog("acct")
        self.mb_map = _MapLog("mb")
        self.merge_accounts = _SetLog("macct")
        self.merge_mailboxes = _SetLog("mmb")
        self._guid_sets: dict[bytes, set[bytes]] = {}
        self.targets: dict[bytes, tuple[bytes | None, str, str]] = {}
        self.uid_floor: dict[bytes, int] = {}
        self.modseq_floor: dict[bytes, int] = {}
        self.touched_accounts: set[bytes] = set()
        self.redelivered = 0
        self.collisions = 0
        self.changes = 0
        self.unresolved = 0
        self.extra_ops: list[_PrefixOp] = []
        self._winner_new: dict[bytes, dict[bytes, list[int]]] = {}
        self._collided: dict[tuple[bytes, int], _Item] = {}

    # -- the journal ---------------------------------------------------------------------------

    def restore(self) -> None:
        """Resume: the map entries an interrupted run journalled (done keys are looked up in
        ``self.journal.done_keys`` as the passes go)."""
        self.resumed = True
        for key, entry in self.journal.intents.items():
            # A creation whose commit was durable but whose map entry was not journalled.
            kind, _, k = key.partition(":")
            g = bytes.fromhex(entry)
            if kind == "acct" and g in self.ix.accounts:
                dict.__setitem__(self.acct_map, bytes.fromhex(k), g)
                set.add(self.merge_accounts, g)
            elif kind == "mb" and g in self.ix.mailboxes:
                dict.__setitem__(self.mb_map, bytes.fromhex(k), g)
                set.add(self.merge_mailboxes, g)
            elif kind == "rec" and g in self.ix.mailboxes:
                set.add(self.merge_mailboxes, g)
        for name, k, v in self.journal.maps:
            kb, val = bytes.fromhex(k), bytes.fromhex(v) if v else None
            if name in ("acct", "mb"):
                dmap: dict[bytes, bytes | None] = self.acct_map if name == "acct" else self.mb_map
                dict.__setitem__(dmap, kb, val)
            elif name in ("macct", "mmb"):
                smap: set[bytes] = self.merge_accounts if name == "macct" else self.merge_mailboxes
                set.add(smap, kb)

    def _intent(self, key: str, created: list[bytes]) -> Callable[[], None]:
        """Before the commit of a creation: journal the GUID it will have (see `restore`)."""

        def note() -> None:
            self.journal.append({"t": "intent", "key": key, "entry": created[0].hex()})

        return note

    def _done(self, key: str) -> bool:
        return key in self.journal.done_keys

    def _unit(self, keys: Sequence[str]) -> None:
        """A transaction of the merge is durable: journal the branch items it replayed and the
        map entries made since the last line (a fault hook on each side, for the tests)."""
        if self._fault is not None:
            self._fault("committed")
        dirty = []
        for m in (self.acct_map, self.mb_map, self.merge_accounts, self.merge_mailboxes):
            dirty += m.dirty
            m.dirty = []
        if keys or dirty:
            self.journal.append(
                {"t": "unit", "keys": list(keys), "lsn": self.st.last_lsn, "maps": dirty}
            )
            self.journal.done_keys.update(keys)
        if self._fault is not None:
            self._fault("journaled")

    def _has_guid(self, g: bytes, msg_guid: bytes) -> bool:
        """Resume only: does mailbox ``g`` hold a message with this GUID (a re-delivery whose
        commit was durable but not yet journalled when the winner stopped)?"""
        got = self._guid_sets.get(g)
        if got is None:
            mb = self.ix.mailboxes.get(g)
            got = set() if mb is None else {mb.msg_guid(i) for i in range(len(mb))}
            self._guid_sets[g] = got
        return msg_guid in got

    # -- helpers -------------------------------------------------------------------------------

    def _check_store(self) -> None:
        if self.st.state is not StoreState.OPEN:
            raise MergeError(f"the store is {self.st.state.value}: merge stopped")

    async def _run(
        self,
        what: str,
        build: Callable[[Transaction], None],
        before_commit: Callable[[], None] | None = None,
    ) -> bool:
        """One transaction; a refusal is audited (``merge:skipped``) and returns False."""
        self._check_store()
        t = self.st.transaction()
        try:
            build(t)
        except StoreError as e:
            t.abort()
            self.audit("merge:skipped", what=what, error=str(e))
            return False
        if before_commit is not None:
            before_commit()
        try:
            await t.commit_async()
        except StoreError as e:
            self._check_store()
            self.audit("merge:skipped", what=what, error=str(e))
            return False
        return True

    def _account(self, la: bytes | None) -> bytes | None:
        """The winner's account for the loser's account GUID (None: none now)."""
        if la is None:
            return None
        if la in self.acct_map:
            g = self.acct_map[la]
            return g if g is not None and g in self.ix.accounts else None
        return la if la in self.ix.accounts else None

    def _mailbox(self, lm: bytes) -> bytes | None:
        if lm in self.mb_map:
            g = self.mb_map[lm]
            return g if g is not None and g in self.ix.mailboxes else None
        return lm if lm in self.ix.mailboxes else None

    def _loser_account_of(self, lm: bytes) -> bytes | None:
        info = self.b.mailbox_info.get(lm)
        if info is not None and info[0] is not None:
            return info[0]
        mb = self.ix.mailboxes.get(lm)
        if mb is not None:
            return mb.account
        c = self.catalog.mailbox(lm)
        return c[0] if c is not None else None

    # -- structural ----------------------------------------------------------------------------

    async def structural(self) -> None:
        for i, (lsn, rec) in enumerate(self.b.structural):
            key = f"s:{lsn}:{i}"
            if self._done(key):
                continue
            await self._structural(lsn, rec)
            self._unit([key])

    async def _structural(self, lsn: int, rec: fmt.Record) -> None:
        if isinstance(rec, fmt.AccountPut):
            await self._account_put(lsn, rec)
        elif isinstance(rec, fmt.AccountDelete):
            await self._account_delete(lsn, rec)
        elif isinstance(rec, fmt.MailboxCreate):
            await self._mailbox_create(lsn, rec)
        elif isinstance(rec, fmt.MailboxRename):
            await self._mailbox_rename(lsn, rec)
        elif isinstance(rec, fmt.MailboxDelete):
            await self._mailbox_delete(lsn, rec)
        elif isinstance(rec, fmt.Subscribe):
            await self._subscribe(lsn, rec)
        else:
            await self._global(lsn, rec)

    async def _subscribe(self, lsn: int, rec: fmt.Subscribe) -> None:
        a = self._account(rec.account)
        if a is None:
            return
        sub, name = rec.subscribed, rec.name
        if (name in self.ix.accounts[a].subscriptions) == sub:
            return
        if await self._run("subscribe", lambda t: t.subscribe(a, name, sub)):
            self.audit("merge:subscribe", lsn=lsn, account=a, name=name, subscribed=sub)

    async def _account_put(self, lsn: int, rec: fmt.AccountPut) -> None:
        g = rec.account
        existing: ix.Account | None = None
        conflict = False
        if g in self.acct_map:  # created (or mapped) by this merge
            mapped = self.acct_map[g]
            if mapped is None or mapped not in self.merge_accounts:
                return  # mapped onto a winner's account: the winner's settings stay
            existing = self.ix.accounts.get(mapped)
            if existing is None:
                return
        elif g in self.ix.accounts:
            existing = self.ix.accounts[g]
            conflict = g in self.w.account_puts
        if existing is not None:
            if conflict:
                self.audit(
                    "merge:account-update-conflict",
                    lsn=lsn,
                    account=existing.guid,
                    address=existing.address,
                    detail="changed on both sides: the winner's settings are kept",
                )
                return
            if (existing.password_hash, existing.quota_bytes) == (
                rec.password_hash,
                rec.quota_bytes,
            ):
                return
            addr, pw, quota = existing.address, rec.password_hash, rec.quota_bytes
            if await self._run(
                "account update",
                lambda t: t.update_account(addr, password_hash=pw, quota_bytes=quota),
            ):
                self.audit("merge:account-update", lsn=lsn, account=existing.guid, address=addr)
            return
        if g in self.w.deleted_accounts:
            self.audit(
                "merge:account-update-on-deleted",
                lsn=lsn,
                loser_account=g,
                address=rec.address,
                detail="deleted on the winner; recreated only if mail for it is merged",
            )
            return
        if g in self.b.deleted_accounts:
            self.audit(
                "merge:account-create",
                lsn=lsn,
                loser_account=g,
                address=rec.address,
                detail="created and deleted again on the loser: nothing to do",
            )
            self.acct_map[g] = None
            return
        await self._create_account(g, rec, lsn, "merge:account-create")

    async def _create_account(
        self, g: bytes, rec: fmt.AccountPut, lsn: int, rule: str
    ) -> bytes | None:
        """Create the loser's account on the winner, or map it onto the winner's account with
        the same address."""
        try:
            addr = normalize_address(rec.address)
        except InvalidArgument:
            addr = rec.address
        other = self.ix.account_by_address(addr)
        if other is not None:
            self.acct_map[g] = other.guid
            self.audit(
                f"{rule}-same-address",
                lsn=lsn,
                loser_account=g,
                account=other.guid,
                address=addr,
                detail="the address exists on the winner: the loser's mail goes to that account",
            )
            return other.guid
        domain = addr.rpartition("@")[2]
        if domain not in self.ix.domains and await self._run(
            "domain add", lambda t: t.add_domain(domain)
        ):
            self.audit("merge:domain-add", lsn=lsn, domain=domain, detail=f"needed by {addr}")
        created: list[bytes] = []
        ok = await self._run(
            "account create",
            lambda t: created.append(t.add_account(addr, rec.password_hash, rec.quota_bytes)),
            self._intent(f"acct:{g.hex()}", created),
        )
        if not ok or not created:
            self.acct_map[g] = None
            return None
        self.acct_map[g] = created[0]
        self.merge_accounts.add(created[0])
        self.audit(rule, lsn=lsn, loser_account=g, account=created[0], address=addr)
        return created[0]

    async def _account_delete(self, lsn: int, rec: fmt.AccountDelete) -> None:
        g = rec.account
        if g in self.acct_map:
            return  # created on the loser's branch and deleted again: never created here
        acct = self.ix.accounts.get(g)
        if acct is None:
            self.audit("merge:account-delete", lsn=lsn, account=g, detail="gone on the winner")
            return
        mail = [m for m in acct.mailboxes.values() if m in self.w.delivered_mailboxes]
        if mail:
            self.audit(
                "merge:mail-beats-account-delete",
                lsn=lsn,
                account=g,
                address=acct.address,
                detail=f"mail received on the winner in {len(mail)} mailbox(es): account kept",
            )
            return
        addr = acct.address
        if await self._run("account delete", lambda t: t.delete_account(addr)):
            self.audit("merge:account-delete", lsn=lsn, account=g, address=addr)

    async def _mailbox_create(self, lsn: int, rec: fmt.MailboxCreate) -> None:
        lm = rec.mailbox
        if lm in self.b.deleted_mailboxes:
            self.mb_map[lm] = None
            return  # created and deleted on the loser: nothing
        name = self.b.mailbox_info.get(lm, (None, rec.name))[1] or rec.name
        a = self._account(rec.account)
        if a is None:
            return  # resolved lazily if mail for it is merged (account gone on the winner)
        existing = self.ix.mailbox_by_name(a, name)
        if existing is not None:
            self.mb_map[lm] = existing.guid
            if a not in self.merge_accounts:
                self.audit(
                    "merge:mailbox-create-same-name",
                    lsn=lsn,
                    account=a,
                    loser_mailbox=lm,
                    mailbox=existing.guid,
                    name=name,
                    detail="a mailbox of that name exists on the winner: the loser's is merged "
                    "into it",
                )
            return
        created: list[bytes] = []
        su = rec.special_use
        if await self._run(
            "mailbox create",
            lambda t: created.append(t.create_mailbox(a, name, su)),
            self._intent(f"mb:{lm.hex()}", created),
        ):
            self.mb_map[lm] = created[0]
            self.merge_mailboxes.add(created[0])
            self.audit(
                "merge:mailbox-create",
                lsn=lsn,
                account=a,
                loser_mailbox=lm,
                mailbox=created[0],
                name=name,
            )
        else:
            self.mb_map[lm] = None

    async def _mailbox_rename(self, lsn: int, rec: fmt.MailboxRename) -> None:
        lm = rec.mailbox
        if lm in self.b.created_mailboxes:
            return  # created under its final name
        g = self._mailbox(lm)
        if g is None:
            return  # deleted on the winner: recreated under the loser's name if mail needs it
        mb = self.ix.mailboxes[g]
        if lm in self.w.renamed:
            self.audit(
                "merge:rename-vs-rename",
                lsn=lsn,
                account=mb.account,
                mailbox=g,
                name=mb.name,
                loser_name=rec.name,
                detail="renamed on both sides: the winner's name is kept",
            )
            return
        if mb.name == rec.name:
            return
        if self.ix.mailbox_by_name(mb.account, rec.name) is not None:
            self.audit(
                "merge:rename-name-taken",
                lsn=lsn,
                account=mb.account,
                mailbox=g,
                name=mb.name,
                loser_name=rec.name,
                detail="another mailbox has that name on the winner: the name is kept",
            )
            return
        old, new = mb.name, rec.name
        if await self._run("mailbox rename", lambda t: t.rename_mailbox(g, new)):
            self.audit(
                "merge:rename", lsn=lsn, account=mb.account, mailbox=g, old_name=old, name=new
            )

    async def _mailbox_delete(self, lsn: int, rec: fmt.MailboxDelete) -> None:
        lm = rec.mailbox
        if lm in self.b.created_mailboxes:
            return
        mb = self.ix.mailboxes.get(lm)
        if mb is None:
            self.audit("merge:mailbox-delete", lsn=lsn, mailbox=lm, detail="gone on the winner")
            return
        if lm in self.w.delivered_mailboxes:
            self.audit(
                "merge:delivery-beats-mailbox-delete",
                lsn=lsn,
                account=mb.account,
                mailbox=lm,
                name=mb.name,
                detail="mail was delivered into it on the winner: the mailbox is kept",
            )
            return
        name, acct = mb.name, mb.account
        if await self._run("mailbox delete", lambda t: t.delete_mailbox(lm)):
            self.audit("merge:mailbox-delete", lsn=lsn, account=acct, mailbox=lm, name=name)

    async def _global(self, lsn: int, rec: fmt.Record) -> None:
        if isinstance(rec, fmt.DomainAdd):
            if rec.name not in self.ix.domains:
                d = rec.name
                if await self._run("domain add", lambda t: t.add_domain(d)):
                    self.audit("merge:domain-add", lsn=lsn, domain=d)
        elif isinstance(rec, fmt.DomainRemove):
            if rec.name in self.ix.domains and rec.name not in self.w.domains:
                d = rec.name
                if await self._run("domain remove", lambda t: t.remove_domain(d)):
                    self.audit("merge:domain-remove", lsn=lsn, domain=d)
        elif isinstance(rec, fmt.AliasSet | fmt.AliasRemove):
            src = rec.source
            if src in self.w.aliases:
                self.audit(
                    "merge:alias-conflict",
                    lsn=lsn,
                    alias=src,
                    detail="changed on both sides: the winner's is kept",
                )
            elif isinstance(rec, fmt.AliasSet):
                if self.ix.aliases.get(src) != rec.targets:
                    tg = rec.targets
                    if await self._run("alias set", lambda t: t.set_alias(src, tg)):
                        self.audit("merge:alias-set", lsn=lsn, alias=src, targets=list(tg))
            elif src in self.ix.aliases and await self._run(
                "alias remove", lambda t: t.remove_alias(src)
            ):
                self.audit("merge:alias-remove", lsn=lsn, alias=src)

    # -- targets of re-deliveries --------------------------------------------------------------

    async def _target(self, lm: bytes) -> tuple[bytes | None, str, str]:
        """The winner's mailbox for mail of the loser's mailbox ``lm``: (GUID or None, rule,
        detail). Memoized; creates what is needed (deliveries beat deletes)."""
        hit = self.targets.get(lm)
        if hit is not None and (hit[0] is None or hit[0] in self.ix.mailboxes):
            return hit
        g = self._mailbox(lm)
        if g is not None:
            res: tuple[bytes | None, str, str] = (g, "merge:redeliver", "")
        else:
            res = await self._recreate(lm)
        self.targets[lm] = res
        return res

    async def _recreate(self, lm: bytes) -> tuple[bytes | None, str, str]:
        la = self._loser_account_of(lm)
        info = self.b.mailbox_info.get(lm)
        cat = self.catalog.mailbox(lm)
        name = info[1] if info is not None and info[1] else (cat[1] if cat else "")
        su = cat[2] if cat else 0
        if la is None or not name:
            return (None, "merge:unresolvable", "the mailbox is unknown on the winner")
        a = self._account(la)
        if a is None:
            put = self.b.account_puts.get(la) or self.catalog.account(la)
            if put is None:
                return (None, "merge:unresolvable", "the account is unknown on the winner")
            a = await self._create_account(la, put, 0, "merge:account-recreated")
            if a is None:
                return (None, "merge:unresolvable", "the account could not be recreated")
        existing = self.ix.mailbox_by_name(a, name)
        if existing is not None:
            if a in self.merge_accounts:
                self.mb_map[lm] = existing.guid
                return (
                    existing.guid,
                    "merge:mailbox-recreated",
                    f"{name} of the recreated account",
                )
            rec_mb = await self._recovered(a)
            if rec_mb is None:
                return (None, "merge:unresolvable", "no Recovered folder")
            return (
                rec_mb,
                "merge:recovered-folder",
                f"mailbox {name!r} was deleted on the winner and the name is taken",
            )
        created: list[bytes] = []
        if not await self._run(
            "mailbox recreate",
            lambda t: created.append(t.create_mailbox(a, name, su)),
            self._intent(f"mb:{lm.hex()}", created),
        ):
            rec_mb = await self._recovered(a)
            if rec_mb is None:
                return (None, "merge:unresolvable", "the mailbox could not be recreated")
            return (rec_mb, "merge:recovered-folder", f"mailbox {name!r} could not be recreated")
        self.mb_map[lm] = created[0]
        self.merge_mailboxes.add(created[0])
        self.audit(
            "merge:mailbox-recreated",
            account=a,
            loser_mailbox=lm,
            mailbox=created[0],
            name=name,
            detail="deleted on the winner, mail for it merged: recreated (new UIDVALIDITY)",
        )
        return (created[0], "merge:redeliver", "")

    async def _recovered(self, a: bytes) -> bytes | None:
        mb = self.ix.mailbox_by_name(a, RECOVERED)
        if mb is not None:
            return mb.guid
        created: list[bytes] = []
        if await self._run(
            "Recovered create",
            lambda t: created.append(t.create_mailbox(a, RECOVERED)),
            self._intent(f"rec:{a.hex()}", created),
        ):
            self.merge_mailboxes.add(created[0])
            self.audit("merge:recovered-folder-created", account=a, mailbox=created[0])
            return created[0]
        return None

    # -- bodies --------------------------------------------------------------------------------

    def _present(self, h: bytes) -> bool:
        b = self.ix.blobs
        s = b.slot(h)
        return s is not None and b.has_data(s) and b.refs[s] > 0

    def _read(self, loc: _Loc) -> bytes:
        data = self.spool.pread(loc.length, loc.offset)
        if len(data) != loc.length:
            raise MergeError("short read from the spool")
        return data

    def _attach(self, t: Transaction, h: bytes, done: set[bytes]) -> int:
        """Make body ``h`` available to transaction ``t``; returns the bytes it adds (0 when
        the winner already holds it). Raises LookupError when no copy exists anywhere."""
        if h in done:
            return 0
        bl = self.b.blobs.get(h)
        if (
            bl is not None
            and bl.nchunks == 0
            and bl.data is not None
            and (bl.size <= self.st.options.chunk_bytes or not self._present(h))
        ):
            # A small body is carried even if the winner holds it: the store writes it only if
            # it is absent when the transaction is encoded (no race with a concurrent expunge).
            t.put_blob(self._read(bl.data))
            done.add(h)
            self._attach_meta(t, h)
            return bl.size
        if self._present(h):
            done.add(h)
            return 0
        if bl is not None and bl.nchunks:
            parts = self.b.chunks.get(bl.stream, {})
            if all(i in parts for i in range(bl.nchunks)):
                w = t.blob_writer()
                for i in range(bl.nchunks):
                    w.write(self._read(parts[i]))
                if w.finish() != h:
                    raise MergeError("a body from the branch does not match its hash")
                done.add(h)
                self._attach_meta(t, h)
                return bl.size
        s = self.ix.blobs.slot(h)
        if s is not None and self.ix.blobs.has_data(s):
            data = self.st.read_blob(h)  # unreferenced on the winner, not yet reclaimed
            t.put_blob(data)
            done.add(h)
            return len(data)
        raise LookupError("message body not found on either side")

    def _attach_meta(self, t: Transaction, h: bytes) -> None:
        m = self.b.meta.get(h)
        if m is not None and self.st.read_mime_meta(h) is None:
            t.put_mime_meta(h, m[0], self._read(m[1]))

    # -- collisions and re-deliveries ----------------------------------------------------------

    def _floors(self) -> None:
        """Per mailbox both sides held at ``d`` (it exists here under its GUID): the UID and
        MODSEQ floors above the loser's counters."""
        for g, u in self.b.max_uid.items():
            if g in self.ix.mailboxes and g not in self.mb_map:
                self.uid_floor[g] = u + 1
        for g, m in self.b.max_modseq.items():
            if g in self.ix.mailboxes and g not in self.mb_map:
                self.modseq_floor[g] = m

    def _collisions(self) -> list[_Item]:
        out: list[_Item] = []
        for g, uids in self.b.delivered.items():
            mb = self.ix.mailboxes.get(g)
            if mb is None or g in self.mb_map:
                continue
            for u in sorted(uids):
                i = mb.position(u)
                if i is None or self.ix.blobs.hash_at(mb.blobs[i]) == uids[u]:
                    continue  # free, or the same message (same body) on both sides
                out.append(
                    _Item(
                        "merge:uid-collision",
                        g,
                        self.ix.blobs.hash_at(mb.blobs[i]),
                        mb.flags[i],
                        mb.keyword_names(mb.kwbits[i]),
                        mb.dates[i],
                        u,
                        g,
                        mb.msg_guid(i),
                        detail="both sides gave this UID to different messages: the winner's "
                        "is expunged and re-delivered under a fresh UID",
                        expunge_uid=u,
                        key=f"c:{g.hex()}:{u}",
                    )
                )
        return out

    def _same_message(self, g: bytes, m: _BMsg) -> int | None:
        """The UID of a message the winner added to ``g`` after ``d`` with the body of the
        loser's message ``m`` (not matched before, not moved away by a collision), or None."""
        by_blob = self._winner_new.get(g)
        if by_blob is None:
            by_blob = {}
            mb = self.ix.mailboxes.get(g)
            if mb is not None:
                for u in sorted(self.w.delivered.get(g, ())):
                    i = mb.position(u)
                    if i is not None:
                        by_blob.setdefault(self.ix.blobs.hash_at(mb.blobs[i]), []).append(u)
            self._winner_new[g] = by_blob
        cands = by_blob.get(m.blob)
        if not cands:
            return None
        u = m.uid if g == m.mailbox and m.uid in cands else cands[0]
        # A message about to move away by a collision still counts: its re-delivery is both.
        cands.remove(u)
        return u

    async def deliveries(self) -> None:
        self._floors()
        items = self._collisions()
        self._collided = {(it.target, it.expunge_uid): it for it in items}
        for m in self.b.order:
            if m.gone:
                continue
            key = f"d:{m.mailbox.hex()}:{m.uid}"
            if self._done(key):
                continue  # re-delivered before the winner stopped (the journal)
            la = self._loser_account_of(m.mailbox)
            if m.mailbox in self.b.deleted_mailboxes:
                m.gone = "its mailbox was deleted on the loser"
            elif la is not None and la in self.b.deleted_accounts:
                m.gone = "its account was deleted on the loser"
            if m.gone:
                self.audit(
                    "merge:deleted-on-loser",
                    lsn=m.lsn,
                    loser_mailbox=m.mailbox,
                    message=m.guid,
                    old_uid=m.uid,
                    detail=m.gone,
                )
                continue
            g, rule, detail = await self._target(m.mailbox)
            if any(x.dirty for x in (self.acct_map, self.mb_map, self.merge_mailboxes)):
                self._unit([])  # what _target created: journalled before mail goes there
            if g is None:
                self.unresolved += 1
                self.audit(
                    rule,
                    lsn=m.lsn,
                    loser_mailbox=m.mailbox,
                    message=m.guid,
                    old_uid=m.uid,
                    blob=m.blob,
                    detail=detail,
                )
                continue
            if self.resumed and self._has_guid(g, m.guid):
                self.audit(
                    "merge:resume-already-delivered",
                    lsn=m.lsn,
                    mailbox=g,
                    message=m.guid,
                    old_uid=m.uid,
                    detail="re-delivered before the winner stopped (durable, not yet journalled)",
                )
                continue
            same = self._same_message(g, m)
            if same is not None:
                self.audit(
                    "merge:same-message",
                    lsn=m.lsn,
                    mailbox=g,
                    message=m.guid,
                    old_uid=m.uid,
                    uid=same,
                    detail="the same body was added to this mailbox on both sides (a copy or "
                    "move made twice, an APPEND retried): kept once; the loser's flag changes "
                    "are applied to it",
                )
                moving = self._collided.get((g, same))
                if moving is None:
                    self.extra_ops += [_PrefixOp(lsn, g, (same,), f) for lsn, f in m.deltas]
                    continue
                for _lsn, f in m.deltas:  # applied before its re-delivery
                    moving.flags = (moving.flags | f.add) & ~f.remove & 0xFF
                    _kw_add(moving.keywords, f.add_keywords)
                    _kw_remove(moving.keywords, f.remove_keywords)
                continue
            items.append(
                _Item(
                    rule,
                    g,
                    m.blob,
                    m.flags,
                    m.keywords,
                    m.idate,
                    m.uid,
                    m.mailbox,
                    m.guid,
                    m.lsn,
                    detail,
                    key=key,
                )
            )
        batch: list[_Item] = []
        size = 0
        for it in items:
            bl = self.b.blobs.get(it.blob)
            size += bl.size if bl is not None else 0
            batch.append(it)
            if len(batch) >= BATCH_MESSAGES or size >= BATCH_BODY_BYTES:
                await self._deliver_batch(batch)
                batch, size = [], 0
        if batch:
            await self._deliver_batch(batch)

    async def _deliver_batch(self, items: list[_Item]) -> None:
        if not await self._try_deliver(items, keywords=True):
            for it in items:
                if not await self._try_deliver([it], keywords=True) and not (
                    it.keywords and await self._try_deliver([it], keywords=False)
                ):
                    self.unresolved += 1
                    self.audit(
                        "merge:failed",
                        lsn=it.lsn,
                        mailbox=it.target,
                        loser_mailbox=it.old_mailbox,
                        message=it.old_guid,
                        old_uid=it.old_uid,
                        blob=it.blob,
                        detail="the store refused the re-delivery",
                    )

    async def _try_deliver(self, items: list[_Item], *, keywords: bool) -> bool:
        self._check_store()
        t = self.st.transaction()
        done: set[bytes] = set()
        results = []
        try:
            for g in dict.fromkeys(it.target for it in items):
                # The floors (above the loser's UIDs and MODSEQs) go first: they bind every
                # delivery of this transaction, and persist even if the merge stops here.
                t.reserve(
                    g, uidnext=self.uid_floor.get(g, 0), highestmodseq=self.modseq_floor.get(g, 0)
                )
            for it in items:
                if it.expunge_uid:
                    mb = self.ix.mailboxes.get(it.target)
                    if mb is None or mb.position(it.expunge_uid) is None:
                        t.abort()
                        return False  # expunged meanwhile: retried alone, then dropped
                try:
                    self._attach(t, it.blob, done)
                except LookupError:
                    if len(items) > 1:
                        raise
                    self.unresolved += 1
                    self.audit(
                        "merge:body-missing",
                        lsn=it.lsn,
                        mailbox=it.target,
                        message=it.old_guid,
                        old_uid=it.old_uid,
                        blob=it.blob,
                        detail="no copy of the body on either side: message skipped",
                    )
                    t.abort()
                    return True
                results.append(
                    t.deliver(
                        it.blob,
                        [it.target],
                        flags=it.flags,
                        keywords=it.keywords if keywords else (),
                        internaldate_ms=it.idate,
                        msg_guid=it.old_guid,  # the same UIDL on both sides of the merge
                    )
                )
                if it.expunge_uid:
                    t.expunge(it.target, [it.expunge_uid])
        except (StoreError, LookupError):
            t.abort()
            return False
        try:
            await t.commit_async()
        except StoreError as e:
            self._check_store()
            log.info("merge: a delivery batch was refused (%s); retrying one by one", e)
            return False
        self._unit([it.key for it in items if it.key])
        for it, d in zip(items, results, strict=True):
            new_uid = d.uids[it.target]
            mb = self.ix.mailboxes.get(it.target)
            acct = mb.account if mb is not None else None
            if acct is not None:
                self.touched_accounts.add(acct)
            floor = self.uid_floor.get(it.target, 0)
            if new_uid < floor:
                self.audit(
                    "merge:uid-floor-missed",
                    mailbox=it.target,
                    new_uid=new_uid,
                    floor=floor,
                    detail="the store gave a UID below the floor (a bug)",
                )
            if it.expunge_uid:
                self.collisions += 1
            else:
                self.redelivered += 1
            self.audit(
                it.rule,
                lsn=it.lsn or None,
                account=acct,
                mailbox=it.target,
                loser_mailbox=it.old_mailbox if it.old_mailbox != it.target else None,
                message=it.old_guid,
                new_message=d.msg_guids[it.target],
                old_uid=it.old_uid,
                new_uid=new_uid,
                modseq=d.modseqs[it.target],
                keywords_dropped=True if it.keywords and not keywords else None,
                detail=it.detail or None,
            )
        return True

    # -- deltas on the common prefix -----------------------------------------------------------

    async def prefix_ops(self) -> None:
        ops = sorted(self.b.prefix_ops + self.extra_ops, key=lambda o: o.lsn)
        ops = [o for o in ops if not self._done(_op_key(o))]
        for i in range(0, len(ops), BATCH_CHANGES):
            await self._ops_batch(ops[i : i + BATCH_CHANGES])

    async def _ops_batch(self, ops: Sequence[_PrefixOp]) -> None:
        live: list[tuple[_PrefixOp, tuple[int, ...]]] = []
        for op in ops:
            kind = "merge:flags" if op.flags is not None else "merge:expunge"
            mb = self.ix.mailboxes.get(op.mailbox)
            if mb is None:
                self.audit(
                    f"{kind}-target-gone",
                    lsn=op.lsn,
                    mailbox=op.mailbox,
                    uids=list(op.uids),
                    detail="the mailbox is gone on the winner",
                )
                continue
            here = tuple(u for u in op.uids if mb.position(u) is not None)
            gone = [u for u in op.uids if mb.position(u) is None]
            if gone:
                self.audit(
                    f"{kind}-target-gone",
                    lsn=op.lsn,
                    account=mb.account,
                    mailbox=op.mailbox,
                    uids=gone,
                    detail="expunged on the winner",
                )
            if here:
                live.append((op, here))
        if not live:
            return
        if not await self._try_ops(live):
            for one in live:
                if not await self._try_ops([one]):
                    op, uids = one
                    self.audit(
                        "merge:failed",
                        lsn=op.lsn,
                        mailbox=op.mailbox,
                        uids=list(uids),
                        detail="the store refused the change",
                    )

    async def _try_ops(self, live: list[tuple[_PrefixOp, tuple[int, ...]]]) -> bool:
        self._check_store()
        t = self.st.transaction()
        changes = []
        try:
            for g in dict.fromkeys(op.mailbox for op, _ in live):
                t.reserve(g, highestmodseq=self.modseq_floor.get(g, 0))
            for op, uids in live:
                f = op.flags
                if f is None:
                    changes.append(t.expunge(op.mailbox, uids))
                else:
                    changes.append(
                        t.store_flags(
                            op.mailbox,
                            uids,
                            add=f.add,
                            remove=f.remove,
                            add_keywords=f.add_keywords,
                            remove_keywords=f.remove_keywords,
                        )
                    )
        except StoreError:
            t.abort()
            return False
        try:
            await t.commit_async()
        except StoreError:
            self._check_store()
            return False
        self._unit([_op_key(op) for op, _ in live])
        for (op, _uids), c in zip(live, changes, strict=True):
            if not c.uids:
                continue
            self.changes += 1
            mb = self.ix.mailboxes.get(op.mailbox)
            f = op.flags
            self.audit(
                "merge:flags" if f is not None else "merge:expunge",
                lsn=op.lsn,
                account=mb.account if mb is not None else None,
                mailbox=op.mailbox,
                uids=list(c.uids),
                add=_flag_names(f.add) if f is not None else None,
                remove=_flag_names(f.remove) if f is not None else None,
                add_keywords=list(f.add_keywords) if f is not None and f.add_keywords else None,
                remove_keywords=(
                    list(f.remove_keywords) if f is not None and f.remove_keywords else None
                ),
                modseq=c.modseq,
            )
        return True

    # -- queue ---------------------------------------------------------------------------------

    async def queue(self) -> None:
        for q in sorted(self.b.queue_new.values(), key=lambda q: q.lsn):
            qkey = f"q:{q.entry.hex()}"
            if self._done(qkey):
                continue
            was = self.journal.intents.get(qkey)
            if was is not None and bytes.fromhex(was) in self.ix.queue:
                self._unit([qkey])  # added before the winner stopped, not yet journalled
                continue
            if not q.recipients:
                self.audit(
                    "merge:queue-done-on-loser",
                    lsn=q.lsn,
                    loser_entry=q.entry,
                    detail="every recipient was finished on the loser",
                )
                continue
            added: list[bytes] = []
            done: set[bytes] = set()

            def build(
                t: Transaction,
                q: _BQueue = q,
                added: list[bytes] = added,
                done: set[bytes] = done,
            ) -> None:
                try:
                    self._attach(t, q.blob, done)
                except LookupError:
                    raise InvalidArgument("the queued body is missing on both sides") from None
                added.append(t.queue_add(q.blob, q.sender, q.recipients, q.params))

            def intent(qkey: str = qkey, added: list[bytes] = added) -> None:
                self.journal.append({"t": "intent", "key": qkey, "entry": added[0].hex()})

            if await self._run("queue add", build, intent):
                self._unit([qkey])
                self.audit(
                    "merge:queue-add",
                    lsn=q.lsn,
                    loser_entry=q.entry,
                    entry=added[0],
                    recipients=list(q.recipients),
                    detail="re-queued on the winner (at least once)",
                )
            else:
                self.unresolved += 1
        for lsn, rec in self.b.queue_done:
            e = self.ix.queue.get(rec.entry)
            if e is None or rec.recipient not in e.recipients:
                self.audit(
                    "merge:queue-already-done",
                    lsn=lsn,
                    entry=rec.entry,
                    recipient=rec.recipient,
                    detail="finished (or removed) on the winner too",
                )
                continue
            await self._queue_done(lsn, rec)

    async def _queue_done(self, lsn: int, rec: fmt.QueueDone) -> None:
        entry, rcpt, res, detail = rec.entry, rec.recipient, rec.result, rec.detail
        warned = bool(rec.flags & fmt.QueueDoneFlag.WARNED)
        if await self._run(
            "queue done",
            lambda t: t.queue_done(entry, rcpt, res, detail or "merged", warned=warned),
        ):
            self.audit(
                "merge:queue-done",
                lsn=lsn,
                entry=entry,
                recipient=rcpt,
                result=res.name,
                detail="finished on the loser: not sent again",
            )

    def quota(self) -> None:
        for a in sorted(self.touched_accounts):
            acct = self.ix.accounts.get(a)
            if acct is None or acct.quota_bytes <= 0:
                continue
            used, _n = self.ix.account_usage(a)
            if used > acct.quota_bytes:
                self.audit(
                    "merge:quota-bypassed",
                    account=a,
                    address=acct.address,
                    used=used,
                    quota=acct.quota_bytes,
                    detail="merged mail is never refused for quota",
                )


def _flag_names(bits: int) -> list[str]:
    return [n for n, b in ix.SYSTEM_FLAGS.items() if bits & b]


# --- entry point ------------------------------------------------------------------------------


async def merge_branch(
    store: Store,
    spool_path: str,
    *,
    loser: bytes = b"",
    audit_path: str | None = None,
    journal_path: str | None = None,
    clock: Callable[[], float] = time.time,
    fault: Callable[[str], None] | None = None,
) -> MergeReport:
    """Replay the losing branch in ``spool_path`` (frames as :class:`BranchSpool` writes them,
    LSNs ``d+1`` ..) on ``store``, the winner, which must be open and writable (its primary).
    Returns the report; every decision is in the audit log (default ``<data>/merge-audit.log``).

    Resumable: progress goes to the journal (default ``<data>/merge-journal``); called again
    with the same branch (or a longer one starting with it) after the winner stopped, it
    replays only what the journal does not name as done; with the same branch after a merge
    that finished, it replays nothing (``already_merged``). ``fault`` (tests) is called after
    each durable merge transaction ("committed") and after its journal line ("journaled").
    Raises MergeError if the spool is damaged or the store fails."""
    fs = store.fs
    journal = _Journal(journal_path or os.path.join(store.data_dir, JOURNAL_FILE), fs)
    journal.load()
    jh = journal.header or {}
    jframes = int(str(jh.get("frames", 0)))
    spool = fs.open_read(spool_path)
    try:
        branch = _Branch()
        branch.load(spool, prefix_frames=jframes)
        if not branch.frames:
            raise MergeError("the branch is empty")
        d = branch.first_lsn - 1
        if d > store.last_lsn:
            raise MergeError(
                f"the branch starts at LSN {d + 1}, after this log's end ({store.last_lsn})"
            )
        same = (
            jframes > 0
            and jh.get("d") == d
            and branch.frames >= jframes
            and branch.prefix_digest == jh.get("digest")
        )
        ident: dict[str, object] = {
            "d": d,
            "first": branch.first_lsn,
            "last": branch.last_lsn,
            "frames": branch.frames,
            "digest": branch.digest,
        }
        audit_file = audit_path or os.path.join(store.data_dir, AUDIT_FILE)
        fin = journal.finished
        if same and fin is not None and branch.frames == jframes:
            log.warning(
                "merge: branch LSNs %d-%d of %s was merged before (merge %s): nothing replayed",
                branch.first_lsn,
                branch.last_lsn,
                loser.hex() or "the peer",
                jh.get("merge"),
            )
            return MergeReport(
                str(jh.get("merge", "")),
                d,
                branch.first_lsn,
                branch.last_lsn,
                branch.frames,
                0,
                0,
                0,
                0,
                audit_file,
                digest=branch.digest,
                already_merged=True,
            )
        if same:
            merge_id = str(jh.get("merge", ""))
            winner_last = int(str(jh.get("winner_last", store.last_lsn)))
            if branch.frames > jframes:  # the loser wrote more since: the same journal goes on
                journal.append({"t": "start", **jh, **ident})
        else:
            merge_id = f"{int(clock())}-{os.urandom(4).hex()}"
            winner_last = store.last_lsn
            journal.begin({**ident, "merge": merge_id, "winner_last": winner_last})
        winner = _WinnerSide()
        winner.load(store, d, winner_last)
        audit = _Audit(audit_file, fs, merge_id, clock)
        m = _Merge(store, spool, branch, winner, _Catalog(store, d), audit, journal, fault=fault)
        try:
            if same:
                m.restore()
                audit(
                    "merge:resume",
                    loser=loser or None,
                    divergence_lsn=d,
                    branch=[branch.first_lsn, branch.last_lsn],
                    done=len(journal.done_keys),
                    winner_last_lsn=winner_last,
                    detail="a merge interrupted on the winner goes on from its journal",
                )
            else:
                audit(
                    "merge:start",
                    loser=loser or None,
                    divergence_lsn=d,
                    branch=[branch.first_lsn, branch.last_lsn],
                    frames=branch.frames,
                    messages=len(branch.order),
                    winner_last_lsn=store.last_lsn,
                )
            if branch.holes:
                audit(
                    "merge:hole",
                    count=branch.holes,
                    detail="the loser's branch holds frames lost to fsck --repair",
                )
            await m.structural()
            await m.deliveries()
            await m.prefix_ops()
            await m.queue()
            m.quota()
            audit(
                "merge:done",
                redelivered=m.redelivered,
                collisions=m.collisions,
                changes=m.changes,
                unresolved=m.unresolved,
            )
            # Every merge transaction is durable (commit_async returned): the branch is merged.
            journal.append({"t": "done", "lsn": store.last_lsn, "digest": branch.digest})
        finally:
            audit.close()
            journal.close()
        log.warning(
            "merge %s: branch LSNs %d-%d of %s: %d message(s) re-delivered, %d UID "
            "collision(s), %d change(s), %d unresolved; audit in %s",
            merge_id,
            branch.first_lsn,
            branch.last_lsn,
            loser.hex() or "the peer",
            m.redelivered,
            m.collisions,
            m.changes,
            m.unresolved,
            audit.path,
        )
        return MergeReport(
            merge_id,
            d,
            branch.first_lsn,
            branch.last_lsn,
            branch.frames,
            m.redelivered,
            m.collisions,
            m.changes,
            m.unresolved,
            audit.path,
            dict(audit.counts),
            digest=branch.digest,
            resumed=same,
        )
    finally:
        spool.close()
