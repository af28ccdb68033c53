"""Named variants, one registry per kind: the CLI names a variant, the registry gives its function.

A variant lives next to its math and registers itself with a decorator, so a new one is one
function in one module (and one test)::

    # rlhf_jax/advantages.py
    @registry.ADVANTAGES.register("my_baseline")
    def my_baseline(inputs: AdvantageInputs, *, kl_coef, **_) -> tuple[jax.Array, jax.Array | None]:
        ...

after which ``--algo.advantage my_baseline`` reaches it. Each registry knows the module that fills
it (``home``) and imports it on first lookup, so ``registry.ADVANTAGES.names()`` is complete
without the caller importing anything else.

The kinds:

=====================  ===============================  ==============================================
registry               home                             a variant is
=====================  ===============================  ==============================================
``ADVANTAGES``         ``rlhf_jax.advantages``          ``(AdvantageInputs, *, kl_coef, ...) -> (A_BT, returns_BT | None)``
``POLICY_LOSSES``      ``rlhf_jax.losses.ppo``          ``(logps_BT, old_logps_BT, A_BT, mask_BT, *, ...) -> (loss, metrics)``
``KL_PLACEMENTS``      ``rlhf_jax.kl``                  where the KL to the reference acts: ``reward``, ``loss``, ``none``
``KL_ESTIMATORS``      ``rlhf_jax.kl``                  ``(logps_BT, ref_logps_BT) -> kl_BT``
``AGGREGATIONS``       ``rlhf_jax.ops``                 ``(values_BT, mask_BT, *, max_len) -> Metric``
``PREFERENCE_LOSSES``  ``rlhf_jax.losses.dpo``          ``(chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, *, beta, ...) -> (loss, metrics)``
``ENSEMBLE_RULES``     ``rlhf_jax.ensemble``            ``(scores_KB, *, uwo_lambda) -> scores_B``: K reward models' scores combined
=====================  ===============================  ==============================================
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator


class Registry:
    """A name → callable table for one kind of variant."""

    def __init__(self, kind: str, home: str):
        self.kind = kind
        self.home = home
        self._entries: dict[str, Any] = {}

    def register(self, name: str, value: Any = None) -> Callable:
        """``@REG.register("name")`` on a function, or ``REG.register("name", value)`` for a ``partial``."""
        def add(v):
            if name in self._entries and self._entries[name] is not v:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = v
            return v
        return add if value is None else add(value)

    def _load(self) -> None:
        importlib.import_module(self.home)

    def __getitem__(self, name: str) -> Any:
        self._load()
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; expected one of {self.names()}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def check(self, name: str, flag: str) -> str:
        """``name`` if registered, else a ValueError naming the CLI ``flag`` and the choices."""
        if name not in self:
            raise ValueError(f"{flag} {name!r} is not a known {self.kind}; choose one of {', '.join(self.names())}")
        return name

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


ADVANTAGES = Registry("advantage estimator", "rlhf_jax.advantages")
POLICY_LOSSES = Registry("policy loss", "rlhf_jax.losses.ppo")
KL_PLACEMENTS = Registry("KL placement", "rlhf_jax.kl")
KL_ESTIMATORS = Registry("KL estimator", "rlhf_jax.kl")
AGGREGATIONS = Registry("loss aggregation", "rlhf_jax.ops")
PREFERENCE_LOSSES = Registry("preference loss", "rlhf_jax.losses.dpo")
ENSEMBLE_RULES = Registry("ensemble rule", "rlhf_jax.ensemble")

ALL = (ADVANTAGES, POLICY_LOSSES, KL_PLACEMENTS, KL_ESTIMATORS, AGGREGATIONS, PREFERENCE_LOSSES, ENSEMBLE_RULES)


def describe() -> str:
    """Every registry and its names, one line each (``python -m rlhf_jax.registry``)."""
    return "\n".join(f"{r.kind:20s} ({r.home}): {', '.join(r.names())}" for r in ALL)


if __name__ == "__main__":  # run as a script this file is __main__, not the module the variants fill
    from rlhf_jax import registry as _registry

    print(_registry.describe())
