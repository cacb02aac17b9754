"""The POP3 listeners: asyncio adapters around the sans-IO engine (:mod:`mailharbor.proto.pop3`).

Theory of operation
-------------------
One :class:`Pop3Listener` per configured endpoint: ``pop3.listen`` (port 110, STLS offered when
the service certificate is usable) and ``pop3.listen_tls`` (port 995, implicit TLS). All
listeners of a node share one :class:`Pop3Services`: the store, the node-local maildrop locks,
the :class:`Authenticator`, the per-client :class:`AuthFailures` accounting and the connection
limits.

A session (:class:`_Session`) reads bytes, feeds :class:`Pop3ServerConnection` and answers the
three events that need the application: a login (:class:`AuthRequest`: the AUTH failure delay,
the password check, then :meth:`Maildrop.open`, which locks and snapshots the INBOX), RETR/TOP
(:class:`Retrieve`: the stored message) and QUIT (:class:`Update`: the marked messages are
expunged in one transaction that is durable — on the peer too, with replication — before the
``+OK`` is written).

Invariants
----------
- Deletions happen only in UPDATE: a session that ends any other way (EOF, timeout, a dropped
  connection, shutdown, an error) removes nothing.
- The maildrop's in-use lock is held from a successful login until the session ends (released
  right after UPDATE, before ``+OK``, so a client that reconnects at once is not refused).
- Timeouts: ``timeout`` for the next bytes from the client; then ``-ERR`` and close. Writes are
  bounded by the same timeout.
- Limits: at most ``max_connections`` sessions over all POP3 listeners and
  ``max_connections_per_client`` per client address (IPv6 per /64); more get
  ``-ERR [SYS/TEMP]`` before the greeting.
- PROXY v2: a connection from a ``trusted_proxies`` address must start with a PROXY v2 header and
  its source address is the client; anyone else whose first bytes look like a PROXY header gets
  ``-ERR`` and is closed.
- Stop: the listening sockets close first; every session waiting for a command gets
  ``-ERR [SYS/TEMP] Server shutting down`` and is closed without UPDATE; a session in the middle
  of an UPDATE finishes it (the commit is awaited) within ``stop_grace``.
- Exception text never reaches the wire: a bug while answering gives ``-ERR [SYS/TEMP]`` (and
  closes when no reply is owed) and a log line with the traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mailharbor.proto.pop3 import (
    NEED_DATA,
    AuthRequest,
    ConnectionClosed,
    DropListing,
    Event,
    Pop3ServerConfig,
    Pop3ServerConnection,
    ProtocolViolation,
    Reply,
    Retrieve,
    Sentinel,
    StartTls,
    Update,
    err,
    ok,
)
from mailharbor.proto.smtp import AuthFailures
from mailharbor.server.listener import (
    TLS_HANDSHAKE_TIMEOUT,
    ConnectionLimiter,
    EngineSession,
    Listener,
)
from mailharbor.server.proxy import TrustedProxies
from mailharbor.service.auth import Authenticator, AuthStatus
from mailharbor.service.maildrop import Maildrop, MaildropInUse, MaildropLocks, MessageGone
from mailharbor.store import NotFound, Store, StoreError

__all__ = ["Pop3Listener", "Pop3Options", "Pop3Services"]

log = logging.getLogger("mailharbor.pop3")

R_SHUTDOWN = err("Server shutting down", "SYS/TEMP")
R_TIMEOUT = err("Disconnected for inactivity")
R_BUSY = err("Too many connections, try again later", "SYS/TEMP")
R_PROXY = err("PROXY protocol not accepted from this address")
R_BUG = err("Internal error", "SYS/TEMP")
R_AUTH_FAILED = err("Authentication failed", "AUTH")
R_AUTH_TEMP = err("Temporary authentication failure, try again later", "SYS/TEMP")
R_LOCKED_OUT = err("Too many failed logins, try again later", "SYS/TEMP")
R_IN_USE = err("Mailbox is locked by another POP3 session", "IN-USE")
R_NO_MAILBOX = err("Mailbox unavailable", "SYS/PERM")
R_GONE = err("Message was removed by another session")
R_UNAVAILABLE = err("Message unavailable, try again later", "SYS/TEMP")
R_UPDATE_FAILED = err("Deletions could not be committed; nothing was removed", "SYS/TEMP")
_WRITE_HIGH_WATER = 64 * 1024


@dataclass(frozen=True)
class Pop3Options:
    """The ``[pop3]`` settings the sessions use (see :class:`mailharbor.config.Pop3Config`)."""

    hostname: str
    allow_plaintext_auth: bool = False
    timeout: float = 600.0
    max_connections: int = 1000
    max_connections_per_client: int = 20
    trusted_proxies: tuple[str, ...] = ()
    stop_grace: float = 30.0


@dataclass
class Pop3Services:
    """What every POP3 listener of a node shares."""

    store: Store
    authenticator: Authenticator
    options: Pop3Options
    tls: ssl.SSLContext | None = None
    locks: MaildropLocks = field(default_factory=MaildropLocks)
    auth_failures: AuthFailures = field(default_factory=lambda: AuthFailures(time.monotonic))
    limiter: ConnectionLimiter | None = None
    trusted: TrustedProxies = field(default_factory=lambda: TrustedProxies(()))
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def __post_init__(self) -> None:
        if self.limiter is None:
            o = self.options
            self.limiter = ConnectionLimiter(o.max_connections, o.max_connections_per_client)
        self.trusted = TrustedProxies(self.options.trusted_proxies)


class Pop3Listener(Listener):
    """One listening endpoint: POP3 with STLS (110), or implicit TLS (POP3S, 995)."""

    log = log

    def __init__(
        self, endpoint: str, services: Pop3Services, *, implicit_tls: bool = False
    ) -> None:
        self.services = services
        self.label = "pop3s" if implicit_tls else "pop3"
        assert services.limiter is not None
        super().__init__(
            endpoint,
            trusted=services.trusted,
            limiter=services.limiter,
            tls=services.tls,
            implicit_tls=implicit_tls,
        )

    def __repr__(self) -> str:
        return f"Pop3Listener({self.label}, {self.endpoint})"

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, ``-ERR`` to every session waiting for a command, let an UPDATE in
        flight finish within ``grace`` seconds (default ``stop_grace``), then close."""
        await super().stop(self.services.options.stop_grace if grace is None else grace)

    def _busy_reply(self) -> bytes:
        return R_BUSY.to_bytes()

    async def _session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: str, tls: bool
    ) -> None:
        session = _Session(self, reader, writer, client)
        try:
            await session.run()
        finally:
            session.release()


class _Session(EngineSession[Pop3ServerConnection]):
    """One connection."""

    log = log

    def __init__(
        self,
        listener: Pop3Listener,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: str,
    ) -> None:
        self.listener = listener
        self.services = listener.services
        self.options = listener.services.options
        self.reader = reader
        self.writer = writer
        self.client = client
        self.first_read = True
        self.maildrop: Maildrop | None = None
        cfg = Pop3ServerConfig(
            hostname=self.options.hostname,
            tls_available=self.services.tls is not None,
            allow_plaintext_auth=self.options.allow_plaintext_auth,
        )
        self.conn = Pop3ServerConnection(cfg, tls_active=listener.implicit_tls)

    def release(self) -> None:
        """Close the maildrop (its lock) — without UPDATE."""
        if self.maildrop is not None:
            drop, self.maildrop = self.maildrop, None
            drop.close()
            log.info("%s (%s) logged out", drop.account, self.client)

    # -- I/O ---------------------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        self.writer.write(data)
        # Drain only when the peer is slow to read: a drain yields to the loop, which must not
        # happen between the +OK to STLS and start_tls (see _starttls).
        if self.writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
            await asyncio.wait_for(self.writer.drain(), self.options.timeout)

    async def _read(self) -> bytes | None:
        """The next bytes (``b""`` at EOF), or None after a timeout/stop ``-ERR`` was written."""
        stop = self.listener.stop_future
        if stop.done():
            await self._write(R_SHUTDOWN.to_bytes())
            return None
        read = asyncio.ensure_future(self.reader.read(65536))
        waiters: set[asyncio.Future[object]] = {read, stop}  # type: ignore[arg-type]
        done, _ = await asyncio.wait(
            waiters, timeout=self.options.timeout, return_when="FIRST_COMPLETED"
        )
        if read in done:
            try:
                return read.result()
            except (ConnectionError, OSError):
                return b""
        read.cancel()
        with contextlib.suppress(BaseException):
            await read
        if stop.done():
            await self._write(R_SHUTDOWN.to_bytes())
        else:
            log.info("POP3 session with %s timed out", self.client)
            await self._write(R_TIMEOUT.to_bytes())
        return None

    async def _refuse_proxy(self) -> None:
        await self._write(R_PROXY.to_bytes())

    async def run(self) -> None:
        await self._serve()

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
                if not self.conn.awaiting_reply:
                    await self._write(self.conn.data_to_send() + R_BUG.to_bytes())
                    return True
                out = self.conn.send(R_BUG)
            await self._write(out)
        await self._write(self.conn.data_to_send())
        return self.conn.closing

    # -- events --------------------------------------------------------------------------------

    async def _on_event(self, ev: Event) -> bytes:
        match ev:
            case AuthRequest():
                return await self._login(ev)
            case Retrieve():
                return self.conn.send(self._retrieve(ev))
            case Update(deleted=deleted):
                return self.conn.send(await self._update(deleted))
            case StartTls():
                return await self._starttls()
            case ProtocolViolation(reason=reason):
                log.debug("POP3 client %s: %s", self.client, reason)
            case _:
                pass
        return b""

    async def _login(self, ev: AuthRequest) -> bytes:
        failures = self.services.auth_failures
        if failures.locked_out(self.client):
            return self.conn.send(R_LOCKED_OUT)
        delay = failures.delay(self.client)
        if delay > 0:
            await self.services.sleep(delay)
        if ev.authzid and ev.authzid.lower() != ev.identity.lower():
            failures.record_failure(self.client)
            return self.conn.send(R_AUTH_FAILED)
        result = await self.services.authenticator.verify(ev.identity, ev.password)
        if result.status is AuthStatus.TEMPFAIL:
            return self.conn.send(R_AUTH_TEMP)
        if result.status is not AuthStatus.OK or result.account is None:
            failures.record_failure(self.client)
            log.info("POP3 login failed for %s from %s", ev.identity[:64], self.client)
            return self.conn.send(R_AUTH_FAILED)
        failures.record_success(self.client)
        try:
            drop = Maildrop.open(self.services.store, self.services.locks, result.account)
        except MaildropInUse:
            log.info("POP3 login of %s from %s: mailbox in use", result.account, self.client)
            return self.conn.send(R_IN_USE)
        except NotFound:
            return self.conn.send(R_NO_MAILBOX)
        self.maildrop = drop
        sizes = drop.sizes
        log.info(
            "%s logged in over POP3 from %s: %d messages", drop.account, self.client, len(sizes)
        )
        listing = DropListing(sizes, drop.unique_ids)
        text = f"Logged in, maildrop has {len(sizes)} messages ({sum(sizes)} octets)"
        return self.conn.send(ok(text), maildrop=listing)

    def _retrieve(self, ev: Retrieve) -> Reply:
        assert self.maildrop is not None
        try:
            body = self.maildrop.message(ev.index)
        except MessageGone:
            return R_GONE
        except StoreError:
            log.exception("reading message %d for %s failed", ev.number, self.maildrop.account)
            return R_UNAVAILABLE
        if ev.lines is None:
            return ok(f"{len(body)} octets", body)
        return ok("Top of message follows", body)

    async def _update(self, deleted: tuple[int, ...]) -> Reply:
        drop = self.maildrop
        assert drop is not None
        try:
            removed = await drop.update(deleted)
        except StoreError as e:
            log.error("POP3 UPDATE for %s failed: %s", drop.account, type(e).__name__)
            return R_UPDATE_FAILED
        left = len(drop.messages) - len(deleted)
        log.info("%s: POP3 UPDATE removed %d message(s)", drop.account, removed)
        self.release()
        return ok(f"{self.options.hostname} POP3 server signing off ({left} messages left)")

    async def _starttls(self) -> bytes:
        # No await between the +OK and start_tls (which pauses reading at once): the client's
        # ClientHello must not be read by the plaintext stream reader.
        self.writer.write(self.conn.data_to_send())
        assert self.services.tls is not None
        await self.writer.start_tls(self.services.tls, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        self.conn.starttls_done()
        return b""
