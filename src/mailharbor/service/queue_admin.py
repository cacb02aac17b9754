"""The outbound queue's administration (``queue list/show/retry/delete/flush``): store-only
operations, so the admin server can load them without the queue runner's SMTP client and DNS
resolver (mailharbor.service.queue).

Contract: every operation goes through one store transaction; recipients being delivered right
now (``in_flight``) are never rescheduled, and a deleted entry gets no bounce.
"""

from __future__ import annotations

from collections.abc import Iterable

from mailharbor.store import NotFound, Store
from mailharbor.store.format import QueueResult
from mailharbor.store.index import QueueEntry

__all__ = ["delete_entry", "entry_view", "find_entry", "retry_entries"]


def entry_view(q: QueueEntry, store: Store | None = None) -> dict[str, object]:
    """A JSON-able description of a queue entry (``queue list/show``)."""
    size = 0
    if store is not None:
        s = store.index.blobs.slot(q.blob)
        if s is not None:
            size = int(store.index.blobs.size[s])
    return {
        "id": q.guid.hex(),
        "sender": q.sender,
        "recipients": list(q.recipients),
        "created_ms": q.created_ms,
        "attempts": q.attempts,
        "last_attempt_ms": q.last_attempt_ms,
        "last_term": q.last_term,
        "next_ms": q.next_ms,
        "last_detail": q.last_detail,
        "warned": q.warned,
        "in_flight": list(q.in_flight),
        "size": size,
        "params": q.params,
    }


def find_entry(store: Store, ident: str) -> QueueEntry:
    """The entry whose hex id is ``ident`` or starts with it (unambiguously)."""
    ident = ident.strip().lower()
    hits = [q for g, q in store.index.queue.items() if g.hex().startswith(ident)] if ident else []
    if len(hits) != 1:
        raise NotFound(
            f"no queue entry {ident!r}" if not hits else f"queue id {ident!r} is ambiguous"
        )
    return hits[0]


async def retry_entries(store: Store, entries: Iterable[QueueEntry], now_ms: int) -> int:
    """Make ``entries`` due now (recipients not in flight get a DEFERRED with next = now).
    Returns how many entries were rescheduled."""
    n = 0
    async with store.transaction() as t:
        for q in entries:
            idle = [r for r in q.recipients if r not in q.in_flight]
            if idle:
                t.queue_done(q.guid, idle[0], QueueResult.DEFERRED, q.last_detail, now_ms)
                n += 1
    return n


async def delete_entry(store: Store, q: QueueEntry) -> int:
    """Remove every recipient of ``q`` (DELETED, no bounce). Returns the count."""
    async with store.transaction() as t:
        for r in q.recipients:
            t.queue_done(q.guid, r, QueueResult.DELETED, "deleted by the administrator")
    return len(q.recipients)
