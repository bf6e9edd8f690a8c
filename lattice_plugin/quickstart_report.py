"""The quickstart's report: the table it prints and the picture it draws beside ``report.json``.

``report`` is the ``report.json`` that ``lattice distill`` writes (held-out perplexity per stage, cache bytes of
teacher and student at the recipe's lengths, decode speed).
"""

import io
from pathlib import Path

from lattice_plugin.inspect import format_bytes

ROWS = (  # label, perplexity key, model whose cache and decode speed the row shows
    ("teacher (softmax attention)", "teacher", "teacher"),
    ("converted, before distillation", "converted", "student"),
    ("after stage 1: attention transfer", "stage1", "student"),
    ("after stage 2: logit distillation", "stage2", "student"),
)


def format_table(report: dict) -> list[str]:
    """The report's perplexity / cache / decode table as text lines."""
    perplexity, cache, decode = report["perplexity"], report["cache_bytes"], report.get("decode", {})
    lengths = list(cache["teacher"])
    header = f"{'model':<34} {'held-out ppl':>12}" + "".join(f" {'cache @' + f'{int(n):,}':>14}" for n in lengths)
    header += f" {'decode tok/s':>13}"
    lines = [header, "-" * len(header)]
    for label, key, model in ROWS:
        if key not in perplexity:
            continue
        line = f"{label:<34} {perplexity[key]:>12.2f}" + "".join(
            f" {format_bytes(cache[model][n]):>14}" for n in lengths
        )
        speed = decode.get(f"{model}_tokens_per_sec")
        lines.append(f"{line} {speed:>13.1f}" if speed else line)
    return lines


def cache_curves(teacher_dir: Path, student_dir: Path, lengths: list[int]) -> dict[str, list[int]]:
    """Generation-cache bytes (one sequence, KV in bfloat16, Lattice state in float32) of both checkpoints at each
    length, read off meta-device models (nothing is allocated)."""
    from lattice_plugin.checkpoint import load_config
    from lattice_plugin.inspect import build_meta_model, cache_bytes

    curves = {}
    for name, directory in (("teacher", teacher_dir), ("student", student_dir)):
        model = build_meta_model(load_config(directory))
        curves[name] = [cache_bytes(model, length) for length in lengths]
    return curves


def _tokens(length: int) -> str:
    return f"{length // 1024}k" if length >= 1024 and length % 1024 == 0 else str(length)


def plot_report(report: dict, lengths: list[int], curves: dict[str, list[int]], block_size: int) -> bytes:
    """Two panels as PNG bytes: held-out perplexity per stage; cache bytes against context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    shown = [(label, report["perplexity"][key]) for label, key, _ in ROWS if key in report["perplexity"]]
    colors = ["tab:gray", "tab:red", "tab:orange", "tab:blue"][: len(shown)]
    bars = left.bar(range(len(shown)), [value for _, value in shown], color=colors)
    left.bar_label(bars, fmt="%.1f", fontsize=8)
    left.set_xticks(range(len(shown)), [label.replace(": ", ":\n").replace(", ", ",\n") for label, _ in shown])
    left.tick_params(axis="x", labelsize=7)
    left.set_ylim(bottom=0)
    left.set_ylabel("held-out perplexity (lower is better)")
    left.set_title(f"held-out text: {report['heldout']['tokens']:,} tokens never trained on", fontsize=9)

    for name, color in (("teacher", "tab:gray"), ("student", "tab:blue")):
        right.plot(lengths, curves[name], marker="o", markersize=3, color=color, label=name)
    right.axvline(block_size, color="black", linestyle=":", linewidth=1, label=f"block size ({block_size:,})")
    right.set_xscale("log", base=2)
    right.set_xticks(lengths, [_tokens(length) for length in lengths], fontsize=7)
    right.set_yscale("log", base=2)
    ticks = [size for size in (2**k for k in range(10, 41, 4)) if min(map(min, curves.values())) / 2 <= size]
    ticks = [size for size in ticks if size <= 2 * max(map(max, curves.values()))]
    right.set_yticks(ticks, [format_bytes(size) for size in ticks])
    right.set_xlabel("context length (tokens; beyond the block size: what the same layers would hold)", fontsize=8)
    right.set_ylabel("generation cache, one sequence")
    right.set_title("KV cache (bfloat16) vs fixed-slot state (float32)", fontsize=9)
    right.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()
