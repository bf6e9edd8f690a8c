"""Fused Triton epilogue of the Lattice mixer: per-head RMSNorm with a learned scale and the optional output gate
of ``elementwise.epilogue_reference`` (``docs/math.md §6``) in one kernel forward and one backward.

A program takes ``ROWS`` tokens of one head. Arithmetic in float32. The forward keeps one float32 inverse RMS per
(token, head); the backward recomputes the normalised output and the gate from the read-out and the gate logits
and writes per-program partial sums of the scale's gradient (summed afterwards: deterministic, no atomics).
"""

import torch
import triton
import triton.language as tl

ROWS = 32  # tokens per program
WARPS = 4


@triton.jit
def _tile(x, toks, n_toks, h, o_d, tok_stride, D: tl.constexpr):
    mask = (toks < n_toks)[:, None] & (o_d < D)[None, :]
    return tl.load(x + (toks * tok_stride + h * D)[:, None] + o_d[None, :], mask=mask, other=0.0).to(tl.float32), mask


@triton.jit
def _epilogue_fwd_kernel(
    o,
    w,
    g,
    y,
    rstd,
    NT,
    eps,
    HQ: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    ROWS: tl.constexpr,
    HAS_GATE: tl.constexpr,
):
    toks = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    h = tl.program_id(1)
    o_d = tl.arange(0, BD)
    x, mask = _tile(o, toks, NT, h, o_d, HQ * D, D)
    r = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    out = x * r[:, None] * tl.load(w + h * D + o_d, mask=o_d < D, other=0.0).to(tl.float32)[None, :]
    if HAS_GATE:
        gl, _ = _tile(g, toks, NT, h, o_d, HQ * D, D)
        out = out * tl.sigmoid(gl)
    tl.store(y + (toks * HQ + h)[:, None] * D + o_d[None, :], out.to(y.dtype.element_ty), mask=mask)
    tl.store(rstd + toks * HQ + h, r, mask=toks < NT)


@triton.jit
def _epilogue_bwd_kernel(
    dy,
    o,
    w,
    g,
    rstd,
    do,
    dg,
    dw_part,
    NT,
    HQ: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    ROWS: tl.constexpr,
    HAS_GATE: tl.constexpr,
):
    i_t, h = tl.program_id(0), tl.program_id(1)
    toks = i_t.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    o_d = tl.arange(0, BD)
    x, mask = _tile(o, toks, NT, h, o_d, HQ * D, D)
    gy, _ = _tile(dy, toks, NT, h, o_d, HQ * D, D)
    r = tl.load(rstd + toks * HQ + h, mask=toks < NT, other=0.0)
    wh = tl.load(w + h * D + o_d, mask=o_d < D, other=0.0).to(tl.float32)[None, :]
    n = x * r[:, None]
    if HAS_GATE:
        gl, _ = _tile(g, toks, NT, h, o_d, HQ * D, D)
        s = tl.sigmoid(gl)
        tl.store(
            dg + (toks * HQ + h)[:, None] * D + o_d[None, :],
            (gy * n * wh * s * (1.0 - s)).to(dg.dtype.element_ty),
            mask=mask,
        )
        gy = gy * s
    tl.store(dw_part + (i_t * HQ + h) * D + o_d, tl.sum(gy * n, axis=0), mask=o_d < D)
    dn = gy * wh
    dx = r[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / D)[:, None])
    tl.store(do + (toks * HQ + h)[:, None] * D + o_d[None, :], dx.to(do.dtype.element_ty), mask=mask)


class LatticeEpilogueFunction(torch.autograd.Function):
    """Autograd wrapper of the fused epilogue; see :func:`epilogue_triton` for the contract."""

    @staticmethod
    def forward(ctx, o, weight, eps, gate_logits, out_dtype):
        B, T, HQ, D = o.shape
        o = o.contiguous()
        has_gate = gate_logits is not None
        g = gate_logits.contiguous() if has_gate else o
        NT = B * T
        y = torch.empty(B, T, HQ, D, device=o.device, dtype=out_dtype)
        rstd = torch.empty(NT * HQ, device=o.device, dtype=torch.float32)
        grid = (triton.cdiv(NT, ROWS), HQ)
        _epilogue_fwd_kernel[grid](
            o,
            weight,
            g,
            y,
            rstd,
            NT,
            eps,
            HQ,
            D,
            max(16, triton.next_power_of_2(D)),
            ROWS,
            has_gate,
            num_warps=WARPS,
        )
        ctx.save_for_backward(o, weight, g, rstd)
        ctx.has_gate = has_gate
        return y

    @staticmethod
    def backward(ctx, dy):
        o, weight, g, rstd = ctx.saved_tensors
        B, T, HQ, D = o.shape
        NT = B * T
        grid = (triton.cdiv(NT, ROWS), HQ)
        do = torch.empty_like(o)
        dg = torch.empty_like(g) if ctx.has_gate else do
        dw_part = torch.empty(grid[0], HQ, D, device=o.device, dtype=torch.float32)
        _epilogue_bwd_kernel[grid](
            dy.contiguous(),
            o,
            weight,
            g,
            rstd,
            do,
            dg,
            dw_part,
            NT,
            HQ,
            D,
            max(16, triton.next_power_of_2(D)),
            ROWS,
            ctx.has_gate,
            num_warps=WARPS,
        )
        dw = dw_part.sum(0).to(weight.dtype)
        return do, dw, None, dg if ctx.has_gate else None, None


def epilogue_triton(
    o: torch.Tensor, weight: torch.Tensor, eps: float, gate_logits: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """Same contract as ``elementwise.epilogue_reference`` (float32 arithmetic; not for float64)."""
    return LatticeEpilogueFunction.apply(o, weight, eps, gate_logits, out_dtype)
