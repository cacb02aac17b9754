"""Two real ``mailharbor serve`` processes replicating on loopback.

Node A starts as primary (``replication.role = "primary"``, its domain and account created
offline before the first start), node B as an empty secondary that syncs from it. Mail goes in
over SMTP; what a node holds is checked through its admin socket (``repl status``: LSNs, roles,
disk states; ``repl verify``: digests of the logs, range by range) and, after a failover, by
reading the mailbox over POP3 on the promoted node: every message that got a ``250`` must be
there, each with its own Message-ID.

Randomness (message sizes, the moment of a kill) is seeded per test; names are unique per test.
"""

from __future__ import annotations

import json
import poplib
import random
import secrets
import smtplib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailharbor.repl.role import RoleController, RoleError, RoleFacts
from mailharbor.repl.state import DiskState, Role
from servenode import ServeNode, free_port

PASSWORD = "pw-repl-123456"
USER = "u@example.org"


class Pair:
    """Nodes A (primary at first start) and B (secondary), one SMTP and one POP3 port each
    (and one IMAP port with ``imap``). The other repl test files build their pairs with it."""

    def __init__(
        self,
        tag: str,
        *,
        protocol: str = "C",
        secret_b: str | None = None,
        replication: dict[str, Any] | None = None,
        store: dict[str, Any] | None = None,
        peer_ports: dict[str, int] | None = None,
        replication_by_node: dict[str, dict[str, Any]] | None = None,
        imap: bool = False,
        prefix: str = "repl-",
    ) -> None:
        """``peer_ports``: the port each node connects to for its peer (e.g. a forwarder's),
        instead of the peer's replication listener; ``replication_by_node``: settings of one
        node's ``[replication]`` (by "a" / "b"), after ``replication``; ``prefix``: of the
        nodes' directory names (``{prefix}{tag}-a``)."""
        secret = secrets.token_hex(16)
        self.repl = {"a": free_port(), "b": free_port()}
        self.smtp = {"a": free_port(), "b": free_port()}
        self.pop3 = {"a": free_port(), "b": free_port()}
        self.imap = {"a": free_port(), "b": free_port()} if imap else {}
        self.nodes: dict[str, ServeNode] = {}
        for me, peer, role in (("a", "b", "primary"), ("b", "a", "secondary")):
            settings: dict[str, dict[str, Any]] = {
                "smtp": {"mx": [f"127.0.0.1:{self.smtp[me]}"]},
                "pop3": {"listen": [f"127.0.0.1:{self.pop3[me]}"], "allow_plaintext_auth": True},
                "replication": {
                    "peer": f"127.0.0.1:{(peer_ports or self.repl)[me if peer_ports else peer]}",
                    "listen": f"127.0.0.1:{self.repl[me]}",
                    "secret": secret if me == "a" or secret_b is None else secret_b,
                    "role": role,
                    "protocol": protocol,
                    "ping_interval": "300ms",
                    "ping_timeout": "1s",
                    "ack_timeout": "3s",
                    **(replication or {}),
                    **(replication_by_node or {}).get(me, {}),
                },
            }
            if store:
                settings["store"] = dict(store)
            if imap:
                listen = [f"127.0.0.1:{self.imap[me]}"]
                settings["imap"] = {"listen": listen, "allow_plaintext_auth": True}
            self.nodes[me] = ServeNode(f"{prefix}{tag}-{me}", settings)
        self.a.cli("domain", "add", "example.org")
        self.a.add_account(USER, PASSWORD)

    @property
    def a(self) -> ServeNode:
        return self.nodes["a"]

    @property
    def b(self) -> ServeNode:
        return self.nodes["b"]

    def start(self) -> None:
        self.a.start()
        self.b.start(wait_ports=False)
        wait_for(lambda: in_sync(self.a, self.b), 20, "B in sync with A")

    def dump(self, tail: int = 8000) -> None:
        print_logs(self.nodes, tail)

    def cleanup(self) -> None:
        for n in self.nodes.values():
            n.cleanup()


def print_logs(nodes: dict[str, ServeNode], tail: int = 8000) -> None:
    """Print the end of each node's log (pytest shows it only for a failed test)."""
    for name, n in nodes.items():
        print(f"=== log of {name}\n{n.log[-tail:]}")


def status(node: ServeNode) -> dict[str, Any]:
    r = node.try_cli("repl", "status", "--json")
    assert r.returncode == 0, r.stderr
    st: dict[str, Any] = json.loads(r.stdout)
    return st


def in_sync(primary: ServeNode, secondary: ServeNode) -> bool:
    p, s = status(primary), status(secondary)
    return bool(
        p["role"] == "Primary"
        and s["role"] == "Secondary"
        and p["replication"] == "Established"
        and s["replication"] == "Established"
        and s["disk"] == "UpToDate"
        and p["peer_durable_lsn"] == p["last_lsn"] == s["durable_lsn"]
    )


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.1)


def message(mid: str, size: int) -> bytes:
    body = (f"{mid} " * (size // (len(mid) + 1) + 1))[:size]
    lines = "\r\n".join(body[i : i + 70] for i in range(0, len(body), 70))
    return (
        f"From: x@remote.test\r\nTo: {USER}\r\nSubject: {mid}\r\nMessage-ID: <{mid}>\r\n\r\n"
        f"{lines}\r\n"
    ).encode()


def send(port: int, mid: str, size: int) -> bool:
    """One SMTP transaction; True iff the message got its 250."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
            c.sendmail("x@remote.test", [USER], message(mid, size))
        return True
    except (OSError, smtplib.SMTPException):
        return False


class Load:
    """Senders in threads until stopped; records the Message-IDs that got a 250."""

    def __init__(self, port: int, tag: str, seed: int, threads: int = 3) -> None:
        self.port = port
        self.acked: list[str] = []
        self.failed = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._n = 0
        self._tag = tag
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self._n += 1
                mid = f"{self._tag}-{self._n}@load.test"
                size = self._rng.choice([200, 2_000, 20_000, 300_000])
            if send(self.port, mid, size):
                with self._lock:
                    self.acked.append(mid)
            else:
                with self._lock:
                    self.failed += 1
                time.sleep(0.05)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def pop3_message_ids(port: int) -> list[str]:
    p = poplib.POP3("127.0.0.1", port, timeout=30)
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


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
    except OSError:
        return True
    return False


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    tag = request.node.name.replace("_", "")[-20:] + secrets.token_hex(2)
    p = Pair(tag)
    try:
        p.start()
        yield p
    finally:
        print_logs(p.nodes)
        p.cleanup()


# --- the role controller (pure) ---------------------------------------------------------------


def test_role_rules() -> None:
    rc = RoleController()
    facts = RoleFacts(disk=DiskState.OUTDATED, last_lsn=10, max_generation=3)
    with pytest.raises(RoleError, match="only an UpToDate node"):
        rc.request_primary(facts)
    change = rc.request_primary(facts, force=True)
    assert change is not None and change.new_generation == 4
    assert "after LSN 10" in change.warning
    rc.abandoned(change)
    primary_peer = RoleFacts(
        disk=DiskState.UP_TO_DATE,
        last_lsn=10,
        max_generation=3,
        peer_connected=True,
        peer_role=Role.PRIMARY,
    )
    with pytest.raises(RoleError, match="peer is connected and primary"):
        rc.request_primary(primary_peer, force=True)
    ok = rc.request_primary(RoleFacts(disk=DiskState.UP_TO_DATE, last_lsn=1, max_generation=1))
    assert ok is not None and not ok.warning
    with pytest.raises(RoleError, match="in progress"):
        rc.request_secondary()
    rc.committed(ok)
    assert rc.role is Role.PRIMARY
    assert rc.request_primary(facts) is None  # already primary


# --- two processes ----------------------------------------------------------------------------


@pytest.mark.slow
def test_protocol_c_every_acknowledged_message_is_on_the_secondary(pair: Pair) -> None:
    with Load(pair.smtp["a"], "live", seed=1001) as load:
        time.sleep(4)
    assert len(load.acked) >= 10 and load.failed == 0
    # Protocol C: what was acknowledged is durable on B; the logs are the same.
    wait_for(lambda: in_sync(pair.a, pair.b), 10, "in sync after the load")
    r = pair.a.try_cli("repl", "verify")
    assert r.returncode == 0 and "0 mismatch" in r.stdout, r.stdout + r.stderr
    # Fail over by hand and read the mailbox on B.
    pair.a.stop()
    r = pair.b.try_cli("repl", "primary")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not refuses(pair.pop3["b"]), 10, "POP3 on B")
    ids = pop3_message_ids(pair.pop3["b"])
    assert sorted(ids) == sorted(load.acked)


def test_secondary_serves_no_clients_and_refuses_changes(pair: Pair) -> None:
    assert refuses(pair.smtp["b"]) and refuses(pair.pop3["b"])
    r = pair.b.try_cli("domain", "add", "other.example")
    assert r.returncode == 1 and "secondary" in r.stderr
    st = status(pair.b)
    assert st["role"] == "Secondary" and st["peer_role"] == "Primary"
    # A serves; a message sent to it is on B too (by LSN).
    assert send(pair.smtp["a"], "one@t.test", 500)
    wait_for(lambda: in_sync(pair.a, pair.b), 10, "in sync")


@pytest.mark.slow
def test_secondary_killed_under_load_catches_up(pair: Pair) -> None:
    rng = random.Random(2002)
    with Load(pair.smtp["a"], "kill-b", seed=2002) as load:
        time.sleep(1 + rng.random())
        pair.b.kill()
        n_at_kill = len(load.acked)
        time.sleep(1.5)  # A keeps accepting alone (fencing dont-care)
        pair.b.start(wait_ports=False)
        time.sleep(1.5)
    assert len(load.acked) > n_at_kill, "A accepted nothing while B was down"
    wait_for(lambda: in_sync(pair.a, pair.b), 20, "B caught up")
    r = pair.b.try_cli("repl", "verify")
    assert r.returncode == 0 and "0 mismatch" in r.stdout, r.stdout + r.stderr
    pair.a.stop()
    assert pair.b.try_cli("repl", "primary").returncode == 0
    wait_for(lambda: not refuses(pair.pop3["b"]), 10, "POP3 on B")
    assert sorted(pop3_message_ids(pair.pop3["b"])) == sorted(load.acked)


@pytest.mark.slow
def test_switchover_then_back(pair: Pair) -> None:
    for i in range(5):
        assert send(pair.smtp["a"], f"before-{i}@t.test", 1000 * (i + 1))
    r = pair.a.try_cli("repl", "secondary")
    assert r.returncode == 0, r.stderr
    assert refuses(pair.smtp["a"]) and refuses(pair.pop3["a"])
    r = pair.b.try_cli("repl", "primary")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not refuses(pair.smtp["b"]), 10, "SMTP on B")
    ids = pop3_message_ids(pair.pop3["b"])
    assert sorted(ids) == sorted(f"before-{i}@t.test" for i in range(5))
    # B's writes replicate to A, now its secondary.
    assert send(pair.smtp["b"], "after@t.test", 700)
    wait_for(lambda: in_sync(pair.b, pair.a), 10, "A in sync with B")
    # And back again.
    assert pair.b.try_cli("repl", "secondary").returncode == 0
    assert pair.a.try_cli("repl", "primary").returncode == 0
    wait_for(lambda: not refuses(pair.pop3["a"]), 10, "POP3 on A")
    assert "after@t.test" in pop3_message_ids(pair.pop3["a"])


@pytest.mark.slow
def test_primary_killed_after_250_then_secondary_promoted(pair: Pair) -> None:
    rng = random.Random(3003)
    acked = []
    for i in range(rng.randint(3, 8)):
        mid = f"pk-{i}@t.test"
        assert send(pair.smtp["a"], mid, rng.randint(100, 50_000))
        acked.append(mid)
    pair.a.kill()  # right after the last 250
    wait_for(lambda: status(pair.b)["connection"] != "Connected", 10, "B sees the loss")
    st = status(pair.b)
    assert st["disk"] == "UpToDate", st
    r = pair.b.try_cli("repl", "primary")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not refuses(pair.pop3["b"]), 10, "POP3 on B")
    assert sorted(pop3_message_ids(pair.pop3["b"])) == sorted(acked)


@pytest.mark.slow
def test_forged_peer_is_refused(request: pytest.FixtureRequest) -> None:
    tag = "forged" + secrets.token_hex(2)
    p = Pair(tag, secret_b="x" * 32)  # B has the wrong secret
    try:
        p.a.start()
        p.b.start(wait_ports=False)
        time.sleep(2)
        sa, sb = status(p.a), status(p.b)
        assert sa["connection"] != "Connected" and sb["connection"] != "Connected"
        assert sb["last_lsn"] == 0
        assert "authentication failed" in p.a.log
        assert send(p.smtp["a"], "alone@t.test", 300)  # A serves alone
        assert status(p.b)["last_lsn"] == 0
    except BaseException:
        for name, n in p.nodes.items():
            print(f"=== log of {name}\n{n.log[-5000:]}")
        raise
    finally:
        p.cleanup()


@pytest.mark.slow
def test_split_brain_merge_keeps_the_mail_of_both_sides(pair: Pair) -> None:
    common = [f"common-{i}@t.test" for i in range(3)]
    for mid in common:
        assert send(pair.smtp["a"], mid, 800)
    wait_for(lambda: in_sync(pair.a, pair.b), 10, "in sync")
    # Split brain by hand: cut the link, make B primary too, mail to both.
    for n in (pair.a, pair.b):
        r = n.try_cli("repl", "disconnect")
        assert r.returncode == 0, r.stderr
    r = pair.b.try_cli("repl", "primary", "--force")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not refuses(pair.smtp["b"]), 10, "SMTP on B")
    on_a = [f"a-{i}@t.test" for i in range(4)]
    on_b = [f"b-{i}@t.test" for i in range(3)]
    for mid in on_a:
        assert send(pair.smtp["a"], mid, 1500)
    for i, mid in enumerate(on_b):
        assert send(pair.smtp["b"], mid, 600 + 100_000 * (i == 2))  # one chunked body
    # B gives way (no automatic failback): it ships its branch, A merges, B catches up.
    assert pair.b.try_cli("repl", "secondary").returncode == 0
    for n in (pair.a, pair.b):
        assert n.try_cli("repl", "connect").returncode == 0
    wait_for(lambda: status(pair.a).get("last_merge") is not None, 20, "the merge on A")
    merged = status(pair.a)["last_merge"]
    assert merged.get("unresolved") == 0 and merged.get("collisions") == 3, merged
    wait_for(lambda: in_sync(pair.a, pair.b), 20, "B caught up after the merge")
    ids = pop3_message_ids(pair.pop3["a"])
    assert sorted(ids) == sorted(common + on_a + on_b)
    assert "rule:split-brain-merge" in pair.a.log and "rule:split-brain-merge" in pair.b.log
    audit = Path(merged["audit"]).read_text()
    lines = [json.loads(x) for x in audit.splitlines()]
    rules = [x["rule"] for x in lines]
    assert rules[0] == "merge:start" and rules[-1] == "merge:done"
    assert rules.count("merge:redeliver") == 3 and rules.count("merge:uid-collision") == 3
    r = pair.a.try_cli("repl", "verify")
    assert r.returncode == 0 and "0 mismatch" in r.stdout, r.stdout + r.stderr
