"""Faulty disks for tests: small file systems that fill up (ENOSPC) and fsync that fails (EIO).

- ``small_tmpfs(size)``: a tmpfs of ``size`` bytes (rounded up to whole pages by the kernel).
- ``loop_ext4(size)``: an ext4 file system in a loop-mounted image of ``size`` bytes, without
  reserved blocks, so root fills it too.
- ``run_with_fsync_eio(argv, path, after_n=N)``: run a command under ``strace`` so that the Nth
  and later ``fsync``/``fdatasync`` calls on ``path`` fail with EIO, and report how many were
  injected.

Names of everything that can outlive a killed run carry ``mh-test-<run pid>-`` (mount points,
the loop image), so tools/cleanup.sh can unmount/detach/remove them.

Each helper calls ``pytest.skip`` (with the reason) only when the facility is genuinely missing:
not root, no ``mount``/``strace`` binary, mounting or ptrace refused by the kernel (EPERM). With
``MH_FAULT_STRICT=1`` in the environment those become failures, for machines where they must run.
Any other error fails the test.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from .powerloss_fs import fuse_unavailable_reason, is_mounted, make_test_dir

__all__ = [
    "EioRun",
    "loop_ext4",
    "require_fuse",
    "require_root",
    "run_with_fsync_eio",
    "small_tmpfs",
    "strace_unavailable_reason",
    "unavailable",
]


def unavailable(reason: str) -> NoReturn:
    """Skip the current test because a facility is missing (fail instead under
    ``MH_FAULT_STRICT=1``)."""
    if os.environ.get("MH_FAULT_STRICT") == "1":
        pytest.fail(f"MH_FAULT_STRICT=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def require_root(what: str) -> None:
    """Skip (see ``unavailable``) unless running as root."""
    if os.geteuid() != 0:
        unavailable(f"{what} needs root")


def require_fuse() -> None:
    """Skip (see ``unavailable``) unless a PowerLossMount can run here."""
    reason = fuse_unavailable_reason()
    if reason is not None:
        unavailable(reason)


def _refused(stderr: str) -> bool:
    text = stderr.lower()
    return "permission denied" in text or "operation not permitted" in text


def _umount(path: Path) -> None:
    if is_mounted(path):
        res = subprocess.run(["umount", str(path)], capture_output=True, check=False)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@contextlib.contextmanager
def small_tmpfs(size_bytes: int) -> Iterator[Path]:
    """Mount a tmpfs of ``size_bytes`` (rounded up to pages) at a new
    ``/tmp/mh-test-<pid>-tmpfs-*`` directory and yield its path (mode 0755, empty).

    Writes beyond the size fail with ENOSPC. Always unmounted (lazily if busy) and removed on
    exit."""
    require_root("mounting a tmpfs")
    if shutil.which("mount") is None:
        unavailable("mount(8) is not installed")
    mnt = make_test_dir("tmpfs")
    try:
        res = subprocess.run(
            [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                f"size={int(size_bytes)},mode=0755",
                "mh-test",
                str(mnt),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            if _refused(res.stderr):
                unavailable(f"mounting a tmpfs is refused here: {res.stderr.strip()}")
            raise RuntimeError(f"mount tmpfs failed: {res.stderr.strip()}")
        yield mnt
    finally:
        _umount(mnt)
        with contextlib.suppress(OSError):
            mnt.rmdir()


@contextlib.contextmanager
def loop_ext4(size_bytes: int) -> Iterator[Path]:
    """Create an ext4 image of ``size_bytes`` (at least 1 MiB) with no reserved blocks, attach it to
    a loop device and mount it; yield the (empty but for ``lost+found``) mount point.

    The image and mount point live in a new ``/tmp/mh-test-<pid>-ext4-*`` directory. Always
    unmounted (lazily if busy), detached and removed on exit."""
    require_root("a loop-mounted ext4")
    for tool in ("mkfs.ext4", "losetup", "mount"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed (Debian: e2fsprogs, util-linux, mount)")
    if size_bytes < 1 << 20:
        raise ValueError("loop_ext4 needs at least 1 MiB")
    work = make_test_dir("ext4")
    image = work / "disk.img"
    mnt = work / "mnt"
    mnt.mkdir()
    dev = ""
    try:
        with open(image, "wb") as f:
            f.truncate(int(size_bytes))
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-m", "0", "-L", "mh-test", str(image)],
            capture_output=True,
            text=True,
            check=True,
        )
        res = subprocess.run(
            ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=False
        )
        if res.returncode != 0:
            if _refused(res.stderr) or "no such file" in res.stderr.lower():
                unavailable(f"loop devices are unavailable here: {res.stderr.strip()}")
            raise RuntimeError(f"losetup failed: {res.stderr.strip()}")
        dev = res.stdout.strip()
        res = subprocess.run(
            ["mount", "-t", "ext4", dev, str(mnt)], capture_output=True, text=True, check=False
        )
        if res.returncode != 0:
            if _refused(res.stderr):
                unavailable(f"mounting ext4 is refused here: {res.stderr.strip()}")
            raise RuntimeError(f"mount ext4 failed: {res.stderr.strip()}")
        yield mnt
    finally:
        _umount(mnt)
        if dev:
            subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)


_strace_reason: str | None = None
_strace_probed = False


def strace_unavailable_reason() -> str | None:
    """Why strace fault injection cannot run here, or None (probed once per process)."""
    global _strace_reason, _strace_probed
    if not _strace_probed:
        _strace_probed = True
        if shutil.which("strace") is None:
            _strace_reason = "strace is not installed (Debian: apt-get install strace)"
        else:
            res = subprocess.run(
                ["strace", "-qq", "-o", "/dev/null", "-e", "inject=fsync:error=EIO", "true"],
                capture_output=True,
                text=True,
                check=False,
            )
            if res.returncode != 0:
                _strace_reason = f"strace cannot trace here: {res.stderr.strip()}"
    return _strace_reason


@dataclass(frozen=True)
class EioRun:
    """The outcome of ``run_with_fsync_eio``."""

    returncode: int
    stdout: str
    stderr: str
    injected: int  # fsync/fdatasync calls on the path that strace made fail with EIO
    calls: int  # all fsync/fdatasync calls on the path that strace saw
    strace_log: str


def run_with_fsync_eio(
    argv: Sequence[str],
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    after_n: int = 1,
    *,
    syscalls: Sequence[str] = ("fsync", "fdatasync"),
    timeout: float = 60.0,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
) -> EioRun:
    """Run ``argv`` (and its children, ``-f``) under
    ``strace -e inject=fsync,fdatasync:error=EIO:when=N+ -P PATH``.

    Guarantee: the ``after_n``-th and every later call of each syscall in ``syscalls`` on ``path``
    fails with EIO (the file system is not touched: the syscall is not executed at all). strace
    counts **per syscall and per thread** (each thread/process is a separate tracee: its fsync
    and fdatasync counters start at 1 separately); ``after_n=1`` fails every call. Calls on other
    files are neither failed nor counted. ``path`` (one or several) is matched by its absolute
    name as the kernel reports it for the fd (``/proc/PID/fd``), so a file renamed after opening
    no longer matches, and a path under a symlink must be given resolved (this helper resolves
    it). The file need not exist yet when the command starts.

    Returns the exit status, output and the counts read from strace's log (``injected`` > 0
    proves the injection happened). Raises ``subprocess.TimeoutExpired`` after ``timeout``.
    """
    reason = strace_unavailable_reason()
    if reason is not None:
        unavailable(reason)
    if not 1 <= after_n <= 65535:
        raise ValueError("after_n must be within 1..65535 (strace's limit)")
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        raise ValueError("need at least one path")
    names = ",".join(syscalls)
    work = make_test_dir("strace")
    log = work / "strace.log"
    cmd = ["strace", "-f", "-qq", "-o", str(log), "-e", f"trace={names}"]
    cmd += ["-e", f"inject={names}:error=EIO:when={after_n}+"]
    for p in paths:
        cmd += ["-P", os.path.realpath(p)]
    cmd += ["--", *argv]
    try:
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env, check=False
        )
        text = log.read_text(errors="replace") if log.exists() else ""
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # "PID fsync(3) = -1 EIO ... (INJECTED)", or split in "fsync(3 <unfinished ...>" and
    # "<... fsync resumed>) = ..." when threads interleave: count call starts and INJECTED marks.
    start = re.compile(r"(?:^|\s)(?:" + "|".join(map(re.escape, syscalls)) + r")\(")
    lines = text.splitlines()
    return EioRun(
        returncode=res.returncode,
        stdout=res.stdout,
        stderr=res.stderr,
        injected=sum(1 for ln in lines if ln.rstrip().endswith("(INJECTED)")),
        calls=sum(1 for ln in lines if start.search(ln)),
        strace_log=text,
    )
