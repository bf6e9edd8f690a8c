"""Are the FLA peers' numbers in `lattice recall` measurements of the peers? One GPU call, seconds (issue 17).

1. The causality check of every mixer's fresh model at the LM and MQAR shapes (``causality_table``, the check every
   recall row now runs first; the FLA rows that predate it get it here).
2. FLA's chunked kernels against FLA's own token-by-token references, forward and backward, on this GPU and Triton:
   ``chunk_gla`` against ``naive_recurrent_gla`` and ``chunk_delta_rule`` against ``delta_rule_recurrence``
   (float32 references; bf16 and float32 inputs; the recall models' head shapes, K = V = 64). FLA guards a
   miscompiled Hopper kernel of Gated DeltaNet (its #640); this checks that the two layers it lets run are right.

    OUT=dir python bench/fla_peer_check.py          (writes dir/fla_peer_check.json and prints it)
"""

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from lattice_plugin.recall.lm import LMSettings
from lattice_plugin.recall.mixers import causality_table, parse_mixers
from lattice_plugin.recall.mqar import MQARSettings

OUT = Path(os.environ.get("OUT", "/tmp/fla-peer-check"))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def compare(fn, ref_fn, inputs: list[torch.Tensor], dtype: torch.dtype) -> dict:
    """Relative error of the output and of every input gradient, ``fn`` on ``dtype`` inputs vs ``ref_fn`` in
    float32 (FLA's references compute in float32)."""
    ins = [x.to(DEVICE, dtype).requires_grad_() for x in inputs]
    refs = [x.to(DEVICE, torch.float32).requires_grad_() for x in inputs]
    out, ref = fn(*ins), ref_fn(*refs)
    grad = torch.randn_like(ref)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    return dict(out=rel_err(out, ref), grads=[rel_err(x.grad, r.grad) for x, r in zip(ins, refs)])


def kernel_checks() -> list[dict]:
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.delta_rule.naive import delta_rule_recurrence
    from fla.ops.gla import chunk_gla
    from fla.ops.gla.naive import naive_recurrent_gla

    rows = []
    for B, T, H in ((4, 256, 2), (2, 256, 8), (1, 2048, 2)):
        K = 64  # key and value size per head, as in the recall models
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, T, H, K) for _ in range(3))
        g = F.logsigmoid(torch.randn(B, T, H, K)) / 16  # GLA's gate as its layer makes it
        for dtype in (torch.bfloat16, torch.float32):
            gla = compare(
                lambda q, k, v, g: chunk_gla(q, k, v, g)[0],
                lambda q, k, v, g: naive_recurrent_gla(q, k, v, g)[0],
                [q, k, v, g],
                dtype,
            )
            rows.append(dict(kernel="chunk_gla", B=B, T=T, H=H, dtype=str(dtype), inputs="q k v g", **gla))
            qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)  # DeltaNet's layer L2-normalises q and k
            beta = torch.rand(B, T, H)
            delta = compare(
                lambda q, k, v, b: chunk_delta_rule(q, k, v, b)[0],
                lambda q, k, v, b: delta_rule_recurrence(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), b.transpose(1, 2)
                )[0].transpose(1, 2),
                [qn, kn, v, beta],
                dtype,
            )
            rows.append(dict(kernel="chunk_delta_rule", B=B, T=T, H=H, dtype=str(dtype), inputs="q k v beta", **delta))
    return rows


def main() -> None:
    report: dict = dict(
        device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu", torch=torch.__version__
    )
    shapes = {"lm": LMSettings().shape(), "mqar K=64 m=64": MQARSettings().shape(64, 64)}
    report["causality"] = causality_table(parse_mixers(os.environ.get("MIXERS", "all")), shapes, DEVICE)
    try:
        import triton

        report["triton"] = triton.__version__
        report["kernels"] = kernel_checks()
    except ImportError as error:
        report["kernels"] = f"not run: {error}"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fla_peer_check.json.tmp").write_text(json.dumps(report, indent=1))
    os.replace(OUT / "fla_peer_check.json.tmp", OUT / "fla_peer_check.json")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
