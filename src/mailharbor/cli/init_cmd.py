"""``mailharbor init DIR``: create a node directory ready to serve.

Contract: afterwards DIR holds

- ``mailharbor.toml`` (mode 0600): the commented configuration template with this node's name,
  a fresh node GUID, the mail host name, ``data_dir = "data"`` and the certificate paths;
- ``data/`` (mode 0700): the empty store directory;
- ``tls/`` (mode 0700) with ``cert.pem`` (0644), a self-signed certificate for the host name, and
  ``key.pem`` (0600), its private key.

The config file is written last, so its presence means a completed init. An existing
``mailharbor.toml`` is refused (exit 1) unless ``--force`` is given; ``--force`` rewrites the
config and the certificate, keeps the node GUID of a readable old config, and never touches the
contents of ``data/``. Every file is written atomically.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from mailharbor.cli import EXIT_USAGE, CliError

# mailharbor.config and mailharbor.tls (cryptography, and the store for its atomic writes) are
# imported where needed: this module is loaded to build the parser of every command.

if TYPE_CHECKING:
    from mailharbor.cli.main import Subparsers
    from mailharbor.config import Config
    from mailharbor.tls import CertificateInfo

__all__ = ["CONFIG_NAME", "InitResult", "init_node", "register"]

CONFIG_NAME = "mailharbor.toml"
DATA_DIR = "data"
TLS_DIR = "tls"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"


@dataclass(frozen=True)
class InitResult:
    """What :func:`init_node` made."""

    config: Config
    certificate: CertificateInfo
    reused_node_id: bool


def register(subparsers: Subparsers) -> None:
    """Add the ``init`` subcommand."""
    p = subparsers.add_parser(
        "init",
        help="create a node directory: config, data directory, self-signed certificate",
        description=(
            "Create DIR with a commented mailharbor.toml, an empty data directory and a "
            "self-signed TLS certificate for the mail host name."
        ),
    )
    p.add_argument("dir", metavar="DIR", type=Path, help="directory to create or fill")
    p.add_argument(
        "--hostname", help="mail host name (default: this machine's fully qualified name)"
    )
    p.add_argument("--name", help="node name, a DNS label (default: first label of the host name)")
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing config and certificate (never the data)",
    )
    p.set_defaults(func=run)


def _default_hostname() -> str:
    from mailharbor.config import validate_hostname

    fqdn = socket.getfqdn()
    try:
        return validate_hostname(fqdn)
    except ValueError:
        raise CliError(
            f"this machine's name {fqdn!r} is not a usable mail host name; pass --hostname",
            EXIT_USAGE,
        ) from None


def _old_node_id(config_path: Path) -> bytes | None:
    """The node GUID of an existing config, if it can be read; else None."""
    from mailharbor.config import ConfigError, load_config

    try:
        return load_config(config_path).node.node_id
    except ConfigError:
        pass
    try:
        raw = tomllib.loads(config_path.read_text("utf-8"))["node"]["node_id"]
        return bytes.fromhex(raw) if isinstance(raw, str) and len(raw) == 32 else None
    except (OSError, ValueError, KeyError, TypeError, tomllib.TOMLDecodeError):
        return None


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, exist_ok=True)
    path.chmod(0o700)


def init_node(
    directory: Path, *, hostname: str | None = None, name: str | None = None, force: bool = False
) -> InitResult:
    """Create or (with ``force``) refresh the node directory ``directory``; see the module doc.

    ``hostname`` defaults to this machine's FQDN, ``name`` to the host name's first label,
    lower-cased. Raises CliError (exit 2 for an invalid host or node name, 1 for an existing
    config without ``force``) and OSError.
    """
    from mailharbor.config import (
        ConfigError,
        default_config_text,
        load_config,
        new_node_id,
        validate_hostname,
        validate_node_name,
    )
    from mailharbor.tls import atomic_write, write_self_signed

    if hostname is None:
        hostname = _default_hostname()
    else:
        try:
            validate_hostname(hostname)
        except ValueError as e:
            raise CliError(f"--hostname: {e}", EXIT_USAGE) from None
    if name is None:
        name = hostname.split(".", 1)[0].lower()
        try:
            validate_node_name(name)
        except ValueError:
            raise CliError(f"cannot derive a node name from {hostname!r}; pass --name") from None
    else:
        try:
            validate_node_name(name)
        except ValueError as e:
            raise CliError(f"--name: {e}", EXIT_USAGE) from None

    config_path = directory / CONFIG_NAME
    node_id: bytes | None = None
    if config_path.exists():
        if not force:
            raise CliError(
                f"{config_path} already exists; pass --force to overwrite the config and "
                "certificate (the data directory is kept)"
            )
        node_id = _old_node_id(config_path)
    reused = node_id is not None
    if node_id is None:
        node_id = new_node_id()

    directory.mkdir(parents=True, exist_ok=True)
    _private_dir(directory / DATA_DIR)
    tls_dir = directory / TLS_DIR
    _private_dir(tls_dir)
    cert = write_self_signed(tls_dir / CERT_FILE, tls_dir / KEY_FILE, hostname)
    text = default_config_text(
        name=name,
        hostname=hostname,
        node_id=node_id,
        data_dir=DATA_DIR,
        tls_cert=f"{TLS_DIR}/{CERT_FILE}",
        tls_key=f"{TLS_DIR}/{KEY_FILE}",
    )
    atomic_write(config_path, text.encode("utf-8"), mode=0o600)
    try:
        config = load_config(config_path)
    except ConfigError as e:  # the template is ours: this is a bug, but say it plainly
        raise CliError(f"the written configuration does not load: {e}") from None
    return InitResult(config=config, certificate=cert, reused_node_id=reused)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``mailharbor init`` with parsed ``args``; print what was made to ``out``."""
    out = out or sys.stdout
    result = init_node(args.dir, hostname=args.hostname, name=args.name, force=args.force)
    cfg = result.config
    cert = result.certificate
    id_note = " (kept from the old config)" if result.reused_node_id else ""
    print(f"initialized node {cfg.node.name!r} in {cfg.base_dir}", file=out)
    print(f"  config:      {cfg.path}", file=out)
    print(f"  node id:     {cfg.node.node_id_hex}{id_note}", file=out)
    print(f"  data:        {cfg.node.data_dir}", file=out)
    print(f"  certificate: {cfg.tls.cert} (self-signed for {cfg.node.hostname},", file=out)
    print(f"               valid until {cert.not_after:%Y-%m-%d})", file=out)
    print(f"  SHA-256:     {cert.sha256_fingerprint}", file=out)
    print(f"  private key: {cfg.tls.key}", file=out)
    print(f"next: mailharbor serve --config {cfg.path}", file=out)
    return 0
