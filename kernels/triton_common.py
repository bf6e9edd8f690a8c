"""Triton helpers shared by the chunkwise kernels (:mod:`triton_chunk_fwd`, :mod:`triton_chunk_bwd`), the matmul
gate passes (:mod:`triton_gates_fwd`, :mod:`triton_gates_bwd`) and the decode step (:mod:`triton_step`).

- Gate arithmetic, written once: :func:`_gates` (the jit twin of ``kernels/gates.py:slot_gates``) and its reverse
  :func:`_gate_grads`; the gates of a sub-chunk recomputed from the stored ``c`` as a tile (:func:`_tile_gates`) or
  as per-thread rows (:func:`_sub_gates`). Gate arithmetic is float32 whatever the input dtype.
- The sweeps' per-thread layout: every ``[16, BM]`` tile a matmul produces or a load brings is unpacked once
  (:func:`_unpack_rows`) into one ``[BM]`` vector per token, one slot per lane, so the dependent chain never crosses
  lanes; values that are the same for every slot (``beta``, Gram rows) become scalars every thread holds
  (:func:`_scalars`, :func:`_uniform_row`); results go back to tiles by register selects (:func:`_pack_rows`,
  :func:`_pack_sel`). Tiles enter a sweep only through :func:`_unpack_rows` and values leave it through
  :func:`_opaque`: otherwise the layout pass re-derives the unrolled sweep in the matmuls' layouts (which would
  repeat the whole sweep per layout).
- The decay-weighted matrix of a sub-chunk, ``M[t, j] = sum_i x_t[i] b_j[i] prod_{j<l<=t} a_l[i]``, without a
  per-token loop (:func:`_intra`): five small matmuls, the diagonal and the four levels of a binary split of the
  sub-chunk, each level's decay factored at the boundary between its halves into two plain products of gates
  (exact for any gates: nothing is divided, no logarithm).
- :func:`_prefetch`: L1 prefetch hints for the latency-bound sweeps (none under the interpreter).
- Host side: :func:`_pow2` (block sizes) and :func:`_sm_count`.

Every helper works on sub-chunks of ``BC = 16`` tokens.
"""

import os

import torch
import triton
import triton.language as tl

BC = 16  # tokens per sub-chunk of the sweeps (tl.dot needs >= 16)
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
def _tile_gates(
    c_in,
    ns_in,
    k,
    beta,
    gram,
    tok,
    o_c,
    t_mask,
    o_m,
    m_mask,
    M: tl.constexpr,
    BCC: tl.constexpr,
    ORTHOGONAL: tl.constexpr,
    NORMALIZE: tl.constexpr,
    TRACK_NS: tl.constexpr,
):
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
def _sub_gates(
    c_in,
    ns_in,
    k,
    beta,
    gram,
    row0,
    o_c,
    o_k,
    k_mask,
    H: tl.constexpr,
    M: tl.constexpr,
    BCC: tl.constexpr,
    ORTHOGONAL: tl.constexpr,
    NORMALIZE: tl.constexpr,
    TRACK_NS: tl.constexpr,
):
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


@triton.jit
def _log_gates(a):
    """``log |a|`` and the count of negative gates: products of gates in log space keep their sign."""
    return tl.log(tl.maximum(tl.abs(a), 1e-30)), (a < 0).to(tl.int32)


@triton.jit
def _signed_exp(x, negatives):
    """``exp(x)`` times ``-1`` for an odd count of negative gates."""
    return tl.exp(x) * (1 - 2 * (negatives & 1)).to(tl.float32)


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
    for i in tl.static_range(BITS):  # noqa: B007
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
def _ones(x):
    return x * 0.0 + 1.0


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
        tl.inline_asm_elementwise(
            "prefetch.global.L1 [$1];\n\tmov.u32 $0, 0;", "=r,l", [lines], dtype=tl.int32, is_pure=False, pack=1
        )


def _pow2(x: int) -> int:
    """``x`` rounded up to a power of two, at least 16: a block size for ``tl.arange`` and ``tl.dot``."""
    return max(16, triton.next_power_of_2(x))


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; the interpreter's CPU counts as one."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
