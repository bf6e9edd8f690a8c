"""What a checkpoint is made of: its layer layout, parameter counts, and the memory its generation cache needs.

Cache sizes are read off the real cache modules (built on the meta device, so nothing is allocated): the Lattice
layers' fixed float32 states and the attention layers' KV caches, against the same model with attention everywhere.
"""

from dataclasses import dataclass, replace

import torch

from lattice_plugin.config import LatticeConfig
from lattice_plugin.model import LatticeGPT, LatticeMixer


@dataclass
class LayerInfo:
    index: int
    mixer: str  # "lattice" or "attention"
    parameters: int
    mixer_parameters: int


def build_meta_model(config: LatticeConfig) -> LatticeGPT:
    with torch.device("meta"):
        return LatticeGPT(config)


def layer_layout(model: LatticeGPT) -> list[LayerInfo]:
    return [
        LayerInfo(
            index=index,
            mixer="lattice" if isinstance(block.attn, LatticeMixer) else "attention",
            parameters=sum(p.numel() for p in block.parameters()),
            mixer_parameters=sum(p.numel() for p in block.attn.parameters()),
        )
        for index, block in enumerate(model.transformer.h)
    ]


def cache_bytes(
    model: LatticeGPT, context_length: int, batch_size: int = 1, dtype: torch.dtype = torch.bfloat16
) -> int:
    """Bytes of every layer's generation cache for ``batch_size`` sequences of ``context_length`` tokens (the
    attention mask litgpt keeps beside the KV caches is not counted)."""
    model.set_kv_cache(batch_size, max_seq_length=context_length, device=torch.device("meta"), dtype=dtype)
    total = sum(
        buffer.numel() * buffer.element_size()
        for block in model.transformer.h
        for buffer in block.attn.kv_cache.buffers()
    )
    model.clear_kv_cache()
    return total


def attention_only(config: LatticeConfig) -> LatticeConfig:
    """The same model with softmax attention on every layer (what the Lattice layers replaced)."""
    return replace(config, lattice_layers=None)


def default_context_lengths(block_size: int) -> list[int]:
    """Typical context lengths the model can run (below its block size), then the block size itself."""
    return [length for length in (2048, 32768, 131072) if length < block_size] + [block_size]


def compare_sizes(ours: int, theirs: int) -> str:
    """This model's cache against attention everywhere, in words ("same" when no layer changed)."""
    if ours == theirs:
        return "same"
    return f"{theirs / ours:.1f}x smaller" if ours < theirs else f"{ours / theirs:.1f}x larger"


def format_bytes(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError
