"""``lattice distill``: recover a converted checkpoint's quality from its attention teacher.

Stage 1 (attention transfer) trains only the new Lattice parameters so that every converted layer reproduces the
output of the attention it replaced (MSE, all layers at once). Stage 2 distills the teacher's next-token distribution
into the whole student (KL at a temperature, plus optional cross-entropy), fully or with LoRA. Both stages run under
Lightning Fabric on one or many devices, write resumable checkpoints, and end in a report of held-out perplexity, cache
size and decode speed.
"""

from lattice_plugin.distill.args import DistillConfig, parse

__all__ = ["DistillConfig", "parse"]
