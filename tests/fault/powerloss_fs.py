"""A FUSE passthrough file system that models a volatile write cache, for power-loss tests.

Theory of operation
-------------------

``PowerLossMount(backing, mountpoint)`` starts this file as a separate process (fusepy on
libfuse 2) that mounts ``mountpoint`` as a passthrough of ``backing``: every operation goes to
the backing directory at once, so the *live* state seen through the mount is the backing
directory, exactly as a page cache would show it.

Alongside, the process keeps the **durable state**: what would survive a power cut under the
project's crash model ("unsynced files come back empty after a crash, and a rename is lost
without an fsync of the directory"):

- Inodes are tracked by identity (a private inode number per backing ``(st_dev, st_ino)``,
  renewed whenever an inode is created through the mount, so a reused backing inode number never
  inherits old durable state).
- A regular file's durable content is the file's bytes *and size* at its last ``fsync`` or
  ``fdatasync`` (both count as full syncs of data and size). Before the first one it is empty.
  Writes and truncates between syncs are tracked as dirty byte ranges, so a sync copies only
  what changed (appending to a log costs the appended bytes, not the whole file).
- A directory's durable content is its name -> inode mapping at its last ``fsyncdir`` (an
  ``fsync`` of a directory fd). Creating, unlinking, renaming or hard-linking a name is durable
  only after an fsync of the directory that holds the name; a cross-directory rename is committed
  per directory (fsyncing only the target directory can leave the inode under both names,
  fsyncing only the source can lose it), which is the adversarial reading of the crash model.
- Whatever was in ``backing`` at mount time is taken as durable.
- ``sync()``/``syncfs()`` never reach a FUSE daemon, so they make nothing durable here.

A **sync event** is every ``fsync``, ``fdatasync`` or ``fsyncdir`` that reaches the file system;
they are numbered 1, 2, 3, ... The durable state only changes at sync events, so the snapshots
after each event (plus the one at mount, number 0) are all the states a power cut can leave.

A **snapshot** materializes the durable state as an ordinary directory tree: files with their
durable bytes and permission bits, directories, symlinks, FIFOs, and files durable under two names
as hard links of each other. A snapshot is independent of the mount (a test may open, recover and
modify it). When ``snapshot_dir`` is given, the file system writes ``snapshot_dir/000000`` at mount
and ``snapshot_dir/<k:06d>`` after every ``snapshot_every``-th sync event, and appends one JSON line
per snapshot to ``snapshot_dir/index.jsonl``: ``{"k": k, "op": "fsync"|"fdatasync"|"fsyncdir"|
"mount", "path": path-in-mount-or-null}``.

The **history** of a run is the durable state after every sync event, kept cheaply (each sync
appends the bytes it made durable to a per-file journal) and materialized on demand:
``power_cut(history_dir=h)`` or ``save_history(h)``, then ``History(h).materialize(k, dest)`` or
``with History(h).materialized(k) as tree: ...``. Prefer it to per-event snapshots for crash tests
over growing files: per-event snapshots copy the whole durable state at every event (quadratic in
disk writes), the history only what each sync changed.

``power_cut()`` freezes the file system (from then on every operation fails with EIO, like a
vanished disk), snapshots the durable state, kills the process with SIGKILL and detaches the mount
lazily. Everything after the freeze is lost, as in a real power cut.

The parent and the file system process talk over a socketpair, one JSON object per line.

Limitations: one backing file system (no mounts nested inside ``backing``); extended attributes
are not supported (ENOTSUP); ``O_DIRECT`` is accepted but served through the page cache (it never
implied durability anyway); shared writable ``mmap`` works through the kernel's write-back and
``msync``/``fsync``; ``RENAME_EXCHANGE``/``RENAME_NOREPLACE`` are refused by libfuse 2 (EINVAL);
metadata other than size and permission bits (owner, times, xattrs) is not part of the durable
model; fsync's own errors (EIO, ENOSPC at write-back) are not simulated here (see disks.py).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

#: Every name this module creates for things that can outlive a killed run contains
#: ``mh-test-<run pid>-`` (see tests/conftest.py and tools/cleanup.sh).
FUSE_SUBTYPE = "mh-powerloss"

_INF = 1 << 62
_CHUNK = 1 << 20


def run_marker() -> str:
    """The ``mh-test-<pid>-`` prefix of this test run (the pytest pid when run under pytest)."""
    run = os.environ.get("MAILHARBOR_TEST_RUN") or str(os.getpid())
    return f"mh-test-{run}-"


def make_test_dir(kind: str, parent: str = "/tmp") -> Path:
    """Create and return a new empty directory ``<parent>/mh-test-<run pid>-<kind>-<random>``.

    The name is unique (``tempfile.mkdtemp``) and carries the run marker, so tools/cleanup.sh can
    find it (and anything mounted on it) if the run is killed.
    """
    return Path(tempfile.mkdtemp(prefix=f"{run_marker()}{kind}-", dir=parent))


# --------------------------------------------------------------------------------------------
# The durable model (runs inside the file system process)
# --------------------------------------------------------------------------------------------

#: A journal record: event number k, file size after the event, offset, data length, mode bits;
#: then the data. A file's journal holds, in event order, every byte made durable.
_RECORD = struct.Struct("<qqqqI")


@dataclass
class _Node:
    """One inode: its durable state, and the live changes not yet made durable."""

    vino: int
    kind: str  # "f" file, "d" directory, "l" symlink, "p" FIFO, "o" other (not materialized)
    mode: int  # durable permission bits (now)
    mode0: int  # permission bits when first seen (durable until a sync says otherwise)
    entries: dict[str, int]  # directories: durable name -> vino (now)
    target: str = ""  # symlinks
    has_data: bool = False  # files: durable bytes are in the store (else: empty)
    dirty: list[tuple[int, int]] | None = None  # files: live byte ranges changed since sync
    versions: list[tuple[int, dict[str, int], int]] | None = None  # dirs: (k, entries, mode)


def _kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "f"
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISLNK(mode):
        return "l"
    if stat.S_ISFIFO(mode):
        return "p"
    return "o"


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def _build_tree(
    dest: str,
    root: int,
    kind_of: Callable[[int], str],
    entries_of: Callable[[int], dict[str, int]],
    mode_of: Callable[[int], int],
    target_of: Callable[[int], str],
    write_file: Callable[[int, str], None],
) -> None:
    """Create the tree rooted at directory ``root`` under ``dest`` (new or empty). Files seen twice
    become hard links; a directory already on the current path (a cycle only per-directory
    rename commits can make) is skipped."""
    os.makedirs(dest, exist_ok=True)
    if os.listdir(dest):
        raise FileExistsError(errno.EEXIST, "snapshot destination is not empty", dest)
    first_path: dict[int, str] = {}

    def fill(dir_vino: int, dir_path: str, on_path: frozenset[int]) -> None:
        for name, vino in sorted(entries_of(dir_vino).items()):
            kind = kind_of(vino)
            target = os.path.join(dir_path, name)
            if kind == "d":
                if vino in on_path:
                    continue
                os.mkdir(target)
                fill(vino, target, on_path | {vino})
                os.chmod(target, mode_of(vino))
            elif kind == "f":
                if vino in first_path:
                    os.link(first_path[vino], target)
                    continue
                write_file(vino, target)
                os.chmod(target, mode_of(vino))
                first_path[vino] = target
            elif kind == "l":
                os.symlink(target_of(vino), target)
            elif kind == "p":
                os.mkfifo(target, mode_of(vino))

    fill(root, dest, frozenset({root}))


class DurableModel:
    """Tracks what is durable; every method must be called with the file system's lock held.

    The current durable state is kept compacted (``store/<vino>`` per file, entries per
    directory) for fast snapshots; the history of every sync event is kept as per-file journals
    (``journal/<vino>``) and per-directory versions, for ``History``."""

    def __init__(self, backing: str, store: str, journal: str) -> None:
        self.backing = backing
        self.store = store
        self.journal = journal
        self._next = 1
        self._live: dict[tuple[int, int], int] = {}
        self._nodes: dict[int, _Node] = {}
        self.root = self._scan_initial()

    # -- identity ---------------------------------------------------------------------------

    def full(self, path: str) -> str:
        """The backing path for a path inside the mount ("/a/b")."""
        return os.path.join(self.backing, path.lstrip("/"))

    def register_new(self, st: os.stat_result, target: str = "") -> _Node:
        """A new inode appeared at ``st``: give it a fresh identity with no durable content."""
        vino = self._next
        self._next += 1
        kind = _kind_of(st.st_mode)
        mode = stat.S_IMODE(st.st_mode)
        node = _Node(vino, kind, mode, mode, {}, target)
        if kind == "f":
            node.dirty = []
        elif kind == "d":
            node.versions = []
        self._nodes[vino] = node
        self._live[(st.st_dev, st.st_ino)] = vino
        return node

    def node_of(self, st: os.stat_result, full: str | None = None) -> _Node:
        """The node of a live inode; unknown inodes (changed behind our back) count as new."""
        vino = self._live.get((st.st_dev, st.st_ino))
        if vino is not None:
            return self._nodes[vino]
        target = ""
        if stat.S_ISLNK(st.st_mode) and full is not None:
            target = os.readlink(full)
        return self.register_new(st, target)

    def _scan_initial(self) -> int:
        def scan(full: str, st: os.stat_result) -> _Node:
            node = self.node_of(st, full)
            if node.kind == "d":
                with os.scandir(full) as it:
                    for entry in it:
                        child = scan(entry.path, entry.stat(follow_symlinks=False))
                        node.entries[entry.name] = child.vino
                assert node.versions is not None
                node.versions.append((0, dict(node.entries), node.mode))
            elif node.kind == "f":
                fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    self._sync_fd(node, fd, os.fstat(fd), 0)
                finally:
                    os.close(fd)
            return node

        return scan(self.backing, os.lstat(self.backing)).vino

    def _store_path(self, vino: int) -> str:
        return os.path.join(self.store, str(vino))

    # -- live changes -----------------------------------------------------------------------

    def mark_dirty(self, st: os.stat_result, start: int, end: int) -> None:
        """Bytes [start, end) of the file ``st`` changed in the live state."""
        node = self.node_of(st)
        if node.dirty is None or end <= start:
            return
        if node.dirty and node.dirty[-1][0] <= start <= node.dirty[-1][1]:
            last = node.dirty[-1]
            node.dirty[-1] = (last[0], max(last[1], end))
        else:
            node.dirty.append((start, end))
            if len(node.dirty) > 4096:
                node.dirty = _merge(node.dirty)

    def mark_truncated(self, st: os.stat_result, size: int) -> None:
        """The file ``st`` was truncated (or extended) to ``size`` in the live state."""
        self.mark_dirty(st, size, _INF)

    # -- sync events ------------------------------------------------------------------------

    def sync_file(self, fd: int, k: int) -> None:
        """Sync event ``k`` is an fsync/fdatasync of the open backing file ``fd``: its bytes and
        size become durable."""
        st = os.fstat(fd)
        node = self.node_of(st)
        if node.kind != "f" or node.dirty is None:
            return
        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        try:
            self._sync_fd(node, rfd, st, k)
        finally:
            os.close(rfd)

    def _sync_fd(self, node: _Node, rfd: int, st: os.stat_result, k: int) -> None:
        assert node.dirty is not None
        size = st.st_size
        mode = stat.S_IMODE(st.st_mode)
        ranges = _merge(node.dirty) if node.has_data else [(0, size)]
        jpath = os.path.join(self.journal, str(node.vino))
        wfd = os.open(self._store_path(node.vino), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with open(jpath, "ab") as journal:
                os.ftruncate(wfd, size)
                journal.write(_RECORD.pack(k, size, 0, 0, mode))
                for start, end in ranges:
                    pos, stop = start, min(end, size)
                    while pos < stop:
                        data = os.pread(rfd, min(_CHUNK, stop - pos), pos)
                        if not data:
                            break
                        os.pwrite(wfd, data, pos)
                        journal.write(_RECORD.pack(k, size, pos, len(data), mode))
                        journal.write(data)
                        pos += len(data)
        finally:
            os.close(wfd)
        node.dirty = []  # only now: a failed copy must be retried by the next sync
        node.has_data = True
        node.mode = mode

    def sync_dir(self, path: str, k: int) -> None:
        """Sync event ``k`` is an fsync of the directory at ``path``: its current entries become
        durable."""
        full = self.full(path)
        st = os.lstat(full)
        node = self.node_of(st, full)
        if node.kind != "d" or node.versions is None:
            return
        entries: dict[str, int] = {}
        with os.scandir(full) as it:
            for entry in it:
                child = self.node_of(entry.stat(follow_symlinks=False), entry.path)
                entries[entry.name] = child.vino
        node.entries = entries
        node.mode = stat.S_IMODE(st.st_mode)
        node.versions.append((k, dict(entries), node.mode))

    # -- snapshots and history --------------------------------------------------------------

    def materialize(self, dest: str) -> None:
        """Write the current durable state as a fresh directory tree at ``dest``."""
        nodes = self._nodes

        def write_file(vino: int, target: str) -> None:
            if nodes[vino].has_data:
                shutil.copyfile(self._store_path(vino), target)
            else:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))

        _build_tree(
            dest,
            self.root,
            lambda v: nodes[v].kind,
            lambda v: nodes[v].entries,
            lambda v: nodes[v].mode,
            lambda v: nodes[v].target,
            write_file,
        )

    def history_meta(self) -> dict[str, Any]:
        """Everything but the file journals that ``History`` needs (JSON-able)."""
        return {
            "root": self.root,
            "nodes": {
                str(n.vino): {
                    "kind": n.kind,
                    "mode0": n.mode0,
                    "target": n.target,
                    "versions": [[k, e, m] for k, e, m in n.versions or []],
                }
                for n in self._nodes.values()
            },
        }


class History:
    """The durable state after every sync event of a run, materialized on demand.

    Written by ``PowerLossMount.power_cut(history_dir=...)`` or ``save_history()``: a directory
    with ``meta.json`` and one journal per file. ``events`` lists the sync events (k = 0 is the
    mount); ``materialize(k, dest)`` writes the durable state right after event ``k`` — the state a
    power cut between event ``k`` and event ``k + 1`` leaves — exactly as ``snapshot()`` would have
    at that moment. Reading needs no FUSE and no running file system.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        meta = json.loads((self.directory / "meta.json").read_text())
        self._root = int(meta["root"])
        self._nodes: dict[int, dict[str, Any]] = {int(v): n for v, n in meta["nodes"].items()}
        self.events = [SyncEvent(int(e["k"]), e["op"], e["path"], None) for e in meta["events"]]

    @property
    def last(self) -> int:
        """The number of the last sync event recorded."""
        return self.events[-1].k

    def _version(self, vino: int, k: int) -> tuple[dict[str, int], int]:
        node = self._nodes[vino]
        entries: dict[str, int] = {}
        mode = int(node["mode0"])
        for vk, ventries, vmode in node["versions"]:
            if vk > k:
                break
            entries, mode = {name: int(v) for name, v in ventries.items()}, int(vmode)
        return entries, mode

    def _records(
        self, vino: int, k: int, *, data: bool
    ) -> Iterator[tuple[int, int, int, int, int, bytes]]:
        path = self.directory / str(vino)
        if not path.exists():
            return
        with open(path, "rb") as f:
            while True:
                head = f.read(_RECORD.size)
                if len(head) < _RECORD.size:
                    return
                rk, size, off, length, mode = _RECORD.unpack(head)
                if rk > k:
                    return
                if data:
                    chunk = f.read(length)
                else:
                    f.seek(length, os.SEEK_CUR)
                    chunk = b""
                yield rk, size, off, length, mode, chunk

    def materialize(self, k: int, dest: str | os.PathLike[str]) -> Path:
        """Write the durable state right after sync event ``k`` into ``dest`` (new or empty)."""
        if not 0 <= k <= self.last:
            raise IndexError(f"no sync event {k} (0..{self.last})")
        modes: dict[int, int] = {}

        def entries_of(vino: int) -> dict[str, int]:
            entries, modes[vino] = self._version(vino, k)
            return entries

        def mode_of(vino: int) -> int:
            return modes.get(vino, int(self._nodes[vino]["mode0"]))

        def write_file(vino: int, target: str) -> None:
            mode = int(self._nodes[vino]["mode0"])
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                for _rk, size, off, _length, rmode, chunk in self._records(vino, k, data=True):
                    os.ftruncate(fd, size)
                    if chunk:
                        os.pwrite(fd, chunk, off)
                    mode = rmode
            finally:
                os.close(fd)
            modes[vino] = mode

        _build_tree(
            str(dest),
            self._root,
            lambda v: str(self._nodes[v]["kind"]),
            entries_of,
            mode_of,
            lambda v: str(self._nodes[v]["target"]),
            write_file,
        )
        return Path(dest)

    @contextlib.contextmanager
    def materialized(self, k: int) -> Iterator[Path]:
        """Materialize event ``k`` into a new ``/tmp/mh-test-<pid>-plfs-hist-*`` directory and
        remove it afterwards."""
        work = make_test_dir("plfs-hist")
        try:
            yield self.materialize(k, work / "root")
        finally:
            shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The FUSE operations (run inside the file system process)
# --------------------------------------------------------------------------------------------


class PowerLossOps:
    """fusepy operations (``raw_fi`` mode) of the passthrough; one lock serializes them all."""

    use_ns = True

    def __init__(
        self,
        backing: str,
        state: str,
        snapshot_dir: str | None,
        snapshot_every: int,
        ctl: socket.socket,
    ) -> None:
        self._mutex = threading.RLock()
        self.journal = os.path.join(state, "journal")
        os.makedirs(self.journal)
        store = os.path.join(state, "store")
        os.makedirs(store)
        self.model = DurableModel(backing, store, self.journal)
        self.frozen = False
        self.sync_count = 0
        self.counts = {"fsync": 0, "fdatasync": 0, "fsyncdir": 0}
        self.events: list[dict[str, Any]] = [{"k": 0, "op": "mount", "path": None}]
        self.snapshot_dir = snapshot_dir
        self.snapshot_every = snapshot_every
        self.append_fds: set[int] = set()
        self.ctl = ctl
        self.ctl_lock = threading.Lock()
        if snapshot_dir is not None:
            self._auto_snapshot("mount", None)

    # -- plumbing ---------------------------------------------------------------------------

    def __call__(self, op: str, *args: Any) -> Any:
        with self._mutex:
            if self.frozen and op not in ("release", "releasedir", "destroy", "init"):
                raise OSError(errno.EIO, "power cut")
            return getattr(self, op)(*args)

    def send(self, msg: dict[str, Any]) -> None:
        with self.ctl_lock:
            self.ctl.sendall(json.dumps(msg).encode() + b"\n")

    def _full(self, path: str) -> str:
        return self.model.full(path)

    def _sync_event(self, op: str, path: str | None) -> None:
        self.sync_count += 1
        self.counts[op] += 1
        self.events.append({"k": self.sync_count, "op": op, "path": path})
        if self.snapshot_dir is not None and self.sync_count % self.snapshot_every == 0:
            self._auto_snapshot(op, path)

    def _auto_snapshot(self, op: str, path: str | None) -> None:
        assert self.snapshot_dir is not None
        k = self.sync_count
        self.model.materialize(os.path.join(self.snapshot_dir, f"{k:06d}"))
        with open(os.path.join(self.snapshot_dir, "index.jsonl"), "a") as f:
            f.write(json.dumps({"k": k, "op": op, "path": path}) + "\n")

    def _write_meta(self, directory: str) -> None:
        meta = self.model.history_meta()
        meta["events"] = self.events
        tmp = os.path.join(directory, "meta.json.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, os.path.join(directory, "meta.json"))

    def command(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Serve one request from the parent (see PowerLossMount)."""
        cmd = msg.get("cmd")
        with self._mutex:
            if cmd == "snapshot":
                self.model.materialize(msg["dest"])
            elif cmd == "cut":
                self.frozen = True
                self.model.materialize(msg["dest"])
                self._write_meta(self.journal)
            elif cmd == "history":
                shutil.copytree(self.journal, msg["dest"], dirs_exist_ok=True)
                self._write_meta(msg["dest"])
            elif cmd == "snapshot_every":
                self.snapshot_dir = msg["dir"]
                self.snapshot_every = max(1, int(msg["every"]))
            elif cmd != "stats":
                raise ValueError(f"unknown command {cmd!r}")
            return {"ok": True, "sync_count": self.sync_count, "counts": dict(self.counts)}

    # -- FUSE operations --------------------------------------------------------------------

    def init(self, path: str) -> None:
        self.send({"event": "ready", "pid": os.getpid()})

    def destroy(self, path: str) -> None:
        return None

    def getattr(self, path: str | None, fh: Any = None) -> dict[str, int]:
        st = os.fstat(fh.fh) if fh else os.lstat(self._full(path or "/"))
        return {
            "st_mode": st.st_mode,
            "st_ino": st.st_ino,
            "st_nlink": st.st_nlink,
            "st_uid": st.st_uid,
            "st_gid": st.st_gid,
            "st_size": st.st_size,
            "st_rdev": st.st_rdev,
            "st_blocks": st.st_blocks,
            "st_blksize": st.st_blksize,
            "st_atime": st.st_atime_ns,
            "st_mtime": st.st_mtime_ns,
            "st_ctime": st.st_ctime_ns,
        }

    def access(self, path: str, amode: int) -> None:
        if not os.access(self._full(path), amode, follow_symlinks=False):
            raise OSError(errno.EACCES, "access denied")

    def readlink(self, path: str) -> str:
        return os.readlink(self._full(path))

    def opendir(self, path: str) -> int:
        return 0

    def releasedir(self, path: str | None, fh: int) -> None:
        return None

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._full(path))]

    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self._full(path))
        keys = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree")
        out = {k: int(getattr(sv, k)) for k in keys}
        out.update(f_favail=sv.f_favail, f_flag=sv.f_flag, f_namemax=sv.f_namemax)
        return out

    def mknod(self, path: str, mode: int, dev: int) -> None:
        full = self._full(path)
        os.mknod(full, mode, dev)
        self.model.register_new(os.lstat(full))

    def mkdir(self, path: str, mode: int) -> None:
        full = self._full(path)
        os.mkdir(full, mode)
        self.model.register_new(os.lstat(full))

    def symlink(self, target: str, source: str) -> None:
        # fusepy: ``target`` is the new link's path, ``source`` its contents.
        full = self._full(target)
        os.symlink(source, full)
        self.model.register_new(os.lstat(full), source)

    def link(self, target: str, source: str) -> None:
        # fusepy: ``target`` is the new name, ``source`` the existing file.
        os.link(self._full(source), self._full(target))

    def unlink(self, path: str) -> None:
        os.unlink(self._full(path))

    def rmdir(self, path: str) -> None:
        os.rmdir(self._full(path))

    def rename(self, old: str, new: str) -> None:
        os.rename(self._full(old), self._full(new))

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._full(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._full(path), uid, gid, follow_symlinks=False)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        full = self._full(path)
        if times is None:
            os.utime(full, follow_symlinks=False)
        else:
            os.utime(full, ns=times, follow_symlinks=False)

    def truncate(self, path: str | None, length: int, fh: Any = None) -> None:
        if fh:
            os.ftruncate(fh.fh, length)
            st = os.fstat(fh.fh)
        else:
            full = self._full(path or "/")
            os.truncate(full, length)
            st = os.lstat(full)
        self.model.mark_truncated(st, length)

    @staticmethod
    def _backing_flags(flags: int) -> int:
        return flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | getattr(os, "O_DIRECT", 0))

    def _opened(self, fi: Any, fd: int, flags: int) -> int:
        fi.fh = fd
        if flags & os.O_APPEND:
            self.append_fds.add(fd)
        return 0

    def open(self, path: str, fi: Any) -> int:
        flags = self._backing_flags(fi.flags)
        fd = os.open(self._full(path), flags)
        st = os.fstat(fd)
        self.model.node_of(st)
        if flags & os.O_TRUNC:
            self.model.mark_truncated(st, 0)
        return self._opened(fi, fd, flags)

    def create(self, path: str, mode: int, fi: Any) -> int:
        full = self._full(path)
        flags = self._backing_flags(fi.flags)
        try:
            fd = os.open(full, flags | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            if fi.flags & os.O_EXCL:
                raise
            fd = os.open(full, flags)  # lost a race with another creator: an existing file
            st = os.fstat(fd)
            self.model.node_of(st)
            if flags & os.O_TRUNC:
                self.model.mark_truncated(st, 0)
        else:
            self.model.register_new(os.fstat(fd))
        return self._opened(fi, fd, flags)

    def read(self, path: str | None, size: int, offset: int, fh: Any) -> bytes:
        return os.pread(fh.fh, size, offset)

    def write(self, path: str | None, data: bytes, offset: int, fh: Any) -> int:
        fd = fh.fh
        if fd in self.append_fds:
            n = os.write(fd, data)
            st = os.fstat(fd)
            self.model.mark_dirty(st, st.st_size - n, st.st_size)
        else:
            n = os.pwrite(fd, data, offset)
            self.model.mark_dirty(os.fstat(fd), offset, offset + n)
        return n

    def flush(self, path: str | None, fh: Any) -> None:
        return None

    def release(self, path: str | None, fh: Any) -> None:
        self.append_fds.discard(fh.fh)
        os.close(fh.fh)

    def fsync(self, path: str | None, datasync: int, fh: Any) -> None:
        self.model.sync_file(fh.fh, self.sync_count + 1)
        self._sync_event("fdatasync" if datasync else "fsync", path)

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> None:
        if path is not None:  # None: the directory was removed; nothing left to commit
            self.model.sync_dir(path, self.sync_count + 1)
        self._sync_event("fsyncdir", path)


def _serve_commands(ops: PowerLossOps) -> None:
    buf = b""
    while True:
        try:
            chunk = ops.ctl.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:
            os._exit(3)  # the parent is gone: go down with it (the mount dies with us)
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                reply = ops.command(json.loads(line))
            except Exception as exc:
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            ops.send(reply)


def serve(config: dict[str, Any]) -> None:
    """Entry point of the file system process: mount and serve until unmounted or killed."""
    import fuse  # only here: the parent must be importable without libfuse

    class _Operations(fuse.fuse_operations):  # type: ignore[misc]
        """Sets flag_nullpath_ok so unlinked-but-open files keep working with hard_remove."""

        def __init__(self) -> None:
            super().__init__()
            self.flag_nullpath_ok = 1

    fuse.fuse_operations = _Operations
    ctl = socket.socket(fileno=int(config["ctl_fd"]))
    ops = PowerLossOps(
        config["backing"],
        config["state"],
        config.get("snapshot_dir"),
        int(config.get("snapshot_every") or 1),
        ctl,
    )
    threading.Thread(target=_serve_commands, args=(ops,), daemon=True).start()
    fuse.FUSE(
        ops,
        config["mountpoint"],
        raw_fi=True,
        foreground=True,
        nothreads=False,
        hard_remove=True,
        use_ino=True,
        big_writes=True,
        max_write=131072,
        fsname="powerloss",
        subtype=FUSE_SUBTYPE,
    )


# --------------------------------------------------------------------------------------------
# The parent side: the API tests use
# --------------------------------------------------------------------------------------------


def fuse_unavailable_reason() -> str | None:
    """Why a PowerLossMount cannot run here, or None when it can (root, /dev/fuse, libfuse 2,
    fusepy)."""
    import ctypes.util
    import importlib.util

    if os.geteuid() != 0:
        return "power-loss FUSE mounts need root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (no FUSE in this kernel/container)"
    if ctypes.util.find_library("fuse") is None:
        return "libfuse 2 is not installed (Debian: apt-get install libfuse2)"
    if importlib.util.find_spec("fuse") is None:
        return "fusepy is not installed"
    return None


def _unescape_mount_path(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a mount point in /proc/self/mountinfo.

    Unlike ``os.path.ismount`` this also sees a FUSE mount whose daemon died (stat gives
    ENOTCONN there)."""
    target = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            if len(fields) > 4 and _unescape_mount_path(fields[4]) == target:
                return True
    return False


def _unmount(path: str, lazy: bool) -> bool:
    """Unmount ``path`` (every mount stacked there) if mounted; True when nothing is left."""
    for _ in range(4):
        if not is_mounted(path):
            return True
        args = ["umount", "-l", path] if lazy else ["umount", path]
        res = subprocess.run(args, capture_output=True, check=False)
        if res.returncode != 0 and is_mounted(path):
            for tool in ("fusermount3", "fusermount"):
                if shutil.which(tool):
                    opts = "-uz" if lazy else "-u"
                    subprocess.run([tool, opts, path], capture_output=True, check=False)
                    break
            if not lazy:
                break
    return not is_mounted(path)


@dataclass(frozen=True)
class SyncEvent:
    """Sync event ``k`` (0 is the mount): its operation, the path inside the mount (None when
    unknown, e.g. an unlinked file), and its automatic snapshot directory if one was written."""

    k: int
    op: str  # "mount" (k == 0), "fsync", "fdatasync" or "fsyncdir"
    path: str | None
    snapshot: Path | None


class PowerLossMount:
    """A power-loss file system mounted at ``mountpoint`` over ``backing_dir``.

    Use as a context manager::

        with PowerLossMount(backing, snapshot_dir=snaps) as m:
            ...  # do file I/O under m.mountpoint
            snap = m.power_cut(dest)  # dest now holds only the durable state

    Guarantees: after ``__enter__`` the mount is live; every sync event is reflected in the
    durable state before the fsync call returns to the application; ``snapshot()`` and
    ``power_cut()`` return a directory holding exactly the durable state at that instant;
    ``__exit__`` always leaves nothing mounted and no process running (a clean unmount when the
    power was not cut, else a lazy one), and removes the private state directory and the
    mountpoint when this object created it. ``backing_dir`` is left as the live state had it.
    """

    def __init__(
        self,
        backing_dir: str | os.PathLike[str],
        mountpoint: str | os.PathLike[str] | None = None,
        *,
        snapshot_dir: str | os.PathLike[str] | None = None,
        snapshot_every: int = 1,
        start_timeout: float = 20.0,
        command_timeout: float = 300.0,
    ) -> None:
        self.backing_dir = Path(backing_dir).resolve()
        self._own_mountpoint = mountpoint is None
        self._mountpoint_arg = mountpoint
        self.mountpoint = Path(mountpoint) if mountpoint is not None else Path()
        self.snapshot_dir = Path(snapshot_dir).resolve() if snapshot_dir is not None else None
        if snapshot_every < 1:
            raise ValueError("snapshot_every must be >= 1")
        self.snapshot_every = snapshot_every
        self.start_timeout = start_timeout
        self.command_timeout = command_timeout
        self.state_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._buf = b""
        self._cut = False

    # -- lifetime ---------------------------------------------------------------------------

    def __enter__(self) -> PowerLossMount:
        reason = fuse_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"cannot mount a power-loss file system: {reason}")
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self) -> None:
        self.state_dir = make_test_dir("plfs-state")
        if self._own_mountpoint:
            self.mountpoint = make_test_dir("plfs-mnt")
        else:
            self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.mountpoint = self.mountpoint.resolve()
        if self.snapshot_dir is not None:
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        parent_sock, child_sock = socket.socketpair()
        self._sock = parent_sock
        config = {
            "backing": str(self.backing_dir),
            "mountpoint": str(self.mountpoint),
            "state": str(self.state_dir),
            "snapshot_dir": str(self.snapshot_dir) if self.snapshot_dir is not None else None,
            "snapshot_every": self.snapshot_every,
            "ctl_fd": child_sock.fileno(),
        }
        with open(self.state_dir / "fs.log", "wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "serve", json.dumps(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(child_sock.fileno(),),
                start_new_session=True,
            )
        child_sock.close()
        msg = self._read_message(self.start_timeout, "mount")
        if msg.get("event") != "ready":
            raise RuntimeError(f"power-loss file system: unexpected first message {msg!r}")
        deadline = time.monotonic() + self.start_timeout
        while not is_mounted(self.mountpoint):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.mountpoint} did not become a mount point{self._log()}")
            time.sleep(0.01)

    def close(self) -> None:
        """Unmount and stop; idempotent. Cleanly if possible, else lazily and with SIGKILL."""
        mp = str(self.mountpoint) if self.mountpoint != Path() else None
        proc = self._proc
        if mp is not None and proc is not None:
            # a clean unmount ends the FUSE loop; it fails (EBUSY) while files are still open
            if not self._cut and proc.poll() is None and _unmount(mp, lazy=False):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            _unmount(mp, lazy=True)
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if mp is not None:
            _unmount(mp, lazy=True)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.state_dir = None
        if self._own_mountpoint and mp is not None and not is_mounted(mp):
            with contextlib.suppress(OSError):
                os.rmdir(mp)

    # -- commands ---------------------------------------------------------------------------

    def _log(self) -> str:
        if self.state_dir is None:
            return ""
        try:
            text = (self.state_dir / "fs.log").read_text(errors="replace")
        except OSError:
            return ""
        return f"\n--- file system log ---\n{text[-4000:]}" if text else ""

    def _read_message(self, timeout: float, what: str) -> dict[str, Any]:
        assert self._sock is not None and self._proc is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"power-loss file system: no answer to {what}{self._log()}")
            self._sock.settimeout(min(remaining, 0.2))
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                if self._proc.poll() is not None:
                    raise RuntimeError(
                        f"power-loss file system exited ({self._proc.returncode}) "
                        f"during {what}{self._log()}"
                    ) from None
                continue
            if not chunk:
                self._proc.wait(timeout=5)
                raise RuntimeError(
                    f"power-loss file system exited ({self._proc.returncode}) "
                    f"during {what}{self._log()}"
                )
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def _command(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self._sock is None or self._proc is None or self._cut:
            raise RuntimeError("power-loss file system is not running")
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        reply = self._read_message(self.command_timeout, str(msg.get("cmd")))
        if not reply.get("ok"):
            raise RuntimeError(f"power-loss file system: {reply.get('error')}{self._log()}")
        return reply

    def sync_count(self) -> int:
        """Number of sync events (fsync + fdatasync + fsyncdir) so far."""
        return int(self._command({"cmd": "stats"})["sync_count"])

    def sync_counts(self) -> dict[str, int]:
        """Sync events so far, per operation: ``{"fsync": .., "fdatasync": .., "fsyncdir": ..}``."""
        counts: dict[str, int] = self._command({"cmd": "stats"})["counts"]
        return counts

    def snapshot(self, dest: str | os.PathLike[str]) -> Path:
        """Write the durable state as of now into ``dest`` (created; must be new or empty), without
        stopping the file system. Atomic with respect to sync events."""
        target = Path(dest).resolve()
        self._command({"cmd": "snapshot", "dest": str(target)})
        return target

    def set_snapshot_every(self, snapshot_dir: str | os.PathLike[str], every: int = 1) -> None:
        """From now on write ``snapshot_dir/<k:06d>`` after every ``every``-th sync event."""
        target = Path(snapshot_dir).resolve()
        target.mkdir(parents=True, exist_ok=True)
        self.snapshot_dir = target
        self._command({"cmd": "snapshot_every", "dir": str(target), "every": every})

    def power_cut(
        self,
        dest: str | os.PathLike[str] | None = None,
        *,
        history_dir: str | os.PathLike[str] | None = None,
    ) -> Path:
        """Cut the power: freeze (later operations fail with EIO), write the durable state into
        ``dest`` (default: a new ``/tmp/mh-test-<pid>-plfs-cut-*``), SIGKILL the file system
        process and detach the mount lazily. Returns the snapshot directory.

        With ``history_dir`` (new or empty), the history of the whole run is moved there too:
        ``History(history_dir)`` materializes the state after any sync event 0..N."""
        target = Path(dest).resolve() if dest is not None else make_test_dir("plfs-cut")
        self._command({"cmd": "cut", "dest": str(target)})
        self._cut = True
        assert self._proc is not None and self.state_dir is not None
        os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        _unmount(str(self.mountpoint), lazy=True)
        if history_dir is not None:
            hist = Path(history_dir)
            hist.mkdir(parents=True, exist_ok=True)
            for entry in (self.state_dir / "journal").iterdir():
                shutil.move(str(entry), str(hist / entry.name))
        return target

    def save_history(self, dest: str | os.PathLike[str]) -> History:
        """Copy the history so far into ``dest`` (new or empty) without stopping; see History."""
        target = Path(dest).resolve()
        self._command({"cmd": "history", "dest": str(target)})
        return History(target)

    def sync_events(self) -> list[SyncEvent]:
        """The automatic snapshots written so far (from ``snapshot_dir/index.jsonl``), in order."""
        if self.snapshot_dir is None:
            return []
        return read_sync_events(self.snapshot_dir)


def read_sync_events(snapshot_dir: str | os.PathLike[str]) -> list[SyncEvent]:
    """Parse ``snapshot_dir/index.jsonl`` written by a PowerLossMount with ``snapshot_dir``."""
    root = Path(snapshot_dir)
    index = root / "index.jsonl"
    if not index.exists():
        return []
    events = []
    for line in index.read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            k = int(d["k"])
            events.append(SyncEvent(k, str(d["op"]), d["path"], root / f"{k:06d}"))
    return events


def iter_tree(root: str | os.PathLike[str]) -> Iterator[tuple[str, bytes | None]]:
    """Yield ``(relative path, file bytes or None for a directory)`` for a snapshot, sorted;
    handy for comparing snapshots in tests. Symlinks yield ``b"-> target"``."""
    base = Path(root)
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, base)
        if rel_dir != ".":
            yield rel_dir, None
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(Path(dirpath, d))]):
            p = Path(dirpath, name)
            rel = os.path.relpath(p, base)
            if p.is_symlink():
                yield rel, b"-> " + os.readlink(p).encode()
            elif p.is_file():
                yield rel, p.read_bytes()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "serve":
        sys.exit(f"usage: {sys.argv[0]} serve CONFIG_JSON (started by PowerLossMount)")
    serve(json.loads(sys.argv[2]))
