"""What every mail listener (SMTP/LMTP, IMAP, POP3) does with a new connection before its
protocol starts: track the session task until the socket is closed, and find the client's address
(the peer's, or the one a trusted proxy's PROXY v2 header names).

Invariants
----------
- A session task stays in its listener's task set until its socket is closed, so the listener's
  ``stop()`` awaits (or cancels) it and no task outlives ``stop()``.
- An exception escaping a session is logged with its traceback, never sent to the client.
- A trusted peer must send a valid PROXY v2 header; without one the connection is refused
  (:func:`client_address` returns None and the caller closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable

from mailharbor.proto.proxy import ProxyError
from mailharbor.server.proxy import TrustedProxies, read_proxy_header

__all__ = ["PROXY_TIMEOUT", "client_address", "run_tracked"]

PROXY_TIMEOUT = 10.0
"""Seconds a trusted proxy has to send its whole PROXY v2 header."""


async def run_tracked(
    tasks: set[asyncio.Task[None]],
    session: Awaitable[None],
    writer: asyncio.StreamWriter,
    log: logging.Logger,
    what: str,
) -> None:
    """Run ``session`` as the current task, registered in ``tasks`` until ``writer`` is closed."""
    task = asyncio.current_task()
    assert task is not None
    tasks.add(task)
    try:
        await session
    except Exception:
        log.exception("%s session failed", what)
    finally:
        try:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)
        finally:
            tasks.discard(task)


async def client_address(
    writer: asyncio.StreamWriter,
    trusted: TrustedProxies,
    log: logging.Logger,
    *,
    peer: str,
    implicit_tls: bool,
) -> str | None:
    """The client's address: ``peer``, or, when ``peer`` is a trusted proxy, the source its PROXY
    v2 header names (the proxy's own address for a LOCAL header). None: a trusted peer sent no
    valid header in time; logged, the caller closes.

    An implicit-TLS listener leaves reading paused: ``start_tls`` resumes it, so a ClientHello
    in the same segment as the header goes to the TLS layer."""
    if not trusted.is_trusted(peer):
        return peer
    try:
        header = await read_proxy_header(writer, PROXY_TIMEOUT, resume=not implicit_tls)
    except (ProxyError, TimeoutError, asyncio.IncompleteReadError, OSError) as e:
        log.warning("refused %s: bad PROXY header (%s)", peer, type(e).__name__)
        return None
    return header.source[0] if header.source is not None else peer
