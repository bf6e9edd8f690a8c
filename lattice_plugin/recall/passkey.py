"""``lattice recall passkey``: pass-key retrieval at and beyond the training length, a distilled student against its
teacher (or any checkpoints), through the plugin's lm-eval task ``lattice_passkey`` and its lm-eval model.

A checkpoint's ``block_size`` is the length it was trained for (and the length of its RoPE table). To ask for more,
the model is loaded with ``block_size`` raised to the longest prompt plus the answer: RoPE is computed for any
position, so the attention teacher reads past its training length exactly as litgpt would compute it, and the
Lattice student's fixed-slot state does not depend on the length at all.
"""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lattice_plugin.checkpoint import atomic_write, validate_checkpoint
from lattice_plugin.errors import LatticeError
from lattice_plugin.recall.results import device_info, pyplot, write_png

ANSWER_TOKENS = 16  # the task generates at most 12 tokens
SHOWN_ANSWERS = 5  # per length: enough to tell a model that copies from one that repeats a memorised key


def answers(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """What a model answered at one length (lm-eval's logged samples): the first ``SHOWN_ANSWERS`` prompts' targets
    and stripped answers, and how many distinct answers it gave over all prompts (1: a constant guess)."""
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    given = [sample["filtered_resps"][0] for sample in ordered]
    shown = [dict(target=str(s["target"]), answer=a) for s, a in zip(ordered[:SHOWN_ANSWERS], given, strict=False)]
    return dict(answers=shown, distinct_answers=len(set(given)))


def longest_prompt_tokens(data_dir: Path, lengths: list[int], tokenizer: Any) -> dict[int, dict[str, float]]:
    """Mean and longest prompt in tokens of each length's documents (lengths are in words)."""
    stats = {}
    for length in lengths:
        docs = [json.loads(line) for line in (data_dir / f"passkey_{length}.jsonl").read_text().splitlines() if line]
        counts = [len(tokenizer.encode(doc["prompt"])) for doc in docs]
        stats[length] = dict(mean=sum(counts) / len(counts), max=max(counts))
    return stats


def load_extended(checkpoint_dir: Path, length: int, device: torch.device, dtype: torch.dtype):
    """The checkpoint's model with ``block_size`` raised to ``length`` (kept when already larger); its training
    length is returned beside it."""
    from lattice_plugin.checkpoint import load_model

    model = load_model(checkpoint_dir, device=device, dtype=dtype)
    trained = model.config.block_size
    if length > trained:
        model.config.block_size = length
        model.max_seq_length = length  # rebuilds the RoPE table for the longer range
    return model, trained


def run_passkey(
    checkpoints: dict[str, Path],
    lengths: list[int],
    out_path: Path,
    *,
    items: int = 20,
    device: torch.device,
    dtype: str = "auto",
    batch_size: int = 8,
    seed: int = 1234,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score every checkpoint on ``lattice_passkey`` at every length (words); write ``out_path`` (JSON) and a PNG."""
    from lm_eval import simple_evaluate

    from lattice_plugin.evaluation.data import TaskDataConfig, prepare_tasks
    from lattice_plugin.evaluation.lm import LatticeLM, load_tokenizer, resolve_dtype
    from lattice_plugin.evaluation.runner import build_task_manager, enforce_offline

    if not checkpoints:
        raise LatticeError("give at least one checkpoint directory")
    for checkpoint_dir in checkpoints.values():
        validate_checkpoint(checkpoint_dir, tokenizer=True)
    enforce_offline()
    data_config = TaskDataConfig(passkey_lengths=lengths, passkey_items=items, seed=seed)
    tasks_dir = prepare_tasks(out_path.with_suffix("").with_name(out_path.stem + "-task-data"), data_config)
    manager, resolved = build_task_manager(["lattice_passkey"], tasks_dir, [])
    torch_dtype = resolve_dtype(dtype, device)
    models: dict[str, Any] = {}
    for label, checkpoint_dir in checkpoints.items():
        tokenizer = load_tokenizer(checkpoint_dir)
        prompts = longest_prompt_tokens(tasks_dir.parent / "data", data_config.passkey_lengths, tokenizer)
        needed = max(s["max"] for s in prompts.values()) + ANSWER_TOKENS
        model, trained = load_extended(checkpoint_dir, needed, device, torch_dtype)
        layers = list(getattr(model.config, "lattice_layers", []) or [])
        echo(f"{label}: trained length {trained} tokens, scored up to {needed} ({len(layers)} Lattice layers)")
        lm = LatticeLM(
            model=model,
            tokenizer=tokenizer,
            device=str(device),
            dtype=dtype,
            batch_size=batch_size,
            max_length=max(needed, trained),
            max_gen_toks=ANSWER_TOKENS,
        )
        results = simple_evaluate(
            model=lm,
            tasks=resolved,
            task_manager=manager,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            log_samples=True,
        )
        scores = {}
        for length in data_config.passkey_lengths:
            metrics = results["results"][f"lattice_passkey_{length}"]
            scores[str(length)] = dict(
                exact_match=metrics["exact_match,strip"],
                stderr=metrics.get("exact_match_stderr,strip"),
                prompt_tokens_mean=prompts[length]["mean"],
                prompt_tokens_max=prompts[length]["max"],
                beyond_training_length=prompts[length]["max"] + ANSWER_TOKENS > trained,
                **answers(results["samples"][f"lattice_passkey_{length}"]),
            )
            echo(
                f"  {length} words (~{prompts[length]['mean']:.0f} tokens): "
                f"exact match {scores[str(length)]['exact_match']:.3f} "
                f"({scores[str(length)]['distinct_answers']} distinct answers)"
            )
        models[label] = dict(
            checkpoint=str(checkpoint_dir),
            trained_length=trained,
            lattice_layers=layers,
            n_layer=model.config.n_layer,
            parameters=sum(p.numel() for p in model.parameters()),
            scores=scores,
        )
        del lm, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report = dict(
        task="lattice_passkey",
        lengths_words=data_config.passkey_lengths,
        items_per_length=items,
        seed=seed,
        dtype=str(torch_dtype).removeprefix("torch."),
        **device_info(device),
        models=models,
    )
    atomic_write(out_path, json.dumps(report, indent=1) + "\n")
    atomic_write(out_path.with_suffix(".md"), table(report))
    plot(report, out_path.with_suffix(".png"))
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, model in report["models"].items():
        points = sorted((s["prompt_tokens_mean"], s["exact_match"]) for s in model["scores"].values())
        line = axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)[0]
        axis.axvline(model["trained_length"], color=line.get_color(), linestyle=":", linewidth=1)
    axis.set(
        xscale="log",
        xlabel="prompt tokens (dotted: training length)",
        ylabel="exact match",
        ylim=(-0.02, 1.02),
        title=f"pass-key retrieval, {report['items_per_length']} prompts per length ({report['device']})",
    )
    axis.legend(fontsize=8)
    write_png(figure, path)


def table(report: dict[str, Any]) -> str:
    """Markdown: one line per checkpoint, one column per length."""
    lengths = [str(n) for n in report["lengths_words"]]
    first = next(iter(report["models"].values()))["scores"]
    header = (
        "| model | trained length | "
        + " | ".join(f"{n} words (~{first[n]['prompt_tokens_mean']:.0f} tok)" for n in lengths)
        + " |"
    )
    lines = [header, "|" + "---|" * (len(lengths) + 2)]
    for label, model in report["models"].items():
        cells = [f"{model['scores'][n]['exact_match']:.2f}" for n in lengths]
        lines.append(f"| {label} | {model['trained_length']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
