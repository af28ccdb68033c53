"""The parameter tree: one table of shapes, logical axes and initialisers.

``params`` is a nested dict; decoder blocks are stacked on a leading ``layers`` axis so that
``lax.scan`` runs one compiled block ``n_layers`` times. Leaves (``L`` layers, ``D`` d_model,
``H``/``K`` query/kv heads, ``E`` head_dim, ``F`` mlp_dim, ``V`` vocab, ``P`` positions)::

    embed/embedding            (V, D)       ("vocab", "embed")
    pos_embed/embedding        (P, D)       ("pos", "embed")                  learned positions only
    layers/attn_norm/scale     (L, D)       ("layers", "norm")                (+ bias for LayerNorm)
    layers/attn/q/kernel       (L, D, H, E) ("layers", "embed", "heads", "head_dim")   (+ bias (L, H, E))
    layers/attn/k|v/kernel     (L, D, K, E) ("layers", "embed", "kv_heads", "head_dim")
    layers/attn/o/kernel       (L, H, E, D) ("layers", "heads", "head_dim", "embed")   (+ bias (L, D))
    layers/mlp_norm/scale      (L, D)       ("layers", "norm")
    layers/mlp/gate|up/kernel  (L, D, F)    ("layers", "embed", "mlp")        gate: SwiGLU only (+ bias (L, F))
    layers/mlp/down/kernel     (L, F, D)    ("layers", "mlp", "embed")        (+ bias (L, D))
    final_norm/scale           (D,)         ("norm",)
    lm_head/kernel             (D, V)       ("embed", "vocab")                untied embeddings only

``norm`` names every d_model-sized vector (norm scales and biases, output biases): they are small
and stay replicated under the default rules of ``rlhf_jax.sharding``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rlhf_jax.models.config import ModelConfig

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str  # "normal" (std cfg.initializer_range), "ones" or "zeros"


def param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Every parameter as ``"path/to/leaf" -> ParamSpec`` (the table in the module docstring)."""
    L, D, H, K, E, F, V = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    specs = {"embed/embedding": ParamSpec((V, D), ("vocab", "embed"), "normal")}
    if cfg.position_type == "learned":
        specs["pos_embed/embedding"] = ParamSpec((cfg.max_position_embeddings, D), ("pos", "embed"), "normal")

    def norm(prefix: str, stacked: bool):
        lead, lead_axes = ((L,), ("layers",)) if stacked else ((), ())
        specs[f"{prefix}/scale"] = ParamSpec((*lead, D), (*lead_axes, "norm"), "ones")
        if cfg.norm_type == "layer":
            specs[f"{prefix}/bias"] = ParamSpec((*lead, D), (*lead_axes, "norm"), "zeros")

    def dense(name: str, in_shape, in_axes, out_shape, out_axes, bias: bool, bias_axes=None):
        specs[f"layers/{name}/kernel"] = ParamSpec((L, *in_shape, *out_shape), ("layers", *in_axes, *out_axes), "normal")
        if bias:
            specs[f"layers/{name}/bias"] = ParamSpec((L, *out_shape), ("layers", *(bias_axes or out_axes)), "zeros")

    norm("layers/attn_norm", stacked=True)
    dense("attn/q", (D,), ("embed",), (H, E), ("heads", "head_dim"), cfg.qkv_bias)
    dense("attn/k", (D,), ("embed",), (K, E), ("kv_heads", "head_dim"), cfg.qkv_bias)
    dense("attn/v", (D,), ("embed",), (K, E), ("kv_heads", "head_dim"), cfg.qkv_bias)
    dense("attn/o", (H, E), ("heads", "head_dim"), (D,), ("embed",), cfg.o_bias, bias_axes=("norm",))
    norm("layers/mlp_norm", stacked=True)
    if cfg.gated_mlp:
        dense("mlp/gate", (D,), ("embed",), (F,), ("mlp",), cfg.mlp_bias)
    dense("mlp/up", (D,), ("embed",), (F,), ("mlp",), cfg.mlp_bias)
    dense("mlp/down", (F,), ("mlp",), (D,), ("embed",), cfg.mlp_bias, bias_axes=("norm",))
    norm("final_norm", stacked=False)
    if not cfg.tie_embeddings:
        specs["lm_head/kernel"] = ParamSpec((D, V), ("embed", "vocab"), "normal")
    return specs


def init_params(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters: kernels and embeddings ~ N(0, initializer_range²), norm scales 1, biases 0
    (Hugging Face ``_init_weights`` for these families, without GPT-2's depth-scaled projections).

    All normal values come from ONE draw, split in table order: a single compiled RNG call instead
    of one per leaf (each costs ~0.7 s of XLA compile time on CPU).
    """
    specs = param_specs(cfg)
    normal = [path for path, s in specs.items() if s.init == "normal"]
    sizes = [math.prod(specs[path].shape) for path in normal]
    flat = cfg.initializer_range * jax.random.normal(key, (sum(sizes),), jnp.float32)
    chunks = dict(zip(normal, jnp.split(flat, np.cumsum(sizes)[:-1])))

    def make(path: str, spec: ParamSpec) -> jax.Array:
        if spec.init == "normal":
            return chunks[path].reshape(spec.shape).astype(dtype)
        return (jnp.ones if spec.init == "ones" else jnp.zeros)(spec.shape, dtype)

    return traverse_util.unflatten_dict({path: make(path, s) for path, s in specs.items()}, sep="/")


def param_logical_axes(cfg: ModelConfig) -> Params:
    """Same tree as ``init_params(cfg, key)``; each leaf is the tuple of logical axis names of its dims."""
    return traverse_util.unflatten_dict({path: s.axes for path, s in param_specs(cfg).items()}, sep="/")
