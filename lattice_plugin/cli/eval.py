"""``lattice eval`` (lm-eval on checkpoints, offline, side-by-side report) and ``lattice eval-data`` (the shipped
tasks' data and YAMLs, for lm-eval's own command line)."""

from pathlib import Path
from typing import Optional

import typer

from lattice_plugin.cli.app import app

TEXT_HELP = "Held-out text file for the perplexity and cloze tasks (default: the shipped val/ split)."


def _ints(text: str, name: str) -> list[int]:
    from lattice_plugin.errors import LatticeError

    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LatticeError(f"{name} must be comma-separated integers, got {text!r}") from None


def _data_config(text, seed, kv_pairs, kv_context_words, kv_items, passkey_lengths, passkey_items, cloze_items,
                 ppl_doc_chars, ppl_max_docs):
    from lattice_plugin.evaluation.data import TaskDataConfig

    return TaskDataConfig(
        text=str(text) if text else None,
        seed=seed,
        kv_pairs=kv_pairs,
        kv_context_words=kv_context_words,
        kv_items=kv_items,
        passkey_lengths=_ints(passkey_lengths, "--passkey-lengths"),
        passkey_items=passkey_items,
        cloze_items=cloze_items,
        ppl_doc_chars=ppl_doc_chars,
        ppl_max_docs=ppl_max_docs,
    )


@app.command("eval")
def eval_command(
    checkpoint_dirs: list[Path] = typer.Argument(..., help="Checkpoint directories (Lattice, hybrid or litgpt)."),
    tasks: str = typer.Option(
        ..., "--tasks", "-t",
        help="Comma-separated tasks, groups or tags: lattice_suite (all shipped), lattice_ppl, lattice_kv_recall, "
        "lattice_passkey, lattice_cloze, or stock lm-eval tasks whose data is available locally.",
    ),
    out_dir: Path = typer.Option(Path("out/eval"), "--out", help="Output directory (results, summary, task data)."),
    text: Optional[Path] = typer.Option(None, "--text", help=TEXT_HELP),
    tasks_dir: Optional[Path] = typer.Option(
        None, "--tasks-dir", help="Use data written by `lattice eval-data` instead of generating it into OUT."
    ),
    include_path: list[Path] = typer.Option([], "--include-path", help="More lm-eval task YAML directories."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16."),
    batch_size: int = typer.Option(8, help="Requests per forward."),
    max_length: Optional[int] = typer.Option(None, help="Context length in tokens (default: the model's block_size)."),
    max_gen_toks: int = typer.Option(256, help="Default generation budget when a task sets none."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Generate by full recomputation instead of the cache."),
    limit: Optional[float] = typer.Option(None, help="Documents per task (an integer) or a fraction of them."),
    num_fewshot: Optional[int] = typer.Option(None, help="Few-shot examples (tasks' default when omitted)."),
    bootstrap_iters: int = typer.Option(1000, help="Bootstrap iterations for the stderr of non-mean metrics."),
    seed: int = typer.Option(1234, help="Seed of the task data and of lm-eval."),
    log_samples: bool = typer.Option(False, "--log-samples", help="Write per-document outputs under OUT/samples."),
    kv_pairs: int = typer.Option(8, help="Key-value recall: pairs per prompt."),
    kv_context_words: int = typer.Option(200, help="Key-value recall: prompt length in words (filler pads it)."),
    kv_items: int = typer.Option(100, help="Key-value recall: prompts."),
    passkey_lengths: str = typer.Option("128,512,2048", help="Passkey: prompt lengths in words (comma-separated)."),
    passkey_items: int = typer.Option(20, help="Passkey: prompts per length."),
    cloze_items: int = typer.Option(500, help="Cloze: questions (at most one per paragraph of the text)."),
    ppl_doc_chars: int = typer.Option(2000, help="Perplexity: characters per document (whole paragraphs)."),
    ppl_max_docs: Optional[int] = typer.Option(None, help="Perplexity: at most this many documents."),
) -> None:
    """Run lm-eval offline on one or more checkpoints and print a side-by-side table (metric ± stderr); write
    OUT/results.json, OUT/lm-eval/<checkpoint>.json, OUT/summary.md and OUT/summary.png."""
    from lattice_plugin.evaluation.runner import EvalSettings, run_eval

    data_config = None
    if tasks_dir is None:
        data_config = _data_config(text, seed, kv_pairs, kv_context_words, kv_items, passkey_lengths, passkey_items,
                                   cloze_items, ppl_doc_chars, ppl_max_docs)
    elif text is not None:
        from lattice_plugin.errors import LatticeError

        raise LatticeError("--text and --tasks-dir exclude each other: pass --text to `lattice eval-data` instead")
    settings = EvalSettings(
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        max_length=max_length,
        max_gen_toks=max_gen_toks,
        use_cache=not no_cache,
        limit=int(limit) if limit is not None and limit >= 1 and limit == int(limit) else limit,
        num_fewshot=num_fewshot,
        bootstrap_iters=bootstrap_iters,
        seed=seed,
        log_samples=log_samples,
        include_path=[str(p) for p in include_path],
    )
    run_eval(checkpoint_dirs, tasks, out_dir, settings, data_config, tasks_dir, echo=typer.echo)


@app.command("eval-data")
def eval_data_command(
    out_dir: Path = typer.Argument(..., help="Directory for data/, tasks/ (an lm-eval --include_path) and manifest."),
    text: Optional[Path] = typer.Option(None, "--text", help=TEXT_HELP),
    seed: int = typer.Option(1234, help="Seed of the generated data."),
    kv_pairs: int = typer.Option(8, help="Key-value recall: pairs per prompt."),
    kv_context_words: int = typer.Option(200, help="Key-value recall: prompt length in words (filler pads it)."),
    kv_items: int = typer.Option(100, help="Key-value recall: prompts."),
    passkey_lengths: str = typer.Option("128,512,2048", help="Passkey: prompt lengths in words (comma-separated)."),
    passkey_items: int = typer.Option(20, help="Passkey: prompts per length."),
    cloze_items: int = typer.Option(500, help="Cloze: questions (at most one per paragraph of the text)."),
    ppl_doc_chars: int = typer.Option(2000, help="Perplexity: characters per document (whole paragraphs)."),
    ppl_max_docs: Optional[int] = typer.Option(None, help="Perplexity: at most this many documents."),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUT_DIR."),
) -> None:
    """Write the shipped tasks' data (deterministic, from local text) and their YAMLs with absolute paths, for
    `lattice eval --tasks-dir` or lm-eval's own command line (`python -m lattice_plugin.evaluation`)."""
    from lattice_plugin.evaluation.data import prepare_tasks

    config = _data_config(text, seed, kv_pairs, kv_context_words, kv_items, passkey_lengths, passkey_items,
                          cloze_items, ppl_doc_chars, ppl_max_docs)
    tasks_path = prepare_tasks(out_dir, config, force=force)
    typer.echo(f"wrote {out_dir}/data and {out_dir}/tasks; run lm-eval with --include_path {tasks_path}")
