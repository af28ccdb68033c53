"""Decoder language models (Llama 2/3, Qwen2/2.5, GPT-2, GPT-NeoX/Pythia) as pure JAX functions.

    cfg, params = models.load_pretrained("path/to/hf_dir")   # or a .gguf file (dequantised)
    tokenizer = models.load_tokenizer("path/to/hf_dir")       # same paths
    logits_BTV = models.forward(cfg, params, input_ids_BT, attention_mask_BT)
    hidden_BTD = models.forward_hidden(cfg, params, input_ids_BT, attention_mask_BT)   # logits = hidden · head:
    head_DV = models.lm_head(cfg, params)                     # for ops.chunked_* (no (B, T, V) logits)
    cache = models.init_cache(cfg, batch_size, max_len)
    logits_BTV, cache = models.prefill(cfg, params, prompt_ids_BT, prompt_mask_BT, cache)
    logits_BV, cache = models.decode_step(cfg, params, cache, token_ids_B)
    models.save_pretrained("out_dir", cfg, params)   # loads in transformers.AutoModelForCausalLM
"""
from rlhf_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from rlhf_jax.models.decoder import (
    KVCache,
    decode_step,
    forward,
    forward_hidden,
    grow_cache,
    init_cache,
    lm_head,
    logits_chunk,
    positions_from_mask,
    prefill,
    rope_inv_freq,
    unembed,
    unstack_cache,
    unstack_layers,
)
from rlhf_jax.models.heads import init_scalar_head, scalar_head, scalar_head_logical_axes
from rlhf_jax.models.hf_io import check_tokenizer, load_pretrained, load_tokenizer, save_pretrained
from rlhf_jax.models.params import init_params, param_logical_axes, param_specs

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "KVCache",
    "ModelConfig",
    "check_tokenizer",
    "decode_step",
    "forward",
    "forward_hidden",
    "grow_cache",
    "init_cache",
    "init_params",
    "lm_head",
    "logits_chunk",
    "init_scalar_head",
    "load_pretrained",
    "load_tokenizer",
    "param_logical_axes",
    "param_specs",
    "positions_from_mask",
    "prefill",
    "unembed",
    "unstack_cache",
    "unstack_layers",
    "rope_inv_freq",
    "save_pretrained",
    "scalar_head",
    "scalar_head_logical_axes",
]
