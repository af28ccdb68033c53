"""PPO losses for language models: clipped policy surrogate and clipped value loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax import ops, registry
from rlhf_jax.metrics import Metric, Metrics
from rlhf_jax.ops import Aggregation


@registry.POLICY_LOSSES.register("ppo_clip")
def ppo_policy_loss(
    logps_BT: jax.Array,
    old_logps_BT: jax.Array,
    advantages_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    entropy_BT: jax.Array | None = None,
    entropy_coef: float = 0.0,
    aggregation: Aggregation = "token_mean",
    max_len: int | None = None,
) -> tuple[jax.Array, Metrics]:
    """Clipped surrogate objective, per token (Schulman et al. 2017, §3, eq. 7), negated as a loss.

    With the per-token ratio ``ρ_t = exp(log π(a_t) − log π_old(a_t))``:

        ℓ_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε_high))          (PPO-clip)
        ℓ_t = min(ℓ_t, −c·A_t)   where A_t < 0                           (dual clip, c > 1)
        ℓ_t = ℓ_t − entropy_coef · H_t                                   (entropy bonus)

    and the loss aggregates ℓ over the mask (see :func:`rlhf_jax.ops.masked_aggregate`).
    ``ε_high`` defaults to ε (asymmetric "clip-higher" as in DAPO, Yu et al. 2025, when set).
    Dual clip bounds the loss of negative-advantage tokens whose ratio has exploded
    (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning", dual-clip PPO).
    The gradient is zero exactly where the clip binds: A > 0 and ρ > 1 + ε_high, A < 0 and
    ρ < 1 − ε, and (dual clip) A < 0 and ρ > c.

    ``entropy_BT`` (e.g. :func:`rlhf_jax.ops.entropy_from_logits`) must carry its gradient if the
    bonus is to act. All maths in float32; an empty mask gives loss 0.

    Metrics (token means): ``ppo/policy_loss`` (with the chosen aggregation), ``ppo/clipfrac``
    (tokens whose clipped term is the active one), ``ppo/dual_clipfrac`` (with dual clip on), ``ppo/ratio``,
    ``ppo/approx_kl_k1`` = E[−log ρ] and ``ppo/approx_kl_k3`` = E[(ρ − 1) − log ρ], estimators
    of KL(π_old ‖ π) under samples from π_old (Schulman 2020, "Approximating KL divergence"),
    ``ppo/entropy`` when ``entropy_BT`` is given.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    mask_BT = jnp.asarray(mask_BT, jnp.float32)
    adv_BT = jnp.asarray(advantages_BT, jnp.float32)
    log_ratio_BT = jnp.asarray(logps_BT, jnp.float32) - jnp.asarray(old_logps_BT, jnp.float32)
    ratio_BT = jnp.exp(log_ratio_BT)

    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * jnp.clip(ratio_BT, 1.0 - clip_eps, 1.0 + eps_high)
    per_token_BT = jnp.maximum(unclipped_BT, clipped_BT)
    is_clipped_BT = clipped_BT > unclipped_BT
    if dual_clip is not None:
        bound_BT = -dual_clip * adv_BT
        is_dual_clipped_BT = (adv_BT < 0) & (per_token_BT > bound_BT)
        per_token_BT = jnp.where(is_dual_clipped_BT, bound_BT, per_token_BT)
    if entropy_BT is not None and entropy_coef:
        per_token_BT = per_token_BT - entropy_coef * jnp.asarray(entropy_BT, jnp.float32)

    loss = ops.masked_aggregate(per_token_BT, mask_BT, aggregation, max_len=max_len)
    metrics = {
        "ppo/policy_loss": loss,
        "ppo/clipfrac": Metric.masked(is_clipped_BT.astype(jnp.float32), mask_BT),
        "ppo/ratio": Metric.masked(ratio_BT, mask_BT),
        "ppo/approx_kl_k1": Metric.masked(-log_ratio_BT, mask_BT),
        "ppo/approx_kl_k3": Metric.masked(jnp.expm1(log_ratio_BT) - log_ratio_BT, mask_BT),
    }
    if dual_clip is not None:
        metrics["ppo/dual_clipfrac"] = Metric.masked(is_dual_clipped_BT.astype(jnp.float32), mask_BT)
    if entropy_BT is not None:
        metrics["ppo/entropy"] = Metric.masked(entropy_BT, mask_BT)
    return loss.mean(), metrics


def explained_variance(values_BT: jax.Array, returns_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """``1 − Var[R − V] / Var[R]`` over the masked tokens; 0 when Var[R] = 0 (or the mask is empty).

    1 is a perfect value function, 0 no better than a constant, negative worse (as in
    OpenAI baselines / cleanrl logging).
    """
    var_returns = ops.masked_var(returns_BT, mask_BT)
    var_residual = ops.masked_var(jnp.asarray(returns_BT, jnp.float32) - jnp.asarray(values_BT, jnp.float32), mask_BT)
    ok = var_returns > 0
    return jnp.where(ok, 1.0 - var_residual / jnp.where(ok, var_returns, 1.0), 0.0)


def value_loss(
    values_BT: jax.Array,
    old_values_BT: jax.Array,
    returns_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    clip_range: float | None = 0.2,
    aggregation: Aggregation = "token_mean",
) -> tuple[jax.Array, Metrics]:
    """Clipped value loss (OpenAI baselines ppo2; Huang et al. 2024, "N+ implementation details").

        V_clip = V_old + clip(V − V_old, −c, c)
        ℓ_t    = ½ · max((V − R)², (V_clip − R)²)

    ``clip_range=None`` gives the plain ½(V − R)². ``returns_BT`` are the GAE returns, treated as
    constants. Aggregation as in :func:`rlhf_jax.ops.masked_aggregate`; an empty mask gives 0.

    Metrics: ``vf/loss``, ``vf/clipfrac`` (tokens where the clipped term is the larger),
    ``vf/value`` (mean prediction), ``vf/explained_variance`` (see :func:`explained_variance`).
    """
    values_BT = jnp.asarray(values_BT, jnp.float32)
    returns_BT = jnp.asarray(returns_BT, jnp.float32)
    mask_BT = jnp.asarray(mask_BT, jnp.float32)
    unclipped_BT = jnp.square(values_BT - returns_BT)
    if clip_range is None:
        per_token_BT = 0.5 * unclipped_BT
        is_clipped_BT = jnp.zeros_like(mask_BT)
    else:
        old_values_BT = jnp.asarray(old_values_BT, jnp.float32)
        clipped_values_BT = old_values_BT + jnp.clip(values_BT - old_values_BT, -clip_range, clip_range)
        clipped_BT = jnp.square(clipped_values_BT - returns_BT)
        per_token_BT = 0.5 * jnp.maximum(unclipped_BT, clipped_BT)
        is_clipped_BT = (clipped_BT > unclipped_BT).astype(jnp.float32)
    loss = ops.masked_aggregate(per_token_BT, mask_BT, aggregation)
    metrics = {
        "vf/loss": loss,
        "vf/clipfrac": Metric.masked(is_clipped_BT, mask_BT),
        "vf/value": Metric.masked(values_BT, mask_BT),
        "vf/explained_variance": Metric.scalar(explained_variance(values_BT, returns_BT, mask_BT)),
    }
    return loss.mean(), metrics


@registry.POLICY_LOSSES.register("gspo")
def gspo_policy_loss(
    logps_BT: jax.Array,
    old_logps_BT: jax.Array,
    advantages_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    clip_eps: float = 3e-4,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    entropy_BT: jax.Array | None = None,
    entropy_coef: float = 0.0,
    aggregation: Aggregation = "seq_mean_token_mean",
    max_len: int | None = None,
) -> tuple[jax.Array, Metrics]:
    """GSPO: the clipped objective on a sequence-level importance ratio (Zheng et al. 2025, arXiv 2507.18071).

    The ratio is the length-normalised sequence likelihood ratio (eq. 7)

        s_i = (π(y_i|x) / π_old(y_i|x))^{1/|y_i|} = exp( (1/|y_i|) Σ_t (log π(y_i,t) − log π_old(y_i,t)) )

    and the objective (eq. 5) is (1/G) Σ_i min(s_i A_i, clip(s_i, 1 − ε, 1 + ε_high) A_i). It is
    computed in the GSPO-token form (eq. 13–14): s_i,t = sg[s_i] · π(y_i,t) / sg[π(y_i,t)], whose value is
    s_i on every token, and the per-token PPO terms ℓ_t = max(−A_t s_i,t, −A_t clip(s_i,t)) are aggregated
    like :func:`ppo_policy_loss`. With the default ``seq_mean_token_mean`` and the same A on every token of
    a sequence, value and gradient equal eq. 5's exactly (∂s_i,t/∂log π_t = s_i, then 1/|y_i|); per-token
    advantages give GSPO-token. The paper's clip range is tiny (ε = 3e-4, ε_high = 4e-4); ``clip_eps`` is
    taken as given. Dual clip is a per-token device and is rejected. An empty row gives s = 1 and no loss.

    Metrics as :func:`ppo_policy_loss`, per sequence: ``ppo/clipfrac`` is the fraction of sequences
    whose clipped term is active, ``ppo/ratio`` the mean of s_i; ``ppo/approx_kl_k1``/``_k3`` stay token means.
    """
    if dual_clip is not None:
        raise ValueError("gspo_policy_loss does not take dual_clip (a per-token device); leave it None")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    mask_BT = jnp.asarray(mask_BT, jnp.float32)
    adv_BT = jnp.asarray(advantages_BT, jnp.float32)
    logps_BT = jnp.asarray(logps_BT, jnp.float32)
    log_ratio_BT = logps_BT - jnp.asarray(old_logps_BT, jnp.float32)
    seq_log_ratio_B = ops.masked_mean(log_ratio_BT, mask_BT, axis=-1)
    log_s_BT = jax.lax.stop_gradient(seq_log_ratio_B)[:, None] + logps_BT - jax.lax.stop_gradient(logps_BT)
    s_BT = jnp.exp(log_s_BT)

    unclipped_BT = -adv_BT * s_BT
    clipped_BT = -adv_BT * jnp.clip(s_BT, 1.0 - clip_eps, 1.0 + eps_high)
    per_token_BT = jnp.maximum(unclipped_BT, clipped_BT)
    is_clipped_BT = (clipped_BT > unclipped_BT).astype(jnp.float32)
    if entropy_BT is not None and entropy_coef:
        per_token_BT = per_token_BT - entropy_coef * jnp.asarray(entropy_BT, jnp.float32)

    loss = ops.masked_aggregate(per_token_BT, mask_BT, aggregation, max_len=max_len)
    has_tokens_B = (jnp.sum(mask_BT, axis=-1) > 0).astype(jnp.float32)
    metrics = {
        "ppo/policy_loss": loss,
        "ppo/clipfrac": Metric.masked(ops.masked_mean(is_clipped_BT, mask_BT, axis=-1), has_tokens_B),
        "ppo/ratio": Metric.masked(jnp.exp(seq_log_ratio_B), has_tokens_B),
        "ppo/approx_kl_k1": Metric.masked(-log_ratio_BT, mask_BT),
        "ppo/approx_kl_k3": Metric.masked(jnp.expm1(log_ratio_BT) - log_ratio_BT, mask_BT),
    }
    if entropy_BT is not None:
        metrics["ppo/entropy"] = Metric.masked(entropy_BT, mask_BT)
    return loss.mean(), metrics


def overlong_filter(mask_BT: jax.Array, has_eos_B: jax.Array) -> jax.Array:
    """DAPO's overlong filtering (Yu et al. 2025, §3.4): truncated responses drop out of the loss.

        m'_bt = m_bt · [response b ended with EOS]

    A response cut at the length budget has no EOS; its reward says little about its quality, so
    its tokens are masked out of the policy loss (its score may still enter the group's advantage).
    """
    return jnp.asarray(mask_BT, jnp.float32) * jnp.asarray(has_eos_B, jnp.float32)[:, None]
