"""Fixtures of the namespace-rig acceptance tests (rig.py).

- Every test marked ``acceptance`` needs the rig's tools: without them it is skipped, or fails
  under ``MH_FAULT_STRICT=1`` (`make test`) — a missing tool must never pass silently. (The
  checker's own tests in test_checker.py are not marked and run anywhere.)
- ``net``: the rig's network (namespaces n1, n2 and the host, the blackhole route first), one per
  test module; each test builds its own cluster on it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fault.disks import unavailable

from .rig import Net, rig, rig_available


@pytest.fixture(autouse=True)
def _needs_rig(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("acceptance") is None:
        return
    reason = rig_available()
    if reason:
        unavailable(reason)


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    with rig() as n:
        yield n
