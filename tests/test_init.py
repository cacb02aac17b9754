"""`mailharbor init`, run as a user runs it: the installed command in a subprocess."""

from __future__ import annotations

import datetime as dt
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from mailharbor.config import load_config
from mailharbor.tls import certificate_info, server_context

MAILHARBOR = Path(sys.executable).parent / "mailharbor"


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert MAILHARBOR.exists(), f"{MAILHARBOR} missing: run `make venv`"
    return subprocess.run(
        [str(MAILHARBOR), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mailharbor")
    assert "error" in lines[0]
    return lines[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_creates_a_node_directory(tmp_path: Path) -> None:
    node = tmp_path / "node"
    result = run("init", node, "--hostname", "mail.example.org", "--name", "mx1")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert str(node / "mailharbor.toml") in result.stdout

    cfg = load_config(node / "mailharbor.toml")
    assert cfg.node.name == "mx1"
    assert cfg.node.hostname == "mail.example.org"
    assert len(cfg.node.node_id) == 16
    assert cfg.node.data_dir == node / "data"
    assert cfg.tls.cert == node / "tls" / "cert.pem"
    assert cfg.tls.key == node / "tls" / "key.pem"
    assert cfg.node.node_id_hex in result.stdout

    assert (node / "data").is_dir() and list((node / "data").iterdir()) == []
    assert mode(node / "data") == 0o700
    assert mode(node / "tls" / "key.pem") == 0o600
    assert mode(node / "mailharbor.toml") == 0o600
    # no temporary files left behind by the atomic writes
    assert sorted(p.name for p in (node / "tls").iterdir()) == ["cert.pem", "key.pem"]
    assert sorted(p.name for p in node.iterdir()) == ["data", "mailharbor.toml", "tls"]


def test_certificate_is_for_the_hostname_and_matches_the_key(tmp_path: Path) -> None:
    node = tmp_path / "node"
    result = run("init", node, "--hostname", "mail.example.org")
    assert result.returncode == 0
    pem = (node / "tls" / "cert.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.org"]
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    assert cert.not_valid_after_utc - now > dt.timedelta(days=800)

    key = load_pem_private_key((node / "tls" / "key.pem").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert_key = cert.public_key()
    assert isinstance(cert_key, ec.EllipticCurvePublicKey)
    assert key.public_key().public_numbers() == cert_key.public_numbers()
    # init prints the fingerprint of the certificate it wrote, for clients that pin it
    assert certificate_info(pem).sha256_fingerprint in result.stdout


def test_tls_client_verifying_the_hostname_accepts_the_certificate(tmp_path: Path) -> None:
    node = tmp_path / "node"
    assert run("init", node, "--hostname", "mail.example.org").returncode == 0
    cfg = load_config(node / "mailharbor.toml")
    server = server_context(cfg.tls.cert, cfg.tls.key)
    client = ssl.create_default_context(cafile=str(cfg.tls.cert))

    def handshake(hostname: str) -> None:
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
        s = server.wrap_bio(s_in, s_out, server_side=True)
        done = {"c": False, "s": False}
        for _ in range(10):
            for name, obj in (("c", c), ("s", s)):
                if not done[name]:
                    try:
                        obj.do_handshake()
                        done[name] = True
                    except ssl.SSLWantReadError:
                        pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
            if all(done.values()):
                return
        raise AssertionError("handshake did not finish")

    handshake("mail.example.org")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake("other.example.org")


def test_rerun_without_force_refuses_and_changes_nothing(tmp_path: Path) -> None:
    node = tmp_path / "node"
    assert run("init", node, "--hostname", "mail.example.org").returncode == 0
    before = {p: p.read_bytes() for p in node.rglob("*") if p.is_file()}
    line = assert_one_line_error(run("init", node, "--hostname", "mail.example.org"), 1)
    assert "already exists" in line and "--force" in line
    assert {p: p.read_bytes() for p in node.rglob("*") if p.is_file()} == before


def test_force_renews_certificate_keeps_node_id_and_data(tmp_path: Path) -> None:
    node = tmp_path / "node"
    assert run("init", node, "--hostname", "mail.example.org").returncode == 0
    old = load_config(node / "mailharbor.toml")
    old_cert = (node / "tls" / "cert.pem").read_bytes()
    (node / "data" / "segment-0001").write_bytes(b"mail")

    result = run("init", node, "--hostname", "mx.example.net", "--force")
    assert result.returncode == 0, result.stderr
    new = load_config(node / "mailharbor.toml")
    assert new.node.node_id == old.node.node_id
    assert new.node.hostname == "mx.example.net"
    assert (node / "tls" / "cert.pem").read_bytes() != old_cert
    assert certificate_info((node / "tls" / "cert.pem").read_bytes()).dns_names == (
        "mx.example.net",
    )
    assert (node / "data" / "segment-0001").read_bytes() == b"mail"


def test_node_name_defaults_to_first_label_of_hostname(tmp_path: Path) -> None:
    assert run("init", tmp_path / "n", "--hostname", "MX1.Example.org").returncode == 0
    cfg = load_config(tmp_path / "n" / "mailharbor.toml")
    assert cfg.node.name == "mx1"
    assert cfg.node.hostname == "MX1.Example.org"


def test_relative_directory_is_relative_to_cwd(tmp_path: Path) -> None:
    assert run("init", "rel", "--hostname", "localhost", cwd=tmp_path).returncode == 0
    cfg = load_config(tmp_path / "rel" / "mailharbor.toml")
    assert cfg.node.data_dir == tmp_path / "rel" / "data"


def test_two_inits_get_different_node_ids(tmp_path: Path) -> None:
    for n in ("a", "b"):
        assert run("init", tmp_path / n, "--hostname", "localhost").returncode == 0
    a = load_config(tmp_path / "a" / "mailharbor.toml")
    b = load_config(tmp_path / "b" / "mailharbor.toml")
    assert a.node.node_id != b.node.node_id


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("init",),
        ("init", "d", "--bogus"),
        ("frobnicate",),
        ("init", "d", "--hostname", "bad host"),
        ("init", "d", "--hostname", "a..b"),
        ("init", "d", "--hostname", "localhost", "--name", "Bad_Name"),
    ],
    ids=lambda a: " ".join(a) or "no-args",
)
def test_bad_arguments_exit_2_with_one_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    assert_one_line_error(run(*args, cwd=tmp_path), 2)
    assert not (tmp_path / "d").exists()


def test_directory_that_is_a_file_fails_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    line = assert_one_line_error(run("init", tmp_path / "f", "--hostname", "localhost"), 1)
    assert str(tmp_path / "f") in line


def test_directory_that_cannot_be_created_fails_with_one_line() -> None:
    # /proc refuses new directories, even to root
    line = assert_one_line_error(run("init", "/proc/mh-node", "--hostname", "localhost"), 1)
    assert "/proc/mh-node" in line


def test_help_and_version() -> None:
    result = run("--help")
    assert result.returncode == 0 and "init" in result.stdout
    result = run("init", "--help")
    assert result.returncode == 0 and "--force" in result.stdout
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("mailharbor ")
