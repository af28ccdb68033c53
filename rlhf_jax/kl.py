"""KL estimators between the policy and the reference model, and the KL-coefficient controllers.

Per-token estimators of KL(π ‖ π_ref) from tokens sampled from π (Schulman 2020, "Approximating KL
divergence", http://joschu.net/blog/kl-approx.html), with ``log r = log π_ref(a) − log π(a)``:

    k1 = −log r                 unbiased, high variance, can be negative
    k2 = ½ (log r)²             biased, low variance, ≥ 0      ("mse" is the same estimator)
    k3 = (r − 1) − log r        unbiased, low variance, ≥ 0    (GRPO's KL term)
    abs = |log r|               biased, ≥ 0

All are computed in float32.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax import ops, registry
from rlhf_jax.metrics import Metric, Metrics
from rlhf_jax.ops import Aggregation

Estimator = Literal["k1", "k2", "k3", "abs", "mse"]


def _log_r(logps_BT, ref_logps_BT) -> jax.Array:
    return jnp.asarray(ref_logps_BT, jnp.float32) - jnp.asarray(logps_BT, jnp.float32)


def kl_k1(logps_BT: jax.Array, ref_logps_BT: jax.Array) -> jax.Array:
    """k1 = −log r = log π − log π_ref (Schulman 2020)."""
    return -_log_r(logps_BT, ref_logps_BT)


def kl_k2(logps_BT: jax.Array, ref_logps_BT: jax.Array) -> jax.Array:
    """k2 = ½ (log r)² (Schulman 2020)."""
    return 0.5 * jnp.square(_log_r(logps_BT, ref_logps_BT))


def kl_k3(logps_BT: jax.Array, ref_logps_BT: jax.Array) -> jax.Array:
    """k3 = (r − 1) − log r (Schulman 2020), as ``expm1(log r) − log r`` for accuracy near r = 1."""
    log_r = _log_r(logps_BT, ref_logps_BT)
    return jnp.expm1(log_r) - log_r


def kl_abs(logps_BT: jax.Array, ref_logps_BT: jax.Array) -> jax.Array:
    """|log r| (the "abs" penalty of TRL / OpenRLHF)."""
    return jnp.abs(_log_r(logps_BT, ref_logps_BT))


for _name, _fn in (("k1", kl_k1), ("k2", kl_k2), ("mse", kl_k2), ("k3", kl_k3), ("abs", kl_abs)):
    registry.KL_ESTIMATORS.register(_name, _fn)
KL_ESTIMATORS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = dict(registry.KL_ESTIMATORS._entries)


@dataclasses.dataclass(frozen=True)
class KLPlacement:
    """Where the KL to the reference acts (``registry.KL_PLACEMENTS``)."""

    in_reward: bool
    """−β·KL_t joins the reward (InstructGPT / lm-human-preferences PPO; RLOO, REINFORCE++)."""
    in_loss: bool
    """β·KL(π‖π_ref) is a differentiable loss term (GRPO, Shao et al. 2024, eq. 3: k3)."""


registry.KL_PLACEMENTS.register("reward", KLPlacement(in_reward=True, in_loss=False))
registry.KL_PLACEMENTS.register("loss", KLPlacement(in_reward=False, in_loss=True))
registry.KL_PLACEMENTS.register("none", KLPlacement(in_reward=False, in_loss=False))


def kl_penalty(logps_BT: jax.Array, ref_logps_BT: jax.Array, *, estimator: Estimator = "k1") -> jax.Array:
    """Per-token KL estimate (float32, same shape as the inputs) for the reward penalty −β·KL_t.

    ``"k1"`` is the RLHF default (Ziegler et al. 2019; Stiennon et al. 2020). See the module
    docstring for the estimators. Padding positions are not masked here: the caller's mask is.
    """
    return registry.KL_ESTIMATORS[estimator](logps_BT, ref_logps_BT)


def kl_loss(
    logps_BT: jax.Array,
    ref_logps_BT: jax.Array,
    mask_BT: jax.Array,
    *,
    estimator: Estimator = "k3",
    aggregation: Aggregation = "token_mean",
    max_len: int | None = None,
) -> tuple[jax.Array, Metrics]:
    """KL to the reference as a differentiable loss term (GRPO, Shao et al. 2024, §4.1, eq. 4: k3).

        L = aggregate_t(KL_t) with KL_t = kl_penalty(logps, ref_logps, estimator)

    The gradient flows through ``logps_BT``; ``ref_logps_BT`` is a constant. Multiply by the KL
    coefficient outside. Metrics: ``kl/loss`` and ``kl/<estimator>`` (token mean); empty mask → 0.
    """
    kl_BT = kl_penalty(logps_BT, ref_logps_BT, estimator=estimator)
    loss = ops.masked_aggregate(kl_BT, mask_BT, aggregation, max_len=max_len)
    metrics = {"kl/loss": loss, f"kl/{estimator}": Metric.masked(kl_BT, mask_BT)}
    return loss.mean(), metrics


@flax.struct.dataclass
class FixedKLController:
    """A constant KL coefficient β, with the same interface as :class:`AdaptiveKLController`."""

    value: jax.Array

    @classmethod
    def create(cls, kl_coef: float) -> "FixedKLController":
        return cls(value=jnp.asarray(kl_coef, jnp.float32))

    def update(self, kl: jax.Array, n_steps: int | jax.Array) -> "FixedKLController":
        """Returns the state unchanged."""
        del kl, n_steps
        return self


@flax.struct.dataclass
class AdaptiveKLController:
    """Proportional controller that steers the measured KL towards ``target`` (Ziegler et al. 2019, §2.2).

        e_t     = clip(KL_t / KL_target − 1, −0.2, 0.2)
        β_{t+1} = β_t · (1 + e_t · n_steps / horizon)

    ``n_steps`` is the number of episodes (samples) in the batch that measured ``KL_t`` (the
    sequence-level KL, summed over tokens), as in lm-human-preferences ``AdaptiveKLController``;
    defaults: target 6 nats, horizon 10,000 episodes. A pytree: ``update`` is pure and jittable.
    """

    value: jax.Array
    target: float = flax.struct.field(pytree_node=False, default=6.0)
    horizon: float = flax.struct.field(pytree_node=False, default=10000.0)

    @classmethod
    def create(cls, init_kl_coef: float, *, target: float = 6.0, horizon: float = 10000.0) -> "AdaptiveKLController":
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target ({target}) and horizon ({horizon}) must be > 0")
        return cls(value=jnp.asarray(init_kl_coef, jnp.float32), target=target, horizon=horizon)

    def update(self, kl: jax.Array, n_steps: int | jax.Array) -> "AdaptiveKLController":
        """One controller step; returns the new state."""
        error = jnp.clip(jnp.asarray(kl, jnp.float32) / self.target - 1.0, -0.2, 0.2)
        return self.replace(value=self.value * (1.0 + error * jnp.asarray(n_steps, jnp.float32) / self.horizon))
