"""An in-process model of a volatile write cache, as a `mailharbor.store.fsio.FileSystem`.

Theory of operation
-------------------
`CacheModelFS(root)` serves every operation of the `FileSystem` protocol under the directory
`root` by delegating the real I/O to the OS, so the store reads and writes ordinary files and
works normally (the *live* state: what the page cache shows). Alongside, it keeps in memory the
**durable** state that a power cut would leave, following exactly the crash model of `fsio`:

* a file's durable content is its bytes as of its last `sync()` (or `truncate`, which fsyncs);
  before the first one it is empty. Appends and `O_TRUNC` are live only.
* a directory's durable entries (name -> inode) are its entries as of its last `sync_dir`.
  Creating a file or directory, `replace` and `unlink` change only the live entries, so until
  the directory is synced a new file is absent after a crash, a rename is undone (the old name
  keeps the old inode) and an unlinked file comes back with its durable content. A rename across
  directories is committed per directory.
* `write_atomic` is built from the same primitives (temporary file, write, fsync, rename, fsync
  of the directory), so each of its steps is a crash point like any other.
* whatever exists under `root` when the model is created is taken as durable.

Files are tracked as inodes (identity, not name), live content mirrored in memory, so a snapshot
needs no I/O: `capture()` returns an immutable `DurableImage` (durable byte strings are shared,
never copied) that can be materialized later with `materialize(dest)`. `snapshot(dest)` is the
two in one. `capture_torn(rng)` / `snapshot_torn(dest, rng)` model a power cut *between* fsyncs
while a write was under way: the durable state plus a random prefix of the unsynced tail of one
random file (one whose live content extends its durable content and whose name is durable),
optionally followed by zeros (the size reached the disk, the data did not) or garbage.
`capture_with(names=..., written=...)` builds a chosen such state: some directory entries and
some files' first bytes reached the disk besides what was fsynced (a journal commit, writeback).

`sync_delay` (a callable returning seconds) makes fsyncs slow, so that concurrent writers (the
store's event loop while its worker thread fsyncs) really interleave: a slow file fsync makes
durable what was written when it was called; a slow directory fsync also what was created while
it ran (names whose content is not durable yet).

Hooks: `on_sync` callbacks run after every fsync, dir fsync and truncate (the only moments the
durable state changes), `on_write` callbacks after every write; both run with the model's lock
held (a re-entrant lock), so a callback that calls `capture()` sees exactly the state right
after that operation even when the store fsyncs from a worker thread. `fsync_count` counts the
durability events.

`FaultyFS(inner, rule)` wraps any `FileSystem` and raises the `OSError` a rule returns for an
operation (EIO from `sync`, ENOSPC from `write` after writing part of the data, ...), logging
every call, so a test can check e.g. that nothing is fsynced again after a failed fsync.

Not modelled: metadata other than names and bytes (modes, times); hard links (the protocol has
none); reordering of unsynced writes inside a file beyond "a prefix reached the disk".
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mailharbor.store.fsio import FileSystem, OsFileSystem, ReadableFile, WritableFile

#: Reads go to the real files: what a process reads is what it wrote, synced or not (the page
#: cache); only what survives a crash is the model's business.
_READS = OsFileSystem()

__all__ = [
    "CacheModelFS",
    "DurableImage",
    "Fault",
    "FaultyFS",
    "TornWrite",
]

SyncHook = Callable[[str, str], None]
"""`hook(event, path)`; event is "fsync", "fsync_dir" or "truncate"."""

WriteHook = Callable[[str, int], None]
"""`hook(path, nbytes)` after a write."""

Tree = dict[str, "bytes | Tree"]


class _Inode:
    __slots__ = ("durable", "durable_entries", "entries", "ino", "is_dir", "live")

    def __init__(self, ino: int, is_dir: bool) -> None:
        self.ino = ino
        self.is_dir = is_dir
        self.live = bytearray()  # files: what the page cache holds
        self.durable = b""  # files: content as of the last fsync
        self.entries: dict[str, _Inode] = {}  # directories: live entries
        self.durable_entries: dict[str, _Inode] = {}  # directories: as of the last fsync


@dataclass(frozen=True, slots=True)
class TornWrite:
    """What `capture_torn` did to one file: kept `kept` bytes of its unsynced tail after the
    `durable_len` durable bytes, then `extra` bytes of zeros or garbage (`mode`)."""

    path: str  # relative to the model's root
    durable_len: int
    live_len: int
    kept: int
    mode: str  # "prefix", "zeros" or "garbage"
    extra: int
    live: bytes = field(default=b"", repr=False)  # the file's live content when captured

    def describe(self) -> str:
        return (
            f"torn write on {self.path}: durable {self.durable_len} B, live {self.live_len} B, "
            f"kept {self.kept} B of the tail + {self.extra} B {self.mode}"
        )


@dataclass(frozen=True, slots=True)
class DurableImage:
    """The durable state at one instant (what a power cut then leaves), rooted at the model's
    root. `seq` is the model's `fsync_count` when captured; `event`/`path` name the operation."""

    tree: Tree
    seq: int
    event: str
    path: str
    torn: TornWrite | None = None
    tag: dict[str, object] = field(default_factory=dict)

    def materialize(self, dest: str) -> str:
        """Write the image as a directory tree at `dest` (created; must be new or empty)."""
        os.makedirs(dest, exist_ok=True)
        if os.listdir(dest):
            raise FileExistsError(errno.EEXIST, "snapshot destination is not empty", dest)
        _write_tree(dest, self.tree)
        return dest

    def files(self) -> dict[str, bytes]:
        """Every file of the image by relative path (for assertions)."""
        out: dict[str, bytes] = {}

        def walk(t: Tree, prefix: str) -> None:
            for name, v in t.items():
                p = f"{prefix}{name}"
                if isinstance(v, bytes):
                    out[p] = v
                else:
                    walk(v, p + "/")

        walk(self.tree, "")
        return out


def _write_tree(dest: str, tree: Tree) -> None:
    for name, v in sorted(tree.items()):
        p = os.path.join(dest, name)
        if isinstance(v, bytes):
            with open(p, "wb") as f:
                f.write(v)
        else:
            os.mkdir(p, 0o700)
            _write_tree(p, v)


class _ModelWritable:
    """An append handle: real appends to the OS file, mirrored into the inode's live bytes."""

    __slots__ = ("_fd", "_fs", "_inode", "_path")

    def __init__(self, fs: CacheModelFS, inode: _Inode, path: str, fd: int) -> None:
        self._fs = fs
        self._inode = inode
        self._path = path
        self._fd = fd

    @property
    def path(self) -> str:
        return self._path

    def write(self, data: bytes) -> None:
        self._fs._write(self._inode, self._path, self._fd, data)

    def writev(self, chunks: Sequence[bytes]) -> None:
        self.write(b"".join(chunks))

    def size(self) -> int:
        with self._fs._lock:
            return len(self._inode.live)

    def sync(self) -> None:
        if self._fd < 0:
            raise OSError(errno.EBADF, "sync of a closed file", self._path)
        self._fs._sync_file(self._inode, self._path)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class CacheModelFS:
    """See the module docstring. Thread-safe (one re-entrant lock around the model)."""

    def __init__(self, root: str, *, sync_delay: Callable[[], float] | None = None) -> None:
        self.root = os.path.abspath(root)
        self.sync_delay = sync_delay
        self._lock = threading.RLock()
        self._next_ino = 1
        self.fsync_count = 0
        self.on_sync: list[SyncHook] = []
        self.on_write: list[WriteHook] = []
        self._root = self._scan(self.root)

    # -- inodes and paths ----------------------------------------------------------------------

    def _new_inode(self, is_dir: bool) -> _Inode:
        n = _Inode(self._next_ino, is_dir)
        self._next_ino += 1
        return n

    def _scan(self, path: str) -> _Inode:
        """Adopt what exists on disk as durable."""
        if os.path.isdir(path):
            d = self._new_inode(True)
            for name in sorted(os.listdir(path)):
                child = self._scan(os.path.join(path, name))
                d.entries[name] = child
            d.durable_entries = dict(d.entries)
            return d
        f = self._new_inode(False)
        with open(path, "rb") as fh:
            data = fh.read()
        f.live = bytearray(data)
        f.durable = data
        return f

    def _rel(self, path: str) -> list[str]:
        p = os.path.abspath(path)
        if p == self.root:
            return []
        if not p.startswith(self.root + os.sep):
            raise ValueError(f"{path} is outside the modelled directory {self.root}")
        return p[len(self.root) + 1 :].split(os.sep)

    def _lookup(self, path: str) -> _Inode | None:
        node = self._root
        for part in self._rel(path):
            if not node.is_dir:
                return None
            nxt = node.entries.get(part)
            if nxt is None:
                return None
            node = nxt
        return node

    def _parent(self, path: str) -> tuple[_Inode, str]:
        parts = self._rel(path)
        if not parts:
            raise ValueError("the modelled root has no parent here")
        d = self._lookup(os.path.dirname(os.path.abspath(path)))
        if d is None or not d.is_dir:
            raise FileNotFoundError(errno.ENOENT, "no such directory", os.path.dirname(path))
        return d, parts[-1]

    def _adopt(self, path: str) -> _Inode | None:
        """The inode at `path`; a file that appeared behind the model's back (not through it)
        is adopted as live-only (never synced, name not durable)."""
        node = self._lookup(path)
        if node is None and os.path.lexists(path):
            parent, name = self._parent(path)
            node = self._new_inode(os.path.isdir(path))
            if not node.is_dir:
                with open(path, "rb") as fh:
                    node.live = bytearray(fh.read())
            parent.entries[name] = node
        return node

    def _fire_sync(self, event: str, path: str) -> None:
        self.fsync_count += 1
        for cb in list(self.on_sync):
            cb(event, path)

    # -- FileSystem ----------------------------------------------------------------------------

    def open_append(self, path: str) -> WritableFile:
        return self._open(path, truncate=False)

    def _open(self, path: str, *, truncate: bool) -> _ModelWritable:
        with self._lock:
            node = self._adopt(path)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            if truncate:
                flags |= os.O_TRUNC
            fd = os.open(path, flags, 0o600)
            if node is None:
                parent, name = self._parent(path)
                node = self._new_inode(False)
                parent.entries[name] = node
            if node.is_dir:
                os.close(fd)
                raise IsADirectoryError(errno.EISDIR, "is a directory", path)
            if truncate:
                node.live = bytearray()
            return _ModelWritable(self, node, path, fd)

    def _write(self, node: _Inode, path: str, fd: int, data: bytes) -> None:
        with self._lock:
            if fd < 0:
                raise OSError(errno.EBADF, "write to a closed file", path)
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                node.live += view[:n]
                view = view[n:]
            for cb in list(self.on_write):
                cb(path, len(data))

    def _sync_file(self, node: _Inode, path: str) -> None:
        delay = self.sync_delay() if self.sync_delay is not None else 0.0
        if delay <= 0:
            with self._lock:
                node.durable = bytes(node.live)
                self._fire_sync("fsync", path)
            return
        # A slow fsync: it covers what was written when it was called, not what other threads
        # write while it runs.
        with self._lock:
            covered = bytes(node.live)
        time.sleep(delay)
        with self._lock:
            if len(covered) >= len(node.durable) or not node.durable.startswith(covered):
                node.durable = covered
            self._fire_sync("fsync", path)

    def open_read(self, path: str) -> ReadableFile:
        return _READS.open_read(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def makedirs(self, path: str) -> None:
        with self._lock:
            parts = self._rel(path)
            node = self._root
            cur = self.root
            for part in parts:
                cur = os.path.join(cur, part)
                nxt = node.entries.get(part)
                if nxt is None:
                    if os.path.isdir(cur):
                        nxt = self._adopt(cur)
                    else:
                        os.mkdir(cur, 0o700)
                        nxt = self._new_inode(True)
                        node.entries[part] = nxt
                assert nxt is not None
                if not nxt.is_dir:
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory", cur)
                node = nxt

    def unlink(self, path: str) -> None:
        with self._lock:
            self._adopt(path)
            parent, name = self._parent(path)
            os.unlink(path)
            parent.entries.pop(name, None)

    def truncate(self, path: str, size: int) -> None:
        with self._lock:
            node = self._adopt(path)
            if node is None or node.is_dir:
                raise FileNotFoundError(errno.ENOENT, "no such file", path)
            os.truncate(path, size)
            if size <= len(node.live):
                del node.live[size:]
            else:
                node.live += bytes(size - len(node.live))
            node.durable = bytes(node.live)
            self._fire_sync("truncate", path)

    def replace(self, src: str, dst: str) -> None:
        with self._lock:
            self._adopt(src)
            self._adopt(dst)
            sp, sname = self._parent(src)
            dp, dname = self._parent(dst)
            os.replace(src, dst)
            node = sp.entries.pop(sname)
            dp.entries[dname] = node

    def sync_dir(self, path: str) -> None:
        with self._lock:
            node = self._adopt(path)
            if node is None or not node.is_dir:
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
        delay = self.sync_delay() if self.sync_delay is not None else 0.0
        if delay > 0:
            # A slow directory fsync: names created while it runs become durable too (their
            # content need not be), the adversarial reading for recovery.
            time.sleep(delay)
        with self._lock:
            node.durable_entries = dict(node.entries)
            self._fire_sync("fsync_dir", path)

    def write_atomic(self, path: str, data: bytes) -> None:
        tmp = f"{path}.tmp-{os.getpid()}"
        f = self._open(tmp, truncate=True)
        try:
            f.write(data)
            f.sync()
        finally:
            f.close()
        self.replace(tmp, path)
        self.sync_dir(os.path.dirname(os.path.abspath(path)))

    # -- the durable state ---------------------------------------------------------------------

    def _durable_tree(self, d: _Inode, on_path: frozenset[int]) -> Tree:
        out: Tree = {}
        for name, node in d.durable_entries.items():
            if node.is_dir:
                if node.ino in on_path:
                    continue  # a cycle only per-directory rename commits can make
                out[name] = self._durable_tree(node, on_path | {node.ino})
            else:
                out[name] = node.durable
        return out

    def capture(self, event: str = "capture", path: str = "") -> DurableImage:
        """The durable state now (cheap: no I/O, durable bytes are shared)."""
        with self._lock:
            tree = self._durable_tree(self._root, frozenset({self._root.ino}))
            return DurableImage(tree, self.fsync_count, event, path)

    def _torn_candidates(self) -> list[tuple[list[str], _Inode]]:
        out: list[tuple[list[str], _Inode]] = []

        def walk(d: _Inode, prefix: list[str], on_path: frozenset[int]) -> None:
            for name, node in sorted(d.durable_entries.items()):
                if node.is_dir:
                    if node.ino not in on_path:
                        walk(node, [*prefix, name], on_path | {node.ino})
                elif len(node.live) > len(node.durable) and node.live.startswith(node.durable):
                    out.append(([*prefix, name], node))

        walk(self._root, [], frozenset({self._root.ino}))
        return out

    def capture_torn(self, rng: random.Random, event: str = "torn", path: str = "") -> DurableImage:
        """The durable state plus a torn write: a random prefix of the unsynced tail of one
        random file whose name is durable, then maybe zeros or garbage. If no file has an
        unsynced tail, the plain durable state (`torn` is None)."""
        with self._lock:
            img = self.capture(event, path)
            cands = self._torn_candidates()
            if not cands:
                return img
            parts, node = rng.choice(cands)
            dlen, llen = len(node.durable), len(node.live)
            tail_len = llen - dlen
            kept = rng.randint(0, tail_len)
            mode = rng.choice(("prefix", "prefix", "zeros", "garbage"))
            rest = tail_len - kept
            extra = 0 if mode == "prefix" else rng.randint(1, rest if rest > 0 else 4096)
            if mode == "zeros":
                junk = bytes(extra)
            elif mode == "garbage":
                junk = rng.randbytes(extra)
            else:
                junk = b""
            live = bytes(node.live)
            data = live[: dlen + kept] + junk
        tree = _replace_in_tree(img.tree, parts, data)
        torn = TornWrite("/".join(parts), dlen, llen, kept, mode, extra, live)
        return DurableImage(tree, img.seq, event, path, torn)

    def capture_with(
        self,
        *,
        names: tuple[str, ...] = (),
        written: dict[str, int] | None = None,
        event: str = "custom",
    ) -> DurableImage:
        """A power cut now, where besides what was fsynced the directory entries `names`
        (paths; e.g. committed by a journal commit or a concurrent directory fsync) and the
        first `written[path]` live bytes of some files (page writeback) reached the disk. Both
        are states the crash model allows."""
        with self._lock:
            saved: list[tuple[_Inode, dict[str, _Inode]]] = []
            try:
                for p in names:
                    parent, name = self._parent(p)
                    node = parent.entries.get(name)
                    if node is None:
                        raise FileNotFoundError(errno.ENOENT, "no such name", p)
                    saved.append((parent, dict(parent.durable_entries)))
                    parent.durable_entries[name] = node
                img = self.capture(event)
            finally:
                for parent, entries in reversed(saved):
                    parent.durable_entries = entries
            tree = img.tree
            for p, n in (written or {}).items():
                node = self._lookup(p)
                if node is None or node.is_dir:
                    raise FileNotFoundError(errno.ENOENT, "no such file", p)
                parts = self._rel(p)
                data = bytes(node.live[:n])
                if len(node.durable) > n and node.durable.startswith(data):
                    data = node.durable
                # A file whose name is not durable: the bytes are unreachable.
                with contextlib.suppress(KeyError):
                    tree = _replace_in_tree(tree, parts, data)
            return DurableImage(tree, img.seq, event, "")

    def snapshot(self, dest_dir: str) -> DurableImage:
        """Materialize the durable state now at `dest_dir` (what a power cut now leaves)."""
        img = self.capture("snapshot")
        img.materialize(dest_dir)
        return img

    def snapshot_torn(self, dest_dir: str, rng: random.Random) -> DurableImage:
        """Materialize the durable state plus a torn write (see `capture_torn`) at `dest_dir`;
        the image's `torn` says what was kept."""
        img = self.capture_torn(rng, "snapshot_torn")
        img.materialize(dest_dir)
        return img

    # -- introspection for tests ---------------------------------------------------------------

    def durable_bytes(self, path: str) -> bytes | None:
        """The durable content reachable at `path` through durable directory entries, or None
        if a power cut now would leave no file there."""
        with self._lock:
            node = self._root
            for part in self._rel(path):
                if not node.is_dir:
                    return None
                nxt = node.durable_entries.get(part)
                if nxt is None:
                    return None
                node = nxt
            return None if node.is_dir else node.durable

    def check_live(self) -> None:
        """Assert the mirrored live state equals the disk (nothing bypassed the model)."""
        with self._lock:

            def walk(d: _Inode, path: str) -> None:
                on_disk = set(os.listdir(path))
                for name, node in d.entries.items():
                    p = os.path.join(path, name)
                    if name not in on_disk:
                        raise AssertionError(f"model has {p}, the disk does not")
                    if node.is_dir:
                        walk(node, p)
                    else:
                        with open(p, "rb") as fh:
                            if fh.read() != node.live:
                                raise AssertionError(f"{p}: live content differs from the disk")

            walk(self._root, self.root)


def _replace_in_tree(tree: Tree, parts: list[str], data: bytes) -> Tree:
    """A copy of `tree` with the existing file at `parts` holding `data` (KeyError if absent)."""
    out = dict(tree)
    if len(parts) == 1:
        if not isinstance(out[parts[0]], bytes):
            raise KeyError(parts[0])
        out[parts[0]] = data
        return out
    sub = out[parts[0]]
    assert isinstance(sub, dict)
    out[parts[0]] = _replace_in_tree(sub, parts[1:], data)
    return out


# --- fault injection ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fault:
    """An error to raise. For `write`, `keep` bytes are written first (a short write)."""

    err: int = errno.EIO
    keep: int = 0

    def exc(self, path: str) -> OSError:
        return OSError(self.err, os.strerror(self.err), path)


FaultRule = Callable[[str, str], Fault | None]
"""`rule(op, path)` -> a Fault to inject, or None. ops: open_append, write, sync, sync_dir,
truncate, replace, unlink, write_atomic, makedirs."""


@dataclass(slots=True)
class _Call:
    op: str
    path: str
    failed: bool


class _FaultyWritable:
    __slots__ = ("_f", "_fs")

    def __init__(self, fs: FaultyFS, f: WritableFile) -> None:
        self._fs = fs
        self._f = f

    @property
    def path(self) -> str:
        return self._f.path

    def write(self, data: bytes) -> None:
        fault = self._fs._check("write", self._f.path)
        if fault is not None:
            if fault.keep:
                self._f.write(data[: fault.keep])
            raise fault.exc(self._f.path)
        self._f.write(data)

    def writev(self, chunks: Sequence[bytes]) -> None:
        self.write(b"".join(chunks))  # one write: a fault may keep part of it, as for write

    def size(self) -> int:
        return self._f.size()

    def sync(self) -> None:
        fault = self._fs._check("sync", self._f.path)
        if fault is not None:
            raise fault.exc(self._f.path)
        self._f.sync()

    def close(self) -> None:
        self._f.close()


class FaultyFS:
    """Wraps a `FileSystem`; `rule(op, path)` decides which calls fail (see `Fault`). Every call
    is logged in `calls` (op, path, failed) for assertions."""

    def __init__(self, inner: FileSystem, rule: FaultRule) -> None:
        self.inner = inner
        self.rule = rule
        self.calls: list[_Call] = []
        self._lock = threading.Lock()

    def _check(self, op: str, path: str) -> Fault | None:
        fault = self.rule(op, path)
        with self._lock:
            self.calls.append(_Call(op, path, fault is not None))
        return fault

    def _plain(self, op: str, path: str) -> None:
        fault = self._check(op, path)
        if fault is not None:
            raise fault.exc(path)

    def ops_after_first_failure(self, ops: tuple[str, ...] = ("sync", "sync_dir")) -> list[str]:
        """The `ops` calls made after the first injected failure, as "op path" strings."""
        with self._lock:
            calls = list(self.calls)
        for i, c in enumerate(calls):
            if c.failed:
                return [f"{x.op} {x.path}" for x in calls[i + 1 :] if x.op in ops]
        return []

    def retried(self) -> list[str]:
        """Calls of an operation on a path after that same operation failed on that path."""
        with self._lock:
            calls = list(self.calls)
        failed: set[tuple[str, str]] = set()
        out = []
        for c in calls:
            if (c.op, c.path) in failed:
                out.append(f"{c.op} {c.path}")
            if c.failed:
                failed.add((c.op, c.path))
        return out

    def failures(self) -> int:
        with self._lock:
            return sum(1 for c in self.calls if c.failed)

    def open_append(self, path: str) -> WritableFile:
        self._plain("open_append", path)
        return _FaultyWritable(self, self.inner.open_append(path))

    def open_read(self, path: str) -> ReadableFile:
        return self.inner.open_read(path)

    def listdir(self, path: str) -> list[str]:
        return self.inner.listdir(path)

    def exists(self, path: str) -> bool:
        return self.inner.exists(path)

    def makedirs(self, path: str) -> None:
        self._plain("makedirs", path)
        self.inner.makedirs(path)

    def unlink(self, path: str) -> None:
        self._plain("unlink", path)
        self.inner.unlink(path)

    def truncate(self, path: str, size: int) -> None:
        self._plain("truncate", path)
        self.inner.truncate(path, size)

    def replace(self, src: str, dst: str) -> None:
        self._plain("replace", dst)
        self.inner.replace(src, dst)

    def sync_dir(self, path: str) -> None:
        self._plain("sync_dir", path)
        self.inner.sync_dir(path)

    def write_atomic(self, path: str, data: bytes) -> None:
        """Built from the primitives (temp file, write, fsync, rename, directory fsync) so a rule
        can fail any step; the inner file system sees the same steps as its own would do."""
        self._plain("write_atomic", path)
        tmp = f"{path}.tmp-{os.getpid()}"
        if self.inner.exists(tmp):
            self.unlink(tmp)
        f = self.open_append(tmp)
        try:
            f.write(data)
            f.sync()
        finally:
            f.close()
        self.replace(tmp, path)
        self.sync_dir(os.path.dirname(os.path.abspath(path)))


if TYPE_CHECKING:  # static check that both implement the protocol
    _check_model: type[FileSystem] = CacheModelFS
    _check_faulty: type[FileSystem] = FaultyFS
