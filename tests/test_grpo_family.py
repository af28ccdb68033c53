"""The GRPO family against plain NumPy/Python loops of each paper's equations.

GRPO (Shao et al. 2024, DeepSeekMath eq. 3-4), Dr. GRPO (Liu et al. 2025), DAPO (Yu et al. 2025, eq. 8-11),
GSPO (Zheng et al. 2025, eq. 5-7 and 13-14), RLOO (Ahmadian et al. 2024), REINFORCE++ and REINFORCE++-baseline
(Hu 2025). The oracles below are written from the equations, never by calling rlhf_jax.

Conventions the oracles share with the library (documented there): the group std is the unbiased one (ddof=1)
plus 1e-6; whitening divides by sqrt(biased var + 1e-8); a row with no response tokens (a padded-away row)
takes no part in a mean over sequences, though its score still counts in its group's statistics.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import advantages, kl, registry
from rlhf_jax.advantages import AdvantageInputs
from rlhf_jax.losses import ppo

P, G, T = 3, 4, 6  # prompts, samples per prompt (the group), response tokens
B = P * G
RNG = np.random.default_rng(2025)
_ROWS = [
    [1, 1, 1, 1, 0, 0],  # right padding
    [0, 0, 1, 1, 1, 1],  # left offset
    [1, 1, 1, 1, 1, 1],  # full
    [0, 0, 0, 0, 0, 0],  # empty
    [1, 1, 0, 1, 1, 0],  # a hole (masked environment tokens)
    [1, 0, 0, 0, 0, 0],  # one token
]
MASK = np.array([_ROWS[i % len(_ROWS)] for i in range(B)], np.float32)
LOGPS = (-np.abs(RNG.normal(1.0, 0.7, size=(B, T)))).astype(np.float32)
OLD_LOGPS = (LOGPS + RNG.normal(0.0, 0.3, size=(B, T))).astype(np.float32)
REF_LOGPS = (LOGPS + RNG.normal(0.0, 0.4, size=(B, T))).astype(np.float32)
SCORES = RNG.normal(size=B).astype(np.float32)
KL_BT = RNG.normal(0.05, 0.1, size=(B, T)).astype(np.float32)


def _tokens(b, mask=MASK):
    return [t for t in range(mask.shape[1]) if mask[b, t] > 0]


def _group_norm_loop(scores, scale=True):
    """Outcome-supervised GRPO advantage (DeepSeekMath §4.1.2): Â_i = (r_i − mean(r)) / std(r) per group."""
    adv = np.zeros(len(scores))
    for p in range(len(scores) // G):
        group = [float(scores[p * G + i]) for i in range(G)]
        mean = sum(group) / G
        std = (sum((r - mean) ** 2 for r in group) / (G - 1)) ** 0.5
        for i in range(G):
            adv[p * G + i] = (group[i] - mean) / (std + 1e-6) if scale else group[i] - mean
    return adv


def _clipped_term(ratio, adv, eps_low, eps_high):
    """min(ρA, clip(ρ, 1 − ε_low, 1 + ε_high)A), the PPO surrogate of one token."""
    return min(ratio * adv, min(max(ratio, 1 - eps_low), 1 + eps_high) * adv)


def _inputs(scores=SCORES, mask=MASK, kl_BT=KL_BT, values=None):
    return AdvantageInputs(scores_B=jnp.asarray(scores), kl_BT=jnp.asarray(kl_BT), mask_BT=jnp.asarray(mask),
                           values_BT=values, num_samples=G)


# --- GRPO -----------------------------------------------------------------------------------------------


def _grpo_objective_loop(logps, old, ref, mask, scores, beta, eps):
    """DeepSeekMath eq. 3 negated: mean_i (1/|o_i|) Σ_t [−min(ρA, clip(ρ)A) + β·D_KL], D_KL by eq. 4 (k3)."""
    adv = _group_norm_loop(scores)
    per_seq = []
    for b in range(logps.shape[0]):
        idx = _tokens(b, mask)
        if not idx:
            continue
        total = 0.0
        for t in idx:
            ratio = np.exp(float(logps[b, t]) - float(old[b, t]))
            ref_over_pi = np.exp(float(ref[b, t]) - float(logps[b, t]))
            kl_k3 = ref_over_pi - np.log(ref_over_pi) - 1.0
            total += -_clipped_term(ratio, adv[b], eps, eps) + beta * kl_k3
        per_seq.append(total / len(idx))
    return sum(per_seq) / len(per_seq)


def _grpo_library(logps, old, ref, mask, scores, beta, eps):
    adv_BT, _ = registry.ADVANTAGES["grpo"](_inputs(scores, mask, np.zeros_like(KL_BT)), kl_coef=0.0)
    policy, _ = ppo.ppo_policy_loss(logps, old, adv_BT, mask, clip_eps=eps, aggregation="seq_mean_token_mean")
    kl_term, _ = kl.kl_loss(logps, ref, mask, estimator="k3", aggregation="seq_mean_token_mean")
    return policy + beta * kl_term


@pytest.mark.parametrize("beta,eps", [(0.04, 0.2), (0.0, 0.1), (0.5, 0.3)])
def test_grpo_objective_matches_deepseekmath_eq3_loop(beta, eps):
    want = _grpo_objective_loop(LOGPS, OLD_LOGPS, REF_LOGPS, MASK, SCORES, beta, eps)
    got = _grpo_library(LOGPS, OLD_LOGPS, REF_LOGPS, MASK, SCORES, beta, eps)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


def test_grpo_objective_gradient_matches_finite_differences_of_the_loop():
    beta, eps, h = 0.04, 0.2, 1e-4
    grad = np.asarray(jax.grad(_grpo_library)(jnp.asarray(LOGPS), OLD_LOGPS, REF_LOGPS, MASK, SCORES, beta, eps))
    logps64 = LOGPS.astype(np.float64)
    numeric = np.zeros_like(logps64)
    for b in range(B):
        for t in range(T):
            up, down = logps64.copy(), logps64.copy()
            up[b, t] += h
            down[b, t] -= h
            numeric[b, t] = (_grpo_objective_loop(up, OLD_LOGPS, REF_LOGPS, MASK, SCORES, beta, eps)
                             - _grpo_objective_loop(down, OLD_LOGPS, REF_LOGPS, MASK, SCORES, beta, eps)) / (2 * h)
    np.testing.assert_allclose(grad, numeric, atol=2e-4)
    assert np.all(grad[MASK == 0] == 0.0)


# --- Dr. GRPO -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_len", [T, 16])
def test_dr_grpo_matches_token_sum_over_constant_loop(max_len):
    """Liu et al. 2025 §3.1: A_i = r_i − mean(r) (no std); loss = mean_i Σ_t −min(ρA, clip(ρ)A) / L, L constant."""
    eps = 0.2
    adv = _group_norm_loop(SCORES, scale=False)
    per_seq = []
    for b in range(B):
        idx = _tokens(b)
        if idx:
            per_seq.append(sum(-_clipped_term(np.exp(float(LOGPS[b, t] - OLD_LOGPS[b, t])), adv[b], eps, eps)
                               for t in idx) / max_len)
    want = sum(per_seq) / len(per_seq)

    adv_BT, returns = registry.ADVANTAGES["dr_grpo"](_inputs(kl_BT=np.zeros_like(KL_BT)), kl_coef=0.0)
    assert returns is None
    np.testing.assert_allclose(np.asarray(adv_BT), adv[:, None] * MASK, atol=1e-6)
    got, _ = ppo.ppo_policy_loss(LOGPS, OLD_LOGPS, adv_BT, MASK, clip_eps=eps,
                                 aggregation="seq_mean_token_sum_norm", max_len=max_len)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


def test_dr_grpo_advantage_includes_the_kl_penalised_reward():
    beta = 0.1
    rewards = [float(SCORES[b]) - beta * sum(float(KL_BT[b, t]) for t in _tokens(b)) for b in range(B)]
    adv_BT, _ = registry.ADVANTAGES["dr_grpo"](_inputs(), kl_coef=beta)
    np.testing.assert_allclose(np.asarray(adv_BT), _group_norm_loop(np.array(rewards), scale=False)[:, None] * MASK,
                               atol=1e-5)


# --- DAPO -----------------------------------------------------------------------------------------------


def test_groups_with_signal_is_eq11_on_binary_rewards():
    """Yu et al. 2025 eq. 11: keep a group iff 0 < |{o_i correct}| < G."""
    correct = RNG.integers(0, 2, size=(64, G)).astype(np.float32)
    correct[:3] = [[1] * G, [0] * G, [1] + [0] * (G - 1)]
    want = [0 < int(sum(row)) < G for row in correct]
    np.testing.assert_array_equal(np.asarray(advantages.groups_with_signal(correct)), want)


def test_groups_with_signal_real_scores_and_tolerance():
    scores = np.array([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5 + 1e-8, 0.5, 0.5], [0.5, 0.5, 0.5, 0.6], [-2.0, 1.0, 0.0, 3.0]],
                      np.float32)
    np.testing.assert_array_equal(np.asarray(advantages.groups_with_signal(scores)), [False, False, True, True])
    np.testing.assert_array_equal(np.asarray(advantages.groups_with_signal(scores, atol=0.2)), [False, False, False, True])


def test_overlong_filter_zeroes_rows_without_eos():
    has_eos = np.array([i % 3 != 0 for i in range(B)])
    out = np.asarray(ppo.overlong_filter(MASK, has_eos))
    for b in range(B):
        np.testing.assert_array_equal(out[b], MASK[b] if has_eos[b] else np.zeros(T))


def test_dapo_objective_matches_eq8_loop_with_dynamic_sampling_and_overlong_filter():
    """DAPO eq. 8: (1/Σ_i|o_i|) Σ_i Σ_t min(r Â, clip(r, 1 − 0.2, 1 + 0.28) Â) over kept groups, truncated
    responses out of the loss (but in their group's advantage), Â as GRPO's (eq. 9), no KL term."""
    eps_low, eps_high = 0.2, 0.28
    scores = np.array([1, 1, 1, 1, 1, 0, 0, 1, 0, 0, 1, 0], np.float32)  # group 0 has no signal
    has_eos = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1], bool)

    kept = [p for p in range(P) if 0 < sum(scores[p * G:(p + 1) * G]) < G]
    assert kept == [1, 2]
    adv = _group_norm_loop(scores)
    total, tokens = 0.0, 0
    for p in kept:
        for i in range(G):
            b = p * G + i
            if not has_eos[b]:
                continue
            for t in _tokens(b):
                total += -_clipped_term(np.exp(float(LOGPS[b, t] - OLD_LOGPS[b, t])), adv[b], eps_low, eps_high)
                tokens += 1
    want = total / tokens

    keep_P = np.asarray(advantages.groups_with_signal(scores.reshape(P, G)))
    np.testing.assert_array_equal(keep_P, [False, True, True])
    rows = np.repeat(keep_P, G)
    adv_BT, _ = registry.ADVANTAGES["grpo"](_inputs(scores[rows], MASK[rows], KL_BT[rows]), kl_coef=0.0)
    mask_BT = ppo.overlong_filter(MASK[rows], has_eos[rows])
    got, metrics = ppo.ppo_policy_loss(LOGPS[rows], OLD_LOGPS[rows], adv_BT, mask_BT, clip_eps=eps_low,
                                       clip_eps_high=eps_high, aggregation="token_mean")
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
    assert 0.0 < float(metrics["ppo/clipfrac"].mean()) < 1.0  # both branches of the min are exercised


# --- GSPO -----------------------------------------------------------------------------------------------


def _gspo_seq_loop(logps, old, adv_B, mask, eps_low, eps_high):
    """Zheng et al. 2025 eq. 5 negated, eq. 7's ratio: −(1/G) Σ_i min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t log ρ)."""
    terms = []
    for b in range(mask.shape[0]):
        idx = _tokens(b, mask)
        if not idx:
            continue
        s = jnp.exp(sum(logps[b, t] - old[b, t] for t in idx) / len(idx))
        terms.append(-jnp.minimum(s * adv_B[b], jnp.clip(s, 1 - eps_low, 1 + eps_high) * adv_B[b]))
    return sum(terms) / len(terms)


def _gspo_token_loop(logps, old, adv_BT, mask, eps_low, eps_high):
    """GSPO-token, eq. 13-14 negated: s_i,t = sg[s_i]·π_t/sg[π_t]; −(1/G) Σ_i (1/|y_i|) Σ_t min(s_i,t A_i,t, clip(s_i,t) A_i,t)."""
    sg = jax.lax.stop_gradient
    terms = []
    for b in range(mask.shape[0]):
        idx = _tokens(b, mask)
        if not idx:
            continue
        s = jnp.exp(sum(logps[b, t] - old[b, t] for t in idx) / len(idx))
        seq = 0.0
        for t in idx:
            s_t = sg(s) * jnp.exp(logps[b, t]) / sg(jnp.exp(logps[b, t]))
            seq = seq - jnp.minimum(s_t * adv_BT[b, t], jnp.clip(s_t, 1 - eps_low, 1 + eps_high) * adv_BT[b, t])
        terms.append(seq / len(idx))
    return sum(terms) / len(terms)


def _gspo_old_logps(scale, seed):
    rng = np.random.default_rng(seed)
    return (LOGPS + rng.normal(0.0, scale, size=(B, T))).astype(np.float32)


@pytest.mark.parametrize("eps_low,eps_high,scale", [(3e-4, 4e-4, 1e-3), (0.2, 0.28, 0.3)])
def test_gspo_value_and_gradient_match_sequence_ratio_loop(eps_low, eps_high, scale):
    old = _gspo_old_logps(scale, 7)
    adv_B = RNG.normal(size=B).astype(np.float32)
    adv_BT = adv_B[:, None] * MASK
    loss_fn = jax.jit(functools.partial(registry.POLICY_LOSSES["gspo"], clip_eps=eps_low, clip_eps_high=eps_high))
    (got, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(LOGPS), old, adv_BT, MASK)
    want, want_grad = jax.value_and_grad(_gspo_seq_loop)(jnp.asarray(LOGPS), old, adv_B, MASK, eps_low, eps_high)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-4, atol=1e-7)
    assert np.all(np.asarray(grad)[MASK == 0] == 0.0)

    # per-sequence metrics, by hand
    clipped, ratios = [], []
    for b in range(B):
        idx = _tokens(b)
        if idx:
            s = np.exp(np.mean([float(LOGPS[b, t] - old[b, t]) for t in idx]))
            ratios.append(s)
            clipped.append((adv_B[b] > 0 and s > 1 + eps_high) or (adv_B[b] < 0 and s < 1 - eps_low))
    np.testing.assert_allclose(float(metrics["ppo/clipfrac"].mean()), np.mean(clipped), atol=1e-6)
    np.testing.assert_allclose(float(metrics["ppo/ratio"].mean()), np.mean(ratios), rtol=1e-6)
    assert 0.0 < np.mean(clipped) < 1.0  # both branches of the min are exercised


def test_gspo_token_form_with_per_token_advantages_matches_eq13_loop():
    eps_low, eps_high = 0.2, 0.28
    old = _gspo_old_logps(0.3, 11)
    adv_BT = RNG.normal(size=(B, T)).astype(np.float32) * MASK
    grad_fn = jax.value_and_grad(ppo.gspo_policy_loss, has_aux=True)
    (got, _), grad = grad_fn(jnp.asarray(LOGPS), old, adv_BT, MASK, clip_eps=eps_low, clip_eps_high=eps_high)
    want, want_grad = jax.value_and_grad(_gspo_token_loop)(jnp.asarray(LOGPS), old, adv_BT, MASK, eps_low, eps_high)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-4, atol=1e-7)


def test_gspo_gradient_matches_finite_differences_in_float64():
    """Central differences of a NumPy float64 loop of eq. 5 (no autodiff anywhere in the oracle)."""
    eps_low, eps_high, h = 0.2, 0.28, 1e-5
    old = _gspo_old_logps(0.3, 3).astype(np.float64)
    adv_B = RNG.normal(size=B)

    def objective(logps):
        terms = []
        for b in range(B):
            idx = _tokens(b)
            if idx:
                s = np.exp(np.mean([logps[b, t] - old[b, t] for t in idx]))
                terms.append(-_clipped_term(s, adv_B[b], eps_low, eps_high))
        return np.mean(terms)

    logps64 = LOGPS.astype(np.float64)
    numeric = np.zeros_like(logps64)
    for b in range(B):
        for t in range(T):
            up, down = logps64.copy(), logps64.copy()
            up[b, t] += h
            down[b, t] -= h
            numeric[b, t] = (objective(up) - objective(down)) / (2 * h)
    grad = jax.grad(lambda lp: ppo.gspo_policy_loss(lp, old, adv_B[:, None] * MASK, MASK, clip_eps=eps_low,
                                                    clip_eps_high=eps_high)[0])(jnp.asarray(LOGPS))
    np.testing.assert_allclose(np.asarray(grad), numeric, atol=1e-4)


def test_gspo_rejects_dual_clip_and_is_registered():
    assert registry.POLICY_LOSSES["gspo"] is ppo.gspo_policy_loss
    with pytest.raises(ValueError, match="dual_clip"):
        ppo.gspo_policy_loss(LOGPS, OLD_LOGPS, MASK, MASK, clip_eps=0.2, dual_clip=3.0)


# --- RLOO -----------------------------------------------------------------------------------------------


def test_rloo_estimator_matches_leave_one_out_loop():
    """Ahmadian et al. 2024 eq. 5 on the KL-penalised reward R_i = s_i − β Σ_t KL_t: A_i = R_i − mean_{j≠i} R_j."""
    beta = 0.05
    rewards = [float(SCORES[b]) - beta * sum(float(KL_BT[b, t]) for t in _tokens(b)) for b in range(B)]
    want = np.zeros((B, T))
    for p in range(P):
        for i in range(G):
            b = p * G + i
            others = [rewards[p * G + j] for j in range(G) if j != i]
            for t in _tokens(b):
                want[b, t] = rewards[b] - sum(others) / (G - 1)
    got, returns = registry.ADVANTAGES["rloo"](_inputs(), kl_coef=beta)
    assert returns is None
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


# --- REINFORCE++ ----------------------------------------------------------------------------------------


def _reinforce_pp_loop(scores, kl_BT, mask, beta, gamma):
    """Hu 2025 §3: r_t = −β KL_t (+ score on the last response token), G_t = Σ_{i≥t} γ^{i−t} r_i over the
    response tokens, then (G − μ)/sqrt(σ² + 1e-8) with μ, σ² over all response tokens of the batch."""
    returns = np.zeros(mask.shape)
    flat = []
    for b in range(mask.shape[0]):
        idx = _tokens(b, mask)
        running = 0.0
        for t in reversed(idx):
            reward = -beta * float(kl_BT[b, t]) + (float(scores[b]) if t == idx[-1] else 0.0)
            running = reward + gamma * running
            returns[b, t] = running
            flat.append(running)
    mean = sum(flat) / len(flat)
    var = sum((x - mean) ** 2 for x in flat) / len(flat)
    out = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        for t in _tokens(b, mask):
            out[b, t] = (returns[b, t] - mean) / np.sqrt(var + 1e-8)
    return out


@pytest.mark.parametrize("beta,gamma", [(0.05, 1.0), (0.2, 0.9), (0.0, 1.0)])
def test_reinforce_pp_matches_return_to_go_and_global_whitening_loop(beta, gamma):
    got, returns = registry.ADVANTAGES["reinforce_pp"](_inputs(), kl_coef=beta, gamma=gamma)
    assert returns is None
    np.testing.assert_allclose(np.asarray(got), _reinforce_pp_loop(SCORES, KL_BT, MASK, beta, gamma), atol=2e-5)


@pytest.mark.parametrize("beta,gamma", [(0.05, 1.0), (0.2, 0.9)])
def test_reinforce_pp_baseline_subtracts_group_mean_then_whitens_globally(beta, gamma):
    centred = np.zeros(B)
    for p in range(P):
        group = [float(SCORES[p * G + i]) for i in range(G)]
        for i in range(G):
            centred[p * G + i] = group[i] - sum(group) / G
    got, returns = registry.ADVANTAGES["reinforce_pp_baseline"](_inputs(), kl_coef=beta, gamma=gamma)
    assert returns is None
    np.testing.assert_allclose(np.asarray(got), _reinforce_pp_loop(centred, KL_BT, MASK, beta, gamma), atol=2e-5)


def test_discounted_returns_match_backward_loop():
    rewards = RNG.normal(size=(B, T)).astype(np.float32)
    want = np.zeros((B, T))
    for b in range(B):
        running = 0.0
        for t in reversed(_tokens(b)):
            running = float(rewards[b, t]) + 0.9 * running
            want[b, t] = running
    np.testing.assert_allclose(np.asarray(advantages.discounted_returns(rewards, MASK, gamma=0.9)), want, atol=1e-5)


# --- the registry ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", registry.ADVANTAGES.names())
def test_every_advantage_estimator_is_reachable_by_name(name):
    fn = registry.ADVANTAGES[name]
    values = jnp.asarray(RNG.normal(size=(B, T)).astype(np.float32)) if fn.needs_critic else None
    adv_BT, returns_BT = fn(_inputs(values=values), kl_coef=0.05)
    assert adv_BT.shape == (B, T) and np.all(np.isfinite(np.asarray(adv_BT)))
    assert np.all(np.asarray(adv_BT)[MASK == 0] == 0.0)
    assert (returns_BT is not None) == fn.needs_critic
    assert name in registry.ADVANTAGES


def test_the_grpo_family_is_registered():
    for name in ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"):
        assert name in registry.ADVANTAGES.names()
    assert registry.ADVANTAGES["reinforce_pp_baseline"].needs_groups
    assert not registry.ADVANTAGES["reinforce_pp"].needs_groups


def test_unknown_estimator_names_the_flag_and_the_choices():
    with pytest.raises(ValueError, match="--x") as info:
        registry.ADVANTAGES.check("nope", "--x")
    for name in registry.ADVANTAGES.names():
        assert name in str(info.value)
    with pytest.raises(ValueError, match="nope"):
        registry.ADVANTAGES["nope"]


def test_the_grpo_preset_through_the_rl_objective_equals_the_deepseekmath_loop():
    """What experiments/grpo.py trains on: rl_loss with the "grpo" preset (no critic: values None) on a
    scored batch whose advantages come from the registry, against the paper's eq. 3 loop."""
    from rlhf_jax.rl.algorithms import PRESETS
    from rlhf_jax.rl.objective import RLBatch, rl_loss

    algo = PRESETS["grpo"]
    adv_BT, returns = registry.ADVANTAGES[algo.advantage](_inputs(SCORES, MASK, np.zeros_like(KL_BT)), kl_coef=0.0)
    assert returns is None and not algo.needs_critic
    batch = RLBatch(input_ids_BT=None, attention_mask_BT=None, response_mask_BT=jnp.asarray(MASK),
                    old_logps_BT=jnp.asarray(OLD_LOGPS), ref_logps_BT=jnp.asarray(REF_LOGPS), advantages_BT=adv_BT,
                    scores_B=jnp.asarray(SCORES))
    loss, metrics = rl_loss(jnp.asarray(LOGPS), jnp.zeros_like(jnp.asarray(LOGPS)), None, batch, algo=algo)
    expected = _grpo_objective_loop(LOGPS, OLD_LOGPS, REF_LOGPS, MASK, SCORES, algo.kl_coef, algo.clip_eps)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6)
    assert "vf/loss" not in metrics and "kl/loss" in metrics
