"""The RL loop's pieces on a tiny model: critic-free scoring computes no values, reward functions join the
reward model as a weighted sum per row, online DPO's pairs, reward-function loading and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import models, rewards, rollout
from rlhf_jax.configs import MeshConfig, OptimizerConfig
from rlhf_jax.metrics import to_floats
from rlhf_jax.objectives import reward_scores
from rlhf_jax.rl import algorithms
from rlhf_jax.rl.objective import policy_and_values
from rlhf_jax.rl.online_dpo import pairs_from_rollout
from rlhf_jax.rl.steps import make_score_step, make_update_step
from rlhf_jax.sharding import DEFAULT_RULES, make_mesh, shard_batch
from rlhf_jax.train_state import create_train_state, make_optimizer, shardings_of

from mesh_case import tiny_model_config

CFG = tiny_model_config()
AXES = models.param_logical_axes(CFG)
HEAD_AXES = models.scalar_head_logical_axes()


@pytest.fixture(scope="module")
def setup():
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    prompts = np.random.default_rng(3).integers(1, 128, size=(4, 6), dtype=np.int32)
    sample = rollout.generate(CFG, models.init_params(CFG, jax.random.key(0)), jnp.asarray(prompts),
                              jnp.ones_like(jnp.asarray(prompts)), key=jax.random.key(0), max_new_tokens=8,
                              eos_ids=tuple(range(3, 14)), num_samples=4)
    return mesh, jax.device_get(sample)


def _state(mesh, with_reward: bool, optimizer=None):
    head = models.init_scalar_head(CFG, jax.random.key(21), 0.5)
    frozen = {"reference": models.init_params(CFG, jax.random.key(0))}
    frozen_axes = {"reference": AXES}
    if with_reward:
        frozen["reward"] = {"backbone": models.init_params(CFG, jax.random.key(20)), "head": head}
        frozen_axes["reward"] = {"backbone": AXES, "head": HEAD_AXES}
    optimizer = optimizer or make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=10))
    state = create_train_state(lambda: {"policy": models.init_params(CFG, jax.random.key(0))}, optimizer, mesh,
                               DEFAULT_RULES, {"policy": AXES}, frozen_init_fn=lambda: frozen, frozen_axes=frozen_axes)
    return state, optimizer


def test_grpo_state_and_steps_hold_and_compute_no_value(setup):
    mesh, sample = setup
    state, optimizer = _state(mesh, with_reward=True)
    algo = algorithms.PRESETS["grpo"]
    assert not algo.needs_critic and set(state.params) == {"policy"}  # no value head, no critic
    assert policy_and_values(state.params, sample.sequences_BT, sample.attention_mask_BT, model_cfg=CFG)[2] is None
    score = make_score_step(CFG, CFG, shardings_of(state), mesh, DEFAULT_RULES, algo=algo)
    B = sample.sequences_BT.shape[0]
    extras = shard_batch((np.zeros(B, np.float32),), mesh, DEFAULT_RULES)
    batch, metrics = score(state, sample, jnp.float32(0.04), *extras)
    assert batch.old_values_BT is None and batch.returns_BT is None
    update = make_update_step(CFG, optimizer, shardings_of(state), mesh, DEFAULT_RULES, epochs=1, num_minibatches=2,
                              algo=algo, max_len=8)
    new_state, train = update(state, batch, jax.random.key(1))
    assert "vf/loss" not in train and "kl/loss" in train and int(new_state.step) == 2
    # PPO's estimator reads values: scoring without a critic is refused
    ppo_score = make_score_step(CFG, CFG, shardings_of(new_state), mesh, DEFAULT_RULES, algo=algorithms.PRESETS["ppo"])
    with pytest.raises(ValueError, match="needs a critic"):
        ppo_score(new_state, sample, jnp.float32(0.1), *extras)


def test_single_update_skips_the_policy_pass_and_trains_as_with_old_logps(setup):
    """One update per rollout (1 epoch x 1 minibatch): scoring skips the policy's pass (TRL's GRPO with
    num_iterations 1) and the update, reading its own detached log-probs as the old ones, moves the policy as the
    update on scored old log-probs does, and logs the same rollout KL."""
    mesh, sample = setup
    algo = algorithms.PRESETS["grpo"]
    B = sample.sequences_BT.shape[0]
    extras = shard_batch((np.linspace(0.0, 1.0, B).astype(np.float32),), mesh, DEFAULT_RULES)
    runs = {}
    for single in (False, True):
        # plain SGD: the update is the gradient itself (Adam's first step, about lr * sign(g), would magnify float
        # noise in the near-zero gradients)
        state, optimizer = _state(mesh, with_reward=True, optimizer=optax.sgd(1.0))
        # a policy other than the reference, so that the rollout's KL is not zero
        state = state.replace(params=jax.tree.map(lambda r, p: 0.8 * r + 0.2 * p, state.params,
                                                  {"policy": models.init_params(CFG, jax.random.key(7))}))
        start = jax.device_get(state.params)
        score = make_score_step(CFG, CFG, shardings_of(state), mesh, DEFAULT_RULES, algo=algo, single_update=single)
        batch, score_metrics = score(state, sample, jnp.float32(0.04), *extras)
        assert (batch.old_logps_BT is None) == single
        update = make_update_step(CFG, optimizer, shardings_of(state), mesh, DEFAULT_RULES, epochs=1,
                                  num_minibatches=1, algo=algo, max_len=8)
        new_state, train = update(state, batch, jax.random.key(1))
        runs[single] = (jax.device_get(new_state.params), to_floats({**score_metrics, **train}))
    (params_old, m_old), (params_new, m_new) = runs[False], runs[True]
    assert m_old["rollout/kl"] > 1e-3 and set(m_new) == set(m_old)
    for key in m_old:
        np.testing.assert_allclose(m_new[key], m_old[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params_old), jax.tree.leaves(start))) > 1e-4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params_new, params_old)
    # PPO's scoring reads the policy's log-probs (KL in the reward) and a critic: it never skips the pass
    ppo = algorithms.PRESETS["ppo"]
    assert ppo.scoring_reads_policy_logps and not algo.scoring_reads_policy_logps


def test_reward_function_and_reward_model_combine_as_a_weighted_sum_per_row(setup):
    mesh, sample = setup
    state, _ = _state(mesh, with_reward=True)
    B = sample.sequences_BT.shape[0]
    fn_B = np.random.default_rng(0).normal(size=B).astype(np.float32)  # Σ w_i f_i from rewards.score
    score = make_score_step(CFG, CFG, shardings_of(state), mesh, DEFAULT_RULES, algo=algorithms.PRESETS["rloo"],
                            rm_weight=0.7, missing_eos_penalty=None)
    batch, metrics = score(state, sample, jnp.float32(0.0),
                           *shard_batch((fn_B,), mesh, DEFAULT_RULES))
    rm_B = np.asarray(reward_scores(CFG, jax.device_get(state.frozen["reward"]), sample.sequences_BT,
                                    sample.attention_mask_BT))
    assert np.std(rm_B) > 1e-3  # the reward model tells rows apart, so a wrong weight would show
    np.testing.assert_allclose(np.asarray(batch.scores_B), 0.7 * rm_B + fn_B, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["rollout/rm_score"].mean()), rm_B.mean(), rtol=1e-5)
    # without a reward model the functions alone score
    state, _ = _state(mesh, with_reward=False)
    score = make_score_step(CFG, None, shardings_of(state), mesh, DEFAULT_RULES, algo=algorithms.PRESETS["rloo"])
    batch, _ = score(state, sample, jnp.float32(0.0), *shard_batch((fn_B,), mesh, DEFAULT_RULES))
    np.testing.assert_allclose(np.asarray(batch.scores_B), fn_B, rtol=1e-6)


def test_rewards_score_weights_each_function_and_names_bad_rows(tmp_path):
    file = tmp_path / "my_rules.py"
    file.write_text("def length(prompts, responses):\n    return [len(r) for r in responses]\n"
                    "def broken(prompts, responses):\n    return [float('nan')] * len(responses)\n")
    fns = rewards.load_all([f"{file}:length=0.5", "rlhf_jax.rewards:soft_overlong_punishment"])
    prompts, responses = ["a", "b"], ["hi there", " ".join(["w"] * 46)]
    total, means = rewards.score(fns, prompts, responses)
    expected = [0.5 * len(r) + p for r, p in zip(responses, rewards.soft_overlong_punishment(prompts, responses))]
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    assert set(means) == {"reward/length", "reward/soft_overlong_punishment"}
    np.testing.assert_allclose(rewards.soft_overlong_punishment([""] * 3, ["", "", ""], tokens=[36, 42, 49]),
                               [0.0, -0.5, -1.0])  # DAPO eq. 13 with L_max 48, L_cache 12
    with pytest.raises(ValueError, match=r"broken gave nan for row 0"):
        rewards.score(rewards.load_all([f"{file}:broken"]), prompts, responses)
    with pytest.raises(ValueError, match="expected module:function"):
        rewards.load("rlhf_jax.rewards")
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        rewards.load("rlhf_jax.rewards:nope")
    with pytest.raises(ValueError, match="weight 'x' is not a number"):
        rewards.load("rlhf_jax.rewards:gold=x")
    assert rewards.rm_weight([], None) == 1.0 and rewards.rm_weight(["m:f"], None) == 0.0


def test_online_dpo_pairs_choose_the_higher_score_and_ties_train_nothing(setup):
    _, sample = setup
    two = jax.tree.map(lambda x: x[:8], sample)  # 4 prompts x 2 samples
    two = two.replace(prompt_len=sample.prompt_len)
    scores = jnp.asarray([1.0, 2.0, 3.0, -1.0, 0.5, 0.5, -2.0, 4.0])
    batch, decided = pairs_from_rollout(two, scores)
    np.testing.assert_array_equal(np.asarray(decided), [1, 1, 0, 1])
    chosen_rows, rejected_rows = [1, 2, 4, 7], [0, 3, 5, 6]
    np.testing.assert_array_equal(np.asarray(batch.chosen_ids_BT), np.asarray(two.sequences_BT)[chosen_rows])
    np.testing.assert_array_equal(np.asarray(batch.rejected_ids_BT), np.asarray(two.sequences_BT)[rejected_rows])
    assert float(np.asarray(batch.chosen_response_mask_BT)[2].sum()) == 0.0  # the tie
    np.testing.assert_array_equal(np.asarray(batch.chosen_response_mask_BT)[0],
                                  np.asarray(two.scored_mask_BT)[1])


def test_algorithm_presets_check_their_choices():
    assert algorithms.resolve("grpo", algorithms.AlgorithmArgs(kl_estimator="k2")).kl_estimator == "k2"
    with pytest.raises(ValueError, match="samples-per-prompt must be >= 2"):
        algorithms.resolve("grpo", algorithms.AlgorithmArgs(samples_per_prompt=1))
    with pytest.raises(ValueError, match="not a known advantage estimator"):
        algorithms.resolve("ppo", algorithms.AlgorithmArgs(advantage="gea"))
    with pytest.raises(ValueError, match="--algo 'ppo2' is not a known algorithm"):
        algorithms.resolve("ppo2")
    for name, algo in algorithms.PRESETS.items():
        assert algo.describe() and (algo.needs_critic == (name == "ppo"))


def test_dynamic_sampling_keeps_drawing_until_every_group_has_signal():
    """DAPO's dynamic sampling in the loop's learner: groups whose N scores are all equal are dropped and more
    prompts are drawn (up to max_draws); the batch is filled with the kept groups in order and any unfilled
    rows train nothing."""
    from rlhf_jax.rl.loop import PolicyGradient, Sample
    from rlhf_jax.rl.objective import RLBatch

    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    N, G, T = 2, 3, 4
    # per draw, the scores of G groups of N: draw 0 keeps group 1, draw 1 keeps groups 0 and 2, draw 2 keeps all
    draws_scores = [[1, 1, 0, 2, 5, 5], [0, 3, 7, 7, 1, 2], [4, 5, 6, 7, 8, 9]]

    def draw(key):
        i = len(drawn)
        drawn.append(i)
        r = rollout.Rollout(sequences_BT=np.full((G * N, T), i, np.int32), attention_mask_BT=np.ones((G * N, T), np.int32),
                            response_mask_BT=np.ones((G * N, T), np.float32), response_ids_BR=np.zeros((G * N, 1), np.int32),
                            response_mask_BR=np.ones((G * N, 1), np.float32), logps_BR=np.zeros((G * N, 1), np.float32),
                            lengths_B=np.ones(G * N, np.int32), has_eos_B=np.ones(G * N, bool), prompt_len=3)
        return Sample(r, ["p"] * (G * N), ["r"] * (G * N), np.asarray(draws_scores[i], np.float32), {}, 0.1)

    def score_step(state, r, kl_coef, function_scores_B):
        ones = jnp.ones((G * N, T), jnp.float32)
        row_id = jnp.asarray(r.sequences_BT, jnp.float32) * 10 + jnp.arange(G * N)[:, None]  # draw * 10 + row
        return RLBatch(input_ids_BT=r.sequences_BT, attention_mask_BT=r.attention_mask_BT, response_mask_BT=ones,
                       old_logps_BT=row_id, ref_logps_BT=ones, advantages_BT=ones, scores_B=function_scores_B), {}

    algo = algorithms.resolve("dapo", algorithms.AlgorithmArgs(samples_per_prompt=N))
    for max_draws, expected_rows, real in ((3, [2, 3, 10, 11, 14, 15], 3), (2, [2, 3, 10, 11, 14, 15], 3),
                                           (1, [2, 3], 1)):
        drawn = []
        learner = PolicyGradient(algo, score_step, None, mesh, DEFAULT_RULES, max_draws=max_draws)
        batch, metrics, first = learner.experience(None, draw, jax.random.key(0), jnp.float32(0.0))
        rows = np.asarray(batch.old_logps_BT)[:, 0].astype(int)
        mask = np.asarray(batch.response_mask_BT)[:, 0]
        np.testing.assert_array_equal(rows[:2 * real], expected_rows[:2 * real])
        np.testing.assert_array_equal(mask, (np.arange(G * N) < N * real).astype(np.float32))
        assert float(metrics["rollout/filled_groups"].mean()) == real and len(drawn) == min(max_draws, 2)
