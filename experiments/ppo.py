"""RLHF with PPO: maximise the reward model's score minus a per-token KL penalty to the SFT model.

Each iteration samples responses to a batch of prompts, scores them (reward model at the last
token, −β·KL at every token, GAE on a value head or a separate critic), and runs epochs ×
minibatches of clipped PPO updates inside one jitted step. The loop is the library's
(rlhf_jax.rl.loop); ``--algo`` switches to any other method of rlhf_jax.rl.algorithms.

    python experiments/ppo.py                                 # after sft.py and reward_model.py
    python experiments/ppo.py --model.path runs/qwen/sft/hf --reward-model runs/qwen/rm/hf \
        --data.path prompts.jsonl --run.out runs/qwen --kl.adaptive --run.mesh.fsdp 8
    python experiments/ppo.py --reward rlhf_jax.rewards:gold  # oracle reward: the gold scorer, no reward model

Writes <run.out>/ppo/: metrics (TensorBoard + metrics.jsonl), samples.md, checkpoints, hf/, eval.json.
"""
# %%
from __future__ import annotations

import tyro

from rlhf_jax.rl.policy_gradient import RLConfig, main

# %%
if __name__ == "__main__":
    main(tyro.cli(RLConfig, default=RLConfig(algo="ppo")))
