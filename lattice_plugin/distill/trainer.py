"""The distillation run: Fabric set-up, the two stages, resumption, and the final report."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from litgpt.model import Block

from lattice_plugin.checkpoint import (
    atomic_directory,
    atomic_write,
    check_state_dict,
    describe_stale,
    find_weights,
    load_config,
    load_model,
    load_state_dict,
    remove_stale_temporaries,
    tensor_bytes,
    validate_checkpoint,
)
from lattice_plugin.distill.args import DistillConfig, recipe_difference
from lattice_plugin.distill.checkpointing import (
    final_dir,
    is_fsdp,
    prune_checkpoints,
    read_checkpoint,
    read_training_state,
    save_checkpoint,
    set_rng_state,
    stage_dir,
    step_checkpoints,
    step_dir,
)
from lattice_plugin.errors import LatticeError
from lattice_plugin.model import LatticeBlock

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "prompt_style.yaml")
STAGE_FILE = "stage.json"
REPORT_FILE = "report.json"
RECIPE_FILE = "distill_config.json"  # the recipe of the run that started OUT (never overwritten by a resume)
STAGE_NAMES = {1: "attention transfer", 2: "logit distillation"}


# ----------------------------------------------------------------------------------------------------------- set-up


def default_precision() -> str:
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


FSDP_UNITS = {Block, LatticeBlock}  # each transformer block is one FSDP unit (sharded, gathered for its compute)


def build_fabric(config: DistillConfig):
    import lightning as L
    from lightning.fabric.strategies import DDPStrategy, FSDPStrategy

    precision = config.precision or default_precision()
    if config.strategy == "fsdp":
        # use_orig_params: frozen and trainable parameters share FSDP units (stage 1 and LoRA train only some)
        strategy: Any = FSDPStrategy(
            auto_wrap_policy=FSDP_UNITS, state_dict_type="full", use_orig_params=True, sharding_strategy="FULL_SHARD"
        )
    elif config.strategy == "ddp":
        strategy = DDPStrategy(find_unused_parameters=False)
    else:
        strategy = "auto"
    try:
        return L.Fabric(devices=config.devices, num_nodes=config.num_nodes, strategy=strategy, precision=precision)
    except (ValueError, RuntimeError) as error:  # e.g. FSDP or more devices than there are
        raise LatticeError(f"cannot set up {config.devices} device(s) with strategy {config.strategy!r}: {error}") from None


def distill(config: DistillConfig) -> dict[str, Any] | None:
    """Run both stages as the recipe says (every process of a multi-device launch calls this)."""
    fabric = build_fabric(config)
    fabric.launch()
    return run(fabric, config)


def resolve_teacher(config: DistillConfig) -> Path:
    if config.teacher_dir is not None:
        return Path(config.teacher_dir)
    record = Path(config.student_dir) / "conversion.json"
    if not record.is_file():
        raise LatticeError(
            f"no teacher_dir given and {str(config.student_dir)!r} has no conversion.json naming its source; pass --teacher_dir"
        )
    try:
        source = json.loads(record.read_text(encoding="utf-8"))["source"]
    except (OSError, ValueError, KeyError) as error:
        raise LatticeError(f"cannot read the teacher from {str(record)!r}: {error}") from None
    return Path(source)


def check_pair(teacher_config: Any, student_config: Any, teacher_dir: Path, student_dir: Path) -> None:
    if not student_config.lattice_layers:
        raise LatticeError(f"{str(student_dir)!r} has no Lattice layers: convert it first (lattice convert)")
    if teacher_config.padded_vocab_size != student_config.padded_vocab_size:
        raise LatticeError(
            f"teacher {str(teacher_dir)!r} and student {str(student_dir)!r} have different vocabularies "
            f"({teacher_config.padded_vocab_size} vs {student_config.padded_vocab_size})"
        )
    if teacher_config.n_layer != student_config.n_layer or teacher_config.n_embd != student_config.n_embd:
        raise LatticeError(f"{str(student_dir)!r} is not a conversion of {str(teacher_dir)!r} (layer count or width differ)")


def plan_resume(config: DistillConfig) -> tuple[int, Path | None]:
    """(first stage to run, checkpoint to continue it from): 1/None for a fresh run, 3 when both stages are done."""
    out_dir = Path(config.out_dir)
    done = {stage: (final_dir(out_dir, stage) / STAGE_FILE).is_file() for stage in (1, 2)}
    steps = {stage: step_checkpoints(out_dir, stage) for stage in (1, 2)}
    if config.resume is False:
        if any(done.values()) or any(steps.values()):
            raise LatticeError(
                f"{str(out_dir)!r} holds checkpoints of an earlier run: pass --resume true to continue it, or choose "
                "another --out_dir"
            )
        return 1, None
    if isinstance(config.resume, Path):
        checkpoint = config.resume
        return int(read_training_state(checkpoint)["stage"]), checkpoint
    if done[2]:
        return 3, None
    if steps[2]:
        return 2, steps[2][-1]
    if done[1]:
        return 2, None
    if steps[1]:
        return 1, steps[1][-1]
    raise LatticeError(f"--resume: {str(out_dir)!r} holds no checkpoint to resume from")


def check_same_recipe(config: DistillConfig, checkpoint: Path | None) -> None:
    """Refuse to resume with a recipe that changes the run: compared with the recipe stored in the checkpoint being
    continued (else with ``OUT/distill_config.json``), every key but :data:`~lattice_plugin.distill.args.
    MAY_CHANGE_ON_RESUME`; the first difference is named."""
    if checkpoint is not None:
        stored, source = read_training_state(checkpoint).get("config"), checkpoint
    else:
        source = Path(config.out_dir) / RECIPE_FILE
        try:
            stored = json.loads(source.read_text(encoding="utf-8")) if source.is_file() else None
        except (OSError, ValueError) as error:
            raise LatticeError(f"cannot read {str(source)!r}: {error}") from None
    if not isinstance(stored, dict):
        raise LatticeError(f"--resume: {str(source)!r} holds no recipe to compare this one with")
    difference = recipe_difference(stored, config.to_dict())
    if difference is not None:
        key, old, new = difference
        raise LatticeError(
            f"--resume: {key} is {new!r} but the run in {str(source)!r} used {old!r}; resume with its settings, or "
            "start a new run in another --out_dir"
        )


def teacher_dtype(fabric: Any) -> torch.dtype:
    precision = str(fabric._connector._precision_input) if hasattr(fabric, "_connector") else ""
    if fabric.device.type == "cuda" and "bf16" in precision:
        return torch.bfloat16
    if fabric.device.type == "cuda" and precision.startswith("16"):
        return torch.float16
    return torch.float32


def prepare_data(fabric: Any, config: DistillConfig, seq_len: int) -> Any:
    from litgpt import Tokenizer

    if config.data is None:
        raise LatticeError("no data: set data (e.g. class_path litgpt.data.TextFiles with train_data_path/val_data_path)")
    data = config.data
    tokenizer = Tokenizer(config.student_dir)
    data.connect(tokenizer=tokenizer, batch_size=config.train.micro_batch_size, max_seq_length=seq_len)
    with fabric.rank_zero_first():
        data.prepare_data()
    data.setup()
    return data


# ------------------------------------------------------------------------------------------------------------ stages


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
        self.fabric, self.config, self.stage, self.data, self.teacher, self.seq_len = fabric, config, stage, data, teacher, seq_len
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

    def run(self, init_dir: Path, checkpoint: Path | None, start_metrics: dict | None = None) -> dict[str, Any]:
        """Train the stage from ``init_dir`` (or continue ``checkpoint``); write its final student; return its report.

        ``start_metrics``: the held-out evaluation of ``init_dir`` when already known (stage 1's end for stage 2).
        """
        from litgpt.utils import CycleIterator, choose_logger

        from lattice_plugin.distill.evaluation import heldout_loss
        from lattice_plugin.distill.losses import AttentionTransfer, distillation_loss, set_trainable

        fabric, config, args, stage = self.fabric, self.config, self.args, self.stage
        base_config = load_config(init_dir)
        if checkpoint is not None:
            weights, state = read_checkpoint(checkpoint)
            if int(state["stage"]) != stage:
                raise LatticeError(f"checkpoint {str(checkpoint)!r} is of stage {state['stage']}, not stage {stage}")
            if state.get("trainable") != self.trainable:
                raise LatticeError(
                    f"checkpoint {str(checkpoint)!r} trained {state.get('trainable')!r} parameters; the recipe now says "
                    f"{self.trainable!r}"
                )
            if state.get("world_size") != fabric.world_size or state.get("fsdp") != is_fsdp(fabric):
                raise LatticeError(
                    f"checkpoint {str(checkpoint)!r} was written by {state.get('world_size')} process(es) "
                    f"(fsdp={state.get('fsdp')}); resume it with the same devices and strategy"
                )
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
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=tuple(args.betas), **extra)
        optimizer = fabric.setup_optimizers(optimizer)
        raw_optimizer = optimizer.optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(raw_optimizer, lr_lambda(args, self.max_steps))
        loader = self.data.train_dataloader()

        progress: dict[str, Any] = {"step": 0, "tokens": 0, "train_seconds": 0.0, "history": [], "val_history": [], "metrics": {}}
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
            config.logger_name, stage_dir(config.out_dir, stage), name=f"distill-stage{stage}",
            log_interval=config.train.log_interval, resume=state is not None,
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
                    logger.log_metrics({**record, "step_time": dt, "tokens_per_sec": self.tokens_per_step / dt}, step=step)
                    extras = " ".join(f"{k} {record[k]:.4f}" for k in keys if k != "loss")
                    bar.print(
                        f"stage {stage} | step {step}/{self.max_steps} | loss {record['loss']:.4f} | {extras} | "
                        f"lr {lr:.2e} | {self.tokens_per_step / dt:,.0f} tok/s"
                    )
                if config.eval.interval and step % config.eval.interval == 0 and step < self.max_steps:
                    val = heldout_loss(fabric, model, val_loader(), config.eval.max_iters)
                    progress["val_history"].append({"step": step, **val})
                    logger.log_metrics({"val_loss": val["loss"], "val_ppl": val["ppl"]}, step=step)
                    bar.print(f"stage {stage} | step {step} | validation loss {val['loss']:.4f}, perplexity {val['ppl']:.2f}")
                if config.train.save_interval and step % config.train.save_interval == 0 and step < self.max_steps:
                    path = step_dir(config.out_dir, stage, step)
                    training_state = {
                        "stage": stage,
                        **progress,
                        "trainable": self.trainable,
                        "world_size": fabric.world_size,
                        "fsdp": is_fsdp(fabric),
                        "scheduler": scheduler.state_dict(),
                        "data": loader.state_dict() if hasattr(loader, "state_dict") else None,
                        "config": config.to_dict(),
                    }
                    save_checkpoint(fabric, model, optimizer, path, training_state, model_config)
                    bar.print(f"stage {stage} | step {step} | saved {path}")
                    if fabric.is_global_zero:
                        logger.save()
                        prune_checkpoints(config.out_dir, stage, config.train.keep_last)

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

    def write_final(self, model: Any, model_config: Any, base_config: Any, init_dir: Path, report: dict, names: list) -> None:
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


def peak_memory_per_rank(fabric: Any) -> list[int] | None:
    """Each rank's peak allocated CUDA memory during this run's training steps (None on the CPU)."""
    if fabric.device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated(fabric.device)], device=fabric.device)
    if fabric.world_size > 1:
        peak = fabric.all_gather(peak)
    return [int(x) for x in peak.flatten().tolist()]


class _Bar:
    """A rich progress bar on rank 0 of an interactive terminal; plain lines otherwise."""

    def __init__(self, fabric: Any, total: int, completed: int, title: str) -> None:
        self.fabric = fabric
        self.progress = None
        if fabric.is_global_zero and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), console=Console(stderr=True),
            )
            self.task = self.progress.add_task(title, total=total, completed=completed)

    def __enter__(self) -> "_Bar":
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


# ------------------------------------------------------------------------------------------------------------ run


def run(fabric: Any, config: DistillConfig) -> dict[str, Any] | None:
    from lattice_plugin.distill.evaluation import cache_bytes_at, heldout_loss

    started = time.perf_counter()
    out_dir = Path(config.out_dir)
    student_dir = Path(config.student_dir)
    teacher_dir = resolve_teacher(config)
    student_config = validate_checkpoint(student_dir, tokenizer=True)
    teacher_config = validate_checkpoint(teacher_dir)
    check_pair(teacher_config, student_config, teacher_dir, student_dir)
    first_stage, checkpoint = plan_resume(config)
    if config.resume is not False:
        check_same_recipe(config, checkpoint)
    seq_len = config.train.max_seq_length or student_config.block_size
    if seq_len > min(student_config.block_size, teacher_config.block_size):
        raise LatticeError(
            f"train.max_seq_length {seq_len} exceeds the block size of the teacher or student "
            f"({teacher_config.block_size}, {student_config.block_size})"
        )
    fabric.seed_everything(config.seed)
    data = prepare_data(fabric, config, seq_len)
    teacher = load_model(teacher_dir, device=fabric.device, dtype=teacher_dtype(fabric))
    if fabric.is_global_zero:  # inputs read: from here on the run writes
        for directory in (out_dir.parent, out_dir, stage_dir(out_dir, 1), stage_dir(out_dir, 2)):
            stale = describe_stale(*remove_stale_temporaries(directory))
            if stale:
                fabric.print(f"{directory}: {stale}")
        if config.resume is False or not (out_dir / RECIPE_FILE).is_file():
            atomic_write(out_dir / RECIPE_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
    teacher.requires_grad_(False)
    teacher.max_seq_length = seq_len
    teacher_eval = heldout_loss(fabric, teacher, data.val_dataloader(), config.eval.final_max_iters, autocast=False)
    fabric.print(f"teacher: held-out loss {teacher_eval['loss']:.4f}, perplexity {teacher_eval['ppl']:.2f}")

    reports: dict[int, dict] = {}
    for stage in (1, 2):
        args = config.stage1 if stage == 1 else config.stage2
        if not args.enabled:
            continue
        stage_final = final_dir(out_dir, stage)
        if stage < first_stage:
            if (stage_final / STAGE_FILE).is_file():
                reports[stage] = json.loads((stage_final / STAGE_FILE).read_text(encoding="utf-8"))
                fabric.print(f"stage {stage}: done earlier ({stage_final})")
            continue
        init_dir = student_dir
        if stage == 2 and config.stage1.enabled:
            init_dir = final_dir(out_dir, 1)
            if not (init_dir / STAGE_FILE).is_file():
                raise LatticeError(f"stage 2 starts from stage 1's student but {str(init_dir)!r} is missing")
        runner = Stage(fabric, config, stage, data, teacher, seq_len)
        start_metrics = reports[1]["heldout_end"] if stage == 2 and 1 in reports else None
        reports[stage] = runner.run(init_dir, checkpoint if stage == first_stage else None, start_metrics)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    last = max(reports)
    final = out_dir / "final"
    report = None
    if fabric.is_global_zero:
        with atomic_directory(final, force=True) as tmp_dir:
            shutil.rmtree(tmp_dir)
            shutil.copytree(final_dir(out_dir, last), tmp_dir, copy_function=_link_or_copy)
        first = reports[min(reports)]
        perplexity = {"teacher": teacher_eval["ppl"], "converted": first["heldout_start"]["ppl"]}
        loss = {"teacher": teacher_eval["loss"], "converted": first["heldout_start"]["loss"]}
        for stage, stage_report in reports.items():
            perplexity[f"stage{stage}"] = stage_report["heldout_end"]["ppl"]
            loss[f"stage{stage}"] = stage_report["heldout_end"]["loss"]
        report = {
            "teacher_dir": str(teacher_dir),
            "student_dir": str(student_dir),
            "final_dir": str(final),
            "lattice_layers": student_config.lattice_layers,
            "attention_layers": [i for i in range(student_config.n_layer) if i not in student_config.lattice_layers],
            "n_layer": student_config.n_layer,
            "parameters": {"teacher": sum(p.numel() for p in teacher.parameters()), "student": first["total_parameters"]},
            "heldout": heldout_description(config, teacher_eval, seq_len),
            "perplexity": perplexity,
            "loss": loss,
            "tokens": {
                "teacher_training": teacher_training_tokens(teacher_dir),
                **{f"stage{s}": r["tokens"] for s, r in reports.items()},
                "distill_total": sum(r["tokens"] for r in reports.values()),
            },
            "environment": environment(fabric, config),
            "stages": {f"stage{s}": r for s, r in reports.items()},
        }
        if report["tokens"]["teacher_training"]:
            report["tokens"]["distill_fraction_of_teacher"] = report["tokens"]["distill_total"] / report["tokens"]["teacher_training"]
        report["cache_bytes"] = {
            "batch_size": 1,
            "kv_dtype": "bfloat16",
            "teacher": cache_bytes_at(teacher_config, config.eval.cache_lengths),
            "student": cache_bytes_at(student_config, config.eval.cache_lengths),
        }
        if config.eval.decode_tokens:
            report["decode"] = measure_decode(fabric, config, teacher, final, data, seq_len)
        report["wall_seconds"] = time.perf_counter() - started
        atomic_write(out_dir / REPORT_FILE, json.dumps(report, indent=1) + "\n")
        print_summary(report)
    fabric.barrier()
    return report


def _link_or_copy(source: str, destination: str) -> str:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
    return destination


def heldout_description(config: DistillConfig, evaluation: dict, seq_len: int) -> dict[str, Any]:
    data = config.data
    return {
        "text": str(getattr(data, "val_data_path", None) or "the data module's validation split"),
        "tokens": evaluation["tokens"],
        "batches_per_rank": evaluation["batches"],
        "sequence_length": seq_len,
    }


def teacher_training_tokens(teacher_dir: Path) -> int | None:
    """``train.max_tokens`` from the teacher's litgpt ``hyperparameters.yaml`` (pretrain writes it), if present."""
    import yaml

    path = Path(teacher_dir) / "hyperparameters.yaml"
    if not path.is_file():
        return None
    try:
        value = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("train", {}).get("max_tokens")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return int(value) if isinstance(value, (int, float)) else None


def environment(fabric: Any, config: DistillConfig) -> dict[str, Any]:
    from importlib.metadata import version

    device = fabric.device
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "accelerator": device.type,
        "world_size": fabric.world_size,
        "num_nodes": config.num_nodes,
        "strategy": config.strategy,
        "precision": config.precision or default_precision(),
        "torch": torch.__version__,
        "lightning": version("lightning"),
        "litgpt": version("litgpt"),
        "cpu_threads": torch.get_num_threads(),
    }


def measure_decode(fabric: Any, config: DistillConfig, teacher: Any, final: Path, data: Any, seq_len: int) -> dict:
    from lattice_plugin.distill.evaluation import decode_speed

    dtype = teacher_dtype(fabric)
    batch = next(iter(data.val_dataloader()))
    prompt_len = min(config.eval.prompt_tokens, seq_len - config.eval.decode_tokens)
    if prompt_len < 1:
        return {"skipped": f"decode_tokens {config.eval.decode_tokens} leaves no room for a prompt in {seq_len}"}
    prompt = batch[0, :prompt_len].long().to(fabric.device)
    student = load_model(final, device=fabric.device, dtype=dtype)
    results = {}
    for name, model in (("teacher", teacher), ("student", student)):
        model.max_seq_length = prompt_len + config.eval.decode_tokens
        results[name] = decode_speed(model, prompt, config.eval.decode_tokens)
        model.max_seq_length = seq_len
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": 1,
        "prompt_tokens": prompt_len,
        "new_tokens": config.eval.decode_tokens,
        "teacher_tokens_per_sec": results["teacher"]["tokens_per_sec"],
        "student_tokens_per_sec": results["student"]["tokens_per_sec"],
        "greedy_agreement": sum(a == b for a, b in zip(results["teacher"]["tokens"], results["student"]["tokens"]))
        / max(1, len(results["teacher"]["tokens"])),
    }


def print_summary(report: dict[str, Any]) -> None:
    from lattice_plugin.inspect import format_bytes

    rows = [("teacher (attention)", "teacher"), ("converted, before distillation", "converted")]
    rows += [(f"after stage {s[-1]} ({STAGE_NAMES[int(s[-1])]})", s) for s in ("stage1", "stage2") if s in report["perplexity"]]
    print("\nheld-out perplexity (" + report["heldout"]["text"] + f", {report['heldout']['tokens']:,} tokens)")
    for label, key in rows:
        print(f"  {label:<42} {report['perplexity'][key]:10.2f}")
    cache = report["cache_bytes"]
    for length in cache["teacher"]:
        print(
            f"  cache at {int(length):,} tokens: teacher {format_bytes(cache['teacher'][length])}, "
            f"student {format_bytes(cache['student'][length])}"
        )
    if "decode" in report and "teacher_tokens_per_sec" in report["decode"]:
        d = report["decode"]
        print(f"  decode (batch 1, greedy): teacher {d['teacher_tokens_per_sec']:.1f} tok/s, student {d['student_tokens_per_sec']:.1f} tok/s")
    print(f"  final student: {report['final_dir']}")
