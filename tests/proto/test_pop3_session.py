"""The POP3 engine, command by command, fed whole, byte by byte and with trailing bytes; named
regressions: commands before authentication, STLS command injection, over-long lines."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from mailharbor.proto.pop3 import (
    NEED_DATA,
    PAUSED,
    AuthRequest,
    ConnectionClosed,
    DropListing,
    Pop3Limits,
    Pop3ServerConfig,
    Pop3ServerConnection,
    Pop3UsageError,
    ProtocolViolation,
    Quit,
    Reply,
    Retrieve,
    StartTls,
    State,
    Update,
    err,
    ok,
    stuff,
    top_of,
)

from .test_pop3_helpers import LISTING, MESSAGES, UIDS, Driver, parse_responses

LOGIN = b"USER alice\r\nPASS secret\r\n"


def plain(authzid: str, user: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def state_of(d: Driver) -> State:
    return d.conn.state  # a call: mypy does not keep an attribute narrowed across it


def logged_in(**config: Any) -> Driver:
    d = Driver.new(allow_plaintext_auth=True, **config).feed(LOGIN)
    assert d.conn.state is State.TRANSACTION
    d.take()
    return d


# --- replies and helpers --------------------------------------------------------------------------


def test_reply_encoding_and_sanitising() -> None:
    assert ok().to_bytes() == b"+OK\r\n"
    assert ok("fine").to_bytes() == b"+OK fine\r\n"
    assert err("locked", "IN-USE").to_bytes() == b"-ERR [IN-USE] locked\r\n"
    assert err("x", "SYS/TEMP").to_bytes() == b"-ERR [SYS/TEMP] x\r\n"
    assert err("a\r\n+OK injected").to_bytes() == b"-ERR a  +OK injected\r\n"
    assert ok("caf\u00e9").to_bytes() == b"+OK caf?\r\n"
    assert ok("list", b"1 2\r\n").to_bytes() == b"+OK list\r\n1 2\r\n.\r\n"
    with pytest.raises(ValueError):
        Reply(True, "x", "AUTH")  # response codes only on -ERR
    with pytest.raises(ValueError):
        err("x", "BAD]CODE")
    with pytest.raises(ValueError):
        DropListing((1,), ("has space",))
    with pytest.raises(ValueError):
        DropListing((1, 2), ("a",))


def test_byte_stuffing() -> None:
    assert stuff(b"") == b".\r\n"
    assert stuff(b".\r\n") == b"..\r\n.\r\n"
    assert stuff(b"a\r\n.b\r\n..c\r\n") == b"a\r\n..b\r\n...c\r\n.\r\n"
    assert stuff(b"no final crlf") == b"no final crlf\r\n.\r\n"
    assert stuff(b"bare\nlf\n.x\n") == b"bare\r\nlf\r\n..x\r\n.\r\n"
    assert stuff(b"\r\n.\r\n") == b"\r\n..\r\n.\r\n"  # an SMTP-style terminator is data here


def test_top_of() -> None:
    m = b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n"
    assert top_of(m, 0) == b"A: 1\r\nB: 2\r\n\r\n"
    assert top_of(m, 2) == b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n"
    assert top_of(m, 99) == m
    assert top_of(b"A: 1\r\nno body", 3) == b"A: 1\r\nno body"
    assert top_of(b"\r\nbody\r\nmore\r\n", 1) == b"\r\nbody\r\n"
    assert top_of(b"A: 1\n\nx\ny\n", 1) == b"A: 1\r\n\r\nx\r\n"
    assert top_of(b"A: 1\r\n\r\nl1\r\nlast", 5) == b"A: 1\r\n\r\nl1\r\nlast"


# --- AUTHORIZATION --------------------------------------------------------------------------------


def test_greeting_and_capa_per_state() -> None:
    d = Driver.new(tls_available=True)
    assert d.take() == b"+OK pop.test POP3 server ready\r\n"
    d.feed(b"CAPA\r\n")
    caps = parse_responses(d.take())[0][1]
    assert caps == (
        b"TOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nSTLS\r\n"
        b"IMPLEMENTATION mailharbor\r\n"
    )  # no USER, no SASL before TLS
    d.feed(b"STLS\r\nCAPA\r\n")
    out = parse_responses(d.take())
    assert out[0] == (b"+OK Begin TLS negotiation", None)
    assert d.conn.tls_active
    # The CAPA pipelined after STLS was discarded: ask again over "TLS".
    assert len(out) == 1
    d.feed(b"capa\r\n")
    caps = parse_responses(d.take())[0][1]
    assert caps is not None
    assert b"USER\r\n" in caps and b"SASL PLAIN\r\n" in caps and b"STLS" not in caps
    d.feed(LOGIN + b"CAPA\r\n")
    caps = parse_responses(d.take())[-1][1]
    assert caps is not None
    assert b"USER" not in caps and b"SASL" not in caps and b"UIDL\r\n" in caps


def test_plaintext_auth_refused_before_tls() -> None:
    d = Driver.new(tls_available=True)
    d.take()
    d.feed(
        b"USER alice\r\nPASS secret\r\nAUTH PLAIN " + plain("", "a", "secret").encode() + b"\r\n"
    )
    reply = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connection"
    assert d.lines() == [reply] * 3
    assert not d.of(AuthRequest)
    assert d.conn.state is State.AUTHORIZATION


def test_commands_before_auth_regression() -> None:
    """Nothing about the mailbox is answered and no event reaches the app before login."""
    d = Driver.new(allow_plaintext_auth=True)
    d.take()
    cmds = [b"STAT", b"LIST", b"LIST 1", b"RETR 1", b"TOP 1 0", b"UIDL", b"UIDL 1", b"DELE 1",
            b"RSET", b"NOOP", b"PASS secret"]  # fmt: skip
    d.feed(b"".join(c + b"\r\n" for c in cmds))
    lines = d.lines()
    assert lines[:-1] == [b"-ERR Command not valid in this state"] * (len(cmds) - 1)
    assert lines[-1] == b"-ERR USER first"
    assert [type(e) for e in d.events] == [ProtocolViolation] * len(cmds)
    assert d.conn.state is State.AUTHORIZATION
    d.take()
    d.feed(b"QUIT\r\n")
    assert d.take() == b"+OK pop.test POP3 server signing off\r\n"
    assert [type(e) for e in d.events[-2:]] == [Quit, ConnectionClosed]
    assert d.conn.closing


def test_user_pass_and_failed_login() -> None:
    d = Driver.new(allow_plaintext_auth=True)
    d.take()
    d.feed(b"USER alice\r\nPASS wrong one\r\n")
    assert d.lines() == [b"+OK Send your password", b"-ERR [AUTH] Authentication failed"]
    req = d.of(AuthRequest)[0]
    assert (req.mechanism, req.identity, req.password) == ("USER", "alice", "wrong one")
    assert d.conn.state is State.AUTHORIZATION and d.conn.user is None
    d.take()
    d.feed(b"PASS secret\r\n")  # USER must be given again
    assert d.take() == b"-ERR USER first\r\n"
    d.feed(LOGIN)
    assert d.take() == b"+OK Send your password\r\n+OK Logged in\r\n"
    assert state_of(d) is State.TRANSACTION and d.conn.user == "alice"
    d.feed(b"USER bob\r\n")
    assert d.take() == b"-ERR Command not valid in this state\r\n"


def test_engine_pauses_for_login() -> None:
    conn = Pop3ServerConnection(Pop3ServerConfig("pop.test", allow_plaintext_auth=True))
    conn.data_to_send()
    conn.receive_data(LOGIN + b"STAT\r\n")
    assert conn.next_event() == AuthRequest("USER", "", "alice", "secret")
    assert conn.next_event() is PAUSED
    assert conn.data_to_send() == b"+OK Send your password\r\n"
    with pytest.raises(Pop3UsageError):
        conn.send(ok("in"))  # a login needs the listing
    with pytest.raises(Pop3UsageError):
        conn.send(ok("in", b"body"), maildrop=LISTING)
    out = conn.send(err("Mailbox is locked", "IN-USE"))
    assert out == b"-ERR [IN-USE] Mailbox is locked\r\n"
    assert isinstance(conn.next_event(), ProtocolViolation)  # STAT refused: not logged in
    assert conn.data_to_send() == b"-ERR Command not valid in this state\r\n"
    with pytest.raises(Pop3UsageError):
        conn.send(ok())


def test_auth_plain_initial_response_continuation_and_cancel() -> None:
    d = Driver.new(tls_active=True)
    d.take()
    d.feed(b"AUTH PLAIN " + plain("", "alice", "secret").encode() + b"\r\n")
    assert d.take() == b"+OK Logged in\r\n"
    assert d.of(AuthRequest) == [AuthRequest("PLAIN", "", "alice", "secret")]

    d = Driver.new(tls_active=True)
    d.take()
    d.feed(b"AUTH PLAIN\r\n")
    assert d.take() == b"+ \r\n" and d.conn.state is State.SASL
    d.feed(plain("alice", "alice", "secret").encode() + b"\r\n")
    assert d.take() == b"+OK Logged in\r\n"
    assert d.of(AuthRequest) == [AuthRequest("PLAIN", "alice", "alice", "secret")]

    d = Driver.new(tls_active=True)
    d.take()
    d.feed(b"AUTH PLAIN\r\n*\r\nAUTH PLAIN *\r\nAUTH\r\nAUTH CRAM-MD5\r\nAUTH PLAIN =\r\n")
    assert d.take() == (
        b"+ \r\n-ERR Authentication cancelled\r\n-ERR Authentication cancelled\r\n"
        b"+OK Supported mechanisms follow\r\nPLAIN\r\n.\r\n"
        b"-ERR Unsupported authentication mechanism\r\n-ERR Invalid PLAIN response\r\n"
    )
    d.feed(
        b"AUTH PLAIN\r\n!!notbase64\r\nAUTH PLAIN\r\n" + plain("", "a", "bad").encode() + b"\r\n"
    )
    assert d.take() == (
        b"+ \r\n-ERR Invalid base64 data\r\n+ \r\n-ERR [AUTH] Authentication failed\r\n"
    )
    assert not d.of(Retrieve) and d.conn.state is State.AUTHORIZATION


def test_stls_refusals() -> None:
    d = Driver.new(tls_active=True, tls_available=True)
    d.take()
    d.feed(b"STLS\r\n")
    assert d.take() == b"-ERR Command not permitted when TLS active\r\n"
    d = Driver.new()
    d.take()
    d.feed(b"STLS\r\n")
    assert d.take() == b"-ERR STLS not available\r\n"
    d = logged_in(tls_available=True)
    d.feed(b"STLS\r\n")
    assert d.take() == b"-ERR Command not valid in this state\r\n"


def test_stls_injection_regression() -> None:
    """RFC 2595 / CVE-2011-0411: commands pipelined with STLS in the clear are discarded."""
    d = Driver.new(tls_available=True)
    d.tls_on_stls = False
    d.take()
    d.feed(b"STLS\r\nUSER alice\r\nPASS secret\r\nSTAT\r\n")
    assert d.take() == b"+OK Begin TLS negotiation\r\n"
    assert d.conn.state is State.TLS_PENDING
    d.feed(b"more plaintext\r\n")  # before the handshake: ignored too
    assert [type(e) for e in d.events] == [StartTls]
    d.conn.starttls_done()
    d.pump()
    assert d.take() == b"" and not d.of(AuthRequest)
    d.feed(b"USER alice\r\nPASS secret\r\n")  # now over TLS
    assert d.take() == b"+OK Send your password\r\n+OK Logged in\r\n"
    # A USER given before STLS does not survive it.
    d = Driver.new(tls_available=True, allow_plaintext_auth=True)
    d.take()
    d.feed(b"USER mallory\r\n")
    d.feed(b"STLS\r\n")
    d.feed(b"PASS secret\r\n")
    assert d.lines()[-1] == b"-ERR USER first"
    with pytest.raises(Pop3UsageError):
        d.conn.starttls_done()


# --- TRANSACTION ----------------------------------------------------------------------------------


def test_stat_list_uidl() -> None:
    d = logged_in()
    sizes = [len(m) for m in MESSAGES]
    d.feed(b"STAT\r\nLIST\r\nLIST 2\r\nUIDL\r\nUIDL 3\r\nNOOP\r\n")
    out = parse_responses(d.take())
    assert out == [
        (f"+OK 3 {sum(sizes)}".encode(), None),
        (
            f"+OK 3 messages ({sum(sizes)} octets)".encode(),
            "".join(f"{i + 1} {s}\r\n" for i, s in enumerate(sizes)).encode(),
        ),
        (f"+OK 2 {sizes[1]}".encode(), None),
        (
            b"+OK Unique-ID listing follows",
            "".join(f"{i + 1} {u}\r\n" for i, u in enumerate(UIDS)).encode(),
        ),
        (f"+OK 3 {UIDS[2]}".encode(), None),
        (b"+OK", None),
    ]


def test_bad_message_numbers() -> None:
    d = logged_in()
    d.feed(b"LIST 0\r\nLIST 4\r\nRETR x\r\nRETR -1\r\nDELE 99999999999\r\nUIDL 1 2\r\n"
           b"RETR\r\nTOP 1\r\nTOP 1 x\r\nSTAT 1\r\n")  # fmt: skip
    assert d.lines() == [
        b"-ERR No such message",
        b"-ERR No such message",
        b"-ERR Invalid message number",
        b"-ERR Invalid message number",
        b"-ERR Invalid message number",
        b"-ERR Invalid message number",
        b"-ERR Syntax: RETR msg",
        b"-ERR Syntax: TOP msg n",
        b"-ERR Syntax: TOP msg n",
        b"-ERR Syntax: STAT",
    ]
    assert not d.of(Retrieve)


def test_retr_top_byte_stuffed() -> None:
    d = logged_in()
    d.feed(b"RETR 1\r\nTOP 2 3\r\nTOP 1 0\r\nRETR 3\r\n")
    out = parse_responses(bytes(d.out))
    assert out[0] == (f"+OK {len(MESSAGES[0])} octets".encode(), MESSAGES[0])
    assert b"\r\n..dot line\r\n" in d.out  # stuffed on the wire
    assert out[1] == (
        b"+OK Top of message follows",
        b"Subject: two\r\nX-Long: y\r\n\r\nbody 0\r\nbody 1\r\nbody 2\r\n",
    )
    assert out[2] == (b"+OK Top of message follows", b"From: a@example.org\r\nSubject: one\r\n\r\n")
    assert out[3][1] == MESSAGES[2] + b"\r\n"  # the final line gets its CRLF
    assert b"\r\n...two dots\r\n..\r\nlast\r\n.\r\n" in d.out
    assert d.of(Retrieve) == [Retrieve(1), Retrieve(2, 3), Retrieve(1, 0), Retrieve(3)]


def test_retrieve_needs_a_body_and_may_fail() -> None:
    conn = Pop3ServerConnection(Pop3ServerConfig("pop.test", allow_plaintext_auth=True))
    conn.receive_data(LOGIN + b"RETR 2\r\nNOOP\r\n")
    assert isinstance(conn.next_event(), AuthRequest)
    conn.send(ok(), maildrop=LISTING)
    assert conn.next_event() == Retrieve(2)
    assert conn.next_event() is PAUSED
    with pytest.raises(Pop3UsageError):
        conn.send(ok("no body"))
    assert conn.send(err("Message was removed by another session")).endswith(
        b"-ERR Message was removed by another session\r\n"
    )
    assert conn.next_event() is NEED_DATA  # NOOP is answered by the engine, no event
    assert conn.data_to_send() == b"+OK\r\n"


def test_dele_rset_quit_update() -> None:
    d = logged_in()
    d.feed(b"DELE 2\r\nDELE 2\r\nRETR 2\r\nLIST 2\r\nSTAT\r\nLIST\r\n")
    s = [len(m) for m in MESSAGES]
    assert parse_responses(d.take()) == [
        (b"+OK Message 2 deleted", None),
        (b"-ERR Message already deleted", None),
        (b"-ERR Message already deleted", None),
        (b"-ERR Message already deleted", None),
        (f"+OK 2 {s[0] + s[2]}".encode(), None),
        (f"+OK 2 messages ({s[0] + s[2]} octets)".encode(), f"1 {s[0]}\r\n3 {s[2]}\r\n".encode()),
    ]
    d.feed(b"RSET\r\nSTAT\r\nDELE 3\r\nDELE 1\r\nQUIT\r\nNOOP\r\n")
    assert d.lines() == [
        f"+OK Maildrop has 3 messages ({sum(s)} octets)".encode(),
        f"+OK 3 {sum(s)}".encode(),
        b"+OK Message 3 deleted",
        b"+OK Message 1 deleted",
        b"+OK Bye",
    ]
    assert d.of(Update) == [Update((0, 2))]
    assert d.conn.closing and isinstance(d.events[-1], ConnectionClosed)


def test_update_failure_still_closes() -> None:
    d = Driver.new(allow_plaintext_auth=True)
    d.answer = lambda ev: (
        (ok(), LISTING)
        if isinstance(ev, AuthRequest)
        else (err("Deletions could not be committed", "SYS/TEMP"), None)
    )
    d.feed(LOGIN + b"DELE 1\r\nQUIT\r\n")
    assert d.lines()[-1] == b"-ERR [SYS/TEMP] Deletions could not be committed"
    assert d.conn.closing


@pytest.mark.parametrize("ending", [b"", b"QUIT"])
def test_eof_without_quit_deletes_nothing(ending: bytes) -> None:
    d = logged_in()
    d.feed(b"DELE 1\r\nDELE 2\r\n" + ending)  # QUIT without its line end, then EOF
    d.conn.receive_data(b"")
    d.pump()
    assert not d.of(Update)
    assert d.conn.closing and isinstance(d.events[-1], ConnectionClosed)
    assert d.conn.deleted == frozenset({0, 1})  # marked, never handed to the app


def test_empty_maildrop() -> None:
    d = Driver.new(allow_plaintext_auth=True)
    d.answer = lambda ev: (ok("in"), DropListing((), ()))
    d.feed(LOGIN)
    d.take()
    d.feed(b"STAT\r\nLIST\r\nUIDL\r\nRETR 1\r\n")
    assert d.take() == (
        b"+OK 0 0\r\n+OK 0 messages (0 octets)\r\n.\r\n+OK Unique-ID listing follows\r\n.\r\n"
        b"-ERR No such message\r\n"
    )


# --- robustness -----------------------------------------------------------------------------------


SCRIPT = (
    LOGIN + b"STAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nTOP 2 1\r\nDELE 1\r\nRSET\r\nDELE 3\r\nNOOP\r\n"
    b"CAPA\r\nQUIT\r\n"
)


def test_whole_bytewise_and_trailing_bytes_agree() -> None:
    whole = Driver.new(allow_plaintext_auth=True).feed(SCRIPT)
    bytewise = Driver.new(allow_plaintext_auth=True).bytewise(SCRIPT)
    trailing = Driver.new(allow_plaintext_auth=True).feed(SCRIPT + b"NOOP\r\nRETR 1\r\ngarbage")
    lf_only = Driver.new(allow_plaintext_auth=True).feed(SCRIPT.replace(b"\r\n", b"\n"))
    assert whole.out == bytewise.out == trailing.out == lf_only.out
    assert whole.events == bytewise.events == trailing.events == lf_only.events
    assert whole.of(Update) == [Update((2,))]
    assert whole.conn.closing


def test_over_long_line_regression() -> None:
    d = Driver.new(allow_plaintext_auth=True, limits=Pop3Limits(max_line_length=64))
    d.take()
    d.feed(b"USER " + b"a" * 100 + b"\r\nNOOP\r\n")
    assert d.lines() == [b"-ERR Line too long", b"-ERR Command not valid in this state"]
    d.take()
    # A line that never ends is discarded as it arrives: the buffer stays bounded.
    for _ in range(1000):
        d.feed(b"x" * 1000)
        assert len(d.conn._in) <= 64
    d.feed(b"\r\n" + LOGIN)
    assert d.lines() == [b"-ERR Line too long", b"+OK Send your password", b"+OK Logged in"]
    # A SASL response line over its own limit ends the exchange.
    d = Driver.new(tls_active=True, limits=Pop3Limits(max_auth_line_length=64))
    d.take()
    d.feed(b"AUTH PLAIN\r\n" + b"A" * 200 + b"\r\nCAPA\r\n")
    assert d.lines()[:2] == [b"+ ", b"-ERR Line too long"]
    assert d.lines()[2] == b"+OK Capability list follows"
    assert not d.of(AuthRequest)


def test_bad_command_budget() -> None:
    d = Driver.new(limits=Pop3Limits(max_bad_commands=5))
    d.take()
    d.feed(b"BOGUS\r\n" * 10)
    assert d.lines() == [b"-ERR Unknown command"] * 4 + [
        b"-ERR Too many bad commands, closing connection"
    ]
    assert d.conn.closing
    # failed logins count too
    d = Driver.new(allow_plaintext_auth=True, limits=Pop3Limits(max_bad_commands=3))
    d.take()
    d.feed(b"USER a\r\nPASS x\r\n" * 5)
    assert d.lines().count(b"-ERR [AUTH] Authentication failed") == 3
    assert d.conn.closing and len(d.of(AuthRequest)) == 3


def test_commands_before_auth_limit() -> None:
    d = Driver.new(limits=Pop3Limits(max_commands_before_auth=3))
    d.take()
    d.feed(b"CAPA\r\n" * 5)
    assert d.lines()[-1] == b"-ERR Too many commands before login, closing connection"
    assert d.conn.closing


def test_control_and_invalid_utf8_refused() -> None:
    d = Driver.new(allow_plaintext_auth=True)
    d.take()
    d.feed(b"USER a\x00b\r\nUSER \xff\r\nUSER \xc3\xa9\r\nPASS p\xc3\xa4ss word\r\n")
    assert d.lines()[:3] == [
        b"-ERR Control character in command",
        b"-ERR Invalid UTF-8 in command",
        b"+OK Send your password",
    ]
    assert d.of(AuthRequest) == [AuthRequest("USER", "", "\u00e9", "p\u00e4ss word")]


def test_send_without_owed_reply() -> None:
    conn = Pop3ServerConnection(Pop3ServerConfig("pop.test"))
    with pytest.raises(Pop3UsageError):
        conn.send(ok())
