"""Backward kernels of the chunkwise Lattice (docs/math.md §4), by recomputation from what the forward stored
(``c``, ``||s||^2``, the chunk-start states); host code and autograd in :mod:`triton_chunk`, shared helpers in
:mod:`triton_common`.

- :func:`bwd_dq_kernel`: ``dq_t = S_t^T do_t``, parallel over chunks.
- :func:`bwd_scan_kernel`: one sequential reverse sweep per slot block: ``dc`` (the gradient through the gates'
  dependence on the state), d gamma and d ||v||^2 per token, the state gradient at every chunk end and the
  gradient of the initial state. Per sub-chunk each thread keeps ``g . v_l`` (16 scalars) and ``g . s_b`` for its
  slot; ``g_t . s_{t-1}`` is a Horner sum over the forward gates (products only: no logarithm, no division on the
  sweep). The Gram and ``do . v`` rows it needs are 4-, 8- or 16-wide vector loads split in-thread
  (:func:`_uniform_row`), and whatever the next sub-chunk reads is prefetched into L1 (:func:`_prefetch_sub`).
- :func:`bwd_dv_kernel`: the write's share of dv, parallel over chunks (the gate share comes from
  :func:`triton_chunk_fwd.fwd_read_kernel`, EXCLUSIVE).

``T`` is a multiple of 16 (the host pads with identity tokens).
"""

import triton
import triton.language as tl

from .triton_common import (
    _col_dots,
    _gate_grads,
    _gates,
    _intra,
    _log_gates,
    _mul_rows,
    _opaque,
    _pack_all,
    _pack_sel,
    _prefetch,
    _row_prefix,
    _seg_prefix,
    _seg_suffix,
    _signed_exp,
    _sub_gates,
    _tile_gates,
    _uniform_row,
    _unpack_rows,
)


@triton.jit
def _prefetch_sub(
    q,
    do,
    k,
    v,
    beta,
    gram,
    hgram,
    c_in,
    row,
    qrow,
    o_c,
    i_m,
    HQ: tl.constexpr,
    H: tl.constexpr,
    M: tl.constexpr,
    D: tl.constexpr,
    BM: tl.constexpr,
    BCC: tl.constexpr,
):
    """:func:`_prefetch` of everything the reverse sweep reads for the sub-chunk whose first token is at row ``row``
    (kv-head tensors) and ``qrow`` (query-head tensors): its replay (V, c, k, beta, Gram) and its sweep (q, do,
    do . v)."""
    rows = row + o_c * H
    _prefetch(v + rows * D, D)
    _prefetch(c_in + rows * M + i_m * BM, BM)
    _prefetch(k + rows * M + i_m * BM, BM)
    _prefetch(beta + rows, 1)
    _prefetch(gram + rows * BCC, BCC)
    for gq in tl.static_range(HQ // H):
        qrows = qrow + gq + o_c * HQ
        _prefetch(q + qrows * M + i_m * BM, BM)
        _prefetch(do + qrows * D, D)
        _prefetch(hgram + qrows * BCC, BCC)


@triton.jit
def _gram_prefix(p, j: tl.constexpr, SCALAR: tl.constexpr):
    """Entries ``l < j`` of a Gram row at ``p``: :func:`_row_prefix` vector loads, or ``j`` scalar loads
    (``SCALAR``; Triton's Coalesce pass skips scalar memory operations, and it walks a slice of the whole kernel for
    every tensor one)."""
    if SCALAR:
        out = ()
        for l in tl.static_range(j):
            out = out + (tl.load(p + l),)
    else:
        out = _row_prefix(p, j)
    return out


@triton.jit(do_not_specialize=["NC"])  # one build for every chunk count
def bwd_scan_kernel(
    q,
    do,
    k,
    v,
    beta,
    gram,
    hgram,
    c_in,
    ns_in,
    states,
    d_final,
    scratch,
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
    ORTHOGONAL: tl.constexpr,
    NORMALIZE: tl.constexpr,
    TRACK_NS: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
    PREC: tl.constexpr,
    SCALAR_ROWS: tl.constexpr,
):
    """The reverse sweep: ``dc``, d gamma and d ||v||^2 per token, the state gradient at every chunk end.

    Per sub-chunk (walking backwards) every thread keeps, for its own slots, ``U[l] = g . v_l`` and
    ``rho = g . s_b`` (``g`` the state gradient, ``s_b`` the slot at the sub-chunk start) as scalars; then
    ``g_t . v_t = U[t]`` and ``g_t . s_{t-1} = A_{t-1} rho + sum_{l<t} W_{t-1}[l] U[l]`` (a Horner sum over the
    forward gates, plain products: no logarithms on the sweep). The d-sized products (``V g``, ``V s_b``,
    ``dO s_b``, the new ``g``) are matmuls once per sub-chunk. ``T`` is a multiple of ``BCC``. Each chunk is
    first replayed forward from its stored start state to put the state before each sub-chunk in ``scratch``
    (``CS / BCC`` tiles of ``BD x BM`` floats per program).

    At step ``j`` the rows ``v_j . v_l`` and ``do_{j-1} . v_l`` (``l < j``) are :func:`_gram_prefix` vector loads
    (scalar loads with ``SCALAR_ROWS``);
    ``gamma`` is one ``beta * k`` tile product; the ``c``, ``gamma`` and ``q`` tiles pass :func:`_opaque` before
    their unpack; every tile the next sub-chunk reads (replay or sweep) is prefetched into L1
    (:func:`_prefetch_sub`). The host launches it on 8-slot blocks at one warp for 16-bit inputs (docs/design.md)."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    G: tl.constexpr = HQ // H
    o_m = i_m * BM + tl.arange(0, BM)
    m_mask = o_m < M
    o_d = tl.arange(0, BD)
    d_mask = o_d < D
    o_c = tl.arange(0, BCC)
    s_off = o_d[:, None] * M + o_m[None, :]
    s_mask = d_mask[:, None] & m_mask[None, :]
    vd_mask = (o_c < BCC)[:, None] & d_mask[None, :]
    if HAS_DFINAL:
        gE = tl.load(d_final + i_bh.to(tl.int64) * D * M + s_off, mask=s_mask, other=0.0)
    else:
        gE = tl.zeros([BD, BM], dtype=tl.float32)
    p_sc = (
        scratch
        + (i_bh * tl.num_programs(0) + i_m).to(tl.int64) * (CS // BCC) * BD * BM
        + o_d[:, None] * BM
        + tl.arange(0, BM)[None, :]
    )
    tok0 = i_b.to(tl.int64) * T * H + i_h
    qtok0 = i_b.to(tl.int64) * T * HQ + i_h * G
    i_c = NC - 1
    while i_c >= 0:
        p_state = (i_bh.to(tl.int64) * NC + i_c) * D * M + s_off
        c_lo = i_c * CS
        n_sub = tl.minimum(CS, T - c_lo) // BCC
        # replay the chunk forward to get the state before each sub-chunk
        tl.debug_barrier()
        S = tl.load(states + p_state, mask=s_mask, other=0.0)
        r = 0
        while r < n_sub:
            tl.store(p_sc + r * BD * BM, S)
            t1 = c_lo + tl.minimum(r + 1, n_sub - 1) * BCC  # the next sub-chunk: replay, then the sweep's first
            _prefetch_sub(
                q, do, k, v, beta, gram, hgram, c_in, tok0 + t1 * H, qtok0 + t1 * HQ, o_c, i_m, HQ, H, M, D, BM, BCC
            )
            rows = c_lo + r * BCC + o_c
            t_mask = rows < T
            tok = tok0 + rows.to(tl.int64) * H
            a, b = _tile_gates(
                c_in, ns_in, k, beta, gram, tok, o_c, t_mask, o_m, m_mask, M, BCC, ORTHOGONAL, NORMALIZE, TRACK_NS
            )
            la, neg = _log_gates(a)
            L = tl.cumsum(la, 0)
            N = tl.cumsum(neg, 0)
            L_end = tl.sum(la, 0)
            N_end = tl.sum(neg, 0)
            W = b * _signed_exp(L_end[None, :] - L, N_end[None, :] - N)
            Vf = tl.load(v + tok[:, None] * D + o_d[None, :], mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(
                tl.float32
            )
            S = S * _signed_exp(L_end, N_end)[None, :] + tl.dot(tl.trans(Vf), W, input_precision=PREC)
            r += 1
        tl.debug_barrier()
        if NORMALIZE:
            # the chunk ends with s = r / ||r||: its gradient is projected onto the sphere's tangent space
            # (identity for exact gates in real arithmetic; not for frozen gates, which leave the sphere)
            norm = tl.maximum(tl.sqrt(tl.sum(S * S, 0)), 1e-12)
            S = S / norm[None, :]
            gE = (gE - S * tl.sum(S * gE, 0)[None, :]) / norm[None, :]
        tl.store(g_out + p_state, gE, mask=s_mask)
        nu = tl.zeros([BM], dtype=tl.float32)  # gradient of ||s||^2 carried through the chunk (TRACK_NS)
        pend = tl.zeros([BD, BM], dtype=tl.float32)  # gates="chunk": gradient reaching the chunk-start state via c
        r = n_sub - 1
        while r >= 0:
            t0 = c_lo + r * BCC
            row0 = tok0 + t0 * H  # token j of the sub-chunk: row0 + j * H (kv-head tensors)
            qrow0 = qtok0 + t0 * HQ  # query head g of token j: qrow0 + g + j * HQ
            # the next sub-chunk to be read: r - 1 of this chunk, else the first replayed one of the chunk before
            t1 = tl.where(r > 0, t0 - BCC, tl.maximum(c_lo - CS, 0))
            _prefetch_sub(
                q, do, k, v, beta, gram, hgram, c_in, tok0 + t1 * H, qtok0 + t1 * HQ, o_c, i_m, HQ, H, M, D, BM, BCC
            )
            S_b = tl.load(p_sc + r * BD * BM)
            Vf = tl.load(v + (row0 + o_c * H)[:, None] * D + o_d[None, :], mask=vd_mask, other=0.0).to(tl.float32)
            U = _unpack_rows(tl.dot(Vf, gE, input_precision=PREC))  # U[l] = g . v_l
            rho = _col_dots(gE, S_b)  # g . s_b
            if EXACT:
                P = _unpack_rows(tl.dot(Vf, S_b, input_precision=PREC))  # v_l . s_b
            # forward gates of the sub-chunk, per thread
            rmask = (o_c < BCC)[:, None] & m_mask[None, :]
            tile = (row0 + o_c * H)[:, None] * M + o_m[None, :]  # [BCC, BM] offsets of the slot rows
            Cs = _unpack_rows(_opaque(tl.load(c_in + tile, mask=rmask, other=0.0)))
            # gamma = beta k: one tile product (beta is a column), no per-token scalar loads
            Gs = _unpack_rows(
                _opaque(
                    tl.load(beta + row0 + o_c * H).to(tl.float32)[:, None]
                    * tl.load(k + tile, mask=rmask, other=0.0).to(tl.float32)
                )
            )
            if TRACK_NS:
                Ns = _unpack_rows(tl.load(ns_in + tile, mask=rmask, other=1.0))
            p_g = gram + row0 * BCC  # Gram row of token j: p_g + j * H * BCC
            VVs = ()  # ||v_j||^2, uniform
            As = ()
            Bs = ()
            for j in tl.static_range(BCC):
                VVs = VVs + (tl.load(p_g + j * H * BCC + j),)
                if TRACK_NS:
                    ns = Ns[j]
                else:
                    ns = tl.full([BM], 1.0, dtype=tl.float32)
                a, b, _ = _gates(Cs[j], Gs[j], VVs[j], ns, ORTHOGONAL, NORMALIZE)
                As = As + (a,)
                Bs = Bs + (b,)
            # the reads: Qs[g][j] = q_j (query head g), Fs[g][j] = do_j . s_b; the read at the last token is in g
            Qs = ()
            Fs = ()
            for gq in tl.static_range(G):
                DOg = tl.load(do + (qrow0 + gq + o_c * HQ)[:, None] * D + o_d[None, :], mask=vd_mask, other=0.0).to(
                    tl.float32
                )
                Fs = Fs + (_unpack_rows(tl.dot(DOg, S_b, input_precision=PREC)),)
                qg = _unpack_rows(
                    _opaque(
                        tl.load(q + (qrow0 + gq + o_c * HQ)[:, None] * M + o_m[None, :], mask=rmask, other=0.0).to(
                            tl.float32
                        )
                    )
                )
                Qs = Qs + (qg,)
                Hr = _uniform_row(hgram + (qrow0 + gq + (BCC - 1) * HQ) * BCC, BCC)  # do_15 . v_l
                Un = ()
                for l in tl.static_range(BCC):
                    Un = Un + (U[l] + qg[BCC - 1] * Hr[l],)
                U = Un
                rho += qg[BCC - 1] * Fs[gq][BCC - 1]
            # prod_{l<j} a_l: the decay from token j back to the sub-chunk start
            Pre = ()
            A = tl.full([BM], 1.0, dtype=tl.float32)
            for j in tl.static_range(BCC):
                Pre = Pre + (A,)
                A = A * As[j]
            QO = ()  # per query head: q_j prod_{l<=j} a_l, the weight of do_j in g_b
            for gq in tl.static_range(G):  # noqa: B007
                QO = QO + (tl.zeros([BCC, BM], dtype=tl.float32),)
            DC = tl.zeros([BCC, BM], dtype=tl.float32)
            DW = tl.zeros([BCC, BM], dtype=tl.float32)  # dc_j prod_{l<j} a_l: the weight of v_j in g_b
            DG = tl.zeros([BCC, BM], dtype=tl.float32)
            DV = tl.zeros([BCC, BM], dtype=tl.float32)
            o_r = o_c[:, None]
            for j in tl.static_range(BCC - 1, -1, -1):
                # d b_j = g_j . v_j ; d a_j = g_j . s_{j-1} = A_{j-1} rho + sum_{l<j} b_l (prod_{l<l'<j} a_l') U[l]
                x = rho
                for l in tl.static_range(j):
                    x = x * As[l] + Bs[l] * U[l]
                if EXACT:
                    dns_new = nu
                else:
                    dns_new = nu * 0.0
                if TRACK_NS:
                    ns = Ns[j]
                else:
                    ns = tl.full([BM], 1.0, dtype=tl.float32)
                dc, dgamma, dvv, dns = _gate_grads(
                    Cs[j], Gs[j], VVs[j], ns, As[j], Bs[j], x, U[j], dns_new, ORTHOGONAL, NORMALIZE
                )
                dc = tl.where(m_mask, dc, 0.0)
                DC = tl.where(o_r == j, dc[None, :], DC)
                if EXACT:
                    DW = tl.where(o_r == j, (dc * Pre[j])[None, :], DW)
                DG = tl.where(o_r == j, dgamma[None, :], DG)
                DV = tl.where(o_r == j, dvv[None, :], DV)
                QOn = ()
                for gq in tl.static_range(G):
                    QOn = QOn + (tl.where(o_r == j, (Qs[gq][j] * Pre[j] * As[j])[None, :], QO[gq]),)
                QO = QOn
                if TRACK_NS:
                    if EXACT:
                        nu = dns
                    else:
                        nu += dns
                if j > 0:
                    # g_{j-1} = a_j g_j + sum_g q_{j-1} do_{j-1} (+ dc_j v_j when the gates read s_{j-1})
                    rho = As[j] * rho
                    Un = ()
                    for l in tl.static_range(j):
                        Un = Un + (As[j] * U[l],)
                    U = Un
                    for gq in tl.static_range(G):
                        Hr = _gram_prefix(hgram + (qrow0 + gq + (j - 1) * HQ) * BCC, j, SCALAR_ROWS)  # do_{j-1} . v_l
                        Un = ()
                        for l in tl.static_range(j):
                            Un = Un + (U[l] + Qs[gq][j - 1] * Hr[l],)
                        U = Un
                        rho += Qs[gq][j - 1] * Fs[gq][j - 1]
                    if EXACT:
                        Gr = _gram_prefix(p_g + j * H * BCC, j, SCALAR_ROWS)  # v_j . v_l
                        Un = ()
                        for l in tl.static_range(j):
                            Un = Un + (U[l] + dc * Gr[l],)
                        U = Un
                        rho += dc * P[j]
            tl.store(dc_out + tile, DC, mask=rmask)
            tl.store(dgamma_out + tile, DG, mask=rmask)
            tl.store(dvv_out + tile, DV, mask=rmask)
            # gradient before the sub-chunk: g_b = A g + sum_u (prod_{l<=u} a_l) q_u do_u + sum_u (prod_{l<u} a_l) dc_u v_u
            g_new = gE * _opaque(A)[None, :]
            Vf = tl.load(v + (row0 + o_c * H)[:, None] * D + o_d[None, :], mask=vd_mask, other=0.0).to(tl.float32)
            for gq in tl.static_range(G):
                DOg = tl.load(do + (qrow0 + gq + o_c * HQ)[:, None] * D + o_d[None, :], mask=vd_mask, other=0.0).to(
                    tl.float32
                )
                g_new += tl.dot(tl.trans(DOg), QO[gq], input_precision=PREC)
            if EXACT:
                g_new += tl.dot(tl.trans(Vf), DW, input_precision=PREC)
            else:
                pend += tl.dot(tl.trans(Vf), DC, input_precision=PREC)
            gE = g_new
            r -= 1
        if TRACK_NS:
            S_c = tl.load(states + p_state, mask=s_mask, other=0.0)
            gE += 2.0 * S_c * _opaque(nu)[None, :]
        if not EXACT:
            gE += pend
        i_c -= 1
    tl.store(d_init + i_bh.to(tl.int64) * D * M + s_off, gE, mask=s_mask)


@triton.jit
def _level_dq(Hm, As, Bs, h: tl.constexpr, PREC: tl.constexpr):
    """One level of :func:`_intra` applied to a matrix: ``sum_j Hm[t, j] b_j prod_{j<l<=t} a_l`` over the level's
    pairs (a ``[16, 16] x [16, BK]`` matmul, its rows scaled by the upper half's prefix products)."""
    Xh = _pack_sel(_seg_prefix(As, h, False), h, 1)
    Yh = _pack_sel(_mul_rows(Bs, _seg_suffix(As, h)), h, 0)
    r = tl.arange(0, 16)[:, None]
    c = tl.arange(0, 16)[None, :]
    return Xh * tl.dot(tl.where(r // (2 * h) == c // (2 * h), Hm, 0.0), Yh, input_precision=PREC)


@triton.jit(do_not_specialize=["NC"])  # one build for every chunk count
def bwd_dq_kernel(
    do,
    k,
    v,
    beta,
    gram,
    hgram,
    c_in,
    ns_in,
    states,
    dq,
    T,
    NC,
    HQ: tl.constexpr,
    H: tl.constexpr,
    M: tl.constexpr,
    D: tl.constexpr,
    BCC: tl.constexpr,
    CS: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    ORTHOGONAL: tl.constexpr,
    NORMALIZE: tl.constexpr,
    TRACK_NS: tl.constexpr,
    PREC: tl.constexpr,
):
    """``dq_t = S_t^T do_t`` over one chunk, walking its sub-chunks from the stored chunk-start state:
    ``dq = (dO S_b) * A + sum_{j<=t} (do_t . v_j) b_j prod_{j<l<=t} a_l`` (the sum as in :func:`_intra`)."""
    i_k, i_c, i_bq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_hq = i_bq // HQ, i_bq % HQ
    i_h = i_hq // (HQ // H)
    o_k = i_k * BK + tl.arange(0, BK)
    k_mask = o_k < M
    o_d = tl.arange(0, BD)
    d_mask = o_d < D
    o_c = tl.arange(0, BCC)
    i_bh = i_b * H + i_h
    S = tl.load(
        states + (i_bh.to(tl.int64) * NC + i_c) * D * M + o_d[:, None] * M + o_k[None, :],
        mask=d_mask[:, None] & k_mask[None, :],
        other=0.0,
    )
    tok0 = i_b.to(tl.int64) * T * H + i_h
    qtok0 = i_b.to(tl.int64) * T * HQ + i_hq
    vd_mask = (o_c < BCC)[:, None] & d_mask[None, :]
    r = o_c[:, None]
    c = o_c[None, :]
    t0 = i_c * CS
    while t0 < tl.minimum(i_c * CS + CS, T):
        rows = tok0 + (t0 + o_c).to(tl.int64) * H
        qrows = qtok0 + (t0 + o_c).to(tl.int64) * HQ
        DO = tl.load(do + qrows[:, None] * D + o_d[None, :], mask=vd_mask, other=0.0).to(tl.float32)
        Hm = tl.load(hgram + qrows[:, None] * BCC + o_c[None, :])  # do_t . v_j
        As, Bs = _sub_gates(
            c_in, ns_in, k, beta, gram, tok0 + t0 * H, o_c, o_k, k_mask, H, M, BCC, ORTHOGONAL, NORMALIZE, TRACK_NS
        )
        P = _seg_prefix(As, 16, False)
        acc = tl.dot(DO, S, input_precision=PREC) * _pack_all(P)
        acc += tl.dot(tl.where(r == c, Hm, 0.0), _pack_all(Bs), input_precision=PREC)
        acc += _level_dq(Hm, As, Bs, 1, PREC)
        acc += _level_dq(Hm, As, Bs, 2, PREC)
        acc += _level_dq(Hm, As, Bs, 4, PREC)
        acc += _level_dq(Hm, As, Bs, 8, PREC)
        tl.store(dq + qrows[:, None] * M + o_k[None, :], acc, mask=(o_c < BCC)[:, None] & k_mask[None, :])
        Vf = tl.load(v + rows[:, None] * D + o_d[None, :], mask=vd_mask, other=0.0).to(tl.float32)
        W = _pack_all(_mul_rows(Bs, _seg_suffix(As, 16)))
        S = S * _opaque(P[15][None, :]) + tl.dot(tl.trans(Vf), W, input_precision=PREC)
        t0 += BCC


@triton.jit(do_not_specialize=["NC"])  # one build for every chunk count
def bwd_dv_kernel(
    q,
    do,
    k,
    v,
    beta,
    gram,
    c_in,
    ns_in,
    dc_in,
    dvv_in,
    g_in,
    dv,
    T,
    NC,
    HQ: tl.constexpr,
    H: tl.constexpr,
    M: tl.constexpr,
    D: tl.constexpr,
    BCC: tl.constexpr,
    CS: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    EXACT: tl.constexpr,
    ORTHOGONAL: tl.constexpr,
    NORMALIZE: tl.constexpr,
    TRACK_NS: tl.constexpr,
    PREC: tl.constexpr,
):
    """Adds ``g_t b_t + 2 v_t sum_i dvv`` to dv: the write's share, walking the chunk backwards from the stored
    gradient of its end state. Per sub-chunk, with ``g`` the gradient of its end state:
    ``dv_j += b_j prod_{j<l<16} a_l g + sum_{t>=j} M_q[t, j] do_t`` (``M_q`` from :func:`_intra`) and
    ``g <- g diag(A_end) + dO^T (q * A) (+ V^T (dc * A_excl) for exact gates)``. dc's share within the sub-chunk
    comes with dv's gate term from the exclusive read pass, which builds the same ``M``."""
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    G: tl.constexpr = HQ // H
    o_k = tl.arange(0, BK)
    k_mask = o_k < M
    o_v = i_v * BV + tl.arange(0, BV)
    v_mask = o_v < D
    o_c = tl.arange(0, BCC)
    g = tl.load(
        g_in + (i_bh.to(tl.int64) * NC + i_c) * D * M + o_v[:, None] * M + o_k[None, :],
        mask=v_mask[:, None] & k_mask[None, :],
        other=0.0,
    )
    tok0 = i_b.to(tl.int64) * T * H + i_h
    qtok0 = i_b.to(tl.int64) * T * HQ + i_h * G
    xk_mask = (o_c < BCC)[:, None] & k_mask[None, :]
    xv_mask = (o_c < BCC)[:, None] & v_mask[None, :]
    c_lo = i_c * CS
    n_sub = tl.cdiv(tl.minimum(CS, T - c_lo), BCC)
    rr = n_sub - 1
    while rr >= 0:
        t0 = c_lo + rr * BCC
        rows = tok0 + (t0 + o_c).to(tl.int64) * H
        As, Bs = _sub_gates(
            c_in, ns_in, k, beta, gram, tok0 + t0 * H, o_c, o_k, k_mask, H, M, BCC, ORTHOGONAL, NORMALIZE, TRACK_NS
        )
        P = _seg_prefix(As, 16, False)
        Vf = tl.load(v + rows[:, None] * D + o_v[None, :], mask=xv_mask, other=0.0).to(tl.float32)
        dvv = tl.sum(tl.load(dvv_in + rows[:, None] * M + o_k[None, :], mask=xk_mask, other=0.0), 1)
        BR = _pack_all(_mul_rows(Bs, _seg_suffix(As, 16)))  # b_j prod_{j<l<16} a_l
        acc = tl.dot(BR, tl.trans(g), input_precision=PREC) + 2.0 * Vf * dvv[:, None]
        g_new = g * _opaque(P[15][None, :])
        if EXACT:
            DCs = _unpack_rows(tl.load(dc_in + rows[:, None] * M + o_k[None, :], mask=xk_mask, other=0.0))
            g_new += tl.dot(tl.trans(Vf), _pack_all(_mul_rows(DCs, _seg_prefix(As, 16, True))), input_precision=PREC)
        for gq in range(G):
            qrows = qtok0 + gq + (t0 + o_c).to(tl.int64) * HQ
            Qg = tl.load(q + qrows[:, None] * M + o_k[None, :], mask=xk_mask, other=0.0).to(tl.float32)
            DOg = tl.load(do + qrows[:, None] * D + o_v[None, :], mask=xv_mask, other=0.0).to(tl.float32)
            Qs = _unpack_rows(Qg)
            Mb = _intra(Qg, Qs, As, Bs, False, True, PREC)  # [j, t]: sum_i q_t b_j prod_{j<l<=t} a_l
            acc += tl.dot(Mb, DOg, input_precision=PREC)
            g_new += tl.dot(tl.trans(DOg), _pack_all(_mul_rows(Qs, P)), input_precision=PREC)
        g = g_new
        p_dv = dv + rows[:, None] * D + o_v[None, :]
        tl.store(p_dv, tl.load(p_dv, mask=xv_mask, other=0.0) + acc, mask=xv_mask)
        rr -= 1
