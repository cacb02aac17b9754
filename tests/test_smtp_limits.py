"""server/smtp.py limits and failure paths as a client observes them, on real loopback listeners
over a real store: timeouts, the global connection limit, AUTH throttling, a bug while
answering, LMTP over TCP, PROXY v2 LOCAL and IPv6; and at-least-once outbound delivery across a
SIGKILL of a `mailharbor serve` node while the remote is answering the final ".".
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope as AioEnvelope
from aiosmtpd.smtp import Session as AioSession

from mailharbor.admin.client import AdminClient
from mailharbor.config import load_config
from mailharbor.proto.proxy import build_v2
from mailharbor.server.smtp import ListenerKind, SmtpListener, SmtpOptions, SmtpServices
from mailharbor.service.auth import FAST_TEST_PARAMS, Authenticator
from mailharbor.service.delivery import (
    Envelope,
    FilterVerdict,
    LocalDelivery,
    MessageFilter,
    Session,
)
from mailharbor.store import Store
from mailharbor.tls import server_context
from proxytls import ProxiedTls
from test_queue import enqueue, start_remote
from test_smtp_server import (
    MAILHARBOR,
    PASSWORD,
    Harness,
    msg,
    read_replies,
    tls_ctx,
)

SECRET = "secret-internal-detail-7f3a"


class LimitHarness(Harness):
    """:class:`Harness` with chosen ``SmtpOptions``, filters and AUTH-failure tuning; MX,
    SUBMISSION and LMTP all on loopback TCP."""

    def __init__(
        self,
        root: Path,
        *,
        filters: Sequence[MessageFilter] = (),
        auth: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        self.filters = filters
        self.auth_tuning = auth or {"base_delay": 0.01}
        self.option_overrides = options
        super().__init__(root)

    async def _start(self) -> None:
        def lookup(account: str) -> str | None:
            acct = self.store.index.account_by_address(account)
            return acct.password_hash if acct else None

        opts: dict[str, Any] = {
            "hostname": "mx.example.org",
            "max_message_size": 2 * 1024 * 1024,
            "max_connections_per_client": 8,
            "trusted_proxies": ("127.0.0.2",),
            "command_timeout": 20,
        }
        opts.update(self.option_overrides)
        self.services = SmtpServices(
            delivery=LocalDelivery(self.store, "mx.example.org", filters=self.filters),
            authenticator=Authenticator(lookup, params=FAST_TEST_PARAMS),
            options=SmtpOptions(**opts),
            tls=server_context(self.root / "cert.pem", self.root / "key.pem"),
        )
        for name, value in self.auth_tuning.items():
            setattr(self.services.auth_failures, name, value)
        for kind in (ListenerKind.MX, ListenerKind.SUBMISSION, ListenerKind.LMTP):
            listener = SmtpListener(kind, "127.0.0.1:0", self.services)
            await listener.start()
            self.listeners[kind] = listener


def make_harness(unique_name: str, **kw: Any) -> tuple[LimitHarness, Path]:
    root = Path(tempfile.mkdtemp(prefix=unique_name + "-"))
    try:
        return LimitHarness(root, **kw), root
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


@pytest.fixture
def harness_factory(unique_name: str) -> Iterator[Any]:
    made: list[tuple[LimitHarness, Path]] = []

    def make(**kw: Any) -> LimitHarness:
        made.append(make_harness(unique_name, **kw))
        return made[-1][0]

    try:
        yield make
    finally:
        for harness, root in made:
            try:
                harness.stop()
            finally:
                shutil.rmtree(root, ignore_errors=True)


def connect(h: Harness, kind: ListenerKind, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", h.port(kind)), 20, (source, 0))
    s.settimeout(20)
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything until EOF (the peer closed)."""
    out = b""
    while True:
        data = s.recv(65536)
        if not data:
            return out
        out += data


def plain(user: str, password: str) -> str:
    return "PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def stored_count(h: Harness) -> int:
    return h.blob_count()


# --- 1. timeouts --------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_command_timeout_after_ehlo(harness_factory: Any) -> None:
    h = harness_factory(command_timeout=0.5, data_timeout=5)
    s = connect(h, ListenerKind.MX)
    try:
        assert read_replies(s, 1)[0][:3] == b"220"
        s.sendall(b"EHLO idle.example\r\n")
        assert read_replies(s, 1)[0][:3] == b"250"
        started = time.monotonic()
        (reply,) = read_replies(s, 1)
        waited = time.monotonic() - started
        assert reply.startswith(b"421 4.4.2"), reply
        assert 0.4 <= waited < 5, waited
        assert read_all(s) == b""  # the server closed the connection
    finally:
        s.close()


@pytest.mark.timeout(30)
def test_data_timeout_mid_message_stores_nothing(harness_factory: Any) -> None:
    h = harness_factory(command_timeout=0.5, data_timeout=1.5)
    before = stored_count(h)
    s = connect(h, ListenerKind.MX)
    try:
        read_replies(s, 1)
        s.sendall(b"HELO c\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.org>\r\n")
        s.sendall(b"DATA\r\n")
        assert [r[:3] for r in read_replies(s, 4)] == [b"250", b"250", b"250", b"354"]
        body = msg("partial")
        s.sendall(body[:20])
        time.sleep(0.8)  # longer than command_timeout: inside DATA the data_timeout applies
        s.sendall(body[20:40])
        started = time.monotonic()
        (reply,) = read_replies(s, 1)
        waited = time.monotonic() - started
        assert reply.startswith(b"421 4.4.2"), reply
        assert 1.2 <= waited < 10, waited
        assert read_all(s) == b""
    finally:
        s.close()
    assert h.bodies("alice@example.org") == []
    assert stored_count(h) == before


# --- 2. global connection limit -----------------------------------------------------------------


@pytest.mark.timeout(30)
def test_global_connection_limit_over_all_listeners(harness_factory: Any) -> None:
    h = harness_factory(max_connections=3, max_connections_per_client=8)
    socks = [
        connect(h, ListenerKind.MX),
        connect(h, ListenerKind.SUBMISSION),
        connect(h, ListenerKind.LMTP),
    ]
    try:
        for s in socks:
            assert read_replies(s, 1)[0][:3] == b"220"
        for kind in (ListenerKind.MX, ListenerKind.LMTP):
            extra = connect(h, kind)
            try:
                (reply,) = read_replies(extra, 1)
                assert reply.startswith(b"421 4.7.0"), reply
                assert read_all(extra) == b""
            finally:
                extra.close()
        socks.pop(0).close()
        deadline = time.monotonic() + 10
        while True:  # the slot is released once the server has seen the close
            again = connect(h, ListenerKind.MX)
            try:
                reply = read_replies(again, 1)[0]
            finally:
                again.close()
            if reply[:3] == b"220" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert reply[:3] == b"220", reply
    finally:
        for s in socks:
            s.close()


# --- 3. AUTH throttling -------------------------------------------------------------------------


def submission_plain(h: Harness, source: str = "127.0.0.1") -> smtplib.SMTP:
    port = h.port(ListenerKind.SUBMISSION)
    s = smtplib.SMTP("127.0.0.1", port, timeout=20, source_address=(source, 0))
    s.ehlo()
    s.starttls(context=tls_ctx())
    s.ehlo()
    return s


def timed_auth(s: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes, float]:
    started = time.monotonic()
    code, text = s.docmd("AUTH", plain(user, password))
    return code, text, time.monotonic() - started


@pytest.mark.timeout(60)
def test_auth_failures_are_slowed_then_locked_out(harness_factory: Any) -> None:
    h = harness_factory(
        trusted_proxies=(),
        auth={"base_delay": 0.4, "max_delay": 5.0, "lockout_threshold": 4, "lockout": 600.0},
    )
    user = "alice@example.org"
    s = submission_plain(h)
    try:
        results = [timed_auth(s, user, "wrong") for _ in range(4)]
        assert [c for c, _, _ in results] == [535] * 4, results
        assert all(t[:5] == b"5.7.8" for _, t, _ in results)
        first, third = results[0][2], results[2][2]
        # failure n waits base_delay * 2**(n-1) before answering: 0, 0.4, 0.8, 1.6 s
        assert third >= first + 0.6, (first, third)
        assert results[3][2] >= 1.4, results[3][2]
        # locked out: the correct password is not even checked
        code, text, took = timed_auth(s, user, PASSWORD)
        assert (code, text[:5]) == (454, b"4.7.0"), (code, text)
        assert took < 1.0
        code, _ = s.mail(user)
        assert code == 530  # still not authenticated
    finally:
        s.close()
    # the lockout is per client address, not per connection
    s = submission_plain(h)
    try:
        code, text, _ = timed_auth(s, user, PASSWORD)
        assert (code, text[:5]) == (454, b"4.7.0")
    finally:
        s.close()
    # another client address is unaffected: no delay, correct password accepted
    # Linux routes all of 127.0.0.0/8 to loopback: binding 127.0.0.2 always works here.
    other = submission_plain(h, source="127.0.0.2")
    try:
        code, _, took = timed_auth(other, user, PASSWORD)
        assert code == 235
        assert took < 0.4
    finally:
        other.close()


# --- 4. a bug while answering -------------------------------------------------------------------


class RaisingFilter:
    async def check(self, envelope: Envelope, message: bytes) -> FilterVerdict:
        raise RuntimeError(SECRET)


def assert_no_leak(wire: bytes) -> None:
    assert SECRET.encode() not in wire
    assert b"Traceback" not in wire and b"RuntimeError" not in wire


@pytest.mark.timeout(30)
def test_raising_filter_gives_451_without_exception_text(harness_factory: Any) -> None:
    h = harness_factory(filters=[RaisingFilter()])
    before = stored_count(h)
    s = connect(h, ListenerKind.MX)
    try:
        read_replies(s, 1)
        s.sendall(
            b"HELO c\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
        )
        read_replies(s, 4)
        s.sendall(msg("filtered") + b".\r\n")
        (reply,) = read_replies(s, 1)
        assert reply.startswith(b"451 4.3.0"), reply
        assert_no_leak(reply)
        s.sendall(b"NOOP\r\nQUIT\r\n")  # the session goes on
        assert [r[:3] for r in read_replies(s, 2)] == [b"250", b"221"]
    finally:
        s.close()
    assert h.bodies("alice@example.org") == []
    assert stored_count(h) == before


@pytest.mark.timeout(30)
def test_bug_in_handler_gives_451_and_session_continues(
    harness_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness_factory()

    def boom(session: Session, address: str) -> Any:
        raise RuntimeError(SECRET)

    monkeypatch.setattr(h.services.delivery, "check_sender", boom)
    s = connect(h, ListenerKind.MX)
    try:
        read_replies(s, 1)
        s.sendall(b"EHLO c\r\nMAIL FROM:<a@remote.example>\r\n")
        ehlo, mail = read_replies(s, 2)
        assert ehlo[:3] == b"250"
        assert mail.startswith(b"451 4.3.0"), mail
        s.sendall(b"RCPT TO:<alice@example.org>\r\nRSET\r\nQUIT\r\n")
        rcpt, rset, quit_ = read_replies(s, 3)
        assert rcpt[:3] == b"503"  # no transaction was started
        assert (rset[:3], quit_[:3]) == (b"250", b"221")
        wire = mail + rcpt + rset + quit_ + read_all(s)
        assert_no_leak(wire)
    finally:
        s.close()


@pytest.mark.timeout(30)
def test_bug_at_end_of_lmtp_message_gives_451_per_recipient(
    harness_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness_factory()

    async def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(SECRET)

    monkeypatch.setattr(h.services.delivery, "deliver", boom)
    s = connect(h, ListenerKind.LMTP)
    try:
        read_replies(s, 1)
        s.sendall(b"LHLO c\r\nMAIL FROM:<a@remote.example>\r\n")
        s.sendall(b"RCPT TO:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        assert [r[:3] for r in read_replies(s, 5)] == [b"250"] * 4 + [b"354"]
        s.sendall(msg("lmtp-bug") + b".\r\n")
        replies = read_replies(s, 2)
        assert [r[:9] for r in replies] == [b"451 4.3.0"] * 2, replies
        assert_no_leak(b"".join(replies))
        s.sendall(b"QUIT\r\n")
        assert read_replies(s, 1)[0][:3] == b"221"
    finally:
        s.close()
    assert h.bodies("alice@example.org") == []


# --- 5. LMTP over TCP ---------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_lmtp_over_tcp_per_recipient_replies(harness_factory: Any) -> None:
    h = harness_factory()
    assert h.listeners[ListenerKind.LMTP].bound[0][0] == "127.0.0.1"
    s = connect(h, ListenerKind.LMTP)
    try:
        assert read_replies(s, 1)[0][:3] == b"220"
        s.sendall(b"LHLO client\r\nMAIL FROM:<a@remote.example>\r\n")
        assert [r[:3] for r in read_replies(s, 2)] == [b"250", b"250"]
        s.sendall(
            b"RCPT TO:<alice@example.org>\r\nRCPT TO:<nobody@example.org>\r\n"
            b"RCPT TO:<full@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
        )
        replies = read_replies(s, 5)
        assert [r[:3] for r in replies] == [b"250", b"550", b"250", b"250", b"354"]
        s.sendall(msg("lmtp-tcp", 400) + b".\r\n")
        # one reply per accepted recipient, in RCPT order: full@ is over its 100-byte quota
        replies = read_replies(s, 3)
        assert [r[:9] for r in replies] == [b"250 2.0.0", b"452 4.2.2", b"250 2.0.0"], replies
        s.sendall(b"QUIT\r\n")
        assert read_replies(s, 1)[0][:3] == b"221"
    finally:
        s.close()
    (alice,) = h.bodies("alice@example.org")
    assert alice.endswith(msg("lmtp-tcp", 400)) and b" with LMTP id " in alice
    assert len(h.bodies("bob@example.org")) == 1
    assert h.bodies("full@example.org") == []


# --- 6. PROXY v2 LOCAL and IPv6 -----------------------------------------------------------------


def deliver_raw(s: socket.socket, subject: str, helo: bytes = b"HELO p") -> bytes:
    assert read_replies(s, 1)[0][:3] == b"220"
    s.sendall(helo + b"\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.org>\r\n")
    s.sendall(b"DATA\r\n")
    assert [r[:3] for r in read_replies(s, 4)] == [b"250", b"250", b"250", b"354"]
    s.sendall(msg(subject) + b".\r\n")
    return read_replies(s, 1)[0]


def connect_from(h: Harness, kind: ListenerKind, source: str) -> socket.socket:
    """Connect from another loopback address (all of 127.0.0.0/8 is local on Linux)."""
    return connect(h, kind, source=source)


@pytest.mark.timeout(30)
def test_proxy_v2_local_command_keeps_the_proxy_address(harness_factory: Any) -> None:
    h = harness_factory()
    s = connect_from(h, ListenerKind.MX, "127.0.0.2")
    try:
        s.sendall(build_v2(None, None))
        assert deliver_raw(s, "local-cmd")[:3] == b"250"
    finally:
        s.close()
    (body,) = h.bodies("alice@example.org")
    received = body.split(b"\r\n")[1]
    assert received.startswith(b"Received: from ") and b"[127.0.0.2]" in received, received


@pytest.mark.timeout(30)
def test_proxy_v2_ipv6_source_and_per_64_limit(harness_factory: Any) -> None:
    h = harness_factory(max_connections_per_client=2)
    dest = ("2001:db8::25", 25)
    s = connect_from(h, ListenerKind.MX, "127.0.0.2")
    try:
        s.sendall(build_v2(("2001:db8:0:1::7", 40000), dest))
        assert deliver_raw(s, "ipv6-proxied")[:3] == b"250"
    finally:
        s.close()
    (body,) = h.bodies("alice@example.org")
    received = body.split(b"\r\n\r\n")[0]
    assert b"2001:db8:0:1::7" in received.lower(), received
    # IPv6 clients are counted per /64: two sources of one /64 fill its slots
    held: list[socket.socket] = []
    try:
        for src in ("2001:db8:0:2::1", "2001:db8:0:2::2"):
            c = connect(h, ListenerKind.MX, source="127.0.0.2")
            held.append(c)
            c.sendall(build_v2((src, 40000), dest))
            assert read_replies(c, 1)[0][:3] == b"220"
        same64 = connect(h, ListenerKind.MX, source="127.0.0.2")
        held.append(same64)
        same64.sendall(build_v2(("2001:db8:0:2::ffff", 40000), dest))
        assert read_replies(same64, 1)[0].startswith(b"421 4.7.0")
        other64 = connect(h, ListenerKind.MX, source="127.0.0.2")
        held.append(other64)
        other64.sendall(build_v2(("2001:db8:0:3::1", 40000), dest))
        assert read_replies(other64, 1)[0][:3] == b"220"
    finally:
        for c in held:
            c.close()


# --- 7. at-least-once outbound across SIGKILL ---------------------------------------------------


class SlowRemote:
    """aiosmtpd handler: records every message at DATA; the first DATA is answered only when
    ``release`` is set (the node is killed meanwhile)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []
        self.first_data = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()

    async def handle_DATA(self, server: AioSMTP, session: AioSession, envelope: AioEnvelope) -> str:
        with self.lock:
            self.received.append(
                (
                    envelope.mail_from or "",
                    list(envelope.rcpt_tos),
                    envelope.original_content or b"",
                )
            )
            first = len(self.received) == 1
        if first:
            self.first_data.set()
            deadline = time.monotonic() + 60
            while not self.release.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        return "250 2.0.0 queued as X"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MAILHARBOR), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _serve(cfg_path: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(MAILHARBOR), "serve", "--config", str(cfg_path)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc


def _wait_ready(proc: subprocess.Popen[bytes], client: AdminClient) -> None:
    deadline = time.monotonic() + 30
    while not client.answers():
        assert proc.poll() is None, "node exited"
        assert time.monotonic() < deadline, "node did not answer"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_outbound_at_least_once_across_sigkill(unique_name: str) -> None:
    base = Path(tempfile.mkdtemp(prefix=unique_name + "-"))
    handler = SlowRemote()
    ctl, port = start_remote(handler)  # type: ignore[arg-type]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        root = base / "node"
        r = _run("init", str(root), "--hostname", "mail.example.org", "--name", "mx1")
        assert r.returncode == 0, r.stderr
        cfg_path = root / "mailharbor.toml"
        text = cfg_path.read_text()
        assert text.count("\n[queue]\n") == 1
        cfg_path.write_text(
            text.replace(
                "\n[queue]\n", f'\n[queue]\ntransport = {{ "remote.test" = "127.0.0.1:{port}" }}\n'
            )
        )
        config = load_config(cfg_path)
        st = Store.open(str(config.node.data_dir), node_id=config.node.node_id)
        try:
            gid = enqueue(st, ["bob@remote.test"], sender="x@elsewhere.test")
        finally:
            st.close()
        client = AdminClient(config.admin.socket, timeout=5)
        log = root / "serve.log"

        procs.append(_serve(cfg_path, log))
        _wait_ready(procs[-1], client)
        assert handler.first_data.wait(30), "the node made no delivery attempt"
        procs[-1].send_signal(signal.SIGKILL)  # the remote has the message, no 250 yet
        assert procs[-1].wait(10) == -signal.SIGKILL

        st = Store.open(str(config.node.data_dir), node_id=config.node.node_id)
        try:
            entry = st.index.queue[gid]
            assert entry.in_flight == ["bob@remote.test"]
        finally:
            st.close()

        procs.append(_serve(cfg_path, log))
        _wait_ready(procs[-1], client)
        deadline = time.monotonic() + 30
        while True:
            r = _run("queue", "list", "--json", "--config", str(cfg_path))
            assert r.returncode == 0, r.stderr
            if json.loads(r.stdout) == [] and len(handler.received) >= 2:
                break
            assert time.monotonic() < deadline, (r.stdout, len(handler.received), log.read_text())
            time.sleep(0.1)
        procs[-1].send_signal(signal.SIGTERM)
        assert procs[-1].wait(30) == 0
        st = Store.open(str(config.node.data_dir), node_id=config.node.node_id)
        try:
            assert not st.index.queue
        finally:
            st.close()
        assert len(handler.received) >= 2  # at least once; here twice (the first was unacked)
        for sender, rcpts, content in handler.received:
            assert sender == "x@elsewhere.test" and rcpts == ["bob@remote.test"]
            assert b"Subject: hi" in content
    finally:
        handler.release.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        ctl.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(30)
def test_implicit_tls_behind_a_proxy_header_in_the_same_segment(harness_factory: Any) -> None:
    """Submissions (465): PROXY header and ClientHello in one write; the handshake completes
    and the 220 follows, under TLS."""
    h = harness_factory()

    async def start() -> SmtpListener:
        listener = SmtpListener(ListenerKind.SUBMISSIONS, "127.0.0.1:0", h.services)
        await listener.start()
        h.listeners[ListenerKind.SUBMISSIONS] = listener  # stopped with the others
        return listener

    port = h.run(start()).bound[0][1]
    c = ProxiedTls(port, build_v2(("192.0.2.7", 40000), ("127.0.0.1", port)))
    try:
        assert c.line().startswith(b"220 ")
        c.send(b"EHLO client.example\r\n")
        assert c.line().startswith(b"250")
    finally:
        c.close()
