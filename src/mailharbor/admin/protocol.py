"""The admin protocol: JSON lines between the ``mailharbor`` CLI and a running node.

Pure: no I/O, no asyncio, no store. :mod:`mailharbor.admin.server` and
:mod:`mailharbor.admin.client` are the adapters.

Wire format (version :data:`PROTOCOL_VERSION`)
----------------------------------------------
One JSON object per line (UTF-8, ``\\n``-terminated), on a Unix socket only its owner may open.

- request: ``{"id": 7, "cmd": "account.add", "args": {"address": "a@example.org", ...}}``;
  ``id`` is an integer or a short string chosen by the client and echoed back, ``args`` may be
  omitted when a command takes none, ``"v": 1`` may be given (absent means 1);
- response: ``{"id": 7, "ok": true, "result": ...}`` or ``{"id": 7, "ok": false, "error": "one
  line"}``.

A client may send several requests on one connection; the server answers them in order.

Invariants
----------
- A request line longer than :data:`MAX_REQUEST_BYTES` (newline included) is refused, never read
  into memory whole by the server.
- :func:`decode_request` returns a :class:`Request` only if the command is in :data:`COMMANDS` and
  its arguments match the command's schema exactly (no unknown, no missing required argument,
  every value of the declared type and within the declared bounds). Anything else raises
  :class:`RequestError` whose message is one line fit to send back.
- Error texts are single lines (:func:`one_line`); Python tracebacks never go on the wire.
- Arguments marked ``secret`` (passwords) are never part of :meth:`Request.describe`, the form
  used in logs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType

__all__ = [
    "COMMANDS",
    "MAX_ERROR_CHARS",
    "MAX_REQUEST_BYTES",
    "MAX_RESPONSE_BYTES",
    "PROTOCOL_VERSION",
    "Arg",
    "ArgType",
    "Command",
    "Request",
    "RequestError",
    "Response",
    "ResponseError",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "one_line",
]

#: Version of this wire format; a request with another ``"v"`` is refused.
PROTOCOL_VERSION = 1
#: Longest request line the server accepts, newline included.
MAX_REQUEST_BYTES = 64 * 1024
#: Longest response line the client accepts (account lists of large sites are big).
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
#: Error texts are cut to this many characters.
MAX_ERROR_CHARS = 1000
#: Longest string argument, in characters.
MAX_STRING_CHARS = 4096
#: Most items in a list argument.
MAX_LIST_ITEMS = 1000
#: Longest request id string.
MAX_ID_CHARS = 64


class ArgType(Enum):
    """The JSON type an argument must have."""

    STR = "string"
    INT = "integer"
    BOOL = "boolean"
    STR_LIST = "array of strings"


@dataclass(frozen=True)
class Arg:
    """One argument of a command.

    ``minimum``/``maximum`` bound integers; ``min_items`` bounds lists; a ``secret`` argument is
    never logged; ``required`` arguments must be present.
    """

    name: str
    type: ArgType
    doc: str
    required: bool = True
    secret: bool = False
    minimum: int | None = None
    maximum: int | None = None
    min_items: int = 0


@dataclass(frozen=True)
class Command:
    """An admin command: its name (``area.verb``), arguments and nature.

    ``changes`` is True for commands that write to the store (they are serialized by the server
    and logged); ``slow`` commands get a long client timeout (compaction).
    """

    name: str
    doc: str
    args: tuple[Arg, ...] = ()
    changes: bool = False
    slow: bool = False

    def arg(self, name: str) -> Arg | None:
        """The argument called ``name``, or None."""
        for a in self.args:
            if a.name == name:
                return a
        return None


_U63 = 2**63 - 1

_ADDRESS = Arg("address", ArgType.STR, "account address, local@domain")
_PASSWORD = Arg("password", ArgType.STR, "the new password (hashed by the node)", secret=True)
_QUOTA = Arg(
    "quota_bytes",
    ArgType.INT,
    "quota in bytes, 0 for none",
    required=False,
    minimum=0,
    maximum=_U63,
)
_DOMAIN = Arg("name", ArgType.STR, "domain name")
_SOURCE = Arg("source", ArgType.STR, "alias address, or @domain for a catch-all")
_QUEUE_ID = Arg("id", ArgType.STR, "queue entry id (hex, a unique prefix is enough)")


def _table(*commands: Command) -> Mapping[str, Command]:
    return MappingProxyType({c.name: c for c in commands})


#: Every command the admin socket takes, by name.
COMMANDS: Mapping[str, Command] = _table(
    Command("status", "node name, state, store figures and the recovery report"),
    Command("domain.add", "add a local domain", (_DOMAIN,), changes=True),
    Command("domain.list", "list local domains with their account and alias counts"),
    Command("domain.remove", "remove a domain that has no accounts or aliases", (_DOMAIN,), True),
    Command("account.add", "create an account", (_ADDRESS, _PASSWORD, _QUOTA), changes=True),
    Command("account.list", "list accounts with quota and usage"),
    Command("account.passwd", "set an account's password", (_ADDRESS, _PASSWORD), changes=True),
    Command("account.remove", "delete an account and its mailboxes", (_ADDRESS,), changes=True),
    Command(
        "account.quota",
        "set an account's quota",
        (
            _ADDRESS,
            Arg("quota_bytes", ArgType.INT, "quota in bytes, 0 for none", minimum=0, maximum=_U63),
        ),
        changes=True,
    ),
    Command(
        "alias.add",
        "create an alias or add targets to it",
        (_SOURCE, Arg("targets", ArgType.STR_LIST, "target addresses", min_items=1)),
        changes=True,
    ),
    Command("alias.list", "list aliases"),
    Command("alias.remove", "remove an alias", (_SOURCE,), changes=True),
    Command("store.stats", "store figures"),
    Command("store.compact", "reclaim the space of unreferenced bodies", changes=True, slow=True),
    Command("queue.list", "list the outbound queue"),
    Command("queue.show", "show one queue entry", (_QUEUE_ID,)),
    Command("queue.retry", "make a queue entry due now", (_QUEUE_ID,), changes=True),
    Command("queue.delete", "remove a queue entry without a bounce", (_QUEUE_ID,), changes=True),
    Command("queue.flush", "make every queue entry due now", changes=True),
    Command("repl.status", "replication: role, disk, link, LSN lag, resync progress"),
    Command(
        "repl.primary",
        "promote this node (only UpToDate without force)",
        (Arg("force", ArgType.BOOL, "promote an Outdated/Inconsistent node", required=False),),
        changes=True,
        slow=True,
    ),
    Command("repl.secondary", "demote this node (stops its services)", changes=True, slow=True),
    Command("repl.connect", "(re)connect the replication link", changes=True),
    Command("repl.disconnect", "drop the replication link and stay StandAlone", changes=True),
    Command("repl.verify", "compare the log with the peer's (digests)", slow=True),
    Command(
        "repl.resume-io",
        "the peer is fenced or Outdated: writes frozen by fencing continue alone",
        changes=True,
    ),
    Command(
        "repl.invalidate",
        "quarantine this secondary's log and resync it from the peer",
        changes=True,
        slow=True,
    ),
    Command(
        "repl.resolve-split-brain",
        "one-shot split-brain resolution for the next reconnect, then connect",
        (
            Arg(
                "discard_my_data",
                ArgType.BOOL,
                "this node's branch is cut (quarantine) and it catches up",
                required=False,
            ),
            Arg(
                "merge",
                ArgType.BOOL,
                "merge the branches (give it on both nodes)",
                required=False,
            ),
        ),
        changes=True,
    ),
    Command("cluster.status", "cluster: nodes, roles, quorum and lease, links, decisions"),
    Command("cluster.switchover", "planned switchover: this primary demotes, the peer takes over"),
    Command(
        "cluster.standby",
        "put this node in standby (a primary demotes if the peer can take over)",
        (
            Arg("node", ArgType.STR, "this node's name (for the peer's: run it there)"),
            Arg("force", ArgType.BOOL, "demote even if the peer cannot take over", required=False),
        ),
    ),
    Command(
        "cluster.unstandby",
        "clear standby on this node (no automatic failback)",
        (Arg("node", ArgType.STR, "this node's name"),),
    ),
    Command(
        "cluster.fence",
        "fence the peer with the STONITH agent",
        (Arg("node", ArgType.STR, "the peer's name"),),
    ),
)


class RequestError(Exception):
    """A request that cannot be run. ``message`` is one line for the client; ``id`` is the
    request's id when it could be read (else None)."""

    def __init__(self, message: str, id: int | str | None = None) -> None:
        self.message = one_line(message)
        self.id = id
        super().__init__(self.message)


class ResponseError(Exception):
    """A response line that does not follow the protocol (seen by the client)."""


@dataclass(frozen=True)
class Request:
    """A validated request. ``args`` is read-only and matches ``COMMANDS[cmd]``."""

    id: int | str
    cmd: str
    args: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def command(self) -> Command:
        return COMMANDS[self.cmd]

    def describe(self) -> str:
        """``cmd key=value ...`` for logs, without secret arguments."""
        spec = COMMANDS.get(self.cmd)
        parts = [self.cmd]
        for k, v in self.args.items():
            a = spec.arg(k) if spec is not None else None
            shown = "<secret>" if a is None or a.secret else json.dumps(v, ensure_ascii=False)
            parts.append(f"{k}={shown}")
        return " ".join(parts)


@dataclass(frozen=True)
class Response:
    """An answer: ``ok`` with a JSON-serializable ``result``, or not ``ok`` with ``error``."""

    id: int | str | None
    ok: bool
    result: object = None
    error: str = ""

    @classmethod
    def success(cls, id: int | str | None, result: object) -> Response:
        return cls(id, True, result)

    @classmethod
    def failure(cls, id: int | str | None, error: str) -> Response:
        return cls(id, False, None, one_line(error))


def one_line(text: str) -> str:
    """``text`` as a single line of at most :data:`MAX_ERROR_CHARS` characters."""
    line = " ".join(text.split())
    if len(line) > MAX_ERROR_CHARS:
        line = line[: MAX_ERROR_CHARS - 3] + "..."
    return line or "error"


def _check_id(raw: object) -> int | str:
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise RequestError('"id" must be an integer or a string')
    if isinstance(raw, str) and len(raw) > MAX_ID_CHARS:
        raise RequestError(f'"id" is longer than {MAX_ID_CHARS} characters')
    return raw


def _check_value(cmd: str, arg: Arg, value: object) -> object:
    where = f"{cmd}: argument {arg.name!r}"
    if arg.type is ArgType.STR:
        if not isinstance(value, str):
            raise RequestError(f"{where} must be a string")
        if len(value) > MAX_STRING_CHARS or "\0" in value:
            raise RequestError(f"{where} is too long or contains NUL")
        return value
    if arg.type is ArgType.INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f"{where} must be an integer")
        if (arg.minimum is not None and value < arg.minimum) or (
            arg.maximum is not None and value > arg.maximum
        ):
            raise RequestError(f"{where} must be between {arg.minimum} and {arg.maximum}")
        return value
    if arg.type is ArgType.BOOL:
        if not isinstance(value, bool):
            raise RequestError(f"{where} must be true or false")
        return value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequestError(f"{where} must be an array of strings")
    if len(value) < arg.min_items or len(value) > MAX_LIST_ITEMS:
        raise RequestError(f"{where} must have {arg.min_items} to {MAX_LIST_ITEMS} items")
    if any(len(v) > MAX_STRING_CHARS or "\0" in v for v in value):
        raise RequestError(f"{where} has an item that is too long or contains NUL")
    return tuple(value)


def validate_args(cmd: str, args: Mapping[str, object]) -> Mapping[str, object]:
    """Check ``args`` against the schema of command ``cmd``; return a read-only copy (lists as
    tuples). Raises RequestError for an unknown command or bad arguments."""
    spec = COMMANDS.get(cmd)
    if spec is None:
        raise RequestError(f"unknown command {cmd!r} (known: {', '.join(sorted(COMMANDS))})")
    out: dict[str, object] = {}
    for key in args:
        if spec.arg(key) is None:
            known = ", ".join(a.name for a in spec.args) or "none"
            raise RequestError(f"{cmd}: unknown argument {key!r} (known: {known})")
    for a in spec.args:
        if a.name in args:
            out[a.name] = _check_value(cmd, a, args[a.name])
        elif a.required:
            raise RequestError(f"{cmd}: missing argument {a.name!r}")
    return MappingProxyType(out)


def decode_request(line: bytes) -> Request:
    """Parse and validate one request line (trailing newline optional).

    Raises RequestError (with the request id when it could be read) for oversized lines, bad
    UTF-8 or JSON, a wrong shape, an unknown command or bad arguments.
    """
    if len(line) > MAX_REQUEST_BYTES:
        raise RequestError(f"request longer than {MAX_REQUEST_BYTES} bytes")
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise RequestError("request is not a JSON object on one line") from None
    if not isinstance(obj, dict):
        raise RequestError("request is not a JSON object on one line")
    rid = _check_id(obj.get("id", 0))
    try:
        unknown = sorted(set(obj) - {"id", "cmd", "args", "v"})
        if unknown:
            raise RequestError(f"unknown request field {unknown[0]!r}")
        version = obj.get("v", PROTOCOL_VERSION)
        if version != PROTOCOL_VERSION or isinstance(version, bool):
            raise RequestError(
                f"unsupported admin protocol version {version!r} (this node speaks "
                f"{PROTOCOL_VERSION}); are the CLI and the node the same version?"
            )
        cmd = obj.get("cmd")
        if not isinstance(cmd, str):
            raise RequestError('"cmd" must be a string')
        args = obj.get("args", {})
        if not isinstance(args, dict):
            raise RequestError('"args" must be a JSON object')
        return Request(rid, cmd, validate_args(cmd, args))
    except RequestError as e:
        raise RequestError(e.message, rid) from None


def encode_request(request: Request) -> bytes:
    """One request line, newline included."""
    body = {
        "v": PROTOCOL_VERSION,
        "id": request.id,
        "cmd": request.cmd,
        "args": {k: list(v) if isinstance(v, tuple) else v for k, v in request.args.items()},
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def encode_response(response: Response) -> bytes:
    """One response line, newline included. ``result`` must be JSON-serializable (TypeError
    otherwise)."""
    body: dict[str, object] = {"id": response.id, "ok": response.ok}
    if response.ok:
        body["result"] = response.result
    else:
        body["error"] = one_line(response.error)
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def decode_response(line: bytes) -> Response:
    """Parse one response line. Raises ResponseError if it is not a protocol response."""
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ResponseError("the node sent something that is not JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
        raise ResponseError("the node sent a malformed response")
    rid = obj.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, int | str)):
        raise ResponseError("the node sent a malformed response id")
    if obj["ok"]:
        return Response(rid, True, obj.get("result"))
    err = obj.get("error")
    return Response(rid, False, None, one_line(err if isinstance(err, str) else "unknown error"))
