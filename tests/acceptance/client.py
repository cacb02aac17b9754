"""Clients for the acceptance rig, run inside the rig's host namespace as a subprocess
(``ip netns exec HOST python tests/acceptance/client.py ...``); results go to a file as JSON
lines, one flushed line per event, with ``time.monotonic()`` (the clock is the same in every
network namespace of the machine, so the test process compares it with its own).

- ``load``: sender threads against every ``--target NODE=ip:port`` until ``--stop-file``
  exists, one connection per message; each attempt has its own Message-ID; ``{"ev": "ack",
  "mid", "node", "t", "sent", "reply", "named", "term"}`` for every 250 after DATA (``node``: the
  endpoint sent to; ``sent``: when the DATA command went out, ``t``: when the 250 arrived, so
  the server decided in between; ``named`` and ``term``: what the 250 says, ``"(node n1 term
  7)"``, or ``""`` / ``-1`` when it does not), ``{"ev": "fail", "mid", "node", "t", "code",
  "stage", "err"}``
  otherwise (``stage``: where it ended; ``code`` 0: no reply, the connection failed).
- ``probe``: one SMTP session that has sent its DATA body but not the final ".", then waits for
  ``--go-file`` and sends "."; plus one idle session after EHLO (and with ``--imap``, one idle
  IMAP session after LOGIN). Records the reply to "." and whatever the server sends on the idle
  sessions (a graceful stop owes ``421`` and ``* BYE``).
- ``pop3``: prints the Message-IDs of the mailbox as one JSON list; with ``--whole FILE``, also
  which of the Message-IDs listed in FILE are not whole (``{"ids", "broken"}``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import poplib
import random
import re
import smtplib
import socket
import threading
import time
from pathlib import Path
from typing import Any

USER = "acc@example.org"
PASSWORD = "pw-acceptance-1"
#: What every 250 after DATA ends with on a clustered node (service/delivery.py).
NODE_TERM = re.compile(r"\(node ([a-z0-9-]+) term (\d+)\)$")


def node_term(reply: str) -> tuple[str, int]:
    """The node and term a 250 names: ``("", -1)`` when it names none."""
    m = NODE_TERM.search(reply.strip())
    return (m.group(1), int(m.group(2))) if m else ("", -1)


def message(mid: str, size: int) -> bytes:
    body = (f"{mid} " * (size // (len(mid) + 1) + 1))[:size]
    lines = "\r\n".join(body[i : i + 70] for i in range(0, len(body), 70))
    return (
        f"From: x@remote.test\r\nTo: {USER}\r\nSubject: {mid}\r\nMessage-ID: <{mid}>\r\n\r\n"
        f"{lines}\r\n"
    ).encode()


class Out:
    def __init__(self, path: str) -> None:
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()

    def write(self, **ev: Any) -> None:
        with self._lock:
            self._f.write(json.dumps(ev) + "\n")
            self._f.flush()

    def close(self) -> None:
        self._f.close()


def _addr(s: str) -> tuple[str, int]:
    host, port = s.rsplit(":", 1)
    return host, int(port)


def load(args: argparse.Namespace) -> None:
    out = Out(args.out)
    stop = Path(args.stop_file)
    targets = dict(t.split("=", 1) for t in args.target)

    def attempt(c_host: str, port: int, mid: str, size: int) -> dict[str, Any]:
        """One SMTP transaction on a new connection: the event to record (without mid/node).
        ``stage`` is where it ended: ``connect`` (no greeting: refused, reset, or a 421
        greeting), ``ehlo``, ``mail``, ``rcpt``, ``data`` (DATA or the final "."); ``code`` 0:
        the connection failed without a reply (``err`` names the exception)."""
        stage = "connect"
        c: smtplib.SMTP | None = None
        try:
            c = smtplib.SMTP(c_host, port, timeout=args.timeout)
            stage = "ehlo"
            code, text = c.ehlo()
            if code != 250:
                return {"ev": "fail", "code": code, "stage": stage}
            stage = "mail"
            code, text = c.mail("x@remote.test")
            if code != 250:
                return {"ev": "fail", "code": code, "stage": stage}
            stage = "rcpt"
            code, text = c.rcpt(USER)
            if code not in (250, 251):
                return {"ev": "fail", "code": code, "stage": stage}
            stage = "data"
            sent = time.monotonic()  # the server cannot decide before this
            code, text = c.data(message(mid, size))
            # Recorded when the reply to "." arrived, before QUIT (a stopped or killed server
            # must not delay or hide an acknowledgement it already gave).
            t = time.monotonic()
            if code != 250:
                return {"ev": "fail", "code": code, "stage": stage, "t": t}
            reply = text.decode("ascii", "replace")
            named, term = node_term(reply)
            with contextlib.suppress(OSError, smtplib.SMTPException):
                c.quit()
            return {
                "ev": "ack",
                "t": t,
                "sent": sent,
                "reply": reply,
                "named": named,
                "term": term,
            }
        except smtplib.SMTPResponseException as e:
            return {"ev": "fail", "code": e.smtp_code, "stage": stage}
        except (OSError, smtplib.SMTPException) as e:
            return {"ev": "fail", "code": 0, "stage": stage, "err": type(e).__name__}
        finally:
            if c is not None:
                c.close()

    def run(node: str, k: int) -> None:
        rng = random.Random(f"{args.seed}:{node}:{k}")
        n = 0
        host, port = _addr(targets[node])
        while not stop.exists():
            n += 1
            mid = f"{args.tag}-{node}{k}-{n}@acc.test"
            ev = attempt(host, port, mid, rng.choice([300, 2000, 8000]))
            ev.setdefault("t", time.monotonic())
            out.write(mid=mid, node=node, **ev)
            if ev["ev"] == "fail":
                time.sleep(0.02)

    threads = [
        threading.Thread(target=run, args=(node, k), daemon=True)
        for node in targets
        for k in range(args.per_node)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    out.write(ev="done", t=time.monotonic())
    out.close()


def _reply(f: Any) -> tuple[int, str]:
    """One SMTP reply (possibly multi-line) from a socket file; (0, "") on EOF."""
    lines: list[str] = []
    while True:
        line = f.readline()
        if not line:
            return 0, "".join(lines)
        text = line.decode("ascii", "replace").rstrip("\r\n")
        lines.append(text)
        if len(text) < 4 or text[3] != "-":
            return int(text[:3]), "\n".join(lines)


def probe(args: argparse.Namespace) -> None:
    out = Out(args.out)
    go = Path(args.go_file)
    host, port = _addr(args.target)
    busy = socket.create_connection((host, port), 10)
    idle = socket.create_connection((host, port), 10)
    bf, idf = busy.makefile("rb"), idle.makefile("rb")
    for s, f in ((busy, bf), (idle, idf)):
        _reply(f)
        s.sendall(b"EHLO probe.test\r\n")
        _reply(f)
    for cmd in (b"MAIL FROM:<x@remote.test>\r\n", f"RCPT TO:<{USER}>\r\n".encode(), b"DATA\r\n"):
        busy.sendall(cmd)
        code, text = _reply(bf)
        if code not in (250, 354):
            out.write(ev="setup-failed", code=code, text=text)
            return
    busy.sendall(message(args.mid, 500))
    imap: socket.socket | None = None
    if args.imap:  # an IMAP session, logged in and idle (a graceful stop owes it "* BYE")
        imap = socket.create_connection(_addr(args.imap), 10)
        imf = imap.makefile("rb")
        imf.readline()  # greeting
        imap.sendall(f'a1 LOGIN "{USER}" "{PASSWORD}"\r\n'.encode())
        while not (line := imf.readline()).startswith(b"a1 "):
            if not line:
                break
        if not line.startswith(b"a1 OK"):
            out.write(ev="setup-failed", code=0, text=line.decode("ascii", "replace"))
            return
    out.write(ev="ready", t=time.monotonic())
    while not go.exists():
        time.sleep(0.02)
    busy.sendall(b".\r\n")
    out.write(ev="dot-sent", t=time.monotonic())
    busy.settimeout(args.timeout)
    idle.settimeout(args.timeout)
    results: dict[str, tuple[int, str, float]] = {}

    def wait(name: str, f: Any) -> None:
        try:
            code, text = _reply(f)
        except OSError as e:
            code, text = -1, str(e)
        results[name] = (code, text, time.monotonic())

    def wait_imap() -> None:
        assert imap is not None
        imap.settimeout(args.timeout)
        try:
            line = imf.readline().decode("ascii", "replace").rstrip("\r\n")
        except OSError as e:
            line = f"error: {e}"
        results["imap"] = (0, line, time.monotonic())

    ths = [threading.Thread(target=wait, args=a) for a in (("dot", bf), ("idle", idf))]
    if imap is not None:
        ths.append(threading.Thread(target=wait_imap))
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    for name, (code, text, t) in results.items():
        out.write(ev=name, code=code, text=text, t=t, mid=args.mid)
    out.close()


SIZES = (300, 2000, 8000)  # the load's message sizes (before line breaks)


def pop3(args: argparse.Namespace) -> None:
    """Print the mailbox's Message-IDs as a JSON list; with ``--whole FILE`` (a JSON list of
    Message-IDs), ``{"ids": [...], "broken": [...]}``: each of those messages is fetched whole
    and must end with exactly what the load client sent (`message(mid, size)`)."""
    host, port = _addr(args.target)
    check = set(json.loads(Path(args.whole).read_text())) if args.whole else set()
    broken: list[str] = []
    p = poplib.POP3(host, port, timeout=60)
    try:
        p.user(USER)
        p.pass_(PASSWORD)
        count = len(p.list()[1])
        ids = []
        for i in range(1, count + 1):
            for line in p.top(i, 0)[1]:
                if line.lower().startswith(b"message-id:"):
                    mid = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
                    ids.append(mid)
                    if mid in check:
                        got = b"\r\n".join(p.retr(i)[1]) + b"\r\n"
                        if not any(got.endswith(b"\r\n" + message(mid, n)) for n in SIZES):
                            broken.append(mid)
                    break
    finally:
        p.quit()
    print(json.dumps({"ids": ids, "broken": broken} if args.whole else ids))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser("load")
    lp.add_argument("--target", action="append", required=True)
    lp.add_argument("--tag", required=True)
    lp.add_argument("--seed", type=int, required=True)
    lp.add_argument("--per-node", type=int, default=2)
    lp.add_argument("--timeout", type=float, default=5.0)
    lp.add_argument("--out", required=True)
    lp.add_argument("--stop-file", required=True)
    pp = sub.add_parser("probe")
    pp.add_argument("--target", required=True)
    pp.add_argument("--mid", required=True)
    pp.add_argument("--out", required=True)
    pp.add_argument("--go-file", required=True)
    pp.add_argument("--timeout", type=float, default=40.0)
    pp.add_argument("--imap", help="also hold an idle IMAP session there (host:port)")
    qp = sub.add_parser("pop3")
    qp.add_argument("--target", required=True)
    qp.add_argument("--whole", help="JSON file: Message-IDs to fetch and check whole")
    args = ap.parse_args()
    {"load": load, "probe": probe, "pop3": pop3}[args.cmd](args)


if __name__ == "__main__":
    main()
