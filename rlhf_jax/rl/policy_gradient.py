"""Policy-gradient RLHF: PPO and the GRPO family (:mod:`rlhf_jax.rl.algorithms`) on the shared loop.

:func:`main` lays out the state the algorithm needs (a value head or a separate critic only when its
advantage estimator reads values), builds the score and update steps and runs :func:`rlhf_jax.rl.loop.run`.
``experiments/ppo.py`` and ``experiments/grpo.py`` are this with another default ``--algo``.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax

from rlhf_jax import defaults, ensemble, memory, models, trainer
from rlhf_jax.rl import algorithms, loop
from rlhf_jax.rl.steps import make_score_step, make_update_step
from rlhf_jax.train_state import make_optimizer, shardings_of


@dataclasses.dataclass(frozen=True)
class RLConfig(loop.OnlineArgs):
    algo: str = "ppo"
    """Preset (rlhf_jax.rl.algorithms.PRESETS): ppo, grpo, dr_grpo, dapo, gspo, rloo, reinforce_pp."""
    algo_args: algorithms.AlgorithmArgs = algorithms.AlgorithmArgs()
    """Overrides of the preset's choices (--algo-args.kl-coef 0.05, --algo-args.samples-per-prompt 8, ...)."""
    critic: Literal["value_head", "separate"] | None = None
    """With a critic-reading estimator (GAE): a value head on the policy's backbone, or a separate critic
    initialised from the reward model (InstructGPT's). None: auto, printed: separate on the embedded default
    when a reward model is loaded (a head on the toy policy's features explains none of the returns' variance,
    the reward model's features do), else value_head (no second backbone in memory). Critic-free algorithms
    have neither."""


def main(cfg: RLConfig) -> dict:
    with memory.PeakRSS() as peak:
        result, out, stage = _main(cfg)
    return trainer.record_peak_memory(stage, peak, result, out)


def _main(cfg: RLConfig):
    algo = algorithms.resolve(cfg.algo, cfg.algo_args)
    stage = cfg.algo
    print(f"[{stage}] {algo.describe()}", flush=True)
    ctx, trees, axes = loop.setup(cfg, stage, num_samples=algo.samples_per_prompt)
    cfg = ctx.cfg
    params, param_axes = {"policy": trees["policy"]}, {"policy": axes["policy"]}
    critic_cfg = None
    if algo.needs_critic:
        critic = cfg.critic
        if critic is None:
            embedded = defaults.model_kind(ctx.model_cfg) == "embedded"
            critic = "separate" if embedded and "reward" in trees else "value_head"
            print(f"[{stage}] critic: {critic} (auto; --critic value_head|separate to choose)", flush=True)
        if critic == "value_head":
            params["value_head"] = models.init_scalar_head(ctx.model_cfg, jax.random.key(1))
            param_axes["value_head"] = models.scalar_head_logical_axes()
        else:
            if "reward" not in trees:
                raise ValueError("--critic separate starts from the reward model: it needs one (--reward-model-weight > 0)")
            # an ensemble's critic starts from its first member (the members share the architecture)
            params["critic"], param_axes["critic"] = ensemble.member(trees["reward"], 0, axes["reward"])
            critic_cfg = ctx.reward_cfg
    frozen = {k: trees[k] for k in ("reference", "reward") if k in trees}
    frozen_axes = {k: axes[k] for k in frozen}
    optimizer = make_optimizer(cfg.optim)
    state = loop.place_state(ctx, params, param_axes, frozen, frozen_axes, optimizer)
    del params, frozen, trees
    state_sh = shardings_of(state)
    view = ctx.trainable.view
    score_step = make_score_step(ctx.model_cfg, ctx.reward_cfg, state_sh, ctx.mesh, ctx.rules, view=view, algo=algo,
                                 critic_cfg=critic_cfg, rm_weight=ctx.rm_weight,
                                 missing_eos_penalty=cfg.missing_eos_penalty,
                                 single_update=cfg.epochs * cfg.num_minibatches == 1)
    update_step = make_update_step(ctx.model_cfg, optimizer, state_sh, ctx.mesh, ctx.rules, epochs=cfg.epochs,
                                   num_minibatches=cfg.num_minibatches, view=view, algo=algo, critic_cfg=critic_cfg,
                                   max_len=cfg.sample.max_new_tokens)
    learner = loop.PolicyGradient(algo, score_step, update_step, ctx.mesh, ctx.rules)
    kl_ctl = loop.kl_controller(cfg, algo.kl_coef, in_reward=algo.kl_in_reward)
    print_keys = ("ppo/clipfrac",) + (("vf/explained_variance_rollout",) if algo.needs_critic else ())
    state, result = loop.run(ctx, state, learner, stage=stage, name=cfg.algo.upper(), kl_ctl=kl_ctl,
                             updates_per_iteration=cfg.epochs * cfg.num_minibatches, print_keys=print_keys)
    return result, ctx.out, stage
