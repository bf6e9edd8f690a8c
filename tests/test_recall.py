"""``lattice recall``: the MQAR generator, one training step of every built-in mixer, resumable rows, the summary's
validity rule, and tiny end-to-end runs of the three experiments (CPU)."""

import dataclasses
import json
import math

import pytest
import torch
from litgpt.model import CausalSelfAttention

from conftest import run_lattice
from eval_helpers import make_checkpoint, make_tokenizer
from lattice_plugin.errors import LatticeError
from lattice_plugin.fla_mixer import TrainingOnlyMixer, fla_missing_reason
from lattice_plugin.model import LatticeMixer
from lattice_plugin.recall import mqar as mqar_module
from lattice_plugin.recall.lm import LMSettings, run_lm
from lattice_plugin.recall.mixers import (
    BUILT_IN,
    MIXERS,
    ModelShape,
    NotCausalError,
    build_model,
    causality_leak,
    causality_table,
    check_causal,
    parse_mixers,
)
from lattice_plugin.recall.mqar import MQARSettings, markdown, plotted_settings, run_mqar, summarize
from lattice_plugin.recall.task import FILLER, IGNORE, check_mqar, mqar_batch
from lattice_plugin.recall.training import Schedule, train

CPU = torch.device("cpu")
TINY_SHAPE = ModelShape(
    vocab_size=64, block_size=24, n_layer=2, n_embd=16, n_head=2, intermediate_size=32, slots=6, chunk_size=8
)


def tiny_mqar(**overrides) -> MQARSettings:
    options = dict(
        pairs=[3],
        seq_len=16,
        slots=[4],
        lrs=[3e-3],
        steps=3,
        batch_size=4,
        vocab_size=32,
        n_embd=16,
        n_head=2,
        intermediate_size=32,
        chunk_size=8,
        eval_examples=4,
        eval_every=2,
    )
    options.update(overrides)
    return MQARSettings(**options)


@pytest.mark.parametrize("pairs, seq_len", [(5, 40), (1, 3), (7, 21)])
def test_mqar_queries_refer_to_their_own_keys_and_the_mask_covers_exactly_them(pairs, seq_len):
    generator = torch.Generator().manual_seed(pairs)
    vocab = 64
    batch = mqar_batch(32, pairs, seq_len, vocab, generator)
    assert batch.inputs.shape == batch.targets.shape == (32, seq_len)
    for inputs, targets, mask in zip(batch.inputs.tolist(), batch.targets.tolist(), batch.mask.tolist()):
        keys, values = inputs[0 : 2 * pairs : 2], inputs[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and all(1 <= k < vocab // 2 for k in keys)
        assert all(vocab // 2 <= v < vocab for v in values)
        pair_of = dict(zip(keys, values))
        queries = [t for t in range(seq_len) if mask[t]]
        assert len(queries) == pairs and min(queries) >= 2 * pairs
        assert sorted(inputs[t] for t in queries) == sorted(keys)  # every key of this sequence asked once
        for t in range(seq_len):
            if t in queries:
                assert targets[t] == pair_of[inputs[t]]
            else:
                assert targets[t] == IGNORE
                assert t < 2 * pairs or inputs[t] == FILLER


def test_mqar_sequences_differ_and_refuse_settings_without_room():
    batch = mqar_batch(8, 4, 16, 64, torch.Generator().manual_seed(0))
    assert len({tuple(row) for row in batch.inputs.tolist()}) == 8
    for vocab, pairs, seq_len in [(64, 4, 11), (8, 4, 32), (64, 0, 32)]:
        with pytest.raises(LatticeError):
            check_mqar(vocab, pairs, seq_len)


@pytest.mark.parametrize("name", BUILT_IN)
def test_one_training_step_of_each_built_in_mixer(name):
    mixer = MIXERS[name]
    torch.manual_seed(0)
    model = build_model(mixer, TINY_SHAPE)
    attn = model.transformer.h[0].attn
    if mixer.lattice is None:
        assert type(attn) is CausalSelfAttention
    else:
        assert isinstance(attn, LatticeMixer)
        assert all(getattr(model.config, field) == value for field, value in mixer.lattice.items())
        assert model.config.lattice_slots == TINY_SHAPE.slots
    assert model.lm_head.weight is model.transformer.wte.weight, "the head is tied to the embedding (Zoology)"
    before = {key: value.clone() for key, value in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)

    def next_batch(step):
        batch = mqar_batch(4, 3, TINY_SHAPE.block_size, TINY_SHAPE.vocab_size, generator)
        return batch.inputs, batch.targets

    run = train(model, next_batch, Schedule(lr=1e-2, steps=1), CPU, echo=lambda _: None)
    assert run["steps_done"] == 1 and math.isfinite(run["final_loss"]) and not run["diverged"]
    after = model.state_dict()
    mixer_keys = [key for key in before if key.startswith("transformer.h.0.attn.")]
    assert any(not torch.equal(before[key], after[key]) for key in mixer_keys), "the mixer did not train"


def test_fla_mixers_are_skipped_without_fla_or_a_gpu(tmp_path):
    reason = fla_missing_reason()
    if reason is None:
        pytest.skip("flash-linear-attention and a GPU are present: the FLA rows would run")
    lines = []
    results = run_mqar(parse_mixers("gla,deltanet"), tiny_mqar(), tmp_path / "mqar.json", device=CPU, echo=lines.append)
    assert results.rows == [] and any("skipping gla" in line and reason in line for line in lines)


@pytest.mark.parametrize("name", ["gla", "deltanet", "gated_deltanet"])
@pytest.mark.parametrize("slots", [16, 64, 128])
def test_fla_layers_hold_the_same_state_per_head_as_lattice(name, slots):
    pytest.importorskip("fla.layers", reason="flash-linear-attention is not installed")
    shape = ModelShape(vocab_size=64, block_size=64, n_layer=2, n_embd=128, n_head=2, intermediate_size=64, slots=slots)
    model = build_model(MIXERS[name], shape)
    for block in model.transformer.h:
        layer = block.attn.layer
        assert (layer.num_heads, layer.head_k_dim, layer.head_v_dim) == (2, slots, 64)


@pytest.mark.skipif(fla_missing_reason() is not None, reason="needs flash-linear-attention and a CUDA GPU")
@pytest.mark.parametrize("name", ["gla", "deltanet", "gated_deltanet"])
def test_fla_mixer_forward_in_a_litgpt_block(name):
    shape = ModelShape(vocab_size=64, block_size=64, n_layer=2, n_embd=64, n_head=2, intermediate_size=64, slots=16)
    model = build_model(MIXERS[name], shape).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(torch.randint(0, 64, (2, 64), device="cuda"))
    assert logits.shape == (2, 64, model.config.padded_vocab_size) and torch.isfinite(logits).all()


def test_finished_rows_are_skipped_and_new_ones_run(tmp_path, monkeypatch):
    calls = []
    real_train = mqar_module.train

    def counting_train(*args, **kwargs):
        calls.append(kwargs["label"])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(mqar_module, "train", counting_train)
    path = tmp_path / "mqar.json"
    mixers = parse_mixers("attention,lattice_exact")
    run_mqar(mixers, tiny_mqar(), path, device=CPU, echo=lambda _: None)
    assert len(calls) == 2
    first = json.loads(path.read_text())["rows"]
    assert all(row["device"] == "cpu" and row["key"]["steps"] == 3 and "lr" in row["key"] for row in first)
    assert first[1]["key"]["m"] == 4 and first[0]["key"]["m"] is None and 0 <= first[1]["accuracy"] <= 1
    run_mqar(mixers, tiny_mqar(), path, device=CPU, echo=lambda _: None)
    assert len(calls) == 2  # both rows were finished: nothing trained
    run_mqar(mixers, tiny_mqar(lrs=[3e-3, 1e-2]), path, device=CPU, echo=lambda _: None)
    assert len(calls) == 4 and all("lr=0.01" in label for label in calls[2:])
    rows = json.loads(path.read_text())["rows"]
    assert rows[:2] == first and len(rows) == 4
    for suffix in (".summary.json", ".md", ".png"):
        assert (tmp_path / f"mqar{suffix}").is_file()
    run_mqar(mixers, tiny_mqar(steps=4), path, device=CPU, budget_s=0, echo=lambda _: None)
    assert len(calls) == 4  # a budget that no row fits starts none


def test_summary_takes_the_best_lr_and_marks_settings_where_attention_fails_invalid():
    def row(mixer, K, lr, accuracy, m=8):
        return dict(
            key=dict(mixer=mixer, K=K, T=64, m=None if mixer == "attention" else m, lr=lr, seed=0, steps=10),
            accuracy=accuracy,
        )

    rows = [
        row("attention", 4, 1e-3, 0.995),
        row("attention", 4, 1e-2, 0.2),
        row("attention", 8, 1e-3, 0.6),
        row("lattice_exact", 4, 1e-3, 0.5),
        row("lattice_exact", 4, 1e-2, 0.7),
        row("lattice_exact", 8, 1e-3, 0.3),
        dict(
            key=dict(mixer="gated_deltanet", K=4, T=64, m=8, lr=1e-3, seed=0, steps=10),
            accuracy=None,
            error="RuntimeError: refused on this GPU",
        ),
        dict(key=dict(mixer="lattice_exact", K=4, T=64, m=8, lr=1e-3, seed=0, steps=99), accuracy=0.99),
    ]
    summary = summarize(rows)
    best = {(b["mixer"], b["setting"]["K"]): b for b in summary["best"] if b["setting"]["steps"] == 10}
    assert best["attention", 4]["lr"] == 1e-3 and best["lattice_exact", 4]["lr"] == 1e-2
    assert best["lattice_exact", 4]["accuracy"] == 0.7 and best["lattice_exact", 4]["valid"] is True
    assert best["lattice_exact", 8]["valid"] is False and best["attention", 8]["valid"] is False
    assert summary["not_measured"][0]["reason"] == "RuntimeError: refused on this GPU"
    text = markdown(summary, ["cpu"])
    assert "0.700 @ lr 0.01 |" in text and "(invalid)" in text and "not measured" in text
    assert "K=4, T=64, 99 steps" in text and "0.990 @ lr 0.001 (no attention row)" in text  # its own column


def test_the_plot_shows_each_k_at_a_valid_setting_most_rows_share():
    def entry(mixer, K, T, steps=10, valid=True):
        return dict(mixer=mixer, setting=dict(K=K, T=T, steps=steps), accuracy=0.5, valid=valid)

    best = [entry(name, 16, 256) for name in ("attention", "gla", "deltanet")]
    best += [entry(name, 16, 64) for name in ("attention", "gla")]  # a short-distance diagnostic
    best += [entry("lattice_exact", 16, 256, steps=30, valid=None)]  # a longer run without an attention row
    best += [entry(name, 128, 512, valid=False) for name in ("attention", "gla", "deltanet")]  # invalid at 10 steps
    best += [entry(name, 128, 512, steps=25) for name in ("attention", "deltanet")]
    best += [entry(name, 8, 64, valid=False) for name in ("attention", "gla")]  # invalid everywhere: still shown
    shown = {K: dict(task) for K, task in plotted_settings(best).items()}
    assert shown[16] == dict(K=16, T=256, steps=10)
    assert shown[128] == dict(K=128, T=512, steps=25)
    assert shown[8] == dict(K=8, T=64, steps=10)


def test_lm_rows_report_heldout_perplexity_and_speed(tiny_corpus, tmp_path):
    settings = LMSettings(
        tokens=256,
        seq_len=16,
        batch_size=4,
        vocab_size=512,
        n_layer=1,
        n_embd=16,
        n_head=2,
        intermediate_size=32,
        slots=4,
        chunk_size=8,
    )
    (tmp_path / "work" / "tokenizer-512").parent.mkdir()
    (tmp_path / "work" / "tokenizer-512").symlink_to(tiny_corpus / "tokenizer")
    results = run_lm(
        parse_mixers("attention,lattice_chunk"),
        settings,
        tmp_path / "lm.json",
        device=CPU,
        text_dir=tiny_corpus,
        work_dir=tmp_path / "work",
        echo=lambda _: None,
    )
    assert [row["key"]["mixer"] for row in results.rows] == ["attention", "lattice_chunk"]
    for row in results.rows:
        assert 1 < row["heldout_ppl"] < 10 * 512 and row["heldout_tokens"] > 1000 and row["steps_done"] == 4
        assert row["key"]["tokens"] == 256 and row["device"] == "cpu" and row["tokens_per_s"] > 0
    assert "| attention | - |" in (tmp_path / "lm.md").read_text()


def test_passkey_scores_teacher_and_student_beyond_the_training_length(tmp_path):
    tokenizer = make_tokenizer(tmp_path / "tokenizer")
    teacher = make_checkpoint(tmp_path / "teacher", tokenizer, lattice_layers=None, block_size=32)
    student = make_checkpoint(tmp_path / "student", tokenizer, lattice_layers="all", block_size=32)
    result = run_lattice(
        "recall",
        "passkey",
        teacher,
        student,
        "--lengths",
        "16,40",
        "--items",
        "2",
        "--out",
        tmp_path / "pk" / "passkey.json",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        cwd=tmp_path,
    )
    report = json.loads((tmp_path / "pk" / "passkey.json").read_text())
    assert set(report["models"]) == {"teacher", "student"} and report["device"] == "cpu"
    for model in report["models"].values():
        assert model["trained_length"] == 32
        scores = model["scores"]
        assert 0 <= scores["40"]["exact_match"] <= 1 and scores["40"]["beyond_training_length"]
        assert scores["40"]["prompt_tokens_max"] > 32
        shown = scores["16"]["answers"]  # both prompts: targets are the task's 5-digit keys, answers what was generated
        assert len(shown) == 2 and all(len(a["target"]) == 5 and a["target"].isdigit() for a in shown)
        assert 1 <= scores["16"]["distinct_answers"] <= 2 and all(isinstance(a["answer"], str) for a in shown)
    assert report["models"]["student"]["lattice_layers"] == [0, 1] and "| teacher | 32 |" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["mqar", "--mixers", "nope"], "unknown mixer 'nope'"),
        (["mqar", "--pairs", "128", "--seq-len", "256"], "too short for 128 pairs"),
        (["lm", "--lrs", "fast"], "--lrs takes comma-separated floats"),
        (["lm", "--lattice-backend", "cuda"], "lattice backend 'cuda'"),
        (["mqar", "--shard", "4/4"], "I must be in 0..N-1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = run_lattice(
        "recall", *args, "--results", tmp_path / "r.json", "--device", "cpu", cwd=tmp_path, check=False
    )
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r.json").exists()


def test_lattice_variants_share_weights_but_not_their_math():
    """Same seed, same parameters: the variants differ only in the update rule, so their outputs differ."""
    inputs = mqar_batch(2, 3, TINY_SHAPE.block_size, TINY_SHAPE.vocab_size, torch.Generator().manual_seed(0)).inputs
    outputs, weights = {}, {}
    for name in ("lattice_exact", "lattice_chunk", "lattice_additive", "lattice_no_retraction"):
        torch.manual_seed(0)
        model = build_model(MIXERS[name], TINY_SHAPE)
        weights[name] = model.state_dict()
        with torch.no_grad():
            outputs[name] = model(inputs)
    reference = weights["lattice_exact"]
    assert all(torch.equal(w[key], reference[key]) for w in weights.values() for key in reference)
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(outputs[a], outputs[b], atol=1e-6), f"{a} and {b} compute the same thing"


def test_shards_split_the_rows_without_overlap(tmp_path):
    path = tmp_path / "mqar.json"
    mixers = parse_mixers("attention,lattice_chunk")
    settings = tiny_mqar(lrs=[1e-3, 3e-3], steps=1)
    for index in (1, 0):
        run_mqar(mixers, settings, path, device=CPU, shard=(index, 2), echo=lambda _: None)
    rows = json.loads(path.read_text())["rows"]
    keys = sorted((row["key"]["mixer"], row["key"]["lr"]) for row in rows)
    assert keys == sorted((m, lr) for m in ("attention", "lattice_chunk") for lr in (1e-3, 3e-3))
    assert sorted(row["shard"] for row in rows) == ["0/2", "0/2", "1/2", "1/2"]


def test_schedule_warms_up_linearly_then_decays_to_zero():
    schedule = Schedule(lr=1.0, steps=100, warmup_fraction=0.1)
    factors = [schedule.factor(step) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0) and factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and factors[100] == pytest.approx(0.0, abs=1e-9)


def test_curriculum_cycles_easier_settings_up_to_the_scored_one():
    from lattice_plugin.recall.mqar import curriculum

    assert curriculum(64, 256) == [(4, 64), (8, 128), (16, 256), (32, 256), (64, 256)]  # Zoology's mixture
    assert curriculum(48, 512) == [(4, 64), (8, 128), (16, 256), (32, 512), (48, 512)]
    assert curriculum(4, 40) == [(4, 40)] and curriculum(2, 16) == [(2, 16)]


@pytest.mark.parametrize("name", ["attention", "lattice_exact"])
def test_short_conv_is_causal_and_wraps_every_mixer(name):
    """Zoology's short convolution: the output at t must not see tokens after t, and every block gets one."""
    from lattice_plugin.recall.mixers import ShortConv

    shape = dataclasses.replace(TINY_SHAPE, short_conv=3)
    torch.manual_seed(0)
    model = build_model(MIXERS[name], shape)
    assert all(isinstance(block.attn, ShortConv) for block in model.transformer.h)
    assert all(block.attn.conv.kernel_size == (3,) for block in model.transformer.h)
    inputs = mqar_batch(2, 3, shape.block_size, shape.vocab_size, torch.Generator().manual_seed(0)).inputs
    changed = inputs.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % shape.vocab_size
    with torch.no_grad():
        before, after = model(inputs), model(changed)
    assert torch.equal(before[:, :9], after[:, :9]) and not torch.allclose(before[:, 9:], after[:, 9:])
    with pytest.raises(LatticeError, match="no generation cache"):
        model.transformer.h[0].attn(torch.zeros(1, 1, shape.n_embd), None, None, input_pos=torch.tensor([0]))
    with pytest.raises(LatticeError, match="no generation cache"):
        model.transformer.h[0].attn.build_kv_cache(1, shape.block_size)


def test_summary_prefers_learning_rates_that_did_not_diverge_and_says_which_did():
    def row(mixer, lr, accuracy, diverged=False):
        key = dict(mixer=mixer, K=4, T=64, m=None if mixer == "attention" else 8, lr=lr, seed=0, steps=10)
        return dict(key=key, accuracy=accuracy, diverged=diverged)

    rows = [
        row("attention", 1e-3, 0.995),
        row("lattice_exact", 1e-3, 0.2),
        row("lattice_exact", 1e-2, 0.3, diverged=True),  # scored before its loss turned non-finite: not the best
        row("lattice_chunk", 1e-3, 0.0, diverged=True),
        row("lattice_chunk", 1e-2, 0.0, diverged=True),
    ]
    summary = summarize(rows)
    best = {b["mixer"]: b for b in summary["best"]}
    assert best["lattice_exact"]["lr"] == 1e-3 and best["lattice_exact"]["diverged_lrs"] == [1e-2]
    assert best["lattice_chunk"]["diverged_lrs"] == [1e-3, 1e-2]
    text = markdown(summary, ["cpu"])
    assert "0.200 @ lr 0.001, diverged at lr 0.01 |" in text and "diverged at every lr (0.001, 0.01) |" in text


class _PeekAhead(TrainingOnlyMixer):
    """A leaking mixer: each token also sees the next one (what a non-causal kernel would do)."""

    def mix(self, x, cos, sin, mask):
        return x + torch.roll(x, shifts=-1, dims=1)


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_built_in_mixer_passes_the_causality_check_and_a_leak_is_refused(name):
    """Every row checks its fresh model first: outputs before a cut must not move when only later tokens do."""
    torch.manual_seed(0)
    shape = dataclasses.replace(TINY_SHAPE, short_conv=3)
    model = build_model(MIXERS[name], shape)
    assert causality_leak(model, shape.vocab_size, shape.block_size, CPU) == 0.0
    assert model.training, "the check leaves the model in the mode it found it in"
    model.transformer.h[1].attn = _PeekAhead()
    assert causality_leak(model, shape.vocab_size, shape.block_size, CPU) > 0.1
    with pytest.raises(NotCausalError, match=f"{name} is not causal here"):
        check_causal(model, MIXERS[name], shape.vocab_size, shape.block_size, CPU)


def test_causality_table_covers_every_mixer_and_shape():
    shapes = {"a": TINY_SHAPE, "b": dataclasses.replace(TINY_SHAPE, short_conv=3)}
    table = causality_table(parse_mixers("all"), shapes, CPU)
    assert [(e["mixer"], e["shape"]) for e in table] == [(name, s) for name in MIXERS for s in shapes]
    for entry in table:
        if MIXERS[entry["mixer"]].fla and fla_missing_reason():
            assert entry["not_measured"] == fla_missing_reason()
        else:
            assert entry["causal_leak"] == 0.0
