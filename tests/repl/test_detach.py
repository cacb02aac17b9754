"""A disk error on the receiving node detaches it (DRBD's on-io-error=detach)."""

from __future__ import annotations

from mailharbor.repl import session as S
from mailharbor.repl.state import DiskState, Role

from . import A, B, Link, gen, log_of, pair, view


def _link(b_last: int, hold: bool) -> tuple[S.ReplSession, S.ReplSession, Link]:
    h = (gen(1, 1, A),)
    va = view(A, h, 40, role=Role.PRIMARY)
    vb = view(B, h, b_last, disk=DiskState.OUTDATED)
    link = pair(va, log_of(40), vb, log_of(b_last))
    link.b.auto_durable = not hold
    link.a.answer_frames = not hold
    link.start()
    return link.a.session, link.b.session, link


def test_a_detached_secondary_tells_the_primary_then_drops_the_link() -> None:
    a, b, link = _link(40, hold=False)
    assert a.phase is S.Phase.ESTABLISHED and b.phase is S.Phase.ESTABLISHED
    b.disk_failed()
    link.pump()
    nb, na = link.b, link.a
    assert S.DiskChanged(DiskState.DISKLESS) in nb.of(S.DiskChanged)
    assert nb.of(S.LinkLost) == [S.LinkLost("disk-failed")]
    assert na.of(S.PeerDiskChanged)[-1] == S.PeerDiskChanged(DiskState.DISKLESS)
    assert na.of(S.LinkLost) == [S.LinkLost("peer-diskless")]
    assert a.peer_disk is DiskState.DISKLESS and b.disk is DiskState.DISKLESS


def test_a_sync_target_that_fails_mid_resync_is_reported_as_diskless() -> None:
    a, b, link = _link(5, hold=True)
    assert a.phase is S.Phase.SYNC_SOURCE and b.phase is S.Phase.SYNC_TARGET
    b.disk_failed()
    link.pump()
    na = link.a
    assert na.of(S.PeerDiskChanged)[-1] == S.PeerDiskChanged(DiskState.DISKLESS)
    assert a.close_reason == "peer-diskless" and a.next_deadline() is None  # closed
    assert not na.of(S.ProtocolViolation)


def test_disk_failed_on_a_closed_session_only_records_the_state() -> None:
    _a, b, link = _link(40, hold=False)
    b.close("test")
    link.pump()
    b.disk_failed()
    assert b.disk is DiskState.DISKLESS and b.phase is S.Phase.CLOSED
