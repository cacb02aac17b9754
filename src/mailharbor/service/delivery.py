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
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Protocol

from mailharbor.proto.smtp import MailParams, RcptParams, Reply
from mailharbor.service import maillog
from mailharbor.service.mime import META_VERSION, encode_meta, parse_message
from mailharbor.service.queue import QueueParams
from mailharbor.store import Store, StoreError

__all__ = [
    "Envelope",
    "FilterAction",
    "FilterVerdict",
    "LocalDelivery",
    "MessageFilter",
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


def new_queue_id() -> str:
    """A fresh queue id: 16 upper-case hex digits (in ``Received:`` and the mail log)."""
    return secrets.token_hex(8).upper()


def normalize_crlf(data: bytes) -> bytes:
    """Every line end as CRLF: a bare LF becomes CRLF, existing CRLFs are kept."""
    if b"\n" not in data:
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


def _header_value(text: str) -> str:
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)


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
    ) -> None:
        self.store = store
        self.hostname = hostname
        self.postmaster = postmaster.lower()
        self.filters = tuple(filters)
        self.max_alias_depth = max_alias_depth

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
        date = formatdate(now if now is not None else time.time(), localtime=False)
        return (
            f"Received: from {helo} ({host} [{ip}])\r\n"
            f"\tby {_header_value(self.hostname)} with {s.protocol} id {envelope.queue_id};\r\n"
            f"\t{date}\r\n"
        ).encode("ascii")

    async def deliver(
        self, envelope: Envelope, message: bytes, *, per_recipient: bool = False
    ) -> list[Reply]:
        """Filter and commit the message; one reply per recipient, in order. The 250s come
        back only after the store transaction is durable.

        ``per_recipient`` (LMTP): a recipient over quota gets its own ``452`` and the others are
        delivered. Without it (SMTP, one reply for all) any recipient over quota makes the whole
        message ``452`` and nothing is written, so the sender's retry causes no duplicates."""
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
            replies.append(Reply(250, "2.0.0", f"Ok: queued as {envelope.queue_id}"))
            for m in r.mailboxes:
                mailboxes[m] = None
            for a in r.remote:
                remote.setdefault(a, r.params)
        if not per_recipient and any(not r.positive for r in replies):
            return self._finish(envelope, body, [R_QUOTA] * n, "over quota", started)
        if not mailboxes and not remote:
            return self._finish(envelope, body, replies, "rejected", started)
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
        except StoreError as e:
            log.error("delivery of %s failed: %s", envelope.queue_id, e)
            return self._finish(envelope, body, [R_TEMP] * n, "store error", started)
        except Exception:
            log.exception("delivery of %s failed", envelope.queue_id)
            return self._finish(envelope, body, [R_TEMP] * n, "internal error", started)
        return self._finish(envelope, body, replies, "", started)

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
    ) -> list[Reply]:
        results = []
        for r, reply in zip(envelope.recipients, replies, strict=True):
            results.append((r.address, f"{reply.code} {reply.enhanced}".strip()))
        maillog.received(
            queue_id=envelope.queue_id,
            message_id=maillog.message_id_of(body),
            client=envelope.session.client_ip,
            protocol=envelope.session.protocol,
            sender=envelope.sender,
            size=len(body),
            results=results,
            note=why,
            seconds=time.monotonic() - started,
        )
        return replies
