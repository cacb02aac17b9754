"""The resource plan: what runs on a primary, in which order it starts and stops, and a small
state machine the node adapter drives step by step, with the monitors' results as inputs.

Theory of operation
-------------------
Resources start in order — replication role → store → listeners → queue runner (the service
address agent, when there is one, goes between store and listeners) — and stop in reverse, with
the listeners' part of the stop split in three so that a demoted or fenced node owes its clients
the "proper shutdown of all messaging resources":

=====  ========================  ===========================================================
 #     start step                stop step (graceful, in this order)
=====  ========================  ===========================================================
 1     ``promote-replication``   ``stop-accepting``: close the listening sockets
 2     ``open-store``            ``drain-sessions``: ``421`` to SMTP/LMTP, ``* BYE`` to IMAP,
                                 ``-ERR`` to POP3 sessions at their next command boundary
 3     ``start-listeners``       ``finish-writes``: transactions in flight complete or fail;
                                 nothing new is acknowledged after the ack gate closed
 4     ``start-queue-runner``    ``stop-queue-runner``: the attempt in flight is logged
 5                               ``close-store``
 6                               ``demote-replication``
=====  ========================  ===========================================================

The queue runner stops after the sessions because its one attempt in flight checks the lease
before the final "." anyway; stopping the intake first keeps new work out while it finishes.

:class:`ResourceManager` is the state machine: :meth:`~ResourceManager.start` /
:meth:`~ResourceManager.stop` queue a plan; :meth:`~ResourceManager.next_step` hands the adapter
one step at a time; :meth:`~ResourceManager.done` reports it. Each step has a deadline; a stop
step past its deadline makes :meth:`~ResourceManager.overdue` true (the decision then says
``self-fence``). Monitors report through :meth:`~ResourceManager.monitor`: a dead listener or
queue runner is restarted locally up to ``migration_threshold`` times (Pacemaker's meaning),
then ``resource_failed`` asks the decision to fail over; the store in ERROR cannot be recovered
locally and sets ``store_error`` at once.

Invariants:

* Steps run one at a time, in plan order; a stop plan stops only what was started, in reverse.
* A stop requested during a start abandons the rest of the start plan.
* ``resources`` is ``STOPPED`` only when nothing runs, ``STARTED`` only when everything does.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .decide import Resources

__all__ = [
    "START_PLAN",
    "STOP_PLAN",
    "PlanStep",
    "Resource",
    "ResourceManager",
    "StepKind",
]


class Resource(enum.Enum):
    REPLICATION_ROLE = "replication-role"
    STORE = "store"
    LISTENERS = "listeners"
    QUEUE_RUNNER = "queue-runner"


START_ORDER = (Resource.REPLICATION_ROLE, Resource.STORE, Resource.LISTENERS, Resource.QUEUE_RUNNER)


class StepKind(enum.Enum):
    PROMOTE_REPLICATION = "promote-replication"
    OPEN_STORE = "open-store"
    START_LISTENERS = "start-listeners"
    START_QUEUE_RUNNER = "start-queue-runner"
    STOP_ACCEPTING = "stop-accepting"
    DRAIN_SESSIONS = "drain-sessions"
    FINISH_WRITES = "finish-writes"
    STOP_QUEUE_RUNNER = "stop-queue-runner"
    CLOSE_STORE = "close-store"
    DEMOTE_REPLICATION = "demote-replication"
    RESTART_LISTENERS = "restart-listeners"
    RESTART_QUEUE_RUNNER = "restart-queue-runner"


@dataclass(frozen=True)
class PlanStep:
    kind: StepKind
    resource: Resource
    #: True for a step that starts ``resource``; the stop step that ends it has ``last``.
    starts: bool
    timeout: float
    #: For stop steps: this step is the one after which ``resource`` no longer runs.
    last: bool = True


START_PLAN: tuple[PlanStep, ...] = (
    PlanStep(StepKind.PROMOTE_REPLICATION, Resource.REPLICATION_ROLE, True, 5.0),
    PlanStep(StepKind.OPEN_STORE, Resource.STORE, True, 10.0),
    PlanStep(StepKind.START_LISTENERS, Resource.LISTENERS, True, 5.0),
    PlanStep(StepKind.START_QUEUE_RUNNER, Resource.QUEUE_RUNNER, True, 5.0),
)
STOP_PLAN: tuple[PlanStep, ...] = (
    PlanStep(StepKind.STOP_ACCEPTING, Resource.LISTENERS, False, 1.0, last=False),
    PlanStep(StepKind.DRAIN_SESSIONS, Resource.LISTENERS, False, 2.0, last=False),
    PlanStep(StepKind.FINISH_WRITES, Resource.LISTENERS, False, 5.0),
    PlanStep(StepKind.STOP_QUEUE_RUNNER, Resource.QUEUE_RUNNER, False, 5.0),
    PlanStep(StepKind.CLOSE_STORE, Resource.STORE, False, 5.0),
    PlanStep(StepKind.DEMOTE_REPLICATION, Resource.REPLICATION_ROLE, False, 5.0),
)
_RESTART = {
    Resource.LISTENERS: PlanStep(StepKind.RESTART_LISTENERS, Resource.LISTENERS, True, 5.0),
    Resource.QUEUE_RUNNER: PlanStep(
        StepKind.RESTART_QUEUE_RUNNER, Resource.QUEUE_RUNNER, True, 5.0
    ),
}


class UsageError(Exception):
    """The adapter reported a step that is not the current one."""


@dataclass
class ResourceManager:
    """Drives :data:`START_PLAN` / :data:`STOP_PLAN`; the adapter executes the steps."""

    migration_threshold: int = 3
    running: set[Resource] = field(default_factory=set)
    store_error: bool = False
    fail_counts: dict[Resource, int] = field(default_factory=dict)
    _target: Resources = Resources.STOPPED
    _queue: list[PlanStep] = field(default_factory=list)
    _current: PlanStep | None = None
    _deadline: float = float("inf")
    _stop_deadline: float | None = None
    _failed: bool = False
    _stop_done: set[StepKind] = field(default_factory=set)

    # --- plans ----------------------------------------------------------------------------

    def start(self) -> None:
        """Queue the start plan for whatever does not run yet."""
        self._target, self._failed = Resources.STARTED, False
        self._queue = [s for s in START_PLAN if s.resource not in self.running]

    def stop(self, *, deadline: float | None = None) -> None:
        """Queue the graceful stop of whatever runs; ``deadline`` caps every step's own
        (see :func:`.fencing.stop_deadline`)."""
        if self._target is Resources.STOPPED:  # already stopping: only tighten the deadline
            if deadline is not None:
                old = self._stop_deadline
                self._stop_deadline = deadline if old is None else min(old, deadline)
            return
        self._target = Resources.STOPPED
        self._stop_deadline = deadline
        self._queue = []  # the rest of a start plan is abandoned
        self._stop_done = set()

    # --- steps ----------------------------------------------------------------------------

    def next_step(self, now: float) -> PlanStep | None:
        """The step to execute now, or None (one in flight, or nothing to do)."""
        if self._current is not None:
            return None
        if self._target is Resources.STOPPED:
            # computed afresh each time: a start step that was in flight when the stop came
            # adds its resource to what must be stopped
            todo = [
                s for s in STOP_PLAN if s.resource in self.running and s.kind not in self._stop_done
            ]
            if not todo:
                return None
            step = todo[0]
            self._stop_done.add(step.kind)
        elif self._queue:
            step = self._queue.pop(0)
        else:
            return None
        self._current = step
        self._deadline = now + step.timeout
        if not step.starts and self._stop_deadline is not None:
            self._deadline = min(self._deadline, self._stop_deadline)
        return step

    def done(self, kind: StepKind, ok: bool, now: float) -> None:
        """Report the step in flight finished (``ok`` False: it failed)."""
        step = self._current
        if step is None or step.kind is not kind:
            raise UsageError(f"{kind.value} is not the step in flight")
        self._current = None
        if step.starts:
            if ok:
                self.running.add(step.resource)
            else:
                self._count_failure(step.resource)
                self._failed = True
                if self._target is Resources.STARTED:
                    self._queue = []
        elif step.last:
            # a failed stop step still counts as stopped when the adapter gives up on it: the
            # resource is torn down hard (the deadline and self-fence bound it)
            self.running.discard(step.resource)
            if not ok:
                self._failed = True

    def overdue(self, now: float) -> bool:
        """A stop step (or a capped stop) ran past its deadline: escalate to self-fence."""
        return (
            self._current is not None and not self._current.starts and now >= self._deadline
        ) or (
            self._target is Resources.STOPPED
            and self.running != set()
            and self._stop_deadline is not None
            and now >= self._stop_deadline
        )

    def start_overdue(self, now: float) -> bool:
        return self._current is not None and self._current.starts and now >= self._deadline

    # --- monitors -------------------------------------------------------------------------

    def _count_failure(self, r: Resource) -> None:
        self.fail_counts[r] = self.fail_counts.get(r, 0) + 1

    def monitor(self, resource: Resource, ok: bool) -> None:
        """A monitor's result; on failure, queue a local restart or give up (fail over)."""
        if ok or resource not in self.running:
            return
        if resource is Resource.STORE:
            self.store_error = True
            return
        self.running.discard(resource)
        self._count_failure(resource)
        if resource in _RESTART and not self.resource_failed and self._target is Resources.STARTED:
            step = _RESTART[resource]
            if step not in self._queue:
                self._queue.insert(0, step)

    def cleanup(self) -> None:
        """Operator's ``cleanup``: forget failures (fail counts, store error after repair)."""
        self.fail_counts.clear()
        self.store_error = False
        self._failed = False

    @property
    def resource_failed(self) -> bool:
        """Local recovery exhausted for some resource: the decision should fail over."""
        return any(n >= self.migration_threshold for n in self.fail_counts.values())

    # --- summary for the snapshot ----------------------------------------------------------

    @property
    def state(self) -> Resources:
        if self._target is Resources.STOPPED:
            if not self.running and self._current is None:
                return Resources.STOPPED
            return Resources.STOPPING
        if self.running == set(START_ORDER):
            return Resources.STARTED
        if self._current is None and not self._queue:
            return Resources.FAILED if self._failed else Resources.STOPPED
        return Resources.STARTING
