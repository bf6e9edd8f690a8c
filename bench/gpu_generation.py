"""Issue 15 on one GPU, one call: the decode paths checked against each other, then ``lattice bench --model``.

1. Correctness on the 134M shape (random weights), all-Lattice and hybrid (attention every 4th layer), batch 2, in
   bfloat16 and float32: logits of a 200-token prefill and 319 decode steps through the CUDA-graph decoder, the eager
   decoder (fused decode-layer kernel), the eager decoder with the layer work unfused, against the chunked forward.
2. The generation benchmark (:mod:`lattice_plugin.bench_generation`) with the rest of the time budget.

Everything goes under ``$OUT`` as it is measured: correctness.json, generation.json, generation.png.
Usage: ``OUT=dir GEN_BUDGET_S=400 python bench/gpu_generation.py``.
"""

import json
import os
import time
import traceback
from pathlib import Path

import torch

START = time.monotonic()
OUT = Path(os.environ.get("OUT", "out/gpu-generation"))
BUDGET_S = float(os.environ.get("GEN_BUDGET_S", "400"))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TINY = dict(
    block_size=1024,
    vocab_size=500,
    padded_vocab_size=512,
    n_layer=4,
    n_embd=32,
    n_head=4,
    n_query_groups=4,
    head_size=8,
    intermediate_size=64,
    lattice_slots=6,
)  # GEN_TINY=1: a dry run of this script on the CPU
TOLERANCE = {torch.bfloat16: 3e-2, torch.float32: 1e-4}  # relative error of the logits


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def decode_logits(model, idx, prefill: int, mode: str) -> torch.Tensor:
    from lattice_plugin.generation import Decoder
    from lattice_plugin.model import LatticeMixer

    LatticeMixer.fused_decode = mode != "eager_unfused"
    try:
        model.set_kv_cache(batch_size=idx.shape[0], max_seq_length=idx.shape[1], device=idx.device)
        decoder = Decoder(model, idx.shape[0], graph=mode == "graph" and DEVICE.type == "cuda")
        logits = [decoder.prefill(idx[:, :prefill]).float()]
        # copies: a step's logits live in a buffer the next step overwrites
        logits += [decoder.step(idx[:, t]).to(torch.float32, copy=True) for t in range(prefill, idx.shape[1] - 1)]
        return torch.stack(logits, 1)
    finally:
        LatticeMixer.fused_decode = True
        model.clear_kv_cache()


@torch.inference_mode()
def check(kind: str, dtype: torch.dtype) -> dict:
    from lattice_plugin.bench_generation import BUILTIN_134M, build

    torch.manual_seed(0)
    fields = {**BUILTIN_134M, "block_size": 4096, **(TINY if os.environ.get("GEN_TINY") else {})}
    model = build(fields, kind, DEVICE, dtype)
    idx = torch.randint(0, fields["vocab_size"], (2, 520), device=DEVICE)
    model.max_seq_length = idx.shape[1]
    chunked = model(idx)[:, 199:519].float()
    paths = {mode: decode_logits(model, idx, 200, mode) for mode in ("graph", "eager", "eager_unfused")}
    paths["chunked"] = chunked
    pairs = [
        ("graph", "eager"),
        ("eager", "eager_unfused"),
        ("eager", "chunked"),
        ("graph", "chunked"),
        ("eager_unfused", "chunked"),
    ]
    result = {"kind": kind, "dtype": str(dtype).removeprefix("torch."), "tolerance": TOLERANCE[dtype]}
    for a, b in pairs:
        result[f"{a} vs {b}"] = dict(
            rel_err=rel_err(paths[a], paths[b]),
            max_abs=(paths[a] - paths[b]).abs().max().item(),
            argmax_agreement=(paths[a].argmax(-1) == paths[b].argmax(-1)).float().mean().item(),
        )
    result["pass"] = all(result[f"{a} vs {b}"]["rel_err"] < TOLERANCE[dtype] for a, b in pairs)
    return result


def main() -> None:
    import warnings

    warnings.simplefilter("always")
    OUT.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    print(f"device: {device_name}, torch {torch.__version__}", flush=True)
    checks = []
    for kind in ("lattice", "hybrid") if not os.environ.get("GEN_SKIP_CHECKS") else ():
        for dtype in (torch.bfloat16, torch.float32):
            try:
                checks.append(check(kind, dtype))
            except Exception:
                checks.append({"kind": kind, "dtype": str(dtype), "error": traceback.format_exc()[-2000:]})
            print(json.dumps(checks[-1]), flush=True)
            (OUT / "correctness.json").write_text(
                json.dumps(
                    dict(
                        device=device_name,
                        torch=torch.__version__,
                        shape="134M (random weights), batch 2, prefill 200, 319 decode steps",
                        checks=checks,
                    ),
                    indent=1,
                )
            )
    from lattice_plugin.bench_generation import BUILTIN_134M, run_generation_bench

    results = {}
    try:
        remaining = BUDGET_S - (time.monotonic() - START)
        tiny = dict(fields={**BUILTIN_134M, **TINY}, contexts=(40, 200), steps=3) if os.environ.get("GEN_TINY") else {}
        shapes = {
            key: tuple(int(x) for x in os.environ[f"GEN_{key.upper()}"].split(","))
            for key in ("batches", "contexts")
            if os.environ.get(f"GEN_{key.upper()}")
        }
        reserve = float(os.environ.get("GEN_RESERVE_S", "25"))  # for the plot and the table
        results = run_generation_bench(OUT, time_budget_s=remaining - reserve, name="generation", **{**shapes, **tiny})
    except Exception:
        traceback.print_exc()
    print("\n== correctness (relative error of logits, pass within tolerance)")
    for c in checks:
        if "error" in c:
            print(f"{c['kind']:>8} {c['dtype']:>9}  ERROR {c['error'].splitlines()[-1]}")
            continue
        errs = "  ".join(f"{k}: {v['rel_err']:.1e}" for k, v in c.items() if isinstance(v, dict))
        print(f"{c['kind']:>8} {c['dtype']:>9}  pass={c['pass']}  {errs}")
    print("\n== decode ms per token")
    for row in results.get("decode", []):
        print(
            f"{row['method']:>22} B={row['batch']:>3} ctx={row['context']:>7} {row['ms_per_token']:8.3f} ms "
            f"{row['tokens_per_s']:9.0f} tok/s"
        )
    print("\n== prefill ms")
    for row in results.get("prefill", []):
        print(f"{row['kind']:>10} B={row['batch']:>3} T={row['context']:>7} {row['ms']:9.1f}")
    print("\n== targets")
    for name, value in results.get("targets", {}).items():
        print(f"{name}: {'n/a' if value is None else f'{value:.2f}'}")
    print(f"\nskipped: {len(results.get('skipped', []))}; total {time.monotonic() - START:.0f} s")


if __name__ == "__main__":
    main()
