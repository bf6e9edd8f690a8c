"""Resumable results: one JSON file per experiment holding a list of rows, rewritten atomically after every row.

A row is identified by its ``key`` (the mixer and every setting that changes the result); a run skips rows whose key
is already present, so an experiment split over several time-limited calls picks up where the last one stopped.
"""

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from lattice_plugin.checkpoint import atomic_write
from lattice_plugin.errors import LatticeError


def device_info(device: torch.device) -> dict[str, Any]:
    """What every row names: the device and the versions that produced it."""
    info: dict[str, Any] = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
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
    """The rows of one experiment in ``path`` (created on the first row).

    Several processes may share one file (``--shard``, disjoint rows on one GPU): every write happens under a file
    lock and first re-reads the file, so no process drops another's rows.
    """

    def __init__(self, path: Path, experiment: str) -> None:
        self.path = Path(path)
        self.experiment = experiment
        self.rows = self._read()

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise LatticeError(f"cannot read results {str(self.path)!r}: {error}") from None
        if not (
            isinstance(data, dict) and data.get("experiment") == self.experiment and isinstance(data.get("rows"), list)
        ):
            raise LatticeError(f"{str(self.path)!r} does not hold {self.experiment} results; choose another --results")
        return data["rows"]

    def find(self, key: dict[str, Any]) -> dict[str, Any] | None:
        wanted = row_key(key)
        return next((row for row in self.rows if row_key(row["key"]) == wanted), None)

    def add(self, row: dict[str, Any]) -> None:
        """Append ``row`` (replacing one with the same key) and rewrite the file."""
        from filelock import FileLock

        wanted = row_key(row["key"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            self.rows = [r for r in self._read() if row_key(r["key"]) != wanted] + [row]
            payload = dict(experiment=self.experiment, rows=self.rows)
            atomic_write(self.path, json.dumps(payload, indent=1, default=str) + "\n")


RESULT_FIELDS = ("accuracy", "heldout_ppl", "tokens_per_s")
ROW_ERRORS = (RuntimeError, NotImplementedError, AssertionError, ValueError)
"""What a row can fail with that may be a result rather than a bug: out of memory, or another library's kernels
refusing this GPU (the callers decide which; anything else always propagates)."""
Job = tuple[str, dict[str, Any], Callable[[], dict[str, Any]]]
"""A row to run: the mixer's name, the row's key, and the function that trains and measures it."""


def run_pending(
    results: ResultsFile,
    jobs: Iterable[Job],
    *,
    device: "torch.device",
    budget_s: float | None,
    retry_errors: bool,
    echo: Callable[[str], None],
    on_row: Callable[[], None],
    unavailable: Callable[[str], str | None],
    external: Callable[[str], bool],
    shard: tuple[int, int] = (0, 1),
) -> None:
    """Run the jobs whose key is not in ``results`` (and, with ``retry_errors``, those recorded as not measured).

    A mixer that cannot run here (``unavailable`` gives the reason) is skipped with one line and leaves no row, so a
    later run on a machine that has it fills them in. A row that runs out of GPU memory, or fails inside an
    ``external`` mixer (another library's kernels refusing this GPU), is recorded as not measured with the reason;
    any other error stops the run (it is a bug, not a result). Before each row, a run that would overrun ``budget_s``
    (estimated from the longest row so far) stops. ``on_row`` runs after every row (summaries, plots).
    """
    info = device_info(device)
    started, longest, skipped = time.perf_counter(), 0.0, set()
    index, count = shard
    for position, (mixer, key, run) in enumerate(jobs):
        if position % count != index:
            continue
        reason = unavailable(mixer)
        if reason:
            if mixer not in skipped:
                echo(f"skipping {mixer}: {reason}")
                skipped.add(mixer)
            continue
        done = results.find(key)
        if done is not None and not (retry_errors and done.get("error")):
            continue
        if budget_s is not None and time.perf_counter() - started + longest > budget_s:
            echo(
                f"stopping: the next row would overrun the budget of {budget_s:.0f} s (rows take up to "
                f"{longest:.0f} s); run the same command again to continue"
            )
            break
        row_started = time.perf_counter()
        try:
            row = run()
        except ROW_ERRORS as error:
            if isinstance(error, LatticeError) or not (isinstance(error, torch.OutOfMemoryError) or external(mixer)):
                raise
            text = str(error).strip()
            row = dict(error=f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:400])
            echo(f"{mixer}: not measured: {row['error']}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        seconds = time.perf_counter() - row_started
        longest = max(longest, seconds)
        sharing = dict(shard=f"{index}/{count}") if count > 1 else {}
        results.add(dict(key=key, **row, wall_seconds=round(seconds, 1), **info, **sharing))
        on_row()
        shown = ", ".join(f"{name}={key[name]}" for name in ("K", "m", "lr", "seed") if name in key)
        outcome = row.get("error") or ", ".join(f"{name} {row[name]:.4g}" for name in RESULT_FIELDS if row.get(name))
        echo(f"row done ({seconds:.0f} s): {mixer} {shown}: {outcome}")


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
