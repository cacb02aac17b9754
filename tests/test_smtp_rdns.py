"""Reverse DNS for ``Received:`` against tests/dnsserver.py's loopback server (PTR records):
forward-confirmed names, unknown on NXDOMAIN/SERVFAIL/unconfirmed, a silent resolver never holds
a session longer than ``rdns_timeout``; the lookup starts at connect."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dnsserver import LoopbackDns
from mailharbor.server.smtp import ListenerKind
from mailharbor.service.rdns import ReverseResolver
from test_smtp_limits import LimitHarness, connect
from test_smtp_server import msg, read_replies

pytestmark = pytest.mark.timeout(60)


# 127.0.0.2 is the harness's trusted PROXY address: clients here use 127.0.0.5-8.


@pytest.fixture
def dns() -> Iterator[LoopbackDns]:
    server = LoopbackDns().start()
    server.add("5.0.0.127.in-addr.arpa", "PTR", "client.example.net.")
    server.add("client.example.net", "A", "127.0.0.5")
    server.add("6.0.0.127.in-addr.arpa", "PTR", "liar.example.net.")
    server.add("liar.example.net", "A", "192.0.2.99")  # does not confirm 127.0.0.6
    server.servfail.add("7.0.0.127.in-addr.arpa")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def silent() -> Iterator[int]:
    """A UDP port that never answers (a DNS server that is down or dropping)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def test_resolver_confirms_names(dns: LoopbackDns, silent: int) -> None:
    async def go() -> list[str]:
        r = ReverseResolver(nameservers=["127.0.0.1"], port=dns.port, timeout=2)
        ips = ("127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.8", "not-an-ip")
        return [await r.lookup(ip) for ip in ips]

    assert asyncio.run(go()) == ["client.example.net", "unknown", "unknown", "unknown", "unknown"]

    async def cached() -> tuple[str, str | None, int]:
        r = ReverseResolver(nameservers=["127.0.0.1"], port=dns.port, timeout=2)
        first = await r.lookup("127.0.0.5")
        before = len(dns.queries)
        await r.lookup("127.0.0.5")
        return first, r.cached("127.0.0.5"), len(dns.queries) - before

    assert asyncio.run(cached()) == ("client.example.net", "client.example.net", 0)

    async def slow() -> tuple[str, float]:
        r = ReverseResolver(nameservers=["127.0.0.1"], port=silent, timeout=0.3)
        t0 = time.monotonic()
        name = await r.lookup("127.0.0.5")
        return name, time.monotonic() - t0

    name, took = asyncio.run(slow())
    assert name == "unknown" and took < 1.0


def harness(name: str, **options: Any) -> tuple[LimitHarness, Path]:
    root = Path(tempfile.mkdtemp(prefix=name + "-"))
    return LimitHarness(root, reverse_dns=True, **options), root


def received_of(h: LimitHarness, subject: str) -> bytes:
    for body in h.bodies("alice@example.org"):
        if f"Subject: {subject}".encode() in body:
            return body.split(b"\r\n\tby ", 1)[0]
    raise AssertionError(f"no message {subject!r}")


def send(h: LimitHarness, source: str, subject: str) -> float:
    """One message from ``source``; seconds from connecting to the 250 after the data."""
    t0 = time.monotonic()
    s = connect(h, ListenerKind.MX, source)
    try:
        read_replies(s, 1)
        s.sendall(b"HELO helo.example\r\nMAIL FROM:<a@remote.example>\r\n")
        s.sendall(b"RCPT TO:<alice@example.org>\r\nDATA\r\n")
        assert [r[:3] for r in read_replies(s, 4)] == [b"250", b"250", b"250", b"354"]
        s.sendall(msg(subject) + b".\r\n")
        assert read_replies(s, 1)[0][:3] == b"250"
        took = time.monotonic() - t0
        s.sendall(b"QUIT\r\n")
        read_replies(s, 1)
        return took
    finally:
        s.close()


def test_received_names_the_client(dns: LoopbackDns, unique_name: str) -> None:
    h, root = harness(unique_name, rdns_resolver=f"127.0.0.1:{dns.port}", rdns_timeout=2)
    try:
        send(h, "127.0.0.5", "named")
        send(h, "127.0.0.6", "liar")
        send(h, "127.0.0.7", "servfail")
        assert received_of(h, "named").endswith(
            b"Received: from helo.example (client.example.net [127.0.0.5])"
        )
        assert received_of(h, "liar").endswith(b"(unknown [127.0.0.6])")
        assert received_of(h, "servfail").endswith(b"(unknown [127.0.0.7])")
        assert ("5.0.0.127.in-addr.arpa", "PTR") in dns.queries
    finally:
        h.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_silent_resolver_delays_a_session_at_most_the_timeout(
    silent: int, unique_name: str
) -> None:
    h, root = harness(unique_name, rdns_resolver=f"127.0.0.1:{silent}", rdns_timeout=0.6)
    try:
        took = send(h, "127.0.0.5", "slow")
        assert 0.5 <= took < 2.0, took  # held at the DATA for what is left of the 0.6 s
        assert received_of(h, "slow").endswith(b"(unknown [127.0.0.5])")
        # A client that is slower than the timeout is not held at all.
        s = connect(h, ListenerKind.MX, "127.0.0.8")  # not cached: its lookup runs out
        try:
            read_replies(s, 1)
            time.sleep(0.8)
            t0 = time.monotonic()
            s.sendall(b"HELO c\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.org>\r\n")
            s.sendall(b"DATA\r\n" + msg("late") + b".\r\n")
            assert [r[:3] for r in read_replies(s, 5)] == [b"250"] * 3 + [b"354", b"250"]
            assert time.monotonic() - t0 < 0.4
        finally:
            s.close()
    finally:
        h.stop()
        shutil.rmtree(root, ignore_errors=True)
