"""The ``mailharbor`` command line.

Each subcommand lives in its own module with a ``register(subparsers)`` function that adds its
parser and sets ``func`` (``Callable[[argparse.Namespace], int]``, the exit code) as a default;
:mod:`mailharbor.cli.main` lists the modules. A command reports a failure by raising
:class:`CliError`; the entry point prints it as one line on stderr and exits with its code.
"""

from __future__ import annotations

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "CliError"]

#: Exit code for a failure while doing what was asked.
EXIT_FAILURE = 1
#: Exit code for a command line that cannot be run as given (argparse uses 2 too).
EXIT_USAGE = 2


class CliError(Exception):
    """A failure to report to the user: ``message`` is one line, ``exit_code`` the status."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message
