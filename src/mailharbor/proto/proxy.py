"""PROXY protocol version 2 header parsing (HAProxy's proxy-protocol.txt, section 2.2), sans-IO.

Invariants
----------
- :func:`parse_v2` never raises anything but :class:`ProxyError` for any input, and never reads
  past the header it reports: ``consumed`` bytes belong to the header, the rest is the client's.
- A header is at most 16 + 65535 bytes; TLVs are skipped, not interpreted.
- ``LOCAL`` (health checks from the proxy itself) and the ``UNSPEC`` family give ``source=None``:
  the connection's own peer address stands.
- Standard library only (an import rule for ``proto/``).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

__all__ = ["SIGNATURE", "ProxyError", "ProxyHeader", "build_v2", "parse_v2"]

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_AF_INET, _AF_INET6, _AF_UNIX = 1, 2, 3


class ProxyError(Exception):
    """Not a valid PROXY v2 header (the message is for logs only)."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed header: ``source``/``dest`` as (ip, port) or None (LOCAL/UNSPEC/UNIX)."""

    consumed: int
    local: bool
    source: tuple[str, int] | None = None
    dest: tuple[str, int] | None = None


def parse_v2(buf: bytes) -> ProxyHeader | None:
    """Parse a PROXY v2 header at the start of ``buf``; None: need more bytes."""
    n = min(len(buf), len(SIGNATURE))
    if buf[:n] != SIGNATURE[:n]:
        raise ProxyError("no PROXY v2 signature")
    if len(buf) < 16:
        return None
    ver_cmd, fam, length = struct.unpack("!BBH", buf[12:16])
    if ver_cmd >> 4 != 2:
        raise ProxyError("unsupported PROXY version")
    cmd = ver_cmd & 0x0F
    if cmd not in (0, 1):
        raise ProxyError("unknown PROXY command")
    total = 16 + length
    if len(buf) < total:
        return None
    body = buf[16:total]
    if cmd == 0:
        return ProxyHeader(total, local=True)
    family, transport = fam >> 4, fam & 0x0F
    if family == 0 or family == _AF_UNIX:
        return ProxyHeader(total, local=False)
    if transport not in (1, 2):
        raise ProxyError("unknown PROXY transport")
    if family == _AF_INET:
        if len(body) < 12:
            raise ProxyError("short PROXY IPv4 addresses")
        src, dst = body[0:4], body[4:8]
        sport, dport = struct.unpack("!HH", body[8:12])
        return ProxyHeader(
            total,
            local=False,
            source=(str(ipaddress.IPv4Address(src)), sport),
            dest=(str(ipaddress.IPv4Address(dst)), dport),
        )
    if family == _AF_INET6:
        if len(body) < 36:
            raise ProxyError("short PROXY IPv6 addresses")
        src, dst = body[0:16], body[16:32]
        sport, dport = struct.unpack("!HH", body[32:36])
        return ProxyHeader(
            total,
            local=False,
            source=(str(ipaddress.IPv6Address(src)), sport),
            dest=(str(ipaddress.IPv6Address(dst)), dport),
        )
    raise ProxyError("unknown PROXY address family")


def build_v2(source: tuple[str, int] | None, dest: tuple[str, int] | None) -> bytes:
    """A PROXY v2 header (PROXY over TCP, or LOCAL when ``source`` is None): for the standby's
    forwarder and tests."""
    if source is None or dest is None:
        return SIGNATURE + struct.pack("!BBH", 0x20, 0, 0)
    s = ipaddress.ip_address(source[0])
    d = ipaddress.ip_address(dest[0])
    if s.version != d.version:
        raise ValueError("source and destination must be the same IP version")
    fam = 0x11 if s.version == 4 else 0x21
    body = s.packed + d.packed + struct.pack("!HH", source[1], dest[1])
    return SIGNATURE + struct.pack("!BBH", 0x21, fam, len(body)) + body
