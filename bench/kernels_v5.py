"""One device call: the version-5 reverse sweep (kernels/triton_chunk.py, branch kernels-v5) against the float64
reference, then v4 vs v5 timings in the same process and per-kernel times (adapted from bench/kernels_v4.py;
chunk_gla only with KV5_GLA=1: its autotuning on a fresh machine took the whole v4 call's margin).

v4 = a copy of main's kernels/triton_chunk.py (``git show main:kernels/triton_chunk.py > bench/_v4_triton_chunk.py``,
or a path in KV5_V4; present for the run only). Correctness: fresh random inputs; outputs, final state and the gradients of q, k, v,
beta and s0/initial_state; relative error <= 1e-4 (float32) and <= 2e-2 (bfloat16). Timings: CUDA-event medians
(triton.testing.do_bench) of forward (no autograd) and forward+backward of chunk_lattice_triton, bf16, H=16, m=64,
d=128, each version twice. Compilation runs first in worker processes (Triton's on-disk cache), so the timed
process only loads kernels. SWEEPS_DRY=1 rehearses everything on the CPU (interpreter, tiny shapes).
"""

import importlib.util
import json
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DRY = bool(os.environ.get("SWEEPS_DRY"))
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

DEV = "cpu" if DRY else "cuda"
OUT = Path(os.environ.get("OUT") or "/tmp/out")
TOL = {"float32": 1e-4, "bfloat16": 2e-2}
HERE = Path(__file__).resolve().parent
V4 = Path(os.environ.get("KV5_V4") or HERE / "_v4_triton_chunk.py")
GLA = bool(os.environ.get("KV5_GLA"))
BUDGET_S = float(os.environ.get("KV5_BUDGET_S") or 400)  # skip the optional parts past this wall time
CASES = [  # name, B, T, Hq, H, m, d, dtype, gates, orthogonal, normalize, per-batch initial_state
    ("fp32 exact GQA", 2, 2048, 8, 4, 64, 128, "float32", "exact", True, True, False),
    ("bf16 exact (bench kernels)", 2, 2048, 16, 16, 64, 128, "bfloat16", "exact", True, True, True),
    ("bf16 exact GQA m=128, ragged T", 1, 1500, 8, 2, 128, 128, "bfloat16", "exact", True, True, False),
    ("fp32 chunk gates, ragged T", 1, 1000, 4, 2, 64, 128, "float32", "chunk", True, True, True),
    ("fp32 no retraction, ragged, m=48 d=80", 1, 1001, 2, 2, 48, 80, "float32", "exact", True, False, False),
]
SHAPES = [(16, 2048), (1, 32768)]
HEADS, M, D = 16, 64, 128
if DRY:
    CASES = [(c[0], 1, 19 + 16 * i, 2 * (c[3] // c[4]), 2, 16, 16, *c[7:]) for i, c in enumerate(CASES)]
    SHAPES = [(2, 32), (1, 48)]
    HEADS, M, D = 2, 16, 16
VERSIONS = {  # module attributes set per timed version (v4: main's defaults, BV_READ = 128, SCAN_WARPS = 2)
    "v4": None,
    "v5": dict(SCAN_WARPS=2),
    "v5_scan4": dict(SCAN_WARPS=4),  # the reverse sweep at 4 warps (fewer spills offline, see NOTES)
}
STARTED = time.time()


def sync():
    if not DRY:
        torch.cuda.synchronize()


def bench(fn, rep):
    if not DRY:
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=rep, return_mode="median")
    started = time.time()
    fn()
    return (time.time() - started) * 1e3


def v4_module():
    spec = importlib.util.spec_from_file_location("v4_triton_chunk", V4)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def version(name):
    from lattice_plugin.kernels import triton_chunk as v5

    if name == "v4":
        return v4_module()
    for attr, value in VERSIONS[name].items():
        setattr(v5, attr, value)
    return v5


def check_case(case) -> dict:
    from lattice_plugin import ops
    from lattice_plugin.kernels.chunk import chunk_lattice

    if DRY:
        ops.resolve_backend = lambda *args, **kwargs: "triton"
    name, B, T, Hq, H, m, d, dtype, gates, orth, norm, per_batch = case
    torch.manual_seed(sum(map(ord, name)))
    dt = getattr(torch, dtype)
    started = time.time()
    q = torch.randn(B, T, Hq, m, device=DEV)
    k = torch.rand(B, T, H, m, device=DEV) * 2 - 1
    v = torch.nn.functional.normalize(torch.randn(B, T, H, d, device=DEV), dim=-1)
    beta = torch.rand(B, T, H, device=DEV)
    s0 = torch.randn(H, d, m, device=DEV)
    init = torch.randn(B, H, d, m, device=DEV) if per_batch else None
    ins = [x.to(dt).requires_grad_() for x in (q, k, v, beta)]
    leaves = [s0.clone().requires_grad_()] + ([init.clone().requires_grad_()] if per_batch else [])
    flags = dict(gates=gates, orthogonal=orth, normalize=norm)
    o, f = ops.lattice_attention(*ins, leaves[0], initial_state=leaves[1] if per_batch else None,
                                 output_final_state=True, backend="triton", **flags)
    d_o, d_f = torch.randn(o.shape, device=DEV), torch.randn(f.shape, device=DEV)
    ((o.float() * d_o).sum() + (f * d_f).sum()).backward()
    sync()
    compiled = time.time() - started
    refs = [x.detach().double().requires_grad_() for x in ins]
    rleaves = [x.detach().double().requires_grad_() for x in leaves]
    state = rleaves[1] if per_batch else rleaves[0].unsqueeze(0).expand(B, -1, -1, -1)
    if norm or not per_batch:
        state = state / state.norm(dim=-2, keepdim=True).clamp_min(1e-12)
    ro, rf = chunk_lattice(*refs, state, chunk_size=64, **flags)
    ((ro * d_o.double()).sum() + (rf * d_f.double()).sum()).backward()
    err = lambda x, r: ((x.double() - r).norm() / r.norm()).item()  # noqa: E731
    errors = {"o": err(o, ro), "final": err(f, rf)}
    errors.update({f"d{n}": err(x.grad, r.grad) for n, x, r in zip(("q", "k", "v", "beta"), ins, refs)})
    errors["d_initial_state" if per_batch else "ds0"] = err(leaves[-1].grad, rleaves[-1].grad)
    worst = max(errors.values())
    return dict(case=name, errors=errors, worst=worst, ok=bool(worst <= TOL[dtype]), compile_s=round(compiled, 1),
                seconds=round(time.time() - started, 1))


def inputs(B, T, requires_grad=True):
    from lattice_plugin.bench import lattice_inputs
    from lattice_plugin.kernels.gates import normalize_slots

    q, k, v, beta, s0 = lattice_inputs(B, T, HEADS, HEADS, M, D, requires_grad=requires_grad, device=DEV)
    return q, k, v, beta, s0, lambda s: normalize_slots(s).unsqueeze(0).expand(B, -1, -1, -1)


def warm(which: str) -> dict:
    """Compile one version's kernels for the timed configuration (bf16, exact, m=64, d=128)."""
    started = time.time()
    mod = version(which)
    q, k, v, beta, s0, state = inputs(1, 1024)
    o, _ = mod.chunk_lattice_triton(q, k, v, beta, state(s0))
    torch.autograd.grad(o, [q, k, v, beta, s0], torch.randn_like(o))
    sync()
    return dict(warm=which, seconds=round(time.time() - started, 1))


def chunk_gla_times(B, T) -> dict:
    """flash-linear-attention's chunk_gla with K = m = 64 on the same shape (inputs as lattice_plugin.bench)."""
    import torch.nn.functional as F
    from fla.ops.gla import chunk_gla

    g_in = [torch.randn(B, T, HEADS, M, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    v_in = torch.randn(B, T, HEADS, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    gate = F.logsigmoid(torch.randn(B, T, HEADS, M, device=DEV)).to(torch.bfloat16).requires_grad_()
    leaves = [*g_in, v_in, gate]
    with torch.no_grad():
        f_ms = bench(lambda: chunk_gla(*leaves)[0], 150)
    out = chunk_gla(*leaves)[0]
    grad = torch.randn_like(out)
    t_ms = bench(lambda: torch.autograd.grad(chunk_gla(*leaves)[0], leaves, grad), 150)
    return dict(version="fla_chunk_gla", B=B, T=T, repeat=0, fwd_ms=f_ms, fwd_bwd_ms=t_ms)


def timings(report: dict, save) -> None:
    from lattice_plugin.bench import _kernel_times

    rows, agree, kernels = [], [], {}
    report["timings"], report["agreement"], report["kernel_ms"] = rows, agree, kernels
    for B, T in SHAPES:
        q, k, v, beta, s0, state = inputs(B, T)
        leaves = [q, k, v, beta, s0]
        grad = torch.randn(B, T, HEADS, D, device=DEV, dtype=torch.bfloat16)
        outs = {}
        for rep in range(2):  # each version twice: the spread between repeats is the noise
            for name in VERSIONS:
                mod = version(name)

                def fwd(mod=mod):
                    return mod.chunk_lattice_triton(q, k, v, beta, state(s0))[0]

                def train(mod=mod):
                    return torch.autograd.grad(mod.chunk_lattice_triton(q, k, v, beta, state(s0))[0], leaves, grad)

                with torch.no_grad():
                    f_ms = bench(fwd, 150)
                t_ms = bench(train, 150)
                rows.append(dict(version=name, B=B, T=T, repeat=rep, fwd_ms=f_ms, fwd_bwd_ms=t_ms))
                print(f"{name:>8} B={B:>2} T={T:>5} rep {rep}: fwd {f_ms:8.3f} ms  fwd+bwd {t_ms:8.3f} ms", flush=True)
                if rep == 0:
                    o = fwd()
                    outs[name] = [o.float()] + [g.float() for g in torch.autograd.grad(o, leaves, grad)]
        rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
        names = ["o", "dq", "dk", "dv", "dbeta", "ds0"]
        for other in ("v4", "v5_scan4"):
            agree.append(dict(B=B, T=T, pair=f"v5 vs {other}",
                              **{n: rel(a, b) for n, a, b in zip(names, outs["v5"], outs[other])}))
            print(agree[-1], flush=True)
        save()
        if not DRY:
            for name in ("v5", "v4"):
                mod = version(name)
                kernels[f"{name} B={B},T={T}"] = _kernel_times(lambda mod=mod: torch.autograd.grad(
                    mod.chunk_lattice_triton(q, k, v, beta, state(s0))[0], leaves, grad))
                print(name, B, T, {k_: round(v_, 3) for k_, v_ in kernels[f"{name} B={B},T={T}"].items()}, flush=True)
            version("v5")
            save()
        del q, k, v, beta, s0, grad, outs
        if not DRY:
            torch.cuda.empty_cache()
    for B, T in SHAPES if GLA else []:  # the comparator last: its autotuning takes a while on a fresh machine
        if time.time() - STARTED > BUDGET_S:
            report["chunk_gla_skipped"] = f"B={B} T={T}: past the {BUDGET_S}s budget"
            print(report["chunk_gla_skipped"], flush=True)
            break
        try:
            rows.append(chunk_gla_times(B, T))
            print(rows[-1], flush=True)
        except Exception as error:  # a missing or incompatible fla must not sink the run
            report["chunk_gla_error"] = repr(error)[:500]
            print("chunk_gla:", report["chunk_gla_error"], flush=True)
            break
        save()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    device = "cpu (dry run)" if DRY else torch.cuda.get_device_name()
    card = "cpu" if DRY else "h200" if "H200" in device else "h100" if "H100" in device else "gpu"
    path = OUT / f"kernels_v5_{card}.json"
    report = dict(device=device, torch=torch.__version__, script=Path(__file__).read_text())
    import triton

    report["triton"] = triton.__version__
    try:
        import fla

        report["fla"] = getattr(fla, "__version__", "?")
    except Exception as error:
        report["fla"] = repr(error)[:200]
    save = lambda: path.write_text(json.dumps(report, indent=1))  # noqa: E731
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(CASES) + len(VERSIONS), mp_context=ctx) as pool:
        warms = [pool.submit(warm, w) for w in VERSIONS]
        checks = [pool.submit(check_case, c) for c in CASES]
        report["warm"] = []
        for f in warms:
            try:
                report["warm"].append(f.result())
            except Exception:
                report["warm"].append(dict(error=traceback.format_exc()[-2000:]))
        print(report["warm"], f"{time.time() - STARTED:.0f}s", flush=True)
        report["correctness"] = []
        for f in checks:  # all GPU work of the workers ends before the timings start
            try:
                report["correctness"].append(f.result())
            except Exception:
                report["correctness"].append(dict(error=traceback.format_exc()[-2000:]))
            print(report["correctness"][-1], f"{time.time() - STARTED:.0f}s", flush=True)
    save()
    try:
        timings(report, save)
    except Exception:
        report["timings_error"] = traceback.format_exc()[-2000:]
        print(report["timings_error"], flush=True)
    report["wall_s"] = round(time.time() - STARTED, 1)
    save()
    print("\nversion       B      T   fwd ms  fwd+bwd ms")
    for r in report.get("timings", []):
        print(f"{r['version']:>13} {r['B']:>3} {r['T']:>6} {r['fwd_ms']:8.3f} {r['fwd_bwd_ms']:10.3f}")
    for c in report["correctness"]:
        print(c.get("case"), "ok" if c.get("ok") else "FAIL", f"worst {c.get('worst', float('nan')):.2e}")
    print(f"done in {report['wall_s']}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
