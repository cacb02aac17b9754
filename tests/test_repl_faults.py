"""Faults on a replicating pair of real ``mailharbor serve`` processes.

- A slow peer (its whole process frozen with the cgroup v2 freezer, in a fresh cgroup named
  with the run prefix) never makes protocol C acknowledge early: the ``250`` of a message sent
  while the secondary is frozen comes only after the primary dropped the link (``ack_timeout``;
  fencing ``dont-care`` then lets the write go on alone) — never while the link still stands
  with the peer's durable LSN short of the message. Thawed, the secondary catches up.
- Packet loss on the replication link: the two nodes in network namespaces (tests/acceptance/
  rig.py's network, its blackhole route first; no cluster manager, no witness), nft
  ``numgen random mod 100 < 10`` drops on the link both ways under SMTP load; after a clean stop
  of the primary and a promotion, every acknowledged message is on the secondary exactly once.
- kill -9 of the primary at a seeded random moment under SMTP load and an IMAP client (APPEND,
  UID STORE +FLAGS, UID EXPUNGE) in a thread: after the promotion of the secondary every
  acknowledged message and APPEND is there exactly once, acknowledged flags are set and
  acknowledged expunges are gone. The seed is printed (``MAILHARBOR_SEED`` reproduces it).
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from acceptance.rig import (
    LAN,
    POP3_PORT,
    REP,
    REPL_PORT,
    RUN_PREFIX,
    SMTP_PORT,
    Cluster,
    Net,
    Node,
    check_final,
    rig,
    rig_available,
)
from acceptance.rig import PASSWORD as RIG_PASSWORD
from acceptance.rig import USER as RIG_USER
from fault.disks import unavailable
from mailharbor.admin.client import AdminClient, AdminClientError, NodeNotRunning
from mailharbor.admin.protocol import RequestError
from servenode import MAILHARBOR
from test_repl_nodes import (
    PASSWORD,
    USER,
    Load,
    Pair,
    in_sync,
    message,
    pop3_message_ids,
    refuses,
    send,
    status,
    wait_for,
)

# --- the cgroup v2 freezer ----------------------------------------------------------------------


def cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


def _cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"process {pid} is in no cgroup v2")


class Freezer:
    """A fresh cgroup (named with the run prefix) under the cgroup2 mount for one process."""

    def __init__(self, name: str) -> None:
        mount = cgroup2_mount()
        if mount is None or os.geteuid() != 0:
            unavailable("needs root and a cgroup2 mount (the cgroup freezer)")
        self.mount = mount
        self.dir = mount / name
        self.dir.mkdir()
        if not (self.dir / "cgroup.freeze").exists():
            self.dir.rmdir()
            unavailable("cgroup v2 without cgroup.freeze")
        self.pid: int | None = None
        self.home = ""

    def _frozen(self) -> bool:
        return "frozen 1" in (self.dir / "cgroup.events").read_text()

    def freeze(self, pid: int) -> None:
        self.home = _cgroup_of(pid)
        (self.dir / "cgroup.procs").write_text(str(pid))
        self.pid = pid
        (self.dir / "cgroup.freeze").write_text("1")
        wait_for(self._frozen, 10, "the cgroup frozen")

    def thaw(self) -> None:
        (self.dir / "cgroup.freeze").write_text("0")
        wait_for(lambda: not self._frozen(), 10, "the cgroup thawed")

    def cleanup(self) -> None:
        if not self.dir.exists():
            return
        (self.dir / "cgroup.freeze").write_text("0")
        home = self.mount / self.home.lstrip("/")
        for pid in (self.dir / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):  # gone meanwhile
                (home / "cgroup.procs").write_text(pid)
        for _ in range(50):
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        self.dir.rmdir()


# --- a pair on loopback with IMAP too (test_repl_nodes.Pair) ------------------------------------


def _tag(request: pytest.FixtureRequest) -> str:
    name = "".join(c for c in request.node.name if c.isalnum())
    return name[-16:] + secrets.token_hex(2)


# --- (a) a frozen secondary and protocol C --------------------------------------------------------

ACK_TIMEOUT = 2.0


@pytest.mark.slow
def test_frozen_secondary_never_makes_protocol_c_acknowledge_early(
    request: pytest.FixtureRequest,
) -> None:
    pair = Pair(
        _tag(request),
        replication={
            "fencing": "dont-care",
            "ping_interval": "500ms",
            "ping_timeout": "4s",  # the ack timeout, not the pings, drops the frozen peer
            "ack_timeout": f"{ACK_TIMEOUT}s",
        },
        imap=True,
        prefix=RUN_PREFIX,
    )
    freezer: Freezer | None = None
    try:
        pair.start()
        assert send(pair.smtp["a"], "warm@t.test", 500)
        wait_for(lambda: in_sync(pair.a, pair.b), 10, "in sync")
        assert pair.b.proc is not None
        freezer = Freezer(f"{RUN_PREFIX}frz-{secrets.token_hex(3)}")
        freezer.freeze(pair.b.proc.pid)
        before = status(pair.a)
        acked_at: list[float] = []

        def client() -> None:
            if send(pair.smtp["a"], "frozen@t.test", 1_000):
                acked_at.append(time.monotonic())

        t0 = time.monotonic()
        sender = threading.Thread(target=client, daemon=True)
        sender.start()
        # Poll the primary while the peer is frozen (never the frozen secondary itself).
        polls: list[tuple[float, dict[str, Any]]] = []
        admin = AdminClient(pair.a.root / "data" / "admin.sock", timeout=10)
        while sender.is_alive() and time.monotonic() - t0 < 30:
            t = time.monotonic()
            resp = admin.call("repl.status")
            assert resp.ok and isinstance(resp.result, dict), resp
            polls.append((t, resp.result))
            time.sleep(0.02)
        sender.join(1)
        assert acked_at, "no 250 for the message sent while the peer was frozen"
        t_ack = acked_at[0]
        assert t_ack - t0 >= ACK_TIMEOUT * 0.9, f"250 after {t_ack - t0:.2f} s"
        linked = [
            (t, st)
            for t, st in polls
            if st["replication"] == "Established" and st["connection"] == "Connected"
        ]
        # While the link stood, the peer's durable LSN never reached the new message; no poll
        # that began after the 250 still saw the link standing.
        assert linked, "the link was never seen up while the peer was frozen"
        for _, st in linked:
            assert st["peer_durable_lsn"] == before["last_lsn"], st
        assert all(t < t_ack for t, _ in linked), "a 250 while the link to the peer stood"
        # The peer is still frozen: the link cannot have come back since.
        after = status(pair.a)
        assert after["connection"] != "Connected", after
        assert after.get("peer_durable_lsn", before["last_lsn"]) == before["last_lsn"], after
        assert "ack-timeout" in str(after["last_link_lost"]), after
        print(
            f"250 after {t_ack - t0:.2f} s; link seen up until {linked[-1][0] - t0:.2f} s "
            f"({len(polls)} polls)"
        )
        assert after["last_lsn"] > before["last_lsn"]
        assert "link to the peer lost" in pair.a.log
        assert "ack-timeout" in pair.a.log, pair.a.log[-3000:]
        # Thawed, the secondary reconnects and catches up.
        freezer.thaw()
        t1 = time.monotonic()
        assert send(pair.smtp["a"], "after@t.test", 700)
        wait_for(lambda: in_sync(pair.a, pair.b), 30, "the thawed secondary caught up")
        print(f"caught up {time.monotonic() - t1:.2f} s after the thaw")
        pair.a.stop()
        r = pair.b.try_cli("repl", "primary")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: not refuses(pair.pop3["b"]), 10, "POP3 on b")
        assert sorted(pop3_message_ids(pair.pop3["b"])) == sorted(
            ["warm@t.test", "frozen@t.test", "after@t.test"]
        )
    except BaseException:
        pair.dump()
        raise
    finally:
        if freezer is not None:
            freezer.cleanup()
        pair.cleanup()


# --- (b) packet loss on the replication link -----------------------------------------------------


class ReplPair(Cluster):
    """n1 (primary) and n2 (secondary) in the rig's namespaces, replication only: no cluster
    manager, no witness (Cluster's network, load client and POP3 reader are reused)."""

    def __init__(self, net: Net, tag: str) -> None:  # no witness: Cluster.__init__ not called
        self.net = net
        self.base = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{tag}-"))
        secret = secrets.token_hex(16)
        self.nodes = {n: Node(net, self.base, n) for n in ("n1", "n2")}
        for me, peer, role in (("n1", "n2", "primary"), ("n2", "n1", "secondary")):
            self.nodes[me].configure(
                {
                    "smtp": {"mx": [f"{LAN[me]}:{SMTP_PORT}"], "reverse_dns": False},
                    "pop3": {"listen": [f"{LAN[me]}:{POP3_PORT}"], "allow_plaintext_auth": True},
                    "replication": {
                        "peer": f"{REP[peer]}:{REPL_PORT}",
                        "listen": f"{REP[me]}:{REPL_PORT}",
                        "secret": secret,
                        "role": role,
                        "protocol": "C",
                        "fencing": "dont-care",
                        "ping_interval": "500ms",
                        "ping_timeout": "3s",
                        "ack_timeout": "5s",
                    },
                }
            )
        n1 = self.nodes["n1"]
        n1.cli("domain", "add", "example.org")
        n1.cli("account", "add", RIG_USER, "--password-stdin", stdin=RIG_PASSWORD + "\n")

    def repl_status(self, name: str) -> dict[str, Any]:
        """``repl status`` over the admin socket only: the CLI would open a node that does not
        answer yet offline, and its data-directory lock would make a starting ``serve`` fail."""
        try:
            resp = self.nodes[name].admin.call("repl.status")
        except (AdminClientError, NodeNotRunning, RequestError, OSError) as e:
            raise AssertionError(f"repl.status on {name}: {e!r}") from None
        assert resp.ok and isinstance(resp.result, dict), resp
        st: dict[str, Any] = resp.result
        return st

    def up(self, name: str) -> bool:
        assert self.nodes[name].alive(), self.nodes[name].log[-3000:]
        return self.nodes[name].admin.answers()

    def in_sync(self) -> bool:
        try:
            p, s = self.repl_status("n1"), self.repl_status("n2")
        except AssertionError:
            return False
        return bool(
            p["role"] == "Primary"
            and s["role"] == "Secondary"
            and p["replication"] == s["replication"] == "Established"
            and s["disk"] == "UpToDate"
            and p["peer_durable_lsn"] == p["last_lsn"] == s["durable_lsn"]
        )

    def lossy(self, name: str, percent: int) -> None:
        rules = (
            "table inet mhloss {\n"
            "  chain in { type filter hook input priority -10;\n"
            f'    iifname "rep0" numgen random mod 100 < {percent} counter drop; }}\n'
            "  chain out { type filter hook output priority -10;\n"
            f'    oifname "rep0" numgen random mod 100 < {percent} counter drop; }}\n'
            "}\n"
        )
        r = subprocess.run(
            self.net.exec(name, "nft", "-f", "-"), input=rules, capture_output=True, text=True
        )
        assert r.returncode == 0, f"nft in {name}: {r.stderr}"

    def dropped_packets(self, name: str) -> int:
        r = subprocess.run(
            self.net.exec(name, "nft", "list", "table", "inet", "mhloss"),
            capture_output=True,
            text=True,
            timeout=30,
        )
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", r.stdout))

    def dump(self) -> str:
        return "\n".join(f"=== {k}\n{n.log[-8000:]}" for k, n in self.nodes.items())

    def cleanup(self) -> None:
        for n in self.nodes.values():
            n.kill()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def netns() -> Iterator[Net]:
    reason = rig_available()
    if reason:
        unavailable(reason)
    with rig() as net:
        yield net


@pytest.mark.slow
def test_packet_loss_on_the_replication_link_loses_no_acknowledged_mail(
    netns: Net, request: pytest.FixtureRequest
) -> None:
    from acceptance.rig import Load as NsLoad

    tag = "loss" + secrets.token_hex(2)
    pair = ReplPair(netns, tag)
    try:
        n1, n2 = pair.nodes["n1"], pair.nodes["n2"]
        n1.start()
        wait_for(lambda: pair.up("n1"), 30, "n1's admin socket")
        n2.start()
        wait_for(pair.in_sync, 30, "n2 in sync with n1")
        pair.lossy("n1", 10)
        with NsLoad(pair, tag, seed=random.randrange(2**32), per_node=3) as load:
            time.sleep(6)
        acked = [e.mid for e in load.acks("n1")]
        assert len(acked) >= 20, f"only {len(acked)} acknowledged under loss"
        dropped = pair.dropped_packets("n1")
        assert dropped > 0, "nft dropped nothing"
        print(f"{len(acked)} acknowledged, {dropped} packets dropped on the replication link")
        # Clean stop of the primary (the loss still on), then promotion of the secondary.
        n1.signal(signal.SIGTERM)
        assert n1.proc is not None
        n1.proc.wait(60)
        n1.kill()
        r = subprocess.run(
            [str(MAILHARBOR), "repl", "primary", "--config", str(n2.cfg)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        have: list[str] = []

        def read() -> bool:
            nonlocal have
            try:
                have = pair.pop3_ids("n2")
            except AssertionError:
                return False
            return True

        wait_for(read, 20, "POP3 on n2")
        v = check_final(acked, have)
        assert not v.lost and not v.duplicated, v
    except BaseException:
        print(pair.dump())
        raise
    finally:
        pair.cleanup()


# --- (c) kill -9 of the primary under SMTP and IMAP load ------------------------------------------


class ImapLoad:
    """APPEND, UID STORE +FLAGS (\\Flagged) and UID STORE +FLAGS (\\Deleted) + UID EXPUNGE in a
    thread until the connection dies or stop; records what got its tagged OK."""

    def __init__(self, port: int, tag: str, seed: int) -> None:
        self.port, self.tag = port, tag
        self.rng = random.Random(seed)
        self.appended: list[str] = []
        self.flagged: set[str] = set()
        self.delete_tried: set[str] = set()
        self.expunged: set[str] = set()
        self.error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            c = imaplib.IMAP4("127.0.0.1", self.port, timeout=20)
            c.login(USER, PASSWORD)
            c.select("INBOX")
        except (OSError, imaplib.IMAP4.error) as e:
            self.error = repr(e)
            return
        uids: dict[str, str] = {}
        pool: list[str] = []
        i = 0
        try:
            while not self._stop.is_set():
                i += 1
                mid = f"{self.tag}-ap-{i}@imap.test"
                typ, data = c.append(
                    "INBOX", "", "", message(mid, self.rng.choice([300, 3_000, 30_000]))
                )
                if typ != "OK":
                    continue
                m = re.search(rb"APPENDUID \d+ (\d+)", data[0] or b"")
                assert m, data
                uids[mid] = m.group(1).decode()
                self.appended.append(mid)
                pool.append(mid)
                if len(pool) < 3:
                    continue
                target = pool.pop(self.rng.randrange(len(pool)))
                if i % 2:
                    typ, _ = c.uid("STORE", uids[target], "+FLAGS", "(\\Flagged)")
                    if typ == "OK":
                        self.flagged.add(target)
                else:
                    self.delete_tried.add(target)
                    typ, _ = c.uid("STORE", uids[target], "+FLAGS", "(\\Deleted)")
                    if typ == "OK":
                        typ, _ = c.uid("EXPUNGE", uids[target])
                        if typ == "OK":
                            self.expunged.add(target)
        except (OSError, imaplib.IMAP4.error, EOFError):
            return  # the primary died

    def __enter__(self) -> ImapLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def imap_mailbox(port: int) -> list[tuple[str, str]]:
    """(Message-ID, FLAGS) of every message in INBOX."""
    c = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    try:
        c.login(USER, PASSWORD)
        typ, data = c.select("INBOX")
        assert typ == "OK", data
        if int(data[0] or b"0") == 0:
            return []
        typ, heads = c.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        assert typ == "OK", heads
        mids: dict[int, str] = {}
        for item in heads:
            if isinstance(item, tuple):
                seq = int(item[0].split()[0])
                m = re.search(rb"<([^>]+)>", item[1])
                mids[seq] = m.group(1).decode() if m else ""
        typ, lines = c.fetch("1:*", "(FLAGS)")
        assert typ == "OK", lines
        out = []
        for line in lines:
            assert isinstance(line, bytes), line
            m = re.match(rb"(\d+) \(FLAGS \(([^)]*)\)\)", line)
            assert m, line
            out.append((mids[int(m.group(1))], m.group(2).decode()))
        return out
    finally:
        c.logout()


@pytest.mark.slow
def test_primary_killed_under_smtp_and_imap_load(request: pytest.FixtureRequest) -> None:
    seed = random.randrange(2**32)
    print(f"kill -9 test seed: {seed}")
    sys.stdout.flush()
    rng = random.Random(seed)
    pair = Pair(_tag(request), imap=True, prefix=RUN_PREFIX)
    try:
        pair.start()
        with (
            Load(pair.smtp["a"], f"k{seed}", seed=seed, threads=2) as smtp_load,
            ImapLoad(pair.imap["a"], f"k{seed}", seed) as imap_load,
        ):
            time.sleep(1.5 + 3 * rng.random())
            pair.a.kill()
        assert not imap_load.error, imap_load.error
        assert len(smtp_load.acked) >= 3 and len(imap_load.appended) >= 3, (
            len(smtp_load.acked),
            len(imap_load.appended),
        )
        wait_for(lambda: status(pair.b)["connection"] != "Connected", 10, "b sees the loss")
        st = status(pair.b)
        assert st["disk"] == "UpToDate", st
        r = pair.b.try_cli("repl", "primary")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: not refuses(pair.imap["b"]), 10, "IMAP on b")
        box = imap_mailbox(pair.imap["b"])
        counts = Counter(mid for mid, _ in box)
        flags = dict(box)
        dup = sorted(m for m, n in counts.items() if n > 1)
        assert not dup, f"duplicated: {dup}"
        lost = [
            m
            for m in [*smtp_load.acked, *imap_load.appended]
            if counts[m] == 0 and m not in imap_load.delete_tried
        ]
        assert not lost, f"acknowledged but missing: {lost}"
        resurrected = sorted(m for m in imap_load.expunged if counts[m])
        assert not resurrected, f"acknowledged EXPUNGE undone: {resurrected}"
        unflagged = sorted(m for m in imap_load.flagged if "\\Flagged" not in flags.get(m, ""))
        assert not unflagged, f"acknowledged STORE lost: {unflagged}"
        print(
            f"seed {seed}: {len(smtp_load.acked)} SMTP, {len(imap_load.appended)} APPEND, "
            f"{len(imap_load.flagged)} STORE, {len(imap_load.expunged)} EXPUNGE acknowledged"
        )
    except BaseException:
        print(f"kill -9 test seed: {seed}")
        pair.dump()
        raise
    finally:
        pair.cleanup()
