"""The mail log: one grep-friendly ``key=value`` line per received transaction.

Invariants
----------
- Lines go to the logger ``mailharbor.mail``; :func:`configure` points it at ``log.mail_log``
  (a file, appended to) or leaves it to propagate to the daemon log (``None`` = standard error).
- One line per transaction the server answered at the end of the message (accepted, rejected by a
  filter, over quota or failed): ``queue_id=… message_id=<…> client=… proto=… from=<…> size=…
  nrcpt=… to=<a>:250 2.0.0,<b>:452 4.2.2 result=…``.
- Values are made safe for one line: control characters and spaces inside values become ``?``
  and ``_``; a value is never longer than 512 characters. Exception text is never logged here.
- With a file configured, :func:`received` writes its line to the handler's stream itself (same
  ``asctime message`` format as the handler's formatter, one write and flush per line, under the
  handler's lock) instead of building a ``LogRecord``: it runs once per message on the event
  loop. Anything else logged to ``mailharbor.mail`` goes through the handler as usual.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence

__all__ = ["LOGGER_NAME", "close", "configure", "message_id_of", "received"]

LOGGER_NAME = "mailharbor.mail"
log = logging.getLogger(LOGGER_NAME)
_handler: logging.Handler | None = None
_MSGID_RE = re.compile(rb"^message-id:[ \t]*(.*?)\r?$", re.IGNORECASE | re.MULTILINE)


def configure(path: os.PathLike[str] | str | None) -> None:
    """Send the mail log to ``path`` (appending), or to the daemon log when ``None``."""
    global _handler
    close()
    if path is None:
        log.propagate = True
        return
    handler = logging.FileHandler(os.fspath(path), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    _handler = handler


def close() -> None:
    """Detach and close the file handler set by :func:`configure`."""
    global _handler
    if _handler is not None:
        log.removeHandler(_handler)
        _handler.close()
        _handler = None
    log.propagate = True


_UNSAFE = re.compile(r"[\x00-\x20\x7f]")


def _safe(value: str) -> str:
    """One log field: spaces and control characters become '?' (keeps key=value greppable)."""
    return _UNSAFE.sub("?", value[:512])


def message_id_of(message: bytes) -> str:
    """The Message-ID header value of ``message`` (header section only), or ``""``."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[: end + 2]
    m = _MSGID_RE.search(head[:65536])
    if m is None:
        return ""
    return m.group(1).strip().decode("ascii", "replace")


def received(
    *,
    queue_id: str,
    message_id: str,
    client: str,
    protocol: str,
    sender: str,
    size: int,
    results: Sequence[tuple[str, str]],
    note: str = "",
    seconds: float = 0.0,
) -> None:
    """Log one received transaction; ``results`` are (recipient, "code enhanced") pairs."""
    accepted = sum(1 for _, r in results if r.startswith("2"))
    if accepted == len(results):
        result = "accepted"
    elif accepted:
        result = "partial"
    else:
        result = "rejected"
    to = ",".join(f"<{_safe(a)}>:{r.replace(' ', '_')}" for a, r in results)
    fields = [
        f"queue_id={_safe(queue_id)}",
        f"message_id={_safe(message_id) or '-'}",
        f"client={_safe(client)}",
        f"proto={_safe(protocol)}",
        f"from=<{_safe(sender)}>",
        f"size={size}",
        f"nrcpt={len(results)}",
        f"to={to}",
        f"result={result}",
    ]
    if note:
        fields.append(f"reason={note.replace(' ', '_')}")
    fields.append(f"delay={seconds:.3f}")
    _emit(" ".join(fields))


_stamp_cache: tuple[int, str] = (-1, "")


def _emit(line: str) -> None:
    global _stamp_cache
    handler = _handler
    if not isinstance(handler, logging.StreamHandler):
        log.info(line)
        return
    now = time.time()
    sec = int(now)
    if _stamp_cache[0] != sec:  # logging.Formatter's default asctime, once per second
        _stamp_cache = (sec, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec)))
    msecs = int((now - sec) * 1000)
    handler.acquire()
    try:
        handler.stream.write(f"{_stamp_cache[1]},{msecs:03d} {line}\n")
        handler.flush()
    except Exception:
        handler.release()
        log.info(line)  # the handler's own error handling reports the failure
        return
    handler.release()
