"""Scalar heads (value function, reward model) on the shared decoder backbone."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.params import Params


def init_scalar_head(cfg: ModelConfig, key: jax.Array, init_scale: float = 0.0) -> Params:
    """``{"kernel": (D,), "bias": ()}``, kernel ~ N(0, init_scale²), bias 0.

    ``init_scale=0`` starts every value at 0 (common for PPO critics); lm-human-preferences
    (Ziegler et al. 2019) initialises the reward head with ``init_scale = 1 / sqrt(d_model + 1)``.
    """
    return {
        "kernel": init_scale * jax.random.normal(key, (cfg.d_model,), jnp.float32),
        "bias": jnp.zeros((), jnp.float32),
    }


def scalar_head_logical_axes() -> Params:
    """Logical axes of ``init_scalar_head``'s tree (kernel along ``norm``: small, replicated)."""
    return {"kernel": ("norm",), "bias": ()}


def scalar_head(head: Params, hidden_BTD: jax.Array) -> jax.Array:
    """values_BT = hidden_BTD · kernel + bias, in float32."""
    return jnp.einsum("btd,d->bt", hidden_BTD.astype(jnp.float32), head["kernel"].astype(jnp.float32)) + head["bias"]
