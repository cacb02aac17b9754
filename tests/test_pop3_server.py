"""POP3 end to end: a real ``mailharbor serve`` node, mail delivered with smtplib over its MX
listener, read with Python's poplib and with fetchmail (installed by ``make test`` from
tools/apt-packages.txt: its absence is a setup failure, never a skip)."""

from __future__ import annotations

import asyncio
import base64
import os
import poplib
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mailharbor.proto.proxy import build_v2
from mailharbor.server.pop3 import Pop3Listener, Pop3Options, Pop3Services
from mailharbor.service.auth import FAST_TEST_PARAMS, Authenticator, hash_password
from mailharbor.store import Store, StoreOptions
from mailharbor.store.index import Mailbox
from mailharbor.tls import server_context, write_self_signed
from proxytls import ProxiedTls
from servenode import ServeNode, free_port

pytestmark = pytest.mark.timeout(120)
T = TypeVar("T")
PASSWORD = "pop secret"
_accounts = iter(range(1, 1000))


class Pop3Node:
    """A served node with MX, POP3 (110-style, STLS) and POP3S (995-style) on loopback."""

    def __init__(self, prefix: str) -> None:
        self.mx, self.pop, self.pops = free_port(), free_port(), free_port()
        self.node = ServeNode(
            prefix,
            {
                "smtp": {"mx": [f"127.0.0.1:{self.mx}"]},
                "pop3": {
                    "listen": [f"127.0.0.1:{self.pop}"],
                    "listen_tls": [f"127.0.0.1:{self.pops}"],
                },
            },
        )
        self.node.cli("domain", "add", "example.org")
        self.cert = self.node.root / "tls" / "cert.pem"
        self.node.start()

    def account(self) -> str:
        address = f"user{next(_accounts)}@example.org"
        self.node.add_account(address, PASSWORD)
        return address

    def tls(self) -> ssl.SSLContext:
        """Trusts exactly the node's self-signed certificate (made by ``mailharbor init``)."""
        ctx = ssl.create_default_context(cafile=str(self.cert))
        ctx.check_hostname = False  # issued for mail.example.org, reached as 127.0.0.1
        return ctx

    def deliver(self, rcpt: str, *messages: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", self.mx, timeout=30) as s:
            for m in messages:
                s.sendmail("sender@remote.example", [rcpt], m)

    def pop3s(self, user: str, password: str = PASSWORD) -> poplib.POP3_SSL:
        """A logged-in POP3S session; retries while an ended session still holds the lock."""
        deadline = time.monotonic() + 10
        while True:
            p = poplib.POP3_SSL("127.0.0.1", self.pops, context=self.tls(), timeout=30)
            try:
                p.user(user)
                p.pass_(password)
                return p
            except poplib.error_proto as e:
                p.close()
                if b"[IN-USE]" not in e.args[0] or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def restart(self, *, kill: bool = False) -> None:
        if kill:
            self.node.kill()
        else:
            self.node.stop()
        self.node.start()


@pytest.fixture(scope="module")
def pn() -> Iterator[Pop3Node]:
    n = Pop3Node("mh-test-pop3")
    try:
        yield n
    finally:
        n.node.cleanup()


def msg(tag: str, body: bytes = b"hello\r\n") -> bytes:
    return (
        f"From: sender@remote.example\r\nTo: someone\r\nSubject: {tag}\r\n"
        f"Message-ID: <{tag}@pop3.test>\r\n\r\n"
    ).encode() + body


def one_line(resp: bytes | tuple[bytes, list[bytes], int]) -> bytes:
    """poplib's LIST n / UIDL n answer (typed as either form)."""
    assert isinstance(resp, bytes)
    return resp


def shortcmd(p: poplib.POP3, line: str) -> bytes:
    """Send one raw command line, return the status line (raises error_proto on -ERR)."""
    send: Callable[[str], bytes] = p._shortcmd  # type: ignore[attr-defined]
    return send(line)


def retr(p: poplib.POP3, n: int) -> bytes:
    resp, lines, octets = p.retr(n)
    assert resp.startswith(b"+OK")
    data = b"".join(line + b"\r\n" for line in lines)
    assert octets == len(data)  # poplib counts after un-stuffing
    return data


def test_login_stat_list_uidl_top_retr(pn: Pop3Node) -> None:
    user = pn.account()
    sent = [
        msg("one"),
        msg("two", b"first\r\n.leading dot\r\n..two dots\r\n.\r\nlast\r\n"),
        msg("three", b"".join(b"line %d\r\n" % i for i in range(50))),
    ]
    pn.deliver(user, *sent)
    p = pn.pop3s(user)
    try:
        count, total = p.stat()
        assert count == 3
        _, listing, _ = p.list()
        sizes = [int(x.split()[1]) for x in listing]
        assert [int(x.split()[0]) for x in listing] == [1, 2, 3]
        assert sum(sizes) == total
        assert one_line(p.list(2)).split() == [b"+OK", b"2", str(sizes[1]).encode()]
        got = [retr(p, i) for i in (1, 2, 3)]
        for g, s, size in zip(got, sent, sizes, strict=True):
            assert g.endswith(s)  # byte for byte what was sent, after the trace headers
            assert g.startswith(b"Return-Path: <sender@remote.example>\r\nReceived: from ")
            assert len(g) == size  # LIST size = the octets RETR sends before stuffing
        _, uidl, _ = p.uidl()
        uids = [x.split()[1] for x in uidl]
        assert all(re.fullmatch(rb"[0-9a-f]{32}", u) for u in uids) and len(set(uids)) == 3
        assert one_line(p.uidl(3)).split()[2] == uids[2]
        _, top, _ = p.top(3, 2)
        head = got[2].split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        assert top == [*head, b"", b"line 0", b"line 1"]
        _, top0, _ = p.top(2, 0)
        assert top0[-1] == b"" and b"Subject: two" in top0
        assert p.noop().startswith(b"+OK")
        assert p.quit().startswith(b"+OK")
    finally:
        p.close()


def test_dele_quit_is_durable_and_uidl_stable_across_restart(pn: Pop3Node) -> None:
    user = pn.account()
    pn.deliver(user, msg("d1"), msg("d2"), msg("d3"))
    p = pn.pop3s(user)
    _, uidl, _ = p.uidl()
    uids = [x.split()[1] for x in uidl]
    assert p.dele(2).startswith(b"+OK")
    assert p.quit().startswith(b"+OK")
    # SIGKILL right after +OK to QUIT: the deletion was durable before the +OK.
    pn.restart(kill=True)
    p = pn.pop3s(user)
    try:
        assert p.stat()[0] == 2
        _, uidl, _ = p.uidl()
        assert [x.split()[1] for x in uidl] == [uids[0], uids[2]]  # same ids after restart
        assert b"Subject: d3" in retr(p, 2)
    finally:
        p.quit()
    pn.restart()  # a clean stop and start: the ids are still the same
    p = pn.pop3s(user)
    try:
        assert [x.split()[1] for x in p.uidl()[1]] == [uids[0], uids[2]]
    finally:
        p.quit()


def test_dele_then_connection_drop_removes_nothing(pn: Pop3Node) -> None:
    user = pn.account()
    pn.deliver(user, msg("k1"), msg("k2"))
    p = pn.pop3s(user)
    p.dele(1)
    p.dele(2)
    assert p.stat() == (0, 0)
    p.close()  # no QUIT: no UPDATE state
    p = pn.pop3s(user)
    try:
        assert p.stat()[0] == 2
    finally:
        p.quit()


def test_rset_and_deleted_message_errors(pn: Pop3Node) -> None:
    user = pn.account()
    pn.deliver(user, msg("r1"), msg("r2"))
    p = pn.pop3s(user)
    try:
        p.dele(1)
        with pytest.raises(poplib.error_proto, match="already deleted"):
            p.retr(1)
        with pytest.raises(poplib.error_proto, match="No such message"):
            p.retr(3)
        assert p.rset().startswith(b"+OK Maildrop has 2 messages")
        assert p.stat()[0] == 2
    finally:
        p.quit()
    p = pn.pop3s(user)
    try:
        assert p.stat()[0] == 2
    finally:
        p.quit()


def test_second_session_in_use_and_snapshot(pn: Pop3Node) -> None:
    user = pn.account()
    pn.deliver(user, msg("s1"))
    first = pn.pop3s(user)
    try:
        second = poplib.POP3_SSL("127.0.0.1", pn.pops, context=pn.tls(), timeout=30)
        second.user(user)
        with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[IN-USE\]"):
            second.pass_(PASSWORD)
        second.quit()
        pn.deliver(user, msg("s2"))  # arrives during the session: not in its snapshot
        assert first.stat()[0] == 1
        first.dele(1)
        assert first.quit().startswith(b"+OK")
    finally:
        first.close()
    p = pn.pop3s(user)  # the lock is free again; the new message is there, the old gone
    try:
        assert p.stat()[0] == 1
        assert b"Subject: s2" in retr(p, 1)
    finally:
        p.quit()


def test_stls_and_plaintext_refused_before_tls(pn: Pop3Node) -> None:
    user = pn.account()
    pn.deliver(user, msg("t1"))
    p = poplib.POP3("127.0.0.1", pn.pop, timeout=30)
    try:
        caps = p.capa()
        assert "STLS" in caps and "USER" not in caps and "SASL" not in caps
        assert {"TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"} <= set(caps)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Plaintext"):
            p.user(user)
        p.stls(context=pn.tls())
        caps = p.capa()
        assert "STLS" not in caps and "USER" in caps and caps["SASL"] == ["PLAIN"]
        p.user(user)
        p.pass_(PASSWORD)
        assert p.stat()[0] == 1
        assert b"Subject: t1" in retr(p, 1)
    finally:
        p.quit()


def test_auth_plain_initial_response_and_continuation(pn: Pop3Node) -> None:
    user = pn.account()
    pn.deliver(user, msg("a1"))

    def b64(password: str) -> str:
        return base64.b64encode(f"\0{user}\0{password}".encode()).decode()

    p = poplib.POP3_SSL("127.0.0.1", pn.pops, context=pn.tls(), timeout=30)
    try:
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Authentication failed"):
            shortcmd(p, "AUTH PLAIN " + b64("wrong"))
        assert shortcmd(p, "AUTH PLAIN " + b64(PASSWORD)).startswith(b"+OK")
        assert p.stat()[0] == 1
    finally:
        p.quit()
    p = poplib.POP3_SSL("127.0.0.1", pn.pops, context=pn.tls(), timeout=30)
    try:
        assert shortcmd(p, "AUTH PLAIN") == b"+ "
        with pytest.raises(poplib.error_proto, match="cancelled"):
            shortcmd(p, "*")
        assert shortcmd(p, "AUTH PLAIN") == b"+ "
        assert shortcmd(p, b64(PASSWORD)).startswith(b"+OK")
        assert p.stat()[0] == 1
    finally:
        p.quit()


def test_pipelined_commands_answered_in_order(pn: Pop3Node) -> None:
    user = pn.account()
    pn.deliver(user, msg("p1"), msg("p2"))
    raw = ssl.create_default_context(cafile=str(pn.cert))
    raw.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", pn.pops), 30) as s,
        raw.wrap_socket(s) as t,
    ):
        f = t.makefile("rb")
        assert f.readline().startswith(b"+OK")
        t.sendall(
            f"USER {user}\r\nPASS {PASSWORD}\r\nSTAT\r\nDELE 1\r\nLIST 1\r\nQUIT\r\n".encode()
        )
        lines = [f.readline() for _ in range(6)]
    assert [ln.split(b" ")[0] for ln in lines] == [b"+OK", b"+OK", b"+OK", b"+OK", b"-ERR", b"+OK"]
    assert lines[2].startswith(b"+OK 2 ")
    p = pn.pop3s(user)
    try:
        assert p.stat()[0] == 1
    finally:
        p.quit()


# --- fetchmail ----------------------------------------------------------------------------------


def fetchmail(pn: Pop3Node, home: Path, user: str, *, keep: bool, stls: bool = False) -> int:
    """Run fetchmail once against the node; every message goes to ``home/mbox`` via an MDA."""
    rc = home / "fetchmailrc"
    port = pn.pop if stls else pn.pops
    tls = "sslproto tls1.2+" if stls else "ssl"
    rc.write_text(
        "set no syslog\n"
        f"poll 127.0.0.1 protocol pop3 port {port} uidl\n"
        f'  user "{user}" there with password "{PASSWORD}" is root here\n'
        f'  {tls} sslcertck sslcertfile "{pn.cert}" sslcommonname mail.example.org\n'
        f"  {'keep' if keep else 'nokeep fetchall'}\n"
        f'  mda "cat >> {home}/mbox"\n'
    )
    rc.chmod(0o600)
    env = {**os.environ, "HOME": str(home), "FETCHMAILHOME": str(home)}
    r = subprocess.run(
        ["fetchmail", "--nodetach", "-f", str(rc), "-i", str(home / "ids"), "-v"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode in (0, 1), f"fetchmail exit {r.returncode}:\n{out}"
    # It spoke POP3 with UIDL, over TLS that it verified (STLS on the plain port).
    assert "POP3> UIDL" in out and "POP3< +OK" in out, out
    assert ("POP3> STLS" in out) == stls, out
    return r.returncode


def message_ids(mbox: Path) -> list[str]:
    if not mbox.exists():
        return []
    return re.findall(r"(?im)^Message-ID: <([^>]+)>", mbox.read_text("utf-8", "replace"))


def test_fetchmail_downloads_the_mailbox(pn: Pop3Node, tmp_path: Path) -> None:
    assert shutil.which("fetchmail") is not None, "fetchmail is not installed (run make apt)"
    user = pn.account()
    pn.deliver(user, msg("f1"), msg("f2", b".dot first\r\nbody\r\n"), msg("f3"))
    # keep + uidl: a second run sees nothing new, a new message alone is fetched next.
    assert fetchmail(pn, tmp_path, user, keep=True) == 0
    assert message_ids(tmp_path / "mbox") == ["f1@pop3.test", "f2@pop3.test", "f3@pop3.test"]
    assert b"\n.dot first\n" in (tmp_path / "mbox").read_bytes().replace(b"\r\n", b"\n")
    assert fetchmail(pn, tmp_path, user, keep=True) == 1  # 1: no new mail
    pn.deliver(user, msg("f4"))
    assert fetchmail(pn, tmp_path, user, keep=True, stls=True) == 0  # over STLS on "110"
    assert message_ids(tmp_path / "mbox")[3:] == ["f4@pop3.test"]
    # nokeep: fetchmail deletes what it fetched (DELE + QUIT) — the server really removes it.
    (tmp_path / "mbox").unlink()
    (tmp_path / "ids").unlink()
    assert fetchmail(pn, tmp_path, user, keep=False) == 0
    assert sorted(message_ids(tmp_path / "mbox")) == [f"f{i}@pop3.test" for i in (1, 2, 3, 4)]
    p = pn.pop3s(user)
    try:
        assert p.stat() == (0, 0)
    finally:
        p.quit()


# --- the listener in-process: timeouts, shutdown, PROXY v2, limits, concurrent expunge ----------


class Harness:
    """A store and a POP3 listener on a private event loop in a thread (plaintext auth on)."""

    def __init__(self, root: Path, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.store: Store = self.run(self._open(root))
        self.services = Pop3Services(
            store=self.store,
            authenticator=Authenticator(self._lookup, params=FAST_TEST_PARAMS),
            options=Pop3Options(
                hostname="pop.example.org",
                allow_plaintext_auth=True,
                trusted_proxies=("127.0.0.2",),
                **options,
            ),
        )
        self.services.auth_failures.base_delay = 0.01
        self.services.auth_failures.lockout_threshold = 3
        self.listener = Pop3Listener("127.0.0.1:0", self.services)
        self.run(self.listener.start())
        self.port = self.listener.bound[0][1]

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _lookup(self, account: str) -> str | None:
        acct = self.store.index.account_by_address(account)
        return acct.password_hash if acct else None

    async def _open(self, root: Path) -> Store:
        st = Store.open(str(root / "data"), node_id=b"p" * 16, options=StoreOptions(sync=False))
        async with st.transaction() as t:
            t.add_domain("example.org")
        async with st.transaction() as t:
            t.add_account("alice@example.org", hash_password(PASSWORD, params=FAST_TEST_PARAMS))
        return st

    def deliver(self, *messages: bytes) -> None:
        async def go() -> None:
            acct = self.store.index.account_by_address("alice@example.org")
            assert acct is not None
            for m in messages:
                async with self.store.transaction() as t:
                    t.deliver(t.put_blob(m), [acct.mailboxes["INBOX"]])

        self.run(go())

    def inbox(self) -> Mailbox:
        acct = self.store.index.account_by_address("alice@example.org")
        assert acct is not None
        mb = self.store.index.mailbox_by_name(acct.guid, "INBOX")
        assert mb is not None
        return mb

    def expunge(self, uid: int) -> None:
        """What an IMAP session's EXPUNGE does to the store."""

        async def go() -> None:
            async with self.store.transaction() as t:
                t.expunge(self.inbox().guid, [uid])

        self.run(go())

    def subjects(self) -> list[bytes]:
        async def go() -> list[bytes]:
            mb = self.inbox()
            blobs = [self.store.read_blob(self.store.index.blobs.hash_at(b)) for b in mb.blobs]
            return [b.split(b"\r\n")[2] for b in blobs]

        return self.run(go())

    def stop(self) -> None:
        async def go() -> None:
            await self.listener.stop(grace=2)
            self.services.authenticator.close()
            self.store.close()

        try:
            self.run(go())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture
def make_harness(unique_name: str) -> Iterator[Callable[..., Harness]]:
    """Builds a Harness with the given Pop3Options; stops it after the test."""
    made: list[tuple[Harness, Path]] = []

    def make(**options: Any) -> Harness:
        root = Path(tempfile.mkdtemp(prefix=f"{unique_name}-{len(made)}-"))
        harness = Harness(root, **options)
        made.append((harness, root))
        return harness

    yield make
    for harness, root in made:
        try:
            harness.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def h(make_harness: Callable[..., Harness]) -> Harness:
    return make_harness()


def raw_login(h: Harness, *, source: str | None = None, header: bytes = b"") -> socket.socket:
    s = socket.create_connection(
        ("127.0.0.1", h.port), 10, source_address=(source, 0) if source else None
    )
    s.sendall(header)
    return s


def read_until_eof(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(4096):
        out += chunk
    return out


def plain_pop(h: Harness) -> poplib.POP3:
    p = poplib.POP3("127.0.0.1", h.port, timeout=10)
    p.user("alice@example.org")
    p.pass_(PASSWORD)
    return p


def test_message_expunged_by_another_session(h: Harness) -> None:
    h.deliver(msg("x1"), msg("x2"), msg("x3"))
    uids = list(h.inbox().uids)
    p = plain_pop(h)
    h.expunge(uids[1])  # an IMAP client expunges message 2 during the POP3 session
    assert p.stat()[0] == 3  # the session works on its snapshot
    with pytest.raises(poplib.error_proto, match="removed by another session"):
        p.retr(2)
    assert b"Subject: x3" in b"\r\n".join(p.retr(3)[1])
    p.dele(2)
    p.dele(3)
    assert p.quit().startswith(b"+OK")
    assert h.subjects() == [b"Subject: x1"]


def test_failed_update_removes_nothing_and_hides_the_error(h: Harness) -> None:
    h.deliver(msg("e1"))
    p = plain_pop(h)
    p.dele(1)
    h.run(_fail_store(h.store))  # an I/O error: the store goes read-only
    with pytest.raises(poplib.error_proto) as e:
        p.quit()
    assert e.value.args[0] == (
        b"-ERR [SYS/TEMP] Deletions could not be committed; nothing was removed"
    )
    assert h.subjects() == [b"Subject: e1"]


async def _fail_store(store: Store) -> None:
    store._fail(OSError("simulated disk failure"))


def test_inactivity_timeout_closes_without_update(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(timeout=1.0)
    h.deliver(msg("i1"))
    s = raw_login(h)
    s.sendall(b"USER alice@example.org\r\nPASS " + PASSWORD.encode() + b"\r\nDELE 1\r\n")
    out = read_until_eof(s)
    s.close()
    assert out.endswith(b"+OK Message 1 deleted\r\n-ERR Disconnected for inactivity\r\n")
    assert h.subjects() == [b"Subject: i1"]


def test_shutdown_sends_err_and_keeps_marked_messages(h: Harness) -> None:
    h.deliver(msg("z1"))
    p = plain_pop(h)
    p.dele(1)
    h.run(h.listener.stop(grace=2))
    assert p.file.readline() == b"-ERR [SYS/TEMP] Server shutting down\r\n"
    assert p.file.readline() == b""
    p.close()
    assert h.subjects() == [b"Subject: z1"]


def test_proxy_v2_and_per_client_limit(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(max_connections_per_client=2)
    hdr = build_v2(("192.0.2.7", 40000), ("127.0.0.1", h.port))
    socks = [raw_login(h, source="127.0.0.2", header=hdr) for _ in range(2)]
    for s in socks:
        assert s.recv(100).startswith(b"+OK pop.example.org POP3 server ready")
    third = raw_login(h, source="127.0.0.2", header=hdr)  # same proxied client: over its limit
    assert read_until_eof(third) == b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
    other = build_v2(("192.0.2.8", 40000), ("127.0.0.1", h.port))
    fourth = raw_login(h, source="127.0.0.2", header=other)  # another client behind the proxy
    assert fourth.recv(100).startswith(b"+OK")
    untrusted = raw_login(h, header=hdr)  # 127.0.0.1 may not send a PROXY header
    # the greeting and the refusal may arrive in one segment: read both together
    greeting, refusal = read_until_eof(untrusted).split(b"\r\n", 1)
    assert greeting.startswith(b"+OK")
    assert refusal == b"-ERR PROXY protocol not accepted from this address\r\n"
    for s in [*socks, third, fourth, untrusted]:
        s.close()


def test_failed_logins_delayed_then_locked_out(h: Harness) -> None:
    p = poplib.POP3("127.0.0.1", h.port, timeout=10)
    for _ in range(3):
        p.user("alice@example.org")
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Authentication failed"):
            p.pass_("wrong")
    p.user("alice@example.org")
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\] Too many failed logins"):
        p.pass_(PASSWORD)  # even the right password, while locked out
    p.quit()


def test_implicit_tls_behind_a_proxy_header_in_the_same_segment(h: Harness, tmp_path: Path) -> None:
    """pop3s (995): PROXY header and ClientHello in one write; the handshake completes and the
    greeting follows, under TLS."""
    write_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem", "pop.example.org")
    h.services.tls = server_context(tmp_path / "cert.pem", tmp_path / "key.pem")
    listener = Pop3Listener("127.0.0.1:0", h.services, implicit_tls=True)
    h.run(listener.start())
    try:
        port = listener.bound[0][1]
        c = ProxiedTls(port, build_v2(("192.0.2.7", 40000), ("127.0.0.1", port)))
        try:
            assert c.line().startswith(b"+OK")
            c.send(b"CAPA\r\n")
            assert c.line().startswith(b"+OK")
        finally:
            c.close()
    finally:
        h.run(listener.stop(grace=2))
