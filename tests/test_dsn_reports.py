"""Reports other than bounces (RFC 3461/3464): the one delay warning per queue entry (virtual
time, NOTIFY=DELAY/NEVER, the null sender, durable across a restart), NOTIFY=SUCCESS for relayed
recipients (an aiosmtpd remote without DSN; a remote with DSN reports itself) and for local
deliveries (delivered / expanded), and the build_dsn texts of the three kinds."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailharbor.proto.smtp import RcptParams
from mailharbor.service.delivery import Envelope, LocalDelivery, Recipient, Session
from mailharbor.service.dsn import DsnRecipient, build_dsn
from mailharbor.service.queue import Outcome, OutcomeKind, QueueParams, QueueRunner
from mailharbor.service.queue_admin import entry_view
from mailharbor.store import Store, StoreOptions
from mailharbor.store.format import QueueResult
from mailharbor.store.index import LEGACY_WARNED_MARK
from test_queue import (
    ALICE,
    MESSAGE,
    FakeClock,
    FakeDeliverer,
    RemoteHandler,
    aio,
    enqueue,
    queue_config,
    start_remote,
    step,
)

pytestmark = pytest.mark.timeout(60)
DEFER = Outcome(OutcomeKind.DEFERRED, "4.2.0", "451 4.2.0 try later", "mx.remote.test")
OK_NO_DSN = Outcome(OutcomeKind.DELIVERED, "2.0.0", "250 2.0.0 ok", "mx.remote.test")
OK_DSN = Outcome(OutcomeKind.DELIVERED, "2.0.0", "250 2.0.0 ok", "mx.remote.test", remote_dsn=True)


def open_store(path: Path) -> Store:
    return Store.open(str(path), node_id=b"n" * 16, options=StoreOptions(sync=False))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    st = open_store(tmp_path / "data")
    with st.transaction() as t:
        t.add_domain("local.test")
    with st.transaction() as t:
        t.add_account(ALICE, "x", 0)
        t.add_account("bob@local.test", "x", 0)
        t.add_account("carol@local.test", "x", 0)
    with st.transaction() as t:
        t.set_alias("list@local.test", ["bob@local.test", "carol@local.test", "far@remote.test"])
    st.close()
    return tmp_path / "data"


@pytest.fixture
def store(data: Path) -> Iterator[Store]:
    st = open_store(data)
    try:
        yield st
    finally:
        st.close()


def reports(store: Store, address: str = ALICE) -> list[tuple[str, list[tuple[str, str]]]]:
    """(Subject, [(Action, Status) per recipient]) of every report in ``address``'s INBOX."""
    acct = store.index.account_by_address(address)
    assert acct is not None
    out = []
    for b in store.index.mailboxes[acct.mailboxes["INBOX"]].blobs:
        raw = store.read_blob(store.index.blobs.hash_at(b))
        if b"multipart/report" not in raw:
            continue
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        status = list(msg.iter_parts())[1].as_bytes().decode()
        fields: list[tuple[str, str]] = []
        action = ""
        for line in status.splitlines():
            if line.startswith("Action:"):
                action = line.split(":", 1)[1].strip()
            elif line.startswith("Status:") and action:
                fields.append((action, line.split(":", 1)[1].strip()))
                action = ""
        out.append((str(msg["Subject"]), fields))
    return out


def runner(store: Store, fake: Any, clock: FakeClock, **cfg: Any) -> QueueRunner:
    conf = {"transport": {"remote.test": "127.0.0.1:9"}, "maximal_lifetime": "120h", **cfg}
    return QueueRunner(
        store, queue_config(**conf), hostname="mail.local.test", clock=clock, deliverer=fake
    )


async def run_until(r: QueueRunner, store: Store, clock: FakeClock, seconds: float) -> None:
    """Attempt every entry whenever it is due, for ``seconds`` of virtual time."""
    end = clock.t + int(seconds * 1000)
    while clock.t < end:
        await step(r)
        due = min((q.next_ms for q in store.index.queue.values()), default=end)
        clock.t = max(clock.t + 1000, min(due, end))
    await step(r)


# --- the delay warning --------------------------------------------------------------------------


@aio
async def test_delay_warning_sent_once_and_durable(data: Path) -> None:
    clock = FakeClock()
    st = open_store(data)
    try:
        r = runner(st, FakeDeliverer(lambda _: DEFER), clock, delay_warning="1h")
        g = enqueue(st, ["bob@remote.test"])
        await run_until(r, st, clock, 3000)  # attempts at 0, 300, 900, 2100 s: < 1 h
        assert reports(st) == []
        await run_until(r, st, clock, 3000)  # the attempt at 4100 s is past 1 h
        assert reports(st) == [("Delayed Mail (still being retried)", [("delayed", "4.2.0")])]
        assert st.index.queue[g].warned
        assert st.index.queue[g].last_detail == "451 4.2.0 try later"  # the detail is untouched
        assert entry_view(st.index.queue[g])["warned"] is True
        await run_until(r, st, clock, 10_000)
        assert len(reports(st)) == 1
    finally:
        st.close()
    st = open_store(data)  # a restarted node does not warn again
    try:
        assert st.recovery is not None and st.recovery.checkpoint_lsn > 0  # `warned` from it
        assert st.index.queue[g].warned
        r = runner(st, FakeDeliverer(lambda _: DEFER), clock, delay_warning="1h")
        await run_until(r, st, clock, 10_000)
        assert len(reports(st)) == 1
        assert st.index.queue[g].attempts >= 7
    finally:
        st.close()


@aio
async def test_warning_recorded_by_an_old_log_is_not_repeated(store: Store) -> None:
    clock = FakeClock()
    g = enqueue(store, ["bob@remote.test"])
    async with store.transaction() as t:  # what the runner wrote before the WARNED flag
        detail = "451 4.2.0 try later" + LEGACY_WARNED_MARK
        t.queue_done(g, "bob@remote.test", QueueResult.DEFERRED, detail, 0)
    assert store.index.queue[g].warned
    assert store.index.queue[g].last_detail == "451 4.2.0 try later"
    r = runner(store, FakeDeliverer(lambda _: DEFER), clock, delay_warning="1h")
    clock.t += 2 * 3600 * 1000
    await run_until(r, store, clock, 3600)
    assert reports(store) == []


@aio
async def test_delay_warning_honours_notify_and_null_sender(store: Store) -> None:
    clock = FakeClock()
    r = runner(store, FakeDeliverer(lambda _: DEFER), clock, delay_warning="10m")
    notify = {
        "never@remote.test": ("NEVER",),
        "fail@remote.test": ("FAILURE",),
        "delay@remote.test": ("DELAY",),
    }
    params = QueueParams(notify=notify).encode()
    enqueue(store, [*notify, "plain@remote.test"], params=params)
    enqueue(store, ["x@remote.test"], sender="")
    await run_until(r, store, clock, 1200)
    ((subject, fields),) = reports(store)
    assert subject.startswith("Delayed Mail") and fields == [("delayed", "4.2.0")] * 2
    acct = store.index.account_by_address(ALICE)
    assert acct is not None
    inbox = store.index.mailboxes[acct.mailboxes["INBOX"]]
    (raw,) = [store.read_blob(store.index.blobs.hash_at(b)) for b in inbox.blobs]
    assert b"delay@remote.test" in raw and b"plain@remote.test" in raw
    assert b"never@remote.test" not in raw and b"fail@remote.test" not in raw
    assert b"Will-Retry-Until:" in raw and b"text/rfc822-headers" in raw


@aio
async def test_warning_off_and_expiry_bounce_without_the_mark(store: Store) -> None:
    clock = FakeClock()
    r = runner(store, FakeDeliverer(lambda _: DEFER), clock, delay_warning="0s")
    enqueue(store, ["bob@remote.test"])
    await run_until(r, store, clock, 86400)
    assert reports(store) == []
    clock2 = FakeClock()
    r = runner(
        store, FakeDeliverer(lambda _: DEFER), clock2, delay_warning="5m", maximal_lifetime="1h"
    )
    enqueue(store, ["carol@remote.test"])
    await run_until(r, store, clock2, 7200)
    got = reports(store)
    assert [s for s, _ in got] == [
        "Delayed Mail (still being retried)",
        "Undelivered Mail Returned to Sender",
    ]
    acct = store.index.account_by_address(ALICE)
    assert acct is not None
    bounce = store.read_blob(
        store.index.blobs.hash_at(store.index.mailboxes[acct.mailboxes["INBOX"]].blobs[-1])
    )
    assert b"delay warning sent" not in bounce and b"451 4.2.0 try later" in bounce


# --- NOTIFY=SUCCESS -----------------------------------------------------------------------------


@aio
async def test_relayed_report_only_when_the_remote_has_no_dsn(store: Store) -> None:
    clock = FakeClock()
    success = QueueParams(notify={"bob@remote.test": ("SUCCESS", "FAILURE")}).encode()
    await step(runner(store, FakeDeliverer(lambda _: OK_DSN), clock))
    enqueue(store, ["bob@remote.test"], params=success)
    await step(runner(store, FakeDeliverer(lambda _: OK_DSN), clock))
    assert reports(store) == []  # NOTIFY was passed on: the remote reports
    enqueue(store, ["bob@remote.test"], params=success)
    enqueue(store, ["bob@remote.test"], sender="", params=success)
    enqueue(store, ["carol@remote.test"])  # no NOTIFY: no success report
    await step(runner(store, FakeDeliverer(lambda _: OK_NO_DSN), clock))
    assert reports(store) == [("Successful Mail Delivery Report", [("relayed", "2.0.0")])]
    assert not store.index.queue


@aio
async def test_relayed_report_via_aiosmtpd_without_dsn(store: Store) -> None:
    handler = RemoteHandler()
    ctl, port = start_remote(handler)
    try:
        cfg = queue_config(transport={"remote.test": f"127.0.0.1:{port}"})
        r = QueueRunner(store, cfg, hostname="mail.local.test")
        params = QueueParams(notify={"bob@remote.test": ("SUCCESS",)}).encode()
        enqueue(store, ["bob@remote.test"], params=params)
        await step(r)
    finally:
        ctl.stop()
    assert handler.received and handler.received[0][1] == ["bob@remote.test"]
    assert reports(store) == [("Successful Mail Delivery Report", [("relayed", "2.0.0")])]


def test_local_delivery_success_reports(store: Store) -> None:
    d = LocalDelivery(store, "mx.local.test")
    mx = Session(client_ip="192.0.2.7", helo="client.example", protocol="ESMTP")
    success = RcptParams(notify=frozenset({"SUCCESS"}))

    def env(sender: str, *rcpts: str) -> Envelope:
        rs = []
        for a in rcpts:
            res = d.resolve(mx, a, params=success)
            assert isinstance(res, Recipient)
            rs.append(res)
        return Envelope("ABCDEF0123456789", mx, sender, tuple(rs))

    replies = asyncio.run(d.deliver(env(ALICE, "bob@local.test", "list@local.test"), MESSAGE))
    assert [r.code for r in replies] == [250, 250]
    assert reports(store) == [
        ("Successful Mail Delivery Report", [("delivered", "2.0.0"), ("expanded", "2.0.0")])
    ]
    # The alias's remote copy is queued without SUCCESS (reported here as "expanded").
    (q,) = store.index.queue.values()
    assert QueueParams.decode(q.params).notify == {"far@remote.test": ("NEVER",)}
    # A remote sender gets the report through the queue; the null sender gets none.
    asyncio.run(d.deliver(env("someone@remote.test", "bob@local.test"), MESSAGE))
    asyncio.run(d.deliver(env("", "bob@local.test"), MESSAGE))
    queued = [q for q in store.index.queue.values() if q.sender == ""]
    assert len(queued) == 1 and queued[0].recipients == ["someone@remote.test"]
    assert len(reports(store)) == 1


def test_build_dsn_kinds() -> None:
    def make(action: str, status: str) -> bytes:
        return build_dsn(
            reporting_mta="mail.local.test",
            original_sender=ALICE,
            recipients=[DsnRecipient("bob@remote.test", action, status, "250 ok")],
            original=MESSAGE,
            arrival_ms=1_700_000_000_000,
            now_ms=1_700_000_100_000,
            ret="FULL",
            token="t1",
            will_retry_until_ms=1_700_400_000_000,
        )

    delayed, relayed = make("delayed", "4.4.1"), make("relayed", "2.0.0")
    assert b"Subject: Delayed Mail" in delayed and b"Will-Retry-Until: " in delayed
    assert b"Subject: Successful Mail Delivery Report" in relayed
    assert b"Will-Retry-Until" not in relayed and b"Action: relayed" in relayed
    assert b"Content-Description: Message\r\n" in relayed
