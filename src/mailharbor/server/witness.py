"""The witness daemon: ``cluster.witness.Witness`` behind a UDP socket, state fsynced per reply.

Theory of operation
-------------------
One process serves the witnesses of one or more pairs (``[[pair]]`` tables of its TOML file).
A request datagram names its pair in the clear (the 16-byte cluster id at offset 8, inside the
MAC); the daemon hands it to that pair's :class:`~mailharbor.cluster.witness.Witness`, which
checks the MAC, the sender and the request's ``(incarnation, seq)`` and returns a ``Step``.

**Durable before the reply.** For every accepted request the daemon writes the pair's whole
state (``Step.state``) with :func:`mailharbor.store.fsio.write_atomic` (temporary file, fsync,
rename, directory fsync) and only then sends ``Step.reply``. A grant the node has seen is
therefore on disk; a grant that was computed but not stored was never sent. If a write fails
(full or broken disk) the daemon stops answering altogether and exits with status 1: a witness
that cannot store its grants must not grant (fsio's rule: a failed fsync is never retried).

**Restart.** On start every pair's state file is read; ``Witness.restore`` counts the recorded
holder as having renewed just now, so nobody else gets the vote within ``lease + margin`` of
the restart, and the persisted per-node request high-water marks make a replay of recorded
requests useless across restarts. A state file that does not decode (wrong checksum, truncated)
stops the start: the operator decides (delete it only if both nodes are known stopped).

Why UDP, not TCP: the protocol is already datagram-shaped (fixed-size, MACed, idempotent by
sequence number, each request answered at most once) and the lease is counted from the send,
so a lost datagram is just a missed renewal (renewals go every ``renew_interval``; three in a
row must be lost before a holder stops). TCP would add connection set-up after every witness
restart or network blip and kernel retransmissions that deliver a request seconds late, and
keeps no property the lease needs.

Invariants:

* a reply leaves only after the state it reflects is durable (``write_atomic`` returned);
* requests are handled one at a time, in arrival order (one event loop, synchronous handling:
  the fsync blocks the loop on purpose — the witness does nothing else);
* a refused request (bad MAC, unknown pair or node, replay) gets no reply and changes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mailharbor.cluster.witness import REQUEST_SIZE, Witness, WitnessError
from mailharbor.config import ConfigError, parse_duration
from mailharbor.server.listener import split_endpoint
from mailharbor.store.fsio import write_atomic

__all__ = [
    "PairSettings",
    "WitnessServer",
    "WitnessSettings",
    "cluster_id",
    "load_witness_config",
]

log = logging.getLogger("mailharbor.witness")

#: Offset of the cluster id in a request (magic 4, version 1, kind 1, flags 2).
_CLUSTER_AT = 8


def cluster_id(name: str) -> bytes:
    """The 16-byte cluster id of a pair named ``name`` (nodes' ``cluster.name``)."""
    return hashlib.blake2b(name.encode(), digest_size=16, person=b"mh-cluster-id").digest()


@dataclass(frozen=True)
class PairSettings:
    name: str
    nodes: tuple[bytes, bytes]
    secret: bytes


@dataclass(frozen=True)
class WitnessSettings:
    listen: str
    state_dir: Path
    pairs: tuple[PairSettings, ...]
    min_margin: float = 0.0
    log_level: str = "info"


def _read_secret(key: str, path: Path) -> bytes:
    try:
        lines = path.read_text("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(key, f"cannot read {path}: {e}") from None
    s = lines[0].strip() if lines else ""
    if not 16 <= len(s) <= 256 or not s.isprintable():
        raise ConfigError(key, f"{path}: the first line must be 16 to 256 printable characters")
    return s.encode()


def load_witness_config(path: str | os.PathLike[str]) -> WitnessSettings:
    """Read the witness's TOML file (see docs/cluster.md, "The witness daemon").

    Raises :class:`ConfigError` naming the key."""
    p = Path(path).absolute()
    try:
        data = tomllib.loads(p.read_text("utf-8"))
    except OSError as e:
        raise ConfigError("", f"cannot read: {e.strerror or e}", source=str(p)) from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError("", f"invalid TOML: {e}", source=str(p)) from None
    try:
        return _parse(data, p.parent)
    except ConfigError as e:
        raise e.with_source(str(p)) from None


def _parse(data: dict[str, object], base: Path) -> WitnessSettings:
    known = {"listen", "state_dir", "min_margin", "log_level", "pair"}
    for k in data:
        if k not in known:
            raise ConfigError(k, f"unknown key (known: {', '.join(sorted(known))})")
    listen = data.get("listen")
    if not isinstance(listen, str) or ":" not in listen:
        raise ConfigError("listen", 'required: "host:port" of the UDP socket')
    state_dir = data.get("state_dir", "witness-state")
    if not isinstance(state_dir, str) or not state_dir:
        raise ConfigError("state_dir", "expected a directory path")
    raw_margin = data.get("min_margin", 0)
    try:
        if not isinstance(raw_margin, int | float | str) or isinstance(raw_margin, bool):
            raise ValueError(raw_margin)
        min_margin = parse_duration(raw_margin)
    except ValueError:
        raise ConfigError("min_margin", f"expected a duration, got {raw_margin!r}") from None
    level = data.get("log_level", "info")
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log_level", "one of debug, info, warning, error")
    raw_pairs = data.get("pair")
    if not isinstance(raw_pairs, list) or not raw_pairs:
        raise ConfigError("pair", "at least one [[pair]] table is required")
    pairs: list[PairSettings] = []
    for i, rp in enumerate(raw_pairs):
        key = f"pair[{i}]"
        if not isinstance(rp, dict):
            raise ConfigError(key, "expected a table")
        for k in rp:
            if k not in ("name", "nodes", "secret", "secret_file"):
                raise ConfigError(f"{key}.{k}", "unknown key (name, nodes, secret, secret_file)")
        name = rp.get("name")
        if not isinstance(name, str) or not name or not name.isprintable():
            raise ConfigError(f"{key}.name", "required: the pair's cluster.name")
        nodes = rp.get("nodes")
        try:
            if not isinstance(nodes, list) or len(nodes) != 2:
                raise ValueError
            ids = tuple(bytes.fromhex(str(n)) for n in nodes)
            if any(len(x) != 16 for x in ids) or ids[0] == ids[1]:
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"{key}.nodes", "two distinct node ids (32 hex digits each, node.node_id)"
            ) from None
        secret = rp.get("secret", "")
        sfile = rp.get("secret_file", "")
        if isinstance(secret, str) and 16 <= len(secret) <= 256:
            sec = secret.encode()
        elif secret == "" and isinstance(sfile, str) and sfile:
            sec = _read_secret(f"{key}.secret_file", base / Path(sfile).expanduser())
        else:
            raise ConfigError(
                f"{key}.secret",
                "16 to 256 characters (or secret_file), as the nodes' cluster secret",
            )
        if any(x.name == name for x in pairs):
            raise ConfigError(f"{key}.name", f"pair {name!r} twice")
        pairs.append(PairSettings(name, (ids[0], ids[1]), sec))
    return WitnessSettings(listen, base / state_dir, tuple(pairs), min_margin, str(level))


class WitnessServer(asyncio.DatagramProtocol):
    """The daemon's socket and witnesses (see the module docstring)."""

    def __init__(
        self, settings: WitnessSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.witnesses: dict[bytes, tuple[PairSettings, Witness, Path]] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.failed: asyncio.Event = asyncio.Event()
        self.failure = ""
        self.handled = 0
        self.refused = 0

    def state_path(self, pair: PairSettings) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in pair.name)
        return self.settings.state_dir / f"{safe}.state"

    def restore(self) -> None:
        """Load every pair's durable state (a fresh witness when there is none)."""
        os.makedirs(self.settings.state_dir, mode=0o700, exist_ok=True)
        now = self.clock()
        for pair in self.settings.pairs:
            path = self.state_path(pair)
            try:
                raw: bytes | None = path.read_bytes()
            except FileNotFoundError:
                raw = None
            try:
                w = Witness.restore(
                    cluster_id(pair.name),
                    pair.nodes,
                    pair.secret,
                    raw,
                    now,
                    min_margin=self.settings.min_margin,
                )
            except WitnessError as e:
                raise ConfigError(
                    "state_dir", f"{path}: unusable witness state ({e}); not starting"
                ) from None
            st = w.state
            log.info(
                "witness: pair %s: term %d, holder %s%s",
                pair.name,
                st.term,
                st.owner.hex() if st.owner else "none",
                f", outdated {', '.join(n.hex() + '@' + str(g) for n, g in st.outdated)}"
                if st.outdated
                else "",
            )
            self.witnesses[cluster_id(pair.name)] = (pair, w, path)

    async def start(self) -> None:
        self.restore()
        host, port = split_endpoint(self.settings.listen)
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=(host or "0.0.0.0", port))
        log.info(
            "witness listening on udp %s for %d pair(s)", self.settings.listen, len(self.witnesses)
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport.
        self.transport = typing.cast(asyncio.DatagramTransport, transport)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if self.failed.is_set() or self.transport is None:
            return
        if len(data) != REQUEST_SIZE:
            self.refused += 1
            return
        entry = self.witnesses.get(bytes(data[_CLUSTER_AT : _CLUSTER_AT + 16]))
        if entry is None:
            self.refused += 1
            log.debug("witness: request for an unknown pair from %s", addr)
            return
        pair, w, path = entry
        old_owner, old_term = w.state.owner, w.state.term
        try:
            step = w.handle(bytes(data), self.clock())
        except WitnessError as e:
            self.refused += 1
            log.debug("witness: pair %s: request from %s refused: %s", pair.name, addr, e)
            return
        try:
            write_atomic(os.fspath(path), step.state)
        except OSError as e:
            self.failure = f"cannot store the state of pair {pair.name} in {path}: {e}"
            log.error("witness: %s: no more answers, exiting", self.failure)
            self.failed.set()
            return
        self.transport.sendto(step.reply, addr)
        self.handled += 1
        st = w.state
        if st.owner != old_owner or st.term != old_term:
            log.info(
                "witness: pair %s: vote %s (term %d) after %s from %s",
                pair.name,
                f"granted to {st.owner.hex()}" if st.owner else "free",
                st.term,
                step.decoded.kind.name,
                step.decoded.node.hex(),
            )
        elif step.answer.status.name != "OK":
            log.debug(
                "witness: pair %s: %s from %s -> %s",
                pair.name,
                step.decoded.kind.name,
                step.decoded.node.hex(),
                step.answer.status.name,
            )


async def serve(settings: WitnessSettings, stop: asyncio.Event) -> str:
    """Run until ``stop`` is set (returns "") or the state cannot be stored (returns why)."""
    server = WitnessServer(settings)
    await server.start()
    try:
        waiters = [
            asyncio.ensure_future(stop.wait()),
            asyncio.ensure_future(server.failed.wait()),
        ]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for t in waiters:
            t.cancel()
    finally:
        server.close()
    return server.failure
