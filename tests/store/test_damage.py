"""A damaged frame in the middle of the log, found at open (`Store.open(damaged_tail_dir=...)`).

Standalone (no directory given) the open is refused as before (`CorruptLog`: fsck's job). A
replicated node gives a directory: the log is cut at the damaged frame, the raw bytes from it
to the end are kept aside, `<data>/DAMAGED` remembers the cut across reopens (`store.damage`)
until `clear_damage()`, and the frames fetched again from an intact copy (`read_frames` →
`ingest`) rebuild exactly the same index.
"""

from __future__ import annotations

import os
import random
import shutil

import pytest

from mailharbor.store import CorruptLog, Store
from mailharbor.store import format as fmt
from mailharbor.store.fsio import OsFileSystem
from mailharbor.store.log import list_segments, scan_segment, segment_path

from . import NODE, OpenStore, drop_checkpoints, inbox, small_options
from .test_repl_api import setup_accounts
from .test_store import assert_same_index, body_of, deliver

SEED = 5150


def _frames_of(data_dir: str) -> list[tuple[int, int, int, int]]:
    """(segno, frame offset, payload offset, LSN) of every frame of the log."""
    fs = OsFileSystem()
    logdir = os.path.join(data_dir, "log")
    out = []
    expected = 1
    for s in list_segments(fs, logdir):
        frames, stops = scan_segment(
            fs, segment_path(logdir, s), s, fmt.SEGMENT_HEADER_SIZE, expected
        )
        for fr in frames:
            out.append((s, fr.offset, fr.payload_offset, fr.header.lsn))
            expected += fr.lsn_count
        assert not stops
    return out


def test_damaged_frame_is_cut_kept_and_fetched_again(
    open_store: OpenStore, data_dir: str, tmp_path: os.PathLike[str]
) -> None:
    rnd = random.Random(SEED)
    print(f"seed {SEED}")
    st = open_store()
    a, _ = setup_accounts(st)
    box = inbox(st, a)
    for i in range(40):
        deliver(st, body_of(i, rnd.randrange(200, 1500)), [box])
    st.close()
    drop_checkpoints(data_dir)  # open replays the whole log, so it reads the damage
    intact_dir = os.path.join(str(tmp_path), "intact")
    shutil.copytree(data_dir, intact_dir)
    frames = _frames_of(data_dir)
    segno, off, payload_off, bad_lsn = frames[len(frames) // 2]
    assert frames[-1][0] > segno or frames[-1][3] > bad_lsn + 1  # valid frames follow
    path = segment_path(os.path.join(data_dir, "log"), segno)
    with open(path, "r+b") as f:
        raw = bytearray(f.read())
        f.seek(payload_off + 3)
        f.write(bytes([raw[payload_off + 3] ^ 0x5A]))
    tail_bytes = sum(
        os.path.getsize(segment_path(os.path.join(data_dir, "log"), s))
        for s in range(segno + 1, frames[-1][0] + 1)
    ) + (len(raw) - off)

    with pytest.raises(CorruptLog, match="valid data follows"):
        Store.open(data_dir, node_id=NODE, options=small_options())

    qdir = os.path.join(data_dir, "quarantine")
    st = Store.open(data_dir, node_id=NODE, options=small_options(), damaged_tail_dir=qdir)
    try:
        assert st.last_lsn == bad_lsn - 1
        d = st.damage
        assert d is not None and d.after_lsn == bad_lsn - 1 and d.segno == segno
        assert d.bytes_kept == tail_bytes
        kept = sum(os.path.getsize(os.path.join(d.kept_in, n)) for n in os.listdir(d.kept_in))
        assert kept == tail_bytes
        st.close()
        # The cut log is clean: a plain open works, and the damage is still remembered.
        st = Store.open(data_dir, node_id=NODE, options=small_options())
        assert st.damage is not None and st.damage.after_lsn == bad_lsn - 1
        # Fetch the range from an intact copy (what the peer does), then clear the marker.
        intact = open_store(intact_dir)
        st.ingest_blocking(list(intact.read_frames(bad_lsn)))
        assert st.last_lsn == intact.last_lsn
        assert st.logical_digest(1, st.last_lsn) == intact.logical_digest(1, intact.last_lsn)
        assert_same_index(st.index, intact.index)
        st.clear_damage()
        st.close()
        st = Store.open(data_dir, node_id=NODE, options=small_options())
        assert st.damage is None
        assert_same_index(st.index, intact.index)
    finally:
        st.close()
