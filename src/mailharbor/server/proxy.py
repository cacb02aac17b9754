"""Reading a PROXY protocol v2 header off a freshly accepted connection (parsing is in
:mod:`mailharbor.proto.proxy`).

Invariants
----------
- Only addresses in the trusted list may (and then must) send a header; :func:`is_trusted`
  decides. The header is read byte-exactly: nothing after it is consumed.
- The header is read from the socket itself, never through the transport: the listeners pass
  their connection callback through :func:`proxy_aware`, which pauses the new transport's reading
  (before it ever reads) for a trusted peer, and :func:`read_proxy_header` receives exactly the
  16-byte fixed part and then exactly the length it announces. Whatever the client sent in the
  same segment (an implicit-TLS ClientHello) stays in the kernel for the transport — or the TLS
  layer a ``start_tls`` puts on it — to read.
- At most 16 + 65535 bytes are read, within ``timeout`` seconds; anything else is
  :class:`~mailharbor.proto.proxy.ProxyError` or ``TimeoutError`` (or ``IncompleteReadError`` at
  EOF) and the caller closes. On a ProxyError, what the client already sent after the bad
  header is discarded first (so the close is not a reset).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence

from mailharbor.proto.proxy import SIGNATURE, ProxyError, ProxyHeader, parse_v2

__all__ = [
    "ProxyError",
    "TrustedProxies",
    "looks_like_proxy",
    "peer_address",
    "proxy_aware",
    "read_proxy_header",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ConnectedCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class TrustedProxies:
    """The ``smtp.trusted_proxies`` list, parsed once."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks: Sequence[Network] = tuple(
            ipaddress.ip_network(n, strict=False) for n in networks
        )

    def is_trusted(self, address: str) -> bool:
        """``address`` (text) is in one of the networks (an IPv4-mapped IPv6 address counts as
        its IPv4 address); False for anything that is not an IP address."""
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == n.version and ip in n for n in self.networks)


def looks_like_proxy(data: bytes) -> bool:
    """The first bytes from a client look like a PROXY v2 (or v1) header."""
    return data.startswith(SIGNATURE[:5]) or data.startswith(b"PROXY ")


def peer_address(writer: asyncio.StreamWriter) -> str:
    """The connection's peer address as text (``"unknown"`` when the socket has none)."""
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if peer else "unknown"


def _read_side(writer: asyncio.StreamWriter) -> asyncio.ReadTransport:
    transport = writer.transport
    assert isinstance(transport, asyncio.ReadTransport)  # a socket transport is both
    return transport


def proxy_aware(callback: ConnectedCallback, trusted: TrustedProxies) -> ConnectedCallback:
    """Wrap a ``start_server`` connection callback so that a trusted peer's transport does not
    read before :func:`read_proxy_header` has taken the header off the socket.

    The wrapper is a plain function: ``asyncio`` calls it from the protocol's
    ``connection_made``, before the transport first registers for reading, so pausing there
    means not one byte reaches the ``StreamReader`` until the header has been received."""

    def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Awaitable[None]:
        if trusted.is_trusted(peer_address(writer)):
            _read_side(writer).pause_reading()
        return callback(reader, writer)

    return accepted


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            raise asyncio.IncompleteReadError(data, n)
        data += chunk
    return data


def _discard_pending(sock: socket.socket) -> None:
    """Drop what the refused client already sent (without waiting for more), so that closing
    the connection is a FIN and not a reset that could cut off a refusal written before it."""
    with contextlib.suppress(OSError):
        for _ in range(16):
            if not sock.recv(65536):
                return


async def read_proxy_header(
    writer: asyncio.StreamWriter, timeout: float, *, resume: bool = True
) -> ProxyHeader:
    """Read exactly one PROXY v2 header off the socket of a connection accepted through
    :func:`proxy_aware` (its transport paused). Then, unless ``resume`` is false (the caller
    goes straight to ``start_tls``, which resumes reading itself), the transport reads again.
    Raises ProxyError, TimeoutError, IncompleteReadError, OSError."""
    loop = asyncio.get_running_loop()
    # A duplicate of the descriptor: the transport keeps owning (and closing) the original.
    sock: socket.socket = writer.get_extra_info("socket").dup()
    try:
        sock.setblocking(False)
        async with asyncio.timeout(timeout):
            head = await _recv_exactly(loop, sock, 16)
            parsed = parse_v2(head)
            if parsed is not None:
                return parsed
            length = int.from_bytes(head[14:16], "big")
            rest = await _recv_exactly(loop, sock, length)
            parsed = parse_v2(head + rest)
            if parsed is None:  # cannot happen: the length was read from the header
                raise ProxyError("incomplete PROXY header")
            return parsed
    except ProxyError:
        _discard_pending(sock)
        raise
    finally:
        sock.close()
        if resume and not writer.transport.is_closing():
            _read_side(writer).resume_reading()
