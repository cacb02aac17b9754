"""The store of a configuration opened in this process: for a node, and for a CLI command run
while no node runs.

:func:`open_store` is how every process opens a node's store (options from ``[store]``, the
recovery report logged). :func:`run_offline` runs one admin request on it in-process — the same
handlers a running node serves on its admin socket, so direct and served commands behave the
same. This module loads the store, the configuration and the admin handlers only: a CLI command
on a stopped node does not pay for the listeners, the replicator or TLS (``node.py`` imports
those).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from mailharbor.admin.protocol import Request, Response
from mailharbor.admin.server import AdminContext, execute
from mailharbor.config import Config
from mailharbor.store import Store, StoreOptions

__all__ = ["open_store", "run_offline", "store_options"]

log = logging.getLogger("mailharbor.node")


def store_options(config: Config) -> StoreOptions:
    """The store tunables of ``config``."""
    s = config.store
    return StoreOptions(
        segment_bytes=s.segment_bytes,
        cache_bytes=s.cache_bytes,
        checkpoint_every_bytes=s.checkpoint_every_bytes,
        chunk_bytes=s.chunk_bytes,
        sync=s.sync,
    )


def open_store(config: Config) -> Store:
    """Open the store of ``config`` (lock + recovery) and log the recovery report.

    Must be called on the thread that will own the store. Raises StoreError (StoreLocked when
    another process holds the data directory) and OSError.
    """
    data_dir = os.fspath(config.node.data_dir)
    store = Store.open(
        data_dir,
        node_id=config.node.node_id,
        options=store_options(config),
        # Replicated: a damaged frame in the middle of the log is cut away (kept aside) and
        # the range fetched from the peer (docs/replication.md); standalone: refused (fsck).
        damaged_tail_dir=(
            os.path.join(data_dir, "quarantine") if config.replication.enabled else None
        ),
    )
    r = store.recovery
    if r is not None:
        # The store itself warns about a dropped torn tail and an unusable checkpoint.
        notes = []
        if r.torn_tail is not None:
            notes.append(f"torn tail of {r.torn_tail.bytes_dropped} bytes dropped")
        if r.checkpoint_rejected:
            notes.append("a checkpoint was not usable")
        log.info(
            "store %s opened: checkpoint at LSN %d, %d frame(s) replayed, last LSN %d, %.3f s%s",
            config.node.data_dir,
            r.checkpoint_lsn,
            r.replayed_frames,
            r.last_lsn,
            r.seconds,
            f" ({'; '.join(notes)})" if notes else "",
        )
    return store


def run_offline(config: Config, request: Request) -> Response:
    """Run one admin request on the store of ``config`` opened in this process (no node runs).

    Raises what opening the store raises (StoreLocked when the data directory is in use); every
    other failure is in the returned Response.
    """

    async def go() -> Response:
        store = open_store(config)
        try:
            ctx = AdminContext(
                store=store,
                node_name=config.node.name,
                status=lambda: {"node": config.node.name, "state": "offline"},
            )
            response = await execute(ctx, request)
            with contextlib.suppress(Exception):
                await store.settle()
            return response
        finally:
            store.close()

    return asyncio.run(go())
