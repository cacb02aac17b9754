"""Helpers of the replication engine tests: frames, views, a fake clock and a back-to-back link.

The sans-IO sessions are wired to each other in memory. Each side has a :class:`FakeNode` that
plays the adapter: it keeps a log (a list of frames), answers NeedFrames from it, appends
IngestFrames to it (and reports them durable unless told to hold), cuts tails, computes
digests. Everything else a session emits is recorded in ``node.seen`` for assertions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from mailharbor.repl import session as S
from mailharbor.repl.generations import Generation, NodeView
from mailharbor.repl.state import DiskState, Protocol, Role, SplitBrainPolicy
from mailharbor.store import format as fmt

A = b"A" * 16
B = b"B" * 16
C3 = b"C" * 16
SECRET = b"pair secret 0123456789abcdef"
SETTINGS = hashlib.sha256(b"cluster settings").digest()


def frame(lsn: int, gen: int = 1, node: bytes = A, size: int = 0) -> bytes:
    """A real store frame (one DOMAIN_ADD record, padded to about ``size`` bytes)."""
    name = f"d{lsn}-{gen}-{node[:1].decode()}.example"
    name += "x" * max(0, size - len(name))
    payload = fmt.encode_records([fmt.DomainAdd(name[:60000])])
    return fmt.encode_frame(
        lsn=lsn, generation=gen, node_id=node, time_ms=0, payload=payload, nrecords=1
    )


def gen(
    number: int, first: int, origin: bytes, mf: int | None = None, mu: int | None = None
) -> Generation:
    return Generation(number, first, origin, mf, mu)


def view(
    node: bytes,
    history: tuple[Generation, ...],
    last: int,
    role: Role = Role.SECONDARY,
    disk: DiskState = DiskState.UP_TO_DATE,
    retained: int = 1,
    discard: bool = False,
) -> NodeView:
    return NodeView(node, role, disk, history, last, retained, discard)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@dataclass
class FakeNode:
    """The adapter side of one session, with an in-memory log."""

    view: NodeView
    log: list[bytes]
    config: S.SessionConfig
    clock: FakeClock
    auto_durable: bool = True
    answer_frames: bool = True
    auto_merge: bool = True  # answer BranchComplete with merge_done at once
    session: S.ReplSession = field(init=False)
    seen: list[S.Event] = field(default_factory=list)
    branch: list[bytes] = field(default_factory=list)
    quarantine: list[bytes] = field(default_factory=list)
    pending_durable: int = 0
    pending_need: list[S.NeedFrames] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.session = S.ReplSession(self.config, self.view, self.clock)

    @property
    def last_lsn(self) -> int:
        return len(self.log)

    def of(self, kind: type) -> list:  # type: ignore[type-arg]
        return [e for e in self.seen if isinstance(e, kind)]

    def append_as_primary(self, n: int, gen_no: int, size: int = 0) -> list[bytes]:
        new = [frame(self.last_lsn + 1 + i, gen_no, self.view.node_id, size) for i in range(n)]
        self.log.extend(new)
        self.session.frames_appended(new)
        return new

    def answer(self, ev: S.NeedFrames) -> None:
        out: list[bytes] = []
        size = 0
        i = ev.from_lsn - 1
        while i < len(self.log) and (not out or size + len(self.log[i]) <= ev.max_bytes):
            out.append(self.log[i])
            size += len(self.log[i])
            i += 1
        self.session.send_frames(out)

    def make_durable(self) -> None:
        if self.pending_durable:
            lsn, self.pending_durable = self.pending_durable, 0
            self.session.frames_durable(lsn)


def config(node: bytes, **kw: object) -> S.SessionConfig:
    base: dict[str, object] = {
        "node_id": node,
        "secret": SECRET,
        "settings_hash": SETTINGS,
        "protocol": Protocol.C,
        "split_brain": SplitBrainPolicy.MERGE,
        "resync_chunk_bytes": 4096,
        "resync_window_bytes": 16384,
    }
    base.update(kw)
    return S.SessionConfig(**base)  # type: ignore[arg-type]


class Link:
    """Two FakeNodes whose sessions talk to each other through memory."""

    def __init__(self, a: FakeNode, b: FakeNode) -> None:
        self.a, self.b = a, b
        self.up = True
        self.wire_log: list[tuple[str, bytes]] = []  # (sender, bytes) for replay tests

    def start(self) -> None:
        self.a.session.start()
        self.b.session.start()
        self.pump()

    def other(self, n: FakeNode) -> FakeNode:
        return self.b if n is self.a else self.a

    def pump(self, rounds: int = 10_000) -> None:
        for _ in range(rounds):
            moved = False
            for n in (self.a, self.b):
                ev = n.session.next_event()
                while ev is not None:
                    moved = True
                    self.handle(n, ev)
                    ev = n.session.next_event()
            if not moved:
                return
        raise AssertionError("the link did not settle")

    def handle(self, n: FakeNode, ev: S.Event) -> None:
        s = n.session
        if isinstance(ev, S.SendBytes):
            self.wire_log.append(("a" if n is self.a else "b", bytes(ev.data)))
            if self.up:
                self.other(n).session.receive_data(ev.data)
            return
        n.seen.append(ev)
        if isinstance(ev, S.NeedFrames):
            if n.answer_frames:
                n.answer(ev)
            else:
                n.pending_need.append(ev)
        elif isinstance(ev, S.IngestFrames):
            assert ev.first_lsn == n.last_lsn + 1, (ev.first_lsn, n.last_lsn)
            n.log.extend(ev.frames)
            n.pending_durable = n.last_lsn
            if n.auto_durable:
                n.make_durable()
        elif isinstance(ev, S.BranchFrames):
            n.branch.extend(ev.frames)
        elif isinstance(ev, S.BranchComplete):
            if n.auto_merge:
                s.merge_done(ev.last_lsn)
        elif isinstance(ev, S.CutTail):
            n.quarantine = n.log[ev.after_lsn :]
            del n.log[ev.after_lsn :]
            s.tail_cut(ev.after_lsn)
        elif isinstance(ev, S.NeedDigest):
            if ev.last_lsn > len(n.log):
                s.provide_digest(ev.first_lsn, ev.last_lsn, b"")
            else:
                h = hashlib.sha256(b"".join(n.log[ev.first_lsn - 1 : ev.last_lsn]))
                s.provide_digest(ev.first_lsn, ev.last_lsn, h.digest())


def pair(
    va: NodeView,
    log_a: list[bytes],
    vb: NodeView,
    log_b: list[bytes],
    clock: FakeClock | None = None,
    **kw: object,
) -> Link:
    clock = clock or FakeClock()
    a = FakeNode(va, list(log_a), config(va.node_id, **kw), clock)
    b = FakeNode(vb, list(log_b), config(vb.node_id, **kw), clock)
    return Link(a, b)


def log_of(n: int, gen_no: int = 1, node: bytes = A, start: int = 1) -> list[bytes]:
    return [frame(start + i, gen_no, node) for i in range(n)]
