"""Fencing's pure parts: exit codes, the self-fence rule, stop deadlines, the fence race."""

from __future__ import annotations

import pytest

from mailharbor.cluster.fencing import (
    FenceResult,
    FenceTarget,
    SelfFenceAction,
    command_environment,
    fence_delay,
    interpret_exit,
    self_fence_action,
    stop_deadline,
)
from mailharbor.cluster.timing import DEFAULT_TIMING
from mailharbor.repl.state import Role

A, B = b"\x01" * 16, b"\x02" * 16


@pytest.mark.parametrize(
    ("code", "result"),
    [
        (0, FenceResult.FENCED_OFF),
        (7, FenceResult.FENCED_OFF),
        (3, FenceResult.OUTDATED),
        (4, FenceResult.OUTDATED),
        (5, FenceResult.FAILED),
        (6, FenceResult.FAILED),
        (1, FenceResult.FAILED),
        (124, FenceResult.TIMEOUT),
        (255, FenceResult.FAILED),
        (-9, FenceResult.FAILED),
        (None, FenceResult.FAILED),
    ],
)
def test_exit_codes(code: int | None, result: FenceResult) -> None:
    out = interpret_exit("ext", code)
    assert out.result is result and out.agent == "ext" and out.detail
    assert out.result.fenced is (result is FenceResult.FENCED_OFF)


def test_timeout_wins_over_the_exit_code() -> None:
    assert interpret_exit("ext", 0, timed_out=True).result is FenceResult.TIMEOUT


def test_command_environment_names_the_target() -> None:
    env = command_environment(FenceTarget("n2", B, "pair1"), reason="peer-dead")
    assert env["MH_FENCE_TARGET"] == "n2" and env["MH_FENCE_TARGET_ID"] == B.hex()
    assert env["DRBD_PEERS"] == "n2" and env["MH_FENCE_REASON"] == "peer-dead"


def test_self_fence_rule() -> None:
    kw = {"armed": True, "stop_at": 10.0, "exit_by": 10.3, "resources_stopped": False}
    assert self_fence_action(9.9, **kw) is SelfFenceAction.NONE  # type: ignore[arg-type]
    assert self_fence_action(10.0, **kw) is SelfFenceAction.STOP  # type: ignore[arg-type]
    assert self_fence_action(10.3, **kw) is SelfFenceAction.EXIT  # type: ignore[arg-type]
    assert self_fence_action(11, armed=True, stop_at=10, exit_by=10.3, resources_stopped=True) is (
        SelfFenceAction.NONE
    )
    assert self_fence_action(
        11, armed=False, stop_at=10, exit_by=10.3, resources_stopped=False
    ) is (SelfFenceAction.NONE)


def test_stop_deadline_after_a_pause_allows_a_short_graceful_stop() -> None:
    t = DEFAULT_TIMING
    assert stop_deadline(10.0, exit_by=10.3, timing=t) == 10.3
    assert stop_deadline(50.0, exit_by=10.3, timing=t) == 50.0 + t.self_fence_timeout
    assert stop_deadline(50.0, exit_by=None, timing=t) == 50.0 + t.fence_timeout


@pytest.mark.parametrize(
    ("a_role", "b_role"),
    [
        (Role.PRIMARY, Role.SECONDARY),
        (Role.SECONDARY, Role.PRIMARY),
        (Role.SECONDARY, Role.SECONDARY),
        (Role.PRIMARY, Role.PRIMARY),
        (Role.SECONDARY, None),
    ],
)
def test_fence_race_exactly_one_side_waits(a_role: Role, b_role: Role | None) -> None:
    t = DEFAULT_TIMING
    da = fence_delay(t, my_role=a_role, peer_role=b_role, my_id=A, peer_id=B)
    b_self = b_role if b_role is not None else Role.SECONDARY
    db = fence_delay(t, my_role=b_self, peer_role=a_role, my_id=B, peer_id=A)
    assert sorted([da, db]) == [0.0, t.fence_delay]
    if a_role is Role.PRIMARY and b_role is not Role.PRIMARY:
        assert da == 0.0  # the node running the resources is favoured
