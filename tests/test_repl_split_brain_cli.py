"""``mailharbor repl resolve-split-brain`` against two real running nodes in split brain under
``split_brain = "disconnect"``.

Split brain is made by hand: both nodes ``repl disconnect``, B is forced primary, each gets its
own mail, B steps back to secondary and both ``repl connect``: the decision is
``rule:split-brain-disconnect`` and both stay StandAlone. Then:

* ``--discard-my-data`` on B: B's branch is cut into quarantine (its messages are in the
  quarantine file, not in the mailbox), B catches up from A; A holds the common mail and its
  own, the logs verify equal;
* ``--merge`` on both: A (the primary) replays B's branch; A holds the mail of both sides, B
  catches up, the merge audit log names the re-deliveries.
"""

from __future__ import annotations

import json
import random
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailharbor.store import read_quarantine
from test_repl_nodes import (
    Pair,
    in_sync,
    pop3_message_ids,
    print_logs,
    refuses,
    send,
    status,
    wait_for,
)

SEED = 9091


@pytest.fixture
def sb_pair() -> Iterator[Pair]:
    p = Pair(f"sbcli{secrets.token_hex(3)}", replication={"split_brain": "disconnect"})
    try:
        p.start()
        yield p
        print_logs(p.nodes)  # shown for a failed test
    finally:
        p.cleanup()


def _split_brain(pair: Pair, tag: str) -> tuple[list[str], list[str], list[str]]:
    """Common mail, then mail on A alone and on B alone (forced primary); B back to secondary
    and both reconnecting: the disconnect policy leaves both StandAlone."""
    rnd = random.Random(SEED)
    print(f"seed {SEED}")
    common = [f"c{i}-{tag}@sb.test" for i in range(3)]
    for mid in common:
        assert send(pair.smtp["a"], mid, rnd.randrange(400, 3000))
    wait_for(lambda: in_sync(pair.a, pair.b), 15, "in sync")
    for n in (pair.a, pair.b):
        assert n.try_cli("repl", "disconnect").returncode == 0
    r = pair.b.try_cli("repl", "primary", "--force")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: not refuses(pair.smtp["b"]), 10, "SMTP on B")
    on_a = [f"a{i}-{tag}@sb.test" for i in range(3)]
    on_b = [f"b{i}-{tag}@sb.test" for i in range(2)]
    for mid in on_a:
        assert send(pair.smtp["a"], mid, rnd.randrange(400, 3000))
    for mid in on_b:
        assert send(pair.smtp["b"], mid, rnd.randrange(400, 3000))
    assert pair.b.try_cli("repl", "secondary").returncode == 0
    for n in (pair.a, pair.b):
        assert n.try_cli("repl", "connect").returncode == 0

    def both_standalone() -> bool:
        sa, sb = status(pair.a), status(pair.b)
        return bool(
            sa["connection"] == "StandAlone"
            and sb["connection"] == "StandAlone"
            and "split-brain-disconnect" in sa["standalone_reason"]
            and "split-brain-disconnect" in sb["standalone_reason"]
        )

    wait_for(both_standalone, 20, "split brain detected, both StandAlone")
    assert "split brain detected" in pair.a.log and "split brain detected" in pair.b.log
    return common, on_a, on_b


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_resolve_discard_my_data_on_the_secondary(sb_pair: Pair) -> None:
    a, b = sb_pair.a, sb_pair.b
    common, on_a, on_b = _split_brain(sb_pair, "dmd")
    r = b.try_cli("repl", "resolve-split-brain", "--discard-my-data")
    assert r.returncode == 0 and "discarded" in r.stdout, r.stdout + r.stderr
    assert a.try_cli("repl", "connect").returncode == 0
    wait_for(lambda: in_sync(a, b), 30, "B dropped its branch and caught up")
    assert "rule:split-brain-discard-my-data" in b.log
    assert "rule:split-brain-discard-my-data" in a.log
    # B's branch is in its quarantine file, whole; its messages are in no mailbox.
    qfiles = list((b.root / "data" / "quarantine").glob("cut-*"))
    assert len(qfiles) == 1, qfiles
    q = read_quarantine(qfiles[0].read_bytes())
    blob = b"".join(q.frames)
    for mid in on_b:
        assert f"<{mid}>".encode() in blob
    for mid in common + on_a:
        assert f"<{mid}>".encode() not in blob
    r = a.try_cli("repl", "verify")
    assert r.returncode == 0 and "0 mismatch" in r.stdout, r.stdout + r.stderr
    assert sorted(pop3_message_ids(sb_pair.pop3["a"])) == sorted(common + on_a)
    # The resolution was one-shot: B is an ordinary secondary again.
    st = status(b)
    assert st["role"] == "Secondary" and st["disk"] == "UpToDate"
    # Failover shows B's mailbox: A's mail, not B's discarded branch.
    a.stop()
    wait_for(lambda: status(b)["connection"] != "Connected", 20, "B sees A gone")
    assert b.try_cli("repl", "primary").returncode == 0
    wait_for(lambda: not refuses(sb_pair.pop3["b"]), 10, "POP3 on B")
    assert sorted(pop3_message_ids(sb_pair.pop3["b"])) == sorted(common + on_a)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_resolve_merge_on_both_nodes(sb_pair: Pair) -> None:
    a, b = sb_pair.a, sb_pair.b
    common, on_a, on_b = _split_brain(sb_pair, "mrg")
    r = b.try_cli("repl", "resolve-split-brain", "--merge")
    assert r.returncode == 0 and "merged" in r.stdout, r.stdout + r.stderr
    assert status(b)["connection"] != "Connected"  # A is StandAlone until told too
    r = a.try_cli("repl", "resolve-split-brain", "--merge")
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: status(a).get("last_merge") is not None, 30, "the merge on A")
    merged = status(a)["last_merge"]
    assert merged.get("unresolved") == 0 and merged.get("redelivered") == len(on_b), merged
    wait_for(lambda: in_sync(a, b), 30, "B caught up after the merge")
    assert "rule:split-brain-merge" in a.log and "rule:split-brain-merge" in b.log
    assert sorted(pop3_message_ids(sb_pair.pop3["a"])) == sorted(common + on_a + on_b)
    rules = [json.loads(x)["rule"] for x in Path(merged["audit"]).read_text().splitlines()]
    assert rules[0] == "merge:start" and rules[-1] == "merge:done"
    assert rules.count("merge:redeliver") == len(on_b)
    r = a.try_cli("repl", "verify")
    assert r.returncode == 0 and "0 mismatch" in r.stdout, r.stdout + r.stderr
    # The override was one-shot: a later reconnect uses the configured policy again (no
    # split brain now, so the pair simply reconnects in sync).
    for n in (a, b):
        assert n.try_cli("repl", "disconnect").returncode == 0
        assert n.try_cli("repl", "connect").returncode == 0
    wait_for(lambda: in_sync(a, b), 20, "reconnected")
