"""lm-eval for Lattice checkpoints: the registered ``lattice`` model, the plugin's offline tasks and the report.

Importing this package registers the model with lm-eval (after lm-eval's own models, which registering first would
hide). From Python::

    import lattice_plugin.evaluation  # registers "lattice"
    import lm_eval
    lm_eval.simple_evaluate(model="lattice", model_args={"checkpoint_dir": "out/ckpt"}, tasks=[...])

From the shell: ``lattice eval`` (runs everything offline and writes a report), or lm-eval's own command line through
``python -m lattice_plugin.evaluation`` (same flags as ``lm_eval``, with ``--model lattice`` available).
"""

from lattice_plugin.evaluation.data import SHIPPED_TASKS, TaskDataConfig, prepare_tasks
from lattice_plugin.evaluation.lm import LatticeLM

__all__ = ["SHIPPED_TASKS", "LatticeLM", "TaskDataConfig", "prepare_tasks"]
