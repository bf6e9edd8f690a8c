"""Token-by-token Lattice (docs/math.md §3), applied literally: every other backend's ground truth.

No closed-form gates here on purpose: the slot is projected, stepped and retracted exactly as the definition says,
so comparing the chunkwise scan (which uses :mod:`gates`) against this checks the algebra too.
"""

import torch

from .gates import normalize_slots


def read_slots(state: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``o = S q`` for every query head; query head ``h`` reads kv head ``h // (Hq // Hkv)``.

    state: ``(B, Hkv, d, m)``, q: ``(B, Hq, m)`` -> ``(B, Hq, d)``.
    """
    B, H, d, m = state.shape
    Hq = q.shape[1]
    return torch.einsum("bhdm,bhgm->bhgd", state, q.reshape(B, H, Hq // H, m)).reshape(B, Hq, d)


def recurrent_step(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    orthogonal: bool = True,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write one token into every slot, then read (read after write).

    state ``(B, Hkv, d, m)``, q ``(B, Hq, m)``, k ``(B, Hkv, m)``, v ``(B, Hkv, d)``, beta ``(B, Hkv)``.
    Returns ``(o (B, Hq, d), new_state)``; all in the dtype of ``state``.
    """
    gamma = (beta.unsqueeze(-1) * k).unsqueeze(-2)  # (B, H, 1, m)
    v_col = v.unsqueeze(-1)  # (B, H, d, 1)
    if orthogonal:
        c = (state * v_col).sum(-2, keepdim=True)  # (B, H, 1, m): what each slot already holds of v
        if not normalize:
            c = c / (state * state).sum(-2, keepdim=True)  # projection onto a slot that is not a unit vector
        update = v_col - c * state  # the part of v orthogonal to the slot
    else:
        update = v_col
    new_state = state + gamma * update
    if normalize:
        new_state = normalize_slots(new_state)  # retraction to the sphere
    return read_slots(new_state, q), new_state


def recurrent_lattice(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    *,
    orthogonal: bool = True,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run :func:`recurrent_step` over a sequence.

    q ``(B, T, Hq, m)``, k ``(B, T, Hkv, m)``, v ``(B, T, Hkv, d)``, beta ``(B, T, Hkv)``, state ``(B, Hkv, d, m)``.
    Returns ``(o (B, T, Hq, d), final_state)`` in the dtype of ``state``.
    """
    outputs = []
    for t in range(q.shape[1]):
        o, state = recurrent_step(
            state, q[:, t], k[:, t], v[:, t], beta[:, t], orthogonal=orthogonal, normalize=normalize
        )
        outputs.append(o)
    return torch.stack(outputs, dim=1), state
