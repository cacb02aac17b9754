"""Membership: authenticated heartbeats over two or more links, and per-link liveness.

Theory of operation
-------------------
Every ``keepalive`` a node builds one heartbeat *round*: the same status (node id, cluster
settings hash, term, role, disk state, generation, last LSN and a few flags) sent once on every
link, each copy tagged with its link index. The message is fixed-size (:data:`MESSAGE_SIZE`)::

    magic "MHHB" | version u8 | link u8 | flags u16 | incarnation u64 | seq u64 | node id 16
    | settings hash 32 | term u64 | generation u64 | last LSN u64 | role u8 | disk u8 | 0 u16
    | HMAC-SHA256 tag 32   (little-endian; the tag covers everything before it)

The tag is keyed by a heartbeat key derived from the pair's shared secret
(:func:`heartbeat_key`), so a message cannot be forged, nor moved to another link (the link
index is inside the MAC). ``incarnation`` names one run of the sender and must grow across its
restarts (the adapter uses the wall clock in nanoseconds at start); ``seq`` counts rounds within
an incarnation. The receiver keeps, per link, the highest ``seq`` and a 64-round window, so a
replayed or duplicated message is refused, and an older incarnation is refused outright.

Liveness is judged per link on the injected monotonic clock (``now`` arguments):

=========  ===================================================================================
state      condition (``age`` = now − last accepted message on that link)
=========  ===================================================================================
``INIT``   never heard since start, and ``now − start < initdead``
``UP``     ``age < warntime``
``LATE``   ``warntime ≤ age < deadtime`` (Heartbeat's "late heartbeat" warning)
``DEAD``   ``age ≥ deadtime``, or never heard and ``initdead`` has passed
=========  ===================================================================================

The peer is ``ALIVE`` when any link is ``UP`` or ``LATE``, ``DEAD`` only when **every** link is
``DEAD``, and ``UNKNOWN`` otherwise (still within initdead on some link).

Invariants:

* :meth:`Heartbeat.receive` raises nothing but :class:`HeartbeatError` subclasses, whatever
  the bytes, and changes no state when it raises.
* A message is accepted only if its tag verifies, it came on the link it names, it is from the
  expected peer (not from us, reflected), its settings hash is ours, and its (incarnation, seq)
  was not accepted on that link before.
* The peer's status is taken from the newest accepted round, never moved back by a late copy.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..repl.state import DISK_CODES, ROLE_CODES, DiskState, Role
from .timing import Timing

__all__ = [
    "MESSAGE_SIZE",
    "BadMessage",
    "Flags",
    "Heartbeat",
    "HeartbeatError",
    "LinkState",
    "NodeStatus",
    "PeerState",
    "Refusal",
    "Replayed",
    "SettingsMismatch",
    "WrongPeer",
    "decode",
    "encode",
    "heartbeat_key",
]

MAGIC = b"MHHB"
VERSION = 1
NODE_ID_LEN = 16
HASH_LEN = 32
TAG_LEN = 32
_BODY = struct.Struct("<4sBBHQQ16s32sQQQBBH")
MESSAGE_SIZE = _BODY.size + TAG_LEN
WINDOW = 64
_KEY_LABEL = b"mailharbor-heartbeat-key-v1\x00"
_ROLE_BY_CODE = {v: k for k, v in ROLE_CODES.items()}
_DISK_BY_CODE = {v: k for k, v in DISK_CODES.items()}


class Flags(enum.IntFlag):
    NONE = 0
    STANDBY = 0x01  # the node is in standby (or yielding after a switchover)
    SELF_FENCE_ARMED = 0x02  # the node will exit before its lease ends
    RESOURCES_STOPPED = 0x04  # no resource runs: the node neither writes nor serves
    SHUTDOWN = 0x08  # clean shutdown: everything stopped, the node is leaving
    LEASE_HELD = 0x10  # the node holds the witness's vote


_KNOWN_FLAGS = int(Flags.STANDBY | Flags.SELF_FENCE_ARMED | Flags.RESOURCES_STOPPED) | int(
    Flags.SHUTDOWN | Flags.LEASE_HELD
)


@dataclass(frozen=True)
class NodeStatus:
    """What a node says about itself in every heartbeat."""

    node_id: bytes
    settings_hash: bytes
    term: int
    role: Role
    disk: DiskState
    generation: int
    last_lsn: int
    flags: Flags = Flags.NONE


@dataclass(frozen=True)
class Message:
    """One decoded heartbeat (the tag checked)."""

    link: int
    incarnation: int
    seq: int
    status: NodeStatus


class Refusal(enum.Enum):
    MALFORMED = "malformed"
    FORGED = "forged"
    WRONG_LINK = "wrong-link"
    WRONG_PEER = "wrong-peer"
    REFLECTED = "reflected"
    SETTINGS = "settings-differ"
    REPLAYED = "replayed"
    STALE_INCARNATION = "stale-incarnation"


class HeartbeatError(Exception):
    """A refused heartbeat; ``reason`` names why (it is logged, never sent)."""

    reason = Refusal.MALFORMED

    def __init__(self, detail: str = "") -> None:
        super().__init__(f"{self.reason.value}: {detail}" if detail else self.reason.value)
        self.detail = detail


class BadMessage(HeartbeatError):
    reason = Refusal.MALFORMED


class ForgedMessage(HeartbeatError):
    reason = Refusal.FORGED


class WrongLink(HeartbeatError):
    reason = Refusal.WRONG_LINK


class WrongPeer(HeartbeatError):
    reason = Refusal.WRONG_PEER


class Reflected(HeartbeatError):
    reason = Refusal.REFLECTED


class SettingsMismatch(HeartbeatError):
    reason = Refusal.SETTINGS


class Replayed(HeartbeatError):
    reason = Refusal.REPLAYED


class StaleIncarnation(HeartbeatError):
    reason = Refusal.STALE_INCARNATION


def heartbeat_key(pair_secret: bytes) -> bytes:
    """The heartbeat MAC key, derived from the pair's shared secret (never the secret itself)."""
    return hmac.new(pair_secret, _KEY_LABEL, hashlib.sha256).digest()


def _u64(v: int, what: str) -> int:
    if not 0 <= v < 2**64:
        raise ValueError(f"{what} out of range: {v}")
    return v


def encode(key: bytes, link: int, incarnation: int, seq: int, s: NodeStatus) -> bytes:
    """One heartbeat message for ``link``. Raises ValueError on out-of-range fields."""
    if len(s.node_id) != NODE_ID_LEN or len(s.settings_hash) != HASH_LEN:
        raise ValueError("node id must be 16 bytes and the settings hash 32")
    if not 0 <= link < 256:
        raise ValueError(f"link index out of range: {link}")
    body = _BODY.pack(
        MAGIC,
        VERSION,
        link,
        int(s.flags) & _KNOWN_FLAGS,
        _u64(incarnation, "incarnation"),
        _u64(seq, "seq"),
        s.node_id,
        s.settings_hash,
        _u64(s.term, "term"),
        _u64(s.generation, "generation"),
        _u64(s.last_lsn, "last_lsn"),
        ROLE_CODES[s.role],
        DISK_CODES[s.disk],
        0,
    )
    return body + hmac.new(key, body, hashlib.sha256).digest()


def decode(key: bytes, data: bytes) -> Message:
    """Check the tag and parse; raises :class:`BadMessage` or :class:`ForgedMessage` only."""
    if len(data) != MESSAGE_SIZE:
        raise BadMessage(f"length {len(data)}, expected {MESSAGE_SIZE}")
    body, tag = bytes(data[: _BODY.size]), bytes(data[_BODY.size :])
    if body[:4] != MAGIC:
        raise BadMessage("bad magic")
    if not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).digest(), tag):
        raise ForgedMessage("tag does not verify")
    (_, version, link, flags, inc, seq, nid, sh, term, gen, lsn, role, disk, pad) = _BODY.unpack(
        body
    )
    if version != VERSION:
        raise BadMessage(f"unsupported version {version}")
    if flags & ~_KNOWN_FLAGS or pad:
        raise BadMessage("unknown flags")
    if role not in _ROLE_BY_CODE or disk not in _DISK_BY_CODE:
        raise BadMessage("unknown role or disk state")
    status = NodeStatus(nid, sh, term, _ROLE_BY_CODE[role], _DISK_BY_CODE[disk], gen, lsn)
    return Message(link, inc, seq, _with_flags(status, Flags(flags)))


def _with_flags(s: NodeStatus, f: Flags) -> NodeStatus:
    return NodeStatus(
        s.node_id, s.settings_hash, s.term, s.role, s.disk, s.generation, s.last_lsn, f
    )


class LinkState(enum.Enum):
    INIT = "init"
    UP = "up"
    LATE = "late"
    DEAD = "dead"


class PeerState(enum.Enum):
    UNKNOWN = "unknown"
    ALIVE = "alive"
    DEAD = "dead"


@dataclass
class _Link:
    name: str
    last_heard: float | None = None
    high: int = -1  # highest seq accepted in the current incarnation
    window: int = 0  # bit i set: seq high - i accepted
    state: LinkState = LinkState.INIT


@dataclass(frozen=True)
class LinkChange:
    """A link changed state (for the log and the cluster status)."""

    link: int
    name: str
    old: LinkState
    new: LinkState


@dataclass
class Heartbeat:
    """Both directions of the heartbeat protocol for one node and its one peer.

    ``links`` names the links in index order (the adapter sends message ``i`` on link ``i``).
    ``started`` is the monotonic time of this node's start (initdead counts from it).
    """

    node_id: bytes
    peer_id: bytes
    pair_secret: bytes
    settings_hash: bytes
    links: Sequence[str]
    timing: Timing
    started: float
    incarnation: int
    _key: bytes = field(init=False, repr=False)
    _links: list[_Link] = field(init=False, repr=False)
    _seq: int = field(init=False, default=0)
    _next_send: float = field(init=False)
    _peer_inc: int = field(init=False, default=-1)
    _peer_round: tuple[int, int] = field(init=False, default=(-1, -1))
    peer_status: NodeStatus | None = field(init=False, default=None)
    #: True once any heartbeat of the peer was accepted since this node started.
    peer_seen: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if len(self.links) < 1 or len(self.links) > 255:
            raise ValueError("between 1 and 255 links")
        if self.node_id == self.peer_id:
            raise ValueError("peer id equals my node id")
        self._key = heartbeat_key(self.pair_secret)
        self._links = [_Link(n) for n in self.links]
        self._next_send = self.started

    # --- sending ----------------------------------------------------------------------------

    def send_due(self, now: float) -> bool:
        return now >= self._next_send

    def build(self, status: NodeStatus, now: float) -> list[bytes]:
        """One round: message ``i`` goes out on link ``i``. Schedules the next round."""
        if status.node_id != self.node_id or status.settings_hash != self.settings_hash:
            raise ValueError("status must carry this node's id and settings hash")
        seq = self._seq
        self._seq += 1
        self._next_send = max(self._next_send + self.timing.keepalive, now)
        if self._next_send <= now:
            self._next_send = now + self.timing.keepalive
        return [encode(self._key, i, self.incarnation, seq, status) for i in range(len(self.links))]

    # --- receiving --------------------------------------------------------------------------

    def receive(self, link: int, data: bytes, now: float) -> NodeStatus:
        """Accept one heartbeat that arrived on ``link``; returns the peer's newest status.

        Raises a :class:`HeartbeatError` subclass (and changes nothing) if refused.
        """
        msg = decode(self._key, data)
        s = msg.status
        if not 0 <= link < len(self._links) or msg.link != link:
            raise WrongLink(f"message for link {msg.link} arrived on link {link}")
        if s.node_id == self.node_id:
            raise Reflected("message carries my own node id")
        if s.node_id != self.peer_id:
            raise WrongPeer("unexpected node id")
        if s.settings_hash != self.settings_hash:
            raise SettingsMismatch("the peer's cluster settings hash differs from mine")
        if msg.incarnation < self._peer_inc:
            raise StaleIncarnation("older incarnation of the peer")
        lk = self._links[link]
        if msg.incarnation == self._peer_inc:
            if msg.seq <= lk.high:
                back = lk.high - msg.seq
                if back >= WINDOW or lk.window >> back & 1:
                    raise Replayed(f"seq {msg.seq} already seen or too old on link {link}")
        else:  # a new incarnation of the peer: every link's window starts afresh
            self._peer_inc = msg.incarnation
            for other in self._links:
                other.high, other.window = -1, 0
        if msg.seq > lk.high:
            shift = msg.seq - lk.high
            lk.window = ((lk.window << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            lk.high = msg.seq
        else:
            lk.window |= 1 << (lk.high - msg.seq)
        lk.last_heard = now if lk.last_heard is None else max(lk.last_heard, now)
        self.peer_seen = True
        round_ = (msg.incarnation, msg.seq)
        if round_ > self._peer_round:
            self._peer_round = round_
            self.peer_status = s
        assert self.peer_status is not None
        return self.peer_status

    # --- liveness ---------------------------------------------------------------------------

    def _state(self, lk: _Link, now: float) -> LinkState:
        t = self.timing
        if lk.last_heard is None:
            return LinkState.INIT if now - self.started < t.initdead else LinkState.DEAD
        age = now - lk.last_heard
        if age < t.warntime:
            return LinkState.UP
        return LinkState.LATE if age < t.deadtime else LinkState.DEAD

    def link_states(self, now: float) -> tuple[LinkState, ...]:
        return tuple(self._state(lk, now) for lk in self._links)

    def peer_state(self, now: float) -> PeerState:
        states = self.link_states(now)
        if any(s in (LinkState.UP, LinkState.LATE) for s in states):
            return PeerState.ALIVE
        if all(s is LinkState.DEAD for s in states):
            return PeerState.DEAD
        return PeerState.UNKNOWN

    def last_heard(self) -> float | None:
        heard = [lk.last_heard for lk in self._links if lk.last_heard is not None]
        return max(heard) if heard else None

    def poll(self, now: float) -> list[LinkChange]:
        """Link state changes since the last poll (the adapter logs them)."""
        out: list[LinkChange] = []
        for i, lk in enumerate(self._links):
            new = self._state(lk, now)
            if new is not lk.state:
                out.append(LinkChange(i, lk.name, lk.state, new))
                lk.state = new
        return out

    def next_deadline(self, now: float) -> float:
        """The earliest time at which a round is due or a link may change state."""
        t = self.timing
        cands = [self._next_send]
        for lk in self._links:
            if lk.last_heard is None:
                cands.append(self.started + t.initdead)
            else:
                cands.extend(x for x in (lk.last_heard + t.warntime, lk.last_heard + t.deadtime))
        future = [c for c in cands if c > now]
        return min(future) if future else now + t.keepalive
