"""Forward kernels of the chunkwise Lattice (docs/math.md §4); host code and autograd in :mod:`triton_chunk`, shared
helpers in :mod:`triton_common`.

- :func:`fwd_gram_kernel`: ``x_t . v_j`` within each 16-token sub-chunk (``v . v`` for the forward; the backward
  launches it for ``do . v``).
- :func:`fwd_scan_kernel`: the only sequential part, the gate scan, one program per (batch, kv head, block of
  slots): ``c`` per token (and ``||s||^2`` where the gates read it), the state at every chunk start and the final
  state. Its next sub-chunk's tiles load while the current one sweeps.
- :func:`fwd_read_kernel`: the outputs, parallel over chunks: each program re-walks one chunk's sub-chunks from the
  stored chunk-start state with the gates recomputed from ``c``. The backward launches it for dv's gate term
  (EXCLUSIVE).

The scan and the read walk whole sub-chunks: ``T`` is a multiple of 16 (the host pads with identity tokens).
"""

import triton
import triton.language as tl

from .triton_common import (
    _col_dots,
    _gates,
    _intra,
    _mul_rows,
    _opaque,
    _pack_all,
    _pack_rows,
    _prefetch,
    _row_suffix,
    _scalars,
    _seg_prefix,
    _seg_suffix,
    _sub_gates,
    _unpack_rows,
)


@triton.jit
def fwd_gram_kernel(
    x,
    v,
    out,
    T,
    HX: tl.constexpr,
    H: tl.constexpr,
    D: tl.constexpr,
    BCC: tl.constexpr,
    BD: tl.constexpr,
    PREC: tl.constexpr,
):
    """``out[b, t, hx, l] = x_t . v_{t0 + l}`` within each sub-chunk (``x`` is v itself or the output gradient)."""
    i_t, i_bx = tl.program_id(0), tl.program_id(1)
    i_b, i_hx = i_bx // HX, i_bx % HX
    i_h = i_hx // (HX // H)
    o_c = tl.arange(0, BCC)
    o_d = tl.arange(0, BD)
    rows = i_t * BCC + o_c
    mask = (rows < T)[:, None] & (o_d < D)[None, :]
    rows64 = i_b.to(tl.int64) * T + rows
    X = tl.load(x + (rows64 * HX + i_hx)[:, None] * D + o_d[None, :], mask=mask, other=0.0).to(tl.float32)
    V = tl.load(v + (rows64 * H + i_h)[:, None] * D + o_d[None, :], mask=mask, other=0.0).to(tl.float32)
    # 16-bit values are exact in tf32, so this is the float32 product either way
    G = tl.dot(X, tl.trans(V), input_precision=PREC)
    tl.store(out + (rows64 * HX + i_hx)[:, None] * BCC + o_c[None, :], G, mask=(rows < T)[:, None])


@triton.jit(do_not_specialize=["NC"])  # one build for every chunk count
def fwd_scan_kernel(
    k,
    v,
    beta,
    s_init,
    gram,
    c_out,
    ns_out,
    states,
    s_final,
    scratch,
    T,
    NC,
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
    PREC: tl.constexpr,
):
    """The sequential gate scan: stores ``c`` (and ``||s||^2``) per token and the state at every chunk start.

    Per sub-chunk: ``P = V S`` (a matmul) unpacked into one ``[BM]`` vector per token, then a fully unrolled
    16-token sweep in which every thread updates only its own slots' scalars (nothing crosses lanes on the
    dependent chain; each token's Gram row is a few uniform vector loads), then ``S <- S diag(A) + V^T W``
    (a matmul). ``T`` is a multiple of ``BCC`` (the wrapper pads with identity tokens). Without EXACT (frozen
    gates) every token reads the chunk-start state, kept in ``scratch`` (``BD x BM`` floats per program).

    The sweep is latency-bound at small batch: the V, k and beta tiles of sub-chunk i+1 are loaded during
    sub-chunk i and its Gram rows prefetched into L1. The host launches it at one warp for 16-bit inputs (the
    layout changes then need no barrier between warps; docs/design.md)."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_m = i_m * BM + tl.arange(0, BM)
    m_mask = o_m < M
    o_d = tl.arange(0, BD)
    d_mask = o_d < D
    o_c = tl.arange(0, BCC)
    s_off = o_d[:, None] * M + o_m[None, :]
    s_mask = d_mask[:, None] & m_mask[None, :]
    S = tl.load(s_init + i_bh.to(tl.int64) * D * M + s_off, mask=s_mask, other=0.0)
    if TRACK_NS:
        ns = tl.where(m_mask, _col_dots(S, S), 1.0)
    else:
        ns = tl.full([BM], 1.0, dtype=tl.float32)
    ns_c = ns
    tok0 = i_b.to(tl.int64) * T * H + i_h  # row of token t of this head in (B, T, H, .) tensors: tok0 + t * H
    p_sc = (
        scratch
        + (i_bh * tl.num_programs(0) + i_m).to(tl.int64) * BD * BM
        + o_d[:, None] * BM
        + tl.arange(0, BM)[None, :]
    )
    vd_mask = (o_c < BCC)[:, None] & d_mask[None, :]
    rmask = (o_c < BCC)[:, None] & m_mask[None, :]
    # the V, k and beta tiles of the next sub-chunk load while this one sweeps (first ones here)
    Vn = tl.load(v + (tok0 + o_c * H)[:, None] * D + o_d[None, :], mask=vd_mask, other=0.0)
    Kn = tl.load(k + (tok0 + o_c * H)[:, None] * M + o_m[None, :], mask=rmask, other=0.0)
    Bn = tl.load(beta + tok0 + o_c * H)
    t0 = 0
    while t0 < T:  # while, not range: the interpreter cannot take run-time range bounds
        if t0 % CS == 0:
            if NORMALIZE and t0 > 0:  # retraction at every chunk end, as in chunk.py
                S = S / tl.maximum(tl.sqrt(tl.sum(S * S, 0)), 1e-12)[None, :]
            if TRACK_NS:
                ns = tl.where(m_mask, _col_dots(S, S), 1.0)
            tl.store(states + (i_bh.to(tl.int64) * NC + t0 // CS) * D * M + s_off, S, mask=s_mask)
            if not EXACT:
                tl.debug_barrier()
                tl.store(p_sc, S)
                tl.debug_barrier()
                ns_c = ns
        row0 = tok0 + t0 * H  # this sub-chunk's first token; token j is row0 + j * H
        Vraw = Vn
        Kraw = Kn
        Braw = Bn
        nxt = t0 + BCC < T
        row1 = row0 + BCC * H
        Vn = tl.load(v + (row1 + o_c * H)[:, None] * D + o_d[None, :], mask=vd_mask & nxt, other=0.0)
        Kn = tl.load(k + (row1 + o_c * H)[:, None] * M + o_m[None, :], mask=rmask & nxt, other=0.0)
        Bn = tl.load(beta + row1 + o_c * H, mask=(o_c < BCC) & nxt, other=0.0)
        _prefetch(gram + (tl.where(nxt, row1, row0) + o_c * H) * BCC, BCC)  # the next sub-chunk's Gram rows
        Vf = Vraw.to(tl.float32)
        if EXACT:
            Y = _unpack_rows(tl.dot(Vf, S, input_precision=PREC))
        else:
            Y = _unpack_rows(tl.dot(Vf, tl.load(p_sc), input_precision=PREC))
        Ks = _unpack_rows(Kraw.to(tl.float32))
        Bsc = _scalars(Braw.to(tl.float32))
        tile = (row0 + o_c * H)[:, None] * M + o_m[None, :]  # [BCC, BM] offsets of this sub-chunk's slot rows
        p_g = gram + row0 * BCC  # Gram row of token j: p_g + j * H * BCC
        Cs = ()
        NSs = ()
        As = ()
        Bs = ()
        for j in tl.static_range(BCC):
            G = _row_suffix(p_g + j * H * BCC, j)  # v_j . v_u for u >= j (the Gram matrix is symmetric)
            c = Y[j]
            if EXACT:
                nsu = ns
            else:
                nsu = ns_c
            a, b, ns_new = _gates(c, Bsc[j] * Ks[j], G[j], nsu, ORTHOGONAL, NORMALIZE)
            Cs = Cs + (c,)
            NSs = NSs + (nsu,)
            if EXACT:
                ns = ns_new
                Yn = ()
                for u in tl.static_range(BCC):
                    if u <= j:
                        Yn = Yn + (Y[u],)
                    else:  # c_u = s_{u-1} . v_u: the rows of later tokens follow the slots' update
                        Yn = Yn + (a * Y[u] + b * G[u],)
                Y = Yn
            As = As + (a,)
            Bs = Bs + (b,)
        tl.store(c_out + tile, _pack_rows(Cs), mask=rmask)
        if TRACK_NS:
            tl.store(ns_out + tile, _pack_rows(NSs), mask=rmask)
        # W[l] = b_l prod_{l < l' < BC} a_l': the sub-chunk-end weight of v_l in every slot
        A = tl.full([BM], 1.0, dtype=tl.float32)
        Wr = ()
        for jj in tl.static_range(BCC):
            Wr = (Bs[BCC - 1 - jj] * A,) + Wr
            A = A * As[BCC - 1 - jj]
        S = S * _opaque(A)[None, :] + tl.dot(tl.trans(Vf), _pack_rows(Wr), input_precision=PREC)
        t0 += BCC
    if NORMALIZE:
        S = S / tl.maximum(tl.sqrt(tl.sum(S * S, 0)), 1e-12)[None, :]
    tl.store(s_final + i_bh.to(tl.int64) * D * M + s_off, S, mask=s_mask)


@triton.jit(do_not_specialize=["NC"])  # one build for every chunk count
def fwd_read_kernel(
    x,
    k,
    v,
    beta,
    gram,
    c_in,
    ns_in,
    states,
    out,
    T,
    NC,
    HX: tl.constexpr,
    H: tl.constexpr,
    M: tl.constexpr,
    D: tl.constexpr,
    BCC: tl.constexpr,
    CS: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    EXCLUSIVE: tl.constexpr,
    FROZEN: tl.constexpr,
    ORTHOGONAL: tl.constexpr,
    NORMALIZE: tl.constexpr,
    TRACK_NS: tl.constexpr,
    PREC: tl.constexpr,
):
    """``out_t = S_t x_t`` over one chunk (the outputs, x = q); with EXCLUSIVE ``S_{t-1} x_t`` (dv's gate term,
    x = dc) plus dv's share of ``dc`` through the write, ``sum_{t>j} M[t, j] v_t``, which is the same exclusive
    ``M`` transposed; with FROZEN the chunk-start state for every token (dv's gate term for gates="chunk").

    Per 16-token sub-chunk: ``out = (x * A) S_b^T + M V`` (EXCLUSIVE: ``(M + M^T) V``) with ``M`` from
    :func:`_intra`, then ``S_b <- S_b diag(A_end) + V^T W``; the gate products are per-thread scalars, the rest
    matmuls. ``T`` is a multiple of ``BCC`` (the wrapper pads with identity tokens)."""
    i_v, i_c, i_bx = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_hx = i_bx // HX, i_bx % HX
    i_h = i_hx // (HX // H)
    o_k = tl.arange(0, BK)
    k_mask = o_k < M
    o_v = i_v * BV + tl.arange(0, BV)
    v_mask = o_v < D
    o_c = tl.arange(0, BCC)
    i_bh = i_b * H + i_h
    S = tl.load(
        states + (i_bh.to(tl.int64) * NC + i_c) * D * M + o_v[:, None] * M + o_k[None, :],
        mask=v_mask[:, None] & k_mask[None, :],
        other=0.0,
    )
    tok0 = i_b.to(tl.int64) * T * H + i_h
    xtok0 = i_b.to(tl.int64) * T * HX + i_hx
    xk_mask = (o_c < BCC)[:, None] & k_mask[None, :]
    xv_mask = (o_c < BCC)[:, None] & v_mask[None, :]
    t0 = i_c * CS
    while t0 < tl.minimum(i_c * CS + CS, T):
        rows = tok0 + (t0 + o_c).to(tl.int64) * H
        xrows = xtok0 + (t0 + o_c).to(tl.int64) * HX
        X = tl.load(x + xrows[:, None] * M + o_k[None, :], mask=xk_mask, other=0.0).to(tl.float32)
        if FROZEN:
            o = tl.dot(X, tl.trans(S), input_precision=PREC)
        else:
            As, Bs = _sub_gates(
                c_in, ns_in, k, beta, gram, tok0 + t0 * H, o_c, o_k, k_mask, H, M, BCC, ORTHOGONAL, NORMALIZE, TRACK_NS
            )
            Xs = _unpack_rows(X)
            P = _seg_prefix(As, 16, EXCLUSIVE)  # decay from the sub-chunk start to t (EXCLUSIVE: to t - 1)
            Mt = _intra(X, Xs, As, Bs, EXCLUSIVE, False, PREC)
            Vf = tl.load(v + rows[:, None] * D + o_v[None, :], mask=xv_mask, other=0.0).to(tl.float32)
            o = tl.dot(_pack_all(_mul_rows(Xs, P)), tl.trans(S), input_precision=PREC)
            if EXCLUSIVE:
                o += tl.dot(Mt + tl.trans(Mt), Vf, input_precision=PREC)
                A_end = P[15] * As[15]
            else:
                o += tl.dot(Mt, Vf, input_precision=PREC)
                A_end = P[15]
            W = _pack_all(_mul_rows(Bs, _seg_suffix(As, 16)))  # b_j prod_{j<l<16} a_l
            S = S * _opaque(A_end[None, :]) + tl.dot(tl.trans(Vf), W, input_precision=PREC)
        tl.store(out + xrows[:, None] * D + o_v[None, :], o, mask=xv_mask)
        t0 += BCC
