"""Parallel first-use compilation of the chunkwise Triton kernels.

Triton compiles a kernel on its first launch, one kernel after another: a new (m, d, dtype, gates, flags) combination
paid the sum of seven builds, most of it the reverse sweep's (``bwd_scan_kernel``; Triton's Coalesce and
RemoveLayoutConversions passes over its unrolled 16-token body take nearly all of it). :func:`compile_once` instead
runs the forward and backward once on the real arguments with every launch of the chunkwise kernels turned into
a compile-only warm-up under Triton's ``AsyncCompileMode``: all builds run at once on a thread pool (Triton releases
the GIL in its passes) and land in each kernel's cache, so the first real call launches compiled kernels and the
wait is the slowest build, not the sum. Chunk counts are not specialised (``do_not_specialize=["NC"]``), so a new
sequence length needs no new build.
"""

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from triton.runtime.jit import JITFunction

from . import triton_chunk_bwd, triton_chunk_fwd, triton_gates_bwd, triton_gates_fwd

_compiled: set[tuple] = set()


@contextmanager
def _compile_only(*modules):
    """Inside: launches of the ``modules``' jit kernels compile (asynchronously) and do not run. Each function is
    patched once, however many of the modules import it (they share :mod:`triton_common`'s helpers)."""
    from triton.runtime._async_compile import AsyncCompileMode

    found = (f for module in modules for f in vars(module).values() if isinstance(f, JITFunction))
    kernels = list({id(f): f for f in found}.values())
    for kernel in kernels:
        kernel.run = (lambda run: lambda *args, grid, warmup, **kw: run(*args, grid=grid, warmup=True, **kw))(
            JITFunction.run.__get__(kernel)
        )
    try:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, AsyncCompileMode(pool):
            yield
    finally:
        for kernel in kernels:
            del kernel.run


def compile_once(q, k, v, beta, state, options: tuple, *, train: bool) -> None:
    """Build, all at once, every kernel that the forward op on these inputs with ``options`` (as
    ``triton_chunk._OPTIONS`` names them) and, with ``train``, its backward will launch; a no-op for combinations
    built before in this process."""
    compile_many([((q, k, v, beta, state), options)], train=train)


def compile_many(calls, *, train: bool | None = None) -> None:
    """:func:`compile_once` for several ``((q, k, v, beta, state), options)`` at once: one parallel batch of builds
    (e.g. both gate modes before a benchmark). ``train`` None: build the backward when an input requires grad."""
    from .triton_chunk import chunk_backward, chunk_forward

    todo = []
    for inputs, options in calls:
        q, v = inputs[0], inputs[2]
        grad = (torch.is_grad_enabled() and any(x.requires_grad for x in inputs)) if train is None else train
        # every shape but T (the kernels' blocking depends on the batch; T's chunk count is not specialised)
        key = (q.dtype, q.shape[0], q.shape[2], *v.shape[2:], q.shape[3], grad, q.device, options)
        if key not in _compiled and key not in [t[0] for t in todo] and os.environ.get("TRITON_INTERPRET") != "1":
            todo.append((key, [x.detach().contiguous() for x in inputs], options, grad))
    if not todo:
        return
    try:  # the stages directly, not the ops: inside an op autograd is off, and no graph is needed
        with _compile_only(triton_chunk_fwd, triton_chunk_bwd, triton_gates_fwd, triton_gates_bwd):
            for _, (q, k, v, beta, state), options, grad in todo:
                o, final, *saved = chunk_forward(q, k, v, beta, state.float(), *options)
                if grad:
                    chunk_backward(torch.zeros_like(o), None, q, k, v, beta, final, saved, *options)
    except Exception as error:  # only a speed-up: the kernels still build one by one on first launch
        warnings.warn(
            f"parallel build of the Lattice kernels failed, building on first launch instead: {error!r}", stacklevel=2
        )
    _compiled.update(t[0] for t in todo)
