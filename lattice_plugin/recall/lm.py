"""``lattice recall lm``: the same small language model with each mixer, trained on the same tokens of the same text,
scored on held-out text (perplexity) and timed (training tokens per second).

Text: the shipped ``train/`` and held-out ``val/`` splits (or another folder with the same layout); the tokenizer is a
byte-level BPE trained locally on ``train/`` (:func:`lattice_plugin.corpus.train_tokenizer`), once per work folder.
Training windows are drawn from the training tokens by a seeded generator, so every mixer of a seed sees exactly the
same windows in the same order. The held-out score covers all of ``val/`` in consecutive windows.
"""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lattice_plugin.checkpoint import atomic_write
from lattice_plugin.corpus import shipped_corpus, train_tokenizer
from lattice_plugin.errors import LatticeError
from lattice_plugin.recall.mixers import (
    MIXERS,
    Mixer,
    ModelShape,
    build_model,
    check_causal,
    run_mixer_rows,
    state_numbers_per_head,
)
from lattice_plugin.recall.results import ResultsFile, pyplot, write_png
from lattice_plugin.recall.training import Schedule, autocast, train
from lattice_plugin.vocab import BACKENDS

EXPERIMENT = "lm"


@dataclass
class LMSettings:
    """Defaults: the shape of ``recipes/pretrain/teacher-small.yaml`` (8 layers, width 512; here 8 heads of 64
    without grouping, so that every mixer has one state per head, and the head tied to the embedding: 27.4M
    parameters with attention) trained on 3.3M tokens (8 epochs of the shipped text), as the distillation report's
    teacher was."""

    tokens: int = 3_276_800
    seq_len: int = 256
    batch_size: int = 64
    lrs: list[float] = field(default_factory=lambda: [1e-3])
    seeds: list[int] = field(default_factory=lambda: [0])
    vocab_size: int = 4096
    n_layer: int = 8
    n_embd: int = 512
    n_head: int = 8
    intermediate_size: int = 1376
    slots: int = 64
    chunk_size: int = 64
    lattice_backend: str = "auto"
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    eval_every: int = 0
    """Score the held-out text every this many steps (0: only at the end)."""

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.seq_len))

    def shape(self) -> ModelShape:
        """The model every row trains."""
        return ModelShape(
            self.vocab_size,
            self.seq_len,
            self.n_layer,
            self.n_embd,
            self.n_head,
            self.intermediate_size,
            self.slots,
            self.chunk_size,
            self.lattice_backend,
        )

    def check(self) -> None:
        positive = dict(
            tokens=self.tokens,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            n_layer=self.n_layer,
            n_embd=self.n_embd,
            n_head=self.n_head,
            slots=self.slots,
        )
        bad = [name for name, value in positive.items() if value < 1] + [f"lr={lr}" for lr in self.lrs if not lr > 0]
        bad += [] if self.lattice_backend in BACKENDS else [f"lattice backend {self.lattice_backend!r}"]
        if bad or not (self.lrs and self.seeds):
            raise LatticeError(f"invalid language-model setting: {', '.join(bad) or 'an empty list of lrs or seeds'}")


def corpus_tokens(text_dir: Path, work_dir: Path, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, Path]:
    """Token ids of ``text_dir/train/*.txt`` and ``text_dir/val/*.txt`` (each file framed by BOS and EOS) with the
    tokenizer of ``work_dir/tokenizer-<vocab>`` (trained on ``train/`` the first time)."""
    from litgpt import Tokenizer

    splits = {split: sorted((text_dir / split).glob("*.txt")) for split in ("train", "val")}
    empty = [split for split, files in splits.items() if not files]
    if empty:
        raise LatticeError(f"{str(text_dir)!r} has no .txt files in {' and '.join(empty)}/ (expected train/ and val/)")
    tokenizer_dir = work_dir / f"tokenizer-{vocab_size}"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        train_tokenizer(splits["train"], tokenizer_dir, vocab_size=vocab_size)
    tokenizer = Tokenizer(tokenizer_dir)

    def encode(files: list[Path]) -> torch.Tensor:
        return torch.cat([tokenizer.encode(f.read_text(encoding="utf-8"), bos=True, eos=True) for f in files]).long()

    return encode(splits["train"]), encode(splits["val"]), tokenizer_dir


@torch.no_grad()
def heldout_perplexity(
    model: torch.nn.Module, tokens: torch.Tensor, seq_len: int, batch_size: int, device: torch.device
) -> tuple[float, int]:
    """Perplexity over consecutive ``seq_len`` windows of ``tokens`` (the last partial window dropped) and the number
    of tokens scored."""
    model.eval()
    windows = (len(tokens) - 1) // seq_len
    if windows < 1:
        raise LatticeError(f"the held-out text has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    inputs = tokens[: windows * seq_len].view(windows, seq_len)
    targets = tokens[1 : windows * seq_len + 1].view(windows, seq_len)
    total = 0.0
    for start in range(0, windows, batch_size):
        x, y = inputs[start : start + batch_size].to(device), targets[start : start + batch_size].to(device)
        with autocast(device):
            logits = model(x)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
    return math.exp(total / targets.numel()), targets.numel()


def row_key(mixer: Mixer, lr: float, seed: int, s: LMSettings, text: str) -> dict[str, Any]:
    return dict(
        mixer=mixer.name,
        lr=lr,
        seed=seed,
        m=s.slots if mixer.has_state else None,
        tokens=s.tokens,
        steps=s.steps,
        seq_len=s.seq_len,
        batch_size=s.batch_size,
        vocab_size=s.vocab_size,
        n_layer=s.n_layer,
        n_embd=s.n_embd,
        n_head=s.n_head,
        intermediate_size=s.intermediate_size,
        chunk_size=s.chunk_size,
        lattice_backend=s.lattice_backend,
        warmup_fraction=s.warmup_fraction,
        weight_decay=s.weight_decay,
        text=text,
    )


def run_row(
    mixer: Mixer,
    lr: float,
    seed: int,
    s: LMSettings,
    train_tokens: torch.Tensor,
    val_tokens: torch.Tensor,
    device: torch.device,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    shape = s.shape()
    torch.manual_seed(seed)
    model = build_model(mixer, shape).to(device)
    leak = check_causal(model, mixer, s.vocab_size, s.seq_len, device)
    generator = torch.Generator().manual_seed(seed)
    on_device = train_tokens.to(device)
    offsets = torch.arange(s.seq_len + 1, device=device)

    def next_batch(step: int):
        starts = torch.randint(0, len(train_tokens) - s.seq_len - 1, (s.batch_size, 1), generator=generator)
        window = on_device[starts.to(device) + offsets]
        return window[:, :-1], window[:, 1:]

    def score() -> float:
        return -heldout_perplexity(model, val_tokens, s.seq_len, s.batch_size, device)[0]

    schedule = Schedule(
        lr=lr, steps=s.steps, warmup_fraction=s.warmup_fraction, weight_decay=s.weight_decay, betas=(0.9, 0.95)
    )
    run = train(
        model,
        next_batch,
        schedule,
        device,
        evaluate=score,
        eval_every=s.eval_every,
        log_every=max(1, s.steps // 20),
        echo=echo,
        label=f"{mixer.name} lr={lr:g} seed={seed}",
    )
    for point in run["curve"]:
        if "score" in point:
            point["heldout_ppl"] = -point.pop("score")
    ppl, scored = heldout_perplexity(model, val_tokens, s.seq_len, s.batch_size, device)
    return dict(
        heldout_ppl=ppl,
        heldout_tokens=scored,
        train_tokens=len(train_tokens),
        parameters=sum(p.numel() for p in model.parameters()),
        state_per_head=state_numbers_per_head(mixer, shape),
        causal_leak=leak,
        **run,
    )


def run_lm(
    mixers: list[Mixer],
    settings: LMSettings,
    results_path: Path,
    *,
    device: torch.device,
    text_dir: Path | None = None,
    work_dir: Path = Path("out/recall-lm"),
    budget_s: float | None = None,
    retry_errors: bool = False,
    echo: Callable[[str], None] = print,
) -> ResultsFile:
    settings.check()
    text_dir = Path(text_dir) if text_dir is not None else shipped_corpus()
    train_tokens, val_tokens, tokenizer_dir = corpus_tokens(text_dir, Path(work_dir), settings.vocab_size)
    echo(
        f"text {text_dir}: {len(train_tokens):,} training and {len(val_tokens):,} held-out tokens "
        f"(tokenizer {tokenizer_dir}); {settings.steps} steps of {settings.batch_size} x {settings.seq_len} tokens"
    )
    text = "shipped" if text_dir == shipped_corpus() else str(text_dir)
    results = ResultsFile(results_path, EXPERIMENT)
    jobs = (
        (
            mixer.name,
            row_key(mixer, lr, seed, settings, text),
            lambda mixer=mixer, lr=lr, seed=seed: run_row(
                mixer, lr, seed, settings, train_tokens, val_tokens, device, echo
            ),
        )
        for mixer in mixers
        for lr in settings.lrs
        for seed in settings.seeds
    )
    run_mixer_rows(
        results,
        jobs,
        lambda: write_summary(results, results_path),
        device=device,
        budget_s=budget_s,
        retry_errors=retry_errors,
        echo=echo,
    )
    return results


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per mixer and setting (every key field but lr and seed): the best learning rate's held-out perplexity (mean
    over seeds) and tokens/s."""
    groups: dict[tuple, dict[float, list[dict]]] = {}
    for row in rows:
        setting = tuple(sorted((k, v) for k, v in row["key"].items() if k not in ("lr", "seed")))
        groups.setdefault(setting, {}).setdefault(row["key"]["lr"], []).append(row)
    table = []
    for setting, by_lr in groups.items():
        fields = dict(setting)
        measured = {lr: rs for lr, rs in by_lr.items() if all(r.get("heldout_ppl") for r in rs)}
        entry = dict(
            mixer=fields["mixer"],
            m=fields["m"],
            tokens=fields["tokens"],
            steps=fields["steps"],
            setting=fields,
            device=sorted({r.get("device", "?") for rs in by_lr.values() for r in rs}),
        )
        if not measured:
            entry["not_measured"] = next(r.get("error") for rs in by_lr.values() for r in rs)
        else:
            lr = min(measured, key=lambda lr: sum(r["heldout_ppl"] for r in measured[lr]) / len(measured[lr]))
            rs = measured[lr]
            speeds = [r["tokens_per_s"] for r in rs if r.get("tokens_per_s")]
            entry.update(
                lr=lr,
                seeds=len(rs),
                heldout_ppl=sum(r["heldout_ppl"] for r in rs) / len(rs),
                tokens_per_s=sum(speeds) / len(speeds) if speeds else None,
                parameters=rs[0]["parameters"],
            )
        table.append(entry)
    order = list(MIXERS)
    return sorted(table, key=lambda e: (order.index(e["mixer"]) if e["mixer"] in order else 99, e["m"] or 0))


def markdown(table: list[dict[str, Any]]) -> str:
    lines = [
        "| mixer | m | parameters | training tokens | held-out ppl | training tokens/s | lr | device |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        if "not_measured" in e:
            lines.append(
                f"| {e['mixer']} | {e['m'] or '-'} | | {e['tokens']:,} | not measured: {e['not_measured']} "
                f"| | | {', '.join(map(str, e['device']))} |"
            )
            continue
        speed = f"{e['tokens_per_s']:,.0f}" if e["tokens_per_s"] else "-"
        lines.append(
            f"| {e['mixer']} | {e['m'] or '-'} | {e['parameters'] / 1e6:.1f}M | {e['tokens']:,} | "
            f"{e['heldout_ppl']:.2f} | {speed} | {e['lr']:g} | {', '.join(map(str, e['device']))} |"
        )
    return "\n".join(lines) + "\n"


def plot(table: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    measured = [e for e in table if "heldout_ppl" in e]
    if plt is None or not measured:
        return
    figure, (ppl_axis, speed_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [e["mixer"] for e in measured]
    ppl_axis.bar(labels, [e["heldout_ppl"] for e in measured])
    ppl_axis.set(ylabel="held-out perplexity", title="small LM, same tokens")
    speed_axis.bar(labels, [e["tokens_per_s"] or 0 for e in measured])
    speed_axis.set(ylabel="training tokens/s", title="training speed (same device)")
    for axis in (ppl_axis, speed_axis):
        axis.tick_params(axis="x", rotation=30, labelsize=7)
    figure.suptitle(", ".join(sorted({d for e in measured for d in map(str, e["device"])})), fontsize=9)
    write_png(figure, path)


def write_summary(results: ResultsFile, results_path: Path) -> list[dict[str, Any]]:
    table = summarize(results.rows)
    stem = results_path.with_suffix("")
    atomic_write(stem.with_name(stem.name + ".summary.json"), json.dumps(table, indent=1) + "\n")
    atomic_write(stem.with_suffix(".md"), markdown(table))
    plot(table, stem.with_suffix(".png"))
    return table
