"""``lattice convert``: turn a pretrained litgpt (or Hugging Face) transformer checkpoint into a Lattice checkpoint."""

from pathlib import Path

import typer

from lattice_plugin.cli.app import app
from lattice_plugin.vocab import FEATURE_MAPS, one_of


@app.command()
def convert(
    source_dir: Path = typer.Argument(
        ...,
        help="A litgpt checkpoint directory (model_config.yaml + lit_model.pth or model.safetensors) or a Hugging "
        "Face one (config.json + weights, imported with litgpt's converter).",
        show_default=False,
    ),
    out: Path = typer.Option(..., "--out", help="Directory to write the Lattice checkpoint to.", show_default=False),
    layers: str | None = typer.Option(
        None,
        "--layers",
        help="Layers that become Lattice: all, a list like 0,2,-1, first:N, last:N, every:K (layers K-1, 2K-1, ...) "
        "or attention_every:K. Default: all.",
        show_default=False,
    ),
    keep_attention: str | None = typer.Option(
        None,
        "--keep-attention",
        help="Comma-separated layer indices that stay softmax attention; every other layer becomes Lattice.",
        show_default=False,
    ),
    slots: int | None = typer.Option(
        None, "--slots", "-m", help="Memory slots m per key/value head. Default: the head size.", show_default=False
    ),
    feature_map: str = typer.Option("softmax", help=f"Code non-linearity: {one_of(FEATURE_MAPS)}."),
    gates: str = typer.Option("exact", help="exact (the recurrence) or chunk (gates frozen per chunk, the paper's)."),
    output_gate: bool = typer.Option(False, "--output-gate/--no-output-gate", help="Add a sigmoid output gate."),
    dtype: str | None = typer.Option(
        None, help="Output dtype: float32, bfloat16 or float16. Default: the source's.", show_default=False
    ),
    seed: int = typer.Option(0, help="Seed of the randomly initialised new parameters (beta, initial slots, gate)."),
    model_name: str | None = typer.Option(
        None,
        "--model-name",
        help="Hugging Face input only: litgpt's config name for the architecture. Default: the directory name or "
        "config.json's _name_or_path.",
        show_default=False,
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
) -> None:
    """Convert attention layers to Lattice layers, reusing q/k/v/o bit-for-bit (docs/math.md §6).

    Embeddings, norms, MLPs, the head and unconverted layers are copied unchanged. The output (model_config.yaml,
    model.safetensors, tokenizer files, conversion.json) is renamed into place only when complete.
    """
    from lattice_plugin.conversion.convert import ConversionOptions, convert_checkpoint

    options = ConversionOptions(
        layers=layers,
        keep_attention=keep_attention,
        slots=slots,
        feature_map=feature_map,
        gates=gates,
        output_gate=output_gate,
        dtype=dtype,
        seed=seed,
        model_name=model_name,
    )
    convert_checkpoint(source_dir, out, options, force=force, log=_log)


def _log(line: str) -> None:
    typer.echo(f"lattice convert: {line}", err=True)
