"""The embedded default's data world: simulated customer support with a known gold score.

- ``world``: prompts over 14 topics (train / held-out eval split) and responses built from
  independent parts (opener, action, filler, rude or irrelevant remark, offer of help);
- ``gold``: ``gold_score(prompt, response)``, the ground truth a policy is judged by;
- ``annotator``: ``Annotator``, a noisy simulated human (Bradley–Terry / Plackett–Luce on gold);
- ``rows``: SFT, pairwise, ranked and binary datasets as plain dict rows.

Because the gold score is known, reward hacking (RM score up, gold down) is measurable.
"""
from rlhf_jax.data.simulated.annotator import DEFAULT_TEMPERATURE, Annotator
from rlhf_jax.data.simulated.gold import best_response, gold_score, gold_scores
from rlhf_jax.data.simulated.rows import (
    ResponseSampler,
    binary_rows,
    demo_sampler,
    pairwise_rows,
    prompt_rows,
    ranked_rows,
    sft_rows,
)
from rlhf_jax.data.simulated.world import DEMO_MIX, TOPICS, Mix, topic_of

__all__ = [
    "DEFAULT_TEMPERATURE", "DEMO_MIX", "TOPICS", "Annotator", "Mix", "ResponseSampler", "best_response",
    "binary_rows", "demo_sampler", "gold_score", "gold_scores", "pairwise_rows", "prompt_rows", "ranked_rows",
    "sft_rows", "topic_of",
]
