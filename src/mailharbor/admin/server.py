"""The admin server: command handlers and the asyncio Unix-socket adapter around them.

Theory of operation
-------------------
:func:`execute` runs one validated :class:`~mailharbor.admin.protocol.Request` against an
:class:`AdminContext` (a store plus what the ``status`` command reports) and always returns a
:class:`~mailharbor.admin.protocol.Response`; the node uses it behind :class:`AdminServer`, the
CLI directly on a store it opened itself when no node runs. :class:`AdminServer` is the thin
adapter: it binds the socket, reads request lines, calls :func:`execute`, writes response lines.

Invariants
----------
- :func:`execute` never raises (except on cancellation): StoreError and bad input become
  ``ok: false`` with the error's one-line message; any other exception is logged with its
  traceback and answered "internal error ... (see the node's log)".
- Changing commands hold :attr:`AdminContext.change_lock` from validation to durable commit, so
  read-modify-write commands (``alias.add``) cannot interleave; they run in ``async with
  store.transaction()`` and succeed only once durable and visible.
- Password hashing runs via ``asyncio.to_thread``, at most ``hash_concurrency`` at a time.
- The socket file is created mode 0600 (umask during bind, then chmod) by the process holding the
  store lock, only after checking that no live server answers on the path; it is removed on close
  only if it is still the file this server bound. Peers whose uid is neither ours nor root are
  refused. At most ``max_connections`` connections are served; an idle one is closed after
  ``idle_timeout`` seconds; a request line longer than ``max_request_bytes`` closes the
  connection after an error answer.
- :meth:`AdminServer.close` stops accepting, answers requests that arrive afterwards with "node is
  stopping", lets running requests finish for up to ``drain_timeout`` seconds, then cancels them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mailharbor.admin.protocol import (
    COMMANDS,
    MAX_REQUEST_BYTES,
    Request,
    RequestError,
    Response,
    decode_request,
    encode_response,
    one_line,
)
from mailharbor.service import queue_admin
from mailharbor.service.auth import hash_password
from mailharbor.store import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    Store,
    StoreError,
    normalize_address,
    normalize_domain,
)

__all__ = [
    "HANDLERS",
    "AdminContext",
    "AdminServer",
    "AdminSocketError",
    "execute",
]

# mailharbor.repl.role is imported by the handlers that use it: a CLI command run offline
# (mailharbor.offline.run_offline) loads this module, and the replication package has nothing to
# do with it. (RoleError only comes from ``ctx.repl``, whose replicator imported it.) The queue
# commands use mailharbor.service.queue_admin, which needs the store only.

log = logging.getLogger("mailharbor.admin")

#: Defaults of the :class:`AdminServer` limits.
DEFAULT_MAX_CONNECTIONS = 16
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_DRAIN_TIMEOUT = 10.0
DEFAULT_HASH_CONCURRENCY = 2


class AdminSocketError(Exception):
    """The admin socket cannot be served (path in use by a live node, not a socket, bind
    failure). ``str()`` is one line."""


@dataclass
class AdminContext:
    """What the handlers run against.

    ``status`` returns the ``status`` command's result (the node's view of itself).
    ``hash_password`` turns a password into a stored hash (argon2id by default; it runs in a
    worker thread, at most ``hash_concurrency`` at a time).
    """

    store: Store
    node_name: str
    status: Callable[[], Mapping[str, object]]
    hash_password: Callable[[str], str] = hash_password
    hash_concurrency: int = DEFAULT_HASH_CONCURRENCY
    change_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    repl: ReplControl | None = None
    cluster: ClusterControl | None = None
    _hash_slots: asyncio.Semaphore | None = field(default=None, repr=False)

    async def hash(self, password: str) -> str:
        """Hash ``password`` in a worker thread; InvalidArgument for an unusable password."""
        if self._hash_slots is None:
            self._hash_slots = asyncio.Semaphore(self.hash_concurrency)
        async with self._hash_slots:
            try:
                return await asyncio.to_thread(self.hash_password, password)
            except ValueError as e:
                raise InvalidArgument(str(e)) from None


Handler = Callable[[AdminContext, Mapping[str, object]], Awaitable[object]]


class ReplControl(Protocol):
    """The running node's replication, as the ``repl.*`` commands use it (``RoleError`` and
    other refusals raise an exception whose text is one line for the operator)."""

    def is_primary(self) -> bool: ...

    def status(self) -> dict[str, object]: ...

    async def promote(self, *, force: bool = False, reason: str = ...) -> dict[str, object]: ...

    async def demote(self) -> dict[str, object]: ...

    def connect(self) -> dict[str, object]: ...

    def disconnect(self) -> dict[str, object]: ...

    async def verify(self) -> dict[str, object]: ...

    async def invalidate(self) -> dict[str, object]: ...

    def resume_io(self) -> dict[str, object]: ...

    async def resolve_split_brain(
        self, *, discard_my_data: bool = False, merge: bool = False
    ) -> dict[str, object]: ...


class ClusterControl(Protocol):
    """The running node's cluster manager, as the ``cluster.*`` commands use it (a refusal
    raises ``RoleError`` whose text is one line for the operator)."""

    def status(self) -> dict[str, object]: ...

    async def admin_command(self, kind: str, node: str, *, force: bool) -> dict[str, object]: ...


def _cluster(ctx: AdminContext) -> ClusterControl:
    if ctx.cluster is None:
        raise InvalidArgument("the cluster manager is not running here (no [cluster] links)")
    return ctx.cluster


async def _cluster_status(ctx: AdminContext, args: Mapping[str, object]) -> object:
    return _cluster(ctx).status()


def _cluster_cmd(kind: str) -> Handler:
    async def handler(ctx: AdminContext, args: Mapping[str, object]) -> object:
        node = args.get("node", "")
        return await _repl_call(
            _cluster(ctx).admin_command(
                kind, node if isinstance(node, str) else "", force=bool(args.get("force"))
            )
        )

    return handler


def _repl(ctx: AdminContext) -> ReplControl:
    if ctx.repl is None:
        raise InvalidArgument(
            "replication is not running here (no [replication] peer configured, or no node runs)"
        )
    return ctx.repl


async def _repl_call(call: Awaitable[dict[str, object]]) -> object:
    from mailharbor.repl.role import RoleError

    try:
        return await call
    except RoleError as e:
        raise InvalidArgument(str(e)) from None


async def _repl_status(ctx: AdminContext, args: Mapping[str, object]) -> object:
    return _repl(ctx).status()


def _refuse_under_cluster(ctx: AdminContext, command: str, instead: str) -> None:
    """Refuse a manual role change where a cluster manager runs: its decision loop is the only
    caller of the role controller (a change made behind its back would race its decisions)."""
    if ctx.cluster is not None:
        raise InvalidArgument(
            f"`repl {command}` is refused: the cluster manager ([cluster]) decides the roles "
            f"here; use {instead}"
        )


async def _repl_primary(ctx: AdminContext, args: Mapping[str, object]) -> object:
    _refuse_under_cluster(ctx, "primary", "`mailharbor cluster switchover` on the current primary")
    force = args.get("force") is True
    return await _repl_call(_repl(ctx).promote(force=force, reason="repl primary"))


async def _repl_secondary(ctx: AdminContext, args: Mapping[str, object]) -> object:
    _refuse_under_cluster(
        ctx,
        "secondary",
        "`mailharbor cluster switchover` (the peer takes over) or "
        "`mailharbor cluster standby NODE`",
    )
    return await _repl_call(_repl(ctx).demote())


async def _repl_connect(ctx: AdminContext, args: Mapping[str, object]) -> object:
    from mailharbor.repl.role import RoleError

    try:
        return _repl(ctx).connect()
    except RoleError as e:  # e.g. a Diskless node
        raise InvalidArgument(str(e)) from None


async def _repl_disconnect(ctx: AdminContext, args: Mapping[str, object]) -> object:
    return _repl(ctx).disconnect()


async def _repl_verify(ctx: AdminContext, args: Mapping[str, object]) -> object:
    return await _repl_call(_repl(ctx).verify())


async def _repl_invalidate(ctx: AdminContext, args: Mapping[str, object]) -> object:
    return await _repl_call(_repl(ctx).invalidate())


async def _repl_resume_io(ctx: AdminContext, args: Mapping[str, object]) -> object:
    return _repl(ctx).resume_io()


async def _repl_resolve_split_brain(ctx: AdminContext, args: Mapping[str, object]) -> object:
    return await _repl_call(
        _repl(ctx).resolve_split_brain(
            discard_my_data=args.get("discard_my_data") is True, merge=args.get("merge") is True
        )
    )


def _str(args: Mapping[str, object], key: str) -> str:
    v = args[key]
    assert isinstance(v, str)
    return v


def _int(args: Mapping[str, object], key: str, default: int = 0) -> int:
    v = args.get(key, default)
    assert isinstance(v, int)
    return v


def _alias_source(source: str) -> str:
    s = source.strip()
    return "@" + normalize_domain(s[1:]) if s.startswith("@") else normalize_address(s)


# --- handlers -----------------------------------------------------------------------------------


async def _status(ctx: AdminContext, args: Mapping[str, object]) -> object:
    return dict(ctx.status())


async def _domain_add(ctx: AdminContext, args: Mapping[str, object]) -> object:
    name = normalize_domain(_str(args, "name"))
    async with ctx.store.transaction() as t:
        t.add_domain(name)
    return {"name": name, "lsn": t.committed_lsn}


async def _domain_list(ctx: AdminContext, args: Mapping[str, object]) -> object:
    idx = ctx.store.index
    accounts: dict[str, int] = {}
    for addr in idx.by_address:
        d = addr.rpartition("@")[2]
        accounts[d] = accounts.get(d, 0) + 1
    aliases: dict[str, int] = {}
    for src in idx.aliases:
        d = src.rpartition("@")[2]
        aliases[d] = aliases.get(d, 0) + 1
    return [
        {"name": d, "accounts": accounts.get(d, 0), "aliases": aliases.get(d, 0)}
        for d in sorted(idx.domains)
    ]


async def _domain_remove(ctx: AdminContext, args: Mapping[str, object]) -> object:
    name = normalize_domain(_str(args, "name"))
    async with ctx.store.transaction() as t:
        t.remove_domain(name)
    return {"name": name, "lsn": t.committed_lsn}


async def _account_add(ctx: AdminContext, args: Mapping[str, object]) -> object:
    address = normalize_address(_str(args, "address"))
    quota = _int(args, "quota_bytes")
    idx = ctx.store.index
    # Cheap checks first, so a doomed request does not cost an argon2 hash.
    if address.rpartition("@")[2] not in idx.domains:
        raise NotFound(f"the domain of {address} is not a local domain")
    if idx.account_by_address(address) is not None:
        raise AlreadyExists(f"account {address} already exists")
    pwhash = await ctx.hash(_str(args, "password"))
    async with ctx.store.transaction() as t:
        guid = t.add_account(address, pwhash, quota)
    return {"address": address, "guid": guid.hex(), "quota_bytes": quota, "lsn": t.committed_lsn}


async def _account_list(ctx: AdminContext, args: Mapping[str, object]) -> object:
    idx = ctx.store.index
    out = []
    for acct in sorted(idx.accounts.values(), key=lambda a: a.address):
        used, messages = idx.account_usage(acct.guid)
        out.append(
            {
                "address": acct.address,
                "quota_bytes": acct.quota_bytes,
                "used_bytes": used,
                "messages": messages,
            }
        )
    return out


def _existing(ctx: AdminContext, address: str) -> None:
    if ctx.store.index.account_by_address(address) is None:
        raise NotFound(f"no account {address}")


async def _account_passwd(ctx: AdminContext, args: Mapping[str, object]) -> object:
    address = normalize_address(_str(args, "address"))
    _existing(ctx, address)
    pwhash = await ctx.hash(_str(args, "password"))
    async with ctx.store.transaction() as t:
        t.update_account(address, password_hash=pwhash)
    return {"address": address, "lsn": t.committed_lsn}


async def _account_remove(ctx: AdminContext, args: Mapping[str, object]) -> object:
    address = normalize_address(_str(args, "address"))
    _existing(ctx, address)
    async with ctx.store.transaction() as t:
        t.delete_account(address)
    return {"address": address, "lsn": t.committed_lsn}


async def _account_quota(ctx: AdminContext, args: Mapping[str, object]) -> object:
    address = normalize_address(_str(args, "address"))
    quota = _int(args, "quota_bytes")
    _existing(ctx, address)
    async with ctx.store.transaction() as t:
        t.update_account(address, quota_bytes=quota)
    return {"address": address, "quota_bytes": quota, "lsn": t.committed_lsn}


async def _alias_add(ctx: AdminContext, args: Mapping[str, object]) -> object:
    source = _alias_source(_str(args, "source"))
    raw_targets = args["targets"]
    assert isinstance(raw_targets, tuple)
    new = [normalize_address(str(x)) for x in raw_targets]
    targets = tuple(dict.fromkeys([*ctx.store.index.aliases.get(source, ()), *new]))
    async with ctx.store.transaction() as t:
        t.set_alias(source, targets)
    return {"source": source, "targets": list(targets), "lsn": t.committed_lsn}


async def _alias_list(ctx: AdminContext, args: Mapping[str, object]) -> object:
    aliases = ctx.store.index.aliases
    return [{"source": s, "targets": list(aliases[s])} for s in sorted(aliases)]


async def _alias_remove(ctx: AdminContext, args: Mapping[str, object]) -> object:
    source = _alias_source(_str(args, "source"))
    async with ctx.store.transaction() as t:
        t.remove_alias(source)
    return {"source": source, "lsn": t.committed_lsn}


async def _store_stats(ctx: AdminContext, args: Mapping[str, object]) -> object:
    return ctx.store.stats()


async def _store_compact(ctx: AdminContext, args: Mapping[str, object]) -> object:
    await ctx.store.settle()
    # Blocking on purpose: the store is owned by this thread. See the README (store compact).
    report = ctx.store.compact()
    return dataclasses.asdict(report)


def _wall_ms() -> int:
    """Wall-clock milliseconds (queue times are wall-clock, like the store's ``created_ms``)."""
    return int(time.time() * 1000)


async def _queue_list(ctx: AdminContext, args: Mapping[str, object]) -> object:
    entries = sorted(ctx.store.index.queue.values(), key=lambda q: (q.created_ms, q.guid))
    return [queue_admin.entry_view(q, ctx.store) for q in entries]


async def _queue_show(ctx: AdminContext, args: Mapping[str, object]) -> object:
    return queue_admin.entry_view(queue_admin.find_entry(ctx.store, _str(args, "id")), ctx.store)


async def _queue_retry(ctx: AdminContext, args: Mapping[str, object]) -> object:
    q = queue_admin.find_entry(ctx.store, _str(args, "id"))
    n = await queue_admin.retry_entries(ctx.store, [q], _wall_ms())
    return {"id": q.guid.hex(), "rescheduled": n}


async def _queue_delete(ctx: AdminContext, args: Mapping[str, object]) -> object:
    q = queue_admin.find_entry(ctx.store, _str(args, "id"))
    n = await queue_admin.delete_entry(ctx.store, q)
    return {"id": q.guid.hex(), "recipients": n}


async def _queue_flush(ctx: AdminContext, args: Mapping[str, object]) -> object:
    entries = list(ctx.store.index.queue.values())
    n = await queue_admin.retry_entries(ctx.store, entries, _wall_ms())
    return {"rescheduled": n, "entries": len(entries)}


#: The handler of every command in ``COMMANDS`` (same keys; checked at import).
HANDLERS: Mapping[str, Handler] = {
    "status": _status,
    "domain.add": _domain_add,
    "domain.list": _domain_list,
    "domain.remove": _domain_remove,
    "account.add": _account_add,
    "account.list": _account_list,
    "account.passwd": _account_passwd,
    "account.remove": _account_remove,
    "account.quota": _account_quota,
    "alias.add": _alias_add,
    "alias.list": _alias_list,
    "alias.remove": _alias_remove,
    "store.stats": _store_stats,
    "store.compact": _store_compact,
    "queue.list": _queue_list,
    "queue.show": _queue_show,
    "queue.retry": _queue_retry,
    "queue.delete": _queue_delete,
    "queue.flush": _queue_flush,
    "repl.status": _repl_status,
    "repl.primary": _repl_primary,
    "repl.secondary": _repl_secondary,
    "repl.connect": _repl_connect,
    "repl.disconnect": _repl_disconnect,
    "repl.verify": _repl_verify,
    "repl.invalidate": _repl_invalidate,
    "repl.resume-io": _repl_resume_io,
    "repl.resolve-split-brain": _repl_resolve_split_brain,
    "cluster.status": _cluster_status,
    "cluster.switchover": _cluster_cmd("switchover"),
    "cluster.standby": _cluster_cmd("standby"),
    "cluster.unstandby": _cluster_cmd("unstandby"),
    "cluster.fence": _cluster_cmd("fence"),
}
if set(HANDLERS) != set(COMMANDS):  # pragma: no cover - a programming error
    raise RuntimeError(f"admin handlers and commands differ: {set(HANDLERS) ^ set(COMMANDS)}")


async def execute(ctx: AdminContext, request: Request) -> Response:
    """Run ``request`` against ``ctx``; never raises except CancelledError (see module doc)."""
    spec = COMMANDS[request.cmd]
    handler = HANDLERS[request.cmd]
    if (
        spec.changes
        and ctx.repl is not None
        and not request.cmd.startswith("repl.")
        and not ctx.repl.is_primary()
    ):
        # One writer: a secondary's store changes only by the peer's replicated log.
        return Response.failure(
            request.id,
            f"node {ctx.node_name} is secondary: run {request.cmd} on the primary",
        )
    try:
        if spec.changes:
            async with ctx.change_lock:
                result = await handler(ctx, request.args)
        else:
            result = await handler(ctx, request.args)
    except StoreError as e:
        if spec.changes:
            log.info("%s -> refused: %s", request.describe(), one_line(str(e)))
        return Response.failure(request.id, str(e))
    except Exception:
        log.exception("%s failed with an internal error", request.describe())
        return Response.failure(
            request.id, f"internal error in {request.cmd} (see the log of node {ctx.node_name})"
        )
    if spec.changes:
        lsn = result.get("lsn") if isinstance(result, dict) else None
        log.info("%s -> ok%s", request.describe(), f" (LSN {lsn})" if lsn else "")
    else:
        log.debug("%s -> ok", request.describe())
    return Response.success(request.id, result)


# --- the socket adapter -------------------------------------------------------------------------


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
#: Seconds a refused connection gets to send its request (whose id the refusal echoes).
_REFUSE_READ_TIMEOUT = 1.0
#: Before closing, at most this much unread input is dropped, waiting at most this long per read.
_DISCARD_LIMIT = 1024 * 1024
_DISCARD_TIMEOUT = 2.0


def _request_id(line: bytes) -> int | str | None:
    """The id of a request line, if it has a usable one (for echoing it in a refusal)."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, int | str) and not isinstance(rid, bool) else None


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return None
    _pid, uid, _gid = _PEERCRED.unpack(raw)
    return int(uid)


def _socket_answers(path: Path) -> bool:
    """True if something accepts connections on the Unix socket ``path``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(os.fspath(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


@dataclass
class _Conn:
    task: asyncio.Task[None]
    busy: bool = False


class AdminServer:
    """Serves :func:`execute` on the Unix socket ``path`` (see the module doc for the limits)."""

    def __init__(
        self,
        path: Path,
        ctx: AdminContext,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    ) -> None:
        self.path = Path(path)
        self.ctx = ctx
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.max_request_bytes = max_request_bytes
        self.drain_timeout = drain_timeout
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._conns: dict[asyncio.Task[None], _Conn] = {}
        self._closing = False
        self._allowed_uids = {os.geteuid(), 0}

    @property
    def serving(self) -> bool:
        return self._server is not None and not self._closing

    async def start(self) -> None:
        """Bind the socket (mode 0600) and start accepting. Raises AdminSocketError."""
        p = self.path
        try:
            st = p.lstat()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise AdminSocketError(f"admin socket {p}: {e.strerror or e}") from None
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise AdminSocketError(f"admin socket {p} exists and is not a socket")
            if await asyncio.to_thread(_socket_answers, p):
                raise AdminSocketError(
                    f"admin socket {p} is in use by another running node; "
                    "give each node its own admin.socket"
                )
            p.unlink(missing_ok=True)  # stale: left by a node that did not stop cleanly
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(os.fspath(p))
        except OSError as e:
            sock.close()
            raise AdminSocketError(f"cannot bind admin socket {p}: {e.strerror or e}") from None
        finally:
            os.umask(old_umask)
        try:
            os.chmod(p, 0o600)
            st = p.stat()
            self._inode = (st.st_dev, st.st_ino)
            self._server = await asyncio.start_unix_server(
                self._client, sock=sock, limit=self.max_request_bytes
            )
        except OSError as e:
            sock.close()
            self._unlink()
            raise AdminSocketError(f"cannot serve admin socket {p}: {e.strerror or e}") from None
        log.info("listening on %s", p)

    def _unlink(self) -> None:
        if self._inode is None:
            return
        with contextlib.suppress(OSError):
            st = self.path.lstat()
            if (st.st_dev, st.st_ino) == self._inode:
                self.path.unlink()
        self._inode = None

    async def close(self) -> None:
        """Stop accepting, remove the socket, drain running requests, close connections."""
        if self._server is None:
            return
        self._closing = True
        self._server.close()
        self._unlink()
        for conn in list(self._conns.values()):
            if not conn.busy:
                conn.task.cancel()
        tasks = [c.task for c in self._conns.values()]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=self.drain_timeout)
            for t in pending:
                log.warning("cancelling a request still running at shutdown")
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        log.info("socket %s closed", self.path)

    async def _send(self, writer: asyncio.StreamWriter, response: Response) -> None:
        try:
            data = encode_response(response)
        except (TypeError, ValueError):
            log.exception("a result could not be encoded as JSON")
            data = encode_response(Response.failure(response.id, "internal error (bad result)"))
        writer.write(data)
        await writer.drain()

    def _refusal(self, writer: asyncio.StreamWriter) -> str | None:
        """Why a new connection is not served, or None."""
        if self._closing:
            return "node is stopping"
        uid = _peer_uid(writer)
        if uid is None or uid not in self._allowed_uids:
            log.warning("refused a connection from uid %s", uid)
            return "permission denied"
        if len(self._conns) >= self.max_connections:
            log.warning("refused a connection: %d admin connections open", len(self._conns))
            return "too many admin connections"
        return None

    async def _refuse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: str
    ) -> None:
        """Answer the first request (read first, so its id can be echoed) with ``message``."""
        try:
            line = await asyncio.wait_for(reader.readline(), _REFUSE_READ_TIMEOUT)
        except (TimeoutError, ValueError):
            line = b""
        await self._send(writer, Response.failure(_request_id(line), message))

    async def _finish(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then read and drop what the peer still sends (bounded), so that closing
        with unread input does not reset the connection before the peer read our answer."""
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
        dropped = 0
        with contextlib.suppress(TimeoutError, ConnectionError, ValueError):
            while dropped < _DISCARD_LIMIT:
                chunk = await asyncio.wait_for(reader.read(65536), _DISCARD_TIMEOUT)
                if not chunk:
                    break
                dropped += len(chunk)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        graceful = True
        try:
            refusal = self._refusal(writer)
            if refusal is not None:
                await self._refuse(reader, writer, refusal)
            else:
                conn = _Conn(task)
                self._conns[task] = conn
                await self._serve(reader, writer, conn)
                self._conns.pop(task, None)
            await self._finish(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            graceful = False
        except asyncio.CancelledError:
            graceful = False
        finally:
            self._conns.pop(task, None)
            writer.close()
            if graceful:
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn
    ) -> None:
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), self.idle_timeout)
            except TimeoutError:
                return
            except ValueError:  # longer than the stream limit
                await self._send(
                    writer,
                    Response.failure(None, f"request longer than {self.max_request_bytes} bytes"),
                )
                return
            if not line.endswith(b"\n"):
                return  # EOF (possibly mid-line)
            conn.busy = True
            try:
                try:
                    if len(line) > self.max_request_bytes:
                        raise RequestError(f"request longer than {self.max_request_bytes} bytes")
                    request = decode_request(line)
                except RequestError as e:
                    response = Response.failure(e.id, e.message)
                else:
                    if self._closing:
                        response = Response.failure(request.id, "node is stopping")
                    else:
                        response = await execute(self.ctx, request)
                await self._send(writer, response)
            finally:
                conn.busy = False
            if self._closing:
                return
