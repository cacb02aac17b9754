"""Entry point of the ``mailharbor`` command.

Contract: :func:`main` returns the exit status and never shows a traceback for an expected
failure. Usage errors print one line on stderr and exit 2; :class:`~mailharbor.cli.CliError`,
:class:`~mailharbor.config.ConfigError` and ``OSError`` print one line on stderr and exit with
the error's code (1 unless a CliError says otherwise); Ctrl-C exits 130.

To add a subcommand, write ``mailharbor/cli/<name>_cmd.py`` with ``register(subparsers)`` (see
:mod:`mailharbor.cli.init_cmd`) and append the module to ``COMMAND_MODULES``. Every command
imports every subcommand module (to build the parser), so such a module imports the rest of
mailharbor (config, admin client, store, TLS, node) inside the functions that use it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn, Protocol, TypeAlias

from mailharbor import __version__
from mailharbor.cli import (
    EXIT_FAILURE,
    EXIT_USAGE,
    CliError,
    admin_cmds,
    cluster_cmds,
    init_cmd,
    queue_cmds,
    repl_cmds,
    serve_cmd,
    witness_cmd,
)

__all__ = ["COMMAND_MODULES", "build_parser", "main"]

PROG = "mailharbor"


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


#: What ``register`` receives: the action returned by ``add_subparsers()``.
Subparsers: TypeAlias = "argparse._SubParsersAction[ArgumentParser]"


class CommandModule(Protocol):
    """What a subcommand module provides."""

    def register(self, subparsers: Subparsers) -> None: ...


#: Subcommand modules, in the order ``--help`` lists them.
COMMAND_MODULES: tuple[CommandModule, ...] = (
    init_cmd,
    serve_cmd,
    admin_cmds,
    queue_cmds,
    repl_cmds,
    cluster_cmds,
    witness_cmd,
)


def build_parser() -> ArgumentParser:
    """The full parser with every registered subcommand."""
    parser = ArgumentParser(
        prog=PROG,
        description="mailharbor: a high-availability mail server on a replicated store.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def _describe_oserror(e: OSError) -> str:
    text = e.strerror or str(e)
    if e.filename is not None:
        text += f": {e.filename}"
    if e.filename2 is not None:
        text += f" -> {e.filename2}"
    return text


def _is_loaded_error(e: BaseException, module: str, name: str) -> bool:
    """True if ``e`` is an instance of ``module.name``, without importing ``module``: if it was
    never imported, none of its exceptions can have been raised."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(e, getattr(loaded, name))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
        return status
    except CliError as e:
        print(f"{PROG}: error: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # ConfigError and StoreError (neither is an OSError), checked without importing them.
        if _is_loaded_error(e, "mailharbor.config", "ConfigError") or _is_loaded_error(
            e, "mailharbor.store.ops", "StoreError"
        ):
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return EXIT_FAILURE
        if isinstance(e, OSError):
            print(f"{PROG}: error: {_describe_oserror(e)}", file=sys.stderr)
            return EXIT_FAILURE
        raise


if __name__ == "__main__":
    sys.exit(main())
