"""Real writer processes: the power cut under FUSE, and kill -9.

A writer process (`store_crash.writer_main`) delivers deterministic messages and prints
`ACK i lsn` after each commit returned. The store it writes lives either

* under a `fault.powerloss_fs.PowerLossMount` (a FUSE file system that keeps only what was
  fsynced): the power is cut at seeded points of a free-running workload, or the durable state is
  snapshotted at every sync event of a lock-step workload; each snapshot is reopened, or
* on the plain disk, and the writer is killed with SIGKILL mid-workload (the page cache survives a
  process kill, so everything acknowledged must be there).

In each reopened store: acknowledged → present in all its recipients' INBOXes, byte-exact;
unacknowledged → absent or whole; with one committer, what is visible is a prefix of the
attempts; the store opens read-write. An ACK printed even after the cut still counts: the
frozen file system fails every fsync from the cut on, so a commit that returned was fsynced
before it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fault.disks import require_fuse
from fault.powerloss_fs import PowerLossMount, read_sync_events
from mailharbor.store import Store
from store_crash import (
    NODE,
    WRITER_ACCOUNTS,
    WRITER_OPTIONS,
    check_writer_messages,
    parse_acks,
    prepare_store,
    writer_argv,
    writer_env,
)

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seeded(mailharbor_seed: int, name: str) -> random.Random:
    seed = random.Random(f"{mailharbor_seed}:{name}").randrange(2**32)
    print(f"{name}: seed {seed} (run seed {mailharbor_seed}; MAILHARBOR_SEED reproduces)")
    return random.Random(seed)


class Writer:
    """A writer process with its stdout read line by line by a thread."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=writer_env(),
            cwd=TESTS_DIR,
        )
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for ln in self.proc.stdout:
            self._q.put(ln.rstrip("\n"))
        self._q.put(None)

    def next_line(self, timeout: float = 30.0) -> str | None:
        """The next stdout line (None at EOF)."""
        try:
            ln = self._q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"writer silent for {timeout}s; output so far: {self.lines}"
            ) from None
        if ln is not None:
            self.lines.append(ln)
        return ln

    def wait_for(self, prefix: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            ln = self.next_line(max(0.1, deadline - time.monotonic()))
            if ln is None:
                raise AssertionError(f"writer ended before {prefix!r}: {self.stderr()}")
            if ln.startswith(prefix):
                return ln

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 30.0) -> None:
        """Wait for the process (killing it after `timeout`) and drain its output."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        while self.next_line(timeout=10) is not None:
            pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.finish()

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()[-3000:]


@contextlib.contextmanager
def writer(argv: list[str]) -> Iterator[Writer]:
    w = Writer(argv)
    try:
        yield w
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
        w.proc.wait()
        for f in (w.proc.stdin, w.proc.stdout, w.proc.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


def reopen_and_check(
    data_dir: Path, seed: int, attempted: int, acks: dict[int, int], *, sequential: bool
) -> str:
    """Reopen, check, and prove the store takes writes. Returns a summary."""
    st = Store.open(str(data_dir), node_id=NODE, options=WRITER_OPTIONS)
    try:
        problems = check_writer_messages(st, seed, attempted, acks, sequential=sequential)
        assert not problems, f"{len(problems)} problems: {problems[:10]}"
        msgs = st.index.message_count
        torn = st.recovery.torn_tail if st.recovery else None
        with st.transaction() as t:
            t.add_domain("after-crash.test")
    finally:
        st.close()
    return f"{len(acks)} acknowledged, {msgs} message entries visible, torn tail: {torn}"


# --- power cut under FUSE -----------------------------------------------------------------------


@pytest.mark.fuse
@pytest.mark.root
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("point", "mode"), [(0, "free"), (1, "free"), (2, "async")], ids=["free0", "free1", "async2"]
)
def test_power_cut_at_seeded_points(
    tmp_path: Path, mailharbor_seed: int, point: int, mode: str
) -> None:
    """A free-running writer (one committer, or five sharing group commit); the power is cut a
    seeded time after a seeded number of ACKs."""
    require_fuse()
    rng = seeded(mailharbor_seed, f"fuse_cut_{point}")
    backing = tmp_path / "backing"
    prepare_store(str(backing / "data"), WRITER_OPTIONS, WRITER_ACCOUNTS)
    count = 1000  # more than can commit before the cut
    seed = rng.randrange(2**31)
    cut_after = rng.randint(2, 40)
    delay = rng.uniform(0.0, 0.05)
    print(f"cut after ACK #{cut_after} + {delay * 1000:.1f} ms")
    with (
        PowerLossMount(backing) as m,
        writer(writer_argv(str(m.mountpoint / "data"), seed, count, mode, tasks=5)) as w,
    ):
        w.wait_for("OPEN")
        for _ in range(cut_after):
            w.wait_for("ACK")
        time.sleep(delay)
        snap = m.power_cut(tmp_path / "cut")
        w.finish()
    acks = parse_acks(w.lines)
    assert len(acks) >= cut_after and "DONE" not in w.lines, "the cut came too late"
    attempted = max(acks) + 2 if mode == "free" else count
    print(reopen_and_check(snap / "data", seed, attempted, acks, sequential=mode == "free"))


@pytest.mark.fuse
@pytest.mark.root
@pytest.mark.timeout(180)
def test_snapshot_at_every_sync_event(tmp_path: Path, mailharbor_seed: int) -> None:
    """Lock-step writer: after each ACK the parent notes the sync-event count; every automatic
    snapshot taken at or after it must hold that message."""
    require_fuse()
    rng = seeded(mailharbor_seed, "fuse_every_sync")
    backing = tmp_path / "backing"
    prepare_store(str(backing / "data"), WRITER_OPTIONS, WRITER_ACCOUNTS)
    snaps = tmp_path / "snaps"
    count = 24
    seed = rng.randrange(2**31)
    required_at: dict[int, int] = {}
    with PowerLossMount(backing, snapshot_dir=snaps) as m:
        with writer(writer_argv(str(m.mountpoint / "data"), seed, count, "lockstep")) as w:
            w.wait_for("OPEN")
            for i in range(count):
                w.go()
                ln = w.wait_for("ACK")
                assert ln.split()[1] == str(i), ln
                required_at[i] = m.sync_count()
            w.wait_for("DONE")
            w.finish()
        events = m.sync_events()
    assert events and events[0].k == 0
    print(f"{len(events)} sync events: {[e.op for e in events[:12]]}...")
    acks = parse_acks(w.lines)
    checked = 0
    for ev in events:
        required = {i: lsn for i, lsn in acks.items() if required_at[i] <= ev.k}
        assert ev.snapshot is not None
        data = ev.snapshot / "data"
        try:
            reopen_and_check(data, seed, count, required, sequential=True)
        except AssertionError as e:
            raise AssertionError(
                f"snapshot after sync event {ev.k} ({ev.op} {ev.path}): {e}"
            ) from None
        except Exception as e:
            raise AssertionError(
                f"snapshot after sync event {ev.k} ({ev.op} {ev.path}): {type(e).__name__}: {e}"
            ) from e
        checked += 1
    final = read_sync_events(snaps)[-1].snapshot
    assert final is not None
    st = Store.open(str(final / "data"), node_id=NODE, options=WRITER_OPTIONS)
    try:
        assert not check_writer_messages(st, seed, count, acks, sequential=True)
    finally:
        st.close()
    print(f"{checked} snapshots verified")


@pytest.mark.fuse
@pytest.mark.root
@pytest.mark.timeout(60)
def test_power_cut_after_first_commit_of_a_new_store(tmp_path: Path) -> None:
    """`mailharbor init` leaves an empty data directory; the store creates log/ and
    checkpoints/ in it. Once the first commit is acknowledged (and even after a clean close),
    a power cut must not lose it."""
    require_fuse()
    backing = tmp_path / "backing"
    (backing / "data").mkdir(parents=True)
    with PowerLossMount(backing) as m:
        st = Store.open(str(m.mountpoint / "data"), node_id=NODE, options=WRITER_OPTIONS)
        try:
            with st.transaction() as t:
                t.add_domain("first.test")
        finally:
            st.close()
        snap = m.power_cut(tmp_path / "cut")
    left = sorted(str(p.relative_to(snap)) for p in snap.rglob("*"))
    st = Store.open(str(snap / "data"), node_id=NODE, options=WRITER_OPTIONS)
    try:
        assert "first.test" in st.index.domains, (
            f"acknowledged commit lost by a power cut; the durable state held only {left}"
        )
    finally:
        st.close()


# --- kill -9 (no FUSE) --------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["free", "async"])
def test_kill_9_mid_workload(tmp_path: Path, mailharbor_seed: int, mode: str) -> None:
    rng = seeded(mailharbor_seed, f"kill9_{mode}")
    data = tmp_path / "data"
    prepare_store(str(data), WRITER_OPTIONS, WRITER_ACCOUNTS)
    count = 1000
    seed = rng.randrange(2**31)
    kill_after = rng.randint(5, 60)
    with writer(writer_argv(str(data), seed, count, mode, tasks=5)) as w:
        w.wait_for("OPEN")
        for _ in range(kill_after):
            w.wait_for("ACK")
        time.sleep(rng.uniform(0.0, 0.02))
        w.kill()
    acks = parse_acks(w.lines)
    assert len(acks) >= kill_after and "DONE" not in w.lines, "killed too late"
    print(f"killed after {len(acks)} acks")
    attempted = max(acks) + 2 if mode == "free" else count  # async: any may be in flight
    print(reopen_and_check(data, seed, attempted, acks, sequential=mode == "free"))
