"""``lattice distill`` on a tiny random teacher and its conversion (CPU, one thread, seconds per run): what each
stage trains, the report, resumption, and the errors for bad checkpoints and recipes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import enospc_save_file, run_lattice
from distill_helpers import distill_flags, make_pair
from lattice_plugin.checkpoint import load_model, load_state_dict
from lattice_plugin.distill.args import parse
from lattice_plugin.distill.losses import AttentionTransfer, lattice_parameter_names
from lattice_plugin.distill.trainer import distill
from lattice_plugin.errors import LatticeError


@pytest.fixture(scope="module")
def pair(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_pair(tmp_path_factory.mktemp("pair"), tiny_corpus / "tokenizer")


@pytest.fixture(scope="module")
def full_run(pair, tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``lattice distill`` through the CLI: 4 steps of each stage (full fine-tune in stage 2), checkpoints every 2."""
    teacher, student = pair
    work = tmp_path_factory.mktemp("full")
    out_dir = work / "out"
    result = run_lattice("distill", *distill_flags(student, teacher, out_dir, tiny_corpus), cwd=work)
    return {"out_dir": out_dir, "report": json.loads((out_dir / "report.json").read_text()), "stdout": result.stdout}


def run_in_process(pair, corpus: Path, out_dir: Path, *extra: str) -> dict:
    teacher, student = pair
    return distill(parse(distill_flags(student, teacher, out_dir, corpus, *extra)))


def losses(report: dict, stage: str) -> list[float]:
    return [row["loss"] for row in report["stages"][stage]["history"]]


def transfer_mse(model_dir: Path, tokens: torch.Tensor) -> float:
    """Mean over Lattice layers of MSE(Lattice output, attention output) on one fixed held-out batch."""
    model = load_model(model_dir)
    with torch.no_grad(), AttentionTransfer(model, teacher_forcing=True, training_only=False) as transfer:
        model(tokens)
        return transfer.pop()[0].item()


def heldout_tokens(corpus: Path, n: int = 4, length: int = 64) -> torch.Tensor:
    from litgpt import Tokenizer

    ids = Tokenizer(corpus / "tokenizer").encode((corpus / "val" / "val.txt").read_text())
    return ids[: n * length].view(n, length)


def test_cli_run_reports_every_stage_and_writes_a_loadable_student(full_run, pair):
    report, out_dir = full_run["report"], full_run["out_dir"]
    assert set(report["perplexity"]) == {"teacher", "converted", "stage1", "stage2"}
    assert all(value > 1 for value in report["perplexity"].values())
    assert report["tokens"]["stage1"] == report["tokens"]["stage2"] == 4 * 4 * 64
    assert report["stages"]["stage1"]["trainable"] == "lattice" and report["stages"]["stage2"]["trainable"] == "full"
    assert report["decode"]["teacher_tokens_per_sec"] > 0 and report["decode"]["student_tokens_per_sec"] > 0
    assert report["cache_bytes"]["student"]["4096"] < report["cache_bytes"]["teacher"]["4096"]
    assert report["heldout"]["tokens"] > 0 and "val" in report["heldout"]["text"]
    for stage in (1, 2):  # resumable checkpoints, CSV logs, stage students
        assert (out_dir / f"stage{stage}" / "step-000002" / "training_state.pt").is_file()
        assert list((out_dir / f"stage{stage}" / "logs" / "csv").glob("version_*/metrics.csv"))
    final = load_model(out_dir / "final")
    assert final.config.lattice_layers == [0, 1, 2]
    assert (out_dir / "final" / "tokenizer.json").is_file()
    assert "held-out perplexity" in full_run["stdout"]


def test_stage1_lowers_the_layer_mse_and_trains_only_lattice_parameters(full_run, pair, tiny_corpus):
    _, student = pair
    stage1 = full_run["out_dir"] / "stage1" / "final"
    tokens = heldout_tokens(tiny_corpus)
    assert transfer_mse(stage1, tokens) < 0.8 * transfer_mse(student, tokens)
    before, after = load_state_dict(student / "model.safetensors"), load_state_dict(stage1 / "model.safetensors")
    assert before.keys() == after.keys()
    lattice = set(lattice_parameter_names(load_model(student)))
    assert lattice and all(".attn." in key for key in lattice)
    for key in before:
        if key in lattice:
            assert not torch.equal(before[key], after[key]), f"{key} did not train"
        else:
            assert torch.equal(before[key], after[key]), f"{key} changed in stage 1"


def test_stage2_with_lora_trains_only_lora_parameters(pair, tiny_corpus, tmp_path):
    _, student = pair
    out_dir = tmp_path / "lora"
    report = run_in_process(
        pair,
        tiny_corpus,
        out_dir,
        "--stage1.enabled",
        "false",
        "--stage2.trainable",
        "lora",
        "--stage2.lr",
        "0.01",
        "--stage2.ce_weight",
        "0.5",
        "--eval.decode_tokens",
        "0",
    )
    assert set(report["perplexity"]) == {"teacher", "converted", "stage2"}
    assert report["stages"]["stage2"]["trainable"] == "lora"
    base = load_state_dict(student / "model.safetensors")
    during = load_state_dict(out_dir / "stage2" / "step-000002" / "model.safetensors")  # LoRA adapters unmerged
    lora_keys = [key for key in during if "lora_" in key]
    assert lora_keys and any(key.endswith("lora_B") and during[key].abs().sum() > 0 for key in lora_keys)
    for key, value in during.items():
        if "lora_" not in key:
            assert torch.equal(value, base[key.replace("linear.", "")]), f"{key} changed under LoRA"
    merged = load_state_dict(out_dir / "final" / "model.safetensors")  # adapters merged into qkv/proj
    assert merged.keys() == base.keys()
    changed = {key for key in base if not torch.equal(base[key], merged[key])}
    assert changed and all(key.endswith(("attn.qkv.weight", "attn.proj.weight")) for key in changed)


def test_resume_after_a_stop_gives_the_same_losses(full_run, pair, tiny_corpus, tmp_path):
    reference, source = full_run["report"], full_run["out_dir"]
    # a stop in the middle of stage 1: only stage1/step-000002 had been written
    stopped = tmp_path / "stage1-stop"
    shutil.copytree(source / "stage1" / "step-000002", stopped / "stage1" / "step-000002")
    resumed = run_in_process(pair, tiny_corpus, stopped, "--resume", "true")
    assert resumed["stages"]["stage1"]["resumed_from"].endswith("step-000002")
    for stage in ("stage1", "stage2"):
        assert losses(resumed, stage) == pytest.approx(losses(reference, stage), rel=1e-5, abs=1e-7)
    assert resumed["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-5)
    # a stop in the middle of stage 2: stage 1 done, stage2/step-000002 written
    stopped = tmp_path / "stage2-stop"
    shutil.copytree(source, stopped, ignore=shutil.ignore_patterns("final", "report.json", "logs"))
    shutil.copytree(source / "stage1" / "final", stopped / "stage1" / "final")
    resumed = run_in_process(pair, tiny_corpus, stopped, "--resume", "true")
    assert resumed["stages"]["stage2"]["resumed_from"].endswith("step-000002")
    assert losses(resumed, "stage2") == pytest.approx(losses(reference, "stage2"), rel=1e-5, abs=1e-7)
    assert resumed["perplexity"]["stage2"] == pytest.approx(reference["perplexity"]["stage2"], rel=1e-5)


def test_resume_refuses_a_changed_recipe_and_keeps_the_original(full_run, pair, tiny_corpus, tmp_path):
    """Only stage, trainable, world size and FSDP used to be compared: a changed learning rate, batch or seed silently
    continued the old run, and distill_config.json was overwritten with the new settings."""
    source = full_run["out_dir"]
    stopped = tmp_path / "stopped"  # a stop in stage 1: compared with the checkpoint's recipe
    shutil.copytree(source / "stage1" / "step-000002", stopped / "stage1" / "step-000002")
    for flags, message in [
        (["--stage1.lr", "0.1"], "stage1.lr is 0.1 but the run in .*step-000002' used 0.05"),
        (["--train.global_batch_size", "8"], "train.global_batch_size is 8 .* used 4"),
        (["--seed", "7"], "seed is 7 .* used 42"),
        (["--data.init_args.val_data_path", str(tiny_corpus / "train")], "data.init_args.val_data_path"),
    ]:
        with pytest.raises(LatticeError, match=message):
            run_in_process(pair, tiny_corpus, stopped, "--resume", "true", *flags)
    assert sorted(path.name for path in stopped.iterdir()) == ["stage1"]  # nothing written
    # both stages done: compared with OUT/distill_config.json, which is never overwritten
    finished = Path(shutil.copytree(source, tmp_path / "finished"))
    recipe = (finished / "distill_config.json").read_bytes()
    with pytest.raises(LatticeError, match="stage2.lr is 0.01 but the run in .*distill_config.json' used 0.002"):
        run_in_process(pair, tiny_corpus, finished, "--resume", "true", "--stage2.lr", "0.01")
    report = run_in_process(  # what only changes logging, checkpointing or the report may differ
        pair,
        tiny_corpus,
        finished,
        "--resume",
        "true",
        "--train.log_interval",
        "2",
        "--train.keep_last",
        "1",
        "--eval.decode_tokens",
        "0",
        "--eval.final_max_iters",
        "2",
    )
    assert report["perplexity"]["stage2"] > 1 and "decode" not in report
    assert (finished / "distill_config.json").read_bytes() == recipe


def test_keep_last_keeps_exactly_n_step_checkpoints(pair, tiny_corpus, tmp_path):
    out_dir = tmp_path / "keep"
    run_in_process(
        pair,
        tiny_corpus,
        out_dir,
        "--stage2.enabled",
        "false",
        "--stage1.max_steps",
        "5",
        "--train.save_interval",
        "1",
        "--train.keep_last",
        "2",
        "--eval.interval",
        "100",
        "--eval.decode_tokens",
        "0",
    )
    stage1 = out_dir / "stage1"
    assert sorted(path.name for path in stage1.iterdir()) == ["final", "logs", "step-000003", "step-000004"]
    with pytest.raises(LatticeError, match="train.keep_last must be an integer >= 1"):
        run_in_process(pair, tiny_corpus, tmp_path / "zero", "--train.keep_last", "0")


def test_a_full_disk_during_distillation_is_one_error_and_resume_is_exact(
    full_run, pair, tiny_corpus, tmp_path, monkeypatch
):
    """ENOSPC while writing stage 1's student (simulated in safetensors' writer): one LatticeError naming the path,
    no temporary left, the step checkpoint before it intact; resuming gives the uninterrupted run's losses."""
    out_dir = tmp_path / "full"
    monkeypatch.setattr("safetensors.torch.save_file", enospc_save_file(1000, lambda name: ".final." in name))
    with pytest.raises(LatticeError, match=r"cannot write '.*stage1/final': no space left on device \(needs"):
        run_in_process(pair, tiny_corpus, out_dir)
    assert sorted(path.name for path in (out_dir / "stage1").iterdir()) == ["logs", "step-000002"]
    assert not list(out_dir.rglob("*.tmp"))
    monkeypatch.undo()
    resumed = run_in_process(pair, tiny_corpus, out_dir, "--resume", "true")
    for stage in ("stage1", "stage2"):
        assert losses(resumed, stage) == pytest.approx(losses(full_run["report"], stage), rel=1e-5, abs=1e-7)


SLOW_CHECKPOINT = """
import sys, time
from pathlib import Path
import safetensors.torch
from lattice_plugin.cli import main

write, marker = safetensors.torch.save_file, Path(sys.argv[1])

def slow_write(tensors, filename, metadata=None):  # a checkpoint write that is still going on
    write(tensors, filename, metadata)
    marker.write_text(str(filename))
    time.sleep(120)

safetensors.torch.save_file = slow_write
sys.argv = ["lattice", "distill", *sys.argv[2:]]
main()
"""


def test_sigterm_during_a_checkpoint_write_leaves_no_temporary(pair, tiny_corpus, tmp_path):
    """SIGTERM (kill, timeout, schedulers) used to leave .step-*.tmp directories with full weight files."""
    teacher, student = pair
    out_dir, marker = tmp_path / "out", tmp_path / "writing"
    flags = distill_flags(student, teacher, out_dir, tiny_corpus, "--stage2.enabled", "false")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_CHECKPOINT, str(marker), *flags],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), process.stderr.read() if process.poll() is not None else "no checkpoint write in 300 s"
    assert ".step-000002." in marker.read_text() and Path(marker.read_text()).is_file()
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "lattice: stopped by SIGTERM"
    assert not [path for path in out_dir.rglob("*") if path.name.endswith(".tmp")]
    assert not list((out_dir / "stage1").glob("step-*"))


def test_a_broken_teacher_is_refused_before_anything_is_written(pair, tiny_corpus, tmp_path):
    """distill_config.json used to be written before the teacher was loaded."""
    teacher, student = pair
    broken = Path(shutil.copytree(teacher, tmp_path / "teacher"))
    (broken / "lit_model.pth").write_bytes((teacher / "lit_model.pth").read_bytes()[:2000])
    with pytest.raises(LatticeError, match="cannot read weights from"):
        distill(parse(distill_flags(student, broken, tmp_path / "out", tiny_corpus)))
    assert not (tmp_path / "out").exists()


def test_missing_or_corrupted_checkpoints_are_clear_errors(full_run, pair, tiny_corpus, tmp_path):
    source = full_run["out_dir"]
    with pytest.raises(LatticeError, match="does not exist"):
        run_in_process(pair, tiny_corpus, tmp_path / "a", "--resume", str(tmp_path / "nowhere" / "step-000002"))
    with pytest.raises(LatticeError, match="holds no checkpoint"):
        run_in_process(pair, tiny_corpus, tmp_path / "empty", "--resume", "true")
    with pytest.raises(LatticeError, match="earlier run"):
        run_in_process(pair, tiny_corpus, source)  # no --resume over an existing run
    broken = tmp_path / "broken"
    shutil.copytree(source / "stage1" / "step-000002", broken / "stage1" / "step-000002")
    checkpoint = broken / "stage1" / "step-000002"
    (checkpoint / "training_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LatticeError, match="corrupted checkpoint"):
        run_in_process(pair, tiny_corpus, broken, "--resume", "true")
    (checkpoint / "training_state.pt").unlink()
    with pytest.raises(LatticeError, match="incomplete: training_state.pt is missing"):
        run_in_process(pair, tiny_corpus, broken, "--resume", "true")
    # through the CLI: a truncated weights file is one line on stderr and exit status 2
    shutil.copy(source / "stage1" / "step-000002" / "training_state.pt", checkpoint)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    teacher, student = pair
    result = run_lattice(
        "distill", *distill_flags(student, teacher, broken, tiny_corpus), "--resume", "true", cwd=tmp_path, check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("lattice: error: cannot read weights from")
    assert "Traceback" not in result.stderr


def test_bad_recipe_keys_are_one_clear_error(pair, tiny_corpus, tmp_path):
    teacher, student = pair
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"student_dir: {student}\nstage2:\n  temprature: 2.0\n  max_steps: 2\nstage1:\n  max_steps: 2\n")
    result = run_lattice("distill", "--config", recipe, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "lattice: error: bad recipe or flag: Validation failed: Group 'stage2' does not accept nested key 'temprature'"
    ]
    base = ["--student_dir", str(student), "--stage1.max_steps", "1", "--stage2.max_steps", "1"]
    # a flag overrides the recipe wherever it stands; a missing recipe is named, whatever comes before it
    good = tmp_path / "good.yaml"
    good.write_text(f"student_dir: {student}\nstage1:\n  max_steps: 2\n  lr: 0.1\nstage2:\n  max_steps: 2\n")
    assert parse(["--stage1.lr", "0.2", "--config", str(good)]).stage1.lr == 0.2
    with pytest.raises(LatticeError, match="recipe file 'missing.yaml' does not exist"):
        parse(["--data.train_data_path", "x", "--config", "missing.yaml"])
    for argv, message in [
        (base + ["--bogus", "1"], "Unrecognized arguments: --bogus"),
        (base + ["--stage1.lr", "fast"], "stage1.lr"),
        (
            base + ["--stage2.trainable", "everything"],
            "stage2.trainable must be one of full, lattice, lora, lora\\+lattice",
        ),
        (base + ["--strategy", "deepspeed"], "strategy must be one of auto, ddp, fsdp"),
        (["--student_dir", str(student), "--stage2.max_steps", "1"], "stage1 needs a budget"),
        (
            base + ["--train.global_batch_size", "6", "--train.micro_batch_size", "4"],
            "multiple of train.micro_batch_size",
        ),
        (
            base + ["--data.class_path", "litgpt.data.TextFiles", "--data.train_data_path", "x", "--data.nope", "1"],
            "nope",
        ),
    ]:
        with pytest.raises(LatticeError, match=message):
            parse(argv)


def test_distill_modules_import_one_another_without_a_cycle():
    """args.py used to import trainer.py (inside a function), which imports args.py. Every import statement counts,
    function-level ones included."""
    import ast

    import lattice_plugin.distill as package

    folder = Path(package.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lattice_plugin.distill."):
                imported.add(node.module.rsplit(".", 1)[1])
            elif isinstance(node, ast.Import):
                imported |= {
                    a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("lattice_plugin.distill.")
                }
        graph[path.stem] = imported
    assert {"trainer", "stage", "fabric", "report", "args"} <= set(graph)

    def reaches(start: str, target: str, seen: set) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in graph.get(start, ()))

    assert [module for module in graph if reaches(module, module, set())] == []


@pytest.mark.parametrize("teacher_forcing", [True, False])
def test_attention_transfer_under_fsdp_takes_the_same_step(pair, teacher_forcing, tmp_path):
    """Under FSDP the layer losses must reach each block through its output, or the backward finds the block's
    weights already freed (what the first 2-GPU FSDP run hit). Two CPU processes over gloo take the step that one
    unsharded process takes."""
    import torch.multiprocessing as mp

    from distill_helpers import free_port, sharded_transfer_step, transfer_losses, transfer_setup
    from lattice_plugin.distill.losses import set_trainable

    _, student = pair
    model, tokens = transfer_setup(student)
    set_trainable(model, "lattice")
    reference = transfer_losses(model, tokens, teacher_forcing, through_outputs=False)
    result = tmp_path / "loss"
    mp.spawn(sharded_transfer_step, args=(2, free_port(), str(student), teacher_forcing, str(result)), nprocs=2)
    assert float(result.read_text()) == pytest.approx(reference, rel=1e-5)


def test_heldout_loss_scores_every_batch_when_ranks_hold_unequal_shards(pair, tmp_path):
    """Three FSDP ranks with 2, 1 and 1 of four held-out batches score all four, as one process does (evaluation used
    to stop at the shortest shard, so the perplexity depended on the GPU count for loaders with uneven shards)."""
    import torch.multiprocessing as mp

    from distill_helpers import CpuFabric, free_port, heldout_batches, sharded_heldout_loss, transfer_setup
    from lattice_plugin.distill.evaluation import heldout_loss

    _, student = pair
    reference = heldout_loss(CpuFabric(), transfer_setup(student)[0], heldout_batches(student, 4), None, autocast=False)
    result = tmp_path / "metrics.json"
    mp.spawn(sharded_heldout_loss, args=(3, free_port(), str(student), 4, str(result)), nprocs=3)
    sharded = json.loads(result.read_text())
    assert sharded["tokens"] == reference["tokens"] == sum(2 * (8 + 3 * i) for i in range(4))
    assert sharded["batches"] == 2
    assert sharded["loss"] == pytest.approx(reference["loss"], rel=1e-5)


def test_heldout_split_is_scored_whole_on_several_ranks(tiny_corpus, tmp_path):
    """litdata's loaders drop the held-out items that do not divide among the ranks; the evaluation's loader gives
    every item to exactly one of 3 ranks: the same rows as one process reads (the 4-GPU report scored 80%)."""
    import torch.multiprocessing as mp

    from distill_helpers import free_port, text_files, validation_split_rows

    data = text_files(tiny_corpus)
    data.prepare_data()
    single = sorted(row.tolist() for row in data.val_dataloader().dataset)  # every item, one process, no batching
    result = tmp_path / "rows"
    mp.spawn(validation_split_rows, args=(3, free_port(), str(tiny_corpus), str(result)), nprocs=3)
    shards = [json.loads(Path(f"{result}{rank}").read_text()) for rank in range(3)]
    assert len(single) % (3 * 4)  # rows that do not fill 3 ranks' batches of 4: litdata alone drops some
    assert sorted(row for shard in shards for row in shard) == single
