"""The reconnect decision: every rule by a named case, and properties over generated histories
(mirror images; nothing acknowledged is ever cut without an explicit policy; the divergence LSN
matches a brute-force comparison)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailharbor.repl.generations import (
    Action,
    Branch,
    Generation,
    HistoryError,
    NodeView,
    Outcome,
    check_view,
    decide,
    divergence_lsn,
    extend_history,
    truncate_history,
)
from mailharbor.repl.state import DiskState, Role, SplitBrainPolicy

from . import C3, A, B, gen, view

P, S = Role.PRIMARY, Role.SECONDARY
MIRROR = {
    Action.IN_SYNC: Action.IN_SYNC,
    Action.DISCONNECT: Action.DISCONNECT,
    Action.SYNC_SOURCE: Action.SYNC_TARGET,
    Action.SYNC_TARGET: Action.SYNC_SOURCE,
}
BRANCH_MIRROR = {Branch.NONE: Branch.NONE, Branch.SEND: Branch.RECEIVE, Branch.RECEIVE: Branch.SEND}


def both(
    a: NodeView, b: NodeView, policy: SplitBrainPolicy = SplitBrainPolicy.MERGE
) -> tuple[Outcome, Outcome]:
    """Decide on both nodes and check they are mirror images of each other."""
    oa, ob = decide(a, b, policy), decide(b, a, policy)
    assert oa.rule == ob.rule and oa.because == ob.because
    assert oa.divergence_lsn == ob.divergence_lsn
    assert MIRROR[oa.action] is ob.action
    assert oa.resync_from == ob.resync_from and oa.full_sync == ob.full_sync
    assert oa.split_brain == ob.split_brain
    assert BRANCH_MIRROR[oa.branch] is ob.branch
    assert (oa.cut_local_after is not None) == ob.peer_cuts
    assert (ob.cut_local_after is not None) == oa.peer_cuts
    assert (oa.local_tail, oa.peer_tail) == (ob.peer_tail, ob.local_tail)
    assert (oa.local_tail_acked, oa.peer_tail_acked) == (ob.peer_tail_acked, ob.local_tail_acked)
    for o, v in ((oa, a), (ob, b)):
        if v.role is Role.PRIMARY:
            assert o.cut_local_after is None and o.action is not Action.SYNC_TARGET
    return oa, ob


G1 = gen(1, 1, A, 1, None)  # A primary in protocol C with B in sync from the start


# --- named cases, one per rule ------------------------------------------------------------


def test_fresh_secondary_catches_up_from_lsn_1() -> None:
    oa, ob = both(view(A, (G1,), 50, P), view(B, (), 0, S, DiskState.INCONSISTENT))
    assert oa.rule == "rule:history-is-prefix"
    assert (oa.action, ob.action, ob.resync_from) == (Action.SYNC_SOURCE, Action.SYNC_TARGET, 1)
    assert ob.local_disk_after is DiskState.INCONSISTENT


def test_same_records_are_in_sync() -> None:
    oa, _ = both(view(A, (G1,), 50, P), view(B, (gen(1, 1, A),), 50))
    assert (oa.action, oa.rule, oa.divergence_lsn) == (Action.IN_SYNC, "rule:same-records", 50)


def test_secondary_behind_gets_only_the_missing_records() -> None:
    oa, ob = both(view(A, (G1,), 80, P), view(B, (gen(1, 1, A),), 50))
    assert oa.rule == "rule:history-is-prefix"
    assert ob.action is Action.SYNC_TARGET and ob.resync_from == 51 and ob.cut_local_after is None


def test_primary_with_a_new_generation_while_peer_was_away() -> None:
    a = view(A, (G1, gen(2, 61, A)), 90, P)  # standalone writes in generation 2
    oa, ob = both(a, view(B, (gen(1, 1, A),), 60))
    assert oa.rule == "rule:history-is-prefix" and ob.resync_from == 61


def test_crashed_primary_unacked_tail_is_cut() -> None:
    """A was primary in C; B confirmed up to 100; A crashed holding 101..105 (never acked);
    B was promoted (generation 2) and wrote 101..120."""
    a = view(A, (gen(1, 1, A, 1, None),), 105, S)
    b = view(B, (gen(1, 1, A), gen(2, 101, B)), 120, P)
    oa, ob = both(a, b)
    assert oa.rule == "rule:crashed-primary-unacked-tail"
    assert oa.cut_local_after == 100 and oa.action is Action.SYNC_TARGET and oa.resync_from == 101
    assert ob.peer_cuts and ob.action is Action.SYNC_SOURCE and not oa.split_brain
    assert (oa.local_tail, oa.local_tail_acked, oa.peer_tail_acked) == (5, False, True)


def test_primary_that_acked_without_its_peer_is_split_brain_not_a_cut() -> None:
    """Same, but A lost B at 100 and went on alone (dont-care): its mirrored range ended at
    100, so 101..105 were acknowledged: cutting them would lose mail."""
    a = view(A, (gen(1, 1, A, 1, 100),), 105, S)
    b = view(B, (gen(1, 1, A), gen(2, 101, B)), 120, P)
    oa, ob = both(a, b)
    assert oa.split_brain and oa.rule == "rule:split-brain-merge"
    assert oa.branch is Branch.SEND and ob.branch is Branch.RECEIVE  # the primary B wins
    assert oa.cut_local_after == 100


def test_never_mirrored_generation_is_acked() -> None:
    """Protocol A (no mirrored range): A's tail may have been acknowledged."""
    a = view(A, (gen(1, 1, A),), 105, S)
    b = view(B, (gen(1, 1, A), gen(2, 101, B)), 120, P)
    assert both(a, b)[0].split_brain


def test_records_the_origin_lost_are_cut() -> None:
    """B received 101..103 from A; A crashed before fsyncing them, restarted, was promoted
    again (generation 3) and wrote 101..110. A never acked 101..103."""
    a = view(A, (gen(1, 1, A, 1, None), gen(3, 101, A)), 110, P)
    b = view(B, (gen(1, 1, A),), 103, S)
    oa, ob = both(a, b)
    assert oa.rule == "rule:origin-lost-tail"
    assert ob.cut_local_after == 100 and ob.resync_from == 101 and oa.action is Action.SYNC_SOURCE


def test_empty_branch_adopts_the_other_side() -> None:
    """B started generation 2 (promoted) and wrote nothing; A holds acknowledged records."""
    a = view(A, (gen(1, 1, A),), 110, S)
    b = view(B, (gen(1, 1, A), gen(2, 101, B)), 100, S)
    oa, ob = both(a, b)
    assert oa.rule == "rule:empty-branch"
    assert ob.action is Action.SYNC_TARGET and ob.cut_local_after is None and ob.resync_from == 101


def test_empty_branch_on_a_primary_disconnects() -> None:
    a = view(A, (gen(1, 1, A),), 110, S)
    b = view(B, (gen(1, 1, A), gen(2, 101, B)), 100, P)
    oa, _ = both(a, b)
    assert oa.action is Action.DISCONNECT
    assert oa.because == ("rule:empty-branch", "rule:primary-would-lose-data")


def test_both_tails_unacked_keeps_the_primary() -> None:
    """A crashed with an unconfirmed mirrored tail; B was promoted and has not written."""
    a = view(A, (gen(1, 1, A, 1, None),), 105, S)
    b = view(B, (gen(1, 1, A), gen(2, 101, B)), 100, P)
    oa, ob = both(a, b)
    assert oa.rule == "rule:both-tails-unacked"
    assert oa.cut_local_after == 100 and oa.action is Action.IN_SYNC and ob.action is Action.IN_SYNC


def test_both_tails_unacked_without_primary_keeps_the_newer_generation() -> None:
    a = view(A, (gen(1, 1, A, 1, None),), 105, S)
    b = view(B, (gen(1, 1, A), gen(2, 101, B)), 100, S)
    oa, _ = both(a, b)
    assert oa.rule == "rule:both-tails-unacked" and oa.cut_local_after == 100


SPLIT_A = view(A, (gen(1, 1, A), gen(2, 51, A)), 80, S)  # 30 acked records in generation 2
SPLIT_B = view(B, (gen(1, 1, A), gen(3, 51, B)), 70, S)  # 20 acked records in generation 3


@pytest.mark.parametrize(
    ("policy", "loser"),
    [
        (SplitBrainPolicy.MERGE, A),  # no primary: the newer generation (B's 3) wins
        (SplitBrainPolicy.DISCARD_YOUNGER_PRIMARY, B),
        (SplitBrainPolicy.DISCARD_LEAST_CHANGES, B),
        (SplitBrainPolicy.DISCARD_ZERO_CHANGES, None),
        (SplitBrainPolicy.DISCONNECT, None),
    ],
)
def test_split_brain_policies(policy: SplitBrainPolicy, loser: bytes | None) -> None:
    oa, ob = both(SPLIT_A, SPLIT_B, policy)
    assert oa.split_brain and oa.rule == f"rule:split-brain-{policy.value}"
    assert oa.local_tail_acked and oa.peer_tail_acked
    if loser is None:
        assert oa.action is Action.DISCONNECT
        return
    lo, wo = (oa, ob) if loser == A else (ob, oa)
    assert lo.cut_local_after == 50 and lo.action is Action.SYNC_TARGET and lo.resync_from == 51
    assert wo.action is Action.SYNC_SOURCE
    merge = policy is SplitBrainPolicy.MERGE
    assert (lo.branch, wo.branch) == (
        (Branch.SEND, Branch.RECEIVE) if merge else (Branch.NONE, Branch.NONE)
    )


def test_merge_winner_is_the_primary() -> None:
    oa, _ = both(dataclasses.replace(SPLIT_A, role=P), SPLIT_B)
    assert oa.branch is Branch.RECEIVE and oa.action is Action.SYNC_SOURCE


def test_discard_policy_that_would_discard_the_primary_disconnects() -> None:
    b = dataclasses.replace(SPLIT_B, role=P)
    oa, _ = both(SPLIT_A, b, SplitBrainPolicy.DISCARD_LEAST_CHANGES)
    assert oa.action is Action.DISCONNECT and oa.rule == "rule:primary-would-lose-data"


def test_split_brain_ties_disconnect() -> None:
    a = view(A, (gen(1, 1, A), gen(2, 51, A)), 70, S)
    b = view(B, (gen(1, 1, A), gen(2, 51, B)), 70, S)  # same number: no witness, no order
    for policy in (
        SplitBrainPolicy.DISCARD_YOUNGER_PRIMARY,
        SplitBrainPolicy.DISCARD_LEAST_CHANGES,
    ):
        assert both(a, b, policy)[0].action is Action.DISCONNECT


def test_discard_my_data() -> None:
    a = dataclasses.replace(SPLIT_A, discard_my_data=True)
    oa, _ = both(a, SPLIT_B, SplitBrainPolicy.DISCONNECT)
    assert oa.rule == "rule:split-brain-discard-my-data" and oa.cut_local_after == 50
    assert oa.branch is Branch.NONE
    b = dataclasses.replace(SPLIT_B, discard_my_data=True)
    assert both(a, b)[0].rule == "rule:split-brain-both-discard-my-data"


def test_both_primary_disconnects() -> None:
    oa, _ = both(view(A, (G1,), 5, P), view(B, (gen(1, 1, A),), 5, P))
    assert (oa.action, oa.rule) == (Action.DISCONNECT, "rule:both-primary")


def test_unrelated_data_disconnects() -> None:
    oa, _ = both(view(A, (gen(1, 1, A),), 10), view(B, (gen(1, 1, B),), 10))
    assert (oa.action, oa.rule) == (Action.DISCONNECT, "rule:unrelated-data")


def test_peer_behind_the_retention_horizon_needs_a_full_sync() -> None:
    oa, ob = both(view(A, (G1,), 100, P, retained=61), view(B, (gen(1, 1, A),), 40))
    assert oa.rule == "rule:behind-retention-horizon" and ob.full_sync
    assert oa.because == ("rule:history-is-prefix", "rule:behind-retention-horizon")


def test_inconsistent_source_disconnects() -> None:
    a = view(A, (gen(1, 1, A),), 100, S, DiskState.INCONSISTENT)
    oa, _ = both(a, view(B, (gen(1, 1, A),), 40, S))
    assert oa.rule == "rule:sync-source-inconsistent" and oa.action is Action.DISCONNECT


def test_a_primary_is_never_a_sync_target() -> None:
    oa, _ = both(view(A, (G1,), 50, P), view(B, (gen(1, 1, A),), 60))
    assert oa.because == ("rule:history-is-prefix", "rule:primary-would-lose-data")


def test_records_of_an_unknown_writer_count_as_acknowledged() -> None:
    a = view(A, (gen(1, 1, A), gen(2, 51, C3)), 60, S)
    b = view(B, (gen(1, 1, A), gen(3, 51, B)), 55, S)
    oa, _ = both(a, b)
    assert oa.local_tail_acked and oa.split_brain


def test_invalid_views_disconnect() -> None:
    bad = view(A, (gen(2, 1, A), gen(1, 5, A)), 10)
    assert decide(bad, view(B, (), 0)).rule == "rule:invalid-view"
    assert decide(view(A, (), 3), view(B, (), 0)).rule == "rule:invalid-view"  # uncovered
    assert decide(view(A, (), 0), view(A, (), 0)).rule == "rule:same-node"
    with pytest.raises(HistoryError):
        check_view(view(b"short", (), 0))


def test_history_helpers() -> None:
    h = extend_history((), 1, 1, A)
    h = extend_history(h, 1, 2, A)
    assert h == (gen(1, 1, A),)
    h = extend_history(h, 4, 10, B)
    assert h == (gen(1, 1, A), gen(4, 10, B))
    with pytest.raises(HistoryError):
        extend_history(h, 3, 11, A)
    assert truncate_history(h, 9) == (gen(1, 1, A),)


# --- properties over generated histories --------------------------------------------------


@st.composite
def scenario(draw: st.DrawFn) -> tuple[NodeView, NodeView]:
    """Two nodes sharing a common history, then each going its own way: continuing the last
    common generation and/or starting new ones (written by itself, the other node, or a third),
    with random mirrored ranges, roles, disk states and retention horizons."""
    nodes = (A, B)
    number = 0
    common: list[Generation] = []
    lsn = 0
    for _ in range(draw(st.integers(0, 3))):
        number += draw(st.integers(1, 3))
        common.append(gen(number, lsn + 1, draw(st.sampled_from(nodes))))
        lsn += draw(st.integers(1, 5))
    if not common:
        lsn = 0
    views = []
    numbers = iter(draw(st.permutations(range(number + 1, number + 8))))
    for me in nodes:
        hist = list(common)
        last = lsn
        if len(hist) > 0 and draw(st.booleans()):
            last += draw(st.integers(1, 4))  # more records of the last common generation
        for _ in range(draw(st.integers(0, 2))):
            n = max(next(numbers), (hist[-1].number + 1) if hist else 1)
            origin = draw(st.sampled_from((me, me, (B if me == A else A), C3)))
            hist.append(gen(n, last + 1, origin))
            last += draw(st.integers(0, 4))
        # Mirrored ranges, only meaningful on entries this node wrote.
        out = []
        for g in hist:
            if g.origin == me and draw(st.booleans()):
                mf = draw(st.integers(1, max(1, last + 1)))
                mu = draw(st.one_of(st.none(), st.integers(mf - 1, last + 2)))
                g = dataclasses.replace(g, mirrored_from=mf, mirrored_until=mu)
            out.append(g)
        if last == 0:
            out = [g for g in out if g.first_lsn > 0]
        views.append(
            NodeView(
                me,
                draw(st.sampled_from((S, S, P))),
                draw(st.sampled_from(list(DiskState)[:3])),
                tuple(out),
                last,
                draw(st.sampled_from((1, 1, 1, 3, 8))),
                draw(st.booleans()) and draw(st.booleans()),
            )
        )
    return views[0], views[1]


def brute_d(a: NodeView, b: NodeView) -> int:
    d = 0
    for x in range(1, min(a.last_lsn, b.last_lsn) + 1):
        ga, gb = a.generation_at(x), b.generation_at(x)
        if ga is None or gb is None or ga.key != gb.key:
            break
        d = x
    return d


def acked_records(side: NodeView, other: NodeView, d: int) -> list[int]:
    """Brute force, per record: which records after d might a client have been told about."""
    out = []
    for x in range(d + 1, side.last_lsn + 1):
        g = side.generation_at(x)
        assert g is not None
        mine = g.origin == side.node_id
        if (mine and not g.mirrored(x)) or g.origin not in (side.node_id, other.node_id):
            out.append(x)
    return out


@given(scenario(), st.sampled_from(list(SplitBrainPolicy)))
def test_decisions_are_mirror_images_and_never_cut_acknowledged_records(
    views: tuple[NodeView, NodeView], policy: SplitBrainPolicy
) -> None:
    a, b = views
    try:
        check_view(a)
        check_view(b)
    except HistoryError:
        return
    oa, ob = both(a, b, policy)
    if oa.rule in ("rule:invalid-view", "rule:same-node"):
        return
    d = brute_d(a, b)
    assert oa.divergence_lsn == d == divergence_lsn(a, b)
    for o, me, other in ((oa, a, b), (ob, b, a)):
        acked = acked_records(me, other, d)
        assert o.local_tail_acked == bool(acked)
        if o.cut_local_after is not None:
            assert o.cut_local_after == d
            if acked:
                # Only an explicit split-brain resolution may cut acknowledged records, and
                # under merge they are shipped to the winner first.
                assert o.split_brain
                assert (
                    policy is not SplitBrainPolicy.MERGE
                    or o.branch is Branch.SEND
                    or ("rule:split-brain-discard-my-data" in o.because)
                )
        if o.action is Action.SYNC_TARGET:
            assert o.resync_from == d + 1
            assert me.role is not Role.PRIMARY
        if o.action is Action.DISCONNECT:
            assert o.cut_local_after is None and not o.peer_cuts
    # A sync target's log after its cut is a prefix of the source's.
    for o, me, other in ((oa, a, b), (ob, b, a)):
        if o.action is Action.SYNC_TARGET:
            kept = o.cut_local_after if o.cut_local_after is not None else me.last_lsn
            assert kept == d
            assert other.last_lsn > d
