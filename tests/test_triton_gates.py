"""The matmul gate passes (kernels/triton_gates_fwd.py and triton_gates_bwd.py) on the CPU through Triton's
interpreter.

Frozen chunk gates against the float64 chunkwise reference, converged fixed-point gates against the float64
token-by-token recurrence (values and every gradient), few iterations against the plain-PyTorch fixed point (values
and residual) and against the recurrence (gradients converge with the iterations). Awkward shapes, fresh random
inputs every run.
"""

# isort: off
from test_triton_kernels import check, random_inputs, rel_err  # first: it switches Triton's interpreter on
# isort: on

import math
import sys

import numpy as np
import pytest
import torch
from lattice_plugin.kernels.chunk import chunk_lattice
from lattice_plugin.kernels.fixed_point import fixed_point_lattice
from lattice_plugin.kernels.gates import normalize_slots
from lattice_plugin.kernels.recurrent import recurrent_lattice
from lattice_plugin.kernels.triton_chunk import chunk_lattice_triton
from lattice_plugin.kernels.triton_gates_fwd import matmul_gate_pass

from lattice_plugin.bench import negative_gate_inputs, vanishing_gate_inputs
from lattice_plugin.ops import resolve_gate_solver


def compare(
    dtype, shape, *, gates, reference, chunk_size=64, iters=16, orthogonal=True, inputs=None, gate_solver="fixed_point"
):
    """Relative errors of outputs, final state and every gradient against a float64 ``reference(q, k, v, beta, s)``."""
    q, k, v, beta, s0 = inputs if inputs is not None else random_inputs(*shape, per_batch_state=True)
    ins = [x.detach().to(dtype, copy=True).requires_grad_() for x in (q, k, v, beta)]
    s_leaf = s0.clone().requires_grad_()
    o, final = chunk_lattice_triton(
        *ins,
        normalize_slots(s_leaf),
        chunk_size=chunk_size,
        gates=gates,
        orthogonal=orthogonal,
        gate_solver=gate_solver,
        fixed_point_iters=iters,
    )
    d_o, d_final = torch.randn(o.shape), torch.randn(final.shape)
    ((o.float() * d_o).sum() + (final * d_final).sum()).backward()
    refs = [x.detach().double().requires_grad_() for x in ins]
    s_ref = s0.double().requires_grad_()
    ro, rf, *_ = reference(*refs, normalize_slots(s_ref))
    ((ro * d_o.double()).sum() + (rf * d_final.double()).sum()).backward()
    errors = {"o": rel_err(o, ro), "final": rel_err(final, rf), "s0": rel_err(s_leaf.grad, s_ref.grad)}
    errors.update({f"d{n}": rel_err(x.grad, r.grad) for n, x, r in zip(("q", "k", "v", "beta"), ins, refs)})
    return errors


@pytest.mark.parametrize(
    "shape,chunk_size",
    [
        ((1, 50, 2, 1, 16, 16), 32),  # one step per chunk, ragged end
        ((1, 50, 2, 1, 20, 24), 48),  # 16-token steps reading the carried chunk-start state
        ((2, 100, 4, 2, 12, 40), 64),  # 64-token steps, masked tail tokens, GQA
        ((1, 150, 1, 1, 48, 80), 128),  # steps shorter than the chunk, m=48, d=80
    ],
)
def test_frozen_gates_float32(shape, chunk_size):
    reference = lambda *x: chunk_lattice(*x, chunk_size=chunk_size, gates="chunk")  # noqa: E731
    check(compare(torch.float32, shape, gates="chunk", chunk_size=chunk_size, reference=reference), torch.float32)


def test_frozen_gates_additive_write():
    """``orthogonal=False`` (the additive write then retraction) through both matmul passes."""
    reference = lambda *x: chunk_lattice(*x, chunk_size=32, gates="chunk", orthogonal=False)  # noqa: E731
    errors = compare(
        torch.float32, (1, 45, 2, 1, 20, 24), gates="chunk", chunk_size=32, orthogonal=False, reference=reference
    )
    check(errors, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_gates_that_grow_the_slots(dtype):
    """Frozen gates let a slot grow inside a chunk (docs/math.md §4): values that overlap slot 0 by ``c = -0.5``,
    written into it with ``beta k = 0.9``, grow it over a thousandfold by the chunk's end. The kernels must still
    equal the float64 reference there, in float32 and bf16."""
    B, T, Hq, H, m, d = 1, 70, 2, 1, 16, 20
    q, _, _, _, s0 = random_inputs(B, T, Hq, H, m, d, per_batch_state=True)
    q = 0.1 * q
    q[..., 0] = 1.0  # the outputs read slot 0 (its norm, give or take 10%)
    u = normalize_slots(s0)[..., 0].unsqueeze(1)  # (B, 1, H, d): slot 0's direction
    w = torch.randn(B, T, H, d)
    w = torch.nn.functional.normalize(w - (w * u).sum(-1, keepdim=True) * u, dim=-1)
    v = -0.5 * u + 0.75**0.5 * w
    k = torch.zeros(B, T, H, m)
    k[..., 0] = 1.0
    beta = torch.full((B, T, H), 0.9)
    reference = lambda *x: chunk_lattice(*x, chunk_size=64, gates="chunk")  # noqa: E731
    o = reference(*(x.double() for x in (q, k, v, beta, normalize_slots(s0))))[0]
    assert o.norm(dim=-1).max() > 1000  # the case does grow the slot
    errors = compare(dtype, (B, T, Hq, H, m, d), gates="chunk", reference=reference, inputs=(q, k, v, beta, s0))
    check(errors, dtype)


@pytest.mark.parametrize("gates", ["chunk", "exact"])
def test_gates_past_zero_from_rounded_inputs(gates):
    """Slightly negative forget gates (lattice_plugin.bench.negative_gate_inputs): the matmul gate passes keep the sign
    of every product, as the reference does, instead of a non-finite ``log a``."""
    B, T, Hq, H, m, d = 1, 64, 1, 1, 16, 16
    reference = lambda *x: chunk_lattice(*x, chunk_size=64, gates="chunk")  # noqa: E731
    if gates == "exact":
        reference = recurrent_lattice
    inputs = negative_gate_inputs(B, T, Hq, H, m, d)
    errors = compare(torch.float32, (B, T, Hq, H, m, d), gates=gates, reference=reference, inputs=inputs)
    # gradients through a gate of -0.002 scale float32 rounding by 1 / |a|: up to 7e-4 seen in 40 draws, not 1e-4
    assert all(e <= 3e-3 for e in errors.values()), errors  # NaN fails too


@pytest.mark.parametrize("every", [16, 2])
@pytest.mark.parametrize("gates", ["chunk", "exact"])
def test_default_solver_through_vanishing_gates(gates, every):
    """Forget gates of exactly 0 (lattice_plugin.bench.vanishing_gate_inputs), one per sub-chunk or every other token:
    the default solver's values and every gradient equal the float64 references."""
    shape = (1, 64, 2, 1, 16, 16)
    reference = recurrent_lattice if gates == "exact" else lambda *x: chunk_lattice(*x, chunk_size=64, gates="chunk")
    inputs = vanishing_gate_inputs(*shape, every=every)
    solver = resolve_gate_solver("auto")
    check(
        compare(torch.float32, shape, gates=gates, gate_solver=solver, reference=reference, inputs=inputs),
        torch.float32,
    )


@pytest.mark.parametrize("every", [16, 2])
def test_matmul_passes_stay_finite_at_vanishing_gates(every):
    """The frozen-gate matmul passes (opt-in) at gates of exactly 0: outputs, final state, ``dq`` and ``ds0`` exact,
    and no NaN. Their ``dk``, ``dv`` and ``dbeta`` there are not exact: ``dL/d log a`` has no ``dL/da`` at ``a = 0``
    and they pass no gradient through such a gate (docs/math.md §4b)."""
    shape = (1, 64, 2, 1, 16, 16)
    reference = lambda *x: chunk_lattice(*x, chunk_size=64, gates="chunk")  # noqa: E731
    inputs = vanishing_gate_inputs(*shape, every=every)
    errors = compare(torch.float32, shape, gates="chunk", reference=reference, inputs=inputs)
    assert all(math.isfinite(e) for e in errors.values()), errors
    check({n: errors[n] for n in ("o", "final", "dq", "s0")}, torch.float32)


def _round_to_tf32(x: np.ndarray) -> np.ndarray:
    """Round float32 values to tf32's 10-bit mantissa (nearest), as a GPU's tf32 matmul reads its operands."""
    if x.dtype != np.float32:
        return x
    bits = x.view(np.uint32).astype(np.uint64)
    return ((bits + 0x1000) & 0xFFFFE000).astype(np.uint32).view(np.float32)


@pytest.fixture
def tf32_dots(monkeypatch):
    """Triton's interpreter computes every ``tl.dot`` in float32; this makes ``input_precision="tf32"`` dots round
    their operands as the GPU does, so that the CPU sees what 16-bit inputs meet on a GPU."""
    interpreter = sys.modules["triton.runtime.interpreter"]
    create_dot = interpreter.InterpreterBuilder.create_dot

    def tf32_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if str(input_precision).lower().endswith("tf32"):
            a = interpreter.TensorHandle(_round_to_tf32(a.data), a.dtype.scalar)
            b = interpreter.TensorHandle(_round_to_tf32(b.data), b.dtype.scalar)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", tf32_dot)


def test_default_solver_under_tf32_near_zero_gates(tf32_dots):
    """bf16 inputs whose gates sit near -0.002 (negative_gate_inputs), tf32 matmuls as on a GPU: the default solver
    for frozen gates keeps every gradient within bf16's tolerance of the float64 reference. (The matmul passes
    divide a tf32-rounded ``dL/d log a`` by the gate: 10-16% errors in ``dbeta`` here, NaN on a GPU where a gate
    rounded to 0; ops.resolve_gate_solver.)"""
    shape = (1, 128, 2, 2, 32, 32)
    reference = lambda *x: chunk_lattice(*x, chunk_size=64, gates="chunk")  # noqa: E731
    errors = compare(
        torch.bfloat16,
        shape,
        gates="chunk",
        gate_solver=resolve_gate_solver("auto"),
        reference=reference,
        inputs=negative_gate_inputs(*shape),
    )
    check(errors, torch.bfloat16)


@pytest.mark.parametrize("orthogonal", [True, False])
@pytest.mark.parametrize("shape", [(1, 21, 1, 1, 16, 16), (2, 70, 2, 1, 12, 20), (1, 17, 1, 1, 48, 80)])
def test_converged_fixed_point_is_exact(shape, orthogonal):
    """16 iterations on 16-token sub-chunks are exact (the map is causal): the recurrence itself is the reference."""
    reference = lambda *x: recurrent_lattice(*x, orthogonal=orthogonal)  # noqa: E731
    errors = compare(torch.float32, shape, gates="exact", orthogonal=orthogonal, reference=reference)
    check(errors, torch.float32)


@pytest.mark.parametrize("gates", ["exact", "chunk"])
def test_bfloat16(gates):
    shape = (1, 33, 2, 1, 20, 24)
    if gates == "exact":
        reference = recurrent_lattice
    else:
        reference = lambda *x: chunk_lattice(*x, chunk_size=32, gates="chunk")  # noqa: E731
    check(compare(torch.bfloat16, shape, gates=gates, chunk_size=32, reference=reference), torch.bfloat16)


@pytest.mark.parametrize("iters", [1, 2, 3])
def test_few_iterations_match_the_reference_and_its_residual(iters):
    """The kernel's c^(K) (so its outputs and final state) and residual are the plain-PyTorch fixed point's."""
    B, T, Hq, H, m, d = 1, 45, 2, 1, 20, 24
    q, k, v, beta, s0 = random_inputs(B, T, Hq, H, m, d, per_batch_state=True)
    k = torch.softmax(4 * k, dim=-1)
    state = normalize_slots(s0)
    o, final = chunk_lattice_triton(q, k, v, beta, state, gate_solver="fixed_point", fixed_point_iters=iters)
    ro, rf, res_ref = fixed_point_lattice(*(x.double() for x in (q, k, v, beta, state)), iters=iters)
    pad = -T % 16
    padded = [torch.cat([x, x.new_zeros(B, pad, *x.shape[2:])], dim=1) for x in (k, v, beta)]
    *_, res = matmul_gate_pass(*padded, state, chunk_size=64, exact=True, iters=iters, orthogonal=True, prec="ieee")
    assert rel_err(o, ro) < 1e-5 and rel_err(final, rf) < 1e-5
    # the residual is a difference of two iterates of O(1) gates: float32 leaves it an absolute error of a few ulps
    # of 1 (2.4e-7 seen on a 1.1e-4 residual), whatever its size
    assert res_ref > 1e-7 and abs(res.item() - res_ref.item()) <= 1e-3 * res_ref.item() + 1e-6, (res, res_ref)


def test_rejects_unnormalised_slots():
    q, k, v, beta, s0 = random_inputs(1, 4, 1, 1, 16, 16, per_batch_state=True)
    with pytest.raises(ValueError, match="normalize=True"):
        chunk_lattice_triton(q, k, v, beta, s0, normalize=False, gate_solver="fixed_point")


def test_few_iteration_gradients_converge():
    """The truncated adjoint (K + 1 evaluations) approaches the exact gradients as K grows."""
    shape = (1, 40, 2, 1, 20, 24)
    q, k, v, beta, s0 = random_inputs(*shape, per_batch_state=True)
    inputs = (q, torch.softmax(4 * k, dim=-1), v, beta, s0)
    worst = []
    for iters in (1, 3, 6):
        torch.manual_seed(0)  # the same output gradients for every K
        errors = compare(torch.float32, shape, gates="exact", iters=iters, reference=recurrent_lattice, inputs=inputs)
        worst.append(max(errors.values()))
    assert worst[0] > 1e-5 > worst[2] and worst[1] < worst[0], worst  # K=3 may already sit at float32 rounding
