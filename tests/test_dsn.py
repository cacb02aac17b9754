"""RFC 3464 bounces: structure, fields, RET=FULL/HDRS, sanitizing of remote text."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, MIMEPart

import pytest

from mailharbor.service.dsn import FULL_RETURN_LIMIT, DsnRecipient, build_dsn

pytestmark = pytest.mark.timeout(30)

ORIGINAL = (
    b"From: alice@local.test\r\nTo: bob@remote.test\r\nSubject: hello\r\n"
    b"Message-ID: <m1@local.test>\r\n\r\nbody line\r\n.dot line\r\n"
)


def _dsn(ret: str | None = None, original: bytes = ORIGINAL, diag: str = "550 5.1.1 no") -> bytes:
    return build_dsn(
        reporting_mta="mail.local.test",
        original_sender="alice@local.test",
        recipients=[
            DsnRecipient(
                "bob@remote.test",
                "failed",
                "5.1.1",
                diag,
                "mx.remote.test",
                original_recipient="rfc822;bob@remote.test",
            )
        ],
        original=original,
        arrival_ms=1_700_000_000_000,
        now_ms=1_700_000_100_000,
        ret=ret,
        envid="ENV-1",
        token="abc123",
    )


def _parts(raw: bytes) -> tuple[EmailMessage, list[MIMEPart]]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    return msg, parts


def test_structure_and_fields() -> None:
    raw = _dsn()
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert b"\n" not in raw.replace(b"\r\n", b"")
    msg, parts = _parts(raw)
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@mail.local.test"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    status = parts[1].as_bytes().decode()
    for needle in (
        "Reporting-MTA: dns; mail.local.test",
        "Original-Envelope-Id: ENV-1",
        "Arrival-Date: ",
        "Final-Recipient: rfc822; bob@remote.test",
        "Original-Recipient: rfc822;bob@remote.test",
        "Action: failed",
        "Status: 5.1.1",
        "Remote-MTA: dns; mx.remote.test",
        "Diagnostic-Code: smtp; 550 5.1.1 no",
    ):
        assert needle in status, needle
    headers = parts[2].as_bytes()
    assert b"Subject: hello" in headers and b"body line" not in headers


def test_ret_full_returns_the_message_unless_too_large() -> None:
    _, parts = _parts(_dsn("FULL"))
    assert parts[2].get_content_type() == "message/rfc822"
    assert b"body line" in parts[2].as_bytes()
    big = ORIGINAL + b"x" * (FULL_RETURN_LIMIT + 1) + b"\r\n"
    _, parts = _parts(_dsn("FULL", big))
    assert parts[2].get_content_type() == "text/rfc822-headers"


def test_remote_text_is_sanitized() -> None:
    raw = _dsn(diag="550 evil\r\nInjected: yes\x00 \xe9")
    assert b"\r\nInjected: yes" not in raw
    assert raw.isascii()
