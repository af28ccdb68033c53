"""The online RL objective: policy loss + value loss (with a critic) + KL loss (KL in the loss), on a
scored rollout (:class:`RLBatch`).

Parameter layouts (``params``; the frozen trees are ``{"reference": LM, "reward": RM}``, the reward
model absent when only reward functions score):

- ``{"policy": LM, "value_head": head}``: a value head on the policy's backbone (PPO's default);
- ``{"policy": LM, "critic": {"backbone": LM, "head": head}}``: a separate critic (from the reward model);
- ``{"policy": LM}``: critic-free (the GRPO family, RLOO, REINFORCE++): no value is ever computed.

:func:`rl_loss` is the arrays-in math (a notebook can ablate it with no model); :func:`rl_objective`
runs the model and hands it the arrays.
"""
from __future__ import annotations

from typing import Callable

import flax.struct
import jax

from rlhf_jax import kl, losses, models, ops, registry
from rlhf_jax.metrics import Metric, Metrics
from rlhf_jax.objectives import logps_and_entropy_from_hidden
from rlhf_jax.rl.algorithms import Algorithm
from rlhf_jax.train_state import Params


@flax.struct.dataclass
class RLBatch:
    """A scored rollout, ready for the update epochs. Per-token arrays are (B, T), aligned as in
    :mod:`rlhf_jax.types` (column t scores token t + 1)."""

    input_ids_BT: jax.Array
    """int32: left-padded prompt then response (``Rollout.sequences_BT``)."""
    attention_mask_BT: jax.Array
    """int32: 1 on real prompt and response tokens."""
    response_mask_BT: jax.Array
    """float32, shifted: 1 at column t iff token t + 1 is a response token that trains (``Rollout.scored_mask_BT``,
    less DAPO's overlong-filtered rows and dynamic sampling's dropped groups)."""
    old_logps_BT: jax.Array | None
    """Log-probs of the response tokens under the policy that sampled them; None when the rollout trains one
    update only and scoring skipped the policy's pass (:func:`rlhf_jax.rl.steps.score_rollout`'s
    ``single_update``): the update's own log-probs, detached, are the old ones."""
    ref_logps_BT: jax.Array
    """Log-probs under the frozen reference (KL in the loss, KL metrics)."""
    advantages_BT: jax.Array
    """Advantages, 0 off the response."""
    scores_B: jax.Array
    """Sequence scores (reward model and functions, missing-EOS penalty applied): logs, dynamic sampling."""
    old_values_BT: jax.Array | None = None
    """Values when the rollout was scored (value clipping); None without a critic."""
    returns_BT: jax.Array | None = None
    """Value targets; None without a critic."""


PPOBatch = RLBatch
"""The name this batch had when PPO was the only method."""


def rollout_kl_metrics(logps_BT: jax.Array, ref_logps_BT: jax.Array, mask_BT: jax.Array, *, algo: Algorithm
                       ) -> Metrics:
    """``rollout/kl``: the mean over sequences of ``Σ_t kl_t`` (``algo.kl_estimator``) of the sampling policy to the
    reference on the response tokens; ``rollout/kl_k1``: the same with k1 = log π − log π_ref."""
    kl_B = ops.masked_sum(kl.kl_penalty(logps_BT, ref_logps_BT, estimator=algo.kl_estimator), mask_BT, axis=-1)
    k1_B = ops.masked_sum(kl.kl_k1(logps_BT, ref_logps_BT), mask_BT, axis=-1)
    return {"rollout/kl": Metric.mean_of(kl_B), "rollout/kl_k1": Metric.mean_of(k1_B)}


def policy_and_values(params: Params, input_ids_BT: jax.Array, attention_mask_BT: jax.Array, *,
                      model_cfg: models.ModelConfig, critic_cfg: models.ModelConfig | None = None
                      ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(logps_BT, entropy_BT, values_BT)``: one backbone pass, plus the value head on the same hidden
    states or a separate critic's pass; ``values_BT`` is None when ``params`` hold neither."""
    hidden_BTD = models.forward_hidden(model_cfg, params["policy"], input_ids_BT, attention_mask_BT)
    logps_BT, entropy_BT = logps_and_entropy_from_hidden(model_cfg, params["policy"], hidden_BTD, input_ids_BT)
    values_BT = None
    if "value_head" in params:
        values_BT = models.scalar_head(params["value_head"], hidden_BTD)
    elif "critic" in params:
        critic_hidden_BTD = models.forward_hidden(critic_cfg or model_cfg, params["critic"]["backbone"],
                                                  input_ids_BT, attention_mask_BT)
        values_BT = models.scalar_head(params["critic"]["head"], critic_hidden_BTD)
    return logps_BT, entropy_BT, values_BT


def rl_loss(logps_BT: jax.Array, entropy_BT: jax.Array, values_BT: jax.Array | None, batch: RLBatch, *,
            algo: Algorithm, max_len: int | None = None, policy_loss: Callable | None = None
            ) -> tuple[jax.Array, Metrics]:
    """``policy_loss + vf_coef · value_loss + β · kl_loss`` on one (mini)batch.

    - policy loss: ``registry.POLICY_LOSSES[algo.policy_loss]`` (clipped ratio per token, or GSPO's
      sequence ratio), aggregated by ``algo.aggregation`` (``max_len``: Dr. GRPO's constant); or
      ``policy_loss``, a callable with the registered losses' signature that replaces it (a loss of
      one's own, options bound with ``functools.partial``; see ``notebooks/custom_loss.py``). It is
      called as ``policy_loss(logps_BT, old_logps_BT, advantages_BT, mask_BT, *, clip_eps, clip_eps_high,
      entropy_BT, entropy_coef, aggregation, max_len[, dual_clip])``, so options it binds must have
      other names (a call's keyword overrides a ``partial``'s);
    - value loss (only when ``values_BT`` is given): clipped squared error to the returns, token mean;
    - KL loss (only with ``algo.kl_placement == "loss"``): ``algo.kl_estimator`` per token, the same
      aggregation (GRPO, Shao et al. 2024, eq. 3).
    """
    mask_BT = batch.response_mask_BT
    options = dict(clip_eps=algo.clip_eps, clip_eps_high=algo.clip_eps_high, entropy_BT=entropy_BT,
                   entropy_coef=algo.entropy_coef, aggregation=algo.aggregation, max_len=max_len)
    if algo.dual_clip is not None:
        options["dual_clip"] = algo.dual_clip
    if policy_loss is None:
        policy_loss = registry.POLICY_LOSSES[algo.policy_loss]
    old_logps_BT, rollout_metrics = batch.old_logps_BT, {}
    if old_logps_BT is None:  # one update on this rollout: the sampling policy is the one differentiated here
        old_logps_BT = jax.lax.stop_gradient(logps_BT)
        rollout_metrics = rollout_kl_metrics(old_logps_BT, batch.ref_logps_BT, mask_BT, algo=algo)
    loss, metrics = policy_loss(logps_BT, old_logps_BT, batch.advantages_BT, mask_BT, **options)
    metrics = {**metrics, **rollout_metrics}
    if values_BT is not None:
        vf_loss, vf_metrics = losses.value_loss(values_BT, batch.old_values_BT, batch.returns_BT, mask_BT,
                                                clip_range=algo.value_clip)
        loss, metrics = loss + algo.vf_coef * vf_loss, {**metrics, **vf_metrics}
    if algo.kl_in_loss:
        kl_term, kl_metrics = kl.kl_loss(logps_BT, batch.ref_logps_BT, mask_BT, estimator=algo.kl_estimator,
                                         aggregation=algo.aggregation, max_len=max_len)
        loss, metrics = loss + algo.kl_coef * kl_term, {**metrics, **kl_metrics}
    return loss, metrics


def rl_objective(params: Params, frozen: Params, batch: RLBatch, *, model_cfg: models.ModelConfig,
                 algo: Algorithm, critic_cfg: models.ModelConfig | None = None, max_len: int | None = None,
                 policy_loss: Callable | None = None) -> tuple[jax.Array, Metrics]:
    """:func:`rl_loss` on the model's log-probs, entropies and (with a critic) values of ``batch``
    (``policy_loss``: a callable replacing the algorithm's registered policy loss)."""
    del frozen  # the reference's log-probs were computed when the rollout was scored
    logps_BT, entropy_BT, values_BT = policy_and_values(params, batch.input_ids_BT, batch.attention_mask_BT,
                                                        model_cfg=model_cfg, critic_cfg=critic_cfg)
    return rl_loss(logps_BT, entropy_BT, values_BT, batch, algo=algo, max_len=max_len, policy_loss=policy_loss)
