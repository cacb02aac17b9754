"""Replication benchmark: SMTP load on a standalone node vs a protocol C primary; resync; verify.

Run from the repository root as root (see bench/README.md, section bench/repl.py)::

    python bench/repl.py [--quick] [--keep]

Part 1, A and B alternated in one run (5 rounds quick, 7 full): bench/smtp.py's load
(Postfix's `smtp-source`, 10 sessions, 4 KiB messages to one local recipient; then the asyncio
latency client of bench/smtp.py) against (A) a node with no peer configured and (B) a primary
replicating in protocol C to a secondary on the same machine. CPU of every `mailharbor serve`
process from /proc. A round sends each side its messages in two halves, in the order A, B, B,
A, and its B/A ratio is the ratio of the summed smtp-source times; `ratio` is the median of
the rounds' ratios. The halves run back to back and in mirrored order, so the drift of a shared
machine, between rounds and within one, cancels out.

Placement. Every round runs its A/B pair twice: *pinned* — the node under test (the standalone
node in A, the primary in B) alone on the first CPU, everything else (the secondary,
smtp-source, the latency client) on the others, the same in both turns — and *unpinned*, all
processes free on every CPU (throughput only). `ratio` comes from the pinned pairs and
`ratio_unpinned` from the others; the order of the two alternates between rounds. On a
two-CPU machine, unpinned, the secondary and smtp-source keep landing on the primary's CPU and
preempting it (its run time per message grows by about a quarter; a standalone node, with
only smtp-source beside it, keeps a CPU to itself): that measures the co-located peer taking
the primary's core, which a peer on its own machine does not. Pinned, both turns give the node
under test the same one CPU and its load and peer the rest. With a single CPU nothing is pinned
and `ratio` is the unpinned figure (`placement` in the JSON says which).

Part 2: the secondary is stopped, the primary takes 500 MB (100 MB quick) of 100 KiB messages
over SMTP, a sequential write+fsync of a file of the same size measures the disk, then the
secondary is restarted and its catch-up (rate limit off) is timed; finally `repl verify`.

Human lines first; the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import BIN, REPO, free_port, log, percentile, rss_mb, tree_cpu_s, wait_greeting
from mailharbor.admin.client import AdminClient, AdminClientError, NodeNotRunning
from mailharbor.store.log import SEGMENT_PREFIX, SEGMENT_SUFFIX
from smtp import RCPT, SENDER, SESSIONS, SMTP_SOURCE, latency_run

DOMAIN = RCPT.split("@", 1)[1]
MSG_LEN = 4096
BIG_MSG_LEN = 100 * 1024
MB = 1_000_000
CHUNK_FSYNC = 4 * 1024 * 1024  # the resync's chunk: the target fsyncs about this often or less
TARGETS: dict[str, tuple[str, float]] = {"ratio": (">=", 0.8), "resync_ratio": (">=", 0.3)}


@dataclass(frozen=True, slots=True)
class Plan:
    quick: bool
    messages: int
    warmup: int
    rounds: int
    resync_bytes: int


QUICK = Plan(quick=True, messages=1000, warmup=100, rounds=5, resync_bytes=100 * MB)
FULL = Plan(quick=False, messages=2000, warmup=200, rounds=7, resync_bytes=500 * MB)


# --- nodes ------------------------------------------------------------------------------------


class Node:
    """A `mailharbor init` directory and, while started, its `mailharbor serve` process."""

    def __init__(
        self, run: Path, name: str, smtp_port: int, repl: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.dir = run / name
        self.cfg = self.dir / "mailharbor.toml"
        self.port = smtp_port
        self.repl = repl
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin = AdminClient(self.dir / "data" / "admin.sock", timeout=30)

    def cli(self, *args: str, stdin: bytes | None = None) -> str:
        r = subprocess.run(
            [str(BIN / "mailharbor"), *args, "--config", str(self.cfg)],
            input=stdin,
            capture_output=True,
            check=False,
        )
        if r.returncode != 0:
            raise RuntimeError(f"mailharbor {' '.join(args)}: {r.stderr.decode().strip()}")
        return r.stdout.decode()

    def init(self, *, mail: bool) -> None:
        subprocess.run(
            [BIN / "mailharbor", "init", self.dir, "--hostname", "localhost", "--name", self.name],
            check=True,
            capture_output=True,
        )
        text = self.cfg.read_text()
        if "\n# mx = []\n" not in text or text.count("\n[replication]\n") != 1:
            raise RuntimeError("unexpected mailharbor.toml: no '# mx = []' or [replication]")
        text = text.replace("\n# mx = []\n", f'\nmx = ["127.0.0.1:{self.port}"]\n')
        if self.repl is not None:
            keys = "".join(f"{k} = {json.dumps(v)}\n" for k, v in self.repl.items())
            text = text.replace("\n[replication]\n", "\n[replication]\n" + keys)
        self.cfg.write_text(text)
        if mail:  # offline, before the first start (a secondary gets it from its primary)
            self.cli("domain", "add", DOMAIN)
            self.cli("account", "add", RCPT, "--password-stdin", stdin=b"pw-bench-1234\n")

    def start(self, *, serves: bool) -> None:
        logf = (self.dir / "serve.log").open("ab")
        self.proc = subprocess.Popen(
            [str(BIN / "mailharbor"), "serve", "--config", str(self.cfg)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        logf.close()
        proc = self.proc
        if serves:
            wait_greeting(self.port, b"220", 30, lambda: proc.poll() is None)
            return
        deadline = time.monotonic() + 30
        while not self.admin.answers():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: serve exited or its admin socket is silent")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_s(self) -> float:
        return tree_cpu_s(self.pid)

    def status(self) -> dict[str, Any]:
        r = self.admin.call("repl.status")
        if not r.ok or not isinstance(r.result, dict):
            raise RuntimeError(f"{self.name}: repl status: {r.error}")
        return r.result

    def log_bytes(self) -> int:
        """Size of the store's log (all segment files)."""
        total = 0
        logdir = self.dir / "data" / "log"
        if not logdir.exists():
            return 0
        for entry in os.scandir(logdir):
            if entry.name.startswith(SEGMENT_PREFIX) and entry.name.endswith(SEGMENT_SUFFIX):
                total += entry.stat().st_size
        return total

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def in_sync(primary: Node, secondary: Node) -> bool:
    try:
        p, s = primary.status(), secondary.status()
    except (AdminClientError, NodeNotRunning):
        return False
    return bool(
        p["role"] == "Primary"
        and s["role"] == "Secondary"
        and p["replication"] == "Established"
        and s["replication"] == "Established"
        and s["disk"] == "UpToDate"
        and p.get("peer_durable_lsn") == p["last_lsn"] == s["durable_lsn"]
    )


def wait_sync(primary: Node, secondary: Node, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not in_sync(primary, secondary):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{secondary.name} not in sync with {primary.name}")
        time.sleep(0.02)


# --- load -------------------------------------------------------------------------------------


def smtp_source(port: int, messages: int, length: int) -> float:
    """smtp-source -s 10 -d (one connection per session); the wall time in seconds."""
    cmd = [SMTP_SOURCE, "-s", str(SESSIONS), "-m", str(messages), "-l", str(length), "-d"]
    cmd += ["-f", SENDER, "-t", RCPT, f"127.0.0.1:{port}"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0 or r.stderr.strip():
        raise RuntimeError(f"smtp-source failed ({r.returncode}): {r.stderr.strip()[:500]}")
    return wall


@dataclass(slots=True)
class Turn:
    """One side's share of a round: smtp-source wall time and CPU of its processes, summed over
    its chunks."""

    procs: tuple[Node, ...]
    peer: Node | None
    messages: int = 0
    wall: float = 0.0
    cpu: list[float] = dataclasses.field(default_factory=list)

    def chunk(self, n: int) -> None:
        """smtp-source with ``n`` messages; the secondary's apply work for them is counted."""
        target = self.procs[0]
        if self.peer is not None:
            wait_sync(target, self.peer, 30)
        c0 = [p.cpu_s() for p in self.procs]
        self.wall += smtp_source(target.port, n, MSG_LEN)
        if self.peer is not None:
            wait_sync(target, self.peer, 30)
        used = [p.cpu_s() - c for p, c in zip(self.procs, c0, strict=True)]
        self.cpu = [a + b for a, b in zip(self.cpu, used, strict=True)] if self.cpu else used
        self.messages += n

    def result(self, latency: bool) -> dict[str, float]:
        """Throughput and CPU per message; with ``latency``, a latency client run as well."""
        n = self.messages
        out = {"msgs_per_s": n / self.wall, "cpu_ms_per_msg": self.cpu[0] * 1000 / n}
        if len(self.cpu) > 1:
            out["secondary_cpu_ms_per_msg"] = self.cpu[1] * 1000 / n
        if latency:
            lat, lat_wall = latency_run(self.procs[0].port, n)
            out["p50_ms"] = percentile(lat, 0.5) * 1000
            out["p99_ms"] = percentile(lat, 0.99) * 1000
            out["latency_client_msgs_per_s"] = n / lat_wall
        return out


class Placement:
    """CPU affinity for the pinned turns: the node under test on the first CPU, the rest of the
    run (other nodes, this process and so smtp-source, which it starts) on the others. Applied
    to every thread of a process; threads started later inherit it from the one starting them.
    ``possible`` is False on a single CPU: then nothing is ever pinned."""

    def __init__(self) -> None:
        self.all = set(os.sched_getaffinity(0))
        first = min(self.all)
        self.node = {first}
        self.rest = self.all - self.node
        self.possible = bool(self.rest)

    @staticmethod
    def _set(pid: int, cpus: set[int]) -> None:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                os.sched_setaffinity(int(tid), cpus)

    def pin(self, under_test: Node, nodes: Sequence[Node]) -> None:
        """``under_test`` on the first CPU; the other ``nodes`` and this process on the rest."""
        for n in nodes:
            self._set(n.pid, self.node if n is under_test else self.rest)
        os.sched_setaffinity(0, self.rest)

    def free(self, nodes: Sequence[Node]) -> None:
        for n in nodes:
            self._set(n.pid, self.all)
        os.sched_setaffinity(0, self.all)

    def describe(self) -> str:
        if not self.possible:
            return "one CPU: nothing pinned; ratio is unpinned"
        return (
            f"pinned turns: node under test on CPU {sorted(self.node)}, secondary, smtp-source "
            f"and the latency client on CPUs {sorted(self.rest)}; unpinned turns: all on "
            f"{sorted(self.all)}"
        )


def disk_seq(path: Path, size: int, fsync_every: int | None = None) -> float:
    """Sequential write of ``size`` bytes in 1 MiB writes, then fsync (and, with
    ``fsync_every``, an fsync after every that many bytes as well); seconds."""
    buf = os.urandom(1 << 20)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        done = since_sync = 0
        while done < size:
            n = os.write(fd, buf[: min(size - done, len(buf))])
            done += n
            since_sync += n
            if fsync_every is not None and since_sync >= fsync_every:
                os.fsync(fd)
                since_sync = 0
        os.fsync(fd)
    finally:
        os.close(fd)
    wall = time.perf_counter() - t0
    path.unlink()
    return wall


def resync(primary: Node, secondary: Node, plan: Plan, run: Path) -> dict[str, float]:
    """Secondary down while the primary takes ``plan.resync_bytes`` of mail; then catch-up."""
    log(f"# resync: stopping {secondary.name}")
    secondary.stop()
    lsn0 = primary.status()["last_lsn"]
    p_log0 = primary.log_bytes()
    s_log0 = secondary.log_bytes()
    msgs = plan.resync_bytes // BIG_MSG_LEN + 1
    log(f"# resync: {msgs} messages of {BIG_MSG_LEN} bytes to the primary over SMTP")
    load_wall = smtp_source(primary.port, msgs, BIG_MSG_LEN)
    st = primary.status()
    target_lsn = st["last_lsn"]
    p_log1 = primary.log_bytes()
    missed = p_log1 - p_log0
    log(f"# resync: {missed / MB:.1f} MB of log, LSNs {lsn0 + 1}-{target_lsn}; disk test")
    seq_before = disk_seq(run / "disk-seq.tmp", missed)
    pc0 = primary.cpu_s()
    t_start = time.perf_counter()
    secondary.start(serves=False)
    sc0 = secondary.cpu_s()  # after its start-up (store open) is done
    t_first: float | None = None
    t_end = 0.0
    rates: list[float] = []
    deadline = time.monotonic() + 600
    while True:
        now = time.perf_counter()
        size = secondary.log_bytes()
        if t_first is None and size > s_log0:
            t_first = now
        if size >= s_log0 + missed * 0.98 or t_first is None or int(now * 10) % 3 == 0:
            s = secondary.status()
            if isinstance(s.get("resync_bytes_per_second"), int):
                rates.append(float(s["resync_bytes_per_second"]))
            if s["durable_lsn"] >= target_lsn and s["disk"] == "UpToDate":
                t_end = time.perf_counter()
                break
        if time.monotonic() > deadline:
            raise RuntimeError("resync did not finish within 600 s")
        time.sleep(0.01)
    assert t_first is not None
    s_cpu = secondary.cpu_s() - sc0
    p_cpu = primary.cpu_s() - pc0
    fsynced = secondary.log_bytes() - s_log0
    wait_sync(primary, secondary, 30)
    log("# verify")
    t0 = time.perf_counter()
    r = primary.admin.call("repl.verify")
    verify_wall = time.perf_counter() - t0
    if not r.ok or not isinstance(r.result, dict) or r.result.get("mismatches"):
        raise RuntimeError(f"repl verify: {r.error or r.result}")
    log_total = primary.log_bytes()
    secs = t_end - t_first
    log("# disk test again, and with an fsync every 4 MiB")
    seq_after = disk_seq(run / "disk-seq.tmp", missed)
    seq_chunked = disk_seq(run / "disk-seq.tmp", missed, fsync_every=CHUNK_FSYNC)
    seq_wall = (seq_before + seq_after) / 2
    return {
        "messages": msgs,
        "load_msgs_per_s": msgs / load_wall,
        "load_mb_per_s": missed / MB / load_wall,
        "missed_log_mb": missed / MB,
        "fsynced_on_target_mb": fsynced / MB,
        "resync_s": secs,
        "resync_s_from_process_start": t_end - t_start,
        "resync_mb_per_s": fsynced / MB / secs,
        "secondary_reported_mb_per_s_last": (rates[-1] / MB) if rates else float("nan"),
        "disk_seq_s": seq_wall,
        "disk_seq_mb_per_s": missed / MB / seq_wall,
        "disk_seq_mb_per_s_before": missed / MB / seq_before,
        "disk_seq_mb_per_s_after": missed / MB / seq_after,
        "disk_seq_fsync_every_4mib_mb_per_s": missed / MB / seq_chunked,
        "resync_primary_cpu_s": p_cpu,
        "resync_secondary_cpu_s": s_cpu,
        "verify_s": verify_wall,
        "verify_log_mb": log_total / MB,
        "verify_mb_per_s": log_total / MB / verify_wall,
        "verify_ranges": float(r.result.get("ranges", 0)),
    }


# --- the run ----------------------------------------------------------------------------------


def run(plan: Plan, keep: bool) -> dict[str, Any]:
    started = time.perf_counter()
    for tool in (SMTP_SOURCE, str(BIN / "mailharbor")):
        if not os.access(tool, os.X_OK):
            raise SystemExit(f"{tool} missing: run `make bench-deps` (Postfix) / `make` (venv)")
    if os.geteuid() != 0:
        raise SystemExit("run as root (like the other benchmarks)")
    rundir = REPO / "run" / f"bench-repl-{os.getpid()}"
    rundir.mkdir(parents=True)
    secret = secrets.token_hex(16)
    rp, rs = free_port(), free_port()
    common = {"secret": secret, "protocol": "C", "resync_rate": "0"}
    alone = Node(rundir, "standalone", free_port())
    primary = Node(
        rundir,
        "primary",
        free_port(),
        {"peer": f"127.0.0.1:{rs}", "listen": f"127.0.0.1:{rp}", "role": "primary", **common},
    )
    secondary = Node(
        rundir,
        "secondary",
        free_port(),
        {"peer": f"127.0.0.1:{rp}", "listen": f"127.0.0.1:{rs}", "role": "secondary", **common},
    )
    nodes = (alone, primary, secondary)
    results: dict[str, list[dict[str, float]]] = {
        "standalone": [],
        "replicated": [],
        "standalone_unpinned": [],
        "replicated_unpinned": [],
    }
    place = Placement()
    try:
        log(f"# run dir {rundir}")
        alone.init(mail=True)
        primary.init(mail=True)
        secondary.init(mail=False)
        alone.start(serves=True)
        primary.start(serves=True)
        secondary.start(serves=False)
        wait_sync(primary, secondary, 30)
        for node in (alone, primary) if plan.rounds else ():  # warm-up: imports, caches
            smtp_source(node.port, plan.warmup, MSG_LEN)
            latency_run(node.port, plan.warmup)
        for r in range(plan.rounds):
            # The pinned and the unpinned pair alternate which goes first.
            variants = ("", "_unpinned") if r % 2 == 0 else ("_unpinned", "")
            for variant in variants if place.possible else ("",):
                pinned = variant == "" and place.possible
                log(f"# round {r + 1}/{plan.rounds}{variant}: A B B A")
                turns = {
                    "standalone": Turn((alone,), None),
                    "replicated": Turn((primary, secondary), secondary),
                }
                # A, B, B, A in half turns: drift within the round cancels as well.
                for name in ("standalone", "replicated", "replicated", "standalone"):
                    if pinned:
                        place.pin(turns[name].procs[0], nodes)
                    else:
                        place.free(nodes)
                    turns[name].chunk(plan.messages // 2)
                for name, turn in turns.items():
                    if pinned:  # the latency client's run, placed as its turn was
                        place.pin(turn.procs[0], nodes)
                    m = turn.result(latency=variant == "")
                    results[name + variant].append(m)
                    log(f"#   {name}: " + ", ".join(f"{k}={v:.2f}" for k, v in m.items()))
        place.free(nodes)
        rss = {n.name: rss_mb(n.pid) for n in nodes}
        rs_res = resync(primary, secondary, plan, rundir)
        log("#   " + ", ".join(f"{k}={v:.2f}" for k, v in rs_res.items()))
    finally:
        for node in nodes:
            try:
                node.stop()
            except Exception as e:  # keep cleaning up
                log(f"# cleanup: {e}")
        if keep:
            log(f"# kept {rundir}")
        else:
            shutil.rmtree(rundir, ignore_errors=True)

    if not plan.rounds:  # --resync-only: no targets judged
        ratio = rs_res["resync_mb_per_s"] / rs_res["disk_seq_mb_per_s"]
        return {"resync_only": True, "resync_ratio": round(ratio, 3), **rs_res}

    def med(name: str, key: str) -> float:
        return statistics.median(m[key] for m in results[name])

    res: dict[str, Any] = {
        "standalone_msgs_per_s": round(med("standalone", "msgs_per_s"), 1),
        "replicated_msgs_per_s": round(med("replicated", "msgs_per_s"), 1),
    }

    # A round's halves run back to back, A B B A: the per-round ratio cancels the drift of a
    # shared VM between rounds and within one.
    def ratios(variant: str) -> list[float]:
        return [
            b["msgs_per_s"] / a["msgs_per_s"]
            for a, b in zip(
                results["standalone" + variant], results["replicated" + variant], strict=True
            )
        ]

    round_ratios = ratios("")
    unpinned_ratios = ratios("_unpinned") if place.possible else round_ratios
    res["ratio"] = round(statistics.median(round_ratios), 3)
    res["ratio_unpinned"] = round(statistics.median(unpinned_ratios), 3)
    res["ratio_of_medians"] = round(res["replicated_msgs_per_s"] / res["standalone_msgs_per_s"], 3)
    res["p99_ms_replicated"] = round(med("replicated", "p99_ms"), 2)
    res["p99_ms_standalone"] = round(med("standalone", "p99_ms"), 2)
    res["standalone_cpu_ms_per_msg"] = round(med("standalone", "cpu_ms_per_msg"), 3)
    res["primary_cpu_ms_per_msg"] = round(med("replicated", "cpu_ms_per_msg"), 3)
    res["secondary_cpu_ms_per_msg"] = round(med("replicated", "secondary_cpu_ms_per_msg"), 3)
    res["resync_mb_per_s"] = round(rs_res["resync_mb_per_s"], 1)
    res["disk_seq_mb_per_s"] = round(rs_res["disk_seq_mb_per_s"], 1)
    res["resync_ratio"] = round(rs_res["resync_mb_per_s"] / rs_res["disk_seq_mb_per_s"], 3)
    res["verify_mb_per_s"] = round(rs_res["verify_mb_per_s"], 1)

    n, sess = plan.messages, SESSIONS
    src = f"smtp-source -s {sess} -m {n} -l {MSG_LEN} -d"
    mb = rs_res["missed_log_mb"]
    placed = "pinned turns" if place.possible else "one CPU, nothing pinned"
    lines = [
        ("standalone_msgs_per_s", f"node without a peer, {src}"),
        ("replicated_msgs_per_s", "primary, protocol C, secondary on this machine, same load"),
        ("ratio", f"replicated / standalone: median of the rounds' ratios, {placed}"),
        ("ratio_unpinned", "the same, every process free on every CPU"),
        ("ratio_of_medians", f"median replicated / median standalone, {placed}"),
        ("p99_ms_replicated", f"end of data -> 250, asyncio client, {sess} sessions, primary"),
        ("p99_ms_standalone", "same, node without a peer"),
        ("standalone_cpu_ms_per_msg", "node without a peer, utime+stime per message"),
        ("primary_cpu_ms_per_msg", "primary, same"),
        ("secondary_cpu_ms_per_msg", "secondary, same (until it is in sync)"),
        ("resync_mb_per_s", f"catch-up of {mb:.0f} MB of log: bytes on the target / time"),
        ("disk_seq_mb_per_s", f"write+fsync of a {mb:.0f} MB file on the same file system"),
        ("resync_ratio", "resync_mb_per_s / disk_seq_mb_per_s"),
        ("verify_mb_per_s", f"repl verify over {rs_res['verify_log_mb']:.0f} MB of log / time"),
    ]
    for key, what in lines:
        mark = ""
        if key in TARGETS:
            op, target = TARGETS[key]
            mark = f"  [target {op} {target}: {'met' if met(key, res[key]) else 'MISSED'}]"
        print(f"{key:27} {res[key]:>9}  {what}{mark}", flush=True)
    elapsed = time.perf_counter() - started
    print(f"# medians of {plan.rounds} A/B rounds (standalone, replicated, ...), {n} msgs per run")
    print("# rounds' ratios, pinned: " + ", ".join(f"{r:.3f}" for r in round_ratios))
    print("# rounds' ratios, unpinned: " + ", ".join(f"{r:.3f}" for r in unpinned_ratios))
    print(f"# placement: {place.describe()}")
    print(
        f"# resync load: {rs_res['messages']:.0f} messages of {BIG_MSG_LEN} bytes over SMTP "
        f"({rs_res['load_msgs_per_s']:.0f} msgs/s); catch-up {rs_res['resync_s']:.2f} s "
        f"(from the secondary's start: {rs_res['resync_s_from_process_start']:.2f} s)"
    )
    print(
        f"# disk: {rs_res['disk_seq_mb_per_s_before']:.0f} / "
        f"{rs_res['disk_seq_mb_per_s_after']:.0f} MB/s before / after the catch-up; "
        f"{rs_res['disk_seq_fsync_every_4mib_mb_per_s']:.0f}"
        " MB/s with an fsync every 4 MiB"
    )
    print(f"# elapsed {elapsed:.1f} s", flush=True)
    res["targets"] = {k: met(k, res[k]) for k in TARGETS}
    res["quick"] = plan.quick
    res["messages_per_run"] = n
    res["sessions"] = sess
    res["resync_load"] = f"SMTP (smtp-source -s {sess} -d), {BIG_MSG_LEN}-byte messages"
    res["elapsed_s"] = round(elapsed, 1)
    res["rss_mb"] = {k: round(v, 1) for k, v in rss.items()}
    res["tools"] = {
        "smtp-source": [
            "standalone_msgs_per_s",
            "replicated_msgs_per_s",
            "ratio",
            "ratio_unpinned",
            "primary_cpu_ms_per_msg",
            "secondary_cpu_ms_per_msg",
        ],
        "bench/smtp.py asyncio client": ["p99_ms_replicated", "p99_ms_standalone"],
        "bench/repl.py": ["resync_mb_per_s", "disk_seq_mb_per_s", "verify_mb_per_s"],
    }
    res["details"] = {
        **{
            name: [{k: round(v, 3) for k, v in m.items()} for m in ms]
            for name, ms in results.items()
        },
        "resync": {k: round(v, 3) for k, v in rs_res.items()},
        "round_ratios": [round(r, 3) for r in round_ratios],
        "round_ratios_unpinned": [round(r, 3) for r in unpinned_ratios],
    }
    res["placement"] = place.describe()
    return res


def met(key: str, value: float) -> bool:
    op, target = TARGETS[key]
    return value >= target if op == ">=" else value <= target


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="1000 msgs a turn, 5 rounds, 100 MB resync")
    p.add_argument("--keep", action="store_true", help="keep run/bench-repl-<pid>")
    p.add_argument(
        "--resync-only",
        metavar="MB",
        type=int,
        help="only the resync part, after the peer missed MB megabytes (for profiling)",
    )
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.resync_only is not None:
        plan = dataclasses.replace(plan, rounds=0, warmup=0, resync_bytes=args.resync_only * MB)
    result = run(plan, args.keep)
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
