"""``lattice inspect``: layer layout, parameter counts and generation-cache memory of a checkpoint."""

from pathlib import Path

import typer

from lattice_plugin.cli.app import app


@app.command()
def inspect(
    checkpoint_dir: Path = typer.Argument(..., help="A checkpoint directory (Lattice, hybrid or plain litgpt)."),
    lengths: str | None = typer.Option(
        None,
        help="Context lengths (comma-separated) for the cache table. Default: 2048, 32768 and 131072 tokens up to "
        "the model's block size, and the block size itself.",
        show_default=False,
    ),
    batch_size: int = typer.Option(1, help="Sequences per batch for the cache table."),
    kv_dtype: str = typer.Option("bfloat16", help="dtype of the attention KV cache (Lattice states are float32)."),
) -> None:
    """Show which layers are Lattice, the parameter counts, and cache bytes against a KV cache of the same model."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from lattice_plugin.checkpoint import find_weights, validate_checkpoint
    from lattice_plugin.errors import LatticeError
    from lattice_plugin.inspect import (
        attention_only,
        build_meta_model,
        cache_bytes,
        compare_sizes,
        default_context_lengths,
        format_bytes,
        layer_layout,
    )

    context_lengths = None
    if lengths is not None:
        try:
            context_lengths = [int(part) for part in lengths.split(",")]
        except ValueError:
            raise LatticeError(f"--lengths must be comma-separated integers, got {lengths!r}") from None
        if not context_lengths or min(context_lengths) < 1:
            raise LatticeError("--lengths must be positive")
    if batch_size < 1:
        raise LatticeError("--batch-size must be positive")
    dtype = getattr(torch, kv_dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise LatticeError(f"unknown --kv-dtype {kv_dtype!r} (e.g. bfloat16, float16, float32)")

    config = validate_checkpoint(checkpoint_dir)  # the counts below are the config's: the weights must match it
    context_lengths = context_lengths or default_context_lengths(config.block_size)
    weights = find_weights(checkpoint_dir)
    model = build_meta_model(config)
    layout = layer_layout(model)
    console = Console()
    n_lattice = sum(layer.mixer == "lattice" for layer in layout)
    console.print(
        f"[bold]{checkpoint_dir}[/bold]  ({config.name or 'unnamed'}, weights: {weights.name}, "
        f"{n_lattice}/{config.n_layer} Lattice layers)"
    )
    if n_lattice:
        console.print(
            f"Lattice: m={config.lattice_slots} slots per kv head, chunk {config.lattice_chunk_size}, "
            f"feature map {config.lattice_feature_map}, gates {config.lattice_gates}, "
            f"orthogonal={config.lattice_orthogonal}, normalize={config.lattice_normalize}, "
            f"output gate={config.lattice_output_gate}, rope={config.lattice_rope}"
        )
    console.print(
        f"heads: {config.n_head} query / {config.n_query_groups} kv, head size {config.head_size}, "
        f"n_embd {config.n_embd}, block size {config.block_size}"
    )

    layers = Table(title="Layers")
    for column in ("layer", "mixer", "mixer params", "block params"):
        layers.add_column(column, justify="right" if column != "mixer" else "left")
    for layer in layout:
        layers.add_row(str(layer.index), layer.mixer, f"{layer.mixer_parameters:,}", f"{layer.parameters:,}")
    console.print(layers)
    total = sum(p.numel() for p in model.parameters())
    reference_total = sum(p.numel() for p in build_meta_model(attention_only(config)).parameters())
    console.print(f"parameters: {total:,} (the attention-only model: {reference_total:,})")

    reference = build_meta_model(attention_only(config))
    caches = Table(title=f"Generation cache, batch {batch_size} (KV in {kv_dtype}, Lattice state in float32)")
    for column in ("context", "this model", "attention everywhere", "ratio"):
        caches.add_column(column, justify="right")
    for length in context_lengths:
        ours = cache_bytes(model, length, batch_size, dtype)
        theirs = cache_bytes(reference, length, batch_size, dtype)
        beyond = "*" if length > config.block_size else ""
        caches.add_row(f"{length:,}{beyond}", format_bytes(ours), format_bytes(theirs), compare_sizes(ours, theirs))
    console.print(caches)
    if max(context_lengths) > config.block_size:
        console.print(
            f"* beyond the model's block size ({config.block_size:,} tokens): what the same layers would hold"
        )
