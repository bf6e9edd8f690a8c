"""Held-out perplexity (over all ranks), generation-cache bytes and decode speed for the distillation report."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F


def _any_rank(fabric: Any, flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (every rank gets the same answer)."""
    if fabric.world_size == 1:
        return flag
    import torch.distributed as dist

    tensor = torch.tensor(int(flag), device=fabric.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def whole_split(loader: Any) -> Any:
    """``loader`` with every item on exactly one rank. litdata's streaming loaders (litgpt's TextFiles and the other
    pretraining data modules) drop the items that do not divide evenly among the ranks, so a held-out score would
    cover a subset that depends on the GPU count; rebuilt without dropping, the shards differ in length by at most
    a batch, which :func:`heldout_loss` pads. Other loaders are returned as they are."""
    try:
        from litdata import StreamingDataLoader, StreamingDataset
    except ImportError:
        return loader
    dataset = getattr(loader, "dataset", None)
    if not isinstance(loader, StreamingDataLoader) or not isinstance(dataset, StreamingDataset):
        return loader
    dataset.set_drop_last(False)
    return StreamingDataLoader(
        dataset,
        batch_size=loader.batch_size,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        drop_last=False,
    )


@torch.no_grad()
def heldout_loss(
    fabric: Any, model: Any, loader: Any, max_iters: int | None, autocast: bool = True
) -> dict[str, float]:
    """Mean next-token cross-entropy over the first ``max_iters`` batches of every rank (None: all), its perplexity
    and the number of tokens scored (all ranks). The result does not depend on the number of ranks."""
    loader = whole_split(loader)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=fabric.device, dtype=torch.float64)
    tokens = torch.zeros((), device=fabric.device, dtype=torch.float64)
    iterator = iter(loader)
    steps = 0
    # every rank steps until no rank has a batch left (FSDP forwards are collective): a rank whose shard is done pads
    # with a forward that is not scored, so each held-out token counts once whatever the shards' lengths
    while True:
        batch = next(iterator, None) if max_iters is None or steps < max_iters else None
        scored = batch is not None
        if not _any_rank(fabric, scored):
            break
        steps += 1
        if not scored:
            batch = torch.zeros(1, 2, dtype=torch.long)
        batch = batch.to(fabric.device)
        inputs, targets = batch[:, :-1].long(), batch[:, 1:].long()
        if autocast:
            with fabric.autocast():
                logits = model(inputs)
        else:
            logits = model(inputs)
        if scored:
            total += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").double()
            tokens += targets.numel()
    stats = torch.stack([total, tokens])
    if fabric.world_size > 1:
        stats = fabric.all_reduce(stats, reduce_op="sum")
    model.train(was_training)
    loss = (stats[0] / stats[1].clamp(min=1)).item()
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(stats[1].item()), "batches": steps}


def cache_bytes_at(config: Any, lengths: list[int], dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Generation-cache bytes for one sequence at each context length (KV caches in ``dtype``, Lattice states in
    float32), read off the real cache modules on the meta device."""
    from lattice_plugin.inspect import build_meta_model, cache_bytes

    model = build_meta_model(config)
    return {str(length): cache_bytes(model, length, 1, dtype) for length in lengths}


@torch.inference_mode()
def decode_speed(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int = 2) -> dict[str, Any]:
    """Greedy generation of ``new_tokens`` after ``prompt`` (1-D token ids) through the model's cache, batch 1, by
    the decode path ``lattice generate`` uses (:class:`lattice_plugin.generation.Decoder`: a CUDA graph on a GPU).

    The first run warms up (kernels, allocator, graph capture); the best of ``repeats`` timed runs is reported,
    prefill excluded.
    """
    from lattice_plugin.generation import Decoder

    device = prompt.device
    length = prompt.numel() + new_tokens
    if length > model.max_seq_length:
        raise ValueError(f"prompt + new tokens ({length}) exceed the model's max_seq_length ({model.max_seq_length})")
    model.set_kv_cache(batch_size=1, max_seq_length=model.max_seq_length, device=device)
    decoder = Decoder(model, batch_size=1)

    def run() -> tuple[float, list[int]]:
        token = decoder.prefill(prompt.view(1, -1)).argmax(-1)
        generated = [token]
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = decoder.step(token).argmax(-1)
            generated.append(token)
        _synchronize(device)
        return time.perf_counter() - start, [int(t) for t in generated]

    try:
        run()
        seconds, tokens = min((run() for _ in range(repeats)), key=lambda result: result[0])
    finally:
        model.clear_kv_cache()
    steps = max(new_tokens - 1, 1)
    return {
        "tokens_per_sec": steps / seconds,
        "new_tokens": new_tokens,
        "prompt_tokens": prompt.numel(),
        "tokens": tokens,
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
