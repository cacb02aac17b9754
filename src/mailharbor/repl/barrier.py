"""The primary's durability barrier, as pure logic: when may a durable-locally LSN be acked?

Theory of operation
-------------------
The store calls its barrier's ``wait(lsn)`` after the local fsync of a batch and makes the batch
visible (and acknowledges the clients) only when it returns. :class:`BarrierCore` holds the
waiters as ``(token, lsn)``; every call returns the :class:`Released`/:class:`Failed` outcomes it
caused, and an asyncio adapter maps tokens to futures to implement ``store.DurabilityBarrier``.

Modes:

* ``LOCAL`` — no peer is required (no peer configured, protocol A, or the peer is not in sync:
  a sync target is Inconsistent and its copy counts for nothing). ``wait`` releases at once.
* ``PEER`` — protocol B/C with the peer in sync: a waiter is released when the peer confirmed
  (B: received, C: fsynced) an LSN ≥ its own. Entered by :meth:`BarrierCore.require_peer`,
  which returns the first LSN whose acknowledgement waits for the peer: the adapter records it
  as the generation's ``mirrored_from`` (after the switch, never before: a mirrored range that
  claims too much could let a reconnect cut acknowledged records).
* ``FROZEN`` — the peer was lost while in ``PEER``: nothing is released. :meth:`link_lost`
  returns the :class:`LinkLoss` to act on: ``mirrored_until`` (the peer's last confirmed LSN)
  must be **persisted before** any waiter is released locally, because from then on records
  after it are acknowledged without the peer. Then, per the fencing policy:

  - ``dont-care``: call :meth:`resume_local` right after persisting;
  - ``resource-only``: call it once the peer is known Outdated (the witness says so);
  - ``resource-and-stonith``: call it once the peer is fenced;
  - or :meth:`fail_pending` to fail the held commits (nothing in them is acknowledged).

Invariants:

* a waiter is released only in ``LOCAL`` mode, or in ``PEER`` mode with ``confirmed ≥ lsn``;
* after :meth:`link_lost` nothing is released until :meth:`resume_local`;
* ``released_lsn`` (the highest LSN released) never goes down; confirmed never goes down;
* every waiter gets exactly one outcome.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .state import FencingPolicy, Protocol


class BarrierMode(enum.Enum):
    LOCAL = "local"
    PEER = "peer"
    FROZEN = "frozen"


@dataclass(frozen=True, slots=True)
class Released:
    token: int
    lsn: int


@dataclass(frozen=True, slots=True)
class Failed:
    token: int
    lsn: int
    reason: str


BarrierOutcome = Released | Failed


@dataclass(frozen=True, slots=True)
class LinkLoss:
    """What :meth:`BarrierCore.link_lost` asks of the adapter.

    ``mirrored_until``: persist it as the current generation's mirrored end before releasing
    anything (None: the barrier was not waiting for the peer; nothing to persist).
    ``held``: how many waiters are frozen. ``resume_when``: "now" (dont-care), "peer-outdated"
    or "peer-fenced".
    """

    mirrored_until: int | None
    held: int
    resume_when: str


class BarrierCore:
    """Pending LSN waiters released per protocol, fencing policy and peer confirmations."""

    def __init__(
        self,
        protocol: Protocol = Protocol.C,
        fencing: FencingPolicy = FencingPolicy.RESOURCE_ONLY,
    ) -> None:
        self.protocol = protocol
        self.fencing = fencing
        self.mode = BarrierMode.LOCAL
        self.confirmed_lsn = 0
        self.released_lsn = 0
        self.mirrored_from: int | None = None
        self._waiters: dict[int, int] = {}
        self._next_token = 1

    @property
    def pending(self) -> int:
        return len(self._waiters)

    def add_waiter(self, lsn: int) -> tuple[int, list[BarrierOutcome]]:
        """Register a wait for ``lsn`` (durable locally). Returns its token and the outcomes
        (its own release, when it need not wait)."""
        token = self._next_token
        self._next_token += 1
        self._waiters[token] = lsn
        return token, self._release()

    def releasable(self, lsn: int) -> bool:
        """Would a waiter for ``lsn`` be released at once (and none is pending)? Pure."""
        if self._waiters or self.mode is BarrierMode.FROZEN:
            return False
        return self.mode is BarrierMode.LOCAL or lsn <= self.confirmed_lsn

    def try_release(self, lsn: int) -> bool:
        """The fast path of :meth:`add_waiter` for a waiter that need not wait: if
        :meth:`releasable`, count ``lsn`` as released (``released_lsn``) and return True; else
        change nothing and return False (then wait with :meth:`add_waiter`)."""
        if not self.releasable(lsn):
            return False
        self.released_lsn = max(self.released_lsn, lsn)
        return True

    def cancel(self, token: int) -> None:
        """Forget a waiter (its commit was abandoned); no outcome is produced."""
        self._waiters.pop(token, None)

    def require_peer(self) -> int | None:
        """Start waiting for the peer (it is connected and in sync, protocol B or C).

        Returns the first LSN whose acknowledgement waits for the peer (record it as the
        generation's ``mirrored_from``), or None for protocol A (which never waits)."""
        if not self.protocol.mirrors:
            return None
        if self.mode is BarrierMode.PEER and self.mirrored_from is not None:
            return self.mirrored_from
        self.mode = BarrierMode.PEER
        # Waiters already pending wait for the peer too: every LSN after released_lsn does.
        self.mirrored_from = self.released_lsn + 1
        return self.mirrored_from

    def peer_confirmed(self, lsn: int) -> list[BarrierOutcome]:
        """The peer confirmed ``lsn`` (per protocol: received for B, durable for C)."""
        if lsn > self.confirmed_lsn:
            self.confirmed_lsn = lsn
        return self._release()

    def link_lost(self) -> LinkLoss:
        """The peer is gone. In PEER mode: freeze and say what to persist; else nothing."""
        if self.mode is not BarrierMode.PEER:
            return LinkLoss(None, 0, "now")
        self.mode = BarrierMode.FROZEN
        # Everything up to the peer's confirmation is on the peer; after it, records may be
        # acknowledged locally from resume_local() on. released_lsn <= confirmed_lsn in PEER
        # mode, except right after require_peer (then the range is empty).
        until = max(self.released_lsn, self.confirmed_lsn)
        when = {
            FencingPolicy.DONT_CARE: "now",
            FencingPolicy.RESOURCE_ONLY: "peer-outdated",
            FencingPolicy.RESOURCE_AND_STONITH: "peer-fenced",
        }[self.fencing]
        return LinkLoss(until, len(self._waiters), when)

    def resume_local(self) -> list[BarrierOutcome]:
        """Continue without the peer (after persisting the mirrored end; per policy)."""
        self.mode = BarrierMode.LOCAL
        self.mirrored_from = None
        return self._release()

    def fail_pending(self, reason: str) -> list[BarrierOutcome]:
        """Fail every held waiter (their commits are not acknowledged)."""
        out: list[BarrierOutcome] = [Failed(t, lsn, reason) for t, lsn in self._waiters.items()]
        self._waiters.clear()
        return out

    def _release(self) -> list[BarrierOutcome]:
        if self.mode is BarrierMode.FROZEN or not self._waiters:
            return []
        limit = None if self.mode is BarrierMode.LOCAL else self.confirmed_lsn
        out: list[BarrierOutcome] = []
        for t, lsn in list(self._waiters.items()):
            if limit is None or lsn <= limit:
                del self._waiters[t]
                out.append(Released(t, lsn))
                self.released_lsn = max(self.released_lsn, lsn)
        return out


__all__ = ["BarrierCore", "BarrierMode", "BarrierOutcome", "Failed", "LinkLoss", "Released"]
