"""The administration commands: ``domain``, ``account``, ``alias``, ``store`` and ``status``.

Contract
--------
- Every command takes ``--config FILE`` (default ``$MAILHARBOR_CONFIG``, else
  ``./mailharbor.toml``).
- While a node runs (its admin socket answers), every command — reading or changing — is sent to
  it (DESIGN.md: one writer per data directory). When nothing answers, the command opens the
  store itself, runs the very same handler (:func:`mailharbor.offline.run_offline`) and closes it.
  If the data directory is locked but its socket does not answer (a node starting or stopping,
  another command), the command says so and changes nothing.
- ``store fsck`` needs exclusive access: it refuses while a node runs. ``store compact`` goes
  through the node when one runs.
- Output: human-readable text on stdout; ``--json`` (lists, stats, status, compact, fsck) prints
  one JSON document instead. Errors: one ``mailharbor: error: ...`` line on stderr and exit 1
  (2 for usage errors); never a traceback. ``status`` exits 3 when no node runs; ``store fsck``
  exits 1 when it found damage it did not repair.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mailharbor.cli import CliError

# Everything else of mailharbor is imported where needed, which keeps every CLI call quick: the
# parsers are built without loading the configuration or admin client code (``--help``, ``init``
# and ``serve`` import this module too), and a command served by a running node never loads
# mailharbor.node or the store.

if TYPE_CHECKING:
    from mailharbor.admin.client import AdminClient
    from mailharbor.admin.protocol import Request, Response
    from mailharbor.cli.main import Subparsers
    from mailharbor.config import Config

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG",
    "add_config_argument",
    "load_cli_config",
    "parse_quota",
    "perform",
    "register",
]

#: Environment variable naming the configuration file when ``--config`` is not given.
CONFIG_ENV = "MAILHARBOR_CONFIG"
#: Configuration file used when neither ``--config`` nor ``$MAILHARBOR_CONFIG`` is given.
DEFAULT_CONFIG = "mailharbor.toml"
#: Exit status of ``status`` when no node runs (as LSB init scripts do).
EXIT_NOT_RUNNING = 3
#: How long a command waits for a starting node's socket when the data directory is locked.
LOCKED_RETRY_SECONDS = 3.0
#: Longest password line read by ``--password-stdin``.
MAX_PASSWORD_LINE = 4096
_U63 = 2**63 - 1

Command = Callable[[argparse.Namespace], int]


# --- configuration and dispatch -----------------------------------------------------------------


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` to ``parser``."""
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help=f"configuration file (default: ${CONFIG_ENV}, else ./{DEFAULT_CONFIG})",
    )


def load_cli_config(args: argparse.Namespace) -> Config:
    """Load the configuration named by ``args.config`` / ``$MAILHARBOR_CONFIG`` / the default.

    Raises ConfigError, or CliError when the default file does not exist.
    """
    given: str | None = args.config
    path = Path(given or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    if not given and not os.environ.get(CONFIG_ENV) and not path.exists():
        raise CliError(
            f"no configuration: ./{DEFAULT_CONFIG} does not exist "
            f"(pass --config FILE or set {CONFIG_ENV})"
        )
    from mailharbor.config import load_config

    return load_config(path)


def _client(config: Config) -> AdminClient:
    from mailharbor.admin.client import AdminClient

    return AdminClient(config.admin.socket)


def _offline(config: Config, client: AdminClient, request: Request) -> Response:
    """Run ``request`` on the store opened here; while the data directory is locked, keep
    trying both ways for a moment (a node may be starting or just stopping)."""
    from mailharbor.admin.client import NodeNotRunning
    from mailharbor.offline import run_offline
    from mailharbor.store import StoreLocked

    deadline = time.monotonic() + LOCKED_RETRY_SECONDS
    while True:
        try:
            return run_offline(config, request)
        except StoreLocked as e:
            locked = str(e)
        if time.monotonic() >= deadline:
            raise CliError(
                f"{locked}, but no node answers on its admin socket {config.admin.socket} (a "
                "node starting or stopping, or another mailharbor command); nothing was "
                "changed, try again"
            )
        time.sleep(0.2)
        try:
            return client.request(request)
        except NodeNotRunning:
            pass


def perform(config: Config, cmd: str, args: Mapping[str, object] | None = None) -> object:
    """Run admin command ``cmd`` through the running node, or directly on the store when no
    node runs; return its result. Raises CliError with the one-line reason on failure."""
    from mailharbor.admin.client import NodeNotRunning, make_request
    from mailharbor.admin.protocol import RequestError

    try:
        request = make_request(cmd, args)
    except RequestError as e:
        raise CliError(e.message) from None
    client = _client(config)
    try:
        response = client.request(request)
    except NodeNotRunning:
        response = _offline(config, client, request)
    if not response.ok:
        raise CliError(response.error)
    return response.result


def _is_store_error(e: BaseException) -> bool:
    """True for a StoreError (without importing the store: if it was never imported, no store
    error can have been raised)."""
    store = sys.modules.get("mailharbor.store")
    return store is not None and isinstance(e, store.StoreError)


class _OneLineFormatter(logging.Formatter):
    """``mailharbor: warning: message`` on one line, never a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        text = " ".join(record.getMessage().split())
        return f"mailharbor: {record.levelname.lower()}: {text}"


def _cli_logging() -> None:
    """Show warnings of the code a command runs in-process (a torn tail dropped when the store
    was opened, ...) as single lines on stderr, unless logging is already set up."""
    logger = logging.getLogger("mailharbor")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_OneLineFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False


def _guard(func: Command) -> Command:
    """Turn the errors of the admin and store layers into CliError (one line, exit 1)."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        from mailharbor.admin.client import AdminClientError
        from mailharbor.admin.protocol import RequestError

        _cli_logging()
        try:
            status = func(args)
            sys.stdout.flush()
            return status
        except BrokenPipeError:
            # The reader of our output went away (`... | head`): not an error of ours.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 0
        except AdminClientError as e:
            raise CliError(str(e)) from None
        except RequestError as e:
            raise CliError(e.message) from None
        except Exception as e:
            if _is_store_error(e):
                raise CliError(str(e)) from None
            raise

    return wrapper


# --- input and output helpers -------------------------------------------------------------------


def parse_quota(text: str) -> int:
    """A quota in bytes from ``"1GiB"``, ``"500MiB"``, ``"1048576"``; ``"0"``, ``"none"`` and
    ``"unlimited"`` mean no quota (0). Raises CliError (exit 1)."""
    t = text.strip().lower()
    if t in ("none", "unlimited"):
        return 0
    from mailharbor.config import parse_size

    try:
        n = parse_size(text)
    except ValueError:
        raise CliError(
            f"invalid quota {text!r}: use a size like 500MiB or 1GiB (units B, KiB, MiB, GiB, "
            "TiB), or none"
        ) from None
    if n > _U63:
        raise CliError(f"invalid quota {text!r}: too large")
    return n


def human_size(n: int) -> str:
    """``n`` bytes for humans: ``0B``, ``512B``, ``1.5KiB``, ``1GiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            if unit == "B":
                return f"{n}B"
            text = f"{size:.1f}".removesuffix(".0")
            return f"{text}{unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _quota_text(n: int) -> str:
    return "none" if n == 0 else human_size(n)


def _check_address(address: str) -> str:
    """The address as the store will keep it; checked before asking for a password."""
    from mailharbor.store import StoreError, normalize_address

    try:
        return normalize_address(address)
    except StoreError as e:
        raise CliError(str(e)) from None


def _read_password(args: argparse.Namespace, address: str) -> str:
    if args.password_stdin:
        line = sys.stdin.readline(MAX_PASSWORD_LINE + 1)
        password = line.removesuffix("\n").removesuffix("\r")
        if not password:
            raise CliError("no password on standard input")
        return password
    if not sys.stdin.isatty():
        raise CliError("standard input is not a terminal: pass the password with --password-stdin")
    try:
        first = getpass.getpass(f"Password for {address}: ")
        second = getpass.getpass("Retype the password: ")
    except EOFError:
        raise CliError("no password given") from None
    if first != second:
        raise CliError("the passwords do not match")
    if not first:
        raise CliError("the password must not be empty")
    return first


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for row in [list(header), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _dicts(value: object) -> list[dict[str, object]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise CliError("the node sent an unexpected result")
    return value


def _dict(value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise CliError("the node sent an unexpected result")
    return value


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# --- domain -------------------------------------------------------------------------------------


@_guard
def _domain_add(args: argparse.Namespace) -> int:
    r = _dict(perform(load_cli_config(args), "domain.add", {"name": args.name}))
    print(f"domain {r['name']} added")
    return 0


@_guard
def _domain_list(args: argparse.Namespace) -> int:
    domains = _dicts(perform(load_cli_config(args), "domain.list"))
    if args.json:
        _print_json(domains)
    elif not domains:
        print("no domains")
    else:
        rows = [[str(d["name"]), str(d["accounts"]), str(d["aliases"])] for d in domains]
        _table(["DOMAIN", "ACCOUNTS", "ALIASES"], rows)
    return 0


@_guard
def _domain_remove(args: argparse.Namespace) -> int:
    r = _dict(perform(load_cli_config(args), "domain.remove", {"name": args.name}))
    print(f"domain {r['name']} removed")
    return 0


# --- account ------------------------------------------------------------------------------------


@_guard
def _account_add(args: argparse.Namespace) -> int:
    config = load_cli_config(args)
    address = _check_address(args.address)
    quota = parse_quota(args.quota)
    password = _read_password(args, address)
    r = _dict(
        perform(
            config,
            "account.add",
            {"address": address, "password": password, "quota_bytes": quota},
        )
    )
    print(f"account {r['address']} added (quota {_quota_text(_int(r['quota_bytes']))})")
    return 0


@_guard
def _account_list(args: argparse.Namespace) -> int:
    accounts = _dicts(perform(load_cli_config(args), "account.list"))
    if args.json:
        _print_json(accounts)
    elif not accounts:
        print("no accounts")
    else:
        rows = [
            [
                str(a["address"]),
                _quota_text(_int(a["quota_bytes"])),
                human_size(_int(a["used_bytes"])),
                str(a["messages"]),
            ]
            for a in accounts
        ]
        _table(["ADDRESS", "QUOTA", "USED", "MESSAGES"], rows)
    return 0


@_guard
def _account_passwd(args: argparse.Namespace) -> int:
    config = load_cli_config(args)
    address = _check_address(args.address)
    password = _read_password(args, address)
    r = _dict(perform(config, "account.passwd", {"address": address, "password": password}))
    print(f"password of {r['address']} changed")
    return 0


@_guard
def _account_remove(args: argparse.Namespace) -> int:
    r = _dict(perform(load_cli_config(args), "account.remove", {"address": args.address}))
    print(f"account {r['address']} removed")
    return 0


@_guard
def _account_quota(args: argparse.Namespace) -> int:
    config = load_cli_config(args)
    quota = parse_quota(args.size)
    r = _dict(perform(config, "account.quota", {"address": args.address, "quota_bytes": quota}))
    print(f"quota of {r['address']} set to {_quota_text(quota)}")
    return 0


# --- alias --------------------------------------------------------------------------------------


@_guard
def _alias_add(args: argparse.Namespace) -> int:
    r = _dict(
        perform(
            load_cli_config(args), "alias.add", {"source": args.source, "targets": args.targets}
        )
    )
    targets = r["targets"]
    shown = ", ".join(map(str, targets)) if isinstance(targets, list) else "?"
    print(f"alias {r['source']} -> {shown}")
    return 0


@_guard
def _alias_list(args: argparse.Namespace) -> int:
    aliases = _dicts(perform(load_cli_config(args), "alias.list"))
    if args.json:
        _print_json(aliases)
    elif not aliases:
        print("no aliases")
    else:
        rows = []
        for a in aliases:
            targets = a["targets"]
            shown = ", ".join(map(str, targets)) if isinstance(targets, list) else "?"
            rows.append([str(a["source"]), shown])
        _table(["ALIAS", "TARGETS"], rows)
    return 0


@_guard
def _alias_remove(args: argparse.Namespace) -> int:
    r = _dict(perform(load_cli_config(args), "alias.remove", {"source": args.source}))
    print(f"alias {r['source']} removed")
    return 0


# --- store --------------------------------------------------------------------------------------


def _print_mapping(values: Mapping[str, object]) -> None:
    width = max((len(k) for k in values), default=0)
    for k, v in values.items():
        print(f"{k + ':':<{width + 1}} {v}")


@_guard
def _store_stats(args: argparse.Namespace) -> int:
    stats = _dict(perform(load_cli_config(args), "store.stats"))
    if args.json:
        _print_json(stats)
    else:
        _print_mapping(stats)
    return 0


@_guard
def _store_compact(args: argparse.Namespace) -> int:
    r = _dict(perform(load_cli_config(args), "store.compact"))
    if args.json:
        _print_json(r)
    else:
        print(
            f"compacted: {r['segments_rewritten']} segment(s) rewritten, "
            f"{human_size(_int(r['bytes_before']))} -> {human_size(_int(r['bytes_after']))}, "
            f"{r['blobs_reclaimed']} bod(ies) and {r['chunks_reclaimed']} chunk stream(s) "
            "reclaimed"
        )
    return 0


class FsckReportLike(Protocol):
    """What the CLI needs of ``mailharbor.store.fsck.FsckReport``."""

    @property
    def ok(self) -> bool: ...

    def lines(self) -> list[str]: ...

    def to_dict(self) -> dict[str, object]: ...


def run_fsck(data_dir: Path, *, node_id: bytes, repair: bool) -> FsckReportLike:
    """Thin wrapper around ``mailharbor.store.fsck.fsck``; CliError if it is not available."""
    try:
        from mailharbor.store.fsck import fsck
    except ImportError:
        raise CliError("store fsck is not available in this version of mailharbor") from None
    return fsck(os.fspath(data_dir), node_id=node_id, repair=repair)


@_guard
def _store_fsck(args: argparse.Namespace) -> int:
    from mailharbor.admin.client import AdminClientError, NodeNotRunning

    config = load_cli_config(args)
    client = _client(config)
    running = f"node {config.node.name} is running: stop it first, store fsck needs exclusive "
    running += f"access to {config.node.data_dir}"
    try:
        client.call("status")
    except NodeNotRunning:
        pass
    except AdminClientError as e:
        raise CliError(f"{running} ({e})") from None
    else:
        raise CliError(running)
    from mailharbor.store import StoreLocked

    try:
        report = run_fsck(config.node.data_dir, node_id=config.node.node_id, repair=args.repair)
    except StoreLocked as e:
        raise CliError(f"{e}: store fsck needs exclusive access; stop it first") from None
    if args.json:
        _print_json(report.to_dict())
    else:
        for line in report.lines():
            print(line)
    repaired = bool(getattr(report, "repaired", None))
    if not report.ok and not repaired:
        raise CliError("store fsck found damage; `mailharbor store fsck --repair` salvages it")
    return 0


# --- status -------------------------------------------------------------------------------------


@_guard
def _status(args: argparse.Namespace) -> int:
    from mailharbor.admin.client import NodeNotRunning

    config = load_cli_config(args)
    try:
        response = _client(config).call("status")
    except NodeNotRunning:
        if args.json:
            _print_json({"node": config.node.name, "state": "not running"})
        else:
            print(f"node {config.node.name} is not running (no answer on {config.admin.socket})")
        return EXIT_NOT_RUNNING
    if not response.ok:
        raise CliError(response.error)
    status = _dict(response.result)
    if args.json:
        _print_json(status)
        return 0
    store = status.pop("store", None)
    recovery = status.pop("recovery", None)
    _print_mapping(status)
    if isinstance(recovery, dict):
        print("recovery:")
        for k, v in recovery.items():
            print(f"  {k}: {v}")
    if isinstance(store, dict):
        print("store:")
        for k, v in store.items():
            print(f"  {k}: {v}")
    return 0


# --- registration -------------------------------------------------------------------------------


def _leaf(
    sub: Subparsers, name: str, func: Command, help: str, *, json: bool = False, **kw: str
) -> argparse.ArgumentParser:
    """Add subcommand ``name`` running ``func``, with ``--config`` (and ``--json``)."""
    p = sub.add_parser(
        name, help=help, description=kw.get("description", help[:1].upper() + help[1:] + ".")
    )
    add_config_argument(p)
    if json:
        p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=func)
    return p


def _password_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input (default: prompt twice)",
    )


def register(subparsers: Subparsers) -> None:
    """Add ``domain``, ``account``, ``alias``, ``store`` and ``status``."""
    dom = subparsers.add_parser("domain", help="manage local domains")
    sub = dom.add_subparsers(dest="domain_command", metavar="ACTION", required=True)
    _leaf(sub, "add", _domain_add, "add a local domain").add_argument("name", metavar="DOMAIN")
    _leaf(sub, "list", _domain_list, "list domains", json=True)
    p = _leaf(sub, "remove", _domain_remove, "remove a domain that has no accounts or aliases")
    p.add_argument("name", metavar="DOMAIN")

    acc = subparsers.add_parser("account", help="manage mail accounts")
    sub = acc.add_subparsers(dest="account_command", metavar="ACTION", required=True)
    p = _leaf(sub, "add", _account_add, "create an account in a local domain")
    p.add_argument("address", metavar="ADDRESS")
    _password_option(p)
    p.add_argument(
        "--quota", default="none", metavar="SIZE", help="quota like 1GiB or 500MiB (default none)"
    )
    _leaf(sub, "list", _account_list, "list accounts with quota and usage", json=True)
    p = _leaf(sub, "passwd", _account_passwd, "set an account's password")
    p.add_argument("address", metavar="ADDRESS")
    _password_option(p)
    p = _leaf(sub, "remove", _account_remove, "delete an account and all its mail")
    p.add_argument("address", metavar="ADDRESS")
    p = _leaf(sub, "quota", _account_quota, "set an account's quota")
    p.add_argument("address", metavar="ADDRESS")
    p.add_argument("size", metavar="SIZE", help="like 1GiB or 500MiB; none for no quota")

    ali = subparsers.add_parser("alias", help="manage aliases")
    sub = ali.add_subparsers(dest="alias_command", metavar="ACTION", required=True)
    p = _leaf(sub, "add", _alias_add, "create an alias, or add targets to an existing one")
    p.add_argument("source", metavar="SOURCE", help="address, or @domain for a catch-all")
    p.add_argument("targets", metavar="TARGET", nargs="+", help="target address")
    _leaf(sub, "list", _alias_list, "list aliases", json=True)
    _leaf(sub, "remove", _alias_remove, "remove an alias").add_argument("source", metavar="SOURCE")

    sto = subparsers.add_parser("store", help="inspect and maintain the store")
    sub = sto.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    _leaf(sub, "stats", _store_stats, "show store figures", json=True)
    p = _leaf(
        sub,
        "fsck",
        _store_fsck,
        "verify the whole store (the node must be stopped)",
        json=True,
        description=(
            "Verify every segment, frame, record and body of the store. Refuses while a node "
            "runs. Exits 1 if damage was found and not repaired."
        ),
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="salvage a damaged store: keep everything intact, expunge lost messages",
    )
    _leaf(
        sub,
        "compact",
        _store_compact,
        "reclaim the space of deleted message bodies (through the node if one runs)",
        json=True,
    )

    _leaf(
        subparsers,
        "status",
        _status,
        "show the running node's state (exit 3 if no node runs)",
        json=True,
    )
