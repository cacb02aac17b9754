"""Fencing with two real nodes: frozen writes fail at once, nothing frozen is acknowledged.

Node A (primary) replicates in protocol C to B with ``fencing = resource-and-stonith``. B is
killed with SIGKILL: A's link drops, its barrier freezes, and from then on a new SMTP
transaction gets ``451 4.3.0`` within a second or two (not a client timeout), and the message
is not stored. ``repl resume-io`` (the operator states B is fenced) resumes writes: the next
message gets its ``250`` and is the only new one in the mailbox.

When B stays alive and only the replication link is cut (a forwarder between the nodes), A
freezes the same way; once the link is back and B has synced everything, A's writes resume by
themselves, each waiting for B again.
"""

from __future__ import annotations

import secrets
import smtplib
import time
from collections.abc import Iterator

import pytest

from test_repl_delay import DelayForwarder
from test_repl_nodes import USER, Pair, in_sync, message, pop3_message_ids, status, wait_for


@pytest.fixture
def stonith_pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    tag = request.node.name.replace("_", "")[-16:] + secrets.token_hex(2)
    p = Pair(tag, replication={"fencing": "resource-and-stonith"})
    try:
        p.start()
        yield p
    except BaseException:
        for name, n in p.nodes.items():
            print(f"=== log of {name}\n{n.log[-8000:]}")
        raise
    finally:
        p.cleanup()


def smtp_reply(port: int, mid: str) -> tuple[int, str, float]:
    """One transaction: the reply to the end of DATA (or to the first refused command) and the
    seconds it took."""
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
        c.ehlo("client.test")
        code, text = c.mail("x@remote.test")
        if code == 250:
            code, text = c.rcpt(USER)
        if code == 250:
            code, text = c.data(message(mid, 500))
    return code, text.decode(), time.monotonic() - started


def test_frozen_writes_fail_fast_until_resume_io(stonith_pair: Pair) -> None:
    p = stonith_pair
    assert smtp_reply(p.smtp["a"], "before@fence.test")[0] == 250
    p.b.kill()
    wait_for(lambda: status(p.a)["frozen"], 10, "A's writes frozen")
    code, text, took = smtp_reply(p.smtp["a"], "frozen@fence.test")
    assert code == 451 and "replication peer lost" in text, (code, text)
    assert took < 2.0, took
    # Still frozen: another attempt is refused the same way, at once.
    assert smtp_reply(p.smtp["a"], "frozen2@fence.test")[0] == 451
    r = p.a.try_cli("repl", "resume-io")
    assert r.returncode == 0 and "resume" in r.stdout, r.stderr
    assert not status(p.a)["frozen"]
    code, _, _ = smtp_reply(p.smtp["a"], "after@fence.test")
    assert code == 250
    ids = pop3_message_ids(p.pop3["a"])
    assert sorted(ids) == ["after@fence.test", "before@fence.test"], ids


def test_a_cut_link_freezes_writes_until_the_live_peer_is_back_in_sync(
    request: pytest.FixtureRequest,
) -> None:
    tag = request.node.name.replace("_", "")[-16:] + secrets.token_hex(2)
    to_b, to_a = DelayForwarder(0.0), DelayForwarder(0.0)
    p = Pair(
        tag,
        replication={"fencing": "resource-and-stonith"},
        peer_ports={"a": to_b.port, "b": to_a.port},
    )
    to_b.upstream, to_a.upstream = p.repl["b"], p.repl["a"]
    try:
        p.start()
        assert smtp_reply(p.smtp["a"], "before@cut.test")[0] == 250
        to_b.cut()
        to_a.cut()
        wait_for(lambda: status(p.a)["frozen"], 10, "A's writes frozen by the cut")
        code, text, _ = smtp_reply(p.smtp["a"], "cut@cut.test")
        assert code == 451 and "replication peer lost" in text, (code, text)
        assert status(p.b)["role"] == "Secondary"  # alive all along, never promoted
        to_b.heal()
        to_a.heal()
        wait_for(lambda: in_sync(p.a, p.b), 30, "B back in sync")
        wait_for(lambda: not status(p.a)["frozen"], 10, "A's writes resumed by themselves")
        assert "the peer is back in sync: frozen writes resume" in p.a.log
        assert smtp_reply(p.smtp["a"], "after@cut.test")[0] == 250
        # The 250 waited for B (protocol C): B holds it as soon as A answered.
        st_a, st_b = status(p.a), status(p.b)
        assert st_a["peer_durable_lsn"] == st_a["last_lsn"] <= st_b["durable_lsn"], (st_a, st_b)
        ids = pop3_message_ids(p.pop3["a"])
        assert sorted(ids) == ["after@cut.test", "before@cut.test"], ids
    except BaseException:
        p.dump()
        raise
    finally:
        p.cleanup()
        to_b.close()
        to_a.close()
