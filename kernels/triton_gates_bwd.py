"""The reverse gate pass by matmuls (docs/math.md §4, §4b), in place of the per-token reverse sweep of
:mod:`triton_chunk_bwd`, for the forward of :mod:`triton_gates_fwd`.

With ``g_t`` the cumulative log-gate from the chunk start, ``G_t`` the gradient of the state after token ``t`` and
``dq`` the gradient of the read codes (from :mod:`triton_chunk_bwd`'s dq pass, computed first), per slot:

    db_t           = v_t . G_t
    dL / d g_t     = q_t dq_t - b_t db_t + dc_{t+1} c_{t+1}    (last term: exact gates only, whose token t+1
                                                                 reads the state after t; the chunk end adds
                                                                 G_end . S_end = 0: the retraction's gradient is
                                                                 tangent to the sphere)
    dL / d log a_t = sum_{u >= t in the chunk} dL / d g_u,       da_t = that / a_t

and the gate partials give ``dc``, ``d gamma``, ``d ||v||^2`` per token. Frozen gates (``gates="chunk"``) read the
chunk-start state ``S0``, so ``dc`` reaches it as ``V^T dc`` and nothing feeds back inside the chunk. Exact gates
read the running state, ``G_t`` gains ``sum_{u>t} dc_u e^{g_{u-1} - g_t} v_u``, and ``dc_t`` depends on ``dc_u``
(``u > t``) only: a strictly triangular adjoint solved like the forward, ``ITERS + 1`` evaluations from zero
feedback on 16-token sub-chunks (the last ``k`` tokens exact after ``k``; exact after 16), each a (16 x 16) @
(16 x BM) matmul with the Gram matrix plus elementwise work.

One program per (batch, kv head, block of BM slots) walks the chunks backwards and each chunk's 16-token
sub-chunks backwards, carrying ``G`` (``[D, BM]``): per sub-chunk ``V G`` and, per query head,
``mask(V dO^T) (Q e^g)`` and ``dO^T (Q e^g)`` are matmuls; ``e^{-g}`` spans 16 tokens only. It writes what the
sweep writes (``dc``, ``d gamma``, ``d ||v||^2`` per token, the state gradient at every chunk end after the
retraction, the gradient of the initial state), so the dv passes of :mod:`triton_chunk_fwd` and
:mod:`triton_chunk_bwd` run unchanged.

``da = (dL/d log a) / a`` is ill-conditioned near ``a = 0`` (docs/math.md §4b), which is why these passes are
opt-in. A gate of exactly 0 passes no gradient (``_through_gate``), and where ``e^g`` underflows inside a sub-chunk
(after two such gates) the intra-sub-chunk term of ``db`` is dropped: finite there, not exact.
"""

import torch
import triton
import triton.language as tl

from .triton_common import BC, _gate_grads, _gates, _log_gates, _pow2, _signed_exp
from .triton_gates_fwd import GATE_WARPS, _slot_block


@triton.jit
def _through_gate(dlog_a, a):
    """``dL/da`` from ``dL/d log|a|``, or 0 for a vanishing gate (``|a| < 1e-30``), where the log has no derivative:
    finite, but not the true gradient there (the scan has it; docs/math.md §4b)."""
    return tl.where(tl.abs(a) >= 1e-30, dlog_a / a, 0.0)


@triton.jit
def _frozen_reverse_kernel(
    q,
    do,
    k,
    v,
    beta,
    c_in,
    qdq,
    states,
    norms,
    s_final,
    d_final,
    dc_out,
    dgamma_out,
    dvv_out,
    g_out,
    d_init,
    T,
    NC,
    HQ: tl.constexpr,
    H: tl.constexpr,
    M: tl.constexpr,
    D: tl.constexpr,
    BCC: tl.constexpr,
    CS: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    EXACT: tl.constexpr,
    ITERS: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
    ORTHOGONAL: tl.constexpr,
    PREC: tl.constexpr,
):
    """``qdq``: ``sum over the group's query heads of q * dq`` ``(B, T, H, M)`` float32. ``T`` a multiple of BCC.
    EXACT: ``dc`` by ITERS + 1 evaluations of the adjoint map from zero feedback (see the module docstring)."""
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
    shift = (o_t[None, :] == o_t[:, None] + 1).to(tl.float32)  # [t, u]: u = t + 1
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
        pend = tl.zeros([BD, BM], dtype=tl.float32)  # frozen gates: the gradient reaching the chunk start via c
        next_dcc = tl.zeros([BM], dtype=tl.float32)  # exact gates: dc * c of the next sub-chunk's first token
        r = tl.minimum(CS, T - c_lo) // BCC - 1
        while r >= 0:
            t0 = c_lo + r * BCC
            rows = tok0 + (t0 + o_t).to(tl.int64) * H
            tile = rows[:, None] * M + o_m[None, :]
            V = tl.load(v + rows[:, None] * D + o_d[None, :], mask=vd_mask, other=0.0).to(tl.float32)
            gamma = tl.load(beta + rows).to(tl.float32)[:, None] * tl.load(k + tile, mask=tm_mask, other=0.0).to(
                tl.float32
            )
            c = tl.load(c_in + tile, mask=tm_mask, other=0.0)
            vv = tl.sum(V * V, 1)[:, None]
            a, b, _ = _gates(c, gamma, vv, ones, ORTHOGONAL, True)
            la, neg = _log_gates(a)  # signed log-gates, as in the forward pass (triton_gates_fwd._log_cumsum)
            g, n = tl.cumsum(la, 0), tl.cumsum(neg, 0)
            g_end, n_end = tl.sum(la, 0), tl.sum(neg, 0)
            eg = _signed_exp(g, n)
            db = _signed_exp(g_end[None, :] - g, n_end[None, :] - n) * tl.dot(V, gS, input_precision=PREC)
            gS = gS * _signed_exp(g_end, n_end)[None, :]
            intra = tl.zeros([BCC, BM], dtype=tl.float32)
            for gq in tl.static_range(G):
                qrows = qtok0 + gq + (t0 + o_t).to(tl.int64) * HQ
                QL = tl.load(q + qrows[:, None] * M + o_m[None, :], mask=tm_mask, other=0.0).to(tl.float32) * eg
                DO = tl.load(do + qrows[:, None] * D + o_d[None, :], mask=vd_mask, other=0.0).to(tl.float32)
                intra += tl.dot(
                    tl.where(later, tl.dot(V, tl.trans(DO), input_precision=PREC), 0.0), QL, input_precision=PREC
                )
                gS += tl.dot(tl.trans(DO), QL, input_precision=PREC)
            db += tl.where(eg != 0.0, intra / eg, 0.0)  # e^g underflows after two vanishing gates (module doc)
            qdq_t = tl.load(qdq + tile, mask=tm_mask, other=0.0)
            if EXACT:
                ep = _signed_exp(g - la, n - neg)  # e^{g_{t-1}}: token u's gate reads the state before it
                feedback = tl.where(o_t[:, None] < o_t[None, :], tl.dot(V, tl.trans(V), input_precision=PREC), 0.0)
                carry = tl.where(o_t[:, None] == BCC - 1, next_dcc[None, :], 0.0)
                dc = tl.zeros([BCC, BM], dtype=tl.float32)
                db_fixed = db
                for it in tl.static_range(ITERS + 1):  # noqa: B007
                    db = db_fixed + tl.dot(feedback, dc * ep, input_precision=PREC) / eg
                    dg = qdq_t + tl.dot(shift, dc * c, input_precision=PREC) + carry - b * db
                    sub_sum = tl.sum(dg, 0)
                    dlog_a = later_sum[None, :] + sub_sum[None, :] - tl.cumsum(dg, 0) + dg
                    dc, dgamma, dvv, _ = _gate_grads(
                        c, gamma, vv, ones, a, b, _through_gate(dlog_a, a), db, ones * 0.0, ORTHOGONAL, True
                    )
                    dc = tl.where(m_mask[None, :], dc, 0.0)
                next_dcc = tl.sum(tl.where(o_t[:, None] == 0, dc * c, 0.0), 0)
                gS += tl.dot(tl.trans(V), dc * ep, input_precision=PREC)
            else:
                dg = qdq_t - b * db
                sub_sum = tl.sum(dg, 0)
                dlog_a = later_sum[None, :] + sub_sum[None, :] - tl.cumsum(dg, 0) + dg
                dc, dgamma, dvv, _ = _gate_grads(
                    c, gamma, vv, ones, a, b, _through_gate(dlog_a, a), db, ones * 0.0, ORTHOGONAL, True
                )
                dc = tl.where(m_mask[None, :], dc, 0.0)
                pend += tl.dot(tl.trans(V), dc, input_precision=PREC)
            later_sum += sub_sum
            tl.store(dc_out + tile, dc, mask=tm_mask)
            tl.store(dgamma_out + tile, dgamma, mask=tm_mask)
            tl.store(dvv_out + tile, dvv, mask=tm_mask)
            r -= 1
        gS += pend
        i_c -= 1
    tl.store(d_init + i_bh.to(tl.int64) * D * M + s_off, gS, mask=s_mask)


def matmul_reverse_pass(
    q,
    do,
    k,
    v,
    beta,
    c,
    qdq,
    states,
    norms,
    final,
    d_final,
    *,
    chunk_size: int,
    exact: bool,
    iters: int,
    orthogonal: bool,
    prec: str,
):
    """``(dc, dgamma, dvv, g_end, d_init)`` as :mod:`triton_chunk_bwd`'s reverse sweep returns them.

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
        q,
        do,
        k,
        v,
        beta,
        c,
        qdq,
        states,
        norms,
        final,
        d_final if d_final is not None else final,
        dc,
        dgamma,
        dvv,
        g_end,
        d_init,
        T,
        NC,
        HQ,
        H,
        M,
        D,
        BC,
        chunk_size,
        bm,
        _pow2(D),
        exact,
        iters if exact else 0,
        d_final is not None,
        orthogonal,
        PREC=prec,
        num_warps=GATE_WARPS,
    )
    return dc, dgamma, dvv, g_end, d_init
