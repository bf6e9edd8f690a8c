"""The token mixers compared by ``lattice recall`` and the litgpt model each one builds.

Every model is a :class:`~lattice_plugin.model.LatticeGPT` (litgpt's GPT and Block): attention is litgpt's own, the
Lattice variants are the plugin's mixer with different :class:`~lattice_plugin.config.LatticeConfig` fields, and the
FLA peers replace the mixer of every block (:mod:`lattice_plugin.fla_mixer`). Embeddings, norms, MLPs and head are the same.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from lattice_plugin.config import LatticeConfig
from lattice_plugin.errors import LatticeError
from lattice_plugin.fla_mixer import FLA_LAYERS, FLAMixer, TrainingOnlyMixer, fla_missing_reason
from lattice_plugin.model import LatticeGPT
from lattice_plugin.recall.results import ROW_ERRORS, ResultsFile, run_pending
from lattice_plugin.recall.training import autocast


@dataclass(frozen=True)
class Mixer:
    """A mixer: ``lattice`` holds the LatticeConfig fields of a Lattice variant, ``fla`` names an FLA layer; neither
    means litgpt's softmax attention."""

    name: str
    description: str
    lattice: dict[str, Any] | None = None
    fla: str | None = None

    @property
    def has_state(self) -> bool:
        """Whether the mixer has a fixed recurrent state (m x head size per head), i.e. whether m applies."""
        return self.lattice is not None or self.fla is not None


MIXERS: dict[str, Mixer] = {
    mixer.name: mixer
    for mixer in (
        Mixer("attention", "litgpt's causal softmax attention (the upper bound: its cache grows with the sequence)"),
        Mixer("lattice_exact", "Lattice, exact gates", dict(lattice_gates="exact")),
        Mixer(
            "lattice_chunk",
            "Lattice, gates frozen per chunk (the paper's approximation)",
            dict(lattice_gates="chunk"),
        ),
        Mixer(
            "lattice_additive",
            "Lattice ablation: additive write, then retraction",
            dict(lattice_gates="exact", lattice_orthogonal=False),
        ),
        Mixer(
            "lattice_no_retraction",
            "Lattice ablation: orthogonal write, no retraction to the sphere",
            dict(lattice_gates="exact", lattice_normalize=False),
        ),
        Mixer("gla", "flash-linear-attention's Gated Linear Attention", fla="gla"),
        Mixer("deltanet", "flash-linear-attention's DeltaNet", fla="deltanet"),
        Mixer("gated_deltanet", "flash-linear-attention's Gated DeltaNet", fla="gated_deltanet"),
    )
}
BUILT_IN = tuple(name for name, mixer in MIXERS.items() if mixer.fla is None)
assert set(FLA_LAYERS) == {mixer.fla for mixer in MIXERS.values() if mixer.fla}


def parse_mixers(text: str) -> list[Mixer]:
    """``all``, ``built-in`` or comma-separated names from :data:`MIXERS`."""
    names = {"all": list(MIXERS), "built-in": list(BUILT_IN)}.get(text.strip())
    if names is None:
        names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MIXERS]
    if unknown or not names:
        raise LatticeError(
            f"unknown mixer {unknown[0] if unknown else text!r}; choose from all, built-in, {', '.join(MIXERS)}"
        )
    return [MIXERS[name] for name in dict.fromkeys(names)]


def unavailable_reason(mixer: Mixer) -> str | None:
    """Why ``mixer`` cannot be trained on this machine (None: it can)."""
    return fla_missing_reason() if mixer.fla else None


def run_mixer_rows(results: ResultsFile, jobs: Iterable, summarize: Callable[[], Any], **options: Any) -> None:
    """:func:`~lattice_plugin.recall.results.run_pending` for jobs named by mixer: a mixer this machine cannot run is
    skipped, a failure inside an FLA layer is recorded as not measured; ``summarize`` runs after every row and at the
    end. ``options``: ``run_pending``'s device, budget_s, retry_errors, echo and shard."""
    run_pending(
        results,
        jobs,
        on_row=summarize,
        unavailable=lambda name: unavailable_reason(MIXERS[name]),
        external=lambda name: MIXERS[name].fla is not None,
        **options,
    )
    summarize()


@dataclass(frozen=True)
class ModelShape:
    """The litgpt model every mixer shares; ``slots`` is m (Lattice) and the key dimension per head (FLA)."""

    vocab_size: int
    block_size: int
    n_layer: int
    n_embd: int
    n_head: int
    intermediate_size: int
    slots: int
    chunk_size: int = 64
    lattice_backend: str = "auto"
    short_conv: int = 0
    """Kernel size of a depthwise causal convolution in front of every mixer (:class:`ShortConv`); 0: none."""

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


def build_model(mixer: Mixer, shape: ModelShape) -> LatticeGPT:
    """A freshly initialised model of ``shape`` with ``mixer`` in every block, its output head tied to the token
    embedding as in Zoology's models: untied, the head must learn on its own which logit each value token's
    embedding maps to, and in MQAR (4,096 values) that, not recall, held accuracy at 1/K for thousands of steps."""
    if shape.n_embd % shape.n_head:
        raise LatticeError(f"the width {shape.n_embd} must be a multiple of the number of heads {shape.n_head}")
    if shape.slots < 1:
        raise LatticeError(f"the slot count m must be >= 1, got {shape.slots}")
    lattice = mixer.lattice or {}
    config = LatticeConfig(
        name=f"recall-{mixer.name}",
        block_size=shape.block_size,
        vocab_size=shape.vocab_size,
        padding_multiple=64,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        n_query_groups=shape.n_head,
        n_embd=shape.n_embd,
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        mlp_class_name="LLaMAMLP",
        intermediate_size=shape.intermediate_size,
        lattice_layers="all" if mixer.lattice is not None else None,
        lattice_slots=shape.slots,
        lattice_chunk_size=shape.chunk_size,
        lattice_backend=shape.lattice_backend,
        **lattice,
    )
    model = LatticeGPT(config)
    if mixer.fla:
        for block_idx, block in enumerate(model.transformer.h):
            block.attn = FLAMixer(mixer.fla, shape.n_embd, shape.n_head, shape.head_size, shape.slots, block_idx)
    if shape.short_conv:
        for block in model.transformer.h:
            block.attn = ShortConv(block.attn, shape.n_embd, shape.short_conv)
    init_weights(model)
    model.lm_head.weight = model.transformer.wte.weight
    return model


class NotCausalError(RuntimeError):
    """A mixer whose outputs at a position depend on later tokens: its rows would measure the leak, not the mixer.

    Not a :class:`~lattice_plugin.errors.LatticeError`: for another library's layer it is recorded as not measured
    (with the measured leak), for this project's mixers it stops the run (a bug)."""


CAUSAL_TOLERANCE = 1e-3
"""The largest change of a mixer's outputs before a cut, relative to the change after it, that still counts as causal
(room for bf16 rounding that depends on a row's place in the batch; a causal mixer measured exactly 0 on the CPU)."""


def causality_leak(model: LatticeGPT, vocab_size: int, seq_len: int, device: torch.device) -> float:
    """How much a mixer's outputs before the middle of a sequence move when only the tokens after it change, relative
    to how much its outputs after it move: 0 for a causal model (the largest ratio over the blocks' mixers).

    Measured on each block's mixer output (not the model's, where the residual stream would dilute a small leak) for
    two random sequences that share their first half, in the training forward (train mode, autograd on) and in the
    scoring forward (eval mode, no autograd), both under the same autocast as training.
    """
    generator = torch.Generator().manual_seed(0)
    cut = seq_len // 2
    first = torch.randint(1, vocab_size, (2, seq_len), generator=generator)
    second = first.clone()
    second[:, cut:] = torch.randint(1, vocab_size, (2, seq_len - cut), generator=generator)
    batch = torch.cat((first, second)).to(device)
    outputs: list[torch.Tensor] = []
    hooks = [
        block.attn.register_forward_hook(lambda _module, _args, out: outputs.append(out.detach().float()))
        for block in model.transformer.h
    ]
    training = model.training
    ratios = []
    try:
        for mode, grad in ((True, True), (False, False)):
            model.train(mode)
            outputs.clear()
            with torch.set_grad_enabled(grad), autocast(device):
                model(batch)
            for out in outputs:
                before = (out[:2, :cut] - out[2:, :cut]).abs().max().item()
                after = (out[:2, cut:] - out[2:, cut:]).abs().max().item()
                ratios.append(before / max(after, 1e-30))
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return max(ratios)


def check_causal(model: nn.Module, mixer: Mixer, vocab_size: int, seq_len: int, device: torch.device) -> float:
    """:func:`causality_leak` of a freshly built model, raising :class:`NotCausalError` above
    :data:`CAUSAL_TOLERANCE`; returns the leak (each row records it)."""
    leak = causality_leak(model, vocab_size, seq_len, device)
    if not leak <= CAUSAL_TOLERANCE:
        raise NotCausalError(
            f"{mixer.name} is not causal here: a mixer's outputs before token {seq_len // 2} move by {leak:.3g} of "
            "what its later ones move when only the later tokens change"
        )
    return leak


def causality_table(mixers: Iterable[Mixer], shapes: dict[str, ModelShape], device: torch.device) -> list[dict]:
    """:func:`causality_leak` of a fresh model of every mixer at every named shape (seed 0): the check the rows run,
    on its own, for mixers whose rows predate it. A mixer that cannot run here, or fails, says why."""
    table = []
    for mixer in mixers:
        for name, shape in shapes.items():
            entry: dict[str, Any] = dict(mixer=mixer.name, shape=name)
            reason = unavailable_reason(mixer)
            if reason:
                entry["not_measured"] = reason
            else:
                torch.manual_seed(0)
                try:
                    model = build_model(mixer, shape).to(device)
                    entry["causal_leak"] = causality_leak(model, shape.vocab_size, shape.block_size, device)
                except ROW_ERRORS as error:
                    entry["not_measured"] = f"{type(error).__name__}: {str(error).strip()[:300]}"
            table.append(entry)
    return table


class ShortConv(TrainingOnlyMixer):
    """A mixer that first adds to each token a depthwise causal convolution of the last ``kernel_size`` tokens.

    Zoology's MQAR models put such a short convolution before every sequence mixer, attention included: it hands each
    value the identity of the key before it, so recall no longer waits for a previous-token head to form. It is the
    same for every mixer (FLA's DeltaNet layers have their own as well) and adds ``kernel_size x width`` numbers of
    state. Training and scoring only (no generation cache).
    """

    no_cache = "the recall models' short convolution has no generation cache"

    def __init__(self, mixer: nn.Module, width: int, kernel_size: int) -> None:
        super().__init__()
        self.mixer = mixer
        self.conv = nn.Conv1d(width, width, kernel_size, groups=width, padding=kernel_size - 1, bias=False)

    def mix(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        mixed = self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
        return self.mixer(x + mixed, cos, sin, mask)


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """GPT-2's initialisation of every linear and embedding weight (biases zero), the same for every mixer; the
    mixers' own parameters (Lattice's code maps and initial slots, FLA's decay parameters) keep their initialisers."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def state_numbers_per_head(mixer: Mixer, shape: ModelShape) -> int | None:
    """Recurrent state per head and layer in numbers (m x head size); None for attention, whose cache grows."""
    return shape.slots * shape.head_size if mixer.has_state else None
