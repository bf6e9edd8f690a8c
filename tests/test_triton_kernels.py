"""The Triton kernels against the float64 references, on the CPU through Triton's interpreter.

Small awkward shapes (ragged last chunk, T=1, m and d not powers of two, GQA) and fresh random inputs every run;
outputs, final states and the gradients of every input (q, k, v, beta, s0 / initial_state, through the final
state too) are compared by relative error: 1e-4 for float32 inputs, 2e-2 for bfloat16.
"""

import os
import sys
import warnings

import pytest

# Triton picks interpreter or compiler when a function is decorated, and importing torch already imports triton:
# switch the interpreter on and re-import triton's Python modules (its compiled extension stays loaded).
os.environ["TRITON_INTERPRET"] = "1"
for _name in [n for n in sys.modules if n.split(".")[0] == "triton" and not n.startswith("triton._C")]:
    del sys.modules[_name]
for _name in [n for n in sys.modules if n.startswith("lattice_plugin.kernels.triton_")]:
    del sys.modules[_name]
pytest.importorskip("triton")

import torch  # noqa: E402
from lattice_plugin.kernels import triton_chunk  # noqa: E402  (after it: the freshly imported module)
from lattice_plugin.kernels.chunk import chunk_lattice  # noqa: E402
from lattice_plugin.kernels.gates import normalize_slots  # noqa: E402
from lattice_plugin.kernels.recurrent import recurrent_lattice, recurrent_step  # noqa: E402
from lattice_plugin.kernels.triton_chunk import chunk_lattice_triton  # noqa: E402
from lattice_plugin.kernels.triton_step import lattice_step_triton  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def random_inputs(B, T, Hq, H, m, d, *, per_batch_state):
    """Codes in (-1, 1), unit values, beta in (0, 1): |beta k| < 1 as the layer guarantees."""
    q = torch.randn(B, T, Hq, m)
    k = torch.rand(B, T, H, m) * 2 - 1
    v = torch.nn.functional.normalize(torch.randn(B, T, H, d), dim=-1)
    beta = torch.rand(B, T, H)
    s0 = torch.randn(B, H, d, m) if per_batch_state else torch.randn(H, d, m)
    return q, k, v, beta, s0


def run_both(
    dtype,
    shape,
    *,
    gates="exact",
    orthogonal=True,
    normalize=True,
    chunk_size=64,
    per_batch_state=True,
    reference="chunk",
):
    """Forward and backward through the kernels and through the float64 reference; returns the relative errors."""
    B, T, Hq, H, m, d = shape
    q, k, v, beta, s0 = random_inputs(B, T, Hq, H, m, d, per_batch_state=per_batch_state)
    flags = dict(orthogonal=orthogonal, normalize=normalize)

    def start(s):  # what ops.lattice_attention does with s0 / initial_state
        s = s if per_batch_state else s.unsqueeze(0).expand(B, -1, -1, -1)
        return normalize_slots(s) if normalize else s

    ins = [x.to(dtype).requires_grad_() for x in (q, k, v, beta)]
    s_leaf = s0.clone().requires_grad_()
    o, final = chunk_lattice_triton(*ins, start(s_leaf), chunk_size=chunk_size, gates=gates, **flags)
    d_o, d_final = torch.randn(o.shape), torch.randn(final.shape)
    ((o.float() * d_o).sum() + (final * d_final).sum()).backward()

    refs = [x.detach().double().requires_grad_() for x in ins]
    s_ref = s0.double().requires_grad_()
    if reference == "recurrent":
        ro, rf = recurrent_lattice(*refs, start(s_ref), **flags)
    else:
        ro, rf = chunk_lattice(*refs, start(s_ref), chunk_size=chunk_size, gates=gates, **flags)
    ((ro * d_o.double()).sum() + (rf * d_final.double()).sum()).backward()

    assert o.dtype == dtype and final.dtype == torch.float32
    errors = {"o": rel_err(o, ro), "final": rel_err(final, rf), "s0": rel_err(s_leaf.grad, s_ref.grad)}
    errors.update({f"d{n}": rel_err(x.grad, r.grad) for n, x, r in zip(("q", "k", "v", "beta"), ins, refs)})
    return errors


def check(errors, dtype):
    bad = {name: e for name, e in errors.items() if not e <= TOL[dtype]}  # NaN fails too
    assert not bad, f"relative errors over {TOL[dtype]}: {bad}"


@pytest.mark.parametrize(
    "shape",
    [
        (1, 21, 1, 1, 16, 16),  # ragged last sub-chunk
        (2, 1, 2, 1, 12, 20),  # T=1, m and d below one tile, GQA
        (1, 65, 1, 1, 16, 16),  # T = chunk + 1: a second chunk of one token
        (1, 17, 1, 1, 48, 80),  # m=48, d=80
        (1, 19, 4, 2, 16, 24),  # GQA with 2 kv heads
        (1, 96, 2, 1, 16, 16),  # T a multiple of the 16-token sub-chunk (no padding), two chunks
        (1, 37, 2, 1, 128, 16),  # m=128: 128-slot tiles in every pass (the m > 64 branch of read and dv)
    ],
)
def test_exact_float32(shape):
    check(run_both(torch.float32, shape), torch.float32)


def test_exact_against_recurrence_shared_s0():
    """The token-by-token definition as ground truth, with a shared s0 (Hkv, d, m) leaf."""
    errors = run_both(torch.float32, (2, 23, 2, 2, 16, 16), per_batch_state=False, reference="recurrent")
    check(errors, torch.float32)


def test_exact_near_zero_gates():
    """Nearly repeated values and beta * k close to 1: the slots align with v and the forget gates fall to
    ~0.003-0.009, so products of 16 gates approach float32's underflow; no log, exp or division may break."""
    B, T, Hq, H, m, d = 1, 40, 1, 1, 16, 16
    base = torch.nn.functional.normalize(torch.randn(d), dim=0)
    v = torch.nn.functional.normalize(base + 0.02 * torch.randn(B, T, H, d), dim=-1)
    k = 1 - 0.002 * torch.rand(B, T, H, m)
    beta = 0.998 + 0.001 * torch.rand(B, T, H)
    q, s0 = torch.randn(B, T, Hq, m), torch.randn(B, H, d, m)
    ins = [x.clone().requires_grad_() for x in (q, k, v, beta)]
    s_leaf = s0.clone().requires_grad_()
    o, final = chunk_lattice_triton(*ins, normalize_slots(s_leaf))
    d_o, d_final = torch.randn(o.shape), torch.randn(final.shape)
    ((o * d_o).sum() + (final * d_final).sum()).backward()
    refs = [x.detach().double().requires_grad_() for x in ins]
    s_ref = s0.double().requires_grad_()
    ro, rf = chunk_lattice(*refs, normalize_slots(s_ref))
    ((ro * d_o.double()).sum() + (rf * d_final.double()).sum()).backward()
    errors = {"o": rel_err(o, ro), "final": rel_err(final, rf), "s0": rel_err(s_leaf.grad, s_ref.grad)}
    errors.update({f"d{n}": rel_err(x.grad, r.grad) for n, x, r in zip(("q", "k", "v", "beta"), ins, refs)})
    check(errors, torch.float32)


@pytest.mark.parametrize("orthogonal,normalize", [(True, False), (False, True), (False, False)])
def test_ablations_float32(orthogonal, normalize):
    check(run_both(torch.float32, (1, 37, 2, 1, 16, 16), orthogonal=orthogonal, normalize=normalize), torch.float32)


@pytest.mark.parametrize("chunk_size,orthogonal,normalize", [(32, True, True), (16, True, False), (48, False, True)])
def test_chunk_gates_float32(chunk_size, orthogonal, normalize):
    shape = (1, 50, 2, 1, 16, 16)
    errors = run_both(
        torch.float32, shape, gates="chunk", chunk_size=chunk_size, orthogonal=orthogonal, normalize=normalize
    )
    check(errors, torch.float32)


@pytest.mark.parametrize("gates", ["exact", "chunk"])
@pytest.mark.parametrize("split_forward", [True, False])
def test_bfloat16(gates, split_forward, monkeypatch):
    """16-bit inputs take their own sweep blocking: 8-slot reverse sweeps (m=20: a ragged third block), forward
    sweeps on 8 or 16 slots depending on the grid, both forced here."""
    monkeypatch.setattr(triton_chunk, "FWD_SPLIT_PER_SM", 10**6 if split_forward else 0)
    shape = (1, 33, 2, 1, 20, 24)
    q, v = torch.empty(*shape[:3], shape[4], dtype=torch.bfloat16), torch.empty(*shape[:2], *shape[3:4], shape[5])
    blocks = triton_chunk._Setup(q, v, chunk_size=32, exact=gates == "exact", orthogonal=True, normalize=True)
    assert (blocks.bm_fwd, blocks.bm_bwd) == (8 if split_forward else 16, 8)
    check(run_both(torch.bfloat16, shape, gates=gates, chunk_size=32), torch.bfloat16)


@pytest.mark.parametrize("spacing", [16, 128])
def test_exact_state_spacing(spacing, monkeypatch):
    """Exact gates store the state every CS_EXACT tokens, a free choice the results must not depend on (the reverse
    sweep replays CS_EXACT / 16 sub-chunks into its scratch): ragged T over several stored states, GQA."""
    monkeypatch.setattr(triton_chunk, "CS_EXACT", spacing)
    check(run_both(torch.float32, (1, 150, 4, 2, 16, 24), reference="recurrent"), torch.float32)


@pytest.mark.parametrize("gates", ["exact", "chunk"])
def test_reverse_sweep_scalar_rows(gates, monkeypatch):
    """The reverse sweep's Gram rows as scalar loads (GQA: one row per query head)."""
    monkeypatch.setattr(triton_chunk, "BWD_SCALAR_ROWS", True)
    check(run_both(torch.float32, (1, 37, 4, 2, 16, 24), gates=gates, chunk_size=32), torch.float32)


def test_chunk_gates_reject_unaligned_chunk():
    q, k, v, beta, s0 = random_inputs(1, 4, 1, 1, 16, 16, per_batch_state=True)
    with pytest.raises(ValueError, match="multiple of 16"):
        chunk_lattice_triton(q, k, v, beta, s0, chunk_size=24, gates="chunk")


@pytest.mark.parametrize(
    "gates,orthogonal,normalize,solver",
    [("exact", True, True, "scan"), ("exact", True, False, "scan"), ("chunk", True, True, "fixed_point")],
)
def test_custom_ops(gates, orthogonal, normalize, solver):
    """The forward and backward ops pass torch.library's checks (schema, fake shapes against the real outputs,
    autograd registration), and a fullgraph torch.compile (through the ops) gives the eager path's values and
    gradients (through EagerLatticeFunction): the layer stays inside litgpt's compiled graph (ragged T, GQA, every
    saved-tensor layout)."""
    q, k, v, beta, s0 = random_inputs(2, 21, 4, 2, 16, 24, per_batch_state=True)
    s0 = normalize_slots(s0)  # as the layer hands it over
    options = (16, gates == "exact", orthogonal, normalize, solver, 2)
    inputs = [x.requires_grad_() for x in (q, k, v, beta, s0)]
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")  # compiled: the comparison below
    torch.library.opcheck(triton_chunk._chunk_fwd_op, (*inputs, *options, True), test_utils=checks)
    o, final, *saved = triton_chunk._chunk_fwd_op(*inputs, *options, True)
    do, d_final = torch.randn_like(o), torch.randn_like(final)
    plain = [x.detach() for x in (q, k, v, beta, final)]  # no double backward: the backward op has no formula
    torch.library.opcheck(
        triton_chunk._chunk_bwd_op, (do, d_final, *plain, [x.detach() for x in saved], *options), test_utils=checks
    )

    def loss(q, k, v, beta, s0):
        o, final = chunk_lattice_triton(
            q, k, v, beta, s0, chunk_size=16, gates=gates, orthogonal=orthogonal, normalize=normalize,
            gate_solver=solver, fixed_point_iters=2,
        )  # fmt: skip
        return (o * do).sum() + (final * d_final).sum()

    eager = torch.autograd.grad(loss(*inputs), inputs)
    with torch._dynamo.config.patch(disable=False):  # `lattice pretrain` on a CPU, run in-process, sets it
        compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(*inputs), inputs)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_parallel_build_runs_the_stages(monkeypatch):
    """The first-use build, started inside the forward op (where autograd is off), warms up the forward and the
    backward stages (run for real here: the interpreter's kernels are not compiled): no fallback warning, and the
    combination is marked as built."""
    import triton.experimental.gluon  # noqa: F401  (the interpreter imports it on first use: while it is on)
    from lattice_plugin.kernels import triton_compile
    from triton.runtime._async_compile import AsyncCompileMode  # noqa: F401

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # lets the build run; the kernels stay interpreted
    monkeypatch.setattr(triton_compile, "_compiled", set())
    q, k, v, beta, s0 = random_inputs(1, 20, 2, 1, 16, 8, per_batch_state=True)
    inputs = [x.requires_grad_() for x in (q, k, v, beta, normalize_slots(s0))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chunk_lattice_triton(*inputs)[0].sum().backward()
    assert len(triton_compile._compiled) == 1 and all(x.grad is not None for x in inputs)


@pytest.mark.parametrize("orthogonal,normalize", [(True, True), (True, False), (False, True), (False, False)])
def test_step_kernel(orthogonal, normalize):
    B, Hq, H, m, d = 2, 4, 2, 20, 24
    q, k, v, beta = torch.randn(B, Hq, m), torch.rand(B, H, m) * 2 - 1, torch.randn(B, H, d), torch.rand(B, H)
    v = torch.nn.functional.normalize(v, dim=-1)
    state = normalize_slots(torch.randn(B, H, d, m))
    ro, rs = recurrent_step(
        state.double(), q.double(), k.double(), v.double(), beta.double(), orthogonal=orthogonal, normalize=normalize
    )
    o, new_state = lattice_step_triton(q, k, v, beta, state, orthogonal=orthogonal, normalize=normalize)
    assert rel_err(o, ro) < 1e-5 and rel_err(new_state, rs) < 1e-5
    o2, same = lattice_step_triton(q, k, v, beta, state, orthogonal=orthogonal, normalize=normalize, out_state=state)
    assert same is state and torch.equal(state, new_state) and torch.equal(o2, o)
