"""The reference operators against the definition (docs/math.md §3-4) on fresh random inputs of awkward sizes."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lattice_plugin.kernels.gates import slot_gates

from lattice_plugin.bench import vanishing_gate_inputs
from lattice_plugin.errors import LatticeError
from lattice_plugin.ops import lattice_attention, lattice_step

FLAGS = list(itertools.product((True, False), repeat=2))  # (orthogonal, normalize)


def random_inputs(B=2, T=37, Hq=6, Hkv=2, m=5, d=7, dtype=torch.float64, feature="softmax", seed=None):
    """Inputs as the mixer makes them: softmax codes, unit values, sigmoid steps (|beta * k| < 1)."""
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
    code = {"softmax": lambda x: torch.softmax(x, -1), "tanh": torch.tanh}[feature]
    q = code(torch.randn(B, T, Hq, m, generator=g, dtype=dtype))
    k = code(torch.randn(B, T, Hkv, m, generator=g, dtype=dtype))
    v = F.normalize(torch.randn(B, T, Hkv, d, generator=g, dtype=dtype), dim=-1)
    beta = torch.sigmoid(torch.randn(B, T, Hkv, generator=g, dtype=dtype))
    s0 = torch.randn(Hkv, d, m, generator=g, dtype=dtype)
    initial_state = torch.randn(B, Hkv, d, m, generator=g, dtype=dtype)
    return q, k, v, beta, s0, initial_state


def literal_lattice(q, k, v, beta, s0, initial_state, orthogonal, normalize):
    """docs/math.md §3 read aloud, one slot and one token at a time, in numpy float64."""
    q, k, v, beta = (x.double().numpy() for x in (q, k, v, beta))
    B, T, Hq, m = q.shape
    H, G = k.shape[2], Hq // k.shape[2]
    if initial_state is None:  # the learned slots start on the sphere
        S = np.broadcast_to(s0.double().numpy(), (B,) + tuple(s0.shape)).copy()
        S /= np.linalg.norm(S, axis=2, keepdims=True)
    else:  # a given state is used as it is, unless the slots live on the sphere
        S = initial_state.double().numpy().copy()
        if normalize:
            S /= np.linalg.norm(S, axis=2, keepdims=True)
    out = np.zeros((B, T, Hq, v.shape[-1]))
    for b, h, t in itertools.product(range(B), range(H), range(T)):
        value = v[b, t, h]
        for i in range(m):
            slot = S[b, h, :, i]
            update = value - (slot @ value) / (slot @ slot) * slot if orthogonal else value
            slot = slot + beta[b, t, h] * k[b, t, h, i] * update
            S[b, h, :, i] = slot / np.linalg.norm(slot) if normalize else slot
        for g in range(G):
            out[b, t, h * G + g] = S[b, h] @ q[b, t, h * G + g]
    return torch.from_numpy(out), torch.from_numpy(S)


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 64])
@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("orthogonal,normalize", FLAGS)
def test_chunkwise_exact_equals_recurrence_float64(chunk_size, with_initial_state, orthogonal, normalize):
    q, k, v, beta, s0, init = random_inputs(T=37 if chunk_size != 64 else 75)
    init = init if with_initial_state else None
    kwargs = dict(initial_state=init, output_final_state=True, orthogonal=orthogonal, normalize=normalize)
    o_ref, state_ref = lattice_attention(q, k, v, beta, s0, backend="recurrent", **kwargs)
    o, state = lattice_attention(q, k, v, beta, s0, backend="torch", chunk_size=chunk_size, **kwargs)
    assert o.shape == (2, q.shape[1], 6, 7) and state.shape == (2, 2, 7, 5)
    assert (o - o_ref).abs().max() < 1e-10
    assert (state - state_ref).abs().max() < 1e-10


@pytest.mark.parametrize("orthogonal,normalize", FLAGS)
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_ablations_equal_their_definitions(orthogonal, normalize, with_initial_state):
    q, k, v, beta, s0, init = random_inputs(B=1, T=13, Hq=4, Hkv=2, m=3, d=5, feature="tanh")
    init = init if with_initial_state else None
    expected_o, expected_state = literal_lattice(q, k, v, beta, s0, init, orthogonal, normalize)
    kwargs = dict(initial_state=init, output_final_state=True, orthogonal=orthogonal, normalize=normalize)
    for backend in ("recurrent", "torch"):
        o, state = lattice_attention(q, k, v, beta, s0, backend=backend, chunk_size=4, **kwargs)
        assert (o - expected_o).abs().max() < 1e-10, backend
        assert (state - expected_state).abs().max() < 1e-10, backend


def test_additive_unnormalised_variant_is_causal_linear_attention():
    q, k, v, beta, s0, _ = random_inputs(T=29)
    o, _ = lattice_attention(q, k, v, beta, s0, chunk_size=8, orthogonal=False, normalize=False)
    S0 = F.normalize(s0, dim=1)  # slots start unit-norm, then grow freely: S_t = S_0 + sum_j v_j (beta_j k_j)^T
    gamma = beta.unsqueeze(-1) * k  # (B, T, Hkv, m)
    G = q.shape[2] // k.shape[2]
    gamma_q = gamma.repeat_interleave(G, dim=2)
    v_q = v.repeat_interleave(G, dim=2)
    scores = torch.einsum("bthm,bshm->bhts", q, gamma_q).tril()  # (gamma_s . q_t) for s <= t
    expected = torch.einsum("hdm,bthm->bthd", S0.repeat_interleave(G, dim=0), q)
    expected = expected + torch.einsum("bhts,bshd->bthd", scores, v_q)
    assert (o - expected).abs().max() < 1e-10


def test_chunk_gates_equal_exact_at_chunk_size_one_and_approximate_otherwise():
    q, k, v, beta, s0, _ = random_inputs()
    exact, _ = lattice_attention(q, k, v, beta, s0, chunk_size=16, gates="exact")
    frozen_1, _ = lattice_attention(q, k, v, beta, s0, chunk_size=1, gates="chunk")
    frozen_16, _ = lattice_attention(q, k, v, beta, s0, chunk_size=16, gates="chunk")
    assert (frozen_1 - exact).abs().max() < 1e-12
    assert (frozen_16 - exact).abs().max() > 1e-4  # freezing the gates is an approximation


def test_gates_keep_slots_unit_norm_over_10k_tokens():
    """The closed-form gates alone (no renormalisation) keep every slot on the sphere in float64."""
    q, k, v, beta, s0, _ = random_inputs(B=1, T=10_000, Hq=1, Hkv=1, m=4, d=8)
    state = F.normalize(s0[0], dim=0)  # (d, m)
    for t in range(q.shape[1]):
        value = v[0, t, 0]
        a, b, _ = slot_gates(
            value @ state, beta[0, t, 0] * k[0, t, 0], value @ value, None, orthogonal=True, normalize=True
        )
        state = a * state + value[:, None] * b
    assert (state.norm(dim=0) - 1).abs().max() < 1e-6
    # the chunkwise backend (which renormalises at chunk ends) agrees with the literal recurrence over 10k tokens
    _, chunked = lattice_attention(q, k, v, beta, s0, chunk_size=64, output_final_state=True)
    _, literal = lattice_attention(q, k, v, beta, s0, backend="recurrent", output_final_state=True)
    assert (chunked - literal).abs().max() < 1e-8


@pytest.mark.parametrize("gates", ["exact", "chunk"])
@pytest.mark.parametrize("orthogonal,normalize", FLAGS)
def test_torch_backend_gradients(gates, orthogonal, normalize):
    q, k, v, beta, s0, init = random_inputs(B=1, T=7, Hq=4, Hkv=2, m=3, d=4)
    options = dict(chunk_size=3, gates=gates, orthogonal=orthogonal, normalize=normalize, output_final_state=True)

    def from_s0(q, k, v, beta, s0):
        return lattice_attention(q, k, v, beta, s0, backend="torch", **options)

    def from_state(q, k, v, beta, init):
        return lattice_attention(q, k, v, beta, s0, initial_state=init, backend="torch", **options)

    leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, s0, init)]
    assert torch.autograd.gradcheck(from_s0, leaves[:5], fast_mode=True)
    assert torch.autograd.gradcheck(from_state, leaves[:4] + leaves[5:], fast_mode=True)
    if gates == "exact":  # and they equal autograd through the token-by-token recurrence
        for fn in (from_s0, from_state):
            inputs = leaves[:5] if fn is from_s0 else leaves[:4] + leaves[5:]
            o, state = fn(*inputs)
            grads = torch.autograd.grad((o * o.detach().sin()).sum() + (state * state).sum(), inputs)
            o_ref, state_ref = lattice_attention(
                *inputs[:4],
                inputs[4] if fn is from_s0 else s0,
                initial_state=None if fn is from_s0 else inputs[4],
                backend="recurrent",
                **{k_: v_ for k_, v_ in options.items() if k_ not in ("chunk_size", "gates")},
            )
            ref_grads = torch.autograd.grad((o_ref * o.detach().sin()).sum() + (state_ref * state_ref).sum(), inputs)
            for grad, ref in zip(grads, ref_grads):
                assert (grad - ref).abs().max() < 1e-10


@pytest.mark.parametrize("gates", ["exact", "chunk"])
def test_torch_backend_gradients_through_vanishing_gates(gates):
    """Forget gates of exactly 0 (``vanishing_gate_inputs``; bf16 rounding makes them in training): the chunkwise
    reference's gradients still equal finite differences, as a log-space product (no derivative at 0) would not."""
    q, k, v, beta, init = (x.double() for x in vanishing_gate_inputs(1, 40, 2, 1, 8, 8, every=8))
    s0 = init[0]
    options = dict(backend="torch", chunk_size=16, gates=gates, output_final_state=True)

    def fn(q, k, v, beta, init):
        return lattice_attention(q, k, v, beta, s0, initial_state=init, **options)

    leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, init)]
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


@pytest.mark.parametrize("orthogonal,normalize", FLAGS)
def test_decode_steps_continue_a_prefill(orthogonal, normalize):
    q, k, v, beta, s0, _ = random_inputs(T=20)
    flags = dict(orthogonal=orthogonal, normalize=normalize)
    full, _ = lattice_attention(q, k, v, beta, s0, backend="recurrent", **flags)
    prefix, state = lattice_attention(
        q[:, :12], k[:, :12], v[:, :12], beta[:, :12], s0, chunk_size=5, output_final_state=True, **flags
    )
    outputs = [prefix]
    for t in range(12, 20):
        o, returned = lattice_step(q[:, t], k[:, t], v[:, t], beta[:, t], state, inplace=True, **flags)
        assert returned is state
        outputs.append(o.unsqueeze(1))
    assert (torch.cat(outputs, 1) - full).abs().max() < 1e-10


def test_low_precision_inputs_use_float32_state():
    q, k, v, beta, s0, _ = random_inputs(dtype=torch.float32)
    o32, state32 = lattice_attention(q, k, v, beta, s0, chunk_size=16, output_final_state=True)
    o16, state16 = lattice_attention(
        q.bfloat16(), k.bfloat16(), v.bfloat16(), beta.bfloat16(), s0, chunk_size=16, output_final_state=True
    )
    assert o16.dtype == torch.bfloat16 and state16.dtype == torch.float32
    assert (o16.float() - o32).norm() / o32.norm() < 2e-2


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(k=lambda x: x[:, :, :1]), "inconsistent shapes"),
        (dict(q=lambda x: x[:, :, :5]), "multiple of key/value heads"),
        (dict(s0=lambda x: x[:, :, :2]), "s0 must have shape"),
        (dict(chunk_size=0), "chunk_size must be a positive integer"),
        (dict(gates="fast"), "unknown Lattice gates mode"),
        (dict(backend="cuda"), "unknown Lattice backend"),
        (dict(backend="recurrent", gates="chunk"), "needs a chunked backend"),
        (dict(backend="triton"), "needs CUDA tensors"),
    ],
)
def test_bad_inputs_raise_one_clear_error(change, message):
    q, k, v, beta, s0, _ = random_inputs(T=5)
    tensors = dict(q=q, k=k, v=v, beta=beta, s0=s0)
    options = {}
    for name, value in change.items():
        if name in tensors:
            tensors[name] = value(tensors[name])
        else:
            options[name] = value
    with pytest.raises(LatticeError, match=message):
        lattice_attention(tensors["q"], tensors["k"], tensors["v"], tensors["beta"], tensors["s0"], **options)
