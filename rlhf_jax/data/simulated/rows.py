"""Datasets of the simulated world, as plain dict rows in the formats of :mod:`rlhf_jax.data.formats`.

Every row has the format's fields plus a ``meta`` dict (topic, split, gold scores) that the formats
ignore. Responses start with a space (they follow the prompt's ``"Agent:"``), as a policy would
generate them. The same ``(n, seed, split)`` always gives the same rows, and builders called with
the same seed draw the same prompts: give independent datasets (SFT demonstrations, reward-model
comparisons, RL prompts, evaluation) different seeds.

Responses to annotate come from the demonstrations' distribution (``demo_sampler``) or from any
``ResponseSampler``, e.g. the current policy, so that an iterated pipeline annotates its own samples.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from rlhf_jax.data.simulated.annotator import Annotator
from rlhf_jax.data.simulated.gold import gold_score, gold_scores
from rlhf_jax.data.simulated.world import DEMO_MIX, Mix, Split, sample_prompt, sample_response, topic_of

ResponseSampler = Callable[[Sequence[str], int], list[list[str]]]
"""``(prompts, k) -> k responses for each prompt``; responses start with a space."""

MAX_RESAMPLES = 8
"""Rounds of resampling when a sampler returns empty or repeated responses for a prompt."""

_PROMPT_STREAM, _RESPONSE_STREAM = 0, 1


def _prompts(n: int, seed: int, split: Split) -> list[str]:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    rng = np.random.default_rng((seed, _PROMPT_STREAM))
    return [sample_prompt(rng, split)[0] for _ in range(n)]


def _meta(prompt: str, split: Split, **extra: Any) -> dict[str, Any]:
    topic = topic_of(prompt)
    return {"topic": topic.name if topic else None, "split": split, **extra}


def demo_sampler(seed: int, mix: Mix = DEMO_MIX) -> ResponseSampler:
    """Responses drawn from the demonstrations' distribution (``world.sample_response``)."""
    rng = np.random.default_rng((seed, _RESPONSE_STREAM))

    def sample(prompts: Sequence[str], k: int) -> list[list[str]]:
        out = []
        for prompt in prompts:
            topic = topic_of(prompt)
            if topic is None:
                raise ValueError(f"demo_sampler: no topic recognised in prompt {prompt!r}")
            out.append([" " + sample_response(rng, topic, mix)[0] for _ in range(k)])
        return out

    return sample


def _distinct_responses(prompts: list[str], k: int, sampler: ResponseSampler) -> list[list[str]]:
    """``k`` distinct non-empty responses per prompt, resampling the prompts that lack them."""
    chosen: list[list[str] | None] = [None] * len(prompts)
    todo = list(range(len(prompts)))
    for _ in range(MAX_RESAMPLES):
        samples = sampler([prompts[i] for i in todo], k)
        if len(samples) != len(todo) or any(len(s) != k for s in samples):
            raise ValueError(f"ResponseSampler must return {k} responses for each of {len(todo)} prompts")
        for i, responses in zip(todo, samples):
            if len(set(responses)) == k and all(r.strip() for r in responses):
                chosen[i] = list(responses)
        todo = [i for i in todo if chosen[i] is None]
        if not todo:
            return chosen  # type: ignore[return-value]
    raise ValueError(f"after {MAX_RESAMPLES} tries the sampler still gives empty or repeated responses for "
                     f"{len(todo)} prompts, e.g. {prompts[todo[0]]!r}; sample at a higher temperature")


def prompt_rows(n: int, seed: int = 0, split: Split = "train") -> list[dict[str, Any]]:
    """``{prompt, meta}`` rows: prompts for RL or evaluation."""
    return [{"prompt": p, "meta": _meta(p, split)} for p in _prompts(n, seed, split)]


def sft_rows(n: int, seed: int = 0, split: Split = "train", mix: Mix = DEMO_MIX) -> list[dict[str, Any]]:
    """Demonstrations ``{prompt, completion, meta}`` of mixed quality (each part drawn from ``mix``)."""
    rng = np.random.default_rng((seed, _RESPONSE_STREAM))
    rows = []
    for prompt in _prompts(n, seed, split):
        text, parts = sample_response(rng, topic_of(prompt), mix)
        completion = " " + text
        rows.append({"prompt": prompt, "completion": completion,
                     "meta": _meta(prompt, split, gold=gold_score(prompt, completion), parts=parts)})
    return rows


def pairwise_rows(n: int, seed: int = 0, split: Split = "train", *, responses_from: ResponseSampler | None = None,
                  annotator: Annotator | None = None) -> list[dict[str, Any]]:
    """``{prompt, chosen, rejected, meta}``: two distinct responses per prompt, ordered by the annotator.

    Responses come from ``responses_from`` (default: ``demo_sampler(seed)``); the default annotator
    is ``Annotator(seed)``. ``meta`` holds the gold scores of both responses.
    """
    prompts = _prompts(n, seed, split)
    pairs = _distinct_responses(prompts, 2, responses_from or demo_sampler(seed))
    annotator = annotator or Annotator(seed)
    rows = []
    for prompt, (a, b) in zip(prompts, pairs):
        chosen, rejected = (a, b) if annotator.compare(prompt, a, b) == 0 else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                     "meta": _meta(prompt, split, gold_chosen=gold_score(prompt, chosen),
                                   gold_rejected=gold_score(prompt, rejected))})
    return rows


def ranked_rows(n: int, seed: int = 0, split: Split = "train", *, k: int = 4,
                responses_from: ResponseSampler | None = None, annotator: Annotator | None = None) -> list[dict[str, Any]]:
    """``{prompt, responses, ranking, meta}``: ``k`` distinct responses, ``ranking`` best first (Plackett–Luce)."""
    if k < 2:
        raise ValueError(f"ranked_rows needs k >= 2 responses, got {k}")
    prompts = _prompts(n, seed, split)
    samples = _distinct_responses(prompts, k, responses_from or demo_sampler(seed))
    annotator = annotator or Annotator(seed)
    return [{"prompt": p, "responses": rs, "ranking": annotator.rank(p, rs),
             "meta": _meta(p, split, gold=gold_scores([p] * k, rs).tolist())} for p, rs in zip(prompts, samples)]


def binary_rows(n: int, seed: int = 0, split: Split = "train", *, responses_from: ResponseSampler | None = None,
                annotator: Annotator | None = None) -> list[dict[str, Any]]:
    """``{prompt, completion, label, meta}``: one response per prompt with the annotator's thumb up/down."""
    prompts = _prompts(n, seed, split)
    samples = _distinct_responses(prompts, 1, responses_from or demo_sampler(seed))
    annotator = annotator or Annotator(seed)
    return [{"prompt": p, "completion": c, "label": annotator.thumb(p, c),
             "meta": _meta(p, split, gold=gold_score(p, c))} for p, (c,) in zip(prompts, samples)]
