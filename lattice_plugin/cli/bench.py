"""``lattice bench``: the Triton kernels and the decode step beside SDPA (and FLA where installed), on one GPU;
``--train``: the training step of a 134M litgpt model with each token mixer."""

from pathlib import Path

import typer

from lattice_plugin.cli.app import app


@app.command()
def bench(
    out: Path = typer.Option(Path("bench/results"), "--out", help="folder for the JSON and PNG results"),
    seq_lens: str = typer.Option("2048,8192,32768", help="comma-separated sequence lengths (each divides --tokens)"),
    tokens: int = typer.Option(None, help="B * T for every sequence length [default: 32768; 16384 with --train]"),
    slots: str = typer.Option("64,128", help="comma-separated slot counts m"),
    contexts: str = typer.Option("2048,32768,131072", help="comma-separated decode context lengths"),
    chunk_gates: bool = typer.Option(True, help="also time gates='chunk'"),
    train: bool = typer.Option(
        False, "--train", help="time the model-level training step (tokens/s, peak memory) of each mixer instead"
    ),
    mixers: str = typer.Option(
        "attention,lattice_exact,lattice_chunk,hybrid,fla_gla,fla_deltanet",
        help="with --train: comma-separated token mixers (fla_* need the fla extra and are skipped without it)",
    ),
    steps: int = typer.Option(5, help="with --train: timed steps per row (after 3 warm-up steps)"),
    compile: bool = typer.Option(
        False, "--compile", help="with --train: every model under torch.compile, as litgpt pretrain runs it"
    ),
    model: bool = typer.Option(
        False,
        "--model",
        help="time model-level generation instead: prefill and decode of a whole model, "
        "all-Lattice beside attention and the hybrid",
    ),
    checkpoint: Path = typer.Option(
        None, help="with --model: the shape of this checkpoint [default: the built-in 134M]"
    ),
    batches: str = typer.Option("1,16,64", help="with --model: comma-separated batch sizes"),
    prompts: str = typer.Option("2048,8192,32768,131072", help="with --model: comma-separated prompt lengths"),
    name: str = typer.Option(
        None, help="file name stem of the results [default: bench; train with --train; generation with --model]"
    ),
) -> None:
    """Time Lattice forward and forward+backward, and one decode token, against SDPA and chunk_gla; with --train,
    the whole training step of one model with attention, Lattice, the hybrid and FLA's layers; with --model, a whole
    model's generation (prefill, decode per token, cache bytes) beside attention and the hybrid."""
    from lattice_plugin.errors import LatticeError

    def ints(text: str, what: str) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise LatticeError(f"--{what} takes comma-separated integers, got {text!r}") from None

    if train and model:
        raise LatticeError("choose one of --train and --model")
    if model:
        from lattice_plugin.bench_generation import fields_from_checkpoint, run_generation_bench

        name = name or "generation"
        fields = fields_from_checkpoint(checkpoint) if checkpoint is not None else None
        results = run_generation_bench(
            out, fields=fields, batches=ints(batches, "batches"), contexts=ints(prompts, "prompts"), name=name
        )
        for target, ratio in results["targets"].items():
            typer.echo(f"{target}: {'n/a' if ratio is None else f'{ratio:.2f}'}")
    elif train:
        from lattice_plugin.bench_training import run_train_bench

        name = name or "train"
        if steps < 1:
            raise LatticeError(f"--steps must be at least 1, got {steps}")
        results = run_train_bench(
            out,
            seq_lens=ints(seq_lens, "seq-lens"),
            tokens=tokens or 16384,
            steps=steps,
            name=name,
            mixers=tuple(m.strip() for m in mixers.split(",") if m.strip()),
            compiled=compile,
        )
        for row in results["model"]:
            speed = (
                f"{row['tokens_per_s'] / 1e3:.0f}k tokens/s, {row['peak_gib']:.1f} GiB"
                if "tokens_per_s" in row
                else row.get("error", "")
            )
            typer.echo(f"{row['method']} T={row['T']}: {speed}")
    else:
        from lattice_plugin.bench import run_bench

        name = name or "bench"
        results = run_bench(
            out,
            seq_lens=ints(seq_lens, "seq-lens"),
            tokens=tokens or 32768,
            slots=ints(slots, "slots"),
            decode_contexts=ints(contexts, "contexts"),
            chunk_gates=chunk_gates,
            name=name,
        )
        for target, ratio in results["targets"].items():
            typer.echo(f"{target}: {'n/a' if ratio is None else f'{ratio:.2f}'}")
    typer.echo(f"wrote {out / (name + '.json')} and {out / (name + '.png')}")
