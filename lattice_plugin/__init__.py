"""Lattice for litgpt: a recurrent token mixer with a fixed number of unit-norm memory slots (arXiv 2504.05646)."""

import importlib
from typing import Any

from lattice_plugin.errors import LatticeCacheError, LatticeConfigError, LatticeError

__version__ = "0.1.0"

# torch and litgpt load on first use of these names, so that `lattice --help` stays fast
_LAZY = {
    "lattice_attention": "lattice_plugin.ops",
    "lattice_step": "lattice_plugin.ops",
    "LatticeConfig": "lattice_plugin.config",
    "LatticeMixer": "lattice_plugin.model",
    "LatticeBlock": "lattice_plugin.model",
    "LatticeGPT": "lattice_plugin.model",
    "LoRALatticeConfig": "lattice_plugin.lora",
    "LoRALatticeGPT": "lattice_plugin.lora",
    "patch_litgpt": "lattice_plugin.patch",
}

__all__ = [
    "LatticeCacheError",
    "LatticeConfigError",
    "LatticeError",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lattice_plugin' has no attribute {name!r}")
