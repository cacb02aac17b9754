"""The durability barrier logic: release per protocol, freeze on link loss per fencing policy."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailharbor.repl.barrier import BarrierCore, BarrierMode, Failed, Released
from mailharbor.repl.state import FencingPolicy, Protocol


def test_local_mode_releases_at_once() -> None:
    b = BarrierCore(Protocol.C)
    tok, out = b.add_waiter(5)
    assert out == [Released(tok, 5)] and b.released_lsn == 5


def test_peer_mode_waits_for_the_peer_confirmation() -> None:
    b = BarrierCore(Protocol.C)
    b.add_waiter(5)
    assert b.require_peer() == 6  # the mirrored range starts after what was released
    t7, out = b.add_waiter(7)
    t9, out2 = b.add_waiter(9)
    assert out == out2 == []
    assert b.peer_confirmed(8) == [Released(t7, 7)]
    assert b.peer_confirmed(8) == []
    assert b.peer_confirmed(20) == [Released(t9, 9)]
    _, out = b.add_waiter(12)  # already confirmed
    assert [type(o) for o in out] == [Released]


def test_protocol_a_never_waits() -> None:
    b = BarrierCore(Protocol.A)
    assert b.require_peer() is None and b.mode is BarrierMode.LOCAL
    assert b.add_waiter(3)[1]


def test_dont_care_link_loss_persists_the_mirror_end_then_releases_locally() -> None:
    b = BarrierCore(Protocol.C, FencingPolicy.DONT_CARE)
    b.require_peer()
    t1, _ = b.add_waiter(3)
    t2, _ = b.add_waiter(6)
    b.peer_confirmed(4)
    loss = b.link_lost()
    assert (loss.mirrored_until, loss.held, loss.resume_when) == (4, 1, "now")
    t3, out = b.add_waiter(8)  # frozen: nothing is released before the mirror end is persisted
    assert out == [] and b.peer_confirmed(100) == []
    assert sorted(o.lsn for o in b.resume_local()) == [6, 8]
    assert b.mode is BarrierMode.LOCAL
    del t1, t2, t3


def test_fencing_policies_hold_until_told() -> None:
    for policy, when in (
        (FencingPolicy.RESOURCE_ONLY, "peer-outdated"),
        (FencingPolicy.RESOURCE_AND_STONITH, "peer-fenced"),
    ):
        b = BarrierCore(Protocol.C, policy)
        b.require_peer()
        tok, _ = b.add_waiter(2)
        loss = b.link_lost()
        assert loss.resume_when == when and loss.mirrored_until == 0 and loss.held == 1
        assert b.fail_pending("peer lost, not fenced") == [Failed(tok, 2, "peer lost, not fenced")]
        assert b.pending == 0


def test_try_release_is_the_fast_path_of_a_waiter_that_need_not_wait() -> None:
    b = BarrierCore(Protocol.C, FencingPolicy.DONT_CARE)
    assert b.releasable(4) and b.try_release(4) and b.released_lsn == 4  # LOCAL: at once
    b.require_peer()
    assert not b.releasable(6) and not b.try_release(6) and b.released_lsn == 4
    b.peer_confirmed(7)  # the peer's acknowledgement came before the local fsync ended
    assert b.try_release(6) and b.released_lsn == 6
    tok, _ = b.add_waiter(9)
    b.peer_confirmed(12)
    assert b.pending == 0
    tok, _ = b.add_waiter(15)
    # A waiter still pending: a later LSN is not released past it (LSN order).
    b.confirmed_lsn = 20
    assert not b.try_release(16)
    b.cancel(tok)
    assert b.try_release(16)
    # A link loss counts what try_release released as acknowledged with the peer.
    loss = b.link_lost()
    assert loss.mirrored_until == 20 and not b.try_release(21)  # frozen: nothing released
    b.resume_local()
    assert b.try_release(21)


def test_link_loss_without_peer_mode_asks_nothing() -> None:
    b = BarrierCore(Protocol.C)
    assert b.link_lost().mirrored_until is None and b.mode is BarrierMode.LOCAL


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("wait"), st.integers(1, 50)),
            st.tuples(st.just("try"), st.integers(1, 50)),
            st.tuples(st.just("ack"), st.integers(0, 50)),
            st.tuples(st.just("peer"), st.just(0)),
            st.tuples(st.just("lost"), st.just(0)),
            st.tuples(st.just("resume"), st.just(0)),
            st.tuples(st.just("fail"), st.just(0)),
        ),
        max_size=40,
    ),
    st.sampled_from(list(Protocol)),
)
def test_never_released_beyond_the_peer_in_peer_mode_and_one_outcome_each(
    ops: list[tuple[str, int]], protocol: Protocol
) -> None:
    b = BarrierCore(protocol)
    outcomes: dict[int, int] = {}
    waiting: set[int] = set()
    mirror_end: int | None = None
    for op, n in ops:
        mode = b.mode
        if op == "wait":
            tok, out = b.add_waiter(n)
            waiting.add(tok)
        elif op == "try":
            before = b.released_lsn
            if b.try_release(n):
                assert mode is not BarrierMode.FROZEN and b.released_lsn == max(before, n)
                assert mode is BarrierMode.LOCAL or n <= b.confirmed_lsn
            else:
                assert b.released_lsn == before
            out = []
        elif op == "ack":
            out = b.peer_confirmed(n)
        elif op == "peer":
            b.require_peer()
            out = []
        elif op == "lost":
            loss = b.link_lost()
            mirror_end = loss.mirrored_until if loss.mirrored_until is not None else mirror_end
            out = []
        elif op == "resume":
            out = b.resume_local()
        else:
            out = b.fail_pending("x")
        for o in out:
            outcomes[o.token] = outcomes.get(o.token, 0) + 1
            if isinstance(o, Released) and op in ("wait", "ack"):
                if mode is BarrierMode.PEER or b.mode is BarrierMode.PEER:
                    assert o.lsn <= b.confirmed_lsn
                assert mode is not BarrierMode.FROZEN
    assert all(v == 1 for v in outcomes.values())
    assert set(outcomes) | {t for t in waiting if t not in outcomes} == waiting
    assert b.pending == len(waiting) - len(outcomes)
