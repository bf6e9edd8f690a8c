"""Shared fixtures: a small slice of the shipped text with its tokenizer, and a runner for the ``lattice`` command."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lattice_plugin.corpus import shipped_corpus, train_tokenizer

# Tiny models on a 2-core machine: more threads than work per op only adds contention (20x slower seen under load).
torch.set_num_threads(1)

TINY_MODEL = dict(
    name="tiny",
    block_size=64,
    vocab_size=512,
    padding_multiple=64,
    n_layer=3,
    n_head=4,
    n_query_groups=2,
    n_embd=32,
    rotary_percentage=1.0,
    parallel_residual=False,
    bias=False,
    norm_class_name="RMSNorm",
    mlp_class_name="LLaMAMLP",
    intermediate_size=64,
)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ (80 KB of the shipped training text), val/ (8 KB of the held-out text) and a 512-token tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    source = shipped_corpus()
    for split, size in (("train", 80_000), ("val", 8_000)):
        (root / split).mkdir()
        text = sorted((source / split).glob("*.txt"))[0].read_text(encoding="utf-8")[:size]
        (root / split / f"{split}.txt").write_text(text, encoding="utf-8")
    train_tokenizer([root / "train" / "train.txt"], root / "tokenizer", vocab_size=512)
    return root


def run_lattice(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the ``lattice`` command as a user would (a fresh process), capturing its output."""
    env = {**os.environ, "COLUMNS": "160", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "lattice_plugin", *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"lattice {' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    """Run ``lattice ARGS`` in this process (the console script's ``main``); return (exit code, stderr)."""
    from lattice_plugin.cli import main

    monkeypatch.setattr(sys, "argv", ["lattice", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return code, capsys.readouterr().err


def enospc_save_file(limit: int, fails=lambda filename: True):
    """A stand-in for safetensors' ``save_file`` on a file system with ``limit`` bytes left: for the files ``fails``
    selects it writes what fits, then fails as safetensors' Rust writer does on ENOSPC (a simulated full disk)."""
    from safetensors import SafetensorError
    from safetensors.torch import save, save_file

    def writer(tensors, filename, metadata=None):
        if not fails(str(filename)):
            return save_file(tensors, filename, metadata)
        Path(filename).write_bytes(save(tensors, metadata)[:limit])
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    return writer
