"""One replication link as a sans-IO state machine: bytes in, events out.

Theory of operation
-------------------
The adapter (server/repl.py) owns the socket, the clock and the store; it feeds received bytes
to :meth:`ReplSession.receive_data`, drains :meth:`ReplSession.next_event` and acts on each
event (send bytes, ingest frames, release the barrier, cut a tail, ...), calls
:meth:`ReplSession.tick` at :meth:`ReplSession.next_deadline`, and reports its own progress with
the local inputs (:meth:`frames_appended`, :meth:`send_frames`, :meth:`frames_durable`,
:meth:`tail_cut`, :meth:`merge_done`, :meth:`provide_digest`, :meth:`start_verify`, :meth:`close`).

Phases of a link (every allowed transition is a row of ``TRANSITIONS``)::

    HELLO ─HELLO→ AUTH ─AUTH→ STATE ─STATE→ decision
      decision ─┬→ SYNC_SOURCE ─(caught up)→ ESTABLISHED
                ├→ SYNC_TARGET ─SYNC_DONE, durable→ ESTABLISHED
                ├→ CUT ─tail_cut→ SYNC_TARGET | ESTABLISHED
                ├→ BRANCH_SEND ─branch sent→ MERGE_WAIT ─MERGE_DONE→ CUT
                ├→ BRANCH_RECV ─BRANCH_END→ MERGING ─merge_done()→ SYNC_SOURCE
                ├→ SNAPSHOT_TARGET ─SNAPSHOT_END, snapshot_installed→ SYNC_TARGET
                └→ CLOSED (disconnect)
      SYNC_SOURCE ─SNAPSHOT_REQUEST→ SNAPSHOT_SOURCE ─all sent→ SYNC_SOURCE
    ESTABLISHED ─peer became primary→ SYNC_TARGET; ─RESYNC_REQUEST→ SYNC_SOURCE
    any phase ─error, REFUSE, EOF, timeout, close()→ CLOSED

Handshake: both sides send HELLO at :meth:`start`; on the peer's HELLO each checks the version
range, the settings hash and the node ids, then sends AUTH (see :mod:`.wire`). On a valid AUTH
both directions switch to per-message MACs under the session keys and each side sends STATE (its
:class:`NodeView`). With both views, each side runs the same pure :func:`.generations.decide`
(mirror images by construction) and emits :class:`Decision`.

Streaming: the node that receives the log (the sync target, or the secondary when in sync)
sends RESYNC_REQUEST from its next LSN — resuming an interrupted resync is just that. The source
answers from its log through :class:`NeedFrames` (window-, rate- and chunk-limited) and the
adapter's :meth:`send_frames`; frames the primary appends meanwhile are kept in a bounded ring
(:meth:`frames_appended`) and, once the log read reaches them, the source sends them as the
resync's last frames, then SYNC_DONE after them (the target becomes UpToDate only once it holds
every frame appended before the primary's barrier began waiting for it), and goes live: every
appended frame is sent as it is appended (pipelined, before the local fsync).
The receiver emits :class:`IngestFrames`; it acks on receipt (protocol B) and on durability
(:meth:`frames_durable`; all protocols, C's barrier waits for it). The sender emits
:class:`Acked` with the LSN the barrier may release (B: received, C: durable).

Full sync: when the decision says the source no longer holds ``d + 1``
(``rule:behind-retention-horizon``), or the receiver was invalidated (``SessionConfig.full_sync``),
the receiver becomes Inconsistent, emits :class:`SnapshotBegin` and sends SNAPSHOT_REQUEST
instead of RESYNC_REQUEST. The source emits :class:`NeedSnapshot` (the adapter takes
``store.export_snapshot()`` and calls :meth:`snapshot_ready`), then reads the files through
:class:`NeedSnapshotData` / :meth:`send_snapshot_data` and sends SNAPSHOT_DATA (file name,
offset, bytes) under the same window (``resync_window_bytes`` unacknowledged), chunk and rate
limits as a resync; the target emits :class:`SnapshotChunk` per message and acks what the
adapter wrote (:meth:`snapshot_written` → SNAPSHOT_ACK). SNAPSHOT_END carries the snapshot's
LSN, file count, size and a digest of everything sent (:class:`.wire.SnapshotDigest`); the
target checks them (else REFUSE(SNAPSHOT)), emits :class:`SnapshotInstall`, and after
:meth:`snapshot_installed` catches up with an ordinary RESYNC_REQUEST from the snapshot's
LSN + 1. It stays Inconsistent until that catch-up is done. With wire version 2 the source
first sends SNAPSHOT_BEGIN (the snapshot's id and where the data starts), and a target that
durably holds part of a snapshot (``SessionConfig.snapshot_resume``) sends SNAPSHOT_RESUME
instead of SNAPSHOT_REQUEST: if the source still has that snapshot (``NeedSnapshot.resume_id``
answered with the same id) the transfer continues at that point, else it starts over. On a
version 1 link an interrupted transfer is redone from the start.

Disk errors: :meth:`disk_failed` (DRBD's ``on-io-error=detach``) makes this node Diskless, sends
the peer a STATE update saying so, then drops the link with REFUSE(INGEST); the peer reports
:class:`PeerDiskChanged` (Diskless) and ``LinkLost("peer-diskless")``.

Invariants:

* **No exception escapes for peer input.** Whatever bytes arrive, ``receive_data`` and
  ``next_event`` produce events; a bad message becomes :class:`ProtocolViolation`, a REFUSE to
  the peer (fixed text) and :class:`LinkLost`. Only adapter misuse raises
  :class:`SessionUsageError`.
* **The layer never changes a role.** It reports (Decision, LinkLost, PeerInSync, DiskChanged);
  the role controller acts.
* Frames are sent and accepted in strict LSN order without gaps; live frames are accepted only
  from a peer that said it is primary, with a term not older than ours; no frame carries a
  generation newer than its message's term.
* Bounded: decoder input (``max_message_size``), the live ring (``live_buffer_bytes``), resync
  data in flight (``resync_window_bytes``), one digest request outstanding.
* Never waits forever: no handshake within ``handshake_timeout``, no ack progress within
  ``ack_timeout`` while frames are unconfirmed, or silence for ``ping_interval +
  ping_timeout`` → :class:`LinkLost`. Time comes only from the injected clock.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import itertools
import secrets
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import wire
from .generations import NODE_ID_LEN, Action, Branch, NodeView, Outcome, decide
from .state import DiskState, Protocol, Role, SplitBrainPolicy
from .wire import FramesPurpose, MsgType, RefuseReason

Clock = Callable[[], float]


# --- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SnapshotProgress:
    """What a sync target durably holds of snapshot ``snapshot_id``: its first files, in
    order, with their sizes (the last one may be partial)."""

    snapshot_id: bytes
    files: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Per-link settings. Defaults are documented here and in docs/replication.md.

    ``secret`` is the pair's shared HMAC key; ``settings_hash`` the 32-byte hash of the cluster
    settings (a pair that disagrees refuses to connect); ``expected_peer`` the peer's node id if
    known. Timeouts are seconds on the injected clock. ``resync_rate`` is bytes per second for
    resync data (None: no limit).
    """

    node_id: bytes
    secret: bytes
    settings_hash: bytes
    protocol: Protocol = Protocol.C
    split_brain: SplitBrainPolicy = SplitBrainPolicy.MERGE
    expected_peer: bytes | None = None
    term: int = 0
    min_version: int = wire.MIN_VERSION
    max_version: int = wire.MAX_VERSION
    max_message_size: int = wire.DEFAULT_MAX_MESSAGE_SIZE
    handshake_timeout: float = 10.0
    ack_timeout: float = 6.0
    ping_interval: float = 2.0
    ping_timeout: float = 4.0
    resync_chunk_bytes: int = 1 * 1024 * 1024
    resync_window_bytes: int = 16 * 1024 * 1024
    resync_rate: int | None = None
    resync_poll: float = 0.05
    live_buffer_bytes: int = 32 * 1024 * 1024
    #: This node wants a full sync whenever it receives the log (``repl invalidate``).
    full_sync: bool = False
    #: A full sync this node received in part, durably (version 2: SNAPSHOT_RESUME asks the
    #: source to continue it).
    snapshot_resume: SnapshotProgress | None = None


class SessionUsageError(Exception):
    """The adapter called the session wrongly (a bug in the caller, not the peer's fault)."""


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendBytes:
    data: bytes | bytearray


@dataclass(frozen=True, slots=True)
class HandshakeDone:
    peer_id: bytes
    version: int


@dataclass(frozen=True, slots=True)
class PeerStateReceived:
    view: NodeView
    protocol: Protocol


@dataclass(frozen=True, slots=True)
class Decision:
    """The reconnect decision (log ``outcome.rule``)."""

    outcome: Outcome


@dataclass(frozen=True, slots=True)
class CutTail:
    """Cut the local log after ``after_lsn`` into quarantine, then call ``tail_cut``."""

    after_lsn: int


@dataclass(frozen=True, slots=True)
class NeedFrames:
    """Read committed frames from ``from_lsn`` (up to about ``max_bytes``, at least one frame
    if any) and pass them to ``send_frames`` — an empty answer means "none yet"."""

    from_lsn: int
    max_bytes: int
    purpose: FramesPurpose


@dataclass(frozen=True, slots=True)
class IngestFrames:
    """Append these frames (consecutive from ``first_lsn``), fsync, then ``frames_durable``."""

    first_lsn: int
    frames: tuple[bytes, ...]
    purpose: FramesPurpose


@dataclass(frozen=True, slots=True)
class BranchFrames:
    """Split brain, merge: frames of the peer's divergent branch, to replay as new operations
    (they are *not* appended to the local log)."""

    first_lsn: int
    frames: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class BranchComplete:
    """The peer's whole branch is here: merge it, and once every merge transaction is durable
    call ``merge_done(last_lsn)`` (the peer cuts its branch only then)."""

    last_lsn: int


@dataclass(frozen=True, slots=True)
class Acked:
    """The peer's progress. ``lsn``: what the barrier may release up to (per protocol)."""

    lsn: int
    received_lsn: int
    durable_lsn: int


@dataclass(frozen=True, slots=True)
class PeerInSync:
    """The peer now receives every frame as it is appended, from ``first_live_lsn`` on: a
    primary running B or C calls ``BarrierCore.require_peer`` and records ``mirrored_from``."""

    first_live_lsn: int


@dataclass(frozen=True, slots=True)
class DiskChanged:
    """This node's disk state changes (Inconsistent while sync target; UpToDate when done)."""

    disk: DiskState


@dataclass(frozen=True, slots=True)
class PeerDiskChanged:
    disk: DiskState


@dataclass(frozen=True, slots=True)
class NeedDigest:
    """Compute the digest of the logical records in [first_lsn, last_lsn] and pass it to
    ``provide_digest`` (b"" if the range is not all in the local log)."""

    first_lsn: int
    last_lsn: int


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """One range compared; ``match`` None: a side did not hold the whole range."""

    first_lsn: int
    last_lsn: int
    match: bool | None


@dataclass(frozen=True, slots=True)
class VerifyDone:
    ranges: int
    mismatches: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class SnapshotBegin:
    """Full sync, target: start receiving a snapshot — ``store.begin_snapshot_install`` when
    ``resume`` is empty, else keep exactly the files ``resume`` lists, cut to their sizes
    (``store.resume_snapshot_install``): the source continues after them. ``snapshot_id``
    (version 2; empty on a version 1 link) names the snapshot for a later resume."""

    last_lsn: int
    snapshot_id: bytes = b""
    resume: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class SnapshotChunk:
    """Full sync, target: write ``data`` at ``offset`` of file ``name``, then
    ``snapshot_written(total)`` (``total``: the snapshot bytes received with this one)."""

    name: str
    offset: int
    data: bytes
    total: int


@dataclass(frozen=True, slots=True)
class SnapshotInstall:
    """Full sync, target: every byte arrived and verified: ``store.install_snapshot()``, then
    ``snapshot_installed(lsn)``."""

    lsn: int


@dataclass(frozen=True, slots=True)
class NeedSnapshot:
    """Full sync, source: take a snapshot (``store.export_snapshot()``) and pass its LSN,
    files and an id to ``snapshot_ready`` — or, when ``resume_id`` names a snapshot still
    kept from an interrupted transfer, that one with its id (the transfer then resumes)."""

    resume_id: bytes = b""


@dataclass(frozen=True, slots=True)
class NeedSnapshotData:
    """Full sync, source: read exactly ``size`` bytes at ``offset`` of file ``index``
    (``name``) and pass them to ``send_snapshot_data``."""

    index: int
    name: str
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class SnapshotSent:
    """Full sync, source: SNAPSHOT_END went out; the export may be closed."""

    lsn: int


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    reason: RefuseReason
    detail: str


@dataclass(frozen=True, slots=True)
class PeerRefused:
    reason: RefuseReason
    detail: str


@dataclass(frozen=True, slots=True)
class LinkLost:
    """The link is over; the adapter closes the socket and reports to the cluster layer."""

    reason: str


Event = (
    SendBytes
    | HandshakeDone
    | PeerStateReceived
    | Decision
    | CutTail
    | NeedFrames
    | IngestFrames
    | BranchFrames
    | BranchComplete
    | Acked
    | PeerInSync
    | DiskChanged
    | PeerDiskChanged
    | NeedDigest
    | VerifyResult
    | VerifyDone
    | SnapshotBegin
    | SnapshotChunk
    | SnapshotInstall
    | NeedSnapshot
    | NeedSnapshotData
    | SnapshotSent
    | ProtocolViolation
    | PeerRefused
    | LinkLost
)


# --- the transition table ---------------------------------------------------------------------


class Phase(enum.Enum):
    INIT = "init"
    HELLO = "hello"
    AUTH = "auth"
    STATE = "state"
    CUT = "cut"
    BRANCH_SEND = "branch-send"
    BRANCH_RECV = "branch-recv"
    MERGE_WAIT = "merge-wait"  # loser: branch sent, waiting for the winner's MERGE_DONE
    MERGING = "merging"  # winner: branch received, the adapter merges it
    SYNC_SOURCE = "sync-source"
    SYNC_TARGET = "sync-target"
    SNAPSHOT_SOURCE = "snapshot-source"
    SNAPSHOT_TARGET = "snapshot-target"
    ESTABLISHED = "established"
    CLOSED = "closed"


class Local(enum.Enum):
    """The adapter's inputs (rows of the table next to the peer's messages)."""

    START = "start"
    TAIL_CUT = "tail-cut"
    SEND_FRAMES = "send-frames"  # answer to NeedFrames
    FRAMES_DURABLE = "frames-durable"
    BRANCH_SENT = "branch-sent"  # internal: the whole branch went out
    MERGE_DONE = "merge-done"  # answer to BranchComplete: the merge is durable
    CAUGHT_UP = "caught-up"  # internal: the log read reached the live stream
    SNAPSHOT_READY = "snapshot-ready"  # answer to NeedSnapshot
    SEND_SNAPSHOT = "send-snapshot"  # answer to NeedSnapshotData
    SNAPSHOT_SENT = "snapshot-sent"  # internal: every file went out
    SNAPSHOT_WRITTEN = "snapshot-written"  # answer to SnapshotChunk
    SNAPSHOT_INSTALLED = "snapshot-installed"  # answer to SnapshotInstall


Input = MsgType | Local

_P = Phase
_AFTER_DECISION = frozenset(
    {
        _P.CUT,
        _P.BRANCH_SEND,
        _P.BRANCH_RECV,
        _P.SYNC_SOURCE,
        _P.SYNC_TARGET,
        _P.SNAPSHOT_TARGET,
        _P.ESTABLISHED,
    }
)
_STREAMING = (_P.SYNC_SOURCE, _P.SYNC_TARGET, _P.ESTABLISHED)

#: (phase, input) → (handler method, the phases it may lead to). PING, PONG and REFUSE are
#: accepted in every phase after AUTH (and REFUSE before); any other pair is a protocol
#: violation (peer input) or a SessionUsageError (local input).
TRANSITIONS: dict[tuple[Phase, Input], tuple[str, frozenset[Phase]]] = {
    (_P.INIT, Local.START): ("_on_start", frozenset({_P.HELLO})),
    (_P.HELLO, MsgType.HELLO): ("_on_hello", frozenset({_P.AUTH})),
    (_P.AUTH, MsgType.AUTH): ("_on_auth", frozenset({_P.STATE})),
    (_P.STATE, MsgType.STATE): ("_on_state", _AFTER_DECISION | {_P.CLOSED}),
    (_P.CUT, Local.TAIL_CUT): (
        "_on_tail_cut",
        frozenset({_P.SYNC_TARGET, _P.SNAPSHOT_TARGET, _P.ESTABLISHED}),
    ),
    (_P.BRANCH_SEND, Local.SEND_FRAMES): ("_on_send_branch", frozenset({_P.BRANCH_SEND})),
    (_P.BRANCH_SEND, Local.BRANCH_SENT): ("_on_branch_sent", frozenset({_P.MERGE_WAIT})),
    (_P.MERGE_WAIT, MsgType.MERGE_DONE): ("_on_peer_merge_done", frozenset({_P.CUT})),
    (_P.BRANCH_RECV, MsgType.FRAMES): ("_on_branch_frames", frozenset({_P.BRANCH_RECV})),
    (_P.BRANCH_RECV, MsgType.BRANCH_END): ("_on_branch_end", frozenset({_P.MERGING})),
    (_P.MERGING, Local.MERGE_DONE): ("_on_merge_done", frozenset({_P.SYNC_SOURCE})),
    (_P.SYNC_SOURCE, MsgType.RESYNC_REQUEST): ("_on_resync_request", frozenset({_P.SYNC_SOURCE})),
    (_P.SYNC_SOURCE, Local.SEND_FRAMES): ("_on_send_resync", frozenset({_P.SYNC_SOURCE})),
    (_P.SYNC_SOURCE, MsgType.ACK): ("_on_ack", frozenset({_P.SYNC_SOURCE})),
    (_P.SYNC_SOURCE, Local.CAUGHT_UP): ("_on_caught_up", frozenset({_P.ESTABLISHED})),
    (_P.SYNC_TARGET, MsgType.FRAMES): ("_on_frames", frozenset({_P.SYNC_TARGET})),
    (_P.SYNC_TARGET, MsgType.SYNC_DONE): (
        "_on_sync_done",
        frozenset({_P.SYNC_TARGET, _P.ESTABLISHED}),
    ),
    (_P.SYNC_TARGET, Local.FRAMES_DURABLE): (
        "_on_frames_durable",
        frozenset({_P.SYNC_TARGET, _P.ESTABLISHED}),
    ),
    (_P.ESTABLISHED, MsgType.FRAMES): ("_on_frames", frozenset({_P.ESTABLISHED})),
    (_P.ESTABLISHED, MsgType.ACK): ("_on_ack", frozenset({_P.ESTABLISHED})),
    (_P.ESTABLISHED, Local.FRAMES_DURABLE): ("_on_frames_durable", frozenset({_P.ESTABLISHED})),
    (_P.ESTABLISHED, MsgType.STATE): (
        "_on_state_update",
        frozenset({_P.ESTABLISHED, _P.SYNC_TARGET}),
    ),
    (_P.ESTABLISHED, MsgType.RESYNC_REQUEST): ("_on_resync_request", frozenset({_P.SYNC_SOURCE})),
    (_P.ESTABLISHED, MsgType.VERIFY_REQUEST): ("_on_verify_request", frozenset({_P.ESTABLISHED})),
    (_P.ESTABLISHED, MsgType.VERIFY_DIGEST): ("_on_verify_digest", frozenset({_P.ESTABLISHED})),
    # full sync
    (_P.SYNC_SOURCE, MsgType.SNAPSHOT_REQUEST): (
        "_on_snapshot_request",
        frozenset({_P.SNAPSHOT_SOURCE}),
    ),
    (_P.SYNC_SOURCE, MsgType.SNAPSHOT_RESUME): (
        "_on_snapshot_request",
        frozenset({_P.SNAPSHOT_SOURCE}),
    ),
    (_P.SNAPSHOT_TARGET, MsgType.SNAPSHOT_BEGIN): (
        "_on_snapshot_begin",
        frozenset({_P.SNAPSHOT_TARGET}),
    ),
    (_P.SNAPSHOT_SOURCE, Local.SNAPSHOT_READY): (
        "_on_snapshot_ready",
        frozenset({_P.SNAPSHOT_SOURCE}),
    ),
    (_P.SNAPSHOT_SOURCE, Local.SEND_SNAPSHOT): (
        "_on_send_snapshot",
        frozenset({_P.SNAPSHOT_SOURCE}),
    ),
    (_P.SNAPSHOT_SOURCE, MsgType.SNAPSHOT_ACK): (
        "_on_snapshot_ack",
        frozenset({_P.SNAPSHOT_SOURCE}),
    ),
    (_P.SNAPSHOT_SOURCE, Local.SNAPSHOT_SENT): ("_on_snapshot_sent", frozenset({_P.SYNC_SOURCE})),
    (_P.SYNC_SOURCE, MsgType.SNAPSHOT_ACK): ("_on_snapshot_ack", frozenset({_P.SYNC_SOURCE})),
    (_P.SNAPSHOT_TARGET, MsgType.SNAPSHOT_DATA): (
        "_on_snapshot_data",
        frozenset({_P.SNAPSHOT_TARGET}),
    ),
    (_P.SNAPSHOT_TARGET, MsgType.SNAPSHOT_END): (
        "_on_snapshot_end",
        frozenset({_P.SNAPSHOT_TARGET}),
    ),
    (_P.SNAPSHOT_TARGET, Local.SNAPSHOT_WRITTEN): (
        "_on_snapshot_written",
        frozenset({_P.SNAPSHOT_TARGET}),
    ),
    # a disk error detached the peer (its STATE update says Diskless), while we send it the log
    (_P.SYNC_SOURCE, MsgType.STATE): ("_on_peer_detached", frozenset({_P.SYNC_SOURCE})),
    (_P.SNAPSHOT_SOURCE, MsgType.STATE): ("_on_peer_detached", frozenset({_P.SNAPSHOT_SOURCE})),
    (_P.SNAPSHOT_TARGET, Local.SNAPSHOT_INSTALLED): (
        "_on_snapshot_installed",
        frozenset({_P.SYNC_TARGET}),
    ),
}
#: Rate-limit tokens (bytes) below zero that still count as zero (float rounding of the clock).
_TOKEN_SLACK = 1e-3
#: Messages every keyed phase accepts (handled without a phase change).
_ANY_PHASE = {MsgType.PING: "_on_ping", MsgType.PONG: "_on_pong"}


# --- the session ------------------------------------------------------------------------------


class ReplSession:
    """The sans-IO engine of one replication link (see the module docstring)."""

    def __init__(
        self,
        config: SessionConfig,
        local: NodeView,
        clock: Clock,
        *,
        nonce: bytes | None = None,
    ) -> None:
        if len(config.node_id) != NODE_ID_LEN or local.node_id != config.node_id:
            raise SessionUsageError("the local view must carry the configured 16-byte node id")
        if len(config.settings_hash) != wire.HASH_SIZE:
            raise SessionUsageError("settings_hash must be 32 bytes")
        self.config = config
        self.local = local
        self._clock = clock
        self._nonce = nonce if nonce is not None else secrets.token_bytes(wire.NONCE_SIZE)
        self._enc = wire.MessageEncoder()
        self._dec = wire.MessageDecoder(config.max_message_size)
        self._events: deque[Event] = deque()
        self.phase = Phase.INIT
        # Generations are terms: never send a term below the newest generation we hold.
        self.term = max([config.term, *(g.number for g in local.history)])
        self.close_reason = ""
        # handshake
        self._my_hello: wire.Hello | None = None
        self._peer_hello: wire.Hello | None = None
        self.version = 0
        self.peer_id: bytes | None = None
        self.peer: NodeView | None = None
        self.peer_protocol: Protocol | None = None
        self._sent_view: NodeView | None = None
        self.outcome: Outcome | None = None
        # timers
        now = clock()
        self._started = now
        self._last_heard = now
        self._last_sent = now
        self._ping_token = 0
        self._ping_outstanding: tuple[int, float] | None = None
        # sending side (source / primary)
        self._appended_last = local.last_lsn
        self._ring: deque[tuple[int, bytes]] = deque()
        self._ring_bytes = 0
        self._cursor: int | None = None  # next LSN to read from the log for the peer
        self._cursor_end: int | None = None  # RESYNC_REQUEST's to_lsn
        self._need_out = False
        self._poll_at: float | None = None
        self._inflight: deque[tuple[int, int]] = deque()  # (last lsn, bytes) sent, unreceived
        self._inflight_bytes = 0
        self._tokens = float(config.resync_chunk_bytes)
        self._tokens_at = now
        self.sent_lsn = 0  # last LSN sent to the peer (any purpose but BRANCH)
        self.peer_received = 0
        self.peer_durable = 0
        self._ack_wait_since: float | None = None
        self._sync_done_lsn: int | None = None  # source: SYNC_DONE sent at this LSN
        self.peer_disk: DiskState | None = None
        # branch (merge loser)
        self._branch_cursor = 0
        self._branch_last = 0
        self._branch_hash = hashlib.sha256()  # of the branch's frames, sent or received
        # receiving side (target / secondary)
        self._recv_next = local.last_lsn + 1
        self.received_lsn = local.last_lsn
        self.durable_lsn = local.last_lsn
        self._sync_done_at: int | None = None  # target: SYNC_DONE received for this LSN
        self.disk = local.disk
        # verify
        self._verify_ranges: deque[tuple[int, int]] = deque()
        self._verify_cur: tuple[int, int] | None = None
        self._verify_local: bytes | None = None
        self._verify_peer: bytes | None = None
        self._verify_count = 0
        self._verify_bad: list[tuple[int, int]] = []
        self._digests_wanted: set[tuple[int, int]] = set()
        self._peer_digest_wanted: set[tuple[int, int]] = set()
        self.stats_resync_bytes = 0
        # full sync (source): the export's LSN and files, the read position, bytes sent/acked
        self._snap_lsn: int | None = None  # source: the snapshot sent (resync from lsn + 1)
        self._snap_files: tuple[tuple[str, int], ...] | None = None
        self._snap_i = 0
        self._snap_off = 0
        self._snap_sent = 0
        self._snap_acked = 0
        self._snap_digest = wire.SnapshotDigest()
        # full sync (target): what was received and written
        self._snap_recv: dict[str, int] = {}
        self._snap_cur = ""
        self._snap_total = 0
        self._snap_written = 0
        self._snap_end: int | None = None
        self._snap_install_asked = False
        self._snap_begun = False  # target, version 2: SNAPSHOT_BEGIN arrived
        self._snap_want: tuple[bytes, int, int] | None = None  # source: the target's resume
        self.snapshot_id = b""
        self.snapshot_resumed_at = 0  # source: snapshot bytes the target already held
        self.stats_snapshot_bytes = 0

    # -- public API: bytes and events ----------------------------------------------------------

    def start(self) -> None:
        """The connection is up: send HELLO."""
        self._local(Local.START, None)

    def receive_data(self, data: bytes | bytearray) -> None:
        """Bytes from the peer. Never raises for any input."""
        if self.phase is Phase.CLOSED:
            return
        self._last_heard = self._clock()
        self._dec.receive_data(data)
        self._drain()

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where to receive the peer's next bytes without copying them (at least ``sizehint``
        bytes of room); then :meth:`buffer_updated`. asyncio's BufferedProtocol."""
        return self._dec.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` of the peer's bytes were received into :meth:`get_buffer`'s view. Never
        raises for any input."""
        if self.phase is Phase.CLOSED:
            return
        self._last_heard = self._clock()
        self._dec.buffer_updated(nbytes)
        self._drain()

    def receive_eof(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        self._dec.receive_eof()
        self._drain()
        self._close("eof", refuse=None)  # a no-op if the drain already closed

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def events(self) -> list[Event]:
        """Drain every pending event."""
        out = list(self._events)
        self._events.clear()
        return out

    # -- public API: the adapter's inputs ------------------------------------------------------

    def frames_appended(self, frames: Sequence[bytes]) -> None:
        """The local primary appended ``frames`` (from the store's frame listener)."""
        if self.phase is Phase.CLOSED:
            return
        if self.local.role is not Role.PRIMARY:
            raise SessionUsageError("only a primary appends frames")
        infos = self._peek_local(frames)
        if infos and infos[0].lsn != self._appended_last + 1:
            raise SessionUsageError("appended frames must follow the last appended LSN")
        if infos:
            self._appended_last = infos[-1].lsn
        if self.phase is Phase.ESTABLISHED and self._sync_done_lsn is not None:
            if frames:
                self._send_data(infos[0].lsn, FramesPurpose.LIVE, tuple(frames))
            return
        for info, raw in zip(infos, frames, strict=True):
            self._ring.append((info.lsn, raw))
            self._ring_bytes += len(raw)
        while self._ring and self._ring_bytes > self.config.live_buffer_bytes:
            _, old = self._ring.popleft()
            self._ring_bytes -= len(old)
        self._pump()

    def send_frames(self, frames: Sequence[bytes]) -> None:
        """Answer to :class:`NeedFrames` (frames from the local log, consecutive LSNs)."""
        self._local(Local.SEND_FRAMES, tuple(frames))

    def frames_durable(self, lsn: int) -> None:
        """Frames up to ``lsn`` (from :class:`IngestFrames`) are appended and fsynced."""
        self._local(Local.FRAMES_DURABLE, lsn)

    def merge_done(self, last_lsn: int) -> None:
        """Answer to :class:`BranchComplete`: the branch up to ``last_lsn`` is merged and every
        merge transaction is durable (MERGE_DONE tells the peer it may cut its branch)."""
        self._local(Local.MERGE_DONE, last_lsn)

    def tail_cut(self, after_lsn: int) -> None:
        """The tail after ``after_lsn`` is cut and quarantined (answer to :class:`CutTail`)."""
        self._local(Local.TAIL_CUT, after_lsn)

    def snapshot_ready(
        self, lsn: int, files: Sequence[tuple[str, int]], snapshot_id: bytes = b""
    ) -> None:
        """Answer to :class:`NeedSnapshot`: the export's LSN, (name, size) of its files and
        its 16-byte id (version 2; empty: a fresh random one)."""
        self._local(Local.SNAPSHOT_READY, (lsn, tuple(files), snapshot_id))

    def send_snapshot_data(self, data: bytes) -> None:
        """Answer to :class:`NeedSnapshotData` (exactly the bytes asked for)."""
        self._local(Local.SEND_SNAPSHOT, bytes(data))

    def snapshot_written(self, total: int) -> None:
        """The snapshot bytes up to ``total`` (from :class:`SnapshotChunk`) are written."""
        self._local(Local.SNAPSHOT_WRITTEN, total)

    def snapshot_installed(self, lsn: int) -> None:
        """The snapshot is installed (answer to :class:`SnapshotInstall`): catch up from
        ``lsn + 1``."""
        self._local(Local.SNAPSHOT_INSTALLED, lsn)

    def disk_failed(self) -> None:
        """This node's disk failed (ENOSPC, EIO: DRBD's ``on-io-error=detach``): it is Diskless
        from now on. The peer is told with a STATE update (disk Diskless) before the link is
        dropped with REFUSE(INGEST), so it knows this node holds no usable copy."""
        if self.disk is not DiskState.DISKLESS:
            self.disk = DiskState.DISKLESS
            self._events.append(DiskChanged(DiskState.DISKLESS))
        v = self.local
        self.local = NodeView(
            v.node_id,
            v.role,
            DiskState.DISKLESS,
            v.history,
            v.last_lsn,
            v.first_retained_lsn,
            v.discard_my_data,
        )
        if self.phase in _AFTER_DECISION or self.phase is Phase.SNAPSHOT_SOURCE:
            self._send(wire.State(self.local, self.config.protocol, update=True))
        self._close("disk-failed", refuse=RefuseReason.INGEST)

    def ingest_failed(self) -> None:
        """The store refused or failed to ingest frames: drop the link."""
        self._close("ingest-failed", refuse=RefuseReason.INGEST)

    def provide_digest(self, first_lsn: int, last_lsn: int, digest: bytes) -> None:
        """Answer to :class:`NeedDigest`."""
        if self.phase is Phase.CLOSED:
            return
        key = (first_lsn, last_lsn)
        if key in self._peer_digest_wanted:
            self._peer_digest_wanted.discard(key)
            self._send(wire.VerifyDigest(first_lsn, last_lsn, digest))
        if key in self._digests_wanted:
            self._digests_wanted.discard(key)
            if self._verify_cur == key:
                self._verify_local = digest
                self._verify_step()

    def start_verify(self, first_lsn: int, last_lsn: int, step: int = 10_000) -> None:
        """Online verify: compare digests of [first_lsn, last_lsn] in ranges of ``step``."""
        if self.phase is not Phase.ESTABLISHED:
            raise SessionUsageError("verify needs an established link")
        if self._verify_cur is not None or self._verify_ranges:
            raise SessionUsageError("a verify is already running")
        if step < 1 or first_lsn < 1 or last_lsn < first_lsn:
            raise SessionUsageError("bad verify range")
        lo = first_lsn
        while lo <= last_lsn:
            hi = min(last_lsn, lo + step - 1)
            self._verify_ranges.append((lo, hi))
            lo = hi + 1
        self._verify_count = 0
        self._verify_bad = []
        self._verify_next()

    def set_term(self, term: int) -> None:
        """This node's current term (from the witness); it never goes down."""
        self.term = max(self.term, term)

    def update_local(self, view: NodeView) -> None:
        """This node's role or history changed: tell the peer (STATE update)."""
        if view.node_id != self.local.node_id:
            raise SessionUsageError("node id changed")
        self.local = view
        self.term = max([self.term, *(g.number for g in view.history)])
        if self.phase is Phase.ESTABLISHED:
            self._send(wire.State(view, self.config.protocol, update=True))

    def close(self, reason: str = "closed") -> None:
        """Drop the link on purpose (a REFUSE(SHUTDOWN) goes out first)."""
        if self.phase is not Phase.CLOSED:
            self._close(reason, refuse=RefuseReason.SHUTDOWN)

    # -- timers --------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`tick` has something to do (None: never, the link is closed)."""
        if self.phase is Phase.CLOSED:
            return None
        c = self.config
        ds = []
        if self.phase in (Phase.INIT, Phase.HELLO, Phase.AUTH, Phase.STATE):
            ds.append(self._started + c.handshake_timeout)
        else:
            ds.append(self._last_heard + c.ping_interval + c.ping_timeout)
            if self._ping_outstanding is None:
                ds.append(max(self._last_heard, self._last_sent) + c.ping_interval)
        if self._ack_wait_since is not None:
            ds.append(self._ack_wait_since + c.ack_timeout)
        if self._poll_at is not None:
            ds.append(self._poll_at)
        if self._tokens < -_TOKEN_SLACK and c.resync_rate:
            ds.append(self._tokens_at + (-self._tokens) / c.resync_rate)
        return min(ds)

    def tick(self) -> None:
        """Check timers against the clock."""
        if self.phase is Phase.CLOSED:
            return
        now = self._clock()
        c = self.config
        if self.phase in (Phase.INIT, Phase.HELLO, Phase.AUTH, Phase.STATE):
            if now >= self._started + c.handshake_timeout:
                self._close("handshake-timeout", refuse=RefuseReason.TIMEOUT)
            return
        if self._ack_wait_since is not None and now >= self._ack_wait_since + c.ack_timeout:
            self._close("ack-timeout", refuse=RefuseReason.TIMEOUT)
            return
        if now >= self._last_heard + c.ping_interval + c.ping_timeout:
            self._close("ping-timeout", refuse=RefuseReason.TIMEOUT)
            return
        if (
            self._ping_outstanding is None
            and now >= max(self._last_heard, self._last_sent) + c.ping_interval
        ):
            self._ping_token += 1
            self._ping_outstanding = (self._ping_token, now)
            self._send(wire.Ping(self._ping_token))
        if self._poll_at is not None and now >= self._poll_at:
            self._poll_at = None
        self._pump()

    # -- status --------------------------------------------------------------------------------

    @property
    def resync_remaining(self) -> int | None:
        """LSNs the sync source still has to send (None: not a source)."""
        if self.phase is not Phase.SYNC_SOURCE or self._cursor is None:
            return None
        return max(0, self._appended_last - self._cursor + 1)

    # -- dispatch ------------------------------------------------------------------------------

    def _local(self, inp: Local, arg: object) -> None:
        if self.phase is Phase.CLOSED:
            return
        row = TRANSITIONS.get((self.phase, inp))
        if row is None:
            raise SessionUsageError(f"{inp.value} is not allowed in phase {self.phase.value}")
        self._run(row, arg)

    def _run(self, row: tuple[str, frozenset[Phase]], arg: object) -> None:
        name, allowed = row
        try:
            nxt = getattr(self, name)(arg)
        except wire.WireError as e:
            self._violation(e)
            return
        if self.phase is Phase.CLOSED:
            return
        assert nxt in allowed, f"{name} went to {nxt}, not in the table"
        self.phase = nxt
        self._pump()

    def _drain(self) -> None:
        while self.phase is not Phase.CLOSED:
            try:
                rec = self._dec.next_message()
            except wire.WireError as e:
                self._violation(e)
                return
            if rec is None:
                return
            self._dispatch(rec)

    def _dispatch(self, rec: wire.Received) -> None:
        msg = rec.message
        if isinstance(msg, wire.Refuse):
            self._events.append(PeerRefused(msg.reason, msg.detail))
            self._close("peer-refused", refuse=None)
            return
        keyed = self.phase not in (Phase.INIT, Phase.HELLO, Phase.AUTH)
        if keyed and msg.TYPE in _ANY_PHASE:
            getattr(self, _ANY_PHASE[msg.TYPE])(msg)
            return
        row = TRANSITIONS.get((self.phase, msg.TYPE))
        if row is None:
            self._violation(wire.UnexpectedMessage(f"{msg.TYPE.name} in {self.phase.value}"))
            return
        self._run(row, rec)

    # -- sending -------------------------------------------------------------------------------

    def _send(self, msg: wire.Message) -> None:
        self._events.append(SendBytes(self._enc.encode(msg, self.term)))
        self._last_sent = self._clock()

    def _violation(self, e: wire.WireError) -> None:
        text = wire.REFUSE_TEXT[e.reason]
        self._events.append(ProtocolViolation(e.reason, f"{text}: {e}" if str(e) else text))
        self._close("protocol-violation", refuse=e.reason)

    def _close(self, reason: str, *, refuse: RefuseReason | None, detail: str = "") -> None:
        if self.phase is Phase.CLOSED:
            return
        if refuse is not None and self.phase is not Phase.INIT:
            self._send(wire.Refuse(refuse, detail or wire.REFUSE_TEXT[refuse]))
        self.phase = Phase.CLOSED
        self.close_reason = reason
        self._ring.clear()
        self._events.append(LinkLost(reason))

    # -- handshake -----------------------------------------------------------------------------

    def _on_start(self, _arg: object) -> Phase:
        c = self.config
        self._started = self._clock()
        self._my_hello = wire.Hello(
            c.node_id, self._nonce, c.min_version, c.max_version, c.settings_hash
        )
        self._send(self._my_hello)
        return Phase.HELLO

    def _on_hello(self, rec: wire.Received) -> Phase:
        msg = rec.message
        assert isinstance(msg, wire.Hello) and self._my_hello is not None
        c = self.config
        if msg.node_id == c.node_id:
            return self._refuse_handshake(RefuseReason.SAME_NODE)
        if c.expected_peer is not None and msg.node_id != c.expected_peer:
            return self._refuse_handshake(RefuseReason.UNEXPECTED_PEER)
        version = wire.negotiate_version(self._my_hello, msg)
        if version is None:
            return self._refuse_handshake(RefuseReason.VERSION)
        if msg.settings_hash != c.settings_hash:
            return self._refuse_handshake(RefuseReason.SETTINGS)
        self._peer_hello = msg
        self.version = version
        self._send(wire.Auth(wire.auth_mac(c.secret, sender=self._my_hello, receiver=msg)))
        return Phase.AUTH

    def _refuse_handshake(self, reason: RefuseReason) -> Phase:
        self._events.append(ProtocolViolation(reason, wire.REFUSE_TEXT[reason]))
        self._close("handshake-refused", refuse=reason)
        return Phase.CLOSED

    def _on_auth(self, rec: wire.Received) -> Phase:
        msg = rec.message
        assert isinstance(msg, wire.Auth)
        mine, peer = self._my_hello, self._peer_hello
        assert mine is not None and peer is not None
        want = wire.auth_mac(self.config.secret, sender=peer, receiver=mine)
        if not hmac.compare_digest(want, msg.mac):
            return self._refuse_handshake(RefuseReason.AUTH)
        s = self.config.secret
        self._enc.set_key(wire.session_key(s, sender=mine, receiver=peer), self.version)
        self._dec.set_key(wire.session_key(s, sender=peer, receiver=mine), self.version)
        self.peer_id = peer.node_id
        self._events.append(HandshakeDone(peer.node_id, self.version))
        self._sent_view = self.local
        self._send(wire.State(self.local, self.config.protocol))
        return Phase.STATE

    def _on_state(self, rec: wire.Received) -> Phase:
        msg = rec.message
        assert isinstance(msg, wire.State) and self._sent_view is not None
        if msg.view.node_id != self.peer_id:
            raise wire.UnexpectedMessage("state names another node")
        if msg.protocol is not self.config.protocol:
            raise wire.UnexpectedMessage("protocol differs")  # settings hash should catch it
        self.peer = msg.view
        self.peer_protocol = msg.protocol
        self.peer_disk = msg.view.disk
        self._events.append(PeerStateReceived(msg.view, msg.protocol))
        o = decide(self._sent_view, msg.view, self.config.split_brain)
        self.outcome = o
        self._events.append(Decision(o))
        return self._after_decision(o)

    # -- after the decision --------------------------------------------------------------------

    def _after_decision(self, o: Outcome) -> Phase:
        assert self.peer is not None
        if o.action is Action.DISCONNECT:
            self._close("decision", refuse=RefuseReason.DECISION, detail=o.rule)
            return Phase.CLOSED
        if o.action is Action.SYNC_TARGET and self.disk is not DiskState.INCONSISTENT:
            self.disk = DiskState.INCONSISTENT
            self._events.append(DiskChanged(DiskState.INCONSISTENT))
        if o.action in (Action.SYNC_SOURCE, Action.IN_SYNC):
            # The peer's STATE says it holds our records up to the divergence point: what it
            # confirmed before this link (status lag, the primary's drain at stop and the
            # retention horizon count from there, not from 0 until the next ack). Counted by a
            # secondary in sync too: promoted on this link, it owes the peer nothing before
            # its first new frame.
            held = min(o.divergence_lsn, self.peer.last_lsn)
            self.peer_received = max(self.peer_received, held)
            self.peer_durable = max(self.peer_durable, held)
        if o.branch is Branch.SEND:
            assert o.cut_local_after is not None
            self._branch_cursor = o.cut_local_after + 1
            self._branch_last = self._sent_view.last_lsn if self._sent_view else 0
            return Phase.BRANCH_SEND
        if o.branch is Branch.RECEIVE:
            return Phase.BRANCH_RECV
        if o.cut_local_after is not None:
            self._events.append(CutTail(o.cut_local_after))
            return Phase.CUT
        return self._start_streaming(o)

    def _receives_log(self, o: Outcome) -> bool:
        """Does this node receive the log on this link (sync target, or in-sync secondary of a
        primary)?"""
        assert self.peer is not None
        if o.action is Action.SYNC_TARGET:
            return True
        return o.action is Action.IN_SYNC and self.peer.role is Role.PRIMARY

    def _sends_log(self, o: Outcome) -> bool:
        if o.action is Action.SYNC_SOURCE:
            return True
        return o.action is Action.IN_SYNC and self.local.role is Role.PRIMARY

    def _start_streaming(self, o: Outcome) -> Phase:
        if self._receives_log(o):
            if o.full_sync or self.config.full_sync:
                return self._start_snapshot_target()
            self._send(wire.ResyncRequest(self._recv_next))
            return Phase.SYNC_TARGET
        if self._sends_log(o):
            if o.action is Action.SYNC_SOURCE and self.peer_disk is not DiskState.INCONSISTENT:
                self.peer_disk = DiskState.INCONSISTENT
                self._events.append(PeerDiskChanged(DiskState.INCONSISTENT))
            return Phase.SYNC_SOURCE
        self._maybe_up_to_date()
        return Phase.ESTABLISHED

    def _maybe_up_to_date(self) -> None:
        """In sync with an UpToDate peer: this node is UpToDate too.

        Two Outdated nodes whose logs are identical (``IN_SYNC``, neither primary: e.g. after
        a clean stop of the whole cluster, where the primary demoted first) both hold the newest
        data either of them has, so both become UpToDate; the decision is symmetric, so the peer
        does the same."""
        assert self.peer is not None
        o = self.outcome
        both_outdated_identical = (
            o is not None
            and o.action is Action.IN_SYNC
            and self.peer.disk is DiskState.OUTDATED
            and self.disk is DiskState.OUTDATED
        )
        peer_current = self.peer.disk is DiskState.UP_TO_DATE or both_outdated_identical
        if peer_current and self.disk is not DiskState.UP_TO_DATE:
            self.disk = DiskState.UP_TO_DATE
            self._events.append(DiskChanged(DiskState.UP_TO_DATE))

    def _on_tail_cut(self, after: object) -> Phase:
        o = self.outcome
        assert o is not None and isinstance(after, int)
        if after != o.cut_local_after:
            raise SessionUsageError("tail_cut does not match CutTail")
        self._recv_next = after + 1
        self.received_lsn = self.durable_lsn = after
        return self._start_streaming(o)

    # -- branch shipping (merge) ---------------------------------------------------------------

    def _on_send_branch(self, frames: object) -> Phase:
        assert isinstance(frames, tuple)
        self._need_out = False
        infos = self._peek_local(frames)
        if not infos:
            raise SessionUsageError("the branch must be readable from the local log")
        if infos[0].lsn != self._branch_cursor:
            raise SessionUsageError("frames do not start at the requested LSN")
        self._send(wire.Frames(infos[0].lsn, FramesPurpose.BRANCH, frames))
        wire.branch_digest_update(self._branch_hash, frames)
        self._branch_cursor = infos[-1].lsn + 1
        return Phase.BRANCH_SEND

    def _on_branch_sent(self, _arg: object) -> Phase:
        """The whole branch went out: wait for the winner's MERGE_DONE before cutting it (if
        the link drops first, the branch stays and is shipped again on reconnect)."""
        self._send(wire.BranchEnd(self._branch_last))
        return Phase.MERGE_WAIT

    def _on_peer_merge_done(self, rec: wire.Received) -> Phase:
        msg = rec.message
        o = self.outcome
        assert isinstance(msg, wire.MergeDone) and o is not None
        assert o.cut_local_after is not None
        if msg.last_lsn != self._branch_last or msg.digest != self._branch_hash.digest():
            raise wire.UnexpectedMessage("MERGE_DONE does not match the branch sent")
        self._events.append(CutTail(o.cut_local_after))
        return Phase.CUT

    def _on_branch_frames(self, rec: wire.Received) -> Phase:
        msg = rec.message
        assert isinstance(msg, wire.Frames) and self.outcome is not None
        if msg.purpose is not FramesPurpose.BRANCH:
            raise wire.UnexpectedMessage("expected branch frames")
        infos = self._peek_peer(msg)
        expected = self._branch_cursor or self.outcome.divergence_lsn + 1
        if infos[0].lsn != expected:
            raise wire.UnexpectedMessage("branch frames out of order")
        self._branch_cursor = infos[-1].lsn + 1
        wire.branch_digest_update(self._branch_hash, msg.frames)
        self._events.append(BranchFrames(msg.first_lsn, msg.frames))
        return Phase.BRANCH_RECV

    def _on_branch_end(self, rec: wire.Received) -> Phase:
        msg = rec.message
        assert isinstance(msg, wire.BranchEnd) and self.outcome is not None and self.peer
        expected = self.outcome.divergence_lsn + self.outcome.peer_tail
        if msg.last_lsn != expected or self._branch_cursor != expected + 1:
            raise wire.UnexpectedMessage("branch incomplete")
        self._branch_last = msg.last_lsn
        self._events.append(BranchComplete(msg.last_lsn))
        return Phase.MERGING

    def _on_merge_done(self, last: object) -> Phase:
        assert isinstance(last, int)
        if last != self._branch_last:
            raise SessionUsageError("merge_done does not match BranchComplete")
        self._send(wire.MergeDone(last, self._branch_hash.digest()))
        return Phase.SYNC_SOURCE

    # -- source side ---------------------------------------------------------------------------

    def _on_resync_request(self, rec: wire.Received) -> Phase:
        msg = rec.message
        assert isinstance(msg, wire.ResyncRequest) and self.outcome is not None
        if self._cursor is not None:
            raise wire.UnexpectedMessage("second resync request")
        o = self.outcome
        if self._snap_lsn is not None:  # after a full sync: from the snapshot's LSN + 1
            lo = self._snap_lsn + 1
        elif self.phase is Phase.SYNC_SOURCE:  # the first: it must match the decision
            lo = o.resync_from if o.resync_from is not None else self._sent_last() + 1
        else:  # after a role change on an established link
            lo = self.local.first_retained_lsn
        if not lo <= msg.from_lsn <= self._appended_last + 1:
            raise wire.UnexpectedMessage("resync request outside the decided range")
        if msg.to_lsn is not None and msg.to_lsn < msg.from_lsn:
            raise wire.UnexpectedMessage("empty resync range")
        self._cursor = msg.from_lsn
        self._cursor_end = msg.to_lsn
        self._sync_done_lsn = None
        self.sent_lsn = max(self.sent_lsn, msg.from_lsn - 1)
        return Phase.SYNC_SOURCE

    def _sent_last(self) -> int:
        return self._sent_view.last_lsn if self._sent_view is not None else 0

    def _on_send_resync(self, frames: object) -> Phase:
        assert isinstance(frames, tuple) and self._cursor is not None
        self._need_out = False
        if not frames:
            self._poll_at = self._clock() + self.config.resync_poll
            return Phase.SYNC_SOURCE
        infos = self._peek_local(frames)
        if infos[0].lsn != self._cursor:
            raise SessionUsageError("frames do not start at the requested LSN")
        self._send_data(self._cursor, FramesPurpose.RESYNC, frames)
        self._cursor = infos[-1].lsn + 1
        self.stats_resync_bytes += wire.frames_size(frames)
        if self.config.resync_rate:
            self._refill()
            self._tokens -= wire.frames_size(frames)
        return Phase.SYNC_SOURCE

    def _refill(self) -> None:
        rate = self.config.resync_rate
        now = self._clock()
        if rate:
            cap = float(self.config.resync_chunk_bytes)
            self._tokens = min(cap, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now

    def _send_data(self, first: int, purpose: FramesPurpose, frames: tuple[bytes, ...]) -> None:
        size = wire.frames_size(frames)
        self._send(wire.Frames(first, purpose, frames))
        last = first + len(frames) - 1
        self.sent_lsn = max(self.sent_lsn, last)
        self._inflight.append((last, size))
        self._inflight_bytes += size
        if self._ack_wait_since is None:
            self._ack_wait_since = self._clock()

    def _pump(self) -> None:
        """Make progress on the sending side: ship the branch, read the log, go live."""
        if self.phase is Phase.BRANCH_SEND:
            if self._need_out:
                return
            if self._branch_cursor > self._branch_last:
                self._local(Local.BRANCH_SENT, None)
                return
            self._need_out = True
            self._events.append(
                NeedFrames(
                    self._branch_cursor, self.config.resync_chunk_bytes, FramesPurpose.BRANCH
                )
            )
            return
        if self.phase is Phase.SNAPSHOT_SOURCE:
            self._pump_snapshot()
            return
        if self.phase is not Phase.SYNC_SOURCE or self._cursor is None or self._need_out:
            return
        cur = self._cursor
        end = self._cursor_end
        while self._ring and self._ring[0][0] < cur:
            _, old = self._ring.popleft()
            self._ring_bytes -= len(old)
        if (end is not None and cur > end) or (
            (self._ring and self._ring[0][0] == cur) or cur > self._appended_last
        ):
            self._local(Local.CAUGHT_UP, cur - 1)
            return
        if self._poll_at is not None:
            return
        if self._inflight_bytes >= self.config.resync_window_bytes:
            return
        if self.config.resync_rate:
            self._refill()
            if self._tokens < -_TOKEN_SLACK:
                return
        self._need_out = True
        self._events.append(NeedFrames(cur, self.config.resync_chunk_bytes, FramesPurpose.RESYNC))

    def _on_caught_up(self, last: object) -> Phase:
        """The log read has reached the live stream (or the requested end): SYNC_DONE, then
        live frames (a primary), and the barrier may start waiting for the peer."""
        assert isinstance(last, int)
        live = self._cursor_end is None
        if live and self.local.role is Role.PRIMARY and self._ring:
            # The frames appended during the resync end it, *before* SYNC_DONE: the target
            # becomes UpToDate only once it holds them. This primary may have released them
            # (LOCAL barrier, the peer not in sync) and acknowledged them while the peer was
            # Outdated/Inconsistent (docs/cluster.md, "A live peer that cannot be promoted").
            frames = tuple(raw for _, raw in self._ring)
            self._ring.clear()
            self._ring_bytes = 0
            self._send_data(last + 1, FramesPurpose.RESYNC, frames)
            last = self._appended_last
        self._send(wire.SyncDone(last))
        self._sync_done_lsn = last
        self._cursor = None
        if live and self.local.role is Role.PRIMARY:
            self._events.append(PeerInSync(last + 1))
        self._check_peer_up_to_date()
        return Phase.ESTABLISHED

    def _on_ack(self, rec: wire.Received) -> Phase:
        msg = rec.message
        assert isinstance(msg, wire.Ack)
        if msg.durable_lsn > msg.received_lsn or msg.received_lsn > self.sent_lsn:
            raise wire.UnexpectedMessage("ack beyond what was sent")
        changed = msg.received_lsn > self.peer_received or msg.durable_lsn > self.peer_durable
        self.peer_received = max(self.peer_received, msg.received_lsn)
        self.peer_durable = max(self.peer_durable, msg.durable_lsn)
        while self._inflight and self._inflight[0][0] <= self.peer_received:
            _, size = self._inflight.popleft()
            self._inflight_bytes -= size
        if changed:
            p = self.config.protocol
            lsn = self.peer_received if p is Protocol.B else self.peer_durable
            self._events.append(Acked(lsn, self.peer_received, self.peer_durable))
            confirmed = self.peer_durable
            self._ack_wait_since = None if confirmed >= self.sent_lsn else self._clock()
        self._check_peer_up_to_date()
        return self.phase

    def _check_peer_up_to_date(self) -> None:
        done = self._sync_done_lsn
        if done is None or self.peer_durable < done or self.peer_disk is DiskState.UP_TO_DATE:
            return
        if self.disk is DiskState.UP_TO_DATE:
            self.peer_disk = DiskState.UP_TO_DATE
            self._events.append(PeerDiskChanged(DiskState.UP_TO_DATE))

    # -- target side ---------------------------------------------------------------------------

    def _on_frames(self, rec: wire.Received) -> Phase:
        msg = rec.message
        assert isinstance(msg, wire.Frames) and self.peer is not None
        if msg.purpose is FramesPurpose.BRANCH:
            raise wire.UnexpectedMessage("branch frames outside a merge")
        if msg.purpose is FramesPurpose.LIVE:
            if self.peer.role is not Role.PRIMARY or self._sync_done_at is None:
                raise wire.UnexpectedMessage("live frames from a non-primary or before sync")
            if rec.term < self.term:
                raise wire.StaleTerm("frames from an older term")
            self.term = max(self.term, rec.term)
        elif self._sync_done_at is not None:
            raise wire.UnexpectedMessage("resync frames after SYNC_DONE")
        infos = self._peek_peer(msg)
        if infos[0].lsn != self._recv_next:
            raise wire.UnexpectedMessage("frames out of order")
        self._recv_next = infos[-1].lsn + 1
        self.received_lsn = infos[-1].lsn
        self._events.append(IngestFrames(msg.first_lsn, msg.frames, msg.purpose))
        if self.config.protocol is Protocol.B:
            self._send(wire.Ack(self.received_lsn, self.durable_lsn))
        return self.phase

    def _on_sync_done(self, rec: wire.Received) -> Phase:
        msg = rec.message
        assert isinstance(msg, wire.SyncDone)
        if msg.last_lsn != self._recv_next - 1:
            raise wire.UnexpectedMessage("SYNC_DONE does not match the frames received")
        self._sync_done_at = msg.last_lsn
        return self._target_progress()

    def _on_frames_durable(self, lsn: object) -> Phase:
        assert isinstance(lsn, int)
        if lsn > self.received_lsn or lsn < self.durable_lsn:
            raise SessionUsageError("durable LSN outside what was received")
        if lsn > self.durable_lsn:
            self.durable_lsn = lsn
            self._appended_last = max(self._appended_last, lsn)
            self._send(wire.Ack(self.received_lsn, self.durable_lsn))
        return self._target_progress()

    def _target_progress(self) -> Phase:
        if self.phase is Phase.SYNC_TARGET:
            done = self._sync_done_at
            if done is not None and self.durable_lsn >= done:
                self._maybe_up_to_date()
                return Phase.ESTABLISHED
        return self.phase

    # -- full sync -----------------------------------------------------------------------------

    def _start_snapshot_target(self) -> Phase:
        if self.disk is not DiskState.INCONSISTENT:
            self.disk = DiskState.INCONSISTENT
            self._events.append(DiskChanged(DiskState.INCONSISTENT))
        self._snap_recv = {}
        self._snap_cur = ""
        self._snap_total = self._snap_written = 0
        self._snap_end = None
        self._snap_install_asked = False
        self._snap_begun = False
        self._snap_digest = wire.SnapshotDigest()
        last = self._recv_next - 1
        if self.version < 2:
            self._events.append(SnapshotBegin(last))
            self._send(wire.SnapshotRequest(last))
            return Phase.SNAPSHOT_TARGET
        # Version 2: SnapshotBegin waits for the source's SNAPSHOT_BEGIN (fresh or resumed).
        r = self.config.snapshot_resume
        if r is not None and r.files and len(r.snapshot_id) == wire.SNAPSHOT_ID_SIZE:
            self._send(wire.SnapshotResume(last, r.snapshot_id, len(r.files) - 1, r.files[-1][1]))
        else:
            self._send(wire.SnapshotRequest(last))
        return Phase.SNAPSHOT_TARGET

    def _on_snapshot_begin(self, rec: wire.Received) -> Phase:
        """Version 2, target: the source names its snapshot and where its data starts: from
        the beginning, or exactly at the resume point this node asked for."""
        msg = rec.message
        assert isinstance(msg, wire.SnapshotBegin)
        if self.version < 2 or self._snap_begun:
            raise wire.UnexpectedMessage("unexpected SNAPSHOT_BEGIN")
        kept: tuple[tuple[str, int], ...] = ()
        if (msg.index, msg.offset) != (0, 0):
            r = self.config.snapshot_resume
            if (
                r is None
                or not r.files
                or msg.snapshot_id != r.snapshot_id
                or msg.index != len(r.files) - 1
                or msg.offset != r.files[-1][1]
            ):
                raise wire.UnexpectedMessage("snapshot resumed at a point not asked for")
            kept = r.files
        self._snap_begun = True
        self._snap_recv = dict(kept)
        self._snap_cur = kept[-1][0] if kept else ""
        self._snap_total = self._snap_written = sum(size for _, size in kept)
        self._events.append(SnapshotBegin(self._recv_next - 1, msg.snapshot_id, kept))
        return Phase.SNAPSHOT_TARGET

    def _on_snapshot_request(self, rec: wire.Received) -> Phase:
        msg = rec.message
        assert isinstance(msg, wire.SnapshotRequest | wire.SnapshotResume)
        if self._cursor is not None or self._snap_lsn is not None:
            raise wire.UnexpectedMessage("snapshot request during a resync")
        self._snap_want = None
        if isinstance(msg, wire.SnapshotResume):
            if self.version < 2:
                raise wire.UnexpectedMessage("SNAPSHOT_RESUME on a version 1 link")
            self._snap_want = (msg.snapshot_id, msg.index, msg.offset)
        if self.peer_disk is not DiskState.INCONSISTENT:
            self.peer_disk = DiskState.INCONSISTENT
            self._events.append(PeerDiskChanged(DiskState.INCONSISTENT))
        self._sync_done_lsn = None
        self._events.append(NeedSnapshot(self._snap_want[0] if self._snap_want else b""))
        return Phase.SNAPSHOT_SOURCE

    def _on_snapshot_ready(self, arg: object) -> Phase:
        assert isinstance(arg, tuple)
        lsn, files, sid = arg
        if self._snap_files is not None:
            raise SessionUsageError("snapshot_ready twice")
        if not isinstance(lsn, int) or lsn < 0 or not files:
            raise SessionUsageError("a snapshot has an LSN and at least one file")
        for name, size in files:
            if not wire.snapshot_name_ok(name) or size < 0:
                raise SessionUsageError("bad snapshot file")
        if sid and len(sid) != wire.SNAPSHOT_ID_SIZE:
            raise SessionUsageError("a snapshot id is 16 bytes")
        self._snap_lsn = lsn
        self._snap_files = files
        self._snap_i = self._snap_off = self._snap_sent = self._snap_acked = 0
        self._snap_digest = wire.SnapshotDigest()
        self.snapshot_resumed_at = 0
        if self.version >= 2:
            self.snapshot_id = sid or secrets.token_bytes(wire.SNAPSHOT_ID_SIZE)
            want = self._snap_want
            if (
                want is not None
                and want[0] == self.snapshot_id
                and want[1] < len(files)
                and want[2] <= files[want[1]][1]
            ):
                # The same snapshot: continue after what the target durably holds.
                self._snap_i, self._snap_off = want[1], want[2]
                done = sum(size for _, size in files[: want[1]]) + want[2]
                self._snap_sent = self._snap_acked = self.snapshot_resumed_at = done
            self._send(
                wire.SnapshotBegin(
                    self.snapshot_id,
                    lsn,
                    self._snap_i,
                    self._snap_off,
                    len(files),
                    sum(size for _, size in files),
                )
            )
        return Phase.SNAPSHOT_SOURCE

    def _pump_snapshot(self) -> None:
        """Source: ask for the next chunk of the snapshot, within the window and the rate."""
        files = self._snap_files
        if files is None or self._need_out:
            return
        if self._snap_i >= len(files):
            self._local(Local.SNAPSHOT_SENT, None)
            return
        if self._snap_sent - self._snap_acked >= self.config.resync_window_bytes:
            return
        if self.config.resync_rate:
            self._refill()
            if self._tokens < -_TOKEN_SLACK:
                return
        name, size = files[self._snap_i]
        n = min(self.config.resync_chunk_bytes, size - self._snap_off)
        self._need_out = True
        self._events.append(NeedSnapshotData(self._snap_i, name, self._snap_off, n))

    def _on_send_snapshot(self, data: object) -> Phase:
        assert isinstance(data, bytes) and self._snap_files is not None
        if not self._need_out:
            raise SessionUsageError("snapshot data nobody asked for")
        self._need_out = False
        name, size = self._snap_files[self._snap_i]
        if len(data) != min(self.config.resync_chunk_bytes, size - self._snap_off):
            raise SessionUsageError("snapshot data of the wrong size")
        self._send(wire.SnapshotData(name, self._snap_off, data))
        self._snap_digest.update(name, self._snap_off, data)
        self._snap_off += len(data)
        self._snap_sent += len(data)
        self.stats_snapshot_bytes += len(data)
        if self._snap_off >= size:
            self._snap_i += 1
            self._snap_off = 0
        if self.config.resync_rate:
            self._refill()
            self._tokens -= len(data)
        if self._ack_wait_since is None and self._snap_sent > self._snap_acked:
            self._ack_wait_since = self._clock()
        return Phase.SNAPSHOT_SOURCE

    def _on_snapshot_sent(self, _arg: object) -> Phase:
        assert self._snap_files is not None and self._snap_lsn is not None
        self._send(
            wire.SnapshotEnd(
                self._snap_lsn, len(self._snap_files), self._snap_sent, self._snap_digest.digest()
            )
        )
        self._events.append(SnapshotSent(self._snap_lsn))
        self.sent_lsn = max(self.sent_lsn, self._snap_lsn)
        return Phase.SYNC_SOURCE

    def _on_snapshot_ack(self, rec: wire.Received) -> Phase:
        msg = rec.message
        assert isinstance(msg, wire.SnapshotAck)
        if self._snap_lsn is None or msg.written_bytes > self._snap_sent:
            raise wire.UnexpectedMessage("snapshot ack beyond what was sent")
        if msg.written_bytes > self._snap_acked:
            self._snap_acked = msg.written_bytes
            done = self._snap_acked >= self._snap_sent
            self._ack_wait_since = None if done else self._clock()
        return self.phase

    def _on_snapshot_data(self, rec: wire.Received) -> Phase:
        msg = rec.message
        assert isinstance(msg, wire.SnapshotData)
        if self._snap_end is not None:
            raise wire.UnexpectedMessage("snapshot data after SNAPSHOT_END")
        if self.version >= 2 and not self._snap_begun:
            raise wire.UnexpectedMessage("snapshot data before SNAPSHOT_BEGIN")
        have = self._snap_recv.get(msg.name)
        if msg.name != self._snap_cur and have is not None:
            raise wire.UnexpectedMessage("snapshot file sent twice")
        if msg.offset != (have or 0):
            raise wire.UnexpectedMessage("snapshot data out of order")
        self._snap_cur = msg.name
        self._snap_recv[msg.name] = msg.offset + len(msg.data)
        self._snap_total += len(msg.data)
        self._snap_digest.update(msg.name, msg.offset, msg.data)
        self._events.append(SnapshotChunk(msg.name, msg.offset, msg.data, self._snap_total))
        return Phase.SNAPSHOT_TARGET

    def _on_snapshot_end(self, rec: wire.Received) -> Phase:
        msg = rec.message
        assert isinstance(msg, wire.SnapshotEnd)
        if self._snap_end is not None:
            raise wire.UnexpectedMessage("second SNAPSHOT_END")
        if (
            msg.total_bytes != self._snap_total
            or msg.files != len(self._snap_recv)
            or not hmac.compare_digest(msg.digest, self._snap_digest.digest())
        ):
            raise wire.SnapshotMismatch("snapshot size or digest mismatch")
        self._snap_end = msg.lsn
        self._maybe_install()
        return Phase.SNAPSHOT_TARGET

    def _on_snapshot_written(self, total: object) -> Phase:
        assert isinstance(total, int)
        if total > self._snap_total or total < self._snap_written:
            raise SessionUsageError("snapshot bytes written outside what was received")
        if total > self._snap_written:
            self._snap_written = total
            self._send(wire.SnapshotAck(total))
        self._maybe_install()
        return Phase.SNAPSHOT_TARGET

    def _maybe_install(self) -> None:
        """Every byte announced by SNAPSHOT_END is written: install (once)."""
        end = self._snap_end
        if end is None or self._snap_install_asked or self._snap_written < self._snap_total:
            return
        self._snap_install_asked = True
        self._events.append(SnapshotInstall(end))

    def _on_snapshot_installed(self, lsn: object) -> Phase:
        assert isinstance(lsn, int)
        if not self._snap_install_asked or lsn != self._snap_end:
            raise SessionUsageError("snapshot_installed does not match SnapshotInstall")
        self._recv_next = lsn + 1
        self.received_lsn = self.durable_lsn = lsn
        self._appended_last = max(self._appended_last, lsn)
        self._sync_done_at = None
        # The installed snapshot is durable (fsynced): the source learns it holds up to lsn.
        self._send(wire.Ack(lsn, lsn))
        self._send(wire.ResyncRequest(lsn + 1))
        return Phase.SYNC_TARGET

    def _on_peer_detached(self, rec: wire.Received) -> Phase:
        """The peer's disk failed (a STATE update saying Diskless): it holds no usable copy
        and drops the link; report it (the adapter applies its fencing policy on LinkLost)."""
        msg = rec.message
        assert isinstance(msg, wire.State) and self.peer is not None
        if not msg.update or msg.view.node_id != self.peer.node_id:
            raise wire.UnexpectedMessage("bad state update")
        if msg.view.disk is not DiskState.DISKLESS:
            raise wire.UnexpectedMessage("state update during a sync")
        self.peer = msg.view
        self.peer_disk = DiskState.DISKLESS
        self._events.append(PeerStateReceived(msg.view, msg.protocol))
        self._events.append(PeerDiskChanged(DiskState.DISKLESS))
        self._close("peer-diskless", refuse=None)
        return Phase.CLOSED

    # -- state updates, verify, keepalive ------------------------------------------------------

    def _on_state_update(self, rec: wire.Received) -> Phase:
        msg = rec.message
        assert isinstance(msg, wire.State) and self.peer is not None
        if msg.update and msg.view.disk is DiskState.DISKLESS:
            return self._on_peer_detached(rec)
        if not msg.update or msg.view.node_id != self.peer.node_id:
            raise wire.UnexpectedMessage("bad state update")
        if msg.view.role is Role.PRIMARY and self.local.role is Role.PRIMARY:
            self._close("both-primary", refuse=RefuseReason.DECISION, detail="rule:both-primary")
            return Phase.CLOSED
        became_primary = msg.view.role is Role.PRIMARY and self.peer.role is not Role.PRIMARY
        self.peer = msg.view
        self._events.append(PeerStateReceived(msg.view, msg.protocol))
        if became_primary:
            # Switchover on a live link: receive the new primary's log from our next LSN.
            nxt = max(self._recv_next, self._appended_last + 1)
            self._recv_next = nxt
            self.received_lsn = self.durable_lsn = nxt - 1
            self._sync_done_at = None
            self._send(wire.ResyncRequest(nxt))
            return Phase.SYNC_TARGET
        return Phase.ESTABLISHED

    def _verify_next(self) -> None:
        if not self._verify_ranges:
            if self._verify_cur is None:
                self._events.append(VerifyDone(self._verify_count, tuple(self._verify_bad)))
            return
        r = self._verify_ranges.popleft()
        self._verify_cur = r
        self._verify_local = self._verify_peer = None
        self._digests_wanted.add(r)
        self._send(wire.VerifyRequest(*r))
        self._events.append(NeedDigest(*r))

    def _verify_step(self) -> None:
        cur = self._verify_cur
        if cur is None or self._verify_local is None or self._verify_peer is None:
            return
        a, b = self._verify_local, self._verify_peer
        match = None if not a or not b else a == b
        self._events.append(VerifyResult(cur[0], cur[1], match))
        self._verify_count += 1
        if match is False:
            self._verify_bad.append(cur)
        self._verify_cur = None
        self._verify_next()

    def _on_verify_request(self, rec: wire.Received) -> Phase:
        msg = rec.message
        assert isinstance(msg, wire.VerifyRequest)
        if msg.first_lsn < 1 or msg.last_lsn < msg.first_lsn or len(self._peer_digest_wanted) > 8:
            raise wire.UnexpectedMessage("bad verify request")
        key = (msg.first_lsn, msg.last_lsn)
        self._peer_digest_wanted.add(key)
        self._events.append(NeedDigest(*key))
        return Phase.ESTABLISHED

    def _on_verify_digest(self, rec: wire.Received) -> Phase:
        msg = rec.message
        assert isinstance(msg, wire.VerifyDigest)
        if self._verify_cur != (msg.first_lsn, msg.last_lsn):
            raise wire.UnexpectedMessage("unrequested digest")
        self._verify_peer = msg.digest
        self._verify_step()
        return Phase.ESTABLISHED

    def _on_ping(self, msg: wire.Ping) -> None:
        self._send(wire.Pong(msg.token))

    def _on_pong(self, msg: wire.Pong) -> None:
        if self._ping_outstanding is not None and msg.token == self._ping_outstanding[0]:
            self._ping_outstanding = None

    # -- frames --------------------------------------------------------------------------------

    def _peek_local(self, frames: Sequence[bytes]) -> list[wire.FrameInfo]:
        try:
            infos = [wire.peek_frame(f) for f in frames]
        except wire.WireError:
            raise SessionUsageError("not a store frame") from None
        for a, b in itertools.pairwise(infos):
            if b.lsn != a.lsn + 1:
                raise SessionUsageError("frame LSNs are not consecutive")
        return infos

    def _peek_peer(self, msg: wire.Frames) -> list[wire.FrameInfo]:
        """Check a FRAMES message's frames: headers verify, LSNs consecutive from
        ``first_lsn``, no generation newer than the message's term allows."""
        if not msg.frames:
            raise wire.UnexpectedMessage("empty frames message")
        infos = [wire.peek_frame(f) for f in msg.frames]
        for i, info in enumerate(infos):
            if info.lsn != msg.first_lsn + i:
                raise wire.CorruptMessage("frame LSNs are not consecutive")
            if info.generation > self._dec.peer_term:
                raise wire.UnexpectedMessage("frame of a generation newer than the sender's term")
        return infos


__all__ = [
    "TRANSITIONS",
    "Acked",
    "BranchComplete",
    "BranchFrames",
    "Clock",
    "CutTail",
    "Decision",
    "DiskChanged",
    "Event",
    "HandshakeDone",
    "IngestFrames",
    "LinkLost",
    "Local",
    "NeedDigest",
    "NeedFrames",
    "NeedSnapshot",
    "NeedSnapshotData",
    "PeerDiskChanged",
    "PeerInSync",
    "PeerRefused",
    "PeerStateReceived",
    "Phase",
    "ProtocolViolation",
    "ReplSession",
    "SendBytes",
    "SessionConfig",
    "SessionUsageError",
    "SnapshotBegin",
    "SnapshotChunk",
    "SnapshotInstall",
    "SnapshotSent",
    "VerifyDone",
    "VerifyResult",
]
