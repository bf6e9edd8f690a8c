"""One device call for the training-speed work (issue 16): GPU checks of the fused prologue/epilogue and of the
matmul gate passes (negative gates included), the first-use compile time of a fresh shape, then ``lattice bench --train``.

Run with a fresh ``TRITON_CACHE_DIR``; writes ``$OUT/train_gpu.json`` (checks, compile times; rewritten after
every step) and the bench's ``$OUT/train_T<T>.json`` / ``.png``. ``SEQ_LENS`` (default 2048,8192,32768) are run
one after another, each into its own ``train_T<T>.json``, a next one only if fewer than ``NEXT_IF_BEFORE_S``
seconds have passed; ``COMPILE=1`` runs every model under ``torch.compile`` (as ``litgpt pretrain`` does) into
``train_T<T>_compiled.json``; ``DRY=1`` runs the checks only, on whatever device is there (the CPU interpreter
included).
"""

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from lattice_plugin.kernels.elementwise import CODE_MAPS, epilogue_reference, prologue_reference

START = time.time()
OUT = Path(os.environ.get("OUT", "/tmp/train-gpu"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COMPILED = os.environ.get("COMPILE") == "1"  # the models under torch.compile, as litgpt pretrain runs them
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
report: dict = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", torch=torch.__version__)


def save() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "train_gpu.json.tmp").write_text(json.dumps(report, indent=2))
    os.replace(OUT / "train_gpu.json.tmp", OUT / "train_gpu.json")


def rel_err(x, ref) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def compare(fn, ref_fn, inputs, dtype) -> dict:
    """Max relative error of outputs and of every input gradient, ``fn`` in ``dtype`` vs ``ref_fn`` in float64."""
    ins = [x.detach().to(DEVICE, dtype).requires_grad_() for x in inputs]  # fresh leaves, never the inputs
    refs_in = [x.detach().double().requires_grad_() for x in ins]
    outs, refs = fn(*ins, dtype), ref_fn(*refs_in, torch.float64)
    outs, refs = (outs, refs) if isinstance(outs, tuple) else ((outs,), (refs,))
    grads = [torch.randn_like(r) for r in refs]
    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grads, outs)])
    torch.autograd.backward(refs, grads)
    return dict(
        values=max(rel_err(o, r) for o, r in zip(outs, refs)),
        grads=max(rel_err(x.grad, r.grad) for x, r in zip(ins, refs_in)),
    )


def check_fused() -> None:
    """Prologue and epilogue kernels vs the float64 references on awkward shapes, every code map, both dtypes."""
    from lattice_plugin.kernels.triton_epilogue import epilogue_triton
    from lattice_plugin.kernels.triton_prologue import prologue_triton

    rows = []
    model_shape, awkward = (3, 37, 12, 12, 64, 64), (2, 50, 6, 3, 20, 24)  # the bench's mixer; GQA, odd sizes
    cases = [(model_shape, torch.bfloat16, code) for code in CODE_MAPS] + [
        (model_shape, torch.float32, "softmax"),
        (awkward, torch.bfloat16, "softmax"),
        (awkward, torch.bfloat16, "l2"),
    ]
    for (B, T, Hq, H, m, d), dtype, code in cases:  # few variants: each is a build on the device
        inputs = (
            torch.randn(B, T, Hq, m) * 2,
            torch.randn(B, T, H, m) * 2,
            torch.randn(B, T, H, d),
            torch.randn(B, T, H) * 2,
        )
        err = compare(
            lambda *a, code=code: prologue_triton(*a[:4], code, a[4]),
            lambda *a, code=code: prologue_reference(*a[:4], code, a[4]),
            inputs,
            dtype,
        )
        rows.append(dict(stage="prologue", code=code, shape=[B, T, Hq, H, m, d], dtype=str(dtype), **err))
    for (B, T, Hq, _, _, d), dtype, gated in (
        (model_shape, torch.bfloat16, True),
        (model_shape, torch.bfloat16, False),
        (awkward, torch.float32, True),
    ):
        inputs = [torch.randn(B, T, Hq, d), 1 + 0.3 * torch.randn(Hq, d)]
        inputs += [torch.randn(B, T, Hq * d)] if gated else []
        err = compare(
            lambda o, w, *g: epilogue_triton(o, w, 1e-5, g[0] if len(g) > 1 else None, g[-1]),
            lambda o, w, *g: epilogue_reference(o, w, 1e-5, g[0] if len(g) > 1 else None, g[-1]),
            inputs,
            dtype,
        )
        rows.append(dict(stage="epilogue", gated=gated, shape=[B, T, Hq, d], dtype=str(dtype), **err))
    for row in rows:
        row["ok"] = max(row["values"], row["grads"]) < TOL[torch.float32 if "32" in row["dtype"] else torch.bfloat16]
    report["fused_checks"] = dict(all_ok=all(r["ok"] for r in rows), tolerance="1e-5 float32, 2e-2 bfloat16", rows=rows)
    print(
        "fused checks:",
        "ok" if report["fused_checks"]["all_ok"] else "FAILED",
        max(r["grads"] for r in rows),
        flush=True,
    )
    save()


def check_gate_passes() -> None:
    """The gate solvers against the float64 chunkwise reference on the GPU: the sweeps (``scan``, what ``auto``
    picks) for frozen chunk gates, and the opt-in matmul gate passes (frozen gates; exact gates through the fixed
    point, converged), on random inputs at the bench's mixer shape and an awkward GQA one, and on inputs whose forget
    gates dip just below zero, as bf16 rounding makes them in training (``negative_gate_inputs``), or are exactly zero
    once a token per 16 (``vanishing_gate_inputs``), where the matmul passes' reverse pass loses its accuracy."""
    from lattice_plugin.kernels.chunk import chunk_lattice
    from lattice_plugin.kernels.gates import normalize_slots
    from lattice_plugin.kernels.triton_chunk import chunk_lattice_triton

    from lattice_plugin.bench import lattice_inputs, negative_gate_inputs, vanishing_gate_inputs

    def random_case(B, T, Hq, H, m, d, device):
        q, k, v, beta, _ = lattice_inputs(B, T, Hq, H, m, d, dtype=torch.float32, device=device)
        return q, k, v, beta, torch.randn(B, H, d, m, device=device)

    builders = {"random": random_case, "negative gates": negative_gate_inputs, "vanishing gates": vanishing_gate_inputs}

    # (inputs, shape, dtype, gates, solver, tolerance): a tolerance of None records the errors and asks for finite ones
    # only: the matmul passes' reverse pass divides by the gate, so near a zero gate it has no meaningful bound
    model, awkward, near_zero = (2, 300, 12, 12, 64, 64), (2, 200, 6, 3, 20, 24), (1, 256, 4, 2, 64, 64)
    cases = [
        ("random", model, torch.bfloat16, "chunk", "scan", 2e-2),
        ("random", awkward, torch.float32, "chunk", "scan", 1e-4),
        ("negative gates", near_zero, torch.float32, "chunk", "scan", 3e-3),
        ("negative gates", model, torch.bfloat16, "chunk", "scan", 2e-2),
        ("vanishing gates", near_zero, torch.float32, "chunk", "scan", 1e-4),
        ("vanishing gates", model, torch.bfloat16, "chunk", "scan", 2e-2),
        ("random", model, torch.bfloat16, "chunk", "fixed_point", 2e-2),
        ("random", model, torch.bfloat16, "exact", "fixed_point", 2e-2),
        ("random", awkward, torch.float32, "chunk", "fixed_point", 1e-4),
        ("negative gates", near_zero, torch.float32, "chunk", "fixed_point", 3e-3),
        ("negative gates", near_zero, torch.float32, "exact", "fixed_point", 3e-3),
        ("negative gates", model, torch.bfloat16, "chunk", "fixed_point", None),
        ("vanishing gates", near_zero, torch.float32, "chunk", "fixed_point", None),  # not exact at a zero gate
        ("vanishing gates", model, torch.bfloat16, "chunk", "fixed_point", None),
    ]
    rows = []
    for kind, shape, dtype, gates, solver, tol in cases:
        inputs = builders[kind](*shape, device=DEVICE)

        def kernel(q, k, v, beta, s0, dtype, gates=gates, solver=solver):
            state = normalize_slots(s0.float())
            return chunk_lattice_triton(
                q, k, v, beta, state, chunk_size=64, gates=gates, gate_solver=solver, fixed_point_iters=16
            )

        def reference(q, k, v, beta, s0, dtype, gates=gates):
            return tuple(chunk_lattice(q, k, v, beta, normalize_slots(s0), chunk_size=64, gates=gates)[:2])

        err = compare(kernel, reference, inputs, dtype)
        finite = all(math.isfinite(e) for e in err.values())
        ok = finite and (tol is None or max(err.values()) <= tol)
        rows.append(
            dict(
                inputs=kind,
                shape=list(shape),
                dtype=str(dtype),
                gates=gates,
                solver=solver,
                tolerance=tol,
                ok=ok,
                **err,
            )
        )
        print("gate passes:", rows[-1], flush=True)
    report["gate_pass_checks"] = dict(all_ok=all(r["ok"] for r in rows), rows=rows)
    save()


def lattice_call(B, T, gates):
    from lattice_plugin.bench import lattice_inputs
    from lattice_plugin.ops import lattice_attention

    inputs = lattice_inputs(B, T, 12, 12, 64, 64, requires_grad=True)

    def run():
        o = lattice_attention(*inputs, gates=gates, backend="triton")[0]
        torch.autograd.grad(o, inputs, torch.ones_like(o))
        torch.cuda.synchronize()

    return inputs, run


def measure_compile() -> None:
    """First fwd+bwd of a fresh shape (bf16, m = d = 64, 12 heads, exact) with an empty Triton cache, per-kernel
    build times from Triton's compilation listener; then the remaining variants the bench needs, in one batch."""
    from lattice_plugin.kernels.triton_compile import compile_many
    from triton import knobs

    builds = []

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        builds.append(dict(kernel=getattr(src, "name", "?"), seconds=times.total / 1e6, cache_hit=cache_hit))

    knobs.compilation.listener = listener
    _, run = lattice_call(8, 2048, "exact")
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    first = time.perf_counter() - started
    started = time.perf_counter()
    run()
    second = time.perf_counter() - started
    report["compile"] = dict(
        shape="B=8, T=2048, 12 heads, m=d=64, bf16, gates=exact, fwd+bwd",
        triton_cache_dir=os.environ.get("TRITON_CACHE_DIR"),
        first_call_s=first,
        second_call_s=second,
        builds=list(builds),
        sum_of_builds_s=sum(b["seconds"] for b in builds if not b["cache_hit"]),
        warnings=[str(w.message)[:300] for w in caught],
    )
    print("compile:", {k: v for k, v in report["compile"].items() if k != "builds"}, flush=True)
    save()
    if os.environ.get("OTHER_VARIANTS", "1") != "1":  # short of time: the rows build their variants on first use
        return
    builds.clear()
    started = time.perf_counter()
    calls = []
    for B, T, gates in ((8, 2048, "chunk"), (2, 8192, "exact"), (2, 8192, "chunk")):
        (q, k, v, beta, s0), _ = lattice_call(B, T, gates)
        state = s0.unsqueeze(0).expand(B, -1, -1, -1)  # as ops.lattice_attention hands it to the kernels
        options = (64, gates == "exact", True, True, "scan", 4)  # gate_solver="auto"; as triton_chunk's _OPTIONS
        calls.append(((q, k, v, beta, state), options))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compile_many(calls)
    report["compile"]["other_variants"] = dict(
        what="gates=chunk at B=8; exact and chunk at B=2 (one batch)",
        wall_s=time.perf_counter() - started,
        builds=list(builds),
        warnings=[str(w.message)[:300] for w in caught],
    )
    knobs.compilation.listener = None
    save()


def main() -> int:
    try:
        check_fused()
    except Exception as error:  # a build failure of the fused kernels is a result, and the bench still runs
        report["fused_checks"] = dict(all_ok=False, error=f"{type(error).__name__}: {str(error)[:1000]}")
        print("fused checks: FAILED", report["fused_checks"]["error"], flush=True)
    try:
        check_gate_passes()
    except Exception as error:  # as above: a failure is a result
        report["gate_pass_checks"] = dict(all_ok=False, error=f"{type(error).__name__}: {str(error)[:1000]}")
        print("gate pass checks: FAILED", report["gate_pass_checks"]["error"], flush=True)
    checks_ok = report["fused_checks"]["all_ok"] and report["gate_pass_checks"]["all_ok"]
    if os.environ.get("DRY") == "1" or DEVICE != "cuda":
        return 0 if checks_ok else 1
    if not report["fused_checks"]["all_ok"]:  # the model rows then measure the separate elementwise kernels
        import lattice_plugin.model

        lattice_plugin.model.fused_elementwise = lambda x, backend: False
        report["fused_elementwise"] = "off in the model rows: the fused checks failed"
    save()
    measure_compile()
    from lattice_plugin.bench_training import MIXERS, run_train_bench

    rows = []
    for i, T in enumerate(int(x) for x in os.environ.get("SEQ_LENS", "2048,8192,32768").split(",")):
        if i and time.time() - START > float(os.environ.get("NEXT_IF_BEFORE_S", 240)):
            break  # each length is a complete file (model rows, then op rows): the next only while time is left
        rows += run_train_bench(
            OUT,
            seq_lens=(T,),
            tokens=16384,
            warmup=3 if T < 32768 else 2,
            steps=int(os.environ.get("STEPS", 5)),
            name=f"train_T{T}" + ("_compiled" if COMPILED else ""),
            mixers=tuple(os.environ.get("MIXERS", ",".join(MIXERS)).split(",")),
            compiled=COMPILED,
        )["model"]
    print(
        f"\n{'mixer':>14} {'T':>6} {'tokens/s':>10} {'peak GiB':>9} {'first step s':>12} {'step ms':>8} {'host ms':>8}"
    )
    for row in rows:
        if "tokens_per_s" in row:
            print(
                f"{row['method']:>14} {row['T']:>6} {row['tokens_per_s']:>10.0f} {row['peak_gib']:>9.1f} "
                f"{row['first_step_s']:>12.1f} {row['step_ms']:>8.1f} {row['host_ms']:>8.1f}"
            )
        else:
            print(f"{row['method']:>14} {row['T']:>6} {row.get('error', '')[:80]}")
    return 0 if checks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
