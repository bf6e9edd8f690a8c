"""One device call: the matmul gate pass (kernels/triton_gates_fwd.py: frozen chunk gates, and exact gates by the
fixed-point iteration of docs/math.md §4b) beside the per-token sweeps of kernels/triton_chunk.py and FLA's chunk_gla.

1. Correctness on the GPU, float32 and bfloat16 inputs: every method's outputs, final state and gradients (q, k, v,
   beta, s0) against float64 references (exact gates: the token-by-token recurrence; chunk gates: kernels/chunk.py),
   with the fixed point at K = 2, 4, 6, 16 and its residual ``max |c^(K) - c^(K-1)|``, for softmax codes (the
   layer's default) and codes uniform in (-1, 1) (``lattice bench``'s inputs: stronger gates).
2. Timings (CUDA-event medians, triton.testing.do_bench), bf16, H=16, m=64, d=128, at B x T = 16x2048, 4x8192,
   1x32768: forward and forward+backward of each method (the backward is triton_chunk's for every Lattice method),
   the fixed point's residual on the timed inputs, the per-kernel forward profile at the longest shape, and
   chunk_gla (K=64, V=128) with its autotuning limited to a few configurations so that it finishes.

Kernels compile first in worker processes (Triton's on-disk cache), so the timed process only loads them.
Writes ``$OUT/kernels_gla_<card>.json`` and ``.png``. GLA_DRY=1 rehearses it all on the CPU (interpreter, tiny
shapes, no workers, no chunk_gla).
"""

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DRY = bool(os.environ.get("GLA_DRY"))
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

DEV = "cpu" if DRY else "cuda"
OUT = Path(os.environ.get("OUT") or "/tmp/out")
BUDGET_S = float(os.environ.get("GLA_BUDGET_S") or 270)  # past this wall time, remaining timings are skipped
TOL = {"float32": 1e-4, "bfloat16": 2e-2}
HEADS, M, D = (2, 16, 16) if DRY else (16, 64, 128)
SHAPES = [(2, 48), (1, 80)] if DRY else [(16, 2048), (4, 8192), (1, 32768)]
CHECK_T = 45 if DRY else 300  # ragged: not a multiple of 16 or 64
ITERS = (2, 4, 6)
METHODS = {
    "exact_scan": dict(gates="exact"),
    **{f"exact_fp{K}": dict(gates="exact", gate_solver="fixed_point", fixed_point_iters=K) for K in ITERS},
    "chunk_scan": dict(gates="chunk"),
    "chunk_matmul": dict(gates="chunk", gate_solver="fixed_point"),
}
# other blockings of the matmul passes (module attributes of kernels/triton_gates_fwd.py), bf16 only
VARIANTS = {
    "exact_fp4_bm64": dict(METHODS["exact_fp4"], attrs=dict(BM_MAX=64)),
    "chunk_matmul_bm64": dict(METHODS["chunk_matmul"], attrs=dict(BM_MAX=64)),
    "chunk_matmul_bt32": dict(METHODS["chunk_matmul"], attrs=dict(BT_FROZEN=32)),
}
CONVERGED = {"exact_fp16": dict(gates="exact", gate_solver="fixed_point", fixed_point_iters=16)}
ALL = {**METHODS, **VARIANTS, **CONVERGED}
GLA_CONFIGS = 4  # autotuning configurations kept per chunk_gla kernel
STARTED = time.time()


def sync():
    if not DRY:
        torch.cuda.synchronize()


def elapsed() -> float:
    return time.time() - STARTED


def bench(fn, rep=100) -> float:
    if DRY:
        started = time.time()
        fn()
        return (time.time() - started) * 1e3
    from lattice_plugin.bench import _do_bench

    return _do_bench(fn, rep_ms=rep)


def make_inputs(B, T, codes, dtype, seed):
    """q, k, v, beta, s0 in the layer's ranges (|beta k| < 1, unit values); ``codes``: "softmax" or "uniform"."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, T, HEADS, M, device=DEV, generator=g)
    logits = torch.randn(B, T, HEADS, M, device=DEV, generator=g)
    k = torch.softmax(logits, -1) if codes == "softmax" else torch.rand(logits.shape, device=DEV, generator=g) * 2 - 1
    v = torch.nn.functional.normalize(torch.randn(B, T, HEADS, D, device=DEV, generator=g), dim=-1)
    beta = torch.sigmoid(torch.randn(B, T, HEADS, device=DEV, generator=g))
    s0 = torch.randn(HEADS, D, M, device=DEV, generator=g)
    return [x.to(dtype) for x in (q, k, v, beta)] + [s0]


_DEFAULT_ATTRS = {}


def run(options, q, k, v, beta, s0):
    """``chunk_lattice_triton`` from ``s0`` as ``ops.lattice_attention`` starts it, with the blocking ``attrs``."""
    from lattice_plugin.kernels import triton_gates_fwd
    from lattice_plugin.kernels.gates import normalize_slots
    from lattice_plugin.kernels.triton_chunk import chunk_lattice_triton

    options = dict(options)
    attrs = options.pop("attrs", {})
    if not _DEFAULT_ATTRS:
        _DEFAULT_ATTRS.update(BM_MAX=triton_gates_fwd.BM_MAX, BT_FROZEN=triton_gates_fwd.BT_FROZEN)
    for name, value in {**_DEFAULT_ATTRS, **attrs}.items():
        setattr(triton_gates_fwd, name, value)
    state = normalize_slots(s0).unsqueeze(0).expand(q.shape[0], -1, -1, -1)
    return chunk_lattice_triton(q, k, v, beta, state, **options)


def residual(iters, q, k, v, beta, s0) -> float:
    """``max |c^(K) - c^(K-1)|`` of the gate pass on these inputs (T padded to 16 as the wrapper does)."""
    from lattice_plugin.kernels.gates import normalize_slots
    from lattice_plugin.kernels.triton_chunk import CS_EXACT
    from lattice_plugin.kernels.triton_gates_fwd import matmul_gate_pass

    pad = -q.shape[1] % 16
    k, v, beta = (torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], 1).contiguous() for x in (k, v, beta))
    state = normalize_slots(s0).unsqueeze(0).expand(q.shape[0], -1, -1, -1).contiguous()
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    *_, res = matmul_gate_pass(
        k, v, beta, state, chunk_size=CS_EXACT, exact=True, iters=iters, orthogonal=True, prec=prec
    )
    return res.item()


def warm(job) -> dict:
    """Compile one method's kernels (forward and backward) for one dtype, at a short T; errors are returned."""
    started = time.time()
    try:
        return _warm(*job, started)
    except Exception as error:  # a kernel that does not build is reported, the other methods still run
        return dict(warm=job[0], dtype=job[1], error=repr(error)[-600:], seconds=round(time.time() - started, 1))


def _warm(name, dtype, started) -> dict:
    if name == "fla":  # compiles chunk_gla's kernels (its autotuning still runs in the timing process)
        import fla.ops.gla  # noqa: F401

        limit_fla_autotuning()
        chunk_gla_times(1, 256)
        return dict(warm=name, dtype=dtype, seconds=round(time.time() - started, 1))
    options = ALL[name]
    leaves = [x.requires_grad_() for x in make_inputs(1, 80, "softmax", getattr(torch, dtype), 0)]
    o, final = run(options, *leaves)
    torch.autograd.grad((o.float().sum() + final.sum()), leaves)
    sync()
    return dict(warm=name, dtype=dtype, seconds=round(time.time() - started, 1))


def check(name, options, dtype, codes, seed) -> dict:
    """Relative errors of outputs, final state and every gradient against the float64 reference."""
    from lattice_plugin.kernels.chunk import chunk_lattice
    from lattice_plugin.kernels.gates import normalize_slots
    from lattice_plugin.kernels.recurrent import recurrent_lattice

    dt = getattr(torch, dtype)
    ins = make_inputs(1, CHECK_T, codes, dt, seed)
    leaves = [x.clone().requires_grad_() for x in ins]
    o, final = run(options, *leaves)
    g = torch.Generator(device=DEV).manual_seed(seed + 1)
    d_o = torch.randn(o.shape, device=DEV, generator=g)
    d_f = torch.randn(final.shape, device=DEV, generator=g)
    grads = torch.autograd.grad((o.float() * d_o).sum() + (final * d_f).sum(), leaves)
    refs = [x.detach().double().requires_grad_() for x in ins]
    state = normalize_slots(refs[4]).unsqueeze(0)
    if options["gates"] == "exact":
        ro, rf = recurrent_lattice(*refs[:4], state)
    else:
        ro, rf = chunk_lattice(*refs[:4], state, chunk_size=64, gates="chunk")
    rgrads = torch.autograd.grad((ro * d_o.double()).sum() + (rf * d_f.double()).sum(), refs)
    err = lambda x, r: ((x.double() - r).norm() / r.norm()).item()  # noqa: E731
    errors = {"o": err(o, ro), "final": err(final, rf)}
    errors.update({f"d{n}": err(x, r) for n, x, r in zip(("q", "k", "v", "beta", "s0"), grads, rgrads)})
    finite = all(torch.isfinite(x).all().item() for x in (o, final, *grads))
    worst = max(errors.values())
    row = dict(method=name, dtype=dtype, codes=codes, errors=errors, worst=worst, finite=finite)
    if options.get("gate_solver") == "fixed_point" and options["gates"] == "exact":
        row["residual"] = residual(options["fixed_point_iters"], *ins)
    # pass/fail only where the method claims the reference's accuracy: not the few-iteration fixed points
    row["ok"] = bool(finite and (worst <= TOL[dtype] or name.startswith("exact_fp") and name != "exact_fp16"))
    return row


def limit_fla_autotuning() -> None:
    """Keep GLA_CONFIGS configurations of every chunk_gla kernel (whole autotuning timed out in earlier runs)."""
    import sys

    from triton.runtime.autotuner import Autotuner

    for mod in [m for n, m in list(sys.modules.items()) if n.startswith("fla.ops") and m is not None]:
        for value in vars(mod).values():
            while hasattr(value, "fn"):  # heuristics wrap autotuners and autotuners wrap kernels
                if isinstance(value, Autotuner) and len(value.configs) > GLA_CONFIGS:
                    preferred = sorted(value.configs, key=lambda c: (c.num_warps not in (4, 8), c.num_stages > 3))
                    value.configs = preferred[:GLA_CONFIGS]
                value = value.fn


def chunk_gla_times(B, T) -> dict:
    """flash-linear-attention's chunk_gla, K = m = 64, V = d = 128, log-sigmoid gates, bf16."""
    import torch.nn.functional as F
    from fla.ops.gla import chunk_gla

    from lattice_plugin.bench import _fwd_and_train

    qk = [torch.randn(B, T, HEADS, M, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    v = torch.randn(B, T, HEADS, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    gate = F.logsigmoid(torch.randn(B, T, HEADS, M, device=DEV)).to(torch.bfloat16).requires_grad_()
    fwd, train = _fwd_and_train(lambda q, k, v, g: chunk_gla(q, k, v, g)[0], [*qk, v, gate], rep_ms=100)
    return dict(method="fla_chunk_gla", B=B, T=T, fwd_ms=fwd, fwd_bwd_ms=train)


def timings(report, save, broken) -> None:
    from lattice_plugin.bench import _kernel_times

    rows = report["timings"]
    for B, T in SHAPES:
        if elapsed() > BUDGET_S:
            report["skipped"].append(f"timings {B}x{T}: past {BUDGET_S:.0f} s")
            continue
        leaves = [x.requires_grad_() for x in make_inputs(B, T, "uniform", torch.bfloat16, 7)]
        grad = torch.randn(B, T, HEADS, D, device=DEV, dtype=torch.bfloat16)
        for name, options in {**METHODS, **VARIANTS}.items():
            if name in broken:
                continue
            with torch.no_grad():
                fwd = bench(lambda: run(options, *leaves)[0])
            train = bench(lambda: torch.autograd.grad(run(options, *leaves)[0], leaves, grad))
            row = dict(method=name, B=B, T=T, fwd_ms=fwd, fwd_bwd_ms=train)
            if options.get("gate_solver") == "fixed_point" and options["gates"] == "exact":
                row["residual"] = residual(options["fixed_point_iters"], *leaves)
            rows.append(row)
            print(
                f"{name:>17} {B:>3}x{T:<6} fwd {fwd:8.3f} ms  fwd+bwd {train:8.3f} ms"
                + (f"  residual {row['residual']:.1e}" if "residual" in row else ""),
                flush=True,
            )
            save()
        if (B, T) == SHAPES[-1] and not DRY:
            for name in {"exact_scan", "exact_fp4", "chunk_scan", "chunk_matmul"} - broken:
                with torch.no_grad():
                    report["fwd_kernel_ms"][f"{name} {B}x{T}"] = _kernel_times(lambda: run(METHODS[name], *leaves))
        if not DRY and report["fla"]:
            try:
                rows.append(chunk_gla_times(B, T))
                print(
                    f"{'fla_chunk_gla':>17} {B:>3}x{T:<6} fwd {rows[-1]['fwd_ms']:8.3f} ms  "
                    f"fwd+bwd {rows[-1]['fwd_bwd_ms']:8.3f} ms",
                    flush=True,
                )
            except Exception as error:  # an fla that cannot run here is reported, not fatal
                report["skipped"].append(f"chunk_gla {B}x{T}: {error!r}"[:300])
        torch.cuda.empty_cache() if not DRY else None
        save()


def plot(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["timings"]
    shapes = [s for s in SHAPES if any((r["B"], r["T"]) == s for r in rows)]
    names = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key in zip(axes, ("fwd_ms", "fwd_bwd_ms")):
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            ys = [next((r[key] for r in rows if r["method"] == name and (r["B"], r["T"]) == s), 0) for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], ys, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], [f"{B}x{T}" for B, T in shapes])
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{'forward' if key == 'fwd_ms' else 'forward + backward'}, bf16, H={HEADS} m={M} d={D}")
    axes[0].legend(fontsize=7)
    fig.suptitle(report["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    import triton

    device = "cpu (interpreter)" if DRY else torch.cuda.get_device_name()
    card = "dry" if DRY else device.split()[-1].lower().replace(" ", "_")
    try:
        import fla

        fla_version = getattr(fla, "__version__", "unknown")
    except ImportError:
        fla_version = None
    report = dict(
        device=device,
        torch=torch.__version__,
        triton=triton.__version__,
        fla=fla_version,
        shapes=dict(H=HEADS, m=M, d=D, check_T=CHECK_T),
        warm=[],
        correctness=[],
        timings=[],
        fwd_kernel_ms={},
        skipped=[],
    )
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"kernels_gla_{card}.json"

    def save():
        report["wall_s"] = round(elapsed(), 1)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(path)

    jobs = [(n, dt) for n in {**METHODS, **CONVERGED} for dt in ("float32", "bfloat16")]
    jobs = sorted(jobs, key=lambda job: "scan" not in job[0])  # the per-token sweeps compile longest: first
    jobs += [(n, "bfloat16") for n in VARIANTS] + ([("fla", "bfloat16")] if fla_version and not DRY else [])
    if DRY:
        report["warm"] = [warm(job) for job in jobs[:2]]
    else:
        try:
            with ProcessPoolExecutor(min(len(jobs), 16), mp_context=multiprocessing.get_context("spawn")) as pool:
                report["warm"] = list(pool.map(warm, jobs))
        except Exception as error:  # a crashed worker: the timing process compiles what is missing itself
            report["skipped"].append(f"compile workers: {error!r}"[-300:])
    print(f"compiled in {elapsed():.0f} s; errors: {[w for w in report['warm'] if 'error' in w]}", flush=True)
    save()
    broken = {w["warm"] for w in report["warm"] if "error" in w}
    for dtype in ("float32", "bfloat16"):
        for codes in ("softmax", "uniform"):
            for name, options in ALL.items():
                if codes == "uniform" and not name.startswith("exact_fp") or dtype == "float32" and name in VARIANTS:
                    continue  # the strong-gate codes matter for the fixed point's convergence
                if name in broken:
                    continue
                try:
                    row = check(name, options, dtype, codes, seed=len(report["correctness"]))
                except Exception as error:  # reported; the method is left out of the timings too
                    broken.add(name)
                    report["skipped"].append(f"{name} {dtype}: {error!r}"[-600:])
                    print(f"BAD {name} {dtype}: {error!r}"[-600:], flush=True)
                    continue
                report["correctness"].append(row)
                extra = f" residual {row['residual']:.1e}" if "residual" in row else ""
                print(
                    f"{'ok ' if row['ok'] else 'BAD'} {name:>13} {dtype:>8} {codes:>7} worst {row['worst']:.2e}"
                    f" (o {row['errors']['o']:.1e}){extra}",
                    flush=True,
                )
    save()
    if not DRY and fla_version:
        import fla.ops.gla

        limit_fla_autotuning()
    timings(report, save, broken)
    save()
    try:
        plot(report, path.with_suffix(".png"))
    except ImportError:  # no matplotlib on the device image: plot() the JSON elsewhere
        print("no PNG: matplotlib is not installed here", flush=True)
    gla = {(r["B"], r["T"]): r for r in report["timings"] if r["method"] == "fla_chunk_gla"}
    print(f"\n{'method':>17} {'BxT':>8} {'fwd ms':>8} {'f+b ms':>8} {'fwd/gla':>8} {'f+b/gla':>8} residual")
    for r in report["timings"]:
        ref = gla.get((r["B"], r["T"]))
        ratios = (
            f"{r['fwd_ms'] / ref['fwd_ms']:8.2f} {r['fwd_bwd_ms'] / ref['fwd_bwd_ms']:8.2f}"
            if ref
            else f"{'-':>8} {'-':>8}"
        )
        res = f"{r['residual']:.1e}" if "residual" in r else ""
        print(f"{r['method']:>17} {r['B']:>3}x{r['T']:<5} {r['fwd_ms']:8.3f} {r['fwd_bwd_ms']:8.3f} {ratios} {res}")
    bad = [r for r in report["correctness"] if not r["ok"]]
    print(
        f"correctness: {len(report['correctness']) - len(bad)} ok, {len(bad)} failed; "
        f"skipped: {report['skipped']}; done in {elapsed():.0f} s"
    )


if __name__ == "__main__":
    main()
