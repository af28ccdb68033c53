"""Reward over-optimisation measured as Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization") measure it.

A policy is placed by its distance from the initial policy, ``d = sqrt(KL(π ‖ π_init))``, and scored by
the gold reward and by the proxy (the learned reward model) relative to the initial policy,
``R(d) = E_π[r] − E_π_init[r]``. Gao et al. fit, for best-of-n and for RL,

    R_bon(d) = d (α_bon − β_bon d)                                        (eq. 1)
    R_rl(d)  = d (α_rl − β_rl log d)                                      (eq. 2)

Best-of-n's KL is analytic, ``KL_bon(n) = log n − (n − 1)/n`` (:func:`rlhf_jax.best_of_n.best_of_n_kl`), and
its expected scores for every n ≤ N come from N samples per prompt without resampling: the sample of
proxy rank i (1 = lowest) among N is the best of a uniformly drawn n-subset with probability
C(i − 1, n − 1) / C(N, n) (the unbiased estimator Gao et al. use, their appendix).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from rlhf_jax.best_of_n import best_of_n_kl

FORMS = ("bon", "rl")


def gao_bon(d: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """R_bon(d) = d (α − β d) (Gao et al. 2022, eq. 1)."""
    d = np.asarray(d, np.float64)
    return d * (alpha - beta * d)


def gao_rl(d: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """R_rl(d) = d (α − β log d) (Gao et al. 2022, eq. 2); R_rl(0) = 0."""
    d = np.asarray(d, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, d * (alpha - beta * np.log(np.where(d > 0, d, 1.0))), 0.0)


def gao_curve(form: str, d: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return gao_bon(d, alpha, beta) if form == "bon" else gao_rl(d, alpha, beta)


def fit_gao(d: Sequence[float], r: Sequence[float], form: str) -> dict[str, float]:
    """Least-squares (α, β) of :func:`gao_bon` / :func:`gao_rl` through points ``(d, R)``.

    Both forms are linear in (α, β): R = α·d − β·d² (bon) or R = α·d − β·d·log d (rl), so the fit is
    ``lstsq`` on those two features; points with d = 0 carry no information (R(0) = 0 by construction)
    and are left out. Returns ``{alpha, beta, form, points, rmse}``; α, β are None with fewer than 2 points."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    d_arr, r_arr = np.asarray(d, np.float64), np.asarray(r, np.float64)
    keep = (d_arr > 0) & np.isfinite(r_arr) & np.isfinite(d_arr)
    d_arr, r_arr = d_arr[keep], r_arr[keep]
    if d_arr.size < 2:
        return {"alpha": None, "beta": None, "form": form, "points": int(d_arr.size), "rmse": None}
    second = d_arr ** 2 if form == "bon" else d_arr * np.log(d_arr)
    features = np.stack([d_arr, -second], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(features, r_arr, rcond=None)
    rmse = float(np.sqrt(np.mean((features @ np.array([alpha, beta]) - r_arr) ** 2)))
    return {"alpha": float(alpha), "beta": float(beta), "form": form, "points": int(d_arr.size), "rmse": rmse}


def best_of_subset_weights(num_samples: int, n: int) -> np.ndarray:
    """``w_i = C(i − 1, n − 1) / C(N, n)`` for proxy ranks i = 1..N (ascending): the probability that the
    sample of rank i is the best of a uniformly drawn n-subset of the N samples. Sums to 1."""
    if not 1 <= n <= num_samples:
        raise ValueError(f"need 1 <= n <= N, got n={n}, N={num_samples}")
    # log-space binomials: N up to thousands without overflow
    i = np.arange(1, num_samples + 1)
    log_w = np.full(num_samples, -np.inf)
    ok = i >= n
    lg = np.vectorize(math.lgamma)
    log_w[ok] = (lg(i[ok]) - lg(n) - lg(i[ok] - n + 1)) - (math.lgamma(num_samples + 1) - math.lgamma(n + 1)
                                                              - math.lgamma(num_samples - n + 1))
    return np.exp(log_w)


def best_of_n_expectation(proxy_PN: np.ndarray, values_PN: np.ndarray, n: int) -> np.ndarray:
    """Per prompt, the expected ``values`` of the best-by-``proxy`` of n of the N samples (unbiased; ties in
    the proxy broken by sample order, as ``argmax`` does)."""
    proxy_PN, values_PN = np.asarray(proxy_PN, np.float64), np.asarray(values_PN, np.float64)
    if proxy_PN.shape != values_PN.shape or proxy_PN.ndim != 2:
        raise ValueError(f"proxy and values must both be (prompts, N); got {proxy_PN.shape} and {values_PN.shape}")
    # ascending by proxy; among equal proxies the earlier sample ranks higher (argmax takes the first)
    order = np.lexsort((-np.arange(proxy_PN.shape[1])[None, :].repeat(proxy_PN.shape[0], 0), proxy_PN), axis=1)
    sorted_values = np.take_along_axis(values_PN, order, axis=1)
    return sorted_values @ best_of_subset_weights(proxy_PN.shape[1], n)


def best_of_n_curve(proxy_PN: np.ndarray, gold_PN: np.ndarray | None, ns: Iterable[int]) -> list[dict[str, float]]:
    """Best-of-n for each n in ``ns`` from N samples per prompt: ``{n, kl (analytic), d, proxy, gold}`` where
    proxy and gold are relative to the samples' own mean (n = 1, the initial policy), as R(d) is."""
    proxy_PN = np.asarray(proxy_PN, np.float64)
    base_proxy = proxy_PN.mean()
    base_gold = None if gold_PN is None else np.asarray(gold_PN, np.float64).mean()
    rows = []
    for n in ns:
        kl = best_of_n_kl(n)
        row = {"n": int(n), "kl": kl, "d": math.sqrt(kl),
               "proxy": float(best_of_n_expectation(proxy_PN, proxy_PN, n).mean() - base_proxy)}
        if gold_PN is not None:
            row["gold"] = float(best_of_n_expectation(proxy_PN, gold_PN, n).mean() - base_gold)
        rows.append(row)
    return rows


def monte_carlo_best_of_n_kl(probs_K: np.ndarray, scores_K: np.ndarray, n: int, num_draws: int,
                             rng: np.random.Generator) -> tuple[float, float]:
    """``(mean, standard error)`` of a Monte-Carlo estimate of KL(π_bon ‖ π) for a categorical π over K
    outcomes with distinct scores: draw the best of n samples of π ``num_draws`` times and average
    ``log π_bon(y) − log π(y)``, with π_bon(y) = F(y)^n − F(y⁻)^n exactly (F the CDF of π's scores)."""
    probs_K, scores_K = np.asarray(probs_K, np.float64), np.asarray(scores_K, np.float64)
    if len(np.unique(scores_K)) != len(scores_K):
        raise ValueError("scores must be distinct (the order of outcomes must be strict)")
    order = np.argsort(scores_K)
    cdf = np.cumsum(probs_K[order])
    below = np.concatenate([[0.0], cdf[:-1]])
    pbon_sorted = cdf ** n - below ** n
    pbon = np.empty_like(pbon_sorted)
    pbon[order] = pbon_sorted
    draws = rng.choice(len(probs_K), size=(num_draws, n), p=probs_K)
    best = draws[np.arange(num_draws), np.argmax(scores_K[draws], axis=1)]
    log_ratio = np.log(pbon[best]) - np.log(probs_K[best])
    return float(log_ratio.mean()), float(log_ratio.std(ddof=1) / math.sqrt(num_draws))


def curve_from_metrics(metrics: Iterable[Mapping[str, Any]]) -> list[dict[str, float]]:
    """The held-out evaluations of a training run (``metrics.jsonl`` rows with ``eval/kl``) as curve points
    ``{step, kl, d, proxy, gold}``: proxy = RM score − the reference's, gold = gold − the reference's (each
    present when logged), the initial policy at ``(0, 0)``."""
    points = [{"step": 0, "kl": 0.0, "d": 0.0, "proxy": 0.0, "gold": 0.0}]
    for m in metrics:
        if "eval/kl" not in m:
            continue
        kl = max(float(m["eval/kl"]), 0.0)  # a Monte-Carlo KL can dip below 0 near the start
        p = {"step": int(m.get("step", 0)), "kl": kl, "d": math.sqrt(kl)}
        if "eval/rm_score" in m and "eval/ref_rm_score" in m:
            p["proxy"] = float(m["eval/rm_score"]) - float(m["eval/ref_rm_score"])
        if "eval/gold" in m and "eval/ref_gold" in m:
            p["gold"] = float(m["eval/gold"]) - float(m["eval/ref_gold"])
        points.append(p)
    return points


def peak(points: Sequence[Mapping[str, float]], key: str) -> dict[str, float] | None:
    """The point where ``key`` is highest (the first of equal ones), or None without that key."""
    have = [p for p in points if key in p]
    return max(have, key=lambda p: p[key]) if have else None


def summarise(points: Sequence[Mapping[str, float]], form: str) -> dict[str, Any]:
    """Fits of gold and proxy, their peaks and the last point: what results.json keeps per method."""
    out: dict[str, Any] = {"points": list(points), "form": form}
    for key in ("gold", "proxy"):
        have = [p for p in points if key in p]
        if not have:
            continue
        out[f"fit_{key}"] = fit_gao([p["d"] for p in have], [p[key] for p in have], form)
        out[f"peak_{key}"] = peak(have, key)
        out[f"final_{key}"] = have[-1][key]
    return out
