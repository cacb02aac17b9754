"""The engine's session behaviour: greeting, capabilities, states, literals, IDLE, AUTHENTICATE,
ENABLE, budgets, and the app-facing contract of ``send``."""

from __future__ import annotations

import pytest

from mailharbor.proto.imap import (
    NEED_DATA,
    PAUSED,
    Append,
    Authenticate,
    Capability,
    Code,
    ConnectionClosed,
    Enable,
    Event,
    Fetch,
    IdleDone,
    ImapLimits,
    ImapServerConnection,
    ImapUsageError,
    Login,
    Logout,
    Noop,
    ProtocolViolation,
    Request,
    Select,
    State,
    Tagged,
    Untagged,
    bye,
    exists,
    list_mailbox,
    no,
    ok,
)

from .test_imap_helpers import Driver


def test_greeting_advertises_logindisabled_and_starttls_before_tls() -> None:
    d = Driver.new(tls_available=True)
    greeting = d.lines()[0]
    assert greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 IMAP4rev2 STARTTLS LOGINDISABLED ")
    assert b"AUTH=PLAIN" not in greeting
    assert d.conn.state is State.NOT_AUTHENTICATED


def test_capabilities_after_tls_offer_auth_not_starttls() -> None:
    d = Driver.new(tls_available=True, tls_active=True)
    d.feed(b"c1 CAPABILITY\r\n")
    caps = d.lines()[1].split()
    assert b"AUTH=PLAIN" in caps and b"SASL-IR" in caps
    assert b"STARTTLS" not in caps and b"LOGINDISABLED" not in caps
    needed = b"IMAP4rev2 IDLE UIDPLUS MOVE CONDSTORE QRESYNC ESEARCH LITERAL+ SPECIAL-USE "
    needed += b"LIST-STATUS OBJECTID STATUS=SIZE NAMESPACE UNSELECT ENABLE ID QUOTA CHILDREN"
    assert set(needed.split()) <= set(caps)
    assert d.tagged("c1") == b"c1 OK CAPABILITY done"
    assert d.events == [Request("c1", Capability(), answered=True)]


def test_login_ok_moves_to_authenticated_with_capability_code() -> None:
    d = Driver.new(allow_plaintext_auth=True)
    d.feed(b"a1 LOGIN alice s3cret\r\n")
    assert d.commands() == [Login("alice", "s3cret")]
    assert d.tagged("a1").startswith(b"a1 OK [CAPABILITY IMAP4rev1 IMAP4rev2 ")
    assert b"AUTH=" not in d.tagged("a1")
    assert d.conn.state is State.AUTHENTICATED
    assert d.conn.username == "alice"


def test_login_no_keeps_state_and_failures_end_the_session() -> None:
    d = Driver.new(
        allow_plaintext_auth=True,
        limits=ImapLimits(max_auth_failures=3),
        responder=lambda ev: [no("Nope", Code.AUTHENTICATIONFAILED)],
    )
    d.feed(b"a1 LOGIN u p\r\na2 LOGIN u p\r\n")
    assert d.conn.state is State.NOT_AUTHENTICATED
    assert d.tagged("a2") == b"a2 NO [AUTHENTICATIONFAILED] Nope"
    d.feed(b"a3 LOGIN u p\r\na4 NOOP\r\n")
    assert d.lines()[-1] == b"* BYE Too many authentication failures"
    assert d.conn.closing
    assert not any(b"a4" in ln for ln in d.lines())


def test_login_twice_is_bad() -> None:
    d = Driver.logged_in()
    d.feed(b"a2 LOGIN u p\r\n")
    assert d.tagged("a2") == b"a2 BAD Command not valid in this state"
    assert d.commands() == []


def state_of(d: Driver) -> State:
    """The connection state, read anew (mypy would otherwise keep a narrowed literal)."""
    return d.conn.state


def test_select_close_unselect_transitions() -> None:
    d = Driver.logged_in()
    d.feed(b"s1 SELECT INBOX\r\n")
    assert state_of(d) is State.SELECTED
    d.feed(b"s2 CLOSE\r\n")
    assert state_of(d) is State.AUTHENTICATED
    d.feed(b"s3 EXAMINE INBOX\r\ns4 UNSELECT\r\n")
    assert state_of(d) is State.AUTHENTICATED
    assert Select("INBOX", readonly=True) in d.commands()


def test_failed_select_leaves_selected_state() -> None:
    d = Driver.selected()
    d.responder = lambda ev: [no("No such mailbox", Code.NONEXISTENT)]
    d.feed(b"s2 SELECT Nope\r\n")
    assert d.tagged("s2") == b"s2 NO [NONEXISTENT] No such mailbox"
    assert d.conn.state is State.AUTHENTICATED  # RFC 9051 6.3.2


@pytest.mark.parametrize(
    "line",
    [b"f1 FETCH 1 FLAGS", b"f1 STORE 1 +FLAGS \\Seen", b"f1 SEARCH ALL", b"f1 EXPUNGE",
     b"f1 UID FETCH 1 UID", b"f1 CLOSE", b"f1 COPY 1 x", b"f1 MOVE 1 x", b"f1 CHECK"],
)  # fmt: skip
def test_selected_commands_without_a_mailbox_are_bad(line: bytes) -> None:
    d = Driver.logged_in()
    d.feed(line + b"\r\n")
    assert d.tagged("f1") == b"f1 BAD No mailbox selected"
    assert d.conn.state is State.AUTHENTICATED
    assert d.commands() == []


def test_pipelined_commands_are_answered_in_order() -> None:
    answered: list[str] = []

    def responder(ev: Event) -> list[Tagged | Untagged]:
        assert isinstance(ev, Request)
        answered.append(ev.tag)
        return [ok(f"done {ev.tag}")]

    d = Driver.selected()
    d.responder = responder
    d.feed(b"p1 NOOP\r\np2 FETCH 1 FLAGS\r\np3 CHECK\r\np4 BOGUS\r\np5 NOOP\r\n")
    assert answered == ["p1", "p2", "p3", "p5"]
    assert [ln.split()[0] for ln in d.lines()] == [b"p1", b"p2", b"p3", b"p4", b"p5"]


def test_engine_pauses_until_the_app_answers() -> None:
    conn = ImapServerConnection(tls_active=True)
    conn.data_to_send()
    conn.receive_data(b"a LOGIN u p\r\nb NOOP\r\n")
    ev = conn.next_event()
    assert isinstance(ev, Request) and isinstance(ev.command, Login)
    assert conn.next_event() is PAUSED
    assert conn.next_event() is PAUSED  # nothing read meanwhile
    out = conn.send(exists(0), ok())
    assert out.startswith(b"* 0 EXISTS\r\na OK [CAPABILITY ")
    ev = conn.next_event()
    assert isinstance(ev, Request) and ev == Request("b", Noop())
    conn.send(ok())
    assert conn.next_event() is NEED_DATA


def test_send_contract() -> None:
    conn = ImapServerConnection(tls_active=True)
    with pytest.raises(ImapUsageError):
        conn.send(ok())  # nothing owed
    conn.receive_data(b"a LOGOUT\r\n")
    assert isinstance(conn.next_event(), Request)
    assert isinstance(conn.next_event(), ConnectionClosed)
    assert conn.data_to_send().endswith(b"a OK LOGOUT completed\r\n")
    assert conn.send(exists(3)) == b""  # a late notification after the end is dropped


def test_app_bye_closes_the_session() -> None:
    d = Driver.selected()
    out = d.conn.send(bye("Server shutting down"))
    assert out == b"* BYE Server shutting down\r\n"
    assert d.conn.closing
    d.feed(b"x NOOP\r\n")
    assert d.of(ConnectionClosed) and d.commands() == []


def test_logout() -> None:
    d = Driver.selected()
    d.feed(b"z LOGOUT\r\nz2 NOOP\r\n")
    assert d.lines() == [b"* BYE Logging out", b"z OK LOGOUT completed"]
    assert d.events == [Request("z", Logout(), answered=True), ConnectionClosed()]
    assert d.conn.closing


def test_eof_closes() -> None:
    d = Driver.logged_in()
    d.feed(b"a NOOP\r\nb SELE")
    d.eof()
    assert d.events[-1] == ConnectionClosed()
    assert d.commands() == [Noop()]


def test_empty_lines_are_ignored_and_bare_lf_accepted() -> None:
    d = Driver.logged_in()
    d.feed(b"\r\n\r\na NOOP\nb NOOP\r\n")
    assert d.lines() == [b"a OK Completed", b"b OK Completed"]


def test_bad_command_budget() -> None:
    d = Driver.logged_in(limits=ImapLimits(max_bad_commands=3))
    d.feed(b"1 BOGUS\r\n2 BOGUS\r\n3 NOOP\r\n4 BOGUS\r\n5 BOGUS\r\n")
    assert not d.conn.closing  # a good command resets the count
    d.feed(b"6 BOGUS\r\n7 NOOP\r\n")
    assert d.lines()[-2:] == [b"6 BAD Unknown command", b"* BYE Too many invalid commands"]
    assert d.conn.closing
    assert any(isinstance(e, ProtocolViolation) and e.closing for e in d.events)


def test_unreadable_tag_gets_untagged_bad() -> None:
    d = Driver.logged_in()
    d.feed(b"+++\r\n")
    assert d.lines() == [b"* BAD Invalid tag"]


# ----------------------------------------------------------------------------- literals

APPEND = b"A1 APPEND INBOX (\\Seen) {11}\r\nhello world\r\n"
APPEND_PLUS = b"A1 APPEND INBOX (\\Seen) {11+}\r\nhello world\r\n"


@pytest.mark.parametrize("mode", ["whole", "bytewise", "trailing"])
@pytest.mark.parametrize("wire", [APPEND, APPEND_PLUS], ids=["sync", "literal+"])
def test_append_literal(mode: str, wire: bytes) -> None:
    d = Driver.logged_in()
    if mode == "whole":
        d.feed(wire)
    elif mode == "bytewise":
        d.bytewise(wire)
    else:
        d.feed(wire + b"A2 NOOP\r\nA3 NO", cuts=[7, 30])
    appends = [c for c in d.commands() if isinstance(c, Append)]
    assert appends == [Append("INBOX", ("\\Seen",), None, b"hello world")]
    continuations = [ln for ln in d.lines() if ln.startswith(b"+")]
    assert continuations == ([b"+ Ready for literal data"] if b"+}" not in wire else [])
    assert d.tagged("A1") == b"A1 OK Completed"
    if mode == "trailing":
        assert d.tagged("A2") == b"A2 OK Completed"
        assert d.conn.buffered == 5  # "A3 NO" waits for its line end


def test_continuation_comes_before_the_literal_is_read() -> None:
    d = Driver.logged_in()
    d.feed(b"A1 APPEND INBOX {3}\r\n")
    assert d.lines() == [b"+ Ready for literal data"]
    assert d.commands() == []
    d.feed(b"abc\r\n")
    assert d.commands() == [Append("INBOX", (), None, b"abc")]


def test_several_literals_in_one_command() -> None:
    d = Driver.new(allow_plaintext_auth=True)
    d.feed(b"L LOGIN {4}\r\n")
    d.feed(b'a"b\\ {3}\r\nx y\r\n')
    assert d.commands() == [Login('a"b\\', "x y")]
    assert d.lines().count(b"+ Ready for literal data") == 2


def test_literal_content_with_crlf_and_command_lines_is_data() -> None:
    body = b"Subject: x\r\n\r\nz LOGOUT\r\n{5}\r\n"
    d = Driver.logged_in()
    d.feed(b"A1 APPEND INBOX {%d}\r\n" % len(body) + body + b"\r\n")
    assert d.commands() == [Append("INBOX", (), None, body)]
    assert not d.conn.closing


def test_marker_inside_quoted_string_is_not_a_literal() -> None:
    d = Driver.selected()
    d.feed(b'q1 SEARCH SUBJECT "{5}"\r\nq2 NOOP\r\n')
    assert d.tagged("q1") == b"q1 OK Completed"
    assert b"+ Ready" not in bytes(d.out)


def test_zero_length_literal() -> None:
    d = Driver.logged_in()
    d.feed(b"A1 APPEND INBOX {0}\r\n\r\n")
    assert d.commands() == [Append("INBOX", (), None, b"")]


# ----------------------------------------------------------------------------- IDLE


def test_idle_flow() -> None:
    d = Driver.selected()
    d.feed(b"i1 IDLE\r\n")
    assert d.lines() == [b"+ idling"]
    assert d.conn.current_tag == "i1"
    assert d.conn.next_event() is NEED_DATA  # reading DONE, not paused
    d.out += d.conn.send(exists(5))
    d.feed(b"DONE\r\n")
    assert d.lines() == [b"+ idling", b"* 5 EXISTS", b"i1 OK Completed"]
    assert IdleDone("i1") in d.events


def test_idle_done_fed_bytewise_with_trailing_command() -> None:
    d = Driver.selected()
    d.bytewise(b"i1 IDLE\r\ndone\r\ni2 NOOP\r\n")
    assert d.lines() == [b"+ idling", b"i1 OK Completed", b"i2 OK Completed"]


def test_idle_garbage_ends_idle_with_bad_and_is_not_executed() -> None:
    d = Driver.selected()
    d.feed(b"i1 IDLE\r\ni2 LOGOUT\r\n")
    assert d.tagged("i1") == b"i1 BAD Expected DONE"
    assert not d.conn.closing
    assert IdleDone("i1", answered=True) in d.events
    with pytest.raises(ImapUsageError):
        d.conn.send(ok())  # the engine answered the IDLE already


def test_tagged_during_idle_is_a_usage_error() -> None:
    d = Driver.selected()
    d.feed(b"i1 IDLE\r\n")
    with pytest.raises(ImapUsageError):
        d.conn.send(ok())


# ----------------------------------------------------------------------------- AUTHENTICATE


def test_authenticate_plain_with_continuation() -> None:
    d = Driver.new(tls_active=True)
    d.out.clear()
    d.feed(b"a1 AUTHENTICATE PLAIN\r\n")
    assert d.lines() == [b"+ "]
    d.feed(b"AGFsaWNlAHNlY3JldA==\r\n")  # \0alice\0secret
    assert d.commands() == [Authenticate("PLAIN", "", "alice", "secret")]
    assert d.tagged("a1").startswith(b"a1 OK [CAPABILITY ")
    assert d.conn.state is State.AUTHENTICATED and d.conn.username == "alice"


def test_authenticate_sasl_ir() -> None:
    d = Driver.new(tls_active=True)
    d.feed(b"a1 AUTHENTICATE PLAIN YWRtaW4AYWxpY2UAc2VjcmV0\r\n")  # admin\0alice\0secret
    assert d.commands() == [Authenticate("PLAIN", "admin", "alice", "secret")]
    assert not any(ln.startswith(b"+") for ln in d.lines())


def test_authenticate_login_mechanism() -> None:
    d = Driver.new(tls_active=True, auth_mechanisms=("PLAIN", "LOGIN"))
    d.out.clear()
    d.feed(b"a1 AUTHENTICATE LOGIN\r\n")
    d.feed(b"YWxpY2U=\r\n")
    d.feed(b"c2VjcmV0\r\n")
    assert d.lines()[:2] == [b"+ VXNlcm5hbWU6", b"+ UGFzc3dvcmQ6"]
    assert d.commands() == [Authenticate("LOGIN", "", "alice", "secret")]


@pytest.mark.parametrize(
    ("response", "text"),
    [(b"*", b"a1 BAD Authentication canceled"), (b"!!notbase64", b"a1 BAD Invalid base64"),
     (b"YWxpY2U=", b"a1 BAD Invalid PLAIN response")],
)  # fmt: skip
def test_authenticate_cancel_and_garbage(response: bytes, text: bytes) -> None:
    d = Driver.new(tls_active=True)
    d.feed(b"a1 AUTHENTICATE PLAIN\r\n" + response + b"\r\na2 NOOP\r\n")
    assert d.tagged("a1") == text
    assert d.tagged("a2") == b"a2 OK Completed"
    assert d.conn.state is State.NOT_AUTHENTICATED
    assert not any(isinstance(c, Authenticate) for c in d.commands())


def test_authenticate_unsupported_mechanism() -> None:
    d = Driver.new(tls_active=True)
    d.feed(b"a1 AUTHENTICATE CRAM-MD5\r\n")
    assert d.tagged("a1") == b"a1 NO Unsupported authentication mechanism"


def test_authenticate_failure_counts() -> None:
    d = Driver.new(
        tls_active=True,
        limits=ImapLimits(max_auth_failures=2),
        responder=lambda ev: [no("Failed", Code.AUTHENTICATIONFAILED)],
    )
    d.feed(b"a1 AUTHENTICATE PLAIN AGEAYg==\r\na2 AUTHENTICATE PLAIN AGEAYg==\r\n")
    assert d.conn.closing
    assert d.lines()[-1] == b"* BYE Too many authentication failures"


# ----------------------------------------------------------------------------- ENABLE, UTF-8


def test_enable_condstore_qresync_utf8() -> None:
    d = Driver.logged_in()
    d.feed(b"e1 ENABLE QRESYNC X-UNKNOWN utf8=accept\r\n")
    assert d.lines() == [b"* ENABLED QRESYNC UTF8=ACCEPT", b"e1 OK ENABLE completed"]
    assert d.conn.enabled == {"QRESYNC", "CONDSTORE", "UTF8=ACCEPT"}
    assert d.conn.qresync and d.conn.condstore and d.conn.utf8 and not d.conn.imap4rev2
    assert d.events == [Request("e1", Enable(("QRESYNC", "UTF8=ACCEPT")), answered=True)]


def test_enable_imap4rev2() -> None:
    d = Driver.logged_in()
    d.feed(b"e1 ENABLE IMAP4rev2\r\n")
    assert d.lines()[0] == b"* ENABLED IMAP4rev2"
    assert d.conn.imap4rev2 and d.conn.utf8


def test_enable_in_selected_state_is_bad() -> None:
    d = Driver.selected()
    d.feed(b"e1 ENABLE CONDSTORE\r\n")
    assert d.tagged("e1") == b"e1 BAD Command not valid in this state"
    assert not d.conn.condstore


def test_condstore_enabling_commands() -> None:
    d = Driver.selected()
    assert not d.conn.condstore
    d.feed(b"f1 FETCH 1 (FLAGS MODSEQ)\r\n")
    assert d.conn.condstore  # RFC 7162 3.1: FETCH MODSEQ enables CONDSTORE


def test_utf8_mailbox_names_after_enable() -> None:
    def responder(ev: Event) -> list[Tagged | Untagged]:
        return [list_mailbox("Entwürfe", "/"), ok()]

    d = Driver.logged_in(responder=responder)
    d.feed(b'l1 LIST "" Entw&APw-rfe\r\n')
    assert d.lines()[0] == b'* LIST () "/" "Entw&APw-rfe"'
    d.out.clear()
    d.feed(b"e1 ENABLE UTF8=ACCEPT\r\n")
    d.out.clear()
    d.feed('l2 LIST "" "Entwürfe"\r\n'.encode())
    assert d.lines()[0] == '* LIST () "/" "Entwürfe"'.encode()
    names = [c.patterns for c in d.commands() if hasattr(c, "patterns")]
    assert names == [("Entwürfe",), ("Entwürfe",)]


def test_utf8_accept_not_offered_when_disabled() -> None:
    d = Driver.logged_in(utf8_accept=False)
    d.feed(b"c CAPABILITY\r\ne ENABLE UTF8=ACCEPT\r\n")
    assert b"UTF8=ACCEPT" not in d.lines()[0]
    assert d.lines()[2] == b"* ENABLED"
    assert not d.conn.utf8


def test_qresync_select_needs_enable() -> None:
    d = Driver.logged_in()
    d.feed(b"s1 SELECT INBOX (QRESYNC (1 2))\r\n")
    assert d.tagged("s1") == b"s1 BAD QRESYNC is not enabled"
    d.feed(b"e ENABLE QRESYNC\r\ns2 SELECT INBOX (QRESYNC (1 2))\r\n")
    assert d.tagged("s2") == b"s2 OK Completed"


def test_uid_fetch_vanished_after_qresync() -> None:
    d = Driver.logged_in()
    d.feed(
        b"e ENABLE QRESYNC\r\ns SELECT INBOX\r\nf UID FETCH 1:* FLAGS (CHANGEDSINCE 4 VANISHED)\r\n"
    )
    fetches = [c for c in d.commands() if isinstance(c, Fetch)]
    assert fetches and fetches[0].vanished and fetches[0].changedsince == 4


# ----------------------------------------------------------------------------- engine answers


def test_id_answered_by_engine() -> None:
    d = Driver.new(server_id=(("name", "mailharbor"), ("vendor", "test")))
    d.feed(b'i ID ("name" "mutt")\r\n')
    assert d.lines()[1:] == [b'* ID ("name" "mailharbor" "vendor" "test")', b"i OK ID completed"]


def test_setquota_refused() -> None:
    d = Driver.logged_in()
    d.feed(b'q SETQUOTA "" (STORAGE 10)\r\n')
    assert d.tagged("q") == b"q NO [CANNOT] Quotas are set by the administrator"


def test_badcharset() -> None:
    d = Driver.selected()
    d.feed(b"s SEARCH CHARSET ISO-8859-1 ALL\r\n")
    assert d.tagged("s") == b"s NO [BADCHARSET (US-ASCII UTF-8)] Unsupported charset"


def test_unsolicited_untagged_between_commands() -> None:
    d = Driver.selected()
    assert d.conn.send(exists(9)) == b"* 9 EXISTS\r\n"
    d.feed(b"n NOOP\r\n")
    assert d.tagged("n") == b"n OK Completed"


def test_select_response_sequence() -> None:
    from mailharbor.proto.imap import flags, untagged_ok

    def responder(ev: Event) -> list[Tagged | Untagged]:
        return [
            flags(["\\Seen", "\\Deleted"]),
            exists(2),
            untagged_ok("UIDs valid", Code.uidvalidity(7)),
            untagged_ok("Predicted next UID", Code.uidnext(3)),
            ok("SELECT completed", Code.read_write()),
        ]

    d = Driver.logged_in(responder=responder)
    d.feed(b"s SELECT INBOX\r\n")
    assert d.lines() == [
        b"* FLAGS (\\Seen \\Deleted)",
        b"* 2 EXISTS",
        b"* OK [UIDVALIDITY 7] UIDs valid",
        b"* OK [UIDNEXT 3] Predicted next UID",
        b"s OK [READ-WRITE] SELECT completed",
    ]
    assert d.conn.state is State.SELECTED
