"""``lattice recall mqar | lm | passkey``: recall and language-modelling quality of Lattice against its peers."""

from pathlib import Path

import typer

from lattice_plugin.cli.app import app

recall_app = typer.Typer(
    help="Recall (MQAR), small-LM perplexity and long-context passkey retrieval of Lattice against its peers, every "
    "mixer in the same litgpt blocks at equal state per head. Results are resumable JSON rows plus a summary and PNG.",
    no_args_is_help=True,
)
app.add_typer(recall_app, name="recall")

MIXERS_HELP = (
    "Comma-separated mixers, 'built-in' or 'all': attention, lattice_exact, lattice_chunk, lattice_additive, "
    "lattice_no_retraction, gla, deltanet, gated_deltanet (the last three need the fla extra and a GPU)."
)
BUDGET_HELP = (
    "Stop before a row that would end after this many seconds (fits a time-limited call); run again to resume."
)


def _list(text: str, kind: type, name: str) -> list:
    from lattice_plugin.errors import LatticeError

    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LatticeError(f"--{name} takes comma-separated {kind.__name__}s, got {text!r}") from None


def _device(name: str | None):
    import torch

    from lattice_plugin.errors import LatticeError

    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise LatticeError(f"unknown device {name!r} (cpu, cuda, cuda:1 ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LatticeError("--device cuda was asked for but no CUDA GPU is visible")
    return device


def _shard(text: str) -> tuple[int, int]:
    from lattice_plugin.errors import LatticeError

    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise LatticeError(f"--shard takes I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise LatticeError(f"--shard {text}: I must be in 0..N-1")
    return index, count


@recall_app.command()
def mqar(
    mixers: str = typer.Option("all", help=MIXERS_HELP),
    pairs: str = typer.Option("16,32,64,128", "--pairs", "-K", help="Key-value pairs K per sequence."),
    seq_len: int = typer.Option(0, help="Tokens per sequence (0: max(256, 4 K))."),
    slots: str = typer.Option("64", "--slots", "-m", help="Slot counts m (FLA: key dimensions per head)."),
    lrs: str = typer.Option("3e-4,1e-3,3e-3,1e-2", help="Learning rates swept per mixer (the summary keeps the best)."),
    seeds: str = typer.Option("0", help="Seeds (model initialisation and training data)."),
    steps: int = typer.Option(6000, help="Training steps per row (fresh sequences every step)."),
    batch_size: int = typer.Option(64, help="Sequences per step."),
    vocab_size: int = typer.Option(8192, help="Vocabulary: keys from the lower half, values from the upper half."),
    n_layer: int = typer.Option(2, help="Blocks."),
    n_embd: int = typer.Option(128, help="Model width."),
    n_head: int = typer.Option(2, help="Heads per block (head size = width / heads)."),
    intermediate_size: int = typer.Option(256, help="MLP hidden size (LLaMA MLP)."),
    chunk_size: int = typer.Option(64, help="Lattice chunk size."),
    short_conv: int = typer.Option(
        3, help="Kernel of the causal short convolution before every mixer, as in Zoology's models (0: none)."
    ),
    lattice_backend: str = typer.Option("auto", help="Lattice kernels: auto (Triton on CUDA), torch, triton."),
    eval_examples: int = typer.Option(1024, help="Held-out sequences scored per row."),
    eval_every: int = typer.Option(1000, help="Score the held-out sequences every this many steps (the curve)."),
    stop_at: float | None = typer.Option(None, help="End a row early once its accuracy reaches this."),
    curriculum: bool = typer.Option(
        False,
        help="Train on a cycle of easier settings: K' = 4, 8, ... below K in min(T, 16 K') tokens, then K "
        "(Zoology's mixture); scored at K.",
    ),
    results: Path = typer.Option(Path("reports/recall/mqar.json"), help="Rows (resumable); summary, .md, .png beside."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
    budget_s: float | None = typer.Option(None, help=BUDGET_HELP),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="Run again rows recorded as not measured."),
    shard: str = typer.Option(
        "0/1",
        help="I/N: run every N-th row from the I-th, so that N processes share one GPU "
        "and one results file (accuracy only: their tokens/s are not a speed measurement).",
    ),
) -> None:
    """Multi-query associative recall (Zoology's MQAR): accuracy per mixer, K, m, learning rate and seed."""
    from lattice_plugin.recall.mixers import parse_mixers
    from lattice_plugin.recall.mqar import MQARSettings, run_mqar

    settings = MQARSettings(
        pairs=_list(pairs, int, "pairs"),
        seq_len=seq_len or None,
        slots=_list(slots, int, "slots"),
        lrs=_list(lrs, float, "lrs"),
        seeds=_list(seeds, int, "seeds"),
        steps=steps,
        batch_size=batch_size,
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        intermediate_size=intermediate_size,
        chunk_size=chunk_size,
        short_conv=short_conv,
        lattice_backend=lattice_backend,
        eval_examples=eval_examples,
        eval_every=eval_every,
        stop_at=stop_at,
        curriculum=curriculum,
    )
    run_mqar(
        parse_mixers(mixers),
        settings,
        results,
        device=_device(device),
        budget_s=budget_s,
        retry_errors=retry_errors,
        shard=_shard(shard),
        echo=typer.echo,
    )
    typer.echo(results.with_suffix(".md").read_text(encoding="utf-8") if results.with_suffix(".md").exists() else "")
    typer.echo(f"rows: {results}; summary: {results.with_suffix('')}.summary.json, .md, .png")


@recall_app.command()
def lm(
    mixers: str = typer.Option("all", help=MIXERS_HELP),
    tokens: int = typer.Option(3_276_800, help="Training tokens per model (the same windows for every mixer)."),
    seq_len: int = typer.Option(256, help="Tokens per training window and per held-out window."),
    batch_size: int = typer.Option(64, help="Windows per step."),
    lrs: str = typer.Option("1e-3", help="Learning rates (the summary keeps the best per mixer)."),
    seeds: str = typer.Option("0", help="Seeds (initialisation and training windows)."),
    vocab_size: int = typer.Option(4096, help="BPE vocabulary trained on train/."),
    n_layer: int = typer.Option(8, help="Blocks."),
    n_embd: int = typer.Option(512, help="Model width."),
    n_head: int = typer.Option(8, help="Heads per block."),
    intermediate_size: int = typer.Option(1376, help="MLP hidden size (LLaMA MLP)."),
    slots: int = typer.Option(64, "--slots", "-m", help="Slot count m (FLA: key dimensions per head)."),
    chunk_size: int = typer.Option(64, help="Lattice chunk size."),
    lattice_backend: str = typer.Option("auto", help="Lattice kernels: auto (Triton on CUDA), torch, triton."),
    eval_every: int = typer.Option(0, help="Score the held-out text every this many steps (0: only at the end)."),
    text: Path | None = typer.Option(None, help="Folder with train/*.txt and val/*.txt (default: the shipped text)."),
    work: Path = typer.Option(Path("out/recall-lm"), help="Folder for the tokenizer (trained once)."),
    results: Path = typer.Option(Path("reports/recall/lm.json"), help="Rows (resumable); summary, .md, .png beside."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
    budget_s: float | None = typer.Option(None, help=BUDGET_HELP),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="Run again rows recorded as not measured."),
) -> None:
    """Small language model per mixer on the same tokens: held-out perplexity and training tokens/s."""
    from lattice_plugin.recall.lm import LMSettings, run_lm
    from lattice_plugin.recall.mixers import parse_mixers

    settings = LMSettings(
        tokens=tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        lrs=_list(lrs, float, "lrs"),
        seeds=_list(seeds, int, "seeds"),
        vocab_size=vocab_size,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        intermediate_size=intermediate_size,
        slots=slots,
        chunk_size=chunk_size,
        lattice_backend=lattice_backend,
        eval_every=eval_every,
    )
    run_lm(
        parse_mixers(mixers),
        settings,
        results,
        device=_device(device),
        text_dir=text,
        work_dir=work,
        budget_s=budget_s,
        retry_errors=retry_errors,
        echo=typer.echo,
    )
    typer.echo(results.with_suffix(".md").read_text(encoding="utf-8") if results.with_suffix(".md").exists() else "")
    typer.echo(f"rows: {results}; summary: {results.with_suffix('')}.summary.json, .md, .png")


@recall_app.command()
def passkey(
    checkpoint_dirs: list[Path] = typer.Argument(..., help="Checkpoints to compare, e.g. a teacher and its student."),
    lengths: str = typer.Option("128,256,512,1024,2048", help="Prompt lengths in words (about 1.3 tokens each)."),
    items: int = typer.Option(20, help="Prompts per length."),
    out: Path = typer.Option(Path("reports/recall/passkey.json"), help="JSON results; .md and .png beside."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16."),
    batch_size: int = typer.Option(8, help="Prompts per forward."),
    seed: int = typer.Option(1234, help="Seed of the prompts and of lm-eval."),
) -> None:
    """Pass-key retrieval at and beyond each checkpoint's training length (lm-eval task lattice_passkey)."""
    from lattice_plugin.evaluation.runner import checkpoint_labels
    from lattice_plugin.recall.passkey import run_passkey, table

    report = run_passkey(
        checkpoint_labels(checkpoint_dirs),
        _list(lengths, int, "lengths"),
        out,
        items=items,
        device=_device(device),
        dtype=dtype,
        batch_size=batch_size,
        seed=seed,
        echo=typer.echo,
    )
    typer.echo(table(report))
    typer.echo(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
