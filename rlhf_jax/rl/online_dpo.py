"""Online (iterative) DPO: pairs sampled from the current policy, judged, then DPO-family updates.

Each iteration samples two responses per prompt from the current policy, a judge picks the better
one, and the policy takes ``epochs × num_minibatches`` steps of a preference loss
(``registry.PREFERENCE_LOSSES``: dpo, ipo, simpo, ...) on those fresh pairs against the frozen
reference (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; Xiong et al.
2024, "Iterative Preference Learning from Human Feedback"). Judges:

- ``"reward"``: the run's score: the reward model and/or reward functions (``--reward``), the
  missing-EOS penalty applied; equal scores make a tie, which trains nothing (weight 0);
- ``"annotator"``: the simulated annotator (Bradley–Terry on the gold score; embedded default).

Its state is DPO's: ``params`` = the policy, ``frozen = {"reference": LM, "reward": RM}``.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import ensemble, kl, memory, ops, registry, trainer
from rlhf_jax.metrics import Metric
from rlhf_jax.objectives import dpo_objective, token_logps
from rlhf_jax.rl import loop
from rlhf_jax.rl.steps import combined_scores, make_update_step
from rlhf_jax.rollout import Rollout
from rlhf_jax.sharding import batch_sharding, replicated, shard_batch
from rlhf_jax.train_state import make_optimizer, shardings_of
from rlhf_jax.types import PairBatch


@dataclasses.dataclass(frozen=True)
class OnlineDPOConfig(loop.OnlineArgs):
    loss: str = "dpo"
    """Preference loss (registry.PREFERENCE_LOSSES: dpo, cdpo, robust, ipo, simpo)."""
    beta: float = 0.1
    """β of the preference loss (also the KL scale it implies)."""
    judge: Literal["reward", "annotator"] = "reward"
    """Who prefers one sample of a pair: the run's reward (model and/or --reward functions) or the simulated annotator."""
    annotator_seed: int = 0
    """Seed of the simulated annotator's label noise (judge annotator)."""
    epochs: int = 2
    """Passes over each iteration's pairs."""
    num_minibatches: int = 2
    """Minibatches per epoch (one optimizer step each)."""

    def __post_init__(self):
        registry.PREFERENCE_LOSSES.check(self.loss, "--loss")


def pairs_from_rollout(rollout: Rollout, scores_B: jax.Array) -> tuple[PairBatch, jax.Array]:
    """Rows 2i and 2i+1 (two samples of one prompt) as a :class:`PairBatch` with the higher-scored one
    chosen; a tie trains nothing (both response masks 0). Returns the batch and ``decided_P`` (1 = not a tie)."""
    ids_PNT = rollout.sequences_BT.reshape(-1, 2, rollout.sequences_BT.shape[1])
    attention_PNT = rollout.attention_mask_BT.reshape(ids_PNT.shape)
    mask_PNT = rollout.scored_mask_BT.reshape(ids_PNT.shape)
    scores_PN = jnp.asarray(scores_B, jnp.float32).reshape(-1, 2)
    first_wins_P = scores_PN[:, 0] >= scores_PN[:, 1]
    decided_P = (scores_PN[:, 0] != scores_PN[:, 1]).astype(jnp.float32)
    chosen_P = jnp.where(first_wins_P, 0, 1)

    def side(x_PNT, which_P):
        return jnp.take_along_axis(x_PNT, which_P[:, None, None], axis=1)[:, 0]

    batch = PairBatch(
        chosen_ids_BT=side(ids_PNT, chosen_P), chosen_attention_mask_BT=side(attention_PNT, chosen_P),
        chosen_response_mask_BT=side(mask_PNT, chosen_P) * decided_P[:, None],
        rejected_ids_BT=side(ids_PNT, 1 - chosen_P), rejected_attention_mask_BT=side(attention_PNT, 1 - chosen_P),
        rejected_response_mask_BT=side(mask_PNT, 1 - chosen_P) * decided_P[:, None],
        margin_B=jnp.zeros_like(decided_P))
    return batch, decided_P


@dataclasses.dataclass
class OnlineDPO:
    """The online-DPO learner of :func:`rlhf_jax.rl.loop.run`: two samples per prompt, judged, DPO steps."""

    cfg: OnlineDPOConfig
    judge_step: callable
    update_step: callable
    mesh: object
    rules: object
    num_samples: int = 2

    def experience(self, state, draw, key, kl_coef):
        sample = draw(key)
        function_scores_B, = shard_batch((sample.function_scores_B,), self.mesh, self.rules)
        scores_B, kl_B, rm_metrics = self.judge_step(state, sample.rollout, function_scores_B)
        if self.cfg.judge == "annotator":
            from rlhf_jax.data.simulated import Annotator

            annotator = Annotator(seed=self.cfg.annotator_seed + int(jax.random.randint(key, (), 0, 2 ** 30)))
            prefer = [annotator.compare(sample.prompts[2 * i], sample.responses[2 * i], sample.responses[2 * i + 1])
                      for i in range(len(sample.responses) // 2)]
            scores_B = np.array([[1.0, 0.0] if p == 0 else [0.0, 1.0] for p in prefer], np.float32).reshape(-1)
            scores_B, = shard_batch((scores_B,), self.mesh, self.rules)
        batch, decided_P = jax.jit(pairs_from_rollout)(sample.rollout, scores_B)
        metrics = {"rollout/score": Metric.mean_of(jnp.asarray(scores_B)), "rollout/kl": Metric.mean_of(kl_B),
                   "rollout/response_length": Metric.mean_of(jnp.sum(sample.rollout.scored_mask_BT, axis=-1)),
                   "rollout/has_eos": Metric.mean_of(sample.rollout.has_eos_B),
                   "rollout/decided_pairs": Metric.mean_of(decided_P), **rm_metrics}
        return batch, metrics, sample

    def update(self, state, batch, key):
        return self.update_step(state, batch, key)


def main(cfg: OnlineDPOConfig) -> dict:
    with memory.PeakRSS() as peak:
        result, out, stage = _main(cfg)
    return trainer.record_peak_memory(stage, peak, result, out)


def _main(cfg: OnlineDPOConfig, stage: str = "online_dpo"):
    reference_free = cfg.loss == "simpo"
    if cfg.judge == "annotator" and cfg.reward_model_weight is None and not cfg.reward:
        cfg = dataclasses.replace(cfg, reward_model_weight=0.0, reward=("rlhf_jax.rewards:gold",))  # gold for logs only
    print(f"[{stage}] {cfg.loss} (β {cfg.beta:g}) on pairs of the policy's samples judged by the "
          f"{'simulated annotator' if cfg.judge == 'annotator' else 'reward'}", flush=True)
    ctx, trees, axes = loop.setup(cfg, stage, num_samples=2, lm_path=(), reference_path=("reference",))
    cfg = ctx.cfg
    frozen = {k: trees[k] for k in ("reference", "reward") if k in trees}
    frozen_axes = {k: axes[k] for k in frozen}
    optimizer = make_optimizer(cfg.optim)
    state = loop.place_state(ctx, trees["policy"], axes["policy"], frozen, frozen_axes, optimizer)
    del trees, frozen
    state_sh = shardings_of(state)
    view = ctx.trainable.view
    model_cfg, reward_cfg = ctx.model_cfg, ctx.reward_cfg
    rm_weight, penalty = ctx.rm_weight, cfg.missing_eos_penalty

    def judge(state, rollout: Rollout, function_scores_B):
        params, frozen = (state.params, state.frozen) if view is None else view(state.params, state.frozen)
        ids, attention = rollout.sequences_BT, rollout.attention_mask_BT
        rm_B, rm_KB = None, None
        if "reward" in frozen:
            rm_B, rm_KB = ensemble.score(reward_cfg, frozen["reward"], ids, attention)
        scores_B = combined_scores(rm_B, function_scores_B, rm_weight=rm_weight)
        if penalty is not None:
            scores_B = jnp.where(rollout.has_eos_B, scores_B, jnp.float32(penalty))
        kl_BT = kl.kl_k1(token_logps(model_cfg, params, ids, attention),
                         token_logps(model_cfg, frozen["reference"], ids, attention))
        rm_metrics = {} if rm_KB is None else ensemble.spread_metrics(rm_KB)  # an ensemble's members and spread
        return scores_B, ops.masked_sum(kl_BT, rollout.scored_mask_BT, axis=-1), rm_metrics

    rows = batch_sharding(ctx.mesh, ctx.rules)
    judge_step = jax.jit(judge, in_shardings=(state_sh, rows, rows), out_shardings=(rows, rows, replicated(ctx.mesh)))
    loss_fn = registry.PREFERENCE_LOSSES[cfg.loss]
    loss_fn = functools.partial(loss_fn, beta=cfg.beta)

    def objective(params, frozen, batch, **_):
        return dpo_objective(params, {} if reference_free else frozen["reference"], batch, model_cfg=model_cfg,
                             loss_fn=loss_fn)

    update_step = make_update_step(model_cfg, optimizer, state_sh, ctx.mesh, ctx.rules, epochs=cfg.epochs,
                                   num_minibatches=cfg.num_minibatches, view=view, objective=objective)
    learner = OnlineDPO(cfg, judge_step, update_step, ctx.mesh, ctx.rules)
    kl_ctl = loop.kl_controller(dataclasses.replace(cfg, kl=loop.KLArgs()), 0.0, in_reward=False)
    _, result = loop.run(ctx, state, learner, stage=stage, name="online DPO", kl_ctl=kl_ctl,
                         updates_per_iteration=cfg.epochs * cfg.num_minibatches,
                         print_keys=("dpo/accuracy", "dpo/margin", "rollout/decided_pairs"))
    return result, ctx.out, stage


__all__ = ["OnlineDPO", "OnlineDPOConfig", "main", "pairs_from_rollout"]
