"""Proxy mode with real processes on loopback: two ``mailharbor serve`` nodes, a witness, the
cluster manager, and ``cluster.proxy`` routes on both nodes.

Each node has its own SMTP, IMAP and POP3 ports. The standby forwards them to the primary from
``127.0.0.2`` (``cluster.proxy_source``), which is the only address the primary lists in its
``trusted_proxies``: clients on ``127.0.0.1`` still talk to the primary directly. Clients here
connect from ``127.0.0.5``, so the address the primary logs must be that one, carried by the
PROXY v2 header, not the forwarder's.

Also unit tests of the forwarder in-process (refusals, hold, the PROXY header).
"""

from __future__ import annotations

import asyncio
import imaplib
import json
import poplib
import secrets
import smtplib
import socket
import threading
import time
import tomllib
from collections.abc import Iterator
from typing import Any

import pytest

from mailharbor.proto.proxy import parse_v2
from mailharbor.server.forward import Forwarder, ForwardOptions, Route, RouteKind
from servenode import ServeNode, free_port
from test_cluster_nodes import WitnessProc, cstatus
from test_repl_nodes import PASSWORD, USER, wait_for

CLIENT = "127.0.0.5"  # the test clients' source address
FORWARDER = "127.0.0.2"  # the standby's forwarder's source address

# --- the forwarder in-process -----------------------------------------------------------------


def test_forwarder_refuses_per_protocol_after_the_hold() -> None:
    async def go() -> None:
        ports = {k: free_port() for k in RouteKind}
        routes = [Route(f"127.0.0.1:{p}", "127.0.0.1:1", k) for k, p in ports.items()]
        fw = Forwarder(routes, lambda: False, hostname="h.test", options=ForwardOptions(hold=0.3))
        await fw.start()
        try:
            for kind, want in (
                (RouteKind.SMTP, b"421 4.3.2 h.test "),
                (RouteKind.IMAP, b"* BYE [UNAVAILABLE] "),
                (RouteKind.POP3, b"-ERR [SYS/TEMP] "),
                (RouteKind.TLS, b""),
            ):
                t0 = time.monotonic()
                r, w = await asyncio.open_connection("127.0.0.1", ports[kind])
                got = await asyncio.wait_for(r.read(), 5)
                assert got.startswith(want) and (got.endswith(b"\r\n") or not want), got
                assert 0.25 <= time.monotonic() - t0 < 3
                w.close()
            assert fw.refused == 4 and fw.forwarded == 0
        finally:
            await fw.stop()

    asyncio.run(go())


def test_forwarder_sends_the_client_address_then_copies_both_ways() -> None:
    async def go() -> None:
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            head = await r.readexactly(28)  # PROXY v2, TCP over IPv4
            await got.put(head)
            w.write(b"220 upstream\r\n")
            w.write(await r.readline())
            await w.drain()
            w.close()

        server = await asyncio.start_server(upstream, "127.0.0.1", 0)
        up_port = server.sockets[0].getsockname()[1]
        known = False
        port = free_port()
        fw = Forwarder(
            [Route(f"127.0.0.1:{port}", f"127.0.0.1:{up_port}", RouteKind.SMTP)],
            lambda: known,
            hostname="h.test",
            options=ForwardOptions(hold=5, source=FORWARDER),
        )
        await fw.start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(CLIENT, 0))
            await asyncio.sleep(0.3)  # held: no primary known yet
            assert got.empty()
            known = True
            head = await asyncio.wait_for(got.get(), 5)
            h = parse_v2(head)
            assert h is not None and h.consumed == 28
            assert h.source == (CLIENT, w.get_extra_info("sockname")[1])
            assert h.dest == ("127.0.0.1", port)
            assert await r.readline() == b"220 upstream\r\n"
            w.write(b"echo me\r\n")
            assert await asyncio.wait_for(r.readline(), 5) == b"echo me\r\n"
            assert await asyncio.wait_for(r.read(), 5) == b""  # upstream closed: so do we
            w.close()
            assert fw.forwarded == 1
        finally:
            await fw.stop()
            server.close()

    asyncio.run(go())


def test_forwarder_stop_refuses_held_clients_at_once() -> None:
    async def go() -> None:
        port = free_port()
        fw = Forwarder(
            [Route(f"127.0.0.1:{port}", "127.0.0.1:1", RouteKind.IMAP)],
            lambda: False,
            hostname="h.test",
            options=ForwardOptions(hold=30),
        )
        await fw.start()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        await fw.stop()
        assert time.monotonic() - t0 < 2
        assert (await asyncio.wait_for(r.read(), 5)).startswith(b"* BYE [UNAVAILABLE]")
        w.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)  # the port is free again

    asyncio.run(go())


# --- real processes ---------------------------------------------------------------------------


class ProxyCluster:
    """Nodes a and b (SMTP, IMAP, POP3, replication protocol C, two heartbeat links each,
    proxy mode) and a witness. A starts as the pair's first node."""

    def __init__(self, tag: str) -> None:
        secret = secrets.token_hex(16)
        svc = ("smtp", "imap", "pop3", "repl")
        self.port = {n: {s: free_port() for s in svc} for n in "ab"}
        self.hb = {n: (free_port(), free_port()) for n in "ab"}
        self.nodes: dict[str, ServeNode] = {}
        for me, peer, role in (("a", "b", "primary"), ("b", "a", "secondary")):
            p = self.port[me]
            settings: dict[str, dict[str, Any]] = {
                "smtp": {"mx": [f"127.0.0.1:{p['smtp']}"], "trusted_proxies": [FORWARDER]},
                "imap": {
                    "listen": [f"127.0.0.1:{p['imap']}"],
                    "allow_plaintext_auth": True,
                    "trusted_proxies": [FORWARDER],
                },
                "pop3": {
                    "listen": [f"127.0.0.1:{p['pop3']}"],
                    "allow_plaintext_auth": True,
                    "trusted_proxies": [FORWARDER],
                },
                "replication": {
                    "peer": f"127.0.0.1:{self.port[peer]['repl']}",
                    "listen": f"127.0.0.1:{p['repl']}",
                    "secret": secret,
                    "role": role,
                    "fencing": "resource-only",
                    "ping_interval": "500ms",
                    "ping_timeout": "1500ms",
                    "ack_timeout": "3s",
                },
            }
            self.nodes[me] = ServeNode(f"px-{tag}-{me}", settings)
        ids = {n: self._get(self.nodes[n], "node", "node_id") for n in "ab"}
        self.witness = WitnessProc(tag, (ids["a"], ids["b"]), secret)
        for me, peer in (("a", "b"), ("b", "a")):
            keys = {
                "links": [
                    [f"127.0.0.1:{self.hb[me][i]}", f"127.0.0.1:{self.hb[peer][i]}"] for i in (0, 1)
                ],
                "name": f"mh-{tag}",
                "peer_node_id": ids[peer],
                "peer_name": self._get(self.nodes[peer], "node", "name"),
                "witness": f"127.0.0.1:{self.witness.port}",
                "preferred": ids["a"],
                "proxy": [
                    [f"127.0.0.1:{self.port[me][s]}", f"127.0.0.1:{self.port[peer][s]}"]
                    for s in ("smtp", "imap", "pop3")
                ],
                "proxy_source": FORWARDER,
            }
            node = self.nodes[me]
            text = node.config.read_text()
            body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
            node.config.write_text(text.replace("\n[cluster]\n", "\n[cluster]\n" + body))
        self.a.cli("domain", "add", "example.org")
        self.a.add_account(USER, PASSWORD)

    @staticmethod
    def _get(n: ServeNode, section: str, key: str) -> str:
        return str(tomllib.loads(n.config.read_text())[section][key])

    @property
    def a(self) -> ServeNode:
        return self.nodes["a"]

    @property
    def b(self) -> ServeNode:
        return self.nodes["b"]

    def start(self) -> None:
        self.witness.start()
        self.a.start(wait_ports=False)
        self.b.start(wait_ports=False)
        wait_for(self.settled, 40, "A primary, B secondary in sync")

    def settled(self) -> bool:
        p, s = cstatus(self.a), cstatus(self.b)
        return bool(
            p
            and s
            and p["node"]["role"] == "Primary"
            and p["node"]["resources"] == "started"
            and p["replication"]["peer_confirms_writes"]
            and s["node"]["role"] == "Secondary"
            and s["node"]["disk"] == "UpToDate"
        )

    def cleanup(self) -> None:
        for n in self.nodes.values():
            n.cleanup()
        self.witness.kill()


@pytest.fixture
def pcluster(request: pytest.FixtureRequest) -> Iterator[ProxyCluster]:
    c = ProxyCluster(request.node.name.replace("_", "")[-10:] + secrets.token_hex(2))
    try:
        c.start()
        yield c
    except BaseException:
        for name, n in c.nodes.items():
            print(f"=== log of {name}\n{n.log[-12000:]}")
        raise
    finally:
        c.cleanup()


def _message(mid: str) -> bytes:
    return (
        f"From: x@remote.test\r\nTo: {USER}\r\nSubject: {mid}\r\nMessage-ID: <{mid}>\r\n\r\n"
        f"body of {mid}\r\n"
    ).encode()


@pytest.mark.slow
def test_the_standby_forwards_smtp_imap_and_pop3_to_the_primary(pcluster: ProxyCluster) -> None:
    b = pcluster.port["b"]
    with smtplib.SMTP(timeout=20, source_address=(CLIENT, 0)) as c:
        c.connect("127.0.0.1", b["smtp"])
        c.ehlo("client.test")
        c.sendmail("x@remote.test", [USER], _message("via-b@test"))
    # IMAP through B: the primary's mailbox, with the Received line naming the real client.
    im = imaplib.IMAP4("127.0.0.1", b["imap"], timeout=20)
    im.login(USER, PASSWORD)
    im.select("INBOX")
    typ, data = im.uid("SEARCH", "HEADER", "Message-ID", "via-b@test")
    assert typ == "OK" and data[0], data
    typ, data = im.uid("FETCH", data[0].split()[0].decode(), "(BODY.PEEK[HEADER])")
    item = data[0]
    assert isinstance(item, tuple)
    header = item[1].decode()
    assert CLIENT in header and FORWARDER not in header, header
    im.logout()
    # POP3 through B.
    p = poplib.POP3("127.0.0.1", b["pop3"], timeout=20)
    p.user(USER)
    p.pass_(PASSWORD)
    assert len(p.list()[1]) == 1
    p.quit()
    # The primary (A) served all of it and logged the client's own address.
    mail_log = (pcluster.a.root / "mail.log").read_text()
    assert CLIENT in mail_log and FORWARDER not in mail_log, mail_log
    assert (
        not (pcluster.b.root / "mail.log").exists()
        or "via-b" not in (pcluster.b.root / "mail.log").read_text()
    )
    st = cstatus(pcluster.b)
    assert st is not None and st["node"]["role"] == "Secondary"
    # A client on 127.0.0.1 still talks to the primary directly (only 127.0.0.2 is trusted).
    with smtplib.SMTP("127.0.0.1", pcluster.port["a"]["smtp"], timeout=20) as c:
        assert c.noop()[0] == 250


def _first_line(port: int, timeout: float) -> tuple[bytes, float]:
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout, (CLIENT, 0)) as s:
            s.settimeout(timeout)
            line = s.makefile("rb").readline()
    except OSError as e:
        line = f"<{type(e).__name__}>".encode()
    return line, time.monotonic() - t0


@pytest.mark.slow
def test_during_a_failover_clients_get_421_or_bye_not_a_hang(pcluster: ProxyCluster) -> None:
    b = pcluster.port["b"]
    pcluster.a.kill()
    results: dict[str, list[tuple[bytes, float]]] = {"smtp": [], "imap": [], "pop3": []}

    def probe(service: str) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line, took = _first_line(b[service], 15)
            results[service].append((line, took))
            if line.startswith((b"220 ", b"* OK", b"+OK")):
                return  # B serves itself now
            time.sleep(0.1)

    threads = [threading.Thread(target=probe, args=(s,)) for s in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    print(f"\nfailover as clients of B saw it: {results}")
    refusals = {"smtp": b"421 ", "imap": b"* BYE ", "pop3": b"-ERR "}
    for service, got in results.items():
        assert got, service
        # Every answer came within the hold time (3 s) plus slack: no hang.
        assert all(took < 8 for _, took in got), (service, got)
        # Refused while no primary was known, then served by B itself.
        assert got[0][0].startswith(refusals[service]), (service, got)
        assert got[-1][0].startswith((b"220 ", b"* OK", b"+OK")), (service, got)
        assert all(
            line.startswith(refusals[service]) or line.startswith(b"<ConnectionRefused")
            for line, _ in got[:-1]
        ), (service, got)
    st = cstatus(pcluster.b)
    assert st is not None and st["node"]["role"] == "Primary"


def test_proxy_config_is_checked(tmp_path: Any) -> None:
    from mailharbor.config import ConfigError, parse_config_text
    from mailharbor.node import proxy_routes

    a, b = "01" * 16, "02" * 16
    base = (
        f'[node]\nname = "n1"\nnode_id = "{a}"\nhostname = "h.example"\n'
        '[smtp]\nmx = ["127.0.0.1:2525"]\nsubmissions = ["127.0.0.1:2465"]\n'
        '[imap]\nlisten = ["127.0.0.1:2143"]\n'
        '[replication]\npeer = "127.0.0.1:1"\nlisten = "127.0.0.1:2"\n'
        'secret = "0123456789abcdef"\n[cluster]\nwitness = "127.0.0.1:5"\n'
        f'peer_node_id = "{b}"\n'
    )
    links = 'links = [["127.0.0.1:3", "127.0.0.1:4"]]\n'
    routes = (
        'proxy = [["127.0.0.1:2525", "127.0.0.1:3525"], ["127.0.0.1:2465", "127.0.0.1:3465"],'
        ' ["127.0.0.1:2143", "127.0.0.1:3143"]]\n'
    )
    path = tmp_path / "m.toml"
    cfg = parse_config_text(base + links + routes + 'proxy_source = "127.0.0.2"\n', path=path)
    assert cfg.cluster.proxy_hold == 3.0 and cfg.cluster.proxy_source == "127.0.0.2"
    assert [(r.local, r.peer, r.kind) for r in proxy_routes(cfg)] == [
        ("127.0.0.1:2525", "127.0.0.1:3525", RouteKind.SMTP),
        ("127.0.0.1:2465", "127.0.0.1:3465", RouteKind.TLS),
        ("127.0.0.1:2143", "127.0.0.1:3143", RouteKind.IMAP),
    ]
    with pytest.raises(ConfigError, match=r"cluster\.proxy_source"):
        parse_config_text(base + links + 'proxy_source = "host.example"\n', path=path)
    with pytest.raises(ConfigError, match=r"cluster\.proxy"):
        parse_config_text(base + routes, path=path)  # no links: no cluster
    bad = parse_config_text(
        base + links + 'proxy = [["127.0.0.1:9", "127.0.0.1:3525"]]\n', path=path
    )
    with pytest.raises(ConfigError, match=r"cluster\.proxy.*not an smtp, imap or pop3"):
        proxy_routes(bad)
