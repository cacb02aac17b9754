"""Heartbeats: encoding, authentication, replay window, per-link liveness in virtual time."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailharbor.cluster.heartbeat import (
    MESSAGE_SIZE,
    Flags,
    Heartbeat,
    HeartbeatError,
    LinkState,
    NodeStatus,
    PeerState,
    Refusal,
    decode,
    encode,
    heartbeat_key,
)
from mailharbor.cluster.timing import DEFAULT_TIMING as T
from mailharbor.repl.state import DiskState, Role

A, B, C = b"\x0a" * 16, b"\x0b" * 16, b"\x0c" * 16
SECRET = b"pair secret"
HASH = b"\x11" * 32


def status(node: bytes = B, **kw: object) -> NodeStatus:
    base: dict[str, object] = {
        "node_id": node,
        "settings_hash": HASH,
        "term": 3,
        "role": Role.PRIMARY,
        "disk": DiskState.UP_TO_DATE,
        "generation": 3,
        "last_lsn": 42,
    }
    base.update(kw)
    return NodeStatus(**base)  # type: ignore[arg-type]


def pair(now: float = 0.0, inc_b: int = 1) -> tuple[Heartbeat, Heartbeat]:
    a = Heartbeat(A, B, SECRET, HASH, ["lan", "repl"], T, now, incarnation=1)
    b = Heartbeat(B, A, SECRET, HASH, ["lan", "repl"], T, now, incarnation=inc_b)
    return a, b


def test_roundtrip_and_fixed_size() -> None:
    key = heartbeat_key(SECRET)
    s = status(flags=Flags.STANDBY | Flags.LEASE_HELD)
    data = encode(key, 1, 7, 9, s)
    assert len(data) == MESSAGE_SIZE
    m = decode(key, data)
    assert (m.link, m.incarnation, m.seq, m.status) == (1, 7, 9, s)


def test_peer_state_over_links_in_virtual_time() -> None:
    a, b = pair()
    now = 0.0
    assert a.peer_state(now) is PeerState.UNKNOWN  # within initdead
    for i, msg in enumerate(b.build(status(), now)):
        a.receive(i, msg, now)
    assert a.link_states(now) == (LinkState.UP, LinkState.UP)
    assert a.peer_seen and a.peer_status == status()
    # link 0 keeps working, link 1 is cut
    while now < 5.0:
        now += T.keepalive
        a.receive(0, b.build(status(), now)[0], now)
    assert a.link_states(now) == (LinkState.UP, LinkState.DEAD)
    assert a.peer_state(now) is PeerState.ALIVE  # one link is enough
    # now the last link goes silent: late, then dead
    assert a.link_states(now + T.warntime + 1e-9)[0] is LinkState.LATE
    assert a.peer_state(now + T.deadtime - 0.01) is PeerState.ALIVE
    assert a.peer_state(now + T.deadtime) is PeerState.DEAD
    changes = a.poll(now + T.deadtime)
    assert [(c.name, c.new) for c in changes] == [("lan", LinkState.DEAD), ("repl", LinkState.DEAD)]
    assert a.poll(now + T.deadtime) == []


def test_never_heard_is_dead_only_after_initdead() -> None:
    a, _ = pair(now=100.0)
    assert a.peer_state(100.0 + T.initdead - 0.01) is PeerState.UNKNOWN
    assert a.peer_state(100.0 + T.initdead) is PeerState.DEAD
    assert a.next_deadline(100.0) == 100.0 + 0.0 or a.next_deadline(100.0) > 100.0


def test_replay_duplicate_and_reordering() -> None:
    a, b = pair()
    rounds = [b.build(status(last_lsn=i), float(i)) for i in range(5)]
    a.receive(0, rounds[3][0], 3.0)
    a.receive(0, rounds[1][0], 3.0)  # reordered within the window: accepted once
    with pytest.raises(HeartbeatError) as e:
        a.receive(0, rounds[1][0], 3.0)
    assert e.value.reason is Refusal.REPLAYED
    assert a.peer_status is not None and a.peer_status.last_lsn == 3  # never moved back
    a.receive(1, rounds[1][1], 3.0)  # the same round on another link is that link's news


def test_window_edge() -> None:
    a, b = pair()
    rounds = [b.build(status(), 0.0)[0] for _ in range(70)]
    a.receive(0, rounds[69], 0.0)
    a.receive(0, rounds[6], 0.0)  # 63 behind: inside the window
    with pytest.raises(HeartbeatError):
        a.receive(0, rounds[5], 0.0)  # 64 behind: too old


def test_new_incarnation_resets_and_old_is_refused() -> None:
    a, b_old = pair(inc_b=5)
    old = [b_old.build(status(), 0.0) for _ in range(3)]
    a.receive(0, old[2][0], 0.0)
    _, b_new = pair(inc_b=6)
    a.receive(0, b_new.build(status(), 1.0)[0], 1.0)  # restarted peer, seq 0 again
    with pytest.raises(HeartbeatError) as e:
        a.receive(0, old[0][0], 1.0)
    assert e.value.reason is Refusal.STALE_INCARNATION


@pytest.mark.parametrize(
    ("msg_node", "secret", "settings", "link_sent", "link_recv", "reason"),
    [
        (B, b"other secret", HASH, 0, 0, Refusal.FORGED),
        (A, SECRET, HASH, 0, 0, Refusal.REFLECTED),
        (C, SECRET, HASH, 0, 0, Refusal.WRONG_PEER),
        (B, SECRET, b"\x22" * 32, 0, 0, Refusal.SETTINGS),
        (B, SECRET, HASH, 0, 1, Refusal.WRONG_LINK),
    ],
)
def test_refusals(
    msg_node: bytes,
    secret: bytes,
    settings: bytes,
    link_sent: int,
    link_recv: int,
    reason: Refusal,
) -> None:
    a, _ = pair()
    data = encode(heartbeat_key(secret), link_sent, 1, 0, status(msg_node, settings_hash=settings))
    with pytest.raises(HeartbeatError) as e:
        a.receive(link_recv, data, 0.0)
    assert e.value.reason is reason
    assert a.peer_status is None and not a.peer_seen  # nothing changed


def test_send_schedule() -> None:
    a, _ = pair(now=10.0)
    assert a.send_due(10.0)
    a.build(status(A), 10.0)
    assert not a.send_due(10.1) and a.send_due(10.0 + T.keepalive)
    assert a.next_deadline(10.05) == pytest.approx(10.0 + T.keepalive)


# --- fuzz -----------------------------------------------------------------------------------


@given(st.binary(max_size=2 * MESSAGE_SIZE), st.integers(0, 3))
def test_fuzz_random_bytes_only_heartbeat_errors(data: bytes, link: int) -> None:
    a, _ = pair()
    try:
        a.receive(link, data, 0.0)
    except HeartbeatError:
        pass
    else:  # pragma: no cover - would need a forged MAC
        raise AssertionError("random bytes accepted")


@given(st.integers(0, MESSAGE_SIZE - 1), st.integers(1, 255))
def test_fuzz_any_single_byte_change_is_refused(pos: int, xor: int) -> None:
    a, b = pair()
    data = bytearray(b.build(status(), 0.0)[0])
    data[pos] ^= xor
    with pytest.raises(HeartbeatError):
        a.receive(0, bytes(data), 0.0)
    assert a.peer_status is None


@given(
    st.sampled_from(list(Role)),
    st.sampled_from(list(DiskState)),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 0x1F),
)
def test_fuzz_roundtrip(role: Role, disk: DiskState, term: int, lsn: int, flags: int) -> None:
    key = heartbeat_key(SECRET)
    s = status(role=role, disk=disk, term=term, last_lsn=lsn, flags=Flags(flags))
    assert decode(key, encode(key, 0, 1, 2, s)).status == s


@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 80)), max_size=60))
def test_fuzz_each_round_accepted_at_most_once_per_link(order: list[tuple[int, int]]) -> None:
    a, b = pair()
    rounds = [b.build(status(last_lsn=i), 0.0) for i in range(81)]
    accepted: set[tuple[int, int]] = set()
    for link, i in order:
        try:
            a.receive(link, rounds[i][link], 0.0)
        except HeartbeatError:
            continue
        assert (link, i) not in accepted
        accepted.add((link, i))
    if accepted:
        assert a.peer_status is not None
        assert a.peer_status.last_lsn == max(i for _, i in accepted)
