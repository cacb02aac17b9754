"""Tests of mailharbor.service.mime: ENVELOPE/BODYSTRUCTURE parsing, rendering, sections, and
the binary metadata format.

The corpus is built here. Expected IMAP strings were checked by hand against RFC 3501 section
7.4.2 (and the examples there); the RFC's own ENVELOPE and BODYSTRUCTURE examples are reproduced
exactly by constructing messages with the same headers, sizes and line counts.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailharbor.service import mime
from mailharbor.service.mime import (
    MAX_DEPTH,
    MAX_PARTS,
    BodyPart,
    MessageMeta,
    bodystructure_imap,
    decode_meta,
    encode_meta,
    envelope_imap,
    parse_message,
    section_bytes,
    section_range,
)

# -- helpers -----------------------------------------------------------------------------------


def crlf(text: str) -> bytes:
    """Test messages are written with LF; convert to the CRLF of the wire."""
    return text.encode("utf-8").replace(b"\n", b"\r\n")


def walk(p: BodyPart) -> Iterator[BodyPart]:
    yield p
    for c in p.children:
        yield from walk(c)


def check_invariants(meta: MessageMeta) -> None:
    """The module's offset and shape invariants."""

    def check(p: BodyPart, lo: int, hi: int, depth: int) -> None:
        assert depth <= MAX_DEPTH
        assert lo <= p.header_start <= p.body_start <= p.body_end <= hi
        if p.envelope is not None:
            assert p.type == b"MESSAGE" and p.subtype in (b"RFC822", b"GLOBAL")
            assert len(p.children) == 1
            c = p.children[0]
            assert c.header_start == p.body_start and c.body_end == p.body_end
            check(c, p.body_start, p.body_end, depth + 1)
        elif p.type == b"MULTIPART":
            assert p.children
            pos = p.body_start
            for c in p.children:
                check(c, pos, p.body_end, depth + 1)
                pos = c.body_end
        else:
            assert not p.children
            assert not (p.type == b"MESSAGE" and p.subtype in (b"RFC822", b"GLOBAL"))

    assert meta.body.header_start == 0 and meta.body.body_end == meta.size
    check(meta.body, 0, meta.size, 0)


_ATOM = re.compile(rb"NIL|[0-9]+")
_QUOTED = re.compile(rb'"((?:[^"\\\r\n\x80-\xff\x00]|\\["\\])*)"')
_LITERAL = re.compile(rb"\{([0-9]+)\}\r\n")

Sexp = list["Sexp"] | bytes | int | None


def imap_parse(data: bytes) -> Sexp:
    """Parse one IMAP parenthesised value (NIL, numbers, quoted strings, literals, lists) and
    check that it is the whole input; list items are separated by one space, except that lists
    may directly follow lists (address and body lists)."""
    pos = 0

    def value() -> Sexp:
        nonlocal pos
        c = data[pos : pos + 1]
        if c == b"(":
            pos += 1
            items: list[Sexp] = []
            while data[pos : pos + 1] != b")":
                if items:
                    if data[pos : pos + 1] == b" ":
                        pos += 1
                    else:
                        assert data[pos - 1 : pos] == b")" and data[pos : pos + 1] == b"(", pos
                items.append(value())
            assert items, "empty list"
            pos += 1
            return items
        if c == b'"':
            m = _QUOTED.match(data, pos)
            assert m is not None, data[pos : pos + 40]
            pos = m.end()
            return re.sub(rb"\\(.)", rb"\1", m.group(1))
        if c == b"{":
            m = _LITERAL.match(data, pos)
            assert m is not None
            n = int(m.group(1))
            pos = m.end() + n
            assert pos <= len(data)
            lit = data[m.end() : pos]
            assert b"\x00" not in lit
            return lit
        m = _ATOM.match(data, pos)
        assert m is not None, data[pos : pos + 40]
        pos = m.end()
        return None if m.group(0) == b"NIL" else int(m.group(0))

    v = value()
    assert pos == len(data), (pos, len(data))
    return v


def check_rendered(meta: MessageMeta) -> None:
    env = imap_parse(envelope_imap(meta))
    assert isinstance(env, list) and len(env) == 10
    for extended in (False, True):
        body = imap_parse(bodystructure_imap(meta, extended))
        assert isinstance(body, list)


def all_sections(meta: MessageMeta) -> Iterator[str]:
    """Every part number of the message, with each suffix."""

    def numbered(p: BodyPart) -> tuple[BodyPart, ...]:
        return p.children if p.type == b"MULTIPART" else (p,)

    def sub(p: BodyPart) -> tuple[BodyPart, ...]:
        if p.type == b"MULTIPART":
            return p.children
        if p.envelope is not None:
            return numbered(p.children[0])
        return ()

    def rec(prefix: str, parts: tuple[BodyPart, ...]) -> Iterator[str]:
        for i, p in enumerate(parts, 1):
            n = f"{prefix}{i}"
            yield n
            yield n + ".MIME"
            yield n + ".HEADER"
            yield n + ".TEXT"
            yield n + ".HEADER.FIELDS (Subject)"
            yield from rec(n + ".", sub(p))

    yield from ("", "HEADER", "TEXT", "HEADER.FIELDS (From)", "HEADER.FIELDS.NOT (From)")
    yield from rec("", numbered(meta.body))


def full_check(raw: bytes) -> MessageMeta:
    """Parse without the safety net, and check everything that must hold for any input."""
    meta = mime._parse(raw)
    assert meta == parse_message(raw)
    check_invariants(meta)
    data = encode_meta(meta)
    assert decode_meta(data) == meta
    check_rendered(meta)
    for s in all_sections(meta):
        section_bytes(raw, meta, s)
    return meta


# -- the corpus --------------------------------------------------------------------------------

RFC3501_HEADER = """\
Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)
From: Terry Gray <gray@cac.washington.edu>
Subject: IMAP4rev1 WG mtg summary and minutes
To: imap@cac.washington.edu
cc: minutes@CNRI.Reston.VA.US, John Klensin <KLENSIN@MIT.EDU>
Message-Id: <B27397-0100000@cac.washington.edu>
MIME-Version: 1.0
"""

RFC3501_ENVELOPE = (
    b'("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" "IMAP4rev1 WG mtg summary and minutes" '
    b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
    b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
    b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
    b'((NIL NIL "imap" "cac.washington.edu")) '
    b'((NIL NIL "minutes" "CNRI.Reston.VA.US")("John Klensin" NIL "KLENSIN" "MIT.EDU")) '
    b'NIL NIL "<B27397-0100000@cac.washington.edu>")'
)


def body_of(size: int, lines: int) -> str:
    """Text of exactly ``size`` octets (CRLF counted as 2) in ``lines`` lines, no final CRLF."""
    content = size - 2 * (lines - 1)
    per, extra = divmod(content, lines)
    return "\n".join("x" * (per + (1 if i < extra else 0)) for i in range(lines))


def rfc3501_message() -> bytes:
    return crlf(
        RFC3501_HEADER
        + 'Content-Type: MULTIPART/MIXED; BOUNDARY="=_b1"\n\n'
        + "--=_b1\n\n"
        + body_of(1152, 23)
        + "\n--=_b1\n"
        + "Content-Type: TEXT/PLAIN; CHARSET=US-ASCII; NAME=cc.diff\n"
        + "Content-ID: <960723163407.20117h@cac.washington.edu>\n"
        + "Content-Description: Compiler diff\n"
        + "Content-Transfer-Encoding: BASE64\n\n"
        + body_of(4554, 73)
        + "\n--=_b1--\n"
    )


PLAIN = crlf("""\
Return-Path: <alice@example.org>
Received: from mx.example.org by mailharbor; Tue, 2 Jan 2024 10:00:00 +0000
Date: Tue, 2 Jan 2024 09:59:58 +0100
From: Alice Example <alice@example.org>
To: Bob <bob@example.net>
Subject: Lunch?
Message-ID: <lunch-1@example.org>

Are we still on for lunch?
--\x20
Alice
""")

ENCODED = crlf("""\
Date: Tue, 2 Jan 2024 09:59:58 +0100
From: =?UTF-8?Q?J=C3=BCrgen_M=C3=BCller?= <jm@example.de>
To: "Doe, Jane" <jane@example.com>, bob@example.net (Bob Smith)
Subject: =?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4=?=
 =?UTF-8?B?IQ==?=
In-Reply-To: <x1@example.com>
Message-ID: <enc-1@example.de>
MIME-Version: 1.0
Content-Type: text/plain; charset="utf-8"
Content-Transfer-Encoding: quoted-printable

Gr=C3=BC=C3=9Fe!
""")

ALTERNATIVE = crlf("""\
From: shop@example.com
To: you@example.net
Subject: Your order
Date: Mon, 1 Jan 2024 00:00:00 +0000
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="alt"

This is a multi-part message in MIME format.
--alt
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 7bit

Thanks for your order.
--alt
Content-Type: text/html; charset=utf-8
Content-Transfer-Encoding: quoted-printable

<p>Thanks for your order.</p>
--alt--
""")

MIXED = crlf("""\
From: Carol <carol@example.org>
To: Dave <dave@example.org>
Subject: Report
Date: Mon, 1 Jan 2024 00:00:00 +0000
MIME-Version: 1.0
Content-Type: multipart/mixed;
 boundary="mix"

--mix
Content-Type: text/plain; charset=us-ascii

See the attached report.

--mix
Content-Type: application/pdf; name="report (final).pdf"
Content-Disposition: attachment; filename="report (final).pdf"
Content-Transfer-Encoding: base64
Content-Language: en, de
Content-Location: http://example.org/report.pdf
Content-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==

JVBERi0xLjQK
JSVFT0YK
--mix--
""")

NESTED = crlf("""\
From: eve@example.org
To: frank@example.org
Subject: nested
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

--outer
Content-Type: multipart/alternative; boundary="inner"

--inner
Content-Type: text/plain

plain
--inner
Content-Type: text/html

<b>html</b>
--inner--

--outer
Content-Type: image/png
Content-Disposition: inline
Content-ID: <img1@example.org>

iVBORw0KGgo=
--outer--
""")

FORWARD = crlf("""\
From: gina@example.org
To: hank@example.org
Subject: Fwd: Report
Date: Mon, 1 Jan 2024 00:00:00 +0000
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="fwd"

--fwd
Content-Type: text/plain

See below.
--fwd
Content-Type: message/rfc822
Content-Description: forwarded message

From: Carol <carol@example.org>
To: gina@example.org
Subject: Report
Message-ID: <rep@example.org>
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="alt2"

--alt2
Content-Type: text/plain

report
--alt2
Content-Type: text/html

<i>report</i>
--alt2--
--fwd--
""")

DIGEST = crlf("""\
From: list@example.org
To: list@example.org
Subject: Digest
MIME-Version: 1.0
Content-Type: multipart/digest; boundary="dig"

--dig

From: a@example.org
Subject: one

first
--dig

From: b@example.org
Subject: two

second
--dig
Content-Type: text/plain

not a message
--dig--
""")

GROUPS = crlf("""\
From: Team: ann@example.org, "Smith, Bo" <bo@example.org>;
To: undisclosed-recipients:;
Cc: <@relay.example:route@example.org>, nodomain, "quoted local"@example.org
Subject: groups

body
""")

NO_DATE = crlf("""\
From: x@example.org
Subject: no date

body
""")

CORPUS = {
    "rfc3501": rfc3501_message(),
    "plain": PLAIN,
    "plain-lf": PLAIN.replace(b"\r\n", b"\n"),
    "encoded": ENCODED,
    "alternative": ALTERNATIVE,
    "mixed": MIXED,
    "nested": NESTED,
    "forward": FORWARD,
    "forward-lf": FORWARD.replace(b"\r\n", b"\n"),
    "digest": DIGEST,
    "groups": GROUPS,
    "no-date": NO_DATE,
}


# -- ENVELOPE ----------------------------------------------------------------------------------


def test_rfc3501_example_envelope_and_bodystructure() -> None:
    raw = rfc3501_message()
    meta = parse_message(raw)
    assert envelope_imap(meta) == RFC3501_ENVELOPE
    assert bodystructure_imap(meta, extended=False) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1152 23)'
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII" "NAME" "cc.diff") '
        b'"<960723163407.20117h@cac.washington.edu>" "Compiler diff" "BASE64" 4554 73) "MIXED")'
    )
    assert bodystructure_imap(meta, extended=True) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1152 23 NIL NIL NIL NIL)'
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII" "NAME" "cc.diff") '
        b'"<960723163407.20117h@cac.washington.edu>" "Compiler diff" "BASE64" 4554 73'
        b' NIL NIL NIL NIL) "MIXED" ("BOUNDARY" "=_b1") NIL NIL NIL)'
    )


def test_plain_text_crlf_and_lf() -> None:
    for raw in (PLAIN, PLAIN.replace(b"\r\n", b"\n")):
        meta = parse_message(raw)
        assert envelope_imap(meta) == (
            b'("Tue, 2 Jan 2024 09:59:58 +0100" "Lunch?" '
            b'(("Alice Example" NIL "alice" "example.org")) '
            b'(("Alice Example" NIL "alice" "example.org")) '
            b'(("Alice Example" NIL "alice" "example.org")) '
            b'(("Bob" NIL "bob" "example.net")) NIL NIL NIL "<lunch-1@example.org>")'
        )
        text = raw[raw.index(b"Are") :]
        lines = 3
        assert bodystructure_imap(meta, False) == (
            b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" %d %d)' % (len(text), lines)
        )
        assert bodystructure_imap(meta, True) == (
            b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" %d %d NIL NIL NIL NIL)'
            % (len(text), lines)
        )


def test_encoded_words_stay_raw() -> None:
    meta = parse_message(ENCODED)
    assert envelope_imap(meta) == (
        b'("Tue, 2 Jan 2024 09:59:58 +0100" '
        b'"=?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4=?= =?UTF-8?B?IQ==?=" '
        b'(("=?UTF-8?Q?J=C3=BCrgen_M=C3=BCller?=" NIL "jm" "example.de")) '
        b'(("=?UTF-8?Q?J=C3=BCrgen_M=C3=BCller?=" NIL "jm" "example.de")) '
        b'(("=?UTF-8?Q?J=C3=BCrgen_M=C3=BCller?=" NIL "jm" "example.de")) '
        b'(("Doe, Jane" NIL "jane" "example.com")("Bob Smith" NIL "bob" "example.net")) '
        b'NIL NIL "<x1@example.com>" "<enc-1@example.de>")'
    )
    assert bodystructure_imap(meta, False) == (
        b'("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "QUOTED-PRINTABLE" 18 1)'
    )


def test_group_syntax_routes_and_missing_parts() -> None:
    meta = parse_message(GROUPS)
    e = meta.envelope
    assert envelope_imap(meta) == (
        b'(NIL "groups" '
        b'((NIL NIL "Team" NIL)(NIL NIL "ann" "example.org")("Smith, Bo" NIL "bo" "example.org")'
        b"(NIL NIL NIL NIL)) "
        b'((NIL NIL "Team" NIL)(NIL NIL "ann" "example.org")("Smith, Bo" NIL "bo" "example.org")'
        b"(NIL NIL NIL NIL)) "
        b'((NIL NIL "Team" NIL)(NIL NIL "ann" "example.org")("Smith, Bo" NIL "bo" "example.org")'
        b"(NIL NIL NIL NIL)) "
        b'((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL)) '
        b'((NIL "@relay.example" "route" "example.org")'
        b'(NIL NIL "nodomain" "MISSING_DOMAIN")'
        b'(NIL NIL "\\"quoted local\\"" "example.org")) '
        b"NIL NIL NIL)"
    )
    assert e.sender == () and e.date is None


def test_missing_date_and_absent_fields_are_nil() -> None:
    meta = parse_message(NO_DATE)
    assert envelope_imap(meta) == (
        b'(NIL "no date" ((NIL NIL "x" "example.org")) ((NIL NIL "x" "example.org")) '
        b'((NIL NIL "x" "example.org")) NIL NIL NIL NIL NIL)'
    )
    empty = parse_message(b"")
    assert envelope_imap(empty) == b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"
    assert bodystructure_imap(empty, False) == (
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0)'
    )


def test_string_quoting_rules() -> None:
    raw = b'Subject: say "hi" \\ bye\r\nFrom: \xc3\xa9t\xc3\xa9 <a@b>\r\n\r\n'
    meta = parse_message(raw)
    env = envelope_imap(meta)
    assert env.startswith(b'(NIL "say \\"hi\\" \\\\ bye" (({5}\r\n\xc3\xa9t\xc3\xa9 NIL "a" "b"))')
    long_subject = b"x" * (mime.QUOTED_MAX + 1)
    meta = parse_message(b"Subject: " + long_subject + b"\r\n\r\n")
    assert envelope_imap(meta).startswith(b"(NIL {%d}\r\n" % len(long_subject) + long_subject)
    meta = parse_message(b"Subject: a\x00b\r\n\r\n")
    assert envelope_imap(meta).startswith(b"(NIL {2}\r\nab NIL")


# -- BODYSTRUCTURE -----------------------------------------------------------------------------


def test_alternative() -> None:
    meta = parse_message(ALTERNATIVE)
    assert bodystructure_imap(meta, True) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 22 1 NIL NIL NIL NIL)'
        b'("TEXT" "HTML" ("CHARSET" "utf-8") NIL NIL "QUOTED-PRINTABLE" 29 1 NIL NIL NIL NIL)'
        b' "ALTERNATIVE" ("BOUNDARY" "alt") NIL NIL NIL)'
    )


def test_mixed_with_attachment_extension_data() -> None:
    meta = parse_message(MIXED)
    assert bodystructure_imap(meta, True) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 26 1 NIL NIL NIL NIL)'
        b'("APPLICATION" "PDF" ("NAME" "report (final).pdf") NIL NIL "BASE64" 22 '
        b'"Q2hlY2sgSW50ZWdyaXR5IQ==" ("ATTACHMENT" ("FILENAME" "report (final).pdf")) '
        b'("en" "de") "http://example.org/report.pdf")'
        b' "MIXED" ("BOUNDARY" "mix") NIL NIL NIL)'
    )
    assert bodystructure_imap(meta, False) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 26 1)'
        b'("APPLICATION" "PDF" ("NAME" "report (final).pdf") NIL NIL "BASE64" 22) "MIXED")'
    )


def test_nested_multipart() -> None:
    meta = parse_message(NESTED)
    assert bodystructure_imap(meta, False) == (
        b'((("TEXT" "PLAIN" NIL NIL NIL "7BIT" 5 1)("TEXT" "HTML" NIL NIL NIL "7BIT" 11 1)'
        b' "ALTERNATIVE")("IMAGE" "PNG" NIL "<img1@example.org>" NIL "7BIT" 12) "MIXED")'
    )
    assert bodystructure_imap(meta, True).endswith(
        b'("IMAGE" "PNG" NIL "<img1@example.org>" NIL "7BIT" 12 NIL ("INLINE" NIL) NIL NIL)'
        b' "MIXED" ("BOUNDARY" "outer") NIL NIL NIL)'
    )


def test_forwarded_message_with_its_own_multipart() -> None:
    meta = parse_message(FORWARD)
    inner = FORWARD[FORWARD.index(b"From: Carol") : FORWARD.index(b"\r\n--fwd--")]
    assert bodystructure_imap(meta, False) == (
        b'(("TEXT" "PLAIN" NIL NIL NIL "7BIT" 10 1)'
        b'("MESSAGE" "RFC822" NIL NIL "forwarded message" "7BIT" %d '
        b'(NIL "Report" (("Carol" NIL "carol" "example.org")) (("Carol" NIL "carol" "example.org"))'
        b' (("Carol" NIL "carol" "example.org")) ((NIL NIL "gina" "example.org")) NIL NIL NIL'
        b' "<rep@example.org>") '
        b'(("TEXT" "PLAIN" NIL NIL NIL "7BIT" 6 1)("TEXT" "HTML" NIL NIL NIL "7BIT" 13 1)'
        b' "ALTERNATIVE") %d) "MIXED")' % (len(inner), inner.count(b"\n") + 1)
    )


def test_digest_children_default_to_message_rfc822() -> None:
    meta = parse_message(DIGEST)
    kids = meta.body.children
    assert [(k.type, k.subtype) for k in kids] == [
        (b"MESSAGE", b"RFC822"),
        (b"MESSAGE", b"RFC822"),
        (b"TEXT", b"PLAIN"),
    ]
    assert kids[0].envelope is not None and kids[0].envelope.subject == b"one"
    assert kids[1].envelope is not None and kids[1].envelope.subject == b"two"
    assert bodystructure_imap(meta, False).startswith(
        b'(("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 42 (NIL "one" ((NIL NIL "a" "example.org"))'
    )


# -- sections ----------------------------------------------------------------------------------


def test_sections_of_a_forwarded_message() -> None:
    raw = FORWARD
    meta = parse_message(raw)

    def sec(s: str) -> bytes | None:
        return section_bytes(raw, meta, s)

    header_end = raw.index(b"\r\n\r\n") + 4
    assert sec("") == raw
    assert sec("HEADER") == raw[:header_end]
    assert sec("TEXT") == raw[header_end:]
    assert sec("1") == b"See below."
    assert sec("1.MIME") == b"Content-Type: text/plain\r\n\r\n"
    inner = raw[raw.index(b"From: Carol") : raw.index(b"\r\n--fwd--")]
    assert sec("2") == inner
    assert sec("2.MIME") == (
        b"Content-Type: message/rfc822\r\nContent-Description: forwarded message\r\n\r\n"
    )
    inner_header = inner[: inner.index(b"\r\n\r\n") + 4]
    assert sec("2.HEADER") == inner_header
    assert sec("2.TEXT") == inner[len(inner_header) :]
    assert sec("2.1") == b"report"
    assert sec("2.2") == b"<i>report</i>"
    assert sec("2.2.MIME") == b"Content-Type: text/html\r\n\r\n"
    assert sec("2.HEADER.FIELDS (SUBJECT message-id)") == (
        b"Subject: Report\r\nMessage-ID: <rep@example.org>\r\n\r\n"
    )
    assert sec("2.HEADER.FIELDS.NOT (From To Subject Message-ID Content-Type)") == (
        b"MIME-Version: 1.0\r\n\r\n"
    )
    assert sec('HEADER.FIELDS ("Subject" DATE)') == (
        b"Subject: Fwd: Report\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
    )
    assert sec("HEADER.FIELDS (X-Absent)") == b"\r\n"
    assert sec("header.fields (subject)") == b"Subject: Fwd: Report\r\n\r\n"
    # invalid or absent sections
    for bad in (
        "MIME",
        "0",
        "3",
        "1.",
        "1.1",
        "1.HEADER",
        "1.TEXT",
        "2.3",
        "2.1.1",
        "HEADER.FIELDS ()",
        "HEADER.FIELDS",
        "BOGUS",
        "1.BOGUS",
        "9" * 5000,
    ):
        assert sec(bad) is None, bad
    assert section_range(meta, "2.TEXT") == (
        raw.index(inner) + len(inner_header),
        raw.index(inner) + len(inner),
    )
    assert section_range(meta, "HEADER.FIELDS (A)") is None
    assert section_bytes(raw + b"x", meta, "") is None  # not the message meta describes


def test_sections_of_a_single_part_message() -> None:
    meta = parse_message(PLAIN)
    body = PLAIN[PLAIN.index(b"Are") :]
    assert section_bytes(PLAIN, meta, "1") == body
    assert section_bytes(PLAIN, meta, "TEXT") == body
    assert section_bytes(PLAIN, meta, "1.MIME") == PLAIN[: PLAIN.index(b"Are")]
    assert section_bytes(PLAIN, meta, "2") is None
    # a folded field is returned whole, in its original line endings
    raw = b"Subject: a\n b\nX: y\n\nbody"
    meta = parse_message(raw)
    assert section_bytes(raw, meta, "HEADER.FIELDS (subject)") == b"Subject: a\n b\n\r\n"
    # a header that ends the message without a newline
    raw = b"Subject: cut"
    meta = parse_message(raw)
    assert section_bytes(raw, meta, "HEADER.FIELDS (subject)") == b"Subject: cut\r\n\r\n"
    assert section_bytes(raw, meta, "TEXT") == b""


def test_top_level_message_rfc822() -> None:
    raw = crlf("Content-Type: message/rfc822\n\nSubject: inner\n\nhello\n")
    meta = parse_message(raw)
    assert section_bytes(raw, meta, "1") == crlf("Subject: inner\n\nhello\n")
    assert section_bytes(raw, meta, "1.HEADER") == crlf("Subject: inner\n\n")
    assert section_bytes(raw, meta, "1.1") == crlf("hello\n")


# -- malformed input ---------------------------------------------------------------------------


def test_multipart_without_boundary_or_delimiters() -> None:
    for ctype in (b"multipart/mixed", b'multipart/mixed; boundary="nope"', b"multipart/mixed; b"):
        raw = b"Content-Type: " + ctype + b"\r\n\r\n--x\r\nhello\r\n"
        meta = full_check(raw)
        assert meta.body.type == b"MULTIPART"
        (child,) = meta.body.children
        assert (child.type, child.subtype) == (b"TEXT", b"PLAIN")
        assert section_bytes(raw, meta, "1") == b"--x\r\nhello\r\n"


def test_unterminated_multipart_and_headerless_parts() -> None:
    raw = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n\r\none\r\n--b\r\nX: y'
    meta = full_check(raw)
    assert [section_bytes(raw, meta, s) for s in ("1", "2", "2.MIME")] == [
        b"one",
        b"",
        b"X: y",
    ]
    # delimiters that are only prefixes are not delimiters; transport padding is allowed
    raw = (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b \t\r\n\r\n--bb\r\n--b-\r\n'
        b"--b--  \r\nepilogue"
    )
    meta = full_check(raw)
    assert section_bytes(raw, meta, "1") == b"--bb\r\n--b-"


def test_bad_headers_and_8bit_garbage() -> None:
    raw = (
        b"From nobody Mon Jan  1 00:00:00 2024\r\n"
        b"garbage line without colon\r\n"
        b": empty name\r\n"
        b"Subject: \xff\xfe\x00 garbage\r\n"
        b"Content-Type: text/\r\n"
        b"Content-Transfer-Encoding: \r\n"
        b"From: <<<@@@>>> ,,, ;;; (((\r\n"
        b'To: "unterminated <a@b>\r\n'
        b"\r\n\xff\xfe body"
    )
    meta = full_check(raw)
    assert meta.envelope.subject == b"\xff\xfe\x00 garbage"
    assert (meta.body.type, meta.body.subtype, meta.body.encoding) == (b"TEXT", b"PLAIN", b"7BIT")


def test_deep_nesting_is_capped() -> None:
    depth = MAX_DEPTH + 8
    raw = b""
    for i in range(depth):
        raw += b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
    raw += b"Content-Type: text/plain\r\n\r\nleaf\r\n"
    for i in reversed(range(depth)):
        raw += b"--b%d--\r\n" % i
    meta = full_check(raw)
    deepest = max(walk(meta.body), key=lambda p: p.header_start)
    assert (deepest.type, deepest.subtype) == (b"APPLICATION", b"OCTET-STREAM")
    n = 0
    p = meta.body
    while p.children:
        p = p.children[0]
        n += 1
    assert n == MAX_DEPTH
    # nested message/rfc822 likewise
    raw = b"Content-Type: message/rfc822\r\n\r\n" * depth + b"Subject: deep\r\n\r\nx"
    meta = full_check(raw)
    assert sum(1 for p in walk(meta.body) if p.envelope is not None) == MAX_DEPTH


def test_part_count_is_bounded() -> None:
    raw = b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + b"--b\r\n\r\nx\r\n" * (
        3 * MAX_PARTS
    )
    meta = full_check(raw)
    assert len(meta.body.children) == MAX_PARTS - 1
    assert meta.body.children[-1].body_end == len(raw)


def test_huge_header_count() -> None:
    raw = b"".join(b"X-H%d: v\r\n" % i for i in range(200_000)) + b"Subject: late\r\n\r\nbody"
    meta = parse_message(raw)
    assert meta.envelope.subject == b"late"
    assert section_bytes(raw, meta, "TEXT") == b"body"


def test_address_count_is_bounded() -> None:
    raw = b"To: " + b"a@b, " * 100_000 + b"\r\n\r\n"
    meta = parse_message(raw)
    assert 0 < len(meta.envelope.to) <= mime.MAX_ADDRESSES


# -- the binary format -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_round_trip_and_invariants(name: str) -> None:
    raw = CORPUS[name]
    meta = full_check(raw)
    data = encode_meta(meta)
    assert data[:3] == b"MM\x01"
    assert len(data) < 2048


def test_decode_rejects_malformed() -> None:
    data = encode_meta(parse_message(FORWARD))
    decode_meta(data)
    for cut in range(len(data)):
        with pytest.raises(ValueError):
            decode_meta(data[:cut])
    with pytest.raises(ValueError):
        decode_meta(data + b"\x00")
    with pytest.raises(ValueError):
        decode_meta(b"XX" + data[2:])
    with pytest.raises(ValueError):
        decode_meta(data[:2] + b"\x02" + data[3:])
    # a size smaller than the parts' offsets
    with pytest.raises(ValueError):
        decode_meta(data[:3] + b"\x01" + data[3 + len(_varint(len(FORWARD))) :])


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def test_decode_rejects_bad_shapes() -> None:
    leaf = BodyPart(b"TEXT", b"PLAIN", body_end=1)
    bad = [
        MessageMeta(1, mime.Envelope(), BodyPart(b"MULTIPART", b"MIXED", body_end=1)),
        MessageMeta(1, mime.Envelope(), BodyPart(b"MESSAGE", b"RFC822", body_end=1)),
        MessageMeta(1, mime.Envelope(), BodyPart(b"TEXT", b"PLAIN", body_end=1, children=(leaf,))),
        MessageMeta(0, mime.Envelope(), leaf),
    ]
    for meta in bad:
        with pytest.raises(ValueError):
            decode_meta(encode_meta(meta))


@given(st.binary(max_size=300))
def test_decode_random_bytes_raises_only_value_error(data: bytes) -> None:
    for blob in (data, b"MM\x01" + data):
        try:
            meta = decode_meta(blob)
        except ValueError:
            continue
        check_invariants(meta)
        check_rendered(meta)


# -- generated messages ------------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    text: bool
    body: bytes


@dataclass(frozen=True)
class Multi:
    subtype: str
    children: tuple[Node, ...]


@dataclass(frozen=True)
class Msg:
    inner: Node


Node = Leaf | Multi | Msg

_line = st.text(alphabet="abc XYZ=:.<>@", max_size=20).map(lambda s: s.encode())
_leaf = st.builds(Leaf, st.booleans(), st.lists(_line, max_size=4).map(b"\n".join))


def _nodes() -> st.SearchStrategy[Node]:
    return st.recursive(
        _leaf,
        lambda inner: st.one_of(
            st.builds(
                Multi,
                st.sampled_from(["mixed", "alternative", "related"]),
                st.lists(inner, min_size=1, max_size=3).map(tuple),
            ),
            st.builds(Msg, inner),
        ),
        max_leaves=8,
    )


def render(node: Node, top: bool, counter: list[int]) -> bytes:
    """An entity (header + blank line + body) for ``node``, with LF line endings."""
    hdr = [b"From: Gen <gen@example.org>", b"Subject: generated"] if top else []
    if isinstance(node, Leaf):
        hdr.append(
            b"Content-Type: text/plain; charset=utf-8"
            if node.text
            else b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64"
        )
        body = node.body
    elif isinstance(node, Multi):
        counter[0] += 1
        b = b"=_gen%d" % counter[0]
        hdr.append(b'Content-Type: multipart/%s; boundary="%s"' % (node.subtype.encode(), b))
        body = b"preamble\n"
        for c in node.children:
            body += b"--" + b + b"\n" + render(c, False, counter) + b"\n"
        body += b"--" + b + b"--\nepilogue\n"
    else:
        hdr.append(b"Content-Type: message/rfc822")
        body = render(node.inner, True, counter)
    return b"\n".join(hdr) + b"\n\n" + body


def leaves(node: Node, path: str, nl: bytes) -> Iterator[tuple[str, Leaf | Node, bytes]]:
    """(section of the node's body, node, expected body bytes) for every leaf."""
    if isinstance(node, Leaf):
        yield path, node, node.body.replace(b"\n", nl)
    elif isinstance(node, Multi):
        for i, c in enumerate(node.children, 1):
            yield from leaves(c, f"{path}.{i}" if path else str(i), nl)
    else:
        sub = node.inner
        if isinstance(sub, Multi):
            yield from leaves(sub, path, nl)
        else:
            yield from leaves(sub, f"{path}.1", nl)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(_nodes(), st.sampled_from([b"\r\n", b"\n"]))
def test_generated_messages(node: Node, nl: bytes) -> None:
    raw = render(node, True, [0]).replace(b"\n", nl)
    meta = full_check(raw)
    top = node if isinstance(node, Multi) else None
    for path, leaf, body in leaves(node, "" if top else "1", nl):
        if not path:
            continue
        assert section_bytes(raw, meta, path) == body, path
        assert isinstance(leaf, Leaf)
        mime_hdr = section_bytes(raw, meta, path + ".MIME")
        assert mime_hdr is not None
        expected = b"text/plain" if leaf.text else b"application/octet-stream"
        assert expected in mime_hdr
    types = [(p.type, p.subtype) for p in walk(meta.body)]
    assert (b"APPLICATION", b"OCTET-STREAM") not in types or any(
        isinstance(n, Leaf) and not n.text for _, n, _ in leaves(node, "x", nl)
    )


# -- fuzzing -----------------------------------------------------------------------------------


@given(st.binary(max_size=2000))
def test_random_bytes_never_raise(raw: bytes) -> None:
    full_check(raw)


_SPICE = [b"\r\n", b"\n", b"--", b"\r\n\r\n", b":", b";", b'"', b"(", b")", b"<", b">", b"\xff"]


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CORPUS)), st.data())
def test_mutated_messages_never_raise(name: str, data: st.DataObject) -> None:
    raw = bytearray(CORPUS[name])
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(raw)))
        op = data.draw(st.integers(0, 2))
        if op == 0:
            del raw[pos : pos + data.draw(st.integers(1, 40))]
        elif op == 1:
            raw[pos:pos] = data.draw(st.sampled_from(_SPICE) | st.binary(min_size=1, max_size=8))
        else:
            raw[pos : pos + 1] = bytes([data.draw(st.integers(0, 255))])
    full_check(bytes(raw))


# -- size --------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_ten_megabyte_message_parses() -> None:
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n"
    attachment = line * (10 * 1024 * 1024 // len(line))
    raw = (
        crlf("""\
From: big@example.org
To: you@example.org
Subject: big
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="big"

--big
Content-Type: text/plain

see attachment
--big
Content-Type: application/octet-stream
Content-Transfer-Encoding: base64

""")
        + attachment
        + b"--big--\r\n"
    )
    t0 = time.perf_counter()
    meta = parse_message(raw)
    t1 = time.perf_counter()
    data = encode_meta(meta)
    decode_meta(data)
    t2 = time.perf_counter()
    text = raw.replace(b"multipart/mixed", b"text/plain  ")
    t3 = time.perf_counter()
    parse_message(text)
    t4 = time.perf_counter()
    print(
        f"\n10 MB multipart parse {1000 * (t1 - t0):.1f} ms, encode+decode"
        f" {1000 * (t2 - t1):.2f} ms, 10 MB text/plain parse {1000 * (t4 - t3):.1f} ms"
    )
    assert meta.body.children[1].size == len(attachment) - 2  # the CRLF before "--big--"
    assert section_bytes(raw, meta, "2") == attachment[:-2]
