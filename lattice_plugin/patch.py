"""Make litgpt's own scripts build Lattice models.

litgpt's pretrain / finetune / generate / chat / merge scripts look up ``GPT``, ``Config`` and ``Block`` as module
globals when they run, and ``pretrain.setup``'s ``model_config`` annotation tells jsonargparse which config class to
build from a YAML recipe. Rebinding those names (and the annotation) before litgpt's CLI runs makes every litgpt flow
work with Lattice, Fabric's FSDP/DDP included (their wrap policies test ``isinstance(module, Block)``), and in every
process of a multi-process launch, since each one re-runs the ``lattice`` command.
"""

import importlib
import sys
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
    # LLM.load (litgpt's server uses it) and LLM.distribute; its multi-device strategies and trainer_setup still
    # torch.load a lit_model.pth, so `lattice serve` keeps to one device
    "litgpt.api": _PLAIN,
    "litgpt.finetune.lora": _LORA,
    "litgpt.scripts.merge_lora": _LORA,
}

# the scripts whose ``main`` joins ``checkpoint_dir / "lit_model.pth"`` to announce and load the weights
CHECKPOINT_DIR_USERS = ("litgpt.generate.base", "litgpt.chat.base")

_litgpt_check_valid_checkpoint_dir = None


class CheckpointDir(type(Path())):
    """A checkpoint directory in which ``lit_model.pth`` names the weights file that is there.

    litgpt's generate and chat announce and load ``checkpoint_dir / "lit_model.pth"``; converted and distilled
    checkpoints hold ``model.safetensors`` instead, so that join resolves to it (and nothing else changes).
    """

    def __truediv__(self, key: str) -> Path:
        child = super().__truediv__(key)
        if key == "lit_model.pth" and not child.is_file() and (self / "model.safetensors").is_file():
            return Path(self, "model.safetensors")
        return child


def check_valid_checkpoint_dir(checkpoint_dir: Path, model_filename: str = "lit_model.pth", **kwargs: Any) -> None:
    """litgpt's check, accepting ``model.safetensors`` where ``lit_model.pth`` is expected."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir() and not kwargs.get("raise_error"):  # raise_error: litgpt may download it instead
        raise LatticeError(f"checkpoint directory {str(checkpoint_dir)!r} does not exist")
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


def merge_lora(
    checkpoint_dir: Path, pretrained_checkpoint_dir: Path | None = None, precision: str | None = None
) -> None:
    """Merges the LoRA weights with the base model (litgpt's ``merge_lora``, reading the base weights from
    ``lit_model.pth`` or ``model.safetensors`` and every file with ``weights_only=True``).

    Arguments:
        checkpoint_dir: Path to the checkpoint directory with trained LoRA weights, which is the output of
            ``lattice finetune_lora``.
        pretrained_checkpoint_dir: Optional path to the checkpoint directory with the weights of the base model.
            By default, it is read from the metadata in ``checkpoint_dir``.
        precision: Optional precision setting to instantiate the model weights in. By default, it is read from the
            metadata in ``checkpoint_dir``.
    """
    import torch
    from litgpt.lora import lora_filter, merge_lora_weights
    from litgpt.scripts.merge_lora import load_lora_metadata
    from litgpt.utils import extend_checkpoint_dir

    checkpoint_dir = extend_checkpoint_dir(Path(checkpoint_dir))
    check_valid_checkpoint_dir(checkpoint_dir, model_filename="lit_model.pth.lora")
    if (checkpoint_dir / "lit_model.pth").is_file():
        print("LoRA weights have already been merged in this checkpoint.")
        return
    lora_params, meta_pretrained_checkpoint_dir, lora_precision = load_lora_metadata(checkpoint_dir)
    precision = precision if precision is not None else lora_precision
    pretrained_checkpoint_dir = extend_checkpoint_dir(Path(pretrained_checkpoint_dir or meta_pretrained_checkpoint_dir))
    check_valid_checkpoint_dir(pretrained_checkpoint_dir)

    fabric = L.Fabric(devices=1, precision=precision, accelerator="cpu")
    config = LoRALatticeConfig.from_file(checkpoint_dir / "model_config.yaml", **lora_params)
    with fabric.init_module(), torch.device("meta"):
        model = LoRALatticeGPT(config)
        model.cos = model.sin = None  # not needed to merge
    state_dict = load_state_dict(find_weights(pretrained_checkpoint_dir))
    lora_state_dict = load_state_dict(checkpoint_dir / "lit_model.pth.lora")
    state_dict.update(lora_state_dict)
    model.load_state_dict(state_dict, assign=True)
    # LoRA fine-tuning saves only the LoRA weights: their dtype is the expected one (as in litgpt)
    model.to(dtype=next(iter(lora_state_dict.values())).dtype, device="cpu")
    merge_lora_weights(model)
    merged = {k.replace("linear.", ""): v for k, v in model.state_dict().items() if not lora_filter(k, v)}
    torch.save(merged, checkpoint_dir / "lit_model.pth")
    fabric.print(f"Saved merged weights to {str(checkpoint_dir / 'lit_model.pth')!r}")


MERGE_LORA_USERS = ("litgpt.scripts.merge_lora", "litgpt.finetune.lora", "litgpt.chat.base")


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
        for name, function in (
            ("load_checkpoint", load_checkpoint),
            ("check_valid_checkpoint_dir", check_valid_checkpoint_dir),
        ):
            if hasattr(module, name):
                setattr(module, name, function)
    # litgpt's merge_lora reads <base>/lit_model.pth with torch.load; converted checkpoints hold model.safetensors
    for module_name in MERGE_LORA_USERS:
        importlib.import_module(module_name).merge_lora = merge_lora
    if "litgpt.__main__" in sys.modules:  # imported before patching by run_litgpt; a later import sees the rebinding
        sys.modules["litgpt.__main__"].PARSER_DATA["merge_lora"] = merge_lora
    from jsonargparse.typing import get_registered_type, register_type

    if get_registered_type(CheckpointDir) is None:
        register_type(CheckpointDir, serializer=str, deserializer=CheckpointDir)
    for module_name in CHECKPOINT_DIR_USERS:  # jsonargparse builds the argument from the annotation
        importlib.import_module(module_name).main.__annotations__["checkpoint_dir"] = CheckpointDir
    pretrain = importlib.import_module("litgpt.pretrain")
    pretrain.setup.__annotations__["model_config"] = Optional[LatticeConfig]  # noqa: UP045 (litgpt's own spelling)
    _patch_decode_loop()


def _patch_decode_loop() -> None:
    """THE patch point of fast generation: ``litgpt.generate.base.generate_fn`` is where litgpt's generate, chat
    (``litgpt.chat.base.generate`` imports it at call time) and Python API (``LLM.generate``, streaming or not)
    find their decode loop; Lattice models then decode through :mod:`lattice_plugin.generation`."""
    from lattice_plugin import generation

    generate_base = importlib.import_module("litgpt.generate.base")
    if generate_base.generate_fn is not generation.generate_fn:
        generation.LITGPT_GENERATE_FN = generate_base.generate_fn
        generate_base.generate_fn = generation.generate_fn


def is_patched() -> bool:
    """Whether litgpt's scripts currently build Lattice models."""
    import litgpt.finetune.lora
    import litgpt.pretrain

    return litgpt.pretrain.GPT is LatticeGPT and litgpt.finetune.lora.GPT is LoRALatticeGPT
