"""MIME metadata: parse a message once into what IMAP needs, persist it compactly, render it.

Theory of operation
-------------------
A message body is parsed **once**, when it is stored, by :func:`parse_message` into a
:class:`MessageMeta`: the RFC 3501 ENVELOPE fields of the top-level message and a tree of
:class:`BodyPart` (the BODYSTRUCTURE), where every part carries the byte offsets of its header and
body within the raw message. :func:`encode_meta` turns it into a small versioned binary record,
which the store keeps as the body's ``MIME_META`` record (``txn.put_mime_meta(hash, META_VERSION,
data)``); after a restart or failover the record is read back with :func:`decode_meta`, so nothing
is parsed again. FETCH ENVELOPE/BODY/BODYSTRUCTURE are rendered from the meta
(:func:`envelope_imap`, :func:`bodystructure_imap`) and FETCH BODY[section] is a slice of the raw
message (:func:`section_bytes`, :func:`section_range`).

The parser works over the raw bytes with ``bytes.find`` and byte offsets; it does not build the
``email`` package's object model. Header values are kept as raw bytes (unfolded: CR and LF
removed, surrounding blanks stripped), **not decoded**: ENVELOPE returns encoded words such as
``=?UTF-8?B?...?=`` unparsed, as RFC 3501 requires. Addresses are split into (name, adl, mailbox,
host) with RFC 5322 group syntax. MIME names are normalised to upper case (type, subtype, parameter
attribute names, transfer encoding, disposition type) as in the RFC 3501 section 7.4.2 examples;
parameter values are kept as given. Defaults follow RFC 2045: a part without (or with an
unparseable) Content-Type is ``TEXT/PLAIN; CHARSET=US-ASCII`` (``MESSAGE/RFC822`` inside a
``multipart/digest``), the default encoding is ``7BIT``.

Part boundaries follow RFC 2046: a delimiter is a line ``--boundary`` (or ``--boundary--`` to
close) followed only by blanks; the line break before it belongs to the delimiter. A part's body
size is ``body_end - body_start`` octets of the raw message as stored; the line count (text/* and
message/rfc822|global) is the number of LFs in the body plus one for a last line without one.

Malformed input is handled best effort: header lines without a colon are skipped; a part without
a blank line after its header has an empty body; a multipart without a boundary parameter or
without any delimiter gets one headerless TEXT/PLAIN child spanning its whole body (BODYSTRUCTURE
needs at least one child); an unterminated multipart's last part runs to the end of the enclosing
body; a multipart or message part nested deeper than :data:`MAX_DEPTH`, or met after
:data:`MAX_PARTS` parts, is shown as an opaque ``APPLICATION/OCTET-STREAM`` leaf. Addresses without
a domain get ``MISSING_DOMAIN`` and without a local part ``MISSING_MAILBOX`` (as Dovecot does: a
NIL host would mean group syntax).

Invariants
----------
- :func:`parse_message` never raises for any ``bytes`` input. Its work is linear in the input for a
  fixed nesting cap (every nesting level rescans at most its own range, so at most
  ``MAX_DEPTH + 1`` passes), and its output size is bounded by :data:`MAX_PARTS`,
  :data:`MAX_ADDRESSES` and the input size.
- Offsets: for every part ``0 <= header_start <= body_start <= body_end <= meta.size``; the raw
  header is ``raw[header_start:body_start]`` (including its blank line, if any) and the body is
  ``raw[body_start:body_end]``. Children lie within their parent's body, in order, without overlap.
  A message part (``envelope is not None``) has exactly one child: the encapsulated message's
  top-level entity, whose header starts at the parent's ``body_start`` and whose body ends at the
  parent's ``body_end``.
- Shape: ``type == b"MULTIPART"`` iff the part has at least one child and no envelope; a part has
  an envelope iff it is ``MESSAGE/RFC822`` or ``MESSAGE/GLOBAL`` and then exactly one child; every
  other part has no children.
- ``decode_meta(encode_meta(m)) == m`` for every meta :func:`parse_message` returns.
  :func:`decode_meta` raises only ``ValueError``, and accepts only data satisfying the offset and
  shape invariants above (so slicing and rendering a decoded meta are safe).
- The renderers never raise for a meta satisfying these invariants and produce RFC 3501/9051
  syntax: strings are quoted when they are at most :data:`QUOTED_MAX` octets of 7-bit text without
  CR, LF or NUL, otherwise sent as literals ``{n}\\r\\n...`` (NUL octets, which IMAP forbids in
  literals, are dropped).

Binary format (version 1), all integers unsigned LEB128 varints unless noted::

    header   struct "!2sB": b"MM", version (=1)
    meta     varint size, envelope, part
    envelope nstr date, nstr subject, 6 x addrs (from sender reply-to to cc bcc),
             nstr in-reply-to, nstr message-id
    addrs    varint count, count x (nstr name, nstr adl, nstr mailbox, nstr host)
    part     u8 kind (0 leaf, 1 multipart, 2 message), str type, str subtype, params, nstr id,
             nstr description, str encoding, nstr md5, nstr disposition, params disp-params,
             varint nlang, nlang x str, nstr location, varint header_start,
             varint (body_start - header_start), varint (body_end - body_start), varint lines,
             then kind 1: varint n (>= 1), n x part; kind 2: envelope, part
    params   varint count, count x (str name, str value)
    str      varint length, bytes; nstr: varint 0 for NIL, else varint (length + 1), bytes

The whole input must be consumed.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "MAX_ADDRESSES",
    "MAX_DEPTH",
    "MAX_PARTS",
    "META_VERSION",
    "MISSING_DOMAIN",
    "MISSING_MAILBOX",
    "QUOTED_MAX",
    "Address",
    "BodyPart",
    "Envelope",
    "MessageMeta",
    "bodystructure_imap",
    "decode_meta",
    "encode_meta",
    "envelope_imap",
    "parse_message",
    "section_bytes",
    "section_range",
]

log = logging.getLogger(__name__)

#: Version of the :func:`encode_meta` format, also passed to ``txn.put_mime_meta``.
META_VERSION = 1
#: Multipart/message nesting deeper than this is shown as an opaque leaf.
MAX_DEPTH = 32
#: After this many parts, further multipart/message parts are not descended into.
MAX_PARTS = 5000
#: At most this many addresses (group markers included) are kept per address header.
MAX_ADDRESSES = 4096
#: Only this many octets of an address header are parsed.
MAX_ADDRESS_FIELD = 256 * 1024
#: Only this many octets of a Content-* structured header are parsed.
MAX_STRUCTURED_FIELD = 64 * 1024
#: At most this many parameters are kept per Content-Type / Content-Disposition.
MAX_PARAMS = 100
#: At most this many Content-Language tags are kept.
MAX_LANGUAGES = 32
#: Strings longer than this are rendered as literals.
QUOTED_MAX = 1024

MISSING_MAILBOX = b"MISSING_MAILBOX"
MISSING_DOMAIN = b"MISSING_DOMAIN"

_MAGIC = b"MM"
_HEADER = struct.Struct("!2sB")

Params = tuple[tuple[bytes, bytes], ...]


# -- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    """One RFC 3501 address structure. A group start has ``host is None`` and the group name in
    ``mailbox``; a group end has all four fields ``None``."""

    name: bytes | None
    adl: bytes | None
    mailbox: bytes | None
    host: bytes | None


GROUP_END = Address(None, None, None, None)


@dataclass(frozen=True, slots=True)
class Envelope:
    """The ENVELOPE fields as found in the header (raw, unfolded, not decoded); ``None`` when the
    field is absent (an empty Date is ``None`` too; other empty fields are ``b""``).
    ``sender``/``reply_to`` are *not* defaulted to ``from_`` here; the renderer does that, as
    RFC 3501 asks."""

    date: bytes | None = None
    subject: bytes | None = None
    from_: tuple[Address, ...] = ()
    sender: tuple[Address, ...] = ()
    reply_to: tuple[Address, ...] = ()
    to: tuple[Address, ...] = ()
    cc: tuple[Address, ...] = ()
    bcc: tuple[Address, ...] = ()
    in_reply_to: bytes | None = None
    message_id: bytes | None = None


@dataclass(frozen=True, slots=True)
class BodyPart:
    """One MIME entity: its BODYSTRUCTURE fields and where its header and body are in the raw
    message. See the module invariants for offsets and shape."""

    type: bytes
    subtype: bytes
    params: Params = ()
    id: bytes | None = None
    description: bytes | None = None
    encoding: bytes = b"7BIT"
    md5: bytes | None = None
    disposition: bytes | None = None
    disposition_params: Params = ()
    language: tuple[bytes, ...] = ()
    location: bytes | None = None
    header_start: int = 0
    body_start: int = 0
    body_end: int = 0
    lines: int = 0
    children: tuple[BodyPart, ...] = ()
    envelope: Envelope | None = None

    @property
    def size(self) -> int:
        """Body size in octets."""
        return self.body_end - self.body_start

    @property
    def is_multipart(self) -> bool:
        return self.type == b"MULTIPART"

    @property
    def is_message(self) -> bool:
        """True for MESSAGE/RFC822 and MESSAGE/GLOBAL parts (which have an envelope and a child)."""
        return self.envelope is not None


@dataclass(frozen=True, slots=True)
class MessageMeta:
    """Everything IMAP needs about one stored body, without the body. ``size`` is the raw size."""

    size: int
    envelope: Envelope
    body: BodyPart


# -- parsing: headers --------------------------------------------------------------------------

_WANTED = frozenset(
    {
        b"date",
        b"subject",
        b"from",
        b"sender",
        b"reply-to",
        b"to",
        b"cc",
        b"bcc",
        b"in-reply-to",
        b"message-id",
        b"content-type",
        b"content-transfer-encoding",
        b"content-id",
        b"content-description",
        b"content-md5",
        b"content-disposition",
        b"content-language",
        b"content-location",
    }
)
_BLANKS = b" \t"


def _header_end(raw: bytes, start: int, end: int) -> tuple[int, int]:
    """Return (end of the header field lines, start of the body) for the entity at [start, end).

    The blank line lies between the two. Without a blank line the header runs to ``end``."""
    if start + 2 <= end and raw.startswith(b"\r\n", start):
        return start, start + 2
    if start < end and raw[start] == 10:
        return start, start + 1
    a = raw.find(b"\n\n", start, end)
    b = raw.find(b"\n\r\n", start, end)
    if b >= 0 and (a < 0 or b < a):
        return b + 1, b + 3
    if a >= 0:
        return a + 1, a + 2
    return end, end


def _fields(raw: bytes, start: int, stop: int) -> dict[bytes, bytes]:
    """The first occurrence of each wanted field in the header lines at [start, stop), unfolded
    (CR/LF removed) and stripped of surrounding blanks; keys are lower-case names."""
    out: dict[bytes, bytes] = {}
    cur: bytes | None = None
    parts: list[bytes] = []
    for line in raw[start:stop].split(b"\n"):
        if not line:
            continue
        if line[0] in (32, 9):
            if cur is not None:
                parts.append(line)
            continue
        if cur is not None:
            out[cur] = b"".join(parts).replace(b"\r", b"").strip(_BLANKS)
            cur = None
        colon = line.find(b":")
        if colon <= 0:
            continue
        name = line[:colon].strip(_BLANKS).lower()
        if name in _WANTED and name not in out:
            cur = name
            parts = [line[colon + 1 :]]
    if cur is not None:
        out[cur] = b"".join(parts).replace(b"\r", b"").strip(_BLANKS)
    return out


# -- parsing: MIME structured fields -----------------------------------------------------------

_TOKEN = rb"[^\x00-\x20\x7f()<>@,;:\\\"/\[\]?=]+"
_TYPE_RE = re.compile(rb"[ \t]*(" + _TOKEN + rb")[ \t]*/[ \t]*(" + _TOKEN + rb")")
_TOKEN_RE = re.compile(rb"[ \t]*(" + _TOKEN + rb")")
_PARAM_RE = re.compile(
    rb";[ \t]*(" + _TOKEN + rb')[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"?|([^;\x00-\x20]*))', re.S
)
_UNESCAPE_RE = re.compile(rb"\\(.)", re.S)


def _strip_comments(v: bytes) -> bytes:
    """Remove RFC 5322 comments (nested, outside quoted strings); bounded input."""
    v = v[:MAX_STRUCTURED_FIELD]
    if b"(" not in v:
        return v
    out = bytearray()
    depth = 0
    quoted = False
    i, n = 0, len(v)
    while i < n:
        c = v[i]
        if c == 0x5C and i + 1 < n and (quoted or depth):  # quoted-pair
            if not depth:
                out += v[i : i + 2]
            i += 2
            continue
        if quoted:
            out.append(c)
            if c == 0x22:
                quoted = False
        elif c == 0x28:
            depth += 1
        elif c == 0x29 and depth:
            depth -= 1
        elif not depth:
            out.append(c)
            if c == 0x22:
                quoted = True
        i += 1
    return bytes(out)


def _params(v: bytes, pos: int) -> Params:
    seen: set[bytes] = set()
    out: list[tuple[bytes, bytes]] = []
    for m in _PARAM_RE.finditer(v, pos):
        name = m.group(1).upper()
        if name in seen:
            continue
        seen.add(name)
        q = m.group(2)
        value = _UNESCAPE_RE.sub(rb"\1", q) if q is not None else m.group(3)
        out.append((name, value))
        if len(out) >= MAX_PARAMS:
            break
    return tuple(out)


_DEFAULT_TEXT = (b"TEXT", b"PLAIN", ((b"CHARSET", b"US-ASCII"),))
_DEFAULT_DIGEST: tuple[bytes, bytes, Params] = (b"MESSAGE", b"RFC822", ())


def _content_type(v: bytes | None, in_digest: bool) -> tuple[bytes, bytes, Params]:
    default = _DEFAULT_DIGEST if in_digest else _DEFAULT_TEXT
    if v is None:
        return default
    v = _strip_comments(v)
    m = _TYPE_RE.match(v)
    if m is None:
        return _DEFAULT_TEXT
    return m.group(1).upper(), m.group(2).upper(), _params(v, m.end())


def _disposition(v: bytes | None) -> tuple[bytes | None, Params]:
    if v is None:
        return None, ()
    v = _strip_comments(v)
    m = _TOKEN_RE.match(v)
    if m is None:
        return None, ()
    return m.group(1).upper(), _params(v, m.end())


def _encoding(v: bytes | None) -> bytes:
    if v is None:
        return b"7BIT"
    m = _TOKEN_RE.match(_strip_comments(v))
    return b"7BIT" if m is None else m.group(1).upper()


def _languages(v: bytes | None) -> tuple[bytes, ...]:
    if v is None:
        return ()
    tags = [t.strip(_BLANKS) for t in _strip_comments(v).split(b",")]
    return tuple(t for t in tags if t)[:MAX_LANGUAGES]


def _param(params: Params, name: bytes) -> bytes | None:
    for k, v in params:
        if k == name:
            return v
    return None


# -- parsing: addresses ------------------------------------------------------------------------

_WORD, _COMMENT = 0, 1
_LT, _GT, _AT, _COMMA, _SEMI, _COLON = b"<>@,;:"
_ATOM_RE = re.compile(rb'[^ \t<>@,;:("\[]+')
_QUOTED_RE = re.compile(rb'"((?:[^"\\]|\\.)*)"?', re.S)
_LITERAL_RE = re.compile(rb"\[[^\]]*\]?")
_WS_RE = re.compile(rb"[ \t\r\n]+")
_SPECIALS = frozenset(b"<>@,;:")

_Tok = tuple[int, bytes, bytes]  # (kind, raw, text); kind is _WORD, _COMMENT or a special octet


def _addr_tokens(s: bytes) -> Iterator[_Tok]:
    """Tokens of an address header: words (atoms, quoted strings, domain literals), comments and
    the specials ``<>@,;:``. Every octet belongs to some token or to whitespace."""
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c in (32, 9, 13, 10):
            m = _WS_RE.match(s, i)
            i = m.end() if m else i + 1
        elif c in _SPECIALS:
            yield (c, s[i : i + 1], s[i : i + 1])
            i += 1
        elif c == 0x22:
            m = _QUOTED_RE.match(s, i)
            assert m is not None  # the pattern matches any string starting with a quote
            yield (_WORD, m.group(0), _UNESCAPE_RE.sub(rb"\1", m.group(1)))
            i = m.end()
        elif c == 0x28:
            depth, j = 0, i
            buf = bytearray()
            while j < n:
                ch = s[j]
                if ch == 0x5C and j + 1 < n:
                    buf.append(s[j + 1])
                    j += 2
                    continue
                j += 1
                if ch == 0x28:
                    depth += 1
                    if depth == 1:
                        continue
                elif ch == 0x29:
                    depth -= 1
                    if depth == 0:
                        break
                buf.append(ch)
            yield (_COMMENT, s[i:j], bytes(buf).strip(_BLANKS))
            i = j
        elif c == 0x5B:
            m = _LITERAL_RE.match(s, i)
            assert m is not None
            yield (_WORD, m.group(0), m.group(0))
            i = m.end()
        else:
            m = _ATOM_RE.match(s, i)
            end = m.end() if m else i + 1
            yield (_WORD, s[i:end], s[i:end])
            i = end


def _phrase(words: list[_Tok]) -> bytes | None:
    text = b" ".join(t[2] for t in words)
    return text or None


def _raw(words: list[_Tok]) -> bytes:
    return b"".join(t[1] for t in words)


def _addresses(value: bytes) -> tuple[Address, ...]:
    """Parse an RFC 5322 address-list (with groups and obsolete routes), best effort."""
    toks = list(_addr_tokens(value[:MAX_ADDRESS_FIELD]))
    out: list[Address] = []
    n = len(toks)
    i = 0
    in_group = False
    while i < n and len(out) < MAX_ADDRESSES - 1:
        k = toks[i][0]
        if k == _SEMI:
            if in_group:
                out.append(GROUP_END)
                in_group = False
            i += 1
            continue
        if k in (_COMMA, _GT):
            i += 1
            continue
        words: list[_Tok] = []
        comments: list[_Tok] = []
        while i < n and toks[i][0] in (_WORD, _COMMENT):
            (words if toks[i][0] == _WORD else comments).append(toks[i])
            i += 1
        k = toks[i][0] if i < n else -1
        if k == _COLON:
            i += 1
            if not in_group:
                out.append(Address(None, None, _phrase(words) or b"", None))
                in_group = True
            continue
        adl: bytes | None = None
        local: list[_Tok] = []
        domain: list[_Tok] = []
        name = _phrase(words)
        if k == _LT:
            i += 1
            if i < n and toks[i][0] == _AT:  # obsolete route: @a,@b:
                j = i
                while j < n and toks[j][0] not in (_COLON, _GT, _LT):
                    j += 1
                if j < n and toks[j][0] == _COLON:
                    adl = b"".join(t[1] for t in toks[i:j] if t[0] != _COMMENT) or None
                    i = j + 1
            while i < n and toks[i][0] not in (_AT, _GT, _COMMA, _SEMI, _LT):
                if toks[i][0] == _WORD:
                    local.append(toks[i])
                i += 1
            if i < n and toks[i][0] == _AT:
                i += 1
                while i < n and toks[i][0] not in (_GT, _COMMA, _SEMI, _LT):
                    if toks[i][0] == _WORD:
                        domain.append(toks[i])
                    i += 1
            if i < n and toks[i][0] == _GT:
                i += 1
        elif k == _AT:
            local = words
            name = None
            i += 1
            while i < n and toks[i][0] in (_WORD, _COMMENT, _AT):
                if toks[i][0] == _WORD:
                    domain.append(toks[i])
                elif toks[i][0] == _COMMENT:
                    comments.append(toks[i])
                i += 1
        elif words:
            local = words
            name = None
        else:
            if k not in (-1, _COMMA, _SEMI):
                i += 1  # a stray special; skip it
            continue
        # anything up to the next separator belongs to this address; keep only comments
        while i < n and toks[i][0] not in (_COMMA, _SEMI):
            if toks[i][0] == _COMMENT:
                comments.append(toks[i])
            i += 1
        if name is None:
            texts = [t[2] for t in comments if t[2]]
            name = texts[-1] if texts else None
        out.append(
            Address(name, adl, _raw(local) or MISSING_MAILBOX, _raw(domain) or MISSING_DOMAIN)
        )
    if in_group:
        out.append(GROUP_END)
    return tuple(out)


def _envelope(f: dict[bytes, bytes]) -> Envelope:
    def addrs(name: bytes) -> tuple[Address, ...]:
        v = f.get(name)
        return () if v is None else _addresses(v)

    return Envelope(
        date=f.get(b"date") or None,
        subject=f.get(b"subject"),
        from_=addrs(b"from"),
        sender=addrs(b"sender"),
        reply_to=addrs(b"reply-to"),
        to=addrs(b"to"),
        cc=addrs(b"cc"),
        bcc=addrs(b"bcc"),
        in_reply_to=f.get(b"in-reply-to"),
        message_id=f.get(b"message-id"),
    )


# -- parsing: entities -------------------------------------------------------------------------


class _Budget:
    """Parts still allowed (mutable, private to one parse)."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left


def _lines(raw: bytes, start: int, end: int) -> int:
    if end <= start:
        return 0
    n = raw.count(b"\n", start, end)
    return n if raw[end - 1] == 10 else n + 1


def _split(raw: bytes, start: int, end: int, boundary: bytes, limit: int) -> list[tuple[int, int]]:
    """Body spans of the parts of a multipart body at [start, end), at most ``limit`` (>= 1); the
    last allowed part runs to the close delimiter or, without one, to ``end``."""
    delim = b"--" + boundary
    dl = len(delim)
    spans: list[tuple[int, int]] = []
    open_start = -1
    pos = start
    first = True
    while True:
        if first and start + dl <= end and raw.startswith(delim, start):
            idx = start
        else:
            f = raw.find(b"\n" + delim, pos, end)
            if f < 0:
                break
            idx = f + 1
        first = False
        after = idx + dl
        close = after + 2 <= end and raw.startswith(b"--", after)
        q = after + 2 if close else after
        nl = raw.find(b"\n", q, end)
        line_end = end if nl < 0 else nl
        if raw[q:line_end].strip(b" \t\r"):
            pos = idx  # "--boundaryX...": not a delimiter
            continue
        if open_start >= 0:
            e = idx - 1
            if e > open_start and raw[e - 1] == 13:
                e -= 1
            spans.append((open_start, max(e, open_start)))
            open_start = -1
        if close:
            break
        open_start = line_end + 1 if nl >= 0 else end
        pos = line_end
        if len(spans) + 1 >= limit:
            break
    if open_start >= 0:
        spans.append((open_start, end))
    return spans


def _entity(
    raw: bytes, start: int, end: int, depth: int, in_digest: bool, budget: _Budget
) -> tuple[BodyPart, dict[bytes, bytes]]:
    """Parse the entity at [start, end); return it and its header fields."""
    budget.left -= 1
    fields_end, body_start = _header_end(raw, start, end)
    f = _fields(raw, start, fields_end)
    typ, sub, params = _content_type(f.get(b"content-type"), in_digest)
    disp, dparams = _disposition(f.get(b"content-disposition"))
    children: tuple[BodyPart, ...] = ()
    envelope: Envelope | None = None
    is_message = typ == b"MESSAGE" and sub in (b"RFC822", b"GLOBAL")
    if (typ == b"MULTIPART" or is_message) and (depth >= MAX_DEPTH or budget.left <= 0):
        typ, sub, params, is_message = b"APPLICATION", b"OCTET-STREAM", (), False
    if typ == b"MULTIPART":
        boundary = _param(params, b"BOUNDARY")
        spans = _split(raw, body_start, end, boundary, budget.left) if boundary else []
        if spans:
            digest = sub == b"DIGEST"
            children = tuple(_entity(raw, s, e, depth + 1, digest, budget)[0] for s, e in spans)
        else:
            budget.left -= 1
            t, st, p = _DEFAULT_TEXT
            children = (
                BodyPart(
                    t, st, p, header_start=body_start, body_start=body_start, body_end=end,
                    lines=_lines(raw, body_start, end),
                ),
            )  # fmt: skip
    elif is_message:
        inner, inner_fields = _entity(raw, body_start, end, depth + 1, False, budget)
        children = (inner,)
        envelope = _envelope(inner_fields)
    lines = _lines(raw, body_start, end) if typ == b"TEXT" or is_message else 0
    part = BodyPart(
        type=typ,
        subtype=sub,
        params=params,
        id=f.get(b"content-id"),
        description=f.get(b"content-description"),
        encoding=_encoding(f.get(b"content-transfer-encoding")),
        md5=f.get(b"content-md5"),
        disposition=disp,
        disposition_params=dparams,
        language=_languages(f.get(b"content-language")),
        location=f.get(b"content-location"),
        header_start=start,
        body_start=body_start,
        body_end=end,
        lines=lines,
        children=children,
        envelope=envelope,
    )
    return part, f


def _parse(raw: bytes) -> MessageMeta:
    """:func:`parse_message` without the safety net (tests call this to see real bugs)."""
    body, f = _entity(raw, 0, len(raw), 0, False, _Budget(MAX_PARTS))
    return MessageMeta(len(raw), _envelope(f), body)


def parse_message(raw: bytes) -> MessageMeta:
    """Parse a raw RFC 5322/MIME message into its :class:`MessageMeta`. Never raises.

    Should an internal error ever occur, it is logged and the message is described as one
    TEXT/PLAIN body with an empty envelope rather than failing the delivery or the FETCH."""
    try:
        return _parse(raw)
    except Exception:  # pragma: no cover - the safety net the invariants promise
        log.exception("MIME parse failed; describing the message as text/plain")
        t, st, p = _DEFAULT_TEXT
        part = BodyPart(t, st, p, body_end=len(raw), lines=_lines(raw, 0, len(raw)))
        return MessageMeta(len(raw), Envelope(), part)


# -- the binary format -------------------------------------------------------------------------


class _Writer:
    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def uv(self, n: int) -> None:
        while n >= 0x80:
            self.buf.append((n & 0x7F) | 0x80)
            n >>= 7
        self.buf.append(n)

    def s(self, b: bytes) -> None:
        self.uv(len(b))
        self.buf += b

    def ns(self, b: bytes | None) -> None:
        if b is None:
            self.uv(0)
        else:
            self.uv(len(b) + 1)
            self.buf += b

    def params(self, ps: Params) -> None:
        self.uv(len(ps))
        for k, v in ps:
            self.s(k)
            self.s(v)

    def envelope(self, e: Envelope) -> None:
        self.ns(e.date)
        self.ns(e.subject)
        for lst in (e.from_, e.sender, e.reply_to, e.to, e.cc, e.bcc):
            self.uv(len(lst))
            for a in lst:
                self.ns(a.name)
                self.ns(a.adl)
                self.ns(a.mailbox)
                self.ns(a.host)
        self.ns(e.in_reply_to)
        self.ns(e.message_id)

    def part(self, p: BodyPart) -> None:
        kind = 2 if p.envelope is not None else 1 if p.children else 0
        self.buf.append(kind)
        self.s(p.type)
        self.s(p.subtype)
        self.params(p.params)
        self.ns(p.id)
        self.ns(p.description)
        self.s(p.encoding)
        self.ns(p.md5)
        self.ns(p.disposition)
        self.params(p.disposition_params)
        self.uv(len(p.language))
        for t in p.language:
            self.s(t)
        self.ns(p.location)
        self.uv(p.header_start)
        self.uv(p.body_start - p.header_start)
        self.uv(p.body_end - p.body_start)
        self.uv(p.lines)
        if kind == 1:
            self.uv(len(p.children))
            for c in p.children:
                self.part(c)
        elif kind == 2:
            assert p.envelope is not None
            self.envelope(p.envelope)
            self.part(p.children[0])


def encode_meta(meta: MessageMeta) -> bytes:
    """Serialize ``meta`` in the version :data:`META_VERSION` binary format (module docstring).

    ``meta`` must satisfy the module invariants (anything :func:`parse_message` returns does)."""
    w = _Writer()
    w.buf += _HEADER.pack(_MAGIC, META_VERSION)
    w.uv(meta.size)
    w.envelope(meta.envelope)
    w.part(meta.body)
    return bytes(w.buf)


class _Reader:
    __slots__ = ("d", "i")

    def __init__(self, d: bytes, i: int) -> None:
        self.d = d
        self.i = i

    def uv(self) -> int:
        n = shift = 0
        while True:
            if self.i >= len(self.d):
                raise ValueError("mime meta: truncated varint")
            b = self.d[self.i]
            self.i += 1
            n |= (b & 0x7F) << shift
            if b < 0x80:
                return n
            shift += 7
            if shift > 63:
                raise ValueError("mime meta: varint too long")

    def take(self, n: int) -> bytes:
        if n > len(self.d) - self.i:
            raise ValueError("mime meta: truncated")
        b = self.d[self.i : self.i + n]
        self.i += n
        return b

    def count(self) -> int:
        n = self.uv()
        if n > len(self.d) - self.i:
            raise ValueError("mime meta: count exceeds data")
        return n

    def s(self) -> bytes:
        return self.take(self.uv())

    def ns(self) -> bytes | None:
        n = self.uv()
        return None if n == 0 else self.take(n - 1)

    def params(self) -> Params:
        return tuple((self.s(), self.s()) for _ in range(self.count()))

    def addrs(self) -> tuple[Address, ...]:
        return tuple(
            Address(self.ns(), self.ns(), self.ns(), self.ns()) for _ in range(self.count())
        )

    def envelope(self) -> Envelope:
        date, subject = self.ns(), self.ns()
        fr, se, rt, to, cc, bcc = (self.addrs() for _ in range(6))
        return Envelope(date, subject, fr, se, rt, to, cc, bcc, self.ns(), self.ns())

    def part(self, depth: int, lo: int, hi: int) -> BodyPart:
        """A part whose header and body must lie within [lo, hi]."""
        if depth > MAX_DEPTH:
            raise ValueError("mime meta: nesting too deep")
        kind = self.take(1)[0]
        typ, sub, params = self.s(), self.s(), self.params()
        pid, desc, enc, md5 = self.ns(), self.ns(), self.s(), self.ns()
        disp, dparams = self.ns(), self.params()
        lang = tuple(self.s() for _ in range(self.count()))
        loc = self.ns()
        hs = self.uv()
        bs = hs + self.uv()
        be = bs + self.uv()
        lines = self.uv()
        if not lo <= hs <= bs <= be <= hi:
            raise ValueError("mime meta: part offsets out of range")
        message = typ == b"MESSAGE" and sub in (b"RFC822", b"GLOBAL")
        children: tuple[BodyPart, ...] = ()
        env: Envelope | None = None
        if kind == 0:
            if typ == b"MULTIPART" or message:
                raise ValueError("mime meta: leaf part with a container type")
        elif kind == 1:
            if typ != b"MULTIPART":
                raise ValueError("mime meta: multipart kind with another type")
            n = self.count()
            if n < 1:
                raise ValueError("mime meta: multipart without children")
            kids: list[BodyPart] = []
            pos = bs
            for _ in range(n):
                c = self.part(depth + 1, pos, be)
                pos = c.body_end
                kids.append(c)
            children = tuple(kids)
        elif kind == 2:
            if not message:
                raise ValueError("mime meta: message kind with another type")
            env = self.envelope()
            c = self.part(depth + 1, bs, be)
            if c.header_start != bs or c.body_end != be:
                raise ValueError("mime meta: encapsulated message does not fill its part")
            children = (c,)
        else:
            raise ValueError("mime meta: unknown part kind")
        return BodyPart(
            typ, sub, params, pid, desc, enc, md5, disp, dparams, lang, loc, hs, bs, be, lines,
            children, env,
        )  # fmt: skip


def decode_meta(data: bytes) -> MessageMeta:
    """Decode what :func:`encode_meta` produced. Raises ``ValueError`` on anything malformed:
    wrong magic or version, truncation, trailing bytes, or a violated offset/shape invariant."""
    if len(data) < _HEADER.size:
        raise ValueError("mime meta: too short")
    magic, version = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise ValueError("mime meta: bad magic")
    if version != META_VERSION:
        raise ValueError(f"mime meta: unsupported version {version}")
    r = _Reader(data, _HEADER.size)
    size = r.uv()
    env = r.envelope()
    body = r.part(0, 0, size)
    if r.i != len(data):
        raise ValueError("mime meta: trailing bytes")
    return MessageMeta(size, env, body)


# -- IMAP rendering ----------------------------------------------------------------------------

_UNSAFE_RE = re.compile(rb"[\x00\r\n\x80-\xff]")


def _string(v: bytes) -> bytes:
    if len(v) <= QUOTED_MAX and _UNSAFE_RE.search(v) is None:
        return b'"' + v.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    v = v.replace(b"\x00", b"")
    return b"{%d}\r\n" % len(v) + v


def _nstring(v: bytes | None) -> bytes:
    return b"NIL" if v is None else _string(v)


def _render_params(ps: Params) -> bytes:
    if not ps:
        return b"NIL"
    return b"(" + b" ".join(_string(k) + b" " + _string(v) for k, v in ps) + b")"


def _render_addrs(lst: tuple[Address, ...]) -> bytes:
    if not lst:
        return b"NIL"
    return (
        b"("
        + b"".join(
            b"(%s %s %s %s)"
            % (_nstring(a.name), _nstring(a.adl), _nstring(a.mailbox), _nstring(a.host))
            for a in lst
        )
        + b")"
    )


def _render_envelope(e: Envelope) -> bytes:
    fields = (
        _nstring(e.date),
        _nstring(e.subject),
        _render_addrs(e.from_),
        _render_addrs(e.sender or e.from_),
        _render_addrs(e.reply_to or e.from_),
        _render_addrs(e.to),
        _render_addrs(e.cc),
        _render_addrs(e.bcc),
        _nstring(e.in_reply_to),
        _nstring(e.message_id),
    )
    return b"(" + b" ".join(fields) + b")"


def _render_ext_tail(p: BodyPart) -> bytes:
    """SP body-fld-dsp SP body-fld-lang SP body-fld-loc"""
    dsp = (
        b"NIL"
        if p.disposition is None
        else b"(" + _string(p.disposition) + b" " + _render_params(p.disposition_params) + b")"
    )
    if not p.language:
        lang = b"NIL"
    elif len(p.language) == 1:
        lang = _string(p.language[0])
    else:
        lang = b"(" + b" ".join(_string(t) for t in p.language) + b")"
    return b" " + dsp + b" " + lang + b" " + _nstring(p.location)


def _render_body(p: BodyPart, extended: bool) -> bytes:
    if p.is_multipart:
        out = b"".join(_render_body(c, extended) for c in p.children) + b" " + _string(p.subtype)
        if extended:
            out += b" " + _render_params(p.params) + _render_ext_tail(p)
        return b"(" + out + b")"
    out = b"%s %s %s %s %s %s %d" % (
        _string(p.type),
        _string(p.subtype),
        _render_params(p.params),
        _nstring(p.id),
        _nstring(p.description),
        _string(p.encoding),
        p.size,
    )
    if p.envelope is not None:
        out += b" %s %s %d" % (
            _render_envelope(p.envelope),
            _render_body(p.children[0], extended),
            p.lines,
        )
    elif p.type == b"TEXT":
        out += b" %d" % p.lines
    if extended:
        out += b" " + _nstring(p.md5) + _render_ext_tail(p)
    return b"(" + out + b")"


def envelope_imap(meta: MessageMeta) -> bytes:
    """The FETCH ENVELOPE value (without the ``ENVELOPE`` keyword), RFC 3501 section 7.4.2.
    Sender and Reply-To default to From when absent or empty."""
    return _render_envelope(meta.envelope)


def bodystructure_imap(meta: MessageMeta, extended: bool) -> bytes:
    """The FETCH BODYSTRUCTURE (``extended=True``) or BODY (``extended=False``) value, without the
    keyword. Extension data, when asked for, is always complete (md5/dsp/lang/loc)."""
    return _render_body(meta.body, extended)


# -- sections ----------------------------------------------------------------------------------

_PART_RE = re.compile(r"((?:[0-9]{1,9}\.)*[0-9]{1,9})(\.|$)")
_FIELDS_RE = re.compile(r"HEADER\.FIELDS(\.NOT)?\s*\((.*)\)\s*", re.S | re.I)
_ASTRING_RE = re.compile(r'"((?:[^"\\]|\\.)*)"|([^\s()"]+)', re.S)
_UNESCAPE_STR_RE = re.compile(r"\\(.)", re.S)


def _numbered(root: BodyPart) -> tuple[BodyPart, ...]:
    """The numbered parts of a message whose top-level entity is ``root``."""
    return root.children if root.is_multipart else (root,)


def _subparts(p: BodyPart) -> tuple[BodyPart, ...]:
    if p.is_multipart:
        return p.children
    if p.envelope is not None:
        return _numbered(p.children[0])
    return ()


def _parse_section(
    meta: MessageMeta, section: str
) -> tuple[BodyPart, bool, str, frozenset[bytes], bool] | None:
    """Resolve a section spec to (part, has_part_number, kind, field names, negate)."""
    s = section.strip()
    nums: list[int] = []
    m = _PART_RE.match(s)
    if m is not None:
        nums = [int(x) for x in m.group(1).split(".")]
        rest = s[m.end() :]
        if m.group(2) == "." and not rest:
            return None
    else:
        rest = s
    part = meta.body
    if nums:
        kids = _numbered(meta.body)
        for k in nums:
            if not 1 <= k <= len(kids):
                return None
            part = kids[k - 1]
            kids = _subparts(part)
    names: frozenset[bytes] = frozenset()
    negate = False
    up = rest.upper()
    if up in ("", "HEADER", "TEXT"):
        kind = up
    elif up == "MIME":
        if not nums:
            return None
        kind = "MIME"
    else:
        fm = _FIELDS_RE.fullmatch(rest)
        if fm is None:
            return None
        negate = fm.group(1) is not None
        items = [
            _UNESCAPE_STR_RE.sub(r"\1", q.group(1)) if q.group(1) is not None else q.group(2)
            for q in _ASTRING_RE.finditer(fm.group(2))
        ]
        if not items:
            return None
        names = frozenset(x.encode("utf-8", "replace").lower() for x in items)
        kind = "FIELDS"
    return part, bool(nums), kind, names, negate


def _filter_header(hdr: bytes, names: frozenset[bytes], negate: bool) -> bytes:
    out: list[bytes] = []
    keep = False
    lines = hdr.split(b"\n")
    last = len(lines) - 1
    for i, line in enumerate(lines):
        if line in (b"", b"\r"):
            break  # the blank line ends the header (or the last, unterminated piece is empty)
        eol = b"\n" if i < last else b"\r\n"  # a header cut off at the end of the message
        if line[0] in (32, 9):
            if keep:
                out.append(line + eol)
            continue
        colon = line.find(b":")
        if colon <= 0:
            keep = False
            continue
        keep = (line[:colon].strip(_BLANKS).lower() in names) != negate
        if keep:
            out.append(line + eol)
    out.append(b"\r\n")
    return b"".join(out)


def section_range(meta: MessageMeta, section: str) -> tuple[int, int] | None:
    """The [start, end) byte range in the raw message of a section that is a plain slice ("",
    "HEADER", "TEXT", "N...", "N...MIME", "N...HEADER", "N...TEXT"), for zero-copy or partial
    fetches. ``None`` for an invalid section or for HEADER.FIELDS (use :func:`section_bytes`)."""
    r = _parse_section(meta, section)
    if r is None:
        return None
    part, numbered, kind, _, _ = r
    if kind == "FIELDS":
        return None
    if not numbered:
        if kind == "":
            return 0, meta.size
        return (
            (part.header_start, part.body_start)
            if kind == "HEADER"
            else (
                part.body_start,
                part.body_end,
            )
        )
    if kind == "":
        return part.body_start, part.body_end
    if kind == "MIME":
        return part.header_start, part.body_start
    if part.envelope is None:
        return None  # HEADER/TEXT of a part that is not a message
    inner = part.children[0]
    if kind == "HEADER":
        return inner.header_start, inner.body_start
    return inner.body_start, inner.body_end


def section_bytes(raw: bytes, meta: MessageMeta, section: str) -> bytes | None:
    """The content of FETCH BODY[``section``] per RFC 3501 section 6.4.5, or ``None`` if the
    section is invalid or does not exist in this message, or ``raw`` is not the message ``meta``
    describes (its length differs).

    ``section`` is the text between the brackets: "", "HEADER", "TEXT", "1", "1.2", "1.MIME",
    "2.HEADER", "2.TEXT", "HEADER.FIELDS (A B)", "1.HEADER.FIELDS.NOT (A)", ... HEADER, TEXT and
    HEADER.FIELDS after a part number need a MESSAGE/RFC822 part. HEADER.FIELDS[.NOT] returns the
    matching field lines as stored, in message order, followed by CRLF. Partial fetches slice the
    result."""
    if len(raw) != meta.size:
        return None
    r = _parse_section(meta, section)
    if r is None:
        return None
    part, numbered, kind, names, negate = r
    if kind != "FIELDS":
        rng = section_range(meta, section)
        return None if rng is None else raw[rng[0] : rng[1]]
    if numbered:
        if part.envelope is None:
            return None
        part = part.children[0]
    return _filter_header(raw[part.header_start : part.body_start], names, negate)
