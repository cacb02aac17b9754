"""A client of an implicit-TLS listener behind a PROXY v2 sender that sends the header and its
TLS ClientHello in one write (what a forwarder does when the client speaks first), then finishes
the handshake over memory BIOs: the case where a listener that reads the header through a
buffered reader loses the ClientHello and the handshake stalls."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ProxiedTls:
    """One connection from ``source``: PROXY header + ClientHello in a single ``sendall``."""

    def __init__(
        self, port: int, header: bytes, *, source: str = "127.0.0.2", timeout: float = 10
    ) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = _client_context().wrap_bio(
            self.incoming, self.outgoing, server_hostname="mail.example.org"
        )
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        hello = self.outgoing.read()
        assert hello[:1] == b"\x16"  # a TLS handshake record: the ClientHello
        self.sock = socket.create_connection(("127.0.0.1", port), timeout, (source, 0))
        self.sock.sendall(header + hello)  # one write, one segment on loopback
        self._until(self.tls.do_handshake)
        self._flush()  # the client's Finished

    def _flush(self) -> None:
        if data := self.outgoing.read():
            self.sock.sendall(data)

    def _until(self, step: Callable[[], T]) -> T:
        while True:
            try:
                return step()
            except ssl.SSLWantReadError:
                self._flush()
                chunk = self.sock.recv(65536)  # socket.timeout if the server stalls
                if not chunk:
                    raise ConnectionError("closed by the server during TLS") from None
                self.incoming.write(chunk)

    def line(self) -> bytes:
        """The next line the service sends, over TLS."""
        out = b""
        while not out.endswith(b"\r\n"):
            data = self._until(lambda: self.tls.read(1))
            if not data:
                break
            out += data
        return out

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def close(self) -> None:
        self.sock.close()
