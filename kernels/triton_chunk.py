"""Chunkwise Lattice over sequences in Triton (docs/math.md §4): host code and autograd of the exact chunkwise
forward and backward; :func:`chunk_lattice_triton` is the entry point.

The stages (kernels in :mod:`triton_chunk_fwd` and :mod:`triton_chunk_bwd`, helpers in :mod:`triton_common`; the
reasoning and the measured history in docs/design.md):

- forward (:func:`lattice_fwd`): the sub-chunk Gram matrix ``v_t . v_j`` (``fwd_gram_kernel``); the sequential
  gate scan, which stores ``c`` per token and the state at every chunk start (``fwd_scan_kernel``, or the matmul
  gate pass of :mod:`triton_gates_fwd` for ``gate_solver="fixed_point"``); the outputs, parallel over chunks
  (``fwd_read_kernel``).
- backward (:func:`lattice_bwd`): ``do_t . v_j`` (``fwd_gram_kernel``); dq, parallel over chunks
  (``bwd_dq_kernel``); the reverse sweep, which gives ``dc``, d gamma, d ||v||^2 per token and the state gradient
  at every chunk end (``bwd_scan_kernel``, or :mod:`triton_gates_bwd`); dv's gate term (``fwd_read_kernel``,
  exclusive) and its write term (``bwd_dv_kernel``), both parallel over chunks.

Slots are independent, so only the scans are sequential (one program per batch, kv head and block of slots); every
d-sized product is parallel over chunks, re-walking a chunk from its stored start state with the gates recomputed
from ``c`` (never stored per step). The sweeps walk whole 16-token sub-chunks: a ragged ``T`` is padded with
identity tokens (``beta = 0``). Gate arithmetic and states are float32 whatever the input dtype; matmuls with a
float32 operand use tf32 for 16-bit inputs and full float32 ("ieee") for float32 inputs.
"""

import torch
import triton

from .triton_chunk_bwd import bwd_dq_kernel, bwd_dv_kernel, bwd_scan_kernel
from .triton_chunk_fwd import fwd_gram_kernel, fwd_read_kernel, fwd_scan_kernel
from .triton_common import BC, _pow2, _sm_count

CS_EXACT = 64  # tokens between stored states for gates="exact" (a free choice: the math does not depend on it)
BV_READ = 128  # value columns per program of the read pass (64 when m > 64): the gates are computed per program
BV_DV = 128  # value columns per program of the dv pass (64 when m > 64): the gates and M_q are computed per program
PAR_WARPS = 4  # warps per program of the parallel passes (read, dq, dv; 8 measured slower, docs/design.md, version 6b)
BK_DQ = 64  # slots per program of the dq pass
# The sequential sweeps (docs/design.md, versions 6 and 8). 16-bit inputs: one warp per program (layout changes then
# need no barrier between warps); the reverse sweep on BM_SCAN_SPLIT slots per program (fewer live registers at one
# warp, twice the programs at small batch); the forward sweep too while BM_SCAN-slot programs would leave SMs idle
# (at most FWD_SPLIT_PER_SM per SM), else on BM_SCAN (split, it repeats its loads and loses at B=16).
# float32 inputs: BM_SCAN slots on SCAN_WARPS warps (their full-precision matmuls spill ~1 KB at one warp).
BM_SCAN = 16
BM_SCAN_SPLIT = 8
FWD_SPLIT_PER_SM = 2
FWD_SCAN_WARPS = 1
BWD_SCAN_WARPS = 1
SCAN_WARPS = 2
BWD_SCALAR_ROWS = False  # the reverse sweep's Gram rows as scalar loads (docs/design.md, version 12)


def _sub_gram(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(B, T, Hx, BC)`` float32: each token's dot products with the values of its sub-chunk."""
    B, T, HX, D = x.shape
    out = torch.empty(B, T, HX, BC, device=x.device, dtype=torch.float32)
    fwd_gram_kernel[(triton.cdiv(T, BC), B * HX)](
        x, v, out, T, HX, v.shape[2], D, BC, _pow2(D), "ieee" if x.dtype == torch.float32 else "tf32", num_warps=4
    )
    return out


class _Setup:
    """Shapes and compile-time switches shared by the forward and the backward."""

    def __init__(
        self,
        q,
        v,
        *,
        chunk_size: int,
        exact: bool,
        orthogonal: bool,
        normalize: bool,
        gate_solver: str = "scan",
        fixed_point_iters: int = 0,
    ):
        self.B, self.T, self.HQ, self.M = q.shape
        self.H, self.D = v.shape[2], v.shape[3]
        self.CS = CS_EXACT if exact else chunk_size
        self.NC = triton.cdiv(self.T, self.CS)
        self.BD, self.BK = _pow2(self.D), _pow2(self.M)
        self.prec = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 matmuls for 16-bit inputs
        sixteen_bit = self.prec == "tf32"
        full_grid = self.B * self.H * triton.cdiv(self.M, BM_SCAN)
        split_fwd = sixteen_bit and full_grid <= FWD_SPLIT_PER_SM * _sm_count(q.device)
        self.bm_fwd = BM_SCAN_SPLIT if split_fwd else BM_SCAN
        self.bm_bwd = BM_SCAN_SPLIT if sixteen_bit else BM_SCAN
        self.warps_fwd = FWD_SCAN_WARPS if sixteen_bit else SCAN_WARPS
        self.warps_bwd = BWD_SCAN_WARPS if sixteen_bit else SCAN_WARPS
        self.flags = dict(ORTHOGONAL=orthogonal, NORMALIZE=normalize, TRACK_NS=orthogonal and not normalize)
        self.exact = exact
        self.gate_solver, self.fixed_point_iters = gate_solver, fixed_point_iters

    def read_bv(self) -> int:
        """Value columns per program of the read pass: all of them up to 128 (m <= 64), else 64."""
        return min(BV_READ if self.BK <= 64 else 64, self.BD)

    def new(self, *shape, dtype=torch.float32, like):
        return torch.empty(*shape, device=like.device, dtype=dtype)


def lattice_fwd(q, k, v, beta, state, setup: _Setup):
    """Forward: ``(o, final_state, saved)`` where ``saved`` holds what the backward re-reads."""
    s = setup
    gram = _sub_gram(v, v)
    if s.gate_solver == "fixed_point":  # the gate pass by matmuls (kernels/triton_gates_fwd.py); normalised only
        from .triton_gates_fwd import matmul_gate_pass

        c, states, final, norms, _ = matmul_gate_pass(
            k,
            v,
            beta,
            state,
            chunk_size=s.CS,
            exact=s.exact,
            iters=s.fixed_point_iters,
            orthogonal=s.flags["ORTHOGONAL"],
            prec=s.prec,
        )
        ns = c
        extra = (norms, final)  # the matmul reverse pass re-reads them
    else:
        extra = ()
        c = s.new(s.B, s.T, s.H, s.M, like=q)
        ns = s.new(s.B, s.T, s.H, s.M, like=q) if s.flags["TRACK_NS"] else c
        states = s.new(s.B, s.H, s.NC, s.D, s.M, like=q)
        final = s.new(s.B, s.H, s.D, s.M, like=q)
        n_mb = triton.cdiv(s.M, s.bm_fwd)
        scratch = s.new(s.B * s.H * n_mb * s.BD * s.bm_fwd, like=q) if not s.exact else c
        fwd_scan_kernel[(n_mb, s.B * s.H)](
            k,
            v,
            beta,
            state,
            gram,
            c,
            ns,
            states,
            final,
            scratch,
            s.T,
            s.NC,
            s.H,
            s.M,
            s.D,
            BC,
            s.CS,
            s.bm_fwd,
            s.BD,
            s.exact,
            PREC=s.prec,
            **s.flags,
            num_warps=s.warps_fwd,
        )
    o = torch.empty(s.B, s.T, s.HQ, s.D, device=q.device, dtype=q.dtype)
    bv = s.read_bv()
    fwd_read_kernel[(triton.cdiv(s.D, bv), s.NC, s.B * s.HQ)](
        q,
        k,
        v,
        beta,
        gram,
        c,
        ns,
        states,
        o,
        s.T,
        s.NC,
        s.HQ,
        s.H,
        s.M,
        s.D,
        BC,
        s.CS,
        s.BK,
        bv,
        False,
        False,
        PREC=s.prec,
        **s.flags,
        num_warps=PAR_WARPS,
    )
    return o, final, (gram, c, ns, states, *extra)


def lattice_bwd(do, d_final, q, k, v, beta, saved, setup: _Setup):
    """Backward: ``(dq, dk, dv, dbeta, d_state)`` for the inputs of :func:`lattice_fwd`."""
    s = setup
    gram, c, ns, states, *gate_pass = saved
    hgram = _sub_gram(do, v)
    matmul_reverse = s.gate_solver == "fixed_point"  # the reverse pass by matmuls: kernels/triton_gates_bwd.py
    dq = torch.empty(q.shape, device=q.device, dtype=torch.float32) if matmul_reverse else torch.empty_like(q)
    bk = min(BK_DQ, s.BK)
    bwd_dq_kernel[(triton.cdiv(s.M, bk), s.NC, s.B * s.HQ)](
        do,
        k,
        v,
        beta,
        gram,
        hgram,
        c,
        ns,
        states,
        dq,
        s.T,
        s.NC,
        s.HQ,
        s.H,
        s.M,
        s.D,
        BC,
        s.CS,
        bk,
        s.BD,
        PREC=s.prec,
        **s.flags,
        num_warps=PAR_WARPS,
    )
    if matmul_reverse:
        from .triton_gates_bwd import matmul_reverse_pass

        qdq = (q.float() * dq).view(s.B, s.T, s.H, s.HQ // s.H, s.M).sum(3)
        dc, dgamma, dvv, g_end, d_init = matmul_reverse_pass(
            q,
            do,
            k,
            v,
            beta,
            c,
            qdq,
            states,
            *gate_pass,
            d_final,
            chunk_size=s.CS,
            exact=s.exact,
            iters=s.fixed_point_iters,
            orthogonal=s.flags["ORTHOGONAL"],
            prec=s.prec,
        )
        dq = dq.to(q.dtype)
    else:
        dc = s.new(s.B, s.T, s.H, s.M, like=q)
        dgamma = torch.empty_like(dc)
        dvv = torch.empty_like(dc)
        g_end = torch.empty_like(states)
        d_init = s.new(s.B, s.H, s.D, s.M, like=q)
        n_mb = triton.cdiv(s.M, s.bm_bwd)
        scratch = s.new(s.B * s.H * n_mb * (s.CS // BC) * s.BD * s.bm_bwd, like=q)
        bwd_scan_kernel[(n_mb, s.B * s.H)](
            q,
            do,
            k,
            v,
            beta,
            gram,
            hgram,
            c,
            ns,
            states,
            d_final if d_final is not None else dc,
            scratch,
            dc,
            dgamma,
            dvv,
            g_end,
            d_init,
            s.T,
            s.NC,
            s.HQ,
            s.H,
            s.M,
            s.D,
            BC,
            s.CS,
            s.bm_bwd,
            s.BD,
            s.exact,
            HAS_DFINAL=d_final is not None,
            PREC=s.prec,
            SCALAR_ROWS=BWD_SCALAR_ROWS,
            **s.flags,
            num_warps=s.warps_bwd,
        )
    dv = s.new(s.B, s.T, s.H, s.D, like=q)
    bv = s.read_bv()
    fwd_read_kernel[(triton.cdiv(s.D, bv), s.NC, s.B * s.H)](
        dc,
        k,
        v,
        beta,
        gram,
        c,
        ns,
        states,
        dv,
        s.T,
        s.NC,
        s.H,
        s.H,
        s.M,
        s.D,
        BC,
        s.CS,
        s.BK,
        bv,
        True,
        not s.exact,
        PREC=s.prec,
        **s.flags,
        num_warps=PAR_WARPS,
    )
    bv = min(BV_DV if s.BK <= 64 else 64, s.BD)
    bwd_dv_kernel[(triton.cdiv(s.D, bv), s.NC, s.B * s.H)](
        q,
        do,
        k,
        v,
        beta,
        gram,
        c,
        ns,
        dc,
        dvv,
        g_end,
        dv,
        s.T,
        s.NC,
        s.HQ,
        s.H,
        s.M,
        s.D,
        BC,
        s.CS,
        s.BK,
        bv,
        s.exact,
        PREC=s.prec,
        **s.flags,
        num_warps=PAR_WARPS,
    )
    dk = (dgamma * beta.unsqueeze(-1)).to(k.dtype)
    dbeta = (dgamma * k).sum(-1).to(beta.dtype)
    return dq, dk, dv.to(v.dtype), dbeta, d_init


def _pad_tokens(x: torch.Tensor, pad: int) -> torch.Tensor:
    """``x`` with ``pad`` zero tokens appended along dim 1 (no copy when ``pad == 0``)."""
    if not pad:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)


# The forward and backward are registered as PyTorch custom ops (torch.library), so that torch.compile (which
# litgpt's pretrain wraps every model in) keeps a model with Lattice layers in one graph: the ops are opaque to it,
# their fake versions below give it the output shapes, and the autograd formula ties the two together. Their
# inputs are the unpadded tensors; each op pads a ragged T itself (padding tokens have ``beta = 0``: they leave
# every slot unchanged and receive no gradient).


def _saved_layout(track_ns: bool, gate_solver: str) -> tuple[str, ...]:
    """Names of the tensors the forward op returns after ``o`` and ``final`` for the backward (none aliasing
    another output: ``ns`` is ``c`` unless tracked, the fixed point's ``final`` is the op's ``final``)."""
    return (
        ("gram", "c", "states") + (("ns",) if track_ns else ()) + (("norms",) if gate_solver == "fixed_point" else ())
    )


_OPTIONS = ("chunk_size", "exact", "orthogonal", "normalize", "gate_solver", "fixed_point_iters")


def _setup(q: torch.Tensor, v: torch.Tensor, options: tuple) -> _Setup:
    return _Setup(q, v, **dict(zip(_OPTIONS, options)))


def chunk_forward(q, k, v, beta, state, *options) -> list[torch.Tensor]:
    """``[o, final, *saved]`` (``saved`` as :func:`_saved_layout` names it) for unpadded inputs and the options
    ``_OPTIONS`` names; the body of the forward op."""
    T, pad = q.shape[1], -q.shape[1] % BC
    q, k, v, beta = (_pad_tokens(x, pad) for x in (q, k, v, beta))
    setup = _setup(q, v, options)
    o, final, (gram, c, ns, states, *extra) = lattice_fwd(q, k, v, beta, state, setup)
    saved = dict(gram=gram, c=c, states=states, ns=ns, norms=extra[0] if extra else None)
    layout = _saved_layout(setup.flags["TRACK_NS"], setup.gate_solver)
    return [o[:, :T].contiguous() if pad else o, final, *(saved[name] for name in layout)]


def chunk_backward(do, d_final, q, k, v, beta, final, saved, *options) -> list[torch.Tensor]:
    """``[dq, dk, dv, dbeta, d_state]`` from the gradients of ``o`` and ``final`` (None: unused) and what
    :func:`chunk_forward` returned; the body of the backward op."""
    T, pad = q.shape[1], -q.shape[1] % BC
    q, k, v, beta, do = (_pad_tokens(x, pad) for x in (q, k, v, beta, do))
    setup = _setup(q, v, options)
    named = dict(zip(_saved_layout(setup.flags["TRACK_NS"], setup.gate_solver), saved))
    extra = (named["norms"], final) if setup.gate_solver == "fixed_point" else ()
    bwd_saved = (named["gram"], named["c"], named.get("ns", named["c"]), named["states"], *extra)
    grads = lattice_bwd(do, d_final, q, k, v, beta, bwd_saved, setup)
    return [x[:, :T].contiguous() for x in grads[:4]] + [grads[4]] if pad else list(grads)


@torch.library.custom_op("lattice::chunk_fwd", mutates_args=())
def _chunk_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    chunk_size: int,
    exact: bool,
    orthogonal: bool,
    normalize: bool,
    gate_solver: str,
    fixed_point_iters: int,
    build_backward: bool,
) -> list[torch.Tensor]:
    """:func:`chunk_forward`; ``build_backward``: the first call of a new shape also builds the backward's kernels
    (an input needs grad)."""
    options = (chunk_size, exact, orthogonal, normalize, gate_solver, fixed_point_iters)
    return _build_and_forward(q, k, v, beta, state, options, build_backward)


def _build_and_forward(q, k, v, beta, state, options: tuple, build_backward: bool) -> list[torch.Tensor]:
    from .triton_compile import compile_once

    compile_once(q, k, v, beta, state, options, train=build_backward)
    return chunk_forward(q, k, v, beta, state, *options)


@_chunk_fwd_op.register_fake
def _chunk_fwd_fake(
    q, k, v, beta, state, chunk_size, exact, orthogonal, normalize, gate_solver, fixed_point_iters, build_backward
):
    (B, T, HQ, M), (H, D) = q.shape, v.shape[2:]
    TP = T + -T % BC
    NC = triton.cdiv(TP, CS_EXACT if exact else chunk_size)
    f32 = dict(dtype=torch.float32)
    shapes = dict(gram=(B, TP, H, BC), c=(B, TP, H, M), states=(B, H, NC, D, M), ns=(B, TP, H, M), norms=(B, H, NC, M))
    layout = _saved_layout(orthogonal and not normalize, gate_solver)
    return [q.new_empty(B, T, HQ, D), q.new_empty(B, H, D, M, **f32), *(q.new_empty(shapes[n], **f32) for n in layout)]


@torch.library.custom_op("lattice::chunk_bwd", mutates_args=())
def _chunk_bwd_op(
    do: torch.Tensor,
    d_final: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    final: torch.Tensor,
    saved: list[torch.Tensor],
    chunk_size: int,
    exact: bool,
    orthogonal: bool,
    normalize: bool,
    gate_solver: str,
    fixed_point_iters: int,
) -> list[torch.Tensor]:
    """:func:`chunk_backward`."""
    options = (chunk_size, exact, orthogonal, normalize, gate_solver, fixed_point_iters)
    return chunk_backward(do, d_final, q, k, v, beta, final, saved, *options)


@_chunk_bwd_op.register_fake
def _chunk_bwd_fake(do, d_final, q, k, v, beta, final, saved, *options):
    return [
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(beta),
        torch.empty_like(final),
    ]


def _save_for_backward(ctx, inputs, output, options: tuple) -> None:
    ctx.options = options
    ctx.set_materialize_grads(False)  # None, not zeros, for the outputs nothing used (``final`` in training)
    ctx.save_for_backward(*inputs[:4], *output[1:])


def _input_grads(ctx, do, d_final, backward) -> list[torch.Tensor]:
    """``[dq, dk, dv, dbeta, d_state]`` by ``backward`` (the op, or its body) from what the forward saved."""
    q, k, v, beta, final, *saved = ctx.saved_tensors
    if do is None:
        do = torch.zeros(*q.shape[:3], v.shape[3], device=q.device, dtype=q.dtype)
    d_final = None if d_final is None else d_final.contiguous()
    return backward(do.contiguous(), d_final, q, k, v, beta, final, saved, *ctx.options)


_NO_GRADS = (None,) * (len(_OPTIONS) + 1)  # for the options and build_backward
_chunk_fwd_op.register_autograd(
    lambda ctx, grads: (*_input_grads(ctx, grads[0], grads[1], _chunk_bwd_op), *_NO_GRADS),
    setup_context=lambda ctx, inputs, output: _save_for_backward(ctx, inputs, output, inputs[5 : 5 + len(_OPTIONS)]),
)


class EagerLatticeFunction(torch.autograd.Function):
    """The ops' bodies for eager runs, without the custom ops' dispatch, which costs host time: a probe op of the
    same signature took 0.21 ms a forward and backward against 0.06 ms as an autograd.Function (this project's CPU
    machine), about 2 ms a step over 12 layers. Under ``torch.compile`` the ops run instead."""

    @staticmethod
    def forward(ctx, q, k, v, beta, state, *options_and_build):
        *options, build_backward = options_and_build
        output = _build_and_forward(q, k, v, beta, state, tuple(options), build_backward)
        _save_for_backward(ctx, (q, k, v, beta), output, tuple(options))
        ctx.mark_non_differentiable(*output[2:])
        return tuple(output)

    @staticmethod
    def backward(ctx, do, d_final, *_):
        return (*_input_grads(ctx, do, d_final, chunk_backward), *_NO_GRADS)


def chunk_lattice_triton(
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
    gate_solver: str = "scan",
    fixed_point_iters: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``chunk.chunk_lattice`` with a float32 ``state``: ``(o in q.dtype, final_state float32)``.

    With ``gates="exact"`` the result does not depend on ``chunk_size`` (the kernels pick their own blocking);
    with ``gates="chunk"`` it is the frozen-gate span and must be a multiple of 16.
    ``gate_solver``: ``"scan"``, the per-token sweeps forward and backward, or ``"fixed_point"``, the matmul passes
    of :mod:`triton_gates_fwd` and :mod:`triton_gates_bwd` (``fixed_point_iters`` iterations of docs/math.md §4b
    for exact gates, forward and adjoint; frozen gates need none; ``normalize=True`` only).
    """
    exact = gates == "exact"
    if not exact and chunk_size % BC:
        raise ValueError(f"the Triton backend needs chunk_size to be a multiple of {BC} for gates='chunk'")
    if gate_solver == "fixed_point" and not normalize:
        raise ValueError("gate_solver='fixed_point' needs normalize=True (positive forget gates)")
    inputs = (q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous(), state.contiguous().float())
    build_backward = torch.is_grad_enabled() and any(x.requires_grad for x in inputs)
    options = (chunk_size, exact, orthogonal, normalize, gate_solver, fixed_point_iters)  # as _OPTIONS names them
    forward = _chunk_fwd_op if torch.compiler.is_compiling() else EagerLatticeFunction.apply
    o, final, *_ = forward(*inputs, *options, build_backward)
    return o, final
