"""Cluster timings (Heartbeat's keepalive/warntime/deadtime/initdead, the witness lease, the
self-fence and the two-node fence race) and the checker of their relations.

Theory of operation
-------------------
All values are seconds on a monotonic clock. A node sends a heartbeat every ``keepalive`` on
every link; a link that has been silent for ``warntime`` is *late* (logged), for ``deadtime``
*dead*; the peer is dead when every link is dead. At first start a link that has never been
heard is given ``initdead`` instead of ``deadtime`` (boot and network bring-up are slow).

With a witness, a node that writes holds the witness's vote as a *lease*. It asks for a renewal
every ``renew_interval`` and counts each grant from the moment it **sent** the request (never
from the reply): the grant is good until ``sent + lease``. It stops acknowledging at
``sent + lease - lease_margin`` (the *stop point*) and, if its graceful stop has not finished
``self_fence_timeout`` after that, it exits (self-fence). The witness, measuring from when it
*received* the request (later than the send), gives the vote to another node only after
``lease + witness_margin`` has passed without a renewal.

Why the defaults (keepalive 0.2, warntime 0.6, deadtime 1.5, lease 2.0, lease margin 0.4,
self-fence timeout 0.3, witness margin 0.5, renew 0.5):

* **No false failover on a busy 2-core machine.** deadtime is 7.5 keepalives: an event loop
  stalled by GC, a CPU-bound burst or a scheduler hiccup must stall for 1.5 s before anything
  happens, and it would have to stall on every link. A lease is lost only when three renewals
  in a row go unanswered (the stop point is 1.6 s after a send, renewals go every 0.5 s), so a
  slow witness fsync or one dropped datagram costs nothing.
* **Failover in about 2.5 s.** After the primary dies the survivor notices in ~1.5 s
  (deadtime), but it can only take over when the witness re-grants: the dead primary's last
  grant was received on average 0.25 s before it died (renewals every 0.5 s), so the witness
  frees the vote ``lease - 0.25 + witness_margin`` ≈ 2.25 s after the death (2.5 s at worst);
  promotion itself is a role flip plus a few records. Median ≤ 3 s with room to spare.
* **Both nodes never act at once.** The holder is silent (not acknowledging) at
  ``lease - lease_margin`` and dead at ``lease - lease_margin + self_fence_timeout`` = 1.9 s
  after its send, measured on its own clock; the witness waits 2.5 s after the receive on its
  clock. The 0.6 s gap covers clock-rate differences (``clock_drift``, 1 % by default, far
  above what NTP-free monotonic clocks drift) and the check-to-send latency of the last ack.

The relations (:func:`check_timing`, over both nodes' values, since each node's keepalive is
judged by the *other* node's deadtime, and each node's lease by the witness's wait for it):

==========================  ===================================================================
setting                     relation (error otherwise)
==========================  ===================================================================
every value                 finite; > 0 (``fence_delay``/``clock_drift`` ≥ 0; drift < 0.1)
``warntime``                ``keepalive < warntime < deadtime``
``deadtime``                ``deadtime ≥ 2 × keepalive(peer) + keepalive(peer)`` i.e. two lost
                            heartbeats plus one interval of jitter are tolerated
``initdead``                ``initdead ≥ 2 × deadtime``
``lease_margin``            ``lease_margin < lease``
``renew_interval``          ``2 × renew_interval ≤ lease - lease_margin`` (one lost renewal
                            never stops a healthy primary)
``self_fence_timeout``      ``self_fence_timeout < lease_margin``: the self-fence deadline is
                            before the lease ends on the holder's own clock
``witness_margin``          ``(lease - lease_margin + self_fence_timeout) × (1 + drift)``
                            ``< (lease + witness_margin) × (1 - drift)``: the holder is stopped
                            (and, at worst, exited) strictly before the witness re-grants
``fence_delay``             two-node mode only: ``fence_delay > 0`` and ``≥ deadtime`` of both
                            so the favoured node's STONITH lands before the other one shoots;
                            ``fence_timeout > 0``
==========================  ===================================================================
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

__all__ = [
    "DEFAULT_TIMING",
    "Timing",
    "TimingError",
    "TimingProblem",
    "check_timing",
    "failover_estimate",
    "require_timing",
]


@dataclass(frozen=True, kw_only=True)
class Timing:
    """The cluster's timing settings, in seconds (see the module docstring for the reasons)."""

    keepalive: float = 0.2
    warntime: float = 0.6
    deadtime: float = 1.5
    initdead: float = 30.0
    lease: float = 2.0
    lease_margin: float = 0.4
    renew_interval: float = 0.5
    self_fence_timeout: float = 0.3
    witness_margin: float = 0.5
    fence_delay: float = 2.0
    fence_timeout: float = 10.0
    fence_retry: float = 2.0
    #: Largest relative difference between two nodes' monotonic clock rates that is tolerated.
    clock_drift: float = 0.01

    @property
    def stop_after(self) -> float:
        """Seconds after a renewal was sent at which the holder stops acknowledging."""
        return self.lease - self.lease_margin

    @property
    def self_fence_after(self) -> float:
        """Seconds after a renewal was sent by which the holder must have exited (self-fence)."""
        return self.lease - self.lease_margin + self.self_fence_timeout

    @property
    def regrant_after(self) -> float:
        """Seconds after the witness received the last renewal before it re-grants the vote."""
        return self.lease + self.witness_margin


DEFAULT_TIMING = Timing()


@dataclass(frozen=True)
class TimingProblem:
    """One violated relation: the setting to change and why (``node`` says whose value)."""

    setting: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.node}: {self.setting}: {self.message}"


class TimingError(ValueError):
    """Raised by :func:`require_timing`; ``problems`` lists every violated relation."""

    def __init__(self, problems: Sequence[TimingProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


_NONNEGATIVE = frozenset({"fence_delay", "clock_drift"})


def _own(t: Timing, who: str, two_node: bool) -> Iterable[TimingProblem]:
    bad = False
    for f in fields(t):
        v = getattr(t, f.name)
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            yield TimingProblem(f.name, who, f"must be a finite number of seconds, got {v!r}")
            bad = True
        elif f.name in _NONNEGATIVE and v < 0:
            yield TimingProblem(f.name, who, f"must be ≥ 0, got {v}")
            bad = True
        elif f.name not in _NONNEGATIVE and v <= 0:
            yield TimingProblem(f.name, who, f"must be > 0, got {v}")
            bad = True
    if bad:
        return
    if t.clock_drift >= 0.1:
        yield TimingProblem("clock_drift", who, f"must be below 0.1 (10 %), got {t.clock_drift}")
        return
    if not t.keepalive < t.warntime < t.deadtime:
        yield TimingProblem(
            "warntime",
            who,
            f"must lie strictly between keepalive ({t.keepalive}) and deadtime ({t.deadtime}), "
            f"got {t.warntime}",
        )
    if t.initdead < 2 * t.deadtime:
        yield TimingProblem(
            "initdead", who, f"must be ≥ 2 × deadtime = {2 * t.deadtime:g}, got {t.initdead}"
        )
    if t.lease_margin >= t.lease:
        yield TimingProblem(
            "lease_margin", who, f"must be below lease ({t.lease}), got {t.lease_margin}"
        )
        return
    if 2 * t.renew_interval > t.stop_after:
        yield TimingProblem(
            "renew_interval",
            who,
            f"must be ≤ (lease - lease_margin) / 2 = {t.stop_after / 2:g} so that one lost "
            f"renewal does not stop a healthy primary, got {t.renew_interval}",
        )
    if t.self_fence_timeout >= t.lease_margin:
        yield TimingProblem(
            "self_fence_timeout",
            who,
            f"must be below lease_margin ({t.lease_margin}): the self-fence deadline must fall "
            f"before the lease ends, got {t.self_fence_timeout}",
        )
    holder_done = t.self_fence_after * (1 + t.clock_drift)
    witness_wait = t.regrant_after * (1 - t.clock_drift)
    if not holder_done < witness_wait:
        need = holder_done / (1 - t.clock_drift) - t.lease
        yield TimingProblem(
            "witness_margin",
            who,
            f"the holder may still be running {holder_done:g} s after its renewal but the "
            f"witness re-grants after {witness_wait:g} s (with {t.clock_drift:.0%} clock drift): "
            f"both nodes could act at once; witness_margin must exceed {need:g}",
        )
    if two_node and t.fence_delay <= 0:
        yield TimingProblem(
            "fence_delay",
            who,
            "must be > 0 in two-node mode (no witness): otherwise both nodes shoot each other",
        )


def _between(a: Timing, an: str, b: Timing, bn: str, two_node: bool) -> Iterable[TimingProblem]:
    """Relations between ``a``'s sending and ``b``'s judging of it."""
    need = 3 * a.keepalive
    if b.deadtime < need:
        yield TimingProblem(
            "deadtime",
            bn,
            f"must be ≥ 3 × keepalive of {an} = {need:g} (two lost heartbeats and one interval "
            f"of jitter), got {b.deadtime}",
        )
    if b.warntime <= a.keepalive:
        yield TimingProblem(
            "warntime", bn, f"must exceed keepalive of {an} ({a.keepalive}), got {b.warntime}"
        )
    # The lease relations are each requester's own (the witness holds a grant for the
    # requester's lease + witness_margin, carried in the request), so they are in _own().
    if two_node and b.fence_delay < a.deadtime:
        yield TimingProblem(
            "fence_delay",
            bn,
            f"must be ≥ deadtime of {an} ({a.deadtime}) so that the favoured node's fencing "
            f"lands first in a fence race, got {b.fence_delay}",
        )


def check_timing(
    mine: Timing, peers: Sequence[Timing] = (), *, two_node: bool = False
) -> list[TimingProblem]:
    """Every violated relation over this node's and the peers' timings (empty: all fine).

    ``two_node`` is True when no witness is configured (fencing by STONITH, settled by
    ``fence_delay``). Each problem names the setting and the node (``"this node"`` or
    ``"peer N"``) whose value must change.
    """
    named = [("this node", mine)] + [(f"peer {i + 1}", p) for i, p in enumerate(peers)]
    out: list[TimingProblem] = []
    for who, t in named:
        out.extend(_own(t, who, two_node))
    if out:
        return out
    for an, a in named:
        for bn, b in named:
            out.extend(_between(a, an, b, bn, two_node))
    seen: set[tuple[str, str, str]] = set()
    unique: list[TimingProblem] = []
    for p in out:
        key = (p.setting, p.node, p.message)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def require_timing(mine: Timing, peers: Sequence[Timing] = (), *, two_node: bool = False) -> None:
    """Raise :class:`TimingError` listing every problem :func:`check_timing` finds."""
    problems = check_timing(mine, peers, two_node=two_node)
    if problems:
        raise TimingError(problems)


def failover_estimate(t: Timing) -> tuple[float, float]:
    """(median, worst) seconds from a primary's death to the survivor holding the vote.

    The survivor needs both the peer declared dead (``deadtime`` after the last heartbeat) and
    the witness's re-grant (``regrant_after`` after the dead node's last renewal arrived).
    """
    median = max(t.deadtime + t.keepalive / 2, t.regrant_after - t.renew_interval / 2)
    worst = max(t.deadtime + t.keepalive, t.regrant_after)
    return median, worst
