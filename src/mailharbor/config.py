"""mailharbor's configuration: one TOML file read into frozen dataclasses.

Theory of operation
-------------------
- The schema lives in this module and nowhere else: every section is a frozen, keyword-only
  dataclass whose fields are declared with :func:`setting` (kind, documentation, default), and
  :class:`Config` lists the sections as fields declared with :func:`section`. The loader, the
  template that ``mailharbor init`` writes and the error messages are all derived from it.
- Loading is total or it fails: :func:`load_config` either returns a fully resolved
  :class:`Config` (every default filled in, every relative path made absolute against the config
  file's directory) or raises :class:`ConfigError`. An unknown section or key, a value of the
  wrong type, an impossible value and a missing required key are all errors; the message names
  the key path, what was expected and what was found, e.g.
  ``store.cache_bytes: expected a size >= 1048576 (1MiB), got -5``.
- Value syntax: sizes are integers (bytes) or strings with a binary unit (``"256KiB"``,
  ``"64MiB"``, ``"1GiB"``); durations are numbers (seconds) or strings (``"250ms"``, ``"5s"``,
  ``"2m"``, ``"1h"``) and load as float seconds; booleans are TOML booleans, never ``0``/``1``.
- Defaults are raw TOML values parsed by the same code as user values, so a default and the same
  value written in the file always give the same result. A few defaults depend on other settings
  (``admin.socket`` on ``node.data_dir``): those are :class:`Derived` and may only depend on
  sections declared *before* their own.

Adding a section (smtp, imap, replication, cluster, ...)
--------------------------------------------------------
1. Write ``@dataclass(frozen=True, kw_only=True) class FooConfig`` with one :func:`setting` per key,
   each with a docstring-quality ``doc``. Add a ``check(self) -> None`` method for rules that span
   several keys of the section; it raises :class:`ConfigError` naming a key.
2. Add ``foo: FooConfig = section("...")`` to :class:`Config` (order = order in the template).
3. Add its keys to README.md's configuration reference (a test checks every key is mentioned).
New value kinds subclass :class:`Kind`.
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import functools
import ipaddress
import json
import math
import os
import re
import textwrap
import tomllib
import typing
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, TypeVar

__all__ = [
    "AdminConfig",
    "AuthConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "Derived",
    "ImapConfig",
    "Kind",
    "LogConfig",
    "NodeConfig",
    "Pop3Config",
    "QueueConfig",
    "ReplicationConfig",
    "SmtpConfig",
    "StoreConfig",
    "TlsConfig",
    "default_config_text",
    "format_size",
    "load_config",
    "new_node_id",
    "parse_config_text",
    "parse_duration",
    "parse_size",
]

T = TypeVar("T")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

#: Longest path a Unix-domain socket can bind to on Linux (sun_path is 108 bytes with a NUL).
UNIX_SOCKET_PATH_MAX = 107


class ConfigError(Exception):
    """The configuration is unusable.

    ``key`` is the dotted key path (``"store.cache_bytes"``; a section name for a section-level
    problem; ``""`` for the file as a whole), ``problem`` says what is wrong, and ``source`` is the
    file it came from when known. ``str()`` gives one line: ``SOURCE: KEY: PROBLEM``.
    """

    def __init__(self, key: str, problem: str, *, source: str | None = None) -> None:
        self.key = key
        self.problem = problem
        self.source = source
        super().__init__(key, problem, source)

    def __str__(self) -> str:
        parts = [p for p in (self.source, self.key, self.problem) if p]
        return ": ".join(parts)

    def with_source(self, source: str) -> ConfigError:
        """The same error, attributed to ``source`` (a file name) unless it already is."""
        if self.source is not None:
            return self
        return ConfigError(self.key, self.problem, source=source)


class _Invalid(Exception):
    """Raised by :meth:`Kind.parse`; the loader adds the key path and turns it into ConfigError."""


# --------------------------------------------------------------------------------------------
# Value syntax
# --------------------------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "b": 1, "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB}
_SIZE_RE = re.compile(r"\s*(\d+)\s*([A-Za-z]*)\s*")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*")


def parse_size(value: int | str) -> int:
    """Return the number of bytes that ``value`` means.

    An int is a byte count; a string is digits with an optional binary unit, case-insensitive:
    ``"512"``, ``"512B"``, ``"256KiB"``, ``"64MiB"``, ``"1GiB"``, ``"1TiB"``. Decimal units
    (``"64MB"``) are refused rather than guessed. Raises ValueError. Bounds are not checked.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        return value
    m = _SIZE_RE.fullmatch(value)
    if m is None or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (use B, KiB, MiB, GiB or TiB)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def parse_duration(value: int | float | str) -> float:
    """Return the number of seconds that ``value`` means.

    A number is seconds; a string is a decimal number with a unit ``ms``, ``s``, ``m`` or ``h``
    (``"250ms"``, ``"5s"``, ``"1.5m"``). Raises ValueError, also for NaN and infinities.
    Bounds are not checked.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, str):
        m = _DURATION_RE.fullmatch(value)
        if m is None or m.group(2) not in _DURATION_UNITS:
            raise ValueError(f"not a duration: {value!r} (use ms, s, m or h)")
        return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if not math.isfinite(value):
        raise ValueError(f"not a duration: {value!r}")
    return float(value)


def format_size(n: int) -> str:
    """``n`` bytes in the largest binary unit dividing it exactly: ``67108864`` -> ``64MiB``."""
    for unit, factor in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n}B"


def _format_seconds(s: float) -> str:
    if s and s < 1:
        return f"{s * 1000:g}ms"
    return f"{s:g}s"


def _toml_string(s: str) -> str:
    # JSON string syntax is TOML basic-string syntax, except that TOML also forbids raw DEL.
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: object) -> str:
    """Render a raw value as a TOML literal (for the template and for error messages)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_string(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{" + (f" {items} " if items else "") + "}"
    return str(value)


def _shown(value: object) -> str:
    text = _toml_value(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------------------------
# Kinds of values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    """What a kind needs besides the raw value: the directory relative paths start from."""

    base_dir: Path


class Kind(abc.ABC, Generic[T]):
    """How one kind of value is read: raw TOML value in, typed value out.

    ``parse`` raises ``_Invalid`` with a message of the form ``expected ..., got ...``; the loader
    prefixes the key path. ``describe_default`` renders a raw default for humans.
    """

    @abc.abstractmethod
    def parse(self, raw: object, ctx: _Context) -> T: ...

    def describe_default(self, raw: object) -> str:
        return _toml_value(raw)

    @staticmethod
    def bad(expected: str, raw: object) -> _Invalid:
        return _Invalid(f"expected {expected}, got {_shown(raw)}")


def _bounds_text(minimum: float | None, maximum: float | None, fmt: Callable[[Any], str]) -> str:
    if minimum is not None and maximum is not None:
        return f"between {fmt(minimum)} and {fmt(maximum)}"
    if minimum is not None:
        return f">= {fmt(minimum)}"
    if maximum is not None:
        return f"<= {fmt(maximum)}"
    return ""


class Bool(Kind[bool]):
    """A TOML boolean (``true``/``false``)."""

    def parse(self, raw: object, ctx: _Context) -> bool:
        if not isinstance(raw, bool):
            raise self.bad("a boolean (true or false)", raw)
        return raw


@dataclass(frozen=True)
class Int(Kind[int]):
    """An integer within [minimum, maximum]."""

    minimum: int | None = None
    maximum: int | None = None

    def parse(self, raw: object, ctx: _Context) -> int:
        bounds = _bounds_text(self.minimum, self.maximum, str)
        expected = f"an integer {bounds}".rstrip()
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise self.bad(expected, raw)
        if (self.minimum is not None and raw < self.minimum) or (
            self.maximum is not None and raw > self.maximum
        ):
            raise self.bad(expected, raw)
        return raw


@dataclass(frozen=True)
class Size(Kind[int]):
    """A byte count: an integer or a string with a binary unit (``"64MiB"``)."""

    minimum: int | None = None
    maximum: int | None = None

    def parse(self, raw: object, ctx: _Context) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise self.bad('a size (an integer number of bytes or a string like "64MiB")', raw)
        try:
            n = parse_size(raw)
        except ValueError:
            expected = 'a size like "512KiB" or "64MiB" (units B, KiB, MiB, GiB, TiB)'
            raise self.bad(expected, raw) from None
        if (self.minimum is not None and n < self.minimum) or (
            self.maximum is not None and n > self.maximum
        ):
            fmt: Callable[[int], str] = lambda v: f"{v} ({format_size(v)})"  # noqa: E731
            raise self.bad(f"a size {_bounds_text(self.minimum, self.maximum, fmt)}", raw)
        return n

    def describe_default(self, raw: object) -> str:
        return _toml_value(raw)


@dataclass(frozen=True)
class Duration(Kind[float]):
    """Seconds: a number, or a string with a unit (``"250ms"``, ``"5s"``, ``"2m"``, ``"1h"``)."""

    minimum: float | None = None
    maximum: float | None = None

    def parse(self, raw: object, ctx: _Context) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise self.bad('a duration (seconds, or a string like "250ms" or "5s")', raw)
        try:
            s = parse_duration(raw)
        except ValueError:
            raise self.bad('a duration like "250ms", "5s", "2m" or "1h"', raw) from None
        if (self.minimum is not None and s < self.minimum) or (
            self.maximum is not None and s > self.maximum
        ):
            bounds = _bounds_text(self.minimum, self.maximum, _format_seconds)
            raise self.bad(f"a duration {bounds}", raw)
        return s

    def describe_default(self, raw: object) -> str:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return f"{raw} (seconds)"
        return _toml_value(raw)


@dataclass(frozen=True)
class Pattern(Kind[str]):
    """A string matching ``regex`` in full; ``what`` describes it in errors."""

    regex: str
    what: str
    max_length: int | None = None

    def parse(self, raw: object, ctx: _Context) -> str:
        if (
            not isinstance(raw, str)
            or re.fullmatch(self.regex, raw) is None
            or (self.max_length is not None and len(raw) > self.max_length)
        ):
            raise self.bad(self.what, raw)
        return raw


@dataclass(frozen=True)
class Choice(Kind[str]):
    """One of a fixed set of strings."""

    choices: tuple[str, ...]

    def parse(self, raw: object, ctx: _Context) -> str:
        if not isinstance(raw, str) or raw not in self.choices:
            raise self.bad("one of " + ", ".join(_toml_string(c) for c in self.choices), raw)
        return raw


class PathKind(Kind[Path]):
    """A file system path; a relative one is relative to the config file's directory."""

    def parse(self, raw: object, ctx: _Context) -> Path:
        if not isinstance(raw, str) or not raw or "\0" in raw:
            raise self.bad("a path (a non-empty string)", raw)
        return ctx.base_dir / Path(raw).expanduser()


class PathOrStderr(Kind[Path | None]):
    """Like :class:`PathKind`, or ``"-"`` for standard error (loads as None)."""

    def parse(self, raw: object, ctx: _Context) -> Path | None:
        if raw == "-":
            return None
        if not isinstance(raw, str) or not raw or "\0" in raw:
            raise self.bad('a path, or "-" for standard error', raw)
        return ctx.base_dir / Path(raw).expanduser()


class Guid(Kind[bytes]):
    """A 16-byte GUID written as 32 hexadecimal digits."""

    def parse(self, raw: object, ctx: _Context) -> bytes:
        if not isinstance(raw, str) or re.fullmatch(r"[0-9a-fA-F]{32}", raw) is None:
            raise self.bad("32 hexadecimal digits (a 16-byte GUID)", raw)
        return bytes.fromhex(raw)


@dataclass(frozen=True)
class ListOf(Kind[tuple[T, ...]]):
    """A TOML array whose items are all of ``item`` kind; loads as a tuple."""

    item: Kind[T]
    min_items: int = 0

    def parse(self, raw: object, ctx: _Context) -> tuple[T, ...]:
        if not isinstance(raw, list) or len(raw) < self.min_items:
            least = f" of at least {self.min_items} item(s)" if self.min_items else ""
            raise self.bad(f"an array{least}", raw)
        out: list[T] = []
        for i, v in enumerate(raw):
            try:
                out.append(self.item.parse(v, ctx))
            except _Invalid as e:
                raise _Invalid(f"item {i}: {e}") from None
        return tuple(out)


_LABEL_RE = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_LABEL_RE = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
NODE_NAME = Pattern(
    _LABEL_RE, "a DNS label (1-63 lowercase letters, digits and '-', not at either end)"
)
HOSTNAME = Pattern(
    rf"{_HOST_LABEL_RE}(?:\.{_HOST_LABEL_RE})*",
    "a host name (dot-separated labels of letters, digits and '-')",
    max_length=253,
)


def validate_node_name(name: str) -> str:
    """Return ``name`` if it is a valid ``node.name``, else raise ValueError saying why."""
    try:
        return NODE_NAME.parse(name, _Context(Path(".")))
    except _Invalid as e:
        raise ValueError(str(e)) from None


def validate_hostname(hostname: str) -> str:
    """Return ``hostname`` if it is a valid ``node.hostname``, else raise ValueError saying why."""
    try:
        return HOSTNAME.parse(hostname, _Context(Path(".")))
    except _Invalid as e:
        raise ValueError(str(e)) from None


# --------------------------------------------------------------------------------------------
# Schema declarations
# --------------------------------------------------------------------------------------------


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class DeriveContext:
    """Given to a :class:`Derived` default: the base directory and the sections loaded so far."""

    base_dir: Path
    sections: Mapping[str, Any]


@dataclass(frozen=True)
class Derived:
    """A default computed from other settings.

    ``doc`` describes it (template, README); ``compute`` returns the final typed value;
    ``example`` returns a raw value written, commented out, in the template (for the template
    ``mailharbor init`` writes it must equal what ``compute`` gives).
    """

    doc: str
    compute: Callable[[DeriveContext], Any]
    example: Callable[[], object]


@dataclass(frozen=True)
class Setting:
    """The schema of one key: its kind, its documentation and its default (raw or derived)."""

    kind: Kind[Any]
    doc: str
    default: object = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def setting(kind: Kind[T], doc: str, default: object = REQUIRED) -> Any:
    """Declare a key of a section dataclass (see the module docstring)."""
    return dataclasses.field(metadata={"setting": Setting(kind, doc, default)})


def section(doc: str) -> Any:
    """Declare a section field of :class:`Config`."""
    return dataclasses.field(metadata={"section": doc})


def _settings(cls: type) -> list[tuple[str, Setting]]:
    return [(f.name, f.metadata["setting"]) for f in dataclasses.fields(cls)]


# --------------------------------------------------------------------------------------------
# The sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """``[node]``: who this node is and where it keeps its data.

    - ``name``: short node name, a DNS label; appears in logs, replies and the cluster view.
    - ``node_id``: 16-byte GUID (32 hex digits), generated by ``mailharbor init``; written into
      every log record as the writer. Never change it once the node has data.
    - ``hostname``: the mail host name (SMTP greeting, HELO, Received headers, certificate).
    - ``data_dir``: the store's directory (one writer at a time); relative to the config file.
    """

    name: str = setting(
        NODE_NAME,
        "Short name of this node: a DNS label (lowercase letters, digits, '-'). "
        "It appears in logs, in SMTP replies and in the cluster view; "
        "the two nodes of a pair need different names.",
    )
    node_id: bytes = setting(
        Guid(),
        "This node's identity: a 16-byte GUID as 32 hex digits, generated by `mailharbor "
        "init`. Every log record names the node that wrote it. Never change it once the "
        "node has data.",
    )
    hostname: str = setting(
        HOSTNAME,
        "The mail host name: used in the SMTP greeting, in HELO/EHLO when sending and in "
        "Received headers. The self-signed certificate made by `mailharbor init` is for it.",
    )
    data_dir: Path = setting(
        PathKind(),
        "Directory of the store (log segments, checkpoints, lock). Relative paths are "
        "relative to this file's directory. Only one process may use it at a time.",
        "data",
    )

    @property
    def node_id_hex(self) -> str:
        """``node_id`` as 32 lowercase hex digits, as written in the file."""
        return self.node_id.hex()


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """``[store]``: the log-structured store.

    - ``segment_bytes``: size at which a log segment file is closed and a new one started.
    - ``cache_bytes``: memory for cached message data.
    - ``checkpoint_every_bytes``: log written between index checkpoints (bounds replay time).
    - ``chunk_bytes``: bodies larger than this are written as several chunk records.
    - ``sync``: fsync before acknowledging. ``False`` voids the durability promise ("acknowledged
      means durable"); only for tests that do not depend on durability.
    """

    segment_bytes: int = setting(
        Size(minimum=MiB, maximum=4 * GiB),
        "Size at which a log segment file is closed and a new one begun. Larger segments mean "
        "fewer files; smaller ones let compaction reclaim space sooner.",
        "64MiB",
    )
    cache_bytes: int = setting(
        Size(minimum=MiB),
        "Memory for cached message data (bodies, parsed headers) in front of the log.",
        "64MiB",
    )
    checkpoint_every_bytes: int = setting(
        Size(minimum=MiB),
        "Amount of log written between index checkpoints; bounds the replay work at start-up.",
        "64MiB",
    )
    chunk_bytes: int = setting(
        Size(minimum=4 * KiB, maximum=64 * MiB),
        "Message bodies larger than this are written as several chunk records before the "
        "transaction's commit. Must be smaller than segment_bytes.",
        "256KiB",
    )
    sync: bool = setting(
        Bool(),
        "fsync the log before acknowledging. Setting this to false VOIDS the durability "
        "promise (an acknowledged message can be lost in a crash); it exists only for tests "
        "that do not depend on durability. Never set it on a server.",
        True,
    )

    def check(self) -> None:
        """Rules across keys: a chunk must fit well inside a segment."""
        if self.chunk_bytes >= self.segment_bytes:
            raise ConfigError(
                "store.chunk_bytes",
                f"must be smaller than store.segment_bytes ({format_size(self.segment_bytes)}),"
                f" got {format_size(self.chunk_bytes)}",
            )


def _default_admin_socket(ctx: DeriveContext) -> Path:
    node: NodeConfig = ctx.sections["node"]
    return node.data_dir / "admin.sock"


@dataclass(frozen=True, kw_only=True)
class AdminConfig:
    """``[admin]``: the local admin socket the CLI talks to.

    - ``socket``: path of the Unix socket (default ``<data_dir>/admin.sock``); at most 107 bytes.
    """

    socket: Path = setting(
        PathKind(),
        "Unix socket on which the running node takes admin commands from the CLI. It must be "
        "at most 107 bytes long (a Linux limit); only its owner may connect.",
        Derived(
            "<data_dir>/admin.sock",
            _default_admin_socket,
            lambda: "data/admin.sock",
        ),
    )

    def check(self) -> None:
        """The socket path must fit in sun_path."""
        n = len(os.fsencode(self.socket))
        if n > UNIX_SOCKET_PATH_MAX:
            raise ConfigError(
                "admin.socket",
                f"path is {n} bytes long, the limit for a Unix socket is "
                f"{UNIX_SOCKET_PATH_MAX}: set a shorter admin.socket ({self.socket})",
            )


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    """``[tls]``: the service certificate all mail listeners present.

    - ``cert``: PEM certificate chain; ``key``: PEM private key (mode 0600).
    """

    cert: Path = setting(
        PathKind(),
        "PEM file with the service certificate (and chain) presented by every listener. "
        "Both nodes of a pair present the same one.",
        "tls/cert.pem",
    )
    key: Path = setting(
        PathKind(),
        "PEM file with the certificate's private key; keep it mode 0600.",
        "tls/key.pem",
    )


def _default_auth_checks() -> int:
    return 2 * (os.cpu_count() or 1)


@dataclass(frozen=True, kw_only=True)
class AuthConfig:
    """``[auth]``: password checking.

    - ``max_concurrent_checks``: password hashes computed at once (default 2 x CPU count);
      further attempts wait, so a login flood cannot exhaust the CPU or memory.
    - ``cache_seconds``: how long a successful check is remembered.
    """

    max_concurrent_checks: int = setting(
        Int(minimum=1, maximum=1024),
        "Password hashes (Argon2) computed at the same time; further login attempts wait. "
        "Bounds the CPU and memory a login flood can take.",
        Derived(
            "2 x CPU count",
            lambda ctx: _default_auth_checks(),
            _default_auth_checks,
        ),
    )
    cache_seconds: float = setting(
        Duration(minimum=0, maximum=86400),
        "How long a successful password check is remembered, so that clients that log in "
        "often do not pay for a hash each time. 0 turns the cache off.",
        60,
    )


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    """``[log]``: logging.

    - ``level``: daemon log level (debug, info, warning, error); the daemon log goes to stderr.
    - ``mail_log``: file for the mail log, one line per delivery/attempt; ``None`` = stderr.
    """

    level: str = setting(
        Choice(("debug", "info", "warning", "error")),
        "Level of the daemon log, which goes to standard error.",
        "info",
    )
    mail_log: Path | None = setting(
        PathOrStderr(),
        'The mail log: one line per delivery, rejection and attempt. "-" writes it to '
        "standard error with the daemon log.",
        "mail.log",
    )


_HOSTPORT_RE = (
    r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)(?::\d{1,5})?"
)
HOSTPORT = Pattern(_HOSTPORT_RE, 'a "host:port" (or "host", or "[ipv6]:port")', max_length=261)
_EMPTY_OR_HOSTPORT = Pattern(
    f"(?:{_HOSTPORT_RE})?", 'a "host:port", or "" for none', max_length=261
)


class HostPortTable(Kind[Mapping[str, str]]):
    """A TOML table of mail domain → ``"host:port"``; loads as a read-only mapping with
    lower-cased domains."""

    def parse(self, raw: object, ctx: _Context) -> Mapping[str, str]:
        if not isinstance(raw, dict):
            raise self.bad('a table like { "example.com" = "relay.example.net:25" }', raw)
        out: dict[str, str] = {}
        for k, v in raw.items():
            try:
                dom = HOSTNAME.parse(k, ctx).lower()
                out[dom] = HOSTPORT.parse(v, ctx)
            except _Invalid as e:
                raise _Invalid(f"entry {k!r}: {e}") from None
        return MappingProxyType(out)


@dataclass(frozen=True, kw_only=True)
class QueueConfig:
    """``[queue]``: the outbound queue runner (see ``mailharbor.service.queue``).

    Retry schedule as Postfix's: first retry after ``minimal_backoff``, doubling up to
    ``maximal_backoff``; after ``maximal_lifetime`` in the queue a message is returned (bounce).
    """

    relayhost: str = setting(
        _EMPTY_OR_HOSTPORT,
        'Send all outbound mail through this smarthost ("host:port") instead of looking up '
        'MX records; "" (the default) delivers directly to each domain\'s MX hosts.',
        "",
    )
    relay_user: str = setting(
        Pattern(r"[^\x00-\x1f]*", "a user name", max_length=255),
        'User name for SMTP AUTH at the relayhost and transport-map hosts; "" for no AUTH.',
        "",
    )
    relay_password: str = setting(
        Pattern(r"[^\x00-\x1f]*", "a password", max_length=255),
        "Password for SMTP AUTH (used only together with relay_user, and only after STARTTLS).",
        "",
    )
    transport: Mapping[str, str] = setting(
        HostPortTable(),
        'Per-domain routes that bypass MX lookup, e.g. { "example.com" = "10.0.0.5:25" }. '
        "They take precedence over relayhost.",
        {},
    )
    resolver: str = setting(
        _EMPTY_OR_HOSTPORT,
        'DNS server for MX/A/AAAA lookups ("ip:port"); "" uses the system resolver '
        "(/etc/resolv.conf).",
        "",
    )
    dns_timeout: float = setting(
        Duration(minimum=0.1, maximum=120), "Time limit for one DNS lookup.", "10s"
    )
    mx_port: int = setting(
        Int(minimum=1, maximum=65535),
        "TCP port used for MX hosts (and the implicit MX). Only tests change it.",
        25,
    )
    starttls: str = setting(
        Choice(("may", "require", "none")),
        'STARTTLS when sending: "may" uses it when offered (opportunistic, certificates not '
        'verified, as Postfix\'s "may"), "require" defers mail to servers without it, '
        '"none" never uses it.',
        "may",
    )
    max_concurrent: int = setting(
        Int(minimum=1, maximum=10000), "Delivery attempts (connections) in flight at once.", 20
    )
    max_per_domain: int = setting(
        Int(minimum=1, maximum=1000),
        "Delivery attempts in flight at once to one destination domain.",
        5,
    )
    minimal_backoff: float = setting(
        Duration(minimum=0.001, maximum=86400),
        "Delay before the first retry of a deferred message; it doubles with every attempt.",
        "300s",
    )
    maximal_backoff: float = setting(
        Duration(minimum=0.001, maximum=86400 * 7),
        "Longest delay between two delivery attempts.",
        "4000s",
    )
    maximal_lifetime: float = setting(
        Duration(minimum=0, maximum=86400 * 365),
        "How long a message may stay in the queue before it is returned to its sender as "
        "undeliverable (EXPIRED).",
        "120h",
    )
    delay_warning: float = setting(
        Duration(minimum=0, maximum=86400 * 365),
        "After this long in the queue, the sender gets one 'delayed' report (RFC 3464) for the "
        'recipients still deferred, unless their NOTIFY excludes DELAY; "0s" turns it off '
        "(Postfix: delay_warning_time, off by default; sendmail: 4h).",
        "4h",
    )
    connect_timeout: float = setting(
        Duration(minimum=0.1, maximum=3600), "Time limit for connecting to a server.", "30s"
    )
    command_timeout: float = setting(
        Duration(minimum=0.1, maximum=3600),
        "Time limit for one SMTP reply (the reply to the final '.' included).",
        "300s",
    )
    stop_grace: float = setting(
        Duration(minimum=0, maximum=3600),
        "At stop, how long attempts in flight may finish before they are abandoned (an "
        "abandoned attempt stays queued and is retried: delivery is at-least-once).",
        "10s",
    )

    def check(self) -> None:
        """The backoff bounds must be ordered."""
        if self.maximal_backoff < self.minimal_backoff:
            raise ConfigError("queue.maximal_backoff", "must be at least queue.minimal_backoff")
        if self.relay_password and not self.relay_user:
            raise ConfigError("queue.relay_password", "is set but queue.relay_user is not")


class ListenAddress(Kind[str]):
    """A listen endpoint: ``"host:port"`` / ``"[ipv6]:port"`` (TCP), or, when ``unix`` is
    allowed, a path containing ``/`` (a Unix socket; relative to the config file's directory)."""

    def __init__(self, *, unix: bool = False) -> None:
        self.unix = unix

    def parse(self, raw: object, ctx: _Context) -> str:
        expected = '"host:port" or "[ipv6]:port"' + (", or a socket path" if self.unix else "")
        if not isinstance(raw, str) or not raw or "\0" in raw:
            raise self.bad(expected, raw)
        if "/" in raw and not raw.startswith("["):
            if not self.unix:
                raise self.bad(expected, raw)
            path = ctx.base_dir / Path(raw).expanduser()
            if len(os.fsencode(path)) > UNIX_SOCKET_PATH_MAX:
                raise self.bad(f"a socket path of at most {UNIX_SOCKET_PATH_MAX} bytes", raw)
            return os.fspath(path)
        m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.:-]*[A-Za-z0-9.-]|):(\d{1,5})", raw)
        if m is None or not 0 < int(m.group(2)) <= 65535:
            raise self.bad(expected, raw)
        return raw


_NETWORK_RE = r"[0-9A-Fa-f:.]+(?:/\d{1,3})?"


@dataclass(frozen=True, kw_only=True)
class SmtpConfig:
    """``[smtp]``: the SMTP (MX), submission, implicit-TLS submission and LMTP listeners.

    Every listen list is empty by default (the listener is off) so that a node never grabs a
    privileged port it was not told to; production configs list e.g. ``["0.0.0.0:25",
    "[::]:25"]`` for ``mx``, ``:587`` for ``submission``, ``:465`` for ``submissions``.
    """

    mx: tuple[str, ...] = setting(
        ListOf(ListenAddress()),
        "Addresses of the MX listener (port 25: mail from other servers, no AUTH, relaying "
        'refused), e.g. ["0.0.0.0:25", "[::]:25"]. Empty: off.',
        [],
    )
    submission: tuple[str, ...] = setting(
        ListOf(ListenAddress()),
        "Addresses of the submission listener (port 587: STARTTLS required before AUTH, AUTH "
        "required before MAIL). Empty: off.",
        [],
    )
    submissions: tuple[str, ...] = setting(
        ListOf(ListenAddress()),
        "Addresses of the implicit-TLS submission listener (port 465). Empty: off.",
        [],
    )
    lmtp: tuple[str, ...] = setting(
        ListOf(ListenAddress(unix=True)),
        'LMTP listeners: a Unix socket path (e.g. "lmtp.sock", relative to this file) or '
        '"host:port". LMTP has no AUTH and no TLS: bind it only where trusted MTAs reach it.',
        [],
    )
    max_message_size: int = setting(
        Size(minimum=1024, maximum=2 * GiB),
        "Largest message accepted (advertised as SIZE); up to stream_threshold a message is "
        "held in memory while it is received.",
        "50MiB",
    )
    max_recipients: int = setting(
        Int(minimum=1, maximum=100000), "Recipients accepted per transaction.", 100
    )
    command_timeout: float = setting(
        Duration(minimum=0.1, maximum=3600),
        "Time a client has to send its next command line.",
        "5m",
    )
    data_timeout: float = setting(
        Duration(minimum=0.1, maximum=7200),
        "Time a client has to send the next block of message data (DATA or BDAT).",
        "10m",
    )
    max_connections: int = setting(
        Int(minimum=1, maximum=1000000),
        "Sessions open at once over all SMTP/LMTP listeners; more get 421 4.7.0.",
        1000,
    )
    max_connections_per_client: int = setting(
        Int(minimum=1, maximum=1000000),
        "Sessions open at once from one client address (IPv6: per /64); more get 421 4.7.0.",
        20,
    )
    trusted_proxies: tuple[str, ...] = setting(
        ListOf(Pattern(_NETWORK_RE, "an IP address or network (CIDR)")),
        "Addresses (or networks) allowed to send a PROXY protocol v2 header; a connection "
        "from them must start with one, and the client address it names is used for limits "
        "and Received. Others may not send one.",
        [],
    )
    postmaster: str = setting(
        Pattern(r"(?:[^@\s]+@[^@\s]+)?", 'an address, or ""', max_length=254),
        "Where postmaster@<each local domain> goes when no account or alias of that name "
        'exists; "" sends it to the oldest account.',
        "",
    )
    stop_grace: float = setting(
        Duration(minimum=0, maximum=3600),
        "At stop, how long a message being received (DATA/BDAT) may take to finish; idle "
        "sessions get 421 4.3.2 at once.",
        "30s",
    )
    stream_threshold: int = setting(
        Size(minimum=64 * 1024, maximum=2 * GiB),
        "A message larger than this is streamed into the store while it arrives instead of "
        "being held in memory (not when a message filter is configured: filters see the whole "
        "message). Streamed messages get their MIME metadata parsed on first IMAP access.",
        "1MiB",
    )
    reverse_dns: bool = setting(
        Bool(),
        "Look up the client's name (PTR, confirmed by its A/AAAA records, as Postfix does) for "
        "the Received: header; started at connect, never waited for longer than rdns_timeout. "
        "Off: the name is 'unknown'.",
        True,
    )
    rdns_resolver: str = setting(
        _EMPTY_OR_HOSTPORT,
        'DNS server for the reverse lookups ("ip:port"); "" uses the system resolver '
        "(/etc/resolv.conf).",
        "",
    )
    rdns_timeout: float = setting(
        Duration(minimum=0.05, maximum=60),
        "Time limit for the reverse lookup (PTR plus the confirming A/AAAA); after it the "
        "name is 'unknown'.",
        "2s",
    )


@dataclass(frozen=True, kw_only=True)
class ImapConfig:
    """``[imap]``: the IMAP listeners (143 with STARTTLS, 993 implicit TLS).

    Listen lists are empty by default (off), as in ``[smtp]``.
    """

    listen: tuple[str, ...] = setting(
        ListOf(ListenAddress()),
        "Addresses of the IMAP listener (port 143: STARTTLS offered; LOGIN and AUTHENTICATE "
        "refused before TLS unless allow_plaintext_auth). Empty: off.",
        [],
    )
    listen_tls: tuple[str, ...] = setting(
        ListOf(ListenAddress()),
        "Addresses of the implicit-TLS IMAP listener (port 993). Empty: off.",
        [],
    )
    allow_plaintext_auth: bool = setting(
        Bool(),
        "Allow LOGIN/AUTHENTICATE on a connection without TLS (loopback tests, trusted "
        "networks). Off: LOGINDISABLED is advertised until STARTTLS.",
        False,
    )
    idle_timeout: float = setting(
        Duration(minimum=1, maximum=86400),
        "Time an authenticated client may stay silent (also in IDLE) before * BYE; RFC 9051 "
        "asks for at least 30 minutes.",
        "30m",
    )
    login_timeout: float = setting(
        Duration(minimum=1, maximum=3600),
        "Time a client has to log in after connecting.",
        "60s",
    )
    max_line: int = setting(
        Size(minimum=1024, maximum=16 * MiB),
        "Longest command line (without literals); longer gets BAD and the line is discarded.",
        "64KiB",
    )
    max_literal: int = setting(
        Size(minimum=1024, maximum=2 * GiB),
        "Largest literal (APPEND message); larger gets NO [TOOBIG] (or BAD for LITERAL+).",
        "50MiB",
    )
    max_connections: int = setting(
        Int(minimum=1, maximum=1000000),
        "Sessions open at once over all IMAP listeners; more get * BYE.",
        1000,
    )
    max_connections_per_client: int = setting(
        Int(minimum=1, maximum=1000000),
        "Sessions open at once from one client address (IPv6: per /64).",
        50,
    )
    max_connections_per_account: int = setting(
        Int(minimum=1, maximum=100000),
        "Logged-in sessions at once per account; one more gets NO [LIMIT].",
        20,
    )
    trusted_proxies: tuple[str, ...] = setting(
        ListOf(Pattern(_NETWORK_RE, "an IP address or network (CIDR)")),
        "Addresses (or networks) that must send a PROXY protocol v2 header; as "
        "smtp.trusted_proxies.",
        [],
    )


@dataclass(frozen=True, kw_only=True)
class Pop3Config:
    """``[pop3]``: the POP3 listeners (110 with STLS, 995 implicit TLS). Off by default."""

    listen: tuple[str, ...] = setting(
        ListOf(ListenAddress()),
        "Addresses of the POP3 listener (port 110: STLS offered; USER/PASS and AUTH refused "
        "before TLS unless allow_plaintext_auth). Empty: off.",
        [],
    )
    listen_tls: tuple[str, ...] = setting(
        ListOf(ListenAddress()),
        "Addresses of the implicit-TLS POP3 listener (port 995). Empty: off.",
        [],
    )
    allow_plaintext_auth: bool = setting(
        Bool(),
        "Allow USER/PASS and AUTH on a connection without TLS.",
        False,
    )
    timeout: float = setting(
        Duration(minimum=1, maximum=86400),
        "Inactivity timeout (RFC 1939: at least 10 minutes); then -ERR and close, no UPDATE.",
        "10m",
    )
    max_connections: int = setting(
        Int(minimum=1, maximum=1000000),
        "Sessions open at once over all POP3 listeners; more get -ERR [SYS/TEMP].",
        1000,
    )
    max_connections_per_client: int = setting(
        Int(minimum=1, maximum=1000000),
        "Sessions open at once from one client address (IPv6: per /64).",
        20,
    )
    trusted_proxies: tuple[str, ...] = setting(
        ListOf(Pattern(_NETWORK_RE, "an IP address or network (CIDR)")),
        "Addresses (or networks) that must send a PROXY protocol v2 header; as "
        "smtp.trusted_proxies.",
        [],
    )


_SECRET_RE = r"[\x21-\x7e]{16,256}"


class SecretFile(Kind[Path | None]):
    """A path to a file holding a secret, or ``""`` for none (loads as None)."""

    def parse(self, raw: object, ctx: _Context) -> Path | None:
        if raw == "":
            return None
        if not isinstance(raw, str) or "\0" in raw:
            raise self.bad('a path, or "" for none', raw)
        return ctx.base_dir / Path(raw).expanduser()


@dataclass(frozen=True, kw_only=True)
class ReplicationConfig:
    """``[replication]``: the peer link that replicates the store to the other node.

    Without ``peer`` the node is standalone (exactly as without this section). With a peer, the
    node listens on ``listen`` and connects to ``peer`` (both sides try; one connection is
    kept), authenticates with the shared ``secret`` (or ``secret_file``) and replicates the log
    in ``protocol`` A, B or C (DRBD's meanings; C, the default, acknowledges a client only once
    the peer has fsynced the change). ``role`` is the role at start: ``secondary`` (default) or
    ``primary`` (the first node of a pair, or a single node that will get a peer later).
    ``fencing``: what the primary does when it loses the peer with writes in flight;
    ``split_brain``: how true split brain is resolved. See docs/replication.md.
    """

    peer: str = setting(
        _EMPTY_OR_HOSTPORT,
        'Address of the replication listener of the peer, "host:port". Empty: no replication, '
        "the node is standalone.",
        "",
    )
    listen: str = setting(
        _EMPTY_OR_HOSTPORT,
        'Address the replication listener of this node binds, "host:port" (required with a peer).',
        "",
    )
    secret: str = setting(
        Pattern(f"(?:{_SECRET_RE})?", '16 to 256 printable ASCII characters, or ""'),
        "Shared secret of the pair (the same on both nodes): authenticates the peer and every "
        "replication message (HMAC-SHA256). Prefer secret_file, which keeps it out of this file.",
        "",
    )
    secret_file: Path | None = setting(
        SecretFile(),
        "File holding the shared secret (its first line, 16 to 256 printable characters; keep "
        'it mode 0600). Used when secret is empty. "": none.',
        "",
    )
    protocol: str = setting(
        Choice(("A", "B", "C")),
        "When a write is acknowledged: A after the local fsync; B also after the peer received "
        "it; C (default) also after the peer fsynced it. Both nodes must agree.",
        "C",
    )
    role: str = setting(
        Choice(("secondary", "primary")),
        "Role at start. secondary (default): apply the peer's log, serve no clients. primary: "
        "serve and write from the start (the first node of a pair). A node that was demoted "
        "or whose disk is not UpToDate starts as secondary anyway (no automatic failback).",
        "secondary",
    )
    ack_timeout: float = setting(
        Duration(minimum=0.1, maximum=600),
        "A peer that does not acknowledge replicated frames within this time is dropped "
        "(never waited on forever).",
        "6s",
    )
    ping_interval: float = setting(
        Duration(minimum=0.05, maximum=600),
        "Keep-alive interval on the replication link; after ping_interval + ping_timeout of "
        "silence the link is dropped.",
        "2s",
    )
    ping_timeout: float = setting(
        Duration(minimum=0.05, maximum=600),
        "How long a keep-alive may stay unanswered (see ping_interval).",
        "4s",
    )
    resync_rate: int = setting(
        Size(minimum=0),
        'Limit of the catch-up resync, bytes per second ("10MiB"); 0: no limit.',
        0,
    )
    retain_bytes: int = setting(
        Size(minimum=0),
        "Retention horizon of a primary: keep at least this much of the newest log segments and "
        "drop older ones the connected peer acknowledged (a peer away meanwhile gets a full "
        'sync from a snapshot when it returns); "0": never drop the head of the log.',
        0,
    )
    split_brain: str = setting(
        Choice(
            (
                "merge",
                "discard-younger-primary",
                "discard-least-changes",
                "discard-zero-changes",
                "disconnect",
            )
        ),
        "How true split brain (both nodes acknowledged writes alone) is resolved: merge "
        "(default; the merge replay is not implemented yet, so the link disconnects with a "
        "message), DRBD's discard policies, or disconnect.",
        "merge",
    )
    fencing: str = setting(
        Choice(("dont-care", "resource-only", "resource-and-stonith")),
        "When the primary loses its peer with writes in flight: dont-care (default) continues "
        "alone; resource-only holds writes until the peer is known Outdated (it reconnects); "
        "resource-and-stonith freezes writes until the peer is fenced. Frozen writes fail at "
        "once (SMTP 451 4.3.0, IMAP NO [UNAVAILABLE], POP3 -ERR [SYS/TEMP]; nothing "
        "acknowledged); `mailharbor repl resume-io` resumes them.",
        "dont-care",
    )
    tls: bool = setting(
        Bool(),
        "Encrypt the replication link with TLS, mutually verified with node certificates "
        "(tls_cert, tls_key, tls_ca; both nodes must agree). The shared secret still "
        "authenticates the peer and every message inside TLS.",
        False,
    )
    tls_cert: Path | None = setting(
        SecretFile(),
        "PEM file with this node's certificate (and chain) for the replication link only (not "
        'the service certificate); it must allow client and server use. "": none.',
        "",
    )
    tls_key: Path | None = setting(
        SecretFile(),
        'PEM file with the private key of tls_cert; keep it mode 0600. "": none.',
        "",
    )
    tls_ca: Path | None = setting(
        SecretFile(),
        "PEM file with the CA certificate(s) the peer's node certificate must chain to (checked "
        'both ways: a connecting peer without one is refused). "": none.',
        "",
    )
    tls_peer_name: str = setting(
        Pattern(
            r"(?:[A-Za-z0-9](?:[A-Za-z0-9.:-]{0,251}[A-Za-z0-9])?)?",
            'a DNS name or an IP address, or ""',
        ),
        "Name (DNS name or IP address) the peer's certificate must carry in its "
        'subjectAltName, checked both ways. "": any certificate issued by tls_ca.',
        "",
    )

    @property
    def enabled(self) -> bool:
        """True when a peer is configured (the node replicates)."""
        return bool(self.peer)

    def check(self) -> None:
        """With a peer: a listen address and a secret are required; with TLS, the node
        certificate, its key and the CA."""
        if self.tls:
            for key, value in (
                ("tls_cert", self.tls_cert),
                ("tls_key", self.tls_key),
                ("tls_ca", self.tls_ca),
            ):
                if value is None:
                    raise ConfigError(
                        f"replication.{key}", "is required when replication.tls is true"
                    )
        if not self.peer:
            return
        if not self.listen:
            raise ConfigError("replication.listen", "is required when replication.peer is set")
        if ":" not in self.peer.rsplit("]", 1)[-1] or ":" not in self.listen.rsplit("]", 1)[-1]:
            key = "replication.peer" if ":" not in self.peer else "replication.listen"
            raise ConfigError(key, 'needs a port: "host:port"')
        if not self.secret and self.secret_file is None:
            raise ConfigError(
                "replication.secret",
                "a shared secret is required when replication.peer is set (secret or secret_file)",
            )


class LinkPair(Kind[tuple[str, str]]):
    """A heartbeat link: ``["local host:port", "peer host:port"]`` (UDP)."""

    def parse(self, raw: object, ctx: _Context) -> tuple[str, str]:
        expected = 'a pair ["local host:port", "peer host:port"]'
        if not isinstance(raw, list) or len(raw) != 2:
            raise self.bad(expected, raw)
        out = [HOSTPORT.parse(v, ctx) if isinstance(v, str) else "" for v in raw]
        if not all(":" in v.rsplit("]", 1)[-1] for v in out):
            raise self.bad(expected + " with ports", raw)
        return out[0], out[1]


@dataclass(frozen=True)
class Fraction(Kind[float]):
    """A number in [minimum, maximum)."""

    minimum: float = 0.0
    maximum: float = 1.0

    def parse(self, raw: object, ctx: _Context) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise self.bad(f"a number in [{self.minimum}, {self.maximum})", raw)
        if not self.minimum <= raw < self.maximum:
            raise self.bad(f"a number in [{self.minimum}, {self.maximum})", raw)
        return float(raw)


class _OptionalGuid(Kind[bytes | None]):
    """A 16-byte GUID as 32 hexadecimal digits, or ``""`` for none (loads as None)."""

    def parse(self, raw: object, ctx: _Context) -> bytes | None:
        if raw == "":
            return None
        return Guid().parse(raw, ctx)


#: The ``[cluster]`` timing keys, in cluster.timing.Timing's order.
CLUSTER_TIMING_KEYS = (
    "keepalive",
    "warntime",
    "deadtime",
    "initdead",
    "lease",
    "lease_margin",
    "renew_interval",
    "self_fence_timeout",
    "witness_margin",
    "fence_delay",
    "fence_timeout",
    "fence_retry",
    "clock_drift",
)


def _timing_setting(doc: str, default: str) -> Any:
    return setting(Duration(minimum=0, maximum=3600), doc, default)


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """``[cluster]``: the built-in cluster manager (heartbeats, witness lease, fencing).

    Enabled when ``links`` is not empty; it needs ``[replication]`` with a peer. With
    ``witness`` (the default mode) a node writes only while it holds the witness's vote lease
    or while its peer confirms every write; ``two_node = true`` (no witness) needs a STONITH
    agent. The timings are checked together (cluster.timing.check_timing): a combination that
    could let both nodes act at once is refused, naming the key. See docs/cluster.md.
    """

    links: tuple[tuple[str, str], ...] = setting(
        ListOf(LinkPair()),
        'Heartbeat links, each ["local host:port", "peer host:port"] (UDP); use two or more '
        "(e.g. the LAN and the replication network). Empty: no cluster manager.",
        [],
    )
    name: str = setting(
        Pattern(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", "a name of letters, digits, '.', '_', '-'"),
        "Name of the pair (the same on both nodes and in the witness's [[pair]]).",
        "mailharbor",
    )
    peer_node_id: bytes | None = setting(
        _OptionalGuid(),
        'The peer\'s node.node_id (32 hex digits); required with links. "": none.',
        "",
    )
    peer_name: str = setting(
        Pattern(f"(?:{_LABEL_RE})?", 'a DNS label, or ""'),
        'The peer\'s node.name (status output, fence agents). "": "peer".',
        "",
    )
    secret: str = setting(
        Pattern(f"(?:{_SECRET_RE})?", '16 to 256 printable ASCII characters, or ""'),
        "Shared secret of the pair for heartbeats and the witness (HMAC-SHA256). Empty: the "
        "replication secret (secret or secret_file of [replication]).",
        "",
    )
    secret_file: Path | None = setting(
        SecretFile(),
        'File holding the cluster secret (first line). Used when secret is empty. "": none.',
        "",
    )
    witness: str = setting(
        _EMPTY_OR_HOSTPORT,
        'The witness daemon, "host:port" (UDP; `mailharbor witness`). Required unless '
        "two_node is true.",
        "",
    )
    two_node: bool = setting(
        Bool(),
        "Run without a witness: fencing by STONITH only (stonith must be set), the fence race "
        "settled by fence_delay, and both nodes must have seen each other once at first start.",
        False,
    )
    preferred: bytes | None = setting(
        _OptionalGuid(),
        'Node id favoured when both nodes are secondary and eligible at start. "": the '
        "witness's last holder, else the lower node id.",
        "",
    )
    self_fence: bool = setting(
        Bool(),
        "With a witness: a primary stops acknowledging at its lease's stop point and exits if "
        "its graceful stop has not finished self_fence_timeout later, so the survivor may "
        "promote once the witness re-grants the vote (Pacemaker's SBD idea).",
        True,
    )
    stonith: str = setting(
        Choice(("none", "command", "power-switch")),
        "STONITH agent: none; command (fence_command, DRBD fence-peer exit codes); "
        "power-switch (the test power switch at power_switch: tests and demos only).",
        "none",
    )
    fence_command: str = setting(
        Pattern(r"[^\0]*", "a shell command"),
        "Shell command run to fence the peer (stonith = command); gets MH_FENCE_TARGET, "
        "MH_FENCE_TARGET_ID, MH_CLUSTER, MH_FENCE_REASON and DRBD_PEER/DRBD_PEERS/DRBD_RESOURCE.",
        "",
    )
    power_switch: str = setting(
        _EMPTY_OR_HOSTPORT,
        'Address of the test power switch, "host:port" (TCP; stonith = power-switch).',
        "",
    )
    proxy: tuple[tuple[str, str], ...] = setting(
        ListOf(LinkPair()),
        'Proxy mode: each ["local host:port", "peer host:port"] pairs one of this node\'s mail '
        "listener endpoints (smtp, imap, pop3) with the peer's endpoint for the same service. "
        "While this node is standby it listens on the local endpoints and forwards each "
        "connection to the primary's with a PROXY v2 header naming the client (the peer must "
        "list proxy_source in its trusted_proxies). Empty: the standby listens on nothing.",
        [],
    )
    proxy_source: str = setting(
        Pattern(r"(?:[0-9A-Fa-f:.]+)?", 'an IP address, or ""'),
        "Local address of forwarded connections, the one the peer trusts in smtp/imap/pop3 "
        "trusted_proxies (on one host, e.g. 127.0.0.2, so direct loopback clients are not "
        'taken for the proxy). "": the kernel\'s choice.',
        "",
    )
    proxy_hold: float = setting(
        Duration(minimum=0.0, maximum=60.0),
        "Proxy mode: while no primary is known (a takeover), a new connection is held this "
        "long waiting for one, then refused (421 / * BYE / -ERR); forwarded sessions are "
        "closed once no primary has been known for this long.",
        "3s",
    )
    keepalive: float = _timing_setting(
        "A heartbeat round goes out on every link this often.", "200ms"
    )
    warntime: float = _timing_setting("A link silent this long is late (logged).", "600ms")
    deadtime: float = _timing_setting(
        "A link silent this long is dead; the peer is dead when every link is.", "1500ms"
    )
    initdead: float = _timing_setting(
        "At first start a never-heard link gets this long instead of deadtime.", "30s"
    )
    lease: float = _timing_setting(
        "Witness vote lease, counted by the node from when it sent the request.", "2s"
    )
    lease_margin: float = _timing_setting(
        "The holder stops acknowledging at sent + lease - lease_margin.", "400ms"
    )
    renew_interval: float = _timing_setting("The lease holder renews this often.", "500ms")
    self_fence_timeout: float = _timing_setting(
        "After its stop point the holder has this long to stop, else it exits.", "300ms"
    )
    witness_margin: float = _timing_setting(
        "The witness re-grants the vote only lease + witness_margin after the holder's last "
        "renewal arrived.",
        "500ms",
    )
    fence_delay: float = _timing_setting(
        "Two-node mode: the node not running the resources waits this long before shooting.",
        "2s",
    )
    fence_timeout: float = _timing_setting(
        "A fence agent still running after this is killed and counts as a timeout.", "10s"
    )
    fence_retry: float = _timing_setting("After a failed fence, retry after this long.", "2s")
    clock_drift: float = setting(
        Fraction(0.0, 0.1),
        "Tolerated relative difference between two monotonic clocks' rates (below 0.1).",
        0.01,
    )

    @property
    def enabled(self) -> bool:
        return bool(self.links)

    def timing_values(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in CLUSTER_TIMING_KEYS}

    def check(self) -> None:
        """Links need a peer id, a witness (or two_node with STONITH); timings are checked with
        cluster.timing's relations (over both nodes: the settings hash makes them equal)."""
        from mailharbor.cluster.timing import Timing, TimingError, require_timing

        try:
            require_timing(
                Timing(**self.timing_values()),
                [Timing(**self.timing_values())],
                two_node=self.two_node,
            )
        except TimingError as e:
            p = e.problems[0]
            raise ConfigError(f"cluster.{p.setting}", p.message) from None
        if self.proxy_source:
            try:
                ipaddress.ip_address(self.proxy_source)
            except ValueError:
                raise ConfigError("cluster.proxy_source", "is not an IP address") from None
        if not self.links:
            if self.proxy:
                raise ConfigError("cluster.proxy", "proxy mode needs the cluster (cluster.links)")
            return
        if self.peer_node_id is None:
            raise ConfigError("cluster.peer_node_id", "is required when cluster.links is set")
        if self.two_node:
            if self.witness:
                raise ConfigError("cluster.witness", "must be empty when two_node is true")
            if self.stonith == "none":
                raise ConfigError(
                    "cluster.stonith",
                    "two_node mode needs a STONITH agent (command or power-switch)",
                )
        elif not self.witness or ":" not in self.witness.rsplit("]", 1)[-1]:
            raise ConfigError(
                "cluster.witness", 'is required ("host:port") unless two_node is true'
            )
        if self.stonith == "command" and not self.fence_command.strip():
            raise ConfigError("cluster.fence_command", "is required when stonith = command")
        if self.stonith == "power-switch" and ":" not in self.power_switch:
            raise ConfigError("cluster.power_switch", 'is required ("host:port") with power-switch')
        if not self.two_node and not self.self_fence and self.stonith == "none":
            raise ConfigError(
                "cluster.self_fence",
                "with self_fence = false a STONITH agent is required (no way to fence the peer)",
            )


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole, validated configuration.

    ``path`` is the file it was loaded from (absolute) and ``base_dir`` its directory, which
    relative paths were resolved against. Every other field is a section.
    """

    path: Path
    node: NodeConfig = section("Identity of this node and where it keeps its data.")
    store: StoreConfig = section("The log-structured store.")
    admin: AdminConfig = section("The local admin socket used by the `mailharbor` CLI.")
    tls: TlsConfig = section("The service certificate presented by every listener.")
    auth: AuthConfig = section("Password checks.")
    log: LogConfig = section("Logging.")
    queue: QueueConfig = section("The outbound queue: routing, retries and limits.")
    smtp: SmtpConfig = section("The SMTP, submission and LMTP listeners.")
    imap: ImapConfig = section("The IMAP listeners.")
    pop3: Pop3Config = section("The POP3 listeners.")
    replication: ReplicationConfig = section("Replication of the store to the peer node.")
    cluster: ClusterConfig = section("The cluster manager: heartbeats, witness lease, fencing.")

    @property
    def base_dir(self) -> Path:
        return self.path.parent


@functools.cache
def _sections() -> tuple[tuple[str, str, type], ...]:
    """(name, doc, dataclass) of every section of :class:`Config`, in declaration order."""
    hints = typing.get_type_hints(Config)
    return tuple(
        (f.name, f.metadata["section"], hints[f.name])
        for f in dataclasses.fields(Config)
        if "section" in f.metadata
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _unknown(key_path: str, name: str, known: list[str], what: str) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(known)})"
    return ConfigError(key_path, f"unknown {what}{hint}")


def _parse_section(name: str, cls: type, raw: Mapping[str, object], ctx: DeriveContext) -> object:
    known = [key for key, _ in _settings(cls)]
    for key in raw:
        if key not in known:
            raise _unknown(f"{name}.{key}", key, known, "key")
    kctx = _Context(ctx.base_dir)
    values: dict[str, object] = {}
    for key, spec in _settings(cls):
        path = f"{name}.{key}"
        if key in raw:
            value = raw[key]
        elif spec.required:
            raise ConfigError(path, "required key is missing")
        elif isinstance(spec.default, Derived):
            values[key] = spec.default.compute(ctx)
            continue
        else:
            value = spec.default
        try:
            values[key] = spec.kind.parse(value, kctx)
        except _Invalid as e:
            raise ConfigError(path, str(e)) from None
    instance = cls(**values)
    check = getattr(instance, "check", None)
    if check is not None:
        check()
    return instance


def parse_config_data(data: Mapping[str, object], *, path: Path) -> Config:
    """Build a :class:`Config` from already-parsed TOML data.

    ``path`` is the (possibly not existing) file the data stands for; relative paths are resolved
    against its directory. Raises :class:`ConfigError` (without ``source``).
    """
    path = Path(path).absolute()
    sections = _sections()
    names = [name for name, _, _ in sections]
    for key, value in data.items():
        if key not in names:
            what = "section" if isinstance(value, dict) else "key"
            raise _unknown(key, key, names, what)
    ctx = DeriveContext(base_dir=path.parent, sections={})
    loaded: dict[str, Any] = {}
    for name, _doc, cls in sections:
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            raise ConfigError(name, f"expected a table ([{name}]), got {_shown(raw)}")
        loaded[name] = _parse_section(name, cls, raw, DeriveContext(ctx.base_dir, loaded))
    return Config(path=path, **loaded)


def parse_config_text(text: str, *, path: Path) -> Config:
    """Parse TOML ``text`` as if it were the content of ``path``.

    Raises :class:`ConfigError` whose ``source`` is ``path``.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"invalid TOML: {e}", source=str(path)) from None
    try:
        return parse_config_data(data, path=path)
    except ConfigError as e:
        raise e.with_source(str(path)) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the configuration file at ``path``.

    Returns a fully resolved :class:`Config`. Raises :class:`ConfigError` (naming the file and
    the key) if the file cannot be read, is not valid TOML, or breaks the schema.
    """
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError("", f"cannot read: {e.strerror or e}", source=str(p)) from None
    except UnicodeDecodeError as e:
        raise ConfigError("", f"not UTF-8: {e}", source=str(p)) from None
    return parse_config_text(text, path=p)


# --------------------------------------------------------------------------------------------
# The template written by `mailharbor init`
# --------------------------------------------------------------------------------------------

_HEADER = """\
# mailharbor configuration.
#
# Written by `mailharbor init`. Every key is explained below; a commented-out key
# shows its default, so uncommenting it changes nothing until you edit the value.
# Unknown keys and impossible values are refused at start-up, naming the key.
#
# Sizes: an integer (bytes) or a string with a binary unit: "256KiB", "64MiB", "1GiB".
# Durations: a number (seconds) or a string: "250ms", "5s", "2m", "1h".
# Relative paths are relative to the directory of this file."""


def _comment(text: str, width: int = 78) -> list[str]:
    return ["# " + line for line in textwrap.wrap(text, width - 2)]


def render_template(active: Mapping[str, Mapping[str, object]]) -> str:
    """Render the commented configuration template.

    ``active`` gives raw values for keys that are written uncommented (``{"node": {"name":
    "mx1"}}``); every other key is written commented out with its default. Raises KeyError for a
    section or key the schema does not have (a programming error).
    """
    sections = _sections()
    schema = {name: dict(_settings(cls)) for name, _, cls in sections}
    for sec, keys in active.items():
        for key in keys:
            if key not in schema[sec]:
                raise KeyError(f"{sec}.{key}")
    lines = [_HEADER]
    for name, doc, cls in sections:
        values = active.get(name, {})
        lines.append("")
        lines.extend(_comment(doc))
        lines.append(f"[{name}]")
        for key, spec in _settings(cls):
            lines.append("")
            lines.extend(_comment(spec.doc))
            if isinstance(spec.default, Derived):
                lines.append(f"# Default: {spec.default.doc}.")
                example: object = spec.default.example()
            elif spec.required:
                lines.append("# Required.")
                example = None
            else:
                lines.append(f"# Default: {spec.kind.describe_default(spec.default)}.")
                example = spec.default
            if key in values:
                lines.append(f"{key} = {_toml_value(values[key])}")
            elif example is not None:
                lines.append(f"# {key} = {_toml_value(example)}")
    return "\n".join(lines) + "\n"


def new_node_id() -> bytes:
    """A fresh random 16-byte node GUID."""
    return uuid.uuid4().bytes


def default_config_text(
    *,
    name: str,
    hostname: str,
    node_id: bytes,
    data_dir: str = "data",
    tls_cert: str = "tls/cert.pem",
    tls_key: str = "tls/key.pem",
) -> str:
    """The configuration ``mailharbor init`` writes: node identity, data dir and certificate
    paths set, every other key commented out at its default and explained.

    Loading it with :func:`load_config` from the directory it is written to gives exactly those
    values and the defaults. Raises ValueError if ``node_id`` is not 16 bytes.
    """
    if len(node_id) != 16:
        raise ValueError("node_id must be 16 bytes")
    return render_template(
        {
            "node": {
                "name": name,
                "node_id": node_id.hex(),
                "hostname": hostname,
                "data_dir": data_dir,
            },
            "tls": {"cert": tls_cert, "key": tls_key},
        }
    )


def schema_keys() -> list[str]:
    """Every key path of the schema (``"store.cache_bytes"`` ...), in template order."""
    return [f"{name}.{key}" for name, _, cls in _sections() for key, _ in _settings(cls)]
