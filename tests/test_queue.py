"""The outbound queue: backoff and expiry in virtual time, MX resolution against a loopback DNS
server, end-to-end delivery to an aiosmtpd "remote MX" on loopback, bounces, restart, CLI."""

from __future__ import annotations

import asyncio
import email
import email.policy
import functools
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope, Session

sys.path.insert(0, str(Path(__file__).parent))
from dnsserver import LoopbackDns
from mailharbor.admin.client import AdminClient
from mailharbor.config import QueueConfig, load_config, parse_config_data
from mailharbor.service.mx import RouteError, Router
from mailharbor.service.queue import (
    Outcome,
    OutcomeKind,
    QueueParams,
    QueueRunner,
    backoff_ms,
)
from mailharbor.store import Store, StoreOptions
from mailharbor.store.index import QueueEntry

pytestmark = pytest.mark.timeout(60)

MESSAGE = b"From: alice@local.test\r\nTo: bob@remote.test\r\nSubject: hi\r\n\r\nhello\r\n.x\r\n"
ALICE = "alice@local.test"


def aio(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test function in a fresh event loop (no pytest-asyncio here)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


class FakeClock:
    def __init__(self) -> None:
        self.t = int(time.time() * 1000)

    def now_ms(self) -> int:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += int(seconds * 1000)


def queue_config(**queue: Any) -> QueueConfig:
    data = {
        "node": {"name": "mx1", "node_id": uuid.uuid4().hex, "hostname": "mail.local.test"},
        "queue": queue,
    }
    return parse_config_data(data, path=Path("/nonexistent/mailharbor.toml")).queue


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    st = Store.open(str(tmp_path / "data"), node_id=b"n" * 16, options=StoreOptions(sync=False))
    with st.transaction() as t:
        t.add_domain("local.test")
    with st.transaction() as t:
        t.add_account(ALICE, "x", 0)
    try:
        yield st
    finally:
        st.close()


def enqueue(
    store: Store, recipients: Sequence[str], sender: str = ALICE, params: str = ""
) -> bytes:
    with store.transaction() as t:
        blob = t.put_blob(MESSAGE)
        return t.queue_add(blob, sender, list(recipients), params)


def inbox_messages(store: Store) -> list[bytes]:
    """Bodies in alice's INBOX (via the blob table: every non-queue blob with refs)."""
    queue_blobs = {q.blob for q in store.index.queue.values()}
    b = store.index.blobs
    out = []
    for s in range(len(b)):
        h = b.hash_at(s)
        if b.refs[s] > 0 and h not in queue_blobs and b.has_data(s):
            data = store.read_blob(h)
            if b"multipart/report" in data:
                out.append(data)
    return out


def dsn_status(raw: bytes) -> tuple[str, str]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert isinstance(msg, EmailMessage)
    parts = list(msg.iter_parts())
    assert parts[1].get_content_type() == "message/delivery-status"
    text = parts[1].as_bytes().decode()
    status = next(
        ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Status")
    )
    action = next(
        ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Action")
    )
    return action, status


class FakeDeliverer:
    """Answers every recipient with ``outcome(rcpt)``; counts calls."""

    def __init__(self, outcome: Callable[[str], Outcome]) -> None:
        self.outcome = outcome
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    async def deliver(
        self,
        route: Any,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        params: QueueParams,
        lease_ok: Callable[[], bool],
    ) -> dict[str, Outcome]:
        self.calls.append((sender, tuple(recipients)))
        return {r: self.outcome(r) for r in recipients}


async def step(runner: QueueRunner) -> None:
    runner.run_due()
    await runner.idle()


# --- backoff and expiry in virtual time ---------------------------------------------------------


def test_backoff_schedule_doubles_and_caps() -> None:
    got = [backoff_ms(n, 300_000, 4_000_000) for n in range(1, 8)]
    assert got == [300_000, 600_000, 1_200_000, 2_400_000, 4_000_000, 4_000_000, 4_000_000]
    assert backoff_ms(1000, 300_000, 4_000_000) == 4_000_000


@aio
async def test_deferred_retried_on_schedule_then_expired(store: Store) -> None:
    clock = FakeClock()
    defer = Outcome(OutcomeKind.DEFERRED, "4.2.0", "451 4.2.0 try later", "mx.remote.test")
    fake = FakeDeliverer(lambda r: defer)
    cfg = queue_config(transport={"remote.test": "127.0.0.1:9"}, maximal_lifetime="1h")
    runner = QueueRunner(store, cfg, hostname="mail.local.test", clock=clock, deliverer=fake)
    g = enqueue(store, ["bob@remote.test"])
    expected_delays = [300, 600, 1200]
    await step(runner)
    for i, delay in enumerate(expected_delays):
        q = store.index.queue[g]
        assert q.attempts == i + 1 and not q.in_flight
        assert q.next_ms == clock.t + delay * 1000
        assert q.last_detail == "451 4.2.0 try later"
        clock.advance(delay - 1)
        await step(runner)
        assert len(fake.calls) == i + 1, "not retried before its time"
        clock.advance(1)
        await step(runner)
        assert len(fake.calls) == i + 2
    # 300 + 600 + 1200 + 2400 s > 1 h: at the next due time the entry expires without an attempt.
    clock.advance(2400)
    await step(runner)
    assert len(fake.calls) == 4
    assert g not in store.index.queue
    bounces = inbox_messages(store)
    assert len(bounces) == 1
    action, status = dsn_status(bounces[0])
    assert action == "failed" and status.startswith("5.")


@aio
async def test_lease_lost_means_no_attempt(store: Store) -> None:
    fake = FakeDeliverer(lambda r: Outcome(OutcomeKind.DELIVERED, "2.0.0", "250 ok"))
    lease = [False]
    runner = QueueRunner(
        store,
        queue_config(transport={"remote.test": "127.0.0.1:9"}),
        hostname="mail.local.test",
        deliverer=fake,
        lease_ok=lambda: lease[0],
    )
    g = enqueue(store, ["bob@remote.test"])
    await step(runner)
    assert not fake.calls and store.index.queue[g].attempts == 0
    lease[0] = True
    await step(runner)
    assert fake.calls and g not in store.index.queue


@aio
async def test_notify_never_and_null_sender_get_no_bounce(store: Store) -> None:
    bounce = Outcome(OutcomeKind.BOUNCED, "5.1.1", "550 5.1.1 no such user", "mx.remote.test")
    fake = FakeDeliverer(lambda r: bounce)
    runner = QueueRunner(
        store,
        queue_config(transport={"remote.test": "127.0.0.1:9"}),
        hostname="mail.local.test",
        deliverer=fake,
    )
    params = QueueParams(notify={"bob@remote.test": ("NEVER",)}).encode()
    enqueue(store, ["bob@remote.test"], params=params)
    enqueue(store, ["carol@remote.test"], sender="")
    await step(runner)
    assert len(fake.calls) == 2
    assert not store.index.queue
    assert inbox_messages(store) == []


# --- MX resolution against the loopback DNS server ----------------------------------------------


@pytest.fixture
def dns() -> Iterator[LoopbackDns]:
    server = LoopbackDns().start()
    try:
        yield server
    finally:
        server.stop()


def router(dns: LoopbackDns, **kw: Any) -> Router:
    return Router(nameservers=["127.0.0.1"], dns_port=dns.port, dns_timeout=2, **kw)


@aio
async def test_mx_by_preference_random_among_equals(dns: LoopbackDns) -> None:
    dns.add("remote.test", "MX", "20 backup.remote.test")
    for i in range(1, 4):
        dns.add("remote.test", "MX", f"10 mx{i}.remote.test")
        dns.add(f"mx{i}.remote.test", "A", f"127.0.0.{i}")
    dns.add("backup.remote.test", "A", "127.0.0.9")
    dns.add("backup.remote.test", "AAAA", "::1")
    firsts = set()
    for _ in range(12):
        route = await router(dns).route("remote.test")
        hosts = [h.host for h in route.hops]
        assert sorted(hosts[:3]) == ["mx1.remote.test", "mx2.remote.test", "mx3.remote.test"]
        assert hosts[3:] == ["backup.remote.test", "backup.remote.test"]
        assert [h.address for h in route.hops[3:]] == ["127.0.0.9", "::1"]
        firsts.add(hosts[0])
    assert len(firsts) > 1, "equal preferences are shuffled"


@aio
async def test_a_fallback_null_mx_nxdomain_servfail(dns: LoopbackDns) -> None:
    dns.add("nomx.test", "A", "127.0.0.5")
    dns.add("null.test", "MX", "0 .")
    dns.add("broken.test", "A", "127.0.0.6")
    dns.servfail.add("broken.test")
    r = router(dns, mx_port=2525)
    route = await r.route("nomx.test")
    assert [(h.host, h.address, h.port) for h in route.hops] == [("nomx.test", "127.0.0.5", 2525)]
    for domain, permanent, status in (
        ("null.test", True, "5.1.10"),
        ("missing.test", True, "5.1.2"),
        ("broken.test", False, "4.4.3"),
    ):
        with pytest.raises(RouteError) as ei:
            await r.route(domain)
        assert (ei.value.permanent, ei.value.status) == (permanent, status), domain


@aio
async def test_timeout_is_temporary() -> None:
    # A UDP port where nothing answers: the lookup times out.
    r = Router(nameservers=["127.0.0.1"], dns_port=9, dns_timeout=0.3)
    with pytest.raises(RouteError) as ei:
        await r.route("remote.test")
    assert not ei.value.permanent


@aio
async def test_transport_map_and_relayhost_bypass_dns() -> None:
    r = Router(
        transport={"a.test": "10.1.1.1:2525"}, relayhost="[::1]:587", nameservers=["0.0.0.0"]
    )
    assert [(h.address, h.port) for h in (await r.route("A.test")).hops] == [("10.1.1.1", 2525)]
    route = await r.route("b.test")
    assert route.relay and [(h.address, h.port) for h in route.hops] == [("::1", 587)]


# --- end to end: aiosmtpd as the remote MX ------------------------------------------------------


class RemoteHandler:
    """Accepts everything except: rcpt local part 'reject' → 550, 'later' → 451."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []
        self.later_calls = 0

    async def handle_RCPT(
        self, server: AioSMTP, session: Session, envelope: Envelope, address: str, opts: list[str]
    ) -> str:
        local = address.split("@")[0]
        if local == "reject":
            return "550 5.1.1 no such user here"
        if local == "later":
            self.later_calls += 1
            return "451 4.2.0 mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: AioSMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        self.received.append((envelope.mail_from or "", list(envelope.rcpt_tos), content))
        return "250 2.0.0 queued as X"


def start_remote(handler: RemoteHandler) -> tuple[Controller, int]:
    """aiosmtpd on a free loopback port (its controller cannot use port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctl = Controller(handler, hostname="127.0.0.1", port=port)
    ctl.start()
    return ctl, port


@pytest.fixture
def remote() -> Iterator[tuple[RemoteHandler, int]]:
    handler = RemoteHandler()
    ctl, port = start_remote(handler)
    try:
        yield handler, port
    finally:
        ctl.stop()


@aio
async def test_end_to_end_via_mx(store: Store, dns: LoopbackDns, remote: Any) -> None:
    handler, port = remote
    dns.add("remote.test", "MX", "10 mx.remote.test")
    dns.add("mx.remote.test", "A", "127.0.0.1")
    cfg = queue_config(resolver=f"127.0.0.1:{dns.port}", mx_port=port, dns_timeout="2s")
    clock = FakeClock()
    runner = QueueRunner(store, cfg, hostname="mail.local.test", clock=clock)
    g_ok = enqueue(store, ["bob@remote.test", "carol@remote.test"])
    g_bad = enqueue(store, ["reject@remote.test"])
    g_later = enqueue(store, ["later@remote.test"])
    g_null = enqueue(store, ["reject@remote.test"], sender="")
    await step(runner)
    assert g_ok not in store.index.queue
    assert handler.received[0][1] == ["bob@remote.test", "carol@remote.test"]
    assert handler.received[0][0] == ALICE
    assert b"\r\n.x\r\n" in handler.received[0][2]  # dot-stuffing undone by the server
    assert g_bad not in store.index.queue and g_null not in store.index.queue
    bounces = inbox_messages(store)
    assert len(bounces) == 1, "one bounce for alice, none for the null sender"
    action, status = dsn_status(bounces[0])
    assert (action, status) == ("failed", "5.1.1")
    assert b"Remote-MTA: dns; mx.remote.test" in bounces[0]
    q = store.index.queue[g_later]
    assert q.attempts == 1 and q.next_ms == clock.t + 300_000
    assert q.last_detail.startswith("451 4.2.0")
    clock.advance(300)
    await step(runner)
    assert handler.later_calls == 2


@aio
async def test_end_to_end_via_transport_map_and_restart(tmp_path: Path, remote: Any) -> None:
    handler, port = remote
    cfg = queue_config(transport={"remote.test": f"127.0.0.1:{port}"})
    data = str(tmp_path / "data")
    st = Store.open(data, node_id=b"n" * 16, options=StoreOptions(sync=False))
    g1 = enqueue(st, ["bob@remote.test"], sender="someone@elsewhere.test")
    g2 = enqueue(st, ["dave@remote.test"], sender="x@elsewhere.test")
    # A previous process logged the attempt for g2 and died before recording the outcome.
    with st.transaction() as t:
        t.queue_attempt(g2, 1, ["dave@remote.test"])
    st.close()
    st = Store.open(data, node_id=b"n" * 16, options=StoreOptions(sync=False))
    try:
        assert {g1, g2} <= set(st.index.queue)
        assert st.index.queue[g2].in_flight == ["dave@remote.test"]
        runner = QueueRunner(st, cfg, hostname="mail.local.test")
        runner.start()
        try:
            for _ in range(200):
                if not st.index.queue:
                    break
                await asyncio.sleep(0.05)
        finally:
            await runner.stop()
        assert not st.index.queue
        rcpts = [r for _, rs, _ in handler.received for r in rs]
        assert rcpts.count("dave@remote.test") >= 1 and rcpts.count("bob@remote.test") >= 1
    finally:
        st.close()


@aio
async def test_remote_bounce_of_remote_sender_is_queued(store: Store, remote: Any) -> None:
    handler, port = remote
    cfg = queue_config(transport={"remote.test": f"127.0.0.1:{port}"})
    runner = QueueRunner(store, cfg, hostname="mail.local.test")
    g = enqueue(store, ["reject@remote.test"], sender="sender@remote.test")
    await step(runner)
    assert g not in store.index.queue
    (bounce,) = store.index.queue.values()
    assert bounce.sender == "" and bounce.recipients == ["sender@remote.test"]
    await step(runner)  # the bounce itself is delivered to the remote sender
    assert not store.index.queue
    assert handler.received[-1][0] in ("", "<>") and b"multipart/report" in handler.received[-1][2]


@aio
async def test_lease_lost_before_final_dot_defers(store: Store, remote: Any) -> None:
    handler, port = remote
    cfg = queue_config(transport={"remote.test": f"127.0.0.1:{port}"})
    calls = [0]

    def lease() -> bool:
        calls[0] += 1
        # Asked when scanning, before the attempt, before the "." (lost there).
        return calls[0] < 3

    runner = QueueRunner(store, cfg, hostname="mail.local.test", lease_ok=lease)
    g = enqueue(store, ["bob@remote.test"])
    await step(runner)
    assert handler.received == []
    q = store.index.queue[g]
    assert q.attempts == 1 and not q.in_flight and "lease" in q.last_detail


# --- CLI with a running node --------------------------------------------------------------------

MAILHARBOR = Path(sys.executable).parent / "mailharbor"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MAILHARBOR), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.timeout(120)
def test_queue_cli_with_a_running_node(unique_name: str) -> None:
    base = Path(tempfile.mkdtemp(prefix=unique_name + "-"))
    proc: subprocess.Popen[bytes] | None = None
    handler = RemoteHandler()
    ctl, port = start_remote(handler)
    try:
        root = base / "node"
        r = _run("init", str(root), "--hostname", "mail.example.org", "--name", "mx1")
        assert r.returncode == 0, r.stderr
        cfg_path = root / "mailharbor.toml"
        text = cfg_path.read_text()
        assert "\n[queue]\n" in text
        cfg_path.write_text(
            text.replace(
                "\n[queue]\n", f'\n[queue]\ntransport = {{ "remote.test" = "127.0.0.1:{port}" }}\n'
            )
        )
        config = load_config(cfg_path)
        st = Store.open(str(config.node.data_dir), node_id=config.node.node_id)
        g = enqueue(st, ["later@remote.test"], sender="x@elsewhere.test")
        st.close()
        gid = g.hex()
        log = open(root / "serve.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [str(MAILHARBOR), "serve", "--config", str(cfg_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        client = AdminClient(config.admin.socket, timeout=5)
        deadline = time.monotonic() + 30
        while not client.answers():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)

        def entries() -> list[dict[str, Any]]:
            r = _run("queue", "list", "--json", "--config", str(cfg_path))
            assert r.returncode == 0, r.stderr
            out: list[dict[str, Any]] = json.loads(r.stdout)
            return out

        def wait_attempts(n: int) -> None:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                es = entries()
                if es and es[0]["attempts"] >= n and not es[0]["in_flight"]:
                    return
                time.sleep(0.1)
            pytest.fail(f"no attempt {n}: {entries()}")

        wait_attempts(1)
        (e,) = entries()
        assert e["id"] == gid and e["recipients"] == ["later@remote.test"]
        assert e["next_ms"] > time.time() * 1000 + 200_000  # deferred for ~300 s
        r = _run("queue", "list", "--config", str(cfg_path))
        assert r.returncode == 0 and gid in r.stdout and "1 entry" in r.stdout
        r = _run("queue", "show", gid[:8], "--config", str(cfg_path))
        assert r.returncode == 0 and "later@remote.test" in r.stdout
        r = _run("queue", "retry", gid[:10], "--config", str(cfg_path))
        assert r.returncode == 0, r.stderr
        wait_attempts(2)
        r = _run("queue", "flush", "--config", str(cfg_path))
        assert r.returncode == 0 and "1 of 1" in r.stdout, r.stdout
        wait_attempts(3)
        r = _run("queue", "delete", gid, "--config", str(cfg_path))
        assert r.returncode == 0, r.stderr
        assert entries() == []
        r = _run("queue", "show", gid, "--config", str(cfg_path))
        assert r.returncode == 1 and "no queue entry" in r.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert handler.later_calls >= 3
        log.close()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        ctl.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_queue_entry_type_is_what_the_runner_reads() -> None:
    q = QueueEntry(b"g" * 16, b"h" * 32, 0, ALICE, ["b@c.test"], "")
    assert q.in_flight == [] and q.next_ms == 0
