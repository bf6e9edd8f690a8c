"""``lattice bench``: the Triton kernels and the decode step beside SDPA (and FLA where installed), on one GPU."""

from pathlib import Path

import typer

from lattice_plugin.cli.app import app


@app.command()
def bench(
    out: Path = typer.Option(Path("bench/results"), "--out", help="folder for the JSON and PNG results"),
    seq_lens: str = typer.Option("2048,8192,32768", help="comma-separated sequence lengths (each divides --tokens)"),
    tokens: int = typer.Option(32768, help="B * T for every sequence length"),
    slots: str = typer.Option("64,128", help="comma-separated slot counts m"),
    contexts: str = typer.Option("2048,32768,131072", help="comma-separated decode context lengths"),
    chunk_gates: bool = typer.Option(True, help="also time gates='chunk'"),
    name: str = typer.Option("bench", help="file name stem of the results"),
    model: bool = typer.Option(False, "--model", help="model-level generation instead: prefill and decode of a whole "
                               "model, all-Lattice beside attention and the hybrid (bench_generation.py)"),
    checkpoint: Path = typer.Option(None, help="--model: the shape of this checkpoint (default: the built-in 134M)"),
    batches: str = typer.Option("1,16,64", help="--model: comma-separated batch sizes"),
    prompts: str = typer.Option("2048,8192,32768,131072", help="--model: comma-separated prompt (context) lengths"),
) -> None:
    """Time Lattice forward and forward+backward, and one decode token, against SDPA and chunk_gla; with --model,
    a whole model's generation."""
    from lattice_plugin.bench import run_bench
    from lattice_plugin.errors import LatticeError

    def ints(text: str, what: str) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise LatticeError(f"--{what} takes comma-separated integers, got {text!r}") from None

    if model:
        from lattice_plugin.bench_generation import fields_from_checkpoint, run_generation_bench

        stem = "generation" if name == "bench" else name
        fields = fields_from_checkpoint(checkpoint) if checkpoint is not None else None
        results = run_generation_bench(out, fields=fields, batches=ints(batches, "batches"),
                                       contexts=ints(prompts, "prompts"), name=stem)
        for target, ratio in results["targets"].items():
            typer.echo(f"{target}: {'n/a' if ratio is None else f'{ratio:.2f}'}")
        typer.echo(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
        return
    results = run_bench(
        out, seq_lens=ints(seq_lens, "seq-lens"), tokens=tokens, slots=ints(slots, "slots"),
        decode_contexts=ints(contexts, "contexts"), chunk_gates=chunk_gates, name=name,
    )
    for target, ratio in results["targets"].items():
        typer.echo(f"{target}: {'n/a' if ratio is None else f'{ratio:.2f}'}")
    typer.echo(f"wrote {out / (name + '.json')} and {out / (name + '.png')}")
