"""The client's name for ``Received:``: a reverse DNS lookup confirmed by a forward one.

Theory of operation
-------------------
:meth:`ReverseResolver.lookup` answers an IP address with a host name or ``"unknown"``, the way
Postfix's smtpd names its clients: the PTR names of the address are looked up, and a name counts
only if its own A/AAAA records contain the address again (forward-confirmed reverse DNS), so a
client that controls its PTR record cannot claim someone else's name. The first confirmed name
wins; otherwise the client is ``unknown``.

Two back ends: with ``nameservers`` (``smtp.rdns_resolver = "ip:port"``) dnspython asks that
server (tests use a loopback one); without, the operating system resolves (``getnameinfo`` and
``getaddrinfo`` in the event loop's executor), which honours ``/etc/hosts`` and nsswitch as
Postfix does.

Answers (names and ``unknown`` alike) are cached per address for ``cache_seconds`` (60 s, at
most ``cache_size`` addresses, least recently used dropped first), as a local caching resolver
would: a client opening one connection per message costs one lookup a minute, not one each.

Invariants
----------
- ``lookup`` never raises (cancellation aside) and never takes longer than ``timeout`` seconds:
  every failure, SERVFAIL, NXDOMAIN, timeout or unconfirmed name is ``"unknown"``.
- The returned name is a syntactically plain host name (letters, digits, ``-``, ``.``), lower
  case, without the trailing dot; anything else is ``"unknown"``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Sequence

import dns.asyncresolver
import dns.exception
import dns.resolver
import dns.reversename

__all__ = ["UNKNOWN", "ReverseResolver"]

UNKNOWN = "unknown"
_NAME_RE = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_MAX_NAMES = 4  # PTR names tried (Postfix looks at one; a few cost little)


class ReverseResolver:
    """See the module docstring."""

    def __init__(
        self,
        *,
        nameservers: Sequence[str] = (),
        port: int = 53,
        timeout: float = 2.0,
        cache_seconds: float = 60.0,
        cache_size: int = 4096,
    ) -> None:
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._resolver: dns.asyncresolver.Resolver | None = None
        if nameservers:
            r = dns.asyncresolver.Resolver(configure=False)
            r.nameservers = list(nameservers)
            r.port = port
            r.lifetime = timeout
            r.timeout = timeout
            self._resolver = r

    def cached(self, ip: str) -> str | None:
        """The cached answer for ``ip``, if any (no lookup)."""
        hit = self._cache.get(ip)
        if hit is None:
            return None
        if hit[0] < time.monotonic():
            del self._cache[ip]
            return None
        self._cache.move_to_end(ip)
        return hit[1]

    async def lookup(self, ip: str) -> str:
        """The confirmed name of ``ip``, or ``"unknown"``."""
        hit = self.cached(ip)
        if hit is not None:
            return hit
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return UNKNOWN
        try:
            async with asyncio.timeout(self.timeout):
                if self._resolver is not None:
                    name = await self._dns_lookup(addr)
                else:
                    name = await self._system_lookup(addr)
        except (TimeoutError, OSError, dns.exception.DNSException, UnicodeError, ValueError):
            name = UNKNOWN
        if self.cache_seconds > 0:
            self._cache[ip] = (time.monotonic() + self.cache_seconds, name)
            self._cache.move_to_end(ip)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return name

    async def _dns_lookup(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
        r = self._resolver
        assert r is not None
        try:
            answer = await r.resolve(dns.reversename.from_address(str(addr)), "PTR")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
            return UNKNOWN
        rtype = "A" if addr.version == 4 else "AAAA"
        for rr in list(answer)[:_MAX_NAMES]:
            name = str(rr.to_text()).rstrip(".").lower()
            if not _NAME_RE.match(name):
                continue
            try:
                fwd = await r.resolve(name, rtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
                continue
            if any(ipaddress.ip_address(a.to_text()) == addr for a in fwd):
                return name
        return UNKNOWN

    async def _system_lookup(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
        loop = asyncio.get_running_loop()
        try:
            host, _ = await loop.getnameinfo((str(addr), 0), socket.NI_NAMEREQD)
        except (socket.gaierror, OSError):
            return UNKNOWN
        name = host.rstrip(".").lower()
        if not _NAME_RE.match(name):
            return UNKNOWN
        family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
        try:
            infos = await loop.getaddrinfo(name, None, family=family, type=socket.SOCK_STREAM)
        except (socket.gaierror, OSError):
            return UNKNOWN
        for info in infos:
            if ipaddress.ip_address(str(info[4][0]).split("%")[0]) == addr:
                return name
        return UNKNOWN
