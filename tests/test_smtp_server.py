"""server/smtp.py on real loopback sockets with real clients (smtplib, swaks, a raw socket) over
a real store; and `mailharbor serve` killed with SIGKILL around the 250."""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mailharbor.proto.proxy import build_v2
from mailharbor.server.smtp import (
    ListenerKind,
    SmtpListener,
    SmtpOptions,
    SmtpServices,
)
from mailharbor.service.auth import FAST_TEST_PARAMS, Authenticator, hash_password
from mailharbor.service.delivery import LocalDelivery
from mailharbor.store import Store, StoreOptions
from mailharbor.tls import server_context, write_self_signed

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")
PASSWORD = "correct horse"
MAILHARBOR = Path(sys.executable).parent / "mailharbor"


class Harness:
    """A store and the four listeners on a private event loop in a thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        write_self_signed(root / "cert.pem", root / "key.pem", "mx.example.org")
        self.listeners: dict[ListenerKind, SmtpListener] = {}
        self.store: Store = self.call(self._open)
        self.run(self._start())

    def call(self, fn: Callable[[], T]) -> T:
        async def go() -> T:
            return fn()

        return self.run(go())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _open(self) -> Store:
        st = Store.open(
            str(self.root / "data"),
            node_id=b"n" * 16,
            options=StoreOptions(sync=False, chunk_bytes=4096),
        )
        h = hash_password(PASSWORD, params=FAST_TEST_PARAMS)
        with st.transaction() as t:
            t.add_domain("example.org")
            t.add_domain("example.net")
        with st.transaction() as t:
            for a in ("alice", "bob", "carol", "dave"):
                t.add_account(f"{a}@example.org", h)
            t.add_account("full@example.org", h, quota_bytes=100)
        with st.transaction() as t:
            t.set_alias("team@example.org", [f"{a}@example.org" for a in ("alice", "bob", "carol")])
            t.set_alias("@example.net", ["dave@example.org"])
        return st

    async def _start(self) -> None:
        def lookup(account: str) -> str | None:
            acct = self.store.index.account_by_address(account)
            return acct.password_hash if acct else None

        self.services = SmtpServices(
            delivery=LocalDelivery(self.store, "mx.example.org"),
            authenticator=Authenticator(lookup, params=FAST_TEST_PARAMS),
            options=SmtpOptions(
                hostname="mx.example.org",
                max_message_size=2 * 1024 * 1024,
                max_connections_per_client=8,
                trusted_proxies=("127.0.0.2",),
                command_timeout=20,
            ),
            tls=server_context(self.root / "cert.pem", self.root / "key.pem"),
        )
        self.services.auth_failures.base_delay = 0.01
        for kind in ListenerKind:
            ep = str(self.root / "lmtp.sock") if kind is ListenerKind.LMTP else "127.0.0.1:0"
            listener = SmtpListener(kind, ep, self.services)
            await listener.start()
            self.listeners[kind] = listener

    def port(self, kind: ListenerKind) -> int:
        return self.listeners[kind].bound[0][1]

    def stop(self) -> None:
        async def go() -> None:
            for x in self.listeners.values():
                await x.stop(grace=5)
            self.services.authenticator.close()
            self.store.close()

        try:
            self.run(go())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    def bodies(self, address: str) -> list[bytes]:
        def get() -> list[bytes]:
            acct = self.store.index.account_by_address(address)
            assert acct is not None
            mb = self.store.index.mailboxes[acct.mailboxes["INBOX"]]
            return [self.store.read_blob(self.store.index.blobs.hash_at(b)) for b in mb.blobs]

        return self.call(get)

    def blob_count(self) -> int:
        return self.call(lambda: len(self.store.index.blobs))


@pytest.fixture
def h(unique_name: str) -> Iterator[Harness]:
    root = Path(tempfile.mkdtemp(prefix=unique_name + "-"))
    harness = Harness(root)
    try:
        yield harness
    finally:
        harness.stop()
        shutil.rmtree(root, ignore_errors=True)


def msg(subject: str, size: int = 0) -> bytes:
    body = (b"x" * 70 + b"\r\n") * (size // 72 + 1) if size else b"hello\r\n"
    return (
        f"From: sender@remote.example\r\nTo: someone\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject}@test>\r\n\r\n"
    ).encode() + body


def mx(h: Harness) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", h.port(ListenerKind.MX), timeout=20)


def tls_ctx() -> ssl.SSLContext:
    return ssl._create_unverified_context()


def submission(h: Harness, user: str = "alice@example.org") -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", h.port(ListenerKind.SUBMISSION), timeout=20)
    s.starttls(context=tls_ctx())
    s.login(user, PASSWORD)
    return s


def test_local_alias_catch_all_plus(h: Harness) -> None:
    with mx(h) as s:
        s.sendmail("sender@remote.example", ["alice@example.org"], msg("one"))
        blobs = h.blob_count()
        s.sendmail("sender@remote.example", ["team@example.org"], msg("fanout"))
        assert h.blob_count() == blobs + 1  # stored once for three accounts
        s.sendmail("sender@remote.example", ["whatever@example.net"], msg("catchall"))
        s.sendmail("sender@remote.example", ["bob+tag@example.org"], msg("plus"))
    alice = h.bodies("alice@example.org")
    assert len(alice) == 2
    first = alice[0]
    assert first.startswith(b"Return-Path: <sender@remote.example>\r\nReceived: from ")
    assert b"by mx.example.org with ESMTP id " in first and b"for <" not in first
    assert first.endswith(msg("one"))
    assert [b.endswith(msg("fanout")) for b in h.bodies("carol@example.org")] == [True]
    assert h.bodies("dave@example.org")[0].endswith(msg("catchall"))
    assert [b.endswith(msg("plus")) for b in h.bodies("bob@example.org")] == [False, True]


def test_unknown_and_over_quota_at_rcpt(h: Harness) -> None:
    with mx(h) as s:
        s.ehlo()
        s.mail("sender@remote.example")
        assert s.rcpt("nobody@example.org")[0] == 550
        assert s.rcpt("alice@example.org")[0] == 250
        s.rset()
        s.mail("sender@remote.example", ["SIZE=5000"])
        code, text = s.rcpt("full@example.org")
        assert (code, text[:5]) == (452, b"4.2.2")
        assert s.rcpt("user@remote.example")[0] == 554  # unauthenticated relay


@pytest.mark.parametrize(
    "rcpt",
    [
        "user%remote.example@example.org",
        "remote.example!user@example.org",
        '"user@remote.example"@example.org',
        "alice@example.org.",
        "user@[127.0.0.1]",
        "@example.org:user@remote.example",
        "user@remote.example",
    ],
)
def test_open_relay_regressions(h: Harness, rcpt: str) -> None:
    with mx(h) as s:
        s.ehlo()
        s.mail("sender@remote.example")
        s.putcmd(f"RCPT TO:<{rcpt}>")
        code, _ = s.getreply()
        assert code in (501, 553, 554), (rcpt, code)
    assert h.call(lambda: len(h.store.index.queue)) == 0


def test_submission_auth_relay_and_ownership(h: Harness) -> None:
    s = smtplib.SMTP("127.0.0.1", h.port(ListenerKind.SUBMISSION), timeout=20)
    s.ehlo()
    assert "auth" not in s.esmtp_features
    code, _ = s.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUub3JnAHNlY3JldA==")
    assert code == 530  # AUTH before STARTTLS
    s.starttls(context=tls_ctx())
    with pytest.raises(smtplib.SMTPAuthenticationError):
        s.login("alice@example.org", "wrong")
    code, _ = s.mail("alice@example.org")
    assert code == 530  # a failed AUTH leaves the session unauthenticated
    s.login("alice@example.org", PASSWORD)
    code, _ = s.mail("bob@example.org")
    assert code == 553
    s.rset()
    s.sendmail("alice@example.org", ["friend@remote.example", "bob@example.org"], msg("out"))
    s.quit()
    queue = h.call(lambda: [(q.sender, q.recipients) for q in h.store.index.queue.values()])
    assert queue == [("alice@example.org", ["friend@remote.example"])]
    (body,) = h.bodies("bob@example.org")
    assert b" with ESMTPSA id " in body


def test_implicit_tls_465(h: Harness) -> None:
    port = h.port(ListenerKind.SUBMISSIONS)
    with smtplib.SMTP_SSL("127.0.0.1", port, timeout=20, context=tls_ctx()) as s:
        s.login("carol@example.org", PASSWORD)
        s.sendmail("carol@example.org", ["alice@example.org"], msg("implicit"))
    assert h.bodies("alice@example.org")[0].endswith(msg("implicit"))


def raw(h: Harness, kind: ListenerKind, source: str = "127.0.0.1") -> socket.socket:
    if kind is ListenerKind.LMTP:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(h.root / "lmtp.sock"))
    else:
        s = socket.create_connection(("127.0.0.1", h.port(kind)), 20, (source, 0))
    s.settimeout(20)
    return s


_pending: dict[int, bytes] = {}


def read_replies(s: socket.socket, n: int) -> list[bytes]:
    """The next ``n`` final reply lines (continuation lines skipped); fewer at EOF."""
    buf = _pending.get(id(s), b"")
    out: list[bytes] = []
    while len(out) < n:
        line, sep, rest = buf.partition(b"\r\n")
        if sep:
            buf = rest
            if line[3:4] != b"-":
                out.append(line)
            continue
        data = s.recv(65536)
        if not data:
            break
        buf += data
    _pending[id(s)] = buf
    return out


def test_lmtp_per_recipient(h: Harness) -> None:
    s = raw(h, ListenerKind.LMTP)
    read_replies(s, 1)
    s.sendall(b"LHLO client\r\nMAIL FROM:<a@remote.example>\r\n")
    read_replies(s, 2)
    s.sendall(b"RCPT TO:<alice@example.org>\r\nRCPT TO:<nobody@example.org>\r\n")
    s.sendall(b"RCPT TO:<bob@example.org>\r\nDATA\r\n")
    replies = read_replies(s, 4)
    assert [r[:3] for r in replies] == [b"250", b"550", b"250", b"354"]
    s.sendall(msg("lmtp") + b".\r\n")
    replies = read_replies(s, 2)
    assert [r[:3] for r in replies] == [b"250", b"250"]
    s.close()
    assert h.bodies("alice@example.org")[0].endswith(msg("lmtp"))
    assert b" with LMTP id " in h.bodies("bob@example.org")[0]


def test_pipelining_and_bdat_raw(h: Harness) -> None:
    s = raw(h, ListenerKind.MX)
    read_replies(s, 1)
    body = msg("bdat")
    half = len(body) // 2
    s.sendall(
        b"EHLO raw\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.org>\r\n"
        + f"BDAT {half}\r\n".encode()
        + body[:half]
        + f"BDAT {len(body) - half} LAST\r\n".encode()
        + body[half:]
        + b"MAIL FROM:<b@remote.example>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
    )
    replies = read_replies(s, 8)
    assert [r[:3] for r in replies] == [b"250"] * 7 + [b"354"]
    s.sendall(msg("pipelined") + b".\r\nQUIT\r\n")
    replies = read_replies(s, 2)
    assert [r[:3] for r in replies] == [b"250", b"221"]
    s.close()
    assert h.bodies("alice@example.org")[0].endswith(body)
    assert h.bodies("bob@example.org")[0].endswith(msg("pipelined"))


def test_swaks_pipeline(h: Harness) -> None:
    # make test installs swaks (tools/apt-packages.txt): its absence is a setup failure.
    assert shutil.which("swaks") is not None, "swaks is not installed (run make test / make apt)"
    result = subprocess.run(
        ["swaks", "--pipeline", "--server", "127.0.0.1", "--port", str(h.port(ListenerKind.MX)),
         "--from", "a@remote.example", "--to", "carol@example.org", "--header",
         "Subject: swaks-test", "--timeout", "20"],
        capture_output=True, text=True, timeout=40,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (body,) = h.bodies("carol@example.org")
    assert b"Subject: swaks-test" in body


def test_large_message_byte_exact(h: Harness) -> None:
    big = msg("big", 300_000)  # chunk_bytes is 4096
    with mx(h) as s:
        s.sendmail("a@remote.example", ["dave@example.org"], big)
    (body,) = h.bodies("dave@example.org")
    assert body.endswith(big) and body[: -len(big)].count(b"\r\n") == 4


def test_proxy_v2_trusted_and_untrusted(h: Harness) -> None:
    s = raw(h, ListenerKind.MX, source="127.0.0.2")
    s.sendall(build_v2(("203.0.113.9", 5555), ("127.0.0.1", 25)))
    read_replies(s, 1)
    s.sendall(b"HELO p\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    read_replies(s, 4)
    s.sendall(msg("proxied") + b".\r\n")
    assert read_replies(s, 1)[0][:3] == b"250"
    s.close()
    assert b"(unknown [203.0.113.9])" in h.bodies("alice@example.org")[0]
    u = raw(h, ListenerKind.MX)
    u.sendall(build_v2(("203.0.113.9", 5555), ("127.0.0.1", 25)))
    replies = read_replies(u, 2)
    assert replies[0][:3] == b"220" and replies[1][:9] == b"421 4.7.0"
    u.close()


def test_connection_limit_per_client(h: Harness) -> None:
    socks = [raw(h, ListenerKind.MX) for _ in range(8)]
    try:
        for s in socks:
            assert read_replies(s, 1)[0][:3] == b"220"
        extra = raw(h, ListenerKind.MX)
        assert read_replies(extra, 1)[0][:9] == b"421 4.7.0"
        extra.close()
    finally:
        for s in socks:
            s.close()


def test_graceful_stop_sends_421_and_finishes_data(h: Harness) -> None:
    idle = raw(h, ListenerKind.MX)
    read_replies(idle, 1)
    busy = raw(h, ListenerKind.MX)
    read_replies(busy, 1)
    busy.sendall(b"HELO b\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    read_replies(busy, 4)
    busy.sendall(msg("inflight")[:20])
    stopper = concurrent.futures.ThreadPoolExecutor(1).submit(
        h.run, h.listeners[ListenerKind.MX].stop(grace=10)
    )
    assert read_replies(idle, 1)[0].startswith(b"421 4.3.2")
    time.sleep(0.2)
    busy.sendall(msg("inflight")[20:] + b".\r\n")
    replies = read_replies(busy, 2)
    assert replies[0][:3] == b"250" and replies[1].startswith(b"421 4.3.2")
    stopper.result(20)
    assert h.bodies("bob@example.org")[0].endswith(msg("inflight"))
    with pytest.raises(OSError):
        raw(h, ListenerKind.MX)


# --- crash tests: a real node process killed with SIGKILL -----------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def node_dir(unique_name: str) -> Iterator[tuple[Path, int]]:
    base = Path(tempfile.mkdtemp(prefix=unique_name + "-"))
    try:
        root = base / "node"
        r = subprocess.run(
            [str(MAILHARBOR), "init", str(root), "--hostname", "mx.example.org", "--name", "mx1"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        port = free_port()
        conf = root / "mailharbor.toml"
        text = conf.read_text()
        assert text.count("\n[smtp]\n") == 1
        conf.write_text(text.replace("\n[smtp]\n", f'\n[smtp]\nmx = ["127.0.0.1:{port}"]\n'))
        cfg = ["--config", str(root / "mailharbor.toml")]
        commands = (
            ["domain", "add", "example.org"],
            ["account", "add", "alice@example.org", "--password-stdin"],
        )
        for args in commands:
            r = subprocess.run(
                [str(MAILHARBOR), *args, *cfg],
                input="pw\n",
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 0, r.stderr
        yield root, port
    finally:
        shutil.rmtree(base, ignore_errors=True)


def serve(root: Path, port: int) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(
        [str(MAILHARBOR), "serve", "--config", str(root / "mailharbor.toml")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return p
        except OSError:
            time.sleep(0.05)
    p.kill()
    raise AssertionError("node did not listen")


def inbox_subjects(root: Path) -> list[bytes]:
    from mailharbor.config import load_config

    cfg = load_config(root / "mailharbor.toml")
    st = Store.open(str(cfg.node.data_dir), node_id=cfg.node.node_id)
    try:
        acct = st.index.account_by_address("alice@example.org")
        assert acct is not None
        mb = st.index.mailboxes[acct.mailboxes["INBOX"]]
        out = []
        for b in mb.blobs:
            body = st.read_blob(st.index.blobs.hash_at(b))
            out += [ln for ln in body.split(b"\r\n") if ln.startswith(b"Subject:")]
        return out
    finally:
        st.close()


@pytest.mark.slow
def test_sigkill_during_data_and_after_250(node_dir: tuple[Path, int]) -> None:
    root, port = node_dir
    p = serve(root, port)
    try:
        s = socket.create_connection(("127.0.0.1", port), 20)
        read_replies(s, 1)
        s.sendall(
            b"HELO c\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
        )
        read_replies(s, 4)
        s.sendall(msg("during")[:30])
        time.sleep(0.2)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        s.close()
        p = serve(root, port)
        s = socket.create_connection(("127.0.0.1", port), 20)
        read_replies(s, 1)
        s.sendall(
            b"HELO c\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
        )
        read_replies(s, 4)
        s.sendall(msg("after") + b".\r\n")
        assert read_replies(s, 1)[0][:3] == b"250"
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        s.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert inbox_subjects(root) == [b"Subject: after"]
