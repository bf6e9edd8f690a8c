"""lm-eval's own command line with the ``lattice`` model registered (lm-eval has no plugin entry point for models).

    lattice eval-data out/eval-tasks
    python -m lattice_plugin.evaluation --model lattice --model_args checkpoint_dir=out/ckpt,dtype=float32 \\
        --include_path out/eval-tasks/tasks --tasks lattice_suite --batch_size 8 --output_path out/lm-eval

Every flag is lm-eval's. Hugging Face hub and datasets run offline unless HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are
already set in the environment.
"""

import os
import sys


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.__main__ import cli_evaluate

    import lattice_plugin.evaluation.lm  # noqa: F401  (registers "lattice" after lm-eval's own models)
    from lattice_plugin.errors import LatticeError

    try:
        cli_evaluate()
    except LatticeError as error:
        print(f"lattice: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
