"""The fused decode-layer kernel against the layer's unfused decode step, on the CPU through Triton's interpreter.

Awkward sizes (head size 12 with RoPE on 6 of its entries, 5 slots, grouped queries, batch 3), every feature map,
the ablations, per-row RoPE tables, float32 and bfloat16 weights, fresh random weights and states every run.
"""

import os
import sys

import pytest

# as in test_triton_kernels.py: switch the interpreter on before the kernels' module is (re-)imported
os.environ["TRITON_INTERPRET"] = "1"
for _name in [n for n in sys.modules if n.split(".")[0] == "triton" and not n.startswith("triton._C")]:
    del sys.modules[_name]
for _name in [n for n in sys.modules if n.startswith("lattice_plugin.kernels.triton_")]:
    del sys.modules[_name]
pytest.importorskip("triton")

import torch  # noqa: E402
from lattice_plugin.kernels.gates import normalize_slots  # noqa: E402
from lattice_plugin.kernels.triton_step import lattice_decode_layer_triton  # noqa: E402
from litgpt.model import build_rope_cache  # noqa: E402

from lattice_plugin.cache import LatticeCache  # noqa: E402
from lattice_plugin.config import LatticeConfig  # noqa: E402
from lattice_plugin.model import LatticeMixer  # noqa: E402

SHAPE = dict(
    n_embd=48,
    n_head=4,
    n_query_groups=2,
    rotary_percentage=0.5,
    block_size=64,
    padded_vocab_size=64,
    lattice_layers="all",
    lattice_slots=5,
    norm_eps=1e-5,
)  # head size 12, RoPE on 6 entries


def run_both(dtype, batch=3, per_row_rope=False, **fields):
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    config = LatticeConfig(**{**SHAPE, **fields})
    mixer = LatticeMixer(config, 0).eval()
    with torch.no_grad():
        for parameter in mixer.parameters():  # random everything, the norm scale and code maps included
            parameter.copy_(torch.randn_like(parameter) * (0.3 if parameter.dim() > 1 else 1.0))
    mixer = mixer.to(dtype)
    state = torch.randn(batch, config.n_query_groups, config.head_size, config.lattice_slots)
    state = normalize_slots(state) if config.lattice_normalize else state
    mixer.kv_cache = LatticeCache(batch, config.n_query_groups, config.head_size, config.lattice_slots)
    mixer.kv_cache.state.copy_(state)
    mixer.kv_cache.seek(17)
    mixer.kv_cache.begin(17, 1, batch)
    cos, sin = build_rope_cache(64, config.rope_n_elem)
    rows = torch.tensor([17, 40, 3][:batch]) if per_row_rope else torch.tensor([17])
    cos, sin = cos[rows].unsqueeze(1).to(dtype), sin[rows].unsqueeze(1).to(dtype)
    x = torch.randn(batch, 1, config.n_embd, dtype=dtype)
    with torch.no_grad():
        expected = mixer(x, cos, sin, input_pos=torch.tensor([17]))  # the unfused step (CPU tensors)
        expected_state = mixer.kv_cache.state.clone()
        new_state = state.clone()
        o = lattice_decode_layer_triton(
            mixer.qkv(x).view(batch, -1),
            mixer.beta_proj(x).view(batch, -1),
            cos.reshape(cos.shape[0], -1) if config.lattice_rope else None,
            sin.reshape(sin.shape[0], -1) if config.lattice_rope else None,
            mixer.q_code.weight,
            mixer.k_code.weight,
            mixer.out_norm.weight,
            new_state,
            feature_map=config.lattice_feature_map,
            eps=config.norm_eps,
            orthogonal=config.lattice_orthogonal,
            normalize=config.lattice_normalize,
        )
        fused = mixer.proj(o.view(batch, 1, -1))
    return fused, expected, new_state, expected_state


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("feature_map", ["softmax", "sigmoid", "tanh", "l2"])
def test_fused_decode_layer_float32(feature_map):
    fused, expected, state, expected_state = run_both(torch.float32, lattice_feature_map=feature_map)
    assert rel_err(fused, expected) < 1e-5 and rel_err(state, expected_state) < 1e-5


@pytest.mark.parametrize("orthogonal, normalize", [(False, True), (True, False), (False, False)])
def test_fused_decode_layer_ablations(orthogonal, normalize):
    fused, expected, state, expected_state = run_both(
        torch.float32, lattice_orthogonal=orthogonal, lattice_normalize=normalize
    )
    assert rel_err(fused, expected) < 1e-5 and rel_err(state, expected_state) < 1e-5


def test_fused_decode_layer_per_row_positions_no_rope_mha():
    fused, expected, state, expected_state = run_both(torch.float32, per_row_rope=True)
    assert rel_err(fused, expected) < 1e-5 and rel_err(state, expected_state) < 1e-5
    fused, expected, state, expected_state = run_both(torch.float32, batch=1, lattice_rope=False, n_query_groups=4)
    assert rel_err(fused, expected) < 1e-5 and rel_err(state, expected_state) < 1e-5


def test_fused_decode_layer_bfloat16():
    """Same roundings as the unfused layer, different summation orders: within bfloat16 resolution."""
    fused, expected, state, expected_state = run_both(torch.bfloat16)
    assert rel_err(fused, expected) < 2e-2 and rel_err(state, expected_state) < 1e-2
