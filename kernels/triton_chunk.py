"""Triton kernels for Lattice over sequences (LATTICE.md §4): exact chunkwise forward and backward.

Layout of the work (timings and the reasoning behind it in bench/NOTES.md):

- Slots are independent, so the only sequential part, the gate scan, runs one program per
  (batch, kv head, block of BM slots). It walks the sequence in sub-chunks of BC tokens: ``P = V S`` (a matmul),
  a sweep over the BC tokens on ``BC x BM`` scalars (``c_t = s_{t-1} . v_t`` from P and the sub-chunk Gram
  matrix), then ``S <- S diag(A) + V^T W`` (a matmul). It stores ``c`` per token (and ``||s||^2`` where the gates
  read it) and the state at every chunk start.
- Given those, every d-sized product is parallel over chunks: the outputs, dq and dv re-walk a chunk's
  sub-chunks from its stored start state with the gates recomputed from ``c`` (never stored per step).
- Backward: one sequential reverse sweep per slot block gives ``dc`` (the gradient through the gates' state
  dependence), d gamma and d ||v||^2 per token, and the state gradient at every chunk end. It needs
  ``g_t . s_{t-1}`` for every token: the state side is expanded over the sub-chunk in log space
  (``W[l] = b_l exp(L_{t-1} - L_l)``, with the sign of negative gates tracked), the adjoint side by a
  recursion on ``BC x BM`` scalars.

Gate arithmetic and states are float32 whatever the input dtype; matmuls with a float32 operand use tf32 for
16-bit inputs and full float32 ("ieee") for float32 inputs.
"""

import torch
import triton
import triton.language as tl

BC = 16  # tokens per sub-chunk of the sweeps (tl.dot needs >= 16)
CS_EXACT = 64  # tokens between stored states for gates="exact" (a free choice: the math does not depend on it)
BM_SCAN = 16  # slots per program of the sequential sweeps
BV_READ = 64  # value columns per program of the parallel passes
BK_DQ = 64  # slots per program of the dq pass
SCAN_WARPS = 2  # warps per program of the sequential sweeps (bench/NOTES.md: timed against 1 and 4)


@triton.jit
def _gates(c, gamma, vv, ns, ORTHOGONAL: tl.constexpr, NORMALIZE: tl.constexpr):
    """``s <- a s + b v`` and the new ``||s||^2``: the jit twin of ``kernels/gates.py:slot_gates``."""
    if NORMALIZE:
        if ORTHOGONAL:
            n = tl.sqrt(1.0 + gamma * gamma * tl.maximum(vv - c * c, 0.0))
            a = (1.0 - gamma * c) / n
        else:
            n = tl.sqrt(1.0 + 2.0 * gamma * c + gamma * gamma * vv)
            a = 1.0 / n
        b = gamma / n
        ns_new = ns
    else:
        if ORTHOGONAL:
            a = 1.0 - gamma * c / ns
            ns_new = ns + gamma * gamma * tl.maximum(vv - c * c / ns, 0.0)
        else:
            a = gamma * 0.0 + 1.0
            ns_new = ns + 2.0 * gamma * c + gamma * gamma * vv
        b = gamma
    return a, b, ns_new


@triton.jit
def _gate_grads(c, gamma, vv, ns, a, b, da, db, dns_new, ORTHOGONAL: tl.constexpr, NORMALIZE: tl.constexpr):
    """Reverse of :func:`_gates`: gradients of (c, gamma, ||v||^2, ||s||^2) from those of (a, b, new ||s||^2)."""
    if NORMALIZE:
        if ORTHOGONAL:
            w = tl.maximum(vv - c * c, 0.0)
            n = tl.sqrt(1.0 + gamma * gamma * w)
            dn = -(da * a + db * b) / n
            dc = -(da * gamma + dn * gamma * gamma * c) / n
            dgamma = (db - da * c + dn * gamma * w) / n
        else:
            n = tl.sqrt(1.0 + 2.0 * gamma * c + gamma * gamma * vv)
            dn = -(da * a + db * b) / n
            dc = dn * gamma / n
            dgamma = (db + dn * (c + gamma * vv)) / n
        dvv = dn * gamma * gamma / (2.0 * n)
        dns = dvv * 0.0
    else:
        if ORTHOGONAL:
            dc = -(da * gamma + 2.0 * dns_new * gamma * gamma * c) / ns
            dgamma = db - da * c / ns + 2.0 * dns_new * gamma * tl.maximum(vv - c * c / ns, 0.0)
            dvv = dns_new * gamma * gamma
            dns = da * gamma * c / (ns * ns) + dns_new * (1.0 + gamma * gamma * c * c / (ns * ns))
        else:
            dc = da * 0.0
            dgamma = db
            dvv = dc
            dns = dc
    return dc, dgamma, dvv, dns


@triton.jit
def _row(X, sel):
    """Row ``sel`` (a ``[BC, 1]`` one-hot mask) of a ``[BC, N]`` tile."""
    return tl.sum(tl.where(sel, X, 0.0), 0)


@triton.jit
def _token_gates(c_in, ns_in, k, beta, gram, tk, j, o_m, m_mask, live, M: tl.constexpr, BCC: tl.constexpr,
                 ORTHOGONAL: tl.constexpr, NORMALIZE: tl.constexpr, TRACK_NS: tl.constexpr):
    """Gates of one token from the stored ``c`` (and ``||s||^2``): ``(c, gamma, vv, ns, a, b, ns_new)``."""
    c = tl.load(c_in + tk * M + o_m, mask=m_mask & live, other=0.0)
    gamma = tl.load(beta + tk, mask=live, other=0.0).to(tl.float32) * tl.load(
        k + tk * M + o_m, mask=m_mask & live, other=0.0
    ).to(tl.float32)
    vv = tl.load(gram + tk * BCC + j, mask=live, other=0.0)
    if TRACK_NS:
        ns = tl.load(ns_in + tk * M + o_m, mask=m_mask & live, other=1.0)
    else:
        ns = c * 0.0 + 1.0
    a, b, ns_new = _gates(c, gamma, vv, ns, ORTHOGONAL, NORMALIZE)
    return c, gamma, vv, ns, a, b, ns_new


@triton.jit
def _tile_gates(c_in, ns_in, k, beta, gram, tok, o_c, t_mask, o_m, m_mask, M: tl.constexpr, BCC: tl.constexpr,
                ORTHOGONAL: tl.constexpr, NORMALIZE: tl.constexpr, TRACK_NS: tl.constexpr):
    """Gates of a sub-chunk ``[BC, BM]`` from the stored ``c``; padded tokens and slots get ``a = 1, b = 0``."""
    mask = t_mask[:, None] & m_mask[None, :]
    c = tl.load(c_in + tok[:, None] * M + o_m[None, :], mask=mask, other=0.0)
    gamma = tl.load(beta + tok, mask=t_mask, other=0.0).to(tl.float32)[:, None] * tl.load(
        k + tok[:, None] * M + o_m[None, :], mask=mask, other=0.0
    ).to(tl.float32)
    vv = tl.load(gram + tok * BCC + o_c, mask=t_mask, other=0.0)[:, None]
    if TRACK_NS:
        ns = tl.load(ns_in + tok[:, None] * M + o_m[None, :], mask=mask, other=1.0)
    else:
        ns = c * 0.0 + 1.0
    a, b, _ = _gates(c, gamma, vv, ns, ORTHOGONAL, NORMALIZE)
    return a, b


@triton.jit
def _log_gates(a):
    """``log |a|`` and the count of negative gates: products of gates in log space keep their sign."""
    return tl.log(tl.maximum(tl.abs(a), 1e-30)), (a < 0).to(tl.int32)


@triton.jit
def _signed_exp(x, negatives):
    """``exp(x)`` times ``-1`` for an odd count of negative gates."""
    return tl.exp(x) * (1 - 2 * (negatives & 1)).to(tl.float32)


@triton.jit
def _sub_gram_kernel(x, v, out, T, HX: tl.constexpr, H: tl.constexpr, D: tl.constexpr, BCC: tl.constexpr,
                     BD: tl.constexpr, PREC: tl.constexpr):
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


@triton.jit
def _fwd_scan_kernel(
    k, v, beta, s_init, gram, c_out, ns_out, states, s_final, scratch,
    T, NC,
    H: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    BCC: tl.constexpr, CS: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    EXACT: tl.constexpr, ORTHOGONAL: tl.constexpr, NORMALIZE: tl.constexpr, TRACK_NS: tl.constexpr,
    PREC: tl.constexpr,
):
    """The sequential gate scan: stores ``c`` (and ``||s||^2``) per token and the state at every chunk start."""
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
    ns = tl.where(m_mask, tl.sum(S * S, 0), 1.0)
    ns_c = ns
    tok0 = i_b.to(tl.int64) * T * H + i_h  # row of token t of this head in (B, T, H, .) tensors: tok0 + t * H
    p_sc = scratch + (i_bh * tl.num_programs(0) + i_m).to(tl.int64) * BD * BM + o_d[:, None] * BM + tl.arange(0, BM)[None, :]
    t0 = 0
    while t0 < T:  # while, not range: the interpreter cannot take run-time range bounds
        if t0 % CS == 0:
            if NORMALIZE and t0 > 0:  # retraction at every chunk end, as in chunk.py
                S = S / tl.maximum(tl.sqrt(tl.sum(S * S, 0)), 1e-12)[None, :]
            if TRACK_NS:
                ns = tl.where(m_mask, tl.sum(S * S, 0), 1.0)
            tl.store(states + (i_bh.to(tl.int64) * NC + t0 // CS) * D * M + s_off, S, mask=s_mask)
            if not EXACT:
                tl.debug_barrier()
                tl.store(p_sc, S)
                tl.debug_barrier()
                ns_c = ns
        rows = t0 + o_c
        t_mask = rows < T
        tok = tok0 + rows.to(tl.int64) * H
        Vf = tl.load(v + tok[:, None] * D + o_d[None, :], mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        if EXACT:
            Y = tl.dot(Vf, S, input_precision=PREC)
        else:
            Y = tl.dot(Vf, tl.load(p_sc), input_precision=PREC)
        W = tl.zeros([BCC, BM], dtype=tl.float32)
        A = tl.full([BM], 1.0, dtype=tl.float32)
        for j in tl.range(0, BCC):
            t = t0 + j
            live = t < T
            tk = tok0 + t * H
            sel = (o_c == j)[:, None]
            c = _row(Y, sel)
            gamma = tl.load(beta + tk, mask=live, other=0.0).to(tl.float32) * tl.load(
                k + tk * M + o_m, mask=m_mask & live, other=0.0
            ).to(tl.float32)
            vv = tl.load(gram + tk * BCC + j, mask=live, other=0.0)
            if EXACT:
                nsu = ns
            else:
                nsu = ns_c
            a, b, ns_new = _gates(c, gamma, vv, nsu, ORTHOGONAL, NORMALIZE)
            tl.store(c_out + tk * M + o_m, c, mask=m_mask & live)
            if TRACK_NS:
                tl.store(ns_out + tk * M + o_m, nsu, mask=m_mask & live)
            if EXACT:
                g_row = tl.load(gram + tk * BCC + o_c, mask=live, other=0.0)  # v_t . v_{t0 + l}
                Y = a[None, :] * Y + b[None, :] * g_row[:, None]
                ns = ns_new
            W = a[None, :] * W + tl.where(sel, b[None, :], 0.0)
            A = A * a
        Vf = tl.load(v + tok[:, None] * D + o_d[None, :], mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        S = S * A[None, :] + tl.dot(tl.trans(Vf), W, input_precision=PREC)
        t0 += BCC
    if NORMALIZE:
        S = S / tl.maximum(tl.sqrt(tl.sum(S * S, 0)), 1e-12)[None, :]
    tl.store(s_final + i_bh.to(tl.int64) * D * M + s_off, S, mask=s_mask)


@triton.jit
def _chunk_read_kernel(
    x, k, v, beta, gram, c_in, ns_in, states, out,
    T, NC,
    HX: tl.constexpr, H: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    BCC: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    EXCLUSIVE: tl.constexpr, FROZEN: tl.constexpr,
    ORTHOGONAL: tl.constexpr, NORMALIZE: tl.constexpr, TRACK_NS: tl.constexpr, PREC: tl.constexpr,
):
    """``out_t = S_t x_t`` over one chunk (the outputs, x = q); with EXCLUSIVE ``S_{t-1} x_t`` (dv's gate term,
    x = dc); with FROZEN the chunk-start state for every token (dv's gate term for gates="chunk")."""
    i_v, i_c, i_bx = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_hx = i_bx // HX, i_bx % HX
    i_h = i_hx // (HX // H)
    o_k = tl.arange(0, BK)
    k_mask = o_k < M
    o_v = i_v * BV + tl.arange(0, BV)
    v_mask = o_v < D
    o_c = tl.arange(0, BCC)
    i_bh = i_b * H + i_h
    S = tl.load(states + (i_bh.to(tl.int64) * NC + i_c) * D * M + o_v[:, None] * M + o_k[None, :],
                mask=v_mask[:, None] & k_mask[None, :], other=0.0)
    tok0 = i_b.to(tl.int64) * T * H + i_h
    xtok0 = i_b.to(tl.int64) * T * HX + i_hx
    t0 = i_c * CS
    while t0 < tl.minimum(i_c * CS + CS, T):
        rows = t0 + o_c
        t_mask = rows < T
        tok = tok0 + rows.to(tl.int64) * H
        xtok = xtok0 + rows.to(tl.int64) * HX
        if FROZEN:
            X = tl.load(x + xtok[:, None] * M + o_k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
            o = tl.dot(X.to(tl.float32), tl.trans(S), input_precision=PREC)
        else:
            W = tl.zeros([BCC, BK], dtype=tl.float32)
            A = tl.full([BK], 1.0, dtype=tl.float32)
            XA = tl.zeros([BCC, BK], dtype=tl.float32)
            Mt = tl.zeros([BCC, BCC], dtype=tl.float32)
            for j in tl.range(0, BCC):
                t = t0 + j
                live = t < T
                sel = (o_c == j)[:, None]
                _, _, _, _, a, b, _ = _token_gates(c_in, ns_in, k, beta, gram, tok0 + t * H, j, o_k, k_mask, live,
                                                   M, BCC, ORTHOGONAL, NORMALIZE, TRACK_NS)
                xr = tl.load(x + (xtok0 + t * HX) * M + o_k, mask=k_mask & live, other=0.0).to(tl.float32)
                if EXCLUSIVE:
                    XA = tl.where(sel, (xr * A)[None, :], XA)
                    Mt = tl.where(sel, tl.sum(W * xr[None, :], 1)[None, :], Mt)
                W = a[None, :] * W + tl.where(sel, b[None, :], 0.0)
                A = A * a
                if not EXCLUSIVE:
                    XA = tl.where(sel, (xr * A)[None, :], XA)
                    Mt = tl.where(sel, tl.sum(W * xr[None, :], 1)[None, :], Mt)
            Vf = tl.load(v + tok[:, None] * D + o_v[None, :], mask=t_mask[:, None] & v_mask[None, :], other=0.0).to(tl.float32)
            o = tl.dot(XA, tl.trans(S), input_precision=PREC) + tl.dot(Mt, Vf, input_precision=PREC)
            S = S * A[None, :] + tl.dot(tl.trans(Vf), W, input_precision=PREC)
        tl.store(out + xtok[:, None] * D + o_v[None, :], o, mask=t_mask[:, None] & v_mask[None, :])
        t0 += BCC


@triton.jit
def _bwd_scan_kernel(
    q, do, k, v, beta, gram, hgram, c_in, ns_in, states, d_final, scratch,
    dc_out, dgamma_out, dvv_out, g_out, d_init,
    T, NC,
    HQ: tl.constexpr, H: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    BCC: tl.constexpr, CS: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    EXACT: tl.constexpr, ORTHOGONAL: tl.constexpr, NORMALIZE: tl.constexpr, TRACK_NS: tl.constexpr,
    HAS_DFINAL: tl.constexpr, PREC: tl.constexpr,
):
    """The reverse sweep: ``dc``, d gamma and d ||v||^2 per token, the state gradient at every chunk end."""
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
    if HAS_DFINAL:
        gE = tl.load(d_final + i_bh.to(tl.int64) * D * M + s_off, mask=s_mask, other=0.0)
    else:
        gE = tl.zeros([BD, BM], dtype=tl.float32)
    p_sc = scratch + (i_bh * tl.num_programs(0) + i_m).to(tl.int64) * (CS // BCC) * BD * BM \
        + o_d[:, None] * BM + tl.arange(0, BM)[None, :]
    tok0 = i_b.to(tl.int64) * T * H + i_h
    qtok0 = i_b.to(tl.int64) * T * HQ + i_h * G
    i_c = NC - 1
    while i_c >= 0:
        p_state = (i_bh.to(tl.int64) * NC + i_c) * D * M + s_off
        c_lo = i_c * CS
        n_sub = tl.cdiv(tl.minimum(CS, T - c_lo), BCC)
        # replay the chunk forward to get the state before each sub-chunk
        tl.debug_barrier()
        S = tl.load(states + p_state, mask=s_mask, other=0.0)
        r = 0
        while r < n_sub:
            tl.store(p_sc + r * BD * BM, S)
            rows = c_lo + r * BCC + o_c
            t_mask = rows < T
            tok = tok0 + rows.to(tl.int64) * H
            a, b = _tile_gates(c_in, ns_in, k, beta, gram, tok, o_c, t_mask, o_m, m_mask, M, BCC,
                               ORTHOGONAL, NORMALIZE, TRACK_NS)
            la, neg = _log_gates(a)
            L = tl.cumsum(la, 0)
            N = tl.cumsum(neg, 0)
            L_end = tl.sum(la, 0)
            N_end = tl.sum(neg, 0)
            W = b * _signed_exp(L_end[None, :] - L, N_end[None, :] - N)
            Vf = tl.load(v + tok[:, None] * D + o_d[None, :], mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
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
            rows = t0 + o_c
            t_mask = rows < T
            tok = tok0 + rows.to(tl.int64) * H
            vd_mask = t_mask[:, None] & d_mask[None, :]
            S_b = tl.load(p_sc + r * BD * BM)
            Vf = tl.load(v + tok[:, None] * D + o_d[None, :], mask=vd_mask, other=0.0).to(tl.float32)
            Ee = tl.dot(Vf, gE, input_precision=PREC)  # g . v_l
            rho = tl.sum(S_b * gE, 0)  # g . s_b
            if EXACT:
                P = tl.dot(Vf, S_b, input_precision=PREC)
            a_t, b_t = _tile_gates(c_in, ns_in, k, beta, gram, tok, o_c, t_mask, o_m, m_mask, M, BCC,
                                   ORTHOGONAL, NORMALIZE, TRACK_NS)
            la, neg = _log_gates(a_t)
            L = tl.cumsum(la, 0)
            N = tl.cumsum(neg, 0)
            L_end = tl.sum(la, 0)
            N_end = tl.sum(neg, 0)
            Om = _signed_exp(L, N)  # prod_{l' <= j} a: weight of the sources at j in the adjoint before the sub-chunk
            g_new = gE * _signed_exp(L_end, N_end)[None, :]
            Fq = tl.zeros([BCC, BM], dtype=tl.float32)
            last = t0 + BCC - 1
            for gq in range(G):
                qtok = qtok0 + gq + rows.to(tl.int64) * HQ
                Qg = tl.load(q + qtok[:, None] * M + o_m[None, :], mask=t_mask[:, None] & m_mask[None, :], other=0.0).to(tl.float32)
                DOg = tl.load(do + qtok[:, None] * D + o_d[None, :], mask=vd_mask, other=0.0).to(tl.float32)
                Fq += Qg * tl.dot(DOg, S_b, input_precision=PREC)
                g_new += tl.dot(tl.trans(DOg), Qg * Om, input_precision=PREC)
                # the read at the sub-chunk's last token: g_last = gE + sum_g q_last do_last
                qtl = qtok0 + gq + last.to(tl.int64) * HQ
                ql = tl.load(q + qtl * M + o_m, mask=m_mask & (last < T), other=0.0).to(tl.float32)
                hl = tl.load(hgram + qtl * BCC + o_c, mask=last < T, other=0.0)
                Ee += hl[:, None] * ql[None, :]
            U = Ee  # U[l] = g_t . v_l
            rho += _row(Fq, (o_c == BCC - 1)[:, None])
            Lcur = L_end
            Ncur = N_end
            DC = tl.zeros([BCC, BM], dtype=tl.float32)
            for jj in tl.range(0, BCC):
                j = BCC - 1 - jj
                t = t0 + j
                live = t < T
                tk = tok0 + t * H
                sel = (o_c == j)[:, None]
                c, gamma, vv, ns, a, b, _ = _token_gates(c_in, ns_in, k, beta, gram, tk, j, o_m, m_mask, live,
                                                         M, BCC, ORTHOGONAL, NORMALIZE, TRACK_NS)
                la_j, neg_j = _log_gates(a)
                Lprev = Lcur - la_j
                Nprev = Ncur - neg_j
                Wp = tl.where((o_c < j)[:, None], b_t * _signed_exp(Lprev[None, :] - L, Nprev[None, :] - N), 0.0)
                r1 = _row(U, sel)  # g_t . v_t = d b_t
                r2 = _signed_exp(Lprev, Nprev) * rho + tl.sum(Wp * U, 0)  # g_t . s_{t-1} = d a_t
                if EXACT:
                    dns_new = nu
                else:
                    dns_new = nu * 0.0
                dc, dgamma, dvv, dns = _gate_grads(c, gamma, vv, ns, a, b, r2, r1, dns_new, ORTHOGONAL, NORMALIZE)
                dc = tl.where(m_mask & live, dc, 0.0)
                tl.store(dc_out + tk * M + o_m, dc, mask=m_mask & live)
                tl.store(dgamma_out + tk * M + o_m, dgamma, mask=m_mask & live)
                tl.store(dvv_out + tk * M + o_m, dvv, mask=m_mask & live)
                DC = tl.where(sel, dc[None, :], DC)
                if TRACK_NS:
                    if EXACT:
                        nu = dns
                    else:
                        nu += dns
                if j > 0:
                    # g_{t-1} = a_t g_t + sum_g q_{t-1} do_{t-1} (+ dc_t v_t when the gates read s_{t-1})
                    U = a[None, :] * U
                    rho = a * rho + _row(Fq, (o_c == j - 1)[:, None])
                    for gq in range(G):
                        qtp = qtok0 + gq + (t - 1) * HQ
                        qp = tl.load(q + qtp * M + o_m, mask=m_mask & (t - 1 < T), other=0.0).to(tl.float32)
                        hp = tl.load(hgram + qtp * BCC + o_c, mask=t - 1 < T, other=0.0)
                        U += hp[:, None] * qp[None, :]
                    if EXACT:
                        g_row = tl.load(gram + tk * BCC + o_c, mask=live, other=0.0)
                        U += g_row[:, None] * dc[None, :]
                        rho += dc * _row(P, sel)
                Lcur = Lprev
                Ncur = Nprev
            Vf = tl.load(v + tok[:, None] * D + o_d[None, :], mask=vd_mask, other=0.0).to(tl.float32)
            if EXACT:
                g_new += tl.dot(tl.trans(Vf), DC * _signed_exp(L - la, N - neg), input_precision=PREC)
            else:
                pend += tl.dot(tl.trans(Vf), DC, input_precision=PREC)
            gE = g_new
            r -= 1
        if TRACK_NS:
            S_c = tl.load(states + p_state, mask=s_mask, other=0.0)
            gE += 2.0 * S_c * nu[None, :]
        if not EXACT:
            gE += pend
        i_c -= 1
    tl.store(d_init + i_bh.to(tl.int64) * D * M + s_off, gE, mask=s_mask)


@triton.jit
def _bwd_dq_kernel(
    do, k, v, beta, gram, hgram, c_in, ns_in, states, dq,
    T, NC,
    HQ: tl.constexpr, H: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    BCC: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
    ORTHOGONAL: tl.constexpr, NORMALIZE: tl.constexpr, TRACK_NS: tl.constexpr, PREC: tl.constexpr,
):
    """``dq_t = S_t^T do_t`` over one chunk, re-walking its sub-chunks from the stored chunk-start state."""
    i_k, i_c, i_bq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_hq = i_bq // HQ, i_bq % HQ
    i_h = i_hq // (HQ // H)
    o_k = i_k * BK + tl.arange(0, BK)
    k_mask = o_k < M
    o_d = tl.arange(0, BD)
    d_mask = o_d < D
    o_c = tl.arange(0, BCC)
    i_bh = i_b * H + i_h
    S = tl.load(states + (i_bh.to(tl.int64) * NC + i_c) * D * M + o_d[:, None] * M + o_k[None, :],
                mask=d_mask[:, None] & k_mask[None, :], other=0.0)
    tok0 = i_b.to(tl.int64) * T * H + i_h
    qtok0 = i_b.to(tl.int64) * T * HQ + i_hq
    t0 = i_c * CS
    while t0 < tl.minimum(i_c * CS + CS, T):
        rows = t0 + o_c
        t_mask = rows < T
        tok = tok0 + rows.to(tl.int64) * H
        qtok = qtok0 + rows.to(tl.int64) * HQ
        vd_mask = t_mask[:, None] & d_mask[None, :]
        DO = tl.load(do + qtok[:, None] * D + o_d[None, :], mask=vd_mask, other=0.0).to(tl.float32)
        F = tl.dot(DO, S, input_precision=PREC)
        W = tl.zeros([BCC, BK], dtype=tl.float32)
        A = tl.full([BK], 1.0, dtype=tl.float32)
        FA = tl.zeros([BCC, BK], dtype=tl.float32)
        DI = tl.zeros([BCC, BK], dtype=tl.float32)
        for j in tl.range(0, BCC):
            t = t0 + j
            live = t < T
            sel = (o_c == j)[:, None]
            _, _, _, _, a, b, _ = _token_gates(c_in, ns_in, k, beta, gram, tok0 + t * H, j, o_k, k_mask, live,
                                               M, BCC, ORTHOGONAL, NORMALIZE, TRACK_NS)
            W = a[None, :] * W + tl.where(sel, b[None, :], 0.0)
            A = A * a
            h_row = tl.load(hgram + (qtok0 + t * HQ) * BCC + o_c, mask=live, other=0.0)  # do_t . v_l
            DI = tl.where(sel, tl.sum(h_row[:, None] * W, 0)[None, :], DI)
            FA = tl.where(sel, A[None, :], FA)
        tl.store(dq + qtok[:, None] * M + o_k[None, :], F * FA + DI, mask=t_mask[:, None] & k_mask[None, :])
        Vf = tl.load(v + tok[:, None] * D + o_d[None, :], mask=vd_mask, other=0.0).to(tl.float32)
        S = S * A[None, :] + tl.dot(tl.trans(Vf), W, input_precision=PREC)
        t0 += BCC


@triton.jit
def _bwd_dv_kernel(
    q, do, k, v, beta, gram, c_in, ns_in, dc_in, dvv_in, g_in, dv,
    T, NC,
    HQ: tl.constexpr, H: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    BCC: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    EXACT: tl.constexpr, ORTHOGONAL: tl.constexpr, NORMALIZE: tl.constexpr, TRACK_NS: tl.constexpr,
    PREC: tl.constexpr,
):
    """Adds ``g_t b_t + 2 v_t sum_i dvv`` to dv: the write's share, walking the chunk backwards from the stored
    gradient of its end state."""
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    G: tl.constexpr = HQ // H
    o_k = tl.arange(0, BK)
    k_mask = o_k < M
    o_v = i_v * BV + tl.arange(0, BV)
    v_mask = o_v < D
    o_c = tl.arange(0, BCC)
    g = tl.load(g_in + (i_bh.to(tl.int64) * NC + i_c) * D * M + o_v[:, None] * M + o_k[None, :],
                mask=v_mask[:, None] & k_mask[None, :], other=0.0)
    tok0 = i_b.to(tl.int64) * T * H + i_h
    qtok0 = i_b.to(tl.int64) * T * HQ + i_h * G
    c_lo = i_c * CS
    n_sub = tl.cdiv(tl.minimum(CS, T - c_lo), BCC)
    r = n_sub - 1
    while r >= 0:
        t0 = c_lo + r * BCC
        rows = t0 + o_c
        t_mask = rows < T
        tok = tok0 + rows.to(tl.int64) * H
        vt_mask = t_mask[:, None] & v_mask[None, :]
        Zc = tl.zeros([BCC, BK], dtype=tl.float32)  # adjoint's weight on v_j (via dc_j)
        R = tl.full([BK], 1.0, dtype=tl.float32)  # adjoint's weight on g (end of the sub-chunk)
        BR = tl.zeros([BCC, BK], dtype=tl.float32)
        Mz = tl.zeros([BCC, BCC], dtype=tl.float32)
        for jj in tl.range(0, BCC):
            j = BCC - 1 - jj
            t = t0 + j
            live = t < T
            tk = tok0 + t * H
            sel = (o_c == j)[:, None]
            _, _, _, _, a, b, _ = _token_gates(c_in, ns_in, k, beta, gram, tk, j, o_k, k_mask, live,
                                               M, BCC, ORTHOGONAL, NORMALIZE, TRACK_NS)
            BR = tl.where(sel, (b * R)[None, :], BR)
            R = R * a
            if EXACT:
                Mz = tl.where(sel, tl.sum(Zc * b[None, :], 1)[None, :], Mz)
                dc = tl.load(dc_in + tk * M + o_k, mask=k_mask & live, other=0.0)
                Zc = tl.where(sel, dc[None, :], Zc * a[None, :])
        Vf = tl.load(v + tok[:, None] * D + o_v[None, :], mask=vt_mask, other=0.0).to(tl.float32)
        dvv = tl.sum(tl.load(dvv_in + tok[:, None] * M + o_k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0), 1)
        acc = tl.dot(BR, tl.trans(g), input_precision=PREC) + 2.0 * Vf * dvv[:, None]
        g = g * R[None, :]
        if EXACT:
            acc += tl.dot(Mz, Vf, input_precision=PREC)
            g += tl.dot(tl.trans(Vf), Zc, input_precision=PREC)
        for gq in range(G):
            qtok = qtok0 + gq + rows.to(tl.int64) * HQ
            Qg = tl.load(q + qtok[:, None] * M + o_k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            DOg = tl.load(do + qtok[:, None] * D + o_v[None, :], mask=vt_mask, other=0.0).to(tl.float32)
            Mb = tl.zeros([BCC, BCC], dtype=tl.float32)
            Oq = tl.zeros([BCC, BK], dtype=tl.float32)
            for jj in tl.range(0, BCC):
                j = BCC - 1 - jj
                t = t0 + j
                sel = (o_c == j)[:, None]
                _, _, _, _, a, b, _ = _token_gates(c_in, ns_in, k, beta, gram, tok0 + t * H, j, o_k, k_mask, t < T,
                                                   M, BCC, ORTHOGONAL, NORMALIZE, TRACK_NS)
                Oq = tl.where(sel, Qg, Oq)
                Mb = tl.where(sel, tl.sum(Oq * b[None, :], 1)[None, :], Mb)
                Oq = Oq * a[None, :]
            acc += tl.dot(Mb, DOg, input_precision=PREC)
            g += tl.dot(tl.trans(DOg), Oq, input_precision=PREC)
        p_dv = dv + tok[:, None] * D + o_v[None, :]
        tl.store(p_dv, tl.load(p_dv, mask=vt_mask, other=0.0) + acc, mask=vt_mask)
        r -= 1


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _sub_gram(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(B, T, Hx, BC)`` float32: each token's dot products with the values of its sub-chunk."""
    B, T, HX, D = x.shape
    out = torch.empty(B, T, HX, BC, device=x.device, dtype=torch.float32)
    _sub_gram_kernel[(triton.cdiv(T, BC), B * HX)](
        x, v, out, T, HX, v.shape[2], D, BC, _pow2(D), "ieee" if x.dtype == torch.float32 else "tf32", num_warps=4
    )
    return out


class _Setup:
    """Shapes and compile-time switches shared by the forward and the backward."""

    def __init__(self, q, v, *, chunk_size: int, exact: bool, orthogonal: bool, normalize: bool):
        self.B, self.T, self.HQ, self.M = q.shape
        self.H, self.D = v.shape[2], v.shape[3]
        self.CS = CS_EXACT if exact else chunk_size
        self.NC = triton.cdiv(self.T, self.CS)
        self.BD, self.BK = _pow2(self.D), _pow2(self.M)
        self.BM = min(BM_SCAN, self.BK)
        self.flags = dict(ORTHOGONAL=orthogonal, NORMALIZE=normalize, TRACK_NS=orthogonal and not normalize)
        self.exact = exact
        self.prec = "ieee" if q.dtype == torch.float32 else "tf32"

    def new(self, *shape, dtype=torch.float32, like):
        return torch.empty(*shape, device=like.device, dtype=dtype)


def lattice_fwd(q, k, v, beta, state, setup: _Setup):
    """Forward: ``(o, final_state, saved)`` where ``saved`` holds what the backward re-reads."""
    s = setup
    gram = _sub_gram(v, v)
    c = s.new(s.B, s.T, s.H, s.M, like=q)
    ns = s.new(s.B, s.T, s.H, s.M, like=q) if s.flags["TRACK_NS"] else c
    states = s.new(s.B, s.H, s.NC, s.D, s.M, like=q)
    final = s.new(s.B, s.H, s.D, s.M, like=q)
    n_mb = triton.cdiv(s.M, s.BM)
    scratch = s.new(s.B * s.H * n_mb * s.BD * s.BM, like=q) if not s.exact else c
    _fwd_scan_kernel[(n_mb, s.B * s.H)](
        k, v, beta, state, gram, c, ns, states, final, scratch, s.T, s.NC,
        s.H, s.M, s.D, BC, s.CS, s.BM, s.BD, s.exact, PREC=s.prec, **s.flags, num_warps=SCAN_WARPS,
    )
    o = torch.empty(s.B, s.T, s.HQ, s.D, device=q.device, dtype=q.dtype)
    _chunk_read_kernel[(triton.cdiv(s.D, BV_READ), s.NC, s.B * s.HQ)](
        q, k, v, beta, gram, c, ns, states, o, s.T, s.NC,
        s.HQ, s.H, s.M, s.D, BC, s.CS, s.BK, BV_READ, False, False, PREC=s.prec, **s.flags, num_warps=4,
    )
    return o, final, (gram, c, ns, states)


def lattice_bwd(do, d_final, q, k, v, beta, saved, setup: _Setup):
    """Backward: ``(dq, dk, dv, dbeta, d_state)`` for the inputs of :func:`lattice_fwd`."""
    s = setup
    gram, c, ns, states = saved
    hgram = _sub_gram(do, v)
    dc = s.new(s.B, s.T, s.H, s.M, like=q)
    dgamma = torch.empty_like(dc)
    dvv = torch.empty_like(dc)
    g_end = torch.empty_like(states)
    d_init = s.new(s.B, s.H, s.D, s.M, like=q)
    n_mb = triton.cdiv(s.M, s.BM)
    scratch = s.new(s.B * s.H * n_mb * (s.CS // BC) * s.BD * s.BM, like=q)
    _bwd_scan_kernel[(n_mb, s.B * s.H)](
        q, do, k, v, beta, gram, hgram, c, ns, states, d_final if d_final is not None else dc, scratch,
        dc, dgamma, dvv, g_end, d_init, s.T, s.NC,
        s.HQ, s.H, s.M, s.D, BC, s.CS, s.BM, s.BD, s.exact, HAS_DFINAL=d_final is not None, PREC=s.prec,
        **s.flags, num_warps=SCAN_WARPS,
    )
    dq = torch.empty_like(q)
    bk = min(BK_DQ, s.BK)
    _bwd_dq_kernel[(triton.cdiv(s.M, bk), s.NC, s.B * s.HQ)](
        do, k, v, beta, gram, hgram, c, ns, states, dq, s.T, s.NC,
        s.HQ, s.H, s.M, s.D, BC, s.CS, bk, s.BD, PREC=s.prec, **s.flags, num_warps=4,
    )
    dv = s.new(s.B, s.T, s.H, s.D, like=q)
    grid = (triton.cdiv(s.D, BV_READ), s.NC, s.B * s.H)
    _chunk_read_kernel[grid](
        dc, k, v, beta, gram, c, ns, states, dv, s.T, s.NC,
        s.H, s.H, s.M, s.D, BC, s.CS, s.BK, BV_READ, True, not s.exact, PREC=s.prec, **s.flags, num_warps=4,
    )
    _bwd_dv_kernel[grid](
        q, do, k, v, beta, gram, c, ns, dc, dvv, g_end, dv, s.T, s.NC,
        s.HQ, s.H, s.M, s.D, BC, s.CS, s.BK, BV_READ, s.exact, PREC=s.prec, **s.flags, num_warps=4,
    )
    dk = (dgamma * beta.unsqueeze(-1)).to(k.dtype)
    dbeta = (dgamma * k).sum(-1).to(beta.dtype)
    return dq, dk, dv.to(v.dtype), dbeta, d_init


class LatticeChunkFunction(torch.autograd.Function):
    """Autograd wrapper of the chunkwise kernels; inputs contiguous, ``state`` float32 ``(B, Hkv, d, m)``."""

    @staticmethod
    def forward(ctx, q, k, v, beta, state, chunk_size, exact, orthogonal, normalize):
        setup = _Setup(q, v, chunk_size=chunk_size, exact=exact, orthogonal=orthogonal, normalize=normalize)
        o, final, saved = lattice_fwd(q, k, v, beta, state, setup)
        ctx.setup = setup
        ctx.save_for_backward(q, k, v, beta, *saved)
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, beta, *saved = ctx.saved_tensors
        dq, dk, dv, dbeta, d_state = lattice_bwd(
            do.contiguous(), None if d_final is None else d_final.contiguous(), q, k, v, beta, saved, ctx.setup
        )
        return dq, dk, dv, dbeta, d_state, None, None, None, None


def chunk_lattice_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    *,
    chunk_size: int = 64,
    gates: str = "exact",
    orthogonal: bool = True,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``chunk.chunk_lattice`` with a float32 ``state``: ``(o in q.dtype, final_state float32)``.

    With ``gates="exact"`` the result does not depend on ``chunk_size`` (the kernels pick their own blocking);
    with ``gates="chunk"`` it is the frozen-gate span and must be a multiple of 16.
    """
    exact = gates == "exact"
    if not exact and chunk_size % BC:
        raise ValueError(f"the Triton backend needs chunk_size to be a multiple of {BC} for gates='chunk'")
    return LatticeChunkFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous(), state.contiguous().float(),
        chunk_size, exact, orthogonal, normalize,
    )
