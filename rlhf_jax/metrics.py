"""Metrics as (total, count) pairs.

Every mean a loss reports is carried as its numerator and denominator, so that gradient
accumulation, minibatch scans and multi-host reductions stay exact: merge by adding both parts,
divide once at the end. (Same idea as tunix ``WeightedMetric`` and the lm1b ``denominator``.)

Keys are namespaced by the code that produces them: ``"ppo/clipfrac"``, ``"kl/k3"``.
"""
from __future__ import annotations

from typing import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Metric:
    """A weighted mean in waiting: ``mean = total / count``."""

    total: jax.Array
    count: jax.Array

    @classmethod
    def scalar(cls, value) -> "Metric":
        """A single observation (count 1)."""
        value = jnp.asarray(value, jnp.float32)
        return cls(total=value, count=jnp.ones((), jnp.float32))

    @classmethod
    def masked(cls, values, mask) -> "Metric":
        """Mean of ``values`` over the positions where ``mask`` is non-zero (mask may be weights)."""
        values = jnp.asarray(values, jnp.float32)
        mask = jnp.asarray(mask, jnp.float32)
        mask = jnp.broadcast_to(mask, values.shape)
        return cls(total=jnp.sum(values * mask), count=jnp.sum(mask))

    @classmethod
    def mean_of(cls, values) -> "Metric":
        """Unweighted mean over every element of ``values``."""
        values = jnp.asarray(values, jnp.float32)
        return cls(total=jnp.sum(values), count=jnp.asarray(values.size, jnp.float32))

    def mean(self) -> jax.Array:
        """``total / count``, 0 when nothing was counted."""
        return jnp.where(self.count > 0, self.total / jnp.where(self.count > 0, self.count, 1.0), 0.0)

    def __add__(self, other: "Metric") -> "Metric":
        return Metric(total=self.total + other.total, count=self.count + other.count)


Metrics = dict[str, Metric]


def merge(a: Mapping[str, Metric], b: Mapping[str, Metric]) -> Metrics:
    """Union of two metric dicts; shared keys are added (total + total, count + count)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = out[k] + v if k in out else v
    return out


def sum_over_leading_axis(metrics: Mapping[str, Metric]) -> Metrics:
    """Reduce metrics stacked by ``lax.scan`` / ``vmap`` (leading axis) into one Metric each."""
    return {k: Metric(total=jnp.sum(m.total, axis=0), count=jnp.sum(m.count, axis=0)) for k, m in metrics.items()}


def to_floats(metrics: Mapping[str, Metric]) -> dict[str, float]:
    """Host-side means, for logging. Non-Metric values are converted with ``float``."""
    out = {}
    for k, m in metrics.items():
        if isinstance(m, Metric):
            out[k] = float(np.asarray(jax.device_get(m.mean())))
        else:
            out[k] = float(np.asarray(jax.device_get(m)))
    return out
