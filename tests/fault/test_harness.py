"""Proves the disk-fault harness itself, with plain Python file I/O (no mailharbor code).

The power-loss file system must keep exactly what the crash model says survives; the small
file systems must raise ENOSPC; strace must make fsync raise EIO from the Nth call on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .disks import loop_ext4, require_fuse, run_with_fsync_eio, small_tmpfs
from .powerloss_fs import (
    History,
    PowerLossMount,
    SyncEvent,
    is_mounted,
    iter_tree,
    make_test_dir,
    read_sync_events,
)

pytestmark = [pytest.mark.root]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, *, sync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def snap_of(event: SyncEvent) -> Path:
    assert event.snapshot is not None
    return event.snapshot


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A scratch directory ``/tmp/mh-test-<pid>-fault-*``, removed afterwards."""
    path = make_test_dir("fault")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def plfs(workdir: Path) -> Iterator[PowerLossMount]:
    """A mounted power-loss file system over an empty backing directory."""
    require_fuse()
    backing = workdir / "backing"
    backing.mkdir()
    with PowerLossMount(backing) as m:
        yield m


# -- power loss -----------------------------------------------------------------------------


@pytest.mark.fuse
@pytest.mark.timeout(60)
def test_unsynced_file_is_empty(plfs: PowerLossMount, workdir: Path) -> None:
    mp = plfs.mountpoint
    write_file(mp / "f", b"", sync=False)
    fsync_dir(mp)  # the name is durable, the data never is
    write_file(mp / "f", b"volatile data", sync=False)
    assert (mp / "f").read_bytes() == b"volatile data"  # the live state has it
    snap = plfs.power_cut(workdir / "cut")
    assert (snap / "f").read_bytes() == b""


@pytest.mark.fuse
@pytest.mark.timeout(60)
def test_fsync_then_append_keeps_the_synced_prefix(plfs: PowerLossMount, workdir: Path) -> None:
    mp = plfs.mountpoint
    with open(mp / "log", "ab") as f:
        f.write(b"record-1;")
        f.flush()
        os.fsync(f.fileno())
        fsync_dir(mp)
        f.write(b"record-2;")
        f.flush()
        os.fdatasync(f.fileno())
        f.write(b"torn-rec")
        f.flush()
    snap = plfs.power_cut(workdir / "cut")
    assert (snap / "log").read_bytes() == b"record-1;record-2;"


@pytest.mark.fuse
@pytest.mark.timeout(60)
def test_new_file_without_directory_fsync_is_absent(plfs: PowerLossMount, workdir: Path) -> None:
    mp = plfs.mountpoint
    write_file(mp / "new", b"data", sync=True)
    (mp / "sub").mkdir()
    fsync_dir(mp)
    write_file(mp / "sub" / "inner", b"data", sync=True)  # sub itself never fsynced
    snap = plfs.power_cut(workdir / "cut")
    assert dict(iter_tree(snap)) == {"new": b"data", "sub": None}


@pytest.mark.fuse
@pytest.mark.timeout(60)
def test_rename_needs_a_directory_fsync(plfs: PowerLossMount, workdir: Path) -> None:
    mp = plfs.mountpoint
    write_file(mp / "current", b"v1", sync=True)
    fsync_dir(mp)
    # atomic replace without the directory fsync: undone
    write_file(mp / "tmp", b"v2", sync=True)
    os.replace(mp / "tmp", mp / "current")
    first = plfs.snapshot(workdir / "before-dirsync")
    assert dict(iter_tree(first)) == {"current": b"v1"}
    # ... and with it: kept
    fsync_dir(mp)
    os.rename(mp / "current", mp / "renamed-later")  # not synced: undone
    snap = plfs.power_cut(workdir / "cut")
    assert dict(iter_tree(snap)) == {"current": b"v2"}


@pytest.mark.fuse
@pytest.mark.timeout(60)
def test_unlink_and_truncate_are_undone_without_sync(plfs: PowerLossMount, workdir: Path) -> None:
    mp = plfs.mountpoint
    write_file(mp / "doomed", b"keep me", sync=True)
    write_file(mp / "shrunk", b"0123456789", sync=True)
    fsync_dir(mp)
    os.unlink(mp / "doomed")
    os.truncate(mp / "shrunk", 3)
    # the freed inode number may be reused: the new file must not inherit "doomed"'s state
    (mp / "d").mkdir()
    write_file(mp / "d" / "fresh", b"fresh", sync=True)
    fsync_dir(mp / "d")
    snap = plfs.power_cut(workdir / "cut")
    assert dict(iter_tree(snap)) == {"doomed": b"keep me", "shrunk": b"0123456789"}
    # "d" was never made durable in the root, so neither is its content


@pytest.mark.fuse
@pytest.mark.timeout(60)
def test_truncate_then_extend_is_durable_after_fsync(plfs: PowerLossMount, workdir: Path) -> None:
    mp = plfs.mountpoint
    write_file(mp / "f", b"A" * 100, sync=True)
    fsync_dir(mp)
    with open(mp / "f", "r+b") as f:
        f.truncate(10)
        f.seek(50)
        f.write(b"B" * 10)
        f.flush()
        os.fsync(f.fileno())
    snap = plfs.power_cut(workdir / "cut")
    assert (snap / "f").read_bytes() == b"A" * 10 + b"\0" * 40 + b"B" * 10


@pytest.mark.fuse
@pytest.mark.timeout(60)
def test_unlinked_open_file_links_and_symlinks(plfs: PowerLossMount, workdir: Path) -> None:
    mp = plfs.mountpoint
    (mp / "sub").mkdir()
    fd = os.open(mp / "open-unlinked", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fsync_dir(mp)  # "sub" and "open-unlinked" are durable names from now on
        os.unlink(mp / "open-unlinked")  # not durable: the name stays after a crash
        os.write(fd, b"written after unlink")
        os.fsync(fd)
        assert os.pread(fd, 100, 0) == b"written after unlink"
    finally:
        os.close(fd)
    write_file(mp / "sub" / "a", b"shared", sync=True)
    os.link(mp / "sub" / "a", mp / "sub" / "b")
    os.symlink("a", mp / "sub" / "s")
    fsync_dir(mp / "sub")
    snap = plfs.power_cut(workdir / "cut")
    assert dict(iter_tree(snap)) == {
        "open-unlinked": b"written after unlink",
        "sub": None,
        "sub/a": b"shared",
        "sub/b": b"shared",
        "sub/s": b"-> a",
    }
    assert (snap / "sub" / "a").stat().st_ino == (snap / "sub" / "b").stat().st_ino
    assert (snap / "open-unlinked").stat().st_mode & 0o777 == 0o640


@pytest.mark.fuse
@pytest.mark.timeout(60)
def test_power_cut_freezes_the_mount(plfs: PowerLossMount, workdir: Path) -> None:
    mp = plfs.mountpoint
    f = open(mp / "f", "wb")  # noqa: SIM115 - must stay open across the cut
    try:
        plfs.power_cut(workdir / "cut")
        with pytest.raises(OSError):
            f.write(b"x")
            f.flush()
    finally:
        with contextlib.suppress(OSError):
            f.close()
    assert not is_mounted(mp)


@pytest.mark.fuse
@pytest.mark.timeout(60)
def test_existing_content_is_durable_and_live_state_stays_in_backing(workdir: Path) -> None:
    require_fuse()
    backing = workdir / "backing"
    (backing / "dir").mkdir(parents=True)
    (backing / "dir" / "old").write_bytes(b"old")
    with PowerLossMount(backing) as m:
        write_file(m.mountpoint / "dir" / "old", b"new", sync=False)
        snap = m.power_cut(workdir / "cut")
    assert dict(iter_tree(snap)) == {"dir": None, "dir/old": b"old"}
    assert (backing / "dir" / "old").read_bytes() == b"new"


@pytest.mark.fuse
@pytest.mark.timeout(60)
def test_clean_exit_unmounts(workdir: Path) -> None:
    require_fuse()
    backing = workdir / "backing"
    backing.mkdir()
    with PowerLossMount(backing) as m:
        mp = m.mountpoint
        write_file(mp / "f", b"x", sync=False)
        assert os.path.ismount(mp)
    assert not os.path.exists(mp)
    assert (backing / "f").read_bytes() == b"x"


@pytest.mark.fuse
@pytest.mark.timeout(120)
def test_snapshot_at_every_fsync(workdir: Path) -> None:
    require_fuse()
    backing = workdir / "backing"
    backing.mkdir()
    snaps = workdir / "snaps"
    n = 300
    started = time.monotonic()
    with PowerLossMount(backing, snapshot_dir=snaps) as m:
        mp = m.mountpoint
        with open(mp / "log", "ab") as f:
            fsync_dir(mp)  # sync event 1: the (empty) log's name
            for i in range(2, n + 1):
                f.write(b"%05d;" % i)
                f.flush()
                os.fsync(f.fileno())
        assert m.sync_count() == n
        assert m.sync_counts() == {"fsync": n - 1, "fdatasync": 0, "fsyncdir": 1}
        m.power_cut(workdir / "cut")
    elapsed = time.monotonic() - started
    events = read_sync_events(snaps)
    assert [e.k for e in events] == list(range(n + 1))
    assert events[0].op == "mount" and events[1].op == "fsyncdir"
    assert {e.op for e in events[2:]} == {"fsync"} and events[2].path == "/log"
    assert list(iter_tree(snap_of(events[0]))) == []
    for e in events[1:]:
        expected = b"".join(b"%05d;" % i for i in range(2, e.k + 1))
        assert (snap_of(e) / "log").read_bytes() == expected, e.k
    print(f"mount + {n} fsyncs with a snapshot each + power cut: {elapsed:.2f}s")


@pytest.mark.fuse
@pytest.mark.timeout(60)
def test_snapshot_every_nth_enabled_at_runtime(plfs: PowerLossMount, workdir: Path) -> None:
    mp = plfs.mountpoint
    with open(mp / "f", "wb") as f:
        for _ in range(3):
            os.fsync(f.fileno())  # events 1..3, before snapshots are on
        plfs.set_snapshot_every(workdir / "snaps", every=2)
        for i in range(4, 9):
            f.write(b"%d" % i)
            f.flush()
            os.fsync(f.fileno())
    events = plfs.sync_events()
    assert [e.k for e in events] == [4, 6, 8]
    assert [(snap_of(e) / "f").exists() for e in events] == [False] * 3  # name never synced
    fsync_dir(mp)
    assert (plfs.snapshot(workdir / "now") / "f").read_bytes() == b"45678"


def _random_workload(root: Path, rng: random.Random, steps: int) -> None:
    """Creates, appends, overwrites, truncates, renames, links, unlinks, makes and removes
    directories, with file and directory fsyncs mixed in."""
    dirs = [root]
    files: list[Path] = []
    for step in range(steps):
        op = rng.choice(
            ["create", "append", "overwrite", "truncate", "rename", "link", "unlink", "mkdir"]
            + ["fsync"] * 4
            + ["fsyncdir"] * 3
        )
        files = [f for f in files if f.exists()]
        dirs = [d for d in dirs if d.exists()]
        if op == "create" or not files:
            path = rng.choice(dirs) / f"f{step}"
            write_file(path, rng.randbytes(rng.randrange(0, 3000)), sync=rng.random() < 0.3)
            files.append(path)
        elif op == "append":
            with open(rng.choice(files), "ab") as f:
                f.write(rng.randbytes(rng.randrange(1, 5000)))
        elif op == "overwrite":
            with open(rng.choice(files), "r+b") as g:
                g.seek(rng.randrange(0, 4000))
                g.write(rng.randbytes(rng.randrange(1, 2000)))
        elif op == "truncate":
            os.truncate(rng.choice(files), rng.randrange(0, 4000))
        elif op == "rename":
            src = rng.choice(files)
            dst = rng.choice(dirs) / rng.choice([f"r{step}", *(f.name for f in files[:3])])
            if not dst.is_dir():
                os.replace(src, dst)
                files.append(dst)
        elif op == "link":
            src = rng.choice(files)
            dst = rng.choice(dirs) / f"l{step}"
            os.link(src, dst)
            files.append(dst)
        elif op == "unlink":
            os.unlink(rng.choice(files))
        elif op == "mkdir" and len(dirs) < 4:
            new_dir = rng.choice(dirs) / f"d{step}"
            new_dir.mkdir()
            dirs.append(new_dir)
        elif op == "fsync":
            fd = os.open(rng.choice(files), os.O_RDONLY)
            try:
                (os.fsync if rng.random() < 0.5 else os.fdatasync)(fd)
            finally:
                os.close(fd)
        elif op == "fsyncdir":
            fsync_dir(rng.choice(dirs))


@pytest.mark.fuse
@pytest.mark.timeout(120)
def test_history_matches_the_snapshot_at_every_sync_event(workdir: Path) -> None:
    """Two independent paths to the durable state after event k must agree: the snapshots the
    file system writes at each event, and the journal replay of History."""
    require_fuse()
    backing = workdir / "backing"
    (backing / "pre").mkdir(parents=True)
    (backing / "pre" / "existing").write_bytes(b"existing before the mount")
    snaps = workdir / "snaps"
    with PowerLossMount(backing, snapshot_dir=snaps) as m:
        _random_workload(m.mountpoint, random.Random(random.random()), 400)
        saved = m.save_history(workdir / "saved")
        last = m.power_cut(workdir / "cut", history_dir=workdir / "hist")
    history = History(workdir / "hist")
    events = read_sync_events(snaps)
    assert [e.k for e in history.events] == [e.k for e in events]
    assert [(e.op, e.path) for e in history.events] == [(e.op, e.path) for e in events]
    assert history.last == events[-1].k > 100
    assert saved.last == history.last
    for e in events:
        with history.materialized(e.k) as tree:
            assert list(iter_tree(tree)) == list(iter_tree(snap_of(e))), e.k
            for p in tree.rglob("*"):
                q = snap_of(e) / p.relative_to(tree)
                assert p.lstat().st_mode == q.lstat().st_mode, (e.k, p)
    assert list(iter_tree(last)) == list(iter_tree(snap_of(events[-1])))
    with saved.materialized(saved.last) as tree:
        assert list(iter_tree(tree)) == list(iter_tree(last))


# -- ENOSPC ---------------------------------------------------------------------------------


def _fill(path: Path) -> OSError:
    with open(path, "wb", buffering=0) as f:
        chunk = b"x" * 65536
        for _ in range(10_000):
            try:
                f.write(chunk)
            except OSError as exc:
                return exc
    raise AssertionError("the file system never filled up")


@pytest.mark.timeout(60)
def test_small_tmpfs_raises_enospc() -> None:
    with small_tmpfs(256 * 1024) as mnt:
        assert os.path.ismount(mnt)
        exc = _fill(mnt / "big")
        assert exc.errno == errno.ENOSPC
    assert not os.path.exists(mnt)


@pytest.mark.timeout(60)
def test_loop_ext4_raises_enospc() -> None:
    with loop_ext4(4 * 1024 * 1024) as mnt:
        assert os.path.ismount(mnt)
        exc = _fill(mnt / "big")
        assert exc.errno == errno.ENOSPC
    assert not os.path.exists(mnt)


@pytest.mark.fuse
@pytest.mark.timeout(60)
def test_enospc_passes_through_the_power_loss_fs(workdir: Path) -> None:
    require_fuse()
    with small_tmpfs(256 * 1024) as tmpfs, PowerLossMount(tmpfs) as m:
        exc = _fill(m.mountpoint / "big")
        assert exc.errno == errno.ENOSPC


# -- EIO ------------------------------------------------------------------------------------

_FSYNC_SCRIPT = textwrap.dedent(
    """
    import os, sys
    target, other = sys.argv[1], sys.argv[2]
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o644)
    ofd = os.open(other, os.O_WRONLY | os.O_CREAT, 0o644)
    for i in range(1, 6):
        os.write(fd, b"x")
        os.fsync(ofd)  # another file: never failed, never counted
        try:
            os.fsync(fd)
            print(i, "ok")
        except OSError as exc:
            print(i, "errno", exc.errno)
    try:
        os.fdatasync(fd)
        print("fdatasync ok")
    except OSError as exc:
        print("fdatasync errno", exc.errno)
    """
)


@pytest.mark.timeout(60)
def test_fsync_eio_injection_after_n(workdir: Path) -> None:
    script = workdir / "fsyncer.py"
    script.write_text(_FSYNC_SCRIPT)
    target, other = workdir / "target", workdir / "other"
    run = run_with_fsync_eio(
        [sys.executable, str(script), str(target), str(other)], target, after_n=3
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.split("\n")
    assert lines[:5] == ["1 ok", "2 ok", f"3 errno {errno.EIO}", "4 errno 5", "5 errno 5"]
    assert lines[5] == "fdatasync ok"  # counted separately: its first call
    assert run.injected == 3 and run.calls == 6
    assert target.read_bytes() == b"xxxxx"


@pytest.mark.timeout(60)
def test_fsync_eio_injection_from_first_call(workdir: Path) -> None:
    script = workdir / "fsyncer.py"
    script.write_text(_FSYNC_SCRIPT)
    target, other = workdir / "target", workdir / "other"
    run = run_with_fsync_eio([sys.executable, str(script), str(target), str(other)], target)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:6] == [
        *(f"{i} errno 5" for i in range(1, 6)),
        "fdatasync errno 5",
    ]
    assert run.injected == 6


def test_helpers_leave_nothing_mounted() -> None:
    marker = f"mh-test-{os.environ.get('MAILHARBOR_TEST_RUN') or os.getpid()}-"
    out = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True)
    leftovers = [line for line in out.stdout.splitlines() if marker in line]
    assert leftovers == []
