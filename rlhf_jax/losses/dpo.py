"""Direct preference optimisation losses (no explicit reward model): DPO, cDPO, robust DPO, IPO, SimPO, KTO.

Inputs are sequence log-probs (summed over response tokens, see :func:`rlhf_jax.ops.sequence_logps`)
of the policy and of the frozen reference. Each per-pair formula is its own function of the
"logits" ``h``; :func:`dpo_loss` builds ``h`` and picks one by name.
"""
from __future__ import annotations

import functools
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import registry
from rlhf_jax.metrics import Metric, Metrics

Variant = Literal["dpo", "cdpo", "robust", "ipo", "simpo"]


def sigmoid_preference_loss(h_B: jax.Array, *, beta: float, label_smoothing: float = 0.0) -> jax.Array:
    """DPO per pair: ``−(1−ε)·log σ(β h) − ε·log σ(−β h)`` (Rafailov et al. 2023, eq. 7).

    ``ε > 0`` is conservative DPO against a fraction ε of flipped labels (Mitchell 2023, "A note on
    DPO with noisy preferences"). ``h = (log π − log π_ref)(y_w) − (log π − log π_ref)(y_l)``.
    """
    return optax.sigmoid_binary_cross_entropy(beta * h_B, jnp.full_like(h_B, 1.0 - label_smoothing))


def robust_preference_loss(h_B: jax.Array, *, beta: float, label_smoothing: float) -> jax.Array:
    """Robust DPO, unbiased under label-flip rate ε < ½ (Chowdhury et al. 2024, "Provably Robust DPO").

        ℓ = [(1 − ε)·(−log σ(β h)) − ε·(−log σ(−β h))] / (1 − 2ε)
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    eps = label_smoothing
    return ((1.0 - eps) * -jax.nn.log_sigmoid(beta * h_B) + eps * jax.nn.log_sigmoid(-beta * h_B)) / (1.0 - 2.0 * eps)


def ipo_loss(h_B: jax.Array, *, beta: float) -> jax.Array:
    """IPO per pair: ``(h − 1/(2β))²`` (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences", §5; τ = β)."""
    return jnp.square(h_B - 1.0 / (2.0 * beta))


def dpo_loss(
    policy_chosen_logps_B: jax.Array,
    policy_rejected_logps_B: jax.Array,
    ref_chosen_logps_B: jax.Array | None,
    ref_rejected_logps_B: jax.Array | None,
    *,
    beta: float = 0.1,
    variant: Variant = "dpo",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    chosen_lengths_B: jax.Array | None = None,
    rejected_lengths_B: jax.Array | None = None,
    nll_coef: float = 0.0,
    weights_B: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Preference loss of the DPO family, averaged over the B pairs, plus ``nll_coef`` times the
    chosen responses' per-token negative log-likelihood (see :func:`chosen_nll`). ``weights_B``
    weighs the pairs in the loss and every metric (0 drops a padding pair; all-zero gives loss 0).

    With implicit rewards ``ρ(y) = β·(log π(y) − log π_ref(y))`` and ``h = (ρ(y_w) − ρ(y_l)) / β``:

    - ``"dpo"``:    −log σ(β h)                                   Rafailov et al. 2023, eq. 7
    - ``"cdpo"``:   −(1−ε) log σ(β h) − ε log σ(−β h)              Mitchell 2023 (= "dpo" + label_smoothing)
    - ``"robust"``: [(1−ε)(−log σ(β h)) − ε(−log σ(−β h))]/(1−2ε)  Chowdhury et al. 2024
    - ``"ipo"``:    (h − 1/(2β))²                                 Azar et al. 2023, §5
    - ``"simpo"``:  −log σ(β (log π(y_w)/|y_w| − log π(y_l)/|y_l|) − γ)
      — length-averaged log-probs, no reference (pass None), margin γ = ``simpo_gamma``
      (Meng et al. 2024, SimPO); its implicit reward is ``β·log π(y)/|y|``. Without lengths the
      log-probs are taken as already averaged. ``label_smoothing`` applies as in cDPO.

    IPO follows the paper with summed log-probs; pass length-averaged ones for TRL's variant.
    DPO with π = π_ref gives log 2 for every pair.

    Metrics: ``dpo/loss``, ``dpo/accuracy`` (implicit reward of chosen > rejected), ``dpo/margin``
    (their difference), ``dpo/chosen_reward``, ``dpo/rejected_reward``.
    """
    chosen_B = jnp.asarray(policy_chosen_logps_B, jnp.float32)
    rejected_B = jnp.asarray(policy_rejected_logps_B, jnp.float32)
    if variant == "simpo":
        if chosen_lengths_B is not None:
            chosen_B = chosen_B / jnp.asarray(chosen_lengths_B, jnp.float32)
        if rejected_lengths_B is not None:
            rejected_B = rejected_B / jnp.asarray(rejected_lengths_B, jnp.float32)
        chosen_reward_B, rejected_reward_B = beta * chosen_B, beta * rejected_B
        h_B = chosen_B - rejected_B - simpo_gamma / beta
        loss_B = sigmoid_preference_loss(h_B, beta=beta, label_smoothing=label_smoothing)
    else:
        if ref_chosen_logps_B is None or ref_rejected_logps_B is None:
            raise ValueError(f"variant {variant!r} needs the reference log-probs")
        chosen_reward_B = beta * (chosen_B - jnp.asarray(ref_chosen_logps_B, jnp.float32))
        rejected_reward_B = beta * (rejected_B - jnp.asarray(ref_rejected_logps_B, jnp.float32))
        h_B = (chosen_reward_B - rejected_reward_B) / beta
        if variant in ("dpo", "cdpo"):
            loss_B = sigmoid_preference_loss(h_B, beta=beta, label_smoothing=label_smoothing)
        elif variant == "robust":
            loss_B = robust_preference_loss(h_B, beta=beta, label_smoothing=label_smoothing)
        elif variant == "ipo":
            loss_B = ipo_loss(h_B, beta=beta)
        else:
            raise ValueError(f"unknown DPO variant {variant!r}; expected one of {sorted(DPO_VARIANTS)}")

    margin_B = chosen_reward_B - rejected_reward_B
    weights_B = jnp.ones_like(margin_B) if weights_B is None else jnp.asarray(weights_B, jnp.float32)
    metrics = {}
    if nll_coef:
        if chosen_lengths_B is None:
            raise ValueError("nll_coef needs chosen_lengths_B (the response token counts)")
        nll_B = chosen_nll(policy_chosen_logps_B, chosen_lengths_B)
        metrics["dpo/chosen_nll"] = Metric.masked(nll_B, weights_B)
        loss_B = loss_B + nll_coef * nll_B
    loss = Metric.masked(loss_B, weights_B)
    metrics |= {
        "dpo/loss": loss,
        "dpo/accuracy": Metric.masked((margin_B > 0).astype(jnp.float32), weights_B),
        "dpo/margin": Metric.masked(margin_B, weights_B),
        "dpo/chosen_reward": Metric.masked(chosen_reward_B, weights_B),
        "dpo/rejected_reward": Metric.masked(rejected_reward_B, weights_B),
    }
    return loss.mean(), metrics


def chosen_nll(chosen_logps_B: jax.Array, chosen_lengths_B: jax.Array) -> jax.Array:
    """Per-token NLL of the chosen response, ``−log π(y_w | x) / |y_w|`` (B,).

    Added to DPO with weight α it is RPO (Pang et al. 2024, "Iterative Reasoning Preference
    Optimization", eq. 2; TRL's ``rpo_alpha``): it keeps the chosen responses likely. Plain DPO only
    pushes the chosen and rejected log-ratios apart, and may lower both; the freed probability mass
    then goes to sequences neither response contains, and samples degenerate.
    """
    lengths_B = jnp.maximum(jnp.asarray(chosen_lengths_B, jnp.float32), 1.0)
    return -jnp.asarray(chosen_logps_B, jnp.float32) / lengths_B


for _name in ("dpo", "cdpo", "robust", "ipo", "simpo"):
    registry.PREFERENCE_LOSSES.register(_name, functools.partial(dpo_loss, variant=_name))
DPO_VARIANTS: dict[str, Callable[..., tuple[jax.Array, Metrics]]] = dict(registry.PREFERENCE_LOSSES._entries)
"""The pairwise variants by name (the same table as ``registry.PREFERENCE_LOSSES``)."""


def kto_loss(
    policy_logps_B: jax.Array,
    ref_logps_B: jax.Array,
    kl_policy_logps_B: jax.Array,
    kl_ref_logps_B: jax.Array,
    desirable_B: jax.Array,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[jax.Array, Metrics]:
    """KTO for unpaired thumbs-up / thumbs-down data (Ethayarajh et al. 2024, §4).

        r(x, y) = log π(y|x) − log π_ref(y|x)
        z_0     = max(0, mean_b [log π(y'_b|x_b) − log π_ref(y'_b|x_b)])   (stop-gradient)
        v(x, y) = λ_D σ(β (r − z_0))  if y is desirable,   λ_U σ(β (z_0 − r))  otherwise
        L       = mean_b [λ_{y_b} − v(x_b, y_b)]

    ``z_0`` is the batch estimate of KL(π ‖ π_ref) from mismatched pairs (x_b, y'_b), y' being a
    completion of another prompt in the batch (``kl_*_logps_B``), as in the paper and TRL.
    ``desirable_B``: 1 for thumbs-up, 0 for thumbs-down.

    Metrics: ``kto/loss``, ``kto/kl`` (z_0), ``kto/chosen_reward`` / ``kto/rejected_reward``
    (β·r over desirable / undesirable examples).
    """
    desirable_B = jnp.asarray(desirable_B, jnp.float32)
    log_ratio_B = jnp.asarray(policy_logps_B, jnp.float32) - jnp.asarray(ref_logps_B, jnp.float32)
    kl_log_ratio_B = jnp.asarray(kl_policy_logps_B, jnp.float32) - jnp.asarray(kl_ref_logps_B, jnp.float32)
    z0 = jax.lax.stop_gradient(jnp.maximum(jnp.mean(kl_log_ratio_B), 0.0))
    desirable_loss_B = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (log_ratio_B - z0)))
    undesirable_loss_B = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - log_ratio_B)))
    loss_B = desirable_B * desirable_loss_B + (1.0 - desirable_B) * undesirable_loss_B
    loss = Metric.mean_of(loss_B)
    metrics = {
        "kto/loss": loss,
        "kto/kl": Metric.scalar(z0),
        "kto/chosen_reward": Metric.masked(beta * log_ratio_B, desirable_B),
        "kto/rejected_reward": Metric.masked(beta * log_ratio_B, 1.0 - desirable_B),
    }
    return loss.mean(), metrics
