"""``mailharbor cluster status|switchover|standby NODE|unstandby NODE|fence NODE``.

Contract
--------
- crm_mon/crm words, sent to the running node over its admin socket (``--config FILE``); with
  no cluster manager running they fail with "the cluster manager is not running here" (exit 1).
- ``status`` prints this node and the peer (role, disk, resources, standby, Outdated), the
  links, quorum (witness reachable, vote owner, lease and its remaining time), replication
  (connected, peer confirming writes), the current decision and the last decisions with their
  reasons; ``--json`` prints the whole document.
- ``switchover`` (on the primary): demote gracefully, the peer takes over; refused with the
  reason when the peer is down, standby, not in sync or the witness is unreachable.
- ``standby NODE`` / ``unstandby NODE``: NODE must be this node (for the peer, run it there);
  ``standby --force`` demotes even if the peer cannot take over. ``fence NODE``: run the STONITH
  agent against the peer.
- A refused command prints ``mailharbor: error: refused (REASON): meaning`` and exits 1.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from mailharbor.cli.admin_cmds import (
    Command,
    _dict,
    _guard,
    _leaf,
    _print_json,
    load_cli_config,
    perform,
)

if TYPE_CHECKING:
    from mailharbor.cli.main import Subparsers

__all__ = ["register"]


def _d(v: object) -> dict[str, object]:
    return v if isinstance(v, dict) else {}


def _v(v: object) -> str:
    return "-" if v is None or v == "" else str(v)


@_guard
def _status(args: argparse.Namespace) -> int:
    st = _dict(perform(load_cli_config(args), "cluster.status"))
    if args.json:
        _print_json(st)
        return 0
    me, peer, q = _d(st.get("node")), _d(st.get("peer")), _d(st.get("quorum"))
    lease, rep, dec = _d(q.get("lease")), _d(st.get("replication")), _d(st.get("decision"))
    print(f"cluster {_v(st.get('cluster'))} ({_v(st.get('mode'))})")
    print(
        f"  node {_v(me.get('name'))}: {_v(me.get('role'))} disk:{_v(me.get('disk'))} "
        f"resources:{_v(me.get('resources'))}"
        + (" STANDBY" if me.get("standby") else "")
        + (" OUTDATED" if me.get("outdated") else "")
        + (" acking" if me.get("can_ack") else " not-acking")
    )
    print(
        f"  peer {_v(peer.get('name'))}: {_v(peer.get('state'))} role:{_v(peer.get('role'))} "
        f"disk:{_v(peer.get('disk'))} heard:{_v(peer.get('last_heard_ago'))}s ago"
        + (" STANDBY" if peer.get("standby") else "")
        + (" OUTDATED" if peer.get("outdated") else "")
        + (f" fence:{peer.get('fence')}" if peer.get("fence") not in (None, "none") else "")
    )
    links = st.get("links")
    for lk in links if isinstance(links, list) else []:
        d = _d(lk)
        print(f"  link {_v(d.get('link'))} {_v(d.get('name'))}: {_v(d.get('state'))}")
    print(
        f"  quorum witness:{_v(q.get('witness'))} reachable:{_v(q.get('reachable'))} "
        f"owner:{_v(q.get('owner'))} lease:{'held' if lease.get('held') else 'not held'} "
        f"term:{_v(lease.get('term'))}"
        + (f" stops-in:{lease.get('expires_in')}s" if lease.get("held") else "")
    )
    print(
        f"  replication connected:{_v(rep.get('connected'))} "
        f"peer-confirms:{_v(rep.get('peer_confirms_writes'))} barrier:{_v(rep.get('barrier'))}"
    )
    print(
        f"  decision: {_v(dec.get('action'))} ({_v(dec.get('reason'))}) {dec.get('detail') or ''}"
    )
    hist = st.get("history")
    if isinstance(hist, list) and hist:
        print("  last decisions:")
        for h in hist[-10:]:
            d = _d(h)
            print(f"    {_v(d.get('at'))} {_v(d.get('action'))} ({_v(d.get('reason'))})")
    return 0


def _command(name: str) -> Command:
    @_guard
    def run(args: argparse.Namespace) -> int:
        a: dict[str, object] = {}
        if getattr(args, "node", None) is not None:
            a["node"] = args.node
        if getattr(args, "force", False):
            a["force"] = True
        r = _dict(perform(load_cli_config(args), f"cluster.{name}", a))
        print(f"{name}: {_v(r.get('action'))} ({_v(r.get('reason'))})")
        return 0

    return run


def register(subparsers: Subparsers) -> None:
    """Add ``cluster`` and its actions."""
    cp = subparsers.add_parser("cluster", help="cluster manager: status, switchover, standby")
    sub = cp.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    _leaf(sub, "status", _status, "nodes, roles, quorum, links, decisions", json=True)
    _leaf(sub, "switchover", _command("switchover"), "demote this primary; the peer takes over")
    p = _leaf(sub, "standby", _command("standby"), "put this node in standby")
    p.add_argument("node", help="this node's name")
    p.add_argument("--force", action="store_true", help="even if the peer cannot take over")
    p = _leaf(sub, "unstandby", _command("unstandby"), "clear this node's standby")
    p.add_argument("node", help="this node's name")
    p = _leaf(sub, "fence", _command("fence"), "fence the peer (STONITH agent)")
    p.add_argument("node", help="the peer's name")
