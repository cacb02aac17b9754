"""The service certificate: generating a self-signed one, reading it, and serving with it.

Theory of operation
-------------------
- ``mailharbor init`` makes a self-signed service certificate so that a fresh node can offer
  STARTTLS and implicit TLS at once; an operator replaces the two PEM files with a CA-signed
  pair later (paths ``tls.cert`` and ``tls.key`` in the config).
- The generated certificate has an EC P-256 key, subject CN and the only subjectAltName equal to
  the mail host name, serverAuth extended key usage, and 825 days of validity (the longest that
  mainstream clients accept for a server certificate) starting one hour in the past to tolerate
  clock skew.
- Files are written atomically (temporary file, fsync, rename, directory fsync): a crash leaves
  the old file or the new one, never a torn one. The private key is created with mode 0600 and
  never exists on disk with a wider mode; the certificate is mode 0644.
- :func:`server_context` builds the ``ssl.SSLContext`` listeners use: TLS 1.2 or newer, the
  certificate and key from the config.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mailharbor.store.fsio import write_atomic

# cryptography is imported by the functions that make or read a certificate (``mailharbor
# init``): a serving node only needs server_context, which is the ssl module's.
if TYPE_CHECKING:
    from cryptography import x509

__all__ = [
    "CERT_VALIDITY_DAYS",
    "CertificateInfo",
    "atomic_write",
    "certificate_info",
    "generate_self_signed",
    "server_context",
    "write_self_signed",
]

#: Validity of a generated certificate, in days.
CERT_VALIDITY_DAYS = 825


@dataclass(frozen=True)
class CertificateInfo:
    """What a person wants to know about a certificate."""

    subject_cn: str | None
    dns_names: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    sha256_fingerprint: str  # colon-separated upper-case hex, as openssl prints it


def atomic_write(path: Path, data: bytes, *, mode: int) -> None:
    """Replace ``path`` with ``data`` atomically and durably; the file gets exactly ``mode``
    (see `mailharbor.store.fsio.write_atomic`, the one module that fsyncs). Raises OSError."""
    write_atomic(str(path), data, mode=mode)


def _san_entry(name: str) -> x509.GeneralName:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def generate_self_signed(
    hostname: str,
    *,
    days: int = CERT_VALIDITY_DAYS,
    now: dt.datetime | None = None,
) -> tuple[bytes, bytes]:
    """Make a self-signed server certificate for ``hostname``.

    Returns ``(certificate_pem, private_key_pem)``; the key is unencrypted PKCS#8 PEM. ``now``
    (timezone-aware) fixes the clock for tests. Nothing is written to disk.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san_entry(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


def certificate_info(cert_pem: bytes) -> CertificateInfo:
    """Describe the first certificate in ``cert_pem``. Raises ValueError if it is not one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(cert_pem)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = tuple(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        dns_names = ()
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    return CertificateInfo(
        subject_cn=cn if isinstance(cn, str) else None,
        dns_names=dns_names,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        sha256_fingerprint=":".join(digest[i : i + 2] for i in range(0, len(digest), 2)),
    )


def write_self_signed(
    cert_path: Path, key_path: Path, hostname: str, *, days: int = CERT_VALIDITY_DAYS
) -> CertificateInfo:
    """Generate a self-signed certificate for ``hostname`` and write it atomically.

    The key goes to ``key_path`` (mode 0600) before the certificate goes to ``cert_path`` (mode
    0644), so a certificate on disk always has its key. Existing files are replaced. The parent
    directories must exist. Raises OSError.
    """
    cert_pem, key_pem = generate_self_signed(hostname, days=days)
    atomic_write(key_path, key_pem, mode=0o600)
    atomic_write(cert_path, cert_pem, mode=0o644)
    return certificate_info(cert_pem)


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    """A server-side TLS context presenting ``cert_path``/``key_path``, TLS 1.2 or newer.

    Raises OSError if a file cannot be read and ssl.SSLError if they are not a matching pair.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.load_cert_chain(certfile=cert_path, keyfile=key_path)
    return ctx
