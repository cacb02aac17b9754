"""Protocols A and B between two real ``mailharbor serve`` processes (C: test_repl_nodes.py).

- A and B replicate: every message that got a ``250`` on the primary is on the secondary after a
  clean stop of the primary and a promotion of the secondary (read back over POP3 there).
- B acknowledges on the peer's *receipt*: the secondary runs under ``strace`` with a delay
  injected into every ``fsync``/``fdatasync`` of its log segments, so its durable LSN stays
  behind for seconds. Under B the ``250`` comes at once and, at that moment, the primary's
  ``repl status`` shows the peer's received LSN at the message and its durable LSN still
  before it; under C (the control, same setup) the ``250`` waits for the delayed fsync.

The pair, the load and the checks come from test_repl_nodes.py.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from fault.disks import strace_unavailable_reason, unavailable
from servenode import MAILHARBOR, ServeNode
from test_repl_nodes import (
    Pair,
    in_sync,
    pop3_message_ids,
    refuses,
    send,
    status,
    wait_for,
)

#: The delay injected into each fsync/fdatasync of the secondary's log (microseconds).
FSYNC_DELAY_US = 1_500_000


def make_pair(request: pytest.FixtureRequest, protocol: str) -> Iterator[Pair]:
    name = "".join(c for c in request.node.name if c.isalnum())
    tag = f"p{protocol}" + name[-14:] + secrets.token_hex(2)
    p = Pair(tag, protocol=protocol)
    try:
        p.start()
        yield p
    except BaseException:
        for name, n in p.nodes.items():
            print(f"=== log of {name}\n{n.log[-8000:]}")
        raise
    finally:
        p.cleanup()


@pytest.fixture(params=["A", "B"])
def pair_ab(request: pytest.FixtureRequest) -> Iterator[Pair]:
    yield from make_pair(request, str(request.param))


@pytest.mark.slow
def test_acknowledged_mail_survives_clean_stop_and_promotion(pair_ab: Pair) -> None:
    pair = pair_ab
    protocol = status(pair.a)["protocol"]
    assert protocol in ("A", "B") and status(pair.b)["protocol"] == protocol
    acked = []
    for i in range(12):
        mid = f"{protocol}-{i}@t.test"
        assert send(pair.smtp["a"], mid, 500 + 9_000 * i)
        acked.append(mid)
    # The secondary follows the live stream (checked by LSN and by digests).
    wait_for(lambda: in_sync(pair.a, pair.b), 20, "in sync")
    r = pair.a.try_cli("repl", "verify")
    assert r.returncode == 0 and "0 mismatch" in r.stdout, r.stdout + r.stderr
    # More mail, then a clean stop right after the last 250 (no waiting for the peer here).
    for i in range(12, 20):
        mid = f"{protocol}-{i}@t.test"
        assert send(pair.smtp["a"], mid, 2_000)
        acked.append(mid)
    pair.a.stop()
    wait_for(lambda: status(pair.b)["connection"] != "Connected", 10, "B sees A gone")
    st = status(pair.b)
    assert st["durable_lsn"] > 0 and st["role"] == "Secondary", st
    r = pair.b.try_cli("repl", "primary")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not refuses(pair.pop3["b"]), 10, "POP3 on B")
    assert sorted(pop3_message_ids(pair.pop3["b"])) == sorted(acked)


# --- protocol B acknowledges on receipt ---------------------------------------------------------


class SlowFsync:
    """``mailharbor serve`` of ``node`` under strace, every fsync/fdatasync of its log segments
    delayed by FSYNC_DELAY_US (other files, e.g. the replication metadata, are not delayed)."""

    def __init__(self, node: ServeNode) -> None:
        self.node = node
        self.strace: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        reason = strace_unavailable_reason()
        if reason is not None:
            unavailable(reason)
        logdir = self.node.root / "data" / "log"
        segments = sorted(str(p) for p in logdir.glob("segment-*.log"))
        assert segments, "the secondary has no log segment yet"
        cmd = ["strace", "-f", "--seccomp-bpf", "-qq", "-o", "/dev/null"]
        cmd += ["-e", "trace=fsync,fdatasync"]
        cmd += ["-e", f"inject=fsync,fdatasync:delay_enter={FSYNC_DELAY_US}"]
        for seg in segments:
            cmd += ["-P", os.path.realpath(seg)]
        cmd += ["--", str(MAILHARBOR), "serve", "--config", str(self.node.config)]
        log = open(self.node.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.node._log = log
        self.strace = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        self.node.proc = self.strace  # status polling; signals go to the tracee (serve_pid)
        self.node.wait_admin(time.monotonic() + 60)

    def serve_pid(self) -> int | None:
        assert self.strace is not None
        for task in Path(f"/proc/{self.strace.pid}/task").glob("*"):
            children = (task / "children").read_text().split()
            if children:
                return int(children[0])
        return None

    def stop(self) -> None:
        if self.strace is None or self.strace.poll() is not None:
            return
        pid = self.serve_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
        try:
            self.strace.wait(30)
        except subprocess.TimeoutExpired:
            if (pid := self.serve_pid()) is not None:
                os.kill(pid, signal.SIGKILL)
            self.strace.kill()
            self.strace.wait(10)
        self.node.proc = None
        self.node.stop()  # closes the log file


def established(primary: ServeNode, secondary: ServeNode) -> bool:
    """Both sides of the link in the live stream, the secondary UpToDate (after a reconnect
    with nothing new, the primary has no ack yet: ``in_sync`` needs one more write)."""
    p, s = status(primary), status(secondary)
    return bool(
        p["replication"] == s["replication"] == "Established"
        and s["disk"] == "UpToDate"
        and s["durable_lsn"] == p["last_lsn"]
    )


@pytest.fixture(params=["B", "C"])
def slow_pair(request: pytest.FixtureRequest) -> Iterator[tuple[Pair, SlowFsync]]:
    yield from _slow_pair(request, str(request.param))


def _slow_pair(request: pytest.FixtureRequest, protocol: str) -> Iterator[tuple[Pair, SlowFsync]]:
    for pair in make_pair(request, protocol):
        a, b = pair.a, pair.b
        assert send(pair.smtp["a"], "warm@t.test", 300)
        wait_for(partial(in_sync, a, b), 20, "in sync")
        b.stop()
        slow = SlowFsync(b)
        try:
            slow.start()
            wait_for(partial(established, a, b), 30, "the slow secondary connected")
            yield pair, slow
        finally:
            slow.stop()


@pytest.mark.slow
def test_protocol_b_acknowledges_on_receipt_c_on_fsync(
    slow_pair: tuple[Pair, SlowFsync],
) -> None:
    pair, _slow = slow_pair
    protocol = status(pair.a)["protocol"]
    delay = FSYNC_DELAY_US / 1e6
    before = status(pair.a)["last_lsn"]
    t0 = time.monotonic()
    assert send(pair.smtp["a"], f"{protocol}-slow@t.test", 1_000)
    took = time.monotonic() - t0
    st = status(pair.a)
    lsn = st["last_lsn"]
    assert lsn > before
    if protocol == "B":
        # The 250 did not wait for the secondary's (delayed) fsync: it had received the frame,
        # and had not made it durable yet.
        assert took < delay / 2, f"250 after {took:.2f} s"
        assert st["peer_received_lsn"] >= lsn, st
        assert st["peer_durable_lsn"] < lsn, st
    else:
        # C: the 250 means the secondary fsynced the frame.
        assert took >= delay * 0.9, f"250 after {took:.2f} s"
        assert st["peer_durable_lsn"] >= lsn, st
    wait_for(lambda: in_sync(pair.a, pair.b), 3 * delay + 10, "the secondary's fsync")


@pytest.fixture
def slow_pair_b(request: pytest.FixtureRequest) -> Iterator[tuple[Pair, SlowFsync]]:
    yield from _slow_pair(request, "B")


@pytest.mark.slow
def test_protocol_b_frames_received_survive_the_primary_crash(
    slow_pair_b: tuple[Pair, SlowFsync],
) -> None:
    """B's promise: a write acknowledged on the peer's receipt is lost only if both nodes fail.
    The secondary's fsync is slow, so the second message waits in its ingest queue, received
    and acknowledged but not yet written, when the primary is killed: it must still be
    written and be there after the promotion."""
    pair, _slow = slow_pair_b
    acked = []
    for i in range(3):
        mid = f"crash-{i}@t.test"
        assert send(pair.smtp["a"], mid, 1_000)
        acked.append(mid)
    st = status(pair.a)
    assert st["peer_durable_lsn"] < st["last_lsn"] <= st["peer_received_lsn"], st
    pair.a.kill()
    wait_for(lambda: status(pair.b)["connection"] != "Connected", 10, "B sees the loss")
    delay = FSYNC_DELAY_US / 1e6
    wait_for(lambda: status(pair.b)["durable_lsn"] >= st["last_lsn"], 6 * delay + 10, "ingest")
    r = pair.b.try_cli("repl", "primary")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not refuses(pair.pop3["b"]), 10, "POP3 on B")
    ids = pop3_message_ids(pair.pop3["b"])
    assert sorted(ids) == sorted(["warm@t.test", *acked])
