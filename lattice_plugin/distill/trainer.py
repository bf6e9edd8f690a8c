"""The distillation run (``lattice distill``): inputs checked, resumption planned (and refused when the recipe
changed), the two stages run (:mod:`~lattice_plugin.distill.stage`) under Lightning Fabric
(:mod:`~lattice_plugin.distill.fabric`), the final student and report written (:mod:`~lattice_plugin.distill.report`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from lattice_plugin.checkpoint import (
    atomic_directory,
    atomic_write,
    describe_stale,
    load_model,
    remove_stale_temporaries,
    validate_checkpoint,
)
from lattice_plugin.distill.args import DistillConfig, recipe_difference
from lattice_plugin.distill.checkpointing import (
    STAGE_FILE,
    final_dir,
    read_training_state,
    stage_dir,
    step_checkpoints,
)
from lattice_plugin.distill.fabric import build_fabric, teacher_dtype
from lattice_plugin.distill.report import write_report
from lattice_plugin.distill.stage import Stage
from lattice_plugin.errors import LatticeError

RECIPE_FILE = "distill_config.json"  # the recipe of the run that started OUT (never overwritten by a resume)


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
        raise LatticeError(
            f"{str(student_dir)!r} is not a conversion of {str(teacher_dir)!r} (layer count or width differ)"
        )


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


def prepare_data(fabric: Any, config: DistillConfig, seq_len: int) -> Any:
    from litgpt import Tokenizer

    if config.data is None:
        raise LatticeError(
            "no data: set data (e.g. class_path litgpt.data.TextFiles with train_data_path/val_data_path)"
        )
    data = config.data
    tokenizer = Tokenizer(config.student_dir)
    data.connect(tokenizer=tokenizer, batch_size=config.train.micro_batch_size, max_seq_length=seq_len)
    with fabric.rank_zero_first():
        data.prepare_data()
    data.setup()
    return data


def run(fabric: Any, config: DistillConfig) -> dict[str, Any] | None:
    from lattice_plugin.distill.evaluation import heldout_loss

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
        report = write_report(
            fabric, config, teacher, teacher_dir, student_config, teacher_eval, reports, final, data, seq_len, started
        )
    fabric.barrier()
    return report


def _link_or_copy(source: str, destination: str) -> str:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
    return destination
