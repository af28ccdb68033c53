"""``ModelConfig``: one decoder description for Llama 2/3, Qwen2/2.5, GPT-2 and GPT-NeoX/Pythia.

Built from (and written back to) a Hugging Face ``config.json``. The dataclass is frozen and
hashable so it can be a static argument of ``jax.jit``; change a field with
``dataclasses.replace(cfg, compute_dtype=jnp.bfloat16, remat=True)``.

How each family maps onto the fields (transformers 5.23 ``modeling_*.py`` are the reference):

==============  =========  ========  =========  ===========  ===========================
family          norm       position  MLP        biases       other
==============  =========  ========  =========  ===========  ===========================
llama           RMSNorm    RoPE      SwiGLU     optional     GQA, llama3/linear scaling
qwen2           RMSNorm    RoPE      SwiGLU     q, k, v      GQA
gpt2            LayerNorm  learned   GELU       all          Conv1D (in, out) weights
gpt_neox        LayerNorm  RoPE      GELU       all          partial rotary, parallel residual
==============  =========  ========  =========  ===========  ===========================
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "gpt2", "gpt_neox")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # erf form
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),  # tanh form (GPT-2)
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}
"""MLP non-linearities by their Hugging Face ``hidden_act`` / ``activation_function`` names."""
SUPPORTED_ACTIVATIONS = tuple(ACTIVATIONS)

AUTO_LOGITS_BYTES = 256 * 2**20
"""``logits_chunk="auto"``: the full float32 logits of a batch are formed when they take at most this many
bytes (B·T·V·4), else chunks of at most this size each. Measured on SmolLM2-135M (V 49,152; see
``benchmarks/fused_logps.py`` and the README): below it chunking saves little memory and costs time on
CPU (the backward pass recomputes each chunk's logits, and small chunks make slow matmuls)."""

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gpt_neox": "GPTNeoXForCausalLM",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder-only LM (static: hashable, usable as a jit static argument)."""

    model_type: str
    """Hugging Face ``model_type``: one of ``SUPPORTED_MODEL_TYPES``."""
    vocab_size: int
    """Rows of the token embedding (may exceed the tokenizer's vocabulary)."""
    d_model: int
    """Width of the residual stream (``hidden_size`` / ``n_embd``)."""
    n_layers: int
    """Number of decoder blocks."""
    n_heads: int
    """Query heads."""
    n_kv_heads: int
    """Key/value heads (grouped-query attention when smaller than ``n_heads``)."""
    head_dim: int
    """Width of one attention head."""
    mlp_dim: int
    """Hidden units of the MLP (``intermediate_size`` / ``n_inner``)."""
    activation: str
    """MLP non-linearity, by its Hugging Face name (``silu``, ``gelu``, ``gelu_new``, ...)."""
    gated_mlp: bool
    """SwiGLU ``down(act(gate(x)) * up(x))`` (Llama, Qwen2) instead of ``down(act(up(x)))``."""
    norm_type: str
    """``"rms"`` (RMSNorm, no bias) or ``"layer"`` (LayerNorm with bias)."""
    norm_eps: float
    """Epsilon inside the norms."""
    position_type: str
    """``"rope"`` (rotary, applied to q and k) or ``"learned"`` (GPT-2 position table)."""
    max_position_embeddings: int
    """Rows of the learned position table; for RoPE only informative (and llama3's fallback)."""
    qkv_bias: bool
    """Biases on the q, k and v projections."""
    o_bias: bool
    """Bias on the attention output projection."""
    mlp_bias: bool
    """Biases on the MLP projections."""
    tie_embeddings: bool
    """The output head reuses the token embedding (no ``lm_head`` parameter)."""
    parallel_residual: bool = False
    """GPT-NeoX ``use_parallel_residual``: ``x + attn(ln1(x)) + mlp(ln2(x))``."""
    rope_theta: float = 10000.0
    """RoPE base wavelength."""
    rotary_dim: int = 0
    """Leading dimensions of each head that are rotated (``head_dim * partial_rotary_factor``)."""
    rope_type: str = "default"
    """``default``, ``linear`` (position interpolation) or ``llama3`` (Llama 3.1 frequency scaling)."""
    rope_factor: float = 1.0
    """Scaling factor of ``linear`` and ``llama3`` RoPE."""
    rope_low_freq_factor: float = 1.0
    """``llama3``: wavelengths above ``original_max / low_freq_factor`` are divided by ``factor``."""
    rope_high_freq_factor: float = 4.0
    """``llama3``: wavelengths below ``original_max / high_freq_factor`` are kept."""
    rope_original_max_position_embeddings: int = 8192
    """``llama3``: context length of pre-training."""
    scale_attn_weights: bool = True
    """Attention logits are scaled by ``head_dim ** -0.5`` (GPT-2 can turn this off)."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initialisation of kernels and embeddings."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token from config.json, if any."""
    eos_token_ids: tuple[int, ...] = ()
    """End-of-sequence token(s) from config.json (``eos_token_id`` may be a list)."""
    pad_token_id: int | None = None
    """Padding token from config.json, if any."""
    compute_dtype: Any = jnp.float32
    """Dtype of activations and matmul inputs; norms, softmax and logits stay float32."""
    scan_layers: bool = True
    """Run the stacked layers with ``lax.scan`` (one compiled layer) rather than unrolled."""
    remat: bool = False
    """Rematerialise each layer in the backward pass (``jax.checkpoint``): less memory, more compute."""
    logits_chunk: int | str | None = "auto"
    """Log-probs and cross-entropy of the training objectives from the hidden states, this many positions at
    a time, never forming the (B, T, V) logits (``ops.chunked_logits_map``); None: the full logits; "auto":
    the full logits up to ``AUTO_LOGITS_BYTES``, chunks of at most that size beyond (``decoder.logits_chunk``)."""

    def __post_init__(self):
        object.__setattr__(self, "compute_dtype", np.dtype(jnp.dtype(self.compute_dtype)))
        checks = [
            (self.model_type in SUPPORTED_MODEL_TYPES, f"model_type {self.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"),
            (self.norm_type in ("rms", "layer"), f"norm_type must be 'rms' or 'layer', got {self.norm_type!r}"),
            (self.position_type in ("rope", "learned"), f"position_type must be 'rope' or 'learned', got {self.position_type!r}"),
            (self.activation in SUPPORTED_ACTIVATIONS, f"activation {self.activation!r} is not supported; supported: {SUPPORTED_ACTIVATIONS}"),
            (self.rope_type in SUPPORTED_ROPE_TYPES, f"rope_type {self.rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"),
            (self.n_heads % self.n_kv_heads == 0, f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"),
            (self.position_type != "rope" or (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0),
             f"rotary_dim={self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]"),
            (self.logits_chunk in ("auto", None) or (isinstance(self.logits_chunk, int) and self.logits_chunk >= 1),
             f"logits_chunk must be 'auto', None or a positive int, got {self.logits_chunk!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ModelConfig: {message}")

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], *, source: str = "config.json", **overrides) -> "ModelConfig":
        """Read a Hugging Face ``config.json`` dict (``source`` names it in errors); ``overrides`` replace fields."""
        return dataclasses.replace(_from_hf(dict(config), source), **overrides)

    def to_hf_config(self, dtype: Any = None) -> dict[str, Any]:
        """The ``config.json`` dict that transformers' ``AutoModelForCausalLM`` reads back as this model."""
        return _to_hf(self, dtype)


def _rope_parameters(c: dict, default_partial: float) -> dict:
    """RoPE settings from ``rope_parameters`` (transformers >= 5) or top-level ``rope_theta`` /
    ``rope_scaling`` / ``partial_rotary_factor`` (older checkpoints; NeoX: ``rotary_emb_base`` / ``rotary_pct``)."""
    rp = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    rp.setdefault("rope_type", rp.pop("type", "default"))
    rp.setdefault("rope_theta", c.get("rope_theta", c.get("rotary_emb_base", 10000.0)))
    rp.setdefault("partial_rotary_factor", c.get("partial_rotary_factor", c.get("rotary_pct", default_partial)))
    return rp


def _from_hf(c: dict, source: str) -> ModelConfig:
    model_type = c.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")

    def need(key: str):
        if c.get(key) is None:
            raise ValueError(f"{source}: field {key!r} is required for model_type {model_type!r}")
        return c[key]

    def unsupported(condition: bool, what: str):
        if condition:
            raise ValueError(f"{source}: {what} is not supported (model_type {model_type!r})")

    eos = c.get("eos_token_id")
    common = dict(
        model_type=model_type,
        vocab_size=need("vocab_size"),
        initializer_range=c.get("initializer_range", 0.02),
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,)),
        pad_token_id=c.get("pad_token_id"),
    )
    if model_type == "gpt2":
        unsupported(c.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx")
        unsupported(c.get("add_cross_attention", False), "add_cross_attention")
        d, h = need("n_embd"), need("n_head")
        return ModelConfig(
            **common, d_model=d, n_layers=need("n_layer"), n_heads=h, n_kv_heads=h, head_dim=d // h,
            mlp_dim=c.get("n_inner") or 4 * d, activation=c.get("activation_function", "gelu_new"), gated_mlp=False,
            norm_type="layer", norm_eps=c.get("layer_norm_epsilon", 1e-5), position_type="learned",
            max_position_embeddings=c.get("n_positions", 1024), qkv_bias=True, o_bias=True, mlp_bias=True,
            tie_embeddings=c.get("tie_word_embeddings", True), scale_attn_weights=c.get("scale_attn_weights", True),
        )

    d, h = need("hidden_size"), need("num_attention_heads")
    head_dim = d // h if model_type == "gpt_neox" else (c.get("head_dim") or d // h)
    rp = _rope_parameters(c, default_partial=0.25 if model_type == "gpt_neox" else 1.0)
    rope_type = rp["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: rope_type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    max_pos = c.get("max_position_embeddings", {"llama": 2048, "qwen2": 32768, "gpt_neox": 2048}[model_type])
    rope = dict(
        position_type="rope", max_position_embeddings=max_pos, rope_theta=float(rp["rope_theta"]),
        rotary_dim=int(head_dim * rp["partial_rotary_factor"]), rope_type=rope_type,
        rope_factor=float(rp.get("factor", 1.0)), rope_low_freq_factor=float(rp.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rp.get("high_freq_factor", 4.0)),
        rope_original_max_position_embeddings=int(rp.get("original_max_position_embeddings", max_pos)),
    )
    if model_type == "gpt_neox":
        bias = c.get("attention_bias", True)
        return ModelConfig(
            **common, **rope, d_model=d, n_layers=need("num_hidden_layers"), n_heads=h, n_kv_heads=h,
            head_dim=head_dim, mlp_dim=need("intermediate_size"), activation=c.get("hidden_act", "gelu"),
            gated_mlp=False, norm_type="layer", norm_eps=c.get("layer_norm_eps", 1e-5), qkv_bias=bias, o_bias=bias,
            mlp_bias=True, tie_embeddings=c.get("tie_word_embeddings", False),
            parallel_residual=c.get("use_parallel_residual", True),
        )
    # llama / qwen2
    unsupported(c.get("use_sliding_window", False), "sliding-window attention (use_sliding_window)")
    attention_bias = c.get("attention_bias", False)
    return ModelConfig(
        **common, **rope, d_model=d, n_layers=need("num_hidden_layers"), n_heads=h,
        n_kv_heads=c.get("num_key_value_heads") or h, head_dim=head_dim, mlp_dim=need("intermediate_size"),
        activation=c.get("hidden_act", "silu"), gated_mlp=True, norm_type="rms", norm_eps=c.get("rms_norm_eps", 1e-6),
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=False if model_type == "qwen2" else c.get("mlp_bias", False),
        tie_embeddings=c.get("tie_word_embeddings", False),
    )


def _to_hf(cfg: ModelConfig, dtype: Any) -> dict[str, Any]:
    eos = cfg.eos_token_ids
    out: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": (eos[0] if len(eos) == 1 else list(eos)) if eos else None,
        "pad_token_id": cfg.pad_token_id,
    }
    if dtype is not None:
        out["dtype"] = np.dtype(jnp.dtype(dtype)).name
    if cfg.model_type == "gpt2":
        return out | {
            "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.mlp_dim,
            "n_positions": cfg.max_position_embeddings, "activation_function": cfg.activation,
            "layer_norm_epsilon": cfg.norm_eps, "scale_attn_weights": cfg.scale_attn_weights,
        }
    rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rotary_dim != cfg.head_dim:
        rope["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_dim
    if cfg.rope_type in ("linear", "llama3"):
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope |= {
            "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position_embeddings,
        }
    out |= {
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.mlp_dim, "hidden_act": cfg.activation,
        "max_position_embeddings": cfg.max_position_embeddings, "rope_parameters": rope,
    }
    if cfg.model_type == "gpt_neox":
        if cfg.qkv_bias != cfg.o_bias or not cfg.mlp_bias:
            raise ValueError("gpt_neox export needs qkv_bias == o_bias and mlp_bias=True (one attention_bias flag)")
        return out | {
            "layer_norm_eps": cfg.norm_eps, "use_parallel_residual": cfg.parallel_residual,
            "attention_bias": cfg.qkv_bias,
        }
    out |= {"num_key_value_heads": cfg.n_kv_heads, "rms_norm_eps": cfg.norm_eps}
    if cfg.head_dim != cfg.d_model // cfg.n_heads:
        out["head_dim"] = cfg.head_dim
    if cfg.model_type == "qwen2":
        if not cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
            raise ValueError("qwen2 export needs qkv_bias=True, o_bias=False, mlp_bias=False")
        return out
    if cfg.qkv_bias != cfg.o_bias:
        raise ValueError("llama export needs qkv_bias == o_bias (one attention_bias flag)")
    return out | {"attention_bias": cfg.qkv_bias, "mlp_bias": cfg.mlp_bias}
