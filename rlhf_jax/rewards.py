"""Reward functions: Python callables that score responses, alone or added to a reward model.

A reward function takes the prompts and the decoded responses of a rollout and returns one float per
row (a list or an array)::

    def my_reward(prompts: list, responses: list[str]) -> list[float]: ...

Prompts are what the data gave (text, or a conversation as a list of messages). The scripts take them
by name, ``--reward module:function`` (an importable module, or a ``path/to/file.py``), several at once,
each with an optional weight: ``--reward rlhf_jax.rewards:gold my_rules.py:format_ok=0.5``. The
sequence score is then (:func:`rlhf_jax.rl.steps.combined_scores`)

    s = w_rm · RM(x, y) + Σ_i w_i · f_i(x, y)

with ``--reward-model-weight`` w_rm (default 1 without reward functions and 0 with them; the reward
model is not even loaded at 0). Shipped here:

- :func:`gold`: the simulated annotator's gold scorer (embedded default). Training on it is the
  "oracle-reward" run that bounds what a learned reward model can give;
- :func:`soft_overlong_punishment`: DAPO's length penalty (Yu et al. 2025, eq. 13), bound with
  ``functools.partial`` or the ``=`` weight.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import pathlib
import sys
from typing import Any, Callable, Sequence

import numpy as np

RewardFunction = Callable[[Sequence[Any], Sequence[str]], Sequence[float]]


def gold(prompts: Sequence[Any], responses: Sequence[str]) -> np.ndarray:
    """The simulated annotator's gold score of each response (rlhf_jax.data.simulated.gold). Text prompts only."""
    from rlhf_jax.data.simulated import gold_scores

    return gold_scores(list(prompts), list(responses))


def soft_overlong_punishment(prompts: Sequence[Any], responses: Sequence[str], *, max_len: int = 48,
                             cache_len: int = 12, tokens: Sequence[int] | None = None) -> np.ndarray:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), on response lengths |y|:

        R(y) = 0                                   if |y| ≤ L_max − L_cache
        R(y) = ((L_max − L_cache) − |y|) / L_cache   if L_max − L_cache < |y| ≤ L_max
        R(y) = −1                                  if |y| > L_max

    ``tokens``: the lengths in tokens; without them, whitespace-separated words stand in for tokens.
    """
    lengths = np.asarray(tokens if tokens is not None else [len(r.split()) for r in responses], np.float64)
    free = max_len - cache_len
    return np.where(lengths <= free, 0.0, np.where(lengths <= max_len, (free - lengths) / cache_len, -1.0))


@dataclasses.dataclass(frozen=True)
class WeightedReward:
    """One ``--reward`` entry: the callable, its weight and the spec it came from."""

    fn: RewardFunction
    weight: float
    spec: str

    @property
    def name(self) -> str:
        return self.spec.split("=")[0].rsplit(":", 1)[-1]


def _import(module: str) -> Any:
    if module.endswith(".py") or "/" in module:
        path = pathlib.Path(module)
        if not path.is_file():
            raise FileNotFoundError(f"--reward: no file {path}")
        name = f"_rlhf_jax_reward_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(module)


def load(spec: str) -> WeightedReward:
    """``"module:function"`` or ``"path/file.py:function"``, optionally ``"=weight"`` (default 1)."""
    target, _, weight_text = spec.partition("=")
    module, sep, attr = target.rpartition(":")
    if not sep or not module or not attr:
        raise ValueError(f"--reward {spec!r}: expected module:function or path/file.py:function, optionally =weight")
    try:
        weight = float(weight_text) if weight_text else 1.0
    except ValueError:
        raise ValueError(f"--reward {spec!r}: the weight {weight_text!r} is not a number") from None
    mod = _import(module)
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ValueError(f"--reward {spec!r}: {module} has no callable {attr!r}")
    return WeightedReward(fn, weight, spec)


def load_all(specs: Sequence[str]) -> list[WeightedReward]:
    return [load(s) for s in specs]


def score(rewards: Sequence[WeightedReward], prompts: Sequence[Any], responses: Sequence[str]
          ) -> tuple[np.ndarray, dict[str, float]]:
    """``(Σ_i w_i f_i per row as float32, {"reward/<name>": mean of f_i})``. Each function must return one
    finite number per row; anything else is an error naming the function and the row."""
    total = np.zeros(len(responses), np.float64)
    means = {}
    for r in rewards:
        values = np.asarray(r.fn(list(prompts), list(responses)), np.float64).reshape(-1)
        if values.shape[0] != len(responses):
            raise ValueError(f"reward function {r.spec} returned {values.shape[0]} scores for {len(responses)} responses")
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"reward function {r.spec} gave {values[i]} for row {i} (response {responses[i][:80]!r})")
        total += r.weight * values
        means[f"reward/{r.name}"] = float(values.mean())
    return total.astype(np.float32), means


def rm_weight(specs: Sequence[str], weight: float | None) -> float:
    """``--reward-model-weight``: as given, else 1 without reward functions and 0 with them."""
    if weight is not None:
        if not math.isfinite(weight):
            raise ValueError(f"--reward-model-weight must be finite, got {weight}")
        return float(weight)
    return 0.0 if specs else 1.0
