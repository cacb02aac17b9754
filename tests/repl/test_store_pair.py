"""Two real stores (tmp dirs, nothing mocked) replicated through two back-to-back sessions: a
fresh secondary catches up from the primary's `read_frames`, then follows live appends; its
indexes and bodies end up equal to the primary's."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailharbor.repl import session as S
from mailharbor.repl import wire as W
from mailharbor.repl.generations import Generation, NodeView, extend_history
from mailharbor.repl.state import DiskState, Protocol, Role
from mailharbor.store import Store, StoreOptions

from . import A, B, FakeClock, config

PWHASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
OPTIONS = StoreOptions(
    segment_bytes=16 * 1024, chunk_bytes=1024, cache_bytes=64 * 1024, checkpoint_every_bytes=1 << 30
)


def history_of(st: Store) -> tuple[Generation, ...]:
    """What the adapter derives from the log: one entry per generation change."""
    h: tuple[Generation, ...] = ()
    for raw in st.read_frames(1):
        info = W.peek_frame(raw)
        h = extend_history(h, info.generation, info.lsn, info.origin)
    return h


def body(i: int, size: int) -> bytes:
    head = f"Message-ID: <{i}@pair>\r\nSubject: {i}\r\n\r\n".encode()
    return head + random.Random(i).randbytes(max(0, size - len(head)))


def workload(st: Store, start: int, n: int) -> None:
    """Deliveries (small, chunked, multi-recipient), flags, an expunge."""
    assert st.index.account_by_address("alice@example.org") is not None
    inbox = next(g for g, mb in st.index.mailboxes.items() if mb.name == "INBOX")
    archive = next(g for g, mb in st.index.mailboxes.items() if mb.name == "Archive")
    uids = []
    for i in range(start, start + n):
        with st.transaction() as t:
            size = 3000 if i % 4 == 0 else 200
            d = t.deliver(t.put_blob(body(i, size)), [inbox, archive] if i % 3 == 0 else [inbox])
        uids.append(d.uids[inbox])
    with st.transaction() as t:
        t.store_flags(inbox, uids[:3], add=1)
    with st.transaction() as t:
        t.expunge(inbox, uids[3:4])


class StoreNode:
    """The adapter of one node over a real store."""

    def __init__(self, st: Store, view: NodeView, clock: FakeClock) -> None:
        self.st = st
        self.session = S.ReplSession(config(view.node_id, protocol=Protocol.C), view, clock)
        self.seen: list[S.Event] = []

    def handle(self, ev: S.Event, peer: StoreNode) -> None:
        if isinstance(ev, S.SendBytes):
            peer.session.receive_data(ev.data)
            return
        self.seen.append(ev)
        if isinstance(ev, S.NeedFrames):
            out: list[bytes] = []
            size = 0
            for raw in itertools.islice(self.st.read_frames(ev.from_lsn), 10_000):
                if out and size + len(raw) > ev.max_bytes:
                    break
                out.append(raw)
                size += len(raw)
            self.session.send_frames(out)
        elif isinstance(ev, S.IngestFrames):
            self.st.ingest_blocking(list(ev.frames))
            self.session.frames_durable(self.st.durable_lsn)


def pump(a: StoreNode, b: StoreNode) -> None:
    for _ in range(100_000):
        moved = False
        for n, p in ((a, b), (b, a)):
            while (ev := n.session.next_event()) is not None:
                moved = True
                n.handle(ev, p)
        if not moved:
            return
    raise AssertionError("did not settle")


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    a = Store.open(str(tmp_path / "a"), node_id=A, options=OPTIONS)
    b = Store.open(str(tmp_path / "b"), node_id=B, options=OPTIONS)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_real_store_catch_up_then_live_stream(stores: tuple[Store, Store]) -> None:
    sa, sb = stores
    with sa.transaction() as t:
        t.add_domain("example.org")
    with sa.transaction() as t:
        t.add_account("alice@example.org", PWHASH)
    workload(sa, 0, 25)
    assert sb.last_lsn == 0 and sa.last_lsn > 30

    clock = FakeClock()
    va = NodeView(A, Role.PRIMARY, DiskState.UP_TO_DATE, history_of(sa), sa.durable_lsn)
    vb = NodeView(B, Role.SECONDARY, DiskState.INCONSISTENT, (), 0)
    na, nb = StoreNode(sa, va, clock), StoreNode(sb, vb, clock)
    sa.add_frame_listener(lambda _lsn, raw: na.session.frames_appended([raw]))
    na.session.start()
    nb.session.start()
    pump(na, nb)

    assert [e.outcome.rule for e in nb.seen if isinstance(e, S.Decision)] == [
        "rule:history-is-prefix"
    ]
    assert sb.last_lsn == sa.last_lsn
    assert sb.index.serialize() == sa.index.serialize()
    assert nb.session.disk is DiskState.UP_TO_DATE

    # Live: the primary keeps writing; every frame follows as it is appended.
    workload(sa, 100, 10)
    pump(na, nb)
    assert sb.last_lsn == sa.last_lsn and na.session.peer_durable == sa.last_lsn
    assert sb.index.serialize() == sa.index.serialize()
    acked = [e for e in na.seen if isinstance(e, S.Acked)]
    assert acked and acked[-1].lsn == sa.last_lsn
    inbox = next(g for g, mb in sb.index.mailboxes.items() if mb.name == "INBOX")
    mb = sb.index.mailboxes[inbox]
    for i in range(len(mb)):
        h = sb.index.blobs.hash_at(mb.blobs[i])
        assert sb.read_blob(h) == sa.read_blob(h)
    assert history_of(sb) == history_of(sa)
