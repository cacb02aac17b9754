"""``mailharbor witness --config FILE``: run the tie-breaker daemon of one or more pairs.

Contract: reads the witness's own TOML file (not a node's ``mailharbor.toml``)::

    listen = "192.0.2.10:7400"        # UDP
    state_dir = "witness-state"        # relative to the file; one <pair>.state per pair
    # min_margin = "500ms"             # floor on the re-grant margin, whatever nodes ask
    # log_level = "info"

    [[pair]]
    name = "mailharbor"                # the nodes' cluster.name
    nodes = ["<node.node_id of one>", "<node.node_id of the other>"]
    secret_file = "pair.secret"        # or secret = "..."; the nodes' cluster secret

Runs in the foreground, logging to standard error, until SIGTERM/SIGINT (exit 0). Exits 1 with
one ``mailharbor: error:`` line on a bad file or an unusable state file, and 1 if a state write
fails while running (the daemon then stops answering at once). ``--check`` only validates the
file and prints the pairs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from mailharbor.cli import CliError

if TYPE_CHECKING:
    from mailharbor.cli.main import Subparsers

__all__ = ["register"]


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "witness",
        help="run the cluster witness (tie-breaker vote lease) in the foreground",
        description=(
            "Serve the exclusive vote lease of one or more mailharbor pairs over UDP, storing "
            "every grant durably before answering. Configuration: a small TOML file (see "
            "docs/cluster.md)."
        ),
    )
    p.add_argument("--config", required=True, metavar="FILE", help="the witness's TOML file")
    p.add_argument("--check", action="store_true", help="validate the file and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: this module is loaded to build the parser of every command.
    import asyncio
    import signal

    from mailharbor.cli.serve_cmd import setup_logging
    from mailharbor.server.witness import load_witness_config, serve

    settings = load_witness_config(args.config)
    if args.check:
        for pair in settings.pairs:
            print(f"pair {pair.name}: nodes {pair.nodes[0].hex()} {pair.nodes[1].hex()}")
        print(f"listen udp {settings.listen}, state in {settings.state_dir}")
        return 0
    setup_logging(settings.log_level)

    async def main() -> str:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await serve(settings, stop)

    failure = asyncio.run(main())
    if failure:
        raise CliError(f"witness stopped: {failure}")
    return 0
