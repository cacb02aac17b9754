"""TLS on the replication link between two real ``mailharbor serve`` processes.

Certificates come from ``trustme``: one CA for the pair, a node certificate for each node (its
own name; ``tls_peer_name`` names the other's). The pair replicates over TLS (``repl status``
shows the link's TLS version) with the HMAC handshake inside it. A plaintext client and a
client with another CA's certificate are refused by the listener. B restarted with a
certificate of another CA, then with one of the right CA but the wrong name, never links
(both sides log the refusal) while A keeps serving alone; with its own certificate back, B
catches up with what A accepted meanwhile.
"""

from __future__ import annotations

import secrets
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from test_repl_nodes import Pair, in_sync, print_logs, send, status, wait_for

NAMES = {"a": "node-a.repl.test", "b": "node-b.repl.test"}


def _write_cert(cert: trustme.LeafCert, directory: Path, stem: str) -> tuple[Path, Path]:
    crt, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert.cert_chain_pems[0].write_to_path(str(crt))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(crt), append=True)
    cert.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return crt, key


class TlsPair:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = trustme.CA()
        self.ca_path = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        self.files = {
            me: _write_cert(self.ca.issue_cert(NAMES[me]), directory, me) for me in ("a", "b")
        }
        per_node = {
            me: {
                "tls_cert": str(self.files[me][0]),
                "tls_key": str(self.files[me][1]),
                "tls_peer_name": NAMES["b" if me == "a" else "a"],
            }
            for me in ("a", "b")
        }
        self.pair = Pair(
            f"tls{secrets.token_hex(3)}",
            replication={"tls": True, "tls_ca": str(self.ca_path)},
            replication_by_node=per_node,
        )

    def give_b(self, cert: trustme.LeafCert) -> None:
        """Replace B's certificate and key files (B reads them at start)."""
        _write_cert(cert, self.dir, "b")


@pytest.fixture
def tls_pair(tmp_path: Path) -> Iterator[TlsPair]:
    t = TlsPair(tmp_path)
    try:
        t.pair.start()
        yield t
        print_logs(t.pair.nodes)  # shown for a failed test
    finally:
        t.pair.cleanup()


def _refused_by_listener(port: int, ctx: ssl.SSLContext | None) -> bool:
    """Connect (plaintext, or TLS with ``ctx``), send a few bytes, and tell whether the
    listener closed the connection without ever answering replication bytes."""
    with socket.create_connection(("127.0.0.1", port), 5) as raw:
        raw.settimeout(5)
        try:
            s: socket.socket = (
                ctx.wrap_socket(raw, server_hostname=NAMES["a"]) if ctx is not None else raw
            )
            s.sendall(b"MHRP" + bytes(60))
            data = s.recv(4096)
        except (ssl.SSLError, OSError):
            return True
        return data == b"" or not data.startswith(b"MHRP")


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_replication_over_mutual_tls_and_wrong_certificates_refused(tls_pair: TlsPair) -> None:
    pair = tls_pair.pair
    a, b = pair.a, pair.b
    st = status(a)
    assert str(st["link_tls"]).startswith("TLSv1."), st
    assert "TLSv1." in a.log and "no TLS" not in a.log
    mids = [f"tls{i}@tls.test" for i in range(5)]
    for mid in mids:
        assert send(pair.smtp["a"], mid, 4000)
    wait_for(lambda: in_sync(a, b), 20, "B in sync over TLS")
    r = a.try_cli("repl", "verify")
    assert r.returncode == 0 and "0 mismatch" in r.stdout, r.stdout + r.stderr

    # Strangers at A's replication listener: plaintext, and TLS with another CA's certificate.
    assert _refused_by_listener(pair.repl["a"], None)
    other = trustme.CA()
    ctx = ssl.create_default_context()
    tls_pair.ca.configure_trust(ctx)
    other.issue_cert(NAMES["b"]).configure_cert(ctx)
    assert _refused_by_listener(pair.repl["a"], ctx)
    wait_for(lambda: a.log.count("TLS with") >= 2, 10, "A logs both refusals")
    assert status(a)["connection"] == "Connected"  # the real link is untouched

    # B with another CA's certificate, then with the right CA's but the wrong name: no link.
    for cert, why in (
        (other.issue_cert(NAMES["b"]), "TLS with"),
        (tls_pair.ca.issue_cert("intruder.repl.test"), "its certificate names intruder"),
    ):
        b.stop()
        tls_pair.give_b(cert)
        before = a.log.count(why)
        b_log_from = len(b.log)
        b.start(wait_ports=False)

        def a_refused(why: str = why, before: int = before) -> bool:
            return a.log.count(why) > before

        wait_for(a_refused, 15, f"A: {why}")
        time.sleep(1)
        assert status(b)["connection"] != "Connected"
        assert status(a)["peer_id"] is None or status(a)["connection"] != "Connected"
        # B's side of the refusals: a TLS error when it sees A's alert, or, in TLS 1.3, the
        # connection closed after B's own handshake had already completed (the server checks
        # the client's certificate last): which one B logs is a race, that it logs one is not.
        b_new = b.log[b_log_from:]
        assert "TLS with" in b_new or "closed (eof)" in b_new, b_new[-3000:]
    assert send(pair.smtp["a"], "alone@tls.test", 4000)  # A serves alone meanwhile

    # B's own certificate back: it links over TLS and catches up.
    b.stop()
    tls_pair.give_b(tls_pair.ca.issue_cert(NAMES["b"]))
    b.start(wait_ports=False)
    wait_for(lambda: in_sync(a, b), 30, "B back over TLS")
    assert str(status(b)["link_tls"]).startswith("TLSv1.")
    r = a.try_cli("repl", "verify")
    assert r.returncode == 0 and "0 mismatch" in r.stdout, r.stdout + r.stderr
