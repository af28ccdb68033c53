"""``python -m rlhf_jax.data.simulated [--n N] [--temperature T]``: the world's reference numbers.

Prints the mean gold score of the demonstrations (what SFT imitates), of the best response the
world's parts can build (what RLHF can reach), the effect of each response part, and the
annotator's agreement ceiling on pairs of demonstrations (the best held-out accuracy any reward
model can have on its labels). The gold score sees a prompt only through its topic, so the train
and eval splits give the same numbers for the same seed.
"""
from __future__ import annotations

import numpy as np
import tyro

from rlhf_jax.data.simulated.annotator import DEFAULT_TEMPERATURE, Annotator
from rlhf_jax.data.simulated.gold import best_response, gold_scores
from rlhf_jax.data.simulated.rows import pairwise_rows, sft_rows


def main(n: int = 4000, temperature: float = DEFAULT_TEMPERATURE, seed: int = 0) -> None:
    """Print the reference numbers over ``n`` demonstrations and ``n`` pairs."""
    rows = sft_rows(n, seed)
    prompts = [r["prompt"] for r in rows]
    demo = np.array([r["meta"]["gold"] for r in rows])
    best = gold_scores(prompts, [best_response(p) for p in prompts])
    print(f"demonstration gold {demo.mean():.3f} ± {demo.std():.3f}; best achievable {best.mean():.3f}")
    print("mean demonstration gold by part:")
    for part in rows[0]["meta"]["parts"]:
        values = sorted({r["meta"]["parts"][part] for r in rows})
        means = {v: demo[[r["meta"]["parts"][part] == v for r in rows]].mean() for v in values}
        print(f"  {part:7s} " + "  ".join(f"{v}: {m:+.2f}" for v, m in means.items()))
    annotator = Annotator(seed, temperature)
    pairs = pairwise_rows(n, seed, annotator=annotator)
    ceiling = annotator.agreement_ceiling([r["prompt"] for r in pairs], [(r["chosen"], r["rejected"]) for r in pairs])
    print(f"agreement ceiling at temperature {temperature}: {ceiling:.3f}")


if __name__ == "__main__":
    tyro.cli(main)
