"""Steps on meshes: the same losses and gradients on 1 device, 8-way data, 2x4 data x tensor and 8-way
FSDP; jit-once and donation; PPO's first-step invariants on a 2x4 mesh."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses, models, rollout
from rlhf_jax.configs import MeshConfig, OptimizerConfig
from rlhf_jax.metrics import to_floats
from rlhf_jax.sharding import DEFAULT_RULES, logical_to_sharding, make_mesh, replicated, shard_batch
from rlhf_jax.objectives import dpo_objective, reward_objective, reward_scores, sft_objective
from rlhf_jax.rl.algorithms import PRESETS, Algorithm
from rlhf_jax.rl.objective import rl_objective
from rlhf_jax.rl.steps import make_score_step, make_update_step
from rlhf_jax.steps import make_dpo_step, make_eval_step
from rlhf_jax.train_state import create_train_state, make_optimizer, shardings_of

from mesh_case import copy_state, pair_batch, sft_batch, sft_setup, tiny_model_config

CFG = tiny_model_config()
AXES = models.param_logical_axes(CFG)
HEAD_AXES = models.scalar_head_logical_axes()
MESHES = {
    "1-device": lambda: make_mesh(MeshConfig(data=1), jax.devices()[:1]),
    "data-8": lambda: make_mesh(MeshConfig(data=8)),
    "data-2-tensor-4": lambda: make_mesh(MeshConfig(data=2, tensor=4)),
    "fsdp-8": lambda: make_mesh(MeshConfig(data=1, fsdp=8)),
}


def _lm(seed):
    return models.init_params(CFG, jax.random.key(seed))


CASES = {
    # objective, params, params axes, frozen, frozen axes, batch
    "sft": (functools.partial(sft_objective, model_cfg=CFG), lambda: _lm(0), AXES, dict, {}, lambda: sft_batch(1)),
    "reward": (functools.partial(reward_objective, model_cfg=CFG),
               lambda: {"backbone": _lm(0), "head": models.init_scalar_head(CFG, jax.random.key(1), 0.125)},
               {"backbone": AXES, "head": HEAD_AXES}, dict, {}, lambda: pair_batch(2)),
    "dpo": (functools.partial(dpo_objective, model_cfg=CFG, loss_fn=functools.partial(losses.dpo_loss, beta=0.5)),
            lambda: _lm(0), AXES, lambda: _lm(3), AXES, lambda: pair_batch(4)),
}


@functools.cache
def _loss_and_grads(case, mesh_name):
    """Loss, metrics and gradients of one case on the named mesh.

    One objective per program: XLA:CPU can deadlock when a single program runs several independent
    collective streams on 8 simulated devices of an oversubscribed 2-core machine.
    """
    objective, params_fn, axes, frozen_fn, frozen_axes, batch_fn = CASES[case]
    mesh = MESHES[mesh_name]()
    params_sh = logical_to_sharding(axes, mesh, DEFAULT_RULES, jax.eval_shape(params_fn))
    params = jax.device_put(params_fn(), params_sh)
    frozen = jax.device_put(frozen_fn(), logical_to_sharding(frozen_axes, mesh, DEFAULT_RULES, jax.eval_shape(frozen_fn)))
    batch = shard_batch(batch_fn(), mesh, DEFAULT_RULES)
    fn = jax.jit(jax.value_and_grad(objective, has_aux=True), out_shardings=(replicated(mesh), params_sh))
    (loss, metrics), grads = fn(params, frozen, batch)
    return float(loss), to_floats(metrics), jax.device_get(grads)


@pytest.mark.parametrize("mesh_name", ["data-8", "data-2-tensor-4", "fsdp-8"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_grads_match_one_device(case, mesh_name):
    ref_loss, ref_metrics, ref_grads = _loss_and_grads(case, "1-device")
    loss, metrics, grads = _loss_and_grads(case, mesh_name)
    assert ref_loss > 0.1  # a real loss, not a degenerate zero
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for key, value in ref_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-5, err_msg=key)
    paths_ref, leaves_ref = zip(*jax.tree_util.tree_leaves_with_path(ref_grads))
    assert max(float(np.max(np.abs(g))) for g in leaves_ref) > 1e-4  # gradients really flow
    for path, g_ref, g in zip(paths_ref, leaves_ref, jax.tree.leaves(grads)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("case", ["reward", "dpo"])
def test_padding_pairs_count_for_nothing(case):
    """Held-out evaluation pads its last batch with empty pairs: they change no loss or metric."""
    objective, params_fn, _, frozen_fn, _, batch_fn = CASES[case]
    params, frozen, batch = params_fn(), frozen_fn(), batch_fn()
    real = jax.tree.map(lambda x: x[:5], batch)
    empty = np.arange(batch.margin_B.shape[0]) >= 5  # rows 5.. become padding (no response tokens)
    padded = batch.replace(chosen_response_mask_BT=np.where(empty[:, None], 0.0, batch.chosen_response_mask_BT),
                           rejected_response_mask_BT=np.where(empty[:, None], 0.0, batch.rejected_response_mask_BT))
    (loss_real, m_real), (loss_padded, m_padded) = (jax.jit(objective)(params, frozen, b) for b in (real, padded))
    np.testing.assert_allclose(loss_padded, loss_real, rtol=1e-5)
    for key, value in to_floats(m_real).items():
        np.testing.assert_allclose(to_floats(m_padded)[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_sft_step_is_compiled_once_donates_and_learns():
    mesh, _, initial, step = sft_setup()  # 2 data x 4 tensor, gradients accumulated over 2 micro-steps
    state, batch = copy_state(initial), shard_batch(sft_batch(5), mesh, DEFAULT_RULES)
    losses_seen = []
    for _ in range(6):
        old = state
        state, metrics = step(state, batch)
        losses_seen.append(float(metrics["sft/loss"].mean()))
        assert old.params["layers"]["mlp"]["up"]["kernel"].is_deleted()  # the state was donated
    assert step._cache_size() == 1
    assert int(state.step) == 6
    assert losses_seen[1] == losses_seen[0]  # the first micro-step only accumulates
    assert losses_seen[-1] < losses_seen[0] - 0.05, losses_seen
    assert shardings_of(state) == shardings_of(initial)


def test_dpo_step_keeps_the_reference_frozen():
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=100))
    state = create_train_state(lambda: _lm(0), optimizer, mesh, DEFAULT_RULES, AXES,
                               frozen_init_fn=lambda: _lm(0), frozen_axes=AXES)
    reference = jax.device_get(state.frozen)
    step = make_dpo_step(CFG, optimizer, shardings_of(state), mesh, DEFAULT_RULES)
    batch = shard_batch(pair_batch(6), mesh, DEFAULT_RULES)
    state, first = step(state, batch)
    np.testing.assert_allclose(float(first["dpo/loss"].mean()), np.log(2.0), rtol=1e-6)  # policy == reference
    state, second = step(state, batch)
    assert float(second["dpo/loss"].mean()) < np.log(2.0)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), reference)
    assert jax.tree.structure(state.opt_state[1][0].mu) == jax.tree.structure(state.params)


# --- PPO on a 2 x 4 (data x tensor) mesh ---------------------------------------------------------


@pytest.fixture(scope="module")
def ppo_setup():
    mesh = make_mesh(MeshConfig(data=2, tensor=4))
    prompts = np.random.default_rng(7).integers(1, 128, size=(4, 6), dtype=np.int32)
    prompt_mask = np.ones_like(prompts)
    prompt_mask[:2, :2] = 0  # two left-padded prompts
    prompts = prompts * prompt_mask
    policy = _lm(0)
    sample = rollout.generate(CFG, policy, jnp.asarray(prompts), jnp.asarray(prompt_mask), key=jax.random.key(0),
                              max_new_tokens=8, eos_ids=tuple(range(3, 14)), num_samples=2)
    return mesh, jax.device_get(sample)


PPO = PRESETS["ppo"]


def _no_extras(sample, mesh):
    """No reward-function scores."""
    return shard_batch((np.zeros(sample.sequences_BT.shape[0], np.float32),), mesh, DEFAULT_RULES)


def _ppo_state(mesh, optimizer, separate_critic):
    head = lambda seed: models.init_scalar_head(CFG, jax.random.key(seed), 0.125)
    if separate_critic:
        init = lambda: {"policy": _lm(0), "critic": {"backbone": _lm(10), "head": head(11)}}
        axes = {"policy": AXES, "critic": {"backbone": AXES, "head": HEAD_AXES}}
    else:
        init = lambda: {"policy": _lm(0), "value_head": head(11)}
        axes = {"policy": AXES, "value_head": HEAD_AXES}
    frozen_init = lambda: {"reference": _lm(0), "reward": {"backbone": _lm(20), "head": head(21)}}
    frozen_axes = {"reference": AXES, "reward": {"backbone": AXES, "head": HEAD_AXES}}
    return create_train_state(init, optimizer, mesh, DEFAULT_RULES, axes, frozen_init_fn=frozen_init,
                              frozen_axes=frozen_axes)


def test_ppo_first_step_has_unit_ratio_and_improves_its_objective(ppo_setup):
    mesh, sample = ppo_setup
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=100))
    state = _ppo_state(mesh, optimizer, separate_critic=False)
    shardings = shardings_of(state)
    score = make_score_step(CFG, CFG, shardings, mesh, DEFAULT_RULES, algo=PPO)
    ppo_batch, rollout_metrics = score(state, shard_batch(sample, mesh, DEFAULT_RULES), jnp.float32(0.05),
                                       *_no_extras(sample, mesh))
    assert float(ppo_batch.response_mask_BT.sum()) == float(sample.response_mask_BT.sum())
    objective = functools.partial(rl_objective, model_cfg=CFG, algo=PPO)
    evaluate = make_eval_step(objective, shardings, mesh, DEFAULT_RULES)
    before = to_floats(evaluate(state, ppo_batch))

    step = make_update_step(CFG, optimizer, shardings, mesh, DEFAULT_RULES, epochs=1, num_minibatches=1, algo=PPO)
    state, metrics = step(state, ppo_batch, jax.random.key(0))
    metrics = to_floats(metrics)
    assert metrics["ppo/clipfrac"] == 0.0
    np.testing.assert_allclose(metrics["ppo/ratio"], 1.0, atol=1e-6)
    np.testing.assert_allclose(metrics["ppo/approx_kl_k3"], 0.0, atol=1e-6)
    np.testing.assert_allclose(metrics["optim/loss"], before["optim/loss"], rtol=1e-5, atol=1e-6)
    after = to_floats(evaluate(state, ppo_batch))
    assert after["optim/loss"] < before["optim/loss"] - 1e-3, (before, after)
    assert after["ppo/policy_loss"] < before["ppo/policy_loss"]


def test_ppo_epochs_and_minibatches_with_a_separate_critic(ppo_setup):
    mesh, sample = ppo_setup
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=100))
    state = _ppo_state(mesh, optimizer, separate_critic=True)
    shardings = shardings_of(state)
    score = make_score_step(CFG, CFG, shardings, mesh, DEFAULT_RULES, algo=PPO)
    ppo_batch, _ = score(state, shard_batch(sample, mesh, DEFAULT_RULES), jnp.float32(0.05), *_no_extras(sample, mesh))
    critic_before = jax.device_get(state.params["critic"]["head"]["kernel"])
    frozen_before = jax.device_get(state.frozen)

    step = make_update_step(CFG, optimizer, shardings, mesh, DEFAULT_RULES, epochs=3, num_minibatches=2, algo=PPO)
    state, metrics = step(state, ppo_batch, jax.random.key(1))
    tokens = float(ppo_batch.response_mask_BT.sum())
    # every token seen once per epoch; one optimizer call per minibatch
    assert float(metrics["ppo/clipfrac"].count) == 3 * tokens
    assert float(metrics["optim/grad_norm"].count) == 6 and int(state.step) == 6
    assert not np.allclose(jax.device_get(state.params["critic"]["head"]["kernel"]), critic_before)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), frozen_before)
    with pytest.raises(ValueError, match="does not split into 3 minibatches"):
        make_update_step(CFG, optimizer, shardings, mesh, DEFAULT_RULES, epochs=1, num_minibatches=3, algo=PPO)(
            state, ppo_batch, jax.random.key(2))


def test_rloo_scoring_gives_each_prompts_samples_opposite_constant_advantages(ppo_setup):
    mesh, sample = ppo_setup  # 4 prompts x 2 adjacent samples
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=100))
    state = _ppo_state(mesh, optimizer, separate_critic=False)
    rloo = Algorithm(advantage="rloo", samples_per_prompt=2, kl_placement="reward")
    score = make_score_step(CFG, CFG, shardings_of(state), mesh, DEFAULT_RULES, algo=rloo, missing_eos_penalty=-1.0)
    assert 0 < sample.has_eos_B.sum() < len(sample.has_eos_B)  # both kinds of response, so both paths are seen
    batch, metrics = score(state, shard_batch(sample, mesh, DEFAULT_RULES), jnp.float32(0.0), *_no_extras(sample, mesh))
    mask = np.asarray(batch.response_mask_BT)
    adv = np.asarray(batch.advantages_BT)
    assert np.all(adv[mask == 0] == 0)
    per_row = np.array([np.unique(a[m > 0]).item() for a, m in zip(adv, mask)])  # one value per response
    scores = np.asarray(reward_scores(CFG, jax.device_get(state.frozen["reward"]), sample.sequences_BT,
                                      sample.attention_mask_BT))
    scores = np.where(sample.has_eos_B, scores, -1.0)
    np.testing.assert_allclose(per_row[0::2], scores[0::2] - scores[1::2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(per_row[1::2], -per_row[0::2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["rollout/score"].mean()), scores.mean(), rtol=1e-5)
    assert batch.returns_BT is None and batch.old_values_BT is None  # critic-free: no values exist


@pytest.mark.parametrize("length", [16, 7])
def test_chunked_logps_and_entropy_equal_the_full_logits_with_gradients(length):
    """logps/entropy unembedded a few positions at a time (chunks of 5, the last one padded) equal
    next_token_logps and entropy_from_logits of the full (B, T, V) logits, and so do their gradients."""
    from rlhf_jax import ops
    from rlhf_jax.objectives import logps_and_entropy_from_hidden, next_token_logps

    params = _lm(0)
    b = sft_batch(3, length=length)
    ids, mask = jnp.asarray(b.input_ids_BT), jnp.asarray(b.attention_mask_BT)
    w = jax.random.normal(jax.random.key(1), ids.shape)

    def full(p):
        logits = models.forward(CFG, p, ids, mask)
        lp, ent = next_token_logps(logits, ids), ops.entropy_from_logits(logits)
        return jnp.sum(w * lp) + jnp.sum(w * ent), (lp, ent)

    def chunked(p):
        lp, ent = logps_and_entropy_from_hidden(CFG, p, models.forward_hidden(CFG, p, ids, mask), ids, chunk=5)
        return jnp.sum(w * lp) + jnp.sum(w * ent), (lp, ent)

    (v1, (lp1, ent1)), g1 = jax.value_and_grad(full, has_aux=True)(params)
    (v2, (lp2, ent2)), g2 = jax.value_and_grad(chunked, has_aux=True)(params)
    np.testing.assert_allclose(np.asarray(lp2), np.asarray(lp1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ent2), np.asarray(ent1), rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(lp2)[:, -1] == 0)
    for a, c in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-5 * np.abs(np.asarray(c)).max())
