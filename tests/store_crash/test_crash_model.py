"""The store powered off at every fsync (and at random points, with torn writes), in process.

A workload runs on a store whose file system is `crashmodel.CacheModelFS`, a model of a volatile
write cache. After every fsync the model's durable state is captured together with how many
transactions had been acknowledged (their commit had returned) at that instant; at random writes a
torn image is captured too (the durable state plus a random prefix of an unsynced tail, maybe
followed by zeros or garbage). Afterwards each image is written out and reopened with a plain
`Store.open`, and must show exactly the state after some number m of the workload's transactions
with m >= the number acknowledged (every acknowledged transaction fully present, nothing partly
visible), serve every body byte-exact, open read-write (a torn tail dropped and reported), and
survive a write and a full replay after that.

Also here: bit flips (a sealed segment → CorruptLog; the last frame → torn tail; a checkpoint →
ignored), `fsck` on damaged stores, async group commit under the model, and unit tests of the
model itself. Everything is seeded from the run's seed (tests/conftest.py); each test prints it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from crashmodel import CacheModelFS, DurableImage
from mailharbor.store import (
    CorruptLog,
    Store,
    StoreIOError,
    StoreOptions,
    Transaction,
    blob_hash,
)
from mailharbor.store import format as fmt
from mailharbor.store import index as ix
from mailharbor.store.fsck import fsck
from mailharbor.store.log import list_segments, segment_path
from store_crash import (
    DOMAIN,
    NODE,
    PWHASH,
    check_bodies,
    describe_state,
    logical_state,
    prepare_store,
    state_message_count,
    visible_hashes,
)

OPTS = StoreOptions(
    segment_bytes=48 * 1024,
    chunk_bytes=8 * 1024,
    checkpoint_every_bytes=160 * 1024,
    cache_bytes=256 * 1024,
)
# Reopening images: the same store, fsync off (the copy's own durability is not under test).
VERIFY_OPTS = dataclasses.replace(OPTS, sync=False)
# For stores built to be damaged: checkpoints only where a test asks for one.
OPTS_NO_AUTO_CKPT = dataclasses.replace(OPTS, checkpoint_every_bytes=1 << 40)
ACCOUNTS = tuple(f"u{i}@{DOMAIN}" for i in range(3))


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def seeded(mailharbor_seed: int, name: str) -> tuple[random.Random, int]:
    seed = random.Random(f"{mailharbor_seed}:{name}").randrange(2**32)
    print(f"{name}: seed {seed} (run seed {mailharbor_seed}; MAILHARBOR_SEED reproduces)")
    return random.Random(seed), seed


# --- the model itself ---------------------------------------------------------------------------


def test_model_unsynced_append_is_lost(workdir: Path) -> None:
    root = workdir / "root"
    root.mkdir()
    fs = CacheModelFS(str(root))
    f = fs.open_append(str(root / "a"))
    f.write(b"durable")
    f.sync()
    fs.sync_dir(str(root))
    f.write(b" volatile")
    assert (root / "a").read_bytes() == b"durable volatile"
    assert fs.capture().files() == {"a": b"durable"}
    f.close()


def test_model_new_file_needs_dir_sync(workdir: Path) -> None:
    root = workdir / "root"
    root.mkdir()
    fs = CacheModelFS(str(root))
    fs.makedirs(str(root / "d"))
    f = fs.open_append(str(root / "d" / "x"))
    f.write(b"data")
    f.sync()
    assert fs.capture().files() == {}
    fs.sync_dir(str(root / "d"))
    assert fs.capture().tree == {}, "d itself was never made durable in root"
    fs.sync_dir(str(root))
    assert fs.capture().files() == {"d/x": b"data"}
    f.close()


def test_model_rename_and_unlink_need_dir_sync(workdir: Path) -> None:
    root = workdir / "root"
    root.mkdir()
    (root / "old").write_bytes(b"old content")
    fs = CacheModelFS(str(root))
    fs.write_atomic(str(root / "ck"), b"v1")
    assert fs.capture().files() == {"old": b"old content", "ck": b"v1"}
    f = fs.open_append(str(root / "tmp"))
    f.write(b"new")
    f.sync()
    f.close()
    fs.replace(str(root / "tmp"), str(root / "old"))
    fs.unlink(str(root / "ck"))
    assert fs.capture().files() == {"old": b"old content", "ck": b"v1"}
    fs.sync_dir(str(root))
    assert fs.capture().files() == {"old": b"new"}


def test_model_write_atomic_every_step(workdir: Path) -> None:
    root = workdir / "root"
    root.mkdir()
    (root / "f").write_bytes(b"v1")
    fs = CacheModelFS(str(root))
    seen: list[dict[str, bytes]] = []
    fs.on_sync.append(lambda ev, p: seen.append(fs.capture().files()))
    fs.write_atomic(str(root / "f"), b"v2-longer")
    assert fs.fsync_count == 2
    assert [s.get("f") for s in seen] == [b"v1", b"v2-longer"]
    assert all(len(s) == 1 for s in seen), seen  # the temporary name is never durable


def test_model_truncate_and_torn(workdir: Path, mailharbor_seed: int) -> None:
    rng, _ = seeded(mailharbor_seed, "model_torn")
    root = workdir / "root"
    root.mkdir()
    (root / "seg").write_bytes(b"A" * 100)
    fs = CacheModelFS(str(root))
    fs.truncate(str(root / "seg"), 40)
    assert fs.capture().files()["seg"] == b"A" * 40
    f = fs.open_append(str(root / "seg"))
    f.write(b"B" * 60)
    modes = set()
    for _ in range(40):
        img = fs.capture_torn(rng)
        assert img.torn is not None
        modes.add(img.torn.mode)
        data = img.files()["seg"]
        t = img.torn
        assert data[:40] == b"A" * 40
        assert data[40 : 40 + t.kept] == b"B" * t.kept
        assert len(data) == 40 + t.kept + t.extra
        if t.mode == "zeros":
            assert data[40 + t.kept :] == bytes(t.extra)
    assert modes == {"prefix", "zeros", "garbage"}
    f.close()
    fs.check_live()


# --- the workload -------------------------------------------------------------------------------


@dataclass
class Capture:
    image: DurableImage
    acked: int  # transactions whose commit had returned when the image was taken
    live_sizes: dict[str, int] = field(default_factory=dict)


class Workload:
    """Drives a store with random transactions and records the logical state after each
    acknowledged one (`states[k]` = after k acknowledged transactions)."""

    def __init__(self, st: Store, rng: random.Random) -> None:
        self.st = st
        self.rng = rng
        self.states: list[tuple[object, ...]] = [logical_state(st)]
        self.bodies: dict[bytes, bytes] = {}
        self.serial = 0
        self.kinds: dict[str, int] = {}

    @property
    def acked(self) -> int:
        return len(self.states) - 1

    def commit(self, kind: str, build: Callable[[Transaction], object]) -> None:
        with self.st.transaction() as t:
            build(t)
        self.states.append(logical_state(self.st))
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def body(self, size: int) -> bytes:
        self.serial += 1
        head = f"Message-ID: <{self.serial}@model.test>\r\nSubject: {self.serial}\r\n\r\n".encode()
        data = head + self.rng.randbytes(size // 2).hex().encode()[:size]
        self.bodies[blob_hash(data)] = data
        return data

    def mailboxes(self) -> list[ix.Mailbox]:
        return sorted(self.st.index.mailboxes.values(), key=lambda m: m.guid)

    def nonempty(self) -> list[ix.Mailbox]:
        return [m for m in self.mailboxes() if len(m)]

    def some_uids(self, mb: ix.Mailbox, frac: float) -> list[int]:
        uids = list(mb.uids)
        k = max(1, int(len(uids) * frac))
        return sorted(self.rng.sample(uids, min(k, len(uids))))

    # -- steps ---------------------------------------------------------------------------------

    def setup(self) -> None:
        self.commit("domain", lambda t: t.add_domain(DOMAIN))
        for a in ACCOUNTS:
            self.commit("account", lambda t, a=a: t.add_account(a, PWHASH))  # type: ignore[misc]

    def deliver(self, nboxes: int, size: int) -> None:
        boxes = self.rng.sample(self.mailboxes(), min(nboxes, len(self.mailboxes())))
        data = self.body(size)

        def build(t: Transaction) -> None:
            h = t.put_blob(data)
            t.deliver(h, [m.guid for m in boxes], flags=self.rng.choice((0, 0, ix.SEEN)))

        self.commit(f"deliver{min(nboxes, 2)}{'big' if size > OPTS.chunk_bytes else ''}", build)

    def redeliver(self) -> None:
        """Deliver an existing body again (single instance: no new blob)."""
        live = visible_hashes(self.st)
        if not live:
            return
        h = self.rng.choice(sorted(live))
        box = self.rng.choice(self.mailboxes())
        self.commit("redeliver", lambda t: t.deliver(h, [box.guid]))

    def reput(self) -> None:
        """Store again a body whose every message was expunged (maybe compacted away)."""
        live = visible_hashes(self.st)
        dead = sorted(h for h in self.bodies if h not in live)
        if not dead:
            self.redeliver()
            return
        data = self.bodies[self.rng.choice(dead)]
        box = self.rng.choice(self.mailboxes())
        self.commit("reput", lambda t: t.deliver(t.put_blob(data), [box.guid]))

    def flags(self) -> None:
        boxes = self.nonempty()
        if not boxes:
            return
        mb = self.rng.choice(boxes)
        uids = self.some_uids(mb, 0.4)
        add = self.rng.choice((ix.SEEN, ix.FLAGGED, ix.ANSWERED | ix.SEEN, 0))
        remove = self.rng.choice((0, ix.FLAGGED, ix.SEEN)) & ~add
        kw = self.rng.choice(((), ("$Label1",), ("Work", "$Junk")))
        self.commit(
            "flags",
            lambda t: t.store_flags(mb.guid, uids, add=add, remove=remove, add_keywords=kw),
        )

    def expunge(self, frac: float = 0.3) -> None:
        boxes = self.nonempty()
        if not boxes:
            return
        mb = self.rng.choice(boxes)
        uids = self.some_uids(mb, frac)
        self.commit("expunge", lambda t: t.expunge(mb.guid, uids))

    def create_mailbox(self) -> None:
        acct = self.rng.choice(sorted(self.st.index.accounts.values(), key=lambda a: a.address))
        name = f"Folder{self.serial}/Sub{self.rng.randrange(100)}"
        self.serial += 1
        self.commit("create", lambda t: t.create_mailbox(acct.guid, name))

    def others(self) -> list[ix.Mailbox]:
        return [m for m in self.mailboxes() if not ix.is_inbox(m.name)]

    def rename_mailbox(self) -> None:
        mb = self.rng.choice(self.others())
        new = f"Renamed{self.serial}"
        self.serial += 1
        self.commit("rename", lambda t: t.rename_mailbox(mb.guid, new))

    def delete_mailbox(self) -> None:
        cands = [m for m in self.others() if len(m)] or self.others()
        mb = self.rng.choice(cands)
        self.commit("delete", lambda t: t.delete_mailbox(mb.guid))

    def mixed(self) -> None:
        """One transaction with a delivery, a flag change and an expunge: all or nothing."""
        boxes = self.nonempty()
        if not boxes:
            return
        mb = self.rng.choice(boxes)
        uids = list(mb.uids)
        data = self.body(self.rng.randint(500, 3000))
        target = self.rng.choice(self.mailboxes())

        def build(t: Transaction) -> None:
            t.deliver(t.put_blob(data), [target.guid])
            t.store_flags(mb.guid, uids[:2], add=ix.FLAGGED)
            t.expunge(mb.guid, uids[-1:])

        self.commit("mixed", build)

    def step(self) -> None:
        r = self.rng.random()
        if r < 0.32:
            self.deliver(1, self.rng.randint(200, 4000))
        elif r < 0.47:
            self.deliver(self.rng.randint(2, 4), self.rng.randint(200, 4000))
        elif r < 0.55:
            self.deliver(self.rng.randint(1, 2), self.rng.randint(20_000, 45_000))
        elif r < 0.57:
            self.redeliver()
        elif r < 0.60:
            self.reput()
        elif r < 0.72:
            self.flags()
        elif r < 0.80:
            self.expunge()
        elif r < 0.85:
            self.create_mailbox()
        elif r < 0.89:
            self.rename_mailbox()
        elif r < 0.92:
            self.delete_mailbox()
        else:
            self.mixed()


def run_workload(
    data_dir: str, fs: CacheModelFS, rng: random.Random, steps: int, captures: list[Capture]
) -> Workload:
    """The sync workload: setup, `steps` random transactions with a checkpoint at 1/3, mass
    expunges and a compaction at 1/2, another checkpoint at 2/3; then a clean close."""
    st = Store.open(data_dir, node_id=NODE, options=OPTS, fs=fs)
    wl = Workload(st, rng)
    fs.on_sync.append(lambda ev, p: captures.append(Capture(fs.capture(ev, p), wl.acked)))
    torn_rng = random.Random(rng.randrange(2**32))

    def torn(path: str, n: int) -> None:
        if torn_rng.random() < 0.15:
            captures.append(Capture(fs.capture_torn(torn_rng, "write", path), wl.acked))

    fs.on_write.append(torn)
    wl.setup()
    for i in range(steps):
        if i == steps // 3:
            st.checkpoint()
        if i == steps // 2:
            for _ in range(6):
                wl.expunge(0.8)
            report = st.compact()
            assert report.segments_rewritten > 0, report
        if i == 2 * steps // 3:
            st.checkpoint()
        if i == 5 * steps // 6:
            wl.expunge(0.9)
            wl.delete_mailbox()
            st.compact()
        wl.step()
    assert len(st.segments()) > 3, "the workload should roll several segments"
    fs.check_live()
    check = check_bodies(st, wl.bodies)
    assert not check, check
    st.close()
    fs.on_write.clear()
    fs.on_sync.clear()
    print(f"workload: {wl.acked} transactions {wl.kinds}, {fs.fsync_count} durability events")
    return wl


def frame_boundaries(data: bytes, start: int) -> list[int]:
    """Offsets where frames end, walking frame headers from `start` (an independent reading
    of the frame layout: header, then payload_len bytes)."""
    out = [start]
    off = start
    while off + fmt.FRAME_HEADER_SIZE <= len(data):
        try:
            hdr = fmt.decode_frame_header(data[off : off + fmt.FRAME_HEADER_SIZE])
        except fmt.FormatError:
            break
        off += fmt.FRAME_HEADER_SIZE + hdr.payload_len
        if off > len(data):
            break
        out.append(off)
    return out


def verify_capture(
    cap: Capture,
    wl: Workload,
    dest: Path,
    *,
    max_unacked: int | None,
) -> list[str]:
    """Reopen one image and check it (see the module doc); returns the problems found."""
    img = cap.image
    where = f"image at durability event {img.seq} ({img.event} {os.path.basename(img.path)})"
    if img.torn is not None:
        where += f"; {img.torn.describe()}"
    where += f"; {cap.acked} acknowledged"
    img.materialize(str(dest))
    data_dir = str(dest / "data")
    problems: list[str] = []
    fsck_damage: list[str] = []
    ran_fsck = img.torn is not None or img.seq % 5 == 0
    if ran_fsck:
        # fsck (read-only) must agree: nothing damaged at an fsync boundary; at most the torn
        # tail otherwise; checkpoints consistent with the replay.
        rep = fsck(data_dir, node_id=NODE)
        fsck_damage = [f"{d.segno}:{d.offset}" for d in rep.damage if d.torn_tail]
        bad = [d for d in rep.damage if not d.torn_tail]
        if bad or rep.bad_records or rep.lost_messages or (img.torn is None and not rep.ok):
            problems.append(f"{where}: fsck: {rep.lines()}")
    try:
        st = Store.open(data_dir, node_id=NODE, options=VERIFY_OPTS)
    except Exception as e:
        return [f"{where}: Store.open failed: {type(e).__name__}: {e}", *problems]
    try:
        got = logical_state(st)
        hi = len(wl.states) if max_unacked is None else cap.acked + max_unacked + 1
        matches = [m for m in range(cap.acked, min(hi, len(wl.states))) if wl.states[m] == got]
        if not matches:
            older = [m for m in range(cap.acked) if wl.states[m] == got]
            problems.append(
                f"{where}: recovered state ({describe_state(got)}) is not the state after "
                f">= {cap.acked} transactions"
                + (f"; it equals the state after only {older[-1]}" if older else "")
                + f" (after {cap.acked}: {describe_state(wl.states[cap.acked])})"
            )
        problems += [f"{where}: {p}" for p in check_bodies(st, wl.bodies)]
        rec = st.recovery
        assert rec is not None
        t = img.torn
        if t is not None and t.path.startswith("data/log/segment-"):
            segno = int(t.path.rsplit("-", 1)[1].split(".")[0])
            torn_data = img.files()[t.path]
            # Zeros or garbage may happen to equal the real bytes: what counts is how far the
            # file matches what was written.
            same = t.durable_len
            while same < min(len(torn_data), len(t.live)) and torn_data[same] == t.live[same]:
                same += 1
            whole = max(e for e in frame_boundaries(t.live, t.durable_len) if e <= same)
            clean = whole == len(torn_data)
            if clean and rec.torn_tail is not None:
                problems.append(f"{where}: torn tail reported for a clean cut: {rec.torn_tail}")
            if not clean and (
                rec.torn_tail is None
                or (rec.torn_tail.segno, rec.torn_tail.offset) != (segno, whole)
            ):
                problems.append(
                    f"{where}: expected a torn tail at segment {segno} offset {whole}, "
                    f"recovery says {rec.torn_tail}"
                )
        tt = rec.torn_tail
        if ran_fsck and fsck_damage != ([f"{tt.segno}:{tt.offset}"] if tt else []):
            problems.append(f"{where}: fsck saw a torn tail at {fsck_damage}, open at {tt}")
        if t is None and rec.torn_tail is not None:
            problems.append(f"{where}: torn tail reported at an fsync boundary: {rec.torn_tail}")
        # Read-write: a new transaction commits, and survives a full replay.
        probe = f"probe{img.seq}.test"
        try:
            with st.transaction() as tx:
                tx.add_domain(probe)
        except Exception as e:
            problems.append(f"{where}: the reopened store refuses a write: {type(e).__name__}: {e}")
    finally:
        st.close()
    # A full replay after that write (the torn tail must have been cut, not written after):
    # for every torn image and a sample of the others.
    if problems or not (img.torn is not None or rec.torn_tail is not None or img.seq % 4 == 0):
        return problems
    shutil.rmtree(os.path.join(data_dir, "checkpoints"))
    os.mkdir(os.path.join(data_dir, "checkpoints"))
    try:
        st2 = Store.open(data_dir, node_id=NODE, options=VERIFY_OPTS)
    except Exception as e:
        return [f"{where}: after a write, a full replay failed: {type(e).__name__}: {e}"]
    try:
        state2 = logical_state(st2)
        if probe not in st2.index.domains or state2[2:] != got[2:]:
            problems.append(f"{where}: a full replay after a write changed the state")
    finally:
        st2.close()
    # Crashes during recovery matter where recovery changes files: a torn tail to cut; and a
    # sample of the rest (a rejected checkpoint, a plain reopen).
    if img.torn is not None or rec.torn_tail is not None or img.seq % 10 == 0:
        problems += crash_during_recovery(img, got, Path(str(dest) + "-nested"), where)
    return problems


def crash_during_recovery(
    img: DurableImage, expected: tuple[object, ...], base: Path, where: str
) -> list[str]:
    """Recover the image again, this time on a CacheModelFS, and cut the power at every fsync
    of that recovery (truncating a torn tail, dropping a half-created segment, ...) and of a
    commit after it: each of those images must recover to the same state (maybe with the
    commit)."""
    root = base / "root"
    img.materialize(str(root))
    fs = CacheModelFS(str(root))
    caps: list[DurableImage] = []
    fs.on_sync.append(lambda ev, p: caps.append(fs.capture(ev, p)))
    st = Store.open(str(root / "data"), node_id=NODE, options=OPTS, fs=fs)
    try:
        with st.transaction() as tx:
            tx.add_domain("nested.test")
    finally:
        st.close()
    problems = []
    for k, cap in enumerate(caps):
        d = base / f"n{k}"
        cap.materialize(str(d))
        try:
            st2 = Store.open(str(d / "data"), node_id=NODE, options=VERIFY_OPTS)
        except Exception as e:
            problems.append(
                f"{where}; power cut at fsync {k} ({cap.event} {os.path.basename(cap.path)}) "
                f"of its recovery: Store.open failed: {type(e).__name__}: {e}"
            )
            continue
        try:
            got = logical_state(st2)
            domains = tuple(x for x in got[0] if x != "nested.test")  # type: ignore[attr-defined]
            if (domains, *got[1:]) != expected:
                problems.append(
                    f"{where}; power cut at fsync {k} ({cap.event}) of its recovery: the state "
                    "differs from the first recovery's"
                )
        finally:
            st2.close()
    shutil.rmtree(base, ignore_errors=True)
    return problems


def run_and_verify(
    workdir: Path,
    mailharbor_seed: int,
    name: str,
    steps: int,
) -> None:
    rng, _seed = seeded(mailharbor_seed, name)
    root = workdir / "root"
    data_dir = root / "data"
    prepare_store(str(data_dir), OPTS)
    fs = CacheModelFS(str(root))
    captures: list[Capture] = []
    t0 = time.monotonic()
    wl = run_workload(str(data_dir), fs, rng, steps, captures)
    t1 = time.monotonic()
    problems: list[str] = []
    ntorn = 0
    for i, cap in enumerate(captures):
        ntorn += cap.image.torn is not None
        dest = workdir / f"snap-{i}"
        # Sync commits: at most the one transaction being committed is not acknowledged yet.
        problems += verify_capture(cap, wl, dest, max_unacked=1)
        shutil.rmtree(dest, ignore_errors=True)
    print(
        f"{len(captures)} images ({ntorn} torn) verified in {time.monotonic() - t1:.1f}s "
        f"(workload {t1 - t0:.1f}s)"
    )
    assert not problems, f"{len(problems)} problems, first ones:\n" + "\n".join(problems[:12])


@pytest.mark.timeout(120)
def test_power_cut_at_every_fsync_and_torn_writes(workdir: Path, mailharbor_seed: int) -> None:
    """The sync workload; every fsync image and random torn images reopen correctly."""
    run_and_verify(workdir, mailharbor_seed, "sync_workload", steps=110)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak_power_cut_workloads(workdir: Path, mailharbor_seed: int) -> None:
    """`make soak`: many longer seeded workloads (MH_CRASH_SOAK_RUNS, default 30)."""
    for k in range(int(os.environ.get("MH_CRASH_SOAK_RUNS", "30"))):
        d = workdir / f"run{k}"
        d.mkdir()
        run_and_verify(d, mailharbor_seed, f"soak_{k}", steps=250)
        shutil.rmtree(d)


def roll_spanning_image(workdir: Path, rolls: int) -> tuple[DurableImage, Workload, int]:
    """Three acknowledged deliveries, then one whose big body's chunks span `rolls` segment
    rolls; the image is a power cut at the first write (the header) to the last new segment,
    where the new segments' names reached the disk (a concurrent directory fsync — the async
    flusher's — or, on ext4, any journal commit) and that header was written back, while the
    unsynced frames in the older segments were not. Returns (image, workload, acked)."""
    root = workdir / "root"
    data_dir = root / "data"
    prepare_store(str(data_dir), OPTS, ACCOUNTS)
    fs = CacheModelFS(str(root))
    st = Store.open(str(data_dir), node_id=NODE, options=OPTS, fs=fs)
    wl = Workload(st, random.Random(rolls))
    for _ in range(3):
        wl.deliver(1, 2000)
    acked = wl.acked
    logdir = str(data_dir / "log")
    first_new = len(st.segments()) + 1
    new_segs = tuple(segment_path(logdir, first_new + k) for k in range(rolls))
    images: list[DurableImage] = []

    def on_write(path: str, n: int) -> None:
        if path == new_segs[-1] and not images:
            images.append(fs.capture_with(names=new_segs, written={path: n}, event="roll"))

    fs.on_write.append(on_write)
    big = wl.body(rolls * OPTS.segment_bytes + 4000)  # chunked: spans `rolls` rolls
    box = wl.mailboxes()[0]
    wl.commit("big", lambda t: t.deliver(t.put_blob(big), [box.guid]))
    st.close()
    assert images, "the workload did not roll the segment"
    return images[0], wl, acked


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rolls", [1, 2])
def test_unsynced_tail_spanning_a_segment_roll_is_torn(workdir: Path, rolls: int) -> None:
    """A transaction whose frames span a segment roll, power cut before its fsync (see
    `roll_spanning_image`). Nothing acknowledged is missing, so the store must open read-write
    and drop the unacknowledged tail; it must not refuse with CorruptLog ("segment N starts at
    LSN x, expected y" / "segment N: segment header truncated"), which keeps the node down
    until `fsck --repair`."""
    img, wl, acked = roll_spanning_image(workdir, rolls)
    dest = workdir / "snap"
    img.materialize(str(dest))
    files = {k: len(v) for k, v in img.files().items() if "/log/" in k}
    try:
        st2 = Store.open(str(dest / "data"), node_id=NODE, options=OPTS)
    except CorruptLog as e:
        raise AssertionError(
            f"a power cut with nothing acknowledged lost makes Store.open refuse: {e}; "
            f"log files (bytes): {files}"
        ) from None
    try:
        # The store seals a segment (fsync) before it creates the next, so the chunks
        # written before the roll are whole on disk: orphans of an unacknowledged
        # transaction, invisible; there may be no torn tail left to drop at all.
        assert logical_state(st2) == wl.states[acked]
        assert st2.recovery is not None
        with st2.transaction() as t:
            t.add_domain("after.test")
    finally:
        st2.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rolls", [1, 2])
def test_fsck_repair_of_a_torn_roll(workdir: Path, rolls: int) -> None:
    """The state of the previous test: whatever open does, `fsck --repair` must leave a store
    that opens with everything acknowledged."""
    img, wl, acked = roll_spanning_image(workdir, rolls)
    dest = workdir / "snap"
    img.materialize(str(dest))
    data_dir = str(dest / "data")
    before = fsck(data_dir, node_id=NODE)
    try:
        rep = fsck(data_dir, node_id=NODE, repair=True)
    except Exception as e:
        raise AssertionError(
            f"fsck --repair failed: {type(e).__name__}: {e}; it had found: {before.lines()}"
        ) from None
    try:
        st = Store.open(data_dir, node_id=NODE, options=OPTS)
    except CorruptLog as e:
        raise AssertionError(f"open after fsck --repair: {e}; fsck: {rep.lines()}") from None
    try:
        assert logical_state(st) == wl.states[acked], rep.lines()
        assert not check_bodies(st, wl.bodies)
    finally:
        st.close()


@pytest.mark.timeout(60)
def test_new_store_directories_survive_power_cut(workdir: Path) -> None:
    """A store created in an empty (durable) data directory: once a commit is acknowledged, a
    power cut must not lose it — including the log/ and checkpoints/ directories the store
    created, whose entries in the data directory are durable only after an fsync of it."""
    root = workdir / "root"
    data_dir = root / "data"
    data_dir.mkdir(parents=True)  # what `mailharbor init` leaves: an empty data directory
    fs = CacheModelFS(str(root))
    st = Store.open(str(data_dir), node_id=NODE, options=OPTS, fs=fs)
    with st.transaction() as t:
        t.add_domain(DOMAIN)
    img = fs.capture()  # the commit returned: acknowledged
    st.close()
    files = sorted(img.files())
    dest = workdir / "snap"
    img.materialize(str(dest))
    st2 = Store.open(str(dest / "data"), node_id=NODE, options=OPTS)
    try:
        assert DOMAIN in st2.index.domains, (
            "an acknowledged transaction is lost after a power cut: the durable state holds "
            f"only {files}; the store never fsyncs the data directory after creating log/ and "
            "checkpoints/ in it"
        )
    finally:
        st2.close()


# --- async group commit -------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("slow_fsync", [False, True], ids=["fast-fsync", "slow-fsync"])
def test_async_group_commit_power_cut_at_every_fsync(
    workdir: Path, mailharbor_seed: int, slow_fsync: bool
) -> None:
    """Concurrent committers share fsyncs (group commit); an image at every fsync and at random
    writes. With slow fsyncs the event loop keeps appending (and rolling segments) while the
    worker thread fsyncs, so the images catch every interleaving."""
    rng, _seed = seeded(mailharbor_seed, f"async_group_commit_{slow_fsync}")
    root = workdir / "root"
    data_dir = root / "data"
    prepare_store(str(data_dir), OPTS, ACCOUNTS)
    delay_rng = random.Random(rng.randrange(2**32))
    fs = CacheModelFS(
        str(root),
        sync_delay=(lambda: delay_rng.uniform(0.0, 0.004)) if slow_fsync else None,
    )
    st = Store.open(str(data_dir), node_id=NODE, options=OPTS, fs=fs)
    inboxes = [st.index.account_by_address(a) for a in ACCOUNTS]
    boxes = [a.mailboxes["INBOX"] for a in inboxes if a is not None]
    ntasks, per_task = 6, 12
    plan: dict[int, tuple[bytes, tuple[bytes, ...]]] = {}
    for i in range(ntasks * per_task):
        big = rng.random() < (0.25 if slow_fsync else 0.12)
        size = rng.randint(20_000, 40_000) if big else rng.randint(200, 3000)
        head = f"Message-ID: <{i}@async.test>\r\n\r\n".encode()
        body = head + rng.randbytes(size // 2).hex().encode()[:size]
        plan[i] = (body, tuple(rng.sample(boxes, rng.randint(1, 3))))
    acked: list[int] = []
    lsn_of: dict[int, int] = {}
    captures: list[tuple[DurableImage, int]] = []
    fs.on_sync.append(lambda ev, p: captures.append((fs.capture(ev, p), len(acked))))
    torn_rng = random.Random(rng.randrange(2**32))

    def torn(path: str, n: int) -> None:
        if torn_rng.random() < 0.1:
            captures.append((fs.capture_torn(torn_rng, "write", path), len(acked)))

    fs.on_write.append(torn)
    delays = [rng.random() * 0.002 for _ in plan]

    async def committer(k: int) -> None:
        for j in range(per_task):
            i = k * per_task + j
            body, targets = plan[i]
            await asyncio.sleep(delays[i])
            t = st.transaction()
            async with t:
                t.deliver(t.put_blob(body), list(targets))
                if j % 4 == 3:
                    t.store_flags(targets[0], [1, 2], add=ix.SEEN)
            lsn_of[i] = t.committed_lsn
            acked.append(i)

    async def main() -> None:
        await asyncio.gather(*(committer(k) for k in range(ntasks)))

    asyncio.run(main())
    commits, fsyncs = st.stats_commits, st.stats_fsyncs
    st.close()
    assert fsyncs < commits, f"no group commit: {fsyncs} fsyncs for {commits} commits"
    ntorn = sum(1 for img, _ in captures if img.torn is not None)
    print(f"async: {commits} commits, {fsyncs} log fsyncs, {len(captures)} images ({ntorn} torn)")
    problems: list[str] = []
    for n, (img, nacked) in enumerate(captures):
        required = set(acked[:nacked])
        dest = workdir / f"snap-{n}"
        img.materialize(str(dest))
        where = f"image at event {img.seq} ({img.event}), {nacked} acknowledged"
        if img.torn is not None:
            where += f"; {img.torn.describe()}"
        try:
            st2 = Store.open(str(dest / "data"), node_id=NODE, options=VERIFY_OPTS)
        except Exception as e:
            problems.append(f"{where}: Store.open failed: {type(e).__name__}: {e}")
            continue
        try:
            vis = visible_hashes(st2)
            present = []
            for i, (body, targets) in plan.items():
                got = vis.get(blob_hash(body), set())
                if got:
                    present.append(i)
                    if st2.read_blob(blob_hash(body)) != body:
                        problems.append(f"{where}: message {i} body differs")
                if i in required and got != set(targets):
                    problems.append(f"{where}: acknowledged message {i} missing ({len(got)})")
                elif got and got != set(targets):
                    problems.append(f"{where}: message {i} partly visible")
            # LSN order: what is visible is a prefix of the log.
            if present:
                top = max(lsn_of[i] for i in present)
                holes = [i for i in plan if lsn_of[i] < top and i not in present]
                if holes:
                    problems.append(f"{where}: not a log prefix, missing {holes[:10]}")
            with st2.transaction() as tx:
                tx.add_domain(f"probe{n}.test")
        finally:
            st2.close()
            shutil.rmtree(dest, ignore_errors=True)
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:12])


# --- bit flips ----------------------------------------------------------------------------------


def build_store(
    data_dir: Path, rng: random.Random, n: int, *, checkpoint_at: int | None = None
) -> tuple[list[tuple[object, ...]], dict[bytes, bytes]]:
    """A store with `n` single-recipient deliveries on the plain file system, left as a crash
    would (no clean close, so no final checkpoint). Returns the states and bodies."""
    prepare_store(str(data_dir), OPTS_NO_AUTO_CKPT, ACCOUNTS)
    st = Store.open(str(data_dir), node_id=NODE, options=OPTS_NO_AUTO_CKPT)
    wl = Workload(st, rng)
    for i in range(n):
        if i == checkpoint_at:
            st.checkpoint()
        wl.deliver(1, rng.choice((rng.randint(2000, 6000), rng.randint(10_000, 20_000))))
    states, bodies = wl.states, wl.bodies
    # Simulate a crash: release the lock without the close-time checkpoint.
    st._unlock()
    return states, bodies


def flip_bit(path: Path, offset: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def drop_checkpoints(data_dir: Path) -> None:
    for p in (data_dir / "checkpoints").iterdir():
        p.unlink()


@pytest.mark.timeout(60)
def test_bit_flip_in_sealed_segment_refuses_open(workdir: Path, mailharbor_seed: int) -> None:
    """A bit flipped anywhere after the header of a sealed segment (a full replay must read
    it): Store.open raises CorruptLog, it never serves the damaged data. fsck reports it and
    `--repair` salvages everything else."""
    rng, _ = seeded(mailharbor_seed, "bitflip_sealed")
    base = workdir / "base"
    states, bodies = build_store(base, rng, 40)
    drop_checkpoints(base)
    segs = list_segments_of(base)
    assert len(segs) >= 3
    problems = []
    for k in range(12):
        d = workdir / f"flip{k}"
        shutil.copytree(base, d)
        segno = rng.choice(segs[:-1])
        seg = Path(segment_path(str(d / "log"), segno))
        # Not in the first frame (the one creating the accounts: losing it loses everything).
        start = frame_boundaries(seg.read_bytes(), fmt.SEGMENT_HEADER_SIZE)[1] if segno == 1 else 0
        off = rng.randrange(max(start, fmt.SEGMENT_HEADER_SIZE // 2), seg.stat().st_size)
        bit = rng.randrange(8)
        flip_bit(seg, off, bit)
        what = f"segment {segno} offset {off} bit {bit}"
        try:
            st = Store.open(str(d), node_id=NODE, options=OPTS)
        except CorruptLog:
            pass
        else:
            st.close()
            problems.append(f"{what}: Store.open did not raise CorruptLog")
            continue
        rep = fsck(str(d), node_id=NODE)
        if rep.ok or not rep.damage:
            problems.append(f"{what}: fsck found nothing: {rep.lines()}")
            continue
        rep2 = fsck(str(d), node_id=NODE, repair=True)
        try:
            st = Store.open(str(d), node_id=NODE, options=OPTS)
        except Exception as e:
            problems.append(f"{what}: open after fsck --repair failed: {e}; {rep2.lines()}")
            continue
        try:
            bad = check_bodies(st, bodies)
            if bad:
                problems.append(f"{what}: after repair: {bad}")
            final = states[-1]
            lost = len(rep2.lost_messages)
            got = sum(len(m) for m in st.index.mailboxes.values())
            want = state_message_count(final)
            if got + lost < want - 1:
                problems.append(f"{what}: repair kept {got} of {want} messages ({lost} listed)")
        finally:
            st.close()
        shutil.rmtree(d)
    assert not problems, "\n".join(problems)


def list_segments_of(data_dir: Path) -> list[int]:
    from mailharbor.store.fsio import OsFileSystem

    return list_segments(OsFileSystem(), str(data_dir / "log"))


@pytest.mark.timeout(60)
def test_bit_flip_in_body_covered_by_checkpoint_never_served(
    workdir: Path, mailharbor_seed: int
) -> None:
    """With a checkpoint covering the damaged segment, open does not read it; reading the
    damaged body then fails (StoreIOError), it is never served; other bodies are fine."""
    rng, _ = seeded(mailharbor_seed, "bitflip_checkpointed")
    d = workdir / "store"
    _states, bodies = build_store(d, rng, 30, checkpoint_at=29)
    st = Store.open(str(d), node_id=NODE, options=OPTS)
    try:
        assert st.recovery is not None and st.recovery.checkpoint_lsn > 0
        b = st.index.blobs
        target = None
        for s in range(len(b)):
            h = b.hash_at(s)
            if b.refs[s] and b.has_data(s) and len(b.location(s)) == 1 and h in bodies:
                loc = b.location(s)[0]
                if loc.segno < max(list_segments_of(d)):
                    target = (h, loc)
                    break
        assert target is not None
    finally:
        st.close()
    h, loc = target
    seg = Path(segment_path(str(d / "log"), loc.segno))
    flip_bit(seg, loc.offset + rng.randrange(loc.length), rng.randrange(8))
    st = Store.open(str(d), node_id=NODE, options=OPTS)
    try:
        with pytest.raises(StoreIOError):
            st.read_blob(h)
        others = {k: v for k, v in bodies.items() if k != h}
        for k in visible_hashes(st):
            if k in others:
                assert st.read_blob(k) == others[k]
    finally:
        st.close()


@pytest.mark.timeout(60)
def test_bit_flip_in_last_frame_is_a_torn_tail(workdir: Path, mailharbor_seed: int) -> None:
    rng, _ = seeded(mailharbor_seed, "bitflip_last")
    base = workdir / "base"
    states, bodies = build_store(base, rng, 25, checkpoint_at=10)
    last = list_segments_of(base)[-1]
    seg_bytes = Path(segment_path(str(base / "log"), last)).read_bytes()
    ends = frame_boundaries(seg_bytes, fmt.SEGMENT_HEADER_SIZE)
    assert ends[-1] == len(seg_bytes) and len(ends) >= 2
    for k in range(6):
        d = workdir / f"flip{k}"
        shutil.copytree(base, d)
        seg = Path(segment_path(str(d / "log"), last))
        off = rng.randrange(ends[-2], ends[-1])
        flip_bit(seg, off, rng.randrange(8))
        st = Store.open(str(d), node_id=NODE, options=OPTS)
        try:
            rec = st.recovery
            assert rec is not None and rec.torn_tail is not None, f"offset {off}: no torn tail"
            assert (rec.torn_tail.segno, rec.torn_tail.offset) == (last, ends[-2])
            assert logical_state(st) == states[-2], f"offset {off}: not the state before"
            assert not check_bodies(st, bodies)
            with st.transaction() as t:
                t.add_domain("after.test")
        finally:
            st.close()
        drop_checkpoints(d)
        st = Store.open(str(d), node_id=NODE, options=OPTS)
        try:
            assert "after.test" in st.index.domains
            assert st.recovery is not None and st.recovery.torn_tail is None
        finally:
            st.close()


@pytest.mark.timeout(60)
def test_corrupt_checkpoint_is_ignored(workdir: Path, mailharbor_seed: int) -> None:
    """A damaged checkpoint is rejected (reported) and the store falls back to an older one or
    to a full replay, reaching the same state."""
    rng, _ = seeded(mailharbor_seed, "bad_checkpoint")
    base = workdir / "base"
    states, bodies = build_store(base, rng, 30, checkpoint_at=12)
    st = Store.open(str(base), node_id=NODE, options=OPTS)
    st.close()  # a second checkpoint, at the end
    ckpts = sorted((base / "checkpoints").iterdir())
    assert len(ckpts) == 2, ckpts
    cases: list[tuple[str, Callable[[Path], None]]] = []
    for _ in range(4):
        off = rng.randrange(ckpts[-1].stat().st_size)
        bit = rng.randrange(8)
        cases.append((f"newest, bit flip at {off}", flipper(-1, off, bit)))
    cases.append(("newest truncated", lambda d: trunc_ck(d, -1)))
    cases.append(("all flipped", both(flipper(0, 30, 1), flipper(1, 30, 1))))
    cases.append(("all garbage", lambda d: garbage_ck(d, rng)))
    for name, damage in cases:
        d = workdir / name.replace(" ", "_").replace(",", "")
        shutil.copytree(base, d)
        damage(d)
        st = Store.open(str(d), node_id=NODE, options=OPTS)
        try:
            rec = st.recovery
            assert rec is not None
            assert rec.checkpoint_rejected, f"{name}: nothing reported as rejected"
            if name.startswith("all"):
                assert rec.checkpoint_lsn == 0, f"{name}: {rec}"
            assert logical_state(st) == states[-1], f"{name}: state differs"
            assert not check_bodies(st, bodies)
        finally:
            st.close()
        rep = fsck(str(d), node_id=NODE)
        assert not rep.damage, rep.lines()


def flipper(i: int, off: int, bit: int) -> Callable[[Path], None]:
    """Damage: flip `bit` at `off` in the i-th checkpoint (sorted by name)."""

    def damage(d: Path) -> None:
        p = sorted((d / "checkpoints").iterdir())[i]
        flip_bit(p, off % p.stat().st_size, bit)

    return damage


def both(a: Callable[[Path], None], b: Callable[[Path], None]) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        a(d)
        b(d)

    return damage


def trunc_ck(d: Path, i: int) -> None:
    p = sorted((d / "checkpoints").iterdir())[i]
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def garbage_ck(d: Path, rng: random.Random) -> None:
    for p in (d / "checkpoints").iterdir():
        p.write_bytes(rng.randbytes(p.stat().st_size))


# --- errors the model makes visible -------------------------------------------------------------


@pytest.mark.timeout(60)
def test_reads_do_not_depend_on_unsynced_state(workdir: Path) -> None:
    """Sanity check of the harness end to end: a commit's data is durable at the fsync that
    acknowledges it (the image right after that fsync already holds it)."""
    root = workdir / "root"
    data_dir = root / "data"
    prepare_store(str(data_dir), OPTS, ACCOUNTS)
    fs = CacheModelFS(str(root))
    st = Store.open(str(data_dir), node_id=NODE, options=OPTS, fs=fs)
    images: list[DurableImage] = []
    fs.on_sync.append(lambda ev, p: images.append(fs.capture(ev, p)))
    acct = st.index.account_by_address(ACCOUNTS[0])
    assert acct is not None
    body = b"Subject: x\r\n\r\nhello"
    with st.transaction() as t:
        t.deliver(t.put_blob(body), [acct.mailboxes["INBOX"]])
    st.close()
    assert images
    dest = workdir / "snap"
    images[0].materialize(str(dest))
    st2 = Store.open(str(dest / "data"), node_id=NODE, options=OPTS)
    try:
        assert st2.read_blob(blob_hash(body)) == body
    finally:
        st2.close()
