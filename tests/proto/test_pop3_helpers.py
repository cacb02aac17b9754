"""A tiny in-memory driver for Pop3ServerConnection, shared by the POP3 engine tests (no tests)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mailharbor.proto.pop3 import (
    NEED_DATA,
    AuthRequest,
    ConnectionClosed,
    DropListing,
    Event,
    Pop3ServerConfig,
    Pop3ServerConnection,
    Reply,
    Retrieve,
    Sentinel,
    StartTls,
    Update,
    err,
    ok,
)

E = TypeVar("E")
#: Status lines that start a multi-line response (LIST, RETR, CAPA, UIDL, AUTH, TOP).
_MULTI = re.compile(
    rb"\+OK (\d+ octets|\d+ messages \(\d+ octets\)|Capability list follows"
    rb"|Unique-ID listing follows|Supported mechanisms follow|Top of message follows)"
)

MESSAGES = (
    b"From: a@example.org\r\nSubject: one\r\n\r\nline 1\r\n.dot line\r\nline 3\r\n",
    b"Subject: two\r\nX-Long: y\r\n\r\n" + b"".join(b"body %d\r\n" % i for i in range(10)),
    b"Subject: three\r\n\r\n..two dots\r\n.\r\nlast",
)
UIDS = ("0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210", "00ff" * 8)
LISTING = DropListing(tuple(len(m) for m in MESSAGES), UIDS)


def default_answer(ev: Event) -> tuple[Reply, DropListing | None]:
    if isinstance(ev, AuthRequest):
        if ev.password == "secret":
            return ok("Logged in"), LISTING
        return err("Authentication failed", "AUTH"), None
    if isinstance(ev, Retrieve):
        text = f"{len(MESSAGES[ev.index])} octets" if ev.lines is None else "Top of message follows"
        return ok(text, MESSAGES[ev.index]), None
    if isinstance(ev, Update):
        return ok("Bye"), None
    raise AssertionError(f"unexpected {ev}")


@dataclass
class Driver:
    conn: Pop3ServerConnection
    answer: Callable[[Event], tuple[Reply, DropListing | None]] = default_answer
    events: list[Event] = field(default_factory=list)
    out: bytearray = field(default_factory=bytearray)
    tls_on_stls: bool = True

    @classmethod
    def new(cls, tls_active: bool = False, **config: Any) -> Driver:
        cfg = Pop3ServerConfig(hostname="pop.test", **config)
        d = cls(Pop3ServerConnection(cfg, tls_active=tls_active))
        d.out += d.conn.data_to_send()
        return d

    def pump(self) -> None:
        while True:
            ev = self.conn.next_event()
            if ev is NEED_DATA:
                break
            assert not isinstance(ev, Sentinel), "driver always answers, never PAUSED"
            self.events.append(ev)
            if isinstance(ev, (AuthRequest, Retrieve, Update)):
                reply, drop = self.answer(ev)
                self.out += self.conn.send(reply, maildrop=drop)
            elif isinstance(ev, StartTls) and self.tls_on_stls:
                self.out += self.conn.data_to_send()
                self.conn.starttls_done()
            elif isinstance(ev, ConnectionClosed):
                break
        self.out += self.conn.data_to_send()

    def feed(self, data: bytes, pieces: Iterable[int] | None = None) -> Driver:
        if pieces is None:
            if data:  # b"" would be EOF
                self.conn.receive_data(data)
            self.pump()
            return self
        pos = 0
        for n in pieces:
            if pos >= len(data):
                break
            self.conn.receive_data(data[pos : pos + n])
            self.pump()
            pos += n
        if pos < len(data):
            self.conn.receive_data(data[pos:])
            self.pump()
        return self

    def bytewise(self, data: bytes) -> Driver:
        return self.feed(data, [1] * len(data))

    def take(self) -> bytes:
        out = bytes(self.out)
        self.out.clear()
        return out

    def lines(self) -> list[bytes]:
        return bytes(self.out).split(b"\r\n")[:-1]

    def statuses(self) -> list[bytes]:
        """The first word of every status line (``+OK``/``-ERR``/``+``), skipping multi-line
        bodies by parsing the output as a client would."""
        return [s.split(b" ", 1)[0] for s in self.status_lines()]

    def status_lines(self) -> list[bytes]:
        """Status lines; after a ``+OK`` whose command was multi-line, skips to ``.``."""
        return [line for line, _ in parse_responses(bytes(self.out))]

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]


def parse_responses(data: bytes) -> list[tuple[bytes, bytes | None]]:
    """Split server output into (status line, unstuffed multi-line body or None); a ``+OK`` is
    multi-line when its text is one the engine or the default driver uses for one."""
    out: list[tuple[bytes, bytes | None]] = []
    lines = data.split(b"\r\n")
    i = 0
    while i < len(lines) - 1:
        line = lines[i]
        i += 1
        multi = bool(_MULTI.fullmatch(line))
        if not multi:
            out.append((line, None))
            continue
        body: list[bytes] = []
        while i < len(lines) - 1 and lines[i] != b".":
            ln = lines[i]
            body.append(ln[1:] if ln.startswith(b".") else ln)
            i += 1
        i += 1  # the terminator
        out.append((line, b"".join(b + b"\r\n" for b in body)))
    return out
