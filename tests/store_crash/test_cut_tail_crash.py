"""`Store.cut_tail` powered off at every fsync (crashmodel.CacheModelFS), and at every fsync of
the open that finishes an interrupted cut.

After a power cut at any point of a cut, the store must open with either the whole tail (state and
last LSN as before the cut) or exactly the cut state (the state at the cut LSN); in the cut state
the quarantine file is whole (every cut frame, verbatim) and no checkpoint beyond the cut is left;
either way the store then takes a write and survives a full replay. The redo at open is itself
powered off at each of its fsyncs and must reach the cut state every time.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from crashmodel import CacheModelFS, DurableImage
from mailharbor.store import Store
from mailharbor.store.store import read_quarantine
from store_crash import NODE, logical_state, prepare_store
from store_crash.test_crash_model import ACCOUNTS, OPTS, VERIFY_OPTS, Workload, seeded


def ckpt_lsns(data_dir: Path) -> list[int]:
    d = data_dir / "checkpoints"
    return sorted(int(p.name[11:-5]) for p in d.glob("checkpoint-*.ckpt"))


def check_usable(data_dir: Path, last: int) -> str:
    """A write after recovery, then a full replay: returns a problem or ''."""
    st = Store.open(str(data_dir), node_id=NODE, options=VERIFY_OPTS)
    try:
        with st.transaction() as t:
            t.add_domain("after-the-crash.test")
        if st.last_lsn != last + 1:
            return f"the write after recovery got LSN {st.last_lsn}, expected {last + 1}"
    finally:
        st.close()
    for p in (data_dir / "checkpoints").iterdir():
        p.unlink()
    st = Store.open(str(data_dir), node_id=NODE, options=VERIFY_OPTS)
    try:
        if "after-the-crash.test" not in st.index.domains or st.last_lsn != last + 1:
            return "the write after recovery did not survive a full replay"
    finally:
        st.close()
    return ""


@pytest.mark.timeout(300)
def test_cut_tail_power_cut_at_every_fsync(tmp_path: Path, mailharbor_seed: int) -> None:
    rng, _ = seeded(mailharbor_seed, "cut_tail_crash")
    root = tmp_path / "root"
    data_dir = root / "data"
    prepare_store(str(data_dir), OPTS, ACCOUNTS)
    fs = CacheModelFS(str(root))
    st = Store.open(str(data_dir), node_id=NODE, options=OPTS, fs=fs)
    wl = Workload(st, rng)
    states: dict[int, tuple[object, ...]] = {st.last_lsn: logical_state(st)}
    for i in range(30):
        wl.step()
        states[st.last_lsn] = logical_state(st)
        if i == 15:
            st.checkpoint()
    after = st.last_lsn
    segs_at_cut = len(st.segments())
    st.begin_generation(2)
    # At least 30 steps, and as many more as it takes for the tail to span two new segments
    # (how much a step writes depends on the seed).
    i = 0
    while i < 30 or len(st.segments()) < segs_at_cut + 2:
        wl.step()
        if i == 10:
            st.checkpoint()  # a checkpoint beyond the cut: must not survive it
        i += 1
        assert i < 1000, "the workload does not fill segments"
    full_last = st.last_lsn
    full_state = logical_state(st)
    tail = list(st.read_frames(after + 1))
    qpath = root / "quarantine" / "cut.mhq"

    captures: list[DurableImage] = [fs.capture("before the cut", "")]
    fs.on_sync.append(lambda ev, p: captures.append(fs.capture(ev, p)))
    assert st.cut_tail(after, str(qpath)) == len(tail)
    fs.on_sync.clear()
    assert logical_state(st) == states[after] and st.last_lsn == after
    st.close()

    problems: list[str] = []
    seen = {"whole tail": 0, "cut": 0, "cut redone at open": 0}
    redone: list[DurableImage] = []
    for k, img in enumerate(captures):
        where = f"power cut at fsync {k} of the cut ({img.event} {os.path.basename(img.path)})"
        dest = tmp_path / f"img{k}"
        img.materialize(str(dest))
        d = dest / "data"
        try:
            st2 = Store.open(str(d), node_id=NODE, options=VERIFY_OPTS)
        except Exception as e:
            problems.append(f"{where}: open failed: {type(e).__name__}: {e}")
            continue
        try:
            last, state = st2.last_lsn, logical_state(st2)
            redo = st2.recovery is not None and st2.recovery.cut_redone != ""
            history = st2.generations()
        finally:
            st2.close()
        if last == full_last and state == full_state:
            seen["whole tail"] += 1
            if history[-1][0] != 2:
                problems.append(f"{where}: generation history {history} lost generation 2")
        elif last == after and state == states[after]:
            seen["cut"] += 1
            if redo:
                seen["cut redone at open"] += 1
                redone.append(img)
            q = dest / "quarantine" / "cut.mhq"
            if not q.exists():
                problems.append(f"{where}: cut, but no quarantine file")
            else:
                try:
                    frames = list(read_quarantine(q.read_bytes()).frames)
                except Exception as e:
                    problems.append(f"{where}: cut, quarantine damaged: {e}")
                else:
                    if frames != tail:
                        problems.append(f"{where}: cut, quarantine frames differ from the tail")
            if any(c > after for c in ckpt_lsns(d)):
                problems.append(f"{where}: cut, a checkpoint beyond the cut survived")
            if any(g == 2 for g, _ in history):
                problems.append(f"{where}: cut, generation 2 still in the history {history}")
        else:
            problems.append(
                f"{where}: opened at LSN {last} with a state that is neither the whole tail "
                f"(LSN {full_last}) nor the cut (LSN {after})"
            )
            continue
        p = check_usable(d, last)
        if p:
            problems.append(f"{where}: {p}")
        shutil.rmtree(dest, ignore_errors=True)
    print(f"{len(captures)} images: {seen}")
    assert not problems, "\n".join(problems[:12])
    assert all(seen.values()), seen

    # The open that finishes a cut, itself powered off at each of its fsyncs.
    for j, img in enumerate(redone[:2]):
        base = tmp_path / f"redo{j}"
        img.materialize(str(base / "root"))
        fs2 = CacheModelFS(str(base / "root"))
        caps: list[DurableImage] = []

        def hook(ev: str, p: str, fs2: CacheModelFS = fs2, caps: list[DurableImage] = caps) -> None:
            caps.append(fs2.capture(ev, p))

        fs2.on_sync.append(hook)
        st3 = Store.open(str(base / "root" / "data"), node_id=NODE, options=OPTS, fs=fs2)
        assert st3.recovery is not None and st3.recovery.cut_redone
        st3.close()
        assert caps
        for k, cap in enumerate(caps):
            dest = base / f"n{k}"
            cap.materialize(str(dest))
            st4 = Store.open(str(dest / "data"), node_id=NODE, options=VERIFY_OPTS)
            try:
                assert (st4.last_lsn, logical_state(st4)) == (after, states[after]), (
                    f"redo image {j}, power cut at fsync {k} ({cap.event} {cap.path})"
                )
            finally:
                st4.close()
        shutil.rmtree(base, ignore_errors=True)
