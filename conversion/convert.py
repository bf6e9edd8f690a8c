"""Attention -> Lattice surgery on a litgpt checkpoint (docs/math.md §6).

The Lattice mixer keeps litgpt's fused ``qkv`` and ``proj`` under the same names, so a converted layer reuses the
attention weights as they are (bit-for-bit, GQA layout included); only the mixer's new modules (code maps, beta,
initial slots, output norm, optional output gate) are created, by their own ``reset_parameters`` (identity code
maps when ``m`` equals the head size). Everything else in the state dict is copied unchanged.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import platform
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from lattice_plugin.checkpoint import (
    atomic_directory,
    check_state_dict,
    describe_stale,
    find_weights,
    load_config,
    load_state_dict,
    remove_stale_temporaries,
    save_safetensors,
    tensor_bytes,
)
from lattice_plugin.config import LatticeConfig, parse_layer_spec
from lattice_plugin.errors import LatticeError
from lattice_plugin.vocab import FEATURE_MAPS, GATE_MODES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "prompt_style.yaml",
)
WEIGHTS_FILE = "model.safetensors"
RECORD_FILE = "conversion.json"

Log = Callable[[str], None]


@dataclasses.dataclass
class ConversionOptions:
    """What to convert and how; stored verbatim in the conversion record.

    Args:
        layers: layers that become Lattice (a ``parse_layer_spec`` spec); None means all, unless ``keep_attention``.
        keep_attention: layers that stay softmax attention, every other layer becomes Lattice (excludes ``layers``).
        slots: memory slots ``m`` per key/value head (default: the head size).
        feature_map, gates, output_gate: the Lattice fields of the same name (see ``LatticeConfig``).
        dtype: output dtype name (``float32``, ``bfloat16``, ``float16``); None keeps the source's.
        seed: seed of the randomly initialised new parameters (beta projection, initial slots, output gate).
        model_name: Hugging Face input only: the litgpt config name of the architecture.
    """

    layers: str | list[int] | None = None
    keep_attention: str | list[int] | None = None
    slots: int | None = None
    feature_map: str = "softmax"
    gates: str = "exact"
    output_gate: bool = False
    dtype: str | None = None
    seed: int = 0
    model_name: str | None = None


def select_layers(
    n_layer: int, layers: str | list[int] | None = None, keep_attention: str | list[int] | None = None
) -> list[int]:
    """The layer indices to convert: ``layers`` (default all), or every layer but ``keep_attention``."""
    if layers is not None and keep_attention is not None:
        raise LatticeError("pass either --layers or --keep-attention, not both")
    if keep_attention is not None:
        kept = set(parse_layer_spec(keep_attention, n_layer))
        return [i for i in range(n_layer) if i not in kept]
    return parse_layer_spec("all" if layers is None else layers, n_layer)


def check_convertible(config: LatticeConfig, source: Path) -> None:
    """Refuse architectures whose attention the Lattice mixer cannot take the place of."""
    if config.latent_attention is not None:
        raise LatticeError(
            f"{str(source)!r} uses multi-head latent attention, which the Lattice mixer cannot replace "
            "(it reuses a fused qkv projection)"
        )
    if config.lattice_layers:
        raise LatticeError(
            f"{str(source)!r} already has Lattice layers {config.lattice_layers}; convert its attention source instead"
        )


def target_config(source: LatticeConfig, layers: list[int], options: ConversionOptions) -> LatticeConfig:
    """The source config with the Lattice fields set (every other field unchanged)."""
    slots = options.slots
    if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
        raise LatticeError(f"slots (m) must be an integer >= 1, got {options.slots!r}")
    if options.feature_map not in FEATURE_MAPS:
        raise LatticeError(f"feature map must be one of {', '.join(FEATURE_MAPS)}; got {options.feature_map!r}")
    if options.gates not in GATE_MODES:
        raise LatticeError(f"gates must be one of {', '.join(GATE_MODES)}; got {options.gates!r}")
    fields = dataclasses.asdict(source)
    fields.update(
        lattice_layers=list(layers),
        lattice_slots=options.slots if layers else None,
        lattice_feature_map=options.feature_map,
        lattice_gates=options.gates,
        lattice_output_gate=options.output_gate,
        lattice_rope=True,  # docs/math.md §6: RoPE is kept on q and k
    )
    return type(source)(**fields)


def output_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise LatticeError(f"dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def check_source_weights(config: LatticeConfig, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse source weights whose names or shapes do not match the source config (on the meta device: no memory)."""
    from lattice_plugin.model import LatticeGPT

    with torch.device("meta"):
        model = LatticeGPT(config)
    check_state_dict(model, state_dict, source=source)


def convert_state_dict(
    state_dict: dict[str, torch.Tensor],
    target: LatticeConfig,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The converted model's weights: source tensors reused as they are (cast only if ``dtype`` differs), the new
    mixer modules of the converted layers created by their own ``reset_parameters`` under ``seed``.

    New parameters take ``dtype``, or else the dtype of their layer's source ``qkv`` weight.
    """
    from lattice_plugin.model import LatticeGPT

    with torch.device("meta"):
        model = LatticeGPT(target)
    expected = model.state_dict(keep_vars=True)
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise LatticeError(f"source weights the converted model has no place for: {', '.join(unexpected[:3])}")
    new: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for index in target.lattice_layers:
            prefix = f"transformer.h.{index}.attn."
            new_dtype = dtype or state_dict[prefix + "qkv.weight"].dtype
            for name, child in model.transformer.h[index].attn.named_children():
                keys = [f"{prefix}{name}.{key}" for key in child.state_dict()]
                reused = [key for key in keys if key in state_dict]
                if not keys or len(reused) == len(keys):
                    continue
                if reused:
                    raise LatticeError(f"cannot convert: {prefix}{name} is partly in the source weights ({reused[0]})")
                child.to_empty(device="cpu")
                child.reset_parameters()
                for key, value in child.state_dict().items():
                    new[f"{prefix}{name}.{key}"] = value.detach().to(new_dtype)
    missing = [key for key in expected if key not in state_dict and key not in new]
    if missing:
        raise LatticeError(f"cannot convert: no initialisation for {', '.join(missing[:3])}")
    converted = {}
    for key in expected:
        value = state_dict[key] if key in state_dict else new[key]
        if dtype is not None and value.is_floating_point() and value.dtype != dtype:
            value = value.to(dtype)
        converted[key] = value
    return converted


def sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _check_paths(source_dir: Path, out_dir: Path, force: bool) -> None:
    if not source_dir.is_dir():
        raise LatticeError(f"source directory {str(source_dir)!r} does not exist or is not a directory")
    try:
        next(source_dir.iterdir(), None)
    except OSError as error:
        raise LatticeError(f"cannot read source directory {str(source_dir)!r}: {error.strerror}") from None
    source, out = source_dir.resolve(), out_dir.resolve()
    if out == source or source in out.parents:
        raise LatticeError(f"output {str(out_dir)!r} is inside the source directory {str(source_dir)!r}")
    if out in source.parents:
        raise LatticeError(f"output {str(out_dir)!r} contains the source directory {str(source_dir)!r}")
    if out_dir.exists() and not force:
        raise LatticeError(f"{str(out_dir)!r} already exists; pass --force to replace it")


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import lattice_plugin

    return {
        "lattice_plugin": lattice_plugin.__version__,
        "torch": torch.__version__,
        "litgpt": version("litgpt"),
        "python": platform.python_version(),
    }


def convert_checkpoint(
    source_dir: Path,
    out_dir: Path,
    options: ConversionOptions | None = None,
    force: bool = False,
    allow_empty: bool = False,
    log: Log = lambda message: None,
) -> Path:
    """Convert a litgpt (or Hugging Face) checkpoint directory into a Lattice checkpoint directory.

    Every refusal happens before anything is written; the output is assembled in a temporary sibling directory and
    renamed into place only when complete. ``allow_empty`` permits converting zero layers (a plain copy into the
    Lattice checkpoint format; the CLI refuses an empty selection).
    """
    from lattice_plugin.conversion import hf
    from litgpt.utils import save_config

    options = options or ConversionOptions()
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    _check_paths(source_dir, out_dir, force)
    source_format = hf.detect_format(source_dir)
    if source_format == "huggingface":
        model_name = hf.resolve_model_name(source_dir, options.model_name)
        config = LatticeConfig.from_name(model_name)
        source_files = hf.source_files(source_dir)
        weights_path = None
    else:
        if options.model_name is not None:
            raise LatticeError("--model-name is for Hugging Face checkpoints only; the source has model_config.yaml")
        model_name = None
        config = load_config(source_dir)
        weights_path = find_weights(source_dir)
        source_files = [source_dir / "model_config.yaml", weights_path]
    check_convertible(config, source_dir)
    layers = select_layers(config.n_layer, options.layers, options.keep_attention)
    if not layers and not allow_empty:
        raise LatticeError(f"the layer selection converts no layer of the {config.n_layer}; select at least one")
    target = target_config(config, layers, options)
    dtype = output_dtype(options.dtype)
    state_dict = None
    if weights_path is not None:  # read and check before anything is written
        log(f"reading {weights_path}")
        state_dict = load_state_dict(weights_path)
        check_source_weights(config, state_dict, weights_path)
    tokenizer_files = [source_dir / name for name in TOKENIZER_FILES if (source_dir / name).is_file()]
    if not any(path.name in ("tokenizer.json", "tokenizer.model") for path in tokenizer_files):
        log(f"warning: {source_dir} has no tokenizer.json or tokenizer.model; the output will have no tokenizer")
    log(f"hashing {len(source_files) + len(tokenizer_files)} source files")
    try:
        hashes = {path.name: sha256(path) for path in [*source_files, *tokenizer_files]}
    except OSError as error:
        raise LatticeError(f"cannot read {error.filename!r}: {error.strerror}") from None

    converted = None
    if state_dict is not None:  # in memory: what will be written, and its size, are known before writing
        converted = convert_state_dict(state_dict, target, dtype=dtype, seed=options.seed)
        del state_dict
    needed = None if converted is None else tensor_bytes(converted) + sum(p.stat().st_size for p in tokenizer_files)
    stale = describe_stale(*remove_stale_temporaries(out_dir.parent))
    if stale:
        log(stale)
    with atomic_directory(out_dir, force=force, needed_bytes=needed) as tmp_dir:
        if converted is None:
            log(f"importing the Hugging Face checkpoint with litgpt (config {model_name!r})")
            import_dir = hf.import_checkpoint(source_dir, tmp_dir / ".hf-import", model_name)
            state_dict = load_state_dict(import_dir / "lit_model.pth")
            check_source_weights(config, state_dict, source_dir)
            converted = convert_state_dict(state_dict, target, dtype=dtype, seed=options.seed)
            del state_dict
        log(
            f"converted layers {layers} of {config.n_layer} to Lattice "
            f"(m={target.lattice_slots}, feature map {target.lattice_feature_map}, gates {target.lattice_gates})"
        )
        log(f"writing {out_dir / WEIGHTS_FILE}")
        save_safetensors(converted, tmp_dir / WEIGHTS_FILE)
        del converted
        shutil.rmtree(tmp_dir / ".hf-import", ignore_errors=True)
        save_config(target, tmp_dir)
        for path in tokenizer_files:
            shutil.copy2(path, tmp_dir / path.name)
        record = {
            "source": str(source_dir.resolve()),
            "source_format": source_format,
            "litgpt_model_name": model_name,
            "options": dataclasses.asdict(options),
            "lattice_layers": target.lattice_layers,
            "attention_layers": [i for i in range(target.n_layer) if i not in target.lattice_layers],
            "lattice_slots": target.lattice_slots,
            "source_files_sha256": hashes,
            "versions": _versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp_dir / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {out_dir}")
    return out_dir
