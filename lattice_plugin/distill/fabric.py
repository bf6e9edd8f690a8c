"""Lightning Fabric for ``lattice distill``: precision, strategy (each transformer block one FSDP unit), the
teacher's dtype and per-rank memory."""

from __future__ import annotations

from typing import Any

import torch
from litgpt.model import Block

from lattice_plugin.distill.args import DistillConfig
from lattice_plugin.errors import LatticeError
from lattice_plugin.model import LatticeBlock


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
        raise LatticeError(
            f"cannot set up {config.devices} device(s) with strategy {config.strategy!r}: {error}"
        ) from None


def teacher_dtype(fabric: Any) -> torch.dtype:
    precision = str(fabric._connector._precision_input) if hasattr(fabric, "_connector") else ""
    if fabric.device.type == "cuda" and "bf16" in precision:
        return torch.bfloat16
    if fabric.device.type == "cuda" and precision.startswith("16"):
        return torch.float16
    return torch.float32


def peak_memory_per_rank(fabric: Any) -> list[int] | None:
    """Each rank's peak allocated CUDA memory during this run's training steps (None on the CPU)."""
    if fabric.device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated(fabric.device)], device=fabric.device)
    if fabric.world_size > 1:
        peak = fabric.all_gather(peak)
    return [int(x) for x in peak.flatten().tolist()]
