"""Make litgpt's own scripts build Lattice models.

litgpt's pretrain / finetune / generate / chat / merge scripts look up ``GPT``, ``Config`` and ``Block`` as module
globals when they run, and ``pretrain.setup``'s ``model_config`` annotation tells jsonargparse which config class to
build from a YAML recipe. Rebinding those names (and the annotation) before litgpt's CLI runs makes every litgpt flow
work with Lattice, Fabric's FSDP/DDP included (their wrap policies test ``isinstance(module, Block)``), and in every
process of a multi-process launch, since each one re-runs the ``lattice`` command.
"""

import importlib
from pathlib import Path
from typing import Any, Optional

import lightning as L

from lattice_plugin.checkpoint import WEIGHT_FILES, find_weights, load_state_dict
from lattice_plugin.config import LatticeConfig
from lattice_plugin.errors import LatticeError
from lattice_plugin.lora import LoRALatticeBlock, LoRALatticeConfig, LoRALatticeGPT
from lattice_plugin.model import LatticeBlock, LatticeGPT

_PLAIN = {"GPT": LatticeGPT, "Config": LatticeConfig, "Block": LatticeBlock}
_LORA = {"GPT": LoRALatticeGPT, "Config": LoRALatticeConfig, "Block": LoRALatticeBlock}
SCRIPT_CLASSES = {
    "litgpt.pretrain": _PLAIN,
    "litgpt.finetune.full": _PLAIN,
    "litgpt.generate.base": _PLAIN,
    "litgpt.chat.base": _PLAIN,
    "litgpt.finetune.lora": _LORA,
    "litgpt.scripts.merge_lora": _LORA,
}

_litgpt_check_valid_checkpoint_dir = None


def check_valid_checkpoint_dir(checkpoint_dir: Path, model_filename: str = "lit_model.pth", **kwargs: Any) -> None:
    """litgpt's check, accepting ``model.safetensors`` where ``lit_model.pth`` is expected."""
    checkpoint_dir = Path(checkpoint_dir)
    if model_filename == "lit_model.pth" and not (checkpoint_dir / model_filename).is_file():
        if (checkpoint_dir / "model.safetensors").is_file():
            model_filename = "model.safetensors"
    return _litgpt_check_valid_checkpoint_dir(checkpoint_dir, model_filename=model_filename, **kwargs)


def load_checkpoint(fabric: L.Fabric, model: Any, checkpoint_path: Path, strict: bool = True) -> None:
    """litgpt's ``load_checkpoint`` for ``lit_model.pth`` or ``model.safetensors``, reading ``.pth`` with
    ``weights_only=True``. With ``strict=False`` (LoRA fine-tuning) only LoRA parameters may be missing."""
    from lightning.fabric.strategies import FSDPStrategy

    checkpoint_path = Path(checkpoint_path)
    if checkpoint_path.name in WEIGHT_FILES and not checkpoint_path.is_file():
        checkpoint_path = find_weights(checkpoint_path.parent)
    state_dict = load_state_dict(checkpoint_path)
    if isinstance(fabric.strategy, FSDPStrategy):
        from lightning.fabric.strategies.fsdp import _load_raw_module_state

        _load_raw_module_state(state_dict, module=model, world_size=fabric.world_size, strict=strict)
        return
    result = model.load_state_dict(state_dict, strict=strict)
    missing = [key for key in result.missing_keys if "lora_" not in key]
    if missing:
        raise LatticeError(f"{str(checkpoint_path)!r} lacks weights the model needs: {', '.join(missing[:5])}")


def patch_litgpt() -> None:
    """Rebind litgpt's script globals to the Lattice classes (idempotent)."""
    global _litgpt_check_valid_checkpoint_dir
    import litgpt.utils

    if _litgpt_check_valid_checkpoint_dir is None:
        _litgpt_check_valid_checkpoint_dir = litgpt.utils.check_valid_checkpoint_dir
    litgpt.utils.check_valid_checkpoint_dir = check_valid_checkpoint_dir  # auto_download_checkpoint looks it up here
    for module_name, classes in SCRIPT_CLASSES.items():
        module = importlib.import_module(module_name)
        for name, cls in classes.items():
            if hasattr(module, name):
                setattr(module, name, cls)
        for name, function in (("load_checkpoint", load_checkpoint), ("check_valid_checkpoint_dir", check_valid_checkpoint_dir)):
            if hasattr(module, name):
                setattr(module, name, function)
    pretrain = importlib.import_module("litgpt.pretrain")
    pretrain.setup.__annotations__["model_config"] = Optional[LatticeConfig]


def is_patched() -> bool:
    """Whether litgpt's scripts currently build Lattice models."""
    import litgpt.finetune.lora
    import litgpt.pretrain

    return litgpt.pretrain.GPT is LatticeGPT and litgpt.finetune.lora.GPT is LoRALatticeGPT
