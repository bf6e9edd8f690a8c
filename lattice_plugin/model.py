"""The Lattice mixer and the litgpt model classes that put it on the layers a :class:`LatticeConfig` selects.

The mixer subclasses litgpt's ``CausalSelfAttention``: it keeps the fused ``qkv`` and the output ``proj`` (so a
pretrained attention layer's weights load unchanged, docs/math.md §6) and everything litgpt does with attention modules
(FSDP wrapping, pretrain's initialisation of ``proj``, LoRA's weight mapping) applies to it as well.
"""

from typing import Any

import torch
import torch.nn as nn
from litgpt.model import GPT, Block, CausalSelfAttention, apply_rope, apply_rope_interleave
from typing_extensions import Self

from lattice_plugin.cache import LatticeCache, first_position
from lattice_plugin.config import LatticeConfig
from lattice_plugin.errors import LatticeError
from lattice_plugin.kernels.elementwise import epilogue_reference, prologue_reference
from lattice_plugin.ops import lattice_attention, lattice_step, triton_available


def activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls produce here: autocast's while it is on for ``x``'s device, else ``x``'s own.

    The Lattice op takes its inputs in this dtype (16-bit under bf16 autocast and bf16-true), while its gate and
    state arithmetic stay float32.
    """
    device = x.device.type
    # torch.compile cannot trace is_autocast_available (a graph break per layer), and compiled models run on cuda/cpu
    known = device in ("cuda", "cpu") or (not torch.compiler.is_compiling() and torch.amp.is_autocast_available(device))
    if known and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype  # also on devices autocast does not know (meta: litgpt's FLOP count)


def fused_elementwise(x: torch.Tensor, backend: str) -> bool:
    """Whether the mixer's prologue and epilogue run as the fused Triton kernels (CUDA, float32 arithmetic)."""
    return backend in ("auto", "triton") and x.is_cuda and x.dtype != torch.float64 and triton_available()


def layer_prologue(q_logits, k_logits, v, beta_logits, code: str, out_dtype: torch.dtype, fused: bool):
    """``kernels/elementwise.py:prologue_reference``, fused into one Triton kernel on CUDA."""
    if fused:
        from lattice_plugin.kernels.triton_prologue import prologue_triton

        return prologue_triton(q_logits, k_logits, v, beta_logits, code, out_dtype)
    return prologue_reference(q_logits, k_logits, v, beta_logits, code, out_dtype)


def layer_epilogue(o, weight, eps: float, gate_logits, out_dtype: torch.dtype, fused: bool) -> torch.Tensor:
    """``kernels/elementwise.py:epilogue_reference``, fused into one Triton kernel on CUDA."""
    if fused:
        from lattice_plugin.kernels.triton_epilogue import epilogue_triton

        return epilogue_triton(o, weight, eps, gate_logits, out_dtype)
    return epilogue_reference(o, weight, eps, gate_logits, out_dtype)


class HeadwiseLinear(nn.Module):
    """A separate ``in -> out`` linear map per head: the code maps phi_q / phi_k from head size to ``m`` slots.

    Initialised to the identity when ``in == out`` (so a converted layer starts by addressing slots with its
    attention queries and keys), else to a random semi-orthogonal map.
    """

    def __init__(self, n_heads: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_heads, out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        with torch.no_grad():
            n_heads, out_features, in_features = self.weight.shape
            if out_features == in_features:
                self.weight.copy_(torch.eye(in_features).expand(n_heads, -1, -1))
            else:
                for head in self.weight:
                    nn.init.orthogonal_(head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., H, in) -> (..., H, out)``."""
        return torch.einsum("...hi,hoi->...ho", x, self.weight)


class InitialSlots(nn.Module):
    """The learned initial memory ``S_0``, ``(Hkv, d, m)``; the op normalises its columns on use."""

    def __init__(self, n_kv_heads: int, head_size: int, slots: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_kv_heads, head_size, slots))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)


class HeadRMSNorm(nn.Module):
    """RMSNorm over each head's output with a learned per-head scale (computed in float32)."""

    def __init__(self, n_heads: int, head_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_heads, head_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., H, head_size)`` -> same shape and dtype (the mixer fuses this into its epilogue)."""
        return epilogue_reference(x, self.weight, self.eps, None, x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class LatticeMixer(CausalSelfAttention):
    """Lattice token mixer (docs/math.md §2): attention's q/k/v/o around a fixed set of unit-norm memory slots."""

    def __init__(self, config: LatticeConfig, block_idx: int) -> None:
        super().__init__(config, block_idx)
        n_head, n_kv, head_size, slots = (
            config.n_head,
            config.n_query_groups,
            config.head_size,
            config.lattice_slots,
        )
        self.q_code = HeadwiseLinear(n_head, head_size, slots)
        self.k_code = HeadwiseLinear(n_kv, head_size, slots)
        self.beta_proj = nn.Linear(config.n_embd, n_kv)
        self.initial_slots = InitialSlots(n_kv, head_size, slots)
        self.out_norm = HeadRMSNorm(n_head, head_size, eps=config.norm_eps)
        self.out_gate = nn.Linear(config.n_embd, n_head * head_size, bias=False) if config.lattice_output_gate else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        input_pos_maxp1: int | None = None,
    ) -> torch.Tensor:
        """Same contract as litgpt's attention; ``mask`` and ``input_pos_maxp1`` are not needed (causal by design)."""
        if input_pos is not None and self._can_fuse_step(x):
            return self._fused_step(x, cos, sin)
        config = self.config
        B, T, _ = x.shape
        q, k, v = self._project(x, cos, sin)
        dtype = activation_dtype(x)
        fused = fused_elementwise(x, config.lattice_backend)
        q, k, v, beta = layer_prologue(
            self.q_code(q), self.k_code(k), v, self.beta_proj(x), config.lattice_feature_map, dtype, fused
        )
        if input_pos is None:
            o, _ = lattice_attention(q, k, v, beta, self.initial_slots.weight, **self._op_options(chunked=True))
        else:
            o = self._forward_with_cache(q, k, v, beta)
        gate_logits = self.out_gate(x) if self.out_gate is not None else None
        o = layer_epilogue(o, self.out_norm.weight, self.out_norm.eps, gate_logits, dtype, fused)
        return self.proj(o.reshape(B, T, -1))

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Fused qkv projection, optional q/k norms and RoPE exactly as litgpt's attention does them.

        Returns q ``(B, T, Hq, hs)``, k ``(B, T, Hkv, hs)``, v ``(B, T, Hkv, hs)``.
        """
        config = self.config
        B, T, _ = x.shape
        n_head, n_kv, head_size = config.n_head, config.n_query_groups, config.head_size
        q, k, v = self.qkv(x).split((n_head * head_size, n_kv * head_size, n_kv * head_size), dim=-1)
        if config.norm_qk and config.norm_qk_type == "olmo2":
            q, k = self.norm_q(q), self.norm_k(k)
        q = q.view(B, T, n_head, head_size).transpose(1, 2)
        k = k.view(B, T, n_kv, head_size).transpose(1, 2)
        if config.norm_qk and config.norm_qk_type == "default":
            q, k = self.norm_q(q), self.norm_k(k)
        if config.lattice_rope:
            rope = apply_rope_interleave if config.rope_interleave else apply_rope
            n_elem = config.rope_n_elem
            q = torch.cat((rope(q[..., :n_elem], cos, sin), q[..., n_elem:]), dim=-1)
            k = torch.cat((rope(k[..., :n_elem], cos, sin), k[..., n_elem:]), dim=-1)
        return q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, n_kv, head_size)

    def _op_options(self, chunked: bool) -> dict[str, Any]:
        config = self.config
        options = dict(orthogonal=config.lattice_orthogonal, normalize=config.lattice_normalize)
        if chunked:
            options.update(
                chunk_size=config.lattice_chunk_size, gates=config.lattice_gates, backend=config.lattice_backend
            )
        return options

    def _forward_with_cache(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor
    ) -> torch.Tensor:
        """Prefill (many tokens) or decode (one token) through the fixed-slot state (docs/math.md §5); the positions
        were checked by :meth:`LatticeCache.begin` before the forward."""
        if not isinstance(self.kv_cache, LatticeCache):
            raise TypeError("You need to call `gpt.set_kv_cache()`")
        state = self.kv_cache.state_to_continue(q.shape[0])
        if state is not None and q.shape[1] == 1:
            o, state = lattice_step(
                q[:, 0], k[:, 0], v[:, 0], beta[:, 0], state, inplace=True, **self._op_options(chunked=False)
            )
            o = o.unsqueeze(1)
        else:
            o, state = lattice_attention(
                q,
                k,
                v,
                beta,
                self.initial_slots.weight,
                initial_state=state,
                output_final_state=True,
                **self._op_options(chunked=True),
            )
        self.kv_cache.commit(state)
        return o

    fused_decode: bool = True
    """Whether a decode step on CUDA runs the layer's per-token work in one Triton kernel (benchmarks switch it)."""

    def _can_fuse_step(self, x: torch.Tensor) -> bool:
        """Whether this forward is a decode step :func:`lattice_decode_layer_triton` can run (one token continuing
        the state, on CUDA, no gradient, a layout the kernel knows: no q/k norms, RoPE on half-split pairs)."""
        config = self.config
        cache = self.kv_cache
        return (
            self.fused_decode
            and x.shape[1] == 1
            and x.is_cuda
            and isinstance(cache, LatticeCache)
            and cache.continuing
            and not (torch.is_grad_enabled() and x.requires_grad)
            and not config.norm_qk
            and not config.rope_interleave
            and config.rope_n_elem % 2 == 0
            and triton_available()
        )

    def _fused_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One token per sequence: the qkv and beta matmuls, then everything up to the output projection in one
        kernel (RoPE, code and feature maps, value normalisation, beta, state update and read, output norm)."""
        from lattice_plugin.kernels.triton_step import lattice_decode_layer_triton

        config = self.config
        B = x.shape[0]
        o = lattice_decode_layer_triton(
            self.qkv(x).view(B, -1),
            self.beta_proj(x).view(B, -1),
            cos.reshape(cos.shape[0], -1) if config.lattice_rope else None,
            sin.reshape(sin.shape[0], -1) if config.lattice_rope else None,
            self.q_code.weight,
            self.k_code.weight,
            self.out_norm.weight,
            self.kv_cache.state[:B],
            feature_map=config.lattice_feature_map,
            eps=self.out_norm.eps,
            **self._op_options(chunked=False),
        )
        if self.out_gate is not None:
            o = o * torch.sigmoid(self.out_gate(x)).view_as(o)
        return self.proj(o.view(B, 1, -1))

    def build_kv_cache(
        self,
        batch_size: int,
        max_seq_length: int,
        rope_cache_length: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> LatticeCache:
        """A cache whose size does not depend on ``max_seq_length`` (the state is always float32)."""
        config = self.config
        return LatticeCache(batch_size, config.n_query_groups, config.head_size, config.lattice_slots, device=device)


class LatticeBlock(Block):
    """litgpt's Block with the Lattice mixer in place of attention on the selected layers."""

    mixer_class: type[LatticeMixer] = LatticeMixer

    def __init__(self, config: LatticeConfig, block_idx: int) -> None:
        super().__init__(config, block_idx)
        if config.is_lattice_layer(block_idx):
            self.attn = self.mixer_class(config, block_idx)


class LatticeGPT(GPT):
    """litgpt's GPT built from :class:`LatticeBlock` (blocks are built once, in litgpt's order)."""

    block_class: type[LatticeBlock] = LatticeBlock
    config_class: type[LatticeConfig] = LatticeConfig

    def __init__(self, config: LatticeConfig) -> None:
        nn.Module.__init__(self)
        assert config.padded_vocab_size is not None
        self.config = config
        self.lm_head = self._build_lm_head(config)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                h=nn.ModuleList(self.block_class(config, block_idx) for block_idx in range(config.n_layer)),
                ln_f=config.norm_class(config.n_embd, eps=config.norm_eps),
            )
        )
        self.mask_cache: torch.Tensor | None = None
        self.max_seq_length = self.config.block_size

    def _build_lm_head(self, config: LatticeConfig) -> nn.Module:
        return nn.Linear(config.n_embd, config.padded_vocab_size, bias=config.lm_head_bias)

    @classmethod
    def from_name(cls, name: str, **kwargs: Any) -> Self:
        return cls(cls.config_class.from_name(name, **kwargs))

    @property
    def all_lattice(self) -> bool:
        """Whether every layer is a Lattice layer (the model then has no length limit)."""
        return len(self.config.lattice_layers) == self.config.n_layer

    @property
    def max_seq_length(self) -> int:
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        """As litgpt's, except that a model of Lattice layers only may go past ``block_size`` (its state has no
        length; the RoPE tables grow to ``value``). Attention layers keep litgpt's limit."""
        if value <= self.config.block_size:
            GPT.max_seq_length.fset(self, value)
            return
        if not self.all_lattice:
            raise LatticeError(
                f"{value} tokens (prompt + new tokens) exceed the block size {self.config.block_size} that the "
                "attention layers of this model can attend to"
            )
        self._max_seq_length = value
        if not hasattr(self, "cos"):
            cos, sin = self.rope_cache()
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)
        elif value != self.cos.size(0):
            self.cos, self.sin = self.rope_cache(device=self.cos.device)

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        input_pos_maxp1: int | None = None,
        lm_head_chunk_size: int = 0,
        *,
        position: int | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """litgpt's forward. With ``input_pos`` the Lattice caches first check the positions; ``position`` (the
        first entry of ``input_pos``) spares that check its one read of ``input_pos`` back from the device."""
        if input_pos is not None and self.config.lattice_layers:
            start = first_position(input_pos) if position is None else position
            self.begin_positions(start, length=idx.shape[1], batch_size=idx.shape[0])
        return super().forward(idx, input_pos, input_pos_maxp1, lm_head_chunk_size)

    def begin_positions(self, start: int, length: int, batch_size: int) -> None:
        """Check a forward of ``length`` tokens from ``start`` against every Lattice cache (see
        :meth:`LatticeCache.begin`); a decode loop that replays a captured step calls this itself."""
        for block in self.transformer.h:
            if isinstance(block.attn, LatticeMixer):
                if not isinstance(block.attn.kv_cache, LatticeCache):
                    raise TypeError("You need to call `gpt.set_kv_cache()`")
                block.attn.kv_cache.begin(start, length, batch_size)

    def set_kv_cache(
        self,
        batch_size: int,
        max_seq_length: int | None = None,
        rope_cache_length: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """As litgpt's, except that a model without attention layers gets no ``T x T`` mask (it needs none)."""
        if len(self.config.lattice_layers) < self.config.n_layer:
            return super().set_kv_cache(batch_size, max_seq_length, rope_cache_length, device, dtype)
        max_seq_length = self.max_seq_length if max_seq_length is None else max_seq_length
        for block in self.transformer.h:
            block.attn.kv_cache = block.attn.build_kv_cache(batch_size, max_seq_length, device=device, dtype=dtype)
        # GPT.forward indexes the mask by position; a broadcast view keeps that working at no memory cost
        self.mask_cache = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device).expand(
            1, 1, max_seq_length, max_seq_length
        )
