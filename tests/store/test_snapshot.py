"""The retention horizon (`drop_head`) and full-sync snapshots (`export_snapshot`,
`begin_snapshot_install` / `write_snapshot_file` / `install_snapshot`) on real stores.

Covered: dropping the dead head of the log (checkpoint first, live data and `retain_from`
respected, `first_retained_lsn` moves, reopen works; with no usable checkpoint open refuses
instead of replaying a log without its head); a snapshot exported while the source keeps
writing, installed over a target with other data, identical index, then frames after it
ingested; an install interrupted after its intent is finished by the next open; a
half-received snapshot is refused and leaves the old log.
"""

from __future__ import annotations

import os

import pytest

from mailharbor.store import CorruptLog, Store, StoreError
from mailharbor.store import index as ix
from mailharbor.store.store import INSTALL_INTENT, SnapshotExport

from . import NODE2, OpenStore, drop_checkpoints, inbox
from .test_repl_api import setup_accounts
from .test_store import assert_same_index, body_of, deliver, rich_workload


def churn(st: Store, box: bytes, n: int, start: int = 0) -> None:
    """Deliver and expunge `n` messages: dead data over many segments."""
    for i in range(start, start + n):
        d = deliver(st, body_of(20_000 + i, 900), [box])
        with st.transaction() as t:
            t.expunge(box, [d.uids[box]])


def copy_snapshot(exp: SnapshotExport, target: Store, chunk: int = 3000) -> None:
    target.begin_snapshot_install()
    for i, (name, size) in enumerate(exp.files):
        off = 0
        while off < size:
            data = exp.read(i, off, chunk)
            target.write_snapshot_file(name, off, data)
            off += len(data)
        if size == 0:
            target.write_snapshot_file(name, 0, b"")


def test_drop_head_removes_only_dead_covered_segments(open_store: OpenStore, data_dir: str) -> None:
    store = open_store()
    a, _ = setup_accounts(store)
    box = inbox(store, a)
    keep = deliver(store, b"kept for ever", [box])
    churn(store, box, 60)
    assert store.first_retained_lsn == 1
    assert store.drop_head(store.last_lsn + 1) == 0  # segment 1 holds a live blob
    with store.transaction() as t:
        t.expunge(box, [keep.uids[box]])
    churn(store, box, 20, start=100)
    store.compact()
    store.retain_from = 40
    store.drop_head(store.last_lsn + 1)
    assert store.first_retained_lsn <= 40  # retain_from holds the head back
    store.retain_from = 1 << 63
    n = store.drop_head(store.last_lsn + 1)
    assert n > 0 and store.first_retained_lsn > 40
    first = store.first_retained_lsn
    with pytest.raises(StoreError):
        store.logical_digest(1, store.last_lsn)
    before = store.index.serialize()
    store.close()
    st = open_store()
    assert st.first_retained_lsn == first and st.index.serialize() == before
    deliver(st, b"after the horizon", [inbox(st, a)])
    st.close()
    drop_checkpoints(data_dir)
    with pytest.raises(CorruptLog, match="no checkpoint covers it"):
        open_store()


def test_snapshot_installs_over_other_data_then_frames_follow(
    open_store: OpenStore, tmp_path: os.PathLike[str]
) -> None:
    src = open_store(os.path.join(str(tmp_path), "src"))
    a, b = setup_accounts(src)
    rich_workload(src, a, b)
    churn(src, inbox(src, a), 30)
    src.compact()
    src.drop_head(src.last_lsn + 1)
    exp = src.export_snapshot()
    snap_lsn = exp.lsn
    snap_index = src.index.serialize()
    # The source keeps writing while the snapshot is read.
    deliver(src, b"written during the transfer", [inbox(src, a)])
    src.compact()
    dst = open_store(os.path.join(str(tmp_path), "dst"), node=NODE2)
    setup_accounts(dst)  # something else, replaced wholesale
    try:
        copy_snapshot(exp, dst)
    finally:
        exp.close()
    rep = dst.install_snapshot()
    assert rep.last_lsn == snap_lsn == dst.last_lsn
    assert dst.index.serialize() == snap_index
    assert dst.first_retained_lsn == src.first_retained_lsn
    dst.ingest_blocking(list(src.read_frames(snap_lsn + 1)))
    assert_same_index(src.index, dst.index)
    assert dst.logical_digest(dst.first_retained_lsn, dst.last_lsn) == src.logical_digest(
        dst.first_retained_lsn, dst.last_lsn
    )
    path = dst.data_dir
    dst.close()
    again = open_store(path, node=NODE2)
    assert_same_index(src.index, again.index)
    assert isinstance(src.index, ix.Index)


def test_interrupted_install_is_finished_by_open(
    open_store: OpenStore, tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = open_store(os.path.join(str(tmp_path), "src"))
    a, b = setup_accounts(src)
    rich_workload(src, a, b)
    exp = src.export_snapshot()
    dst = open_store(os.path.join(str(tmp_path), "dst"), node=NODE2)
    setup_accounts(dst)
    copy_snapshot(exp, dst)
    exp.close()
    real = dst.fs.replace
    calls = 0

    def crash_after_one(s: str, d: str) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise OSError(5, "power cut")
        real(s, d)

    monkeypatch.setattr(dst.fs, "replace", crash_after_one)
    with pytest.raises(OSError):
        dst.install_snapshot()
    monkeypatch.setattr(dst.fs, "replace", real)
    assert os.path.exists(os.path.join(dst.data_dir, INSTALL_INTENT))
    path = dst.data_dir
    dst.close()
    again = open_store(path, node=NODE2)
    assert not os.path.exists(os.path.join(path, INSTALL_INTENT))
    assert_same_index(src.index, again.index)


def test_half_received_snapshot_is_refused_and_the_old_log_stays(
    open_store: OpenStore, tmp_path: os.PathLike[str]
) -> None:
    src = open_store(os.path.join(str(tmp_path), "src"))
    a, b = setup_accounts(src)
    rich_workload(src, a, b)
    exp = src.export_snapshot()
    dst = open_store(os.path.join(str(tmp_path), "dst"), node=NODE2)
    setup_accounts(dst)
    before = dst.index.serialize()
    dst.begin_snapshot_install()
    name, _size = exp.files[0]
    dst.write_snapshot_file(name, 0, exp.read(0, 0, 100))
    exp.close()
    with pytest.raises(StoreError):
        dst.install_snapshot()
    assert dst.index.serialize() == before
    path = dst.data_dir
    dst.close()
    assert open_store(path, node=NODE2).index.serialize() == before


def test_a_partly_received_snapshot_resumes_after_a_reopen(
    open_store: OpenStore, tmp_path: os.PathLike[str]
) -> None:
    """`save_snapshot_progress` makes the received part durable and records it; after the
    target is reopened, `load_snapshot_progress` gives it back and `resume_snapshot_install`
    continues there (bytes written after the record are cut): the installed result is the
    same as a transfer in one go."""
    src = open_store(os.path.join(str(tmp_path), "src"))
    a, b = setup_accounts(src)
    rich_workload(src, a, b)
    churn(src, inbox(src, a), 20)
    exp = src.export_snapshot()
    total = exp.total_bytes
    dst = open_store(os.path.join(str(tmp_path), "dst"), node=NODE2)
    dst.begin_snapshot_install()
    stream = [
        (name, off, exp.read(i, off, min(700, size - off)))
        for i, (name, size) in enumerate(exp.files)
        for off in range(0, max(size, 1), 700)
    ]
    half = len(stream) // 2
    for name, off, data in stream[:half]:
        dst.write_snapshot_file(name, off, data)
    files = dst.save_snapshot_progress(b"T" * 16)
    for name, off, data in stream[half : half + 3]:  # written after the record: not kept
        dst.write_snapshot_file(name, off, data)
    path = dst.data_dir
    dst.close()
    dst = open_store(path, node=NODE2)
    got = dst.load_snapshot_progress()
    assert got == (b"T" * 16, files)
    held = sum(size for _, size in files)
    assert 0 < held < total
    dst.resume_snapshot_install(files)
    sent_after = 0
    for name, off, data in stream:
        have = dict(files).get(name)
        if have is not None and off + len(data) <= have:
            continue
        if have is not None and off < have:
            data, off = data[have - off :], have
        dst.write_snapshot_file(name, off, data)
        sent_after += len(data)
    assert sent_after == total - held
    rep = dst.install_snapshot()
    exp.close()
    assert rep.last_lsn == src.last_lsn
    assert_same_index(src.index, dst.index)
    assert dst.load_snapshot_progress() is None
