"""The public Lattice operators: one call for sequences (training, prefill) and one for a single decoding step.

Backends sit behind the same call:

- ``"recurrent"``: token by token, the literal definition (docs/math.md §3); exact in any dtype, float64 included.
- ``"torch"``: chunkwise-parallel (docs/math.md §4) in plain PyTorch; exact for ``gates="exact"``.
- ``"triton"``: the fused GPU kernels (CUDA only).
- ``"auto"``: ``"triton"`` on CUDA when available, else ``"torch"``.

State and gate arithmetic run in float32 (float64 when the inputs are float64) whatever the activation dtype.
"""

import torch

from lattice_plugin.errors import LatticeError
from lattice_plugin.kernels.chunk import chunk_lattice
from lattice_plugin.kernels.fixed_point import fixed_point_lattice
from lattice_plugin.kernels.gates import normalize_slots
from lattice_plugin.kernels.recurrent import recurrent_lattice, recurrent_step
from lattice_plugin.vocab import BACKENDS, GATE_MODES, GATE_SOLVERS, Backend, GateMode, GateSolver, one_of


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of state and gate arithmetic for activations of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_available() -> bool:
    """Whether the Triton backend can run here (a CUDA device and an importable Triton)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(
    backend: str, device: torch.device, gates: str, dtype: torch.dtype = torch.float32, chunk_size: int = 64
) -> str:
    """Turn ``"auto"`` into a concrete backend and refuse combinations that do not exist."""
    if backend not in BACKENDS:
        raise LatticeError(f"unknown Lattice backend {backend!r}; choose {one_of(BACKENDS)}")
    if gates not in GATE_MODES:
        raise LatticeError(f"unknown Lattice gates mode {gates!r}; choose {one_of(GATE_MODES)}")
    triton_limits = None  # why the Triton kernels cannot serve this call, if they cannot
    if dtype == torch.float64:
        triton_limits = "the 'triton' Lattice backend computes in float32; use backend='torch' for float64"
    elif gates == "chunk" and chunk_size % 16:
        triton_limits = f"backend='triton' with gates='chunk' needs chunk_size to be a multiple of 16, got {chunk_size}"
    if backend == "auto":
        usable = device.type == "cuda" and triton_available() and triton_limits is None
        return "triton" if usable else "torch"
    if backend == "recurrent" and gates == "chunk":
        raise LatticeError("gates='chunk' freezes gates per chunk and needs a chunked backend ('torch' or 'triton')")
    if backend == "triton":
        if device.type != "cuda":
            raise LatticeError("the 'triton' Lattice backend needs CUDA tensors; use backend='torch' on the CPU")
        if triton_limits is not None:
            raise LatticeError(triton_limits)
    return backend


def _check_shapes(q, k, v, beta, s0, initial_state) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or beta.dim() != 3:
        raise LatticeError("expected q (B, T, Hq, m), k (B, T, Hkv, m), v (B, T, Hkv, d), beta (B, T, Hkv)")
    B, T, Hq, m = q.shape
    Hkv, d = v.shape[2], v.shape[3]
    if k.shape != (B, T, Hkv, m) or v.shape[:2] != (B, T) or beta.shape != (B, T, Hkv):
        raise LatticeError(
            f"inconsistent shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, beta {tuple(beta.shape)}"
        )
    if Hq % Hkv:
        raise LatticeError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if s0.shape != (Hkv, d, m):
        raise LatticeError(f"s0 must have shape (Hkv, d, m) = {(Hkv, d, m)}, got {tuple(s0.shape)}")
    if initial_state is not None and initial_state.shape != (B, Hkv, d, m):
        raise LatticeError(
            f"initial_state must have shape (B, Hkv, d, m) = {(B, Hkv, d, m)}, got {tuple(initial_state.shape)}"
        )


def _check_gate_solver(gate_solver: str, iters: int, backend: str, normalize: bool) -> None:
    if gate_solver not in GATE_SOLVERS:
        raise LatticeError(f"unknown gate_solver {gate_solver!r}; choose {one_of(GATE_SOLVERS)}")
    if gate_solver == "fixed_point":
        if backend == "recurrent":
            raise LatticeError("gate_solver='fixed_point' needs a chunked backend ('torch' or 'triton')")
        if not normalize:
            raise LatticeError("gate_solver='fixed_point' needs normalize=True (its gate formulas assume unit slots)")
        if not isinstance(iters, int) or iters < 0:
            raise LatticeError(f"fixed_point_iters must be a non-negative integer, got {iters!r}")


def resolve_gate_solver(gate_solver: GateSolver) -> str:
    """``"auto"`` is the scan, for exact and frozen gates alike. The matmul passes are faster for frozen gates
    (bench/results/kernels_gla_h100.json) but divide ``dL/d log a`` by the gate ``a``: with 16-bit inputs their
    tf32 matmuls leave that sum errors of ~1e-3, which a gate near 0 (bf16 rounding makes them, docs/math.md §4b)
    turns into gradient errors of 10% and more (and, on an H100, NaN): frozen-gate MQAR runs at lr 1e-3 and 3e-3
    diverged on them (five of six), and none did on the scan, whose reverse sweep never divides by a gate."""
    return "scan" if gate_solver == "auto" else gate_solver


def lattice_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    s0: torch.Tensor,
    *,
    chunk_size: int = 64,
    gates: GateMode = "exact",
    orthogonal: bool = True,
    normalize: bool = True,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: Backend = "auto",
    gate_solver: GateSolver = "auto",
    fixed_point_iters: int = 4,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lattice token mixing over a sequence.

    Args:
        q: read codes ``(B, T, Hq, m)``; query head ``h`` reads kv head ``h // (Hq // Hkv)``.
        k: write codes ``(B, T, Hkv, m)``; ``|beta * k| < 1`` keeps the forget gate positive.
        v: values ``(B, T, Hkv, d)``, used as given.
        beta: step sizes ``(B, T, Hkv)`` in ``(0, 1)``.
        s0: initial slots ``(Hkv, d, m)`` (a learned parameter; columns normalised on use).
        chunk_size: tokens per chunk of the chunkwise backends.
        gates: ``"exact"`` (the recurrence) or ``"chunk"`` (gates frozen at each chunk start).
        orthogonal: write only the part of ``v`` orthogonal to the slot (False: additive write).
        normalize: retract slots to the unit sphere after each write (False: slots grow freely).
        initial_state: ``(B, Hkv, d, m)`` state to continue from instead of ``s0``.
        output_final_state: also return the state after the last token.
        backend: see the module docstring.
        gate_solver: how the chunkwise backends find the gates: ``"scan"`` (a sequential scan over tokens) or
            ``"fixed_point"`` (matmul passes, docs/math.md §4b: ``fixed_point_iters`` iterations from the frozen
            gates on 16-token sub-chunks, exact once they converge; for ``gates="chunk"`` the same frozen gates by
            the matmul kernels). Needs ``normalize=True``; the float64 recurrence stays the ground truth.
            ``"auto"``: the scan (see :func:`resolve_gate_solver`).
        fixed_point_iters: iterations of the fixed point for ``gates="exact"``.

    Returns:
        ``(o, final_state)``: ``o`` is ``(B, T, Hq, d)`` in the dtype of ``q``; ``final_state`` is ``(B, Hkv, d, m)``
        in float32 (float64 for float64 inputs), or None unless ``output_final_state``.
    """
    _check_shapes(q, k, v, beta, s0, initial_state)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise LatticeError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    backend = resolve_backend(backend, q.device, gates, q.dtype, chunk_size)
    _check_gate_solver(gate_solver, fixed_point_iters, backend, normalize)
    gate_solver = resolve_gate_solver(gate_solver)
    options = dict(
        gates=gates,
        orthogonal=orthogonal,
        normalize=normalize,
        chunk_size=chunk_size,
        gate_solver=gate_solver,
        fixed_point_iters=fixed_point_iters,
    )
    if backend == "triton":  # custom ops (kernels/triton_chunk.py): torch.compile keeps them in its graph
        from lattice_plugin.kernels.triton_chunk import chunk_lattice_triton

        state = _start_state(s0, initial_state, q, normalize)
        o, final_state = chunk_lattice_triton(q, k, v, beta, state, **options)
    else:
        o, final_state = _reference_lattice(q, k, v, beta, s0, initial_state, backend, **options)
    return o.to(q.dtype), (final_state if output_final_state else None)


def _start_state(s0: torch.Tensor, initial_state: torch.Tensor | None, q: torch.Tensor, normalize: bool):
    """The ``(B, Hkv, d, m)`` state the sequence starts from, in the compute dtype."""
    dtype = compute_dtype(q.dtype)
    if initial_state is None:  # the learned slots always start on the sphere (docs/math.md §2-3)
        return normalize_slots(s0.to(dtype)).unsqueeze(0).expand(q.shape[0], -1, -1, -1)
    # a state to continue from is used as given, apart from the retraction of the normalised variants
    return normalize_slots(initial_state.to(dtype)) if normalize else initial_state.to(dtype)


@torch.compiler.disable  # plain PyTorch loops over tokens or chunks: torch.compile would unroll them
def _reference_lattice(
    q,
    k,
    v,
    beta,
    s0,
    initial_state,
    backend,
    *,
    gates,
    orthogonal,
    normalize,
    chunk_size,
    gate_solver,
    fixed_point_iters,
):
    """The ``"recurrent"`` and ``"torch"`` backends of :func:`lattice_attention`: ``(o, final_state)``."""
    dtype = compute_dtype(q.dtype)
    state = _start_state(s0, initial_state, q, normalize)
    flags = dict(orthogonal=orthogonal, normalize=normalize)
    if backend == "recurrent":
        return recurrent_lattice(q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype), state, **flags)
    if gate_solver == "fixed_point" and gates == "exact":
        o, final_state, _ = fixed_point_lattice(q, k, v, beta, state, iters=fixed_point_iters, orthogonal=orthogonal)
        return o, final_state
    return chunk_lattice(q, k, v, beta, state, chunk_size=chunk_size, gates=gates, **flags)


@torch.compiler.disable
def lattice_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    *,
    orthogonal: bool = True,
    normalize: bool = True,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step (docs/math.md §5): write one token into the fixed-slot state, then read.

    q ``(B, Hq, m)``, k ``(B, Hkv, m)``, v ``(B, Hkv, d)``, beta ``(B, Hkv)``, state ``(B, Hkv, d, m)`` (float32).
    Returns ``(o (B, Hq, d) in the dtype of q, new_state)``; with ``inplace`` the new state is written into ``state``
    and ``state`` itself is returned. On CUDA (float32 contiguous state, no gradient needed) this is one fused
    Triton kernel; otherwise the token-by-token reference.
    """
    dtype = state.dtype
    tensors = (q, k, v, beta, state)
    if (
        state.is_cuda
        and dtype == torch.float32
        and state.is_contiguous()
        and triton_available()
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    ):
        from lattice_plugin.kernels.triton_step import lattice_step_triton

        return lattice_step_triton(
            q, k, v, beta, state, orthogonal=orthogonal, normalize=normalize, out_state=state if inplace else None
        )
    o, new_state = recurrent_step(
        state, q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype), orthogonal=orthogonal, normalize=normalize
    )
    if inplace:
        state.copy_(new_state)
        new_state = state
    return o.to(q.dtype), new_state
