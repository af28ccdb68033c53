"""Masked reductions, aggregation modes and token log-probs against plain NumPy loops."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import ops

RNG = np.random.default_rng(0)


def _random_mask(b, t, rng=RNG):
    """Right-padded rows of random length (one row empty)."""
    lengths = rng.integers(0, t + 1, size=b)
    lengths[0] = 0
    lengths[1] = t
    return (np.arange(t)[None] < lengths[:, None]).astype(np.float32)


X = RNG.normal(size=(5, 7)).astype(np.float32)
M = _random_mask(5, 7)


def test_masked_sum_mean_var_match_numpy_loop():
    vals = [X[b, t] for b in range(5) for t in range(7) if M[b, t]]
    np.testing.assert_allclose(ops.masked_sum(X, M), sum(vals), rtol=1e-5)
    np.testing.assert_allclose(ops.masked_mean(X, M), np.mean(vals), rtol=1e-5)
    np.testing.assert_allclose(ops.masked_var(X, M), np.var(vals), rtol=1e-5)
    np.testing.assert_allclose(ops.masked_var(X, M, unbiased=True), np.var(vals, ddof=1), rtol=1e-5)
    row_means = ops.masked_mean(X, M, axis=1)
    for b in range(5):
        expected = np.mean(X[b, M[b] > 0]) if M[b].sum() else 0.0
        np.testing.assert_allclose(row_means[b], expected, rtol=1e-5, atol=1e-7)
    row_vars = ops.masked_var(X, M, axis=1)
    for b in range(5):
        expected = np.var(X[b, M[b] > 0]) if M[b].sum() else 0.0
        np.testing.assert_allclose(row_vars[b], expected, rtol=1e-4, atol=1e-6)


def test_empty_mask_gives_zero_and_finite_gradients():
    zero = np.zeros_like(M)
    for fn in (ops.masked_mean, ops.masked_var, lambda x, m: ops.masked_var(x, m, unbiased=True)):
        assert float(fn(X, zero)) == 0.0
        grad = jax.grad(lambda x: fn(x, zero))(jnp.asarray(X))
        assert np.all(np.isfinite(grad))
    assert np.all(ops.masked_whiten(X, zero) == 0.0)
    single = np.zeros_like(M)
    single[2, 0] = 1.0
    assert float(ops.masked_var(X, single, unbiased=True)) == 0.0


def test_masked_whiten_moments_and_padding():
    w = np.asarray(ops.masked_whiten(X, M))
    vals = w[M > 0]
    assert abs(vals.mean()) < 1e-5
    np.testing.assert_allclose(vals.std(), 1.0, rtol=1e-4)
    assert np.all(w[M == 0] == 0.0)
    raw = X[M > 0]
    kept = np.asarray(ops.masked_whiten(X, M, shift_mean=False))[M > 0]
    np.testing.assert_allclose(kept, (raw - raw.mean()) / np.sqrt(raw.var() + 1e-8) + raw.mean(), rtol=1e-4, atol=1e-5)


def _aggregate_loop(v, m, mode, max_len=9):
    rows = [(v[b], m[b]) for b in range(v.shape[0]) if m[b].sum() > 0]
    if mode == "token_mean":
        return sum(float(x * w) for r, mr in rows for x, w in zip(r, mr)) / sum(float(mr.sum()) for _, mr in rows)
    per_row = []
    for r, mr in rows:
        s = sum(float(x * w) for x, w in zip(r, mr))
        per_row.append(s / mr.sum() if mode == "seq_mean_token_mean" else s / max_len
                       if mode == "seq_mean_token_sum_norm" else s)
    return sum(per_row) / len(per_row)


@pytest.mark.parametrize("mode", ops.AGGREGATIONS)
def test_masked_aggregate_matches_loop_and_ignores_padding(mode):
    metric = ops.masked_aggregate(X, M, mode, max_len=9)  # Dr. GRPO's constant: the length budget, not the width
    np.testing.assert_allclose(metric.mean(), _aggregate_loop(X, M, mode), rtol=1e-5)
    # Append masked garbage columns and a fully masked garbage row.
    x_pad = np.concatenate([X, RNG.normal(size=(5, 3)).astype(np.float32) * 1e3], axis=1)
    m_pad = np.concatenate([M, np.zeros((5, 3), np.float32)], axis=1)
    x_pad = np.concatenate([x_pad, np.full((1, 10), 7e3, np.float32)])
    m_pad = np.concatenate([m_pad, np.zeros((1, 10), np.float32)])
    np.testing.assert_allclose(ops.masked_aggregate(x_pad, m_pad, mode, max_len=9).mean(), metric.mean(), rtol=1e-6)


def test_masked_aggregate_rejects_unknown_mode():
    with pytest.raises(ValueError, match="aggregation"):
        ops.masked_aggregate(X, M, "sum")


LOGITS = RNG.normal(size=(2, 3, 11)).astype(np.float32) * 3
TARGETS = RNG.integers(0, 11, size=(2, 3))


def test_token_logps_and_entropy_match_numpy_loop():
    logps = ops.token_logps(LOGITS, TARGETS)
    ent = ops.entropy_from_logits(LOGITS)
    assert logps.dtype == jnp.float32 and ent.dtype == jnp.float32
    for b in range(2):
        for t in range(3):
            z = LOGITS[b, t].astype(np.float64)
            logp = z - np.log(np.sum(np.exp(z - z.max()))) - z.max()
            np.testing.assert_allclose(logps[b, t], logp[TARGETS[b, t]], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(ent[b, t], -np.sum(np.exp(logp) * logp), rtol=1e-5, atol=1e-6)


def test_token_logps_upcasts_bf16_before_log_softmax():
    bf16 = jnp.asarray(LOGITS * 20, jnp.bfloat16)
    got = ops.token_logps(bf16, TARGETS)
    assert got.dtype == jnp.float32
    want = ops.token_logps(np.asarray(bf16.astype(jnp.float32)), TARGETS)
    np.testing.assert_array_equal(got, want)


def test_sequence_logps_sum_and_average():
    summed = ops.sequence_logps(X, M)
    averaged = ops.sequence_logps(X, M, average=True)
    for b in range(5):
        sel = X[b, M[b] > 0]
        np.testing.assert_allclose(summed[b], sel.sum() if sel.size else 0.0, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(averaged[b], sel.mean() if sel.size else 0.0, rtol=1e-5, atol=1e-6)


class JitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_equals_no_jit(self):
        fn = self.variant(
            lambda x, m, z, y: (
                ops.masked_whiten(x, m),
                ops.masked_aggregate(x, m, "seq_mean_token_mean").mean(),
                ops.token_logps(z, y),
                ops.entropy_from_logits(z),
            )
        )
        got = fn(X, M, LOGITS, TARGETS)
        want = (
            ops.masked_whiten(X, M),
            _aggregate_loop(X, M, "seq_mean_token_mean"),
            ops.token_logps(LOGITS, TARGETS),
            ops.entropy_from_logits(LOGITS),
        )
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
