"""Exact Lattice gates by fixed-point iteration (docs/math.md §4b) in plain PyTorch: the reference of the kernels.

Within a sub-chunk starting from state ``S`` the exact gate inputs satisfy ``c = F(c)`` with
``F(c)_t = L_{t-1} * (P_t + sum_{j<t} G[t, j] b_j / L_j)``, where ``(a, b)`` are the gates of ``c``
(docs/math.md §3), ``L_t = a_0 ... a_t``, ``P = V S`` and ``G = V V^T``. ``F`` is causal, so iterating from the
frozen gates ``c^(0) = P`` (the paper's approximation, docs/math.md §4) is exact at positions ``t < k`` after ``k``
iterations and exact everywhere after as many iterations as the sub-chunk has tokens; with small ``|beta k|`` it
converges geometrically long before. Given the gates, the sub-chunk is plain gated linear attention
(:func:`chunk.gated_chunk`). Gradients come from autograd through the unrolled iterations.

Only the normalised variants (``normalize=True``) are covered (the gate formulas assume unit slots). Their forget
gates are positive while ``|beta k| ||v|| < 1``; rounding can push one to or below 0, which the running products
(:func:`chunk.running_products`) carry exactly, gradients included.
"""

import torch
import torch.nn.functional as F

from .chunk import gated_chunk, running_products
from .gates import normalize_slots, slot_gates


def fixed_point_gates(
    P: torch.Tensor, gram: torch.Tensor, gamma: torch.Tensor, *, iters: int, orthogonal: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gates ``(a, b)`` ``(B, H, L, m)`` of one sub-chunk after ``iters`` iterations of ``c <- F(c)`` from ``P``.

    P ``(B, H, L, m)``: ``v_t . s_i`` at the sub-chunk start; gram ``(B, H, L, L)``; gamma ``(B, H, L, m)``.
    Also returns the residual ``max |c^(K) - c^(K-1)|`` (0 for ``iters=0``), detached.
    """
    vv = gram.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
    one = torch.ones((), dtype=P.dtype, device=P.device)
    c, residual = P, torch.zeros((), dtype=P.dtype, device=P.device)
    for _ in range(iters):
        a, b, _ = slot_gates(c, gamma, vv, one, orthogonal=orthogonal, normalize=True)
        A, D = running_products(a)
        # L_{t-1} and L_{t-1} / L_j = D[t-1, j] for j < t: both shifted one token later (no division by L_j)
        L_prev, decay = F.pad(A, (0, 0, 1, -1), value=1.0), F.pad(D, (0, 0, 0, 0, 1, -1))
        c_next = L_prev * P + torch.einsum("bhtj,bhtjm,bhjm->bhtm", gram, decay, b)
        residual = (c_next - c).detach().abs().amax()
        c = c_next
    a, b, _ = slot_gates(c, gamma, vv, one, orthogonal=orthogonal, normalize=True)
    return a, b, residual


def fixed_point_lattice(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    *,
    iters: int = 2,
    sub_chunk: int = 16,
    chunk_size: int = 64,
    orthogonal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``chunk.chunk_lattice`` (``normalize=True``), gates by :func:`fixed_point_gates` on
    ``sub_chunk``-token spans; ``iters >= sub_chunk`` is exact. The slots are renormalised every ``chunk_size``
    tokens (a multiple of ``sub_chunk``), as the kernels do: with inexact gates the result depends on where.
    Returns ``(o, final_state, residual)``, the residual being the largest over all sub-chunks."""
    B, T, Hq, m = q.shape
    H, d = v.shape[2], v.shape[3]
    dtype = state.dtype
    gamma = (beta.unsqueeze(-1) * k).transpose(1, 2).to(dtype)  # (B, H, T, m)
    v = v.transpose(1, 2).to(dtype)  # (B, H, T, d)
    q = q.reshape(B, T, H, Hq // H, m).permute(0, 2, 3, 1, 4).to(dtype)  # (B, H, G, T, m)
    outputs, residual = [], torch.zeros((), dtype=dtype, device=q.device)
    for start in range(0, T, sub_chunk):
        end = min(start + sub_chunk, T)
        if start and start % chunk_size == 0:
            state = normalize_slots(state)
        vs = v[:, :, start:end]
        a, b, res = fixed_point_gates(
            vs @ state, vs @ vs.mT, gamma[:, :, start:end], iters=iters, orthogonal=orthogonal
        )
        o, state = gated_chunk(q[:, :, :, start:end], a, b, vs, state, normalize=False)
        outputs.append(o)
        residual = torch.maximum(residual, res)
    o = torch.cat(outputs, dim=3)  # (B, H, G, T, d)
    return o.permute(0, 3, 1, 2, 4).reshape(B, T, Hq, d), normalize_slots(state), residual
