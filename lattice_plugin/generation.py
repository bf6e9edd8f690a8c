"""Fast generation: a prefill, then one static decode step per token, replayed from a CUDA graph.

:class:`Decoder` keeps the position in Python (the caller knows it), so no step reads a device tensor back; a decode
step has the same shapes at every position (attention layers read litgpt's whole preallocated KV cache under its
mask, ``input_pos_maxp1=None``; Lattice layers update their fixed state in place, docs/math.md §5). That lets the
whole-model step be captured once per batch size and replayed per token. Where capture is impossible (the CPU) or
fails, the same step runs eagerly (a failure is reported once, as a warning).

:func:`generate_fn` has the contract of ``litgpt.generate.base.generate_fn``; :func:`lattice_plugin.patch.patch_litgpt`
puts it in that module's place, which is where ``lattice generate``, ``lattice chat`` and litgpt's Python API
(``LLM.generate``, streaming or not, and so litgpt's server) all look up their decode loop. Models without Lattice
layers keep litgpt's own loop.
"""

import itertools
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from lattice_plugin.errors import LatticeError, first_line
from lattice_plugin.model import LatticeGPT

LITGPT_GENERATE_FN: Callable[..., Iterator[torch.Tensor]] | None = None
"""litgpt's own ``generate_fn`` (set when :func:`patch_litgpt` replaces it): the loop for models without Lattice."""

_warned: set[str] = set()


def unwrap(model: nn.Module) -> nn.Module:
    """The module itself under Fabric's or torch.compile's wrapper."""
    while True:
        inner = getattr(model, "module", None)
        inner = getattr(model, "_orig_mod", None) if inner is None else inner
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def uses_lattice(model: nn.Module) -> bool:
    model = unwrap(model)
    return isinstance(model, LatticeGPT) and bool(model.config.lattice_layers)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


class Decoder:
    """Prefill and decode a batch through a model's caches (``model.set_kv_cache(batch_size)`` comes first), always
    without autograd (a cache written under autograd would chain every step's graph to the next).

    The logits returned by :meth:`step` live in a static buffer that the next step overwrites: sample from them
    before calling it again.
    """

    def __init__(self, model: nn.Module, batch_size: int, graph: bool | None = None) -> None:
        self.model = unwrap(model)
        self.batch_size = batch_size
        self.device = self.model.lm_head.weight.device
        self.use_graph = self.device.type == "cuda" if graph is None else graph
        self.position = 0
        """Tokens the caches hold: the position the next step writes."""
        self._token = torch.zeros(batch_size, 1, dtype=torch.int64, device=self.device)
        self._input_pos = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: torch.Tensor | None = None
        self._signature: tuple[int, ...] | None = None
        self._warm = False

    def _forward(self, idx: torch.Tensor, input_pos: torch.Tensor, start: int, maxp1: int | None) -> torch.Tensor:
        if isinstance(self.model, LatticeGPT):
            return self.model(idx, input_pos, input_pos_maxp1=maxp1, position=start)
        return self.model(idx, input_pos, input_pos_maxp1=maxp1)

    def _memory_signature(self) -> tuple[int, ...]:
        """Addresses of everything a captured step reads or writes: a graph replays only while they hold."""
        tensors = itertools.chain(self.model.parameters(), self.model.buffers())
        mask = getattr(self.model, "mask_cache", None)
        return tuple(t.data_ptr() for t in tensors) + ((mask.data_ptr(),) if mask is not None else ())

    @torch.inference_mode()
    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """Run a new prompt ``(B, T)`` from position 0; returns the logits of its last position ``(B, vocab)``."""
        length = idx.shape[1]
        if length > self.model.max_seq_length:
            raise LatticeError(f"a prompt of {length} tokens exceeds max_seq_length {self.model.max_seq_length}")
        input_pos = torch.arange(length, device=self.device)
        logits = self._forward(idx, input_pos, 0, length)[:, -1]
        self.position = length
        if self._graph is not None and self._memory_signature() != self._signature:
            self._graph = self._logits = None  # the caches or weights moved: capture again
        return logits

    def resume(self, position: int) -> None:
        """Continue from caches that already hold ``position`` tokens, written by the caller (benchmarks time
        decoding at a context length this way without running its prefill)."""
        for block in self.model.transformer.h:
            if hasattr(block.attn.kv_cache, "seek"):
                block.attn.kv_cache.seek(position)
        self.position = position

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence (``(B,)`` or ``(B, 1)``) at the next position; returns logits ``(B, vocab)``."""
        start = self.position
        if start >= self.model.max_seq_length:
            raise LatticeError(f"position {start} is past max_seq_length {self.model.max_seq_length}")
        self._token.copy_(token.view(self.batch_size, 1))
        self._input_pos.fill_(start)
        if not self.use_graph:  # eager: attention may read just the positions written so far
            logits = self._forward(self._token, self._input_pos, start, start + 1)[:, -1]
        elif self._graph is not None:
            if isinstance(self.model, LatticeGPT):
                self.model.begin_positions(start, 1, self.batch_size)  # the check the replayed forward skips
            self._graph.replay()
            logits = self._logits
        elif not self._warm:  # first step: eager on the capture stream (lazy initialisation, Triton compilation)
            logits = self._eager_on_side_stream(start)
            self._warm = True
        else:
            logits = self._capture_and_replay(start)
        self.position = start + 1
        return logits

    def _eager_on_side_stream(self, start: int) -> torch.Tensor:
        stream = _capture_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            logits = self._forward(self._token, self._input_pos, start, None)[:, -1]
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return logits

    def _capture_and_replay(self, start: int) -> torch.Tensor:
        """Record the step at ``start`` (recording runs nothing), then replay it; eager if capture fails."""
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=_capture_stream(self.device)):
                logits = self._forward(self._token, self._input_pos, start, None)[:, -1]
        except Exception as error:
            _warn_once(f"lattice: decoding without a CUDA graph, its capture failed: {first_line(error)}")
            self.use_graph = False
            self.resume(start)  # the failed capture may have advanced the caches' positions
            return self._forward(self._token, self._input_pos, start, start + 1)[:, -1]
        self._graph, self._logits, self._signature = graph, logits, self._memory_signature()
        graph.replay()
        return logits


_streams: dict[torch.device, torch.cuda.Stream] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


def decoder_for(model: nn.Module, batch_size: int) -> Decoder:
    """The model's decoder for ``batch_size``, kept on the model so that its graph is captured once."""
    model = unwrap(model)
    decoders = model.__dict__.setdefault("_lattice_decoders", {})
    if batch_size not in decoders:
        decoders[batch_size] = Decoder(model, batch_size)
    return decoders[batch_size]


def sample_token(logits: torch.Tensor, **sample_kwargs: Any) -> torch.Tensor:
    """litgpt's sampling (temperature, top-k, top-p) of one sequence's next token from its logits ``(vocab,)``."""
    from litgpt.generate.base import sample

    return sample(logits.view(1, 1, -1), **sample_kwargs).to(dtype=torch.int64)


@torch.inference_mode()
def generate_fn(
    model: nn.Module,
    prompt: torch.Tensor,
    max_returned_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    stop_tokens: tuple[list[int], ...] = (),
    include_prompt: bool,
    include_eos: bool,
) -> Iterator[torch.Tensor]:
    """Generate after one prompt ``(T,)`` through a :class:`Decoder` (litgpt's ``generate_fn`` contract).

    Yields the prompt first if ``include_prompt``, then each new token as a ``(1,)`` tensor, at most
    ``max_returned_tokens - T`` of them. Stops after any of ``stop_tokens`` (token sequences), yielding it only if
    ``include_eos``; tokens that might begin a stop sequence are held back until they cannot.
    """
    if not uses_lattice(model):
        yield from LITGPT_GENERATE_FN(
            model,
            prompt,
            max_returned_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_tokens=stop_tokens,
            include_prompt=include_prompt,
            include_eos=include_eos,
        )
        return
    module = unwrap(model)
    prompt_size = prompt.size(0)
    if max_returned_tokens <= prompt_size:
        raise LatticeError(f"no room to generate: {max_returned_tokens} tokens in all for a {prompt_size}-token prompt")
    if module.max_seq_length < max_returned_tokens - 1 and module.all_lattice:
        module.max_seq_length = max_returned_tokens  # no length limit: only the RoPE tables grow
    if module.max_seq_length < max_returned_tokens - 1:
        raise LatticeError(f"max_seq_length {module.max_seq_length} is below the {max_returned_tokens - 1} needed")
    if include_prompt:
        yield prompt
    decoder = decoder_for(module, batch_size=1)
    logits = decoder.prefill(prompt.view(1, -1))[0]
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    held: list[torch.Tensor] = []
    matched = [0] * len(stop_tokens)  # leading tokens of each stop sequence matched by the newest tokens
    new_tokens = max_returned_tokens - prompt_size
    for index in range(new_tokens):
        token = sample_token(logits, **sampling)
        held.append(token)
        value = int(token)  # the one read back per token: stop sequences need it
        for j, sequence in enumerate(stop_tokens):
            matched[j] = matched[j] + 1 if value == sequence[matched[j]] else 0
            if matched[j] == len(sequence):
                if include_eos:
                    yield from held
                return
        ready = len(held) - max(matched, default=0)
        yield from held[:ready]
        del held[:ready]
        if index + 1 < new_tokens:
            logits = decoder.step(token)[0]
    yield from held
