"""The store's replication API on real stores in tmp dirs (nothing mocked).

Covered: `cut_tail` (quarantine file, index rebuilt from an older checkpoint or by replay, across
segments, inside a HOLE, then reopen, then the peer's branch ingested), `read_frames(durable=True)`
while the durability barrier holds frames, `logical_digest` equal on two stores fed the same frames
where one compacted, replication metadata, generations (begin, history, ingest, reopen,
checkpoint, old checkpoint versions ignored), `retain_from` respected by compaction,
`first_retained_lsn`, HOLE frames shipped and ingested.
"""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest

from mailharbor.store import InvalidArgument, Store, StoreError
from mailharbor.store import format as fmt
from mailharbor.store.store import (
    CHECKPOINT_VERSION,
    NO_RETENTION,
    parse_checkpoint,
    read_quarantine,
)

from . import DOMAIN, NODE, NODE2, PWHASH, OpenStore, drop_checkpoints, inbox, small_options
from .test_store import (
    GateBarrier,
    assert_same_index,
    body_of,
    deliver,
    frames_by_lsn,
    rich_workload,
    seal_active_segment,
    until,
)

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


def setup_accounts(st: Store) -> tuple[bytes, bytes]:
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
        b = t.add_account(BOB, PWHASH)
    return a, b


def lsn_of(raw: bytes) -> int:
    return fmt.decode_frame_header(raw).lsn


def reopen(st: Store, open_store: OpenStore, *, replay: bool = False) -> Store:
    st.close()
    if replay:
        drop_checkpoints(st.data_dir)
    return open_store(st.data_dir, st.options, st.node_id)


def copy_of(frames: list[bytes], path: str, open_store: OpenStore, node: bytes = NODE2) -> Store:
    """A store holding exactly `frames` (ingested byte for byte)."""
    st = open_store(path, small_options(), node)
    if frames:
        st.ingest_blocking(frames)
    return st


def ckpt_lsns(st: Store) -> list[int]:
    d = Path(st.data_dir) / "checkpoints"
    return sorted(int(p.name[len("checkpoint-") : -len(".ckpt")]) for p in d.glob("*.ckpt"))


# --- replication metadata ---------------------------------------------------------------------


def test_repl_meta_roundtrip(open_store: OpenStore) -> None:
    st = open_store()
    assert st.load_repl_meta() is None
    st.save_repl_meta(b"\x00first")
    assert st.load_repl_meta() == b"\x00first"
    st.save_repl_meta(b"second, longer than the first")
    assert st.load_repl_meta() == b"second, longer than the first"
    path = Path(st.data_dir) / "repl" / "meta"
    assert path.read_bytes() == b"second, longer than the first"
    assert sorted(os.listdir(path.parent)) == ["meta"]  # no temporary file left
    frames = list(st.read_frames(1))
    st = reopen(st, open_store)
    assert st.load_repl_meta() == b"second, longer than the first"
    assert list(st.read_frames(1)) == frames  # never in the log


# --- generations ------------------------------------------------------------------------------


def test_generations_begin_reopen_and_checkpoint(open_store: OpenStore) -> None:
    st = open_store()
    assert st.generation == 1 and st.generations() == []
    a, _ = setup_accounts(st)
    assert st.generations() == [(1, 1)]
    with pytest.raises(InvalidArgument):
        st.begin_generation(1)
    st.begin_generation(3)
    assert st.generation == 3 and st.generations() == [(1, 1)]  # nothing written in it yet
    d = deliver(st, body_of(1), [inbox(st, a)])
    lsn3 = st.last_lsn
    assert fmt.decode_frame_header(next(iter(st.read_frames(lsn3)))).generation == 3
    deliver(st, body_of(2), [inbox(st, a)])
    st.begin_generation(7)
    deliver(st, body_of(3), [inbox(st, a)])
    lsn7 = st.last_lsn
    expected = [(1, 1), (3, lsn3), (7, lsn7)]
    assert st.generations() == expected
    assert st.generation_history() == [(g, first, NODE) for g, first in expected]
    assert d.uids[inbox(st, a)] == 1
    st.checkpoint()
    st = reopen(st, open_store)  # from the checkpoint
    assert st.recovery is not None and st.recovery.checkpoint_lsn == st.last_lsn
    assert st.generations() == expected and st.generation == 7
    st = reopen(st, open_store, replay=True)  # by replay
    assert st.recovery is not None and st.recovery.checkpoint_lsn == 0
    assert st.generations() == expected and st.generation == 7
    # A begun generation survives a reopen even without frames (it is persisted).
    st.begin_generation(9)
    st = reopen(st, open_store, replay=True)
    assert st.generation == 9 and st.generations() == expected
    deliver(st, body_of(4), [inbox(st, a)])
    assert st.generations()[-1] == (9, st.last_lsn)


@pytest.mark.parametrize("old_version", [1, 2])
def test_old_checkpoint_version_is_ignored(open_store: OpenStore, old_version: int) -> None:
    st = open_store()
    a, _ = setup_accounts(st)
    for i in range(5):
        deliver(st, body_of(i), [inbox(st, a)])
    lsn = st.checkpoint()
    data_dir = st.data_dir
    index = st.index.serialize()
    st.close()
    path = Path(data_dir) / "checkpoints" / f"checkpoint-{lsn:020d}.ckpt"
    raw = bytearray(path.read_bytes())
    assert parse_checkpoint(bytes(raw)).history == ((1, 1, NODE),)
    assert struct.unpack_from("<H", raw, 8) == (CHECKPOINT_VERSION,)
    raw[8:10] = struct.pack("<H", old_version)  # what a previous version wrote there
    path.write_bytes(bytes(raw))
    st = open_store(data_dir)
    assert st.recovery is not None
    assert st.recovery.checkpoint_lsn == 0 and "format version" in st.recovery.checkpoint_rejected
    assert st.index.serialize() == index
    assert st.generations() == [(1, 1)]


def test_ingested_generations_and_older_generation_refused(
    open_store: OpenStore, tmp_path: Path
) -> None:
    primary = open_store()
    a, _ = setup_accounts(primary)
    deliver(primary, body_of(1), [inbox(primary, a)])
    primary.begin_generation(4)
    deliver(primary, body_of(2), [inbox(primary, a)])
    secondary = copy_of(list(primary.read_frames(1)), str(tmp_path / "s"), open_store)
    assert secondary.generations() == primary.generations() == [(1, 1), (4, primary.last_lsn)]
    assert secondary.generation_history() == primary.generation_history()
    assert secondary.generation == 4
    older = fmt.encode_frame(
        lsn=secondary.last_lsn + 1,
        generation=3,
        node_id=NODE,
        time_ms=1,
        payload=fmt.encode_records([fmt.DomainAdd("older.example")]),
        nrecords=1,
    )
    with pytest.raises(InvalidArgument, match="generation"):
        secondary.ingest_blocking([older])
    assert secondary.last_lsn == primary.last_lsn
    secondary = reopen(secondary, open_store, replay=True)
    assert secondary.generations() == primary.generations()


def test_begin_generation_refused_while_pending(store: Store, alice: bytes) -> None:
    box = inbox(store, alice)

    async def main() -> None:
        barrier = GateBarrier()
        store.barrier = barrier
        task = asyncio.create_task(commit_async(store, box, b"held"))
        await until(lambda: bool(barrier.waits))
        with pytest.raises(StoreError):
            store.begin_generation(store.generation + 1)
        barrier.release()
        await task
        store.barrier = None

    asyncio.run(main())
    store.begin_generation(store.generation + 1)


async def commit_async(st: Store, box: bytes, body: bytes) -> int:
    async with st.transaction() as t:
        t.deliver(t.put_blob(body), [box])
    return t.committed_lsn


# --- read_frames(durable=True) ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_read_frames_durable_while_the_barrier_holds(store: Store, alice: bytes) -> None:
    box = inbox(store, alice)
    deliver(store, b"before", [box])
    assert list(store.read_frames(1, durable=True)) == list(store.read_frames(1))

    async def main() -> None:
        barrier = GateBarrier()
        store.barrier = barrier
        task = asyncio.create_task(commit_async(store, box, b"held by the barrier"))
        await until(lambda: bool(barrier.waits))
        lsn = barrier.waits[0]
        assert store.durable_lsn >= lsn > store.visible_lsn
        visible = [lsn_of(f) for f in store.read_frames(1)]
        durable = list(store.read_frames(1, durable=True))
        assert max(visible) == store.visible_lsn < lsn
        assert [lsn_of(f) for f in durable] == list(range(1, store.durable_lsn + 1))
        held = durable[-1]
        assert blob_in(held, b"held by the barrier")
        assert list(store.read_frames(lsn, durable=True)) == [held]
        assert list(store.read_frames(lsn)) == []
        # Nothing may be cut or begun while the barrier holds frames.
        with pytest.raises(StoreError):
            store.cut_tail(1, os.path.join(store.data_dir, "q.mhq"))
        barrier.release()
        assert await task == lsn
        assert list(store.read_frames(lsn)) == [held]
        store.barrier = None

    asyncio.run(main())


def blob_in(raw: bytes, body: bytes) -> bool:
    recs = fmt.decode_records(raw[fmt.FRAME_HEADER_SIZE :])
    return any(isinstance(r, fmt.Blob) and r.data == body for r in recs)


# --- cut_tail ----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_cut_tail_across_segments_from_an_older_checkpoint(
    open_store: OpenStore, tmp_path: Path
) -> None:
    st = open_store()
    a, b = setup_accounts(st)
    rich_workload(st, a, b)
    early_ckpt = st.checkpoint()
    for i in range(12):
        deliver(st, body_of(100 + i, 700), [inbox(st, a)])
    after = st.last_lsn
    reference_frames = list(st.read_frames(1))
    reference = copy_of(reference_frames, str(tmp_path / "ref"), open_store)
    segs_at_cut = len(st.segments())
    for i in range(40):  # the tail: several segments, chunked bodies, a checkpoint inside
        deliver(st, body_of(200 + i, 3000 if i % 5 == 0 else 600), [inbox(st, b)])
        if i == 20:
            st.checkpoint()
    st.begin_generation(2)
    deliver(st, body_of(300, 500), [inbox(st, a)])
    assert len(st.segments()) > segs_at_cut + 2
    assert [c for c in ckpt_lsns(st) if c > after], "a checkpoint covers the tail"
    full = list(st.read_frames(1))
    last = st.last_lsn
    qpath = str(tmp_path / "quarantine" / "cut-1.mhq")

    n = st.cut_tail(after, qpath)

    assert n == last - after
    assert st.last_lsn == st.durable_lsn == st.visible_lsn == after
    assert list(st.read_frames(1)) == reference_frames
    assert_same_index(reference.index, st.index)
    assert st.generations() == [(1, 1)] and st.generation == 2  # the generation never goes back
    assert all(c <= after for c in ckpt_lsns(st))
    assert early_ckpt in ckpt_lsns(st)
    q = read_quarantine(Path(qpath).read_bytes())
    assert (q.after_lsn, q.first_lsn, q.last_lsn, q.node_id) == (after, after + 1, last, NODE)
    assert list(q.frames) == full[len(reference_frames) :]
    assert st.last_cut is not None and st.last_cut.frames == n
    assert not os.path.exists(qpath + ".tmp")
    assert not os.path.exists(os.path.join(st.data_dir, "log", "CUT-INTENT"))
    # Reopen: from the older checkpoint, then by full replay.
    st = reopen(st, open_store)
    assert st.recovery is not None and st.recovery.checkpoint_lsn <= after
    assert st.recovery.cut_redone == ""
    assert list(st.read_frames(1)) == reference_frames
    assert_same_index(reference.index, st.index)
    st = reopen(st, open_store, replay=True)
    assert_same_index(reference.index, st.index)
    # The store goes on from the cut.
    d = deliver(st, b"after the cut", [inbox(st, a)])
    assert st.last_lsn == after + 1
    assert d.uids[inbox(st, a)] == reference.index.mailboxes[inbox(reference, a)].uidnext
    assert fmt.decode_frame_header(next(iter(st.read_frames(after + 1)))).generation == 2
    st = reopen(st, open_store, replay=True)
    assert st.read_blob(fmt_hash(b"after the cut")) == b"after the cut"
    assert st.cut_tail(st.last_lsn, str(tmp_path / "q2.mhq")) == 0
    assert not os.path.exists(tmp_path / "q2.mhq")
    with pytest.raises(InvalidArgument):
        st.cut_tail(-1, str(tmp_path / "q3.mhq"))


def fmt_hash(data: bytes) -> bytes:
    from mailharbor.store import blob_hash

    return blob_hash(data)


def test_cut_tail_at_segment_boundary_and_to_empty(open_store: OpenStore, tmp_path: Path) -> None:
    st = open_store()
    a, _ = setup_accounts(st)
    while len(st.segments()) < 3:
        deliver(st, body_of(st.last_lsn, 900), [inbox(st, a)])
    # Cut exactly where the last segment begins: it stays, empty.
    last_seg = st.segments()[-1][0]
    first_of_last = st._segments[last_seg].first_lsn
    last = st.last_lsn
    assert st.cut_tail(first_of_last - 1, str(tmp_path / "a.mhq")) == last - first_of_last + 1
    assert st.last_lsn == first_of_last - 1
    assert st.segments()[-1] == (last_seg, fmt.SEGMENT_HEADER_SIZE)
    deliver(st, b"x", [inbox(st, a)])
    # Cut everything: an empty log that works.
    assert st.cut_tail(0, str(tmp_path / "b.mhq")) == first_of_last
    assert st.last_lsn == 0 and st.index.accounts == {} and st.generations() == []
    st = reopen(st, open_store, replay=True)
    assert st.last_lsn == 0
    setup_accounts(st)
    assert st.last_lsn == 1


def test_crashed_primary_rejoins_cut_then_catch_up(open_store: OpenStore, tmp_path: Path) -> None:
    """A's unacknowledged tail is cut and quarantined; A then ingests B's branch (generation 2)
    from the divergence point and ends equal to B, byte for byte."""
    a_st = open_store()
    acct, _ = setup_accounts(a_st)
    for i in range(6):
        deliver(a_st, body_of(i), [inbox(a_st, acct)])
    b_st = copy_of(list(a_st.read_frames(1)), str(tmp_path / "b"), open_store)
    d = a_st.last_lsn
    for i in range(4):  # A's tail: never reached B
        deliver(a_st, body_of(50 + i), [inbox(a_st, acct)])
    b_st.begin_generation(2)  # B promoted without its peer
    for i in range(7):
        deliver(b_st, body_of(80 + i), [inbox(b_st, acct)])
    assert a_st.cut_tail(d, str(tmp_path / "a-tail.mhq")) == 4
    a_st.ingest_blocking(list(b_st.read_frames(d + 1)))
    assert frames_by_lsn(a_st) == frames_by_lsn(b_st)
    assert_same_index(b_st.index, a_st.index)
    assert a_st.generation_history() == b_st.generation_history()
    assert a_st.logical_digest(1, a_st.last_lsn) == b_st.logical_digest(1, b_st.last_lsn)
    a_st = reopen(a_st, open_store, replay=True)
    assert_same_index(b_st.index, a_st.index)


def hole_frame(lsn: int, count: int) -> bytes:
    return fmt.encode_frame(
        lsn=lsn,
        generation=0,
        node_id=NODE2,
        time_ms=5,
        payload=fmt.encode_records([fmt.Hole(count, "lost in a test")]),
        nrecords=1,
        kind=fmt.FrameKind.HOLE,
    )


def test_hole_frames_are_shipped_ingested_digested_and_cut(
    open_store: OpenStore, tmp_path: Path
) -> None:
    primary = open_store()
    a, _ = setup_accounts(primary)
    for i in range(10):
        deliver(primary, body_of(i), [inbox(primary, a)])
    frames = list(primary.read_frames(1))
    # A store whose log lost LSNs 4..6 (as `fsck --repair` leaves it), built by ingest.
    damaged = copy_of(frames[:3], str(tmp_path / "damaged"), open_store)
    damaged.ingest_blocking([hole_frame(4, 3), *frames[6:]])
    assert damaged.last_lsn == primary.last_lsn
    shipped = list(damaged.read_frames(1))
    assert [lsn_of(f) for f in shipped] == [1, 2, 3, 4, *range(7, primary.last_lsn + 1)]
    third = copy_of(shipped, str(tmp_path / "third"), open_store)
    assert frames_by_lsn(third) == frames_by_lsn(damaged)
    assert third.logical_digest(1, 10) == damaged.logical_digest(1, 10)
    assert third.logical_digest(1, 10) != primary.logical_digest(1, 10)
    assert third.logical_digest(7, 10) == primary.logical_digest(7, 10)
    third = reopen(third, open_store, replay=True)
    assert third.last_lsn == primary.last_lsn
    # A cut inside the hole cuts the whole hole: the log ends before it.
    n = third.cut_tail(5, str(tmp_path / "hole.mhq"))
    assert third.last_lsn == 3 and n == len(shipped) - 3
    q = read_quarantine((tmp_path / "hole.mhq").read_bytes())
    assert q.after_lsn == 3 and q.frames[0] == shipped[3]
    third.ingest_blocking(frames[3:])  # fetched from the intact peer instead
    assert frames_by_lsn(third) == frames_by_lsn(primary)


# --- logical digest, retention --------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_logical_digest_equal_after_compaction(open_store: OpenStore, tmp_path: Path) -> None:
    primary = open_store()
    a, b = setup_accounts(primary)
    rich_workload(primary, a, b)
    for i in range(30):
        d = deliver(primary, body_of(500 + i, 2500 if i % 3 else 900), [inbox(primary, a)])
        if i % 2:
            with primary.transaction() as t:
                t.expunge(inbox(primary, a), [d.uids[inbox(primary, a)]])
    seal_active_segment(primary, inbox(primary, b))
    secondary = copy_of(list(primary.read_frames(1)), str(tmp_path / "s"), open_store)
    before = frames_by_lsn(secondary)
    report = secondary.compact()
    assert report.segments_rewritten > 0 and report.blobs_reclaimed > 0
    after = frames_by_lsn(secondary)
    changed = [lsn for lsn in before if before[lsn] != after[lsn]]
    assert changed, "compaction should have rewritten frames"
    last = primary.last_lsn
    assert secondary.logical_digest(1, last) == primary.logical_digest(1, last)
    for lo, hi in ((1, 1), (changed[0], changed[0]), (changed[0], last), (2, changed[-1])):
        assert secondary.logical_digest(lo, hi) == primary.logical_digest(lo, hi), (lo, hi)
    assert primary.logical_digest(1, last) != primary.logical_digest(1, last - 1)
    assert primary.logical_digest(2, 3) != primary.logical_digest(1, 3)
    assert len(primary.logical_digest(1, last)) == 32
    # A different record at one LSN changes the digest.
    other = copy_of(list(primary.read_frames(1))[:-1], str(tmp_path / "o"), open_store)
    deliver(other, b"something else", [inbox(other, a)])
    assert other.last_lsn == last
    assert other.logical_digest(1, last) != primary.logical_digest(1, last)
    assert other.logical_digest(1, last - 1) == primary.logical_digest(1, last - 1)
    # Ranges that are not held are refused.
    for lo, hi in ((0, 3), (5, 4), (1, last + 1)):
        with pytest.raises(InvalidArgument):
            primary.logical_digest(lo, hi)
    secondary = reopen(secondary, open_store, replay=True)
    assert secondary.logical_digest(1, last) == primary.logical_digest(1, last)


@pytest.mark.timeout(120)
def test_retain_from_is_respected_by_compaction(open_store: OpenStore, tmp_path: Path) -> None:
    st = open_store()
    a, b = setup_accounts(st)
    assert st.retain_from == NO_RETENTION and st.first_retained_lsn == 1
    uids = []
    for i in range(40):
        d = deliver(st, body_of(700 + i, 1500), [inbox(st, a)])
        uids.append(d.uids[inbox(st, a)])
    retain = st.last_lsn // 2
    with st.transaction() as t:
        t.expunge(inbox(st, a), uids)  # every body dead
    seal_active_segment(st, inbox(st, b))
    before = frames_by_lsn(st)
    st.retain_from = retain
    report = st.compact()
    assert report.segments_rewritten > 0
    after = frames_by_lsn(st)
    changed = sorted(lsn for lsn in before if before[lsn] != after[lsn])
    assert changed and max(changed) < retain
    assert all(after[lsn] == before[lsn] for lsn in before if lsn >= retain)
    assert st.first_retained_lsn == 1
    # Lifting the retention lets the rest go.
    st.retain_from = NO_RETENTION
    st.compact()
    final = frames_by_lsn(st)
    assert any(final[lsn] != before[lsn] for lsn in before if lsn >= retain)
    assert st.logical_digest(1, st.last_lsn) == copy_of(
        list(before.values()), str(tmp_path / "c"), open_store
    ).logical_digest(1, st.last_lsn)
