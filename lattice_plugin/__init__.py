"""Lattice for litgpt: a recurrent token mixer with a fixed number of unit-norm memory slots (arXiv 2504.05646)."""

from lattice_plugin.errors import LatticeCacheError, LatticeConfigError, LatticeError
from lattice_plugin.ops import lattice_attention, lattice_step

__version__ = "0.1.0"

__all__ = [
    "LatticeCacheError",
    "LatticeConfigError",
    "LatticeError",
    "lattice_attention",
    "lattice_step",
]
