"""The cluster manager's adapter: heartbeat and witness sockets, timers, fence agents, and the
one caller of the role controller.

Theory of operation
-------------------
:class:`ClusterManager` drives the sans-IO core of :mod:`mailharbor.cluster` for one node:

* **Heartbeats** go out every ``keepalive`` on every configured UDP link (one socket per link,
  bound to the link's local address, sending to the peer's); whatever arrives on link *i* is
  given to :meth:`Heartbeat.receive` with index *i* (refusals are logged, rate-limited).
* **The witness** is one UDP socket to ``cluster.witness``. The node renews its lease when
  :meth:`LeaseClient.renew_due` says so, sends a ``QUERY`` every ``renew_interval`` otherwise
  (reachability, the vote's owner, the Outdated marks), and sends ``ACQUIRE``/``RELEASE``/
  ``OUTDATE``/``CLEAR`` when the decision asks, never faster than the witness's ``retry_ms``
  nor more than once per 100 ms.
* **One loop, one decision per cycle.** The loop wakes at the earliest of the heartbeat
  deadline (:meth:`Heartbeat.next_deadline`), the next witness message, any datagram, any
  command, any finished action, and at least every 100 ms; it builds an immutable
  :class:`ClusterSnapshot`, calls :func:`decide` and executes the decision. A change of
  decision (action or reason) is logged with its reason and kept (the last 20) for ``cluster
  status``.
* **Role changes only through the role controller**: ``PROMOTE`` is
  :meth:`Replicator.promote` (role, new generation, then the services), ``DEMOTE`` is
  :meth:`Replicator.demote` (services stopped gracefully, store settled, role), ``START``/
  ``STOP_RESOURCES`` call the node's service hooks. Each runs as one *action task*; while it
  runs no other role or resource action starts (witness messages and heartbeats go on).
* **The acknowledgement gate.** :meth:`can_ack` evaluates :func:`ack_allowed` on a fresh
  snapshot (monotonic clock read at the call). node.py wraps the store's durability barrier in
  :class:`GatedBarrier`: after the replication barrier released a batch, the gate is checked
  *synchronously* before the batch becomes visible, i.e. before any ``250``/``OK``/``+OK``
  for it is written, and the queue runner calls :meth:`can_ack` before each attempt and before
  the final ".". The barrier is the single choke point every acknowledged change crosses
  (SMTP, LMTP, IMAP, POP3, admin). A closed gate *holds* the batch while it may still open
  (peer being marked Outdated, resources starting: milliseconds) and fails it — the store goes
  to ERROR, nothing in it is acknowledged — once it cannot (no longer primary, resources
  stopped) or after ``lease`` seconds. The remaining window between the check and the bytes
  leaving the socket (one event-loop turn) is what ``lease_margin`` minus
  ``self_fence_timeout`` covers.
  During a graceful stop (``STOPPING``) the gate counts resources as started: writes in flight
  finish and are acknowledged while the lease or the peer's confirmation still covers them.
* **Self-fence.** A stop that has not finished when the lease's ``exit_by`` passed (while no
  peer confirms writes), or ``fence_timeout`` after it began without a lease, makes the
  decision ``self-fence``: the process exits at once with :data:`EXIT_SELF_FENCED` (75, so a
  supervisor restarts it; it comes back as secondary).
* **Clean stop.** :meth:`stop` keeps heartbeats and renewals going while it demotes a primary,
  then releases the vote and sends a last round flagged ``SHUTDOWN``, so the peer may take
  over without fencing.

Invariants:

* the role changes only in an action task started here from a decision (or by the operator's
  ``repl`` commands, which this loop then treats as facts: a primary without the lease and
  without a confirming peer is demoted);
* at most one action task at a time; a pending CLI command is decided only when none runs;
* :meth:`can_ack` is False whenever :func:`ack_allowed` is False on the current state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import sys
import time
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from mailharbor.cluster.decide import (
    REASONS,
    Action,
    ClusterSnapshot,
    Command,
    CommandKind,
    CommandOutcome,
    Decision,
    FenceStatus,
    Me,
    Monitors,
    Owner,
    Peer,
    Policy,
    ReplView,
    Resources,
    WitnessView,
    ack_allowed,
    decide,
)
from mailharbor.cluster.fencing import (
    FenceOutcome,
    FenceResult,
    FenceTarget,
    command_environment,
    interpret_exit,
)
from mailharbor.cluster.heartbeat import Flags, Heartbeat, HeartbeatError, NodeStatus, PeerState
from mailharbor.cluster.timing import Timing
from mailharbor.cluster.witness import Kind, LeaseClient, LeaseEvent, WitnessError
from mailharbor.repl.barrier import BarrierMode
from mailharbor.repl.role import RoleError
from mailharbor.repl.state import FencingPolicy, Role
from mailharbor.server.listener import split_endpoint
from mailharbor.server.repl import Replicator
from mailharbor.server.witness import cluster_id
from mailharbor.store import DurabilityBarrier, StoreState

__all__ = [
    "EXIT_SELF_FENCED",
    "AckRefused",
    "ClusterManager",
    "ClusterSettings",
    "CommandAgent",
    "GatedBarrier",
    "PowerSwitchAgent",
]

log = logging.getLogger("mailharbor.cluster")

#: Exit status of a self-fenced node (EX_TEMPFAIL: restart me, I come back as secondary).
EXIT_SELF_FENCED = 75
#: Longest sleep of the loop between two decisions.
MAX_CYCLE = 0.1
#: Fewest seconds between two identical requests to the witness.
MIN_WITNESS_GAP = 0.1
HISTORY = 20


@dataclass(frozen=True)
class ClusterSettings:
    """``[cluster]``, resolved by node.py (secret read, ids decoded)."""

    name: str
    node_name: str
    node_id: bytes
    peer_name: str
    peer_id: bytes
    secret: bytes
    links: tuple[tuple[str, str], ...]
    witness: str
    timing: Timing
    self_fence: bool = True
    stonith: str = "none"
    fence_command: str = ""
    power_switch: str = ""
    preferred: bytes | None = None

    @property
    def two_node(self) -> bool:
        return not self.witness

    def settings_hash(self) -> bytes:
        """The cluster-wide settings both nodes must share (heartbeats refuse others)."""
        t = self.timing
        data = {
            "v": 1,
            "name": self.name,
            "timing": [getattr(t, k) for k in sorted(vars(t))],
            "two_node": self.two_node,
            "self_fence": self.self_fence,
            "stonith": self.stonith != "none",
            "preferred": self.preferred.hex() if self.preferred else "",
            "nodes": sorted([self.node_id.hex(), self.peer_id.hex()]),
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).digest()


class AckRefused(Exception):
    """The acknowledgement gate is closed for good: the batch is not acknowledged."""


# --- fence agents ------------------------------------------------------------------------------


class CommandAgent:
    """The external command agent (``/bin/sh -c fence_command``), DRBD's exit codes."""

    name = "command"

    def __init__(self, command: str, *, reason: Callable[[], str]) -> None:
        self.command = command
        self.reason = reason

    async def fence(self, target: FenceTarget, *, timeout: float) -> FenceOutcome:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C"}
        env.update(command_environment(target, reason=self.reason()))
        try:
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh",
                "-c",
                self.command,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError:
            return interpret_exit(self.name, None)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await proc.wait()
            return interpret_exit(self.name, None, timed_out=True)
        out = interpret_exit(self.name, proc.returncode)
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] if err else []
        return replace(out, detail=out.detail + (f" ({tail[0][:200]})" if tail else ""))


class PowerSwitchAgent:
    """The test power switch (:mod:`mailharbor.server.powerswitch`): ``OFF <name>``."""

    name = "power-switch"

    def __init__(self, address: str) -> None:
        self.address = address

    async def fence(self, target: FenceTarget, *, timeout: float) -> FenceOutcome:
        host, port = split_endpoint(self.address)
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host or "127.0.0.1", port)
                try:
                    writer.write(f"OFF {target.name}\n".encode())
                    await writer.drain()
                    line = (await reader.readline()).decode("ascii", "replace").strip()
                finally:
                    writer.close()
        except TimeoutError:
            return FenceOutcome(FenceResult.TIMEOUT, self.name, "power switch did not answer")
        except OSError as e:
            return FenceOutcome(FenceResult.FAILED, self.name, f"power switch unreachable: {e}")
        if line == "OFF":
            return FenceOutcome(FenceResult.FENCED_OFF, self.name, f"{target.name} is off")
        return FenceOutcome(FenceResult.FAILED, self.name, f"power switch said {line[:100]!r}")


# --- datagram endpoints --------------------------------------------------------------------------


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, on_data: Callable[[bytes], None]) -> None:
        self.on_data = on_data
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport.
        self.transport = typing.cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.on_data(data)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable while the peer or witness is down: expected

    def send(self, data: bytes, addr: tuple[str, int] | None = None) -> None:
        if self.transport is not None:
            with contextlib.suppress(OSError):
                self.transport.sendto(data, addr)


def _addr(endpoint: str) -> tuple[str, int]:
    host, port = split_endpoint(endpoint)
    return host or "127.0.0.1", port


# --- the barrier wrapper -----------------------------------------------------------------------


class GatedBarrier:
    """``store.DurabilityBarrier``: the replication barrier, then the cluster's ack gate."""

    def __init__(self, inner: DurabilityBarrier, manager: ClusterManager) -> None:
        self.inner = inner
        self.manager = manager

    async def wait(self, lsn: int) -> None:
        await self.inner.wait(lsn)
        if self.manager.repl.role is Role.PRIMARY:
            # A secondary's batches are the peer's frames it ingests: nobody is acknowledged
            # from them but the primary, whose own barrier waits for them.
            await self.manager.ack_gate()

    def try_release(self, lsn: int) -> bool:
        """The replication barrier's fast path, and on a primary the ack gate's, both at once
        (the gate first asked only when the replication barrier would release)."""
        repl = self.manager.repl
        if repl.role is Role.PRIMARY and not (repl.core.releasable(lsn) and self.manager.can_ack()):
            return False
        return self.inner.try_release(lsn)


# --- the manager ---------------------------------------------------------------------------------


@dataclass
class _FenceEpisode:
    status: FenceStatus = FenceStatus.NONE
    detail: str = ""
    finished: float | None = None


@dataclass
class _Pending:
    command: Command
    future: asyncio.Future[Decision]


@dataclass
class _Sent:
    at: float = float("-inf")


@dataclass
class _Stats:
    refused: dict[str, int] = field(default_factory=dict)
    last_refusal_log: float = float("-inf")


class ClusterManager:
    """See the module docstring."""

    def __init__(
        self,
        settings: ClusterSettings,
        repl: Replicator,
        *,
        start_services: Callable[[], Awaitable[None]],
        stop_services: Callable[[], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
        exit_process: Callable[[int], None] = os._exit,
    ) -> None:
        self.settings = settings
        self.repl = repl
        self.start_services = start_services
        self.stop_services = stop_services
        self.clock = clock
        self.exit_process = exit_process
        t = settings.timing
        self.timing = t
        now = clock()
        self.incarnation = time.time_ns()
        self.cluster = cluster_id(settings.name)
        self.hb = Heartbeat(
            node_id=settings.node_id,
            peer_id=settings.peer_id,
            pair_secret=settings.secret,
            settings_hash=settings.settings_hash(),
            links=[f"{a}->{b}" for a, b in settings.links],
            timing=t,
            started=now,
            incarnation=self.incarnation,
        )
        self.lease = LeaseClient(
            self.cluster, settings.node_id, settings.secret, t, self.incarnation
        )
        self.policy = Policy(
            timing=t,
            stonith=settings.stonith != "none",
            self_fence=settings.self_fence and not settings.two_node,
            preferred=settings.preferred,
        )
        self.agent: CommandAgent | PowerSwitchAgent | None = None
        if settings.stonith == "command":
            self.agent = CommandAgent(settings.fence_command, reason=lambda: self._fence_reason)
        elif settings.stonith == "power-switch":
            self.agent = PowerSwitchAgent(settings.power_switch)
        self.resources = Resources.STARTED if repl.role is Role.PRIMARY else Resources.STOPPED
        self.standby = False
        self.yielding = False  # transient standby after a switchover, until the peer is primary
        self.leaving = False
        self.fence = _FenceEpisode()
        self.dead_since: float | None = None
        self.decisions: collections.deque[dict[str, object]] = collections.deque(maxlen=HISTORY)
        self.last: Decision | None = None
        self.started_at = now
        self._fence_reason = ""
        self._links: list[_Udp] = []
        self._peers: list[tuple[str, int]] = [_addr(p) for _, p in settings.links]
        self._witness: _Udp | None = None
        self._sent: dict[Kind, _Sent] = collections.defaultdict(_Sent)
        self._next_query = now
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._action: asyncio.Task[None] | None = None
        self._fence_task: asyncio.Task[None] | None = None
        self._pending: _Pending | None = None
        self._stop_started: float | None = None
        self._stop_had_lease = False
        self._peer_outdated_seen = False
        self._stats = _Stats()
        self.failover_started: float | None = None

    # -- lifetime ----------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for i, (local, _) in enumerate(self.settings.links):
            link = _Udp(self._link_receiver(i))
            await loop.create_datagram_endpoint(lambda p=link: p, local_addr=_addr(local))  # type: ignore[misc]
            self._links.append(link)
        if self.settings.witness:
            proto = _Udp(self._on_witness)
            await loop.create_datagram_endpoint(
                lambda: proto, remote_addr=_addr(self.settings.witness)
            )
            self._witness = proto
        self._loop_task = loop.create_task(self._run(), name="cluster-loop")
        log.info(
            "cluster %s: node %s, peer %s (%s), %d link(s), %s, fencing: %s",
            self.settings.name,
            self.settings.node_name,
            self.settings.peer_name,
            self.settings.peer_id.hex(),
            len(self._links),
            f"witness {self.settings.witness}" if self.settings.witness else "two-node mode",
            ", ".join(
                x
                for x in (
                    "self-fence" if self.policy.self_fence else "",
                    f"stonith {self.settings.stonith}" if self.policy.stonith else "",
                )
                if x
            )
            or "none",
        )

    async def stop(self) -> None:
        """Leave cleanly: demote if primary (heartbeats and renewals go on meanwhile), release
        the vote, announce SHUTDOWN, close the sockets."""
        if self._loop_task is None:
            return
        self.leaving = True
        for t in (self._action, self._fence_task):
            if t is not None and not t.done():
                with contextlib.suppress(BaseException):
                    await t
        if self.repl.role is Role.PRIMARY:
            self.resources = Resources.STOPPING
            self._stop_started = self.clock()
            try:
                await self.repl.demote()
            except Exception as e:
                log.error("cluster: demotion at stop failed: %s", e)
        else:
            with contextlib.suppress(Exception):
                await self.stop_services()
        self.resources = Resources.STOPPED
        now = self.clock()
        if self._witness is not None and self.lease.held(now):
            self._witness.send(self.lease.request(Kind.RELEASE, now))
        status = self._status(now, shutdown=True)
        for _ in range(3):
            self._send_round(status, self.clock())
            await asyncio.sleep(self.timing.keepalive / 2)
        self._loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._loop_task
        self._loop_task = None
        for p in self._links:
            if p.transport is not None:
                p.transport.close()
        if self._witness is not None and self._witness.transport is not None:
            self._witness.transport.close()
        log.info("cluster: left the cluster (shutdown announced)")

    # -- input -------------------------------------------------------------------------------

    def _link_receiver(self, link: int) -> Callable[[bytes], None]:
        return lambda data: self._on_heartbeat(link, data)

    def _on_heartbeat(self, link: int, data: bytes) -> None:
        now = self.clock()
        try:
            self.hb.receive(link, data, now)
        except HeartbeatError as e:
            why = e.reason.value
            self._stats.refused[why] = self._stats.refused.get(why, 0) + 1
            if now - self._stats.last_refusal_log > 10:
                self._stats.last_refusal_log = now
                log.warning("cluster: heartbeat refused on link %d: %s", link, e)
            return
        self._wake.set()

    def _on_witness(self, data: bytes) -> None:
        now = self.clock()
        was_held = self.lease.held(now)
        try:
            event, reply = self.lease.receive(data, now)
        except WitnessError as e:
            log.debug("cluster: witness reply refused: %s", e)
            return
        if event is LeaseEvent.GRANTED and not was_held:
            log.info("cluster: witness granted the vote, term %d", reply.term)
        elif event is LeaseEvent.OUTDATED:
            log.warning("cluster: the witness records this node Outdated: no vote")
        if self.lease.peer_outdated is not None and not self._peer_outdated_seen:
            self._peer_outdated_seen = True
            log.info("cluster: the witness records the peer Outdated")
            self.repl.peer_fenced()  # writes held by resource-only fencing may go on
        elif self.lease.peer_outdated is None:
            self._peer_outdated_seen = False
        self._wake.set()

    # -- commands (admin) --------------------------------------------------------------------

    async def command(self, kind: CommandKind, node: str, *, force: bool = False) -> Decision:
        """Submit a CLI command; returns the decision taken on it."""
        if self._pending is not None:
            raise RoleError("another cluster command is pending")
        names = {self.settings.node_name, self.settings.node_id.hex()}
        peer_names = {self.settings.peer_name, self.settings.peer_id.hex()}
        if node and node not in names | peer_names:
            raise RoleError(
                f"unknown node {node!r}: this is {self.settings.node_name}, "
                f"the peer {self.settings.peer_name}"
            )
        cmd = Command(kind, on_peer=node in peer_names and node not in names, force=force)
        fut: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._pending = _Pending(cmd, fut)
        self._wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), 30)
        finally:
            if self._pending is not None and self._pending.future is fut:
                self._pending = None

    async def admin_command(self, kind: str, node: str, *, force: bool) -> dict[str, object]:
        """The ``cluster.*`` admin commands: RoleError (one line) when refused."""
        if kind == "switchover":
            node = self.settings.node_name
        d = await self.command(CommandKind(kind), node, force=force)
        if d.command is CommandOutcome.REFUSED:
            where = ""
            if d.reason == "forward-to-peer":
                # Not forwarded: a node takes admin commands only on its local socket (see
                # docs/cluster.md, "cluster standby NODE for the peer").
                peer = self.settings.peer_name
                force_arg = " --force" if force else ""
                where = f"; run `mailharbor cluster {kind} {peer}{force_arg}` on {peer}"
            raise RoleError(f"refused ({d.reason}): {REASONS.get(d.reason, '')}{where}")
        return {"action": d.action.value, "reason": d.reason, "detail": d.detail}

    # -- the ack gate ------------------------------------------------------------------------

    def can_ack(self) -> bool:
        """May this node acknowledge (send ``250``/``OK``, the final "." of an attempt) now?"""
        if self.leaving and self.repl.role is not Role.PRIMARY:
            return False
        s = self.snapshot(self.clock(), for_ack=True)
        return ack_allowed(s)

    def peer_serving(self) -> bool:
        """Is the peer, as its heartbeats show it now, alive, primary and running its resources
        (not shutting down)? The standby's forwarder (proxy mode) sends clients to it only then.
        """
        ps = self.hb.peer_status
        if ps is None or self.hb.peer_state(self.clock()) is not PeerState.ALIVE:
            return False
        stopped = Flags.RESOURCES_STOPPED | Flags.SHUTDOWN
        return ps.role is Role.PRIMARY and not (ps.flags & stopped)

    async def ack_gate(self) -> None:
        """Return once acknowledging is allowed; raise :class:`AckRefused` when it cannot be
        (see the module docstring)."""
        if self.can_ack():
            return
        deadline = self.clock() + self.timing.lease
        while True:
            if self.repl.role is not Role.PRIMARY or self.resources in (
                Resources.STOPPED,
                Resources.FAILED,
            ):
                raise AckRefused("not acknowledged: this node is no longer primary")
            if self.clock() >= deadline:
                raise AckRefused("not acknowledged: no lease and no peer confirming writes")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.05)
            if self.can_ack():
                return

    # -- the snapshot ------------------------------------------------------------------------

    def _generation(self) -> int:
        return max([self.repl.store.generation, *(g.number for g in self.repl.history)])

    def _confirms(self) -> bool:
        return self.repl.core.mode is BarrierMode.PEER and self.repl.peer_view is not None

    def snapshot(
        self, now: float, *, command: Command | None = None, for_ack: bool = False
    ) -> ClusterSnapshot:
        t = self.timing
        peer_state = self.hb.peer_state(now)
        ps = self.hb.peer_status
        flags = ps.flags if ps is not None else Flags.NONE
        resources = self.resources
        if for_ack and resources is Resources.STOPPING:
            resources = Resources.STARTED
        confirms = self._confirms()
        me = Me(
            node_id=self.settings.node_id,
            role=self.repl.role,
            disk=self.repl.disk,
            generation=self._generation(),
            term=self._term(),
            lease_held=self.lease.held(now),
            standby=self.standby or self.yielding,
            resources=resources,
            stop_overdue=self._stop_overdue(now, confirms),
            outdated=self.lease.my_outdated is not None,
        )
        peer = Peer(
            node_id=self.settings.peer_id,
            state=peer_state,
            links=self.hb.link_states(now),
            seen=self.hb.peer_seen,
            last_heard=self.hb.last_heard(),
            dead_since=self.dead_since,
            role=ps.role if ps is not None else None,
            disk=ps.disk if ps is not None else None,
            term=ps.term if ps is not None else 0,
            standby=bool(flags & Flags.STANDBY),
            resources_stopped=ps is None or bool(flags & Flags.RESOURCES_STOPPED),
            clean_shutdown=bool(flags & Flags.SHUTDOWN) and peer_state is not PeerState.ALIVE,
            outdated=self.lease.peer_outdated is not None,
            fence=self.fence.status,
            fence_detail=self.fence.detail,
            fence_finished=self.fence.finished,
        )
        reachable = self.lease.witness_reachable(now, t.lease)
        owner = Owner.UNKNOWN
        if reachable:
            if self.lease.owner is None:
                owner = Owner.NONE
            else:
                owner = Owner.ME if self.lease.owner == self.settings.node_id else Owner.PEER
        store_error = self.repl.store.state is not StoreState.OPEN
        return ClusterSnapshot(
            now=now,
            me=me,
            peer=peer,
            witness=WitnessView(
                configured=not self.settings.two_node, reachable=reachable, owner=owner
            ),
            repl=ReplView(
                connected=self.repl.peer_view is not None,
                peer_confirms_writes=confirms,
                peer_disk=self.repl.peer_disk if self.repl.peer_view is not None else None,
                # A resync ends (SYNC_DONE) only after the frames appended during it, so a
                # sync target is UpToDate only once it holds every frame released without it
                # (repl/session.py). After the barrier began waiting for the peer, a lost link
                # must freeze it until the peer is fenced: with dont-care / resource-only a
                # peer UpToDate as of the last SYNC_DONE could miss batches released after a
                # link loss while its reports still said Inconsistent.
                peer_uptodate_holds_released=(
                    self.repl.settings.fencing is FencingPolicy.RESOURCE_AND_STONITH
                ),
            ),
            monitors=Monitors(store_error=store_error),
            policy=self.policy,
            command=command,
        )

    def _term(self) -> int:
        return self.lease.granted_term if not self.settings.two_node else self._generation()

    def ack_term(self) -> int:
        """The term this node acknowledges under, as its heartbeats advertise it: the term of
        the witness's last grant to this node (two-node mode: the replication generation). It
        changes only when the vote changes hands, so acknowledgements from two nodes never
        share a term and a later term means a later holder. Named in every SMTP ``250``."""
        return self._term()

    def _stop_overdue(self, now: float, confirms: bool) -> bool:
        if self.resources is not Resources.STOPPING or self._stop_started is None:
            return False
        if self._stop_had_lease and self.policy.self_fence:
            if self.lease.held(now) or confirms:
                return False
            return now >= max(
                self.lease.exit_by, self._stop_started + self.timing.self_fence_timeout
            )
        return now >= self._stop_started + self.timing.fence_timeout

    def _status(self, now: float, *, shutdown: bool = False) -> NodeStatus:
        f = Flags.NONE
        if self.standby or self.yielding:
            f |= Flags.STANDBY
        if self.policy.self_fence:
            f |= Flags.SELF_FENCE_ARMED
        if self.resources is Resources.STOPPED:
            f |= Flags.RESOURCES_STOPPED
        if shutdown:
            f |= Flags.SHUTDOWN | Flags.RESOURCES_STOPPED
        if self.lease.held(now):
            f |= Flags.LEASE_HELD
        return NodeStatus(
            node_id=self.settings.node_id,
            settings_hash=self.hb.settings_hash,
            term=self._term(),
            role=self.repl.role,
            disk=self.repl.disk,
            generation=self._generation(),
            last_lsn=self.repl.store.last_lsn,
            flags=f,
        )

    # -- the loop ----------------------------------------------------------------------------

    def _send_round(self, status: NodeStatus, now: float) -> None:
        for proto, addr, msg in zip(
            self._links, self._peers, self.hb.build(status, now), strict=True
        ):
            proto.send(msg, addr)

    def _witness_send(self, kind: Kind, now: float, **kw: object) -> None:
        if self._witness is None:
            return
        gap = self.timing.renew_interval if kind is Kind.QUERY else MIN_WITNESS_GAP
        if now - self._sent[kind].at < gap:
            return
        if kind is Kind.ACQUIRE and now < self.lease.retry_at:
            return
        self._sent[kind].at = now
        self._witness.send(self.lease.request(kind, now, **kw))  # type: ignore[arg-type]

    async def _run(self) -> None:
        while True:
            try:
                self._cycle(self.clock())
            except Exception:
                log.exception("cluster: cycle failed")
            now = self.clock()
            deadline = min(self.hb.next_deadline(now), self._next_query, now + MAX_CYCLE)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, deadline - now))

    def _cycle(self, now: float) -> None:
        if self.hb.send_due(now):
            self._send_round(self._status(now), now)
        if self._witness is not None:
            if self.lease.renew_due(now):
                self._witness_send(Kind.ACQUIRE, now)
            if now >= self._next_query:
                self._next_query = now + self.timing.renew_interval
                self._witness_send(Kind.QUERY, now)
        for ch in self.hb.poll(now):
            lvl = logging.INFO if ch.new.value in ("up", "dead") else logging.WARNING
            log.log(
                lvl, "cluster: link %d (%s) %s -> %s", ch.link, ch.name, ch.old.value, ch.new.value
            )
        state = self.hb.peer_state(now)
        if state is PeerState.DEAD:
            if self.dead_since is None:
                self.dead_since = now
                log.warning("cluster: peer %s is dead (every link silent)", self.settings.peer_name)
        elif state is PeerState.ALIVE:
            if self.dead_since is not None:
                log.info("cluster: peer %s is alive again", self.settings.peer_name)
            self.dead_since = None
            if self.fence.status is not FenceStatus.RUNNING:
                self.fence = _FenceEpisode()
        ps = self.hb.peer_status
        if (
            self.yielding
            and ps is not None
            and ps.role is Role.PRIMARY
            and state is PeerState.ALIVE
        ):
            self.yielding = False
            log.info("cluster: the peer is primary: switchover complete")
        self._changed.set()
        if self.leaving:
            return
        busy = self._action is not None and not self._action.done()
        pending = self._pending if not busy else None
        snap = self.snapshot(now, command=pending.command if pending else None)
        d = decide(snap)
        self._record(d, snap)
        if pending is not None and d.command is not CommandOutcome.NONE:
            self._pending = None
            if d.command is CommandOutcome.ACCEPTED:
                self._accept(pending.command)
            if not pending.future.done():
                pending.future.set_result(d)
        self._execute(d, now, busy)

    def _record(self, d: Decision, s: ClusterSnapshot) -> None:
        prev = self.last
        self.last = d
        if prev is not None and (prev.action, prev.reason) == (d.action, d.reason):
            return
        entry: dict[str, object] = {
            "at": round(time.time(), 3),
            "action": d.action.value,
            "reason": d.reason,
            "detail": d.detail,
            "role": s.me.role.value,
            "peer": s.peer.state.value,
        }
        self.decisions.append(entry)
        lvl = (
            logging.DEBUG
            if d.action is Action.STAY and d.reason in ("primary", "peer-primary")
            else logging.INFO
        )
        if d.action is not Action.STAY:
            lvl = (
                logging.WARNING if d.action in (Action.DEMOTE, Action.FENCE_PEER) else logging.INFO
            )
        log.log(
            lvl,
            "cluster: decision %s (%s)%s",
            d.action.value,
            d.reason,
            f": {d.detail}" if d.detail else "",
        )

    def _accept(self, cmd: Command) -> None:
        if cmd.kind is CommandKind.STANDBY and not cmd.on_peer:
            self.standby = True
        elif cmd.kind is CommandKind.UNSTANDBY and not cmd.on_peer:
            self.standby = False
        elif cmd.kind is CommandKind.SWITCHOVER:
            self.yielding = True

    def _execute(self, d: Decision, now: float, busy: bool) -> None:
        a = self.settings
        if d.action is Action.ACQUIRE_LEASE:
            self._witness_send(Kind.ACQUIRE, now)
        elif d.action is Action.RELEASE_LEASE:
            if self._witness is not None and now - self._sent[Kind.RELEASE].at >= MIN_WITNESS_GAP:
                self._sent[Kind.RELEASE].at = now
                self._witness.send(self.lease.request(Kind.RELEASE, now))
        elif d.action is Action.OUTDATE_PEER:
            self._witness_send(Kind.OUTDATE, now, target=a.peer_id, generation=self._generation())
        elif d.action is Action.CLEAR_PEER_OUTDATED:
            self._witness_send(Kind.CLEAR, now, target=a.peer_id)
        elif d.action is Action.FENCE_PEER:
            self._start_fence(d)
        elif d.action is Action.SELF_FENCE:
            log.critical(
                "cluster: SELF-FENCE (%s): the stop did not finish before the lease ran out; "
                "exiting now with status %d",
                d.reason,
                EXIT_SELF_FENCED,
            )
            for h in logging.getLogger("mailharbor").handlers:
                with contextlib.suppress(Exception):
                    h.flush()
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            self.exit_process(EXIT_SELF_FENCED)
        elif busy:
            return
        elif d.action is Action.PROMOTE:
            self._spawn(self._promote(d))
        elif d.action is Action.DEMOTE:
            self._stop_started = now
            self._stop_had_lease = self.lease.held(now) or self.lease.stop_at > float("-inf")
            self.resources = Resources.STOPPING
            self._spawn(self._demote(d))
        elif d.action is Action.START_RESOURCES:
            self.resources = Resources.STARTING
            self._spawn(self._start_resources())
        elif d.action is Action.STOP_RESOURCES:
            self._stop_started = now
            self._stop_had_lease = False
            self.resources = Resources.STOPPING
            self._spawn(self._stop_resources())

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception:
                log.exception("cluster: action failed")
            finally:
                self._wake.set()

        self._action = asyncio.get_running_loop().create_task(run(), name="cluster-action")

    async def _promote(self, d: Decision) -> None:
        self.resources = Resources.STARTING
        t0 = self.clock()
        try:
            await self.repl.promote(force=False, reason=f"cluster: {d.reason}")
        except RoleError as e:
            log.error("cluster: promotion refused by the role controller: %s", e)
            self.resources = (
                Resources.FAILED if self.repl.role is Role.PRIMARY else Resources.STOPPED
            )
            return
        except Exception:
            self.resources = (
                Resources.FAILED if self.repl.role is Role.PRIMARY else Resources.STOPPED
            )
            raise
        self.resources = Resources.STARTED
        extra = ""
        if self.dead_since is not None:
            since = self.clock() - self.dead_since + self.timing.deadtime
            extra = f", {since:.2f}s after the peer's last heartbeat"
        log.warning("cluster: PROMOTED (%s) in %.2fs%s", d.reason, self.clock() - t0, extra)

    async def _demote(self, d: Decision) -> None:
        try:
            await self.repl.demote()
        except RoleError as e:
            log.error("cluster: demotion refused: %s", e)
        finally:
            self.resources = (
                Resources.STOPPED if self.repl.role is not Role.PRIMARY else Resources.FAILED
            )
        log.warning("cluster: demoted (%s)", d.reason)

    async def _start_resources(self) -> None:
        try:
            await self.start_services()
        except Exception:
            self.resources = Resources.FAILED
            raise
        self.resources = Resources.STARTED

    async def _stop_resources(self) -> None:
        try:
            await self.stop_services()
        finally:
            self.resources = Resources.STOPPED

    def _start_fence(self, d: Decision) -> None:
        if self.agent is None or (self._fence_task is not None and not self._fence_task.done()):
            return
        agent = self.agent
        self.fence = _FenceEpisode(FenceStatus.RUNNING, "", None)
        self._fence_reason = d.reason
        target = FenceTarget(self.settings.peer_name, self.settings.peer_id, self.settings.name)
        log.warning("cluster: fencing %s with %s (%s)", target.name, agent.name, d.reason)

        async def run() -> None:
            try:
                out = await agent.fence(target, timeout=self.timing.fence_timeout)
            except Exception as e:  # an agent must not raise; count it as a failure
                out = FenceOutcome(FenceResult.FAILED, agent.name, f"agent error: {e}")
            status = {
                FenceResult.FENCED_OFF: FenceStatus.FENCED_OFF,
                FenceResult.TIMEOUT: FenceStatus.TIMEOUT,
            }.get(out.result, FenceStatus.FAILED)
            detail = out.detail
            if out.result is FenceResult.OUTDATED:
                detail += " (outdated only: not enough to promote)"
            self.fence = _FenceEpisode(status, detail, self.clock())
            lvl = logging.WARNING if status is FenceStatus.FENCED_OFF else logging.ERROR
            log.log(lvl, "cluster: fencing %s: %s (%s)", target.name, status.value, detail)
            if status is FenceStatus.FENCED_OFF:
                self.repl.peer_fenced()
            self._wake.set()

        self._fence_task = asyncio.get_running_loop().create_task(run(), name="cluster-fence")

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        now = self.clock()
        s = self.snapshot(now)
        ps = self.hb.peer_status
        t = self.timing
        lease: dict[str, object] = {
            "held": self.lease.held(now),
            "term": self.lease.term,
            "expires_in": round(self.lease.stop_at - now, 3) if self.lease.held(now) else None,
        }
        return {
            "cluster": self.settings.name,
            "mode": "two-node" if self.settings.two_node else "witness",
            "node": {
                "name": self.settings.node_name,
                "id": self.settings.node_id.hex(),
                "role": s.me.role.value,
                "disk": s.me.disk.value,
                "resources": s.me.resources.value,
                "standby": s.me.standby,
                "generation": s.me.generation,
                "outdated": s.me.outdated,
                "can_ack": ack_allowed(self.snapshot(now, for_ack=True)),
            },
            "peer": {
                "name": self.settings.peer_name,
                "id": self.settings.peer_id.hex(),
                "state": s.peer.state.value,
                "role": s.peer.role.value if s.peer.role else None,
                "disk": s.peer.disk.value if s.peer.disk else None,
                "standby": s.peer.standby,
                "resources_stopped": s.peer.resources_stopped,
                "outdated": s.peer.outdated,
                "last_heard_ago": round(now - s.peer.last_heard, 3)
                if s.peer.last_heard is not None
                else None,
                "last_lsn": ps.last_lsn if ps is not None else None,
                "fence": s.peer.fence.value,
                "fence_detail": s.peer.fence_detail,
            },
            "links": [
                {"link": i, "name": name, "state": st.value}
                for i, (name, st) in enumerate(zip(self.hb.links, s.peer.links, strict=True))
            ],
            "quorum": {
                "witness": self.settings.witness or None,
                "reachable": s.witness.reachable,
                "owner": s.witness.owner.value,
                "lease": lease,
            },
            "replication": {
                "connected": s.repl.connected,
                "peer_confirms_writes": s.repl.peer_confirms_writes,
                "protocol": self.repl.settings.protocol.value,
                "barrier": self.repl.core.mode.value,
            },
            "decision": {
                "action": self.last.action.value if self.last else None,
                "reason": self.last.reason if self.last else None,
                "detail": self.last.detail if self.last else "",
            },
            "history": list(self.decisions),
            "timing": {k: getattr(t, k) for k in sorted(vars(t))},
            "heartbeats_refused": dict(self._stats.refused),
            "uptime_seconds": round(now - self.started_at, 3),
        }
