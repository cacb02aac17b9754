"""The cut of a damaged log at open (`Store.open(damaged_tail_dir=...)`) powered off at every
fsync (crashmodel.CacheModelFS).

After a power cut at any point, a replicated open (`damaged_tail_dir` given) must reach the cut
state — the log ends right before the damaged frame with exactly the state the intact log had
there, `<data>/DAMAGED` names that LSN, and the bytes it names as kept are whole — and the store
then takes a write and survives a full replay. A standalone open of the same image either still
refuses (the cut had not begun) or opens the cut log: never anything in between.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from crashmodel import CacheModelFS, DurableImage
from mailharbor.store import CorruptLog, Store
from mailharbor.store import format as fmt
from mailharbor.store.fsio import OsFileSystem
from mailharbor.store.log import list_segments, scan_segment, segment_path
from store_crash import NODE, logical_state, prepare_store
from store_crash.test_crash_model import ACCOUNTS, OPTS_NO_AUTO_CKPT, VERIFY_OPTS, Workload, seeded

from .test_cut_tail_crash import check_usable


def _frames(data_dir: Path) -> list[tuple[int, int, int, int]]:
    """(segno, frame offset, payload offset, LSN) of every frame."""
    fs = OsFileSystem()
    logdir = str(data_dir / "log")
    out: list[tuple[int, int, int, int]] = []
    expected = 1
    for s in list_segments(fs, logdir):
        it, stops = scan_segment(fs, segment_path(logdir, s), s, fmt.SEGMENT_HEADER_SIZE, expected)
        for fr in it:
            out.append((s, fr.offset, fr.payload_offset, fr.header.lsn))
            expected += fr.lsn_count
        assert not stops
    return out


@pytest.mark.timeout(300)
def test_damaged_open_power_cut_at_every_fsync(tmp_path: Path, mailharbor_seed: int) -> None:
    rng, _ = seeded(mailharbor_seed, "damage_cut_crash")
    root = tmp_path / "root"
    data_dir = root / "data"
    prepare_store(str(data_dir), OPTS_NO_AUTO_CKPT, ACCOUNTS)
    st = Store.open(str(data_dir), node_id=NODE, options=OPTS_NO_AUTO_CKPT)
    wl = Workload(st, rng)
    for _ in range(40):
        wl.step()
    st.close()
    for p in (data_dir / "checkpoints").iterdir():
        p.unlink()  # open replays the whole log, so it reads the damage
    frames = _frames(data_dir)
    segno, off, payload_off, bad = frames[len(frames) // 2 + rng.randrange(len(frames) // 4)]
    # the state the intact log has right before the damaged frame
    ref_dir = tmp_path / "ref"
    shutil.copytree(data_dir, ref_dir)
    ref = Store.open(str(ref_dir), node_id=NODE, options=VERIFY_OPTS)
    ref.cut_tail(bad - 1, str(tmp_path / "ref-quarantine"))
    want = logical_state(ref)
    ref.close()
    seg = segment_path(str(data_dir / "log"), segno)
    with open(seg, "r+b") as f:
        f.seek(payload_off + rng.randrange(8))
        b = f.read(1)
        f.seek(f.tell() - 1)
        f.write(bytes([b[0] ^ 0x3C]))
    tail = sum(
        os.path.getsize(segment_path(str(data_dir / "log"), s))
        for s in list_segments(OsFileSystem(), str(data_dir / "log"))
        if s > segno
    ) + (os.path.getsize(seg) - off)

    fs = CacheModelFS(str(root))
    captures: list[DurableImage] = [fs.capture("before the open", "")]
    fs.on_sync.append(lambda ev, p: captures.append(fs.capture(ev, p)))
    qdir = str(root / "quarantine")
    st = Store.open(
        str(data_dir), node_id=NODE, options=OPTS_NO_AUTO_CKPT, fs=fs, damaged_tail_dir=qdir
    )
    fs.on_sync.clear()
    assert st.last_lsn == bad - 1 and st.damage is not None and st.damage.after_lsn == bad - 1
    st.close()

    problems: list[str] = []
    seen = {"refused standalone": 0, "cut": 0}
    for k, img in enumerate(captures):
        where = f"power cut at fsync {k} ({img.event} {os.path.basename(img.path)})"
        dest = tmp_path / f"img{k}"
        img.materialize(str(dest))
        d = dest / "data"
        try:
            plain = Store.open(str(d), node_id=NODE, options=VERIFY_OPTS)
        except CorruptLog:
            seen["refused standalone"] += 1
        else:
            seen["cut"] += 1
            if plain.last_lsn != bad - 1 or logical_state(plain) != want:
                problems.append(f"{where}: standalone open at LSN {plain.last_lsn}, not the cut")
            plain.close()
        st2 = Store.open(
            str(d), node_id=NODE, options=VERIFY_OPTS, damaged_tail_dir=str(dest / "quarantine")
        )
        try:
            dmg = st2.damage
            if st2.last_lsn != bad - 1 or logical_state(st2) != want:
                problems.append(f"{where}: replicated open at LSN {st2.last_lsn}, not the cut")
            elif dmg is None or dmg.after_lsn != bad - 1:
                problems.append(f"{where}: cut, but the damage marker says {dmg}")
            else:
                kept = dest / "quarantine" / os.path.basename(dmg.kept_in)
                size = sum(x.stat().st_size for x in kept.iterdir()) if kept.is_dir() else -1
                if size != tail or dmg.bytes_kept != tail:
                    problems.append(f"{where}: kept {size} B ({dmg.bytes_kept}), expected {tail}")
        finally:
            st2.close()
        problem = check_usable(d, bad - 1)
        if problem:
            problems.append(f"{where}: {problem}")
        shutil.rmtree(dest, ignore_errors=True)
    print(f"{len(captures)} images: {seen}")
    assert not problems, "\n".join(problems[:12])
    assert all(seen.values()), seen
