"""litgpt's own commands through ``lattice``: pretrain (and resume), generate, LoRA fine-tuning and merging, inspect."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_lattice
from lattice_plugin.checkpoint import load_model, load_state_dict
from lattice_plugin.patch import is_patched, patch_litgpt

RECIPES = Path(__file__).parents[1] / "recipes"


def write_tiny_recipe(path: Path, corpus: Path, out_dir: Path, max_tokens: int) -> Path:
    """The shipped tiny-lattice recipe shrunk to seconds: 2 layers, 32-token blocks, a few iterations."""
    recipe = yaml.safe_load((RECIPES / "pretrain" / "tiny-lattice.yaml").read_text())
    recipe["model_config"].update(
        block_size=32, vocab_size=512, n_layer=2, n_embd=32, intermediate_size=64, lattice_slots=8, lattice_chunk_size=8
    )
    recipe["model_config"]["lattice_layers"] = "every:2"  # a hybrid: attention, then Lattice
    recipe.update(out_dir=str(out_dir), tokenizer_dir=str(corpus / "tokenizer"))
    recipe["data"]["init_args"].update(train_data_path=str(corpus / "train"), val_data_path=str(corpus / "val"))
    recipe["train"].update(
        save_interval=2,
        log_interval=1,
        global_batch_size=2,
        micro_batch_size=2,
        max_tokens=max_tokens,
        lr_warmup_steps=1,
    )
    recipe["eval"].update(interval=2, max_iters=1)
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def pretrained(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`lattice pretrain` for 4 iterations (checkpoints every 2), then `--resume` for 2 more."""
    work = tmp_path_factory.mktemp("pretrain")
    out_dir = work / "out"
    first = run_lattice(
        "pretrain", "--config", write_tiny_recipe(work / "a.yaml", tiny_corpus, out_dir, 4 * 64), cwd=work
    )
    resumed = run_lattice(
        "pretrain",
        "--config",
        write_tiny_recipe(work / "b.yaml", tiny_corpus, out_dir, 6 * 64),
        "--resume",
        "true",
        cwd=work,
    )
    return dict(work=work, out_dir=out_dir, first=first, resumed=resumed)


def test_pretrain_saves_a_lattice_checkpoint(pretrained):
    final = pretrained["out_dir"] / "final"
    config = yaml.safe_load((final / "model_config.yaml").read_text())
    assert config["lattice_layers"] == [1] and config["lattice_slots"] == 8 and config["lattice_chunk_size"] == 8
    model = load_model(final)
    assert type(model.transformer.h[1].attn).__name__ == "LatticeMixer"
    assert type(model.transformer.h[0].attn).__name__ == "CausalSelfAttention"
    assert "iter 4 step 4" in pretrained["first"].stdout
    assert (pretrained["out_dir"] / "step-00000002" / "lit_model.pth").is_file()


def test_resume_continues_from_the_last_checkpoint(pretrained):
    out = pretrained["resumed"].stdout
    assert "Resuming training from" in out and "step-00000004" in out
    assert "iter 5 step 5" in out and "iter 6 step 6" in out and "iter 1 step 1" not in out


def test_generate_uses_the_fixed_slot_cache(pretrained):
    result = run_lattice(
        "generate", pretrained["out_dir"] / "final", "--prompt", "The", "--max_new_tokens", "8", cwd=pretrained["work"]
    )
    assert "Time for inference 1" in result.stderr


def test_inspect_shows_layout_and_cache_comparison(pretrained):
    result = run_lattice("inspect", pretrained["out_dir"] / "final", "--lengths", "64,4096", cwd=pretrained["work"])
    assert "1/2 Lattice layers" in result.stdout
    assert "attention everywhere" in result.stdout and "lattice" in result.stdout and "attention" in result.stdout
    assert "4,096*" in result.stdout and "beyond the model's block size (32 tokens)" in result.stdout
    default = run_lattice("inspect", pretrained["out_dir"] / "final", cwd=pretrained["work"]).stdout
    assert "2,048" not in default and "beyond" not in default  # lengths default to the block size (32)


def test_finetune_lora_then_merge(pretrained, tmp_path):
    base = tmp_path / "base"
    run_lattice("convert_pretrained_checkpoint", pretrained["out_dir"] / "final", base, cwd=tmp_path)
    samples = [{"instruction": f"Repeat the word {w}.", "input": "", "output": w} for w in ("cat", "dog", "sun", "sky")]
    (tmp_path / "data.json").write_text(json.dumps(samples * 4))
    out_dir = tmp_path / "lora"
    run_lattice(
        "finetune_lora",
        base,
        "--out_dir",
        out_dir,
        "--data",
        "JSON",
        "--data.json_path",
        tmp_path / "data.json",
        "--data.val_split_fraction",
        "0.25",
        "--data.num_workers",
        "0",
        "--train.max_steps",
        "2",
        "--train.epochs",
        "1",
        "--train.micro_batch_size",
        "2",
        "--train.global_batch_size",
        "2",
        "--train.lr_warmup_steps",
        "1",
        "--train.max_seq_length",
        "32",
        "--eval.interval",
        "100",
        "--eval.max_iters",
        "1",
        "--eval.final_validation",
        "false",
        "--precision",
        "32-true",
        "--lora_r",
        "4",
        "--lora_projection",
        "true",
        cwd=tmp_path,
    )
    merged = load_state_dict(out_dir / "final" / "lit_model.pth")
    base_weights = load_state_dict(base / "lit_model.pth")
    assert set(merged) == set(base_weights)  # no lora_ keys left, nothing missing
    lattice_keys = [key for key in merged if ".attn.initial_slots" in key or ".attn.q_code" in key]
    assert lattice_keys and all(torch.equal(merged[key], base_weights[key]) for key in lattice_keys)
    assert not torch.equal(merged["transformer.h.1.attn.qkv.weight"], base_weights["transformer.h.1.attn.qkv.weight"])


def test_patch_litgpt_rebinds_the_scripts():
    import litgpt.chat.base
    import litgpt.finetune.full
    import litgpt.generate.base
    import litgpt.pretrain

    from lattice_plugin.config import LatticeConfig
    from lattice_plugin.model import LatticeBlock, LatticeGPT

    patch_litgpt()
    assert is_patched()
    for module in (litgpt.pretrain, litgpt.finetune.full, litgpt.generate.base, litgpt.chat.base):
        assert module.GPT is LatticeGPT
    assert litgpt.pretrain.Block is LatticeBlock and litgpt.pretrain.Config is LatticeConfig
    assert "LatticeConfig" in str(litgpt.pretrain.setup.__annotations__["model_config"])


def test_bad_recipe_value_is_one_clear_error(tiny_corpus, tmp_path):
    recipe = write_tiny_recipe(tmp_path / "bad.yaml", tiny_corpus, tmp_path / "out", 64)
    result = run_lattice("pretrain", "--config", recipe, "--model_config.lattice_slots", "0", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "lattice_slots (m) must be an integer >= 1" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_help_lists_the_commands_and_passes_through_to_litgpt(tmp_path):
    top = run_lattice("--help", cwd=tmp_path).stdout
    for command in ("pretrain", "finetune_lora", "generate", "chat", "inspect", "corpus", "tokenizer", "quickstart"):
        assert command in top
    assert "--model_config" in run_lattice("pretrain", "--help", cwd=tmp_path).stdout


def test_help_imports_neither_torch_nor_litgpt(tmp_path):
    """`lattice --help` stays fast: the command modules keep torch and litgpt inside the commands."""
    probe = (
        "import sys\nfrom lattice_plugin.cli import main\nsys.argv = ['lattice', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'litgpt', 'lightning') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "quickstart" in result.stdout
    assert result.stdout.strip().endswith("[]")


def test_bench_train_needs_a_gpu(tmp_path):
    """Without CUDA, --train stops with one line and exit code 2, writing nothing."""
    result = run_lattice("bench", "--train", "--out", str(tmp_path / "out"), cwd=tmp_path, check=False)
    assert result.returncode == 2 and "CUDA" in result.stderr and not (tmp_path / "out").exists()
