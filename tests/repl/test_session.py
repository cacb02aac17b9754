"""Two sans-IO sessions wired back to back in memory, in virtual time: handshake, streaming in
protocols A/B/C, resync (chunked, rate-limited, resumable), tail cuts, merge branch shipping,
verify, timeouts, and rejection of forged, replayed and stale-term traffic."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailharbor.repl import session as S
from mailharbor.repl import wire as W
from mailharbor.repl.generations import Action, Branch
from mailharbor.repl.state import DiskState, Protocol, Role, SplitBrainPolicy

from . import A, B, FakeClock, FakeNode, Link, config, frame, gen, log_of, pair, view

P, SEC = Role.PRIMARY, Role.SECONDARY


def in_sync_pair(n: int = 10, **kw: Any) -> Link:
    """A primary and an up-to-date secondary holding the same n records."""
    va = view(A, (gen(1, 1, A, 1, None),), n, P)
    vb = view(B, (gen(1, 1, A),), n, SEC)
    link = pair(va, log_of(n), vb, log_of(n), **kw)
    link.start()
    return link


def lost(n: FakeNode) -> list[str]:
    return [e.reason for e in n.of(S.LinkLost)]


# --- handshake ----------------------------------------------------------------------------


def test_handshake_state_exchange_and_decision() -> None:
    link = in_sync_pair()
    a, b = link.a, link.b
    for n, peer in ((a, B), (b, A)):
        assert n.of(S.HandshakeDone) == [S.HandshakeDone(peer, W.MAX_VERSION)]
        (dec,) = n.of(S.Decision)
        assert dec.outcome.rule == "rule:same-records" and dec.outcome.action is Action.IN_SYNC
        assert n.session.phase is S.Phase.ESTABLISHED
    assert a.of(S.PeerInSync) == [S.PeerInSync(11)]
    assert not lost(a) and not lost(b)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"secret": b"another secret"}, W.RefuseReason.AUTH),
        ({"settings_hash": b"s" * 32}, W.RefuseReason.SETTINGS),
        (
            {"min_version": W.MAX_VERSION + 1, "max_version": W.MAX_VERSION + 1},
            W.RefuseReason.VERSION,
        ),
        ({"expected_peer": b"Z" * 16}, W.RefuseReason.UNEXPECTED_PEER),
    ],
)
def test_handshake_refusals(change: dict[str, object], reason: W.RefuseReason) -> None:
    clock = FakeClock()
    va = view(A, (gen(1, 1, A),), 1, P)
    vb = view(B, (gen(1, 1, A),), 1, SEC)
    a = FakeNode(va, log_of(1), config(A), clock)
    b = FakeNode(vb, log_of(1), config(B, **change), clock)
    link = Link(a, b)
    link.start()
    refused = [e.reason for n in (a, b) for e in n.of(S.ProtocolViolation)]
    assert reason in refused
    assert a.session.phase is S.Phase.CLOSED and b.session.phase is S.Phase.CLOSED
    assert not a.of(S.Decision)


def test_same_node_id_is_refused() -> None:
    clock = FakeClock()
    v = view(A, (), 0)
    link = Link(FakeNode(v, [], config(A), clock), FakeNode(v, [], config(A), clock))
    link.start()
    assert W.RefuseReason.SAME_NODE in [e.reason for e in link.a.of(S.ProtocolViolation)]


def test_handshake_timeout() -> None:
    clock = FakeClock()
    a = FakeNode(view(A, (), 0), [], config(A, handshake_timeout=5.0), clock)
    a.session.start()
    assert a.session.next_deadline() == clock.t + 5.0
    clock.advance(5.0)
    a.session.tick()
    assert S.LinkLost("handshake-timeout") in a.session.events()


def test_a_recorded_handshake_cannot_be_replayed_to_a_new_session() -> None:
    link = in_sync_pair()
    recorded = b"".join(d for who, d in link.wire_log if who == "a")
    # A new session on B (fresh nonce) fed A's recorded bytes: its AUTH does not verify.
    victim = S.ReplSession(config(B), view(B, (gen(1, 1, A),), 10), FakeClock())
    victim.start()
    victim.receive_data(recorded)
    evs = victim.events()
    assert S.ProtocolViolation(W.RefuseReason.AUTH, W.REFUSE_TEXT[W.RefuseReason.AUTH]) in evs
    assert isinstance(evs[-1], S.LinkLost) and not any(isinstance(e, S.Decision) for e in evs)


# --- streaming ----------------------------------------------------------------------------


def test_protocol_c_acks_only_after_the_peer_is_durable() -> None:
    link = in_sync_pair(protocol=Protocol.C)
    a, b = link.a, link.b
    b.auto_durable = False
    a.append_as_primary(3, 1)
    link.pump()
    assert b.log == a.log  # received ...
    assert a.of(S.Acked) == []  # ... but not durable: nothing for the barrier
    b.make_durable()
    link.pump()
    assert a.of(S.Acked) == [S.Acked(13, 13, 13)]


def test_protocol_b_acks_on_receipt() -> None:
    link = in_sync_pair(protocol=Protocol.B)
    a, b = link.a, link.b
    b.auto_durable = False
    a.append_as_primary(2, 1)
    link.pump()
    assert a.of(S.Acked) == [S.Acked(12, 12, 10)]
    b.make_durable()
    link.pump()
    assert a.of(S.Acked)[-1] == S.Acked(12, 12, 12)


def test_protocol_a_streams_and_reports_progress() -> None:
    link = in_sync_pair(protocol=Protocol.A)
    link.a.append_as_primary(4, 1)
    link.pump()
    assert link.b.log == link.a.log and link.a.of(S.Acked)[-1].lsn == 14


def test_pipelined_batches_keep_lsn_order() -> None:
    link = in_sync_pair()
    for _ in range(5):
        link.a.append_as_primary(3, 1)  # appended faster than the link is pumped
    link.pump()
    assert link.b.log == link.a.log and link.a.session.peer_durable == 25


def test_two_outdated_secondaries_with_identical_logs_become_up_to_date() -> None:
    # a clean stop of the whole cluster: the primary demoted first, both restart Outdated
    hist = (gen(1, 1, A),)
    va = view(A, hist, 12, SEC, DiskState.OUTDATED)
    vb = view(B, hist, 12, SEC, DiskState.OUTDATED)
    link = pair(va, log_of(12), vb, log_of(12))
    link.start()
    assert link.a.session.disk is DiskState.UP_TO_DATE
    assert link.b.session.disk is DiskState.UP_TO_DATE
    assert [e.disk for e in link.b.of(S.DiskChanged)] == [DiskState.UP_TO_DATE]


def test_outdated_secondary_behind_another_outdated_one_stays_outdated() -> None:
    # different logs: the one behind syncs first and only the one ahead may be promoted
    hist = (gen(1, 1, A),)
    link = pair(
        view(A, hist, 12, SEC, DiskState.OUTDATED),
        log_of(12),
        view(B, hist, 10, SEC, DiskState.OUTDATED),
        log_of(10),
    )
    link.start()
    assert link.a.session.disk is DiskState.OUTDATED


def test_fresh_secondary_full_catch_up_then_live() -> None:
    va = view(A, (gen(1, 1, A),), 0, P)
    link = pair(va, [], view(B, (), 0, SEC, DiskState.INCONSISTENT), [])
    a, b = link.a, link.b
    a.log.extend(log_of(30))
    a.session = S.ReplSession(a.config, dataclasses.replace(va, last_lsn=30), a.clock)
    link.start()
    assert b.log == a.log
    assert [e.disk for e in b.of(S.DiskChanged)] == [DiskState.UP_TO_DATE]
    assert a.of(S.PeerDiskChanged)[-1].disk is DiskState.UP_TO_DATE
    a.append_as_primary(2, 1)
    link.pump()
    assert b.log == a.log


def test_catch_up_is_chunked_windowed_and_only_sends_missing_records() -> None:
    n = 60
    big = [frame(i, 1, A, 900) for i in range(1, n + 1)]
    va = view(A, (gen(1, 1, A),), n, P)
    vb = view(B, (gen(1, 1, A),), 20, SEC)
    link = pair(va, big, vb, big[:20], resync_chunk_bytes=2000, resync_window_bytes=4000)
    link.b.auto_durable = False
    link.start()
    needs = link.a.of(S.NeedFrames)
    assert needs[0].from_lsn == 21 and needs[0].max_bytes == 2000
    # The window stops the source until the target acks.
    assert link.a.session._inflight_bytes <= 4000 + 2000
    for _ in range(100):
        link.b.make_durable()
        link.pump()
    assert link.b.log == big and link.a.session.stats_resync_bytes == sum(map(len, big[20:]))
    assert link.b.session.disk is DiskState.UP_TO_DATE


def test_live_frames_appended_during_the_resync_are_not_lost() -> None:
    va = view(A, (gen(1, 1, A),), 40, P)
    vb = view(B, (gen(1, 1, A),), 5, SEC)
    link = pair(va, log_of(40), vb, log_of(5), resync_chunk_bytes=500)
    a, b = link.a, link.b
    a.answer_frames = False  # the log read is slow
    link.start()
    for _ in range(30):
        a.append_as_primary(1, 1)  # the store appends (in the ring) while the resync runs
        link.pump()
        while a.pending_need:
            a.answer(a.pending_need.pop(0))
            link.pump()
    while a.pending_need:
        a.answer(a.pending_need.pop(0))
        link.pump()
    assert b.log == a.log and len(a.log) == 70
    assert a.session.phase is S.Phase.ESTABLISHED


def test_live_ring_overflow_falls_back_to_the_log() -> None:
    va = view(A, (gen(1, 1, A),), 10, P)
    vb = view(B, (gen(1, 1, A),), 1, SEC)
    link = pair(va, log_of(10), vb, log_of(1), live_buffer_bytes=300)
    a, b = link.a, link.b
    a.answer_frames = False
    link.start()
    a.append_as_primary(20, 1)  # far more than the ring holds
    while a.pending_need:
        a.answer(a.pending_need.pop(0))
        link.pump()
    assert b.log == a.log


def test_resync_rate_limit_in_virtual_time() -> None:
    big = [frame(i, 1, A, 1000) for i in range(1, 21)]
    clock = FakeClock()
    link = pair(
        view(A, (gen(1, 1, A),), 20, P),
        big,
        view(B, (gen(1, 1, A),), 0, SEC),
        [],
        clock,
        resync_chunk_bytes=2200,
        resync_rate=2200,
    )
    link.start()
    t0 = clock.t
    while link.b.last_lsn < 20:
        dl = link.a.session.next_deadline()
        assert dl is not None
        clock.t = max(clock.t, min(dl, clock.t + 0.5))
        link.a.session.tick()
        link.b.session.tick()
        link.pump()
    elapsed = clock.t - t0
    total = sum(map(len, big))
    assert total / 2200 - 2 <= elapsed <= total / 2200 + 2


def test_interrupted_resync_resumes_where_the_target_stopped() -> None:
    big = [frame(i, 1, A, 800) for i in range(1, 41)]
    va = view(A, (gen(1, 1, A),), 40, P)
    link = pair(va, big, view(B, (), 0, SEC, DiskState.INCONSISTENT), [], resync_chunk_bytes=1700)
    a, b = link.a, link.b
    a.answer_frames = False
    link.start()
    for _ in range(3):
        a.answer(a.pending_need.pop(0))
        link.pump()
    got = b.last_lsn
    assert 0 < got < 40
    link.up = False
    a.session.close()
    b.session.receive_eof()
    link.pump()
    # Reconnect: B is Inconsistent with a prefix; the decision resumes from its next LSN.
    vb2 = view(B, (gen(1, 1, A),), got, SEC, DiskState.INCONSISTENT)
    link2 = pair(va, big, vb2, b.log)
    link2.start()
    (need,) = link2.a.of(S.NeedFrames)[:1]
    assert need.from_lsn == got + 1
    assert link2.b.log == big and link2.b.session.disk is DiskState.UP_TO_DATE


# --- reconnect decisions in action --------------------------------------------------------


def test_crashed_primary_rejoins_and_its_unacked_tail_is_quarantined() -> None:
    old = log_of(105)
    new = log_of(100) + log_of(20, 2, B, start=101)
    va = view(A, (gen(1, 1, A, 1, None),), 105, SEC)
    vb = view(B, (gen(1, 1, A), gen(2, 101, B)), 120, P)
    link = pair(va, old, vb, new)
    link.start()
    a = link.a
    (dec,) = a.of(S.Decision)
    assert dec.outcome.rule == "rule:crashed-primary-unacked-tail"
    assert a.of(S.CutTail) == [S.CutTail(100)]
    assert a.quarantine == old[100:] and a.log == new


def test_split_brain_merge_ships_the_branch_then_cuts_and_syncs() -> None:
    la = log_of(50) + log_of(30, 2, A, start=51)
    lb = log_of(50) + log_of(20, 3, B, start=51)
    va = view(A, (gen(1, 1, A), gen(2, 51, A)), 80, SEC)
    vb = view(B, (gen(1, 1, A), gen(3, 51, B)), 70, P)
    link = pair(va, la, vb, lb)
    link.start()
    a, b = link.a, link.b
    assert a.of(S.Decision)[0].outcome.branch is Branch.SEND
    assert b.branch == la[50:]  # the winner got the whole losing branch, to replay
    assert b.of(S.BranchComplete) == [S.BranchComplete(80)]
    assert a.quarantine == la[50:] and a.log == lb
    assert a.session.phase is S.Phase.ESTABLISHED


def test_decision_disconnect_closes_both_sides() -> None:
    va = view(A, (gen(1, 1, A), gen(2, 51, A)), 80, SEC)
    vb = view(B, (gen(1, 1, A), gen(3, 51, B)), 70, SEC)
    link = pair(va, [], vb, [], split_brain=SplitBrainPolicy.DISCONNECT)
    link.start()
    assert "decision" in lost(link.a) and "decision" in lost(link.b)


def test_switchover_on_a_live_link() -> None:
    link = in_sync_pair()
    a, b = link.a, link.b
    a.append_as_primary(2, 1)
    link.pump()
    a.session.update_local(dataclasses.replace(a.view, role=SEC))
    link.pump()
    b.view = dataclasses.replace(b.view, role=P, history=(gen(1, 1, A), gen(2, 13, B)))
    b.session.update_local(b.view)
    link.pump()
    assert a.session.phase is S.Phase.SYNC_TARGET or a.session.phase is S.Phase.ESTABLISHED
    b.append_as_primary(3, 2)
    link.pump()
    assert a.log == b.log and len(a.log) == 15


# --- verify -------------------------------------------------------------------------------


def test_online_verify_finds_a_differing_range() -> None:
    link = in_sync_pair(30)
    link.a.session.start_verify(1, 30, step=10)
    link.pump()
    assert link.a.of(S.VerifyDone) == [S.VerifyDone(3, ())]
    link.b.log[14] = frame(15, 1, A, 50)  # the same LSN, other content
    link.a.session.start_verify(1, 30, step=10)
    link.pump()
    assert link.a.of(S.VerifyDone)[-1] == S.VerifyDone(3, ((11, 20),))
    results = link.a.of(S.VerifyResult)[-3:]
    assert [r.match for r in results] == [True, False, True]


# --- failures -----------------------------------------------------------------------------


def test_a_peer_that_stops_acking_is_dropped() -> None:
    clock = FakeClock()
    link = in_sync_pair(clock=clock, ack_timeout=3.0, ping_interval=1.0, ping_timeout=100.0)
    a, b = link.a, link.b
    b.auto_durable = False
    a.append_as_primary(1, 1)
    link.pump()
    for _ in range(5):
        clock.advance(1.0)
        for n in (a, b):
            n.session.tick()
        link.pump()  # pings keep the link alive; only acks are missing
    assert "ack-timeout" in lost(a)
    assert b.of(S.PeerRefused)[0].reason is W.RefuseReason.TIMEOUT


def test_silence_is_detected_by_pings() -> None:
    clock = FakeClock()
    link = in_sync_pair(clock=clock, ping_interval=1.0, ping_timeout=2.0)
    link.up = False
    for _ in range(4):
        clock.advance(1.0)
        link.a.session.tick()
        link.pump()
    assert lost(link.a) == ["ping-timeout"]


def test_pings_keep_an_idle_link_alive() -> None:
    clock = FakeClock()
    link = in_sync_pair(clock=clock, ping_interval=1.0, ping_timeout=2.0)
    for _ in range(20):
        clock.advance(0.5)
        link.a.session.tick()
        link.b.session.tick()
        link.pump()
    assert not lost(link.a) and not lost(link.b)


def test_a_version_2_peer_links_with_hmac_tags_and_replicates() -> None:
    """Rolling upgrade: a node that speaks up to version 2 and one that speaks 3 settle on 2
    (HMAC-SHA256 tags); frames flow and are acknowledged as on a version 3 link."""
    link = in_sync_pair()
    assert all(n.session.version == W.MAX_VERSION for n in (link.a, link.b))
    va = view(A, (gen(1, 1, A, 1, None),), 10, P)
    vb = view(B, (gen(1, 1, A),), 10, SEC)
    clock = FakeClock()
    old = FakeNode(vb, log_of(10), config(B, max_version=2), clock)
    link = Link(FakeNode(va, log_of(10), config(A), clock), old)
    link.start()
    for n, peer in ((link.a, B), (link.b, A)):
        assert n.of(S.HandshakeDone) == [S.HandshakeDone(peer, 2)]
    link.a.append_as_primary(1, 1)
    link.pump()
    assert link.b.log == link.a.log and len(link.b.log) == 11
    tagged = [d for who, d in link.wire_log if who == "a" and d[6] & W.FLAG_MAC]
    assert tagged and not [d for _, d in link.wire_log if d[6] & W.FLAG_GMAC]


def test_a_forged_message_mid_session_drops_the_link() -> None:
    link = in_sync_pair()
    # An attacker without the key injects a well-formed (CRC-correct) FRAMES message.
    enc = W.MessageEncoder()
    enc.set_key(b"k" * 32, W.MAX_VERSION)
    enc.seq = link.b.session._dec._seq
    link.b.session.receive_data(enc.encode(W.Frames(11, W.FramesPurpose.LIVE, (frame(11),)), 1))
    link.pump()
    assert link.b.of(S.ProtocolViolation)[0].reason is W.RefuseReason.FORGED
    assert link.b.log == log_of(10)  # nothing ingested


def test_a_replayed_message_within_the_session_is_refused() -> None:
    link = in_sync_pair()
    link.a.append_as_primary(1, 1)
    link.pump()
    last_frames = next(d for who, d in reversed(link.wire_log) if who == "a" and len(d) > 100)
    link.b.session.receive_data(last_frames)
    link.pump()
    assert link.b.of(S.ProtocolViolation)[0].reason is W.RefuseReason.REPLAY
    assert len(link.b.log) == 11


def test_frames_from_a_primary_of_an_older_term_are_refused() -> None:
    va = view(A, (gen(1, 1, A),), 5, P)
    vb = view(B, (gen(1, 1, A),), 5, SEC)
    link = pair(va, log_of(5), vb, log_of(5))
    link.b.session.set_term(9)  # B learned of term 9 (the witness granted it elsewhere)
    link.start()
    link.a.append_as_primary(1, 1)
    link.pump()
    assert link.b.of(S.ProtocolViolation)[0].reason is W.RefuseReason.STALE_TERM
    assert len(link.b.log) == 5


def test_adapter_misuse_raises_usage_errors() -> None:
    link = in_sync_pair()
    with pytest.raises(S.SessionUsageError):
        link.b.session.frames_appended([frame(11)])  # a secondary does not append
    with pytest.raises(S.SessionUsageError):
        link.a.session.frames_appended([frame(13)])  # a gap
    with pytest.raises(S.SessionUsageError):
        link.a.session.tail_cut(3)  # not in the table for this phase
    with pytest.raises(S.SessionUsageError):
        S.ReplSession(config(A), view(B, (), 0), FakeClock())


def test_every_table_handler_exists() -> None:
    for name, _ in S.TRANSITIONS.values():
        assert callable(getattr(S.ReplSession, name))


@settings(max_examples=200, deadline=None)
@given(junk=st.binary(max_size=300), split=st.integers(1, 40), at=st.integers(0, 3))
def test_garbage_from_the_peer_never_raises(junk: bytes, split: int, at: int) -> None:
    clock = FakeClock()
    va = view(A, (gen(1, 1, A),), 3, P)
    vb = view(B, (gen(1, 1, A),), 3, SEC)
    link = pair(va, log_of(3), vb, log_of(3), clock)
    link.a.session.start()
    link.b.session.start()
    # Let the handshake run to some point, then feed B garbage.
    for _ in range(at):
        for n in (link.a, link.b):
            ev = n.session.next_event()
            if ev is not None:
                link.handle(n, ev)
    for i in range(0, len(junk), split):
        link.b.session.receive_data(junk[i : i + split])
    link.b.session.receive_eof()
    evs = link.b.session.events()
    # EOF at the latest ends the link; garbage ends it with a violation, never an exception.
    assert isinstance(evs[-1], S.LinkLost)
    assert link.b.session.phase is S.Phase.CLOSED


def test_a_link_in_sync_counts_the_peer_as_holding_the_common_records() -> None:
    """From the decision on, the sender counts what the peer's STATE showed it holds (up to
    the divergence point): no lag of the whole log in `repl status`, no wait at a clean stop
    for an ack of records nobody needs to send."""
    link = in_sync_pair(12)
    a = link.a
    assert a.session.peer_durable == a.session.peer_received == 12
    assert not a.of(S.Acked)  # nothing new was acknowledged: the barrier is not told
    # a secondary behind: the source counts what it holds, then acks raise it
    va = view(A, (gen(1, 1, A, 1, None),), 20, P)
    vb = view(B, (gen(1, 1, A),), 7, SEC)
    link2 = pair(va, log_of(20), vb, log_of(7))
    link2.start()
    assert link2.a.session.peer_durable == 20 and link2.b.log == link2.a.log


def test_a_secondary_promoted_on_an_in_sync_link_counts_the_common_records_as_held() -> None:
    """Two up-to-date secondaries with the same 9 records link up (in sync, nobody sends);
    one is then promoted on that link. Before any new frame, its `peer_durable` already
    covers the common records: `repl status` shows no lag and the pair counts as in sync."""
    va = view(A, (gen(1, 1, A),), 9, SEC)
    vb = view(B, (gen(1, 1, A),), 9, SEC)
    link = pair(va, log_of(9), vb, log_of(9))
    link.start()
    a = link.a
    (dec,) = a.of(S.Decision)
    assert dec.outcome.action is Action.IN_SYNC
    a.view = dataclasses.replace(a.view, role=P, history=(gen(1, 1, A), gen(2, 10, A)))
    a.session.update_local(a.view)
    link.pump()
    assert a.session.peer_durable == a.session.peer_received == 9
    a.append_as_primary(2, 1)
    link.pump()
    assert a.session.peer_durable == len(a.log) > 9 and link.b.log == a.log


def test_target_is_uptodate_only_once_it_holds_the_frames_appended_during_the_resync() -> None:
    # A two-node primary acknowledges frames appended during a resync without the target while
    # the target is Inconsistent (docs/cluster.md, "A live peer that cannot be promoted"):
    # SYNC_DONE must come after them, so the target is never UpToDate without them.
    va = view(A, (gen(1, 1, A),), 20, P)
    vb = view(B, (gen(1, 1, A),), 5, SEC)
    link = pair(va, log_of(20), vb, log_of(5))
    a, b = link.a, link.b
    a.answer_frames = False  # the log read is pending while the store appends
    b.auto_durable = False
    link.start()
    (need,) = a.pending_need
    a.pending_need.clear()
    a.append_as_primary(10, 1)  # LSNs 21-30 go to the ring
    a.session.send_frames(a.log[need.from_lsn - 1 : 20])  # the read ends at the durable LSN
    link.pump()
    assert b.log == a.log and len(b.log) == 30
    assert a.of(S.PeerInSync) == [S.PeerInSync(31)]
    b.session.frames_durable(20)  # the backlog read from the log is durable, the ring not yet
    link.pump()
    assert [b.session.disk, a.session.peer_disk] == [DiskState.INCONSISTENT] * 2
    b.session.frames_durable(30)
    link.pump()
    assert [b.session.disk, a.session.peer_disk] == [DiskState.UP_TO_DATE] * 2
