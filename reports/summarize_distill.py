"""Summarise the distillation report JSONs of reports/run_distill_gpu.sh (or any folder of distill-*.json):
held-out perplexity per stage, tokens/s (total and per GPU), peak memory per GPU, and for runs on several GPUs the
speed-up, scaling efficiency and loss-curve agreement against the 1-GPU run of the same model. Runs are named
``<model>-<N>gpu[-<strategy>]`` (e.g. all-1gpu, all-2gpu-fsdp); a run is compared with ``<model>-1gpu[-...]``.

    python reports/summarize_distill.py reports/   > summary.json
"""

import json
import re
import statistics
import sys
from pathlib import Path

RUN_NAME = re.compile(r"^(?P<model>.+)-(?P<gpus>\d+)gpu(?:-(?P<strategy>.+))?$")


def curve(report: dict, stage: str) -> list[float]:
    return [row["loss"] for row in report["stages"][stage]["history"]]


def noise(values: list[float]) -> float:
    """Step-to-step noise of a loss curve: mean |l_t - (l_{t-1} + l_{t+1}) / 2|."""
    if len(values) < 3:
        return float("nan")
    return statistics.mean(abs(values[i] - (values[i - 1] + values[i + 1]) / 2) for i in range(1, len(values) - 1))


def agreement(reference: list[float], other: list[float]) -> dict:
    n = min(len(reference), len(other))
    diffs = [abs(a - b) for a, b in zip(reference[:n], other[:n])]
    last = max(1, n // 4)
    return {
        "steps": n,
        "mean_abs_diff": statistics.mean(diffs),
        "max_abs_diff": max(diffs),
        "reference_step_noise": noise(reference),
        "mean_last_quarter": {
            "reference": statistics.mean(reference[n - last : n]),
            "other": statistics.mean(other[n - last : n]),
        },
    }


def main(folder: Path) -> dict:
    reports = {
        path.stem.removeprefix("distill-"): json.loads(path.read_text())
        for path in sorted(folder.glob("distill-*.json"))
    }
    summary: dict = {"runs": {}}
    for name, report in reports.items():
        env = report["environment"]
        summary["runs"][name] = {
            "device": env["device"],
            "world_size": env["world_size"],
            "strategy": env["strategy"],
            "precision": env["precision"],
            "lattice_layers": report["lattice_layers"],
            "attention_layers": report["attention_layers"],
            "perplexity": report["perplexity"],
            "tokens": report["tokens"],
            "tokens_per_sec": {s: r["steady_tokens_per_sec"] for s, r in report["stages"].items()},
            "tokens_per_sec_per_gpu": {
                s: r["steady_tokens_per_sec"] / env["world_size"]
                for s, r in report["stages"].items()
                if r["steady_tokens_per_sec"]
            },
            "peak_memory_gib_per_gpu": {
                s: max(r["peak_memory_bytes_per_rank"]) / 2**30
                for s, r in report["stages"].items()
                if r.get("peak_memory_bytes_per_rank")
            },
            "train_seconds": {s: r["train_seconds"] for s, r in report["stages"].items()},
            "decode": {k: v for k, v in report.get("decode", {}).items() if k != "tokens"},
            "cache_bytes": report["cache_bytes"],
            "wall_seconds": report["wall_seconds"],
        }
    for name, report in reports.items():
        reference = one_gpu_run(name, reports)
        if reference is None or reference is report:
            continue
        entry = summary["runs"][name]
        world_size = report["environment"]["world_size"]
        entry["speedup_vs_1gpu"] = {
            stage: report["stages"][stage]["steady_tokens_per_sec"]
            / reference["stages"][stage]["steady_tokens_per_sec"]
            for stage in report["stages"]
            if reference["stages"].get(stage, {}).get("steady_tokens_per_sec")
            and report["stages"][stage]["steady_tokens_per_sec"]
        }
        entry["scaling_efficiency"] = {
            stage: speedup / world_size for stage, speedup in entry["speedup_vs_1gpu"].items()
        }
        entry["loss_curve_vs_1gpu"] = {
            stage: agreement(curve(reference, stage), curve(report, stage)) for stage in report["stages"]
        }
    return summary


def one_gpu_run(name: str, reports: dict) -> dict | None:
    """The 1-GPU run of the same model as ``name`` (any strategy, the plain one first)."""
    match = RUN_NAME.match(name)
    if match is None:
        return None
    candidates = sorted(
        other for other in reports if (m := RUN_NAME.match(other)) and m["model"] == match["model"] and m["gpus"] == "1"
    )
    return reports[candidates[0]] if candidates else None


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1] if len(sys.argv) > 1 else "reports")), indent=1))
