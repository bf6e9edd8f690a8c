"""Tiny checkpoints for the evaluation tests: a small BPE tokenizer trained on one shipped file, and litgpt-style
checkpoint directories (model_config.yaml + model.safetensors + tokenizer files) of Lattice, hybrid and plain
transformer models built from the same tiny config."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from litgpt.utils import save_config

from conftest import TINY_MODEL
from lattice_plugin.checkpoint import save_safetensors
from lattice_plugin.config import LatticeConfig
from lattice_plugin.corpus import shipped_corpus, train_tokenizer
from lattice_plugin.model import LatticeGPT

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def make_tokenizer(out_dir: Path, vocab_size: int = 400) -> Path:
    return train_tokenizer([shipped_corpus() / "train" / "fortunes-00.txt"], out_dir, vocab_size=vocab_size)


def tiny_config(vocab_size: int = 400, lattice_layers: str | None = "all", **overrides) -> LatticeConfig:
    options = {
        **TINY_MODEL,
        "name": "tiny-eval",
        "block_size": 256,
        "vocab_size": vocab_size,
        "padding_multiple": 16,
        "n_layer": 2,
        "n_head": 2,
        "n_query_groups": 1,
        "lattice_layers": lattice_layers,
        "lattice_chunk_size": 16,
    }
    options.update(overrides)
    return LatticeConfig(**options)


def save_checkpoint(model: LatticeGPT, tokenizer_dir: Path, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(model.config, out_dir)
    save_safetensors(model.state_dict(), out_dir / "model.safetensors")
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_dir) / name, out_dir / name)
    return out_dir


def make_checkpoint(
    out_dir: Path, tokenizer_dir: Path, lattice_layers: str | None = "all", seed: int = 0, **overrides
) -> Path:
    torch.manual_seed(seed)
    model = LatticeGPT(tiny_config(lattice_layers=lattice_layers, **overrides))
    return save_checkpoint(model, tokenizer_dir, out_dir)
