"""The decision function, scenario by scenario, in virtual time (snapshots built by hand)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailharbor.cluster.decide import (
    REASONS,
    Action,
    ClusterSnapshot,
    Command,
    CommandKind,
    CommandOutcome,
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
from mailharbor.cluster.heartbeat import PeerState
from mailharbor.cluster.timing import DEFAULT_TIMING as T
from mailharbor.repl.state import DiskState, Role

A, B = b"\x0a" * 16, b"\x0b" * 16
UP = DiskState.UP_TO_DATE


def healthy_primary(**kw: object) -> ClusterSnapshot:
    s = ClusterSnapshot(
        now=100.0,
        me=Me(A, Role.PRIMARY, UP, term=5, lease_held=True, resources=Resources.STARTED),
        peer=Peer(B, PeerState.ALIVE, seen=True, role=Role.SECONDARY, disk=UP, term=5),
        witness=WitnessView(True, True, Owner.ME),
        repl=ReplView(connected=True, peer_confirms_writes=True),
    )
    return dataclasses.replace(s, **kw)  # type: ignore[arg-type]


def healthy_secondary(**kw: object) -> ClusterSnapshot:
    s = ClusterSnapshot(
        now=100.0,
        me=Me(B, Role.SECONDARY, UP, term=5),
        peer=Peer(
            A,
            PeerState.ALIVE,
            seen=True,
            role=Role.PRIMARY,
            disk=UP,
            term=5,
            resources_stopped=False,
        ),
        witness=WitnessView(True, True, Owner.PEER),
        repl=ReplView(connected=True, peer_confirms_writes=False),
    )
    return dataclasses.replace(s, **kw)  # type: ignore[arg-type]


def me(s: ClusterSnapshot, **kw: object) -> ClusterSnapshot:
    return dataclasses.replace(s, me=dataclasses.replace(s.me, **kw))  # type: ignore[arg-type]


def peer(s: ClusterSnapshot, **kw: object) -> ClusterSnapshot:
    return dataclasses.replace(s, peer=dataclasses.replace(s.peer, **kw))  # type: ignore[arg-type]


def dead(s: ClusterSnapshot, since: float = 98.0) -> ClusterSnapshot:
    return peer(s, state=PeerState.DEAD, dead_since=since)


def two_node(s: ClusterSnapshot) -> ClusterSnapshot:
    return dataclasses.replace(
        s,
        witness=WitnessView(configured=False, reachable=False, owner=Owner.UNKNOWN),
        policy=Policy(stonith=True, self_fence=False),
        me=dataclasses.replace(s.me, lease_held=False),
    )


def check(s: ClusterSnapshot, action: Action, reason: str) -> None:
    d = decide(s)
    assert (d.action, d.reason) == (action, reason), d


# --- no faults ---------------------------------------------------------------------------------


def test_no_faults_no_change() -> None:
    check(healthy_primary(), Action.STAY, "primary")
    check(healthy_secondary(), Action.STAY, "peer-primary")
    assert ack_allowed(healthy_primary())
    assert not ack_allowed(healthy_secondary())


# --- primary dead: fence then promote ----------------------------------------------------------


def test_primary_dead_with_witness_take_the_vote_then_promote() -> None:
    s = dead(healthy_secondary())
    check(s, Action.ACQUIRE_LEASE, "wait-peer-lease")  # the witness still counts its lease
    s = dataclasses.replace(s, witness=WitnessView(True, True, Owner.NONE))
    check(s, Action.ACQUIRE_LEASE, "peer-dead")
    check(me(s, lease_held=True), Action.PROMOTE, "failover")


def test_primary_dead_two_node_fence_then_promote() -> None:
    s = two_node(dead(healthy_secondary(), since=100.0))
    check(s, Action.STAY, "fence-delay")  # the secondary waits: the primary shoots first
    s = dataclasses.replace(s, now=100.0 + T.fence_delay)
    check(s, Action.FENCE_PEER, "peer-dead")
    check(peer(s, fence=FenceStatus.RUNNING), Action.STAY, "fencing-peer")
    check(peer(s, fence=FenceStatus.FENCED_OFF), Action.PROMOTE, "failover")


def test_fencing_failed_no_promotion_retry_and_say_why() -> None:
    s = two_node(dead(healthy_secondary(), since=0.0))
    f = peer(
        s, fence=FenceStatus.FAILED, fence_detail="exit 5: peer unreachable", fence_finished=99.5
    )
    d = decide(f)
    assert (d.action, d.reason, d.detail) == (
        Action.STAY,
        "fence-failed",
        "exit 5: peer unreachable",
    )
    f = dataclasses.replace(f, now=99.5 + T.fence_retry)
    check(f, Action.FENCE_PEER, "fence-retry")
    check(peer(f, fence=FenceStatus.TIMEOUT), Action.FENCE_PEER, "fence-retry")
    none = Policy(stonith=False, self_fence=False)
    check(
        dataclasses.replace(two_node(dead(healthy_secondary())), policy=none),
        Action.STAY,
        "no-fencing-method",
    )


def test_clean_shutdown_counts_as_fenced() -> None:
    s = two_node(peer(dead(healthy_secondary()), clean_shutdown=True))
    check(s, Action.PROMOTE, "failover")


# --- witness lost only -------------------------------------------------------------------------


def test_witness_lost_only_changes_no_role() -> None:
    lost = WitnessView(True, reachable=False, owner=Owner.UNKNOWN)
    p = dataclasses.replace(me(healthy_primary(), lease_held=False), witness=lost)
    check(p, Action.STAY, "primary-witness-lost")
    assert ack_allowed(p)  # every ack waits for the peer's confirmation
    check(dataclasses.replace(healthy_secondary(), witness=lost), Action.STAY, "peer-primary")


# --- both links cut, witness up ----------------------------------------------------------------


def test_links_cut_only_the_lease_holder_acknowledges() -> None:
    cut = ReplView(connected=False, peer_confirms_writes=False)
    p = dead(dataclasses.replace(healthy_primary(), repl=cut))
    check(p, Action.OUTDATE_PEER, "peer-lost-outdate")
    assert not ack_allowed(p)  # frozen until the peer is Outdated
    p = peer(p, outdated=True)
    check(p, Action.STAY, "primary-alone")
    assert ack_allowed(p)
    s = dead(dataclasses.replace(healthy_secondary(), repl=cut))
    check(s, Action.ACQUIRE_LEASE, "wait-peer-lease")  # witness answers BUSY, then OUTDATED
    check(me(s, outdated=True), Action.STAY, "outdated")
    assert not ack_allowed(s)


def test_primary_isolated_from_everyone_demotes() -> None:
    cut = ReplView(connected=False, peer_confirms_writes=False)
    p = me(dead(dataclasses.replace(healthy_primary(), repl=cut)), lease_held=False)
    check(p, Action.DEMOTE, "lease-lost")
    assert not ack_allowed(p)


# --- paused primary resumes --------------------------------------------------------------------


def test_paused_primary_on_resume_stops_acking_and_demotes() -> None:
    # after SIGSTOP past deadtime: the lease (counted from the send) has expired, every link's
    # last heartbeat is old (peer DEAD), the replication view is stale (still "confirms")
    p = me(dead(healthy_primary()), lease_held=False)
    assert not ack_allowed(p)
    check(p, Action.DEMOTE, "lease-lost")
    # fresh heartbeats then show the new primary with a newer term
    p2 = peer(me(healthy_primary(), lease_held=False), role=Role.PRIMARY, term=6)
    check(p2, Action.DEMOTE, "both-primary")
    # ...while the new primary, which holds the lease, never yields to the resumed one,
    # whatever term the resumed one's last heartbeats advertise (found by the SIGSTOP
    # acceptance test: an equal term made the lease holder stand down)
    for term in (5, 6, 99):
        holder = peer(me(healthy_primary(), lease_held=True), role=Role.PRIMARY, term=term)
        assert decide(holder).action is not Action.DEMOTE, term


# --- switchover, standby -----------------------------------------------------------------------


def test_switchover() -> None:
    s = dataclasses.replace(healthy_primary(), command=Command(CommandKind.SWITCHOVER))
    d = decide(s)
    assert (d.action, d.reason, d.command) == (Action.DEMOTE, "switchover", CommandOutcome.ACCEPTED)
    # the old primary, demoted and yielding, gives the vote back
    old = me(healthy_primary(), role=Role.SECONDARY, resources=Resources.STOPPED, standby=True)
    check(old, Action.RELEASE_LEASE, "release-lease")
    # the other node: peer secondary, standby (yielding), stopped
    t = peer(healthy_secondary(), role=Role.SECONDARY, standby=True, resources_stopped=True)
    t = dataclasses.replace(t, repl=ReplView(True, False))
    check(t, Action.STAY, "lease-held-by-peer")
    t = dataclasses.replace(t, witness=WitnessView(True, True, Owner.NONE))
    check(t, Action.ACQUIRE_LEASE, "acquire-lease")
    check(me(t, lease_held=True), Action.PROMOTE, "takeover")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"peer": {"state": PeerState.DEAD}}, "switchover-peer-down"),
        ({"peer": {"standby": True}}, "switchover-peer-standby"),
        ({"peer": {"disk": DiskState.INCONSISTENT}}, "switchover-peer-not-in-sync"),
        ({"repl": ReplView(True, False)}, "switchover-peer-not-in-sync"),
        ({"witness": WitnessView(True, False)}, "switchover-no-witness"),
        (
            {"me": {"role": Role.SECONDARY, "resources": Resources.STOPPED}},
            "switchover-not-primary",
        ),
    ],
)
def test_switchover_refused(change: dict[str, object], reason: str) -> None:
    s = dataclasses.replace(healthy_primary(), command=Command(CommandKind.SWITCHOVER))
    for k, v in change.items():
        if isinstance(v, dict):
            s = me(s, **v) if k == "me" else peer(s, **v)
        else:
            s = dataclasses.replace(s, **{k: v})  # type: ignore[arg-type]
    d = decide(s)
    assert (d.action, d.reason, d.command) == (Action.REFUSE, reason, CommandOutcome.REFUSED)


def test_standby_and_unstandby() -> None:
    s = dataclasses.replace(healthy_primary(), command=Command(CommandKind.STANDBY))
    check(s, Action.DEMOTE, "standby")
    check(dead(s), Action.REFUSE, "standby-no-takeover")
    forced = dataclasses.replace(dead(s), command=Command(CommandKind.STANDBY, force=True))
    check(forced, Action.DEMOTE, "standby")
    check(me(healthy_primary(), standby=True), Action.DEMOTE, "standby")
    sec = me(healthy_secondary(), standby=True)
    check(dead(sec), Action.STAY, "standby")  # a standby node never takes over
    un = dataclasses.replace(sec, command=Command(CommandKind.UNSTANDBY))
    d = decide(un)
    assert (d.action, d.reason, d.command) == (Action.STAY, "unstandby", CommandOutcome.ACCEPTED)
    on_peer = dataclasses.replace(sec, command=Command(CommandKind.STANDBY, on_peer=True))
    check(on_peer, Action.REFUSE, "forward-to-peer")


def test_fence_command() -> None:
    s = dataclasses.replace(
        two_node(healthy_secondary()), command=Command(CommandKind.FENCE, on_peer=True)
    )
    check(s, Action.FENCE_PEER, "fence-requested")
    check(peer(s, fence=FenceStatus.RUNNING), Action.REFUSE, "fence-in-progress")
    check(dataclasses.replace(s, command=Command(CommandKind.FENCE)), Action.REFUSE, "fence-self")
    check(
        dataclasses.replace(healthy_secondary(), command=s.command), Action.REFUSE, "no-fence-agent"
    )


# --- two-node mode: wait for all, fence race ---------------------------------------------------


def test_two_node_waits_for_both_at_first_start() -> None:
    s = two_node(me(healthy_secondary(), term=0))
    s = peer(s, state=PeerState.DEAD, seen=False, role=None, disk=None)
    check(s, Action.STAY, "wait-for-all")
    # with a witness: initdead, then the vote decides
    w = peer(me(healthy_secondary(), term=0), state=PeerState.UNKNOWN, seen=False, role=None)
    check(w, Action.STAY, "initdead")


def test_two_node_fence_race_settled_by_delay() -> None:
    # both links cut; both alive. The primary shoots at once, the secondary waits.
    p = two_node(dead(healthy_primary(), since=100.0))
    p = dataclasses.replace(p, repl=ReplView(False, False))
    check(p, Action.FENCE_PEER, "peer-lost-fence")
    assert not ack_allowed(p)  # writes frozen until the peer is fenced
    assert ack_allowed(peer(p, fence=FenceStatus.FENCED_OFF))
    s = two_node(dead(healthy_secondary(), since=100.0))
    check(s, Action.STAY, "fence-delay")


# --- failback, start, monitors -----------------------------------------------------------------


def test_no_automatic_failback() -> None:
    # the old primary came back as secondary while its peer serves
    check(peer(healthy_secondary(), term=9), Action.STAY, "peer-primary")


def test_cluster_start_both_secondary_one_takes_over() -> None:
    def start(node: bytes, other: bytes) -> ClusterSnapshot:
        return ClusterSnapshot(
            now=5.0,
            me=Me(node, Role.SECONDARY, UP),
            peer=Peer(other, PeerState.ALIVE, seen=True, role=Role.SECONDARY, disk=UP),
            witness=WitnessView(True, True, Owner.NONE),
            repl=ReplView(connected=True),
        )

    check(start(A, B), Action.ACQUIRE_LEASE, "acquire-lease")  # lower id favoured
    check(start(B, A), Action.STAY, "peer-preferred")
    check(peer(start(B, A), disk=DiskState.OUTDATED), Action.ACQUIRE_LEASE, "acquire-lease")
    check(me(start(A, B), disk=DiskState.INCONSISTENT), Action.STAY, "not-uptodate")
    no_repl = dataclasses.replace(start(A, B), repl=ReplView(False, False))
    check(no_repl, Action.STAY, "repl-not-connected")
    check(peer(start(A, B), resources_stopped=False), Action.STAY, "peer-stopping")
    check(me(start(A, B), lease_held=True), Action.PROMOTE, "takeover")


def test_new_primary_starts_resources_then_serves() -> None:
    p = me(healthy_primary(), resources=Resources.STOPPED)
    check(p, Action.START_RESOURCES, "start-resources")
    assert not ack_allowed(p)
    check(me(p, resources=Resources.STARTING), Action.STAY, "starting")
    check(me(p, resources=Resources.STOPPING), Action.STAY, "demoting")


def test_monitors() -> None:
    err = dataclasses.replace(healthy_primary(), monitors=Monitors(store_error=True))
    check(err, Action.DEMOTE, "store-error")
    assert not ack_allowed(err)
    failed = dataclasses.replace(healthy_primary(), monitors=Monitors(resource_failed=True))
    check(failed, Action.DEMOTE, "resource-failed")
    check(dead(failed), Action.OUTDATE_PEER, "peer-lost-outdate")
    check(peer(dead(failed), outdated=True), Action.STAY, "resource-failed-no-takeover")
    sec = dataclasses.replace(dead(healthy_secondary()), monitors=Monitors(store_error=True))
    check(sec, Action.STAY, "store-error")
    check(me(sec, lease_held=True), Action.RELEASE_LEASE, "release-lease")


def test_stop_overrun_self_fences_and_secondary_stops_strays() -> None:
    check(
        me(healthy_primary(), stop_overdue=True, resources=Resources.STOPPING),
        Action.SELF_FENCE,
        "stop-timeout",
    )
    check(
        me(healthy_secondary(), resources=Resources.STARTED),
        Action.STOP_RESOURCES,
        "secondary-resources-running",
    )


def test_peer_in_sync_again_clears_its_outdated_mark() -> None:
    check(peer(healthy_primary(), outdated=True), Action.CLEAR_PEER_OUTDATED, "peer-in-sync-clear")


# --- totality ----------------------------------------------------------------------------------

_snapshots = st.builds(
    ClusterSnapshot,
    now=st.floats(0, 1000),
    me=st.builds(
        Me,
        st.just(A),
        st.sampled_from(list(Role)),
        st.sampled_from(list(DiskState)),
        st.integers(0, 3),
        st.integers(0, 3),
        st.booleans(),
        st.booleans(),
        st.sampled_from(list(Resources)),
        st.booleans(),
        st.booleans(),
    ),
    peer=st.builds(
        Peer,
        st.just(B),
        st.sampled_from(list(PeerState)),
        st.just(()),
        st.booleans(),
        st.none(),
        st.one_of(st.none(), st.floats(0, 1000)),
        st.one_of(st.none(), st.sampled_from(list(Role))),
        st.one_of(st.none(), st.sampled_from(list(DiskState))),
        st.integers(0, 3),
        st.booleans(),
        st.booleans(),
        st.booleans(),
        st.booleans(),
        st.sampled_from(list(FenceStatus)),
    ),
    witness=st.builds(WitnessView, st.booleans(), st.booleans(), st.sampled_from(list(Owner))),
    repl=st.builds(
        ReplView,
        st.booleans(),
        st.booleans(),
        st.one_of(st.none(), st.sampled_from(list(DiskState))),
        st.booleans(),
    ),
    monitors=st.builds(Monitors, st.booleans(), st.booleans()),
    policy=st.builds(Policy, st.just(T), st.booleans(), st.booleans()),
    command=st.one_of(
        st.none(),
        st.builds(Command, st.sampled_from(list(CommandKind)), st.booleans(), st.booleans()),
    ),
)


@given(_snapshots)
def test_decide_is_total_and_safe(s: ClusterSnapshot) -> None:
    d = decide(s)
    assert d.reason in REASONS
    if d.action is not Action.SELF_FENCE:  # self-fence goes first; a command waits
        assert (d.command is CommandOutcome.NONE) == (s.command is None)
    if d.action is Action.PROMOTE:
        assert s.me.role is Role.SECONDARY and s.me.disk is UP and not s.me.outdated
        assert not s.witness.configured or s.me.lease_held
        fenced = (
            s.peer.clean_shutdown
            or s.peer.fence is FenceStatus.FENCED_OFF
            or (s.witness.configured and s.me.lease_held)
        )
        assert fenced or (s.peer.state is PeerState.ALIVE and s.peer.resources_stopped)
    if ack_allowed(s):
        assert s.me.role is Role.PRIMARY and s.me.resources is Resources.STARTED
        not_promotable = (DiskState.OUTDATED, DiskState.INCONSISTENT)
        assert (
            s.me.lease_held
            or (s.repl.peer_confirms_writes and s.peer.state is PeerState.ALIVE)
            or (not s.witness.configured and s.peer.fence is FenceStatus.FENCED_OFF)
            or (
                not s.witness.configured
                and s.repl.peer_uptodate_holds_released
                and s.peer.state is PeerState.ALIVE
                and s.peer.role is Role.SECONDARY
                and s.peer.disk in not_promotable
                and s.repl.peer_disk in (None, *not_promotable)
            )
        )


def test_every_reason_is_reachable_in_the_docs() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "cluster.md").read_text("utf-8")
    missing = [r for r in REASONS if f"`{r}`" not in text]
    assert not missing, missing


def test_two_node_primary_never_shoots_a_live_resyncing_secondary() -> None:
    # found by the two-node acceptance test: right after a takeover the secondary is alive by
    # heartbeats but still resyncing (not confirming writes); it must not be powered off
    syncing = dataclasses.replace(
        two_node(healthy_primary()), repl=ReplView(connected=True, peer_confirms_writes=False)
    )
    check(syncing, Action.STAY, "peer-not-in-sync")
    assert not ack_allowed(syncing)  # writes wait for the peer
    # once its heartbeats stop, it is lost: fence it
    assert decide(dead(syncing)).action is Action.FENCE_PEER


# --- two-node: a live peer that cannot be promoted (docs/cluster.md) ---------------------------

OUT, INC = DiskState.OUTDATED, DiskState.INCONSISTENT


def resyncing(
    hb_disk: DiskState | None,
    link_disk: DiskState | None,
    *,
    covers: bool = True,
    confirms: bool = False,
) -> ClusterSnapshot:
    """Two-node primary; the peer alive and Secondary with ``hb_disk`` in its heartbeats and
    ``link_disk`` as the replication link reports it (None: no link)."""
    s = peer(two_node(healthy_primary()), disk=hb_disk)
    return dataclasses.replace(
        s,
        repl=ReplView(
            connected=link_disk is not None,
            peer_confirms_writes=confirms,
            peer_disk=link_disk,
            peer_uptodate_holds_released=covers,
        ),
    )


@pytest.mark.parametrize(
    ("hb_disk", "link_disk"),
    [(OUT, None), (OUT, OUT), (OUT, INC), (INC, INC), (INC, None)],
)
def test_two_node_primary_acks_while_the_live_peer_cannot_be_promoted(
    hb_disk: DiskState, link_disk: DiskState | None
) -> None:
    # restarted (Outdated), connecting, or a sync target (Inconsistent): never promoted
    # automatically, UpToDate only by a resync from us that ends after our writes
    s = resyncing(hb_disk, link_disk)
    check(s, Action.STAY, "peer-not-promotable")
    assert ack_allowed(s)


@pytest.mark.parametrize(
    ("hb_disk", "link_disk", "why"),
    [
        (UP, None, "its heartbeats say UpToDate"),
        (OUT, UP, "stale heartbeats; the link already saw the resync end"),
        (UP, INC, "the link's view is older than the heartbeats"),
        (None, INC, "no heartbeat status"),
        (DiskState.DISKLESS, None, "not one of the two non-promotable states"),
        (OUT, DiskState.DISKLESS, "the link says Diskless"),
    ],
)
def test_two_node_writes_wait_while_any_report_says_the_peer_could_be_uptodate(
    hb_disk: DiskState | None, link_disk: DiskState | None, why: str
) -> None:
    s = resyncing(hb_disk, link_disk)
    check(s, Action.STAY, "peer-not-in-sync")
    assert not ack_allowed(s), why


def test_two_node_relaxed_gate_needs_every_condition() -> None:
    base = resyncing(OUT, INC)
    assert ack_allowed(base)
    # the replication layer does not guarantee that a resync ends after our writes
    no_guarantee = resyncing(OUT, INC, covers=False)
    check(no_guarantee, Action.STAY, "peer-not-in-sync")
    assert not ack_allowed(no_guarantee)
    # the peer says it is primary, or its role is unknown: not "provably not promotable"
    for role in (Role.PRIMARY, None):
        assert not ack_allowed(peer(base, role=role)), role
    # not heard within deadtime: lost, fenced first (the old rule), never acked meanwhile
    lost = dead(base, since=100.0)
    check(lost, Action.FENCE_PEER, "peer-lost-fence")
    assert not ack_allowed(lost)
    assert ack_allowed(peer(lost, fence=FenceStatus.FENCED_OFF))
    # still only with resources started, and not on a secondary
    assert not ack_allowed(me(base, resources=Resources.STARTING))
    assert not ack_allowed(me(base, stop_overdue=True))
    assert not ack_allowed(me(base, role=Role.SECONDARY))
    # with a witness the lease and the Outdated mark decide, as before
    witness = dataclasses.replace(base, witness=WitnessView(True, True, Owner.ME), policy=Policy())
    witness = me(witness, lease_held=True)
    assert not ack_allowed(witness)  # lease held, but the peer not marked Outdated yet
    check(witness, Action.OUTDATE_PEER, "peer-lost-outdate")
    assert ack_allowed(peer(witness, outdated=True))


def test_two_node_not_promotable_peer_lets_the_primary_run_its_other_rows() -> None:
    base = resyncing(OUT, None)
    check(me(base, resources=Resources.STOPPED), Action.START_RESOURCES, "start-resources")
    check(me(base, resources=Resources.STARTING), Action.STAY, "starting")
    check(me(base, standby=True), Action.DEMOTE, "standby")
    check(
        dataclasses.replace(base, monitors=Monitors(resource_failed=True)),
        Action.STAY,
        "resource-failed-no-takeover",
    )


def test_two_node_secondary_restart_and_resync_in_virtual_time() -> None:
    """The issue-6 scenario, cycle by cycle: the fenced secondary reboots and resyncs while the
    primary keeps acknowledging; the gate closes only between "the link saw the resync end"
    and "the peer confirmed everything released before" (milliseconds), then it confirms."""
    steps: list[tuple[str, ClusterSnapshot, str, bool]] = [
        (
            "fenced off, dead",
            peer(dead(resyncing(OUT, None)), fence=FenceStatus.FENCED_OFF),
            "primary-alone",
            True,
        ),
        ("rebooted: alive, Outdated, no link", resyncing(OUT, None), "peer-not-promotable", True),
        ("handshake: sync target", resyncing(OUT, INC), "peer-not-promotable", True),
        ("heartbeats catch up", resyncing(INC, INC), "peer-not-promotable", True),
        ("resync end durable on the peer", resyncing(INC, UP), "peer-not-in-sync", False),
        ("confirms everything", resyncing(UP, UP, confirms=True), "primary", True),
    ]
    for i, (what, s, reason, acks) in enumerate(steps):
        s = dataclasses.replace(s, now=100.0 + i * T.keepalive)
        assert decide(s).reason == reason, what
        assert ack_allowed(s) is acks, what
