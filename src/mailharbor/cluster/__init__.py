"""The cluster manager's sans-IO core: timings, heartbeats, the witness lease, fencing rules,
the decision function and the resource plan.

Nothing here does I/O or reads the clock: every method that needs the time takes ``now`` (the
monotonic clock, seconds), so heartbeat, lease and failover logic run in virtual time in tests.
The adapters (sockets, timers, subprocesses for fence agents) live in ``server/`` and the node
wiring; see docs/cluster.md.
"""

from __future__ import annotations

from .decide import (
    REASONS,
    Action,
    ClusterSnapshot,
    Command,
    CommandKind,
    Decision,
    ack_allowed,
    decide,
)
from .heartbeat import Heartbeat, LinkState, NodeStatus, PeerState
from .resources import ResourceManager
from .timing import DEFAULT_TIMING, Timing, TimingError, check_timing, require_timing
from .witness import LeaseClient, Witness

__all__ = [
    "DEFAULT_TIMING",
    "REASONS",
    "Action",
    "ClusterSnapshot",
    "Command",
    "CommandKind",
    "Decision",
    "Heartbeat",
    "LeaseClient",
    "LinkState",
    "NodeStatus",
    "PeerState",
    "ResourceManager",
    "Timing",
    "TimingError",
    "Witness",
    "ack_allowed",
    "check_timing",
    "decide",
    "require_timing",
]
