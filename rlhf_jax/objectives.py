"""Objectives: ``objective(params, frozen, batch) -> (loss, metrics)``, each a thin wrapper that runs the
model and hands arrays to a pure loss from :mod:`rlhf_jax.losses` (swap the loss with ``functools.partial``,
e.g. ``loss_fn=partial(losses.dpo_loss, variant="ipo")``), and the model wrappers they share (per-token
log-probs, sequence log-probs, reward-model scores). :mod:`rlhf_jax.steps` differentiates them.

Alignment follows :mod:`rlhf_jax.types`: column ``t`` of a per-token array scores token ``t + 1``
(``logps_BT[:, t] = log p(ids[t+1] | ids[:t+1])``, ``values_BT[:, t]`` = value of the prefix
``ids[:t+1]``), so masks apply without shifting and the last column is always masked out.

Parameter layouts: SFT, DPO: ``params`` = the LM; DPO's reference is ``frozen`` (``{}`` for SimPO,
which has none). Reward model: ``params = {"backbone": LM, "head": scalar head}``. The RL layouts are in
:mod:`rlhf_jax.rl.objective`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from rlhf_jax import losses, models, ops
from rlhf_jax.metrics import Metric, Metrics
from rlhf_jax.train_state import Params
from rlhf_jax.types import BinaryBatch, PairBatch, RankBatch, SFTBatch

Objective = Callable[[Params, Params, Any], tuple[jax.Array, Metrics]]


# --- Model wrappers: arrays in, per-token / per-sequence quantities out -------------------------


def next_token_logps(logits_BTV: jax.Array, input_ids_BT: jax.Array) -> jax.Array:
    """``logps_BT[:, t] = log softmax(logits_BTV[:, t])[ids[:, t+1]]``, float32; last column 0."""
    logps_BT = ops.token_logps(logits_BTV[:, :-1], input_ids_BT[:, 1:])
    return jnp.pad(logps_BT, ((0, 0), (0, 1)))


FROM_CONFIG = "config"
"""``chunk=`` default of the functions below: ``models.logits_chunk`` (the config's ``logits_chunk``)."""


def _chunk(cfg: models.ModelConfig, chunk: int | str | None, hidden_BTD: jax.Array) -> int | None:
    return models.logits_chunk(cfg, *hidden_BTD.shape[:2]) if chunk == FROM_CONFIG else chunk


def next_token_logps_from_hidden(cfg: models.ModelConfig, params: Params, hidden_BTD: jax.Array,
                                 input_ids_BT: jax.Array, chunk: int | str | None = FROM_CONFIG) -> jax.Array:
    """:func:`next_token_logps` of the logits ``hidden_BTD · models.lm_head(cfg, params)``: with ``chunk``
    positions per chunk, never forming the (B, T, V) logits (``ops.chunked_token_logps``); None: from the
    full logits; by default ``models.logits_chunk(cfg, B, T)``. Last column 0."""
    chunk = _chunk(cfg, chunk, hidden_BTD)
    if chunk is None:
        return next_token_logps(models.unembed(cfg, params, hidden_BTD), input_ids_BT)
    targets_BT = jnp.pad(input_ids_BT[:, 1:], ((0, 0), (0, 1)))
    logps_BT = ops.chunked_token_logps(hidden_BTD, models.lm_head(cfg, params), targets_BT, chunk=chunk)
    return logps_BT.at[:, -1].set(0.0)  # the last column predicts nothing


def logps_and_entropy_from_hidden(cfg: models.ModelConfig, params: Params, hidden_BTD: jax.Array,
                                  input_ids_BT: jax.Array, chunk: int | str | None = FROM_CONFIG
                                  ) -> tuple[jax.Array, jax.Array]:
    """``(logps_BT, entropy_BT)`` of :func:`next_token_logps` and ``ops.entropy_from_logits`` of the logits
    ``hidden_BTD · models.lm_head(cfg, params)``: with ``chunk`` positions per chunk
    (``ops.chunked_token_logps_and_entropy``: no (B, T, V) logits, forward or backward), None: from the
    full logits; by default ``models.logits_chunk(cfg, B, T)``. Same values and gradients either way."""
    chunk = _chunk(cfg, chunk, hidden_BTD)
    if chunk is None:
        logits_BTV = models.unembed(cfg, params, hidden_BTD)
        return next_token_logps(logits_BTV, input_ids_BT), ops.entropy_from_logits(logits_BTV)
    targets_BT = jnp.pad(input_ids_BT[:, 1:], ((0, 0), (0, 1)))
    logps_BT, entropy_BT = ops.chunked_token_logps_and_entropy(hidden_BTD, models.lm_head(cfg, params), targets_BT,
                                                               chunk=chunk)
    return logps_BT.at[:, -1].set(0.0), entropy_BT


def token_logps(cfg: models.ModelConfig, params: Params, input_ids_BT: jax.Array, attention_mask_BT: jax.Array,
                positions_BT: jax.Array | None = None) -> jax.Array:
    """Per-token log-probs of ``input_ids_BT`` under the LM (see :func:`next_token_logps`), the logits formed a
    chunk of positions at a time when ``models.logits_chunk`` says so (:func:`next_token_logps_from_hidden`)."""
    hidden_BTD = models.forward_hidden(cfg, params, input_ids_BT, attention_mask_BT, positions_BT)
    return next_token_logps_from_hidden(cfg, params, hidden_BTD, input_ids_BT)


def sequence_logps(cfg: models.ModelConfig, params: Params, input_ids_BT: jax.Array, attention_mask_BT: jax.Array,
                   response_mask_BT: jax.Array) -> jax.Array:
    """``log π(response | prompt)`` per row: the sum of token log-probs over the (shifted) response mask."""
    return ops.sequence_logps(token_logps(cfg, params, input_ids_BT, attention_mask_BT), response_mask_BT)


def _both_sides(batch: PairBatch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Chosen rows then rejected rows, for one forward pass over 2B sequences."""
    cat = functools.partial(jnp.concatenate, axis=0)
    return (cat([batch.chosen_ids_BT, batch.rejected_ids_BT]),
            cat([batch.chosen_attention_mask_BT, batch.rejected_attention_mask_BT]),
            cat([batch.chosen_response_mask_BT, batch.rejected_response_mask_BT]))


def pair_logps(cfg: models.ModelConfig, params: Params, batch: PairBatch) -> tuple[jax.Array, jax.Array]:
    """``(log π(chosen), log π(rejected))``, each (B,), from one forward pass over both sides."""
    logps_2B = sequence_logps(cfg, params, *_both_sides(batch))
    return jnp.split(logps_2B, 2)


def last_token_values(values_BT: jax.Array, attention_mask_BT: jax.Array) -> jax.Array:
    """``values_BT`` at each row's last real token (the last column where the attention mask is 1)."""
    positions_T = jnp.arange(values_BT.shape[1])
    last_B = jnp.max(jnp.where(attention_mask_BT > 0, positions_T, 0), axis=1)
    return jnp.take_along_axis(values_BT, last_B[:, None], axis=1)[:, 0]


def reward_scores(cfg: models.ModelConfig, rm_params: Params, input_ids_BT: jax.Array,
                  attention_mask_BT: jax.Array) -> jax.Array:
    """Reward-model scores (B,): the scalar head on the hidden state of the last real token."""
    hidden_BTD = models.forward_hidden(cfg, rm_params["backbone"], input_ids_BT, attention_mask_BT)
    return last_token_values(models.scalar_head(rm_params["head"], hidden_BTD), attention_mask_BT)


def _has_tokens(mask_BT: jax.Array) -> jax.Array:
    """1.0 for rows with at least one scored token (0 for rows that only pad the batch)."""
    return (jnp.sum(mask_BT, axis=-1) > 0).astype(jnp.float32)


# --- Objectives ---------------------------------------------------------------------------------


def _sft_loss_options(loss_fn: Callable) -> dict[str, Any] | None:
    """The keyword options of ``loss_fn`` when it is ``losses.sft_loss`` or a ``functools.partial`` of it
    binding keywords only (``z_loss``, ``label_smoothing``); None for any other loss."""
    if loss_fn is losses.sft_loss:
        return {}
    if isinstance(loss_fn, functools.partial) and loss_fn.func is losses.sft_loss and not loss_fn.args:
        return dict(loss_fn.keywords)
    return None


def sft_objective(params: Params, frozen: Params, batch: SFTBatch, *, model_cfg: models.ModelConfig,
                  loss_fn: Callable = losses.sft_loss) -> tuple[jax.Array, Metrics]:
    """Next-token cross-entropy on the batch's loss mask.

    Packed rows (several ``segment_ids``) restart ``positions_BT`` per example and attend only
    within their own segment, so each example scores as it would alone in a row.

    With ``models.logits_chunk`` set (the config's ``logits_chunk`` for this batch) and ``loss_fn`` =
    ``losses.sft_loss`` (or a ``functools.partial`` of it setting its options), the loss's per-token terms
    (``losses.sft_token_terms``) are formed that many positions at a time from the hidden states
    (``ops.chunked_logits_map``) and the (B, T, V) logits never exist; any other ``loss_fn`` receives the
    full logits ``(logits_BTV[:, :-1], targets_BT, loss_mask_BT)``.
    """
    hidden_BTD = models.forward_hidden(model_cfg, params, batch.input_ids_BT, batch.attention_mask_BT,
                                       batch.positions_BT, segment_ids_BT=batch.segment_ids_BT)
    chunk = models.logits_chunk(model_cfg, batch.input_ids_BT.shape[0], batch.input_ids_BT.shape[1] - 1)
    options = _sft_loss_options(loss_fn)
    if chunk is None or options is None:
        logits_BTV = models.unembed(model_cfg, params, hidden_BTD)
        return loss_fn(logits_BTV[:, :-1], batch.input_ids_BT[:, 1:], batch.loss_mask_BT[:, :-1])
    terms_fn = functools.partial(losses.sft_token_terms, keys=losses.sft_terms_needed(**options))
    terms = ops.chunked_logits_map(terms_fn, hidden_BTD[:, :-1], models.lm_head(model_cfg, params),
                                   batch.input_ids_BT[:, 1:], chunk=chunk)
    return losses.sft_loss_from_terms(terms, batch.loss_mask_BT[:, :-1], **options)


def reward_objective(params: Params, frozen: Params, batch: PairBatch, *, model_cfg: models.ModelConfig,
                     loss_fn: Callable = losses.pairwise_reward_loss) -> tuple[jax.Array, Metrics]:
    """Bradley–Terry on last-token scores of chosen vs rejected (rows without tokens weigh 0)."""
    ids_BT, attention_BT, response_BT = _both_sides(batch)
    chosen_B, rejected_B = jnp.split(reward_scores(model_cfg, params, ids_BT, attention_BT), 2)
    weights_B = _has_tokens(batch.chosen_response_mask_BT) * _has_tokens(batch.rejected_response_mask_BT)
    return loss_fn(chosen_B, rejected_B, margin_B=batch.margin_B, weights_B=weights_B)


def dpo_objective(params: Params, frozen: Params, batch: PairBatch, *, model_cfg: models.ModelConfig,
                  loss_fn: Callable = losses.dpo_loss) -> tuple[jax.Array, Metrics]:
    """DPO-family loss; reference log-probs from ``frozen`` (no gradient), or None when ``frozen`` is empty."""
    chosen_B, rejected_B = pair_logps(model_cfg, params, batch)
    ref_chosen_B = ref_rejected_B = None
    if frozen:
        ref_chosen_B, ref_rejected_B = jax.lax.stop_gradient(pair_logps(model_cfg, frozen, batch))
    weights_B = _has_tokens(batch.chosen_response_mask_BT) * _has_tokens(batch.rejected_response_mask_BT)
    return loss_fn(chosen_B, rejected_B, ref_chosen_B, ref_rejected_B,
                   chosen_lengths_B=jnp.sum(batch.chosen_response_mask_BT, -1),
                   rejected_lengths_B=jnp.sum(batch.rejected_response_mask_BT, -1), weights_B=weights_B)


# --- Unpaired (thumbs up / down) and K-way ranked feedback --------------------------------------


def mismatched_pairs(input_ids_BT: jax.Array, attention_mask_BT: jax.Array, response_mask_BT: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """KTO's mismatched pairs ``(x_b, y_{b−1})``: row ``b``'s prompt followed by the completion of row
    ``b − 1`` (rolled within the batch: row 0 takes the last row's), as TRL's ``_get_kl_dataset`` does.

    Rows are right-padded (:func:`rlhf_jax.data.collate_binary`); each row's prompt is its first
    ``n − c`` tokens (``n`` attended tokens, ``c`` response-mask entries). A completion that does not
    fit the batch's length ``T`` after its new prompt is cut at ``T``. A row whose prompt row or
    completion row only pads the batch comes out empty (zero masks). Returns ``(input_ids_BT,
    attention_mask_BT, response_mask_BT)`` in the batch's layout.
    """
    T = input_ids_BT.shape[1]
    c_B = jnp.sum(response_mask_BT > 0, axis=-1)
    p_B = jnp.sum(attention_mask_BT > 0, axis=-1) - c_B
    prev = functools.partial(jnp.roll, shift=1, axis=0)  # row b takes row b − 1's completion
    c_kl_B = jnp.where(p_B > 0, jnp.minimum(prev(c_B), T - p_B), 0)
    t_BT = jnp.arange(T)[None, :]
    in_prompt_BT = t_BT < p_B[:, None]
    in_completion_BT = ~in_prompt_BT & (t_BT < (p_B + c_kl_B)[:, None])
    from_BT = jnp.clip(t_BT - p_B[:, None] + prev(p_B)[:, None], 0, T - 1)
    completion_BT = jnp.take_along_axis(prev(input_ids_BT), from_BT, axis=1)
    ids_BT = jnp.where(in_prompt_BT, input_ids_BT, jnp.where(in_completion_BT, completion_BT, 0))
    attention_BT = (in_prompt_BT | in_completion_BT).astype(attention_mask_BT.dtype)
    # position t predicts token t + 1: the mask runs from the prompt's last token to the one before the end
    response_BT = (t_BT >= p_B[:, None] - 1) & (t_BT < (p_B + c_kl_B - 1)[:, None])
    return ids_BT, attention_BT, response_BT.astype(response_mask_BT.dtype)


def _weighted_rows(loss_fn: Callable, weights_B: jax.Array, *rows_B: jax.Array) -> tuple[jax.Array, Metrics]:
    """``loss_fn(*rows)`` (a mean over rows) taken one row at a time (``vmap``, batches of one), then
    averaged with ``weights_B``, in the loss and in every metric: rows that only pad a batch weigh 0
    for a loss that has no weights argument."""
    loss_B, metrics = jax.vmap(lambda *row: loss_fn(*(x[None] for x in row)))(*rows_B)
    loss = jnp.sum(weights_B * loss_B) / jnp.maximum(jnp.sum(weights_B), 1.0)
    return loss, {k: Metric(total=jnp.sum(weights_B * m.total), count=jnp.sum(weights_B * m.count))
                  for k, m in metrics.items()}


def kto_objective(params: Params, frozen: Params, batch: BinaryBatch, *, model_cfg: models.ModelConfig,
                  loss_fn: Callable = losses.kto_loss) -> tuple[jax.Array, Metrics]:
    """KTO on thumbs up / down (:func:`rlhf_jax.losses.kto_loss`): ``log π(y|x)`` of each row, the
    reference's from ``frozen`` (no gradient), and the KL reference point ``z_0`` from the mismatched
    pairs of :func:`mismatched_pairs` under both models (no gradient, as in TRL).

    Rows with an empty response mask (batch padding) weigh 0 in the loss and the metrics, and so do
    the mismatched pairs they make: ``z_0`` is the mean over the real ones.
    """
    rows = (batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT)
    kl_rows = mismatched_pairs(*rows)
    policy_B = sequence_logps(model_cfg, params, *rows)
    kl_policy_B = jax.lax.stop_gradient(sequence_logps(model_cfg, params, *kl_rows))
    both = [jnp.concatenate([a, b], axis=0) for a, b in zip(rows, kl_rows)]
    ref_B, kl_ref_B = jnp.split(jax.lax.stop_gradient(sequence_logps(model_cfg, frozen, *both)), 2)
    kl_weights_B = _has_tokens(kl_rows[2])
    # The loss averages the mismatched log-ratios over the whole batch: give empty pairs the mean of
    # the real ones, so that average is theirs.
    kl_mean = jnp.sum(kl_weights_B * (kl_policy_B - kl_ref_B)) / jnp.maximum(jnp.sum(kl_weights_B), 1.0)
    kl_policy_B = jnp.where(kl_weights_B > 0, kl_policy_B, kl_ref_B + kl_mean)
    return _weighted_rows(lambda p_B, r_B, y_B: loss_fn(p_B, r_B, kl_policy_B, kl_ref_B, y_B),
                          _has_tokens(batch.response_mask_BT), policy_B, ref_B, batch.label_B)


def ranking_reward_objective(params: Params, frozen: Params, batch: RankBatch, *, model_cfg: models.ModelConfig,
                             loss_fn: Callable = losses.ranking_reward_loss) -> tuple[jax.Array, Metrics]:
    """InstructGPT's K-way ranking loss on last-token scores: the ``N`` responses of a row (sorted best
    first, :class:`~rlhf_jax.types.RankBatch`) in one batch element, every implied pair averaged per
    prompt (:func:`rlhf_jax.losses.ranking_reward_loss`). Empty slots and padding rows make no pair."""
    B, N, T = batch.input_ids_BNT.shape
    scores_BN = reward_scores(model_cfg, params, batch.input_ids_BNT.reshape(B * N, T),
                              batch.attention_mask_BNT.reshape(B * N, T)).reshape(B, N)
    ranks_BN = jnp.where(batch.valid_BN > 0, jnp.arange(N)[None, :], -1)
    return loss_fn(scores_BN, ranks_BN)
