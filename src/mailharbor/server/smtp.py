"""The SMTP, submission and LMTP listeners: asyncio adapters around the sans-IO engine.

Theory of operation
-------------------
One :class:`SmtpListener` per configured endpoint and kind (:class:`ListenerKind`): MX (port 25,
STARTTLS offered, no AUTH), SUBMISSION (587: STARTTLS required before anything but EHLO/NOOP/…,
AUTH only under TLS, AUTH required before MAIL), SUBMISSIONS (465: implicit TLS, AUTH required)
and LMTP (a Unix socket or TCP; one reply per recipient). All listeners of a node share one
:class:`SmtpServices` (delivery, authenticator, AUTH failure accounting, connection limits).

A session (:class:`_Session`) reads bytes, feeds :class:`SmtpServerConnection`, answers the events
that need the application (MAIL/RCPT via :class:`LocalDelivery`, the end of the message via
``LocalDelivery.deliver`` — whose replies come only after the store commit — and AUTH via the
:class:`Authenticator` after the per-client :class:`AuthFailures` delay) and writes the replies.
With ``smtp.reverse_dns`` the client's name for ``Received:`` is looked up
(:mod:`mailharbor.service.rdns`) from the moment the session starts; the session waits for it
only at the start of a message, and never past ``rdns_timeout`` after connecting (then the name
is ``unknown``).

A message is held in memory while it arrives up to ``smtp.stream_threshold`` bytes; past that
(when no filter is configured) it is streamed into a store transaction as it arrives
(:class:`~mailharbor.service.delivery.MessageSpool`), committed at its end or aborted by RSET, a
new transaction or the end of the session.

Invariants
----------
- Timeouts: ``command_timeout`` for the next bytes outside a message, ``data_timeout`` inside
  DATA/BDAT; then ``421 4.4.2`` and close. Writes are bounded by the same timeouts.
- Limits: at most ``max_connections`` sessions over all listeners and ``max_connections_per_client``
  per client address (IPv6 per /64); more get ``421 4.7.0`` before the greeting.
- PROXY v2: a connection from a ``trusted_proxies`` address must start with a PROXY v2 header and
  its source address is the client (limits, AUTH delays, ``Received:``); a connection from anyone
  else whose first bytes look like a PROXY header gets ``421 4.7.0`` and is closed.
- Stop: the listening sockets close first; idle sessions get ``421 4.3.2 Service shutting down``
  at once; a session receiving a message may finish it (its reply is sent, the message is
  durable) until ``stop_grace`` runs out, then gets 421 too.
- Exception text never reaches the wire: a bug while answering gives ``451 4.3.0`` (or ``421
  4.3.0`` and close when no reply is owed) and a log line with the traceback.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mailharbor.proto.smtp import (
    NEED_DATA,
    AuthFailures,
    AuthRequest,
    BdatChunk,
    ConnectionClosed,
    DataAborted,
    DataChunk,
    DataEnd,
    DataStart,
    Ehlo,
    Event,
    Helo,
    MailFrom,
    MailParams,
    ProtocolViolation,
    RcptTo,
    Reply,
    Rset,
    Sentinel,
    SmtpLimits,
    SmtpServerConfig,
    SmtpServerConnection,
    StartTls,
    State,
)
from mailharbor.server.listener import (
    TLS_HANDSHAKE_TIMEOUT,
    ConnectionLimiter,
    EngineSession,
    Listener,
)
from mailharbor.server.proxy import TrustedProxies
from mailharbor.service.auth import Authenticator, AuthStatus
from mailharbor.service.delivery import (
    Envelope,
    LocalDelivery,
    MessageSpool,
    Recipient,
    Session,
    new_queue_id,
)
from mailharbor.service.mx import parse_hostport
from mailharbor.service.rdns import UNKNOWN, ReverseResolver

__all__ = ["ListenerKind", "SmtpListener", "SmtpOptions", "SmtpServices"]

log = logging.getLogger("mailharbor.smtp")

R_SHUTDOWN = Reply(421, "4.3.2", "Service shutting down")
R_TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded")
R_BUSY = Reply(421, "4.7.0", "Too many connections, try again later")
R_PROXY = Reply(421, "4.7.0", "PROXY protocol not accepted from this address")
R_BUG = Reply(451, "4.3.0", "Error: internal error")
R_BUG_CLOSE = Reply(421, "4.3.0", "Error: internal error")
R_AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
R_AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
R_AUTH_TEMP = Reply(454, "4.7.0", "Temporary authentication failure")
R_RCPT_OK = Reply(250, "2.1.5", "Ok")
_IN_MESSAGE = (State.DATA, State.BDAT, State.BDAT_TXN)
_WRITE_HIGH_WATER = 64 * 1024


class ListenerKind(enum.Enum):
    MX = "mx"
    SUBMISSION = "submission"
    SUBMISSIONS = "submissions"
    LMTP = "lmtp"


@dataclass(frozen=True)
class SmtpOptions:
    """The ``[smtp]`` settings the sessions use (see :class:`mailharbor.config.SmtpConfig`)."""

    hostname: str
    max_message_size: int = 50 * 1024 * 1024
    max_recipients: int = 100
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    max_connections: int = 1000
    max_connections_per_client: int = 20
    trusted_proxies: tuple[str, ...] = ()
    stop_grace: float = 30.0
    stream_threshold: int = 1024 * 1024
    reverse_dns: bool = False  # the [smtp] default is on; off here so tests never touch DNS
    rdns_resolver: str = ""
    rdns_timeout: float = 2.0


@dataclass
class SmtpServices:
    """What every listener of a node shares."""

    delivery: LocalDelivery
    authenticator: Authenticator
    options: SmtpOptions
    tls: ssl.SSLContext | None = None
    auth_failures: AuthFailures = field(default_factory=lambda: AuthFailures(time.monotonic))
    limiter: ConnectionLimiter | None = None
    trusted: TrustedProxies = field(default_factory=lambda: TrustedProxies(()))
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rdns: ReverseResolver | None = None

    def __post_init__(self) -> None:
        o = self.options
        if self.limiter is None:
            self.limiter = ConnectionLimiter(o.max_connections, o.max_connections_per_client)
        self.trusted = TrustedProxies(o.trusted_proxies)
        if self.rdns is None and o.reverse_dns:
            ns: list[str] = []
            port = 53
            if o.rdns_resolver:
                host, port = parse_hostport(o.rdns_resolver, 53)
                ns = [host]
            self.rdns = ReverseResolver(nameservers=ns, port=port, timeout=o.rdns_timeout)


class SmtpListener(Listener):
    """One listening endpoint of one kind; see the module docstring."""

    log = log

    def __init__(self, kind: ListenerKind, endpoint: str, services: SmtpServices) -> None:
        if kind in (ListenerKind.SUBMISSION, ListenerKind.SUBMISSIONS) and services.tls is None:
            raise ValueError(f"the {kind.value} listener needs the TLS certificate")
        self.kind = kind
        self.label = kind.value
        self.services = services
        self._sessions: set[_Session] = set()
        assert services.limiter is not None
        super().__init__(
            endpoint,
            trusted=services.trusted,
            limiter=services.limiter,
            tls=services.tls,
            implicit_tls=kind is ListenerKind.SUBMISSIONS,
            unix="/" in endpoint and not endpoint.startswith("["),
        )

    def __repr__(self) -> str:
        return f"SmtpListener({self.kind.value}, {self.endpoint})"

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, send 421 to idle sessions, let messages in flight finish within
        ``grace`` seconds (default ``smtp.stop_grace``), then close everything."""
        await super().stop(self.services.options.stop_grace if grace is None else grace)

    def _stopping(self, deadline: float) -> None:
        for s in list(self._sessions):
            s.shutdown(deadline)

    def _busy_reply(self) -> bytes:
        return R_BUSY.to_bytes()

    async def _session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: str, tls: bool
    ) -> None:
        session = _Session(self, reader, writer, client, tls)
        self._sessions.add(session)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)


class _Session(EngineSession[SmtpServerConnection]):
    """One connection.

    Reads are plain ``await reader.read()`` calls; their timeout is one lazy timer per session
    (``_on_timer``): a read only records its deadline, and the timer, when it fires, re-arms
    itself at the current deadline or, if the session is still waiting for bytes past it,
    cancels the read (the task is always suspended in ``_read`` then), which ``_read`` turns into
    the 421. A listener stop interrupts a command read the same way (``shutdown``). Replies are
    collected in ``_outbuf`` and written in one piece before the session waits (for bytes, the
    store, AUTH), so pipelined commands get their replies in one segment."""

    log = log

    def __init__(
        self,
        listener: SmtpListener,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: str,
        tls: bool,
    ) -> None:
        self.listener = listener
        self.services = listener.services
        self.options = listener.services.options
        self.reader = reader
        self.writer = writer
        self.client = client
        self.tls = tls
        self.kind = listener.kind
        self.lmtp = listener.kind is ListenerKind.LMTP
        self.deadline: float | None = None
        self.account: str | None = None
        self.first_read = True
        sub = self.kind in (ListenerKind.SUBMISSION, ListenerKind.SUBMISSIONS)
        cfg = SmtpServerConfig(
            hostname=self.options.hostname,
            tls_available=self.services.tls is not None and not self.lmtp,
            require_tls=self.kind is ListenerKind.SUBMISSION,
            auth=sub,
            require_auth=sub,
            limits=SmtpLimits(
                max_message_size=self.options.max_message_size,
                max_recipients=self.options.max_recipients,
            ),
        )
        self.conn = SmtpServerConnection(cfg, lmtp=self.lmtp, tls_active=tls)
        self.submission = sub
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self._outbuf = bytearray()
        self._read_deadline = 0.0  # loop time; meaningful while _reading
        self._reading = False
        self._interruptible = False  # reading a command: a stop may interrupt it
        self._interrupt: Reply | None = None  # why the read was cancelled
        self._timer: asyncio.TimerHandle | None = None
        self._info: Session | None = None
        self._info_key: tuple[object, ...] = ()
        self.client_host = ""  # the reverse DNS name once known ("" → "unknown")
        self._rdns: asyncio.Task[str] | None = None
        self._rdns_deadline = 0.0
        rdns = self.services.rdns
        if rdns is not None and not listener.unix and client != "unknown":
            hit = rdns.cached(client)
            if hit is not None:
                self.client_host = hit
            else:
                self._rdns_deadline = self._loop.time() + rdns.timeout
                self._rdns = self._loop.create_task(rdns.lookup(client))
                self._rdns.add_done_callback(self._rdns_done)
        self.spool: MessageSpool | None = None
        self._stream_at = (
            self.options.stream_threshold if self.services.delivery.can_stream else sys.maxsize
        )
        self._reset()

    def _reset(self) -> None:
        self.queue_id = ""
        self.sender = ""
        self.mail_params = MailParams()
        self.recipients: list[Recipient] = []
        self._drop_message()

    def _rdns_done(self, task: asyncio.Task[str]) -> None:
        if not task.cancelled() and task.exception() is None:
            self.client_host = task.result()

    def _rdns_pending(self) -> bool:
        return self._rdns is not None and not self._rdns.done()

    async def _rdns_settled(self) -> None:
        """Wait for the reverse lookup started at connect, at most until its deadline (the
        session is never held longer than ``rdns_timeout`` after it connected)."""
        task = self._rdns
        if task is None or task.done():
            return
        remaining = self._rdns_deadline - self._loop.time()
        if remaining > 0:
            await asyncio.wait({task}, timeout=remaining)
        if not task.done():
            task.cancel()
            self.client_host = UNKNOWN
        else:
            self._rdns_done(task)

    def _drop_message(self) -> None:
        self.message = bytearray()
        if self.spool is not None:
            self.spool.abort()
            self.spool = None

    def _add_message_data(self, data: bytes) -> None:
        """Message bytes: held in ``message`` up to ``stream_threshold``, then streamed into
        the store (see :class:`~mailharbor.service.delivery.MessageSpool`)."""
        if self.spool is not None:
            self.spool.write(data)
            return
        self.message += data
        if len(self.message) > self._stream_at:
            self.spool = self.services.delivery.open_spool(self._envelope())
            self.spool.write(bytes(self.message))
            self.message = bytearray()

    # -- I/O ---------------------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        """Write ``_outbuf`` and ``data`` now."""
        if self._outbuf:
            data = bytes(self._outbuf) + data
            self._outbuf.clear()
        if not data:
            return
        self.writer.write(data)
        # Drain only when the peer is slow to read: a drain via wait_for yields to the loop,
        # which must not happen between the 220 to STARTTLS and start_tls (see _starttls).
        if self.writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
            await asyncio.wait_for(self.writer.drain(), self.options.command_timeout)

    def _in_message(self) -> bool:
        return self.conn.state in _IN_MESSAGE

    def shutdown(self, deadline: float) -> None:
        """The listener stops: a session waiting for a command gets 421 now; one inside a
        message may finish it until ``deadline`` (loop time)."""
        self.deadline = deadline
        if not self._reading:
            return  # _read checks the stop future before it waits
        if self._interruptible:
            self._cancel_read(R_SHUTDOWN)
        elif deadline < self._read_deadline:
            self._read_deadline = deadline
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _cancel_read(self, why: Reply) -> None:
        if self._interrupt is None and self._task is not None:
            self._interrupt = why
            self._task.cancel()

    def _on_timer(self) -> None:
        self._timer = None
        if not self._reading:
            return  # the next read arms a new timer
        if self._loop.time() < self._read_deadline:
            self._timer = self._loop.call_at(self._read_deadline, self._on_timer)
            return
        if self.listener.stop_future.done():
            self._cancel_read(R_SHUTDOWN)
        else:
            log.info("session with %s timed out", self.client)
            self._cancel_read(R_TIMEOUT)

    async def _read(self) -> bytes | None:
        """The next bytes (``b""`` at EOF), or None after a timeout/stop 421 was written."""
        loop = self._loop
        in_msg = self._in_message()
        timeout = self.options.data_timeout if in_msg else self.options.command_timeout
        if self.listener.stop_future.done():
            if not in_msg:
                await self._write(R_SHUTDOWN.to_bytes())
                return None
            if self.deadline is not None:
                timeout = min(timeout, max(0.0, self.deadline - loop.time()))
        if self._outbuf:
            await self._write(b"")
        self._read_deadline = deadline = loop.time() + timeout
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._on_timer)
        elif self._timer.when() > deadline:  # a shorter timeout than the armed one
            self._timer.cancel()
            self._timer = loop.call_at(deadline, self._on_timer)
        self._reading = True
        self._interruptible = not in_msg
        try:
            return await self.reader.read(65536)
        except asyncio.CancelledError:
            why = self._interrupt
            if why is None:
                raise  # the task itself is being cancelled
            task = self._task
            assert task is not None
            task.uncancel()
        except (ConnectionError, OSError):
            return b""
        finally:
            self._reading = False
            self._interruptible = False
        self._interrupt = None
        await self._write(why.to_bytes())
        return None

    async def _refuse_proxy(self) -> None:
        await self._write(R_PROXY.to_bytes())

    async def run(self) -> None:
        self._task = asyncio.current_task()
        try:
            await self._serve()
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._rdns is not None and not self._rdns.done():
                self._rdns.cancel()
            self._drop_message()

    async def _pump(self) -> bool:
        """Handle every event the engine has; True when the session is over."""
        conn = self.conn
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                break
            if type(ev) is DataChunk:  # the common case, kept cheap
                if self.spool is None and len(self.message) + len(ev.data) <= self._stream_at:
                    self.message += ev.data
                else:
                    if self.spool is None:
                        await self._rdns_settled()  # Received: goes into the spool first
                    self._add_message_data(ev.data)
                    if self.spool is not None and self.spool.needs_flush:
                        await self.spool.flush()
                continue
            if isinstance(ev, Sentinel):  # PAUSED cannot happen: every owed reply is sent
                raise RuntimeError("engine paused without an answer")
            if isinstance(ev, ConnectionClosed):
                await self._write(conn.data_to_send())
                return True
            try:
                out = self._on_event(ev)
                if out is None:
                    if not isinstance(ev, StartTls):  # _starttls writes its 220 itself
                        await self._write(conn.data_to_send())
                    out = await self._on_event_async(ev)
            except (ConnectionError, TimeoutError, ssl.SSLError):
                raise
            except Exception:
                log.exception("error while answering %s from %s", type(ev).__name__, self.client)
                bug = self._bug_reply(ev)
                if bug is None:
                    await self._write(conn.data_to_send() + R_BUG_CLOSE.to_bytes())
                    return True
                out = bug
            self._outbuf += out
        self._outbuf += conn.data_to_send()
        if conn.closing:
            await self._write(b"")
            return True
        return False

    def _bug_reply(self, ev: Event) -> bytes | None:
        if not self.conn.awaiting_reply:
            return None
        message_end = isinstance(ev, DataEnd) or (isinstance(ev, BdatChunk) and ev.last)
        self._reset()
        if self.lmtp and message_end:
            return self.conn.send_lmtp_replies([R_BUG] * self.conn.accepted_recipients)
        return self.conn.send(R_BUG)

    # -- events --------------------------------------------------------------------------------

    def _session_info(self) -> Session:
        conn = self.conn
        key = (conn.helo_name, conn.esmtp, self.tls, self.account, self.client_host)
        if self._info is not None and key == self._info_key:
            return self._info
        if self.lmtp:
            proto = "LMTPS" if self.tls else "LMTP"
        else:
            proto = "ESMTP" if conn.esmtp else "SMTP"
            proto += "S" if self.tls else ""
            proto += "A" if self.account else ""
        self._info = Session(
            client_ip=self.client,
            helo=conn.helo_name or "",
            protocol=proto,
            authenticated=self.account,
            submission=self.submission,
            client_host=self.client_host,
        )
        self._info_key = key
        return self._info

    def _on_event(self, ev: Event) -> bytes | None:
        """Answer an event that needs no waiting; None: it needs ``_on_event_async``."""
        delivery = self.services.delivery
        match ev:
            case MailFrom(address=address, params=params):
                reply = delivery.check_sender(self._session_info(), address)
                if reply.positive:
                    self._reset()
                    self.queue_id = new_queue_id()
                    self.sender = address
                    self.mail_params = params
                return self.conn.send(reply)
            case RcptTo(address=address, params=params):
                res = delivery.resolve(
                    self._session_info(),
                    address,
                    size=self.mail_params.size or 0,
                    params=params,
                )
                if isinstance(res, Reply):
                    log.info("rcpt %s from %s refused: %d", address, self.client, res.code)
                    return self.conn.send(res)
                self.recipients.append(res)
                return self.conn.send(R_RCPT_OK)
            case DataStart():
                self._drop_message()
                if self._rdns_pending():
                    return None  # wait for the client's name before the message
            case DataChunk(data=data):
                self._add_message_data(data)
            case BdatChunk(data=data, last=last):
                if (
                    last
                    or self.spool is not None
                    or self._rdns_pending()
                    or len(self.message) + len(data) > self._stream_at
                ):
                    return None
                self.message += data
            case DataEnd() | StartTls() | AuthRequest():
                return None
            case DataAborted() | Rset():
                self._drop_message()
                if isinstance(ev, Rset):
                    self._reset()
            case Ehlo() | Helo():
                self._reset()
            case ProtocolViolation(reason=reason):
                log.debug("client %s: %s", self.client, reason)
            case _:
                pass
        return b""

    async def _on_event_async(self, ev: Event) -> bytes:
        """Answer the end of a message, STARTTLS or AUTH (they wait for the store, the TLS
        handshake or the password check)."""
        if isinstance(ev, StartTls):
            return await self._starttls()
        if isinstance(ev, AuthRequest):
            return self.conn.send(await self._auth(ev))
        if isinstance(ev, DataStart):
            await self._rdns_settled()
            return b""
        if isinstance(ev, BdatChunk):
            await self._rdns_settled()
            self._add_message_data(ev.data)
            if self.spool is not None and self.spool.needs_flush:
                await self.spool.flush()
            if not ev.last:
                return b""
        return await self._end_of_message()

    def _envelope(self) -> Envelope:
        if not self.queue_id:
            self.queue_id = new_queue_id()
        return Envelope(
            queue_id=self.queue_id,
            session=self._session_info(),
            sender=self.sender,
            recipients=tuple(self.recipients),
            params=self.mail_params,
        )

    async def _end_of_message(self) -> bytes:
        await self._rdns_settled()
        envelope = self._envelope()
        message = bytes(self.message)
        self.message = bytearray()
        spool, self.spool = self.spool, None
        replies = await self.services.delivery.deliver(
            envelope, message, per_recipient=self.lmtp, spool=spool
        )
        self._reset()
        if self.lmtp:
            return self.conn.send_lmtp_replies(replies)
        return self.conn.send(replies[0])

    async def _starttls(self) -> bytes:
        # No await between the 220 and start_tls (which pauses reading at once): the client's
        # ClientHello must not be read by the plaintext stream reader.
        self.writer.write(bytes(self._outbuf) + self.conn.data_to_send())
        self._outbuf.clear()
        assert self.services.tls is not None
        await self.writer.start_tls(self.services.tls, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        self.tls = True
        self.account = None
        self._reset()
        self.conn.starttls_done()
        return b""

    async def _auth(self, ev: AuthRequest) -> Reply:
        failures = self.services.auth_failures
        if failures.locked_out(self.client):
            return R_AUTH_TEMP
        delay = failures.delay(self.client)
        if delay > 0:
            await self.services.sleep(delay)
        if ev.authzid and ev.authzid.lower() != ev.identity.lower():
            failures.record_failure(self.client)
            return R_AUTH_FAILED
        result = await self.services.authenticator.verify(ev.identity, ev.password)
        if result.status is AuthStatus.OK:
            failures.record_success(self.client)
            self.account = result.account
            return R_AUTH_OK
        if result.status is AuthStatus.TEMPFAIL:
            return R_AUTH_TEMP
        failures.record_failure(self.client)
        log.info("AUTH failed for %s from %s", ev.identity[:64], self.client)
        return R_AUTH_FAILED
