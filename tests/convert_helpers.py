"""Tiny pretrained-looking checkpoints for the conversion tests: litgpt directories in each weights layout litgpt
writes, and a hand-made Hugging Face Llama directory (no transformers, nothing downloaded)."""

import json
import shutil
from pathlib import Path

import torch
from litgpt.config import Config
from litgpt.model import GPT
from litgpt.utils import save_config

from lattice_plugin.corpus import shipped_corpus, train_tokenizer

VOCAB_SIZE = 320
# Llama-style: RMSNorm, SwiGLU MLP, grouped-query attention (4 query heads in 2 groups), full RoPE
LLAMA = dict(
    name="tiny-llama-gqa",
    block_size=64,
    vocab_size=VOCAB_SIZE,
    padding_multiple=64,
    n_layer=4,
    n_embd=64,
    n_head=4,
    n_query_groups=2,
    rotary_percentage=1.0,
    parallel_residual=False,
    bias=False,
    norm_class_name="RMSNorm",
    norm_eps=1e-5,
    mlp_class_name="LLaMAMLP",
    intermediate_size=96,
)
# NeoX-style: LayerNorm, GELU MLP, parallel residual, biases, partial RoPE, multi-head attention
NEOX = dict(
    name="tiny-neox",
    block_size=64,
    vocab_size=VOCAB_SIZE,
    padding_multiple=64,
    n_layer=3,
    n_embd=64,
    n_head=4,
    rotary_percentage=0.25,
    parallel_residual=True,
    bias=True,
    norm_class_name="LayerNorm",
    mlp_class_name="GptNeoxMLP",
)
ARCHITECTURES = {"llama": LLAMA, "neox": NEOX}
LAYOUTS = ("flat", "model", "compiled", "safetensors")


def make_tokenizer(out_dir: Path) -> Path:
    return train_tokenizer([shipped_corpus() / "train" / "fortunes-00.txt"], out_dir, vocab_size=VOCAB_SIZE)


def random_state_dict(config: Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """A litgpt model's weights with every tensor random (norm scales and biases too, so that a copy that dropped or
    re-initialised anything would show)."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                is_scale = "norm" in name or "ln_f" in name
                param.copy_(1.0 + 0.1 * torch.randn_like(param) if is_scale else 0.02 * torch.randn_like(param))
    return model.state_dict()


def write_litgpt_checkpoint(
    out_dir: Path, arch: str, tokenizer_dir: Path, layout: str = "flat", **overrides: object
) -> Path:
    """A litgpt checkpoint directory: model_config.yaml, weights in ``layout``, tokenizer files."""
    config = Config(**{**ARCHITECTURES[arch], **overrides})
    state_dict = random_state_dict(config)
    out_dir.mkdir(parents=True)
    save_config(config, out_dir)
    if layout == "safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, str(out_dir / "model.safetensors"))
    elif layout == "flat":
        torch.save(state_dict, out_dir / "lit_model.pth")
    elif layout == "model":
        torch.save({"model": state_dict}, out_dir / "lit_model.pth")
    elif layout == "compiled":  # litgpt pretrain's state: compiled model inside {"model": ...} plus training state
        state = {"model": {f"_orig_mod.{k}": v for k, v in state_dict.items()}, "iter_num": 3, "step_count": 1}
        torch.save(state, out_dir / "lit_model.pth")
    else:
        raise ValueError(layout)
    for path in tokenizer_dir.iterdir():
        shutil.copy(path, out_dir / path.name)
    return out_dir


def write_hf_llama_checkpoint(out_dir: Path, tokenizer_dir: Path, name_or_path: str) -> dict[str, torch.Tensor]:
    """A Hugging Face Llama checkpoint (config.json + model.safetensors with HF tensor names) of the LLAMA shape."""
    from safetensors.torch import save_file

    config = Config(**LLAMA)
    hs, n_head, n_kv = config.head_size, config.n_head, config.n_query_groups
    torch.manual_seed(1)
    weights = {
        "model.embed_tokens.weight": torch.randn(config.padded_vocab_size, config.n_embd),
        "model.norm.weight": 1 + 0.1 * torch.randn(config.n_embd),
        "lm_head.weight": torch.randn(config.padded_vocab_size, config.n_embd),
    }
    for i in range(config.n_layer):
        p = f"model.layers.{i}."
        weights.update(
            {
                p + "input_layernorm.weight": 1 + 0.1 * torch.randn(config.n_embd),
                p + "post_attention_layernorm.weight": 1 + 0.1 * torch.randn(config.n_embd),
                p + "self_attn.q_proj.weight": torch.randn(n_head * hs, config.n_embd) * 0.1,
                p + "self_attn.k_proj.weight": torch.randn(n_kv * hs, config.n_embd) * 0.1,
                p + "self_attn.v_proj.weight": torch.randn(n_kv * hs, config.n_embd) * 0.1,
                p + "self_attn.o_proj.weight": torch.randn(config.n_embd, n_head * hs) * 0.1,
                p + "mlp.gate_proj.weight": torch.randn(config.intermediate_size, config.n_embd) * 0.1,
                p + "mlp.up_proj.weight": torch.randn(config.intermediate_size, config.n_embd) * 0.1,
                p + "mlp.down_proj.weight": torch.randn(config.n_embd, config.intermediate_size) * 0.1,
            }
        )
    out_dir.mkdir(parents=True)
    save_file(weights, str(out_dir / "model.safetensors"))
    hf_config = {
        "_name_or_path": name_or_path,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "num_hidden_layers": config.n_layer,
        "vocab_size": config.padded_vocab_size,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "float32",
    }
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
    for path in tokenizer_dir.iterdir():
        shutil.copy(path, out_dir / path.name)
    return weights
