"""Model-level training benchmark behind ``lattice bench --train``: the training step of one litgpt model with
attention, Lattice (exact and chunk gates), the hybrid, and flash-linear-attention's peers in the same blocks.

Every row is the same 134M-parameter Llama-style shape (12 layers, 768 wide, 12 heads of 64, LLaMA MLP, m = 64)
with only the token mixer changed; a step is bf16 autocast, forward + backward + fused AdamW over ``tokens`` tokens
(``max(tokens, T)``: one sequence at least). Tokens/s come from CUDA-synchronised wall time over timed steps after
warm-up steps (the first of which compiles the kernels: its time is reported too); peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps. With ``compiled`` every model runs under
``torch.compile``, as ``litgpt pretrain`` runs it (the Lattice kernels as custom ops inside the graph). The op-level
table (``bench.bench_sequences``) and FLA's ``chunk_gated_delta_rule`` are measured in the same run. Results are rewritten after every measurement (a cut-off
run keeps what it measured) and plotted at the end.
"""

import json
import os
import platform
import time
from pathlib import Path

import torch

from lattice_plugin.bench import MODEL_134M
from lattice_plugin.errors import LatticeError

MIXERS = ("attention", "lattice_exact", "lattice_chunk", "hybrid", "fla_gla", "fla_deltanet")
FLA_AUTOTUNE_CONFIGS = 4  # configs each FLA autotuner keeps (its full sweeps did not finish within a device call)


def thin_configs(configs: list, max_configs: int) -> list:
    """At most ``max_configs`` of an autotuner's configs: those with 4 or 8 warps and 2 or 3 stages (all configs
    if none has), spread evenly."""
    preferred = [c for c in configs if c.num_warps in (4, 8) and c.num_stages in (2, 3)] or list(configs)
    step = max(1.0, len(preferred) / max_configs)
    return [preferred[int(i * step)] for i in range(min(max_configs, len(preferred)))]


def limit_fla_autotune(max_configs: int = FLA_AUTOTUNE_CONFIGS) -> None:
    """Thin every Triton autotuner created from now on to :func:`thin_configs` (call before importing ``fla``,
    whose autotuners are built at import). Autotuners that prune their own configs (``prune_configs_by``, e.g.
    GLA's backward by shared memory) keep them all: a thinned list can leave their pruning nothing."""
    from triton.runtime.autotuner import Autotuner

    if getattr(Autotuner.__init__, "thinned", False):
        return
    original = Autotuner.__init__

    def init(self, fn, arg_names, configs, *args, **kwargs):
        if configs and not kwargs.get("prune_configs_by"):
            configs = thin_configs(configs, max_configs)
        original(self, fn, arg_names, configs, *args, **kwargs)

    init.thinned = True
    Autotuner.__init__ = init


def build_model(mixer: str, T: int, device: torch.device, **shape) -> torch.nn.Module:
    """The 134M model (``shape`` overrides its fields) with ``mixer`` as its token mixer, float32 weights."""
    from lattice_plugin.fla_mixer import FLAMixer, fla_missing_reason
    from lattice_plugin.model import LatticeConfig, LatticeGPT

    layers = {"lattice_exact": "all", "lattice_chunk": "all", "hybrid": "attention_every:4"}.get(mixer, "none")
    gates = "chunk" if mixer == "lattice_chunk" else "exact"
    config = LatticeConfig(block_size=T, lattice_layers=layers, lattice_gates=gates, **{**MODEL_134M, **shape})
    with torch.device(device):
        model = LatticeGPT(config)
        if mixer.startswith("fla_"):  # FLA's layer in every block, keys as wide as Lattice's slots
            reason = fla_missing_reason()
            if reason is not None:
                raise LatticeError(f"the FLA comparators cannot run: {reason}")
            for index, block in enumerate(model.transformer.h):
                block.attn = FLAMixer(
                    mixer.removeprefix("fla_"),
                    config.n_embd,
                    config.n_head,
                    config.head_size,
                    config.lattice_slots,
                    index,
                )
    return model


def training_step(model: torch.nn.Module, B: int, T: int):
    """A closure running one bf16-autocast training step (forward, loss, backward, fused AdamW) on random tokens."""
    from litgpt.utils import chunked_cross_entropy

    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, model.config.vocab_size, (B, T + 1), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = chunked_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_training(
    mixer: str,
    T: int,
    tokens: int,
    *,
    warmup: int,
    steps: int,
    profile: bool = False,
    compiled: bool = False,
    device: torch.device = torch.device("cuda"),
    **shape,
) -> dict:
    """Tokens/s and peak memory (CUDA only) of ``mixer``'s training step at sequence length ``T``. ``host_ms`` is
    the time the host takes to issue one step with the GPU idle: near ``step_ms``, the step waits on Python and
    kernel launches (or on a host sync inside it), not on the GPU. ``compiled``: the model wrapped in
    ``torch.compile`` as ``litgpt pretrain`` wraps it (the first step then includes the compilation)."""
    from lattice_plugin.bench import _kernel_times

    B = max(1, tokens // T)
    torch.manual_seed(0)
    model = build_model(mixer, T, device, **shape)
    if compiled:
        model = torch.compile(model)
    step = training_step(model, B, T)
    started = time.perf_counter()
    step()
    _sync(device)
    first_s = time.perf_counter() - started
    for _ in range(warmup - 1):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - started
    started = time.perf_counter()  # one more step from an idle GPU: how long the host takes to issue it
    step()
    host_ms = 1000 * (time.perf_counter() - started)
    _sync(device)
    row = dict(
        method=mixer,
        T=T,
        B=B,
        compiled=compiled,
        tokens_per_step=B * T,
        steps=steps,
        step_ms=1000 * seconds / steps,
        host_ms=host_ms,
        tokens_per_s=B * T * steps / seconds,
        first_step_s=first_s,
        peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        params=sum(p.numel() for p in model.parameters()),
    )
    if profile and device.type == "cuda":
        row["kernel_ms"] = _kernel_times(step, iters=2)
    return row


def op_rows(T: int, tokens: int, *, rep_ms: int) -> tuple[list, dict]:
    """The op-level table at the model's mixer shape (12 heads, d = m = 64, bf16): SDPA, Lattice exact and chunk,
    chunk_gla (``bench.bench_sequences``) and chunk_gated_delta_rule."""
    from lattice_plugin.bench import _fwd_and_train, bench_sequences

    heads, d = MODEL_134M["n_head"], MODEL_134M["n_embd"] // MODEL_134M["n_head"]
    tokens = max(tokens, T)
    rows, breakdown = bench_sequences((T,), tokens, (64,), heads, d, rep_ms=rep_ms, chunk_gates=True)
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return rows, breakdown
    B = tokens // T
    shape = (B, T, heads, d)
    q, k = (torch.nn.functional.normalize(torch.randn(*shape, device="cuda"), dim=-1).bfloat16() for _ in range(2))
    v = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, heads, device="cuda"))
    beta = torch.rand(B, T, heads, device="cuda").bfloat16()
    inputs = [x.requires_grad_() for x in (q, k, v, g, beta)]
    row = dict(method="fla_chunk_gated_delta_rule", T=T, B=B, m=64)
    try:
        with torch.no_grad():
            from lattice_plugin.bench import _do_bench

            row["fwd_ms"] = _do_bench(lambda: chunk_gated_delta_rule(*inputs)[0], rep_ms=rep_ms)
        row["fwd_bwd_ms"] = _fwd_and_train(lambda *x: chunk_gated_delta_rule(*x)[0], inputs, rep_ms=rep_ms)[1]
    except Exception as error:  # FLA refuses some backward passes on some Triton versions: reported, not measured
        row["not_measured"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
    print(f"{row['method']:>22} T={T:>6} B={B:>3}  {row}", flush=True)
    rows.append(row)
    return rows, breakdown


def _write_json(results: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=lambda x: None if x != x else x))
    os.replace(tmp, path)


def plot(results: dict, path: Path) -> None:
    """Tokens/s and peak memory per mixer and sequence length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["model"] if "tokens_per_s" in r]
    mixers = [m for m in MIXERS if any(r["method"] == m for r in rows)]
    seq_lens = sorted({r["T"] for r in rows})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(mixers))
    for i, mixer in enumerate(mixers):
        for ax, key, scale in ((ax1, "tokens_per_s", 1e-3), (ax2, "peak_gib", 1.0)):
            xs = [
                j + i * width for j, T in enumerate(seq_lens) if any(r["method"] == mixer and r["T"] == T for r in rows)
            ]
            ys = [r[key] * scale for T in seq_lens for r in rows if r["method"] == mixer and r["T"] == T]
            ax.bar(xs, ys, width, label=mixer)
    for ax, label in ((ax1, "thousand tokens / s"), (ax2, "peak GiB")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(seq_lens))], [f"T={T}" for T in seq_lens])
        ax.set_ylabel(label)
    ax1.legend(fontsize=7)
    compiled = " under torch.compile" if results.get("setup", {}).get("compiled") else ""
    ax1.set_title(f"134M litgpt model, bf16 autocast training step{compiled}")
    fig.suptitle(results["device"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_train_bench(
    out_dir: Path,
    *,
    seq_lens=(2048, 8192, 32768),
    tokens: int = 16384,
    mixers=MIXERS,
    warmup: int = 3,
    steps: int = 5,
    ops: bool = True,
    rep_ms: int = 100,
    name: str = "train",
    compiled: bool = False,
) -> dict:
    """Run the model-level rows (then the op-level ones) on the current CUDA device; write ``<name>.json`` after
    every row and ``<name>.png`` at the end under ``out_dir``. ``compiled``: every model under ``torch.compile``, as
    ``litgpt pretrain`` runs it."""
    if not torch.cuda.is_available():
        raise LatticeError("lattice bench --train needs a CUDA GPU")
    unknown = [m for m in mixers if m not in MIXERS]
    if unknown:
        raise LatticeError(f"unknown mixers {unknown}; choose from {', '.join(MIXERS)}")
    if any(T <= 0 for T in seq_lens) or tokens <= 0:
        raise LatticeError("sequence lengths and --tokens must be positive")
    import triton

    limit_fla_autotune()
    try:
        import fla

        fla_version = getattr(fla, "__version__", "unknown")
    except ImportError:
        fla_version = None
    mixers = [m for m in mixers if fla_version or not m.startswith("fla_")]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    results = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        fla=fla_version,
        python=platform.python_version(),
        model=[],
        ops=[],
        op_kernel_ms={},
        setup=dict(
            model=MODEL_134M,
            tokens_per_step=tokens,
            warmup_steps=warmup,
            timed_steps=steps,
            step="bf16 autocast, forward + chunked cross-entropy + backward + fused AdamW (float32 weights)",
            compiled=compiled,
            fla_autotune=f"each FLA autotuner limited to {FLA_AUTOTUNE_CONFIGS} configs (4/8 warps, 2/3 "
            "stages preferred)",
            op_timing="median of CUDA-event timings (triton.testing.do_bench)",
        ),
    )
    for T in seq_lens:
        for mixer in mixers:
            try:
                row = measure_training(
                    mixer,
                    T,
                    tokens,
                    warmup=warmup,
                    steps=steps,
                    profile=mixer in ("attention", "lattice_exact"),
                    compiled=compiled,
                )
            except Exception as error:  # an OOM or a peer's failure is a result to report, not a reason to stop
                row = dict(method=mixer, T=T, error=f"{type(error).__name__}: {str(error).strip()[:300]}")
            torch.cuda.empty_cache()
            results["model"].append(row)
            print({k: v for k, v in row.items() if k != "kernel_ms"}, flush=True)
            _write_json(results, path)
    if ops:
        for T in seq_lens:
            rows, breakdown = op_rows(T, tokens, rep_ms=rep_ms)
            results["ops"] += rows
            results["op_kernel_ms"].update(breakdown)
            torch.cuda.empty_cache()
            _write_json(results, path)
    plot(results, out_dir / f"{name}.png")
    return results
