"""``lattice serve``: litgpt's server (``litgpt serve``, LitServe) on a Lattice checkpoint; see lattice_plugin.serve."""

from lattice_plugin.cli.app import app
from lattice_plugin.cli.litgpt_commands import run_litgpt


@app.command(
    "serve",
    help="Serve a checkpoint over HTTP (litgpt serve: LitServe, optionally its OpenAI-compatible spec) on "
    "127.0.0.1 (LATTICE_SERVE_HOST to change). Takes litgpt's flags; see `lattice serve --help`.",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def serve() -> None:
    from lattice_plugin.serve import patch_litgpt_server

    patch_litgpt_server()
    run_litgpt()
