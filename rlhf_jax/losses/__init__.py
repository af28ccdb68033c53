"""Loss functions: pure array math, each ``fn(arrays..., *, options) -> (loss, metrics)``."""
from rlhf_jax.losses.dpo import DPO_VARIANTS, chosen_nll, dpo_loss, ipo_loss, kto_loss, robust_preference_loss, sigmoid_preference_loss
from rlhf_jax.losses.ppo import explained_variance, ppo_policy_loss, value_loss
from rlhf_jax.losses.reward import pairwise_reward_loss, ranking_reward_loss, ranking_to_pairs, ranks_from_ranking
from rlhf_jax.losses.sft import SFT_TERMS, sft_loss, sft_loss_from_terms, sft_terms_needed, sft_token_terms

__all__ = [
    "DPO_VARIANTS",
    "SFT_TERMS",
    "chosen_nll",
    "dpo_loss",
    "explained_variance",
    "ipo_loss",
    "kto_loss",
    "pairwise_reward_loss",
    "ppo_policy_loss",
    "ranking_reward_loss",
    "ranking_to_pairs",
    "ranks_from_ranking",
    "robust_preference_loss",
    "sft_loss",
    "sft_loss_from_terms",
    "sft_terms_needed",
    "sft_token_terms",
    "sigmoid_preference_loss",
    "value_loss",
]
