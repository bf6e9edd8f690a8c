"""The slot update of docs/math.md §3 written as ``s <- a * s + b * v``: the math lives here, once.

Every backend that does not apply the update literally (the chunkwise scans, the kernels' references) gets its
gates from :func:`slot_gates`, so the four variants (orthogonal / normalize ablations) cannot drift apart.
"""

import torch


def slot_gates(
    c: torch.Tensor,
    gamma: torch.Tensor,
    vv: torch.Tensor,
    norm_sq: torch.Tensor,
    *,
    orthogonal: bool,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coefficients of the linear slot update and the slot's new squared norm.

    Args:
        c: ``s . v`` for every slot (the state before this token), any shape ``(..., m)``.
        gamma: ``beta * k``, same shape as ``c``.
        vv: ``||v||^2`` broadcastable to ``c`` (usually ``(..., 1)``).
        norm_sq: ``||s||^2`` of every slot before the update, same shape as ``c``. Ignored when ``normalize``
            (the slots are unit vectors then).

    Returns:
        ``(a, b, new_norm_sq)`` such that ``s_new = a * s + b * v`` and ``||s_new||^2 = new_norm_sq``.
    """
    if normalize:
        # sphere: ||s|| = 1 before and after the step
        if orthogonal:
            # Cauchy-Schwarz keeps vv - c^2 >= 0; clamp rounding so the root stays real
            n = torch.sqrt(1 + gamma * gamma * (vv - c * c).clamp_min(0))
            a = (1 - gamma * c) / n
        else:
            n = torch.sqrt(1 + 2 * gamma * c + gamma * gamma * vv)
            a = 1 / n
        return a, gamma / n, torch.ones_like(c)
    if orthogonal:
        # project out the slot's own direction, no retraction: ||s'||^2 = ||s||^2 + gamma^2 ||u||^2
        a = 1 - gamma * c / norm_sq
        return a, gamma, norm_sq + gamma * gamma * (vv - c * c / norm_sq).clamp_min(0)
    # additive Hebbian write (classic linear attention with no decay)
    return torch.ones_like(c), gamma, norm_sq + 2 * gamma * c + gamma * gamma * vv


def normalize_slots(state: torch.Tensor) -> torch.Tensor:
    """Unit-normalise every slot (column) of a ``(..., d, m)`` state."""
    return state / torch.linalg.vector_norm(state, dim=-2, keepdim=True).clamp_min(1e-12)
