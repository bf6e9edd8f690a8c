"""The two distillation losses and the parameter selections they train.

Stage 1 (attention transfer): a forward hook on every Lattice mixer computes, from the same input and the same frozen
``qkv``/``proj``, the output litgpt's softmax attention gives (the mixer *is* a ``CausalSelfAttention`` subclass, so
the parent's ``forward`` is that attention), and records the MSE between the two. With teacher forcing the hook hands
the attention output on to the next layer, so every layer trains on the teacher's hidden states (LoLCATs, RADLADS).

Stage 2: ``T^2 * KL(teacher_T || student_T)`` over the vocabulary, averaged over tokens, plus optional cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from litgpt.model import CausalSelfAttention

from lattice_plugin.model import LatticeMixer

# children of a Lattice mixer that it shares with (or inherits from) the attention layer it replaced
ATTENTION_CHILDREN = ("qkv", "proj", "norm_q", "norm_k", "kv_cache")


def lattice_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters the conversion created (code maps, beta, initial slots, output norm and gate)."""
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, LatticeMixer):
            for child_name, child in module.named_children():
                if child_name in ATTENTION_CHILDREN:
                    continue
                for param_name, _ in child.named_parameters():
                    names.append(f"{module_name}.{child_name}.{param_name}".lstrip("."))
    return names


def set_trainable(model: nn.Module, mode: str) -> list[str]:
    """Set ``requires_grad`` for a stage: ``lattice``, ``full``, ``lora`` or ``lora+lattice``; return the trainable
    parameter names."""
    lattice = set(lattice_parameter_names(model))
    for name, param in model.named_parameters():
        if mode == "full":
            train = True
        elif mode == "lattice":
            train = name in lattice
        elif mode == "lora":
            train = "lora_" in name
        elif mode == "lora+lattice":
            train = "lora_" in name or name in lattice
        else:
            raise ValueError(f"unknown trainable mode {mode!r}")
        param.requires_grad_(train)
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    if not names:
        raise ValueError(f"no parameter is trainable with {mode!r}")
    return names


class AttentionTransfer:
    """Forward hooks on the Lattice mixers that collect ``MSE(lattice output, attention output)`` per layer.

    Use as a context manager around the training forwards; :meth:`pop` returns the mean over layers (the loss) and
    the per-layer values of the forwards since the last call. Forwards in eval mode (validation) are left alone.

    ``through_outputs`` is for sharded models (FSDP): FSDP gathers a unit's weights for the backward only when the
    gradient reaches it through the unit's outputs, but the layer losses hang off the middle of each block (and
    teacher forcing cuts the student's outputs off the graph). Then each mixer output stays on the path to the model
    output with weight zero, and :meth:`pop` given the model output adds ``0 * output``: the gradients are unchanged,
    the backward enters every block through its output.
    """

    def __init__(
        self, model: nn.Module, teacher_forcing: bool = True, training_only: bool = True, through_outputs: bool = False
    ) -> None:
        self.teacher_forcing = teacher_forcing
        self.training_only = training_only  # validation forwards (eval mode) neither record nor teacher-force
        self.through_outputs = through_outputs
        self.mixers = [module for module in model.modules() if isinstance(module, LatticeMixer)]
        if not self.mixers:
            raise ValueError("the student has no Lattice layers: there is no attention to transfer")
        self.losses: list[torch.Tensor] = []
        self.handles: list = []

    def __enter__(self) -> AttentionTransfer:
        self.handles = [mixer.register_forward_hook(self._hook) for mixer in self.mixers]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.losses = []

    def _hook(self, module: LatticeMixer, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        x, cos, sin = args[:3]
        mask = args[3] if len(args) > 3 else None
        input_pos = args[4] if len(args) > 4 else None
        if input_pos is not None or (self.training_only and not module.training):
            return None  # generation through the cache, or a validation forward: the student runs as it is
        with torch.no_grad():
            target = CausalSelfAttention.forward(module, x, cos, sin, mask)
        self.losses.append(F.mse_loss(output.float(), target.float()))
        if not self.teacher_forcing:
            return None
        return target + 0 * output if self.through_outputs else target

    def pop(self, model_output: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean over layers of the MSE, per-layer MSE) of the forwards since the last call; with ``through_outputs``,
        pass the model output of those forwards."""
        if len(self.losses) % len(self.mixers):
            raise RuntimeError(f"{len(self.losses)} layer losses for {len(self.mixers)} Lattice layers")
        per_layer = torch.stack(self.losses).view(-1, len(self.mixers)).mean(0)
        self.losses = []
        loss = per_layer.mean()
        if self.through_outputs:
            if model_output is None:
                raise ValueError("through_outputs needs the model output")
            loss = loss + 0 * model_output.sum()  # no float32 copy of the logits: only the graph edge matters
        return loss, per_layer.detach()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``kl_weight * T^2 * KL(softmax(t/T) || softmax(s/T)) + ce_weight * CE(s, targets)``, means over tokens.

    Logits are ``(B, T, V)``; computed in float32.
    """
    vocab = student_logits.shape[-1]
    student = student_logits.float().reshape(-1, vocab)
    parts: dict[str, torch.Tensor] = {}
    loss = student.new_zeros(())
    if kl_weight > 0:
        teacher = teacher_logits.float().reshape(-1, vocab)
        log_p_student = F.log_softmax(student / temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
        kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * temperature**2
        parts["kl"] = kl.detach()
        loss = loss + kl_weight * kl
    if ce_weight > 0:
        ce = F.cross_entropy(student, targets.reshape(-1))
        loss = loss + ce_weight * ce
    else:  # logged either way: the student's loss on the data
        with torch.no_grad():
            ce = F.cross_entropy(student, targets.reshape(-1))
    parts["ce"] = ce.detach()
    return loss, parts
