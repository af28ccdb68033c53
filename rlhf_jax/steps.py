"""Train steps: each jitted once, explicit shardings, state donated.

:func:`make_train_step` differentiates an objective (:mod:`rlhf_jax.objectives`: ``objective(params,
frozen, batch) -> (loss, metrics)``) and applies the optimizer; :func:`make_eval_step` only reports its
metrics; ``make_sft_step`` / ``make_reward_step`` / ``make_dpo_step`` bind the stage's objective. The RL
steps (rollout scoring, epochs × minibatches of policy updates) are in :mod:`rlhf_jax.rl.steps`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import optax
from jax.sharding import Mesh

from rlhf_jax import lora, losses, models
from rlhf_jax.metrics import Metric, Metrics
from rlhf_jax.objectives import Objective, dpo_objective, reward_objective, sft_objective
from rlhf_jax.sharding import Rules, batch_sharding, replicated
from rlhf_jax.train_state import TrainState


# --- Step builders ------------------------------------------------------------------------------




Step = Callable[..., Any]


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
