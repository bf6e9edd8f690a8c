"""The names a user can choose for the Lattice layer, defined once (no heavy imports: the CLI's help reads them).

Each vocabulary is a ``Literal`` type (for annotations, which jsonargparse turns into choices) and the tuple of its
values (for validation and messages).
"""

from typing import Literal, get_args

Backend = Literal["auto", "recurrent", "torch", "triton"]
GateMode = Literal["exact", "chunk"]
FeatureMap = Literal["softmax", "sigmoid", "tanh", "l2"]
GateSolver = Literal["auto", "scan", "fixed_point"]

BACKENDS: tuple[str, ...] = get_args(Backend)
GATE_MODES: tuple[str, ...] = get_args(GateMode)
FEATURE_MAPS: tuple[str, ...] = get_args(FeatureMap)
GATE_SOLVERS: tuple[str, ...] = get_args(GateSolver)


def one_of(choices: tuple[str, ...]) -> str:
    """``"a, b or c"``: a vocabulary in a sentence (help texts and error messages)."""
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]
