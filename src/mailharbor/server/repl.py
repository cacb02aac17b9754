"""The replication adapter: the peer link's sockets, the asyncio durability barrier, the store.

Theory of operation
-------------------
:class:`Replicator` drives the sans-IO engines of :mod:`mailharbor.repl` for one node:

* **One link.** It listens on ``replication.listen`` and connects to ``replication.peer``
  (reconnecting with a jittered backoff); both sides try, so either may come up first. Every
  TCP connection runs its own :class:`~mailharbor.repl.session.ReplSession` up to the
  handshake; the first authenticated one becomes *the* link. When a second one authenticates
  while a link exists, both nodes keep the connection initiated by the node with the higher
  node id and close the other (a deterministic tie-break both sides compute alike). A link
  that fails the handshake (wrong secret, other settings, unexpected node) is refused and
  logged; only its socket is dropped.
* **Events to actions.** ``NeedFrames`` → ``store.read_frames(from, durable=True)`` (held
  while the socket's write buffer is full); ``IngestFrames`` → one ingest worker per link
  (``store.ingest_nowait``, then ``store.flushed_future``: group commit, pipelined) →
  ``frames_durable``; ``Acked`` → :class:`AsyncBarrier` (``store.barrier``); ``CutTail`` →
  ``store.cut_tail`` with a quarantine file under ``<data_dir>/quarantine/``; ``NeedDigest`` →
  ``store.logical_digest``; ``Decision`` → the rule logged by name; ``LinkLost`` → reported,
  never a role change.
* **Roles** change only through :class:`~mailharbor.repl.role.RoleController`, asked by the
  admin commands (``repl primary [--force]`` / ``repl secondary``). Promotion begins a new
  generation, then starts the node's services (listeners, queue runner) through the hooks the
  node gave; demotion stops them first (gracefully), settles the store, closes the mirrored
  range, then flips the role.
* **Frozen writes fail fast.** While fencing holds writes (``resource-only`` until the peer is
  Outdated, ``resource-and-stonith`` until it is fenced: :meth:`Replicator.peer_fenced` or
  ``repl resume-io``; either until the peer is back in sync, when every write waits for it
  again), ``store.freeze_writes`` refuses new local writes and fails the held
  commits with ``WritesFrozen`` (SMTP ``451 4.3.0``, IMAP ``NO [UNAVAILABLE]``, POP3 ``-ERR
  [SYS/TEMP]``; nothing acknowledged); ``thaw_writes`` comes before the barrier resumes.
* **Replication metadata** (the history with mirrored ranges, the disk state, the role) is
  saved with ``store.save_repl_meta`` — in particular ``mirrored_until`` *before* any write is
  released locally after the peer is lost (docs/replication.md), and a new generation is begun
  before writes continue without the peer, so each generation has at most one mirrored range.

Invariants:

* A secondary never writes to its store except by ingesting the peer's frames (the admin
  socket refuses changing commands; no listener or queue runner runs).
* A primary's write is released by the barrier only per :class:`~mailharbor.repl.barrier.
  BarrierCore` (protocol C: after the peer's fsync; after a link loss only once
  ``mirrored_until`` is persisted and the fencing policy allows).
* Exactly one link is active at a time; frames reach a session in LSN order without gaps (the
  store's frame listener, synchronous with the append).
* Peer input never raises here: the session turns it into events; a failure of ours (store
  error while ingesting) drops the link with REFUSE(INGEST) — and a disk error (ENOSPC, EIO)
  detaches this node: Diskless, the peer told, StandAlone until restarted.
* **Full sync.** ``NeedSnapshot`` → ``store.export_snapshot`` (``retain_from`` kept at its
  LSN + 1), read in chunks for the session; on the target ``SnapshotBegin`` /
  ``SnapshotChunk`` / ``SnapshotInstall`` → ``begin_snapshot_install`` /
  ``write_snapshot_file`` / ``install_snapshot``. ``snapshot_pending`` (persisted from the
  first byte until installed) forbids promotion, even forced; the target stays Inconsistent
  until the catch-up after the install. ``repl invalidate`` asks for a full sync.
* **Retention horizon.** With ``replication.retain_bytes`` a primary drops the head of its log
  every ``RETAIN_INTERVAL`` (:meth:`Replicator.apply_retention`), never past what a connected
  peer made durable, nor past the LSN after a snapshot kept for a resumed full sync.
* **Resumed full sync** (wire version 2). The target records durable progress every
  ``SNAPSHOT_PROGRESS_BYTES`` (``store.save_snapshot_progress``) and a later link asks to
  resume; the source keeps the export of an interrupted transfer ``SNAPSHOT_KEEP_SECONDS``.
* **A damaged log** cut at open (``store.damage``, node.py opens the store so when a peer is
  configured): the node starts Inconsistent and secondary and fetches the range like any
  catch-up; the marker is cleared once UpToDate (metadata saved first).
* **TLS** (``replication.tls``): every connection is upgraded to mutual TLS (node certificates
  verified against ``tls_ca`` both ways, the name checked against ``tls_peer_name``) before the
  HMAC handshake, which runs inside it unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from mailharbor.repl import wire
from mailharbor.repl.barrier import BarrierCore, BarrierMode, BarrierOutcome, Failed, Released
from mailharbor.repl.generations import (
    Action,
    Branch,
    Generation,
    HistoryError,
    NodeView,
    Outcome,
    extend_history,
    truncate_history,
)
from mailharbor.repl.role import RoleChange, RoleController, RoleError, RoleFacts
from mailharbor.repl.session import (
    Acked,
    BranchComplete,
    BranchFrames,
    CutTail,
    Decision,
    DiskChanged,
    HandshakeDone,
    IngestFrames,
    LinkLost,
    NeedDigest,
    NeedFrames,
    NeedSnapshot,
    NeedSnapshotData,
    PeerDiskChanged,
    PeerInSync,
    PeerRefused,
    PeerStateReceived,
    Phase,
    ProtocolViolation,
    ReplSession,
    SendBytes,
    SessionConfig,
    SessionUsageError,
    SnapshotBegin,
    SnapshotChunk,
    SnapshotInstall,
    SnapshotProgress,
    SnapshotSent,
    VerifyDone,
    VerifyResult,
)
from mailharbor.repl.state import (
    ConnectionState,
    DiskState,
    FencingPolicy,
    ReplicationState,
    Role,
    SplitBrainPolicy,
)
from mailharbor.repl.state import (
    Protocol as ReplProtocol,
)
from mailharbor.server.listener import split_endpoint
from mailharbor.service.merge import BranchSpool, MergeError, merge_branch
from mailharbor.store import (
    DamageReport,
    DurabilityBarrier,
    Store,
    StoreError,
    StoreIOError,
    StoreState,
)
from mailharbor.store.store import SnapshotExport

__all__ = [
    "AsyncBarrier",
    "ReplSettings",
    "ReplStore",
    "Replicator",
    "RoleError",
    "RoleHooks",
    "settings_hash",
]

log = logging.getLogger("mailharbor.repl")

#: Reconnect refusals that the roles settle by themselves (the link keeps retrying; any other
#: refusal leaves the link StandAlone until `repl connect`).
TRANSIENT_REFUSALS = frozenset({"rule:both-primary"})

#: Reconnect backoff bounds (seconds); each wait gets up to 50 % random jitter.
BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0
CONNECT_TIMEOUT = 5.0
#: Unauthenticated connections handled at once (each ends at the handshake timeout).
MAX_PENDING_LINKS = 4
#: Bytes a link buffers before its session exists (nothing but a HELLO is expected then).
EARLY_LIMIT = 64 * 1024
META_VERSION = 1
#: How long `repl verify` waits for the whole comparison.
VERIFY_TIMEOUT = 600.0
#: How often a primary applies the retention horizon (``replication.retain_bytes``).
RETAIN_INTERVAL = 1.0
#: Full sync, target: received snapshot bytes between two durable progress records (what an
#: interrupted transfer resumes from).
SNAPSHOT_PROGRESS_BYTES = 4 * 1024 * 1024
#: Full sync, source: how long the snapshot of an interrupted transfer is kept for a resume.
SNAPSHOT_KEEP_SECONDS = 600.0


class ReplStore(Protocol):
    """What the adapter needs of the store (``mailharbor.store.Store`` provides it)."""

    node_id: bytes
    data_dir: str
    generation: int
    state: StoreState
    barrier: DurabilityBarrier | None

    @property
    def last_lsn(self) -> int: ...

    @property
    def durable_lsn(self) -> int: ...

    @property
    def visible_lsn(self) -> int: ...

    @property
    def first_retained_lsn(self) -> int: ...

    def read_frames(self, from_lsn: int, *, durable: bool = False) -> Iterator[bytes]: ...

    def ingest_nowait(self, frames: Sequence[bytes]) -> int: ...

    def flushed_future(self) -> asyncio.Future[None]: ...

    def add_durable_listener(self, cb: Callable[[int], None]) -> None: ...

    async def settle(self) -> None: ...

    def add_frame_listener(self, cb: Callable[[int, bytes], None]) -> None: ...

    def cut_tail(self, after_lsn: int, quarantine_path: str) -> int: ...

    def logical_digest(self, first_lsn: int, last_lsn: int, *, durable: bool = False) -> bytes: ...

    def load_repl_meta(self) -> bytes | None: ...

    def save_repl_meta(self, data: bytes) -> None: ...

    def begin_generation(self, gen: int) -> None: ...

    def freeze_writes(self, reason: str) -> None: ...

    def thaw_writes(self) -> None: ...

    def generation_history(self) -> list[tuple[int, int, bytes]]: ...

    retain_from: int

    def drop_head(self, before_lsn: int) -> int: ...

    def head_drop_point(self, keep_bytes: int) -> int: ...

    def export_snapshot(self) -> SnapshotExport: ...

    def begin_snapshot_install(self) -> None: ...

    def write_snapshot_file(self, name: str, offset: int, data: bytes) -> None: ...

    def install_snapshot(self) -> object: ...

    def save_snapshot_progress(self, token: bytes) -> list[tuple[str, int]]: ...

    def load_snapshot_progress(self) -> tuple[bytes, list[tuple[str, int]]] | None: ...

    def resume_snapshot_install(self, files: Sequence[tuple[str, int]]) -> None: ...

    @property
    def damage(self) -> DamageReport | None: ...

    def clear_damage(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ReplSettings:
    """The ``[replication]`` section, resolved (secret read) by the node."""

    name: str
    node_id: bytes
    listen: str
    peer: str
    secret: bytes
    protocol: ReplProtocol = ReplProtocol.C
    role: Role = Role.SECONDARY
    fencing: FencingPolicy = FencingPolicy.DONT_CARE
    split_brain: SplitBrainPolicy = SplitBrainPolicy.MERGE
    ack_timeout: float = 6.0
    ping_interval: float = 2.0
    ping_timeout: float = 4.0
    resync_rate: int = 0
    #: The retention horizon: a primary keeps at least this many bytes of its newest log
    #: segments and drops older ones the peer has acknowledged (0: never drop the head). A
    #: peer that falls behind the horizon gets a full sync.
    retain_bytes: int = 0
    #: False when the cluster manager decides the role: ``role = primary`` then only makes the
    #: first start UpToDate (the first node of a pair); the node starts secondary.
    auto_promote: bool = True
    #: TLS on the peer link (``replication.tls``): this node's certificate (chain) and key, the
    #: CA bundle the peer's certificate must chain to (both directions: mutual), and the name
    #: the peer's certificate must carry in its subjectAltName ("": any the CA issued).
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_peer_name: str = ""


class PeerTlsError(Exception):
    """The peer link's TLS material cannot be loaded (the node refuses to start)."""


def peer_tls_contexts(cert: str, key: str, ca: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts for the peer link: TLS 1.2 or newer, this node's certificate
    presented both ways, the peer's verified against ``ca`` both ways (a connecting peer
    without a certificate of that CA is refused). Host names are checked by the adapter
    against ``replication.tls_peer_name`` (the same rule for both directions), not by ssl."""
    out = []
    for purpose in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
        ctx = ssl.SSLContext(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_NO_COMPRESSION
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_cert_chain(certfile=cert, keyfile=key)
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as e:
            raise PeerTlsError(f"replication TLS: cannot load {cert}, {key} or {ca}: {e}") from e
        out.append(ctx)
    return out[0], out[1]


def certificate_names(peercert: object) -> list[str]:
    """The DNS names and IP addresses of a certificate's subjectAltName, as
    ``SSLObject.getpeercert()`` returns it."""
    if not isinstance(peercert, dict):
        return []
    names = []
    for entry in peercert.get("subjectAltName", ()):
        if isinstance(entry, tuple) and len(entry) == 2 and entry[0] in ("DNS", "IP Address"):
            names.append(str(entry[1]))
    return names


@dataclass(frozen=True, slots=True)
class RoleHooks:
    """The node's services, started on promotion and stopped (gracefully) on demotion."""

    start_services: Callable[[], Awaitable[None]]
    stop_services: Callable[[], Awaitable[None]]


def settings_hash(s: ReplSettings) -> bytes:
    """The hash of the cluster-wide settings; a pair that disagrees refuses to connect."""
    data = {
        "v": 1,
        "protocol": s.protocol.value,
        "split_brain": s.split_brain.value,
        "fencing": s.fencing.value,
        "ack_timeout": s.ack_timeout,
        "ping_interval": s.ping_interval,
        "ping_timeout": s.ping_timeout,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).digest()


class AsyncBarrier:
    """``store.DurabilityBarrier`` over :class:`BarrierCore`: futures keyed by token."""

    def __init__(self, core: BarrierCore) -> None:
        self.core = core
        self._futures: dict[int, asyncio.Future[None]] = {}

    async def wait(self, lsn: int) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        token, outcomes = self.core.add_waiter(lsn)
        self._futures[token] = fut
        self.dispatch(outcomes)
        try:
            await fut
        finally:
            if self._futures.pop(token, None) is not None:
                self.core.cancel(token)

    def try_release(self, lsn: int) -> bool:
        return self.core.try_release(lsn)

    def dispatch(self, outcomes: Sequence[BarrierOutcome]) -> None:
        for o in outcomes:
            fut = self._futures.pop(o.token, None)
            if fut is None or fut.done():
                continue
            if isinstance(o, Released):
                fut.set_result(None)
            elif isinstance(o, Failed):
                fut.set_exception(RuntimeError(f"replication: write not acknowledged: {o.reason}"))


class _LinkIO(asyncio.BufferedProtocol):
    """One peer connection's socket side. The transport receives straight into the session's
    input buffer (``ReplSession.get_buffer``: one copy, the kernel's; a StreamReader copied
    every byte twice more and allocated as it went, which a resync's gigabytes paid for).
    Until a session is attached (the TLS handshake, the link being set up) up to
    :data:`EARLY_LIMIT` bytes are kept and fed to it on attach; more drops the connection.

    ``on_input(eof)`` runs after bytes reached the session (``eof``: the stream ended or the
    connection was lost; the session has had its ``receive_eof``), once per receive.
    ``paused`` is asyncio's write flow control (the transport buffers more than its high-water
    mark); ``on_writable`` runs when it resumes."""

    def __init__(self, on_connect: Callable[[_LinkIO], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self._on_connect = on_connect
        self._session: ReplSession | None = None
        self._on_input: Callable[[bool], None] | None = None
        self._early = bytearray()
        self._scratch = bytearray(EARLY_LIMIT)
        self._ended = False
        self.paused = False
        self.on_writable: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self._on_connect is not None:
            self._on_connect(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._session is not None:
            return self._session.get_buffer(sizehint)
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        s, cb = self._session, self._on_input
        if s is None or cb is None:
            self._early += memoryview(self._scratch)[:nbytes]
            if len(self._early) > EARLY_LIMIT:
                self.close()
            return
        s.buffer_updated(nbytes)
        cb(False)

    def eof_received(self) -> bool | None:
        self._end()
        return None  # the transport closes itself

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.on_writable is not None:
            self.on_writable()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        s, cb = self._session, self._on_input
        if s is not None and cb is not None:
            s.receive_eof()
            cb(True)

    def attach(self, session: ReplSession, on_input: Callable[[bool], None]) -> None:
        """From now on bytes go to ``session``; the ones that came early first."""
        self._session, self._on_input = session, on_input
        early, self._early = self._early, bytearray()
        if early:
            session.receive_data(early)
            on_input(False)
        if self._ended:
            self._ended = False
            self._end()

    def write(self, data: bytes | bytearray) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def get_extra_info(self, name: str) -> object:
        return None if self.transport is None else self.transport.get_extra_info(name)


@dataclass(eq=False)
class _Link:
    """One TCP connection and its session."""

    session: ReplSession
    io: _LinkIO
    initiator: bool
    peer_addr: str
    peer_id: bytes | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    ingest_q: list[IngestFrames] = field(default_factory=list)
    ingest_wake: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    sync_started: float | None = None
    sync_start_lsn: int = 0
    sync_bytes: int = 0
    closed: bool = False
    processing: bool = False
    timer_at: float | None = None  # the deadline the timer loop sleeps until (None: awake)
    ingest_task: asyncio.Task[None] | None = None  # not cancelled with the link (see _link_gone)
    # Frames appended to the store, not yet durable: (last LSN, frames) per batch, acknowledged
    # by _on_durable when the store's fsync covers them.
    unsynced: deque[tuple[int, list[bytes]]] = field(default_factory=deque)
    snap_export: SnapshotExport | None = None  # full sync, source: the snapshot being sent
    # The log read of the last NeedFrames, kept open for the next one (a resync reads the log
    # in chunks; a fresh read_frames would scan its segment from the start every time).
    frame_iter: Iterator[bytes] | None = None
    frame_iter_next: int = 0
    tls: str = ""  # the TLS version of the connection ("" without TLS)
    # A NeedFrames held while the socket's write buffer is full: served when it drains (the
    # frames then go to the socket, not to a growing copy in asyncio's write buffer).
    need_later: NeedFrames | None = None


def _close_iter(it: Iterator[bytes] | None) -> None:
    """Close a log read (its segment file) now rather than when it is collected."""
    if isinstance(it, Generator):
        it.close()


class Replicator:
    """See the module docstring."""

    def __init__(
        self,
        store: ReplStore,
        settings: ReplSettings,
        hooks: RoleHooks,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.settings = settings
        self.hooks = hooks
        self.clock = clock
        self.node_id = settings.node_id
        self.core = BarrierCore(settings.protocol, settings.fencing)
        self.barrier = AsyncBarrier(self.core)
        self.roles = RoleController(Role.SECONDARY)
        self.disk = DiskState.OUTDATED
        self.history: tuple[Generation, ...] = ()
        self.peer_max_generation = 0
        self.peer_id: bytes | None = None
        self.peer_view: NodeView | None = None
        self.peer_disk: DiskState | None = None
        self.last_rule = ""
        self.last_link_lost = ""
        self.standalone = False
        self.standalone_reason = ""
        self.frozen_since: float | None = None
        self._hold: str = ""
        self._links: list[_Link] = []
        self._active: _Link | None = None
        self._server: asyncio.Server | None = None
        self._accepting: set[asyncio.Task[None]] = set()
        self._connect_task: asyncio.Task[None] | None = None
        self._auto_task: asyncio.Task[None] | None = None
        self._gen_task: asyncio.Task[None] | None = None
        self._first_start = False
        self._connect_wake = asyncio.Event()
        self._outbound: _Link | None = None
        self._stopping = False
        self._verify: asyncio.Future[dict[str, object]] | None = None
        self._verify_results: list[tuple[int, int, bool | None]] = []
        self._role_lock = asyncio.Lock()
        self._hash = settings_hash(settings)
        # split-brain merge (the winner's side) and the operator's one-shot resolutions
        self._merge_spool: tuple[_Link, BranchSpool] | None = None
        self._merge_ready: list[tuple[str, bytes]] = []  # complete spools not merged yet
        # spool path -> the link whose peer waits for MERGE_DONE, and the branch's last LSN
        self._merge_confirm: dict[str, tuple[_Link, int]] = {}
        self._merge_task: asyncio.Task[None] | None = None
        self.last_merge: dict[str, object] | None = None
        self._discard_my_data = False
        self._policy_override: SplitBrainPolicy | None = None
        self._appended: list[bytes] = []  # frames appended this loop iteration, not shipped
        self._draining: set[asyncio.Task[None]] = set()  # ingest tasks of dropped links
        self._ingesting: set[_Link] = set()  # links with ingested frames not yet durable
        # full sync: asked by `repl invalidate` (until UpToDate); a snapshot being received
        # (from SnapshotBegin until installed: no promotion, not even forced)
        self._want_full_sync = False
        self._snapshot_pending = False
        self._retain_task: asyncio.Task[None] | None = None
        self._tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None
        self._tls_pending = 0
        # full sync, source: the snapshot of an interrupted transfer (id, export, since), kept
        # SNAPSHOT_KEEP_SECONDS for a resume; target: the id of the snapshot being received and
        # the bytes covered by its last durable progress record
        self._kept_snapshot: tuple[bytes, SnapshotExport, float] | None = None
        self._recv_snapshot_id = b""
        self._recv_progress_at = 0
        if settings.tls_cert:
            self._tls = peer_tls_contexts(settings.tls_cert, settings.tls_key, settings.tls_ca)

    # -- lifetime ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the metadata, set the barrier, listen, connect; promote if configured so."""
        start_role = self._load_meta()
        self.store.barrier = self.barrier
        self.store.add_frame_listener(self._on_frame)
        self.store.add_durable_listener(self._on_durable)
        host, port = split_endpoint(self.settings.listen)
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _LinkIO(self._accepted), host, port
        )
        log.info(
            "replication: %s listening on %s, peer %s, protocol %s, disk %s, fencing %s%s",
            self.settings.name,
            self.settings.listen,
            self.settings.peer,
            self.settings.protocol.value,
            self.disk.value,
            self.settings.fencing.value,
            ", TLS" if self._tls is not None else "",
        )
        self._save_meta()
        loop = asyncio.get_running_loop()
        self._connect_task = loop.create_task(self._connect_loop())
        if self.settings.retain_bytes > 0:
            self._retain_task = loop.create_task(self._retain_loop())
        if start_role is Role.PRIMARY and self.settings.auto_promote:
            if self._first_start:
                await self.promote(force=False, reason="replication.role = primary, first start")
            else:
                self._auto_task = loop.create_task(self._auto_promote())

    async def stop(self) -> None:
        """Close the link and the listener (the node stopped its services before)."""
        await self._drain_peer()
        self._stopping = True
        if self._auto_task is not None:
            self._auto_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._auto_task
            self._auto_task = None
        if self._retain_task is not None:
            self._retain_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._retain_task
        if self._gen_task is not None:
            self._gen_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._gen_task
        if self._merge_task is not None:  # a merge cut short resumes from its journal
            self._merge_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._merge_task
        if self._connect_task is not None:
            self._connect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connect_task
            self._connect_task = None
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        for link in list(self._links):
            self._close_link(link, "shutdown")
        for link in list(self._links):
            await self._finish_link(link)
        self._keep_snapshot(b"", None)
        await self._ingest_drained()
        if self.roles.role is Role.PRIMARY:
            self._end_mirroring("shutdown")
            if self.core.pending:
                self.barrier.dispatch(self.core.fail_pending("node stopping"))
        with contextlib.suppress(Exception):
            self._save_meta()
        if self._verify is not None and not self._verify.done():
            self._verify.set_exception(RoleError("the node is stopping"))

    async def _drain_peer(self) -> None:
        """A clean stop of a primary: first wait (at most ``ack_timeout``) until the peer has
        fsynced everything this node wrote. Protocols A and B acknowledge before that; without
        the wait, a promoted secondary could lack mail acknowledged just before the stop."""
        self._ship_appended()
        link = self._active
        if self.roles.role is not Role.PRIMARY or link is None:
            return
        target = self.store.last_lsn
        deadline = self.clock() + self.settings.ack_timeout
        while (
            link is self._active
            and link.session.phase is Phase.ESTABLISHED
            and link.session.peer_durable < target
            and self.clock() < deadline
        ):
            await asyncio.sleep(0.005)

    # -- metadata ------------------------------------------------------------------------------

    def _load_meta(self) -> Role:
        """Derive the history from the log (plus the saved mirrored ranges), the disk state and
        the role to start in."""
        raw = self.store.load_repl_meta()
        meta: dict[str, object] = {}
        if raw:
            try:
                loaded = json.loads(raw)
                if isinstance(loaded, dict) and loaded.get("version") == META_VERSION:
                    meta = loaded
                else:
                    log.warning("replication metadata of an unknown version ignored")
            except ValueError:
                log.warning("replication metadata unreadable, ignored")
        saved: dict[tuple[int, int], Generation] = {}
        hist = meta.get("history")
        if isinstance(hist, list):
            for h in hist:
                try:
                    g = Generation(
                        int(h[0]),
                        int(h[1]),
                        bytes.fromhex(str(h[2])),
                        None if h[3] is None else int(h[3]),
                        None if h[4] is None else int(h[4]),
                    )
                except (TypeError, ValueError, IndexError):
                    continue
                saved[(g.number, g.first_lsn)] = g
        last = self.store.last_lsn
        out: list[Generation] = []
        for number, first, origin in self.store.generation_history():
            g0 = saved.get((number, first))
            if g0 is None or g0.origin != origin:
                g0 = Generation(number, first, origin)
            if out and (number <= out[-1].number or g0.key == out[-1].key):
                continue
            out.append(g0)
        # Our own begun generation, nothing written in it yet (not in the log's history).
        tail = [g for g in saved.values() if g.first_lsn > last and g.origin == self.node_id]
        for g in sorted(tail, key=lambda g: g.number):
            if not out or g.number > out[-1].number:
                out.append(g)
        self.history = tuple(out)
        self._want_full_sync = meta.get("full_sync") is True
        self._snapshot_pending = meta.get("snapshot_pending") is True
        peer_gen = meta.get("peer_max_generation")
        self.peer_max_generation = peer_gen if isinstance(peer_gen, int) else 0
        saved_role = meta.get("role")
        disk_name = meta.get("disk")
        want = self.settings.role
        damage = self.store.damage
        if damage is not None:
            # A damaged range was cut away at open (store.damage, persisted until fetched):
            # records above it may be missing here — Inconsistent, never promoted by itself,
            # fetched from the peer (docs/replication.md, "A damaged log").
            log.error(
                "replication: the log was cut after LSN %d at a damaged frame (raw bytes kept "
                "in %s): disk Inconsistent until the range is fetched from the peer",
                damage.after_lsn,
                damage.kept_in or "?",
            )
            self.disk = DiskState.INCONSISTENT
            if not meta:
                self._first_start = True
            return Role.SECONDARY
        if not meta:
            self._first_start = True
            if want is Role.PRIMARY:
                self.disk = DiskState.UP_TO_DATE
            else:
                self.disk = DiskState.OUTDATED if last else DiskState.INCONSISTENT
            return want
        try:
            disk = DiskState(disk_name)
        except ValueError:
            disk = DiskState.OUTDATED
        if disk is DiskState.DISKLESS:
            # Detached after a disk error; the store opened again: a consistent prefix.
            disk = DiskState.OUTDATED
        if saved_role != Role.PRIMARY.value and disk is DiskState.UP_TO_DATE:
            # A secondary cannot know what its peer acknowledged while it was down.
            disk = DiskState.OUTDATED
        self.disk = disk
        if want is Role.PRIMARY:
            if saved_role == Role.PRIMARY.value and disk is DiskState.UP_TO_DATE:
                return Role.PRIMARY
            log.warning(
                "replication: starting as secondary although replication.role = primary: this "
                "node was %s with disk %s when it stopped (no automatic failback; use `repl "
                "primary` once it is safe)",
                "primary" if saved_role == Role.PRIMARY.value else "secondary",
                disk.value,
            )
        return Role.SECONDARY

    def _meta_bytes(self) -> bytes:
        data = {
            "version": META_VERSION,
            "node_id": self.node_id.hex(),
            "role": self.roles.role.value,
            "disk": self.disk.value,
            "peer_id": self.peer_id.hex() if self.peer_id else None,
            "peer_max_generation": self.peer_max_generation,
            "history": [
                [g.number, g.first_lsn, g.origin.hex(), g.mirrored_from, g.mirrored_until]
                for g in self.history
            ],
            "full_sync": self._want_full_sync,
            "snapshot_pending": self._snapshot_pending,
            "saved_at": round(time.time(), 3),
        }
        return json.dumps(data, sort_keys=True).encode()

    def _save_meta(self) -> None:
        self.store.save_repl_meta(self._meta_bytes())

    # -- views ---------------------------------------------------------------------------------

    @property
    def role(self) -> Role:
        return self.roles.role

    def is_primary(self) -> bool:
        return self.roles.role is Role.PRIMARY

    def view(self) -> NodeView:
        last = self.store.last_lsn
        hist = tuple(g for g in self.history if g.first_lsn <= last + 1)
        if self._want_full_sync and self.roles.role is Role.SECONDARY:
            # Invalidated: whatever the store still holds is to be replaced by a snapshot.
            return NodeView(self.node_id, self.roles.role, self.disk, (), 0, 1)
        return NodeView(
            node_id=self.node_id,
            role=self.roles.role,
            disk=self.disk,
            history=hist,
            last_lsn=last,
            first_retained_lsn=max(1, self.store.first_retained_lsn),
            discard_my_data=self._discard_my_data,
        )

    def _max_generation(self) -> int:
        return max(
            [self.store.generation, self.peer_max_generation, *(g.number for g in self.history)]
        )

    def _session_config(self) -> SessionConfig:
        s = self.settings
        return SessionConfig(
            node_id=self.node_id,
            secret=s.secret,
            settings_hash=self._hash,
            protocol=s.protocol,
            split_brain=self._policy_override or s.split_brain,
            term=max([0, *(g.number for g in self.history)]),
            ack_timeout=s.ack_timeout,
            ping_interval=s.ping_interval,
            ping_timeout=s.ping_timeout,
            resync_rate=s.resync_rate or None,
            full_sync=self._want_full_sync,
            snapshot_resume=self._snapshot_progress(),
        )

    def _snapshot_progress(self) -> SnapshotProgress | None:
        """What this node durably holds of a snapshot it was receiving (to resume it)."""
        if not self._snapshot_pending:
            return None
        got = self.store.load_snapshot_progress()
        if got is None:
            return None
        return SnapshotProgress(got[0], tuple(got[1]))

    def _keep_snapshot(self, sid: bytes, exp: SnapshotExport | None) -> None:
        """Keep (or, with None, release) the snapshot of an interrupted transfer."""
        old = self._kept_snapshot
        if old is not None and old[1] is not exp:
            old[1].close()
        if exp is not None and not sid:  # a version 1 link: nothing can resume it
            exp.close()
            exp = None
        self._kept_snapshot = (sid, exp, self.clock()) if exp is not None else None

    def _expire_kept_snapshot(self) -> None:
        kept = self._kept_snapshot
        if kept is not None and self.clock() - kept[2] > SNAPSHOT_KEEP_SECONDS:
            log.info("replication: the snapshot kept for a resumed full sync expired")
            self._keep_snapshot(b"", None)

    # -- connections ---------------------------------------------------------------------------

    def _accepted(self, io: _LinkIO) -> None:
        task = asyncio.get_running_loop().create_task(self._accept(io))
        self._accepting.add(task)
        task.add_done_callback(self._accepting.discard)

    async def _accept(self, io: _LinkIO) -> None:
        peer = io.get_extra_info("peername")
        addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        pending = self._tls_pending + sum(1 for x in self._links if x.peer_id is None)
        if self._stopping or self.standalone or pending >= MAX_PENDING_LINKS:
            io.close()
            return
        tls = ""
        if self._tls is not None:
            self._tls_pending += 1  # handshakes in progress count as pending links
            try:
                got = await self._tls_upgrade(io, addr, server_side=True)
            finally:
                self._tls_pending -= 1
            if got is None or self._stopping:
                io.close()
                return
            tls = got
        await self._ingest_drained()
        link = self._new_link(io, initiator=False, addr=addr)
        link.tls = tls
        await link.done.wait()

    async def _tls_upgrade(self, io: _LinkIO, addr: str, *, server_side: bool) -> str | None:
        """TLS on a fresh peer connection (mutual: both certificates verified against the CA),
        then the peer's certificate name checked against ``tls_peer_name``. Returns the TLS
        version, or None when refused (logged; the socket is closed). The HMAC handshake
        follows inside TLS as without it."""
        assert self._tls is not None
        ctx = self._tls[0] if server_side else self._tls[1]
        want = self.settings.tls_peer_name
        assert io.transport is not None
        try:
            transport = await asyncio.get_running_loop().start_tls(
                io.transport,
                io,
                ctx,
                server_side=server_side,
                server_hostname=None if server_side else (want or None),
                ssl_handshake_timeout=CONNECT_TIMEOUT,
            )
        except (ssl.SSLError, OSError, TimeoutError, ValueError) as e:
            reason = getattr(e, "reason", None) or type(e).__name__
            log.warning("replication: TLS with %s refused: %s", addr, reason)
            io.close()
            return None
        if transport is None:  # the connection went away during the handshake
            io.close()
            return None
        io.transport = transport
        names = certificate_names(io.get_extra_info("peercert"))
        if want and want.casefold() not in (n.casefold() for n in names):
            log.warning(
                "replication: TLS with %s refused: its certificate names %s, not %s",
                addr,
                ", ".join(names) or "nothing",
                want,
            )
            io.close()
            return None
        obj = io.get_extra_info("ssl_object")
        version = obj.version() if isinstance(obj, ssl.SSLObject) else None
        return version or "TLS"

    async def _connect_loop(self) -> None:
        backoff = BACKOFF_MIN
        host, port = split_endpoint(self.settings.peer)
        while not self._stopping:
            self._expire_kept_snapshot()  # about once a second while a link is up
            if self.standalone or self._active is not None or self._outbound is not None:
                self._connect_wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._connect_wake.wait(), 1.0)
                continue
            try:
                _, io = await asyncio.wait_for(
                    asyncio.get_running_loop().create_connection(
                        _LinkIO, host or "127.0.0.1", port
                    ),
                    CONNECT_TIMEOUT,
                )
            except (OSError, TimeoutError) as e:
                log.debug("replication: connecting to %s failed: %s", self.settings.peer, e)
                self._connect_wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._connect_wake.wait(), backoff * (1 + random.random() / 2)
                    )
                backoff = min(BACKOFF_MAX, backoff * 2)
                continue
            tls = ""
            if self._tls is not None:
                got = await self._tls_upgrade(io, self.settings.peer, server_side=False)
                if got is None:
                    self._connect_wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._connect_wake.wait(), backoff * (1 + random.random() / 2)
                        )
                    backoff = min(BACKOFF_MAX, backoff * 2)
                    continue
                tls = got
            await self._ingest_drained()
            link = self._new_link(io, initiator=True, addr=self.settings.peer)
            link.tls = tls
            self._outbound = link
            try:
                await link.done.wait()
            finally:
                self._outbound = None
            if link.peer_id is None or link.session.close_reason in (
                "handshake-refused",
                "peer-refused",
                "protocol-violation",
                "handshake-timeout",
            ):
                await asyncio.sleep(backoff * (1 + random.random() / 2))
                backoff = min(BACKOFF_MAX, backoff * 2)
            else:
                backoff = BACKOFF_MIN

    def _new_link(self, io: _LinkIO, *, initiator: bool, addr: str) -> _Link:
        self._ship_appended()  # the new session's view includes them
        session = ReplSession(
            self._session_config(), self.view(), self.clock, nonce=os.urandom(wire.NONCE_SIZE)
        )
        link = _Link(session, io, initiator, addr)
        self._links.append(link)
        loop = asyncio.get_running_loop()
        link.ingest_task = loop.create_task(self._ingest_loop(link))
        link.tasks = [loop.create_task(self._timer_loop(link))]
        session.start()
        self._process(link)
        io.attach(session, lambda eof: self._on_input(link, eof))
        io.on_writable = lambda: self._on_writable(link)
        return link

    def _on_writable(self, link: _Link) -> None:
        """The socket took what asyncio buffered: serve a held NeedFrames."""
        ev, link.need_later = link.need_later, None
        if ev is None or link.closed:
            return
        if link.processing:  # resumed from inside a write of ours: after it
            asyncio.get_running_loop().call_soon(self._serve_need, link, ev)
        else:
            self._serve_need(link, ev)

    def _serve_need(self, link: _Link, ev: NeedFrames) -> None:
        if link.closed or link.session.phase is Phase.CLOSED:
            return
        link.session.send_frames(self._read_frames(link, ev.from_lsn, ev.max_bytes))
        self._process(link)

    def _on_input(self, link: _Link, eof: bool) -> None:
        """The peer's bytes (or the end of its stream) reached the session."""
        if link.closed:
            return  # the transport's last callbacks after we dropped the link
        self._process(link)
        if eof and not link.closed:
            self._close_link(link, "connection closed")

    async def _timer_loop(self, link: _Link) -> None:
        s = link.session
        while s.phase is not Phase.CLOSED:
            deadline = s.next_deadline()
            if deadline is None:
                break
            delay = deadline - self.clock()
            if delay > 0:
                link.wake.clear()
                link.timer_at = deadline
                try:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(link.wake.wait(), delay)
                finally:
                    link.timer_at = None
                continue
            s.tick()
            self._process(link)
            if s.next_deadline() == deadline:
                await asyncio.sleep(0.01)  # nothing moved: do not spin

    async def _ingest_loop(self, link: _Link) -> None:
        """Write the peer's frames in order, pipelined: each batch received is verified and
        appended at once (written, or queued to the store's flusher thread if big) while the
        batches before it are still being written and fsynced. Every fsync that completes makes
        the batches it covers durable (:meth:`_on_durable`: history noted, FRAMES_DURABLE) right
        away, before the store applies them. So the disk never waits for the event loop nor the
        event loop for the disk. The loop waits on the store's flush futures only to learn of
        errors and to know when all is written: after the link is lost it still writes what was
        received (protocol B acknowledged it on receipt), then ends."""
        s = link.session
        flush: asyncio.Future[None] | None = None
        try:
            while True:
                while link.ingest_q:
                    batch, link.ingest_q = link.ingest_q, []
                    frames = [f for b in batch for f in b.frames]
                    last = batch[-1].first_lsn + len(batch[-1].frames) - 1
                    try:
                        self.store.ingest_nowait(frames)
                    except Exception as e:
                        self._ingest_error(link, e)
                        return
                    link.unsynced.append((last, frames))
                    self._ingesting.add(link)
                if flush is None and link.unsynced:
                    try:
                        flush = self.store.flushed_future()
                    except Exception as e:
                        self._ingest_error(link, e)
                        return
                    flush.add_done_callback(lambda _: link.ingest_wake.set())
                if flush is None and (s.phase is Phase.CLOSED or link.closed):
                    return
                if flush is None or not flush.done():
                    # More frames (appended while the flush goes on) or the flush's end.
                    link.ingest_wake.clear()
                    await link.ingest_wake.wait()
                    continue
                try:
                    flush.result()
                except Exception as e:
                    self._ingest_error(link, e)
                    return
                finally:
                    flush = None
                self._frames_durable(link, self.store.durable_lsn)  # if not done already
        finally:
            if flush is not None:  # leaving on an error: nobody waits for it any more
                flush.cancel()
            # Whatever is still unsynced was not made durable: never acknowledged.
            link.unsynced.clear()
            self._ingesting.discard(link)

    def _on_durable(self, lsn: int) -> None:
        """The store's durable listener: its log is fsynced up to ``lsn``, and the batch is not
        applied yet. The peer's frames it covers are acknowledged now (fsync, acknowledge,
        apply: the apply is not on the primary's commit path)."""
        for link in list(self._ingesting):
            self._frames_durable(link, lsn)

    def _frames_durable(self, link: _Link, lsn: int) -> None:
        """``link``'s ingested batches up to ``lsn`` are durable: note their history, send
        FRAMES_DURABLE (the acknowledgement) for the last of them."""
        durable: list[bytes] = []
        target = 0
        while link.unsynced and link.unsynced[0][0] <= lsn:
            target, frames = link.unsynced.popleft()
            durable += frames
        if not link.unsynced:
            self._ingesting.discard(link)
        if not durable:
            return
        self._note_ingested(durable)
        link.sync_bytes += wire.frames_size(durable)
        link.session.frames_durable(target)
        self._process(link)

    def _ingest_error(self, link: _Link, e: BaseException) -> None:
        """Storing the peer's frames failed: a disk error detaches this node's disk (DRBD's
        on-io-error=detach); frames the store refused drop the link (REFUSE(INGEST))."""
        if self._is_disk_error(e):
            self._detach(link, e)
            return
        log.error("replication: storing the peer's frames failed: %s", e)
        link.session.ingest_failed()
        self._process(link)

    def _note_ingested(self, frames: Sequence[bytes]) -> None:
        hist = self.history
        for raw in frames:
            info = wire.peek_frame(raw)
            try:
                hist = extend_history(hist, info.generation, info.lsn, info.origin)
            except HistoryError:
                # An empty generation of ours (begun, never written) is superseded.
                hist = truncate_history(hist, info.lsn - 1)
                hist = extend_history(hist, info.generation, info.lsn, info.origin)
        if hist != self.history:
            self.history = hist
            self._save_meta()

    def _close_link(self, link: _Link, reason: str) -> None:
        """Drop ``link`` on purpose: REFUSE(SHUTDOWN) goes out, then LinkLost is handled."""
        if link.session.phase is not Phase.CLOSED:
            link.session.close(reason)
            self._process(link)  # LinkLost -> _on_link_lost -> _link_gone
        elif not link.processing:
            self._link_gone(link)

    def _link_gone(self, link: _Link) -> None:
        if link.closed:
            return
        link.closed = True
        _close_iter(link.frame_iter)
        link.frame_iter = None
        if link.snap_export is not None:
            # A transfer cut short: keep its snapshot a while, the target may resume it.
            self._keep_snapshot(link.session.snapshot_id, link.snap_export)
            link.snap_export = None
        with contextlib.suppress(Exception):
            link.io.close()
        link.wake.set()
        link.ingest_wake.set()
        current = asyncio.current_task()
        for t in link.tasks:
            if t is not current:
                t.cancel()
        if link.ingest_task is not None and not link.ingest_task.done():
            self._draining.add(link.ingest_task)  # ends once the received frames are written
        if link in self._links:
            self._links.remove(link)
        link.done.set()
        self._connect_wake.set()

    async def _ingest_drained(self) -> None:
        """Wait until dropped links wrote the frames they received: before a new link starts
        from the log's end, a promotion, an invalidation, the store's close."""
        while self._draining:
            task = self._draining.pop()
            await asyncio.wait({task})

    async def _finish_link(self, link: _Link) -> None:
        for t in link.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    # -- the frame listener --------------------------------------------------------------------

    def _on_frame(self, lsn: int, frame: bytes) -> None:
        """Collect the frames the store appends during one event loop iteration and ship them
        at its end as one FRAMES message (group commit appends several per iteration under
        load: one MAC, one send and one wake-up of the peer for all of them)."""
        if self.roles.role is not Role.PRIMARY or not self._links:
            return  # ingested frames on a secondary; no link (a new one starts after them)
        self._appended.append(frame)
        if len(self._appended) == 1:
            asyncio.get_running_loop().call_soon(self._ship_appended)

    def _ship_appended(self) -> None:
        frames, self._appended = self._appended, []
        if not frames:
            return
        for link in list(self._links):
            if link.session.phase is Phase.CLOSED:
                continue
            try:
                link.session.frames_appended(frames)
            except SessionUsageError as e:
                log.error("replication: link out of step with the log (%s): reconnecting", e)
                self._close_link(link, "out-of-step")
                continue
            self._process(link)

    # -- events --------------------------------------------------------------------------------

    def _process(self, link: _Link) -> None:
        """Act on every pending event of ``link``'s session (not re-entrant: an inner call
        leaves the events to the running loop)."""
        if link.processing:
            return
        link.processing = True
        try:
            while True:
                ev = link.session.next_event()
                if ev is None:
                    break
                try:
                    self._handle(link, ev)
                except SessionUsageError as e:
                    log.error("replication: adapter error (%s): dropping the link", e)
                    link.session.close("adapter-error")
        finally:
            link.processing = False
        # Wake the timer loop only when the session's deadline moved earlier than the one it
        # sleeps until (or the link closed): waking it on every event costs a task per frame.
        at = link.timer_at
        if at is None or (d := link.session.next_deadline()) is None or d < at:
            link.wake.set()

    def _handle(self, link: _Link, ev: object) -> None:
        s = link.session
        if isinstance(ev, SendBytes):
            if not link.closed:
                with contextlib.suppress(Exception):
                    link.io.write(ev.data)
        elif isinstance(ev, HandshakeDone):
            self._on_handshake(link, ev)
        elif isinstance(ev, PeerStateReceived):
            if link is self._active:
                self.peer_view = ev.view
                self.peer_disk = ev.view.disk
                self.peer_max_generation = max(
                    [self.peer_max_generation, *(g.number for g in ev.view.history)]
                )
                if self._hold == "peer-outdated" and ev.view.role is not Role.PRIMARY:
                    log.info("replication: the peer is back and will sync from us: writes resume")
                    self._resume_writes()
        elif isinstance(ev, Decision):
            self._on_decision(link, ev)
        elif isinstance(ev, CutTail):
            self._cut_tail(link, ev.after_lsn)
        elif isinstance(ev, NeedFrames):
            if link.io.paused:
                link.need_later = ev  # _on_writable serves it
            else:
                s.send_frames(self._read_frames(link, ev.from_lsn, ev.max_bytes))
        elif isinstance(ev, IngestFrames):
            if link.sync_started is None:
                link.sync_started = self.clock()
                link.sync_start_lsn = ev.first_lsn - 1
            link.ingest_q.append(ev)
            link.ingest_wake.set()
        elif isinstance(ev, BranchFrames):
            self._on_branch_frames(link, ev)
        elif isinstance(ev, BranchComplete):
            self._on_branch_complete(link, ev)
        elif isinstance(ev, Acked):
            self.barrier.dispatch(self.core.peer_confirmed(ev.lsn))
            # Compaction keeps what the peer may still need (docs/store.md).
            self.store.retain_from = ev.durable_lsn + 1
        elif isinstance(ev, PeerInSync):
            self._on_peer_in_sync(ev.first_live_lsn)
        elif isinstance(ev, DiskChanged):
            if self.disk is not ev.disk:
                log.info("replication: disk %s -> %s", self.disk.value, ev.disk.value)
                self.disk = ev.disk
                if ev.disk is DiskState.UP_TO_DATE:
                    self._want_full_sync = False  # `repl invalidate` done
                self._save_meta()
                if ev.disk is DiskState.UP_TO_DATE and self.store.damage is not None:
                    # Saved UpToDate first: a crash in between finds the marker and resyncs.
                    log.warning(
                        "replication: the damaged range after LSN %d is held again (fetched "
                        "from the peer)",
                        self.store.damage.after_lsn,
                    )
                    self.store.clear_damage()
        elif isinstance(ev, PeerDiskChanged):
            self.peer_disk = ev.disk
            if ev.disk is DiskState.DISKLESS:
                log.error(
                    "replication: the peer detached its disk after a disk error (Diskless): it "
                    "no longer holds a copy; fencing %s applies",
                    self.settings.fencing.value,
                )
            else:
                log.info("replication: peer disk is %s", ev.disk.value)
        elif isinstance(ev, NeedDigest):
            s.provide_digest(ev.first_lsn, ev.last_lsn, self._digest(ev.first_lsn, ev.last_lsn))
        elif isinstance(ev, VerifyResult):
            self._verify_results.append((ev.first_lsn, ev.last_lsn, ev.match))
            if ev.match is False:
                log.error(
                    "replication verify: LSNs %d-%d differ from the peer", ev.first_lsn, ev.last_lsn
                )
        elif isinstance(ev, VerifyDone):
            self._verify_done(ev)
        elif isinstance(ev, ProtocolViolation):
            log.warning(
                "replication: link with %s refused: %s (%s)",
                link.peer_addr,
                ev.detail,
                ev.reason.name,
            )
        elif isinstance(ev, PeerRefused):
            log.warning(
                "replication: the peer at %s refused the link: %s (%s)",
                link.peer_addr,
                ev.detail,
                ev.reason.name,
            )
        elif isinstance(ev, LinkLost):
            self._on_link_lost(link, ev.reason)
        elif isinstance(
            ev,
            SnapshotBegin | SnapshotChunk | SnapshotInstall | NeedSnapshot | NeedSnapshotData,
        ):
            self._on_snapshot_event(link, ev)
        elif isinstance(ev, SnapshotSent):
            total = 0
            if link.snap_export is not None:
                total = link.snap_export.total_bytes
                link.snap_export.close()
                link.snap_export = None
            log.info(
                "replication: snapshot up to LSN %d sent (%d byte(s) on this link, %d of %d "
                "already held by the peer); the peer catches up",
                ev.lsn,
                s.stats_snapshot_bytes,
                s.snapshot_resumed_at,
                total,
            )

    def _read_frames(self, link: _Link, from_lsn: int, max_bytes: int) -> list[bytes]:
        """Up to ``max_bytes`` of frames from ``from_lsn`` on, continuing the previous read of
        ``link`` when it asks for the very next LSN (the iterator ends at the durable LSN taken
        when it began; an ended one is replaced by a fresh read)."""
        it = link.frame_iter
        link.frame_iter = None
        if it is None or link.frame_iter_next != from_lsn:
            _close_iter(it)
            it = iter(self.store.read_frames(from_lsn, durable=True))
        out: list[bytes] = []
        size = 0
        for raw in it:
            out.append(raw)
            size += len(raw)
            if size >= max_bytes:
                link.frame_iter = it
                link.frame_iter_next = wire.peek_frame(raw).lsn + 1
                break
        return out

    def _digest(self, first: int, last: int) -> bytes:
        if first < max(1, self.store.first_retained_lsn) or last > self.store.durable_lsn:
            return b""
        return self.store.logical_digest(first, last, durable=True)

    def _on_handshake(self, link: _Link, ev: HandshakeDone) -> None:
        link.peer_id = ev.peer_id
        self.peer_id = ev.peer_id
        other = self._active
        if other is None or other is link:
            self._active = link
            log.info(
                "replication: link to %s authenticated (peer %s, wire version %d, %s, %s)",
                link.peer_addr,
                ev.peer_id.hex(),
                ev.version,
                "outbound" if link.initiator else "inbound",
                link.tls or "no TLS",
            )
            return
        keep = max(self.node_id, ev.peer_id)

        def initiator_id(x: _Link) -> bytes:
            return self.node_id if x.initiator else ev.peer_id

        if initiator_id(link) == keep and initiator_id(other) != keep:
            log.info(
                "replication: two connections to the peer; keeping the one %s opened",
                "this node" if link.initiator else "the peer",
            )
            self._close_link(other, "duplicate-connection")
            self._active = link
        else:
            self._close_link(link, "duplicate-connection")

    def _on_decision(self, link: _Link, ev: Decision) -> None:
        o = ev.outcome
        self.last_rule = o.rule
        if not (o.split_brain and o.action is Action.DISCONNECT):
            self._discard_my_data = False  # one-shot (resolve-split-brain)
            self._policy_override = None
        because = " <- ".join(reversed(o.because))
        if o.full_sync:
            log.warning(
                "replication: %s (%s): a full sync follows (%s); divergence LSN %d",
                o.rule,
                because,
                "this node receives a snapshot"
                if o.action is Action.SYNC_TARGET
                else "this node sends a snapshot",
                o.divergence_lsn,
            )
        if o.action is Action.DISCONNECT and o.rule in TRANSIENT_REFUSALS:
            # Both nodes are primary right now (e.g. a paused old primary that has not noticed
            # yet that it lost its lease): the cluster manager settles the roles within
            # seconds, so keep reconnecting instead of standing alone.
            log.warning(
                "replication: reconnect refused for now: %s (%s); retrying",
                o.rule,
                because,
            )
            return
        if o.action is Action.DISCONNECT:
            why = "split brain detected" if o.split_brain else "reconnect refused"
            log.error(
                "replication: %s: %s (%s); divergence LSN %d, local tail %d, peer tail %d%s. "
                "The link stays down (StandAlone) until `repl connect`.",
                why,
                o.rule,
                because,
                o.divergence_lsn,
                o.local_tail,
                o.peer_tail,
                f"; {o.detail}" if o.detail else "",
            )
            self._go_standalone(o.rule)
            return
        if o.branch is not Branch.NONE:
            self._on_merge_decision(link, o, because)
        log.info(
            "replication: reconnect decision %s (%s): %s, divergence LSN %d, local tail %d, "
            "peer tail %d%s",
            o.rule,
            because,
            o.action.value,
            o.divergence_lsn,
            o.local_tail,
            o.peer_tail,
            ", this node cuts its tail" if o.cut_local_after is not None else "",
        )
        receives = o.action is Action.SYNC_TARGET or (
            o.action is Action.IN_SYNC
            and self.peer_view is not None
            and self.peer_view.role is Role.PRIMARY
        )
        if receives and o.cut_local_after is None:
            # Drop generations we only began (no records after d): the peer's history wins.
            hist = truncate_history(self.history, o.divergence_lsn)
            if hist != self.history:
                self.history = hist
                self._save_meta()

    # -- full sync and the retention horizon ----------------------------------------------------

    def _on_snapshot_event(
        self,
        link: _Link,
        ev: SnapshotBegin | SnapshotChunk | SnapshotInstall | NeedSnapshot | NeedSnapshotData,
    ) -> None:
        """Full sync. Target: receive into ``snapshot-incoming/`` and install crash-safely
        (``snapshot_pending`` is persisted from the first byte until the install is done: the
        node is Inconsistent and refuses promotion, even forced). Source: export a consistent
        snapshot and keep the log from its LSN + 1 (``retain_from``) for the catch-up."""
        s = link.session
        if isinstance(ev, NeedSnapshot):
            self._expire_kept_snapshot()
            kept = self._kept_snapshot
            if kept is not None and ev.resume_id and kept[0] == ev.resume_id:
                sid, exp = kept[0], kept[1]
                self._kept_snapshot = None
                log.warning(
                    "replication: full sync: resuming the snapshot up to LSN %d (%d bytes) "
                    "where the peer stopped",
                    exp.lsn,
                    exp.total_bytes,
                )
            else:
                self._keep_snapshot(b"", None)
                try:
                    exp = self.store.export_snapshot()
                except StoreError as e:
                    log.error("replication: cannot take a snapshot for the peer: %s", e)
                    s.close("snapshot-failed")
                    return
                sid = os.urandom(wire.SNAPSHOT_ID_SIZE)
                log.warning(
                    "replication: full sync: sending a snapshot up to LSN %d (%d file(s), %d "
                    "bytes)%s",
                    exp.lsn,
                    len(exp.files),
                    exp.total_bytes,
                    " (the peer's partial snapshot is gone: from the start)"
                    if ev.resume_id
                    else "",
                )
            link.snap_export = exp
            self.store.retain_from = min(self.store.retain_from, exp.lsn + 1)
            s.snapshot_ready(exp.lsn, exp.files, sid)
            return
        if isinstance(ev, NeedSnapshotData):
            cur = link.snap_export
            if cur is None:
                s.close("snapshot-lost")
                return
            try:
                data = cur.read(ev.index, ev.offset, ev.size)
            except OSError as e:
                log.error("replication: reading the snapshot failed: %s", e)
                s.close("snapshot-failed")
                return
            s.send_snapshot_data(data)
            return
        try:
            if isinstance(ev, SnapshotBegin):
                self._snapshot_pending = True
                self._save_meta()  # before the first byte: a restart knows it was receiving
                self._recv_snapshot_id = ev.snapshot_id
                if ev.resume:
                    self.store.resume_snapshot_install(ev.resume)
                    self._recv_progress_at = sum(size for _, size in ev.resume)
                    log.warning(
                        "replication: full sync: resuming the snapshot from the peer after "
                        "%d byte(s) already received",
                        self._recv_progress_at,
                    )
                else:
                    self.store.begin_snapshot_install()
                    self._recv_progress_at = 0
                    log.warning(
                        "replication: full sync: receiving a snapshot from the peer (this node "
                        "held LSNs up to %d)",
                        ev.last_lsn,
                    )
            elif isinstance(ev, SnapshotChunk):
                self.store.write_snapshot_file(ev.name, ev.offset, ev.data)
                if link.sync_started is None:
                    link.sync_started = self.clock()
                link.sync_bytes += len(ev.data)
                if (
                    self._recv_snapshot_id
                    and ev.total - self._recv_progress_at >= SNAPSHOT_PROGRESS_BYTES
                ):
                    # Durable progress: an interrupted transfer resumes from here.
                    self.store.save_snapshot_progress(self._recv_snapshot_id)
                    self._recv_progress_at = ev.total
                s.snapshot_written(ev.total)
            else:
                self.store.install_snapshot()
                self._history_from_log()
                self._snapshot_pending = False
                self._save_meta()
                log.warning(
                    "replication: snapshot installed (LSNs up to %d); catching up (Inconsistent "
                    "until done)",
                    ev.lsn,
                )
                s.snapshot_installed(ev.lsn)
        except (StoreError, OSError) as e:
            if self._is_disk_error(e):
                self._detach(link, e)
                return
            log.error("replication: receiving the snapshot failed: %s", e)
            s.ingest_failed()

    # -- disk errors: detach (DRBD's on-io-error=detach) -----------------------------------------

    def _is_disk_error(self, e: BaseException) -> bool:
        """An I/O failure of this node's disk (ENOSPC, EIO, ...), as opposed to frames the
        store refused for what they are."""
        return isinstance(e, OSError | StoreIOError) or self.store.state is StoreState.ERROR

    def _detach(self, link: _Link | None, err: BaseException) -> None:
        """This node's disk failed while it stored the peer's data: it becomes Diskless, tells
        the peer (a STATE update, then REFUSE(INGEST)), and stays StandAlone — no reconnect
        loop that would fail the same way. The primary applies its fencing policy to the lost
        link. A restart with a working disk comes back Outdated and resyncs."""
        log.error(
            "replication: disk error on this node (%s): detaching (disk Diskless, DRBD's "
            "on-io-error=detach); the link stays down until the node is restarted with a "
            "working disk",
            err,
        )
        self.disk = DiskState.DISKLESS
        self._go_standalone(f"disk failed: {err}")
        with contextlib.suppress(Exception):  # the disk may refuse this too
            self._save_meta()
        if link is not None:
            link.session.disk_failed()
            self._process(link)
        for other in list(self._links):
            if other is not link:
                self._close_link(other, "disk-failed")

    def _history_from_log(self) -> None:
        """After a snapshot install the log's own generation history is the whole truth (no
        mirrored range of ours survives: the snapshot came from the peer)."""
        out: list[Generation] = []
        for number, first, origin in self.store.generation_history():
            if out and number <= out[-1].number:
                continue
            out.append(Generation(number, first, origin))
        self.history = tuple(out)

    async def _retain_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(RETAIN_INTERVAL)
            try:
                self.apply_retention()
            except Exception as e:  # never kills the node; retried next period
                log.debug("replication: retention horizon not applied: %s", e)

    def apply_retention(self) -> dict[str, object]:
        """Drop the head of a primary's log down to ``replication.retain_bytes`` of newest
        segments — never what a connected peer has not acknowledged (durable), nor the LSNs
        a full sync in progress still needs. A disconnected peer does not hold the log back:
        it gets a full sync when it returns."""
        keep = self.settings.retain_bytes
        before = self.store.first_retained_lsn
        if self.roles.role is not Role.PRIMARY or keep <= 0:
            return {"dropped_segments": 0, "first_retained_lsn": before}
        limit = self.store.head_drop_point(keep)
        peer_connected = False
        for link in self._links:
            s = link.session
            if link.peer_id is None and s.phase is not Phase.CLOSED and link is not self._active:
                continue  # not authenticated yet: not the peer
            peer_connected = True
            if s.phase not in (Phase.ESTABLISHED, Phase.SYNC_SOURCE) or link.snap_export:
                return {"dropped_segments": 0, "first_retained_lsn": before, "held": True}
            limit = min(limit, s.peer_durable + 1)
        self._expire_kept_snapshot()
        if self._kept_snapshot is not None:  # a resumed full sync catches up after its LSN
            limit = min(limit, self._kept_snapshot[1].lsn + 1)
        if not peer_connected:
            # Nothing to keep for a peer that is away; compaction may reclaim below too.
            self.store.retain_from = limit
        if limit <= before:
            return {"dropped_segments": 0, "first_retained_lsn": before}
        n = self.store.drop_head(limit)
        after = self.store.first_retained_lsn
        if n:
            log.info(
                "replication: retention horizon: %d segment(s) dropped, the log starts at LSN %d",
                n,
                after,
            )
        return {"dropped_segments": n, "first_retained_lsn": after}

    # -- split-brain merge --------------------------------------------------------------------

    def _on_merge_decision(self, link: _Link, o: Outcome, because: str) -> None:
        """``rule:split-brain-merge``: the loser ships its branch (the session does it), the
        winner spools it (bounded memory) and replays it once complete."""
        if o.branch is Branch.RECEIVE:
            plan = "the peer ships its branch here, to be replayed as new operations"
        else:
            plan = "this node ships its branch to the peer, then cuts it and catches up"
        log.error(
            "replication: split brain detected: %s (%s); divergence LSN %d, local tail %d "
            "(acknowledged: %s), peer tail %d (acknowledged: %s). Merging: %s",
            o.rule,
            because,
            o.divergence_lsn,
            o.local_tail,
            o.local_tail_acked,
            o.peer_tail,
            o.peer_tail_acked,
            plan,
        )
        if o.branch is not Branch.RECEIVE:
            return
        if self._merge_spool is not None:
            self._merge_spool[1].discard()
        peer = (link.peer_id or b"").hex() or "peer"
        name = f"merge-{peer[:16]}-after-{o.divergence_lsn}-{time.strftime('%Y%m%dT%H%M%S')}"
        path = os.path.join(self.store.data_dir, "repl", name + ".spool")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._merge_spool = (link, BranchSpool(path))
        except OSError as e:
            log.error("replication: cannot spool the peer's branch (%s): disconnecting", e)
            self._merge_spool = None
            self._go_standalone("merge-spool-failed")
            link.session.close("merge-spool-failed")

    def _on_branch_frames(self, link: _Link, ev: BranchFrames) -> None:
        sp = self._merge_spool
        if sp is None or sp[0] is not link:
            link.session.close("unexpected-branch")
            return
        try:
            sp[1].add(ev.frames)
        except (MergeError, OSError) as e:
            log.error("replication: spooling the peer's branch failed (%s): disconnecting", e)
            sp[1].discard()
            self._merge_spool = None
            self._go_standalone("merge-spool-failed")
            link.session.close("merge-spool-failed")

    def _on_branch_complete(self, link: _Link, ev: BranchComplete) -> None:
        sp = self._merge_spool
        self._merge_spool = None
        if sp is None or sp[0] is not link:
            return
        try:
            sp[1].finish()
        except OSError as e:
            log.error("replication: the spooled branch could not be made durable: %s", e)
        log.warning(
            "replication: the peer's branch is here (LSNs %d-%d, %d frame(s), %d bytes, %s)",
            sp[1].first_lsn,
            ev.last_lsn,
            sp[1].frames,
            sp[1].bytes,
            sp[1].path,
        )
        self._merge_confirm[sp[1].path] = (link, ev.last_lsn)
        self._merge_ready.append((sp[1].path, link.peer_id or b""))
        self._maybe_start_merge()

    def _maybe_start_merge(self) -> None:
        """Replay the complete spooled branches — on the primary only (one writer); a
        secondary winner merges when it is promoted."""
        if not self._merge_ready or self.roles.role is not Role.PRIMARY:
            if self._merge_ready:
                log.warning("replication: the merge runs when this node is promoted")
            return
        if self._merge_task is not None and not self._merge_task.done():
            return
        self._merge_task = asyncio.get_running_loop().create_task(self._merge_loop())

    async def _merge_loop(self) -> None:
        while self._merge_ready and self.roles.role is Role.PRIMARY and not self._stopping:
            path, peer = self._merge_ready.pop(0)
            res = await self.run_merge(path, peer)
            self._confirm_merge(path, "error" not in res)

    def _confirm_merge(self, path: str, ok: bool) -> None:
        """The merge of the branch spooled at ``path`` returned: every merge transaction is
        durable (``commit_async``), so tell the loser (MERGE_DONE) that it may cut its branch.
        A failed merge drops the link instead: the loser keeps its branch and ships it again
        on reconnect, and the journal resumes the merge where it stopped."""
        link, last = self._merge_confirm.pop(path, (None, 0))
        if link is None or link.closed or link.session.phase is not Phase.MERGING:
            return  # the loser reconnects and ships the branch again (merged: nothing replayed)
        if ok:
            link.session.merge_done(last)
        else:
            link.session.close("merge-failed")
        self._process(link)

    async def run_merge(self, path: str, peer: bytes = b"") -> dict[str, object]:
        """Replay a spooled branch on this node's store (the primary); the spool is removed
        once merged, kept (and named in the log) if the merge failed."""
        store = self.store
        if not isinstance(store, Store):
            raise RoleError("merge needs the node's store")
        try:
            rep = await merge_branch(store, path, loser=peer)
        except (MergeError, StoreError, OSError) as e:
            log.error("replication: the merge of %s failed: %s (the spool is kept)", path, e)
            self.last_merge = {"spool": path, "error": str(e)}
            return self.last_merge
        with contextlib.suppress(OSError):
            os.unlink(path)
        self.last_merge = {
            "merge": rep.merge_id,
            "divergence_lsn": rep.divergence_lsn,
            "branch": [rep.branch_first_lsn, rep.branch_last_lsn],
            "redelivered": rep.redelivered,
            "collisions": rep.collisions,
            "changes": rep.changes,
            "unresolved": rep.unresolved,
            "audit": rep.audit_path,
        }
        return self.last_merge

    async def resolve_split_brain(
        self, *, discard_my_data: bool = False, merge: bool = False
    ) -> dict[str, object]:
        """``repl resolve-split-brain``: a one-shot resolution for the next reconnect
        decision, then connect. ``--discard-my-data`` (this node's branch is cut into
        quarantine and it catches up; it must be secondary); ``--merge`` (the split-brain
        policy is ``merge`` for the next decision: give it on both nodes)."""
        if discard_my_data == merge:
            raise RoleError("give exactly one of --discard-my-data and --merge")
        if discard_my_data:
            if self.is_primary():
                raise RoleError("--discard-my-data is for a secondary: run `repl secondary` first")
            self._discard_my_data = True
        else:
            self._policy_override = SplitBrainPolicy.MERGE
        for link in list(self._links):
            self._close_link(link, "resolve-split-brain")  # reconnect with the new view
        out = self.connect()
        out.update({"discard_my_data": discard_my_data, "merge": merge})
        return out

    def _go_standalone(self, reason: str) -> None:
        self.standalone = True
        self.standalone_reason = reason

    def _cut_tail(self, link: _Link, after: int) -> None:
        link.tasks.append(asyncio.get_running_loop().create_task(self._cut_tail_task(link, after)))

    async def _cut_tail_task(self, link: _Link, after: int) -> None:
        with contextlib.suppress(Exception):
            await self.store.settle()
        if link.session.phase is Phase.CLOSED:
            return
        qdir = os.path.join(self.store.data_dir, "quarantine")
        os.makedirs(qdir, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        path = os.path.join(qdir, f"cut-{stamp}-after-{after}.log")
        try:
            n = self.store.cut_tail(after, path)
        except Exception as e:
            log.error("replication: cutting the log after LSN %d failed: %s", after, e)
            link.session.ingest_failed()
            self._process(link)
            return
        log.warning(
            "replication: cut %d record(s) after LSN %d into quarantine %s (rule %s)",
            n,
            after,
            path,
            self.last_rule,
        )
        self.history = truncate_history(self.history, after)
        self._save_meta()
        link.session.tail_cut(after)
        self._process(link)

    def _on_peer_in_sync(self, first_live: int) -> None:
        if self.roles.role is not Role.PRIMARY:
            return
        mf = self.core.require_peer()
        if mf is None:
            log.info("replication: peer in sync from LSN %d (protocol A)", first_live)
            return
        cur = self.history[-1] if self.history else None
        if (
            cur is not None
            and cur.origin == self.node_id
            and cur.mirrored_from is None
            and cur.mirrored_until is None
        ):
            self.history = (*self.history[:-1], replace(cur, mirrored_from=mf))
            self._save_meta()
        # else: the generation already had a mirrored range (a new one is being begun):
        # claiming no range is the conservative side.
        log.info(
            "replication: peer in sync from LSN %d: writes now wait for the peer (protocol %s)",
            first_live,
            self.settings.protocol.value,
        )
        if self._hold:
            # Frozen by fencing after a link loss, and the peer came back and synced
            # everything (DRBD: resumed once the situation is resolved). Every write waits for
            # the peer again (the barrier is in PEER mode): nothing is released without it, so
            # no fencing policy needs more. The barrier is not resumed alone.
            log.info("replication: the peer is back in sync: frozen writes resume")
            self._hold = ""
            self.frozen_since = None
            self.store.thaw_writes()

    def _on_link_lost(self, link: _Link, reason: str) -> None:
        was_active = link is self._active
        self._link_gone(link)
        if not was_active:
            if link.peer_id is None:
                log.info("replication: connection %s closed (%s)", link.peer_addr, reason)
            return
        self._active = None
        self.last_link_lost = reason
        self.peer_view = None
        log.warning("replication: link to the peer lost (%s)", reason)
        if self.roles.role is Role.PRIMARY:
            self._end_mirroring(reason)

    def _end_mirroring(self, reason: str) -> None:
        """The peer no longer confirms writes: persist the mirrored end, begin a new
        generation, then resume or hold per the fencing policy."""
        loss = self.core.link_lost()
        if loss.mirrored_until is None:
            return
        cur = self.history[-1] if self.history else None
        if cur is not None and cur.origin == self.node_id:
            self.history = (*self.history[:-1], replace(cur, mirrored_until=loss.mirrored_until))
        self._save_meta()  # before any write is released without the peer
        log.info("replication: mirrored up to LSN %d (%s)", loss.mirrored_until, reason)
        # Writes continue without the peer in a new generation, begun as soon as nothing is
        # pending (the store refuses it before); meanwhile they are in the old generation,
        # after its mirrored range: counted as acknowledged, the safe side.
        if not self._stopping and (self._gen_task is None or self._gen_task.done()):
            self._gen_task = asyncio.get_running_loop().create_task(self._new_generation_task())
        if loss.resume_when == "now":
            self._resume_writes()
        else:
            self._hold = loss.resume_when
            self.frozen_since = self.clock()
            self._freeze_writes(loss.resume_when)
            log.error(
                "replication: peer lost with fencing %s: %d write(s) held until the %s",
                self.settings.fencing.value,
                loss.held,
                "peer is Outdated (reconnects)"
                if loss.resume_when == "peer-outdated"
                else "peer is fenced",
            )

    async def _new_generation_task(self) -> None:
        try:
            await self._begin_generation()
        except Exception as e:
            log.error("replication: could not begin a new generation: %s", e)
            return
        # A link that came up while the generation waited to begin (the held writes drain
        # only once the peer is Outdated or back) must carry the new history, and so the new
        # term, before the first frame of the generation is shipped: the peer refuses a frame
        # whose generation is newer than the sender's term. (No await since the generation
        # began: nothing of it was shipped yet.)
        self._announce()

    async def _begin_generation(self) -> int:
        """Begin a new generation of ours once nothing is pending (retrying under load)."""
        while True:
            with contextlib.suppress(Exception):
                await self.store.settle()
            gen = self._max_generation() + 1
            try:
                self.store.begin_generation(gen)
            except StoreError as e:
                if self.store.state is not StoreState.OPEN:
                    raise
                log.debug("replication: generation %d not begun yet: %s", gen, e)
                await asyncio.sleep(0.01)
                continue
            self.history = (
                *truncate_history(self.history, self.store.last_lsn),
                Generation(gen, self.store.last_lsn + 1, self.node_id),
            )
            self._save_meta()
            log.info("replication: generation %d begins at LSN %d", gen, self.store.last_lsn + 1)
            return gen

    def _freeze_writes(self, resume_when: str) -> None:
        """Writes held by fencing fail fast instead of waiting for client timeouts: the store
        refuses new local writes (``WritesFrozen`` → SMTP ``451 4.3.0``, IMAP ``NO
        [UNAVAILABLE]``, POP3 ``-ERR [SYS/TEMP]``) and fails the commits held in the barrier
        (not acknowledged; their frames stay held until the barrier resumes)."""
        until = "the peer is Outdated" if resume_when == "peer-outdated" else "the peer is fenced"
        self.store.freeze_writes(
            f"replication peer lost (fencing {self.settings.fencing.value}), held until {until}"
        )

    def _resume_writes(self) -> None:
        self._hold = ""
        self.frozen_since = None
        self.store.thaw_writes()
        self.barrier.dispatch(self.core.resume_local())

    def peer_fenced(self) -> None:
        """The cluster layer confirmed the peer is fenced: held writes continue alone."""
        if self._hold:
            log.info("replication: peer fenced: writes resume")
            self._resume_writes()

    def resume_io(self) -> dict[str, object]:
        """``repl resume-io`` (drbdadm's word): the operator states the peer is fenced or
        Outdated; frozen writes resume alone (after ``mirrored_until`` was persisted, which
        happened when the freeze began)."""
        was = self._hold
        if was:
            log.warning("replication: resume-io by the operator: writes continue without the peer")
            self._resume_writes()
        return {"resumed": bool(was), "was_held_until": was}

    async def _auto_promote(self) -> None:
        """``replication.role = primary`` on a restart: first look for the peer (for up to a
        keep-alive period); promote only if it is not primary (no automatic failback)."""
        wait = self.settings.ping_interval + self.settings.ping_timeout
        deadline = self.clock() + wait
        while self.clock() < deadline:
            if self._active is not None and self.peer_view is not None:
                break
            await asyncio.sleep(0.05)
        pv = self.peer_view if self._active is not None else None
        if pv is not None and pv.role is Role.PRIMARY:
            log.warning(
                "replication: replication.role = primary, but the peer is primary: staying "
                "secondary (no automatic failback)"
            )
            return
        try:
            await self.promote(force=False, reason="replication.role = primary")
        except RoleError as e:
            log.warning("replication: not promoted at start: %s", e)

    # -- role changes --------------------------------------------------------------------------

    def _facts(self) -> RoleFacts:
        link = self._active
        pv = self.peer_view
        return RoleFacts(
            disk=self.disk,
            last_lsn=self.store.last_lsn,
            max_generation=self._max_generation(),
            peer_connected=link is not None and pv is not None,
            peer_role=pv.role if pv is not None else None,
            peer_disk=self.peer_disk if link is not None else None,
            peer_last_lsn=pv.last_lsn if pv is not None else None,
            snapshot_pending=self._snapshot_pending,
        )

    async def promote(
        self, *, force: bool = False, reason: str = "repl primary"
    ) -> dict[str, object]:
        """Become primary (RoleError if refused), then start the services."""
        async with self._role_lock:
            change = self.roles.request_primary(self._facts(), force=force)
            if change is None:
                return {"role": Role.PRIMARY.value, "changed": False}
            try:
                await self._do_promote(change, reason)
            except BaseException:
                self.roles.abandoned(change)
                raise
            return {
                "role": Role.PRIMARY.value,
                "changed": True,
                "generation": self._max_generation(),
                "warning": change.warning,
            }

    async def _do_promote(self, change: RoleChange, reason: str) -> None:
        if change.warning:
            log.warning("replication: %s", change.warning)
        await self._ingest_drained()
        if self._gen_task is not None and not self._gen_task.done():
            with contextlib.suppress(Exception):
                await self._gen_task
        gen = await self._begin_generation()
        if change.forced:
            self.disk = DiskState.UP_TO_DATE
        self.roles.committed(change)
        self._save_meta()
        log.info(
            "replication: %s is now Primary, generation %d (%s%s)",
            self.settings.name,
            gen,
            reason,
            ", forced" if change.forced else "",
        )
        self._announce()
        await self.hooks.start_services()
        self._maybe_start_merge()

    async def demote(self) -> dict[str, object]:
        """Stop the services (gracefully), settle the store, become secondary."""
        async with self._role_lock:
            change = self.roles.request_secondary()
            if change is None:
                return {"role": Role.SECONDARY.value, "changed": False}
            try:
                await self.hooks.stop_services()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.store.settle(), self.settings.ack_timeout * 2)
                self._end_mirroring_on_demotion()
                self.roles.committed(change)
            except BaseException:
                self.roles.abandoned(change)
                raise
            self._save_meta()
            log.info("replication: %s is now Secondary", self.settings.name)
            self._announce()
            return {"role": Role.SECONDARY.value, "changed": True}

    def _end_mirroring_on_demotion(self) -> None:
        loss = self.core.link_lost()
        if loss.mirrored_until is not None:
            cur = self.history[-1] if self.history else None
            if cur is not None and cur.origin == self.node_id:
                self.history = (
                    *self.history[:-1],
                    replace(cur, mirrored_until=loss.mirrored_until),
                )
            self._save_meta()
        self._hold = ""
        self.frozen_since = None
        self.store.thaw_writes()
        self.barrier.dispatch(self.core.resume_local())

    def _announce(self) -> None:
        """Tell the peer about a role/history change: a STATE update on an established link;
        any other link is dropped and reconnects with the new view."""
        self._ship_appended()
        view = self.view()
        for link in list(self._links):
            s = link.session
            if s.phase is Phase.ESTABLISHED and link is self._active:
                s.update_local(view)
                self._process(link)
            else:
                self._close_link(link, "role-changed")

    # -- admin commands ------------------------------------------------------------------------

    def connect(self) -> dict[str, object]:
        if self.disk is DiskState.DISKLESS:
            raise RoleError(
                "this node is Diskless (its disk failed): restart it with a working disk"
            )
        was = self.standalone
        self.standalone = False
        self.standalone_reason = ""
        self._connect_wake.set()
        return {"connecting": True, "was_standalone": was}

    def disconnect(self) -> dict[str, object]:
        self._go_standalone("repl disconnect")
        for link in list(self._links):
            self._close_link(link, "disconnect")
        return {"standalone": True}

    async def verify(self) -> dict[str, object]:
        link = self._active
        if link is None or link.session.phase is not Phase.ESTABLISHED:
            raise RoleError("verify needs the peer connected and in sync (Established)")
        if self._verify is not None and not self._verify.done():
            raise RoleError("a verify is already running")
        s = link.session
        last = s.peer_durable if self.is_primary() else self.store.durable_lsn
        first = max(1, self.store.first_retained_lsn)
        if last < first:
            return {"ranges": 0, "mismatches": [], "first_lsn": first, "last_lsn": last}
        self._verify = asyncio.get_running_loop().create_future()
        self._verify_results = []
        s.start_verify(first, last, step=max(1000, (last - first + 1) // 64 + 1))
        self._process(link)
        result = await asyncio.wait_for(asyncio.shield(self._verify), VERIFY_TIMEOUT)
        result.update({"first_lsn": first, "last_lsn": last})
        return result

    def _verify_done(self, ev: VerifyDone) -> None:
        unchecked = [(a, b) for a, b, m in self._verify_results if m is None]
        result: dict[str, object] = {
            "ranges": ev.ranges,
            "mismatches": [list(r) for r in ev.mismatches],
            "unchecked": [list(r) for r in unchecked],
        }
        log.info("replication verify: %d range(s), %d mismatch(es)", ev.ranges, len(ev.mismatches))
        if self._verify is not None and not self._verify.done():
            self._verify.set_result(result)

    async def invalidate(self) -> dict[str, object]:
        """Discard this secondary's log (into quarantine) and resync it from the peer."""
        async with self._role_lock:
            if self.is_primary():
                raise RoleError("invalidate is for a secondary: run `repl secondary` first")
            for link in list(self._links):
                self._close_link(link, "invalidate")
            await self._ingest_drained()
            await self.store.settle()
            qdir = os.path.join(self.store.data_dir, "quarantine")
            os.makedirs(qdir, exist_ok=True)
            path = os.path.join(qdir, f"invalidate-{time.strftime('%Y%m%dT%H%M%S')}.log")
            if self.store.first_retained_lsn <= 1:
                n = self.store.cut_tail(0, path)
            else:
                # The log's head was dropped (it came from a snapshot): a cut cannot rebuild the
                # index without it. Copy the segments aside; the snapshot install replaces them,
                # and until then this node presents an empty log to the peer (see `view`).
                path = path[: -len(".log")]
                shutil.copytree(os.path.join(self.store.data_dir, "log"), path)
                n = self.store.last_lsn - self.store.first_retained_lsn + 1
            self.history = ()
            self.disk = DiskState.INCONSISTENT
            self._want_full_sync = True
            self._snapshot_pending = True  # not promotable until a snapshot is installed
            self._save_meta()
            log.warning(
                "replication: invalidated: %d record(s) moved to %s; a full sync (snapshot) "
                "from the peer follows",
                n,
                path,
            )
            self.standalone = False
            self._connect_wake.set()
            return {"quarantined_records": n, "quarantine": path, "disk": self.disk.value}

    def status(self) -> dict[str, object]:
        link = self._active
        s = link.session if link is not None else None
        if s is None:
            cstate = (
                ConnectionState.STANDALONE if self.standalone else ConnectionState.WF_CONNECTION
            )
        elif s.outcome is None:
            cstate = ConnectionState.WF_REPORT_PARAMS
        else:
            cstate = ConnectionState.CONNECTED
        rstate = {
            Phase.SYNC_SOURCE: ReplicationState.SYNC_SOURCE,
            Phase.SYNC_TARGET: ReplicationState.SYNC_TARGET,
            Phase.SNAPSHOT_SOURCE: ReplicationState.SYNC_SOURCE,  # a full sync
            Phase.SNAPSHOT_TARGET: ReplicationState.SYNC_TARGET,
            Phase.ESTABLISHED: ReplicationState.ESTABLISHED,
        }.get(s.phase if s is not None else Phase.CLOSED, ReplicationState.OFF)
        last = self.store.last_lsn
        out: dict[str, object] = {
            "node": self.settings.name,
            "role": self.roles.role.value,
            "disk": self.disk.value,
            "connection": cstate.value,
            "replication": rstate.value,
            "protocol": self.settings.protocol.value,
            "fencing": self.settings.fencing.value,
            "peer": self.settings.peer,
            "peer_id": self.peer_id.hex() if self.peer_id else None,
            "peer_role": self.peer_view.role.value if self.peer_view and s else None,
            "peer_disk": self.peer_disk.value if self.peer_disk and s else None,
            "last_lsn": last,
            "durable_lsn": self.store.durable_lsn,
            "visible_lsn": self.store.visible_lsn,
            "generation": self._max_generation(),
            "history": [
                {
                    "generation": g.number,
                    "first_lsn": g.first_lsn,
                    "origin": g.origin.hex(),
                    "mirrored": [g.mirrored_from, g.mirrored_until],
                }
                for g in self.history[-8:]
            ],
            "barrier": self.core.mode.value,
            "writes_held": self.core.pending if self.core.mode is BarrierMode.FROZEN else 0,
            "frozen": bool(self._hold),
            "last_decision": self.last_rule,
            "last_link_lost": self.last_link_lost,
            "standalone_reason": self.standalone_reason,
            "last_merge": self.last_merge,
            "full_sync_wanted": self._want_full_sync,
            "snapshot_pending": self._snapshot_pending,
            "first_retained_lsn": self.store.first_retained_lsn,
            "link_tls": link.tls if link is not None else None,
            "damaged_after_lsn": (
                self.store.damage.after_lsn if self.store.damage is not None else None
            ),
        }
        if s is not None:
            if self.is_primary():
                out["peer_received_lsn"] = s.peer_received
                out["peer_durable_lsn"] = s.peer_durable
                out["lag_lsns"] = max(0, last - s.peer_durable)
            else:
                peer_last = max(s.received_lsn, self.peer_view.last_lsn if self.peer_view else 0)
                out["peer_last_lsn"] = peer_last
                out["lag_lsns"] = max(0, peer_last - self.store.durable_lsn)
            out.update(self._resync_status(link, s))
        return out

    def _resync_status(self, link: _Link | None, s: ReplSession) -> dict[str, object]:
        now = self.clock()
        if s.phase is Phase.SNAPSHOT_SOURCE:
            total = link.snap_export.total_bytes if link and link.snap_export else 0
            return {"full_sync_bytes_sent": s.stats_snapshot_bytes, "full_sync_total": total}
        if s.phase is Phase.SYNC_SOURCE:
            remaining = s.resync_remaining or 0
            total = max(1, self.store.last_lsn - (s.peer_durable or 0))
            done = max(0.0, 1 - remaining / total)
            return {"resync_percent": round(100 * done, 1), "resync_bytes": s.stats_resync_bytes}
        if s.phase is Phase.SYNC_TARGET and link is not None and link.sync_started is not None:
            target = self.peer_view.last_lsn if self.peer_view else s.received_lsn
            span = max(1, target - link.sync_start_lsn)
            done = min(1.0, max(0.0, (self.store.durable_lsn - link.sync_start_lsn) / span))
            secs = max(1e-3, now - link.sync_started)
            return {
                "resync_percent": round(100 * done, 1),
                "resync_bytes_per_second": round(link.sync_bytes / secs),
            }
        return {}
