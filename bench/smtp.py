"""SMTP benchmark: mailharbor's MX listener against a private Postfix, A/B/A/B in one run.

Run from the repository root as root (see bench/README.md, section bench/smtp.py)::

    python bench/smtp.py [--quick] [--keep]

Load: Postfix's `smtp-source`, 10 sessions, 4 KiB messages to one local recipient, once with one
connection per session (`-d`) and once with one connection per message (no `-d`). Latency (end
of data to `250`) comes from a small asyncio client in this file running the same load with
pipelined MAIL/RCPT/DATA. Server CPU is utime+stime (+ reaped children) summed over the server's
process tree from /proc. Human lines first; the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    BIN,
    REPO,
    free_port,
    log,
    percentile,
    rss_mb,
    tree_cpu_s,
    tree_rss_mb,
    wait_greeting,
)

SMTP_SOURCE = "/usr/sbin/smtp-source"
POSTFIX = "/usr/sbin/postfix"
DOMAIN = "bench.test"
RCPT = f"rcpt@{DOMAIN}"
SENDER = "sender@example.org"
SESSIONS = 10
MSG_LEN = 4096
TARGETS: dict[str, tuple[str, float]] = {"ratio": (">=", 1.0)}
QUEUE_SUBDIRS = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")


@dataclass(frozen=True, slots=True)
class Plan:
    quick: bool
    messages: int
    warmup: int
    rounds: int


QUICK = Plan(quick=True, messages=500, warmup=100, rounds=3)
FULL = Plan(quick=False, messages=2000, warmup=200, rounds=3)


# --- servers --------------------------------------------------------------------------------


class Mailharbor:
    name = "mailharbor"

    def __init__(self, run: Path, port: int) -> None:
        self.dir = run / "mailharbor"
        self.port = port
        self.cfg = self.dir / "mailharbor.toml"
        self.proc: subprocess.Popen[bytes] | None = None

    def _cli(self, *args: str, stdin: bytes | None = None) -> None:
        subprocess.run(
            [str(BIN / "mailharbor"), *args], input=stdin, check=True, capture_output=True
        )

    def start(self) -> None:
        self._cli("init", str(self.dir), "--hostname", "localhost")
        text = self.cfg.read_text()
        if "\n# mx = []\n" not in text:
            raise RuntimeError("unexpected mailharbor.toml: no '# mx = []' line")
        self.cfg.write_text(text.replace("\n# mx = []\n", f'\nmx = ["127.0.0.1:{self.port}"]\n'))
        self._cli("domain", "add", DOMAIN, "--config", str(self.cfg))
        self._cli(
            "account", "add", RCPT, "--password-stdin", "--config", str(self.cfg), stdin=b"pw\n"
        )
        logf = (self.dir / "serve.log").open("wb")
        self.proc = subprocess.Popen(
            [str(BIN / "mailharbor"), "serve", "--config", str(self.cfg)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        proc = self.proc
        wait_greeting(self.port, b"220", 30, lambda: proc.poll() is None)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_s(self) -> float:
        return tree_cpu_s(self.pid)

    def settle(self) -> None:
        pass

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-bench
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
myhostname = bench-postfix.localdomain
mydomain = localdomain
myorigin = $myhostname
mydestination = {domain}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
local_recipient_maps =
alias_maps =
alias_database =
local_transport = discard:bench
default_transport = discard:bench
relay_transport = discard:bench
smtpd_tls_security_level = none
smtp_tls_security_level = none
biff = no
"""

# chroot off everywhere (the queue directory is private and has no etc/ copy).
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    name = "postfix"

    def __init__(self, run: Path, port: int) -> None:
        self.root = run / "postfix"
        self.dir = self.root / "etc"  # config directory (postfix -c)
        self.queue = self.root / "queue"  # owned by root; post-install makes the subdirectories
        self.data = self.root / "data"
        self.port = port
        self.started = False
        self.master = 0

    def _postfix(self, *args: str) -> None:
        r = subprocess.run(
            [POSTFIX, "-c", str(self.dir), *args], capture_output=True, text=True, check=False
        )
        if r.returncode != 0:
            raise RuntimeError(f"postfix {' '.join(args)} failed: {r.stdout}{r.stderr}")

    def start(self) -> None:
        for d in (self.dir, self.queue, self.data):
            d.mkdir(parents=True)
        shutil.chown(self.data, "postfix")
        (self.dir / "main.cf").write_text(
            MAIN_CF.format(queue=self.queue, data=self.data, root=self.root, domain=DOMAIN)
        )
        (self.dir / "master.cf").write_text(MASTER_CF.format(port=self.port))
        self._postfix("check")
        self._postfix("start")
        self.started = True
        pidfile = self.queue / "pid" / "master.pid"
        deadline = time.monotonic() + 10
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.master = int(pidfile.read_text().split()[0])
        wait_greeting(self.port, b"220", 30)

    def cpu_s(self) -> float:
        return tree_cpu_s(self.master)

    def queued(self) -> int:
        n = 0
        for sub in QUEUE_SUBDIRS:
            for _root, _dirs, files in os.walk(self.queue / sub):
                n += len(files)
        return n

    def settle(self) -> None:
        """Wait until the queue is empty (delivery to `discard` after the 250s)."""
        deadline = time.monotonic() + 120
        while self.queued() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.queued():
            raise RuntimeError(f"postfix queue not drained: {self.queued()} files")

    def rss_mb(self) -> float:
        return tree_rss_mb(self.master)

    def stop(self) -> None:
        if self.started:
            self._postfix("stop")
            self.started = False


Server = Mailharbor | Postfix


# --- load -----------------------------------------------------------------------------------


def smtp_source(port: int, messages: int, conn_per_msg: bool) -> float:
    """Run smtp-source; return the wall time in seconds."""
    cmd = [SMTP_SOURCE, "-s", str(SESSIONS), "-m", str(messages), "-l", str(MSG_LEN)]
    if not conn_per_msg:
        cmd.append("-d")  # -d: don't disconnect, next message over the same connection
    cmd += ["-f", SENDER, "-t", RCPT, f"127.0.0.1:{port}"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0 or r.stderr.strip():
        raise RuntimeError(f"smtp-source failed ({r.returncode}): {r.stderr.strip()[:500]}")
    return wall


def make_body(n: int) -> bytes:
    head = (
        f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: bench {n}\r\n"
        f"Message-ID: <bench-{n}@example.org>\r\n\r\n"
    ).encode()
    line = b"La La La La La La La La La La La La La La La La La La La La La La La La La\r\n"
    body = head + line * ((MSG_LEN - len(head)) // len(line) + 1)
    return body[: MSG_LEN - 2].rstrip(b"\r") + b"\r\n"


async def _read_reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise RuntimeError("connection closed")
        if line[3:4] != b"-":
            return line


async def _session(port: int, count: int, first: int, lat: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _read_reply(reader)
        writer.write(b"EHLO bench.client\r\n")
        await _read_reply(reader)
        for i in range(first, first + count):
            writer.write(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode())
            for expect in (b"250", b"250", b"354"):
                reply = await _read_reply(reader)
                if not reply.startswith(expect):
                    raise RuntimeError(f"expected {expect!r}, got {reply!r}")
            writer.write(make_body(i))
            await writer.drain()
            t0 = time.perf_counter()
            writer.write(b".\r\n")
            reply = await _read_reply(reader)
            lat.append(time.perf_counter() - t0)
            if not reply.startswith(b"250"):
                raise RuntimeError(f"end of data: {reply!r}")
        writer.write(b"QUIT\r\n")
        await _read_reply(reader)
    finally:
        writer.close()


async def _latency_run(port: int, messages: int) -> tuple[list[float], float]:
    lat: list[float] = []
    per = [messages // SESSIONS + (1 if i < messages % SESSIONS else 0) for i in range(SESSIONS)]
    starts = [sum(per[:i]) for i in range(SESSIONS)]
    t0 = time.perf_counter()
    await asyncio.gather(*(_session(port, n, s, lat) for n, s in zip(per, starts, strict=True)))
    return lat, time.perf_counter() - t0


def latency_run(port: int, messages: int) -> tuple[list[float], float]:
    return asyncio.run(_latency_run(port, messages))


# --- the run --------------------------------------------------------------------------------


def measure(server: Server, plan: Plan) -> dict[str, float]:
    """One A or B turn: smtp-source conn/session, smtp-source conn/message, latency client."""
    n = plan.messages
    server.settle()
    c0 = server.cpu_s()
    wall = smtp_source(server.port, n, conn_per_msg=False)
    cpu_accept = server.cpu_s() - c0
    server.settle()  # Postfix: count the queue manager's and discard's CPU too
    cpu = server.cpu_s() - c0
    wall_cpm = smtp_source(server.port, n, conn_per_msg=True)
    server.settle()
    lat, lat_wall = latency_run(server.port, n)
    server.settle()
    return {
        "msgs_per_s": n / wall,
        "cpu_ms_per_msg": cpu * 1000 / n,
        "cpu_ms_per_msg_until_last_250": cpu_accept * 1000 / n,
        "msgs_per_s_conn_per_msg": n / wall_cpm,
        "p50_ms": percentile(lat, 0.5) * 1000,
        "p99_ms": percentile(lat, 0.99) * 1000,
        "latency_client_msgs_per_s": n / lat_wall,
    }


def run(plan: Plan, keep: bool) -> dict[str, Any]:
    started = time.perf_counter()
    for tool in (POSTFIX, SMTP_SOURCE, str(BIN / "mailharbor")):
        if not os.access(tool, os.X_OK):
            raise SystemExit(f"{tool} missing: run `make bench-deps` (Postfix) / `make` (venv)")
    if os.geteuid() != 0:
        raise SystemExit("needs root (a private Postfix instance)")
    rundir = REPO / "run" / f"bench-smtp-{os.getpid()}"
    rundir.mkdir(parents=True)
    mh = Mailharbor(rundir, free_port())
    pf = Postfix(rundir, free_port())
    results: dict[str, list[dict[str, float]]] = {"mailharbor": [], "postfix": []}
    try:
        log(f"# run dir {rundir}; mailharbor :{mh.port}, postfix :{pf.port}")
        mh.start()
        pf.start()
        servers: tuple[Server, Server] = (mh, pf)
        for s in servers:  # warm-up: imports, caches, process pools
            smtp_source(s.port, plan.warmup, conn_per_msg=False)
            latency_run(s.port, plan.warmup)
            s.settle()
        for r in range(plan.rounds):
            for s in servers:
                log(f"# round {r + 1}/{plan.rounds}: {s.name}")
                m = measure(s, plan)
                results[s.name].append(m)
                log("#   " + ", ".join(f"{k}={v:.2f}" for k, v in m.items()))
        mh_rss = mh.rss_mb()
        pf_rss = pf.rss_mb()
    finally:
        for stop in (mh.stop, pf.stop):
            try:
                stop()
            except Exception as e:  # keep cleaning up
                log(f"# cleanup: {e}")
        if keep:
            log(f"# kept {rundir}")
        else:
            shutil.rmtree(rundir, ignore_errors=True)

    def med(name: str, key: str) -> float:
        return statistics.median(m[key] for m in results[name])

    res: dict[str, Any] = {
        "msgs_per_s": round(med("mailharbor", "msgs_per_s"), 1),
        "postfix_msgs_per_s": round(med("postfix", "msgs_per_s"), 1),
    }
    res["ratio"] = round(res["msgs_per_s"] / res["postfix_msgs_per_s"], 3)
    res["msgs_per_s_conn_per_msg"] = round(med("mailharbor", "msgs_per_s_conn_per_msg"), 1)
    res["postfix_msgs_per_s_conn_per_msg"] = round(med("postfix", "msgs_per_s_conn_per_msg"), 1)
    res["cpu_ms_per_msg"] = round(med("mailharbor", "cpu_ms_per_msg"), 3)
    res["postfix_cpu_ms_per_msg"] = round(med("postfix", "cpu_ms_per_msg"), 3)
    res["p50_ms"] = round(med("mailharbor", "p50_ms"), 2)
    res["p99_ms"] = round(med("mailharbor", "p99_ms"), 2)
    res["postfix_p50_ms"] = round(med("postfix", "p50_ms"), 2)
    res["postfix_p99_ms"] = round(med("postfix", "p99_ms"), 2)
    res["rss_mb"] = round(mh_rss, 1)
    res["postfix_rss_mb"] = round(pf_rss, 1)

    n, sess = plan.messages, SESSIONS
    src = f"smtp-source -s {sess} -m {n} -l {MSG_LEN}"
    lines = [
        ("msgs_per_s", "", f"mailharbor, {src} -d (1 connection per session)"),
        ("postfix_msgs_per_s", "", "Postfix, same load (acceptance only; queue drained after)"),
        ("ratio", "", "msgs_per_s / postfix_msgs_per_s"),
        ("msgs_per_s_conn_per_msg", "", f"mailharbor, {src} (1 connection per message)"),
        ("postfix_msgs_per_s_conn_per_msg", "", "Postfix, same"),
        ("cpu_ms_per_msg", "", "mailharbor process tree utime+stime during the -d run"),
        ("postfix_cpu_ms_per_msg", "", "Postfix master tree (smtpd, cleanup, qmgr, ...) incl."),
        ("p50_ms", "", f"mailharbor, end of data -> 250, asyncio client, {sess} sessions"),
        ("p99_ms", "", "mailharbor, same"),
        ("postfix_p50_ms", "", "Postfix, same client"),
        ("postfix_p99_ms", "", "Postfix, same client"),
        ("rss_mb", "", "mailharbor serve VmRSS after all runs"),
        ("postfix_rss_mb", "", "sum of VmRSS over Postfix's process tree after all runs"),
    ]
    for key, _unit, what in lines:
        mark = ""
        if key in TARGETS:
            op, target = TARGETS[key]
            mark = f"  [target {op} {target}: {'met' if met(key, res[key]) else 'MISSED'}]"
        print(f"{key:33} {res[key]:>10}  {what}{mark}", flush=True)
    elapsed = time.perf_counter() - started
    print(f"# medians of {plan.rounds} A/B rounds (mailharbor, postfix, ...), {n} msgs per run")
    print(f"# elapsed {elapsed:.1f} s", flush=True)
    res["targets"] = {k: met(k, res[k]) for k in TARGETS}
    res["quick"] = plan.quick
    res["messages_per_run"] = n
    res["sessions"] = sess
    res["elapsed_s"] = round(elapsed, 1)
    res["tools"] = {
        "smtp-source": [
            "msgs_per_s",
            "postfix_msgs_per_s",
            "ratio",
            "msgs_per_s_conn_per_msg",
            "postfix_msgs_per_s_conn_per_msg",
            "cpu_ms_per_msg",
            "postfix_cpu_ms_per_msg",
        ],
        "bench/smtp.py asyncio client": ["p50_ms", "p99_ms", "postfix_p50_ms", "postfix_p99_ms"],
    }
    res["details"] = {
        name: [{k: round(v, 3) for k, v in m.items()} for m in ms] for name, ms in results.items()
    }
    return res


def met(key: str, value: float) -> bool:
    op, target = TARGETS[key]
    return value >= target if op == ">=" else value <= target


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="500 messages per run, under a minute")
    p.add_argument("--keep", action="store_true", help="keep run/bench-smtp-<pid>")
    args = p.parse_args(argv)
    result = run(QUICK if args.quick else FULL, args.keep)
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
