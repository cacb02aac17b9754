"""``mailharbor serve``: run a node in the foreground.

Contract: loads the configuration (``--config``, else ``$MAILHARBOR_CONFIG``, else
``./mailharbor.toml``), sends the daemon log to standard error at ``log.level``, and runs the
node (:mod:`mailharbor.node`) until SIGTERM or SIGINT, after which it stops cleanly and exits 0.
A node that cannot start (data directory in use, corrupt log, admin socket in use) exits 1 with
one ``mailharbor: error: cannot serve: ...`` line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from mailharbor.cli import CliError
from mailharbor.cli.admin_cmds import add_config_argument, load_cli_config

if TYPE_CHECKING:
    from mailharbor.cli.main import Subparsers

__all__ = ["register", "run", "setup_logging"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def register(subparsers: Subparsers) -> None:
    """Add the ``serve`` subcommand."""
    p = subparsers.add_parser(
        "serve",
        help="run the node in the foreground until SIGTERM/SIGINT",
        description=(
            "Open the store, listen on the admin socket and serve until SIGTERM or SIGINT, "
            "then stop cleanly. The daemon log goes to standard error."
        ),
    )
    add_config_argument(p)
    p.set_defaults(func=run)


def setup_logging(level: str) -> None:
    """Send the ``mailharbor`` loggers to standard error at ``level`` (debug/info/...)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger("mailharbor")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def run(args: argparse.Namespace) -> int:
    """Run ``mailharbor serve``; returns 0 after a clean stop."""
    # Imported here, not at the top: every other command would pay for loading the node.
    from mailharbor.admin.server import AdminSocketError
    from mailharbor.node import run_node
    from mailharbor.store import StoreError

    config = load_cli_config(args)
    setup_logging(config.log.level)
    try:
        run_node(config)
    except (StoreError, AdminSocketError) as e:
        raise CliError(f"cannot serve: {e}") from None
    return 0
