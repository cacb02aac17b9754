"""Where outbound mail for a domain goes: transport map, smarthost, or DNS MX (RFC 5321 §5.1).

Theory of operation
-------------------
:class:`Router` answers ``route(domain)`` with a :class:`Route` — an ordered list of
:class:`Hop` (host, address, port) to try — or raises :class:`RouteError` saying whether the
failure is permanent (the recipients bounce) or temporary (they are deferred).

Order of precedence: a ``queue.transport`` entry for the domain, then ``queue.relayhost``, then
DNS. A transport/relay target is used as given (``host:port``, ``[v6]:port``): no MX lookup, the
host name is resolved by the operating system when connecting.

DNS (dnspython, resolver address and port configurable so tests use a loopback server):

- MX records sorted by preference; hosts of equal preference are shuffled (RFC 5321 §5.1);
  each MX host's A and AAAA records are looked up (IPv4 first) with the same resolver;
- no MX records (NOERROR/NODATA): the domain itself is the one host (the "implicit MX");
- a null MX (RFC 7505: one MX of preference 0 with exchange ".") → permanent failure;
- NXDOMAIN → permanent failure; SERVFAIL, timeouts, no answer from any resolver → temporary;
- MX hosts that have no addresses are skipped; if none has any → temporary failure.

Invariants
----------
- ``route`` never raises anything but :class:`RouteError` (DNS library errors are translated);
- a permanent :class:`RouteError` is returned only for an authoritative "does not exist / does
  not accept mail" (NXDOMAIN, null MX), never for a resolver that did not answer.
"""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.rdata
import dns.rdatatype
import dns.resolver

__all__ = ["Hop", "Route", "RouteError", "Router", "parse_hostport"]

_HOSTPORT = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+))(?::(?P<port>\d+))?$"
)


def parse_hostport(text: str, default_port: int = 25) -> tuple[str, int]:
    """``"host:port"``, ``"host"`` or ``"[v6addr]:port"`` → (host, port). Raises ValueError."""
    m = _HOSTPORT.match(text.strip())
    if m is None:
        raise ValueError(f"not host:port: {text!r}")
    host = m.group("v6") or m.group("host")
    port = int(m.group("port")) if m.group("port") else default_port
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {text!r}")
    return host, port


@dataclass(frozen=True, slots=True)
class Hop:
    """One server to try: ``host`` is the name (for logs, Remote-MTA and TLS SNI), ``address``
    what to connect to (an IP, or the host name itself for transport/relay hops)."""

    host: str
    address: str
    port: int


@dataclass(frozen=True, slots=True)
class Route:
    hops: tuple[Hop, ...]
    relay: bool = False  # True for transport map / relayhost (AUTH may be used)


class RouteError(Exception):
    """No route: ``permanent`` decides bounce vs. defer; ``status`` is the enhanced status
    code and ``text`` the diagnostic (for the DSN and the queue's last detail)."""

    def __init__(self, permanent: bool, status: str, text: str) -> None:
        super().__init__(text)
        self.permanent = permanent
        self.status = status
        self.text = text


@dataclass
class Router:
    """See the module doc. ``nameservers`` empty = the system's resolv.conf."""

    transport: Mapping[str, str] = field(default_factory=dict)
    relayhost: str = ""
    nameservers: Sequence[str] = ()
    dns_port: int = 53
    dns_timeout: float = 10.0
    mx_port: int = 25
    rng: random.Random = field(default_factory=random.Random)
    _resolver: dns.asyncresolver.Resolver | None = field(default=None, init=False, repr=False)

    def resolver(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            if self.nameservers:
                r = dns.asyncresolver.Resolver(configure=False)
                r.nameservers = list(self.nameservers)
                r.port = self.dns_port
            else:
                r = dns.asyncresolver.Resolver()
            r.timeout = self.dns_timeout
            r.lifetime = self.dns_timeout
            self._resolver = r
        return self._resolver

    async def route(self, domain: str) -> Route:
        domain = domain.lower().rstrip(".")
        target = self.transport.get(domain) or self.relayhost
        if target:
            try:
                host, port = parse_hostport(target)
            except ValueError:
                raise RouteError(False, "4.3.5", f"bad transport setting {target!r}") from None
            return Route((Hop(host, host, port),), relay=True)
        return Route(await self._mx_hops(domain))

    async def _query(self, name: str, rdtype: str) -> list[dns.rdata.Rdata] | None:
        """Records of ``rdtype`` for ``name``; None for NODATA; RouteError otherwise."""
        try:
            answer = await self.resolver().resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise RouteError(True, "5.1.2", f"domain {name} does not exist (NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.NoNameservers:
            raise RouteError(
                False, "4.4.3", f"DNS lookup of {rdtype} for {name} failed (SERVFAIL)"
            ) from None
        except dns.exception.Timeout:
            raise RouteError(
                False, "4.4.3", f"DNS lookup of {rdtype} for {name} timed out"
            ) from None
        except dns.exception.DNSException as e:
            raise RouteError(False, "4.4.3", f"DNS lookup of {rdtype} for {name}: {e}") from None
        return list(answer)

    async def _addresses(self, host: str) -> list[str]:
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            pass
        out: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                rrs = await self._query(host, rdtype)
            except RouteError:
                continue
            out.extend(rr.to_text() for rr in rrs or ())
        return out

    async def _mx_hops(self, domain: str) -> tuple[Hop, ...]:
        records = await self._query(domain, "MX")
        if records is None:
            # RFC 5321 §5.1: no MX → the domain itself is the implicit MX.
            addrs = await self._addresses(domain)
            if not addrs:
                raise RouteError(False, "4.4.4", f"{domain} has no MX and no A/AAAA records")
            return tuple(Hop(domain, a, self.mx_port) for a in addrs)
        mxs: list[tuple[int, str]] = []
        for rr in records:
            pref = int(getattr(rr, "preference", 0))
            exchange = str(getattr(rr, "exchange", "")).rstrip(".").lower()
            mxs.append((pref, exchange))
        if any(ex == "" for _, ex in mxs):
            if len(mxs) == 1 and mxs[0][0] == 0:
                raise RouteError(True, "5.1.10", f"{domain} does not accept mail (null MX)")
            mxs = [(p, ex) for p, ex in mxs if ex]
        by_pref: dict[int, list[str]] = {}
        for pref, ex in mxs:
            by_pref.setdefault(pref, []).append(ex)
        hops: list[Hop] = []
        for pref in sorted(by_pref):
            hosts = by_pref[pref]
            self.rng.shuffle(hosts)
            for host in hosts:
                for a in await self._addresses(host):
                    hops.append(Hop(host, a, self.mx_port))
        if not hops:
            raise RouteError(False, "4.4.4", f"no MX host of {domain} has an address")
        return tuple(hops)
