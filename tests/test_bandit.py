"""Known optimum: on a one-step bandit, KL-regularised RLHF must reach π*(y) ∝ π_ref(y)·exp(r(y)/β).

The bandit and its trainers are :mod:`rlhf_jax.bandit` (8 actions, β = 0.5, the library's own losses,
advantages and KL estimators). (a) PPO as in RLHF: sampled actions, reward = r(y) − β·k1 folded into the
per-token reward, a learned value baseline, GAE, whitened advantages, clipped surrogate, 4 epochs × 4
minibatches per batch. (b) DPO on pairs labelled by Bradley–Terry(r). Both converge to π* (Rafailov et
al. 2023, eq. 4) within TV 0.02. GRPO with the KL in the loss and online DPO are checked the same way
further down.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import bandit as bd
from rlhf_jax.rl.algorithms import Algorithm

BANDIT = bd.make_bandit()
BETA = BANDIT.beta
REF = np.exp(np.asarray(BANDIT.ref_logps_V, np.float64))
REWARD = np.asarray(BANDIT.reward_V, np.float64)


def _optimum() -> np.ndarray:
    """π*(y) = π_ref(y) exp(r(y)/β) / Z, in float64 NumPy."""
    unnorm = REF * np.exp(REWARD / BETA)
    return unnorm / unnorm.sum()


def _tv(p, q) -> float:
    return 0.5 * float(np.sum(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64))))


def _train_policy_gradient(seed: int, algo: Algorithm, **kwargs) -> np.ndarray:
    """The policy after the last iteration of ``bandit.train_policy_gradient`` with one algorithm."""
    train = functools.partial(bd.train_policy_gradient, bandit=BANDIT, algos=(algo,), **kwargs)
    return np.asarray(jax.jit(train)(jax.random.key(seed))[-1], np.float64)


def _train_preference(seed: int, setup: bd.PreferenceSetup, **kwargs) -> np.ndarray:
    train = functools.partial(bd.train_preference, bandit=BANDIT, setups=(setup,), **kwargs)
    return np.asarray(jax.jit(train)(jax.random.key(seed))[-1], np.float64)


def test_the_optimum_is_far_from_the_reference():
    """Guards the tests below against passing trivially."""
    assert _tv(REF, _optimum()) > 0.3


def test_the_library_optima_match_their_closed_forms():
    """``reverse_kl_optimum`` is π* (and its scaled family); ``forward_kl_optimum`` satisfies the stationarity
    condition c·r(y) + β·π_ref(y)/π(y) = λ of argmax c·E_π[r] − β·KL(π_ref ‖ π)."""
    np.testing.assert_allclose(bd.reverse_kl_optimum(BANDIT), _optimum(), rtol=1e-5, atol=1e-7)
    for c in (0.3, 1.0, 2.5):
        unnorm = REF * np.exp(c * REWARD / BETA)
        np.testing.assert_allclose(bd.reverse_kl_optimum(BANDIT, c), unnorm / unnorm.sum(), rtol=1e-5, atol=1e-7)
        pi = np.asarray(bd.forward_kl_optimum(BANDIT, c), np.float64)
        lam = c * REWARD + BETA * REF / pi
        assert abs(pi.sum() - 1) < 1e-5 and np.ptp(lam) < 1e-4 * np.abs(lam).max(), (c, lam)


def test_ppo_with_kl_penalty_reaches_the_kl_regularised_optimum():
    algo = Algorithm(vf_coef=1.0)  # GAE on a learned value, k1 in the reward, whitened advantages, clip 0.2
    policy = _train_policy_gradient(0, algo, iterations=300, samples=1024, epochs=4, minibatches=4)
    assert _tv(policy, _optimum()) < 0.02


def test_dpo_on_bradley_terry_pairs_reaches_the_same_optimum():
    policy = _train_preference(1, bd.PreferenceSetup("dpo"), iterations=600, pairs=4096)
    assert _tv(policy, _optimum()) < 0.02


# --- GRPO (KL in the loss) and online DPO -----------------------------------------------------------
# GRPO's loss is  E[A·ρ] − β·E[KL_est]  with group-normalised A. In expectation over a group of N samples,
# A_i = (r_i − mean r)/std r gives (1 − 1/N)/σ_π times the gradient of E_π[r] (σ_π: the reward's std under π);
# RLOO's leave-one-out A_i gives exactly that gradient. The KL term's gradient under samples from π is that of
# KL(π ‖ π_ref) for k2 and of KL(π_ref ‖ π) for k3 (GRPO's published choice). So the fixed points are
#   k2:  π ∝ π_ref · exp(c·r/β)                     (c = 1 for RLOO, (1 − 1/N)/σ_π for GRPO)
#   k3:  π ∝ β·π_ref / (λ − c·r)                     (the forward-KL optimum, λ normalising)


def _kl_in_the_loss(advantage: str, kl_estimator: str, n: int) -> Algorithm:
    return Algorithm(advantage=advantage, aggregation="seq_mean_token_mean", kl_placement="loss",
                     kl_estimator=kl_estimator, samples_per_prompt=n)


def _train_grpo(seed: int, *, advantage: str, kl_estimator: str, groups: int = 64, n: int = 16) -> np.ndarray:
    """2 full-batch epochs per iteration of ``groups × n`` samples, 400 iterations."""
    return _train_policy_gradient(seed, _kl_in_the_loss(advantage, kl_estimator, n), iterations=400,
                                  samples=groups * n, epochs=2)


def _reverse_kl_optimum(c: float) -> np.ndarray:
    return np.asarray(bd.reverse_kl_optimum(BANDIT, c), np.float64)


def test_kl_in_the_loss_with_k2_and_an_unbiased_baseline_reaches_the_kl_regularised_optimum():
    """RLOO advantages + β·k2 in the loss: exactly the KL-regularised objective, so π* ∝ π_ref·exp(r/β)."""
    policy = _train_grpo(2, advantage="rloo", kl_estimator="k2")
    assert _tv(policy, _optimum()) < 0.02


def test_grpo_with_kl_in_the_loss_reaches_its_known_optimum():
    """GRPO's group-normalised advantages with β·k2 in the loss reach π ∝ π_ref·exp(c·r/β), c = (1 − 1/N)/σ_π:
    π* of the KL-regularised objective with the reward measured in units of its own std."""
    n = 16
    policy = _train_grpo(3, advantage="grpo", kl_estimator="k2", n=n)
    c = float(bd.grpo_scale(BANDIT, jnp.asarray(policy, jnp.float32), n))
    assert _tv(policy, _reverse_kl_optimum(c)) < 0.02
    assert _tv(_reverse_kl_optimum(c), _optimum()) > 0.05  # the std normalisation moves the optimum


@jax.jit
def _families(c_C: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The forward- and reverse-KL optima for each reward scale in ``c_C``."""
    return (jax.vmap(lambda c: bd.forward_kl_optimum(BANDIT, c))(c_C),
            jax.vmap(lambda c: bd.reverse_kl_optimum(BANDIT, c))(c_C))


def _closest(policy: np.ndarray) -> tuple[float, float]:
    """The smallest TV from ``policy`` to the forward- and to the reverse-KL family over reward scales c
    (a log grid, then refined around each family's best)."""
    out = []
    grid = np.geomspace(0.01, 100.0, 400)
    for family in range(2):
        tv = np.asarray(bd.total_variation(_families(jnp.asarray(grid, jnp.float32))[family], policy))
        best = grid[np.argmin(tv)]
        fine = np.linspace(best / 1.05, best * 1.05, 200)
        out.append(float(np.min(bd.total_variation(_families(jnp.asarray(fine, jnp.float32))[family], policy))))
    return out[0], out[1]


def test_grpo_with_the_published_k3_kl_reaches_a_forward_kl_optimum():
    """GRPO as published (k3 in the loss): the gradient is that of KL(π_ref ‖ π), so it converges onto the
    forward-KL optima π ∝ β·π_ref/(λ − c·r) and off the reverse-KL family π ∝ π_ref·exp(c·r/β) for every reward
    scale c. (c itself drifts from (1 − 1/N)/σ_π when a peaked policy leaves groups without variance.)"""
    policy = _train_grpo(4, advantage="grpo", kl_estimator="k3", n=64, groups=32)
    forward, reverse = _closest(policy)
    assert forward < 0.02
    assert reverse > 0.05


def test_online_dpo_on_its_own_samples_reaches_the_kl_regularised_optimum():
    """Pairs sampled from the *current* policy, labelled by Bradley–Terry(r), one DPO step per iteration."""
    policy = _train_preference(5, bd.PreferenceSetup("dpo", on_policy=True), iterations=800, pairs=4096)
    assert _tv(policy, _optimum()) < 0.02
