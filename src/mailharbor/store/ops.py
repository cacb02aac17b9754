"""Transaction operations and their encoding into records.

Theory of operation
-------------------
A `Transaction` records *operations* (frozen dataclasses below): intents such as "deliver this
body to these mailboxes". At commit, the `Encoder` validates them in order against the durable
index plus the effects of the transaction's own earlier operations (an overlay), allocates UIDs,
MODSEQs, UIDVALIDITYs and GUIDs, and produces the records. It raises a `StoreError` before
anything is written, and only a successful encode advances the store's allocation counters, so a
refused transaction leaves no trace.

Results that exist only after encoding (UIDs, MODSEQs) are written into the mutable result
objects (`Delivery`, `Change`) the transaction handed out.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeAlias

from mailharbor.store import format as fmt
from mailharbor.store import index as ix


class StoreError(Exception):
    """Base of store errors. `str(e)` is one line fit for an administrator."""


class NotFound(StoreError):
    pass


class AlreadyExists(StoreError):
    pass


class InvalidArgument(StoreError):
    pass


class Conflict(StoreError):
    """A conditional flag change (``unchanged_since``) met changes of the same mailbox that are
    appended but not yet applied: nothing is written; settle and retry."""


DEFAULT_MAILBOXES: tuple[tuple[str, int], ...] = (
    ("INBOX", 0),
    ("Sent", ix.SU_SENT),
    ("Drafts", ix.SU_DRAFTS),
    ("Trash", ix.SU_TRASH),
    ("Junk", ix.SU_JUNK),
    ("Archive", ix.SU_ARCHIVE),
)


@dataclass(slots=True)
class Delivery:
    """Result of `Transaction.deliver`, filled at commit: per mailbox GUID its UID, message GUID
    and MODSEQ."""

    uids: dict[bytes, int] = field(default_factory=dict)
    msg_guids: dict[bytes, bytes] = field(default_factory=dict)
    modseqs: dict[bytes, int] = field(default_factory=dict)


@dataclass(slots=True)
class Change:
    """Result of a flag change or expunge, filled at commit: the MODSEQ given and the UIDs that
    existed (others were ignored). With ``unchanged_since``, ``modified`` lists the existing UIDs
    left alone because their MODSEQ was above it (CONDSTORE's MODIFIED set)."""

    modseq: int = 0
    uids: tuple[int, ...] = ()
    modified: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class NewBlob:
    hash: bytes
    size: int
    data: bytes
    nchunks: int
    stream: bytes


@dataclass(frozen=True, slots=True)
class OpDeliver:
    blob: bytes
    mailboxes: tuple[bytes, ...]
    flags: int
    keywords: tuple[str, ...]
    internaldate_ms: int | None
    result: Delivery
    msg_guid: bytes | None = None  # kept (one mailbox only), else a new GUID


@dataclass(frozen=True, slots=True)
class OpFlags:
    mailbox: bytes
    uids: tuple[int, ...]
    add: int
    remove: int
    add_keywords: tuple[str, ...]
    remove_keywords: tuple[str, ...]
    result: Change
    unchanged_since: int | None = None


@dataclass(frozen=True, slots=True)
class OpExpunge:
    mailbox: bytes
    uids: tuple[int, ...]
    result: Change


@dataclass(frozen=True, slots=True)
class OpReserve:
    """Allocation floors: the mailbox's next UID >= ``uidnext``, next MODSEQ > ``highestmodseq``
    (for operations encoded after it, in this transaction and later ones)."""

    mailbox: bytes
    uidnext: int
    highestmodseq: int


@dataclass(frozen=True, slots=True)
class OpMailboxCreate:
    account: bytes
    name: str
    special_use: int
    guid: bytes


@dataclass(frozen=True, slots=True)
class OpMailboxRename:
    mailbox: bytes
    name: str


@dataclass(frozen=True, slots=True)
class OpMailboxDelete:
    mailbox: bytes


@dataclass(frozen=True, slots=True)
class OpSubscribe:
    account: bytes
    name: str
    subscribed: bool


@dataclass(frozen=True, slots=True)
class OpDomainAdd:
    name: str


@dataclass(frozen=True, slots=True)
class OpDomainRemove:
    name: str


@dataclass(frozen=True, slots=True)
class OpAccountAdd:
    address: str
    password_hash: str
    quota_bytes: int
    guid: bytes
    mailbox_guids: tuple[bytes, ...]  # one per DEFAULT_MAILBOXES entry


@dataclass(frozen=True, slots=True)
class OpAccountUpdate:
    address: str
    password_hash: str | None
    quota_bytes: int | None


@dataclass(frozen=True, slots=True)
class OpAccountDelete:
    address: str


@dataclass(frozen=True, slots=True)
class OpAliasSet:
    source: str
    targets: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class OpAliasRemove:
    source: str


@dataclass(frozen=True, slots=True)
class OpQueueAdd:
    entry: bytes
    blob: bytes
    sender: str
    recipients: tuple[str, ...]
    params: str


@dataclass(frozen=True, slots=True)
class OpQueueAttempt:
    entry: bytes
    term: int
    recipients: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class OpQueueDone:
    entry: bytes
    recipient: str
    result: fmt.QueueResult
    detail: str
    next_ms: int
    warned: bool = False


Op: TypeAlias = (
    OpDeliver
    | OpFlags
    | OpExpunge
    | OpReserve
    | OpMailboxCreate
    | OpMailboxRename
    | OpMailboxDelete
    | OpSubscribe
    | OpDomainAdd
    | OpDomainRemove
    | OpAccountAdd
    | OpAccountUpdate
    | OpAccountDelete
    | OpAliasSet
    | OpAliasRemove
    | OpQueueAdd
    | OpQueueAttempt
    | OpQueueDone
)

STRUCTURAL = (
    OpMailboxCreate,
    OpMailboxRename,
    OpMailboxDelete,
    OpSubscribe,
    OpDomainAdd,
    OpDomainRemove,
    OpAccountAdd,
    OpAccountUpdate,
    OpAccountDelete,
    OpAliasSet,
    OpAliasRemove,
)
"""Operations that make a transaction exclusive (see the store's theory of operation)."""


class Encoder:
    """Validates one transaction's operations and encodes them (see the module docstring)."""

    def __init__(
        self,
        index: ix.Index,
        *,
        alloc_uid: dict[bytes, int],
        alloc_modseq: dict[bytes, int],
        blob_present: Callable[[bytes], bool],
        blob_size: Callable[[bytes], int],
        new_blobs: dict[bytes, NewBlob],
        now_ms: Callable[[], int],
    ) -> None:
        self.index = index
        # The store's counters are read, never written: a refused transaction leaves them as
        # they were; `new_uid`/`new_modseq` are merged by the store after a successful encode.
        self._base_uid = alloc_uid
        self._base_modseq = alloc_modseq
        self.new_uid: dict[bytes, int] = {}
        self.new_modseq: dict[bytes, int] = {}
        self._blob_present = blob_present
        self._blob_size = blob_size
        self._new_blobs = new_blobs
        self._now_ms = now_ms
        self.records: list[fmt.Record] = []
        self.used_blobs: dict[bytes, None] = {}
        # The overlay: effects of this transaction's earlier operations.
        self._accounts: dict[str, bytes] = {}
        self._deleted_accounts: set[bytes] = set()
        self._names: dict[bytes, dict[str, bytes | None]] = {}
        self._new_mailboxes: dict[bytes, ix.Mailbox] = {}
        self._deleted_mailboxes: set[bytes] = set()
        self._domains: dict[str, bool] = {}
        self._aliases: dict[str, bool] = {}  # source -> exists after the earlier operations
        self._uidvalidity: dict[bytes, int] = {}

    # -- lookups through the overlay -----------------------------------------------------------

    def _account_guid(self, addr: str) -> bytes:
        if addr in self._accounts:
            return self._accounts[addr]
        a = self.index.account_by_address(addr)
        if a is None or a.guid in self._deleted_accounts:
            raise NotFound(f"no account {addr}")
        return a.guid

    def _account_exists(self, g: bytes) -> bool:
        known = g in self.index.accounts or g in self._accounts.values()
        return known and g not in self._deleted_accounts

    def _lookup_name(self, acct: bytes, name: str) -> bytes | None:
        k = ix.name_key(name)
        names = self._names.setdefault(acct, {})
        if k in names:
            return names[k]
        a = self.index.accounts.get(acct)
        return a.mailboxes.get(k) if a is not None else None

    def _mailbox(self, g: bytes) -> ix.Mailbox:
        if g in self._deleted_mailboxes:
            raise NotFound("mailbox does not exist")
        mb = self.index.mailboxes.get(g)
        if mb is None:
            mb = self._new_mailboxes.get(g)
        if mb is None:
            raise NotFound("mailbox does not exist")
        return mb

    def _alias_exists(self, source: str) -> bool:
        return self._aliases.get(source, source in self.index.aliases)

    def _domain_exists(self, d: str) -> bool:
        return self._domains.get(d, d in self.index.domains)

    def _use_blob(self, h: bytes) -> None:
        if h in self._new_blobs:
            self.used_blobs[h] = None
        elif not self._blob_present(h):
            raise NotFound("message body is not in the store")

    def _next_uid(self, mb: ix.Mailbox) -> int:
        g = mb.guid
        u = max(self.new_uid.get(g) or self._base_uid.get(g, 0), mb.uidnext)
        self.new_uid[g] = u + 1
        return u

    def _next_modseq(self, mb: ix.Mailbox) -> int:
        g = mb.guid
        m = max(self.new_modseq.get(g) or self._base_modseq.get(g, 0), mb.highestmodseq) + 1
        self.new_modseq[g] = m
        return m

    def _new_uidvalidity(self, acct: bytes) -> int:
        a = self.index.accounts.get(acct)
        last = max(self._uidvalidity.get(acct, 0), a.last_uidvalidity if a else 0)
        v = max(int(time.time()), last + 1) & 0xFFFFFFFF
        self._uidvalidity[acct] = v
        return v

    @staticmethod
    def _check_keywords(mb: ix.Mailbox, kws: tuple[str, ...]) -> None:
        known = {k.lower() for k in mb.keywords}
        if len(known | {k.lower() for k in kws}) > ix.MAX_KEYWORDS:
            raise InvalidArgument(f"too many keywords in this mailbox (max {ix.MAX_KEYWORDS})")

    def _create_mailbox(self, acct: bytes, name: str, su: int, g: bytes) -> None:
        if not self._account_exists(acct):
            raise NotFound("account does not exist")
        if self._lookup_name(acct, name) is not None:
            raise AlreadyExists(f"mailbox {name} already exists")
        self._names.setdefault(acct, {})[ix.name_key(name)] = g
        self._new_mailboxes[g] = ix.Mailbox(g, acct, name, 0, su)
        self.records.append(fmt.MailboxCreate(acct, g, self._new_uidvalidity(acct), su, name))

    # -- one method per operation --------------------------------------------------------------

    def add(self, op: Op) -> None:
        """Validate and encode one operation."""
        if isinstance(op, OpDeliver):
            self._deliver(op)
        elif isinstance(op, OpFlags | OpExpunge):
            self._change(op)
        elif isinstance(op, OpReserve):
            self._reserve(op)
        elif isinstance(op, OpMailboxCreate):
            self._create_mailbox(op.account, op.name, op.special_use, op.guid)
        elif isinstance(op, OpMailboxRename):
            mb = self._mailbox(op.mailbox)
            if ix.is_inbox(mb.name):
                raise InvalidArgument("INBOX cannot be renamed by the store")
            if self._lookup_name(mb.account, op.name) is not None:
                raise AlreadyExists(f"mailbox {op.name} already exists")
            names = self._names.setdefault(mb.account, {})
            names[ix.name_key(mb.name)] = None
            names[ix.name_key(op.name)] = op.mailbox
            self.records.append(fmt.MailboxRename(op.mailbox, op.name))
        elif isinstance(op, OpMailboxDelete):
            mb = self._mailbox(op.mailbox)
            if ix.is_inbox(mb.name):
                raise InvalidArgument("INBOX cannot be deleted")
            self._names.setdefault(mb.account, {})[ix.name_key(mb.name)] = None
            self._deleted_mailboxes.add(op.mailbox)
            self.records.append(fmt.MailboxDelete(op.mailbox))
        elif isinstance(op, OpSubscribe):
            if not self._account_exists(op.account):
                raise NotFound("account does not exist")
            self.records.append(fmt.Subscribe(op.account, op.subscribed, op.name))
        elif isinstance(op, OpDomainAdd):
            if self._domain_exists(op.name):
                raise AlreadyExists(f"domain {op.name} already exists")
            self._domains[op.name] = True
            self.records.append(fmt.DomainAdd(op.name))
        elif isinstance(op, OpDomainRemove):
            self._remove_domain(op.name)
        elif isinstance(op, OpAccountAdd):
            self._add_account(op)
        elif isinstance(op, OpAccountUpdate):
            g = self._account_guid(op.address)
            a = self.index.accounts.get(g)
            if a is None:
                raise NotFound(f"no account {op.address}")
            self.records.append(
                fmt.AccountPut(
                    g,
                    op.address,
                    a.password_hash if op.password_hash is None else op.password_hash,
                    a.quota_bytes if op.quota_bytes is None else op.quota_bytes,
                    a.flags,
                )
            )
        elif isinstance(op, OpAccountDelete):
            g = self._account_guid(op.address)
            self._deleted_accounts.add(g)
            self._accounts.pop(op.address, None)
            self.records.append(fmt.AccountDelete(g))
        elif isinstance(op, OpAliasSet):
            src = op.source
            dom = src[1:] if src.startswith("@") else src.rpartition("@")[2]
            if not self._domain_exists(dom):
                raise NotFound(f"{dom} is not a local domain")
            acct = self.index.account_by_address(src)
            if src in self._accounts or (
                acct is not None and acct.guid not in self._deleted_accounts
            ):
                raise AlreadyExists(f"{src} is an account")
            self._aliases[src] = True
            self.records.append(fmt.AliasSet(src, op.targets))
        elif isinstance(op, OpAliasRemove):
            if not self._alias_exists(op.source):
                raise NotFound(f"no alias {op.source}")
            self._aliases[op.source] = False
            self.records.append(fmt.AliasRemove(op.source))
        elif isinstance(op, OpQueueAdd):
            self._use_blob(op.blob)
            self.records.append(
                fmt.QueueAdd(op.entry, op.blob, self._now_ms(), op.sender, op.recipients, op.params)
            )
        elif isinstance(op, OpQueueAttempt):
            if op.entry not in self.index.queue:
                raise NotFound("no such queue entry")
            self.records.append(fmt.QueueAttempt(op.entry, op.term, self._now_ms(), op.recipients))
        else:
            if op.entry not in self.index.queue:
                raise NotFound("no such queue entry")
            self.records.append(
                fmt.QueueDone(
                    op.entry,
                    op.recipient,
                    op.result,
                    op.next_ms,
                    op.detail,
                    fmt.QueueDoneFlag.WARNED if op.warned else fmt.QueueDoneFlag(0),
                )
            )

    def _deliver(self, op: OpDeliver) -> None:
        self._use_blob(op.blob)
        targets = []
        for g in op.mailboxes:
            mb = self._mailbox(g)
            self._check_keywords(mb, op.keywords)
            mg = op.msg_guid if op.msg_guid is not None else new_guid()
            uid, modseq = self._next_uid(mb), self._next_modseq(mb)
            targets.append(fmt.Target(g, mg, uid, modseq))
            op.result.uids[g], op.result.msg_guids[g], op.result.modseqs[g] = uid, mg, modseq
        nb = self._new_blobs.get(op.blob)
        size = nb.size if nb is not None else self._blob_size(op.blob)
        idate = op.internaldate_ms if op.internaldate_ms is not None else self._now_ms()
        self.records.append(
            fmt.Deliver(op.blob, idate, size, op.flags, op.keywords, tuple(targets))
        )

    def _reserve(self, op: OpReserve) -> None:
        """Raise the allocation floors (never lower them); the RESERVE record makes them
        persist (see docs/store.md) and is written only when it raises something."""
        mb = self._mailbox(op.mailbox)
        g = mb.guid
        cur_uid = max(self.new_uid.get(g) or self._base_uid.get(g, 0), mb.uidnext)
        cur_mod = max(self.new_modseq.get(g) or self._base_modseq.get(g, 0), mb.highestmodseq)
        uidnext = op.uidnext if op.uidnext > cur_uid else 0
        modseq = op.highestmodseq if op.highestmodseq > cur_mod else 0
        if not uidnext and not modseq:
            return
        if uidnext:
            self.new_uid[g] = uidnext
        if modseq:
            self.new_modseq[g] = modseq
        self.records.append(fmt.Reserve(g, uidnext, modseq))

    def _change(self, op: OpFlags | OpExpunge) -> None:
        mb = self._mailbox(op.mailbox)
        uids = tuple(u for u in dict.fromkeys(op.uids) if mb.position(u) is not None)
        if isinstance(op, OpFlags) and op.unchanged_since is not None and uids:
            # Race-free CONDSTORE: the check runs at encode time against the durable index;
            # changes of this mailbox appended but not yet applied (their MODSEQs are only in
            # the allocation counter) could touch any message, so they make the caller retry.
            since = op.unchanged_since
            if self._base_modseq.get(mb.guid, 0) > max(mb.highestmodseq, since):
                raise Conflict("changes of this mailbox are being committed; retry")
            modified = tuple(u for u in uids if mb.modseqs[mb.position(u) or 0] > since)
            op.result.modified = modified
            if modified:
                gone = set(modified)
                uids = tuple(u for u in uids if u not in gone)
        if not uids:
            return
        if isinstance(op, OpFlags):
            self._check_keywords(mb, op.add_keywords)
        m = self._next_modseq(mb)
        op.result.modseq, op.result.uids = m, uids
        if isinstance(op, OpFlags):
            self.records.append(
                fmt.Flags(
                    op.mailbox, m, op.add, op.remove, op.add_keywords, op.remove_keywords, uids
                )
            )
        else:
            self.records.append(fmt.Expunge(op.mailbox, m, uids))

    def _remove_domain(self, d: str) -> None:
        if not self._domain_exists(d):
            raise NotFound(f"no domain {d}")
        suffix = "@" + d
        users = [
            a
            for a, g in self.index.by_address.items()
            if a.endswith(suffix) and g not in self._deleted_accounts
        ]
        users += [a for a in self._accounts if a.endswith(suffix)]
        sources = set(self.index.aliases) | set(self._aliases)
        aliases = [a for a in sources if a.endswith(suffix) and self._alias_exists(a)]
        if users or aliases:
            raise InvalidArgument(
                f"domain {d} still has {len(users)} account(s) and "
                f"{len(aliases)} alias(es); remove them first"
            )
        self._domains[d] = False
        self.records.append(fmt.DomainRemove(d))

    def _add_account(self, op: OpAccountAdd) -> None:
        addr = op.address
        if not self._domain_exists(addr.rpartition("@")[2]):
            raise NotFound(f"the domain of {addr} is not a local domain")
        existing = self.index.account_by_address(addr)
        if addr in self._accounts or (
            existing is not None and existing.guid not in self._deleted_accounts
        ):
            raise AlreadyExists(f"account {addr} already exists")
        if self._alias_exists(addr):
            raise AlreadyExists(f"{addr} is an alias")
        self._accounts[addr] = op.guid
        self.records.append(fmt.AccountPut(op.guid, addr, op.password_hash, op.quota_bytes, 0))
        for (name, su), g in zip(DEFAULT_MAILBOXES, op.mailbox_guids, strict=True):
            self._create_mailbox(op.guid, name, su, g)
            self.records.append(fmt.Subscribe(op.guid, True, name))

    def finish(self, meta: list[fmt.MimeMeta]) -> tuple[list[fmt.Record], tuple[bytes, ...]]:
        """The records in frame order — bodies, then metadata, then the operations — and the
        hashes of the bodies this frame writes."""
        head: list[fmt.Record] = []
        written: list[bytes] = []
        for h in self.used_blobs:
            b = self._new_blobs[h]
            if self._blob_present(h):
                continue  # single instance: already stored (a streamed copy's chunks orphan)
            head.append(fmt.Blob(h, b.size, b.nchunks, b.stream if b.nchunks else b.data))
            written.append(h)
        for m in meta:
            if m.blob in written or self._blob_present(m.blob):
                head.append(m)
        out = head + self.records
        if len(out) > fmt.MAX_RECORDS:
            raise InvalidArgument(
                f"transaction too large: {len(out)} records (at most {fmt.MAX_RECORDS})"
            )
        return out, tuple(written)


_guid_pool = bytearray()


def new_guid() -> bytes:
    """16 random bytes (drawn from the OS in batches: one syscall per 256 GUIDs)."""
    global _guid_pool
    if not _guid_pool:
        _guid_pool = bytearray(os.urandom(16 * 256))
    g = bytes(_guid_pool[-16:])
    del _guid_pool[-16:]
    return g
