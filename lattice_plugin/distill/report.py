"""The final report of ``lattice distill`` (``OUT/report.json`` and the summary printed at the end): held-out
perplexity of teacher, converted student and each stage, tokens, cache bytes, decode speed and the environment."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from lattice_plugin.checkpoint import atomic_write, load_model
from lattice_plugin.distill.args import DistillConfig
from lattice_plugin.distill.checkpointing import STAGE_NAMES
from lattice_plugin.distill.fabric import default_precision, teacher_dtype

REPORT_FILE = "report.json"


def write_report(
    fabric: Any,
    config: DistillConfig,
    teacher: Any,
    teacher_dir: Path,
    student_config: Any,
    teacher_eval: dict,
    reports: dict[int, dict],
    final: Path,
    data: Any,
    seq_len: int,
    started: float,
) -> dict[str, Any]:
    """Assemble, write (``OUT/report.json``) and print the run's report (rank 0): ``teacher`` is the loaded teacher,
    ``teacher_eval`` its held-out metrics, ``reports`` the stages' reports, ``final`` the final student."""
    from lattice_plugin.distill.evaluation import cache_bytes_at

    student_dir, teacher_config = Path(config.student_dir), teacher.config
    first = reports[min(reports)]
    perplexity = {"teacher": teacher_eval["ppl"], "converted": first["heldout_start"]["ppl"]}
    loss = {"teacher": teacher_eval["loss"], "converted": first["heldout_start"]["loss"]}
    for stage, stage_report in reports.items():
        perplexity[f"stage{stage}"] = stage_report["heldout_end"]["ppl"]
        loss[f"stage{stage}"] = stage_report["heldout_end"]["loss"]
    report = {
        "teacher_dir": str(teacher_dir),
        "student_dir": str(student_dir),
        "final_dir": str(final),
        "lattice_layers": student_config.lattice_layers,
        "attention_layers": [i for i in range(student_config.n_layer) if i not in student_config.lattice_layers],
        "n_layer": student_config.n_layer,
        "parameters": {"teacher": sum(p.numel() for p in teacher.parameters()), "student": first["total_parameters"]},
        "heldout": heldout_description(config, teacher_eval, seq_len),
        "perplexity": perplexity,
        "loss": loss,
        "tokens": {
            "teacher_training": teacher_training_tokens(teacher_dir),
            **{f"stage{s}": r["tokens"] for s, r in reports.items()},
            "distill_total": sum(r["tokens"] for r in reports.values()),
        },
        "environment": environment(fabric, config),
        "stages": {f"stage{s}": r for s, r in reports.items()},
    }
    if report["tokens"]["teacher_training"]:
        tokens = report["tokens"]
        tokens["distill_fraction_of_teacher"] = tokens["distill_total"] / tokens["teacher_training"]
    report["cache_bytes"] = {
        "batch_size": 1,
        "kv_dtype": "bfloat16",
        "teacher": cache_bytes_at(teacher_config, config.eval.cache_lengths),
        "student": cache_bytes_at(student_config, config.eval.cache_lengths),
    }
    if config.eval.decode_tokens:
        report["decode"] = measure_decode(fabric, config, teacher, final, data, seq_len)
    report["wall_seconds"] = time.perf_counter() - started
    atomic_write(Path(config.out_dir) / REPORT_FILE, json.dumps(report, indent=1) + "\n")
    print_summary(report)
    return report


def heldout_description(config: DistillConfig, evaluation: dict, seq_len: int) -> dict[str, Any]:
    data = config.data
    return {
        "text": str(getattr(data, "val_data_path", None) or "the data module's validation split"),
        "tokens": evaluation["tokens"],
        "batches_per_rank": evaluation["batches"],
        "sequence_length": seq_len,
    }


def teacher_training_tokens(teacher_dir: Path) -> int | None:
    """``train.max_tokens`` from the teacher's litgpt ``hyperparameters.yaml`` (pretrain writes it), if present."""
    import yaml

    path = Path(teacher_dir) / "hyperparameters.yaml"
    if not path.is_file():
        return None
    try:
        value = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("train", {}).get("max_tokens")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return int(value) if isinstance(value, (int, float)) else None


def environment(fabric: Any, config: DistillConfig) -> dict[str, Any]:
    from importlib.metadata import version

    device = fabric.device
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "accelerator": device.type,
        "world_size": fabric.world_size,
        "num_nodes": config.num_nodes,
        "strategy": config.strategy,
        "precision": config.precision or default_precision(),
        "torch": torch.__version__,
        "lightning": version("lightning"),
        "litgpt": version("litgpt"),
        "cpu_threads": torch.get_num_threads(),
    }


def measure_decode(fabric: Any, config: DistillConfig, teacher: Any, final: Path, data: Any, seq_len: int) -> dict:
    from lattice_plugin.distill.evaluation import decode_speed

    dtype = teacher_dtype(fabric)
    batch = next(iter(data.val_dataloader()))
    prompt_len = min(config.eval.prompt_tokens, seq_len - config.eval.decode_tokens)
    if prompt_len < 1:
        return {"skipped": f"decode_tokens {config.eval.decode_tokens} leaves no room for a prompt in {seq_len}"}
    prompt = batch[0, :prompt_len].long().to(fabric.device)
    student = load_model(final, device=fabric.device, dtype=dtype)
    results = {}
    for name, model in (("teacher", teacher), ("student", student)):
        model.max_seq_length = prompt_len + config.eval.decode_tokens
        results[name] = decode_speed(model, prompt, config.eval.decode_tokens)
        model.max_seq_length = seq_len
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": 1,
        "prompt_tokens": prompt_len,
        "new_tokens": config.eval.decode_tokens,
        "teacher_tokens_per_sec": results["teacher"]["tokens_per_sec"],
        "student_tokens_per_sec": results["student"]["tokens_per_sec"],
        "greedy_agreement": sum(a == b for a, b in zip(results["teacher"]["tokens"], results["student"]["tokens"]))
        / max(1, len(results["teacher"]["tokens"])),
    }


def print_summary(report: dict[str, Any]) -> None:
    from lattice_plugin.inspect import format_bytes

    rows = [("teacher (attention)", "teacher"), ("converted, before distillation", "converted")]
    rows += [
        (f"after stage {s[-1]} ({STAGE_NAMES[int(s[-1])]})", s)
        for s in ("stage1", "stage2")
        if s in report["perplexity"]
    ]
    print("\nheld-out perplexity (" + report["heldout"]["text"] + f", {report['heldout']['tokens']:,} tokens)")
    for label, key in rows:
        print(f"  {label:<42} {report['perplexity'][key]:10.2f}")
    cache = report["cache_bytes"]
    for length in cache["teacher"]:
        print(
            f"  cache at {int(length):,} tokens: teacher {format_bytes(cache['teacher'][length])}, "
            f"student {format_bytes(cache['student'][length])}"
        )
    if "decode" in report and "teacher_tokens_per_sec" in report["decode"]:
        d = report["decode"]
        print(
            f"  decode (batch 1, greedy): teacher {d['teacher_tokens_per_sec']:.1f} tok/s, student {d['student_tokens_per_sec']:.1f} tok/s"
        )
    print(f"  final student: {report['final_dir']}")
