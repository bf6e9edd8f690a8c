"""The forward gate pass by matmuls: frozen chunk gates (docs/math.md §4) or exact gates by fixed-point iteration
(docs/math.md §4b), in place of the sequential per-token sweep of :mod:`triton_chunk_fwd`.

One program per (batch, kv head, block of BM slots) walks the sequence (slots are independent given the values);
per step of BT tokens it does ``P = V S`` (a matmul), the gates elementwise, cumulative log-gates along the tokens
(``tl.cumsum``) and ``S <- S diag(L_end) + V^T (B * L_end / L)`` (a matmul). There is no per-token loop:

- frozen gates (``gates="chunk"``): ``c = P`` with ``S`` the chunk-start state; BT up to 64 tokens.
- fixed point (``gates="exact"``): on 16-token sub-chunks, ``ITERS`` times
  ``c <- L_prev * (P + tril(G, -1) @ (B / L))``, one (16 x 16) @ (16 x BM) matmul each; the residual
  ``max |c^(K) - c^(K-1)|`` is kept per program. ``B / L`` stays inside 16 tokens: it overflows float32 only
  if the 16 forget gates of one sub-chunk multiply to below ~1e-38.

It writes exactly what the sweep writes (``c`` per token, the state at every chunk start, the final state), so the
read pass and the backward of :mod:`triton_chunk` run unchanged on its results. Gate arithmetic and states are
float32; matmuls with a float32 operand use tf32 for 16-bit inputs.
"""

import torch
import triton
import triton.language as tl

from .triton_common import _gates, _log_gates, _pow2, _signed_exp, _sm_count

FP_SUB = 16  # tokens per fixed-point sub-chunk (tl.dot needs >= 16; docs/math.md §4b measured its convergence)
BT_FROZEN = 64  # most tokens per step of the frozen-gate pass
# most slots per program, halved down to 16 while the grid has fewer programs than SMs; at 64 the reverse pass would
# hold two [D, 64] float32 tiles, 128 registers a thread at 4 warps (bench/kernels_gla.py times 64 as a variant)
BM_MAX = 32
GATE_WARPS = 4


@triton.jit
def _log_cumsum(a):
    """``log |a|``, the count of negative gates (0 or 1), and their running sums along the tokens (axis 0): the
    cumulative log-gates and their signs. Gates are positive while ``|beta k| ||v|| < 1``; 16-bit inputs can round
    onto or past that bound (beta and k to 1, ||v|| above 1), and the products keep their sign as the reference's do."""
    la, neg = _log_gates(a)
    return la, neg, tl.cumsum(la, 0), tl.cumsum(neg, 0)


@triton.jit
def _load_step(
    k, v, beta, tok0, t0, T, o_t, o_d, d_mask, o_m, m_mask, H: tl.constexpr, M: tl.constexpr, D: tl.constexpr
):
    """The V, k and beta tiles of the step starting at token ``t0`` (zeros past ``T``: identity tokens)."""
    t_mask = t0 + o_t < T
    rows = tok0 + (t0 + o_t).to(tl.int64) * H
    V = tl.load(v + rows[:, None] * D + o_d[None, :], mask=t_mask[:, None] & d_mask[None, :], other=0.0)
    K = tl.load(k + rows[:, None] * M + o_m[None, :], mask=t_mask[:, None] & m_mask[None, :], other=0.0)
    return V, K, tl.load(beta + rows, mask=t_mask, other=0.0)


@triton.jit
def _matmul_gates_kernel(
    k,
    v,
    beta,
    s_init,
    c_out,
    states,
    s_final,
    norms,
    res_out,
    T,
    NC,
    H: tl.constexpr,
    M: tl.constexpr,
    D: tl.constexpr,
    CS: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    FIXED_POINT: tl.constexpr,
    ITERS: tl.constexpr,
    KEEP_START: tl.constexpr,
    ORTHOGONAL: tl.constexpr,
    PREC: tl.constexpr,
):
    """Stores ``c`` per token ``(B, T, H, M)``, the state at every chunk start ``(B, H, NC, D, M)`` (columns
    renormalised there, as in chunk.py), the norms of the columns before that ``(B, H, NC, M)`` (chunk ``i``'s
    end; the last is the final state's), the final state and the program's residual. KEEP_START: frozen gates
    on steps shorter than the chunk read the chunk-start state carried beside the running one."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_m = i_m * BM + tl.arange(0, BM)
    m_mask = o_m < M
    o_d = tl.arange(0, BD)
    d_mask = o_d < D
    o_t = tl.arange(0, BT)
    s_off = o_d[:, None] * M + o_m[None, :]
    s_mask = d_mask[:, None] & m_mask[None, :]
    S = tl.load(s_init + i_bh.to(tl.int64) * D * M + s_off, mask=s_mask, other=0.0)
    S0 = S
    strict = o_t[:, None] > o_t[None, :]
    residual = tl.zeros([BM], dtype=tl.float32)
    tok0 = i_b.to(tl.int64) * T * H + i_h  # row of token t of this head in (B, T, H, .) tensors: tok0 + t * H
    # the V, k and beta tiles of the next step load while this one computes (the first ones here)
    Vn, Kn, Bn = _load_step(k, v, beta, tok0, 0, T, o_t, o_d, d_mask, o_m, m_mask, H, M, D)
    t0 = 0
    while t0 < T:  # while, not range: the interpreter cannot take run-time range bounds
        if t0 % CS == 0:
            if t0 > 0:  # retraction at every chunk end, as in chunk.py
                norm = tl.maximum(tl.sqrt(tl.sum(S * S, 0)), 1e-12)
                tl.store(norms + (i_bh.to(tl.int64) * NC + t0 // CS - 1) * M + o_m, norm, mask=m_mask)
                S = S / norm[None, :]
            tl.store(states + (i_bh.to(tl.int64) * NC + t0 // CS) * D * M + s_off, S, mask=s_mask)
            if KEEP_START:
                S0 = S
        V = Vn.to(tl.float32)
        gamma = Bn.to(tl.float32)[:, None] * Kn.to(tl.float32)
        Vn, Kn, Bn = _load_step(k, v, beta, tok0, t0 + BT, T, o_t, o_d, d_mask, o_m, m_mask, H, M, D)
        t_mask = t0 + o_t < T
        rows = tok0 + (t0 + o_t).to(tl.int64) * H
        tm_mask = t_mask[:, None] & m_mask[None, :]
        vv = tl.sum(V * V, 1)[:, None]
        ns = tl.full([BT, BM], 1.0, dtype=tl.float32)
        if KEEP_START:
            c = tl.dot(V, S0, input_precision=PREC)
        else:
            c = tl.dot(V, S, input_precision=PREC)
        if FIXED_POINT:
            P = c
            G = tl.where(strict, tl.dot(V, tl.trans(V), input_precision=PREC), 0.0)
            for it in tl.static_range(ITERS):
                a, b, _ = _gates(c, gamma, vv, ns, ORTHOGONAL, True)
                la, neg, g, n = _log_cumsum(a)
                c_next = _signed_exp(g - la, n - neg) * (P + tl.dot(G, b * _signed_exp(-g, n), input_precision=PREC))
                if it == ITERS - 1:
                    residual = tl.maximum(residual, tl.max(tl.abs(c_next - c), 0))
                c = c_next
        tl.store(c_out + rows[:, None] * M + o_m[None, :], c, mask=tm_mask)
        a, b, _ = _gates(c, gamma, vv, ns, ORTHOGONAL, True)
        la, neg, g, n = _log_cumsum(a)
        g_end, n_end = tl.sum(la, 0), tl.sum(neg, 0)
        B_end = b * _signed_exp(g_end[None, :] - g, n_end[None, :] - n)
        S = S * _signed_exp(g_end, n_end)[None, :] + tl.dot(tl.trans(V), B_end, input_precision=PREC)
        t0 += BT
    norm = tl.maximum(tl.sqrt(tl.sum(S * S, 0)), 1e-12)
    tl.store(norms + (i_bh.to(tl.int64) * NC + NC - 1) * M + o_m, norm, mask=m_mask)
    S = S / norm[None, :]
    tl.store(s_final + i_bh.to(tl.int64) * D * M + s_off, S, mask=s_mask)
    tl.store(res_out + i_bh * tl.num_programs(0) + i_m, tl.max(residual, 0))


def _slot_block(B: int, H: int, M: int, device: torch.device) -> int:
    """Slots per program: up to BM_MAX, halved (down to 16) while the grid would leave SMs idle."""
    bm = min(BM_MAX, _pow2(M))
    while bm > 16 and B * H * triton.cdiv(M, bm) < _sm_count(device):
        bm //= 2
    return bm


def _frozen_step(chunk_size: int) -> int:
    """Tokens per step of the frozen-gate pass: the largest power of two dividing the chunk, at most BT_FROZEN."""
    return min(BT_FROZEN, chunk_size & -chunk_size)


def matmul_gate_pass(k, v, beta, state, *, chunk_size: int, exact: bool, iters: int, orthogonal: bool, prec: str):
    """``(c, states, final_state, norms, residual)`` for contiguous ``k (B, T, H, M)``, ``v (B, T, H, D)``,
    ``beta (B, T, H)`` and a float32 ``state (B, H, D, M)``; ``T`` a multiple of 16 (padded by the caller).

    ``chunk_size``: tokens between stored states (the frozen-gate span when not ``exact``; a multiple of 16).
    ``norms``: the column norms each chunk's end state had before its retraction ``(B, H, NC, M)``.
    ``residual``: ``max |c^(K) - c^(K-1)|`` over the whole call (a 0-d tensor; 0 when not ``exact`` or ``iters=0``).
    """
    B, T, H, M = k.shape
    D = v.shape[3]
    NC = triton.cdiv(T, chunk_size)
    bm = _slot_block(B, H, M, k.device)
    bt = FP_SUB if exact else _frozen_step(chunk_size)
    c = torch.empty(B, T, H, M, device=k.device, dtype=torch.float32)
    states = torch.empty(B, H, NC, D, M, device=k.device, dtype=torch.float32)
    final = torch.empty(B, H, D, M, device=k.device, dtype=torch.float32)
    norms = torch.empty(B, H, NC, M, device=k.device, dtype=torch.float32)
    n_mb = triton.cdiv(M, bm)
    residual = torch.zeros(B * H * n_mb, device=k.device, dtype=torch.float32)
    _matmul_gates_kernel[(n_mb, B * H)](
        k,
        v,
        beta,
        state,
        c,
        states,
        final,
        norms,
        residual,
        T,
        NC,
        H,
        M,
        D,
        chunk_size,
        bt,
        bm,
        _pow2(D),
        exact,
        iters if exact else 0,
        not exact and bt < chunk_size,
        orthogonal,
        PREC=prec,
        num_warps=GATE_WARPS,
    )
    return c, states, final, norms, residual.max()
