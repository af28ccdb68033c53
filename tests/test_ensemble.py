"""Reward-model ensembles (rlhf_jax.ensemble, Coste et al. 2023): the rules against NumPy loops of their formulas,
stacked vmapped scoring against each member alone, a one-member ensemble against the single reward model, the RL
score step and best-of-n selecting by the combined score, loading members from disk."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import best_of_n, ensemble, evaluation, models, objectives, registry, rollout
from rlhf_jax.configs import MeshConfig, OptimizerConfig
from rlhf_jax.rl import algorithms
from rlhf_jax.rl.steps import make_score_step
from rlhf_jax.sharding import DEFAULT_RULES, make_mesh, shard_batch
from rlhf_jax.train_state import create_train_state, make_optimizer, shardings_of

from mesh_case import tiny_model_config

CFG = tiny_model_config()
AXES = models.param_logical_axes(CFG)
RM_AXES = {"backbone": AXES, "head": models.scalar_head_logical_axes()}
K = 3


def _numpy_rule(rule: str, scores_KB: np.ndarray, lam: float) -> np.ndarray:
    """The published formulas, one row at a time, in float64."""
    out = []
    for b in range(scores_KB.shape[1]):
        r = [float(scores_KB[k, b]) for k in range(scores_KB.shape[0])]
        mean = sum(r) / len(r)
        if rule == "mean":
            out.append(mean)
        elif rule == "worst":
            out.append(min(r))
        else:
            out.append(mean - lam * sum((x - mean) ** 2 for x in r) / len(r))
    return np.array(out)


@pytest.mark.parametrize("rule, lam", [("mean", 0.0), ("worst", 0.0), ("uwo", 0.1), ("uwo", 0.5), ("uwo", 2.0)])
def test_rules_match_numpy_loops_of_the_formulas(rule, lam):
    scores_KB = np.random.default_rng(7).normal(0.0, 1.5, size=(5, 33)).astype(np.float32)
    got = np.asarray(registry.ENSEMBLE_RULES[rule](jnp.asarray(scores_KB), uwo_lambda=lam))
    np.testing.assert_allclose(got, _numpy_rule(rule, scores_KB, lam), rtol=1e-5, atol=1e-5)
    assert got.shape == (33,)


def test_rules_are_registered_and_conservative():
    assert {"mean", "worst", "uwo"} <= set(registry.ENSEMBLE_RULES.names())
    with pytest.raises(ValueError, match="--ensemble-rule 'median'.*mean"):
        registry.ENSEMBLE_RULES.check("median", "--ensemble-rule")
    scores_KB = jnp.asarray(np.random.default_rng(1).normal(size=(4, 50)), jnp.float32)
    mean_B = ensemble.mean_score(scores_KB)
    # conservative rules never exceed the mean; they equal it exactly where the members agree
    assert bool(jnp.all(ensemble.worst_case_score(scores_KB) <= mean_B))
    assert bool(jnp.all(ensemble.uncertainty_weighted_score(scores_KB, uwo_lambda=0.3) <= mean_B))
    agree_KB = jnp.tile(scores_KB[:1], (4, 1))
    for rule in ("mean", "worst", "uwo"):
        np.testing.assert_allclose(registry.ENSEMBLE_RULES[rule](agree_KB, uwo_lambda=0.3), scores_KB[0], rtol=1e-6)


# --- Tiny random reward models, shared compiled functions -------------------------------------------------


@functools.lru_cache(maxsize=None)
def _members() -> tuple:
    return tuple({"backbone": models.init_params(CFG, jax.random.key(100 + k)),
                  "head": models.init_scalar_head(CFG, jax.random.key(200 + k), 0.5)} for k in range(K))


@functools.lru_cache(maxsize=None)
def _rollout() -> rollout.Rollout:
    prompts = jnp.asarray(np.random.default_rng(3).integers(1, 128, size=(4, 6)), jnp.int32)
    sample = rollout.generate(CFG, models.init_params(CFG, jax.random.key(0)), prompts, jnp.ones_like(prompts),
                              key=jax.random.key(0), max_new_tokens=8, eos_ids=tuple(range(3, 14)), num_samples=2)
    return jax.device_get(sample)


_single = jax.jit(functools.partial(objectives.reward_scores, CFG))
_score = jax.jit(functools.partial(ensemble.score, CFG))


def _separately(sample) -> np.ndarray:
    """Each member scored alone by the single-reward-model function: ``(K, B)``."""
    return np.stack([np.asarray(_single(m, sample.sequences_BT, sample.attention_mask_BT)) for m in _members()])


def test_vmapped_stacked_scoring_equals_each_member_alone():
    sample = _rollout()
    ens = ensemble.stack(_members(), rule="mean")
    assert ens.size == K and jax.tree.leaves(ens.params)[0].shape[0] == K
    combined_B, scores_KB = _score(ens, sample.sequences_BT, sample.attention_mask_BT)
    separate_KB = _separately(sample)
    assert np.std(separate_KB, axis=0).min() > 1e-3  # the members disagree, so mixing them up would show
    np.testing.assert_allclose(np.asarray(scores_KB), separate_KB, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(combined_B), separate_KB.mean(0), rtol=1e-5, atol=1e-5)


def test_single_reward_model_path_is_unchanged_and_one_member_ensemble_equals_it():
    sample = _rollout()
    single = _members()[0]
    ids, mask = sample.sequences_BT, sample.attention_mask_BT
    scores_B, members = _score(single, ids, mask)
    assert members is None  # a plain reward model: objectives.reward_scores itself, bitwise
    np.testing.assert_array_equal(np.asarray(scores_B), np.asarray(_single(single, ids, mask)))
    for rule in ("mean", "worst", "uwo"):
        one, one_KB = _score(ensemble.stack([single], rule=rule, uwo_lambda=0.5), ids, mask)
        assert one_KB.shape == (1, ids.shape[0])
        np.testing.assert_allclose(np.asarray(one), np.asarray(scores_B), rtol=1e-6, atol=1e-6)


def test_stacking_names_the_member_and_tensor_that_differ():
    other = models.ModelConfig.from_hf_config({**{"model_type": "llama", "vocab_size": 128, "hidden_size": 64,
                                                  "intermediate_size": 96, "num_hidden_layers": 2,
                                                  "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8,
                                                  "max_position_embeddings": 64, "rms_norm_eps": 1e-6}})
    odd = {"backbone": models.init_params(other, jax.random.key(1)), "head": _members()[1]["head"]}
    with pytest.raises(ValueError, match=r"member 1 .*mlp.* shape"):
        ensemble.stack([_members()[0], odd])
    with pytest.raises(ValueError, match="--ensemble-rule"):
        ensemble.stack(list(_members()), rule="median")


def _state(mesh, reward, reward_axes):
    frozen = {"reference": models.init_params(CFG, jax.random.key(0)), "reward": reward}
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=10))
    return create_train_state(lambda: {"policy": models.init_params(CFG, jax.random.key(0))}, optimizer, mesh,
                              DEFAULT_RULES, {"policy": AXES}, frozen_init_fn=lambda: frozen,
                              frozen_axes={"reference": AXES, "reward": reward_axes})


def test_rl_score_step_with_worst_case_rule_scores_the_min_over_members():
    """The RL score step (PPO / GRPO family) on a state whose frozen reward is a worst-case ensemble, placed with
    its members' parameters sharded over a 2-way fsdp mesh: scores = min over the members' own scores, and the
    spread metrics are the members' mean, std and per-member means."""
    sample = _rollout()
    mesh = make_mesh(MeshConfig(data=1, fsdp=2), jax.devices()[:2])
    ens = ensemble.stack(_members(), rule="worst")
    state = _state(mesh, ens, ensemble.logical_axes(RM_AXES, ens))
    assert isinstance(state.frozen["reward"], ensemble.RewardEnsemble)
    B = sample.sequences_BT.shape[0]
    score = make_score_step(CFG, CFG, shardings_of(state), mesh, DEFAULT_RULES, algo=algorithms.PRESETS["rloo"],
                            rm_weight=1.0, missing_eos_penalty=None)
    batch, metrics = score(state, sample, jnp.float32(0.0), *shard_batch((np.zeros(B, np.float32),), mesh,
                                                                         DEFAULT_RULES))
    separate_KB = _separately(sample)
    assert (separate_KB.argmin(0) != separate_KB.argmin(0)[0]).any()  # different members are the worst on some rows
    np.testing.assert_allclose(np.asarray(batch.scores_B), separate_KB.min(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["rollout/rm_score"].mean()), separate_KB.min(0).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rollout/rm_ensemble_mean"].mean()), separate_KB.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rollout/rm_ensemble_std"].mean()), separate_KB.std(0).mean(), rtol=1e-5)
    for k in range(K):
        np.testing.assert_allclose(float(metrics[f"rollout/rm_member{k}"].mean()), separate_KB[k].mean(), rtol=1e-5)


def test_separate_critic_starts_from_the_first_member():
    ens = ensemble.stack(_members())
    params, axes = ensemble.member(ens, 0, ensemble.logical_axes(RM_AXES, ens))
    assert axes == RM_AXES
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(_members()[0])):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert ensemble.member(_members()[1], 0, RM_AXES) == (_members()[1], RM_AXES)  # a single model passes through


def test_best_of_n_picks_the_argmax_of_the_combined_score():
    """evaluation.rm_scores (what best_of_n.py ranks samples by) gives the ensemble's combined score, and the
    chosen sample of every prompt is the argmax of the rule applied to the members' separate scores."""
    sample = _rollout()
    n = 2  # the rollout holds 2 samples of each of 4 prompts, rows prompt-major
    separate_KB = _separately(sample)
    for rule, lam in (("worst", 0.0), ("uwo", 1.0), ("mean", 0.0)):
        reward = evaluation.RewardModel(CFG, ensemble.stack(_members(), rule=rule, uwo_lambda=lam))
        scores = evaluation.rm_scores(reward.cfg, reward.params, [sample])
        want = _numpy_rule(rule, separate_KB, lam)
        np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(best_of_n.best_of_n(scores.reshape(-1, n))),
                                      want.reshape(-1, n).argmax(-1))
        np.testing.assert_allclose(evaluation.rm_member_scores(reward.cfg, reward.params, [sample]), separate_KB,
                                   rtol=1e-5, atol=1e-5)
    # the rules disagree on which sample is best somewhere, so a rule that was ignored would show
    picks = {rule: _numpy_rule(rule, separate_KB, 1.0).reshape(-1, n).argmax(-1).tolist() for rule in ("mean", "worst",
                                                                                                       "uwo")}
    assert len({tuple(p) for p in picks.values()}) > 1, picks


def test_load_members_from_disk_and_refuse_a_mismatch(tmp_path):
    """Reward models saved as reward_model.py saves them load as one ensemble (evaluation.load_reward_model with a
    list of folders); a member of another architecture is refused, naming it."""
    from rlhf_jax import model_io
    from rlhf_jax.cli import ModelArgs
    from rlhf_jax.data import embedded

    tokenizer = models.load_tokenizer(embedded.embedded_dir())
    small = dict(model_type="llama", vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    cfg = models.ModelConfig.from_hf_config(small)
    paths = []
    for k in range(2):
        rm = {"backbone": models.init_params(cfg, jax.random.key(k)),
              "head": models.init_scalar_head(cfg, jax.random.key(9 + k), 0.5)}
        paths.append(str(model_io.save_reward_model(tmp_path / f"rm{k}", cfg, rm, tokenizer)))
    reward = evaluation.load_reward_model(paths, ModelArgs(), tokenizer, rule="uwo", uwo_lambda=0.25)
    assert isinstance(reward.params, ensemble.RewardEnsemble) and reward.params.size == 2
    assert (reward.params.rule, reward.params.uwo_lambda) == ("uwo", 0.25)
    for k, path in enumerate(paths):
        _, alone, _ = model_io.load_reward_model(path)
        for got, want in zip(jax.tree.leaves(ensemble.member(reward.params, k)[0]), jax.tree.leaves(alone)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    single = evaluation.load_reward_model(paths[0], ModelArgs(), tokenizer)  # one path: the plain reward model
    assert isinstance(single.params, dict)
    wider = models.ModelConfig.from_hf_config({**small, "intermediate_size": 96})
    rm = {"backbone": models.init_params(wider, jax.random.key(5)),
          "head": models.init_scalar_head(wider, jax.random.key(6))}
    odd = str(model_io.save_reward_model(tmp_path / "odd", wider, rm, tokenizer))
    with pytest.raises(ValueError, match="odd is another architecture"):
        ensemble.load([paths[0], odd], ModelArgs())
