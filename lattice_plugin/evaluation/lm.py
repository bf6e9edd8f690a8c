"""The lm-eval model ``lattice``: any checkpoint directory the plugin reads (Lattice, hybrid, or a plain litgpt
transformer) behind lm-eval's ``TemplateLM``, so a teacher and its student are scored by the same code.

- ``loglikelihood`` / ``loglikelihood_rolling``: batched full forwards, right-padded (every layer is causal, so the
  padding never reaches a scored position), inputs left-truncated to ``max_length`` as lm-eval's own models do.
- ``generate_until``: greedy or sampled decoding through the models' caches (the fixed-slot state of Lattice layers,
  litgpt's KV cache of attention layers); requests are batched when their prompts have the same length, because the
  Lattice cache keeps one position for the whole batch (and a recurrent state cannot ignore left padding).

Model arguments (``--model_args`` of lm-eval, or keyword arguments): ``checkpoint_dir`` (alias ``pretrained``),
``device``, ``dtype`` (``auto``, ``float32``, ``bfloat16``, ``float16``), ``batch_size``, ``max_length``,
``max_gen_toks``, ``add_bos_token``, ``use_cache`` (generation through the cache; ``False`` recomputes every step).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models first: registering before them would hide them)
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from lattice_plugin.errors import LatticeError

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}
IGNORED_ARGS = ("trust_remote_code",)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise LatticeError(f"unknown device {str(device)!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LatticeError(f"device {str(device)!r} was asked for but CUDA is not available here; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    name = str(dtype).lower().removeprefix("torch.")
    if name not in DTYPES:
        raise LatticeError(f"unknown dtype {dtype!r}; choose auto, {', '.join(sorted(set(DTYPES)))}")
    return DTYPES[name]


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise LatticeError(f"{name} must be true or false, got {value!r}")


def _as_batch_size(value: Any, max_batch_size: Any) -> int:
    if value is None:
        return 1
    text = str(value).strip().lower()
    if text.startswith("auto"):
        size = int(max_batch_size) if max_batch_size else 16
        log.warning("batch_size=%s: the lattice model does not probe memory; using batch size %d", value, size)
        return size
    try:
        size = int(text)
    except ValueError:
        raise LatticeError(f"batch_size must be a positive integer, got {value!r}") from None
    if size < 1:
        raise LatticeError(f"batch_size must be a positive integer, got {value!r}")
    return size


def load_tokenizer(checkpoint_dir: Path):
    """litgpt's tokenizer of a checkpoint directory, with a clear error when the files are missing."""
    from litgpt import Tokenizer

    checkpoint_dir = Path(checkpoint_dir)
    if not any((checkpoint_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise LatticeError(
            f"{str(checkpoint_dir)!r} holds no tokenizer (tokenizer.json or tokenizer.model); copy the tokenizer files "
            "of the model it was trained or converted from into it"
        )
    return Tokenizer(checkpoint_dir)


@register_model("lattice")
class LatticeLM(TemplateLM):
    """lm-eval's view of a plugin checkpoint (see the module docstring for the arguments).

    ``model`` and ``tokenizer`` may be passed instead of ``checkpoint_dir`` to score a model held in memory.
    """

    def __init__(
        self,
        checkpoint_dir: str | Path | None = None,
        pretrained: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        add_bos_token: bool | str | None = None,
        use_cache: bool | str = True,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(key for key in kwargs if key not in IGNORED_ARGS)
        if unknown:
            raise LatticeError(
                f"unknown lattice model argument(s) {', '.join(unknown)}; the lattice model takes checkpoint_dir "
                "(or pretrained), device, dtype, batch_size, max_length, max_gen_toks, add_bos_token, use_cache"
            )
        if checkpoint_dir is not None and pretrained is not None and str(checkpoint_dir) != str(pretrained):
            raise LatticeError("give checkpoint_dir or pretrained (the same thing), not both")
        checkpoint_dir = checkpoint_dir if checkpoint_dir is not None else pretrained
        self._device = resolve_device(device)
        if model is None:
            if checkpoint_dir is None:
                raise LatticeError(
                    "the lattice model needs checkpoint_dir=DIR (a plugin or litgpt checkpoint directory)"
                )
            from lattice_plugin.checkpoint import load_model

            self.checkpoint_dir: Path | None = Path(checkpoint_dir)
            tokenizer = load_tokenizer(self.checkpoint_dir)  # check the cheap files before loading weights
            self._dtype = resolve_dtype(dtype, self._device)
            model = load_model(self.checkpoint_dir, device=self._device, dtype=self._dtype)
        else:
            if tokenizer is None:
                if checkpoint_dir is None:
                    raise LatticeError("pass a tokenizer (or the checkpoint_dir holding one) with an in-memory model")
                tokenizer = load_tokenizer(Path(checkpoint_dir))
            self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
            own_dtype = next(model.parameters()).dtype
            self._dtype = own_dtype if dtype in (None, "auto") else resolve_dtype(dtype, self._device)
            model = model.to(device=self._device, dtype=self._dtype)
        self.model = model.eval()
        self.tokenizer = tokenizer

        block_size = self.model.config.block_size
        self._max_length = block_size if max_length in (None, "", "None") else int(max_length)
        if not 1 <= self._max_length <= block_size:
            raise LatticeError(
                f"max_length={self._max_length} is outside 1..{block_size} (the model's block_size, the length its "
                "position encoding was built for)"
            )
        self.model.max_seq_length = self._max_length
        self.batch_size = _as_batch_size(batch_size, max_batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.use_cache = _as_bool(use_cache, "use_cache")
        self.add_bos_token = (
            tokenizer.use_bos if add_bos_token in (None, "", "None") else _as_bool(add_bos_token, "add_bos_token")
        )
        if self.add_bos_token and tokenizer.bos_id is None:
            raise LatticeError("add_bos_token is set but the tokenizer defines no BOS token")
        if tokenizer.eos_id is None and tokenizer.bos_id is None:
            raise LatticeError("the tokenizer defines neither an EOS nor a BOS token; lm-eval needs one of them")
        processor = getattr(tokenizer, "processor", None)
        if getattr(tokenizer, "backend", None) == "huggingface":
            self._tokenizer_vocab = processor.get_vocab_size(with_added_tokens=True)
        else:
            self._tokenizer_vocab = tokenizer.vocab_size

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id if self.tokenizer.eos_id is not None else self.tokenizer.bos_id

    @property
    def prefix_token_id(self) -> int:
        if self.add_bos_token and self.tokenizer.bos_id is not None:
            return self.tokenizer.bos_id
        return self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.checkpoint_dir or "in-memory").replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        config = self.model.config
        lattice_layers = list(getattr(config, "lattice_layers", []) or [])
        return {
            "checkpoint_dir": str(self.checkpoint_dir) if self.checkpoint_dir else None,
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self._dtype).removeprefix("torch."),
            "n_layer": config.n_layer,
            "lattice_layers": lattice_layers,
            "architecture": "lattice"
            if len(lattice_layers) == config.n_layer
            else ("hybrid" if lattice_layers else "transformer"),
            "max_length": self._max_length,
        }

    # ------------------------------------------------------------------------------------------------ tokens
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``; with ``add_special_tokens`` (default: the ``add_bos_token`` setting) BOS first."""
        ids = self.tokenizer.encode(string, bos=False).tolist()
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens and self.add_bos_token
        if add_bos and (not ids or ids[0] != self.tokenizer.bos_id):
            ids = [self.tokenizer.bos_id] + ids
        return ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(torch.tensor(list(ids), dtype=torch.long))

    # ------------------------------------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), continuation is the greedy one)`` for token-level requests."""
        batch_size = override_bs or self.batch_size
        inputs = []
        for cache_key, context_enc, continuation_enc in requests:
            if not continuation_enc:
                raise LatticeError(f"empty continuation in a loglikelihood request (context {cache_key!r})")
            if len(continuation_enc) > self._max_length:
                raise LatticeError(
                    f"a continuation of {len(continuation_enc)} tokens does not fit max_length={self._max_length}"
                )
            whole = (context_enc + continuation_enc)[-(self._max_length + 1) :]
            inputs.append((whole[:-1], continuation_enc))
        # longest first (lm-eval's order): padding is small and the first batch shows the peak memory
        order = sorted(range(len(requests)), key=lambda i: (-len(inputs[i][0]), i))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pad_id = self.eot_token_id
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(inputs[i][0]) for i in batch)
            idx = torch.full((len(batch), width), pad_id, dtype=torch.long)
            for row, i in enumerate(batch):
                tokens = inputs[i][0]
                idx[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            logits = self.model(idx.to(self._device))
            for row, i in enumerate(batch):
                tokens, continuation = inputs[i]
                n = len(continuation)
                scores = torch.log_softmax(logits[row, len(tokens) - n : len(tokens)].double(), dim=-1)
                target = torch.tensor(continuation, dtype=torch.long, device=scores.device)
                logprob = scores.gather(-1, target[:, None]).sum().item()
                greedy = bool((scores.argmax(-1) == target).all())
                results[i] = (logprob, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], (logprob, greedy))
            progress.update(len(batch))
        progress.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in disjoint windows of ``max_length`` (lm-eval's convention: each
        window starts afresh, so a transformer and a Lattice model see the same contexts)."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for index, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string, add_special_tokens=False)
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self._max_length, context_len=1
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tok_decode([self.eot_token_id])
        prepared = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text or None)
            max_new = int(kwargs.pop("max_gen_toks"))
            settings = (
                bool(kwargs.get("do_sample", False)),
                float(kwargs.get("temperature", 0.0) or 0.0),
                int(kwargs.get("top_k", 0) or 0),
                float(kwargs.get("top_p", 1.0) or 1.0),
            )
            max_context = max(1, self._max_length - max_new)
            tokens = self.tok_encode(context)[-max_context:]
            max_new = min(max_new, self._max_length - len(tokens))
            prepared.append((tokens, until, max_new, settings))
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (tokens, _until, max_new, settings) in enumerate(prepared):
            groups[(len(tokens), max_new, settings)].append(i)
        outputs: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        for (_, max_new, settings), members in sorted(groups.items(), key=lambda item: item[1][0]):
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                prompts = torch.tensor([prepared[i][0] for i in batch], dtype=torch.long)
                stops = [prepared[i][1] for i in batch]
                generated = self.generate_tokens(prompts, max_new, settings, stops)
                for i, ids in zip(batch, generated):
                    text = _cut_at_stops(self.tok_decode(ids), prepared[i][1])
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                progress.update(len(batch))
        progress.close()
        return outputs  # type: ignore[return-value]

    @torch.inference_mode()
    def generate_tokens(
        self,
        prompts: torch.Tensor,
        max_new: int,
        settings: tuple[bool, float, int, float] = (False, 0.0, 0, 1.0),
        stops: list[list[str]] | None = None,
    ) -> list[list[int]]:
        """Continue equal-length ``prompts`` ``(B, T)`` by up to ``max_new`` tokens each; a row stops at the EOS token
        or once its text holds one of its ``stops``. Returns the new tokens of each row (EOS excluded)."""
        batch, length = prompts.shape
        prompts = prompts.to(self._device)
        finished = [False] * batch
        generated: list[list[int]] = [[] for _ in range(batch)]
        if max_new <= 0:
            return generated
        decoder = None
        if self.use_cache:  # the path `lattice generate` takes: static step, CUDA graph on a GPU
            from lattice_plugin.generation import Decoder

            self.model.set_kv_cache(batch_size=batch, max_seq_length=length + max_new, device=self._device)
            decoder = Decoder(self.model, batch)
        try:
            sequence = prompts
            logits = decoder.prefill(prompts) if decoder is not None else self.model(sequence)[:, -1]
            for step in range(max_new):
                token = self._pick(logits, settings)
                for row, value in enumerate(token.tolist()):
                    if finished[row]:
                        continue
                    if value == self.eot_token_id:
                        finished[row] = True
                        continue
                    generated[row].append(value)
                    if stops and any(stop and stop in self.tok_decode(generated[row]) for stop in stops[row]):
                        finished[row] = True
                if all(finished) or step == max_new - 1:
                    break
                if decoder is not None:
                    logits = decoder.step(token)
                else:
                    sequence = torch.cat((sequence, token[:, None]), dim=1)
                    logits = self.model(sequence)[:, -1]
        finally:
            if self.use_cache:
                self.model.clear_kv_cache()
        return generated

    def _pick(self, logits: torch.Tensor, settings: tuple[bool, float, int, float]) -> torch.Tensor:
        """Next token per row: greedy, or sampled with temperature / top-k / top-p (ids the tokenizer cannot decode,
        the padding of the embedding, are never chosen)."""
        do_sample, temperature, top_k, top_p = settings
        logits = logits[:, : self._tokenizer_vocab].float()
        if not do_sample or temperature <= 0.0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k > 0:
            threshold = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if top_p < 1.0:
            sorted_probs, sorted_idx = torch.sort(probs, descending=True)
            drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, sorted_idx, sorted_probs)
        return torch.multinomial(probs, num_samples=1).squeeze(-1)


def _cut_at_stops(text: str, stops: list[str]) -> str:
    """``text`` up to the first stop sequence (lm-eval's convention: the stop itself is not returned)."""
    cut = len(text)
    for stop in stops:
        if stop:
            position = text.find(stop)
            if position != -1:
                cut = min(cut, position)
    return text[:cut]
