"""rlhf_jax: functional JAX/Flax RLHF (SFT, reward models, PPO, DPO) from one CPU to a mesh."""

__version__ = "0.1.0"
