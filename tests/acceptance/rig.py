"""The acceptance rig: two nodes and a witness in network namespaces, and the checker.

Network (test range 10.213.0.0/16; a blackhole route for it goes into the root namespace
*before* any namespace exists, so nothing of the rig can ever leave the machine; the root
namespace gets no rig address):

    host (10.213.1.10: witness, clients) ──veth── br: bridge "lan" ──veth── n1 (10.213.1.1)
                                                                  └──veth── n2 (10.213.1.2)
    n1 (10.213.2.1) ──────────── veth "rep0" (replication link) ──────────── n2 (10.213.2.2)

Heartbeat link 0 runs over the LAN, link 1 over the replication link; replication uses the
replication link; SMTP/POP3 listen on the LAN addresses. Partitions are nft rules inside a
node's namespace (table ``inet mhacc``). Nodes run as ``ip netns exec NS mailharbor serve``;
their admin sockets (Unix, path-named) are reached from the test process directly.

Names: namespaces and directories contain ``mh-test-<pytest pid>-`` (tests/conftest.py) and the
blackhole route carries ``proto 213 metric <pytest pid>``, so tools/cleanup.sh removes what a
killed run left. Everything is also torn down by the fixtures (routes last).

The checker (DESIGN.md, "How it is tested"): the load client records every attempt; every
acknowledged Message-ID must be on the final primary exactly once (:func:`check_final`); every
``250`` names the node and the term (``Ok: queued as QID (node n1 term 7)``), the node named is
the endpoint the client sent to (no proxy mode in the rig), a term is never named by two nodes,
and terms never interleave: no ack of an older term was sent after an ack of a newer term had
arrived (:func:`check_acks`). :func:`final_check` runs both, and checks that the messages that
are there unacknowledged (and a sample of the acknowledged ones) are whole.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mailharbor.admin.client import AdminClient, AdminClientError, NodeNotRunning
from mailharbor.admin.protocol import RequestError

BIN = Path(sys.executable).parent
MAILHARBOR = BIN / "mailharbor"
CLIENT = Path(__file__).with_name("client.py")
RUN_PREFIX = f"mh-test-{os.getpid()}-"  # the same as tests/conftest.py's
TEST_RANGE = "10.213.0.0/16"
ROUTE_PROTO = "213"
LAN = {"n1": "10.213.1.1", "n2": "10.213.1.2", "host": "10.213.1.10"}
REP = {"n1": "10.213.2.1", "n2": "10.213.2.2"}
SMTP_PORT, POP3_PORT, REPL_PORT, HB0, HB1, WITNESS_PORT = 2525, 1110, 7000, 7101, 7102, 7400
USER = "acc@example.org"
PASSWORD = "pw-acceptance-1"
_serial = itertools.count(1)


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


def wait_for(cond: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> None:
    """Poll `cond` until true; `what` (or what it returns, evaluated at the timeout) says what
    was awaited."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out ({timeout:.0f} s) waiting for: {text}")
        time.sleep(0.1)


def rig_available() -> str:
    """Empty if the rig can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs {tool} (tools/apt-packages.txt)"
    return ""


class Net:
    """The namespaces, links and the root namespace's blackhole route of one rig."""

    def __init__(self) -> None:
        self.prefix = f"{RUN_PREFIX}acc{next(_serial)}-{secrets.token_hex(2)}-"
        self.ns = {k: self.prefix + k for k in ("n1", "n2", "host", "br")}
        self.route = ("blackhole", TEST_RANGE, "proto", ROUTE_PROTO, "metric", str(os.getpid()))
        self._route_added = False

    def build(self) -> None:
        # Safety first: the whole test range goes nowhere from the root namespace.
        sh("ip", "route", "add", *self.route)
        self._route_added = True
        for ns in self.ns.values():
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        br = self.ns["br"]
        sh("ip", "-n", br, "link", "add", "lan", "type", "bridge")
        sh("ip", "-n", br, "link", "set", "lan", "up")
        for name in ("n1", "n2", "host"):
            ns, port = self.ns[name], f"v{name}"
            sh(
                "ip",
                "-n",
                ns,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                br,
            )
            sh("ip", "-n", br, "link", "set", port, "master", "lan", "up")
            sh("ip", "-n", ns, "addr", "add", f"{LAN[name]}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        n1, n2 = self.ns["n1"], self.ns["n2"]
        sh(
            "ip",
            "-n",
            n1,
            "link",
            "add",
            "rep0",
            "type",
            "veth",
            "peer",
            "name",
            "rep0",
            "netns",
            n2,
        )
        for name in ("n1", "n2"):
            sh("ip", "-n", self.ns[name], "addr", "add", f"{REP[name]}/24", "dev", "rep0")
            sh("ip", "-n", self.ns[name], "link", "set", "rep0", "up")
        # Fail early if the wiring is wrong.
        for src, dst in (("host", LAN["n1"]), ("host", LAN["n2"]), ("n1", REP["n2"])):
            probe = (
                "import socket; s = socket.socket(); s.settimeout(3); "
                f"print(s.connect_ex(('{dst}', 9)))"
            )
            r = sh(*self.exec(src, sys.executable, "-c", probe))
            if r.stdout.strip() != "111":  # ECONNREFUSED: the address answered
                raise RuntimeError(f"rig wiring: {src} -> {dst}: {r.stdout.strip()}")

    def teardown(self) -> None:
        for ns in self.ns.values():
            sh("ip", "netns", "delete", ns, check=False)
        if self._route_added:  # last: the route guards until nothing of the rig is left
            sh("ip", "route", "del", *self.route, check=False)
            self._route_added = False

    def exec(self, name: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[name], *cmd]

    # --- partitions (nft inside a namespace) ---

    def drop(self, name: str, *, iface: str | None = None) -> None:
        """Drop everything in and out of namespace `name` (except loopback), or only on
        `iface`."""
        match_in = f'iifname "{iface}" ' if iface else 'iifname != "lo" '
        match_out = f'oifname "{iface}" ' if iface else 'oifname != "lo" '
        rules = (
            "table inet mhacc {\n"
            f"  chain in {{ type filter hook input priority -10; {match_in}drop; }}\n"
            f"  chain out {{ type filter hook output priority -10; {match_out}drop; }}\n"
            "}\n"
        )
        r = subprocess.run(
            self.exec(name, "nft", "-f", "-"), input=rules, capture_output=True, text=True
        )
        if r.returncode != 0:
            raise RuntimeError(f"nft in {name}: {r.stderr}")

    def heal(self, name: str) -> None:
        sh(*self.exec(name, "nft", "delete", "table", "inet", "mhacc"), check=False)


class Proc:
    """A process in a namespace with its log file."""

    def __init__(self, net: Net, ns: str, cmd: list[str], log_path: Path) -> None:
        self.net, self.ns, self.cmd, self.log_path = net, ns, cmd, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            self.net.exec(self.ns, *self.cmd),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process dies too
            self.proc.kill()
            self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None


class Node(Proc):
    def __init__(self, net: Net, base: Path, name: str) -> None:
        self.name = name
        self.dir = base / name
        self.cfg = self.dir / "mailharbor.toml"
        sh(str(MAILHARBOR), "init", str(self.dir), "--hostname", "mail.example.org", "--name", name)
        self.node_id = str(tomllib.loads(self.cfg.read_text())["node"]["node_id"])
        self.admin = AdminClient(self.dir / "data" / "admin.sock", timeout=5)
        super().__init__(
            net, name, [str(MAILHARBOR), "serve", "--config", str(self.cfg)], self.dir / "serve.log"
        )

    def configure(self, sections: dict[str, dict[str, Any]]) -> None:
        text = self.cfg.read_text()
        for section, keys in sections.items():
            header = f"\n[{section}]\n"
            assert text.count(header) == 1, f"no single [{section}] in the template"
            body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
            text = text.replace(header, header + body)
        self.cfg.write_text(text)

    def cli(self, *args: str, stdin: str | None = None) -> None:
        r = subprocess.run(
            [str(MAILHARBOR), *args, "--config", str(self.cfg)],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, f"{args}: {r.stderr}"

    def status(self) -> dict[str, Any] | None:
        try:
            r = self.admin.call("cluster.status")
        except (AdminClientError, NodeNotRunning, RequestError, OSError):
            return None
        return r.result if r.ok and isinstance(r.result, dict) else None

    def role(self) -> str | None:
        st = self.status()
        return None if st is None else str(st["node"]["role"])


class Cluster:
    """n1 (first primary) and n2 in their namespaces, the witness in the host namespace."""

    def __init__(self, net: Net, tag: str) -> None:
        self.net = net
        self.base = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{tag}-"))
        secret = secrets.token_hex(16)
        self.nodes = {n: Node(net, self.base, n) for n in ("n1", "n2")}
        n1, n2 = self.nodes["n1"], self.nodes["n2"]
        wdir = self.base / "witness"
        wdir.mkdir()
        (wdir / "witness.toml").write_text(
            f'listen = "{LAN["host"]}:{WITNESS_PORT}"\nstate_dir = "state"\n[[pair]]\n'
            f'name = "{tag}"\nnodes = ["{n1.node_id}", "{n2.node_id}"]\nsecret = "{secret}"\n'
        )
        self.witness = Proc(
            net,
            "host",
            [str(MAILHARBOR), "witness", "--config", str(wdir / "witness.toml")],
            wdir / "witness.log",
        )
        for me, peer, role in ((n1, n2, "primary"), (n2, n1, "secondary")):
            m, p = me.name, peer.name
            me.configure(
                {
                    "smtp": {"mx": [f"{LAN[m]}:{SMTP_PORT}"], "reverse_dns": False},
                    "pop3": {"listen": [f"{LAN[m]}:{POP3_PORT}"], "allow_plaintext_auth": True},
                    "replication": {
                        "peer": f"{REP[p]}:{REPL_PORT}",
                        "listen": f"{REP[m]}:{REPL_PORT}",
                        "secret": secret,
                        "role": role,
                        "fencing": "resource-only",
                        "ping_interval": "500ms",
                        "ping_timeout": "1500ms",
                        "ack_timeout": "3s",
                    },
                    "cluster": {  # default timings
                        "links": [
                            [f"{LAN[m]}:{HB0}", f"{LAN[p]}:{HB0}"],
                            [f"{REP[m]}:{HB1}", f"{REP[p]}:{HB1}"],
                        ],
                        "name": tag,
                        "peer_node_id": peer.node_id,
                        "peer_name": p,
                        "witness": f"{LAN['host']}:{WITNESS_PORT}",
                        "preferred": n1.node_id,
                    },
                }
            )
        n1.cli("domain", "add", "example.org")
        n1.cli("account", "add", USER, "--password-stdin", stdin=PASSWORD + "\n")

    def start(self) -> None:
        self.witness.start()
        wait_for(lambda: "listening" in self.witness.log, 15, "witness listening")
        for n in self.nodes.values():
            n.start()
        wait_for(lambda: self.settled("n1", "n2"), 45, "n1 Primary, n2 Secondary in sync")

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

    def pop3_ids(self, node: str) -> list[str]:
        ids: list[str] = self._pop3(node)
        return ids

    def pop3_whole(self, node: str, mids: list[str]) -> tuple[list[str], list[str]]:
        """The mailbox's Message-IDs, and which of `mids` are not whole there (fetched with
        RETR and compared with what the load client sent)."""
        path = self.base / f"whole-{secrets.token_hex(4)}.json"
        path.write_text(json.dumps(mids))
        out: dict[str, list[str]] = self._pop3(node, "--whole", str(path))
        return out["ids"], out["broken"]

    def _pop3(self, node: str, *extra: str) -> Any:
        r = subprocess.run(
            self.net.exec(
                "host",
                sys.executable,
                str(CLIENT),
                "pop3",
                "--target",
                f"{LAN[node]}:{POP3_PORT}",
                *extra,
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, f"pop3 on {node}: {r.stderr[-2000:]}"
        return json.loads(r.stdout)

    def dump(self) -> str:
        parts = [f"=== {k}\n{n.log[-8000:]}" for k, n in self.nodes.items()]
        parts.append(f"=== witness\n{self.witness.log[-3000:]}")
        return "\n".join(parts)

    def cleanup(self) -> None:
        for n in self.nodes.values():
            n.kill()
        self.witness.kill()
        shutil.rmtree(self.base, ignore_errors=True)


# --- load and the checker ---------------------------------------------------------------------


@contextmanager
def running_cluster(net: Net, tag: str, *, imap_port: int | None = None) -> Iterator[Cluster]:
    """A started cluster on ``net`` (with ``imap_port``: IMAP on both nodes' LAN addresses);
    its logs are printed when the block fails; the nodes are healed and cleaned up at the end."""
    c = Cluster(net, tag)
    try:
        if imap_port is not None:
            for name, n in c.nodes.items():
                listen = [f"{LAN[name]}:{imap_port}"]
                n.configure({"imap": {"listen": listen, "allow_plaintext_auth": True}})
        c.start()
        yield c
    except BaseException:
        print(c.dump())
        raise
    finally:
        for name in ("n1", "n2"):
            net.heal(name)
        c.cleanup()


class Probe(Proc):
    """`client.py probe` from the host against ``target`` (n1 unless told): one SMTP session
    that sends a message up to its final "." and waits for ``go`` (a file) to send the dot,
    plus an idle session (and an idle IMAP session with ``imap``); its events (``ready``,
    ``dot-sent``, ``dot``, ``idle``...) are JSON lines in ``out``."""

    def __init__(
        self, net: Net, cluster: Cluster, mid: str, *, imap: str | None = None, target: str = "n1"
    ) -> None:
        self.mid = mid
        self.out = cluster.base / f"probe-{target}.jsonl"
        self.go = cluster.base / f"probe-{target}.go"
        cmd = [sys.executable, str(CLIENT), "probe", "--target", f"{LAN[target]}:{SMTP_PORT}"]
        cmd += ["--mid", mid, "--out", str(self.out), "--go-file", str(self.go)]
        if imap is not None:
            cmd += ["--imap", imap]
        super().__init__(net, "host", cmd, cluster.base / f"probe-{target}.log")

    def events(self) -> dict[str, dict[str, Any]]:
        if not self.out.exists():
            return {}
        return {d["ev"]: d for d in map(json.loads, self.out.read_text().splitlines())}

    def wait_ready(self) -> None:
        wait_for(lambda: "ready" in self.events(), 15, lambda: f"probe ready: {self.log}")


@dataclass(frozen=True, slots=True)
class Ev:
    ev: str
    mid: str
    node: str  # the endpoint the client sent to
    t: float  # time.monotonic() when the reply arrived
    code: int
    named: str = ""  # the node the 250 names ("" if none)
    term: int = -1  # the term the 250 names (-1 if none)
    reply: str = ""
    stage: str = ""  # a failure: where the session ended (client.py)
    err: str = ""  # a failure without a reply (code 0): the client's exception
    sent: float = 0.0  # an ack: when the client sent DATA (the server decided after this)

    @property
    def broken_session(self) -> bool:
        """A failure without a reply after the greeting: the server reset or closed a session
        instead of answering it (``421`` / a ``4xx`` is the graceful way)."""
        return self.ev == "fail" and self.code == 0 and self.stage not in ("", "connect")


class Load:
    """The `load` client in the host namespace against both nodes' SMTP endpoints."""

    def __init__(self, cluster: Cluster, tag: str, seed: int, per_node: int = 2) -> None:
        self.out = cluster.base / f"load-{tag}.jsonl"
        self.stop_file = cluster.base / f"load-{tag}.stop"
        targets = [f"--target={n}={LAN[n]}:{SMTP_PORT}" for n in ("n1", "n2")]
        self.proc = Proc(
            cluster.net,
            "host",
            [
                sys.executable,
                str(CLIENT),
                "load",
                *targets,
                "--tag",
                tag,
                "--seed",
                str(seed),
                "--per-node",
                str(per_node),
                "--out",
                str(self.out),
                "--stop-file",
                str(self.stop_file),
            ],
            cluster.base / f"load-{tag}.log",
        )

    def __enter__(self) -> Load:
        self.proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_file.touch()
        assert self.proc.proc is not None
        try:
            self.proc.proc.wait(30)
        finally:
            self.proc.kill()

    def events(self) -> list[Ev]:
        evs = []
        if not self.out.exists():
            return []
        for line in self.out.read_text().splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue  # a line being written
            if d["ev"] in ("ack", "fail"):
                evs.append(
                    Ev(
                        d["ev"],
                        d["mid"],
                        d["node"],
                        d["t"],
                        d.get("code", 250),
                        d.get("named", ""),
                        d.get("term", -1),
                        d.get("reply", ""),
                        d.get("stage", ""),
                        d.get("err", ""),
                        d.get("sent", d["t"]),
                    )
                )
        return evs

    def fails(self, node: str | None = None, after: float = 0.0) -> list[Ev]:
        return [
            e
            for e in self.events()
            if e.ev == "fail" and (node is None or e.node == node) and e.t >= after
        ]

    def acks(self, node: str | None = None, after: float = 0.0) -> list[Ev]:
        return [
            e
            for e in self.events()
            if e.ev == "ack" and (node is None or e.node == node) and e.t >= after
        ]


@dataclass
class Verdict:
    acked: int
    lost: list[str]
    duplicated: list[str]
    unacked_present: int


def check_final(acked: list[str], have: list[str]) -> Verdict:
    """Acknowledged → exactly once on the final primary."""
    counts = Counter(have)
    acked_set = set(acked)
    return Verdict(
        acked=len(acked_set),
        lost=sorted(m for m in acked_set if counts[m] == 0),
        duplicated=sorted(m for m, c in counts.items() if c > 1),
        unacked_present=len(counts.keys() - acked_set),
    )


@dataclass(frozen=True, slots=True)
class Run:
    """Consecutive acks (by arrival time) naming the same node and term."""

    node: str
    term: int
    count: int
    first: float
    last: float


def ack_segments(acks: list[Ev]) -> list[Run]:
    """The acks in arrival order, as runs of the same (named node, term)."""
    runs: list[Run] = []
    for e in sorted(acks, key=lambda e: e.t):
        if runs and (runs[-1].node, runs[-1].term) == (e.named, e.term):
            r = runs[-1]
            runs[-1] = Run(r.node, r.term, r.count + 1, r.first, e.t)
        else:
            runs.append(Run(e.named, e.term, 1, e.t, e.t))
    return runs


def check_acks(acks: list[Ev]) -> list[str]:
    """The checker's rules for the 250s themselves; the problems found (empty: all good).

    - every 250 names a node and a term;
    - the node named is the node the client sent to (the checker's view of who acknowledged);
    - one term, one node: no term is named by two nodes;
    - terms never interleave: no ack of a term was decided after an ack of a newer term. A
      server decides between the client's DATA (``sent``) and the 250's arrival (``t``), so
      the violation the clients can prove is an ack of term T1 *sent* after an ack of a newer
      term T2 had *arrived*. (A 250 decided before a fault and delivered after it — a TCP
      retransmission once a partition heals, a reply written as a paused process resumes —
      arrives late but is no interleaving.)"""
    problems: list[str] = []
    owner: dict[int, str] = {}
    first_arrival: dict[int, Ev] = {}
    for e in sorted(acks, key=lambda e: e.t):
        if not e.named or e.term < 0:
            problems.append(f"{e.mid}: the 250 names no node and term: {e.reply!r}")
            continue
        if e.named != e.node:
            problems.append(f"{e.mid}: sent to {e.node}, the 250 names {e.named}")
        if owner.setdefault(e.term, e.named) != e.named:
            problems.append(f"{e.mid}: term {e.term} named by {owner[e.term]} and {e.named}")
        first_arrival.setdefault(e.term, e)
    for e in acks:
        newer = [f for term, f in first_arrival.items() if term > e.term and f.t < e.sent]
        if e.term >= 0 and newer:
            f = min(newer, key=lambda f: f.t)
            problems.append(
                f"{e.mid}: term {e.term} from {e.named} sent at {e.sent:.3f}, after term "
                f"{f.term} from {f.named} had acknowledged at {f.t:.3f}"
            )
    return problems


def runs_text(acks: list[Ev]) -> str:
    return ", ".join(f"{r.node}/t{r.term} x{r.count}" for r in ack_segments(acks))


def seed_for(mailharbor_seed: int, name: str) -> int:
    """A seed for one test's load, derived from the run's seed (printed)."""
    seed = random.Random(f"{mailharbor_seed}:{name}").randrange(2**32)
    print(f"seed for {name}: {seed} (from run seed {mailharbor_seed})")
    return seed


#: How many acknowledged messages final_check fetches whole (besides every unacknowledged one).
WHOLE_SAMPLE = 20


def final_check(
    cluster: Cluster,
    load: Load,
    primary: str,
    *,
    min_acked: int = 10,
) -> Verdict:
    """The whole checker over `load` with `primary` the final primary: the 250s
    (:func:`check_acks`); every acknowledged Message-ID exactly once in its mailbox; every
    message there that was not acknowledged, and a seeded sample of the acknowledged ones,
    whole (byte for byte what was sent)."""
    acks = load.acks()
    problems = check_acks(acks)
    acked = {e.mid for e in acks}
    tried = {e.mid for e in load.events()}
    # Whole: every message that is there unacknowledged, and a sample of the acknowledged ones.
    sample = random.sample(sorted(acked), min(WHOLE_SAMPLE, len(acked)))
    have, broken = cluster.pop3_whole(primary, sorted(tried - acked) + sample)
    v = check_final(sorted(acked), have)
    print(
        f"checker: {v.acked} acknowledged, lost {len(v.lost)}, duplicated "
        f"{len(v.duplicated)}, unacknowledged but present {v.unacked_present}; "
        f"ack runs (node/term x count): {runs_text(acks)}"
    )
    assert not problems, f"{len(problems)} bad acknowledgements: {problems[:5]}"
    assert not broken, f"messages present but not whole: {broken[:5]}"
    assert v.acked >= min_acked, "too little load got through"
    assert not v.lost, f"acknowledged but lost: {v.lost[:5]}\n{cluster.dump()}"
    assert not v.duplicated, f"duplicated: {v.duplicated[:5]}"
    return v


def rejoin(cluster: Cluster, node: str, primary: str, timeout: float = 40) -> None:
    """`node` must come back as Secondary (restarted if it exited) and resync."""
    n = cluster.nodes[node]

    def rejoined() -> bool:
        if not n.alive():  # self-fenced (exit 75): an operator or systemd restarts it
            last = n.log.splitlines()[-1][-160:] if n.log else ""
            print(f"{node} exited ({last}); restarting it")
            n.kill()
            n.start()
        return cluster.settled(primary, node)

    try:
        wait_for(rejoined, timeout, f"{node} Secondary in sync")
    except AssertionError as e:
        st = {k: v.status() for k, v in cluster.nodes.items()}
        raise AssertionError(f"{e}\nstatus: {json.dumps(st)[:6000]}\n{cluster.dump()}") from None


@contextmanager
def rig() -> Iterator[Net]:
    net = Net()
    try:
        net.build()
        yield net
    finally:
        net.teardown()
