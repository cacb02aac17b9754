"""The timing checker: defaults accepted, each unsafe relation refused with the setting named."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailharbor.cluster.timing import (
    DEFAULT_TIMING,
    Timing,
    TimingError,
    check_timing,
    failover_estimate,
    require_timing,
)


def test_defaults_pass_in_both_modes() -> None:
    assert check_timing(DEFAULT_TIMING, [DEFAULT_TIMING]) == []
    assert check_timing(DEFAULT_TIMING, [DEFAULT_TIMING], two_node=True) == []


def test_default_failover_is_within_three_seconds() -> None:
    median, worst = failover_estimate(DEFAULT_TIMING)
    assert median <= 2.5 and worst <= 3.0
    # and deadtime tolerates several lost heartbeats
    assert DEFAULT_TIMING.deadtime >= 5 * DEFAULT_TIMING.keepalive


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ({"keepalive": 0.0}, "keepalive"),
        ({"lease": float("nan")}, "lease"),
        ({"fence_delay": -1.0}, "fence_delay"),
        ({"clock_drift": 0.5}, "clock_drift"),
        ({"warntime": 0.1}, "warntime"),  # below keepalive
        ({"warntime": 1.5}, "warntime"),  # not below deadtime
        ({"deadtime": 0.5, "warntime": 0.3}, "deadtime"),  # < 3 x keepalive
        ({"initdead": 2.0}, "initdead"),
        ({"lease_margin": 2.0}, "lease_margin"),
        ({"renew_interval": 1.0}, "renew_interval"),
        ({"self_fence_timeout": 0.4}, "self_fence_timeout"),
        (
            {"lease_margin": 0.35, "self_fence_timeout": 0.34, "witness_margin": 0.001},
            "witness_margin",
        ),
        ({"witness_margin": 0.01, "clock_drift": 0.05}, "witness_margin"),
    ],
)
def test_each_unsafe_relation_names_its_setting(change: dict[str, float], setting: str) -> None:
    bad = dataclasses.replace(DEFAULT_TIMING, **change)
    problems = check_timing(bad, [DEFAULT_TIMING])
    assert setting in {p.setting for p in problems}, problems
    with pytest.raises(TimingError) as e:
        require_timing(bad, [DEFAULT_TIMING])
    assert setting in str(e.value)


def test_relations_are_checked_across_nodes() -> None:
    # the peer sends slowly: my deadtime must cover *its* keepalive
    slow_peer = dataclasses.replace(
        DEFAULT_TIMING, keepalive=0.55, warntime=1.2, deadtime=3.0, initdead=30.0
    )
    problems = check_timing(DEFAULT_TIMING, [slow_peer])
    assert [(p.setting, p.node) for p in problems] == [("deadtime", "this node")]
    assert "peer 1" in problems[0].message


def test_two_node_mode_needs_a_fence_delay_longer_than_deadtime() -> None:
    t = dataclasses.replace(DEFAULT_TIMING, fence_delay=0.0)
    assert {p.setting for p in check_timing(t, [t], two_node=True)} == {"fence_delay"}
    assert check_timing(t, [t]) == []  # with a witness, no fence race to settle
    t = dataclasses.replace(DEFAULT_TIMING, fence_delay=1.0)
    assert {p.setting for p in check_timing(t, [t], two_node=True)} == {"fence_delay"}


_pos = st.floats(min_value=0.01, max_value=10.0)


@given(
    lease=_pos,
    lease_margin=_pos,
    self_fence_timeout=_pos,
    witness_margin=_pos,
    drift=st.floats(min_value=0.0, max_value=0.09),
)
def test_accepted_lease_settings_never_let_both_act(
    lease: float,
    lease_margin: float,
    self_fence_timeout: float,
    witness_margin: float,
    drift: float,
) -> None:
    t = Timing(
        lease=lease,
        lease_margin=lease_margin,
        self_fence_timeout=self_fence_timeout,
        witness_margin=witness_margin,
        clock_drift=drift,
        renew_interval=0.01,
        keepalive=0.2,
        warntime=0.6,
        deadtime=1.5,
        initdead=30.0,
    )
    if check_timing(t, [t]):
        return
    # Worst case: the holder's clock runs slow by `drift` (its deadlines come late in real
    # time), the witness's runs fast (it re-grants early). The holder is stopped, and at worst
    # exited, strictly before the witness can hand the vote to the other node, and it stops
    # acknowledging before its lease runs out on its own clock.
    holder_exit_real = (lease - lease_margin + self_fence_timeout) * (1 + drift)
    regrant_real = (lease + witness_margin) * (1 - drift)
    assert holder_exit_real < regrant_real
    assert lease - lease_margin + self_fence_timeout < lease
