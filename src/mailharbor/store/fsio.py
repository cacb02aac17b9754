"""The one module that makes file changes durable.

Theory of operation
-------------------
Every durable file operation of mailharbor goes through a `FileSystem` object, and this module holds
the only calls to `os.fsync`, `os.replace` and directory fsync in the code base (a test enforces
it). That gives one place to reason about the crash model and one seam where tests substitute a
model of a volatile write cache (`tests/crashmodel.py`) or run under fault injection.

The crash model we program against (ext4/xfs with a volatile disk cache, as in SQLite's pager):

* bytes written to a file are durable only after an fsync of *that file*;
* a newly created file, a rename or an unlink is durable only after an fsync of the *directory*;
* after a failed fsync the state of the unsynced bytes is unknown, and a later fsync that
  "succeeds" proves nothing about them (the kernel may have dropped the dirty pages). So an
  `OSError` from `sync()` is fatal for the caller's file: the store goes to its ERROR state and
  never retries.

Nothing here retries or hides an error: every `OSError` propagates.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Protocol

_IOV_MAX = 1024  # os.writev takes at most this many buffers at once (Linux)


class WritableFile(Protocol):
    """An append-only file handle. `write` writes all bytes or raises; `writev` writes all the
    chunks, in order, as if joined (without joining them); `sync` is fsync."""

    @property
    def path(self) -> str: ...

    def write(self, data: bytes) -> None: ...

    def writev(self, chunks: Sequence[bytes]) -> None: ...

    def size(self) -> int: ...

    def sync(self) -> None: ...

    def close(self) -> None: ...


class ReadableFile(Protocol):
    """A file opened for positional reads."""

    def pread(self, length: int, offset: int) -> bytes: ...

    def size(self) -> int: ...

    def close(self) -> None: ...


class FileSystem(Protocol):
    """The operations the store needs, with the durability rules of the module docstring."""

    def open_append(self, path: str) -> WritableFile:
        """Open (creating if missing) `path` for appending at its end."""
        ...

    def open_read(self, path: str) -> ReadableFile: ...

    def listdir(self, path: str) -> list[str]: ...

    def exists(self, path: str) -> bool: ...

    def makedirs(self, path: str) -> None: ...

    def unlink(self, path: str) -> None:
        """Remove a file; durable after `sync_dir` of its directory."""
        ...

    def truncate(self, path: str, size: int) -> None:
        """Cut `path` to `size` bytes and fsync it before returning."""
        ...

    def replace(self, src: str, dst: str) -> None:
        """Atomically rename; durable after `sync_dir` of the directory."""
        ...

    def sync_dir(self, path: str) -> None: ...

    def write_atomic(self, path: str, data: bytes) -> None:
        """Replace `path` by `data` atomically and durably: write a temporary file, fsync it,
        rename it over `path`, fsync the directory. After a crash `path` holds either the old
        or the new content, never a mix."""
        ...


class _OsWritable:
    __slots__ = ("_fd", "_path", "_size")

    def __init__(self, path: str) -> None:
        self._path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._size = os.fstat(self._fd).st_size

    @property
    def path(self) -> str:
        return self._path

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            self._size += n
            view = view[n:]

    def writev(self, chunks: Sequence[bytes]) -> None:
        todo: list[bytes | memoryview] = [c for c in chunks if c]
        i = 0
        while i < len(todo):
            n = os.writev(self._fd, todo[i : i + _IOV_MAX])
            self._size += n
            while n:  # skip what was written; a chunk written in part goes on from there
                left = len(todo[i])
                if n >= left:
                    n -= left
                    i += 1
                else:
                    todo[i] = memoryview(todo[i])[n:]
                    n = 0

    def size(self) -> int:
        return self._size

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _OsReadable:
    __slots__ = ("_fd",)

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def pread(self, length: int, offset: int) -> bytes:
        chunks: list[bytes] = []
        while length > 0:
            b = os.pread(self._fd, length, offset)
            if not b:
                break
            chunks.append(b)
            length -= len(b)
            offset += len(b)
        return b"".join(chunks)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class OsFileSystem:
    """The real filesystem. `sync=False` turns every fsync into a no-op: only for tests and
    benchmarks that measure something else; it voids the durability promise."""

    def __init__(self, *, sync: bool = True) -> None:
        self.do_sync = sync

    def open_append(self, path: str) -> WritableFile:
        f = _OsWritable(path)
        if not self.do_sync:
            return _NoSyncWritable(f)
        return f

    def open_read(self, path: str) -> ReadableFile:
        return _OsReadable(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def truncate(self, path: str, size: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            if self.do_sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def sync_dir(self, path: str) -> None:
        if not self.do_sync:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_atomic(self, path: str, data: bytes) -> None:
        write_atomic(path, data, sync=self.do_sync)


class _NoSyncWritable:
    __slots__ = ("_f",)

    def __init__(self, f: _OsWritable) -> None:
        self._f = f

    @property
    def path(self) -> str:
        return self._f.path

    def write(self, data: bytes) -> None:
        self._f.write(data)

    def writev(self, chunks: Sequence[bytes]) -> None:
        self._f.writev(chunks)

    def size(self) -> int:
        return self._f.size()

    def sync(self) -> None:
        return None

    def close(self) -> None:
        self._f.close()


def write_atomic(path: str, data: bytes, *, mode: int = 0o600, sync: bool = True) -> None:
    """Replace `path` with `data` atomically and durably on the real filesystem; the file gets
    exactly `mode`.

    Writes a temporary file in the same directory (created with `mode`, so a secret is never
    readable by others), fsyncs it, renames it over `path` and fsyncs the directory. On error
    the temporary file is removed and `path` is untouched. Raises OSError."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if sync:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
