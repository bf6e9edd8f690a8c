"""Resumable results: one JSON file per experiment holding a list of rows, rewritten atomically after every row.

A row is identified by its ``key`` (the mixer and every setting that changes the result); a run skips rows whose key
is already present, so an experiment split over several time-limited calls picks up where the last one stopped.
"""

import json
import platform
from pathlib import Path
from typing import Any

import torch

from lattice_plugin.checkpoint import atomic_write
from lattice_plugin.errors import LatticeError


def device_info(device: torch.device) -> dict[str, Any]:
    """What every row names: the device and the versions that produced it."""
    info: dict[str, Any] = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or '?'})",
        torch=torch.__version__,
    )
    for package in ("triton", "fla"):
        try:
            info[package] = __import__(package).__version__
        except (ImportError, AttributeError):
            info[package] = None
    return info


def row_key(fields: dict[str, Any]) -> str:
    return json.dumps(fields, sort_keys=True)


class ResultsFile:
    """The rows of one experiment in ``path`` (created on the first row)."""

    def __init__(self, path: Path, experiment: str) -> None:
        self.path = Path(path)
        self.experiment = experiment
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                raise LatticeError(f"cannot read results {str(self.path)!r}: {error}") from None
            if not isinstance(data, dict) or data.get("experiment") != experiment or not isinstance(data.get("rows"), list):
                raise LatticeError(f"{str(self.path)!r} does not hold {experiment} results; choose another --results")
            self.rows = data["rows"]

    def find(self, key: dict[str, Any]) -> dict[str, Any] | None:
        wanted = row_key(key)
        return next((row for row in self.rows if row_key(row["key"]) == wanted), None)

    def add(self, row: dict[str, Any]) -> None:
        """Append ``row`` (replacing one with the same key) and rewrite the file."""
        wanted = row_key(row["key"])
        self.rows = [r for r in self.rows if row_key(r["key"]) != wanted] + [row]
        payload = dict(experiment=self.experiment, rows=self.rows)
        atomic_write(self.path, json.dumps(payload, indent=1, default=str) + "\n")


def write_png(figure: Any, path: Path) -> None:
    """Save a matplotlib figure atomically (PNG)."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    atomic_write(path, buffer.getvalue())


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is not installed (the JSON is still written)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
