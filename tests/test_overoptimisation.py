"""Over-optimisation curves (rlhf_jax.overoptimisation) against brute force and published forms."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from rlhf_jax import overoptimisation as oo
from rlhf_jax.best_of_n import best_of_n_kl


@pytest.mark.parametrize("num_samples, n", [(6, 1), (6, 3), (6, 6), (7, 2)])
def test_best_of_n_expectation_equals_every_subset(num_samples, n):
    """The unbiased estimator equals the mean over all C(N, n) subsets of the argmax-proxy's value (with ties)."""
    rng = np.random.default_rng(num_samples * 10 + n)
    proxy = rng.integers(0, 4, size=(3, num_samples)).astype(float)  # many ties
    values = rng.normal(size=(3, num_samples))
    brute = np.zeros(3)
    subsets = list(itertools.combinations(range(num_samples), n))
    for p in range(3):
        for s in subsets:
            s = list(s)
            brute[p] += values[p, s[int(np.argmax(proxy[p, s]))]]
    brute /= len(subsets)
    np.testing.assert_allclose(oo.best_of_n_expectation(proxy, values, n), brute, atol=1e-12)
    assert oo.best_of_subset_weights(num_samples, n).sum() == pytest.approx(1.0)


def test_fit_recovers_the_published_forms():
    d = np.linspace(0.1, 4.0, 25)
    for form, alpha, beta in (("bon", 1.3, 0.4), ("rl", 0.9, 0.35)):
        r = oo.gao_curve(form, d, alpha, beta)
        fit = oo.fit_gao(d, r, form)
        assert fit["alpha"] == pytest.approx(alpha, abs=1e-9) and fit["beta"] == pytest.approx(beta, abs=1e-9)
        noisy = oo.fit_gao(d, r + np.random.default_rng(0).normal(0, 0.01, d.size), form)
        assert noisy["alpha"] == pytest.approx(alpha, abs=0.05) and noisy["rmse"] < 0.02
    # the other form does not fit: its residual is far larger
    assert oo.fit_gao(d, oo.gao_rl(d, 0.9, 0.35), "bon")["rmse"] > 100 * oo.fit_gao(d, oo.gao_rl(d, 0.9, 0.35), "rl")["rmse"]
    assert oo.fit_gao([0.0, 1.0], [0.0, 0.5], "bon")["alpha"] is None  # one informative point
    assert oo.gao_rl(np.array([0.0]), 1.0, 1.0)[0] == 0.0


@pytest.mark.parametrize("n", [2, 4, 16, 64])
def test_the_best_of_n_kl_axis_matches_monte_carlo(n):
    """The curve's KL axis, log n − (n − 1)/n, lies within 3 standard errors of the Monte-Carlo KL of sampled
    best-of-n draws (a categorical policy over 4000 outcomes with distinct scores, so almost continuous)."""
    rng = np.random.default_rng(n)
    probs = rng.dirichlet(np.full(4000, 5.0))
    scores = rng.permutation(4000).astype(float)
    mc, se = oo.monte_carlo_best_of_n_kl(probs, scores, n, 40_000, rng)
    curve = oo.best_of_n_curve(rng.normal(size=(2, 64)), None, [n])
    assert curve[0]["kl"] == pytest.approx(math.log(n) - (n - 1) / n) == pytest.approx(best_of_n_kl(n))
    assert curve[0]["d"] == pytest.approx(math.sqrt(curve[0]["kl"]))
    assert abs(mc - curve[0]["kl"]) < 3 * se, (mc, se, curve[0]["kl"])
    assert se < 0.02  # the check has teeth: a wrong axis (e.g. log n) is many SE away for n >= 4
    if n >= 4:
        assert abs(mc - math.log(n)) > 10 * se


def test_best_of_n_curve_starts_at_zero_and_rises_with_a_perfect_proxy():
    rng = np.random.default_rng(1)
    gold = rng.normal(size=(50, 32))
    rows = oo.best_of_n_curve(gold, gold, [1, 2, 4, 8, 16, 32])
    assert rows[0]["kl"] == 0.0 and rows[0]["gold"] == pytest.approx(0.0, abs=1e-12)
    golds = [r["gold"] for r in rows]
    assert all(b > a for a, b in zip(golds, golds[1:]))
    assert rows[-1]["gold"] == pytest.approx(float(gold.max(1).mean() - gold.mean()))


def test_curve_points_from_logged_evaluations():
    metrics = [{"step": 5, "rollout/kl": 1.0}, {"step": 5, "eval/kl": 0.25, "eval/gold": 1.5, "eval/ref_gold": 1.0,
                                                 "eval/rm_score": 0.7, "eval/ref_rm_score": 0.2},
               {"step": 10, "eval/kl": -0.01, "eval/gold": 1.2, "eval/ref_gold": 1.0}]
    points = oo.curve_from_metrics(metrics)
    assert points[0] == {"step": 0, "kl": 0.0, "d": 0.0, "proxy": 0.0, "gold": 0.0}
    assert points[1] == pytest.approx({"step": 5, "kl": 0.25, "d": 0.5, "proxy": 0.5, "gold": 0.5})
    assert points[2]["kl"] == 0.0 and "proxy" not in points[2]
    summary = oo.summarise(points, "rl")
    assert summary["peak_gold"]["step"] == 5 and summary["final_gold"] == pytest.approx(0.2)
