"""A Hypothesis state machine of the store against a pure-Python model.

Random sequences of operations run on a real store with small segments and chunks, so segment
rollover, chunked bodies and compaction happen: multi-recipient deliveries (random small bodies,
some from a shared pool so single instance and dedup are exercised, some streamed through a
`BlobWriter`), flag and keyword deltas, expunges, mailbox create/rename/delete, account
add/delete, refused transactions, aborted transactions with streamed chunks, compaction,
checkpoints, close + reopen (from the checkpoint or by full replay) and batches of concurrent
async commits sharing group commit.

The model is dictionaries: account address → mailbox names, mailbox GUID → {uid: (flags,
keywords, body, modseq)} plus UIDNEXT, HIGHESTMODSEQ, the keyword spellings and the VANISHED list.
It predicts every UID and MODSEQ exactly (the store allocates them in LSN order). After every step
the store must match the model and keep its invariants: UIDs strictly ascending, UIDNEXT > every
UID, HIGHESTMODSEQ >= every MODSEQ, neither ever going down, UIDVALIDITY fixed, each blob's
refcount equal to the number of messages referencing it, and every visible body reading back
byte-exact. A reopen, from the checkpoint that close() wrote or by a full replay, must give
exactly the index the store had before closing (`Index.serialize()` compared byte for byte).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from mailharbor.store import (
    AlreadyExists,
    Change,
    Delivery,
    InvalidArgument,
    NotFound,
    Store,
    blob_hash,
)
from mailharbor.store import index as ix

from . import DOMAIN, NODE, PWHASH, drop_checkpoints, index_differences, small_options

OPTIONS = small_options(segment_bytes=3 * 1024, chunk_bytes=768, cache_bytes=32 * 1024)
ADDRESSES = (f"ann@{DOMAIN}", f"ben@{DOMAIN}", f"cat@{DOMAIN}")
DEFAULT_BOXES = (
    ("INBOX", 0),
    ("Sent", ix.SU_SENT),
    ("Drafts", ix.SU_DRAFTS),
    ("Trash", ix.SU_TRASH),
    ("Junk", ix.SU_JUNK),
    ("Archive", ix.SU_ARCHIVE),
)
NAMES = ("Work", "work", "Lists", "Lists/python", "inbox", "INBOX/sub", "Sent", "Ärchiv/2024")
KEYWORDS = ("$Label1", "$label1", "Work", "WORK", "$Junk", "NonJunk")
FLAG_BITS = st.integers(0, 0x1F)
SHARED_BODIES = (
    b"Subject: shared\r\n\r\nthe same body for many recipients\r\n",
    b"",
    bytes(range(256)) * 3,
    b"Subject: big shared\r\n\r\n" + bytes(i * 7 % 251 for i in range(2500)),  # > chunk_bytes
)

# A body is drawn as a small spec (so failing steps print and shrink well): (-i, 0) is shared
# body i-1 (the same bytes again: single instance), (seed, size) random bytes of that size.
BodySpec = tuple[int, int]
bodies: st.SearchStrategy[BodySpec] = st.one_of(
    st.integers(1, len(SHARED_BODIES)).map(lambda i: (-i, 0)),
    st.tuples(
        st.integers(0, 1000),
        st.one_of(st.sampled_from([0, 1, 17, 767, 768, 769, 2000]), st.integers(0, 2500)),
    ),
)


def make_body(spec: BodySpec) -> bytes:
    seed, size = spec
    if seed < 0:
        return SHARED_BODIES[-seed - 1]
    return random.Random(seed).randbytes(size)


def canonical(name: str) -> str:
    parts = name.split("/")
    if parts[0].upper() == "INBOX":
        parts[0] = "INBOX"
    return "/".join(parts)


def name_key(name: str) -> str:
    return "INBOX" if name.upper() == "INBOX" else name


@dataclass
class MMessage:
    flags: int
    keywords: frozenset[str]  # lower-case
    body: bytes
    modseq: int


@dataclass
class MMailbox:
    guid: bytes
    account: str
    name: str
    special_use: int
    uidnext: int = 1
    hms: int = 1
    spellings: dict[str, str] = field(default_factory=dict)  # lower -> first spelling seen
    msgs: dict[int, MMessage] = field(default_factory=dict)
    vanished: list[tuple[int, int]] = field(default_factory=list)

    def deliver(self, uid: int, modseq: int, body: bytes, flags: int, kws: list[str]) -> None:
        assert uid == self.uidnext, f"{self.name}: UID {uid}, the model expected {self.uidnext}"
        assert modseq == self.hms + 1, f"{self.name}: MODSEQ {modseq}, expected {self.hms + 1}"
        for k in kws:
            self.spellings.setdefault(k.lower(), k)
        self.msgs[uid] = MMessage(flags, frozenset(k.lower() for k in kws), body, modseq)
        self.uidnext, self.hms = uid + 1, modseq

    def flags(self, ch: Change, add: int, remove: int, add_kw: list[str], rm_kw: list[str]) -> None:
        if not ch.uids:
            assert ch.modseq == 0
            return
        assert ch.modseq == self.hms + 1, f"{self.name}: MODSEQ {ch.modseq}"
        self.hms = ch.modseq
        for k in add_kw:
            self.spellings.setdefault(k.lower(), k)
        for u in ch.uids:
            m = self.msgs.get(u)
            if m is None:
                continue  # expunged by a concurrent commit before this one applied
            m.flags = (m.flags | add) & ~remove & 0xFF
            m.keywords = (m.keywords | {k.lower() for k in add_kw}) - {k.lower() for k in rm_kw}
            m.modseq = ch.modseq

    def expunge(self, ch: Change) -> None:
        if not ch.uids:
            assert ch.modseq == 0
            return
        assert ch.modseq == self.hms + 1, f"{self.name}: MODSEQ {ch.modseq}"
        self.hms = ch.modseq
        for u in ch.uids:
            if self.msgs.pop(u, None) is not None:
                self.vanished.append((u, ch.modseq))


@dataclass
class AsyncJob:
    """One transaction of a concurrent batch: its inputs, then its results."""

    kind: str
    boxes: list[bytes] = field(default_factory=list)
    body: bytes = b"refused"
    box: bytes = b""
    uids: list[int] = field(default_factory=list)
    account: str = ""
    name: str = ""
    lsn: int = 0
    delivery: Delivery = field(default_factory=Delivery)
    change: Change = field(default_factory=Change)
    created: bytes = b""


@dataclass
class MAccount:
    guid: bytes
    boxes: dict[str, bytes]  # name key -> mailbox GUID


class StoreMachine(RuleBasedStateMachine):
    def __init__(self, base: Path, runs: itertools.count[int]) -> None:
        super().__init__()
        self.dir = base / f"run-{next(runs)}"
        self.store = Store.open(str(self.dir), node_id=NODE, options=OPTIONS)
        self.accounts: dict[str, MAccount] = {}
        self.boxes: dict[bytes, MMailbox] = {}
        self.bodies: dict[bytes, bytes] = {}
        self.deleted_boxes: list[bytes] = []
        self.seen: dict[bytes, tuple[int, int, int]] = {}  # guid -> uidvalidity, uidnext, hms
        self.async_names = itertools.count(1)
        with self.store.transaction() as t:
            t.add_domain(DOMAIN)
        self._add_account(ADDRESSES[0])

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- model helpers -------------------------------------------------------------------------

    def _add_account(self, address: str) -> None:
        with self.store.transaction() as t:
            g = t.add_account(address, PWHASH)
        boxes = dict(self.store.index.accounts[g].mailboxes)
        assert set(boxes) == {n for n, _ in DEFAULT_BOXES}
        self.accounts[address] = MAccount(g, boxes)
        for name, su in DEFAULT_BOXES:
            self.boxes[boxes[name]] = MMailbox(boxes[name], address, name, su)

    def _drop_box(self, g: bytes) -> None:
        mb = self.boxes.pop(g)
        del self.accounts[mb.account].boxes[name_key(mb.name)]
        self.deleted_boxes.append(g)

    # Choices are drawn as indexes into lists in creation order, never as GUIDs: GUIDs are
    # random per run, and a strategy over them would differ between Hypothesis' replays.

    def _pick_box(self, data: st.DataObject) -> bytes:
        boxes = list(self.boxes)
        return boxes[data.draw(st.integers(0, len(boxes) - 1), label="mailbox #")]

    def _pick_boxes(self, data: st.DataObject, max_size: int = 4) -> list[bytes]:
        boxes = list(self.boxes)
        picks = data.draw(
            st.lists(
                st.integers(0, len(boxes) - 1),
                min_size=1,
                max_size=min(max_size, len(boxes)),
                unique=True,
            ),
            label="mailbox #s",
        )
        return [boxes[i] for i in picks]

    def _pick_account(self, data: st.DataObject) -> str:
        addrs = list(self.accounts)
        return addrs[data.draw(st.integers(0, len(addrs) - 1), label="account #")]

    def _pick_uids(self, data: st.DataObject, g: bytes) -> list[int]:
        mb = self.boxes[g]
        known = [*mb.msgs, mb.uidnext, mb.uidnext + 5]  # and some that do not exist
        if mb.vanished:
            known.append(mb.vanished[-1][0])
        return data.draw(st.lists(st.sampled_from(known), max_size=6), label="uids")

    def _keywords(self, data: st.DataObject, label: str) -> list[str]:
        return data.draw(st.lists(st.sampled_from(KEYWORDS), max_size=3), label=label)

    def _stored_body(self, body: bytes) -> bytes:
        h = blob_hash(body)
        self.bodies[h] = body
        return h

    # -- messages ------------------------------------------------------------------------------

    @precondition(lambda self: bool(self.boxes))
    @rule(data=st.data(), body=bodies, flags=FLAG_BITS, streamed=st.booleans())
    def deliver(self, data: st.DataObject, body: BodySpec, flags: int, streamed: bool) -> None:
        self._deliver(data, make_body(body), flags, streamed)

    def _deliver(self, data: st.DataObject, body: bytes, flags: int, streamed: bool) -> None:
        boxes = self._pick_boxes(data)
        kws = self._keywords(data, "keywords")
        with self.store.transaction() as t:
            if streamed:
                w = t.blob_writer()
                cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=3)))
                for a, b in itertools.pairwise([0, *cuts, len(body)]):
                    w.write(body[a:b])
                h = w.finish()
            else:
                h = t.put_blob(body)
            d = t.deliver(h, boxes, flags=flags, keywords=kws)
        assert h == self._stored_body(body)
        event(f"deliver: {'chunked' if len(body) > OPTIONS.chunk_bytes else 'inline'} body")
        for g in boxes:
            self.boxes[g].deliver(d.uids[g], d.modseqs[g], body, flags, kws)

    @precondition(lambda self: bool(self.boxes))
    @rule(data=st.data(), body1=bodies, body2=bodies)
    def deliver_two_in_one_transaction(
        self, data: st.DataObject, body1: BodySpec, body2: BodySpec
    ) -> None:
        b1, b2 = make_body(body1), make_body(body2)
        boxes1, boxes2 = self._pick_boxes(data), self._pick_boxes(data)
        with self.store.transaction() as t:
            d1 = t.deliver(t.put_blob(b1), boxes1)
            d2 = t.deliver(t.put_blob(b2), boxes2, flags=ix.SEEN)
        for d, boxes, body, flags in ((d1, boxes1, b1, 0), (d2, boxes2, b2, ix.SEEN)):
            self._stored_body(body)
            for g in boxes:
                self.boxes[g].deliver(d.uids[g], d.modseqs[g], body, flags, [])

    @precondition(lambda self: bool(self.boxes))
    @rule(data=st.data(), add=FLAG_BITS, remove=FLAG_BITS)
    def store_flags(self, data: st.DataObject, add: int, remove: int) -> None:
        g = self._pick_box(data)
        uids = self._pick_uids(data, g)
        add_kw, rm_kw = self._keywords(data, "add keywords"), self._keywords(data, "rm keywords")
        with self.store.transaction() as t:
            ch = t.store_flags(
                g, uids, add=add, remove=remove, add_keywords=add_kw, remove_keywords=rm_kw
            )
        mb = self.boxes[g]
        assert ch.uids == tuple(u for u in dict.fromkeys(uids) if u in mb.msgs)
        mb.flags(ch, add, remove, add_kw, rm_kw)

    @precondition(lambda self: bool(self.boxes))
    @rule(data=st.data())
    def expunge(self, data: st.DataObject) -> None:
        g = self._pick_box(data)
        uids = self._pick_uids(data, g)
        with self.store.transaction() as t:
            ch = t.expunge(g, uids)
        mb = self.boxes[g]
        assert ch.uids == tuple(u for u in dict.fromkeys(uids) if u in mb.msgs)
        mb.expunge(ch)

    # -- mailboxes and accounts ----------------------------------------------------------------

    @precondition(lambda self: bool(self.accounts))
    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def create_mailbox(self, data: st.DataObject, name: str) -> None:
        addr = self._pick_account(data)
        acct = self.accounts[addr]
        name = canonical(name)
        if name_key(name) in acct.boxes:
            with pytest.raises(AlreadyExists), self.store.transaction() as t:
                t.create_mailbox(acct.guid, name)
            return
        with self.store.transaction() as t:
            g = t.create_mailbox(acct.guid, name)
        acct.boxes[name_key(name)] = g
        self.boxes[g] = MMailbox(g, addr, name, 0)

    @precondition(lambda self: bool(self.boxes))
    @rule(data=st.data(), new=st.sampled_from(NAMES))
    def rename_mailbox(self, data: st.DataObject, new: str) -> None:
        g = self._pick_box(data)
        mb = self.boxes[g]
        acct = self.accounts[mb.account]
        new = canonical(new)
        if mb.name == "INBOX":
            with pytest.raises(InvalidArgument), self.store.transaction() as t:
                t.rename_mailbox(g, new)
        elif name_key(new) in acct.boxes:
            with pytest.raises(AlreadyExists), self.store.transaction() as t:
                t.rename_mailbox(g, new)
        else:
            with self.store.transaction() as t:
                t.rename_mailbox(g, new)
            del acct.boxes[name_key(mb.name)]
            acct.boxes[name_key(new)] = g
            mb.name = new

    @precondition(lambda self: bool(self.boxes))
    @rule(data=st.data())
    def delete_mailbox(self, data: st.DataObject) -> None:
        g = self._pick_box(data)
        if self.boxes[g].name == "INBOX":
            with pytest.raises(InvalidArgument), self.store.transaction() as t:
                t.delete_mailbox(g)
            return
        with self.store.transaction() as t:
            t.delete_mailbox(g)
        self._drop_box(g)

    @rule(address=st.sampled_from(ADDRESSES))
    def add_account(self, address: str) -> None:
        if address in self.accounts:
            with pytest.raises(AlreadyExists), self.store.transaction() as t:
                t.add_account(address.upper(), PWHASH)
            return
        self._add_account(address)

    @precondition(lambda self: len(self.accounts) >= 2)  # keep someone to deliver to
    @rule(address=st.sampled_from(ADDRESSES))
    def delete_account(self, address: str) -> None:
        if address not in self.accounts:
            with pytest.raises(NotFound), self.store.transaction() as t:
                t.delete_account(address)
            return
        with self.store.transaction() as t:
            t.delete_account(address.upper())
        for g in list(self.accounts[address].boxes.values()):
            self._drop_box(g)
        del self.accounts[address]

    # -- transactions that leave no trace ------------------------------------------------------

    @precondition(lambda self: bool(self.accounts) and bool(self.boxes))
    @rule(data=st.data(), body=bodies)
    def refused_transaction(self, data: st.DataObject, body: BodySpec) -> None:
        """A valid delivery and flag change, then an operation that is refused: nothing of the
        transaction happens (the model is unchanged, so the next UIDs prove no allocation).
        (The index's LSN may still move: an exclusive commit first settles pending frames, e.g.
        chunks streamed by an earlier aborted transaction or by this one's large body.)"""
        boxes = self._pick_boxes(data)
        acct = self.accounts[self._pick_account(data)]
        with pytest.raises(AlreadyExists), self.store.transaction() as t:
            t.deliver(t.put_blob(make_body(body)), boxes)
            t.store_flags(boxes[0], list(self.boxes[boxes[0]].msgs), add=ix.FLAGGED)
            t.create_mailbox(acct.guid, "inbox")

    @precondition(lambda self: bool(self.boxes))
    @rule(data=st.data(), size=st.integers(800, 4000))
    def aborted_transaction(self, data: st.DataObject, size: int) -> None:
        """Chunks streamed, then the client goes away: nothing becomes visible; the chunks
        are orphans (compaction reclaims them)."""
        boxes = self._pick_boxes(data)
        body = bytes((i * 13 + size) % 256 for i in range(size))
        with pytest.raises(ConnectionResetError), self.store.transaction() as t:
            w = t.blob_writer()
            w.write(body)
            t.deliver(w.finish(), boxes)
            raise ConnectionResetError("client went away")

    # -- concurrent commits --------------------------------------------------------------------

    @precondition(lambda self: bool(self.boxes))
    @rule(data=st.data())
    def async_group_commit(self, data: st.DataObject) -> None:
        """Several transactions committed concurrently (group commit); the model applies them
        in LSN order, which is the order the store allocated UIDs and MODSEQs in."""
        kinds = data.draw(
            st.lists(
                st.sampled_from(["deliver", "deliver", "flags", "expunge", "refused", "create"]),
                min_size=2,
                max_size=8,
            ),
            label="jobs",
        )
        jobs: list[AsyncJob] = []
        for kind in kinds:
            job = AsyncJob(kind)
            if kind == "deliver":
                job.boxes = self._pick_boxes(data, 3)
                job.body = make_body(data.draw(bodies, label="body"))
            elif kind in ("flags", "expunge"):
                job.box = self._pick_box(data)
                job.uids = self._pick_uids(data, job.box)
            elif kind == "refused":
                gone = self.deleted_boxes[-1] if self.deleted_boxes else bytes(16)
                job.boxes = [*self._pick_boxes(data, 2), gone]
            else:
                job.account = self._pick_account(data)
                job.name = f"Async/{next(self.async_names)}"
            jobs.append(job)
        store = self.store

        async def run(job: AsyncJob) -> None:
            async with store.transaction() as t:
                if job.kind in ("deliver", "refused"):
                    job.delivery = t.deliver(t.put_blob(job.body), job.boxes, keywords=["$Async"])
                elif job.kind == "flags":
                    job.change = t.store_flags(
                        job.box, job.uids, add=ix.ANSWERED, add_keywords=["$Async"]
                    )
                elif job.kind == "expunge":
                    job.change = t.expunge(job.box, job.uids)
                else:
                    job.created = t.create_mailbox(self.accounts[job.account].guid, job.name)
            job.lsn = t.committed_lsn

        async def main() -> list[BaseException | None]:
            return await asyncio.gather(*(run(j) for j in jobs), return_exceptions=True)

        results = asyncio.run(main())
        event(f"group commit: {len(jobs)} transactions")
        for job, r in zip(jobs, results, strict=True):
            if job.kind == "refused":
                assert isinstance(r, NotFound), r
            else:
                assert r is None, r
        for job in sorted((j for j in jobs if j.kind != "refused"), key=lambda j: j.lsn):
            if job.kind == "deliver":
                self._stored_body(job.body)
                for g in job.boxes:
                    d = job.delivery
                    self.boxes[g].deliver(d.uids[g], d.modseqs[g], job.body, 0, ["$Async"])
            elif job.kind == "flags":
                self.boxes[job.box].flags(job.change, ix.ANSWERED, 0, ["$Async"], [])
            elif job.kind == "expunge":
                self.boxes[job.box].expunge(job.change)
            else:
                self.accounts[job.account].boxes[job.name] = job.created
                self.boxes[job.created] = MMailbox(job.created, job.account, job.name, 0)

    # -- maintenance ---------------------------------------------------------------------------

    @rule()
    def compact(self) -> None:
        size = sum(s for _, s in self.store.segments())
        report = self.store.compact()
        event(
            f"compact: rewrote {min(report.segments_rewritten, 2)}+ segments, "
            f"reclaimed chunks: {report.chunks_reclaimed > 0}"
        )
        # (Whether compaction may grow the log is test_store's business; here: it says what it did.)
        assert sum(s for _, s in self.store.segments()) == size - (
            report.bytes_before - report.bytes_after
        )

    @rule()
    def checkpoint(self) -> None:
        assert self.store.checkpoint() == self.store.visible_lsn

    @rule(replay=st.booleans())
    def reopen(self, replay: bool) -> None:
        live = self.store.index
        self.store.close()
        if replay:
            drop_checkpoints(str(self.dir))
        self.store = Store.open(str(self.dir), node_id=NODE, options=OPTIONS)
        rec = self.store.recovery
        assert rec is not None
        how = "full replay" if replay else "from checkpoint"
        event(f"reopen: {how}{', checkpoint rejected' if rec.checkpoint_rejected else ''}")
        # Whether the checkpoint close() wrote is trusted is test_store's business
        # (test_checkpoint_with_orphan_chunks_is_trusted); here the index must be the same.
        diffs = index_differences(live, self.store.index)
        assert self.store.index.serialize() == live.serialize(), (
            f"reopened ({'full replay' if replay else 'from checkpoint'}) index differs: {diffs}"
        )

    # -- the comparison with the model ---------------------------------------------------------

    @invariant()
    def store_matches_model(self) -> None:
        idx = self.store.index
        assert {a.address: a.guid for a in idx.accounts.values()} == {
            addr: a.guid for addr, a in self.accounts.items()
        }
        for a in self.accounts.values():
            assert idx.accounts[a.guid].mailboxes == a.boxes
        assert set(idx.mailboxes) == set(self.boxes)
        expected_refs: collections.Counter[bytes] = collections.Counter()
        nmsgs = 0
        for g, m in self.boxes.items():
            mb = idx.mailboxes[g]
            where = f"{m.account}/{m.name}"
            assert (mb.name, mb.account, mb.special_use) == (
                m.name,
                self.accounts[m.account].guid,
                m.special_use,
            ), where
            uids = list(mb.uids)
            assert all(a < b for a, b in itertools.pairwise(uids)), where
            assert uids == sorted(m.msgs), where
            assert mb.uidnext == m.uidnext and mb.highestmodseq == m.hms, where
            assert mb.uidnext > max(uids, default=0), where
            assert mb.highestmodseq >= max(mb.modseqs, default=1), where
            assert mb.keywords == list(m.spellings.values()), where
            assert list(zip(mb.vanished_uids, mb.vanished_modseqs, strict=True)) == m.vanished
            prev = self.seen.get(g)
            if prev is not None:
                assert mb.uidvalidity == prev[0], where
                assert mb.uidnext >= prev[1] and mb.highestmodseq >= prev[2], where
            self.seen[g] = (mb.uidvalidity, mb.uidnext, mb.highestmodseq)
            for i, uid in enumerate(uids):
                want = m.msgs[uid]
                got_kw = frozenset(k.lower() for k in mb.keyword_names(mb.kwbits[i]))
                assert (mb.flags[i], got_kw, mb.modseqs[i], mb.sizes[i]) == (
                    want.flags,
                    want.keywords,
                    want.modseq,
                    len(want.body),
                ), f"{where} UID {uid}"
                h = idx.blobs.hash_at(mb.blobs[i])
                assert h == blob_hash(want.body), f"{where} UID {uid}"
                expected_refs[h] += 1
            nmsgs += len(uids)
        b = idx.blobs
        for s in range(len(b)):
            assert b.refs[s] == expected_refs.get(b.hash_at(s), 0), b.hash_at(s).hex()
        assert idx.message_count == nmsgs
        for h in expected_refs:
            assert self.store.read_blob(h) == self.bodies[h]


@pytest.mark.timeout(300)
def test_store_against_model(tmp_path: Path) -> None:
    runs = itertools.count(1)

    class Machine(StoreMachine):
        def __init__(self) -> None:
            super().__init__(tmp_path, runs)

    # The step count is this test's own; examples, derandomization etc. come from the profile.
    # The deadline would apply to a whole run of steps (fsyncs included), so it is off.
    run_state_machine_as_test(Machine, settings=settings(stateful_step_count=50, deadline=None))
