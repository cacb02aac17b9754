"""What every mail listener (SMTP/LMTP, IMAP, POP3) shares: binding, stopping, and what happens
to a new connection before its protocol starts. :class:`Listener` tracks the session task until the
socket is closed, finds the client's address (the peer's, or the one a trusted proxy's PROXY v2
header names), applies the connection limits, does the implicit-TLS handshake, and then hands the
connection to the protocol's session (:meth:`Listener._session`).

Invariants
----------
- A session task stays in its listener's task set until its socket is closed, so the listener's
  ``stop()`` awaits (or cancels) it and no task outlives ``stop()``.
- An exception escaping a session is logged with its traceback, never sent to the client.
- A trusted peer must send a valid PROXY v2 header; without one the connection is refused
  (:func:`client_address` returns None and the caller closes).
- Limits: a connection over :class:`ConnectionLimiter`'s global or per-client count gets the
  protocol's "busy" reply before any greeting and is closed; a session holds its slot until it
  ends. Connections accepted after ``stop()`` began are closed without a word.
- Stop: the listening sockets close first and ``stop_future`` is set (sessions watch it and say
  goodbye in their protocol's words); the sessions get until the grace period ends, then are
  cancelled.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import ssl
import stat
from collections import Counter
from collections.abc import Awaitable
from typing import ClassVar, Generic, Protocol, TypeVar

from mailharbor.proto.proxy import ProxyError
from mailharbor.proto.smtp import address_key
from mailharbor.server.proxy import (
    TrustedProxies,
    looks_like_proxy,
    proxy_aware,
    read_proxy_header,
)

__all__ = [
    "PROXY_TIMEOUT",
    "TLS_HANDSHAKE_TIMEOUT",
    "ConnectionLimiter",
    "EngineSession",
    "Listener",
    "client_address",
    "run_tracked",
    "split_endpoint",
]

PROXY_TIMEOUT = 10.0
"""Seconds a trusted proxy has to send its whole PROXY v2 header."""
TLS_HANDSHAKE_TIMEOUT = 30.0
"""Seconds a client has to finish a TLS handshake (implicit TLS or after STARTTLS/STLS)."""


def split_endpoint(endpoint: str) -> tuple[str | None, int]:
    """``"host:port"`` / ``"[v6]:port"`` / ``":port"`` → (host or None for all, port)."""
    host, _, port = endpoint.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return (host or None), int(port)


class ConnectionLimiter:
    """Counts open sessions globally and per client address key (IPv6 per /64, see
    :func:`~mailharbor.proto.smtp.address_key`)."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.open = 0
        self._by_client: Counter[str] = Counter()

    def acquire(self, client: str) -> bool:
        """Take a slot for ``client``; False (nothing taken) when a limit is reached."""
        key = address_key(client)
        if self.open >= self.total or self._by_client[key] >= self.per_client:
            return False
        self.open += 1
        self._by_client[key] += 1
        return True

    def release(self, client: str) -> None:
        """Give back a slot taken by :meth:`acquire`."""
        key = address_key(client)
        self.open -= 1
        self._by_client[key] -= 1
        if self._by_client[key] <= 0:
            del self._by_client[key]


async def run_tracked(
    tasks: set[asyncio.Task[None]],
    session: Awaitable[None],
    writer: asyncio.StreamWriter,
    log: logging.Logger,
    what: str,
) -> None:
    """Run ``session`` as the current task, registered in ``tasks`` until ``writer`` is closed."""
    task = asyncio.current_task()
    assert task is not None
    tasks.add(task)
    try:
        await session
    except Exception:
        log.exception("%s session failed", what)
    finally:
        try:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)
        finally:
            tasks.discard(task)


async def client_address(
    writer: asyncio.StreamWriter,
    trusted: TrustedProxies,
    log: logging.Logger,
    *,
    peer: str,
    implicit_tls: bool,
) -> str | None:
    """The client's address: ``peer``, or, when ``peer`` is a trusted proxy, the source its PROXY
    v2 header names (the proxy's own address for a LOCAL header). None: a trusted peer sent no
    valid header in time; logged, the caller closes.

    An implicit-TLS listener leaves reading paused: ``start_tls`` resumes it, so a ClientHello
    in the same segment as the header goes to the TLS layer."""
    if not trusted.is_trusted(peer):
        return peer
    try:
        header = await read_proxy_header(writer, PROXY_TIMEOUT, resume=not implicit_tls)
    except (ProxyError, TimeoutError, asyncio.IncompleteReadError, OSError) as e:
        log.warning("refused %s: bad PROXY header (%s)", peer, type(e).__name__)
        return None
    return header.source[0] if header.source is not None else peer


class _Engine(Protocol):
    def data_to_send(self) -> bytes: ...

    def receive_data(self, data: bytes) -> None: ...


_E = TypeVar("_E", bound=_Engine)


class EngineSession(abc.ABC, Generic[_E]):
    """The I/O loop every session around a sans-IO protocol engine (SMTP/LMTP, IMAP, POP3)
    shares, as :meth:`_serve`: the greeting, then in turn every event the engine has
    (:meth:`_pump`, True when the session is over) and the client's next bytes (:meth:`_read`,
    None when the session is over) into the engine. A first read that looks like a PROXY
    header (the client's address is not trusted to send one, or it would have been read
    already) is never fed to the engine: it is logged on ``log`` and refused in the protocol's
    words (:meth:`_refuse_proxy`). A broken connection ends the loop quietly."""

    conn: _E
    client: str
    first_read: bool
    log: ClassVar[logging.Logger]

    async def _serve(self) -> None:
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
                        self.log.warning(
                            "refused %s: PROXY header from an untrusted address", self.client
                        )
                        await self._refuse_proxy()
                        return
                self.conn.receive_data(data)
        except (ConnectionError, TimeoutError, OSError, ssl.SSLError):
            return

    @abc.abstractmethod
    async def _pump(self) -> bool: ...

    @abc.abstractmethod
    async def _read(self) -> bytes | None: ...

    @abc.abstractmethod
    async def _write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def _refuse_proxy(self) -> None: ...


class Listener(abc.ABC):
    """One listening endpoint of one protocol; see the module docstring.

    A subclass sets ``log`` and ``label`` (for log lines), implements :meth:`_session` (run one
    connection's protocol) and :meth:`_busy_reply` (the bytes a connection over the limits
    gets), and may extend :meth:`_stopping` (tell its sessions the grace deadline). ``endpoint``
    is ``host:port`` (TCP), or, with ``unix``, a socket path."""

    log: logging.Logger
    label: str

    def __init__(
        self,
        endpoint: str,
        *,
        trusted: TrustedProxies,
        limiter: ConnectionLimiter,
        tls: ssl.SSLContext | None,
        implicit_tls: bool,
        unix: bool = False,
    ) -> None:
        if implicit_tls and tls is None:
            raise ValueError(f"the implicit-TLS {self.label} listener needs the TLS certificate")
        self.endpoint = endpoint
        self.trusted = trusted
        self.limiter = limiter
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.unix = unix
        self.bound: list[tuple[str, int]] = []
        self.stopping = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop: asyncio.Future[None] | None = None

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
            self._server = await asyncio.start_server(
                proxy_aware(self._accept, self.trusted), host, port, reuse_address=True
            )
            for s in self._server.sockets:
                addr = s.getsockname()
                self.bound.append((str(addr[0]), int(addr[1])))
        self.log.info("%s listener on %s", self.label, self.endpoint)

    async def stop(self, grace: float) -> None:
        """Stop accepting, set :attr:`stop_future`, give the sessions ``grace`` seconds (plus
        5 s to write their goodbyes), cancel what is left, remove a Unix socket."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(None)
        self._stopping(asyncio.get_running_loop().time() + grace)
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=grace + 5)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self.unix:
            with contextlib.suppress(OSError):
                os.unlink(self.endpoint)
        self.log.info("%s listener on %s stopped", self.label, self.endpoint)

    @property
    def stop_future(self) -> asyncio.Future[None]:
        """Done once :meth:`stop` began."""
        assert self._stop is not None
        return self._stop

    def _stopping(self, deadline: float) -> None:  # noqa: B027 - optional hook, no-op default
        """Hook: the listener stops; sessions may finish their work until ``deadline`` (loop
        time). Sessions that only watch :attr:`stop_future` need nothing here."""

    @abc.abstractmethod
    def _busy_reply(self) -> bytes:
        """What a connection over the limits gets before it is closed (the protocol's words)."""

    @abc.abstractmethod
    async def _session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: str, tls: bool
    ) -> None:
        """Run one connection's protocol until it ends (TLS already set up when ``tls``)."""

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await run_tracked(self._tasks, self._serve(reader, writer), writer, self.log, self.label)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.unix:
            peer = "unix"
        else:
            name = writer.get_extra_info("peername")
            peer = str(name[0]) if name else "unknown"
        client = await client_address(
            writer, self.trusted, self.log, peer=peer, implicit_tls=self.implicit_tls
        )
        if client is None or self.stopping:
            return
        if not self.limiter.acquire(client):
            self.log.warning("refused %s on %s: too many connections", client, self.label)
            with contextlib.suppress(Exception):
                writer.write(self._busy_reply())
                await asyncio.wait_for(writer.drain(), 5)
            return
        try:
            if self.implicit_tls:
                assert self.tls is not None
                try:
                    await writer.start_tls(self.tls, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
                except (OSError, ssl.SSLError, TimeoutError) as e:
                    self.log.info("TLS handshake with %s failed: %s", client, type(e).__name__)
                    return
            await self._session(reader, writer, client, self.implicit_tls)
        finally:
            self.limiter.release(client)
