"""Delay on the replication link: a userspace TCP forwarder between the two nodes (tc netem is
not available here) holds every byte for ``DELAY`` seconds in each direction. (The forwarder
can also cut the link: test_repl_fencing uses it with no delay.)

Both nodes reach their peer only through a forwarder (each node's ``replication.peer`` is a
forwarder's port), so whichever connection the pair keeps is delayed. In protocol C a ``250``
needs the frame to reach the peer and its fsync ack to come back: at least two delays, so the
median time from DATA to ``250`` is at least ``2 * DELAY``. In protocol A the ``250`` follows
the local fsync: the median stays below one delay. In both, the secondary ends with every
frame (``repl verify`` clean).
"""

from __future__ import annotations

import asyncio
import random
import secrets
import smtplib
import statistics
import threading
import time
from collections.abc import Iterator

import pytest

from servenode import free_port
from test_repl_nodes import USER, Pair, in_sync, message, print_logs, status, wait_for

DELAY = 0.15  # seconds, each direction
SEED = 4242


class DelayForwarder:
    """Accepts on ``port`` and forwards to ``127.0.0.1:upstream`` (set before the first
    connection); each chunk is written ``delay`` seconds after it was read, in order, both
    ways. Runs its own event loop in a thread."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.port = free_port()
        self.upstream = 0
        self.connections = 0
        self.refusing = False  # cut(): connections are dropped and new ones closed at once
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()

    async def _accept(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if self.refusing:
            w.close()
            return
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            w.close()
            return
        self.connections += 1
        for src, dst in ((r, uw), (ur, w)):
            t = asyncio.get_running_loop().create_task(self._pipe(src, dst))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def writer() -> None:
            while True:
                due, data = await q.get()
                if not data:
                    break
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                dst.write(data)
                await dst.drain()
            dst.close()

        wt = loop.create_task(writer())
        try:
            while True:
                data = await src.read(1 << 16)
                q.put_nowait((loop.time() + self.delay, data))
                if not data:
                    break
            await wt
        except (OSError, asyncio.CancelledError):
            wt.cancel()
            dst.close()

    def cut(self) -> None:
        """Drop every forwarded connection and close new ones at once, until :meth:`heal`."""

        async def drop() -> None:
            self.refusing = True
            for t in list(self._tasks):
                t.cancel()

        asyncio.run_coroutine_threadsafe(drop(), self._loop).result(10)

    def heal(self) -> None:
        self.refusing = False

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for t in list(self._tasks):
                t.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(params=["C", "A"])
def delayed(request: pytest.FixtureRequest) -> Iterator[tuple[Pair, str]]:
    # Every connection between the nodes goes through a forwarder: each node's peer address
    # is one.
    to_b, to_a = DelayForwarder(DELAY), DelayForwarder(DELAY)
    protocol = str(request.param)
    p = Pair(
        f"delay{protocol}{secrets.token_hex(3)}",
        protocol=protocol,
        peer_ports={"a": to_b.port, "b": to_a.port},
    )
    to_b.upstream, to_a.upstream = p.repl["b"], p.repl["a"]
    try:
        p.a.start()
        p.b.start(wait_ports=False)
        wait_for(lambda: in_sync(p.a, p.b), 30, "B in sync through the delayed link")
        assert to_b.connections + to_a.connections >= 1
        yield p, protocol
        print_logs(p.nodes, 6000)  # shown for a failed test
    finally:
        p.cleanup()
        to_b.close()
        to_a.close()


def _timed_data(port: int, mid: str, size: int) -> float:
    """Seconds from DATA to the ``250`` (the envelope is sent before the clock starts)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("delay.test")
        c.mail("x@remote.test")
        c.rcpt(USER)
        t0 = time.monotonic()
        code, _ = c.data(message(mid, size))
        dt = time.monotonic() - t0
        assert code == 250
        return dt


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_protocol_c_waits_for_the_delayed_peer_protocol_a_does_not(
    delayed: tuple[Pair, str],
) -> None:
    pair, protocol = delayed
    rnd = random.Random(SEED)
    print(f"seed {SEED}, protocol {protocol}, delay {DELAY} s each way")
    lat = [
        _timed_data(
            pair.smtp["a"], f"dl{i}-{protocol}-{SEED}@delay.test", rnd.randrange(500, 20_000)
        )
        for i in range(12)
    ]
    p50 = statistics.median(lat)
    print(f"protocol {protocol}: 250 latency p50 {p50 * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms")
    if protocol == "C":
        # the frame to the peer (one delay) and its fsync ack back (another)
        assert p50 >= 2 * DELAY, lat
        assert min(lat) >= 2 * DELAY * 0.95, lat
    else:
        assert p50 < DELAY, lat
    # Nothing lost: the secondary has every frame, with the same digests.
    wait_for(lambda: in_sync(pair.a, pair.b), 30, "B has everything")
    assert status(pair.b)["durable_lsn"] == status(pair.a)["last_lsn"]
    r = pair.a.try_cli("repl", "verify")
    assert r.returncode == 0 and "0 mismatch" in r.stdout, r.stdout + r.stderr
