"""IMAP and POP3 steps of the failover scenario, run inside the rig's host namespace as a
subprocess (``ip netns exec HOST python tests/acceptance/mailbox_client.py ...``); prints one
JSON object on stdout. Every step's reply is checked: a step that was not acknowledged (not
``OK`` / ``+OK``) makes the script exit non-zero, so what it prints was all acknowledged.

- ``before --imap ip:port --pop3 ip:port --tag T --seed S``: on the primary, APPEND messages
  (each with its own Message-ID), STORE flags on some, EXPUNGE some over IMAP, then DELE some
  over POP3 and QUIT. Prints UIDVALIDITY, UIDNEXT after the steps, the UID of every message, the
  flags set, the Message-IDs expunged and those deleted over POP3.
- ``after --imap ip:port --pop3 ip:port --tag T``: on the survivor, UIDVALIDITY and UIDNEXT, every
  message's UID, Message-ID and flags; APPENDs new messages and reports their UIDs; lists the
  Message-IDs POP3 shows.
"""

from __future__ import annotations

import argparse
import imaplib
import json
import poplib
import random
import re
import sys
from typing import Any

USER = "acc@example.org"
PASSWORD = "pw-acceptance-1"
KEYWORDS = ("\\Flagged", "\\Seen", "\\Answered", "$Label1")


def _addr(s: str) -> tuple[str, int]:
    host, port = s.rsplit(":", 1)
    return host, int(port)


def _message(mid: str) -> bytes:
    return (
        f"From: x@remote.test\r\nTo: {USER}\r\nSubject: {mid}\r\nMessage-ID: <{mid}>\r\n\r\n"
        f"body of {mid}\r\n"
    ).encode()


def _ok(res: tuple[str, Any], what: str) -> Any:
    typ, data = res
    if typ != "OK":
        raise SystemExit(f"{what}: {typ} {data!r}")
    return data


def _imap(target: str) -> imaplib.IMAP4:
    host, port = _addr(target)
    c = imaplib.IMAP4(host, port, timeout=30)
    _ok(c.login(USER, PASSWORD), "LOGIN")
    return c


def _status(c: imaplib.IMAP4) -> tuple[int, int]:
    data = _ok(c.status("INBOX", "(UIDVALIDITY UIDNEXT)"), "STATUS")
    text = data[0].decode() if isinstance(data[0], bytes) else str(data[0])
    v = re.search(r"UIDVALIDITY (\d+)", text)
    n = re.search(r"UIDNEXT (\d+)", text)
    assert v and n, text
    return int(v.group(1)), int(n.group(1))


def _messages(c: imaplib.IMAP4) -> list[dict[str, Any]]:
    """Every message of the selected mailbox: uid, mid, flags."""
    data = _ok(c.uid("FETCH", "1:*", "(UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])"), "FETCH")
    out: list[dict[str, Any]] = []
    for item in data:
        if not isinstance(item, tuple):
            continue
        uid = re.search(r"UID (\d+)", item[0].decode())
        mid = re.search(rb"<([^>]+)>", item[1])
        assert uid and mid, item
        out.append({"uid": int(uid.group(1)), "mid": mid.group(1).decode(), "flags": []})
    fl = _ok(c.uid("FETCH", "1:*", "(UID FLAGS)"), "FETCH FLAGS")
    by_uid: dict[int, list[str]] = {}
    for line in fl:
        text = line.decode() if isinstance(line, bytes) else ""
        u, f = re.search(r"UID (\d+)", text), re.search(r"FLAGS \(([^)]*)\)", text)
        if u and f:
            by_uid[int(u.group(1))] = sorted(f.group(1).split())
    for m in out:
        m["flags"] = by_uid.get(m["uid"], m["flags"])
    return out


def _append(c: imaplib.IMAP4, mids: list[str]) -> None:
    for mid in mids:
        _ok(c.append("INBOX", "", None, _message(mid)), f"APPEND {mid}")


def _pop3_mids(p: poplib.POP3) -> list[str]:
    ids = []
    for i in range(1, len(p.list()[1]) + 1):
        for line in p.top(i, 0)[1]:
            if line.lower().startswith(b"message-id:"):
                ids.append(line.split(b"<", 1)[1].split(b">", 1)[0].decode())
    return ids


def before(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    mids = [f"{args.tag}-m{i}@acc.test" for i in range(1, 13)]
    c = _imap(args.imap)
    _append(c, mids)
    _ok(c.select("INBOX"), "SELECT")
    msgs = {m["mid"]: m for m in _messages(c)}
    assert set(mids) <= msgs.keys(), (mids, msgs)
    order = list(mids)
    rng.shuffle(order)
    flagged, expunged, pop_deleted = order[:4], order[4:7], order[7:9]
    flags: dict[str, list[str]] = {}
    for mid in flagged:
        kws = sorted(rng.sample(KEYWORDS, 2))
        _ok(c.uid("STORE", str(msgs[mid]["uid"]), "+FLAGS", f"({' '.join(kws)})"), "STORE")
        flags[mid] = kws
    # One flag change that removes a flag again, so the survivor must have the newest state.
    undo = flagged[0]
    _ok(c.uid("STORE", str(msgs[undo]["uid"]), "-FLAGS", f"({flags[undo][0]})"), "STORE -FLAGS")
    flags[undo] = flags[undo][1:]
    for mid in expunged:
        _ok(c.uid("STORE", str(msgs[mid]["uid"]), "+FLAGS", "(\\Deleted)"), "STORE \\Deleted")
    _ok(c.expunge(), "EXPUNGE")
    after_msgs = {m["mid"] for m in _messages(c)}
    assert not after_msgs & set(expunged), "EXPUNGE left messages"
    _ok(c.close(), "CLOSE")
    uidvalidity, uidnext = _status(c)
    c.logout()
    host, port = _addr(args.pop3)
    p = poplib.POP3(host, port, timeout=30)
    p.user(USER)
    p.pass_(PASSWORD)
    pop_mids = _pop3_mids(p)
    for mid in pop_deleted:
        resp = p.dele(pop_mids.index(mid) + 1)
        if not resp.startswith(b"+OK"):
            raise SystemExit(f"DELE {mid}: {resp!r}")
    resp = p.quit()
    if not resp.startswith(b"+OK"):
        raise SystemExit(f"QUIT: {resp!r}")
    return {
        "uidvalidity": uidvalidity,
        "uidnext": uidnext,
        "uids": {mid: msgs[mid]["uid"] for mid in mids},
        "flags": flags,
        "expunged": expunged,
        "pop_deleted": pop_deleted,
    }


def after(args: argparse.Namespace) -> dict[str, Any]:
    c = _imap(args.imap)
    uidvalidity, uidnext = _status(c)
    _ok(c.select("INBOX"), "SELECT")
    old = _messages(c)
    new_mids = [f"{args.tag}-new{i}@acc.test" for i in range(1, 4)]
    _append(c, new_mids)
    now = _messages(c)
    c.logout()
    host, port = _addr(args.pop3)
    p = poplib.POP3(host, port, timeout=30)
    p.user(USER)
    p.pass_(PASSWORD)
    pop_mids = _pop3_mids(p)
    p.quit()
    return {
        "uidvalidity": uidvalidity,
        "uidnext": uidnext,
        "messages": old,
        "new": {m["mid"]: m["uid"] for m in now if m["mid"] in new_mids},
        "all_after_append": now,
        "pop3": pop_mids,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("before", "after"):
        sp = sub.add_parser(name)
        sp.add_argument("--imap", required=True)
        sp.add_argument("--pop3", required=True)
        sp.add_argument("--tag", required=True)
        sp.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    result = {"before": before, "after": after}[args.cmd](args)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
