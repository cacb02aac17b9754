"""The outbound queue runner: at-least-once SMTP delivery of the store's queue entries.

Theory of operation
-------------------
The queue lives in the store (``store.index.queue``: guid → QueueEntry). The runner is one
asyncio task that, whenever it is woken (a commit that adds an entry or gives one a new
``next_ms`` — a new entry, an admin ``retry`` — or the earliest ``next_ms`` arriving), scans
for **due** entries (``next_ms <= now``, not already being attempted) and starts one
*attempt* per entry, within ``max_concurrent`` attempts in flight.

One attempt of one entry:

1. ``lease_ok()`` is checked; if the lease is not held, nothing is done (no record written).
2. If the entry is older than ``maximal_lifetime``, every recipient is EXPIRED and a DSN is
   made (step 5) without contacting anyone.
3. A ``queue_attempt(entry, term, recipients)`` record is committed (durable) **before** any
   connection is made: from then on the recipients are *in flight*.
4. Recipients are grouped per destination domain; each group is routed
   (:mod:`mailharbor.service.mx`) and delivered by the :class:`Deliverer` — at most
   ``max_per_domain`` connections per domain at once. The SMTP deliverer checks ``lease_ok()``
   again just before it sends the final "." of DATA; without the lease it drops the connection
   before the ".", so the remote server discards the message (RFC 5321 §4.1.1.4), and the
   recipients are deferred.
5. One transaction records the outcome per recipient — ``queue_done`` DELIVERED, BOUNCED (a
   5xx or a permanent routing failure), DEFERRED (with ``next_ms`` from the backoff) or
   EXPIRED — together with the bounce (a DSN from :mod:`mailharbor.service.dsn`): delivered to
   the sender's INBOX if the sender is a local account, else queued from ``<>``. A failure of a
   message from ``<>`` is only logged (a bounce is never bounced).

Backoff (Postfix's defaults): after attempt *n* the entry waits
``min(minimal_backoff * 2**(n-1), maximal_backoff)``; an entry that is still queued after
``maximal_lifetime`` expires at its next due time.

Invariants
----------
- **At-least-once**, limited to attempts in flight: nothing is sent for an entry unless its
  ``queue_attempt`` record (with the term) is durable; a recipient leaves the queue only by a
  durable ``queue_done``. An attempt abandoned at stop or by a crash leaves its recipients in
  ``in_flight`` with ``next_ms`` unchanged, so they are due again at the next start (the remote
  may receive the message twice; never zero times).
- ``lease_ok()`` is checked before each attempt and before each final "."; with a false lease
  no new attempt is logged and no DATA is completed.
- At most one attempt per entry at a time; at most ``max_concurrent`` attempts and
  ``max_per_domain`` connections per destination domain.
- A DSN is never produced for a message whose sender is ``<>``, nor for a recipient whose
  NOTIFY excludes its kind (FAILURE, DELAY, SUCCESS; NEVER excludes all). Without NOTIFY a
  recipient gets failure and delay reports (RFC 3461 4.1 leaves DELAY to the MTA), never a
  success report.

Reports other than bounces (RFC 3464), each its own message, made in the transaction that
records the outcome:

- **Delay warning** (``action: delayed``), once per entry: at the first attempt that starts
  ``queue.delay_warning`` or more after the entry was queued (``"0s"`` turns it off), for the
  recipients that attempt defers. "Once" is durable: the DEFERRED records written with (and
  after) the warning carry the WARNED flag (``queue_done(..., warned=True)``), which sets the
  index's ``QueueEntry.warned``; nothing clears it (it is kept in checkpoints), so neither a
  restart nor ``queue retry`` warns again. The detail text is never altered.
- **Success** (``action: relayed``) for a recipient with NOTIFY=SUCCESS whose remote server
  accepted the message but does not offer DSN (a remote that offers it got NOTIFY passed on and
  reports itself). Local deliveries with NOTIFY=SUCCESS are reported by
  :mod:`mailharbor.service.delivery` (``delivered``/``expanded``) through :func:`add_report`.
- Time comes from the injected :class:`Clock`; :meth:`QueueRunner.run_due` is the whole
  scheduling step, so tests drive it in virtual time.
- :meth:`QueueRunner.stop` returns after every attempt either finished or was cancelled; the
  store is never written after ``stop`` returned.

``QueueEntry.params`` is the JSON text of :class:`QueueParams` (the inbound SMTP service writes
it with :meth:`QueueParams.encode`); an unreadable value means "no parameters".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import aiosmtplib

from mailharbor.config import QueueConfig
from mailharbor.service.dsn import DsnRecipient, build_dsn
from mailharbor.service.mx import Hop, Route, RouteError, Router
from mailharbor.store import Store, StoreError, Transaction
from mailharbor.store.format import QueueResult
from mailharbor.store.index import QueueEntry

__all__ = [
    "Clock",
    "Deliverer",
    "Outcome",
    "OutcomeKind",
    "QueueParams",
    "QueueRunner",
    "SmtpDeliverer",
    "SystemClock",
    "add_report",
    "backoff_ms",
    "router_from_config",
]

log = logging.getLogger("mailharbor.queue")


# --- time ---------------------------------------------------------------------------------------


class Clock(Protocol):
    """Wall-clock milliseconds (queue times are wall-clock, as the store's ``created_ms``)."""

    def now_ms(self) -> int: ...


class SystemClock:
    def now_ms(self) -> int:
        return int(time.time() * 1000)


def backoff_ms(attempts: int, minimal_ms: int, maximal_ms: int) -> int:
    """Delay after the ``attempts``-th attempt: minimal, doubling, capped at maximal."""
    n = max(attempts, 1) - 1
    if n >= 62:
        return maximal_ms
    return min(minimal_ms * (1 << n), maximal_ms)


# --- parameters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueParams:
    """ESMTP parameters kept with a queue entry (RFC 1652/6531/3461)."""

    envid: str | None = None
    ret: str | None = None  # "FULL" / "HDRS"
    body: str | None = None  # "7BIT" / "8BITMIME"
    smtputf8: bool = False
    notify: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # rcpt → NOTIFY values
    orcpt: Mapping[str, str] = field(default_factory=dict)  # rcpt → "rfc822;addr"

    def encode(self) -> str:
        d: dict[str, object] = {}
        if self.envid is not None:
            d["envid"] = self.envid
        if self.ret is not None:
            d["ret"] = self.ret
        if self.body is not None:
            d["body"] = self.body
        if self.smtputf8:
            d["smtputf8"] = True
        if self.notify:
            d["notify"] = {k: list(v) for k, v in self.notify.items()}
        if self.orcpt:
            d["orcpt"] = dict(self.orcpt)
        return json.dumps(d, separators=(",", ":"), sort_keys=True) if d else ""

    @classmethod
    def decode(cls, text: str) -> QueueParams:
        if not text:
            return cls()
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise ValueError("not an object")
            notify = {
                str(k): tuple(str(x).upper() for x in v) for k, v in d.get("notify", {}).items()
            }
            orcpt = {str(k): str(v) for k, v in d.get("orcpt", {}).items()}
            return cls(
                envid=_opt_str(d.get("envid")),
                ret=_opt_str(d.get("ret")),
                body=_opt_str(d.get("body")),
                smtputf8=bool(d.get("smtputf8", False)),
                notify=notify,
                orcpt=orcpt,
            )
        except (ValueError, TypeError, AttributeError):
            log.warning("unreadable queue parameters %r: ignored", text[:100])
            return cls()


def _opt_str(v: object) -> str | None:
    return None if v is None else str(v)


def _xtext(s: str) -> str:
    """RFC 3461 xtext encoding."""
    return "".join(
        c if 33 <= ord(c) <= 126 and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
        for c in s
    )


# --- outcomes and the deliverer -----------------------------------------------------------------


class OutcomeKind(Enum):
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    DEFERRED = "deferred"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result for one recipient: ``detail`` is the reply (``550 5.1.1 no such user``) or a
    local explanation; ``status`` the enhanced status code; ``remote_mta`` who answered."""

    kind: OutcomeKind
    status: str
    detail: str
    remote_mta: str = ""
    smtp: bool = True
    remote_dsn: bool = False  # DELIVERED to a server that offers DSN: success reports are its job


class Deliverer(Protocol):
    """Delivers one message to recipients of one domain over ``route``; returns an outcome for
    every recipient. Must not raise except on cancellation."""

    async def deliver(
        self,
        route: Route,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        params: QueueParams,
        lease_ok: Callable[[], bool],
    ) -> dict[str, Outcome]: ...


def _status_of(code: int, text: str) -> str:
    parts = text.split(None, 1)
    if parts and len(parts[0].split(".")) == 3 and parts[0][0] in "245":
        return parts[0]
    return f"{code // 100}.0.0" if 200 <= code < 600 else "4.0.0"


def _reply(code: int, message: str) -> str:
    return f"{code} {' '.join(message.split())}"


class _DataAbandoned(Exception):
    """The lease was lost before the final '.'."""


@dataclass
class SmtpDeliverer:
    """The real :class:`Deliverer`, with aiosmtplib.

    - EHLO with ``hostname`` (HELO if EHLO is refused); STARTTLS per ``starttls`` ("may":
      used when offered, certificates not verified; "require": no STARTTLS → deferred).
    - MAIL FROM carries SIZE (if offered), BODY=8BITMIME (if the message is 8-bit and the
      server offers 8BITMIME), SMTPUTF8 (if needed; a server without it → bounce 5.6.7) and the
      DSN parameters RET/ENVID, RCPT TO NOTIFY/ORCPT (if the server offers DSN).
    - DATA is sent by hand: ``DATA`` via ``execute_command``, the dot-stuffed body written on
      the connection's protocol, then ``lease_ok()`` is checked, and only then the final "."
      (``execute_command(b".")``, which writes ``.\\r\\n`` and reads the reply). aiosmtplib's
      ``data()`` sends the body and "." in one write, so it cannot check between them.
    - Hops are tried in order until one gives a reply to MAIL FROM; connection errors and 4xx
      greetings move to the next hop; the last error defers the recipients.
    """

    hostname: str
    starttls: str = "may"
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    relay_user: str = ""
    relay_password: str = ""

    async def deliver(
        self,
        route: Route,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        params: QueueParams,
        lease_ok: Callable[[], bool],
    ) -> dict[str, Outcome]:
        last = Outcome(OutcomeKind.DEFERRED, "4.4.1", "no server could be reached")
        for hop in route.hops:
            try:
                return await self._via(hop, route, sender, recipients, message, params, lease_ok)
            except _HopFailed as e:
                last = e.outcome
                log.info("%s[%s]:%d: %s", hop.host, hop.address, hop.port, last.detail)
                if e.final:
                    break
        return dict.fromkeys(recipients, last)

    async def _via(
        self,
        hop: Hop,
        route: Route,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        params: QueueParams,
        lease_ok: Callable[[], bool],
    ) -> dict[str, Outcome]:
        mta = hop.host
        smtp = aiosmtplib.SMTP(
            hostname=hop.address,
            port=hop.port,
            local_hostname=self.hostname,
            timeout=self.command_timeout,
            start_tls=False,
            validate_certs=False,
        )
        try:
            try:
                await smtp.connect(timeout=self.connect_timeout)
            except aiosmtplib.SMTPResponseException as e:
                raise _HopFailed(_fail(e.code, e.message, mta)) from None
            except (aiosmtplib.SMTPException, OSError) as e:
                raise _HopFailed(
                    Outcome(OutcomeKind.DEFERRED, "4.4.1", f"connect to {mta}: {e}", mta, False)
                ) from None
            try:
                return await self._session(
                    smtp, mta, route, sender, recipients, message, params, lease_ok
                )
            except _DataAbandoned:
                return dict.fromkeys(
                    recipients,
                    Outcome(
                        OutcomeKind.DEFERRED,
                        "4.3.0",
                        "lease lost before the end of data; abandoned",
                        mta,
                        False,
                    ),
                )
            except aiosmtplib.SMTPResponseException as e:
                raise _HopFailed(_fail(e.code, e.message, mta), final=e.code >= 500) from None
            except (aiosmtplib.SMTPException, OSError, ssl.SSLError) as e:
                raise _HopFailed(
                    Outcome(OutcomeKind.DEFERRED, "4.4.2", f"{mta}: {e}", mta, False)
                ) from None
        finally:
            smtp.close()

    async def _session(
        self,
        smtp: aiosmtplib.SMTP,
        mta: str,
        route: Route,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        params: QueueParams,
        lease_ok: Callable[[], bool],
    ) -> dict[str, Outcome]:
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError:
            await smtp.helo()
        if self.starttls != "none" and smtp.supports_extension("starttls"):
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            await smtp.starttls(tls_context=ctx, server_hostname=mta)
            await smtp.ehlo()
        elif self.starttls == "require":
            raise _HopFailed(
                Outcome(OutcomeKind.DEFERRED, "4.7.4", f"{mta} does not offer STARTTLS", mta, False)
            )
        if route.relay and self.relay_user and smtp.supports_extension("auth"):
            await smtp.login(self.relay_user, self.relay_password)

        utf8 = params.smtputf8 or not all(a.isascii() for a in (sender, *recipients))
        if utf8 and not smtp.supports_extension("smtputf8"):
            o = Outcome(
                OutcomeKind.BOUNCED,
                "5.6.7",
                f"{mta} does not support SMTPUTF8, which the message needs",
                mta,
                False,
            )
            return dict.fromkeys(recipients, o)
        eight_bit = params.body == "8BITMIME" or any(b > 0x7F for b in message)
        dsn = smtp.supports_extension("dsn")
        mail_opts: list[str] = []
        if smtp.supports_extension("size"):
            mail_opts.append(f"SIZE={len(message)}")
        if eight_bit and smtp.supports_extension("8bitmime"):
            mail_opts.append("BODY=8BITMIME")
        if utf8:
            mail_opts.append("SMTPUTF8")
        if dsn and params.ret:
            mail_opts.append(f"RET={params.ret}")
        if dsn and params.envid:
            mail_opts.append(f"ENVID={_xtext(params.envid)}")
        enc = "utf-8" if utf8 else "ascii"
        await smtp.mail(sender, options=mail_opts, encoding=enc)

        out: dict[str, Outcome] = {}
        accepted: list[str] = []
        for rcpt in recipients:
            opts: list[str] = []
            if dsn and rcpt in params.notify:
                opts.append("NOTIFY=" + ",".join(params.notify[rcpt]))
            if dsn and rcpt in params.orcpt:
                typ, _, addr = params.orcpt[rcpt].partition(";")
                opts.append(f"ORCPT={typ.strip()};{_xtext(addr.strip())}")
            try:
                await smtp.rcpt(rcpt, options=opts, encoding=enc)
                accepted.append(rcpt)
            except aiosmtplib.SMTPRecipientRefused as e:
                out[rcpt] = _fail(e.code, e.message, mta)
        if not accepted:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await smtp.quit()
            return out
        r = await smtp.execute_command(b"DATA")
        if r.code != 354:
            o = _fail(r.code, r.message, mta)
            out.update(dict.fromkeys(accepted, o))
            return out
        assert smtp.protocol is not None
        smtp.protocol.write(_dot_stuff(message))
        if not lease_ok():
            log.warning("lease lost before the final '.' to %s: connection dropped", mta)
            smtp.close()
            raise _DataAbandoned
        r = await smtp.execute_command(b".")
        o = (
            Outcome(
                OutcomeKind.DELIVERED,
                _status_of(r.code, r.message),
                _reply(r.code, r.message),
                mta,
                remote_dsn=dsn,
            )
            if r.code == 250
            else _fail(r.code, r.message, mta)
        )
        out.update(dict.fromkeys(accepted, o))
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await smtp.quit()
        return out


class _HopFailed(Exception):
    def __init__(self, outcome: Outcome, final: bool = False) -> None:
        super().__init__(outcome.detail)
        self.outcome = outcome
        self.final = final


def _fail(code: int, message: str, mta: str) -> Outcome:
    kind = OutcomeKind.BOUNCED if 500 <= code < 600 else OutcomeKind.DEFERRED
    return Outcome(kind, _status_of(code, message), _reply(code, message), mta)


def _dot_stuff(message: bytes) -> bytes:
    """CRLF line ends, leading dots doubled, ending in CRLF (without the final '.')."""
    data = b"\r\n".join(message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n"))
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


# --- the runner ---------------------------------------------------------------------------------


def router_from_config(cfg: QueueConfig) -> Router:
    ns: list[str] = []
    port = 53
    if cfg.resolver:
        from mailharbor.service.mx import parse_hostport

        host, port = parse_hostport(cfg.resolver, 53)
        ns = [host]
    return Router(
        transport=dict(cfg.transport),
        relayhost=cfg.relayhost,
        nameservers=ns,
        dns_port=port,
        dns_timeout=cfg.dns_timeout,
        mx_port=cfg.mx_port,
    )


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


class QueueRunner:
    """See the module doc. ``term_provider()`` gives the term written into attempt records;
    ``lease_ok()`` says whether this node may send now (always True until the cluster issue
    provides it)."""

    def __init__(
        self,
        store: Store,
        config: QueueConfig,
        *,
        hostname: str,
        clock: Clock | None = None,
        term_provider: Callable[[], int] | None = None,
        lease_ok: Callable[[], bool] | None = None,
        router: Router | None = None,
        deliverer: Deliverer | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.hostname = hostname
        self.clock: Clock = clock or SystemClock()
        self.term_provider = term_provider or (lambda: store.generation)
        self.lease_ok = lease_ok or (lambda: True)
        self.router = router or router_from_config(config)
        self.deliverer: Deliverer = deliverer or SmtpDeliverer(
            hostname=hostname,
            starttls=config.starttls,
            connect_timeout=config.connect_timeout,
            command_timeout=config.command_timeout,
            relay_user=config.relay_user,
            relay_password=config.relay_password,
        )
        self._global = asyncio.Semaphore(config.max_concurrent)
        self._per_domain: dict[str, asyncio.Semaphore] = {}
        self._active: dict[bytes, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._queue_changes = -1
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._recovered: set[bytes] = set()
        self.attempts_started = 0

    # -- lifetime -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the runner task. Entries left in flight by a previous run are due now."""
        self._recovered = {g for g, q in self.store.index.queue.items() if q.in_flight}
        if self._recovered:
            log.info(
                "%d queue entr%s had attempts in flight at the last stop: retrying them "
                "(at-least-once: a remote may see a message twice)",
                len(self._recovered),
                "y" if len(self._recovered) == 1 else "ies",
            )
        self.store.add_commit_listener(self._on_commit)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="queue-runner")

    async def stop(self, grace: float | None = None) -> None:
        """Stop picking entries; let attempts in flight finish for ``grace`` seconds (default
        ``queue.stop_grace``), then cancel the rest (they stay queued and in flight)."""
        self._stopping = True
        self.store.remove_commit_listener(self._on_commit)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        tasks = list(self._active.values())
        if tasks:
            wait = self.config.stop_grace if grace is None else grace
            _done, pending = await asyncio.wait(tasks, timeout=wait)
            for t in pending:
                t.cancel()
            if pending:
                log.info("%d delivery attempt(s) abandoned at stop; they stay queued", len(pending))
                await asyncio.gather(*pending, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    def _on_commit(self, _event: object) -> None:
        # Only a commit that can make an entry due sooner wakes the scan (a delivery into a
        # mailbox does not: at one wake-up per group commit that was ~1% of the SMTP CPU).
        changes = self.store.index.queue_changes
        if changes != self._queue_changes:
            self._queue_changes = changes
            self._wake.set()

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                delay = self.run_due()
            except Exception:
                log.exception("queue scan failed")
                delay = 5.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    # -- scheduling ---------------------------------------------------------------------------

    def _is_due(self, q: QueueEntry, now: int) -> bool:
        return q.next_ms <= now or q.guid in self._recovered

    def run_due(self) -> float:
        """Start an attempt for every due entry not already being attempted (up to the
        concurrency limit); return the seconds until the next entry is due (capped at 60)."""
        now = self.clock.now_ms()
        next_due = now + 60_000
        if self._stopping:
            return 60.0
        lease = self.lease_ok()
        for guid, q in list(self.store.index.queue.items()):
            if guid in self._active:
                continue
            if not self._is_due(q, now):
                next_due = min(next_due, q.next_ms)
                continue
            if not lease:
                next_due = min(next_due, now + 1000)
                continue
            if len(self._active) >= self.config.max_concurrent:
                break
            task = asyncio.get_running_loop().create_task(self._attempt(guid), name="queue-attempt")
            self._active[guid] = task
            task.add_done_callback(functools.partial(self._done, guid))
        return max(0.0, (next_due - now) / 1000)

    def _done(self, guid: bytes, _task: object = None) -> None:
        self._active.pop(guid, None)
        self._wake.set()

    async def idle(self) -> None:
        """Wait until no attempt is in flight (tests)."""
        while self._active:
            await asyncio.gather(*list(self._active.values()), return_exceptions=True)

    # -- one attempt --------------------------------------------------------------------------

    async def _attempt(self, guid: bytes) -> None:
        try:
            async with self._global:
                await self._attempt_inner(guid)
        except asyncio.CancelledError:
            raise
        except StoreError as e:
            log.error("queue entry %s: store error: %s", guid.hex(), e)
        except Exception:
            log.exception("queue entry %s: attempt failed", guid.hex())

    async def _attempt_inner(self, guid: bytes) -> None:
        q = self.store.index.queue.get(guid)
        if q is None or self._stopping or not self.lease_ok():
            return
        self._recovered.discard(guid)
        now = self.clock.now_ms()
        recipients = list(q.recipients)
        message = self.store.read_blob(q.blob)
        params = QueueParams.decode(q.params)
        last_detail = q.last_detail
        if now - q.created_ms >= int(self.config.maximal_lifetime * 1000):
            detail = last_detail or "message expired in the queue"
            o = Outcome(OutcomeKind.BOUNCED, _expiry_status(last_detail), detail, "", False)
            await self._record(q, message, params, dict.fromkeys(recipients, o), expired=True)
            return
        warned = q.warned
        warn_after = int(self.config.delay_warning * 1000)
        warn_now = not warned and warn_after > 0 and now - q.created_ms >= warn_after
        term = self.term_provider()
        async with self.store.transaction() as t:
            t.queue_attempt(guid, term, recipients)
        self.attempts_started += 1
        groups: dict[str, list[str]] = {}
        for r in recipients:
            groups.setdefault(_domain(r), []).append(r)
        results = await asyncio.gather(
            *(self._deliver_group(d, rs, q.sender, message, params) for d, rs in groups.items())
        )
        outcomes: dict[str, Outcome] = {}
        for res in results:
            outcomes.update(res)
        await self._record(
            q, message, params, outcomes, expired=False, warned=warned, warn_now=warn_now
        )

    async def _deliver_group(
        self, domain: str, recipients: list[str], sender: str, message: bytes, params: QueueParams
    ) -> dict[str, Outcome]:
        sem = self._per_domain.get(domain)
        if sem is None:
            sem = self._per_domain[domain] = asyncio.Semaphore(self.config.max_per_domain)
        async with sem:
            try:
                route = await self.router.route(domain)
            except RouteError as e:
                kind = OutcomeKind.BOUNCED if e.permanent else OutcomeKind.DEFERRED
                code = "550" if e.permanent else "451"
                if e.status == "5.1.10":
                    code = "556"
                return dict.fromkeys(
                    recipients, Outcome(kind, e.status, f"{code} {e.status} {e.text}", "", False)
                )
            try:
                return await self.deliverer.deliver(
                    route, sender, recipients, message, params, self.lease_ok
                )
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("delivery to %s failed unexpectedly", domain)
                o = Outcome(OutcomeKind.DEFERRED, "4.3.0", f"local error: {type(e).__name__}")
                return dict.fromkeys(recipients, o)

    async def _record(
        self,
        q: QueueEntry,
        message: bytes,
        params: QueueParams,
        outcomes: Mapping[str, Outcome],
        *,
        expired: bool,
        warned: bool = False,
        warn_now: bool = False,
    ) -> None:
        now = self.clock.now_ms()
        flag_warned = warned or warn_now
        # DEFERRED records last: the entry's last_detail comes from them.
        ordered = sorted(outcomes.items(), key=lambda kv: kv[1].kind is OutcomeKind.DEFERRED)
        attempts = q.attempts if q.attempts else 1
        delay = backoff_ms(
            attempts,
            int(self.config.minimal_backoff * 1000),
            int(self.config.maximal_backoff * 1000),
        )
        failed: list[DsnRecipient] = []
        delayed: list[DsnRecipient] = []
        relayed: list[DsnRecipient] = []
        async with self.store.transaction() as t:
            for rcpt, o in ordered:
                notify = params.notify.get(rcpt)
                if o.kind is OutcomeKind.DELIVERED:
                    t.queue_done(q.guid, rcpt, QueueResult.DELIVERED, o.detail)
                    if notify and "SUCCESS" in notify and not o.remote_dsn:
                        relayed.append(
                            DsnRecipient(
                                address=rcpt,
                                action="relayed",
                                status="2.0.0",
                                diagnostic=o.detail,
                                remote_mta=o.remote_mta,
                                original_recipient=params.orcpt.get(rcpt, ""),
                                smtp_diagnostic=o.smtp,
                            )
                        )
                    log.info(
                        "%s: to=<%s> relay=%s status=sent (%s)",
                        q.guid.hex(),
                        rcpt,
                        o.remote_mta,
                        o.detail,
                    )
                elif o.kind is OutcomeKind.DEFERRED:
                    t.queue_done(
                        q.guid,
                        rcpt,
                        QueueResult.DEFERRED,
                        o.detail,
                        now + delay,
                        warned=flag_warned,
                    )
                    if warn_now and (notify is None or "DELAY" in notify):
                        delayed.append(
                            DsnRecipient(
                                address=rcpt,
                                action="delayed",
                                status=o.status if o.status.startswith("4") else "4.4.7",
                                diagnostic=o.detail,
                                remote_mta=o.remote_mta,
                                original_recipient=params.orcpt.get(rcpt, ""),
                                smtp_diagnostic=o.smtp,
                            )
                        )
                    log.info(
                        "%s: to=<%s> status=deferred (%s), next in %d s",
                        q.guid.hex(),
                        rcpt,
                        o.detail,
                        delay // 1000,
                    )
                else:
                    result = QueueResult.EXPIRED if expired else QueueResult.BOUNCED
                    t.queue_done(q.guid, rcpt, result, o.detail)
                    log.info(
                        "%s: to=<%s> status=%s (%s)",
                        q.guid.hex(),
                        rcpt,
                        result.name.lower(),
                        o.detail,
                    )
                    if "NEVER" in params.notify.get(rcpt, ()) or (
                        rcpt in params.notify and "FAILURE" not in params.notify[rcpt]
                    ):
                        continue
                    failed.append(
                        DsnRecipient(
                            address=rcpt,
                            action="failed",
                            status=o.status if o.status.startswith("5") else "5.4.7",
                            diagnostic=o.detail,
                            remote_mta=o.remote_mta,
                            original_recipient=params.orcpt.get(rcpt, ""),
                            smtp_diagnostic=o.smtp,
                        )
                    )
            if failed and not q.sender:
                log.info(
                    "%s: a bounce (from <>) failed for %s: dropped, a bounce is never bounced",
                    q.guid.hex(),
                    ", ".join(f.address for f in failed),
                )
            if not q.sender:
                return  # no report of any kind to the null sender
            until = q.created_ms + int(self.config.maximal_lifetime * 1000)
            for kind, rcpts in (("bounce", failed), ("delay warning", delayed)):
                if rcpts:
                    dsn = build_dsn(
                        reporting_mta=self.hostname,
                        original_sender=q.sender,
                        recipients=rcpts,
                        original=message,
                        arrival_ms=q.created_ms,
                        now_ms=now,
                        ret=params.ret if kind == "bounce" else None,
                        envid=params.envid,
                        token=os.urandom(12).hex(),
                        will_retry_until_ms=until,
                    )
                    where = add_report(self.store, t, q.sender, dsn)
                    log.info("%s: %s %s <%s>", q.guid.hex(), kind, where, q.sender)
            if relayed:
                dsn = build_dsn(
                    reporting_mta=self.hostname,
                    original_sender=q.sender,
                    recipients=relayed,
                    original=message,
                    arrival_ms=q.created_ms,
                    now_ms=now,
                    envid=params.envid,
                    token=os.urandom(12).hex(),
                )
                where = add_report(self.store, t, q.sender, dsn)
                log.info("%s: success report %s <%s>", q.guid.hex(), where, q.sender)
        # NotFound (an admin deleted the entry meanwhile) propagates as a StoreError: logged.


def add_report(store: Store, t: Transaction, sender: str, dsn: bytes) -> str:
    """Add the report ``dsn`` for ``sender`` to transaction ``t``: into the sender's INBOX if
    the sender is a local account, else queued from ``<>``. Returns "delivered to"/"queued to"
    (for log lines). Never call it for the null sender."""
    acct = store.index.account_by_address(sender)
    inbox = store.index.mailbox_by_name(acct.guid, "INBOX") if acct is not None else None
    if inbox is not None:
        blob = t.put_blob(b"Return-Path: <>\r\n" + dsn)
        t.deliver(blob, [inbox.guid])
        return "delivered to"
    blob = t.put_blob(dsn)
    t.queue_add(blob, "", [sender])
    return "queued to"


def _expiry_status(last_detail: str) -> str:
    parts = last_detail.split()
    if len(parts) >= 2 and len(parts[1].split(".")) == 3:
        return "5" + parts[1][1:]
    return "4.4.7"
