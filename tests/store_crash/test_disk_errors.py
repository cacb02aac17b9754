"""Disk errors: ENOSPC and EIO stop writes cleanly and lose nothing acknowledged.

DESIGN.md: "an I/O error stops writes cleanly (the store goes to a read-only ERROR state)";
fsio: "after a failed fsync ... the store goes to its ERROR state and never retries".

* In process, `crashmodel.FaultyFS` over `crashmodel.CacheModelFS` fails one chosen operation
  (EIO from an fsync of the log, of the directory at a segment roll, of a checkpoint or a
  compaction; ENOSPC after a short write). The failing commit raises StoreIOError and is not
  acknowledged, the store is in ERROR (transactions raise StoreReadOnly, reads work), nothing is
  fsynced after the failure, and both the live state (the page cache survived) and the durable
  state (the power was cut right after) reopen with every acknowledged transaction.
* On real file systems (`fault.disks`): a small tmpfs and a loop-mounted ext4 filled up (ENOSPC),
  and a writer process under strace whose Nth fsync of the log fails with EIO.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from crashmodel import CacheModelFS, Fault, FaultyFS
from fault.disks import loop_ext4, run_with_fsync_eio, small_tmpfs
from mailharbor.store import (
    Store,
    StoreError,
    StoreIOError,
    StoreOptions,
    StoreReadOnly,
    StoreState,
    blob_hash,
)
from store_crash import (
    DOMAIN,
    NODE,
    WRITER_ACCOUNTS,
    WRITER_OPTIONS,
    check_writer_messages,
    inbox_of,
    message,
    parse_acks,
    prepare_store,
    visible_hashes,
    writer_argv,
    writer_env,
)

OPTS = StoreOptions(
    segment_bytes=40 * 1024,
    chunk_bytes=8 * 1024,
    checkpoint_every_bytes=1 << 40,
    cache_bytes=256 * 1024,
)
ACCOUNTS = tuple(f"e{i}@{DOMAIN}" for i in range(3))


def seeded(mailharbor_seed: int, name: str) -> random.Random:
    seed = random.Random(f"{mailharbor_seed}:{name}").randrange(2**32)
    print(f"{name}: seed {seed} (run seed {mailharbor_seed}; MAILHARBOR_SEED reproduces)")
    return random.Random(seed)


class Injector:
    """A one-shot fault rule: the `skip`+1-th call of `op` on a path containing `match` gets
    `fault` (while armed)."""

    def __init__(self) -> None:
        self.op = ""
        self.match = ""
        self.skip = 0
        self.fault = Fault()
        self.fired: list[str] = []

    def arm(self, op: str, match: str, *, skip: int = 0, fault: Fault | None = None) -> None:
        self.op, self.match, self.skip = op, match, skip
        self.fault = fault or Fault(errno.EIO)

    def __call__(self, op: str, path: str) -> Fault | None:
        if self.op and op == self.op and self.match in path:
            if self.skip == 0:
                self.op = ""
                self.fired.append(f"{op} {path}")
                return self.fault
            self.skip -= 1
        return None


class Rig:
    """A prepared store under FaultyFS(CacheModelFS) with helpers to deliver and check."""

    def __init__(self, workdir: Path, rng: random.Random, opts: StoreOptions = OPTS) -> None:
        self.workdir = workdir
        self.rng = rng
        self.opts = opts
        self.root = workdir / "root"
        self.data = self.root / "data"
        prepare_store(str(self.data), opts, ACCOUNTS)
        self.model = CacheModelFS(str(self.root))
        self.inject = Injector()
        self.fs = FaultyFS(self.model, self.inject)
        self.st = Store.open(str(self.data), node_id=NODE, options=opts, fs=self.fs)
        self.inboxes = [inbox_of(self.st, a) for a in ACCOUNTS]
        self.bodies: dict[int, bytes] = {}
        self.targets: dict[int, list[bytes]] = {}
        self.acked: list[int] = []
        self.failed: list[int] = []
        self.reopens = 0
        self.probes: set[int] = set()

    def new_message(self, big: bool = False) -> int:
        i = len(self.bodies)
        size = self.rng.randint(20_000, 30_000) if big else self.rng.randint(300, 3000)
        body = f"Message-ID: <{i}@errors.test>\r\n\r\n".encode() + self.rng.randbytes(size)
        self.bodies[i] = body
        self.targets[i] = self.rng.sample(self.inboxes, self.rng.randint(1, 3))
        return i

    def deliver(self, big: bool = False) -> int:
        i = self.new_message(big)
        with self.st.transaction() as t:
            t.deliver(t.put_blob(self.bodies[i]), self.targets[i])
        self.acked.append(i)
        return i

    def check(self, st: Store, where: str, *, failed_absent: bool = False, probe: int = -1) -> None:
        """Acknowledged (and `probe`, committed in this copy): in all its mailboxes,
        byte-exact. Failed: absent or whole (absent with `failed_absent`)."""
        vis = visible_hashes(st)
        for i, body in self.bodies.items():
            if i in self.probes and i != probe:
                continue  # committed in another copy
            h = blob_hash(body)
            got = vis.get(h, set())
            want = set(self.targets[i])
            if i in self.acked or i == probe:
                assert got == want, f"{where}: acknowledged message {i} in {len(got)}/{len(want)}"
            else:
                assert got in (set(), want), f"{where}: failed message {i} partly visible"
                if failed_absent:
                    assert not got, f"{where}: failed message {i} is visible"
            if got:
                assert st.read_blob(h) == body, f"{where}: message {i} body differs"

    def assert_error_state(self) -> None:
        """ERROR: writes refused, reads served, nothing fsynced after the failure."""
        st = self.st
        assert st.state == StoreState.ERROR, st.state
        with pytest.raises(StoreReadOnly), st.transaction() as t:
            t.add_domain("after-error.test")
        with pytest.raises(StoreReadOnly):
            st.compact()
        self.check(st, "the store in ERROR", failed_absent=True)
        assert self.fs.ops_after_first_failure() == [], "fsync retried after a failed fsync"

    def forget_expunged(self) -> None:
        """Make the expectations follow deliberate expunges."""
        vis = visible_hashes(self.st)
        for i in self.acked:
            self.targets[i] = sorted(vis.get(blob_hash(self.bodies[i]), set()))
        self.acked = [i for i in self.acked if self.targets[i]]
        self.bodies = {i: b for i, b in self.bodies.items() if i in self.acked}

    def reopen_and_check(self, *, power_cut: bool, failed_absent: bool | None = None) -> None:
        """Reopen the durable image (power cut) or a copy of the live files (process crash):
        check it, commit a probe message, check again after a full replay. A failed commit must
        be absent after a power cut (`failed_absent`, default) when it was never fsynced."""
        self.reopens += 1
        if power_cut:
            img = self.model.capture()
            dest = self.workdir / f"cut{self.reopens}"
            img.materialize(str(dest))
            data = dest / "data"
        else:
            data = self.workdir / f"live{self.reopens}"
            shutil.copytree(self.data, data)
        what = "after a power cut" if power_cut else "reopening the live files"
        st = Store.open(str(data), node_id=NODE, options=self.opts)
        try:
            absent = power_cut if failed_absent is None else failed_absent
            self.check(st, what, failed_absent=absent)
            i = self.new_message()
            self.probes.add(i)
            with st.transaction() as t:
                t.deliver(t.put_blob(self.bodies[i]), self.targets[i])
        finally:
            st.close()
        shutil.rmtree(data / "checkpoints")
        st = Store.open(str(data), node_id=NODE, options=self.opts)
        try:
            self.check(st, f"{what}, full replay after a write", probe=i)
        finally:
            st.close()

    def close(self) -> None:
        """Close; a store in ERROR must not fsync anything any more, any store must never
        fsync again what failed to fsync."""
        in_error = self.st.state == StoreState.ERROR
        self.st.close()
        if in_error:
            assert self.fs.ops_after_first_failure() == [], "close() fsynced after the failure"
        assert self.fs.retried() == [], "a failed fsync was retried"


@pytest.fixture
def rig(tmp_path: Path, mailharbor_seed: int, request: pytest.FixtureRequest) -> Iterator[Rig]:
    r = Rig(tmp_path, seeded(mailharbor_seed, request.node.name))
    try:
        yield r
    finally:
        if r.st.state != StoreState.CLOSED:
            r.st.close()


# --- EIO from fsync, in process -----------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["small", "chunked", "roll-dir-fsync", "new-segment"])
@pytest.mark.parametrize("power_cut", [False, True], ids=["live", "powercut"])
def test_eio_on_log_fsync(rig: Rig, case: str, power_cut: bool) -> None:
    for _ in range(rig.rng.randint(3, 8)):
        rig.deliver()
    if case == "roll-dir-fsync":
        rig.inject.arm("sync_dir", "/log")
    elif case == "new-segment":
        # The fsync of the segment a roll just created.
        rig.inject.arm("sync", f"segment-{len(rig.st.segments()) + 1:08d}")
    else:
        rig.inject.arm("sync", "/log/segment-")
    with pytest.raises(StoreIOError, match="fsync") as ei:
        for _ in range(200):
            rig.deliver(big=case == "chunked")
    print(f"failed as expected after {len(rig.acked)} commits: {ei.value}")
    rig.failed.append(max(rig.bodies))
    assert rig.inject.fired, "the fault was not injected"
    rig.assert_error_state()
    rig.close()
    rig.reopen_and_check(power_cut=power_cut)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("power_cut", [False, True], ids=["live", "powercut"])
def test_enospc_short_write(rig: Rig, power_cut: bool) -> None:
    """A write that stops half-way with ENOSPC: a clear StoreIOError, ERROR; reopening drops
    the half-written frame as a torn tail."""
    for _ in range(5):
        rig.deliver()
    rig.inject.arm(
        "write", "/log/segment-", skip=rig.rng.randint(0, 6), fault=Fault(errno.ENOSPC, keep=37)
    )
    with pytest.raises(StoreIOError, match="No space left on device"):
        for _ in range(50):
            rig.deliver(big=rig.rng.random() < 0.3)
    rig.assert_error_state()
    rig.close()
    if not power_cut:
        data = rig.workdir / "probe"
        shutil.copytree(rig.data, data)
        st = Store.open(str(data), node_id=NODE, options=rig.opts)
        try:
            assert st.recovery is not None and st.recovery.torn_tail is not None, st.recovery
        finally:
            st.close()
    rig.reopen_and_check(power_cut=power_cut)


@pytest.mark.timeout(60)
def test_eio_in_async_group_commit(rig: Rig) -> None:
    """Concurrent committers share fsyncs; one fsync fails: every commit waiting on it raises
    StoreIOError, later ones StoreReadOnly, none hangs, nothing failed is visible."""
    st = rig.st
    outcome: dict[int, str] = {}

    async def committer(k: int) -> None:
        for _ in range(10):
            i = rig.new_message(big=rig.rng.random() < 0.1)
            try:
                t = st.transaction()
                async with t:
                    t.deliver(t.put_blob(rig.bodies[i]), rig.targets[i])
            except StoreIOError:
                outcome[i] = "io"
                return
            except StoreReadOnly:
                outcome[i] = "ro"
                return
            outcome[i] = "ok"
            rig.acked.append(i)
            await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(*(committer(k) for k in range(6))), 30)

    rig.inject.arm("sync", "/log/segment-", skip=rig.rng.randint(2, 6))
    asyncio.run(main())
    counts = {v: list(outcome.values()).count(v) for v in ("ok", "io", "ro")}
    print(f"outcomes: {counts}")
    assert rig.inject.fired and counts["io"] >= 1, counts
    assert st.stats_fsyncs < counts["ok"] + counts["io"], "no group commit happened"
    rig.assert_error_state()
    rig.close()
    # Frames appended while an fsync that succeeded was running may be durable though their
    # commit failed with the next batch: absent or whole, both are fine.
    rig.reopen_and_check(power_cut=True, failed_absent=False)
    rig.reopen_and_check(power_cut=False)


# --- EIO outside the log ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_eio_on_explicit_checkpoint(rig: Rig) -> None:
    """A checkpoint whose fsync fails raises; the log is intact and nothing is lost."""
    for _ in range(6):
        rig.deliver()
    rig.inject.arm("sync", "/checkpoints/")
    with pytest.raises((OSError, StoreError)):
        rig.st.checkpoint()
    if rig.st.state == StoreState.OPEN:
        rig.deliver()
    rig.close()
    rig.reopen_and_check(power_cut=True)


@pytest.mark.timeout(60)
def test_eio_on_automatic_checkpoint_keeps_commit(tmp_path: Path, mailharbor_seed: int) -> None:
    """The checkpoint a commit triggers fails: the commit was durable, so it is acknowledged,
    and the store goes on (the log is intact)."""
    opts = dataclasses.replace(OPTS, checkpoint_every_bytes=16 * 1024)
    rig = Rig(tmp_path, seeded(mailharbor_seed, "auto_ckpt"), opts)
    try:
        rig.inject.arm("sync", "/checkpoints/")
        for _ in range(12):
            rig.deliver()
        assert rig.inject.fired, "no checkpoint was attempted"
        assert rig.st.state == StoreState.OPEN
        rig.deliver()
        rig.close()
        rig.reopen_and_check(power_cut=True)
    finally:
        rig.st.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("op", ["sync", "replace"])
def test_eio_during_compaction(rig: Rig, op: str) -> None:
    for _ in range(30):
        rig.deliver(big=rig.rng.random() < 0.3)
    st = rig.st
    with st.transaction() as t:
        for g in rig.inboxes:
            mb = st.index.mailboxes[g]
            t.expunge(g, list(mb.uids)[: len(mb) * 3 // 4])
    rig.forget_expunged()
    rig.inject.arm(op, ".compact" if op == "sync" else "/log/segment-")
    with pytest.raises((OSError, StoreError)):
        st.compact()
    assert rig.inject.fired
    rig.check(st, "after the failed compaction")
    rig.close()
    rig.reopen_and_check(power_cut=False)
    rig.reopen_and_check(power_cut=True)


# --- real file systems --------------------------------------------------------------------------


def fill_until_enospc(
    data: Path, rng: random.Random, opts: StoreOptions
) -> tuple[list[int], dict[int, bytes], dict[int, list[bytes]], StoreIOError]:
    st = Store.open(str(data), node_id=NODE, options=opts)
    inboxes = [inbox_of(st, a) for a in WRITER_ACCOUNTS]
    acked: list[int] = []
    bodies: dict[int, bytes] = {}
    targets: dict[int, list[bytes]] = {}
    try:
        for i in range(10_000):
            bodies[i] = f"Message-ID: <{i}@enospc.test>\r\n\r\n".encode() + rng.randbytes(
                rng.randint(2_000, 40_000)
            )
            targets[i] = rng.sample(inboxes, rng.randint(1, 2))
            try:
                with st.transaction() as t:
                    t.deliver(t.put_blob(bodies[i]), targets[i])
            except StoreIOError as e:
                err = e
                break
            acked.append(i)
        else:
            raise AssertionError("the file system never filled up")
        assert st.state == StoreState.ERROR
        with pytest.raises(StoreReadOnly), st.transaction() as t:
            t.add_domain("full.test")
        vis = visible_hashes(st)
        last = acked[-1]
        assert st.read_blob(blob_hash(bodies[last])) == bodies[last]
        assert blob_hash(bodies[max(bodies)]) not in vis, "the failed delivery is visible"
    finally:
        st.close()
    return acked, bodies, targets, err


def check_filled(
    st: Store,
    acked: list[int],
    bodies: dict[int, bytes],
    targets: dict[int, list[bytes]],
) -> None:
    vis = visible_hashes(st)
    for i, body in bodies.items():
        got = vis.get(blob_hash(body), set())
        if i in acked:
            assert got == set(targets[i]), f"acknowledged message {i} lost"
            assert st.read_blob(blob_hash(body)) == body
        else:
            assert got in (set(), set(targets[i])), f"message {i} partly visible"


@pytest.mark.root
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
def test_enospc_on_a_full_file_system(kind: str, mailharbor_seed: int) -> None:
    rng = seeded(mailharbor_seed, f"enospc_{kind}")
    opts = dataclasses.replace(WRITER_OPTIONS, segment_bytes=128 * 1024)
    ctx = small_tmpfs(1536 * 1024) if kind == "tmpfs" else loop_ext4(4 << 20)
    with ctx as mnt:
        ballast = mnt / "ballast"
        ballast.write_bytes(b"\xaa" * (256 * 1024))
        data = mnt / "data"
        prepare_store(str(data), opts, WRITER_ACCOUNTS)
        acked, bodies, targets, err = fill_until_enospc(data, rng, opts)
        print(f"{kind}: {len(acked)} deliveries acknowledged, then: {err}")
        assert "No space left on device" in str(err), str(err)
        ballast.unlink()
        st = Store.open(str(data), node_id=NODE, options=opts)
        try:
            print(f"recovery after freeing space: {st.recovery}")
            check_filled(st, acked, bodies, targets)
            i = max(bodies) + 1
            bodies[i] = b"Subject: after\r\n\r\nspace freed"
            targets[i] = [inbox_of(st, WRITER_ACCOUNTS[0])]
            with st.transaction() as t:
                t.deliver(t.put_blob(bodies[i]), targets[i])
            acked.append(i)
        finally:
            st.close()
        shutil.rmtree(data / "checkpoints")
        st = Store.open(str(data), node_id=NODE, options=opts)
        try:
            check_filled(st, acked, bodies, targets)
        finally:
            st.close()


@pytest.mark.root
@pytest.mark.timeout(120)
def test_fsync_eio_end_to_end_under_strace(tmp_path: Path, mailharbor_seed: int) -> None:
    """A real writer process; strace makes its Nth fsync of the log fail with EIO. The commit
    fails, is not acknowledged, the store is in ERROR (refuses writes, serves reads), the fsync
    is never retried, and a reopen has everything acknowledged."""
    rng = seeded(mailharbor_seed, "strace_eio")
    data = tmp_path / "data"
    big_segment = 64 << 20  # one segment file: the injection targets its path
    opts = dataclasses.replace(WRITER_OPTIONS, segment_bytes=big_segment)
    prepare_store(str(data), opts, WRITER_ACCOUNTS)
    seg = data / "log" / "segment-00000001.log"
    assert seg.exists()
    nth = rng.randint(2, 9)
    seed = rng.randrange(2**31)
    run = run_with_fsync_eio(
        writer_argv(str(data), seed, 40, "eio", segment_bytes=big_segment),
        seg,
        after_n=nth,
        env=writer_env(),
        timeout=90,
    )
    print(run.stdout, run.stderr[-2000:])
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    acks = parse_acks(lines)
    assert sorted(acks) == list(range(nth - 1)), f"expected {nth - 1} acks: {lines}"
    assert any(ln.startswith(f"FAILED {nth - 1} ") for ln in lines), lines
    assert "ERROR-STATE ok error" in lines, lines
    assert run.injected == 1, f"the failed fsync was retried: {run.strace_log[-2000:]}"
    assert run.calls == nth, f"{run.calls} fsyncs of the log for {nth} commits"
    st = Store.open(str(data), node_id=NODE, options=opts)
    try:
        problems = check_writer_messages(st, seed, nth, acks, sequential=True)
        assert not problems, problems
        m = message(seed, nth - 1)
        print(
            "the failed commit is "
            + ("visible (whole)" if blob_hash(m.body) in visible_hashes(st) else "absent")
            + " after reopening the live files"
        )
        with st.transaction() as t:
            t.add_domain("after-eio.test")
    finally:
        st.close()
