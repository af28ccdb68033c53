"""The jitted halves of one RL iteration: score a rollout (log-probs, reference log-probs, values,
reward-model scores joined with the reward functions' scores, advantages) and update the policy
(epochs × minibatches of :func:`rlhf_jax.rl.objective.rl_objective` inside ``lax.scan``)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax import advantages, ensemble, kl, losses, models, ops, registry
from rlhf_jax.metrics import Metric, Metrics, sum_over_leading_axis
from rlhf_jax.objectives import token_logps
from rlhf_jax.rl.algorithms import Algorithm
from rlhf_jax.rl.objective import RLBatch, policy_and_values, rl_objective, rollout_kl_metrics
from rlhf_jax.rollout import Rollout
from rlhf_jax.sharding import Rules, batch_sharding, replicated, with_logical_constraint
from rlhf_jax.steps import Step, _apply_objective
from rlhf_jax.train_state import Params, TrainState


def combined_scores(rm_scores_B: jax.Array | None, function_scores_B: jax.Array, *, rm_weight: float) -> jax.Array:
    """The sequence score: ``w_rm · s_rm + Σ_i w_i f_i`` (``function_scores_B`` is the reward functions'
    weighted sum, :func:`rlhf_jax.rewards.score`); without a reward model, the functions' sum alone."""
    scores_B = jnp.asarray(function_scores_B, jnp.float32)
    if rm_scores_B is None:
        return scores_B
    return rm_weight * jnp.asarray(rm_scores_B, jnp.float32) + scores_B


def score_rollout(params: Params, frozen: Params, rollout: Rollout, kl_coef: jax.Array, function_scores_B: jax.Array,
                  *, model_cfg: models.ModelConfig, reward_cfg: models.ModelConfig | None, algo: Algorithm,
                  critic_cfg: models.ModelConfig | None = None, rm_weight: float = 1.0,
                  missing_eos_penalty: float | None = None, single_update: bool = False) -> tuple[RLBatch, Metrics]:
    """Old log-probs, reference log-probs, values (with a critic), scores and advantages of a rollout; no gradients.

    Scores are :func:`combined_scores` (``frozen["reward"]`` when the run has a reward model, or a
    :class:`rlhf_jax.ensemble.RewardEnsemble` whose rule combines its members' scores); responses
    without EOS get ``missing_eos_penalty`` instead when it is set (lm-human-preferences: −1). The
    advantages come from ``registry.ADVANTAGES[algo.advantage]`` with β = ``kl_coef`` when the KL sits
    in the reward, 0 otherwise. With ``algo.overlong_filter`` the truncated responses leave the loss mask.

    ``single_update``: the rollout trains exactly one update (1 epoch × 1 minibatch), so the policy that sampled
    it is the one the update differentiates. When the scores need no policy log-probs either
    (``not algo.scoring_reads_policy_logps``: no critic, no KL in the reward) and no rows leave the loss mask (no
    overlong filter, no dynamic sampling), the policy's pass is skipped here:
    ``old_logps_BT`` is None and the update uses its own log-probs, detached (ratio exactly 1; TRL's GRPOTrainer
    does the same with ``num_iterations=1``), and logs ``rollout/kl`` and ``rollout/kl_k1`` from them.
    """
    ids_BT, attention_BT = rollout.sequences_BT, rollout.attention_mask_BT
    mask_BT = rollout.scored_mask_BT
    # the update's KL metrics read its loss mask: equal to the scored mask unless rows left it (DAPO's filters)
    skip_policy = (single_update and not algo.scoring_reads_policy_logps and not algo.overlong_filter
                   and not algo.dynamic_sampling)
    if skip_policy:  # the update's own log-probs serve as the old ones; its KL metrics replace these
        logps_BT, values_BT = None, None
    else:
        logps_BT, _, values_BT = policy_and_values(params, ids_BT, attention_BT, model_cfg=model_cfg,
                                                   critic_cfg=critic_cfg)
    if algo.needs_critic and values_BT is None:
        raise ValueError(f"advantage {algo.advantage!r} needs a critic: params need a 'value_head' or a 'critic'")
    ref_logps_BT = token_logps(model_cfg, frozen["reference"], ids_BT, attention_BT)
    rm_B, rm_KB = None, None  # rm_KB: an ensemble's members' scores, before its rule combined them into rm_B
    if "reward" in frozen:
        rm_B, rm_KB = ensemble.score(reward_cfg, frozen["reward"], ids_BT, attention_BT)
    scores_B = combined_scores(rm_B, function_scores_B, rm_weight=rm_weight)
    if missing_eos_penalty is not None:
        scores_B = jnp.where(rollout.has_eos_B, scores_B, jnp.float32(missing_eos_penalty))
    kl_BT = (jnp.zeros_like(ref_logps_BT) if skip_policy else  # only read through β = 0 below
             kl.kl_penalty(logps_BT, ref_logps_BT, estimator=algo.kl_estimator))
    beta = kl_coef if algo.kl_in_reward else jnp.zeros_like(kl_coef)
    inputs = advantages.AdvantageInputs(scores_B=scores_B, kl_BT=kl_BT, mask_BT=mask_BT, values_BT=values_BT,
                                        num_samples=algo.samples_per_prompt)
    advantages_BT, returns_BT = registry.ADVANTAGES[algo.advantage](inputs, kl_coef=beta, gamma=algo.gamma,
                                                                    lam=algo.lam)
    train_mask_BT = mask_BT
    if algo.overlong_filter:
        train_mask_BT = losses.ppo.overlong_filter(train_mask_BT, rollout.has_eos_B)
    batch = jax.lax.stop_gradient(RLBatch(
        input_ids_BT=ids_BT, attention_mask_BT=attention_BT, response_mask_BT=train_mask_BT, old_logps_BT=logps_BT,
        ref_logps_BT=ref_logps_BT, advantages_BT=advantages_BT * train_mask_BT, scores_B=scores_B,
        old_values_BT=values_BT if algo.needs_critic else None, returns_BT=returns_BT if algo.needs_critic else None))
    metrics = {} if skip_policy else rollout_kl_metrics(logps_BT, ref_logps_BT, mask_BT, algo=algo)
    kl_B = ops.masked_sum(kl_BT, mask_BT, axis=-1)
    metrics = {
        **metrics,
        "rollout/score": Metric.mean_of(scores_B),
        "rollout/non_score_reward": Metric.mean_of(-beta * kl_B),
        "rollout/response_length": Metric.mean_of(jnp.sum(mask_BT, axis=-1)),
        "rollout/has_eos": Metric.mean_of(rollout.has_eos_B),
        "rollout/trained_tokens": Metric.mean_of(jnp.sum(train_mask_BT, axis=-1)),
        "rollout/advantage_abs": Metric.masked(jnp.abs(advantages_BT), train_mask_BT),
    }
    if rm_B is not None:
        metrics["rollout/rm_score"] = Metric.mean_of(rm_B)
    if rm_KB is not None:
        metrics.update(ensemble.spread_metrics(rm_KB))
    if algo.needs_critic:  # how well the values fit this rollout's returns, once, before any update on it
        metrics["vf/explained_variance_rollout"] = Metric.scalar(
            losses.explained_variance(values_BT, returns_BT, mask_BT))
    if algo.grouped:
        keep_G = advantages.groups_with_signal(scores_B.reshape(-1, algo.samples_per_prompt))
        metrics["rollout/groups_with_signal"] = Metric.mean_of(keep_G.astype(jnp.float32))
    return batch, metrics


def make_score_step(model_cfg: models.ModelConfig, reward_cfg: models.ModelConfig | None, state_shardings: TrainState,
                    mesh: Mesh, rules: Rules, *, view=None, **score_options) -> Step:
    """``(batch, metrics) = score(state, rollout, kl_coef, function_scores_B)``, jitted;
    ``score_options`` go to :func:`score_rollout` (``algo``, ``critic_cfg``, ``rm_weight``, ``missing_eos_penalty``,
    ``single_update``)."""
    def score(state: TrainState, rollout: Rollout, kl_coef: jax.Array, function_scores_B: jax.Array
              ) -> tuple[RLBatch, Metrics]:
        params, frozen = (state.params, state.frozen) if view is None else view(state.params, state.frozen)
        return score_rollout(params, frozen, rollout, kl_coef, function_scores_B, model_cfg=model_cfg,
                             reward_cfg=reward_cfg, **score_options)
    rows = batch_sharding(mesh, rules)
    return jax.jit(score, in_shardings=(state_shardings, rows, replicated(mesh), rows),
                   out_shardings=(rows, replicated(mesh)))


def make_update_step(model_cfg: models.ModelConfig, optimizer: optax.GradientTransformation,
                     state_shardings: TrainState, mesh: Mesh, rules: Rules, *, epochs: int, num_minibatches: int,
                     view=None, objective=None, **objective_options) -> Step:
    """``step(state, batch, key) -> (state, metrics)``: ``epochs`` passes over the batch, each in
    ``num_minibatches`` shuffled minibatches, all inside ``lax.scan`` (one optimizer call per
    minibatch). Metrics are summed over every minibatch of every epoch. ``objective_options`` go to
    :func:`rlhf_jax.rl.objective.rl_objective` (``algo``, ``critic_cfg``, ``max_len``, and ``policy_loss``: a
    callable that replaces the algorithm's registered policy loss, e.g. ``functools.partial(my_loss, ...)``);
    another ``objective(params, frozen, batch)`` (online DPO's) replaces the whole objective.
    """
    if objective is None:
        objective = functools.partial(rl_objective, model_cfg=model_cfg, **objective_options)

    def step(state: TrainState, batch, key: jax.Array) -> tuple[TrainState, Metrics]:
        rows = jax.tree.leaves(batch)[0].shape[0]
        if rows % num_minibatches:
            raise ValueError(f"a rollout batch of {rows} rows does not split into {num_minibatches} minibatches")

        # the frozen trees (reference, reward model) are read by every minibatch but never change: they stay
        # out of the scans' carry, which XLA would otherwise copy into the loops' buffers
        frozen = state.frozen

        def minibatch(carry: TrainState, idx_M: jax.Array) -> tuple[TrainState, Metrics]:
            mb = jax.tree.map(lambda x: with_logical_constraint(x[idx_M], ("batch",) + (None,) * (x.ndim - 1),
                                                                mesh, rules), batch)
            new, metrics = _apply_objective(objective, optimizer, carry.replace(frozen=frozen), mb, view)
            return new.replace(frozen={}), metrics

        def epoch(carry: TrainState, key: jax.Array) -> tuple[TrainState, Metrics]:
            idx_NM = jax.random.permutation(key, rows).reshape(num_minibatches, rows // num_minibatches)
            carry, metrics = jax.lax.scan(minibatch, carry, idx_NM)
            return carry, sum_over_leading_axis(metrics)

        carry, metrics = jax.lax.scan(epoch, state.replace(frozen={}), jax.random.split(key, epochs))
        return carry.replace(frozen=frozen), sum_over_leading_axis(metrics)

    return jax.jit(step, in_shardings=(state_shardings, batch_sharding(mesh, rules), replicated(mesh)),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)
