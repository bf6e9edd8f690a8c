"""One distillation stage's training loop: the student for the stage, optimizer and schedule, the steps, validation,
resumable checkpoints (pruned to ``train.keep_last``) and the stage's final student with its report."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from lattice_plugin.checkpoint import (
    atomic_directory,
    check_state_dict,
    find_weights,
    load_config,
    load_state_dict,
    tensor_bytes,
)
from lattice_plugin.conversion.convert import TOKENIZER_FILES
from lattice_plugin.distill.args import DistillConfig
from lattice_plugin.distill.checkpointing import (
    STAGE_FILE,
    STAGE_NAMES,
    final_dir,
    is_fsdp,
    prune_checkpoints,
    read_checkpoint,
    save_checkpoint,
    set_rng_state,
    stage_dir,
    step_dir,
)
from lattice_plugin.distill.fabric import peak_memory_per_rank
from lattice_plugin.errors import LatticeError


def lr_lambda(args: Any, max_steps: int):
    min_ratio = (args.min_lr if args.min_lr is not None else args.lr / 10) / args.lr

    def factor(step: int) -> float:  # step = optimizer steps already taken
        if step < args.warmup_steps:
            return (step + 1) / (args.warmup_steps + 1)
        progress = min(1.0, (step - args.warmup_steps) / max(1, max_steps - args.warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_student(stage: int, config: DistillConfig, base_config: Any, weights: dict[str, torch.Tensor], source: Path):
    """The student for a stage, weights loaded (LoRA adapters, when stage 2 uses them, initialised under the seed)."""
    from lattice_plugin.lora import LoRALatticeConfig, LoRALatticeGPT
    from lattice_plugin.model import LatticeGPT

    args = config.stage2
    if stage == 2 and "lora" in args.trainable:
        lora_fields = {key: value for key, value in dataclasses.asdict(args).items() if key.startswith("lora_")}
        lora_config = LoRALatticeConfig(**dataclasses.asdict(base_config), **lora_fields)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = LoRALatticeGPT(lora_config)
        result = model.load_state_dict(weights, strict=False)
        missing = [key for key in result.missing_keys if "lora_" not in key]
        if missing or result.unexpected_keys:
            raise LatticeError(
                f"weights in {str(source)!r} do not match the LoRA student: "
                f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
            )
        return model
    with torch.device("meta"):
        model = LatticeGPT(base_config)
    check_state_dict(model, weights, source=source)
    model.load_state_dict(weights, assign=True)
    model.cos, model.sin = model.rope_cache()
    return model


def merged_weights(model_state: dict[str, torch.Tensor], base_config: Any, lora_config: Any) -> dict[str, torch.Tensor]:
    """Merge LoRA adapters into the base weights: the state dict of a plain Lattice model."""
    from litgpt.lora import lora_filter, merge_lora_weights

    from lattice_plugin.lora import LoRALatticeGPT
    from lattice_plugin.model import LatticeGPT

    with torch.device("meta"):
        model = LoRALatticeGPT(lora_config)
    model.load_state_dict(model_state, assign=True)
    merge_lora_weights(model)
    merged = {k.replace("linear.", ""): v for k, v in model.state_dict().items() if not lora_filter(k, v)}
    with torch.device("meta"):
        check_state_dict(LatticeGPT(base_config), merged, source=Path("merged LoRA weights"))
    return merged


class Stage:
    """One stage's training loop: state, optimizer, data position, logging, checkpoints."""

    def __init__(self, fabric: Any, config: DistillConfig, stage: int, data: Any, teacher: Any, seq_len: int) -> None:
        self.fabric, self.config, self.stage, self.data, self.teacher, self.seq_len = (
            fabric,
            config,
            stage,
            data,
            teacher,
            seq_len,
        )
        self.args = config.stage1 if stage == 1 else config.stage2
        self.trainable = "lattice" if stage == 1 else self.args.trainable
        train = config.train
        per_step = train.micro_batch_size * fabric.world_size
        if train.global_batch_size % per_step:
            raise LatticeError(
                f"train.global_batch_size ({train.global_batch_size}) must be a multiple of micro_batch_size x devices "
                f"({train.micro_batch_size} x {fabric.world_size})"
            )
        self.accumulation = train.global_batch_size // per_step
        self.tokens_per_step = train.global_batch_size * seq_len
        if self.args.max_steps is not None:
            self.max_steps = self.args.max_steps
        else:
            self.max_steps = max(1, math.ceil(self.args.max_tokens / self.tokens_per_step))

    def log(self, message: str) -> None:
        self.fabric.print(message)
        sys.stdout.flush()

    def read_resumable(self, checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Weights and training state of a checkpoint this stage can continue (same stage, trainable parameters,
        world size and strategy; the recipe was compared before the run started)."""
        weights, state = read_checkpoint(checkpoint)
        if int(state["stage"]) != self.stage:
            raise LatticeError(f"checkpoint {str(checkpoint)!r} is of stage {state['stage']}, not stage {self.stage}")
        if state.get("trainable") != self.trainable:
            raise LatticeError(
                f"checkpoint {str(checkpoint)!r} trained {state.get('trainable')!r} parameters; the recipe now says "
                f"{self.trainable!r}"
            )
        if state.get("world_size") != self.fabric.world_size or state.get("fsdp") != is_fsdp(self.fabric):
            raise LatticeError(
                f"checkpoint {str(checkpoint)!r} was written by {state.get('world_size')} process(es) "
                f"(fsdp={state.get('fsdp')}); resume it with the same devices and strategy"
            )
        return weights, state

    def accumulate_gradients(self, model: Any, iterator: Any, transfer: Any) -> dict[str, torch.Tensor]:
        """Forward and backward over one optimizer step's micro-batches; returns the step's mean loss terms."""
        from lattice_plugin.distill.losses import distillation_loss

        fabric, args = self.fabric, self.args
        totals: dict[str, torch.Tensor] = {}
        for micro in range(self.accumulation):
            batch = next(iterator).to(fabric.device, non_blocking=True)
            inputs, targets = batch[:, :-1].long(), batch[:, 1:].long()
            with fabric.no_backward_sync(model, enabled=micro < self.accumulation - 1):
                if transfer is not None:
                    loss, per_layer = transfer.pop(model(inputs))
                    parts = {"mse_layer_max": per_layer.max()}
                else:
                    with torch.inference_mode(), fabric.autocast():
                        teacher_logits = self.teacher(inputs)
                    logits = model(inputs)
                    loss, parts = distillation_loss(
                        logits, teacher_logits, targets, args.temperature, args.kl_weight, args.ce_weight
                    )
                fabric.backward(loss / self.accumulation)
            for key, value in {"loss": loss.detach(), **parts}.items():
                totals[key] = totals.get(key, 0) + value.detach().float() / self.accumulation
        return totals

    def run(self, init_dir: Path, checkpoint: Path | None, start_metrics: dict | None = None) -> dict[str, Any]:
        """Train the stage from ``init_dir`` (or continue ``checkpoint``); write its final student; return its report.

        ``start_metrics``: the held-out evaluation of ``init_dir`` when already known (stage 1's end for stage 2).
        """
        from litgpt.utils import CycleIterator, choose_logger

        from lattice_plugin.distill.evaluation import heldout_loss
        from lattice_plugin.distill.losses import AttentionTransfer, set_trainable

        fabric, config, args, stage = self.fabric, self.config, self.args, self.stage
        base_config = load_config(init_dir)
        if checkpoint is not None:
            weights, state = self.read_resumable(checkpoint)
            source = checkpoint
        else:
            weights, state, source = load_state_dict(find_weights(init_dir)), None, init_dir
        model = build_student(stage, config, base_config, weights, source)
        del weights
        model.max_seq_length = self.seq_len
        model_config = model.config
        trainable_names = set_trainable(model, self.trainable)
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_total = sum(p.numel() for p in model.parameters())
        self.log(
            f"\n== stage {stage} ({STAGE_NAMES[stage]}): {self.max_steps} steps of {self.tokens_per_step:,} tokens "
            f"(micro batch {config.train.micro_batch_size} x {self.accumulation} accumulation x {fabric.world_size} "
            f"devices); training {self.trainable}: {n_trainable:,} of {n_total:,} parameters"
        )

        model = fabric.setup_module(model)
        params = [p for p in model.parameters() if p.requires_grad]
        extra = {"fused": True} if fabric.device.type == "cuda" else {}
        optimizer = torch.optim.AdamW(
            params, lr=args.lr, weight_decay=args.weight_decay, betas=tuple(args.betas), **extra
        )
        optimizer = fabric.setup_optimizers(optimizer)
        raw_optimizer = optimizer.optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(raw_optimizer, lr_lambda(args, self.max_steps))
        loader = self.data.train_dataloader()

        progress: dict[str, Any] = {
            "step": 0,
            "tokens": 0,
            "train_seconds": 0.0,
            "history": [],
            "val_history": [],
            "metrics": {},
        }
        if state is not None:
            from lattice_plugin.distill.checkpointing import load_optimizer_state

            load_optimizer_state(fabric, model, optimizer, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state["data"] is not None and hasattr(loader, "load_state_dict"):
                loader.load_state_dict(state["data"])
            set_rng_state(state["rng"])
            for key in progress:
                progress[key] = state[key]
            self.log(f"resumed stage {stage} from {checkpoint} at step {progress['step']}")
        iterator = CycleIterator(loader)
        logger = choose_logger(
            config.logger_name,
            stage_dir(config.out_dir, stage),
            name=f"distill-stage{stage}",
            log_interval=config.train.log_interval,
            resume=state is not None,
        )

        val_loader = self.data.val_dataloader
        if state is None:
            start = start_metrics or heldout_loss(fabric, model, val_loader(), config.eval.final_max_iters)
            progress["metrics"]["start"] = start
            self.log(f"stage {stage} start: held-out loss {start['loss']:.4f}, perplexity {start['ppl']:.2f}")

        transfer = None
        if stage == 1:
            transfer = AttentionTransfer(model, teacher_forcing=args.teacher_forcing, through_outputs=is_fsdp(fabric))
        context = transfer if transfer is not None else nullcontext()
        steady = {"tokens": 0, "seconds": 0.0}
        if fabric.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(fabric.device)
        first_step_this_run = progress["step"]
        bar = _Bar(fabric, self.max_steps, progress["step"], f"stage {stage}")
        model.train()
        with context, bar:
            while progress["step"] < self.max_steps:
                t0 = time.perf_counter()
                totals = self.accumulate_gradients(model, iterator, transfer)
                if config.train.max_norm is not None:
                    fabric.clip_gradients(model, optimizer, max_norm=config.train.max_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                progress["step"] += 1
                progress["tokens"] += self.tokens_per_step
                keys = sorted(totals)
                values = torch.stack([totals[key] for key in keys])
                if fabric.world_size > 1:
                    values = fabric.all_reduce(values, reduce_op="mean")
                values = values.tolist()  # synchronizes: the step's time is complete
                dt = time.perf_counter() - t0
                progress["train_seconds"] += dt
                if progress["step"] - first_step_this_run > 2:  # steady state: after warm-up steps
                    steady["tokens"] += self.tokens_per_step
                    steady["seconds"] += dt
                record = {"step": progress["step"], "tokens": progress["tokens"], "lr": lr, **dict(zip(keys, values))}
                progress["history"].append(record)
                bar.advance()
                step = progress["step"]
                if step % config.train.log_interval == 0 or step == self.max_steps:
                    logger.log_metrics(
                        {**record, "step_time": dt, "tokens_per_sec": self.tokens_per_step / dt}, step=step
                    )
                    extras = " ".join(f"{k} {record[k]:.4f}" for k in keys if k != "loss")
                    bar.print(
                        f"stage {stage} | step {step}/{self.max_steps} | loss {record['loss']:.4f} | {extras} | "
                        f"lr {lr:.2e} | {self.tokens_per_step / dt:,.0f} tok/s"
                    )
                if config.eval.interval and step % config.eval.interval == 0 and step < self.max_steps:
                    val = heldout_loss(fabric, model, val_loader(), config.eval.max_iters)
                    progress["val_history"].append({"step": step, **val})
                    logger.log_metrics({"val_loss": val["loss"], "val_ppl": val["ppl"]}, step=step)
                    bar.print(
                        f"stage {stage} | step {step} | validation loss {val['loss']:.4f}, perplexity {val['ppl']:.2f}"
                    )
                if config.train.save_interval and step % config.train.save_interval == 0 and step < self.max_steps:
                    path = self.save_step(model, optimizer, scheduler, loader, progress, model_config)
                    bar.print(f"stage {stage} | step {step} | saved {path}")
                    if fabric.is_global_zero:
                        logger.save()

        peak_memory = peak_memory_per_rank(fabric)
        end = heldout_loss(fabric, model, val_loader(), config.eval.final_max_iters)
        progress["metrics"]["end"] = end
        logger.log_metrics({"val_loss": end["loss"], "val_ppl": end["ppl"]}, step=progress["step"])
        logger.finalize("success")
        self.log(f"stage {stage} end: held-out loss {end['loss']:.4f}, perplexity {end['ppl']:.2f}")

        report = {
            "stage": stage,
            "name": STAGE_NAMES[stage],
            "trainable": self.trainable,
            "trainable_parameters": n_trainable,
            "total_parameters": n_total,
            "steps": progress["step"],
            "tokens": progress["tokens"],
            "accumulation": self.accumulation,
            "train_seconds": progress["train_seconds"],
            "tokens_per_sec": progress["tokens"] / max(progress["train_seconds"], 1e-9),
            "steady_tokens_per_sec": steady["tokens"] / steady["seconds"] if steady["seconds"] else None,
            "peak_memory_bytes_per_rank": peak_memory,
            "heldout_start": progress["metrics"]["start"],
            "heldout_end": end,
            "history": progress["history"],
            "val_history": progress["val_history"],
            "resumed_from": str(checkpoint) if checkpoint is not None else None,
        }
        if stage == 1:
            report["teacher_forcing"] = args.teacher_forcing
        else:
            report.update(temperature=args.temperature, kl_weight=args.kl_weight, ce_weight=args.ce_weight)
        self.write_final(model, model_config, base_config, init_dir, report, trainable_names)
        return report

    def save_step(
        self, model: Any, optimizer: Any, scheduler: Any, loader: Any, progress: dict[str, Any], model_config: Any
    ) -> Path:
        """Write the resumable checkpoint of the step just taken (all ranks call it), then drop those beyond
        ``train.keep_last``."""
        fabric, config = self.fabric, self.config
        path = step_dir(config.out_dir, self.stage, progress["step"])
        training_state = {
            "stage": self.stage,
            **progress,
            "trainable": self.trainable,
            "world_size": fabric.world_size,
            "fsdp": is_fsdp(fabric),
            "scheduler": scheduler.state_dict(),
            "data": loader.state_dict() if hasattr(loader, "state_dict") else None,
            "config": config.to_dict(),
        }
        save_checkpoint(fabric, model, optimizer, path, training_state, model_config)
        if fabric.is_global_zero:
            prune_checkpoints(config.out_dir, self.stage, config.train.keep_last)
        return path

    def write_final(
        self, model: Any, model_config: Any, base_config: Any, init_dir: Path, report: dict, names: list
    ) -> None:
        """The stage's student as a normal checkpoint directory (LoRA merged), with its stage report."""
        from litgpt.utils import save_config

        from lattice_plugin.checkpoint import save_safetensors
        from lattice_plugin.distill.checkpointing import gather_model_state

        fabric = self.fabric
        state = gather_model_state(fabric, model)
        if fabric.is_global_zero:
            if model_config is not base_config and hasattr(model_config, "lora_r"):
                state = merged_weights(state, base_config, model_config)
            out = final_dir(self.config.out_dir, self.stage)
            with atomic_directory(out, force=True, needed_bytes=tensor_bytes(state)) as tmp_dir:
                save_safetensors(state, tmp_dir / "model.safetensors")
                save_config(base_config, tmp_dir)
                for name in TOKENIZER_FILES:
                    if (Path(init_dir) / name).is_file():
                        shutil.copy2(Path(init_dir) / name, tmp_dir / name)
                (tmp_dir / STAGE_FILE).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        fabric.barrier()


class _Bar:
    """A rich progress bar on rank 0 of an interactive terminal; plain lines otherwise."""

    def __init__(self, fabric: Any, total: int, completed: int, title: str) -> None:
        self.fabric = fabric
        self.progress = None
        if fabric.is_global_zero and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.task = self.progress.add_task(title, total=total, completed=completed)

    def __enter__(self) -> _Bar:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

    def print(self, message: str) -> None:
        if not self.fabric.is_global_zero:
            return
        if self.progress is not None:
            self.progress.console.print(message, markup=False, highlight=False)
        else:
            print(message, flush=True)
