"""Modified UTF-7 mailbox names (RFC 3501 section 5.1.3).

IMAP4rev1 carries international mailbox names in a variant of UTF-7: printable US-ASCII
(0x20-0x7E) stands for itself except ``&``, which is written ``&-``; any other run of characters
is UTF-16BE, encoded with base64 using ``,`` instead of ``/`` and no padding, between ``&`` and
``-``. Examples: ``"Entwürfe"`` is ``Entw&APw-rfe``, ``"☺!"`` is ``&Jjo-!``.

Contracts:

- :func:`encode_mutf7` accepts any ``str`` without lone surrogates and returns pure ASCII;
  ``decode_mutf7(encode_mutf7(s)) == s``.
- :func:`decode_mutf7` is strict: it accepts exactly the canonical encodings (what
  :func:`encode_mutf7` produces) and raises :class:`ValueError` for anything else — 8-bit or
  control bytes, an unterminated ``&`` run, bad base64, non-zero pad bits, an encoded run that
  holds printable ASCII or is empty, two adjacent encoded runs, or broken UTF-16. So
  ``encode_mutf7(decode_mutf7(b)) == b`` whenever decoding succeeds.
"""

from __future__ import annotations

import binascii

__all__ = ["decode_mutf7", "encode_mutf7"]


def _is_direct(ch: str) -> bool:
    return 0x20 <= ord(ch) <= 0x7E


def _b64(run: str) -> str:
    try:
        raw = run.encode("utf-16-be")
    except UnicodeEncodeError:
        raise ValueError("lone surrogate in mailbox name") from None
    return binascii.b2a_base64(raw, newline=False).decode("ascii").rstrip("=").replace("/", ",")


def encode_mutf7(name: str) -> str:
    """``name`` in modified UTF-7. Raises ValueError only for a lone surrogate."""
    if name.isascii() and name.isprintable() and "&" not in name:
        return name  # the common case
    out: list[str] = []
    run: list[str] = []
    for ch in name:
        if _is_direct(ch):
            if run:
                out.append("&" + _b64("".join(run)) + "-")
                run.clear()
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    if run:
        out.append("&" + _b64("".join(run)) + "-")
    return "".join(out)


_B64_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,")


def _decode_run(run: str) -> str:
    if not run or any(c not in _B64_CHARS for c in run):
        raise ValueError("bad modified base64")
    if len(run) % 4 == 1:
        raise ValueError("bad modified base64 length")
    padded = run.replace(",", "/") + "=" * (-len(run) % 4)
    raw = binascii.a2b_base64(padded)
    if len(raw) % 2:
        raise ValueError("odd UTF-16 length")
    # canonical: re-encoding must give the same characters (rejects non-zero pad bits)
    if binascii.b2a_base64(raw, newline=False).decode("ascii").rstrip("=") != padded.rstrip("="):
        raise ValueError("non-canonical modified base64")
    try:
        text = raw.decode("utf-16-be")
    except UnicodeDecodeError:
        raise ValueError("bad UTF-16 in mailbox name") from None
    if any(_is_direct(c) for c in text):
        raise ValueError("printable ASCII must not be base64-encoded")
    return text


def decode_mutf7(name: str) -> str:
    """Decode a modified UTF-7 mailbox name; ValueError if it is not canonical mUTF-7."""
    if "&" not in name:
        if not all(_is_direct(c) for c in name):
            raise ValueError("mailbox name has characters outside printable ASCII")
        return name
    out: list[str] = []
    i = 0
    n = len(name)
    prev_encoded = False
    while i < n:
        ch = name[i]
        if ch != "&":
            if not _is_direct(ch):
                raise ValueError("mailbox name has characters outside printable ASCII")
            out.append(ch)
            prev_encoded = False
            i += 1
            continue
        end = name.find("-", i + 1)
        if end < 0:
            raise ValueError("unterminated & sequence")
        if end == i + 1:
            out.append("&")
            prev_encoded = False
        else:
            if prev_encoded:
                raise ValueError("adjacent encoded runs")
            out.append(_decode_run(name[i + 1 : end]))
            prev_encoded = True
        i = end + 1
    return "".join(out)
