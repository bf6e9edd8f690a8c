"""One device call: several copies of the chunkwise kernels side by side in one process. Each copy is checked
against the float64 reference, timed (forward and forward+backward, the same inputs for every copy, each copy
twice), compared with the first copy on the timed inputs, and profiled per kernel.

KCMP_VERSIONS lists the copies as ``name=path`` pairs separated by commas: a path is a copy of the ``kernels/``
folder (its ``triton_chunk`` is used) or, for versions before the split by stage, a single ``triton_chunk.py``. It
may end with ``:ATTR=VALUE;...`` to set attributes of that copy's ``triton_chunk`` (e.g.
``v6_scan4=k.py:SCAN_WARPS=4``; the same path twice is one build).
The first copy is the baseline of the agreement check. KCMP_CHECK (comma-separated names, default all) picks the
copies checked against the float64 reference (``-``: none), KCMP_CASES (indices into CASES) the cases, KCMP_SHAPES
the timed shapes (``16x2048,1x32768`` by default).
KCMP_BUDGET_S: skip chunk_gla (KCMP_GLA=1) past this wall time.

Correctness: fresh random inputs; outputs, final state and the gradients of q, k, v, beta and s0 / initial_state;
relative error <= 1e-4 (float32) and <= 2e-2 (bfloat16). Timings: CUDA-event medians (triton.testing.do_bench) of
``chunk_lattice_triton``, bf16, H=16, m=64, d=128. Compilation runs first in worker processes (Triton's on-disk
cache), so the timed process only loads kernels. Writes ``$OUT/kernels_compare_<card>.json``.
SWEEPS_DRY=1 rehearses everything on the CPU (interpreter, tiny shapes).
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
GLA = bool(os.environ.get("KCMP_GLA"))
BUDGET_S = float(os.environ.get("KCMP_BUDGET_S") or 400)
CASES = [  # name, B, T, Hq, H, m, d, dtype, gates, orthogonal, normalize, per-batch initial_state
    ("fp32 exact GQA", 2, 2048, 8, 4, 64, 128, "float32", "exact", True, True, False),
    ("bf16 exact (bench kernels)", 2, 2048, 16, 16, 64, 128, "bfloat16", "exact", True, True, True),
    ("bf16 exact GQA m=128, ragged T", 1, 1500, 8, 2, 128, 128, "bfloat16", "exact", True, True, False),
    ("fp32 chunk gates, ragged T", 1, 1000, 4, 2, 64, 128, "float32", "chunk", True, True, True),
    ("fp32 no retraction, ragged, m=48 d=80", 1, 1001, 2, 2, 48, 80, "float32", "exact", True, False, False),
]
if os.environ.get("KCMP_CASES"):  # a subset of the cases, by index
    CASES = [CASES[int(i)] for i in os.environ["KCMP_CASES"].split(",")]
SHAPES = [(16, 2048), (1, 32768)]
if os.environ.get("KCMP_SHAPES"):  # BxT,BxT,...
    SHAPES = [tuple(int(n) for n in shape.split("x")) for shape in os.environ["KCMP_SHAPES"].split(",")]
HEADS, M, D = 16, 64, 128
if DRY:
    CASES = [(c[0], 1, 19 + 16 * i, 2 * (c[3] // c[4]), 2, 16, 16, *c[7:]) for i, c in enumerate(CASES)]
    SHAPES = [(2, 32), (1, 48)]
    HEADS, M, D = 2, 16, 16
STARTED = time.time()


def parse_versions(text: str) -> dict:
    """``name=path[:ATTR=VALUE;...],...`` -> {name: (path, {attr: value})}."""
    versions = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, spec = item.split("=", 1)
        path, _, attrs = spec.partition(":")
        pairs = (a.split("=", 1) for a in attrs.split(";") if a)
        versions[name] = (path, {k: int(v) if v.lstrip("-").isdigit() else v for k, v in pairs})
    return versions


VERSIONS = parse_versions(os.environ.get("KCMP_VERSIONS", ""))
CHECK = [n for n in (os.environ.get("KCMP_CHECK") or ",".join(VERSIONS)).split(",") if n in VERSIONS]
_MODULES = {}


def version(name):
    """The copy ``name`` as a module (one module per path), with its attributes set for this use."""
    path, attrs = VERSIONS[name]
    path = str(Path(path).resolve())
    if path not in _MODULES:
        name = f"kcmp_{len(_MODULES)}"
        package = Path(path).is_dir()  # a copy of kernels/: its modules import each other relatively
        spec = importlib.util.spec_from_file_location(
            name, Path(path, "__init__.py") if package else path, submodule_search_locations=[path] if package else None
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        if package:
            mod = importlib.import_module(f"{name}.triton_chunk")
        _MODULES[path] = (mod, {k: getattr(mod, k) for k in dir(mod) if k.isupper()})
    mod, defaults = _MODULES[path]
    for attr, value in {**defaults, **attrs}.items():
        setattr(mod, attr, value)
    return mod


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


def check_case(name_case) -> dict:
    """One copy on one case against ``kernels/chunk.py`` in float64 (the start state as ``ops.lattice_attention``
    builds it)."""
    from lattice_plugin.kernels.chunk import chunk_lattice
    from lattice_plugin.kernels.gates import normalize_slots

    which, case = name_case
    mod = version(which)
    name, B, T, Hq, H, m, d, dtype, gates, orth, norm, per_batch = case
    torch.manual_seed(sum(map(ord, name)))
    dt = getattr(torch, dtype)
    started = time.time()
    q = torch.randn(B, T, Hq, m, device=DEV)
    k = torch.rand(B, T, H, m, device=DEV) * 2 - 1
    v = torch.nn.functional.normalize(torch.randn(B, T, H, d, device=DEV), dim=-1)
    beta = torch.rand(B, T, H, device=DEV)
    s0 = torch.randn(B, H, d, m, device=DEV) if per_batch else torch.randn(H, d, m, device=DEV)
    flags = dict(gates=gates, orthogonal=orth, normalize=norm)

    def start(s):
        if per_batch:
            return normalize_slots(s) if norm else s
        return normalize_slots(s).unsqueeze(0).expand(B, -1, -1, -1)

    ins = [x.to(dt).requires_grad_() for x in (q, k, v, beta)]
    leaf = s0.clone().requires_grad_()
    o, f = mod.chunk_lattice_triton(*ins, start(leaf), chunk_size=64, **flags)
    d_o, d_f = torch.randn(o.shape, device=DEV), torch.randn(f.shape, device=DEV)
    ((o.float() * d_o).sum() + (f * d_f).sum()).backward()
    sync()
    compiled = time.time() - started
    refs = [x.detach().double().requires_grad_() for x in ins]
    rleaf = s0.double().requires_grad_()
    ro, rf = chunk_lattice(*refs, start(rleaf), chunk_size=64, **flags)
    ((ro * d_o.double()).sum() + (rf * d_f.double()).sum()).backward()
    err = lambda x, r: ((x.double() - r).norm() / r.norm()).item()  # noqa: E731
    errors = {"o": err(o, ro), "final": err(f, rf)}
    errors.update({f"d{n}": err(x.grad, r.grad) for n, x, r in zip(("q", "k", "v", "beta"), ins, refs)})
    errors["d_initial_state" if per_batch else "ds0"] = err(leaf.grad, rleaf.grad)
    worst = max(errors.values())
    finite = all(torch.isfinite(x).all().item() for x in [o, f, leaf.grad] + [x.grad for x in ins])
    return dict(
        version=which,
        case=name,
        errors=errors,
        worst=worst,
        ok=bool(finite and worst <= TOL[dtype]),
        compile_s=round(compiled, 1),
        seconds=round(time.time() - started, 1),
    )


def inputs(B, T, requires_grad=True):
    from lattice_plugin.kernels.gates import normalize_slots

    from lattice_plugin.bench import lattice_inputs

    q, k, v, beta, s0 = lattice_inputs(B, T, HEADS, HEADS, M, D, requires_grad=requires_grad, device=DEV)
    return q, k, v, beta, s0, lambda s: normalize_slots(s).unsqueeze(0).expand(B, -1, -1, -1)


def warm(which: str) -> dict:
    """Compile one copy's kernels for the timed configuration (bf16, exact, m=64, d=128)."""
    started = time.time()
    mod = version(which)
    q, k, v, beta, s0, state = inputs(1, 64 if DRY else 1024)
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
    base = next(iter(VERSIONS))
    for B, T in SHAPES:
        q, k, v, beta, s0, state = inputs(B, T)
        leaves = [q, k, v, beta, s0]
        grad = torch.randn(B, T, HEADS, D, device=DEV, dtype=torch.bfloat16)
        outs = {}
        for rep in range(2):  # each copy twice: the spread between repeats is the noise
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
                print(f"{name:>10} B={B:>2} T={T:>5} rep {rep}: fwd {f_ms:8.3f} ms  fwd+bwd {t_ms:8.3f} ms", flush=True)
                if rep == 0:
                    o = fwd()
                    outs[name] = [o.float()] + [g.float() for g in torch.autograd.grad(o, leaves, grad)]
        rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
        names = ["o", "dq", "dk", "dv", "dbeta", "ds0"]
        for other in VERSIONS:
            if other != base:
                agree.append(
                    dict(
                        B=B,
                        T=T,
                        pair=f"{other} vs {base}",
                        **{n: rel(a, b) for n, a, b in zip(names, outs[other], outs[base])},
                    )
                )
                print(agree[-1], flush=True)
        save()
        if not DRY:
            for name in VERSIONS:
                mod = version(name)
                kernels[f"{name} B={B},T={T}"] = _kernel_times(
                    lambda mod=mod: torch.autograd.grad(
                        mod.chunk_lattice_triton(q, k, v, beta, state(s0))[0], leaves, grad
                    )
                )
                print(name, B, T, {k_: round(v_, 3) for k_, v_ in kernels[f"{name} B={B},T={T}"].items()}, flush=True)
            save()
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
    if not VERSIONS:
        sys.exit("KCMP_VERSIONS is empty: list the copies as name=path pairs")
    OUT.mkdir(parents=True, exist_ok=True)
    device = "cpu (dry run)" if DRY else torch.cuda.get_device_name()
    card = "cpu" if DRY else "h200" if "H200" in device else "h100" if "H100" in device else "gpu"
    path = OUT / f"kernels_compare_{card}.json"
    report = dict(
        device=device,
        torch=torch.__version__,
        versions={n: [p, a] for n, (p, a) in VERSIONS.items()},
        script=Path(__file__).read_text(),
    )
    import triton

    report["triton"] = triton.__version__
    save = lambda: path.write_text(json.dumps(report, indent=1))  # noqa: E731
    ctx = torch.multiprocessing.get_context("spawn")
    jobs = [(n, c) for n in CHECK for c in CASES]
    with ProcessPoolExecutor(max_workers=min(len(jobs) + len(VERSIONS), 15), mp_context=ctx) as pool:
        warms = [pool.submit(warm, w) for w in VERSIONS]
        checks = [pool.submit(check_case, j) for j in jobs]
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
    print("\n   version   B      T   fwd ms  fwd+bwd ms")
    for r in report.get("timings", []):
        print(f"{r['version']:>10} {r['B']:>3} {r['T']:>6} {r['fwd_ms']:8.3f} {r['fwd_bwd_ms']:10.3f}")
    for c in report["correctness"]:
        worst = c.get("worst", float("nan"))
        print(c.get("version"), c.get("case"), "ok" if c.get("ok") else "FAIL", f"worst {worst:.2e}")
    print(f"done in {report['wall_s']}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
