"""Fast generation on the CPU: the static decode step against the chunked forward, positions known to the caller,
generation past block_size, the eager fallback of the CUDA-graph path, and litgpt's loop swapped for ours."""

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from litgpt.utils import save_config

from conftest import TINY_MODEL, run_lattice
from lattice_plugin import generation
from lattice_plugin.checkpoint import save_safetensors
from lattice_plugin.config import LatticeConfig
from lattice_plugin.errors import LatticeCacheError, LatticeError
from lattice_plugin.generation import Decoder, decoder_for, generate_fn
from lattice_plugin.model import LatticeGPT
from lattice_plugin.patch import patch_litgpt


def tiny_model(layers: str, seed: int = 0, **overrides) -> LatticeGPT:
    torch.manual_seed(seed)
    config = LatticeConfig(**{**TINY_MODEL, "lattice_chunk_size": 8, "lattice_layers": layers, **overrides})
    return LatticeGPT(config).eval()


@pytest.mark.parametrize("layers", ["all", "attention_every:2"], ids=["all-lattice", "hybrid"])
def test_decode_steps_equal_the_chunked_forward(layers):
    """A prefill of 37 tokens, then 313 single-token steps (past block_size 64 for the all-Lattice model), batch 3."""
    block_size = 64 if layers == "all" else 512
    model = tiny_model(layers, block_size=block_size)
    idx = torch.randint(0, 512, (3, 350))
    with torch.no_grad():
        model.max_seq_length = 350
        full = model(idx)
        model.set_kv_cache(batch_size=3)
        decoder = Decoder(model, batch_size=3)
        assert not decoder.use_graph  # the CPU decodes eagerly
        logits = [decoder.prefill(idx[:, :37])]
        logits += [decoder.step(idx[:, t]).clone() for t in range(37, 349)]
    assert decoder.position == 349
    assert (torch.stack(logits, 1) - full[:, 36:349]).abs().max() < 1e-4


def test_positions_are_checked_without_reading_device_tensors(monkeypatch):
    model = tiny_model("all")
    idx = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        model.set_kv_cache(batch_size=2)
        monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("input_pos was read back"))
        model(idx[:, :10], input_pos=torch.arange(10), position=0)
        model(idx[:, 10:11], input_pos=torch.tensor([10]), position=10)
        with pytest.raises(LatticeCacheError, match="cannot rewind or skip.*position 5.*position 11"):
            model(idx[:, :1], input_pos=torch.tensor([5]), position=5)
        with pytest.raises(LatticeCacheError, match="built for 2"):
            model.begin_positions(11, 1, batch_size=3)
        decoder = Decoder(model, batch_size=2)
        decoder.prefill(idx[:, :4])
        decoder.step(idx[:, 4])


def test_all_lattice_generates_past_block_size_and_hybrids_refuse():
    model = tiny_model("all")
    prompt = torch.randint(0, 512, (11,))
    with torch.no_grad():
        recomputed = prompt
        model.max_seq_length = 100  # > block_size 64
        for _ in range(89):
            recomputed = torch.cat([recomputed, model(recomputed[None])[0, -1].argmax()[None]])
        model.set_kv_cache(batch_size=1)
        tokens = list(generate_fn(model, prompt, 100, top_k=1, include_prompt=True, include_eos=True))
    assert torch.equal(torch.cat(tokens), recomputed)
    assert model.cos.shape[0] == 100
    hybrid = tiny_model("attention_every:2")
    with pytest.raises(LatticeError, match="exceed the block size 64"):
        hybrid.max_seq_length = 65


@pytest.mark.parametrize("layers", ["all", "every:2"])
def test_patched_litgpt_loop_matches_litgpt_own_with_stop_tokens(layers):
    """Same tokens as litgpt's generate_fn on the same model, including a stop sequence found mid-way."""
    patch_litgpt()
    import litgpt.generate.base as base

    assert base.generate_fn is generate_fn and generation.LITGPT_GENERATE_FN is not generate_fn
    model = tiny_model(layers, seed=3)
    prompt = torch.randint(0, 512, (9,))
    model.set_kv_cache(batch_size=1)
    free = torch.cat(
        list(generation.LITGPT_GENERATE_FN(model, prompt, 40, top_k=1, include_prompt=False, include_eos=True))
    )
    stop = ([int(free[20]), int(free[21])], [999])
    for include_eos in (True, False):
        ours = list(
            generate_fn(model, prompt, 40, top_k=1, stop_tokens=stop, include_prompt=False, include_eos=include_eos)
        )
        theirs = list(
            generation.LITGPT_GENERATE_FN(
                model, prompt, 40, top_k=1, stop_tokens=stop, include_prompt=False, include_eos=include_eos
            )
        )
        assert [int(t) for t in ours] == [int(t) for t in theirs]
    assert torch.equal(base.generate(model, prompt, 40, top_k=1, include_prompt=False), free)


def test_graph_capture_failure_falls_back_once_with_a_warning(monkeypatch):
    """The CUDA-graph branch on the CPU: warm-up step, a capture that fails, then eager steps with equal logits."""
    model = tiny_model("attention_every:2", block_size=128)
    idx = torch.randint(0, 512, (2, 40))

    class FailingGraph:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(
        Decoder,
        "_eager_on_side_stream",
        lambda self, start: self._forward(self._token, self._input_pos, start, None)[:, -1],
    )
    monkeypatch.setattr(generation, "_capture_stream", lambda device: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", FailingGraph)
    monkeypatch.setattr(generation, "_warned", set())
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=2)
        decoder = Decoder(model, batch_size=2, graph=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logits = [decoder.prefill(idx[:, :30])] + [decoder.step(idx[:, t]).clone() for t in range(30, 39)]
            Decoder(model, batch_size=2, graph=True)._capture_and_replay(0)  # a second failure: no second warning
    messages = [str(w.message) for w in caught if "CUDA graph" in str(w.message)]
    assert messages == [
        ("lattice: decoding without a CUDA graph, its capture failed: operation not permitted when stream is capturing")
    ]
    assert not decoder.use_graph
    assert (torch.stack(logits, 1) - full[:, 29:39]).abs().max() < 1e-4


def test_a_captured_graph_is_dropped_when_the_caches_move():
    model = tiny_model("all")
    model.set_kv_cache(batch_size=1)
    decoder = decoder_for(model, 1)
    assert decoder_for(model, 1) is decoder and decoder_for(model, 2) is not decoder
    decoder._graph, decoder._signature = object(), decoder._memory_signature()
    decoder.prefill(torch.zeros(1, 3, dtype=torch.int64))
    assert decoder._graph is not None  # nothing moved
    model.set_kv_cache(batch_size=1)  # new cache buffers: the recorded addresses are stale
    decoder.prefill(torch.zeros(1, 3, dtype=torch.int64))
    assert decoder._graph is None


@pytest.fixture(scope="module")
def checkpoints(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("generation")
    out = {}
    for name, layers in (("lattice", "all"), ("hybrid", "attention_every:2")):
        model = tiny_model(layers, block_size=32)
        directory = root / name
        directory.mkdir()
        save_config(model.config, directory)
        save_safetensors(model.state_dict(), directory / "model.safetensors")
        for path in (tiny_corpus / "tokenizer").iterdir():
            shutil.copy(path, directory / path.name)
        out[name] = directory
    out["work"] = root
    return out


def test_generate_cli_past_block_size_and_one_line_refusals(checkpoints):
    work = checkpoints["work"]
    flags = ("--prompt", "The", "--max_new_tokens", "60", "--precision", "32-true")
    result = run_lattice("generate", checkpoints["lattice"], *flags, cwd=work)  # block_size 32
    assert "Time for inference 1" in result.stderr
    refused = run_lattice("generate", checkpoints["hybrid"], *flags, cwd=work, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("lattice: error: ")
    assert "exceed the block size 32" in refused.stderr and "Traceback" not in refused.stderr
    for command in ("generate", "chat"):
        missing = run_lattice(command, work / "nowhere", cwd=work, check=False)
        assert missing.returncode == 2
        assert missing.stderr.strip() == f"lattice: error: checkpoint directory '{work / 'nowhere'}' does not exist"


def test_litgpt_python_api_generates_through_the_fast_loop(checkpoints, monkeypatch):
    patch_litgpt()
    from litgpt.api import LLM

    calls = []
    prefill = Decoder.prefill
    monkeypatch.setattr(Decoder, "prefill", lambda self, idx: calls.append(1) or prefill(self, idx))
    llm = LLM.load(str(checkpoints["lattice"]))
    text = llm.generate("The", max_new_tokens=40, top_k=1)
    streamed = "".join(llm.generate("The", max_new_tokens=40, top_k=1, stream=True))
    assert isinstance(generation.unwrap(llm.model), LatticeGPT) and len(calls) == 2 and text == streamed


def test_generation_benchmark_runs_every_comparator_and_reports_skips(tmp_path):
    """The benchmark's logic on a tiny shape on the CPU (its numbers mean nothing here; the GPU run is the one)."""
    import json

    from lattice_plugin.bench_generation import BUILTIN_134M, run_generation_bench

    fields = {
        **BUILTIN_134M,
        **dict(
            block_size=100,
            vocab_size=500,
            padded_vocab_size=512,
            n_layer=4,
            n_embd=32,
            n_head=4,
            n_query_groups=4,
            head_size=8,
            intermediate_size=64,
            lattice_slots=6,
        ),
    }
    run_generation_bench(
        tmp_path, fields=fields, batches=(1, 2), contexts=(20, 120), steps=2, warmup=1, dtype=torch.float32
    )
    results = json.loads((tmp_path / "generation.json").read_text())
    measured = {(r["method"], r["batch"], r["context"]) for r in results["decode"]}
    assert {
        ("lattice_graph", 1, 120),
        ("attention_litgpt", 2, 20),
        ("hybrid_graph", 2, 20),
        ("lattice_graph_unfused", 1, 20),
        ("lattice_litgpt_loop", 1, 20),
        ("attention_litgpt_no_cudnn", 1, 20),
    } <= measured
    assert {(s["method"], s["batch"], s["context"]) for s in results["skipped"] if "method" in s} == {
        (m, b, 120) for m in ("attention_litgpt", "attention_graph", "hybrid_graph") for b in (1, 2)
    }
    assert all("block size 100" in s["reason"] for s in results["skipped"])
    assert results["cache_bytes"]["lattice"]["1x20"] == results["cache_bytes"]["lattice"]["1x120"]
    assert results["targets"]["lattice ms per token max/min over contexts, B=1 (target <= 1.10)"] is not None
    assert (tmp_path / "generation.png").stat().st_size > 0


def test_decoding_never_records_autograd():
    """A cache written under autograd would chain every step's graph to the next (memory grows per token)."""
    model = tiny_model("attention_every:2", block_size=128)
    model.set_kv_cache(batch_size=1)
    decoder = Decoder(model, batch_size=1)
    logits = decoder.prefill(torch.randint(0, 512, (1, 9)))
    logits = decoder.step(logits.argmax(-1))
    caches = [block.attn.kv_cache for block in model.transformer.h]
    assert not logits.requires_grad
    assert not any(t.requires_grad for cache in caches for t in cache.buffers())
