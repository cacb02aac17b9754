"""Fencing: the agent interface, what an external command's exit code means, the self-fence
rule tied to the lease, and the two-node fence race delay.

Theory of operation
-------------------
A node is **fenced** (DESIGN.md, "Cluster") when one of these holds: a STONITH agent confirmed
it off; a clean shutdown was observed; or the witness re-granted its vote (so its lease plus the
margin has passed) and it runs an armed self-fence. Nobody promotes before the peer is fenced.

Agents (:class:`FenceAgent`) are driven by the adapter; this module holds only the pure parts:

* :func:`interpret_exit` turns an external command's exit status into a :class:`FenceOutcome`,
  with DRBD's fence-peer handler codes (so an existing ``crm-fence-peer``-style script works):

  ======  ===================================================================================
  exit    meaning
  ======  ===================================================================================
  0       the peer is fenced off (powered off / reset confirmed)         → ``FENCED_OFF``
  7       the peer was fenced off the cluster (DRBD: STONITH done)       → ``FENCED_OFF``
  3       the peer's disk was already Inconsistent                       → ``OUTDATED``
  4       the peer's disk was set to Outdated (or already was)           → ``OUTDATED``
  5       the peer could not be reached                                  → ``FAILED``
  6       the peer refused to be outdated: it is primary                 → ``FAILED``
  124     the command gave up after its own timeout (timeout(1)'s code)  → ``TIMEOUT``
  other   any other code, or killed by a signal                          → ``FAILED``
  ======  ===================================================================================

  ``OUTDATED`` is DRBD's resource-only fencing: enough to let a primary write on alone, never
  enough to promote over the peer. The adapter kills a command still running after
  ``fence_timeout`` and reports ``TIMEOUT``.
* :func:`self_fence_action`: a node armed for self-fencing that is running resources stops
  acknowledging at its lease's stop point (the ack gate does that at every ack) and demotes
  gracefully; if resources still run at ``exit_by`` (the stop point plus
  ``self_fence_timeout``, before the lease ends) it exits at once. The self-fence stays armed
  while any resource runs: disarming is allowed only once everything is stopped.
* :func:`fence_delay` settles a fence race in two-node mode (no witness), like Pacemaker's
  ``priority-fencing-delay``: the node that runs the resources (the primary) shoots at once;
  the other waits ``fence_delay``. If both claim the same role, the lower node id is favoured.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from ..repl.state import Role
from .timing import Timing

__all__ = [
    "EXIT_CODES",
    "FenceAgent",
    "FenceOutcome",
    "FenceResult",
    "FenceTarget",
    "SelfFenceAction",
    "command_environment",
    "fence_delay",
    "interpret_exit",
    "self_fence_action",
    "stop_deadline",
]


class FenceResult(enum.Enum):
    FENCED_OFF = "fenced-off"  # confirmed: the peer cannot write (off, reset, or cut off)
    OUTDATED = "outdated"  # resource-only: the peer is marked Outdated, it may still run
    FAILED = "failed"
    TIMEOUT = "timeout"

    @property
    def fenced(self) -> bool:
        """True when the result lets the survivor promote."""
        return self is FenceResult.FENCED_OFF


@dataclass(frozen=True)
class FenceOutcome:
    result: FenceResult
    agent: str
    detail: str


@dataclass(frozen=True)
class FenceTarget:
    """The node to fence, as an agent sees it."""

    name: str
    node_id: bytes
    cluster: str


class FenceAgent(Protocol):
    """A fencing agent (external command, self-fence, test power switch), run by the adapter.

    ``fence`` must return within ``timeout`` seconds (reporting ``TIMEOUT`` otherwise) and never
    raise: every failure is a :class:`FenceOutcome` with a short ``detail`` for the log.
    """

    @property
    def name(self) -> str: ...

    async def fence(self, target: FenceTarget, *, timeout: float) -> FenceOutcome: ...


#: External command exit codes → (result, meaning), DRBD's fence-peer handler codes plus 0.
EXIT_CODES: Mapping[int, tuple[FenceResult, str]] = {
    0: (FenceResult.FENCED_OFF, "peer fenced off"),
    3: (FenceResult.OUTDATED, "peer disk already Inconsistent"),
    4: (FenceResult.OUTDATED, "peer disk outdated"),
    5: (FenceResult.FAILED, "peer unreachable"),
    6: (FenceResult.FAILED, "peer refused: it is primary"),
    7: (FenceResult.FENCED_OFF, "peer fenced off (stonith)"),
    124: (FenceResult.TIMEOUT, "fence command timed out"),
}


def interpret_exit(agent: str, returncode: int | None, *, timed_out: bool = False) -> FenceOutcome:
    """The outcome of an external fence command (``returncode`` as subprocess gives it:
    negative for a signal, None if it could not be started)."""
    if timed_out:
        return FenceOutcome(FenceResult.TIMEOUT, agent, "killed after fence_timeout")
    if returncode is None:
        return FenceOutcome(FenceResult.FAILED, agent, "command could not be started")
    if returncode < 0:
        return FenceOutcome(FenceResult.FAILED, agent, f"killed by signal {-returncode}")
    result, meaning = EXIT_CODES.get(returncode, (FenceResult.FAILED, "unknown exit code"))
    return FenceOutcome(result, agent, f"exit {returncode}: {meaning}")


def command_environment(target: FenceTarget, *, reason: str) -> dict[str, str]:
    """Environment for the external command (added to the adapter's minimal environment)."""
    return {
        "MH_FENCE_TARGET": target.name,
        "MH_FENCE_TARGET_ID": target.node_id.hex(),
        "MH_CLUSTER": target.cluster,
        "MH_FENCE_REASON": reason,
        # DRBD handler names, for scripts written for drbd's fence-peer:
        "DRBD_PEER": target.name,
        "DRBD_PEERS": target.name,
        "DRBD_RESOURCE": target.cluster,
    }


class SelfFenceAction(enum.Enum):
    NONE = "none"  # lease held, or nothing runs
    STOP = "stop"  # past the stop point: acks are refused, demote gracefully now
    EXIT = "exit"  # past exit_by with resources still running: exit at once


def self_fence_action(
    now: float, *, armed: bool, stop_at: float, exit_by: float, resources_stopped: bool
) -> SelfFenceAction:
    """What an armed self-fence demands at ``now`` (``stop_at``/``exit_by`` from the lease)."""
    if not armed or resources_stopped or now < stop_at:
        return SelfFenceAction.NONE
    return SelfFenceAction.EXIT if now >= exit_by else SelfFenceAction.STOP


def stop_deadline(now: float, *, exit_by: float | None, timing: Timing) -> float:
    """When a graceful stop that starts at ``now`` must be done, or the node exits.

    With a lease (``exit_by`` given) the stop must end by ``exit_by``: before the witness can
    re-grant. A node that finds itself already past ``exit_by`` was paused (SIGSTOP, a VM
    freeze) while the peer may have taken over; its ack gate is already closed (it is checked
    on the monotonic clock at every ack), so it gets ``self_fence_timeout`` to send ``421`` /
    ``* BYE`` without acknowledging anything, then exits. Without a lease: ``fence_timeout``.
    """
    if exit_by is None:
        return now + timing.fence_timeout
    return exit_by if exit_by > now else now + timing.self_fence_timeout


def fence_delay(
    timing: Timing,
    *,
    my_role: Role,
    peer_role: Role | None,
    my_id: bytes,
    peer_id: bytes,
) -> float:
    """Seconds this node waits before shooting its peer in two-node mode (0 = at once).

    Both nodes compute this from the same facts and get opposite answers: the primary (last
    known roles) is favoured; on a tie (both secondary, both primary, peer role unknown and
    mine secondary) the lower node id is favoured.
    """
    if my_role is Role.PRIMARY and peer_role is not Role.PRIMARY:
        return 0.0
    if peer_role is Role.PRIMARY and my_role is not Role.PRIMARY:
        return timing.fence_delay
    return 0.0 if my_id < peer_id else timing.fence_delay
