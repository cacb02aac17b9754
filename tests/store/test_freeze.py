"""`Store.freeze_writes` / `thaw_writes` (replication fencing) on a real store.

A commit held by the durability barrier fails at once with `WritesFrozen` when writes freeze
(not acknowledged; its frame stays pending and becomes visible only when the barrier releases
it); new transactions, commits and blob chunks are refused before anything is appended; after
`thaw_writes` writes go on, and the store never left OPEN.
"""

from __future__ import annotations

import asyncio

import pytest

from mailharbor.store import Store, StoreReadOnly, StoreState, WritesFrozen

from . import inbox
from .test_store import GateBarrier, deliver, until


def test_freeze_fails_held_commits_and_refuses_new_ones(store: Store, alice: bytes) -> None:
    box = inbox(store, alice)
    deliver(store, b"before", [box])

    async def main() -> None:
        barrier = GateBarrier()
        store.barrier = barrier

        async def commit(body: bytes) -> None:
            async with store.transaction() as t:
                t.deliver(t.put_blob(body), [box])

        held = asyncio.create_task(commit(b"held by the barrier"))
        await until(lambda: bool(barrier.waits))
        last = store.last_lsn
        store.freeze_writes("peer lost")
        with pytest.raises(WritesFrozen):
            await held
        assert isinstance(WritesFrozen("x"), StoreReadOnly)
        with pytest.raises(WritesFrozen, match="peer lost"):
            store.transaction()
        assert store.last_lsn == last  # nothing appended by the refused attempt
        assert store.state is StoreState.OPEN
        assert list(store.index.mailboxes[box].uids) == [1]  # the held one is not visible
        # Released later (the peer came back / was fenced): the held frame applies.
        store.thaw_writes()
        barrier.release()
        await store.settle()
        assert list(store.index.mailboxes[box].uids) == [1, 2]
        await commit(b"after the thaw")
        assert list(store.index.mailboxes[box].uids) == [1, 2, 3]
        store.barrier = None

    asyncio.run(main())


def test_freeze_refuses_blob_chunks_of_an_open_transaction(store: Store, alice: bytes) -> None:
    box = inbox(store, alice)
    t = store.transaction()
    w = t.blob_writer()
    store.freeze_writes("peer lost")
    last = store.last_lsn
    with pytest.raises(WritesFrozen):
        w.write(b"x" * (1 << 20))  # chunk frames would be appended
    assert store.last_lsn == last
    t.abort()
    store.thaw_writes()
    deliver(store, b"fine", [box])
