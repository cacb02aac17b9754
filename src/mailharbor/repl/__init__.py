"""Replication, sans-IO: the peer wire protocol, states, generation histories and the reconnect
decision, the per-link session engine and the protocol-C durability barrier logic.

Nothing here does I/O or reads the clock (time is injected) or imports the store: frames are
opaque bytes whose header is peeked (:func:`.wire.peek_frame`). The socket adapter
(``server/repl.py``) and the node wiring drive these engines; see docs/replication.md.
"""

from __future__ import annotations

from .barrier import BarrierCore, BarrierMode, Failed, LinkLoss, Released
from .generations import Action, Branch, Generation, NodeView, Outcome, decide
from .session import ReplSession, SessionConfig, SessionUsageError
from .state import (
    ConnectionState,
    DiskState,
    FencingPolicy,
    Protocol,
    ReplicationState,
    Role,
    SplitBrainPolicy,
)

__all__ = [
    "Action",
    "BarrierCore",
    "BarrierMode",
    "Branch",
    "ConnectionState",
    "DiskState",
    "Failed",
    "FencingPolicy",
    "Generation",
    "LinkLoss",
    "NodeView",
    "Outcome",
    "Protocol",
    "Released",
    "ReplSession",
    "ReplicationState",
    "Role",
    "SessionConfig",
    "SessionUsageError",
    "SplitBrainPolicy",
    "decide",
]
