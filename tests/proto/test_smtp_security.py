"""Named regressions: SMTP smuggling, STARTTLS injection, limits, AUTH before TLS."""

from __future__ import annotations

import pytest

from mailharbor.proto.smtp import (
    AuthFailures,
    BareNewline,
    DataAborted,
    DataChunk,
    DataEnd,
    MailFrom,
    ProtocolViolation,
    Rset,
    SmtpLimits,
    StartTls,
    address_key,
)

from .test_smtp_helpers import Driver

PREFIX = b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n"
SMUGGLED = b"MAIL FROM:<admin@bank.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\nevil\r\n.\r\n"


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n", b"\n..\n"],
    ids=["LF.LF", "CR.CR", "LF.CRLF", "CRLF.LF", "CRLF.CR", "CR.CRLF", "LF..LF"],
)
@pytest.mark.parametrize("mode", list(BareNewline))
def test_smtp_smuggling_never_splits_the_message(fake_end: bytes, mode: BareNewline) -> None:
    stream = PREFIX + b"Subject: hi\r\n\r\nbody" + fake_end + SMUGGLED + b"QUIT\r\n"
    for d in (Driver.new(bare_newline=mode).feed(stream), Driver.new(bare_newline=mode)):
        if not d.events:
            d.bytewise(stream)
        mails = d.of(MailFrom)
        assert len(mails) == 1, "a second transaction was smuggled"
        ends = d.of(DataEnd)
        assert len(ends) <= 1
        if b"\n" in fake_end.replace(b"\r\n", b"") and mode is BareNewline.STRICT:
            # Bare LF: 521 and disconnect, no message.
            assert not ends and d.conn.closing
            assert b"521 5.5.2 Error: bare <LF> received\r\n" in bytes(d.out)
        else:
            # The whole rest is one message, ended by the smuggled payload's own CRLF.CRLF.
            assert len(ends) == 1
            assert b"admin@bank.test" in d.message()


def test_bare_cr_is_kept_as_data() -> None:
    d = Driver.new().feed(PREFIX + b"a\rb\r.\r\rc\r\n.\r\n")
    assert d.message() == b"a\rb\r.\r\rc\r\n"
    assert len(d.of(DataEnd)) == 1


def test_normal_mode_accepts_bare_lf_lines_as_crlf() -> None:
    d = Driver.new(bare_newline=BareNewline.NORMAL)
    d.feed(b"EHLO c\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\nline1\nline2\r\n.\r\n")
    assert d.message() == b"line1\r\nline2\r\n"
    assert len(d.of(DataEnd)) == 1


def test_bare_lf_in_command_strict() -> None:
    d = Driver.new().feed(b"EHLO c\nNOOP\r\n")
    assert d.codes() == [220, 521] and d.conn.closing


def test_bare_cr_in_command_is_not_a_line_end() -> None:
    d = Driver.new().feed(b"EHLO c\r\nRSET\rMAIL FROM:<a@b.test>\r\n")
    assert d.codes() == [220, 250, 500]
    assert not d.of(Rset) and not d.of(MailFrom)


def test_starttls_command_injection_discarded() -> None:
    d = Driver.new(tls_available=True)
    d.tls_on_starttls = False
    d.feed(b"EHLO c\r\nSTARTTLS\r\nRSET\r\nMAIL FROM:<evil@x.test>\r\n")
    assert d.codes() == [220, 250, 220]
    assert isinstance(d.events[-1], StartTls)
    d.feed(b"NOOP\r\n")  # still plaintext bytes before the handshake: discarded too
    d.conn.starttls_done()
    d.feed(b"EHLO c\r\n")
    assert not d.of(Rset) and not d.of(MailFrom)
    assert d.codes() == [220, 250, 220, 250]


def test_too_long_line_discarded_without_buffering() -> None:
    d = Driver.new(limits=SmtpLimits(max_line_length=100))
    d.feed(b"EHLO c\r\nNOOP " + b"x" * 50)
    for _ in range(100):
        d.feed(b"y" * 1000)
        assert len(d.conn._in) <= 100
    d.feed(b"\r\nNOOP\r\n")
    assert d.codes() == [220, 250, 500, 250]
    assert b"500 5.5.2 Error: line too long" in bytes(d.out)
    # Just at the limit (CRLF included) is fine.
    ok = Driver.new(limits=SmtpLimits(max_line_length=100)).feed(b"NOOP " + b"x" * 93 + b"\r\n")
    assert ok.codes() == [220, 250]


def test_too_many_recipients() -> None:
    d = Driver.new(limits=SmtpLimits(max_recipients=3)).feed(
        b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n" + b"RCPT TO:<x@y.test>\r\n" * 5
    )
    assert d.codes() == [220, 250, 250, 250, 250, 250, 452, 452]
    assert b"452 4.5.3" in bytes(d.out)


def test_bad_command_budget() -> None:
    d = Driver.new(limits=SmtpLimits(max_bad_commands=5)).feed(b"BOGUS\r\n" * 10)
    assert d.codes() == [220, 500, 500, 500, 500, 500, 421]
    assert d.conn.closing
    assert d.of(ProtocolViolation)[-1].closing


def test_auth_before_tls_refused_on_submission() -> None:
    d = Driver.new(tls_available=True, require_tls=True, auth=True)
    d.feed(b"EHLO c\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<a@b.test>\r\n")
    assert d.codes() == [220, 250, 530, 530]
    assert b"AUTH" not in bytes(d.out).split(b"530")[0]
    d.feed(b"STARTTLS\r\n").feed(b"EHLO c\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    assert d.codes()[-1] == 235
    # Non-submission with TLS available: AUTH still only after TLS.
    d2 = Driver.new(tls_available=True, auth=True).feed(b"EHLO c\r\nAUTH PLAIN AGEAYg==\r\n")
    assert d2.codes()[-1] == 530


def test_commands_before_tls_limit() -> None:
    d = Driver.new(
        tls_available=True, require_tls=True, limits=SmtpLimits(max_commands_before_tls=3)
    )
    d.feed(b"NOOP\r\n" * 5)
    assert d.codes() == [220, 250, 250, 250, 421] and d.conn.closing


@pytest.mark.parametrize("bytewise", [False, True])
def test_oversize_message_read_and_discarded(bytewise: bool) -> None:
    d = Driver.new(limits=SmtpLimits(max_message_size=100, data_chunk_size=64))
    body = (b"x" * 30 + b"\r\n") * 20 + b".\r\nNOOP\r\n"
    d.feed(PREFIX)
    if bytewise:
        d.bytewise(body)
    else:
        d.feed(body)
    assert d.codes() == [220, 250, 250, 250, 354, 552, 250]
    assert b"552 5.3.4" in bytes(d.out)
    assert d.of(DataAborted) and not d.of(DataEnd)
    assert len(d.message()) <= 100


def test_oversize_bdat_then_further_chunks_consumed() -> None:
    d = Driver.new(limits=SmtpLimits(max_message_size=10)).feed(
        b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n"
        b"BDAT 20\r\nQUIT\r\nQUIT\r\nQUIT\r\nQUBDAT 6 LAST\r\nQUIT\r\nNOOP\r\n"
    )
    assert d.codes() == [220, 250, 250, 250, 552, 503, 250]


def test_large_message_streams_in_bounded_chunks() -> None:
    d = Driver.new(limits=SmtpLimits(data_chunk_size=4096)).feed(PREFIX)
    line = b"y" * 100_000  # one enormous line, no CRLF yet
    for _ in range(10):
        d.feed(line)
        assert len(d.conn._in) < 8192
    d.feed(b"\r\n.\r\n")
    chunks = d.of(DataChunk)
    assert max(len(c.data) for c in chunks) <= 4096 + 4096
    assert d.message() == line * 10 + b"\r\n"


def test_auth_failures_delay_and_lockout() -> None:
    now = [0.0]
    af = AuthFailures(lambda: now[0], base_delay=1, max_delay=8, lockout_threshold=5, lockout=60)
    assert af.delay("192.0.2.1") == 0 and not af.locked_out("192.0.2.1")
    for expected in (1, 2, 4, 8):
        af.record_failure("192.0.2.1")
        assert af.delay("192.0.2.1") == expected
    af.record_failure("192.0.2.1")
    assert af.locked_out("192.0.2.1") and af.delay("192.0.2.1") == 8
    assert not af.locked_out("192.0.2.2")
    now[0] = 61
    assert not af.locked_out("192.0.2.1")
    af.record_success("192.0.2.1")
    assert af.failures("192.0.2.1") == 0
    af.record_failure("2001:db8::1")
    assert af.failures("2001:db8::ffff") == 1  # same /64
    assert address_key("::ffff:192.0.2.9") == "192.0.2.9"
    now[0] = 10_000
    assert af.failures("2001:db8::1") == 0  # forgotten after the window


def test_auth_failures_memory_bounded() -> None:
    af = AuthFailures(lambda: 0.0, max_addresses=10)
    for i in range(100):
        af.record_failure(f"10.0.0.{i}")
    assert len(af._entries) == 10
    assert af.failures("10.0.0.99") == 1 and af.failures("10.0.0.0") == 0
