"""Best-of-n sampling: keep the highest-scoring of n samples per prompt."""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def best_of_n(scores_BN: jax.Array) -> jax.Array:
    """Index of the best of the N samples of each prompt: ``argmax_n scores_BN[b, n]`` (first on ties)."""
    return jnp.argmax(jnp.asarray(scores_BN), axis=-1)


def gather_best(tree_BN: Any, indices_B: jax.Array) -> Any:
    """Select sample ``indices_B[b]`` of row b in every leaf of shape (B, N, ...) -> (B, ...)."""

    def take(x):
        idx = jnp.reshape(indices_B, (-1, 1) + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, idx, axis=1)[:, 0]

    return jax.tree.map(take, tree_BN)


def best_of_n_kl(n: int) -> float:
    """``KL(π_bon ‖ π) = log n − (n − 1)/n`` (stated in Stiennon et al. 2020 and Nakano et al. 2021).

    Exact when the reward has no ties (continuous distribution of scores); for discrete outputs it
    is an upper bound (Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment policy").
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n
