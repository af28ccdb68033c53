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
    keys = sft_terms_needed(z_loss=z_loss, label_smoothing=label_smoothing)
    return sft_loss_from_terms(sft_token_terms(logits_BTV, targets_BT, keys), loss_mask_BT, z_loss=z_loss,
                               label_smoothing=label_smoothing)


SFT_TERMS = ("logps", "log_z", "mean_logps", "correct")
"""The per-token terms of :func:`sft_token_terms`."""


def sft_token_terms(logits_BTV: jax.Array, targets_BT: jax.Array,
                    keys: tuple[str, ...] = SFT_TERMS) -> dict[str, jax.Array]:
    """The per-token quantities :func:`sft_loss` reads from the logits, each (B, T) float32 (those in ``keys``):

    - ``logps``: ``log p_y = z_y − log Z``;
    - ``log_z``: ``log Z = logsumexp_v z_v``;
    - ``mean_logps``: ``(1/V) Σ_v log p_v = mean_v z_v − log Z`` (label smoothing's uniform target);
    - ``correct``: 1.0 where ``argmax_v z_v == y`` (no gradient).

    Everything the loss needs from a (B, T, V) block is here, so ``ops.chunked_logits_map`` can compute
    it a chunk of positions at a time and the loss never sees the full logits.
    """
    logits_BTV = jnp.asarray(logits_BTV, jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    terms = {
        "logps": lambda: jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0] - log_z_BT,
        "log_z": lambda: log_z_BT,
        "mean_logps": lambda: jnp.mean(logits_BTV, axis=-1) - log_z_BT,
        "correct": lambda: (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32),
    }
    return {k: terms[k]() for k in keys}


def sft_terms_needed(*, z_loss: float = 0.0, label_smoothing: float = 0.0) -> tuple[str, ...]:
    """The ``keys`` of :func:`sft_token_terms` that :func:`sft_loss_from_terms` reads with these options."""
    return ("logps", "correct") + (("log_z",) if z_loss else ()) + (("mean_logps",) if label_smoothing else ())


def sft_loss_from_terms(terms: dict[str, jax.Array], loss_mask_BT: jax.Array, *, z_loss: float = 0.0,
                        label_smoothing: float = 0.0) -> tuple[jax.Array, Metrics]:
    """:func:`sft_loss` from the per-token terms of :func:`sft_token_terms` (same equation, metrics and
    options); the chunked SFT objective calls this with terms formed a chunk of positions at a time.
    Reads ``log_z`` only with ``z_loss`` and ``mean_logps`` only with ``label_smoothing``."""
    mask_BT = jnp.asarray(loss_mask_BT, jnp.float32)
    nll_BT = -terms["logps"]
    per_token_BT = nll_BT
    if label_smoothing:
        per_token_BT = (1.0 - label_smoothing) * nll_BT - label_smoothing * terms["mean_logps"]
    if z_loss:
        z_sq_BT = jnp.square(terms["log_z"])
        per_token_BT = per_token_BT + z_loss * z_sq_BT

    loss = Metric.masked(per_token_BT, mask_BT)
    metrics = {
        "sft/loss": loss,
        "sft/nll": Metric.masked(nll_BT, mask_BT),
        "sft/accuracy": Metric.masked(terms["correct"], mask_BT),
        "sft/num_tokens": Metric.scalar(jnp.sum(mask_BT)),
    }
    if z_loss:
        metrics["sft/z_loss"] = Metric.masked(z_sq_BT, mask_BT)
    return loss.mean(), metrics
