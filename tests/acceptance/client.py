"""Clients for the acceptance rig, run inside the rig's host namespace as a subprocess
(``ip netns exec HOST python tests/acceptance/client.py ...``); results go to a file as JSON
lines, one flushed line per event, with ``time.monotonic()`` (the clock is the same in every
network namespace of the machine, so the test process compares it with its own).

- ``load``: sender threads against every ``--target NODE=ip:port`` until ``--stop-file``
  exists; each attempt has its own Message-ID; ``{"ev": "ack", "mid", "node", "t", "reply"}``
  for every 250 after DATA, ``{"ev": "fail", "mid", "node", "t", "code"}`` otherwise.
- ``probe``: one SMTP session that has sent its DATA body but not the final ".", then waits for
  ``--go-file`` and sends "."; plus one idle session after EHLO. Records the reply to "." and
  whatever the server sends on the idle session (a graceful stop owes ``421``).
- ``pop3``: prints the Message-IDs of the mailbox as one JSON list.
"""

from __future__ import annotations

import argparse
import json
import poplib
import random
import smtplib
import socket
import threading
import time
from pathlib import Path
from typing import Any

USER = "acc@example.org"
PASSWORD = "pw-acceptance-1"


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

    def run(node: str, k: int) -> None:
        rng = random.Random(f"{args.seed}:{node}:{k}")
        n = 0
        host, port = _addr(targets[node])
        while not stop.exists():
            n += 1
            mid = f"{args.tag}-{node}{k}-{n}@acc.test"
            try:
                with smtplib.SMTP(host, port, timeout=args.timeout) as c:
                    c.ehlo()
                    c.mail("x@remote.test")
                    c.rcpt(USER)
                    code, reply = c.data(message(mid, rng.choice([300, 2000, 8000])))
                t = time.monotonic()
                if code == 250:
                    out.write(
                        ev="ack", mid=mid, node=node, t=t, reply=reply.decode("ascii", "replace")
                    )
                else:
                    out.write(ev="fail", mid=mid, node=node, t=t, code=code)
            except smtplib.SMTPResponseException as e:
                out.write(ev="fail", mid=mid, node=node, t=time.monotonic(), code=e.smtp_code)
                time.sleep(0.02)
            except (OSError, smtplib.SMTPException):
                out.write(ev="fail", mid=mid, node=node, t=time.monotonic(), code=0)
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

    ths = [threading.Thread(target=wait, args=a) for a in (("dot", bf), ("idle", idf))]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    for name, (code, text, t) in results.items():
        out.write(ev=name, code=code, text=text, t=t, mid=args.mid)
    out.close()


def pop3(args: argparse.Namespace) -> None:
    host, port = _addr(args.target)
    p = poplib.POP3(host, port, timeout=60)
    try:
        p.user(USER)
        p.pass_(PASSWORD)
        count = len(p.list()[1])
        ids = []
        for i in range(1, count + 1):
            for line in p.top(i, 0)[1]:
                if line.lower().startswith(b"message-id:"):
                    ids.append(line.split(b"<", 1)[1].split(b">", 1)[0].decode())
    finally:
        p.quit()
    print(json.dumps(ids))


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
    qp = sub.add_parser("pop3")
    qp.add_argument("--target", required=True)
    args = ap.parse_args()
    {"load": load, "probe": probe, "pop3": pop3}[args.cmd](args)


if __name__ == "__main__":
    main()
