"""Named regressions for known attacks on IMAP servers: literal overflow, commands before
authentication, STARTTLS command injection, line floods."""

from __future__ import annotations

import pytest

from mailharbor.proto.imap import (
    Append,
    ImapLimits,
    Login,
    Logout,
    Request,
    StartTls,
    State,
)

from .test_imap_helpers import Driver

LIMITS = ImapLimits(max_line_length=1024, max_literal=2048, max_literal_before_auth=64)
#: A literal whose content is a command line: must never run.
FAKE = b"x LOGOUT\r\ny DELETE INBOX\r\n"


def _no_fake_command_ran(d: Driver) -> None:
    assert not any(isinstance(c, Logout) for c in d.commands())
    assert not any(b"LOGOUT completed" in ln for ln in d.lines())
    assert all(type(c).__name__ != "Delete" for c in d.commands())


# ----------------------------------------------------------------------------- literal overflow


@pytest.mark.parametrize("bytewise", [False, True])
def test_literal_overflow_sync_refused_without_continuation(bytewise: bool) -> None:
    """An over-limit synchronising literal: NO [TOOBIG] at once, no "+" (the client, waiting
    for "+", never sends the literal) and the session goes on."""
    d = Driver.logged_in(limits=LIMITS)
    wire = b"A1 APPEND INBOX {4096}\r\n"
    d.bytewise(wire) if bytewise else d.feed(wire)
    assert d.lines() == [b"A1 NO [TOOBIG] Message too big"]
    assert d.commands() == []
    d.feed(b"A2 NOOP\r\n")
    assert d.tagged("A2") == b"A2 OK Completed"


@pytest.mark.parametrize("cuts", [[], [30], [30, 5, 5]])
def test_literal_overflow_sync_content_sent_anyway_is_never_executed(cuts: list[int]) -> None:
    """A client that sends the over-limit literal without waiting for "+" (its first octets
    arrive with the command line): the content (a fake command line) is not read as commands;
    the session is closed instead."""
    d = Driver.logged_in(limits=LIMITS)
    content = FAKE + b"z" * (4096 - len(FAKE))
    d.feed(b"A1 APPEND INBOX {4096}\r\n" + content, cuts=cuts)
    _no_fake_command_ran(d)
    assert d.lines()[0] == b"A1 NO [TOOBIG] Message too big"
    assert b"+ Ready" not in bytes(d.out)
    assert d.conn.closing
    assert d.lines()[-1] == b"* BYE Literal sent without waiting for a continuation"


@pytest.mark.parametrize("bytewise", [False, True])
def test_literal_overflow_literal_plus_closes_and_never_executes_content(bytewise: bool) -> None:
    """LITERAL+ (RFC 7888) over the limit: the octets come regardless, so the engine answers
    BAD [TOOBIG], says BYE and stops reading — the content never runs as a command."""
    d = Driver.logged_in(limits=LIMITS)
    wire = b"A1 APPEND INBOX {4096+}\r\n" + FAKE * 200
    d.bytewise(wire[:600]) if bytewise else d.feed(wire)
    assert d.lines() == [
        b"A1 BAD [TOOBIG] Literal too big",
        b"* BYE Cannot skip a non-synchronising literal",
    ]
    assert d.conn.closing
    _no_fake_command_ran(d)
    assert d.max_buffered <= LIMITS.max_line_length + LIMITS.max_literal + 4096


def test_literal_within_limit_containing_commands_is_data() -> None:
    d = Driver.logged_in(limits=LIMITS)
    d.feed(b"A1 APPEND INBOX {%d+}\r\n" % len(FAKE) + FAKE + b"\r\n")
    assert d.commands() == [Append("INBOX", (), None, FAKE)]
    _no_fake_command_ran(d)


def test_literals_add_up_per_command() -> None:
    d = Driver.new(allow_plaintext_auth=True, limits=LIMITS)
    d.feed(b"L LOGIN {40}\r\n" + b"u" * 40 + b" {40}\r\n")
    assert d.lines()[-1] == b"L BAD [TOOBIG] Literal too big"  # 80 > 64 before login
    assert d.commands() == []


def test_pre_auth_literal_limit_is_small() -> None:
    d = Driver.new(allow_plaintext_auth=True, limits=LIMITS)
    d.out.clear()
    d.feed(b"L LOGIN {65+}\r\n" + FAKE * 3)
    assert d.lines() == [
        b"L BAD [TOOBIG] Literal too big",
        b"* BYE Cannot skip a non-synchronising literal",
    ]
    _no_fake_command_ran(d)


# ----------------------------------------------------------------------------- before login


@pytest.mark.parametrize(
    "line",
    [
        b"c1 SELECT INBOX", b"c1 EXAMINE INBOX", b"c1 FETCH 1:* (BODY[])", b"c1 LIST \"\" *",
        b"c1 STATUS INBOX (MESSAGES)", b"c1 DELETE INBOX", b"c1 CREATE x", b"c1 RENAME a b",
        b"c1 UID FETCH 1 BODY[]", b"c1 ENABLE CONDSTORE", b"c1 IDLE", b"c1 NAMESPACE",
        b"c1 GETQUOTAROOT INBOX", b"c1 EXPUNGE", b"c1 CLOSE", b"c1 SUBSCRIBE x",
    ],
)  # fmt: skip
def test_commands_before_authentication_are_refused(line: bytes) -> None:
    d = Driver.new(allow_plaintext_auth=True)
    d.out.clear()
    d.feed(line + b"\r\n")
    assert d.lines() == [b"c1 BAD Log in first"]
    assert d.commands() == []
    assert d.conn.state is State.NOT_AUTHENTICATED
    d.feed(b"c2 NOOP\r\n")
    assert d.tagged("c2") == b"c2 OK Completed"  # the connection lives on


def test_append_before_authentication_does_not_invite_the_literal() -> None:
    d = Driver.new(allow_plaintext_auth=True)
    d.out.clear()
    d.feed(b"c1 APPEND INBOX {10}\r\n")
    assert d.lines() == [b"c1 BAD Log in first"]
    assert d.conn.state is State.NOT_AUTHENTICATED and not d.conn.closing


def test_login_before_tls_refused_and_password_literal_not_invited() -> None:
    d = Driver.new(tls_available=True)
    d.out.clear()
    d.feed(b"a1 LOGIN alice secret\r\na2 LOGIN alice {6}\r\n")
    assert d.lines() == [
        b"a1 NO [PRIVACYREQUIRED] Plaintext authentication is disabled, use STARTTLS",
        b"a2 NO [PRIVACYREQUIRED] Plaintext authentication is disabled, use STARTTLS",
    ]
    assert d.commands() == []


def test_authenticate_before_tls_refused() -> None:
    d = Driver.new(tls_available=True)
    d.out.clear()
    d.feed(b"a1 AUTHENTICATE PLAIN AGEAYg==\r\n")
    assert d.lines() == [
        b"a1 NO [PRIVACYREQUIRED] Plaintext authentication is disabled, use STARTTLS"
    ]
    assert d.conn.state is State.NOT_AUTHENTICATED


# ----------------------------------------------------------------------------- STARTTLS


def test_starttls_command_injection_discarded() -> None:
    """CVE-2011-0411: a command pipelined after STARTTLS in the same packet (by a MITM, in
    plaintext) must not be executed after the TLS handshake."""
    d = Driver.new(tls_available=True, allow_plaintext_auth=True)
    d.out.clear()
    d.feed(b"t1 STARTTLS\r\nt2 LOGIN mallory pw\r\nt3 SELECT INBOX\r\n")
    assert d.lines() == [b"t1 OK Begin TLS negotiation now"]
    assert d.events == [Request("t1", StartTls(), answered=True)]
    d.feed(b"t4 LOGIN mallory pw\r\n")  # still before the handshake: ignored too
    d.conn.starttls_done()
    d.pump()
    assert not any(isinstance(c, Login) for c in d.commands())
    assert d.conn.state is State.NOT_AUTHENTICATED and d.conn.tls_active
    d.out.clear()
    d.feed(b"t5 CAPABILITY\r\n")
    assert b"STARTTLS" not in d.lines()[0] and b"AUTH=PLAIN" in d.lines()[0]


def test_starttls_when_tls_active_is_bad() -> None:
    d = Driver.new(tls_available=True, tls_active=True)
    d.feed(b"t1 STARTTLS\r\n")
    assert d.tagged("t1") == b"t1 BAD TLS is not available"


def test_starttls_after_login_is_bad() -> None:
    d = Driver.logged_in(tls_available=True)
    d.feed(b"t1 STARTTLS\r\n")
    assert d.tagged("t1") == b"t1 BAD Command not valid in this state"


# ----------------------------------------------------------------------------- floods


def test_too_long_line_discarded_with_bounded_memory() -> None:
    d = Driver.logged_in(limits=LIMITS)
    d.feed(b"a1 NOOP " + b"x" * 100_000 + b"\r\na2 NOOP\r\n", cuts=[500] * 200)
    assert d.tagged("a1") == b"a1 BAD Command line too long"
    assert d.tagged("a2") == b"a2 OK Completed"
    assert d.max_buffered <= LIMITS.max_line_length + 500


def test_too_long_line_ending_in_literal_plus_closes() -> None:
    d = Driver.logged_in(limits=LIMITS)
    d.feed(b"a1 APPEND INBOX " + b"x" * 2000 + b" {30+}\r\n" + FAKE)
    assert d.conn.closing
    _no_fake_command_ran(d)


def test_literal_marker_split_across_reads_still_frames() -> None:
    d = Driver.logged_in(limits=LIMITS)
    d.feed(b"A1 APPEND INBOX {" + b"%d" % len(FAKE), cuts=[1] * 40)
    d.feed(b"+}\r\n" + FAKE + b"\r\n")
    assert d.commands() == [Append("INBOX", (), None, FAKE)]
    _no_fake_command_ran(d)


def test_exception_text_never_on_the_wire() -> None:
    d = Driver.logged_in()
    d.feed(b"a1 FETCH 99999999999999999999 FLAGS\r\na2 SELECT &&&\r\na3 LOGIN \xff\r\n")
    for line in d.lines():
        assert b"Error" not in line and b"Traceback" not in line and b"'" not in line
