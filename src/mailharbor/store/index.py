"""In-memory indexes derived from the log: mailboxes, messages, blobs, accounts, queue.

Theory of operation
-------------------
The indexes are a pure function of the sequence of applied frames: `Index.apply_frame` is
deterministic and never fails on a well-formed frame (it tolerates operations on things that no
longer exist, e.g. a flag change for a UID expunged meanwhile, by ignoring them), so a secondary
applying the same frames reaches the same state. Only frames that passed the durability barrier
are applied: what the index shows is what survives a crash ("visibility follows durability").

Memory: messages live column-wise in `array` objects per mailbox (UID, MODSEQ, flags, keyword
bits, INTERNALDATE, size, blob slot, message GUID) and blobs column-wise in one `BlobTable`; there
is no Python object per message. A blob's identity is its BLAKE2b-256 hash; the table maps the
first 8 bytes (as an int) to a slot and confirms the full hash on lookup.

Two bounded in-memory aids for sessions, not part of the checkpoint (so not of the logical
state either): per mailbox a flag change log (MODSEQ, UID), so that an IMAP view finds what
changed since its last look in O(changes) rather than O(mailbox), and node-wide the columns of
the most recently expunged messages, which a view that has not yet announced the expunge may
still show. Both are bounded (`CHANGE_LOG_MAX` per mailbox, `EXPUNGED_ROWS_MAX` in all).

Invariants:
* per mailbox, `uids` is strictly ascending; `uidnext` > every UID ever applied; `highestmodseq`
  >= every MODSEQ ever applied; neither ever decreases (expunge keeps them);
* a blob's `refs` = number of mailbox entries + queue entries that reference it; a blob with
  refs == 0 may be reclaimed by compaction;
* mailbox names are unique per account (case-sensitive, except INBOX which is case-insensitive).
"""

from __future__ import annotations

import bisect
import struct
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from mailharbor.store import format as fmt
from mailharbor.store.format import FormatError

# System flags as bits (\Recent is per session and never stored).
SEEN, ANSWERED, FLAGGED, DELETED, DRAFT = 1, 2, 4, 8, 16
SYSTEM_FLAGS = {
    "\\Seen": SEEN,
    "\\Answered": ANSWERED,
    "\\Flagged": FLAGGED,
    "\\Deleted": DELETED,
    "\\Draft": DRAFT,
}

# SPECIAL-USE attributes (RFC 6154) as bits.
SU_SENT, SU_DRAFTS, SU_TRASH, SU_JUNK, SU_ARCHIVE, SU_ALL, SU_FLAGGED = 1, 2, 4, 8, 16, 32, 64
SPECIAL_USE = {
    "\\Sent": SU_SENT,
    "\\Drafts": SU_DRAFTS,
    "\\Trash": SU_TRASH,
    "\\Junk": SU_JUNK,
    "\\Archive": SU_ARCHIVE,
    "\\All": SU_ALL,
    "\\Flagged": SU_FLAGGED,
}

CHANGE_LOG_MAX = 1024
"""Entries in a mailbox's in-memory flag change log before its older half is dropped (12 bytes
each; a session that falls further behind finds its changes by a scan instead)."""

EXPUNGED_ROWS_MAX = 4096
"""Expunged messages, node-wide, whose columns are kept in memory (`Index.expunged_rows`)."""

MAX_KEYWORDS = 64
"""Keywords per mailbox (stored as a 64-bit mask per message); more are refused by the store."""


def is_inbox(name: str) -> bool:
    return name.upper() == "INBOX"


def name_key(name: str) -> str:
    """The uniqueness key of a mailbox name: INBOX is case-insensitive, the rest is exact."""
    return "INBOX" if is_inbox(name) else name


@dataclass(frozen=True, slots=True)
class Location:
    """Where bytes lie in the log: segment number, absolute file offset, length."""

    segno: int
    offset: int
    length: int


class BlobTable:
    """Column-wise blob directory: hash, location of the data, refcount, metadata location."""

    def __init__(self) -> None:
        self.hashes = bytearray()
        self.seg = array("I")
        self.off = array("Q")
        self.length = array("Q")
        self.size = array("Q")
        self.refs = array("I")
        self.meta_seg = array("I")
        self.meta_off = array("Q")
        self.meta_len = array("I")
        self._by_prefix: dict[int, int | list[int]] = {}
        # Slots of chunked blobs: the locations of their chunks, in order.
        self.chunks: dict[int, list[Location]] = {}
        # Chunks seen whose BLOB has not committed (yet): hash -> {index: location}.
        self.pending_chunks: dict[bytes, dict[int, Location]] = {}

    def __len__(self) -> int:
        return len(self.refs)

    def slot(self, h: bytes) -> int | None:
        """The slot of blob `h`, or None."""
        v = self._by_prefix.get(int.from_bytes(h[:8], "little"))
        if v is None:
            return None
        cands = v if isinstance(v, list) else (v,)
        for s in cands:
            if self.hashes[s * 32 : s * 32 + 32] == h:
                return s
        return None

    def hash_at(self, slot: int) -> bytes:
        return bytes(self.hashes[slot * 32 : slot * 32 + 32])

    def _add_slot(self, h: bytes) -> int:
        s = len(self.refs)
        self.hashes += h
        for col in (
            self.seg,
            self.off,
            self.length,
            self.size,
            self.refs,
            self.meta_seg,
            self.meta_off,
            self.meta_len,
        ):
            col.append(0)
        key = int.from_bytes(h[:8], "little")
        prev = self._by_prefix.get(key)
        if prev is None:
            self._by_prefix[key] = s
        elif isinstance(prev, list):
            prev.append(s)
        else:
            self._by_prefix[key] = [prev, s]
        return s

    def put(self, h: bytes, size: int, loc: Location, chunks: list[Location] | None) -> int:
        """Record (or relocate) the data of blob `h`; keeps its refcount."""
        s = self.slot(h)
        if s is None:
            s = self._add_slot(h)
        self.seg[s], self.off[s], self.length[s], self.size[s] = (
            loc.segno,
            loc.offset,
            loc.length,
            size,
        )
        if chunks:
            self.chunks[s] = chunks
        else:
            self.chunks.pop(s, None)
        return s

    def has_data(self, slot: int) -> bool:
        """False once compaction reclaimed the data (seg == 0 marks 'no data')."""
        return self.seg[slot] != 0

    def location(self, slot: int) -> list[Location]:
        if slot in self.chunks:
            return self.chunks[slot]
        return [Location(self.seg[slot], self.off[slot], self.length[slot])]

    def ref(self, slot: int, n: int = 1) -> None:
        self.refs[slot] += n

    def unref(self, slot: int, n: int = 1) -> None:
        self.refs[slot] = max(0, self.refs[slot] - n)

    def drop_data(self, slot: int) -> None:
        self.seg[slot] = 0
        self.off[slot] = 0
        self.length[slot] = 0
        self.chunks.pop(slot, None)


@dataclass(slots=True)
class Mailbox:
    """One mailbox: metadata plus column arrays, one entry per message, ascending UID."""

    guid: bytes
    account: bytes
    name: str
    uidvalidity: int
    special_use: int
    uidnext: int = 1
    highestmodseq: int = 1
    keywords: list[str] = field(default_factory=list)
    uids: array[int] = field(default_factory=lambda: array("I"))
    modseqs: array[int] = field(default_factory=lambda: array("Q"))
    flags: array[int] = field(default_factory=lambda: array("B"))
    kwbits: array[int] = field(default_factory=lambda: array("Q"))
    dates: array[int] = field(default_factory=lambda: array("q"))
    sizes: array[int] = field(default_factory=lambda: array("Q"))
    blobs: array[int] = field(default_factory=lambda: array("I"))
    msg_guids: bytearray = field(default_factory=bytearray)
    # Expunged UIDs with the MODSEQ of their expunge (for QRESYNC's VANISHED).
    vanished_uids: array[int] = field(default_factory=lambda: array("I"))
    vanished_modseqs: array[int] = field(default_factory=lambda: array("Q"))
    total_size: int = 0
    # Flag changes as applied, (MODSEQ, UID) in ascending MODSEQ, so that a session finds what
    # changed since its last look in O(changes). In memory only (not in the checkpoint) and
    # bounded: changes with a MODSEQ <= `changes_floor` may be missing from it.
    change_modseqs: array[int] = field(default_factory=lambda: array("Q"))
    change_uids: array[int] = field(default_factory=lambda: array("I"))
    changes_floor: int = 0

    def __len__(self) -> int:
        return len(self.uids)

    def __bool__(self) -> bool:
        return True  # an empty mailbox is still a mailbox

    def position(self, uid: int) -> int | None:
        """Index of `uid` in the columns, or None."""
        i = bisect.bisect_left(self.uids, uid)
        if i < len(self.uids) and self.uids[i] == uid:
            return i
        return None

    def msg_guid(self, i: int) -> bytes:
        return bytes(self.msg_guids[i * 16 : i * 16 + 16])

    def keyword_bit(self, kw: str, create: bool) -> int:
        """The bit of keyword `kw` (case-insensitive match per RFC 9051), 0 if absent."""
        low = kw.lower()
        for i, k in enumerate(self.keywords):
            if k.lower() == low:
                return 1 << i
        if not create:
            return 0
        if len(self.keywords) >= MAX_KEYWORDS:
            return 0
        self.keywords.append(kw)
        return 1 << (len(self.keywords) - 1)

    def keyword_names(self, bits: int) -> list[str]:
        return [k for i, k in enumerate(self.keywords) if bits >> i & 1]

    def changed_uids_since(self, modseq: int) -> list[int] | None:
        """UIDs whose flags changed with a MODSEQ > `modseq` (ascending, unique; some may be
        expunged since), or None when the change log does not reach back that far."""
        if modseq < self.changes_floor:
            return None
        k = bisect.bisect_right(self.change_modseqs, modseq)
        return sorted(set(self.change_uids[k:]))

    def _log_change(self, modseq: int, uid: int) -> None:
        log_m = self.change_modseqs
        if log_m and modseq < log_m[-1]:
            # out of MODSEQ order (not written by one primary): restart the log above it
            self.changes_floor = max(self.changes_floor, log_m[-1], modseq)
            del log_m[:]
            del self.change_uids[:]
            return
        if len(log_m) >= CHANGE_LOG_MAX:
            half = len(log_m) // 2
            self.changes_floor = max(self.changes_floor, log_m[half - 1])
            del log_m[:half]
            del self.change_uids[:half]
        log_m.append(modseq)
        self.change_uids.append(uid)

    def _insert(
        self,
        uid: int,
        modseq: int,
        flags: int,
        kw: int,
        date: int,
        size: int,
        blob: int,
        guid: bytes,
    ) -> None:
        if not self.uids or uid > self.uids[-1]:
            i = len(self.uids)
        else:
            i = bisect.bisect_left(self.uids, uid)
            if i < len(self.uids) and self.uids[i] == uid:
                return  # a UID is never reused; a duplicate delivery record is ignored
        self.uids.insert(i, uid)
        self.modseqs.insert(i, modseq)
        self.flags.insert(i, flags)
        self.kwbits.insert(i, kw)
        self.dates.insert(i, date)
        self.sizes.insert(i, size)
        self.blobs.insert(i, blob)
        self.msg_guids[i * 16 : i * 16] = guid
        self.total_size += size

    def _remove(self, positions: list[int]) -> None:
        if not positions:
            return
        drop = sorted(set(positions), reverse=True)
        if len(drop) <= 64:
            # a few: delete in place, highest position first (C memmoves)
            cols = (self.uids, self.modseqs, self.flags, self.kwbits, self.dates, self.blobs)
            for i in drop:
                self.total_size -= self.sizes[i]
                del self.sizes[i]
                for c in cols:
                    del c[i]
                del self.msg_guids[i * 16 : i * 16 + 16]
            return
        dropped = set(drop)
        keep = [i for i in range(len(self.uids)) if i not in dropped]
        for name in ("uids", "modseqs", "flags", "kwbits", "dates", "sizes", "blobs"):
            col: array[int] = getattr(self, name)
            setattr(self, name, array(col.typecode, (col[i] for i in keep)))
        g = self.msg_guids
        self.msg_guids = bytearray(b"".join(g[i * 16 : i * 16 + 16] for i in keep))
        self.total_size = sum(self.sizes)


@dataclass(slots=True)
class Account:
    guid: bytes
    address: str
    password_hash: str
    quota_bytes: int
    flags: int
    subscriptions: set[str] = field(default_factory=set)
    mailboxes: dict[str, bytes] = field(default_factory=dict)  # name_key -> mailbox guid
    last_uidvalidity: int = 0


#: Before QUEUE_DONE had a flags byte, the outbound queue recorded a sent delay warning by
#: appending this to the detail of DEFERRED records. Applying such a record (from an old log)
#: strips it and sets `QueueEntry.warned`; nothing writes it any more.
LEGACY_WARNED_MARK = " [delay warning sent]"


@dataclass(slots=True)
class QueueEntry:
    guid: bytes
    blob: bytes
    created_ms: int
    sender: str
    recipients: list[str]
    params: str
    attempts: int = 0
    last_attempt_ms: int = 0
    last_term: int = 0
    next_ms: int = 0
    last_detail: str = ""
    in_flight: list[str] = field(default_factory=list)
    warned: bool = False  # the delay warning was sent: set by a QUEUE_DONE with WARNED, sticky


class Index:
    """All derived state. Mutated only by `apply_frame` (and compaction's relocation)."""

    def __init__(self) -> None:
        self.last_lsn = 0
        self.generation = 0
        self.blobs = BlobTable()
        self.mailboxes: dict[bytes, Mailbox] = {}
        self.accounts: dict[bytes, Account] = {}
        self.by_address: dict[str, bytes] = {}
        self.domains: set[str] = set()
        self.aliases: dict[str, tuple[str, ...]] = {}
        self.queue: dict[bytes, QueueEntry] = {}
        #: Bumped by every change that can make a queue entry due sooner: a new entry, a
        #: DEFERRED result (a new ``next_ms``, e.g. an administrator's retry).
        self.queue_changes = 0
        self.message_count = 0
        self._touched: set[bytes] = set()
        # The columns of the most recently expunged messages, node-wide and bounded, by
        # (mailbox GUID, UID): (MODSEQ, flags, keyword bits, date, size, blob slot), oldest
        # first. What a session that has not yet announced an expunge can still show of the
        # message (RFC 2180 4.1). In memory only.
        self.expunged_rows: dict[tuple[bytes, int], tuple[int, int, int, int, int, int]] = {}

    # -- reads ---------------------------------------------------------------------------------

    def account_by_address(self, address: str) -> Account | None:
        g = self.by_address.get(address.lower())
        return self.accounts.get(g) if g is not None else None

    def mailbox_by_name(self, account: bytes, name: str) -> Mailbox | None:
        acct = self.accounts.get(account)
        if acct is None:
            return None
        g = acct.mailboxes.get(name_key(name))
        return self.mailboxes.get(g) if g is not None else None

    def account_usage(self, account: bytes) -> tuple[int, int]:
        """(logical bytes, messages) over the account's mailboxes."""
        acct = self.accounts.get(account)
        if acct is None:
            return (0, 0)
        total = count = 0
        for g in acct.mailboxes.values():
            mb = self.mailboxes[g]
            total += mb.total_size
            count += len(mb)
        return (total, count)

    # -- apply ---------------------------------------------------------------------------------

    def apply_frame(
        self,
        hdr: fmt.FrameHeader,
        payload: bytes | memoryview,
        segno: int,
        payload_off: int,
        records: Sequence[fmt.Record] | None = None,
    ) -> set[bytes]:
        """Apply one verified frame whose payload starts at file offset `payload_off` of segment
        `segno`. Deterministic; ignores operations on vanished objects. Returns the GUIDs of the
        mailboxes it touched. `records`, when the caller has them (its own frames), are the
        decoded records of `payload` in order: they spare decoding, nothing else changes."""
        self._touched = set()
        if hdr.kind == fmt.FrameKind.HOLE:
            recs = fmt.decode_records(payload)
            count = recs[0].count if recs and isinstance(recs[0], fmt.Hole) else 1
            self.last_lsn = hdr.lsn + count - 1
            return self._touched
        mv = memoryview(payload)
        for i, (typ, off, ln) in enumerate(fmt.iter_record_spans(mv)):
            body = mv[off : off + ln]
            if typ == fmt.RecordType.BLOB:
                h = bytes(body[:32])
                size, nchunks = struct.unpack_from("<QI", body, 32)
                data_off = payload_off + off + 44
                if nchunks:
                    stream = bytes(body[44:60])
                    parts = self.blobs.pending_chunks.pop(stream, {})
                    if all(i in parts for i in range(nchunks)):
                        locs = [parts[i] for i in range(nchunks)]
                        self.blobs.put(h, size, locs[0], locs)
                    elif self.blobs.slot(h) is None:
                        # Its chunks were reclaimed by compaction (the blob died later in
                        # the log): known, without data.
                        self.blobs.put(h, size, Location(0, 0, 0), None)
                else:
                    self.blobs.put(h, size, Location(segno, data_off, ln - 44), None)
                continue
            if typ == fmt.RecordType.CHUNK:
                stream = bytes(body[:16])
                (idx,) = struct.unpack_from("<I", body, 16)
                self.blobs.pending_chunks.setdefault(stream, {})[idx] = Location(
                    segno, payload_off + off + 20, ln - 20
                )
                continue
            if typ == fmt.RecordType.MIME_META:
                s = self.blobs.slot(bytes(body[:32]))
                if s is not None:
                    self.blobs.meta_seg[s] = segno
                    self.blobs.meta_off[s] = payload_off + off + 32
                    self.blobs.meta_len[s] = ln - 32  # version byte + data
                continue
            if typ == fmt.RecordType.RECLAIMED:
                rec = fmt.decode_record(typ, body)
                assert isinstance(rec, fmt.Reclaimed)
                if rec.original == fmt.RecordType.BLOB:
                    h = rec.head[:32]
                    (size,) = struct.unpack_from("<Q", rec.head, 32)
                    s = self.blobs.slot(h)
                    if s is None:
                        self.blobs.put(h, size, Location(0, 0, 0), None)
                continue
            self._apply(records[i] if records is not None else fmt.decode_record(typ, body))
        self.last_lsn = hdr.lsn
        self.generation = max(self.generation, hdr.generation)
        return self._touched

    def _apply(self, rec: fmt.Record) -> None:
        mbg = getattr(rec, "mailbox", None)
        if isinstance(mbg, bytes):
            self._touched.add(mbg)
        if isinstance(rec, fmt.Deliver):
            self._touched.update(t.mailbox for t in rec.targets)
            s = self.blobs.slot(rec.blob)
            if s is None:
                # Only after `fsck --repair` replaced the frame holding the body by a HOLE: the
                # message exists without a body (reads fail; the repair expunges it).
                s = self.blobs.put(rec.blob, rec.size, Location(0, 0, 0), None)
            for t in rec.targets:
                mb = self.mailboxes.get(t.mailbox)
                if mb is None:
                    continue
                kw = 0
                for k in rec.keywords:
                    kw |= mb.keyword_bit(k, create=True)
                n = len(mb)
                mb._insert(
                    t.uid, t.modseq, rec.flags, kw, rec.internaldate_ms, rec.size, s, t.msg_guid
                )
                if len(mb) > n:
                    self.blobs.ref(s)
                    self.message_count += 1
                mb.uidnext = max(mb.uidnext, t.uid + 1)
                mb.highestmodseq = max(mb.highestmodseq, t.modseq)
        elif isinstance(rec, fmt.Flags):
            mb = self.mailboxes.get(rec.mailbox)
            if mb is None:
                return
            add_kw = 0
            for k in rec.add_keywords:
                add_kw |= mb.keyword_bit(k, create=True)
            rm_kw = 0
            for k in rec.remove_keywords:
                rm_kw |= mb.keyword_bit(k, create=False)
            for uid in rec.uids:
                i = mb.position(uid)
                if i is None:
                    continue
                mb.flags[i] = (mb.flags[i] | rec.add) & ~rec.remove & 0xFF
                mb.kwbits[i] = (mb.kwbits[i] | add_kw) & ~rm_kw & 0xFFFFFFFFFFFFFFFF
                mb.modseqs[i] = rec.modseq
                mb._log_change(rec.modseq, uid)
            mb.highestmodseq = max(mb.highestmodseq, rec.modseq)
        elif isinstance(rec, fmt.Expunge):
            mb = self.mailboxes.get(rec.mailbox)
            if mb is None:
                return
            pos = [i for i in (mb.position(u) for u in rec.uids) if i is not None]
            rows = self.expunged_rows
            for i in pos:
                rows[(mb.guid, mb.uids[i])] = (
                    mb.modseqs[i],
                    mb.flags[i],
                    mb.kwbits[i],
                    mb.dates[i],
                    mb.sizes[i],
                    mb.blobs[i],
                )
                if len(rows) > EXPUNGED_ROWS_MAX:
                    del rows[next(iter(rows))]
                self.blobs.unref(mb.blobs[i])
                mb.vanished_uids.append(mb.uids[i])
                mb.vanished_modseqs.append(rec.modseq)
            self.message_count -= len(pos)
            mb._remove(pos)
            mb.highestmodseq = max(mb.highestmodseq, rec.modseq)
        elif isinstance(rec, fmt.MailboxCreate):
            acct = self.accounts.get(rec.account)
            if acct is None or name_key(rec.name) in acct.mailboxes:
                return
            self.mailboxes[rec.mailbox] = Mailbox(
                rec.mailbox, rec.account, rec.name, rec.uidvalidity, rec.special_use
            )
            acct.mailboxes[name_key(rec.name)] = rec.mailbox
            acct.last_uidvalidity = max(acct.last_uidvalidity, rec.uidvalidity)
        elif isinstance(rec, fmt.MailboxRename):
            mb = self.mailboxes.get(rec.mailbox)
            if mb is None:
                return
            acct = self.accounts[mb.account]
            if name_key(rec.name) in acct.mailboxes:
                return
            del acct.mailboxes[name_key(mb.name)]
            mb.name = rec.name
            acct.mailboxes[name_key(rec.name)] = mb.guid
        elif isinstance(rec, fmt.MailboxDelete):
            self._delete_mailbox(rec.mailbox)
        elif isinstance(rec, fmt.Subscribe):
            acct = self.accounts.get(rec.account)
            if acct is not None:
                if rec.subscribed:
                    acct.subscriptions.add(rec.name)
                else:
                    acct.subscriptions.discard(rec.name)
        elif isinstance(rec, fmt.AccountPut):
            acct = self.accounts.get(rec.account)
            if acct is None:
                if rec.address in self.by_address:
                    return
                self.accounts[rec.account] = Account(
                    rec.account, rec.address, rec.password_hash, rec.quota_bytes, rec.flags
                )
                self.by_address[rec.address] = rec.account
            else:
                if acct.address != rec.address:
                    if rec.address in self.by_address:
                        return
                    del self.by_address[acct.address]
                    self.by_address[rec.address] = rec.account
                acct.address = rec.address
                acct.password_hash = rec.password_hash
                acct.quota_bytes = rec.quota_bytes
                acct.flags = rec.flags
        elif isinstance(rec, fmt.AccountDelete):
            acct = self.accounts.pop(rec.account, None)
            if acct is not None:
                for g in list(acct.mailboxes.values()):
                    self._delete_mailbox(g)
                self.by_address.pop(acct.address, None)
        elif isinstance(rec, fmt.DomainAdd):
            self.domains.add(rec.name)
        elif isinstance(rec, fmt.DomainRemove):
            self.domains.discard(rec.name)
        elif isinstance(rec, fmt.AliasSet):
            self.aliases[rec.source] = rec.targets
        elif isinstance(rec, fmt.AliasRemove):
            self.aliases.pop(rec.source, None)
        elif isinstance(rec, fmt.QueueAdd):
            s = self.blobs.slot(rec.blob)
            if s is None:
                s = self.blobs.put(rec.blob, 0, Location(0, 0, 0), None)  # see DELIVER
            if rec.entry not in self.queue:
                self.blobs.ref(s)
                self.queue_changes += 1
                self.queue[rec.entry] = QueueEntry(
                    rec.entry,
                    rec.blob,
                    rec.created_ms,
                    rec.sender,
                    list(rec.recipients),
                    rec.params,
                )
        elif isinstance(rec, fmt.QueueAttempt):
            q = self.queue.get(rec.entry)
            if q is not None:
                q.attempts += 1
                q.last_attempt_ms = rec.at_ms
                q.last_term = rec.term
                q.in_flight = list(rec.recipients)
        elif isinstance(rec, fmt.QueueDone):
            q = self.queue.get(rec.entry)
            if q is None:
                return
            q.last_detail = rec.detail
            if rec.flags & fmt.QueueDoneFlag.WARNED:
                q.warned = True
            elif rec.detail.endswith(LEGACY_WARNED_MARK):  # logs written before the flag
                q.last_detail = rec.detail.removesuffix(LEGACY_WARNED_MARK)
                q.warned = True
            if rec.recipient in q.in_flight:
                q.in_flight.remove(rec.recipient)
            if rec.result == fmt.QueueResult.DEFERRED:
                q.next_ms = rec.next_ms
                self.queue_changes += 1
            elif rec.recipient in q.recipients:
                q.recipients.remove(rec.recipient)
            if not q.recipients:
                del self.queue[rec.entry]
                s = self.blobs.slot(q.blob)
                if s is not None:
                    self.blobs.unref(s)
        elif isinstance(rec, fmt.Reserve):
            mb = self.mailboxes.get(rec.mailbox)
            if mb is not None:
                mb.uidnext = max(mb.uidnext, rec.uidnext)
                mb.highestmodseq = max(mb.highestmodseq, rec.highestmodseq)
        elif isinstance(rec, fmt.Hole):
            pass
        else:  # BLOB/CHUNK/MIME_META are handled in apply_frame
            raise FormatError(f"unexpected record {type(rec).__name__}")

    def _delete_mailbox(self, guid: bytes) -> None:
        mb = self.mailboxes.pop(guid, None)
        if mb is None:
            return
        for s in mb.blobs:
            self.blobs.unref(s)
        self.message_count -= len(mb)
        acct = self.accounts.get(mb.account)
        if acct is not None and acct.mailboxes.get(name_key(mb.name)) == guid:
            del acct.mailboxes[name_key(mb.name)]

    # -- checkpoint serialization --------------------------------------------------------------

    def serialize(self) -> bytes:
        """A self-describing snapshot of the index (the checkpoint body)."""
        w = _Out()
        w.u64(self.last_lsn).u64(self.generation).u64(self.message_count)
        b = self.blobs
        w.u64(len(b)).raw(bytes(b.hashes))
        for col in (b.seg, b.off, b.length, b.size, b.refs, b.meta_seg, b.meta_off, b.meta_len):
            w.arr(col)
        w.u32(len(b.chunks))
        for s, locs in sorted(b.chunks.items()):
            w.u32(s).locs(locs)
        w.u32(len(b.pending_chunks))
        for h, parts in sorted(b.pending_chunks.items()):
            w.raw(h).u32(len(parts))
            for i, loc in sorted(parts.items()):
                w.u32(i).locs([loc])
        w.u32(len(self.accounts))
        for a in self.accounts.values():
            w.raw(a.guid).s(a.address).s(a.password_hash).u64(a.quota_bytes).u32(a.flags)
            w.u32(a.last_uidvalidity).strs(sorted(a.subscriptions))
        w.u32(len(self.mailboxes))
        for m in self.mailboxes.values():
            w.raw(m.guid).raw(m.account).s(m.name).u32(m.uidvalidity).u32(m.special_use)
            w.u32(m.uidnext).u64(m.highestmodseq).strs(m.keywords).u64(m.total_size)
            for col in (
                m.uids,
                m.modseqs,
                m.flags,
                m.kwbits,
                m.dates,
                m.sizes,
                m.blobs,
                m.vanished_uids,
                m.vanished_modseqs,
            ):
                w.arr(col)
            w.u64(len(m.msg_guids)).raw(bytes(m.msg_guids))
        w.strs(sorted(self.domains))
        w.u32(len(self.aliases))
        for src, tg in sorted(self.aliases.items()):
            w.s(src).strs(tg)
        w.u32(len(self.queue))
        for q in self.queue.values():
            w.raw(q.guid).raw(q.blob).u64(q.created_ms).s(q.sender).strs(q.recipients)
            w.s(q.params).u32(q.attempts).u64(q.last_attempt_ms).u64(q.last_term)
            w.u64(q.next_ms).s(q.last_detail).strs(q.in_flight).u8(int(q.warned))
        return w.done()

    @classmethod
    def deserialize(cls, data: bytes) -> Index:
        """Inverse of `serialize`. Raises FormatError on malformed input."""
        r = _In(data)
        ix = cls()
        ix.last_lsn, ix.generation, ix.message_count = r.u64(), r.u64(), r.u64()
        b = ix.blobs
        n = r.u64()
        hashes = r.raw(32 * n)
        cols = [r.arr(t) for t in ("I", "Q", "Q", "Q", "I", "I", "Q", "I")]
        b.seg, b.off, b.length, b.size, b.refs, b.meta_seg, b.meta_off, b.meta_len = cols
        if any(len(c) != n for c in cols):
            raise FormatError("checkpoint blob table columns disagree")
        b.hashes = bytearray(hashes)
        for s in range(n):
            key = int.from_bytes(hashes[s * 32 : s * 32 + 8], "little")
            prev = b._by_prefix.get(key)
            if prev is None:
                b._by_prefix[key] = s
            elif isinstance(prev, list):
                prev.append(s)
            else:
                b._by_prefix[key] = [prev, s]
        for _ in range(r.u32()):
            s = r.u32()
            b.chunks[s] = r.locs()
        for _ in range(r.u32()):
            h = r.raw(16)  # a stream id
            parts: dict[int, Location] = {}
            for _ in range(r.u32()):
                i = r.u32()
                parts[i] = r.locs()[0]
            b.pending_chunks[h] = parts
        for _ in range(r.u32()):
            a = Account(r.raw(16), r.s(), r.s(), r.u64(), r.u32())
            a.last_uidvalidity = r.u32()
            a.subscriptions = set(r.strs())
            ix.accounts[a.guid] = a
            ix.by_address[a.address] = a.guid
        for _ in range(r.u32()):
            m = Mailbox(r.raw(16), r.raw(16), r.s(), r.u32(), r.u32())
            m.uidnext, m.highestmodseq, m.keywords, m.total_size = (
                r.u32(),
                r.u64(),
                list(r.strs()),
                r.u64(),
            )
            (
                m.uids,
                m.modseqs,
                m.flags,
                m.kwbits,
                m.dates,
                m.sizes,
                m.blobs,
                m.vanished_uids,
                m.vanished_modseqs,
            ) = (r.arr(t) for t in "IQBQqQIIQ")
            m.msg_guids = bytearray(r.raw(r.u64()))
            m.changes_floor = m.highestmodseq  # the change log starts empty
            if len(m.msg_guids) != 16 * len(m.uids):
                raise FormatError("checkpoint mailbox columns disagree")
            ix.mailboxes[m.guid] = m
            acct = ix.accounts.get(m.account)
            if acct is None:
                raise FormatError("checkpoint mailbox without account")
            acct.mailboxes[name_key(m.name)] = m.guid
        ix.domains = set(r.strs())
        for _ in range(r.u32()):
            src = r.s()
            ix.aliases[src] = r.strs()
        for _ in range(r.u32()):
            q = QueueEntry(r.raw(16), r.raw(32), r.u64(), r.s(), list(r.strs()), r.s())
            q.attempts, q.last_attempt_ms, q.last_term, q.next_ms = (
                r.u32(),
                r.u64(),
                r.u64(),
                r.u64(),
            )
            q.last_detail, q.in_flight = r.s(), list(r.strs())
            warned = r.u8()
            if warned > 1:
                raise FormatError("checkpoint queue entry warned byte out of range")
            q.warned = bool(warned)
            ix.queue[q.guid] = q
        if r.p != len(data):
            raise FormatError("trailing bytes in checkpoint")
        return ix

    def iter_messages(self) -> Iterator[tuple[Mailbox, int]]:
        for mb in self.mailboxes.values():
            for i in range(len(mb)):
                yield mb, i


class _Out:
    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def raw(self, b: bytes) -> _Out:
        self.parts.append(b)
        return self

    def u8(self, v: int) -> _Out:
        self.parts.append(struct.pack("<B", v))
        return self

    def u32(self, v: int) -> _Out:
        self.parts.append(struct.pack("<I", v))
        return self

    def u64(self, v: int) -> _Out:
        self.parts.append(struct.pack("<Q", v))
        return self

    def s(self, v: str) -> _Out:
        b = v.encode("utf-8")
        self.parts.append(struct.pack("<I", len(b)) + b)
        return self

    def strs(self, vs: list[str] | tuple[str, ...]) -> _Out:
        self.u32(len(vs))
        for v in vs:
            self.s(v)
        return self

    def arr(self, a: array[int]) -> _Out:
        self.u64(len(a))
        self.parts.append(a.tobytes())
        return self

    def locs(self, locs: list[Location]) -> _Out:
        self.u32(len(locs))
        for loc in locs:
            self.parts.append(struct.pack("<IQQ", loc.segno, loc.offset, loc.length))
        return self

    def done(self) -> bytes:
        return b"".join(self.parts)


class _In:
    __slots__ = ("d", "p")

    def __init__(self, d: bytes) -> None:
        self.d = d
        self.p = 0

    def raw(self, n: int) -> bytes:
        if n < 0 or self.p + n > len(self.d):
            raise FormatError("checkpoint truncated")
        b = self.d[self.p : self.p + n]
        self.p += n
        return b

    def u8(self) -> int:
        return int(self.raw(1)[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self.raw(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.raw(8))[0])

    def s(self) -> str:
        try:
            return self.raw(self.u32()).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError("invalid UTF-8 in checkpoint") from None

    def strs(self) -> tuple[str, ...]:
        n = self.u32()
        if n > len(self.d):
            raise FormatError("checkpoint list length out of range")
        return tuple(self.s() for _ in range(n))

    def arr(self, typecode: str) -> array[int]:
        n = self.u64()
        a = array(typecode)
        a.frombytes(self.raw(n * a.itemsize))
        return a

    def locs(self) -> list[Location]:
        return [Location(*struct.unpack("<IQQ", self.raw(20))) for _ in range(self.u32())]
