"""The GRPO family: GRPO, Dr. GRPO, DAPO, GSPO, RLOO and REINFORCE++ as their papers set them
(rlhf_jax.rl.algorithms.PRESETS), no critic, on the library's RL loop (rlhf_jax.rl.loop).

    python experiments/grpo.py                                    # GRPO after sft.py and reward_model.py
    python experiments/grpo.py --algo dapo                        # clip-higher, token mean, dynamic sampling
    python experiments/grpo.py --algo rloo --algo-args.samples-per-prompt 8
    python experiments/grpo.py --reward rlhf_jax.rewards:gold     # a Python reward function instead of the RM
    python experiments/grpo.py --reward my_rules.py:format_ok=0.5 --reward-model-weight 1   # both, weighted

Writes <run.out>/<algo>/: metrics (TensorBoard + metrics.jsonl), samples.md, checkpoints, hf/, eval.json.
"""
# %%
from __future__ import annotations

import tyro

from rlhf_jax.rl.policy_gradient import RLConfig, main

# %%
if __name__ == "__main__":
    main(tyro.cli(RLConfig, default=RLConfig(algo="grpo")))
