"""Reward-model losses: pairwise Bradley–Terry and InstructGPT K-way rankings."""
from __future__ import annotations

import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.metrics import Metric, Metrics


def pairwise_reward_loss(
    chosen_B: jax.Array,
    rejected_B: jax.Array,
    *,
    margin_B: jax.Array | None = None,
    label_smoothing: float = 0.0,
    center_coef: float = 0.0,
    weights_B: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Bradley–Terry pairwise loss on scalar rewards, with its common variants.

    With ``d = r_c − r_r − m`` and ``ε = label_smoothing``:

        ℓ = −(1 − ε)·log σ(d) − ε·log σ(−d)  +  center_coef·(r_c + r_r)²
        L = Σ w ℓ / Σ w

    - plain BT: ``−log σ(r_c − r_r)`` (Bradley & Terry 1952; Ouyang et al. 2022 §3.5);
    - margin ``m`` from the preference strength (Llama 2, Touvron et al. 2023, §3.2.2);
    - label smoothing = conservative BT against ε label noise (as cDPO, Mitchell 2023);
    - reward centering pulls r_c + r_r to 0 (Eisenstein et al. 2023, "Helping or Herding?");
    - ``weights_B`` weighs pairs (0 drops a padding pair). All-zero weights give loss 0.

    Metrics: ``rm/loss``, ``rm/accuracy`` (r_c > r_r), ``rm/margin`` (r_c − r_r),
    ``rm/chosen_reward``, ``rm/rejected_reward``, all weighted by ``weights_B``.
    """
    chosen_B = jnp.asarray(chosen_B, jnp.float32)
    rejected_B = jnp.asarray(rejected_B, jnp.float32)
    weights_B = jnp.ones_like(chosen_B) if weights_B is None else jnp.asarray(weights_B, jnp.float32)
    diff_B = chosen_B - rejected_B
    logits_B = diff_B if margin_B is None else diff_B - jnp.asarray(margin_B, jnp.float32)
    loss_B = optax.sigmoid_binary_cross_entropy(logits_B, jnp.full_like(logits_B, 1.0 - label_smoothing))
    if center_coef:
        loss_B = loss_B + center_coef * jnp.square(chosen_B + rejected_B)
    loss = Metric.masked(loss_B, weights_B)
    metrics = {
        "rm/loss": loss,
        "rm/accuracy": Metric.masked((diff_B > 0).astype(jnp.float32), weights_B),
        "rm/margin": Metric.masked(diff_B, weights_B),
        "rm/chosen_reward": Metric.masked(chosen_B, weights_B),
        "rm/rejected_reward": Metric.masked(rejected_B, weights_B),
    }
    return loss.mean(), metrics


def ranking_to_pairs(ranking: Sequence[int]) -> list[tuple[int, int]]:
    """All C(K, 2) (better, worse) pairs of a ranking listed best first.

    ``ranking_to_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]`` (InstructGPT, Ouyang et al. 2022, §3.5).
    """
    ranking = [int(i) for i in ranking]
    if len(set(ranking)) != len(ranking):
        raise ValueError(f"ranking {ranking} lists a response twice")
    return list(itertools.combinations(ranking, 2))


def ranks_from_ranking(ranking: Sequence[int], num_responses: int) -> np.ndarray:
    """Inverse of a best-first ranking: ``ranks[k]`` = position of response k (0 = best, −1 = unranked)."""
    ranks = np.full((num_responses,), -1, np.int32)
    ranks[np.asarray(ranking, np.int64)] = np.arange(len(ranking), dtype=np.int32)
    return ranks


def ranking_reward_loss(rewards_BK: jax.Array, ranks_BK: jax.Array) -> tuple[jax.Array, Metrics]:
    """InstructGPT K-way ranking loss: every ordered pair of a prompt, averaged per prompt.

        loss(θ) = −1/C(K,2) · E_{(x, y_w, y_l)} [log σ(r(x, y_w) − r(x, y_l))]   (Ouyang et al. 2022, §3.5, eq. 1)

    Row b holds the rewards of the K responses to one prompt; ``ranks_BK[b, k]`` is the rank of
    response k (0 = best; −1 = no response in this slot, so prompts may have fewer than K).
    All pairs of a prompt are averaged together (divided by the number of strictly ordered pairs,
    C(K_b, 2) without ties), then prompts are averaged, so each prompt weighs the same however many
    responses it has. Tied ranks make no pair. Prompts with no pair are skipped; none gives loss 0.

    Metrics: ``rm/loss`` (per prompt), ``rm/accuracy`` and ``rm/margin`` (over all pairs).
    """
    rewards_BK = jnp.asarray(rewards_BK, jnp.float32)
    ranks_BK = jnp.asarray(ranks_BK)
    valid_BK = ranks_BK >= 0
    # pair (i, j): response i is ranked strictly better than response j.
    pairs_BKK = valid_BK[:, :, None] & valid_BK[:, None, :] & (ranks_BK[:, :, None] < ranks_BK[:, None, :])
    pairs_BKK = pairs_BKK.astype(jnp.float32)
    diff_BKK = rewards_BK[:, :, None] - rewards_BK[:, None, :]
    pair_loss_BKK = -jax.nn.log_sigmoid(diff_BKK)
    num_pairs_B = jnp.sum(pairs_BKK, axis=(1, 2))
    prompt_loss_B = jnp.sum(pair_loss_BKK * pairs_BKK, axis=(1, 2)) / jnp.maximum(num_pairs_B, 1.0)
    loss = Metric.masked(prompt_loss_B, (num_pairs_B > 0).astype(jnp.float32))
    metrics = {
        "rm/loss": loss,
        "rm/accuracy": Metric.masked((diff_BKK > 0).astype(jnp.float32), pairs_BKK),
        "rm/margin": Metric.masked(diff_BKK, pairs_BKK),
    }
    return loss.mean(), metrics
