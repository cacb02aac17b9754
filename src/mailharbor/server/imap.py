"""The IMAP listeners: asyncio adapters around the sans-IO engine and the mailbox service.

Theory of operation
-------------------
One :class:`ImapListener` per configured endpoint: ``imap.listen`` (port 143, STARTTLS offered)
and ``imap.listen_tls`` (993, implicit TLS). All listeners of a node share one
:class:`ImapServices` (mailbox service and its notification hub, authenticator, AUTH failure
accounting, connection limits).

A session (:class:`_Session`) reads bytes, feeds the engine (``ImapServerConnection``) and
answers each ``Request`` by calling the mailbox service (``MailboxService``/``SelectedView``)
and sending the untagged data, then exactly one tagged completion. Before the tagged completion
of every command the view's pending updates are sent (:meth:`SelectedView.sync`), with EXPUNGE
(or VANISHED) only where RFC 9051 7.5.1 allows it: not for FETCH, STORE and SEARCH (their UID
forms may). While a client IDLEs, the session also waits on the view's wake-up event, which the
hub sets after every commit touching the mailbox, and pushes the updates at once. A FETCH that
names a message another session expunged, and of which nothing is readable any more, gets the
data of the others and ``NO [EXPUNGEISSUED]`` (the UID form announces the expunge instead).

The output of one command is written in one piece. Bulk FETCH data (and flag updates) arrive
from the service as ready response lines (``RawLines``), not as one value tree per message.

Invariants
----------
- Timeouts: ``login_timeout`` until authenticated, then ``idle_timeout`` (IDLE included); then
  ``* BYE`` and close.
- Limits: ``max_connections`` over all IMAP listeners and ``max_connections_per_client`` per
  client address get ``* BYE`` before the greeting; ``max_connections_per_account`` logged-in
  sessions per account, one more login gets ``NO [LIMIT]``.
- PROXY v2 from ``trusted_proxies`` exactly as for SMTP.
- Stop: listening sockets close first, then every session gets ``* BYE`` once its command in
  progress completed (an APPEND being committed finishes and is acknowledged).
- Exception text never reaches the wire: a bug while answering is ``NO [SERVERBUG]`` plus a log
  line with the traceback; the session continues.
- Every write acknowledged with OK is durable (the service commits before returning).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mailharbor.proto.imap import (
    NEED_DATA,
    PAUSED,
    ConnectionClosed,
    IdleDone,
    ImapLimits,
    ImapServerConfig,
    ImapServerConnection,
    ProtocolViolation,
    Request,
    SequenceSet,
)
from mailharbor.proto.imap import commands as c
from mailharbor.proto.imap import responses as r
from mailharbor.proto.smtp import AuthFailures
from mailharbor.server.listener import (
    TLS_HANDSHAKE_TIMEOUT,
    ConnectionLimiter,
    EngineSession,
    Listener,
)
from mailharbor.server.proxy import TrustedProxies
from mailharbor.service.auth import Authenticator, AuthStatus
from mailharbor.service.mailbox import (
    DELIMITER,
    Exists,
    Expunged,
    FetchAtt,
    FlagsChanged,
    KeywordsChanged,
    MailboxError,
    MailboxGone,
    MailboxService,
    Recent,
    SelectedView,
    Update,
    Vanished,
)
from mailharbor.service.search import Key, search

__all__ = ["ImapListener", "ImapOptions", "ImapServices"]

log = logging.getLogger("mailharbor.imap")

_WRITE_TIMEOUT = 120.0
_WRITE_HIGH_WATER = 256 * 1024


@dataclass(frozen=True)
class ImapOptions:
    """The ``[imap]`` settings the sessions use (see :class:`mailharbor.config.ImapConfig`)."""

    hostname: str = "localhost"
    allow_plaintext_auth: bool = False
    idle_timeout: float = 1800.0
    login_timeout: float = 60.0
    max_line: int = 64 * 1024
    max_literal: int = 50 * 1024 * 1024
    max_connections: int = 1000
    max_connections_per_client: int = 50
    max_connections_per_account: int = 20
    trusted_proxies: tuple[str, ...] = ()


@dataclass
class ImapServices:
    """What every IMAP listener of a node shares."""

    mailboxes: MailboxService
    authenticator: Authenticator
    options: ImapOptions
    tls: ssl.SSLContext | None = None
    auth_failures: AuthFailures = field(default_factory=lambda: AuthFailures(time.monotonic))
    limiter: ConnectionLimiter | None = None
    trusted: TrustedProxies = field(default_factory=lambda: TrustedProxies(()))
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    accounts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.limiter is None:
            o = self.options
            self.limiter = ConnectionLimiter(o.max_connections, o.max_connections_per_client)
        self.trusted = TrustedProxies(self.options.trusted_proxies)


class ImapListener(Listener):
    """One listening endpoint (plain with STARTTLS, or implicit TLS)."""

    log = log
    label = "imap"

    def __init__(self, endpoint: str, services: ImapServices, *, implicit_tls: bool) -> None:
        self.services = services
        assert services.limiter is not None
        super().__init__(
            endpoint,
            trusted=services.trusted,
            limiter=services.limiter,
            tls=services.tls,
            implicit_tls=implicit_tls,
        )

    def __repr__(self) -> str:
        return f"ImapListener({self.endpoint}{', tls' if self.implicit_tls else ''})"

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting; sessions send ``* BYE`` after their command in progress."""
        await super().stop(grace)

    def _busy_reply(self) -> bytes:
        return b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"

    async def _session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: str, tls: bool
    ) -> None:
        await _Session(self, reader, writer, client, tls).run()


# -- the session ---------------------------------------------------------------------------------


def _code(name: str | None) -> r.Code | None:
    return r.Code(name) if name else None


def _ranges(s: SequenceSet) -> list[tuple[int | None, int | None]]:
    return list(s.ranges)


def _search_key(k: c.SearchKey, uid_top: Callable[[], int]) -> Key:
    """The engine's search program → the service's :class:`Key` tree."""
    if isinstance(k, c.SearchAll):
        return Key("ALL")
    if isinstance(k, c.SearchFlag):
        low = k.flag.lower()
        system = {
            "\\seen": "SEEN",
            "\\answered": "ANSWERED",
            "\\flagged": "FLAGGED",
            "\\deleted": "DELETED",
            "\\draft": "DRAFT",
        }
        if low == "\\recent":
            return Key("RECENT") if k.present else Key("NOT", keys=(Key("RECENT"),))
        name = system.get(low)
        if name is not None:
            return Key(name if k.present else "UN" + name)
        return Key("KEYWORD" if k.present else "UNKEYWORD", text=k.flag)
    if isinstance(k, c.SearchHeader):
        up = k.field.upper()
        if up in ("FROM", "TO", "CC", "BCC", "SUBJECT") and k.field == up:
            return Key(up, text=k.value)
        return Key("HEADER", name=k.field, text=k.value)
    if isinstance(k, c.SearchText):
        return Key("BODY" if k.body_only else "TEXT", text=k.value)
    if isinstance(k, c.SearchDate):
        return Key(("SENT" if k.sent else "") + k.op, date=k.date)
    if isinstance(k, c.SearchSize):
        return Key("LARGER" if k.larger else "SMALLER", num=k.size)
    if isinstance(k, c.SearchSeq):
        return Key("UID" if k.uid else "SEQ", ranges=tuple(_ranges(k.sequence)))
    if isinstance(k, c.SearchModSeq):
        return Key("MODSEQ", num=k.modseq)
    if isinstance(k, c.SearchObjectId):
        return Key(k.kind.upper(), text=k.value)
    if isinstance(k, c.SearchNot):
        return Key("NOT", keys=(_search_key(k.key, uid_top),))
    if isinstance(k, c.SearchOr):
        return Key("OR", keys=(_search_key(k.left, uid_top), _search_key(k.right, uid_top)))
    return Key("AND", keys=tuple(_search_key(x, uid_top) for x in k.keys))


def _fetch_att(item: c.FetchItem) -> FetchAtt:
    if isinstance(item, c.FetchBody):
        return FetchAtt("BODY", section=item.section, partial=item.partial, peek=item.peek)
    return FetchAtt(item.name)


class _Session(EngineSession[ImapServerConnection]):
    """One connection (see the module doc)."""

    log = log

    def __init__(
        self,
        listener: ImapListener,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: str,
        tls: bool,
    ) -> None:
        self.listener = listener
        self.services = listener.services
        self.options = listener.services.options
        self.mailboxes = listener.services.mailboxes
        self.reader = reader
        self.writer = writer
        self.client = client
        self.tls = tls
        self.account: str | None = None
        self.view: SelectedView | None = None
        self.idling = False
        self.wakeup = asyncio.Event()
        self.first_read = True
        self.conn = self._make_engine()
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._read_deadline = 0.0
        self._reading = False
        self._interrupt: str | None = None  # why a waiting read was cancelled

    # -- the engine (see proto/imap) -------------------------------------------------------

    def _make_engine(self) -> ImapServerConnection:
        o = self.options
        cfg = ImapServerConfig(
            tls_available=self.services.tls is not None,
            allow_plaintext_auth=o.allow_plaintext_auth,
            limits=ImapLimits(max_line_length=o.max_line, max_literal=o.max_literal),
        )
        return ImapServerConnection(cfg, tls_active=self.tls)

    # -- I/O -------------------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() > _WRITE_HIGH_WATER:
            await asyncio.wait_for(self.writer.drain(), _WRITE_TIMEOUT)

    async def _bye(self, text: str) -> None:
        with contextlib.suppress(Exception):
            await self._write(self.conn.send(r.bye(text)) + self.conn.data_to_send())

    async def _read(self) -> bytes | None:
        """The next bytes (``b""`` at EOF), or None after a timeout/stop BYE was written.

        A plain ``await reader.read()``: its timeout is one lazy timer per session
        (``_on_timer``; a read only records its deadline, the timer re-arms itself at the
        current deadline or, if the session is still waiting for bytes past it, cancels the
        read), and a listener stop cancels a waiting read the same way (``_on_stop``); both
        become the ``* BYE``. While the client IDLEs, :meth:`_read_idle` waits instead."""
        if self.idling and self.view is not None:
            return await self._read_idle()
        loop = self._loop
        timeout = self.options.idle_timeout if self.account else self.options.login_timeout
        if self.listener.stop_future.done():
            await self._bye("Server shutting down")
            return None
        self._read_deadline = deadline = loop.time() + timeout
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._on_timer)
        elif self._timer.when() > deadline:  # a shorter timeout than the armed one
            self._timer.cancel()
            self._timer = loop.call_at(deadline, self._on_timer)
        self._reading = True
        try:
            return await self.reader.read(65536)
        except asyncio.CancelledError:
            if self._interrupt is None:
                raise  # the task itself is being cancelled
            task = self._task
            assert task is not None
            task.uncancel()
        except (ConnectionError, OSError):
            return b""
        finally:
            self._reading = False
        why, self._interrupt = self._interrupt, None
        if why == "stop":
            await self._bye("Server shutting down")
        else:
            log.info("IMAP session with %s timed out", self.client)
            await self._bye("Autologout; idle for too long")
        return None

    def _on_timer(self) -> None:
        self._timer = None
        if not self._reading:
            return  # the next read arms a new timer
        if self._loop.time() < self._read_deadline:
            self._timer = self._loop.call_at(self._read_deadline, self._on_timer)
            return
        self._cancel_read("timeout")

    def _on_stop(self, _: asyncio.Future[None]) -> None:
        if self._reading:
            self._cancel_read("stop")

    def _cancel_read(self, why: str) -> None:
        if self._interrupt is None and self._task is not None:
            self._interrupt = why
            self._task.cancel()

    async def _read_idle(self) -> bytes | None:
        """:meth:`_read` during IDLE: also waits for the mailbox's wake-up event and pushes
        the updates at once."""
        loop = asyncio.get_running_loop()
        timeout = self.options.idle_timeout if self.account else self.options.login_timeout
        deadline = loop.time() + timeout
        stop = self.listener.stop_future
        if stop.done():
            await self._bye("Server shutting down")
            return None
        read = asyncio.ensure_future(self.reader.read(65536))
        try:
            while True:
                waiters: set[asyncio.Future[object]] = {read, stop}  # type: ignore[arg-type]
                wake: asyncio.Future[Any] | None = None
                if self.idling and self.view is not None:
                    wake = asyncio.ensure_future(self.wakeup.wait())
                    waiters.add(wake)
                left = max(0.0, deadline - loop.time())
                done, _ = await asyncio.wait(waiters, timeout=left, return_when="FIRST_COMPLETED")
                if wake is not None and not wake.done():
                    wake.cancel()
                if read in done:
                    try:
                        return read.result()
                    except (ConnectionError, OSError):
                        return b""
                if wake is not None and wake in done:
                    self.wakeup.clear()
                    try:
                        out = self._sync(expunge=True)
                    except MailboxGone:
                        await self._bye("Selected mailbox was deleted")
                        return None
                    if out:
                        await self._write(self.conn.send(*out))
                    continue
                break
        finally:
            if not read.done():
                read.cancel()
                with contextlib.suppress(BaseException):
                    await read
        if stop.done():
            await self._bye("Server shutting down")
        else:
            log.info("IMAP session with %s timed out", self.client)
            await self._bye("Autologout; idle for too long")
        return None

    async def _refuse_proxy(self) -> None:
        await self._bye("PROXY protocol not accepted from this address")

    async def run(self) -> None:
        self._task = asyncio.current_task()
        stop = self.listener.stop_future
        stop.add_done_callback(self._on_stop)
        try:
            await self._serve()
        finally:
            stop.remove_done_callback(self._on_stop)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._unselect()
            if self.account is not None:
                acc = self.services.accounts
                acc[self.account] -= 1
                if acc[self.account] <= 0:
                    del acc[self.account]

    async def _pump(self) -> bool:
        """Handle every event the engine has; True when the session is over."""
        conn = self.conn
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                break
            if ev is PAUSED:  # cannot happen: every request is completed before the next
                raise RuntimeError("engine paused without an answer")
            if isinstance(ev, ConnectionClosed):
                await self._write(conn.data_to_send())
                return True
            if isinstance(ev, ProtocolViolation):
                log.debug("IMAP client %s: %s", self.client, ev.reason)
                await self._write(conn.data_to_send())
                if ev.closing:
                    return True
                continue
            if isinstance(ev, IdleDone):
                self.idling = False
                out = conn.data_to_send()
                if not ev.answered:
                    out += conn.send(r.ok("IDLE terminated"))
                await self._write(out)
                continue
            assert isinstance(ev, Request)
            if ev.answered:
                await self._answered(ev)
                continue
            await self._write(conn.data_to_send())
            responses = await self._answer(ev)
            if responses:
                await self._write(conn.send(*responses))
        await self._write(conn.data_to_send())
        return bool(conn.closing)

    async def _answered(self, ev: Request) -> None:
        """A request the engine answered itself (CAPABILITY, ENABLE, STARTTLS, ...)."""
        if isinstance(ev.command, c.StartTls):
            # No await between the OK and start_tls: the ClientHello must not be read by the
            # plaintext stream reader.
            self.writer.write(self.conn.data_to_send())
            assert self.services.tls is not None
            await self.writer.start_tls(
                self.services.tls, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT
            )
            self.tls = True
            self.conn.starttls_done()
            return
        if isinstance(ev.command, c.Enable) and self.view is not None:
            self.view.qresync = self.conn.qresync
            self.view.condstore = self.view.condstore or self.conn.condstore
        await self._write(self.conn.data_to_send())

    async def _answer(self, ev: Request) -> list[r.Tagged | r.Untagged]:
        """The responses to one request: untagged data, pending updates, one tagged status
        (IDLE: no tagged status yet)."""
        cmd = ev.command
        if self.view is not None:
            self.view.qresync = self.conn.qresync
            self.view.condstore = self.view.condstore or self.conn.condstore
            await self.view.settle()
        try:
            return await self._dispatch(ev.tag, cmd)
        except MailboxGone:
            self._unselect()
            return [
                r.no("Selected mailbox was deleted", r.Code.NONEXISTENT),
                r.bye("Mailbox deleted"),
            ]
        except MailboxError as e:
            tagged = r.bad(e.text) if e.bad else r.no(e.text, _code(e.code))
            return [*self._safe_sync(cmd), tagged]
        except (ConnectionError, TimeoutError, ssl.SSLError):
            raise
        except Exception:
            log.exception("error while answering %s from %s", type(cmd).__name__, self.client)
            return [r.no("Internal error", r.Code.SERVERBUG)]

    def _safe_sync(self, cmd: c.Command) -> list[r.Tagged | r.Untagged]:
        try:
            return self._sync(expunge=self._expunge_allowed(cmd))
        except MailboxError:
            return []

    @staticmethod
    def _expunge_allowed(cmd: c.Command) -> bool:
        if isinstance(cmd, c.Fetch | c.Store | c.Search):
            return cmd.uid
        return True

    # -- helpers used by the handlers ------------------------------------------------------

    def _updates(self, ups: list[Update]) -> list[r.Tagged | r.Untagged]:
        out: list[r.Tagged | r.Untagged] = []
        fetches: list[bytes] = []
        for u in ups:
            if isinstance(u, FlagsChanged):
                # many at once after a bulk STORE elsewhere: rendered straight to bytes (flag
                # names come from the index, already valid atoms)
                ms = b" MODSEQ (%d)" % u.modseq if u.modseq is not None else b""
                fetches.append(
                    b"* %d FETCH (UID %d FLAGS (%s)%s)\r\n"
                    % (u.seq, u.uid, " ".join(u.flags).encode("utf-8"), ms)
                )
                continue
            if fetches:
                out.append(r.RawLines(lines=b"".join(fetches)))
                fetches = []
            if isinstance(u, Exists):
                out.append(r.exists(u.count))
            elif isinstance(u, Recent):
                out.append(r.Untagged((u.count, r.Atom("RECENT"))))
            elif isinstance(u, Expunged):
                out.extend(r.expunge(s) for s in u.seqs)
            elif isinstance(u, Vanished):
                if u.uids:
                    out.append(r.vanished(u.uids, u.earlier))
            elif isinstance(u, KeywordsChanged):
                out.append(r.flags(u.flags))
                out.append(r.untagged_ok("Flags permitted", r.Code.permanentflags(u.permanent)))
        if fetches:
            out.append(r.RawLines(lines=b"".join(fetches)))
        return out

    def _sync(self, *, expunge: bool) -> list[r.Tagged | r.Untagged]:
        if self.view is None:
            return []
        return self._updates(self.view.sync(expunge_allowed=expunge))

    def _need_view(self) -> SelectedView:
        if self.view is None:
            raise MailboxError(None, "No mailbox selected", bad=True)
        return self.view

    def _unselect(self) -> None:
        if self.view is not None:
            self.view.close()
            self.view = None

    # -- commands --------------------------------------------------------------------------

    async def _dispatch(self, tag: str, cmd: c.Command) -> list[r.Tagged | r.Untagged]:
        if isinstance(cmd, c.Login):
            return [await self._login(cmd.username, cmd.password)]
        if isinstance(cmd, c.Authenticate):
            return [await self._login(cmd.identity, cmd.password, cmd.authzid)]
        if isinstance(cmd, c.Noop | c.Check):
            return [*self._sync(expunge=True), r.ok(f"{type(cmd).__name__.upper()} completed")]
        account = self.account
        if account is None:  # the engine refuses these before authentication; belt and braces
            return [r.bad("Not authenticated")]
        mbs = self.mailboxes
        if isinstance(cmd, c.Select):
            return self._select(account, cmd)
        if isinstance(cmd, c.Create):
            await mbs.create(account, cmd.mailbox, cmd.special_use)
            return [*self._sync(expunge=True), r.ok("CREATE completed")]
        if isinstance(cmd, c.Delete):
            await mbs.delete(account, cmd.mailbox)
            return [*self._sync(expunge=True), r.ok("DELETE completed")]
        if isinstance(cmd, c.Rename):
            await mbs.rename(account, cmd.old, cmd.new)
            return [*self._sync(expunge=True), r.ok("RENAME completed")]
        if isinstance(cmd, c.Subscribe | c.Unsubscribe):
            await mbs.subscribe(account, cmd.mailbox, isinstance(cmd, c.Subscribe))
            return [*self._sync(expunge=True), r.ok("Completed")]
        if isinstance(cmd, c.List):
            return [*self._list(account, cmd), *self._sync(expunge=True), r.ok("LIST completed")]
        if isinstance(cmd, c.Lsub):
            out: list[r.Tagged | r.Untagged] = [
                r.list_mailbox(e.name, DELIMITER, e.attributes, lsub=True)
                for e in mbs.list_mailboxes(account, cmd.reference, [cmd.pattern], lsub=True)
            ]
            return [*out, *self._sync(expunge=True), r.ok("LSUB completed")]
        if isinstance(cmd, c.Namespace):
            return [r.namespace([("", DELIMITER)]), r.ok("NAMESPACE completed")]
        if isinstance(cmd, c.Status):
            return [
                self._status(account, cmd.mailbox, cmd.items),
                *self._sync(expunge=True),
                r.ok("STATUS completed"),
            ]
        if isinstance(cmd, c.Append):
            date = cmd.internal_date
            ms = int(date.timestamp() * 1000) if date is not None else None
            uv, uid = await mbs.append(account, cmd.mailbox, cmd.message, cmd.flags, ms)
            return [*self._sync(expunge=True), r.ok("APPEND completed", r.Code.appenduid(uv, uid))]
        if isinstance(cmd, c.GetQuota):
            if cmd.root != "":
                return [r.no("No such quota root", r.Code.NONEXISTENT)]
            return [self._quota(account), r.ok("GETQUOTA completed")]
        if isinstance(cmd, c.GetQuotaRoot):
            mbs.mailbox(account, cmd.mailbox)
            return [
                r.quotaroot(cmd.mailbox, [""]),
                self._quota(account),
                r.ok("GETQUOTAROOT completed"),
            ]
        if isinstance(cmd, c.Idle):
            self.idling = True
            self.wakeup.clear()
            return self._sync(expunge=True)  # the tagged OK comes after DONE
        # selected state
        if isinstance(cmd, c.Unselect | c.Close):
            view = self._need_view()
            if isinstance(cmd, c.Close) and not view.readonly:
                with contextlib.suppress(MailboxError):
                    await view.expunge()
            self._unselect()
            return [r.ok(f"{type(cmd).__name__.upper()} completed")]
        view = self._need_view()
        if isinstance(cmd, c.Expunge):
            uids = None
            if cmd.uids is not None:
                uids = [u for _, u in view.resolve(_ranges(cmd.uids), uid=True)]
            await view.expunge(uids)
            return [*self._sync(expunge=True), r.ok("EXPUNGE completed")]
        if isinstance(cmd, c.Copy | c.Move):
            return await self._copy(view, cmd)
        if isinstance(cmd, c.Store):
            return await self._store(view, cmd)
        if isinstance(cmd, c.Fetch):
            return self._fetch(view, cmd)
        if isinstance(cmd, c.Search):
            return self._search(tag, view, cmd)
        return [r.bad("Command not supported")]

    async def _login(self, user: str, password: str, authzid: str = "") -> r.Tagged:
        services = self.services
        failures = services.auth_failures
        if self.account is not None:
            return r.bad("Already authenticated")
        if failures.locked_out(self.client):
            return r.no("Too many failed logins, try again later", r.Code.UNAVAILABLE)
        delay = failures.delay(self.client)
        if delay > 0:
            await services.sleep(delay)
        if authzid and authzid.lower() != user.lower():
            failures.record_failure(self.client)
            return r.no("Authorization failed", r.Code.AUTHORIZATIONFAILED)
        result = await services.authenticator.verify(user, password)
        if result.status is AuthStatus.OK and result.account is not None:
            failures.record_success(self.client)
            if services.accounts[result.account] >= self.options.max_connections_per_account:
                log.info("IMAP login of %s refused: too many sessions", result.account)
                return r.no("Too many sessions for this account", r.Code.LIMIT)
            services.accounts[result.account] += 1
            self.account = result.account
            log.info("IMAP login %s from %s", result.account, self.client)
            return r.ok("Logged in")
        if result.status is AuthStatus.TEMPFAIL:
            return r.no("Temporary authentication failure", r.Code.UNAVAILABLE)
        failures.record_failure(self.client)
        log.info("IMAP login failed for %s from %s", user[:64], self.client)
        return r.no("Authentication failed", r.Code.AUTHENTICATIONFAILED)

    def _select(self, account: str, cmd: c.Select) -> list[r.Tagged | r.Untagged]:
        out: list[r.Tagged | r.Untagged] = []
        if self.view is not None:
            self._unselect()
            if self.conn.qresync or self.conn.imap4rev2:
                out.append(r.untagged_ok("Previous mailbox closed", r.Code.closed()))
        qr = cmd.qresync
        qparams = None
        if qr is not None:
            known = tuple(qr.known_uids.ranges) if qr.known_uids is not None else None
            qparams = (qr.uidvalidity, qr.modseq, known)
        rev2 = self.conn.imap4rev2
        view, info = self.mailboxes.select(
            account,
            cmd.mailbox,
            readonly=cmd.readonly,
            rev2=rev2,
            condstore=cmd.condstore or self.conn.condstore,
            qresync=qparams,
        )
        view.qresync = self.conn.qresync
        self.view = view
        self.wakeup.clear()
        view.watch(self.wakeup)
        out.append(r.flags(info.flags))
        out.append(r.exists(info.exists))
        if not rev2:
            out.append(r.Untagged((info.recent, r.Atom("RECENT"))))
            if info.first_unseen:
                out.append(r.untagged_ok("First unseen", r.Code.unseen(info.first_unseen)))
        out.append(r.untagged_ok("UIDs valid", r.Code.uidvalidity(info.uidvalidity)))
        out.append(r.untagged_ok("Predicted next UID", r.Code.uidnext(info.uidnext)))
        out.append(r.untagged_ok("Flags permitted", r.Code.permanentflags(info.permanent_flags)))
        out.append(r.untagged_ok("Highest", r.Code.highestmodseq(info.highestmodseq)))
        out.append(r.untagged_ok("Mailbox ID", r.Code.mailboxid(info.mailboxid)))
        if info.vanished:
            out.append(r.vanished(info.vanished, earlier=True))
        out.extend(self._updates(list(info.changed)))
        code = r.Code.read_only() if info.readonly else r.Code.read_write()
        return [*out, r.ok("SELECT completed" if not cmd.readonly else "EXAMINE completed", code)]

    def _list(self, account: str, cmd: c.List) -> list[r.Tagged | r.Untagged]:
        sel, ret = cmd.selection, cmd.returns
        entries = self.mailboxes.list_mailboxes(
            account,
            cmd.reference,
            cmd.patterns,
            subscribed="SUBSCRIBED" in sel,
            recursive_match="RECURSIVEMATCH" in sel,
            special_use="SPECIAL-USE" in sel,
            return_subscribed="SUBSCRIBED" in ret,
        )
        out: list[r.Tagged | r.Untagged] = []
        for e in entries:
            out.append(
                r.list_mailbox(
                    e.name,
                    DELIMITER,
                    e.attributes,
                    childinfo=e.child_info if cmd.extended else (),
                )
            )
            if "STATUS" in ret and e.selectable and cmd.status_items:
                with contextlib.suppress(MailboxError):
                    out.append(self._status(account, e.name, cmd.status_items))
        return out

    def _status(self, account: str, mailbox: str, items: tuple[str, ...]) -> r.Untagged:
        st = self.mailboxes.status(account, mailbox)
        values: dict[str, int | str] = {
            "MESSAGES": st.messages,
            "RECENT": st.recent,
            "UIDNEXT": st.uidnext,
            "UIDVALIDITY": st.uidvalidity,
            "UNSEEN": st.unseen,
            "DELETED": st.deleted,
            "SIZE": st.size,
            "HIGHESTMODSEQ": st.highestmodseq,
            "MAILBOXID": st.mailboxid,
        }
        return r.status(mailbox, [(i, values[i]) for i in items if i in values])

    def _quota(self, account: str) -> r.Untagged:
        used, limit = self.mailboxes.quota(account)
        if limit <= 0:
            return r.quota("", [])
        return r.quota("", [("STORAGE", (used + 1023) // 1024, limit // 1024)])

    async def _copy(self, view: SelectedView, cmd: c.Copy | c.Move) -> list[r.Tagged | r.Untagged]:
        move = isinstance(cmd, c.Move)
        targets = view.resolve(_ranges(cmd.sequence), uid=cmd.uid)
        res = await view.copy(targets, cmd.mailbox, move=move)
        code = (
            r.Code.copyuid(res.uidvalidity, res.source_uids, res.dest_uids)
            if res.source_uids
            else None
        )
        if move:
            head: list[r.Tagged | r.Untagged] = [r.untagged_ok("Moved", code)] if code else []
            return [*head, *self._sync(expunge=True), r.ok("MOVE completed")]
        return [*self._sync(expunge=True), r.ok("COPY completed", code)]

    async def _store(self, view: SelectedView, cmd: c.Store) -> list[r.Tagged | r.Untagged]:
        targets = view.resolve(_ranges(cmd.sequence), uid=cmd.uid)
        mode = {"ADD": "+", "REMOVE": "-"}.get(cmd.mode.name, "")
        res = await view.store_flags(
            targets,
            mode,
            cmd.flags,
            silent=cmd.silent,
            unchanged_since=cmd.unchangedsince,
            uid_cmd=cmd.uid,
        )
        out: list[r.Tagged | r.Untagged] = []
        if res.fetches:
            lines = b"".join(
                [b"* %d FETCH (%s)\r\n" % (f.seq, b" ".join(f.items)) for f in res.fetches]
            )
            out.append(r.RawLines(lines=lines))
        out.extend(self._sync(expunge=cmd.uid))
        if res.modified:
            return [*out, r.ok("Conditional STORE failed", r.Code.modified(res.modified))]
        return [*out, r.ok("STORE completed")]

    def _fetch(self, view: SelectedView, cmd: c.Fetch) -> list[r.Tagged | r.Untagged]:
        targets = view.resolve(_ranges(cmd.sequence), uid=cmd.uid)
        out: list[r.Tagged | r.Untagged] = []
        if cmd.vanished and cmd.changedsince is not None:
            gone = view.vanished_since(cmd.changedsince, _ranges(cmd.sequence))
            if gone:
                out.append(r.vanished(gone, earlier=True))
        lines, missing = view.fetch_lines(
            targets,
            [_fetch_att(i) for i in cmd.items],
            uid_cmd=cmd.uid,
            changedsince=cmd.changedsince,
        )
        if lines:
            out.append(r.RawLines(lines=lines))
        out.extend(self._sync(expunge=cmd.uid))
        if missing and not cmd.uid:
            # RFC 9051 7.1 / RFC 2180 4.1.2: expunged elsewhere, nothing left to show
            return [
                *out,
                r.no("Some of the requested messages no longer exist", r.Code.EXPUNGEISSUED),
            ]
        return [*out, r.ok("FETCH completed")]

    def _search(self, tag: str, view: SelectedView, cmd: c.Search) -> list[r.Tagged | r.Untagged]:
        key = _search_key(cmd.key, lambda: view.uids[-1] if view.uids else 0)
        res = search(view, key)
        nums = [u if cmd.uid else s for s, u in res.matches]
        modseq = res.highest_modseq if cmd.uses_modseq and res.matches else None
        out: list[r.Tagged | r.Untagged]
        if cmd.returns is None and not self.conn.imap4rev2:
            out = [r.search(nums, modseq)]
        else:
            rets = cmd.returns or ("ALL",)
            out = [
                r.esearch(
                    tag,
                    uid=cmd.uid,
                    min=min(nums) if nums and "MIN" in rets else None,
                    max=max(nums) if nums and "MAX" in rets else None,
                    all=nums if "ALL" in rets else None,
                    count=len(nums) if "COUNT" in rets else None,
                    modseq=modseq,
                )
            ]
        out.extend(self._sync(expunge=cmd.uid))
        return [*out, r.ok("SEARCH completed")]
