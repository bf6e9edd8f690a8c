"""``lattice quickstart``: the main job on the built-in default, from nothing to a report, on a CPU in minutes.

The whole pipeline on the shipped text: train a tiny softmax-attention teacher with litgpt, convert it to Lattice,
distill the conversion (stage 1 attention transfer, stage 2 logit distillation), and print held-out perplexity of
every step with the cache size and decode speed of teacher and student. Each step runs the real ``lattice`` command
in a subprocess, exactly as a user would type it, so the quickstart also shows the commands to copy.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import typer

from lattice_plugin.cli.app import app


def recipe_path(relative: str) -> Path:
    """A recipe shipped with the plugin (``recipes/`` installs as ``lattice_plugin.recipes``)."""
    return Path(str(resources.files("lattice_plugin.recipes") / relative))


def run_step(title: str, args: list[str], timings: dict[str, float] | None = None) -> str:
    """Run ``lattice ARGS`` and return its stdout; stream a short header, fail with the command's own message."""
    from lattice_plugin.errors import LatticeError

    command = [sys.executable, "-m", "lattice_plugin", *args]
    typer.echo(f"\n== {title}\n$ lattice {shlex.join(args)}", err=True)
    env = {**os.environ, "COLUMNS": os.environ.get("COLUMNS", "120"), "LITDATA_DISABLE_VERSION_CHECK": "1"}
    start = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    if timings is not None:
        timings[title] = time.perf_counter() - start
    if result.returncode != 0:
        raise LatticeError(f"step '{title}' failed (exit {result.returncode}): lattice {shlex.join(args)}")
    return result.stdout


def format_table(report: dict) -> list[str]:
    """The report's perplexity / cache / decode table as text lines."""
    from lattice_plugin.inspect import format_bytes

    perplexity, cache, decode = report["perplexity"], report["cache_bytes"], report.get("decode", {})
    lengths = list(cache["teacher"])
    header = f"{'model':<34} {'held-out ppl':>12}" + "".join(f" {'cache @' + f'{int(n):,}':>14}" for n in lengths)
    header += f" {'decode tok/s':>13}"
    lines = [header, "-" * len(header)]
    rows = [
        ("teacher (softmax attention)", "teacher", "teacher"),
        ("converted, before distillation", "converted", "student"),
        ("after stage 1: attention transfer", "stage1", "student"),
        ("after stage 2: logit distillation", "stage2", "student"),
    ]
    for label, key, model in rows:
        if key not in perplexity:
            continue
        cells = "".join(f" {format_bytes(cache[model][n]):>14}" for n in lengths)
        speed = decode.get(f"{model}_tokens_per_sec")
        lines.append(f"{label:<34} {perplexity[key]:>12.2f}{cells} {speed:>13.1f}" if speed else f"{label:<34} {perplexity[key]:>12.2f}{cells}")
    return lines


@app.command()
def quickstart(
    out_dir: Path = typer.Option(Path("out/quickstart"), "--out", help="Where every step writes."),
    teacher_tokens: int = typer.Option(409_600, help="Training tokens of the tiny attention teacher."),
    layers: str = typer.Option("all", help="Layers converted to Lattice (e.g. all, or attention_every:4 for a hybrid)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
) -> None:
    """Train a tiny attention teacher on the shipped text, convert it to Lattice, distill it in two stages, and
    print held-out perplexity of each step with cache bytes and decode speed of teacher and student."""
    from lattice_plugin.errors import LatticeError

    if out_dir.exists():
        if not force:
            raise LatticeError(f"{str(out_dir)!r} already exists; pass --force to replace it")
        shutil.rmtree(out_dir)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    corpus_dir, teacher_dir = out_dir / "corpus", out_dir / "teacher"
    converted_dir, distill_dir = out_dir / "converted", out_dir / "distill"
    run_step("Shipped text and a BPE tokenizer", ["corpus", str(corpus_dir)], timings)
    run_step(
        "Pretrain a tiny softmax-attention teacher with litgpt (CPU: a few minutes)",
        [
            "pretrain",
            "--config", str(recipe_path("pretrain/teacher-tiny.yaml")),
            "--out_dir", str(teacher_dir),
            "--tokenizer_dir", str(corpus_dir / "tokenizer"),
            "--data.train_data_path", str(corpus_dir / "train"),
            "--data.val_data_path", str(corpus_dir / "val"),
            "--train.max_tokens", str(teacher_tokens),
        ],
        timings,
    )
    run_step(
        "Convert attention to Lattice (q/k/v/o reused, new Lattice parameters initialised)",
        ["convert", str(teacher_dir / "final"), "--out", str(converted_dir), "--layers", layers],
        timings,
    )
    run_step(
        "Distill: stage 1 attention transfer, stage 2 logit distillation (CPU: a few minutes)",
        [
            "distill",
            "--config", str(recipe_path("distill/tiny.yaml")),
            "--student_dir", str(converted_dir),
            "--teacher_dir", str(teacher_dir / "final"),
            "--out_dir", str(distill_dir),
            "--data.train_data_path", str(corpus_dir / "train"),
            "--data.val_data_path", str(corpus_dir / "val"),
        ],
        timings,
    )
    prompt = "A celebrity is"
    generated = run_step(
        "Generate with the distilled student's fixed-slot cache",
        ["generate", str(distill_dir / "final"), "--prompt", prompt, "--max_new_tokens", "40"],
        timings,
    )
    sample = generated[generated.rfind(prompt) :]  # litgpt prints its arguments (the prompt among them) first

    report = json.loads((distill_dir / "report.json").read_text(encoding="utf-8"))
    tokens = report["tokens"]
    typer.echo("\n== Report")
    typer.echo(
        f"held-out text: {report['heldout']['text']} (the last 1080 records of fortunes, never trained on; "
        f"{report['heldout']['tokens']:,} tokens); teacher trained on train/ (the first 7243 records)"
    )
    typer.echo(
        f"teacher: {report['parameters']['teacher']:,} parameters, {tokens['teacher_training']:,} training tokens; "
        f"distillation: {tokens['stage1']:,} + {tokens['stage2']:,} tokens "
        f"({100 * tokens.get('distill_fraction_of_teacher', 0):.0f}% of the teacher's)"
    )
    typer.echo(f"student: Lattice layers {report['lattice_layers']}, attention layers {report['attention_layers']}")
    typer.echo("")
    for line in format_table(report):
        typer.echo(line)
    decode = report.get("decode", {})
    if decode:
        typer.echo(
            f"(cache: one sequence, KV in bfloat16, Lattice state in float32; decode: batch 1, greedy, "
            f"{decode['new_tokens']} tokens after a {decode['prompt_tokens']}-token prompt, {decode['dtype']}; "
            "the three student rows share one architecture, so one cache size and one decode speed)"
        )
    typer.echo(f"\nsample: {' '.join(sample.split())}")
    typer.echo("time: " + ", ".join(f"{title.split(' (')[0].split(':')[0].lower()} {seconds:.0f}s" for title, seconds in timings.items()))
    typer.echo(f"total: {time.perf_counter() - started:.0f}s; report: {distill_dir / 'report.json'}; student: {distill_dir / 'final'}")
