"""Command-line entry point. Command modules in this package are discovered and imported, so a new command is one
new file; heavy imports stay inside the command functions to keep ``lattice --help`` fast."""

import importlib
import pkgutil
import signal
import sys

from lattice_plugin.cli.app import app
from lattice_plugin.errors import LatticeError


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, cluster schedulers), raised like Ctrl-C so that the same clean-up runs: every
    temporary output is removed on the way out (typer then exits as on Ctrl-C; :func:`main` sets the status)."""

    received = False


def _terminate(signum: int, frame: object) -> None:
    Terminated.received = True
    raise Terminated()


def _register_commands() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "app":
            importlib.import_module(f"{__name__}.{module.name}")


def main() -> None:
    """Run the CLI; a :class:`LatticeError` becomes one line on stderr and exit status 2. Ctrl-C exits with status 130
    (typer's), SIGTERM with one line and status 143, both after the temporary outputs are removed."""
    _register_commands()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except LatticeError as error:
        print(f"lattice: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit:
        if Terminated.received:
            print("lattice: stopped by SIGTERM", file=sys.stderr)
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
