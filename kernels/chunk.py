"""Chunkwise-parallel Lattice in plain PyTorch (docs/math.md §4): the Triton chunk kernels' reference.

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
    a, b = _chunk_gates(gamma, v, state, exact=exact, orthogonal=orthogonal, normalize=normalize)
    return gated_chunk(q, a, b, v, state, normalize=normalize)


def running_products(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate products of one chunk, gates ``a`` ``(B, H, L, m)``: ``A[t] = prod_{l <= t} a_l`` ``(B, H, L, m)`` and
    ``D[t, j] = prod_{j < l <= t} a_l`` for ``t >= j``, else 0 ``(B, H, t, j, m)``.

    Running products (cumprod), never ratios of them and never logs: exact, sign included, for gates of any size,
    and their gradients stay exact through a gate of 0 (which bf16 rounding produces), where the derivative of
    ``log |a|`` does not exist.
    """
    L = a.shape[2]
    later = torch.ones(L, L, dtype=torch.bool, device=a.device).triu(1).view(1, 1, L, L, 1)  # [j, l]: l > j
    # row j: the gates after token j, 1 elsewhere; its running product at l = t is D[t, j] for t >= j
    D = torch.cumprod(torch.where(later, a.unsqueeze(2), 1.0), dim=3).transpose(2, 3)
    return torch.cumprod(a, dim=2), D * torch.ones(L, L, dtype=a.dtype, device=a.device).tril().view(1, 1, L, L, 1)


def gated_chunk(
    q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, v: torch.Tensor, state: torch.Tensor, *, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs and end state of one chunk whose gates ``a, b`` ``(B, H, L, m)`` are known: gated linear attention.

    q ``(B, H, G, L, m)``, v ``(B, H, L, d)``, state ``(B, H, d, m)`` -> ``(o (B, H, G, L, d), new_state)``.
    """
    # Slot i after token t is A[t, i] s_i + sum_{j <= t} b[j, i] D[t, j, i] v_j with D[t, j] = prod_{j < l <= t} a_l.
    A, D = running_products(a)
    L = a.shape[2]
    M = (q.unsqueeze(4) * (D * b.unsqueeze(2)).unsqueeze(2)).sum(-1)  # (B, H, G, t, j): sum_i q_t[i] W_t[j, i]
    B, H, G = q.shape[:3]
    # (B, H, G * L, .) @ (B, H, ., d): no copy of the state or the values per query head
    o = (q * A.unsqueeze(2)).reshape(B, H, G * L, -1) @ state.mT + M.reshape(B, H, G * L, L) @ v
    o = o.view(B, H, G, L, -1)
    new_state = state * A[:, :, -1].unsqueeze(-2) + v.mT @ (b * D[:, :, -1])
    if normalize:
        new_state = normalize_slots(new_state)  # exact in real arithmetic; removes drift in finite precision
    return o, new_state


def _chunk_gates(
    gamma: torch.Tensor, v: torch.Tensor, state: torch.Tensor, *, exact: bool, orthogonal: bool, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gates ``a, b`` ``(B, H, L, m)`` of every token of the chunk."""
    P = v @ state  # (B, H, L, m): v_u . s_i at the chunk start
    gram = v @ v.mT  # (B, H, L, L)
    norm_sq = (state * state).sum(-2)  # (B, H, m)
    if exact:
        return _GateScan.apply(P, gram, gamma, norm_sq, orthogonal, normalize)
    # gates frozen at the chunk-start state: no scan at all
    vv = gram.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
    a, b, _ = slot_gates(P, gamma, vv, norm_sq.unsqueeze(2), orthogonal=orthogonal, normalize=normalize)
    return a, b


class _GateScan(torch.autograd.Function):
    """The sequential part of the exact chunk: a scan over ``L x m`` scalars, with a hand-written reverse scan.

    ``R[u, i] = s_i . v_u`` for every token ``u`` of the chunk is updated as the slots are, ``R <- a R + b G[:, t]``;
    before token ``t`` is written, ``R[t]`` is exactly the ``c_t`` its gates need. The backward runs the same scan in
    reverse; the partial derivatives of the gates come from autograd through :func:`slot_gates` for all tokens at
    once, so the gate math stays in one place and the loop itself holds only elementwise products.
    """

    @staticmethod
    def forward(ctx, P, gram, gamma, norm_sq, orthogonal: bool, normalize: bool):
        L = P.shape[2]
        vv = gram.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # (B, H, L, 1)
        R, R_before, norm_before, a_rows, b_rows = P, [], [], [], []
        for t in range(L):
            R_before.append(R)
            norm_before.append(norm_sq)
            a, b, norm_sq = slot_gates(
                R[:, :, t], gamma[:, :, t], vv[:, :, t], norm_sq, orthogonal=orthogonal, normalize=normalize
            )
            R = R * a.unsqueeze(2) + gram[:, :, :, t, None] * b.unsqueeze(2)
            a_rows.append(a)
            b_rows.append(b)
        a, b = torch.stack(a_rows, dim=2), torch.stack(b_rows, dim=2)
        R_before = torch.stack(R_before, dim=2)  # (B, H, t, u, m)
        ctx.save_for_backward(gram, gamma, a, b, R_before, torch.stack(norm_before, dim=2))
        ctx.flags = dict(orthogonal=orthogonal, normalize=normalize)
        return a, b

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        gram, gamma, a, b, R_before, norm_before = ctx.saved_tensors
        L = a.shape[2]
        c = R_before.diagonal(dim1=2, dim2=3).transpose(-1, -2)  # (B, H, L, m): c_t = R_{t-1}[t]
        vv = gram.diagonal(dim1=-2, dim2=-1).unsqueeze(-1).expand_as(c)
        jac = _gate_partials(c, gamma, vv, norm_before, **ctx.flags)  # (out, inp, B, H, L, m)
        grad_R = torch.zeros_like(R_before[:, :, 0])
        grad_norm = torch.zeros_like(norm_before[:, :, 0])
        grad_gram = torch.zeros_like(gram)
        grad_gamma = torch.empty_like(gamma)
        grad_vv = torch.empty_like(c)
        for t in reversed(range(L)):
            # R_t = a_t R_{t-1} + b_t G[:, t]
            da = grad_a[:, :, t] + (grad_R * R_before[:, :, t]).sum(2)
            db = grad_b[:, :, t] + (grad_R * gram[:, :, :, t, None]).sum(2)
            grad_gram[:, :, :, t] += (grad_R * b[:, :, t, None]).sum(-1)
            grad_R = grad_R * a[:, :, t, None]
            # (a_t, b_t, N_t) = gates(c_t, gamma_t, vv_t, N_{t-1})
            cotangents = torch.stack((da, db, grad_norm)).unsqueeze(1)  # (out, 1, B, H, m)
            grad_c, grad_gamma[:, :, t], grad_vv[:, :, t], grad_norm = (cotangents * jac[..., t, :]).sum(0)
            grad_R[:, :, t] += grad_c
        grad_gram = grad_gram + torch.diag_embed(grad_vv.sum(-1))
        return grad_R, grad_gram, grad_gamma, grad_norm, None, None


def _gate_partials(c, gamma, vv, norm_sq, *, orthogonal: bool, normalize: bool) -> torch.Tensor:
    """``d out / d inp`` stacked ``(3, 4, ...)`` for out in (a, b, new_norm_sq) and inp in (c, gamma, vv, norm_sq);
    the gates are elementwise, so the gradient of a sum gives every partial at once."""
    with torch.enable_grad():
        inputs = [x.detach().requires_grad_() for x in (c, gamma, vv, norm_sq)]
        outputs = slot_gates(*inputs, orthogonal=orthogonal, normalize=normalize)
        partials = []
        for out in outputs:
            if not out.requires_grad:  # the unit norm of the normalised variants is a constant
                partials.append([torch.zeros_like(c)] * 4)
                continue
            grads = torch.autograd.grad(out.sum(), inputs, retain_graph=True, allow_unused=True)
            partials.append([torch.zeros_like(c) if g is None else g for g in grads])
    return torch.stack([torch.stack(row) for row in partials])
