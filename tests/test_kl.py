"""KL estimators (Schulman 2020) and KL-coefficient controllers (Ziegler et al. 2019)."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from rlhf_jax import kl
from rlhf_jax.metrics import to_floats

RNG = np.random.default_rng(5)
LP = RNG.normal(-3, 1, size=(3, 4)).astype(np.float32)
REF = (LP + RNG.normal(0, 0.7, size=(3, 4))).astype(np.float32)
MASK = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 1]], np.float32)


def _loop(name, lp, ref):
    out = np.zeros(lp.shape)
    for idx in np.ndindex(lp.shape):
        r = math.exp(float(ref[idx]) - float(lp[idx]))  # r = π_ref / π
        out[idx] = {"k1": -math.log(r), "k2": 0.5 * math.log(r) ** 2, "mse": 0.5 * math.log(r) ** 2,
                    "k3": (r - 1) - math.log(r), "abs": abs(math.log(r))}[name]
    return out


@pytest.mark.parametrize("name", ["k1", "k2", "k3", "abs", "mse"])
def test_estimators_match_loop(name):
    got = kl.kl_penalty(jnp.asarray(LP, jnp.bfloat16), jnp.asarray(REF, jnp.bfloat16), estimator=name)
    assert got.dtype == jnp.float32
    bf = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))  # noqa: E731
    np.testing.assert_allclose(got, _loop(name, bf(LP), bf(REF)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="estimator"):
        kl.kl_penalty(LP, REF, estimator="k4")


def test_k1_and_k3_are_unbiased_under_the_policy():
    """Exact expectation over a categorical π: E_π[k1] = E_π[k3] = KL(π‖π_ref); E_π[k2] ≥ 0 differs."""
    logp = np.asarray(jax.nn.log_softmax(RNG.normal(size=10)), np.float64)
    ref = np.asarray(jax.nn.log_softmax(RNG.normal(size=10)), np.float64)
    p = np.exp(logp)
    true_kl = sum(p[i] * (logp[i] - ref[i]) for i in range(10))
    for name in ("k1", "k3"):
        np.testing.assert_allclose(np.sum(p * np.asarray(kl.kl_penalty(logp, ref, estimator=name))), true_kl, rtol=1e-5)
    assert abs(np.sum(p * np.asarray(kl.kl_penalty(logp, ref, estimator="k2"))) - true_kl) > 1e-3


@settings(max_examples=50, deadline=None)
@given(
    lp=arrays(np.float32, (8,), elements=st.floats(-30, 0, width=32)),
    ref=arrays(np.float32, (8,), elements=st.floats(-30, 0, width=32)),
)
def test_k3_nonnegative_everywhere(lp, ref):
    assert np.all(np.asarray(kl_k3_jit(lp, ref)) >= 0.0)
    assert np.all(np.asarray(kl_k3_jit(lp, lp)) == 0.0)


kl_k3_jit = jax.jit(kl.kl_k3)


@pytest.mark.parametrize("estimator,mode", [("k3", "token_mean"), ("k1", "seq_mean_token_mean")])
def test_kl_loss_value_and_gradient(estimator, mode):
    loss, metrics = kl.kl_loss(LP, REF, MASK, estimator=estimator, aggregation=mode)
    per_token = _loop(estimator, LP, REF)
    if mode == "token_mean":
        want = (per_token * MASK).sum() / MASK.sum()
    else:
        want = np.mean([(per_token[b] * MASK[b]).sum() / MASK[b].sum() for b in range(3)])
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(to_floats(metrics)[f"kl/{estimator}"], (per_token * MASK).sum() / MASK.sum(), rtol=1e-5)
    if estimator == "k3":  # d k3 / d log π = 1 − π_ref/π
        grad = jax.grad(lambda lp: kl.kl_loss(lp, REF, MASK)[0])(LP)
        np.testing.assert_allclose(grad, (1 - np.exp(REF - LP)) * MASK / MASK.sum(), rtol=1e-4, atol=1e-7)


def test_adaptive_controller_matches_lm_human_preferences_loop():
    kls = [12.0, 7.0, 6.0, 1.0, 5.5, 30.0]
    n_steps = 512
    state = kl.AdaptiveKLController.create(0.15)
    assert (state.target, state.horizon) == (6.0, 10000.0)
    beta, expected = 0.15, []
    for value in kls:  # lm-human-preferences AdaptiveKLController.update
        proportional_error = min(max(value / 6.0 - 1, -0.2), 0.2)
        beta *= 1 + proportional_error * n_steps / 10000.0
        expected.append(beta)

    update = jax.jit(kl.AdaptiveKLController.update)
    got = []
    for value in kls:
        state = update(state, jnp.float32(value), n_steps)
        got.append(float(state.value))
    np.testing.assert_allclose(got, expected, rtol=1e-6)

    def body(s, x):
        s = s.update(x, n_steps)
        return s, s.value

    _, scanned = jax.lax.scan(body, kl.AdaptiveKLController.create(0.15), jnp.asarray(kls))
    np.testing.assert_allclose(scanned, expected, rtol=1e-6)


def test_fixed_controller_is_constant():
    state = kl.FixedKLController.create(0.05)
    assert float(state.update(jnp.float32(100.0), 64).value) == pytest.approx(0.05)


class JitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_equals_no_jit(self):
        fn = self.variant(lambda a, b: (kl.kl_penalty(a, b, estimator="k3"), kl.kl_penalty(a, b, estimator="k2")))
        k3, k2 = fn(LP, REF)
        np.testing.assert_allclose(k3, _loop("k3", LP, REF), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(k2, _loop("k2", LP, REF), rtol=1e-5, atol=1e-6)
