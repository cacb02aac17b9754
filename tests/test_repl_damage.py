"""A corrupt range found at open on a replicated node: marked Inconsistent and fetched from the
peer instead of being salvaged away (two real ``mailharbor serve`` processes).

The secondary is killed (no checkpoint at close, so its next open replays the log and reads
every frame), the primary stopped cleanly; bytes of a frame in the middle of the secondary's
log are flipped. Restarted alone, the secondary opens with its log cut before the damaged
frame (the raw bytes kept in quarantine), disk Inconsistent, and refuses promotion. When the
primary returns, the secondary fetches the range, ends UpToDate with the same logical digest
(``repl verify`` clean), and after a failover to it every acknowledged message is there.
"""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailharbor.store import format as fmt
from mailharbor.store.fsio import OsFileSystem
from mailharbor.store.log import list_segments, scan_segment, segment_path
from test_repl_nodes import Pair, in_sync, pop3_message_ids, print_logs, send, status, wait_for

SEED = 7305


@pytest.fixture
def dpair() -> Iterator[Pair]:
    # No checkpoint is written while running (the minimum is 1 MiB; the test writes less).
    p = Pair(f"dmg{secrets.token_hex(3)}", store={"checkpoint_every_bytes": "64MiB"})
    try:
        p.start()
        yield p
        print_logs(p.nodes)  # shown for a failed test
    finally:
        p.cleanup()


def _corrupt_middle_frame(data_dir: Path, rnd: random.Random) -> int:
    """Flip a byte in the payload of a frame in the middle of the log; its LSN."""
    fs = OsFileSystem()
    logdir = str(data_dir / "log")
    frames: list[tuple[int, int, int]] = []
    expected = 1
    for s in list_segments(fs, logdir):
        it, stops = scan_segment(fs, segment_path(logdir, s), s, fmt.SEGMENT_HEADER_SIZE, expected)
        for fr in it:
            if fr.header.payload_len > 8:
                frames.append(
                    (s, fr.payload_offset + rnd.randrange(fr.header.payload_len), fr.header.lsn)
                )
            expected += fr.lsn_count
        assert not stops
    segno, pos, lsn = frames[len(frames) // 2 + rnd.randrange(len(frames) // 4)]
    assert lsn < expected - 3, "valid frames must follow the damaged one"
    with open(segment_path(logdir, segno), "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xA5]))
    return lsn


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_corrupt_range_at_open_is_fetched_from_the_peer(dpair: Pair) -> None:
    rnd = random.Random(SEED)
    print(f"seed {SEED}")
    a, b = dpair.a, dpair.b
    acked = [f"d{i}-{SEED}@dmg.test" for i in range(24)]
    for mid in acked:
        assert send(dpair.smtp["a"], mid, rnd.randrange(300, 6000))
    wait_for(lambda: in_sync(a, b), 20, "B in sync")
    last = status(a)["last_lsn"]
    b.kill()  # no checkpoint at close: B's next open replays (and checks) the whole log
    a.stop()
    bad = _corrupt_middle_frame(b.root / "data", rnd)

    # B alone: the damaged range is cut away (kept in quarantine), Inconsistent, unpromotable.
    b.start(wait_ports=False)
    st = status(b)
    assert st["disk"] == "Inconsistent", st
    assert st["damaged_after_lsn"] == bad - 1 and st["last_lsn"] == bad - 1, (st, bad)
    assert "damaged frame in the log" in b.log
    kept = list((b.root / "data" / "quarantine").glob(f"damaged-*-after-{bad - 1}/*"))
    assert kept and sum(os.path.getsize(p) for p in kept) > 0
    r = b.try_cli("repl", "primary")
    assert r.returncode != 0 and "UpToDate" in (r.stderr + r.stdout), r

    # A back: B fetches the range from it and ends UpToDate with the same log.
    a.start()
    wait_for(lambda: in_sync(a, b), 30, "B fetched the damaged range from A")
    st = status(b)
    assert st["damaged_after_lsn"] is None and st["last_lsn"] >= last, st
    assert "rule:history-is-prefix" in b.log
    more = [f"m{i}-{SEED}@dmg.test" for i in range(3)]
    for mid in more:
        assert send(dpair.smtp["a"], mid, 2000)
    wait_for(lambda: in_sync(a, b), 20, "B follows the live stream")
    r = a.try_cli("repl", "verify")
    assert r.returncode == 0 and "0 mismatch" in r.stdout, r.stdout + r.stderr

    # Failover to B: every acknowledged message is there, once.
    a.stop()
    wait_for(lambda: status(b)["connection"] != "Connected", 20, "B sees A gone")
    b.cli("repl", "primary")
    wait_for(lambda: status(b)["role"] == "Primary", 20, "B promoted")
    wait_for(
        lambda: sorted(pop3_message_ids(dpair.pop3["b"])) == sorted(acked + more), 30, "mail on B"
    )
