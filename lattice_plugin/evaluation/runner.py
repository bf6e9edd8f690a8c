"""``lattice eval``: lm-eval, offline, on one or more checkpoints, with a side-by-side report.

Steps: check every checkpoint directory (cheap files first); generate the shipped tasks' data into the output
directory (or use a directory from ``lattice eval-data``); resolve the task names (shipped tasks need no scan of
lm-eval's 10k+ stock task files; anything else does); load every task once so that a stock task whose data is not
available locally fails before any model runs, with a message that says what it needs; then run
``lm_eval.simple_evaluate`` per checkpoint and write the results.

Output directory::

    results.json              all checkpoints: {"checkpoints": {label: dir}, "settings", "results": {label: lm-eval}}
    lm-eval/<label>.json      lm-eval's own result JSON of each checkpoint
    samples/<label>/<task>.jsonl   per-document outputs (with log_samples)
    summary.md, summary.png   the side-by-side table and its chart
    task-data/                the generated data and task YAMLs (an lm-eval --include_path: task-data/tasks)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lattice_plugin.checkpoint import atomic_write, validate_checkpoint
from lattice_plugin.errors import LatticeError, first_line
from lattice_plugin.evaluation.data import SUITE_TAG, TaskDataConfig, prepare_tasks, task_names

log = logging.getLogger(__name__)


def enforce_offline() -> None:
    """Nothing is downloaded at run time: Hugging Face hub and datasets run offline (env and already-imported
    modules), so a missing dataset fails at once instead of reaching for the network."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    try:
        import datasets.config as datasets_config

        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True
    except ImportError:
        pass


def checkpoint_labels(checkpoint_dirs: list[Path]) -> dict[str, Path]:
    """Short unique labels for the table: the directory name (with its parent for litgpt's generic ``final`` and
    ``step-N`` names), made unique with more parents or a number."""
    labels: dict[str, Path] = {}
    for path in checkpoint_dirs:
        path = Path(path)
        parts = path.absolute().parts
        generic = path.name == "final" or path.name.startswith("step-")
        label = "/".join(parts[-2:]) if generic else (path.name or str(path))
        depth = 3 if generic else 2
        while label in labels and depth <= len(parts):
            label = "/".join(parts[-depth:])
            depth += 1
        base, n = label, 2
        while label in labels:
            label, n = f"{base}#{n}", n + 1
        labels[label] = path
    return labels


def split_tasks(tasks: str | list[str]) -> list[str]:
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    names = [name.strip() for item in items for name in str(item).split(",") if name.strip()]
    if not names:
        raise LatticeError("no task given; pass --tasks (e.g. lattice_suite, or lattice_ppl,lattice_kv_recall)")
    return names


@dataclass
class EvalSettings:
    device: str | None = None
    dtype: str = "auto"
    batch_size: int = 8
    max_length: int | None = None
    max_gen_toks: int = 256
    use_cache: bool = True
    limit: float | None = None
    num_fewshot: int | None = None
    bootstrap_iters: int = 1000
    seed: int = 1234
    log_samples: bool = False
    gen_kwargs: dict[str, Any] | None = None
    include_path: list[str] = field(default_factory=list)


def build_task_manager(names: list[str], tasks_dir: Path, include_path: list[str]):
    """A TaskManager that knows ``names``; the stock task index (seconds to build) only when it is needed."""
    from lm_eval.tasks import TaskManager

    shipped = set(task_names(tasks_dir))
    paths = [str(tasks_dir), *[str(Path(p).absolute()) for p in include_path]]
    for p in include_path:
        if not Path(p).is_dir():
            raise LatticeError(f"include path {p!r} is not a directory")
    import fnmatch

    def known_locally(name: str) -> bool:
        return name in shipped or any(fnmatch.fnmatch(s, name) for s in shipped)

    local_only = all(known_locally(name) for name in names) and not include_path
    unknown_lattice = [n for n in names if n.startswith("lattice") and not known_locally(n)]
    if unknown_lattice:
        raise LatticeError(
            f"unknown task {unknown_lattice[0]!r}: the plugin ships {', '.join(sorted(shipped))} "
            f"(tag {SUITE_TAG} runs them all)"
        )
    manager = TaskManager(include_path=paths, include_defaults=not local_only)
    resolved = []
    for name in names:
        matched = manager.match_tasks([name])
        if not matched:
            raise LatticeError(
                f"unknown task {name!r}: neither a shipped task ({', '.join(sorted(shipped))}) nor an lm-eval task, "
                "group or tag (list them with `lm-eval ls tasks`; add your own YAML directory with --include-path)"
            )
        resolved += [m for m in matched if m not in resolved]
    return manager, resolved


def _data_requirements(manager, name: str, depth: int = 0) -> list[str]:
    """What a task (or the tasks of a group or tag) reads: Hugging Face dataset ids or local data files."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is None or depth > 3:
        return []
    if entry.kind == Kind.TAG:
        members = [n for n, e in manager.task_index.items() if name in e.tags]
        return sorted({need for member in members for need in _data_requirements(manager, member, depth + 1)})
    try:
        cfg = entry.cfg or (load_yaml(entry.yaml_path, resolve_func=False, recursive=True) if entry.yaml_path else {})
    except Exception:
        cfg = {}
    if entry.kind == Kind.GROUP:
        children = [c for c in cfg.get("task", []) if isinstance(c, str)]
        return sorted({need for child in children for need in _data_requirements(manager, child, depth + 1)})
    needs = []
    data_files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if data_files:
        files = data_files.values() if isinstance(data_files, dict) else [data_files]
        needs += [f"the local file {f}" for f in files if isinstance(f, str)]
    elif cfg.get("dataset_path"):
        dataset = cfg["dataset_path"] + (f" (config {cfg['dataset_name']})" if cfg.get("dataset_name") else "")
        needs.append(f"the Hugging Face dataset {dataset}")
    return needs


def check_task_data(manager, names: list[str]) -> None:
    """Load every task once (offline) and turn a data failure into one clear message naming what is missing."""
    for name in names:
        try:
            manager.load([name])
        except Exception as error:
            needs = _data_requirements(manager, name)
            cause = first_line(error)[:300]
            what = "; ".join(needs[:5]) + (" ..." if len(needs) > 5 else "") if needs else "data that is not here"
            try:
                import datasets.config

                cache = str(datasets.config.HF_DATASETS_CACHE)
            except ImportError:
                cache = "~/.cache/huggingface/datasets"
            example = "datasets.load_dataset(PATH, CONFIG)"
            hub = [need for need in needs if need.startswith("the Hugging Face dataset ")]
            if hub:
                dataset = hub[0].removeprefix("the Hugging Face dataset ")
                path, _, config = dataset.partition(" (config ")
                example = f"datasets.load_dataset({path!r}" + (f", {config.rstrip(')')!r})" if config else ")")
            raise LatticeError(
                f"task {name!r} cannot load its data offline ({type(error).__name__}: {cause}). It needs {what}. "
                f'Nothing is downloaded at run time: fetch it once where there is network (python -c "import '
                f'datasets; {example}"), copy the Hugging Face cache to this machine ({cache}), or run the '
                f"shipped tasks ({SUITE_TAG})"
            ) from None


def run_eval(
    checkpoint_dirs: list[Path],
    tasks: str | list[str],
    out_dir: Path,
    settings: EvalSettings | None = None,
    data_config: TaskDataConfig | None = None,
    tasks_dir: Path | None = None,
    echo=print,
) -> dict[str, Any]:
    """Evaluate every checkpoint on ``tasks`` and write the outputs (see the module docstring); returns the combined
    results dict (also written as ``results.json``)."""
    settings = settings or EvalSettings()
    if not checkpoint_dirs:
        raise LatticeError("give at least one checkpoint directory")
    for checkpoint_dir in checkpoint_dirs:  # config, weights' headers, tokenizer: before anything is written
        validate_checkpoint(checkpoint_dir, tokenizer=True)
    names = split_tasks(tasks)
    labels = checkpoint_labels(list(checkpoint_dirs))
    out_dir = Path(out_dir)
    enforce_offline()
    task_data = out_dir / "task-data"
    made_task_data = tasks_dir is None and not task_data.exists()
    try:
        return _evaluate(labels, names, out_dir, settings, data_config, tasks_dir, echo)
    except BaseException:
        if made_task_data:  # a run that fails (a model that does not load, a task without its data) leaves none
            shutil.rmtree(task_data, ignore_errors=True)
        raise


def _evaluate(
    labels: dict[str, Path],
    names: list[str],
    out_dir: Path,
    settings: EvalSettings,
    data_config: TaskDataConfig | None,
    tasks_dir: Path | None,
    echo,
) -> dict[str, Any]:
    if tasks_dir is None:
        tasks_dir = prepare_tasks(out_dir / "task-data", data_config or TaskDataConfig())
    else:
        tasks_dir = Path(tasks_dir)
        if (tasks_dir / "tasks").is_dir():
            tasks_dir = tasks_dir / "tasks"
        if not (tasks_dir.parent / "manifest.json").is_file():
            raise LatticeError(f"{str(tasks_dir)!r} is not a directory written by `lattice eval-data`")

    import lattice_plugin.evaluation.lm  # noqa: F401  (registers the model)

    manager, resolved = build_task_manager(names, tasks_dir, settings.include_path)
    check_task_data(manager, resolved)

    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    from lattice_plugin.evaluation.lm import LatticeLM

    runs: dict[str, dict[str, Any]] = {}
    for label, checkpoint_dir in labels.items():
        echo(f"evaluating {label} ({checkpoint_dir}) on {', '.join(resolved)}")
        model_args = {
            "checkpoint_dir": str(checkpoint_dir),
            "device": settings.device,
            "dtype": settings.dtype,
            "batch_size": settings.batch_size,
            "max_length": settings.max_length,
            "max_gen_toks": settings.max_gen_toks,
            "use_cache": settings.use_cache,
        }
        lm = LatticeLM(**model_args)
        results = simple_evaluate(
            model=lm,
            tasks=resolved,
            task_manager=manager,
            num_fewshot=settings.num_fewshot,
            limit=settings.limit,
            bootstrap_iters=settings.bootstrap_iters,
            log_samples=settings.log_samples,
            gen_kwargs=settings.gen_kwargs,
            random_seed=settings.seed,
            numpy_random_seed=settings.seed,
            torch_random_seed=settings.seed,
            fewshot_random_seed=settings.seed,
        )
        results["config"].update(
            model="lattice",
            model_args={k: v for k, v in model_args.items() if v is not None},
            batch_size=lm.batch_size,
            device=str(lm.device),
        )
        del lm
        samples = results.pop("samples", None)
        runs[label] = json.loads(json.dumps(results, default=handle_non_serializable, ensure_ascii=False))
        atomic_write(out_dir / "lm-eval" / f"{_safe(label)}.json", json.dumps(runs[label], indent=2) + "\n")
        if samples:
            for task, task_samples in samples.items():
                lines = "".join(
                    json.dumps(s, default=handle_non_serializable, ensure_ascii=False) + "\n" for s in task_samples
                )
                atomic_write(out_dir / "samples" / _safe(label) / f"{task}.jsonl", lines)
        _release_memory()

    from lattice_plugin.evaluation import report

    table = report.rows(runs)
    shown = {
        "tasks": ",".join(resolved),
        "limit": settings.limit,
        "num_fewshot": settings.num_fewshot,
        "batch_size": settings.batch_size,
        "max_length": settings.max_length or "block_size",
        "dtype": settings.dtype,
        "task_data": str(tasks_dir.parent),
    }
    combined = {
        "checkpoints": {label: str(path) for label, path in labels.items()},
        "tasks": resolved,
        "settings": {**asdict(settings), "task_data": str(tasks_dir.parent)},
        "results": runs,
    }
    atomic_write(out_dir / "results.json", json.dumps(combined, indent=2, default=str) + "\n")
    md_path, png_path = report.write_summary(out_dir, table, combined["checkpoints"], shown)
    echo(report.text_table(table, list(labels)))
    echo(f"wrote {out_dir / 'results.json'}, {md_path}" + (f", {png_path}" if png_path else ""))
    return combined


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.#" else "_" for c in label)


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
