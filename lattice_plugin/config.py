"""``LatticeConfig``: litgpt's Config plus the fields that choose and shape the Lattice layers.

With no Lattice layers (the default) it builds exactly litgpt's model, so a plain litgpt ``model_config.yaml`` read
through the plugin still gives a plain transformer. Every Lattice field is checked when the config is built.
"""

import re
from dataclasses import dataclass

from litgpt.config import Config

from lattice_plugin.errors import LatticeConfigError
from lattice_plugin.vocab import BACKENDS, FEATURE_MAPS, GATE_MODES, Backend, FeatureMap, GateMode

LAYER_SPEC_HELP = (
    "'all', 'none', a list of layer indices (negative counts from the end), 'first:N', 'last:N', "
    "'every:K' (Lattice on every K-th layer: K-1, 2K-1, ...) or 'attention_every:K' (attention on every K-th "
    "layer, Lattice elsewhere)"
)


def parse_layer_spec(spec: str | list[int] | tuple[int, ...] | None, n_layer: int) -> list[int]:
    """Resolve a layer selection to sorted, unique layer indices in ``range(n_layer)``."""
    if spec is None:
        return []
    if isinstance(spec, (list, tuple)):
        indices = []
        for index in spec:
            if isinstance(index, bool) or not isinstance(index, int):
                raise LatticeConfigError(f"lattice_layers must hold integer layer indices, got {index!r}")
            if not -n_layer <= index < n_layer:
                raise LatticeConfigError(
                    f"lattice_layers index {index} is out of range for a model with {n_layer} layers"
                )
            indices.append(index % n_layer)
        return sorted(set(indices))
    if not isinstance(spec, str):
        raise LatticeConfigError(f"lattice_layers must be {LAYER_SPEC_HELP}; got {spec!r}")
    text = spec.strip().lower()
    if text == "all":
        return list(range(n_layer))
    if text in ("none", ""):
        return []
    if re.fullmatch(r"-?\d+(\s*,\s*-?\d+)*", text):
        return parse_layer_spec([int(part) for part in text.split(",")], n_layer)
    match = re.fullmatch(r"(first|last|every|attention_every):(\d+)", text)
    if match is None:
        raise LatticeConfigError(f"lattice_layers must be {LAYER_SPEC_HELP}; got {spec!r}")
    kind, number = match.group(1), int(match.group(2))
    if number < 1 or (kind in ("first", "last") and number > n_layer):
        raise LatticeConfigError(f"lattice_layers {spec!r}: {number} is out of range for {n_layer} layers")
    if kind == "first":
        return list(range(number))
    if kind == "last":
        return list(range(n_layer - number, n_layer))
    every_kth = {i for i in range(n_layer) if (i + 1) % number == 0}
    if kind == "every":
        return sorted(every_kth)
    return [i for i in range(n_layer) if i not in every_kth]


@dataclass
class LatticeConfig(Config):
    """litgpt's Config with the Lattice fields (docs/math.md §2, §6).

    Args:
        lattice_layers: which layers use the Lattice mixer instead of attention (see ``LAYER_SPEC_HELP``); stored
            resolved to explicit indices so that ``model_config.yaml`` is unambiguous.
        lattice_slots: memory slots ``m`` per key/value head (default: the head size).
        lattice_chunk_size: tokens per chunk of the chunkwise algorithm.
        lattice_feature_map: non-linearity of the read/write codes; all keep ``|beta * k| < 1``.
        lattice_gates: ``exact`` (the recurrence) or ``chunk`` (gates frozen per chunk, the paper's approximation).
        lattice_orthogonal: write only what a slot does not already hold (False: additive write; an ablation).
        lattice_normalize: keep slots on the unit sphere (False: no retraction; an ablation).
        lattice_output_gate: multiply the normalised output by ``sigmoid(W_g x)`` before the output projection.
        lattice_rope: apply RoPE to the query/key projections before the feature maps.
        lattice_backend: kernel backend of :func:`lattice_plugin.ops.lattice_attention`.
    """

    lattice_layers: str | list[int] | None = None
    lattice_slots: int | None = None
    lattice_chunk_size: int = 64
    lattice_feature_map: FeatureMap = "softmax"
    lattice_gates: GateMode = "exact"
    lattice_orthogonal: bool = True
    lattice_normalize: bool = True
    lattice_output_gate: bool = False
    lattice_rope: bool = True
    lattice_backend: Backend = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lattice_layers = parse_layer_spec(self.lattice_layers, self.n_layer)
        if not self.lattice_layers:
            return
        if self.lattice_slots is None:
            self.lattice_slots = self.head_size
        _require(
            isinstance(self.lattice_slots, int) and self.lattice_slots >= 1,
            f"lattice_slots (m) must be an integer >= 1, got {self.lattice_slots!r}",
        )
        _require(
            isinstance(self.lattice_chunk_size, int) and self.lattice_chunk_size >= 1,
            f"lattice_chunk_size must be an integer >= 1, got {self.lattice_chunk_size!r}",
        )
        _require_choice("lattice_feature_map", self.lattice_feature_map, FEATURE_MAPS)
        _require_choice("lattice_gates", self.lattice_gates, GATE_MODES)
        _require_choice("lattice_backend", self.lattice_backend, BACKENDS)
        _require(
            not (self.lattice_backend == "recurrent" and self.lattice_gates == "chunk"),
            "lattice_gates='chunk' needs a chunked backend ('auto', 'torch' or 'triton'), not 'recurrent'",
        )
        _require(
            self.latent_attention is None,
            "multi-head latent attention cannot be replaced by Lattice layers (lattice_layers must be empty)",
        )

    def is_lattice_layer(self, block_idx: int) -> bool:
        return block_idx in self.lattice_layers


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise LatticeConfigError(message)


def _require_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"{name} must be one of {', '.join(choices)}; got {value!r}")
