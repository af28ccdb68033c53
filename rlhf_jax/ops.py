"""Masked reductions and token-level log-probability helpers, all in float32.

Every reduction takes an explicit mask (1.0 = the position counts, 0.0 = padding; fractional
values act as weights). Reductions over an empty mask return 0, never NaN.

The ``chunked_*`` functions take the LM head's input ``hidden_BTD`` and matrix ``head_DV`` instead of
logits and form ``logits = hidden · head`` a chunk of positions at a time (TRL's fused LM head, Liger's
fused linear cross-entropy): the full (B, T, V) float32 logits exist neither in the forward nor in the
backward pass. Their values equal the functions of the full logits they are named after.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax import registry
from rlhf_jax.metrics import Metric

Aggregation = str
"""A name in ``registry.AGGREGATIONS``: token_mean, seq_mean_token_mean, seq_mean_token_sum, seq_mean_token_sum_norm."""


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` where ``den > 0``, else 0 (gradient-safe: no 0/0 on either branch)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def masked_sum(x, mask, axis=None) -> jax.Array:
    """``Σ x·m`` over ``axis`` (all axes when None)."""
    x, mask = _f32(x), _f32(mask)
    return jnp.sum(x * jnp.broadcast_to(mask, x.shape), axis=axis)


def masked_mean(x, mask, axis=None) -> jax.Array:
    """``Σ x·m / Σ m`` over ``axis``; 0 where the mask is empty."""
    x, mask = _f32(x), jnp.broadcast_to(_f32(mask), jnp.shape(x))
    return _safe_div(jnp.sum(x * mask, axis=axis), jnp.sum(mask, axis=axis))


def masked_var(x, mask, axis=None, *, unbiased: bool = False) -> jax.Array:
    """Masked variance ``Σ m·(x − μ)² / Σ m`` (or ``/ (Σ m − 1)`` when ``unbiased``).

    The biased form is the default, as in lm-human-preferences' ``whiten`` (``tf.nn.moments``).
    Returns 0 where the mask is empty (or holds a single element when ``unbiased``).
    """
    x, mask = _f32(x), jnp.broadcast_to(_f32(mask), jnp.shape(x))
    mean = masked_mean(x, mask, axis=axis)
    mean = mean if axis is None else jnp.expand_dims(mean, axis)
    sq = jnp.sum(jnp.square(x - mean) * mask, axis=axis)
    count = jnp.sum(mask, axis=axis)
    return _safe_div(sq, count - 1.0 if unbiased else count)


def masked_whiten(x, mask, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """Whiten over the masked entries: ``(x − μ) / sqrt(σ² + eps)`` (+ μ again if not ``shift_mean``).

    μ, σ² are the masked mean and (biased) variance over all axes. Padding positions return 0.
    Source: lm-human-preferences ``whiten`` (Ziegler et al. 2019), used for PPO advantages.
    """
    x, mask = _f32(x), jnp.broadcast_to(_f32(mask), jnp.shape(x))
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(mask > 0, out, 0.0)


def masked_aggregate(values_BT, mask_BT, aggregation: Aggregation = "token_mean", *, max_len: int | None = None) -> Metric:
    """Reduce per-token losses ``values_BT`` to a :class:`Metric` whose ``mean()`` is the loss.

    ``aggregation`` names one of ``registry.AGGREGATIONS`` (the functions below); ``max_len`` is the
    response-length budget that the constant-normalised ones divide by (None: the mask's width).
    Returned as (total, count) so microbatches merge exactly.
    """
    return registry.AGGREGATIONS[aggregation](_f32(values_BT), _f32(mask_BT), max_len=max_len)


@registry.AGGREGATIONS.register("token_mean")
def token_mean(values_BT, mask_BT, **_) -> Metric:
    """``Σ_bt v·m / Σ_bt m``: every token of the batch weighs the same (DAPO, Yu et al. 2025, eq. 8)."""
    return Metric(total=masked_sum(values_BT, mask_BT), count=jnp.sum(mask_BT))


def _rows(mask_BT) -> jax.Array:
    """Rows with at least one unmasked token (fully padded rows do not count)."""
    return jnp.sum((jnp.sum(mask_BT, axis=-1) > 0).astype(jnp.float32))


@registry.AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(values_BT, mask_BT, **_) -> Metric:
    """``mean_b (Σ_t v·m / Σ_t m)``: each sequence weighs the same (PPO for LMs; GRPO, Shao et al. 2024, eq. 3)."""
    return Metric(total=jnp.sum(_safe_div(masked_sum(values_BT, mask_BT, axis=-1), jnp.sum(mask_BT, axis=-1))),
                  count=_rows(mask_BT))


@registry.AGGREGATIONS.register("seq_mean_token_sum")
def seq_mean_token_sum(values_BT, mask_BT, **_) -> Metric:
    """``mean_b Σ_t v·m``: sum over tokens, mean over sequences."""
    return Metric(total=masked_sum(values_BT, mask_BT), count=_rows(mask_BT))


@registry.AGGREGATIONS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(values_BT, mask_BT, *, max_len: int | None = None, **_) -> Metric:
    """``mean_b Σ_t v·m / L``, L a constant (the response-length budget): Dr. GRPO (Liu et al. 2025, §3.1),
    which removes GRPO's per-sequence length normalisation and its bias toward long wrong answers."""
    L = values_BT.shape[-1] if max_len is None else max_len
    return Metric(total=masked_sum(values_BT, mask_BT) / L, count=_rows(mask_BT))


def token_logps(logits_BTV, targets_BT) -> jax.Array:
    """``log softmax(logits)[target]`` per token, in float32 (logits are upcast first).

    ``logits_BTV[:, t]`` must already be the prediction for ``targets_BT[:, t]`` (shifted by the caller).
    """
    logp_BTV = jax.nn.log_softmax(_f32(logits_BTV), axis=-1)
    return jnp.take_along_axis(logp_BTV, jnp.asarray(targets_BT)[..., None], axis=-1)[..., 0]


def entropy_from_logits(logits_BTV) -> jax.Array:
    """Per-token entropy ``H = −Σ_v p_v log p_v = logsumexp(z) − Σ_v p_v z_v``, in float32.

    Logits must be finite: mask vocabulary entries with a large negative number, not −inf.
    """
    logits_BTV = _f32(logits_BTV)
    probs_BTV = jax.nn.softmax(logits_BTV, axis=-1)
    return jax.nn.logsumexp(logits_BTV, axis=-1) - jnp.sum(probs_BTV * logits_BTV, axis=-1)


def sequence_logps(logps_BT, mask_BT, *, average: bool = False) -> jax.Array:
    """Sequence log-prob ``Σ_t m_t·logp_t`` (``average``: divided by the token count; 0 if empty)."""
    if average:
        return masked_mean(logps_BT, mask_BT, axis=-1)
    return masked_sum(logps_BT, mask_BT, axis=-1)


# --- The same quantities from the LM head's input, a chunk of positions at a time --------------


def chunked_logits_map(fn, hidden_BTD, head_DV, targets_BT, *, chunk: int):
    """``fn(logits_BCV, targets_BC)`` over the logits ``hidden · head`` of ``chunk`` positions at a time,
    its per-token outputs put back together along T.

    ``fn`` maps float32 logits (B, C, V) and their targets (B, C) to a pytree of (B, C) arrays; the result
    is the same pytree of (B, T) arrays, equal to ``fn(hidden_BTD @ head_DV, targets_BT)`` (up to the
    rounding of the matmul). The last chunk is padded (zero hidden states, target 0) and the padding cut
    off, so ``chunk`` need not divide T. Each chunk is a ``jax.checkpoint``ed step of ``lax.map``: the
    backward pass recomputes one chunk's logits at a time, so at most one (B, C, V) block of logits and
    its gradient exist at once (memory O(B·C·V) instead of O(B·T·V), for one more (B·T, D)×(D, V) matmul).

    The batch axis stays whole inside each chunk, so a batch sharded over devices stays sharded, and a
    head sharded over its V axis gives logits sharded over V (the softmax reductions become collectives).
    ``hidden_BTD`` and ``head_DV`` are multiplied in their dtype with float32 accumulation and output
    (as ``models.unembed``); gradients reach both.
    """
    if chunk < 1:
        raise ValueError(f"chunked_logits_map: chunk must be >= 1, got {chunk}")
    B, T, D = hidden_BTD.shape
    if targets_BT.shape != (B, T):
        raise ValueError(f"chunked_logits_map: targets_BT {targets_BT.shape} must be hidden_BTD's (B, T) = {(B, T)}")
    if head_DV.ndim != 2 or head_DV.shape[0] != D:
        raise ValueError(f"chunked_logits_map: head_DV {head_DV.shape} must be (D, V) with D = {D} (hidden_BTD {hidden_BTD.shape})")
    chunk = min(chunk, T)
    n = -(-T // chunk)
    pad = n * chunk - T
    h_NBCD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, D).swapaxes(0, 1)
    y_NBC = jnp.pad(jnp.asarray(targets_BT), ((0, 0), (0, pad))).reshape(B, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        h_BCD, y_BC = args
        logits_XV = jnp.matmul(h_BCD.reshape(B * chunk, D), head_DV, preferred_element_type=jnp.float32)
        return fn(logits_XV.reshape(B, chunk, -1), y_BC)

    out_NBC = jax.lax.map(one, (h_NBCD, y_NBC))
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(B, n * chunk)[:, :T], out_NBC)


def chunked_token_logps(hidden_BTD, head_DV, targets_BT, *, chunk: int) -> jax.Array:
    """``logps_BT = log softmax(hidden_BTD · head_DV)[targets_BT]`` per token, float32: :func:`token_logps`
    of the logits ``hidden · head`` (B, T, V), formed ``chunk`` positions at a time
    (:func:`chunked_logits_map`). ``hidden_BTD[:, t]`` must already be the state that predicts
    ``targets_BT[:, t]`` (shifted by the caller)."""
    return chunked_logits_map(token_logps, hidden_BTD, head_DV, targets_BT, chunk=chunk)


def chunked_token_logps_and_entropy(hidden_BTD, head_DV, targets_BT, *, chunk: int) -> tuple[jax.Array, jax.Array]:
    """``(logps_BT, entropy_BT)``: :func:`chunked_token_logps` and the per-token entropy
    ``H = logsumexp(z) − Σ_v softmax(z)_v z_v`` of :func:`entropy_from_logits`, z = ``hidden_BTD · head_DV``,
    from one pass over the chunks (each chunk's logits formed once)."""
    return chunked_logits_map(lambda z, y: (token_logps(z, y), entropy_from_logits(z)),
                              hidden_BTD, head_DV, targets_BT, chunk=chunk)


AGGREGATIONS: tuple[str, ...] = tuple(registry.AGGREGATIONS._entries)
"""The registered aggregation names."""
