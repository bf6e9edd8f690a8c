"""Lattice kernels (installed as ``lattice_plugin.kernels``): each fast kernel sits beside its PyTorch reference."""
