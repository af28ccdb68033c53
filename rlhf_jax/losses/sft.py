"""Supervised fine-tuning loss: next-token cross-entropy over a loss mask."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.metrics import Metric, Metrics


def sft_loss(
    logits_BTV: jax.Array,
    targets_BT: jax.Array,
    loss_mask_BT: jax.Array,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """Token cross-entropy averaged over the masked tokens of the batch.

    Per token, with ``log p = log_softmax(z)``, ``Z = Σ_v exp z_v`` and ``ε = label_smoothing``:

        ℓ_t = (1 − ε)·(−log p_y) + ε·(−(1/V) Σ_v log p_v)  +  z_loss · (log Z)²
        L   = Σ_t m_t ℓ_t / Σ_t m_t

    - label smoothing towards the uniform distribution (Szegedy et al. 2016, §7), the same target
      as ``optax.smooth_labels``;
    - the z-loss keeps the softmax normaliser near 1 (PaLM, Chowdhery et al. 2022, §5; 1e-4 there).

    ``logits_BTV[:, t]`` predicts ``targets_BT[:, t]`` (the caller shifts). Completion-only training
    is a mask from the data pipeline. Computed in float32; an all-zero mask gives loss 0.

    Metrics: ``sft/loss`` (the objective), ``sft/nll`` (plain cross-entropy, for perplexity),
    ``sft/accuracy`` (argmax == target), ``sft/num_tokens`` (masked tokens per call), and with the
    z-loss on, ``sft/z_loss`` (mean (log Z)², the term before its coefficient). A term that is off
    reports nothing, so no figure of a disabled term reaches the logs.
    """
    logits_BTV = jnp.asarray(logits_BTV, jnp.float32)
    mask_BT = jnp.asarray(loss_mask_BT, jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    logp_BTV = logits_BTV - log_z_BT[..., None]
    nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    per_token_BT = nll_BT
    if label_smoothing:
        per_token_BT = (1.0 - label_smoothing) * nll_BT - label_smoothing * jnp.mean(logp_BTV, axis=-1)
    z_sq_BT = jnp.square(log_z_BT)
    if z_loss:
        per_token_BT = per_token_BT + z_loss * z_sq_BT

    loss = Metric.masked(per_token_BT, mask_BT)
    correct_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
    metrics = {
        "sft/loss": loss,
        "sft/nll": Metric.masked(nll_BT, mask_BT),
        "sft/accuracy": Metric.masked(correct_BT, mask_BT),
        "sft/num_tokens": Metric.scalar(jnp.sum(mask_BT)),
    }
    if z_loss:
        metrics["sft/z_loss"] = Metric.masked(z_sq_BT, mask_BT)
    return loss.mean(), metrics
