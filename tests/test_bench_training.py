"""The model-level training benchmark's pieces on the CPU: every built-in mixer trains a tiny model of the bench's
layout, the FLA comparators fail cleanly without the package, and the autotune thinning keeps what it says."""

import pytest
import torch
import triton

from lattice_plugin.bench_training import MIXERS, build_model, thin_configs, training_step
from lattice_plugin.errors import LatticeError

TINY = dict(
    n_layer=4,
    n_head=4,
    n_query_groups=4,
    n_embd=32,
    intermediate_size=64,
    vocab_size=128,
    padding_multiple=64,
    lattice_slots=8,
    lattice_chunk_size=16,
)


@pytest.mark.parametrize("mixer", [m for m in MIXERS if not m.startswith("fla_")])
def test_training_step_updates_every_parameter(mixer):
    torch.manual_seed(0)
    model = build_model(mixer, 24, torch.device("cpu"), **TINY)
    lattice = [type(block.attn).__name__ == "LatticeMixer" for block in model.transformer.h]
    assert lattice == {"attention": [False] * 4, "hybrid": [True, True, True, False]}.get(mixer, [True] * 4)
    if mixer != "attention":
        assert model.transformer.h[0].attn.config.lattice_gates == ("chunk" if mixer == "lattice_chunk" else "exact")
    before = [p.detach().clone() for p in model.parameters()]
    training_step(model, 2, 24)()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_fla_mixers_need_the_package():
    try:
        import fla  # noqa: F401
    except ImportError:
        with pytest.raises(LatticeError, match="flash-linear-attention"):
            build_model("fla_gla", 24, torch.device("cpu"), **TINY)
    else:
        pytest.skip("fla is installed")


def test_thin_configs():
    configs = [
        triton.Config({"BK": bk}, num_warps=w, num_stages=s) for bk in (32, 64) for w in (1, 2, 4, 8) for s in (2, 3, 4)
    ]
    kept = thin_configs(configs, 6)
    assert len(kept) == 6 and len({id(c) for c in kept}) == 6
    assert all(c.num_warps in (4, 8) and c.num_stages in (2, 3) for c in kept)
    assert {c.kwargs["BK"] for c in kept} == {32, 64}
    assert thin_configs(configs[:2], 6) == configs[:2]  # none preferred: all kept


def test_limit_fla_autotune_spares_self_pruning_autotuners(monkeypatch):
    """Thinned autotuners keep 4 configs; one with its own pruning (FLA's GLA backward) keeps all of them, since a
    thinned list can leave its pruning nothing (an AutotunerError on the GPU)."""
    import triton  # the current module: other test files re-import triton (interpreter mode) after this one's import
    import triton.language as tl
    from triton.runtime.autotuner import Autotuner

    from lattice_plugin.bench_training import limit_fla_autotune

    monkeypatch.setattr(Autotuner, "__init__", Autotuner.__init__)  # the patch is undone after the test
    limit_fla_autotune()

    @triton.jit
    def kernel(x, BK: tl.constexpr):
        pass

    configs = [triton.Config({"BK": bk}, num_warps=w, num_stages=s) for bk in (32, 64) for w in (4, 8) for s in (2, 3)]
    thinned = triton.autotune(configs, key=[])(kernel)
    pruned = triton.autotune(configs, key=[], prune_configs_by={"early_config_prune": lambda c, a, **k: c})(kernel)
    assert len(thinned.configs) == 4 and len(pruned.configs) == len(configs) == 8


def test_measure_and_plot(tmp_path):
    """A timed row on the CPU has the fields the JSON and the plot read; the plot is written."""
    from lattice_plugin.bench_training import measure_training, plot

    row = measure_training("hybrid", 16, 32, warmup=1, steps=1, device=torch.device("cpu"), **TINY)
    assert row["B"] == 2 and row["tokens_per_step"] == 32 and row["tokens_per_s"] > 0 and row["peak_gib"] is None
    assert 0 < row["host_ms"]
    row["peak_gib"] = 1.0
    plot(dict(device="cpu", model=[row, dict(method="attention", T=16, error="x")]), tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
