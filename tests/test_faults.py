"""Faults and bad input as a user meets them: broken checkpoints given to generate, chat, inspect and finetune, a full
disk under convert, temporaries left by killed runs, old-format ``.pth`` files. Every refusal is one line and exit
status 2, and leaves nothing behind. (Resume, keep_last and SIGTERM during distillation: test_distill.py.)"""

import errno
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import enospc_save_file, run_cli
from convert_helpers import make_tokenizer, write_litgpt_checkpoint
from lattice_plugin import checkpoint as checkpoint_module
from lattice_plugin.checkpoint import HOST, load_model, load_state_dict, temporary_prefix
from lattice_plugin.errors import LatticeError


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny litgpt checkpoint (Llama-style, ``lit_model.pth``); tests must not modify it."""
    root = tmp_path_factory.mktemp("faults")
    return write_litgpt_checkpoint(root / "llama", "llama", make_tokenizer(root / "tokenizer"))


def _invalid_yaml(path: Path) -> None:
    with open(path / "model_config.yaml", "a") as file:
        file.write("n_layer: [4\n")


def _shapes_unlike_weights(path: Path) -> None:
    config = yaml.safe_load((path / "model_config.yaml").read_text())
    config["intermediate_size"] = 128
    (path / "model_config.yaml").write_text(yaml.safe_dump(config))


def _truncated_weights(path: Path) -> None:
    weights = path / "lit_model.pth"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


BROKEN = {
    "invalid yaml": (_invalid_yaml, "cannot read"),
    "shapes unlike the weights": (_shapes_unlike_weights, "shape of transformer.h.0.mlp.fc_1.weight is (96, 64)"),
    "truncated weights": (_truncated_weights, "cannot read weights from"),
}


@pytest.mark.parametrize("command", ["generate", "chat", "inspect", "finetune_lora"])
@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_broken_checkpoints_are_one_line_and_exit_2(case, command, source, tmp_path, monkeypatch, capsys):
    """generate and chat used to die with litgpt's traceback; inspect printed counts of weights it never opened."""
    broken = Path(shutil.copytree(source, tmp_path / "broken"))
    breaks, message = BROKEN[case]
    breaks(broken)
    out_dir = tmp_path / "out"
    extra = {"generate": ["--prompt", "hi"], "finetune_lora": ["--out_dir", out_dir]}.get(command, [])
    code, err = run_cli(monkeypatch, capsys, command, broken, *extra)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lattice: error:"), err
    assert message in lines[0]
    assert not out_dir.exists()


def test_checkpoint_argument_is_found_where_litgpt_takes_it(tmp_path):
    from lattice_plugin.cli.litgpt_commands import checkpoint_argument

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("checkpoint_dir: from/recipe\n")
    assert checkpoint_argument(["--prompt", "x", "a/b", "--max_new_tokens", "3"]) == "a/b"
    assert checkpoint_argument(["--checkpoint_dir", "c", "--prompt", "x"]) == "c"
    assert checkpoint_argument(["--checkpoint_dir=d"]) == "d"
    assert checkpoint_argument(["--config", str(recipe), "--out_dir", "o"]) == "from/recipe"
    assert checkpoint_argument(["a/b", "--help"]) is None


def test_inspect_reads_the_weight_headers(source, tmp_path, monkeypatch, capsys):
    """A safetensors file cut short is refused from its header, and a complete one is reported on."""
    from lattice_plugin.checkpoint import save_safetensors

    checkpoint = Path(shutil.copytree(source, tmp_path / "st", ignore=shutil.ignore_patterns("lit_model.pth")))
    save_safetensors(load_state_dict(source / "lit_model.pth"), checkpoint / "model.safetensors")
    assert run_cli(monkeypatch, capsys, "inspect", checkpoint)[0] == 0
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    code, err = run_cli(monkeypatch, capsys, "inspect", checkpoint)
    assert code == 2 and err.count("\n") == 1 and "incomplete metadata" in err


# ------------------------------------------------------------------------------------------------- full disk
SMALL = 512 * 1024


@pytest.fixture
def small_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A 512 KiB tmpfs where this process may mount one (root on Linux), else a plain directory whose free space and
    safetensors writer are simulated to match."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = (
        sys.platform == "linux"
        and os.geteuid() == 0
        and shutil.which("mount") is not None
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={SMALL}", "tmpfs", str(mount)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        real_free = checkpoint_module.free_bytes
        monkeypatch.setattr(
            checkpoint_module, "free_bytes", lambda path: SMALL if mount in Path(path).parents else real_free(path)
        )
        monkeypatch.setattr("safetensors.torch.save_file", enospc_save_file(SMALL))
    yield mount
    if mounted:
        subprocess.run(["umount", str(mount)], check=True)


def test_convert_onto_a_full_disk_is_one_line_and_leaves_nothing(source, small_filesystem, monkeypatch, capsys):
    out = small_filesystem / "out"
    code, err = run_cli(monkeypatch, capsys, "convert", source, "--out", out)
    errors = [line for line in err.splitlines() if line.startswith("lattice: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert f"not enough space to write '{out}': needs" in errors[0]
    assert list(small_filesystem.iterdir()) == []
    # past the free-space check (as when the disk fills while writing): the writer's own ENOSPC
    monkeypatch.setattr(checkpoint_module, "check_free_space", lambda path, needed: None)
    code, err = run_cli(monkeypatch, capsys, "convert", source, "--out", out)
    errors = [line for line in err.splitlines() if line.startswith("lattice: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert f"cannot write '{out}': no space left on device" in errors[0]
    assert list(small_filesystem.iterdir()) == []


def test_storage_errors_name_the_path(tmp_path):
    with pytest.raises(LatticeError, match=r"cannot write '.*x': no space left on device \(needs 10 bytes"):
        with checkpoint_module.storage_errors(tmp_path / "x", needed_bytes=10):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(LatticeError, match="permission denied"):
        with checkpoint_module.storage_errors(tmp_path / "x"):
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x"))
    with pytest.raises(RuntimeError, match="unrelated"):  # anything else passes unchanged
        with checkpoint_module.storage_errors(tmp_path / "x"):
            raise RuntimeError("unrelated")


# --------------------------------------------------------------------------------- leftovers of killed runs
def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_convert_removes_temporaries_of_killed_runs_and_reports_live_ones(source, tmp_path, monkeypatch, capsys):
    dead = tmp_path / f".out.{HOST}-{_dead_pid()}.abc123.tmp"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half a file")
    dead_file = tmp_path / f".other.json.{HOST}-{_dead_pid()}.def456.tmp"
    dead_file.write_text("{")
    live = tmp_path / f"{temporary_prefix(tmp_path / 'out')}xyz789.tmp"  # this process: still writing
    live.mkdir()
    code, err = run_cli(monkeypatch, capsys, "convert", source, "--out", tmp_path / "out")
    assert code == 0, err
    assert not dead.exists() and not dead_file.exists() and live.is_dir()
    assert "removed 2 temporary file(s) left by interrupted runs" in err
    assert "left 1 temporary file(s) in place" in err
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ old .pth format
def test_old_format_pth_is_read_without_mmap(source, tmp_path, monkeypatch, capsys):
    """torch.save(_use_new_zipfile_serialization=False) files used to be refused ("mmap can only be used ...")."""
    old = Path(shutil.copytree(source, tmp_path / "old"))
    state_dict = load_state_dict(source / "lit_model.pth")
    torch.save(state_dict, old / "lit_model.pth", _use_new_zipfile_serialization=False)
    loaded = load_model(old).state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state_dict.items())
    assert run_cli(monkeypatch, capsys, "inspect", old)[0] == 0


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_old_format_pth_still_never_runs_a_pickle(source, tmp_path, monkeypatch):
    evil = Path(shutil.copytree(source, tmp_path / "evil"))
    with open(evil / "lit_model.pth", "wb") as file:  # the legacy format is a plain pickle stream
        torch.save({"payload": _Payload()}, file, _use_new_zipfile_serialization=False, pickle_module=pickle)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LatticeError, match="cannot read weights"):
        load_model(evil)
    assert not (tmp_path / "pwned").exists()
