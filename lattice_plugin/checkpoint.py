"""Reading and writing checkpoint directories.

A Lattice checkpoint directory is a litgpt checkpoint directory whose weights may be ``model.safetensors`` instead of
``lit_model.pth``. Weights are read from either (``.pth`` always with ``weights_only=True``) in any of litgpt's
layouts; directories are written to a temporary sibling and renamed into place only when complete.

Temporary names carry the writer's host and process id (``.NAME.HOST-PID.RANDOM.tmp``), so that what a killed process
left behind can be told from what a running one is still writing (:func:`remove_stale_temporaries`). Running out of
space or permission while writing is one :class:`LatticeError` line naming the path (and the bytes needed if known).
"""

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
import zipfile
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
            # mmap needs torch's zip format; an older (pre-1.6) file is read whole, still with weights_only
            mmap = zipfile.is_zipfile(path)
            state_dict = torch.load(str(path), map_location="cpu", mmap=mmap, weights_only=True)
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
def atomic_directory(out_dir: Path, force: bool = False, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out_dir`` only if the block completes.

    An existing ``out_dir`` is refused unless ``force``; with ``force`` it is replaced only after the new one is
    complete. ``needed_bytes`` (the size of what the block will write, when known) is checked against the free space
    first. On any error the temporary directory is removed and ``out_dir`` is left as it was; a full disk or a
    missing permission becomes a :class:`LatticeError`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise LatticeError(f"{str(out_dir)!r} already exists; pass --force to replace it")
    with storage_errors(out_dir, needed_bytes):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        check_free_space(out_dir, needed_bytes)
        tmp_dir = Path(tempfile.mkdtemp(prefix=temporary_prefix(out_dir), suffix=".tmp", dir=out_dir.parent))
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


HOST = socket.gethostname().split(".")[0]
TEMPORARY_NAME = re.compile(r"\..+\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+\.tmp")


def temporary_prefix(path: Path) -> str:
    """The prefix of a temporary sibling of ``path``: hidden, named after it and after the writing process."""
    return f".{Path(path).name}.{HOST}-{os.getpid()}."


def remove_stale_temporaries(directory: Path) -> tuple[list[Path], list[Path]]:
    """Remove the temporary files and directories that writers killed before they finished left in ``directory``.

    Returns (removed, kept): an entry is removed when the process that made it (on this host) is gone; entries of
    other hosts or of live processes are kept (they may still be being written). ``.old-`` directories (the previous
    output while ``atomic_directory`` swaps in a new one) are kept too: after a kill at that instant they hold the
    only copy.
    """
    removed: list[Path] = []
    kept: list[Path] = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed, kept
    for path in sorted(directory.iterdir()):
        match = TEMPORARY_NAME.fullmatch(path.name)
        if match is None:
            continue
        if match["host"] != HOST or _process_alive(int(match["pid"])) or ".old-" in path.name:
            kept.append(path)
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed, kept


def describe_stale(removed: list[Path], kept: list[Path]) -> str | None:
    """One line about :func:`remove_stale_temporaries`' work, or None when there was nothing."""
    parts = []
    if removed:
        names = ", ".join(map(str, removed[:3]))
        parts.append(f"removed {len(removed)} temporary file(s) left by interrupted runs ({names})")
    if kept:
        parts.append(
            f"left {len(kept)} temporary file(s) in place (of running processes, other hosts, or an output being "
            f"replaced: check and remove by hand) ({', '.join(map(str, kept[:3]))})"
        )
    return "; ".join(parts) or None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}


def storage_errno(error: BaseException) -> int | None:
    """The errno of a failed write: an ``OSError``'s, or the ``(os error N)`` that safetensors' Rust writer puts in
    its message; None for anything else."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno
    match = re.search(r"\(os error (\d+)\)", str(error))
    return int(match.group(1)) if match else None


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def check_free_space(path: Path, needed_bytes: int | None) -> None:
    """Refuse to start writing ``needed_bytes`` to ``path`` on a file system that has less free."""
    free = free_bytes(path)
    if needed_bytes is not None and free is not None and free < needed_bytes:
        raise LatticeError(
            f"not enough space to write {str(path)!r}: needs {needed_bytes:,} bytes, its file system has {free:,} free"
        )


@contextlib.contextmanager
def storage_errors(path: Path, needed_bytes: int | None = None) -> Iterator[None]:
    """Turn a full disk, a quota or a missing permission while writing ``path`` into one :class:`LatticeError` line
    (naming the path, the bytes needed when known and the bytes free); other errors pass unchanged."""
    try:
        yield
    except LatticeError:
        raise
    except Exception as error:
        code = storage_errno(error)
        if code not in STORAGE_ERRNOS:
            raise
        detail = os.strerror(code).lower()
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            free = free_bytes(path)
            sizes = [f"needs {needed_bytes:,} bytes"] if needed_bytes else []
            sizes += [f"{free:,} bytes free"] if free is not None else []
            if sizes:
                detail += f" ({', '.join(sizes)})"
        elif getattr(error, "filename", None):
            detail += f" ({error.filename})"
        raise LatticeError(f"cannot write {str(path)!r}: {detail}") from None


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a (nested) state: what writing it takes, give or take the file headers."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


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
    check_shapes(model, {key: tuple(value.shape) for key, value in state_dict.items()}, source)


def check_shapes(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], source: Path) -> None:
    """Refuse tensor names and shapes that do not match the model's state dict, naming the first differences."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [k for k in expected if k in shapes and tuple(shapes[k]) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
    if wrong:
        key = wrong[0]
        problems.append(f"shape of {key} is {tuple(shapes[key])}, the config needs {expected[key]}")
    if problems:
        raise LatticeError(f"weights in {str(source)!r} do not match model_config.yaml: {'; '.join(problems)}")


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a weights file without reading its data: the safetensors header (which also
    proves the file is complete), or the records of a zip ``.pth`` through mmap (an old-format ``.pth`` is read)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        return {key: tuple(value.shape) for key, value in load_state_dict(path).items()}
    try:
        with safe_open(str(path), framework="pt") as file:
            shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except (OSError, SafetensorError) as error:
        raise LatticeError(f"cannot read weights from {str(path)!r}: {first_line(error)}") from None
    return {key.replace(COMPILE_PREFIX, ""): shape for key, shape in shapes.items()}


def validate_checkpoint(checkpoint_dir: Path, tokenizer: bool = False) -> "LatticeConfig":
    """The config of a checkpoint directory, after checking that it parses and that its weights are complete and
    match it (names and shapes, read from the file headers: nothing is loaded); ``tokenizer`` also requires
    tokenizer files. Any problem is one :class:`LatticeError` line. Commands call this before writing anything."""
    from lattice_plugin.model import LatticeGPT

    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise LatticeError(f"checkpoint directory {str(checkpoint_dir)!r} does not exist")
    config = load_config(checkpoint_dir)
    weights = find_weights(checkpoint_dir)
    shapes = weight_shapes(weights)
    with torch.device("meta"):
        model = LatticeGPT(config)
    check_shapes(model, shapes, source=weights)
    if tokenizer and not any((checkpoint_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise LatticeError(f"{str(checkpoint_dir)!r} holds no tokenizer (tokenizer.json or tokenizer.model)")
    return config


def atomic_write(path: Path, payload: str | bytes) -> None:
    """Write a file through a temporary sibling renamed into place (text as UTF-8), with open()'s permissions."""
    path = Path(path)
    data = payload.encode("utf-8") if isinstance(payload, str) else payload
    with storage_errors(path, len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file owner-only
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
