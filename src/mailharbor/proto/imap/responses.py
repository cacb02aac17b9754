"""IMAP server responses: a value model that serialises itself, response codes, and builders.

Values (what goes into untagged data, FETCH items, codes):

- ``None`` → ``NIL``; ``int`` (not ``bool``) → a number; ``tuple``/``list`` → a parenthesised,
  space-separated list of values.
- ``str`` / ``bytes`` → an IMAP *string*, quoted or literal chosen automatically: a literal
  when the value has CR, LF or NUL, is longer than :data:`MAX_QUOTED`, or has 8-bit octets
  (unless the session has UTF-8 enabled and the value is valid UTF-8, then quoted UTF-8 is
  allowed, RFC 9051/6855); otherwise quoted with ``\\`` and ``"`` escaped. Literals are always
  the synchronising ``{n}`` form; ``literal8`` is never produced.
- :class:`Atom` → written verbatim after validation (flags, keywords, ``NIL``-free tokens).
- :class:`AString` → an atom when the text is a valid atom (and not ``NIL``), else a string.
- :class:`Literal` → always a literal (message bodies).
- :class:`Mailbox` → a mailbox name: modified UTF-7 unless the session has UTF-8 enabled; then
  quoted (or literal, see above).
- :class:`Raw` → pre-rendered bytes passed through (ENVELOPE, BODYSTRUCTURE from
  :mod:`mailharbor.service.mime`). The caller vouches for them.

:class:`RawLines` is an :class:`Untagged` made of whole pre-rendered response lines (a
FETCH result for many messages), for the hot paths where building one value tree per message
would cost more than the rest of the command.

Responses: :class:`Tagged` (the tag is filled in by the engine: it completes the command in
progress), :class:`Untagged` (``* ...``: status responses and data) and :class:`Continuation`
(``+ ...``; the engine produces those itself). Build them with the functions below (``ok``,
``no``, ``bad``, ``exists``, ``fetch``, ``list_mailbox``, …). Text in responses is sanitised to
one line of printable ASCII, so application strings are safe in it — but never put exception
text there (DESIGN.md).
"""

from __future__ import annotations

import datetime
import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from .mutf7 import encode_mutf7
from .seqset import SequenceSet, compact

__all__ = [
    "MAX_QUOTED",
    "AString",
    "Atom",
    "Code",
    "Continuation",
    "Literal",
    "Mailbox",
    "Raw",
    "RawLines",
    "Response",
    "ResponseStatus",
    "Tagged",
    "Untagged",
    "Value",
    "bad",
    "bye",
    "capability",
    "enabled",
    "esearch",
    "exists",
    "expunge",
    "fetch",
    "flag_list",
    "flags",
    "format_datetime",
    "id_response",
    "list_mailbox",
    "namespace",
    "no",
    "ok",
    "quota",
    "quotaroot",
    "render",
    "search",
    "status",
    "untagged_bad",
    "untagged_no",
    "untagged_ok",
    "vanished",
]

#: Strings longer than this are sent as literals.
MAX_QUOTED = 1000
_MAX_TEXT = 1000

_ATOM_SPECIALS = frozenset(b'(){ %*"\\]')


_NOT_ATOM_CHAR = re.compile('[\\x00-\\x20\\x7f-\\ud7ff\\ue000-\\U0010ffff(){"]')
"""A character that makes a text no :class:`Atom`: controls, space, non-ASCII, ``(){"``."""


def _is_atom(data: bytes, *, allow_bracket: bool = False) -> bool:
    if not data:
        return False
    for c in data:
        if c <= 0x20 or c >= 0x7F or (c in _ATOM_SPECIALS and not (allow_bracket and c == 0x5D)):
            return False
    return True


@dataclass(frozen=True)
class Atom:
    """A token written verbatim: ``\\Seen``, ``$Forwarded``, ``\\*``, ``BODY[1]<0>``,
    ``IMAP4rev2``. Must be non-empty printable ASCII without space, ``(``, ``)``, ``{``, ``"``
    or a control character (ValueError otherwise)."""

    text: str

    def __post_init__(self) -> None:
        # (a lone surrogate encodes as "?" with errors="replace", hence not rejected here)
        if not self.text or _NOT_ATOM_CHAR.search(self.text) is not None:
            raise ValueError(f"not an atom: {self.text!r}")


@dataclass(frozen=True)
class AString:
    """An astring: an atom when possible (and not ``NIL``), else a quoted string or literal."""

    text: str


@dataclass(frozen=True)
class Literal:
    """Always a literal ``{n}\\r\\n`` + data."""

    data: bytes


@dataclass(frozen=True)
class Mailbox:
    """A mailbox name (Unicode); mUTF-7 or UTF-8 depending on the session."""

    name: str


@dataclass(frozen=True)
class Raw:
    """Pre-rendered bytes, passed through verbatim (no CR/LF unless part of a literal)."""

    data: bytes


Value = None | int | str | bytes | Atom | AString | Literal | Mailbox | Raw | tuple["Value", ...]
"""A value of the model above (lists may also be given as ``list``)."""


def _string(data: bytes, utf8: bool) -> bytes:
    if (
        len(data) > MAX_QUOTED
        or b"\r" in data
        or b"\n" in data
        or b"\0" in data
        or (not data.isascii() and not (utf8 and _valid_utf8(data)))
    ):
        return b"{%d}\r\n" % len(data) + data
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def render(value: object, utf8: bool = False) -> bytes:
    """Serialise one value (see the module docstring). ``utf8``: the session accepts UTF-8
    (``ENABLE UTF8=ACCEPT`` or ``IMAP4rev2``). TypeError for anything else."""
    out = bytearray()
    _render_into(out, value, utf8)
    return bytes(out)


def _render_into(out: bytearray, value: object, utf8: bool) -> None:
    if value is None:
        out += b"NIL"
    elif isinstance(value, bool):
        raise TypeError("bool is not an IMAP value")
    elif isinstance(value, int):
        if value < 0:
            raise ValueError("IMAP numbers are unsigned")
        out += b"%d" % value
    elif isinstance(value, str):
        out += _string(value.encode("utf-8"), utf8)
    elif isinstance(value, bytes | bytearray | memoryview):
        out += _string(bytes(value), utf8)
    elif isinstance(value, Atom):
        out += value.text.encode("ascii")
    elif isinstance(value, Raw):
        out += value.data
    elif isinstance(value, Literal):
        out += b"{%d}\r\n" % len(value.data)
        out += value.data
    elif isinstance(value, AString):
        b = value.text.encode("utf-8")
        if _is_atom(b, allow_bracket=True) and b.upper() != b"NIL":
            out += b
        else:
            out += _string(b, utf8)
    elif isinstance(value, Mailbox):
        name = value.name if utf8 else encode_mutf7(value.name)
        out += _string(name.encode("utf-8"), utf8)
    elif isinstance(value, tuple | list):
        out += b"("
        for i, v in enumerate(value):
            if i:
                out += b" "
            _render_into(out, v, utf8)
        out += b")"
    else:
        raise TypeError(f"not an IMAP value: {type(value).__name__}")


def _text(text: str) -> bytes:
    """One line of printable ASCII (CR/LF/controls → space, non-ASCII → ``?``), bounded."""
    if not (text.isascii() and text.isprintable()):
        text = "".join(
            ch if 32 <= ord(ch) < 127 else ("?" if ord(ch) >= 127 else " ") for ch in text
        )
    text = text[:_MAX_TEXT].strip()
    if text.startswith("["):
        text = "(" + text[1:]  # would be read as a response code
    return text.encode("ascii") or b"Completed"


class ResponseStatus(enum.Enum):
    OK = "OK"
    NO = "NO"
    BAD = "BAD"
    BYE = "BYE"
    PREAUTH = "PREAUTH"


@dataclass(frozen=True)
class Code:
    """A response code ``[NAME args]``; ``args`` pre-rendered (build with the class methods,
    or ``Code("TRYCREATE")`` for codes without arguments)."""

    # Codes without arguments, e.g. ``Code.TRYCREATE`` (set after the class).
    TRYCREATE: ClassVar[Code]
    NONEXISTENT: ClassVar[Code]
    ALREADYEXISTS: ClassVar[Code]
    OVERQUOTA: ClassVar[Code]
    LIMIT: ClassVar[Code]
    INUSE: ClassVar[Code]
    UNAVAILABLE: ClassVar[Code]
    AUTHENTICATIONFAILED: ClassVar[Code]
    AUTHORIZATIONFAILED: ClassVar[Code]
    PRIVACYREQUIRED: ClassVar[Code]
    TOOBIG: ClassVar[Code]
    CANNOT: ClassVar[Code]
    SERVERBUG: ClassVar[Code]
    CLIENTBUG: ClassVar[Code]
    NOPERM: ClassVar[Code]
    EXPUNGEISSUED: ClassVar[Code]
    CONTACTADMIN: ClassVar[Code]
    EXPIRED: ClassVar[Code]
    UIDNOTSTICKY: ClassVar[Code]
    HASCHILDREN: ClassVar[Code]

    name: str
    args: bytes = b""

    def __post_init__(self) -> None:
        if not _is_atom(self.name.encode("ascii", "replace")) or b"]" in self.args:
            raise ValueError(f"bad response code {self.name!r}")
        if b"\r" in self.args or b"\n" in self.args:
            raise ValueError("response code arguments must be one line")

    def to_bytes(self) -> bytes:
        return b"[" + self.name.encode("ascii") + (b" " + self.args if self.args else b"") + b"]"

    @classmethod
    def _with(cls, name: str, *values: object) -> Code:
        return cls(name, b" ".join(render(v) for v in values))

    @classmethod
    def alert(cls) -> Code:
        return cls("ALERT")

    @classmethod
    def capability(cls, caps: Iterable[str]) -> Code:
        return cls("CAPABILITY", " ".join(caps).encode("ascii"))

    @classmethod
    def uidvalidity(cls, n: int) -> Code:
        return cls._with("UIDVALIDITY", n)

    @classmethod
    def uidnext(cls, n: int) -> Code:
        return cls._with("UIDNEXT", n)

    @classmethod
    def unseen(cls, n: int) -> Code:
        """``[UNSEEN n]`` (IMAP4rev1 SELECT only)."""
        return cls._with("UNSEEN", n)

    @classmethod
    def permanentflags(cls, flag_names: Iterable[str]) -> Code:
        return cls._with("PERMANENTFLAGS", flag_list(flag_names))

    @classmethod
    def read_only(cls) -> Code:
        return cls("READ-ONLY")

    @classmethod
    def read_write(cls) -> Code:
        return cls("READ-WRITE")

    @classmethod
    def appenduid(cls, uidvalidity: int, uid: int) -> Code:
        return cls._with("APPENDUID", uidvalidity, uid)

    @classmethod
    def copyuid(cls, uidvalidity: int, source: Iterable[int], dest: Iterable[int]) -> Code:
        """``[COPYUID v src dst]``; ``source`` and ``dest`` in corresponding order (RFC 4315
        pairs them by position, so they are rendered in the order given, not re-sorted, when
        the order is not ascending)."""
        return cls(
            "COPYUID",
            b"%d %s %s" % (uidvalidity, _ordered_set(source), _ordered_set(dest)),
        )

    @classmethod
    def highestmodseq(cls, n: int) -> Code:
        return cls._with("HIGHESTMODSEQ", n)

    @classmethod
    def nomodseq(cls) -> Code:
        return cls("NOMODSEQ")

    @classmethod
    def modified(cls, numbers: Iterable[int]) -> Code:
        return cls("MODIFIED", compact(numbers).encode("ascii"))

    @classmethod
    def closed(cls) -> Code:
        return cls("CLOSED")

    @classmethod
    def mailboxid(cls, objectid: str) -> Code:
        return cls("MAILBOXID", b"(" + Atom(objectid).text.encode("ascii") + b")")

    @classmethod
    def badcharset(cls, charsets: Iterable[str] = ("US-ASCII", "UTF-8")) -> Code:
        return cls._with("BADCHARSET", tuple(AString(c) for c in charsets))


def _ordered_set(numbers: Iterable[int]) -> bytes:
    nums = list(numbers)
    if nums == sorted(nums):
        return compact(nums).encode("ascii")
    # keep the order: merge only ascending consecutive runs
    parts: list[str] = []
    start = prev = nums[0]
    for n in nums[1:]:
        if n == prev + 1:
            prev = n
            continue
        parts.append(str(start) if start == prev else f"{start}:{prev}")
        start = prev = n
    parts.append(str(start) if start == prev else f"{start}:{prev}")
    return ",".join(parts).encode("ascii")


_SIMPLE_CODES = (
    "TRYCREATE",
    "NONEXISTENT",
    "ALREADYEXISTS",
    "OVERQUOTA",
    "LIMIT",
    "INUSE",
    "UNAVAILABLE",
    "AUTHENTICATIONFAILED",
    "AUTHORIZATIONFAILED",
    "PRIVACYREQUIRED",
    "TOOBIG",
    "CANNOT",
    "SERVERBUG",
    "CLIENTBUG",
    "NOPERM",
    "EXPUNGEISSUED",
    "CONTACTADMIN",
    "EXPIRED",
    "UIDNOTSTICKY",
    "HASCHILDREN",
)
for _name in _SIMPLE_CODES:
    setattr(Code, _name, Code(_name))


@dataclass(frozen=True)
class Tagged:
    """The tagged completion of the command in progress (the engine adds the tag)."""

    status: ResponseStatus
    text: str = "Completed"
    code: Code | None = None

    def __post_init__(self) -> None:
        if self.status not in (ResponseStatus.OK, ResponseStatus.NO, ResponseStatus.BAD):
            raise ValueError("a tagged response is OK, NO or BAD")

    def to_bytes(self, tag: str) -> bytes:
        code = self.code.to_bytes() + b" " if self.code is not None else b""
        return (
            tag.encode("ascii")
            + b" "
            + self.status.value.encode()
            + b" "
            + code
            + (_text(self.text) + b"\r\n")
        )


@dataclass(frozen=True)
class Untagged:
    """``* ...``. Either a status response (``status`` set: OK/NO/BAD/BYE/PREAUTH with
    optional code and text) or data (``data``: values joined by spaces, e.g.
    ``(3, Atom("EXISTS"))``). A BYE makes the engine close after sending it."""

    data: tuple[object, ...] = ()
    status: ResponseStatus | None = None
    text: str = ""
    code: Code | None = None

    def to_bytes(self, utf8: bool = False) -> bytes:
        if self.status is not None:
            code = self.code.to_bytes() + b" " if self.code is not None else b""
            return b"* " + self.status.value.encode() + b" " + code + _text(self.text) + b"\r\n"
        out = bytearray(b"*")
        for v in self.data:
            out += b" "
            _render_into(out, v, utf8)
        out += b"\r\n"
        return bytes(out)


@dataclass(frozen=True)
class RawLines(Untagged):
    """Untagged responses rendered by the caller: complete ``* ...\\r\\n`` lines, written
    verbatim (e.g. the FETCH responses for a thousand messages in one piece). The caller vouches
    for them; never a BYE."""

    lines: bytes = b""

    def to_bytes(self, utf8: bool = False) -> bytes:
        return self.lines


@dataclass(frozen=True)
class Continuation:
    """``+ text`` (or base64 data for a SASL challenge)."""

    text: str = ""

    def to_bytes(self) -> bytes:
        return b"+ " + (_text(self.text) if self.text else b"") + b"\r\n"


Response = Tagged | Untagged | Continuation


# --------------------------------------------------------------------------- builders


def ok(text: str = "Completed", code: Code | None = None) -> Tagged:
    return Tagged(ResponseStatus.OK, text, code)


def no(text: str, code: Code | None = None) -> Tagged:
    return Tagged(ResponseStatus.NO, text, code)


def bad(text: str, code: Code | None = None) -> Tagged:
    return Tagged(ResponseStatus.BAD, text, code)


def untagged_ok(text: str, code: Code | None = None) -> Untagged:
    """``* OK [code] text`` — e.g. ``untagged_ok("", Code.uidnext(5))`` in a SELECT."""
    return Untagged(status=ResponseStatus.OK, text=text or "Ok", code=code)


def untagged_no(text: str, code: Code | None = None) -> Untagged:
    return Untagged(status=ResponseStatus.NO, text=text, code=code)


def untagged_bad(text: str, code: Code | None = None) -> Untagged:
    return Untagged(status=ResponseStatus.BAD, text=text, code=code)


def bye(text: str, code: Code | None = None) -> Untagged:
    """``* BYE text``: the engine closes the session after it."""
    return Untagged(status=ResponseStatus.BYE, text=text, code=code)


def flag_list(names: Iterable[str]) -> tuple[Atom, ...]:
    """Flags as a list value: ``("\\Seen", "$Junk")`` → ``(\\Seen $Junk)``."""
    return tuple(Atom(n) for n in names)


def flags(names: Iterable[str]) -> Untagged:
    """``* FLAGS (...)``."""
    return Untagged((Atom("FLAGS"), flag_list(names)))


def exists(n: int) -> Untagged:
    return Untagged((n, Atom("EXISTS")))


def expunge(seq: int) -> Untagged:
    return Untagged((seq, Atom("EXPUNGE")))


def vanished(uids: Iterable[int], earlier: bool = False) -> Untagged:
    """``* VANISHED [(EARLIER)] 1:3,7`` (RFC 7162)."""
    s = compact(uids)
    if not s:
        raise ValueError("VANISHED needs at least one UID")
    head: tuple[object, ...] = (Atom("VANISHED"),)
    if earlier:
        head += (Raw(b"(EARLIER)"),)
    return Untagged((*head, Raw(s.encode("ascii"))))


def fetch(seq: int, items: Sequence[tuple[str, object]]) -> Untagged:
    """``* seq FETCH (name value ...)``. Names as they appear in the response (``"FLAGS"``,
    ``"UID"``, ``FetchBody.name``, ``"MODSEQ"``); values per the value model, e.g.
    ``("FLAGS", flag_list(f))``, ``("INTERNALDATE", format_datetime(dt))``,
    ``("MODSEQ", (12,))``, ``("EMAILID", (Atom(id),))``, ``("ENVELOPE", Raw(envelope_imap(m)))``,
    ``(body.name, Literal(data))`` (or ``None`` for NIL)."""
    inner: list[object] = []
    for name, value in items:
        inner.append(Atom(name))
        inner.append(value)
    return Untagged((seq, Atom("FETCH"), tuple(inner)))


def search(numbers: Iterable[int], modseq: int | None = None) -> Untagged:
    """``* SEARCH 2 5 9`` [``(MODSEQ n)``] (classic, IMAP4rev1)."""
    data: list[object] = [Atom("SEARCH"), *sorted(numbers)]
    if modseq is not None:
        data.append(Raw(b"(MODSEQ %d)" % modseq))
    return Untagged(tuple(data))


def esearch(
    tag: str | None,
    *,
    uid: bool = False,
    min: int | None = None,
    max: int | None = None,
    all: Iterable[int] | None = None,
    count: int | None = None,
    modseq: int | None = None,
) -> Untagged:
    """``* ESEARCH (TAG "a1") UID MIN 1 MAX 9 ALL 1:3,9 COUNT 4 MODSEQ 77`` (RFC 4731/9051).
    Pass what was asked for; an empty ALL is omitted (as RFC 4731 says)."""
    data: list[object] = [Atom("ESEARCH")]
    if tag is not None:
        data.append((Atom("TAG"), tag))
    if uid:
        data.append(Atom("UID"))
    if min is not None:
        data += [Atom("MIN"), min]
    if max is not None:
        data += [Atom("MAX"), max]
    if all is not None:
        s = compact(all)
        if s:
            data += [Atom("ALL"), Raw(s.encode("ascii"))]
    if count is not None:
        data += [Atom("COUNT"), count]
    if modseq is not None:
        data += [Atom("MODSEQ"), modseq]
    return Untagged(tuple(data))


def list_mailbox(
    name: str,
    delimiter: str | None,
    attributes: Iterable[str] = (),
    *,
    childinfo: Sequence[str] = (),
    oldname: str | None = None,
    lsub: bool = False,
) -> Untagged:
    """``* LIST (\\HasNoChildren) "/" "INBOX"`` (or LSUB), with RFC 5258 extended data
    ``("CHILDINFO" ("SUBSCRIBED"))`` and RFC 9051 ``("OLDNAME" ("old"))``."""
    data: list[object] = [
        Atom("LSUB" if lsub else "LIST"),
        flag_list(attributes),
        None if delimiter is None else delimiter,
        Mailbox(name),
    ]
    ext: list[object] = []
    if childinfo:
        ext += ["CHILDINFO", tuple(childinfo)]
    if oldname is not None:
        ext += ["OLDNAME", (Mailbox(oldname),)]
    if ext:
        data.append(tuple(ext))
    return Untagged(tuple(data))


def status(
    mailbox: str, items: Mapping[str, int | str] | Sequence[tuple[str, int | str]]
) -> Untagged:
    """``* STATUS "box" (MESSAGES 3 UIDNEXT 9)``; MAILBOXID's value is rendered ``(id)``."""
    pairs = items.items() if isinstance(items, Mapping) else items
    inner: list[object] = []
    for k, v in pairs:
        inner.append(Atom(k))
        inner.append((Atom(v),) if isinstance(v, str) else v)
    return Untagged((Atom("STATUS"), Mailbox(mailbox), tuple(inner)))


def capability(caps: Iterable[str]) -> Untagged:
    return Untagged((Atom("CAPABILITY"), *(Atom(c) for c in caps)))


def enabled(extensions: Iterable[str]) -> Untagged:
    return Untagged((Atom("ENABLED"), *(Atom(c) for c in extensions)))


def namespace(
    personal: Sequence[tuple[str, str | None]] | None,
    other: Sequence[tuple[str, str | None]] | None = None,
    shared: Sequence[tuple[str, str | None]] | None = None,
) -> Untagged:
    """``* NAMESPACE (("" "/")) NIL NIL``: each argument is a list of (prefix, delimiter)."""

    def one(ns: Sequence[tuple[str, str | None]] | None) -> object:
        if not ns:
            return None
        return tuple((Mailbox(prefix), delim) for prefix, delim in ns)

    return Untagged((Atom("NAMESPACE"), one(personal), one(other), one(shared)))


def id_response(params: Sequence[tuple[str, str | None]] | None) -> Untagged:
    """``* ID ("name" "mailharbor")`` or ``* ID NIL``."""
    if not params:
        return Untagged((Atom("ID"), None))
    inner: list[object] = []
    for k, v in params:
        inner += [k, v]
    return Untagged((Atom("ID"), tuple(inner)))


def quota(root: str, resources: Sequence[tuple[str, int, int]]) -> Untagged:
    """``* QUOTA "" (STORAGE 10 512)``: (resource name, usage, limit) triples (RFC 9208;
    STORAGE in KiB)."""
    inner: list[object] = []
    for name, usage, limit in resources:
        inner += [Atom(name), usage, limit]
    return Untagged((Atom("QUOTA"), AString(root), tuple(inner)))


def quotaroot(mailbox: str, roots: Iterable[str]) -> Untagged:
    """``* QUOTAROOT INBOX ""``."""
    return Untagged((Atom("QUOTAROOT"), Mailbox(mailbox), *(AString(r) for r in roots)))


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def format_datetime(dt: datetime.datetime) -> str:
    """RFC 9051 date-time text: ``"17-Jul-1996 02:44:25 -0700"`` (naive → UTC). As a value it
    is rendered quoted."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    off = dt.utcoffset() or datetime.timedelta(0)
    minutes = int(off.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return (
        f"{dt.day:02d}-{_MONTHS[dt.month - 1]}-{dt.year:04d} "
        f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d} {sign}{minutes // 60:02d}{minutes % 60:02d}"
    )


def sequence_value(s: SequenceSet) -> Raw:
    """A sequence set as a value (``1:3,*``)."""
    return Raw(str(s).encode("ascii"))
