"""Reading and writing checkpoint directories.

A Lattice checkpoint directory is a litgpt checkpoint directory whose weights may be ``model.safetensors`` instead of
``lit_model.pth``. Weights are read from either (``.pth`` always with ``weights_only=True``) in any of litgpt's
layouts; directories are written to a temporary sibling and renamed into place only when complete.
"""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from lattice_plugin.errors import LatticeError, first_line

if TYPE_CHECKING:
    from lattice_plugin.config import LatticeConfig
    from lattice_plugin.model import LatticeGPT

WEIGHT_FILES = ("model.safetensors", "lit_model.pth")
COMPILE_PREFIX = "_orig_mod."


def find_weights(checkpoint_dir: Path) -> Path:
    """The weights file of a checkpoint directory (``model.safetensors`` first, then ``lit_model.pth``).

    A directory made by ``litgpt download`` holds the Hugging Face ``model.safetensors`` (HF tensor names) beside the
    converted ``lit_model.pth``: there the litgpt file is the one that matches ``model_config.yaml``.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise LatticeError(f"checkpoint directory {str(checkpoint_dir)!r} does not exist")
    for name in WEIGHT_FILES:
        path = checkpoint_dir / name
        if path.is_file():
            if name == "model.safetensors" and (checkpoint_dir / "lit_model.pth").is_file() and _hf_names(path):
                continue
            return path
    raise LatticeError(f"{str(checkpoint_dir)!r} holds no weights (expected one of {', '.join(WEIGHT_FILES)})")


def _hf_names(path: Path) -> bool:
    """Whether a safetensors file holds Hugging Face tensor names rather than litgpt's (read from its header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            return "transformer.wte.weight" not in file.keys()  # every litgpt model has this embedding
    except (OSError, SafetensorError):
        return False


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Model weights from a ``.safetensors`` or ``.pth`` file: a flat state dict, litgpt's ``{"model": ...}`` or a
    pretraining state (``_orig_mod.`` prefixes of a compiled model are removed)."""
    import pickle

    from safetensors import SafetensorError

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
        else:
            state_dict = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as error:
        raise LatticeError(f"cannot read weights from {str(path)!r}: {first_line(error)}") from None
    if isinstance(state_dict, dict) and isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise LatticeError(f"{str(path)!r} does not hold a model state dict")
    return {key.replace(COMPILE_PREFIX, ""): value for key, value in state_dict.items()}


def save_safetensors(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Write weights as safetensors (contiguous, untied copies, as the format requires)."""
    from safetensors.torch import save_file

    save_file({key: value.detach().contiguous().clone() for key, value in state_dict.items()}, str(path))
    os.chmod(path, 0o666 & ~_umask())  # safetensors creates the file owner-only; use the mode open() would give


@contextlib.contextmanager
def atomic_directory(out_dir: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out_dir`` only if the block completes.

    An existing ``out_dir`` is refused unless ``force``; with ``force`` it is replaced only after the new one is
    complete. On any error the temporary directory is removed and ``out_dir`` is left as it was.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise LatticeError(f"{str(out_dir)!r} already exists; pass --force to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        os.chmod(tmp_dir, 0o777 & ~_umask())  # mkdtemp makes it owner-only; the result should be like mkdir's
        yield tmp_dir
        if out_dir.exists():
            old_dir = out_dir.with_name(f".{out_dir.name}.old-{tmp_dir.name}")
            out_dir.rename(old_dir)
            tmp_dir.rename(out_dir)
            shutil.rmtree(old_dir)
        else:
            tmp_dir.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def load_config(checkpoint_dir: Path, **overrides: Any) -> "LatticeConfig":
    """The model config of a checkpoint directory (Lattice, hybrid, or a plain litgpt transformer)."""
    from lattice_plugin.config import LatticeConfig

    config_file = Path(checkpoint_dir) / "model_config.yaml"
    if not config_file.is_file():
        raise LatticeError(f"{str(checkpoint_dir)!r} is not a checkpoint directory: model_config.yaml is missing")
    try:
        return LatticeConfig.from_file(config_file, **overrides)
    except LatticeError:
        raise
    except (TypeError, ValueError, AssertionError, OSError, yaml.YAMLError) as error:
        raise LatticeError(f"cannot read {str(config_file)!r}: {first_line(error)}") from None


def load_model(
    checkpoint_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> "LatticeGPT":
    """Build the model of a checkpoint directory and load its weights (strictly: every key, every shape)."""
    from lattice_plugin.model import LatticeGPT

    config = load_config(checkpoint_dir)
    state_dict = load_state_dict(find_weights(checkpoint_dir))
    with torch.device("meta"):
        model = LatticeGPT(config)
    check_state_dict(model, state_dict, source=checkpoint_dir)
    model.load_state_dict(state_dict, assign=True)
    model.cos, model.sin = model.rope_cache()  # the RoPE cache was built on the meta device
    return model.to(device=device, dtype=dtype).eval()


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse weights that do not match the model's config, naming the first differences."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
    if wrong:
        key = wrong[0]
        problems.append(f"shape of {key} is {tuple(state_dict[key].shape)}, the config needs {expected[key]}")
    if problems:
        raise LatticeError(f"weights in {str(source)!r} do not match model_config.yaml: {'; '.join(problems)}")


def atomic_write(path: Path, payload: str | bytes) -> None:
    """Write a file through a temporary sibling renamed into place (text as UTF-8), with open()'s permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload.encode("utf-8") if isinstance(payload, str) else payload)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file owner-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
