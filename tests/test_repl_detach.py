"""A disk error on the secondary detaches it (DRBD's on-io-error=detach), with real processes.

Node B's data directory is a small tmpfs: mail replicated from A fills it, B's ingest fails
with ENOSPC, B becomes Diskless, tells A (a STATE update) and stays StandAlone — no reconnect
loop. A follows its fencing policy: ``dont-care`` continues alone in a new generation;
``resource-only`` freezes its writes (``451``), since a Diskless peer never comes back Outdated.
Needs root (the tmpfs); skipped otherwise.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fault.disks import small_tmpfs
from test_repl_nodes import Pair, in_sync, send, status, wait_for


def detach_pair(tag: str, fencing: str, b_data: Path) -> Pair:
    """A pair with small segments whose B keeps its data directory on ``b_data`` (a small
    file system)."""
    p = Pair(
        tag,
        replication={"fencing": fencing},
        store={"segment_bytes": "1MiB", "chunk_bytes": "64KiB"},
        prefix="detach-",
    )
    data = p.b.root / "data"
    for f in data.iterdir():
        dst = b_data / f.name
        if f.is_dir():
            shutil.copytree(f, dst)
        else:
            shutil.copy2(f, dst)
    shutil.rmtree(data)
    data.symlink_to(b_data)
    return p


@pytest.fixture(params=["dont-care", "resource-only"])
def dpair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    with small_tmpfs(3 * 1024 * 1024) as mnt:
        p = detach_pair(secrets.token_hex(3), str(request.param), mnt)
        try:
            yield p
            for name, n in p.nodes.items():  # shown only when the test failed
                print(f"=== log of {name}\n{n.log[-12000:]}")
        finally:
            for n in p.nodes.values():
                n.cleanup()


@pytest.mark.slow
def test_a_full_disk_detaches_the_secondary_and_the_primary_follows_its_fencing(
    dpair: Pair,
) -> None:
    a, b = dpair.a, dpair.b
    fencing = str(status_setting(dpair))
    a.start()
    b.start(wait_ports=False)
    wait_for(lambda: in_sync(a, b), 30, "B in sync with A")
    gen_before = int(status(a)["generation"])
    acked = 0
    for i in range(40):
        ok = send(dpair.smtp["a"], f"fill-{i}@detach.test", 300_000)
        if ok:
            acked += 1
        elif fencing == "dont-care":
            raise AssertionError("dont-care: the primary refused mail after the peer detached")
        if status(b)["disk"] == "Diskless":
            break
    wait_for(lambda: status(b)["disk"] == "Diskless", 20, "B Diskless")
    sb = status(b)
    assert sb["connection"] == "StandAlone" and "disk failed" in sb["standalone_reason"]
    wait_for(lambda: "detached its disk" in a.log, 10, "A told that B is Diskless")
    links = a.log.count("authenticated")
    if fencing == "dont-care":
        wait_for(lambda: int(status(a)["generation"]) > gen_before, 10, "A's new generation")
        assert send(dpair.smtp["a"], "after@detach.test", 1_000)
        assert not status(a)["frozen"]
    else:
        wait_for(lambda: bool(status(a)["frozen"]), 10, "A's writes frozen")
        assert not send(dpair.smtp["a"], "frozen@detach.test", 1_000)
    time.sleep(3)  # no reconnect loop: B stays StandAlone, A sees no new link
    assert a.log.count("authenticated") == links
    assert status(b)["connection"] == "StandAlone"
    r = b.try_cli("repl", "connect")
    assert r.returncode != 0 and "Diskless" in r.stderr


def status_setting(p: Pair) -> str:
    text = p.a.config.read_text()
    return "resource-only" if 'fencing = "resource-only"' in text else "dont-care"
