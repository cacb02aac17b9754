"""The acceptance checker itself (rig.check_acks, rig.check_final), on hand-made ack records:
it must catch what it promises to catch, and accept what is no violation. No rig needed."""

from __future__ import annotations

from .client import node_term
from .rig import Ev, check_acks, check_final


def ack(mid: str, node: str, sent: float, t: float, reply: str) -> Ev:
    named, term = node_term(reply)
    return Ev("ack", mid, node, t, 250, named, term, reply, sent=sent)


def r(node: str, term: int) -> str:
    return f"2.0.0 Ok: queued as 0123456789ABCDEF (node {node} term {term})"


def test_a_clean_failover_passes() -> None:
    acks = [ack("a", "n1", 0.0, 0.1, r("n1", 1)), ack("b", "n2", 3.0, 3.1, r("n2", 2))]
    assert check_acks(acks) == []


def test_every_250_must_name_node_and_term() -> None:
    acks = [ack("a", "n1", 0.0, 0.1, "2.0.0 Ok: queued as 0123456789ABCDEF")]
    assert "names no node and term" in check_acks(acks)[0]
    assert node_term("2.0.0 Ok: queued as X (node n1)") == ("", -1)


def test_the_named_node_must_be_the_endpoint_and_own_its_term() -> None:
    acks = [ack("a", "n1", 0.0, 0.1, r("n2", 1))]
    problems = check_acks(acks)
    assert len(problems) == 1 and "sent to n1, the 250 names n2" in problems[0]
    acks = [ack("a", "n1", 0.0, 0.1, r("n1", 1)), ack("b", "n2", 0.2, 0.3, r("n2", 1))]
    assert any("term 1 named by n1 and n2" in p for p in check_acks(acks))


def test_an_older_term_decided_after_a_newer_one_is_caught() -> None:
    acks = [
        ack("a", "n1", 0.0, 0.1, r("n1", 1)),
        ack("b", "n2", 3.0, 3.1, r("n2", 2)),
        ack("c", "n1", 3.5, 3.6, r("n1", 1)),  # sent after term 2 had acknowledged
    ]
    problems = check_acks(acks)
    assert len(problems) == 1 and problems[0].startswith("c: term 1 from n1 sent at 3.500")


def test_a_reply_decided_before_and_delivered_after_is_no_interleaving() -> None:
    # Sent before the newer term's first ack arrived; it arrives later (retransmitted after a
    # partition healed, or written when a paused process resumed).
    acks = [
        ack("a", "n1", 0.0, 0.1, r("n1", 1)),
        ack("late", "n1", 0.5, 9.0, r("n1", 1)),
        ack("b", "n2", 3.0, 3.1, r("n2", 2)),
    ]
    assert check_acks(acks) == []


def test_check_final_lost_duplicated_and_unacknowledged() -> None:
    v = check_final(["a", "b", "c"], ["a", "c", "c", "x"])
    assert (v.acked, v.lost, v.duplicated, v.unacked_present) == (3, ["b"], ["c"], 1)
