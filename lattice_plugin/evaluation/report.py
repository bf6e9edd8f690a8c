"""Side-by-side tables of lm-eval results for several checkpoints: text for the terminal, markdown and a PNG.

``rows(runs)`` flattens lm-eval result dicts into ``(task, metric, filter, higher_is_better, {label: (value,
stderr)})``; the writers format those. All files are written through a temporary file renamed into place.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lattice_plugin.checkpoint import atomic_write


@dataclass
class Row:
    task: str
    metric: str
    filter: str
    higher_is_better: bool | None
    values: dict[str, tuple[float | None, float | None]]
    """checkpoint label -> (value, stderr); None where a checkpoint has no value or no stderr."""

    @property
    def name(self) -> str:
        return self.metric if self.filter in ("none", "") else f"{self.metric} ({self.filter})"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def rows(runs: dict[str, dict[str, Any]]) -> list[Row]:
    """One row per (task or group, metric, filter) found in any run; ``runs`` maps labels to lm-eval results."""
    table: dict[tuple[str, str, str], Row] = {}
    for label, results in runs.items():
        sections = [results.get("results", {}), results.get("groups", {})]
        higher = results.get("higher_is_better", {})
        for section in sections:
            for task, metrics in section.items():
                for key, value in metrics.items():
                    if key == "alias" or "_stderr" in key or "," not in key:
                        continue
                    metric, filter_name = key.split(",", 1)
                    if _number(value) is None:
                        continue
                    row = table.get((task, metric, filter_name))
                    if row is None:
                        row = Row(task, metric, filter_name, higher.get(task, {}).get(metric), {})
                        table[(task, metric, filter_name)] = row
                    stderr = _number(metrics.get(f"{metric}_stderr,{filter_name}"))
                    row.values[label] = (float(value), stderr)
    return sorted(table.values(), key=lambda r: (_natural(r.task), r.metric, r.filter))


def _natural(name: str) -> list:
    """Sort key that puts lattice_passkey_64 before lattice_passkey_128."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def format_value(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    text = f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    if stderr is not None:
        text += f" ± {stderr:.4f}" if abs(stderr) < 1000 else f" ± {stderr:.1f}"
    return text


def markdown_table(table: list[Row], labels: list[str]) -> str:
    header = ["task", "metric", "", *labels]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(labels)) + "|"]
    for row in table:
        arrow = {True: "↑", False: "↓"}.get(row.higher_is_better, "")
        cells = [row.task, row.name, arrow, *(format_value(*row.values.get(label, (None, None))) for label in labels)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def text_table(table: list[Row], labels: list[str]) -> str:
    """A plain aligned table for the terminal (value ± stderr per checkpoint)."""
    header = ["task", "metric", "", *labels]
    body = [
        [
            row.task,
            row.name,
            {True: "↑", False: "↓"}.get(row.higher_is_better, ""),
            *(format_value(*row.values.get(label, (None, None))) for label in labels),
        ]
        for row in table
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    out = []
    for n, line in enumerate([header, *body]):
        cells = (cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        out.append("  ".join(cells))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in out) + "\n"


def markdown_report(table: list[Row], checkpoints: dict[str, str], settings: dict[str, Any], png: str | None) -> str:
    lines = ["# lm-eval results", "", "Checkpoints:", ""]
    lines += [f"- `{label}`: `{path}`" for label, path in checkpoints.items()]
    lines += ["", "Settings: " + ", ".join(f"{key}={value}" for key, value in settings.items()), ""]
    lines += ["Values are `metric ± stderr` (lm-eval's standard error); ↑ higher is better, ↓ lower is better.", ""]
    lines.append(markdown_table(table, list(checkpoints)))
    if png:
        lines.append(f"![summary]({png})")
    return "\n".join(lines) + "\n"


def plot_png(table: list[Row], labels: list[str]) -> bytes | None:
    """A bar chart per (task, metric) with stderr bars, checkpoints side by side; None for an empty table."""
    if not table:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(table))
    rows_n = math.ceil(len(table) / columns)
    figure, axes = plt.subplots(rows_n, columns, figsize=(4.2 * columns, 3.2 * rows_n), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, row in zip(axes.flat, table):
        values = [row.values.get(label, (None, None)) for label in labels]
        heights = [v if v is not None else 0.0 for v, _ in values]
        errors = [e if e is not None else 0.0 for _, e in values]
        bar_colors = [colors[i % len(colors)] for i in range(len(labels))]
        axis.bar(range(len(labels)), heights, yerr=errors, capsize=3, color=bar_colors)
        axis.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        arrow = {True: " (higher is better)", False: " (lower is better)"}.get(row.higher_is_better, "")
        axis.set_title(f"{row.task}\n{row.name}{arrow}", fontsize=9)
        axis.tick_params(axis="y", labelsize=8)
        if min(heights) >= 0:
            axis.set_ylim(bottom=0, top=None if max(h + e for h, e in zip(heights, errors)) > 0 else 1)
    for axis in list(axes.flat)[len(table) :]:
        axis.axis("off")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def write_summary(
    out_dir: Path, table: list[Row], checkpoints: dict[str, str], settings: dict[str, Any]
) -> tuple[Path, Path | None]:
    """Write ``summary.md`` and ``summary.png`` (unless the table is empty) into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    png = plot_png(table, list(checkpoints))
    png_path = out_dir / "summary.png" if png is not None else None
    if png is not None:
        atomic_write(png_path, png)
    md_path = out_dir / "summary.md"
    atomic_write(md_path, markdown_report(table, checkpoints, settings, "summary.png" if png else None))
    return md_path, png_path
