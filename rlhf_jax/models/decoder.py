"""The decoder: one pure-JAX implementation for every family in ``ModelConfig``.

Everything is a function of ``(cfg, params, arrays)``; ``cfg`` is static under ``jax.jit``.

Padding is explicit: ``attention_mask_BT`` (1 = real token) hides pad keys, and positions default to
``cumsum(mask) - 1`` clipped at 0, which is what Hugging Face ``generate`` uses for LEFT-padded
prompts, so a left-padded row gives the same logits as the unpadded one. Pad query rows stay finite
(they attend uniformly to masked keys) and should be ignored by the caller.

Packing: ``forward(..., segment_ids_BT=...)`` with per-example positions keeps the examples packed
into one row from attending to each other (see :class:`rlhf_jax.types.SFTBatch`).

Dtypes: parameters keep their own dtype and are cast to ``cfg.compute_dtype`` where used; norms are
computed in float32, attention logits and softmax in float32, and output logits are float32.

Token ids outside ``[0, vocab_size)`` (and learned positions past the table) read NaN embeddings
instead of being silently clamped; ``check_tokenizer`` rejects a mismatched tokenizer up front.

KV cache: a ``KVCache`` holds ``S`` slots per row. ``prefill`` writes a (left-padded) prompt into
slots ``[index, index + T)``, ``decode_step`` writes one token per row into slot ``index``; a query
in slot ``s`` attends to the valid slots ``<= s``. Positions continue from ``next_pos_B``, so cached
decoding reproduces a full forward pass over the concatenated sequence. Size the cache for prompt +
new tokens: writing past the last slot raises when ``cache.index`` is concrete, but under ``jit``
it cannot be detected (``dynamic_update_slice`` would clamp and overwrite the last slots).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rlhf_jax.models.config import ACTIVATIONS, AUTO_LOGITS_BYTES, ModelConfig
from rlhf_jax.models.params import Params


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for ``S`` slots per row (``E`` = head_dim).

    Stacked (``init_cache``): one (L, B, K, S, E) array each for keys and values, which the layer
    scan of ``prefill`` / ``decode_step`` reads and writes per layer. Per layer (``unstack_cache``):
    a tuple of L (B, K, S, E) arrays each, for decode loops that unroll the layers over
    ``unstack_layers`` parameters (see there).
    """

    keys: Any
    """(L, B, K, S, E) rotated keys, or a tuple of L (B, K, S, E) arrays."""
    values: Any
    """(L, B, K, S, E) values, or a tuple of L (B, K, S, E) arrays."""
    mask_BS: jax.Array
    """bool: slot holds a real token (False for left padding and unwritten slots)."""
    next_pos_B: jax.Array
    """int32: position id of the next token of each row (= real tokens so far)."""
    index: jax.Array
    """int32 scalar: next slot to write (same for all rows)."""


# ----------------------------------------------------------------------------------------------
# Building blocks


def positions_from_mask(attention_mask_BT: jax.Array) -> jax.Array:
    """Position ids for left-padded rows: ``max(cumsum(mask) - 1, 0)`` (Hugging Face ``generate``)."""
    return jnp.maximum(jnp.cumsum(attention_mask_BT.astype(jnp.int32), axis=1) - 1, 0)


def _norm(cfg: ModelConfig, p: Params, x_BTD: jax.Array) -> jax.Array:
    """RMSNorm  y = x / sqrt(mean(x²) + eps) · scale  (Zhang & Sennrich 2019), or
    LayerNorm  y = (x − mean(x)) / sqrt(var(x) + eps) · scale + bias  (Ba et al. 2016); float32 inside."""
    x = x_BTD.astype(jnp.float32)
    if cfg.norm_type == "layer":
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + cfg.norm_eps)
    y = x.astype(cfg.compute_dtype) * p["scale"].astype(cfg.compute_dtype)
    return y + p["bias"].astype(cfg.compute_dtype) if "bias" in p else y


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies θ_j = theta^(−2j/d), j < d/2, d = rotary_dim (Su et al. 2021, RoFormer).

    ``linear``: θ_j / factor (Chen et al. 2023, position interpolation). ``llama3`` (Llama 3.1; as in
    transformers ``_compute_llama3_parameters``): with λ_j = 2π/θ_j and the pre-training context C,
    keep θ_j if λ_j < C/high_freq_factor, use θ_j/factor if λ_j > C/low_freq_factor, else
    (1 − s)·θ_j/factor + s·θ_j with s = (C/λ_j − low_freq_factor) / (high_freq_factor − low_freq_factor).
    """
    d = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    if cfg.rope_type == "linear":
        return inv_freq / np.float32(cfg.rope_factor)
    if cfg.rope_type == "llama3":
        context, factor = cfg.rope_original_max_position_embeddings, cfg.rope_factor
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * np.pi / inv_freq
        smooth = (context / wavelen - low) / (high - low)
        mixed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(wavelen > context / low, inv_freq / factor, np.where(wavelen < context / high, inv_freq, mixed))
    return inv_freq.astype(np.float32)


def _rope_tables(cfg: ModelConfig, positions_BT: jax.Array) -> tuple[jax.Array, jax.Array] | None:
    """cos(p·θ) and sin(p·θ), float32 (B, T, 1, rotary_dim), computed once for all layers; None without RoPE."""
    if cfg.position_type != "rope":
        return None
    angles_BTR = positions_BT[..., None].astype(jnp.float32) * rope_inv_freq(cfg)
    angles_BT1E = jnp.concatenate([angles_BTR, angles_BTR], axis=-1)[:, :, None, :]
    return jnp.cos(angles_BT1E), jnp.sin(angles_BT1E)


def _apply_rope(cfg: ModelConfig, x_BTNE: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary embedding on the first ``rotary_dim`` dims of each head, "rotate-half" layout:
    x' = x·cos(pθ) + rotate_half(x)·sin(pθ), rotate_half([x1, x2]) = [−x2, x1] (GPT-NeoX / HF Llama)."""
    cos, sin = rope
    x_rot, x_pass = x_BTNE[..., : cfg.rotary_dim].astype(jnp.float32), x_BTNE[..., cfg.rotary_dim :]
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    rotated = x_rot * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
    return jnp.concatenate([rotated.astype(x_BTNE.dtype), x_pass], axis=-1)


def _dense(cfg: ModelConfig, p: Params, x: jax.Array, n_in: int = 1) -> jax.Array:
    """``x · kernel + bias``, contracting the last ``n_in`` dims of x with the first ``n_in`` of the kernel.

    Computed as one 2-D matmul (tokens, in) @ (in, out) in the compute dtype: XLA:CPU lays out the
    backward pass of this form better than that of the equivalent N-d einsum (~10% faster step).
    """
    kernel = p["kernel"].astype(cfg.compute_dtype)
    lead = x.shape[: x.ndim - n_in]
    x_NI = x.reshape(math.prod(lead), -1)
    y = x_NI @ kernel.reshape(x_NI.shape[1], -1)
    if "lora_a" in p:  # LoRA (rlhf_jax.lora.attach): + dropout(x)·A·(α/r)B, never merged into the kernel
        y = y + _lora(cfg, p, x_NI)
    y = y.reshape(*lead, *kernel.shape[n_in:])
    return y + p["bias"].astype(cfg.compute_dtype) if "bias" in p else y


def _lora(cfg: ModelConfig, p: Params, x_NI: jax.Array) -> jax.Array:
    """The low-rank update  dropout(x)·A·B  of one projection (B already scaled by α/r): (N, out).
    Dropout (inverted, keep probability ``lora_keep``) only when ``attach`` was given a key."""
    if "lora_key" in p:
        keep = p["lora_keep"]
        kept_NI = jax.random.bernoulli(jax.random.wrap_key_data(p["lora_key"]), keep, x_NI.shape)
        x_NI = jnp.where(kept_NI, x_NI / keep.astype(x_NI.dtype), jnp.zeros((), x_NI.dtype))
    r = p["lora_a"].shape[-1]
    a_IR = p["lora_a"].astype(cfg.compute_dtype).reshape(x_NI.shape[1], r)
    b_RO = p["lora_b"].astype(cfg.compute_dtype).reshape(r, -1)
    return (x_NI @ a_IR) @ b_RO


def _attention(cfg: ModelConfig, p: Params, x_BTD, rope, allowed_BTS, kv, where):
    """Attention softmax(q·kᵀ·scale + mask)·v (Vaswani et al. 2017), kv heads shared by groups of
    query heads (GQA, Ainslie et al. 2023). Logits and softmax are float32; a fully masked (padding)
    query row gets a finite uniform average.

    Without a cache (``kv`` is None) the keys are this sequence's. With one, ``kv`` is the whole
    stacked cache ``(keys_LBKSE, values_LBKSE)`` and ``where = (layer, slot, n)``: this step's keys
    and values are written into that layer at ``slot`` and the queries attend over the first ``n``
    slots (static; all ``S`` when None). With ``layer`` None, ``kv`` is this layer's own
    ``(keys_BKSE, values_BKSE)``, written at ``slot`` and read whole. Returns the output and the
    updated ``kv``.
    """
    q_BTHE, k_BTKE, v_BTKE = (_dense(cfg, p[name], x_BTD) for name in ("q", "k", "v"))
    if rope is not None:
        q_BTHE, k_BTKE = _apply_rope(cfg, q_BTHE, rope), _apply_rope(cfg, k_BTKE, rope)
    scale = cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
    if kv is None:
        out_BTHE = jax.nn.dot_product_attention(q_BTHE, k_BTKE, v_BTKE, mask=allowed_BTS[:, None], scale=scale)
    elif where[0] is None:
        kv = tuple(_write_slots(c, new, None, where[1]) for c, new in zip(kv, (k_BTKE, v_BTKE)))
        keys_BKSE, values_BKSE = (c.astype(cfg.compute_dtype) for c in kv)
        out_BTHE = _cached_attention(q_BTHE, keys_BKSE, values_BKSE, allowed_BTS, scale)
    else:
        layer, slot, n = where
        kv = tuple(_write_slots(c, new, layer, slot) for c, new in zip(kv, (k_BTKE, v_BTKE)))
        keys_BKnE, values_BKnE = (c[layer, :, :, :n].astype(cfg.compute_dtype) for c in kv)
        out_BTHE = _cached_attention(q_BTHE, keys_BKnE, values_BKnE, allowed_BTS[..., :n], scale)
    return _dense(cfg, p["o"], out_BTHE, n_in=2), kv


def _write_slots(cache: jax.Array, new_BTKE: jax.Array, layer, slot) -> jax.Array:
    """Write T new keys (or values) into slots ``[slot, slot + T)`` of one layer: of the stacked
    (L, B, K, S, E) cache, or of a per-layer (B, K, S, E) buffer when ``layer`` is None.

    Only the new slots are written: ``dynamic_update_slice`` on the loop-carried buffer, which XLA
    updates in place, so a decode step writes T slots of memory, not the whole cache.
    """
    new_BKTE = jnp.swapaxes(new_BTKE, 1, 2).astype(cache.dtype)
    zero = jnp.zeros((), jnp.int32)
    if layer is None:
        return lax.dynamic_update_slice(cache, new_BKTE, (zero, zero, slot, zero))
    return lax.dynamic_update_slice(cache, new_BKTE[None], (jnp.asarray(layer, jnp.int32), zero, zero, slot, zero))


def _cached_attention(q_BTHE, keys_BKSE, values_BKSE, allowed_BTS, scale):
    """softmax(q·kᵀ·scale, masked)·v over the cache slots, with the H query heads grouped over the K
    kv heads as (K, G = H / K); float32 logits and softmax. Masked logits are the most negative
    float32, so a row with no allowed slot averages uniformly (as ``jax.nn.dot_product_attention``)."""
    B, T, H, E = q_BTHE.shape
    K = keys_BKSE.shape[1]
    q_BTKGE = q_BTHE.reshape(B, T, K, H // K, E)
    logits_BKGTS = jnp.einsum("btkge,bkse->bkgts", q_BTKGE, keys_BKSE, preferred_element_type=jnp.float32)
    logits_BKGTS = jnp.where(allowed_BTS[:, None, None], logits_BKGTS * scale, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(values_BKSE.dtype)
    out_BTKGE = jnp.einsum("bkgts,bkse->btkge", probs_BKGTS, values_BKSE)
    return out_BTKGE.reshape(B, T, H, E)


def _mlp(cfg: ModelConfig, p: Params, x_BTD: jax.Array) -> jax.Array:
    """SwiGLU  down(act(gate(x)) ⊙ up(x))  (Shazeer 2020; Llama, Qwen2) or  down(act(up(x)))  (GPT-2, NeoX)."""
    act = ACTIVATIONS[cfg.activation]
    h_BTF = _dense(cfg, p["up"], x_BTD)
    h_BTF = act(_dense(cfg, p["gate"], x_BTD)) * h_BTF if cfg.gated_mlp else act(h_BTF)
    return _dense(cfg, p["down"], h_BTF)


def _block(cfg: ModelConfig, p: Params, x_BTD, rope, allowed_BTS, kv, where):
    """Pre-norm block. Sequential: x ← x + attn(n₁(x)); x ← x + mlp(n₂(x)). Parallel (GPT-J,
    NeoX ``use_parallel_residual``): x ← x + attn(n₁(x)) + mlp(n₂(x))."""
    attn_BTD, kv = _attention(cfg, p["attn"], _norm(cfg, p["attn_norm"], x_BTD), rope, allowed_BTS, kv, where)
    if cfg.parallel_residual:
        return x_BTD + attn_BTD + _mlp(cfg, p["mlp"], _norm(cfg, p["mlp_norm"], x_BTD)), kv
    x_BTD = x_BTD + attn_BTD
    return x_BTD + _mlp(cfg, p["mlp"], _norm(cfg, p["mlp_norm"], x_BTD)), kv


def _layers(cfg: ModelConfig, layers: Params, x_BTD, rope, allowed_BTS, kv=None, slot=None, attend_slots=None):
    """All blocks, scanned (``cfg.scan_layers``) or unrolled, each optionally rematerialised.

    ``kv`` is None or the stacked cache ``(keys_LBKSE, values_LBKSE)``; returns (x, updated kv). The
    cache is carried through the layer loop whole and each layer writes only its new slots (see
    ``_write_slots``); attention reads the first ``attend_slots`` slots (all when None).

    ``layers`` may also be a tuple of per-layer parameter dicts (``unstack_layers``): the blocks are
    then unrolled, and ``kv`` (if any) is a list of per-layer ``(keys_BKSE, values_BKSE)``.
    """
    if isinstance(layers, tuple):
        new_kv = []
        for i, p in enumerate(layers):
            x_BTD, kv_i = _block(cfg, p, x_BTD, rope, allowed_BTS, None if kv is None else kv[i], (None, slot, None))
            new_kv.append(kv_i)
        return x_BTD, (None if kv is None else new_kv)
    if kv is None:
        def block(x, p):
            return _block(cfg, p, x, rope, allowed_BTS, None, None)[0], None
    else:
        def block(carry, xs):
            x, kv_ = carry
            p, layer = xs
            return _block(cfg, p, x, rope, allowed_BTS, kv_, (layer, slot, attend_slots)), None

    if cfg.remat:
        block = jax.checkpoint(block)
    out = x_BTD if kv is None else (x_BTD, kv)
    if cfg.scan_layers:
        out, _ = lax.scan(block, out, layers if kv is None else (layers, jnp.arange(cfg.n_layers, dtype=jnp.int32)))
    else:
        for i in range(cfg.n_layers):
            p = jax.tree.map(lambda a: a[i], layers)
            out, _ = block(out, p if kv is None else (p, i))
    return (out, None) if kv is None else out


def _embed(cfg: ModelConfig, params: Params, input_ids_BT, positions_BT) -> jax.Array:
    """Token embedding (+ learned position embedding), NaN for ids outside the tables."""
    take = functools.partial(jnp.take, axis=0, mode="fill", fill_value=jnp.nan)
    x_BTD = take(params["embed"]["embedding"], input_ids_BT)
    if cfg.position_type == "learned":
        x_BTD = x_BTD + take(params["pos_embed"]["embedding"], positions_BT)
    return x_BTD.astype(cfg.compute_dtype)


def lm_head(cfg: ModelConfig, params: Params) -> jax.Array:
    """The output head ``head_DV`` in ``cfg.compute_dtype``: ``lm_head.kernel``, or ``embeddingᵀ`` when the
    embeddings are tied. ``logits_BTV = forward_hidden(...) · lm_head(...)`` exactly: no family here has a
    head bias, logit scale or soft-cap, and LoRA adapts only the layers' projections (``lora.TARGETS``),
    never the head. Gradients flow back to the embedding when tied."""
    if cfg.tie_embeddings:
        return params["embed"]["embedding"].astype(cfg.compute_dtype).T
    return params["lm_head"]["kernel"].astype(cfg.compute_dtype)


def unembed(cfg: ModelConfig, params: Params, hidden_BTD: jax.Array) -> jax.Array:
    """Float32 logits ``hidden_BTD · lm_head(cfg, params)`` (one 2-D matmul, as in ``_dense``)."""
    B, T, D = hidden_BTD.shape
    logits_NV = jnp.matmul(hidden_BTD.reshape(B * T, D), lm_head(cfg, params), preferred_element_type=jnp.float32)
    return logits_NV.reshape(B, T, -1)


def logits_chunk(cfg: ModelConfig, batch: int, length: int) -> int | None:
    """Positions per chunk for log-probs and cross-entropy of ``batch`` rows of ``length`` positions computed
    from hidden states (``ops.chunked_*``), or None to form the full (B, T, V) logits: ``cfg.logits_chunk``,
    with "auto" resolved from the size of the float32 logits, ``batch·length·vocab·4`` bytes: None up to
    ``AUTO_LOGITS_BYTES``; beyond, the fewest chunks of at most that size, of equal length (so the padding
    of the last one is small). ``batch`` counts all rows of the traced (global) batch."""
    if cfg.logits_chunk != "auto":
        return cfg.logits_chunk
    row_bytes = batch * cfg.vocab_size * 4  # one position of every row
    if length * row_bytes <= AUTO_LOGITS_BYTES:
        return None
    n = -(-length // max(1, AUTO_LOGITS_BYTES // row_bytes))
    return -(-length // n)


def _check_inputs(name: str, input_ids_BT, attention_mask_BT, positions_BT=None) -> None:
    if input_ids_BT.ndim != 2 or attention_mask_BT.shape != input_ids_BT.shape:
        raise ValueError(f"{name}: input_ids_BT {input_ids_BT.shape} and attention_mask_BT {attention_mask_BT.shape} "
                         "must both be (batch, length)")
    if positions_BT is not None and positions_BT.shape != input_ids_BT.shape:
        raise ValueError(f"{name}: positions_BT {positions_BT.shape} must match input_ids_BT {input_ids_BT.shape}")


def _allowed(query_slots_T: jax.Array, key_mask_BS: jax.Array, segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """Causal + padding mask (B, T, S): a query in slot t sees valid key slots s <= t.

    With ``segment_ids_BT`` (full-sequence forward only, so S = T), additionally
    ``segment_ids[q] == segment_ids[k] & segment_ids[k] != 0``: packed examples do not see each other.
    """
    causal_TS = jnp.arange(key_mask_BS.shape[1])[None, :] <= query_slots_T[:, None]
    allowed_BTS = causal_TS[None] & key_mask_BS.astype(bool)[:, None, :]
    if segment_ids_BT is None:
        return allowed_BTS
    same_BTS = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]) & (segment_ids_BT[:, None, :] != 0)
    return allowed_BTS & same_BTS


# ----------------------------------------------------------------------------------------------
# Full-sequence forward


def forward_hidden(cfg: ModelConfig, params: Params, input_ids_BT: jax.Array, attention_mask_BT: jax.Array,
                   positions_BT: jax.Array | None = None, *, segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """Final-normed hidden states (B, T, D) in ``cfg.compute_dtype``, for value / reward heads.

    ``segment_ids_BT`` (int, optional) is for packed rows (:class:`rlhf_jax.types.SFTBatch`): tokens
    numbered 1, 2, ... by example within a row, 0 = padding. Attention is then restricted to
    ``causal & (segment_ids[q] == segment_ids[k]) & (segment_ids[k] != 0)`` (and the attention mask),
    so packed examples do not attend to each other. Pass positions restarting at 0 per example too
    (``SFTBatch.positions_BT``): the default ``positions_from_mask`` counts over the whole row. None
    (the default) is the plain causal + padding mask, traced exactly as without the argument.
    """
    _check_inputs("forward", input_ids_BT, attention_mask_BT, positions_BT)
    if segment_ids_BT is not None and segment_ids_BT.shape != input_ids_BT.shape:
        raise ValueError(f"forward: segment_ids_BT {segment_ids_BT.shape} must match input_ids_BT {input_ids_BT.shape}")
    if cfg.position_type == "learned" and input_ids_BT.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"forward: length {input_ids_BT.shape[1]} exceeds the {cfg.max_position_embeddings} "
                         f"learned positions of this {cfg.model_type} model")
    if positions_BT is None:
        positions_BT = positions_from_mask(attention_mask_BT)
    allowed_BTS = _allowed(jnp.arange(input_ids_BT.shape[1]), attention_mask_BT, segment_ids_BT)
    x_BTD = _embed(cfg, params, input_ids_BT, positions_BT)
    x_BTD, _ = _layers(cfg, params["layers"], x_BTD, _rope_tables(cfg, positions_BT), allowed_BTS)
    return _norm(cfg, params["final_norm"], x_BTD)


def forward(cfg: ModelConfig, params: Params, input_ids_BT: jax.Array, attention_mask_BT: jax.Array,
            positions_BT: jax.Array | None = None, *, segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """Next-token logits (B, T, V), float32. ``positions_BT`` defaults to ``positions_from_mask``;
    ``segment_ids_BT`` (packed rows: 1, 2, ... per example, 0 = padding) keeps attention within each
    example, see :func:`forward_hidden`."""
    return unembed(cfg, params, forward_hidden(cfg, params, input_ids_BT, attention_mask_BT, positions_BT,
                                                segment_ids_BT=segment_ids_BT))


# ----------------------------------------------------------------------------------------------
# KV-cached decoding


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache with ``max_len`` slots per row."""
    if cfg.position_type == "learned" and max_len > cfg.max_position_embeddings:
        raise ValueError(f"init_cache: max_len {max_len} exceeds the {cfg.max_position_embeddings} learned positions "
                         f"of this {cfg.model_type} model")
    shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
    return KVCache(
        keys=jnp.zeros(shape, dtype),
        values=jnp.zeros(shape, dtype),
        mask_BS=jnp.zeros((batch_size, max_len), bool),
        next_pos_B=jnp.zeros((batch_size,), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def _extend(cfg: ModelConfig, params: Params, input_ids_BT, attention_mask_BT, cache: KVCache,
            last_only: bool = False, attend_slots: int | None = None):
    """Run T new tokens per row through the model on top of ``cache``; logits (B, T, V) (or (B, 1, V)
    of the last column with ``last_only``) and the new cache."""
    (B, T), S = input_ids_BT.shape, cache.mask_BS.shape[1]
    if B != cache.mask_BS.shape[0]:
        raise ValueError(f"{B} rows do not match a cache of {cache.mask_BS.shape[0]} rows")
    if T > S:
        raise ValueError(f"{T} tokens do not fit a cache of {S} slots")
    if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) + T > S:
        raise ValueError(f"cache is full: slot {int(cache.index)} + {T} tokens > {S} slots")
    mask_BT = attention_mask_BT.astype(bool)
    positions_BT = cache.next_pos_B[:, None] + positions_from_mask(mask_BT)
    mask_BS = lax.dynamic_update_slice_in_dim(cache.mask_BS, mask_BT, cache.index, axis=1)
    allowed_BTS = _allowed(cache.index + jnp.arange(T), mask_BS)
    x_BTD = _embed(cfg, params, input_ids_BT, positions_BT)
    per_layer = isinstance(cache.keys, tuple)
    if per_layer != isinstance(params["layers"], tuple):
        raise ValueError("a per-layer cache (unstack_cache) needs per-layer parameters (unstack_layers), and a "
                         "stacked cache stacked parameters")
    kv = list(zip(cache.keys, cache.values)) if per_layer else (cache.keys, cache.values)
    x_BTD, kv = _layers(cfg, params["layers"], x_BTD, _rope_tables(cfg, positions_BT), allowed_BTS,
                        kv=kv, slot=cache.index, attend_slots=attend_slots)
    keys, values = (tuple(c) for c in zip(*kv)) if per_layer else kv
    if last_only:
        x_BTD = x_BTD[:, -1:]
    logits_BTV = unembed(cfg, params, _norm(cfg, params["final_norm"], x_BTD))
    new_cache = KVCache(keys=keys, values=values, mask_BS=mask_BS,
                        next_pos_B=cache.next_pos_B + jnp.sum(mask_BT, axis=1, dtype=jnp.int32), index=cache.index + T)
    return logits_BTV, new_cache


def prefill(cfg: ModelConfig, params: Params, input_ids_BT: jax.Array, attention_mask_BT: jax.Array,
            cache: KVCache, *, last_only: bool = False) -> tuple[jax.Array, KVCache]:
    """Write left-padded prompts into the cache; float32 logits (B, T, V) of every prompt position,
    or with ``last_only`` (B, 1, V) of the last column only (all that sampling needs; skips the
    unembedding of the other T - 1 columns)."""
    _check_inputs("prefill", input_ids_BT, attention_mask_BT)
    return _extend(cfg, params, input_ids_BT, attention_mask_BT, cache, last_only=last_only)


def decode_step(cfg: ModelConfig, params: Params, cache: KVCache, token_ids_B: jax.Array, *,
                attend_slots: int | None = None) -> tuple[jax.Array, KVCache]:
    """Feed one token per row; float32 next-token logits (B, V) and the cache advanced by one slot.

    ``attend_slots`` (static int) limits attention to the first slots of the cache: a decode loop
    that knows every written slot lies below it reads only that part of the cache (exact, since the
    slots beyond are masked anyway). It must be > ``cache.index``; None attends over all slots.
    """
    if token_ids_B.shape != cache.next_pos_B.shape:
        raise ValueError(f"decode_step: token_ids_B {token_ids_B.shape} must be (batch,) = {cache.next_pos_B.shape}")
    if attend_slots is not None:
        if isinstance(cache.keys, tuple):
            raise ValueError("decode_step: attend_slots is for a stacked cache; size a per-layer cache instead "
                             "(unstack_cache / grow_cache)")
        S = cache.mask_BS.shape[1]
        if not 1 <= attend_slots <= S:
            raise ValueError(f"decode_step: attend_slots {attend_slots} must be in [1, {S}]")
        if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) >= attend_slots:
            raise ValueError(f"decode_step: slot {int(cache.index)} is beyond attend_slots {attend_slots}")
    ids_B1 = token_ids_B[:, None]
    logits_B1V, cache = _extend(cfg, params, ids_B1, jnp.ones(ids_B1.shape, bool), cache, attend_slots=attend_slots)
    return logits_B1V[:, 0], cache


# ----------------------------------------------------------------------------------------------
# Per-layer layout for decode loops


def unstack_layers(params: Params) -> Params:
    """``params`` with ``params["layers"]`` split into a tuple of per-layer dicts (a copy of the
    layer weights).

    A decode loop over these unrolls the layers and reads every weight matrix in place, where the
    scan over stacked weights makes XLA:CPU copy each layer's slice out of the stack on every
    step (a third of the thunk time of a decode step with 17 MB of layer weights). The price is a
    second copy of the layer weights while the loop runs, so ``rollout.generate`` uses it on CPU
    only, and only for layer weights over ``rollout.PER_LAYER_MIN_BYTES``.
    """
    stacked = params["layers"]
    n_layers = jax.tree.leaves(stacked)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n_layers))}


def unstack_cache(cache: KVCache, slots: int | None = None) -> KVCache:
    """The stacked cache as per-layer (B, K, S', E) buffers holding its first ``slots`` slots (all
    when None): a decode step then writes and reads each layer's buffer in place, with no slicing."""
    S = cache.mask_BS.shape[1]
    slots = S if slots is None else slots
    if not isinstance(cache.index, jax.core.Tracer) and not int(cache.index) <= slots <= S:
        raise ValueError(f"unstack_cache: {slots} slots must hold the {int(cache.index)} written ones and "
                         f"be <= {S}")
    layer = lambda c, i: c[i, :, :, :slots]
    return cache.replace(keys=tuple(layer(cache.keys, i) for i in range(cache.keys.shape[0])),
                         values=tuple(layer(cache.values, i) for i in range(cache.values.shape[0])),
                         mask_BS=cache.mask_BS[:, :slots])


def grow_cache(cache: KVCache, slots: int) -> KVCache:
    """A per-layer cache padded with empty slots to ``slots`` (one copy; a decode loop that grows
    its cache in a few phases reads only the slots its steps can attend to)."""
    pad = slots - cache.mask_BS.shape[1]
    if pad < 0:
        raise ValueError(f"grow_cache: cannot shrink {cache.mask_BS.shape[1]} slots to {slots}")
    widen = lambda c: jnp.pad(c, ((0, 0), (0, 0), (0, pad), (0, 0)))
    return cache.replace(keys=tuple(map(widen, cache.keys)), values=tuple(map(widen, cache.values)),
                         mask_BS=jnp.pad(cache.mask_BS, ((0, 0), (0, pad))))
