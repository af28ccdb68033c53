"""Best-of-n selection and its KL formula against the exact best-of-n distribution."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import best_of_n as bon


def test_best_of_n_picks_argmax_and_gathers_every_leaf():
    scores = np.array([[0.1, 2.0, -1.0], [5.0, 4.0, 3.0], [0.0, 0.0, 1.0]], np.float32)
    idx = bon.best_of_n(scores)
    np.testing.assert_array_equal(idx, [1, 0, 2])
    tokens_BNT = np.arange(3 * 3 * 4).reshape(3, 3, 4)
    picked = bon.gather_best({"tokens": tokens_BNT, "scores": scores}, idx)
    for b in range(3):
        np.testing.assert_array_equal(picked["tokens"][b], tokens_BNT[b, idx[b]])
        assert picked["scores"][b] == scores[b].max()


def _exact_bon_kl(probs_sorted_by_reward, n):
    """KL(π_bon‖π) for outputs with distinct rewards: π_bon(y_i) = F(y_i)^n − F(y_{i−1})^n."""
    cdf = np.cumsum(probs_sorted_by_reward)
    prev = np.concatenate([[0.0], cdf[:-1]])
    p_bon = cdf**n - prev**n
    keep = p_bon > 0
    return float(np.sum(p_bon[keep] * np.log(p_bon[keep] / probs_sorted_by_reward[keep])))


@pytest.mark.parametrize("n", [1, 2, 4, 16, 64])
def test_best_of_n_kl_matches_continuous_limit_and_bounds_discrete(n):
    formula = bon.best_of_n_kl(n)
    np.testing.assert_allclose(formula, math.log(n) - (n - 1) / n)
    fine = np.full(200_000, 1 / 200_000)
    np.testing.assert_allclose(_exact_bon_kl(fine, n), formula, atol=2e-3)
    coarse = np.random.default_rng(n).dirichlet(np.ones(6))
    assert _exact_bon_kl(coarse, n) <= formula + 1e-9
    if n > 1:
        assert _exact_bon_kl(coarse, n) < formula - 1e-3  # strictly below for a coarse discrete distribution
    with pytest.raises(ValueError):
        bon.best_of_n_kl(0)


def test_best_of_n_first_index_on_ties():
    assert int(bon.best_of_n(jnp.array([[1.0, 3.0, 3.0]]))[0]) == 1
