"""Online DPO: each iteration samples two responses per prompt from the current policy, a judge (the
reward model, reward functions or the simulated annotator) picks one, and the policy takes DPO steps
on the fresh pairs (rlhf_jax.rl.online_dpo, on the library's RL loop).

    python experiments/online_dpo.py                              # after sft.py and reward_model.py
    python experiments/online_dpo.py --judge annotator            # the simulated annotator labels every pair
    python experiments/online_dpo.py --loss ipo --beta 0.5 --reward rlhf_jax.rewards:gold

Writes <run.out>/online_dpo/: metrics, samples.md, checkpoints, hf/, eval.json.
"""
# %%
from __future__ import annotations

import tyro

from rlhf_jax.rl.online_dpo import OnlineDPOConfig, main

# %%
if __name__ == "__main__":
    main(tyro.cli(OnlineDPOConfig))
