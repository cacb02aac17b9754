"""Fencing with two real nodes: frozen writes fail at once, nothing frozen is acknowledged.

Node A (primary) replicates in protocol C to B with ``fencing = resource-and-stonith``. B is
killed with SIGKILL: A's link drops, its barrier freezes, and from then on a new SMTP
transaction gets ``451 4.3.0`` within a second or two (not a client timeout), and the message
is not stored. ``repl resume-io`` (the operator states B is fenced) resumes writes: the next
message gets its ``250`` and is the only new one in the mailbox.
"""

from __future__ import annotations

import secrets
import smtplib
import time
from collections.abc import Iterator

import pytest

from test_repl_nodes import USER, Pair, message, pop3_message_ids, status, wait_for


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
