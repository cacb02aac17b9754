"""SMTP/ESMTP and LMTP server engine, sans-IO (h11 style).

Invariants (details in :mod:`.server`): no peer input makes the engine raise; replies leave in
command order; memory is bounded by the limits in :class:`SmtpLimits`; only
``<CR><LF>.<CR><LF>`` ends DATA and BDAT octets are counted, never parsed (no SMTP smuggling);
nothing received before TLS survives STARTTLS; all transitions live in one table; Python
exception text never goes on the wire.

Driving it (an adapter, roughly)::

    conn = SmtpServerConnection(SmtpServerConfig(hostname="mx.example"))
    write(conn.data_to_send())                     # 220 greeting
    while not conn.closing:
        conn.receive_data(await read())            # b"" on EOF
        while (ev := conn.next_event()) not in (NEED_DATA, PAUSED):
            match ev:
                case RcptTo(address=a):  write(conn.send(Reply(250, "2.1.5", "Ok")))
                case MailFrom():         write(conn.send(Reply(250, "2.1.0", "Ok")))
                case DataChunk(data=d):  spool(d)
                case DataEnd():          await durable(); write(conn.send(ok_reply))
                case StartTls():         write(conn.data_to_send()); await tls()
                                         conn.starttls_done()
                case ConnectionClosed(): break
        write(conn.data_to_send())

Events that need the application's answer: MailFrom, RcptTo, DataEnd, BdatChunk(last=True),
AuthRequest (``send``; LMTP messages: ``send_lmtp_replies``). Everything else is answered by the
engine itself.
"""

from .authlimit import AuthFailures, address_key
from .events import (
    NEED_DATA,
    PAUSED,
    AuthRequest,
    BdatChunk,
    ConnectionClosed,
    DataAborted,
    DataChunk,
    DataEnd,
    DataStart,
    Ehlo,
    Event,
    Helo,
    MailFrom,
    MailParams,
    Noop,
    ProtocolViolation,
    Quit,
    RcptParams,
    RcptTo,
    Reply,
    Rset,
    Sentinel,
    SmtpProtocolError,
    SmtpUsageError,
    StartTls,
)
from .server import BareNewline, SmtpLimits, SmtpServerConfig, SmtpServerConnection, State

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "AuthFailures",
    "AuthRequest",
    "BareNewline",
    "BdatChunk",
    "ConnectionClosed",
    "DataAborted",
    "DataChunk",
    "DataEnd",
    "DataStart",
    "Ehlo",
    "Event",
    "Helo",
    "MailFrom",
    "MailParams",
    "Noop",
    "ProtocolViolation",
    "Quit",
    "RcptParams",
    "RcptTo",
    "Reply",
    "Rset",
    "Sentinel",
    "SmtpLimits",
    "SmtpProtocolError",
    "SmtpServerConfig",
    "SmtpServerConnection",
    "SmtpUsageError",
    "StartTls",
    "State",
    "address_key",
]
