"""Command-line entry point. Command modules in this package are discovered and imported, so a new command is one
new file; heavy imports stay inside the command functions to keep ``lattice --help`` fast."""

import importlib
import pkgutil
import sys

from lattice_plugin.cli.app import app
from lattice_plugin.errors import LatticeError


def _register_commands() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "app":
            importlib.import_module(f"{__name__}.{module.name}")


def main() -> None:
    """Run the CLI; a :class:`LatticeError` becomes one line on stderr and exit status 2."""
    _register_commands()
    try:
        app()
    except LatticeError as error:
        print(f"lattice: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
