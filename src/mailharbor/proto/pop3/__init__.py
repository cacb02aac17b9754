"""POP3 server engine (RFC 1939, RFC 2449 CAPA, RFC 2595 STLS, RFC 5034 SASL), sans-IO (h11 style).

Invariants (details in :mod:`.server`): no peer input makes the engine raise; replies leave in
command order; memory is bounded by the limits in :class:`Pop3Limits`; nothing received before
TLS survives STLS; nothing about a mailbox is answered before login, and plaintext login is
refused before TLS unless allowed; deletions reach the application only in the UPDATE state
(QUIT), never on EOF; all transitions live in one table; Python exception text never goes on
the wire.

Driving it (an adapter, roughly)::

    conn = Pop3ServerConnection(Pop3ServerConfig(hostname="pop.example"))
    write(conn.data_to_send())                     # +OK greeting
    while not conn.closing:
        conn.receive_data(await read())            # b"" on EOF
        while (ev := conn.next_event()) not in (NEED_DATA, PAUSED):
            match ev:
                case AuthRequest():  drop = check_and_open(ev)
                                     write(conn.send(ok("Logged in"), maildrop=drop.listing))
                case Retrieve():     write(conn.send(ok("message follows", body=drop.get(ev))))
                case Update():       await drop.remove(ev.deleted)   # durable first
                                     write(conn.send(ok("Bye")))
                case StartTls():     write(conn.data_to_send()); await tls()
                                     conn.starttls_done()
                case ConnectionClosed(): break
        write(conn.data_to_send())
"""

from .events import (
    NEED_DATA,
    PAUSED,
    AuthRequest,
    ConnectionClosed,
    DropListing,
    Event,
    Pop3ProtocolError,
    Pop3UsageError,
    ProtocolViolation,
    Quit,
    Reply,
    Retrieve,
    Sentinel,
    StartTls,
    Update,
    err,
    ok,
    stuff,
)
from .server import Pop3Limits, Pop3ServerConfig, Pop3ServerConnection, State, top_of

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "AuthRequest",
    "ConnectionClosed",
    "DropListing",
    "Event",
    "Pop3Limits",
    "Pop3ProtocolError",
    "Pop3ServerConfig",
    "Pop3ServerConnection",
    "Pop3UsageError",
    "ProtocolViolation",
    "Quit",
    "Reply",
    "Retrieve",
    "Sentinel",
    "StartTls",
    "State",
    "Update",
    "err",
    "ok",
    "stuff",
    "top_of",
]
