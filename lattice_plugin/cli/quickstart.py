"""``lattice quickstart``: the main job on the built-in default, from nothing to a report, on a CPU in minutes.

The whole pipeline on the shipped text: train a tiny softmax-attention teacher with litgpt, convert it to Lattice,
distill the conversion (stage 1 attention transfer, stage 2 logit distillation), and print held-out perplexity of
every step with the cache size and decode speed of teacher and student. Each step runs the real ``lattice`` command
in a subprocess, exactly as a user would type it, so the quickstart also shows the commands to copy.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from importlib import resources
from pathlib import Path

import typer

from lattice_plugin.cli.app import app


def recipe_path(relative: str) -> Path:
    """A recipe shipped with the plugin (``recipes/`` installs as ``lattice_plugin.recipes``)."""
    return Path(str(resources.files("lattice_plugin.recipes") / relative))


class OutputFilter:
    """Sorts the lines of the steps' output: each distinct Python warning once (however many processes and
    iterations repeat it, e.g. the DataLoader's pin_memory warning), the source line printed under a warning never,
    anything else as the step's latest status."""

    WARNING = re.compile(r"^\S.*:\d+: \w*Warning: (?P<message>.*)$")

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def feed(self, line: str, after_warning: bool) -> tuple[str, str]:
        """``(kind, text)``: kind ``"warning"`` (print it), ``"repeated"`` (a warning already printed),
        ``"status"`` (show it as the step's latest status) or ``"skip"``; ``after_warning``: whether the stream's
        previous non-indented line was a warning (its indented source lines are skipped)."""
        text = line.rstrip()
        warning = self.WARNING.match(text)
        if warning:
            repeated = warning["message"] in self.seen
            self.seen.add(warning["message"])
            return ("repeated" if repeated else "warning"), text
        if not text.strip() or (after_warning and line[:1].isspace()):
            return "skip", text
        return "status", " ".join(text.split())[:100]


class StepRunner:
    """Runs each step as ``lattice ARGS`` in a subprocess, as a user would type it.

    While a step runs, a rich status line shows its latest output line (litgpt's and distill's progress); warnings
    go through :class:`OutputFilter`; every line of every step goes to ``LOG_DIR/NN-command.log``, whose tail is
    printed if the step fails.
    """

    def __init__(self, log_dir: Path) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False, soft_wrap=True)  # long commands stay copyable
        self.log_dir = log_dir
        self.timings: dict[str, float] = {}
        self.filter = OutputFilter()
        self.lock = threading.Lock()

    def run(self, title: str, args: list[str]) -> str:
        """Run one step; returns its stdout. A failing step stops the quickstart with the command and its log."""
        from rich.markup import escape
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        from lattice_plugin.errors import LatticeError

        self.console.print(f"\n[bold]== {escape(title)}[/bold]\n$ lattice {escape(shlex.join(args))}")
        log_path = self.log_dir / f"{len(self.timings) + 1:02d}-{args[0]}.log"
        env = {**os.environ, "COLUMNS": os.environ.get("COLUMNS", "120"), "LITDATA_DISABLE_VERSION_CHECK": "1"}
        command = [sys.executable, "-m", "lattice_plugin", *args]
        stdout: list[str] = []
        start = time.perf_counter()
        columns = (SpinnerColumn(), TimeElapsedColumn(), TextColumn("{task.description}"))
        with (
            log_path.open("w", encoding="utf-8") as log,
            Progress(*columns, console=self.console, transient=True) as bar,
        ):
            task = bar.add_task("starting")
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

            def pump(stream, keep: list[str] | None) -> None:
                after_warning = False
                for line in stream:
                    with self.lock:
                        log.write(line)
                        if keep is not None:
                            keep.append(line)
                        kind, text = self.filter.feed(line, after_warning)
                        if kind == "warning":
                            bar.console.print(escape(text), style="yellow")
                        elif kind == "status":
                            bar.update(task, description=escape(text))
                        after_warning = kind in ("warning", "repeated") or (after_warning and kind == "skip")

            readers = [
                threading.Thread(target=pump, args=(process.stdout, stdout)),
                threading.Thread(target=pump, args=(process.stderr, None)),
            ]
            for reader in readers:
                reader.start()
            for reader in readers:
                reader.join()
            returncode = process.wait()
        seconds = time.perf_counter() - start
        self.timings[title] = seconds
        if returncode != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-20:]
            self.console.print("\n".join(escape(line) for line in tail), style="red")
            raise LatticeError(
                f"step '{title}' failed (exit {returncode}; log: {log_path}): lattice {shlex.join(args)}"
            )
        self.console.print(f"done in {seconds:.0f}s (log: {escape(str(log_path))})")
        return "".join(stdout)


@app.command()
def quickstart(
    out_dir: Path = typer.Option(Path("out/quickstart"), "--out", help="Where every step writes."),
    teacher_tokens: int = typer.Option(409_600, help="Training tokens of the tiny attention teacher."),
    layers: str = typer.Option(
        "all", help="Layers converted to Lattice (e.g. all, or attention_every:4 for a hybrid)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
) -> None:
    """Train a tiny attention teacher on the shipped text, convert it to Lattice, distill it in two stages, and
    print held-out perplexity of each step with cache bytes and decode speed of teacher and student (and draw them:
    report.png beside the distillation's report.json)."""
    from lattice_plugin.checkpoint import atomic_write, load_config
    from lattice_plugin.errors import LatticeError
    from lattice_plugin.quickstart_report import cache_curves, format_table, plot_report

    if out_dir.exists():
        if not force:
            raise LatticeError(f"{str(out_dir)!r} already exists; pass --force to replace it")
        shutil.rmtree(out_dir)
    started = time.perf_counter()
    (out_dir / "logs").mkdir(parents=True)
    steps = StepRunner(out_dir / "logs")
    corpus_dir, teacher_dir = out_dir / "corpus", out_dir / "teacher"
    converted_dir, distill_dir = out_dir / "converted", out_dir / "distill"
    steps.run("Shipped text and a BPE tokenizer", ["corpus", str(corpus_dir)])
    steps.run(
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
    )  # fmt: skip
    steps.run(
        "Convert attention to Lattice (q/k/v/o reused, new Lattice parameters initialised)",
        ["convert", str(teacher_dir / "final"), "--out", str(converted_dir), "--layers", layers],
    )
    steps.run(
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
    )  # fmt: skip
    prompt = "A celebrity is"
    generated = steps.run(
        "Generate with the distilled student's fixed-slot cache",
        ["generate", str(distill_dir / "final"), "--prompt", prompt, "--max_new_tokens", "40"],
    )
    sample = generated[generated.rfind(prompt) :]  # litgpt prints its arguments (the prompt among them) first

    report = json.loads((distill_dir / "report.json").read_text(encoding="utf-8"))
    lengths = [2**k for k in range(7, 18)]  # 128 .. 131072 tokens
    curves = cache_curves(teacher_dir / "final", distill_dir / "final", lengths)
    block_size = load_config(distill_dir / "final").block_size
    png_path = distill_dir / "report.png"
    atomic_write(png_path, plot_report(report, lengths, curves, block_size))

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
            "the three student rows share one architecture, so one cache size and one decode speed; "
            f"lengths beyond the block size of {block_size} show what the same layers would hold)"
        )
    typer.echo(f"\nsample: {' '.join(sample.split())}")
    typer.echo(
        "time: "
        + ", ".join(
            f"{title.split(' (')[0].split(':')[0].lower()} {seconds:.0f}s" for title, seconds in steps.timings.items()
        )
    )
    typer.echo(
        f"total: {time.perf_counter() - started:.0f}s; report: {distill_dir / 'report.json'} and {png_path}; "
        f"student: {distill_dir / 'final'}; logs: {out_dir / 'logs'}"
    )
