"""Responses and values encode byte-exactly."""

from __future__ import annotations

import datetime

import pytest

from mailharbor.proto.imap import (
    AString,
    Atom,
    Code,
    Continuation,
    Literal,
    Mailbox,
    Raw,
    bad,
    bye,
    capability,
    enabled,
    esearch,
    exists,
    expunge,
    fetch,
    flag_list,
    flags,
    format_datetime,
    id_response,
    list_mailbox,
    namespace,
    no,
    ok,
    quota,
    quotaroot,
    render,
    search,
    status,
    untagged_bad,
    untagged_no,
    untagged_ok,
    vanished,
)


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (None, b"NIL"),
        (0, b"0"),
        (4294967295, b"4294967295"),
        ("hello world", b'"hello world"'),
        ('say "hi" \\o/', b'"say \\"hi\\" \\\\o/"'),
        ("", b'""'),
        (b"two\r\nlines", b"{10}\r\ntwo\r\nlines"),
        ("NUL\0", b"{4}\r\nNUL\x00"),
        ("x" * 1001, b"{1001}\r\n" + b"x" * 1001),
        ("café", b"{5}\r\ncaf\xc3\xa9"),  # 8-bit: literal unless UTF-8 is enabled
        (Atom("\\Seen"), b"\\Seen"),
        (AString("INBOX"), b"INBOX"),
        (AString("nil"), b'"nil"'),
        (AString("a b"), b'"a b"'),
        (AString(""), b'""'),
        (Literal(b"abc"), b"{3}\r\nabc"),
        (Mailbox("Entwürfe"), b'"Entw&APw-rfe"'),
        (Mailbox("Tom & Jerry"), b'"Tom &- Jerry"'),
        (Raw(b'("x" NIL)'), b'("x" NIL)'),
        ((1, "a", None, (Atom("B"), ())), b'(1 "a" NIL (B ()))'),
        ([], b"()"),
    ],
)
def test_values_render(value: object, wire: bytes) -> None:
    assert render(value) == wire


def test_utf8_session_quotes_utf8_and_mailboxes_are_not_mutf7() -> None:
    assert render("café", utf8=True) == b'"caf\xc3\xa9"'
    assert render(Mailbox("Entwürfe"), utf8=True) == b'"Entw\xc3\xbcrfe"'
    # invalid UTF-8 bytes still need a literal
    assert render(b"\xff", utf8=True) == b"{1}\r\n\xff"


@pytest.mark.parametrize("value", [True, -1, 1.5, object()])
def test_non_values_are_refused(value: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        render(value)


@pytest.mark.parametrize("text", ["", "a b", "x(y", 'q"', "new\nline"])
def test_atom_validation(text: str) -> None:
    with pytest.raises(ValueError):
        Atom(text)


@pytest.mark.parametrize(
    ("response", "wire"),
    [
        (ok(), b"t1 OK Completed\r\n"),
        (ok("SELECT completed", Code.read_write()), b"t1 OK [READ-WRITE] SELECT completed\r\n"),
        (ok("done", Code.read_only()), b"t1 OK [READ-ONLY] done\r\n"),
        (no("No such mailbox", Code.NONEXISTENT), b"t1 NO [NONEXISTENT] No such mailbox\r\n"),
        (no("x", Code.TRYCREATE), b"t1 NO [TRYCREATE] x\r\n"),
        (no("x", Code.ALREADYEXISTS), b"t1 NO [ALREADYEXISTS] x\r\n"),
        (no("x", Code.OVERQUOTA), b"t1 NO [OVERQUOTA] x\r\n"),
        (no("x", Code.LIMIT), b"t1 NO [LIMIT] x\r\n"),
        (no("x", Code.INUSE), b"t1 NO [INUSE] x\r\n"),
        (no("x", Code.UNAVAILABLE), b"t1 NO [UNAVAILABLE] x\r\n"),
        (no("x", Code.AUTHENTICATIONFAILED), b"t1 NO [AUTHENTICATIONFAILED] x\r\n"),
        (no("x", Code.PRIVACYREQUIRED), b"t1 NO [PRIVACYREQUIRED] x\r\n"),
        (no("x", Code.TOOBIG), b"t1 NO [TOOBIG] x\r\n"),
        (no("x", Code.CANNOT), b"t1 NO [CANNOT] x\r\n"),
        (no("x", Code.SERVERBUG), b"t1 NO [SERVERBUG] x\r\n"),
        (bad("Syntax"), b"t1 BAD Syntax\r\n"),
        (ok("a", Code.appenduid(38505, 3955)), b"t1 OK [APPENDUID 38505 3955] a\r\n"),
        (
            ok("a", Code.copyuid(38505, [304, 319, 320], [3956, 3957, 3958])),
            b"t1 OK [COPYUID 38505 304,319:320 3956:3958] a\r\n",
        ),
        (
            ok("a", Code.copyuid(7, [5, 3, 4], [10, 11, 12])),  # pairing order kept
            b"t1 OK [COPYUID 7 5,3:4 10:12] a\r\n",
        ),
        (ok("a", Code.highestmodseq(715194045007)), b"t1 OK [HIGHESTMODSEQ 715194045007] a\r\n"),
        (ok("a", Code.modified([7, 9, 8, 12])), b"t1 OK [MODIFIED 7:9,12] a\r\n"),
        (ok("a", Code.mailboxid("F2212ea87")), b"t1 OK [MAILBOXID (F2212ea87)] a\r\n"),
        (
            ok("a", Code.capability(["IMAP4rev2", "IDLE"])),
            b"t1 OK [CAPABILITY IMAP4rev2 IDLE] a\r\n",
        ),
        (ok("x\r\n* 1 EXISTS"), b"t1 OK x  * 1 EXISTS\r\n"),  # injection-proof text
        (ok("[ALERT] fake"), b"t1 OK (ALERT] fake\r\n"),
        (ok("déjà"), b"t1 OK d?j?\r\n"),
    ],
)
def test_tagged_responses(response: object, wire: bytes) -> None:
    assert response.to_bytes("t1") == wire  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("response", "wire"),
    [
        (exists(23), b"* 23 EXISTS\r\n"),
        (expunge(3), b"* 3 EXPUNGE\r\n"),
        (vanished([41, 43, 44, 45]), b"* VANISHED 41,43:45\r\n"),
        (vanished([1, 2], earlier=True), b"* VANISHED (EARLIER) 1:2\r\n"),
        (
            flags(["\\Answered", "\\Seen", "$Forwarded"]),
            b"* FLAGS (\\Answered \\Seen $Forwarded)\r\n",
        ),
        (untagged_ok("", Code.uidvalidity(3857529045)), b"* OK [UIDVALIDITY 3857529045] Ok\r\n"),
        (
            untagged_ok("Predicted next UID", Code.uidnext(4392)),
            b"* OK [UIDNEXT 4392] Predicted next UID\r\n",
        ),
        (
            untagged_ok("Limited", Code.permanentflags(["\\Deleted", "\\Seen", "\\*"])),
            b"* OK [PERMANENTFLAGS (\\Deleted \\Seen \\*)] Limited\r\n",
        ),
        (untagged_ok("x", Code.highestmodseq(5)), b"* OK [HIGHESTMODSEQ 5] x\r\n"),
        (untagged_ok("x", Code.nomodseq()), b"* OK [NOMODSEQ] x\r\n"),
        (untagged_ok("x", Code.closed()), b"* OK [CLOSED] x\r\n"),
        (untagged_ok("x", Code.alert()), b"* OK [ALERT] x\r\n"),
        (untagged_no("disk full"), b"* NO disk full\r\n"),
        (untagged_bad("huh"), b"* BAD huh\r\n"),
        (bye("Server shutting down"), b"* BYE Server shutting down\r\n"),
        (
            fetch(
                12, [("FLAGS", flag_list(["\\Seen"])), ("UID", 4827313), ("MODSEQ", (12121231000,))]
            ),
            b"* 12 FETCH (FLAGS (\\Seen) UID 4827313 MODSEQ (12121231000))\r\n",
        ),
        (
            fetch(1, [("BODY[]<0>", Literal(b"Subject: x\r\n")), ("RFC822.SIZE", 12)]),
            b"* 1 FETCH (BODY[]<0> {12}\r\nSubject: x\r\n RFC822.SIZE 12)\r\n",
        ),
        (
            fetch(
                2,
                [
                    ("ENVELOPE", Raw(b'(NIL "s" NIL NIL NIL NIL NIL NIL NIL NIL)')),
                    ("BODY[1]", None),
                ],
            ),
            b'* 2 FETCH (ENVELOPE (NIL "s" NIL NIL NIL NIL NIL NIL NIL NIL) BODY[1] NIL)\r\n',
        ),
        (
            fetch(
                3,
                [
                    (
                        "INTERNALDATE",
                        format_datetime(
                            datetime.datetime(
                                1996,
                                7,
                                17,
                                2,
                                44,
                                25,
                                tzinfo=datetime.timezone(datetime.timedelta(hours=-7)),
                            )
                        ),
                    ),
                    ("EMAILID", (Atom("M6d99ac3275bb4e"),)),
                    ("THREADID", None),
                ],
            ),
            b'* 3 FETCH (INTERNALDATE "17-Jul-1996 02:44:25 -0700" '
            b"EMAILID (M6d99ac3275bb4e) THREADID NIL)\r\n",
        ),
        (search([2, 84, 3]), b"* SEARCH 2 3 84\r\n"),
        (search([]), b"* SEARCH\r\n"),
        (search([1], modseq=917162500), b"* SEARCH 1 (MODSEQ 917162500)\r\n"),
        (
            esearch("A282", min=2, count=3),
            b'* ESEARCH (TAG "A282") MIN 2 COUNT 3\r\n',
        ),
        (
            esearch("A283", uid=True, all=[4, 5, 6, 9, 10], max=10, modseq=7),
            b'* ESEARCH (TAG "A283") UID MAX 10 ALL 4:6,9:10 MODSEQ 7\r\n',
        ),
        (esearch("A284", all=[], count=0), b'* ESEARCH (TAG "A284") COUNT 0\r\n'),
        (
            list_mailbox("INBOX", "/", ["\\HasNoChildren"]),
            b'* LIST (\\HasNoChildren) "/" "INBOX"\r\n',
        ),
        (
            list_mailbox("Entwürfe", "/", ["\\Drafts", "\\Subscribed"]),
            b'* LIST (\\Drafts \\Subscribed) "/" "Entw&APw-rfe"\r\n',
        ),
        (list_mailbox("", None, ["\\Noselect"]), b'* LIST (\\Noselect) NIL ""\r\n'),
        (
            list_mailbox("Foo", "/", [], childinfo=["SUBSCRIBED"]),
            b'* LIST () "/" "Foo" ("CHILDINFO" ("SUBSCRIBED"))\r\n',
        ),
        (
            list_mailbox("New", "/", [], oldname="Old"),
            b'* LIST () "/" "New" ("OLDNAME" ("Old"))\r\n',
        ),
        (list_mailbox("news", ".", [], lsub=True), b'* LSUB () "." "news"\r\n'),
        (
            status("blurdybloop", {"MESSAGES": 231, "UIDNEXT": 44292}),
            b'* STATUS "blurdybloop" (MESSAGES 231 UIDNEXT 44292)\r\n',
        ),
        (
            status("INBOX", [("SIZE", 10), ("MAILBOXID", "F22")]),
            b'* STATUS "INBOX" (SIZE 10 MAILBOXID (F22))\r\n',
        ),
        (capability(["IMAP4rev2", "IDLE"]), b"* CAPABILITY IMAP4rev2 IDLE\r\n"),
        (enabled(["CONDSTORE"]), b"* ENABLED CONDSTORE\r\n"),
        (enabled([]), b"* ENABLED\r\n"),
        (namespace([("", "/")]), b'* NAMESPACE (("" "/")) NIL NIL\r\n'),
        (
            namespace([("", ".")], [("~", "/")], [("#shared/", "/")]),
            b'* NAMESPACE (("" ".")) (("~" "/")) (("#shared/" "/"))\r\n',
        ),
        (
            id_response([("name", "mailharbor"), ("version", None)]),
            b'* ID ("name" "mailharbor" "version" NIL)\r\n',
        ),
        (id_response(None), b"* ID NIL\r\n"),
        (quota("", [("STORAGE", 10, 512)]), b'* QUOTA "" (STORAGE 10 512)\r\n'),
        (quotaroot("INBOX", [""]), b'* QUOTAROOT "INBOX" ""\r\n'),
    ],
)
def test_untagged_responses(response: object, wire: bytes) -> None:
    assert response.to_bytes() == wire  # type: ignore[attr-defined]


def test_continuation() -> None:
    assert Continuation().to_bytes() == b"+ \r\n"
    assert Continuation("Ready for literal data").to_bytes() == b"+ Ready for literal data\r\n"


def test_format_datetime_naive_is_utc_and_day_is_two_digits() -> None:
    assert format_datetime(datetime.datetime(2024, 3, 5, 6, 7, 8)) == "05-Mar-2024 06:07:08 +0000"


def test_vanished_needs_uids() -> None:
    with pytest.raises(ValueError):
        vanished([])
