"""Tiny random Hugging Face checkpoints, built on the fly with transformers + torch (test oracles).

    path = make_tiny_checkpoint("llama", tmp_path / "llama")                 # GQA, untied
    path = make_tiny_checkpoint("qwen2", tmp_path / "q", tie_word_embeddings=False)
    path = make_tiny_checkpoint("gpt_neox", tmp_path / "n", use_parallel_residual=False)
    hf_model = load_hf_model(path)                                           # eval-mode torch model

Families: ``llama`` (4 heads / 2 kv heads, untied), ``llama3_scaled`` (``llama3`` rope scaling whose
three frequency bands are all populated), ``qwen2`` (q/k/v biases, tied), ``gpt2`` (tied, learned
positions), ``gpt_neox`` (parallel residual, rotary on half of each head). Any config field can be
overridden by keyword. Every parameter — norm scales and biases included, which Hugging Face
initialises to 1 and 0 — is redrawn from a seeded normal, so a bug in any of them changes the logits.
Token ids: pad 0, bos 1, eos 2, vocabulary 96. Each checkpoint takes well under 0.2 s.
"""
from __future__ import annotations

import pathlib
from typing import Any

import torch
import transformers

VOCAB = 96
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
FAMILIES = ("llama", "llama3_scaled", "qwen2", "gpt2", "gpt_neox")

_COMMON = dict(vocab_size=VOCAB, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
_LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def _config(family: str, overrides: dict[str, Any]) -> transformers.PretrainedConfig:
    if family == "llama":
        return transformers.LlamaConfig(**(_COMMON | _LLAMA | overrides))
    if family == "llama3_scaled":
        # head_dim 16: wavelengths 2π·10000^(j/8) = 6.3 (kept: < 32/4), 19.9 (smoothed), 63+ (divided by 8).
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        return transformers.LlamaConfig(**(_COMMON | _LLAMA | dict(hidden_size=64, rope_parameters=rope) | overrides))
    if family == "qwen2":
        return transformers.Qwen2Config(**(_COMMON | _LLAMA | dict(tie_word_embeddings=True) | overrides))
    if family == "gpt2":
        return transformers.GPT2Config(**(_COMMON | dict(n_embd=32, n_layer=2, n_head=4, n_positions=64) | overrides))
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(**(_COMMON | dict(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, rotary_pct=0.5, use_parallel_residual=True) | overrides))
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


def make_tiny_checkpoint(family: str, out_dir: str | pathlib.Path, *, seed: int = 0, std: float = 0.2,
                         dtype: torch.dtype = torch.float32, max_shard_size: str | int | None = None,
                         **config_overrides: Any) -> pathlib.Path:
    """Write a random ``family`` checkpoint (config.json + safetensors) to ``out_dir`` and return it.

    ``std``: every parameter is drawn from N(0, std²) (norm scales from N(1, std²)) so that logits are
    O(1) and differ between rows. ``dtype``: e.g. ``torch.bfloat16`` for a bf16 checkpoint.
    ``max_shard_size``: write a sharded checkpoint (``model.safetensors.index.json``).
    """
    out_dir = pathlib.Path(out_dir)
    config = _config(family, config_overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = p.ndim == 1 and ("norm" in name or ".ln_" in name) and name.endswith("weight")
            p.copy_(torch.randn_like(p) * std + (1.0 if is_norm_scale else 0.0))
    model = model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **kwargs)
    return out_dir


def load_hf_model(path: str | pathlib.Path) -> torch.nn.Module:
    """The checkpoint as a float32 transformers model in eval mode (eager attention)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()


def hf_logits(model: torch.nn.Module, input_ids, attention_mask) -> Any:
    """Float32 numpy logits of a left-padded batch, with the position ids ``generate`` uses:
    ``cumsum(mask) - 1`` where the mask is 1, and 1 at padding."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    mask = torch.as_tensor(attention_mask, dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions)
    return out.logits.float().numpy()
