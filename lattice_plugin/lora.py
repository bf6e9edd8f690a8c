"""LoRA variants of the Lattice classes, mirroring ``litgpt/lora.py``.

LoRA goes on the mixer's ``qkv`` and ``proj`` (the weights a converted layer reuses from attention), on the MLPs and
the head exactly as litgpt configures it; the new Lattice parameters stay frozen with the base weights.
"""

from dataclasses import dataclass

import torch.nn as nn
from litgpt import lora as litgpt_lora

from lattice_plugin.config import LatticeConfig
from lattice_plugin.model import LatticeBlock, LatticeGPT, LatticeMixer


@dataclass
class LoRALatticeConfig(LatticeConfig, litgpt_lora.Config):
    """The Lattice fields and litgpt's ``lora_*`` fields."""


class LoRALatticeMixer(LatticeMixer, litgpt_lora.CausalSelfAttention):
    """Lattice mixer whose ``qkv``/``proj`` are litgpt's LoRA layers (base keys map as in litgpt)."""


class LoRALatticeBlock(LatticeBlock, litgpt_lora.Block):
    mixer_class = LoRALatticeMixer


class LoRALatticeGPT(LatticeGPT, litgpt_lora.GPT):
    block_class = LoRALatticeBlock
    config_class = LoRALatticeConfig

    def _build_lm_head(self, config: LoRALatticeConfig) -> nn.Module:
        return litgpt_lora.create_lora_linear(
            config, config.n_embd, config.padded_vocab_size, bias=config.lm_head_bias, use_r=config.lora_head
        )
