"""The ground-truth ("gold") score of a customer-support response: what the simulated human wants.

The score is a pure function of the prompt and response TEXT, so it scores anything a policy may
generate (garbage, repeated phrases, truncated text), not only the world's templates::

    gold = 1.5 * action                                   # right action for the prompt's topic
         + 1.0 * clip(vader, -0.5, 0.6) / 0.6             # politeness, capped: praise spam gains nothing
         + 1.0 * offer                                    # completeness: offers further help
         - 1.5 * rude - 1.0 * irrelevant                  # rude remark / off-topic remark
         - 0.08 * max(0, words - 12)                      # concision: each word past 12 costs
         - 3.0 * repetition                               # share of word trigrams seen before

    action = 1 if the response names the topic's own action (``Topic.signature``), else
             1/3 if it names a generic action ("Let me look into this for you."), else 0;
             minus 2/3 for each other topic's action it names (at most 2).

The topic is recovered from the prompt's customer message (``world.topic_of``); a prompt with no
known topic earns no action term. ``vader`` is the compound score of vaderSentiment on the whole
response. Cue matching is on lower-cased text; ``words`` counts ``[a-z0-9']+`` runs.
No single term is worth maximising alone: the action is the largest reward, politeness saturates,
and every extra sentence costs length (and, if repeated, repetition).
The best responses (empathetic opener + right action + offer, ~18 words) score about 2.8; the
demonstrations (``world.DEMO_MIX``) average about 0.55 (``python -m rlhf_jax.data.simulated``).
"""
from __future__ import annotations

import functools
import re
from typing import Sequence

import numpy as np
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf_jax.data.simulated.world import TOPICS, Topic, candidate_responses, topic_of

W_ACTION, W_POLITE, W_OFFER, W_RUDE, W_IRRELEVANT, W_LENGTH, W_REPEAT = 1.5, 1.0, 1.0, 1.5, 1.0, 0.08, 3.0
VADER_MIN, VADER_CAP = -0.5, 0.6
FREE_WORDS = 12
GENERIC_CREDIT, WRONG_COST, MAX_WRONG = 1 / 3, 2 / 3, 2

GENERIC_CUE = re.compile(r"look into|will check this|main phone line")
OFFER_CUE = re.compile(r"anything else|further (?:help|assistance)")
RUDE_CUE = re.compile(r"not my problem|stop complaining|read the instructions|your own fault|\bstupid\b|\bwhatever\b")
IRRELEVANT_CUE = re.compile(r"weather|raining|cafeteria|pasta|football|vacation")
_WORD = re.compile(r"[a-z0-9']+")
_SIGNATURES = tuple((t.name, re.compile(t.signature)) for t in TOPICS)


@functools.cache
def _vader() -> SentimentIntensityAnalyzer:
    return SentimentIntensityAnalyzer()


@functools.lru_cache(maxsize=1 << 18)
def _response_terms(response: str) -> tuple[float, frozenset[str], bool]:
    """Everything about a response that does not depend on the prompt: (topic-free score, actions named, generic?)."""
    text = response.strip().lower()
    words = _WORD.findall(text)
    trigrams = list(zip(words, words[1:], words[2:]))
    repetition = 1.0 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    vader = _vader().polarity_scores(response)["compound"] if words else 0.0
    score = (W_POLITE * float(np.clip(vader, VADER_MIN, VADER_CAP)) / VADER_CAP
             + W_OFFER * bool(OFFER_CUE.search(text))
             - W_RUDE * bool(RUDE_CUE.search(text))
             - W_IRRELEVANT * bool(IRRELEVANT_CUE.search(text))
             - W_LENGTH * max(0, len(words) - FREE_WORDS)
             - W_REPEAT * repetition)
    named = frozenset(name for name, sig in _SIGNATURES if sig.search(text))
    return score, named, bool(GENERIC_CUE.search(text))


@functools.lru_cache(maxsize=1 << 16)
def _topic(prompt: str) -> Topic | None:
    return topic_of(prompt)


def action_term(topic: Topic | None, named: frozenset[str], generic: bool) -> float:
    """The action part of the gold score, in [-4/3, 1] (see the module docstring)."""
    if topic is None:
        return 0.0
    wrong = min(len(named - {topic.name}), MAX_WRONG)
    credit = 1.0 if topic.name in named else GENERIC_CREDIT if generic else 0.0
    return credit - WRONG_COST * wrong


def gold_score(prompt: str, response: str) -> float:
    """The gold score of ``response`` to ``prompt`` (formula in the module docstring). Cached by text."""
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise TypeError(f"gold_score takes two strings, got {type(prompt).__name__} and {type(response).__name__}")
    rest, named, generic = _response_terms(response)
    return W_ACTION * action_term(_topic(prompt), named, generic) + rest


def gold_scores(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """``gold_score`` of each (prompt, response) pair, as a float64 array of shape ``(len(prompts),)``."""
    if len(prompts) != len(responses):
        raise ValueError(f"gold_scores: {len(prompts)} prompts but {len(responses)} responses")
    return np.array([gold_score(p, r) for p, r in zip(prompts, responses)], dtype=np.float64)


def best_response(prompt: str) -> str:
    """The best-scoring response (with a leading space) among the world's filler-free responses to ``prompt``.

    A reference for the achievable gold score: no response built from the world's parts beats it.
    """
    topic = _topic(prompt)
    if topic is None:
        raise ValueError(f"best_response: no topic recognised in prompt {prompt!r}")
    return max((" " + r for r in candidate_responses(topic)), key=lambda r: gold_score(prompt, r))
