"""``lattice recall mqar``: multi-query associative recall accuracy of every mixer, per number of pairs K, slot count
m, learning rate and seed, one resumable row each; the summary takes the best learning rate per setting.

Validity: a setting (K, sequence length, steps) in which softmax attention, the upper bound, stays below
``VALID_ATTENTION`` accuracy at every learning rate did not train long enough or well enough; the summary marks it
invalid instead of reporting the other mixers against it.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lattice_plugin.checkpoint import atomic_write
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
from lattice_plugin.recall.task import IGNORE, check_mqar, mqar_batch
from lattice_plugin.recall.training import Schedule, autocast, train
from lattice_plugin.vocab import BACKENDS

VALID_ATTENTION = 0.99
DEFAULT_SLOTS = 64
EXPERIMENT = "mqar"


@dataclass
class MQARSettings:
    """Defaults follow Zoology's MQAR setup (vocabulary 8192, 2 layers, width 128, AdamW with weight decay 0.1, a
    learning-rate sweep), with fresh sequences every step instead of a fixed training set."""

    pairs: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    seq_len: int | None = None
    """Tokens per sequence; None: ``max(256, 4 K)`` (256 for K <= 64, 512 for K = 128)."""
    slots: list[int] = field(default_factory=lambda: [DEFAULT_SLOTS])
    lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3, 1e-2])
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 6000
    batch_size: int = 64
    vocab_size: int = 8192
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 2
    intermediate_size: int = 256
    chunk_size: int = 64
    short_conv: int = 3
    """Kernel of the causal short convolution in front of every mixer, as in Zoology's models (0: none)."""
    lattice_backend: str = "auto"
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    eval_examples: int = 1024
    eval_every: int = 1000
    stop_at: float | None = None
    """End a run early once its accuracy on the held-out sequences reaches this (None: always train every step)."""
    curriculum: bool = False
    """Train on a cycle of easier settings up to the scored one (:func:`curriculum`), as Zoology trains on a mixture."""

    def length(self, pairs: int) -> int:
        return self.seq_len if self.seq_len is not None else max(256, 4 * pairs)

    def shape(self, pairs: int, slots: int | None) -> ModelShape:
        """The model of a row at ``pairs`` (its sequence length) and ``slots`` (None: the head size)."""
        return ModelShape(
            self.vocab_size,
            self.length(pairs),
            self.n_layer,
            self.n_embd,
            self.n_head,
            self.intermediate_size,
            slots if slots is not None else self.n_embd // self.n_head,
            self.chunk_size,
            self.lattice_backend,
            self.short_conv,
        )

    def check(self) -> None:
        for pairs in self.pairs:
            check_mqar(self.vocab_size, pairs, self.length(pairs))
        positive = dict(
            steps=self.steps,
            batch_size=self.batch_size,
            eval_examples=self.eval_examples,
            n_layer=self.n_layer,
            n_embd=self.n_embd,
            n_head=self.n_head,
        )
        bad = [name for name, value in positive.items() if value < 1]
        bad += [f"short_conv={self.short_conv}"] if self.short_conv < 0 else []
        bad += [f"m={m}" for m in self.slots if m < 1] + [f"lr={lr}" for lr in self.lrs if not lr > 0]
        bad += [] if self.lattice_backend in BACKENDS else [f"lattice backend {self.lattice_backend!r}"]
        if bad or not (self.pairs and self.slots and self.lrs and self.seeds):
            raise LatticeError(f"invalid MQAR setting: {', '.join(bad) or 'an empty list of K, m, lr or seeds'}")


def row_key(mixer: Mixer, pairs: int, slots: int | None, lr: float, seed: int, s: MQARSettings) -> dict[str, Any]:
    return dict(
        mixer=mixer.name,
        K=pairs,
        T=s.length(pairs),
        m=slots,
        lr=lr,
        seed=seed,
        steps=s.steps,
        batch_size=s.batch_size,
        vocab_size=s.vocab_size,
        n_layer=s.n_layer,
        n_embd=s.n_embd,
        n_head=s.n_head,
        intermediate_size=s.intermediate_size,
        chunk_size=s.chunk_size,
        short_conv=s.short_conv,
        lattice_backend=s.lattice_backend,
        warmup_fraction=s.warmup_fraction,
        weight_decay=s.weight_decay,
        eval_examples=s.eval_examples,
        eval_every=s.eval_every,
        stop_at=s.stop_at,
        curriculum=s.curriculum,
    )


def curriculum(pairs: int, seq_len: int) -> list[tuple[int, int]]:
    """The (K, T) training settings of a curriculum row scored at ``(pairs, seq_len)``: K = 4, 8, 16, ... below
    ``pairs`` in sequences of ``min(seq_len, 16 K)`` tokens, then the scored setting. For K = 64, T = 256 this is
    Zoology's training mixture: (4, 64), (8, 128), (16, 256), (32, 256), (64, 256)."""
    easier = [k for k in (4 << i for i in range(pairs.bit_length())) if k < pairs]
    return [(k, min(seq_len, 16 * k)) for k in easier] + [(pairs, seq_len)]


def planned_rows(mixers: list[Mixer], s: MQARSettings) -> list[tuple[Mixer, int, int | None, float, int]]:
    """Every (mixer, K, m, lr, seed) of the run, mixer by mixer; m is None for attention (no fixed state)."""
    return [
        (mixer, pairs, slots, lr, seed)
        for mixer in mixers
        for pairs in s.pairs
        for slots in (s.slots if mixer.has_state else [None])
        for lr in s.lrs
        for seed in s.seeds
    ]


def score_queries_only(model: nn.Module) -> nn.Module:
    """Compute logits only at the query positions: the output head moves to ``model.query_head`` and ``model(x)``
    returns the final hidden states. With a vocabulary of 8192 and width 128 the head is most of the compute when
    every position gets logits, and MQAR scores K of T positions."""
    model.query_head, model.lm_head = model.lm_head, nn.Identity()
    return model


def query_logits(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of the query positions only, ``(n_queries, vocab)`` and ``(n_queries,)``."""
    mask = targets != IGNORE
    return model.query_head(model(inputs)[mask]), targets[mask]


def query_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits, wanted = query_logits(model, inputs, targets)
    return F.cross_entropy(logits.float(), wanted)


@torch.no_grad()
def accuracy(model: nn.Module, test: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    """Fraction of queried values predicted exactly (argmax at the query positions) over the held-out batches."""
    model.eval()
    correct = total = 0
    for inputs, targets in test:
        with autocast(device):
            logits, wanted = query_logits(model, inputs, targets)
        correct += (logits.argmax(-1) == wanted).sum().item()
        total += wanted.numel()
    return correct / total


def held_out(s: MQARSettings, pairs: int, seed: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation sequences: drawn from their own generator, never from the training stream."""
    generator = torch.Generator(device).manual_seed(1_000_003 + 7919 * seed + pairs)
    batches, left = [], s.eval_examples
    while left > 0:
        batch = mqar_batch(min(left, s.batch_size), pairs, s.length(pairs), s.vocab_size, generator, device)
        batches.append((batch.inputs, batch.targets))
        left -= batch.inputs.shape[0]
    return batches


def run_row(
    mixer: Mixer,
    pairs: int,
    slots: int | None,
    lr: float,
    seed: int,
    s: MQARSettings,
    device: torch.device,
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """Train one model from scratch and score it on the held-out sequences."""
    T = s.length(pairs)
    shape = s.shape(pairs, slots)
    torch.manual_seed(seed)
    model = score_queries_only(build_model(mixer, shape)).to(device)
    leak = check_causal(model, mixer, s.vocab_size, T, device)
    generator = torch.Generator(device).manual_seed(seed)
    test = held_out(s, pairs, seed, device)
    schedule = Schedule(lr=lr, steps=s.steps, warmup_fraction=s.warmup_fraction, weight_decay=s.weight_decay)

    settings = curriculum(pairs, T) if s.curriculum else [(pairs, T)]

    def next_batch(step: int):
        K, length = settings[step % len(settings)]
        batch = mqar_batch(s.batch_size, K, length, s.vocab_size, generator, device)
        return batch.inputs, batch.targets

    label = f"{mixer.name} K={pairs} T={T} m={slots} lr={lr:g} seed={seed}"
    run = train(
        model,
        next_batch,
        schedule,
        device,
        loss_fn=query_loss,
        evaluate=lambda: accuracy(model, test, device),
        eval_every=s.eval_every,
        stop_at=s.stop_at,
        echo=echo,
        label=label,
    )
    return dict(
        accuracy=accuracy(model, test, device),
        parameters=sum(p.numel() for p in model.parameters()),
        state_per_head=state_numbers_per_head(mixer, shape),
        causal_leak=leak,
        **run,
    )


def run_mqar(
    mixers: list[Mixer],
    settings: MQARSettings,
    results_path: Path,
    *,
    device: torch.device,
    budget_s: float | None = None,
    retry_errors: bool = False,
    shard: tuple[int, int] = (0, 1),
    echo: Callable[[str], None] = print,
) -> ResultsFile:
    """Run every planned row not yet in ``results_path`` (see :func:`run_pending`; ``shard`` splits them between
    processes); the summary JSON, markdown and PNG beside it are rewritten after every row."""
    settings.check()
    results = ResultsFile(results_path, EXPERIMENT)
    jobs = (
        (
            mixer.name,
            row_key(mixer, pairs, slots, lr, seed, settings),
            lambda mixer=mixer, pairs=pairs, slots=slots, lr=lr, seed=seed: run_row(
                mixer, pairs, slots, lr, seed, settings, device, echo
            ),
        )
        for mixer, pairs, slots, lr, seed in planned_rows(mixers, settings)
    )
    run_mixer_rows(
        results,
        jobs,
        lambda: write_summary(results, results_path),
        device=device,
        budget_s=budget_s,
        retry_errors=retry_errors,
        echo=echo,
        shard=shard,
    )
    return results


# ---------------------------------------------------------------------------------------------------- summary
MIXER_FIELDS = ("mixer", "m", "chunk_size", "lattice_backend")
"""Key fields that choose the model's mixer; the other fields (except lr and seed) make the task setting, the same
for every mixer compared in one column."""


def _task(key: dict[str, Any]) -> tuple:
    """The task setting of a row's key (or of a summary entry's ``setting``), hashable."""
    return tuple(sorted((k, v) for k, v in key.items() if k not in (*MIXER_FIELDS, "lr", "seed")))


def _line(entry: dict[str, Any]) -> tuple:
    return tuple(entry.get(k) for k in MIXER_FIELDS)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Best learning rate per mixer line and task setting (mean accuracy over seeds; a learning rate at which a run
    diverged is only chosen when every one did), the learning rates that diverged, and each setting's validity:
    whether attention reached ``VALID_ATTENTION`` there."""
    groups: dict[tuple, dict[float, list[float]]] = {}
    diverged: dict[tuple, set[float]] = {}
    errors: dict[tuple, str] = {}
    for row in rows:
        setting = (_line(row["key"]), _task(row["key"]))
        if row.get("accuracy") is None:
            errors[setting] = row.get("error", "not measured")
        else:
            groups.setdefault(setting, {}).setdefault(row["key"]["lr"], []).append(row["accuracy"])
            if row.get("diverged"):
                diverged.setdefault(setting, set()).add(row["key"]["lr"])
    attention: dict[tuple, float] = {}
    best = []
    for (line, task), by_lr in groups.items():
        means = {lr: sum(v) / len(v) for lr, v in by_lr.items()}
        failed = diverged.get((line, task), set())
        lr = max(means, key=lambda x: (x not in failed, means[x]))
        if line[0] == "attention":
            attention[task] = max(attention.get(task, 0.0), means[lr])
        best.append(
            dict(
                zip(MIXER_FIELDS, line),
                setting=dict(task),
                lr=lr,
                accuracy=means[lr],
                seeds=len(by_lr[lr]),
                lrs_tried=sorted(means),
                diverged_lrs=sorted(failed),
            )
        )
    for b in best:
        task = _task(b["setting"])
        b["valid"] = attention[task] >= VALID_ATTENTION if task in attention else None
    not_measured = [
        dict(zip(MIXER_FIELDS, line), setting=dict(task), reason=reason)
        for (line, task), reason in errors.items()
        if (line, task) not in groups
    ]
    return dict(valid_attention_threshold=VALID_ATTENTION, best=best, not_measured=not_measured)


def _varying(dicts: list[dict[str, Any]], fields: tuple) -> list[str]:
    return [f for f in fields if len({str(d.get(f)) for d in dicts}) > 1]


def markdown(summary: dict[str, Any], devices: list[str]) -> str:
    """Accuracy table: one line per mixer (and m), one column per task setting (K, T, steps and whatever else
    differs); invalid settings and rows not measured say so."""
    entries = summary["best"] + summary["not_measured"]
    tasks = sorted(
        {_task(e["setting"]) for e in entries},
        key=lambda t: (dict(t)["steps"], dict(t)["K"], dict(t)["T"], [str(v) for _, v in t]),
    )
    lines = sorted(
        {_line(e) for e in entries},
        key=lambda x: (list(MIXERS).index(x[0]) if x[0] in MIXERS else 99, [str(v) for v in x[1:]]),
    )
    settings = [e["setting"] for e in entries]
    task_extra = (
        [f for f in _varying(settings, tuple(k for k, _ in tasks[0])) if f not in ("K", "T", "steps")] if tasks else []
    )
    line_extra = _varying(entries, MIXER_FIELDS[2:])

    def column(task: tuple) -> str:
        t = dict(task)
        return ", ".join([f"K={t['K']}, T={t['T']}, {t['steps']} steps"] + [f"{f}={t[f]}" for f in task_extra])

    out = [
        (
            f"MQAR accuracy, best learning rate (device: {', '.join(devices) or 'none'}; a column where attention "
            f"stays below {summary['valid_attention_threshold']:.0%} is invalid)"
        ),
        "",
        "| mixer | m | " + " | ".join(column(t) for t in tasks) + " |",
        "|" + "---|" * (len(tasks) + 2),
    ]
    for line in lines:
        cells = []
        for task in tasks:
            hit = [b for b in summary["best"] if (_line(b), _task(b["setting"])) == (line, task)]
            miss = [x for x in summary["not_measured"] if (_line(x), _task(x["setting"])) == (line, task)]
            if hit:
                b = hit[0]
                flag = "" if b["valid"] else (" (invalid)" if b["valid"] is False else " (no attention row)")
                failed = b.get("diverged_lrs", [])
                if b["lr"] in failed:
                    cells.append(f"diverged at every lr ({', '.join(f'{lr:g}' for lr in failed)}){flag}")
                else:
                    note = f", diverged at lr {', '.join(f'{lr:g}' for lr in failed)}" if failed else ""
                    cells.append(f"{b['accuracy']:.3f} @ lr {b['lr']:g}{note}{flag}")
            else:
                cells.append("not measured" if miss else "pending")
        label = line[0] + "".join(f", {f}={v}" for f, v in zip(MIXER_FIELDS[2:], line[2:]) if f in line_extra)
        out.append(f"| {label} | {line[1] if line[1] is not None else '-'} | " + " | ".join(cells) + " |")
    reasons = sorted({(x["mixer"], x["reason"]) for x in summary["not_measured"]})
    out += [""] + [f"- {mixer}: not measured: {reason}" for mixer, reason in reasons]
    return "\n".join(out) + "\n"


def plotted_settings(best: list[dict[str, Any]]) -> dict[int, tuple]:
    """Per K, the task setting (T, steps, ...) the accuracy-vs-K plot shows: of the settings in which attention reached
    ``VALID_ATTENTION``, the one most summary entries share (so K = 128 shows its 5,000-step column where 2,000 steps
    are invalid); where none is valid, the one most entries share. The others (a short-distance diagnostic, a longer
    run without an attention row) stay in the markdown table only."""
    by_k: dict[int, dict[tuple, list[bool | None]]] = {}
    for b in best:
        by_k.setdefault(b["setting"]["K"], {}).setdefault(_task(b["setting"]), []).append(b["valid"])
    return {
        K: max(tasks, key=lambda t: (True in tasks[t], len(tasks[t]), [str(v) for _, v in t]))
        for K, tasks in by_k.items()
    }


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    """Accuracy vs K per mixer (at m = 64 where measured), and accuracy vs m per K for the Lattice variants, at each
    K's :func:`plotted_settings` and the mixer options most entries share (the markdown table shows every setting and
    option, and the settings where every lr diverged)."""
    plt = pyplot()
    if plt is None or not summary["best"]:
        return
    best = [b for b in summary["best"] if b["lr"] not in b.get("diverged_lrs", [])]  # every lr diverged: no point
    if not best:
        return
    options = [_line(b)[2:] for b in best]  # a mixer's options besides m (e.g. the Lattice backend of a diagnostic)
    best = [b for b, option in zip(best, options) if option == max(set(options), key=options.count)]
    shown = plotted_settings(best)
    best = [b for b in best if _task(b["setting"]) == shown[b["setting"]["K"]]]
    steps = {K: dict(task)["steps"] for K, task in shown.items()}
    usual = max(set(steps.values()), key=list(steps.values()).count)
    other_steps = ", ".join(f"K = {K}: {n}" for K, n in sorted(steps.items()) if n != usual)
    ms = [b["m"] for b in best if b["m"] is not None]
    main_m = DEFAULT_SLOTS if DEFAULT_SLOTS in ms else (max(set(ms), key=ms.count) if ms else None)
    figure, (by_k, by_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mixer in [name for name in MIXERS if any(b["mixer"] == name for b in best)]:
        points = sorted(
            (b["setting"]["K"], b["accuracy"], b["valid"])
            for b in best
            if b["mixer"] == mixer and b["m"] in (main_m, None)
        )
        if points:
            by_k.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=mixer)
            by_k.scatter(
                [p[0] for p in points if p[2] is False],
                [p[1] for p in points if p[2] is False],
                marker="x",
                color="black",
                zorder=3,
            )
    by_k.set(
        xscale="log",
        xlabel="key-value pairs K",
        ylabel="accuracy (best lr)",
        ylim=(-0.02, 1.02),
        title=f"MQAR, m = {main_m}, {usual} steps{f' ({other_steps})' if other_steps else ''}; x: attention < "
        f"{VALID_ATTENTION:.0%}, invalid",
    )
    by_k.set_xticks(sorted(shown), [str(K) for K in sorted(shown)], minor=False)
    by_k.minorticks_off()
    by_k.legend(fontsize=7)
    for mixer in [name for name in MIXERS if MIXERS[name].lattice is not None]:
        for K in sorted({b["setting"]["K"] for b in best}):
            points = sorted((b["m"], b["accuracy"]) for b in best if b["mixer"] == mixer and b["setting"]["K"] == K)
            if len(points) > 1:
                by_m.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{mixer} K={K}")
    by_m.set(xscale="log", xlabel="slots m", ylabel="accuracy (best lr)", ylim=(-0.02, 1.02), title="slot count")
    slots = sorted({b["m"] for b in best if b["m"] is not None})
    by_m.set_xticks(slots, [str(m) for m in slots], minor=False)
    by_m.minorticks_off()
    if by_m.get_legend_handles_labels()[0]:
        by_m.legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    write_png(figure, path)


def write_summary(results: ResultsFile, results_path: Path) -> dict[str, Any]:
    """``<results>.summary.json``, ``.md`` and ``.png`` beside the rows."""
    summary = summarize(results.rows)
    devices = sorted({row.get("device", "?") for row in results.rows})
    summary["devices"] = devices
    stem = results_path.with_suffix("")
    atomic_write(stem.with_name(stem.name + ".summary.json"), json.dumps(summary, indent=1) + "\n")
    atomic_write(stem.with_suffix(".md"), markdown(summary, devices))
    plot(summary, stem.with_suffix(".png"), f"{', '.join(devices)}; {len(results.rows)} rows")
    return summary
