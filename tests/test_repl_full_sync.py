"""Full sync between two real ``mailharbor serve`` processes: the retention horizon and
``repl invalidate``.

Node B (secondary) is stopped; node A (primary, ``replication.retain_bytes`` tiny, 1 MiB
segments) receives mail, part of which is deleted and compacted away, so A drops the head of
its log past what B holds. B restarted is behind the horizon: it receives a snapshot, installs
it and catches up (Inconsistent until done). ``repl invalidate`` then forces a second full
sync. Finally A stops and B is promoted: every message acknowledged (and not deleted) is there.
"""

from __future__ import annotations

import poplib
import re
import secrets
from collections.abc import Iterator

import pytest

from servenode import ServeNode, free_port
from test_repl_nodes import (
    PASSWORD,
    USER,
    Pair,
    in_sync,
    pop3_message_ids,
    print_logs,
    send,
    status,
    wait_for,
)


@pytest.fixture
def fpair() -> Iterator[Pair]:
    """A pair with small segments that keeps no log for its peer (``retain_bytes`` 1): a
    secondary that falls behind needs a full sync."""
    p = Pair(
        secrets.token_hex(3),
        replication={"retain_bytes": "1"},
        store={"segment_bytes": "1MiB", "chunk_bytes": "64KiB"},
        prefix="fullsync-",
    )
    try:
        yield p
        print_logs(p.nodes, 12000)  # shown for a failed test
    finally:
        for n in p.nodes.values():
            n.cleanup()


def _delete_all(port: int) -> None:
    p = poplib.POP3("127.0.0.1", port, timeout=30)
    try:
        p.user(USER)
        p.pass_(PASSWORD)
        for i in range(1, len(p.list()[1]) + 1):
            p.dele(i)
    finally:
        p.quit()


@pytest.mark.slow
def test_behind_the_horizon_full_sync_then_invalidate_then_failover(
    fpair: Pair,
) -> None:
    a, b = fpair.a, fpair.b
    a.start()
    b.start(wait_ports=False)
    wait_for(lambda: in_sync(a, b), 30, "B in sync with A")
    b_last = status(b)["durable_lsn"]
    b.stop()
    # A alone: big mail that is deleted again (its segments become dead), then kept mail
    for i in range(3):
        assert send(fpair.smtp["a"], f"big-{i}@fs.test", 900_000)
    _delete_all(fpair.pop3["a"])
    kept = [f"kept-{i}@fs.test" for i in range(4)]
    for mid in kept[:2]:
        assert send(fpair.smtp["a"], mid, 3_000)

    def dropped() -> bool:
        a.cli("store", "compact")
        return bool(int(status(a)["first_retained_lsn"]) > int(b_last) + 1)

    wait_for(dropped, 30, "A dropped the head of its log past B's last LSN")
    # B comes back behind the horizon: a full sync, then the catch-up
    b.start(wait_ports=False)
    wait_for(lambda: in_sync(a, b), 60, "B in sync with A after a full sync")
    assert "rule:behind-retention-horizon" in status(b)["last_decision"] or (
        "behind-retention-horizon" in b.log
    )
    assert "snapshot installed" in b.log
    assert int(status(b)["first_retained_lsn"]) > 1
    for mid in kept[2:3]:
        assert send(fpair.smtp["a"], mid, 3_000)
    wait_for(lambda: in_sync(a, b), 30, "B follows the live stream")
    # repl invalidate: a full sync again (even though A holds what B needs)
    out = b.cli("repl", "invalidate")
    assert "quarantine" in out
    wait_for(lambda: in_sync(a, b), 60, "B in sync again after invalidate")
    assert b.log.count("replication: snapshot installed") == 2
    assert status(b)["full_sync_wanted"] is False
    assert send(fpair.smtp["a"], kept[3], 3_000)
    wait_for(lambda: in_sync(a, b), 30, "B has the last message")
    # failover: every acknowledged (and not deleted) message is on B
    a.stop()
    wait_for(lambda: status(b)["connection"] != "Connected", 20, "B sees A gone")
    b.cli("repl", "primary")
    wait_for(lambda: status(b)["role"] == "Primary", 20, "B promoted")
    wait_for(lambda: sorted(pop3_message_ids(fpair.pop3["b"])) == sorted(kept), 30, "mail on B")


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_full_sync_interrupted_by_a_kill_resumes_where_it_stopped(
    request: pytest.FixtureRequest,
) -> None:
    """``repl invalidate`` on B starts a full sync (rate-limited so it takes seconds); B is
    killed once it recorded durable progress; restarted, it asks to resume and A — still
    holding that snapshot — sends only the rest: fewer bytes than the whole snapshot."""
    secret = secrets.token_hex(16)
    ports = {k: free_port() for k in ("ra", "rb", "sa", "sb")}
    nodes: dict[str, ServeNode] = {}
    tag = secrets.token_hex(3)
    for me, peer, role in (("a", "b", "primary"), ("b", "a", "secondary")):
        nodes[me] = ServeNode(
            f"fsresume-{tag}-{me}",
            {
                "smtp": {"mx": [f"127.0.0.1:{ports['s' + me]}"]},
                "replication": {
                    "peer": f"127.0.0.1:{ports['r' + peer]}",
                    "listen": f"127.0.0.1:{ports['r' + me]}",
                    "secret": secret,
                    "role": role,
                    "ping_interval": "300ms",
                    "ping_timeout": "1s",
                    "ack_timeout": "3s",
                    "resync_rate": "3MiB",
                },
            },
        )
    a, b = nodes["a"], nodes["b"]
    try:
        a.cli("domain", "add", "example.org")
        a.add_account(USER, PASSWORD)
        a.start()
        b.start(wait_ports=False)
        wait_for(lambda: in_sync(a, b), 30, "B in sync")
        for i in range(14):
            assert send(ports["sa"], f"big{i}-{tag}@resume.test", 700_000)
        wait_for(lambda: in_sync(a, b), 30, "B has the mail")
        b.cli("repl", "invalidate")
        progress = b.root / "data" / "snapshot-incoming" / "PROGRESS"
        wait_for(progress.exists, 30, "B recorded durable progress of the snapshot")
        b.kill()
        assert "snapshot installed" not in b.log
        b.start(wait_ports=False)
        wait_for(lambda: in_sync(a, b), 60, "B resumed the full sync and caught up")
        assert "resuming the snapshot from the peer after" in b.log
        sent = re.findall(
            r"snapshot up to LSN \d+ sent \((\d+) byte\(s\) on this link, (\d+) of (\d+) already",
            a.log,
        )
        assert sent, a.log[-4000:]
        on_link, held, total = (int(x) for x in sent[-1])
        print(f"resumed transfer: {on_link} of {total} bytes sent after the restart ({held} held)")
        assert held > 0 and on_link == total - held < total
        assert b.log.count("replication: snapshot installed") == 1
        r = a.try_cli("repl", "verify")
        assert r.returncode == 0 and "0 mismatch" in r.stdout, r.stdout + r.stderr
    finally:
        for name, n in nodes.items():
            print(f"=== log of {name}\n{n.log[-8000:]}")  # shown when the test fails
            n.cleanup()
