"""Build time of every Triton kernel a Lattice forward + backward launches, without a GPU (README, "First use of a
shape"): a stand-in driver reports an sm_90 target, and Triton's jit cache hook compiles each launch's kernel with
``triton.compile`` and times it instead of launching. ``MLIR_ENABLE_TIMING=1`` adds Triton's per-pass times.

    SHAPE=B,T,H,m,d DT=bfloat16 GATES=exact [ORTHOGONAL=0] [NORMALIZE=0] ONLY=bwd_scan python bench/compile_offline.py

``SM_COUNT`` (default 132, an H100 SXM) picks the blocking the kernels choose there; with ``TRITON_CACHE_DIR`` set
the builds land there (else in an empty temporary cache). Such a folder carried to an H100 was not used there: every
build missed it (bench/results/train_gpu_h100.json, "compile"), so it is no ahead-of-time cache.
"""

import os
import tempfile
import time

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

TARGET = GPUTarget("cuda", 90, 32)


class OfflineDriver:
    """Just enough of a CUDA driver for Triton to bind arguments and pick the target."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


def build_times(only: str | None = None) -> list:
    """Install the stand-in driver and a hook that builds and times each launched kernel (names containing one of
    the comma-separated ``only``, or all); returns the list the hook appends ``(kernel, seconds)`` to."""
    driver.set_active(OfflineDriver())
    knobs.cache.dir = os.environ.get("TRITON_CACHE_DIR") or tempfile.mkdtemp(prefix="triton-offline-")
    times = []

    def hook(*, fn, compile, **_):
        if only and not any(name in fn.name for name in only.split(",")):
            return True
        source = triton.compiler.ASTSource(
            fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0]
        )
        started = time.perf_counter()
        triton.compile(
            source, target=TARGET, options=dict(num_warps=compile["num_warps"], num_stages=compile["num_stages"])
        )
        times.append((fn.name, round(time.perf_counter() - started, 1)))
        print(f"{fn.name}: {times[-1][1]} s", flush=True)
        return True  # built and timed: skip the launch

    knobs.runtime.jit_cache_hook = hook
    return times


if __name__ == "__main__":
    times = build_times(os.environ.get("ONLY"))
    from lattice_plugin.kernels import triton_chunk
    from lattice_plugin.kernels.triton_chunk import chunk_lattice_triton

    triton_chunk._sm_count = lambda device: int(os.environ.get("SM_COUNT", 132))

    B, T, H, m, d = (int(x) for x in os.environ.get("SHAPE", "8,2048,12,64,64").split(","))
    dtype = getattr(torch, os.environ.get("DT", "bfloat16"))
    q, k = (torch.rand(B, T, H, m, dtype=dtype, requires_grad=True) for _ in range(2))
    v = torch.rand(B, T, H, d, dtype=dtype, requires_grad=True)
    beta = torch.rand(B, T, H, dtype=dtype, requires_grad=True)
    state = torch.rand(H, d, m, requires_grad=True).unsqueeze(0).expand(B, -1, -1, -1)  # as ops.lattice_attention
    gates = os.environ.get("GATES", "exact")
    solver = dict(gate_solver="fixed_point", fixed_point_iters=4) if gates == "chunk" else {}  # ops' "auto"
    flags = {f: os.environ.get(f.upper(), "1") == "1" for f in ("orthogonal", "normalize")}  # the ablations: 0
    o, final = chunk_lattice_triton(q, k, v, beta, state, gates=gates, **solver, **flags)
    (o.float().sum() + final.sum()).backward()
    print("total", round(sum(t for _, t in times), 1), "s:", times)
