"""Resumable stage checkpoints: ``OUT/stage{1,2}/step-XXXXXX/`` with ``model.safetensors`` (the student's weights),
``training_state.pt`` (optimizer, scheduler, data position, step counters, RNG, loss history; read with
``weights_only=True``) and ``model_config.yaml``. Each is written to a temporary sibling and renamed into place only
when complete, so a stop at any moment leaves either the previous checkpoint set or the new one, never half of one;
``train.keep_last`` deletes the older ones (each renamed to a temporary name first, for the same reason).
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lattice_plugin.checkpoint import (
    atomic_directory,
    load_state_dict,
    save_safetensors,
    temporary_prefix,
    tensor_bytes,
)
from lattice_plugin.errors import LatticeError, first_line

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
STAGE_FILE = "stage.json"  # in a stage's final/: its report, written last (the stage is done when it exists)
STAGE_NAMES = {1: "attention transfer", 2: "logit distillation"}
FORMAT = 1
STEP_PATTERN = re.compile(r"step-(\d+)")


def stage_dir(out_dir: Path, stage: int) -> Path:
    return Path(out_dir) / f"stage{stage}"


def step_dir(out_dir: Path, stage: int, step: int) -> Path:
    return stage_dir(out_dir, stage) / f"step-{step:06d}"


def final_dir(out_dir: Path, stage: int) -> Path:
    """A stage's finished student: a normal checkpoint directory (stage 2's LoRA already merged)."""
    return stage_dir(out_dir, stage) / "final"


def step_checkpoints(out_dir: Path, stage: int) -> list[Path]:
    """A stage's step checkpoints, oldest first (temporary directories of unfinished writes are not listed)."""
    directory = stage_dir(out_dir, stage)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := STEP_PATTERN.fullmatch(p.name))]
    return [path for _, path in sorted(found)]


def is_fsdp(fabric: Any) -> bool:
    from lightning.fabric.strategies import FSDPStrategy

    return isinstance(fabric.strategy, FSDPStrategy)


def _fsdp_root(model: Any) -> torch.nn.Module:
    return model._forward_module


def gather_model_state(fabric: Any, model: Any) -> dict[str, torch.Tensor] | None:
    """The full state dict of a Fabric-wrapped model on rank 0 (CPU tensors), None elsewhere. Collective under FSDP."""
    if is_fsdp(fabric):
        from lightning.fabric.strategies.fsdp import _get_full_state_dict_context

        root = _fsdp_root(model)
        with _get_full_state_dict_context(root, world_size=fabric.world_size):
            state = root.state_dict()
    else:
        state = model.module.state_dict() if fabric.global_rank == 0 else None
    if fabric.global_rank != 0:
        return None
    return {key.replace("_orig_mod.", ""): value.detach().cpu() for key, value in state.items()}


def gather_optimizer_state(fabric: Any, model: Any, optimizer: Any) -> dict | None:
    """The optimizer's full state on rank 0 (keyed by parameter names under FSDP). Collective under FSDP."""
    raw = getattr(optimizer, "optimizer", optimizer)
    if is_fsdp(fabric):
        from lightning.fabric.strategies.fsdp import _get_full_state_dict_context
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        root = _fsdp_root(model)
        with _get_full_state_dict_context(root, world_size=fabric.world_size):
            state = FSDP.optim_state_dict(root, raw)
    else:
        state = raw.state_dict()
    return state if fabric.global_rank == 0 else None


def load_optimizer_state(fabric: Any, model: Any, optimizer: Any, state: dict) -> None:
    raw = getattr(optimizer, "optimizer", optimizer)
    if is_fsdp(fabric):
        from lightning.fabric.strategies.fsdp import _get_full_state_dict_context
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        root = _fsdp_root(model)
        with _get_full_state_dict_context(root, world_size=fabric.world_size, rank0_only=False):
            state = FSDP.optim_state_dict_to_load(model=root, optim=raw, optim_state_dict=state)
    raw.load_state_dict(state)


def rng_state() -> dict[str, Any]:
    import numpy as np

    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    fabric: Any, model: Any, optimizer: Any, path: Path, training_state: dict[str, Any], config: Any
) -> None:
    """Write one resumable checkpoint directory (every rank must call it; rank 0 writes)."""
    from litgpt.utils import save_config

    weights = gather_model_state(fabric, model)
    optimizer_state = gather_optimizer_state(fabric, model, optimizer)
    if fabric.global_rank == 0:
        state = {"format": FORMAT, **training_state, "optimizer": optimizer_state, "rng": rng_state()}
        with atomic_directory(path, force=True, needed_bytes=tensor_bytes(weights) + tensor_bytes(state)) as tmp_dir:
            save_safetensors(weights, tmp_dir / WEIGHTS_FILE)
            with open(tmp_dir / STATE_FILE, "wb") as file:  # a Python file: a full disk raises OSError with its errno
                torch.save(state, file)
            save_config(config, tmp_dir)
    fabric.barrier()


def prune_checkpoints(out_dir: Path, stage: int, keep_last: int | None) -> list[Path]:
    """Delete all but the newest ``keep_last`` step checkpoints of a stage (rank 0); returns the deleted paths. Each
    is renamed to a temporary name first, so an interrupted deletion never leaves a half checkpoint under a step name
    (the temporary is removed at the next start)."""
    if keep_last is None:
        return []
    deleted = step_checkpoints(out_dir, stage)[:-keep_last]
    for path in deleted:
        doomed = Path(tempfile.mkdtemp(prefix=temporary_prefix(path), suffix=".tmp", dir=path.parent))
        os.replace(path, doomed)
        shutil.rmtree(doomed)
    return deleted


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and training state of a step checkpoint, or a :class:`LatticeError` saying what is wrong with it."""
    path = Path(path)
    if not path.is_dir():
        raise LatticeError(f"checkpoint {str(path)!r} does not exist")
    for name in (WEIGHTS_FILE, STATE_FILE):
        if not (path / name).is_file():
            raise LatticeError(f"checkpoint {str(path)!r} is incomplete: {name} is missing")
    weights = load_state_dict(path / WEIGHTS_FILE)
    return weights, read_training_state(path)


def read_training_state(path: Path) -> dict[str, Any]:
    """The training state of a step checkpoint (mapped, not read: the optimizer state is only touched when used)."""
    path = Path(path)
    if not path.is_dir():
        raise LatticeError(f"checkpoint {str(path)!r} does not exist")
    if not (path / STATE_FILE).is_file():
        raise LatticeError(f"checkpoint {str(path)!r} is incomplete: {STATE_FILE} is missing")
    try:
        state = torch.load(str(path / STATE_FILE), map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise LatticeError(
            f"cannot read {str(path / STATE_FILE)!r} (corrupted checkpoint?): {first_line(error)}"
        ) from None
    required = ("format", "stage", "step", "optimizer", "scheduler", "data", "rng", "history")
    if not isinstance(state, dict) or any(key not in state for key in required):
        raise LatticeError(f"{str(path / STATE_FILE)!r} is not a lattice distill training state")
    if state["format"] != FORMAT:
        raise LatticeError(f"{str(path / STATE_FILE)!r} has format {state['format']}, this version reads {FORMAT}")
    return state
