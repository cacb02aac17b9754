"""What the benchmarks share: progress lines, free ports, waiting for a greeting, process CPU and
memory from /proc, percentiles. Imported by the scripts in bench/ (their directory is on
``sys.path`` when they run as ``python bench/NAME.py``)."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    """A progress line (stderr: stdout carries the figures and the JSON line)."""
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_greeting(
    port: int, greeting: bytes, timeout: float, alive: Callable[[], bool] = lambda: True
) -> None:
    """Until a connection to 127.0.0.1:``port`` is greeted with bytes starting ``greeting``;
    RuntimeError after ``timeout`` seconds or as soon as ``alive()`` is False."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"server for port {port} exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(512).startswith(greeting):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answers {greeting!r} on 127.0.0.1:{port}")


# --- /proc accounting -----------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # fields from 3 (state) on


def process_tree(root: int) -> list[int]:
    """``root`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = _stat_fields(int(entry))
        if f is not None:
            children.setdefault(int(f[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu_s(root: int) -> float:
    """utime+stime+cutime+cstime over the live tree: live CPU plus that of reaped children."""
    ticks = 0
    for pid in process_tree(root):
        f = _stat_fields(pid)
        if f is not None:
            ticks += sum(int(x) for x in f[11:15])  # utime stime cutime cstime (fields 14-17)
    return ticks / CLK_TCK


def rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` in MiB (NaN if /proc does not say)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tree_rss_mb(root: int) -> float:
    """VmRSS summed over ``root``'s live tree, in MiB."""
    total = 0.0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            total += rss_mb(pid)
    return total


def percentile(xs: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of ``xs`` (NaN for none)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]
