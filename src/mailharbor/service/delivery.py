"""Local delivery: recipient resolution, the pre-commit filters and the delivery transaction.

Theory of operation
-------------------
Socket-free: :mod:`mailharbor.server.smtp` calls :meth:`LocalDelivery.check_sender` for MAIL FROM,
:meth:`LocalDelivery.resolve` for every RCPT TO and :meth:`LocalDelivery.deliver` once the message
is complete. Replies are :class:`~mailharbor.proto.smtp.Reply` values with fixed texts.

Recipient resolution (:meth:`LocalDelivery.resolve`), for an address ``local@domain``:

1. Syntax that an open relay could be tricked with is refused with ``501 5.1.3`` before anything
   else, whoever asks: a local part containing ``%`` (percent hack), ``!`` (bang path) or ``@``, a
   quoted local part, and a domain ending in ``.``. Source routes (``<@a,@b:u@d>``) are stripped
   by the engine (RFC 5321 4.1.1.3) and never followed. ``RCPT TO:<postmaster>`` (no domain) is
   the postmaster of the first local domain.
2. A domain that is not local (an IP literal ``[1.2.3.4]`` never is) is relaying: allowed only for
   an authenticated session (it goes to the outbound queue), else ``554 5.7.1 Relay access
   denied``. A failed AUTH leaves the session unauthenticated.
3. A local address is expanded: an alias (one-to-many) first, then an account, then
   plus-addressing (``user+tag@d`` is resolved as ``user@d``), then ``postmaster@d``, then the
   catch-all ``@d``. Alias targets are expanded recursively up to ``max_alias_depth`` levels; an
   address met twice on one path is not expanded again (loop detection) — if it is an account it
   is delivered to, otherwise it is dropped. A target in a non-local domain is a **forward**: it is
   queued outbound whatever the session (the administrator made the alias, so it is not an open
   relay). Nothing deliverable → ``550 5.1.1`` (``550 5.4.6`` when only loops were found).
4. ``postmaster@d`` without an alias or account of that name goes to ``postmaster`` (a configured
   address, itself resolved) or, when that is empty, to the oldest account of the store (the first
   one created: in practice the administrator's) — there is no admin flag on accounts yet.
5. Quota: an account whose logical usage already exceeds its quota, or would with the declared
   SIZE, gets ``452 4.2.2`` at RCPT; at the end of the message the real size is checked again.

On submission (:meth:`check_sender`), MAIL FROM must be the authenticated account, its
``+tag`` form, or the source of an alias whose targets include the account (``553 5.7.1``).

Delivery (:meth:`deliver`) runs the filters, then ONE store transaction: the body stored once with
``Return-Path:`` and ``Received:`` prepended (identical for every recipient: no ``for`` clause),
its MIME metadata, one delivery record for all local INBOXes, and for remote recipients a queue
entry whose body has the ``Received:`` header but no ``Return-Path:`` (RFC 5321 4.4: only the
final delivery adds it). Bare LF in the body is stored as CRLF. The replies (250) are returned only
after the commit returned, i.e. after the durability barrier: acknowledged means durable.
The ``250`` names the node and, in a cluster, the term of the witness lease (two-node mode: the
replication generation) it is sent under: ``250 2.0.0 Ok: queued as QID (node n1 term 7)``; a
node without a cluster manager says ``(node n1)``. The text is made after the commit returned
(the cluster's ack gate is part of the barrier), so the term is the one the gate passed under.

NOTIFY=SUCCESS (RFC 3461) of a local recipient: a success report (``delivered``, or ``expanded``
for an alias with several targets, whose forwarded copies are queued without SUCCESS) goes to the
sender in the same transaction (its INBOX if local, else queued from ``<>``); never to ``<>``.
Relayed recipients are reported by the queue runner (``relayed``).

Large messages (:class:`MessageSpool`): the SMTP session holds a message in memory only up to
``smtp.stream_threshold``; past it (and only when no filter is configured, since a filter sees
the whole message) the session opens a spool and the body is streamed into the store
transaction's blob writers as it arrives, so memory stays bounded by the store's chunk size.
The ``Received:`` header of a streamed message is made when the spool opens (its date is then
"data started arriving", which is what Postfix writes too). A streamed message gets **no
MIME_META record** at delivery: parsing needs the whole message in memory, which is what
streaming avoids; the mailbox service parses such a body on its first structured access and
persists the record then (:meth:`mailharbor.service.mailbox.MailboxService.meta`). Quota, the
replies and the mail log line are as for a small message (the Message-ID comes from the first
64 KiB).

Invariants
----------
- Nothing is written unless the whole transaction commits; a failed commit gives ``451 4.3.0``
  to every recipient and writes nothing visible.
- One mail log line per received transaction (:mod:`mailharbor.service.maillog`).
- Reply texts are fixed strings or addresses; exception text never goes into a reply.
"""

from __future__ import annotations

import enum
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from typing import Protocol

from mailharbor.proto.smtp import MailParams, RcptParams, Reply
from mailharbor.service import maillog
from mailharbor.service.dsn import DsnRecipient, build_dsn
from mailharbor.service.mime import META_VERSION, encode_meta, parse_message
from mailharbor.service.queue import QueueParams, add_report
from mailharbor.store import BlobWriter, Store, StoreError, Transaction, WritesFrozen

__all__ = [
    "Envelope",
    "FilterAction",
    "FilterVerdict",
    "LocalDelivery",
    "MessageFilter",
    "MessageSpool",
    "Recipient",
    "Session",
    "new_queue_id",
    "normalize_crlf",
]

log = logging.getLogger("mailharbor.delivery")

R_OK = Reply(250, "2.1.5", "Ok")
R_SENDER_OK = Reply(250, "2.1.0", "Ok")
R_UNKNOWN = Reply(550, "5.1.1", "Recipient address rejected: user unknown")
R_LOOP = Reply(550, "5.4.6", "Recipient address rejected: alias loop")
R_BAD_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
R_RELAY = Reply(554, "5.7.1", "Relay access denied")
R_QUOTA = Reply(452, "4.2.2", "Mailbox full")
R_NOT_OWNED = Reply(553, "5.7.1", "Sender address rejected: not owned by user")
R_TEMP = Reply(451, "4.3.0", "Error: queue file write error")
R_FROZEN = Reply(451, "4.3.0", "Error: writes suspended (replication peer lost), try again later")
#: Placeholder for an accepted recipient until the commit returned (see ``queued_reply``).
R_QUEUED = Reply(250, "2.0.0", "Ok: queued")


def _store_reply(e: StoreError | None) -> Reply:
    """The temporary failure for a store error: specific when writes are frozen by fencing."""
    return R_FROZEN if isinstance(e, WritesFrozen) else R_TEMP


def new_queue_id() -> str:
    """A fresh queue id: 16 upper-case hex digits (in ``Received:`` and the mail log)."""
    return secrets.token_hex(8).upper()


def normalize_crlf(data: bytes) -> bytes:
    """Every line end as CRLF: a bare LF becomes CRLF, existing CRLFs are kept."""
    if data.count(b"\n") == data.count(b"\r\n"):  # no bare LF (what the SMTP engine yields)
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@dataclass(frozen=True)
class Session:
    """What delivery needs to know about the SMTP/LMTP session.

    ``protocol`` is the ``with`` word of ``Received:`` (SMTP, ESMTP, ESMTPS, ESMTPSA, LMTP…);
    ``authenticated`` the canonical account after a successful AUTH; ``submission``: the session
    came in on a submission port (MAIL FROM must be owned)."""

    client_ip: str
    helo: str = ""
    protocol: str = "ESMTP"
    authenticated: str | None = None
    submission: bool = False
    client_host: str = ""


@dataclass(frozen=True)
class Recipient:
    """One accepted RCPT: the address as given and what it resolved to."""

    address: str
    mailboxes: tuple[bytes, ...] = ()  # INBOX GUIDs
    accounts: tuple[bytes, ...] = ()  # account GUIDs (quota)
    remote: tuple[str, ...] = ()  # outbound addresses (relay or forward)
    params: RcptParams = field(default_factory=RcptParams)


@dataclass(frozen=True)
class Envelope:
    """A complete transaction as the filters see it."""

    queue_id: str
    session: Session
    sender: str
    recipients: tuple[Recipient, ...]
    params: MailParams = field(default_factory=MailParams)


class FilterAction(enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"


@dataclass(frozen=True)
class FilterVerdict:
    """A filter's answer: accept (optionally adding header fields above the body), reject or
    tempfail with ``reply`` (a 5xx/4xx). ``add_headers`` are ``(name, value)`` pairs."""

    action: FilterAction = FilterAction.ACCEPT
    reply: Reply | None = None
    add_headers: tuple[tuple[str, str], ...] = ()


class MessageFilter(Protocol):
    """A pre-commit filter (spam, virus…). None is configured by default. ``check`` must not
    raise; if it does, the message gets ``451 4.3.0`` (fail closed, the sender retries)."""

    async def check(self, envelope: Envelope, message: bytes) -> FilterVerdict: ...


class _Expansion:
    def __init__(self) -> None:
        self.mailboxes: dict[bytes, bytes] = {}  # inbox guid -> account guid
        self.remote: dict[str, None] = {}
        self.loop = False


class MessageSpool:
    """A message streamed into one store transaction while it arrives (large messages).

        Opened by :meth:`LocalDelivery.open_spool` at the point the session decides the message is
        too large to hold (recipients are known by then). The body is written, with line ends made
        CRLF, to a :meth:`~mailharbor.store.Transaction.blob_writer` for the local copy (after
        ``Return-Path:`` and ``Received:``) and one for the queued copy (after ``Received:``), as
        needed by the recipients; the writers append chunk records to the log, so memory holds at
        most one chunk per writer plus what was appended since the last :meth:`flush` (the session
    flushes every ``FLUSH_BYTES``). Nothing is visible until :meth:`LocalDelivery.deliver` commits
        the transaction; :meth:`abort` (RSET, a new MAIL, a dropped connection) leaves only orphan
        chunks, which compaction reclaims. A store error while streaming makes the spool
        ``failed``: the rest is discarded and the message gets ``451 4.3.0`` at its end.
    """

    HEAD_BYTES = 65536  # kept for the mail log's Message-ID
    FLUSH_BYTES = 1024 * 1024  # see needs_flush

    def __init__(self, delivery: LocalDelivery, envelope: Envelope) -> None:
        self.started = time.monotonic()
        self._store = delivery.store
        self._unflushed = 0
        self.size = 0  # body bytes after CRLF repair
        self.head = bytearray()
        self.failed = False
        self.error: StoreError | None = None  # the store error that failed the spool
        self._carry = b""
        self._local: BlobWriter | None = None
        self._queued: BlobWriter | None = None
        received = delivery.trace_headers(envelope)
        return_path = f"Return-Path: <{_header_value(envelope.sender)}>\r\n".encode("ascii")
        self._prefix = len(return_path) + len(received)
        self.txn: Transaction | None = None
        try:
            self.txn = delivery.store.transaction()
            if any(r.mailboxes for r in envelope.recipients):
                self._local = self.txn.blob_writer()
                self._local.write(return_path + received)
            if any(r.remote for r in envelope.recipients):
                self._queued = self.txn.blob_writer()
                self._queued.write(received)
        except StoreError as e:
            log.error("cannot stream message %s into the store: %s", envelope.queue_id, e)
            self.abort()
            self.failed = True
            self.error = e

    @property
    def local_size(self) -> int:
        """Size of the local copy (with Return-Path and Received), for quota."""
        return self._prefix + self.size + len(self._carry)

    def write(self, data: bytes) -> None:
        if self.failed or not data:
            return
        data = self._carry + data
        self._carry = b""
        if data.endswith(b"\r"):  # its LF may come with the next piece
            self._carry = b"\r"
            data = data[:-1]
        self._put(normalize_crlf(data))

    @property
    def needs_flush(self) -> bool:
        """Enough was written that the caller should ``await flush()``: appended chunk frames
        keep their payload in memory until they are durable and applied."""
        return self._unflushed >= self.FLUSH_BYTES and not self.failed

    async def flush(self) -> None:
        self._unflushed = 0
        try:
            await self._store.flush_appended()
        except StoreError as e:
            log.error("streaming a message into the store failed: %s", e)
            self.abort()
            self.failed = True
            self.error = e

    def _put(self, data: bytes) -> None:
        self.size += len(data)
        self._unflushed += len(data)
        if len(self.head) < self.HEAD_BYTES:
            self.head += data[: self.HEAD_BYTES - len(self.head)]
        try:
            if self._local is not None:
                self._local.write(data)
            if self._queued is not None:
                self._queued.write(data)
        except StoreError as e:
            log.error("streaming a message into the store failed: %s", e)
            self.abort()
            self.failed = True
            self.error = e

    def finish(self) -> tuple[bytes | None, bytes | None]:
        """The hashes of the local and the queued copy (None where not written)."""
        if self._carry:
            self._put(self._carry)
            self._carry = b""
        if self.failed:
            raise StoreError("the message could not be streamed into the store")
        local = self._local.finish() if self._local is not None else None
        queued = self._queued.finish() if self._queued is not None else None
        return local, queued

    def abort(self) -> None:
        """Drop the message (idempotent); its chunks become orphans."""
        if self.txn is not None:
            self.txn.abort()
            self.txn = None
        self._local = self._queued = None


def _forward_params(r: Recipient) -> RcptParams:
    """The DSN parameters a remote copy of ``r`` is queued with: as given, except that an
    expansion to several targets (an alias) drops SUCCESS (reported here as ``expanded``;
    RFC 3461 6.2.7.3), leaving NEVER if nothing else was asked for."""
    notify = r.params.notify
    if not notify or "SUCCESS" not in notify or len(r.mailboxes) + len(r.remote) <= 1:
        return r.params
    return replace(r.params, notify=(notify - {"SUCCESS"}) or frozenset({"NEVER"}))


def _header_value(text: str) -> str:
    if text.isascii() and text.isprintable():
        return text
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)


_date_cache: tuple[int, str] = (-1, "")


def _rfc5322_date(now: float) -> str:
    """``formatdate(now)``, computed once per second."""
    global _date_cache
    sec = int(now)
    if _date_cache[0] != sec:
        _date_cache = (sec, formatdate(sec, localtime=False))
    return _date_cache[1]


class LocalDelivery:
    """Recipient resolution and delivery over one store; see the module docstring."""

    def __init__(
        self,
        store: Store,
        hostname: str,
        *,
        postmaster: str = "",
        filters: Sequence[MessageFilter] = (),
        max_alias_depth: int = 10,
        node_name: str = "",
        term: Callable[[], int] | None = None,
    ) -> None:
        self.store = store
        self.hostname = hostname
        self.postmaster = postmaster.lower()
        self.filters = tuple(filters)
        self.max_alias_depth = max_alias_depth
        #: ``node_name`` and ``term`` make the ``250`` after DATA name the node (and the term
        #: of the lease it acknowledges under; read when the reply is made, after the commit).
        self.node_name = node_name
        self.term = term
        self._node_note = f" (node {node_name})" if node_name else ""
        self._term_note = f" (node {node_name} term " if node_name else " (term "

    def queued_reply(self, queue_id: str) -> Reply:
        """The ``250`` for a committed message: ``Ok: queued as QID (node NAME term T)``;
        without a term source ``(node NAME)``, without a node name just ``Ok: queued as QID``.
        Called after the durability barrier (and the cluster's ack gate) released the
        transaction, so ``T`` is the term under which this acknowledgement goes out."""
        if self.term is not None:
            return Reply(250, "2.0.0", f"Ok: queued as {queue_id}{self._term_note}{self.term()})")
        return Reply(250, "2.0.0", f"Ok: queued as {queue_id}{self._node_note}")

    # -- MAIL FROM -------------------------------------------------------------------------

    def check_sender(self, session: Session, address: str) -> Reply:
        """Answer MAIL FROM. On submission the address must belong to the account."""
        if not session.submission:
            return R_SENDER_OK
        account = session.authenticated
        if account is None:
            return Reply(530, "5.7.0", "Authentication required")
        if self._owns(account, address.lower()):
            return R_SENDER_OK
        return R_NOT_OWNED

    def _owns(self, account: str, address: str) -> bool:
        if address == account:
            return True
        local, _, domain = address.rpartition("@")
        if "+" in local and f"{local.split('+', 1)[0]}@{domain}" == account:
            return True
        return account in self.store.index.aliases.get(address, ())

    # -- RCPT TO ---------------------------------------------------------------------------

    def resolve(
        self,
        session: Session,
        address: str,
        *,
        size: int = 0,
        params: RcptParams | None = None,
    ) -> Recipient | Reply:
        """Resolve one RCPT TO: a :class:`Recipient` to accept, or the refusal."""
        rp = params or RcptParams()
        index = self.store.index
        if "@" not in address:
            if address.lower() != "postmaster" or not index.domains:
                return R_BAD_SYNTAX
            address = "postmaster@" + min(index.domains)
        local, _, domain = address.rpartition("@")
        if (
            not local
            or local.startswith('"')
            or any(c in local for c in "%!@")
            or domain.endswith(".")
            or not domain
        ):
            return R_BAD_SYNTAX
        domain = domain.lower()
        addr = f"{local.lower()}@{domain}"
        if domain not in index.domains:
            if session.authenticated is None:
                return R_RELAY
            return Recipient(address, remote=(address,), params=rp)
        exp = _Expansion()
        self._expand(addr, 0, set(), exp)
        if not exp.mailboxes and not exp.remote:
            return R_LOOP if exp.loop else R_UNKNOWN
        accounts = tuple(dict.fromkeys(exp.mailboxes.values()))
        if self._over_quota(accounts, size):
            return R_QUOTA
        return Recipient(
            address,
            mailboxes=tuple(exp.mailboxes),
            accounts=accounts,
            remote=tuple(exp.remote),
            params=rp,
        )

    def _expand(self, addr: str, depth: int, path: set[str], exp: _Expansion) -> None:
        index = self.store.index
        local, _, domain = addr.rpartition("@")
        if domain not in index.domains:
            exp.remote[addr] = None
            return
        account = index.account_by_address(addr)
        if addr in path or depth > self.max_alias_depth:
            if account is not None:
                self._add_account(account.guid, exp)
            else:
                exp.loop = True
                log.warning("alias loop or too deep at %s", addr)
            return
        targets = index.aliases.get(addr)
        if targets is not None:
            for t in targets:
                self._expand(t, depth + 1, path | {addr}, exp)
            return
        if account is not None:
            self._add_account(account.guid, exp)
            return
        if "+" in local:
            self._expand(f"{local.split('+', 1)[0]}@{domain}", depth + 1, path | {addr}, exp)
            return
        if local == "postmaster":
            target = self.postmaster
            if target and target != addr:
                self._expand(target, depth + 1, path | {addr}, exp)
            elif index.accounts:
                self._add_account(next(iter(index.accounts)), exp)
            return
        catch_all = index.aliases.get("@" + domain)
        if catch_all is not None:
            for t in catch_all:
                self._expand(t, depth + 1, path | {addr}, exp)

    def _add_account(self, guid: bytes, exp: _Expansion) -> None:
        acct = self.store.index.accounts.get(guid)
        if acct is None:
            return
        inbox = acct.mailboxes.get("INBOX")
        if inbox is None:
            log.warning("account %s has no INBOX; not delivered", acct.address)
            return
        exp.mailboxes[inbox] = guid

    def _over_quota(self, accounts: Sequence[bytes], size: int) -> bool:
        index = self.store.index
        for g in accounts:
            acct = index.accounts.get(g)
            if acct is None or acct.quota_bytes <= 0:
                continue
            used, _ = index.account_usage(g)
            if used + size > acct.quota_bytes or (size == 0 and used >= acct.quota_bytes):
                return True
        return False

    # -- the message -----------------------------------------------------------------------

    def trace_headers(self, envelope: Envelope, *, now: float | None = None) -> bytes:
        """The ``Received:`` header (identical for every recipient of the transaction)."""
        s = envelope.session
        helo = _header_value(s.helo or "unknown")
        host = _header_value(s.client_host or "unknown")
        ip = _header_value(s.client_ip)
        date = _rfc5322_date(now if now is not None else time.time())
        return (
            f"Received: from {helo} ({host} [{ip}])\r\n"
            f"\tby {_header_value(self.hostname)} with {s.protocol} id {envelope.queue_id};\r\n"
            f"\t{date}\r\n"
        ).encode("ascii")

    @property
    def can_stream(self) -> bool:
        """Messages may be streamed into the store (:meth:`open_spool`): no filter is configured
        (a filter sees the whole message and may add header fields above it)."""
        return not self.filters

    def open_spool(self, envelope: Envelope) -> MessageSpool:
        """Start streaming a large message of ``envelope`` into a store transaction; finish it
        with :meth:`deliver` (``spool=``) or :meth:`MessageSpool.abort`."""
        return MessageSpool(self, envelope)

    async def deliver(
        self,
        envelope: Envelope,
        message: bytes,
        *,
        per_recipient: bool = False,
        spool: MessageSpool | None = None,
    ) -> list[Reply]:
        """Filter and commit the message; one reply per recipient, in order. The 250s come
        back only after the store transaction is durable.

        ``per_recipient`` (LMTP): a recipient over quota gets its own ``452`` and the others are
        delivered. Without it (SMTP, one reply for all) any recipient over quota makes the whole
        message ``452`` and nothing is written, so the sender's retry causes no duplicates.

        ``spool``: the start of the message was streamed into it; ``message`` is the rest."""
        if spool is not None:
            spool.write(message)
            return await self._deliver_spooled(envelope, spool, per_recipient)
        n = len(envelope.recipients)
        body = normalize_crlf(message)
        started = time.monotonic()
        extra = b""
        for f in self.filters:
            try:
                verdict = await f.check(envelope, body)
            except Exception:
                log.exception("message filter %r failed (queue id %s)", f, envelope.queue_id)
                return self._finish(envelope, body, [R_TEMP] * n, "filter error", started)
            if verdict.action is not FilterAction.ACCEPT:
                default = (
                    R_TEMP
                    if verdict.action is FilterAction.TEMPFAIL
                    else Reply(550, "5.7.1", "Message rejected")
                )
                reply = verdict.reply or default
                return self._finish(envelope, body, [reply] * n, "filtered", started)
            for name, value in verdict.add_headers:
                extra += f"{_header_value(name)}: {_header_value(value)}\r\n".encode("ascii")
        received = self.trace_headers(envelope)
        return_path = f"Return-Path: <{_header_value(envelope.sender)}>\r\n".encode("ascii")
        local_blob = return_path + received + extra + body
        replies: list[Reply] = []
        mailboxes: dict[bytes, None] = {}
        remote: dict[str, RcptParams] = {}
        for r in envelope.recipients:
            if r.accounts and self._over_quota(r.accounts, len(local_blob)):
                replies.append(R_QUOTA)
                continue
            replies.append(R_QUEUED)  # made by queued_reply() once committed
            for m in r.mailboxes:
                mailboxes[m] = None
            for a in r.remote:
                remote.setdefault(a, _forward_params(r))
        if not per_recipient and any(not r.positive for r in replies):
            return self._finish(envelope, body, [R_QUOTA] * n, "over quota", started)
        if not mailboxes and not remote:
            return self._finish(
                envelope, body, self._queued(envelope, replies), "rejected", started
            )
        try:
            async with self.store.transaction() as t:
                if mailboxes:
                    h = t.put_blob(local_blob)
                    meta = parse_message(local_blob)
                    t.put_mime_meta(h, META_VERSION, encode_meta(meta))
                    t.deliver(h, list(mailboxes))
                if remote:
                    qh = t.put_blob(received + extra + body)
                    t.queue_add(
                        qh, envelope.sender, list(remote), self._queue_params(envelope, remote)
                    )
                self._success_report(t, envelope, replies, received + extra + body)
        except StoreError as e:
            log.error("delivery of %s failed: %s", envelope.queue_id, e)
            return self._finish(envelope, body, [_store_reply(e)] * n, "store error", started)
        except Exception:
            log.exception("delivery of %s failed", envelope.queue_id)
            return self._finish(envelope, body, [R_TEMP] * n, "internal error", started)
        return self._finish(envelope, body, self._queued(envelope, replies), "", started)

    async def _deliver_spooled(
        self, envelope: Envelope, spool: MessageSpool, per_recipient: bool
    ) -> list[Reply]:
        """:meth:`deliver` for a streamed message: no filters, no MIME_META record (see the
        module docstring); the spool's transaction is committed or aborted here."""
        n = len(envelope.recipients)
        started = spool.started
        head = bytes(spool.head)
        replies: list[Reply] = []
        mailboxes: dict[bytes, None] = {}
        remote: dict[str, RcptParams] = {}
        for r in envelope.recipients:
            if r.accounts and self._over_quota(r.accounts, spool.local_size):
                replies.append(R_QUOTA)
                continue
            replies.append(R_QUEUED)  # made by queued_reply() once committed
            for m in r.mailboxes:
                mailboxes[m] = None
            for a in r.remote:
                remote.setdefault(a, _forward_params(r))
        size = spool.size
        if spool.failed:
            spool.abort()
            reply = _store_reply(spool.error)
            return self._finish(envelope, head, [reply] * n, "store error", started, size=size)
        if not per_recipient and any(not r.positive for r in replies):
            spool.abort()
            return self._finish(envelope, head, [R_QUOTA] * n, "over quota", started, size=size)
        if not mailboxes and not remote:
            spool.abort()
            replies = self._queued(envelope, replies)
            return self._finish(envelope, head, replies, "rejected", started, size=size)
        try:
            local, queued = spool.finish()
            t = spool.txn
            assert t is not None
            if mailboxes:
                assert local is not None
                t.deliver(local, list(mailboxes))
            if remote:
                assert queued is not None
                t.queue_add(
                    queued, envelope.sender, list(remote), self._queue_params(envelope, remote)
                )
            self._success_report(t, envelope, replies, head)
            await t.commit_async()
            spool.txn = None
        except StoreError as e:
            spool.abort()
            log.error("delivery of %s failed: %s", envelope.queue_id, e)
            reply = _store_reply(e)
            return self._finish(envelope, head, [reply] * n, "store error", started, size=size)
        except Exception:
            spool.abort()
            log.exception("delivery of %s failed", envelope.queue_id)
            return self._finish(envelope, head, [R_TEMP] * n, "internal error", started, size=size)
        return self._finish(envelope, head, self._queued(envelope, replies), "", started, size=size)

    def _queued(self, envelope: Envelope, replies: list[Reply]) -> list[Reply]:
        """``replies`` with every :data:`R_QUEUED` placeholder replaced by the final ``250``
        (:meth:`queued_reply`, made now: after the commit returned)."""
        ok = self.queued_reply(envelope.queue_id)
        return [ok if r is R_QUEUED else r for r in replies]

    def _success_report(
        self, t: Transaction, envelope: Envelope, replies: list[Reply], original: bytes
    ) -> None:
        """NOTIFY=SUCCESS of local recipients (RFC 3461): one report, in the delivery's
        transaction, ``delivered`` (one mailbox) or ``expanded`` (an alias with several
        targets, whose forwarded copies lose SUCCESS: see ``_forward_params``). Remote-only
        recipients are reported by the queue runner (``relayed``). Never to the null sender."""
        if not envelope.sender:
            return
        done: list[DsnRecipient] = []
        for r, reply in zip(envelope.recipients, replies, strict=True):
            notify = r.params.notify
            if not reply.positive or not r.mailboxes or not notify or "SUCCESS" not in notify:
                continue
            expanded = len(r.mailboxes) + len(r.remote) > 1
            done.append(
                DsnRecipient(
                    address=r.address,
                    action="expanded" if expanded else "delivered",
                    status="2.0.0",
                    diagnostic=f"250 2.0.0 delivered by {self.hostname}",
                    original_recipient=f"{r.params.orcpt[0]};{r.params.orcpt[1]}"
                    if r.params.orcpt
                    else "",
                )
            )
        if not done:
            return
        dsn = build_dsn(
            reporting_mta=self.hostname,
            original_sender=envelope.sender,
            recipients=done,
            original=original,
            arrival_ms=int(time.time() * 1000),
            now_ms=int(time.time() * 1000),
            envid=envelope.params.envid,
            token=os.urandom(12).hex(),
        )
        where = add_report(self.store, t, envelope.sender, dsn)
        log.info("%s: success report %s <%s>", envelope.queue_id, where, envelope.sender)

    @staticmethod
    def _queue_params(envelope: Envelope, remote: dict[str, RcptParams]) -> str:
        p = envelope.params
        notify = {a: tuple(sorted(rp.notify)) for a, rp in remote.items() if rp.notify}
        orcpt = {a: f"{rp.orcpt[0]};{rp.orcpt[1]}" for a, rp in remote.items() if rp.orcpt}
        return QueueParams(
            envid=p.envid,
            ret=p.ret,
            body=p.body,
            smtputf8=p.smtputf8,
            notify=notify,
            orcpt=orcpt,
        ).encode()

    def _finish(
        self,
        envelope: Envelope,
        body: bytes,
        replies: list[Reply],
        why: str,
        started: float,
        *,
        size: int | None = None,
    ) -> list[Reply]:
        """Log the transaction; ``body`` is the message, or (streamed) its first part, with
        ``size`` the whole length."""
        results = []
        for r, reply in zip(envelope.recipients, replies, strict=True):
            results.append((r.address, f"{reply.code} {reply.enhanced}".strip()))
        maillog.received(
            queue_id=envelope.queue_id,
            message_id=maillog.message_id_of(body),
            client=envelope.session.client_ip,
            protocol=envelope.session.protocol,
            sender=envelope.sender,
            size=len(body) if size is None else size,
            results=results,
            note=why,
            seconds=time.monotonic() - started,
        )
        return replies
