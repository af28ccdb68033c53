"""A policy loss of one's own, passed into the library's RL update step (``make_update_step(..., policy_loss=fn)``,
the route notebooks/custom_loss.py takes; no library file edited).

On a tiny Llama with a rollout scored by the library's score step (PPO preset, one device):
- ``policy_loss=functools.partial(registry.POLICY_LOSSES["ppo_clip"])`` updates the state exactly as the default
  (the preset's registered loss), bit for bit on one device;
- a different loss (the same PPO surrogate with the advantages negated, and a metric of its own) is really
  called: its metric is in the step's output, and its update moves the policy elsewhere.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, registry, rollout
from rlhf_jax.configs import MeshConfig, OptimizerConfig
from rlhf_jax.losses import ppo_policy_loss
from rlhf_jax.metrics import Metric, to_floats
from rlhf_jax.rl.algorithms import PRESETS
from rlhf_jax.rl.objective import rl_objective
from rlhf_jax.rl.steps import make_score_step, make_update_step
from rlhf_jax.sharding import DEFAULT_RULES, make_mesh, shard_batch
from rlhf_jax.steps import make_eval_step
from rlhf_jax.train_state import create_train_state, make_optimizer, shardings_of

from mesh_case import tiny_model_config

CFG = tiny_model_config()
AXES = models.param_logical_axes(CFG)
HEAD_AXES = models.scalar_head_logical_axes()
PPO = PRESETS["ppo"]


def reversed_ppo(logps_BT, old_logps_BT, advantages_BT, mask_BT, *, sign: float, **options):
    """PPO's clipped surrogate on ``sign`` × the advantages, with a metric of its own."""
    loss, metrics = ppo_policy_loss(logps_BT, old_logps_BT, sign * advantages_BT, mask_BT, **options)
    metrics["custom/called"] = Metric.scalar(jnp.float32(1.0))
    return loss, metrics


@pytest.fixture(scope="module")
def setup():
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    prompts = np.random.default_rng(7).integers(1, 128, size=(4, 6), dtype=np.int32)
    policy = models.init_params(CFG, jax.random.key(0))
    sample = jax.device_get(rollout.generate(CFG, policy, jnp.asarray(prompts), jnp.ones_like(prompts),
                                             key=jax.random.key(0), max_new_tokens=8, eos_ids=tuple(range(3, 14)),
                                             num_samples=2))
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=100))
    head = lambda seed: models.init_scalar_head(CFG, jax.random.key(seed), 0.125)

    def fresh_state():
        return create_train_state(
            lambda: {"policy": models.init_params(CFG, jax.random.key(0)), "value_head": head(11)}, optimizer, mesh,
            DEFAULT_RULES, {"policy": AXES, "value_head": HEAD_AXES},
            frozen_init_fn=lambda: {"reference": models.init_params(CFG, jax.random.key(0)),
                                    "reward": {"backbone": models.init_params(CFG, jax.random.key(20)),
                                               "head": head(21)}},
            frozen_axes={"reference": AXES, "reward": {"backbone": AXES, "head": HEAD_AXES}})

    state = fresh_state()
    shardings = shardings_of(state)
    score = make_score_step(CFG, CFG, shardings, mesh, DEFAULT_RULES, algo=PPO)
    batch, _ = score(state, shard_batch(sample, mesh, DEFAULT_RULES), jnp.float32(0.05),
                     *shard_batch((np.zeros(sample.sequences_BT.shape[0], np.float32),), mesh, DEFAULT_RULES))
    assert float(jnp.abs(batch.advantages_BT).sum()) > 0  # something to learn from

    def update(policy_loss):
        step = make_update_step(CFG, optimizer, shardings, mesh, DEFAULT_RULES, epochs=2, num_minibatches=2, algo=PPO,
                                policy_loss=policy_loss)
        new, metrics = step(fresh_state(), batch, jax.random.key(1))
        return jax.device_get(new.params["policy"]), to_floats(metrics)

    evaluate = make_eval_step(functools.partial(rl_objective, model_cfg=CFG, algo=PPO), shardings, mesh,
                              DEFAULT_RULES)
    return update, fresh_state, batch, evaluate


def _max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_the_registered_loss_passed_by_partial_updates_as_the_default(setup):
    update, fresh_state, _, _ = setup
    default, default_metrics = update(None)
    passed, passed_metrics = update(functools.partial(registry.POLICY_LOSSES["ppo_clip"]))
    start = jax.device_get(fresh_state().params["policy"])
    assert _max_abs_diff(default, start) > 1e-4  # the update moved the policy: the comparison compares something
    assert _max_abs_diff(passed, default) == 0.0
    assert passed_metrics["ppo/policy_loss"] == default_metrics["ppo/policy_loss"]
    assert "custom/called" not in default_metrics


def test_another_loss_is_called_and_moves_the_policy_elsewhere(setup):
    update, fresh_state, batch, evaluate = setup
    default, _ = update(None)
    same_sign, same_metrics = update(functools.partial(reversed_ppo, sign=1.0))
    flipped, flipped_metrics = update(functools.partial(reversed_ppo, sign=-1.0))
    assert same_metrics["custom/called"] == 1.0 and flipped_metrics["custom/called"] == 1.0
    assert _max_abs_diff(same_sign, default) < 1e-6  # sign +1 is PPO itself
    assert _max_abs_diff(flipped, default) > 1e-4
    # judged by the stock PPO objective on the same batch: the default update lowers it, the flipped one raises it
    state = fresh_state()
    before = to_floats(evaluate(state, batch))["ppo/policy_loss"]
    after = {name: to_floats(evaluate(state.replace(params={**state.params, "policy": p}), batch))["ppo/policy_loss"]
             for name, p in (("default", default), ("flipped", flipped))}
    assert after["default"] < before < after["flipped"], (before, after)
