"""The split-brain merge (service/merge.py) on real stores.

Two stores start from one history (the loser ingests the winner's frames), then each is written
as a primary would be during a split brain. The loser's branch (its frames after the divergence
LSN) goes through a `BranchSpool` into `merge_branch` on the winner; the tests check the
winner's end state exactly and the audit log's lines. A Hypothesis property runs random
divergent operation sequences: no message of either side is lost (by Message-ID), nothing
removed comes back, and no UID of a shared mailbox names two messages.
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailharbor.service.merge import AUDIT_FILE, RECOVERED, BranchSpool, MergeReport, merge_branch
from mailharbor.store import Store, StoreOptions
from mailharbor.store import format as fmt
from mailharbor.store import index as ix

W_NODE = b"W" * 16
L_NODE = b"L" * 16
PWHASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
OPTS = StoreOptions(
    segment_bytes=64 * 1024,
    chunk_bytes=4096,
    cache_bytes=1 << 20,
    checkpoint_every_bytes=1 << 30,
    sync=False,
)


def body(mid: str, size: int = 300) -> bytes:
    head = f"From: x@remote.test\r\nMessage-ID: <{mid}>\r\nSubject: {mid}\r\n\r\n".encode()
    fill = (mid.encode() + b" ") * (size // (len(mid) + 1) + 1)
    return head + fill[: max(0, size - len(head))]


_MID = re.compile(rb"^Message-ID: <([^>]*)>", re.M)


def message_id(data: bytes) -> str:
    m = _MID.search(data)
    assert m is not None
    return m.group(1).decode()


@dataclass(frozen=True)
class Msg:
    uid: int
    flags: int
    keywords: frozenset[str]


def mailbox_state(s: Store, g: bytes) -> dict[str, Msg]:
    """Message-ID -> (UID, flags, keywords) of one mailbox (each Message-ID once)."""
    mb = s.index.mailboxes[g]
    out: dict[str, Msg] = {}
    for i, uid in enumerate(mb.uids):
        mid = message_id(s.read_blob(s.index.blobs.hash_at(mb.blobs[i])))
        assert mid not in out, f"{mid} twice in {mb.name}"
        kws = frozenset(mb.keyword_names(mb.kwbits[i]))
        out[mid] = Msg(uid, mb.flags[i], kws)
    return out


def box(s: Store, address: str, name: str) -> bytes:
    a = s.index.account_by_address(address)
    assert a is not None, address
    mb = s.index.mailbox_by_name(a.guid, name)
    assert mb is not None, name
    return mb.guid


def deliver(s: Store, g: bytes, mid: str, size: int = 300, flags: int = 0) -> int:
    with s.transaction() as t:
        d = t.deliver(t.put_blob(body(mid, size)), [g], flags=flags)
    return d.uids[g]


def diverge(w: Store, loser: Store) -> int:
    """Give the loser the winner's log; both then write on their own (new generations)."""
    loser.ingest_blocking(list(w.read_frames(1)))
    d = w.last_lsn
    w.begin_generation(2)
    loser.begin_generation(3)
    return d


def merge(w: Store, loser: Store, d: int, spool_path: str) -> MergeReport:
    sp = BranchSpool(spool_path)
    frames = list(loser.read_frames(d + 1))
    for i in range(0, len(frames), 3):
        sp.add(frames[i : i + 3])
    sp.finish()
    return asyncio.run(merge_branch(w, spool_path, loser=L_NODE))


def audit_lines(w: Store) -> list[dict[str, object]]:
    path = Path(w.data_dir) / AUDIT_FILE
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    (tmp_path / "w").mkdir()
    (tmp_path / "l").mkdir()
    w = Store.open(str(tmp_path / "w"), node_id=W_NODE, options=OPTS)
    loser = Store.open(str(tmp_path / "l"), node_id=L_NODE, options=OPTS)
    try:
        yield w, loser
    finally:
        w.close()
        loser.close()


# --- the named scenario -----------------------------------------------------------------------


def test_merge_scenario(stores: tuple[Store, Store], tmp_path: Path) -> None:
    w, lo = stores
    # The common prefix.
    with w.transaction() as t:
        t.add_domain("example.org")
    with w.transaction() as t:
        alice = t.add_account("alice@example.org", PWHASH)
        t.add_account("bob@example.org", PWHASH, quota_bytes=100)
        t.add_account("carol@example.org", PWHASH)
    inbox = box(w, "alice@example.org", "INBOX")
    with w.transaction() as t:
        projects = t.create_mailbox(alice, "Projects")
        old = t.create_mailbox(alice, "Old")
        shared = t.create_mailbox(alice, "Shared")
        gone2 = t.create_mailbox(alice, "Gone2")
    for i in (1, 2, 3):
        assert deliver(w, inbox, f"p{i}") == i
    deliver(w, projects, "p4")
    deliver(w, shared, "p5")
    deliver(w, gone2, "p6")
    with w.transaction() as t:
        q0 = t.queue_add(
            t.put_blob(body("p7")), "a@example.org", ["r1@remote.test", "r2@remote.test"]
        )
    d = diverge(w, lo)
    w_inbox_before = w.index.mailboxes[inbox].highestmodseq

    # The winner's branch.
    assert deliver(w, inbox, "w1") == 4
    assert deliver(w, inbox, "w2", flags=ix.ANSWERED) == 5
    with w.transaction() as t:
        t.store_flags(inbox, [1], add=ix.FLAGGED)
    with w.transaction() as t:
        t.rename_mailbox(projects, "Work-W")
    with w.transaction() as t:
        t.delete_mailbox(old)
    with w.transaction() as t:
        t.delete_mailbox(gone2)
    deliver(w, shared, "w3")
    with w.transaction() as t:
        t.delete_account("bob@example.org")
    deliver(w, box(w, "carol@example.org", "INBOX"), "w4")
    with w.transaction() as t:
        both_w = t.create_mailbox(alice, "Both")
    deliver(w, both_w, "w5")
    w_uidnext = w.index.mailboxes[inbox].uidnext
    assert w_uidnext == 6

    # The loser's branch.
    l_inbox = inbox
    assert [deliver(lo, l_inbox, f"l{i}") for i in (1, 2, 3, 4)] == [4, 5, 6, 7]
    with lo.transaction() as t:
        t.store_flags(l_inbox, [1, 4], add=ix.SEEN)
        t.store_flags(l_inbox, [5], add_keywords=["$Work"])
    with lo.transaction() as t:
        t.expunge(l_inbox, [2, 7])
    assert deliver(lo, l_inbox, "l10", size=10_000) == 8  # chunked body
    with lo.transaction() as t:
        t.rename_mailbox(projects, "Work-L")
    deliver(lo, old, "l5")
    with lo.transaction() as t:
        t.delete_mailbox(shared)
    with lo.transaction() as t:
        t.store_flags(gone2, [1], add=ix.SEEN)
    deliver(lo, box(lo, "bob@example.org", "INBOX"), "l6", size=500)
    with lo.transaction() as t:
        t.delete_account("carol@example.org")
    with lo.transaction() as t:
        newl = t.create_mailbox(alice, "NewL")
        both_l = t.create_mailbox(alice, "Both")
    deliver(lo, newl, "l7")
    deliver(lo, both_l, "l8")
    # A copy of a prefix message: its body is not in the branch (single instance).
    p3_blob = lo.index.blobs.hash_at(lo.index.mailboxes[l_inbox].blobs[1])
    with lo.transaction() as t:
        t.deliver(p3_blob, [projects])
    with lo.transaction() as t:
        ql = t.queue_add(
            t.put_blob(body("l9")), "a@example.org", ["x@remote.test", "y@remote.test"]
        )
        t.queue_add(t.put_blob(body("l12")), "a@example.org", ["z@remote.test"])
    ql2 = next(e for e in lo.index.queue if e not in (q0, ql))
    with lo.transaction() as t:
        t.queue_done(ql, "x@remote.test", fmt.QueueResult.DELIVERED)
        t.queue_done(ql2, "z@remote.test", fmt.QueueResult.DELIVERED)
        t.queue_done(q0, "r1@remote.test", fmt.QueueResult.DELIVERED)
    l_uidnext = lo.index.mailboxes[l_inbox].uidnext
    assert l_uidnext == 9
    l_inbox_modseq = lo.index.mailboxes[l_inbox].highestmodseq
    w_inbox_modseq = w.index.mailboxes[inbox].highestmodseq

    rep = merge(w, lo, d, str(tmp_path / "branch.spool"))
    assert rep.unresolved == 0 and rep.collisions == 2
    floor = max(w_uidnext, l_uidnext)

    # alice's INBOX: prefix 1 and 3 stay; 2 expunged (loser); the winner's 4 and 5 collided
    # with the loser's and moved above both UIDNEXTs; the loser's new mail is there once.
    got = mailbox_state(w, inbox)
    assert set(got) == {"p1", "p3", "w1", "w2", "l1", "l2", "l3", "l10"}
    assert got["p1"] == Msg(1, ix.SEEN | ix.FLAGGED, frozenset())
    assert got["p3"].uid == 3
    new = ["w1", "w2", "l1", "l2", "l3", "l10"]
    assert [got[m].uid for m in new] == list(range(floor, floor + 6))
    assert got["w2"].flags == ix.ANSWERED
    assert got["l1"].flags == ix.SEEN
    assert got["l2"].keywords == {"$Work"}
    assert len(w.read_blob(w.index.blobs.hash_at(w.index.mailboxes[inbox].blobs[-1]))) == 10_000
    mb = w.index.mailboxes[inbox]
    assert not {4, 5, 6, 7, 8} & set(mb.uids)
    assert list(mb.uids) == sorted(mb.uids)
    assert mb.highestmodseq > max(l_inbox_modseq, w_inbox_modseq, w_inbox_before)
    assert all(m > max(l_inbox_modseq, w_inbox_modseq) for m in mb.modseqs[2:])

    # Rename vs rename: the winner's name; the loser's copy of p3 is in it.
    assert w.index.mailboxes[projects].name == "Work-W"
    assert set(mailbox_state(w, projects)) == {"p4", "p3"}
    # Old: deleted on the winner, mail for it on the loser: recreated (new GUID).
    old_now = box(w, "alice@example.org", "Old")
    assert old_now != old and set(mailbox_state(w, old_now)) == {"l5"}
    # Shared: deleted on the loser, mail for it on the winner: kept whole.
    assert set(mailbox_state(w, shared)) == {"p5", "w3"}
    # Gone2 stays deleted.
    assert w.index.mailbox_by_name(alice, "Gone2") is None
    # bob: deleted on the winner, mail on the loser: recreated with his password and quota.
    bob = w.index.account_by_address("bob@example.org")
    assert bob is not None and bob.password_hash == PWHASH and bob.quota_bytes == 100
    assert set(mailbox_state(w, box(w, "bob@example.org", "INBOX"))) == {"l6"}
    # carol: deleted on the loser, mail on the winner: kept.
    assert set(mailbox_state(w, box(w, "carol@example.org", "INBOX"))) == {"w4"}
    # New mailboxes; the same name on both sides is one mailbox.
    assert set(mailbox_state(w, box(w, "alice@example.org", "NewL"))) == {"l7"}
    assert box(w, "alice@example.org", "Both") == both_w
    assert set(mailbox_state(w, both_w)) == {"w5", "l8"}
    assert w.index.mailbox_by_name(alice, RECOVERED) is None
    # Queue: r1 was delivered by the loser; QL goes on for y only; QL2 was finished.
    assert w.index.queue[q0].recipients == ["r2@remote.test"]
    others = [q for g, q in w.index.queue.items() if g != q0]
    assert len(others) == 1 and others[0].recipients == ["y@remote.test"]
    assert message_id(w.read_blob(others[0].blob)) == "l9"

    lines = audit_lines(w)
    rules = [x["rule"] for x in lines]
    assert rules[0] == "merge:start" and rules[-1] == "merge:done"
    assert all(x["merge"] == rep.merge_id for x in lines)
    for r in (
        "merge:uid-collision",
        "merge:redeliver",
        "merge:flags",
        "merge:expunge",
        "merge:rename-vs-rename",
        "merge:mailbox-recreated",
        "merge:delivery-beats-mailbox-delete",
        "merge:flags-target-gone",
        "merge:account-recreated",
        "merge:mail-beats-account-delete",
        "merge:mailbox-create",
        "merge:mailbox-create-same-name",
        "merge:queue-add",
        "merge:queue-done-on-loser",
        "merge:queue-done",
        "merge:quota-bypassed",
    ):
        assert r in rules, r
    coll = [x for x in lines if x["rule"] == "merge:uid-collision"]
    assert sorted((x["old_uid"], x["new_uid"]) for x in coll) == [(4, floor), (5, floor + 1)]
    l1 = next(x for x in lines if x["rule"] == "merge:redeliver" and x["old_uid"] == 4)
    assert l1["new_uid"] == floor + 2 and l1["mailbox"] == inbox.hex()
    assert rep.rules == {r: rules.count(r) for r in set(rules)}


def test_spool_refuses_corrupt_frames(tmp_path: Path, stores: tuple[Store, Store]) -> None:
    w, _ = stores
    with w.transaction() as t:
        t.add_domain("example.org")
    raw = bytearray(next(iter(w.read_frames(1))))
    raw[-1] ^= 1
    sp = BranchSpool(str(tmp_path / "s"))
    from mailharbor.service.merge import MergeError

    with pytest.raises(MergeError, match="corrupt"):
        sp.add([bytes(raw)])
    sp.discard()
    assert not (tmp_path / "s").exists()


# --- the property -----------------------------------------------------------------------------

BOXES = ("INBOX", "Archive", "Lists")

# An operation: (kind, mailbox index, pick) — pick chooses a message (modulo the count).
Op = tuple[str, int, int]
ops = st.lists(
    st.tuples(
        st.sampled_from(["deliver", "deliver", "flag", "unflag", "expunge", "move"]),
        st.integers(0, len(BOXES) - 1),
        st.integers(0, 1000),
    ),
    max_size=12,
)


def apply_ops(s: Store, ops: list[Op], tag: str) -> None:
    acct = s.index.account_by_address("u@example.org")
    assert acct is not None
    boxes = [acct.mailboxes[ix.name_key(n)] for n in BOXES]
    for n, (kind, bi, pick) in enumerate(ops):
        g = boxes[bi]
        mb = s.index.mailboxes[g]
        if kind == "deliver":
            deliver(s, g, f"{tag}{n}@x", size=200 + pick * 13)
            continue
        if not len(mb):
            continue
        uid = mb.uids[pick % len(mb)]
        with s.transaction() as t:
            if kind == "flag":
                t.store_flags(g, [uid], add=ix.SEEN, add_keywords=[f"k{pick % 3}"])
            elif kind == "unflag":
                t.store_flags(g, [uid], remove=ix.SEEN, remove_keywords=["k0"])
            elif kind == "expunge":
                t.expunge(g, [uid])
            else:
                i = mb.position(uid)
                assert i is not None
                dest = boxes[(bi + 1) % len(boxes)]
                t.deliver(s.index.blobs.hash_at(mb.blobs[i]), [dest], flags=mb.flags[i])
                t.expunge(g, [uid])


def snapshot(s: Store) -> dict[str, dict[str, Msg]]:
    acct = s.index.account_by_address("u@example.org")
    assert acct is not None
    return {n: mailbox_state(s, acct.mailboxes[ix.name_key(n)]) for n in BOXES}


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(prefix=ops, w_ops=ops, l_ops=ops)
def test_merge_property(prefix: list[Op], w_ops: list[Op], l_ops: list[Op]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "w").mkdir()
        Path(tmp, "l").mkdir()
        w = Store.open(str(Path(tmp, "w")), node_id=W_NODE, options=OPTS)
        lo = Store.open(str(Path(tmp, "l")), node_id=L_NODE, options=OPTS)
        try:
            with w.transaction() as t:
                t.add_domain("example.org")
            with w.transaction() as t:
                a = t.add_account("u@example.org", PWHASH)
                t.create_mailbox(a, "Lists")
            apply_ops(w, prefix, "p")
            d = diverge(w, lo)
            before = snapshot(w)
            apply_ops(w, w_ops, "w")
            apply_ops(lo, l_ops, "l")
            if lo.last_lsn == d:
                return  # the loser wrote nothing: no branch to merge
            ws, ls = snapshot(w), snapshot(lo)
            acct = w.index.account_by_address("u@example.org")
            assert acct is not None
            guids = {n: acct.mailboxes[ix.name_key(n)] for n in BOXES}
            uidnext = {
                n: max(w.index.mailboxes[g].uidnext, lo.index.mailboxes[g].uidnext)
                for n, g in guids.items()
            }
            # Every UID the loser gave after d, per mailbox (even if expunged since): its message.
            loser_uids: dict[bytes, dict[int, str]] = {}
            for raw in lo.read_frames(d + 1):
                for rec in fmt.decode_records(raw[fmt.FRAME_HEADER_SIZE :]):
                    if isinstance(rec, fmt.Deliver):
                        mid = message_id(lo.read_blob(rec.blob))
                        for tg in rec.targets:
                            loser_uids.setdefault(tg.mailbox, {})[tg.uid] = mid
            rep = merge(w, lo, d, str(Path(tmp, "spool")))
            assert rep.unresolved == 0
            got = snapshot(w)
            for n in BOXES:
                prefix_ids = set(before[n])
                want = (set(ws[n]) & set(ls[n]) & prefix_ids) | (set(ws[n]) - prefix_ids)
                want |= set(ls[n]) - prefix_ids
                assert set(got[n]) == want, n
                mb = w.index.mailboxes[guids[n]]
                assert list(mb.uids) == sorted(set(mb.uids))
                # No UID names two messages: a UID the loser used holds the loser's message
                # (the same message, added on both sides) or nothing.
                lu = loser_uids.get(guids[n], {})
                for mid, m in got[n].items():
                    assert m.uid not in lu or lu[m.uid] == mid, (n, mid, m.uid)
                    old = ws[n].get(mid)
                    if old is not None and old.uid == m.uid:
                        continue  # untouched on the winner
                    assert m.uid >= uidnext[n], (n, mid, m.uid, uidnext[n])
                # The loser's new messages keep their end state of flags and keywords (a message
                # added on both sides gets the loser's deltas on top of the winner's state).
                for mid in set(ls[n]) - prefix_ids - set(ws[n]):
                    assert got[n][mid].flags == ls[n][mid].flags, (n, mid)
                    assert got[n][mid].keywords == ls[n][mid].keywords, (n, mid)
        finally:
            w.close()
            lo.close()


# --- GUIDs kept, and a merge resumed after the winner stopped ---------------------------------


def guids(s: Store, g: bytes) -> dict[str, bytes]:
    """Message-ID -> message GUID (the POP3 UIDL) of one mailbox."""
    mb = s.index.mailboxes[g]
    return {
        message_id(s.read_blob(s.index.blobs.hash_at(mb.blobs[i]))): mb.msg_guid(i)
        for i in range(len(mb))
    }


def small_scenario(w: Store, lo: Store) -> int:
    """A split brain with structural changes, UID collisions, several delivery batches, flag
    changes on the common prefix and a queue entry. Returns the divergence LSN."""
    with w.transaction() as t:
        t.add_domain("example.org")
    with w.transaction() as t:
        alice = t.add_account("alice@example.org", PWHASH)
        t.add_account("bob@example.org", PWHASH)
    inbox = box(w, "alice@example.org", "INBOX")
    for i in range(3):
        deliver(w, inbox, f"p{i}")
    d = diverge(w, lo)
    for i in range(3):
        deliver(w, inbox, f"w{i}")
    with w.transaction() as t:
        t.delete_account("bob@example.org")
    for i in range(7):
        deliver(lo, inbox, f"l{i}", flags=ix.SEEN if i % 2 else 0)
    with lo.transaction() as t:
        t.store_flags(inbox, [1, 2], add=ix.FLAGGED)
    with lo.transaction() as t:
        t.expunge(inbox, [3])
    with lo.transaction() as t:
        new = t.create_mailbox(alice, "NewL")
    deliver(lo, new, "n1")
    deliver(lo, new, "n2")
    deliver(lo, box(lo, "bob@example.org", "INBOX"), "b1")
    with lo.transaction() as t:
        t.queue_add(t.put_blob(body("q1")), "a@example.org", ["x@remote.test"])
    return d


def end_state(s: Store) -> dict[str, object]:
    out: dict[str, object] = {}
    for mb in s.index.mailboxes.values():
        acct = s.index.accounts[mb.account]
        st = mailbox_state(s, mb.guid)  # asserts every Message-ID is there once
        out[f"{acct.address}/{mb.name}"] = {k: (v.flags, v.keywords) for k, v in st.items()}
    out["queue"] = sorted(
        (message_id(s.read_blob(q.blob)), tuple(q.recipients)) for q in s.index.queue.values()
    )
    return out


def spool_of(lo: Store, d: int, path: str) -> str:
    sp = BranchSpool(path)
    sp.add(list(lo.read_frames(d + 1)))
    sp.finish()
    return path


def test_merge_keeps_message_guids_so_uidl_is_stable(
    stores: tuple[Store, Store], tmp_path: Path
) -> None:
    w, lo = stores
    d = small_scenario(w, lo)
    inbox = box(w, "alice@example.org", "INBOX")
    before_l = guids(lo, inbox)
    before_w = guids(w, inbox)
    rep = merge(w, lo, d, str(tmp_path / "s"))
    assert rep.collisions == 3 and rep.unresolved == 0
    after = guids(w, inbox)
    for mid, g in {**before_w, **before_l}.items():
        if mid in after:
            assert after[mid] == g, mid  # collided winner messages and loser messages alike
    assert {m for m in before_l if m.startswith("l")} <= set(after)
    lo_new = box(lo, "alice@example.org", "NewL")
    assert guids(w, box(w, "alice@example.org", "NewL")) == guids(lo, lo_new)


class _Crash(Exception):
    pass


def _pair(tmp_path: Path, name: str) -> tuple[Store, Store]:
    (tmp_path / name / "w").mkdir(parents=True)
    (tmp_path / name / "l").mkdir(parents=True)
    w = Store.open(str(tmp_path / name / "w"), node_id=W_NODE, options=OPTS)
    lo = Store.open(str(tmp_path / name / "l"), node_id=L_NODE, options=OPTS)
    return w, lo


@pytest.mark.parametrize("stage", ["committed", "journaled"])
def test_merge_resumes_after_the_winner_stops_mid_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    import mailharbor.service.merge as merge_mod

    monkeypatch.setattr(merge_mod, "BATCH_MESSAGES", 2)  # several delivery transactions
    w, lo = _pair(tmp_path, "ref")
    d = small_scenario(w, lo)
    merge(w, lo, d, str(tmp_path / "ref.spool"))
    want = end_state(w)
    w.close()
    lo.close()

    units = 0
    stops = 0
    for k in range(1, 40):  # stop at the k-th merge transaction, each in turn
        w, lo = _pair(tmp_path, f"k{k}")
        d = small_scenario(w, lo)
        spool = spool_of(lo, d, str(tmp_path / f"k{k}.spool"))
        seen = 0

        def fault(where: str, k: int = k) -> None:
            nonlocal seen
            if where == stage:
                seen += 1
                if seen == k:
                    raise _Crash

        try:
            asyncio.run(merge_branch(w, spool, loser=L_NODE, fault=fault))
        except _Crash:
            stops += 1
        else:
            units = seen
            w.close()
            lo.close()
            break
        data = w.data_dir
        w.close()  # the winner stops; its store reopens from disk
        w = Store.open(data, node_id=W_NODE, options=OPTS)
        rep = asyncio.run(merge_branch(w, spool, loser=L_NODE))
        assert rep.resumed
        assert end_state(w) == want, f"stopped after transaction {k}"
        again = asyncio.run(merge_branch(w, spool, loser=L_NODE))
        assert again.already_merged and end_state(w) == want
        rules = [x["rule"] for x in audit_lines(w)]
        assert "merge:resume" in rules
        w.close()
        lo.close()
    assert stops >= 8 and units == stops
