"""IMAP client commands as typed, frozen dataclasses (what :func:`~.parser.parse_command` returns).

Conventions, for every command:

- Mailbox names (and LIST references/patterns) are Unicode ``str``: modified UTF-7 is decoded
  by the parser (or, after ``ENABLE UTF8=ACCEPT``/``IMAP4rev2``, the UTF-8 string is taken as
  is). ``INBOX`` in any case is normalised to ``"INBOX"`` (only the whole name).
- Flags are ``str``: system flags in canonical case (``\\Seen``, ``\\Answered``, ``\\Flagged``,
  ``\\Deleted``, ``\\Draft``), keywords and flag extensions as written.
- Keywords of item lists (STATUS items, LIST options, ESEARCH RETURN options, ENABLE
  capabilities) are upper-cased.
- Numbers are validated (nz-number 1..2^32-1, mod-sequence 1..2^63-1, number64 0..2^63-1).
- ``uid=True`` marks the ``UID`` form of COPY/MOVE/FETCH/STORE/SEARCH (sequence sets are then
  UIDs).
"""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass, field

from .seqset import SequenceSet

__all__ = [
    "Append",
    "Authenticate",
    "AuthenticateStart",
    "Capability",
    "Check",
    "Close",
    "Command",
    "Copy",
    "Create",
    "Delete",
    "Enable",
    "Expunge",
    "Fetch",
    "FetchAtt",
    "FetchBody",
    "FetchItem",
    "GetQuota",
    "GetQuotaRoot",
    "Id",
    "Idle",
    "List",
    "Login",
    "Logout",
    "Lsub",
    "Move",
    "Namespace",
    "Noop",
    "QresyncParams",
    "Rename",
    "Search",
    "SearchAll",
    "SearchAnd",
    "SearchDate",
    "SearchFlag",
    "SearchHeader",
    "SearchKey",
    "SearchModSeq",
    "SearchNot",
    "SearchObjectId",
    "SearchOr",
    "SearchSeq",
    "SearchSize",
    "SearchText",
    "Select",
    "SetQuota",
    "StartTls",
    "Status",
    "Store",
    "StoreMode",
    "Subscribe",
    "Unselect",
    "Unsubscribe",
]


# --------------------------------------------------------------------------- any state


@dataclass(frozen=True)
class Capability:
    """CAPABILITY. Answered by the engine."""


@dataclass(frozen=True)
class Noop:
    """NOOP. The app sends pending untagged updates, then ``ok()``."""


@dataclass(frozen=True)
class Logout:
    """LOGOUT. Answered by the engine (``* BYE`` + tagged OK); the session is over."""


@dataclass(frozen=True)
class Id:
    """ID (RFC 2971). ``params``: the client's field/value pairs, or None for ``ID NIL``.
    Answered by the engine with the configured server ID."""

    params: tuple[tuple[str, str | None], ...] | None


# --------------------------------------------------------------------------- not authenticated


@dataclass(frozen=True)
class StartTls:
    """STARTTLS. Answered by the engine (tagged OK); pipelined bytes are discarded. The adapter
    flushes ``data_to_send()``, runs the TLS handshake, then calls ``starttls_done()``."""


@dataclass(frozen=True)
class Login:
    """LOGIN. The app checks the password and answers ``ok()`` or
    ``no(..., Code.AUTHENTICATIONFAILED)``."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Authenticate:
    """AUTHENTICATE after the SASL exchange finished (the engine runs it, SASL-IR included).
    ``mechanism`` is ``"PLAIN"`` or ``"LOGIN"``; ``authzid`` is ``""`` when absent. Answered by
    the app like :class:`Login`."""

    mechanism: str
    authzid: str
    identity: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class AuthenticateStart:
    """AUTHENTICATE as parsed (mechanism upper-cased; ``initial``: the SASL-IR initial response,
    base64 text or ``"="`` for empty, None when absent). Only :func:`~.parser.parse_command`
    returns it: the engine runs the exchange and emits :class:`Authenticate`."""

    mechanism: str
    initial: str | None = None


# --------------------------------------------------------------------------- authenticated


@dataclass(frozen=True)
class Enable:
    """ENABLE (RFC 5161). ``extensions``: the ones that were enabled now (already in
    ``conn.enabled``); answered by the engine (``* ENABLED ...`` + OK)."""

    extensions: tuple[str, ...]


@dataclass(frozen=True)
class QresyncParams:
    """SELECT/EXAMINE ``(QRESYNC (uidvalidity modseq [known-uids [(seq-match)]]))``
    (RFC 7162 3.2.5). ``seq_match`` is (known sequence numbers, their UIDs)."""

    uidvalidity: int
    modseq: int
    known_uids: SequenceSet | None = None
    seq_match: tuple[SequenceSet, SequenceSet] | None = None


@dataclass(frozen=True)
class Select:
    """SELECT, or EXAMINE when ``readonly``. ``condstore``: the ``(CONDSTORE)`` parameter;
    ``qresync``: the QRESYNC parameter (only accepted after ``ENABLE QRESYNC``). OK moves to
    SELECTED; NO leaves the session AUTHENTICATED (a failed SELECT closes the old mailbox)."""

    mailbox: str
    readonly: bool = False
    condstore: bool = False
    qresync: QresyncParams | None = None


@dataclass(frozen=True)
class Create:
    """CREATE; ``special_use``: the ``(USE (\\Drafts ...))`` attributes (RFC 6154)."""

    mailbox: str
    special_use: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delete:
    mailbox: str


@dataclass(frozen=True)
class Rename:
    old: str
    new: str


@dataclass(frozen=True)
class Subscribe:
    mailbox: str


@dataclass(frozen=True)
class Unsubscribe:
    mailbox: str


@dataclass(frozen=True)
class List:
    """LIST, RFC 5258 extended form included.

    - ``reference`` and ``patterns`` (one or more; ``%``/``*`` wildcards kept).
    - ``selection``: SUBSCRIBED, REMOTE, RECURSIVEMATCH (only with another option),
      SPECIAL-USE.
    - ``returns``: SUBSCRIBED, CHILDREN, SPECIAL-USE, STATUS.
    - ``status_items``: the items of ``RETURN (STATUS (...))``, else ``()``.
    - ``extended``: the client used selection options, several patterns or RETURN — the
      response may carry extended data (CHILDINFO, OLDNAME).
    """

    reference: str
    patterns: tuple[str, ...]
    selection: frozenset[str] = frozenset()
    returns: frozenset[str] = frozenset()
    status_items: tuple[str, ...] = ()
    extended: bool = False


@dataclass(frozen=True)
class Lsub:
    reference: str
    pattern: str


@dataclass(frozen=True)
class Namespace:
    """NAMESPACE. The app answers with ``namespace(...)`` then ``ok()``."""


@dataclass(frozen=True)
class Status:
    """STATUS. ``items`` (upper-case, in request order): MESSAGES, UIDNEXT, UIDVALIDITY,
    UNSEEN, DELETED, SIZE, RECENT, HIGHESTMODSEQ, MAILBOXID."""

    mailbox: str
    items: tuple[str, ...]


@dataclass(frozen=True)
class Append:
    """APPEND. ``message``: the literal's bytes; ``internal_date``: timezone-aware or None;
    ``utf8``: sent as ``UTF8 (~{n})`` (RFC 6855). Answer with
    ``ok(code=Code.appenduid(uidvalidity, uid))`` once durable."""

    mailbox: str
    flags: tuple[str, ...]
    internal_date: datetime.datetime | None
    message: bytes = field(repr=False)
    utf8: bool = False


@dataclass(frozen=True)
class Idle:
    """IDLE (RFC 2177). The engine has queued ``+ idling`` and waits for ``DONE``; meanwhile
    the app may send untagged responses. On ``DONE`` the engine emits :class:`~.events.IdleDone`
    and the app completes the command with ``ok()``."""


@dataclass(frozen=True)
class GetQuota:
    root: str


@dataclass(frozen=True)
class GetQuotaRoot:
    mailbox: str


@dataclass(frozen=True)
class SetQuota:
    """SETQUOTA: answered by the engine with ``NO [CANNOT]`` (quotas are set by the admin)."""

    root: str
    limits: tuple[tuple[str, int], ...]


# --------------------------------------------------------------------------- selected


@dataclass(frozen=True)
class Check:
    pass


@dataclass(frozen=True)
class Close:
    """CLOSE: expunge silently (unless read-only), then back to AUTHENTICATED on OK."""


@dataclass(frozen=True)
class Unselect:
    """UNSELECT (RFC 3691): back to AUTHENTICATED without expunging."""


@dataclass(frozen=True)
class Expunge:
    """EXPUNGE, or UID EXPUNGE when ``uids`` is set (RFC 4315)."""

    uids: SequenceSet | None = None


@dataclass(frozen=True)
class Copy:
    sequence: SequenceSet
    mailbox: str
    uid: bool = False


@dataclass(frozen=True)
class Move:
    sequence: SequenceSet
    mailbox: str
    uid: bool = False


class StoreMode(enum.Enum):
    REPLACE = ""  # FLAGS
    ADD = "+"  # +FLAGS
    REMOVE = "-"  # -FLAGS


@dataclass(frozen=True)
class Store:
    """STORE / UID STORE; ``unchangedsince``: the CONDSTORE modifier (RFC 7162 3.1.3)."""

    sequence: SequenceSet
    mode: StoreMode
    flags: tuple[str, ...]
    silent: bool = False
    uid: bool = False
    unchangedsince: int | None = None


@dataclass(frozen=True)
class FetchAtt:
    """A FETCH item without a section: ENVELOPE, FLAGS, INTERNALDATE, RFC822, RFC822.HEADER,
    RFC822.SIZE, RFC822.TEXT, BODY, BODYSTRUCTURE, UID, MODSEQ, EMAILID, THREADID
    (``name``, upper-case; also the item's name in the response). ``RFC822`` and
    ``RFC822.TEXT`` set ``\\Seen`` like ``BODY[]``/``BODY[TEXT]``; ``RFC822.HEADER`` does not."""

    name: str


@dataclass(frozen=True)
class FetchBody:
    """``BODY[section]<partial>`` or ``BODY.PEEK[...]``.

    - ``part``: the part numbers (``1.2`` → ``(1, 2)``), ``()`` for the whole message.
    - ``text``: ``""``, ``"HEADER"``, ``"HEADER.FIELDS"``, ``"HEADER.FIELDS.NOT"``, ``"TEXT"``
      or ``"MIME"``.
    - ``fields``: the header field names for HEADER.FIELDS[.NOT], as written.
    - ``section``: the whole spec between the brackets in canonical form, e.g.
      ``"1.2.HEADER.FIELDS (From To)"`` — what :func:`mailharbor.service.mime.section_bytes`
      takes.
    - ``partial``: ``(offset, length)`` of ``<offset.length>``.
    - ``peek``: BODY.PEEK (no implicit ``\\Seen``).
    """

    section: str
    part: tuple[int, ...] = ()
    text: str = ""
    fields: tuple[str, ...] = ()
    partial: tuple[int, int] | None = None
    peek: bool = False

    @property
    def name(self) -> str:
        """The item's name in the FETCH response: ``BODY[section]`` plus ``<offset>`` for a
        partial fetch (never ``.PEEK``, never the length)."""
        suffix = f"<{self.partial[0]}>" if self.partial is not None else ""
        return f"BODY[{self.section}]{suffix}"


FetchItem = FetchAtt | FetchBody


@dataclass(frozen=True)
class Fetch:
    """FETCH / UID FETCH. ``items`` has the macros (ALL, FAST, FULL) expanded and no duplicates;
    for UID FETCH it contains ``FetchAtt("UID")`` and with CHANGEDSINCE it contains
    ``FetchAtt("MODSEQ")`` (both required in the response). ``changedsince``/``vanished``: the
    CONDSTORE/QRESYNC modifiers (VANISHED only in UID FETCH after ENABLE QRESYNC)."""

    sequence: SequenceSet
    items: tuple[FetchItem, ...]
    uid: bool = False
    changedsince: int | None = None
    vanished: bool = False


# --------------------------------------------------------------------------- SEARCH keys


@dataclass(frozen=True)
class SearchAll:
    """ALL."""


@dataclass(frozen=True)
class SearchFlag:
    """A flag test: ``present`` False for the UN- forms. ANSWERED → ``("\\Answered", True)``,
    UNSEEN → ``("\\Seen", False)``, KEYWORD k → ``(k, True)``, RECENT → ``("\\Recent", True)``.
    NEW is parsed as ``SearchAnd((RECENT, UNSEEN))`` and OLD as ``SearchNot(RECENT)``."""

    flag: str
    present: bool = True


@dataclass(frozen=True)
class SearchHeader:
    """A header field contains ``value`` (case-insensitive substring): BCC, CC, FROM, SUBJECT,
    TO (``field`` upper-case) or ``HEADER field value`` (``field`` as written). An empty
    ``value`` matches every message that has the field."""

    field: str
    value: str


@dataclass(frozen=True)
class SearchText:
    """BODY (``body_only``) or TEXT (header and body) contains ``value``."""

    value: str
    body_only: bool


@dataclass(frozen=True)
class SearchDate:
    """BEFORE/ON/SINCE (internal date, ``sent`` False) or SENTBEFORE/SENTON/SENTSINCE (Date
    header). ``op`` is ``"BEFORE"``, ``"ON"`` or ``"SINCE"``."""

    op: str
    date: datetime.date
    sent: bool = False


@dataclass(frozen=True)
class SearchSize:
    """LARGER (``larger``) or SMALLER than ``size`` octets (RFC822.SIZE)."""

    size: int
    larger: bool


@dataclass(frozen=True)
class SearchSeq:
    """A sequence set (``uid`` False) or ``UID set``."""

    sequence: SequenceSet
    uid: bool = False


@dataclass(frozen=True)
class SearchModSeq:
    """MODSEQ [entry-name entry-type] n (RFC 7162): messages with MODSEQ >= ``modseq``.
    ``entry``: (entry name, "priv"/"shared"/"all") when given."""

    modseq: int
    entry: tuple[str, str] | None = None


@dataclass(frozen=True)
class SearchObjectId:
    """EMAILID / THREADID (RFC 8474); ``kind`` is ``"EMAILID"`` or ``"THREADID"``."""

    kind: str
    value: str


@dataclass(frozen=True)
class SearchNot:
    key: SearchKey


@dataclass(frozen=True)
class SearchOr:
    left: SearchKey
    right: SearchKey


@dataclass(frozen=True)
class SearchAnd:
    """All of ``keys`` (a parenthesised group, or the top-level list of keys)."""

    keys: tuple[SearchKey, ...]


SearchKey = (
    SearchAll
    | SearchFlag
    | SearchHeader
    | SearchText
    | SearchDate
    | SearchSize
    | SearchSeq
    | SearchModSeq
    | SearchObjectId
    | SearchNot
    | SearchOr
    | SearchAnd
)


@dataclass(frozen=True)
class Search:
    """SEARCH / UID SEARCH.

    - ``key``: the search program; several top-level keys are a :class:`SearchAnd`, one key is
      itself.
    - ``charset``: upper-cased CHARSET argument, None when absent (only US-ASCII and UTF-8 are
      accepted; others get ``NO [BADCHARSET (US-ASCII UTF-8)]`` from the engine).
    - ``returns``: None for a classic SEARCH (``* SEARCH`` response; in IMAP4rev2 mode the
      answer must be ESEARCH anyway), else the ESEARCH RETURN options (MIN, MAX, ALL, COUNT;
      ``RETURN ()`` is ``("ALL",)``). SAVE is refused (SEARCHRES is not offered).
    - ``uses_modseq``: the program contains MODSEQ (the response then carries ``(MODSEQ n)``).
    """

    key: SearchKey
    uid: bool = False
    charset: str | None = None
    returns: tuple[str, ...] | None = None
    uses_modseq: bool = False


Command = (
    Capability
    | Noop
    | Logout
    | Id
    | StartTls
    | Login
    | Authenticate
    | AuthenticateStart
    | Enable
    | Select
    | Create
    | Delete
    | Rename
    | Subscribe
    | Unsubscribe
    | List
    | Lsub
    | Namespace
    | Status
    | Append
    | Idle
    | GetQuota
    | GetQuotaRoot
    | SetQuota
    | Check
    | Close
    | Unselect
    | Expunge
    | Copy
    | Move
    | Store
    | Fetch
    | Search
)
