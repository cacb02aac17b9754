"""server/imap.py in a real node on loopback: imaplib for the basics, a small raw-socket client
for literals, IDLE, CONDSTORE/QRESYNC/VANISHED; SMTP deliveries waking IDLE; restart."""

from __future__ import annotations

import asyncio
import imaplib
import re
import shutil
import smtplib
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mailharbor.config import parse_config_text
from mailharbor.node import Node
from mailharbor.proto.proxy import build_v2
from mailharbor.service.auth import FAST_TEST_PARAMS, hash_password
from mailharbor.store import Store, StoreOptions
from mailharbor.tls import write_self_signed
from proxytls import ProxiedTls

pytestmark = pytest.mark.timeout(90)
T = TypeVar("T")
PASSWORD = "correct horse"
ALICE = "alice@example.org"
BOB = "bob@example.org"
NODE_ID = "00112233445566778899aabbccddeeff"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def message(subject: str, body: str = "Hello, world.") -> bytes:
    return (
        f"From: Bob <bob@example.net>\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@example.net>\r\n"
        f"Date: Mon, 7 Feb 2022 10:00:00 +0100\r\n\r\n{body}\r\n"
    ).encode()


class Harness:
    """A node (store, SMTP MX listener, IMAP listeners) on a private event loop in a thread."""

    def __init__(self, root: Path, **imap: object) -> None:
        self.root = root
        write_self_signed(root / "cert.pem", root / "key.pem", "mail.example.org")
        self.imap_settings = {
            "listen": [f"127.0.0.1:{free_port()}"],
            "listen_tls": [f"127.0.0.1:{free_port()}"],
            "login_timeout": "20s",
            "max_connections_per_account": 6,
            **imap,
        }
        st = Store.open(str(root / "data"), node_id=bytes.fromhex(NODE_ID), options=StoreOptions())
        h = hash_password(PASSWORD, params=FAST_TEST_PARAMS)
        with st.transaction() as t:
            t.add_domain("example.org")
        with st.transaction() as t:
            t.add_account(ALICE, h, quota_bytes=10_000_000)
            t.add_account(BOB, h)
        st.close()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.node: Node | None = None
        self.smtp_listen = free_port()
        self.start()

    def config_text(self) -> str:
        def toml(v: object) -> str:
            if isinstance(v, list):
                return "[" + ", ".join(f'"{x}"' for x in v) + "]"
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, int):
                return str(v)
            return f'"{v}"'

        imap = "\n".join(f"{k} = {toml(v)}" for k, v in self.imap_settings.items())
        return f"""
[node]
name = "mx1"
node_id = "{NODE_ID}"
hostname = "mail.example.org"
data_dir = "{self.root / "data"}"
[store]
sync = false
[admin]
socket = "{self.root / "admin.sock"}"
[tls]
cert = "{self.root / "cert.pem"}"
key = "{self.root / "key.pem"}"
[smtp]
mx = ["127.0.0.1:{self.smtp_listen}"]
[imap]
{imap}
"""

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def go() -> T:
            return fn()

        return self.run(go())

    def start(self) -> None:
        cfg = parse_config_text(self.config_text(), path=self.root / "mailharbor.toml")
        node = Node(cfg)
        self.run(node.start())
        self.node = node

    def stop_node(self) -> None:
        if self.node is not None:
            node, self.node = self.node, None
            self.run(node.stop(), timeout=60)

    def close(self) -> None:
        try:
            self.stop_node()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    @property
    def imap_port(self) -> int:
        assert self.node is not None
        return next(x for x in self.node.imap_listeners if not x.implicit_tls).bound[0][1]

    @property
    def imaps_port(self) -> int:
        assert self.node is not None
        return next(x for x in self.node.imap_listeners if x.implicit_tls).bound[0][1]

    @property
    def smtp_port(self) -> int:
        assert self.node is not None
        return self.node.listeners[0].bound[0][1]

    def imaplib(self, user: str = ALICE) -> Any:  # imaplib's result types are too loose
        c = imaplib.IMAP4_SSL("127.0.0.1", self.imaps_port, ssl_context=client_tls(), timeout=20)
        c.login(user, PASSWORD)
        return c

    def raw(self, login: str | None = ALICE) -> RawClient:
        c = RawClient(self.imaps_port)
        if login:
            c.ok(f"LOGIN {login} {{{len(PASSWORD)}+}}\r\n{PASSWORD}")
        return c


class RawClient:
    """Just enough IMAP: send a line, collect responses (literals included) up to the tag."""

    def __init__(self, port: int, tls: bool = True) -> None:
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock: socket.socket = (
            client_tls().wrap_socket(s, server_hostname="mail.example.org") if tls else s
        )
        self.buf = b""
        self.n = 0
        self.greeting = self.line()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.buf += data

    def line(self) -> bytes:
        """One response line with its literals inlined."""
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                self._fill()
            i = self.buf.index(b"\r\n") + 2
            part, self.buf = self.buf[:i], self.buf[i:]
            out += part
            m = re.search(rb"\{(\d+)\}\r\n$", part)
            if not m:
                return out
            n = int(m.group(1))
            while len(self.buf) < n:
                self._fill()
            out += self.buf[:n]
            self.buf = self.buf[n:]

    def wait_for(self, pred: Callable[[bytes], bool]) -> bytes:
        """Read untagged lines until one satisfies ``pred`` (e.g. during IDLE)."""
        while True:
            ln = self.line()
            if pred(ln):
                return ln

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def tag(self) -> str:
        self.n += 1
        return f"t{self.n}"

    def cmd(self, text: str | bytes) -> tuple[list[bytes], bytes]:
        """(untagged lines, tagged line)."""
        tag = self.tag()
        raw = text.encode() if isinstance(text, str) else text
        self.send(tag.encode() + b" " + raw + b"\r\n")
        return self.until(tag)

    def until(self, tag: str) -> tuple[list[bytes], bytes]:
        lines: list[bytes] = []
        while True:
            ln = self.line()
            if ln.startswith(tag.encode() + b" "):
                return lines, ln
            lines.append(ln)

    def ok(self, text: str | bytes) -> list[bytes]:
        lines, done = self.cmd(text)
        assert done.split()[1] == b"OK", (text, lines, done)
        return lines

    def close(self) -> None:
        with contextlib_suppress():
            self.sock.close()


class contextlib_suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> bool:
        return True


@pytest.fixture
def h(unique_name: str) -> Iterator[Harness]:
    root = Path(tempfile.mkdtemp(prefix=unique_name + "-"))
    harness = Harness(root)
    try:
        yield harness
    finally:
        harness.close()
        shutil.rmtree(root, ignore_errors=True)


def smtp_deliver(h: Harness, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", h.smtp_port, timeout=20) as s:
        s.sendmail("bob@example.net", [ALICE], message(subject))


# -- basics with imaplib -----------------------------------------------------------------------


def test_imaplib_session_basics(h: Harness) -> None:
    c = h.imaplib()
    typ, caps = c.capability()
    words = set(caps[0].split())
    for cap in (
        b"IMAP4rev2",
        b"IMAP4rev1",
        b"IDLE",
        b"UIDPLUS",
        b"MOVE",
        b"CONDSTORE",
        b"QRESYNC",
        b"ESEARCH",
        b"SPECIAL-USE",
        b"LIST-STATUS",
        b"QUOTA",
        b"OBJECTID",
        b"STATUS=SIZE",
    ):
        assert cap in words
    typ, data = c.list()
    names = [d.decode() for d in data if isinstance(d, bytes)]
    assert any(n.endswith('"/" "INBOX"') for n in names)
    assert any("\\Sent" in n and n.endswith('"Sent"') for n in names)
    typ, data = c.append("INBOX", "(\\Flagged $Work)", None, message("first"))
    assert typ == "OK" and b"APPENDUID" in data[0]
    c.append("INBOX", None, None, message("second", "needle in the body"))
    typ, data = c.select("INBOX")
    assert typ == "OK" and data == [b"2"]
    typ, data = c.fetch("1:2", "(UID FLAGS RFC822.SIZE ENVELOPE)")
    assert b"\\Flagged" in data[0] and b"$Work" in data[0] and b'"first"' in data[0]
    typ, data = c.fetch("2", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert data[0][1] == b"Subject: second\r\n\r\n"
    typ, data = c.fetch("2", "(BODY[TEXT])")  # sets \Seen
    assert data[0][1] == b"needle in the body\r\n"
    typ, data = c.fetch("2", "(FLAGS)")
    assert b"\\Seen" in data[0]
    typ, data = c.search(None, "UNSEEN")
    assert data == [b"1"]
    typ, data = c.search(None, "BODY", "needle")
    assert data == [b"2"]
    typ, data = c.uid("SEARCH", "FROM", "bob")
    assert data == [b"1 2"]
    typ, data = c.store("1", "+FLAGS", "(\\Deleted)")
    assert b"\\Deleted" in data[0]
    typ, data = c.copy("1:2", "Archive")
    assert b"COPYUID" in data[0]
    typ, data = c.expunge()
    assert data == [b"1"]
    typ, data = c.status("Archive", "(MESSAGES UIDNEXT UNSEEN SIZE HIGHESTMODSEQ)")
    assert b"MESSAGES 2" in data[0] and b"UIDNEXT 3" in data[0] and b"SIZE " in data[0]
    assert c.create("Projects/2024")[0] == "OK"
    assert c.rename("Projects", "Work")[0] == "OK"
    typ, data = c.list('""', "Work/*")
    assert data[0].endswith(b'"Work/2024"')
    assert c.delete("Work/2024")[0] == "OK"
    assert c.subscribe("Work")[0] == "OK"
    typ, data = c.lsub()
    assert any(d.endswith(b'"Work"') for d in data)
    assert c.unsubscribe("Work")[0] == "OK"
    typ, data = c.namespace()
    assert data[0] == b'(("" "/")) NIL NIL'
    typ, data = c.getquotaroot("INBOX")
    assert data[0] == [b'"INBOX" ""'] or b"QUOTA" in repr(data).encode()
    typ, data = c.select("Nope")
    assert typ == "NO"
    assert c.logout()[0] == "BYE"


def test_starttls_then_login_and_plaintext_refused(h: Harness) -> None:
    c: Any = imaplib.IMAP4("127.0.0.1", h.imap_port, timeout=20)
    assert b"LOGINDISABLED" in c.capability()[1][0]
    with pytest.raises(imaplib.IMAP4.error):
        c.login(ALICE, PASSWORD)
    c.starttls(client_tls())
    assert c.login(ALICE, PASSWORD)[0] == "OK"
    c.logout()


def test_commands_before_authentication_are_refused(h: Harness) -> None:
    """Named regression: nothing but CAPABILITY/NOOP/LOGOUT/STARTTLS/LOGIN/AUTHENTICATE works
    before login, and a LOGIN refused for lack of TLS never reads the password literal."""
    c = h.raw(login=None)
    for cmd in (
        "SELECT INBOX",
        "EXAMINE INBOX",
        'LIST "" *',
        "STATUS INBOX (MESSAGES)",
        "CREATE x",
        "FETCH 1 FLAGS",
        "UID SEARCH ALL",
        "IDLE",
        "GETQUOTAROOT INBOX",
        "ENABLE QRESYNC",
    ):
        _, done = c.cmd(cmd)
        assert done.split()[1] == b"BAD", (cmd, done)
    c.ok("NOOP")
    _, done = c.cmd(f"LOGIN {ALICE} wrong")
    assert b"NO" in done and b"AUTHENTICATIONFAILED" in done
    _, done = c.cmd("SELECT INBOX")
    assert done.split()[1] == b"BAD"
    # plain port, no TLS: LOGIN with a literal is refused before "+"
    p = RawClient(h.imap_port, tls=False)
    p.send(f"a LOGIN {ALICE} {{{len(PASSWORD)}}}\r\n")
    ln = p.line()
    assert ln.startswith(b"a NO") and b"PRIVACYREQUIRED" in ln
    p.close()
    c.close()


def test_authenticate_plain_with_sasl_ir(h: Harness) -> None:
    import base64

    c = h.raw(login=None)
    ir = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode()
    _, done = c.cmd(f"AUTHENTICATE PLAIN {ir}")
    assert done.split()[1] == b"OK"
    c.ok("SELECT INBOX")


# -- literals, IDLE, two sessions -----------------------------------------------------------


def test_append_with_sync_and_nonsync_literals(h: Harness) -> None:
    c = h.raw()
    body = message("literal")
    tag = c.tag()
    c.send(f"{tag} APPEND INBOX (\\Seen) {{{len(body)}}}\r\n".encode())
    assert c.line().startswith(b"+")
    c.send(body + b"\r\n")
    _, done = c.until(tag)
    assert b"OK [APPENDUID" in done
    lines = c.ok(b"APPEND INBOX {%d+}\r\n" % len(body) + body)
    assert lines == []
    lines = c.ok("SELECT INBOX")
    assert b"* 2 EXISTS\r\n" in lines
    lines = c.ok("FETCH 1:2 (UID FLAGS)")
    assert lines[0] == b"* 1 FETCH (UID 1 FLAGS (\\Seen \\Recent))\r\n"


def test_literal_over_the_limit_is_refused_and_the_session_survives(h: Harness) -> None:
    """Named regression: literal overflow."""
    c = h.raw()
    c.send(b"big APPEND INBOX {999999999}\r\n")
    ln = c.line()
    assert ln.startswith(b"big NO") and b"TOOBIG" in ln
    c.ok("NOOP")


def test_idle_woken_by_other_client_and_by_smtp_delivery(h: Harness) -> None:
    watcher = h.raw()
    watcher.ok("SELECT INBOX")
    watcher.send(b"i1 IDLE\r\n")
    assert watcher.line().startswith(b"+")
    other = h.raw()
    other.ok(b"APPEND INBOX {%d+}\r\n" % len(message("x")) + message("x"))
    assert watcher.wait_for(lambda ln: b"EXISTS" in ln) == b"* 1 EXISTS\r\n"
    t0 = time.monotonic()
    smtp_deliver(h, "via smtp")
    ln = watcher.wait_for(lambda ln: b"EXISTS" in ln)
    assert ln == b"* 2 EXISTS\r\n" and time.monotonic() - t0 < 5
    other.ok("SELECT INBOX")
    other.ok("STORE 1 +FLAGS (\\Flagged)")
    ln = watcher.wait_for(lambda ln: b"FETCH" in ln)
    assert ln.startswith(b"* 1 FETCH (UID 1 FLAGS (\\Flagged")
    other.ok("STORE 2 +FLAGS.SILENT (\\Deleted)")
    other.ok("EXPUNGE")
    assert watcher.wait_for(lambda ln: b"EXPUNGE" in ln) == b"* 2 EXPUNGE\r\n"
    watcher.send(b"DONE\r\n")
    _, done = watcher.until("i1")
    assert done.startswith(b"i1 OK")


def test_two_sessions_see_each_others_changes(h: Harness) -> None:
    a, b = h.raw(), h.raw()
    for s in ("one", "two", "three"):
        a.ok(b"APPEND INBOX {%d+}\r\n" % len(message(s)) + message(s))
    a.ok("SELECT INBOX")
    b.ok("SELECT INBOX")
    a.ok("STORE 1 +FLAGS (\\Answered)")
    lines = b.ok("NOOP")
    assert any(ln.startswith(b"* 1 FETCH") and b"\\Answered" in ln for ln in lines)
    a.ok("STORE 2 +FLAGS (\\Deleted)")
    a.ok("EXPUNGE")
    a.ok(b"APPEND INBOX {%d+}\r\n" % len(message("four")) + message("four"))
    # FETCH may not carry EXPUNGE: the numbering stays, the new message is announced
    lines = b.ok("FETCH 1:* (UID)")
    assert not any(b"EXPUNGE" in ln for ln in lines)
    assert b"* 4 EXISTS\r\n" in lines
    lines = b.ok("NOOP")
    assert b"* 2 EXPUNGE\r\n" in lines
    lines = b.ok("FETCH 1:* (UID)")
    assert [ln for ln in lines if b"FETCH" in ln] == [
        b"* 1 FETCH (UID 1)\r\n",
        b"* 2 FETCH (UID 3)\r\n",
        b"* 3 FETCH (UID 4)\r\n",
    ]
    # UID commands may carry EXPUNGE
    a.ok("UID STORE 3 +FLAGS (\\Deleted)")
    a.ok("UID EXPUNGE 3")
    lines = b.ok("UID FETCH 1:* (FLAGS)")
    assert b"* 2 EXPUNGE\r\n" in lines


# -- extensions ------------------------------------------------------------------------------


def test_move_uidplus_and_uid_expunge(h: Harness) -> None:
    c = h.raw()
    for s in ("a", "b", "c"):
        c.ok(b"APPEND INBOX {%d+}\r\n" % len(message(s)) + message(s))
    c.ok("SELECT INBOX")
    lines, done = c.cmd("MOVE 1:2 Trash")
    assert done.startswith(b"t") and b"OK" in done
    assert lines[0].startswith(b"* OK [COPYUID ") and lines[0].split()[4:6] == [b"1:2", b"1:2]"]
    assert lines[1:] == [b"* 2 EXPUNGE\r\n", b"* 1 EXPUNGE\r\n"]
    _, done = c.cmd("UID MOVE 3 Nowhere")
    assert b"TRYCREATE" in done
    c.ok("UID STORE 3 +FLAGS.SILENT (\\Deleted)")
    lines = c.ok("UID EXPUNGE 3")
    assert lines == [b"* 1 EXPUNGE\r\n"]
    lines = c.ok("STATUS Trash (MESSAGES)")
    assert lines == [b'* STATUS "Trash" (MESSAGES 2)\r\n']


def test_condstore_qresync_and_vanished(h: Harness) -> None:
    c = h.raw()
    for s in ("a", "b", "c"):
        c.ok(b"APPEND INBOX {%d+}\r\n" % len(message(s)) + message(s))
    lines = c.ok("SELECT INBOX (CONDSTORE)")
    hms = int(next(re.search(rb"HIGHESTMODSEQ (\d+)", ln) for ln in lines if b"HIGHEST" in ln)[1])  # type: ignore[index]
    uidvalidity = int(
        next(re.search(rb"UIDVALIDITY (\d+)", ln) for ln in lines if b"UIDVALIDITY" in ln)[1]  # type: ignore[index]
    )
    lines = c.ok("FETCH 1 (FLAGS MODSEQ)")
    assert re.match(rb"\* 1 FETCH \(FLAGS \(\\Recent\) MODSEQ \(\d+\)\)", lines[0])
    c.ok("STORE 2 +FLAGS (\\Flagged)")
    lines, done = c.cmd(f"STORE 1:2 (UNCHANGEDSINCE {hms}) +FLAGS (\\Seen)")
    assert b"[MODIFIED 2]" in done
    assert len(lines) == 1 and lines[0].startswith(b"* 1 FETCH (FLAGS (\\Seen \\Recent) MODSEQ (")
    lines = c.ok(f"FETCH 1:* (UID FLAGS) (CHANGEDSINCE {hms})")
    assert len(lines) == 2 and all(b"MODSEQ" in ln for ln in lines)
    lines = c.ok("SEARCH MODSEQ 2")
    assert re.match(rb"\* ESEARCH|\* SEARCH 1 2 3 \(MODSEQ \d+\)", lines[0])
    c.ok("STORE 3 +FLAGS.SILENT (\\Deleted)")
    c.ok("EXPUNGE")
    # a new session resynchronises with QRESYNC
    q = h.raw()
    q.ok("ENABLE QRESYNC")
    lines = q.ok(f"SELECT INBOX (QRESYNC ({uidvalidity} {hms}))")
    assert b"* VANISHED (EARLIER) 3\r\n" in lines
    assert sum(1 for ln in lines if b"FETCH" in ln) == 2
    lines = q.ok(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {hms} VANISHED)")
    assert lines[0] == b"* VANISHED (EARLIER) 3\r\n"
    c.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
    c.ok("EXPUNGE")
    lines = q.ok("NOOP")
    assert lines == [b"* VANISHED 1\r\n"]


def test_esearch_and_search_keys_over_imap(h: Harness) -> None:
    c = h.raw()
    c.ok(b"APPEND INBOX (\\Seen) {%d+}\r\n" % len(message("x", "foo")) + message("x", "foo"))
    c.ok(b"APPEND INBOX {%d+}\r\n" % len(message("y", "bar")) + message("y", "bar"))
    c.ok("SELECT INBOX")
    lines = c.ok("SEARCH RETURN (MIN MAX COUNT ALL) OR SEEN BODY bar")
    assert re.search(rb"MIN 1 MAX 2 ALL 1:2 COUNT 2", lines[0]), lines
    lines = c.ok("UID SEARCH RETURN (COUNT) NOT SEEN")
    assert b"UID COUNT 1" in lines[0]
    lines = c.ok('SEARCH HEADER Message-ID "y@example" SENTON 7-Feb-2022 LARGER 10')
    assert lines[0].split()[-1] in (b"2", b"2)")


def test_enable_list_extended_status_quota_id(h: Harness) -> None:
    c = h.raw()
    lines = c.ok("ENABLE CONDSTORE")
    assert lines == [b"* ENABLED CONDSTORE\r\n"]
    lines = c.ok('LIST "" "*" RETURN (SPECIAL-USE STATUS (MESSAGES UIDNEXT))')
    assert any(b"\\Trash" in ln for ln in lines)
    assert sum(1 for ln in lines if ln.startswith(b"* STATUS")) == 6
    lines = c.ok('LIST (SPECIAL-USE) "" "*"')
    assert len(lines) == 5
    lines = c.ok('GETQUOTA ""')
    assert re.match(rb'\* QUOTA "" \(STORAGE \d+ 9765\)', lines[0])
    lines = c.ok('ID ("name" "test")')
    assert lines[0].startswith(b"* ID (")
    lines = c.ok("STATUS INBOX (MAILBOXID DELETED)")
    assert b"MAILBOXID (F" in lines[0]


def test_examine_is_read_only(h: Harness) -> None:
    c = h.raw()
    c.ok(b"APPEND INBOX {%d+}\r\n" % len(message("x")) + message("x"))
    lines, done = c.cmd("EXAMINE INBOX")
    assert b"[READ-ONLY]" in done
    _, done = c.cmd("STORE 1 +FLAGS (\\Seen)")
    assert done.split()[1] == b"NO"
    c.ok("FETCH 1 BODY[]")
    lines = c.ok("FETCH 1 FLAGS")
    assert lines == [b"* 1 FETCH (FLAGS (\\Recent))\r\n"] or lines == [b"* 1 FETCH (FLAGS ())\r\n"]


# -- durability, limits, lifetime ------------------------------------------------------------


def test_append_survives_a_restart_with_flags_and_uids(h: Harness) -> None:
    c = h.raw()
    c.ok(b"APPEND INBOX (\\Flagged $Label) {%d+}\r\n" % len(message("keep")) + message("keep"))
    lines = c.ok("SELECT INBOX")
    uidnext = next(ln for ln in lines if b"UIDNEXT" in ln)
    c.close()
    h.stop_node()
    h.start()
    d = h.raw()
    lines = d.ok("SELECT INBOX")
    assert next(ln for ln in lines if b"UIDNEXT" in ln) == uidnext
    lines = d.ok("UID FETCH 1 (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"\\Flagged" in lines[0] and b"$Label" in lines[0] and b"Subject: keep" in lines[0]


def test_per_account_connection_limit(h: Harness) -> None:
    clients = [h.raw() for _ in range(6)]
    c = h.raw(login=None)
    _, done = c.cmd(f'LOGIN {ALICE} "{PASSWORD}"')
    assert b"NO [LIMIT]" in done
    clients[0].ok("LOGOUT")
    clients[0].close()
    time.sleep(0.2)
    _, done = c.cmd(f'LOGIN {ALICE} "{PASSWORD}"')
    assert done.split()[1] == b"OK"


def test_bye_on_shutdown(h: Harness) -> None:
    c = h.raw()
    c.ok("SELECT INBOX")
    h.stop_node()
    assert c.line().startswith(b"* BYE")


def test_login_timeout_gives_bye(unique_name: str) -> None:
    root = Path(tempfile.mkdtemp(prefix=unique_name + "-"))
    harness = Harness(root, login_timeout="1s")
    try:
        c = RawClient(harness.imaps_port)
        t0 = time.monotonic()
        assert c.line().startswith(b"* BYE")
        assert time.monotonic() - t0 < 10
    finally:
        harness.close()
        shutil.rmtree(root, ignore_errors=True)


def test_bad_input_never_kills_the_session(h: Harness) -> None:
    c = h.raw()
    for junk in ("", "FOO", "FETCH", "SELECT", "UID BLAH 1", "STORE 1 +FLAGS", "(((", "a" * 2000):
        c.send(junk + "\r\n") if not junk else c.send("\r\n")
    c.ok("NOOP")
    c.ok("SELECT INBOX")
    _, done = c.cmd("FETCH 5 FLAGS")  # no such sequence number
    assert done.split()[1] == b"BAD"
    c.ok("NOOP")


# -- fault paths, limits, timeouts, and the gaps closed after the first version ------------------


def _harness(unique_name: str, **imap: object) -> tuple[Harness, Path]:
    root = Path(tempfile.mkdtemp(prefix=unique_name + "-"))
    return Harness(root, **imap), root


def test_fetch_of_a_message_expunged_by_another_session(h: Harness) -> None:
    setup = h.imaplib()
    for i in range(3):
        setup.append("INBOX", None, None, message(f"gone{i}"))
    setup.logout()
    a, b = h.raw(), h.raw()
    a.ok("SELECT INBOX")
    b.ok("SELECT INBOX")
    b.ok("STORE 2 +FLAGS.SILENT (\\Deleted)")
    b.ok("EXPUNGE")
    # a has not been told: message 2 keeps its number and still shows what is readable
    lines = a.ok("FETCH 2 (UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    head = b"* 2 FETCH (UID 2 FLAGS (\\Deleted \\Recent) BODY[HEADER.FIELDS (SUBJECT)]"
    assert lines[0].startswith(head)
    assert b"Subject: gone1" in lines[0] and not any(b"EXPUNGE" in x for x in lines)
    lines = a.ok("FETCH 1:* (FLAGS)")
    assert [x.split(b" FETCH")[0] for x in lines] == [b"* 1", b"* 2", b"* 3"]
    # once nothing is left of it: the others, then NO [EXPUNGEISSUED]
    assert h.node is not None and h.node.mailboxes is not None
    h.call(h.node.mailboxes.store.index.expunged_rows.clear)
    lines, done = a.cmd("FETCH 1:3 (UID)")
    assert lines == [b"* 1 FETCH (UID 1)\r\n", b"* 3 FETCH (UID 3)\r\n"]
    assert done.split()[1:3] == [b"NO", b"[EXPUNGEISSUED]"]
    # the UID form may announce the expunge instead, and then answers OK
    lines = a.ok("UID FETCH 1:3 (UID)")
    assert lines == [b"* 1 FETCH (UID 1)\r\n", b"* 3 FETCH (UID 3)\r\n", b"* 2 EXPUNGE\r\n"]
    a.ok("LOGOUT")
    b.ok("LOGOUT")


def test_create_special_use_and_list_consistency(h: Harness) -> None:
    c = h.raw()
    caps = c.ok("CAPABILITY")[0]
    assert b" CREATE-SPECIAL-USE" in caps and b" SPECIAL-USE" in caps
    c.ok("CREATE MyDrafts (USE (\\Drafts))")
    lines = c.ok('LIST "" MyDrafts')
    assert lines == [b'* LIST (\\HasNoChildren \\Drafts) "/" "MyDrafts"\r\n']
    _, done = c.cmd("CREATE Starred (USE (\\Important))")  # known to the parser, not kept
    assert done.split()[1:3] == [b"NO", b"[USEATTR]"]
    assert c.ok('LIST "" Starred') == []
    # a hierarchy level that only exists through its children: the same with * and %
    c.ok("CREATE Top/Child")
    c.ok("DELETE Top")
    star = [x for x in c.ok('LIST "" *') if x.endswith(b'"/" "Top"\r\n')]
    pct = [x for x in c.ok('LIST "" %') if x.endswith(b'"/" "Top"\r\n')]
    assert star == pct == [b'* LIST (\\Noselect \\HasChildren) "/" "Top"\r\n']
    # RENAME takes the subscriptions along
    c.ok("CREATE Lists/python")
    c.ok("SUBSCRIBE Lists")
    c.ok("SUBSCRIBE Lists/python")
    c.ok("RENAME Lists Groups")
    subs = c.ok('LSUB "" *')
    assert b'* LSUB () "/" "Groups"\r\n' in subs and b'* LSUB () "/" "Groups/python"\r\n' in subs
    assert not any(b"Lists" in x for x in subs)
    c.ok("LOGOUT")


def test_store_that_changes_nothing_does_not_bump_modseq(h: Harness) -> None:
    setup = h.imaplib()
    setup.append("INBOX", "(\\Seen)", None, message("quiet"))
    setup.logout()
    a, b = h.raw(), h.raw()
    a.ok("ENABLE CONDSTORE")
    b.ok("ENABLE CONDSTORE")
    sel = a.ok("SELECT INBOX")
    b.ok("SELECT INBOX")
    highest = next(x for x in sel if b"HIGHESTMODSEQ" in x)
    lines = a.ok("STORE 1 +FLAGS (\\Seen)")  # already there
    modseq = highest.split()[3][:-1]
    assert lines == [b"* 1 FETCH (FLAGS (\\Seen \\Recent) MODSEQ (" + modseq + b"))\r\n"]
    assert a.ok("STORE 1 +FLAGS.SILENT (\\Seen)") == []
    assert b.ok("NOOP") == []  # nothing changed, nothing to tell
    lines = a.ok("FETCH 1 (MODSEQ)")
    assert lines == [b"* 1 FETCH (MODSEQ (" + modseq + b"))\r\n"]
    # a real change is still a new MODSEQ and reaches the other session
    a.ok("STORE 1 -FLAGS.SILENT (\\Seen)")
    assert any(b"FETCH (UID 1 FLAGS () MODSEQ" in x for x in b.ok("NOOP"))
    a.ok("LOGOUT")
    b.ok("LOGOUT")


def test_a_failing_service_call_is_no_serverbug_and_the_session_goes_on(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert h.node is not None and h.node.mailboxes is not None
    svc = h.node.mailboxes

    def broken(address: str, name: str) -> object:
        raise RuntimeError("injected fault: secret detail")

    c = h.raw()
    monkeypatch.setattr(svc, "status", broken)
    _, done = c.cmd("STATUS INBOX (MESSAGES)")
    assert done.split()[1:3] == [b"NO", b"[SERVERBUG]"]
    assert b"secret" not in done and b"injected" not in done
    monkeypatch.undo()
    assert any(b"MESSAGES 0" in x for x in c.ok("STATUS INBOX (MESSAGES)"))
    c.ok("LOGOUT")


def test_proxy_v2_and_per_client_limit(unique_name: str) -> None:
    h, root = _harness(unique_name, trusted_proxies=["127.0.0.2"], max_connections_per_client=2)
    socks: list[socket.socket] = []

    def connect(source: str | None, header: bytes) -> socket.socket:
        s = socket.create_connection(
            ("127.0.0.1", h.imap_port), 10, source_address=(source, 0) if source else None
        )
        s.sendall(header)
        socks.append(s)
        return s

    def until_eof(s: socket.socket) -> bytes:
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        return out

    try:
        hdr = build_v2(("192.0.2.7", 40000), ("127.0.0.1", h.imap_port))
        for s in [connect("127.0.0.2", hdr) for _ in range(2)]:
            assert s.recv(200).startswith(b"* OK")
        third = connect("127.0.0.2", hdr)  # the same proxied client: over its limit
        assert until_eof(third) == b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"
        other = build_v2(("192.0.2.8", 40000), ("127.0.0.1", h.imap_port))
        assert connect("127.0.0.2", other).recv(200).startswith(b"* OK")  # another client
        # a trusted address must send the header
        assert connect("127.0.0.2", b"a1 NOOP\r\na2 NOOP\r\n").recv(200) == b""
        untrusted = connect(None, hdr)  # 127.0.0.1 may not send a PROXY header
        out = until_eof(untrusted)
        assert out.startswith(b"* OK") and out.endswith(
            b"* BYE PROXY protocol not accepted from this address\r\n"
        )
    finally:
        for s in socks:
            s.close()
        h.close()
        shutil.rmtree(root, ignore_errors=True)


def test_idle_timeout_gives_bye(unique_name: str) -> None:
    h, root = _harness(unique_name, idle_timeout="1s")
    try:
        c = h.raw()  # logged in: idle_timeout, not login_timeout
        c.ok("SELECT INBOX")
        t0 = time.monotonic()
        assert c.line().startswith(b"* BYE")
        assert 0.5 < time.monotonic() - t0 < 10
        d = h.raw()
        d.send("i1 IDLE\r\n")  # IDLE is no way around it
        assert d.line().startswith(b"+ ")
        assert d.line().startswith(b"* BYE")
    finally:
        h.close()
        shutil.rmtree(root, ignore_errors=True)


def test_implicit_tls_behind_a_proxy_header_in_the_same_segment(unique_name: str) -> None:
    """PROXY header and ClientHello in one write: the header is taken off the socket alone, the
    ClientHello reaches TLS, the greeting follows. Then stop() leaves no task of the listener
    behind (none parked in ``wait_closed`` after leaving the listener's set)."""
    h, root = _harness(unique_name, trusted_proxies=["127.0.0.2"])
    try:
        assert h.node is not None
        listeners = list(h.node.imap_listeners)
        hdr = build_v2(("192.0.2.7", 40000), ("127.0.0.1", h.imaps_port))
        c = ProxiedTls(h.imaps_port, hdr)
        assert c.line().startswith(b"* OK")
        c.send(b"a1 NOOP\r\n")
        assert c.line().startswith(b"a1 OK")
        idle = ProxiedTls(h.imaps_port, hdr)  # still open at stop: gets BYE, then closed
        assert idle.line().startswith(b"* OK")
        c.close()
        h.stop_node()

        async def leftover() -> list[asyncio.Task[Any]]:
            me = asyncio.current_task()
            return [t for t in asyncio.all_tasks() if t is not me and not t.done()]

        assert all(not x._tasks for x in listeners)
        names = [repr(t.get_coro()) for t in h.run(leftover())]
        assert not [n for n in names if "ImapListener" in n or "wait_closed" in n], names
        idle.close()
    finally:
        h.close()
        shutil.rmtree(root, ignore_errors=True)
