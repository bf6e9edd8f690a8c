"""``lattice pretrain | finetune | finetune_lora | finetune_full | generate | chat | merge_lora |
convert_pretrained_checkpoint``: litgpt's own commands, run with the Lattice classes patched in.

Everything after the command name goes to litgpt's parser unchanged, so litgpt's flags, ``--config`` YAML recipes and
``--help`` work as documented by litgpt; a recipe selects Lattice with the ``lattice_*`` fields of ``model_config``.

litgpt's pretrain always wraps the model in ``torch.compile``; on a CPU that costs more than it saves for the models
one trains there, so compilation follows ``LATTICE_COMPILE``: ``auto`` (default: only with CUDA), ``1`` or ``0``.
"""

import os

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
