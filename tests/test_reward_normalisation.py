"""reward_model.py sets the reward gain and bias on samples of the SFT policy (lm-human-preferences'
normalisation), not of the reward model's own, trained, backbone: recomputed here from the SFT export,
the raw scores' mean and std equal the ones the script reports, and those of samples from the trained
backbone do not. Full fine-tuning and LoRA (whose frozen base is the SFT policy). In process, on the
embedded model, with a learning rate high enough that the backbone's samples change.
"""
from __future__ import annotations

import dataclasses
import sys

import jax
import numpy as np
import pytest

from test_experiments import EXPERIMENTS

from rlhf_jax import cli, evaluation, lora, model_io, sampling
from rlhf_jax.data import sources
from rlhf_jax.configs import OptimizerConfig
from rlhf_jax.data import simulated

sys.path.insert(0, str(EXPERIMENTS))
import reward_model  # noqa: E402


@pytest.mark.parametrize("rank", [0, 4])
def test_reward_normalisation_samples_the_sft_policy(tmp_path, rank):
    model_cfg, params, tokenizer = model_io.load_lm(cli.ModelArgs(), jax.random.key(0))
    sft_dir = model_io.export_lm(tmp_path / "sft", model_cfg, params, tokenizer)
    cfg = reward_model.RewardConfig(
        model=cli.ModelArgs(path=str(sft_dir)), steps=4, batch_size=8, eval_every=0, normalize_samples=16,
        data=cli.DataArgs(num_train=64, num_eval=16, seed=1),
        optim=OptimizerConfig(learning_rate=3e-2 if rank else 1e-2, warmup_steps=0, total_steps=4),
        lora=lora.LoraConfig(rank=rank, targets=("all",)),
        run=cli.RunArgs(out=str(tmp_path / "run")))
    result = reward_model.main(cfg)

    train_rows = sources.rows_from(cfg.data, "pairwise", "train", simulated.pairwise_rows)
    eval_rows = sources.rows_from(cfg.data, "pairwise", "eval", simulated.pairwise_rows)
    resolved = reward_model.resolve_config(cfg, model_cfg, tokenizer, train_rows + eval_rows)
    prompts = [r.prompt for r in train_rows][:16]
    rm_cfg, rm_params, _ = model_io.load_reward_model(result["hf"])

    def raw_scores(policy):
        _, rollouts = sampling.sample(model_cfg, policy, tokenizer, prompts, key=jax.random.key(cfg.run.seed + 7),
                                      sample_args=resolved.sample)
        folded = evaluation.rm_scores(rm_cfg, rm_params, rollouts)[:len(prompts)]
        return (folded - result["bias"]) / result["gain"]

    sft_scores = raw_scores(model_io.load_lm(dataclasses.replace(cfg.model, path=str(sft_dir)))[1])
    np.testing.assert_allclose(sft_scores.mean(), result["raw_score_mean"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(sft_scores.std(), result["raw_score_std"], rtol=1e-3, atol=1e-4)
    own = raw_scores(rm_params["backbone"])  # what the old code sampled
    assert abs(own.mean() - result["raw_score_mean"]) > 1e-2 or abs(own.std() - result["raw_score_std"]) > 1e-2
