"""Everything the Triton kernels must show on the GPU, in one device call (writes under $OUT, or bench/results).

1. Stability: T=65536 random bfloat16 forward+backward has no NaN/Inf; 1M tokens of streaming decode keep every
   float32 slot at norm 1 +- 1e-3 (first, and saved at once: the correctness cases take minutes to compile).
2. Correctness at full shapes against the float64 reference on the GPU (fresh random inputs): outputs, final states
   and the gradients of q, k, v, beta, s0 and initial_state; float32 within 1e-4, bfloat16 within 2e-2; odd sizes.
3. Speed (unless --no-speed): the sequential sweeps at 1/2/4 warps, then `lattice bench` (JSON + PNG).

Correctness cases run in worker processes so that Triton's compilation spreads over the CPU cores.
"""

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

OUT = Path(os.environ.get("OUT") or "bench/results")
TOL = {"float32": 1e-4, "bfloat16": 2e-2}

CASES = [  # (name, B, T, Hq, H, m, d, dtype, gates, per-batch initial_state)
    ("fp32 exact GQA", 2, 2048, 8, 4, 64, 128, "float32", "exact", False),
    ("bf16 exact GQA", 2, 2048, 8, 4, 64, 128, "bfloat16", "exact", True),
    ("bf16 exact m=128", 1, 2048, 4, 4, 128, 128, "bfloat16", "exact", False),
    ("bf16 chunk gates", 2, 2048, 8, 4, 64, 128, "bfloat16", "chunk", False),
    ("fp32 chunk gates", 1, 1000, 2, 2, 64, 128, "float32", "chunk", True),
    ("fp32 T=1 m=48 d=80", 2, 1, 4, 2, 48, 80, "float32", "exact", True),
    ("fp32 T=65 m=48 d=80", 2, 65, 4, 2, 48, 80, "float32", "exact", False),
    ("fp32 T=4097 ragged", 1, 4097, 2, 2, 64, 128, "float32", "exact", True),
    ("warm bench m=64", 1, 1024, 16, 16, 64, 128, "bfloat16", "both", False),
    ("warm bench m=128", 1, 1024, 16, 16, 128, 128, "bfloat16", "both", False),
]


def check_case(case) -> dict:
    """One correctness case: Triton vs the float64 chunkwise reference (the recurrence for T=1)."""
    from lattice_plugin.kernels.chunk import chunk_lattice
    from lattice_plugin.kernels.recurrent import recurrent_lattice

    from lattice_plugin.ops import lattice_attention

    name, B, T, Hq, H, m, d, dtype, gates, per_batch = case
    torch.manual_seed(hash(name) % 1000)
    dt = getattr(torch, dtype)
    started = time.time()
    modes = ["exact", "chunk"] if gates == "both" else [gates]
    out = dict(case=name)
    for mode in modes:
        q = torch.randn(B, T, Hq, m, device="cuda")
        k = torch.rand(B, T, H, m, device="cuda") * 2 - 1
        v = torch.nn.functional.normalize(torch.randn(B, T, H, d, device="cuda"), dim=-1)
        beta = torch.rand(B, T, H, device="cuda")
        s0 = torch.randn(H, d, m, device="cuda")
        init = torch.randn(B, H, d, m, device="cuda") if per_batch else None
        ins = [x.to(dt).requires_grad_() for x in (q, k, v, beta)]
        leaves = [s0.clone().requires_grad_()] + ([init.clone().requires_grad_()] if per_batch else [])
        o, f = lattice_attention(
            *ins,
            leaves[0],
            gates=mode,
            initial_state=leaves[1] if per_batch else None,
            output_final_state=True,
            backend="triton",
        )
        d_o, d_f = torch.randn(o.shape, device="cuda"), torch.randn(f.shape, device="cuda")
        ((o.float() * d_o).sum() + (f * d_f).sum()).backward()
        if name.startswith("warm"):
            out[mode] = "compiled"
            continue
        refs = [x.detach().double().requires_grad_() for x in ins]
        rleaves = [x.detach().double().requires_grad_() for x in leaves]
        state = rleaves[1] if per_batch else rleaves[0].unsqueeze(0).expand(B, -1, -1, -1)
        state = state / state.norm(dim=-2, keepdim=True).clamp_min(1e-12)
        if T == 1:
            ro, rf = recurrent_lattice(*refs, state)
        else:
            ro, rf = chunk_lattice(*refs, state, chunk_size=64, gates=mode)
        ((ro * d_o.double()).sum() + (rf * d_f.double()).sum()).backward()
        err = lambda x, r: ((x.double() - r).norm() / r.norm()).item()  # noqa: E731
        errors = {"o": err(o, ro), "final": err(f, rf)}
        errors.update({f"d{n}": err(x.grad, r.grad) for n, x, r in zip(("q", "k", "v", "beta"), ins, refs)})
        if per_batch:
            errors["d_initial_state"] = err(leaves[1].grad, rleaves[1].grad)
        else:
            errors["ds0"] = err(leaves[0].grad, rleaves[0].grad)
        worst = max(errors.values())
        out.update(errors=errors, worst=worst, ok=bool(worst <= TOL[dtype]))
    out["seconds"] = round(time.time() - started, 1)
    return out


def long_sequence(T: int = 65536) -> dict:
    """Random bf16 inputs over 65536 tokens: forward and backward stay finite."""
    from lattice_plugin.bench import lattice_inputs
    from lattice_plugin.ops import lattice_attention

    q, k, v, beta, s0 = lattice_inputs(1, T, 16, 16, 64, 128, requires_grad=True)
    o, f = lattice_attention(q, k, v, beta, s0, output_final_state=True, backend="triton")
    grads = torch.autograd.grad((o.float().square().mean() + f.sum()), [q, k, v, beta, s0])
    finite = all(bool(torch.isfinite(t).all()) for t in (o, f, *grads))
    return dict(T=T, finite=finite, final_norm_dev=(f.norm(dim=-2) - 1).abs().max().item())


def streaming_decode(tokens: int = 1_000_000, per_graph: int = 1000) -> dict:
    """1M decode steps (CUDA graphs of 1000 steps over fresh random tokens): slot norms stay 1 +- 1e-3."""
    from lattice_plugin.ops import lattice_step

    B, Hq, H, m, d = 2, 8, 2, 64, 128
    state = torch.nn.functional.normalize(torch.randn(B, H, d, m, device="cuda"), dim=-2)
    q, k = torch.empty(per_graph, B, Hq, m, device="cuda"), torch.empty(per_graph, B, H, m, device="cuda")
    v, beta = torch.empty(per_graph, B, H, d, device="cuda"), torch.empty(per_graph, B, H, device="cuda")

    def refill():
        q.normal_(), k.uniform_(-1, 1), beta.uniform_(0, 1)
        v.copy_(torch.nn.functional.normalize(torch.randn_like(v), dim=-1))

    refill()
    with torch.no_grad():
        for i in range(3):  # compile and warm outside the graph
            lattice_step(q[i], k[i], v[i], beta[i], state, inplace=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(per_graph):
                lattice_step(q[i], k[i], v[i], beta[i], state, inplace=True)
        started = time.time()
        for _ in range(tokens // per_graph):
            refill()
            graph.replay()
        torch.cuda.synchronize()
    dev = (state.norm(dim=-2) - 1).abs().max().item()
    return dict(
        tokens=tokens,
        max_norm_deviation=dev,
        ok=dev <= 1e-3,
        finite=bool(torch.isfinite(state).all()),
        seconds=round(time.time() - started, 1),
    )


def decode_correctness() -> dict:
    from lattice_plugin.kernels.recurrent import recurrent_step

    from lattice_plugin.ops import lattice_step

    B, Hq, H, m, d = 8, 32, 8, 64, 128
    state = torch.nn.functional.normalize(torch.randn(B, H, d, m, device="cuda"), dim=-2)
    q, k = torch.randn(B, Hq, m, device="cuda"), torch.rand(B, H, m, device="cuda") * 2 - 1
    v = torch.nn.functional.normalize(torch.randn(B, H, d, device="cuda"), dim=-1)
    beta = torch.rand(B, H, device="cuda")
    with torch.no_grad():
        o, s = lattice_step(q, k, v, beta, state)
    ro, rs = recurrent_step(state.double(), q.double(), k.double(), v.double(), beta.double())
    return dict(o=((o.double() - ro).norm() / ro.norm()).item(), state=((s.double() - rs).norm() / rs.norm()).item())


def scan_warps() -> list:
    """The sequential sweeps (forward scan, reverse scan) of 16-bit inputs at 1, 2 and 4 warps per program."""
    from lattice_plugin.kernels import triton_chunk as tc
    from triton.testing import do_bench

    from lattice_plugin.bench import lattice_inputs
    from lattice_plugin.ops import lattice_attention

    rows = []
    default = tc.FWD_SCAN_WARPS, tc.BWD_SCAN_WARPS
    for B, T in ((16, 2048), (1, 32768)):
        inputs = lattice_inputs(B, T, 16, 16, 64, 128, requires_grad=True)
        grad = torch.randn(B, T, 16, 128, device="cuda", dtype=torch.bfloat16)

        def train():
            return torch.autograd.grad(lattice_attention(*inputs, backend="triton")[0], inputs, grad)

        for warps in (1, 2, 4):
            tc.FWD_SCAN_WARPS = tc.BWD_SCAN_WARPS = warps
            with torch.no_grad():
                fwd = do_bench(
                    lambda: lattice_attention(*inputs, backend="triton"), warmup=10, rep=100, return_mode="median"
                )
            rows.append(
                dict(
                    B=B,
                    T=T,
                    m=64,
                    warps=warps,
                    fwd_ms=fwd,
                    fwd_bwd_ms=do_bench(train, warmup=10, rep=100, return_mode="median"),
                )
            )
            print(rows[-1], flush=True)
    tc.FWD_SCAN_WARPS, tc.BWD_SCAN_WARPS = default
    return rows


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    save = lambda: (OUT / "gpu_suite.json").write_text(json.dumps(report, indent=2))  # noqa: E731
    started = time.time()
    # stability first: a call cut off during the (long) compilation of the correctness cases keeps it
    report["decode_correctness"] = decode_correctness()
    report["long_sequence"] = long_sequence()
    report["streaming_decode"] = streaming_decode()
    print(report["decode_correctness"], report["long_sequence"], report["streaming_decode"], flush=True)
    save()
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(CASES), mp_context=ctx) as pool:
        report["correctness"] = list(pool.map(check_case, CASES))
    print(f"correctness done in {time.time() - started:.0f}s", flush=True)
    for row in report["correctness"]:
        print(row, flush=True)
    save()
    if "--no-speed" not in sys.argv:
        report["scan_warps"] = scan_warps()
        save()
        from lattice_plugin.bench import run_bench

        run_bench(OUT, name="bench_h100")
    print(f"suite done in {time.time() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
