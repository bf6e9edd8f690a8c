"""Kernel and decode benchmark behind ``lattice bench``: Lattice's Triton kernels beside SDPA (and FLA's chunk_gla
when the ``fla`` package is importable), every comparator measured in the same run on the same GPU.

Times are medians of CUDA-event timings (``triton.testing.do_bench``). Per-kernel times come from the CUDA
profiler over the same calls. Results go to JSON (device, versions, shapes, every number) and a PNG plot.
"""

import json
import platform
from pathlib import Path

import torch

from lattice_plugin.errors import LatticeError

MODEL_134M = dict(
    name="lattice-134m",
    vocab_size=32000,
    padded_vocab_size=32768,
    n_layer=12,
    n_embd=768,
    n_head=12,
    n_query_groups=12,
    head_size=64,
    rotary_percentage=1.0,
    parallel_residual=False,
    bias=False,
    norm_class_name="RMSNorm",
    norm_eps=1e-5,
    mlp_class_name="LLaMAMLP",
    intermediate_size=2048,
    lattice_slots=64,
    lattice_chunk_size=64,
)
"""The model both model-level benchmarks (``--train``, ``--model``) build: a 134M Llama shape, m = 64; only the
token mixer changes between comparators."""


def _do_bench(fn, *, rep_ms: int = 200) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def lattice_inputs(B, T, Hq, H, m, d, *, dtype=torch.bfloat16, device="cuda", requires_grad=False):
    """Inputs in the layer's ranges: codes in (-1, 1), beta in (0, 1), unit values, a random s0."""
    q = torch.randn(B, T, Hq, m, device=device, dtype=dtype)
    k = (torch.rand(B, T, H, m, device=device) * 2 - 1).to(dtype)
    v = torch.nn.functional.normalize(torch.randn(B, T, H, d, device=device), dim=-1).to(dtype)
    beta = torch.sigmoid(torch.randn(B, T, H, device=device)).to(dtype)
    s0 = torch.randn(H, d, m, device=device)
    tensors = [q, k, v, beta, s0]
    return [t.requires_grad_(requires_grad) for t in tensors]


def negative_gate_inputs(B, T, Hq, H, m, d, *, device="cpu"):
    """Inputs with slightly negative forget gates, as bf16 rounding makes them in training: a saturated beta and code
    round to exactly 1 and a unit value to a norm up to ~0.2% above 1, so a value along a slot gives ``beta k c > 1``.
    Every token writes slot 0; every 8th has beta = 1 and a value 1.002 times slot 0 (gates near -0.002). Float32
    ``(q, k, v, beta, s0)`` with a per-sequence ``s0`` (B, H, d, m); the kernel tests and the GPU check use them."""
    from lattice_plugin.kernels.gates import normalize_slots

    q, v, s0 = (
        torch.randn(B, T, Hq, m, device=device),
        torch.nn.functional.normalize(torch.randn(B, T, H, d, device=device), dim=-1),
        torch.randn(B, H, d, m, device=device),
    )
    k = torch.zeros(B, T, H, m, device=device)
    k[..., 0] = 1.0
    beta = torch.full((B, T, H), 0.5, device=device)
    beta[:, ::8] = 1.0
    v[:, ::8] = 1.002 * normalize_slots(s0)[..., 0].unsqueeze(1)
    return q, k, v, beta, s0


def vanishing_gate_inputs(B, T, Hq, H, m, d, *, every=16, device="cpu"):
    """Inputs with forget gates of exactly 0: slot 0 starts as the first basis vector and every ``every``-th token
    writes that same vector into it with ``beta k = 1``, so ``c = 1`` and ``1 - beta k c = 0`` in any precision (16-bit
    rounding can make such gates). Other tokens write small random steps. Float32 ``(q, k, v, beta, s0)`` with a
    per-sequence ``s0`` (B, H, d, m)."""
    q = torch.randn(B, T, Hq, m, device=device)
    v = torch.nn.functional.normalize(torch.randn(B, T, H, d, device=device), dim=-1)
    s0 = torch.randn(B, H, d, m, device=device)
    s0[..., 0] = 0.0
    s0[..., 0, 0] = 1.0
    k = torch.rand(B, T, H, m, device=device) * 0.5
    k[..., 0] = 0.0
    beta = torch.rand(B, T, H, device=device) * 0.5
    k[:, ::every] = 0.0
    k[:, ::every, :, 0] = 1.0
    beta[:, ::every] = 1.0
    v[:, ::every] = 0.0
    v[:, ::every, :, 0] = 1.0
    return q, k, v, beta, s0


def _fwd_and_train(forward, inputs, *, rep_ms):
    """Median ms of ``forward(*inputs)`` without autograd, and of forward + backward of all inputs."""
    with torch.no_grad():
        fwd = _do_bench(lambda: forward(*inputs), rep_ms=rep_ms)
    out = forward(*inputs)
    grad = torch.randn_like(out)
    train = _do_bench(lambda: torch.autograd.grad(forward(*inputs), inputs, grad), rep_ms=rep_ms)
    return fwd, train


def _kernel_times(fn, iters: int = 5) -> dict[str, float]:
    """Mean device ms per call of every CUDA kernel ``fn`` launches (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if device_us > 0:
            times[event.key[:80]] = device_us / 1000 / iters
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def bench_sequences(seq_lens, tokens, slots, heads, head_dim, *, rep_ms, chunk_gates: bool) -> tuple[list, dict]:
    """Forward and forward+backward of Lattice, SDPA (flash, causal) and chunk_gla, at B * T = tokens."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lattice_plugin.ops import lattice_attention

    try:
        from fla.ops.gla import chunk_gla
    except ImportError:
        chunk_gla = None
    rows, breakdown = [], {}

    def record(method, T, B, m, fwd, train, **extra):
        rows.append(dict(method=method, T=T, B=B, m=m, fwd_ms=fwd, fwd_bwd_ms=train, **extra))
        print(f"{method:>22} T={T:>6} B={B:>3} m={m!s:>4}  fwd {fwd:8.3f} ms  fwd+bwd {train:8.3f} ms", flush=True)

    for T in seq_lens:
        B = tokens // T
        q, k, v = (
            torch.randn(B, heads, T, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            fwd, train = _fwd_and_train(
                lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v], rep_ms=rep_ms
            )
        record("sdpa_flash_causal", T, B, None, fwd, train)
        del q, k, v
        for m in slots:
            inputs = lattice_inputs(B, T, heads, heads, m, head_dim, requires_grad=True)
            modes = ["exact", "chunk"] if chunk_gates else ["exact"]
            for gates in modes:

                def forward(q, k, v, beta, s0, gates=gates):
                    return lattice_attention(q, k, v, beta, s0, gates=gates, backend="triton")[0]

                fwd, train = _fwd_and_train(forward, inputs, rep_ms=rep_ms)
                record(f"lattice_{gates}", T, B, m, fwd, train)
                if gates == "exact":
                    grad = torch.randn(B, T, heads, head_dim, device="cuda", dtype=torch.bfloat16)
                    breakdown[f"T={T},m={m}"] = dict(
                        fwd=_kernel_times(lambda: forward(*inputs)),
                        fwd_bwd=_kernel_times(lambda: torch.autograd.grad(forward(*inputs), inputs, grad)),
                    )
            if chunk_gla is not None:
                g_in = [
                    torch.randn(B, T, heads, m, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    for _ in range(2)
                ]
                v_in = torch.randn(B, T, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                gate = F.logsigmoid(torch.randn(B, T, heads, m, device="cuda")).to(torch.bfloat16).requires_grad_()
                try:
                    fwd, train = _fwd_and_train(
                        lambda q, k, v, g: chunk_gla(q, k, v, g)[0], [*g_in, v_in, gate], rep_ms=rep_ms
                    )
                    record("fla_chunk_gla", T, B, m, fwd, train)
                except Exception as error:  # an incompatible fla build must not sink the run; it is reported
                    rows.append(dict(method="fla_chunk_gla", T=T, B=B, m=m, error=repr(error)[:300]))
                    print(f"fla chunk_gla failed: {error!r}"[:300], flush=True)
                del g_in, v_in, gate
            torch.cuda.empty_cache()
    return rows, breakdown


DECODE_STEPS = 16  # decode steps per timed call


def _per_step_ms(step, *, rep_ms) -> tuple[float, float]:
    """Median ms of one decode step: on the device (``DECODE_STEPS`` steps replayed from a CUDA graph: the kernels'
    own time, which is what depends on the context) and eager (back-to-back Python calls: launch overhead included,
    as in a generation loop without graphs)."""
    eager = _do_bench(lambda: [step() for _ in range(DECODE_STEPS)], rep_ms=rep_ms) / DECODE_STEPS
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(DECODE_STEPS):
            step()
    return _do_bench(graph.replay, rep_ms=rep_ms) / DECODE_STEPS, eager


def bench_decode(contexts, *, batch=8, q_heads=32, kv_heads=8, head_dim=128, slots=(64, 128), rep_ms) -> list:
    """One decode token: the fused Lattice step vs SDPA over a bf16 KV cache, with the cache bytes of each."""
    import torch.nn.functional as F

    from lattice_plugin.ops import lattice_step

    rows = []
    for m in slots:
        state = torch.nn.functional.normalize(torch.randn(batch, kv_heads, head_dim, m, device="cuda"), dim=-2)
        q = torch.randn(batch, q_heads, m, device="cuda", dtype=torch.bfloat16)
        k = (torch.rand(batch, kv_heads, m, device="cuda") * 2 - 1).to(torch.bfloat16)
        v = torch.nn.functional.normalize(torch.randn(batch, kv_heads, head_dim, device="cuda"), dim=-1).bfloat16()
        beta = torch.sigmoid(torch.randn(batch, kv_heads, device="cuda"))
        for ctx in contexts:  # the state's size does not depend on the context: each context is timed anyway
            with torch.no_grad():
                ms, eager = _per_step_ms(lambda: lattice_step(q, k, v, beta, state, inplace=True), rep_ms=rep_ms)
            rows.append(
                dict(method="lattice_step", m=m, context=ctx, ms=ms, eager_ms=eager, cache_bytes=state.numel() * 4)
            )
            print(
                f"{'lattice_step':>22} m={m:>4} ctx={ctx:>7}  {ms * 1000:8.1f} us  (eager {eager * 1000:.1f} us)",
                flush=True,
            )
    q = torch.randn(batch, q_heads, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    for ctx in contexts:
        kv = torch.randn(2, batch, kv_heads, ctx, head_dim, device="cuda", dtype=torch.bfloat16)
        ms, eager = _per_step_ms(
            lambda: F.scaled_dot_product_attention(q, kv[0], kv[1], enable_gqa=True), rep_ms=rep_ms
        )
        rows.append(
            dict(method="sdpa_kv_cache", m=None, context=ctx, ms=ms, eager_ms=eager, cache_bytes=kv.numel() * 2)
        )
        print(
            f"{'sdpa_kv_cache':>22}          ctx={ctx:>7}  {ms * 1000:8.1f} us  (eager {eager * 1000:.1f} us)",
            flush=True,
        )
    return rows


def summarize(sequence: list, decode: list) -> dict:
    """The issue's speed targets as measured ratios (>1 means Lattice is faster)."""

    def time_of(method, T=None, m=None, key="fwd_bwd_ms", context=None):
        for row in sequence if context is None else decode:
            if (
                row["method"] == method
                and (T is None or row.get("T") == T)
                and (m is None or row.get("m") == m)
                and (context is None or row.get("context") == context)
                and key in row
            ):
                return row[key]
        return None

    out = {}
    for row in sequence:
        if row["method"] == "lattice_exact" and row["m"] == 64:
            T = row["T"]
            gla = time_of("fla_chunk_gla", T, 64)
            out[f"T={T}: chunk_gla(K=64) / lattice(m=64) fwd+bwd"] = gla / row["fwd_bwd_ms"] if gla else None
            out[f"T={T}: sdpa / lattice(m=64) fwd+bwd"] = time_of("sdpa_flash_causal", T) / row["fwd_bwd_ms"]
    steps = [r for r in decode if r["method"] == "lattice_step" and r["m"] == 64]
    if steps:
        out["lattice decode max/min over contexts (m=64)"] = max(r["ms"] for r in steps) / min(r["ms"] for r in steps)
        last = max(r["context"] for r in steps)
        sdpa = time_of("sdpa_kv_cache", key="ms", context=last)
        step = time_of("lattice_step", m=64, key="ms", context=last)
        out[f"sdpa / lattice decode at {last}"] = sdpa / step if sdpa and step else None
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = sorted({(r["method"], r.get("m")) for r in results["sequence"] if "fwd_bwd_ms" in r}, key=str)
    for method, m in methods:
        rows = sorted(
            (r for r in results["sequence"] if r["method"] == method and r.get("m") == m and "fwd_bwd_ms" in r),
            key=lambda r: r["T"],
        )
        label = method if m is None else f"{method} m={m}"
        ax1.plot([r["T"] for r in rows], [r["fwd_bwd_ms"] for r in rows], marker="o", label=label)
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="T (B*T fixed)",
        ylabel="forward+backward ms",
        title=f"sequence mixing, {results['shapes']['heads']} heads, d={results['shapes']['head_dim']}",
    )
    ax1.legend(fontsize=7)
    for method, m in sorted({(r["method"], r.get("m")) for r in results["decode"]}, key=str):
        rows = sorted(
            (r for r in results["decode"] if r["method"] == method and r.get("m") == m), key=lambda r: r["context"]
        )
        label = method if m is None else f"{method} m={m}"
        ax2.plot([r["context"] for r in rows], [r["ms"] * 1000 for r in rows], marker="o", label=label)
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="context tokens",
        ylabel="us per decoded token",
        title="decode, B=8, 32 query / 8 kv heads",
    )
    ax2.legend(fontsize=7)
    fig.suptitle(results["device"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_bench(
    out_dir: Path,
    *,
    seq_lens=(2048, 8192, 32768),
    tokens: int = 32768,
    slots=(64, 128),
    heads: int = 16,
    head_dim: int = 128,
    decode_contexts=(2048, 32768, 131072),
    chunk_gates: bool = True,
    rep_ms: int = 200,
    name: str = "bench",
) -> dict:
    """Run everything on the current CUDA device; write ``<name>.json`` and ``<name>.png`` under ``out_dir``."""
    if not torch.cuda.is_available():
        raise LatticeError("lattice bench needs a CUDA GPU (the Triton kernels and SDPA's flash backend run there)")
    bad = [T for T in seq_lens if T <= 0 or tokens % T]
    if bad:
        raise LatticeError(f"every sequence length must divide --tokens {tokens}; these do not: {bad}")
    import triton

    try:
        import fla

        fla_version = getattr(fla, "__version__", "unknown")
    except ImportError:
        fla_version = None
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    sequence, breakdown = bench_sequences(
        seq_lens, tokens, slots, heads, head_dim, rep_ms=rep_ms, chunk_gates=chunk_gates
    )
    decode = bench_decode(decode_contexts, rep_ms=rep_ms)
    results = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        fla=fla_version,
        python=platform.python_version(),
        shapes=dict(
            tokens=tokens,
            seq_lens=list(seq_lens),
            slots=list(slots),
            heads=heads,
            head_dim=head_dim,
            dtype="bfloat16",
            decode=dict(batch=8, q_heads=32, kv_heads=8, head_dim=128),
        ),
        timing=f"median of CUDA-event timings (triton.testing.do_bench); decode: per step, {DECODE_STEPS} steps per "
        "timed call, ms from a CUDA graph (device time), eager_ms from Python calls (launch overhead included)",
        sequence=sequence,
        kernel_ms=breakdown,
        decode=decode,
        targets=summarize(sequence, decode),
    )
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2, default=lambda x: None if x != x else x))
    plot(results, out_dir / f"{name}.png")
    return results
