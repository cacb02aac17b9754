"""SMTP/LMTP engine: whole sessions (whole, byte by byte, with trailing bytes), every command."""

from __future__ import annotations

import base64
import random

import pytest

from mailharbor.proto.smtp import (
    NEED_DATA,
    PAUSED,
    AuthRequest,
    BdatChunk,
    ConnectionClosed,
    DataEnd,
    DataStart,
    Ehlo,
    Helo,
    MailFrom,
    Noop,
    ProtocolViolation,
    Quit,
    RcptTo,
    Reply,
    Rset,
    SmtpLimits,
    SmtpServerConfig,
    SmtpServerConnection,
    SmtpUsageError,
    State,
)

from .test_smtp_helpers import OK, Driver

SESSION = (
    b"EHLO client.test\r\n"
    b"MAIL FROM:<alice@a.test> SIZE=100 BODY=8BITMIME\r\n"
    b"RCPT TO:<bob@b.test>\r\n"
    b"RCPT TO:<nobody@b.test>\r\n"
    b"RCPT TO:<carol@b.test>\r\n"
    b"DATA\r\n"
    b"Subject: test\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"..two dots\r\n"
    b"last line\r\n"
    b".\r\n"
    b"QUIT\r\n"
)
EXPECTED_BODY = b"Subject: test\r\n\r\nleading dot\r\n.two dots\r\nlast line\r\n"


def test_full_session_whole() -> None:
    d = Driver.new().feed(SESSION)
    assert d.codes() == [220, 250, 250, 250, 550, 250, 354, 250, 221]
    assert d.message() == EXPECTED_BODY
    assert [type(e) for e in d.events if not type(e).__name__.startswith("Data")] == [
        Ehlo,
        MailFrom,
        RcptTo,
        RcptTo,
        RcptTo,
        Quit,
        ConnectionClosed,
    ]
    assert d.conn.closing


def test_full_session_byte_by_byte_and_random_splits() -> None:
    whole = Driver.new().feed(SESSION)
    bytewise = Driver.new().bytewise(SESSION)
    assert bytewise.out == whole.out
    assert bytewise.message() == EXPECTED_BODY
    rnd = random.Random(1)
    for _ in range(20):
        pieces = [rnd.randint(1, 17) for _ in range(len(SESSION))]
        d = Driver.new().feed(SESSION, pieces)
        assert d.out == whole.out
        assert d.message() == EXPECTED_BODY


def test_trailing_bytes_after_quit_are_ignored() -> None:
    d = Driver.new().feed(SESSION + b"MAIL FROM:<x@y.test>\r\ngarbage")
    assert d.codes()[-1] == 221
    assert len(d.of(MailFrom)) == 1
    d.conn.receive_data(b"RSET\r\n")
    assert d.conn.next_event() is NEED_DATA


def test_partial_command_waits() -> None:
    d = Driver.new().feed(b"EHLO client.test\r\nNOOP")
    assert d.codes() == [220, 250]
    d.feed(b"\r\n")
    assert d.codes() == [220, 250, 250]
    assert isinstance(d.events[-1], Noop)


def test_eof_closes() -> None:
    d = Driver.new().feed(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n")
    d.feed(b"DATA\r\npartial message\r\n")
    d.conn.receive_data(b"")
    d.pump()
    assert isinstance(d.events[-1], ConnectionClosed)
    assert not d.of(DataEnd)


def test_engine_pauses_until_reply_and_keeps_order() -> None:
    conn = SmtpServerConnection(SmtpServerConfig(hostname="mx.test"))
    conn.data_to_send()
    conn.receive_data(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nNOOP\r\nRCPT TO:<x@y.test>\r\n")
    assert isinstance(conn.next_event(), Ehlo)
    assert isinstance(conn.next_event(), MailFrom)
    assert conn.next_event() is PAUSED
    assert conn.next_event() is PAUSED
    out = conn.send(Reply(250, "2.1.0", "Sender ok"))
    assert out.startswith(b"250-mx.test\r\n") and out.endswith(b"250 2.1.0 Sender ok\r\n")
    assert isinstance(conn.next_event(), Noop)
    assert isinstance(conn.next_event(), RcptTo)
    assert conn.send(Reply(250, "2.1.5", "Ok")) == b"250 2.0.0 Ok\r\n250 2.1.5 Ok\r\n"
    assert conn.next_event() is NEED_DATA
    with pytest.raises(SmtpUsageError):
        conn.send(OK)


def test_pipelined_session_one_packet_with_rejected_mail() -> None:
    answers = iter([Reply(550, "5.7.1", "Sender refused")])

    def answer(ev: object) -> Reply:
        return next(answers) if isinstance(ev, MailFrom) else OK

    d = Driver.new()
    d.answer = answer
    d.feed(
        b"EHLO c.test\r\nMAIL FROM:<spam@x.test>\r\nRCPT TO:<a@b.test>\r\nDATA\r\n"
        b"this is a command\r\nRSET\r\n"
    )
    # MAIL refused: RCPT and DATA are bad sequence; the "message" is read as commands.
    assert d.codes() == [220, 250, 550, 503, 503, 500, 250]
    assert not d.of(DataStart)


def test_helo_and_no_extensions() -> None:
    d = Driver.new().feed(b"HELO c.test\r\n")
    assert d.lines()[-1] == b"250 mx.test"
    assert isinstance(d.events[0], Helo)


def test_ehlo_capabilities_and_tls_auth_advertising() -> None:
    d = Driver.new(tls_available=True, auth=True).feed(b"EHLO c.test\r\n")
    caps = [line[4:] for line in d.lines()[1:]]
    assert b"STARTTLS" in caps and not any(c.startswith(b"AUTH") for c in caps)
    for cap in (b"PIPELINING", b"SIZE 52428800", b"8BITMIME", b"SMTPUTF8", b"DSN", b"CHUNKING"):
        assert cap in caps
    assert b"ENHANCEDSTATUSCODES" in caps
    d.feed(b"STARTTLS\r\n").feed(b"EHLO c.test\r\n")
    lines = d.lines()
    last = max(i for i, line in enumerate(lines) if line == b"250-mx.test")
    caps = [line[4:] for line in lines[last:]]
    assert b"AUTH PLAIN LOGIN" in caps and b"STARTTLS" not in caps
    assert d.conn.tls_active
    d2 = Driver.new(auth=True, auth_without_tls=True, dsn=False).feed(b"EHLO c.test\r\n")
    caps = [line[4:] for line in d2.lines()[1:]]
    assert b"AUTH PLAIN LOGIN" in caps and b"DSN" not in caps


def test_commands_rset_noop_help_vrfy_expn_unknown() -> None:
    d = Driver.new().feed(
        b"NOOP\r\nHELP\r\nVRFY root\r\nVRFY\r\nEXPN staff\r\nFOO bar\r\nMAIL FROM:<a@b.test>\r\n"
        b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRSET\r\nRCPT TO:<a@b.test>\r\nrset\r\n"
    )
    assert d.codes() == [220, 250, 214, 252, 501, 502, 500, 503, 250, 250, 250, 503, 250]
    assert b"252 2.0.0" in bytes(d.out)
    assert len(d.of(Rset)) == 2
    assert d.conn.state is State.READY


def test_syntax_errors() -> None:
    d = Driver.new().feed(
        b"EHLO\r\nEHLO c.test\r\nMAIL TO:<a@b.test>\r\nMAIL FROM:a@b.test\r\n"
        b"MAIL FROM:<a@b.test> BOGUS=1\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<>\r\n"
        b"RCPT TO:<a@b.test>\r\nDATA extra\r\nQUIT now\r\n"
    )
    assert d.codes() == [220, 501, 250, 501, 501, 555, 250, 553, 250, 501, 501]
    assert b"501 5.5.4 Syntax: MAIL FROM:<address>" in bytes(d.out)


def test_mail_space_after_colon_and_postmaster() -> None:
    d = Driver.new().feed(
        b"EHLO c\r\nMAIL FROM: <a@b.test>\r\nRCPT TO:<Postmaster>\r\n"
        b"RCPT TO:<@r1,@r2.test:u@c.test>\r\n"
    )
    assert d.codes() == [220, 250, 250, 250, 250]
    assert [e.address for e in d.of(RcptTo)] == ["Postmaster", "u@c.test"]


def test_null_sender() -> None:
    d = Driver.new().feed(b"EHLO c\r\nMAIL FROM:<>\r\n")
    assert d.of(MailFrom)[0].address == ""


def test_smtputf8_addresses_only_when_declared() -> None:
    d = Driver.new().feed("EHLO c\r\nMAIL FROM:<jörg@b.test>\r\n".encode())
    assert d.codes()[-1] == 553
    d.feed("MAIL FROM:<jörg@b.test> SMTPUTF8\r\nRCPT TO:<用户@例子.广告>\r\n".encode())
    assert d.codes()[-2:] == [250, 250]
    assert d.of(MailFrom)[0].params.smtputf8
    d.feed("RSET\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<用户@例子.广告>\r\n".encode())
    assert d.codes()[-1] == 553
    d.feed(b"MAIL FROM:<\xff@b.test>\r\n")
    assert d.codes()[-1] == 500


def test_dsn_params() -> None:
    d = Driver.new().feed(
        b"EHLO c\r\nMAIL FROM:<a@b.test> RET=HDRS ENVID=QQ+2Bx+3D1 AUTH=<>\r\n"
        b"RCPT TO:<x@y.test> NOTIFY=SUCCESS,delay ORCPT=rfc822;x+2Bt@y.test\r\n"
        b"RCPT TO:<z@y.test> NOTIFY=NEVER\r\n"
        b"RCPT TO:<z@y.test> NOTIFY=NEVER,SUCCESS\r\n"
        b"RCPT TO:<z@y.test> ORCPT=rfc822\r\n"
        b"RCPT TO:<z@y.test> NOTIFY=SUCCESS,SUCCESS\r\n"
        b"RCPT TO:<z@y.test> ORCPT=rfc822;a+zz\r\n"
        b"RSET\r\nMAIL FROM:<a@b.test> RET=ALL\r\nMAIL FROM:<a@b.test> ENVID=a+4\r\n"
    )
    assert d.codes() == [220, 250, 250, 250, 250, 501, 501, 501, 501, 250, 501, 501]
    mail = d.of(MailFrom)[0]
    assert mail.params.ret == "HDRS" and mail.params.envid == "QQ+x=1"
    assert mail.params.auth == "<>"
    r1, r2 = d.of(RcptTo)
    assert r1.params.notify == frozenset({"SUCCESS", "DELAY"})
    assert r1.params.orcpt == ("rfc822", "x+t@y.test")
    assert r2.params.notify == frozenset({"NEVER"})
    # DSN not offered: its parameters are unknown.
    d2 = Driver.new(dsn=False).feed(b"EHLO c\r\nMAIL FROM:<a@b.test> RET=FULL\r\n")
    assert d2.codes()[-1] == 555


def test_size_param_over_limit() -> None:
    d = Driver.new(limits=SmtpLimits(max_message_size=1000))
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test> SIZE=1001\r\nMAIL FROM:<a@b.test> SIZE=1000\r\n")
    assert d.codes() == [220, 250, 552, 250]
    assert b"552 5.3.4" in bytes(d.out)


def test_bdat_chunks() -> None:
    body1, body2 = b"Subject: x\r\n\r\n.not stuffed\r\n", b"tail\n.\n"
    d = Driver.new().feed(
        b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n"
        + b"BDAT %d\r\n" % len(body1)
        + body1
        + b"BDAT %d LAST\r\n" % len(body2)
        + body2
        + b"QUIT\r\n"
    )
    assert d.codes() == [220, 250, 250, 250, 250, 250, 221]
    assert d.message() == body1 + body2
    assert [c.last for c in d.of(BdatChunk)] == [False, True]
    bytewise = Driver.new().bytewise(bytes(b"".join([b"EHLO c\r\n", b"MAIL FROM:<a@b.test>\r\n"])))
    bytewise.bytewise(b"RCPT TO:<x@y.test>\r\nBDAT 5 LAST\r\nRSET\r\nNOOP\r\n")
    assert bytewise.message() == b"RSET\r"
    assert bytewise.codes() == [220, 250, 250, 250, 250, 521]  # "\nNOOP" is a bare-LF line


def test_bdat_zero_last_and_data_after_bdat_refused() -> None:
    d = Driver.new().feed(
        b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n"
        b"BDAT 3\r\nabcDATA\r\nBDAT 0 LAST\r\n"
    )
    assert d.codes() == [220, 250, 250, 250, 250, 503, 250]
    assert d.message() == b"abc"


def test_bdat_out_of_sequence_consumes_its_bytes() -> None:
    d = Driver.new().feed(b"EHLO c\r\nBDAT 12\r\nRSET\r\nQUIT\r\nNOOP\r\n")
    assert d.codes() == [220, 250, 503, 250]
    assert not d.of(Quit) and not d.of(Rset)
    bad = Driver.new().feed(b"EHLO c\r\nBDAT x\r\nQUIT\r\n")
    assert bad.codes() == [220, 250, 501] and bad.conn.closing


def test_auth_plain_initial_response() -> None:
    token = base64.b64encode(b"\0alice\0secret").decode()
    d = Driver.new(auth=True, auth_without_tls=True)
    d.feed(f"EHLO c\r\nAUTH PLAIN {token}\r\nAUTH PLAIN {token}\r\n".encode())
    assert d.codes() == [220, 250, 235, 503]
    req = d.of(AuthRequest)[0]
    assert (req.mechanism, req.identity, req.password) == ("PLAIN", "alice", "secret")
    assert d.conn.authenticated == "alice"
    assert "secret" not in repr(req)


def test_auth_plain_continuation_and_failure() -> None:
    bad = base64.b64encode(b"admin\0alice\0wrong")
    d = Driver.new(auth=True, auth_without_tls=True).feed(b"EHLO c\r\nAUTH plain\r\n")
    assert d.lines()[-1] == b"334 "
    d.feed(bad + b"\r\n")
    assert d.codes()[-1] == 535
    assert d.of(AuthRequest)[0].authzid == "admin"
    assert d.conn.authenticated is None


def test_auth_login_both_steps_and_initial() -> None:
    u, p = base64.b64encode(b"alice"), base64.b64encode(b"secret")
    d = Driver.new(auth=True, auth_without_tls=True).feed(b"EHLO c\r\nAUTH LOGIN\r\n")
    assert d.lines()[-1] == b"334 VXNlcm5hbWU6"
    d.feed(u + b"\r\n")
    assert d.lines()[-1] == b"334 UGFzc3dvcmQ6"
    d.feed(p + b"\r\n")
    assert d.codes()[-1] == 235
    d2 = Driver.new(auth=True, auth_without_tls=True)
    d2.feed(b"EHLO c\r\nAUTH LOGIN " + u + b"\r\n" + p + b"\r\n")
    assert d2.codes() == [220, 250, 334, 235]


def test_auth_cancel_bad_base64_unknown_mechanism() -> None:
    d = Driver.new(auth=True, auth_without_tls=True).feed(
        b"EHLO c\r\nAUTH PLAIN\r\n*\r\nAUTH LOGIN\r\n!!!\r\nAUTH CRAM-MD5\r\nAUTH PLAIN *\r\n"
        b"AUTH PLAIN AGFsaWNl\r\nNOOP\r\n"
    )
    assert d.codes() == [220, 250, 334, 501, 334, 501, 504, 501, 501, 250]
    assert b"501 5.5.2" in bytes(d.out)
    assert not d.of(AuthRequest)


def test_auth_not_offered() -> None:
    d = Driver.new().feed(b"EHLO c\r\nAUTH PLAIN AGEAYg==\r\n")
    assert d.codes()[-1] == 503


def test_require_auth() -> None:
    d = Driver.new(auth=True, auth_without_tls=True, require_auth=True)
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    assert d.codes()[-1] == 530


def test_starttls_resets_session() -> None:
    d = Driver.new(tls_available=True).feed(b"EHLO c\r\nSTARTTLS\r\n")
    assert d.codes() == [220, 250, 220]
    assert d.conn.state is State.GREETED
    d.feed(b"MAIL FROM:<a@b.test>\r\nEHLO c\r\nSTARTTLS\r\n")
    assert d.codes()[-3:] == [503, 250, 502]


def test_starttls_not_available() -> None:
    assert Driver.new().feed(b"EHLO c\r\nSTARTTLS\r\n").codes()[-1] == 502


def test_lmtp_per_recipient_replies() -> None:
    d = Driver.new(lmtp=True)
    d.lmtp_answer = lambda n: [OK, Reply(452, "4.2.2", "Mailbox full")][:n]
    d.feed(
        b"LHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nRCPT TO:<nobody@y.test>\r\n"
        b"RCPT TO:<z@y.test>\r\nDATA\r\nhello\r\n.\r\nQUIT\r\n"
    )
    assert d.codes() == [220, 250, 250, 250, 550, 250, 354, 250, 452, 221]
    assert d.lines()[0] == b"220 mx.test LMTP"
    assert Driver.new(lmtp=True).feed(b"EHLO c\r\nHELO c\r\n").codes() == [220, 500, 500]
    assert Driver.new().feed(b"LHLO c\r\n").codes() == [220, 500]


def test_lmtp_reply_count_checked() -> None:
    conn = SmtpServerConnection(SmtpServerConfig(hostname="mx"), lmtp=True)
    conn.receive_data(b"LHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<a@b.test>\r\nDATA\r\n.\r\n")
    assert isinstance(conn.next_event(), Ehlo)
    assert isinstance(conn.next_event(), MailFrom)
    conn.send(OK)
    assert isinstance(conn.next_event(), RcptTo)
    conn.send(OK)
    assert isinstance(conn.next_event(), DataStart)
    assert isinstance(conn.next_event(), DataEnd)
    with pytest.raises(SmtpUsageError):
        conn.send(OK)
    with pytest.raises(SmtpUsageError):
        conn.send_lmtp_replies([OK, OK])
    assert conn.send_lmtp_replies([OK]).endswith(b"250 2.0.0 Ok\r\n")


def test_lmtp_bdat_last_gets_per_recipient_replies() -> None:
    d = Driver.new(lmtp=True).feed(
        b"LHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nBDAT 2 LAST\r\nhi"
    )
    assert d.codes() == [220, 250, 250, 250, 250, 250, 250]


def test_reply_formatting_and_sanitising() -> None:
    assert Reply(250, "2.0.0", "a\nb").to_bytes() == b"250-2.0.0 a\r\n250 2.0.0 b\r\n"
    # Every line carries the code: application text cannot forge a reply.
    assert Reply(550, "", "x\r\n250 ok\x00é").to_bytes() == b"550-x\r\n550 250 ok ?\r\n"
    assert Reply(334).to_bytes() == b"334 \r\n"
    with pytest.raises(ValueError):
        Reply(250, "5.0.0", "mismatch")
    with pytest.raises(ValueError):
        Reply(99)


def test_app_421_closes() -> None:
    d = Driver.new()
    d.answer = lambda ev: Reply(421, "4.3.0", "Shutting down")
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nNOOP\r\n")
    assert d.codes() == [220, 250, 421]
    assert d.conn.closing and isinstance(d.events[-1], ConnectionClosed)


def test_protocol_violation_events_carry_reply() -> None:
    d = Driver.new().feed(b"BLAH\r\n")
    (ev,) = d.of(ProtocolViolation)
    assert ev.reply.code == 500 and not ev.closing


def test_address_syntax() -> None:
    d = Driver.new().feed(
        b'EHLO c\r\nMAIL FROM:<"a b>c"@d.test>\r\n'
        b"RCPT TO:<x@[192.0.2.1]>\r\nRCPT TO:<x@[IPv6:2001:db8::1]>\r\n"
        b"RCPT TO:<" + b"l" * 65 + b"@d.test>\r\nRCPT TO:<a..b@d.test>\r\n"
        b"RCPT TO:<a@-d.test>\r\nRCPT TO:<a@[300.1.1.1]>\r\nRCPT TO:<a@b.test\r\n"
        b"RCPT TO:<a@b.test>x\r\nRCPT TO:<@r:>\r\n"
    )
    assert d.codes() == [220, 250, 250, 250, 250, 553, 553, 553, 553, 501, 501, 553]
    assert d.of(MailFrom)[0].address == '"a b>c"@d.test'
