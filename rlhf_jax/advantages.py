"""Rewards and advantages for RL on language models: per-token rewards, GAE, RLOO, GRPO.

Shapes: ``B`` rows (episodes), ``T`` response tokens, ``N`` samples per prompt.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax import ops, registry


def per_token_rewards(
    scores_B: jax.Array,
    kl_BT: jax.Array,
    response_mask_BT: jax.Array,
    *,
    kl_coef: float | jax.Array,
    missing_eos_penalty: float | None = None,
    has_eos_B: jax.Array | None = None,
) -> jax.Array:
    """RLHF reward per token: −β·KL_t on every response token, plus the score on the last one.

        r_t = −β · KL_t · m_t  +  s · [t = last response token]

    (Ziegler et al. 2019, §2.2; Stiennon et al. 2020; Huang et al. 2024, "The N+
    implementation details of RLHF with PPO"). The last response token is the last position where
    ``response_mask_BT`` is 1. With ``missing_eos_penalty`` set, rows whose response did not end
    with EOS (``has_eos_B`` False) get that fixed score instead of the reward model's
    (lm-human-preferences: −1). ``kl_BT`` comes from :func:`rlhf_jax.kl.kl_penalty`; ``kl_coef`` may
    be a traced controller value. Rows with an empty mask get all-zero rewards. Float32.
    """
    scores_B = jnp.asarray(scores_B, jnp.float32)
    mask_BT = jnp.asarray(response_mask_BT, jnp.float32)
    if missing_eos_penalty is not None:
        if has_eos_B is None:
            raise ValueError("missing_eos_penalty needs has_eos_B (which responses ended with EOS)")
        scores_B = jnp.where(jnp.asarray(has_eos_B, bool), scores_B, jnp.float32(missing_eos_penalty))
    positions_T = jnp.arange(mask_BT.shape[-1])
    last_B = jnp.max(jnp.where(mask_BT > 0, positions_T, -1), axis=-1)
    is_last_BT = (positions_T == last_B[:, None]).astype(jnp.float32)
    kl_coef = jnp.asarray(kl_coef, jnp.float32)
    return -kl_coef * jnp.asarray(kl_BT, jnp.float32) * mask_BT + scores_B[:, None] * is_last_BT


def reward_gain_bias(reference_scores: jax.Array, *, target_mean: float = 0.0, target_std: float = 1.0, eps: float = 1e-8):
    """Gain and bias so that ``gain · s + bias`` has mean ``target_mean`` and std ``target_std`` on a reference set.

        gain = target_std / std(s_ref),   bias = target_mean − gain · mean(s_ref)

    lm-human-preferences (Ziegler et al. 2019) normalises the reward model this way on samples of
    the SFT policy, so that PPO starts with rewards of mean 0 and std 1. ``eps`` guards std = 0.
    """
    s = jnp.asarray(reference_scores, jnp.float32)
    gain = target_std / (jnp.std(s) + eps)
    return gain, target_mean - gain * jnp.mean(s)


def normalize_scores(scores: jax.Array, gain: jax.Array, bias: jax.Array) -> jax.Array:
    """``gain · s + bias`` (see :func:`reward_gain_bias`)."""
    return gain * jnp.asarray(scores, jnp.float32) + bias


@flax.struct.dataclass
class RunningMoments:
    """Running mean and variance of scores, merged batch by batch (Chan et al. 1979 parallel update).

    For reward whitening across training (as TRL's ``RunningMoments``): ``state = state.update(s_B)``,
    then ``state.whiten(s_B)``. Start from ``RunningMoments.create()``.
    """

    mean: jax.Array
    var: jax.Array
    count: jax.Array

    @classmethod
    def create(cls) -> "RunningMoments":
        zero = jnp.zeros((), jnp.float32)
        return cls(mean=zero, var=zero, count=zero)

    def update(self, values, mask=None) -> "RunningMoments":
        """Merge a batch (optionally masked): ``μ = μ_a + δ·n_b/n``, ``M2 = M2_a + M2_b + δ²·n_a·n_b/n``."""
        values = jnp.asarray(values, jnp.float32)
        mask = jnp.ones_like(values) if mask is None else jnp.asarray(mask, jnp.float32)
        n_b = jnp.sum(mask)
        mean_b = ops.masked_mean(values, mask)
        m2_b = ops.masked_var(values, mask) * n_b
        n = self.count + n_b
        delta = mean_b - self.mean
        frac_b = jnp.where(n > 0, n_b / jnp.where(n > 0, n, 1.0), 0.0)
        m2 = self.var * self.count + m2_b + jnp.square(delta) * self.count * frac_b
        return RunningMoments(
            mean=self.mean + delta * frac_b,
            var=jnp.where(n > 0, m2 / jnp.where(n > 0, n, 1.0), 0.0),
            count=n,
        )

    def whiten(self, values, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
        """``(s − μ) / sqrt(σ² + eps)`` with the running moments (``+ μ`` back if not ``shift_mean``)."""
        values = jnp.asarray(values, jnp.float32)
        out = (values - self.mean) * jax.lax.rsqrt(self.var + eps)
        return out + self.mean if not shift_mean else out


def gae(
    rewards_BT: jax.Array,
    values_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    gamma: float,
    lam: float,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016, §3, eq. 16), by a reverse ``lax.scan``.

        δ_t = r_t + γ V_{t+1} − V_t,     A_t = δ_t + γλ A_{t+1},     R_t = A_t + V_t

    over the masked (response) tokens of each row, with V and A after the last response token
    equal to 0 (the episode ends there). Masked positions are skipped: t+1 means the next
    unmasked token, so left/right padding is ignored (and, in multi-turn data, masked
    environment tokens are bridged). Padding positions get advantage and return 0. Float32.

    Returns ``(advantages_BT, returns_BT)``.
    """
    rewards_TB = jnp.asarray(rewards_BT, jnp.float32).T
    values_TB = jnp.asarray(values_BT, jnp.float32).T
    valid_TB = jnp.asarray(mask_BT).T > 0

    def step(carry, xs):
        next_value_B, next_adv_B = carry
        reward_B, value_B, valid_B = xs
        delta_B = reward_B + gamma * next_value_B - value_B
        adv_B = delta_B + gamma * lam * next_adv_B
        carry = (jnp.where(valid_B, value_B, next_value_B), jnp.where(valid_B, adv_B, next_adv_B))
        return carry, jnp.where(valid_B, adv_B, 0.0)

    zeros_B = jnp.zeros(rewards_TB.shape[1], jnp.float32)
    _, adv_TB = jax.lax.scan(step, (zeros_B, zeros_B), (rewards_TB, values_TB, valid_TB), reverse=True)
    advantages_BT = adv_TB.T
    returns_BT = jnp.where(valid_TB.T, advantages_BT + values_TB.T, 0.0)
    return advantages_BT, returns_BT


def whiten_advantages(advantages_BT: jax.Array, mask_BT: jax.Array, *, shift_mean: bool = True) -> jax.Array:
    """Whiten advantages over the masked tokens of the batch (lm-human-preferences; Huang et al. 2024).

    ``(A − μ)/sqrt(σ² + 1e-8)`` with masked batch moments; padding gets 0. See :func:`rlhf_jax.ops.masked_whiten`.
    """
    return ops.masked_whiten(advantages_BT, mask_BT, shift_mean=shift_mean)


def rloo(scores_BN: jax.Array) -> jax.Array:
    """REINFORCE leave-one-out advantages for N samples per prompt (Ahmadian et al. 2024; Kool et al. 2019).

        A_i = s_i − 1/(N−1) Σ_{j≠i} s_j  =  N/(N−1) · (s_i − mean_j s_j)

    Row b holds the N sequence-level scores of one prompt; needs N ≥ 2.
    """
    scores_BN = jnp.asarray(scores_BN, jnp.float32)
    n = scores_BN.shape[-1]
    if n < 2:
        raise ValueError(f"rloo needs at least 2 samples per prompt, got N={n}")
    baseline_BN = (jnp.sum(scores_BN, axis=-1, keepdims=True) - scores_BN) / (n - 1)
    return scores_BN - baseline_BN


def grpo(scores_BN: jax.Array, *, eps: float = 1e-6, scale: bool = True) -> jax.Array:
    """Group-relative advantages (GRPO, Shao et al. 2024, DeepSeekMath §4.1.2, outcome supervision).

        A_i = (s_i − mean(s)) / (std(s) + eps)        (scale=True)
        A_i =  s_i − mean(s)                          (scale=False: Dr. GRPO, Liu et al. 2025)

    over the N samples of one prompt (row). ``std`` is the unbiased sample std (ddof=1, as
    torch.std in TRL and verl); a group of identical scores gets advantage 0. Needs N ≥ 2.
    """
    scores_BN = jnp.asarray(scores_BN, jnp.float32)
    if scores_BN.shape[-1] < 2:
        raise ValueError(f"grpo needs at least 2 samples per prompt, got N={scores_BN.shape[-1]}")
    centered_BN = scores_BN - jnp.mean(scores_BN, axis=-1, keepdims=True)
    if not scale:
        return centered_BN
    return centered_BN / (jnp.std(scores_BN, axis=-1, keepdims=True, ddof=1) + eps)


# --- Advantage estimators, by name (rlhf_jax.registry.ADVANTAGES) ----------------------------------


@flax.struct.dataclass
class AdvantageInputs:
    """What every advantage estimator may read: one scored rollout of ``B = prompts × num_samples`` rows.

    Rows of one prompt are adjacent (``rollout.generate(num_samples=N)`` lays them out so).
    """

    scores_B: jax.Array
    """Sequence scores: reward model and/or reward functions, missing-EOS penalty applied."""
    kl_BT: jax.Array
    """Per-token KL estimate policy vs reference (:func:`rlhf_jax.kl.kl_penalty`); used only through ``kl_coef``."""
    mask_BT: jax.Array
    """Response mask, shifted (column t scores token t + 1)."""
    values_BT: jax.Array | None = None
    """Critic values (None without a critic)."""
    num_samples: int = flax.struct.field(pytree_node=False, default=1)
    """N: samples per prompt."""


def estimator(name: str, *, critic: bool = False, groups: bool = False):
    """Register an advantage estimator ``fn(inputs, *, kl_coef, **options) -> (advantages_BT, returns_BT | None)``.

    ``critic``: it needs ``inputs.values_BT`` (and its returns train the critic); ``groups``: it needs
    ``num_samples ≥ 2`` responses per prompt. ``kl_coef`` is β when the KL sits in the reward, 0 otherwise.
    """
    def add(fn):
        fn.needs_critic, fn.needs_groups = critic, groups
        return registry.ADVANTAGES.register(name)(fn)
    return add


def sequence_rewards(inputs: AdvantageInputs, kl_coef) -> jax.Array:
    """``R_b = s_b − β Σ_t KL_bt`` (the KL-penalised sequence reward of the critic-free estimators)."""
    return inputs.scores_B - jnp.asarray(kl_coef, jnp.float32) * ops.masked_sum(inputs.kl_BT, inputs.mask_BT, axis=-1)


def _per_sequence(advantages_B: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """The same advantage on every response token of a row."""
    return advantages_B[:, None] * jnp.asarray(mask_BT, jnp.float32)


@estimator("gae", critic=True)
def gae_estimator(inputs: AdvantageInputs, *, kl_coef, gamma: float = 1.0, lam: float = 0.95,
                  whiten: bool = True, **_) -> tuple[jax.Array, jax.Array]:
    """PPO's estimator: per-token rewards (score at the last token − β·KL_t, :func:`per_token_rewards`),
    :func:`gae` on the critic's values, advantages whitened over the batch (Ziegler et al. 2019)."""
    rewards_BT = per_token_rewards(inputs.scores_B, inputs.kl_BT, inputs.mask_BT, kl_coef=kl_coef)
    advantages_BT, returns_BT = gae(rewards_BT, inputs.values_BT, inputs.mask_BT, gamma=gamma, lam=lam)
    return (whiten_advantages(advantages_BT, inputs.mask_BT) if whiten else advantages_BT), returns_BT


@estimator("grpo", groups=True)
def grpo_estimator(inputs: AdvantageInputs, *, kl_coef, **_) -> tuple[jax.Array, None]:
    """GRPO (Shao et al. 2024): :func:`grpo` on the group's sequence rewards, on every response token."""
    rewards_BN = sequence_rewards(inputs, kl_coef).reshape(-1, inputs.num_samples)
    return _per_sequence(grpo(rewards_BN).reshape(-1), inputs.mask_BT), None


@estimator("rloo", groups=True)
def rloo_estimator(inputs: AdvantageInputs, *, kl_coef, **_) -> tuple[jax.Array, None]:
    """RLOO (Ahmadian et al. 2024): :func:`rloo` leave-one-out baseline on the sequence rewards."""
    rewards_BN = sequence_rewards(inputs, kl_coef).reshape(-1, inputs.num_samples)
    return _per_sequence(rloo(rewards_BN).reshape(-1), inputs.mask_BT), None


# --- The GRPO family beyond GRPO/RLOO: Dr. GRPO, REINFORCE++, DAPO's dynamic sampling ----------------


@estimator("dr_grpo", groups=True)
def dr_grpo_estimator(inputs: AdvantageInputs, *, kl_coef, **_) -> tuple[jax.Array, None]:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", §3.1): group mean-centred, no std.

        A_i = R_i − mean_{j ∈ group} R_j,     R_i = s_i − β Σ_t KL_it

    i.e. :func:`grpo` with ``scale=False``. The paper pairs it with a constant loss normaliser
    (aggregation ``seq_mean_token_sum_norm``) instead of GRPO's per-sequence 1/|o_i|.
    """
    rewards_BN = sequence_rewards(inputs, kl_coef).reshape(-1, inputs.num_samples)
    return _per_sequence(grpo(rewards_BN, scale=False).reshape(-1), inputs.mask_BT), None


def discounted_returns(rewards_BT: jax.Array, mask_BT: jax.Array, *, gamma: float = 1.0) -> jax.Array:
    """Return-to-go over each row's response tokens, by a reverse ``lax.scan`` (REINFORCE; Williams 1992).

        G_t = r_t + γ G_{t+1},     G after the last response token = 0

    Masked positions are skipped (t+1 is the next unmasked token, as in :func:`gae`) and get 0.
    This is :func:`gae` with V ≡ 0 and λ = 1. Float32.
    """
    rewards_TB = jnp.asarray(rewards_BT, jnp.float32).T
    valid_TB = jnp.asarray(mask_BT).T > 0

    def step(next_return_B, xs):
        reward_B, valid_B = xs
        return_B = reward_B + gamma * next_return_B
        return jnp.where(valid_B, return_B, next_return_B), jnp.where(valid_B, return_B, 0.0)

    _, returns_TB = jax.lax.scan(step, jnp.zeros(rewards_TB.shape[1], jnp.float32), (rewards_TB, valid_TB), reverse=True)
    return returns_TB.T


def reinforce_pp_advantages(scores_B: jax.Array, kl_BT: jax.Array, mask_BT: jax.Array, *, kl_coef,
                            gamma: float = 1.0) -> jax.Array:
    """REINFORCE++ advantages (Hu 2025, arXiv 2501.03262, §3): token rewards, return-to-go, global whitening.

        r_t = −β·KL_t + s·[t = last response token]             (:func:`per_token_rewards`)
        A_t = Σ_{i ≥ t} γ^{i−t} r_i                             (:func:`discounted_returns`)
        Â_t = (A_t − μ_A) / sqrt(σ²_A + 1e-8)                   μ, σ² over every response token of the batch

    No critic and no per-prompt baseline: the batch-wide normalisation is the baseline.
    Padding and empty rows get 0.
    """
    rewards_BT = per_token_rewards(scores_B, kl_BT, mask_BT, kl_coef=kl_coef)
    return whiten_advantages(discounted_returns(rewards_BT, mask_BT, gamma=gamma), mask_BT)


@estimator("reinforce_pp")
def reinforce_pp_estimator(inputs: AdvantageInputs, *, kl_coef, gamma: float = 1.0, **_) -> tuple[jax.Array, None]:
    """REINFORCE++ (Hu 2025): :func:`reinforce_pp_advantages` on the rollout's scores and per-token KL."""
    return reinforce_pp_advantages(inputs.scores_B, inputs.kl_BT, inputs.mask_BT, kl_coef=kl_coef, gamma=gamma), None


@estimator("reinforce_pp_baseline", groups=True)
def reinforce_pp_baseline_estimator(inputs: AdvantageInputs, *, kl_coef, gamma: float = 1.0,
                                    **_) -> tuple[jax.Array, None]:
    """REINFORCE++-baseline (Hu 2025, arXiv 2501.03262 v3+; OpenRLHF ``reinforce_baseline``).

        s'_i = s_i − mean_{j ∈ group} s_j

    then REINFORCE++ on s' (:func:`reinforce_pp_advantages`: −β·KL_t per token, return-to-go,
    whitening over the batch's response tokens). The group mean removes the prompt's difficulty;
    the global std (not the group's) sets the scale.
    """
    scores_BN = jnp.asarray(inputs.scores_B, jnp.float32).reshape(-1, inputs.num_samples)
    centred_B = (scores_BN - jnp.mean(scores_BN, axis=-1, keepdims=True)).reshape(-1)
    return reinforce_pp_advantages(centred_B, inputs.kl_BT, inputs.mask_BT, kl_coef=kl_coef, gamma=gamma), None


def groups_with_signal(scores_BN: jax.Array, *, atol: float = 1e-6) -> jax.Array:
    """DAPO dynamic sampling (Yu et al. 2025, eq. 11): keep the groups whose scores are not all equal.

        keep_b = max_n s_bn − min_n s_bn > atol

    Eq. 11 asks 0 < |{o_i : o_i correct}| < G for 0/1 rewards; a group whose N scores are all equal
    has group-relative advantage 0 and gives no gradient. Row b holds one prompt's N scores;
    returns a bool ``keep_B`` (one per group). The caller over-samples and drops the rest.
    """
    scores_BN = jnp.asarray(scores_BN, jnp.float32)
    return (jnp.max(scores_BN, axis=-1) - jnp.min(scores_BN, axis=-1)) > atol
