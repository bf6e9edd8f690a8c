"""Chunkwise-parallel Lattice in plain PyTorch (LATTICE.md §4): the reference the Triton chunk kernels are checked against.

Within a chunk the state is a known linear function of the chunk-start state ``S`` and the chunk's values:
``s_i(t) = A_i(t) s_i + sum_j W_t[j, i] v_j``. The gates need ``c_t = S(t-1)^T v_t``, which follows from two small
matrices (``P = V S`` and the Gram matrix ``V V^T``), so the sequential scan runs over ``C x m`` scalars only and
everything touching ``d``-sized vectors is a matrix product. With ``gates="exact"`` this equals the token-by-token
recurrence; ``gates="chunk"`` freezes the gates at the chunk-start state (the paper's approximation).
"""

import torch

from .gates import normalize_slots, slot_gates


def chunk_lattice(
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
    """q ``(B, T, Hq, m)``, k ``(B, T, Hkv, m)``, v ``(B, T, Hkv, d)``, beta ``(B, T, Hkv)``, state ``(B, Hkv, d, m)``.

    Returns ``(o (B, T, Hq, d), final_state (B, Hkv, d, m))``, computed in the dtype of ``state``.
    """
    B, T, Hq, m = q.shape
    H, d = v.shape[2], v.shape[3]
    dtype = state.dtype
    gamma = (beta.unsqueeze(-1) * k).transpose(1, 2).to(dtype)  # (B, H, T, m)
    v = v.transpose(1, 2).to(dtype)  # (B, H, T, d)
    q = q.reshape(B, T, H, Hq // H, m).permute(0, 2, 3, 1, 4).to(dtype)  # (B, H, G, T, m)
    outputs = []
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        o, state = _one_chunk(
            q[:, :, :, start:end],
            gamma[:, :, start:end],
            v[:, :, start:end],
            state,
            exact=gates == "exact",
            orthogonal=orthogonal,
            normalize=normalize,
        )
        outputs.append(o)
    o = torch.cat(outputs, dim=3)  # (B, H, G, T, d)
    return o.permute(0, 3, 1, 2, 4).reshape(B, T, Hq, d), state


def _one_chunk(
    q: torch.Tensor,
    gamma: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    *,
    exact: bool,
    orthogonal: bool,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: q ``(B, H, G, L, m)``, gamma ``(B, H, L, m)``, v ``(B, H, L, d)``, state ``(B, H, d, m)``."""
    L = v.shape[2]
    P = v @ state  # (B, H, L, m): v_t . s_i at the chunk start
    gram = v @ v.mT  # (B, H, L, L)
    vv = gram.diagonal(dim1=-2, dim2=-1)  # (B, H, L)
    chunk_norm_sq = (state * state).sum(-2)  # (B, H, m)
    norm_sq = chunk_norm_sq
    one_hot = torch.eye(L, dtype=state.dtype, device=state.device)
    A = torch.ones_like(chunk_norm_sq)  # coefficient of the chunk-start slot
    W = state.new_zeros(*gamma.shape)  # (B, H, L, m): W[j, i] is the coefficient of v_j in slot i
    A_rows, M_rows = [], []
    for t in range(L):
        if exact:
            c = A * P[:, :, t] + torch.einsum("bhjm,bhj->bhm", W, gram[:, :, t])  # rows j >= t of W are zero
        else:
            c, norm_sq = P[:, :, t], chunk_norm_sq  # frozen at the chunk start
        a, b, new_norm_sq = slot_gates(
            c, gamma[:, :, t], vv[:, :, t, None], norm_sq, orthogonal=orthogonal, normalize=normalize
        )
        if exact:
            norm_sq = new_norm_sq
        A = A * a
        W = W * a.unsqueeze(2) + one_hot[t].view(1, 1, L, 1) * b.unsqueeze(2)
        A_rows.append(A)
        M_rows.append(torch.einsum("bhjm,bhgm->bhgj", W, q[:, :, :, t]))  # M[t, j] = sum_i W_t[j, i] q_t[i]
    Aq = torch.stack(A_rows, dim=2).unsqueeze(2)  # (B, H, 1, L, m)
    M = torch.stack(M_rows, dim=3)  # (B, H, G, L, L)
    o = (q * Aq) @ state.mT.unsqueeze(2) + M @ v.unsqueeze(2)  # (B, H, G, L, d)
    new_state = state * A.unsqueeze(-2) + v.mT @ W
    if normalize:
        new_state = normalize_slots(new_state)  # exact in real arithmetic; removes drift in finite precision
    return o, new_state
