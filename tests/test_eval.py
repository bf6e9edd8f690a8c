"""lm-eval integration: the registered ``lattice`` model, the shipped offline tasks and ``lattice eval``.

Tiny models (2 layers, 32-64 wide, a 400-token BPE) on the CPU; every test builds on module-scoped checkpoints.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from eval_helpers import make_checkpoint, make_tokenizer, save_checkpoint, tiny_config
from lattice_plugin.errors import LatticeError
from lattice_plugin.evaluation import LatticeLM, TaskDataConfig, prepare_tasks
from lattice_plugin.evaluation.runner import EvalSettings, run_eval

ARCHITECTURES = {"lattice": "all", "hybrid": "every:2", "transformer": None}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def tokenizer_dir(root) -> Path:
    return make_tokenizer(root / "tokenizer")


@pytest.fixture(scope="module")
def checkpoints(root, tokenizer_dir) -> dict[str, Path]:
    return {
        name: make_checkpoint(root / name, tokenizer_dir, layers, seed=i)
        for i, (name, layers) in enumerate(ARCHITECTURES.items())
    }


@pytest.fixture(scope="module")
def tasks_dir(root) -> Path:
    config = TaskDataConfig(kv_pairs=2, kv_context_words=40, kv_items=4, passkey_lengths=[40, 60], passkey_items=4)
    return prepare_tasks(root / "task-data", config)


def _instances(request_type: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type, {}, arg, i) for i, arg in enumerate(args)]


def _direct_logprob(lm: LatticeLM, context_ids: list[int], continuation_ids: list[int]) -> float:
    """log p(continuation | context) from one plain forward of the model, no adapter code involved."""
    tokens = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logits = lm.model(tokens[:, :-1]).double()
    logprobs = torch.log_softmax(logits[0], dim=-1)
    start = len(context_ids) - 1
    return sum(logprobs[start + i, t].item() for i, t in enumerate(continuation_ids))


# ---------------------------------------------------------------------------------------------------- registration
def test_lattice_model_is_registered_beside_lm_evals_own():
    from lm_eval.api.registry import get_model, model_registry

    assert get_model("lattice") is LatticeLM
    assert "hf" in model_registry and "dummy" in model_registry  # lm-eval's own models stay visible


# ---------------------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_loglikelihood_equals_direct_forward(checkpoints, arch):
    lm = LatticeLM(checkpoint_dir=checkpoints[arch], device="cpu", dtype="float32", batch_size=8)
    pairs = [
        ("The quick brown fox", " jumps over the lazy dog."),
        ("Question: what is the value of key abcd?\nAnswer:", " 4821"),
        ("A", " b"),
        ("", "Nothing but a continuation."),
        ("He who steps on others to reach the top", " has good balance."),
    ]
    results = lm.loglikelihood(_instances("loglikelihood", pairs))
    tokenizer = lm.tokenizer
    bos = tokenizer.bos_id
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        if context:
            whole = [bos] + tokenizer.encode(context + continuation, bos=False).tolist()
            context_ids = [bos] + tokenizer.encode(context, bos=False).tolist()
            continuation_ids = whole[len(context_ids) :]
        else:
            context_ids, continuation_ids = [bos], tokenizer.encode(continuation, bos=False).tolist()
        expected = _direct_logprob(lm, context_ids, continuation_ids)
        assert logprob == pytest.approx(expected, abs=1e-5)
        assert isinstance(greedy, bool)


@pytest.mark.parametrize("arch", ["lattice", "transformer"])
def test_rolling_loglikelihood_of_one_window_equals_direct_sum(checkpoints, arch):
    lm = LatticeLM(checkpoint_dir=checkpoints[arch], device="cpu", dtype="float32", batch_size=4)
    document = "Hire the morally handicapped.\n\nHe who steps on others to reach the top has good balance."
    (total,) = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(document,)]))
    ids = lm.tokenizer.encode(document, bos=False).tolist()
    assert len(ids) < lm.max_length  # one window
    assert total == pytest.approx(_direct_logprob(lm, [lm.prefix_token_id], ids), abs=1e-5)


def test_max_length_is_respected(checkpoints):
    lm = LatticeLM(checkpoint_dir=checkpoints["hybrid"], device="cpu", dtype="float32", max_length=24, batch_size=3)
    lengths = []
    lm.model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    long_text = " ".join(["The grass is green. The sky is blue."] * 12)
    rolling = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(long_text,)]))
    scored = lm.loglikelihood(_instances("loglikelihood", [(long_text, " again")]))
    generated = lm.generate_until(_instances("generate_until", [(long_text, {"until": ["\n"], "max_gen_toks": 5})]))
    assert max(lengths) <= 24
    assert math.isfinite(rolling[0]) and math.isfinite(scored[0][0]) and isinstance(generated[0], str)
    with pytest.raises(LatticeError, match="max_length"):
        LatticeLM(checkpoint_dir=checkpoints["hybrid"], device="cpu", max_length=10_000)


def test_metrics_identical_across_batch_sizes(checkpoints, tasks_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    tasks = ["lattice_ppl", "lattice_cloze", "lattice_passkey_40"]
    metrics = {}
    for batch_size in (1, 8):
        lm = LatticeLM(checkpoint_dir=checkpoints["hybrid"], device="cpu", dtype="float32", batch_size=batch_size)
        results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=6, bootstrap_iters=0)
        metrics[batch_size] = {
            (task, key): value
            for task, values in results["results"].items()
            for key, value in values.items()
            if "," in key and "stderr" not in key
        }
    assert metrics[1].keys() == metrics[8].keys() and len(metrics[1]) == 6
    for key, value in metrics[1].items():
        assert metrics[8][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


# ---------------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_generation_with_cache_equals_generation_without(checkpoints, arch):
    lm = LatticeLM(checkpoint_dir=checkpoints[arch], device="cpu", dtype="float32", batch_size=2)
    torch.manual_seed(0)
    prompts = torch.randint(0, 390, (2, 21))
    with_cache = lm.generate_tokens(prompts, 12)
    lm.use_cache = False
    without_cache = lm.generate_tokens(prompts, 12)
    assert with_cache == without_cache and all(len(row) == 12 for row in with_cache)
    # the same through lm-eval requests (stop strings, decoding), in a batch of two equal-length prompts
    requests = _instances("generate_until", [("The sky is", {"until": ["."], "max_gen_toks": 8})] * 2)
    uncached = lm.generate_until(requests)
    lm.use_cache = True
    assert lm.generate_until(requests) == uncached


def test_overfit_recall_scores_one_and_untrained_scores_zero(checkpoints, tokenizer_dir, root):
    """The metric wiring end to end: a Lattice model trained on the recall prompts answers them all (exact match 1.0
    through `lattice eval`, generation through the fixed-slot cache); an untrained one answers none."""
    from litgpt import Tokenizer

    from lattice_plugin.model import LatticeGPT

    config = TaskDataConfig(kv_pairs=2, kv_context_words=0, kv_items=4)
    recall_dir = prepare_tasks(root / "recall-data", config)
    docs = [json.loads(line) for line in (recall_dir.parent / "data" / "kv_recall.jsonl").read_text().splitlines()]
    tokenizer = Tokenizer(tokenizer_dir)
    sequences = []
    for doc in docs:
        prompt = tokenizer.encode(doc["prompt"], bos=True).tolist()
        answer = tokenizer.encode(" " + doc["answer"] + "\n", bos=False).tolist()
        sequences.append((prompt, answer))
    width = max(len(p) + len(a) for p, a in sequences)
    inputs = torch.zeros(len(sequences), width, dtype=torch.long)
    targets = torch.full((len(sequences), width), -100)
    for row, (prompt, answer) in enumerate(sequences):
        inputs[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        targets[row, len(prompt) - 1 : len(prompt) + len(answer) - 1] = torch.tensor(answer)

    torch.manual_seed(0)
    model = LatticeGPT(tiny_config(lattice_layers="all", n_embd=64, intermediate_size=128))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.01
    trained = save_checkpoint(model.eval(), tokenizer_dir, root / "recall-trained")

    out = root / "recall-eval"
    combined = run_eval(
        [trained, checkpoints["lattice"]],
        "lattice_kv_recall",
        out,
        EvalSettings(device="cpu", dtype="float32", batch_size=4, bootstrap_iters=0),
        tasks_dir=recall_dir,
        echo=lambda *_: None,
    )
    scores = {
        label: run["results"]["lattice_kv_recall"]["exact_match,strip"] for label, run in combined["results"].items()
    }
    assert scores == {"recall-trained": 1.0, "lattice": pytest.approx(0.0, abs=0.25)}
    # the outputs: lm-eval JSON per checkpoint, the combined JSON and the markdown table
    assert json.loads((out / "lm-eval" / "recall-trained.json").read_text())["results"]["lattice_kv_recall"]
    summary = (out / "summary.md").read_text()
    assert "| lattice_kv_recall | exact_match (strip) | ↑ | 1.0000 | 0.0000 |" in summary
    assert "![summary](summary.png)" in summary and (out / "summary.png").read_bytes().startswith(b"\x89PNG")


# ---------------------------------------------------------------------------------------------------- tasks and data
def test_task_data_is_deterministic_with_absolute_paths_and_custom_text(root, tmp_path):
    first = prepare_tasks(tmp_path / "a", TaskDataConfig(kv_items=3, cloze_items=20))
    second = prepare_tasks(tmp_path / "b", TaskDataConfig(kv_items=3, cloze_items=20))
    for path in sorted((first.parent / "data").iterdir()):
        assert path.read_bytes() == (second.parent / "data" / path.name).read_bytes(), path.name
    import yaml

    for yaml_file in first.glob("lattice_*.yaml"):
        data_file = Path(yaml.safe_load(yaml_file.read_text())["dataset_kwargs"]["data_files"]["test"])
        assert data_file.is_absolute() and data_file.is_file()
    # one flag points the perplexity and cloze tasks at the user's own text
    own = tmp_path / "own.txt"
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()
    paragraph = [f"Paragraph {i}: " + " ".join(words[(i + j) % 16] for j in range(30)) for i in range(30)]
    own.write_text("\n\n".join(paragraph))
    custom = prepare_tasks(tmp_path / "c", TaskDataConfig(text=str(own), cloze_items=5))
    ppl = [json.loads(line) for line in (custom.parent / "data" / "ppl.jsonl").read_text().splitlines()]
    cloze = [json.loads(line) for line in (custom.parent / "data" / "cloze.jsonl").read_text().splitlines()]
    assert ppl[0]["text"].startswith("Paragraph 0: alpha bravo") and len(cloze) == 5
    assert all(doc["choices"][doc["label"]] in own.read_text() for doc in cloze)


def test_unreadable_task_data_names_what_it_needs(tmp_path):
    from lm_eval.tasks import TaskManager

    from lattice_plugin.evaluation.runner import check_task_data, enforce_offline

    enforce_offline()
    (tmp_path / "needs_hub.yaml").write_text(
        "task: needs_hub\ndataset_path: some-org/not-in-the-local-cache\ntest_split: test\n"
        "output_type: loglikelihood\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
    )
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    with pytest.raises(LatticeError, match="needs_hub.*some-org/not-in-the-local-cache.*Nothing is downloaded"):
        check_task_data(manager, ["needs_hub"])


# ---------------------------------------------------------------------------------------------------- errors
def test_missing_checkpoint_and_unknown_task_give_clear_errors(checkpoints, tasks_dir, tmp_path, monkeypatch, capsys):
    with pytest.raises(LatticeError, match="does not exist"):
        run_eval([tmp_path / "missing"], "lattice_ppl", tmp_path / "out")
    (tmp_path / "no-weights").mkdir()
    config_text = (checkpoints["lattice"] / "model_config.yaml").read_text()
    (tmp_path / "no-weights" / "model_config.yaml").write_text(config_text)
    with pytest.raises(LatticeError, match="holds no weights"):
        run_eval([tmp_path / "no-weights"], "lattice_ppl", tmp_path / "out")
    with pytest.raises(LatticeError, match="unknown task 'lattice_nope'.*lattice_ppl"):
        run_eval([checkpoints["lattice"]], "lattice_nope", tmp_path / "out", tasks_dir=tasks_dir)
    with pytest.raises(LatticeError, match="checkpoint_dir"):
        LatticeLM(device="cpu")
    with pytest.raises(LatticeError, match="unknown lattice model argument"):
        LatticeLM(checkpoint_dir=checkpoints["lattice"], device="cpu", temperature=1)
    # through the command line: one line on stderr, exit status 2
    from lattice_plugin.cli import main

    monkeypatch.setattr(sys, "argv", ["lattice", "eval", str(tmp_path / "missing"), "--tasks", "lattice_ppl"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_a_model_that_fails_to_load_leaves_no_task_data(checkpoints, tmp_path, monkeypatch):
    """OUT/task-data used to stay behind when the model did not load."""
    truncated = Path(shutil.copytree(checkpoints["lattice"], tmp_path / "truncated"))
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(LatticeError, match="cannot read weights from"):
        run_eval([truncated], "lattice_ppl", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    def fails_to_load(self, **kwargs):  # past the header checks: e.g. out of memory, a device that is not there
        raise LatticeError("the model did not load")

    monkeypatch.setattr(LatticeLM, "__init__", fails_to_load)
    with pytest.raises(LatticeError, match="did not load"):
        run_eval([checkpoints["lattice"]], "lattice_ppl", tmp_path / "out", data_config=TaskDataConfig(cloze_items=5))
    assert not (tmp_path / "out" / "task-data").exists()


def test_report_tables():
    from lattice_plugin.evaluation import report

    runs = {
        "teacher": {
            "results": {"t": {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": "t"}},
            "higher_is_better": {"t": {"acc": True}},
        },
        "student": {"results": {"t": {"acc,none": 0.25, "acc_stderr,none": "N/A"}}},
    }
    table = report.rows(runs)
    assert len(table) == 1 and table[0].values == {"teacher": (0.5, 0.1), "student": (0.25, None)}
    markdown = report.markdown_table(table, ["teacher", "student"])
    assert "| t | acc | ↑ | 0.5000 ± 0.1000 | 0.2500 |" in markdown
    assert "teacher" in report.text_table(table, ["teacher", "student"])


def test_eval_config_file_sets_options_and_flags_win(tmp_path, monkeypatch):
    import lattice_plugin.evaluation.runner as runner
    from lattice_plugin.cli import main

    calls = []
    monkeypatch.setattr(runner, "run_eval", lambda *args, **kwargs: calls.append(args))
    recipe = Path(__file__).parents[1] / "recipes" / "eval" / "quick.yaml"
    monkeypatch.setattr(sys, "argv", ["lattice", "eval", "ckpt", "--config", str(recipe), "--limit", "3"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code in (0, None)
    checkpoints, tasks, out_dir, settings, data_config, tasks_dir = calls[0]
    assert tasks == "lattice_suite" and settings.limit == 3 and data_config.passkey_lengths == [64, 128, 256]
    (tmp_path / "bad.yaml").write_text("no_such_option: 1\n")
    monkeypatch.setattr(sys, "argv", ["lattice", "eval", "ckpt", "--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2


def test_passkey_training_text_teaches_the_task_format_without_its_documents(tmp_path):
    """`lattice corpus --passkey-docs`: answered documents in lattice_passkey's format, seeded apart from the task's,
    in train/ only; bad settings are refused before anything is written."""
    import re

    from conftest import run_lattice
    from lattice_plugin.evaluation.data import make_passkey_docs, passkey_training_text

    text = passkey_training_text(50, 100)
    assert text == passkey_training_text(50, 100)
    docs = text.strip().split("\n\n")
    assert len(docs) == 50
    for doc in docs:
        key = re.search(r"The pass key is (\d{5})\. Remember it\. \1 is the pass key\.", doc).group(1)
        assert doc.startswith("There is an important pass key") and doc.endswith(f"The pass key is {key}.")
        assert 20 <= len(doc.split()) <= 100 + 10
    evaluation = make_passkey_docs(128, TaskDataConfig(passkey_items=20))
    assert not any(doc["prompt"] in text for doc in evaluation)

    run_lattice(
        "corpus", tmp_path / "c", "--vocab-size", "300", "--passkey-docs", "7", "--passkey-words", "64", cwd=tmp_path
    )
    assert (tmp_path / "c" / "train" / "passkey.txt").read_text() == passkey_training_text(7, 64)
    assert not (tmp_path / "c" / "val" / "passkey.txt").exists()
    bad = run_lattice(
        "corpus", tmp_path / "d", "--passkey-docs", "3", "--passkey-words", "8", cwd=tmp_path, check=False
    )
    assert bad.returncode == 2 and "max_words >= 32" in bad.stderr and not (tmp_path / "d").exists()
