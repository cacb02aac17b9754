"""Power cuts of the primary under SMTP load, and the returns, in the namespace rig (rig.py).

Both nodes' data directories are power-loss FUSE file systems (tests/fault/powerloss_fs.py:
they keep only what was fsynced). "Cutting the power" is SIGKILL of the node and then dropping
every unsynced write (`PowerLossMount.power_cut`); the node then restarts on the post-crash
state, on the plain disk. It must come back secondary and resync from the survivor, never the
reverse, and the survivor must have promoted only after the node was fenced (witness lease +
self-fence), with nothing acknowledged lost. Two rounds on one cluster:

1. n1 (primary) loses power: whatever it had not fsynced is gone;
2. n2 (now primary) loses power half a second after its replication link stalled (packets
   dropped, too short for anyone to notice) and a probe session sent its final "." into the
   stall: its disk keeps fsynced transactions that n1 never received and nobody acknowledged —
   the case where "never the reverse" matters. Its unacknowledged tail is cut into quarantine
   (`rule:crashed-primary-unacked-tail`).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import secrets
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from fault.disks import require_fuse
from fault.powerloss_fs import PowerLossMount
from mailharbor.admin.client import AdminClient

from .rig import (
    Cluster,
    Load,
    Net,
    Probe,
    ack_segments,
    final_check,
    rejoin,
    seed_for,
    wait_for,
)

pytestmark = pytest.mark.acceptance

#: How long the replication link is stalled before the cut (ping_timeout is 1.5 s in the rig).
STALL_S = 0.5

#: "replication: reconnect decision RULE (...): ACTION, divergence LSN D, local tail L, ..."
DECISION = re.compile(
    r"reconnect decision (rule:[a-z-]+) \(.*?\): ([a-z-]+), divergence LSN (\d+), "
    r"local tail (\d+), peer tail (\d+)"
)


@pytest.fixture(autouse=True)
def _needs_fuse() -> None:
    require_fuse()


def test_primary_power_cut_and_return(net: Net, mailharbor_seed: int, record_property: Any) -> None:
    c = Cluster(net, "pc" + secrets.token_hex(3))
    mounts: dict[str, PowerLossMount] = {}
    for name, n in c.nodes.items():
        data, backing = n.dir / "data", n.dir / "data.backing"
        # The admin socket cannot live on the FUSE file system; the store and the rest can.
        n.configure({"admin": {"socket": str(n.dir / "admin.sock")}})
        n.admin = AdminClient(n.dir / "admin.sock", timeout=5)
        os.rename(data, backing)
        data.mkdir()
        mounts[name] = PowerLossMount(backing, data)
    try:
        with contextlib.ExitStack() as stack:
            for m in mounts.values():
                stack.enter_context(m)
            # On the way out the nodes stop before the file systems under them go.
            for n in c.nodes.values():
                stack.callback(n.kill)
            c.start()
            seed = seed_for(mailharbor_seed, "power-cut")
            rng = random.Random(seed)
            with Load(c, "powercut", seed) as load:
                time.sleep(rng.uniform(2.0, 4.0))
                # Round 1: n1's power is cut; whatever it had not fsynced is gone.
                _cut_and_return(c, mounts["n1"], "n1", "n2", load, record_property, stall=False)
                time.sleep(rng.uniform(1.0, 3.0))
                # Round 2: n2's, right after its replication link stalled: its disk keeps
                # transactions n1 never got and nobody acknowledged.
                _cut_and_return(c, mounts["n2"], "n2", "n1", load, record_property, stall=True)
                time.sleep(1)
            # Terms: n1's, then n2's, then n1's again; never back.
            final_check(c, load, "n1")
            runs = [(r.node, r.term) for r in ack_segments(load.acks())]
            assert [n for n, _ in runs] == ["n1", "n2", "n1"], runs
    except BaseException:
        print(c.dump())
        raise
    finally:
        for name in ("n1", "n2"):
            net.heal(name)
        c.cleanup()


def _cut_and_return(
    c: Cluster,
    mount: PowerLossMount,
    name: str,
    survivor: str,
    load: Load,
    record_property: Any,
    *,
    stall: bool,
) -> None:
    """Cut `name`'s power (after a replication stall of STALL_S if `stall`), wait for
    `survivor` to serve, restart `name` on what its disk kept (on the plain disk) and check
    that it came back secondary and took the survivor's history."""
    node, other = c.nodes[name], c.nodes[survivor]
    data, backing, cut = node.dir / "data", node.dir / "data.backing", node.dir / "data.cut"
    k_me, k_other = len(DECISION.findall(node.log)), len(DECISION.findall(other.log))
    promoted = other.log.count("PROMOTED (failover)")
    # The load's two sessions on this node may both be waiting for acknowledgements of records
    # the peer already has (their 250s lost in the stall); then nothing new would be written
    # during it. A probe's final "." makes sure a transaction arrives inside the stall.
    probe = Probe(c.net, c, f"stall-{secrets.token_hex(4)}@acc.test", target=name)
    try:
        if stall:
            probe.start()
            probe.wait_ready()
            # Within ping_timeout: nobody notices, writes wait for the peer's acknowledgement.
            c.net.drop(name, iface="rep0")
            probe.go.touch()
            wait_for(lambda: "dot-sent" in probe.events(), 5, "the probe's final dot sent")
            time.sleep(STALL_S)
        t_cut = time.monotonic()
        node.signal(signal.SIGKILL)
        assert node.proc is not None
        node.proc.wait(10)
    finally:
        probe.kill()
    dot = probe.events().get("dot", {})
    assert dot.get("code") != 250, f"the probe's transaction was acknowledged in the stall: {dot}"
    mount.power_cut(cut)
    wait_for(lambda: bool(load.acks(survivor, after=t_cut)), 20, f"a 250 from {survivor}")
    failover = min(e.t for e in load.acks(survivor, after=t_cut)) - t_cut
    dropped = _size(backing) - _size(cut)
    print(
        f"{name}'s power cut{' after a replication stall' if stall else ''}: {dropped} unsynced "
        f"byte(s) dropped; first 250 from {survivor} after {failover:.2f} s"
    )
    record_property(f"failover_s_{name}", round(failover, 3))
    assert other.log.count("PROMOTED (failover)") == promoted + 1, f"{survivor} not fenced-in"
    assert not [e for e in load.acks(name) if e.sent > t_cut], f"{name} acked after the cut"
    # The return, on what the disk kept.
    node.kill()
    os.rmdir(data)  # the detached mount point
    os.rename(cut, data)
    shutil.rmtree(backing)
    c.net.heal(name)
    node.start()
    rejoin(c, name, survivor, timeout=60)
    # It came back secondary and took the survivor's history: never the reverse.
    mine, theirs = DECISION.findall(node.log)[k_me:], DECISION.findall(other.log)[k_other:]
    print(
        f"reconnect decisions (rule, action, divergence, my tail, peer tail): {name} {mine}, "
        f"{survivor} {theirs}"
    )
    assert mine and theirs, "no reconnect decision logged"
    rule, action, d, local_tail, _ = mine[-1]
    assert action in ("sync-target", "in-sync"), f"{name} was not the sync target: {mine[-1]}"
    assert all(a != "sync-target" for _, a, *_ in theirs), f"{survivor} was resynced: {theirs}"
    assert all(a != "sync-source" for _, a, *_ in mine), f"{name} was a sync source: {mine}"
    st = node.status()
    assert st is not None and st["node"]["role"] == "Secondary", st
    repl = node.admin.call("repl.status").result
    assert isinstance(repl, dict) and repl["last_decision"] == rule, repl
    qdir = data / "quarantine"
    quarantine = sorted(q.name for q in qdir.glob("cut-*")) if qdir.exists() else []
    print(f"{name}: last decision {rule}, quarantine {quarantine}")
    if stall:  # the unacknowledged tail written during the stall is cut aside, not shipped
        assert int(local_tail) > 0, f"no unacknowledged tail on {name} to test: {mine[-1]}"
        assert rule == "rule:crashed-primary-unacked-tail", mine[-1]
    if int(local_tail) > 0:
        assert quarantine, f"{name}'s tail of {local_tail} record(s) after LSN {d} kept"
        assert re.search(r"cut \d+ record\(s\) after LSN \d+ into quarantine", node.log)


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
