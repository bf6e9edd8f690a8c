"""Triton kernels for Lattice over sequences (docs/math.md §4): exact chunkwise forward and backward.

Layout of the work (timings and the reasoning behind it in docs/design.md):

- Slots are independent, so the only sequential part, the gate scan, runs one program per
  (batch, kv head, block of BM slots). It walks the sequence in sub-chunks of BC tokens: ``P = V S`` (a matmul),
  a sweep over the BC tokens (``c_t = s_{t-1} . v_t`` from P and the sub-chunk Gram matrix), then
  ``S <- S diag(A) + V^T W`` (a matmul). It stores ``c`` per token (and ``||s||^2`` where the gates read it) and
  the state at every chunk start.
- The sweeps are fully unrolled and run on per-thread scalars: every ``[BC, BM]`` tile a matmul produces or a
  load brings is unpacked once (:func:`_unpack_rows`) into one ``[BM]`` vector per token, one slot per lane, so
  the dependent chain never crosses lanes; the sub-chunk's Gram rows are uniform vector loads. Results go
  back to tiles by register selects (:func:`_pack_rows`). Keeping the layout compiler from re-deriving these
  vectors in the matmuls' layouts (which would repeat the whole sweep per layout) is why tiles only enter the
  sweep through :func:`_unpack_rows` and scalars leave it through :func:`_opaque`.
- Given those, every d-sized product is parallel over chunks: the outputs, dq and dv re-walk a chunk's
  sub-chunks from its stored start state with the gates recomputed from ``c`` (never stored per step).
  Inside a sub-chunk these passes have no per-token loop: the gates are per-thread rows (:func:`_sub_gates`), and
  the 16 x 16 decay-weighted matrix ``M[t, j] = sum_i x_t[i] b_j[i] prod_{j<l<=t} a_l[i]`` is a sum of five small
  matmuls (:func:`_intra`): the diagonal and the four levels of a binary split of the sub-chunk, each level's
  decay factored at the boundary between its halves into two plain products of gates (exact for any gates:
  nothing is divided, no logarithm). Packed tiles leave the per-thread rows through :func:`_opaque`.
- Backward: one sequential reverse sweep per slot block gives ``dc`` (the gradient through the gates' state
  dependence), d gamma and d ||v||^2 per token, and the state gradient at every chunk end. Per sub-chunk each
  thread keeps ``g . v_l`` (16 scalars) and ``g . s_b`` for its slot; ``g_t . s_{t-1}`` is a Horner sum over
  the forward gates (products only: no logarithms, no division on the sweep). The Gram and ``do . v`` rows it
  needs come as 4-, 8- or 16-wide vector loads split in-thread (:func:`_uniform_row`), not one load per entry.
- The sweeps are latency-bound at small batch: whatever the next sub-chunk reads is prefetched into L1 while the
  current one runs (:func:`_prefetch`; the forward sweep also carries its next V, k and beta tiles in registers).
- The sweeps walk whole sub-chunks: a ragged ``T`` is padded with identity tokens (``beta = 0``) by the wrapper.

Gate arithmetic and states are float32 whatever the input dtype; matmuls with a float32 operand use tf32 for
16-bit inputs and full float32 ("ieee") for float32 inputs.
"""

import os

import torch
import triton
import triton.language as tl

BC = 16  # tokens per sub-chunk of the sweeps (tl.dot needs >= 16)
CS_EXACT = 64  # tokens between stored states for gates="exact" (a free choice: the math does not depend on it)
BV_READ = 128  # value columns per program of the read pass (64 when m > 64): the gates are computed per program
BV_DV = 128  # value columns per program of the dv pass (64 when m > 64): the gates and M_q are computed per program
PAR_WARPS = 4  # warps per program of the parallel passes (read, dq, dv; 8 measured slower, docs/design.md, version 6b)
BK_DQ = 64  # slots per program of the dq pass
# The sequential sweeps (docs/design.md, versions 6 and 8). 16-bit inputs: one warp per program (layout changes then
# need no barrier between warps); the reverse sweep on BM_SCAN_SPLIT slots per program (fewer live registers at one
# warp, twice the programs at small batch); the forward sweep too while BM_SCAN-slot programs would leave SMs idle
# (at most FWD_SPLIT_PER_SM per SM), else on BM_SCAN (split, it repeats its loads and loses at B=16).
# float32 inputs: BM_SCAN slots on SCAN_WARPS warps (their full-precision matmuls spill ~1 KB at one warp).
BM_SCAN = 16
BM_SCAN_SPLIT = 8
FWD_SPLIT_PER_SM = 2
FWD_SCAN_WARPS = 1
BWD_SCAN_WARPS = 1
SCAN_WARPS = 2
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")  # no inline PTX (prefetch hints) there


@triton.jit
def _gates(c, gamma, vv, ns, ORTHOGONAL: tl.constexpr, NORMALIZE: tl.constexpr):
    """``s <- a s + b v`` and the new ``||s||^2``: the jit twin of ``kernels/gates.py:slot_gates``."""
    if NORMALIZE:
        if ORTHOGONAL:
            rn = tl.math.rsqrt(1.0 + gamma * gamma * tl.maximum(vv - c * c, 0.0))
            a = (1.0 - gamma * c) * rn
        else:
            rn = tl.math.rsqrt(1.0 + 2.0 * gamma * c + gamma * gamma * vv)
            a = rn
        b = gamma * rn
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
            rn = tl.math.rsqrt(1.0 + gamma * gamma * w)
            dn = -(da * a + db * b) * rn
            dc = -(da * gamma + dn * gamma * gamma * c) * rn
            dgamma = (db - da * c + dn * gamma * w) * rn
        else:
            rn = tl.math.rsqrt(1.0 + 2.0 * gamma * c + gamma * gamma * vv)
            dn = -(da * a + db * b) * rn
            dc = dn * gamma * rn
            dgamma = (db + dn * (c + gamma * vv)) * rn
        dvv = 0.5 * dn * gamma * gamma * rn
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
def _split_all(t):
    """Split the last (size-2) dimension of every tensor of a tuple: a tuple twice as long."""
    out = ()
    for i in tl.static_range(len(t)):
        lo, hi = tl.split(t[i])
        out = out + (lo, hi)
    return out


@triton.constexpr_function
def _bits_reversed(j, bits):
    """Where :func:`_split_bits`'s splits leave slice ``j``: its ``bits`` bits in reverse order."""
    return int(format(j, f"0{bits}b")[::-1], 2)


@triton.jit
def _split_bits(x, BITS: tl.constexpr):
    """The ``2**BITS`` slices of ``x`` along its last ``BITS`` dimensions (each of size 2) as a tuple in index order
    (the first of those dimensions is the high bit): register splits only, no data crosses lanes."""
    t = (x,)
    for i in tl.static_range(BITS):
        t = _split_all(t)
    out = ()
    for j in tl.static_range(1 << BITS):
        out = out + (t[_bits_reversed(j, BITS)],)
    return out


@triton.jit
def _unpack_rows(X):
    """The 16 rows of a ``[16, BM]`` tile as a tuple of ``[BM]`` vectors, each thread keeping its slots' values:
    one layout change per tile, after which picking a token's row costs nothing."""
    BM: tl.constexpr = X.shape[1]
    return _split_bits(tl.reshape(tl.trans(X), [BM, 2, 2, 2, 2]), 4)


@triton.jit
def _scalars(x):
    """A 16-element tensor (a value per token, the same for every slot: ``beta``, a Gram row) as a tuple of 16 scalars
    that every thread holds: one small layout change, then nothing crosses lanes."""
    return _split_bits(tl.reshape(x, [2, 2, 2, 2]), 4)


@triton.jit
def _uniform_row(p, N: tl.constexpr):
    """``N`` (4, 8 or 16) contiguous float32 values as a tuple of ``N`` scalars, every thread holding all of them (for
    the Gram rows of a sweep, the same for every slot): ``N / 4`` vector loads per thread, nothing crosses lanes.
    A load of fewer elements than threads may take any layout, so it takes the one the splits need."""
    x = tl.load(p + tl.arange(0, N))
    if N == 16:
        out = _scalars(x)
    elif N == 8:
        out = _split_bits(tl.reshape(x, [2, 2, 2]), 3)
    else:
        out = _split_bits(tl.reshape(x, [2, 2]), 2)
    return out


@triton.jit
def _row_prefix(p, j: tl.constexpr):
    """Entries ``l < j`` (and a few more) of a Gram row starting at ``p``: :func:`_uniform_row` of 4, 8 or 16."""
    if j <= 4:
        out = _uniform_row(p, 4)
    elif j <= 8:
        out = _uniform_row(p, 8)
    else:
        out = _uniform_row(p, 16)
    return out


@triton.jit
def _row_suffix(p, j: tl.constexpr):
    """Entries ``u >= j`` of a 16-float Gram row at ``p`` as a 16-tuple of uniform scalars, loaded from the aligned
    group of 4 that holds ``j`` on (the entries before that group are zeros and never read)."""
    if j < 4:
        out = _uniform_row(p, 16)
    elif j < 8:
        out = (0.0, 0.0, 0.0, 0.0) + _uniform_row(p + 4, 4) + _uniform_row(p + 8, 8)
    elif j < 12:
        out = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0) + _uniform_row(p + 8, 8)
    else:
        out = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0) + _uniform_row(p + 12, 4)
    return out


@triton.jit
def _prefetch(p, ROW: tl.constexpr):
    """Ask for the rows of ``ROW`` elements starting at the ``[16]`` pointers ``p`` to be brought into L1: a hint that
    nothing waits for, issued a sub-chunk ahead so that the loads at the point of use hit. No-op under the
    interpreter (no inline PTX there)."""
    if not _INTERPRET:
        EPL: tl.constexpr = 1024 // p.dtype.element_ty.primitive_bitwidth  # elements per 128-byte line
        if ROW <= EPL:
            lines = p[:, None] + tl.arange(0, 1)[None, :]
        elif ROW <= 2 * EPL:
            lines = p[:, None] + tl.minimum(tl.arange(0, 2) * EPL, ROW - 1)[None, :]
        elif ROW <= 4 * EPL:
            lines = p[:, None] + tl.minimum(tl.arange(0, 4) * EPL, ROW - 1)[None, :]
        else:
            lines = p[:, None] + tl.minimum(tl.arange(0, 8) * EPL, ROW - 1)[None, :]
        tl.inline_asm_elementwise("prefetch.global.L1 [$1];\n\tmov.u32 $0, 0;", "=r,l", [lines], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _prefetch_sub(q, do, k, v, beta, gram, hgram, c_in, row, qrow, o_c, i_m, HQ: tl.constexpr, H: tl.constexpr,
                  M: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BCC: tl.constexpr):
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
def _pack_rows(rows):
    """Inverse of :func:`_unpack_rows`: a ``[16, BM]`` tile from 16 ``[BM]`` vectors (register selects in the
    default tile layout, whose columns sit on lanes like the vectors: no data crosses lanes)."""
    o = tl.arange(0, 16)[:, None]
    X = tl.where(o == 0, rows[0][None, :], 0.0)
    for j in tl.static_range(1, 16):
        X = tl.where(o == j, rows[j][None, :], X)
    return X


@triton.jit
def _col_dots(X, Y):
    """``sum_d X[d, i] Y[d, i]`` for every column ``i`` of two ``[BD, BM]`` tiles, in float32, as a per-thread
    ``[BM]`` vector: sixteen partial sums per column cross to the sweep's layout through :func:`_unpack_rows`."""
    BD: tl.constexpr = X.shape[0]
    BM: tl.constexpr = X.shape[1]
    rows = _unpack_rows(tl.sum(tl.reshape(X * Y, [BD // 16, 16, BM]), 0))
    out = rows[0]
    for i in tl.static_range(1, 16):
        out += rows[i]
    return out


@triton.jit
def _opaque(x):
    """``x`` unchanged, behind a loop the layout pass cannot see through: it moves ``x`` to the layout its user needs
    (one small shared-memory exchange) instead of recomputing everything ``x`` depends on in that layout."""
    i = 0
    while i < 1:
        x = x + 0.0
        i += 1
    return x


@triton.jit(do_not_specialize=["NC"])  # one build for every chunk count
def _fwd_scan_kernel(
    k, v, beta, s_init, gram, c_out, ns_out, states, s_final, scratch,
    T, NC,
    H: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    BCC: tl.constexpr, CS: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    EXACT: tl.constexpr, ORTHOGONAL: tl.constexpr, NORMALIZE: tl.constexpr, TRACK_NS: tl.constexpr,
    PREC: tl.constexpr,
):
    """The sequential gate scan: stores ``c`` (and ``||s||^2``) per token and the state at every chunk start.

    Per sub-chunk: ``P = V S`` (a matmul) unpacked into one ``[BM]`` vector per token, then a fully unrolled
    16-token sweep in which every thread updates only its own slots' scalars (nothing crosses lanes on the
    dependent chain; each token's Gram row is a few uniform vector loads), then ``S <- S diag(A) + V^T W``
    (a matmul). ``T`` is a multiple of ``BCC`` (the wrapper pads with identity tokens).

    At small batch the sweep is latency-bound. For 16-bit inputs it runs at one warp (FWD_SCAN_WARPS): the
    layout changes then need no barrier between warps (9 instead of 25 per sub-chunk): 1.7x faster than v5 (two
    warps) at B=1 and 2.4x at B=16 (docs/design.md, version 6); on 8-slot blocks where 16-slot ones leave SMs idle
    (version 8: 7.3 -> 5.0 ms at B=1, T=32768). The V, k and beta tiles of sub-chunk i+1 are loaded during
    sub-chunk i and its Gram rows prefetched into L1: at two warps that gained nothing (the loads were not the
    cost), and the one-warp timing was taken with it."""
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
    p_sc = scratch + (i_bh * tl.num_programs(0) + i_m).to(tl.int64) * BD * BM + o_d[:, None] * BM + tl.arange(0, BM)[None, :]
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


@triton.jit
def _ones(x):
    return x * 0.0 + 1.0


@triton.jit
def _seg_prefix(As, h: tl.constexpr, EXCL: tl.constexpr):
    """Row ``t`` of 16 per-thread gate rows: the product of ``a_l`` over ``l`` from the start of ``t``'s aligned
    ``h``-token segment to ``t`` (EXCL: to ``t - 1``; an empty product is 1). Plain products, no division."""
    out = ()
    p = As[0]
    for t in tl.static_range(16):
        if t % h == 0:
            if EXCL:
                p = _ones(As[t])
            else:
                p = As[t]
        else:
            if EXCL:
                p = p * As[t - 1]
            else:
                p = p * As[t]
        out = out + (p,)
    return out


@triton.jit
def _seg_suffix(As, h: tl.constexpr):
    """Row ``j``: the product of ``a_l`` over ``j < l <= `` the end of ``j``'s aligned ``h``-token segment."""
    out = ()
    s = As[0]
    for j in tl.static_range(15, -1, -1):
        if j % h == h - 1:
            s = _ones(As[j])
        else:
            s = s * As[j + 1]
        out = (s,) + out
    return out


@triton.jit
def _mul_rows(Xs, Ys):
    """Row-wise products of two tuples of 16 per-thread rows."""
    out = ()
    for t in tl.static_range(16):
        out = out + (Xs[t] * Ys[t],)
    return out


@triton.jit
def _pack_sel(rows, h: tl.constexpr, PAR: tl.constexpr):
    """A ``[16, BK]`` tile from per-thread rows, keeping the rows ``t`` with ``(t // h) % 2 == PAR`` (all rows for
    ``PAR == 2``) and zeros elsewhere (register selects, as :func:`_pack_rows`)."""
    o = tl.arange(0, 16)[:, None]
    X = tl.where(o < 0, rows[0][None, :], 0.0)
    for j in tl.static_range(16):
        if PAR == 2:
            X = tl.where(o == j, rows[j][None, :], X)
        elif (j // h) % 2 == PAR:
            X = tl.where(o == j, rows[j][None, :], X)
    return _opaque(X)


@triton.jit
def _pack_all(rows):
    """:func:`_pack_rows` behind :func:`_opaque`: the layout pass can neither re-derive the per-thread rows in the
    layout of the tile's user (a matmul result, an operand) nor move the selects there."""
    return _pack_sel(rows, 1, 2)


@triton.jit
def _level(Xs, As, Bs, h: tl.constexpr, EXCL: tl.constexpr, TRANS: tl.constexpr, PREC: tl.constexpr):
    """The pairs ``(t, j)`` of one level of the binary split of a 16-token sub-chunk: ``t`` in the upper and ``j``
    in the lower half of the same aligned ``2h`` block. Their decay splits at the boundary ``r`` between the
    halves into two plain products, ``prod_{j<l<=r} a_l`` (on ``b_j``) and ``prod_{r<l<=t} a_l`` (on ``x_t``), so
    the level is one ``[16, BK] x [BK, 16]`` matmul, exact for any gates (nothing is divided)."""
    Xh = _pack_sel(_mul_rows(Xs, _seg_prefix(As, h, EXCL)), h, 1)
    Yh = _pack_sel(_mul_rows(Bs, _seg_suffix(As, h)), h, 0)
    if TRANS:
        Mh = tl.dot(Yh, tl.trans(Xh), input_precision=PREC)
    else:
        Mh = tl.dot(Xh, tl.trans(Yh), input_precision=PREC)
    r = tl.arange(0, 16)[:, None]
    c = tl.arange(0, 16)[None, :]
    return tl.where(r // (2 * h) == c // (2 * h), Mh, 0.0)


@triton.jit
def _intra(X, Xs, As, Bs, EXCL: tl.constexpr, TRANS: tl.constexpr, PREC: tl.constexpr):
    """``M[t, j] = sum_i x_t[i] b_j[i] prod_{j<l<=t} a_l[i]`` for ``j <= t`` within a sub-chunk (EXCL:
    ``prod_{j<l<t}``, ``j < t``); TRANS gives ``M^T``. ``X``: the ``[16, BK]`` tile of ``Xs``; ``Xs, As, Bs``:
    per-thread rows. Five (EXCL: four) small matmuls: the diagonal and the four levels of the binary split."""
    r = tl.arange(0, 16)[:, None]
    c = tl.arange(0, 16)[None, :]
    M = _level(Xs, As, Bs, 1, EXCL, TRANS, PREC)
    M += _level(Xs, As, Bs, 2, EXCL, TRANS, PREC)
    M += _level(Xs, As, Bs, 4, EXCL, TRANS, PREC)
    M += _level(Xs, As, Bs, 8, EXCL, TRANS, PREC)
    if not EXCL:
        B = _pack_all(Bs)
        if TRANS:
            Md = tl.dot(B, tl.trans(X), input_precision=PREC)
        else:
            Md = tl.dot(X, tl.trans(B), input_precision=PREC)
        M += tl.where(r == c, Md, 0.0)
    return M


@triton.jit
def _opaque_rows(rows):
    """A tuple of per-thread rows behind one loop, as :func:`_opaque`: the layout pass otherwise re-derives the rows
    (for gates: loads, unpack and the whole gate chain) in a second, equivalent layout for the selects of
    :func:`_pack_sel`; behind the loop it converts them, which costs nothing between equivalent layouts."""
    i = 0
    while i < 1:
        out = ()
        for j in tl.static_range(len(rows)):
            out = out + (rows[j] + 0.0,)
        rows = out
        i += 1
    return rows


@triton.jit
def _sub_gates(c_in, ns_in, k, beta, gram, row0, o_c, o_k, k_mask, H: tl.constexpr, M: tl.constexpr,
               BCC: tl.constexpr, ORTHOGONAL: tl.constexpr, NORMALIZE: tl.constexpr, TRACK_NS: tl.constexpr):
    """Gates ``a, b`` of a 16-token sub-chunk (token ``j`` at row ``row0 + j * H`` of the kv-head tensors) as
    per-thread rows: the ``c`` and ``k`` tiles are unpacked once (:func:`_unpack_rows`), ``beta`` and ``||v||^2``
    are uniform scalar loads, and every gate is computed in that one layout (tile gates would be recomputed in
    each layout their users need)."""
    tile = (row0 + o_c * H)[:, None] * M + o_k[None, :]
    mask = (o_c < BCC)[:, None] & k_mask[None, :]
    Cs = _unpack_rows(tl.load(c_in + tile, mask=mask, other=0.0))
    Ks = _unpack_rows(tl.load(k + tile, mask=mask, other=0.0).to(tl.float32))
    if TRACK_NS:
        Ns = _unpack_rows(tl.load(ns_in + tile, mask=mask, other=1.0))
    As = ()
    Bs = ()
    for j in tl.static_range(16):
        if TRACK_NS:
            ns = Ns[j]
        else:
            ns = _ones(Cs[j])
        gamma = tl.load(beta + row0 + j * H).to(tl.float32) * Ks[j]
        a, b, _ = _gates(Cs[j], gamma, tl.load(gram + (row0 + j * H) * BCC + j), ns, ORTHOGONAL, NORMALIZE)
        As = As + (a,)
        Bs = Bs + (b,)
    rows = _opaque_rows(As + Bs)
    As = ()
    Bs = ()
    for j in tl.static_range(16):
        As = As + (rows[j],)
        Bs = Bs + (rows[16 + j],)
    return As, Bs


@triton.jit(do_not_specialize=["NC"])  # one build for every chunk count
def _chunk_read_kernel(
    x, k, v, beta, gram, c_in, ns_in, states, out,
    T, NC,
    HX: tl.constexpr, H: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    BCC: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    EXCLUSIVE: tl.constexpr, FROZEN: tl.constexpr,
    ORTHOGONAL: tl.constexpr, NORMALIZE: tl.constexpr, TRACK_NS: tl.constexpr, PREC: tl.constexpr,
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
    S = tl.load(states + (i_bh.to(tl.int64) * NC + i_c) * D * M + o_v[:, None] * M + o_k[None, :],
                mask=v_mask[:, None] & k_mask[None, :], other=0.0)
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
            As, Bs = _sub_gates(c_in, ns_in, k, beta, gram, tok0 + t0 * H, o_c, o_k, k_mask, H, M, BCC,
                                ORTHOGONAL, NORMALIZE, TRACK_NS)
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


@triton.jit(do_not_specialize=["NC"])  # one build for every chunk count
def _bwd_scan_kernel(
    q, do, k, v, beta, gram, hgram, c_in, ns_in, states, d_final, scratch,
    dc_out, dgamma_out, dvv_out, g_out, d_init,
    T, NC,
    HQ: tl.constexpr, H: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    BCC: tl.constexpr, CS: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    EXACT: tl.constexpr, ORTHOGONAL: tl.constexpr, NORMALIZE: tl.constexpr, TRACK_NS: tl.constexpr,
    HAS_DFINAL: tl.constexpr, PREC: tl.constexpr,
):
    """The reverse sweep: ``dc``, d gamma and d ||v||^2 per token, the state gradient at every chunk end.

    Per sub-chunk (walking backwards) every thread keeps, for its own slots, ``U[l] = g . v_l`` and
    ``rho = g . s_b`` (``g`` the state gradient, ``s_b`` the slot at the sub-chunk start) as scalars; then
    ``g_t . v_t = U[t]`` and ``g_t . s_{t-1} = A_{t-1} rho + sum_{l<t} W_{t-1}[l] U[l]`` (a Horner sum over the
    forward gates, plain products: no logarithms on the sweep). The d-sized products (``V g``, ``V s_b``,
    ``dO s_b``, the new ``g``) are matmuls once per sub-chunk. ``T`` is a multiple of ``BCC``.

    Version 5 (docs/design.md): at step ``j`` the rows ``v_j . v_l`` and ``do_{j-1} . v_l`` (``l < j``) are
    :func:`_row_prefix` vector loads (v4: one scalar load per entry, 311 per sub-chunk); ``gamma`` is one
    ``beta * k`` tile product; the ``c``, ``gamma`` and ``q`` tiles pass :func:`_opaque` before their unpack.
    Version 6: every tile of the next sub-chunk read (replay or sweep) is prefetched into L1 (:func:`_prefetch_sub`),
    27.2 -> 21.9 ms at B=1, T=32768 on an H100. Version 8: 16-bit inputs run 8-slot blocks at one warp (16 slots at
    one warp spill ~600 B of stack and lose at B=1): 22.2 -> 19.5 ms at B=1, the same at B=16."""
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
    p_sc = scratch + (i_bh * tl.num_programs(0) + i_m).to(tl.int64) * (CS // BCC) * BD * BM \
        + o_d[:, None] * BM + tl.arange(0, BM)[None, :]
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
            _prefetch_sub(q, do, k, v, beta, gram, hgram, c_in, tok0 + t1 * H, qtok0 + t1 * HQ, o_c, i_m,
                          HQ, H, M, D, BM, BCC)
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
            row0 = tok0 + t0 * H  # token j of the sub-chunk: row0 + j * H (kv-head tensors)
            qrow0 = qtok0 + t0 * HQ  # query head g of token j: qrow0 + g + j * HQ
            # the next sub-chunk to be read: r - 1 of this chunk, else the first replayed one of the chunk before
            t1 = tl.where(r > 0, t0 - BCC, tl.maximum(c_lo - CS, 0))
            _prefetch_sub(q, do, k, v, beta, gram, hgram, c_in, tok0 + t1 * H, qtok0 + t1 * HQ, o_c, i_m,
                          HQ, H, M, D, BM, BCC)
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
            Gs = _unpack_rows(_opaque(tl.load(beta + row0 + o_c * H).to(tl.float32)[:, None]
                                      * tl.load(k + tile, mask=rmask, other=0.0).to(tl.float32)))
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
                DOg = tl.load(do + (qrow0 + gq + o_c * HQ)[:, None] * D + o_d[None, :], mask=vd_mask, other=0.0).to(tl.float32)
                Fs = Fs + (_unpack_rows(tl.dot(DOg, S_b, input_precision=PREC)),)
                qg = _unpack_rows(_opaque(tl.load(q + (qrow0 + gq + o_c * HQ)[:, None] * M + o_m[None, :], mask=rmask,
                                                  other=0.0).to(tl.float32)))
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
            for gq in tl.static_range(G):
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
                dc, dgamma, dvv, dns = _gate_grads(Cs[j], Gs[j], VVs[j], ns, As[j], Bs[j],
                                                   x, U[j], dns_new, ORTHOGONAL, NORMALIZE)
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
                        Hr = _row_prefix(hgram + (qrow0 + gq + (j - 1) * HQ) * BCC, j)  # do_{j-1} . v_l
                        Un = ()
                        for l in tl.static_range(j):
                            Un = Un + (U[l] + Qs[gq][j - 1] * Hr[l],)
                        U = Un
                        rho += Qs[gq][j - 1] * Fs[gq][j - 1]
                    if EXACT:
                        Gr = _row_prefix(p_g + j * H * BCC, j)  # v_j . v_l
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
                DOg = tl.load(do + (qrow0 + gq + o_c * HQ)[:, None] * D + o_d[None, :], mask=vd_mask, other=0.0).to(tl.float32)
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
def _bwd_dq_kernel(
    do, k, v, beta, gram, hgram, c_in, ns_in, states, dq,
    T, NC,
    HQ: tl.constexpr, H: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    BCC: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
    ORTHOGONAL: tl.constexpr, NORMALIZE: tl.constexpr, TRACK_NS: tl.constexpr, PREC: tl.constexpr,
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
    S = tl.load(states + (i_bh.to(tl.int64) * NC + i_c) * D * M + o_d[:, None] * M + o_k[None, :],
                mask=d_mask[:, None] & k_mask[None, :], other=0.0)
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
        As, Bs = _sub_gates(c_in, ns_in, k, beta, gram, tok0 + t0 * H, o_c, o_k, k_mask, H, M, BCC,
                            ORTHOGONAL, NORMALIZE, TRACK_NS)
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
def _bwd_dv_kernel(
    q, do, k, v, beta, gram, c_in, ns_in, dc_in, dvv_in, g_in, dv,
    T, NC,
    HQ: tl.constexpr, H: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    BCC: tl.constexpr, CS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    EXACT: tl.constexpr, ORTHOGONAL: tl.constexpr, NORMALIZE: tl.constexpr, TRACK_NS: tl.constexpr,
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
    g = tl.load(g_in + (i_bh.to(tl.int64) * NC + i_c) * D * M + o_v[:, None] * M + o_k[None, :],
                mask=v_mask[:, None] & k_mask[None, :], other=0.0)
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
        As, Bs = _sub_gates(c_in, ns_in, k, beta, gram, tok0 + t0 * H, o_c, o_k, k_mask, H, M, BCC,
                            ORTHOGONAL, NORMALIZE, TRACK_NS)
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


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; the interpreter's CPU counts as one."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


class _Setup:
    """Shapes and compile-time switches shared by the forward and the backward."""

    def __init__(self, q, v, *, chunk_size: int, exact: bool, orthogonal: bool, normalize: bool,
                 gate_solver: str = "scan", fixed_point_iters: int = 0):
        self.B, self.T, self.HQ, self.M = q.shape
        self.H, self.D = v.shape[2], v.shape[3]
        self.CS = CS_EXACT if exact else chunk_size
        self.NC = triton.cdiv(self.T, self.CS)
        self.BD, self.BK = _pow2(self.D), _pow2(self.M)
        self.prec = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 matmuls for 16-bit inputs
        sixteen_bit = self.prec == "tf32"
        full_grid = self.B * self.H * triton.cdiv(self.M, BM_SCAN)
        split_fwd = sixteen_bit and full_grid <= FWD_SPLIT_PER_SM * _sm_count(q.device)
        self.bm_fwd = BM_SCAN_SPLIT if split_fwd else BM_SCAN
        self.bm_bwd = BM_SCAN_SPLIT if sixteen_bit else BM_SCAN
        self.warps_fwd = FWD_SCAN_WARPS if sixteen_bit else SCAN_WARPS
        self.warps_bwd = BWD_SCAN_WARPS if sixteen_bit else SCAN_WARPS
        self.flags = dict(ORTHOGONAL=orthogonal, NORMALIZE=normalize, TRACK_NS=orthogonal and not normalize)
        self.exact = exact
        self.gate_solver, self.fixed_point_iters = gate_solver, fixed_point_iters

    def read_bv(self) -> int:
        """Value columns per program of the read pass: all of them up to 128 (m <= 64), else 64."""
        return min(BV_READ if self.BK <= 64 else 64, self.BD)

    def new(self, *shape, dtype=torch.float32, like):
        return torch.empty(*shape, device=like.device, dtype=dtype)


def lattice_fwd(q, k, v, beta, state, setup: _Setup):
    """Forward: ``(o, final_state, saved)`` where ``saved`` holds what the backward re-reads."""
    s = setup
    gram = _sub_gram(v, v)
    if s.gate_solver == "fixed_point":  # the gate pass by matmuls (kernels/triton_gates_fwd.py); normalised only
        from .triton_gates_fwd import matmul_gate_pass

        c, states, final, norms, _ = matmul_gate_pass(k, v, beta, state, chunk_size=s.CS, exact=s.exact,
                                                      iters=s.fixed_point_iters, orthogonal=s.flags["ORTHOGONAL"],
                                                      prec=s.prec)
        ns = c
        extra = (norms, final)  # the matmul reverse pass re-reads them
    else:
        extra = ()
        c = s.new(s.B, s.T, s.H, s.M, like=q)
        ns = s.new(s.B, s.T, s.H, s.M, like=q) if s.flags["TRACK_NS"] else c
        states = s.new(s.B, s.H, s.NC, s.D, s.M, like=q)
        final = s.new(s.B, s.H, s.D, s.M, like=q)
        n_mb = triton.cdiv(s.M, s.bm_fwd)
        scratch = s.new(s.B * s.H * n_mb * s.BD * s.bm_fwd, like=q) if not s.exact else c
        _fwd_scan_kernel[(n_mb, s.B * s.H)](
            k, v, beta, state, gram, c, ns, states, final, scratch, s.T, s.NC,
            s.H, s.M, s.D, BC, s.CS, s.bm_fwd, s.BD, s.exact, PREC=s.prec, **s.flags, num_warps=s.warps_fwd,
        )
    o = torch.empty(s.B, s.T, s.HQ, s.D, device=q.device, dtype=q.dtype)
    bv = s.read_bv()
    _chunk_read_kernel[(triton.cdiv(s.D, bv), s.NC, s.B * s.HQ)](
        q, k, v, beta, gram, c, ns, states, o, s.T, s.NC,
        s.HQ, s.H, s.M, s.D, BC, s.CS, s.BK, bv, False, False, PREC=s.prec, **s.flags, num_warps=PAR_WARPS,
    )
    return o, final, (gram, c, ns, states, *extra)


def lattice_bwd(do, d_final, q, k, v, beta, saved, setup: _Setup):
    """Backward: ``(dq, dk, dv, dbeta, d_state)`` for the inputs of :func:`lattice_fwd`."""
    s = setup
    gram, c, ns, states, *gate_pass = saved
    hgram = _sub_gram(do, v)
    matmul_reverse = s.gate_solver == "fixed_point"  # the reverse pass by matmuls: kernels/triton_gates_bwd.py
    dq = torch.empty(q.shape, device=q.device, dtype=torch.float32) if matmul_reverse else torch.empty_like(q)
    bk = min(BK_DQ, s.BK)
    _bwd_dq_kernel[(triton.cdiv(s.M, bk), s.NC, s.B * s.HQ)](
        do, k, v, beta, gram, hgram, c, ns, states, dq, s.T, s.NC,
        s.HQ, s.H, s.M, s.D, BC, s.CS, bk, s.BD, PREC=s.prec, **s.flags, num_warps=PAR_WARPS,
    )
    if matmul_reverse:
        from .triton_gates_bwd import matmul_reverse_pass

        qdq = (q.float() * dq).view(s.B, s.T, s.H, s.HQ // s.H, s.M).sum(3)
        dc, dgamma, dvv, g_end, d_init = matmul_reverse_pass(
            q, do, k, v, beta, c, qdq, states, *gate_pass, d_final, chunk_size=s.CS, exact=s.exact,
            iters=s.fixed_point_iters, orthogonal=s.flags["ORTHOGONAL"], prec=s.prec,
        )
        dq = dq.to(q.dtype)
    else:
        dc = s.new(s.B, s.T, s.H, s.M, like=q)
        dgamma = torch.empty_like(dc)
        dvv = torch.empty_like(dc)
        g_end = torch.empty_like(states)
        d_init = s.new(s.B, s.H, s.D, s.M, like=q)
        n_mb = triton.cdiv(s.M, s.bm_bwd)
        scratch = s.new(s.B * s.H * n_mb * (s.CS // BC) * s.BD * s.bm_bwd, like=q)
        _bwd_scan_kernel[(n_mb, s.B * s.H)](
            q, do, k, v, beta, gram, hgram, c, ns, states, d_final if d_final is not None else dc, scratch,
            dc, dgamma, dvv, g_end, d_init, s.T, s.NC,
            s.HQ, s.H, s.M, s.D, BC, s.CS, s.bm_bwd, s.BD, s.exact, HAS_DFINAL=d_final is not None, PREC=s.prec,
            **s.flags, num_warps=s.warps_bwd,
        )
    dv = s.new(s.B, s.T, s.H, s.D, like=q)
    bv = s.read_bv()
    _chunk_read_kernel[(triton.cdiv(s.D, bv), s.NC, s.B * s.H)](
        dc, k, v, beta, gram, c, ns, states, dv, s.T, s.NC,
        s.H, s.H, s.M, s.D, BC, s.CS, s.BK, bv, True, not s.exact, PREC=s.prec, **s.flags, num_warps=PAR_WARPS,
    )
    bv = min(BV_DV if s.BK <= 64 else 64, s.BD)
    _bwd_dv_kernel[(triton.cdiv(s.D, bv), s.NC, s.B * s.H)](
        q, do, k, v, beta, gram, c, ns, dc, dvv, g_end, dv, s.T, s.NC,
        s.HQ, s.H, s.M, s.D, BC, s.CS, s.BK, bv, s.exact, PREC=s.prec, **s.flags, num_warps=PAR_WARPS,
    )
    dk = (dgamma * beta.unsqueeze(-1)).to(k.dtype)
    dbeta = (dgamma * k).sum(-1).to(beta.dtype)
    return dq, dk, dv.to(v.dtype), dbeta, d_init


def _pad_tokens(x: torch.Tensor, pad: int) -> torch.Tensor:
    """``x`` with ``pad`` zero tokens appended along dim 1 (no copy when ``pad == 0``)."""
    if not pad:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)


class LatticeChunkFunction(torch.autograd.Function):
    """Autograd wrapper of the chunkwise kernels; inputs contiguous, ``state`` float32 ``(B, Hkv, d, m)``.

    The sweeps walk whole 16-token sub-chunks: a ragged ``T`` is padded with tokens whose ``beta`` is 0, which
    leave every slot unchanged (``a = 1, b = 0``) and receive no gradient, and the outputs are cut back to ``T``.
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, state, chunk_size, exact, orthogonal, normalize, gate_solver, fixed_point_iters):
        T = q.shape[1]
        pad = -T % BC
        q, k, v, beta = (_pad_tokens(x, pad) for x in (q, k, v, beta))
        setup = _Setup(q, v, chunk_size=chunk_size, exact=exact, orthogonal=orthogonal, normalize=normalize,
                       gate_solver=gate_solver, fixed_point_iters=fixed_point_iters)
        o, final, saved = lattice_fwd(q, k, v, beta, state, setup)
        ctx.setup = setup
        ctx.pad = pad
        ctx.save_for_backward(q, k, v, beta, *saved)
        return o[:, :T] if pad else o, final

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, beta, *saved = ctx.saved_tensors
        dq, dk, dv, dbeta, d_state = lattice_bwd(
            _pad_tokens(do.contiguous(), ctx.pad), None if d_final is None else d_final.contiguous(),
            q, k, v, beta, saved, ctx.setup,
        )
        T = q.shape[1] - ctx.pad
        dq, dk, dv, dbeta = (x[:, :T] for x in (dq, dk, dv, dbeta))
        return dq, dk, dv, dbeta, d_state, None, None, None, None, None, None


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
    gate_solver: str = "scan",
    fixed_point_iters: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``chunk.chunk_lattice`` with a float32 ``state``: ``(o in q.dtype, final_state float32)``.

    With ``gates="exact"`` the result does not depend on ``chunk_size`` (the kernels pick their own blocking);
    with ``gates="chunk"`` it is the frozen-gate span and must be a multiple of 16.
    ``gate_solver``: ``"scan"``, the per-token sweeps forward and backward, or ``"fixed_point"``, the matmul passes
    of :mod:`triton_gates_fwd` and :mod:`triton_gates_bwd` (``fixed_point_iters`` iterations of docs/math.md §4b
    for exact gates, forward and adjoint; frozen gates need none; ``normalize=True`` only).
    """
    exact = gates == "exact"
    if not exact and chunk_size % BC:
        raise ValueError(f"the Triton backend needs chunk_size to be a multiple of {BC} for gates='chunk'")
    if gate_solver == "fixed_point" and not normalize:
        raise ValueError("gate_solver='fixed_point' needs normalize=True (positive forget gates)")
    return LatticeChunkFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous(), state.contiguous().float(),
        chunk_size, exact, orthogonal, normalize, gate_solver, fixed_point_iters,
    )
