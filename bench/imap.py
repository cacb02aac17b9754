"""IMAP benchmark: mailharbor against a private Dovecot, A/B/A/B in one run.

Run from the repository root as root (see bench/README.md, section bench/imap.py)::

    python bench/imap.py [--quick] [--keep] [--seed N]

Both servers get the same prepared INBOX of 1,000 realistic messages (seeded: plain, multipart
alternative and mixed with attachments, encoded-word headers), loaded over IMAP with APPEND.
Load: an asyncio generator in this process, 10 logged-in clients on that INBOX, each running a
fixed script N times:

    SELECT INBOX; FETCH 1:* (FLAGS); FETCH a:a+19 (ENVELOPE); FETCH a:a+19 (BODYSTRUCTURE);
    FETCH b BODY[]; SEARCH UNSEEN; SEARCH FROM "name"; STORE c +FLAGS/-FLAGS (\\Flagged);
    APPEND INBOX (\\Deleted) {message}; UID EXPUNGE <the APPENDUID>

(10 commands per iteration.) Before the servers, the same generator runs against a canned-reply
server (a separate process answering every command with fixed responses of realistic size), to
show that the generator alone is not the bottleneck: `generator_vs_dovecot` must be >= 2.
Server CPU is utime+stime (+ reaped children) over the server's process tree from /proc.
Human lines first; the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
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

DOVECOT = "/usr/sbin/dovecot"
DOMAIN = "bench.test"
USER = f"user@{DOMAIN}"
PASSWORD = "bench-pw"
CLIENTS = 10
MESSAGES = 1000
TARGETS: dict[str, tuple[str, float]] = {
    "ratio": (">=", 0.5),
    "bodystructure_vs_envelope": ("<=", 1.2),
    "generator_vs_dovecot": (">=", 2.0),
}
NAMES = [
    ("Alice Martin", "alice"),
    ("Bob Müller", "bob"),
    ("Chloé Dubois", "chloe"),
    ("Dmitri Ivanov", "dmitri"),
    ("Eva Nováková", "eva"),
    ("Farid Haddad", "farid"),
    ("Grace Hopper", "grace"),
    ("Hiro Tanaka", "hiro"),
    ("Ingrid Olsen", "ingrid"),
    ("Jamal Reed", "jamal"),
]
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
_WORD_TEXT = (
    "the server message mailbox replication failover quota report meeting invoice budget "
    "project review draft schedule update release customer support ticket please thanks "
    "regards tomorrow attached version network storage backup cluster witness fence"
)
WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True, slots=True)
class Plan:
    quick: bool
    iterations: int
    rounds: int


QUICK = Plan(quick=True, iterations=10, rounds=2)
FULL = Plan(quick=False, iterations=25, rounds=2)


# --- the corpus -------------------------------------------------------------------------------


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _paragraphs(rng: random.Random, size: int) -> str:
    lines: list[str] = []
    total = 0
    while total < size:
        line = _words(rng, rng.randint(6, 12)).capitalize() + "."
        lines.append(line)
        total += len(line) + 2
        if rng.random() < 0.15:
            lines.append("")
    return "\r\n".join(lines)


def _encoded_name(name: str) -> str:
    if name.isascii():
        return f'"{name}"'
    return "=?utf-8?b?" + base64.b64encode(name.encode()).decode() + "?="


def make_message(rng: random.Random, i: int) -> tuple[bytes, str]:
    """One realistic message and the sender's local part (for SEARCH FROM)."""
    name, local = rng.choice(NAMES)
    to_name, to_local = rng.choice(NAMES)
    subject = _words(rng, rng.randint(3, 8)).capitalize()
    if rng.random() < 0.2:
        subject = "=?utf-8?q?" + subject.replace(" ", "_") + "_=C3=A9t=C3=A9?="
    date = format_datetime(EPOCH + timedelta(minutes=17 * i))
    head = [
        f"From: {_encoded_name(name)} <{local}@example.org>",
        f"To: {_encoded_name(to_name)} <{to_local}@{DOMAIN}>",
        f"Subject: {subject}",
        f"Date: {date}",
        f"Message-ID: <bench-{i}.{rng.getrandbits(32):08x}@example.org>",
        "MIME-Version: 1.0",
    ]
    if rng.random() < 0.3:
        head.append(f"Cc: {NAMES[(i * 7) % len(NAMES)][1]}@example.org")
    kind = rng.random()
    text = _paragraphs(rng, int(rng.lognormvariate(8.0, 0.7)))  # median ~3 KiB
    if kind < 0.55:
        head.append("Content-Type: text/plain; charset=utf-8")
        body = text
    elif kind < 0.85:
        b = f"alt-{i}"
        html = "<html><body><p>" + text.replace("\r\n", "</p>\r\n<p>") + "</p></body></html>"
        head.append(f'Content-Type: multipart/alternative; boundary="{b}"')
        body = (
            f"--{b}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"
            f"--{b}\r\nContent-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n--{b}--"
        )
    else:
        b = f"mix-{i}"
        blob = rng.randbytes(int(rng.uniform(8_000, 60_000)))
        att = base64.encodebytes(blob).decode().replace("\n", "\r\n")
        head.append(f'Content-Type: multipart/mixed; boundary="{b}"')
        body = (
            f"--{b}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"
            f"--{b}\r\nContent-Type: application/pdf; name=report-{i}.pdf\r\n"
            f"Content-Disposition: attachment; filename=report-{i}.pdf\r\n"
            f"Content-Transfer-Encoding: base64\r\n\r\n{att}--{b}--"
        )
    return ("\r\n".join(head) + "\r\n\r\n" + body + "\r\n").encode(), local


def make_corpus(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [make_message(rng, i)[0] for i in range(MESSAGES)]


# --- a minimal IMAP client ------------------------------------------------------------------


class ImapError(Exception):
    pass


_LITERAL_AT_END = re.compile(rb"\{(\d+)\+?\}\r\n$")


class Client:
    """Just enough IMAP for the script: tagged commands, literals in responses, APPEND."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.n = 0

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
        c = cls(reader, writer)
        greeting = await reader.readuntil(b"\r\n")
        if not greeting.startswith(b"* OK"):
            raise ImapError(f"greeting {greeting!r}")
        return c

    async def _line(self) -> bytes:
        """One response line with its literals inlined."""
        parts = []
        while True:
            line = await self.reader.readuntil(b"\r\n")
            parts.append(line)
            m = _LITERAL_AT_END.search(line)
            if m is None:
                return b"".join(parts)
            parts.append(await self.reader.readexactly(int(m.group(1))))

    async def command(self, text: bytes, literal: bytes | None = None) -> tuple[list[bytes], bytes]:
        """Send one command; return (untagged lines, the tagged status line). NO/BAD raise."""
        self.n += 1
        tag = b"b%d" % self.n
        if literal is None:
            self.writer.write(tag + b" " + text + b"\r\n")
        else:
            self.writer.write(tag + b" " + text + b" {%d}\r\n" % len(literal))
            cont = await self._line()
            if not cont.startswith(b"+"):
                raise ImapError(f"no continuation: {cont!r}")
            self.writer.write(literal + b"\r\n")
        untagged: list[bytes] = []
        while True:
            line = await self._line()
            if line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise ImapError(f"{text[:40]!r} -> {line[:200]!r}")
                return untagged, line
            untagged.append(line)

    async def login(self) -> None:
        await self.command(b'LOGIN "%s" "%s"' % (USER.encode(), PASSWORD.encode()))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.command(b"LOGOUT"), 5)
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def load_corpus(port: int, corpus: Sequence[bytes]) -> None:
    c = await Client.connect(port)
    await c.login()
    for i, msg in enumerate(corpus):
        flags = b"(\\Seen)" if i % 10 < 7 else b"()"
        await c.command(b"APPEND INBOX " + flags, msg)
    await c.close()


# --- the load --------------------------------------------------------------------------------

COMMANDS = (
    "select",
    "fetch_flags",
    "fetch_envelope",
    "fetch_bodystructure",
    "fetch_body",
    "search_unseen",
    "search_from",
    "store",
    "append",
    "uid_expunge",
)
_APPENDUID = re.compile(rb"\[APPENDUID \d+ (\d+)\]")


@dataclass
class LoadResult:
    wall_s: float
    commands: int
    latencies: dict[str, list[float]] = field(default_factory=dict)

    @property
    def cmds_per_s(self) -> float:
        return self.commands / self.wall_s

    def all_latencies(self) -> list[float]:
        return [x for xs in self.latencies.values() for x in xs]


async def _client_script(
    port: int, cid: int, iterations: int, seed: int, extra: bytes, lat: dict[str, list[float]]
) -> int:
    rng = random.Random(seed * 1000 + cid)
    c = await Client.connect(port)
    await c.login()
    done = 0
    for it in range(iterations):
        a = rng.randint(1, MESSAGES - 19)
        steps: list[tuple[str, bytes, bytes | None]] = [
            ("select", b"SELECT INBOX", None),
            ("fetch_flags", b"FETCH 1:* (FLAGS)", None),
            ("fetch_envelope", b"FETCH %d:%d (ENVELOPE)" % (a, a + 19), None),
            ("fetch_bodystructure", b"FETCH %d:%d (BODYSTRUCTURE)" % (a, a + 19), None),
            ("fetch_body", b"FETCH %d BODY[]" % rng.randint(1, MESSAGES), None),
            ("search_unseen", b"SEARCH UNSEEN", None),
            ("search_from", b'SEARCH FROM "%s"' % rng.choice(NAMES)[1].encode(), None),
            (
                "store",
                b"STORE %d %sFLAGS (\\Flagged)"
                % (rng.randint(1, MESSAGES), b"+" if it % 2 == 0 else b"-"),
                None,
            ),
            ("append", b"APPEND INBOX (\\Deleted)", extra),
        ]
        appended = b""
        for name, text, literal in steps:
            t0 = time.perf_counter()
            _, tagged = await c.command(text, literal)
            lat[name].append(time.perf_counter() - t0)
            done += 1
            if name == "append":
                m = _APPENDUID.search(tagged)
                if m is None:
                    raise ImapError(f"APPEND without APPENDUID: {tagged!r}")
                appended = m.group(1)
        t0 = time.perf_counter()
        await c.command(b"UID EXPUNGE " + appended)
        lat["uid_expunge"].append(time.perf_counter() - t0)
        done += 1
    await c.close()
    return done


async def _load(port: int, iterations: int, seed: int) -> LoadResult:
    extra = make_message(random.Random(seed + 7), MESSAGES + 1)[0]
    lat: dict[str, list[float]] = {name: [] for name in COMMANDS}
    t0 = time.perf_counter()
    counts = await asyncio.gather(
        *(_client_script(port, cid, iterations, seed, extra, lat) for cid in range(CLIENTS))
    )
    return LoadResult(time.perf_counter() - t0, sum(counts), lat)


def run_load(port: int, iterations: int, seed: int) -> LoadResult:
    return asyncio.run(_load(port, iterations, seed))


# --- the canned-reply server -------------------------------------------------------------------


def _canned_replies() -> dict[str, bytes]:
    rng = random.Random(1)
    env = (
        b'ENVELOPE ("Thu, 01 Jan 2026 00:17:00 +0000" "Project review draft schedule" '
        b'(("Alice Martin" NIL "alice" "example.org")) (("Alice Martin" NIL "alice" '
        b'"example.org")) (("Alice Martin" NIL "alice" "example.org")) (("Bob" NIL "bob" '
        b'"bench.test")) NIL NIL NIL "<bench-1.0badcafe@example.org>")'
    )
    bs = (
        b'BODYSTRUCTURE (("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 3120 52 NIL NIL '
        b'NIL NIL)("text" "html" ("charset" "utf-8") NIL NIL "7bit" 3500 60 NIL NIL NIL NIL) '
        b'"alternative" ("boundary" "alt-1") NIL NIL NIL)'
    )
    body = make_message(rng, 1)[0]
    flags = b"".join(b"* %d FETCH (FLAGS (\\Seen))\r\n" % i for i in range(1, MESSAGES + 1))
    return {
        "SELECT": (
            b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n* OK [PERMANENTFLAGS "
            b"(\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags permitted.\r\n"
            b"* %d EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 1700000000] UIDs valid\r\n"
            b"* OK [UIDNEXT 5001] Predicted next UID\r\n" % MESSAGES
        ),
        "FLAGS": flags,
        "ENVELOPE": b"".join(b"* %d FETCH (%s)\r\n" % (i, env) for i in range(1, 21)),
        "BODYSTRUCTURE": b"".join(b"* %d FETCH (%s)\r\n" % (i, bs) for i in range(1, 21)),
        "BODY[]": b"* 7 FETCH (FLAGS (\\Seen) BODY[] {%d}\r\n%s)\r\n" % (len(body), body),
        "SEARCH": b"* SEARCH " + b" ".join(b"%d" % i for i in range(3, MESSAGES, 3)) + b"\r\n",
        "STORE": b"* 5 FETCH (FLAGS (\\Seen \\Flagged))\r\n",
    }


async def _canned_session(
    replies: dict[str, bytes], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.write(b"* OK canned IMAP ready\r\n")
    uid = 5000
    try:
        while True:
            line = await reader.readuntil(b"\r\n")
            tag, _, rest = line.partition(b" ")
            verb = rest.split(b" ", 1)[0].upper()
            out = b""
            if verb == b"APPEND":
                m = _LITERAL_AT_END.search(line)
                if m is None:
                    writer.write(tag + b" BAD no literal\r\n")
                    continue
                writer.write(b"+ go\r\n")
                await reader.readexactly(int(m.group(1)))
                await reader.readuntil(b"\r\n")
                uid += 1
                writer.write(tag + b" OK [APPENDUID 1700000000 %d] APPEND completed\r\n" % uid)
                continue
            if verb == b"SELECT":
                out = replies["SELECT"]
            elif verb == b"FETCH":
                for key in ("BODYSTRUCTURE", "ENVELOPE", "BODY[]", "FLAGS"):
                    if key.encode() in rest:
                        out = replies[key]
                        break
            elif verb == b"SEARCH":
                out = replies["SEARCH"]
            elif verb == b"STORE":
                out = replies["STORE"]
            elif verb == b"UID":
                out = b"* VANISHED 5001\r\n"
            elif verb == b"LOGOUT":
                writer.write(b"* BYE bye\r\n" + tag + b" OK LOGOUT completed\r\n")
                await writer.drain()
                break
            writer.write(out + tag + b" OK done\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _canned_main(port: int) -> None:
    replies = _canned_replies()
    server = await asyncio.start_server(
        lambda r, w: _canned_session(replies, r, w), "127.0.0.1", port, limit=1 << 22
    )
    async with server:
        await server.serve_forever()


# --- servers --------------------------------------------------------------------------------


class Server:
    name = ""
    proc: subprocess.Popen[bytes] | None = None
    port = 0

    def start(self) -> None:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_s(self) -> float:
        return tree_cpu_s(self.pid)

    def rss_mb(self) -> float:
        return tree_rss_mb(self.pid)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Canned(Server):
    name = "canned"

    def __init__(self, port: int) -> None:
        self.port = port

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--canned-server", str(self.port)],
            stdin=subprocess.DEVNULL,
        )
        proc = self.proc
        wait_greeting(self.port, b"* OK", 20, lambda: proc.poll() is None)


class Mailharbor(Server):
    name = "mailharbor"

    def __init__(self, run: Path, port: int) -> None:
        self.dir = run / "mailharbor"
        self.port = port
        self.cfg = self.dir / "mailharbor.toml"

    def _cli(self, *args: str, stdin: bytes | None = None) -> None:
        subprocess.run(
            [str(BIN / "mailharbor"), *args], input=stdin, check=True, capture_output=True
        )

    def start(self) -> None:
        self._cli("init", str(self.dir), "--hostname", "localhost")
        text = self.cfg.read_text()
        head, sep, tail = text.partition("\n[imap]\n")
        if not sep or "\n# listen = []\n" not in tail:
            raise RuntimeError("unexpected mailharbor.toml: no [imap] section with '# listen'")
        tail = tail.replace(
            "\n# listen = []\n",
            f'\nlisten = ["127.0.0.1:{self.port}"]\nallow_plaintext_auth = true\n',
            1,
        )
        self.cfg.write_text(head + sep + tail)
        self._cli("domain", "add", DOMAIN, "--config", str(self.cfg))
        self._cli(
            "account",
            "add",
            USER,
            "--password-stdin",
            "--config",
            str(self.cfg),
            stdin=PASSWORD.encode() + b"\n",
        )
        logf = (self.dir / "serve.log").open("wb")
        self.proc = subprocess.Popen(
            [str(BIN / "mailharbor"), "serve", "--config", str(self.cfg)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        proc = self.proc
        wait_greeting(self.port, b"* OK", 30, lambda: proc.poll() is None)

    def rss_mb(self) -> float:
        return rss_mb(self.pid)


DOVECOT_CONF = """\
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
info_log_path = {dir}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_internal_user = dovecot
default_login_user = dovenull
mail_location = maildir:{dir}/home/%n/Maildir
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {dir}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {dir}/users
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
protocol imap {{
  mail_max_userip_connections = 100
}}
"""


class Dovecot(Server):
    """A private Dovecot: its own config, base and state dirs, Maildir, loopback port only."""

    name = "dovecot"

    def __init__(self, run: Path, port: int) -> None:
        self.dir = run / "dovecot"
        self.port = port
        self.conf = self.dir / "dovecot.conf"

    def start(self) -> None:
        import pwd

        nobody = pwd.getpwnam("nobody")
        for sub in ("run", "state", "home"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        home = self.dir / "home"
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        (self.dir / "users").write_text(
            f"{USER}:{{PLAIN}}{PASSWORD}:{nobody.pw_uid}:{nobody.pw_gid}::{home}/user\n"
        )
        self.conf.write_text(DOVECOT_CONF.format(dir=self.dir, port=self.port))
        self.proc = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(self.dir / "stderr.log").open("wb"),
        )
        proc = self.proc
        try:
            wait_greeting(self.port, b"* OK", 30, lambda: proc.poll() is None)
        except RuntimeError:
            log((self.dir / "stderr.log").read_text()[-2000:])
            raise


# --- running it --------------------------------------------------------------------------------


def measure(server: Server, plan: Plan, seed: int) -> dict[str, Any]:
    cpu0 = server.cpu_s()
    res = run_load(server.port, plan.iterations, seed)
    cpu = server.cpu_s() - cpu0
    lat = res.all_latencies()
    env = statistics.fmean(res.latencies["fetch_envelope"])
    bs = statistics.fmean(res.latencies["fetch_bodystructure"])
    out = {
        "cmds_per_s": res.cmds_per_s,
        "commands": res.commands,
        "wall_s": res.wall_s,
        "cpu_ms_per_cmd": 1000 * cpu / res.commands,
        "p50_ms": 1000 * percentile(lat, 0.5),
        "p99_ms": 1000 * percentile(lat, 0.99),
        "bodystructure_vs_envelope": bs / env,
        "per_command_ms": {
            k: round(1000 * statistics.fmean(v), 3) for k, v in res.latencies.items() if v
        },
        "rss_mb": server.rss_mb(),
    }
    log(
        f"  {server.name:10s} {out['cmds_per_s']:8.0f} cmds/s  cpu {out['cpu_ms_per_cmd']:.2f} "
        f"ms/cmd  p50 {out['p50_ms']:.1f} ms  p99 {out['p99_ms']:.1f} ms  "
        f"rss {out['rss_mb']:.0f} MB"
    )
    return out


def run(plan: Plan, seed: int, keep: bool) -> dict[str, Any]:
    t_start = time.monotonic()
    run_dir = REPO / "run" / f"bench-imap-{os.getpid()}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    os.chmod(run_dir, 0o755)
    log(f"bench/imap: seed {seed}, {CLIENTS} clients x {plan.iterations} iterations, {run_dir}")
    corpus = make_corpus(seed)
    log(f"corpus: {len(corpus)} messages, {sum(map(len, corpus)) / 1e6:.1f} MB")
    servers: list[Server] = []
    results: dict[str, list[dict[str, Any]]] = {"canned": [], "mailharbor": [], "dovecot": []}
    try:
        canned = Canned(free_port())
        servers.append(canned)
        canned.start()
        mh = Mailharbor(run_dir, free_port())
        servers.append(mh)
        mh.start()
        dc = Dovecot(run_dir, free_port())
        servers.append(dc)
        dc.start()
        for srv in (mh, dc):
            t0 = time.monotonic()
            asyncio.run(load_corpus(srv.port, corpus))
            log(f"loaded {srv.name} in {time.monotonic() - t0:.1f} s")
        log("generator against the canned-reply server:")
        results["canned"].append(measure(canned, plan, seed))
        canned.stop()
        for r in range(plan.rounds):
            log(f"round {r + 1}/{plan.rounds}:")
            for srv in (mh, dc):
                results[srv.name].append(measure(srv, plan, seed + r))
    finally:
        for s in servers:
            s.stop()
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)

    def med(name: str, key: str) -> float:
        return float(statistics.median(x[key] for x in results[name]))

    mh_rate = med("mailharbor", "cmds_per_s")
    dc_rate = med("dovecot", "cmds_per_s")
    canned_rate = results["canned"][0]["cmds_per_s"]
    out: dict[str, Any] = {
        "cmds_per_s": round(mh_rate, 1),
        "dovecot_cmds_per_s": round(dc_rate, 1),
        "ratio": round(mh_rate / dc_rate, 3),
        "p50_ms": round(med("mailharbor", "p50_ms"), 2),
        "p99_ms": round(med("mailharbor", "p99_ms"), 2),
        "rss_mb": round(max(x["rss_mb"] for x in results["mailharbor"]), 1),
        "bodystructure_vs_envelope": round(med("mailharbor", "bodystructure_vs_envelope"), 3),
        "generator_cmds_per_s": round(canned_rate, 1),
        "generator_vs_dovecot": round(canned_rate / dc_rate, 2),
        "cpu_ms_per_cmd": round(med("mailharbor", "cpu_ms_per_cmd"), 3),
        "dovecot_cpu_ms_per_cmd": round(med("dovecot", "cpu_ms_per_cmd"), 3),
        "dovecot_p50_ms": round(med("dovecot", "p50_ms"), 2),
        "dovecot_p99_ms": round(med("dovecot", "p99_ms"), 2),
        "dovecot_bodystructure_vs_envelope": round(med("dovecot", "bodystructure_vs_envelope"), 3),
        "quick": plan.quick,
        "seed": seed,
        "clients": CLIENTS,
        "iterations": plan.iterations,
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "details": results,
    }
    out["targets"] = {k: met(k, out[k]) for k in TARGETS}
    return out


def met(key: str, value: float) -> bool:
    op, target = TARGETS[key]
    return value >= target if op == ">=" else value <= target


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="the short run (under 60 s)")
    p.add_argument("--keep", action="store_true", help="keep the run directory")
    p.add_argument("--seed", type=int, default=None, help="corpus and script seed")
    p.add_argument("--canned-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.canned_server:
        with contextlib.suppress(KeyboardInterrupt):
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            asyncio.run(_canned_main(args.canned_server))
        return 0
    if os.geteuid() != 0:
        print("bench/imap.py: must run as root (Dovecot drops to its users)", file=sys.stderr)
        return 2
    if not os.path.exists(DOVECOT):
        print("bench/imap.py: no Dovecot; run `make bench-deps` first", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    out = run(QUICK if args.quick else FULL, seed, args.keep)
    for k in ("cmds_per_s", "dovecot_cmds_per_s", "ratio", "bodystructure_vs_envelope"):
        tgt = ""
        if k in TARGETS:
            verdict = "met" if out["targets"][k] else "MISSED"
            tgt = f"  [target {TARGETS[k][0]} {TARGETS[k][1]}: {verdict}]"
        print(f"{k}: {out[k]}{tgt}")
    print(
        f"generator_vs_dovecot: {out['generator_vs_dovecot']} (generator alone "
        f"{out['generator_cmds_per_s']} cmds/s against canned replies)"
        f"  [target >= 2: {'met' if out['targets']['generator_vs_dovecot'] else 'MISSED'}]"
    )
    print(f"p50_ms: {out['p50_ms']}  p99_ms: {out['p99_ms']}  rss_mb: {out['rss_mb']}")
    print(
        f"cpu_ms_per_cmd: {out['cpu_ms_per_cmd']}  dovecot_cpu_ms_per_cmd: "
        f"{out['dovecot_cpu_ms_per_cmd']}"
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
