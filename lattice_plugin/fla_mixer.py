"""flash-linear-attention's layers in litgpt's mixer slot: the peers `lattice bench --train` and `lattice recall`
compare Lattice against in the same model (training only, no generation cache).

Each layer gets the same recurrent state per head as a Lattice layer with ``m`` slots: ``m`` key dimensions by
``head_size`` value dimensions, ``n_head`` heads. The layers keep FLA's own defaults otherwise (GLA's low-rank gates
and output gate, DeltaNet's and Gated DeltaNet's short convolutions): they are compared as their authors ship them.
FLA's kernels are Triton kernels for CUDA, so the layers are only offered where a GPU is present.
"""

import functools
import importlib.util
from typing import Any

import torch
import torch.nn as nn

from lattice_plugin.errors import LatticeError

FLA_LAYERS = ("gla", "deltanet", "gated_deltanet")
NO_CACHE = "FLA layers in litgpt blocks are for training comparisons; they have no generation cache"


@functools.cache
def fla_missing_reason() -> str | None:
    """Why FLA's layers cannot run here (None: they can)."""
    if importlib.util.find_spec("fla") is None:
        return "flash-linear-attention is not installed (pip install -e '.[fla]')"
    if not torch.cuda.is_available():
        return "flash-linear-attention's kernels need a CUDA GPU"
    try:
        import fla.layers  # noqa: F401
    except Exception as error:  # any failure to import is the reason the rows are not run
        return f"flash-linear-attention does not import: {type(error).__name__}: {str(error)[:200]}"
    return None


def build_fla_layer(kind: str, hidden_size: int, n_head: int, head_size: int, slots: int, layer_idx: int) -> nn.Module:
    """FLA's ``kind`` layer with ``n_head`` heads of ``slots`` key by ``head_size`` value dimensions."""
    if kind in ("gla", "deltanet"):
        from fla.layers import DeltaNet, GatedLinearAttention

        return (GatedLinearAttention if kind == "gla" else DeltaNet)(
            mode="chunk",
            hidden_size=hidden_size,
            expand_k=n_head * slots / hidden_size,
            expand_v=n_head * head_size / hidden_size,
            num_heads=n_head,
            layer_idx=layer_idx,
        )
    if kind == "gated_deltanet":
        from fla.layers import GatedDeltaNet

        return GatedDeltaNet(
            mode="chunk",
            hidden_size=hidden_size,
            head_dim=slots,
            expand_v=head_size / slots,
            num_heads=n_head,
            layer_idx=layer_idx,
        )
    raise LatticeError(f"unknown FLA layer {kind!r}; choose one of {', '.join(FLA_LAYERS)}")


class TrainingOnlyMixer(nn.Module):
    """litgpt's mixer contract, ``forward(x, cos, sin, mask, input_pos, input_pos_maxp1)``, for a mixer that trains
    and scores whole sequences only: ``input_pos`` (cached decoding) and ``build_kv_cache`` are refused with
    ``no_cache``, and subclasses implement :meth:`mix`."""

    no_cache = "this mixer has no generation cache"

    def __init__(self) -> None:
        super().__init__()
        self.kv_cache = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        input_pos_maxp1: int | None = None,
    ) -> torch.Tensor:
        if input_pos is not None:
            raise LatticeError(self.no_cache)
        return self.mix(x, cos, sin, mask)

    def mix(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def build_kv_cache(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise LatticeError(self.no_cache)


class FLAMixer(TrainingOnlyMixer):
    """An FLA layer in litgpt's mixer slot. The layer mixes causally by itself and has no positional encoding of its
    own to receive (``cos``/``sin`` and the mask are ignored). Generation is not offered."""

    no_cache = NO_CACHE

    def __init__(self, kind: str, hidden_size: int, n_head: int, head_size: int, slots: int, block_idx: int) -> None:
        super().__init__()
        self.layer = build_fla_layer(kind, hidden_size, n_head, head_size, slots, block_idx)

    def mix(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.layer(x)[0]
