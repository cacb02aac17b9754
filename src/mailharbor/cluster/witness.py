"""The witness: an exclusive, numbered, durable vote lease for one pair, and the node's side.

Theory of operation
-------------------
The witness (the corosync-qnetd idea, for one pair) holds one vote. A node that wants to write
asks for it (``ACQUIRE``, which also renews); the witness grants it to **one node at a time** as
a lease with a number, the *term*, that grows by one each time the vote changes hands. The
witness also records which node is Outdated at which generation (``OUTDATE``/``CLEAR``, only
from the live holder), and refuses the vote to an Outdated node unless forced.

Messages are fixed-size and datagram-shaped (the adapter frames them on its transport)::

    request: "MHWQ" ver u8 kind u8 flags u16 | cluster 16 | node 16 | incarnation u64 | seq u64
             | lease_ms u32 | margin_ms u32 | target 16 | generation u64 | HMAC-SHA256 32
    reply:   "MHWR" ver u8 kind u8 status u8 0 u8 | cluster 16 | node 16 | incarnation u64
             | seq u64 | term u64 | owner 16 | lease_ms u32 | retry_ms u32
             | my_outdated u64 | peer_outdated u64 | HMAC-SHA256 32

Requests and replies are MACed under two keys derived from the pair's secret, one per
direction, so a request cannot be reflected as a reply. Every request carries the node's
``(incarnation, seq)``, which must grow (the incarnation across the node's restarts, the seq
within one): the witness refuses anything not above the last accepted pair for that node, and
that high-water mark is part of its durable state, so a recorded request cannot be replayed
even across a witness restart. A reply echoes the request's pair; the node accepts only replies
to requests it has outstanding.

Durability: :meth:`Witness.handle` returns a :class:`Step`: ``state`` (bytes the adapter must
write and fsync) and ``reply``, which the adapter sends **only after** the state is durable.
A grant that was sent but not stored could be re-granted to the other node after a crash.

Time: the witness measures on its own monotonic clock from when it *received* a request; the
node measures from when it *sent* it (:class:`LeaseClient`), so the node's view of its lease
always ends before the witness's.

Invariants (tested, the first with Hypothesis):

* **Exclusive.** At any witness instant at most one node holds an unexpired grant, and a vote
  changes hands only once ``lease + margin`` (the holder's values, carried in its request) has
  passed since the holder's last renewal was received.
* **Restart-safe.** After :meth:`Witness.restore` the last holder is assumed to have just
  renewed: nobody else gets the vote before ``lease + margin`` from the restart.
* Terms never decrease; a grant to a new holder is always a new term.
* **Node side.** :meth:`LeaseClient.held` is False from ``sent + lease - lease_margin`` of the
  newest granted request on; a late or replayed reply never extends it.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from .timing import Timing

__all__ = [
    "Kind",
    "LeaseClient",
    "LeaseEvent",
    "Reply",
    "Request",
    "Status",
    "Step",
    "Witness",
    "WitnessError",
    "WitnessState",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
]

REQ_MAGIC = b"MHWQ"
REP_MAGIC = b"MHWR"
VERSION = 1
ID_LEN = 16
TAG_LEN = 32
NONE64 = 0xFFFF_FFFF_FFFF_FFFF
NO_NODE = bytes(ID_LEN)
_REQ = struct.Struct("<4sBBH16s16sQQII16sQ")
_REP = struct.Struct("<4sBBBB16s16sQQQ16sIIQQ")
REQUEST_SIZE = _REQ.size + TAG_LEN
REPLY_SIZE = _REP.size + TAG_LEN
_REQ_LABEL = b"mailharbor-witness-request-v1\x00"
_REP_LABEL = b"mailharbor-witness-reply-v1\x00"
MAX_LEASE_MS = 600_000
FLAG_FORCE = 0x0001


class Kind(enum.IntEnum):
    ACQUIRE = 1  # acquire or renew the vote lease
    RELEASE = 2  # give the vote back (sent only after the node stopped acknowledging)
    OUTDATE = 3  # the holder marks ``target`` Outdated at ``generation``
    CLEAR = 4  # the holder clears ``target``'s Outdated mark (it resynced)
    QUERY = 5  # who holds the vote, and the Outdated marks


class Status(enum.IntEnum):
    OK = 1  # granted / released / recorded / answered
    BUSY = 2  # the vote is held by the other node (``owner``, ``retry_ms``)
    OUTDATED = 3  # the requester is marked Outdated: no vote without force
    NOT_OWNER = 4  # only the live holder may outdate/clear; release by a non-holder


class WitnessError(Exception):
    """A request or reply that is refused (logged and dropped, never answered)."""


@dataclass(frozen=True)
class Request:
    kind: Kind
    cluster: bytes
    node: bytes
    incarnation: int
    seq: int
    lease_ms: int = 0
    margin_ms: int = 0
    target: bytes = NO_NODE
    generation: int = 0
    force: bool = False


@dataclass(frozen=True)
class Reply:
    kind: Kind
    status: Status
    cluster: bytes
    node: bytes
    incarnation: int
    seq: int
    term: int
    owner: bytes | None
    lease_ms: int
    retry_ms: int
    my_outdated: int | None
    peer_outdated: int | None


def _keys(secret: bytes) -> tuple[bytes, bytes]:
    return (
        hmac.new(secret, _REQ_LABEL, hashlib.sha256).digest(),
        hmac.new(secret, _REP_LABEL, hashlib.sha256).digest(),
    )


def _tag(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()


def _opt(v: int | None) -> int:
    return NONE64 if v is None else v


def _unopt(v: int) -> int | None:
    return None if v == NONE64 else v


def encode_request(secret: bytes, r: Request) -> bytes:
    body = _REQ.pack(
        REQ_MAGIC,
        VERSION,
        int(r.kind),
        FLAG_FORCE if r.force else 0,
        r.cluster,
        r.node,
        r.incarnation,
        r.seq,
        r.lease_ms,
        r.margin_ms,
        r.target,
        r.generation,
    )
    return body + _tag(_keys(secret)[0], body)


def _split(data: bytes, size: int, magic: bytes, key: bytes) -> bytes:
    if len(data) != size:
        raise WitnessError(f"length {len(data)}, expected {size}")
    body, tag = bytes(data[: size - TAG_LEN]), bytes(data[size - TAG_LEN :])
    if body[:4] != magic:
        raise WitnessError("bad magic")
    if not hmac.compare_digest(_tag(key, body), tag):
        raise WitnessError("tag does not verify")
    if body[4] != VERSION:
        raise WitnessError(f"unsupported version {body[4]}")
    return body


def decode_request(secret: bytes, data: bytes) -> Request:
    body = _split(data, REQUEST_SIZE, REQ_MAGIC, _keys(secret)[0])
    (_, _, kind, flags, cl, node, inc, seq, lease, margin, target, gen) = _REQ.unpack(body)
    if kind not in Kind._value2member_map_ or flags & ~FLAG_FORCE:
        raise WitnessError("unknown kind or flags")
    return Request(
        Kind(kind), cl, node, inc, seq, lease, margin, target, gen, bool(flags & FLAG_FORCE)
    )


def encode_reply(secret: bytes, r: Reply) -> bytes:
    body = _REP.pack(
        REP_MAGIC,
        VERSION,
        int(r.kind),
        int(r.status),
        0,
        r.cluster,
        r.node,
        r.incarnation,
        r.seq,
        r.term,
        r.owner or NO_NODE,
        r.lease_ms,
        r.retry_ms,
        _opt(r.my_outdated),
        _opt(r.peer_outdated),
    )
    return body + _tag(_keys(secret)[1], body)


def decode_reply(secret: bytes, data: bytes) -> Reply:
    body = _split(data, REPLY_SIZE, REP_MAGIC, _keys(secret)[1])
    (_, _, kind, status, pad, cl, node, inc, seq, term, owner, lease, retry, mine, peer) = (
        _REP.unpack(body)
    )
    if kind not in Kind._value2member_map_ or status not in Status._value2member_map_ or pad:
        raise WitnessError("unknown kind or status")
    return Reply(
        Kind(kind),
        Status(status),
        cl,
        node,
        inc,
        seq,
        term,
        None if owner == NO_NODE else owner,
        lease,
        retry,
        _unopt(mine),
        _unopt(peer),
    )


# --- the witness's durable state ---------------------------------------------------------------

_STATE_HEAD = struct.Struct("<4sBQ16sIIBB")
_STATE_OUT = struct.Struct("<16sQ")
_STATE_SEEN = struct.Struct("<16sQQ")
_STATE_MAGIC = b"MHWS"


@dataclass(frozen=True)
class WitnessState:
    """What the witness must find again after a restart (encoded by :meth:`encode`)."""

    term: int = 0
    owner: bytes | None = None
    lease_ms: int = 0
    margin_ms: int = 0
    outdated: tuple[tuple[bytes, int], ...] = ()
    seen: tuple[tuple[bytes, int, int], ...] = ()

    def encode(self) -> bytes:
        out = bytearray(
            _STATE_HEAD.pack(
                _STATE_MAGIC,
                1,
                self.term,
                self.owner or NO_NODE,
                self.lease_ms,
                self.margin_ms,
                len(self.outdated),
                len(self.seen),
            )
        )
        for node, gen in self.outdated:
            out += _STATE_OUT.pack(node, gen)
        for node, inc, seq in self.seen:
            out += _STATE_SEEN.pack(node, inc, seq)
        out += struct.pack("<I", zlib.crc32(out))
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> WitnessState:
        """Raises :class:`WitnessError` on anything but a whole, intact state."""
        if len(data) < _STATE_HEAD.size + 4:
            raise WitnessError("state too short")
        if struct.unpack("<I", data[-4:])[0] != zlib.crc32(data[:-4]):
            raise WitnessError("state checksum mismatch")
        magic, ver, term, owner, lease, margin, n_out, n_seen = _STATE_HEAD.unpack_from(data)
        if magic != _STATE_MAGIC or ver != 1:
            raise WitnessError("not a witness state, or an unknown version")
        want = _STATE_HEAD.size + n_out * _STATE_OUT.size + n_seen * _STATE_SEEN.size + 4
        if len(data) != want:
            raise WitnessError("state length mismatch")
        pos = _STATE_HEAD.size
        outdated = []
        for _ in range(n_out):
            outdated.append(_STATE_OUT.unpack_from(data, pos))
            pos += _STATE_OUT.size
        seen = []
        for _ in range(n_seen):
            seen.append(_STATE_SEEN.unpack_from(data, pos))
            pos += _STATE_SEEN.size
        return cls(
            term, None if owner == NO_NODE else owner, lease, margin, tuple(outdated), tuple(seen)
        )


@dataclass(frozen=True)
class Step:
    """What the adapter does with one accepted request: write and fsync ``state``, **then**
    send ``reply``."""

    state: bytes
    reply: bytes
    decoded: Request
    answer: Reply


@dataclass
class Witness:
    """The witness for one pair (``nodes``), with its pair secret and cluster id.

    Create with :meth:`restore` (``state`` None for a fresh witness). ``min_margin`` is a floor
    on the re-grant margin whatever a request asks.
    """

    cluster: bytes
    nodes: tuple[bytes, bytes]
    secret: bytes
    min_margin: float = 0.0
    state: WitnessState = field(default_factory=WitnessState)
    #: Witness time until which the holder's lease (without margin) runs.
    expires_at: float = float("-inf")
    #: Witness time before which nobody else gets the vote.
    blocked_until: float = float("-inf")

    @classmethod
    def restore(
        cls,
        cluster: bytes,
        nodes: tuple[bytes, bytes],
        secret: bytes,
        state: bytes | None,
        now: float,
        *,
        min_margin: float = 0.0,
    ) -> Witness:
        """A witness from its durable state (or fresh); a recorded holder counts as renewed now."""
        if len(nodes) != 2 or nodes[0] == nodes[1] or NO_NODE in nodes:
            raise ValueError("a witness serves exactly two distinct, non-zero node ids")
        w = cls(cluster, nodes, secret, min_margin)
        if state is not None:
            w.state = WitnessState.decode(state)
            if w.state.owner is not None:
                w.expires_at = now + w.state.lease_ms / 1000
                w.blocked_until = w.expires_at + max(w.state.margin_ms / 1000, min_margin)
        return w

    def owner(self, now: float) -> bytes | None:
        """The node holding an unexpired grant at ``now`` (None when free or expired)."""
        return self.state.owner if now < self.expires_at else None

    def _other(self, node: bytes) -> bytes:
        return self.nodes[1] if node == self.nodes[0] else self.nodes[0]

    def handle(self, data: bytes, now: float) -> Step:
        """Process one request. Raises :class:`WitnessError` (drop it, no reply) if refused."""
        r = decode_request(self.secret, data)
        if r.cluster != self.cluster:
            raise WitnessError("request for another cluster")
        if r.node not in self.nodes:
            raise WitnessError("request from a node outside the pair")
        seen = {n: (i, s) for n, i, s in self.state.seen}
        if (r.incarnation, r.seq) <= seen.get(r.node, (-1, -1)):
            raise WitnessError("replayed or reordered request")
        if r.kind is Kind.ACQUIRE and not (
            0 < r.lease_ms <= MAX_LEASE_MS and r.margin_ms <= MAX_LEASE_MS
        ):
            raise WitnessError("lease or margin out of range")
        if r.kind in (Kind.OUTDATE, Kind.CLEAR) and r.target != self._other(r.node):
            raise WitnessError("target must be the requester's peer")
        seen[r.node] = (r.incarnation, r.seq)
        st = self.state
        outdated = dict(st.outdated)
        term, owner, lease_ms, margin_ms = st.term, st.owner, st.lease_ms, st.margin_ms
        expires, blocked = self.expires_at, self.blocked_until
        status, retry = Status.OK, 0
        live_holder = owner == r.node and now < expires
        if r.kind is Kind.ACQUIRE:
            margin = max(r.margin_ms / 1000, self.min_margin)
            if r.node in outdated and not r.force:
                status = Status.OUTDATED
            elif owner == r.node or owner is None or now >= blocked:
                if owner != r.node:
                    term += 1
                    owner = r.node
                lease_ms, margin_ms = r.lease_ms, round(margin * 1000)
                expires = (
                    max(expires, now + r.lease_ms / 1000)
                    if live_holder
                    else (now + r.lease_ms / 1000)
                )
                blocked = max(blocked, expires + margin)
            else:
                status, retry = Status.BUSY, max(1, int((blocked - now) * 1000) + 1)
        elif r.kind is Kind.RELEASE:
            if owner == r.node:
                owner, expires, blocked = None, float("-inf"), float("-inf")
            else:
                status = Status.NOT_OWNER
        elif r.kind is Kind.OUTDATE:
            if live_holder:
                outdated[r.target] = max(outdated.get(r.target, 0), r.generation)
            else:
                status = Status.NOT_OWNER
        elif r.kind is Kind.CLEAR:
            if live_holder:
                outdated.pop(r.target, None)
            else:
                status = Status.NOT_OWNER
        new = WitnessState(
            term,
            owner,
            lease_ms,
            margin_ms,
            tuple(sorted(outdated.items())),
            tuple(sorted((n, i, s) for n, (i, s) in seen.items())),
        )
        self.state, self.expires_at, self.blocked_until = new, expires, blocked
        cur_owner = owner if now < expires else None
        answer = Reply(
            r.kind,
            status,
            self.cluster,
            r.node,
            r.incarnation,
            r.seq,
            term,
            cur_owner,
            lease_ms if cur_owner == r.node else 0,
            retry,
            outdated.get(r.node),
            outdated.get(self._other(r.node)),
        )
        return Step(new.encode(), encode_reply(self.secret, answer), r, answer)


# --- the node's side -------------------------------------------------------------------------


class LeaseEvent(enum.Enum):
    GRANTED = "granted"
    BUSY = "busy"
    OUTDATED = "outdated"
    RELEASED = "released"
    RECORDED = "recorded"  # OUTDATE / CLEAR accepted
    NOT_OWNER = "not-owner"
    ANSWERED = "answered"  # QUERY


@dataclass
class LeaseClient:
    """A node's bookkeeping of its vote lease, on its monotonic clock.

    Each grant counts from when its request was **sent**: the node acknowledges only while
    ``now < sent + lease - lease_margin`` (:meth:`held`) and must have stopped everything by
    ``sent + lease - lease_margin + self_fence_timeout`` (:attr:`exit_by`).
    """

    cluster: bytes
    node_id: bytes
    secret: bytes
    timing: Timing
    incarnation: int
    term: int = 0
    #: The term of the last lease granted to this node (what it advertises as primary); `term`
    #: also follows QUERY answers about the other node's lease.
    granted_term: int = 0
    stop_at: float = float("-inf")
    #: Last witness answer fields, for the cluster view.
    owner: bytes | None = None
    my_outdated: int | None = None
    peer_outdated: int | None = None
    last_reply_at: float | None = None
    retry_at: float = float("-inf")
    _seq: int = 0
    _sent: dict[int, tuple[Kind, float]] = field(default_factory=dict)
    _last_acquire_sent: float = float("-inf")

    @property
    def exit_by(self) -> float:
        return self.stop_at + self.timing.self_fence_timeout

    def held(self, now: float) -> bool:
        return now < self.stop_at

    def renew_due(self, now: float) -> bool:
        """True when the holder should send its next renewal."""
        return self.held(now) and now - self._last_acquire_sent >= self.timing.renew_interval

    def request(
        self,
        kind: Kind,
        now: float,
        *,
        target: bytes = NO_NODE,
        generation: int = 0,
        force: bool = False,
    ) -> bytes:
        """Encode a request and remember when it was sent."""
        seq = self._seq
        self._seq += 1
        if kind is Kind.RELEASE:
            self.drop()  # we stop counting on it before it is given back
        if kind is Kind.ACQUIRE:
            self._last_acquire_sent = now
        self._sent[seq] = (kind, now)
        horizon = now - max(self.timing.lease, self.timing.regrant_after)
        for old in [s for s, (_, t) in self._sent.items() if t < horizon]:
            del self._sent[old]
        t = self.timing
        return encode_request(
            self.secret,
            Request(
                kind,
                self.cluster,
                self.node_id,
                self.incarnation,
                seq,
                round(t.lease * 1000) if kind is Kind.ACQUIRE else 0,
                round(t.witness_margin * 1000) if kind is Kind.ACQUIRE else 0,
                target,
                generation,
                force,
            ),
        )

    def drop(self) -> None:
        """Stop counting on the lease (before a release, or on demotion).

        Replies to ACQUIREs sent before this are refused from now on, so a late grant cannot
        bring back a lease the node already gave up."""
        self.stop_at = float("-inf")
        for seq in [s for s, (k, _) in self._sent.items() if k is Kind.ACQUIRE]:
            del self._sent[seq]

    def receive(self, data: bytes, now: float) -> tuple[LeaseEvent, Reply]:
        """Accept one reply; raises :class:`WitnessError` for anything not ours or stale."""
        r = decode_reply(self.secret, data)
        if r.cluster != self.cluster or r.node != self.node_id:
            raise WitnessError("reply for another cluster or node")
        if r.incarnation != self.incarnation or r.seq not in self._sent:
            raise WitnessError("reply to no outstanding request")
        kind, sent = self._sent.pop(r.seq)
        if kind is not r.kind:
            raise WitnessError("reply kind does not match the request")
        self.last_reply_at = now
        self.owner, self.my_outdated, self.peer_outdated = r.owner, r.my_outdated, r.peer_outdated
        if r.status is Status.BUSY:
            self.retry_at = now + r.retry_ms / 1000
            return LeaseEvent.BUSY, r
        if r.status is Status.OUTDATED:
            return LeaseEvent.OUTDATED, r
        if r.status is Status.NOT_OWNER:
            return LeaseEvent.NOT_OWNER, r
        if kind is Kind.ACQUIRE:
            granted = min(r.lease_ms / 1000, self.timing.lease)
            stop = sent + granted - self.timing.lease_margin
            if r.term != self.term:
                if r.term < self.term:
                    raise WitnessError("grant of an older term")
                self.term, self.stop_at = r.term, stop
            else:
                self.stop_at = max(self.stop_at, stop)
            self.granted_term = r.term
            return LeaseEvent.GRANTED, r
        if kind is Kind.RELEASE:
            return LeaseEvent.RELEASED, r
        if kind is Kind.QUERY:
            self.term = max(self.term, r.term)
            return LeaseEvent.ANSWERED, r
        return LeaseEvent.RECORDED, r

    def witness_reachable(self, now: float, within: float) -> bool:
        return self.last_reply_at is not None and now - self.last_reply_at <= within


def pair_ids(ids: Iterable[bytes]) -> tuple[bytes, bytes]:
    """The two node ids of a pair, sorted (helper for the witness configuration)."""
    a, b = sorted(ids)
    return a, b
