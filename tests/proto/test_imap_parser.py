"""Every command parses into its typed dataclass (table-driven); malformed ones give BAD."""

from __future__ import annotations

import datetime

import pytest

from mailharbor.proto.imap import (
    Append,
    Capability,
    Check,
    Close,
    Copy,
    Create,
    Delete,
    Enable,
    Expunge,
    Fetch,
    FetchAtt,
    FetchBody,
    GetQuota,
    GetQuotaRoot,
    Id,
    Idle,
    ImapParseError,
    List,
    Login,
    Logout,
    Lsub,
    Move,
    Namespace,
    Noop,
    ParseContext,
    QresyncParams,
    Rename,
    Search,
    SearchAll,
    SearchAnd,
    SearchDate,
    SearchFlag,
    SearchHeader,
    SearchModSeq,
    SearchNot,
    SearchObjectId,
    SearchOr,
    SearchSeq,
    SearchSize,
    SearchText,
    Select,
    SequenceSet,
    SetQuota,
    StartTls,
    Status,
    Store,
    StoreMode,
    Subscribe,
    Unselect,
    Unsubscribe,
    parse_command,
)
from mailharbor.proto.imap.commands import AuthenticateStart

UTF8 = ParseContext(utf8=True, utf8_accept=True)
QRESYNC = ParseContext(qresync=True)
TZ1 = datetime.timezone(datetime.timedelta(hours=1))
TZ_M7 = datetime.timezone(datetime.timedelta(hours=-7))


def S(*ranges: tuple[int | None, int | None]) -> SequenceSet:
    return SequenceSet(tuple(ranges))


CASES: list[tuple[bytes, object, ParseContext]] = [
    (b"a CAPABILITY", Capability(), ParseContext()),
    (b"a noop", Noop(), ParseContext()),
    (b"a LOGOUT", Logout(), ParseContext()),
    (b"a STARTTLS", StartTls(), ParseContext()),
    (
        b'a ID ("name" "mutt" "version" NIL)',
        Id((("name", "mutt"), ("version", None))),
        ParseContext(),
    ),
    (b"a ID NIL", Id(None), ParseContext()),
    (b"a LOGIN bob secret", Login("bob", "secret"), ParseContext()),
    (b'a LOGIN "b\\"ob" {3}\r\np w', Login('b"ob', "p w"), ParseContext()),
    (b"a LOGIN bob {3+}\r\n\xc3\xa9x", Login("bob", "éx"), ParseContext()),
    (b"a AUTHENTICATE plain", AuthenticateStart("PLAIN"), ParseContext()),
    (
        b"a AUTHENTICATE PLAIN AGJvYgBwdw==",
        AuthenticateStart("PLAIN", "AGJvYgBwdw=="),
        ParseContext(),
    ),
    (b"a AUTHENTICATE PLAIN =", AuthenticateStart("PLAIN", "="), ParseContext()),
    (b"a ENABLE condstore utf8=accept", Enable(("CONDSTORE", "UTF8=ACCEPT")), ParseContext()),
    (b"a SELECT inbox", Select("INBOX"), ParseContext()),
    (b"a EXAMINE Entw&APw-rfe", Select("Entwürfe", readonly=True), ParseContext()),
    (b"a SELECT INBOX (CONDSTORE)", Select("INBOX", condstore=True), ParseContext()),
    (
        b"a SELECT INBOX (QRESYNC (67890007 20050715194045000 41,43:211,214:541))",
        Select(
            "INBOX",
            qresync=QresyncParams(67890007, 20050715194045000, S((41, 41), (43, 211), (214, 541))),
        ),
        QRESYNC,
    ),
    (
        b"a SELECT INBOX (QRESYNC (1 2 1:9 (1,5 1,9)))",
        Select(
            "INBOX", qresync=QresyncParams(1, 2, S((1, 9)), (S((1, 1), (5, 5)), S((1, 1), (9, 9))))
        ),
        QRESYNC,
    ),
    (b"a SELECT INBOX (QRESYNC (1 2))", Select("INBOX", qresync=QresyncParams(1, 2)), QRESYNC),
    ('a SELECT "Entwürfe"'.encode(), Select("Entwürfe"), UTF8),
    (b"a SELECT {9}\r\nEntw\xc3\xbcrfe", Select("Entwürfe"), ParseContext()),
    (b'a SELECT "A&B"', Select("A&B"), UTF8),
    (b"a CREATE Archive/2024", Create("Archive/2024"), ParseContext()),
    (
        b"a CREATE Spam (USE (\\junk \\Trash))",
        Create("Spam", ("\\Junk", "\\Trash")),
        ParseContext(),
    ),
    (b'a DELETE "Old Stuff"', Delete("Old Stuff"), ParseContext()),
    (b"a RENAME a b", Rename("a", "b"), ParseContext()),
    (b"a SUBSCRIBE news", Subscribe("news"), ParseContext()),
    (b"a UNSUBSCRIBE news", Unsubscribe("news"), ParseContext()),
    (b'a LIST "" *', List("", ("*",)), ParseContext()),
    (b'a LIST "" ""', List("", ("",)), ParseContext()),
    (b"a LIST ~/Mail %/&ZeVnLIqe-", List("~/Mail", ("%/日本語",)), ParseContext()),
    (
        b'a LIST (SUBSCRIBED RECURSIVEMATCH) "" ("INBOX" %) RETURN'
        b" (CHILDREN STATUS (MESSAGES UNSEEN))",
        List(
            "",
            ("INBOX", "%"),
            frozenset({"SUBSCRIBED", "RECURSIVEMATCH"}),
            frozenset({"CHILDREN", "STATUS"}),
            ("MESSAGES", "UNSEEN"),
            True,
        ),
        ParseContext(),
    ),
    (
        b'a LIST "" % RETURN (SPECIAL-USE SUBSCRIBED)',
        List("", ("%",), frozenset(), frozenset({"SPECIAL-USE", "SUBSCRIBED"}), (), True),
        ParseContext(),
    ),
    (
        b'a LIST (SPECIAL-USE REMOTE) "" *',
        List("", ("*",), frozenset({"SPECIAL-USE", "REMOTE"}), frozenset(), (), True),
        ParseContext(),
    ),
    (b'a LSUB "" news.*', Lsub("", "news.*"), ParseContext()),
    (b"a NAMESPACE", Namespace(), ParseContext()),
    (
        b"a STATUS INBOX (messages UIDNEXT uidvalidity UNSEEN"
        b" DELETED SIZE RECENT HIGHESTMODSEQ MAILBOXID)",
        Status(
            "INBOX",
            (
                "MESSAGES",
                "UIDNEXT",
                "UIDVALIDITY",
                "UNSEEN",
                "DELETED",
                "SIZE",
                "RECENT",
                "HIGHESTMODSEQ",
                "MAILBOXID",
            ),
        ),
        ParseContext(),
    ),
    (b"a APPEND INBOX {5}\r\nhello", Append("INBOX", (), None, b"hello"), ParseContext()),
    (
        b'a APPEND Sent (\\seen $Forwarded) " 7-Jul-1996 02:44:25 -0700" {3+}\r\nabc',
        Append(
            "Sent",
            ("\\Seen", "$Forwarded"),
            datetime.datetime(1996, 7, 7, 2, 44, 25, tzinfo=TZ_M7),
            b"abc",
        ),
        ParseContext(),
    ),
    (
        b'a APPEND INBOX "01-Feb-2020 10:00:00 +0100" {0}\r\n',
        Append("INBOX", (), datetime.datetime(2020, 2, 1, 10, 0, tzinfo=TZ1), b""),
        ParseContext(),
    ),
    (
        b"a APPEND INBOX () UTF8 (~{4}\r\n\xc3\xa9\x00z)",
        Append("INBOX", (), None, b"\xc3\xa9\x00z", True),
        UTF8,
    ),
    (b"a APPEND INBOX {3}\r\na\x00b", Append("INBOX", (), None, b"a\x00b"), ParseContext()),
    (b"a IDLE", Idle(), ParseContext()),
    (b'a GETQUOTA ""', GetQuota(""), ParseContext()),
    (b"a GETQUOTAROOT INBOX", GetQuotaRoot("INBOX"), ParseContext()),
    (b'a SETQUOTA "" (STORAGE 512)', SetQuota("", (("STORAGE", 512),)), ParseContext()),
    (b"a CHECK", Check(), ParseContext()),
    (b"a CLOSE", Close(), ParseContext()),
    (b"a UNSELECT", Unselect(), ParseContext()),
    (b"a EXPUNGE", Expunge(), ParseContext()),
    (b"a UID EXPUNGE 3:5,9", Expunge(S((3, 5), (9, 9))), ParseContext()),
    (b"a COPY 2:4 Trash", Copy(S((2, 4)), "Trash"), ParseContext()),
    (b"a uid copy 1:* Trash", Copy(S((1, None)), "Trash", uid=True), ParseContext()),
    (b"a MOVE *:3 Archive", Move(S((None, 3)), "Archive"), ParseContext()),
    (b"a UID MOVE 7 Archive", Move(S((7, 7)), "Archive", uid=True), ParseContext()),
    (b"a STORE 1 +FLAGS (\\Seen)", Store(S((1, 1)), StoreMode.ADD, ("\\Seen",)), ParseContext()),
    (
        b"a STORE 1:2 -FLAGS.SILENT \\deleted $Junk",
        Store(S((1, 2)), StoreMode.REMOVE, ("\\Deleted", "$Junk"), silent=True),
        ParseContext(),
    ),
    (b"a STORE 1 FLAGS ()", Store(S((1, 1)), StoreMode.REPLACE, ()), ParseContext()),
    (
        b"a UID STORE 5 (UNCHANGEDSINCE 320162338) +FLAGS.SILENT (\\Deleted)",
        Store(S((5, 5)), StoreMode.ADD, ("\\Deleted",), True, True, 320162338),
        ParseContext(),
    ),
    (b"a FETCH 1 FLAGS", Fetch(S((1, 1)), (FetchAtt("FLAGS"),)), ParseContext()),
    (
        b"a FETCH 1:* ALL",
        Fetch(
            S((1, None)),
            tuple(FetchAtt(n) for n in ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE")),
        ),
        ParseContext(),
    ),
    (
        b"a FETCH 2 fast",
        Fetch(S((2, 2)), tuple(FetchAtt(n) for n in ("FLAGS", "INTERNALDATE", "RFC822.SIZE"))),
        ParseContext(),
    ),
    (
        b"a FETCH 2 FULL",
        Fetch(
            S((2, 2)),
            tuple(
                FetchAtt(n) for n in ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY")
            ),
        ),
        ParseContext(),
    ),
    (
        b"a FETCH 1 (UID RFC822.SIZE RFC822 RFC822.HEADER RFC822.TEXT"
        b" BODYSTRUCTURE BODY ENVELOPE MODSEQ EMAILID THREADID INTERNALDATE)",
        Fetch(
            S((1, 1)),
            tuple(
                FetchAtt(n)
                for n in (
                    "UID",
                    "RFC822.SIZE",
                    "RFC822",
                    "RFC822.HEADER",
                    "RFC822.TEXT",
                    "BODYSTRUCTURE",
                    "BODY",
                    "ENVELOPE",
                    "MODSEQ",
                    "EMAILID",
                    "THREADID",
                    "INTERNALDATE",
                )
            ),
        ),
        ParseContext(),
    ),
    (b"a FETCH 1 BODY[]", Fetch(S((1, 1)), (FetchBody(""),)), ParseContext()),
    (
        b"a FETCH 1 (BODY.PEEK[HEADER] BODY[TEXT]<0.2048>"
        b" BODY[1.2.MIME] BODY[3] BODY[4.HEADER] BODY[4.TEXT])",
        Fetch(
            S((1, 1)),
            (
                FetchBody("HEADER", (), "HEADER", peek=True),
                FetchBody("TEXT", (), "TEXT", partial=(0, 2048)),
                FetchBody("1.2.MIME", (1, 2), "MIME"),
                FetchBody("3", (3,)),
                FetchBody("4.HEADER", (4,), "HEADER"),
                FetchBody("4.TEXT", (4,), "TEXT"),
            ),
        ),
        ParseContext(),
    ),
    (
        b'a FETCH 1 BODY.PEEK[HEADER.FIELDS (From "Subject" x-spam)]',
        Fetch(
            S((1, 1)),
            (
                FetchBody(
                    "HEADER.FIELDS (From Subject x-spam)",
                    (),
                    "HEADER.FIELDS",
                    ("From", "Subject", "x-spam"),
                    peek=True,
                ),
            ),
        ),
        ParseContext(),
    ),
    (
        b"a FETCH 1 BODY[2.HEADER.FIELDS.NOT (DATE)]",
        Fetch(
            S((1, 1)),
            (FetchBody("2.HEADER.FIELDS.NOT (DATE)", (2,), "HEADER.FIELDS.NOT", ("DATE",)),),
        ),
        ParseContext(),
    ),
    (
        b"a UID FETCH 1:* (FLAGS) (CHANGEDSINCE 12345)",
        Fetch(
            S((1, None)),
            (FetchAtt("UID"), FetchAtt("FLAGS"), FetchAtt("MODSEQ")),
            uid=True,
            changedsince=12345,
        ),
        ParseContext(),
    ),
    (
        b"a UID FETCH 300:500 (FLAGS) (VANISHED CHANGEDSINCE 12345)",
        Fetch(
            S((300, 500)),
            (FetchAtt("UID"), FetchAtt("FLAGS"), FetchAtt("MODSEQ")),
            True,
            12345,
            True,
        ),
        QRESYNC,
    ),
    (b"a FETCH 1 (FLAGS FLAGS)", Fetch(S((1, 1)), (FetchAtt("FLAGS"),)), ParseContext()),
    (b"a SEARCH ALL", Search(SearchAll()), ParseContext()),
    (
        b"a UID SEARCH UNSEEN FROM smith",
        Search(SearchAnd((SearchFlag("\\Seen", False), SearchHeader("FROM", "smith"))), uid=True),
        ParseContext(),
    ),
    (
        b'a SEARCH CHARSET utf-8 TEXT "caf\xc3\xa9"',
        Search(SearchText("café", body_only=False), charset="UTF-8"),
        ParseContext(),
    ),
    (
        b"a SEARCH RETURN (MIN MAX COUNT ALL) 1:5",
        Search(SearchSeq(S((1, 5))), returns=("MIN", "MAX", "COUNT", "ALL")),
        ParseContext(),
    ),
    (
        b"a SEARCH RETURN () NEW",
        Search(SearchAnd((SearchFlag("\\Recent"), SearchFlag("\\Seen", False))), returns=("ALL",)),
        ParseContext(),
    ),
    (
        b"a SEARCH OR (DELETED SEEN) NOT OLD",
        Search(
            SearchOr(
                SearchAnd((SearchFlag("\\Deleted"), SearchFlag("\\Seen"))),
                SearchNot(SearchNot(SearchFlag("\\Recent"))),
            )
        ),
        ParseContext(),
    ),
    (
        b'a SEARCH HEADER X-Spam "" BODY {3}\r\nfoo KEYWORD $Junk UNKEYWORD $Work',
        Search(
            SearchAnd(
                (
                    SearchHeader("X-Spam", ""),
                    SearchText("foo", True),
                    SearchFlag("$Junk"),
                    SearchFlag("$Work", False),
                )
            )
        ),
        ParseContext(),
    ),
    (
        b'a SEARCH BEFORE 1-Feb-2020 ON "15-Mar-2021" SINCE 01-jan-2000'
        b" SENTBEFORE 2-Feb-2020 SENTON 3-Mar-2020 SENTSINCE 4-Apr-2020",
        Search(
            SearchAnd(
                (
                    SearchDate("BEFORE", datetime.date(2020, 2, 1)),
                    SearchDate("ON", datetime.date(2021, 3, 15)),
                    SearchDate("SINCE", datetime.date(2000, 1, 1)),
                    SearchDate("BEFORE", datetime.date(2020, 2, 2), sent=True),
                    SearchDate("ON", datetime.date(2020, 3, 3), sent=True),
                    SearchDate("SINCE", datetime.date(2020, 4, 4), sent=True),
                )
            )
        ),
        ParseContext(),
    ),
    (
        b"a SEARCH LARGER 1000 SMALLER 5000 UID 1:*,7 ANSWERED DRAFT FLAGGED"
        b" RECENT UNANSWERED UNDELETED UNDRAFT UNFLAGGED",
        Search(
            SearchAnd(
                (
                    SearchSize(1000, True),
                    SearchSize(5000, False),
                    SearchSeq(S((1, None), (7, 7)), uid=True),
                    SearchFlag("\\Answered"),
                    SearchFlag("\\Draft"),
                    SearchFlag("\\Flagged"),
                    SearchFlag("\\Recent"),
                    SearchFlag("\\Answered", False),
                    SearchFlag("\\Deleted", False),
                    SearchFlag("\\Draft", False),
                    SearchFlag("\\Flagged", False),
                )
            )
        ),
        ParseContext(),
    ),
    (
        b'a SEARCH MODSEQ "/flags/\\\\draft" all 620162338 BCC a CC b TO c SUBJECT "d e"',
        Search(
            SearchAnd(
                (
                    SearchModSeq(620162338, ("/flags/\\draft", "all")),
                    SearchHeader("BCC", "a"),
                    SearchHeader("CC", "b"),
                    SearchHeader("TO", "c"),
                    SearchHeader("SUBJECT", "d e"),
                )
            ),
            uses_modseq=True,
        ),
        ParseContext(),
    ),
    (b"a SEARCH MODSEQ 5", Search(SearchModSeq(5), uses_modseq=True), ParseContext()),
    (
        b"a SEARCH EMAILID M6d99ac3275bb4e THREADID T64b478a75b7ea9",
        Search(
            SearchAnd(
                (
                    SearchObjectId("EMAILID", "M6d99ac3275bb4e"),
                    SearchObjectId("THREADID", "T64b478a75b7ea9"),
                )
            )
        ),
        ParseContext(),
    ),
    (b"a SEARCH (1:3)", Search(SearchSeq(S((1, 3)))), ParseContext()),
]


@pytest.mark.parametrize(
    ("wire", "expected", "ctx"), CASES, ids=[c[0][:40].decode("latin-1") for c in CASES]
)
def test_command_parses(wire: bytes, expected: object, ctx: ParseContext) -> None:
    tag, cmd = parse_command(wire, ctx)
    assert tag == "a"
    assert cmd == expected


def test_every_verb_has_a_case() -> None:
    from mailharbor.proto.imap.parser import COMMANDS

    seen = {c[0].split(b" ")[1].decode().upper() for c in CASES}
    assert seen >= COMMANDS


def test_fetch_body_names_in_responses() -> None:
    _, cmd = parse_command(b"a FETCH 1 (BODY.PEEK[1.HEADER.FIELDS (From)]<10.20> BODY[])")
    assert isinstance(cmd, Fetch)
    names = [i.name for i in cmd.items]
    # RFC 9051: no .PEEK and only the origin octet of a partial fetch in the response
    assert names == ["BODY[1.HEADER.FIELDS (From)]<10>", "BODY[]"]


BAD_CASES: list[tuple[bytes, bytes, str | None]] = [
    (b"", b"BAD", None),
    (b"+ NOOP", b"BAD", None),
    (b"a", b"BAD", None),
    (b"a FROB", b"BAD", "a"),
    (b"a NOOP extra", b"BAD", "a"),
    (b"a  NOOP", b"BAD", "a"),
    (b"a LOGIN bob", b"BAD", "a"),
    (b'a LOGIN "bob pw', b"BAD", "a"),
    (b'a LOGIN "b\\ob" pw', b"BAD", "a"),
    (b"a LOGIN {5}\r\nab", b"BAD", "a"),
    (b"a LOGIN bob {2}pw", b"BAD", "a"),
    (b"a SELECT &Jjo", b"BAD", "a"),
    (b"a SELECT &AGE-", b"BAD", "a"),
    (b"a SELECT INBOX (QRESYNC (1 2))", b"BAD", "a"),  # QRESYNC not enabled
    (b"a SELECT INBOX (FOO)", b"BAD", "a"),
    (b"a FETCH 0 FLAGS", b"BAD", "a"),
    (b"a FETCH 4294967296 FLAGS", b"BAD", "a"),
    (b"a FETCH $ FLAGS", b"BAD", "a"),
    (b"a FETCH 1 (FLAGS", b"BAD", "a"),
    (b"a FETCH 1 ()", b"BAD", "a"),
    (b"a FETCH 1 BINARY[]", b"BAD", "a"),
    (b"a FETCH 1 BODY[MIME]", b"BAD", "a"),
    (b"a FETCH 1 BODY[1.FOO]", b"BAD", "a"),
    (b"a FETCH 1 BODY[HEADER.FIELDS ()]", b"BAD", "a"),
    (b"a FETCH 1 BODY[]<0.0>", b"BAD", "a"),
    (b"a FETCH 1 BODY.PEEK", b"BAD", "a"),
    (b"a UID FETCH 1 FLAGS (VANISHED CHANGEDSINCE 1)", b"BAD", "a"),  # QRESYNC not enabled
    (b"a STORE 1 FLAGS (\\Recent)", b"BAD", "a"),
    (b"a STORE 1 XFLAGS (\\Seen)", b"BAD", "a"),
    (b"a SEARCH", b"BAD", "a"),
    (b"a SEARCH FROB", b"BAD", "a"),
    (b"a SEARCH $", b"BAD", "a"),
    (b"a SEARCH RETURN (SAVE) ALL", b"BAD", "a"),
    (b"a SEARCH BEFORE 30-Feb-2020", b"BAD", "a"),
    (b"a SEARCH " + b"NOT " * 100 + b"ALL", b"BAD", "a"),
    (b"a SEARCH " + b"(" * 100 + b"ALL" + b")" * 100, b"BAD", "a"),
    (b"a SEARCH CHARSET KOI8-R ALL", b"NO [BADCHARSET (US-ASCII UTF-8)]", "a"),
    (b'a LIST (RECURSIVEMATCH) "" *', b"BAD", "a"),
    (b'a LIST (BOGUS) "" *', b"BAD", "a"),
    (b'a LIST "" * RETURN (BOGUS)', b"BAD", "a"),
    (b"a STATUS INBOX ()", b"BAD", "a"),
    (b"a STATUS INBOX (FOO)", b"BAD", "a"),
    (b"a APPEND INBOX hello", b"BAD", "a"),
    (b"a APPEND INBOX (\\Recent) {1}\r\nx", b"BAD", "a"),
    (b'a APPEND INBOX "31-Feb-2020 10:00:00 +0100" {1}\r\nx', b"BAD", "a"),
    (b"a APPEND INBOX UTF8 (~{1}\r\nx)", b"BAD", "a"),  # UTF8=ACCEPT not enabled
    (b"a LOGIN {3}\r\na\x00b pw", b"BAD", "a"),
    (b"a CREATE x (USE (\\Bogus))", b"BAD", "a"),
    (b"a UID FROB 1", b"BAD", "a"),
    (b"a ENABLE", b"BAD", "a"),
    (b"a LOGIN \xff\xfe pw", b"BAD", "a"),
]


@pytest.mark.parametrize(
    ("wire", "reply", "tag"), BAD_CASES, ids=[c[0][:40].decode("latin-1") for c in BAD_CASES]
)
def test_malformed_command_is_refused(wire: bytes, reply: bytes, tag: str | None) -> None:
    with pytest.raises(ImapParseError) as info:
        parse_command(wire)
    assert info.value.tag == tag
    line = info.value.response.to_bytes(tag or "*")
    assert line.startswith((tag or "*").encode() + b" " + reply)
    # fixed texts only: no Python exception text, one line
    assert line.count(b"\r\n") == 1 and b"Error(" not in line and b"Traceback" not in line
