"""The training loop every ``lattice recall`` experiment uses, so that mixers differ in nothing but the mixer.

AdamW with decoupled weight decay on linear and embedding weights only, linear warm-up then cosine decay to zero,
gradient clipping, bfloat16 autocast on CUDA (float32 on a CPU). Training speed is measured on the device clock
(synchronised) over the steps after a short warm-up (kernel compilation and autotuning), evaluations excluded.
"""

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from lattice_plugin.recall.task import IGNORE

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    lr: float
    steps: int
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    max_norm: float = 1.0

    def factor(self, step: int) -> float:
        """Multiplier of ``lr`` at ``step`` (0-based): linear warm-up, then cosine to zero."""
        warmup = max(1, round(self.warmup_fraction * self.steps))
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, schedule: Schedule) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """AdamW (fused on CUDA) decaying only linear and embedding weights, with the schedule's learning-rate factor."""
    decayed = {id(module.weight) for module in model.modules() if isinstance(module, (nn.Linear, nn.Embedding))}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        dict(params=[p for p in params if id(p) in decayed], weight_decay=schedule.weight_decay),
        dict(params=[p for p in params if id(p) not in decayed], weight_decay=0.0),
    ]
    fused = all(p.is_cuda for p in params)
    optimizer = torch.optim.AdamW(groups, lr=schedule.lr, betas=schedule.betas, fused=fused)
    return optimizer, LambdaLR(optimizer, schedule.factor)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA; nothing on a CPU (float32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def token_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose target is not ``IGNORE``."""
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def device_seconds(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def train(
    model: nn.Module,
    next_batch: Callable[[int], Batch],
    schedule: Schedule,
    device: torch.device,
    *,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = token_loss,
    evaluate: Callable[[], float] | None = None,
    eval_every: int = 0,
    log_every: int = 100,
    stop_at: float | None = None,
    echo: Callable[[str], None] = print,
    label: str = "",
) -> dict:
    """Train ``model`` for ``schedule.steps`` steps on ``next_batch(step)``, minimising ``loss_fn``.

    ``evaluate`` (a score, higher is better) runs every ``eval_every`` steps and at the end; with ``stop_at`` the run
    ends early once the score reaches it. A non-finite loss ends the run (``diverged``). Returns the steps done, the
    last loss, the curve (step, loss, score), training seconds and tokens per second (evaluations excluded).
    """
    optimizer, scheduler = make_optimizer(model, schedule)
    model.train()
    warmup_steps = min(10, schedule.steps // 5)
    curve: list[dict] = []
    eval_seconds, timed_from, tokens = 0.0, None, 0
    loss_value, diverged, stopped_early, step = float("nan"), False, False, 0
    started = device_seconds(device)
    for step in range(1, schedule.steps + 1):
        if step == warmup_steps + 1:
            timed_from, eval_seconds = device_seconds(device), 0.0
        inputs, targets = next_batch(step)
        with autocast(device):
            loss = loss_fn(model, inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.max_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if timed_from is not None:
            tokens += inputs.numel()
        scoring = evaluate is not None and (step % eval_every == 0 if eval_every else False)
        if step % log_every == 0 or scoring or step == schedule.steps:
            loss_value = loss.item()
            point = dict(step=step, loss=round(loss_value, 5) if math.isfinite(loss_value) else None)
            if not math.isfinite(loss_value):
                diverged = True
            elif scoring:
                before = device_seconds(device)
                point["score"] = evaluate()
                model.train()
                eval_seconds += device_seconds(device) - before
                stopped_early = stop_at is not None and point["score"] >= stop_at
            curve.append(point)
            echo(
                f"{label} step {step}/{schedule.steps} loss {loss_value:.4f}"
                + (f" score {point['score']:.4f}" if "score" in point else "")
            )
            if diverged or stopped_early:
                break
    ended = device_seconds(device)
    timed_seconds = ended - timed_from - eval_seconds if timed_from is not None else None
    return dict(
        steps_done=step,
        final_loss=loss_value if math.isfinite(loss_value) else None,
        diverged=diverged,
        stopped_early=stopped_early,
        train_seconds=round(ended - started - eval_seconds, 3),
        tokens_per_s=round(tokens / timed_seconds, 1) if timed_seconds and tokens else None,
        curve=curve,
    )
