"""Are the FLA peers' numbers in `lattice recall` measurements of the peers? One GPU call of its own (issue 17).

1. The causality check of every mixer's fresh model at the LM and MQAR shapes (``causality_table``, the check every
   recall row now runs first; the FLA rows that predate it get it here).
2. FLA's chunked kernels against FLA's own token-by-token references, forward and backward, on this GPU and Triton:
   ``chunk_gla`` against ``naive_recurrent_gla`` and ``chunk_delta_rule`` against ``delta_rule_recurrence``
   (FLA's references compute in float32; bf16 and float32 inputs; the recall models' head shapes, K = V = 64; the
   largest relative error of the output and of the input gradients, by bench/train_gpu.py's `compare`). FLA guards a
   miscompiled Hopper kernel of Gated DeltaNet (its #640); this checks that the two layers it lets run are right.

    OUT=dir python bench/fla_peer_check.py          (writes dir/fla_peer_check.json and prints it)

``MIXERS`` (default all; ``none`` skips part 1) and ``KERNELS`` (default ``chunk_gla,chunk_delta_rule``) choose what
runs, so that a later call can finish what an earlier one's time cut off.

The report is rewritten after every entry, each with the seconds it took, so a call that runs out of time still
returns what was checked and shows where the time went.
"""

import importlib.util
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from lattice_plugin.recall.lm import LMSettings
from lattice_plugin.recall.mixers import causality_table, parse_mixers
from lattice_plugin.recall.mqar import MQARSettings

OUT = Path(os.environ.get("OUT", "/tmp/fla-peer-check"))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_gpu_compare():
    """``compare`` of bench/train_gpu.py (outputs and every input gradient against a float64 reference), loaded by
    path: the GPU scripts run with PYTHONSAFEPATH set, so a sibling script is not importable by name."""
    spec = importlib.util.spec_from_file_location("train_gpu", Path(__file__).with_name("train_gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compare


def kernel_checks() -> Iterator[dict]:
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.delta_rule.naive import delta_rule_recurrence
    from fla.ops.gla import chunk_gla
    from fla.ops.gla.naive import naive_recurrent_gla

    compare = train_gpu_compare()  # fn(*inputs, dtype); FLA's references compute in float32 whatever they get
    wanted = os.environ.get("KERNELS", "chunk_gla,chunk_delta_rule").split(",")
    for B, T, H in ((4, 256, 2), (2, 256, 8), (1, 2048, 2)):
        K = 64  # key and value size per head, as in the recall models
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, T, H, K) for _ in range(3))
        g = F.logsigmoid(torch.randn(B, T, H, K)) / 16  # GLA's gate as its layer makes it
        qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)  # DeltaNet's layer L2-normalises q and k
        beta = torch.rand(B, T, H)
        for dtype in (torch.bfloat16, torch.float32):
            checks = {
                "chunk_gla": (
                    lambda q, k, v, g, _: chunk_gla(q, k, v, g)[0],
                    lambda q, k, v, g, _: naive_recurrent_gla(q, k, v, g)[0],
                    [q, k, v, g],
                    "q k v g",
                ),
                "chunk_delta_rule": (
                    lambda q, k, v, b, _: chunk_delta_rule(q, k, v, b)[0],
                    lambda q, k, v, b, _: delta_rule_recurrence(
                        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), b.transpose(1, 2)
                    )[0].transpose(1, 2),
                    [qn, kn, v, beta],
                    "q k v beta",
                ),
            }
            for kernel in [name for name in checks if name in wanted]:
                kernel_fn, reference_fn, inputs, names = checks[kernel]
                started = time.perf_counter()
                try:  # FLA refuses some inputs (chunk_delta_rule: float32) with an assertion: a result, not a crash
                    errors = compare(kernel_fn, reference_fn, inputs, dtype)
                except (AssertionError, RuntimeError) as error:
                    errors = dict(error=f"{type(error).__name__}: {str(error).strip()[:300]}")
                entry = dict(kernel=kernel, B=B, T=T, H=H, dtype=str(dtype), inputs=names)
                yield dict(entry, **errors, seconds=seconds(started))


def seconds(started: float) -> float:
    return round(time.perf_counter() - started, 1)


def save(report: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fla_peer_check.json.tmp").write_text(json.dumps(report, indent=1))
    os.replace(OUT / "fla_peer_check.json.tmp", OUT / "fla_peer_check.json")


def main() -> None:
    report: dict = dict(
        device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu", torch=torch.__version__, causality=[]
    )
    shapes = {"lm": LMSettings().shape(), "mqar K=64 m=64": MQARSettings().shape(64, 64)}
    mixers = os.environ.get("MIXERS", "all")
    for mixer in parse_mixers(mixers) if mixers != "none" else []:
        started = time.perf_counter()
        entries = causality_table([mixer], shapes, DEVICE)
        report["causality"] += [dict(entry, seconds=seconds(started)) for entry in entries]
        save(report)
        print(json.dumps(entries), f"{seconds(started)} s", flush=True)
    try:
        import triton

        report["triton"], report["kernels"] = triton.__version__, []
        for row in kernel_checks():
            report["kernels"].append(row)
            save(report)
            print(json.dumps(row), flush=True)
    except ImportError as error:
        report["kernels"] = f"not run: {error}"
    save(report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
