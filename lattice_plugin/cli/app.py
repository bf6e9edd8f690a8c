"""The ``lattice`` typer application; every command lives in its own module of this package and registers here."""

import typer

app = typer.Typer(
    name="lattice",
    help="Lattice for litgpt: train, convert, distill, generate, evaluate and benchmark Lattice models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
