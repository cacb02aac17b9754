"""Real IMAP clients against a real ``mailharbor serve``: mbsync (isync) syncs both ways.

Mail arrives over SMTP (smtplib); mbsync pulls it into a local Maildir; local changes (a new
message, flags, a deletion, a new folder) are pushed back and checked with imaplib; a third sync
changes nothing. A missing mbsync fails the test (it is installed by `make test`).
"""

from __future__ import annotations

import email
import imaplib
import shutil
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from servenode import ServeNode, free_port

pytestmark = pytest.mark.timeout(120)
USER = "alice@example.org"
PASSWORD = "mbsync pw"


@pytest.fixture
def node(unique_name: str) -> Iterator[ServeNode]:
    smtp, imap = free_port(), free_port()
    n = ServeNode(
        unique_name,
        {
            "smtp": {"mx": [f"127.0.0.1:{smtp}"]},
            "imap": {"listen": [f"127.0.0.1:{imap}"], "allow_plaintext_auth": True},
        },
    )
    n.smtp_port, n.imap_port = smtp, imap  # type: ignore[attr-defined]
    try:
        n.cli("domain", "add", "example.org")
        n.add_account(USER, PASSWORD)
        n.start()
        yield n
    finally:
        n.cleanup()


def send(port: int, n: int) -> list[str]:
    ids = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        for i in range(n):
            mid = f"<mbsync-{i}@example.net>"
            ids.append(mid)
            s.sendmail(
                "bob@example.net",
                [USER],
                f"From: bob@example.net\r\nTo: {USER}\r\nSubject: msg {i}\r\n"
                f"Message-ID: {mid}\r\n\r\nbody {i}\r\n".encode(),
            )
    return ids


def mbsync_config(root: Path, port: int) -> Path:
    maildir = root / "maildir"
    maildir.mkdir()
    cfg = root / "mbsyncrc"
    cfg.write_text(
        f"""IMAPAccount mh
Host 127.0.0.1
Port {port}
User {USER}
Pass "{PASSWORD}"
SSLType None
AuthMechs LOGIN

IMAPStore far
Account mh

MaildirStore near
Path {maildir}/
Inbox {maildir}/INBOX
SubFolders Verbatim

Channel sync
Far :far:
Near :near:
Patterns *
Create Both
Remove None
Expunge Both
SyncState *
"""
    )
    return cfg


def mbsync(cfg: Path) -> str:
    exe = shutil.which("mbsync")
    assert exe, "mbsync (isync) is not installed: `make test` installs tools/apt-packages.txt"
    r = subprocess.run(
        [exe, "-c", str(cfg), "-V", "-a"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def local_messages(folder: Path) -> dict[str, Path]:
    out = {}
    for sub in ("cur", "new"):
        for p in (folder / sub).iterdir():
            msg = email.message_from_bytes(p.read_bytes())
            out[str(msg["Message-ID"])] = p
    return out


def server_state(port: int, mailbox: str) -> dict[str, set[str]]:
    """Message-ID -> flags of every message in `mailbox`, read with imaplib."""
    with imaplib.IMAP4("127.0.0.1", port, timeout=30) as c:
        c.login(USER, PASSWORD)
        typ, _ = c.select(mailbox, readonly=True)
        assert typ == "OK"
        typ, data = c.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        out: dict[str, set[str]] = {}
        if typ != "OK" or data == [None]:
            return out
        for item in data:
            if not isinstance(item, tuple):
                continue
            meta, header = item
            flags = imaplib.ParseFlags(meta)
            mid = email.message_from_bytes(header)["Message-ID"]
            out[str(mid)] = {f.decode() for f in flags}
        return out


def test_mbsync_syncs_both_ways(node: ServeNode, tmp_path: Path) -> None:
    port = node.imap_port  # type: ignore[attr-defined]
    ids = send(node.smtp_port, 3)  # type: ignore[attr-defined]
    cfg = mbsync_config(tmp_path, port)
    mbsync(cfg)
    inbox = tmp_path / "maildir" / "INBOX"
    local = local_messages(inbox)
    assert set(local) == set(ids)

    # Local changes: flag one, mark one deleted (expunged by Expunge Both), add a message,
    # create a folder with a message in it.
    flagged, deleted = local[ids[0]], local[ids[1]]
    flagged.rename(flagged.parent.parent / "cur" / (flagged.name.split(":")[0] + ":2,FS"))
    deleted.rename(deleted.parent.parent / "cur" / (deleted.name.split(":")[0] + ":2,ST"))
    new_mid = "<local-new@example.org>"
    (inbox / "new" / "1700000000.local1.host").write_bytes(
        f"From: {USER}\r\nSubject: local\r\nMessage-ID: {new_mid}\r\n\r\nhi\r\n".encode()
    )
    archive = tmp_path / "maildir" / "Projects"
    for sub in ("cur", "new", "tmp"):
        (archive / sub).mkdir(parents=True)
    arch_mid = "<archived@example.org>"
    (archive / "cur" / "1700000001.local2.host:2,S").write_bytes(
        f"From: {USER}\r\nSubject: archived\r\nMessage-ID: {arch_mid}\r\n\r\nold\r\n".encode()
    )
    mbsync(cfg)

    state = server_state(port, "INBOX")
    assert set(state) == {ids[0], ids[2], new_mid}
    assert {"\\Flagged", "\\Seen"} <= state[ids[0]]
    assert "\\Seen" not in state[ids[2]]
    assert server_state(port, "Projects") == {arch_mid: {"\\Seen"}}

    # A change on the server side comes back down, and a further sync is a no-op.
    with imaplib.IMAP4("127.0.0.1", port, timeout=30) as c:
        c.login(USER, PASSWORD)
        c.select("INBOX")
        typ, data = c.search(None, "HEADER", "Message-ID", ids[2])
        assert typ == "OK" and data[0]
        c.store(data[0].decode(), "+FLAGS", "(\\Answered)")
    mbsync(cfg)
    local = local_messages(inbox)
    assert set(local) == {ids[0], ids[2], new_mid}
    assert "R" in local[ids[2]].name.split(":2,")[1]
    before = {p.name for p in (tmp_path / "maildir").rglob("*") if p.is_file()}
    mbsync(cfg)
    after = {p.name for p in (tmp_path / "maildir").rglob("*") if p.is_file()}
    assert before == after
    assert server_state(port, "INBOX").keys() == {ids[0], ids[2], new_mid}
