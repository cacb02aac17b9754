"""Mailbox views and operations for IMAP (and anything else that serves mailboxes).

Theory of operation
-------------------
Socket-free and protocol-light: :mod:`mailharbor.server.imap` turns parsed commands into calls
here and the results (plain dataclasses, or for FETCH ready-rendered data items) into responses.

*One hub per node.* :class:`NotificationHub` is the store's commit listener. The store calls it
after frames became durable and visible; it calls every callback registered for a touched mailbox
(an IMAP session sets an ``asyncio.Event``), so an SMTP delivery wakes an IDLE client at once.
It also keeps the in-memory ``\\Recent`` claims (IMAP4rev1 only): the first session to see a new
UID of a mailbox gets it as recent; a restart forgets the claims.

*Account level.* :class:`MailboxService` serves one node: LIST/LSUB matching, CREATE (with
RFC 6154 special-use), DELETE, RENAME (INBOX's special semantics included; subscriptions follow
the renamed mailboxes), SUBSCRIBE, STATUS, APPEND, quota, and SELECT, which returns a
:class:`SelectedView`.

*The selected view.* A :class:`SelectedView` is one session's picture of one mailbox: the list of
UIDs the client knows, in sequence order (``seq = index + 1``). It only ever shows what the store's
index holds, i.e. durable transactions ("visibility follows durability"). :meth:`SelectedView.sync`
compares the index with the picture and returns the pending untagged updates — new messages
(``EXISTS``/``RECENT``), changed flags (``FETCH FLAGS``, with ``MODSEQ`` under CONDSTORE) and
expunges (``EXPUNGE``, or ``VANISHED`` under QRESYNC). Expunges are applied to the picture only
when the caller says it may send them (RFC 9051 section 7.5.1: not during FETCH, STORE, SEARCH;
UID versions and everything else may); until then expunged UIDs keep their sequence numbers,
SEARCH never returns them, and FETCH shows what is still readable of them (the index keeps the
columns of the most recent expunges, the body stays until compaction) or, when that is gone,
leaves them out and the adapter answers ``NO [EXPUNGEISSUED]`` (RFC 2180 4.1). Changes are found
by MODSEQ: the index keeps a bounded per-mailbox log of flag changes (MODSEQ, UID) and the MODSEQ
of each expunge, so a sync costs O(changes since the previous sync); when the log no longer
reaches back that far it scans the MODSEQ column instead (same answer).

*Fast paths.* The view maps its sequence numbers onto the index's columns run by run
(:meth:`SelectedView.column_runs`: one run unless expunges are pending), so FETCH of index-only
items (FLAGS, UID, MODSEQ, sizes, dates) renders a whole range in one loop straight to response
bytes (:meth:`SelectedView.fetch_lines`), with each distinct flag list rendered once per view (by
flag bits, keyword bits and \\Recent; cleared when the mailbox gains a keyword). SEARCH evaluates
flag keys over the flag column and narrows candidates key by key (:mod:`.search`). ENVELOPE and
BODYSTRUCTURE are rendered once per body and cached with its parsed MIME metadata (by body
hash: never stale). A STORE that would change nothing is not written at all (no new MODSEQ, so
no FETCH for the other sessions).

*Writes are durable before they return* (``Transaction.commit_async``): STORE, EXPUNGE, COPY,
MOVE (copy and expunge in one transaction), APPEND, CREATE/DELETE/RENAME/SUBSCRIBE. The one
exception is the implicit ``\\Seen`` of a FETCH of a body section without PEEK: its transaction is
started and left to group commit, and the FETCH answers at once with the new flags.

Invariants
----------
- A view's UIDs ascend and its sequence numbers change only through :meth:`SelectedView.sync`
  with ``expunge_allowed=True``; the number of messages it announced (EXISTS) never exceeds
  what its picture holds.
- No UID, MODSEQ or UIDNEXT is shown that is not durable (everything comes from the index).
- ``MailboxError`` carries an IMAP response code and a fixed text; no exception text from below
  ever reaches a client.
- STORE with UNCHANGEDSINCE is checked by the store when the transaction is encoded
  (``Conflict`` → settle and retry), so no concurrent change slips between check and write.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import re
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from mailharbor.service.mime import (
    META_VERSION,
    MessageMeta,
    bodystructure_imap,
    decode_meta,
    encode_meta,
    envelope_imap,
    parse_message,
    section_bytes,
)
from mailharbor.store import (
    AlreadyExists,
    CommitEvent,
    Conflict,
    InvalidArgument,
    NotFound,
    Store,
    StoreError,
    StoreIOError,
    StoreReadOnly,
    Transaction,
    WritesFrozen,
    check_mailbox_name,
)
from mailharbor.store import index as ix

__all__ = [
    "DELIMITER",
    "CopyResult",
    "Exists",
    "Expunged",
    "FetchAtt",
    "FetchResult",
    "FlagsChanged",
    "ListEntry",
    "MailboxError",
    "MailboxGone",
    "MailboxService",
    "NotificationHub",
    "Recent",
    "SelectInfo",
    "SelectedView",
    "StatusInfo",
    "StoreResult",
    "Update",
    "Vanished",
    "flag_names",
    "parse_flags",
]

log = logging.getLogger("mailharbor.mailbox")

DELIMITER = "/"
FLAG_ORDER = (
    (ix.SEEN, "\\Seen"),
    (ix.ANSWERED, "\\Answered"),
    (ix.FLAGGED, "\\Flagged"),
    (ix.DELETED, "\\Deleted"),
    (ix.DRAFT, "\\Draft"),
)
_SYSTEM_LOWER = {name.lower(): bit for bit, name in FLAG_ORDER}
_SPECIAL_USE_LOWER = {name.lower(): bit for name, bit in ix.SPECIAL_USE.items()}
ALL_FLAGS = ix.SEEN | ix.ANSWERED | ix.FLAGGED | ix.DELETED | ix.DRAFT
_COMMIT_RETRIES = 20
_META_CACHE = 4096
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_BATCH = 10000  # operations per transaction in bulk moves (records per frame are capped)
_SIMPLE_ITEMS = frozenset({"FLAGS", "UID", "INTERNALDATE", "RFC822.SIZE", "MODSEQ", "THREADID"})
_FLAG_ITEMS_MAX = 4096  # rendered flag lists per view


class MailboxError(Exception):
    """A refused request: ``code`` is the IMAP response code (``None`` for none), ``text`` a
    fixed string. ``bad`` asks for a BAD instead of a NO (a syntax-level problem)."""

    def __init__(self, code: str | None, text: str, *, bad: bool = False) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.bad = bad


class MailboxGone(MailboxError):
    """The selected mailbox was deleted (or its account): the session must end."""

    def __init__(self) -> None:
        super().__init__("NONEXISTENT", "Selected mailbox was deleted")


def _store_error(e: StoreError) -> MailboxError:
    if isinstance(e, NotFound):
        return MailboxError("NONEXISTENT", "Mailbox does not exist")
    if isinstance(e, AlreadyExists):
        return MailboxError("ALREADYEXISTS", "Mailbox already exists")
    if isinstance(e, InvalidArgument):
        return MailboxError("CANNOT", "Operation not permitted on this mailbox")
    if isinstance(e, WritesFrozen):
        log.warning("store refused a write: %s", e)
        return MailboxError("UNAVAILABLE", "Writes suspended (replication peer lost), try again")
    if isinstance(e, StoreReadOnly | StoreIOError):
        log.error("store refused a write: %s", e)
        return MailboxError("UNAVAILABLE", "Server is not accepting changes now, try again")
    log.error("store error: %s", e)
    return MailboxError("SERVERBUG", "Internal error")


# -- flags and dates ---------------------------------------------------------------------------


def parse_flags(names: Iterable[str]) -> tuple[int, tuple[str, ...]]:
    """Flag names → (system flag bits, keywords). ``\\Recent`` is ignored; an unknown system
    flag is refused (BAD)."""
    bits = 0
    kws: dict[str, None] = {}
    for n in names:
        if n.startswith("\\"):
            low = n.lower()
            if low == "\\recent":
                continue
            b = _SYSTEM_LOWER.get(low)
            if b is None:
                raise MailboxError(None, "Invalid system flag", bad=True)
            bits |= b
        elif n:
            kws.setdefault(n, None)
    return bits, tuple(kws)


def flag_names(bits: int, keywords: Iterable[str] = (), recent: bool = False) -> list[str]:
    out = [name for b, name in FLAG_ORDER if bits & b]
    out.extend(keywords)
    if recent:
        out.append("\\Recent")
    return out


def imap_date(ms: int) -> str:
    """An INTERNALDATE in the server's timezone: ``"17-Jul-1996 02:44:25 -0700"``."""
    t = time.localtime(ms / 1000)
    off = (t.tm_gmtoff or 0) // 60
    sign = "+" if off >= 0 else "-"
    off = abs(off)
    return (
        f"{t.tm_mday:02d}-{_MONTHS[t.tm_mon - 1]}-{t.tm_year:04d} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {sign}{off // 60:02d}{off % 60:02d}"
    )


def _literal(data: bytes) -> bytes:
    return b"{%d}\r\n" % len(data) + data


def _flags_item(names: list[str]) -> bytes:
    return b"FLAGS (" + " ".join(names).encode("utf-8") + b")"


def email_id(blob: bytes) -> str:
    """RFC 8474 EMAILID: derived from the body's hash, so stable across sessions, copies,
    restarts and failover."""
    return "M" + blob[:12].hex()


def mailbox_id(guid: bytes) -> str:
    """RFC 8474 MAILBOXID: the mailbox GUID (kept by RENAME)."""
    return "F" + guid.hex()


# -- notification hub --------------------------------------------------------------------------


class NotificationHub:
    """Wakes sessions watching a mailbox after each commit that touched it (see module doc)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._watchers: dict[bytes, dict[int, Callable[[], None]]] = {}
        self._next = 0
        self._recent: dict[bytes, int] = {}
        store.add_commit_listener(self._on_commit)

    def watch(self, mailbox: bytes, cb: Callable[[], None]) -> int:
        self._next += 1
        self._watchers.setdefault(mailbox, {})[self._next] = cb
        return self._next

    def unwatch(self, mailbox: bytes, handle: int) -> None:
        w = self._watchers.get(mailbox)
        if w is not None:
            w.pop(handle, None)
            if not w:
                del self._watchers[mailbox]

    def _on_commit(self, ev: CommitEvent) -> None:
        for g in ev.mailboxes:
            for cb in list(self._watchers.get(g, {}).values()):
                try:
                    cb()
                except Exception:
                    log.exception("mailbox watcher failed")

    def claim_recent(self, mailbox: bytes, uidnext: int) -> int:
        """Claim the UIDs below ``uidnext`` not claimed before: returns the first UID that is
        recent for the caller (every UID >= it and < uidnext)."""
        first = self._recent.get(mailbox, 0)
        if uidnext > first:
            self._recent[mailbox] = uidnext
        return first

    def peek_recent(self, mailbox: bytes) -> int:
        return self._recent.get(mailbox, 0)

    def close(self) -> None:
        self.store.remove_commit_listener(self._on_commit)
        self._watchers.clear()


# -- results -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListEntry:
    name: str
    attributes: tuple[str, ...]
    child_info: tuple[str, ...] = ()
    selectable: bool = True


@dataclass(frozen=True, slots=True)
class StatusInfo:
    messages: int
    recent: int
    uidnext: int
    uidvalidity: int
    unseen: int
    deleted: int
    size: int
    highestmodseq: int
    mailboxid: str


@dataclass(frozen=True, slots=True)
class Exists:
    count: int


@dataclass(frozen=True, slots=True)
class Recent:
    count: int


@dataclass(frozen=True, slots=True)
class Expunged:
    """Sequence numbers to send as EXPUNGE, in the order to send them (descending)."""

    seqs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Vanished:
    uids: tuple[int, ...]
    earlier: bool = False


@dataclass(frozen=True, slots=True)
class FlagsChanged:
    seq: int
    uid: int
    flags: tuple[str, ...]
    modseq: int | None


@dataclass(frozen=True, slots=True)
class KeywordsChanged:
    """The mailbox got new keywords: send FLAGS and PERMANENTFLAGS again."""

    flags: tuple[str, ...]
    permanent: tuple[str, ...]


Update = Exists | Recent | Expunged | Vanished | FlagsChanged | KeywordsChanged


@dataclass(frozen=True, slots=True)
class SelectInfo:
    exists: int
    recent: int
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    flags: tuple[str, ...]
    permanent_flags: tuple[str, ...]
    first_unseen: int  # sequence number, 0 if none
    readonly: bool
    mailboxid: str
    vanished: tuple[int, ...] = ()  # QRESYNC: expunged since the client's MODSEQ
    changed: tuple[FlagsChanged, ...] = ()  # QRESYNC: changed since the client's MODSEQ


@dataclass(frozen=True, slots=True)
class FetchAtt:
    """One FETCH data item. ``name``: FLAGS, INTERNALDATE, RFC822.SIZE, ENVELOPE, BODY,
    BODYSTRUCTURE, UID, MODSEQ, EMAILID, THREADID, RFC822, RFC822.HEADER, RFC822.TEXT, or
    BODY with ``section`` (the text between the brackets, e.g. ``"1.HEADER.FIELDS (TO)"``) and
    optional ``partial`` (origin, length)."""

    name: str
    section: str | None = None
    partial: tuple[int, int] | None = None
    peek: bool = False


@dataclass(frozen=True, slots=True)
class FetchResult:
    seq: int
    uid: int
    items: tuple[bytes, ...]  # rendered ``NAME value`` pieces


@dataclass(frozen=True, slots=True)
class _FetchPlan:
    atts: tuple[FetchAtt, ...]  # with UID (UID FETCH) and MODSEQ (CHANGEDSINCE) added
    sets_seen: bool  # a body section without PEEK: sets \\Seen
    has_flags: bool
    simple: bool  # only items from the index columns


@dataclass(frozen=True, slots=True)
class StoreResult:
    fetches: tuple[FetchResult, ...]
    modified: tuple[int, ...]  # sequence numbers (STORE) or UIDs (UID STORE)


@dataclass(frozen=True, slots=True)
class CopyResult:
    uidvalidity: int
    source_uids: tuple[int, ...]
    dest_uids: tuple[int, ...]


# -- LIST matching -----------------------------------------------------------------------------


def _canon_inbox(name: str) -> str:
    head, sep, rest = name.partition(DELIMITER)
    if ix.is_inbox(head):
        return "INBOX" + sep + rest
    return name


def pattern_regex(ref: str, pattern: str) -> re.Pattern[str]:
    """LIST reference + pattern (``*`` any, ``%`` any within one level) as a regex."""
    full = _canon_inbox(ref + pattern) if not ref or ref.endswith(DELIMITER) else ref + pattern
    full = _canon_inbox(full)
    out = []
    for c in full:
        if c == "*":
            out.append(".*")
        elif c == "%":
            out.append("[^" + re.escape(DELIMITER) + "]*")
        else:
            out.append(re.escape(c))
    return re.compile("".join(out), re.S)


def _parents(name: str) -> list[str]:
    parts = name.split(DELIMITER)
    return [DELIMITER.join(parts[:i]) for i in range(1, len(parts))]


# -- the service -------------------------------------------------------------------------------


class _MetaEntry:
    """A cached body's parsed MIME metadata and, once asked for, its rendered FETCH values."""

    __slots__ = ("body", "bodystructure", "envelope", "meta")

    def __init__(self, meta: MessageMeta) -> None:
        self.meta = meta
        self.envelope: bytes | None = None
        self.bodystructure: bytes | None = None
        self.body: bytes | None = None


class MailboxService:
    """Account-level operations of one node (see the module doc)."""

    def __init__(self, store: Store, hub: NotificationHub | None = None) -> None:
        self.store = store
        self.hub = hub or NotificationHub(store)
        self._meta: OrderedDict[bytes, _MetaEntry] = OrderedDict()
        self._background: set[asyncio.Task[None]] = set()

    # -- lookups -------------------------------------------------------------------------------

    def account(self, address: str) -> ix.Account:
        a = self.store.index.account_by_address(address)
        if a is None:
            raise MailboxError("UNAVAILABLE", "Account does not exist")
        return a

    def mailbox(self, address: str, name: str) -> ix.Mailbox:
        a = self.account(address)
        try:
            name = check_mailbox_name(name)
        except InvalidArgument:
            raise MailboxError("NONEXISTENT", "Mailbox does not exist") from None
        mb = self.store.index.mailbox_by_name(a.guid, name)
        if mb is None:
            raise MailboxError("NONEXISTENT", "Mailbox does not exist")
        return mb

    def _names(self, acct: ix.Account) -> dict[str, ix.Mailbox]:
        out = {}
        for g in acct.mailboxes.values():
            mb = self.store.index.mailboxes.get(g)
            if mb is not None:
                out[mb.name] = mb
        return out

    # -- metadata ------------------------------------------------------------------------------

    def meta(self, blob: bytes) -> MessageMeta:
        """The parsed MIME metadata of a body: from the cache, the store's MIME_META record, or
        (for bodies stored without one) parsed now and persisted in the background."""
        return self._meta_entry(blob).meta

    def envelope(self, blob: bytes) -> bytes:
        """The rendered FETCH ENVELOPE value of a body (cached with its metadata)."""
        e = self._meta_entry(blob)
        if e.envelope is None:
            e.envelope = envelope_imap(e.meta)
        return e.envelope

    def bodystructure(self, blob: bytes, extended: bool) -> bytes:
        """The rendered FETCH BODYSTRUCTURE (``extended``) or BODY value (cached)."""
        e = self._meta_entry(blob)
        if extended:
            if e.bodystructure is None:
                e.bodystructure = bodystructure_imap(e.meta, True)
            return e.bodystructure
        if e.body is None:
            e.body = bodystructure_imap(e.meta, False)
        return e.body

    def _meta_entry(self, blob: bytes) -> _MetaEntry:
        """The cache entry of a body. Keyed by the body's hash, so never stale: what it holds
        is a pure function of the body's bytes."""
        e = self._meta.get(blob)
        if e is not None:
            self._meta.move_to_end(blob)
            return e
        m: MessageMeta | None = None
        rec = self.store.read_mime_meta(blob)
        if rec is not None and rec[0] == META_VERSION:
            try:
                m = decode_meta(rec[1])
            except ValueError:
                m = None
        if m is None:
            m = parse_message(self.store.read_blob(blob))
            self._persist_meta(blob, m)
        e = self._meta[blob] = _MetaEntry(m)
        if len(self._meta) > _META_CACHE:
            self._meta.popitem(last=False)
        return e

    def _persist_meta(self, blob: bytes, m: MessageMeta) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        async def go() -> None:
            try:
                t = self.store.transaction()
                t.put_mime_meta(blob, META_VERSION, encode_meta(m))
                await t.commit_async()
            except StoreError as e:
                log.warning("could not persist MIME metadata: %s", e)

        self._spawn(loop, go())

    def _spawn(
        self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]
    ) -> asyncio.Task[None]:
        task = loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def drain(self) -> None:
        """Wait for background commits (implicit \\Seen, metadata) to finish."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # -- LIST ----------------------------------------------------------------------------------

    def list_mailboxes(
        self,
        address: str,
        ref: str,
        patterns: Sequence[str],
        *,
        subscribed: bool = False,
        recursive_match: bool = False,
        special_use: bool = False,
        return_subscribed: bool = False,
        lsub: bool = False,
    ) -> list[ListEntry]:
        """LIST / LIST-EXTENDED / LSUB. Attributes: \\HasChildren/\\HasNoChildren, special-use,
        \\Subscribed (when asked); \\Noselect + \\HasChildren for a hierarchy level that
        only exists through its children (whatever the wildcard), \\NonExistent for a name
        listed only as a subscription."""
        if len(patterns) == 1 and patterns[0] == "" and not lsub:
            return [ListEntry("", ("\\Noselect",), selectable=False)]
        acct = self.account(address)
        boxes = self._names(acct)
        subs = acct.subscriptions
        regexes = [pattern_regex(ref, p) for p in patterns]

        def matches(n: str) -> bool:
            return any(r.fullmatch(n) for r in regexes)

        existing = set(boxes)
        parents: set[str] = set()
        for n in existing:
            parents.update(_parents(n))
        out: list[ListEntry] = []
        if lsub:
            for n in sorted(subs):
                if matches(n):
                    la: tuple[str, ...] = () if n in existing else ("\\Noselect",)
                    out.append(ListEntry(n, la, selectable=n in existing))
            return out
        if subscribed:
            candidates = set(subs)
            if recursive_match:
                candidates |= {p for s in subs for p in _parents(s)}
        else:
            # hierarchy levels that only exist through their children are listed for every
            # pattern that matches them, ``*`` as well as ``%`` (RFC 9051 6.3.9), as \Noselect
            candidates = existing | parents
        for n in sorted(candidates, key=lambda x: (x != "INBOX", x)):
            if not matches(n):
                continue
            attrs: list[str] = []
            child_info: tuple[str, ...] = ()
            mb = boxes.get(n)
            if subscribed and n not in subs:
                # only here through RECURSIVEMATCH: a parent of a subscribed name
                if not any(s.startswith(n + DELIMITER) for s in subs):
                    continue
                child_info = ("SUBSCRIBED",)
                if mb is None:
                    attrs.append("\\NonExistent")
            elif mb is None:
                attrs += ["\\NonExistent", "\\Noselect"] if n not in parents else ["\\Noselect"]
                if subscribed:
                    attrs = ["\\NonExistent"]
            if mb is not None or n in parents:
                attrs.append("\\HasChildren" if n in parents else "\\HasNoChildren")
            if mb is not None:
                attrs += [name for name, bit in ix.SPECIAL_USE.items() if mb.special_use & bit]
            if special_use and (mb is None or not mb.special_use):
                continue
            if (return_subscribed or subscribed) and n in subs:
                attrs.append("\\Subscribed")
            out.append(ListEntry(n, tuple(dict.fromkeys(attrs)), child_info, mb is not None))
        return out

    # -- mailbox management --------------------------------------------------------------------

    def _check_name(self, name: str) -> str:
        try:
            return check_mailbox_name(name.rstrip(DELIMITER) if name != DELIMITER else name)
        except InvalidArgument:
            raise MailboxError("CANNOT", "Invalid mailbox name") from None

    async def _commit(self, t: Transaction) -> int:
        try:
            return await t.commit_async()
        except StoreError as e:
            raise _store_error(e) from None

    async def create(self, address: str, name: str, special_use: Sequence[str] = ()) -> None:
        """CREATE, with the RFC 6154 special-use attributes of ``(USE (...))`` for the new
        mailbox (not for parents created on the way); an attribute the store cannot keep is
        ``NO [USEATTR]`` and nothing is created."""
        acct = self.account(address)
        name = self._check_name(name)
        use = 0
        for attr in special_use:
            bit = _SPECIAL_USE_LOWER.get(attr.lower())
            if bit is None:
                raise MailboxError("USEATTR", "Special-use attribute not supported")
            use |= bit
        boxes = self._names(acct)
        if name in boxes or ix.is_inbox(name):
            raise MailboxError("ALREADYEXISTS", "Mailbox already exists")
        t = self.store.transaction()
        for p in _parents(name):
            if p not in boxes and not ix.is_inbox(p):
                t.create_mailbox(acct.guid, p)
        t.create_mailbox(acct.guid, name, use)
        await self._commit(t)

    async def delete(self, address: str, name: str) -> None:
        mb = self.mailbox(address, name)
        if ix.is_inbox(mb.name):
            raise MailboxError("CANNOT", "INBOX cannot be deleted")
        t = self.store.transaction()
        t.delete_mailbox(mb.guid)
        await self._commit(t)

    async def rename(self, address: str, old: str, new: str) -> None:
        acct = self.account(address)
        src = self.mailbox(address, old)
        new = self._check_name(new)
        boxes = self._names(acct)
        if new in boxes or ix.is_inbox(new):
            raise MailboxError("ALREADYEXISTS", "Target mailbox already exists")
        if new.startswith(src.name + DELIMITER):
            raise MailboxError("CANNOT", "Cannot rename a mailbox into itself")
        t = self.store.transaction()
        for p in _parents(new):
            if p not in boxes and not ix.is_inbox(p) and p != src.name:
                t.create_mailbox(acct.guid, p)
        if ix.is_inbox(src.name):
            # RFC 9051 6.3.6: all messages move to the new mailbox, INBOX stays (empty).
            g = t.create_mailbox(acct.guid, new)
            await self._commit(t)
            uids = list(src.uids)
            for i in range(0, len(uids), _BATCH):
                await self._copy_uids(src, uids[i : i + _BATCH], g, move=True)
            return
        prefix = src.name + DELIMITER
        for n, mb in boxes.items():
            if n.startswith(prefix):
                t.rename_mailbox(mb.guid, new + n[len(src.name) :])
        t.rename_mailbox(src.guid, new)
        # the subscriptions of the mailbox and its children follow it (same transaction)
        for sub in sorted(acct.subscriptions):
            if sub == src.name or sub.startswith(prefix):
                t.subscribe(acct.guid, sub, False)
                t.subscribe(acct.guid, new + sub[len(src.name) :], True)
        await self._commit(t)

    async def subscribe(self, address: str, name: str, on: bool) -> None:
        acct = self.account(address)
        name = self._check_name(name)
        t = self.store.transaction()
        t.subscribe(acct.guid, name, on)
        await self._commit(t)

    def status(self, address: str, name: str) -> StatusInfo:
        mb = self.mailbox(address, name)
        return self.status_of(mb)

    def status_of(self, mb: ix.Mailbox) -> StatusInfo:
        fl = mb.flags
        unseen = sum(1 for f in fl if not f & ix.SEEN)
        deleted = sum(1 for f in fl if f & ix.DELETED)
        first = max(self.hub.peek_recent(mb.guid), 1)
        recent = len(mb.uids) - bisect.bisect_left(mb.uids, first)
        return StatusInfo(
            len(mb),
            recent,
            mb.uidnext,
            mb.uidvalidity,
            unseen,
            deleted,
            mb.total_size,
            mb.highestmodseq,
            mailbox_id(mb.guid),
        )

    def quota(self, address: str) -> tuple[int, int]:
        """(bytes used, limit in bytes; 0 = unlimited) of the account."""
        acct = self.account(address)
        used, _ = self.store.index.account_usage(acct.guid)
        return used, acct.quota_bytes

    def _check_quota(self, acct: ix.Account, extra: int) -> None:
        if acct.quota_bytes <= 0:
            return
        used, _ = self.store.index.account_usage(acct.guid)
        if used + extra > acct.quota_bytes:
            raise MailboxError("OVERQUOTA", "Quota exceeded")

    async def append(
        self,
        address: str,
        name: str,
        data: bytes,
        flags: Sequence[str] = (),
        internaldate_ms: int | None = None,
    ) -> tuple[int, int]:
        """Store a message; returns (UIDVALIDITY, UID) once durable. A missing mailbox is
        ``NO [TRYCREATE]``."""
        acct = self.account(address)
        try:
            mb = self.mailbox(address, name)
        except MailboxError:
            raise MailboxError("TRYCREATE", "Mailbox does not exist") from None
        bits, kws = parse_flags(flags)
        self._check_quota(acct, len(data))
        t = self.store.transaction()
        h = t.put_blob(data)
        if self.store.read_mime_meta(h) is None:
            m = parse_message(data)
            t.put_mime_meta(h, META_VERSION, encode_meta(m))
        d = t.deliver(h, [mb.guid], flags=bits, keywords=kws, internaldate_ms=internaldate_ms)
        await self._commit(t)
        return mb.uidvalidity, d.uids[mb.guid]

    async def _copy_uids(
        self, src: ix.Mailbox, uids: Sequence[int], dest: bytes, *, move: bool
    ) -> tuple[list[int], list[int]]:
        t = self.store.transaction()
        blobs = self.store.index.blobs
        done: list[int] = []
        results = []
        for u in uids:
            i = src.position(u)
            if i is None:
                continue
            h = blobs.hash_at(src.blobs[i])
            d = t.deliver(
                h,
                [dest],
                flags=src.flags[i],
                keywords=src.keyword_names(src.kwbits[i]),
                internaldate_ms=src.dates[i],
            )
            done.append(u)
            results.append(d)
        if not done:
            return [], []
        if move:
            t.expunge(src.guid, done)
        await self._commit(t)
        return done, [d.uids[dest] for d in results]

    # -- SELECT --------------------------------------------------------------------------------

    def select(
        self,
        address: str,
        name: str,
        *,
        readonly: bool = False,
        rev2: bool = False,
        condstore: bool = False,
        qresync: tuple[int, int, tuple[tuple[int | None, int | None], ...] | None] | None = None,
    ) -> tuple[SelectedView, SelectInfo]:
        """Open a view. ``qresync`` = (uidvalidity, modseq, known UID ranges or None)."""
        mb = self.mailbox(address, name)
        view = SelectedView(self, address, mb, readonly=readonly, rev2=rev2)
        view.condstore = condstore or qresync is not None
        view.qresync = qresync is not None
        info = view.info()
        if qresync is not None and qresync[0] == mb.uidvalidity:
            vanished = view.vanished_since(qresync[1], qresync[2])
            changed = tuple(view.changed_since(qresync[1]))
            info = replace(info, vanished=vanished, changed=changed)
        return view, info


# -- the selected view -------------------------------------------------------------------------


class SelectedView:
    """One session's view of one mailbox (see the module doc)."""

    def __init__(
        self,
        service: MailboxService,
        address: str,
        mb: ix.Mailbox,
        *,
        readonly: bool,
        rev2: bool,
    ) -> None:
        self.service = service
        self.store = service.store
        self.address = address
        self.guid = mb.guid
        self.readonly = readonly
        self.rev2 = rev2
        self.condstore = False
        self.qresync = False
        self.uids: list[int] = list(mb.uids)
        self.uidvalidity = mb.uidvalidity
        self._modseq = mb.highestmodseq
        self._uidnext = mb.uidnext
        self._expunged: set[int] = set()
        self._reported: dict[int, int] = {}
        self._keywords = len(mb.keywords)
        self._recent: set[int] = set()
        if not rev2:
            first = (
                service.hub.peek_recent(mb.guid)
                if readonly
                else service.hub.claim_recent(mb.guid, mb.uidnext)
            )
            self._recent = set(self.uids[bisect.bisect_left(self.uids, first) :])
        self.wakeup: asyncio.Event | None = None
        self._handle = 0
        self._pending: set[asyncio.Task[None]] = set()
        # rendered ``FLAGS (...)`` items by flag bits | recent << 8 | keyword bits << 9, valid
        # for the keyword list it was made with (keywords are only ever appended to it)
        self._flag_items: dict[int, bytes] = {}
        self._flag_items_kw: tuple[list[str] | None, int] = (None, 0)

    # -- plumbing ------------------------------------------------------------------------------

    def mailbox(self) -> ix.Mailbox:
        mb = self.store.index.mailboxes.get(self.guid)
        if mb is None:
            raise MailboxGone()
        return mb

    def watch(self, event: asyncio.Event) -> None:
        """Have ``event`` set whenever a commit touches this mailbox."""
        self.wakeup = event
        self._handle = self.service.hub.watch(self.guid, event.set)

    def close(self) -> None:
        if self._handle:
            self.service.hub.unwatch(self.guid, self._handle)
            self._handle = 0

    def is_recent(self, uid: int) -> bool:
        return uid in self._recent

    def permanent_flags(self, mb: ix.Mailbox) -> tuple[str, ...]:
        if self.readonly:
            return ()
        out = [name for _, name in FLAG_ORDER] + list(mb.keywords)
        if len(mb.keywords) < ix.MAX_KEYWORDS:
            out.append("\\*")
        return tuple(out)

    def flags(self, mb: ix.Mailbox) -> tuple[str, ...]:
        return tuple([name for _, name in FLAG_ORDER] + list(mb.keywords))

    def info(self) -> SelectInfo:
        mb = self.mailbox()
        first_unseen = 0
        for i, f in enumerate(mb.flags):
            if not f & ix.SEEN:
                first_unseen = i + 1
                break
        return SelectInfo(
            exists=len(self.uids),
            recent=self.recent_count(),
            uidvalidity=mb.uidvalidity,
            uidnext=mb.uidnext,
            highestmodseq=mb.highestmodseq,
            flags=self.flags(mb),
            permanent_flags=self.permanent_flags(mb),
            first_unseen=first_unseen,
            readonly=self.readonly,
            mailboxid=mailbox_id(mb.guid),
        )

    def recent_count(self) -> int:
        return len(self._recent)

    @property
    def exists(self) -> int:
        return len(self.uids)

    # -- sync ----------------------------------------------------------------------------------

    def sync(self, *, expunge_allowed: bool) -> list[Update]:
        """The untagged updates owed to the client (see the module doc). Raises MailboxGone."""
        mb = self.mailbox()
        out: list[Update] = []
        if mb.highestmodseq != self._modseq or mb.uidnext != self._uidnext:
            base = self._modseq
            # expunges since the last sync (the index keeps them in MODSEQ order)
            k = bisect.bisect_right(mb.vanished_modseqs, base)
            for u in mb.vanished_uids[k:]:
                if self.seq_of(u) is not None:
                    self._expunged.add(u)
            # flag changes: from the mailbox's change log when it reaches back to `base`
            lo = self.uids[0] if self.uids else 0
            last = self.uids[-1] if self.uids else 0
            logged = mb.changed_uids_since(base)
            if logged is not None:
                positions: Iterable[int] = (
                    i for i in (mb.position(u) for u in logged if lo <= u <= last) if i is not None
                )
            else:
                start = bisect.bisect_left(mb.uids, lo)
                positions = range(start, bisect.bisect_right(mb.uids, last))
            modseqs = mb.modseqs
            changed: list[FlagsChanged] = []
            for i in positions:
                m = modseqs[i]
                if m <= base:
                    continue
                u = mb.uids[i]
                if self._reported.get(u) == m:
                    continue
                seq = self.seq_of(u)
                if seq is None:
                    continue
                changed.append(self._flags_changed(mb, i, seq))
            if len(mb.keywords) != self._keywords:
                self._keywords = len(mb.keywords)
                out.append(KeywordsChanged(self.flags(mb), self.permanent_flags(mb)))
            # new messages
            new_from = bisect.bisect_left(mb.uids, max(self._uidnext, last + 1))
            new = list(mb.uids[new_from:])
            self._modseq = mb.highestmodseq
            self._uidnext = mb.uidnext
            self._reported.clear()
            out.extend(changed)
            if new:
                if not self.rev2 and not self.readonly:
                    first = self.service.hub.claim_recent(self.guid, mb.uidnext)
                    self._recent.update(u for u in new if u >= first)
                self.uids.extend(new)
                out.append(Exists(len(self.uids)))
                if not self.rev2:
                    out.append(Recent(self.recent_count()))
        if expunge_allowed and self._expunged:
            # last: the FETCH and EXISTS above use the numbering before these expunges
            out.append(self._apply_expunges())
        return out

    def _known_set(self) -> set[int]:
        return set(self.uids)

    def _apply_expunges(self) -> Update:
        gone = self._expunged
        self._expunged = set()
        self._recent -= gone
        uids = self.uids
        idx = sorted(i for i in (self._index_of(u) for u in gone) if i is not None)
        if len(idx) <= 64:
            for i in reversed(idx):
                del uids[i]
        else:
            self.uids = [u for u in uids if u not in gone]
        if self.qresync:
            return Vanished(tuple(sorted(gone)))
        return Expunged(tuple(i + 1 for i in reversed(idx)))

    def _index_of(self, uid: int) -> int | None:
        i = bisect.bisect_left(self.uids, uid)
        if i < len(self.uids) and self.uids[i] == uid:
            return i
        return None

    def column_runs(self, mb: ix.Mailbox) -> tuple[list[tuple[int, int, int]], list[int]] | None:
        """How the view maps onto the mailbox's columns: runs ``(first, end, column of
        first)`` of view indexes still in the mailbox, and the view indexes of the UIDs expunged
        from it but not yet from the view (ascending). None if they cannot be told apart cheaply
        (then callers look UIDs up one by one). Cost: O(log n + pending expunges)."""
        uids = self.uids
        nv = len(uids)
        if not nv:
            return [], []
        known = bisect.bisect_right(mb.uids, uids[-1])  # mailbox UIDs the view knows
        if known == nv:
            return [(0, nv, 0)], []
        gone = set(self._expunged)
        k = bisect.bisect_right(mb.vanished_modseqs, self._modseq)
        gone.update(mb.vanished_uids[k:])
        gaps = sorted(i for i in map(self._index_of, gone) if i is not None)
        if nv - len(gaps) != known:
            return None
        runs: list[tuple[int, int, int]] = []
        start = 0
        for before, g in enumerate(gaps):  # `before` gaps precede view index `start`
            if g > start:
                runs.append((start, g, start - before))
            start = g + 1
        if start < nv:
            runs.append((start, nv, start - len(gaps)))
        return runs, gaps

    def _aligned(self, mb: ix.Mailbox) -> bool:
        """True when the view's UIDs are the first ``len(self.uids)`` of the mailbox's columns
        (no expunge pending), so that column index = sequence number - 1. The mailbox's UIDs up
        to the view's last are always a subset of the view's (new UIDs are above it), so equal
        UIDs at position n - 1 mean equal lists."""
        n = len(self.uids)
        return n == 0 or (len(mb.uids) >= n and mb.uids[n - 1] == self.uids[-1])

    def _flags_changed(self, mb: ix.Mailbox, i: int, seq: int) -> FlagsChanged:
        u = mb.uids[i]
        names = flag_names(mb.flags[i], mb.keyword_names(mb.kwbits[i]), self.is_recent(u))
        return FlagsChanged(seq, u, tuple(names), mb.modseqs[i] if self.condstore else None)

    def seq_of(self, uid: int) -> int | None:
        i = self._index_of(uid)
        return None if i is None else i + 1

    # -- message sets --------------------------------------------------------------------------

    def resolve(
        self, ranges: Sequence[tuple[int | None, int | None]], *, uid: bool
    ) -> list[tuple[int, int]]:
        """A sequence set (``None`` is ``*``) → ascending (seq, UID) pairs of the view.
        Sequence numbers out of range are a BAD; UIDs that do not exist are skipped."""
        uids = self.uids
        n = len(uids)
        spans: list[tuple[int, int]] = []  # [i, j) index ranges
        if uid:
            top = uids[-1] if n else 0
            for a, b in ranges:
                lo, hi = a if a is not None else top, b if b is not None else top
                if lo > hi:
                    lo, hi = hi, lo
                spans.append((bisect.bisect_left(uids, lo), bisect.bisect_right(uids, hi)))
        else:
            for a, b in ranges:
                lo, hi = a if a is not None else n, b if b is not None else n
                if lo > hi:
                    lo, hi = hi, lo
                if lo < 1 or hi > n:
                    raise MailboxError(None, "Invalid message sequence number", bad=True)
                spans.append((lo - 1, hi))
        if len(spans) == 1:
            i, j = spans[0]
            return list(zip(range(i + 1, j + 1), uids[i:j], strict=True))
        out: set[int] = set()  # indexes
        for i, j in spans:
            out.update(range(i, j))
        return [(i + 1, uids[i]) for i in sorted(out)]

    def _live(self, targets: Iterable[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """(seq, uid, index in the mailbox columns) of targets still in the mailbox."""
        mb = self.mailbox()
        muids = mb.uids
        n = len(muids) if self._aligned(mb) else 0
        out = []
        for seq, u in targets:
            if 0 <= seq - 1 < n and muids[seq - 1] == u:
                out.append((seq, u, seq - 1))
                continue
            i = mb.position(u)
            if i is not None:
                out.append((seq, u, i))
        return out

    def _writable(self) -> None:
        if self.readonly:
            raise MailboxError("READ-ONLY", "Mailbox is read-only")

    # -- FETCH ---------------------------------------------------------------------------------

    def fetch(
        self,
        targets: Sequence[tuple[int, int]],
        atts: Sequence[FetchAtt],
        *,
        uid_cmd: bool = False,
        changedsince: int | None = None,
    ) -> list[FetchResult]:
        """Render FETCH data for the targets (see :meth:`fetch_lines`; targets that cannot be
        served are left out). A body section without PEEK sets \\Seen through a background
        commit and the response already shows it."""
        rows, _ = self._fetch_rows(targets, atts, uid_cmd=uid_cmd, changedsince=changedsince)
        return [FetchResult(seq, u, tuple(items)) for seq, u, items in rows]

    def fetch_lines(
        self,
        targets: Sequence[tuple[int, int]],
        atts: Sequence[FetchAtt],
        *,
        uid_cmd: bool = False,
        changedsince: int | None = None,
    ) -> tuple[bytes, int]:
        """FETCH as response bytes, ``* seq FETCH (...)\\r\\n`` per message, and the number of
        targets that could not be served. A target expunged by another session but not yet
        announced to this one is served from what is still readable (the mailbox keeps the
        columns of recent expunges; the body while compaction has not reclaimed it); when
        that is gone it is left out and counted (the caller answers ``NO [EXPUNGEISSUED]``)."""
        plan = self._fetch_plan(atts, uid_cmd, changedsince)
        if plan.simple and changedsince is None:
            fast = self._fetch_simple(self.mailbox(), targets, plan.atts)
            if fast is not None:
                return fast
        rows, missing = self._fetch_rows(targets, atts, uid_cmd=uid_cmd, changedsince=changedsince)
        return b"".join([b"* %d FETCH (%s)\r\n" % (q, b" ".join(it)) for q, _, it in rows]), missing

    def _fetch_plan(
        self, atts: Sequence[FetchAtt], uid_cmd: bool, changedsince: int | None
    ) -> _FetchPlan:
        names = [a.name for a in atts]
        if changedsince is not None:
            self.condstore = True
            if "MODSEQ" not in names:
                atts = [*atts, FetchAtt("MODSEQ")]
        if "MODSEQ" in names:
            self.condstore = True
        if uid_cmd and "UID" not in names:
            atts = [FetchAtt("UID"), *atts]
        sets_seen = not self.readonly and any(
            (a.section is not None and not a.peek) or a.name in ("RFC822", "RFC822.TEXT")
            for a in atts
        )
        simple = not sets_seen and all(a.name in _SIMPLE_ITEMS for a in atts)
        return _FetchPlan(tuple(atts), sets_seen, any(a.name == "FLAGS" for a in atts), simple)

    def _fetch_simple(
        self, mb: ix.Mailbox, targets: Sequence[tuple[int, int]], atts: Sequence[FetchAtt]
    ) -> tuple[bytes, int] | None:
        """The fast path for items from the index columns only, over one run of sequence
        numbers: the view is mapped onto the columns run by run (:meth:`column_runs`), flag
        lists are rendered once per combination, and the lines go straight into one buffer.
        None when the targets are not such a run (the caller takes the general path)."""
        if not targets:
            return b"", 0
        uids = self.uids
        (s0, u0), (s1, u1) = targets[0], targets[-1]
        a, b = s0 - 1, s1
        if not (
            0 <= a < b <= len(uids)
            and b - a == len(targets)
            and uids[a] == u0
            and uids[b - 1] == u1
        ):
            return None
        mapping = self.column_runs(mb)
        if mapping is None:
            return None
        runs, gaps = mapping
        names = [a.name for a in atts]
        out: list[bytes] = []
        missing = 0
        pieces = sorted([*runs, *((g, g + 1, -1) for g in gaps)])
        for first, end, col in pieces:
            lo, hi = max(first, a), min(end, b)
            if lo >= hi:
                continue
            if col >= 0:
                self._render_run(out, mb, lo + 1, col + lo - first, hi - lo, names)
                continue
            # expunged elsewhere, not yet announced here: what is still readable
            rows, n = self._fetch_rows([(lo + 1, uids[lo])], atts, uid_cmd=False, changedsince=None)
            missing += n
            out.extend(b"* %d FETCH (%s)\r\n" % (q, b" ".join(it)) for q, _, it in rows)
        return b"".join(out), missing

    def _render_run(
        self, out: list[bytes], mb: ix.Mailbox, seq: int, col: int, count: int, names: list[str]
    ) -> None:
        """FETCH lines for sequence numbers ``seq``… whose columns start at ``col``."""
        end = col + count
        items = self._flag_items
        if self._flag_items_kw != (mb.keywords, len(mb.keywords)):
            items.clear()
            self._flag_items_kw = (mb.keywords, len(mb.keywords))
        recent = self._recent
        add = out.append
        run = zip(
            range(seq, seq + count),
            mb.uids[col:end],
            mb.flags[col:end],
            mb.kwbits[col:end],
            strict=True,
        )
        if names in (["FLAGS"], ["UID", "FLAGS"]):
            with_uid = len(names) == 2
            for q, u, f, k in run:
                key = f | k << 9
                if recent and u in recent:
                    key |= 256
                item = items.get(key)
                if item is None:
                    item = self._flag_item(mb, key)
                if with_uid:
                    add(b"* %d FETCH (UID %d %s)\r\n" % (q, u, item))
                else:
                    add(b"* %d FETCH (%s)\r\n" % (q, item))
            return
        i = col
        for q, u, f, k in run:
            parts: list[bytes] = []
            for nm in names:
                if nm == "FLAGS":
                    key = f | k << 9
                    if recent and u in recent:
                        key |= 256
                    item = items.get(key)
                    parts.append(item if item is not None else self._flag_item(mb, key))
                else:
                    parts.append(self._simple_item(mb, nm, i, u))
            add(b"* %d FETCH (%s)\r\n" % (q, b" ".join(parts)))
            i += 1

    @staticmethod
    def _simple_item(mb: ix.Mailbox, nm: str, i: int, u: int) -> bytes:
        if nm == "UID":
            return b"UID %d" % u
        if nm == "INTERNALDATE":
            return b'INTERNALDATE "' + imap_date(mb.dates[i]).encode() + b'"'
        if nm == "RFC822.SIZE":
            return b"RFC822.SIZE %d" % mb.sizes[i]
        if nm == "MODSEQ":
            return b"MODSEQ (%d)" % mb.modseqs[i]
        return b"THREADID NIL"

    def _flag_item(self, mb: ix.Mailbox, key: int) -> bytes:
        items = self._flag_items
        if self._flag_items_kw != (mb.keywords, len(mb.keywords)):
            items.clear()
            self._flag_items_kw = (mb.keywords, len(mb.keywords))
        item = items.get(key)
        if item is None:
            if len(items) >= _FLAG_ITEMS_MAX:
                items.clear()
            names = flag_names(key & 0xFF, mb.keyword_names(key >> 9), bool(key & 256))
            item = items[key] = _flags_item(names)
        return item

    def _fetch_rows(
        self,
        targets: Sequence[tuple[int, int]],
        atts: Sequence[FetchAtt],
        *,
        uid_cmd: bool,
        changedsince: int | None,
    ) -> tuple[list[tuple[int, int, list[bytes]]], int]:
        """The general path: (seq, uid, rendered items) per served target, and how many
        targets could not be served (expunged, columns or body no longer readable)."""
        plan = self._fetch_plan(atts, uid_cmd, changedsince)
        atts = plan.atts
        mb = self.mailbox()
        newly_seen: list[int] = []
        out: list[tuple[int, int, list[bytes]]] = []
        missing = 0
        live = {u: i for _, u, i in self._live(targets)}
        for seq, u in targets:
            i = live.get(u)
            row_mb = mb
            if i is None:
                # expunged by another session, not yet announced here
                shadow = self._expunged_row(mb, u)
                if shadow is None:
                    missing += 1
                    continue
                row_mb, i = shadow, 0
            if changedsince is not None and row_mb.modseqs[i] <= changedsince:
                continue
            flags = row_mb.flags[i]
            seen_now = plan.sets_seen and row_mb is mb and not flags & ix.SEEN
            if seen_now:
                flags |= ix.SEEN
                newly_seen.append(u)
            try:
                items = self._render_row(row_mb, i, u, flags, atts)
            except StoreError:
                if row_mb is mb:
                    raise
                missing += 1  # the expunged body was reclaimed meanwhile
                continue
            if seen_now and not plan.has_flags:
                items.append(self._render_flags(row_mb, i, flags, u))
            out.append((seq, u, items))
        if newly_seen:
            self._set_seen_later(newly_seen)
        return out, missing

    def _expunged_row(self, mb: ix.Mailbox, uid: int) -> ix.Mailbox | None:
        """A one-message stand-in with the columns of expunged ``uid`` as the mailbox kept
        them, or None when they are gone (or the UID is not this view's)."""
        row = self.store.index.expunged_rows.get((mb.guid, uid))
        if row is None or self._index_of(uid) is None:
            return None
        modseq, flags, kw, date, size, blob = row
        return ix.Mailbox(
            mb.guid,
            mb.account,
            mb.name,
            mb.uidvalidity,
            mb.special_use,
            keywords=mb.keywords,
            uids=array("I", [uid]),
            modseqs=array("Q", [modseq]),
            flags=array("B", [flags]),
            kwbits=array("Q", [kw]),
            dates=array("q", [date]),
            sizes=array("Q", [size]),
            blobs=array("I", [blob]),
        )

    def _render_row(
        self, mb: ix.Mailbox, i: int, u: int, flags: int, atts: Sequence[FetchAtt]
    ) -> list[bytes]:
        service = self.service
        items: list[bytes] = []
        blob: bytes | None = None
        raw: bytes | None = None
        for a in atts:
            nm = a.name
            if nm == "FLAGS":
                items.append(self._render_flags(mb, i, flags, u))
            elif nm in _SIMPLE_ITEMS:
                items.append(self._simple_item(mb, nm, i, u))
            else:
                blob = blob or self.store.index.blobs.hash_at(mb.blobs[i])
                if nm == "EMAILID":
                    items.append(b"EMAILID (" + email_id(blob).encode() + b")")
                elif nm == "ENVELOPE":
                    items.append(b"ENVELOPE " + service.envelope(blob))
                elif nm == "BODYSTRUCTURE":
                    items.append(b"BODYSTRUCTURE " + service.bodystructure(blob, True))
                elif nm == "BODY" and a.section is None:
                    items.append(b"BODY " + service.bodystructure(blob, False))
                else:
                    raw = raw if raw is not None else self.store.read_blob(blob)
                    items.append(self._render_section(a, raw, service.meta(blob)))
        return items

    def _render_flags(self, mb: ix.Mailbox, i: int, flags: int, u: int) -> bytes:
        recent = 256 if self._recent and u in self._recent else 0
        return self._flag_item(mb, flags | recent | mb.kwbits[i] << 9)

    @staticmethod
    def _render_section(a: FetchAtt, raw: bytes, meta: MessageMeta) -> bytes:
        if a.name == "RFC822":
            return b"RFC822 " + _literal(raw)
        if a.name == "RFC822.HEADER":
            data = section_bytes(raw, meta, "HEADER") or b""
            return b"RFC822.HEADER " + _literal(data)
        if a.name == "RFC822.TEXT":
            data = section_bytes(raw, meta, "TEXT") or b""
            return b"RFC822.TEXT " + _literal(data)
        section = a.section or ""
        part = section_bytes(raw, meta, section)
        name = b"BODY[" + section.encode("utf-8") + b"]"
        if a.partial is not None:
            start, length = a.partial
            name += b"<%d>" % start
            if part is not None:
                part = part[start : start + length]
        if part is None:
            return name + b" NIL"
        return name + b" " + _literal(part)

    def _set_seen_later(self, uids: list[int]) -> None:
        """The implicit \\Seen: group-committed in the background; the FETCH does not wait."""
        guid = self.guid
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        async def go() -> None:
            try:
                t = self.store.transaction()
                c = t.store_flags(guid, uids, add=ix.SEEN)
                await t.commit_async()
                for u in c.uids:
                    self._reported[u] = c.modseq
            except StoreError as e:
                log.warning("implicit \\Seen not stored: %s", e)

        task = self.service._spawn(loop, go())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def settle(self) -> None:
        """Wait for this view's implicit \\Seen commits: called before the session's next
        command, so it never sees its own flags go back."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    # -- STORE ---------------------------------------------------------------------------------

    async def store_flags(
        self,
        targets: Sequence[tuple[int, int]],
        mode: str,
        flags: Sequence[str],
        *,
        silent: bool = False,
        unchanged_since: int | None = None,
        uid_cmd: bool = False,
    ) -> StoreResult:
        """STORE: ``mode`` is ``"+"``, ``"-"`` or ``""`` (replace). Durable before it returns."""
        self._writable()
        if unchanged_since is not None:
            self.condstore = True
        bits, kws = parse_flags(flags)
        live = self._live(targets)
        mb = self.mailbox()
        add_kw: tuple[str, ...]
        rem_kw: tuple[str, ...]
        if mode == "+":
            add, rem, add_kw, rem_kw = bits, 0, kws, ()
        elif mode == "-":
            add, rem, add_kw, rem_kw = 0, bits, (), kws
        else:
            low = {k.lower() for k in kws}
            add, rem = bits, ALL_FLAGS & ~bits
            add_kw, rem_kw = kws, tuple(k for k in mb.keywords if k.lower() not in low)
        change = None
        noop_modified: list[int] = []
        for attempt in range(_COMMIT_RETRIES):
            # RFC 7162 allows either, but a STORE that changes nothing writes nothing: no new
            # MODSEQ, hence no FETCH to other sessions for it
            change = None
            uids, noop = self._split_noop(self.mailbox(), live, add, rem, add_kw, rem_kw)
            if unchanged_since is not None:
                mbn = self.mailbox()
                noop_modified = [
                    u for u in noop if mbn.modseqs[mbn.position(u) or 0] > unchanged_since
                ]
            if not uids:
                break
            t = self.store.transaction()
            change = t.store_flags(
                self.guid,
                uids,
                add=add,
                remove=rem,
                add_keywords=add_kw,
                remove_keywords=rem_kw,
                unchanged_since=unchanged_since,
            )
            try:
                await t.commit_async()
                break
            except Conflict:
                if attempt == _COMMIT_RETRIES - 1:
                    raise MailboxError("INUSE", "Mailbox is busy, try again") from None
                await self.store.settle()
            except StoreError as e:
                raise _store_error(e) from None
        modified_uids = set(change.modified) if change is not None else set()
        modified_uids.update(noop_modified)  # RFC 7162 3.1.3: the condition fails all the same
        if change is not None and change.modseq:
            for u in change.uids:
                self._reported[u] = change.modseq
        mb = self.mailbox()
        fetches: list[FetchResult] = []
        changed = set(change.uids) if change is not None else set()
        for seq, u, _ in live:
            i = mb.position(u)
            if u in modified_uids or i is None:
                continue
            items: list[bytes] = [b"UID %d" % u] if uid_cmd else []
            if silent:
                # RFC 7162 3.1.3: with CONDSTORE the new MODSEQ is sent even for .SILENT
                if not (self.condstore and u in changed):
                    continue
            else:
                items.append(self._render_flags(mb, i, mb.flags[i], u))
            if self.condstore:
                items.append(b"MODSEQ (%d)" % mb.modseqs[i])
            fetches.append(FetchResult(seq, u, tuple(items)))
        if uid_cmd:
            modified = tuple(sorted(modified_uids))
        else:
            modified = tuple(seq for seq, u, _ in live if u in modified_uids)
        return StoreResult(tuple(fetches), modified)

    @staticmethod
    def _split_noop(
        mb: ix.Mailbox,
        live: Sequence[tuple[int, int, int]],
        add: int,
        rem: int,
        add_kw: Sequence[str],
        rem_kw: Sequence[str],
    ) -> tuple[list[int], list[int]]:
        """(UIDs a flag change would change, UIDs it would leave as they are), by the index as
        it is now (the same rule as the index's: add, then remove). Expunged ones are in
        neither."""
        akw = rkw = 0
        every = False
        for name in add_kw:
            b = mb.keyword_bit(name, create=False)
            every |= not b  # a keyword the mailbox does not have yet: no message has it
            akw |= b
        for name in rem_kw:
            rkw |= mb.keyword_bit(name, create=False)
        changing: list[int] = []
        noop: list[int] = []
        for _, u, _ in live:
            i = mb.position(u)
            if i is None:
                continue
            f, k = mb.flags[i], mb.kwbits[i]
            if every or (f | add) & ~rem & 0xFF != f or (k | akw) & ~rkw != k:
                changing.append(u)
            else:
                noop.append(u)
        return changing, noop

    # -- EXPUNGE, COPY, MOVE -------------------------------------------------------------------

    async def expunge(self, uids: Sequence[int] | None = None) -> int:
        """Remove the messages flagged \\Deleted (among ``uids`` if given) that the view knows.
        Returns how many; the EXPUNGE responses come from the next :meth:`sync`."""
        self._writable()
        mb = self.mailbox()
        if uids is not None:
            gone = []
            for u in sorted(set(uids)):
                i = mb.position(u)
                if i is not None and mb.flags[i] & ix.DELETED and self._index_of(u) is not None:
                    gone.append(u)
        else:
            known = self._known_set()
            gone = [
                u for u, f in zip(mb.uids, mb.flags, strict=True) if f & ix.DELETED and u in known
            ]
        if not gone:
            return 0
        t = self.store.transaction()
        t.expunge(self.guid, gone)
        await self.service._commit(t)
        return len(gone)

    async def copy(
        self, targets: Sequence[tuple[int, int]], dest_name: str, *, move: bool = False
    ) -> CopyResult:
        """COPY/MOVE into another mailbox of the account, keeping flags, keywords and
        INTERNALDATE; MOVE copies and expunges in one transaction. A missing target mailbox is
        ``NO [TRYCREATE]``."""
        if move:
            self._writable()
        try:
            dest = self.service.mailbox(self.address, dest_name)
        except MailboxError:
            raise MailboxError("TRYCREATE", "Mailbox does not exist") from None
        src = self.mailbox()
        live = self._live(targets)
        if not move or dest.account != src.account:
            size = sum(src.sizes[i] for _, _, i in live)
            self.service._check_quota(self.service.account(self.address), size)
        src_uids: list[int] = []
        dst_uids: list[int] = []
        uids = [u for _, u, _ in live]
        for k in range(0, len(uids), _BATCH):
            a, b = await self.service._copy_uids(src, uids[k : k + _BATCH], dest.guid, move=move)
            src_uids += a
            dst_uids += b
        return CopyResult(dest.uidvalidity, tuple(src_uids), tuple(dst_uids))

    # -- CONDSTORE / QRESYNC helpers -----------------------------------------------------------

    def vanished_since(
        self, modseq: int, ranges: Sequence[tuple[int | None, int | None]] | None = None
    ) -> tuple[int, ...]:
        """UIDs expunged after ``modseq`` (within the UID ranges if given)."""
        mb = self.mailbox()
        k = bisect.bisect_right(mb.vanished_modseqs, modseq)
        out = sorted(set(mb.vanished_uids[k:]))
        if ranges is not None:
            top = mb.uidnext - 1
            out = [
                u
                for u in out
                if any(min(a or top, b or top) <= u <= max(a or top, b or top) for a, b in ranges)
            ]
        return tuple(out)

    def changed_since(self, modseq: int) -> Iterable[FlagsChanged]:
        mb = self.mailbox()
        for seq, u in enumerate(self.uids, 1):
            i = mb.position(u)
            if i is not None and mb.modseqs[i] > modseq:
                fc = self._flags_changed(mb, i, seq)
                yield FlagsChanged(fc.seq, fc.uid, fc.flags, mb.modseqs[i])

    def message_index(self, uid: int) -> int | None:
        return self.mailbox().position(uid)
