"""Failover benchmark: kill -9 of the primary under SMTP load, again and again.

Run from the repository root as root (see bench/README.md, section bench/failover.py)::

    python bench/failover.py [--quick] [--seed N] [--runs N] [--keep]

One cluster on loopback with the default cluster timings: nodes a and b (`mailharbor serve`, a
starts as the first primary) and a `mailharbor witness`. Sender threads (two per node) send SMTP
to both nodes' endpoints all the time, each message with its own Message-ID; every `250` is
recorded with its endpoint (node) and time. The standby refuses mail (no proxy mode yet): only
the `250`s count. A run: SIGKILL the primary; the failover time is from the kill to the first
`250` on the survivor's endpoint; then the killed node is restarted, must come back as
Secondary and resync (UpToDate, the primary's writes confirmed by it) before the next run,
which kills the other node. At the end the load stops and every acknowledged Message-ID is
looked up over POP3 on the final primary.

Human lines on stderr; the last line of stdout is one JSON object: runs, failover_s_median,
failover_s_max, failover_s (each run), acked, acked_lost, duplicates, unacked_present, seed.
"""

from __future__ import annotations

import argparse
import json
import os
import poplib
import random
import secrets
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import BIN, free_port, log
from mailharbor.admin.client import AdminClient, AdminClientError, NodeNotRunning
from mailharbor.admin.protocol import RequestError

MAILHARBOR = BIN / "mailharbor"
USER = "bench@example.org"
PASSWORD = "pw-failover-bench-1"
TARGET_MEDIAN_S = 3.0


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out ({timeout:.0f} s) waiting for: {what}")
        time.sleep(0.1)


# --- the cluster ------------------------------------------------------------------------------


class Node:
    """A `mailharbor init` directory and, while started, its `mailharbor serve` process."""

    def __init__(self, base: Path, name: str) -> None:
        self.name = name
        self.dir = base / name
        self.cfg = self.dir / "mailharbor.toml"
        self.smtp, self.pop3, self.repl = free_port(), free_port(), free_port()
        self.hb = (free_port(), free_port())
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin = AdminClient(self.dir / "data" / "admin.sock", timeout=5)
        subprocess.run(
            [
                str(MAILHARBOR),
                "init",
                str(self.dir),
                "--hostname",
                "mail.example.org",
                *("--name", name),
            ],
            check=True,
            capture_output=True,
        )
        self.node_id = str(tomllib.loads(self.cfg.read_text())["node"]["node_id"])

    def configure(self, sections: dict[str, dict[str, Any]]) -> None:
        text = self.cfg.read_text()
        for section, keys in sections.items():
            header = f"\n[{section}]\n"
            if text.count(header) != 1:
                raise RuntimeError(f"no single [{section}] in {self.cfg}")
            body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
            text = text.replace(header, header + body)
        self.cfg.write_text(text)

    def cli(self, *args: str, stdin: bytes | None = None) -> None:
        r = subprocess.run(
            [str(MAILHARBOR), *args, "--config", str(self.cfg)],
            input=stdin,
            capture_output=True,
            check=False,
        )
        if r.returncode != 0:
            raise RuntimeError(f"mailharbor {' '.join(args)}: {r.stderr.decode().strip()}")

    def start(self) -> None:
        with (self.dir / "serve.log").open("ab") as logf:
            self.proc = subprocess.Popen(
                [str(MAILHARBOR), "serve", "--config", str(self.cfg)],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()

    def status(self) -> dict[str, Any] | None:
        try:
            r = self.admin.call("cluster.status")
        except (AdminClientError, NodeNotRunning, RequestError, OSError):
            return None
        return r.result if r.ok and isinstance(r.result, dict) else None

    def log_tail(self, n: int = 4000) -> str:
        p = self.dir / "serve.log"
        return p.read_text("utf-8", "replace")[-n:] if p.exists() else ""


class Witness:
    def __init__(self, base: Path, tag: str, ids: tuple[str, str], secret: str) -> None:
        self.dir = base / "witness"
        self.dir.mkdir()
        self.port = free_port()
        self.cfg = self.dir / "witness.toml"
        self.cfg.write_text(
            f'listen = "127.0.0.1:{self.port}"\nstate_dir = "state"\n[[pair]]\n'
            f'name = "{tag}"\nnodes = ["{ids[0]}", "{ids[1]}"]\nsecret = "{secret}"\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        logp = self.dir / "witness.log"
        with logp.open("ab") as logf:
            self.proc = subprocess.Popen(
                [str(MAILHARBOR), "witness", "--config", str(self.cfg)],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_for(lambda: "listening" in logp.read_text("utf-8", "replace"), 15, "witness")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Cluster:
    def __init__(self, base: Path, tag: str) -> None:
        secret = secrets.token_hex(16)
        self.nodes = {n: Node(base, n) for n in ("a", "b")}
        a, b = self.nodes["a"], self.nodes["b"]
        self.witness = Witness(base, tag, (a.node_id, b.node_id), secret)
        for me, peer, role in ((a, b, "primary"), (b, a, "secondary")):
            me.configure(
                {
                    "smtp": {"mx": [f"127.0.0.1:{me.smtp}"]},
                    "pop3": {"listen": [f"127.0.0.1:{me.pop3}"], "allow_plaintext_auth": True},
                    "replication": {
                        "peer": f"127.0.0.1:{peer.repl}",
                        "listen": f"127.0.0.1:{me.repl}",
                        "secret": secret,
                        "role": role,
                        "fencing": "resource-only",
                        "ping_interval": "500ms",
                        "ping_timeout": "1500ms",
                        "ack_timeout": "3s",
                    },
                    "cluster": {  # default timings: none set here
                        "links": [
                            [f"127.0.0.1:{me.hb[i]}", f"127.0.0.1:{peer.hb[i]}"] for i in (0, 1)
                        ],
                        "name": tag,
                        "peer_node_id": peer.node_id,
                        "peer_name": peer.name,
                        "witness": f"127.0.0.1:{self.witness.port}",
                        "preferred": a.node_id,
                    },
                }
            )
        a.cli("domain", "add", "example.org")
        a.cli("account", "add", USER, "--password-stdin", stdin=PASSWORD.encode() + b"\n")

    def settled(self, primary: str, secondary: str) -> bool:
        p, s = self.nodes[primary].status(), self.nodes[secondary].status()
        return bool(
            p
            and s
            and p["node"]["role"] == "Primary"
            and p["node"]["resources"] == "started"
            and p["node"]["can_ack"]
            and p["replication"]["peer_confirms_writes"]
            and s["node"]["role"] == "Secondary"
            and s["node"]["disk"] == "UpToDate"
        )

    def stop(self) -> None:
        for n in self.nodes.values():
            n.stop()
        self.witness.kill()


# --- load and the checker ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    mid: str
    node: str  # the endpoint that answered 250 (the acceptance checker also reads node+term)
    t: float  # time.monotonic() when the 250 arrived


def message(mid: str, size: int) -> bytes:
    body = (f"{mid} " * (size // (len(mid) + 1) + 1))[:size]
    lines = "\r\n".join(body[i : i + 70] for i in range(0, len(body), 70))
    return (
        f"From: x@remote.test\r\nTo: {USER}\r\nSubject: {mid}\r\nMessage-ID: <{mid}>\r\n\r\n"
        f"{lines}\r\n"
    ).encode()


@dataclass
class Load:
    """Sender threads against both endpoints; every 250 recorded as an `Ack`."""

    ports: dict[str, int]
    seed: int
    tag: str
    per_node: int = 2
    acks: list[Ack] = field(default_factory=list)
    attempts: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _run(self, node: str, k: int) -> None:
        rng = random.Random(f"{self.seed}:{node}:{k}")
        n = 0
        while not self._stop.is_set():
            n += 1
            mid = f"{self.tag}-{node}{k}-{n}@failover.bench"
            with self._lock:
                self.attempts += 1
            try:
                with smtplib.SMTP("127.0.0.1", self.ports[node], timeout=10) as c:
                    c.sendmail("x@remote.test", [USER], message(mid, rng.choice([300, 2000, 8000])))
                t = time.monotonic()
                with self._lock:
                    self.acks.append(Ack(mid, node, t))
            except (OSError, smtplib.SMTPException):
                time.sleep(0.01)

    def __enter__(self) -> Load:
        for node in self.ports:
            for k in range(self.per_node):
                th = threading.Thread(target=self._run, args=(node, k), daemon=True)
                self._threads.append(th)
                th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(30)

    def first_ack(self, node: str, after: float) -> float | None:
        with self._lock:
            ts = [a.t for a in self.acks if a.node == node and a.t >= after]
        return min(ts) if ts else None


def pop3_message_ids(port: int) -> list[str]:
    p = poplib.POP3("127.0.0.1", port, timeout=60)
    try:
        p.user(USER)
        p.pass_(PASSWORD)
        count = len(p.list()[1])
        ids = []
        for i in range(1, count + 1):
            for line in p.top(i, 0)[1]:
                if line.lower().startswith(b"message-id:"):
                    ids.append(line.split(b"<", 1)[1].split(b">", 1)[0].decode())
        return ids
    finally:
        p.quit()


# --- main -------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="3 runs (under 60 s)")
    ap.add_argument("--runs", type=int, default=0, help="number of kills (default 10, quick 3)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the node directories")
    args = ap.parse_args()
    runs = args.runs or (3 if args.quick else 10)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    log(f"failover bench: seed {seed} (reproduce with --seed {seed}), {runs} runs")
    tag = f"mhfo-{os.getpid()}-{secrets.token_hex(2)}"
    base = Path(tempfile.mkdtemp(prefix=f"mh-bench-failover-{os.getpid()}-"))
    t_start = time.monotonic()
    cluster = Cluster(base, tag)
    failovers: list[float] = []
    rejoins: list[float] = []
    result: dict[str, Any] = {}
    try:
        cluster.witness.start()
        for n in cluster.nodes.values():
            n.start()
        wait_for(lambda: cluster.settled("a", "b"), 40, "a Primary, b Secondary in sync")
        log(f"cluster up in {time.monotonic() - t_start:.1f} s")
        primary, secondary = "a", "b"
        ports = {name: n.smtp for name, n in cluster.nodes.items()}
        with Load(ports, seed, tag) as load:
            time.sleep(1.0)
            for run in range(1, runs + 1):
                victim, survivor = cluster.nodes[primary], cluster.nodes[secondary]
                killed_at = time.monotonic()
                victim.kill()
                wait_for(
                    lambda s=secondary, k=killed_at: load.first_ack(s, k) is not None,  # type: ignore[misc]
                    30,
                    f"run {run}: a 250 from {secondary}",
                )
                first = load.first_ack(secondary, killed_at)
                assert first is not None
                failovers.append(first - killed_at)
                log(
                    f"run {run}: killed {primary}, first 250 from {secondary} after "
                    f"{failovers[-1]:.2f} s"
                )
                t_rejoin = time.monotonic()
                victim.start()
                wait_for(
                    lambda p=secondary, s=primary: cluster.settled(p, s),  # type: ignore[misc]
                    60,
                    f"run {run}: {primary} back as Secondary, UpToDate, in sync",
                )
                rejoins.append(time.monotonic() - t_rejoin)
                log(f"run {run}: {primary} rejoined as Secondary in {rejoins[-1]:.1f} s")
                status = survivor.status()
                assert status is not None
                primary, secondary = secondary, primary
                time.sleep(0.5)
        acks = list(load.acks)
        wait_for(lambda: cluster.settled(primary, secondary), 30, "final sync")
        have = pop3_message_ids(cluster.nodes[primary].pop3)
        counts = Counter(have)
        acked = {a.mid for a in acks}
        lost = sorted(acked - counts.keys())
        duplicates = sum(c - 1 for c in counts.values() if c > 1)
        unacked_present = len(counts.keys() - acked)
        per_node = Counter(a.node for a in acks)
        log(
            f"{len(acks)} acknowledged ({dict(per_node)}) of {load.attempts} attempts; "
            f"{len(have)} messages on the final primary {primary}; lost {len(lost)} "
            f"{lost[:5]}; duplicates {duplicates}; unacknowledged but present {unacked_present}"
        )
        log(
            f"failover s: {[round(f, 2) for f in failovers]}; rejoin s: "
            f"{[round(r, 1) for r in rejoins]}; total {time.monotonic() - t_start:.1f} s"
        )
        result = {
            "bench": "failover",
            "quick": bool(args.quick),
            "seed": seed,
            "runs": len(failovers),
            "failover_s_median": round(statistics.median(failovers), 3),
            "failover_s_max": round(max(failovers), 3),
            "failover_s": [round(f, 3) for f in failovers],
            "rejoin_s_median": round(statistics.median(rejoins), 2),
            "acked": len(acks),
            "acked_lost": len(lost),
            "duplicates": duplicates,
            "unacked_present": unacked_present,
            "final_primary": primary,
            "target_failover_s_median": TARGET_MEDIAN_S,
            "ok": bool(
                not lost and not duplicates and statistics.median(failovers) <= TARGET_MEDIAN_S
            ),
            "wall_s": round(time.monotonic() - t_start, 1),
        }
    except BaseException:
        for name, n in cluster.nodes.items():
            log(f"=== log of {name}\n{n.log_tail()}")
        raise
    finally:
        cluster.stop()
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(result, sort_keys=True))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
