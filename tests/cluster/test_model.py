"""Both nodes and the witness in virtual time, under link, witness and pause faults.

Each node runs the real engines (:class:`Heartbeat`, :class:`LeaseClient`) and :func:`decide`
every tick and applies the decision at once; the witness is the real :class:`Witness`, its
state persisted before each reply. Messages take 10 ms; a cut link drops them; a paused node
(SIGSTOP) processes nothing while its monotonic clock runs on and its inbound datagrams queue.

Properties, at every tick of every schedule Hypothesis draws:

* **One writer**: never can both nodes complete an acknowledgement. A node can when its ack
  gate (:func:`ack_allowed`) is open on a fresh snapshot and either it holds the lease or the
  peer physically confirms (link up, peer running as secondary): an ack that waits for a peer
  that became primary never completes, as the replication term check guarantees.
* **Progress**: once every fault is healed, a node is serving within a few seconds.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

from mailharbor.cluster.decide import (
    Action,
    ClusterSnapshot,
    Me,
    Owner,
    Peer,
    Policy,
    ReplView,
    Resources,
    WitnessView,
    ack_allowed,
    decide,
)
from mailharbor.cluster.heartbeat import Flags, Heartbeat, HeartbeatError, NodeStatus, PeerState
from mailharbor.cluster.timing import DEFAULT_TIMING as T
from mailharbor.cluster.witness import Kind, LeaseClient, Witness, WitnessError
from mailharbor.repl.state import DiskState, Role

A, B = b"\x0a" * 16, b"\x0b" * 16
CL, SECRET, HASH = b"\xcc" * 16, b"pair secret", b"\x11" * 32
DT, LATENCY = 0.05, 0.01
FAULTS = ("cut-lan", "cut-repl", "cut-a-w", "cut-b-w", "pause-a", "pause-b", "witness-down")
#: Compound faults, drawn as often as single ones: the partitions that matter most.
COMPOUND = {
    "split": {"cut-lan", "cut-repl"},  # both links between the nodes cut, witness up
    "isolate-a": {"cut-lan", "cut-repl", "cut-a-w"},
    "isolate-b": {"cut-lan", "cut-repl", "cut-b-w"},
    "split-a-w": {"cut-repl", "cut-a-w"},  # replication link and a's witness path
}


@dataclass
class Node:
    id: bytes
    peer_id: bytes
    hb: Heartbeat
    lease: LeaseClient
    role: Role = Role.SECONDARY
    resources: Resources = Resources.STOPPED
    dead_since: float | None = None
    last_request: float = float("-inf")
    last_query: float = float("-inf")
    inbox: list[tuple[float, int, str, int, bytes]] = field(default_factory=list)


class World:
    def __init__(self) -> None:
        self.now = 0.0
        self.faults: frozenset[str] = frozenset()
        self.nodes = {
            A: self._node(A, B),
            B: self._node(B, A),
        }
        self.witness_state: bytes | None = None
        self.witness: Witness | None = Witness.restore(CL, (A, B), SECRET, None, 0.0)
        self.witness_inbox: list[tuple[float, int, bytes, bytes]] = []
        self._n = itertools.count()

    def _node(self, me: bytes, peer: bytes) -> Node:
        hb = Heartbeat(me, peer, SECRET, HASH, ["lan", "repl"], T, 0.0, incarnation=1)
        return Node(me, peer, hb, LeaseClient(CL, me, SECRET, T, 1))

    def paused(self, n: bytes) -> bool:
        return ("pause-a" if n == A else "pause-b") in self.faults

    def link_up(self, link: int) -> bool:
        return ("cut-lan", "cut-repl")[link] not in self.faults

    def witness_link(self, n: bytes) -> bool:
        return ("cut-a-w" if n == A else "cut-b-w") not in self.faults and (
            "witness-down" not in self.faults
        )

    # --- messaging ---------------------------------------------------------------------------

    def to_witness(self, n: Node, data: bytes) -> None:
        if self.witness_link(n.id):
            heapq.heappush(self.witness_inbox, (self.now + LATENCY, next(self._n), n.id, data))

    def step_witness(self) -> None:
        if "witness-down" in self.faults:
            if self.witness is not None:
                self.witness = None
                self.witness_inbox.clear()
            return
        if self.witness is None:  # restarted from its durable state
            self.witness = Witness.restore(CL, (A, B), SECRET, self.witness_state, self.now)
        while self.witness_inbox and self.witness_inbox[0][0] <= self.now:
            _, _, sender, data = heapq.heappop(self.witness_inbox)
            try:
                step = self.witness.handle(data, self.now)
            except WitnessError:
                continue
            self.witness_state = step.state  # persisted (fsync) before the reply goes out
            if self.witness_link(sender):
                heapq.heappush(
                    self.nodes[sender].inbox,
                    (self.now + LATENCY, next(self._n), "w", 0, step.reply),
                )

    # --- one node's cycle ----------------------------------------------------------------------

    def snapshot(self, n: Node) -> ClusterSnapshot:
        now, ps = self.now, n.hb.peer_status
        state = n.hb.peer_state(now)
        if state is PeerState.DEAD:
            n.dead_since = n.dead_since if n.dead_since is not None else now
        else:
            n.dead_since = None
        peer_role = ps.role if ps else None
        connected = self.link_up(1) and state is PeerState.ALIVE
        confirms = (
            connected
            and n.role is Role.PRIMARY
            and peer_role is Role.SECONDARY
            and ps is not None
            and ps.term <= n.lease.term
        )
        owner = Owner.UNKNOWN
        if n.lease.held(now):
            owner = Owner.ME
        elif n.lease.last_reply_at is not None:
            owner = {None: Owner.NONE, n.id: Owner.NONE}.get(n.lease.owner, Owner.PEER)
        return ClusterSnapshot(
            now=now,
            me=Me(
                n.id,
                n.role,
                DiskState.UP_TO_DATE,
                term=n.lease.term,
                lease_held=n.lease.held(now),
                resources=n.resources,
                outdated=n.lease.my_outdated is not None,
            ),
            peer=Peer(
                n.peer_id,
                state,
                n.hb.link_states(now),
                n.hb.peer_seen,
                n.hb.last_heard(),
                n.dead_since,
                peer_role,
                ps.disk if ps else None,
                ps.term if ps else 0,
                standby=False,
                resources_stopped=bool(ps and ps.flags & Flags.RESOURCES_STOPPED),
                outdated=n.lease.peer_outdated is not None,
            ),
            witness=WitnessView(True, n.lease.witness_reachable(now, 1.0), owner),
            repl=ReplView(connected, confirms),
            policy=Policy(T, stonith=False, self_fence=True),
        )

    def step_node(self, n: Node) -> None:
        now = self.now
        while n.inbox and n.inbox[0][0] <= now:
            _, _, kind, link, data = heapq.heappop(n.inbox)
            try:
                if kind == "w":
                    n.lease.receive(data, now)
                else:
                    n.hb.receive(link, data, now)
            except (WitnessError, HeartbeatError):
                pass
        if n.hb.send_due(now):
            flags = Flags.NONE
            if n.resources is Resources.STOPPED:
                flags |= Flags.RESOURCES_STOPPED
            status = NodeStatus(n.id, HASH, n.lease.term, n.role, DiskState.UP_TO_DATE, 0, 0, flags)
            peer = self.nodes[n.peer_id]
            for link, msg in enumerate(n.hb.build(status, now)):
                if self.link_up(link):
                    heapq.heappush(peer.inbox, (now + LATENCY, next(self._n), "hb", link, msg))
        if n.lease.renew_due(now):
            self.to_witness(n, n.lease.request(Kind.ACQUIRE, now))
        elif now - n.last_query >= T.renew_interval:
            n.last_query = now
            self.to_witness(n, n.lease.request(Kind.QUERY, now))
        d = decide(self.snapshot(n))
        a = d.action
        if a in (Action.ACQUIRE_LEASE, Action.OUTDATE_PEER, Action.CLEAR_PEER_OUTDATED):
            if now - n.last_request >= 0.2:
                n.last_request = now
                req = {
                    Action.ACQUIRE_LEASE: Kind.ACQUIRE,
                    Action.OUTDATE_PEER: Kind.OUTDATE,
                    Action.CLEAR_PEER_OUTDATED: Kind.CLEAR,
                }[a]
                self.to_witness(
                    n, n.lease.request(req, now, target=n.peer_id, generation=n.lease.term)
                )
        elif a is Action.RELEASE_LEASE:
            self.to_witness(n, n.lease.request(Kind.RELEASE, now))
        elif a is Action.PROMOTE:
            n.role = Role.PRIMARY
        elif a is Action.START_RESOURCES:
            n.resources = Resources.STARTED
        elif a is Action.DEMOTE:
            n.resources, n.role = Resources.STOPPED, Role.SECONDARY
        elif a is Action.STOP_RESOURCES:
            n.resources = Resources.STOPPED
        else:
            assert a is Action.STAY, d

    # --- the property ---------------------------------------------------------------------------

    def can_ack(self, n: Node) -> bool:
        if self.paused(n.id):
            return False
        if not ack_allowed(self.snapshot(n)):
            return False
        peer = self.nodes[n.peer_id]
        physically_confirmed = (
            self.link_up(1) and not self.paused(peer.id) and peer.role is Role.SECONDARY
        )
        return n.lease.held(self.now) or physically_confirmed

    def tick(self) -> tuple[bool, bool]:
        self.now = round(self.now + DT, 6)
        self.step_witness()
        for n in self.nodes.values():
            if not self.paused(n.id):
                self.step_node(n)
        acks = (self.can_ack(self.nodes[A]), self.can_ack(self.nodes[B]))
        assert not all(acks), f"both nodes can acknowledge at {self.now} under {self.faults}"
        return acks


_schedule = st.lists(
    st.tuples(
        st.integers(1, 80),
        st.frozensets(st.sampled_from(FAULTS + tuple(COMPOUND)), max_size=3).map(
            lambda fs: frozenset().union(*(COMPOUND.get(f, {f}) for f in fs))
        ),
    ),
    max_size=6,
)


@given(_schedule)
def test_at_most_one_node_acknowledges_and_service_resumes(
    schedule: list[tuple[int, frozenset[str]]],
) -> None:
    w = World()
    served = False
    for _ in range(int(3.0 / DT)):  # cluster start: one node takes the vote and serves
        served |= any(w.tick())
    assert served, "no node took over at cluster start"
    for ticks, faults in schedule:
        w.faults = faults
        for _ in range(ticks):
            w.tick()
    w.faults = frozenset()
    last = (False, False)
    for _ in range(int(12.0 / DT)):
        last = w.tick()
    assert any(last), "no node serves after every fault healed"


def test_primary_killed_survivor_takes_over_within_three_seconds() -> None:
    w = World()
    for _ in range(int(3.0 / DT)):
        w.tick()
    primary = next(n for n in w.nodes.values() if n.role is Role.PRIMARY)
    w.faults = frozenset({"pause-a" if primary.id == A else "pause-b"})  # dead to everyone
    start = w.now
    while not any(w.tick()):
        assert w.now - start < 3.5
    assert w.now - start <= 3.0


def test_witness_killed_changes_no_role() -> None:
    w = World()
    for _ in range(int(3.0 / DT)):
        w.tick()
    roles = {n.id: n.role for n in w.nodes.values()}
    w.faults = frozenset({"witness-down"})
    for _ in range(int(10.0 / DT)):
        assert any(w.tick())  # the primary keeps acknowledging (the peer confirms)
    assert {n.id: n.role for n in w.nodes.values()} == roles
