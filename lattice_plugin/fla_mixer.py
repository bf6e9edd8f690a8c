"""flash-linear-attention's token mixers in litgpt blocks: the peers ``lattice bench --train`` measures Lattice
against, in the same model with everything else equal (optional ``fla`` extra; training only, no cache)."""

import torch
import torch.nn as nn
from litgpt import Config

from lattice_plugin.errors import LatticeError

FLA_MIXERS = ("fla_gla", "fla_deltanet")


class FlaMixer(nn.Module):
    """litgpt attention's call contract around an ``fla.layers`` module (which brings its own projections)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, cos, sin, mask=None, input_pos=None, input_pos_maxp1=None) -> torch.Tensor:
        if input_pos is not None:
            raise LatticeError("the FLA comparators are for training only: no generation cache")
        return self.layer(x)[0]


def fla_mixer(kind: str, config: Config, layer_idx: int) -> FlaMixer:
    """A GatedLinearAttention or DeltaNet layer with the model's width, heads and head size for keys and values."""
    try:
        from fla.layers import DeltaNet, GatedLinearAttention
    except ImportError:
        raise LatticeError("the FLA comparators need flash-linear-attention (the 'fla' extra)") from None
    expand = config.n_head * config.head_size / config.n_embd
    if kind == "fla_gla":
        layer = GatedLinearAttention(
            mode="chunk",
            hidden_size=config.n_embd,
            expand_k=expand,
            expand_v=expand,
            num_heads=config.n_head,
            layer_idx=layer_idx,
        )
    elif kind == "fla_deltanet":
        layer = DeltaNet(
            mode="chunk",
            hidden_size=config.n_embd,
            expand_k=expand,
            expand_v=expand,
            num_heads=config.n_head,
            layer_idx=layer_idx,
        )
    else:
        raise LatticeError(f"unknown FLA mixer {kind!r}; choose one of {', '.join(FLA_MIXERS)}")
    return FlaMixer(layer)


def use_fla_mixers(model: nn.Module, kind: str) -> nn.Module:
    """Replace every block's attention of a litgpt ``GPT`` by ``kind``; returns the model."""
    for index, block in enumerate(model.transformer.h):
        block.attn = fla_mixer(kind, model.config, index)
    return model
