"""Fused Triton prologue of the Lattice mixer: the four elementwise maps of ``elementwise.prologue_reference``
(``docs/math.md §2``) in one kernel forward and one backward.

One program takes ``ROWS`` consecutive (token, head) rows of each stream: the query codes, then (rows past their
end masked off) the key codes, the values and the step sizes. Arithmetic in float32, outputs in the dtype the
Lattice op takes. The backward recomputes from the outputs (which the Lattice op keeps for its own backward, so
they cost no extra memory) and, for L2 maps, one float32 inverse norm per row.
"""

import torch
import triton
import triton.language as tl

from .elementwise import CODE_MAPS, NORM_EPS

_EPS = tl.constexpr(NORM_EPS)

ROWS = 32  # (token, head) rows per program
WARPS = 4


@triton.jit
def _load_rows(x, rows, n_rows, o_c, N: tl.constexpr, row_stride, HX: tl.constexpr, tok_stride):
    """A ``[ROWS, BN]`` float32 tile of rows ``rows`` of width ``N``; row ``r`` of head ``r % HX`` of token
    ``r // HX`` starts at ``(r // HX) * tok_stride + (r % HX) * row_stride``; padding is 0."""
    mask = (rows < n_rows)[:, None] & (o_c < N)[None, :]
    start = (rows // HX) * tok_stride + (rows % HX) * row_stride
    return tl.load(x + start[:, None] + o_c[None, :], mask=mask, other=0.0).to(tl.float32), mask


@triton.jit
def _code_fwd(x, mask, MAP: tl.constexpr):
    """The code map of each row of ``x`` (0 softmax, 1 sigmoid, 2 tanh, 3 l2) and its inverse norm (l2 only)."""
    rn = tl.sum(x, axis=1) * 0.0
    if MAP == 0:
        z = tl.where(mask, x, -1e30)  # finite: rows past the end stay NaN-free
        e = tl.where(mask, tl.exp(z - tl.max(z, axis=1)[:, None]), 0.0)
        y = e / tl.maximum(tl.sum(e, axis=1), 1e-30)[:, None]
    elif MAP == 1:
        y = tl.sigmoid(x)
    elif MAP == 2:
        y = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    else:
        rn = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), _EPS)
        y = x * rn[:, None]
    return y, rn


@triton.jit
def _code_bwd(y, g, rn, MAP: tl.constexpr):
    """Gradient of the code map's input from its output ``y``, the output gradient ``g`` and (l2) ``rn``."""
    if MAP == 0:
        dx = y * (g - tl.sum(g * y, axis=1)[:, None])
    elif MAP == 1:
        dx = g * y * (1.0 - y)
    elif MAP == 2:
        dx = g * (1.0 - y * y)
    else:  # below the norm's floor the map is linear: no projection
        proj = tl.where(rn < 1.0 / _EPS, tl.sum(g * y, axis=1), 0.0)
        dx = (g - y * proj[:, None]) * rn[:, None]
    return dx


@triton.jit
def _prologue_fwd_kernel(
    ql,
    kl,
    v,
    bl,
    q,
    k,
    vn,
    b,
    q_rn,
    k_rn,
    v_rn,
    RQ,
    RK,
    v_tok_stride,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    M: tl.constexpr,
    D: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    ROWS: tl.constexpr,
    MAP: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    o_m = tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    x, mask = _load_rows(ql, rows, RQ, o_m, M, M, 1, M)
    y, rn = _code_fwd(x, mask, MAP)
    tl.store(q + rows[:, None] * M + o_m[None, :], y.to(q.dtype.element_ty), mask=mask)
    if MAP == 3:
        tl.store(q_rn + rows, rn, mask=rows < RQ)
    x, mask = _load_rows(kl, rows, RK, o_m, M, M, 1, M)
    y, rn = _code_fwd(x, mask, MAP)
    tl.store(k + rows[:, None] * M + o_m[None, :], y.to(k.dtype.element_ty), mask=mask)
    if MAP == 3:
        tl.store(k_rn + rows, rn, mask=rows < RK)
    x, mask = _load_rows(v, rows, RK, o_d, D, D, HKV, v_tok_stride)
    y, rn = _code_fwd(x, mask, 3)
    tl.store(vn + rows[:, None] * D + o_d[None, :], y.to(vn.dtype.element_ty), mask=mask)
    tl.store(v_rn + rows, rn, mask=rows < RK)
    r_mask = rows < RK
    x = tl.load(bl + rows, mask=r_mask, other=0.0).to(tl.float32)
    tl.store(b + rows, tl.sigmoid(x).to(b.dtype.element_ty), mask=r_mask)


@triton.jit
def _prologue_bwd_kernel(
    dq,
    dk,
    dv,
    db,
    q,
    k,
    vn,
    b,
    q_rn,
    k_rn,
    v_rn,
    dql,
    dkl,
    dvx,
    dbl,
    RQ,
    RK,
    M: tl.constexpr,
    D: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    ROWS: tl.constexpr,
    MAP: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    o_m = tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    y, mask = _load_rows(q, rows, RQ, o_m, M, M, 1, M)
    g, _ = _load_rows(dq, rows, RQ, o_m, M, M, 1, M)
    rn = tl.sum(y, axis=1)
    if MAP == 3:
        rn = tl.load(q_rn + rows, mask=rows < RQ, other=1.0)
    tl.store(dql + rows[:, None] * M + o_m[None, :], _code_bwd(y, g, rn, MAP).to(dql.dtype.element_ty), mask=mask)
    y, mask = _load_rows(k, rows, RK, o_m, M, M, 1, M)
    g, _ = _load_rows(dk, rows, RK, o_m, M, M, 1, M)
    rn = tl.sum(y, axis=1)
    if MAP == 3:
        rn = tl.load(k_rn + rows, mask=rows < RK, other=1.0)
    tl.store(dkl + rows[:, None] * M + o_m[None, :], _code_bwd(y, g, rn, MAP).to(dkl.dtype.element_ty), mask=mask)
    y, mask = _load_rows(vn, rows, RK, o_d, D, D, 1, D)
    g, _ = _load_rows(dv, rows, RK, o_d, D, D, 1, D)
    rn = tl.load(v_rn + rows, mask=rows < RK, other=1.0)
    tl.store(dvx + rows[:, None] * D + o_d[None, :], _code_bwd(y, g, rn, 3).to(dvx.dtype.element_ty), mask=mask)
    r_mask = rows < RK
    y = tl.load(b + rows, mask=r_mask, other=0.0).to(tl.float32)
    g = tl.load(db + rows, mask=r_mask, other=0.0).to(tl.float32)
    tl.store(dbl + rows, (g * y * (1.0 - y)).to(dbl.dtype.element_ty), mask=r_mask)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


class LatticePrologueFunction(torch.autograd.Function):
    """Autograd wrapper of the fused prologue; see :func:`prologue_triton` for the contract."""

    @staticmethod
    def forward(ctx, q_logits, k_logits, v, beta_logits, code, out_dtype):
        B, T, HQ, M = q_logits.shape
        HKV, D = v.shape[2], v.shape[3]
        q_logits, k_logits, beta_logits = q_logits.contiguous(), k_logits.contiguous(), beta_logits.contiguous()
        if v.stride(3) != 1 or v.stride(2) != D or v.stride(0) != T * v.stride(1):
            v = v.contiguous()  # the kernel takes any token stride, heads packed inside a token
        RQ, RK = B * T * HQ, B * T * HKV
        new = dict(device=v.device, dtype=out_dtype)
        q, k = torch.empty(B, T, HQ, M, **new), torch.empty(B, T, HKV, M, **new)
        vn, b = torch.empty(B, T, HKV, D, **new), torch.empty(B, T, HKV, **new)
        MAP = CODE_MAPS.index(code)
        f32 = dict(device=v.device, dtype=torch.float32)
        q_rn = torch.empty(RQ, **f32) if MAP == 3 else vn
        k_rn = torch.empty(RK, **f32) if MAP == 3 else vn
        v_rn = torch.empty(RK, **f32)
        _prologue_fwd_kernel[(triton.cdiv(RQ, ROWS),)](
            q_logits,
            k_logits,
            v,
            beta_logits,
            q,
            k,
            vn,
            b,
            q_rn,
            k_rn,
            v_rn,
            RQ,
            RK,
            v.stride(1),
            HQ,
            HKV,
            M,
            D,
            _block(M),
            _block(D),
            ROWS,
            MAP,
            num_warps=WARPS,
        )
        ctx.save_for_backward(q, k, vn, b, q_rn, k_rn, v_rn)
        ctx.MAP = MAP
        ctx.dtypes = (q_logits.dtype, k_logits.dtype, v.dtype, beta_logits.dtype)
        return q, k, vn, b

    @staticmethod
    def backward(ctx, dq, dk, dv, db):
        q, k, vn, b, q_rn, k_rn, v_rn = ctx.saved_tensors
        B, T, HQ, M = q.shape
        HKV, D = vn.shape[2], vn.shape[3]
        grads = [torch.zeros_like(x) if g is None else g.contiguous() for g, x in zip((dq, dk, dv, db), (q, k, vn, b))]
        outs = [torch.empty(x.shape, device=x.device, dtype=dt) for x, dt in zip((q, k, vn, b), ctx.dtypes)]
        RQ, RK = B * T * HQ, B * T * HKV
        _prologue_bwd_kernel[(triton.cdiv(RQ, ROWS),)](
            *grads,
            q,
            k,
            vn,
            b,
            q_rn,
            k_rn,
            v_rn,
            *outs,
            RQ,
            RK,
            M,
            D,
            _block(M),
            _block(D),
            ROWS,
            ctx.MAP,
            num_warps=WARPS,
        )
        return *outs, None, None


def prologue_triton(
    q_logits: torch.Tensor,
    k_logits: torch.Tensor,
    v: torch.Tensor,
    beta_logits: torch.Tensor,
    code: str,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``elementwise.prologue_reference`` (float32 arithmetic; not for float64)."""
    return LatticePrologueFunction.apply(q_logits, k_logits, v, beta_logits, code, out_dtype)
