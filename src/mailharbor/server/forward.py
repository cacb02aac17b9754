"""Proxy mode: the standby's mail ports forward connections to the primary (PROXY protocol v2).

Theory of operation
-------------------
In proxy mode (``cluster.proxy``) each node of a pair listens on its own addresses, so clients
and MX records may list both nodes. While a node is **not** serving (secondary, or primary with
its resources stopped) node.py runs one :class:`Forwarder` on the node's configured mail
endpoints instead of the mail listeners; the role controller stops it before the listeners start
on promotion and starts it after they stopped on demotion (DESIGN.md's resource order: the
service address comes before the listeners).

For every accepted connection the forwarder:

1. asks the cluster view whether a primary is known (``primary_known``: the peer is alive,
   primary and runs its resources — :meth:`ClusterManager.peer_serving`);
2. if so, opens a TCP connection to the route's peer endpoint (from ``proxy_source`` when set:
   the address the primary lists in its ``trusted_proxies``), writes one PROXY v2 header naming
   the **client's** address and the address it connected to (``build_v2``), then copies bytes
   both ways unchanged — TLS included: implicit-TLS ports and STARTTLS are terminated by the
   primary, which presents the same service certificate;
3. if no primary is known, or connecting fails (the primary's listeners closing during a
   switchover, a dead primary not yet declared dead), it **holds** the client — nothing is read
   or written — retrying every :data:`RETRY` seconds for at most ``hold`` seconds;
4. if the hold runs out, or the forwarder stops meanwhile (this node is being promoted), it
   refuses in the route's protocol before any greeting: SMTP ``421 4.3.2``, IMAP
   ``* BYE [UNAVAILABLE]``, POP3 ``-ERR [SYS/TEMP]``; an implicit-TLS route is closed (a
   plaintext reply would be garbage to a TLS client).

A watchdog closes the forwarded sessions once no primary has been known for ``hold`` seconds
(a primary that vanished without a FIN — a partition, a power cut — would otherwise leave the
client waiting for a TCP timeout). It never injects bytes into a forwarded session: the stream
belongs to the primary's engine, and a reply mid-DATA or mid-literal would corrupt it.

Invariants
----------
- A client never waits longer than ``hold`` + ``connect_timeout`` without either reaching the
  primary or being refused; a forwarded session never outlives ``hold`` + :data:`RETRY` of an
  unknown primary. Nothing hangs forever.
- The first bytes the primary receives on a forwarded connection are exactly one PROXY v2
  header naming the client as seen by this node; the client's bytes follow unchanged. The
  primary trusts the header only from ``trusted_proxies`` (server/proxy.py), so a forwarder
  whose source address the primary does not trust is refused there, never believed.
- The client's first bytes follow the header at once, on every route: the listeners read the
  header byte-exactly off the socket (server/proxy.py), so an implicit-TLS ClientHello in the
  same segment still reaches their TLS layer.
- The forwarder never reads a client's bytes before the upstream connection exists, so a
  refusal is always the first thing the client sees, and nothing is lost on the way.
- :meth:`Forwarder.stop` closes the listening sockets first, then refuses held clients and
  closes forwarded sessions, and returns only when every session task has ended: the ports are
  free for the node's own listeners when it returns.
- At most ``max_connections`` client connections at once; more are refused at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from mailharbor.proto.proxy import build_v2
from mailharbor.server.listener import split_endpoint

__all__ = ["RETRY", "ForwardOptions", "Forwarder", "Route", "RouteKind"]

log = logging.getLogger("mailharbor.forward")

#: Seconds between two checks for a primary while a client is held.
RETRY = 0.1
_BUFFER = 64 * 1024


class RouteKind(Enum):
    """The protocol of a forwarded endpoint: what a refused client is told."""

    SMTP = "smtp"
    IMAP = "imap"
    POP3 = "pop3"
    TLS = "tls"  # implicit TLS (submissions, imaps, pop3s): refused by closing


@dataclass(frozen=True)
class Route:
    """One forwarded endpoint: ``local`` (this node's listener endpoint) → ``peer``."""

    local: str
    peer: str
    kind: RouteKind


@dataclass(frozen=True)
class ForwardOptions:
    """Tunables (``cluster.proxy_hold``, ``cluster.proxy_source``)."""

    hold: float = 3.0
    source: str = ""
    connect_timeout: float = 2.0
    max_connections: int = 1000


def refusal(kind: RouteKind, hostname: str) -> bytes:
    """What a client of ``kind`` is told when no primary can take it (empty: just close)."""
    if kind is RouteKind.SMTP:
        return (
            f"421 4.3.2 {hostname} Service not available, no primary node; try later\r\n".encode()
        )
    if kind is RouteKind.IMAP:
        return b"* BYE [UNAVAILABLE] No primary node, try again later\r\n"
    if kind is RouteKind.POP3:
        return b"-ERR [SYS/TEMP] No primary node, try again later\r\n"
    return b""


def _ip(addr: object) -> tuple[str, int] | None:
    """(ip, port) of a socket address, IPv4-mapped IPv6 unmapped; None if not an IP one."""
    if not isinstance(addr, tuple) or len(addr) < 2:
        return None
    try:
        ip = ipaddress.ip_address(str(addr[0]).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(addr[1])


def proxy_header(client: object, local: object) -> bytes:
    """The PROXY v2 header for a client at ``client`` that connected to ``local`` (LOCAL
    when either is not an IP address or the families differ)."""
    src, dst = _ip(client), _ip(local)
    if src is not None and dst is not None:
        with contextlib.suppress(ValueError):
            return build_v2(src, dst)
    return build_v2(None, None)


class _Session:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.client = writer
        self.upstream: asyncio.StreamWriter | None = None

    def abort(self) -> None:
        """Close a forwarded session at once (a held one is refused by its task instead)."""
        if self.upstream is None:
            return
        for w in (self.client, self.upstream):
            w.transport.abort()


class Forwarder:
    """Listens on the routes' local endpoints and forwards; see the module docstring."""

    def __init__(
        self,
        routes: Sequence[Route],
        primary_known: Callable[[], bool],
        *,
        hostname: str,
        options: ForwardOptions | None = None,
    ) -> None:
        self.routes = tuple(routes)
        self.primary_known = primary_known
        self.hostname = hostname
        self.options = options or ForwardOptions()
        self.forwarded = 0
        self.refused = 0
        self.stopping = False
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._sessions: set[_Session] = set()
        self._stop_event = asyncio.Event()
        self._watchdog: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"Forwarder({', '.join(f'{r.local}->{r.peer}' for r in self.routes)})"

    def status(self) -> dict[str, object]:
        return {
            "routes": [
                {"local": r.local, "peer": r.peer, "kind": r.kind.value} for r in self.routes
            ],
            "sessions": len(self._sessions),
            "forwarded": self.forwarded,
            "refused": self.refused,
        }

    async def start(self) -> None:
        """Bind every route's local endpoint. Raises OSError (nothing left bound)."""
        try:
            for route in self.routes:
                host, port = split_endpoint(route.local)
                server = await asyncio.start_server(
                    functools.partial(self._accept, route),
                    host,
                    port,
                    reuse_address=True,
                )
                self._servers.append(server)
        except BaseException:
            await self.stop()
            raise
        self._watchdog = asyncio.get_running_loop().create_task(
            self._watch(), name="forward-watchdog"
        )
        log.info(
            "proxy mode: forwarding %s to the primary", ", ".join(r.local for r in self.routes)
        )

    async def stop(self) -> None:
        """Close the listening sockets, refuse held clients, close forwarded sessions; return
        when every session has ended (idempotent)."""
        self.stopping = True
        self._stop_event.set()
        for server in self._servers:
            server.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        for s in list(self._sessions):
            s.abort()
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=5)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        if self._servers:
            self._servers = []
            log.info("proxy mode: stopped forwarding")

    async def _watch(self) -> None:
        """Close forwarded sessions once no primary has been known for ``hold`` seconds."""
        loop = asyncio.get_running_loop()
        lost_since: float | None = None
        while True:
            await asyncio.sleep(RETRY)
            if self.primary_known():
                lost_since = None
                continue
            now = loop.time()
            if lost_since is None:
                lost_since = now
            elif now - lost_since >= self.options.hold and any(
                s.upstream is not None for s in self._sessions
            ):
                log.warning(
                    "proxy mode: no primary for %.1f s, closing the forwarded sessions",
                    now - lost_since,
                )
                for s in list(self._sessions):
                    s.abort()
                lost_since = now

    async def _accept(
        self, route: Route, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        session = _Session(writer)
        self._sessions.add(session)
        try:
            await self._serve(route, session, reader, writer)
        except Exception:
            log.exception("proxy mode: forwarding a connection on %s failed", route.local)
        finally:
            self._sessions.discard(session)
            self._tasks.discard(task)
            for w in (writer, session.upstream):
                if w is not None:
                    w.close()

    async def _refuse(self, route: Route, writer: asyncio.StreamWriter, client: str) -> None:
        self.refused += 1
        log.info("proxy mode: refused %s on %s: no primary node", client, route.local)
        data = refusal(route.kind, self.hostname)
        if data:
            with contextlib.suppress(Exception):
                writer.write(data)
                await asyncio.wait_for(writer.drain(), 2)

    async def _connect(
        self, route: Route
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The primary, within the hold time; None: refuse."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.hold
        host, port = split_endpoint(route.peer)
        source = (self.options.source, 0) if self.options.source else None
        while not self.stopping:
            if self.primary_known():
                timeout = max(0.05, min(self.options.connect_timeout, deadline - loop.time()))
                try:
                    return await asyncio.wait_for(
                        asyncio.open_connection(host or "127.0.0.1", port, local_addr=source),
                        timeout,
                    )
                except (OSError, TimeoutError) as e:
                    log.debug("proxy mode: connecting to %s failed: %s", route.peer, e)
            if loop.time() >= deadline:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), RETRY)
        return None

    async def _serve(
        self,
        route: Route,
        session: _Session,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if peer else "unknown"
        if len(self._sessions) > self.options.max_connections:
            await self._refuse(route, writer, client)
            return
        upstream = await self._connect(route)
        if upstream is None:
            await self._refuse(route, writer, client)
            return
        up_reader, up_writer = upstream
        session.upstream = up_writer
        if self.stopping:
            return
        up_writer.write(proxy_header(peer, writer.get_extra_info("sockname")))
        self.forwarded += 1
        log.debug("proxy mode: %s on %s forwarded to %s", client, route.local, route.peer)
        pipes = [
            asyncio.ensure_future(_pipe(reader, up_writer)),
            asyncio.ensure_future(_pipe(up_reader, writer)),
        ]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for p in pipes:
                p.cancel()
            await asyncio.wait(pipes)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF or an error, with backpressure."""
    with contextlib.suppress(OSError, ConnectionError):
        while data := await reader.read(_BUFFER):
            writer.write(data)
            await writer.drain()
