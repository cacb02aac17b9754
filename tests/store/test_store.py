"""The store's behaviour as the service layer and replication rely on it.

Real stores on real files in `tmp_path` (small segments and chunks, see `small_options`), real
fsyncs, a real second process for the data-directory lock; nothing in the store is mocked.

Covered: accounts, domains, mailboxes and their errors (a refused transaction changes nothing);
single-instance bodies; UID/UIDNEXT/HIGHESTMODSEQ across expunge, reopen, compaction and
checkpoints; flag and keyword deltas; expunge and VANISHED; rename/delete; the outbound queue;
MIME metadata; large bodies in chunks; aborted transactions and orphaned chunks; compaction;
checkpoints against full replay; segment rollover; the lock; group commit; visibility behind the
durability barrier; `read_frames` + `ingest_blocking` reproducing a store byte for byte.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from mailharbor.store import (
    AlreadyExists,
    CommitEvent,
    Delivery,
    InvalidArgument,
    NotFound,
    Store,
    StoreError,
    StoreLocked,
    StoreReadOnly,
    Transaction,
    blob_hash,
)
from mailharbor.store import format as fmt
from mailharbor.store import index as ix

from . import (
    DOMAIN,
    NODE2,
    PWHASH,
    OpenStore,
    drop_checkpoints,
    inbox,
    index_differences,
    log_bytes,
    mailbox,
    small_options,
)

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


# --- helpers ------------------------------------------------------------------------------------


def deliver(
    st: Store, body: bytes, boxes: list[bytes], *, flags: int = 0, keywords: Sequence[str] = ()
) -> Delivery:
    with st.transaction() as t:
        d = t.deliver(t.put_blob(body), boxes, flags=flags, keywords=keywords)
    return d


def add_account(st: Store, address: str) -> bytes:
    with st.transaction() as t:
        g = t.add_account(address, PWHASH)
    return g


def body_of(i: int, size: int = 300) -> bytes:
    rnd = random.Random(i)
    head = f"Message-ID: <{i}@test>\r\nSubject: {i}\r\n\r\n".encode()
    return head + rnd.randbytes(max(0, size - len(head)))


def message_hashes(st: Store, box: bytes) -> dict[int, bytes]:
    mb = st.index.mailboxes[box]
    return {mb.uids[i]: st.index.blobs.hash_at(mb.blobs[i]) for i in range(len(mb))}


def refs(st: Store, h: bytes) -> int:
    s = st.index.blobs.slot(h)
    return 0 if s is None else int(st.index.blobs.refs[s])


def reopen(st: Store, open_store: OpenStore, *, replay: bool = False) -> Store:
    """Close `st` and open its directory again (after deleting checkpoints if `replay`)."""
    st.close()
    if replay:
        drop_checkpoints(st.data_dir)
    return open_store(st.data_dir, st.options)


def assert_same_index(a: ix.Index, b: ix.Index) -> None:
    diffs = index_differences(a, b)
    assert a.serialize() == b.serialize(), "indexes differ:\n  " + "\n  ".join(diffs)


def seal_active_segment(st: Store, box: bytes) -> None:
    """Deliver and expunge filler until the log rolls to a new segment, so that everything
    written before is in a sealed segment (compaction never touches the active one)."""
    start = st.segments()[-1][0]
    i = 0
    while st.segments()[-1][0] == start:
        d = deliver(st, body_of(10_000 + i, 700), [box])
        with st.transaction() as t:
            t.expunge(box, [d.uids[box]])
        i += 1


# --- accounts, domains, mailboxes ---------------------------------------------------------------


def test_new_account_gets_default_mailboxes_special_use_and_subscriptions(
    store: Store, alice: bytes
) -> None:
    acct = store.index.accounts[alice]
    assert acct.address == ALICE and acct.password_hash == PWHASH
    expected = {
        "INBOX": 0,
        "Sent": ix.SU_SENT,
        "Drafts": ix.SU_DRAFTS,
        "Trash": ix.SU_TRASH,
        "Junk": ix.SU_JUNK,
        "Archive": ix.SU_ARCHIVE,
    }
    got = {}
    for name in expected:
        mb = store.index.mailbox_by_name(alice, name)
        assert mb is not None, name
        assert mb.account == alice and mb.name == name
        assert mb.uidnext == 1 and len(mb) == 0 and mb.uidvalidity > 0
        got[name] = mb.special_use
    assert got == expected
    assert acct.subscriptions == set(expected)
    assert set(acct.mailboxes.values()) == {
        g for g, mb in store.index.mailboxes.items() if mb.account == alice
    }
    # INBOX is case-insensitive, the other names are not.
    assert store.index.mailbox_by_name(alice, "inbox") is not None
    assert store.index.mailbox_by_name(alice, "sent") is None


def test_addresses_and_domains_are_normalized(store: Store) -> None:
    with store.transaction() as t:
        t.add_domain("Example.NET.")
        g = t.add_account("  Carol@EXAMPLE.net ", PWHASH, quota_bytes=5000)
    assert "example.net" in store.index.domains
    a = store.index.account_by_address("CAROL@example.NET")
    assert a is not None and a.guid == g and a.address == "carol@example.net"
    assert a.quota_bytes == 5000
    with store.transaction() as t:
        t.update_account("carol@example.net", password_hash="new", quota_bytes=0)
    a = store.index.account_by_address("carol@example.net")
    assert a is not None and a.password_hash == "new" and a.quota_bytes == 0


def test_duplicates_raise_already_exists(store: Store, alice: bytes) -> None:
    ops: dict[str, Callable[[Transaction], object]] = {
        "domain": lambda t: t.add_domain(DOMAIN.upper()),
        "account": lambda t: t.add_account(ALICE.upper(), PWHASH),
        "mailbox": lambda t: t.create_mailbox(alice, "Sent"),
        "INBOX in another case": lambda t: t.create_mailbox(alice, "iNbOx"),
        "rename onto an existing name": lambda t: t.rename_mailbox(
            mailbox(store, alice, "Sent"), "Trash"
        ),
        "account twice in one transaction": lambda t: (
            t.add_account(BOB, PWHASH),
            t.add_account(BOB, PWHASH),
        ),
        "mailbox twice in one transaction": lambda t: (
            t.create_mailbox(alice, "Twice"),
            t.create_mailbox(alice, "Twice"),
        ),
        "alias over an account": lambda t: t.set_alias(ALICE, [BOB]),
    }
    for what, op in ops.items():
        before = store.index.serialize()
        with pytest.raises(AlreadyExists), store.transaction() as t:
            op(t)
        assert store.index.serialize() == before, what


def test_unknown_things_raise_not_found(store: Store, alice: bytes) -> None:
    box = inbox(store, alice)
    d = deliver(store, b"x", [box])
    h = blob_hash(b"x")
    missing = bytes(16)
    ops: dict[str, Callable[[Transaction], object]] = {
        "account in an unknown domain": lambda t: t.add_account("x@nowhere.test", PWHASH),
        "delete unknown account": lambda t: t.delete_account(BOB),
        "update unknown account": lambda t: t.update_account(BOB, quota_bytes=1),
        "remove unknown domain": lambda t: t.remove_domain("nowhere.test"),
        "remove unknown alias": lambda t: t.remove_alias(f"nobody@{DOMAIN}"),
        "alias in an unknown domain": lambda t: t.set_alias("a@nowhere.test", [ALICE]),
        "deliver to an unknown mailbox": lambda t: t.deliver(h, [box, missing]),
        "deliver an unknown body": lambda t: t.deliver(blob_hash(b"never stored"), [box]),
        "flags in an unknown mailbox": lambda t: t.store_flags(missing, [1], add=ix.SEEN),
        "expunge in an unknown mailbox": lambda t: t.expunge(missing, [1]),
        "rename an unknown mailbox": lambda t: t.rename_mailbox(missing, "X"),
        "delete an unknown mailbox": lambda t: t.delete_mailbox(missing),
        "create in an unknown account": lambda t: t.create_mailbox(missing, "X"),
        "subscribe in an unknown account": lambda t: t.subscribe(missing, "X"),
        "queue an unknown body": lambda t: t.queue_add(blob_hash(b"?"), ALICE, ["r@x.test"]),
        "attempt an unknown queue entry": lambda t: t.queue_attempt(missing, 1, ["r@x.test"]),
        "finish an unknown queue entry": lambda t: t.queue_done(
            missing, "r@x.test", fmt.QueueResult.DELIVERED
        ),
    }
    for what, op in ops.items():
        before = store.index.serialize()
        lsn = store.last_lsn
        with pytest.raises(NotFound), store.transaction() as t:
            t.store_flags(box, [d.uids[box]], add=ix.FLAGGED)  # a valid op first
            op(t)
        assert store.index.serialize() == before, what
        assert store.last_lsn == lsn, what
    with pytest.raises(NotFound):
        store.read_blob(blob_hash(b"never stored"))


@pytest.mark.parametrize(
    "op",
    [
        pytest.param(lambda t, a, i: t.add_account("no-at-sign", PWHASH), id="address without @"),
        pytest.param(lambda t, a, i: t.add_account("a b@example.org", PWHASH), id="space in local"),
        pytest.param(lambda t, a, i: t.add_account("a@-bad-.org", PWHASH), id="bad domain"),
        pytest.param(lambda t, a, i: t.add_account("@example.org", PWHASH), id="empty local"),
        pytest.param(lambda t, a, i: t.add_account("b@example.org", PWHASH, -1), id="neg quota"),
        pytest.param(lambda t, a, i: t.add_domain("bad_domain!"), id="bad domain name"),
        pytest.param(lambda t, a, i: t.add_domain(""), id="empty domain"),
        pytest.param(lambda t, a, i: t.create_mailbox(a, ""), id="empty mailbox name"),
        pytest.param(lambda t, a, i: t.create_mailbox(a, "a*b"), id="star"),
        pytest.param(lambda t, a, i: t.create_mailbox(a, "a%b"), id="percent"),
        pytest.param(lambda t, a, i: t.create_mailbox(a, "a\x01b"), id="control char"),
        pytest.param(lambda t, a, i: t.create_mailbox(a, "/lead"), id="leading slash"),
        pytest.param(lambda t, a, i: t.create_mailbox(a, "trail/"), id="trailing slash"),
        pytest.param(lambda t, a, i: t.create_mailbox(a, "a//b"), id="empty level"),
        pytest.param(lambda t, a, i: t.create_mailbox(a, "x" * 256), id="too long"),
        pytest.param(lambda t, a, i: t.set_alias(f"x@{DOMAIN}", []), id="alias without targets"),
        pytest.param(lambda t, a, i: t.set_alias(f"x@{DOMAIN}", ["bad"]), id="bad alias target"),
        pytest.param(lambda t, a, i: t.queue_add(bytes(32), "s@x.test", []), id="queue no rcpt"),
        pytest.param(lambda t, a, i: t.remove_domain(DOMAIN), id="domain still used"),
        pytest.param(lambda t, a, i: t.rename_mailbox(i, "X"), id="rename INBOX"),
        pytest.param(lambda t, a, i: t.delete_mailbox(i), id="delete INBOX"),
    ],
)
def test_bad_arguments_raise_invalid_argument_and_change_nothing(
    store: Store, alice: bytes, op: Callable[[Transaction, bytes, bytes], object]
) -> None:
    box = inbox(store, alice)
    deliver(store, b"before", [box])
    before = store.index.serialize()
    lsn, commits = store.last_lsn, store.stats_commits
    with pytest.raises(InvalidArgument), store.transaction() as t:
        t.deliver(t.put_blob(b"not visible"), [box])
        op(t, alice, box)
    assert store.index.serialize() == before
    assert store.last_lsn == lsn and store.stats_commits == commits


def test_deliver_argument_checks(store: Store, alice: bytes) -> None:
    box = inbox(store, alice)
    with pytest.raises(InvalidArgument), store.transaction() as t:
        t.deliver(t.put_blob(b"x"), [])
    with pytest.raises(InvalidArgument), store.transaction() as t:
        t.deliver(t.put_blob(b"x"), [box, box])
    assert len(store.index.mailboxes[box]) == 0


def test_failed_transaction_allocates_nothing(store: Store, alice: bytes) -> None:
    """A refused transaction leaves no trace: no visible change, UIDNEXT/HIGHESTMODSEQ and the
    allocation counters unchanged — the next delivery gets exactly the next UID and MODSEQ."""
    box = inbox(store, alice)
    sent = mailbox(store, alice, "Sent")
    d1 = deliver(store, b"one", [box, sent])
    mb = store.index.mailboxes[box]
    uidnext, hms = mb.uidnext, mb.highestmodseq
    before = store.index.serialize()
    lsn = store.last_lsn
    for _ in range(3):
        with pytest.raises(AlreadyExists), store.transaction() as t:
            t.deliver(t.put_blob(b"two"), [box, sent])
            t.store_flags(box, [d1.uids[box]], add=ix.SEEN)
            t.expunge(sent, [d1.uids[sent]])
            t.create_mailbox(alice, "Trash")  # exists
    assert store.index.serialize() == before
    assert store.last_lsn == lsn
    assert (mb.uidnext, mb.highestmodseq) == (uidnext, hms)
    assert store.read_blob(blob_hash(b"one")) == b"one"
    with pytest.raises(NotFound):
        store.read_blob(blob_hash(b"two"))
    d2 = deliver(store, b"two", [box])
    assert d2.uids[box] == uidnext and d2.modseqs[box] == hms + 1


def test_failed_async_transaction_in_a_batch_leaves_no_gap(store: Store, alice: bytes) -> None:
    box = inbox(store, alice)

    async def good(i: int) -> int:
        async with store.transaction() as t:
            d = t.deliver(t.put_blob(body_of(i)), [box])
        return d.uids[box]

    async def bad() -> None:
        async with store.transaction() as t:
            t.deliver(t.put_blob(b"refused"), [box, bytes(16)])

    async def main() -> list[object]:
        jobs: list[Awaitable[object]] = [good(i) for i in range(10)]
        jobs.insert(5, bad())
        return await asyncio.gather(*jobs, return_exceptions=True)

    res = asyncio.run(main())
    assert isinstance(res[5], NotFound)
    uids = [r for r in res if isinstance(r, int)]
    assert sorted(uids) == list(range(1, 11))
    assert list(store.index.mailboxes[box].uids) == list(range(1, 11))


def test_domain_removal(store: Store, alice: bytes) -> None:
    with store.transaction() as t:
        t.add_domain("other.test")
        t.set_alias("@other.test", [ALICE])
    with pytest.raises(InvalidArgument), store.transaction() as t:
        t.remove_domain("other.test")  # an alias still uses it
    with store.transaction() as t:
        t.remove_alias("@other.test")
    with store.transaction() as t:
        t.remove_domain("other.test")
    assert "other.test" not in store.index.domains
    assert store.index.aliases == {}


@pytest.mark.parametrize(
    "case", ["remove alias, then domain", "delete account, then domain", "set, then remove alias"]
)
def test_a_transaction_sees_its_own_earlier_operations(store: Store, case: str) -> None:
    """Operations are validated against the durable index plus the effects of the same
    transaction's earlier operations (ops.py), so each of these sequences commits as a unit."""
    with store.transaction() as t:
        t.add_domain("other.test")
        if case == "remove alias, then domain":
            t.set_alias("@other.test", [f"x@{DOMAIN}"])
        elif case == "delete account, then domain":
            t.add_account("carol@other.test", PWHASH)
    with store.transaction() as t:
        if case == "remove alias, then domain":
            t.remove_alias("@other.test")
            t.remove_domain("other.test")
        elif case == "delete account, then domain":
            t.delete_account("carol@other.test")
            t.remove_domain("other.test")
        else:
            t.set_alias("new@other.test", [f"x@{DOMAIN}"])
            t.remove_alias("new@other.test")
    assert store.index.aliases == {}
    assert store.index.account_by_address("carol@other.test") is None
    assert ("other.test" in store.index.domains) == (case == "set, then remove alias")


def test_aliases(store: Store, alice: bytes) -> None:
    with store.transaction() as t:
        t.set_alias(f"Postmaster@{DOMAIN}", [ALICE, ALICE.upper(), BOB])
    assert store.index.aliases == {f"postmaster@{DOMAIN}": (ALICE, BOB)}
    with pytest.raises(AlreadyExists), store.transaction() as t:
        t.add_account(f"postmaster@{DOMAIN}", PWHASH)
    with store.transaction() as t:
        t.remove_alias(f"POSTMASTER@{DOMAIN}")
    assert store.index.aliases == {}


# --- single instance ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_one_body_for_100_mailboxes_is_stored_once(open_store: OpenStore) -> None:
    st = open_store(options=small_options(segment_bytes=4 << 20, chunk_bytes=256 * 1024))
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        accounts = [t.add_account(f"u{i}@{DOMAIN}", PWHASH) for i in range(17)]
    boxes = [g for g, mb in st.index.mailboxes.items() if mb.account in accounts][:100]
    assert len(boxes) == 100
    body = b"Received: from a.test by b.test\r\n\r\n" + random.Random(1).randbytes(64 * 1024)
    before = log_bytes(st)
    with st.transaction() as t:
        h = t.put_blob(body)
        assert t.put_blob(body) == h  # twice in one transaction: still once
        d = t.deliver(h, boxes)
    grown = log_bytes(st) - before
    # One body plus a compact 60-byte target per mailbox and a little framing; far below two.
    assert len(body) <= grown <= len(body) + 100 * 64 + 512, grown
    assert refs(st, h) == 100
    assert len(set(d.msg_guids.values())) == 100
    for g in boxes:
        mb = st.index.mailboxes[g]
        assert list(mb.uids) == [d.uids[g]] and mb.sizes[0] == len(body)
        assert st.index.blobs.hash_at(mb.blobs[0]) == h
        assert st.read_blob(h) == body
    stats = st.stats()
    assert stats["unique_body_bytes"] == len(body)
    assert stats["logical_bytes"] == 100 * len(body)
    # A later delivery of the same body references the stored copy.
    before = log_bytes(st)
    deliver(st, body, boxes[:3])
    assert log_bytes(st) - before < 1024
    assert refs(st, h) == 103
    st2 = reopen(st, open_store, replay=True)
    assert refs(st2, h) == 103 and st2.read_blob(h) == body


# --- UIDs and the counters that never go down ---------------------------------------------------


def test_uids_ascend_and_counters_never_go_down(open_store: OpenStore) -> None:
    st = open_store()
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
    box = inbox(st, a)
    uids = [deliver(st, body_of(i, 600), [box]).uids[box] for i in range(8)]
    assert uids == list(range(1, 9))
    with st.transaction() as t:
        t.store_flags(box, [2], add=ix.SEEN)
    with st.transaction() as t:
        c = t.expunge(box, [6, 7, 8])
    assert c.uids == (6, 7, 8)
    mb = st.index.mailboxes[box]
    assert list(mb.uids) == [1, 2, 3, 4, 5]
    uidnext, hms = mb.uidnext, mb.highestmodseq
    # Deliveries took MODSEQs 2..9, the flag change 10, the expunge 11.
    assert uidnext == 9 and hms == c.modseq == 11

    def check(s: Store, what: str) -> None:
        m = s.index.mailboxes[box]
        assert (m.uidnext, m.highestmodseq) == (uidnext, hms), what
        assert list(m.uids) == [1, 2, 3, 4, 5], what

    seal_active_segment(st, mailbox(st, a, "Trash"))
    st.checkpoint()
    check(st, "after checkpoint")
    st = reopen(st, open_store)
    check(st, "after reopen from a checkpoint")
    report = st.compact()
    assert report.blobs_reclaimed >= 3
    check(st, "after compaction")
    st = reopen(st, open_store)
    check(st, "after compaction and reopen")
    st = reopen(st, open_store, replay=True)
    check(st, "after a full replay")
    d = deliver(st, b"next", [box])
    assert d.uids[box] == uidnext and d.modseqs[box] == hms + 1
    # Expunging the newest message still never lowers the counters.
    with st.transaction() as t:
        t.expunge(box, [uidnext])
    st = reopen(st, open_store, replay=True)
    m = st.index.mailboxes[box]
    assert m.uidnext == uidnext + 1 and m.highestmodseq == hms + 2


def test_recreated_mailbox_is_a_new_mailbox(store: Store, alice: bytes) -> None:
    with store.transaction() as t:
        g1 = t.create_mailbox(alice, "Projects")
    deliver(store, b"p", [g1])
    mb1 = store.index.mailboxes[g1]
    with store.transaction() as t:
        t.delete_mailbox(g1)
    with store.transaction() as t:
        g2 = t.create_mailbox(alice, "Projects")
    mb2 = store.index.mailboxes[g2]
    assert g2 != g1 and mb2.uidvalidity > mb1.uidvalidity
    assert mb2.uidnext == 1 and len(mb2) == 0


# --- flags, keywords, expunge -------------------------------------------------------------------


def test_flag_deltas(store: Store, alice: bytes) -> None:
    box = inbox(store, alice)
    for i in range(4):
        deliver(store, body_of(i), [box], flags=ix.DRAFT if i == 3 else 0)
    mb = store.index.mailboxes[box]
    assert list(mb.flags) == [0, 0, 0, ix.DRAFT]
    with store.transaction() as t:
        c1 = t.store_flags(box, [1, 2, 99], add=ix.SEEN | ix.FLAGGED)
    assert c1.uids == (1, 2) and c1.modseq == mb.highestmodseq
    assert list(mb.flags) == [ix.SEEN | ix.FLAGGED, ix.SEEN | ix.FLAGGED, 0, ix.DRAFT]
    assert mb.modseqs[0] == mb.modseqs[1] == c1.modseq
    with store.transaction() as t:
        c2 = t.store_flags(box, [2, 3, 4], add=ix.ANSWERED, remove=ix.SEEN | ix.DRAFT)
    assert c2.modseq == c1.modseq + 1
    # A delta: untouched bits stay, removed bits go, messages not named keep their MODSEQ.
    assert list(mb.flags) == [
        ix.SEEN | ix.FLAGGED,
        ix.FLAGGED | ix.ANSWERED,
        ix.ANSWERED,
        ix.ANSWERED,
    ]
    assert mb.modseqs[0] == c1.modseq and list(mb.modseqs[1:]) == [c2.modseq] * 3
    # Removing wins over adding the same flag in one delta.
    with store.transaction() as t:
        t.store_flags(box, [1], add=ix.DELETED, remove=ix.DELETED)
    assert mb.flags[0] == ix.SEEN | ix.FLAGGED
    # Nothing to change: no record, no MODSEQ.
    hms, lsn = mb.highestmodseq, store.last_lsn
    with store.transaction() as t:
        c3 = t.store_flags(box, [42], add=ix.SEEN)
    assert c3.modseq == 0 and c3.uids == ()
    assert mb.highestmodseq == hms and store.last_lsn == lsn


def test_keywords_are_case_insensitive(store: Store, alice: bytes) -> None:
    box = inbox(store, alice)
    deliver(store, b"k1", [box], keywords=["$Label1"])
    deliver(store, b"k2", [box])
    mb = store.index.mailboxes[box]

    def kws(uid: int) -> list[str]:
        i = mb.position(uid)
        assert i is not None
        return mb.keyword_names(mb.kwbits[i])

    assert kws(1) == ["$Label1"] and kws(2) == []
    with store.transaction() as t:
        t.store_flags(box, [1, 2], add_keywords=["$LABEL1", "Work"])
    assert mb.keywords == ["$Label1", "Work"]  # the first spelling is kept
    assert kws(1) == ["$Label1", "Work"] and kws(2) == ["$Label1", "Work"]
    with store.transaction() as t:
        t.store_flags(box, [1], remove_keywords=["$label1", "unknown"])
    assert kws(1) == ["Work"] and kws(2) == ["$Label1", "Work"]
    with store.transaction() as t:
        t.store_flags(box, [2], add_keywords=["work"], remove_keywords=["WORK"])
    assert kws(2) == ["$Label1"]  # remove wins, whatever the case


def test_keyword_limit_per_mailbox(store: Store, alice: bytes) -> None:
    box = inbox(store, alice)
    deliver(store, b"k", [box], keywords=[f"k{i}" for i in range(ix.MAX_KEYWORDS)])
    with pytest.raises(InvalidArgument), store.transaction() as t:
        t.store_flags(box, [1], add_keywords=["one-too-many"])
    with pytest.raises(InvalidArgument), store.transaction() as t:
        t.deliver(t.put_blob(b"k2"), [box], keywords=["another"])
    # Known keywords in another case are not new.
    with store.transaction() as t:
        t.store_flags(box, [1], remove_keywords=["K0"], add_keywords=["K1"])
    assert len(store.index.mailboxes[box].keywords) == ix.MAX_KEYWORDS


def test_expunge_records_vanished_uids_with_modseq(store: Store, alice: bytes) -> None:
    box = inbox(store, alice)
    shared = b"shared body"
    for i in range(5):
        deliver(store, shared if i < 2 else body_of(i), [box])
    h = blob_hash(shared)
    assert refs(store, h) == 2
    with store.transaction() as t:
        c1 = t.expunge(box, [2, 4, 77])
    with store.transaction() as t:
        c2 = t.expunge(box, [1, 2])  # 2 is gone already
    mb = store.index.mailboxes[box]
    assert c1.uids == (2, 4) and c2.uids == (1,) and c2.modseq == c1.modseq + 1
    assert list(mb.uids) == [3, 5]
    assert list(mb.vanished_uids) == [2, 4, 1]
    assert list(mb.vanished_modseqs) == [c1.modseq, c1.modseq, c2.modseq]
    assert mb.highestmodseq == c2.modseq
    assert refs(store, h) == 0
    assert store.stats()["messages"] == 2
    # An expunge of nothing writes nothing.
    lsn = store.last_lsn
    with store.transaction() as t:
        c3 = t.expunge(box, [1, 2, 4])
    assert c3.modseq == 0 and store.last_lsn == lsn


# --- mailboxes ----------------------------------------------------------------------------------


def test_rename_keeps_the_mailbox_guid(open_store: OpenStore) -> None:
    st = open_store()
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
        g = t.create_mailbox(a, "Old/Name")
    d = deliver(st, b"kept", [g], flags=ix.SEEN)
    before = st.index.mailboxes[g]
    uidvalidity, uidnext = before.uidvalidity, before.uidnext
    with st.transaction() as t:
        t.rename_mailbox(g, "New/Name")
    assert st.index.mailbox_by_name(a, "Old/Name") is None
    mb = st.index.mailbox_by_name(a, "New/Name")
    assert mb is not None and mb.guid == g and mb.name == "New/Name"
    assert (mb.uidvalidity, mb.uidnext, list(mb.uids)) == (uidvalidity, uidnext, [d.uids[g]])
    # The old name is free again, the new one is taken; INBOX may not be the target.
    with st.transaction() as t:
        g_old = t.create_mailbox(a, "Old/Name")
    assert g_old != g
    with pytest.raises(AlreadyExists), st.transaction() as t:
        t.rename_mailbox(g, "inbox")
    # Rename, then reuse the old name, in one transaction.
    with st.transaction() as t:
        t.rename_mailbox(g, "Third")
        t.create_mailbox(a, "New/Name")
    for replay in (False, True):
        st = reopen(st, open_store, replay=replay)
        mb2 = st.index.mailbox_by_name(a, "Third")
        assert mb2 is not None and mb2.guid == g and mb2.uidvalidity == uidvalidity
        assert st.index.mailbox_by_name(a, "New/Name") is not None
        assert st.read_blob(blob_hash(b"kept")) == b"kept"


def test_delete_mailbox_drops_references(store: Store, alice: bytes) -> None:
    box = inbox(store, alice)
    with store.transaction() as t:
        g = t.create_mailbox(alice, "Doomed")
    deliver(store, b"both", [box, g])
    deliver(store, b"only doomed", [g])
    assert refs(store, blob_hash(b"both")) == 2
    assert store.stats()["messages"] == 3
    with store.transaction() as t:
        t.delete_mailbox(g)
    assert g not in store.index.mailboxes
    assert store.index.mailbox_by_name(alice, "Doomed") is None
    assert refs(store, blob_hash(b"both")) == 1
    assert refs(store, blob_hash(b"only doomed")) == 0
    assert store.stats()["messages"] == 1
    with pytest.raises(NotFound), store.transaction() as t:
        t.deliver(blob_hash(b"both"), [g])
    with pytest.raises(NotFound), store.transaction() as t:
        t.delete_mailbox(g)


def test_delete_account_drops_mailboxes_and_references(store: Store, alice: bytes) -> None:
    bob = add_account(store, BOB)
    deliver(store, b"to both", [inbox(store, alice), inbox(store, bob)])
    deliver(store, b"to alice", [inbox(store, alice), mailbox(store, alice, "Archive")])
    alice_boxes = set(store.index.accounts[alice].mailboxes.values())
    with store.transaction() as t:
        t.delete_account(ALICE.upper())
    assert alice not in store.index.accounts
    assert store.index.account_by_address(ALICE) is None
    assert not alice_boxes & set(store.index.mailboxes)
    assert refs(store, blob_hash(b"to both")) == 1
    assert refs(store, blob_hash(b"to alice")) == 0
    assert store.stats()["messages"] == 1
    # The address can be used again: a new account with new mailboxes.
    again = add_account(store, ALICE)
    assert again != alice
    assert len(store.index.mailboxes[inbox(store, again)]) == 0
    with pytest.raises(AlreadyExists), store.transaction() as t:
        t.add_account(ALICE, PWHASH)


def test_subscriptions(store: Store, alice: bytes) -> None:
    with store.transaction() as t:
        t.subscribe(alice, "Lists/python")
        t.subscribe(alice, "Junk", False)
        t.subscribe(alice, "inbox", False)
    assert store.index.accounts[alice].subscriptions == {
        "Sent",
        "Drafts",
        "Trash",
        "Archive",
        "Lists/python",
    }


# --- the outbound queue -------------------------------------------------------------------------


def test_queue_lifecycle(open_store: OpenStore) -> None:
    st = open_store()
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
    body = b"outbound body"
    with st.transaction() as t:
        h = t.put_blob(body)
        t.deliver(h, [mailbox(st, a, "Sent")])
        q = t.queue_add(h, ALICE, ["x@remote.test", "y@remote.test", "z@remote.test"], "RET=HDRS")
    e = st.index.queue[q]
    assert (e.sender, e.recipients, e.params, e.attempts) == (
        ALICE,
        ["x@remote.test", "y@remote.test", "z@remote.test"],
        "RET=HDRS",
        0,
    )
    assert refs(st, h) == 2  # the Sent copy and the queue entry
    with st.transaction() as t:
        t.queue_attempt(q, 7, ["x@remote.test", "y@remote.test"])
    e = st.index.queue[q]
    assert (e.attempts, e.last_term) == (1, 7)
    assert e.in_flight == ["x@remote.test", "y@remote.test"]
    with st.transaction() as t:
        t.queue_done(q, "x@remote.test", fmt.QueueResult.DELIVERED, "250 ok")
        t.queue_done(q, "y@remote.test", fmt.QueueResult.DEFERRED, "451 later", next_ms=99_000)
    e = st.index.queue[q]
    assert e.recipients == ["y@remote.test", "z@remote.test"]
    assert e.in_flight == [] and e.next_ms == 99_000 and e.last_detail == "451 later"
    st = reopen(st, open_store, replay=True)
    e = st.index.queue[q]
    assert e.recipients == ["y@remote.test", "z@remote.test"] and e.attempts == 1
    assert st.read_blob(h) == body
    with st.transaction() as t:
        t.queue_attempt(q, 8, ["y@remote.test", "z@remote.test"])
        t.queue_done(q, "y@remote.test", fmt.QueueResult.BOUNCED, "550 no")
        t.queue_done(q, "z@remote.test", fmt.QueueResult.EXPIRED, "too old")
    assert q not in st.index.queue
    assert refs(st, h) == 1
    with pytest.raises(NotFound), st.transaction() as t:
        t.queue_attempt(q, 9, ["y@remote.test"])


# --- MIME metadata ------------------------------------------------------------------------------


def test_mime_meta_stored_and_read_back(open_store: OpenStore) -> None:
    st = open_store()
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
    box = inbox(st, a)
    with st.transaction() as t:
        h1 = t.put_blob(b"body one")
        t.put_mime_meta(h1, 1, b"(ENVELOPE one)")
        t.deliver(h1, [box])
    deliver(st, b"body two", [box])
    h2 = blob_hash(b"body two")
    assert st.read_mime_meta(h1) == (1, b"(ENVELOPE one)")
    assert st.read_mime_meta(h2) is None
    # Metadata for a body already stored, in a later transaction; empty data is not "none".
    with st.transaction() as t:
        t.put_mime_meta(h2, 0, b"")
    assert st.read_mime_meta(h2) == (0, b"")
    for replay in (False, True):
        st = reopen(st, open_store, replay=replay)
        assert st.read_mime_meta(h1) == (1, b"(ENVELOPE one)"), replay
        assert st.read_mime_meta(h2) == (0, b""), replay


def test_newer_mime_meta_replaces_the_old_one(store: Store, alice: bytes) -> None:
    """The service layer re-parses with a newer encoding version: reads then return the new
    metadata (as they do after a reopen), not a cached copy of the old."""
    with store.transaction() as t:
        h = t.put_blob(b"reparsed body")
        t.put_mime_meta(h, 1, b"v1")
        t.deliver(h, [inbox(store, alice)])
    assert store.read_mime_meta(h) == (1, b"v1")
    with store.transaction() as t:
        t.put_mime_meta(h, 2, b"\x00v2\xff")
    assert store.read_mime_meta(h) == (2, b"\x00v2\xff")


def test_compaction_keeps_mime_meta_of_live_bodies(open_store: OpenStore) -> None:
    st = open_store()
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
    box = inbox(st, a)
    with st.transaction() as t:
        h = t.put_blob(b"a live body")
        t.put_mime_meta(h, 7, b"(ENVELOPE live)")
        t.deliver(h, [box])
    seal_active_segment(st, mailbox(st, a, "Trash"))
    report = st.compact()
    assert report.segments_rewritten >= 1
    assert st.read_blob(h) == b"a live body"
    assert st.read_mime_meta(h) == (7, b"(ENVELOPE live)")
    st = reopen(st, open_store, replay=True)
    assert st.read_mime_meta(h) == (7, b"(ENVELOPE live)")


# --- large bodies -------------------------------------------------------------------------------


def test_large_body_via_put_blob_is_streamed_in_chunks(open_store: OpenStore) -> None:
    opts = small_options(chunk_bytes=1024, segment_bytes=64 * 1024)
    st = open_store(options=opts)
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
    box = inbox(st, a)
    body = random.Random(5).randbytes(10 * 1024 + 17)
    frames = st.stats_frames
    with st.transaction() as t:
        h = t.put_blob(body)
        assert st.last_lsn > st.visible_lsn  # chunks are in the log, not visible
        t.deliver(h, [box])
    # 11 chunk frames and the committing frame.
    assert st.stats_frames - frames == 12
    slot = st.index.blobs.slot(h)
    assert slot is not None and len(st.index.blobs.location(slot)) == 11
    assert st.read_blob(h) == body
    for replay in (False, True):
        st = reopen(st, open_store, replay=replay)
        assert st.read_blob(h) == body
        assert st.index.mailboxes[box].sizes[0] == len(body)
    assert st.stats()["orphan_chunk_streams"] == 0


def test_large_body_via_blob_writer(open_store: OpenStore) -> None:
    st = open_store(options=small_options(chunk_bytes=1000, segment_bytes=6000))
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
    box = inbox(st, a)
    rnd = random.Random(9)
    parts = [rnd.randbytes(rnd.randrange(1, 2500)) for _ in range(12)]
    body = b"".join(parts)
    visible = st.visible_lsn
    with st.transaction() as t:
        w = t.blob_writer()
        for p in parts:
            w.write(p)
        assert st.visible_lsn == visible
        assert len(st.index.mailboxes[box]) == 0
        h = w.finish()
        with pytest.raises(InvalidArgument):
            w.write(b"more")
        d = t.deliver(h, [box])
    assert h == blob_hash(body)
    assert len(st.segments()) > 2  # the chunks rolled over segments
    assert st.read_blob(h) == body
    assert st.index.mailboxes[box].sizes[0] == len(body)
    # A small body through a writer never leaves memory before the commit.
    frames = st.stats_frames
    with st.transaction() as t:
        w = t.blob_writer()
        w.write(b"small")
        t.deliver(w.finish(), [box])
    assert st.stats_frames == frames + 1
    for replay in (False, True):
        st = reopen(st, open_store, replay=replay)
        assert st.read_blob(h) == body and st.read_blob(blob_hash(b"small")) == b"small"
        assert message_hashes(st, box) == {d.uids[box]: h, d.uids[box] + 1: blob_hash(b"small")}


# --- aborted transactions and orphaned chunks ---------------------------------------------------


def test_aborted_transaction_leaves_nothing_and_its_chunks_are_reclaimed(
    open_store: OpenStore,
) -> None:
    st = open_store()
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
    box = inbox(st, a)
    deliver(st, b"before", [box])
    before = st.index.serialize()
    big = random.Random(3).randbytes(5 * 1024)
    with pytest.raises(RuntimeError, match="client went away"), st.transaction() as t:
        w = t.blob_writer()
        w.write(big)
        h = w.finish()
        t.deliver(h, [box])
        t.create_mailbox(a, "Never")
        raise RuntimeError("client went away")
    assert st.index.serialize() == before  # the chunk frames are not even applied yet
    assert st.index.mailbox_by_name(a, "Never") is None
    with pytest.raises(NotFound):
        st.read_blob(h)
    d = deliver(st, b"after", [box])
    assert d.uids[box] == 2
    assert st.stats()["orphan_chunk_streams"] == 1
    seal_active_segment(st, mailbox(st, a, "Trash"))
    size = log_bytes(st)
    report = st.compact()
    assert report.chunks_reclaimed == 5
    assert st.stats()["orphan_chunk_streams"] == 0
    assert size - log_bytes(st) >= len(big)
    assert st.read_blob(blob_hash(b"before")) == b"before"
    st = reopen(st, open_store, replay=True)
    assert st.stats()["orphan_chunk_streams"] == 0
    assert message_hashes(st, box) == {1: blob_hash(b"before"), 2: blob_hash(b"after")}


def test_chunks_of_a_refused_commit_are_reclaimed(open_store: OpenStore) -> None:
    """A commit refused at validation (here NotFound) streamed its chunks already; nobody will
    ever commit them, so they are orphans that compaction reclaims, as for an abort."""
    st = open_store()
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
    box = inbox(st, a)
    big = random.Random(4).randbytes(4 * 1024)
    with pytest.raises(NotFound), st.transaction() as t:
        w = t.blob_writer()
        w.write(big)
        t.deliver(w.finish(), [box, bytes(16)])
    seal_active_segment(st, mailbox(st, a, "Trash"))
    report = st.compact()
    assert report.chunks_reclaimed == 4, report
    assert st.stats()["orphan_chunk_streams"] == 0


def test_chunks_of_an_open_transaction_survive_compaction(open_store: OpenStore) -> None:
    st = open_store()
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
    box = inbox(st, a)
    first = random.Random(6).randbytes(3000)
    with st.transaction() as t:
        w = t.blob_writer()
        w.write(first)
        # Meanwhile other transactions commit, the log rolls and compaction runs.
        seal_active_segment(st, mailbox(st, a, "Trash"))
        report = st.compact()
        assert report.segments_rewritten >= 1 and report.chunks_reclaimed == 0
        w.write(b"the end")
        h = w.finish()
        t.deliver(h, [box])
    assert st.read_blob(h) == first + b"the end"
    st = reopen(st, open_store, replay=True)
    assert st.read_blob(h) == first + b"the end"


# --- compaction ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_compaction_reclaims_expunged_bodies(open_store: OpenStore) -> None:
    st = open_store(options=small_options(segment_bytes=16 * 1024, chunk_bytes=2048))
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
    box = inbox(st, a)
    bodies = {i: body_of(i, 1500 if i % 5 else 5000) for i in range(40)}
    uid_of = {i: deliver(st, b, [box]).uids[box] for i, b in bodies.items()}
    dead = [i for i in bodies if i % 2]
    with st.transaction() as t:
        t.expunge(box, [uid_of[i] for i in dead])
    seal_active_segment(st, mailbox(st, a, "Trash"))
    size = log_bytes(st)
    report = st.compact()
    dead_bytes = sum(len(bodies[i]) for i in dead)
    # Bodies over chunk_bytes were stored as chunks (3 each): those are reclaimed as chunks.
    chunked = [i for i in dead if len(bodies[i]) > 2048]
    assert report.blobs_reclaimed >= len(dead) - len(chunked)
    assert report.chunks_reclaimed >= 3 * len(chunked)
    assert report.bytes_before - report.bytes_after == size - log_bytes(st)
    assert size - log_bytes(st) >= dead_bytes * 0.9
    live = {uid_of[i]: blob_hash(bodies[i]) for i in bodies if i not in dead}
    assert message_hashes(st, box) == live
    for i in bodies:
        if i in dead:
            with pytest.raises(NotFound):
                st.read_blob(blob_hash(bodies[i]))
        else:
            assert st.read_blob(blob_hash(bodies[i])) == bodies[i]
    # Compacting again finds nothing more.
    again = st.compact()
    assert again.blobs_reclaimed == 0 and again.chunks_reclaimed == 0
    compacted = st.index
    for replay in (False, True):
        st = reopen(st, open_store, replay=replay)
        assert message_hashes(st, box) == live
        for i in bodies:
            if i not in dead:
                assert st.read_blob(blob_hash(bodies[i])) == bodies[i]
        assert_same_index(compacted, st.index)
    # A reclaimed body delivered again is stored again.
    d = deliver(st, bodies[1], [box])
    assert st.read_blob(blob_hash(bodies[1])) == bodies[1]
    assert d.uids[box] == 41


def test_compaction_reclaims_bodies_of_deleted_mailboxes_and_finished_queue_entries(
    store: Store, alice: bytes
) -> None:
    with store.transaction() as t:
        g = t.create_mailbox(alice, "Doomed")
    doomed = body_of(1, 2000)
    queued = body_of(2, 2000)
    deliver(store, doomed, [g])
    with store.transaction() as t:
        q = t.queue_add(t.put_blob(queued), ALICE, ["r@remote.test"])
    with store.transaction() as t:
        t.delete_mailbox(g)
        t.queue_done(q, "r@remote.test", fmt.QueueResult.DELIVERED)
    seal_active_segment(store, inbox(store, alice))
    report = store.compact()
    assert report.blobs_reclaimed >= 2
    for b in (doomed, queued):
        with pytest.raises(NotFound):
            store.read_blob(blob_hash(b))


def test_compaction_never_grows_the_log(open_store: OpenStore) -> None:
    """Reclaiming tiny dead bodies must not make segments bigger than they were (nor push a
    sealed segment over segment_bytes)."""
    opts = small_options(segment_bytes=4096)
    st = open_store(options=opts)
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
    box = inbox(st, a)
    for i in range(60):
        d = deliver(st, b"%d" % i + b"." * (i % 30), [box])  # 1 to 31 bytes
        with st.transaction() as t:
            t.expunge(box, [d.uids[box]])
    sizes = dict(st.segments())
    report = st.compact()
    assert report.blobs_reclaimed > 0
    assert report.bytes_after <= report.bytes_before, report
    for segno, size in st.segments():
        assert size <= sizes[segno], (segno, sizes[segno], size)
        assert size <= opts.segment_bytes, (segno, size)


# --- checkpoints --------------------------------------------------------------------------------


def rich_workload(st: Store, a: bytes, b: bytes) -> None:
    """Many kinds of records: deliveries (shared and chunked bodies), flags, keywords,
    expunges, mailbox changes, subscriptions, aliases, the queue, MIME metadata."""
    ia, ib = inbox(st, a), inbox(st, b)
    for i in range(25):
        body = b"shared" if i % 4 == 0 else body_of(i, 400 if i % 7 else 3000)
        with st.transaction() as t:
            h = t.put_blob(body)
            if i == 3:
                t.put_mime_meta(h, 1, b"(meta)")
            t.deliver(h, [ia, ib] if i % 3 else [ia], flags=i % 3, keywords=[f"K{i % 4}"])
    with st.transaction() as t:
        t.store_flags(ia, [1, 2, 3, 50], add=ix.FLAGGED, add_keywords=["k1", "New"])
        t.store_flags(ib, [2], remove=ix.ANSWERED, remove_keywords=["K2"])
        t.expunge(ib, [3, 4])
    with st.transaction() as t:
        g = t.create_mailbox(a, "Work")
        t.rename_mailbox(mailbox(st, a, "Junk"), "Spam")
        t.delete_mailbox(mailbox(st, b, "Archive"))
        t.subscribe(a, "Work")
        t.set_alias(f"postmaster@{DOMAIN}", [ALICE])
    deliver(st, b"into work", [g, ib])
    with st.transaction() as t:
        q = t.queue_add(blob_hash(b"shared"), ALICE, ["x@remote.test", "y@remote.test"])
    with st.transaction() as t:
        t.queue_attempt(q, 1, ["x@remote.test"])
        t.queue_done(q, "x@remote.test", fmt.QueueResult.DEFERRED, "later", 5)


def test_checkpoint_reopen_equals_full_replay(open_store: OpenStore) -> None:
    st = open_store()
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
        b = t.add_account(BOB, PWHASH)
    rich_workload(st, a, b)
    lsn = st.checkpoint()
    deliver(st, b"after the checkpoint", [inbox(st, a)])  # replayed on top of it
    with st.transaction() as t:
        t.expunge(inbox(st, a), [5])
    live = st.index
    st.close()
    # Keep only the explicit checkpoint (close wrote a newer one).
    ckdir = Path(st.data_dir) / "checkpoints"
    for p in ckdir.iterdir():
        if p.name != f"checkpoint-{lsn:020d}.ckpt":
            p.unlink()
    st = open_store(st.data_dir, st.options)
    assert st.recovery is not None
    assert st.recovery.checkpoint_lsn == lsn and st.recovery.checkpoint_rejected == ""
    assert st.recovery.replayed_frames == 2
    from_ckpt = st.index
    st = reopen(st, open_store, replay=True)
    assert st.recovery is not None and st.recovery.checkpoint_lsn == 0
    assert_same_index(from_ckpt, st.index)
    assert_same_index(live, st.index)


def test_checkpoint_with_orphan_chunks_is_trusted(open_store: OpenStore) -> None:
    """Orphaned chunks (from an aborted transaction) in the log must not make a checkpoint
    unusable: reopening loads it instead of silently replaying everything."""
    st = open_store()
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
    box = inbox(st, a)
    with pytest.raises(RuntimeError), st.transaction() as t:
        w = t.blob_writer()
        w.write(random.Random(1).randbytes(3000))
        raise RuntimeError("aborted")
    deliver(st, b"after", [box])
    assert st.stats()["orphan_chunk_streams"] == 1
    lsn = st.checkpoint()
    live = st.index
    st = reopen(st, open_store)
    assert st.recovery is not None
    assert st.recovery.checkpoint_rejected == ""
    assert st.recovery.checkpoint_lsn == lsn
    assert_same_index(live, st.index)


def test_checkpoint_after_compaction_equals_full_replay(open_store: OpenStore) -> None:
    st = open_store()
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
    box = inbox(st, a)
    with st.transaction() as t:
        h = t.put_blob(b"expunged, with metadata")
        t.put_mime_meta(h, 1, b"(meta)")
        d = t.deliver(h, [box])
    deliver(st, b"kept", [box])
    with st.transaction() as t:
        t.expunge(box, [d.uids[box]])
    seal_active_segment(st, mailbox(st, a, "Trash"))
    assert st.compact().blobs_reclaimed >= 1
    assert st.read_mime_meta(h) is None
    compacted = st.index
    st = reopen(st, open_store)  # from the checkpoint compaction wrote
    assert st.recovery is not None and st.recovery.checkpoint_rejected == ""
    from_ckpt = st.index
    assert_same_index(compacted, from_ckpt)
    st = reopen(st, open_store, replay=True)
    assert_same_index(from_ckpt, st.index)


def test_full_replay_after_compaction_of_a_restored_large_body(open_store: OpenStore) -> None:
    """A chunked body expunged, another chunked body, the first one stored again (a new copy);
    compaction reclaims the old copy's chunks. Replaying the log must rebuild the same index."""
    st = open_store(options=small_options(segment_bytes=4096, chunk_bytes=1024))
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
    box = inbox(st, a)
    big_a, big_b = random.Random(1).randbytes(2500), random.Random(2).randbytes(2500)
    d = deliver(st, big_a, [box])
    with st.transaction() as t:
        t.expunge(box, [d.uids[box]])
    deliver(st, big_b, [box])
    deliver(st, big_a, [box])
    seal_active_segment(st, mailbox(st, a, "Trash"))
    assert st.compact().chunks_reclaimed == 3
    compacted = st.index
    st = reopen(st, open_store)
    assert_same_index(compacted, st.index)
    st = reopen(st, open_store, replay=True)
    assert st.read_blob(blob_hash(big_a)) == big_a and st.read_blob(blob_hash(big_b)) == big_b
    assert_same_index(compacted, st.index)


def test_checkpoint_made_stale_by_compaction_is_not_trusted(open_store: OpenStore) -> None:
    st = open_store()
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
    box = inbox(st, a)
    bodies = [body_of(i, 900) for i in range(12)]
    for b in bodies:
        deliver(st, b, [box])
    with st.transaction() as t:
        t.expunge(box, list(range(1, 12, 2)))
    seal_active_segment(st, mailbox(st, a, "Trash"))
    lsn = st.checkpoint()
    ckdir = Path(st.data_dir) / "checkpoints"
    stale = (ckdir / f"checkpoint-{lsn:020d}.ckpt").read_bytes()
    report = st.compact()
    assert report.segments_rewritten >= 1
    compacted = st.index
    st.close()
    # Only the pre-compaction checkpoint is left: its blob offsets point into rewritten bytes.
    for p in ckdir.iterdir():
        p.unlink()
    (ckdir / f"checkpoint-{lsn:020d}.ckpt").write_bytes(stale)
    st = open_store(st.data_dir, st.options)
    assert st.recovery is not None
    assert "changed since the checkpoint" in st.recovery.checkpoint_rejected
    assert st.recovery.checkpoint_lsn == 0
    assert_same_index(compacted, st.index)
    for i, b in enumerate(bodies):
        if i % 2:
            assert st.read_blob(blob_hash(b)) == b


def test_damaged_checkpoint_is_ignored(open_store: OpenStore) -> None:
    st = open_store()
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
    deliver(st, b"x", [inbox(st, a)])
    live = st.index
    st.close()
    (ck,) = (Path(st.data_dir) / "checkpoints").iterdir()
    raw = bytearray(ck.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    ck.write_bytes(bytes(raw))
    st = open_store(st.data_dir, st.options)
    assert st.recovery is not None and "checksum" in st.recovery.checkpoint_rejected
    assert_same_index(live, st.index)


# --- segments -----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_segment_rollover_keeps_everything_readable(open_store: OpenStore) -> None:
    opts = small_options(segment_bytes=4096, chunk_bytes=1024)
    st = open_store(options=opts)
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
    box = inbox(st, a)
    rnd = random.Random(11)
    bodies = [body_of(i, rnd.choice([200, 900, 2500, 6000])) for i in range(60)]
    for b in bodies:
        deliver(st, b, [box])
    segs = st.segments()
    assert len(segs) >= 10
    assert [s for s, _ in segs] == list(range(1, len(segs) + 1))
    # Every frame here is smaller than a segment, so no segment exceeds the limit.
    for segno, size in segs:
        assert size <= opts.segment_bytes, (segno, size)
    frames = list(st.read_frames(1))
    assert [fmt.decode_frame_header(f).lsn for f in frames] == list(range(1, st.last_lsn + 1))
    expected = {uid: blob_hash(b) for uid, b in enumerate(bodies, start=1)}
    for replay in (False, True):
        st = reopen(st, open_store, replay=replay)
        assert len(st.segments()) == len(segs)
        assert message_hashes(st, box) == expected
        for b in bodies:
            assert st.read_blob(blob_hash(b)) == b
    # Writing continues in the last segment after a reopen.
    deliver(st, b"after reopen", [box])
    assert st.segments()[-1][0] >= segs[-1][0]
    assert st.read_blob(blob_hash(b"after reopen")) == b"after reopen"


# --- the data-directory lock --------------------------------------------------------------------

_HOLDER = textwrap.dedent(
    """
    import sys
    from mailharbor.store import Store
    st = Store.open(sys.argv[1], node_id=bytes(16))
    print("READY", flush=True)
    sys.stdin.readline()
    st.close()
    """
)

_TRY_OPEN = textwrap.dedent(
    """
    import sys
    from mailharbor.store import Store, StoreLocked
    try:
        st = Store.open(sys.argv[1], node_id=bytes(16))
    except StoreLocked as e:
        print("LOCKED", e)
        sys.exit(3)
    st.close()
    print("OPENED")
    """
)


@pytest.mark.timeout(60)
def test_second_open_in_another_process_fails_naming_the_pid(
    store: Store, open_store: OpenStore
) -> None:
    # This process holds the directory: a child cannot open it and is told our pid.
    child = subprocess.run(
        [sys.executable, "-c", _TRY_OPEN, store.data_dir],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert child.returncode == 3, child.stdout + child.stderr
    assert f"pid {os.getpid()}" in child.stdout
    store.close()
    child = subprocess.run(
        [sys.executable, "-c", _TRY_OPEN, store.data_dir],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert child.returncode == 0 and "OPENED" in child.stdout, child.stderr
    # A child holds it: we cannot open it and are told its pid; after it exits we can.
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, store.data_dir],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "READY"
        with pytest.raises(StoreLocked, match=f"pid {holder.pid}"):
            open_store(store.data_dir)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    st = open_store(store.data_dir)
    assert st.index.domains == {DOMAIN}


def test_closed_store_refuses_writes(store: Store) -> None:
    store.close()
    with pytest.raises(StoreReadOnly):
        store.transaction()


# --- group commit and visibility ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_group_commit_shares_fsyncs(open_store: OpenStore) -> None:
    st = open_store(options=small_options(segment_bytes=1 << 20))
    with st.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
        b = t.add_account(BOB, PWHASH)
    ia, ib = inbox(st, a), inbox(st, b)
    fsyncs, commits = st.stats_fsyncs, st.stats_commits

    async def one(i: int) -> tuple[int, int]:
        body = body_of(i)
        async with st.transaction() as t:
            d = t.deliver(t.put_blob(body), [ia, ib], flags=ix.SEEN)
        # Returned means durable and visible: this committer sees its own messages.
        for g in (ia, ib):
            mb = st.index.mailboxes[g]
            pos = mb.position(d.uids[g])
            assert pos is not None and mb.flags[pos] == ix.SEEN
            assert st.index.blobs.hash_at(mb.blobs[pos]) == blob_hash(body)
        assert st.visible_lsn >= t.committed_lsn
        return d.uids[ia], d.uids[ib]

    async def main() -> list[tuple[int, int]]:
        return await asyncio.gather(*(one(i) for i in range(50)))

    res = asyncio.run(main())
    assert st.stats_commits - commits == 50
    assert st.stats_fsyncs - fsyncs <= 5, st.stats_fsyncs - fsyncs
    assert sorted(u for u, _ in res) == list(range(1, 51))
    assert sorted(u for _, u in res) == list(range(1, 51))
    st = reopen(st, open_store, replay=True)
    assert list(st.index.mailboxes[ia].uids) == list(range(1, 51))


class GateBarrier:
    """A durability barrier that holds every batch until `release()`."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.waits: list[int] = []
        self.fail = False

    def try_release(self, lsn: int) -> bool:
        return False  # every batch goes through wait()

    async def wait(self, lsn: int) -> None:
        self.waits.append(lsn)
        await self.gate.wait()
        if self.fail:
            raise ConnectionError("peer lost")

    def release(self) -> None:
        self.gate.set()


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.005)


@pytest.mark.timeout(60)
def test_visibility_follows_the_durability_barrier(store: Store, alice: bytes) -> None:
    box = inbox(store, alice)
    deliver(store, b"earlier", [box])
    events: list[CommitEvent] = []
    seen_in_listener: list[bool] = []

    def listener(ev: CommitEvent) -> None:
        events.append(ev)
        seen_in_listener.append(len(store.index.mailboxes[box]) == 2)

    store.add_commit_listener(listener)
    mb = store.index.mailboxes[box]
    uidnext, hms = mb.uidnext, mb.highestmodseq

    async def main() -> None:
        barrier = GateBarrier()
        store.barrier = barrier

        async def commit() -> Delivery:
            async with store.transaction() as t:
                d = t.deliver(t.put_blob(b"behind the barrier"), [box])
            return d

        task = asyncio.create_task(commit())
        await until(lambda: bool(barrier.waits))
        lsn = barrier.waits[0]
        # Durable locally, waiting for the peer: nothing of it is visible anywhere.
        assert store.durable_lsn >= lsn > store.visible_lsn
        assert not task.done()
        assert events == []
        assert (mb.uidnext, mb.highestmodseq, list(mb.uids)) == (uidnext, hms, [1])
        assert all(fmt.decode_frame_header(f).lsn < lsn for f in store.read_frames(1))
        with pytest.raises(NotFound):
            store.read_blob(blob_hash(b"behind the barrier"))
        await asyncio.sleep(0.05)
        assert not task.done() and events == []
        barrier.release()
        d = await task
        assert d.uids[box] == 2 and list(mb.uids) == [1, 2]
        assert events == [CommitEvent(lsn, frozenset({box}))]
        assert seen_in_listener == [True]
        assert store.read_blob(blob_hash(b"behind the barrier")) == b"behind the barrier"
        assert fmt.decode_frame_header(next(iter(store.read_frames(lsn)))).lsn == lsn
        store.barrier = None

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_failing_barrier_fails_the_commit_and_shows_nothing(store: Store, alice: bytes) -> None:
    box = inbox(store, alice)
    events: list[CommitEvent] = []
    store.add_commit_listener(events.append)

    async def main() -> None:
        barrier = GateBarrier()
        barrier.fail = True
        store.barrier = barrier

        async def commit() -> None:
            async with store.transaction() as t:
                t.deliver(t.put_blob(b"never acknowledged"), [box])

        task = asyncio.create_task(commit())
        await until(lambda: bool(barrier.waits))
        barrier.release()
        with pytest.raises(StoreError):
            await task

    asyncio.run(main())
    assert events == []
    assert len(store.index.mailboxes[box]) == 0


class FastBarrier:
    """A durability barrier whose fast path releases everything (a secondary, protocol A),
    except the LSNs in ``hold``: those go through `wait` and are held until `release()`."""

    def __init__(self, hold: set[int] | None = None) -> None:
        self.hold = hold or set()
        self.tried: list[int] = []
        self.waits: list[int] = []
        self.gate = asyncio.Event()

    def try_release(self, lsn: int) -> bool:
        self.tried.append(lsn)
        return lsn not in self.hold

    async def wait(self, lsn: int) -> None:
        self.waits.append(lsn)
        await self.gate.wait()

    def release(self) -> None:
        self.gate.set()


@pytest.mark.timeout(60)
def test_durable_listener_runs_after_the_fsync_and_before_the_apply(
    store: Store, alice: bytes
) -> None:
    """fsync, tell the durable listeners (a secondary acknowledges there), then apply: the
    listener sees its LSN durable and not yet visible; with the barrier's fast path the batch
    is applied in the same step and `wait` is never called."""
    box = inbox(store, alice)
    seen: list[tuple[int, int, int]] = []
    store.add_durable_listener(lambda lsn: seen.append((lsn, store.durable_lsn, store.visible_lsn)))

    def failing(lsn: int) -> None:
        raise RuntimeError("a listener's bug")

    store.add_durable_listener(failing)  # logged and ignored: the commit still completes

    async def main() -> int:
        barrier = FastBarrier()
        store.barrier = barrier
        async with store.transaction() as t:
            t.deliver(t.put_blob(b"fast path"), [box])
        assert t.committed_lsn is not None
        lsn = t.committed_lsn
        assert barrier.tried == [lsn] and barrier.waits == []
        store.barrier = None
        return lsn

    lsn = asyncio.run(main())
    assert seen and seen[-1][0] == lsn
    target, durable, visible = seen[-1]
    assert durable >= target > visible  # durable, not applied yet
    assert store.visible_lsn >= lsn and len(store.index.mailboxes[box]) == 1


@pytest.mark.timeout(60)
def test_fast_path_never_applies_past_a_batch_still_held(store: Store, alice: bytes) -> None:
    """Batch 1 waits in the ack stage; batch 2, fsynced meanwhile, must not take the fast path
    (it would become visible before batch 1): it queues behind it, in LSN order."""
    box = inbox(store, alice)

    async def main() -> None:
        async def commit(body: bytes) -> int:
            async with store.transaction() as t:
                t.deliver(t.put_blob(body), [box])
            assert t.committed_lsn is not None
            return t.committed_lsn

        first_lsn = store.last_lsn + 1
        barrier = FastBarrier(hold={first_lsn})
        store.barrier = barrier
        first = asyncio.create_task(commit(b"held"))
        await until(lambda: bool(barrier.waits))
        second = asyncio.create_task(commit(b"behind it"))
        await until(lambda: store.durable_lsn > first_lsn)
        await asyncio.sleep(0.05)
        assert not first.done() and not second.done()
        assert store.visible_lsn < first_lsn and len(store.index.mailboxes[box]) == 0
        assert barrier.tried == [first_lsn]  # not asked while the ack stage was busy
        barrier.release()
        assert await first == first_lsn and await second > first_lsn
        assert len(store.index.mailboxes[box]) == 2
        store.barrier = None

    asyncio.run(main())


class StepBarrier:
    """A durability barrier that holds each wait until that LSN is released."""

    def __init__(self) -> None:
        self.waits: list[int] = []
        self.released = 0
        self._changed = asyncio.Event()

    def try_release(self, lsn: int) -> bool:
        return False  # every batch goes through wait()

    async def wait(self, lsn: int) -> None:
        self.waits.append(lsn)
        while self.released < lsn:
            self._changed.clear()
            await self._changed.wait()

    def release(self, lsn: int) -> None:
        self.released = max(self.released, lsn)
        self._changed.set()


@pytest.mark.timeout(60)
def test_next_batch_is_fsynced_while_the_previous_waits_for_the_barrier(
    store: Store, alice: bytes
) -> None:
    """Group commit is pipelined: batch 2 is made durable locally while batch 1 still waits for
    the peer; nothing becomes visible (or returns) before the barrier released it, and batches
    are released in LSN order."""
    box = inbox(store, alice)

    async def main() -> None:
        barrier = StepBarrier()
        store.barrier = barrier

        async def commit(body: bytes) -> int:
            async with store.transaction() as t:
                t.deliver(t.put_blob(body), [box])
            return store.visible_lsn

        fsyncs = store.stats_fsyncs
        first = asyncio.create_task(commit(b"first"))
        await until(lambda: len(barrier.waits) == 1)
        lsn1 = barrier.waits[0]
        second = asyncio.create_task(commit(b"second"))
        # The second batch gets its own fsync while the first is still held by the barrier.
        await until(lambda: store.durable_lsn > lsn1)
        assert store.stats_fsyncs - fsyncs == 2
        assert store.visible_lsn < lsn1 and not first.done() and not second.done()
        assert len(store.index.mailboxes[box]) == 0
        barrier.release(lsn1)
        await first
        assert len(store.index.mailboxes[box]) == 1 and not second.done()
        await until(lambda: len(barrier.waits) == 2)
        lsn2 = barrier.waits[1]
        assert lsn2 > lsn1 and store.visible_lsn == lsn1
        barrier.release(lsn2)
        await second
        assert message_hashes(store, box) == {1: blob_hash(b"first"), 2: blob_hash(b"second")}
        store.barrier = None

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_refused_sync_commit_under_a_barrier_never_becomes_visible(
    store: Store, alice: bytes
) -> None:
    """With replication's barrier set, synchronous commits are refused; a refused commit must
    leave nothing behind that a later commit could make visible."""
    box = inbox(store, alice)

    class PassBarrier:
        def try_release(self, lsn: int) -> bool:
            return False  # every batch goes through wait()

        async def wait(self, lsn: int) -> None:
            return None

    store.barrier = PassBarrier()
    with pytest.raises(StoreError), store.transaction() as t:
        t.deliver(t.put_blob(b"refused"), [box])

    async def later() -> None:
        async with store.transaction() as t:
            t.deliver(t.put_blob(b"accepted"), [box])

    asyncio.run(later())
    store.barrier = None
    assert message_hashes(store, box) == {1: blob_hash(b"accepted")}


# --- replication hooks: read_frames and ingest --------------------------------------------------


def frames_by_lsn(st: Store) -> dict[int, bytes]:
    return {fmt.decode_frame_header(f).lsn: f for f in st.read_frames(1)}


@pytest.mark.timeout(120)
def test_read_frames_and_ingest_reproduce_the_store(open_store: OpenStore, tmp_path: Path) -> None:
    opts = small_options(segment_bytes=16 * 1024, chunk_bytes=1024)
    primary = open_store(options=opts)
    secondary = open_store(str(tmp_path / "secondary"), opts, NODE2)
    with primary.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
        b = t.add_account(BOB, PWHASH)
    rich_workload(primary, a, b)
    shipped: list[bytes] = []
    primary.add_frame_listener(lambda lsn, raw: shipped.append(raw))
    # Ship in several batches, as replication would.
    pos = 1
    while pos <= primary.visible_lsn:
        batch = list(primary.read_frames(pos))[:7]
        assert secondary.ingest_blocking(batch) == pos + len(batch) - 1
        pos += len(batch)
    # More work, shipped from the frame listener (which sees frames as they are appended).
    with pytest.raises(RuntimeError), primary.transaction() as t:
        w = t.blob_writer()
        w.write(body_of(99, 3000))  # orphan chunks are replicated like everything else
        raise RuntimeError("aborted")
    deliver(primary, body_of(100, 2500), [inbox(primary, a)])
    secondary.ingest_blocking(shipped)
    assert secondary.visible_lsn == primary.visible_lsn
    assert frames_by_lsn(secondary) == frames_by_lsn(primary)
    assert_same_index(primary.index, secondary.index)
    for h in {secondary.index.blobs.hash_at(s) for s in range(len(secondary.index.blobs))}:
        if refs(secondary, h):
            assert secondary.read_blob(h) == primary.read_blob(h)
    # Promoted, the secondary continues where the primary stopped.
    d = deliver(secondary, b"on the secondary", [inbox(secondary, a)])
    assert d.uids[inbox(secondary, a)] == primary.index.mailboxes[inbox(primary, a)].uidnext
    secondary = reopen(secondary, open_store, replay=True)
    assert secondary.read_blob(blob_hash(b"on the secondary")) == b"on the secondary"


@pytest.mark.timeout(60)
def test_async_ingest(open_store: OpenStore, tmp_path: Path) -> None:
    primary = open_store()
    secondary = open_store(str(tmp_path / "secondary"), small_options(), NODE2)
    with primary.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
    for i in range(5):
        deliver(primary, body_of(i), [inbox(primary, a)])
    frames = list(primary.read_frames(1))

    async def main() -> int:
        return await secondary.ingest(frames)

    assert asyncio.run(main()) == primary.visible_lsn
    assert frames_by_lsn(secondary) == frames_by_lsn(primary)
    assert_same_index(primary.index, secondary.index)


def test_ingest_refuses_wrong_lsn_and_corruption(open_store: OpenStore, tmp_path: Path) -> None:
    primary = open_store()
    secondary = open_store(str(tmp_path / "secondary"), small_options(), NODE2)
    with primary.transaction() as t:
        t.add_domain(DOMAIN)
        a = t.add_account(ALICE, PWHASH)
    for i in range(3):
        deliver(primary, body_of(i), [inbox(primary, a)])
    frames = list(primary.read_frames(1))
    secondary.ingest_blocking(frames[:2])
    before = secondary.index.serialize()

    def refused(raw: bytes, exc: type[Exception]) -> None:
        lsn = secondary.last_lsn
        with pytest.raises(exc):
            secondary.ingest_blocking([raw])
        assert secondary.last_lsn == lsn
        assert secondary.index.serialize() == before

    refused(frames[3], InvalidArgument)  # a gap
    refused(frames[1], InvalidArgument)  # a duplicate
    payload_flip = bytearray(frames[2])
    payload_flip[-5] ^= 0x04
    refused(bytes(payload_flip), fmt.FormatError)
    header_flip = bytearray(frames[2])
    header_flip[20] ^= 0x01
    refused(bytes(header_flip), fmt.FormatError)
    refused(frames[2][:-1], fmt.FormatError)
    refused(frames[2] + b"\x00", fmt.FormatError)
    # The right frame is still accepted afterwards.
    assert secondary.ingest_blocking(frames[2:]) == primary.visible_lsn
    assert_same_index(primary.index, secondary.index)
    secondary = reopen(secondary, open_store, replay=True)
    assert frames_by_lsn(secondary) == frames_by_lsn(primary)
