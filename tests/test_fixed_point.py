"""The fixed-point gates (docs/math.md §4b) against the float64 token-by-token recurrence, values and gradients.

Awkward shapes (T not a multiple of the sub-chunk, m and d not powers of two, GQA), fresh random inputs every run.
``iters >= sub_chunk`` makes the iteration exact (F is causal), so those cases must match to float64 rounding;
few iterations must shrink the error and report a residual of the same order.
"""

from functools import partial

import pytest
import torch
from lattice_plugin.kernels.chunk import chunk_lattice
from lattice_plugin.kernels.fixed_point import fixed_point_lattice
from lattice_plugin.kernels.gates import normalize_slots
from lattice_plugin.kernels.recurrent import recurrent_lattice

from lattice_plugin.bench import negative_gate_inputs, vanishing_gate_inputs
from lattice_plugin.errors import LatticeError
from lattice_plugin.ops import lattice_attention


def make_inputs(B, T, Hq, H, m, d, *, sharp=1.0):
    """Softmax write codes (scaled by ``sharp`` before the softmax), unit values, beta in (0, 1), float64 leaves."""
    q = torch.randn(B, T, Hq, m, dtype=torch.float64)
    k = torch.softmax(sharp * torch.randn(B, T, H, m, dtype=torch.float64), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(B, T, H, d, dtype=torch.float64), dim=-1)
    beta = torch.rand(B, T, H, dtype=torch.float64)
    s0 = torch.randn(B, H, d, m, dtype=torch.float64)
    return [x.requires_grad_() for x in (q, k, v, beta, s0)]


def outputs_and_grads(fn, inputs):
    """``fn(q, k, v, beta, state) -> (o, final, ...)``; gradients of a fixed random projection of both outputs."""
    o, final, *_ = fn(*inputs[:4], normalize_slots(inputs[4]))
    gen = torch.Generator().manual_seed(0)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=gen, dtype=final.dtype)).sum()
    return [o.detach(), final.detach(), *torch.autograd.grad(loss, inputs)]


def rel_errors(xs, refs):
    return [((x - r).norm() / r.norm()).item() for x, r in zip(xs, refs)]


@pytest.mark.parametrize("orthogonal", [True, False])
@pytest.mark.parametrize("shape", [(2, 37, 4, 2, 12, 10), (1, 5, 1, 1, 7, 3), (1, 33, 2, 1, 20, 24)])
def test_converged_equals_recurrence(shape, orthogonal):
    inputs = make_inputs(*shape)
    ref = outputs_and_grads(lambda *x: recurrent_lattice(*x, orthogonal=orthogonal), inputs)
    got = outputs_and_grads(lambda *x: fixed_point_lattice(*x, iters=8, sub_chunk=8, orthogonal=orthogonal), inputs)
    errors = rel_errors(got, ref)
    assert max(errors) < 1e-10, errors


def test_error_falls_with_iterations_and_residual_tracks_it():
    inputs = make_inputs(1, 48, 2, 1, 24, 20, sharp=3.0)
    ref = outputs_and_grads(recurrent_lattice, inputs)
    worst, residuals = [], []
    for iters in (0, 1, 2, 4):
        got = outputs_and_grads(lambda *x: fixed_point_lattice(*x, iters=iters), inputs)
        worst.append(max(rel_errors(got, ref)))
        residuals.append(
            fixed_point_lattice(*[x.detach() for x in inputs[:4]], normalize_slots(inputs[4].detach()), iters=iters)[
                2
            ].item()
        )
    assert residuals[0] == 0 and all(r > 0 for r in residuals[1:])
    assert worst[0] > 1e-3, worst  # frozen gates are an approximation...
    assert worst[1] < worst[0] and worst[2] < worst[1] and worst[3] < worst[2], worst
    assert worst[3] < 1e-5 and residuals[3] < 1e-4, (worst, residuals)  # ...that a few iterations remove


def test_no_iteration_is_the_frozen_chunk_gates():
    inputs = make_inputs(2, 29, 2, 2, 9, 11)
    got = outputs_and_grads(lambda *x: fixed_point_lattice(*x, iters=0, sub_chunk=16, chunk_size=16), inputs)
    ref = outputs_and_grads(lambda *x: chunk_lattice(*x, chunk_size=16, gates="chunk"), inputs)
    assert max(rel_errors(got, ref)) < 1e-12


@pytest.mark.parametrize("build", [negative_gate_inputs, partial(vanishing_gate_inputs, every=4)])
def test_converged_equals_recurrence_through_negative_gates(build):
    """Gates just below 0 and gates of exactly 0 (both from 16-bit rounding): values and gradients exact."""
    inputs = [x.double().requires_grad_() for x in build(1, 40, 1, 1, 12, 10)]
    ref = outputs_and_grads(recurrent_lattice, inputs)
    errors = rel_errors(outputs_and_grads(lambda *x: fixed_point_lattice(*x, iters=16), inputs), ref)
    assert max(errors) < 1e-8, errors  # NaN fails too


def test_operator_option_and_bad_settings():
    """``lattice_attention(gate_solver="fixed_point")`` on the torch backend, and its refusals."""
    q, k, v, beta, s0 = (x.detach() for x in make_inputs(2, 21, 4, 2, 6, 5))
    s0 = s0[0]
    ref, ref_state = lattice_attention(q, k, v, beta, s0, backend="recurrent", output_final_state=True)
    o, state = lattice_attention(
        q, k, v, beta, s0, backend="torch", gate_solver="fixed_point", fixed_point_iters=16, output_final_state=True
    )
    assert (o - ref).abs().max() < 1e-10 and (state - ref_state).abs().max() < 1e-10
    for options, message in [
        (dict(gate_solver="newton"), "unknown gate_solver"),
        (dict(gate_solver="fixed_point", backend="recurrent"), "needs a chunked backend"),
        (dict(gate_solver="fixed_point", normalize=False), "needs normalize=True"),
        (dict(gate_solver="fixed_point", fixed_point_iters=-1), "non-negative integer"),
    ]:
        with pytest.raises(LatticeError, match=message):
            lattice_attention(q, k, v, beta, s0, backend=options.pop("backend", "torch"), **options)


def test_auto_solver_is_the_scan(monkeypatch):
    """``gate_solver="auto"`` (the default) hands the Triton entry the scan for every gate mode: the matmul passes
    are opt-in (test_triton_gates.py::test_default_solver_under_tf32_near_zero_gates says why)."""
    import lattice_plugin.ops as ops

    seen = []

    def fake_triton(*args, gates, gate_solver, **kwargs):
        seen.append((gates, gate_solver))
        return chunk_lattice(
            *args,
            gates=gates,
            chunk_size=kwargs["chunk_size"],
            orthogonal=kwargs["orthogonal"],
            normalize=kwargs["normalize"],
        )

    monkeypatch.setattr(ops, "resolve_backend", lambda *a, **k: "triton")
    # the module ops imports from sys.modules: the Triton tests re-import the kernel modules, which can leave the
    # package attribute that a dotted-string monkeypatch resolves pointing at a stale copy
    from importlib import import_module

    entry = import_module("lattice_plugin.kernels.triton_chunk")
    monkeypatch.setattr(entry, "chunk_lattice_triton", fake_triton)
    q, k, v, beta, s0 = (x.detach() for x in make_inputs(1, 20, 1, 1, 4, 3))
    for gates, normalize in [("chunk", True), ("exact", True), ("chunk", False)]:
        lattice_attention(q, k, v, beta, s0[0], gates=gates, normalize=normalize, chunk_size=16)
    assert seen == [("chunk", "scan"), ("exact", "scan"), ("chunk", "scan")]
