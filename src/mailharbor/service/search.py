"""SEARCH evaluation over a selected view (RFC 3501 / RFC 9051 keys, CONDSTORE's MODSEQ,
RFC 8474's EMAILID/THREADID).

Theory of operation
-------------------
The adapter turns the parsed search program into a tree of :class:`Key` (``op`` is the upper-case
RFC keyword; ``SEQ``/``UID`` carry ranges, ``AND``/``OR``/``NOT`` carry children). :func:`search`
narrows the view's live messages key by key: flag keys are evaluated over the index's flag column
in one pass, ``AND`` narrows the candidates child by child (cheapest first, so ``UNSEEN FROM x``
reads no header of a seen message), ``OR``/``NOT`` combine subsets; every other key is evaluated
per candidate with a lazy context: sizes, dates and MODSEQs come from the index columns; header
keys read the message header (one slice of the cached blob; parsed fields are cached by body
hash, and their case-folded values per blob slot, so a repeated FROM search is one lookup per
message); ``BODY``/``TEXT`` decode the text parts found through the stored MIME metadata
(base64 and quoted-printable, then the part's charset).

Matching rules: strings match as case-insensitive substrings (``casefold``) of the decoded value
(RFC 2047 encoded words are decoded in header fields); ``BEFORE``/``ON``/``SINCE`` compare the
INTERNALDATE's date in the server's timezone; ``SENT*`` compare the ``Date:`` header's own date
(time and zone ignored, as RFC 3501 says); a message without a parseable ``Date:`` uses its
INTERNALDATE.

Invariants: evaluation never raises for any stored message (malformed headers, bad encodings and
unknown charsets fall back to a lossy decode); expunged-but-not-yet-reported messages never match.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import datetime as dt
import email.utils
import quopri
import re
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

from mailharbor.service.mailbox import SelectedView, email_id
from mailharbor.service.mime import BodyPart, MessageMeta
from mailharbor.store import index as ix

__all__ = ["Key", "SearchResult", "search"]

_FLAG_KEYS = {
    "ANSWERED": (ix.ANSWERED, True),
    "DELETED": (ix.DELETED, True),
    "DRAFT": (ix.DRAFT, True),
    "FLAGGED": (ix.FLAGGED, True),
    "SEEN": (ix.SEEN, True),
    "UNANSWERED": (ix.ANSWERED, False),
    "UNDELETED": (ix.DELETED, False),
    "UNDRAFT": (ix.DRAFT, False),
    "UNFLAGGED": (ix.FLAGGED, False),
    "UNSEEN": (ix.SEEN, False),
}
_ADDRESS_HEADERS = {"FROM": "from", "TO": "to", "CC": "cc", "BCC": "bcc", "SUBJECT": "subject"}
_COST = {"HEADER": 2, "BODY": 3, "TEXT": 4, "SENTBEFORE": 2, "SENTON": 2, "SENTSINCE": 2}
_UNFOLD_RE = re.compile(rb"\r?\n(?=[ \t])")
_MAX_TEXT = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Key:
    """One search key. ``op``: ALL, ANSWERED … UNSEEN, NEW, OLD, RECENT, KEYWORD/UNKEYWORD
    (text), FROM/TO/CC/BCC/SUBJECT/BODY/TEXT (text), HEADER (name, text), BEFORE/ON/SINCE/
    SENTBEFORE/SENTON/SENTSINCE (date), LARGER/SMALLER (num), MODSEQ (num), EMAILID/THREADID
    (text), SEQ/UID (ranges, ``None`` = ``*``), NOT (keys[0]), OR (keys[0], keys[1]), AND (keys)."""

    op: str
    text: str = ""
    name: str = ""
    num: int = 0
    date: dt.date | None = None
    ranges: tuple[tuple[int | None, int | None], ...] = ()
    keys: tuple[Key, ...] = ()


@dataclass(frozen=True, slots=True)
class SearchResult:
    matches: tuple[tuple[int, int], ...]  # (seq, uid), ascending
    highest_modseq: int  # of the matches, when the program used MODSEQ (else 0)


def _cost(k: Key) -> int:
    if k.op in ("FROM", "TO", "CC", "BCC", "SUBJECT"):
        return 1
    if k.op in ("AND", "OR", "NOT"):
        return max((_cost(c) for c in k.keys), default=0)
    return _COST.get(k.op, 0)


def _order(k: Key) -> Key:
    if k.op == "AND":
        return Key("AND", keys=tuple(sorted((_order(c) for c in k.keys), key=_cost)))
    if k.op in ("OR", "NOT"):
        return Key(k.op, keys=tuple(_order(c) for c in k.keys))
    return k


def _uses_modseq(k: Key) -> bool:
    return k.op == "MODSEQ" or any(_uses_modseq(c) for c in k.keys)


_ENCODED_WORD = re.compile(rb"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_QP_HEX = re.compile(rb"=([0-9A-Fa-f]{2})")


def _word_bytes(kind: bytes, data: bytes) -> bytes:
    if kind in b"bB":
        try:
            return base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)
        except (binascii.Error, ValueError):
            return data
    return _QP_HEX.sub(lambda m: bytes([int(m.group(1), 16)]), data.replace(b"_", b" "))


def _decode_as(data: bytes, charset: str) -> str:
    try:
        return data.decode(charset, "replace")
    except LookupError:
        return data.decode("utf-8", "replace")


def _decode_words(value: bytes) -> str:
    """A header value with RFC 2047 encoded words decoded (never raises).

    Adjacent encoded words are joined without the whitespace between them, and the bytes of
    adjacent words in one charset are decoded together (a character may be split across them).
    """
    if b"=?" not in value:
        return value.decode("utf-8", "replace")
    out: list[str] = []
    pending = bytearray()
    pending_cs = ""
    pos = 0
    for m in _ENCODED_WORD.finditer(value):
        between = value[pos : m.start()]
        if not pending or between.strip(b" \t\r\n"):
            if pending:
                out.append(_decode_as(bytes(pending), pending_cs))
                pending.clear()
            out.append(between.decode("utf-8", "replace"))
        cs = m.group(1).split(b"*", 1)[0].decode("ascii", "replace").lower()
        if pending and cs != pending_cs:
            out.append(_decode_as(bytes(pending), pending_cs))
            pending.clear()
        pending_cs = cs
        pending += _word_bytes(m.group(2), m.group(3))
        pos = m.end()
    if pending:
        out.append(_decode_as(bytes(pending), pending_cs))
    out.append(value[pos:].decode("utf-8", "replace"))
    return "".join(out)


class _Fields:
    """The header fields of one message body: raw values by lower-case name, decoded on demand.

    A pure function of the body's bytes, so it is cached by the body's hash (`_field_cache`).
    """

    __slots__ = ("_decoded", "_folded", "raw")

    def __init__(self, hdr: bytes) -> None:
        raw: dict[str, list[bytes]] = {}
        for line in _UNFOLD_RE.sub(b"", hdr).split(b"\n"):
            name, colon, value = line.partition(b":")
            if not colon or not name or name[:1] in (b" ", b"\t"):
                continue
            key = name.strip().decode("ascii", "replace").lower()
            raw.setdefault(key, []).append(value.strip())
        self.raw = raw
        self._decoded: dict[str, list[str]] = {}
        self._folded: dict[str, list[str]] = {}

    def get(self, name: str) -> list[str] | None:
        """The decoded values of field ``name`` (lower case), or None if absent."""
        got = self._decoded.get(name)
        if got is None:
            values = self.raw.get(name)
            if values is None:
                return None
            got = self._decoded[name] = [_decode_words(v) for v in values]
        return got

    def folded(self, name: str) -> list[str] | None:
        """As :meth:`get`, case-folded (what substring matching compares)."""
        got = self._folded.get(name)
        if got is None:
            values = self.get(name)
            if values is None:
                return None
            got = self._folded[name] = [v.casefold() for v in values]
        return got

    def text(self) -> str:
        return "\n".join(f"{k}: {v}" for k in self.raw for v in self.get(k) or ())


class _FieldCache:
    """A bounded LRU of :class:`_Fields` by body hash (content-addressed: never stale)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._d: OrderedDict[bytes, _Fields] = OrderedDict()

    def get(self, blob: bytes, load: Callable[[], bytes]) -> _Fields:
        f = self._d.get(blob)
        if f is not None:
            self._d.move_to_end(blob)
            return f
        f = self._d[blob] = _Fields(load())
        if len(self._d) > self.limit:
            self._d.popitem(last=False)
        return f


_field_cache = _FieldCache(20_000)
"""Parsed header fields of recently searched bodies (about 1-2 KiB each)."""


def _charset(p: BodyPart) -> str:
    for k, v in p.params:
        if k == b"CHARSET":
            name = v.decode("ascii", "replace").strip().lower()
            try:
                codecs.lookup(name)
                return name
            except LookupError:
                return "utf-8"
    return "utf-8"


def _decode_transfer(data: bytes, encoding: bytes) -> bytes:
    try:
        if encoding == b"BASE64":
            return base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", data) + b"==")
        if encoding == b"QUOTED-PRINTABLE":
            return quopri.decodestring(data)
    except (binascii.Error, ValueError):
        return data
    return data


class _Msg:
    """Lazy per-message context."""

    __slots__ = ("_fields", "_meta", "_raw", "blob", "i", "mb", "seq", "uid", "view")

    def __init__(self, view: SelectedView, mb: ix.Mailbox, seq: int, uid: int, i: int) -> None:
        self.view, self.mb, self.seq, self.uid, self.i = view, mb, seq, uid, i
        self.blob = view.store.index.blobs.hash_at(mb.blobs[i])
        self._raw: bytes | None = None
        self._meta: MessageMeta | None = None
        self._fields: _Fields | None = None

    @property
    def raw(self) -> bytes:
        if self._raw is None:
            self._raw = self.view.store.read_blob(self.blob)
        return self._raw

    @property
    def meta(self) -> MessageMeta:
        if self._meta is None:
            self._meta = self.view.service.meta(self.blob)
        return self._meta

    def fields(self) -> _Fields:
        if self._fields is None:

            def header() -> bytes:
                b = self.meta.body
                return self.raw[b.header_start : b.body_start]

            self._fields = _field_cache.get(self.blob, header)
        return self._fields

    def header_text(self) -> str:
        return self.fields().text()

    def body_text(self) -> str:
        raw = self.raw
        parts: list[str] = []
        total = 0

        def walk(p: BodyPart) -> None:
            nonlocal total
            if total > _MAX_TEXT:
                return
            if p.children:
                if p.envelope is not None:
                    c = p.children[0]
                    parts.append(raw[c.header_start : c.body_start].decode("utf-8", "replace"))
                for c in p.children:
                    walk(c)
                return
            if p.type not in (b"TEXT", b"MESSAGE"):
                return
            data = _decode_transfer(raw[p.body_start : p.body_end], p.encoding)
            total += len(data)
            parts.append(data.decode(_charset(p), "replace"))

        walk(self.meta.body)
        return "\n".join(parts)

    def sent_date(self) -> dt.date:
        for v in self.fields().get("date") or ():
            try:
                return email.utils.parsedate_to_datetime(v).date()
            except (TypeError, ValueError, IndexError):
                continue
        return self.internal_date()

    def internal_date(self) -> dt.date:
        return dt.datetime.fromtimestamp(self.mb.dates[self.i] / 1000).date()


def _in_ranges(n: int, ranges: Sequence[tuple[int | None, int | None]], top: int) -> bool:
    for a, b in ranges:
        lo = top if a is None else a
        hi = top if b is None else b
        if lo > hi:
            lo, hi = hi, lo
        if lo <= n <= hi:
            return True
    return False


def _match(k: Key, m: _Msg) -> bool:
    op = k.op
    mb, i = m.mb, m.i
    fk = _FLAG_KEYS.get(op)
    if fk is not None:
        return bool(mb.flags[i] & fk[0]) == fk[1]
    if op == "ALL":
        return True
    if op == "AND":
        return all(_match(c, m) for c in k.keys)
    if op == "OR":
        return _match(k.keys[0], m) or _match(k.keys[1], m)
    if op == "NOT":
        return not _match(k.keys[0], m)
    if op == "SEQ":
        return _in_ranges(m.seq, k.ranges, m.view.exists)
    if op == "UID":
        top = m.view.uids[-1] if m.view.uids else 0
        return _in_ranges(m.uid, k.ranges, top)
    if op in ("KEYWORD", "UNKEYWORD"):
        bit = mb.keyword_bit(k.text, create=False)
        has = bool(bit and mb.kwbits[i] & bit)
        return has if op == "KEYWORD" else not has
    if op == "RECENT":
        return m.view.is_recent(m.uid)
    if op == "OLD":
        return not m.view.is_recent(m.uid)
    if op == "NEW":
        return m.view.is_recent(m.uid) and not mb.flags[i] & ix.SEEN
    if op == "LARGER":
        return mb.sizes[i] > k.num
    if op == "SMALLER":
        return mb.sizes[i] < k.num
    if op == "MODSEQ":
        return mb.modseqs[i] >= k.num
    if op == "EMAILID":
        return k.text == email_id(m.blob)
    if op == "THREADID":
        return False
    if op in ("BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"):
        assert k.date is not None
        d = m.sent_date() if op.startswith("SENT") else m.internal_date()
        base = op[4:] if op.startswith("SENT") else op
        if base == "BEFORE":
            return d < k.date
        if base == "ON":
            return d == k.date
        return d >= k.date
    needle = k.text.casefold()
    if op in _ADDRESS_HEADERS or op == "HEADER":
        name = _ADDRESS_HEADERS.get(op) or k.name.lower()
        values = m.fields().folded(name)
        if values is None:
            return False
        return any(needle in v for v in values)
    if op == "BODY":
        return needle in m.body_text().casefold()
    if op == "TEXT":
        return needle in m.header_text().casefold() or needle in m.body_text().casefold()
    return False


class _Rows:
    """The messages a search runs over, as parallel columns: sequence number, UID and index in
    the mailbox's columns. A candidate set is a list of row numbers, ascending."""

    __slots__ = ("mb", "pos", "seqs", "uids", "view")

    def __init__(
        self,
        view: SelectedView,
        mb: ix.Mailbox,
        seqs: Sequence[int],
        uids: Sequence[int],
        pos: Sequence[int],
    ) -> None:
        self.view, self.mb, self.seqs, self.uids, self.pos = view, mb, seqs, uids, pos

    def msg(self, r: int) -> _Msg:
        return _Msg(self.view, self.mb, self.seqs[r], self.uids[r], self.pos[r])


class _SlotColumns:
    """Case-folded header field values by blob slot, one column per field name: what FROM/TO/
    CC/BCC/SUBJECT/HEADER compare, one dict lookup per message. Bound to one blob table (a
    slot names the same body for the table's lifetime; a new index brings a new table, and
    the columns start over) and bounded in size."""

    def __init__(self, limit: int, max_names: int) -> None:
        self.limit = limit
        self.max_names = max_names
        self._table: weakref.ref[ix.BlobTable] | None = None
        self._cols: dict[str, dict[int, list[str] | None]] = {}

    def column(self, blobs: ix.BlobTable, name: str) -> dict[int, list[str] | None]:
        if self._table is None or self._table() is not blobs:
            self._table = weakref.ref(blobs)
            self._cols = {}
        col = self._cols.get(name)
        if col is None:
            if len(self._cols) >= self.max_names:
                self._cols = {}
            col = self._cols[name] = {}
        elif len(col) >= self.limit:
            col.clear()
        return col


_slot_columns = _SlotColumns(50_000, 16)
_ABSENT: list[str] = []  # a distinct object: "not cached yet"


def _header_matches(k: Key, rows: _Rows, cand: list[int]) -> list[int]:
    """FROM/TO/CC/BCC/SUBJECT/HEADER over the candidates (same rule as :func:`_match`)."""
    name = _ADDRESS_HEADERS.get(k.op) or k.name.lower()
    needle = k.text.casefold()
    blobs = rows.view.store.index.blobs
    col = _slot_columns.column(blobs, name)
    slots, pos = rows.mb.blobs, rows.pos
    out: list[int] = []
    for r in cand:
        s = slots[pos[r]]
        values = col.get(s, _ABSENT)
        if values is _ABSENT:
            values = col[s] = rows.msg(r).fields().folded(name)
        if values is not None:
            for v in values:
                if needle in v:
                    out.append(r)
                    break
    return out


def _select(k: Key, rows: _Rows, cand: list[int]) -> list[int]:
    """The candidates (row numbers, ascending) that match ``k``: index-only keys are evaluated
    over the columns, boolean keys combine subsets (an AND narrows child by child, cheapest
    first), the rest per message with :func:`_match`."""
    op = k.op
    fk = _FLAG_KEYS.get(op)
    if fk is not None:
        fl, pos = rows.mb.flags, rows.pos
        bit, want = fk
        if want:
            return [r for r in cand if fl[pos[r]] & bit]
        return [r for r in cand if not fl[pos[r]] & bit]
    if op == "ALL":
        return cand
    if op == "AND":
        for c in k.keys:
            if not cand:
                break
            cand = _select(c, rows, cand)
        return cand
    if op == "OR":
        first = _select(k.keys[0], rows, cand)
        if len(first) == len(cand):
            return cand
        got = set(first)
        second = _select(k.keys[1], rows, [r for r in cand if r not in got])
        if not second:
            return first
        got.update(second)
        return [r for r in cand if r in got]
    if op == "NOT":
        drop = set(_select(k.keys[0], rows, cand))
        return [r for r in cand if r not in drop]
    if op in _ADDRESS_HEADERS or op == "HEADER":
        return _header_matches(k, rows, cand)
    return [r for r in cand if _match(k, rows.msg(r))]


def search(
    view: SelectedView, program: Key, *, candidates: Sequence[tuple[int, int]] | None = None
) -> SearchResult:
    """Evaluate ``program`` over the view's live messages (or ``candidates``)."""
    mb = view.mailbox()
    key = _order(program)
    rows: _Rows
    mapping = view.column_runs(mb) if candidates is None else None
    if mapping is not None:
        runs, _ = mapping  # the view's messages still in the mailbox, run by run
        if len(runs) == 1 and runs[0][0] == runs[0][2] == 0:
            n = runs[0][1]
            rows = _Rows(view, mb, range(1, n + 1), view.uids, range(n))
        else:
            rows = _Rows(
                view,
                mb,
                list(chain.from_iterable(range(f + 1, e + 1) for f, e, _ in runs)),
                list(chain.from_iterable(view.uids[f:e] for f, e, _ in runs)),
                list(chain.from_iterable(range(c, c + e - f) for f, e, c in runs)),
            )
    else:
        targets = candidates if candidates is not None else list(enumerate(view.uids, 1))
        seqs: list[int] = []
        uids: list[int] = []
        pos: list[int] = []
        for seq, uid in targets:
            i = mb.position(uid)
            if i is not None:
                seqs.append(seq)
                uids.append(uid)
                pos.append(i)
        rows = _Rows(view, mb, seqs, uids, pos)
    hits = _select(key, rows, list(range(len(rows.seqs))))
    out = tuple((rows.seqs[r], rows.uids[r]) for r in hits)
    if _uses_modseq(program):
        view.condstore = True
        modseqs = mb.modseqs
        return SearchResult(out, max((modseqs[rows.pos[r]] for r in hits), default=0))
    return SearchResult(out, 0)
