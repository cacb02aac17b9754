"""`Transaction.reserve` (allocation floors, the RESERVE record) and `deliver(msg_guid=)`."""

from __future__ import annotations

import asyncio

import pytest

from mailharbor.store import InvalidArgument, NotFound, Store
from mailharbor.store import format as fmt

from . import PWHASH, OpenStore, drop_checkpoints, inbox

ALICE = "alice@example.org"


def _records(st: Store, lsn: int) -> list[fmt.Record]:
    raw = next(iter(st.read_frames(lsn)))
    return fmt.decode_records(raw[fmt.FRAME_HEADER_SIZE :])


def _deliver(st: Store, box: bytes, body: bytes, **kw: object) -> tuple[int, int, bytes]:
    with st.transaction() as t:
        d = t.deliver(t.put_blob(body), [box], **kw)  # type: ignore[arg-type]
    return d.uids[box], d.modseqs[box], d.msg_guids[box]


def _reopen(st: Store, open_store: OpenStore, *, replay: bool) -> Store:
    st.close()
    if replay:
        drop_checkpoints(st.data_dir)
    return open_store(st.data_dir, st.options)


def test_reserve_raises_floors_for_the_next_deliveries(store: Store, alice: bytes) -> None:
    box = inbox(store, alice)
    _deliver(store, box, b"Subject: 1\r\n\r\none")
    with store.transaction() as t:
        t.reserve(box, uidnext=100, highestmodseq=500)
        d = t.deliver(t.put_blob(b"Subject: 2\r\n\r\ntwo"), [box])
    assert d.uids[box] == 100 and d.modseqs[box] == 501
    mb = store.index.mailboxes[box]
    assert mb.uidnext == 101 and mb.highestmodseq == 501
    uid, modseq, _ = _deliver(store, box, b"Subject: 3\r\n\r\nthree")
    assert (uid, modseq) == (101, 502)


@pytest.mark.parametrize("replay", [False, True], ids=["checkpoint", "replay"])
def test_floors_persist_without_a_delivery(
    open_store: OpenStore, alice: bytes, store: Store, replay: bool
) -> None:
    box = inbox(store, alice)
    with store.transaction() as t:
        t.reserve(box, uidnext=40, highestmodseq=70)
    lsn = store.last_lsn
    assert _records(store, lsn) == [fmt.Reserve(box, 40, 70)]
    mb = store.index.mailboxes[box]
    assert (mb.uidnext, mb.highestmodseq) == (40, 70)
    store.checkpoint()
    st = _reopen(store, open_store, replay=replay)
    mb = st.index.mailboxes[box]
    assert (mb.uidnext, mb.highestmodseq) == (40, 70)
    uid, modseq, _ = _deliver(st, box, b"Subject: x\r\n\r\nx")
    assert (uid, modseq) == (40, 71)


def test_reserve_never_lowers_and_writes_nothing_when_it_raises_nothing(
    store: Store, alice: bytes
) -> None:
    box = inbox(store, alice)
    for i in range(3):
        _deliver(store, box, f"Subject: {i}\r\n\r\n{i}".encode())
    mb = store.index.mailboxes[box]
    before = (mb.uidnext, mb.highestmodseq)
    last = store.last_lsn
    with store.transaction() as t:
        t.reserve(box, uidnext=2, highestmodseq=1)
    assert store.last_lsn == last  # nothing to write
    assert (mb.uidnext, mb.highestmodseq) == before
    # One counter raised, the other not: only the raised one is in the record.
    with store.transaction() as t:
        t.reserve(box, uidnext=1, highestmodseq=before[1] + 10)
    assert _records(store, store.last_lsn) == [fmt.Reserve(box, 0, before[1] + 10)]
    assert (mb.uidnext, mb.highestmodseq) == (before[0], before[1] + 10)


def test_reserve_honours_pending_allocations(store: Store, alice: bytes) -> None:
    """A floor below what concurrent (appended, not yet applied) commits allocated is a no-op;
    one above them raises."""
    box = inbox(store, alice)

    async def run() -> tuple[list[int], int]:
        async def one(i: int, floor: int = 0) -> int:
            t = store.transaction()
            if floor:
                t.reserve(box, uidnext=floor)
            d = t.deliver(t.put_blob(f"Subject: {i}\r\n\r\n{i}".encode()), [box])
            await t.commit_async()
            return d.uids[box]

        uids = await asyncio.gather(one(1), one(2), one(3, floor=2), one(4, floor=50))
        return list(uids), store.index.mailboxes[box].uidnext

    uids, uidnext = asyncio.run(run())
    assert uids[:3] == [1, 2, 3] and uids[3] == 50 and uidnext == 51


def test_reserve_argument_checks(store: Store, alice: bytes) -> None:
    box = inbox(store, alice)
    t = store.transaction()
    with pytest.raises(InvalidArgument):
        t.reserve(box, uidnext=1 << 32)
    with pytest.raises(InvalidArgument):
        t.reserve(box, highestmodseq=-1)
    t.abort()
    with pytest.raises(NotFound), store.transaction() as t:
        t.reserve(b"\x00" * 16, uidnext=5)


def test_deliver_keeps_a_given_message_guid(
    open_store: OpenStore, store: Store, alice: bytes
) -> None:
    box = inbox(store, alice)
    g = bytes(range(100, 116))
    uid, _, got = _deliver(store, box, b"Subject: kept\r\n\r\nk", msg_guid=g)
    assert got == g
    mb = store.index.mailboxes[box]
    pos = mb.position(uid)
    assert pos is not None and mb.msg_guid(pos) == g
    st = _reopen(store, open_store, replay=True)
    mb = st.index.mailboxes[box]
    pos = mb.position(uid)
    assert pos is not None and mb.msg_guid(pos) == g
    with st.transaction() as t:
        sent = t.add_account("bob@example.org", PWHASH)
    t2 = st.transaction()
    h = t2.put_blob(b"x")
    with pytest.raises(InvalidArgument):
        t2.deliver(h, [box, inbox(st, sent)], msg_guid=g)  # one mailbox only
    with pytest.raises(InvalidArgument):
        t2.deliver(h, [box], msg_guid=b"short")
    t2.abort()
