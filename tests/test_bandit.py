"""Known optimum: on a one-step bandit, KL-regularised RLHF must reach π*(y) ∝ π_ref(y)·exp(r(y)/β).

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
