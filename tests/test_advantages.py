"""Per-token rewards, GAE, whitening, RLOO and GRPO against plain Python loops."""
import chex
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from rlhf_jax import advantages

RNG = np.random.default_rng(6)
B, T = 4, 7
# right padding, left offset, full row, empty row
MASK = np.array(
    [[1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]], np.float32
)
REWARDS = RNG.normal(size=(B, T)).astype(np.float32)
VALUES = RNG.normal(size=(B, T)).astype(np.float32)

gae_jit = jax.jit(advantages.gae, static_argnames=("gamma", "lam"))


def _gae_loop(rewards, values, mask, gamma, lam):
    """Schulman et al. 2016 eq. 16, a backward loop over each row's response tokens; V = A = 0 after the end."""
    adv = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        last_adv, next_value = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last_adv = delta + gamma * lam * last_adv
            adv[b, t] = last_adv
            next_value = values[b, t]
    return adv, np.where(mask > 0, adv + values, 0.0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
def test_gae_matches_backward_loop(gamma, lam):
    adv, ret = gae_jit(REWARDS, VALUES, MASK, gamma=gamma, lam=lam)
    want_adv, want_ret = _gae_loop(REWARDS, VALUES, MASK, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[MASK == 0] == 0) and np.all(np.asarray(ret)[MASK == 0] == 0)


def test_gae_lambda_one_gamma_one_gives_reward_to_go_minus_value():
    adv, ret = gae_jit(REWARDS, VALUES, MASK, gamma=1.0, lam=1.0)
    for b in range(B):
        for t in range(T):
            if MASK[b, t]:
                to_go = sum(REWARDS[b, s] for s in range(t, T) if MASK[b, s])
                np.testing.assert_allclose(ret[b, t], to_go, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(adv[b, t], to_go - VALUES[b, t], rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    pad_rewards=arrays(np.float32, (B, 3), elements=st.floats(-1e3, 1e3, width=32)),
    pad_values=arrays(np.float32, (B, 3), elements=st.floats(-1e3, 1e3, width=32)),
)
def test_gae_ignores_padding_content_and_amount(pad_rewards, pad_values):
    adv, ret = gae_jit(REWARDS, VALUES, MASK, gamma=0.99, lam=0.95)
    cat = lambda x, y: np.concatenate([x, y], axis=1)  # noqa: E731
    adv_p, ret_p = gae_jit(cat(REWARDS, pad_rewards), cat(VALUES, pad_values), cat(MASK, np.zeros((B, 3), np.float32)), gamma=0.99, lam=0.95)
    np.testing.assert_allclose(adv_p[:, :T], adv, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ret_p[:, :T], ret, rtol=1e-6, atol=1e-6)


def test_per_token_rewards_matches_loop():
    scores = np.array([1.5, -0.5, 2.0, 3.0], np.float32)
    kl_bt = RNG.normal(size=(B, T)).astype(np.float32)
    has_eos = np.array([True, False, True, True])
    for penalty in (None, -1.0):
        got = advantages.per_token_rewards(scores, kl_bt, MASK, kl_coef=0.1, missing_eos_penalty=penalty, has_eos_B=has_eos)
        want = np.zeros((B, T))
        for b in range(B):
            idx = [t for t in range(T) if MASK[b, t]]
            for t in idx:
                want[b, t] = -0.1 * kl_bt[b, t]
            if idx:
                want[b, idx[-1]] += scores[b] if (penalty is None or has_eos[b]) else penalty
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="has_eos_B"):
        advantages.per_token_rewards(scores, kl_bt, MASK, kl_coef=0.1, missing_eos_penalty=-1.0)


def test_whiten_advantages_over_mask():
    w = np.asarray(advantages.whiten_advantages(REWARDS, MASK))
    vals = w[MASK > 0]
    assert abs(vals.mean()) < 1e-5 and abs(vals.std() - 1) < 1e-4 and np.all(w[MASK == 0] == 0)


SCORES = RNG.normal(size=(3, 5)).astype(np.float32)


def test_rloo_leave_one_out_loop():
    got = advantages.rloo(SCORES)
    for b in range(3):
        for i in range(5):
            others = [SCORES[b, j] for j in range(5) if j != i]
            np.testing.assert_allclose(got[b, i], SCORES[b, i] - sum(others) / 4, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        advantages.rloo(SCORES[:, :1])


def test_grpo_group_normalisation_loop():
    got = advantages.grpo(SCORES)
    got_unscaled = advantages.grpo(SCORES, scale=False)
    for b in range(3):
        row = [float(s) for s in SCORES[b]]
        mean = sum(row) / 5
        std = (sum((s - mean) ** 2 for s in row) / 4) ** 0.5
        for i in range(5):
            np.testing.assert_allclose(got[b, i], (row[i] - mean) / (std + 1e-6), rtol=1e-5)
            np.testing.assert_allclose(got_unscaled[b, i], row[i] - mean, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(advantages.grpo(np.ones((2, 4), np.float32))) == 0.0)


def test_reward_gain_bias_normalises_reference_set():
    ref = RNG.normal(3.0, 2.5, size=256).astype(np.float32)
    gain, bias = advantages.reward_gain_bias(ref)
    normed = np.asarray(advantages.normalize_scores(ref, gain, bias))
    assert abs(normed.mean()) < 1e-5 and abs(normed.std() - 1) < 1e-5
    gain, bias = advantages.reward_gain_bias(ref, target_mean=1.0, target_std=0.5)
    normed = np.asarray(advantages.normalize_scores(ref, gain, bias))
    assert abs(normed.mean() - 1) < 1e-5 and abs(normed.std() - 0.5) < 1e-5


def test_running_moments_equal_moments_of_concatenation():
    batches = [RNG.normal(2, 3, size=n).astype(np.float32) for n in (5, 1, 17, 8)]
    mask_last = (RNG.uniform(size=8) > 0.4).astype(np.float32)
    state = advantages.RunningMoments.create()
    for i, x in enumerate(batches):
        state = state.update(x, mask_last if i == 3 else None)
    seen = np.concatenate(batches[:3] + [batches[3][mask_last > 0]])
    np.testing.assert_allclose(state.mean, seen.mean(), rtol=1e-5)
    np.testing.assert_allclose(state.var, seen.var(), rtol=1e-5)
    assert float(state.count) == seen.size
    np.testing.assert_allclose(state.whiten(seen), (seen - seen.mean()) / np.sqrt(seen.var() + 1e-8), rtol=1e-4, atol=1e-5)


class JitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_equals_no_jit(self):
        fn = self.variant(lambda r, v, m, s: (advantages.gae(r, v, m, gamma=0.99, lam=0.95), advantages.rloo(s), advantages.grpo(s)))
        (adv, ret), rl, gr = fn(REWARDS, VALUES, MASK, SCORES)
        want_adv, want_ret = _gae_loop(REWARDS, VALUES, MASK, 0.99, 0.95)
        np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(rl, advantages.rloo(SCORES), rtol=1e-6)
        np.testing.assert_allclose(gr, advantages.grpo(SCORES), rtol=1e-6)
