"""A node whose TLS certificate cannot be loaded: plain endpoints serve without offering TLS;
endpoints that cannot work without it (implicit TLS, submission) make `serve` refuse to start
with one clear line naming the files — never a traceback. Real `mailharbor serve` processes,
real clients."""

from __future__ import annotations

import imaplib
import poplib
import smtplib
from collections.abc import Iterator
from typing import Any

import pytest

from servenode import ServeNode, free_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def nodes() -> Iterator[list[ServeNode]]:
    made: list[ServeNode] = []
    yield made
    for n in made:
        n.stop()
        n.cleanup()


def _without_certificate(nodes: list[ServeNode], settings: dict[str, dict[str, Any]]) -> ServeNode:
    n = ServeNode("nocert", settings)
    nodes.append(n)
    (n.root / "tls" / "cert.pem").unlink()
    return n


def test_plain_endpoints_serve_without_offering_tls(nodes: list[ServeNode]) -> None:
    mx, pop3, imap = free_port(), free_port(), free_port()
    n = _without_certificate(
        nodes,
        {
            "smtp": {"mx": [f"127.0.0.1:{mx}"]},
            "pop3": {"listen": [f"127.0.0.1:{pop3}"]},
            "imap": {"listen": [f"127.0.0.1:{imap}"]},
        },
    )
    n.start()
    with smtplib.SMTP("127.0.0.1", mx, timeout=10) as s:
        code, _ = s.ehlo("client.example")
        assert code == 250 and not s.has_extn("starttls")
    p = poplib.POP3("127.0.0.1", pop3, timeout=10)
    try:
        assert "STLS" not in p.capa()
    finally:
        p.quit()
    with imaplib.IMAP4("127.0.0.1", imap, timeout=10) as i:
        assert "STARTTLS" not in i.capabilities
    for offered in ("STARTTLS", "STLS", "IMAP STARTTLS"):
        assert f"{offered} not offered" in n.log, n.log
    assert "cert.pem" in n.log and "No such file or directory" in n.log


@pytest.mark.parametrize(
    "settings",
    [
        {"pop3": {"listen_tls": ["127.0.0.1:{port}"]}},
        {"imap": {"listen_tls": ["127.0.0.1:{port}"]}},
        {"smtp": {"submissions": ["127.0.0.1:{port}"]}},
        {"smtp": {"submission": ["127.0.0.1:{port}"]}},
    ],
    ids=["pop3s", "imaps", "submissions", "submission"],
)
def test_endpoints_that_need_tls_refuse_to_start_with_one_clear_line(
    nodes: list[ServeNode], settings: dict[str, dict[str, list[str]]]
) -> None:
    port = free_port()
    concrete = {
        section: {k: [v.format(port=port) for v in vs] for k, vs in keys.items()}
        for section, keys in settings.items()
    }
    n = _without_certificate(nodes, concrete)
    r = n.try_cli("serve")
    assert r.returncode == 1, (r.returncode, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("mailharbor: error: tls.cert: "), r.stderr
    assert "cert.pem" in last and "No such file or directory" in last, last
    assert f"127.0.0.1:{port} need TLS" in last, last
    assert "Traceback" not in r.stderr, r.stderr
