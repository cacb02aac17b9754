"""The cluster manager with real processes on loopback: two ``mailharbor serve`` nodes and a
``mailharbor witness``, default timings.

Node A is the first node of the pair (``replication.role = "primary"``: UpToDate at its first
start, domain and account created offline); B starts empty. Neither promotes itself: the
cluster's decision loop takes the witness's vote and promotes A. Every node has two heartbeat
links (UDP on loopback). What the nodes think is read with ``cluster status --json``; what they
hold is read over POP3 on the survivor: every Message-ID that got a ``250`` must be there.

In two-node mode (no witness, the test power switch as STONITH agent): the primary keeps
acknowledging while its restarted peer resyncs, and loses nothing (issue 6).

Also unit tests of the witness daemon's persistence (the fsync'd state survives a restart; no
two nodes get the vote).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from mailharbor.cluster.timing import DEFAULT_TIMING
from mailharbor.cluster.witness import Kind, LeaseClient, LeaseEvent
from mailharbor.server.witness import (
    PairSettings,
    WitnessServer,
    WitnessSettings,
    cluster_id,
    load_witness_config,
)
from servenode import MAILHARBOR, ServeNode, free_port
from test_repl_nodes import PASSWORD, USER, Load, pop3_message_ids, send, wait_for

# --- the witness daemon, in-process ----------------------------------------------------------

A_ID, B_ID = bytes([1] * 16), bytes([2] * 16)
SECRET = b"s" * 32


def _settings(tmp: Path) -> WitnessSettings:
    return WitnessSettings(
        listen="127.0.0.1:0", state_dir=tmp, pairs=(PairSettings("p", (A_ID, B_ID), SECRET),)
    )


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class _Transport:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: object = None) -> None:
        self.sent.append(data)

    def close(self) -> None:
        pass


def _server(tmp: Path, clock: _Clock) -> tuple[WitnessServer, _Transport]:
    srv = WitnessServer(_settings(tmp), clock=clock)
    srv.restore()
    tr = _Transport()
    srv.transport = tr  # type: ignore[assignment]
    return srv, tr


def _client(node: bytes, inc: int) -> LeaseClient:
    return LeaseClient(cluster_id("p"), node, SECRET, DEFAULT_TIMING, inc)


def test_witness_state_is_durable_before_the_reply_and_survives_a_restart(tmp_path: Path) -> None:
    clock = _Clock()
    srv, tr = _server(tmp_path, clock)
    a, b = _client(A_ID, 1), _client(B_ID, 1)
    srv.datagram_received(a.request(Kind.ACQUIRE, clock.t), ("127.0.0.1", 1))
    assert len(tr.sent) == 1
    assert (tmp_path / "p.state").exists()  # written before the reply went out
    ev, reply = a.receive(tr.sent[-1], clock.t)
    assert ev is LeaseEvent.GRANTED and reply.term == 1
    # Restart the witness 1 s later: A still counts as holder, B is refused.
    clock.t += 1.0
    srv2, tr2 = _server(tmp_path, clock)
    assert srv2.witnesses[cluster_id("p")][1].state.term == 1
    srv2.datagram_received(b.request(Kind.ACQUIRE, clock.t), ("127.0.0.1", 2))
    ev, reply = b.receive(tr2.sent[-1], clock.t)
    assert ev is LeaseEvent.BUSY and reply.owner == A_ID
    # A replayed request (recorded high-water mark) gets no answer after the restart.
    old = a.request(Kind.ACQUIRE, clock.t)
    srv2.datagram_received(old, ("127.0.0.1", 1))
    n = len(tr2.sent)
    clock.t += 0.1
    srv3, tr3 = _server(tmp_path, clock)
    srv3.datagram_received(old, ("127.0.0.1", 1))
    assert tr3.sent == [] and n == len(tr2.sent)
    # Only after lease + margin from the restart does B get the vote, as a new term.
    clock.t += DEFAULT_TIMING.lease + DEFAULT_TIMING.witness_margin + 0.01
    srv3.datagram_received(b.request(Kind.ACQUIRE, clock.t), ("127.0.0.1", 2))
    ev, reply = b.receive(tr3.sent[-1], clock.t)
    assert ev is LeaseEvent.GRANTED and reply.term == 2
    assert srv3.witnesses[cluster_id("p")][1].owner(clock.t) == B_ID


def test_witness_never_grants_two(tmp_path: Path) -> None:
    clock = _Clock()
    srv, tr = _server(tmp_path, clock)
    a, b = _client(A_ID, 5), _client(B_ID, 5)
    holders: set[bytes] = set()
    for step in range(200):
        for c, node in ((a, A_ID), (b, B_ID)):
            before = len(tr.sent)
            srv.datagram_received(c.request(Kind.ACQUIRE, clock.t), ("h", 1))
            if len(tr.sent) == before:
                continue  # refused (stale incarnation): no answer
            ev, _ = c.receive(tr.sent[-1], clock.t)
            if ev is LeaseEvent.GRANTED:
                holders.add(node)
        assert not (a.held(clock.t) and b.held(clock.t)), step
        # A renews only for the first 50 steps, then goes silent.
        clock.t += 0.1
        if step == 50:
            a = _client(A_ID, 4)  # a stale incarnation: all its requests are refused
    assert holders == {A_ID, B_ID}


def test_witness_refuses_forged_and_unknown_pairs(tmp_path: Path) -> None:
    clock = _Clock()
    srv, tr = _server(tmp_path, clock)
    bad = LeaseClient(cluster_id("p"), A_ID, b"x" * 32, DEFAULT_TIMING, 1)
    srv.datagram_received(bad.request(Kind.ACQUIRE, clock.t), ("h", 1))
    other = LeaseClient(cluster_id("q"), A_ID, SECRET, DEFAULT_TIMING, 1)
    srv.datagram_received(other.request(Kind.ACQUIRE, clock.t), ("h", 1))
    srv.datagram_received(b"junk", ("h", 1))
    assert tr.sent == [] and srv.refused == 3
    assert not (tmp_path / "p.state").exists()


def test_witness_config_file(tmp_path: Path) -> None:
    (tmp_path / "pair.secret").write_text("0123456789abcdef0123\n")
    f = tmp_path / "w.toml"
    f.write_text(
        'listen = "127.0.0.1:7400"\nstate_dir = "st"\n[[pair]]\nname = "mh"\n'
        f'nodes = ["{A_ID.hex()}", "{B_ID.hex()}"]\nsecret_file = "pair.secret"\n'
    )
    s = load_witness_config(f)
    assert s.state_dir == tmp_path / "st" and s.pairs[0].secret == b"0123456789abcdef0123"
    f.write_text('listen = "127.0.0.1:7400"\n[[pair]]\nname = "mh"\nnodes = ["00"]\n')
    with pytest.raises(Exception, match=r"pair\[0\]\.nodes"):
        load_witness_config(f)


def test_witness_stops_answering_when_the_state_cannot_be_stored(tmp_path: Path) -> None:
    clock = _Clock()
    srv, tr = _server(tmp_path / "gone", clock)
    (tmp_path / "gone").rmdir()  # the state directory disappears under the daemon
    srv.datagram_received(_client(A_ID, 1).request(Kind.ACQUIRE, clock.t), ("h", 1))
    assert tr.sent == [] and srv.failed.is_set() and "cannot store" in srv.failure


def test_witness_udp_round_trip(tmp_path: Path) -> None:
    async def go() -> None:
        port = free_port()
        s = WitnessSettings(
            listen=f"127.0.0.1:{port}",
            state_dir=tmp_path,
            pairs=(PairSettings("p", (A_ID, B_ID), SECRET),),
        )
        srv = WitnessServer(s)
        await srv.start()
        loop = asyncio.get_running_loop()
        got: asyncio.Future[bytes] = loop.create_future()

        class P(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: object) -> None:
                if not got.done():
                    got.set_result(data)

        tr, _ = await loop.create_datagram_endpoint(P, remote_addr=("127.0.0.1", port))
        c = _client(A_ID, 1)
        tr.sendto(c.request(Kind.ACQUIRE, time.monotonic()))
        ev, _ = c.receive(await asyncio.wait_for(got, 5), time.monotonic())
        assert ev is LeaseEvent.GRANTED
        tr.close()
        srv.close()

    asyncio.run(go())


# --- real processes ---------------------------------------------------------------------------


class _Daemon:
    """A helper daemon of these tests, its output in ``<base>/<name>.log``; started by
    :meth:`_run`, which waits for "listening" in its log."""

    def __init__(self, tag: str, name: str) -> None:
        self.base = Path(tempfile.mkdtemp(prefix=f"{name}-{tag}-"))
        self.name = name
        self.log_path = self.base / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def _run(self, cmd: list[str]) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(lambda: "listening" in self.log, 10, f"{self.name} listening")

    @property
    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None


class WitnessProc(_Daemon):
    def __init__(self, tag: str, nodes: tuple[str, str], secret: str) -> None:
        super().__init__(tag, "witness")
        self.port = free_port()
        self.config = self.base / "witness.toml"
        self.config.write_text(
            f'listen = "127.0.0.1:{self.port}"\nstate_dir = "state"\n[[pair]]\n'
            f'name = "mh-{tag}"\nnodes = ["{nodes[0]}", "{nodes[1]}"]\nsecret = "{secret}"\n'
        )

    def start(self) -> None:
        self._run([str(MAILHARBOR), "witness", "--config", str(self.config)])


class PowerSwitchProc(_Daemon):
    """The test power switch (``python -m mailharbor.server.powerswitch``) on loopback: the
    STONITH agent of a two-node pair."""

    def __init__(self, tag: str) -> None:
        super().__init__(tag, "switch")
        self.addr = f"127.0.0.1:{free_port()}"

    def start(self) -> None:
        self._run([sys.executable, "-m", "mailharbor.server.powerswitch", self.addr])

    def tell(self, line: str) -> str:
        host, port = self.addr.rsplit(":", 1)
        with socket.create_connection((host, int(port)), 10) as c:
            c.sendall(line.encode() + b"\n")
            return c.makefile().readline().strip()

    def register(self, name: str, node: ServeNode) -> None:
        assert node.proc is not None
        assert self.tell(f"REGISTER {name} {node.proc.pid}") == "OK"

    def kill(self) -> None:
        super().kill()
        shutil.rmtree(self.base, ignore_errors=True)


class Cluster:
    """Nodes a and b with SMTP/POP3, replication, two heartbeat links each, and a witness —
    or, with ``switch``, in two-node mode (no witness; the test power switch as STONITH agent,
    replication fencing ``resource-and-stonith``, as DRBD's)."""

    def __init__(
        self,
        tag: str,
        *,
        switch: PowerSwitchProc | None = None,
        replication: dict[str, Any] | None = None,
        **cluster: Any,
    ) -> None:
        self.tag = tag
        self.switch = switch
        secret = secrets.token_hex(16)
        self.repl = {"a": free_port(), "b": free_port()}
        self.smtp = {"a": free_port(), "b": free_port()}
        self.pop3 = {"a": free_port(), "b": free_port()}
        self.hb = {n: (free_port(), free_port()) for n in "ab"}
        self.nodes: dict[str, ServeNode] = {}
        for me, peer, role in (("a", "b", "primary"), ("b", "a", "secondary")):
            settings: dict[str, dict[str, Any]] = {
                "smtp": {"mx": [f"127.0.0.1:{self.smtp[me]}"]},
                "pop3": {"listen": [f"127.0.0.1:{self.pop3[me]}"], "allow_plaintext_auth": True},
                "replication": {
                    "peer": f"127.0.0.1:{self.repl[peer]}",
                    "listen": f"127.0.0.1:{self.repl[me]}",
                    "secret": secret,
                    "role": role,
                    "fencing": "resource-only" if switch is None else "resource-and-stonith",
                    "ping_interval": "500ms",
                    "ping_timeout": "1500ms",
                    "ack_timeout": "3s",
                    **(replication or {}),
                },
            }
            node = ServeNode(f"cl-{tag}-{me}", settings)
            # The pair needs two names (the power switch's outlets are named after them).
            text = node.config.read_text()
            assert text.count('\nname = "mail"\n') == 1
            node.config.write_text(text.replace('\nname = "mail"\n', f'\nname = "{tag}-{me}"\n'))
            self.nodes[me] = node
        ids = {n: self._node_id(self.nodes[n]) for n in "ab"}
        self.witness = WitnessProc(tag, (ids["a"], ids["b"]), secret)
        for me, peer in (("a", "b"), ("b", "a")):
            links = [
                [f"127.0.0.1:{self.hb[me][i]}", f"127.0.0.1:{self.hb[peer][i]}"] for i in (0, 1)
            ]
            keys = {
                "links": links,
                "name": f"mh-{tag}",
                "peer_node_id": ids[peer],
                "peer_name": self._node_name(self.nodes[peer]),
                **(
                    {"witness": f"127.0.0.1:{self.witness.port}"}
                    if switch is None
                    else {"two_node": True, "stonith": "power-switch", "power_switch": switch.addr}
                ),
                # A syncs B within milliseconds; without a preference the lower id would win.
                "preferred": ids["a"],
                **cluster,
            }
            node = self.nodes[me]
            text = node.config.read_text()
            header = "\n[cluster]\n"
            assert text.count(header) == 1
            body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
            node.config.write_text(text.replace(header, header + body))
        self.a.cli("domain", "add", "example.org")
        self.a.add_account(USER, PASSWORD)

    @staticmethod
    def _node_id(n: ServeNode) -> str:
        return str(tomllib.loads(n.config.read_text())["node"]["node_id"])

    @staticmethod
    def _node_name(n: ServeNode) -> str:
        return str(tomllib.loads(n.config.read_text())["node"]["name"])

    @property
    def a(self) -> ServeNode:
        return self.nodes["a"]

    @property
    def b(self) -> ServeNode:
        return self.nodes["b"]

    def start(self) -> None:
        if self.switch is None:
            self.witness.start()
        else:
            self.switch.start()
        self.a.start(wait_ports=False)
        self.b.start(wait_ports=False)
        if self.switch is not None:
            for n in self.nodes.values():
                self.switch.register(self._node_name(n), n)
        wait_for(lambda: self.settled("a", "b"), 40, "A primary, B secondary in sync")

    def settled(self, primary: str, secondary: str) -> bool:
        p, s = cstatus(self.nodes[primary]), cstatus(self.nodes[secondary])
        return bool(
            p
            and s
            and p["node"]["role"] == "Primary"
            and p["node"]["resources"] == "started"
            and p["node"]["can_ack"]
            and p["replication"]["peer_confirms_writes"]
            and s["node"]["role"] == "Secondary"
            and s["node"]["disk"] == "UpToDate"
        )

    def cleanup(self) -> None:
        for n in self.nodes.values():
            n.cleanup()
        self.witness.kill()
        if self.switch is not None:
            self.switch.kill()


def cstatus(node: ServeNode) -> dict[str, Any] | None:
    r = node.try_cli("cluster", "status", "--json")
    if r.returncode != 0:
        return None
    st: dict[str, Any] = json.loads(r.stdout)
    return st


def role_changes(node: ServeNode) -> int:
    return node.log.count("PROMOTED") + node.log.count("cluster: demoted")


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    tag = request.node.name.replace("_", "")[-12:] + secrets.token_hex(2)
    c = Cluster(tag)
    try:
        c.start()
        yield c
    except BaseException:
        for name, n in c.nodes.items():
            print(f"=== log of {name}\n{n.log[-12000:]}")
        print(f"=== witness log\n{c.witness.log[-4000:]}")
        raise
    finally:
        c.cleanup()


def _dump_on_failure(c: Cluster) -> str:
    return "\n".join(f"=== {k}\n{n.log[-6000:]}" for k, n in c.nodes.items())


@pytest.mark.slow
def test_exactly_one_primary_and_no_role_change_under_load(cluster: Cluster) -> None:
    a0, b0 = role_changes(cluster.a), role_changes(cluster.b)
    with Load(cluster.smtp["a"], "steady", seed=61, threads=2) as load:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pa, pb = cstatus(cluster.a), cstatus(cluster.b)
            assert pa is not None and pb is not None
            assert pa["node"]["role"] == "Primary" and pb["node"]["role"] == "Secondary"
            time.sleep(1)
    assert load.acked and load.failed == 0, (load.failed, _dump_on_failure(cluster))
    assert (role_changes(cluster.a), role_changes(cluster.b)) == (a0, b0)
    assert "decision demote" not in cluster.a.log


@pytest.mark.slow
def test_kill_9_of_the_primary_fails_over_and_loses_nothing(cluster: Cluster) -> None:
    with Load(cluster.smtp["a"], "kill", seed=62, threads=3) as load:
        time.sleep(3)
        assert cluster.a.proc is not None
        killed_at = time.monotonic()
        cluster.a.kill()
    acked = list(load.acked)
    assert len(acked) >= 5
    # The survivor serves: measure until the first 250 from B.
    first: float | None = None
    n = 0
    while time.monotonic() - killed_at < 30:
        n += 1
        if send(cluster.smtp["b"], f"probe-{n}@load.test", 200):
            first = time.monotonic()
            break
        time.sleep(0.05)
    assert first is not None, _dump_on_failure(cluster)
    failover = first - killed_at
    print(f"\nfailover: kill -9 to the first 250 from the survivor: {failover:.2f} s")
    st = cstatus(cluster.b)
    assert st is not None and st["node"]["role"] == "Primary"
    assert st["quorum"]["lease"]["held"] and st["peer"]["outdated"]
    assert "PROMOTED (failover)" in cluster.b.log
    have = set(pop3_message_ids(cluster.pop3["b"]))
    lost = [m for m in acked if m not in have]
    assert not lost, f"{len(lost)} acknowledged message(s) lost: {lost[:5]}"
    assert failover < 10


@pytest.mark.slow
def test_witness_killed_changes_no_role(cluster: Cluster) -> None:
    a0, b0 = role_changes(cluster.a), role_changes(cluster.b)
    cluster.witness.kill()
    with Load(cluster.smtp["a"], "nowit", seed=63, threads=2) as load:
        time.sleep(6)
    assert load.acked and load.failed == 0, _dump_on_failure(cluster)
    pa, pb = cstatus(cluster.a), cstatus(cluster.b)
    assert pa is not None and pb is not None
    assert pa["node"]["role"] == "Primary" and pb["node"]["role"] == "Secondary"
    assert pa["decision"]["reason"] == "primary-witness-lost"
    assert not pa["quorum"]["reachable"]
    assert (role_changes(cluster.a), role_changes(cluster.b)) == (a0, b0)


@pytest.mark.slow
def test_switchover_swaps_roles_and_loses_nothing(cluster: Cluster) -> None:
    with Load(cluster.smtp["a"], "swo", seed=64, threads=2) as load:
        time.sleep(2)
        r = cluster.a.try_cli("cluster", "switchover")
        assert r.returncode == 0, r.stderr
        time.sleep(0.5)
    acked = list(load.acked)
    wait_for(lambda: cluster.settled("b", "a"), 30, "B primary, A secondary in sync")
    assert send(cluster.smtp["b"], "after-switchover@load.test", 200)
    have = set(pop3_message_ids(cluster.pop3["b"]))
    lost = [m for m in acked if m not in have]
    assert not lost, lost[:5]
    # A refuses switchover now that it is secondary.
    r = cluster.a.try_cli("cluster", "switchover")
    assert r.returncode == 1 and "switchover-not-primary" in r.stderr
    # A role command about the peer is not forwarded: the refusal says where to run it.
    b_id = str(tomllib.loads(cluster.b.config.read_text())["node"]["node_id"])
    r = cluster.a.try_cli("cluster", "standby", b_id)
    assert r.returncode == 1 and "forward-to-peer" in r.stderr, r.stderr
    b = cluster._node_name(cluster.b)
    assert f"run `mailharbor cluster standby {b}` on {b}" in r.stderr, r.stderr


# --- two-node mode: the primary keeps acknowledging while its restarted peer resyncs ----------


class AckProbe:
    """One sender in a thread, one small message after the other to ``port``: the time of
    every ``250`` and of every failure."""

    def __init__(self, port: int, tag: str) -> None:
        self.port, self.tag = port, tag
        self.acks: list[tuple[float, str]] = []
        self.failures: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            mid = f"{self.tag}-probe-{n}@load.test"
            if send(self.port, mid, 500):
                self.acks.append((time.monotonic(), mid))
            else:
                self.failures.append(time.monotonic())
                time.sleep(0.02)

    def __enter__(self) -> AckProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time in [start, end] without a ``250``."""
        times = [start, *(t for t, _ in self.acks if start < t < end), end]
        return max(b - a for a, b in itertools.pairwise(times))


def _peer_view(node: ServeNode) -> dict[str, Any]:
    st = cstatus(node)
    return {} if st is None else st


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_node_primary_keeps_acknowledging_while_the_restarted_peer_resyncs() -> None:
    """Issue 6: B (secondary) is stopped and fenced; A writes alone; B restarts Outdated and
    resyncs a backlog throttled by ``replication.resync_rate``. A must keep sending ``250``
    all along (B cannot be promoted while Outdated/Inconsistent), and everything acknowledged
    must be on B afterwards: A is killed, B fences it, takes over and serves every message."""
    seed = secrets.randbits(32)
    print(f"\nseed {seed}")
    rng = random.Random(seed)
    tag = "tn" + secrets.token_hex(3)
    switch = PowerSwitchProc(tag)
    # The first two 4 MiB chunks of a resync go out at once; the third waits 4 MiB / rate.
    c = Cluster(tag, switch=switch, replication={"resync_rate": "1400KiB"})
    b_name = c._node_name(c.b)
    try:
        c.start()
        c.b.stop()  # clean stop; A loses the link, fences B (already off) and writes alone
        wait_for(
            lambda: (
                _peer_view(c.a).get("peer", {}).get("fence") == "fenced-off"
                and _peer_view(c.a)["node"]["can_ack"]
            ),
            30,
            "A writing alone with B fenced off",
        )
        # The backlog B must resync: ~9.6 MB, just over two chunks: ~3 s throttled.
        sizes = [rng.randint(380_000, 420_000) for _ in range(24)]
        backlog: list[str] = []
        lock = threading.Lock()

        def deliver(first: int) -> None:
            for i in range(first, len(sizes), 3):
                mid = f"{tag}-backlog-{i}@load.test"
                if send(c.smtp["a"], mid, sizes[i]):
                    with lock:
                        backlog.append(mid)

        workers = [threading.Thread(target=deliver, args=(k,)) for k in range(3)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert len(backlog) == len(sizes), f"A refused {len(sizes) - len(backlog)} message(s)"
        print(f"backlog: {len(sizes)} messages, {sum(sizes) / 1e6:.1f} MB")
        with AckProbe(c.smtp["a"], tag) as probe:
            time.sleep(0.5)
            t_start = time.monotonic()
            c.b.start(wait_ports=False)
            switch.register(b_name, c.b)
            seen: set[str] = set()

            def confirmed() -> bool:
                st = _peer_view(c.a)
                if not st:
                    return False
                seen.add(f"{st['peer']['disk']}/{st['decision']['reason']}")
                return bool(
                    st["peer"]["state"] == "alive" and st["replication"]["peer_confirms_writes"]
                )

            wait_for(confirmed, 60, "B resynced and confirming A's writes")
            t_end = time.monotonic()
            time.sleep(0.5)
        resync = t_end - t_start
        gap = probe.longest_gap(t_start, t_end)
        during = [m for t, m in probe.acks if t_start < t < t_end]
        failed = [t for t in probe.failures if t_start < t < t_end]
        print(
            f"B restart to confirming: {resync:.2f} s; 250s meanwhile: {len(during)}, "
            f"failures: {len(failed)}; longest gap between 250s: {gap:.2f} s; A saw {seen}"
        )
        assert "peer-not-promotable" in c.a.log, "A never wrote on beside an Outdated peer"
        assert resync > 2.0, "the resync was too quick to show anything"
        assert not failed, f"{len(failed)} message(s) refused during the resync"
        assert gap < min(1.5, resync / 2), f"A stopped acknowledging for {gap:.2f} s"
        assert c.b.proc is not None and c.b.proc.poll() is None, "A fenced the live peer"
        # Everything acknowledged is on B: A dies, B fences it and serves.
        acked = backlog + [m for _, m in probe.acks]
        c.a.kill()
        wait_for(
            lambda: (
                _peer_view(c.b).get("node", {}).get("role") == "Primary"
                and _peer_view(c.b)["node"]["can_ack"]
            ),
            30,
            "B promoted after fencing A",
        )
        have = set(pop3_message_ids(c.pop3["b"]))
        lost = [m for m in acked if m not in have]
        assert not lost, f"{len(lost)} acknowledged message(s) missing on B: {lost[:5]}"
    except BaseException:
        for name, n in c.nodes.items():
            print(f"=== log of {name}\n{n.log[-12000:]}")
        print(f"=== switch\n{switch.log[-2000:]}")
        raise
    finally:
        c.cleanup()


def test_cluster_config_errors_name_the_key(tmp_path: Path) -> None:
    from mailharbor.config import ConfigError, parse_config_text

    base = (
        '[node]\nname = "n1"\nnode_id = "' + A_ID.hex() + '"\nhostname = "h.example"\n'
        '[replication]\npeer = "127.0.0.1:1"\nlisten = "127.0.0.1:2"\n'
        'secret = "0123456789abcdef"\n[cluster]\n'
        'links = [["127.0.0.1:3", "127.0.0.1:4"]]\npeer_node_id = "' + B_ID.hex() + '"\n'
    )
    cfg = parse_config_text(base + 'witness = "127.0.0.1:5"\n', path=tmp_path / "m.toml")
    assert cfg.cluster.enabled and cfg.cluster.deadtime == 1.5
    with pytest.raises(ConfigError, match=r"cluster\.witness"):
        parse_config_text(base, path=tmp_path / "m.toml")
    with pytest.raises(ConfigError, match=r"cluster\.deadtime"):
        parse_config_text(
            base + 'witness = "127.0.0.1:5"\nwarntime = "300ms"\ndeadtime = "500ms"\n',
            path=tmp_path / "m.toml",
        )
    with pytest.raises(ConfigError, match=r"cluster\.witness_margin"):
        parse_config_text(
            base + 'witness = "127.0.0.1:5"\nwitness_margin = "10ms"\nclock_drift = 0.05\n',
            path=tmp_path / "m.toml",
        )
    with pytest.raises(ConfigError, match=r"cluster\.stonith"):
        parse_config_text(base + "two_node = true\n", path=tmp_path / "m.toml")


def test_fence_agents_power_switch_and_command() -> None:
    from mailharbor.cluster.fencing import FenceResult, FenceTarget
    from mailharbor.server.cluster import CommandAgent, PowerSwitchAgent
    from mailharbor.server.powerswitch import PowerSwitch

    async def go() -> None:
        switch = PowerSwitch()
        server = await asyncio.start_server(switch.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        victim = subprocess.Popen(["sleep", "60"])
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(f"REGISTER n2 {victim.pid}\nFAIL n2 on\n".encode())
            assert await r.readline() == b"OK\n" and await r.readline() == b"OK\n"
            agent = PowerSwitchAgent(f"127.0.0.1:{port}")
            target = FenceTarget("n2", B_ID, "mh")
            out = await agent.fence(target, timeout=5)
            assert out.result is FenceResult.FAILED and "simulated" in out.detail
            w.write(b"FAIL n2 off\n")
            assert await r.readline() == b"OK\n"
            out = await agent.fence(target, timeout=5)
            assert out.result is FenceResult.FENCED_OFF
            assert victim.wait(5) == -signal.SIGKILL
            w.close()
            for script, want in (
                ('test "$MH_FENCE_TARGET" = n2 && exit 7', FenceResult.FENCED_OFF),
                ("exit 5", FenceResult.FAILED),
                ("exit 4", FenceResult.OUTDATED),
                ("sleep 5", FenceResult.TIMEOUT),
            ):
                res = await CommandAgent(script, reason=lambda: "test").fence(target, timeout=0.5)
                assert res.result is want, (script, res)
        finally:
            victim.kill()
            victim.wait()
            server.close()

    asyncio.run(go())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
