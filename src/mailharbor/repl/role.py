"""The role controller: the one place a node's replication role changes.

Theory of operation
-------------------
The replication layer (:mod:`.session`) only *reports*; the operator (``repl primary``,
``repl secondary``) and, later, the cluster layer's decision loop *ask*. This module answers
"may this node change role now?" as pure logic over a snapshot of what the node knows
(:class:`RoleFacts`), with DRBD's rules, and returns either a :class:`RoleChange` to carry out or
raises :class:`RoleError` with a one-line reason for the operator. The adapter then performs the
change in resource order (promotion: role → new generation → listeners → queue runner;
demotion: queue runner → listeners → settle the store → role) and calls :meth:`committed`.

Rules (promotion):

* a node already primary stays so (no-op); a Diskless node is never promoted, nor one that is
  receiving a full sync's snapshot (``snapshot_pending``: not even with ``--force``);
* never while the peer is connected and primary (that is split brain in the making): demote the
  peer first — ``--force`` does not override this;
* an ``UpToDate`` node is promoted without ``--force``;
* an ``Outdated`` or ``Inconsistent`` node only with ``--force``, and the change says what may
  be lost (the acknowledged records the peer holds after this node's last LSN, or records
  missing from an interrupted resync); with the UpToDate peer connected, even ``--force`` is
  refused (let the resync finish, or disconnect first).

Demotion is always allowed (a secondary stays secondary). A promotion begins a new generation
(term): ``new_generation`` is one above every generation this node or its peer has seen.

Invariants: :attr:`RoleController.role` changes only in :meth:`committed`, and only to the role
of a change this controller granted; at most one change is in progress at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from .state import DiskState, Role


class RoleError(Exception):
    """A role change is refused; ``str()`` is one line for the operator."""


@dataclass(frozen=True, slots=True)
class RoleFacts:
    """What the node knows when a change is asked for."""

    disk: DiskState
    last_lsn: int
    max_generation: int
    peer_connected: bool = False
    peer_role: Role | None = None
    peer_disk: DiskState | None = None
    peer_last_lsn: int | None = None
    #: A full sync's snapshot is being received (not installed yet): never promoted.
    snapshot_pending: bool = False


@dataclass(frozen=True, slots=True)
class RoleChange:
    """A granted change. ``warning`` says what a forced promotion may lose (logged, shown)."""

    role: Role
    new_generation: int | None = None
    forced: bool = False
    warning: str = ""


class RoleController:
    """Holds the role; grants changes per the rules of the module docstring."""

    def __init__(self, role: Role = Role.SECONDARY) -> None:
        self.role = role
        self._pending: RoleChange | None = None

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def request_primary(self, facts: RoleFacts, *, force: bool = False) -> RoleChange | None:
        """Grant a promotion (None: already primary) or raise RoleError."""
        self._check_idle()
        if self.role is Role.PRIMARY:
            return None
        if facts.disk is DiskState.DISKLESS:
            raise RoleError("this node has no usable store (Diskless): it cannot be promoted")
        if facts.snapshot_pending:
            raise RoleError(
                "a full sync is receiving a snapshot into this node (Inconsistent): it cannot "
                "be promoted until the snapshot is installed (--force does not override this)"
            )
        if facts.peer_connected and facts.peer_role is Role.PRIMARY:
            raise RoleError(
                "the peer is connected and primary: run `repl secondary` on it first "
                "(two primaries would be split brain; --force does not override this)"
            )
        warning = ""
        if facts.disk is not DiskState.UP_TO_DATE:
            if not force:
                raise RoleError(
                    f"this node's disk is {facts.disk.value}, only an UpToDate node is promoted;"
                    " `repl primary --force` promotes it anyway and may lose data"
                )
            if facts.peer_connected and facts.peer_disk is DiskState.UP_TO_DATE:
                raise RoleError(
                    f"this node is {facts.disk.value} and the UpToDate peer is connected: let "
                    "the resync finish (or `repl disconnect` first) before forcing"
                )
            warning = forced_loss_text(facts)
        change = RoleChange(
            Role.PRIMARY, new_generation=facts.max_generation + 1, forced=force, warning=warning
        )
        self._pending = change
        return change

    def request_secondary(self) -> RoleChange | None:
        """Grant a demotion (None: already secondary)."""
        self._check_idle()
        if self.role is Role.SECONDARY:
            return None
        change = RoleChange(Role.SECONDARY)
        self._pending = change
        return change

    def committed(self, change: RoleChange) -> None:
        """The adapter carried ``change`` out."""
        if change is not self._pending:
            raise RoleError("no such role change in progress")
        self.role = change.role
        self._pending = None

    def abandoned(self, change: RoleChange) -> None:
        """The adapter could not carry ``change`` out; the role is unchanged."""
        if change is self._pending:
            self._pending = None

    def _check_idle(self) -> None:
        if self._pending is not None:
            raise RoleError("a role change is already in progress")


def forced_loss_text(facts: RoleFacts) -> str:
    """What a forced promotion may lose, in one line."""
    if facts.disk is DiskState.INCONSISTENT:
        return (
            f"forced promotion of an Inconsistent node (last LSN {facts.last_lsn}): records "
            "an interrupted resync did not bring over are lost, and whatever the peer "
            "acknowledged after them becomes a split brain"
        )
    behind = ""
    if facts.peer_last_lsn is not None and facts.peer_last_lsn > facts.last_lsn:
        behind = f" (the peer was last seen at LSN {facts.peer_last_lsn})"
    return (
        f"forced promotion of an {facts.disk.value} node at LSN {facts.last_lsn}: every record "
        f"the peer acknowledged after LSN {facts.last_lsn}{behind} is not here and will be "
        "resolved as split brain when the nodes reconnect"
    )


__all__ = ["RoleChange", "RoleController", "RoleError", "RoleFacts", "forced_loss_text"]
