"""Known optimum: on a one-step bandit, KL-regularised RLHF must reach π*(y) ∝ π_ref(y)·exp(r(y)/β).

GRPO with the KL in the loss and online DPO are checked the same way further down.

The policy is a logits vector over 8 actions (responses of one token). (a) PPO as in RLHF: sampled
actions, reward = r(y) − β·k1 folded into the per-token reward, a learned value baseline, GAE,
whitened advantages, clipped surrogate, 4 epochs × 4 minibatches per batch. (b) DPO on pairs
labelled by Bradley–Terry(r). Both converge to π* (Rafailov et al. 2023, eq. 4) within TV 0.02.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import advantages, kl, losses

K, BETA = 8, 0.5
_rng = np.random.default_rng(0)
REF_LOGITS = jnp.asarray(_rng.normal(size=K), jnp.float32)
REF_LOGP = jax.nn.log_softmax(REF_LOGITS)
REWARD = jnp.asarray(_rng.uniform(0.0, 2.0, size=K), jnp.float32)


def _optimum() -> np.ndarray:
    """π*(y) = π_ref(y) exp(r(y)/β) / Z, in float64 NumPy."""
    unnorm = np.exp(np.asarray(REF_LOGP, np.float64) + np.asarray(REWARD, np.float64) / BETA)
    return unnorm / unnorm.sum()


def _tv(p, q) -> float:
    return 0.5 * float(np.sum(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64))))


def _train_ppo(key, iterations=300, batch=1024, epochs=4, minibatches=4, lr=0.05):
    opt = optax.adam(optax.cosine_decay_schedule(lr, iterations * epochs * minibatches, alpha=0.01))
    params = {"logits": REF_LOGITS, "value": jnp.zeros((), jnp.float32)}
    mb = batch // minibatches

    def loss_fn(p, actions_B, old_logps_BT, old_values_BT, adv_BT, returns_BT):
        mask_BT = jnp.ones_like(adv_BT)
        logps_BT = jax.nn.log_softmax(p["logits"])[actions_B][:, None]
        pg, _ = losses.ppo_policy_loss(logps_BT, old_logps_BT, adv_BT, mask_BT, clip_eps=0.2)
        vf, _ = losses.value_loss(jnp.broadcast_to(p["value"], adv_BT.shape), old_values_BT, returns_BT, mask_BT)
        return pg + vf

    def iteration(carry, key):
        params, opt_state = carry
        sample_key, perm_key = jax.random.split(key)
        actions_B = jax.random.categorical(sample_key, params["logits"], shape=(batch,))
        mask_BT = jnp.ones((batch, 1), jnp.float32)
        old_logps_BT = jax.nn.log_softmax(params["logits"])[actions_B][:, None]
        kl_BT = kl.kl_penalty(old_logps_BT, REF_LOGP[actions_B][:, None], estimator="k1")
        rewards_BT = advantages.per_token_rewards(REWARD[actions_B], kl_BT, mask_BT, kl_coef=BETA)
        old_values_BT = jnp.broadcast_to(params["value"], (batch, 1))
        adv_BT, returns_BT = advantages.gae(rewards_BT, old_values_BT, mask_BT, gamma=1.0, lam=0.95)
        adv_BT = advantages.whiten_advantages(adv_BT, mask_BT)
        data = (actions_B, old_logps_BT, old_values_BT, adv_BT, returns_BT)

        def minibatch_step(carry, idx):
            p, s = carry
            grads = jax.grad(loss_fn)(p, *(x[idx] for x in data))
            updates, s = opt.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        perms = jax.vmap(lambda k: jax.random.permutation(k, batch))(jax.random.split(perm_key, epochs))
        (params, opt_state), _ = jax.lax.scan(minibatch_step, (params, opt_state), perms.reshape(-1, mb))
        return (params, opt_state), None

    (params, _), _ = jax.lax.scan(iteration, (params, opt.init(params)), jax.random.split(key, iterations))
    return jax.nn.softmax(params["logits"])


def _train_dpo(key, iterations=600, batch=4096, lr=0.05):
    opt = optax.adam(optax.cosine_decay_schedule(lr, iterations, alpha=0.01))

    def iteration(carry, key):
        logits, opt_state = carry
        k1, k2, k3 = jax.random.split(key, 3)
        y1 = jax.random.randint(k1, (batch,), 0, K)
        y2 = jax.random.randint(k2, (batch,), 0, K)
        y1_wins = jax.random.bernoulli(k3, jax.nn.sigmoid(REWARD[y1] - REWARD[y2]))  # Bradley–Terry(r)
        chosen, rejected = jnp.where(y1_wins, y1, y2), jnp.where(y1_wins, y2, y1)

        def loss_fn(logits):
            logp = jax.nn.log_softmax(logits)
            return losses.dpo_loss(logp[chosen], logp[rejected], REF_LOGP[chosen], REF_LOGP[rejected], beta=BETA)[0]

        updates, opt_state = opt.update(jax.grad(loss_fn)(logits), opt_state, logits)
        return (optax.apply_updates(logits, updates), opt_state), None

    (logits, _), _ = jax.lax.scan(iteration, (REF_LOGITS, opt.init(REF_LOGITS)), jax.random.split(key, iterations))
    return jax.nn.softmax(logits)


def test_the_optimum_is_far_from_the_reference():
    """Guards the two tests below against passing trivially."""
    assert _tv(np.exp(REF_LOGP), _optimum()) > 0.3


def test_ppo_with_kl_penalty_reaches_the_kl_regularised_optimum():
    policy = jax.jit(_train_ppo)(jax.random.key(0))
    assert _tv(policy, _optimum()) < 0.02


def test_dpo_on_bradley_terry_pairs_reaches_the_same_optimum():
    policy = jax.jit(_train_dpo)(jax.random.key(1))
    assert _tv(policy, _optimum()) < 0.02


# --- GRPO (KL in the loss) and online DPO -----------------------------------------------------------
# GRPO's loss is  E[A·ρ] − β·E[KL_est]  with group-normalised A. In expectation over a group of N samples,
# A_i = (r_i − mean r)/std r gives (1 − 1/N)/σ_π times the gradient of E_π[r] (σ_π: the reward's std under π);
# RLOO's leave-one-out A_i gives exactly that gradient. The KL term's gradient under samples from π is that of
# KL(π ‖ π_ref) for k2 and of KL(π_ref ‖ π) for k3 (GRPO's published choice). So the fixed points are
#   k2:  π ∝ π_ref · exp(c·r/β)                     (c = 1 for RLOO, (1 − 1/N)/σ_π for GRPO)
#   k3:  π ∝ β·π_ref / (λ − c·r)                     (the forward-KL optimum, λ normalising)


def _train_grpo(key, *, estimator, kl_estimator, groups=64, n=16, iterations=400, lr=0.05, epochs=2):
    from rlhf_jax import registry

    opt = optax.adam(optax.cosine_decay_schedule(lr, iterations * epochs, alpha=0.01))
    B = groups * n

    def iteration(carry, key):
        logits, opt_state = carry
        actions_B = jax.random.categorical(key, logits, shape=(B,))
        mask_BT = jnp.ones((B, 1), jnp.float32)
        old_logps_BT = jax.nn.log_softmax(logits)[actions_B][:, None]
        inputs = advantages.AdvantageInputs(scores_B=REWARD[actions_B], kl_BT=jnp.zeros((B, 1)), mask_BT=mask_BT,
                                            num_samples=n)
        adv_BT, _ = registry.ADVANTAGES[estimator](inputs, kl_coef=0.0)

        def loss_fn(logits):
            logps_BT = jax.nn.log_softmax(logits)[actions_B][:, None]
            pg, _ = losses.ppo_policy_loss(logps_BT, old_logps_BT, adv_BT, mask_BT, clip_eps=0.2,
                                           aggregation="seq_mean_token_mean")
            kl_term, _ = kl.kl_loss(logps_BT, REF_LOGP[actions_B][:, None], mask_BT, estimator=kl_estimator,
                                    aggregation="seq_mean_token_mean")
            return pg + BETA * kl_term

        def epoch(carry, _):
            logits, opt_state = carry
            updates, opt_state = opt.update(jax.grad(loss_fn)(logits), opt_state, logits)
            return (optax.apply_updates(logits, updates), opt_state), None

        return jax.lax.scan(epoch, (logits, opt_state), None, length=epochs)[0], None

    (logits, _), _ = jax.lax.scan(iteration, (REF_LOGITS, opt.init(REF_LOGITS)), jax.random.split(key, iterations))
    return jax.nn.softmax(logits)


def _reverse_kl_optimum(c: float) -> np.ndarray:
    unnorm = np.exp(np.asarray(REF_LOGP, np.float64) + c * np.asarray(REWARD, np.float64) / BETA)
    return unnorm / unnorm.sum()


def _forward_kl_optimum(c: float) -> np.ndarray:
    """argmax_π c·E_π[r] − β·KL(π_ref ‖ π): π_y = β·π_ref(y) / (λ − c·r_y), λ > c·max r by bisection."""
    ref, r = np.exp(np.asarray(REF_LOGP, np.float64)), np.asarray(REWARD, np.float64)
    lo, hi = c * r.max() + 1e-12, c * r.max() + BETA * 1e3
    for _ in range(200):
        lam = 0.5 * (lo + hi)
        lo, hi = (lam, hi) if (BETA * ref / (lam - c * r)).sum() > 1 else (lo, lam)
    pi = BETA * ref / (lam - c * r)
    return pi / pi.sum()


def _grpo_scale(policy: np.ndarray, n: int) -> float:
    """c = (1 − 1/N)/σ_π: the group-normalised advantage's scale at the policy it converged to."""
    r = np.asarray(REWARD, np.float64)
    return (1 - 1 / n) / np.sqrt(np.sum(policy * (r - np.sum(policy * r)) ** 2))


def test_kl_in_the_loss_with_k2_and_an_unbiased_baseline_reaches_the_kl_regularised_optimum():
    """RLOO advantages + β·k2 in the loss: exactly the KL-regularised objective, so π* ∝ π_ref·exp(r/β)."""
    policy = jax.jit(lambda k: _train_grpo(k, estimator="rloo", kl_estimator="k2"))(jax.random.key(2))
    assert _tv(policy, _optimum()) < 0.02


def test_grpo_with_kl_in_the_loss_reaches_its_known_optimum():
    """GRPO's group-normalised advantages with β·k2 in the loss reach π ∝ π_ref·exp(c·r/β), c = (1 − 1/N)/σ_π:
    π* of the KL-regularised objective with the reward measured in units of its own std."""
    n = 16
    policy = jax.jit(lambda k: _train_grpo(k, estimator="grpo", kl_estimator="k2", n=n))(jax.random.key(3))
    policy = np.asarray(policy, np.float64)
    c = _grpo_scale(policy, n)
    assert _tv(policy, _reverse_kl_optimum(c)) < 0.02
    assert _tv(_reverse_kl_optimum(c), _optimum()) > 0.05  # the std normalisation moves the optimum


def _closest(policy: np.ndarray, family) -> float:
    """The smallest TV from ``policy`` to ``family(c)`` over reward scales c (a log grid, then refined)."""
    grid = np.geomspace(0.01, 100.0, 400)
    best = min(grid, key=lambda c: _tv(policy, family(c)))
    fine = np.linspace(best / 1.05, best * 1.05, 200)
    return min(_tv(policy, family(c)) for c in fine)


def test_grpo_with_the_published_k3_kl_reaches_a_forward_kl_optimum():
    """GRPO as published (k3 in the loss): the gradient is that of KL(π_ref ‖ π), so it converges onto the
    forward-KL optima π ∝ β·π_ref/(λ − c·r) and off the reverse-KL family π ∝ π_ref·exp(c·r/β) for every reward
    scale c. (c itself drifts from (1 − 1/N)/σ_π when a peaked policy leaves groups without variance.)"""
    policy = jax.jit(lambda k: _train_grpo(k, estimator="grpo", kl_estimator="k3", n=64, groups=32))(jax.random.key(4))
    policy = np.asarray(policy, np.float64)
    assert _closest(policy, _forward_kl_optimum) < 0.02
    assert _closest(policy, _reverse_kl_optimum) > 0.05


def _train_online_dpo(key, iterations=800, batch=4096, lr=0.05):
    """Pairs sampled from the *current* policy, labelled by Bradley–Terry(r), one DPO step per iteration."""
    opt = optax.adam(optax.cosine_decay_schedule(lr, iterations, alpha=0.01))

    def iteration(carry, key):
        logits, opt_state = carry
        k1, k2 = jax.random.split(key)
        pair = jax.random.categorical(k1, logits, shape=(batch, 2))
        y1, y2 = pair[:, 0], pair[:, 1]
        y1_wins = jax.random.bernoulli(k2, jax.nn.sigmoid(REWARD[y1] - REWARD[y2]))
        chosen, rejected = jnp.where(y1_wins, y1, y2), jnp.where(y1_wins, y2, y1)

        def loss_fn(logits):
            logp = jax.nn.log_softmax(logits)
            return losses.dpo_loss(logp[chosen], logp[rejected], REF_LOGP[chosen], REF_LOGP[rejected], beta=BETA,
                                   weights_B=(chosen != rejected).astype(jnp.float32))[0]

        updates, opt_state = opt.update(jax.grad(loss_fn)(logits), opt_state, logits)
        return (optax.apply_updates(logits, updates), opt_state), None

    (logits, _), _ = jax.lax.scan(iteration, (REF_LOGITS, opt.init(REF_LOGITS)), jax.random.split(key, iterations))
    return jax.nn.softmax(logits)


def test_online_dpo_on_its_own_samples_reaches_the_kl_regularised_optimum():
    policy = jax.jit(_train_online_dpo)(jax.random.key(5))
    assert _tv(policy, _optimum()) < 0.02
