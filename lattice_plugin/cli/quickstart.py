"""``lattice quickstart``: the main job on the built-in default, from nothing to a report, on a CPU in minutes.

Each step runs the real ``lattice`` command in a subprocess, exactly as a user would type it, so the quickstart also
shows the commands to copy.
"""

import csv
import os
import shlex
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import typer

from lattice_plugin.cli.app import app


def recipe_path(relative: str) -> Path:
    """A recipe shipped with the plugin (``recipes/`` installs as ``lattice_plugin.recipes``)."""
    return Path(str(resources.files("lattice_plugin.recipes") / relative))


def run_step(title: str, args: list[str]) -> str:
    """Run ``lattice ARGS`` and return its stdout; stream a short header, fail with the command's own message."""
    from lattice_plugin.errors import LatticeError

    command = [sys.executable, "-m", "lattice_plugin", *args]
    typer.echo(f"\n== {title}\n$ lattice {shlex.join(args)}", err=True)
    env = {**os.environ, "COLUMNS": os.environ.get("COLUMNS", "120")}
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    if result.returncode != 0:
        raise LatticeError(f"step '{title}' failed (exit {result.returncode}): lattice {shlex.join(args)}")
    return result.stdout


def read_losses(out_dir: Path) -> list[tuple[int, float]]:
    """(iteration, training loss) rows of the newest CSV log litgpt wrote under ``out_dir``."""
    logs = sorted((out_dir / "logs" / "csv").glob("version_*/metrics.csv"))
    if not logs:
        return []
    with open(logs[-1], encoding="utf-8") as handle:
        return [(int(float(row["iter"])), float(row["loss"])) for row in csv.DictReader(handle) if row.get("loss")]


@app.command()
def quickstart(
    out_dir: Path = typer.Option(Path("out/quickstart"), "--out", help="Where every step writes."),
    max_tokens: int = typer.Option(409_600, help="Training tokens for the tiny Lattice model."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
) -> None:
    """Pretrain a tiny Lattice model on the shipped text, show the loss falling and generate a sample."""
    from lattice_plugin.errors import LatticeError

    if out_dir.exists():
        if not force:
            raise LatticeError(f"{str(out_dir)!r} already exists; pass --force to replace it")
        shutil.rmtree(out_dir)
    corpus_dir, model_dir = out_dir / "corpus", out_dir / "tiny-lattice"
    run_step("Shipped text and a BPE tokenizer", ["corpus", str(corpus_dir)])
    run_step(
        "Pretrain a tiny all-Lattice model with litgpt (CPU: a few minutes)",
        [
            "pretrain",
            "--config", str(recipe_path("pretrain/tiny-lattice.yaml")),
            "--out_dir", str(model_dir),
            "--tokenizer_dir", str(corpus_dir / "tokenizer"),
            "--data.train_data_path", str(corpus_dir / "train"),
            "--data.val_data_path", str(corpus_dir / "val"),
            "--train.max_tokens", str(max_tokens),
        ],
    )
    prompt = "A celebrity is"
    generated = run_step(
        "Generate with the fixed-slot cache",
        ["generate", str(model_dir / "final"), "--prompt", prompt, "--max_new_tokens", "60"],
    )
    sample = generated[generated.rfind(prompt) :]  # litgpt prints its arguments (the prompt among them) first
    inspect_text = run_step("Inspect the checkpoint", ["inspect", str(model_dir / "final"), "--lengths", "2048,131072"])

    losses = read_losses(model_dir)
    typer.echo("\n== Report")
    if losses:
        (first_iter, first_loss), (last_iter, last_loss) = losses[0], losses[-1]
        typer.echo(f"training loss: {first_loss:.3f} at iter {first_iter} -> {last_loss:.3f} at iter {last_iter}")
    typer.echo(f"sample: {' '.join(sample.split())}")
    typer.echo(inspect_text.strip().splitlines()[0])
    typer.echo(f"checkpoint: {model_dir / 'final'}")
