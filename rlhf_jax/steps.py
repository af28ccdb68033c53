"""Train steps for SFT, reward models, DPO and PPO: each jitted once, explicit shardings, state donated.

Every task is an *objective* ``objective(params, frozen, batch) -> (loss, metrics)``: a thin
wrapper that runs the model and hands arrays to the pure loss from :mod:`rlhf_jax.losses`
(swap the loss with ``functools.partial``, e.g. ``loss_fn=partial(losses.dpo_loss, variant="ipo")``).
:func:`make_train_step` differentiates an objective and applies the optimizer;
:func:`make_eval_step` only reports its metrics.

Alignment follows :mod:`rlhf_jax.types`: column ``t`` of a per-token array scores token ``t + 1``
(``logps_BT[:, t] = log p(ids[t+1] | ids[:t+1])``, ``values_BT[:, t]`` = value of the prefix
``ids[:t+1]``), so masks apply without shifting and the last column is always masked out.

Parameter layouts:

- SFT, DPO: ``params`` = the LM; DPO's reference is ``frozen`` (``{}`` for SimPO, which has none).
- Reward model: ``params = {"backbone": LM, "head": scalar head}``.
- PPO: ``params = {"policy": LM, "value_head": head}`` (value head on the policy's backbone) or
  ``{"policy": LM, "critic": {"backbone": LM, "head": head}}`` (separate critic);
  ``frozen = {"reference": LM, "reward": {"backbone": LM, "head": head}}`` for scoring rollouts.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax import advantages, kl, lora, losses, models, ops
from rlhf_jax.metrics import Metric, Metrics, sum_over_leading_axis
from rlhf_jax.rollout import Rollout
from rlhf_jax.sharding import Rules, batch_sharding, replicated, with_logical_constraint
from rlhf_jax.train_state import Params, TrainState
from rlhf_jax.types import PairBatch, SFTBatch

Objective = Callable[[Params, Params, Any], tuple[jax.Array, Metrics]]
Step = Callable[..., Any]


# --- Model wrappers: arrays in, per-token / per-sequence quantities out -------------------------


def next_token_logps(logits_BTV: jax.Array, input_ids_BT: jax.Array) -> jax.Array:
    """``logps_BT[:, t] = log softmax(logits_BTV[:, t])[ids[:, t+1]]``, float32; last column 0."""
    logps_BT = ops.token_logps(logits_BTV[:, :-1], input_ids_BT[:, 1:])
    return jnp.pad(logps_BT, ((0, 0), (0, 1)))


LOGITS_CHUNK = 32
"""Positions per chunk of :func:`logps_and_entropy_from_hidden`: the (B, chunk, V) logits of one chunk are
all that exists at a time (for SmolLM2's 49,152-token vocabulary, 16 rows: 100 MB instead of 350 MB
for 112 positions), in the forward pass and, rematerialised, in the backward pass."""


def logps_and_entropy_from_hidden(cfg: models.ModelConfig, params: Params, hidden_BTD: jax.Array,
                                  input_ids_BT: jax.Array, chunk: int = LOGITS_CHUNK) -> tuple[jax.Array, jax.Array]:
    """``(logps_BT, entropy_BT)`` of :func:`next_token_logps` and ``ops.entropy_from_logits`` from the final
    hidden states, unembedding ``chunk`` positions at a time (``lax.map`` of a ``jax.checkpoint``ed
    chunk), so the full (B, T, V) logits are never formed. Same values as the unchunked computation."""
    B, T, D = hidden_BTD.shape
    n = -(-T // chunk)
    pad = n * chunk - T
    targets_BT = jnp.pad(input_ids_BT[:, 1:], ((0, 0), (0, 1 + pad)))
    h_NBCD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, D).swapaxes(0, 1)
    y_NBC = targets_BT.reshape(B, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        h_BCD, y_BC = args
        logits_BCV = models.unembed(cfg, params, h_BCD)
        return ops.token_logps(logits_BCV, y_BC), ops.entropy_from_logits(logits_BCV)

    logps_NBC, entropy_NBC = jax.lax.map(one, (h_NBCD, y_NBC))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(B, n * chunk)[:, :T]  # noqa: E731
    logps_BT = unchunk(logps_NBC).at[:, -1].set(0.0)  # the last column predicts nothing
    return logps_BT, unchunk(entropy_NBC)


def token_logps(cfg: models.ModelConfig, params: Params, input_ids_BT: jax.Array, attention_mask_BT: jax.Array,
                positions_BT: jax.Array | None = None) -> jax.Array:
    """Per-token log-probs of ``input_ids_BT`` under the LM (see :func:`next_token_logps`), the logits
    formed a chunk of positions at a time (:func:`logps_and_entropy_from_hidden`)."""
    hidden_BTD = models.forward_hidden(cfg, params, input_ids_BT, attention_mask_BT, positions_BT)
    return logps_and_entropy_from_hidden(cfg, params, hidden_BTD, input_ids_BT)[0]


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


def sft_objective(params: Params, frozen: Params, batch: SFTBatch, *, model_cfg: models.ModelConfig,
                  loss_fn: Callable = losses.sft_loss) -> tuple[jax.Array, Metrics]:
    """Next-token cross-entropy on the batch's loss mask.

    Packed rows (several ``segment_ids``) restart ``positions_BT`` per example and attend only
    within their own segment, so each example scores as it would alone in a row.
    """
    logits_BTV = models.forward(model_cfg, params, batch.input_ids_BT, batch.attention_mask_BT, batch.positions_BT,
                                segment_ids_BT=batch.segment_ids_BT)
    return loss_fn(logits_BTV[:, :-1], batch.input_ids_BT[:, 1:], batch.loss_mask_BT[:, :-1])


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


@flax.struct.dataclass
class PPOBatch:
    """A scored rollout, ready for PPO epochs. Per-token arrays are (B, T), aligned as in :mod:`rlhf_jax.types`."""

    input_ids_BT: jax.Array
    """int32: left-padded prompt then response (``Rollout.sequences_BT``)."""
    attention_mask_BT: jax.Array
    """int32: 1 on real prompt and response tokens."""
    response_mask_BT: jax.Array
    """float32, shifted: 1 at column t iff token t+1 is a response token."""
    old_logps_BT: jax.Array
    """Log-probs of the response tokens under the policy that sampled them."""
    ref_logps_BT: jax.Array
    """Log-probs under the frozen reference (for KL metrics and the optional KL loss)."""
    old_values_BT: jax.Array
    """Values predicted when the rollout was scored (for value clipping)."""
    advantages_BT: jax.Array
    """GAE advantages (whitened or not), 0 off the response."""
    returns_BT: jax.Array
    """GAE returns, the value targets."""


def _policy_and_values(params: Params, input_ids_BT: jax.Array, attention_mask_BT: jax.Array, *,
                       model_cfg: models.ModelConfig, critic_cfg: models.ModelConfig | None
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(logps_BT, entropy_BT, values_BT)``: one backbone pass with a value head, or policy + critic."""
    hidden_BTD = models.forward_hidden(model_cfg, params["policy"], input_ids_BT, attention_mask_BT)
    logps_BT, entropy_BT = logps_and_entropy_from_hidden(model_cfg, params["policy"], hidden_BTD, input_ids_BT)
    if "value_head" in params:
        values_BT = models.scalar_head(params["value_head"], hidden_BTD)
    elif "critic" in params:
        critic_hidden_BTD = models.forward_hidden(critic_cfg or model_cfg, params["critic"]["backbone"],
                                                  input_ids_BT, attention_mask_BT)
        values_BT = models.scalar_head(params["critic"]["head"], critic_hidden_BTD)
    else:
        raise ValueError(f"PPO params need a 'value_head' or a 'critic' next to 'policy', got keys {sorted(params)}")
    return logps_BT, entropy_BT, values_BT


def ppo_objective(params: Params, frozen: Params, batch: PPOBatch, *, model_cfg: models.ModelConfig,
                  critic_cfg: models.ModelConfig | None = None,
                  policy_loss_fn: Callable = losses.ppo_policy_loss, value_loss_fn: Callable = losses.value_loss,
                  vf_coef: float = 0.1, kl_coef: float = 0.0, kl_loss_fn: Callable = kl.kl_loss
                  ) -> tuple[jax.Array, Metrics]:
    """``policy_loss + vf_coef · value_loss + kl_coef · kl_loss`` on one (mini)batch.

    The KL term (GRPO-style, KL to the reference inside the loss) is off by default: classic RLHF
    PPO puts the KL penalty in the rewards instead (:func:`score_rollout`).
    """
    mask_BT = batch.response_mask_BT
    logps_BT, entropy_BT, values_BT = _policy_and_values(params, batch.input_ids_BT, batch.attention_mask_BT,
                                                         model_cfg=model_cfg, critic_cfg=critic_cfg)
    pg_loss, metrics = policy_loss_fn(logps_BT, batch.old_logps_BT, batch.advantages_BT, mask_BT, entropy_BT=entropy_BT)
    vf_loss, vf_metrics = value_loss_fn(values_BT, batch.old_values_BT, batch.returns_BT, mask_BT)
    kl_loss, kl_metrics = kl_loss_fn(logps_BT, batch.ref_logps_BT, mask_BT)
    loss = pg_loss + vf_coef * vf_loss + kl_coef * kl_loss
    return loss, {**metrics, **vf_metrics, **kl_metrics}


GROUP_ADVANTAGES: dict[str, Callable[[jax.Array], jax.Array]] = {"rloo": advantages.rloo, "grpo": advantages.grpo}
ADVANTAGE_ESTIMATORS = ("gae", *GROUP_ADVANTAGES)


def score_rollout(params: Params, frozen: Params, rollout: Rollout, kl_coef: jax.Array, *,
                  model_cfg: models.ModelConfig, reward_cfg: models.ModelConfig,
                  critic_cfg: models.ModelConfig | None = None, advantage_estimator: str = "gae",
                  num_samples: int = 1, kl_estimator: kl.Estimator = "k1", gamma: float = 1.0, lam: float = 0.95,
                  whiten_advantages: bool = True, missing_eos_penalty: float | None = None
                  ) -> tuple[PPOBatch, Metrics]:
    """Old log-probs, reference log-probs, values and reward-model scores of a rollout, then advantages.

    Reads ``frozen["reference"]`` and ``frozen["reward"]``; no gradients. Responses without EOS get
    ``missing_eos_penalty`` instead of their score when it is set (lm-human-preferences: −1).

    - ``"gae"``: per-token rewards ``score at the last token − kl_coef · KL_t`` and GAE on the
      values (Ziegler et al. 2019; Huang et al. 2024), advantages whitened over the batch.
    - ``"rloo"`` / ``"grpo"``: critic-free. Sequence reward ``R = score − kl_coef · Σ_t KL_t``, a
      baseline from the other samples of the same prompt (``num_samples`` adjacent rows, as
      ``rollout.generate`` lays them out; Ahmadian et al. 2024 / Shao et al. 2024), the same
      advantage on every response token. Values and returns are 0: train with ``vf_coef=0``.
    """
    if advantage_estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage_estimator must be one of {ADVANTAGE_ESTIMATORS}, got {advantage_estimator!r}")
    ids_BT, attention_BT = rollout.sequences_BT, rollout.attention_mask_BT
    mask_BT = jnp.pad(rollout.response_mask_BT[:, 1:], ((0, 0), (0, 1)))
    logps_BT, _, values_BT = _policy_and_values(params, ids_BT, attention_BT, model_cfg=model_cfg, critic_cfg=critic_cfg)
    ref_logps_BT = token_logps(model_cfg, frozen["reference"], ids_BT, attention_BT)
    scores_B = reward_scores(reward_cfg, frozen["reward"], ids_BT, attention_BT)
    if missing_eos_penalty is not None:
        scores_B = jnp.where(rollout.has_eos_B, scores_B, jnp.float32(missing_eos_penalty))
    kl_BT = kl.kl_penalty(logps_BT, ref_logps_BT, estimator=kl_estimator)
    kl_B = ops.masked_sum(kl_BT, mask_BT, axis=-1)
    if advantage_estimator == "gae":
        rewards_BT = advantages.per_token_rewards(scores_B, kl_BT, mask_BT, kl_coef=kl_coef)
        advantages_BT, returns_BT = advantages.gae(rewards_BT, values_BT, mask_BT, gamma=gamma, lam=lam)
        if whiten_advantages:
            advantages_BT = advantages.whiten_advantages(advantages_BT, mask_BT)
    else:
        rewards_B = scores_B - kl_coef * kl_B
        advantages_B = GROUP_ADVANTAGES[advantage_estimator](rewards_B.reshape(-1, num_samples)).reshape(-1)
        advantages_BT = advantages_B[:, None] * mask_BT
        values_BT = returns_BT = jnp.zeros_like(logps_BT)
    batch = jax.lax.stop_gradient(PPOBatch(
        input_ids_BT=ids_BT, attention_mask_BT=attention_BT, response_mask_BT=mask_BT, old_logps_BT=logps_BT,
        ref_logps_BT=ref_logps_BT, old_values_BT=values_BT, advantages_BT=advantages_BT, returns_BT=returns_BT))
    metrics = {
        "rollout/score": Metric.mean_of(scores_B),
        "rollout/kl": Metric.mean_of(kl_B),
        "rollout/non_score_reward": Metric.mean_of(-kl_coef * kl_B),
        "rollout/response_length": Metric.mean_of(jnp.sum(mask_BT, axis=-1)),
        "rollout/has_eos": Metric.mean_of(rollout.has_eos_B),
    }
    return batch, metrics


# --- Step builders ------------------------------------------------------------------------------


def with_view(objective: Objective, view: "lora.View | None", step: jax.Array | None = None) -> Objective:
    """``objective`` on a state whose layout ``view`` maps to the objective's (a LoRA state:
    :func:`rlhf_jax.lora.view`); ``step`` seeds training-time randomness (LoRA dropout). None: as is."""
    if view is None:
        return objective
    return lambda params, frozen, batch: objective(*view(params, frozen, step), batch)


def _apply_objective(objective: Objective, optimizer: optax.GradientTransformation, state: TrainState,
                     batch: Any, view: "lora.View | None" = None) -> tuple[TrainState, Metrics]:
    objective = with_view(objective, view, state.step)
    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params, state.frozen, batch)
    metrics = {**metrics, "optim/loss": Metric.scalar(loss), "optim/grad_norm": Metric.scalar(optax.global_norm(grads))}
    return state.apply_gradients(grads, optimizer), metrics


def make_train_step(objective: Objective, optimizer: optax.GradientTransformation, state_shardings: TrainState,
                    mesh: Mesh, rules: Rules, *, view: "lora.View | None" = None) -> Step:
    """``step(state, batch) -> (state, metrics)``: one gradient step, jitted once, ``state`` donated.

    ``state_shardings`` is the state's NamedSharding tree (``train_state.shardings_of(state)``);
    batches are split along their leading axis (:func:`rlhf_jax.sharding.batch_sharding`). ``view``
    (LoRA: :func:`rlhf_jax.lora.view`) maps the state's params and frozen trees to the objective's;
    gradients are taken with respect to the state's params (the adapters).
    """
    return jax.jit(functools.partial(_apply_objective, objective, optimizer, view=view),
                   in_shardings=(state_shardings, batch_sharding(mesh, rules)),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)


def make_eval_step(objective: Objective, state_shardings: TrainState, mesh: Mesh, rules: Rules, *,
                   view: "lora.View | None" = None) -> Step:
    """``metrics = eval_step(state, batch)``: the objective's metrics, no update (no dropout)."""
    def evaluate(state: TrainState, batch: Any) -> Metrics:
        loss, metrics = with_view(objective, view)(state.params, state.frozen, batch)
        return {**metrics, "optim/loss": Metric.scalar(loss)}
    return jax.jit(evaluate, in_shardings=(state_shardings, batch_sharding(mesh, rules)),
                   out_shardings=replicated(mesh))


def make_sft_step(model_cfg: models.ModelConfig, optimizer: optax.GradientTransformation, state_shardings: TrainState,
                  mesh: Mesh, rules: Rules, *, loss_fn: Callable = losses.sft_loss, view=None) -> Step:
    """SFT train step on :class:`~rlhf_jax.types.SFTBatch` (see :func:`sft_objective`)."""
    return make_train_step(functools.partial(sft_objective, model_cfg=model_cfg, loss_fn=loss_fn),
                           optimizer, state_shardings, mesh, rules, view=view)


def make_reward_step(model_cfg: models.ModelConfig, optimizer: optax.GradientTransformation,
                     state_shardings: TrainState, mesh: Mesh, rules: Rules, *,
                     loss_fn: Callable = losses.pairwise_reward_loss, view=None) -> Step:
    """Reward-model train step on :class:`~rlhf_jax.types.PairBatch` (see :func:`reward_objective`)."""
    return make_train_step(functools.partial(reward_objective, model_cfg=model_cfg, loss_fn=loss_fn),
                           optimizer, state_shardings, mesh, rules, view=view)


def make_dpo_step(model_cfg: models.ModelConfig, optimizer: optax.GradientTransformation, state_shardings: TrainState,
                  mesh: Mesh, rules: Rules, *, loss_fn: Callable = losses.dpo_loss, view=None) -> Step:
    """DPO-family train step on :class:`~rlhf_jax.types.PairBatch` (see :func:`dpo_objective`)."""
    return make_train_step(functools.partial(dpo_objective, model_cfg=model_cfg, loss_fn=loss_fn),
                           optimizer, state_shardings, mesh, rules, view=view)


def make_ppo_score_step(model_cfg: models.ModelConfig, reward_cfg: models.ModelConfig, state_shardings: TrainState,
                        mesh: Mesh, rules: Rules, *, view=None, **score_options) -> Step:
    """``(ppo_batch, metrics) = score(state, rollout, kl_coef)``, jitted; ``score_options`` go to
    :func:`score_rollout` (``advantage_estimator``, ``num_samples``, ``gamma``, ``lam``, ...)."""
    def score(state: TrainState, rollout: Rollout, kl_coef: jax.Array) -> tuple[PPOBatch, Metrics]:
        params, frozen = (state.params, state.frozen) if view is None else view(state.params, state.frozen)
        return score_rollout(params, frozen, rollout, kl_coef, model_cfg=model_cfg,
                             reward_cfg=reward_cfg, **score_options)
    rows = batch_sharding(mesh, rules)
    return jax.jit(score, in_shardings=(state_shardings, rows, replicated(mesh)),
                   out_shardings=(rows, replicated(mesh)))


def make_ppo_step(model_cfg: models.ModelConfig, optimizer: optax.GradientTransformation, state_shardings: TrainState,
                  mesh: Mesh, rules: Rules, *, epochs: int, num_minibatches: int, view=None,
                  **objective_options) -> Step:
    """``step(state, ppo_batch, key) -> (state, metrics)``: ``epochs`` passes over the batch, each
    in ``num_minibatches`` shuffled minibatches, all inside ``lax.scan`` (one optimizer call per
    minibatch). Metrics are summed over every minibatch of every epoch. ``objective_options`` go
    to :func:`ppo_objective` (``critic_cfg``, loss callables, ``vf_coef``, ``kl_coef``).
    """
    objective = functools.partial(ppo_objective, model_cfg=model_cfg, **objective_options)

    def step(state: TrainState, batch: PPOBatch, key: jax.Array) -> tuple[TrainState, Metrics]:
        rows = batch.input_ids_BT.shape[0]
        if rows % num_minibatches:
            raise ValueError(f"PPO batch of {rows} rows does not split into {num_minibatches} minibatches")

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
