"""service/delivery.py without sockets: recipient resolution, the open-relay regressions, the
delivery transaction (one body, one commit), filters, quota and the mail log."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailharbor.proto.smtp import Reply
from mailharbor.service import maillog
from mailharbor.service.delivery import (
    Envelope,
    FilterAction,
    FilterVerdict,
    LocalDelivery,
    Recipient,
    Session,
    normalize_crlf,
)
from mailharbor.store import Store, StoreOptions

pytestmark = pytest.mark.timeout(60)

MX = Session(client_ip="192.0.2.7", helo="client.example", protocol="ESMTP")
AUTHED = Session(
    client_ip="192.0.2.8", helo="c", protocol="ESMTPSA", authenticated="alice@example.org",
    submission=True,
)  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    st = Store.open(str(tmp_path / "data"), node_id=b"n" * 16, options=StoreOptions(sync=False))
    with st.transaction() as t:
        t.add_domain("example.org")
        t.add_domain("example.net")
    with st.transaction() as t:
        for a in ("alice", "bob", "carol", "dave"):
            t.add_account(f"{a}@example.org", "x")
        t.add_account("full@example.org", "x", quota_bytes=1000)
    with st.transaction() as t:
        t.set_alias(
            "team@example.org", ["alice@example.org", "bob@example.org", "carol@example.org"]
        )
        t.set_alias("@example.net", ["dave@example.org"])
        t.set_alias("fwd@example.org", ["someone@remote.example"])
        t.set_alias("loop1@example.org", ["loop2@example.org"])
        t.set_alias("loop2@example.org", ["loop1@example.org"])
        t.set_alias("self@example.org", ["self@example.org", "bob@example.org"])
        t.set_alias("deep0@example.org", ["deep1@example.org"])
        for i in range(1, 15):
            t.set_alias(f"deep{i}@example.org", [f"deep{i + 1}@example.org"])
        t.set_alias("deep15@example.org", ["alice@example.org"])
    try:
        yield st
    finally:
        st.close()


def inbox(store: Store, address: str) -> bytes:
    acct = store.index.account_by_address(address)
    assert acct is not None
    return acct.mailboxes["INBOX"]


def test_accounts_aliases_catch_all_plus(store: Store) -> None:
    d = LocalDelivery(store, "mx.example.org")
    r = d.resolve(MX, "Alice@Example.ORG")
    assert isinstance(r, Recipient) and r.mailboxes == (inbox(store, "alice@example.org"),)
    r = d.resolve(MX, "team@example.org")
    assert isinstance(r, Recipient) and len(r.mailboxes) == 3
    r = d.resolve(MX, "anything@example.net")
    assert isinstance(r, Recipient) and r.mailboxes == (inbox(store, "dave@example.org"),)
    r = d.resolve(MX, "bob+lists@example.org")
    assert isinstance(r, Recipient) and r.mailboxes == (inbox(store, "bob@example.org"),)
    assert d.resolve(MX, "nobody@example.org") == Reply(550, "5.1.1", r_text(d, "nobody"))


def r_text(d: LocalDelivery, _: str) -> str:
    return "Recipient address rejected: user unknown"


def test_loops_depth_and_self_reference(store: Store) -> None:
    d = LocalDelivery(store, "mx.example.org")
    r = d.resolve(MX, "loop1@example.org")
    assert isinstance(r, Reply) and (r.code, r.enhanced) == (550, "5.4.6")
    r = d.resolve(MX, "self@example.org")  # the alias names itself: no account, so bob only
    assert isinstance(r, Recipient) and r.mailboxes == (inbox(store, "bob@example.org"),)
    r = d.resolve(MX, "deep0@example.org")  # deeper than max_alias_depth
    assert isinstance(r, Reply) and r.code == 550


def test_postmaster(store: Store) -> None:
    d = LocalDelivery(store, "mx.example.org")
    r = d.resolve(MX, "postmaster@example.net")  # the catch-all does not win over postmaster
    assert isinstance(r, Recipient) and r.mailboxes == (inbox(store, "alice@example.org"),)
    r = d.resolve(MX, "Postmaster")
    assert isinstance(r, Recipient) and r.mailboxes == (inbox(store, "alice@example.org"),)
    d2 = LocalDelivery(store, "mx.example.org", postmaster="carol@example.org")
    r = d2.resolve(MX, "postmaster@example.org")
    assert isinstance(r, Recipient) and r.mailboxes == (inbox(store, "carol@example.org"),)


@pytest.mark.parametrize(
    "address",
    [
        "user%remote.example@example.org",  # percent hack
        "remote.example!user@example.org",  # bang path
        '"user@remote.example"@example.org',  # quoted local part with @
        "alice@example.org.",  # trailing dot
    ],
)
def test_open_relay_syntax_is_refused(store: Store, address: str) -> None:
    d = LocalDelivery(store, "mx.example.org")
    for session in (MX, AUTHED):
        r = d.resolve(session, address)
        assert isinstance(r, Reply) and (r.code, r.enhanced) == (501, "5.1.3"), address


@pytest.mark.parametrize("address", ["user@remote.example", "user@[192.0.2.1]", "a@example.com"])
def test_relay_only_when_authenticated(store: Store, address: str) -> None:
    d = LocalDelivery(store, "mx.example.org")
    assert d.resolve(MX, address) == Reply(554, "5.7.1", "Relay access denied")
    r = d.resolve(AUTHED, address)
    assert isinstance(r, Recipient) and r.remote == (address,) and not r.mailboxes


def test_alias_to_remote_is_a_forward(store: Store) -> None:
    d = LocalDelivery(store, "mx.example.org")
    r = d.resolve(MX, "fwd@example.org")
    assert isinstance(r, Recipient) and r.remote == ("someone@remote.example",)


def test_sender_ownership(store: Store) -> None:
    d = LocalDelivery(store, "mx.example.org")
    assert d.check_sender(AUTHED, "alice@example.org").code == 250
    assert d.check_sender(AUTHED, "Alice+x@example.org").code == 250
    assert d.check_sender(AUTHED, "team@example.org").code == 250  # an alias of hers
    assert d.check_sender(AUTHED, "bob@example.org") == Reply(
        553, "5.7.1", "Sender address rejected: not owned by user"
    )
    assert d.check_sender(AUTHED, "").code == 553
    assert d.check_sender(MX, "bob@example.org").code == 250  # MX: no ownership rule


def envelope(
    d: LocalDelivery, session: Session, *rcpts: str, sender: str = "s@x.example"
) -> Envelope:
    rs = []
    for a in rcpts:
        r = d.resolve(session, a)
        assert isinstance(r, Recipient), (a, r)
        rs.append(r)
    return Envelope("ABCDEF0123456789", session, sender, tuple(rs))


MSG = b"From: s@x.example\nTo: team@example.org\nMessage-ID: <m1@x>\nSubject: hi\n\nbody\n"


def test_one_body_one_commit(store: Store, tmp_path: Path) -> None:
    d = LocalDelivery(store, "mx.example.org")
    blobs = len(store.index.blobs)
    lsn = store.last_lsn
    log_path = tmp_path / "mail.log"
    maillog.configure(log_path)
    try:
        env = envelope(d, MX, "team@example.org", "alice@example.org", "fwd@example.org")
        replies = asyncio.run(d.deliver(env, MSG))
    finally:
        maillog.close()
    assert [r.code for r in replies] == [250, 250, 250]
    assert store.last_lsn == lsn + 1  # one transaction
    assert len(store.index.blobs) == blobs + 2  # the local body and the queued one
    mb = store.index.mailboxes[inbox(store, "alice@example.org")]
    assert len(mb) == 1  # alice is named twice but gets one copy
    blob = store.read_blob(store.index.blobs.hash_at(mb.blobs[0]))
    for name in ("bob", "carol"):
        assert len(store.index.mailboxes[inbox(store, f"{name}@example.org")]) == 1
    (q,) = store.index.queue.values()
    assert q.recipients == ["someone@remote.example"] and q.sender == "s@x.example"
    queued = store.read_blob(q.blob)
    assert queued.startswith(b"Received: from client.example (unknown [192.0.2.7])\r\n")
    assert b"Return-Path" not in queued
    assert queued.endswith(b"\r\n\r\nbody\r\n") and b"\n" not in queued.replace(b"\r\n", b"")
    assert blob.startswith(b"Return-Path: <s@x.example>\r\nReceived: from client.example")
    assert blob.endswith(b"\r\n\r\nbody\r\n")
    meta = store.read_mime_meta(store.index.blobs.hash_at(mb.blobs[0]))
    assert meta is not None
    line = log_path.read_text()
    assert line.count("\n") == 1
    for part in ("queue_id=ABCDEF0123456789", "message_id=<m1@x>", "client=192.0.2.7",
                 "from=<s@x.example>", "nrcpt=3", "result=accepted"):  # fmt: skip
        assert part in line


def test_quota_smtp_all_or_nothing_lmtp_per_recipient(store: Store) -> None:
    d = LocalDelivery(store, "mx.example.org")
    big = b"Subject: x\r\n\r\n" + b"x" * 2000 + b"\r\n"
    env = envelope(d, MX, "full@example.org", "bob@example.org")
    replies = asyncio.run(d.deliver(env, big))
    assert [r.code for r in replies] == [452, 452]
    assert len(store.index.mailboxes[inbox(store, "bob@example.org")]) == 0
    replies = asyncio.run(d.deliver(env, big, per_recipient=True))
    assert [(r.code, r.enhanced) for r in replies] == [(452, "4.2.2"), (250, "2.0.0")]
    assert len(store.index.mailboxes[inbox(store, "bob@example.org")]) == 1
    assert d.resolve(MX, "full@example.org", size=5000) == Reply(452, "4.2.2", "Mailbox full")


class Rejecting:
    def __init__(self, action: FilterAction) -> None:
        self.action = action
        self.seen: list[Envelope] = []

    async def check(self, envelope: Envelope, message: bytes) -> FilterVerdict:
        self.seen.append(envelope)
        if self.action is FilterAction.ACCEPT:
            return FilterVerdict(add_headers=(("X-Spam", "no"),))
        return FilterVerdict(
            self.action, Reply(550, "5.7.1", "Spam") if self.action is FilterAction.REJECT else None
        )


class Broken:
    async def check(self, envelope: Envelope, message: bytes) -> FilterVerdict:
        raise RuntimeError("secret internal detail")


def test_filters(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    box = inbox(store, "bob@example.org")
    for action, code in ((FilterAction.REJECT, 550), (FilterAction.TEMPFAIL, 451)):
        d = LocalDelivery(store, "mx", filters=[Rejecting(action)])
        (r,) = asyncio.run(d.deliver(envelope(d, MX, "bob@example.org"), MSG))
        assert r.code == code
    assert len(store.index.mailboxes[box]) == 0
    with caplog.at_level(logging.ERROR):
        d = LocalDelivery(store, "mx", filters=[Broken()])
        (r,) = asyncio.run(d.deliver(envelope(d, MX, "bob@example.org"), MSG))
    assert (r.code, r.enhanced) == (451, "4.3.0") and "secret" not in r.text
    d = LocalDelivery(store, "mx", filters=[Rejecting(FilterAction.ACCEPT)])
    (r,) = asyncio.run(d.deliver(envelope(d, MX, "bob@example.org"), MSG))
    assert r.code == 250 and len(store.index.mailboxes[box]) == 1


def test_normalize_crlf() -> None:
    assert normalize_crlf(b"a\nb\r\nc\n") == b"a\r\nb\r\nc\r\n"
    assert normalize_crlf(b"a\rb") == b"a\rb"


class TermBump:
    """A durability barrier that moves the term on while the commit waits for it (as a new
    witness grant during the peer's round trip would)."""

    def __init__(self, term: list[int]) -> None:
        self.term = term

    def try_release(self, lsn: int) -> bool:
        return False  # every batch goes through wait()

    async def wait(self, lsn: int) -> None:
        self.term[0] += 1


def test_the_250_names_the_node_and_the_term_at_reply_time(store: Store) -> None:
    # Standalone: the node only; no node name configured: the bare text.
    d = LocalDelivery(store, "mx.example.org", node_name="n1")
    env = envelope(d, MX, "bob@example.org", "carol@example.org")
    replies = asyncio.run(d.deliver(env, MSG))
    assert [r.text for r in replies] == ["Ok: queued as ABCDEF0123456789 (node n1)"] * 2
    bare = asyncio.run(LocalDelivery(store, "mx").deliver(env, MSG))
    assert bare[0].to_bytes() == b"250 2.0.0 Ok: queued as ABCDEF0123456789\r\n"
    # In a cluster: the term is read once the commit (the barrier, i.e. the ack gate) returned.
    term = [7]
    d = LocalDelivery(store, "mx.example.org", node_name="n2", term=lambda: term[0])
    store.barrier = TermBump(term)
    try:
        replies = asyncio.run(d.deliver(env, MSG, per_recipient=True))
        streamed = envelope(d, MX, "alice@example.org")
        spool = d.open_spool(streamed)
        spool.write(b"Subject: big\r\n\r\n" + b"y" * 5000)
        big = asyncio.run(d.deliver(streamed, b"\r\n", spool=spool))
    finally:
        store.barrier = None
    assert [r.to_bytes() for r in replies] == [
        b"250 2.0.0 Ok: queued as ABCDEF0123456789 (node n2 term 8)\r\n"
    ] * 2
    assert big[0].text == "Ok: queued as ABCDEF0123456789 (node n2 term 9)"
    # A refusal names nothing.
    full = asyncio.run(d.deliver(envelope(d, MX, "full@example.org"), b"x" * 2000))
    assert full[0].text == "Mailbox full"
