"""service/mailbox.py and service/search.py against a real store in a temporary directory."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mailharbor.service.mailbox import (
    Exists,
    Expunged,
    FetchAtt,
    FlagsChanged,
    KeywordsChanged,
    MailboxError,
    MailboxGone,
    MailboxService,
    Recent,
    Vanished,
)
from mailharbor.service.search import Key, search
from mailharbor.store import Conflict, Store, StoreError, StoreOptions
from mailharbor.store import index as ix

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")
A = "alice@example.org"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def msg(subject: str, body: str = "hello world", frm: str = "Bob <bob@example.net>") -> bytes:
    return (
        f"From: {frm}\r\nTo: alice@example.org\r\nSubject: {subject}\r\n"
        f"Date: Mon, 7 Feb 2022 10:00:00 +0100\r\nMessage-ID: <{subject}@x>\r\n\r\n{body}\r\n"
    ).encode()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    st = Store.open(str(tmp_path / "data"), node_id=b"n" * 16, options=StoreOptions(sync=False))
    with st.transaction() as t:
        t.add_domain("example.org")
    with st.transaction() as t:
        t.add_account(A, "x", quota_bytes=1_000_000)
    yield st
    st.close()


@pytest.fixture
def svc(store: Store) -> MailboxService:
    return MailboxService(store)


def deliver(store: Store, data: bytes, box: str = "INBOX", flags: int = 0) -> int:
    acct = store.index.account_by_address(A)
    assert acct is not None
    mb = store.index.mailbox_by_name(acct.guid, box)
    assert mb is not None
    with store.transaction() as t:
        d = t.deliver(t.put_blob(data), [mb.guid], flags=flags)
    return d.uids[mb.guid]


def test_hub_wakes_watchers_of_the_touched_mailbox_only(store: Store, svc: MailboxService) -> None:
    async def go() -> None:
        v, _ = svc.select(A, "INBOX")
        w, _ = svc.select(A, "Sent")
        ev_in, ev_sent = asyncio.Event(), asyncio.Event()
        v.watch(ev_in)
        w.watch(ev_sent)
        await svc.append(A, "INBOX", msg("a"))
        assert ev_in.is_set() and not ev_sent.is_set()
        assert v.sync(expunge_allowed=False) == [Exists(1), Recent(1)]
        v.close()
        ev_in.clear()
        await svc.append(A, "INBOX", msg("b"))
        assert not ev_in.is_set()

    run(go())


def test_select_info_and_recent_goes_to_the_first_session(
    store: Store, svc: MailboxService
) -> None:
    deliver(store, msg("1"), flags=ix.SEEN)
    deliver(store, msg("2"))
    v1, info = svc.select(A, "INBOX")
    assert (info.exists, info.recent, info.uidnext, info.first_unseen) == (2, 2, 3, 2)
    assert "\\*" in info.permanent_flags and info.mailboxid.startswith("F")
    v2, info2 = svc.select(A, "INBOX")
    assert info2.recent == 0
    _, ex = svc.select(A, "INBOX", readonly=True)
    assert ex.permanent_flags == () and ex.readonly
    _, r2 = svc.select(A, "INBOX", rev2=True)
    assert r2.recent == 0
    res = v1.fetch(v1.resolve([(1, None)], uid=False), [FetchAtt("FLAGS")])
    assert res[0].items == (b"FLAGS (\\Seen \\Recent)",)
    assert v2.fetch([(1, 1)], [FetchAtt("FLAGS")])[0].items == (b"FLAGS (\\Seen)",)


def test_expunges_wait_until_allowed_and_seqs_stay_stable(
    store: Store, svc: MailboxService
) -> None:
    async def go() -> None:
        for i in range(4):
            deliver(store, msg(str(i)))
        v, _ = svc.select(A, "INBOX", rev2=True)
        other, _ = svc.select(A, "INBOX", rev2=True)
        await other.store_flags([(2, 2), (3, 3)], "+", ["\\Deleted"])
        await other.expunge()
        deliver(store, msg("new"))
        ups = v.sync(expunge_allowed=False)
        assert Exists(5) in ups and not any(isinstance(u, Expunged) for u in ups)
        assert [u for u in ups if isinstance(u, FlagsChanged)] == []  # gone ones are not shown
        assert v.exists == 5
        # expunged messages keep their numbers; FETCH still shows what is readable of them
        # (RFC 2180 4.1: the mailbox keeps recent expunges' columns), SEARCH skips them
        got = v.fetch(v.resolve([(1, None)], uid=False), [FetchAtt("UID"), FetchAtt("FLAGS")])
        assert [(r.seq, r.items) for r in got] == [
            (1, (b"UID 1", b"FLAGS ()")),
            (2, (b"UID 2", b"FLAGS (\\Deleted)")),
            (3, (b"UID 3", b"FLAGS (\\Deleted)")),
            (4, (b"UID 4", b"FLAGS ()")),
            (5, (b"UID 5", b"FLAGS ()")),
        ]
        assert search(v, Key("ALL")).matches == ((1, 1), (4, 4), (5, 5))
        ups = v.sync(expunge_allowed=True)
        assert ups == [Expunged((3, 2))]
        assert v.uids == [1, 4, 5]
        # the other session gets its own expunges on its next sync
        assert other.sync(expunge_allowed=True)[-1] == Expunged((3, 2))

    run(go())


def test_qresync_reports_vanished_and_changes_since(store: Store, svc: MailboxService) -> None:
    async def go() -> None:
        for i in range(3):
            deliver(store, msg(str(i)))
        mb = svc.mailbox(A, "INBOX")
        old = mb.highestmodseq
        w, _ = svc.select(A, "INBOX")
        await w.store_flags([(1, 1)], "+", ["\\Flagged"])
        await w.store_flags([(2, 2)], "+", ["\\Deleted"])
        await w.expunge()
        v, info = svc.select(A, "INBOX", qresync=(mb.uidvalidity, old, None))
        assert info.vanished == (2,)
        assert [(c.uid, c.modseq is not None) for c in info.changed] == [(1, True)]
        await w.store_flags([(1, 1)], "+", ["\\Deleted"])
        await w.expunge()
        assert v.sync(expunge_allowed=True) == [Vanished((1,))]
        # a wrong UIDVALIDITY gives no QRESYNC data
        _, info2 = svc.select(A, "INBOX", qresync=(mb.uidvalidity + 1, old, None))
        assert info2.vanished == () and info2.changed == ()

    run(go())


def test_store_modes_silent_and_responses(store: Store, svc: MailboxService) -> None:
    async def go() -> None:
        deliver(store, msg("a"))
        v, _ = svc.select(A, "INBOX", rev2=True)
        r = await v.store_flags([(1, 1)], "+", ["\\Seen", "$Work"])
        assert r.fetches[0].items == (b"FLAGS (\\Seen $Work)",)
        r = await v.store_flags([(1, 1)], "", ["\\Flagged"], uid_cmd=True)
        assert r.fetches[0].items == (b"UID 1", b"FLAGS (\\Flagged)")
        r = await v.store_flags([(1, 1)], "-", ["\\Flagged"], silent=True)
        assert r.fetches == ()
        # own changes are not reported again by sync (only the new keyword list is)
        assert [type(u) for u in v.sync(expunge_allowed=True)] == [KeywordsChanged]
        with pytest.raises(MailboxError) as e:
            await v.store_flags([(1, 1)], "+", ["\\Bogus"])
        assert e.value.bad
        ro, _ = svc.select(A, "INBOX", readonly=True)
        with pytest.raises(MailboxError) as e:
            await ro.store_flags([(1, 1)], "+", ["\\Seen"])
        assert e.value.code == "READ-ONLY"

    run(go())


def test_unchangedsince_returns_the_modified_set(store: Store, svc: MailboxService) -> None:
    async def go() -> None:
        deliver(store, msg("a"))
        deliver(store, msg("b"))
        v, _ = svc.select(A, "INBOX", condstore=True)
        mb = svc.mailbox(A, "INBOX")
        base = mb.highestmodseq
        await v.store_flags([(2, 2)], "+", ["\\Answered"])
        r = await v.store_flags(
            v.resolve([(1, 2)], uid=False), "+", ["\\Flagged"], unchanged_since=base
        )
        assert r.modified == (2,)
        assert [f.seq for f in r.fetches] == [1]
        assert r.fetches[0].items[-1].startswith(b"MODSEQ (")
        mb = svc.mailbox(A, "INBOX")
        assert mb.flags[0] & ix.FLAGGED and not mb.flags[1] & ix.FLAGGED

    run(go())


def test_unchangedsince_is_checked_at_encode_time_against_pending_changes(store: Store) -> None:
    """The race: a change appended but not yet applied must not slip past the check."""

    async def go() -> None:
        deliver(store, msg("a"))
        acct = store.index.account_by_address(A)
        assert acct is not None
        g = acct.mailboxes["INBOX"]
        base = store.index.mailboxes[g].highestmodseq
        t1 = store.transaction()
        t1.store_flags(g, [1], add=ix.SEEN)
        first = asyncio.ensure_future(t1.commit_async())
        await asyncio.sleep(0)  # t1 is appended, its fsync is in flight
        t2 = store.transaction()
        t2.store_flags(g, [1], add=ix.FLAGGED, unchanged_since=base)
        with pytest.raises(Conflict):
            await t2.commit_async()
        await first
        t3 = store.transaction()
        c = t3.store_flags(g, [1], add=ix.FLAGGED, unchanged_since=base)
        await t3.commit_async()
        assert c.modified == (1,) and c.uids == ()
        assert not store.index.mailboxes[g].flags[0] & ix.FLAGGED

    run(go())


def test_concurrent_conditional_stores_via_the_service(store: Store, svc: MailboxService) -> None:
    async def go() -> None:
        deliver(store, msg("a"))
        v, _ = svc.select(A, "INBOX")
        w, _ = svc.select(A, "INBOX")
        base = svc.mailbox(A, "INBOX").highestmodseq
        r1, r2 = await asyncio.gather(
            v.store_flags([(1, 1)], "+", ["$A"], unchanged_since=base),
            w.store_flags([(1, 1)], "+", ["$B"], unchanged_since=base),
        )
        # exactly one of them wins
        assert sorted([len(r1.modified), len(r2.modified)]) == [0, 1]

    run(go())


def test_expunge_only_deleted_and_uid_expunge(store: Store, svc: MailboxService) -> None:
    async def go() -> None:
        for i in range(3):
            deliver(store, msg(str(i)), flags=ix.DELETED if i else 0)
        v, _ = svc.select(A, "INBOX", rev2=True)
        assert await v.expunge([3]) == 1
        assert v.sync(expunge_allowed=True) == [Expunged((3,))]
        assert await v.expunge() == 1
        assert v.uids == [1, 2] and v.sync(expunge_allowed=True) == [Expunged((2,))]
        assert v.uids == [1]

    run(go())


def test_copy_and_move_keep_flags_keywords_and_date(store: Store, svc: MailboxService) -> None:
    async def go() -> None:
        await svc.append(A, "INBOX", msg("a"), ["\\Flagged", "$Label1"], 1_600_000_000_000)
        await svc.append(A, "INBOX", msg("b"))
        v, _ = svc.select(A, "INBOX", rev2=True)
        r = await v.copy(v.resolve([(1, None)], uid=False), "Archive")
        arch = svc.mailbox(A, "Archive")
        assert r.uidvalidity == arch.uidvalidity
        assert r.source_uids == (1, 2) and r.dest_uids == (1, 2)
        assert arch.flags[0] == ix.FLAGGED and arch.keyword_names(arch.kwbits[0]) == ["$Label1"]
        assert arch.dates[0] == 1_600_000_000_000
        m = await v.copy([(1, 1)], "Trash", move=True)
        assert m.source_uids == (1,)
        assert v.sync(expunge_allowed=True) == [Expunged((1,))]
        assert len(svc.mailbox(A, "Trash")) == 1 and len(svc.mailbox(A, "INBOX")) == 1
        with pytest.raises(MailboxError) as e:
            await v.copy([(1, 2)], "Nope")
        assert e.value.code == "TRYCREATE"

    run(go())


def test_append_trycreate_and_overquota(store: Store, svc: MailboxService) -> None:
    async def go() -> None:
        with pytest.raises(MailboxError) as e:
            await svc.append(A, "Missing", msg("a"))
        assert e.value.code == "TRYCREATE"
        with pytest.raises(MailboxError) as e:
            await svc.append(A, "INBOX", b"x" * 1_000_001)
        assert e.value.code == "OVERQUOTA"
        uv, uid = await svc.append(A, "INBOX", msg("a"), ["\\Seen"])
        assert uid == 1 and uv == svc.mailbox(A, "INBOX").uidvalidity
        assert svc.quota(A)[1] == 1_000_000 and svc.quota(A)[0] > 0
        # the metadata is stored with the body
        blob = store.index.blobs.hash_at(svc.mailbox(A, "INBOX").blobs[0])
        assert store.read_mime_meta(blob) is not None

    run(go())


def test_create_delete_rename_and_list(store: Store, svc: MailboxService) -> None:
    async def go() -> None:
        await svc.create(A, "Projects/2024/Q1")
        names = [e.name for e in svc.list_mailboxes(A, "", ["*"])]
        assert {"Projects", "Projects/2024", "Projects/2024/Q1"} <= set(names)
        assert names[0] == "INBOX"
        with pytest.raises(MailboxError) as e:
            await svc.create(A, "inbox")
        assert e.value.code == "ALREADYEXISTS"
        top = {e.name: e for e in svc.list_mailboxes(A, "", ["%"])}
        assert "Projects/2024" not in top and "\\HasChildren" in top["Projects"].attributes
        assert "\\Sent" in top["Sent"].attributes and "\\HasNoChildren" in top["Sent"].attributes
        assert [e.name for e in svc.list_mailboxes(A, "Projects/", ["%"])] == ["Projects/2024"]
        assert svc.list_mailboxes(A, "", [""])[0].attributes == ("\\Noselect",)
        await svc.rename(A, "Projects", "Work")
        names2 = {e.name for e in svc.list_mailboxes(A, "", ["*"])}
        assert "Work/2024/Q1" in names2 and "Projects" not in names2
        await svc.delete(A, "Work/2024/Q1")
        with pytest.raises(MailboxError) as e:
            await svc.delete(A, "INBOX")
        with pytest.raises(MailboxError) as e:
            await svc.delete(A, "Nope")
        assert e.value.code == "NONEXISTENT"
        # a parent that only exists through its children is \\Noselect, whatever the wildcard
        await svc.create(A, "Solo/Child")
        await svc.delete(A, "Solo")
        top = {e.name: e for e in svc.list_mailboxes(A, "", ["%"])}
        every = {e.name: e for e in svc.list_mailboxes(A, "", ["*"])}
        exact = {e.name: e for e in svc.list_mailboxes(A, "", ["Solo"])}
        assert top["Solo"] == every["Solo"] == exact["Solo"]
        assert top["Solo"].attributes == ("\\Noselect", "\\HasChildren")
        assert not top["Solo"].selectable and "\\HasNoChildren" in every["Solo/Child"].attributes

    run(go())


def test_rename_inbox_moves_the_messages(store: Store, svc: MailboxService) -> None:
    async def go() -> None:
        await svc.append(A, "INBOX", msg("a"), ["\\Seen"])
        await svc.rename(A, "INBOX", "Old")
        assert len(svc.mailbox(A, "INBOX")) == 0
        old = svc.mailbox(A, "Old")
        assert len(old) == 1 and old.flags[0] == ix.SEEN

    run(go())


def test_subscriptions_lsub_and_list_extended(store: Store, svc: MailboxService) -> None:
    async def go() -> None:
        await svc.create(A, "Lists/python")
        await svc.subscribe(A, "Lists/python", True)
        await svc.subscribe(A, "Gone", True)
        lsub = {e.name for e in svc.list_mailboxes(A, "", ["*"], lsub=True)}
        assert {"Lists/python", "Gone", "INBOX"} <= lsub
        sub = {e.name: e for e in svc.list_mailboxes(A, "", ["*"], subscribed=True)}
        assert "\\NonExistent" in sub["Gone"].attributes
        assert "\\Subscribed" in sub["Lists/python"].attributes
        rec = {
            e.name: e
            for e in svc.list_mailboxes(A, "", ["%"], subscribed=True, recursive_match=True)
        }
        assert rec["Lists"].child_info == ("SUBSCRIBED",)
        su = {e.name for e in svc.list_mailboxes(A, "", ["*"], special_use=True)}
        assert su == {"Sent", "Drafts", "Trash", "Junk", "Archive"}
        await svc.subscribe(A, "Gone", False)
        assert "Gone" not in {e.name for e in svc.list_mailboxes(A, "", ["*"], lsub=True)}

    run(go())


def test_status_items(store: Store, svc: MailboxService) -> None:
    deliver(store, msg("a"), flags=ix.SEEN)
    deliver(store, msg("b"), flags=ix.DELETED)
    st = svc.status(A, "INBOX")
    assert (st.messages, st.unseen, st.deleted, st.uidnext) == (2, 1, 1, 3)
    assert st.size == svc.mailbox(A, "INBOX").total_size > 0
    assert st.highestmodseq >= 3 and st.recent == 2
    with pytest.raises(MailboxError):
        svc.status(A, "Nope")


def test_fetch_items_and_implicit_seen(store: Store, svc: MailboxService) -> None:
    async def go() -> None:
        mime = (
            b"From: =?UTF-8?B?SsO8cmdlbg==?= <j@example.net>\r\nSubject: parts\r\n"
            b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n"
            b"--XX\r\nContent-Type: text/plain\r\n\r\nfirst part\r\n"
            b"--XX\r\nContent-Type: text/html\r\n\r\n<b>second</b>\r\n--XX--\r\n"
        )
        await svc.append(A, "INBOX", mime, [], 1_600_000_000_000)
        v, _ = svc.select(A, "INBOX", rev2=True)
        atts = [
            FetchAtt("UID"),
            FetchAtt("RFC822.SIZE"),
            FetchAtt("INTERNALDATE"),
            FetchAtt("ENVELOPE"),
            FetchAtt("BODYSTRUCTURE"),
            FetchAtt("BODY"),
            FetchAtt("EMAILID"),
            FetchAtt("THREADID"),
            FetchAtt("MODSEQ"),
            FetchAtt("BODY", section="1", peek=True),
            FetchAtt("BODY", section="HEADER.FIELDS (SUBJECT)", peek=True),
            FetchAtt("BODY", section="", partial=(0, 4), peek=True),
            FetchAtt("BODY", section="9", peek=True),
        ]
        (r,) = v.fetch([(1, 1)], atts)
        it = r.items
        assert it[0] == b"UID 1" and it[1] == b"RFC822.SIZE %d" % len(mime)
        assert it[2].startswith(b'INTERNALDATE "') and b"-2020 " in it[2]
        assert it[3].startswith(b'ENVELOPE (NIL "parts"')
        assert it[4].startswith(b'BODYSTRUCTURE (("TEXT" "PLAIN"') and b'"MIXED"' in it[4]
        assert it[5].startswith(b"BODY ((")
        assert it[6].startswith(b"EMAILID (M") and it[7] == b"THREADID NIL"
        assert it[8].startswith(b"MODSEQ (")
        assert it[9] == b"BODY[1] {10}\r\nfirst part"
        assert it[10] == b"BODY[HEADER.FIELDS (SUBJECT)] {18}\r\nSubject: parts\r\n\r\n"
        assert it[11] == b"BODY[]<0> {4}\r\nFrom"
        assert it[12] == b"BODY[9] NIL"
        assert not svc.mailbox(A, "INBOX").flags[0] & ix.SEEN  # PEEK
        (r,) = v.fetch([(1, 1)], [FetchAtt("BODY", section="TEXT")])
        assert r.items[-1] == b"FLAGS (\\Seen)"  # the new flags, before the commit is done
        await svc.drain()
        assert svc.mailbox(A, "INBOX").flags[0] & ix.SEEN
        assert v.sync(expunge_allowed=True) == []  # not reported twice
        # a read-only view never sets \Seen
        ro, _ = svc.select(A, "INBOX", readonly=True)
        (r,) = ro.fetch([(1, 1)], [FetchAtt("RFC822")])
        assert r.items[0].startswith(b"RFC822 {")

    run(go())


def test_fetch_parses_and_persists_missing_metadata(store: Store, svc: MailboxService) -> None:
    async def go() -> None:
        deliver(store, msg("nometa"))  # delivered without MIME_META
        blob = store.index.blobs.hash_at(svc.mailbox(A, "INBOX").blobs[0])
        assert store.read_mime_meta(blob) is None
        v, _ = svc.select(A, "INBOX")
        (r,) = v.fetch([(1, 1)], [FetchAtt("ENVELOPE")])
        assert b'"nometa"' in r.items[0]
        await svc.drain()
        assert store.read_mime_meta(blob) is not None

    run(go())


def test_resolve_sequence_sets(store: Store, svc: MailboxService) -> None:
    for i in range(3):
        deliver(store, msg(str(i)))
    v, _ = svc.select(A, "INBOX")
    assert v.resolve([(2, None)], uid=False) == [(2, 2), (3, 3)]
    assert v.resolve([(None, 2)], uid=False) == [(2, 2), (3, 3)]
    assert v.resolve([(100, None)], uid=True) == [(3, 3)]  # n:* includes the last UID
    assert v.resolve([(7, 9)], uid=True) == []
    with pytest.raises(MailboxError) as e:
        v.resolve([(4, 4)], uid=False)
    assert e.value.bad


def test_search_keys(store: Store, svc: MailboxService) -> None:
    async def go() -> None:
        await svc.append(A, "INBOX", msg("Hello there", "the quick brown fox"), ["\\Seen"])
        await svc.append(
            A,
            "INBOX",
            b"From: =?ISO-8859-1?Q?J=FCrgen?= <j@example.net>\r\nTo: x@example.org\r\n"
            b"Subject: =?UTF-8?B?R3LDvMOfZQ==?=\r\nDate: Tue, 1 Mar 2022 09:00:00 -0500\r\n"
            b"X-Tag: blue\r\nContent-Transfer-Encoding: quoted-printable\r\n"
            b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\nsch=F6ne Gr=FC=DFe\r\n",
            ["$Work", "\\Flagged"],
            1_650_000_000_000,
        )
        await svc.append(A, "INBOX", b"x" * 5000, ["\\Deleted"])
        v, _ = svc.select(A, "INBOX", rev2=True)

        def uids(k: Key) -> list[int]:
            return [u for _, u in search(v, k).matches]

        assert uids(Key("ALL")) == [1, 2, 3]
        assert uids(Key("UNSEEN")) == [2, 3]
        assert uids(Key("FLAGGED")) == [2] and uids(Key("DELETED")) == [3]
        assert uids(Key("KEYWORD", text="$work")) == [2]
        assert uids(Key("UNKEYWORD", text="$Work")) == [1, 3]
        assert uids(Key("FROM", text="jürgen")) == [2]
        assert uids(Key("FROM", text="BOB@example")) == [1]
        assert uids(Key("SUBJECT", text="grüße")) == [2]
        assert uids(Key("HEADER", name="X-Tag", text="BLU")) == [2]
        assert uids(Key("HEADER", name="X-Tag", text="")) == [2]
        assert uids(Key("BODY", text="schöne")) == [2]
        assert uids(Key("BODY", text="QUICK")) == [1]
        assert uids(Key("TEXT", text="hello there")) == [1]
        assert uids(Key("LARGER", num=4000)) == [3]
        assert uids(Key("SMALLER", num=4000)) == [1, 2]
        assert uids(Key("NOT", keys=(Key("SEEN"),))) == [2, 3]
        assert uids(Key("OR", keys=(Key("SEEN"), Key("DELETED")))) == [1, 3]
        assert uids(Key("AND", keys=(Key("UNSEEN"), Key("BODY", text="fox")))) == []
        assert uids(Key("SEQ", ranges=((2, None),))) == [2, 3]
        assert uids(Key("UID", ranges=((1, 1), (3, 3)))) == [1, 3]
        assert uids(Key("SENTON", date=dt.date(2022, 3, 1))) == [2]
        assert uids(Key("SENTBEFORE", date=dt.date(2022, 3, 1))) == [1]
        day = dt.datetime.fromtimestamp(1_650_000_000).date()
        assert uids(Key("ON", date=day)) == [2]
        assert uids(Key("BEFORE", date=day)) == [2][:0]
        assert uids(Key("SINCE", date=day)) == [1, 2, 3]
        mb = svc.mailbox(A, "INBOX")
        r = search(v, Key("MODSEQ", num=mb.modseqs[1]))
        assert [u for _, u in r.matches] == [2, 3] and r.highest_modseq == mb.modseqs[2]
        eid = v.fetch([(2, 2)], [FetchAtt("EMAILID")])[0].items[0][9:-1].decode()
        assert uids(Key("EMAILID", text=eid)) == [2]

    run(go())


def test_deleted_mailbox_ends_the_view(store: Store, svc: MailboxService) -> None:
    async def go() -> None:
        await svc.create(A, "Tmp")
        v, _ = svc.select(A, "Tmp")
        await svc.delete(A, "Tmp")
        with pytest.raises(MailboxGone):
            v.sync(expunge_allowed=True)

    run(go())


def test_new_keyword_resends_flags(store: Store, svc: MailboxService) -> None:
    async def go() -> None:
        deliver(store, msg("a"))
        v, _ = svc.select(A, "INBOX", rev2=True)
        w, _ = svc.select(A, "INBOX", rev2=True)
        await w.store_flags([(1, 1)], "+", ["$New"])
        ups = v.sync(expunge_allowed=False)
        assert any(isinstance(u, KeywordsChanged) and "$New" in u.flags for u in ups)
        assert any(isinstance(u, FlagsChanged) and "$New" in u.flags for u in ups)

    run(go())


# -- the fast paths and their caches -------------------------------------------------------------


def _inbox(store: Store) -> ix.Mailbox:
    acct = store.index.account_by_address(A)
    assert acct is not None
    mb = store.index.mailbox_by_name(acct.guid, "INBOX")
    assert mb is not None
    return mb


def _general_lines(v: Any, targets: list[tuple[int, int]], atts: list[FetchAtt]) -> bytes:
    """FETCH rendered through the general path (one FetchResult per message)."""
    return b"".join(
        b"* %d FETCH (%s)\r\n" % (r.seq, b" ".join(r.items)) for r in v.fetch(targets, atts)
    )


def test_fetch_fast_path_matches_the_general_path(store: Store, svc: MailboxService) -> None:
    async def go() -> None:
        for i in range(30):
            deliver(store, msg(str(i)), flags=(0, ix.SEEN, ix.SEEN | ix.FLAGGED)[i % 3])
        v, _ = svc.select(A, "INBOX")  # IMAP4rev1: \Recent is part of the flags
        other, _ = svc.select(A, "INBOX", rev2=True)
        await other.store_flags([(3, 3), (4, 4)], "+", ["$Work", "\\Answered"])
        await other.store_flags([(5, 5), (9, 9), (10, 10), (20, 20)], "+", ["\\Deleted"])
        await other.expunge()  # pending in v: its view indexes 4, 8, 9, 19
        deliver(store, msg("late"))
        v.sync(expunge_allowed=False)
        mapping = v.column_runs(_inbox(store))
        assert mapping == ([(0, 4, 0), (5, 8, 4), (10, 19, 7), (20, 31, 16)], [4, 8, 9, 19])
        f, u = FetchAtt("FLAGS"), FetchAtt("UID")
        rich = [u, FetchAtt("RFC822.SIZE"), f, FetchAtt("INTERNALDATE"), FetchAtt("MODSEQ")]
        for atts in ([f], [u, f], rich):
            for ranges in ([(1, None)], [(4, 12)], [(9, 10)], [(1, 1)], [(31, 31)]):
                targets = v.resolve(ranges, uid=False)
                fast, missing = v.fetch_lines(targets, atts)
                assert missing == 0
                assert fast == _general_lines(v, targets, atts), (atts, ranges)
        lines, _ = v.fetch_lines(v.resolve([(1, 5)], uid=False), [f])
        assert lines.splitlines()[2:] == [
            b"* 3 FETCH (FLAGS (\\Seen \\Answered \\Flagged $Work \\Recent))",
            b"* 4 FETCH (FLAGS (\\Answered $Work \\Recent))",
            b"* 5 FETCH (FLAGS (\\Seen \\Deleted \\Recent))",  # expunged elsewhere
        ]
        # SEARCH over the same runs: messages expunged elsewhere never match
        live = [q for q in range(1, 32) if q not in (5, 9, 10, 20)]
        unseen = [q for q in live if q == 31 or (q - 1) % 3 == 0]
        assert [q for q, _ in search(v, Key("UNSEEN")).matches] == unseen
        either = Key("OR", keys=(Key("UNSEEN"), Key("FROM", text="BOB")))
        assert [q for q, _ in search(v, either).matches] == live
        both = Key("AND", keys=(Key("FROM", text="bob"), Key("NOT", keys=(Key("SEEN"),))))
        assert [q for q, _ in search(v, both).matches] == unseen
        # once the expunges are announced the view maps onto the columns in one run again
        v.sync(expunge_allowed=True)
        assert v.column_runs(_inbox(store)) == ([(0, 27, 0)], [])

    run(go())


def test_flag_list_cache_follows_flag_and_keyword_changes(
    store: Store, svc: MailboxService
) -> None:
    async def go() -> None:
        deliver(store, msg("a"))
        deliver(store, msg("b"))
        v, _ = svc.select(A, "INBOX", rev2=True)
        other, _ = svc.select(A, "INBOX", rev2=True)

        def flags() -> bytes:
            v.sync(expunge_allowed=True)
            return v.fetch_lines(v.resolve([(1, None)], uid=False), [FetchAtt("FLAGS")])[0]

        assert flags() == b"* 1 FETCH (FLAGS ())\r\n* 2 FETCH (FLAGS ())\r\n"
        await other.store_flags([(1, 1)], "+", ["$A"])
        assert flags() == b"* 1 FETCH (FLAGS ($A))\r\n* 2 FETCH (FLAGS ())\r\n"
        await other.store_flags([(2, 2)], "+", ["$B", "\\Seen"])
        assert flags() == b"* 1 FETCH (FLAGS ($A))\r\n* 2 FETCH (FLAGS (\\Seen $B))\r\n"
        await other.store_flags([(1, 1)], "-", ["$A"])
        await other.store_flags([(2, 2)], "", ["$A"])
        assert flags() == b"* 1 FETCH (FLAGS ())\r\n* 2 FETCH (FLAGS ($A))\r\n"

    run(go())


def test_sync_uses_the_change_log_and_falls_back_to_a_scan(
    store: Store, svc: MailboxService, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def go() -> None:
        for i in range(6):
            deliver(store, msg(str(i)))
        v, _ = svc.select(A, "INBOX", rev2=True)
        other, _ = svc.select(A, "INBOX", rev2=True)
        mb = _inbox(store)
        base = mb.highestmodseq
        await other.store_flags([(2, 2)], "+", ["\\Flagged"])
        await other.store_flags([(2, 2), (5, 5)], "+", ["\\Answered"])
        assert mb.changed_uids_since(base) == [2, 5]
        assert mb.changed_uids_since(mb.highestmodseq) == []
        ups = v.sync(expunge_allowed=True)
        assert [(u.uid, u.flags) for u in ups if isinstance(u, FlagsChanged)] == [
            (2, ("\\Answered", "\\Flagged")),
            (5, ("\\Answered",)),
        ]
        # a trimmed log no longer reaches back to the view's last look: a scan, same answer
        monkeypatch.setattr(ix, "CHANGE_LOG_MAX", 4)
        base = mb.highestmodseq
        for k in range(1, 7):
            await other.store_flags([(k, k)], "+", ["\\Draft"])
        assert mb.changes_floor > base and mb.changed_uids_since(base) is None
        assert len(mb.change_uids) <= 4
        ups = v.sync(expunge_allowed=True)
        assert [u.uid for u in ups if isinstance(u, FlagsChanged)] == [1, 2, 3, 4, 5, 6]
        # this session's own STORE is not reported back to it
        await v.store_flags([(3, 3)], "-", ["\\Draft"])
        assert [u for u in v.sync(expunge_allowed=True) if isinstance(u, FlagsChanged)] == []

    run(go())


def test_change_log_starts_over_after_a_restart(tmp_path: Path) -> None:
    def open_store() -> Store:
        return Store.open(str(tmp_path / "d"), node_id=b"n" * 16, options=StoreOptions(sync=False))

    st = open_store()
    with st.transaction() as t:
        t.add_domain("example.org")
    with st.transaction() as t:
        t.add_account(A, "x")
    for i in range(3):
        deliver(st, msg(str(i)))
    with st.transaction() as t:
        t.store_flags(_inbox(st).guid, [1, 2], add=ix.SEEN)
    st.close()
    st = open_store()
    try:
        mb = _inbox(st)
        # from the checkpoint: empty, with its floor at HIGHESTMODSEQ; from a replay: complete
        assert mb.changes_floor == mb.highestmodseq or mb.changed_uids_since(0) == [1, 2]
        svc = MailboxService(st)

        async def go() -> None:
            v, _ = svc.select(A, "INBOX", rev2=True)
            other, _ = svc.select(A, "INBOX", rev2=True)
            await other.store_flags([(3, 3)], "+", ["\\Flagged"])
            assert mb.changed_uids_since(v._modseq) == [3]
            ups = v.sync(expunge_allowed=True)
            assert [(u.uid, u.flags) for u in ups if isinstance(u, FlagsChanged)] == [
                (3, ("\\Flagged",))
            ]

        run(go())
    finally:
        st.close()


def test_fetch_of_a_message_expunged_elsewhere(
    store: Store, svc: MailboxService, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def go() -> None:
        for i in range(3):
            deliver(store, msg(f"subject{i}"))
        v, _ = svc.select(A, "INBOX", rev2=True)
        other, _ = svc.select(A, "INBOX", rev2=True)
        await other.store_flags([(2, 2)], "+", ["\\Deleted"])
        await other.expunge()
        v.sync(expunge_allowed=False)  # noticed, not announced: 2 keeps its number
        atts = [
            FetchAtt("FLAGS"),
            FetchAtt("ENVELOPE"),
            FetchAtt("BODY", section="HEADER.FIELDS (SUBJECT)"),  # not PEEK: no \Seen for it
        ]
        lines, missing = v.fetch_lines(v.resolve([(2, 2)], uid=False), atts)
        assert missing == 0
        assert lines.startswith(b"* 2 FETCH (FLAGS (\\Deleted) ENVELOPE (")
        assert b"Subject: subject1\r\n" in lines
        await svc.drain()
        assert [
            (u.seq, u.uid) for u in other.sync(expunge_allowed=False) if isinstance(u, FlagsChanged)
        ] == []
        # the body reclaimed meanwhile: that message cannot be served, the others still are
        real = store.read_blob
        gone = store.index.blobs.hash_at(store.index.expunged_rows[(_inbox(store).guid, 2)][5])

        def read_blob(h: bytes) -> bytes:
            if h == gone:
                raise StoreError("reclaimed")
            return real(h)

        monkeypatch.setattr(store, "read_blob", read_blob)
        lines, missing = v.fetch_lines(
            v.resolve([(1, 3)], uid=False), [FetchAtt("BODY", section="TEXT", peek=True)]
        )
        assert missing == 1 and lines.count(b" FETCH ") == 2
        # its columns forgotten too: nothing left but the count
        store.index.expunged_rows.clear()
        assert v.fetch_lines(v.resolve([(2, 2)], uid=False), [FetchAtt("FLAGS")]) == (b"", 1)
        assert v.fetch_lines(v.resolve([(1, None)], uid=False), [FetchAtt("UID")]) == (
            b"* 1 FETCH (UID 1)\r\n* 3 FETCH (UID 3)\r\n",
            1,
        )

    run(go())


def test_rename_takes_subscriptions_along(store: Store, svc: MailboxService) -> None:
    async def go() -> None:
        await svc.create(A, "Lists/python/3")
        for n in ("Lists", "Lists/python/3", "Listsmore", "Other"):
            await svc.subscribe(A, n, True)
        await svc.rename(A, "Lists", "Groups")
        subs = svc.account(A).subscriptions
        assert subs >= {"Groups", "Groups/python/3", "Listsmore", "Other"}
        assert not {"Lists", "Lists/python/3"} & subs
        # INBOX's rename moves its messages, not the mailbox: its subscription stays
        await svc.subscribe(A, "INBOX", True)
        await svc.rename(A, "INBOX", "Old")
        assert "INBOX" in svc.account(A).subscriptions

    run(go())


def test_create_with_special_use(store: Store, svc: MailboxService) -> None:
    async def go() -> None:
        await svc.create(A, "Work/Outbox", ["\\Sent", "\\archive"])
        assert svc.mailbox(A, "Work/Outbox").special_use == ix.SU_SENT | ix.SU_ARCHIVE
        assert svc.mailbox(A, "Work").special_use == 0  # a parent made on the way
        entry = svc.list_mailboxes(A, "", ["Work/Outbox"])[0]
        assert entry.attributes == ("\\HasNoChildren", "\\Sent", "\\Archive")
        with pytest.raises(MailboxError) as e:
            await svc.create(A, "Important", ["\\Important"])
        assert e.value.code == "USEATTR"
        with pytest.raises(MailboxError):
            svc.mailbox(A, "Important")  # nothing was created

    run(go())


def test_store_that_changes_nothing_writes_nothing(store: Store, svc: MailboxService) -> None:
    async def go() -> None:
        deliver(store, msg("a"), flags=ix.SEEN)
        deliver(store, msg("b"))
        v, _ = svc.select(A, "INBOX", rev2=True, condstore=True)
        other, _ = svc.select(A, "INBOX", rev2=True, condstore=True)
        mb = _inbox(store)
        before = (mb.highestmodseq, list(mb.modseqs))
        res = await v.store_flags([(1, 1)], "+", ["\\Seen"])
        assert [f.items for f in res.fetches] == [
            (b"FLAGS (\\Seen)", b"MODSEQ (%d)" % before[1][0])
        ]
        res = await v.store_flags([(2, 2)], "-", ["\\Seen", "$Nope"], silent=True)
        assert res.fetches == ()  # .SILENT and nothing changed: not even MODSEQ
        await v.store_flags([(1, 1)], "", ["\\Seen"])  # replace with the same set
        assert (mb.highestmodseq, list(mb.modseqs)) == before
        assert other.sync(expunge_allowed=True) == []
        # UNCHANGEDSINCE still fails for a message changed since, changing or not
        both = [(1, 1), (2, 2)]
        res = await v.store_flags(both[:1], "+", ["\\Seen"], unchanged_since=before[1][0] - 1)
        assert res.modified == (1,) and mb.highestmodseq == before[0]
        # a STORE that changes some: only those get a new MODSEQ
        res = await v.store_flags(both, "+", ["\\Seen"], silent=True)
        assert mb.modseqs[0] == before[1][0] and mb.modseqs[1] > before[0]
        assert [f.seq for f in res.fetches] == [2]  # CONDSTORE .SILENT: only the changed one
        ups = other.sync(expunge_allowed=True)
        assert [(u.seq, u.flags) for u in ups if isinstance(u, FlagsChanged)] == [(2, ("\\Seen",))]

    run(go())
