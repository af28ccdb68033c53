"""Rollout engine: sampling filters against NumPy loops, greedy decoding against transformers'
``generate``, sampling log-probs against a fresh full forward pass, EOS handling, keys, meshes."""
from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from rlhf_jax import rollout


# ----------------------------------------------------------------------------- filters vs NumPy loops


def ref_top_k(logits_BV: np.ndarray, k: int) -> np.ndarray:
    """Sort each row; every logit below the k-th largest becomes -inf."""
    out = logits_BV.copy()
    for b, row in enumerate(logits_BV):
        kth = sorted(row.tolist(), reverse=True)[k - 1]
        for v, x in enumerate(row):
            if x < kth:
                out[b, v] = -np.inf
    return out


def ref_top_p(logits_BV: np.ndarray, p: float) -> np.ndarray:
    """Walk each row from the most probable token, adding probabilities (float64) until the total
    reaches p; keep every token at least as probable as the last one added."""
    out = logits_BV.copy()
    for b, row in enumerate(logits_BV.astype(np.float64)):
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        total, last = 0.0, None
        for v in sorted(range(len(row)), key=lambda v: -probs[v]):
            total += probs[v]
            last = probs[v]
            if total >= p:
                break
        for v in range(len(row)):
            if probs[v] < last:
                out[b, v] = -np.inf
    return out


def _random_logits(rng, shape, *, ties: bool) -> np.ndarray:
    if ties:  # few distinct values: many exact ties, also at the filter boundary
        return rng.integers(-3, 3, size=shape).astype(np.float32)
    return (2.0 * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("ties", [False, True])
def test_top_k_matches_numpy_reference(ties):
    rng = np.random.default_rng(0)
    for k in [1, 2, 5, 31, 32]:
        logits = _random_logits(rng, (6, 32), ties=ties)
        got = np.asarray(rollout.top_k_filter(jnp.asarray(logits), k))
        np.testing.assert_array_equal(got, ref_top_k(logits, k))
        assert (np.isfinite(got).sum(axis=1) >= k).all()


@pytest.mark.parametrize("ties", [False, True])
def test_top_p_matches_numpy_reference(ties):
    rng = np.random.default_rng(1)
    for p in [1e-6, 0.1, 0.5, 0.9, 0.99, *rng.uniform(0.05, 0.95, size=5)]:
        logits = _random_logits(rng, (6, 32), ties=ties)
        got = np.asarray(rollout.top_p_filter(jnp.asarray(logits), float(p)))
        np.testing.assert_array_equal(got, ref_top_p(logits, p))
        assert (np.isfinite(got).sum(axis=1) >= 1).all()


def test_top_p_edge_cases():
    # probabilities 0.4, 0.3, 0.2, 0.1 (and a -inf token that is never kept)
    logits = np.array([[np.log(0.1), np.log(0.4), np.log(0.2), np.log(0.3), -np.inf]], np.float32)
    kept = lambda p: np.isfinite(np.asarray(rollout.top_p_filter(jnp.asarray(logits), p)))[0].tolist()
    assert kept(1e-9) == [False, True, False, False, False]  # always at least the top token
    assert kept(0.4 - 1e-4) == [False, True, False, False, False]
    assert kept(0.4 + 1e-4) == [False, True, False, True, False]  # smallest set reaching p
    assert kept(0.9 + 1e-4) == [True, True, True, True, False]
    # a tie at the boundary keeps every tied token, whatever the sort order
    tied = np.log(np.array([[0.2, 0.4, 0.2, 0.2]], np.float32))
    assert np.isfinite(np.asarray(rollout.top_p_filter(jnp.asarray(tied), 0.5))).all()
    # uniform row: everything is tied with the top token
    assert np.isfinite(np.asarray(rollout.top_p_filter(jnp.zeros((1, 7)), 1e-6))).all()
    # p = 1 and k >= V switch the filters off
    rng = np.random.default_rng(2)
    x = _random_logits(rng, (3, 32), ties=False)
    out = rollout.sampling_logits(jnp.asarray(x), temperature=1.0, top_k=32, top_p=1.0)
    np.testing.assert_array_equal(np.asarray(out), x)


def test_temperature_then_top_k_then_top_p_matches_reference():
    rng = np.random.default_rng(3)
    for ties in [False, True]:
        logits = _random_logits(rng, (8, 64), ties=ties)
        got = rollout.sampling_logits(jnp.asarray(logits), temperature=0.7, top_k=10, top_p=0.8)
        want = ref_top_p(ref_top_k(logits / np.float32(0.7), 10), 0.8)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_sampler_frequencies_match_reported_logps():
    """The token frequencies of the sampler equal exp(the log-probs it reports)."""
    logits_V = jnp.asarray([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, 0.2])
    n = 40_000
    keys = jax.random.split(jax.random.key(0), n)
    sample = jax.jit(jax.vmap(lambda k: rollout._sample(logits_V[None], k, temperature=0.8, top_k=6, top_p=0.9)))
    tokens, logps = sample(keys)
    tokens, logps = np.asarray(tokens[:, 0]), np.asarray(logps[:, 0])
    probs = np.zeros(8)
    probs[tokens] = np.exp(logps)  # the reported probability of each token that was drawn
    freqs = np.bincount(tokens, minlength=8) / n
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)  # every kept token was drawn at least once
    np.testing.assert_allclose(freqs, probs, atol=0.01)
    want = np.isfinite(ref_top_p(ref_top_k(np.asarray(logits_V)[None] / 0.8, 6), 0.9))[0]
    np.testing.assert_array_equal(probs > 0, want)
