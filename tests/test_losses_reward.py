"""Reward-model losses: Bradley–Terry variants and InstructGPT K-way rankings, against NumPy loops."""
import math

import chex
import jax
import numpy as np
import pytest

from rlhf_jax import losses
from rlhf_jax.metrics import to_floats

RNG = np.random.default_rng(2)
B = 6
CHOSEN = RNG.normal(size=B).astype(np.float32) * 2
REJECTED = RNG.normal(size=B).astype(np.float32) * 2
MARGIN = RNG.uniform(0, 1, size=B).astype(np.float32)
WEIGHTS = np.array([1, 1, 0, 2, 1, 0.5], np.float32)

pairwise = jax.jit(losses.pairwise_reward_loss, static_argnames=("label_smoothing", "center_coef"))
ranking = jax.jit(losses.ranking_reward_loss)


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _pairwise_oracle(c, r, m, eps, eta, w):
    num = den = 0.0
    for i in range(len(c)):
        d = c[i] - r[i] - m[i]
        ell = -(1 - eps) * _log_sigmoid(d) - eps * _log_sigmoid(-d) + eta * (c[i] + r[i]) ** 2
        num += w[i] * ell
        den += w[i]
    return num / den


@pytest.mark.parametrize(
    "use_margin,eps,eta,use_weights",
    [(False, 0.0, 0.0, False), (True, 0.0, 0.0, False), (False, 0.1, 0.0, False), (True, 0.05, 0.01, True)],
)
def test_pairwise_loss_matches_loop(use_margin, eps, eta, use_weights):
    margin = MARGIN if use_margin else np.zeros(B, np.float32)
    weights = WEIGHTS if use_weights else np.ones(B, np.float32)
    loss, metrics = pairwise(
        CHOSEN, REJECTED, margin_B=margin if use_margin else None, label_smoothing=eps, center_coef=eta,
        weights_B=weights if use_weights else None,
    )
    np.testing.assert_allclose(loss, _pairwise_oracle(CHOSEN, REJECTED, margin, eps, eta, weights), rtol=1e-5)
    m = to_floats(metrics)
    acc = sum(w * (c > r) for c, r, w in zip(CHOSEN, REJECTED, weights)) / weights.sum()
    gap = sum(w * (c - r) for c, r, w in zip(CHOSEN, REJECTED, weights)) / weights.sum()
    np.testing.assert_allclose(m["rm/accuracy"], acc, rtol=1e-6)
    np.testing.assert_allclose(m["rm/margin"], gap, rtol=1e-5)


def test_plain_bt_loss_is_log2_at_equal_rewards_and_gradient_is_sigmoid():
    r = np.zeros(B, np.float32)
    np.testing.assert_allclose(pairwise(r, r)[0], math.log(2), rtol=1e-6)
    grad_c = jax.grad(lambda c: pairwise(c, REJECTED)[0])(CHOSEN)
    want = [-(1 / (1 + math.exp(c - r))) / B for c, r in zip(CHOSEN, REJECTED)]  # d/dc −log σ(c−r) = −σ(r−c)
    np.testing.assert_allclose(grad_c, want, rtol=1e-5)


def test_ranking_to_pairs():
    assert losses.ranking_to_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    pairs = losses.ranking_to_pairs([3, 1, 4, 0, 2])
    assert len(pairs) == 10 and len(set(pairs)) == 10
    order = [3, 1, 4, 0, 2]
    assert all(order.index(w) < order.index(l) for w, l in pairs)
    with pytest.raises(ValueError):
        losses.ranking_to_pairs([1, 1, 0])
    np.testing.assert_array_equal(losses.ranks_from_ranking([2, 0], 4), [1, -1, 0, -1])


def test_ranking_loss_matches_instructgpt_eq1_loop():
    """Rankings of K = 4, 4, 3 and 2 responses (unfilled slots rank −1); loss averages pairs per prompt."""
    K = 4
    rankings = [[1, 3, 0, 2], [0, 1, 2, 3], [2, 0, 3], [3, 1]]
    rewards = RNG.normal(size=(len(rankings), K)).astype(np.float32)
    ranks = np.stack([losses.ranks_from_ranking(rk, K) for rk in rankings])
    loss, metrics = ranking(rewards, ranks)

    per_prompt, all_pairs = [], []
    for b, rk in enumerate(rankings):
        pairs = losses.ranking_to_pairs(rk)
        assert len(pairs) == math.comb(len(rk), 2)
        per_prompt.append(-sum(_log_sigmoid(rewards[b, w] - rewards[b, l]) for w, l in pairs) / math.comb(len(rk), 2))
        all_pairs += [rewards[b, w] - rewards[b, l] for w, l in pairs]
    np.testing.assert_allclose(loss, np.mean(per_prompt), rtol=1e-5)
    m = to_floats(metrics)
    np.testing.assert_allclose(m["rm/accuracy"], np.mean([d > 0 for d in all_pairs]), rtol=1e-6)
    np.testing.assert_allclose(m["rm/margin"], np.mean(all_pairs), rtol=1e-5)


def test_ranking_loss_with_k2_equals_pairwise_loss():
    ranks = np.tile(np.array([[0, 1]]), (B, 1))
    np.testing.assert_allclose(ranking(np.stack([CHOSEN, REJECTED], 1), ranks)[0], pairwise(CHOSEN, REJECTED)[0], rtol=1e-6)


def test_ranking_loss_ignores_padding_slots_and_rows():
    rewards = RNG.normal(size=(2, 3)).astype(np.float32)
    ranks = np.array([[1, 0, 2], [0, 2, 1]])
    base = float(ranking(rewards, ranks)[0])
    rewards_pad = np.concatenate([np.concatenate([rewards, 9e3 * np.ones((2, 2), np.float32)], 1), np.ones((1, 5), np.float32)])
    ranks_pad = np.concatenate([np.concatenate([ranks, -np.ones((2, 2), int)], 1), -np.ones((1, 5), int)])
    np.testing.assert_allclose(float(ranking(rewards_pad, ranks_pad)[0]), base, rtol=1e-6)


class JitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_equals_no_jit(self):
        fn = self.variant(lambda c, r, m: losses.pairwise_reward_loss(c, r, margin_B=m, label_smoothing=0.1)[0])
        np.testing.assert_allclose(fn(CHOSEN, REJECTED, MARGIN), _pairwise_oracle(CHOSEN, REJECTED, MARGIN, 0.1, 0.0, np.ones(B)), rtol=1e-5)
