"""A simulated human annotator: noisy judgements of the gold score, as random utility models.

With gold scores ``g`` (``gold.gold_score``) and temperature ``T``:

- compare:  P(a ≻ b) = σ((g_a − g_b) / T)                                     (Bradley–Terry)
- rank:     P(order) = Π_i exp(g_(i)/T) / Σ_{j ≥ i} exp(g_(j)/T)               (Plackett–Luce),
            sampled exactly as the argsort of g/T + Gumbel noise (Gumbel-max trick)
- thumb:    P(up) = σ((g − threshold) / T)

No reward model can predict this annotator's labels better than the gold ordering does, with
accuracy E[σ(|g_a − g_b| / T)] over the pairs: ``Annotator.agreement_ceiling``. The default
temperature puts that ceiling at about 0.88 on pairs of demonstrations.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from rlhf_jax.data.simulated.gold import gold_score, gold_scores

DEFAULT_TEMPERATURE = 0.4
"""Label noise: the agreement ceiling on pairs of demonstrations is about 0.88 (0.5 would give 0.86)."""
THUMB_THRESHOLD = 0.7
"""Gold score at which a thumb is up or down with equal probability: about the demonstrations' median."""


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class Annotator:
    """A seeded simulated human whose labels are noisy functions of the gold score."""

    def __init__(self, seed: int = 0, temperature: float = DEFAULT_TEMPERATURE, threshold: float = THUMB_THRESHOLD):
        if not temperature > 0:
            raise ValueError(f"Annotator temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.threshold = float(threshold)
        self._rng = np.random.default_rng(seed)

    def p_prefer(self, prompt: str, a: str, b: str) -> float:
        """Bradley–Terry probability that this annotator prefers ``a`` to ``b``."""
        return float(_sigmoid((gold_score(prompt, a) - gold_score(prompt, b)) / self.temperature))

    def compare(self, prompt: str, a: str, b: str) -> int:
        """0 if the annotator prefers ``a``, 1 if it prefers ``b`` (sampled from ``p_prefer``)."""
        return 0 if self._rng.random() < self.p_prefer(prompt, a, b) else 1

    def rank(self, prompt: str, responses: Sequence[str]) -> list[int]:
        """Indices into ``responses``, best first, sampled from Plackett–Luce on gold / T."""
        utility = gold_scores([prompt] * len(responses), responses) / self.temperature
        return [int(i) for i in np.argsort(-(utility + self._rng.gumbel(size=len(responses))), kind="stable")]

    def thumb(self, prompt: str, response: str) -> bool:
        """Thumb up (True) with probability σ((gold − threshold) / T)."""
        return bool(self._rng.random() < _sigmoid((gold_score(prompt, response) - self.threshold) / self.temperature))

    def agreement_ceiling(self, prompts: Sequence[str], pairs: Sequence[tuple[str, str]]) -> float:
        """Expected share of this annotator's labels on ``pairs`` that agree with the gold ordering.

        The mean over pairs of σ(|g_a − g_b| / T): the accuracy of a perfect reward model measured
        against this annotator's labels (a tie in gold counts one half).
        """
        if len(prompts) != len(pairs) or not pairs:
            raise ValueError(f"agreement_ceiling needs one prompt per pair, got {len(prompts)} prompts, {len(pairs)} pairs")
        a, b = zip(*pairs)
        gap = np.abs(gold_scores(prompts, a) - gold_scores(prompts, b))
        return float(np.mean(_sigmoid(gap / self.temperature)))
