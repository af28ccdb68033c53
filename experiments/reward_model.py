"""Reward model: the SFT backbone with a scalar head, trained with the pairwise Bradley–Terry loss
on annotator comparisons, then normalised so that SFT samples score mean 0, std 1.

    python experiments/reward_model.py                      # after experiments/sft.py (reads runs/default/sft/hf)
    python experiments/reward_model.py --model.path runs/qwen/sft/hf --data.path hh-rlhf/train.jsonl.gz \
        --data.layout hh_rlhf --data.eval-path hh-rlhf/test.jsonl.gz --run.out runs/qwen

Writes <run.out>/rm/: hf/ (backbone + reward_head.safetensors), metrics, checkpoints, eval.json
(held-out accuracy and, with the simulated annotator, its agreement ceiling).
"""
# %%
from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import numpy as np
import tyro

from rlhf_jax import advantages, defaults, lora, losses, memory, models, steps, workflow
from rlhf_jax.configs import OptimizerConfig
from rlhf_jax.data import BatchIterator, collate_pairs, encode, simulated
from rlhf_jax.train_state import make_optimizer, shardings_of

STAGE = "rm"
LOSSES = {"bt": losses.pairwise_reward_loss,
          "bt_margin": losses.pairwise_reward_loss,  # uses the rows' margin field (Llama 2)
          "bt_centered": functools.partial(losses.pairwise_reward_loss, center_coef=0.01)}


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    model: workflow.ModelArgs = workflow.ModelArgs()
    """Backbone to start from (default: <run.out>/sft/hf)."""
    data: workflow.DataArgs = workflow.DataArgs(num_train=6144, num_eval=1024, seed=1)
    run: workflow.RunArgs = workflow.RunArgs()
    optim: OptimizerConfig = OptimizerConfig(learning_rate=None, warmup_steps=20, total_steps=400, weight_decay=0.01)
    sample: workflow.SampleArgs = workflow.SampleArgs()
    lora: lora.LoraConfig = lora.LoraConfig()
    """LoRA adapters on the backbone (--lora.rank 8); the head trains beside them. Exports hf/ (merged
    backbone + reward_head.safetensors) and peft/."""
    steps: int = 400
    batch_size: int = 32
    max_len: int | None = None
    """Tokens per sequence. None: auto (see rlhf_jax.defaults; embedded 96, pretrained the longest training
    pair rounded up to 16). optim.learning_rate and sample lengths are auto too (embedded 3e-4, 48, 48)."""
    loss: str = "bt"
    """Loss variant: one of bt, bt_margin, bt_centered."""
    eval_every: int = 200
    normalize_samples: int = 256
    """SFT samples that set the reward gain and bias (mean 0, std 1); 0 disables normalisation."""


def main(cfg: RewardConfig) -> dict:
    with memory.PeakRSS() as peak:
        result, out, stage = _main(cfg)
    return workflow.record_peak_memory(stage, peak, result, out)


def _main(cfg: RewardConfig):
    mesh, rules = workflow.setup(cfg.run)
    sft_path = cfg.model.path or str(pathlib.Path(cfg.run.out) / "sft" / "hf")
    if not pathlib.Path(sft_path).exists():
        raise FileNotFoundError(f"no backbone at {sft_path}: run experiments/sft.py first or pass --model.path")
    model_cfg, backbone, tokenizer = workflow.load_lm(dataclasses.replace(cfg.model, path=sft_path))
    d = model_cfg.d_model
    params = {"backbone": backbone, "head": models.init_scalar_head(model_cfg, jax.random.key(cfg.run.seed),
                                                                   init_scale=1.0 / np.sqrt(d + 1))}
    axes = {"backbone": models.param_logical_axes(model_cfg), "head": models.scalar_head_logical_axes()}
    train_rows = workflow.rows_from(cfg.data, "pairwise", "train", simulated.pairwise_rows)
    eval_rows = workflow.rows_from(cfg.data, "pairwise", "eval", simulated.pairwise_rows)
    cfg = resolve_config(cfg, model_cfg, tokenizer, train_rows + eval_rows)  # held-out rows must fit too
    collate = functools.partial(collate_pairs, pad_id=tokenizer.pad_token_id, length=cfg.max_len)
    batches = BatchIterator(workflow.encode_rows(cfg.data, train_rows, tokenizer, max_len=cfg.max_len, what="training rows"), collate,
                            batch_size=cfg.batch_size, seed=cfg.run.seed)

    optim_cfg = workflow.optimizer_for(cfg.optim, cfg.steps)
    optimizer = make_optimizer(optim_cfg)
    trainable = workflow.Trainable.create(cfg.lora, model_cfg, lm_path=("backbone",))
    state = trainable.place(model_cfg, params, axes, optimizer, mesh, rules, donate=True)
    del params, backbone
    memory.release_freed_host_memory()  # the host copies placed on the devices
    state_sh = shardings_of(state)
    train_step = steps.make_reward_step(model_cfg, optimizer, state_sh, mesh, rules, loss_fn=LOSSES[cfg.loss],
                                        view=trainable.view)
    eval_step = steps.make_eval_step(functools.partial(steps.reward_objective, model_cfg=model_cfg), state_sh, mesh, rules,
                                     view=trainable.view)

    evaluate = workflow.held_out_eval(eval_step, eval_rows, tokenizer, collate, max_len=cfg.max_len, data=cfg.data,
                                      batch_size=cfg.batch_size, mesh=mesh, rules=rules)

    state, last_eval = workflow.train_loop(stage="rm", run=cfg.run, state=state, step_fn=train_step, batches=batches,
                                           num_steps=cfg.steps, mesh=mesh, rules=rules, config=cfg, eval_fn=evaluate,
                                           eval_every=cfg.eval_every, print_keys=("rm/loss", "rm/accuracy"),
                                           optim=optim_cfg)
    rm_params = trainable.stage_params(state)
    result = {"accuracy": last_eval.get("eval/rm/accuracy"), "eval": last_eval}
    if cfg.data.path is None and eval_rows:
        annotator = simulated.Annotator(cfg.data.seed)
        result["agreement_ceiling"] = annotator.agreement_ceiling(
            [r.prompt for r in eval_rows], [(r.chosen, r.rejected) for r in eval_rows])
    if cfg.normalize_samples:  # lm-human-preferences: samples of the SFT policy score mean 0, std 1
        prompts = [r.prompt for r in train_rows][:cfg.normalize_samples]
        _, rollouts = workflow.sample(model_cfg, sft_policy(trainable, state, cfg.model, sft_path), tokenizer, prompts,
                                      key=jax.random.key(cfg.run.seed + 7), sample_args=cfg.sample)
        scores = workflow.rm_scores(model_cfg, rm_params, rollouts)[:len(prompts)]
        gain, bias = (float(x) for x in advantages.reward_gain_bias(scores, target_mean=0.0, target_std=1.0))
        rm_params = {**rm_params, "head": workflow.fold_normalization(rm_params["head"], gain, bias)}
        result.update(raw_score_mean=float(scores.mean()), raw_score_std=float(scores.std()), gain=gain, bias=bias)
    out = workflow.stage_dir(cfg.run, "rm")
    workflow.save_reward_model(out / "hf", model_cfg, {**rm_params, "backbone": trainable.merged_lm(state, deferred=True)}, tokenizer)
    result["hf"] = str(out / "hf")
    result.update(trainable.save_adapters(out, model_cfg, state, base_model=sft_path))
    workflow.write_json(out / "eval.json", result)
    print(f"[rm] held-out accuracy {result['accuracy']}, ceiling {result.get('agreement_ceiling')}", flush=True)
    return result, out, "rm"


def sft_policy(trainable: workflow.Trainable, state, model_args: workflow.ModelArgs, sft_path: str):
    """The SFT policy the reward model is normalised on: the backbone as loaded, before reward training
    (with LoRA the frozen base; otherwise reloaded from ``sft_path``, so no copy is held while training)."""
    if trainable.lora_cfg.enabled:
        return state.frozen[lora.BASE]
    return workflow.load_lm(dataclasses.replace(model_args, path=sft_path))[1]


def resolve_config(cfg: RewardConfig, model_cfg, tokenizer, train_rows) -> RewardConfig:
    """``cfg`` with its auto fields filled for this model and data (rlhf_jax.defaults)."""
    kind = defaults.model_kind(model_cfg)
    facts = {}
    if kind == "pretrained" and (defaults.unresolved(cfg, STAGE)):
        facts = defaults.data_facts(encode(train_rows, tokenizer, max_len=model_cfg.max_position_embeddings), model_cfg=model_cfg)
    return defaults.resolve(cfg, STAGE, kind=kind, facts=facts)


# %%
if __name__ == "__main__":
    main(tyro.cli(RewardConfig))
