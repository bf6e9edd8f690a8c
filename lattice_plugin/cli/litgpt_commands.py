"""``lattice pretrain | finetune | finetune_lora | finetune_full | generate | chat | merge_lora |
convert_pretrained_checkpoint``: litgpt's own commands, run with the Lattice classes patched in.

Everything after the command name goes to litgpt's parser unchanged, so litgpt's flags, ``--config`` YAML recipes and
``--help`` work as documented by litgpt; a recipe selects Lattice with the ``lattice_*`` fields of ``model_config``.

litgpt's pretrain always wraps the model in ``torch.compile``; on a CPU that costs more than it saves for the models
one trains there, so compilation follows ``LATTICE_COMPILE``: ``auto`` (default: only with CUDA), ``1`` or ``0``.

Before litgpt takes over, the commands that read a model (generate, chat, finetune*) check its checkpoint directory
(:func:`lattice_plugin.checkpoint.validate_checkpoint`), so that a broken one is one line and exit status 2 rather
than a traceback from inside litgpt.
"""

import os
import sys
from pathlib import Path

import typer

from lattice_plugin.cli.app import app

LITGPT_COMMANDS = {
    "pretrain": "Pretrain a model (litgpt pretrain).",
    "finetune": "LoRA fine-tuning (litgpt finetune, an alias of finetune_lora).",
    "finetune_lora": "LoRA fine-tuning (litgpt finetune_lora).",
    "finetune_full": "Full fine-tuning (litgpt finetune_full).",
    "generate": "Generate text with the fixed-slot cache (litgpt generate).",
    "chat": "Chat with a model (litgpt chat).",
    "merge_lora": "Merge LoRA weights into the base model (litgpt merge_lora).",
    "convert_pretrained_checkpoint": "Strip a pretraining checkpoint down to model weights (litgpt).",
}
READS_A_MODEL = ("finetune", "finetune_lora", "finetune_full", "generate", "chat")


def checkpoint_argument(args: list[str]) -> str | None:
    """The ``checkpoint_dir`` of a litgpt command line: ``--checkpoint_dir X`` (or ``=X``), else the first positional
    argument, else the ``checkpoint_dir`` of a ``--config`` recipe; None when there is none (or ``--help``)."""
    positional: list[str] = []
    recipes: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg in ("-h", "--help"):
            return None
        if arg.startswith("--"):
            key, has_value, value = arg[2:].partition("=")
            if not has_value:
                index += 1
                value = args[index] if index < len(args) else ""
            if key == "checkpoint_dir":
                return value
            if key == "config":
                recipes.append(value)
        else:
            positional.append(arg)
        index += 1
    if positional:
        return positional[0]
    import yaml

    for recipe in recipes:
        try:
            values = yaml.safe_load(Path(recipe).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue  # litgpt's parser reports it
        if isinstance(values, dict) and values.get("checkpoint_dir"):
            return str(values["checkpoint_dir"])
    return None


def validate_model_argument(args: list[str]) -> None:
    """Refuse, in one line, a checkpoint directory litgpt could not load (litgpt's ``checkpoints/`` prefix allowed)."""
    from lattice_plugin.checkpoint import WEIGHT_FILES, load_config, validate_checkpoint

    argument = checkpoint_argument(args)
    if argument is None:
        return
    checkpoint_dir = Path(argument)
    if not checkpoint_dir.is_dir() and (Path("checkpoints") / checkpoint_dir).is_dir():
        checkpoint_dir = Path("checkpoints") / checkpoint_dir  # litgpt's extend_checkpoint_dir
    unmerged_lora = (checkpoint_dir / "lit_model.pth.lora").is_file() and not any(
        (checkpoint_dir / name).is_file() for name in WEIGHT_FILES
    )
    if unmerged_lora:  # chat and generate merge it first; the config is all there is to check
        load_config(checkpoint_dir)
    else:
        validate_checkpoint(checkpoint_dir, tokenizer=True)


def run_litgpt() -> None:
    """Patch litgpt, then hand ``sys.argv`` (``lattice <command> ...``) to litgpt's own CLI."""
    import torch
    from litgpt.__main__ import main as litgpt_main

    from lattice_plugin.errors import LatticeConfigError, LatticeError
    from lattice_plugin.patch import patch_litgpt

    compile_mode = os.environ.get("LATTICE_COMPILE", "auto")
    if compile_mode not in ("auto", "0", "1"):
        raise LatticeError(f"LATTICE_COMPILE must be auto, 0 or 1, got {compile_mode!r}")
    if compile_mode == "0" or (compile_mode == "auto" and not torch.cuda.is_available()):
        torch._dynamo.config.disable = True  # torch.compile(model) then returns the model unchanged
    if len(sys.argv) > 1 and sys.argv[1] in READS_A_MODEL:
        validate_model_argument(sys.argv[2:])
    patch_litgpt()
    try:
        litgpt_main()
    except ValueError as error:
        config_error = LatticeConfigError.last
        if config_error is not None and str(config_error) in str(error):  # wrapped by jsonargparse
            raise config_error from None
        raise


def _register(name: str, summary: str) -> None:
    @app.command(
        name,
        help=f"{summary} Takes litgpt's flags and YAML recipes; see `lattice {name} --help`.",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
        add_help_option=False,
    )
    def command(ctx: typer.Context) -> None:
        run_litgpt()


for _name, _summary in LITGPT_COMMANDS.items():
    _register(_name, _summary)
