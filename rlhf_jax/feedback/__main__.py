"""``python -m rlhf_jax.feedback --model DIR --prompts FILE --out answers.jsonl [--seed S] [--thumbs]``

Shows two sampled responses per prompt and records which one you prefer (see
``rlhf_jax.feedback.collector`` for the keys, the files written and how a restart resumes).
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys

import tyro

from rlhf_jax.feedback.collector import collect, read_prompts
from rlhf_jax.feedback.sampler import ModelSampler


@dataclasses.dataclass(frozen=True)
class Args:
    model: pathlib.Path
    """Checkpoint directory in Hugging Face layout (config.json, safetensors, tokenizer files)."""
    prompts: pathlib.Path
    """JSON Lines or Parquet file with a text ``prompt`` field per record."""
    out: pathlib.Path
    """Answers (JSON Lines, appended); ties and skips go to ``<out stem>.undecided.jsonl`` beside it."""
    seed: int = 0
    """Sampling seed: the pair shown for prompt i depends only on (seed, i)."""
    max_new_tokens: int = 48
    """Longest response sampled."""
    temperature: float = 1.0
    """Sampling temperature."""
    thumbs: bool = False
    """Also ask for a thumb up / down on each response (stored in meta.thumbs)."""


def main(args: Args) -> int:
    prompts = read_prompts(args.prompts)
    sampler = ModelSampler(args.model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    try:
        collect(prompts, args.out, sampler, seed=args.seed, thumbs=args.thumbs)
    except KeyboardInterrupt:
        print("\ninterrupted; every answer given so far is saved", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))
