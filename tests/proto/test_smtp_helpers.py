"""A tiny in-memory driver for SmtpServerConnection, shared by the SMTP engine tests (no tests)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from mailharbor.proto.smtp import (
    NEED_DATA,
    AuthRequest,
    BdatChunk,
    ConnectionClosed,
    DataChunk,
    DataEnd,
    Event,
    MailFrom,
    RcptTo,
    Reply,
    Sentinel,
    SmtpServerConfig,
    SmtpServerConnection,
    StartTls,
)

OK = Reply(250, "2.0.0", "Ok")
E = TypeVar("E")


def default_answer(ev: Event) -> Reply:
    if isinstance(ev, AuthRequest):
        good = ev.password == "secret"
        return Reply(235, "2.7.0", "Authenticated") if good else Reply(535, "5.7.8", "No")
    if isinstance(ev, RcptTo) and ev.address.startswith("nobody@"):
        return Reply(550, "5.1.1", "No such user")
    return OK


@dataclass
class Driver:
    conn: SmtpServerConnection
    answer: Callable[[Event], Reply] = default_answer
    events: list[Event] = field(default_factory=list)
    out: bytearray = field(default_factory=bytearray)
    tls_on_starttls: bool = True
    lmtp_answer: Callable[[int], list[Reply]] = lambda n: [OK] * n

    @classmethod
    def new(cls, lmtp: bool = False, **config: object) -> Driver:
        cfg = SmtpServerConfig(hostname="mx.test", **config)  # type: ignore[arg-type]
        d = cls(SmtpServerConnection(cfg, lmtp=lmtp))
        d.out += d.conn.data_to_send()
        return d

    def pump(self) -> None:
        while True:
            ev = self.conn.next_event()
            if ev is NEED_DATA:
                break
            assert not isinstance(ev, Sentinel), "driver always answers, never PAUSED"
            self.events.append(ev)
            if isinstance(ev, (MailFrom, RcptTo, AuthRequest, DataEnd)) or (
                isinstance(ev, BdatChunk) and ev.last
            ):
                if self.conn.lmtp and isinstance(ev, (DataEnd, BdatChunk)):
                    n = self.conn.accepted_recipients
                    self.out += self.conn.send_lmtp_replies(self.lmtp_answer(n))
                else:
                    self.out += self.conn.send(self.answer(ev))
            elif isinstance(ev, StartTls) and self.tls_on_starttls:
                self.out += self.conn.data_to_send()
                self.conn.starttls_done()
            elif isinstance(ev, ConnectionClosed):
                break
        self.out += self.conn.data_to_send()

    def feed(self, data: bytes, pieces: Iterable[int] | None = None) -> Driver:
        if pieces is None:
            self.conn.receive_data(data)
            self.pump()
        else:
            pos = 0
            for n in pieces:
                self.conn.receive_data(data[pos : pos + n])
                self.pump()
                pos += n
            if pos < len(data):
                self.conn.receive_data(data[pos:])
                self.pump()
        return self

    def bytewise(self, data: bytes) -> Driver:
        return self.feed(data, [1] * len(data))

    def codes(self) -> list[int]:
        return [int(line[:3]) for line in self.lines() if line[3:4] != b"-"]

    def lines(self) -> list[bytes]:
        return bytes(self.out).split(b"\r\n")[:-1]

    def message(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, (DataChunk, BdatChunk)))

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]
