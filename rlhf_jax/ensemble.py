"""Reward-model ensembles: K reward models scored together, their scores combined by a rule.

Coste, Anwar, Kirk & Krueger (2023), "Reward Model Ensembles Help Mitigate Overoptimization" (ICLR 2024):
K reward models of one architecture, trained on the same comparisons with different seeds (and data
orders), score every response; a *conservative* rule combines the K scores into the one the policy
optimises (PPO, the GRPO family, online DPO) or best-of-n selects by. Disagreement between members is
a sign of responses far from the reward models' training data, where a single proxy is most exploitable.

The rules are pure functions of arrays, ``rule(scores_KB, *, uwo_lambda) -> scores_B`` (K members, B rows),
registered by name in :data:`rlhf_jax.registry.ENSEMBLE_RULES` (``--ensemble-rule mean|worst|uwo``):

- ``mean``:  R̄(x, y) = (1/K) Σ_k R_k(x, y)
- ``worst``: worst-case optimisation (WCO), R_WCO(x, y) = min_k R_k(x, y)
- ``uwo``:   uncertainty-weighted optimisation, R_UWO(x, y) = R̄(x, y) − λ · (1/K) Σ_k (R_k(x, y) − R̄(x, y))²

The members are stacked along a leading axis of their parameters (:class:`RewardEnsemble`), and
:func:`member_scores` runs all K forward passes in one call with ``jax.vmap`` over that axis.
:func:`score` scores with either a single reward model (its ``{"backbone", "head"}`` params, the same
code as :func:`rlhf_jax.objectives.reward_scores`) or an ensemble, so every place that holds a reward
model (``state.frozen["reward"]``, :class:`rlhf_jax.evaluation.RewardModel`) can hold an ensemble instead.

Each member is expected to be normalised on its own (``experiments/reward_model.py`` folds a gain and
bias into the head so that SFT samples score mean 0, std 1), so the members' scores share a scale and
the variance penalty of UWO means the same thing for every ensemble.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models, objectives, registry
from rlhf_jax.metrics import Metric, Metrics

# --- The rules: arrays in, arrays out -------------------------------------------------------------


@registry.ENSEMBLE_RULES.register("mean")
def mean_score(scores_KB: jax.Array, **_) -> jax.Array:
    """The members' mean, ``R̄_b = (1/K) Σ_k R_kb`` (Coste et al. 2023, "mean optimisation")."""
    return jnp.mean(jnp.asarray(scores_KB, jnp.float32), axis=0)


@registry.ENSEMBLE_RULES.register("worst")
def worst_case_score(scores_KB: jax.Array, **_) -> jax.Array:
    """Worst-case optimisation (WCO), ``R_b = min_k R_kb`` (Coste et al. 2023, Eq. for WCO): the policy
    is credited only with what every member grants. No hyperparameter."""
    return jnp.min(jnp.asarray(scores_KB, jnp.float32), axis=0)


@registry.ENSEMBLE_RULES.register("uwo")
def uncertainty_weighted_score(scores_KB: jax.Array, *, uwo_lambda: float, **_) -> jax.Array:
    """Uncertainty-weighted optimisation (UWO), ``R_b = R̄_b − λ · Var_k(R_kb)`` with the intra-ensemble
    variance ``Var_k(R_kb) = (1/K) Σ_k (R_kb − R̄_b)²`` (Coste et al. 2023, Eq. for UWO; the population
    variance, as ``np.var`` in the authors' best-of-n code; their PPO code uses ``torch.var``, the unbiased
    K/(K − 1) variant). ``uwo_lambda`` = λ ≥ 0 (the authors' defaults: 0.5 for best-of-n, 0.1 in their PPO
    config; the paper finds the results robust to it)."""
    scores_KB = jnp.asarray(scores_KB, jnp.float32)
    mean_B = jnp.mean(scores_KB, axis=0)
    variance_B = jnp.mean(jnp.square(scores_KB - mean_B), axis=0)
    return mean_B - jnp.float32(uwo_lambda) * variance_B


# --- An ensemble of reward models -----------------------------------------------------------------


@flax.struct.dataclass
class RewardEnsemble:
    """K reward models of one architecture: ``params`` is one ``{"backbone", "head"}`` tree whose every
    leaf has a leading member axis of size K; ``rule`` (``registry.ENSEMBLE_RULES``) and ``uwo_lambda``
    combine their scores. A pytree (the rule is static), so it sits where a reward model's params sit
    (``state.frozen["reward"]``) and passes through ``jit``, sharding and checkpoint fingerprints."""

    params: Any
    rule: str = flax.struct.field(pytree_node=False, default="mean")
    uwo_lambda: float = flax.struct.field(pytree_node=False, default=0.0)

    @property
    def size(self) -> int:
        """K, the number of members."""
        return int(jax.tree.leaves(self.params)[0].shape[0])

    def combine(self, scores_KB: jax.Array) -> jax.Array:
        """The members' scores combined by ``rule``: ``scores_B``."""
        return registry.ENSEMBLE_RULES[self.rule](scores_KB, uwo_lambda=self.uwo_lambda)

    def describe(self) -> str:
        lam = f", λ {self.uwo_lambda:g}" if self.rule == "uwo" else ""
        return f"ensemble of {self.size} reward models ({self.rule}{lam})"


def member_scores(cfg: models.ModelConfig, params_K: Any, input_ids_BT: jax.Array,
                  attention_mask_BT: jax.Array) -> jax.Array:
    """Every member's score of every row, ``scores_KB``: :func:`rlhf_jax.objectives.reward_scores`
    ``jax.vmap``-ed over the leading member axis of ``params_K`` (one call, K forward passes batched)."""
    one = functools.partial(objectives.reward_scores, cfg)
    return jax.vmap(one, in_axes=(0, None, None))(params_K, input_ids_BT, attention_mask_BT)


def score(cfg: models.ModelConfig, reward: Any, input_ids_BT: jax.Array, attention_mask_BT: jax.Array
          ) -> tuple[jax.Array, jax.Array | None]:
    """``(scores_B, scores_KB)`` of a reward model or an ensemble.

    A single reward model (``{"backbone", "head"}``): exactly :func:`rlhf_jax.objectives.reward_scores`,
    and ``scores_KB`` is None. A :class:`RewardEnsemble`: its rule applied to :func:`member_scores`.
    """
    if isinstance(reward, RewardEnsemble):
        scores_KB = member_scores(cfg, reward.params, input_ids_BT, attention_mask_BT)
        return reward.combine(scores_KB), scores_KB
    return objectives.reward_scores(cfg, reward, input_ids_BT, attention_mask_BT), None


def spread_metrics(scores_KB: jax.Array, prefix: str = "rollout/") -> Metrics:
    """What the members said, per row averaged over rows: ``rm_ensemble_mean`` (their mean),
    ``rm_ensemble_std`` (their population standard deviation, the disagreement UWO penalises) and
    ``rm_member<k>`` (each member's mean score, to see which one a policy exploits)."""
    scores_KB = jnp.asarray(scores_KB, jnp.float32)
    metrics = {f"{prefix}rm_ensemble_mean": Metric.mean_of(jnp.mean(scores_KB, axis=0)),
               f"{prefix}rm_ensemble_std": Metric.mean_of(jnp.std(scores_KB, axis=0))}
    for k in range(scores_KB.shape[0]):
        metrics[f"{prefix}rm_member{k}"] = Metric.mean_of(scores_KB[k])
    return metrics


# --- Building one: stack members' params, load them from disk --------------------------------------


def _allocate(first: Any, size: int) -> Any:
    return jax.tree.map(lambda x: np.empty((size,) + tuple(x.shape), x.dtype), first)


def _fill(stacked: Any, params: Any, k: int, name: str) -> None:
    """Copy member ``k`` into the host arrays ``stacked``; an error names the member, the tensor and both shapes."""
    got = jax.tree.structure(params)
    if got != jax.tree.structure(stacked):
        raise ValueError(f"reward ensemble: member {k} ({name}) has another parameter tree than member 0:\n{got}\nvs\n"
                         f"{jax.tree.structure(stacked)}")
    for (path, dst), src in zip(jax.tree_util.tree_leaves_with_path(stacked), jax.tree.leaves(params)):
        if tuple(src.shape) != dst.shape[1:]:
            raise ValueError(f"reward ensemble: member {k} ({name}) tensor {jax.tree_util.keystr(path)} has shape "
                             f"{tuple(src.shape)}, member 0 has {dst.shape[1:]}")
        dst[k] = np.asarray(jax.device_get(src)).astype(dst.dtype, copy=False)


def stack(members: Sequence[Any], *, rule: str = "mean", uwo_lambda: float = 0.0) -> RewardEnsemble:
    """A :class:`RewardEnsemble` of in-memory reward models (``{"backbone", "head"}`` trees of equal shapes),
    stacked on the host."""
    registry.ENSEMBLE_RULES.check(rule, "--ensemble-rule")
    if not members:
        raise ValueError("reward ensemble: no members")
    stacked = _allocate(members[0], len(members))
    for k, params in enumerate(members):
        _fill(stacked, params, k, f"member {k}")
    return RewardEnsemble(stacked, rule=rule, uwo_lambda=float(uwo_lambda))


def load(paths: Sequence[str | os.PathLike], model_args: Any, *, rule: str = "mean", uwo_lambda: float = 0.0
         ) -> tuple[models.ModelConfig, RewardEnsemble, Any]:
    """``(cfg, ensemble, tokenizer)`` of the reward models at ``paths`` (``experiments/reward_model.py``'s hf/
    folders). Members are loaded one at a time into preallocated host arrays (peak host memory: K + 1
    models); they must share the architecture and the tokenizer, else an error names the member."""
    from rlhf_jax import model_io

    registry.ENSEMBLE_RULES.check(rule, "--ensemble-rule")
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("--reward-ensemble: no reward model folders given")
    stacked = cfg = tokenizer = None
    for k, path in enumerate(paths):
        cfg_k, params_k, tokenizer_k = model_io.load_reward_model(path, model_args)
        if k == 0:
            cfg, tokenizer, stacked = cfg_k, tokenizer_k, _allocate(params_k, len(paths))
        elif cfg_k != cfg:
            raise ValueError(f"reward ensemble: {path} is another architecture than {paths[0]}:\n{cfg_k}\nvs\n{cfg}")
        elif tokenizer_k.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"reward ensemble: {path} has another tokenizer than {paths[0]} "
                             f"({len(tokenizer_k)} vs {len(tokenizer)} tokens)")
        _fill(stacked, params_k, k, path)
        del params_k
    return cfg, RewardEnsemble(stacked, rule=rule, uwo_lambda=float(uwo_lambda)), tokenizer


def _is_axes_leaf(x: Any) -> bool:
    return x is None or (isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))


def logical_axes(member_axes: Any, ensemble: RewardEnsemble) -> RewardEnsemble:
    """The logical axes of ``ensemble`` (for :mod:`rlhf_jax.sharding`) from one member's: the member axis
    is never sharded (``None``), each member's tensors shard as a single reward model's would."""
    stacked = jax.tree.map(lambda a: None if a is None else (None,) + tuple(a), member_axes, is_leaf=_is_axes_leaf)
    return ensemble.replace(params=stacked)


def member(reward: Any, k: int = 0, axes: Any = None) -> tuple[Any, Any]:
    """``(params, axes)`` of member ``k`` of an ensemble (a single reward model and its axes pass through):
    what a separate PPO critic is initialised from."""
    if not isinstance(reward, RewardEnsemble):
        return reward, axes
    params = jax.tree.map(lambda x: x[k], reward.params)
    if axes is not None:
        axes = jax.tree.map(lambda a: None if a is None else tuple(a)[1:], axes.params, is_leaf=_is_axes_leaf)
    return params, axes


__all__ = ["RewardEnsemble", "load", "logical_axes", "mean_score", "member", "member_scores", "score",
           "spread_metrics", "stack", "uncertainty_weighted_score", "worst_case_score"]
