"""Fused one-token Lattice decode steps (docs/math.md §5): write the token into every slot, retract, read.

One program per (batch, kv head) holds the whole ``d x m`` float32 state in registers: it reads the state once,
writes it once and reads it for every query head of the group, so a step costs one pass over the cache whatever
the context length. Gates come from :func:`triton_common._gates` (one formula for every kernel).

- :func:`lattice_step_triton`: the state update and read alone; reference ``kernels/recurrent.py:recurrent_step``.
- :func:`lattice_decode_layer_triton`: everything a Lattice layer does to one token between its qkv matmul and its
  output projection (RoPE, code maps and feature maps, value normalisation, beta, state update, read, per-head
  output norm; docs/math.md §2, §3, §6) in one launch; reference: the layer's unfused decode step
  (``LatticeMixer`` with ``fused_decode = False``: litgpt's RoPE, the feature maps, ``recurrent_step``,
  ``HeadRMSNorm``). Intermediate roundings to the activation dtype happen where the unfused layer rounds.
"""

import torch
import triton
import triton.language as tl

from .triton_common import _gates


@triton.jit
def _step_kernel(
    q,
    k,
    v,
    beta,
    s_in,
    s_out,
    o,
    HQ: tl.constexpr,
    H: tl.constexpr,
    M: tl.constexpr,
    D: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    ORTHOGONAL: tl.constexpr,
    NORMALIZE: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_b = i_bh // H
    G: tl.constexpr = HQ // H
    o_k = tl.arange(0, BK)
    k_mask = o_k < M
    o_d = tl.arange(0, BD)
    d_mask = o_d < D
    s_off = i_bh.to(tl.int64) * D * M + o_d[:, None] * M + o_k[None, :]
    s_mask = d_mask[:, None] & k_mask[None, :]
    S = tl.load(s_in + s_off, mask=s_mask, other=0.0)
    vr = tl.load(v + i_bh * D + o_d, mask=d_mask, other=0.0).to(tl.float32)
    gamma = tl.load(beta + i_bh).to(tl.float32) * tl.load(k + i_bh * M + o_k, mask=k_mask, other=0.0).to(tl.float32)
    c = tl.sum(S * vr[:, None], 0)
    if ORTHOGONAL and not NORMALIZE:
        ns = tl.where(k_mask, tl.sum(S * S, 0), 1.0)
    else:
        ns = c * 0.0 + 1.0
    a, b, _ = _gates(c, gamma, tl.sum(vr * vr, 0), ns, ORTHOGONAL, NORMALIZE)
    S = S * a[None, :] + vr[:, None] * b[None, :]
    if NORMALIZE:
        S = S / tl.maximum(tl.sqrt(tl.sum(S * S, 0)), 1e-12)[None, :]  # retraction, as recurrent_step does
    tl.store(s_out + s_off, S, mask=s_mask)
    for g in range(G):
        hq = i_b * HQ + (i_bh % H) * G + g
        qr = tl.load(q + hq * M + o_k, mask=k_mask, other=0.0).to(tl.float32)
        tl.store(o + hq * D + o_d, tl.sum(S * qr[None, :], 1), mask=d_mask)


def lattice_step_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    *,
    orthogonal: bool = True,
    normalize: bool = True,
    out_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``(B, Hq, m)``, k ``(B, Hkv, m)``, v ``(B, Hkv, d)``, beta ``(B, Hkv)``, state ``(B, Hkv, d, m)`` float32.

    Returns ``(o (B, Hq, d) in q.dtype, new_state)``; the new state goes to ``out_state`` (which may be ``state``
    itself: each program reads its whole tile before writing it).
    """
    B, H, D, M = state.shape
    HQ = q.shape[1]
    state = state.contiguous()
    out_state = torch.empty_like(state) if out_state is None else out_state
    o = torch.empty(B, HQ, D, device=q.device, dtype=q.dtype)
    BK, BD = max(16, triton.next_power_of_2(M)), max(16, triton.next_power_of_2(D))
    _step_kernel[(B * H,)](
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        beta.contiguous(),
        state,
        out_state,
        o,
        HQ,
        H,
        M,
        D,
        BK,
        BD,
        orthogonal,
        normalize,
        num_warps=8 if BK * BD >= 8192 else 4,
    )
    return o, out_state


FEATURE_MAP_IDS = {"softmax": 0, "sigmoid": 1, "tanh": 2, "l2": 3}


@triton.jit
def _feature_map(x, mask, FEATURE: tl.constexpr):
    """The code non-linearity over the slots (padding lanes come out 0)."""
    if FEATURE == 0:
        e = tl.exp(tl.where(mask, x, float("-inf")) - tl.max(tl.where(mask, x, float("-inf")), 0))
        e = tl.where(mask, e, 0.0)
        y = e / tl.sum(e, 0)
    elif FEATURE == 1:
        y = tl.sigmoid(x)
    elif FEATURE == 2:
        y = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    else:
        y = x / tl.maximum(tl.sqrt(tl.sum(tl.where(mask, x * x, 0.0), 0)), 1e-12)
    return tl.where(mask, y, 0.0)


@triton.jit
def _roped_head(head, cos_row, sin_row, o_d, d_mask, N_ELEM: tl.constexpr, ROPE: tl.constexpr):
    """One head's projection with RoPE on its first ``N_ELEM`` entries (litgpt's half-split pairs), in float32 after
    rounding to the activation dtype as litgpt's ``apply_rope`` does."""
    x = tl.load(head + o_d, mask=d_mask, other=0.0)
    dtype = x.dtype
    x = x.to(tl.float32)
    if ROPE:
        HALF: tl.constexpr = N_ELEM // 2
        in_rope = o_d < N_ELEM
        first = o_d < HALF
        partner = tl.load(head + tl.where(first, o_d + HALF, o_d - HALF), mask=in_rope, other=0.0).to(tl.float32)
        c = tl.load(cos_row + o_d, mask=in_rope, other=1.0).to(tl.float32)
        s = tl.load(sin_row + o_d, mask=in_rope, other=0.0).to(tl.float32)
        roped = (x * c + tl.where(first, -partner, partner) * s).to(dtype).to(tl.float32)
        x = tl.where(in_rope, roped, x)
    return x


@triton.jit
def _code(weight, x, o_k, o_d, k_mask, d_mask, M: tl.constexpr, D: tl.constexpr, FEATURE: tl.constexpr):
    """``phi(W x)`` for one head: ``W`` ``(M, D)`` in the activation dtype, the product rounded to it."""
    w = tl.load(weight + o_k[:, None] * D + o_d[None, :], mask=k_mask[:, None] & d_mask[None, :], other=0.0)
    code = tl.sum(w.to(tl.float32) * x[None, :], 1).to(w.dtype).to(tl.float32)
    return _feature_map(code, k_mask, FEATURE)


@triton.jit
def _decode_layer_kernel(
    qkv,
    beta_logit,
    cos,
    sin,
    wq,
    wk,
    norm_w,
    state,
    o,
    cos_stride,
    eps,
    HQ: tl.constexpr,
    H: tl.constexpr,
    M: tl.constexpr,
    D: tl.constexpr,
    N_ELEM: tl.constexpr,
    BK: tl.constexpr,
    BD: tl.constexpr,
    FEATURE: tl.constexpr,
    ROPE: tl.constexpr,
    ORTHOGONAL: tl.constexpr,
    NORMALIZE: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_b = i_bh // H
    i_h = i_bh % H
    G: tl.constexpr = HQ // H
    o_k = tl.arange(0, BK)
    k_mask = o_k < M
    o_d = tl.arange(0, BD)
    d_mask = o_d < D
    row = qkv + i_b.to(tl.int64) * (HQ + 2 * H) * D
    cos_row = cos + i_b * cos_stride
    sin_row = sin + i_b * cos_stride
    k = _roped_head(row + (HQ + i_h) * D, cos_row, sin_row, o_d, d_mask, N_ELEM, ROPE)
    k = _code(wk + i_h * M * D, k, o_k, o_d, k_mask, d_mask, M, D, FEATURE)
    v = tl.load(row + (HQ + H + i_h) * D + o_d, mask=d_mask, other=0.0).to(tl.float32)
    v = v / tl.maximum(tl.sqrt(tl.sum(v * v, 0)), 1e-12)
    gamma = tl.sigmoid(tl.load(beta_logit + i_bh).to(tl.float32)) * k
    s_off = i_bh.to(tl.int64) * D * M + o_d[:, None] * M + o_k[None, :]
    s_mask = d_mask[:, None] & k_mask[None, :]
    S = tl.load(state + s_off, mask=s_mask, other=0.0)
    c = tl.sum(S * v[:, None], 0)
    if ORTHOGONAL and not NORMALIZE:
        ns = tl.where(k_mask, tl.sum(S * S, 0), 1.0)
    else:
        ns = c * 0.0 + 1.0
    a, b, _ = _gates(c, gamma, tl.sum(v * v, 0), ns, ORTHOGONAL, NORMALIZE)
    S = S * a[None, :] + v[:, None] * b[None, :]
    if NORMALIZE:
        S = S / tl.maximum(tl.sqrt(tl.sum(S * S, 0)), 1e-12)[None, :]
    tl.store(state + s_off, S, mask=s_mask)
    for g in range(G):
        hq = i_h * G + g
        q = _roped_head(row + hq * D, cos_row, sin_row, o_d, d_mask, N_ELEM, ROPE)
        q = _code(wq + hq * M * D, q, o_k, o_d, k_mask, d_mask, M, D, FEATURE)
        out = tl.sum(S * q[None, :], 1).to(o.dtype.element_ty).to(tl.float32)
        out = out * tl.math.rsqrt(tl.sum(out * out, 0) / D + eps)
        scale = tl.load(norm_w + hq * D + o_d, mask=d_mask, other=0.0).to(tl.float32)
        tl.store(o + (i_b * HQ + hq).to(tl.int64) * D + o_d, (out * scale).to(o.dtype.element_ty), mask=d_mask)


def lattice_decode_layer_triton(
    qkv: torch.Tensor,
    beta_logit: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    q_code: torch.Tensor,
    k_code: torch.Tensor,
    norm_weight: torch.Tensor,
    state: torch.Tensor,
    *,
    feature_map: str = "softmax",
    eps: float = 1e-5,
    orthogonal: bool = True,
    normalize: bool = True,
) -> torch.Tensor:
    """One token of a Lattice layer after its qkv matmul; updates ``state`` in place.

    qkv ``(B, (Hq + 2 Hkv) d)`` (q heads, then k, then v, as litgpt's fused projection lays them out);
    beta_logit ``(B, Hkv)`` (before the sigmoid); cos, sin ``(1 or B, n_elem)`` RoPE rows of this position (None: no
    RoPE); q_code ``(Hq, m, d)``, k_code ``(Hkv, m, d)``; norm_weight ``(Hq, d)``; state ``(B, Hkv, d, m)`` float32,
    contiguous. Returns the normalised read ``(B, Hq * d)`` in the dtype of ``qkv``.
    """
    B, H, D, M = state.shape
    HQ = q_code.shape[0]
    if qkv.shape != (B, (HQ + 2 * H) * D) or state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"qkv {tuple(qkv.shape)} / state {tuple(state.shape)} {state.dtype} do not fit together")
    qkv = qkv.contiguous()
    rope = cos is not None
    if rope:
        cos, sin = cos.contiguous(), sin.contiguous()
    else:  # never read: the kernel only needs valid pointers
        cos = sin = qkv
    n_elem = cos.shape[-1] if rope else 0
    cos_stride = cos.stride(0) if rope and cos.shape[0] > 1 else 0
    o = torch.empty(B, HQ * D, device=qkv.device, dtype=qkv.dtype)
    BK, BD = max(16, triton.next_power_of_2(M)), max(16, triton.next_power_of_2(D))
    _decode_layer_kernel[(B * H,)](
        qkv,
        beta_logit.contiguous(),
        cos,
        sin,
        q_code.contiguous(),
        k_code.contiguous(),
        norm_weight.contiguous(),
        state,
        o,
        cos_stride,
        eps,
        HQ,
        H,
        M,
        D,
        n_elem,
        BK,
        BD,
        FEATURE_MAP_IDS[feature_map],
        rope,
        orthogonal,
        normalize,
        num_warps=8 if BK * BD >= 8192 else 4,
    )
    return o
