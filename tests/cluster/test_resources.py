"""The resource plan and its state machine."""

from __future__ import annotations

import pytest

from mailharbor.cluster.decide import Resources
from mailharbor.cluster.resources import (
    START_PLAN,
    STOP_PLAN,
    Resource,
    ResourceManager,
    StepKind,
)
from mailharbor.cluster.resources import UsageError as ResourceUsageError


def run(rm: ResourceManager, now: float = 0.0, fail: StepKind | None = None) -> list[StepKind]:
    done = []
    while (step := rm.next_step(now)) is not None:
        done.append(step.kind)
        rm.done(step.kind, step.kind is not fail, now)
    return done


def state_of(rm: ResourceManager) -> Resources:
    """The state, read anew (mypy would otherwise keep a narrowed literal across calls)."""
    return rm.state


def test_start_in_order_stop_in_reverse_with_graceful_steps() -> None:
    rm = ResourceManager()
    rm.start()
    assert state_of(rm) is Resources.STARTING
    assert run(rm) == [s.kind for s in START_PLAN]
    assert state_of(rm) is Resources.STARTED
    rm.stop()
    assert state_of(rm) is Resources.STOPPING
    assert run(rm) == [
        StepKind.STOP_ACCEPTING,
        StepKind.DRAIN_SESSIONS,
        StepKind.FINISH_WRITES,
        StepKind.STOP_QUEUE_RUNNER,
        StepKind.CLOSE_STORE,
        StepKind.DEMOTE_REPLICATION,
    ]
    assert state_of(rm) is Resources.STOPPED and not rm.running
    assert len(STOP_PLAN) == 6


def test_stop_during_start_stops_only_what_started_including_the_step_in_flight() -> None:
    rm = ResourceManager()
    rm.start()
    s1 = rm.next_step(0.0)
    assert s1 is not None
    rm.done(s1.kind, True, 0.0)
    s2 = rm.next_step(0.0)  # open-store in flight
    assert s2 is not None and s2.kind is StepKind.OPEN_STORE
    rm.stop()
    assert rm.next_step(0.0) is None  # one step at a time
    rm.done(s2.kind, True, 0.0)
    assert run(rm) == [StepKind.CLOSE_STORE, StepKind.DEMOTE_REPLICATION]
    assert state_of(rm) is Resources.STOPPED


def test_start_failure_and_wrong_report() -> None:
    rm = ResourceManager()
    rm.start()
    assert run(rm, fail=StepKind.START_LISTENERS)[-1] is StepKind.START_LISTENERS
    assert state_of(rm) is Resources.FAILED
    with pytest.raises(ResourceUsageError):
        rm.done(StepKind.OPEN_STORE, True, 0.0)
    rm.stop()
    assert run(rm) == [StepKind.CLOSE_STORE, StepKind.DEMOTE_REPLICATION]


def test_stop_deadline_and_overdue() -> None:
    rm = ResourceManager()
    rm.start()
    run(rm)
    rm.stop(deadline=10.3)
    rm.stop(deadline=12.0)  # repeated demote decisions do not restart or loosen the stop
    step = rm.next_step(10.0)
    assert step is not None and step.kind is StepKind.STOP_ACCEPTING
    assert not rm.overdue(10.2)
    assert rm.overdue(10.3)


def test_monitors_restart_then_fail_over_and_store_error() -> None:
    rm = ResourceManager(migration_threshold=2)
    rm.start()
    run(rm)
    rm.monitor(Resource.LISTENERS, ok=False)
    assert state_of(rm) is Resources.STARTING
    assert run(rm) == [StepKind.RESTART_LISTENERS]
    assert state_of(rm) is Resources.STARTED and not rm.resource_failed
    rm.monitor(Resource.LISTENERS, ok=False)
    assert rm.resource_failed  # local recovery exhausted: the decision fails over
    assert run(rm) == []
    rm.monitor(Resource.STORE, ok=False)
    assert rm.store_error
    rm.cleanup()
    assert not rm.resource_failed and not rm.store_error
