"""Full sync (snapshot transfer) between two back-to-back sessions on a fake clock."""

from __future__ import annotations

import dataclasses
import struct

from mailharbor.repl import session as S
from mailharbor.repl import wire as W
from mailharbor.repl.state import DiskState, Role

from . import A, B, FakeClock, FakeNode, Link, frame, gen, log_of, pair, view


class SnapLink(Link):
    """A Link whose fake adapters also export, receive and install snapshots.

    The source's snapshot is one segment file holding its frames up to its last LSN and a small
    checkpoint file; the target rebuilds its log from the received segment bytes (frame by
    frame, through ``peek_frame``), so the test sees what actually crossed the wire."""

    def __init__(self, a: FakeNode, b: FakeNode) -> None:
        super().__init__(a, b)
        self.files: dict[int, list[tuple[str, bytes]]] = {}
        self.received: dict[int, dict[str, bytearray]] = {}
        self.hold_writes: dict[int, list[S.SnapshotChunk]] = {}
        self.installed: list[int] = []
        self.kept_id = b""  # the source's snapshot id (kept across links by the test)

    def handle(self, n: FakeNode, ev: S.Event) -> None:
        s = n.session
        key = id(n)
        if isinstance(ev, S.NeedSnapshot):
            n.seen.append(ev)
            seg = b"".join(n.log)
            files = [("segment-00000001.log", seg), ("checkpoint-1.ckpt", b"ck" * 10)]
            self.files[key] = files
            if not (ev.resume_id and ev.resume_id == self.kept_id):
                self.kept_id = bytes([len(self.installed) + 1]) * 16
            s.snapshot_ready(len(n.log), [(name, len(d)) for name, d in files], self.kept_id)
        elif isinstance(ev, S.NeedSnapshotData):
            n.seen.append(ev)
            data = self.files[key][ev.index][1][ev.offset : ev.offset + ev.size]
            s.send_snapshot_data(data)
        elif isinstance(ev, S.SnapshotBegin):
            n.seen.append(ev)
            kept = self.received.get(key, {})
            # resume: keep exactly the listed files, cut to their sizes; else start empty
            self.received[key] = {name: kept[name][:size] for name, size in ev.resume}
        elif isinstance(ev, S.SnapshotChunk):
            n.seen.append(ev)
            self.received[key].setdefault(ev.name, bytearray()).extend(ev.data)
            if key in self.hold_writes:
                self.hold_writes[key].append(ev)
            else:
                s.snapshot_written(ev.total)
        elif isinstance(ev, S.SnapshotInstall):
            n.seen.append(ev)
            seg = bytes(self.received[key]["segment-00000001.log"])
            log: list[bytes] = []
            while seg:
                info = W.peek_frame(seg[: W.FRAME_HEADER_SIZE + _plen(seg)])
                log.append(seg[: info.size])
                seg = seg[info.size :]
            assert len(log) == ev.lsn
            n.log[:] = log
            self.installed.append(ev.lsn)
            s.snapshot_installed(ev.lsn)
        else:
            super().handle(n, ev)

    def release_writes(self, n: FakeNode) -> None:
        held = self.hold_writes.get(id(n), [])
        if held:
            n.session.snapshot_written(held[-1].total)
            held.clear()
        self.pump()


def _plen(seg: bytes) -> int:
    return int.from_bytes(seg[8:12], "little")


def _behind_horizon(clock: FakeClock | None = None, **kw: object) -> SnapLink:
    """A: primary of generation 1 with 100 records, its log's head dropped up to LSN 50; B: a
    secondary that stopped at LSN 10."""
    h = (gen(1, 1, A),)
    va = view(A, h, 100, role=Role.PRIMARY, retained=50)
    vb = view(B, h, 10, disk=DiskState.OUTDATED)
    p = pair(va, log_of(100), vb, log_of(10), clock, **kw)
    return SnapLink(p.a, p.b)


def test_behind_the_retention_horizon_a_full_sync_then_live() -> None:
    link = _behind_horizon()
    a, b = link.a, link.b
    link.start()
    assert a.session.outcome is not None and a.session.outcome.full_sync
    assert "rule:behind-retention-horizon" in a.session.outcome.because
    assert b.of(S.DiskChanged)[0].disk is DiskState.INCONSISTENT
    assert link.installed == [100]
    assert b.log == a.log
    assert a.session.phase is S.Phase.ESTABLISHED and b.session.phase is S.Phase.ESTABLISHED
    assert b.session.disk is DiskState.UP_TO_DATE
    assert a.of(S.SnapshotSent) == [S.SnapshotSent(100)]
    assert a.session.peer_durable == 100  # the installed snapshot is acknowledged
    # then the normal live stream, in order
    a.append_as_primary(3, 1)
    link.pump()
    assert b.log == a.log and b.session.durable_lsn == 103
    assert a.of(S.Acked)[-1].lsn == 103


def test_the_target_is_inconsistent_until_the_catch_up_after_install() -> None:
    link = _behind_horizon()
    a, b = link.a, link.b
    link.hold_writes[id(b)] = []
    link.start()
    assert b.session.phase is S.Phase.SNAPSHOT_TARGET
    assert b.session.disk is DiskState.INCONSISTENT and not link.installed
    assert a.session.peer_disk is DiskState.INCONSISTENT
    link.release_writes(b)
    while b.session.phase is S.Phase.SNAPSHOT_TARGET:
        link.release_writes(b)
    assert link.installed == [100] and b.session.disk is DiskState.UP_TO_DATE


def test_snapshot_transfer_is_chunked_and_windowed() -> None:
    # chunk 4096, window 16384 (tests' config): without acks the source stops at the window
    link = _behind_horizon()
    a, b = link.a, link.b
    a.log = [frame(i + 1, 1, A, size=900) for i in range(100)]
    link.hold_writes[id(b)] = []
    link.start()
    sizes = [len(e.data) for e in b.of(S.SnapshotChunk)]
    assert sizes and max(sizes) <= 4096
    assert sum(sizes) == 16384  # exactly one window in flight, nothing more
    assert a.session.phase is S.Phase.SNAPSHOT_SOURCE
    while b.session.phase is S.Phase.SNAPSHOT_TARGET:
        link.release_writes(b)
    assert b.log == a.log


def test_snapshot_rate_limit_in_virtual_time_and_the_off_switch() -> None:
    clock = FakeClock()
    link = _behind_horizon(clock, resync_rate=8192)
    a, b = link.a, link.b
    a.log = [frame(i + 1, 1, A, size=500) for i in range(100)]  # about 60 KiB
    total = sum(len(f) for f in a.log) + 20
    link.start()
    assert b.session.phase is S.Phase.SNAPSHOT_TARGET  # the bucket holds one chunk
    start = clock.t
    while not _established(b):
        d = a.session.next_deadline()
        assert d is not None
        clock.t = max(clock.t, d)
        a.session.tick()
        b.session.tick()
        link.pump()
    took = clock.t - start
    assert (total - 4096) / 8192 * 0.9 <= took <= (total - 4096) / 8192 * 1.2 + 1
    assert b.log == a.log
    # off switch: the same transfer without a rate ends without the clock moving
    link2 = _behind_horizon(FakeClock(), resync_rate=None)
    link2.a.log = list(a.log)
    link2.start()
    assert link2.b.log == a.log and link2.b.session.phase is S.Phase.ESTABLISHED


def test_frames_appended_during_the_snapshot_are_not_lost() -> None:
    link = _behind_horizon()
    a, b = link.a, link.b
    link.hold_writes[id(b)] = []
    link.start()
    a.append_as_primary(5, 1)
    link.pump()
    while b.session.phase is S.Phase.SNAPSHOT_TARGET:
        link.release_writes(b)
        a.append_as_primary(1, 1)
    link.pump()
    assert b.log == a.log and b.session.phase is S.Phase.ESTABLISHED


def test_invalidate_asks_for_a_full_sync_even_when_the_log_is_held() -> None:
    h = (gen(1, 1, A),)
    va = view(A, h, 30, role=Role.PRIMARY)
    vb = view(B, (), 0, disk=DiskState.INCONSISTENT)
    p = pair(va, log_of(30), vb, [])
    b_cfg = dataclasses.replace(p.b.config, full_sync=True)
    p.b.session = S.ReplSession(b_cfg, vb, p.b.clock)
    link = SnapLink(p.a, p.b)
    link.start()
    assert link.installed == [30] and link.b.log == link.a.log
    assert link.b.session.disk is DiskState.UP_TO_DATE


def test_an_interrupted_full_sync_restarts_cleanly() -> None:
    link = _behind_horizon()
    a, b = link.a, link.b
    a.log = [frame(i + 1, 1, A, size=900) for i in range(100)]
    link.hold_writes[id(b)] = []
    link.start()
    assert b.of(S.SnapshotChunk)
    a.session.close("test")  # the link drops mid-transfer
    link.pump()
    assert b.of(S.LinkLost) and not link.installed and b.log == log_of(10)
    # a new link: the target begins again from nothing and completes
    h = (gen(1, 1, A),)
    va = view(A, h, 100, role=Role.PRIMARY, retained=50)
    vb = view(B, h, 10, disk=DiskState.INCONSISTENT)
    p = pair(va, a.log, vb, b.log)
    link2 = SnapLink(p.a, p.b)
    link2.start()
    assert len(link2.b.of(S.SnapshotBegin)) == 1
    assert link2.installed == [100] and link2.b.log == a.log


def test_the_snapshot_source_is_dropped_when_the_target_stops_acking() -> None:
    clock = FakeClock()
    link = _behind_horizon(clock)
    a, b = link.a, link.b
    a.log = [frame(i + 1, 1, A, size=900) for i in range(100)]
    link.hold_writes[id(b)] = []
    link.start()
    clock.advance(a.session.config.ack_timeout + 0.1)
    a.session.tick()
    link.pump()
    assert a.session.phase is S.Phase.CLOSED and a.session.close_reason == "ack-timeout"


def test_snapshot_messages_round_trip() -> None:
    enc, dec = W.MessageEncoder(), W.MessageDecoder()
    msgs: list[W.Message] = [
        W.SnapshotRequest(7),
        W.SnapshotData("segment-00000001.log", 4096, b"xyz"),
        W.SnapshotEnd(9, 2, 4099, b"d" * 32),
        W.SnapshotAck(4099),
    ]
    for m in msgs:
        dec.receive_data(enc.encode(m, 1))
        rec = dec.next_message()
        assert rec is not None and rec.message == m
    for bad in ("../x", "", ".hidden", "a/b"):
        assert not W.snapshot_name_ok(bad)


def test_a_bad_snapshot_file_name_is_refused_by_the_decoder() -> None:
    body = W._text("../etc") + (0).to_bytes(8, "little") + (0).to_bytes(4, "little")
    enc, dec = W.MessageEncoder(), W.MessageDecoder()
    raw = bytearray(enc.encode(W.SnapshotData("ok", 0, b""), 1))
    # rebuild with the bad body (header CRCs recomputed)
    head = W.HEADER.pack(
        W.MAGIC, 1, W.MsgType.SNAPSHOT_DATA, 0, len(body), 1, 0, W.crc32c(body), 0
    )[:-4]
    head += struct.pack("<I", W.crc32c(head))
    del raw
    dec.receive_data(head + body)
    try:
        dec.next_message()
    except W.CorruptMessage:
        pass
    else:
        raise AssertionError("accepted a path as a snapshot file name")


def test_a_node_receiving_a_snapshot_is_never_promoted() -> None:
    from mailharbor.repl.role import RoleController, RoleError, RoleFacts

    facts = RoleFacts(
        disk=DiskState.INCONSISTENT, last_lsn=10, max_generation=3, snapshot_pending=True
    )
    for force in (False, True):
        try:
            RoleController().request_primary(facts, force=force)
        except RoleError as e:
            assert "snapshot" in str(e)
        else:
            raise AssertionError("promoted while a snapshot was being received")


def _established(n: FakeNode) -> bool:
    return n.session.phase is S.Phase.ESTABLISHED


def test_an_interrupted_full_sync_resumes_where_the_target_stopped() -> None:
    """Version 2: the target names the snapshot and its durable position (SNAPSHOT_RESUME);
    the source still holding that snapshot continues there (SNAPSHOT_BEGIN at that point),
    so the second link carries only the rest, and the result is the same log."""
    link = _behind_horizon()
    a, b = link.a, link.b
    a.log = [frame(i + 1, 1, A, size=900) for i in range(100)]
    link.hold_writes[id(b)] = []
    link.start()
    first = b.of(S.SnapshotBegin)
    assert len(first) == 1 and len(first[0].snapshot_id) == 16 and first[0].resume == ()
    link.release_writes(b)
    link.release_writes(b)
    a.session.close("test")  # the link drops mid-transfer
    link.pump()
    assert not link.installed
    held = {k: bytes(v) for k, v in link.received[id(b)].items()}
    progress = S.SnapshotProgress(first[0].snapshot_id, tuple((k, len(v)) for k, v in held.items()))
    total = sum(len(d) for _, d in link.files[id(a)])
    assert 0 < sum(len(v) for v in held.values()) < total
    # a new link: B asks to resume; A still has the snapshot (same id)
    h = (gen(1, 1, A),)
    va = view(A, h, 100, role=Role.PRIMARY, retained=50)
    vb = view(B, h, 10, disk=DiskState.INCONSISTENT)
    p = pair(va, a.log, vb, b.log)
    p.b.session = S.ReplSession(
        dataclasses.replace(p.b.config, snapshot_resume=progress), p.b.view, p.b.clock
    )
    link2 = SnapLink(p.a, p.b)
    link2.kept_id = link.kept_id
    link2.received[id(p.b)] = {k: bytearray(v) for k, v in held.items()}
    link2.start()
    begin = link2.b.of(S.SnapshotBegin)
    assert len(begin) == 1 and begin[0].resume == progress.files
    sent = sum(e.size for e in link2.a.of(S.NeedSnapshotData))
    assert sent == total - sum(len(v) for v in held.values())
    assert link2.a.session.snapshot_resumed_at == total - sent
    assert link2.installed == [100] and link2.b.log == a.log
    assert link2.b.session.disk is DiskState.UP_TO_DATE


def test_a_resume_of_an_unknown_snapshot_starts_over() -> None:
    link = _behind_horizon()
    progress = S.SnapshotProgress(b"Z" * 16, (("segment-00000001.log", 5),))
    link.b.session = S.ReplSession(
        dataclasses.replace(link.b.config, snapshot_resume=progress), link.b.view, link.b.clock
    )
    link.received[id(link.b)] = {"segment-00000001.log": bytearray(b"junk!")}
    link.start()
    begin = link.b.of(S.SnapshotBegin)
    assert len(begin) == 1 and begin[0].resume == () and begin[0].snapshot_id != b"Z" * 16
    assert link.installed == [100] and link.b.log == link.a.log


def test_a_version_1_peer_gets_the_version_1_full_sync() -> None:
    link = _behind_horizon(max_version=1)
    link.start()
    assert link.a.session.version == 1
    begin = link.b.of(S.SnapshotBegin)
    assert len(begin) == 1 and begin[0].snapshot_id == b""
    assert link.installed == [100] and link.b.log == link.a.log
