"""``lattice distill --config recipes/distill/NAME.yaml [--key value ...]``: attention transfer, then logit
distillation, of a converted checkpoint from its attention teacher, on one or many devices (Lightning Fabric).

Every recipe key is also a flag (jsonargparse, as in litgpt): ``--stage2.trainable lora``, ``--devices 2
--strategy fsdp``, ``--resume true``. ``lattice distill --help`` lists them all.
"""

import typer

from lattice_plugin.cli.app import app


@app.command(
    "distill",
    help="Distill a converted Lattice checkpoint from its attention teacher: stage 1 attention transfer (only the new "
    "Lattice parameters train), stage 2 KL to the teacher's logits (full or LoRA). Takes a YAML recipe "
    "(--config recipes/distill/....yaml); every recipe key is also a flag; see `lattice distill --help`.",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def distill(ctx: typer.Context) -> None:
    import os

    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # nothing is downloaded (or looked up) at run time
    from lattice_plugin.distill.args import parse
    from lattice_plugin.distill.trainer import distill as run_distill

    run_distill(parse(list(ctx.args)))
