"""Store benchmark: fsync rate, group commit, single-instance bodies, index memory, recovery.

Run from the repository root (see bench/README.md for what each figure means)::

    python bench/store.py [--quick] [--dir D] [--keep] [--seed N]

Every figure is printed on its own line, then the last line of stdout is one JSON object with all
figures, `targets` (met or not) and `quick`. Progress goes to stderr.

Rules the benchmark keeps:

* Data lives on the real data disk: `<D>/bench-<pid>` (D defaults to `<repo>/run`); a tmpfs/ramfs
  directory is refused (checked in /proc/self/mounts), and so is a disk without enough free space
  (`os.statvfs`). The directory is removed at the end unless `--keep`.
* Bodies are unique 4 KiB messages generated from a seeded RNG (`--seed`).
* The large stores (100k-1M messages) are *built* through a bulk path: big transactions and
  `sync=False` (no fsync). Durability is not what those figures measure; every *measured* open
  uses `sync=True` options, a cold page cache (`sync; echo 3 > /proc/sys/vm/drop_caches`) and a
  fresh interpreter, so neither the builder's heap nor its page cache pollutes the numbers.
* The fsync and commit figures use default store options (`sync=True`).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import gc
import itertools
import json
import os
import random
import shutil
import statistics
import string
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailharbor.store import Store, StoreOptions
from mailharbor.store.fsio import OsFileSystem

REPO = Path(__file__).resolve().parent.parent
NODE_ID = b"mh-bench-node-01"  # 16 bytes
DOMAIN = "bench.test"
PASSWORD_HASH = "!bench-no-login"
BODY_SIZE = 4096
DEDUP_BODY_SIZE = 64 * 1024
DEDUP_MAILBOXES = 100
WRITERS = 50
BUILD_ACCOUNTS = 1000
BUILD_BATCH = 2000  # deliveries per bulk transaction while building
WIDE_MAILBOXES = 10_000
MIB = 1024 * 1024

REFUSED_FS = frozenset({"tmpfs", "ramfs", "devtmpfs", "hugetlbfs", "squashfs"})

# name -> (comparison, target)
TARGETS: dict[str, tuple[str, float]] = {
    "group_commit_gain": (">=", 3.0),
    "dedup_ratio": ("<=", 1.1),
    "rss_bytes_per_message": ("<=", 300.0),
    "recovery_s_per_1m": ("<=", 5.0),
}


@dataclass(frozen=True, slots=True)
class Plan:
    """How long and how big: `--quick` (under a minute) or the full run."""

    quick: bool
    fsync_seconds: float
    commit_seconds: float
    warmup_seconds: float
    sizes: tuple[int, int]  # messages in the two large stores (RSS and recovery slopes)
    open_repeats: int  # cold opens per size; the fastest is used
    replay: bool  # open the largest store without a checkpoint too
    wide: bool  # the 50 writers again after WIDE_MAILBOXES mailboxes got mail

    @property
    def min_free_bytes(self) -> int:
        # the large store's log plus checkpoints, the commit store, and headroom
        return int(self.sizes[-1] * (BODY_SIZE + 400) * 1.2) + 2 * 1024 * MIB


QUICK = Plan(True, 1.5, 1.5, 0.3, (200_000, 400_000), 2, False, False)
FULL = Plan(False, 5.0, 5.0, 1.0, (500_000, 1_000_000), 3, True, True)


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --- data ---------------------------------------------------------------------------------------


class Bodies:
    """Unique, deterministic (seeded) message bodies of an exact size: a small header block with
    a numbered Message-ID, then base64-looking lines from a seeded pool at a varying offset."""

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._rnd = random.Random(seed)
        self._pool = b""
        self._ensure(3 * BODY_SIZE)

    def _ensure(self, n: int) -> None:
        alphabet = string.ascii_letters + string.digits + "+/"
        lines = [self._pool]
        total = len(self._pool)
        while total < n:
            line = ("".join(self._rnd.choices(alphabet, k=76)) + "\r\n").encode()
            lines.append(line)
            total += len(line)
        self._pool = b"".join(lines)

    def body(self, n: int, size: int = BODY_SIZE) -> bytes:
        head = (
            f"From: <sender@{DOMAIN}>\r\nTo: <rcpt@{DOMAIN}>\r\nSubject: bench {n}\r\n"
            f"Message-ID: <{self._seed}.{n}@{DOMAIN}>\r\n\r\n"
        ).encode()
        off = (n * 78) % BODY_SIZE
        need = size - len(head)
        if off + need > len(self._pool):
            self._ensure(off + need)
        return head + self._pool[off : off + need]


def open_store(path: str, **options: Any) -> Store:
    return Store.open(path, node_id=NODE_ID, options=StoreOptions(**options))


def create_accounts(store: Store, count: int) -> list[bytes]:
    """The domain and `count` accounts; returns their INBOX GUIDs."""
    with store.transaction() as t:
        t.add_domain(DOMAIN)
    # an account is 13 records; a frame holds at most 65535 (u16 record count)
    for lo in range(0, count, 2000):
        with store.transaction() as t:
            for i in range(lo, min(count, lo + 2000)):
                t.add_account(f"user{i:05d}@{DOMAIN}", PASSWORD_HASH)
    return inboxes(store, count)


def inboxes(store: Store, count: int) -> list[bytes]:
    out = []
    for i in range(count):
        acct = store.index.account_by_address(f"user{i:05d}@{DOMAIN}")
        assert acct is not None, "benchmark account missing"
        out.append(acct.mailboxes["INBOX"])
    return out


def log_bytes(store: Store) -> int:
    return sum(size for _, size in store.segments())


# --- the data directory -------------------------------------------------------------------------


def _unescape_mount(s: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and s[i + 1 : i + 4].isdigit() and i + 4 <= len(s):
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mount_of(path: str) -> tuple[str, str]:
    """(mount point, filesystem type) of the mount holding `path` (which must exist)."""
    real = os.path.realpath(path)
    best = ("", "")
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 3:
                continue
            mnt, typ = _unescape_mount(fields[1]), fields[2]
            inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best[0]):
                best = (mnt, typ)  # the last of equal mount points is the visible one
    return best


def prepare_dir(parent: str, plan: Plan) -> tuple[str, dict[str, Any]]:
    """Create `<parent>/bench-<pid>` after checking it is on a real disk with room; returns it
    and facts about it. Raises SystemExit (refusing) otherwise."""
    probe = parent  # check before creating anything: the nearest existing ancestor
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    mnt, typ = mount_of(probe)
    if not typ:
        raise SystemExit(f"bench: cannot find the mount of {parent} in /proc/self/mounts")
    if typ in REFUSED_FS:
        raise SystemExit(
            f"bench: refusing {parent}: it is on {typ} ({mnt}), not the data disk; "
            "pass --dir on a disk-backed filesystem"
        )
    os.makedirs(parent, exist_ok=True)
    if os.stat(parent).st_dev != os.stat(mnt).st_dev and typ not in ("overlay", "btrfs", "zfs"):
        raise SystemExit(f"bench: {parent} is not on the mount {mnt} that /proc/mounts names")
    vfs = os.statvfs(parent)
    free = vfs.f_bavail * vfs.f_frsize
    if free < plan.min_free_bytes:
        raise SystemExit(
            f"bench: {parent} has {free / 2**30:.1f} GiB free, the run needs "
            f"{plan.min_free_bytes / 2**30:.1f} GiB"
        )
    path = os.path.join(parent, f"bench-{os.getpid()}")
    if os.path.exists(path):
        raise SystemExit(f"bench: {path} already exists")
    os.makedirs(path)
    return path, {"dir": path, "mount": mnt, "fstype": typ, "free_gib": round(free / 2**30, 1)}


def drop_caches() -> bool:
    """`sync; echo 3 > /proc/sys/vm/drop_caches`: True if the page cache was dropped."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
            f.write("3\n")
    except OSError as e:
        progress(f"cannot drop the page cache ({e}); opens are measured warm")
        return False
    return True


# --- fsync and commits --------------------------------------------------------------------------


def bench_fsync(workdir: str, bodies: Bodies, seconds: float) -> dict[str, float]:
    """Raw 4 KiB append + fsync on a growing file (what a one-message commit must at least pay),
    through `fsio` like the store's log writes."""
    fs = OsFileSystem(sync=True)
    path = os.path.join(workdir, "fsync-probe.dat")
    f = fs.open_append(path)
    block = bodies.body(0)
    lat: list[float] = []
    try:
        for _ in range(20):
            f.write(block)
            f.sync()
        t0 = t1 = time.perf_counter()
        while t1 - t0 < seconds:
            t = time.perf_counter()
            f.write(block)
            f.sync()
            t1 = time.perf_counter()
            lat.append(t1 - t)
    finally:
        f.close()
        fs.unlink(path)
    return {
        "fsync_per_s": len(lat) / (t1 - t0),
        "median_ms": statistics.median(lat) * 1e3,
        "p99_ms": sorted(lat)[int(len(lat) * 0.99)] * 1e3,
        "fsyncs": len(lat),
    }


def bench_commits_1w(
    store: Store, box: bytes, bodies: Bodies, ctr: Iterator[int], plan: Plan
) -> dict[str, float]:
    """One writer, one synchronous transaction per message (put_blob + deliver to one INBOX)."""

    def one() -> None:
        with store.transaction() as t:
            t.deliver(t.put_blob(bodies.body(next(ctr))), [box])

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < plan.warmup_seconds:
        one()
    c0, f0 = store.stats_commits, store.stats_fsyncs
    n = 0
    t0 = t1 = time.perf_counter()
    while t1 - t0 < plan.commit_seconds:
        one()
        n += 1
        t1 = time.perf_counter()
    return {
        "commits_per_s": n / (t1 - t0),
        "commits": n,
        "commits_per_fsync": (store.stats_commits - c0) / max(1, store.stats_fsyncs - f0),
    }


async def _writers(
    store: Store, boxes: Sequence[bytes], bodies: Bodies, ctr: Iterator[int], seconds: float
) -> int:
    deadline = time.perf_counter() + seconds

    async def writer(box: bytes) -> int:
        n = 0
        while time.perf_counter() < deadline:
            async with store.transaction() as t:
                t.deliver(t.put_blob(bodies.body(next(ctr))), [box])
            n += 1
        return n

    return sum(await asyncio.gather(*(writer(b) for b in boxes)))


def bench_commits_nw(
    store: Store, boxes: Sequence[bytes], bodies: Bodies, ctr: Iterator[int], plan: Plan
) -> dict[str, float]:
    """len(boxes) concurrent asyncio writers, each committing one message at a time to its own
    INBOX with `async with store.transaction()` (group commit)."""

    async def run() -> dict[str, float]:
        await _writers(store, boxes, bodies, ctr, plan.warmup_seconds)
        c0, f0 = store.stats_commits, store.stats_fsyncs
        t0 = time.perf_counter()
        n = await _writers(store, boxes, bodies, ctr, plan.commit_seconds)
        el = time.perf_counter() - t0
        fs = store.stats_fsyncs - f0
        return {
            "commits_per_s": n / el,
            "commits": n,
            "fsyncs": fs,
            "commits_per_fsync": (store.stats_commits - c0) / max(1, fs),
        }

    return asyncio.run(run())


def bench_dedup(store: Store, boxes: Sequence[bytes], bodies: Bodies, n: int) -> dict[str, float]:
    """Log bytes added by one 64 KiB message delivered to len(boxes) mailboxes."""
    before = log_bytes(store)
    with store.transaction() as t:
        t.deliver(t.put_blob(bodies.body(n, DEDUP_BODY_SIZE)), list(boxes))
    added = log_bytes(store) - before
    return {
        "dedup_ratio": added / DEDUP_BODY_SIZE,
        "log_bytes_added": added,
        "bytes_per_extra_mailbox": (added - DEDUP_BODY_SIZE) / len(boxes),
    }


def bench_commits_wide(
    path: str, bodies: Bodies, ctr: Iterator[int], plan: Plan
) -> dict[str, float]:
    """The 50-writer figure again on a fresh store in which `WIDE_MAILBOXES` mailboxes have
    each received one message since it was opened, as on a server with many active users."""
    store = open_store(path)
    try:
        boxes = create_accounts(store, WIDE_MAILBOXES)
        for lo in range(0, len(boxes), BUILD_BATCH):
            with store.transaction() as t:
                for box in boxes[lo : lo + BUILD_BATCH]:
                    t.deliver(t.put_blob(bodies.body(next(ctr))), [box])
        return bench_commits_nw(store, boxes[:WRITERS], bodies, ctr, plan)
    finally:
        store.close()


# --- large stores -------------------------------------------------------------------------------


def grow(path: str, start: int, end: int, bodies: Bodies) -> float:
    """Bulk-build: add messages start..end-1 (unique 4 KiB bodies, round-robin over the INBOXes of
    BUILD_ACCOUNTS accounts), BUILD_BATCH deliveries per transaction, sync=False, no periodic
    checkpoint; close() writes the checkpoint the measured opens load. Returns seconds."""
    t0 = time.perf_counter()
    store = open_store(path, sync=False, cache_bytes=0, checkpoint_every_bytes=1 << 62)
    try:
        boxes = (
            create_accounts(store, BUILD_ACCOUNTS) if start == 0 else inboxes(store, BUILD_ACCOUNTS)
        )
        nb = len(boxes)
        i = start
        while i < end:
            stop = min(end, i + BUILD_BATCH)
            with store.transaction() as t:
                for k in range(i, stop):
                    t.deliver(t.put_blob(bodies.body(k)), [boxes[k % nb]])
            i = stop
            if i % 100_000 == 0:
                progress(f"  {i} messages ({time.perf_counter() - t0:.1f} s)")
        if store.index.message_count != end:
            raise SystemExit(
                f"bench: store has {store.index.message_count} messages, expected {end}"
            )
    finally:
        store.close()
    return time.perf_counter() - t0


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def malloc_trim() -> bool:
    """Hand freed heap pages back to the kernel (glibc), so RSS shows live memory only."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def measure_open_child(path: str) -> dict[str, Any]:
    """In a fresh interpreter: open the store (sync=True, no body cache), time it, then the RSS
    the open added after gc and malloc_trim."""
    gc.collect()
    malloc_trim()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    store = Store.open(path, node_id=NODE_ID, options=StoreOptions(cache_bytes=0, sync=True))
    open_s = time.perf_counter() - t0
    rec = store.recovery
    assert rec is not None
    gc.collect()
    rss_untrimmed = rss_bytes()
    malloc_trim()
    rss1 = rss_bytes()
    out = {
        "open_s": open_s,
        "recovery_s": rec.seconds,
        "replayed_frames": rec.replayed_frames,
        "from_checkpoint": rec.checkpoint_lsn > 0,
        "messages": store.index.message_count,
        "blobs": len(store.index.blobs),
        "mailboxes": len(store.index.mailboxes),
        "rss_before": rss0,
        "rss_after": rss1,
        "index_rss": rss1 - rss0,
        "index_rss_untrimmed": rss_untrimmed - rss0,
    }
    store.close()
    return out


def measure_open(path: str, repeats: int) -> dict[str, Any]:
    """Cold-cache open(s) of `path` in fresh subprocesses; the fastest run (other load on the
    machine and disk only ever slows an open down)."""
    runs = []
    for _ in range(repeats):
        cold = drop_caches()
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--measure-open", path],
            stdout=subprocess.PIPE,
            check=True,
            text=True,
        )
        r: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        r["cold_cache"] = cold
        runs.append(r)
    runs.sort(key=lambda r: float(r["open_s"]))
    best = runs[0]
    best["open_s_all"] = [round(float(r["open_s"]), 3) for r in runs]
    return best


def move_checkpoints_aside(path: str) -> None:
    src = os.path.join(path, "checkpoints")
    dst = os.path.join(path, "checkpoints.aside")
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        os.replace(os.path.join(src, name), os.path.join(dst, name))


# --- reporting ----------------------------------------------------------------------------------


def met(name: str, value: float | None) -> bool | None:
    if value is None:
        return None
    op, target = TARGETS[name]
    return value >= target if op == ">=" else value <= target


def line(name: str, value: float | None, fmt: str, what: str) -> None:
    shown = "null" if value is None else format(value, fmt)
    verdict = ""
    if name in TARGETS:
        op, target = TARGETS[name]
        ok = met(name, value)
        verdict = f"  [target {op} {target:g}: {'met' if ok else 'MISSED'}]"
    print(f"{name:<32} {shown:>10}  {what}{verdict}", flush=True)


def slope(a: dict[str, Any], b: dict[str, Any], key: str) -> float:
    dn = int(b["messages"]) - int(a["messages"])
    return (float(b[key]) - float(a[key])) / dn


def run(plan: Plan, parent: str, seed: int, keep: bool) -> dict[str, Any]:
    started = time.perf_counter()
    workdir, where = prepare_dir(parent, plan)
    bodies = Bodies(seed)
    ctr = itertools.count(1)
    details: dict[str, Any] = {"data_dir": where, "seed": seed}
    notes = [
        f"data directory {workdir} on {where['fstype']} ({where['mount']})",
        f"large stores built with sync=False and {BUILD_BATCH}-message transactions (bulk path;"
        " durability is not measured there); every measured open uses sync=True",
    ]
    for n in notes:
        print(f"# {n}", flush=True)
    try:
        os.sync()  # do not bill other processes' dirty pages to our fsyncs
        progress(f"fsync: raw 4 KiB append + fsync for {plan.fsync_seconds} s")
        fsync_before = bench_fsync(workdir, bodies, plan.fsync_seconds)

        cpath = os.path.join(workdir, "commits")
        store = open_store(cpath)
        try:
            boxes = create_accounts(store, max(WRITERS, DEDUP_MAILBOXES))
            progress(f"commits: 1 writer for {plan.commit_seconds} s")
            c1 = bench_commits_1w(store, boxes[0], bodies, ctr, plan)
            progress(f"commits: {WRITERS} writers for {plan.commit_seconds} s")
            cn = bench_commits_nw(store, boxes[:WRITERS], bodies, ctr, plan)
            progress(f"fsync again for {plan.fsync_seconds} s (the disk may have changed)")
            fsync_after = bench_fsync(workdir, bodies, plan.fsync_seconds)
            progress(f"dedup: one 64 KiB message to {DEDUP_MAILBOXES} mailboxes")
            dd = bench_dedup(store, boxes[:DEDUP_MAILBOXES], bodies, next(ctr))
        finally:
            store.close()
        # the disk's rate around the commit figures: the mean of before and after
        rates = (fsync_before["fsync_per_s"], fsync_after["fsync_per_s"])
        fsync_per_s = statistics.mean(rates)
        details["fsync"] = {"before": fsync_before, "after": fsync_after}
        if max(rates) > 1.25 * min(rates):
            notes.append(
                f"the disk's fsync rate changed during the commit figures ({rates[0]:.0f}/s "
                f"before, {rates[1]:.0f}/s after): throughput figures are unreliable, rerun"
            )
        details["commits_1w"] = c1
        details[f"commits_{WRITERS}w"] = cn
        details["dedup"] = dd
        shutil.rmtree(cpath)
        wide: dict[str, float] | None = None
        if plan.wide:
            progress(f"commits: {WRITERS} writers after {WIDE_MAILBOXES} mailboxes got mail")
            wpath = os.path.join(workdir, "wide")
            wide = bench_commits_wide(wpath, bodies, ctr, plan)
            details[f"commits_{WRITERS}w_wide"] = wide
            shutil.rmtree(wpath)

        bpath = os.path.join(workdir, "big")
        opens: list[dict[str, Any]] = []
        built = 0
        builds: list[float] = []
        for size in plan.sizes:
            progress(f"building {size} messages (bulk, sync=False)")
            builds.append(grow(bpath, built, size, bodies))
            built = size
            progress(
                f"cold open of {size} messages from its checkpoint "
                f"(x{plan.open_repeats}, fresh process)"
            )
            o = measure_open(bpath, plan.open_repeats)
            if o["replayed_frames"] or not o["from_checkpoint"]:
                raise SystemExit(
                    f"bench: open of {size} messages did not start from a clean checkpoint: {o}"
                )
            opens.append(o)
        details["build_s"] = [round(b, 1) for b in builds]
        details["build_msgs_per_s"] = round(plan.sizes[-1] / sum(builds))
        details["opens"] = opens
        rss_per_msg = slope(opens[0], opens[1], "index_rss")
        recovery_per_1m = slope(opens[0], opens[1], "open_s") * 1e6
        replay_per_1m: float | None = None
        if plan.replay:
            move_checkpoints_aside(bpath)
            progress(f"cold open of {plan.sizes[-1]} messages WITHOUT a checkpoint (replay)")
            r = measure_open(bpath, 1)
            if r["from_checkpoint"] or r["messages"] != plan.sizes[-1]:
                raise SystemExit(f"bench: the replay open was not a full replay: {r}")
            details["replay"] = r
            replay_per_1m = float(r["open_s"]) * 1e6 / int(r["messages"])
            details["recovery_s_measured_at_largest"] = opens[-1]["open_s"]
    finally:
        if keep:
            progress(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    gain = cn["commits_per_s"] / fsync_per_s
    for n in notes[2:]:
        print(f"# {n}", flush=True)
    a, b = opens
    cold = all(o["cold_cache"] for o in opens)
    line(
        "fsync_per_s",
        fsync_per_s,
        ".0f",
        f"raw 4 KiB append+fsync, mean of {rates[0]:.0f}/s before and {rates[1]:.0f}/s after "
        f"the commit figures (median {fsync_before['median_ms']:.2f}/"
        f"{fsync_after['median_ms']:.2f} ms)",
    )
    line(
        "commits_per_s_1w",
        c1["commits_per_s"],
        ".0f",
        "1 writer, 1 sync transaction per 4 KiB message",
    )
    line(
        f"commits_per_s_{WRITERS}w",
        cn["commits_per_s"],
        ".0f",
        f"{WRITERS} asyncio writers, group commit "
        f"({1e6 / cn['commits_per_s']:.0f} us of event-loop time per commit)",
    )
    line("commits_per_fsync", cn["commits_per_fsync"], ".1f", f"at {WRITERS} writers")
    wide_key = f"commits_per_s_{WRITERS}w_{WIDE_MAILBOXES // 1000}k_mailboxes"
    line(
        wide_key,
        None if wide is None else wide["commits_per_s"],
        ".0f",
        f"{WRITERS} writers after {WIDE_MAILBOXES} mailboxes got mail since open"
        if wide
        else "skipped in --quick",
    )
    line("group_commit_gain", gain, ".2f", f"commits_per_s_{WRITERS}w / fsync_per_s")
    line(
        "dedup_ratio",
        dd["dedup_ratio"],
        ".3f",
        f"log bytes for 64 KiB to {DEDUP_MAILBOXES} mailboxes / 64 KiB "
        f"({dd['log_bytes_added']} B, {dd['bytes_per_extra_mailbox']:.0f} B per mailbox)",
    )
    line(
        "rss_bytes_per_message",
        rss_per_msg,
        ".0f",
        f"index RSS slope {a['messages']}->{b['messages']} messages "
        f"({a['index_rss'] / 2**20:.1f} -> {b['index_rss'] / 2**20:.1f} MiB, cache excluded)",
    )
    line(
        "recovery_s_per_1m",
        recovery_per_1m,
        ".2f",
        f"open-from-checkpoint slope {a['messages']}->{b['messages']}, x1M "
        f"({a['open_s']:.2f} -> {b['open_s']:.2f} s, {'cold' if cold else 'WARM'} cache)",
    )
    line(
        "replay_s_per_1m",
        replay_per_1m,
        ".2f",
        f"open of {plan.sizes[-1]} messages without a checkpoint, per 1M"
        if plan.replay
        else "skipped in --quick (needs a 1M-message store)",
    )
    elapsed = time.perf_counter() - started
    print(f"# elapsed {elapsed:.1f} s", flush=True)

    result: dict[str, Any] = {
        "fsync_per_s": round(fsync_per_s, 1),
        "commits_per_s_1w": round(c1["commits_per_s"], 1),
        f"commits_per_s_{WRITERS}w": round(cn["commits_per_s"], 1),
        "commits_per_fsync": round(cn["commits_per_fsync"], 2),
        "group_commit_gain": round(gain, 3),
        wide_key: None if wide is None else round(wide["commits_per_s"], 1),
        "dedup_ratio": round(dd["dedup_ratio"], 4),
        "rss_bytes_per_message": round(rss_per_msg, 1),
        "recovery_s_per_1m": round(recovery_per_1m, 3),
        "replay_s_per_1m": None if replay_per_1m is None else round(replay_per_1m, 3),
    }
    result["targets"] = {k: met(k, result[k]) for k in TARGETS}
    result["quick"] = plan.quick
    result["cold_cache"] = cold
    result["elapsed_s"] = round(elapsed, 1)
    result["notes"] = notes
    result["details"] = details
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smaller stores, under a minute")
    p.add_argument(
        "--dir",
        default=str(REPO / "run"),
        help="parent directory on the data disk (default: <repo>/run)",
    )
    p.add_argument("--keep", action="store_true", help="keep the data directory")
    p.add_argument("--seed", type=int, default=1, help="seed of the message bodies")
    p.add_argument("--measure-open", metavar="STORE", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure_open:
        print(json.dumps(measure_open_child(args.measure_open)), flush=True)
        return 0
    result = run(QUICK if args.quick else FULL, os.path.abspath(args.dir), args.seed, args.keep)
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
