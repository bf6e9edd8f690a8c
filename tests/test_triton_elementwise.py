"""The fused prologue and epilogue kernels against the float64 references, on the CPU through Triton's interpreter.

Awkward shapes (head counts, m and d not powers of two, GQA, a row count that is no multiple of the block), every
code map, with and without the output gate; values and the gradients of every input, by relative error: 1e-5 for
float32 inputs, 2e-2 for bfloat16. Values are also taken as a strided view of a fused projection, as the mixer does.
"""

import os
import sys

import pytest

os.environ["TRITON_INTERPRET"] = "1"  # as in test_triton_kernels.py: interpreter on, triton's Python re-imported
for _name in [n for n in sys.modules if n.split(".")[0] == "triton" and not n.startswith("triton._C")]:
    del sys.modules[_name]
for _name in [n for n in sys.modules if n.startswith("lattice_plugin.kernels.triton_")]:
    del sys.modules[_name]
pytest.importorskip("triton")

import torch  # noqa: E402
from lattice_plugin.kernels.elementwise import CODE_MAPS, epilogue_reference, prologue_reference  # noqa: E402
from lattice_plugin.kernels.triton_epilogue import epilogue_triton  # noqa: E402
from lattice_plugin.kernels.triton_prologue import prologue_triton  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def check(fn, ref_fn, inputs, dtype, out_dtype):
    """Run ``fn`` on ``dtype`` copies and ``ref_fn`` on float64 copies of ``inputs``; compare outputs and grads."""
    ins = [x.to(dtype).requires_grad_() for x in inputs]
    ref_ins = [x.detach().double().requires_grad_() for x in ins]
    outs = fn(*ins, out_dtype)
    refs = ref_fn(*ref_ins, torch.float64)
    outs, refs = (outs, refs) if isinstance(outs, tuple) else ((outs,), (refs,))
    grads_out = [torch.randn(r.shape, dtype=torch.float64) for r in refs]
    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grads_out, outs)])
    torch.autograd.backward(refs, grads_out)
    tol = TOL[dtype]
    for o, r in zip(outs, refs):
        assert o.dtype == out_dtype
        assert rel_err(o, r) < tol
    for x, r in zip(ins, ref_ins):
        assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
        assert rel_err(x.grad, r.grad) < tol


@pytest.mark.parametrize("code", CODE_MAPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prologue(code, dtype):
    B, T, Hq, H, m, d = 2, 7, 6, 3, 20, 24
    qkv = torch.randn(B, T, (Hq + 2 * H) * d)
    v = qkv[..., (Hq + H) * d :].view(B, T, H, d)  # a strided view, as litgpt's fused qkv split gives it
    inputs = (torch.randn(B, T, Hq, m) * 2, torch.randn(B, T, H, m) * 2, v, torch.randn(B, T, H) * 2)

    check(
        lambda q, k, v, b, dt: prologue_triton(q, k, v, b, code, dt),
        lambda q, k, v, b, dt: prologue_reference(q, k, v, b, code, dt),
        inputs,
        dtype,
        dtype,
    )


def test_prologue_strided_values():
    """The values enter as a view of the fused projection (token stride > heads x d): no copy, same result."""
    B, T, Hq, H, m, d = 2, 5, 4, 2, 16, 24
    qkv = torch.randn(B, T, (Hq + 2 * H) * d, requires_grad=True)
    v = qkv[..., (Hq + H) * d :].view(B, T, H, d)
    q, k, beta = torch.randn(B, T, Hq, m), torch.randn(B, T, H, m), torch.randn(B, T, H)
    out = prologue_triton(q, k, v, beta, "softmax", torch.float32)[2]
    ref = prologue_reference(q, k, v.detach().clone(), beta, "softmax", torch.float32)[2]
    assert torch.allclose(out, ref, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    qkv_ref = qkv.detach().double().requires_grad_()
    v_ref = qkv_ref[..., (Hq + H) * d :].view(B, T, H, d)
    torch.nn.functional.normalize(v_ref, dim=-1).backward(grad.double())
    assert rel_err(qkv.grad, qkv_ref.grad) < 1e-5


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_epilogue(gated, dtype):
    B, T, H, d = 3, 13, 5, 24  # 39 tokens: a ragged last block
    inputs = [torch.randn(B, T, H, d), 1 + 0.3 * torch.randn(H, d)] + ([torch.randn(B, T, H * d)] if gated else [])

    def fused(o, w, *g, out_dtype=None):
        return epilogue_triton(o, w, 1e-5, g[0] if g else None, out_dtype)

    def ref(o, w, *g, out_dtype=None):
        return epilogue_reference(o, w, 1e-5, g[0] if g else None, out_dtype)

    check(lambda *a: fused(*a[:-1], out_dtype=a[-1]), lambda *a: ref(*a[:-1], out_dtype=a[-1]), inputs, dtype, dtype)
