"""Generation histories and the reconnect decision: who is ahead, what is cut, who syncs whom.

Theory of operation
-------------------
A **generation** is a term in which one node (its *origin*) was primary and wrote records. A
node's *history* is the list of generations its log went through, each with the LSN where it
began — what DRBD's generation identifiers (current/bitmap/history UUIDs) do for blocks, here
for a log. Because every frame carries its generation, "which record is at LSN x" is fully named
by (x, generation number, origin): one origin writes each LSN of its generation once.

Each entry also records, *for its origin only*, the LSN range in which the origin acknowledged
clients only after the peer confirmed the record (``mirrored_from``..``mirrored_until``):
protocol B or C with the peer connected and in sync. The origin opens that range when its
durability barrier starts waiting for the peer, and closes it at the peer's last confirmed LSN
*before* it releases any write locally after losing the peer (see :mod:`.barrier`).

The decision (:func:`decide`) compares two :class:`NodeView` s:

1. ``d``, the **divergence LSN**, is the last LSN up to which both logs hold the same records
   (same generation and origin at every LSN). Each side's **tail** is its records after ``d``.
2. A tail record was possibly **acknowledged** to a client iff it lies on its origin's node
   outside the origin's mirrored range, or its origin is neither node (unknown → assume acked).
   A record on the node that is *not* its origin, but missing from its origin, was never
   acknowledged: the origin acks only after its own fsync, and nothing acked is ever removed.
   A record on its origin inside the mirrored range and missing from the peer was never
   acknowledged either: acks there waited for the peer.
3. The rules, in order (their names are logged; the same name on both nodes):

   ========================================  =====================================================
   rule                                      outcome
   ========================================  =====================================================
   ``rule:invalid-view``                     a view is malformed → disconnect
   ``rule:same-node``                        both views name one node → disconnect
   ``rule:both-primary``                     both are primary → disconnect (split brain in progress)
   ``rule:unrelated-data``                   both hold records but share not even LSN 1 → disconnect
   ``rule:same-records``                     no tail on either side → in sync
   ``rule:history-is-prefix``                one side's log is a prefix of the other's → catch-up
   ``rule:crashed-primary-unacked-tail``     diverged; one tail acked, the other is its own
                                             origin's unconfirmed mirrored tail → cut it, catch-up
   ``rule:origin-lost-tail``                 diverged; one tail acked, the other holds records its
                                             origin lost (never acked) → cut it, catch-up
   ``rule:empty-branch``                     diverged; one side only started a newer generation
                                             and wrote nothing → it adopts the other's records
   ``rule:both-tails-unacked``               diverged; neither tail acked → keep the primary's (or
                                             the newer generation's) branch, cut the other
   ``rule:split-brain-discard-my-data``      both acked; one side was told ``--discard-my-data``
   ``rule:split-brain-merge``                both acked; policy merge: the loser ships its branch
                                             to the winner (replayed there as new operations), then
                                             cuts it and catches up
   ``rule:split-brain-discard-younger-primary`` / ``-least-changes`` / ``-zero-changes`` /
   ``-disconnect``                           both acked; DRBD's policies (ties → disconnect)
   ``rule:primary-would-lose-data``          the decided sync target or loser is primary →
                                             disconnect (demote it first)
   ``rule:sync-source-inconsistent``         the decided source is Inconsistent → disconnect
   ``rule:behind-retention-horizon``         the source no longer holds ``d + 1`` → full sync
   ========================================  =====================================================

Invariants (checked by the tests, a Hypothesis property among them):

* **Mirror images.** ``decide(a, b)`` and ``decide(b, a)`` agree: same rule, same ``d``,
  source ↔ target, "I cut" ↔ "the peer cuts", branch sender ↔ receiver. No tie is broken by
  "which side am I"; ties go by generation numbers, then node ids.
* **Nothing acknowledged is cut silently.** A tail is cut without being shipped first only if
  no record in it was possibly acknowledged; an acknowledged tail is cut only by an explicit
  discard policy (or ``--discard-my-data``), and under ``merge`` it is shipped to the winner
  before the cut.
* A primary is never told to cut its log or to become a sync target.
* Pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from .state import DiskState, Role, SplitBrainPolicy

NODE_ID_LEN = 16


@dataclass(frozen=True, slots=True)
class Generation:
    """One history entry: generation ``number`` began at ``first_lsn``, written by ``origin``.

    ``mirrored_from``/``mirrored_until`` are meaningful on the origin's own node only: the
    inclusive LSN range in which the origin acknowledged a write only after the peer confirmed
    it (``mirrored_until`` None: still open). None/None: never mirrored (standalone, protocol A).
    """

    number: int
    first_lsn: int
    origin: bytes
    mirrored_from: int | None = None
    mirrored_until: int | None = None

    @property
    def key(self) -> tuple[int, bytes]:
        """What names a generation: its number and its origin."""
        return (self.number, self.origin)

    def mirrored(self, lsn: int) -> bool:
        """True if an acknowledgement of the record at ``lsn`` waited for the peer."""
        if self.mirrored_from is None or lsn < self.mirrored_from:
            return False
        return self.mirrored_until is None or lsn <= self.mirrored_until


@dataclass(frozen=True, slots=True)
class NodeView:
    """What a node tells its peer at the state exchange (and what :func:`decide` compares).

    ``last_lsn`` is the last LSN durable in the log; ``first_retained_lsn`` the oldest LSN the
    node can still send (its retention horizon; 1 when it holds the whole log).
    ``discard_my_data`` is the operator's one-shot ``resolve-split-brain --discard-my-data``.
    """

    node_id: bytes
    role: Role
    disk: DiskState
    history: tuple[Generation, ...]
    last_lsn: int
    first_retained_lsn: int = 1
    discard_my_data: bool = False

    def generation_at(self, lsn: int) -> Generation | None:
        """The history entry covering the record at ``lsn`` (None: no record or no entry)."""
        if lsn < 1 or lsn > self.last_lsn:
            return None
        found = None
        for g in self.history:
            if g.first_lsn <= lsn:
                found = g
            else:
                break
        return found


class Action(enum.Enum):
    """What this node does after the decision."""

    IN_SYNC = "in-sync"
    SYNC_SOURCE = "sync-source"
    SYNC_TARGET = "sync-target"
    DISCONNECT = "disconnect"


class Branch(enum.Enum):
    """Merge: who ships its divergent branch to whom before the cut."""

    NONE = "none"
    SEND = "send"  # I ship my tail to the peer (I lose, my branch is replayed there)
    RECEIVE = "receive"  # the peer ships its tail to me; I replay it as new operations


@dataclass(frozen=True, slots=True)
class Outcome:
    """The decision, from one node's point of view.

    ``rule`` names the deciding rule; ``because`` is the chain of rules applied (for the log).
    ``divergence_lsn`` is ``d``. ``cut_local_after`` is set when this node cuts its records
    after that LSN into quarantine (after shipping them when ``branch`` is SEND).
    ``resync_from`` is the first LSN the target receives. ``full_sync`` means the source can no
    longer send ``resync_from`` from its log: the target needs a snapshot.
    """

    action: Action
    rule: str
    because: tuple[str, ...]
    divergence_lsn: int
    cut_local_after: int | None = None
    peer_cuts: bool = False
    resync_from: int | None = None
    full_sync: bool = False
    branch: Branch = Branch.NONE
    split_brain: bool = False
    local_tail: int = 0
    peer_tail: int = 0
    local_tail_acked: bool = False
    peer_tail_acked: bool = False
    detail: str = ""

    @property
    def local_disk_after(self) -> DiskState | None:
        """This node's disk state while the decided sync runs (None: unchanged)."""
        return DiskState.INCONSISTENT if self.action is Action.SYNC_TARGET else None


# --- histories ------------------------------------------------------------------------------


class HistoryError(ValueError):
    """A malformed history (the text says what)."""


def check_view(v: NodeView) -> None:
    """Raise HistoryError unless ``v`` is well formed: entries ascending by number, first LSNs
    non-decreasing, every record covered by an entry, origins of the right length."""
    if len(v.node_id) != NODE_ID_LEN:
        raise HistoryError("node id must be 16 bytes")
    if v.last_lsn < 0 or v.first_retained_lsn < 1:
        raise HistoryError("LSNs out of range")
    prev: Generation | None = None
    for g in v.history:
        if len(g.origin) != NODE_ID_LEN or g.number < 0 or g.first_lsn < 1:
            raise HistoryError("bad history entry")
        if prev is not None and (g.number <= prev.number or g.first_lsn < prev.first_lsn):
            raise HistoryError("history entries out of order")
        for m in (g.mirrored_from, g.mirrored_until):
            if m is not None and m < 0:
                raise HistoryError("bad mirrored range")
        prev = g
    if v.last_lsn >= 1 and (not v.history or v.history[0].first_lsn != 1):
        raise HistoryError("records not covered by the history")


def extend_history(
    history: Sequence[Generation], number: int, first_lsn: int, origin: bytes
) -> tuple[Generation, ...]:
    """The history after a record of generation ``number`` by ``origin`` at ``first_lsn`` is
    appended (a no-op when it continues the last entry). For the adapter, per ingested frame."""
    if history and history[-1].key == (number, origin):
        return tuple(history)
    if history and number <= history[-1].number:
        raise HistoryError("a record of an older generation after a newer one")
    return (*history, Generation(number, first_lsn, origin))


def truncate_history(history: Sequence[Generation], last_lsn: int) -> tuple[Generation, ...]:
    """The history of a log cut after ``last_lsn``: entries that began later are dropped."""
    return tuple(g for g in history if g.first_lsn <= last_lsn)


def divergence_lsn(a: NodeView, b: NodeView) -> int:
    """The last LSN up to which ``a`` and ``b`` hold the same records (0: not even LSN 1)."""
    limit = min(a.last_lsn, b.last_lsn)
    if limit < 1:
        return 0
    # The covering entry only changes at history boundaries: compare one LSN per stretch.
    points = sorted(
        {1} | {g.first_lsn for g in (*a.history, *b.history) if 1 <= g.first_lsn <= limit}
    )
    for p in points:
        ga, gb = a.generation_at(p), b.generation_at(p)
        if ga is None or gb is None or ga.key != gb.key:
            return p - 1
    return limit


def tail_acked(side: NodeView, other: NodeView, d: int) -> bool:
    """True if any record of ``side`` after ``d`` may have been acknowledged to a client."""
    entries = side.history
    for i, g in enumerate(entries):
        end = entries[i + 1].first_lsn - 1 if i + 1 < len(entries) else side.last_lsn
        lo, hi = max(g.first_lsn, d + 1), min(end, side.last_lsn)
        if lo > hi:
            continue
        if g.origin == other.node_id:
            continue  # the origin does not hold them: never acknowledged
        if g.origin != side.node_id:
            return True  # written by a third node: we cannot tell
        if not (g.mirrored(lo) and g.mirrored(hi)):
            return True  # some of it lies outside the mirrored range
    return False


def _extra_generation(side: NodeView, other: NodeView) -> bool:
    """``side`` started a newer generation (no records yet) that ``other`` does not know."""
    if not side.history:
        return False
    last = side.history[-1]
    if last.first_lsn <= side.last_lsn:
        return False
    return all(g.key != last.key for g in other.history)


def _branch_generation(side: NodeView, d: int) -> int:
    """The number of the generation ``side``'s branch after ``d`` began in (the term in which
    that side's primary wrote its first divergent record, or its newer empty generation)."""
    g = side.generation_at(d + 1)
    if g is not None:
        return g.number
    return side.history[-1].number if side.history else 0


# --- the decision ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Pair:
    """The symmetric facts about two views, computed once."""

    d: int
    tail: tuple[int, int]
    acked: tuple[bool, bool]
    extra: tuple[bool, bool]


def decide(
    local: NodeView,
    peer: NodeView,
    policy: SplitBrainPolicy = SplitBrainPolicy.MERGE,
) -> Outcome:
    """The reconnect decision, for ``local`` (see the rule table in the module docstring)."""
    views = (local, peer)
    for v in views:
        try:
            check_view(v)
        except HistoryError as e:
            return _disconnect("rule:invalid-view", 0, str(e))
    if local.node_id == peer.node_id:
        return _disconnect("rule:same-node", 0, "both views name the same node")
    d = divergence_lsn(local, peer)
    facts = _Pair(
        d,
        (local.last_lsn - d, peer.last_lsn - d),
        (tail_acked(local, peer, d), tail_acked(peer, local, d)),
        (_extra_generation(local, peer), _extra_generation(peer, local)),
    )

    def out(
        action: Action,
        because: tuple[str, ...],
        *,
        cut_local_after: int | None = None,
        peer_cuts: bool = False,
        resync_from: int | None = None,
        full_sync: bool = False,
        branch: Branch = Branch.NONE,
        split_brain: bool = False,
    ) -> Outcome:
        return Outcome(
            action,
            because[-1],
            because,
            d,
            cut_local_after=cut_local_after,
            peer_cuts=peer_cuts,
            resync_from=resync_from,
            full_sync=full_sync,
            branch=branch,
            split_brain=split_brain,
            local_tail=facts.tail[0],
            peer_tail=facts.tail[1],
            local_tail_acked=facts.acked[0],
            peer_tail_acked=facts.acked[1],
        )

    if local.role is Role.PRIMARY and peer.role is Role.PRIMARY:
        return out(Action.DISCONNECT, ("rule:both-primary",))
    if d == 0 and local.last_lsn >= 1 and peer.last_lsn >= 1:
        return out(Action.DISCONNECT, ("rule:unrelated-data",))

    tail = facts.tail
    diverges = (tail[0] > 0 or facts.extra[0], tail[1] > 0 or facts.extra[1])
    if tail == (0, 0):
        return out(Action.IN_SYNC, ("rule:same-records",))
    # Which side (0 local, 1 peer) keeps its records, and does the other cut its tail?
    if not (diverges[0] and diverges[1]):
        keeper = 0 if tail[0] > 0 else 1
        rule, cut, branch, split = "rule:history-is-prefix", False, False, False
    else:
        keeper, rule, cut, branch, split = _diverged(local, peer, facts, policy)
        if keeper < 0:
            return out(Action.DISCONNECT, (rule,), split_brain=split)
    loser = 1 - keeper
    because: tuple[str, ...] = (rule,)
    if views[loser].role is Role.PRIMARY:
        because += ("rule:primary-would-lose-data",)
        return out(Action.DISCONNECT, because, split_brain=split)
    if views[keeper].disk is DiskState.INCONSISTENT and views[loser].disk in (
        DiskState.UP_TO_DATE,
        DiskState.OUTDATED,
    ):
        because += ("rule:sync-source-inconsistent",)
        return out(Action.DISCONNECT, because, split_brain=split)
    full = views[keeper].first_retained_lsn > d + 1 and tail[keeper] > 0
    if full:
        because += ("rule:behind-retention-horizon",)
    me_keep = keeper == 0
    if tail[keeper] == 0:
        # Nothing to send: the loser only drops its (unacknowledged or empty) branch.
        action = Action.IN_SYNC
    else:
        action = Action.SYNC_SOURCE if me_keep else Action.SYNC_TARGET
    return out(
        action,
        because,
        cut_local_after=d if (cut and not me_keep and tail[0] > 0) else None,
        peer_cuts=cut and me_keep and tail[1] > 0,
        resync_from=d + 1 if tail[keeper] > 0 else None,
        full_sync=full,
        branch=(Branch.NONE if not branch else (Branch.RECEIVE if me_keep else Branch.SEND)),
        split_brain=split,
    )


def _diverged(
    local: NodeView, peer: NodeView, f: _Pair, policy: SplitBrainPolicy
) -> tuple[int, str, bool, bool, bool]:
    """Both sides have a branch after ``d``: (keeper or -1, rule, cut, ship branch, split)."""
    views = (local, peer)
    tail, acked = f.tail, f.acked
    if acked[0] != acked[1]:
        keeper = 0 if acked[0] else 1
        loser = 1 - keeper
        lv = views[loser]
        if tail[loser] == 0:
            rule = "rule:empty-branch"
        elif all(g.origin == lv.node_id for g in lv.history if _covers_after(lv, g, f.d)):
            rule = "rule:crashed-primary-unacked-tail"
        else:
            rule = "rule:origin-lost-tail"
        return keeper, rule, True, False, False
    if not acked[0]:
        return _tiebreak(views, f), "rule:both-tails-unacked", True, False, False
    # True split brain: both branches hold acknowledged writes.
    if local.discard_my_data != peer.discard_my_data:
        keeper = 1 if local.discard_my_data else 0
        return keeper, "rule:split-brain-discard-my-data", True, False, True
    if local.discard_my_data and peer.discard_my_data:
        return -1, "rule:split-brain-both-discard-my-data", False, False, True
    rule = f"rule:split-brain-{policy.value}"
    if policy is SplitBrainPolicy.MERGE:
        return _tiebreak(views, f), rule, True, True, True
    if policy is SplitBrainPolicy.DISCARD_YOUNGER_PRIMARY:
        ga, gb = _branch_generation(local, f.d), _branch_generation(peer, f.d)
        if ga == gb:
            return -1, rule, False, False, True
        return (0 if ga < gb else 1), rule, True, False, True
    if policy is SplitBrainPolicy.DISCARD_LEAST_CHANGES:
        if tail[0] == tail[1]:
            return -1, rule, False, False, True
        return (0 if tail[0] > tail[1] else 1), rule, True, False, True
    # DISCARD_ZERO_CHANGES: a side without changes is already handled by the rules above, so
    # here both wrote: DRBD disconnects. DISCONNECT: by definition.
    return -1, rule, False, False, True


def _covers_after(v: NodeView, g: Generation, d: int) -> bool:
    i = v.history.index(g)
    end = v.history[i + 1].first_lsn - 1 if i + 1 < len(v.history) else v.last_lsn
    return max(g.first_lsn, d + 1) <= min(end, v.last_lsn)


def _tiebreak(views: tuple[NodeView, NodeView], f: _Pair) -> int:
    """Who keeps its branch when neither rule decides: the primary; else the newer branch
    generation; else more records; else the higher node id. Symmetric by construction."""
    a, b = views
    if (a.role is Role.PRIMARY) != (b.role is Role.PRIMARY):
        return 0 if a.role is Role.PRIMARY else 1
    ka = (max((g.number for g in a.history), default=0), f.tail[0], a.node_id)
    kb = (max((g.number for g in b.history), default=0), f.tail[1], b.node_id)
    return 0 if ka > kb else 1


def _disconnect(rule: str, d: int, detail: str) -> Outcome:
    return Outcome(Action.DISCONNECT, rule, (rule,), d, detail=detail)


__all__ = [
    "NODE_ID_LEN",
    "Action",
    "Branch",
    "Generation",
    "HistoryError",
    "NodeView",
    "Outcome",
    "check_view",
    "decide",
    "divergence_lsn",
    "extend_history",
    "tail_acked",
    "truncate_history",
]
