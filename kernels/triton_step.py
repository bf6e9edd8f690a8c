"""Fused one-token Lattice decode step (docs/math.md §5): write the token into every slot, retract, read.

One program per (batch, kv head) holds the whole ``d x m`` float32 state in registers: it reads the state once,
writes it once and reads it for every query head of the group, so a step costs one pass over the cache whatever
the context length. Gates come from :func:`triton_chunk._gates` (one formula for every kernel).
"""

import torch
import triton
import triton.language as tl

from .triton_chunk import _gates


@triton.jit
def _step_kernel(
    q, k, v, beta, s_in, s_out, o,
    HQ: tl.constexpr, H: tl.constexpr, M: tl.constexpr, D: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
    ORTHOGONAL: tl.constexpr, NORMALIZE: tl.constexpr,
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
        q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous(), state, out_state, o,
        HQ, H, M, D, BK, BD, orthogonal, normalize, num_warps=8 if BK * BD >= 8192 else 4,
    )
    return o, out_state
