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
The message is held in memory while it arrives (bounded by ``smtp.max_message_size``).

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
import contextlib
import enum
import logging
import os
import ssl
import stat
import time
from collections import Counter
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
    address_key,
)
from mailharbor.server.proxy import (
    ProxyError,
    TrustedProxies,
    looks_like_proxy,
    read_proxy_header,
)
from mailharbor.service.auth import Authenticator, AuthStatus
from mailharbor.service.delivery import (
    Envelope,
    LocalDelivery,
    Recipient,
    Session,
    new_queue_id,
)

__all__ = ["ConnectionLimiter", "ListenerKind", "SmtpListener", "SmtpOptions", "SmtpServices"]

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
_PROXY_TIMEOUT = 10.0
_TLS_TIMEOUT = 30.0
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


class ConnectionLimiter:
    """Counts open sessions globally and per client address key."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.open = 0
        self._by_client: Counter[str] = Counter()

    def acquire(self, client: str) -> bool:
        key = address_key(client)
        if self.open >= self.total or self._by_client[key] >= self.per_client:
            return False
        self.open += 1
        self._by_client[key] += 1
        return True

    def release(self, client: str) -> None:
        key = address_key(client)
        self.open -= 1
        self._by_client[key] -= 1
        if self._by_client[key] <= 0:
            del self._by_client[key]


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

    def __post_init__(self) -> None:
        if self.limiter is None:
            o = self.options
            self.limiter = ConnectionLimiter(o.max_connections, o.max_connections_per_client)
        self.trusted = TrustedProxies(self.options.trusted_proxies)


def split_endpoint(endpoint: str) -> tuple[str | None, int]:
    """``"host:port"`` / ``"[v6]:port"`` / ``":port"`` → (host or None for all, port)."""
    host, _, port = endpoint.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return (host or None), int(port)


class SmtpListener:
    """One listening endpoint of one kind; see the module docstring."""

    def __init__(self, kind: ListenerKind, endpoint: str, services: SmtpServices) -> None:
        self.kind = kind
        self.endpoint = endpoint
        self.services = services
        self.unix = "/" in endpoint and not endpoint.startswith("[")
        self.bound: list[tuple[str, int]] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sessions: set[_Session] = set()
        self._stop: asyncio.Future[None] | None = None
        self.stopping = False
        if kind in (ListenerKind.SUBMISSION, ListenerKind.SUBMISSIONS) and services.tls is None:
            raise ValueError(f"the {kind.value} listener needs the TLS certificate")

    def __repr__(self) -> str:
        return f"SmtpListener({self.kind.value}, {self.endpoint})"

    async def start(self) -> None:
        """Bind and listen. Raises OSError when the address is unusable."""
        self._stop = asyncio.get_running_loop().create_future()
        if self.unix:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(self.endpoint).st_mode):
                    os.unlink(self.endpoint)
            self._server = await asyncio.start_unix_server(self._accept, self.endpoint)
            os.chmod(self.endpoint, 0o660)
        else:
            host, port = split_endpoint(self.endpoint)
            self._server = await asyncio.start_server(self._accept, host, port, reuse_address=True)
            for s in self._server.sockets:
                addr = s.getsockname()
                self.bound.append((str(addr[0]), int(addr[1])))
        log.info("%s listener on %s", self.kind.value, self.endpoint)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, send 421 to idle sessions, let messages in flight finish within
        ``grace`` seconds (default ``smtp.stop_grace``), then close everything."""
        if grace is None:
            grace = self.services.options.stop_grace
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(None)
        for s in list(self._sessions):
            s.deadline = asyncio.get_running_loop().time() + grace
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=grace + 5)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self.unix:
            with contextlib.suppress(OSError):
                os.unlink(self.endpoint)
        log.info("%s listener on %s stopped", self.kind.value, self.endpoint)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except Exception:
            log.exception("%s session failed", self.kind.value)
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        services = self.services
        if self.unix:
            client = "unix"
        else:
            peer = writer.get_extra_info("peername")
            client = str(peer[0]) if peer else "unknown"
        if services.trusted.is_trusted(client):
            try:
                header = await read_proxy_header(reader, _PROXY_TIMEOUT)
            except (ProxyError, TimeoutError, asyncio.IncompleteReadError, OSError) as e:
                log.warning("refused %s: bad PROXY header (%s)", client, type(e).__name__)
                return
            if header.source is not None:
                client = header.source[0]
        if self.stopping:
            return
        limiter = services.limiter
        assert limiter is not None
        if not limiter.acquire(client):
            log.warning("refused %s on %s: too many connections", client, self.kind.value)
            with contextlib.suppress(Exception):
                writer.write(R_BUSY.to_bytes())
                await asyncio.wait_for(writer.drain(), 5)
            return
        try:
            tls = False
            if self.kind is ListenerKind.SUBMISSIONS:
                assert services.tls is not None
                try:
                    await writer.start_tls(services.tls, ssl_handshake_timeout=_TLS_TIMEOUT)
                except (OSError, ssl.SSLError, TimeoutError) as e:
                    log.info("TLS handshake with %s failed: %s", client, type(e).__name__)
                    return
                tls = True
            session = _Session(self, reader, writer, client, tls)
            self._sessions.add(session)
            try:
                await session.run()
            finally:
                self._sessions.discard(session)
        finally:
            limiter.release(client)

    @property
    def stop_future(self) -> asyncio.Future[None]:
        assert self._stop is not None
        return self._stop


class _Session:
    """One connection."""

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
        self._reset()

    def _reset(self) -> None:
        self.queue_id = ""
        self.sender = ""
        self.mail_params = MailParams()
        self.recipients: list[Recipient] = []
        self.message = bytearray()

    # -- I/O ---------------------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        self.writer.write(data)
        # Drain only when the peer is slow to read: a drain via wait_for yields to the loop,
        # which must not happen between the 220 to STARTTLS and start_tls (see _starttls).
        if self.writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
            await asyncio.wait_for(self.writer.drain(), self.options.command_timeout)

    def _in_message(self) -> bool:
        return self.conn.state in _IN_MESSAGE

    async def _read(self) -> bytes | None:
        """The next bytes (``b""`` at EOF), or None after a timeout/stop 421 was written."""
        loop = asyncio.get_running_loop()
        in_msg = self._in_message()
        timeout = self.options.data_timeout if in_msg else self.options.command_timeout
        stop = self.listener.stop_future
        if stop.done():
            if not in_msg:
                await self._write(R_SHUTDOWN.to_bytes())
                return None
            if self.deadline is not None:
                timeout = min(timeout, max(0.0, self.deadline - loop.time()))
        read = asyncio.ensure_future(self.reader.read(65536))
        waiters: set[asyncio.Future[object]] = {read}  # type: ignore[arg-type]
        if not in_msg and not stop.done():
            waiters.add(stop)  # type: ignore[arg-type]
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when="FIRST_COMPLETED")
        if read in done:
            try:
                return read.result()
            except (ConnectionError, OSError):
                return b""
        read.cancel()
        with contextlib.suppress(BaseException):
            await read
        reply = R_SHUTDOWN if stop.done() else R_TIMEOUT
        if reply is R_TIMEOUT:
            log.info("session with %s timed out", self.client)
        await self._write(reply.to_bytes())
        return None

    async def run(self) -> None:
        try:
            await self._write(self.conn.data_to_send())
            while True:
                if await self._pump():
                    return
                data = await self._read()
                if data is None:
                    return
                if self.first_read and data:
                    self.first_read = False
                    if looks_like_proxy(data):
                        log.warning(
                            "refused %s: PROXY header from an untrusted address", self.client
                        )
                        await self._write(R_PROXY.to_bytes())
                        return
                self.conn.receive_data(data)
        except (ConnectionError, TimeoutError, OSError, ssl.SSLError):
            return

    async def _pump(self) -> bool:
        """Handle every event the engine has; True when the session is over."""
        while True:
            ev = self.conn.next_event()
            if ev is NEED_DATA:
                break
            if isinstance(ev, Sentinel):  # PAUSED cannot happen: every owed reply is sent
                raise RuntimeError("engine paused without an answer")
            if isinstance(ev, ConnectionClosed):
                await self._write(self.conn.data_to_send())
                return True
            try:
                out = await self._on_event(ev)
            except (ConnectionError, TimeoutError, ssl.SSLError):
                raise
            except Exception:
                log.exception("error while answering %s from %s", type(ev).__name__, self.client)
                bug = self._bug_reply(ev)
                if bug is None:
                    await self._write(self.conn.data_to_send() + R_BUG_CLOSE.to_bytes())
                    return True
                out = bug
            await self._write(out)
        await self._write(self.conn.data_to_send())
        return self.conn.closing

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
        if self.lmtp:
            proto = "LMTPS" if self.tls else "LMTP"
        else:
            proto = "ESMTP" if self.conn.esmtp else "SMTP"
            proto += "S" if self.tls else ""
            proto += "A" if self.account else ""
        return Session(
            client_ip=self.client,
            helo=self.conn.helo_name or "",
            protocol=proto,
            authenticated=self.account,
            submission=self.submission,
        )

    async def _on_event(self, ev: Event) -> bytes:
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
                self.message = bytearray()
            case DataChunk(data=data):
                self.message += data
            case BdatChunk(data=data, last=last):
                self.message += data
                if last:
                    return await self._end_of_message()
            case DataEnd():
                return await self._end_of_message()
            case DataAborted() | Rset():
                self.message = bytearray()
                if isinstance(ev, Rset):
                    self._reset()
            case StartTls():
                return await self._starttls()
            case AuthRequest():
                return self.conn.send(await self._auth(ev))
            case Ehlo() | Helo():
                self._reset()
            case ProtocolViolation(reason=reason):
                log.debug("client %s: %s", self.client, reason)
            case _:
                pass
        return b""

    async def _end_of_message(self) -> bytes:
        envelope = Envelope(
            queue_id=self.queue_id or new_queue_id(),
            session=self._session_info(),
            sender=self.sender,
            recipients=tuple(self.recipients),
            params=self.mail_params,
        )
        message = bytes(self.message)
        self.message = bytearray()
        replies = await self.services.delivery.deliver(envelope, message, per_recipient=self.lmtp)
        self._reset()
        if self.lmtp:
            return self.conn.send_lmtp_replies(replies)
        return self.conn.send(replies[0])

    async def _starttls(self) -> bytes:
        # No await between the 220 and start_tls (which pauses reading at once): the client's
        # ClientHello must not be read by the plaintext stream reader.
        self.writer.write(self.conn.data_to_send())
        assert self.services.tls is not None
        await self.writer.start_tls(self.services.tls, ssl_handshake_timeout=_TLS_TIMEOUT)
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
