"""Delivery status notifications: RFC 3464 ``multipart/report`` bounces (RFC 6522).

Theory of operation
-------------------
:func:`build_dsn` turns recipients of one message into the bytes of a report: a human-readable
``text/plain`` part, a ``message/delivery-status`` part (Reporting-MTA, Original-Envelope-Id,
Arrival-Date; per recipient Final-Recipient, Original-Recipient, Action, Status, Remote-MTA,
Diagnostic-Code, Last-Attempt-Date, Will-Retry-Until for ``delayed``), and the original message
(``message/rfc822``, RET=FULL) or only its header (``text/rfc822-headers``, RET=HDRS — the
default, and the fallback when the message is larger than :data:`FULL_RETURN_LIMIT`).

One report is of one kind, chosen from its recipients' actions: a *failure* report (any
``failed``: "Undelivered Mail Returned to Sender"), a *delay* warning (``delayed``: "Delayed
Mail (still being retried)") or a *success* report (``delivered``, ``relayed``, ``expanded``:
"Successful Mail Delivery Report"). The callers send the three kinds separately, as Postfix
does, and pass ``ret`` only for failures (delay and success reports carry the header only).

The caller (the queue runner) sends it from ``MAILER-DAEMON@<hostname>`` with the null reverse
path ``<>`` and decides where it goes (local INBOX or the queue); a DSN about a message whose
reverse path is null is never built (a bounce is never bounced).

Invariants
----------
- The output is 7-bit-clean except inside the returned original message (which then is marked
  ``8bit``); every line ends in CRLF and is at most 998 octets; text from remote servers is
  reduced to printable ASCII before it goes into a header field.
- ``build_dsn`` is pure: time, host name and the boundary/Message-ID randomness are arguments.
"""

from __future__ import annotations

import email.utils
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["FULL_RETURN_LIMIT", "DsnRecipient", "build_dsn", "header_block", "sanitize"]

#: Originals larger than this are returned as headers only (Postfix's bounce_size_limit).
FULL_RETURN_LIMIT = 50_000

_MAX_FIELD = 900


def sanitize(text: str, limit: int = _MAX_FIELD) -> str:
    """``text`` as one line of printable ASCII (others become '?'), at most ``limit`` chars."""
    line = " ".join(text.split())
    out = "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in line)
    return out[:limit]


@dataclass(frozen=True, slots=True)
class DsnRecipient:
    """One recipient's line in the report. ``action`` is ``failed``, ``delayed``,
    ``delivered``, ``relayed`` or ``expanded`` (RFC 3464 2.3.3); ``status`` an enhanced status
    code (``5.1.1``, ``4.4.1``, ``2.0.0``); ``diagnostic`` the remote reply
    (``550 5.1.1 no such user``) or a local explanation; ``remote_mta`` the host that answered
    (empty if none did)."""

    address: str
    action: str
    status: str
    diagnostic: str
    remote_mta: str = ""
    original_recipient: str = ""
    smtp_diagnostic: bool = True  # Diagnostic-Code type: smtp (a reply) or x-local


def header_block(message: bytes) -> bytes:
    """The header section of ``message`` (without the blank line), CRLF line ends."""
    end = -1
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = message.find(sep)
        if i >= 0 and (end < 0 or i < end):
            end = i
    head = message if end < 0 else message[:end]
    return b"\r\n".join(head.replace(b"\r\n", b"\n").split(b"\n"))


def _crlf(data: bytes) -> bytes:
    return b"\r\n".join(data.replace(b"\r\n", b"\n").split(b"\n"))


def build_dsn(
    *,
    reporting_mta: str,
    original_sender: str,
    recipients: Sequence[DsnRecipient],
    original: bytes,
    arrival_ms: int,
    now_ms: int,
    ret: str | None = None,
    envid: str | None = None,
    token: str,
    will_retry_until_ms: int | None = None,
) -> bytes:
    """The bytes of an RFC 3464 report (see the module doc). ``token`` is a unique string
    (hex) used for the MIME boundary and the Message-ID."""
    host = sanitize(reporting_mta)
    boundary = f"=_mailharbor_dsn_{token}"
    failed = any(r.action == "failed" for r in recipients)
    delayed = not failed and any(r.action == "delayed" for r in recipients)
    if failed:
        subject = "Undelivered Mail Returned to Sender"
    elif delayed:
        subject = "Delayed Mail (still being retried)"
    else:
        subject = "Successful Mail Delivery Report"
    date = email.utils.formatdate(now_ms / 1000, localtime=False)
    arrival = email.utils.formatdate(arrival_ms / 1000, localtime=False)
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{sanitize(original_sender)}>",
        f"Subject: {subject}",
        f"Date: {date}",
        f"Message-ID: <dsn.{token}@{host}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Description: Notification",
        "",
        f"This is the mail system at host {host}.",
        "",
    ]
    if failed:
        head += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
        ]
    elif delayed:
        head += [
            "Your message could not be delivered yet to one or more recipients.",
            "The mail system will keep trying; you do not need to send it again.",
        ]
    else:
        head += [
            "Your message was successfully delivered to the destination(s) listed",
            "below. If it was relayed to a system that does not return delivery",
            "reports, you will receive no further notifications from there.",
        ]
    head.append("")
    for r in recipients:
        head.append(f"<{sanitize(r.address)}>: {sanitize(r.diagnostic, 500)}")
    head += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        f"Reporting-MTA: dns; {host}",
    ]
    if envid:
        head.append(f"Original-Envelope-Id: {sanitize(envid, 100)}")
    head.append(f"Arrival-Date: {arrival}")
    for r in recipients:
        head.append("")
        if r.original_recipient:
            head.append(f"Original-Recipient: {sanitize(r.original_recipient)}")
        head.append(f"Final-Recipient: rfc822; {sanitize(r.address)}")
        head.append(f"Action: {r.action}")
        head.append(f"Status: {r.status}")
        if r.remote_mta:
            head.append(f"Remote-MTA: dns; {sanitize(r.remote_mta)}")
        kind = "smtp" if r.smtp_diagnostic else "x-local"
        head.append(f"Diagnostic-Code: {kind}; {sanitize(r.diagnostic)}")
        head.append(f"Last-Attempt-Date: {date}")
        if r.action == "delayed" and will_retry_until_ms is not None:
            until = email.utils.formatdate(will_retry_until_ms / 1000, localtime=False)
            head.append(f"Will-Retry-Until: {until}")
    head.append("")
    full = (ret or "").upper() == "FULL" and len(original) <= FULL_RETURN_LIMIT
    head.append(f"--{boundary}")
    if full:
        eight_bit = any(b > 0x7F for b in original)
        head.append("Content-Type: message/rfc822")
        head.append("Content-Description: " + ("Undelivered Message" if failed else "Message"))
        if eight_bit:
            head.append("Content-Transfer-Encoding: 8bit")
        body = _crlf(original)
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
    else:
        head.append("Content-Type: text/rfc822-headers")
        head.append(
            "Content-Description: "
            + ("Undelivered Message Headers" if failed else "Message Headers")
        )
        body = header_block(original) + b"\r\n"
        if any(b > 0x7F for b in body):
            head.append("Content-Transfer-Encoding: 8bit")
    head.append("")
    out = "\r\n".join(head).encode("ascii") + b"\r\n" + body
    out += f"\r\n--{boundary}--\r\n".encode("ascii")
    return out
