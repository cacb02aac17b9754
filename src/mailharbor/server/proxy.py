"""Reading a PROXY protocol v2 header from an asyncio stream (parsing is in
:mod:`mailharbor.proto.proxy`).

Invariants
----------
- Only addresses in the trusted list may (and then must) send a header; :func:`is_trusted`
  decides. The header is read byte-exactly: nothing after it is consumed.
- At most 16 + 65535 bytes are read, within ``timeout`` seconds; anything else is
  :class:`~mailharbor.proto.proxy.ProxyError` or ``TimeoutError`` and the caller closes.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable, Sequence

from mailharbor.proto.proxy import SIGNATURE, ProxyError, ProxyHeader, parse_v2

__all__ = ["ProxyError", "TrustedProxies", "looks_like_proxy", "read_proxy_header"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """The ``smtp.trusted_proxies`` list, parsed once."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks: Sequence[Network] = tuple(
            ipaddress.ip_network(n, strict=False) for n in networks
        )

    def is_trusted(self, address: str) -> bool:
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


async def read_proxy_header(reader: asyncio.StreamReader, timeout: float) -> ProxyHeader:
    """Read exactly one PROXY v2 header. Raises ProxyError, TimeoutError, IncompleteReadError."""
    async with asyncio.timeout(timeout):
        head = await reader.readexactly(16)
        parsed = parse_v2(head)
        if parsed is not None:
            return parsed
        length = int.from_bytes(head[14:16], "big")
        rest = await reader.readexactly(length)
        parsed = parse_v2(head + rest)
        if parsed is None:  # cannot happen: the length was read from the header
            raise ProxyError("incomplete PROXY header")
        return parsed
