"""The mixer's elementwise work in plain PyTorch: the references the fused Triton kernels are checked against.

Prologue (``docs/math.md §2``): code maps' non-linearity after the headwise linear map, value L2 normalisation and
the step size ``beta = sigmoid(.)``. Epilogue (``docs/math.md §6``): per-head RMSNorm of the read-out with a learned
scale, optionally times an output gate ``sigmoid(W_g x)``. Both compute in float32 (float64 for float64 inputs)
and return ``out_dtype``, the dtype the Lattice op and the output projection take.
"""

import torch
import torch.nn.functional as F

from lattice_plugin.vocab import FEATURE_MAPS as CODE_MAPS  # the kernels index it: one order everywhere

NORM_EPS = 1e-12  # F.normalize's floor on the norm, for the values and "l2" codes


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in its compute dtype: float64 stays, everything else goes to float32."""
    return x if x.dtype == torch.float64 else x.float()


def code_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """The code non-linearity over the last (slot) dimension; each keeps ``|code| <= 1`` (``docs/math.md §2``)."""
    if name == "softmax":
        return torch.softmax(x, dim=-1)
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "tanh":
        return torch.tanh(x)
    if name == "l2":
        return F.normalize(x, dim=-1, eps=NORM_EPS)
    raise ValueError(f"unknown code map {name!r}; choose one of {', '.join(CODE_MAPS)}")


def prologue_reference(
    q_logits: torch.Tensor,
    k_logits: torch.Tensor,
    v: torch.Tensor,
    beta_logits: torch.Tensor,
    code: str,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, k, v, beta)`` for the Lattice op from q/k code logits ``(B, T, H, m)``, raw values ``(B, T, Hkv, d)``
    and beta logits ``(B, T, Hkv)``."""
    q = code_map(_wide(q_logits), code)
    k = code_map(_wide(k_logits), code)
    v = F.normalize(_wide(v), dim=-1, eps=NORM_EPS)
    beta = torch.sigmoid(_wide(beta_logits))
    return q.to(out_dtype), k.to(out_dtype), v.to(out_dtype), beta.to(out_dtype)


def epilogue_reference(
    o: torch.Tensor, weight: torch.Tensor, eps: float, gate_logits: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """Per-head RMSNorm of ``o`` ``(B, T, H, d)`` with scale ``weight`` ``(H, d)``, times ``sigmoid(gate_logits)``
    (``(B, T, H * d)``) when given; returns ``(B, T, H, d)`` in ``out_dtype``."""
    y = _wide(o)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * _wide(weight)
    if gate_logits is not None:
        y = y * torch.sigmoid(_wide(gate_logits)).view_as(y)
    return y.to(out_dtype)
