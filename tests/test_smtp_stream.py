"""Large messages streamed into the store while they arrive (server/smtp.py + MessageSpool):
DATA and BDAT, intact bodies (dot-unstuffing, CRLF repair across chunk boundaries), the local and
the queued copy, RSET/disconnect/over quota leave nothing visible; and a real `mailharbor serve`
node receiving a 20 MiB message through smtplib without its RSS growing by the message size."""

from __future__ import annotations

import hashlib
import shutil
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailharbor.server.smtp import ListenerKind
from mailharbor.service.delivery import normalize_crlf
from test_smtp_limits import LimitHarness, connect, read_all
from test_smtp_server import MAILHARBOR, free_port, read_replies

pytestmark = pytest.mark.timeout(120)
THRESHOLD = 64 * 1024


@pytest.fixture
def sh(unique_name: str) -> Iterator[LimitHarness]:
    root = Path(tempfile.mkdtemp(prefix=unique_name + "-"))
    harness = LimitHarness(root, stream_threshold=THRESHOLD, max_message_size=8 * 1024 * 1024)
    try:
        yield harness
    finally:
        harness.stop()
        shutil.rmtree(root, ignore_errors=True)


def big_message(subject: str, size: int) -> bytes:
    """Headers, then lines of varying length, some starting with '.' (stuffed on the wire)."""
    head = f"From: a@remote.example\r\nSubject: {subject}\r\nMessage-ID: <{subject}@t>\r\n\r\n"
    out = bytearray(head.encode())
    i = 0
    while len(out) < size:
        i += 1
        out += b"." * (i % 3 == 0) + f"line {i} ".encode() + b"z" * (i % 97) + b"\r\n"
    return bytes(out)


def stuffed(message: bytes) -> bytes:
    return message.replace(b"\r\n.", b"\r\n..")


def stored(h: LimitHarness, address: str) -> list[tuple[bytes, int, bool]]:
    """(body, number of chunk locations, has MIME_META) per message of the INBOX."""

    def get() -> list[tuple[bytes, int, bool]]:
        st = h.store
        acct = st.index.account_by_address(address)
        assert acct is not None
        out = []
        for b in st.index.mailboxes[acct.mailboxes["INBOX"]].blobs:
            hsh = st.index.blobs.hash_at(b)
            slot = st.index.blobs.slot(hsh)
            assert slot is not None
            out.append(
                (
                    st.read_blob(hsh),
                    len(st.index.blobs.location(slot)),
                    st.read_mime_meta(hsh) is not None,
                )
            )
        return out

    return h.call(get)


def test_data_streamed_intact_without_mime_meta(sh: LimitHarness) -> None:
    message = big_message("big", 3 * 1024 * 1024)
    small = big_message("small", 2000)
    with smtplib.SMTP("127.0.0.1", sh.port(ListenerKind.MX), timeout=30) as s:
        s.sendmail("a@remote.example", ["alice@example.org"], message)
        s.sendmail("a@remote.example", ["alice@example.org"], small)
    (body, chunks, meta), (sbody, _, smeta) = stored(sh, "alice@example.org")
    assert body.startswith(b"Return-Path: <a@remote.example>\r\nReceived: from ")
    assert body.endswith(b"\r\n" + message)
    assert hashlib.sha256(body[-len(message) :]).digest() == hashlib.sha256(message).digest()
    assert chunks > 1 and not meta  # streamed in chunks; MIME metadata left for later
    assert sbody.endswith(small) and smeta  # the small one took the in-memory path


def test_bdat_streamed_crlf_repaired_across_chunks(sh: LimitHarness) -> None:
    # Bare LFs, and CRLFs split between two BDAT chunks (and two spool writes).
    part = b"Subject: bdat\r\n\r\n" + (b"a bare lf line\nand a crlf line\r\n" * 3000)
    pieces = [part[: THRESHOLD + 5] + b"\r", b"\n" + part, b"tail\r", b"\nend\n"]
    s = connect(sh, ListenerKind.MX)
    try:
        read_replies(s, 1)
        s.sendall(b"EHLO c\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<bob@example.org>\r\n")
        assert [r[:3] for r in read_replies(s, 3)] == [b"250"] * 3
        for i, p in enumerate(pieces):
            last = " LAST" if i == len(pieces) - 1 else ""
            s.sendall(f"BDAT {len(p)}{last}\r\n".encode() + p)
            assert read_replies(s, 1)[0][:3] == b"250"
        s.sendall(b"QUIT\r\n")
    finally:
        s.close()
    ((body, chunks, _),) = stored(sh, "bob@example.org")
    assert body.endswith(b"\r\n" + normalize_crlf(b"".join(pieces)))
    assert chunks > 1


def test_streamed_local_and_queued_copies(sh: LimitHarness) -> None:
    sh.call(lambda: _alias(sh, "split@example.org", ["carol@example.org", "far@remote.example"]))
    message = big_message("split", 500_000)
    with smtplib.SMTP("127.0.0.1", sh.port(ListenerKind.MX), timeout=30) as s:
        s.sendmail("a@remote.example", ["split@example.org"], message)
    ((body, _, _),) = stored(sh, "carol@example.org")
    assert body.endswith(b"\r\n" + message)

    def queued() -> bytes:
        (q,) = sh.store.index.queue.values()
        assert q.recipients == ["far@remote.example"]
        return sh.store.read_blob(q.blob)

    qbody = sh.call(queued)
    assert qbody.startswith(b"Received: from ") and qbody.endswith(b"\r\n" + message)
    assert b"Return-Path:" not in qbody[:200]


def _alias(h: LimitHarness, source: str, targets: list[str]) -> None:
    with h.store.transaction() as t:
        t.set_alias(source, targets)


def test_rset_disconnect_and_quota_leave_nothing(sh: LimitHarness) -> None:
    before = sh.blob_count()
    chunk = b"x" * 100_000 + b"\r\n"
    # BDAT chunks past the threshold, then RSET.
    s = connect(sh, ListenerKind.MX)
    try:
        read_replies(s, 1)
        s.sendall(b"EHLO c\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<bob@example.org>\r\n")
        read_replies(s, 3)
        for _ in range(3):
            s.sendall(f"BDAT {len(chunk)}\r\n".encode() + chunk)
            assert read_replies(s, 1)[0][:3] == b"250"
        s.sendall(b"RSET\r\nQUIT\r\n")
        assert [r[:3] for r in read_replies(s, 2)] == [b"250", b"221"]
    finally:
        s.close()
    # DATA past the threshold, then the connection drops.
    s = connect(sh, ListenerKind.MX)
    try:
        read_replies(s, 1)
        s.sendall(b"HELO c\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<bob@example.org>\r\n")
        s.sendall(b"DATA\r\n")
        read_replies(s, 4)
        s.sendall(chunk * 3)
        time.sleep(0.3)
    finally:
        s.close()
    # Over quota: 452 at the end, nothing stored.
    s = connect(sh, ListenerKind.MX)
    try:
        read_replies(s, 1)
        s.sendall(b"HELO c\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<full@example.org>\r\n")
        s.sendall(b"DATA\r\n")
        assert [r[:3] for r in read_replies(s, 4)] == [b"250", b"250", b"250", b"354"]
        s.sendall(chunk * 3 + b".\r\nQUIT\r\n")
        assert read_replies(s, 1)[0][:9] == b"452 4.2.2"
        read_all(s)
    finally:
        s.close()
    time.sleep(0.2)
    assert sh.blob_count() == before
    assert stored(sh, "bob@example.org") == [] and stored(sh, "full@example.org") == []


# --- a real node: memory while a 20 MiB message arrives -------------------------------------


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_node_streams_20mib_with_bounded_rss(unique_name: str) -> None:
    base = Path(tempfile.mkdtemp(prefix=unique_name + "-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        root = base / "node"
        r = subprocess.run(
            [str(MAILHARBOR), "init", str(root), "--hostname", "mx.example.org", "--name", "mx1"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        port = free_port()
        conf = root / "mailharbor.toml"
        text = conf.read_text()
        conf.write_text(text.replace("\n[smtp]\n", f'\n[smtp]\nmx = ["127.0.0.1:{port}"]\n'))
        for args in (["domain", "add", "example.org"], ["account", "add", "alice@example.org"]):
            r = subprocess.run(
                [str(MAILHARBOR), *args, "--password-stdin", "--config", str(conf)]
                if args[0] == "account"
                else [str(MAILHARBOR), *args, "--config", str(conf)],
                input="pw\n", capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
        proc = subprocess.Popen(
            [str(MAILHARBOR), "serve", "--config", str(conf)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait_listening(port)
        message = big_message("huge", 20 * 1024 * 1024)
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:  # warm up: imports, caches
            s.sendmail("a@remote.example", ["alice@example.org"], big_message("warm", 2000))
        baseline = _rss_kib(proc.pid)
        peak = [baseline]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss_kib(proc.pid))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
                s.sendmail("a@remote.example", ["alice@example.org"], message)
        finally:
            done.set()
            sampler.join(5)
        growth_mib = (peak[0] - baseline) / 1024
        # Held in memory, the message alone would be 20 MiB, plus its copies (bytes of the
        # bytearray, the blob with headers prepended): 40-60 MiB. Streamed, a few chunks.
        assert growth_mib < 10, f"RSS grew by {growth_mib:.1f} MiB"
        proc.terminate()
        proc.wait(30)
        assert _stored_digest(conf, "huge") == hashlib.sha256(message).hexdigest()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("node did not listen")


def _stored_digest(conf: Path, subject: str) -> str:
    """SHA-256 of the stored message whose Subject is ``subject``, without the headers the
    server prepended (Return-Path, Received)."""
    from mailharbor.config import load_config
    from mailharbor.store import Store

    cfg = load_config(conf)
    st = Store.open(str(cfg.node.data_dir), node_id=cfg.node.node_id)
    try:
        acct = st.index.account_by_address("alice@example.org")
        assert acct is not None
        for b in st.index.mailboxes[acct.mailboxes["INBOX"]].blobs:
            body: Any = st.read_blob(st.index.blobs.hash_at(b))
            start = body.find(b"From: a@remote.example\r\nSubject: " + subject.encode())
            if start >= 0:
                return hashlib.sha256(body[start:]).hexdigest()
        raise AssertionError(f"no message {subject!r} stored")
    finally:
        st.close()
