"""A small loopback DNS server for tests (dnslib, UDP on 127.0.0.1, a random port).

Invariants: it answers only from its in-memory ``records`` table; a name in ``servfail`` gets
SERVFAIL, a name neither in ``records`` nor under a known name gets NXDOMAIN, a known name
without records of the asked type gets NOERROR with no answer (NODATA). It runs in a daemon
thread and is stopped by :meth:`LoopbackDns.stop` (use it as a context manager).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from dnslib import AAAA, MX, PTR, QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSServer


class _Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, owner: LoopbackDns) -> None:
        self.owner = owner

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        self.owner.queries.append((qname, qtype))
        if qname in self.owner.servfail:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        recs = self.owner.records.get(qname)
        if recs is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for rtype, value in recs:
            if rtype != qtype:
                continue
            if rtype == "MX":
                pref, host = value.split(None, 1)
                rdata: Any = MX(host.strip() or ".", int(pref))
            elif rtype == "A":
                rdata = A(value)
            elif rtype == "AAAA":
                rdata = AAAA(value)
            elif rtype == "PTR":
                rdata = PTR(value)
            else:
                continue
            reply.add_answer(RR(qname, getattr(QTYPE, rtype), rdata=rdata, ttl=60))
        return reply


class LoopbackDns:
    """``records``: name → [(type, value)], value "10 mx.example" for MX ("0 ." = null MX);
    PTR records under ``in-addr.arpa``/``ip6.arpa`` names (e.g. ``2.0.0.127.in-addr.arpa``)."""

    def __init__(self) -> None:
        self.records: dict[str, list[tuple[str, str]]] = {}
        self.servfail: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self._server = DNSServer(_Resolver(self), port=0, address="127.0.0.1", logger=_Quiet())
        self.port: int = self._server.server.server_address[1]

    def add(self, name: str, rtype: str, value: str) -> None:
        self.records.setdefault(name.lower(), []).append((rtype, value))

    def start(self) -> LoopbackDns:
        self._server.start_thread()
        return self

    def stop(self) -> None:
        self._server.stop()
        self._server.server.server_close()

    def __enter__(self) -> LoopbackDns:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class _Quiet:
    """dnslib's logger interface, silent."""

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None
