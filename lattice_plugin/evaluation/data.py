"""The plugin's offline lm-eval tasks: deterministic data from local text, and task YAMLs with absolute data paths.

:func:`prepare_tasks` writes ``OUT_DIR/data/*.jsonl`` and ``OUT_DIR/tasks/*.yaml`` (copies of the templates in
``lattice_plugin/evaluation/tasks/`` whose ``data_files`` point at the generated files by absolute path, since lm-eval
resolves relative paths against the working directory), plus ``OUT_DIR/manifest.json`` with the settings and the
text's SHA-256. ``OUT_DIR/tasks`` is an lm-eval ``--include_path``. The same settings and text give byte-identical
files. Tasks:

- ``lattice_ppl``: word/byte perplexity and bits per byte of the held-out text, cut into documents at blank lines.
- ``lattice_kv_recall``: recall one value out of ``kv_pairs`` key-value lines spread through filler text so that the
  prompt has about ``kv_context_words`` words.
- ``lattice_passkey_<N>`` (group ``lattice_passkey``): a five-digit pass key hidden in about ``N`` words of filler.
- ``lattice_cloze``: the true next word of a held-out passage against three distractors from the same text.

All four carry the tag ``lattice_suite``. The text (default: the shipped held-out split, never used for training) feeds
the perplexity and cloze documents and the key-value filler.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from lattice_plugin.errors import LatticeError

SHIPPED_TASKS = ("lattice_ppl", "lattice_kv_recall", "lattice_passkey", "lattice_cloze")
SUITE_TAG = "lattice_suite"
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DATA_VERSION = 1


@dataclass
class TaskDataConfig:
    """Settings of the generated data (all lengths in whitespace-separated words, not tokens: the data does not
    depend on a tokenizer; English BPE text runs at roughly 1.2-1.5 tokens per word)."""

    text: str | None = None
    """Held-out text file for perplexity, cloze and key-value filler (None: the shipped ``val/`` split)."""
    seed: int = 1234
    ppl_doc_chars: int = 2000
    """Perplexity documents are whole paragraphs grouped up to about this many characters."""
    ppl_max_docs: int | None = None
    kv_pairs: int = 8
    kv_context_words: int = 200
    """Approximate prompt length of key-value recall; filler from the text pads the pairs up to it (0: no filler)."""
    kv_items: int = 100
    passkey_lengths: list[int] = field(default_factory=lambda: [128, 512, 2048])
    passkey_items: int = 20
    cloze_items: int = 500
    cloze_context_words: tuple[int, int] = (12, 80)
    """Minimum and maximum number of words before the blank."""

    def __post_init__(self) -> None:
        checks = [
            (self.ppl_doc_chars >= 1, "ppl_doc_chars must be >= 1"),
            (self.ppl_max_docs is None or self.ppl_max_docs >= 1, "ppl_max_docs must be >= 1"),
            (1 <= self.kv_pairs <= 1000, "kv_pairs must be in 1..1000"),
            (self.kv_context_words >= 0, "kv_context_words must be >= 0"),
            (self.kv_items >= 1, "kv_items must be >= 1"),
            (bool(self.passkey_lengths), "passkey_lengths needs at least one length"),
            (all(int(n) >= 16 for n in self.passkey_lengths), "passkey lengths must be >= 16 words"),
            (self.passkey_items >= 1, "passkey_items must be >= 1"),
            (self.cloze_items >= 1, "cloze_items must be >= 1"),
            (
                1 <= self.cloze_context_words[0] <= self.cloze_context_words[1],
                "cloze_context_words must be 1 <= min <= max",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise LatticeError(message)
        self.passkey_lengths = sorted({int(n) for n in self.passkey_lengths})
        self.cloze_context_words = (int(self.cloze_context_words[0]), int(self.cloze_context_words[1]))


def default_text() -> Path:
    from lattice_plugin.corpus import shipped_corpus

    return shipped_corpus() / "val" / "fortunes-heldout.txt"


def templates_dir() -> Path:
    return Path(str(resources.files("lattice_plugin.evaluation") / "tasks"))


def read_text(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise LatticeError(f"text file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LatticeError(f"text file {str(path)!r} is not UTF-8 text") from None
    if len(text.split()) < 50:
        raise LatticeError(f"text file {str(path)!r} holds fewer than 50 words; the tasks need more held-out text")
    return text


# ------------------------------------------------------------------------------------------------ generators
def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, trailing whitespace of each line removed."""
    blocks = re.split(r"\n\s*\n", text.replace("\r\n", "\n"))
    return [block.strip("\n").rstrip() for block in blocks if block.strip()]


def make_ppl_docs(text: str, config: TaskDataConfig) -> list[dict]:
    docs, current = [], []
    for paragraph in paragraphs(text):
        current.append(paragraph)
        if sum(len(p) + 2 for p in current) >= config.ppl_doc_chars:
            docs.append("\n\n".join(current))
            current = []
    if current:
        docs.append("\n\n".join(current))
    if config.ppl_max_docs is not None:
        docs = docs[: config.ppl_max_docs]
    return [{"text": doc} for doc in docs]


def _filler_words(text: str) -> list[str]:
    return text.split()


def _random_key(rng: random.Random, used: set[str]) -> str:
    while True:
        key = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4))
        if key not in used:
            used.add(key)
            return key


def make_kv_docs(text: str, config: TaskDataConfig) -> list[dict]:
    rng = random.Random(f"kv-{config.seed}")
    words = _filler_words(text)
    docs = []
    header = "Below is a list of keys and their values. Remember them.\n"
    for _ in range(config.kv_items):
        used: set[str] = set()
        pairs = [(_random_key(rng, used), f"{rng.randrange(1000, 10000)}") for _ in range(config.kv_pairs)]
        pair_lines = [f"key {key} has value {value}." for key, value in pairs]
        pair_words = sum(len(line.split()) for line in pair_lines) + len(header.split()) + 12
        filler_total = max(0, config.kv_context_words - pair_words)
        # the filler is cut into len(pairs) + 1 runs: before, between and after the pairs
        runs = [filler_total // (len(pairs) + 1)] * (len(pairs) + 1)
        for extra in range(filler_total - sum(runs)):
            runs[extra] += 1
        lines = []
        for i, run in enumerate(runs):
            if run:
                start = rng.randrange(0, max(1, len(words) - run))
                lines.append(" ".join(words[start : start + run]))
            if i < len(pair_lines):
                lines.append(pair_lines[i])
        query, answer = pairs[rng.randrange(len(pairs))]
        prompt = header + "\n".join(lines) + f"\nQuestion: what is the value of key {query}?\nAnswer:"
        docs.append({"prompt": prompt, "answer": answer, "query": query, "pairs": len(pairs)})
    return docs


def passkey_document(rng: random.Random, length: int) -> dict:
    """One pass-key document of about ``length`` words: a five-digit key at a random depth in repeated filler, and
    the question whose answer is the key (``prompt``, ``answer``, ``length``, ``depth``)."""
    header = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n"
    filler_words = PASSKEY_FILLER.split()
    key = f"{rng.randrange(10000, 100000)}"
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    question = "\nWhat is the pass key? The pass key is"
    budget = max(0, length - len(header.split()) - len(needle.split()) - len(question.split()))
    sentences = max(1, round(budget / len(filler_words)))
    depth = rng.randrange(sentences + 1)
    body = [PASSKEY_FILLER] * depth + [needle] + [PASSKEY_FILLER] * (sentences - depth)
    prompt = header + " ".join(body) + question
    return {"prompt": prompt, "answer": key, "length": length, "depth": round(depth / sentences, 3)}


def make_passkey_docs(length: int, config: TaskDataConfig) -> list[dict]:
    rng = random.Random(f"passkey-{config.seed}-{length}")
    return [passkey_document(rng, length) for _ in range(config.passkey_items)]


def passkey_training_text(documents: int, max_words: int) -> str:
    """``documents`` answered pass-key documents of 32 to ``max_words`` words (uniformly drawn), blank-line separated,
    from a generator seeded apart from the evaluation's: training text that teaches the format of
    ``lattice_passkey`` at lengths up to ``max_words``, so that the task can then measure lengths beyond them."""
    if documents < 1 or max_words < 32:
        raise LatticeError(
            f"pass-key training text needs documents >= 1 and max_words >= 32, got {documents}, {max_words}"
        )
    rng = random.Random("passkey-training-0")
    texts = []
    for _ in range(documents):
        doc = passkey_document(rng, rng.randint(32, max_words))
        texts.append(f"{doc['prompt']} {doc['answer']}.")
    return "\n\n".join(texts) + "\n"


_WORD = re.compile(r"[A-Za-z]{3,}")


def make_cloze_docs(text: str, config: TaskDataConfig) -> list[dict]:
    rng = random.Random(f"cloze-{config.seed}")
    vocabulary = sorted({w.lower() for w in text.split() if _WORD.fullmatch(w)})
    if len(vocabulary) < 8:
        raise LatticeError("the text has too few distinct words to build cloze distractors")
    by_length: dict[int, list[str]] = {}
    for word in vocabulary:
        by_length.setdefault(len(word), []).append(word)
    low, high = config.cloze_context_words
    docs = []
    for paragraph in paragraphs(text):
        words = paragraph.split()
        candidates = [i for i in range(low, min(len(words), high + 1)) if _WORD.fullmatch(words[i])]
        if not candidates:
            continue
        cut = rng.choice(candidates)
        answer = words[cut]
        pool = [w for n in range(len(answer) - 2, len(answer) + 3) for w in by_length.get(n, []) if w != answer.lower()]
        if len(pool) < 3:
            pool = [w for w in vocabulary if w != answer.lower()]
        distractors = rng.sample(pool, 3)
        if answer[0].isupper():
            distractors = [w.capitalize() for w in distractors]
        choices = distractors + [answer]
        rng.shuffle(choices)
        docs.append({"context": " ".join(words[:cut]), "choices": choices, "label": choices.index(answer)})
        if len(docs) == config.cloze_items:
            break
    if not docs:
        raise LatticeError(f"no paragraph of the text has more than {low} words; the cloze task cannot be built")
    return docs


# ------------------------------------------------------------------------------------------------ writing
def _jsonl(docs: list[dict]) -> str:
    return "".join(json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n" for doc in docs)


def _task_yaml(template: Path, data_file: Path, length: int | None = None) -> str:
    """The template's text (comments kept) with ``data_files`` made absolute and ``LENGTH`` filled in."""
    text = template.read_text(encoding="utf-8")
    if length is not None:
        text = text.replace("LENGTH", str(length))
    relative = yaml.safe_load(text)["dataset_kwargs"]["data_files"]["test"]
    line = f"    test: {relative}\n"
    if text.count(line) != 1:
        raise LatticeError(f"task template {template.name} must hold the line {line.strip()!r} exactly once")
    text = text.replace(line, f"    test: {json.dumps(str(data_file.resolve()))}\n")
    header = (
        f"# Generated by `lattice eval-data` from lattice_plugin/evaluation/tasks/{template.name}: data_files is "
        "absolute\n# because lm-eval resolves relative paths against the working directory.\n"
    )
    return header + text


def prepare_tasks(out_dir: Path, config: TaskDataConfig | None = None, force: bool = True) -> Path:
    """Write the data and the task YAMLs of the shipped tasks into ``out_dir`` (see the module docstring).

    The directory is replaced only once complete; returns ``out_dir / "tasks"`` (the lm-eval include path).
    """
    from lattice_plugin.checkpoint import atomic_directory

    config = config or TaskDataConfig()
    text_path = Path(config.text) if config.text else default_text()
    text = read_text(text_path)
    out_dir = Path(out_dir).absolute()
    templates = templates_dir()
    with atomic_directory(out_dir, force=force) as tmp:
        data, tasks = tmp / "data", tmp / "tasks"
        data.mkdir()
        tasks.mkdir()
        final_data = out_dir / "data"  # paths in the YAMLs point where the files will be after the rename
        files = {
            "ppl.jsonl": make_ppl_docs(text, config),
            "kv_recall.jsonl": make_kv_docs(text, config),
            "cloze.jsonl": make_cloze_docs(text, config),
        }
        for length in config.passkey_lengths:
            files[f"passkey_{length}.jsonl"] = make_passkey_docs(length, config)
        for name, docs in files.items():
            (data / name).write_text(_jsonl(docs), encoding="utf-8")
        for name in ("lattice_ppl", "lattice_kv_recall", "lattice_cloze"):
            template = templates / f"{name}.yaml"
            data_name = yaml.safe_load(template.read_text(encoding="utf-8"))["dataset_kwargs"]["data_files"]["test"]
            (tasks / f"{name}.yaml").write_text(_task_yaml(template, final_data / data_name), encoding="utf-8")
        passkey_names = []
        for length in config.passkey_lengths:
            name = f"lattice_passkey_{length}"
            passkey_names.append(name)
            yaml_text = _task_yaml(templates / "lattice_passkey.yaml", final_data / f"passkey_{length}.jsonl", length)
            (tasks / f"{name}.yaml").write_text(yaml_text, encoding="utf-8")
        group = {
            "group": "lattice_passkey",
            "task": passkey_names,
            "aggregate_metric_list": [
                {"metric": "exact_match", "filter_list": ["strip"], "aggregation": "mean", "weight_by_size": True}
            ],
            "metadata": {"version": 1.0},
        }
        (tasks / "_lattice_passkey.yaml").write_text(yaml.safe_dump(group, sort_keys=False), encoding="utf-8")
        manifest = {
            "data_version": DATA_VERSION,
            "settings": {**asdict(config), "text": str(text_path.resolve())},
            "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "documents": {name: len(docs) for name, docs in files.items()},
            "tasks": ["lattice_ppl", "lattice_kv_recall", "lattice_cloze", "lattice_passkey", *passkey_names],
            "tag": SUITE_TAG,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out_dir / "tasks"


def task_names(tasks_dir: Path) -> list[str]:
    """Task, group and tag names defined by a generated tasks directory (from its manifest)."""
    manifest = Path(tasks_dir).parent / "manifest.json"
    if not manifest.is_file():
        return []
    return [*json.loads(manifest.read_text(encoding="utf-8"))["tasks"], SUITE_TAG]


__all__ = ["SHIPPED_TASKS", "TaskDataConfig", "prepare_tasks", "task_names"]
