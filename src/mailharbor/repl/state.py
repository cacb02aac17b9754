"""Replication states and settings, with DRBD's names and meanings.

Theory of operation
-------------------
These are plain values (Enums and frozen dataclasses); nothing here changes state. The
per-link engine (:mod:`mailharbor.repl.session`) *reports* what it observes using them, and the
single role controller (node wiring) is the only place that changes a node's role.

Meanings, as in DRBD's user's guide, translated from blocks to the store's log:

* **Role** — ``PRIMARY`` writes and serves; ``SECONDARY`` applies the peer's log and serves
  nothing. A role change is never made by the replication layer.
* **Disk state** — ``UP_TO_DATE``: the log holds every acknowledged record of the current
  history; ``OUTDATED``: a consistent prefix known (or suspected) to be behind the peer;
  ``INCONSISTENT``: the log may lack acknowledged records of a range (a SyncTarget until its
  resync is done, or a node with a corrupt range found at open) and it cannot be promoted, even
  by hand, without ``--force``; ``DISKLESS``: no store attached (detached after a disk error).
  Only ``UP_TO_DATE`` may be promoted automatically.
* **Connection state** — the link as the adapter sees it (``STANDALONE`` when told not to
  connect or after a refusal that needs an operator, such as an unresolved split brain).
* **Replication state** — what the established link does: ``ESTABLISHED`` (live streaming),
  ``SYNC_SOURCE``/``SYNC_TARGET`` (catch-up or full sync), paused variants, ``VERIFY_S``/
  ``VERIFY_T`` while an online verify runs.
* **Protocol** — when the primary may acknowledge a client: ``A`` after the local fsync (the
  frame is queued for the peer); ``B`` after the local fsync and the peer's *receipt*; ``C``
  (default) after the local fsync and the peer's *fsync*.
* **Fencing policy** — what the primary's durability barrier does when the peer is lost with
  writes in flight: ``DONT_CARE`` continues alone; ``RESOURCE_ONLY`` holds writes until the peer
  is known Outdated; ``RESOURCE_AND_STONITH`` holds (freezes) writes until the peer is fenced.
* **Split-brain policy** — how true split brain (both branches acknowledged writes) is
  resolved: ``MERGE`` (default), DRBD's discard policies, or ``DISCONNECT``.
"""

from __future__ import annotations

import enum


class Role(enum.Enum):
    PRIMARY = "Primary"
    SECONDARY = "Secondary"


class DiskState(enum.Enum):
    UP_TO_DATE = "UpToDate"
    OUTDATED = "Outdated"
    INCONSISTENT = "Inconsistent"
    DISKLESS = "Diskless"


class ConnectionState(enum.Enum):
    """The link, as the adapter reports it (DRBD's cstate)."""

    STANDALONE = "StandAlone"  # not connecting (configured so, or refused: needs an operator)
    WF_CONNECTION = "WFConnection"  # waiting for / trying to make a TCP connection
    WF_REPORT_PARAMS = "WFReportParams"  # connected; handshake and state exchange in progress
    CONNECTED = "Connected"  # handshake done, decision taken
    DISCONNECTING = "Disconnecting"


class ReplicationState(enum.Enum):
    """What an established link does (DRBD's replication state)."""

    OFF = "Off"  # not established
    ESTABLISHED = "Established"
    SYNC_SOURCE = "SyncSource"
    SYNC_TARGET = "SyncTarget"
    PAUSED_SYNC_S = "PausedSyncS"
    PAUSED_SYNC_T = "PausedSyncT"
    VERIFY_S = "VerifyS"
    VERIFY_T = "VerifyT"


class Protocol(enum.Enum):
    """When the primary may acknowledge a write (DRBD's replication protocols)."""

    A = "A"  # local fsync; frame handed to the link
    B = "B"  # local fsync and the peer has received the frame
    C = "C"  # local fsync and the peer has fsynced the frame (the default)

    @property
    def mirrors(self) -> bool:
        """True when an acknowledged record is on the peer as well (B: received, C: durable).

        Only generations written in such a protocol, with the peer connected and in sync, can
        have an *unacknowledged* tail that is safe to cut (see :mod:`.generations`)."""
        return self is not Protocol.A


class FencingPolicy(enum.Enum):
    DONT_CARE = "dont-care"
    RESOURCE_ONLY = "resource-only"
    RESOURCE_AND_STONITH = "resource-and-stonith"


class SplitBrainPolicy(enum.Enum):
    MERGE = "merge"
    DISCARD_YOUNGER_PRIMARY = "discard-younger-primary"
    DISCARD_LEAST_CHANGES = "discard-least-changes"
    DISCARD_ZERO_CHANGES = "discard-zero-changes"
    DISCONNECT = "disconnect"


#: Wire codes of the enums above (a u8 each in STATE messages). Never reuse a code.
ROLE_CODES: dict[Role, int] = {Role.PRIMARY: 1, Role.SECONDARY: 2}
DISK_CODES: dict[DiskState, int] = {
    DiskState.UP_TO_DATE: 1,
    DiskState.OUTDATED: 2,
    DiskState.INCONSISTENT: 3,
    DiskState.DISKLESS: 4,
}
PROTOCOL_CODES: dict[Protocol, int] = {Protocol.A: 1, Protocol.B: 2, Protocol.C: 3}
