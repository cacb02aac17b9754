"""Pure parsers for SMTP command arguments: paths (RFC 5321 4.1.2), ESMTP parameters, DSN
(RFC 3461) xtext, SASL base64.

Every parser either returns a value or raises :class:`SmtpProtocolError` carrying the reply to
send; none raises anything else for any input.

Choices, documented:

- Source routes (``<@a,@b:user@c>``) are accepted and ignored, as RFC 5321 4.1.1.3 and C.
  ask and as Postfix does: the address is ``user@c``.
- ``MAIL FROM: <a@b>`` (space after the colon) is tolerated, like Postfix; the angle brackets
  are required.
- The null path ``<>`` is allowed only in MAIL; ``<postmaster>`` (any case, no domain) only in
  RCPT.
- Non-ASCII addresses are accepted only when the transaction declared SMTPUTF8
  (otherwise ``553 5.6.7``); lengths are checked in UTF-8 octets (local part 64, domain 255,
  path 256).
- A quoted local part is kept as written, quotes included.
"""

from __future__ import annotations

import binascii
import ipaddress
import re

from .events import MailParams, RcptParams, Reply, SmtpProtocolError

__all__ = [
    "decode_base64",
    "parse_mail_params",
    "parse_path",
    "parse_rcpt_params",
    "xtext_decode",
]

_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
_LDH = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_MAX_LOCAL = 64
_MAX_DOMAIN = 255
_MAX_PATH = 256
_MAX_ENVID = 100
_MAX_ORCPT = 500


def _syntax(text: str) -> SmtpProtocolError:
    return SmtpProtocolError(Reply(501, "5.5.4", text))


def _bad_address(text: str = "Bad address syntax") -> SmtpProtocolError:
    return SmtpProtocolError(Reply(553, "5.1.3", text))


def _is_atext(ch: str, utf8: bool) -> bool:
    return ch in _ATEXT or (utf8 and ord(ch) >= 0x80)


def _check_domain(domain: str, utf8: bool) -> None:
    if not domain or len(domain.encode("utf-8")) > _MAX_DOMAIN:
        raise _bad_address()
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise _bad_address()
        inner = domain[1:-1]
        try:
            if inner[:5].upper() == "IPV6:":
                ipaddress.IPv6Address(inner[5:])
            else:
                ipaddress.IPv4Address(inner)
        except ValueError:
            raise _bad_address() from None
        return
    for label in domain.split("."):
        if not label or len(label) > 63 or label[0] == "-" or label[-1] == "-":
            raise _bad_address()
        for ch in label:
            if ch not in _LDH and not (utf8 and ord(ch) >= 0x80):
                raise _bad_address()


def _check_local(local: str, utf8: bool) -> None:
    if not local or len(local.encode("utf-8")) > _MAX_LOCAL:
        raise _bad_address()
    if local.startswith('"'):
        # Quoted-string: qtextSMTP (32-126 but " and \) or quoted-pairSMTP ("\" 32-126).
        i, end = 1, len(local) - 1
        if end < 1 or local[end] != '"':
            raise _bad_address()
        while i < end:
            ch = local[i]
            if ch == "\\":
                if i + 1 >= end or not 32 <= ord(local[i + 1]) <= 126:
                    raise _bad_address()
                i += 2
                continue
            if ch == '"' or not (32 <= ord(ch) <= 126 or (utf8 and ord(ch) >= 0x80)):
                raise _bad_address()
            i += 1
        return
    for atom in local.split("."):
        if not atom or not all(_is_atext(ch, utf8) for ch in atom):
            raise _bad_address()


def _find_path_end(text: str) -> int:
    """Index of the ``>`` closing the path that starts at ``text[0] == "<"``, quotes honoured."""
    i, quoted = 1, False
    while i < len(text):
        ch = text[i]
        if quoted:
            if ch == "\\":
                i += 2
                continue
            if ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == ">":
            return i
        i += 1
    raise _syntax("Syntax error in address: missing '>'")


def parse_path(text: str, *, mail: bool, utf8: bool) -> tuple[str, str]:
    """Parse ``<path>`` at the start of ``text``; return ``(address, rest_after_path)``.

    ``mail``: this is MAIL FROM (null path allowed) rather than RCPT TO (``<postmaster>``
    allowed). ``utf8``: non-ASCII may appear (the caller checks SMTPUTF8 was declared).
    """
    if not text.startswith("<"):
        raise _syntax("Syntax error: address must be in angle brackets")
    end = _find_path_end(text)
    inner, rest = text[1:end], text[end + 1 :]
    if rest and not rest.startswith(" "):
        raise _syntax("Syntax error after address")
    if len(inner.encode("utf-8")) + 2 > _MAX_PATH:
        raise _bad_address("Address too long")
    if inner == "":
        if not mail:
            raise _bad_address("Null recipient not allowed")
        return "", rest
    if inner.startswith("@"):
        # A-d-l ":" Mailbox: accepted and ignored (RFC 5321 4.1.1.3 / appendix C).
        colon = inner.find(":")
        if colon < 0:
            raise _bad_address()
        for hop in inner[:colon].split(","):
            if not hop.startswith("@"):
                raise _bad_address()
            _check_domain(hop[1:], utf8)
        inner = inner[colon + 1 :]
    if not mail and inner.lower() == "postmaster":
        return inner, rest
    at = inner.rfind("@")
    if at <= 0:
        raise _bad_address()
    local, domain = inner[:at], inner[at + 1 :]
    _check_local(local, utf8)
    _check_domain(domain, utf8)
    return inner, rest


def _split_params(text: str) -> list[tuple[str, str | None]]:
    seen: set[str] = set()
    out: list[tuple[str, str | None]] = []
    for item in text.split():
        key, eq, value = item.partition("=")
        if not _KEYWORD.match(key) or (eq and not value):
            raise _syntax("Syntax error in parameters")
        if value and any(ord(ch) < 33 or ch == "=" for ch in value):
            raise _syntax("Syntax error in parameters")
        ukey = key.upper()
        if ukey in seen:
            raise _syntax(f"Duplicate parameter {ukey}")
        seen.add(ukey)
        out.append((ukey, value if eq else None))
    return out


def _unsupported(key: str) -> SmtpProtocolError:
    return SmtpProtocolError(Reply(555, "5.5.4", f"Unsupported option: {key[:40]}"))


def xtext_decode(value: str, *, limit: int) -> str:
    """Decode RFC 3461 xtext (``+HH`` escapes, HEX in upper case); raise on malformed input."""
    out = bytearray()
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "+":
            hexpart = value[i + 1 : i + 3]
            if len(hexpart) != 2 or any(c not in "0123456789ABCDEF" for c in hexpart):
                raise _syntax("Bad xtext encoding")
            out.append(int(hexpart, 16))
            i += 3
            continue
        if not 33 <= ord(ch) <= 126 or ch == "=":
            raise _syntax("Bad xtext encoding")
        out.append(ord(ch))
        i += 1
    if len(out) > limit:
        raise _syntax("Parameter value too long")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise _syntax("Bad xtext encoding") from None


def parse_mail_params(text: str, *, dsn: bool, max_size: int) -> MailParams:
    """MAIL FROM parameters. SIZE over ``max_size`` is refused with ``552 5.3.4``."""
    size: int | None = None
    body: str | None = None
    smtputf8 = False
    ret: str | None = None
    envid: str | None = None
    auth: str | None = None
    for key, value in _split_params(text):
        if key == "SIZE":
            if value is None or not value.isdigit() or not value.isascii() or len(value) > 20:
                raise _syntax("Syntax error in SIZE")
            size = int(value)
            if size > max_size:
                raise SmtpProtocolError(
                    Reply(552, "5.3.4", "Message size exceeds fixed limit"), counts=False
                )
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise _unsupported("BODY")
            body = value.upper()
        elif key == "SMTPUTF8":
            if value is not None:
                raise _syntax("SMTPUTF8 takes no value")
            smtputf8 = True
        elif key == "RET" and dsn:
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise _syntax("RET must be FULL or HDRS")
            ret = value.upper()
        elif key == "ENVID" and dsn:
            if value is None:
                raise _syntax("ENVID needs a value")
            envid = xtext_decode(value, limit=_MAX_ENVID)
        elif key == "AUTH":
            if value is None:
                raise _syntax("AUTH needs a value")
            auth = "<>" if value == "<>" else xtext_decode(value, limit=_MAX_ORCPT)
        else:
            raise _unsupported(key)
    return MailParams(size=size, body=body, smtputf8=smtputf8, ret=ret, envid=envid, auth=auth)


_NOTIFY = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def parse_rcpt_params(text: str, *, dsn: bool) -> RcptParams:
    """RCPT TO parameters: NOTIFY and ORCPT (RFC 3461) when DSN is offered."""
    notify: frozenset[str] | None = None
    orcpt: tuple[str, str] | None = None
    for key, value in _split_params(text):
        if key == "NOTIFY" and dsn:
            if value is None:
                raise _syntax("NOTIFY needs a value")
            items = [v.upper() for v in value.split(",")]
            if len(set(items)) != len(items):
                raise _syntax("Duplicate NOTIFY keyword")
            if items == ["NEVER"] or (items and all(v in _NOTIFY for v in items)):
                notify = frozenset(items)
            else:
                raise _syntax("NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY")
        elif key == "ORCPT" and dsn:
            if value is None:
                raise _syntax("ORCPT needs a value")
            addr_type, semi, addr = value.partition(";")
            if not semi or not _KEYWORD.match(addr_type) or not addr:
                raise _syntax("ORCPT must be addr-type;xtext")
            orcpt = (addr_type.lower(), xtext_decode(addr, limit=_MAX_ORCPT))
        else:
            raise _unsupported(key)
    return RcptParams(notify=notify, orcpt=orcpt)


def decode_base64(text: str) -> bytes:
    """Strict base64 for SASL (``=`` alone is the empty response, RFC 4954); ``501 5.5.2``."""
    if text == "=":
        return b""
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise SmtpProtocolError(Reply(501, "5.5.2", "Cannot decode response")) from None
