"""`lattice convert`: attention -> Lattice surgery on tiny Llama-style (GQA) and NeoX-style litgpt checkpoints.

What must hold: reused tensors are bit-for-bit the source's, unconverted layers are identical, converting zero layers
gives the source logits exactly, the converted model runs, generates through the fixed-slot cache and fine-tunes with
`lattice finetune_lora` (merge included); every refusal is one line, exit 2, and writes nothing; an interrupted write
leaves nothing behind.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lattice_plugin.conversion import convert as convert_module
from lattice_plugin.conversion.convert import ConversionOptions, convert_checkpoint, sha256

from conftest import run_cli
from convert_helpers import (
    ARCHITECTURES,
    LAYOUTS,
    LLAMA,
    make_tokenizer,
    write_hf_llama_checkpoint,
    write_litgpt_checkpoint,
)
from lattice_plugin.checkpoint import find_weights, load_model, load_state_dict

# the hybrid layouts the main tests convert: layers given by --layers for one model, by --keep-attention for the other
HYBRID_ARGS = {"llama": ["--layers", "every:2"], "neox": ["--keep-attention", "0"]}
HYBRID_LAYERS = {"llama": [1, 3], "neox": [1, 2]}


ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
LATTICE = str(Path(sys.executable).with_name("lattice"))  # the console script of this environment, PATH or not


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    """One litgpt checkpoint per architecture (flat ``lit_model.pth``); tests must not modify them."""
    root = tmp_path_factory.mktemp("sources")
    return {arch: write_litgpt_checkpoint(root / arch, arch, tokenizer_dir) for arch in ARCHITECTURES}


@pytest.fixture(scope="module")
def hybrid_llama(tmp_path_factory: pytest.TempPathFactory, sources: dict[str, Path]) -> Path:
    """The Llama-style model with layers 1 and 3 converted."""
    out = tmp_path_factory.mktemp("hybrid") / "llama-lattice"
    return convert_checkpoint(sources["llama"], out, ConversionOptions(layers="every:2"))


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))
    )


def weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    return load_state_dict(find_weights(checkpoint_dir))


def source_logits(source_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the source with litgpt's own classes (no plugin model code involved)."""
    from litgpt.config import Config
    from litgpt.model import GPT

    model = GPT(Config.from_file(source_dir / "model_config.yaml"))
    model.load_state_dict(weights(source_dir))
    with torch.no_grad():
        return model.eval()(tokens)


def leftovers(parent: Path, name: str) -> list[str]:
    """The output directory and any temporary sibling of it."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


# ---------------------------------------------------------------------------------------------------------- mapping


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_reused_tensors_bit_for_bit(arch, sources, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, err = run_cli(monkeypatch, capsys, "convert", sources[arch], "--out", out, *HYBRID_ARGS[arch])
    assert code == 0, err
    source, converted = weights(sources[arch]), weights(out)
    lattice_layers = HYBRID_LAYERS[arch]
    n_layer = ARCHITECTURES[arch]["n_layer"]

    for key, value in source.items():  # every source tensor is reused unchanged (qkv, proj, MLPs, norms, wte, head)
        assert bits_equal(converted[key], value), key
    for i in range(n_layer):
        if i not in lattice_layers:  # unconverted layers: exactly the source's tensors, nothing added
            prefix = f"transformer.h.{i}."
            assert {k for k in converted if k.startswith(prefix)} == {k for k in source if k.startswith(prefix)}
    new = set(converted) - set(source)
    assert new and all(any(k.startswith(f"transformer.h.{i}.attn.") for i in lattice_layers) for k in new)

    config = load_model(out).config
    hs, n_head, n_kv = config.head_size, config.n_head, config.n_query_groups
    assert config.lattice_layers == lattice_layers and config.lattice_slots == hs
    for i in lattice_layers:
        p = f"transformer.h.{i}.attn."
        assert torch.equal(converted[p + "q_code.weight"], torch.eye(hs).expand(n_head, hs, hs))  # identity, m == hs
        assert torch.equal(converted[p + "k_code.weight"], torch.eye(hs).expand(n_kv, hs, hs))
        assert torch.equal(converted[p + "out_norm.weight"], torch.ones(n_head, hs))
        assert converted[p + "initial_slots.weight"].shape == (n_kv, hs, hs)
        assert converted[p + "beta_proj.weight"].shape == (n_kv, config.n_embd)
        assert p + "out_gate.weight" not in converted

    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (sources[arch] / name).read_bytes()
    record = json.loads((out / "conversion.json").read_text())
    assert record["source"] == str(sources[arch].resolve()) and record["source_format"] == "litgpt"
    assert record["lattice_layers"] == lattice_layers
    assert record["source_files_sha256"]["lit_model.pth"] == sha256(sources[arch] / "lit_model.pth")
    assert record["versions"]["lattice_plugin"] and record["versions"]["litgpt"] and record["options"]["seed"] == 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_litgpt_weights_layout(layout, tokenizer_dir, tmp_path):
    """Flat state dict, {"model": ...}, a pretraining state with "_orig_mod." prefixes, model.safetensors."""
    source = write_litgpt_checkpoint(tmp_path / "source", "llama", tokenizer_dir, layout=layout)
    out = convert_checkpoint(source, tmp_path / "out", ConversionOptions(layers="0,-1"))
    reference = ARCHITECTURES["llama"]
    from litgpt.config import Config

    from convert_helpers import random_state_dict

    expected = random_state_dict(Config(**reference))
    converted = weights(out)
    assert all(bits_equal(converted[k], v) for k, v in expected.items())
    assert load_model(out).config.lattice_layers == [0, 3]
    # the new parameters depend only on the seed and the layer selection, not on the file layout
    assert sha256(out / "model.safetensors") == sha256(
        convert_checkpoint(source, tmp_path / "again", ConversionOptions(layers="0,-1")) / "model.safetensors"
    )


def test_litgpt_download_directory_uses_lit_model_pth(sources, tokenizer_dir, tmp_path):
    """`litgpt download` keeps the HF model.safetensors (HF tensor names) and config.json beside lit_model.pth."""
    source = Path(shutil.copytree(sources["llama"], tmp_path / "source"))
    write_hf_llama_checkpoint(tmp_path / "hf", tokenizer_dir, name_or_path="x/y")
    for name in ("model.safetensors", "config.json"):
        shutil.copy(tmp_path / "hf" / name, source / name)
    out = convert_checkpoint(source, tmp_path / "out", ConversionOptions(layers="1"))
    assert all(bits_equal(weights(out)[k], v) for k, v in load_state_dict(source / "lit_model.pth").items())
    assert "lit_model.pth" in json.loads((out / "conversion.json").read_text())["source_files_sha256"]


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_zero_layers_reproduce_source_logits(arch, sources, tmp_path):
    out = convert_checkpoint(sources[arch], tmp_path / "out", ConversionOptions(layers="none"), allow_empty=True)
    tokens = torch.randint(0, LLAMA["vocab_size"], (2, 17))
    with torch.no_grad():
        logits = load_model(out)(tokens)
    assert torch.equal(logits, source_logits(sources[arch], tokens))


def test_dtype_option(sources, tmp_path):
    out = convert_checkpoint(sources["neox"], tmp_path / "out", ConversionOptions(dtype="bfloat16"))
    converted = weights(out)
    assert {v.dtype for v in converted.values()} == {torch.bfloat16}
    for key, value in weights(sources["neox"]).items():
        assert bits_equal(converted[key], value.to(torch.bfloat16)), key


# --------------------------------------------------------------------------------------------- the converted model


@pytest.mark.parametrize(
    "arch, options",
    [
        ("llama", ConversionOptions(layers="every:2")),
        ("llama", ConversionOptions(slots=7, output_gate=True, feature_map="l2")),  # all layers, m != head size
        ("neox", ConversionOptions(keep_attention="0", feature_map="sigmoid", gates="chunk")),
    ],
    ids=["llama-hybrid", "llama-all-m7-gate", "neox-hybrid-chunk"],
)
def test_converted_model_forward_and_generate(arch, options, sources, tmp_path):
    from litgpt.generate.base import generate

    from lattice_plugin.cache import LatticeCache

    out = convert_checkpoint(sources[arch], tmp_path / "out", options)
    model = load_model(out)
    torch.manual_seed(0)
    tokens = torch.randint(0, LLAMA["vocab_size"], (2, 21))
    with torch.no_grad():
        full = model(tokens)
        assert torch.isfinite(full).all()
        # prefill + one token at a time through the caches equals the full forward
        model.set_kv_cache(batch_size=2)
        for i, block in enumerate(model.transformer.h):
            assert isinstance(block.attn.kv_cache, LatticeCache) == (i in model.config.lattice_layers)
        steps = [model(tokens[:, :9], input_pos=torch.arange(9))]
        steps += [model(tokens[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(9, tokens.shape[1])]
        # gates="chunk" freezes the gates per chunk (an approximation); decoding runs the exact recurrence
        compared = tokens.shape[1] if options.gates == "exact" else 9
        torch.testing.assert_close(torch.cat(steps, dim=1)[:, :compared], full[:, :compared], atol=1e-4, rtol=1e-4)

        # litgpt's generate (greedy) with the fixed-slot cache gives the tokens of greedy decoding without a cache
        model.clear_kv_cache()
        model.set_kv_cache(batch_size=1)
        prompt = tokens[0, :6]
        generated = generate(model, prompt, max_returned_tokens=14, top_k=1)
        model.clear_kv_cache()
        assert generated.shape == (14,) and generated[:6].tolist() == prompt.tolist()
        if options.gates == "chunk":
            return
        sequence = prompt
        while sequence.numel() < 14:
            sequence = torch.cat([sequence, model(sequence[None])[0, -1].argmax().view(1)])
        assert generated.tolist() == sequence.tolist()


def test_inspect_shows_layout_and_cache_comparison(hybrid_llama):
    result = subprocess.run(
        [LATTICE, "inspect", str(hybrid_llama)],
        capture_output=True,
        text=True,
        timeout=300,
        env=ONE_THREAD_ENV,
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout.lower()
    assert "lattice" in text and "attention" in text
    assert "2/4" in text or "lattice layers: [1, 3]" in text or "1, 3" in text  # the layout of the hybrid
    assert "cache" in text


def test_lattice_generate_reads_converted_checkpoint(hybrid_llama):
    result = subprocess.run(
        [LATTICE, "generate", str(hybrid_llama), "--prompt", "The quick", "--max_new_tokens", "6"],
        capture_output=True,
        text=True,
        timeout=300,
        env=ONE_THREAD_ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "The quick" in result.stdout
    assert f"Loading model {str(hybrid_llama / 'model.safetensors')!r}" in result.stderr  # the file that is there
    assert "lit_model.pth" not in result.stderr


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_finetune_lora_on_converted_checkpoint(arch, sources, tmp_path):
    """`lattice finetune_lora` trains LoRA on a converted (safetensors-only) checkpoint and merges it at the end."""
    out = convert_checkpoint(sources[arch], tmp_path / "converted", ConversionOptions(layers="last:2"))
    text = (Path(__file__).parents[1] / "lattice_plugin/corpus/train/fortunes-00.txt").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) > 20][:8]
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Quote.", "input": "", "output": line} for line in lines]))
    run_dir = tmp_path / "run"
    args = (
        f"--out_dir {run_dir} --data JSON --data.json_path {data} --data.val_split_fraction 0.25 "
        "--train.max_steps 2 --train.lr_warmup_steps 1 --train.micro_batch_size 1 --train.global_batch_size 1 "
        "--train.max_seq_length 32 --train.save_interval 100 --eval.interval 100 --eval.max_iters 1 "
        "--eval.final_validation false --devices 1 --precision 32-true --lora_key true --lora_projection true"
    ).split()
    result = subprocess.run(
        [LATTICE, "finetune_lora", str(out), *args], capture_output=True, text=True, timeout=600, env=ONE_THREAD_ENV
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    final = run_dir / "final"
    assert (final / "lit_model.pth.lora").is_file() and (final / "lit_model.pth").is_file()
    merged, base = load_state_dict(final / "lit_model.pth"), weights(out)
    assert set(merged) == set(base)
    assert not any("lora_" in key for key in merged)
    for key in base:  # only the LoRA targets changed; the new Lattice parameters and the MLPs are the base's
        if "attn.qkv" not in key and "attn.proj" not in key:
            assert bits_equal(merged[key], base[key]), key
    n_layer = ARCHITECTURES[arch]["n_layer"]
    assert load_model(final).config.lattice_layers == [n_layer - 2, n_layer - 1]


# ----------------------------------------------------------------------------------------------- Hugging Face input


def test_hugging_face_checkpoint_via_litgpt(tokenizer_dir, tmp_path, monkeypatch):
    """A hand-made HF Llama checkpoint goes through litgpt's own HF -> litgpt conversion; the source is untouched."""
    import litgpt.config

    monkeypatch.setitem(litgpt.config.name_to_config, LLAMA["name"], dict(LLAMA))
    source = tmp_path / "hf" / LLAMA["name"]
    hf_weights = write_hf_llama_checkpoint(source, tokenizer_dir, name_or_path=f"someone/{LLAMA['name']}")
    before = {path.name: sha256(path) for path in source.iterdir()}

    out = convert_checkpoint(source, tmp_path / "out", ConversionOptions(layers="last:2"))
    assert {path.name: sha256(path) for path in source.iterdir()} == before
    assert leftovers(out.parent, ".hf-import") == [] and not (out / ".hf-import").exists()
    converted = weights(out)
    for i in range(LLAMA["n_layer"]):  # litgpt's fused qkv is [q; k; v]; GQA: 4 query heads, 2 key/value heads
        hf = {n: hf_weights[f"model.layers.{i}.self_attn.{n}_proj.weight"] for n in "qkvo"}
        assert bits_equal(converted[f"transformer.h.{i}.attn.qkv.weight"], torch.cat([hf["q"], hf["k"], hf["v"]]))
        assert bits_equal(converted[f"transformer.h.{i}.attn.proj.weight"], hf["o"])
    assert bits_equal(converted["transformer.wte.weight"], hf_weights["model.embed_tokens.weight"])
    record = json.loads((out / "conversion.json").read_text())
    assert record["source_format"] == "huggingface" and record["litgpt_model_name"] == LLAMA["name"]
    assert set(record["source_files_sha256"]) == set(before)
    with torch.no_grad():
        assert torch.isfinite(load_model(out)(torch.randint(0, 300, (1, 9)))).all()


# ------------------------------------------------------------------------------------------------------- refusals


def _copy(sources, arch, tmp_path):
    return Path(shutil.copytree(sources[arch], tmp_path / "src"))


def _no_config(sources, tmp_path):
    source = _copy(sources, "llama", tmp_path)
    (source / "model_config.yaml").unlink()
    return [source]


def _no_weights(sources, tmp_path):
    source = _copy(sources, "llama", tmp_path)
    (source / "lit_model.pth").unlink()
    return [source]


def _garbage_weights(sources, tmp_path):
    source = _copy(sources, "llama", tmp_path)
    (source / "lit_model.pth").unlink()
    (source / "model.safetensors").write_bytes(os.urandom(256))
    return [source]


def _garbage_config(sources, tmp_path):
    source = _copy(sources, "llama", tmp_path)
    (source / "model_config.yaml").write_text("n_layer: [4\n")
    return [source]


def _edited_weights(edit):
    def build(sources, tmp_path):
        source = _copy(sources, "llama", tmp_path)
        state_dict = load_state_dict(source / "lit_model.pth")
        edit(state_dict)
        (source / "lit_model.pth").unlink()  # the loaded tensors map this file: write a new one, not over it
        torch.save(state_dict, source / "lit_model.pth")
        return [source]

    return build


def _missing_key(state_dict):
    del state_dict["transformer.h.2.attn.proj.weight"]


def _renamed_key(state_dict):
    state_dict["transformer.h.0.attn.attn.weight"] = state_dict.pop("transformer.h.0.attn.qkv.weight")


def _wrong_shape(state_dict):
    state_dict["transformer.h.1.mlp.fc_1.weight"] = torch.zeros(128, 64)


def _latent_attention(sources, tmp_path, tokenizer_dir):
    mla = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
    overrides = dict(n_query_groups=4, latent_attention=mla)
    return [write_litgpt_checkpoint(tmp_path / "src", "llama", tokenizer_dir, **overrides)]


def _already_lattice(sources, tmp_path):
    return [convert_checkpoint(sources["llama"], tmp_path / "src", ConversionOptions(layers="0"))]


def _hf(name, config, weights=True):
    def build(sources, tmp_path):
        source = tmp_path / name
        source.mkdir()
        (source / "config.json").write_text(json.dumps(config))
        if weights:
            (source / "model.safetensors").write_bytes(b"not reached")
        return [source]

    return build


REFUSALS = {
    "missing source": (lambda s, t: [t / "nowhere"], "does not exist"),
    "source is a file": (lambda s, t: [s["llama"] / "lit_model.pth"], "not a directory"),
    "no config": (_no_config, "model_config.yaml"),
    "unreadable config": (_garbage_config, "cannot read"),
    "no weights": (_no_weights, "holds no weights"),
    "unreadable weights": (_garbage_weights, "cannot read weights"),
    "weight name missing": (_edited_weights(_missing_key), "missing transformer.h.2.attn.proj.weight"),
    "weight name unknown": (_edited_weights(_renamed_key), "unexpected transformer.h.0.attn.attn.weight"),
    "weight shape": (_edited_weights(_wrong_shape), "shape of transformer.h.1.mlp.fc_1.weight"),
    "latent attention": (_latent_attention, "multi-head latent attention"),
    "already lattice": (_already_lattice, "already has Lattice layers"),
    "layer out of range": (lambda s, t: [s["llama"], "--layers", "4"], "out of range"),
    "kept layer out of range": (lambda s, t: [s["neox"], "--keep-attention", "0,3"], "out of range"),
    "last:N too large": (lambda s, t: [s["llama"], "--layers", "last:5"], "out of range"),
    "empty selection": (lambda s, t: [s["llama"], "--layers", "none"], "converts no layer"),
    "everything kept": (lambda s, t: [s["neox"], "--keep-attention", "0,1,2"], "converts no layer"),
    "bad layer spec": (lambda s, t: [s["llama"], "--layers", "most"], "lattice_layers must be"),
    "both selections": (lambda s, t: [s["llama"], "--layers", "0", "--keep-attention", "1"], "not both"),
    "m < 1": (lambda s, t: [s["llama"], "-m", "0"], "must be an integer >= 1"),
    "bad feature map": (lambda s, t: [s["llama"], "--feature-map", "relu"], "feature map must be"),
    "bad dtype": (lambda s, t: [s["llama"], "--dtype", "int8"], "dtype must be"),
    "model name on litgpt input": (lambda s, t: [s["llama"], "--model-name", "pythia-14m"], "Hugging Face"),
    "HF unknown architecture": (
        _hf("my-mamba", {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "_name_or_path": "x/my-mamba"}),
        "litgpt does not know the architecture",
    ),
    "HF unknown --model-name": (
        lambda s, t: [*_hf("ckpt", {"model_type": "llama"})(s, t), "--model-name", "no-such-model"],
        "litgpt has no config named",
    ),
    "HF config of another size": (_hf("pythia-14m", {"hidden_size": 64}), "does not match litgpt's config"),
    "HF no weights": (_hf("pythia-14m", {"hidden_size": 128}, weights=False), "no weights"),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_refusals_write_nothing(case, sources, tokenizer_dir, tmp_path, monkeypatch, capsys):
    build, message = REFUSALS[case]
    args = build(sources, tmp_path, tokenizer_dir) if build is _latent_attention else build(sources, tmp_path)
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    code, err = run_cli(monkeypatch, capsys, "convert", *args[:1], "--out", out_parent / "out", *args[1:])
    errors = [line for line in err.splitlines() if line.startswith("lattice: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert message in errors[0], errors[0]
    assert list(out_parent.iterdir()) == []


def test_refuses_existing_output_without_force(sources, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(monkeypatch, capsys, "convert", sources["llama"], "--out", out)
    assert code == 2 and "already exists; pass --force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and leftovers(tmp_path, "out") == ["out"]

    code, err = run_cli(monkeypatch, capsys, "convert", sources["llama"], "--out", out, "--force")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path, "out") == ["out"]


@pytest.mark.parametrize("where", ["inside", "same", "contains"])
def test_refuses_output_overlapping_source(where, sources, tmp_path, monkeypatch, capsys):
    source = Path(shutil.copytree(sources["neox"], tmp_path / "parent" / "src"))
    before = sorted(p.name for p in source.iterdir())
    out = {"inside": source / "lattice", "same": source, "contains": tmp_path / "parent"}[where]
    code, err = run_cli(monkeypatch, capsys, "convert", source, "--out", out, "--force")
    assert code == 2 and ("inside the source" in err or "contains the source" in err), err
    assert sorted(p.name for p in source.iterdir()) == before
    assert leftovers(out.parent, out.name) == ([out.name] if out.exists() else [])


@pytest.mark.parametrize("force", [False, True])
def test_interrupted_write_leaves_nothing(force, sources, tmp_path, monkeypatch):
    out = tmp_path / "out"
    if force:  # an existing output survives a failed replacement untouched
        out.mkdir()
        (out / "old.txt").write_text("old")

    def interrupted_save(state_dict, path):
        Path(path).write_bytes(b"partial safetensors file")
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "save_safetensors", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(sources["llama"], out, ConversionOptions(), force=force)
    if force:
        assert leftovers(tmp_path, "out") == ["out"] and [p.name for p in out.iterdir()] == ["old.txt"]
    else:
        assert leftovers(tmp_path, "out") == []


def test_help_lists_the_options(monkeypatch, capsys):
    from lattice_plugin.cli import main

    monkeypatch.setattr(sys, "argv", ["lattice", "convert", "--help"])
    with pytest.raises(SystemExit):
        main()
    text = capsys.readouterr().out
    for option in (
        "--out",
        "--layers",
        "--keep-attention",
        "--slots",
        "--feature-map",
        "--gates",
        "--output-gate",
        "--dtype",
        "--force",
        "--model-name",
        "--seed",
    ):
        assert option in text, option


def test_patch_rebinds_merge_lora():
    """litgpt's merge_lora torch.loads <base>/lit_model.pth; the plugin's reads model.safetensors as well."""
    import litgpt.chat.base
    import litgpt.finetune.lora
    import litgpt.scripts.merge_lora

    from lattice_plugin import patch

    patch.patch_litgpt()
    assert litgpt.finetune.lora.merge_lora is patch.merge_lora
    assert litgpt.chat.base.merge_lora is patch.merge_lora
    assert litgpt.scripts.merge_lora.merge_lora is patch.merge_lora
