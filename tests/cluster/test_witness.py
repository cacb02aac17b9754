"""The witness and the node's lease bookkeeping, in virtual time."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailharbor.cluster.timing import DEFAULT_TIMING as T
from mailharbor.cluster.witness import (
    REPLY_SIZE,
    REQUEST_SIZE,
    Kind,
    LeaseClient,
    LeaseEvent,
    Request,
    Witness,
    WitnessError,
    WitnessState,
    encode_request,
)

A, B = b"\x0a" * 16, b"\x0b" * 16
CL = b"\xcc" * 16
SECRET = b"pair secret"


def witness(now: float = 0.0, state: bytes | None = None) -> Witness:
    return Witness.restore(CL, (A, B), SECRET, state, now)


def client(node: bytes, inc: int = 1) -> LeaseClient:
    return LeaseClient(CL, node, SECRET, T, inc)


def rt(
    w: Witness, c: LeaseClient, kind: Kind, sent: float, arrive: float, back: float, **kw: object
) -> LeaseEvent:
    """One round trip: sent by the node, handled by the witness, persisted, answered."""
    req = c.request(kind, sent, **kw)  # type: ignore[arg-type]
    step = w.handle(req, arrive)
    assert WitnessState.decode(step.state) == w.state  # what is persisted is what is in force
    return c.receive(step.reply, back)[0]


def test_grant_renew_and_exclusivity() -> None:
    w, a, b = witness(), client(A), client(B)
    assert rt(w, a, Kind.ACQUIRE, 0.0, 0.01, 0.02) is LeaseEvent.GRANTED
    assert a.term == 1 and a.held(0.02) and a.stop_at == pytest.approx(T.lease - T.lease_margin)
    # the lease counts from the SEND, not the reply
    assert not a.held(T.stop_after)
    assert rt(w, b, Kind.ACQUIRE, 0.5, 0.5, 0.5) is LeaseEvent.BUSY
    assert b.owner == A and not b.held(0.5)
    # a renews at 0.5; b only gets it lease + margin after the witness RECEIVED the last renewal
    assert rt(w, a, Kind.ACQUIRE, 0.5, 0.51, 0.52) is LeaseEvent.GRANTED
    regrant = 0.51 + T.lease + T.witness_margin
    assert rt(w, b, Kind.ACQUIRE, regrant - 0.01, regrant - 0.01, regrant) is LeaseEvent.BUSY
    assert rt(w, b, Kind.ACQUIRE, regrant, regrant, regrant) is LeaseEvent.GRANTED
    assert b.term == 2
    # a's own view ended long before: stop point then self-fence deadline before the re-grant
    assert a.exit_by < regrant


def test_release_lets_the_peer_in_at_once_and_late_grants_do_not_revive() -> None:
    w, a, b = witness(), client(A), client(B)
    rt(w, a, Kind.ACQUIRE, 0.0, 0.0, 0.0)
    late = a.request(Kind.ACQUIRE, 0.2)
    late_step = w.handle(late, 0.2)
    assert rt(w, a, Kind.RELEASE, 0.3, 0.3, 0.3) is LeaseEvent.RELEASED
    assert not a.held(0.3)
    with pytest.raises(WitnessError):
        a.receive(late_step.reply, 0.31)  # the grant sent before the release is refused
    assert not a.held(0.31)
    assert rt(w, b, Kind.ACQUIRE, 0.4, 0.4, 0.4) is LeaseEvent.GRANTED


def test_outdated_node_gets_no_vote() -> None:
    w, a, b = witness(), client(A), client(B)
    rt(w, a, Kind.ACQUIRE, 0.0, 0.0, 0.0)
    assert rt(w, b, Kind.OUTDATE, 0.1, 0.1, 0.1, target=A, generation=9) is LeaseEvent.NOT_OWNER
    assert rt(w, a, Kind.OUTDATE, 0.1, 0.1, 0.1, target=B, generation=9) is LeaseEvent.RECORDED
    assert a.peer_outdated == 9
    t = 10.0  # a died long ago
    assert rt(w, b, Kind.ACQUIRE, t, t, t) is LeaseEvent.OUTDATED
    assert b.my_outdated == 9 and not b.held(t)
    assert rt(w, b, Kind.ACQUIRE, t + 1, t + 1, t + 1, force=True) is LeaseEvent.GRANTED


def test_clear_by_holder() -> None:
    w, a, b = witness(), client(A), client(B)
    rt(w, a, Kind.ACQUIRE, 0.0, 0.0, 0.0)
    rt(w, a, Kind.OUTDATE, 0.1, 0.1, 0.1, target=B, generation=2)
    assert rt(w, a, Kind.CLEAR, 0.2, 0.2, 0.2, target=B) is LeaseEvent.RECORDED
    assert a.peer_outdated is None
    assert rt(w, b, Kind.QUERY, 0.3, 0.3, 0.3) is LeaseEvent.ANSWERED and b.owner == A


def test_restart_keeps_term_owner_outdated_and_blocks_for_a_full_lease() -> None:
    w, a = witness(), client(A)
    rt(w, a, Kind.ACQUIRE, 0.0, 0.0, 0.0)
    rt(w, a, Kind.OUTDATE, 0.1, 0.1, 0.1, target=B, generation=4)
    saved = w.state.encode()
    w2 = witness(now=1000.0, state=saved)  # the witness's monotonic clock restarted
    assert w2.state.term == 1 and w2.state.owner == A and w2.state.outdated == ((B, 4),)
    b2 = client(B)
    rt(w2, a, Kind.CLEAR, 1000.0, 1000.0, 1000.0, target=B)
    assert rt(w2, b2, Kind.ACQUIRE, 1001.0, 1001.0, 1001.0) is LeaseEvent.BUSY
    t = 1000.0 + T.lease + T.witness_margin
    assert rt(w2, b2, Kind.ACQUIRE, t, t, t) is LeaseEvent.GRANTED and b2.term == 2


def test_replay_is_refused_even_across_a_witness_restart() -> None:
    w, a = witness(), client(A)
    req = a.request(Kind.ACQUIRE, 0.0)
    step = w.handle(req, 0.0)
    with pytest.raises(WitnessError):
        w.handle(req, 0.1)
    w2 = witness(now=50.0, state=step.state)
    with pytest.raises(WitnessError):
        w2.handle(req, 50.0)
    # a restarted node (higher incarnation) starts its seq again
    a2 = client(A, inc=2)
    assert rt(w2, a2, Kind.QUERY, 51.0, 51.0, 51.0) is LeaseEvent.ANSWERED


def test_replies_are_bound_to_their_request() -> None:
    w, a, b = witness(), client(A), client(B)
    step = w.handle(a.request(Kind.ACQUIRE, 0.0), 0.0)
    with pytest.raises(WitnessError):
        b.receive(step.reply, 0.0)  # not b's
    a.receive(step.reply, 0.0)
    with pytest.raises(WitnessError):
        a.receive(step.reply, 0.1)  # replayed reply
    # a request cannot be reflected as a reply
    with pytest.raises(WitnessError):
        a.receive(encode_request(SECRET, Request(Kind.ACQUIRE, CL, A, 1, 5)), 0.1)


@pytest.mark.parametrize(
    "req",
    [
        Request(Kind.ACQUIRE, b"\x00" * 16, A, 1, 0, 2000, 500),  # other cluster
        Request(Kind.ACQUIRE, CL, b"\x0e" * 16, 1, 0, 2000, 500),  # outside the pair
        Request(Kind.ACQUIRE, CL, A, 1, 0, 0, 500),  # no lease
        Request(Kind.OUTDATE, CL, A, 1, 0, target=A),  # outdating itself
    ],
)
def test_bad_requests_are_dropped(req: Request) -> None:
    with pytest.raises(WitnessError):
        witness().handle(encode_request(SECRET, req), 0.0)


@given(st.binary(max_size=2 * REQUEST_SIZE))
def test_fuzz_witness_drops_random_bytes(data: bytes) -> None:
    with pytest.raises(WitnessError):
        witness().handle(data, 0.0)


@given(st.binary(max_size=2 * REPLY_SIZE))
def test_fuzz_client_drops_random_bytes(data: bytes) -> None:
    with pytest.raises(WitnessError):
        client(A).receive(data, 0.0)


@given(st.binary(max_size=200))
def test_fuzz_state_decode(data: bytes) -> None:
    with contextlib.suppress(WitnessError):
        WitnessState.decode(data)


@given(st.integers(0, REQUEST_SIZE - 1), st.integers(1, 255))
def test_fuzz_tampered_request(pos: int, xor: int) -> None:
    data = bytearray(client(A).request(Kind.ACQUIRE, 0.0))
    data[pos] ^= xor
    with pytest.raises(WitnessError):
        witness().handle(bytes(data), 0.0)


# --- the exclusivity property -----------------------------------------------------------------

_ops = st.lists(
    st.tuples(
        st.sampled_from(["acquire-a", "acquire-b", "release-a", "release-b", "restart", "tick"]),
        st.floats(min_value=0.0, max_value=1.5),
    ),
    max_size=60,
)


@given(_ops)
def test_never_two_unexpired_grants(ops: list[tuple[str, float]]) -> None:
    """For any interleaving of requests, releases, witness restarts and clock advances: the
    witness never has two unexpired grants, and the nodes' own views of their leases (measured
    from the send) never overlap in time."""
    now = 0.0
    w = witness()
    clients = {A: client(A), B: client(B)}
    held: dict[bytes, list[tuple[float, float]]] = {A: [], B: []}  # node's (from, stop_at)
    for op, dt in ops:
        now += dt
        if op == "tick":
            continue
        if op == "restart":
            w = witness(now, w.state.encode())
            continue
        node = A if op.endswith("a") else B
        c = clients[node]
        kind = Kind.ACQUIRE if op.startswith("acquire") else Kind.RELEASE
        was_held = c.held(now)
        prev_stop = c.stop_at
        req = c.request(kind, now)
        if kind is Kind.RELEASE and was_held:
            held[node].append((-1.0, now))  # marker: released at now
        step = w.handle(req, now)
        owner = w.owner(now)
        other = B if node == A else A
        assert owner is None or owner in (A, B)
        ev, _ = c.receive(step.reply, now)
        if ev is LeaseEvent.GRANTED:
            assert w.owner(now) == node
            if not (prev_stop > now):
                held[node].append((now, c.stop_at))
            else:
                held[node][-1] = (held[node][-1][0], c.stop_at)
            # the other node's view of its own lease must have ended
            assert not clients[other].held(now)

    # node-side intervals never overlap: [start, end) where end = stop point or release
    def intervals(n: bytes) -> list[tuple[float, float]]:
        out: list[tuple[float, float]] = []
        for s, e in held[n]:
            if s < 0:
                if out:
                    out[-1] = (out[-1][0], min(out[-1][1], e))
            else:
                out.append((s, e))
        return out

    for sa, ea in intervals(A):
        for sb, eb in intervals(B):
            assert ea <= sb or eb <= sa, (intervals(A), intervals(B))
