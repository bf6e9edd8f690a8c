"""Model-level generation benchmark behind ``lattice bench --model``: prefill and per-token decode of a whole model,
all-Lattice beside the same model with attention on every layer and the hybrid (attention on every 4th layer), every
comparator measured in the same run on the same device.

Comparators (greedy, one host read of the new tokens per step, as every generate loop does):

- ``attention_litgpt``: litgpt's GPT through litgpt's decode forward, ``model(x, input_pos, input_pos_maxp1)`` as
  ``litgpt.generate.base.generate_fn`` calls it (eager; attention reads the positions written so far).
- ``attention_graph``: the same model through :class:`lattice_plugin.generation.Decoder` (static step, CUDA graph;
  attention then reads the whole preallocated cache under its mask).
- ``lattice_graph``: the all-Lattice model through the path ``lattice generate`` takes (Decoder, CUDA graph, fused
  decode-layer kernel). ``hybrid_graph``: the hybrid through the same path.
- Diagnostics at the first context: ``lattice_eager`` (Decoder without a graph), ``lattice_graph_unfused`` (graph,
  layer work in separate kernels), ``lattice_litgpt_loop`` (litgpt's decode forward on the Lattice model), and
  ``attention_litgpt_no_cudnn`` (``attention_litgpt`` with PyTorch's cuDNN attention backend excluded: litgpt's
  loop hands SDPA a key length that grows every step; this tells whether cuDNN's handling of new shapes is what
  made that loop host-bound on an H100).

Decode is timed at a context length by filling the caches directly (attention: random keys and values; Lattice:
random unit slots) and decoding from that position: a step costs the same whatever the cache holds, and the
quadratic prefills that would fill them do not fit one short run. Prefill is timed separately (full litgpt prefill,
logits of every position included) where ``batch * context <= PREFILL_TOKENS``. Weights are random (timing only).
"""

import contextlib
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lattice_plugin.bench import MODEL_134M
from lattice_plugin.cache import LatticeCache
from lattice_plugin.config import LatticeConfig
from lattice_plugin.errors import LatticeError, first_line
from lattice_plugin.kernels.gates import normalize_slots

BUILTIN_134M = {**MODEL_134M, "block_size": 132096}  # 128k prompts and the tokens decoded after them
KINDS = {"lattice": "all", "attention": None, "hybrid": "attention_every:4"}
PREFILL_TOKENS = 131072
ATTENTION_PREFILL_CONTEXT = 32768  # longer attention prefills (quadratic, explicit mask) do not fit the run
DIAGNOSTICS = (
    ("lattice_eager", "lattice"),
    ("lattice_graph_unfused", "lattice"),
    ("lattice_litgpt_loop", "lattice"),
    ("attention_litgpt_no_cudnn", "attention"),
)


def build(fields: dict[str, Any], kind: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The model of ``kind``: litgpt's own GPT for attention, :class:`LatticeGPT` otherwise (random weights)."""
    from litgpt.model import GPT

    from lattice_plugin.model import LatticeGPT

    config = LatticeConfig(**{**fields, "lattice_layers": KINDS[kind]})
    with torch.device(device):
        model = GPT(config) if kind == "attention" else LatticeGPT(config)
    return model.to(dtype).eval()


def fill_caches(model: torch.nn.Module) -> None:
    """Random cache contents of the right kind: unit slots for Lattice, normal keys and values for attention."""
    for block in model.transformer.h:
        cache = block.attn.kv_cache
        if isinstance(cache, LatticeCache):
            cache.state.copy_(normalize_slots(torch.randn_like(cache.state)))
        else:
            cache.k.normal_()
            cache.v.normal_()


def memory_needed(fields: dict[str, Any], kind: str, batch: int, length: int, dtype: torch.dtype) -> int:
    """Bytes of the caches and litgpt's ``length x length`` mask (models with attention layers keep one)."""
    attention_layers = {"lattice": 0, "attention": fields["n_layer"], "hybrid": fields["n_layer"] // 4}[kind]
    kv = attention_layers * 2 * batch * length * fields["n_query_groups"] * fields["head_size"] * dtype.itemsize
    mask = 2 * length * length if attention_layers else 0  # built as ones, then tril: twice for a moment
    state = fields["n_layer"] * batch * fields["n_query_groups"] * fields["head_size"] * fields["lattice_slots"] * 4
    return kv + mask + state


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[torch.Tensor], torch.Tensor], token: torch.Tensor, steps: int, warmup: int, device: torch.device
) -> float:
    """ms per call of ``step`` (token in, next token out), after ``warmup`` calls."""
    for _ in range(warmup):
        token = step(token)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        token = step(token)
    _synchronize(device)
    return (time.perf_counter() - start) * 1000 / steps


def litgpt_step(model: torch.nn.Module, batch: int, context: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """litgpt's decode step: ``model(x, input_pos, input_pos_maxp1)`` with ``input_pos`` advanced in place."""
    input_pos = torch.tensor([context], device=model.lm_head.weight.device)
    position = [context]

    def step(token: torch.Tensor) -> torch.Tensor:
        logits = model(token.view(batch, 1), input_pos, input_pos_maxp1=position[0] + 1)
        input_pos.add_(1)
        position[0] += 1
        token = logits[:, -1].argmax(-1)
        int(token[0])
        return token

    return step


def decoder_step(decoder: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    def step(token: torch.Tensor) -> torch.Tensor:
        token = decoder.step(token).argmax(-1)
        int(token[0])
        return token

    return step


def kernel_table(step: Callable[[torch.Tensor], torch.Tensor], token: torch.Tensor, iters: int = 10) -> dict[str, Any]:
    """Device time per decode step by kernel (torch.profiler), largest first."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            token = step(token)
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():  # kernels only (operators report their kernels' time again)
        device_us = getattr(event, "self_device_time_total", 0)
        if event.device_type == DeviceType.CUDA and device_us > 0:
            kernels[event.key[:90]] = round(device_us / iters, 2)
    kernels = dict(sorted(kernels.items(), key=lambda kv: -kv[1]))
    return dict(device_us_per_step=round(sum(kernels.values()), 1), kernels_us=dict(list(kernels.items())[:20]))


class Run:
    """One benchmark run: results written to ``<out>/<name>.json`` after every measurement (a cut-off keeps them)."""

    def __init__(self, out_dir: Path, name: str, results: dict[str, Any], deadline: float) -> None:
        self.path = out_dir / f"{name}.json"
        self.results = results
        self.deadline = deadline
        out_dir.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.path)

    def skip(self, what: dict[str, Any], reason: str) -> None:
        self.results["skipped"].append({**what, "reason": reason})
        print(f"skip {what}: {reason}", flush=True)
        self.save()

    def over_time(self) -> bool:
        return time.monotonic() > self.deadline


def run_generation_bench(
    out_dir: Path,
    *,
    fields: dict[str, Any] | None = None,
    batches: tuple[int, ...] = (1, 16, 64),
    contexts: tuple[int, ...] = (2048, 8192, 32768, 131072),
    steps: int = 40,
    warmup: int = 3,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | None = None,
    name: str = "generation",
    time_budget_s: float = 1e9,
    profile: bool = True,
) -> dict[str, Any]:
    """Measure everything; write ``<name>.json`` (incrementally) and ``<name>.png`` under ``out_dir``."""
    import litgpt
    import triton

    from lattice_plugin.generation import Decoder
    from lattice_plugin.inspect import cache_bytes
    from lattice_plugin.model import LatticeMixer

    fields = dict(BUILTIN_134M if fields is None else fields)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    results: dict[str, Any] = dict(
        device=torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        torch=torch.__version__,
        triton=triton.__version__,
        litgpt=getattr(litgpt, "__version__", "unknown"),
        python=platform.python_version(),
        dtype=str(dtype).removeprefix("torch."),
        model=fields,
        kinds=KINDS,
        decode_steps=steps,
        warmup_steps=warmup,
        method=__doc__.split("\n\n", 1)[1],
        decode=[],
        prefill=[],
        cache_bytes={},
        profiles={},
        skipped=[],
        targets={},
    )
    run = Run(out_dir, name, results, time.monotonic() + time_budget_s)
    free = torch.cuda.mem_get_info(device)[0] if cuda else 1 << 40
    models = {kind: build(fields, kind, device, dtype) for kind in KINDS}
    weights = sum(p.numel() * p.element_size() for m in models.values() for p in m.parameters())
    budget = 0.85 * (free - weights)
    for kind, model in models.items():
        results["cache_bytes"][kind] = {f"{b}x{c}": cache_bytes(model, c, b, dtype) for b in batches for c in contexts}
    # the order puts the shapes of the targets first
    shapes = [(1, contexts[0])] + [(b, c) for b, c in [(1, 32768), (1, 131072), (64, 8192)] if c in contexts]
    shapes += [(b, c) for b in batches for c in contexts if (b, c) not in shapes]
    comparators = [
        ("attention_litgpt", "attention"),
        ("attention_graph", "attention"),
        ("lattice_graph", "lattice"),
        ("hybrid_graph", "hybrid"),
    ]
    for batch, context in shapes:
        extra = list(DIAGNOSTICS) if context == contexts[0] and batch in (1, 64) else []
        for method, kind in comparators + extra:
            what = dict(method=method, batch=batch, context=context)
            if run.over_time():
                run.skip(what, "the run's time budget was spent")
                continue
            length = context + warmup + steps + 2
            if kind != "lattice" and length > fields["block_size"]:
                run.skip(what, f"beyond the attention layers' block size {fields['block_size']}")
                continue
            needed = memory_needed(fields, kind, batch, length, dtype)
            if needed > budget:
                run.skip(what, f"caches + litgpt's mask: {needed / 2**30:.0f} GiB, over {budget / 2**30:.0f} GiB free")
                continue
            try:
                ms = _time_decode(
                    models[kind], method, batch, length, context, steps, warmup, device, Decoder, LatticeMixer
                )
            except Exception as error:
                run.skip(what, f"failed: {first_line(error)}")
                continue
            finally:
                models[kind].clear_kv_cache()
                if cuda:
                    torch.cuda.empty_cache()
            results["decode"].append({**what, "ms_per_token": ms, "tokens_per_s": batch * 1000 / ms})
            print(
                f"{method:>22} B={batch:>3} ctx={context:>7}  {ms:8.3f} ms/token  {batch * 1000 / ms:10.0f} tok/s",
                flush=True,
            )
            results["targets"] = targets(results["decode"], contexts)
            run.save()
    if profile and cuda:
        for method, kind, batch, context in [
            ("lattice_eager", "lattice", 1, contexts[0]),
            ("lattice_graph", "lattice", 1, contexts[0]),
            ("attention_litgpt", "attention", 1, contexts[0]),
            ("lattice_eager", "lattice", 64, 8192),
        ]:
            if run.over_time():
                break
            try:
                results["profiles"][f"{method} B={batch} ctx={context}"] = _profile(
                    models[kind], method, batch, context, warmup, device, Decoder
                )
            except Exception as error:
                results["profiles"][f"{method} B={batch} ctx={context}"] = {"error": str(error)[:300]}
            finally:
                models[kind].clear_kv_cache()
            run.save()
    for batch, context in [(b, c) for c in contexts for b in batches if b * c <= PREFILL_TOKENS]:
        for kind in KINDS:
            what = dict(kind=kind, batch=batch, context=context)
            if run.over_time():
                run.skip(what, "the run's time budget was spent")
            elif kind != "lattice" and context > fields["block_size"]:
                run.skip(what, f"beyond the attention layers' block size {fields['block_size']}")
            elif kind != "lattice" and context > ATTENTION_PREFILL_CONTEXT:
                run.skip(what, f"quadratic prefill (litgpt's explicit mask) past {ATTENTION_PREFILL_CONTEXT} tokens")
            else:
                try:
                    ms = _time_prefill(models[kind], batch, context, device, Decoder)
                    results["prefill"].append({**what, "ms": ms})
                    print(f"prefill {kind:>10} B={batch:>3} T={context:>7}  {ms:9.1f} ms", flush=True)
                except Exception as error:
                    run.skip(what, f"failed: {first_line(error)}")
                finally:
                    models[kind].clear_kv_cache()
                    if cuda:
                        torch.cuda.empty_cache()
                run.save()
    plot(results, out_dir / f"{name}.png")
    return results


def _prepare(
    model: torch.nn.Module,
    method: str,
    batch: int,
    length: int,
    context: int,
    device: torch.device,
    decoder_class: type,
) -> Callable[[torch.Tensor], torch.Tensor]:
    model.max_seq_length = length
    model.set_kv_cache(batch_size=batch, max_seq_length=length, device=device, dtype=model.lm_head.weight.dtype)
    fill_caches(model)
    if "litgpt" in method:
        if hasattr(model, "begin_positions"):
            for block in model.transformer.h:
                block.attn.kv_cache.seek(context)
        return litgpt_step(model, batch, context)
    decoder = decoder_class(model, batch, graph=device.type == "cuda" and "graph" in method)
    decoder.resume(context)
    return decoder_step(decoder)


@torch.inference_mode()
def _time_decode(model, method, batch, length, context, steps, warmup, device, decoder_class, mixer_class) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mixer_class.fused_decode = not method.endswith("unfused")
    no_cudnn = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        with sdpa_kernel(no_cudnn) if method.endswith("no_cudnn") else contextlib.nullcontext():
            step = _prepare(model, method, batch, length, context, device, decoder_class)
            token = torch.zeros(batch, dtype=torch.int64, device=device)
            return time_steps(step, token, steps, warmup, device)
    finally:
        mixer_class.fused_decode = True


@torch.inference_mode()
def _profile(model, method, batch, context, warmup, device, decoder_class) -> dict[str, Any]:
    step = _prepare(model, method, batch, context + warmup + 12, context, device, decoder_class)
    token = torch.zeros(batch, dtype=torch.int64, device=device)
    for _ in range(warmup):
        token = step(token)
    return kernel_table(step, token)


@torch.inference_mode()
def _time_prefill(model, batch: int, context: int, device: torch.device, decoder_class: type) -> float:
    model.max_seq_length = context
    model.set_kv_cache(batch_size=batch, max_seq_length=context, device=device, dtype=model.lm_head.weight.dtype)
    decoder = decoder_class(model, batch, graph=False)
    idx = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    decoder.prefill(idx[:, : min(context, 256)])  # warm: kernels compiled, allocator primed
    _synchronize(device)
    start = time.perf_counter()
    decoder.prefill(idx)
    _synchronize(device)
    return (time.perf_counter() - start) * 1000


def targets(decode: list[dict[str, Any]], contexts: tuple[int, ...]) -> dict[str, Any]:
    """The issue's targets as measured ratios (None where a shape was not measured)."""

    def ms(method: str, batch: int, context: int) -> float | None:
        return next(
            (r["ms_per_token"] for r in decode if (r["method"], r["batch"], r["context"]) == (method, batch, context)),
            None,
        )

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b is not None else None

    out: dict[str, Any] = {}
    first = contexts[0]
    for attention in ("attention_litgpt", "attention_graph"):
        out[f"lattice/{attention} ms per token, B=1 ctx={first} (target <= 0.5)"] = ratio(
            ms("lattice_graph", 1, first), ms(attention, 1, first)
        )
        out[f"{attention}/lattice ms per token, B=1 ctx=32768 (target >= 4)"] = ratio(
            ms(attention, 1, 32768), ms("lattice_graph", 1, 32768)
        )
        out[f"lattice/{attention} tokens per s, B=64 ctx=8192 (target >= 3)"] = ratio(
            ms(attention, 64, 8192), ms("lattice_graph", 64, 8192)
        )
    flat = [ms("lattice_graph", 1, c) for c in contexts if ms("lattice_graph", 1, c) is not None]
    out["lattice ms per token max/min over contexts, B=1 (target <= 1.10)"] = max(flat) / min(flat) if flat else None
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in results["decode"]}) or [1]
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(4.5 * (len(batches) + 1), 4.2))
    for ax, batch in zip(axes, batches):
        for method in sorted({r["method"] for r in results["decode"]}):
            rows = sorted(
                (r for r in results["decode"] if r["method"] == method and r["batch"] == batch),
                key=lambda r: r["context"],
            )
            if rows:
                ax.plot([r["context"] for r in rows], [r["ms_per_token"] for r in rows], marker="o", label=method)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="context tokens",
            ylabel="ms per decode step",
            title=f"decode, batch {batch}",
        )
        ax.legend(fontsize=7)
    ax = axes[-1]
    shapes = sorted({(r["context"], r["batch"]) for r in results["prefill"]})
    for offset, kind in enumerate(KINDS):
        times = {(r["context"], r["batch"]): r["ms"] for r in results["prefill"] if r["kind"] == kind}
        ax.bar(
            [i + 0.27 * (offset - 1) for i, shape in enumerate(shapes) if shape in times],
            [times[shape] for shape in shapes if shape in times],
            width=0.27,
            label=kind,
        )
    ax.set_xticks(range(len(shapes)), [f"{b} x {c}" for c, b in shapes], rotation=45, fontsize=7)
    ax.set(yscale="log", xlabel="batch x prompt tokens", ylabel="prefill ms", title="prefill")
    ax.legend(fontsize=7)
    fig.suptitle(f"{results['device']}, {results['model'].get('name')}, {results['dtype']}", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def fields_from_checkpoint(checkpoint_dir: Path) -> dict[str, Any]:
    """The shape of a checkpoint's model (its config fields; the benchmark builds random weights of that shape)."""
    from dataclasses import asdict

    from lattice_plugin.checkpoint import load_config

    if not checkpoint_dir.is_dir():
        raise LatticeError(f"checkpoint directory {str(checkpoint_dir)!r} does not exist")
    config = load_config(checkpoint_dir)
    fields = {k: v for k, v in asdict(config).items() if k in BUILTIN_134M or k.startswith("lattice_")}
    fields.update(padded_vocab_size=config.padded_vocab_size, lattice_slots=config.lattice_slots or config.head_size)
    fields["block_size"] = max(config.block_size, 1)
    return {k: v for k, v in fields.items() if k != "lattice_layers"}


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_generation_bench(Path("bench/results"))["targets"], indent=1))
