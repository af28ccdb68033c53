"""PPO policy and value losses against per-token NumPy loops, plus gradient properties (hypothesis)."""
import chex
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from rlhf_jax import losses
from rlhf_jax.metrics import to_floats

B, T = 3, 6
RNG = np.random.default_rng(3)
OLD = RNG.normal(-2, 0.5, size=(B, T)).astype(np.float32)
NEW = (OLD + RNG.normal(0, 0.4, size=(B, T))).astype(np.float32)
ADV = RNG.normal(size=(B, T)).astype(np.float32)
ENT = RNG.uniform(0, 2, size=(B, T)).astype(np.float32)
MASK = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]], np.float32)

STATIC = ("clip_eps", "clip_eps_high", "dual_clip", "entropy_coef", "aggregation")
policy = jax.jit(losses.ppo_policy_loss, static_argnames=STATIC)
policy_grad = jax.jit(jax.grad(lambda lp, old, a, m: losses.ppo_policy_loss(lp, old, a, m)[0]))
value = jax.jit(losses.value_loss, static_argnames=("clip_range", "aggregation"))
SETTINGS = settings(max_examples=25, deadline=None)


def _ppo_token_loop(lp, old, a, eps, eps_high, dual, ent, coef):
    """Per-token −min(ρA, clip(ρ)A) (Schulman 2017 eq. 7), dual clip max(·, cA) for A<0 (Ye et al. 2020, dual clip)."""
    out = np.zeros(lp.shape)
    for b in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            rho = np.exp(float(lp[b, t]) - float(old[b, t]))
            A = float(a[b, t])
            objective = min(rho * A, min(max(rho, 1 - eps), 1 + eps_high) * A)
            if dual is not None and A < 0:
                objective = max(objective, dual * A)
            out[b, t] = -objective - coef * float(ent[b, t])
    return out


def _aggregate_loop(per_token, mask, mode):
    rows = [b for b in range(mask.shape[0]) if mask[b].sum() > 0]
    if mode == "token_mean":
        return sum(per_token[b, t] for b in rows for t in range(mask.shape[1]) if mask[b, t]) / mask.sum()
    sums = [sum(per_token[b, t] for t in range(mask.shape[1]) if mask[b, t]) for b in rows]
    if mode == "seq_mean_token_mean":
        sums = [s / mask[b].sum() for s, b in zip(sums, rows)]
    return sum(sums) / len(rows)


@pytest.mark.parametrize(
    "eps,eps_high,dual,coef,mode",
    [
        (0.2, None, None, 0.0, "token_mean"),
        (0.1, 0.3, None, 0.0, "seq_mean_token_mean"),
        (0.2, None, 1.5, 0.01, "seq_mean_token_sum"),
        (0.05, 0.05, 1.2, 0.1, "token_mean"),
    ],
)
def test_policy_loss_matches_per_token_loop(eps, eps_high, dual, coef, mode):
    loss, metrics = policy(
        NEW, OLD, ADV, MASK, clip_eps=eps, clip_eps_high=eps_high, dual_clip=dual, entropy_BT=ENT, entropy_coef=coef, aggregation=mode
    )
    per_token = _ppo_token_loop(NEW, OLD, ADV, eps, eps if eps_high is None else eps_high, dual, ENT, coef)
    np.testing.assert_allclose(loss, _aggregate_loop(per_token, MASK, mode), rtol=1e-5)
    m = to_floats(metrics)
    sel = MASK > 0
    log_rho = (NEW - OLD)[sel].astype(np.float64)
    np.testing.assert_allclose(m["ppo/ratio"], np.exp(log_rho).mean(), rtol=1e-5)
    np.testing.assert_allclose(m["ppo/approx_kl_k1"], (-log_rho).mean(), rtol=1e-5)
    np.testing.assert_allclose(m["ppo/approx_kl_k3"], (np.exp(log_rho) - 1 - log_rho).mean(), rtol=1e-4)
    np.testing.assert_allclose(m["ppo/entropy"], ENT[sel].mean(), rtol=1e-5)
    hi = eps if eps_high is None else eps_high
    rho, A = np.exp(log_rho), ADV[sel]
    clipped = ((A > 0) & (rho > 1 + hi)) | ((A < 0) & (rho < 1 - eps))
    np.testing.assert_allclose(m["ppo/clipfrac"], clipped.mean(), rtol=1e-6)


@SETTINGS
@given(adv=arrays(np.float32, (B, T), elements=st.floats(-5, 5, width=32)), logp=arrays(np.float32, (B, T), elements=st.floats(-8, -0.125, width=32)))
def test_ratio_one_gives_minus_mean_advantage_and_vanilla_policy_gradient(adv, logp):
    loss, _ = policy(logp, logp, adv, MASK)
    np.testing.assert_allclose(loss, -np.sum(adv * MASK) / MASK.sum(), rtol=1e-5, atol=1e-5)
    grad = policy_grad(logp, logp, adv, MASK)
    np.testing.assert_allclose(grad, -adv * MASK / MASK.sum(), rtol=1e-5, atol=1e-7)


@SETTINGS
@given(
    adv=arrays(np.float32, (B, T), elements=st.floats(-5, 5, width=32).filter(lambda a: abs(a) > 1e-3)),
    log_rho=arrays(np.float32, (B, T), elements=st.floats(-1.0, 1.0, width=32).filter(lambda x: min(abs(np.exp(x) - 0.8), abs(np.exp(x) - 1.2)) > 1e-3)),
)
def test_clipping_zeroes_gradient_exactly_where_the_paper_says(adv, log_rho):
    old = np.full((B, T), -2.0, np.float32)
    new = old + log_rho
    grad = np.asarray(policy_grad(new, old, adv, MASK))
    rho = np.exp(new.astype(np.float64) - old)
    clipped = ((adv > 0) & (rho > 1.2)) | ((adv < 0) & (rho < 0.8))
    active = (MASK > 0) & ~clipped
    assert np.all(grad[(MASK > 0) & clipped] == 0.0)
    # d/dlogp of −ρA is −ρA/N: never zero for the unclipped tokens.
    np.testing.assert_allclose(grad[active], (-rho * adv / MASK.sum())[active], rtol=1e-4)
    assert np.all(grad[MASK == 0] == 0.0)


def test_dual_clip_zeroes_gradient_for_exploded_negative_advantage():
    old = np.zeros((1, 4), np.float32) - 3
    new = old + np.log(np.array([[4.0, 2.0, 4.0, 0.5]], np.float32))
    adv = np.array([[-1.0, -1.0, 1.0, -1.0]], np.float32)
    mask = np.ones((1, 4), np.float32)
    grad = jax.grad(lambda lp: losses.ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0)[0])(new)
    # ρ=4 > c=3 with A<0: bounded; ρ=2 in (1+ε, c) with A<0: ordinary gradient; A>0, ρ=4: clipped; ρ=0.5<1−ε, A<0: clipped.
    np.testing.assert_allclose(grad, [[0.0, 2.0 / 4, 0.0, 0.0]], rtol=1e-5)
    loss, metrics = losses.ppo_policy_loss(new, old, adv, mask, dual_clip=3.0)
    np.testing.assert_allclose(loss, (3.0 + 2.0 - 1.2 + 0.8) / 4, rtol=1e-5)
    assert to_floats(metrics)["ppo/dual_clipfrac"] == 0.25


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_policy_loss_ignores_padding(mode):
    pad = lambda x, fill: np.concatenate([x, np.full((B, 3), fill, np.float32)], 1)  # noqa: E731
    a = policy(NEW, OLD, ADV, MASK, aggregation=mode)
    b = policy(pad(NEW, 5.0), pad(OLD, -40.0), pad(ADV, 1e4), pad(MASK, 0.0), aggregation=mode)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    fa, fb = to_floats(a[1]), to_floats(b[1])
    for k in fa:
        np.testing.assert_allclose(fa[k], fb[k], rtol=1e-6, err_msg=k)


VALUES = RNG.normal(size=(B, T)).astype(np.float32)
OLD_VALUES = (VALUES + RNG.normal(0, 0.3, size=(B, T))).astype(np.float32)
RETURNS = RNG.normal(size=(B, T)).astype(np.float32)


@pytest.mark.parametrize("clip_range,mode", [(0.2, "token_mean"), (None, "token_mean"), (0.1, "seq_mean_token_mean")])
def test_value_loss_matches_loop(clip_range, mode):
    loss, metrics = value(VALUES, OLD_VALUES, RETURNS, MASK, clip_range=clip_range, aggregation=mode)
    per_token = np.zeros((B, T))
    clipped = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            v, v_old, R = float(VALUES[b, t]), float(OLD_VALUES[b, t]), float(RETURNS[b, t])
            unclipped = (v - R) ** 2
            if clip_range is None:
                per_token[b, t] = 0.5 * unclipped
                continue
            v_clip = v_old + min(max(v - v_old, -clip_range), clip_range)
            per_token[b, t] = 0.5 * max(unclipped, (v_clip - R) ** 2)
            clipped[b, t] = (v_clip - R) ** 2 > unclipped
    np.testing.assert_allclose(loss, _aggregate_loop(per_token, MASK, mode), rtol=1e-5)
    m = to_floats(metrics)
    sel = MASK > 0
    np.testing.assert_allclose(m["vf/clipfrac"], clipped[sel].mean(), rtol=1e-6)
    r, v = RETURNS[sel].astype(np.float64), VALUES[sel]
    np.testing.assert_allclose(m["vf/explained_variance"], 1 - np.var(r - v) / np.var(r), rtol=1e-4)


def test_explained_variance_edge_cases():
    np.testing.assert_allclose(losses.explained_variance(RETURNS, RETURNS, MASK), 1.0, rtol=1e-6)
    const = np.ones((B, T), np.float32)
    assert float(losses.explained_variance(VALUES, const, MASK)) == 0.0
    assert float(losses.explained_variance(VALUES, RETURNS, np.zeros_like(MASK))) == 0.0


class JitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_equals_no_jit(self):
        fn = self.variant(
            lambda lp, old, a, m, v, vo, r: (
                losses.ppo_policy_loss(lp, old, a, m, dual_clip=2.0, aggregation="seq_mean_token_mean")[0],
                losses.value_loss(v, vo, r, m)[0],
            )
        )
        got = fn(NEW, OLD, ADV, MASK, VALUES, OLD_VALUES, RETURNS)
        want_policy = _aggregate_loop(_ppo_token_loop(NEW, OLD, ADV, 0.2, 0.2, 2.0, ENT, 0.0), MASK, "seq_mean_token_mean")
        np.testing.assert_allclose(got[0], want_policy, rtol=1e-5)
        np.testing.assert_allclose(got[1], value(VALUES, OLD_VALUES, RETURNS, MASK)[0], rtol=1e-6)
