"""IMAP4rev2/IMAP4rev1 server engine, sans-IO (h11 style).

Invariants (details in :mod:`.server`): no client input makes the engine raise; one command is
processed at a time and its responses leave before the next command is read; memory is bounded
by :class:`ImapLimits` (a command is at most ``max_line_length`` bytes of lines plus
``max_literal`` bytes of literals); a literal's content is never read as a command; nothing
received before TLS survives STARTTLS; all state changes are in one transition table; Python
exception text never goes on the wire.

Driving it (an adapter, roughly)::

    conn = ImapServerConnection(ImapServerConfig(tls_available=True))
    write(conn.data_to_send())                       # * OK [CAPABILITY ...] greeting
    while not conn.closing:
        conn.receive_data(await read())              # b"" on EOF
        while (ev := conn.next_event()) not in (NEED_DATA, PAUSED):
            match ev:
                case Request(answered=True, command=StartTls()):
                    write(conn.data_to_send()); await tls_handshake(); conn.starttls_done()
                case Request(answered=True):         # CAPABILITY, LOGOUT, ENABLE, ID, ...
                    pass
                case Request(tag, Login(user, pw)):
                    write(conn.send(ok() if await check(user, pw)
                                    else no("Failed", Code.AUTHENTICATIONFAILED)))
                case Request(tag, Select(mailbox=m)):
                    write(conn.send(flags(...), exists(n), untagged_ok("", Code.uidvalidity(v)),
                                    ok("Selected", Code.read_write())))
                case Request(tag, Idle()):           # "+ idling" is queued; engine reads DONE
                    subscribe(lambda n: write(conn.send(exists(n))))
                case IdleDone(answered=False):
                    write(conn.send(ok("IDLE terminated")))
                case ConnectionClosed():
                    break
        write(conn.data_to_send())                   # also carries "+" continuations

Public API
----------
- :class:`ImapServerConnection` ``(config, *, tls_active=False)``:
  ``receive_data(bytes)`` (``b""`` = EOF); ``next_event() -> Event | NEED_DATA | PAUSED``
  (never raises for client input); ``send(*responses) -> bytes`` (untagged data any time,
  exactly one :class:`Tagged` to complete an un-answered :class:`Request`; returns every
  byte to write now); ``data_to_send() -> bytes``; ``starttls_done()``; ``capabilities()``;
  properties ``state`` (:class:`State`), ``phase`` (:class:`Phase`), ``closing``,
  ``tls_active``, ``enabled`` (frozenset: IMAP4rev2, UTF8=ACCEPT, CONDSTORE, QRESYNC),
  ``utf8`` (UTF-8 mailbox names/strings in effect), ``imap4rev2``, ``condstore`` (a CONDSTORE
  enabling command was seen, RFC 7162 3.1), ``qresync``, ``current_tag``, ``username`` (after
  a successful LOGIN/AUTHENTICATE).
- Events (:mod:`.events`): :class:`Request` ``(tag, command, answered)``,
  :class:`IdleDone` ``(tag, answered)``, :class:`ProtocolViolation` ``(reason, response,
  closing)``, :class:`ConnectionClosed`; sentinels ``NEED_DATA``, ``PAUSED``.
- Commands (:mod:`.commands`): one frozen dataclass per command with typed arguments
  (``Login``, ``Select``, ``Fetch`` with :class:`FetchAtt`/:class:`FetchBody` items,
  ``Store``, ``Search`` with a tree of ``Search*`` keys, ``List``, ``Append``, ...).
  :func:`parse_command` is the pure parser the engine uses.
- Responses (:mod:`.responses`): :class:`Tagged` via ``ok``/``no``/``bad`` (the engine adds the
  tag), :class:`Untagged` via ``exists``, ``expunge``, ``vanished``, ``fetch``, ``search``,
  ``esearch``, ``list_mailbox``, ``status``, ``flags``, ``capability``, ``enabled``,
  ``namespace``, ``id_response``, ``quota``, ``quotaroot``, ``untagged_ok``/``no``/``bad``,
  ``bye``; response codes :class:`Code`; the value model (``None``, ``int``, ``str``/``bytes``
  auto quoted/literal, :class:`Atom`, :class:`AString`, :class:`Literal`, :class:`Mailbox`,
  :class:`Raw` for pre-rendered ENVELOPE/BODYSTRUCTURE, tuples); ``format_datetime``.
- Helpers: :class:`SequenceSet` (``resolve``/``contains``/``iter`` with ``*``), ``compact``
  (``"1:3,7"``), ``encode_mutf7``/``decode_mutf7``.

Who answers what
----------------
The engine answers on its own (``Request.answered`` True): CAPABILITY, LOGOUT, STARTTLS,
ENABLE, ID, SETQUOTA (``NO [CANNOT]``); every syntax error, unknown command and command in the
wrong state (tagged ``BAD``, no state change); LOGIN/AUTHENTICATE without TLS when plaintext
auth is off (``NO [PRIVACYREQUIRED]``); an unsupported SEARCH charset (``NO [BADCHARSET]``);
the AUTHENTICATE continuation exchange (``+``, base64 lines, ``*`` → ``BAD``); IDLE's ``+
idling`` and a non-DONE line during IDLE (``BAD``); literal continuations (``+ Ready``) and
over-limit literals. Everything else is a :class:`Request` the app completes with one
:class:`Tagged`. A successful LOGIN/AUTHENTICATE completed with a plain ``ok()`` gets
``[CAPABILITY ...]`` added by the engine.

Literals: a synchronising literal ``{n}`` within the limit makes the engine queue ``+ Ready
for literal data`` (in ``data_to_send()``) and read ``n`` octets; over the limit (or for a
command that is invalid in the current state, or a LOGIN refused for lack of TLS) it answers
at once (``NO [TOOBIG]`` / ``BAD`` / ``NO [PRIVACYREQUIRED]``) without ``+``; if the client
already sent octets after the marker (it did not wait for ``+``), ``* BYE`` follows and the
session closes, since the literal's content must not be read as commands.
A non-synchronising literal ``{n+}`` over the limit: the octets come anyway and might hold
anything, so the engine answers ``BAD [TOOBIG]``, sends ``* BYE`` and closes — it never reads
them as commands. The app receives whole commands only (APPEND's message is ``bytes``).
"""

from .commands import (
    Append,
    Authenticate,
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
from .events import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    Event,
    IdleDone,
    ImapParseError,
    ImapUsageError,
    ProtocolViolation,
    Request,
    Sentinel,
)
from .mutf7 import decode_mutf7, encode_mutf7
from .parser import ParseContext, parse_command
from .responses import (
    AString,
    Atom,
    Code,
    Continuation,
    Literal,
    Mailbox,
    Raw,
    Response,
    ResponseStatus,
    Tagged,
    Untagged,
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
from .seqset import SequenceSet, compact
from .server import ImapLimits, ImapServerConfig, ImapServerConnection, Phase, State

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "AString",
    "Append",
    "Atom",
    "Authenticate",
    "Capability",
    "Check",
    "Close",
    "Code",
    "Command",
    "ConnectionClosed",
    "Continuation",
    "Copy",
    "Create",
    "Delete",
    "Enable",
    "Event",
    "Expunge",
    "Fetch",
    "FetchAtt",
    "FetchBody",
    "FetchItem",
    "GetQuota",
    "GetQuotaRoot",
    "Id",
    "Idle",
    "IdleDone",
    "ImapLimits",
    "ImapParseError",
    "ImapServerConfig",
    "ImapServerConnection",
    "ImapUsageError",
    "List",
    "Literal",
    "Login",
    "Logout",
    "Lsub",
    "Mailbox",
    "Move",
    "Namespace",
    "Noop",
    "ParseContext",
    "Phase",
    "ProtocolViolation",
    "QresyncParams",
    "Raw",
    "Rename",
    "Request",
    "Response",
    "ResponseStatus",
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
    "Sentinel",
    "SequenceSet",
    "SetQuota",
    "StartTls",
    "State",
    "Status",
    "Store",
    "StoreMode",
    "Subscribe",
    "Tagged",
    "Unselect",
    "Unsubscribe",
    "Untagged",
    "bad",
    "bye",
    "capability",
    "compact",
    "decode_mutf7",
    "enabled",
    "encode_mutf7",
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
    "parse_command",
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
