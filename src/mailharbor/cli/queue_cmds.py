"""``mailharbor queue list|show ID|retry ID|delete ID|flush``: the outbound queue.

Contract
--------
- Like every administration command (see :mod:`mailharbor.cli.admin_cmds`): sent to the running
  node over its admin socket, else run on the store opened here; ``--config FILE``.
- ``ID`` is the entry's hex id as ``queue list`` shows it; a unique prefix is enough.
- ``retry``/``flush`` make entries due now (the running node's runner is woken by the commit);
  ``delete`` removes an entry without a bounce. Recipients being attempted right now are left
  to that attempt.
- ``--json`` (list, show) prints one JSON document. Errors: one line on stderr, exit 1.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from mailharbor.cli.admin_cmds import (
    _dict,
    _dicts,
    _guard,
    _leaf,
    _print_json,
    _table,
    load_cli_config,
    perform,
)

if TYPE_CHECKING:
    from mailharbor.cli.main import Subparsers

__all__ = ["register"]


def _when(ms: object) -> str:
    if not isinstance(ms, int) or ms <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


@_guard
def _list(args: argparse.Namespace) -> int:
    entries = _dicts(perform(load_cli_config(args), "queue.list"))
    if args.json:
        _print_json(entries)
        return 0
    if not entries:
        print("queue is empty")
        return 0
    rows = []
    for e in entries:
        rcpts = e.get("recipients")
        rlist = [str(r) for r in rcpts] if isinstance(rcpts, list) else []
        rows.append(
            [
                str(e["id"]),
                _when(e.get("created_ms")),
                str(e.get("size", 0)),
                f"<{e.get('sender', '')}>",
                ", ".join(rlist),
                str(e.get("attempts", 0)),
                _when(e.get("next_ms")),
                "in flight" if e.get("in_flight") else str(e.get("last_detail", ""))[:60],
            ]
        )
    _table(["ID", "QUEUED", "SIZE", "SENDER", "RECIPIENTS", "TRIES", "NEXT", "LAST"], rows)
    print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    return 0


@_guard
def _show(args: argparse.Namespace) -> int:
    e = _dict(perform(load_cli_config(args), "queue.show", {"id": args.id}))
    if args.json:
        _print_json(e)
        return 0
    for k, v in e.items():
        if k.endswith("_ms"):
            v = f"{_when(v)} ({v})"
        print(f"{k}: {v}")
    return 0


@_guard
def _retry(args: argparse.Namespace) -> int:
    r = _dict(perform(load_cli_config(args), "queue.retry", {"id": args.id}))
    if r.get("rescheduled"):
        print(f"queue entry {r['id']} is due now")
    else:
        print(f"queue entry {r['id']} is being attempted right now")
    return 0


@_guard
def _delete(args: argparse.Namespace) -> int:
    r = _dict(perform(load_cli_config(args), "queue.delete", {"id": args.id}))
    print(f"queue entry {r['id']} deleted ({r['recipients']} recipient(s))")
    return 0


@_guard
def _flush(args: argparse.Namespace) -> int:
    r = _dict(perform(load_cli_config(args), "queue.flush"))
    print(f"{r['rescheduled']} of {r['entries']} queue entries made due now")
    return 0


def register(subparsers: Subparsers) -> None:
    """Add ``queue``."""
    que = subparsers.add_parser("queue", help="inspect and manage the outbound queue")
    sub = que.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    _leaf(sub, "list", _list, "list queued messages", json=True)
    _leaf(sub, "show", _show, "show one queued message", json=True).add_argument("id", metavar="ID")
    _leaf(sub, "retry", _retry, "try a queued message again now").add_argument("id", metavar="ID")
    _leaf(sub, "delete", _delete, "remove a queued message (no bounce)").add_argument(
        "id", metavar="ID"
    )
    _leaf(sub, "flush", _flush, "try every queued message again now")
