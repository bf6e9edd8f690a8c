"""``lattice eval`` (lm-eval on checkpoints, offline, side-by-side report) and ``lattice eval-data`` (the shipped
tasks' data and YAMLs, for lm-eval's own command line)."""

from pathlib import Path

import typer

from lattice_plugin.cli.app import app

TEXT_HELP = "Held-out text file for the perplexity and cloze tasks (default: the shipped val/ split)."


def _ints(text: str, name: str) -> list[int]:
    from lattice_plugin.errors import LatticeError

    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LatticeError(f"{name} must be comma-separated integers, got {text!r}") from None


def _data_config(p: dict):
    from lattice_plugin.evaluation.data import TaskDataConfig

    lengths = p["passkey_lengths"]
    lengths = [int(n) for n in lengths] if isinstance(lengths, list) else _ints(str(lengths), "passkey_lengths")
    return TaskDataConfig(
        text=str(p["text"]) if p["text"] else None,
        seed=int(p["seed"]),
        kv_pairs=int(p["kv_pairs"]),
        kv_context_words=int(p["kv_context_words"]),
        kv_items=int(p["kv_items"]),
        passkey_lengths=lengths,
        passkey_items=int(p["passkey_items"]),
        cloze_items=int(p["cloze_items"]),
        ppl_doc_chars=int(p["ppl_doc_chars"]),
        ppl_max_docs=p["ppl_max_docs"],
    )


@app.command("eval")
def eval_command(
    ctx: typer.Context,
    checkpoint_dirs: list[Path] | None = typer.Argument(
        None, help="Checkpoint directories (Lattice, hybrid or litgpt), compared side by side."
    ),
    tasks: str | None = typer.Option(
        None,
        "--tasks",
        "-t",
        help="Comma-separated tasks, groups or tags: lattice_suite (all shipped), lattice_ppl, lattice_kv_recall, "
        "lattice_passkey, lattice_cloze, or stock lm-eval tasks whose data is available locally.",
    ),
    config: Path | None = typer.Option(
        None, "--config", help="YAML of option values (e.g. recipes/eval/*.yaml); flags given here win."
    ),
    out_dir: Path = typer.Option(Path("out/eval"), "--out", help="Output directory (results, summary, task data)."),
    text: Path | None = typer.Option(None, "--text", help=TEXT_HELP),
    tasks_dir: Path | None = typer.Option(
        None, "--tasks-dir", help="Use data written by `lattice eval-data` instead of generating it into OUT."
    ),
    include_path: list[Path] = typer.Option([], "--include-path", help="More lm-eval task YAML directories."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda when available)."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16."),
    batch_size: int = typer.Option(8, help="Requests per forward."),
    max_length: int | None = typer.Option(None, help="Context length in tokens (default: the model's block_size)."),
    max_gen_toks: int = typer.Option(256, help="Default generation budget when a task sets none."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Generate by full recomputation instead of the cache."),
    limit: float | None = typer.Option(None, help="Documents per task (an integer) or a fraction of them."),
    num_fewshot: int | None = typer.Option(None, help="Few-shot examples (tasks' default when omitted)."),
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
    ppl_max_docs: int | None = typer.Option(None, help="Perplexity: at most this many documents."),
) -> None:
    """Run lm-eval offline on one or more checkpoints and print a side-by-side table (metric ± stderr); write
    OUT/results.json, OUT/lm-eval/<checkpoint>.json, OUT/summary.md and OUT/summary.png."""
    from lattice_plugin.errors import LatticeError
    from lattice_plugin.evaluation.runner import EvalSettings, run_eval

    p = _merge_config(ctx, config)
    if not p["checkpoint_dirs"]:
        raise LatticeError("give at least one checkpoint directory (or checkpoint_dirs in the --config file)")
    if not p["tasks"]:
        raise LatticeError("give --tasks (e.g. lattice_suite), or tasks in the --config file")
    data_config = None
    if p["tasks_dir"] is None:
        data_config = _data_config(p)
    elif p["text"] is not None:
        raise LatticeError("--text and --tasks-dir exclude each other: pass --text to `lattice eval-data` instead")
    limit = p["limit"]
    settings = EvalSettings(
        device=p["device"],
        dtype=p["dtype"],
        batch_size=int(p["batch_size"]),
        max_length=p["max_length"],
        max_gen_toks=int(p["max_gen_toks"]),
        use_cache=not p["no_cache"],
        limit=int(limit) if limit is not None and limit >= 1 and limit == int(limit) else limit,
        num_fewshot=p["num_fewshot"],
        bootstrap_iters=int(p["bootstrap_iters"]),
        seed=int(p["seed"]),
        log_samples=bool(p["log_samples"]),
        include_path=[str(path) for path in p["include_path"]],
    )
    checkpoints = [Path(path) for path in p["checkpoint_dirs"]]
    tasks_dir = Path(p["tasks_dir"]) if p["tasks_dir"] else None
    run_eval(checkpoints, p["tasks"], Path(p["out_dir"]), settings, data_config, tasks_dir, echo=typer.echo)


def _merge_config(ctx: typer.Context, config: Path | None) -> dict:
    """The command's parameters, with values from a YAML file where the command line left the default."""
    from lattice_plugin.errors import LatticeError

    params = dict(ctx.params)
    if config is None:
        return params
    import yaml

    try:
        values = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise LatticeError(f"cannot read --config {str(config)!r}: {error}") from None
    if not isinstance(values, dict):
        raise LatticeError(f"--config {str(config)!r} must hold a mapping of option names to values")
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - set(params) - {"config"})
    if unknown:
        raise LatticeError(f"unknown option(s) in {str(config)!r}: {', '.join(unknown)}")
    for key, value in values.items():
        source = ctx.get_parameter_source(key)  # compared by name: typer may bring its own copy of click
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            if key == "tasks" and isinstance(value, list):
                value = ",".join(str(v) for v in value)
            if key == "checkpoint_dirs" and isinstance(value, str):
                value = [value]
            params[key] = value
    return params


@app.command("eval-data")
def eval_data_command(
    out_dir: Path = typer.Argument(..., help="Directory for data/, tasks/ (an lm-eval --include_path) and manifest."),
    text: Path | None = typer.Option(None, "--text", help=TEXT_HELP),
    seed: int = typer.Option(1234, help="Seed of the generated data."),
    kv_pairs: int = typer.Option(8, help="Key-value recall: pairs per prompt."),
    kv_context_words: int = typer.Option(200, help="Key-value recall: prompt length in words (filler pads it)."),
    kv_items: int = typer.Option(100, help="Key-value recall: prompts."),
    passkey_lengths: str = typer.Option("128,512,2048", help="Passkey: prompt lengths in words (comma-separated)."),
    passkey_items: int = typer.Option(20, help="Passkey: prompts per length."),
    cloze_items: int = typer.Option(500, help="Cloze: questions (at most one per paragraph of the text)."),
    ppl_doc_chars: int = typer.Option(2000, help="Perplexity: characters per document (whole paragraphs)."),
    ppl_max_docs: int | None = typer.Option(None, help="Perplexity: at most this many documents."),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUT_DIR."),
) -> None:
    """Write the shipped tasks' data (deterministic, from local text) and their YAMLs with absolute paths, for
    `lattice eval --tasks-dir` or lm-eval's own command line (`python -m lattice_plugin.evaluation`)."""
    from lattice_plugin.evaluation.data import prepare_tasks

    tasks_path = prepare_tasks(out_dir, _data_config(locals()), force=force)
    typer.echo(f"wrote {out_dir}/data and {out_dir}/tasks; run lm-eval with --include_path {tasks_path}")
