"""The reverse gate pass by matmuls for frozen chunk gates (docs/math.md §4), in place of the per-token reverse sweep
of :mod:`triton_chunk`.

Within a chunk the gates are frozen at the chunk-start state ``S0`` (``c = P = V S0``), so the state gradient
needs no per-token feedback through the gates and the chunk is gated linear attention. With ``g_t`` the cumulative
log-gate from the chunk start, ``G_t`` the gradient of the state after token ``t`` and ``dq`` the gradient of the
read codes (from :mod:`triton_chunk`'s dq pass, computed first), per slot:

    db_t         = v_t . G_t
    dL / d g_t   = q_t dq_t - b_t db_t          (the chunk end adds G_end . S_end = 0: the retraction's gradient is
                                                 tangent to the sphere)
    dL / d log a_t = sum_{u >= t in the chunk} dL / d g_u,    da_t = that / a_t

then the gate partials give ``dc``, ``d gamma``, ``d ||v||^2`` per token, and ``dc`` reaches ``S0`` as ``V^T dc``.
One program per (batch, kv head, block of BM slots) walks the chunks backwards and each chunk's 16-token
sub-chunks backwards, carrying ``G`` (``[D, BM]``): per sub-chunk ``V G`` and, per query head,
``mask(V dO^T) (Q e^g)`` and ``dO^T (Q e^g)`` are matmuls; ``e^{-g}`` spans 16 tokens only.

It writes what the sweep writes (``dc``, ``d gamma``, ``d ||v||^2`` per token, the state gradient at every chunk end
after the retraction, the gradient of the initial state), so the dv passes of :mod:`triton_chunk` run unchanged.
"""

import torch
import triton
import triton.language as tl

from .triton_chunk import BC, _gate_grads, _gates, _pow2
from .triton_gates_fwd import GATE_WARPS, _slot_block


@triton.jit
def _frozen_reverse_kernel(
    q, do, k, v, beta, c_in, qdq, states, norms, s_final, d_final,
    dc_out, dgamma_out, dvv_out, g_out, d_init,
    T, NC,
    HQ: tl.constexpr, H: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    BCC: tl.constexpr, CS: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    HAS_DFINAL: tl.constexpr, ORTHOGONAL: tl.constexpr, PREC: tl.constexpr,
):
    """``qdq``: ``sum over the group's query heads of q * dq`` ``(B, T, H, M)`` float32. ``T`` a multiple of BCC."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    G: tl.constexpr = HQ // H
    o_m = i_m * BM + tl.arange(0, BM)
    m_mask = o_m < M
    o_d = tl.arange(0, BD)
    d_mask = o_d < D
    o_t = tl.arange(0, BCC)
    s_off = o_d[:, None] * M + o_m[None, :]
    s_mask = d_mask[:, None] & m_mask[None, :]
    vd_mask = (o_t < BCC)[:, None] & d_mask[None, :]
    tm_mask = (o_t < BCC)[:, None] & m_mask[None, :]
    later = o_t[:, None] <= o_t[None, :]  # [t, u]: u >= t
    ones = tl.full([BCC, BM], 1.0, dtype=tl.float32)
    if HAS_DFINAL:
        gS = tl.load(d_final + i_bh.to(tl.int64) * D * M + s_off, mask=s_mask, other=0.0)
    else:
        gS = tl.zeros([BD, BM], dtype=tl.float32)
    tok0 = i_b.to(tl.int64) * T * H + i_h
    qtok0 = i_b.to(tl.int64) * T * HQ + i_h * G
    i_c = NC - 1
    while i_c >= 0:
        # through the retraction at the chunk end: s = r / ||r|| (the stored state after it is the next chunk's start)
        if i_c == NC - 1:
            S_end = tl.load(s_final + i_bh.to(tl.int64) * D * M + s_off, mask=s_mask, other=0.0)
        else:
            S_end = tl.load(states + (i_bh.to(tl.int64) * NC + i_c + 1) * D * M + s_off, mask=s_mask, other=0.0)
        norm = tl.load(norms + (i_bh.to(tl.int64) * NC + i_c) * M + o_m, mask=m_mask, other=1.0)
        gS = (gS - S_end * tl.sum(S_end * gS, 0)[None, :]) / norm[None, :]
        tl.store(g_out + (i_bh.to(tl.int64) * NC + i_c) * D * M + s_off, gS, mask=s_mask)
        c_lo = i_c * CS
        later_sum = tl.zeros([BM], dtype=tl.float32)  # dL/dg summed over the chunk's later sub-chunks
        pend = tl.zeros([BD, BM], dtype=tl.float32)  # the gradient reaching the chunk-start state through c
        r = tl.minimum(CS, T - c_lo) // BCC - 1
        while r >= 0:
            t0 = c_lo + r * BCC
            rows = tok0 + (t0 + o_t).to(tl.int64) * H
            tile = rows[:, None] * M + o_m[None, :]
            V = tl.load(v + rows[:, None] * D + o_d[None, :], mask=vd_mask, other=0.0).to(tl.float32)
            gamma = tl.load(beta + rows).to(tl.float32)[:, None] * tl.load(k + tile, mask=tm_mask, other=0.0).to(
                tl.float32)
            c = tl.load(c_in + tile, mask=tm_mask, other=0.0)
            vv = tl.sum(V * V, 1)[:, None]
            a, b, _ = _gates(c, gamma, vv, ones, ORTHOGONAL, True)
            la = tl.log(a)
            g = tl.cumsum(la, 0)
            g_end = tl.sum(la, 0)
            eg = tl.exp(g)
            db = tl.exp(g_end[None, :] - g) * tl.dot(V, gS, input_precision=PREC)
            gS = gS * tl.exp(g_end)[None, :]
            intra = tl.zeros([BCC, BM], dtype=tl.float32)
            for gq in tl.static_range(G):
                qrows = qtok0 + gq + (t0 + o_t).to(tl.int64) * HQ
                QL = tl.load(q + qrows[:, None] * M + o_m[None, :], mask=tm_mask, other=0.0).to(tl.float32) * eg
                DO = tl.load(do + qrows[:, None] * D + o_d[None, :], mask=vd_mask, other=0.0).to(tl.float32)
                intra += tl.dot(tl.where(later, tl.dot(V, tl.trans(DO), input_precision=PREC), 0.0), QL,
                                input_precision=PREC)
                gS += tl.dot(tl.trans(DO), QL, input_precision=PREC)
            db += intra / eg
            dg = tl.load(qdq + tile, mask=tm_mask, other=0.0) - b * db
            sub_sum = tl.sum(dg, 0)
            dlog_a = later_sum[None, :] + sub_sum[None, :] - tl.cumsum(dg, 0) + dg
            later_sum += sub_sum
            dc, dgamma, dvv, _ = _gate_grads(c, gamma, vv, ones, a, b, dlog_a / a, db, ones * 0.0, ORTHOGONAL, True)
            dc = tl.where(m_mask[None, :], dc, 0.0)
            tl.store(dc_out + tile, dc, mask=tm_mask)
            tl.store(dgamma_out + tile, dgamma, mask=tm_mask)
            tl.store(dvv_out + tile, dvv, mask=tm_mask)
            pend += tl.dot(tl.trans(V), dc, input_precision=PREC)
            r -= 1
        gS += pend
        i_c -= 1
    tl.store(d_init + i_bh.to(tl.int64) * D * M + s_off, gS, mask=s_mask)


def frozen_reverse_pass(q, do, k, v, beta, c, qdq, states, norms, final, d_final, *, chunk_size: int,
                        orthogonal: bool, prec: str):
    """``(dc, dgamma, dvv, g_end, d_init)`` as :mod:`triton_chunk`'s reverse sweep returns them, for frozen gates.

    Contiguous ``q, do (B, T, HQ, .)``, ``k, v (B, T, H, .)``, ``beta (B, T, H)``; ``c``, ``qdq`` ``(B, T, H, M)``,
    ``states``, ``norms``, ``final`` from :func:`triton_gates_fwd.matmul_gate_pass`; ``d_final`` or None.
    """
    B, T, HQ, M = q.shape
    H, D = v.shape[2], v.shape[3]
    NC = states.shape[2]
    bm = _slot_block(B, H, M, q.device)
    dc = torch.empty(B, T, H, M, device=q.device, dtype=torch.float32)
    dgamma, dvv = torch.empty_like(dc), torch.empty_like(dc)
    g_end = torch.empty_like(states)
    d_init = torch.empty_like(final)
    _frozen_reverse_kernel[(triton.cdiv(M, bm), B * H)](
        q, do, k, v, beta, c, qdq, states, norms, final, d_final if d_final is not None else final,
        dc, dgamma, dvv, g_end, d_init, T, NC,
        HQ, H, M, D, BC, chunk_size, bm, _pow2(D), d_final is not None, orthogonal, PREC=prec, num_warps=GATE_WARPS,
    )
    return dc, dgamma, dvv, g_end, d_init
