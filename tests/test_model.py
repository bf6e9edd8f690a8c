"""The Lattice config, model, cache and LoRA classes inside litgpt."""

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from lattice_plugin.kernels.elementwise import code_map
from litgpt.config import Config
from litgpt.generate.base import generate
from litgpt.lora import mark_only_lora_as_trainable, merge_lora_weights
from litgpt.model import GPT
from litgpt.utils import reset_parameters, save_config

from conftest import TINY_MODEL
from lattice_plugin.cache import LatticeCache
from lattice_plugin.config import LatticeConfig, parse_layer_spec
from lattice_plugin.errors import LatticeCacheError, LatticeConfigError
from lattice_plugin.inspect import build_meta_model, cache_bytes, compare_sizes, default_context_lengths
from lattice_plugin.lora import LoRALatticeConfig, LoRALatticeGPT
from lattice_plugin.model import HeadwiseLinear, LatticeGPT, LatticeMixer
from lattice_plugin.vocab import FEATURE_MAPS

NEOX_MODEL = dict(
    name="tiny-neox",
    block_size=64,
    vocab_size=300,
    padding_multiple=64,
    n_layer=2,
    n_head=4,
    n_embd=32,
    rotary_percentage=0.25,
    parallel_residual=True,
    bias=True,
    norm_class_name="LayerNorm",
    mlp_class_name="GptNeoxMLP",
)


def tiny_config(**overrides) -> LatticeConfig:
    return LatticeConfig(**{**TINY_MODEL, "lattice_chunk_size": 8, **overrides})


@pytest.mark.parametrize("fields", [TINY_MODEL, NEOX_MODEL], ids=["llama-gqa", "neox"])
def test_no_lattice_layers_is_exactly_litgpt(fields):
    torch.manual_seed(0)
    reference = GPT(Config(**fields))
    torch.manual_seed(0)
    model = LatticeGPT(LatticeConfig(**fields))
    expected, actual = reference.state_dict(), model.state_dict()
    assert list(actual) == list(expected)
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
    idx = torch.randint(0, fields["vocab_size"], (2, 17))
    assert torch.equal(model(idx), reference(idx))


@pytest.mark.parametrize(
    "spec,expected",
    [
        (None, []),
        ("none", []),
        ("all", [0, 1, 2, 3, 4, 5]),
        ([0, -1], [0, 5]),
        ("1, 3", [1, 3]),
        ("first:2", [0, 1]),
        ("last:2", [4, 5]),
        ("every:2", [1, 3, 5]),
        ("attention_every:3", [0, 1, 3, 4]),
    ],
)
def test_layer_specs(spec, expected):
    assert parse_layer_spec(spec, 6) == expected


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(lattice_layers=[3]), "index 3 is out of range for a model with 3 layers"),
        (dict(lattice_layers=[-4]), "index -4 is out of range"),
        (dict(lattice_layers="every:0"), "out of range"),
        (dict(lattice_layers="last:9"), "out of range"),
        (dict(lattice_layers="some"), "lattice_layers must be"),
        (dict(lattice_layers=[1.5]), "integer layer indices"),
        (dict(lattice_layers="all", lattice_slots=0), "lattice_slots \\(m\\) must be an integer >= 1"),
        (dict(lattice_layers="all", lattice_chunk_size=0), "lattice_chunk_size must be an integer >= 1"),
        (dict(lattice_layers="all", lattice_feature_map="relu"), "lattice_feature_map must be one of"),
        (dict(lattice_layers="all", lattice_gates="fast"), "lattice_gates must be one of"),
        (dict(lattice_layers="all", lattice_backend="cuda"), "lattice_backend must be one of"),
        (dict(lattice_layers="all", lattice_backend="recurrent", lattice_gates="chunk"), "needs a chunked backend"),
    ],
)
def test_bad_config_values_raise_one_clear_error(overrides, message):
    with pytest.raises(LatticeConfigError, match=message):
        tiny_config(**overrides)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_every_feature_map_name_builds_a_model_with_bounded_codes(feature_map):
    config = LatticeConfig(**TINY_MODEL, lattice_layers="all", lattice_feature_map=feature_map)
    LatticeGPT(config)
    codes = code_map(torch.randn(3, 5, 7) * 10, feature_map)
    assert codes.abs().max() <= 1  # with beta in (0, 1): |gamma| < 1 (docs/math.md §2)


def test_latent_attention_cannot_become_lattice():
    latent = dict(q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
    with pytest.raises(LatticeConfigError, match="latent attention"):
        tiny_config(n_query_groups=4, latent_attention=latent, lattice_layers="all")


def test_model_config_yaml_keeps_the_lattice_fields(tmp_path):
    config = tiny_config(lattice_layers="every:2", lattice_slots=12, lattice_output_gate=True)
    save_config(config, tmp_path)
    loaded = LatticeConfig.from_file(tmp_path / "model_config.yaml")
    assert asdict(loaded) == asdict(config)
    assert loaded.lattice_layers == [1] and loaded.lattice_slots == 12 and loaded.lattice_output_gate


@pytest.mark.parametrize("layers", ["all", "every:2"])
@pytest.mark.parametrize("output_gate", [False, True])
def test_forward_backward_reaches_every_parameter(layers, output_gate):
    model = LatticeGPT(tiny_config(lattice_layers=layers, lattice_slots=6, lattice_output_gate=output_gate))
    idx = torch.randint(0, 512, (2, 21))
    loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten())
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    mixers = [block.attn for block in model.transformer.h if isinstance(block.attn, LatticeMixer)]
    assert len(mixers) == len(model.config.lattice_layers) > 0


@pytest.mark.parametrize("autocast", [False, True])
def test_the_op_takes_the_activation_dtype(monkeypatch, autocast):
    """Under bf16 autocast the op gets 16-bit q/k/v/beta (its gates stay float32 inside); float32 otherwise."""
    import lattice_plugin.model as model_module

    seen = []

    def recording(q, k, v, beta, s0, **options):
        seen.append({x.dtype for x in (q, k, v, beta)})
        return original(q, k, v, beta, s0, **options)

    original = model_module.lattice_attention
    monkeypatch.setattr(model_module, "lattice_attention", recording)
    model = LatticeGPT(tiny_config(lattice_layers="all", lattice_slots=6, lattice_output_gate=True))
    idx = torch.randint(0, 512, (2, 21))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(idx)
    logits.float().sum().backward()
    assert seen == [{torch.bfloat16 if autocast else torch.float32}] * model.config.n_layer
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("layers", ["all", "every:2"])
def test_greedy_generation_with_the_cache_equals_recomputing(layers):
    torch.manual_seed(1)
    model = LatticeGPT(tiny_config(lattice_layers=layers)).eval()
    prompt = torch.randint(0, 512, (11,))
    with torch.no_grad():
        recomputed = prompt
        for _ in range(15):  # no cache: the whole sequence every step
            recomputed = torch.cat([recomputed, model(recomputed[None])[0, -1].argmax()[None]])
        model.set_kv_cache(batch_size=1)
        cached = generate(model, prompt, max_returned_tokens=26, temperature=1.0, top_k=1)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("layers", ["all", "every:2"])
def test_prefill_then_decode_logits_match_the_full_forward(layers):
    model = LatticeGPT(tiny_config(lattice_layers=layers)).eval()
    idx = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=2)
        steps = [model(idx[:, :19], input_pos=torch.arange(19))]
        steps += [model(idx[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(19, 30)]
        # a new prompt at position 0 starts over from the learned slots
        restarted = model(idx[:, :19], input_pos=torch.arange(19))
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4
    assert (restarted - full[:, :19]).abs().max() < 1e-4


def test_cache_bytes_do_not_depend_on_the_context_length():
    config = tiny_config(lattice_layers="all", lattice_slots=6)
    model = LatticeGPT(config)
    state_bytes = config.n_layer * 2 * config.n_query_groups * config.head_size * 6 * 4  # (B, Hkv, d, m) float32
    assert cache_bytes(model, 64, batch_size=2) == cache_bytes(model, 1 << 20, batch_size=2) == state_bytes
    model.set_kv_cache(batch_size=2, max_seq_length=64)
    assert all(isinstance(block.attn.kv_cache, LatticeCache) for block in model.transformer.h)
    assert model.mask_cache.untyped_storage().nbytes() == 1  # a broadcast view, no T x T mask
    hybrid = LatticeGPT(tiny_config(lattice_layers="every:2", lattice_slots=6))
    grown = cache_bytes(hybrid, 128) - cache_bytes(hybrid, 64)
    attention_layers = config.n_layer - len(hybrid.config.lattice_layers)
    assert grown == attention_layers * 2 * config.n_query_groups * 64 * config.head_size * 2  # only the KV caches


def test_inspect_words_the_cache_comparison_and_stays_within_the_block_size():
    plain = build_meta_model(LatticeConfig(**TINY_MODEL))
    same = cache_bytes(plain, 16)
    assert compare_sizes(same, same) == "same"
    assert compare_sizes(1024, 4096) == "4.0x smaller" and compare_sizes(4096, 1024) == "4.0x larger"
    assert default_context_lengths(128) == [128]
    assert default_context_lengths(131072) == [2048, 32768, 131072]


def test_the_cache_refuses_rewinds_skips_and_oversized_batches():
    model = LatticeGPT(tiny_config(lattice_layers="all")).eval()
    idx = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        model.set_kv_cache(batch_size=2)
        model(idx[:, :10], input_pos=torch.arange(10))
        with pytest.raises(LatticeCacheError, match="cannot rewind or skip.*position 5.*position 10"):
            model(idx[:, :1], input_pos=torch.tensor([5]))
        with pytest.raises(LatticeCacheError, match="cannot rewind or skip"):
            model(idx[:, :1], input_pos=torch.tensor([11]))
        with pytest.raises(LatticeCacheError, match="same positions for every sequence"):
            model(idx[:, :1], input_pos=torch.tensor([[10], [11]]))
        with pytest.raises(LatticeCacheError, match="built for 2"):
            model(torch.randint(0, 512, (3, 1)), input_pos=torch.tensor([10]))
        model(idx[:1, 10:11], input_pos=torch.tensor([10]))  # a smaller batch continues its rows


def test_meta_device_init_resets_every_parameter():
    """FSDP builds on the meta device and calls reset_parameters(): every Lattice parameter must have one."""
    with torch.device("meta"):
        model = LatticeGPT(tiny_config(lattice_layers="all", lattice_output_gate=True))
    model.to_empty(device="cpu")
    for parameter in model.parameters():
        parameter.data.fill_(float("nan"))
    reset_parameters(model)
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter).all(), name
    code_map = model.transformer.h[0].attn.q_code
    assert isinstance(code_map, HeadwiseLinear) and torch.equal(code_map.weight[0], torch.eye(8))


def test_lora_model_loads_base_weights_trains_only_lora_and_merges():
    base = LatticeGPT(tiny_config(lattice_layers="every:2"))
    lora_fields = dict(lora_r=4, lora_alpha=8, lora_query=True, lora_value=True, lora_projection=True, lora_mlp=True)
    model = LoRALatticeGPT(
        LoRALatticeConfig(**{**TINY_MODEL, "lattice_chunk_size": 8, "lattice_layers": "every:2"}, **lora_fields)
    )
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert result.missing_keys and all("lora_" in key for key in result.missing_keys)
    assert not result.unexpected_keys
    idx = torch.randint(0, 512, (2, 13))
    assert torch.allclose(model(idx), base(idx), atol=1e-6)  # LoRA B starts at zero
    mark_only_lora_as_trainable(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert any(
        ".attn.qkv.lora_" in name and isinstance(model.transformer.h[1].attn, LatticeMixer) for name in trainable
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    model.eval()
    before = model(idx)
    merge_lora_weights(model)
    assert (model(idx) - before).abs().max() < 1e-4


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "recipes" / "pretrain").glob("*.yaml")), ids=str)
def test_shipped_pretrain_recipes_build_valid_configs(recipe):
    config = LatticeConfig(**yaml.safe_load(recipe.read_text())["model_config"])
    assert config.n_layer > 0
