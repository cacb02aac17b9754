"""The decision function: one cluster snapshot in, one action and its reason out.

Theory of operation
-------------------
Each cycle the node adapter builds an immutable :class:`ClusterSnapshot` (this node, the peer as
heartbeats show it, the witness, the replication link, the monitors, a pending CLI command) and
calls :func:`decide`. The result is one :class:`Decision`: an :class:`Action` and a short named
``reason`` (listed in :data:`REASONS`, logged by the adapter, shown by ``cluster status``). The
adapter alone executes it, and it is the only caller of the role controller; CLI role commands
reach the cluster only as ``command`` inputs, accepted or refused here.

The rules, first match wins (docs/cluster.md has the full table):

1. A graceful stop that overran its deadline → ``SELF_FENCE``.
2. A pending command → its action, or ``REFUSE`` with the reason.
3. As primary: demote on store error, on a both-primary conflict (older term yields), on a lost
   quorum (no lease and no peer confirming writes), on standby or failed listeners; with the
   peer lost, outdate it at the witness (resource-only) or shoot it (two-node, STONITH); a
   live two-node peer that does not confirm is never shot: writes wait while it could be
   UpToDate and go on while it cannot (Outdated/Inconsistent); start missing resources.
4. As secondary: stop stray resources; give back a lease it must not hold; stay while standby,
   not UpToDate, Outdated, the peer is primary (no automatic failback), waiting for all at first
   start (two-node) or within initdead; otherwise take over — from a live secondary peer that
   the tie-break favours less, or from a dead peer once it is **fenced** (clean shutdown seen;
   the witness re-granted its vote to us and self-fence is armed cluster-wide; or STONITH
   confirmed it off), never before.

:func:`ack_allowed` is the acknowledgement gate (every ``250``/``OK``, and the queue runner
before each attempt and before the final "."), computed from the same snapshot.

Invariants (tested, with Hypothesis over a model of both nodes and the witness in virtual time):

* **One writer.** With a witness, a node acknowledges only while it holds the lease or while
  every acknowledgement also waits for the peer's confirmation (protocol B/C, connected, in
  sync); without one, only while the peer confirms, was fenced off since it was lost, or is
  alive, Secondary and Outdated/Inconsistent by every report (:func:`peer_not_promotable`).
* **Nothing acknowledged is lost by a failover.** A primary that lost its peer acknowledges
  alone only after the peer is marked Outdated at the witness (or fenced off, two-node), and an
  Outdated node never gets the vote, so never promotes. A two-node primary acknowledges
  without a live peer's confirmation only while that peer cannot be promoted and can become
  UpToDate only by a resync that ends after every write released here.
* ``PROMOTE`` only if UpToDate, not Outdated, the lease held (witness mode) and the peer fenced
  or cleanly demoted/shut down.
* Losing only the witness changes no role; automatic failback is off.
* :func:`decide` is total and pure: every snapshot gets exactly one decision.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..repl.state import DiskState, Role
from .fencing import fence_delay
from .heartbeat import LinkState, PeerState
from .timing import DEFAULT_TIMING, Timing

__all__ = [
    "REASONS",
    "Action",
    "ClusterSnapshot",
    "Command",
    "CommandKind",
    "CommandOutcome",
    "Decision",
    "FenceStatus",
    "Me",
    "Monitors",
    "Owner",
    "Peer",
    "Policy",
    "ReplView",
    "Resources",
    "WitnessView",
    "ack_allowed",
    "decide",
    "peer_not_promotable",
]


class Action(enum.Enum):
    STAY = "stay"
    ACQUIRE_LEASE = "acquire-lease"  # ask the witness for the vote
    RELEASE_LEASE = "release-lease"  # give the vote back (resources already stopped)
    OUTDATE_PEER = "outdate-peer"  # resource-only fencing: mark the peer Outdated at the witness
    CLEAR_PEER_OUTDATED = "clear-peer-outdated"  # the peer is in sync again
    FENCE_PEER = "fence-peer"  # run the STONITH agent
    PROMOTE = "promote"  # role → primary, then start resources
    START_RESOURCES = "start-resources"
    DEMOTE = "demote"  # graceful stop of every resource, then role → secondary
    STOP_RESOURCES = "stop-resources"
    SELF_FENCE = "self-fence"  # exit now
    REFUSE = "refuse"  # refuse the pending command (reason says why)


class Resources(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    STARTED = "started"
    STOPPING = "stopping"
    FAILED = "failed"


class FenceStatus(enum.Enum):
    """The STONITH attempts against the peer since it was last lost (reset when it returns)."""

    NONE = "none"
    RUNNING = "running"
    FENCED_OFF = "fenced-off"
    FAILED = "failed"
    TIMEOUT = "timeout"


class Owner(enum.Enum):
    """The witness's vote holder as last heard from the witness."""

    ME = "me"
    PEER = "peer"
    NONE = "none"
    UNKNOWN = "unknown"


class CommandKind(enum.Enum):
    SWITCHOVER = "switchover"
    STANDBY = "standby"
    UNSTANDBY = "unstandby"
    FENCE = "fence"


class CommandOutcome(enum.Enum):
    NONE = "none"  # no command was pending
    ACCEPTED = "accepted"  # the adapter records its effect (standby flag) and drops it
    REFUSED = "refused"


@dataclass(frozen=True)
class Command:
    """A CLI input; ``on_peer`` for standby/unstandby/fence naming the peer node."""

    kind: CommandKind
    on_peer: bool = False
    force: bool = False


@dataclass(frozen=True)
class Me:
    node_id: bytes
    role: Role
    disk: DiskState
    generation: int = 0
    term: int = 0
    #: The lease is held and its stop point not passed (LeaseClient.held).
    lease_held: bool = False
    standby: bool = False
    resources: Resources = Resources.STOPPED
    #: A graceful stop overran its deadline (:func:`.fencing.stop_deadline`), or an armed
    #: self-fence passed ``exit_by`` with resources running: exit (self-fence escalation).
    stop_overdue: bool = False
    #: The witness records this node as Outdated.
    outdated: bool = False


@dataclass(frozen=True)
class Peer:
    node_id: bytes
    state: PeerState = PeerState.UNKNOWN
    links: tuple[LinkState, ...] = ()
    #: Heard at least once since this node started.
    seen: bool = False
    last_heard: float | None = None
    #: When the peer was declared dead (all links dead), for the fence delay.
    dead_since: float | None = None
    role: Role | None = None
    disk: DiskState | None = None
    term: int = 0
    #: Standby, yielding after a switchover, or not eligible (failed monitors).
    standby: bool = False
    resources_stopped: bool = True
    #: Its last heartbeat said SHUTDOWN (everything stopped, leaving) before it went silent.
    clean_shutdown: bool = False
    #: The witness records the peer as Outdated.
    outdated: bool = False
    fence: FenceStatus = FenceStatus.NONE
    fence_detail: str = ""
    #: When the last fence attempt finished (for the retry interval).
    fence_finished: float | None = None


@dataclass(frozen=True)
class WitnessView:
    configured: bool = True
    reachable: bool = True
    owner: Owner = Owner.UNKNOWN


@dataclass(frozen=True)
class ReplView:
    #: The replication handshake is done (histories compared, resync decided).
    connected: bool = False
    #: Every acknowledgement waits for the peer's confirmation: protocol B/C, link established,
    #: peer in sync.
    peer_confirms_writes: bool = False
    #: The peer's disk as the replication link last reported it (its STATE at the handshake,
    #: Inconsistent when it became our sync target, UpToDate once it made the resync end
    #: durable, Diskless); None without an established link.
    peer_disk: DiskState | None = None
    #: The replication layer guarantees that the peer is never UpToDate without every batch
    #: released here: a sync target becomes UpToDate only once it durably holds every frame
    #: this primary appended before its barrier began waiting for it (SYNC_DONE after the
    #: frames appended during the resync), and from then on nothing is released without the
    #: peer until it is fenced (``replication.fencing = resource-and-stonith``). Without it a
    #: two-node primary never acknowledges an unconfirmed write to a live peer
    #: (:func:`peer_not_promotable`).
    peer_uptodate_holds_released: bool = False


@dataclass(frozen=True)
class Monitors:
    store_error: bool = False
    #: A listener or the queue runner failed and local restarts are exhausted.
    resource_failed: bool = False


@dataclass(frozen=True)
class Policy:
    timing: Timing = DEFAULT_TIMING
    #: A STONITH agent is configured (required without a witness).
    stonith: bool = False
    #: Self-fencing is armed cluster-wide (the default with a witness).
    self_fence: bool = True
    #: Node preferred when both are secondary at start (else the lower node id).
    preferred: bytes | None = None


@dataclass(frozen=True)
class ClusterSnapshot:
    now: float
    me: Me
    peer: Peer
    witness: WitnessView = field(default_factory=WitnessView)
    repl: ReplView = field(default_factory=ReplView)
    monitors: Monitors = field(default_factory=Monitors)
    policy: Policy = field(default_factory=Policy)
    command: Command | None = None


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    detail: str = ""
    command: CommandOutcome = CommandOutcome.NONE


#: Every reason :func:`decide` gives, with its meaning (docs/cluster.md shows this table).
REASONS: dict[str, str] = {
    "stop-timeout": "a graceful stop overran its deadline: exit now (self-fence)",
    "fence-self": "refused: a node cannot fence itself",
    "no-fence-agent": "refused: no STONITH agent is configured",
    "fence-in-progress": "refused: a fence of the peer is already running",
    "fence-requested": "an operator asked to fence the peer",
    "standby": "this node is in standby: no resources here",
    "standby-no-takeover": "refused: the peer cannot take over (down, standby or not in sync)",
    "unstandby": "standby cleared; no automatic failback",
    "forward-to-peer": "refused: the command concerns the peer; send it to that node",
    "switchover": "planned switchover: demote gracefully, the peer takes over",
    "switchover-not-primary": "refused: run switchover on the primary",
    "switchover-peer-down": "refused: the peer is not reachable",
    "switchover-peer-standby": "refused: the peer is in standby",
    "switchover-peer-not-in-sync": "refused: the peer is not UpToDate and in sync",
    "switchover-no-witness": "refused: the witness is unreachable; the peer could not get the vote",
    "demoting": "a graceful stop is in progress",
    "store-error": "the store is in ERROR: no writes here",
    "both-primary": "both nodes are primary: the older term (or higher id) yields",
    "lease-lost": "no witness lease and no peer confirming writes: stop acknowledging, demote",
    "fencing-peer": "the peer is being fenced",
    "fence-retry": "fencing failed; retrying",
    "fence-failed": "fencing failed; not writing until the peer is fenced (retry pending)",
    "peer-not-in-sync": "two-node mode: the peer is alive but does not confirm writes yet "
    "and could be UpToDate; it is not fenced, writes wait",
    "peer-not-promotable": "two-node mode: the peer is alive, Secondary and Outdated or "
    "Inconsistent (restarted, resyncing): it cannot be promoted, writes go on without it",
    "peer-lost-fence": "the peer is lost and writes are frozen: fence it (two-node mode)",
    "peer-lost-outdate": "the peer is lost: mark it Outdated at the witness before writing on",
    "peer-in-sync-clear": "the peer is in sync again: clear its Outdated mark",
    "resource-failed": "a resource failed beyond local recovery: fail over",
    "resource-failed-no-takeover": "a resource failed but the peer cannot take over: keep going",
    "start-resources": "primary without all resources: start them in order",
    "starting": "resources are starting",
    "primary": "primary with the lease (or peer quorum): nothing to do",
    "primary-witness-lost": "witness lost, the peer confirms every write: no role change",
    "primary-alone": "primary; the peer is lost and Outdated: writing alone",
    "secondary-resources-running": "secondary with resources running: stop them",
    "release-lease": "secondary holding the vote it does not need: give it back",
    "peer-primary": "the peer is primary (no automatic failback)",
    "not-uptodate": "disk not UpToDate: cannot be promoted automatically",
    "outdated": "the witness records this node Outdated: cannot be promoted",
    "wait-for-all": "two-node mode: waiting to see the peer once before acting",
    "initdead": "first start: waiting up to initdead for the peer",
    "repl-not-connected": "peer alive but replication not connected: histories not compared",
    "peer-preferred": "both secondary: the peer is favoured to become primary",
    "peer-stopping": "the peer still runs resources",
    "witness-unreachable": "the witness is unreachable: cannot take the vote",
    "lease-held-by-peer": "the witness's vote is held by the peer",
    "acquire-lease": "asking the witness for the vote",
    "takeover": "the peer is secondary with resources stopped: promote",
    "peer-dead": "the peer is dead: take the vote / fence it",
    "wait-peer-lease": "the peer is dead; its lease (plus margin) has not run out yet",
    "fence-delay": "two-node fence race: waiting the configured delay",
    "no-fencing-method": "the peer is dead but no fencing method can confirm it",
    "failover": "the peer is fenced: promote",
}


def _d(
    action: Action, reason: str, detail: str = "", cmd: CommandOutcome = CommandOutcome.NONE
) -> Decision:
    assert reason in REASONS, reason
    return Decision(action, reason, detail, cmd)


def _witness_mode(s: ClusterSnapshot) -> bool:
    return s.witness.configured


def _confirms(s: ClusterSnapshot) -> bool:
    """Every acknowledgement waits for the peer, and heartbeats say the peer is there (a node
    resuming from a pause sees its peer dead until fresh heartbeats arrive, whatever its stale
    replication view says)."""
    return s.repl.peer_confirms_writes and s.peer.state is PeerState.ALIVE


def peer_can_take_over(s: ClusterSnapshot) -> bool:
    """The peer is alive, UpToDate, in sync, not standby and not Outdated."""
    p = s.peer
    return (
        p.state is PeerState.ALIVE
        and p.disk is DiskState.UP_TO_DATE
        and not p.standby
        and not p.outdated
        and _confirms(s)
    )


#: Disk states that are never promoted automatically and leave only by a resync from us.
_NOT_PROMOTABLE = (DiskState.OUTDATED, DiskState.INCONSISTENT)


def peer_not_promotable(s: ClusterSnapshot) -> bool:
    """Two-node mode: the peer is alive, Secondary, and every report of its disk says Outdated
    or Inconsistent — its heartbeats and, with a link up, the replication link — so it cannot
    be promoted without ``--force`` and becomes UpToDate only by a resync from this primary,
    which (``ReplView.peer_uptodate_holds_released``) ends only once it holds every write
    released here, after which nothing is released without it until it is fenced. A primary
    may then acknowledge without its confirmation (DRBD's primary writing on while its peer
    is Outdated or a SyncTarget). The safety argument, including stale views, is in
    docs/cluster.md ("A live peer that cannot be promoted")."""
    p = s.peer
    return (
        not _witness_mode(s)
        and s.repl.peer_uptodate_holds_released
        and p.state is PeerState.ALIVE
        and p.role is Role.SECONDARY
        and p.disk in _NOT_PROMOTABLE
        and (s.repl.peer_disk is None or s.repl.peer_disk in _NOT_PROMOTABLE)
    )


def ack_allowed(s: ClusterSnapshot) -> bool:
    """The acknowledgement gate: may this node send ``250``/``OK`` (or send the final "." of an
    outbound attempt) now? Checked immediately before each, on a fresh snapshot."""
    me = s.me
    if me.role is not Role.PRIMARY or me.resources is not Resources.STARTED:
        return False
    if me.stop_overdue or s.monitors.store_error:
        return False
    if _confirms(s):
        return True  # each ack waits for the peer: it holds everything we acknowledge
    if _witness_mode(s):
        return me.lease_held and s.peer.outdated
    return s.peer.fence is FenceStatus.FENCED_OFF or peer_not_promotable(s)


def _peer_fenced(s: ClusterSnapshot) -> bool:
    """The peer cannot write: clean shutdown seen, vote re-granted to us with self-fence armed,
    or STONITH confirmed it off."""
    p = s.peer
    if p.clean_shutdown or p.fence is FenceStatus.FENCED_OFF:
        return True
    return _witness_mode(s) and s.policy.self_fence and s.me.lease_held


def _fence_step(s: ClusterSnapshot, *, delay: float, first_reason: str) -> Decision:
    """Drive STONITH against the peer: start, wait, retry after failure, or report success."""
    p, t = s.peer, s.policy.timing
    if not s.policy.stonith:
        return _d(Action.STAY, "no-fencing-method")
    if p.fence is FenceStatus.RUNNING:
        return _d(Action.STAY, "fencing-peer")
    if p.fence in (FenceStatus.FAILED, FenceStatus.TIMEOUT):
        since = p.fence_finished if p.fence_finished is not None else float("-inf")
        if s.now - since >= t.fence_retry:
            return _d(Action.FENCE_PEER, "fence-retry", p.fence_detail)
        return _d(Action.STAY, "fence-failed", p.fence_detail)
    dead_since = p.dead_since if p.dead_since is not None else s.now
    if s.now - dead_since < delay:
        return _d(Action.STAY, "fence-delay", f"{delay - (s.now - dead_since):.3f}s left")
    return _d(Action.FENCE_PEER, first_reason)


def _command(s: ClusterSnapshot, c: Command) -> Decision:
    me, p = s.me, s.peer
    acc, ref = CommandOutcome.ACCEPTED, CommandOutcome.REFUSED
    if c.kind is CommandKind.FENCE:
        if not c.on_peer:
            return _d(Action.REFUSE, "fence-self", cmd=ref)
        if not s.policy.stonith:
            return _d(Action.REFUSE, "no-fence-agent", cmd=ref)
        if p.fence is FenceStatus.RUNNING:
            return _d(Action.REFUSE, "fence-in-progress", cmd=ref)
        return _d(Action.FENCE_PEER, "fence-requested", cmd=acc)
    if c.on_peer:
        return _d(Action.REFUSE, "forward-to-peer", cmd=ref)
    if c.kind is CommandKind.UNSTANDBY:
        return _d(Action.STAY, "unstandby", cmd=acc)
    if c.kind is CommandKind.STANDBY:
        if me.role is Role.PRIMARY and not me.standby:
            if not c.force and not peer_can_take_over(s):
                return _d(Action.REFUSE, "standby-no-takeover", cmd=ref)
            return _d(Action.DEMOTE, "standby", cmd=acc)
        return _d(Action.STAY, "standby", cmd=acc)
    # switchover
    if me.role is not Role.PRIMARY:
        return _d(Action.REFUSE, "switchover-not-primary", cmd=ref)
    if p.state is not PeerState.ALIVE:
        return _d(Action.REFUSE, "switchover-peer-down", cmd=ref)
    if p.standby:
        return _d(Action.REFUSE, "switchover-peer-standby", cmd=ref)
    if p.disk is not DiskState.UP_TO_DATE or p.outdated or not _confirms(s):
        return _d(Action.REFUSE, "switchover-peer-not-in-sync", cmd=ref)
    if _witness_mode(s) and not s.witness.reachable:
        return _d(Action.REFUSE, "switchover-no-witness", cmd=ref)
    return _d(Action.DEMOTE, "switchover", cmd=acc)


def _primary(s: ClusterSnapshot) -> Decision:
    me, p, mon = s.me, s.peer, s.monitors
    if me.resources is Resources.STOPPING:
        return _d(Action.STAY, "demoting")
    if mon.store_error:
        return _d(Action.DEMOTE, "store-error")
    if (
        p.state is PeerState.ALIVE
        and p.role is Role.PRIMARY
        # With a witness the lease decides: its holder never yields (the other side has no
        # lease and demotes by "lease-lost"), whatever term a resumed old primary advertises.
        and not (_witness_mode(s) and me.lease_held)
        and (me.term < p.term or (me.term == p.term and me.node_id > p.node_id))
    ):
        return _d(Action.DEMOTE, "both-primary", f"my term {me.term}, peer's {p.term}")
    confirms = _confirms(s)
    if _witness_mode(s):
        if not me.lease_held and not confirms:
            return _d(Action.DEMOTE, "lease-lost")
        if not confirms and not p.outdated:
            return _d(Action.OUTDATE_PEER, "peer-lost-outdate")
        if confirms and p.outdated and me.lease_held:
            return _d(Action.CLEAR_PEER_OUTDATED, "peer-in-sync-clear")
    elif not confirms and p.fence is not FenceStatus.FENCED_OFF and not peer_not_promotable(s):
        if p.state is PeerState.ALIVE:
            # Heartbeats show the peer alive: it is connecting or resyncing, not lost. Never
            # shoot a live secondary; it could be UpToDate without our unconfirmed writes, so
            # writes wait (ack_allowed) until it confirms them.
            return _d(Action.STAY, "peer-not-in-sync")
        return _fence_step(s, delay=_my_fence_delay(s), first_reason="peer-lost-fence")
    if me.standby:
        return _d(Action.DEMOTE, "standby")
    if mon.resource_failed:
        if peer_can_take_over(s):
            return _d(Action.DEMOTE, "resource-failed")
        if me.resources is Resources.STARTED:
            return _d(Action.STAY, "resource-failed-no-takeover")
    if me.resources in (Resources.STOPPED, Resources.FAILED):
        return _d(Action.START_RESOURCES, "start-resources")
    if me.resources is Resources.STARTING:
        return _d(Action.STAY, "starting")
    if not confirms and (p.outdated or p.fence is FenceStatus.FENCED_OFF):
        return _d(Action.STAY, "primary-alone")
    if not confirms and peer_not_promotable(s):
        return _d(Action.STAY, "peer-not-promotable", p.disk.value if p.disk else "")
    if _witness_mode(s) and not me.lease_held:
        return _d(Action.STAY, "primary-witness-lost")
    return _d(Action.STAY, "primary")


def _my_fence_delay(s: ClusterSnapshot) -> float:
    return fence_delay(
        s.policy.timing,
        my_role=s.me.role,
        peer_role=s.peer.role,
        my_id=s.me.node_id,
        peer_id=s.peer.node_id,
    )


def _favoured(s: ClusterSnapshot) -> bool:
    """Both secondary and both eligible: is this node the one to become primary?"""
    if s.witness.owner is Owner.ME:
        return True
    if s.witness.owner is Owner.PEER:
        return False
    if s.policy.preferred in (s.me.node_id, s.peer.node_id):
        return s.policy.preferred == s.me.node_id
    return s.me.node_id < s.peer.node_id


def _takeover(s: ClusterSnapshot, reason: str) -> Decision:
    """The peer is fenced or cleanly out of the way: get the vote (witness mode) and promote."""
    if _witness_mode(s) and not s.me.lease_held:
        if not s.witness.reachable:
            return _d(Action.STAY, "witness-unreachable")
        if s.witness.owner is Owner.PEER:
            if s.peer.state is PeerState.ALIVE:
                return _d(Action.STAY, "lease-held-by-peer")
            return _d(Action.ACQUIRE_LEASE, "wait-peer-lease")
        return _d(Action.ACQUIRE_LEASE, "acquire-lease" if reason == "takeover" else "peer-dead")
    return _d(Action.PROMOTE, reason)


def _secondary(s: ClusterSnapshot) -> Decision:
    me, p, mon = s.me, s.peer, s.monitors
    if me.resources is Resources.STOPPING:
        return _d(Action.STAY, "demoting")
    if me.resources is not Resources.STOPPED:
        return _d(Action.STOP_RESOURCES, "secondary-resources-running")
    peer_primary = p.state is PeerState.ALIVE and p.role is Role.PRIMARY
    ineligible = me.standby or mon.store_error or mon.resource_failed
    if me.lease_held and (ineligible or peer_primary):
        return _d(Action.RELEASE_LEASE, "release-lease")
    if me.standby:
        return _d(Action.STAY, "standby")
    if mon.store_error:
        return _d(Action.STAY, "store-error")
    if mon.resource_failed:
        return _d(Action.STAY, "resource-failed")
    if peer_primary:
        return _d(Action.STAY, "peer-primary")
    if me.disk is not DiskState.UP_TO_DATE:
        return _d(Action.STAY, "not-uptodate", me.disk.value)
    if me.outdated:
        return _d(Action.STAY, "outdated")
    if not _witness_mode(s) and not p.seen:
        return _d(Action.STAY, "wait-for-all")
    if p.state is PeerState.UNKNOWN:
        return _d(Action.STAY, "initdead")
    if p.state is PeerState.ALIVE:
        if not s.repl.connected:
            return _d(Action.STAY, "repl-not-connected")
        peer_eligible = p.disk is DiskState.UP_TO_DATE and not p.standby and not p.outdated
        if peer_eligible and not _favoured(s):
            return _d(Action.STAY, "peer-preferred")
        if not p.resources_stopped:
            return _d(Action.STAY, "peer-stopping")
        return _takeover(s, "takeover")
    # the peer is dead
    if p.clean_shutdown:
        return _takeover(s, "failover")
    if _witness_mode(s):
        if not s.policy.self_fence and not s.policy.stonith:
            return _d(Action.STAY, "no-fencing-method")
        if not me.lease_held:
            return _takeover(s, "peer-dead")
        if s.policy.self_fence:
            return _d(Action.PROMOTE, "failover")
        if p.fence is FenceStatus.FENCED_OFF:
            return _d(Action.PROMOTE, "failover")
        return _fence_step(s, delay=0.0, first_reason="peer-dead")
    if p.fence is FenceStatus.FENCED_OFF:
        return _d(Action.PROMOTE, "failover")
    return _fence_step(s, delay=_my_fence_delay(s), first_reason="peer-dead")


def decide(s: ClusterSnapshot) -> Decision:
    """The one decision of this cycle (see the module docstring for the rules)."""
    if s.me.stop_overdue and s.me.resources is not Resources.STOPPED:
        return _d(Action.SELF_FENCE, "stop-timeout")
    if s.command is not None:
        return _command(s, s.command)
    if s.me.role is Role.PRIMARY:
        return _primary(s)
    d = _secondary(s)
    if d.action is Action.PROMOTE:
        assert _peer_fenced(s) or (s.peer.state is PeerState.ALIVE and s.peer.resources_stopped)
    return d
