"""MERGE_DONE: the split-brain loser cuts its branch only once the winner says the merge is
durable (sans-IO sessions back to back, as in test_session.py)."""

from __future__ import annotations

import hashlib

import pytest

from mailharbor.repl import session as S
from mailharbor.repl import wire as W
from mailharbor.repl.generations import Branch
from mailharbor.repl.state import Role

from . import A, B, FakeNode, Link, gen, log_of, pair, view


def phase(n: FakeNode) -> S.Phase:
    return n.session.phase


def split_brain() -> tuple[Link, list[bytes], list[bytes]]:
    la = log_of(50) + log_of(30, 2, A, start=51)
    lb = log_of(50) + log_of(20, 3, B, start=51)
    va = view(A, (gen(1, 1, A), gen(2, 51, A)), 80, Role.SECONDARY)
    vb = view(B, (gen(1, 1, A), gen(3, 51, B)), 70, Role.PRIMARY)
    link = pair(va, la, vb, lb)
    link.b.auto_merge = False
    link.start()
    return link, la, lb


def test_the_loser_waits_for_merge_done_before_cutting() -> None:
    link, la, lb = split_brain()
    a, b = link.a, link.b
    assert a.of(S.Decision)[0].outcome.branch is Branch.SEND
    assert b.of(S.BranchComplete) == [S.BranchComplete(80)]
    # The branch is at the winner, the merge is running: nothing is cut yet.
    assert a.session.phase is S.Phase.MERGE_WAIT and b.session.phase is S.Phase.MERGING
    assert not a.of(S.CutTail) and a.log == la and a.quarantine == []
    b.session.merge_done(80)
    link.pump()
    assert a.of(S.CutTail) == [S.CutTail(50)]
    assert a.quarantine == la[50:] and a.log == lb
    assert phase(a) is S.Phase.ESTABLISHED


def test_a_link_lost_before_merge_done_leaves_the_branch_uncut() -> None:
    link, la, _ = split_brain()
    a = link.a
    link.up = False
    a.session.close("test")
    link.pump()
    assert not a.of(S.CutTail) and a.log == la and a.quarantine == []
    assert a.session.phase is S.Phase.CLOSED


def test_merge_done_for_another_branch_is_refused_and_nothing_is_cut() -> None:
    link, la, _ = split_brain()
    a, b = link.a, link.b
    b.session._branch_hash = hashlib.sha256(b"not the branch")  # a winner that merged another
    b.session.merge_done(80)
    link.pump()
    assert not a.of(S.CutTail) and a.log == la
    assert [v.reason for v in a.of(S.ProtocolViolation)] == [W.RefuseReason.PROTOCOL]
    assert a.session.phase is S.Phase.CLOSED


def test_merge_done_must_name_the_branch_received() -> None:
    link, _, _ = split_brain()
    with pytest.raises(S.SessionUsageError):
        link.b.session.merge_done(79)


def test_merge_done_checks_its_digest_length() -> None:
    # (the round trip is in test_wire.py's SAMPLES)
    with pytest.raises(ValueError):
        W.MergeDone(7, b"short").encode()
