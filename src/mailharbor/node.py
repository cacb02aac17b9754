"""One mailharbor node: built from the configuration, started, run, stopped.

Theory of operation
-------------------
This is the only module that wires layers together. :class:`Node` owns the lifetime of every
resource of a node and starts them in order, stopping them in reverse:

1. the store (``Store.open``: takes the data-directory lock, recovers; the recovery report is
   logged, and the store itself warns about a dropped torn tail or an unusable checkpoint).
   While the lock is held by a process that answers on no admin socket (a CLI command working
   on the store offline holds it for a moment), the start retries for up to
   :data:`LOCK_WAIT_SECONDS`; held by a running node, it fails at once;
2. the admin server on ``admin.socket``;
3. the SMTP/submission/LMTP listeners of ``[smtp]`` (``mailharbor.server.smtp``; the mail log
   of ``log.mail_log`` is opened with them); stopped gracefully: 421 to idle sessions,
   messages in flight finish within ``smtp.stop_grace``;
   then the POP3 listeners of ``[pop3]`` (``mailharbor.server.pop3``), stopped before the SMTP
   ones: ``-ERR`` to sessions waiting for a command, an UPDATE in flight finishes;
   then the IMAP listeners of ``[imap]`` (``mailharbor.server.imap``, with the mailbox service
   and its notification hub), stopped first of the listeners: ``* BYE`` once the command in
   progress completed, then the background commits (the implicit Seen flag) are drained;
4. the outbound queue runner (``mailharbor.service.queue``), stopped first.

With a ``[replication]`` peer, the replicator (``mailharbor.server.repl``) starts after the
admin server, and the services (3 and 4: listeners, queue runner) run **only while this node is
primary**: the replicator's role controller starts them on promotion (``replication.role =
primary`` at start, or ``repl primary``) and stops them gracefully on demotion (``repl
secondary``) — DESIGN.md's resource order (replication role → store → listeners → queue
runner). A secondary serves no client and refuses changing admin commands. Without a peer the
node is standalone and starts its services at once, as before.

Proxy mode (``cluster.proxy``): while a cluster node does not serve, a
:class:`~mailharbor.server.forward.Forwarder` listens on the configured mail endpoints and
forwards each connection to the primary with a PROXY v2 header. It starts before the cluster
manager (a node starts secondary), is stopped at the top of ``_start_services`` (before the
listeners bind the same ports) and started again at the end of ``_stop_services`` (after they
closed), and stopped at teardown.

:meth:`Node.run` starts the node, waits for SIGTERM/SIGINT or :meth:`Node.request_stop`,
then stops it: the admin socket is closed (running commands finish first), every commit in
flight is settled, and the store is closed (final checkpoint, lock released).

Invariants
----------
- The admin socket exists only while this node holds the store lock: it is bound after
  ``Store.open`` succeeded and removed before ``Store.close``.
- A failed start leaves nothing behind: what was started is stopped again, then the error
  propagates (StoreError, e.g. StoreLocked; AdminSocketError).
- :attr:`Node.state` only moves forward: STARTING → RUNNING → STOPPING → STOPPED.

The store is opened by :func:`mailharbor.offline.open_store`, as the CLI's
:func:`~mailharbor.offline.run_offline` opens it when no node runs (and runs the admin handlers
on it in-process, so direct and served commands behave the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import ssl
import time
from collections.abc import Sequence
from enum import Enum

from mailharbor import __version__
from mailharbor.admin.client import AdminClient, AdminClientError, NodeNotRunning
from mailharbor.admin.protocol import RequestError
from mailharbor.admin.server import AdminContext, AdminServer
from mailharbor.cluster.timing import Timing
from mailharbor.config import Config, ConfigError
from mailharbor.offline import open_store
from mailharbor.repl.state import FencingPolicy, Protocol, Role, SplitBrainPolicy
from mailharbor.server.cluster import ClusterManager, ClusterSettings, GatedBarrier
from mailharbor.server.forward import Forwarder, ForwardOptions, Route, RouteKind
from mailharbor.server.imap import ImapListener, ImapOptions, ImapServices
from mailharbor.server.pop3 import Pop3Listener, Pop3Options, Pop3Services
from mailharbor.server.repl import (
    PeerTlsError,
    Replicator,
    ReplSettings,
    RoleHooks,
    peer_tls_contexts,
)
from mailharbor.server.smtp import ListenerKind, SmtpListener, SmtpOptions, SmtpServices
from mailharbor.service import maillog
from mailharbor.service.auth import Authenticator
from mailharbor.service.delivery import LocalDelivery
from mailharbor.service.mailbox import MailboxService
from mailharbor.service.queue import QueueRunner
from mailharbor.store import Store, StoreLocked
from mailharbor.tls import server_context

__all__ = ["Node", "NodeState", "run_node"]

log = logging.getLogger("mailharbor.node")

#: How long a starting node waits for the data-directory lock held by a process that is not a
#: running node (an offline CLI command) before it gives up ("in use by another process").
LOCK_WAIT_SECONDS = 5.0


class NodeState(Enum):
    """Where a node is in its lifetime."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


def repl_settings(config: Config) -> ReplSettings:
    """The replicator's settings from ``[replication]`` (the secret read from its file).
    Raises ConfigError when the secret file is unusable."""
    r = config.replication
    secret = r.secret
    if not secret and r.secret_file is not None:
        try:
            lines = r.secret_file.read_text("utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(
                "replication.secret_file", f"cannot read {r.secret_file}: {e}"
            ) from None
        secret = lines[0].strip() if lines else ""
        if not 16 <= len(secret) <= 256 or not secret.isprintable():
            raise ConfigError(
                "replication.secret_file",
                f"{r.secret_file}: the first line must be 16 to 256 printable characters",
            )
    if r.tls and r.tls_cert and r.tls_key and r.tls_ca:
        try:  # fail at start-up with the setting's name, not at the first connection
            peer_tls_contexts(os.fspath(r.tls_cert), os.fspath(r.tls_key), os.fspath(r.tls_ca))
        except PeerTlsError as e:
            raise ConfigError("replication.tls_cert", str(e)) from None
    return ReplSettings(
        name=config.node.name,
        node_id=config.node.node_id,
        listen=r.listen,
        peer=r.peer,
        secret=secret.encode(),
        protocol=Protocol(r.protocol),
        role=Role.PRIMARY if r.role == "primary" else Role.SECONDARY,
        fencing=FencingPolicy(r.fencing),
        split_brain=SplitBrainPolicy(r.split_brain),
        ack_timeout=r.ack_timeout,
        ping_interval=r.ping_interval,
        ping_timeout=r.ping_timeout,
        resync_rate=r.resync_rate,
        retain_bytes=r.retain_bytes,
        # With the cluster manager the decision loop alone promotes (docs/cluster.md).
        auto_promote=not config.cluster.enabled,
        tls_cert=os.fspath(r.tls_cert) if r.tls and r.tls_cert else "",
        tls_key=os.fspath(r.tls_key) if r.tls and r.tls_key else "",
        tls_ca=os.fspath(r.tls_ca) if r.tls and r.tls_ca else "",
        tls_peer_name=r.tls_peer_name,
    )


def _secret_from_file(key: str, path: os.PathLike[str]) -> bytes:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(key, f"cannot read {os.fspath(path)}: {e}") from None
    secret = lines[0].strip() if lines else ""
    if not 16 <= len(secret) <= 256 or not secret.isprintable():
        raise ConfigError(
            key, f"{os.fspath(path)}: the first line must be 16 to 256 printable characters"
        )
    return secret.encode()


def cluster_settings(config: Config, repl_secret: bytes) -> ClusterSettings:
    """The cluster manager's settings from ``[cluster]`` (the secret defaults to the
    replication secret). Raises ConfigError."""
    c = config.cluster
    if not config.replication.enabled:
        raise ConfigError("cluster.links", "the cluster manager needs a [replication] peer")
    assert c.peer_node_id is not None  # ClusterConfig.check
    if c.peer_node_id == config.node.node_id:
        raise ConfigError("cluster.peer_node_id", "is this node's own node.node_id")
    if c.secret:
        secret = c.secret.encode()
    elif c.secret_file is not None:
        secret = _secret_from_file("cluster.secret_file", c.secret_file)
    else:
        secret = repl_secret
    return ClusterSettings(
        name=c.name,
        node_name=config.node.name,
        node_id=config.node.node_id,
        peer_name=c.peer_name or "peer",
        peer_id=c.peer_node_id,
        secret=secret,
        links=c.links,
        witness="" if c.two_node else c.witness,
        timing=Timing(**c.timing_values()),
        self_fence=c.self_fence,
        stonith=c.stonith,
        fence_command=c.fence_command,
        power_switch=c.power_switch,
        preferred=c.preferred,
    )


def proxy_routes(config: Config) -> list[Route]:
    """The forwarder's routes from ``cluster.proxy``: each local endpoint must be one of this
    node's mail listener endpoints, which gives the protocol. Raises ConfigError."""
    kinds: dict[str, RouteKind] = {}
    s, i, p = config.smtp, config.imap, config.pop3
    for eps, kind in (
        (s.mx + s.submission + s.lmtp, RouteKind.SMTP),
        (s.submissions + i.listen_tls + p.listen_tls, RouteKind.TLS),
        (i.listen, RouteKind.IMAP),
        (p.listen, RouteKind.POP3),
    ):
        for ep in eps:
            kinds.setdefault(ep, kind)
    routes = []
    for local, peer in config.cluster.proxy:
        if local not in kinds:
            raise ConfigError(
                "cluster.proxy", f"{local} is not an smtp, imap or pop3 endpoint of this node"
            )
        routes.append(Route(local, peer, kinds[local]))
    return routes


def _endpoints(plain: Sequence[str], implicit_tls: Sequence[str]) -> list[tuple[str, bool]]:
    """A protocol's endpoints as (endpoint, implicit TLS?): the plain ones, then the TLS ones."""
    return [(ep, False) for ep in plain] + [(ep, True) for ep in implicit_tls]


async def _stop_all(listeners: Sequence[SmtpListener | Pop3Listener | ImapListener]) -> None:
    """Stop ``listeners`` together, each with its protocol's grace period; a failure is
    logged, the others still stop."""
    results = await asyncio.gather(*(x.stop() for x in listeners), return_exceptions=True)
    for x, r in zip(listeners, results, strict=True):
        if isinstance(r, BaseException):
            log.error("stopping %r failed: %s", x, r)


class Node:
    """A node built from ``config``; see the module doc."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = NodeState.STARTING
        self.store: Store | None = None
        self.admin: AdminServer | None = None
        self.queue: QueueRunner | None = None
        self.listeners: list[SmtpListener] = []
        self.pop3_listeners: list[Pop3Listener] = []
        self.imap_listeners: list[ImapListener] = []
        self.mailboxes: MailboxService | None = None
        self.authenticator: Authenticator | None = None
        self.repl: Replicator | None = None
        self.cluster: ClusterManager | None = None
        self.forwarder: Forwarder | None = None
        self._routes: list[Route] = []
        self._stop: asyncio.Event | None = None
        self._stop_reason = ""
        self._started_monotonic = time.monotonic()
        self._started_at = time.time()

    @property
    def name(self) -> str:
        return self.config.node.name

    def status(self) -> dict[str, object]:
        """The ``status`` admin command's result: identity, state, store figures, recovery."""
        store = self.store
        recovery = (
            dataclasses.asdict(store.recovery)
            if store is not None and store.recovery is not None
            else None
        )
        return {
            "node": self.name,
            "node_id": self.config.node.node_id_hex,
            "hostname": self.config.node.hostname,
            "version": __version__,
            "pid": os.getpid(),
            "state": self.state.value,
            "started_at": round(self._started_at, 3),
            "uptime_seconds": round(time.monotonic() - self._started_monotonic, 3),
            "data_dir": os.fspath(self.config.node.data_dir),
            "admin_socket": os.fspath(self.config.admin.socket),
            "store": store.stats() if store is not None else None,
            "recovery": recovery,
            "replication": self.repl.status() if self.repl is not None else None,
            "cluster": self.cluster.status() if self.cluster is not None else None,
            "proxy": self.forwarder.status() if self.forwarder is not None else None,
        }

    async def start(self) -> None:
        """Start the resources in order. On failure, stop what started and re-raise."""
        if self.state is not NodeState.STARTING:
            raise RuntimeError(f"node {self.name} cannot start from state {self.state.value}")
        log.info("node %s (%s) starting, pid %d", self.name, __version__, os.getpid())
        try:
            self.store = await self._open_store()
            ctx = AdminContext(store=self.store, node_name=self.name, status=self.status)
            if self.config.replication.enabled:
                rs = repl_settings(self.config)
                self.repl = Replicator(
                    self.store, rs, RoleHooks(self._start_services, self._stop_services)
                )
                ctx.repl = self.repl
                if self.config.cluster.enabled:
                    self.cluster = ClusterManager(
                        cluster_settings(self.config, rs.secret),
                        self.repl,
                        start_services=self._start_services,
                        stop_services=self._stop_services,
                    )
                    ctx.cluster = self.cluster
            self.admin = AdminServer(self.config.admin.socket, ctx)
            await self.admin.start()
            if self.repl is not None:
                # Starts the services if (and when) this node is primary (without a cluster
                # manager; with one, its decision loop promotes).
                await self.repl.start()
                if self.cluster is not None and self.store.barrier is not None:
                    # The ack gate: every acknowledged change crosses the barrier.
                    self.store.barrier = GatedBarrier(self.store.barrier, self.cluster)
                    # Proxy mode: a node starts secondary, so its mail ports forward to the
                    # primary until the decision loop promotes it.
                    self._routes = proxy_routes(self.config)
                    await self._start_forwarder(at_start=True)
                    await self.cluster.start()
            else:
                await self._start_services()
        except BaseException:
            await self._teardown()
            self.state = NodeState.STOPPED
            raise
        self.state = NodeState.RUNNING
        log.info("node %s running", self.name)

    async def _open_store(self) -> Store:
        """:func:`~mailharbor.offline.open_store`, retrying for up to :data:`LOCK_WAIT_SECONDS`
        while the data directory is locked by a process that is not a running node (see the
        module doc)."""
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        waiting = False
        while True:
            try:
                store = open_store(self.config)
            except StoreLocked as e:
                if time.monotonic() >= deadline or self._node_answers():
                    raise
                if not waiting:
                    waiting = True
                    log.warning("%s; waiting up to %.0f s for it", e, LOCK_WAIT_SECONDS)
                await asyncio.sleep(0.1)
                continue
            if waiting:
                log.info("data directory lock taken")
            return store

    def _node_answers(self) -> bool:
        """Does a node answer on this configuration's admin socket (then it holds the lock)?"""
        try:
            AdminClient(self.config.admin.socket, timeout=2).call("status")
        except (NodeNotRunning, AdminClientError, RequestError, OSError):
            return False
        return True

    async def stop(self) -> None:
        """Stop the resources in reverse order (idempotent)."""
        if self.state in (NodeState.STOPPING, NodeState.STOPPED):
            return
        self.state = NodeState.STOPPING
        log.info("node %s stopping (%s)", self.name, self._stop_reason or "stop requested")
        await self._teardown()
        self.state = NodeState.STOPPED
        log.info("node %s stopped", self.name)

    async def _start_services(self) -> None:
        """Listeners, then the queue runner (on a primary, or a standalone node)."""
        store = self.store
        if store is None:
            raise RuntimeError("the store is not open")
        await self._stop_forwarder()  # frees the mail ports for the listeners
        try:
            await self._start_listeners(store)
            await self._start_pop3(store)
            await self._start_imap(store)
            # Last resource: the outbound queue runner (started after fencing, in the cluster).
            self.queue = QueueRunner(
                store,
                self.config.queue,
                hostname=self.config.node.hostname,
                lease_ok=self.cluster.can_ack if self.cluster is not None else None,
            )
            self.queue.start()
        except BaseException:
            await self._stop_services()
            raise
        log.info("node %s serves clients", self.name)

    async def _stop_services(self) -> None:
        """The queue runner, then the listeners (gracefully), in reverse order."""
        if self.queue is not None:
            queue, self.queue = self.queue, None
            try:
                await queue.stop()
            except Exception:
                log.exception("stopping the queue runner failed")
        await self._stop_imap()
        await self._stop_pop3()
        await self._stop_listeners()
        if self.cluster is not None and self.state in (NodeState.STARTING, NodeState.RUNNING):
            await self._start_forwarder()  # a demoted node forwards to the new primary

    async def _start_forwarder(self, *, at_start: bool = False) -> None:
        """Proxy mode: forward the mail ports to the primary (on a node not serving). A failure
        at start propagates; later it is logged (the demotion goes on)."""
        if not self._routes or self.forwarder is not None or self.cluster is None:
            return
        c = self.config.cluster
        forwarder = Forwarder(
            self._routes,
            self.cluster.peer_serving,
            hostname=self.config.node.hostname,
            options=ForwardOptions(hold=c.proxy_hold, source=c.proxy_source),
        )
        try:
            await forwarder.start()
        except OSError as e:
            if at_start:
                raise
            log.error("proxy mode: cannot listen: %s", e)
            return
        self.forwarder = forwarder

    async def _stop_forwarder(self) -> None:
        if self.forwarder is not None:
            forwarder, self.forwarder = self.forwarder, None
            try:
                await forwarder.stop()
            except Exception:
                log.exception("stopping the forwarder failed")

    async def _teardown(self) -> None:
        if self.cluster is not None:
            # Demote (gracefully) while heartbeats and renewals go on, release the vote,
            # announce the shutdown to the peer.
            cluster, self.cluster = self.cluster, None
            try:
                await cluster.stop()
            except Exception:
                log.exception("leaving the cluster failed")
        await self._stop_forwarder()
        await self._stop_services()
        if self.repl is not None:
            repl, self.repl = self.repl, None
            if self.store is not None:
                # Writes in flight still need the peer's acknowledgement (protocol C).
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.store.settle(), repl.settings.ack_timeout)
            try:
                await repl.stop()
            except Exception:
                log.exception("stopping replication failed")
        if self.admin is not None:
            try:
                await self.admin.close()
            except Exception:
                log.exception("closing the admin server failed")
            self.admin = None
        if self.store is not None:
            store, self.store = self.store, None
            try:
                with contextlib.suppress(Exception):
                    await store.settle()
            finally:
                store.close()

    async def _start_listeners(self, store: Store) -> None:
        """Build the delivery service and start one listener per ``[smtp]`` endpoint."""
        cfg = self.config.smtp
        endpoints = [
            (kind, ep)
            for kind, eps in (
                (ListenerKind.MX, cfg.mx),
                (ListenerKind.SUBMISSION, cfg.submission),
                (ListenerKind.SUBMISSIONS, cfg.submissions),
                (ListenerKind.LMTP, cfg.lmtp),
            )
            for ep in eps
        ]
        if not endpoints:
            return
        maillog.configure(self.config.log.mail_log)
        tls = self._server_tls(offered="STARTTLS", needed_by=[*cfg.submission, *cfg.submissions])
        authenticator = self._authenticator(store)
        hostname = self.config.node.hostname
        services = SmtpServices(
            delivery=LocalDelivery(
                store,
                hostname,
                postmaster=cfg.postmaster,
                node_name=self.name,
                term=self.cluster.ack_term if self.cluster is not None else None,
            ),
            authenticator=authenticator,
            options=SmtpOptions(
                hostname=hostname,
                max_message_size=cfg.max_message_size,
                max_recipients=cfg.max_recipients,
                command_timeout=cfg.command_timeout,
                data_timeout=cfg.data_timeout,
                max_connections=cfg.max_connections,
                max_connections_per_client=cfg.max_connections_per_client,
                trusted_proxies=cfg.trusted_proxies,
                stop_grace=cfg.stop_grace,
                stream_threshold=cfg.stream_threshold,
                reverse_dns=cfg.reverse_dns,
                rdns_resolver=cfg.rdns_resolver,
                rdns_timeout=cfg.rdns_timeout,
            ),
            tls=tls,
        )
        for kind, ep in endpoints:
            listener = SmtpListener(kind, ep, services)
            await listener.start()
            self.listeners.append(listener)

    async def _start_pop3(self, store: Store) -> None:
        """Start one POP3 listener per ``[pop3]`` endpoint (after the SMTP listeners)."""
        cfg = self.config.pop3
        if not cfg.listen and not cfg.listen_tls:
            return
        tls = self._server_tls(offered="STLS", needed_by=cfg.listen_tls)
        authenticator = self._authenticator(store)
        services = Pop3Services(
            store=store,
            authenticator=authenticator,
            options=Pop3Options(
                hostname=self.config.node.hostname,
                allow_plaintext_auth=cfg.allow_plaintext_auth,
                timeout=cfg.timeout,
                max_connections=cfg.max_connections,
                max_connections_per_client=cfg.max_connections_per_client,
                trusted_proxies=cfg.trusted_proxies,
            ),
            tls=tls,
        )
        for ep, implicit in _endpoints(cfg.listen, cfg.listen_tls):
            listener = Pop3Listener(ep, services, implicit_tls=implicit)
            await listener.start()
            self.pop3_listeners.append(listener)

    async def _start_imap(self, store: Store) -> None:
        """Start one IMAP listener per ``[imap]`` endpoint (after the SMTP and POP3 ones)."""
        cfg = self.config.imap
        if not cfg.listen and not cfg.listen_tls:
            return
        tls = self._server_tls(offered="IMAP STARTTLS", needed_by=cfg.listen_tls)
        authenticator = self._authenticator(store)
        self.mailboxes = MailboxService(store)
        services = ImapServices(
            mailboxes=self.mailboxes,
            authenticator=authenticator,
            options=ImapOptions(
                hostname=self.config.node.hostname,
                allow_plaintext_auth=cfg.allow_plaintext_auth,
                idle_timeout=cfg.idle_timeout,
                login_timeout=cfg.login_timeout,
                max_line=cfg.max_line,
                max_literal=cfg.max_literal,
                max_connections=cfg.max_connections,
                max_connections_per_client=cfg.max_connections_per_client,
                max_connections_per_account=cfg.max_connections_per_account,
                trusted_proxies=cfg.trusted_proxies,
            ),
            tls=tls,
        )
        for ep, implicit in _endpoints(cfg.listen, cfg.listen_tls):
            listener = ImapListener(ep, services, implicit_tls=implicit)
            await listener.start()
            self.imap_listeners.append(listener)

    async def _stop_imap(self) -> None:
        listeners, self.imap_listeners = self.imap_listeners, []
        await _stop_all(listeners)
        if self.mailboxes is not None:
            mailboxes, self.mailboxes = self.mailboxes, None
            try:
                await mailboxes.drain()
            finally:
                mailboxes.hub.close()

    async def _stop_pop3(self) -> None:
        listeners, self.pop3_listeners = self.pop3_listeners, []
        await _stop_all(listeners)

    def _server_tls(self, *, offered: str, needed_by: Sequence[str] = ()) -> ssl.SSLContext | None:
        """The node's TLS server context (``[tls]``). A certificate that cannot be loaded is
        fatal (ConfigError, one clear line) when endpoints that cannot work without TLS are
        configured (``needed_by``: implicit TLS, or submission, where AUTH needs STARTTLS);
        otherwise it is logged and ``offered`` (STARTTLS, STLS) is not offered."""
        cert, key = self.config.tls.cert, self.config.tls.key
        try:
            return server_context(cert, key)
        except (OSError, ssl.SSLError) as e:
            why = (e.strerror if isinstance(e, OSError) else e.reason) or str(e)
            if needed_by:
                raise ConfigError(
                    "tls.cert",
                    f"{cert} / key {key} cannot be loaded ({why}); the endpoints "
                    f"{', '.join(needed_by)} need TLS",
                ) from None
            log.warning(
                "TLS certificate %s / key %s unusable (%s): %s not offered", cert, key, why, offered
            )
            return None

    def _authenticator(self, store: Store) -> Authenticator:
        """The node's one password checker, shared by the SMTP, POP3 and IMAP listeners (so the
        bound on concurrent checks and the cache are per node); closed with the SMTP ones."""
        if self.authenticator is None:

            def lookup(account: str) -> str | None:
                acct = store.index.account_by_address(account)
                return acct.password_hash if acct is not None else None

            self.authenticator = Authenticator(
                lookup,
                max_concurrent_checks=self.config.auth.max_concurrent_checks,
                cache_seconds=self.config.auth.cache_seconds,
            )
        return self.authenticator

    async def _stop_listeners(self) -> None:
        listeners, self.listeners = self.listeners, []
        await _stop_all(listeners)
        if self.authenticator is not None:
            self.authenticator.close()
            self.authenticator = None
        maillog.close()

    def request_stop(self, reason: str = "stop requested") -> None:
        """Ask :meth:`run` to stop the node (safe to call from a signal handler)."""
        if not self._stop_reason:
            self._stop_reason = reason
        if self._stop is not None:
            self._stop.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Start, serve until SIGTERM/SIGINT (if ``handle_signals``) or :meth:`request_stop`,
        stop. Start-up errors propagate after cleanup."""
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self.request_stop, f"{sig.name} received")
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.stop()
            for sig in signals:
                loop.remove_signal_handler(sig)


def run_node(config: Config) -> None:
    """Run a node for ``config`` in this process until SIGTERM/SIGINT. Raises what
    :meth:`Node.start` raises."""
    asyncio.run(Node(config).run())
