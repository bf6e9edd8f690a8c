"""Hugging Face input: litgpt's own HF -> litgpt conversion, run on a scratch directory (never on the user's source).

litgpt's ``convert_hf_checkpoint`` needs the name of one of its configs: it is taken from ``--model-name``, else the
directory name (litgpt's own convention), else ``_name_or_path`` in ``config.json``; the chosen config must agree
with ``config.json`` on the model's dimensions, so that a fine-tuned variant of another size is refused, not mangled.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from lattice_plugin.errors import LatticeError, first_line

HF_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.index.json")
# config.json key -> litgpt Config field, checked where config.json has the key
HF_DIMENSIONS = {
    "num_hidden_layers": "n_layer",
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "num_key_value_heads": "n_query_groups",
    "intermediate_size": "intermediate_size",
}


def detect_format(source_dir: Path) -> str:
    """``litgpt`` (model_config.yaml) or ``huggingface`` (config.json); anything else is refused."""
    if (source_dir / "model_config.yaml").is_file():
        return "litgpt"
    if (source_dir / "config.json").is_file():
        return "huggingface"
    raise LatticeError(
        f"{str(source_dir)!r} has no model_config.yaml (litgpt checkpoint) or config.json (Hugging Face checkpoint)"
    )


def read_hf_config(source_dir: Path) -> dict:
    path = source_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LatticeError(f"cannot read {str(path)!r}: {error}") from None
    if not isinstance(config, dict):
        raise LatticeError(f"{str(path)!r} does not hold a Hugging Face model config")
    return config


def resolve_model_name(source_dir: Path, model_name: str | None = None) -> str:
    """The litgpt config name for a Hugging Face checkpoint, refused when litgpt does not know the architecture."""
    from litgpt.config import Config

    hf_config = read_hf_config(source_dir)
    if model_name is not None:
        candidates = [model_name]
    else:
        name_or_path = str(hf_config.get("_name_or_path") or "")
        candidates = [source_dir.resolve().name, name_or_path, name_or_path.rstrip("/").rsplit("/", 1)[-1]]
    mismatches = []
    for name in dict.fromkeys(candidate for candidate in candidates if candidate):
        try:
            config = Config.from_name(name)
        except ValueError:
            continue
        mismatch = _dimension_mismatch(hf_config, config, name, source_dir)
        if mismatch is None:
            return config.name
        mismatches.append(mismatch)
    if mismatches:
        raise LatticeError(mismatches[0])
    architecture = ", ".join(hf_config.get("architectures") or []) or hf_config.get("model_type") or "unknown"
    if model_name is not None:
        raise LatticeError(f"litgpt has no config named {model_name!r} (`litgpt download list` shows the known ones)")
    raise LatticeError(
        f"litgpt does not know the architecture of {str(source_dir)!r} ({architecture}): no litgpt config is named "
        f"{source_dir.resolve().name!r}{' or ' + repr(candidates[1]) if candidates[1] else ''}; pass --model-name with "
        "the litgpt config this checkpoint uses"
    )


def _dimension_mismatch(hf_config: dict, config: object, name: str, source_dir: Path) -> str | None:
    for hf_key, field in HF_DIMENSIONS.items():
        if hf_config.get(hf_key) is not None and hf_config[hf_key] != getattr(config, field):
            return (
                f"{str(source_dir)!r} does not match litgpt's config {name!r}: config.json has {hf_key}="
                f"{hf_config[hf_key]}, {name!r} has {field}={getattr(config, field)}; pass the right --model-name"
            )
    return None


def weight_files(source_dir: Path) -> list[Path]:
    files = sorted({path for pattern in HF_WEIGHT_PATTERNS for path in source_dir.glob(pattern) if path.is_file()})
    files = [path for path in files if path.name != "training_args.bin"]
    if not any(path.suffix in (".safetensors", ".bin") for path in files):
        raise LatticeError(f"{str(source_dir)!r} has config.json but no weights (*.safetensors or *.bin)")
    return files


def source_files(source_dir: Path) -> list[Path]:
    """The files that define a Hugging Face checkpoint (hashed into the conversion record)."""
    return [source_dir / "config.json", *weight_files(source_dir)]


def import_checkpoint(source_dir: Path, work_dir: Path, model_name: str) -> Path:
    """Run litgpt's HF -> litgpt conversion in ``work_dir`` (the source's files are linked there, not modified);
    returns ``work_dir`` holding ``model_config.yaml`` and ``lit_model.pth``."""
    from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint

    work_dir.mkdir(parents=True)
    for path in [source_dir / "config.json", *weight_files(source_dir)]:
        (work_dir / path.name).symlink_to(path.resolve())
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # litgpt prints its arguments; keep the CLI's lines clean
            convert_hf_checkpoint(checkpoint_dir=work_dir, model_name=model_name)
    except Exception as error:
        raise LatticeError(
            f"litgpt could not convert the Hugging Face checkpoint {str(source_dir)!r} as {model_name!r}: {first_line(error)}"
        ) from None
    return work_dir
