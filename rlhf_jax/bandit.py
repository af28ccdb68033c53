"""A one-step bandit with a known optimum, and every RLHF loss of the library trained on it.

A "language model" that answers every prompt with one token out of V: the policy is a logits vector
``logits_V``, the reference π_ref a fixed softmax and the reward r(y) a known vector. KL-regularised RLHF,

    max_π  E_{y~π}[r(y)] − β·KL(π ‖ π_ref),

has the closed-form optimum (Rafailov et al. 2023, eq. 4)

    π*(y) = π_ref(y)·exp(r(y)/β) / Z,

so every loss can be scored by how far it lands from π* (total variation) and how far it drifts from
π_ref (KL). The losses are the library's own, reached through :mod:`rlhf_jax.registry`:

- policy gradient (:func:`train_policy_gradient`): an :class:`rlhf_jax.rl.algorithms.Algorithm` (PPO,
  the GRPO family, RLOO, REINFORCE++ or any combination of advantage estimator, policy loss, KL
  placement, KL estimator and aggregation), scored like :func:`rlhf_jax.rl.steps.score_rollout` and
  updated with :func:`rlhf_jax.rl.objective.rl_loss` like :func:`rlhf_jax.rl.steps.make_update_step`;
- preferences (:func:`train_preference`): ``registry.PREFERENCE_LOSSES`` (DPO, cDPO, robust DPO, IPO,
  SimPO) on Bradley–Terry pairs, offline (pairs drawn uniformly) or online (pairs drawn from the
  current policy), and KTO (:func:`rlhf_jax.losses.kto_loss`) on the pairs split into thumbs up/down.

Every trainer is a pure, jittable function of a PRNG key and a variant index that returns the policy after
each iteration. Seeds run side by side (``vmap``) and the variants of one comparison share one compiled
program (the index picks a ``lax.switch`` branch), see :func:`over_seeds`::

    bandit = make_bandit()
    setups = (PreferenceSetup("dpo"), PreferenceSetup("ipo"))
    run = over_seeds(functools.partial(train_preference, bandit=bandit, setups=setups, iterations=300, pairs=4096))
    probs_SIV = run(seed_keys(0, 4), 1)                  # IPO, 4 seeds: (4, 300, V)
    tv_SI = total_variation(probs_SIV, reverse_kl_optimum(bandit))

Shapes: ``V`` actions (the vocabulary of one-token responses), ``B`` rows (samples or pairs), ``T`` = 1
response token, ``N`` samples per prompt (a group), ``I`` iterations, ``S`` seeds.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import advantages, kl, losses, ops, registry
from rlhf_jax.metrics import Metrics
from rlhf_jax.rl.algorithms import Algorithm
from rlhf_jax.rl.objective import RLBatch, rl_loss

KTO = "kto"
"""The name :func:`train_preference` takes for KTO (unpaired feedback, not in ``registry.PREFERENCE_LOSSES``)."""


# --- The environment and its optima ------------------------------------------------------------------------


@flax.struct.dataclass
class Bandit:
    """One prompt, V one-token responses, a reference policy, a reward and the KL coefficient β."""

    ref_logits_V: jax.Array
    """Logits of the reference policy π_ref (also every trainer's initial policy)."""
    reward_V: jax.Array
    """r(y) for each action."""
    beta: float = flax.struct.field(pytree_node=False, default=0.5)
    """β: the KL coefficient of the objective (and the β of every loss trained on it)."""

    @property
    def ref_logps_V(self) -> jax.Array:
        """log π_ref."""
        return jax.nn.log_softmax(self.ref_logits_V)


def make_bandit(num_actions: int = 8, *, beta: float = 0.5, seed: int = 0) -> Bandit:
    """The bandit of the tests and notebooks: ``ref_logits ~ N(0, 1)``, ``r ~ U(0, 2)`` from NumPy's
    ``default_rng(seed)`` (V = 8, β = 0.5: π* is 0.5 in total variation from π_ref)."""
    rng = np.random.default_rng(seed)
    ref_logits_V = jnp.asarray(rng.normal(size=num_actions), jnp.float32)
    reward_V = jnp.asarray(rng.uniform(0.0, 2.0, size=num_actions), jnp.float32)
    return Bandit(ref_logits_V=ref_logits_V, reward_V=reward_V, beta=beta)


def reverse_kl_optimum(bandit: Bandit, scale: float | jax.Array = 1.0, *, reward_V: jax.Array | None = None) -> jax.Array:
    """``argmax_π c·E_π[g] − β·KL(π ‖ π_ref)``, c = ``scale``, g = ``reward_V`` (default r):
    ``π ∝ π_ref·exp(c·g/β)`` (π* at c = 1, g = r).

    c ≠ 1 is where an advantage rescaled against a KL term lands (GRPO's std normalisation with the KL
    in the loss: :func:`grpo_scale`); g ≠ r where it is reshaped (:func:`expected_advantage`).
    """
    g_V = bandit.reward_V if reward_V is None else reward_V
    return jax.nn.softmax(bandit.ref_logps_V + scale * g_V / bandit.beta)


def forward_kl_optimum(bandit: Bandit, scale: float | jax.Array = 1.0, *, reward_V: jax.Array | None = None,
                       bisections: int = 64) -> jax.Array:
    """``argmax_π c·E_π[g] − β·KL(π_ref ‖ π)``, g = ``reward_V`` (default r): the optimum when the KL gradient is
    the forward KL's (k3 in the loss, with samples from π).

    Stationarity of the Lagrangian, ``c·g(y) + β·π_ref(y)/π(y) = λ``, gives

        π(y) = β·π_ref(y) / (λ − c·g(y)),      λ ∈ (c·max g, c·max g + β] with Σ_y π(y) = 1,

    solved for λ by bisection (Σ_y π(y) falls as λ grows; it is ≤ 1 at λ = c·max g + β).
    """
    ref_V = jnp.exp(bandit.ref_logps_V)
    g_V = scale * (bandit.reward_V if reward_V is None else reward_V)
    top = jnp.max(g_V)

    def halve(_, bounds):
        lo, hi = bounds
        lam = 0.5 * (lo + hi)
        too_big = jnp.sum(bandit.beta * ref_V / (lam - g_V)) > 1.0
        return jnp.where(too_big, lam, lo), jnp.where(too_big, hi, lam)

    lo, hi = jax.lax.fori_loop(0, bisections, halve, (top, top + bandit.beta))
    probs_V = bandit.beta * ref_V / (hi - g_V)
    return probs_V / jnp.sum(probs_V)


def ipo_optimum(bandit: Bandit) -> jax.Array:
    """IPO's optimum on pairs drawn uniformly with Bradley–Terry labels (Azar et al. 2023, §5.2).

    Per pair, the expected loss ``p·(h − 1/(2β))² + (1 − p)·(h + 1/(2β))²`` is least at
    ``h = (p − ½)/β``, p = σ(r(y) − r(y')). A policy's h is ``f(y) − f(y')`` with f = log π − log π_ref,
    and the least-squares f over all pairs (uniform weights) is the row mean:

        log π(y) = log π_ref(y) + (1/(βV)) Σ_{y'} (σ(r(y) − r(y')) − ½) + const.
    """
    p_VV = jax.nn.sigmoid(bandit.reward_V[:, None] - bandit.reward_V[None, :])
    return jax.nn.softmax(bandit.ref_logps_V + jnp.mean(p_VV - 0.5, axis=1) / bandit.beta)


def grpo_scale(bandit: Bandit, probs_V: jax.Array, samples_per_prompt: int) -> jax.Array:
    """``c = (1 − 1/N) / σ_π(r)``: the scale GRPO's group-normalised advantage gives the reward at policy π.

    In expectation over a group of N samples, ``A_i = (r_i − mean r)/std r`` gives (1 − 1/N)/σ_π times the
    gradient of E_π[r]; against a KL term in the loss that is the objective c·E_π[r] − β·KL, whose
    optimum is :func:`reverse_kl_optimum` (k2) or :func:`forward_kl_optimum` (k3) at scale c.
    """
    mean = jnp.sum(probs_V * bandit.reward_V, axis=-1, keepdims=True)
    std = jnp.sqrt(jnp.sum(probs_V * jnp.square(bandit.reward_V - mean), axis=-1))
    return (1.0 - 1.0 / samples_per_prompt) / std


def expected_advantage(bandit: Bandit, probs_V: jax.Array, *, advantage: str, samples_per_prompt: int) -> jax.Array:
    """``g(j) = E[A_1 | y_1 = j]``: the expected advantage that the group estimator ``registry.ADVANTAGES[advantage]``
    (scores r, no KL in the reward) gives action j sampled among N − 1 other samples from π, exactly, by
    enumerating the V^(N−1) other samples (keep V^N small: 8^4 = 4096 groups).

    RLOO gives ``r(j) − E_π[r]``, Dr. GRPO ``(1 − 1/N)·(r(j) − E_π[r])``; GRPO's division by the group's std
    has no such closed form at small N (:func:`grpo_scale` is its large-N limit). The policy-gradient term
    moves logit j by ``π_j·(g(j) − E_π[g])``, so with β·KL in the loss its fixed points are
    ``reverse_kl_optimum(reward_V=g)`` (k2) and ``forward_kl_optimum(reward_V=g)`` (k3), g taken at the
    fixed point itself. Only for estimators whose advantage depends on the group alone (not on a critic or
    on batch-wide statistics).
    """
    V, N = probs_V.shape[-1], samples_per_prompt
    groups_GN = jnp.stack(jnp.unravel_index(jnp.arange(V ** N), (V,) * N), axis=-1)
    actions_B = groups_GN.reshape(-1)
    inputs = advantages.AdvantageInputs(scores_B=bandit.reward_V[actions_B], kl_BT=jnp.zeros((V ** N * N, 1)),
                                        mask_BT=jnp.ones((V ** N * N, 1)), num_samples=N)
    first_G = registry.ADVANTAGES[advantage](inputs, kl_coef=0.0)[0][:, 0].reshape(-1, N)[:, 0]
    others_weight_G = jnp.prod(probs_V[groups_GN[:, 1:]], axis=-1)  # P(the other N − 1 samples)
    return jax.ops.segment_sum(others_weight_G * first_G, groups_GN[:, 0], num_segments=V)


def total_variation(p_V: jax.Array, q_V: jax.Array) -> jax.Array:
    """``TV(p, q) = ½ Σ_y |p(y) − q(y)|`` over the last axis (0: equal, 1: disjoint supports)."""
    return 0.5 * jnp.sum(jnp.abs(p_V - q_V), axis=-1)


def kl_divergence(p_V: jax.Array, q_V: jax.Array) -> jax.Array:
    """``KL(p ‖ q) = Σ_y p(y)·(log p(y) − log q(y))`` over the last axis (0·log 0 = 0)."""
    return jnp.sum(jax.scipy.special.xlogy(p_V, p_V) - jax.scipy.special.xlogy(p_V, q_V), axis=-1)


# --- Randomness and seeds ------------------------------------------------------------------------------------


def sample_actions(u_B: jax.Array, logits_V: jax.Array) -> jax.Array:
    """Inverse-CDF sampling: ``y = #{v < V − 1 : u ≥ F(v)}`` with F the CDF of ``softmax(logits_V)``, so
    u ~ U[0, 1) gives y ~ π. (The trainers draw uniforms, not categorical samples: see :func:`train_policy_gradient`.)"""
    cdf_V = jnp.cumsum(jax.nn.softmax(logits_V))
    return jnp.sum(u_B[:, None] >= cdf_V[None, :-1], axis=-1)


def seed_keys(seed: int, num_seeds: int) -> jax.Array:
    """``num_seeds`` PRNG keys split from ``seed`` (the batch :func:`over_seeds` vmaps over)."""
    return jax.random.split(jax.random.key(seed), num_seeds)


def over_seeds(train: Callable[[jax.Array, jax.Array], jax.Array]) -> Callable[[jax.Array, int], jax.Array]:
    """``jit(vmap(train, in_axes=(0, None)))``: ``run(keys_S, variant)`` trains every seed in one compiled program
    and returns the trainer's output with a leading S axis. ``train(key, variant)`` is a trainer with its
    keyword arguments bound (``functools.partial``); keep ``run`` and call it for each variant: the
    variant index is traced, so all variants share one compilation."""
    return jax.jit(jax.vmap(train, in_axes=(0, None)))


def _optimizer(lr: float, updates: int) -> optax.GradientTransformation:
    """Adam with a cosine decay from ``lr`` to ``lr/100`` over ``updates`` steps (every trainer's optimizer)."""
    return optax.adam(optax.cosine_decay_schedule(lr, updates, alpha=0.01))


# --- Policy gradient: PPO, the GRPO family, RLOO, REINFORCE++ -------------------------------------------------


def score_actions(bandit: Bandit, params: dict, actions_B: jax.Array, *, algo: Algorithm) -> RLBatch:
    """The bandit's :func:`rlhf_jax.rl.steps.score_rollout`: log-probs of the sampled actions under the policy
    and the reference, scores r(y), the per-token KL estimate and the advantages, no gradients.

    Each row is one response of T = 1 token; rows ``N·g … N·g + N − 1`` are the N samples of "prompt" g.
    The advantages are ``registry.ADVANTAGES[algo.advantage]`` with β = ``algo.kl_coef`` when the KL
    sits in the reward (0 otherwise); the critic's value is one number, ``params["value"]`` (the bandit
    has one state). DAPO's dynamic sampling drops (masks) the groups whose N scores are all equal
    instead of drawing more; the overlong filter has nothing to filter (every response ends).
    Without a critic, ``old_values_BT`` and ``returns_BT`` are zeros (unread), so every algorithm's
    batch has the same structure.
    """
    B, N = actions_B.shape[0], algo.samples_per_prompt
    mask_BT = jnp.ones((B, 1), jnp.float32)
    logps_BT = jax.nn.log_softmax(params["logits_V"])[actions_B][:, None]
    ref_logps_BT = bandit.ref_logps_V[actions_B][:, None]
    scores_B = bandit.reward_V[actions_B]
    values_BT = jnp.broadcast_to(params["value"], (B, 1)) if algo.needs_critic else None
    kl_BT = kl.kl_penalty(logps_BT, ref_logps_BT, estimator=algo.kl_estimator)
    inputs = advantages.AdvantageInputs(scores_B=scores_B, kl_BT=kl_BT, mask_BT=mask_BT, values_BT=values_BT,
                                        num_samples=N)
    beta = algo.kl_coef if algo.kl_in_reward else 0.0
    advantages_BT, returns_BT = registry.ADVANTAGES[algo.advantage](inputs, kl_coef=beta, gamma=algo.gamma,
                                                                    lam=algo.lam)
    if algo.dynamic_sampling:
        keep_G = advantages.groups_with_signal(scores_B.reshape(-1, N))
        mask_BT = mask_BT * jnp.repeat(keep_G.astype(jnp.float32), N)[:, None]
    zeros_BT = jnp.zeros((B, 1), jnp.float32)
    return jax.lax.stop_gradient(RLBatch(
        input_ids_BT=actions_B[:, None].astype(jnp.int32), attention_mask_BT=jnp.ones((B, 1), jnp.int32),
        response_mask_BT=mask_BT, old_logps_BT=logps_BT, ref_logps_BT=ref_logps_BT,
        advantages_BT=advantages_BT * mask_BT, scores_B=scores_B,
        old_values_BT=values_BT if algo.needs_critic else zeros_BT,
        returns_BT=returns_BT if algo.needs_critic else zeros_BT))


def policy_gradient_loss(params: dict, batch: RLBatch, *, algo: Algorithm) -> tuple[jax.Array, Metrics]:
    """:func:`rlhf_jax.rl.objective.rl_loss` on the policy's log-probs of ``batch``'s actions:

        policy loss (registry.POLICY_LOSSES, aggregated by algo.aggregation)
        + vf_coef · clipped value loss          (estimators with a critic)
        + β · KL loss (algo.kl_estimator)        (KL placement "loss")

    The entropy is the policy's (one state, so the same on every row); ``max_len`` is 1 token.
    """
    logits_V = params["logits_V"]
    actions_B = batch.input_ids_BT[:, 0]
    logps_BT = jax.nn.log_softmax(logits_V)[actions_B][:, None]
    entropy_BT = jnp.broadcast_to(ops.entropy_from_logits(logits_V[None, None]), logps_BT.shape)
    values_BT = jnp.broadcast_to(params["value"], logps_BT.shape) if algo.needs_critic else None
    return rl_loss(logps_BT, entropy_BT, values_BT, batch, algo=algo, max_len=1)


def policy_gradient_update(params: dict, opt_state, batch: RLBatch, u_EB: jax.Array, *,
                           grad_fn: Callable[[dict, RLBatch], dict], optimizer: optax.GradientTransformation,
                           minibatches: int):
    """E epochs over the batch, each in ``minibatches`` shuffled minibatches (the permutation sorts the row's
    uniform ``u_EB[e]``), one optimizer step of ``grad_fn(params, minibatch)`` each, as
    :func:`rlhf_jax.rl.steps.make_update_step`. Returns ``(params, opt_state)``."""
    rows = batch.scores_B.shape[0]
    if rows % minibatches:
        raise ValueError(f"{rows} rows do not split into {minibatches} minibatches")

    def minibatch(carry, idx_M):
        params, opt_state = carry
        grads = grad_fn(params, jax.tree.map(lambda x: x[idx_M], batch))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    def epoch(carry, u_B):
        idx_NM = jnp.argsort(u_B).reshape(minibatches, rows // minibatches)
        return jax.lax.scan(minibatch, carry, idx_NM)[0], None

    return jax.lax.scan(epoch, (params, opt_state), u_EB)[0]


def train_policy_gradient(key: jax.Array, variant: int | jax.Array = 0, *, bandit: Bandit,
                          algos: Sequence[Algorithm], iterations: int, samples: int, epochs: int = 1,
                          minibatches: int = 1, lr: float = 0.05) -> jax.Array:
    """Online RL on the bandit with ``algos[variant]``: each iteration samples ``samples`` actions from the
    current policy (``samples / N`` "prompts" of N = ``samples_per_prompt`` responses), scores them
    (:func:`score_actions`) and takes ``epochs × minibatches`` Adam steps of :func:`policy_gradient_loss`
    (:func:`policy_gradient_update`); the learning rate decays from ``lr`` to ``lr/100`` (cosine) over the
    run. The policy starts at π_ref, the critic's value (read by estimators with a critic) at 0.

    The KL coefficient is the bandit's β whatever ``algo.kl_coef`` says (the presets' own β are for
    language models), so π* is the KL-regularised optimum of every run that has a KL.

    ``variant`` may be traced: the algorithms are branches of one ``lax.switch`` (scoring and loss
    gradient), so a comparison of many algorithms compiles once. For the same reason each iteration draws
    its randomness as one array of uniforms (sampling by :func:`sample_actions`, shuffling by sorting):
    XLA on CPU takes about a second to compile each random-number generator inside a loop.

    Returns ``probs_IV``: the policy after each iteration. Pure and jittable (static: everything but
    ``key`` and ``variant``).
    """
    algos = tuple(dataclasses.replace(a, kl_coef=bandit.beta) for a in algos)
    for a in algos:
        if samples % a.samples_per_prompt:
            raise ValueError(f"samples={samples} is not a multiple of samples_per_prompt={a.samples_per_prompt}")
    scorers = [functools.partial(score_actions, bandit, algo=a) for a in algos]
    grad_fns = [functools.partial(lambda p, b, a: jax.grad(policy_gradient_loss, has_aux=True)(p, b, algo=a)[0], a=a)
                for a in algos]
    optimizer = _optimizer(lr, iterations * epochs * minibatches)
    params = {"logits_V": bandit.ref_logits_V, "value": jnp.zeros((), jnp.float32)}

    def iteration(carry, key):
        params, opt_state = carry
        u_EB = jax.random.uniform(key, (1 + epochs, samples))
        actions_B = sample_actions(u_EB[0], params["logits_V"])
        batch = jax.lax.switch(variant, scorers, params, actions_B)
        grad_fn = functools.partial(jax.lax.switch, variant, grad_fns)
        params, opt_state = policy_gradient_update(params, opt_state, batch, u_EB[1:], grad_fn=grad_fn,
                                                   optimizer=optimizer, minibatches=minibatches)
        return (params, opt_state), jax.nn.softmax(params["logits_V"])

    _, probs_IV = jax.lax.scan(iteration, (params, optimizer.init(params)), jax.random.split(key, iterations))
    return probs_IV


# --- Preferences: the DPO family, online DPO, KTO -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PreferenceSetup:
    """One preference-optimisation run: the loss, where the pairs come from, how noisy their labels are."""

    loss: str = "dpo"
    """A name of ``registry.PREFERENCE_LOSSES`` (dpo, cdpo, robust, ipo, simpo), or ``"kto"``."""
    on_policy: bool = False
    """Pairs drawn from the current policy (online DPO) instead of uniformly over the actions (offline data)."""
    flip_rate: float = 0.0
    """Probability that a pair's Bradley–Terry label is flipped (noisy annotators)."""
    options: tuple[tuple[str, float], ...] = ()
    """Keyword options of the loss, e.g. ``(("label_smoothing", 0.1),)`` for cDPO / robust DPO."""


def preference_pairs(u_B4: jax.Array, bandit: Bandit, logits_V: jax.Array, *, on_policy: bool = False,
                     flip_rate: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """``(chosen_B, rejected_B)`` from four uniforms per pair: a pair (y1, y2) drawn independently and
    uniformly over the actions (offline data), or from the policy ``logits_V`` (``on_policy``: online DPO,
    Guo et al. 2024), labelled by Bradley–Terry on r,

        P(y1 ≻ y2) = σ(r(y1) − r(y2)),

    then the label flipped with probability ``flip_rate`` (noisy annotators). A pair may hold one
    action twice (a tie)."""
    V = logits_V.shape[-1]
    if on_policy:
        y1_B, y2_B = sample_actions(u_B4[:, 0], logits_V), sample_actions(u_B4[:, 1], logits_V)
    else:
        y1_B, y2_B = (jnp.minimum(jnp.floor(u_B4[:, i] * V), V - 1).astype(jnp.int32) for i in (0, 1))
    y1_wins_B = u_B4[:, 2] < jax.nn.sigmoid(bandit.reward_V[y1_B] - bandit.reward_V[y2_B])
    y1_wins_B = y1_wins_B ^ (u_B4[:, 3] < flip_rate)
    return jnp.where(y1_wins_B, y1_B, y2_B), jnp.where(y1_wins_B, y2_B, y1_B)


def preference_loss(logits_V: jax.Array, bandit: Bandit, chosen_B: jax.Array, rejected_B: jax.Array, *,
                    loss: str = "dpo", **options) -> tuple[jax.Array, Metrics]:
    """``registry.PREFERENCE_LOSSES[loss]`` (β = the bandit's) on the sequence log-probs of the pairs, which on
    the bandit are the log-probs of one token; ties (chosen = rejected) weigh 0. ``options`` go to the loss
    (``label_smoothing`` for cDPO / robust DPO, ``simpo_gamma``). For DPO, the per-pair loss is

        −log σ(β·[(log π − log π_ref)(y_w) − (log π − log π_ref)(y_l)])

    whose minimiser under Bradley–Terry(r) labels is π* (Rafailov et al. 2023, §4)."""
    logps_V = jax.nn.log_softmax(logits_V)
    ref_logps_V = bandit.ref_logps_V
    return registry.PREFERENCE_LOSSES[loss](
        logps_V[chosen_B], logps_V[rejected_B], ref_logps_V[chosen_B], ref_logps_V[rejected_B], beta=bandit.beta,
        weights_B=(chosen_B != rejected_B).astype(jnp.float32), **options)


def kto_loss(logits_V: jax.Array, bandit: Bandit, chosen_B: jax.Array, rejected_B: jax.Array,
             **options) -> tuple[jax.Array, Metrics]:
    """:func:`rlhf_jax.losses.kto_loss` (β = the bandit's) on the pairs split into unpaired feedback: each
    chosen response a thumbs-up, each rejected one a thumbs-down (how the KTO paper turns preference data
    into its format). The reference point z_0 comes from mismatched pairs, another row's completion (the
    row before, as :func:`rlhf_jax.objectives.mismatched_pairs`); with one prompt that is

        z_0 = max(0, mean_b [log π(y_b) − log π_ref(y_b)])

    over the batch's responses, an estimate of KL(π ‖ π_ref) only where they are drawn from π."""
    logps_V = jax.nn.log_softmax(logits_V)
    actions_B = jnp.concatenate([chosen_B, rejected_B])
    desirable_B = jnp.concatenate([jnp.ones_like(chosen_B), jnp.zeros_like(rejected_B)]).astype(jnp.float32)
    policy_B, ref_B = logps_V[actions_B], bandit.ref_logps_V[actions_B]
    return losses.kto_loss(policy_B, ref_B, jnp.roll(policy_B, 1), jnp.roll(ref_B, 1), desirable_B,
                           beta=bandit.beta, **options)


def preference_gradient(logits_V: jax.Array, u_B4: jax.Array, *, bandit: Bandit, setup: PreferenceSetup) -> jax.Array:
    """The gradient of ``setup``'s loss (:func:`preference_loss`, or :func:`kto_loss` for ``"kto"``) on the
    pairs :func:`preference_pairs` makes of the uniforms ``u_B4``."""
    chosen_B, rejected_B = preference_pairs(u_B4, bandit, logits_V, on_policy=setup.on_policy,
                                            flip_rate=setup.flip_rate)
    objective = kto_loss if setup.loss == KTO else functools.partial(preference_loss, loss=setup.loss)
    grads, _ = jax.grad(objective, has_aux=True)(logits_V, bandit, chosen_B, rejected_B, **dict(setup.options))
    return grads


def train_preference(key: jax.Array, variant: int | jax.Array = 0, *, bandit: Bandit,
                     setups: Sequence[PreferenceSetup], iterations: int, pairs: int, lr: float = 0.05) -> jax.Array:
    """Preference optimisation on the bandit with ``setups[variant]``: each iteration draws ``pairs`` fresh
    labelled pairs (:func:`preference_pairs`: uniform offline data, or the current policy's samples) and
    takes one Adam step (learning rate ``lr`` decaying to ``lr/100``, cosine) of the setup's loss
    (:func:`preference_gradient`). The policy starts at π_ref.

    ``variant`` may be traced (the setups are branches of one ``lax.switch``; randomness is drawn as
    uniforms outside it), so a comparison of many losses compiles once, as in :func:`train_policy_gradient`.

    Returns ``probs_IV``: the policy after each iteration. Pure and jittable (static: everything but
    ``key`` and ``variant``).
    """
    for s in setups:
        if s.loss != KTO:
            registry.PREFERENCE_LOSSES.check(s.loss, "PreferenceSetup.loss")
    grad_fns = [functools.partial(preference_gradient, bandit=bandit, setup=s) for s in setups]
    optimizer = _optimizer(lr, iterations)

    def iteration(carry, key):
        logits_V, opt_state = carry
        grads = jax.lax.switch(variant, grad_fns, logits_V, jax.random.uniform(key, (pairs, 4)))
        updates, opt_state = optimizer.update(grads, opt_state, logits_V)
        logits_V = optax.apply_updates(logits_V, updates)
        return (logits_V, opt_state), jax.nn.softmax(logits_V)

    init = (bandit.ref_logits_V, optimizer.init(bandit.ref_logits_V))
    _, probs_IV = jax.lax.scan(iteration, init, jax.random.split(key, iterations))
    return probs_IV


__all__ = [
    "KTO", "Bandit", "PreferenceSetup", "expected_advantage", "forward_kl_optimum", "grpo_scale", "ipo_optimum",
    "kl_divergence", "kto_loss", "make_bandit", "over_seeds", "policy_gradient_loss", "policy_gradient_update",
    "preference_gradient", "preference_loss", "preference_pairs", "reverse_kl_optimum", "sample_actions",
    "score_actions", "seed_keys", "total_variation", "train_policy_gradient", "train_preference",
]
