"""The IMAP command parser: one complete command (lines and literals, as on the wire) in, a
typed :mod:`~.commands` dataclass out.

:func:`parse_command` takes the command's bytes without the final CRLF; literals appear as on
the wire (``{n}\\r\\n`` or ``{n+}\\r\\n`` followed by ``n`` octets). It returns ``(tag,
command)`` or raises :class:`~.events.ImapParseError` carrying the response to send (a tagged
``BAD`` with a short fixed text, or ``NO [BADCHARSET]``), and the tag when it could be read.
It raises nothing else for any input: recursion is bounded (:data:`MAX_DEPTH`), numbers are
range-checked, strings are decoded strictly.

Choices, documented:

- Grammar is RFC 9051 with the RFC 3501 forms (LSUB, RECENT/NEW/OLD, RFC822.*) and the
  extensions the server offers. Keywords are case-insensitive; exactly one SP separates
  arguments (as the ABNF says).
- Mailbox names: with UTF-8 in effect (``ParseContext.utf8``) the string is UTF-8 as is;
  otherwise a 7-bit name must be canonical modified UTF-7 (``BAD`` if not), and a name with
  8-bit octets (a literal or a lenient quoted string) is taken as UTF-8, as Dovecot does.
  ``INBOX`` is case-insensitive.
- Quoted strings may hold UTF-8 in every mode (lenient); only ``\\\\`` and ``\\"`` escapes.
- NUL octets are refused in strings, but an APPEND message may hold them (it is stored as
  received; RFC 9051 forbids them, real mail sometimes has them).
- ``$`` (SEARCHRES) is refused: SEARCHRES is not advertised. ``literal8`` (``~{n}``) is only
  accepted in ``APPEND ... UTF8 (~{n})`` with UTF8=ACCEPT in effect. ESEARCH ``SAVE`` is
  refused. QRESYNC parameters and the VANISHED modifier need ``ParseContext.qresync``.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass

from .commands import (
    Append,
    AuthenticateStart,
    Capability,
    Check,
    Close,
    Command,
    Copy,
    Create,
    Delete,
    Enable,
    Expunge,
    Fetch,
    FetchAtt,
    FetchBody,
    FetchItem,
    GetQuota,
    GetQuotaRoot,
    Id,
    Idle,
    List,
    Login,
    Logout,
    Lsub,
    Move,
    Namespace,
    Noop,
    QresyncParams,
    Rename,
    Search,
    SearchAll,
    SearchAnd,
    SearchDate,
    SearchFlag,
    SearchHeader,
    SearchKey,
    SearchModSeq,
    SearchNot,
    SearchObjectId,
    SearchOr,
    SearchSeq,
    SearchSize,
    SearchText,
    Select,
    SetQuota,
    StartTls,
    Status,
    Store,
    StoreMode,
    Subscribe,
    Unselect,
    Unsubscribe,
)
from .events import ImapParseError
from .mutf7 import decode_mutf7
from .responses import AString, Code, bad, no, render
from .seqset import MAX_NUMBER, SequenceSet

__all__ = [
    "COMMANDS",
    "MAX_DEPTH",
    "ParseContext",
    "decode_sasl",
    "parse_command",
    "read_tag_verb",
    "recover_tag",
]

#: Deepest nesting of SEARCH keys (NOT/OR/parentheses) accepted.
MAX_DEPTH = 64
_MAX_NUMBER64 = 2**63 - 1

#: Every command verb the parser knows (``UID`` covers its sub-commands).
COMMANDS = frozenset(
    {
        "CAPABILITY", "NOOP", "LOGOUT", "ID", "STARTTLS", "LOGIN", "AUTHENTICATE", "ENABLE",
        "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST",
        "LSUB", "NAMESPACE", "STATUS", "APPEND", "IDLE", "GETQUOTA", "GETQUOTAROOT", "SETQUOTA",
        "CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "COPY", "MOVE", "STORE", "FETCH", "SEARCH",
        "UID",
    }
)  # fmt: skip


@dataclass(frozen=True)
class ParseContext:
    """Session facts that change the grammar: ``utf8`` (UTF8=ACCEPT or IMAP4rev2 enabled:
    mailbox names are UTF-8), ``qresync`` (ENABLE QRESYNC done), ``utf8_accept`` (UTF8=ACCEPT
    is enabled: APPEND's ``UTF8 (literal8)`` form is allowed)."""

    utf8: bool = False
    qresync: bool = False
    utf8_accept: bool = False


_DEFAULT_CONTEXT = ParseContext()

# ATOM-CHAR: any CHAR except atom-specials: ( ) { SP CTL % * " \ ]
_ATOM = frozenset(c for c in range(0x21, 0x7F) if c not in b'(){%*"\\]')
_ASTRING = _ATOM | {0x5D}
_LIST_CHAR = _ATOM | {0x25, 0x2A, 0x5D}
_TAG = _ASTRING - {0x2B}
_TAG_RE = re.compile(rb"[\x21\x23-\x27\x2c-\x5b\x5e-\x7a\x7c\x7e]+")  # ASTRING-CHAR minus "+"
_DIGITS = frozenset(b"0123456789")
_MONTHS = {
    m: i + 1
    for i, m in enumerate(
        ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
    )
}
_SYSTEM_FLAGS = {
    f.upper(): f for f in ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
}
_STATUS_ITEMS = frozenset(
    {"MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "DELETED", "SIZE", "RECENT",
     "HIGHESTMODSEQ", "MAILBOXID"}
)  # fmt: skip
_SELECT_OPTS = frozenset({"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"})
_RETURN_OPTS = frozenset({"SUBSCRIBED", "CHILDREN", "SPECIAL-USE", "STATUS"})
_ESEARCH_OPTS = frozenset({"MIN", "MAX", "ALL", "COUNT"})
_CHARSETS = frozenset({"US-ASCII", "UTF-8"})
_SPECIAL_USE = frozenset(
    {"\\ALL", "\\ARCHIVE", "\\DRAFTS", "\\FLAGGED", "\\JUNK", "\\SENT", "\\TRASH", "\\IMPORTANT"}
)
_SIMPLE_FETCH = frozenset(
    {"ENVELOPE", "FLAGS", "INTERNALDATE", "RFC822", "RFC822.HEADER", "RFC822.SIZE",
     "RFC822.TEXT", "BODY", "BODYSTRUCTURE", "UID", "MODSEQ", "EMAILID", "THREADID"}
)  # fmt: skip
_FETCH_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_SEARCH_FLAGS = {
    "ANSWERED": ("\\Answered", True),
    "DELETED": ("\\Deleted", True),
    "DRAFT": ("\\Draft", True),
    "FLAGGED": ("\\Flagged", True),
    "SEEN": ("\\Seen", True),
    "RECENT": ("\\Recent", True),
    "UNANSWERED": ("\\Answered", False),
    "UNDELETED": ("\\Deleted", False),
    "UNDRAFT": ("\\Draft", False),
    "UNFLAGGED": ("\\Flagged", False),
    "UNSEEN": ("\\Seen", False),
}
_SEARCH_HEADERS = frozenset({"BCC", "CC", "FROM", "SUBJECT", "TO"})
_SEARCH_DATES = {
    "BEFORE": ("BEFORE", False),
    "ON": ("ON", False),
    "SINCE": ("SINCE", False),
    "SENTBEFORE": ("BEFORE", True),
    "SENTON": ("ON", True),
    "SENTSINCE": ("SINCE", True),
}

_R_SYNTAX = "Syntax error in command"


class _Reader:
    """A cursor over one command's bytes. Every failure raises ImapParseError with the tag."""

    def __init__(self, data: bytes, ctx: ParseContext) -> None:
        self.data = data
        self.pos = 0
        self.ctx = ctx
        self.tag: str | None = None

    # -- errors

    def fail(self, reason: str, text: str = _R_SYNTAX, code: Code | None = None) -> ImapParseError:
        return ImapParseError(reason, bad(text, code), self.tag)

    # -- primitives

    def peek(self) -> int:
        return self.data[self.pos] if self.pos < len(self.data) else -1

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self.fail("trailing characters")

    def sp(self) -> None:
        if self.peek() != 0x20:
            raise self.fail("expected SP")
        self.pos += 1

    def maybe_sp(self) -> bool:
        if self.peek() == 0x20:
            self.pos += 1
            return True
        return False

    def char(self, c: bytes) -> None:
        if self.peek() != c[0]:
            raise self.fail(f"expected {c!r}")
        self.pos += 1

    def maybe_char(self, c: bytes) -> bool:
        if self.peek() == c[0]:
            self.pos += 1
            return True
        return False

    def _run(self, allowed: frozenset[int]) -> bytes:
        start = self.pos
        data = self.data
        n = len(data)
        i = start
        while i < n and data[i] in allowed:
            i += 1
        self.pos = i
        return data[start:i]

    def atom(self) -> str:
        b = self._run(_ATOM)
        if not b:
            raise self.fail("expected atom")
        return b.decode("ascii")

    def keyword(self) -> str:
        return self.atom().upper()

    def expect_keyword(self, word: str) -> None:
        save = self.pos
        if self.keyword() != word:
            self.pos = save
            raise self.fail(f"expected {word}")

    def number(self, maximum: int = _MAX_NUMBER64, minimum: int = 0) -> int:
        b = self._run(_DIGITS)
        if not b or len(b) > 19:
            raise self.fail("expected number")
        v = int(b)
        if not minimum <= v <= maximum:
            raise self.fail("number out of range")
        return v

    def nz_number(self) -> int:
        return self.number(MAX_NUMBER, 1)

    def modseq(self) -> int:
        return self.number(_MAX_NUMBER64, 1)

    def quoted(self) -> bytes:
        self.char(b'"')
        data = self.data
        out = bytearray()
        i = self.pos
        n = len(data)
        while True:
            j = i
            while j < n and data[j] not in (0x22, 0x5C, 0x0D, 0x0A, 0x00):
                j += 1
            out += data[i:j]
            if j >= n:
                raise self.fail("unterminated quoted string")
            c = data[j]
            if c == 0x22:
                self.pos = j + 1
                return bytes(out)
            if c == 0x5C:
                if j + 1 < n and data[j + 1] in (0x22, 0x5C):
                    out.append(data[j + 1])
                    i = j + 2
                    continue
                raise self.fail("bad escape in quoted string")
            raise self.fail("control character in quoted string")

    def literal(self, binary: bool = False, allow_nul: bool = False) -> bytes:
        """``{n}``/``{n+}`` (or ``~{n}`` when ``binary``) and its octets. NUL is refused except
        in literal8 and where ``allow_nul`` (APPEND's message: stored as received)."""
        if binary:
            self.char(b"~")
        self.char(b"{")
        n = self.number(_MAX_NUMBER64)
        self.maybe_char(b"+")
        self.char(b"}")
        if self.data[self.pos : self.pos + 2] != b"\r\n":
            raise self.fail("literal not followed by CRLF")
        start = self.pos + 2
        if start + n > len(self.data):
            raise self.fail("literal shorter than announced")
        self.pos = start + n
        value = self.data[start : start + n]
        if not (binary or allow_nul) and b"\0" in value:
            raise self.fail("NUL in literal")
        return value

    def string(self) -> bytes:
        c = self.peek()
        if c == 0x22:
            return self.quoted()
        if c == 0x7B:
            return self.literal()
        raise self.fail("expected string")

    def astring(self) -> bytes:
        c = self.peek()
        if c in (0x22, 0x7B):
            return self.string()
        b = self._run(_ASTRING)
        if not b:
            raise self.fail("expected astring")
        return b

    def nstring(self) -> bytes | None:
        if self.peek() in (0x4E, 0x6E):  # N/n
            save = self.pos
            if self._run(_ATOM).upper() == b"NIL":
                return None
            self.pos = save
        return self.string()

    def text(self, b: bytes) -> str:
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("invalid UTF-8", "Invalid UTF-8 in string") from None

    def astr(self) -> str:
        return self.text(self.astring())

    # -- IMAP types

    def _mailbox_name(self, raw: bytes) -> str:
        name = self.text(raw)
        if not self.ctx.utf8 and raw.isascii():
            try:
                name = decode_mutf7(name)
            except ValueError:
                raise self.fail("bad mUTF-7", "Invalid mailbox name (modified UTF-7)") from None
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
            raise self.fail("control character in mailbox name", "Invalid mailbox name")
        return "INBOX" if name.upper() == "INBOX" else name

    def mailbox(self) -> str:
        return self._mailbox_name(self.astring())

    def list_mailbox(self) -> str:
        c = self.peek()
        if c in (0x22, 0x7B):
            raw = self.string()
        else:
            raw = self._run(_LIST_CHAR)
            if not raw:
                raise self.fail("expected mailbox pattern")
        return self._mailbox_name(raw)

    def flag(self) -> str:
        if self.maybe_char(b"\\"):
            if self.maybe_char(b"*"):
                return "\\*"
            name = self.atom()
            return _SYSTEM_FLAGS.get("\\" + name.upper(), "\\" + name)
        return self.atom()

    def flag_list(self) -> tuple[str, ...]:
        self.char(b"(")
        out: list[str] = []
        if not self.maybe_char(b")"):
            while True:
                f = self.flag()
                if f not in out:
                    out.append(f)
                if self.maybe_char(b")"):
                    break
                self.sp()
        return tuple(out)

    def store_flag(self) -> str:
        f = self.flag()
        if f in ("\\*",) or f.upper() == "\\RECENT":
            raise self.fail("flag not storable", "Invalid flag")
        return f

    def seq_number(self) -> int | None:
        if self.maybe_char(b"*"):
            return None
        if self.peek() == 0x24:  # $
            raise self.fail("SEARCHRES", "SEARCHRES ($) is not supported")
        return self.nz_number()

    def sequence_set(self, allow_star: bool = True) -> SequenceSet:
        ranges: list[tuple[int | None, int | None]] = []
        while True:
            a = self.seq_number()
            b = a
            if self.maybe_char(b":"):
                b = self.seq_number()
            if not allow_star and (a is None or b is None):
                raise self.fail("* not allowed here")
            ranges.append((a, b))
            if not self.maybe_char(b","):
                break
        return SequenceSet(tuple(ranges))

    def date(self) -> datetime.date:
        quoted = self.maybe_char(b'"')
        day = self._run(_DIGITS)
        if not 1 <= len(day) <= 2:
            raise self.fail("bad date")
        self.char(b"-")
        month = _MONTHS.get(self.data[self.pos : self.pos + 3].decode("latin-1").upper())
        if month is None:
            raise self.fail("bad month")
        self.pos += 3
        self.char(b"-")
        year = self._run(_DIGITS)
        if len(year) != 4:
            raise self.fail("bad year")
        if quoted:
            self.char(b'"')
        try:
            return datetime.date(int(year), month, int(day))
        except ValueError:
            raise self.fail("bad date") from None

    def date_time(self) -> datetime.datetime:
        self.char(b'"')
        if self.peek() == 0x20:
            self.pos += 1
        d = self.date()
        self.sp()
        parts: list[int] = []
        for i in range(3):
            if i:
                self.char(b":")
            p = self._run(_DIGITS)
            if len(p) != 2:
                raise self.fail("bad time")
            parts.append(int(p))
        self.sp()
        sign = self.peek()
        if sign not in (0x2B, 0x2D):
            raise self.fail("bad zone")
        self.pos += 1
        zone = self._run(_DIGITS)
        if len(zone) != 4:
            raise self.fail("bad zone")
        self.char(b'"')
        minutes = int(zone[:2]) * 60 + int(zone[2:])
        if sign == 0x2D:
            minutes = -minutes
        try:
            tz = datetime.timezone(datetime.timedelta(minutes=minutes))
            return datetime.datetime(
                d.year, d.month, d.day, parts[0], parts[1], parts[2], tzinfo=tz
            )
        except ValueError:
            raise self.fail("bad date-time") from None

    def paren_list(self, item: Callable[[], object]) -> None:
        """``( item *(SP item) )`` (possibly empty); ``item`` consumes one element."""
        self.char(b"(")
        if self.maybe_char(b")"):
            return
        while True:
            item()
            if self.maybe_char(b")"):
                return
            self.sp()


def recover_tag(data: bytes) -> str | None:
    """The command's tag if its first word is a valid tag followed by SP, else None."""
    m = _TAG_RE.match(data)
    if m is None or data[m.end() : m.end() + 1] != b" ":
        return None
    return m.group().decode("ascii")


def read_tag_verb(data: bytes) -> tuple[str, str]:
    """``(tag, VERB)`` of a command line; ImapParseError (tag None if unreadable) otherwise.
    ``VERB`` is upper-cased and not checked against :data:`COMMANDS`."""
    tag = recover_tag(data)
    if tag is None:
        raise ImapParseError("bad tag", bad("Invalid tag"))
    r = _Reader(data, _DEFAULT_CONTEXT)
    r.tag = tag
    r.pos = len(tag) + 1
    verb = r._run(_ATOM)
    if not verb:
        raise r.fail("missing command", "Missing command")
    return tag, verb.decode("ascii").upper()


def parse_command(data: bytes, ctx: ParseContext = _DEFAULT_CONTEXT) -> tuple[str, Command]:
    """Parse one complete command (see the module docstring)."""
    tag, verb = read_tag_verb(data)
    r = _Reader(data, ctx)
    r.tag = tag
    r.pos = len(tag) + 1 + len(verb)
    if verb == "UID":
        r.sp()
        sub = r.keyword()
        handler = _UID_PARSERS.get(sub)
        if handler is None:
            raise r.fail("unknown UID command", "Unknown UID command")
        cmd = handler(r, True)
    else:
        parser = _PARSERS.get(verb)
        if parser is None:
            raise r.fail("unknown command", "Unknown command")
        cmd = parser(r, False)
    r.end()
    return tag, cmd


# --------------------------------------------------------------------------- command parsers


def _no_args(cls: Callable[[], Command]) -> Callable[[_Reader, bool], Command]:
    def parse(r: _Reader, uid: bool) -> Command:
        return cls()

    return parse


def _p_id(r: _Reader, uid: bool) -> Command:
    r.sp()
    if r.peek() != 0x28:
        if r.keyword() != "NIL":
            raise r.fail("bad ID")
        return Id(None)
    pairs: list[tuple[str, str | None]] = []

    def pair() -> None:
        k = r.text(r.string())
        r.sp()
        v = r.nstring()
        if len(pairs) >= 30 or len(k) > 30 or (v is not None and len(v) > 1024):
            raise r.fail("ID too large", "ID parameters too large")
        pairs.append((k, None if v is None else r.text(v)))

    r.paren_list(pair)
    return Id(tuple(pairs))


def _p_login(r: _Reader, uid: bool) -> Command:
    r.sp()
    user = r.astr()
    r.sp()
    pw = r.astr()
    return Login(user, pw)


def _p_authenticate(r: _Reader, uid: bool) -> Command:
    r.sp()
    mech = r.keyword()
    initial: str | None = None
    if r.maybe_sp():
        b = r._run(frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="))
        if not b:
            raise r.fail("bad initial response")
        initial = b.decode("ascii")
    return AuthenticateStart(mech, initial)


def _p_enable(r: _Reader, uid: bool) -> Command:
    caps: list[str] = []
    while r.maybe_sp():
        caps.append(r.keyword())
    if not caps:
        raise r.fail("ENABLE without capability")
    return Enable(tuple(caps))


def _qresync(r: _Reader) -> QresyncParams:
    r.char(b"(")
    uidvalidity = r.nz_number()
    r.sp()
    modseq = r.modseq()
    known: SequenceSet | None = None
    match: tuple[SequenceSet, SequenceSet] | None = None
    if r.maybe_sp():
        if r.peek() != 0x28:
            known = r.sequence_set(allow_star=False)
            if r.maybe_sp():
                match = _seq_match(r)
        else:
            match = _seq_match(r)
    r.char(b")")
    return QresyncParams(uidvalidity, modseq, known, match)


def _seq_match(r: _Reader) -> tuple[SequenceSet, SequenceSet]:
    r.char(b"(")
    seqs = r.sequence_set(allow_star=False)
    r.sp()
    uids = r.sequence_set(allow_star=False)
    r.char(b")")
    return seqs, uids


def _p_select(readonly: bool) -> Callable[[_Reader, bool], Command]:
    def parse(r: _Reader, uid: bool) -> Command:
        r.sp()
        mailbox = r.mailbox()
        condstore = False
        qresync: QresyncParams | None = None
        if r.maybe_sp():

            def param() -> None:
                nonlocal condstore, qresync
                name = r.keyword()
                if name == "CONDSTORE" and not condstore:
                    condstore = True
                elif name == "QRESYNC" and qresync is None:
                    if not r.ctx.qresync:
                        raise r.fail("QRESYNC not enabled", "QRESYNC is not enabled")
                    r.sp()
                    qresync = _qresync(r)
                else:
                    raise r.fail("unknown SELECT parameter", "Unknown SELECT parameter")

            r.paren_list(param)
        return Select(mailbox, readonly, condstore, qresync)

    return parse


def _p_create(r: _Reader, uid: bool) -> Command:
    r.sp()
    mailbox = r.mailbox()
    use: list[str] = []
    if r.maybe_sp():

        def param() -> None:
            if r.keyword() != "USE":
                raise r.fail("unknown CREATE parameter", "Unknown CREATE parameter")
            r.sp()

            def attr() -> None:
                r.char(b"\\")
                a = "\\" + r.atom()
                if a.upper() not in _SPECIAL_USE:
                    raise r.fail("bad special-use", "Unknown special-use attribute")
                use.append(a[0:2].upper() + a[2:].lower())

            r.paren_list(attr)

        r.paren_list(param)
    return Create(mailbox, tuple(dict.fromkeys(use)))


def _one_mailbox(cls: Callable[[str], Command]) -> Callable[[_Reader, bool], Command]:
    def parse(r: _Reader, uid: bool) -> Command:
        r.sp()
        return cls(r.mailbox())

    return parse


def _p_rename(r: _Reader, uid: bool) -> Command:
    r.sp()
    old = r.mailbox()
    r.sp()
    return Rename(old, r.mailbox())


def _status_items(r: _Reader) -> tuple[str, ...]:
    items: list[str] = []

    def item() -> None:
        name = r.keyword()
        if name not in _STATUS_ITEMS:
            raise r.fail("unknown STATUS item", "Unknown STATUS item")
        if name not in items:
            items.append(name)

    r.paren_list(item)
    if not items:
        raise r.fail("empty STATUS items")
    return tuple(items)


def _p_list(r: _Reader, uid: bool) -> Command:
    r.sp()
    selection: set[str] = set()
    extended = False
    if r.peek() == 0x28:
        extended = True

        def sel() -> None:
            opt = r.keyword()
            if opt not in _SELECT_OPTS:
                raise r.fail("unknown LIST option", "Unknown LIST selection option")
            selection.add(opt)

        r.paren_list(sel)
        r.sp()
        if "RECURSIVEMATCH" in selection and len(selection) == 1:
            raise r.fail("RECURSIVEMATCH alone", "RECURSIVEMATCH needs another option")
    reference = r.mailbox()
    r.sp()
    patterns: list[str] = []
    if r.peek() == 0x28:
        extended = True
        r.paren_list(lambda: patterns.append(r.list_mailbox()))
        if not patterns:
            raise r.fail("no patterns")
    else:
        patterns.append(r.list_mailbox())
    returns: set[str] = set()
    status_items: tuple[str, ...] = ()
    if r.maybe_sp():
        extended = True
        r.expect_keyword("RETURN")
        r.sp()

        def ret() -> None:
            nonlocal status_items
            opt = r.keyword()
            if opt not in _RETURN_OPTS:
                raise r.fail("unknown RETURN option", "Unknown LIST RETURN option")
            if opt == "STATUS":
                r.sp()
                status_items = _status_items(r)
            returns.add(opt)

        r.paren_list(ret)
    return List(
        reference,
        tuple(patterns),
        frozenset(selection),
        frozenset(returns),
        status_items,
        extended,
    )


def _p_lsub(r: _Reader, uid: bool) -> Command:
    r.sp()
    reference = r.mailbox()
    r.sp()
    return Lsub(reference, r.list_mailbox())


def _p_status(r: _Reader, uid: bool) -> Command:
    r.sp()
    mailbox = r.mailbox()
    r.sp()
    return Status(mailbox, _status_items(r))


def _p_append(r: _Reader, uid: bool) -> Command:
    r.sp()
    mailbox = r.mailbox()
    r.sp()
    flags: tuple[str, ...] = ()
    when: datetime.datetime | None = None
    if r.peek() == 0x28:
        flags = r.flag_list()
        if any(f == "\\*" or f.upper() == "\\RECENT" for f in flags):
            raise r.fail("bad APPEND flag", "Invalid flag")
        r.sp()
    if r.peek() == 0x22:
        when = r.date_time()
        r.sp()
    if r.peek() in (0x55, 0x75):  # UTF8 (~{n})
        r.expect_keyword("UTF8")
        if not r.ctx.utf8_accept:
            raise r.fail("UTF8 APPEND without UTF8=ACCEPT", "UTF8=ACCEPT is not enabled")
        r.sp()
        r.char(b"(")
        message = r.literal(binary=True)
        r.char(b")")
        return Append(mailbox, flags, when, message, True)
    if r.peek() != 0x7B:
        raise r.fail("APPEND without literal", "APPEND needs a literal message")
    return Append(mailbox, flags, when, r.literal(allow_nul=True))


def _p_getquota(r: _Reader, uid: bool) -> Command:
    r.sp()
    return GetQuota(r.astr())


def _p_setquota(r: _Reader, uid: bool) -> Command:
    r.sp()
    root = r.astr()
    r.sp()
    limits: list[tuple[str, int]] = []

    def res() -> None:
        name = r.keyword()
        r.sp()
        limits.append((name, r.number()))

    r.paren_list(res)
    return SetQuota(root, tuple(limits))


def _p_expunge(r: _Reader, uid: bool) -> Command:
    if uid:
        r.sp()
        return Expunge(r.sequence_set())
    return Expunge()


def _p_copy_move(move: bool) -> Callable[[_Reader, bool], Command]:
    def parse(r: _Reader, uid: bool) -> Command:
        r.sp()
        seq = r.sequence_set()
        r.sp()
        mailbox = r.mailbox()
        return Move(seq, mailbox, uid) if move else Copy(seq, mailbox, uid)

    return parse


def _p_store(r: _Reader, uid: bool) -> Command:
    r.sp()
    seq = r.sequence_set()
    r.sp()
    unchanged: int | None = None
    if r.peek() == 0x28:
        r.char(b"(")
        r.expect_keyword("UNCHANGEDSINCE")
        r.sp()
        unchanged = r.number(_MAX_NUMBER64)
        r.char(b")")
        r.sp()
    mode = StoreMode.REPLACE
    if r.maybe_char(b"+"):
        mode = StoreMode.ADD
    elif r.maybe_char(b"-"):
        mode = StoreMode.REMOVE
    item = r.keyword()
    if item not in ("FLAGS", "FLAGS.SILENT"):
        raise r.fail("bad STORE item", "Unknown STORE item")
    r.sp()
    flags: list[str] = []
    if r.peek() == 0x28:
        r.paren_list(lambda: flags.append(r.store_flag()))
    else:
        flags.append(r.store_flag())
        while r.maybe_sp():
            flags.append(r.store_flag())
    return Store(seq, mode, tuple(dict.fromkeys(flags)), item.endswith(".SILENT"), uid, unchanged)


def _section(r: _Reader, peek: bool) -> FetchBody:
    # after "BODY[" / "BODY.PEEK["
    part: list[int] = []
    text = ""
    fields: tuple[str, ...] = ()
    need_text = False
    if r.peek() in _DIGITS:
        while True:
            part.append(r.nz_number())
            if not r.maybe_char(b"."):
                break
            if r.peek() not in _DIGITS:
                need_text = True
                break
    if need_text or (not part and r.peek() != 0x5D):
        word = r._run(_SECTION_WORD).upper()
        text = word.decode("ascii")
        if text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            r.sp()
            names: list[str] = []
            r.paren_list(lambda: names.append(r.astr()))
            if not names:
                raise r.fail("empty header list")
            fields = tuple(names)
        elif text not in ("HEADER", "TEXT", "MIME") or (text == "MIME" and not part):
            raise r.fail("bad section", "Invalid section")
    r.char(b"]")
    partial: tuple[int, int] | None = None
    if r.maybe_char(b"<"):
        start = r.number(_MAX_NUMBER64)
        r.char(b".")
        length = r.number(_MAX_NUMBER64, 1)
        r.char(b">")
        partial = (start, length)
    spec = ".".join(str(p) for p in part)
    if text:
        spec = f"{spec}.{text}" if spec else text
    if fields:
        spec += " (" + " ".join(render(AString(f), True).decode("utf-8") for f in fields) + ")"
    return FetchBody(spec, tuple(part), text, fields, partial, peek)


_SECTION_WORD = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.")
_FETCH_NAME = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.")


def _fetch_att(r: _Reader) -> FetchItem:
    name = r._run(_FETCH_NAME).decode("ascii").upper()
    if not name:
        raise r.fail("expected fetch item")
    if name in ("BODY", "BODY.PEEK") and r.maybe_char(b"["):
        return _section(r, name == "BODY.PEEK")
    if name in _SIMPLE_FETCH:
        return FetchAtt(name)
    raise r.fail("unknown fetch item", "Unknown FETCH item")


def _p_fetch(r: _Reader, uid: bool) -> Command:
    r.sp()
    seq = r.sequence_set()
    r.sp()
    items: list[FetchItem] = []
    if r.peek() == 0x28:
        r.paren_list(lambda: items.append(_fetch_att(r)))
        if not items:
            raise r.fail("empty FETCH list")
    else:
        save = r.pos
        word = r._run(_FETCH_NAME).decode("ascii").upper()
        if word in _FETCH_MACROS and r.peek() != 0x5B:
            items = [FetchAtt(n) for n in _FETCH_MACROS[word]]
        else:
            r.pos = save
            items.append(_fetch_att(r))
    changedsince: int | None = None
    vanished = False
    if r.maybe_sp():
        seen: set[str] = set()

        def modifier() -> None:
            nonlocal changedsince, vanished
            name = r.keyword()
            if name in seen:
                raise r.fail("duplicate FETCH modifier")
            seen.add(name)
            if name == "CHANGEDSINCE":
                r.sp()
                changedsince = r.modseq()
            elif name == "VANISHED":
                vanished = True
            else:
                raise r.fail("unknown FETCH modifier", "Unknown FETCH modifier")

        r.paren_list(modifier)
        if vanished and (not uid or changedsince is None or not r.ctx.qresync):
            raise r.fail("bad VANISHED", "VANISHED needs UID FETCH, CHANGEDSINCE and QRESYNC")
    unique = list(dict.fromkeys(items))
    if uid and FetchAtt("UID") not in unique:
        unique.insert(0, FetchAtt("UID"))
    if changedsince is not None and FetchAtt("MODSEQ") not in unique:
        unique.append(FetchAtt("MODSEQ"))
    return Fetch(seq, tuple(unique), uid, changedsince, vanished)


class _SearchParser:
    def __init__(self, r: _Reader) -> None:
        self.r = r
        self.uses_modseq = False

    def key(self, depth: int) -> SearchKey:
        r = self.r
        if depth > MAX_DEPTH:
            raise r.fail("search too deep", "Search program nested too deeply")
        c = r.peek()
        if c == 0x28:
            keys: list[SearchKey] = []
            r.char(b"(")
            while True:
                keys.append(self.key(depth + 1))
                if r.maybe_char(b")"):
                    break
                r.sp()
            return keys[0] if len(keys) == 1 else SearchAnd(tuple(keys))
        if c == 0x2A or c in _DIGITS or c == 0x24:
            return SearchSeq(r.sequence_set())
        word = r.keyword()
        if word == "ALL":
            return SearchAll()
        flag = _SEARCH_FLAGS.get(word)
        if flag is not None:
            return SearchFlag(*flag)
        if word == "NEW":
            return SearchAnd((SearchFlag("\\Recent"), SearchFlag("\\Seen", False)))
        if word == "OLD":
            return SearchNot(SearchFlag("\\Recent"))
        r.sp()
        if word in _SEARCH_HEADERS:
            return SearchHeader(word, self.string())
        if word == "HEADER":
            name = r.astr()
            r.sp()
            return SearchHeader(name, self.string())
        if word in ("BODY", "TEXT"):
            return SearchText(self.string(), word == "BODY")
        if word in ("KEYWORD", "UNKEYWORD"):
            f = r.flag()
            return SearchFlag(f, word == "KEYWORD")
        dated = _SEARCH_DATES.get(word)
        if dated is not None:
            return SearchDate(dated[0], r.date(), dated[1])
        if word in ("LARGER", "SMALLER"):
            return SearchSize(r.number(), word == "LARGER")
        if word == "UID":
            return SearchSeq(r.sequence_set(), uid=True)
        if word == "NOT":
            return SearchNot(self.key(depth + 1))
        if word == "OR":
            left = self.key(depth + 1)
            r.sp()
            return SearchOr(left, self.key(depth + 1))
        if word == "MODSEQ":
            self.uses_modseq = True
            entry: tuple[str, str] | None = None
            if r.peek() == 0x22:
                name = r.text(r.quoted())
                r.sp()
                kind = r.keyword().lower()
                if kind not in ("priv", "shared", "all"):
                    raise r.fail("bad MODSEQ entry type")
                r.sp()
                entry = (name, kind)
            return SearchModSeq(r.number(_MAX_NUMBER64), entry)
        if word in ("EMAILID", "THREADID"):
            value = r.atom()
            if len(value) > 255:
                raise r.fail("objectid too long")
            return SearchObjectId(word, value)
        raise r.fail("unknown search key", "Unknown search key")

    def string(self) -> str:
        return self.r.astring().decode("utf-8", "replace")


def _p_search(r: _Reader, uid: bool) -> Command:
    r.sp()
    returns: tuple[str, ...] | None = None
    charset: str | None = None
    save = r.pos
    if r._run(_ATOM).upper() == b"RETURN" and r.peek() == 0x20:
        r.sp()
        opts: list[str] = []

        def opt() -> None:
            o = r.keyword()
            if o == "SAVE":
                raise r.fail("SAVE", "SEARCHRES (SAVE) is not supported")
            if o not in _ESEARCH_OPTS:
                raise r.fail("unknown RETURN option", "Unknown SEARCH RETURN option")
            if o not in opts:
                opts.append(o)

        r.paren_list(opt)
        returns = tuple(opts) or ("ALL",)
        r.sp()
        save = r.pos
    r.pos = save
    if r._run(_ATOM).upper() == b"CHARSET" and r.peek() == 0x20:
        r.sp()
        charset = r.astr().upper()
        r.sp()
        if charset not in _CHARSETS:
            raise ImapParseError(
                "unsupported charset",
                no("Unsupported charset", Code.badcharset()),
                r.tag,
            )
    else:
        r.pos = save
    sp = _SearchParser(r)
    keys = [sp.key(0)]
    while r.maybe_sp():
        keys.append(sp.key(0))
    key = keys[0] if len(keys) == 1 else SearchAnd(tuple(keys))
    return Search(key, uid, charset, returns, sp.uses_modseq)


_PARSERS: dict[str, Callable[[_Reader, bool], Command]] = {
    "CAPABILITY": _no_args(Capability),
    "NOOP": _no_args(Noop),
    "LOGOUT": _no_args(Logout),
    "ID": _p_id,
    "STARTTLS": _no_args(StartTls),
    "LOGIN": _p_login,
    "AUTHENTICATE": _p_authenticate,
    "ENABLE": _p_enable,
    "SELECT": _p_select(False),
    "EXAMINE": _p_select(True),
    "CREATE": _p_create,
    "DELETE": _one_mailbox(Delete),
    "RENAME": _p_rename,
    "SUBSCRIBE": _one_mailbox(Subscribe),
    "UNSUBSCRIBE": _one_mailbox(Unsubscribe),
    "LIST": _p_list,
    "LSUB": _p_lsub,
    "NAMESPACE": _no_args(Namespace),
    "STATUS": _p_status,
    "APPEND": _p_append,
    "IDLE": _no_args(Idle),
    "GETQUOTA": _p_getquota,
    "GETQUOTAROOT": _one_mailbox(GetQuotaRoot),
    "SETQUOTA": _p_setquota,
    "CHECK": _no_args(Check),
    "CLOSE": _no_args(Close),
    "UNSELECT": _no_args(Unselect),
    "EXPUNGE": _p_expunge,
    "COPY": _p_copy_move(False),
    "MOVE": _p_copy_move(True),
    "STORE": _p_store,
    "FETCH": _p_fetch,
    "SEARCH": _p_search,
}
_UID_PARSERS: dict[str, Callable[[_Reader, bool], Command]] = {
    k: _PARSERS[k] for k in ("COPY", "MOVE", "STORE", "FETCH", "SEARCH", "EXPUNGE")
}


def decode_sasl(text: bytes) -> bytes | None:
    """Strict base64 of a SASL response line; None if invalid (``"="`` is empty)."""
    if text == b"=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
