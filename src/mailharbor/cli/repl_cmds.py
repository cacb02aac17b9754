"""``mailharbor repl status|primary|secondary|connect|disconnect|verify|invalidate|resume-io|
resolve-split-brain``.

Contract
--------
- drbdadm's words, sent to the running node over its admin socket (``--config FILE``); with no
  node running they fail with "replication is not running here" (exit 1).
- ``status`` prints the role, disk state, link (connection and replication state), LSNs, the
  lag in LSNs and, during a resync, its percentage and speed; ``--json`` prints the document.
- ``primary`` promotes only an UpToDate node; ``--force`` promotes an Outdated/Inconsistent one
  and prints what may be lost. ``secondary`` stops the node's listeners and queue runner
  (gracefully) and demotes it. ``connect``/``disconnect`` bring the link up / keep it down
  (StandAlone). ``verify`` compares the log with the peer's, range by range (exit 1 on a
  mismatch). ``invalidate`` moves a secondary's log to quarantine and resyncs it from the peer.
  ``resume-io`` (after a peer loss under fencing ``resource-only``/``resource-and-stonith``):
  the operator states the peer is fenced or Outdated; frozen writes continue without it.
- ``resolve-split-brain --discard-my-data | --merge`` (after a split brain left the link
  StandAlone, e.g. under ``split_brain = "disconnect"``): a one-shot resolution for the next
  reconnect decision, then connect. ``--discard-my-data`` on the secondary whose branch is to
  be dropped (cut into quarantine, then it catches up); ``--merge`` on both nodes (the winner,
  the primary, replays the loser's branch; docs/replication.md, "Merge rules").
- Errors: one ``mailharbor: error: ...`` line on stderr, exit 1.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from mailharbor.cli.admin_cmds import _dict, _guard, _leaf, _print_json, load_cli_config, perform

if TYPE_CHECKING:
    from mailharbor.cli.main import Subparsers

__all__ = ["register"]


def _v(d: dict[str, object], key: str) -> str:
    v = d.get(key)
    return "-" if v is None or v == "" else str(v)


@_guard
def _status(args: argparse.Namespace) -> int:
    st = _dict(perform(load_cli_config(args), "repl.status"))
    if args.json:
        _print_json(st)
        return 0
    print(f"{_v(st, 'node')} role:{_v(st, 'role')} disk:{_v(st, 'disk')}")
    print(
        f"  peer {_v(st, 'peer')} connection:{_v(st, 'connection')} "
        f"replication:{_v(st, 'replication')} role:{_v(st, 'peer_role')} "
        f"disk:{_v(st, 'peer_disk')}"
    )
    line = (
        f"  lsn last:{_v(st, 'last_lsn')} durable:{_v(st, 'durable_lsn')} "
        f"visible:{_v(st, 'visible_lsn')}"
    )
    if "peer_durable_lsn" in st:
        line += f" peer-durable:{_v(st, 'peer_durable_lsn')}"
    if "peer_last_lsn" in st:
        line += f" peer-last:{_v(st, 'peer_last_lsn')}"
    if "lag_lsns" in st:
        line += f" lag:{_v(st, 'lag_lsns')}"
    print(line)
    print(
        f"  protocol:{_v(st, 'protocol')} fencing:{_v(st, 'fencing')} "
        f"generation:{_v(st, 'generation')} barrier:{_v(st, 'barrier')}"
        + (" writes:FROZEN" if st.get("frozen") else "")
    )
    if "resync_percent" in st:
        speed = st.get("resync_bytes_per_second")
        print(
            f"  resync done:{_v(st, 'resync_percent')}%"
            + (f" speed:{speed}B/s" if speed is not None else "")
        )
    if st.get("last_decision"):
        print(f"  last decision: {_v(st, 'last_decision')}")
    if st.get("standalone_reason"):
        print(f"  standalone: {_v(st, 'standalone_reason')}")
    return 0


@_guard
def _primary(args: argparse.Namespace) -> int:
    r = _dict(perform(load_cli_config(args), "repl.primary", {"force": bool(args.force)}))
    if r.get("warning"):
        print(f"warning: {r['warning']}")
    print("now Primary" if r.get("changed") else "already Primary")
    return 0


@_guard
def _secondary(args: argparse.Namespace) -> int:
    r = _dict(perform(load_cli_config(args), "repl.secondary"))
    print("now Secondary" if r.get("changed") else "already Secondary")
    return 0


@_guard
def _connect(args: argparse.Namespace) -> int:
    perform(load_cli_config(args), "repl.connect")
    print("connecting")
    return 0


@_guard
def _disconnect(args: argparse.Namespace) -> int:
    perform(load_cli_config(args), "repl.disconnect")
    print("disconnected (StandAlone)")
    return 0


@_guard
def _verify(args: argparse.Namespace) -> int:
    r = _dict(perform(load_cli_config(args), "repl.verify"))
    if args.json:
        _print_json(r)
    else:
        bad = r.get("mismatches") or []
        print(
            f"verified LSNs {_v(r, 'first_lsn')}-{_v(r, 'last_lsn')} in {_v(r, 'ranges')} "
            f"range(s): {len(bad) if isinstance(bad, list) else bad} mismatch(es)"
        )
        if isinstance(bad, list):
            for rng in bad:
                print(f"  differs: LSNs {rng[0]}-{rng[1]}")
    bad = r.get("mismatches")
    return 1 if bad else 0


@_guard
def _invalidate(args: argparse.Namespace) -> int:
    r = _dict(perform(load_cli_config(args), "repl.invalidate"))
    print(
        f"invalidated: {_v(r, 'quarantined_records')} record(s) quarantined in "
        f"{_v(r, 'quarantine')}; resyncing from the peer"
    )
    return 0


@_guard
def _resume_io(args: argparse.Namespace) -> int:
    r = _dict(perform(load_cli_config(args), "repl.resume-io"))
    if r.get("resumed"):
        print(f"writes resume without the peer (were held until {_v(r, 'was_held_until')})")
    else:
        print("no writes were frozen")
    return 0


@_guard
def _resolve_split_brain(args: argparse.Namespace) -> int:
    r = _dict(
        perform(
            load_cli_config(args),
            "repl.resolve-split-brain",
            {"discard_my_data": bool(args.discard_my_data), "merge": bool(args.merge)},
        )
    )
    if r.get("discard_my_data"):
        print("at the next reconnect this node's split-brain branch is discarded; connecting")
    else:
        print("at the next reconnect a split brain is merged; connecting")
    return 0


def register(subparsers: Subparsers) -> None:
    """Add ``repl`` and its actions."""
    rp = subparsers.add_parser("repl", help="replication: status, role changes, link, verify")
    sub = rp.add_subparsers(dest="repl_command", metavar="ACTION", required=True)
    _leaf(sub, "status", _status, "role, disk, link, LSN lag, resync progress", json=True)
    p = _leaf(sub, "primary", _primary, "promote this node (UpToDate only, unless --force)")
    p.add_argument(
        "--force",
        action="store_true",
        help="promote an Outdated or Inconsistent node (says what may be lost)",
    )
    _leaf(sub, "secondary", _secondary, "stop serving and demote this node")
    _leaf(sub, "connect", _connect, "(re)connect the replication link")
    _leaf(sub, "disconnect", _disconnect, "drop the link and stay StandAlone")
    _leaf(sub, "verify", _verify, "compare the log with the peer's", json=True)
    _leaf(sub, "invalidate", _invalidate, "discard this secondary's log and resync it")
    p = _leaf(
        sub,
        "resolve-split-brain",
        _resolve_split_brain,
        "resolve a split brain at the next reconnect, then connect",
    )
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--discard-my-data",
        action="store_true",
        help="this node (a secondary) cuts its branch into quarantine and catches up",
    )
    how.add_argument(
        "--merge",
        action="store_true",
        help="merge the two branches (give it on both nodes)",
    )
    _leaf(
        sub,
        "resume-io",
        _resume_io,
        "the peer is fenced/Outdated (you checked): frozen writes continue alone",
    )
