# %% [markdown]
# # Loss ablation on a one-step bandit: PPO vs DPO vs IPO vs SimPO
#
# A "language model" that answers every prompt with one token out of 8. The policy is a logits
# vector, the reference π_ref is a fixed softmax, and a reward r(y) is known. KL-regularised RLHF,
#
#     max_π  E_π[r(y)] − β · KL(π ‖ π_ref),
#
# has the closed-form optimum π*(y) ∝ π_ref(y) · exp(r(y) / β) (Rafailov et al. 2023, eq. 4).
# We train each loss from `rlhf_jax.losses` and measure how far it lands from π* (total variation)
# and how far it drifted from π_ref (KL):
#
# - **PPO**: sampled actions, reward = r(y) − β·k1 per token, learned value, GAE, clipped surrogate.
# - **DPO / IPO / SimPO**: pairs of actions labelled by Bradley–Terry(r), the same β.
#
# Run as a script or open as a notebook (jupytext percent format). `BANDIT_ITERATIONS` sets the budget.

# %%
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import advantages, kl, losses

ITERATIONS = int(os.environ.get("BANDIT_ITERATIONS", "300"))  # PPO iterations; preference losses get 2x
K, BETA, SIMPO_GAMMA = 8, 0.5, 0.5
rng = np.random.default_rng(0)
ref_logits = jnp.asarray(rng.normal(size=K), jnp.float32)
ref_logp = jax.nn.log_softmax(ref_logits)
reward = jnp.asarray(rng.uniform(0.0, 2.0, size=K), jnp.float32)
optimum = jax.nn.softmax(ref_logp + reward / BETA)
np.set_printoptions(precision=4, suppress=True)
print("beta =", BETA)
print("pi_ref =", np.asarray(jnp.exp(ref_logp)))
print("reward =", np.asarray(reward))
print("pi_star =", np.asarray(optimum))


# %% [markdown]
# ## PPO, as in RLHF
# Each iteration samples a batch from the current policy, folds the KL penalty into the reward
# (`advantages.per_token_rewards`), computes GAE against a learned scalar value, whitens the
# advantages, then runs 4 epochs of 4 minibatches of the clipped surrogate + clipped value loss.

# %%
def train_ppo(key, iterations, batch=1024, epochs=4, minibatches=4, lr=0.05):
    opt = optax.adam(optax.cosine_decay_schedule(lr, iterations * epochs * minibatches, alpha=0.01))
    params = {"logits": ref_logits, "value": jnp.zeros((), jnp.float32)}

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
        kl_BT = kl.kl_penalty(old_logps_BT, ref_logp[actions_B][:, None], estimator="k1")
        rewards_BT = advantages.per_token_rewards(reward[actions_B], kl_BT, mask_BT, kl_coef=BETA)
        old_values_BT = jnp.broadcast_to(params["value"], (batch, 1))
        adv_BT, returns_BT = advantages.gae(rewards_BT, old_values_BT, mask_BT, gamma=1.0, lam=0.95)
        adv_BT = advantages.whiten_advantages(adv_BT, mask_BT)
        data = (actions_B, old_logps_BT, old_values_BT, adv_BT, returns_BT)

        def minibatch_step(carry, idx):
            p, s = carry
            updates, s = opt.update(jax.grad(loss_fn)(p, *(x[idx] for x in data)), s, p)
            return (optax.apply_updates(p, updates), s), None

        perms = jax.vmap(lambda k: jax.random.permutation(k, batch))(jax.random.split(perm_key, epochs))
        (params, opt_state), _ = jax.lax.scan(minibatch_step, (params, opt_state), perms.reshape(-1, batch // minibatches))
        return (params, opt_state), None

    (params, _), _ = jax.lax.scan(iteration, (params, opt.init(params)), jax.random.split(key, iterations))
    return jax.nn.softmax(params["logits"])


# %% [markdown]
# ## Preference losses on Bradley–Terry pairs
# Fresh pairs (y1, y2) uniform over actions each step; y1 wins with probability σ(r(y1) − r(y2)).
# The variants come from `losses.DPO_VARIANTS`; all three train in one compiled program
# (`lax.switch` picks the loss, `vmap` runs the variants side by side).

# %%
PREFERENCE_VARIANTS = ("dpo", "ipo", "simpo")


def preference_loss(index, logits, chosen, rejected):
    logp = jax.nn.log_softmax(logits)
    args = (logp[chosen], logp[rejected], ref_logp[chosen], ref_logp[rejected])
    branches = [
        lambda name=name: losses.DPO_VARIANTS[name](*args, beta=BETA, simpo_gamma=SIMPO_GAMMA)[0]
        for name in PREFERENCE_VARIANTS
    ]
    return jax.lax.switch(index, branches)


def train_preference(key, index, iterations, batch=4096, lr=0.05):
    opt = optax.adam(optax.cosine_decay_schedule(lr, iterations, alpha=0.01))

    def iteration(carry, key):
        logits, opt_state = carry
        k1, k2, k3 = jax.random.split(key, 3)
        y1, y2 = jax.random.randint(k1, (batch,), 0, K), jax.random.randint(k2, (batch,), 0, K)
        y1_wins = jax.random.bernoulli(k3, jax.nn.sigmoid(reward[y1] - reward[y2]))
        chosen, rejected = jnp.where(y1_wins, y1, y2), jnp.where(y1_wins, y2, y1)
        grads = jax.grad(lambda lg: preference_loss(index, lg, chosen, rejected))(logits)
        updates, opt_state = opt.update(grads, opt_state, logits)
        return (optax.apply_updates(logits, updates), opt_state), None

    (logits, _), _ = jax.lax.scan(iteration, (ref_logits, opt.init(ref_logits)), jax.random.split(key, iterations))
    return jax.nn.softmax(logits)


# %%
def total_variation(p, q):
    return 0.5 * float(jnp.sum(jnp.abs(p - q)))


def kl_to_reference(p):
    return float(jnp.sum(p * (jnp.log(p) - ref_logp)))


ppo_policy = jax.jit(train_ppo, static_argnums=1)(jax.random.key(0), ITERATIONS)
train_all = jax.jit(jax.vmap(train_preference, in_axes=(None, 0, None)), static_argnums=2)
preference_policies = train_all(jax.random.key(1), jnp.arange(len(PREFERENCE_VARIANTS)), 2 * ITERATIONS)
policies = {"reference": jnp.exp(ref_logp), "optimum": optimum, "ppo": ppo_policy}
policies.update(zip(PREFERENCE_VARIANTS, preference_policies))

# %% [markdown]
# ## Results
# Expect PPO and DPO near π* (TV ≈ 0); IPO optimises a different objective (it regresses the
# log-ratio gap towards the preference probability, Azar et al. 2023 §5) and SimPO has no
# reference at all, so neither lands on π*, and SimPO's KL to π_ref is not controlled by β.

# %%
print("\n| method | TV to pi_star | KL to pi_ref | policy |")
print("|---|---|---|---|")
for name, p in policies.items():
    probs = " ".join(f"{x:.6f}" for x in np.asarray(p))
    print(f"| {name} | {total_variation(p, optimum):.4f} | {kl_to_reference(p):.4f} | {probs} |")
