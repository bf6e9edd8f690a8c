"""Checkpoint surgery (installed as ``lattice_plugin.conversion``): attention layers become Lattice layers."""
