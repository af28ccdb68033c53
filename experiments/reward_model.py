"""Reward model: the SFT backbone with a scalar head, trained with the pairwise Bradley–Terry loss
on annotator comparisons, then normalised so that SFT samples score mean 0, std 1. With ``--feedback ranked``
it trains on K-way rankings instead: InstructGPT's loss over all K(K−1)/2 implied pairs of a prompt, in one
batch element, averaged per prompt (each prompt weighs the same whatever its K).

    python experiments/reward_model.py                      # after experiments/sft.py (reads runs/default/sft/hf)
    python experiments/reward_model.py --feedback ranked    # the simulated annotator's rankings of 4 responses
    python experiments/reward_model.py --feedback ranked --data.path rankings.jsonl   # {"prompt", "responses", "ranking"}
    python experiments/reward_model.py --model.path runs/qwen/sft/hf --data.path hh-rlhf/train.jsonl.gz \
        --data.layout hh_rlhf --data.eval-path hh-rlhf/test.jsonl.gz --run.out runs/qwen

Writes <run.out>/rm/: hf/ (backbone + reward_head.safetensors), metrics, checkpoints, eval.json
(held-out accuracy, over all implied pairs for rankings, and, with the simulated annotator, its agreement ceiling).
"""
# %%
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Literal

import jax
import numpy as np
import tyro

from rlhf_jax import advantages, cli, defaults, evaluation, lora, losses, memory, model_io, models, objectives, sampling, steps, trainer
from rlhf_jax.trainable import Trainable
from rlhf_jax.data import sources
from rlhf_jax.configs import OptimizerConfig
from rlhf_jax.data import BatchIterator, collate_pairs, collate_ranked, encode, simulated
from rlhf_jax.train_state import make_optimizer, shardings_of

STAGE = "rm"
LOSSES = {"bt": losses.pairwise_reward_loss,
          "bt_margin": losses.pairwise_reward_loss,  # uses the rows' margin field (Llama 2)
          "bt_centered": functools.partial(losses.pairwise_reward_loss, center_coef=0.01)}


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    model: cli.ModelArgs = cli.ModelArgs()
    """Backbone to start from (default: <run.out>/sft/hf)."""
    data: cli.DataArgs = cli.DataArgs(num_train=6144, num_eval=1024, seed=1)
    run: cli.RunArgs = cli.RunArgs()
    optim: OptimizerConfig = OptimizerConfig(learning_rate=None, warmup_steps=20, total_steps=400, weight_decay=0.01)
    sample: cli.SampleArgs = cli.SampleArgs()
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
    feedback: Literal["pairwise", "ranked"] = "pairwise"
    """Training rows: "pairwise" comparisons, or "ranked" K-way rankings ({"prompt", "responses", "ranking"},
    best first) trained with losses.ranking_reward_loss (all pairs of a prompt in one batch element, averaged per
    prompt; --batch-size then counts prompts, each with K sequences; --loss must be bt)."""
    num_responses: int = 4
    """K, the responses per simulated ranking (--feedback ranked without --data.path)."""

    def __post_init__(self):
        if self.feedback not in ("pairwise", "ranked"):
            raise ValueError(f"--feedback must be pairwise or ranked, got {self.feedback!r}")
        if self.feedback == "ranked" and self.loss != "bt":
            raise ValueError(f"--loss {self.loss} is a pairwise variant; --feedback ranked trains with bt over all "
                             f"implied pairs (losses.ranking_reward_loss)")


def main(cfg: RewardConfig) -> dict:
    with memory.PeakRSS() as peak:
        result, out, stage = _main(cfg)
    return trainer.record_peak_memory(stage, peak, result, out)


def _main(cfg: RewardConfig):
    mesh, rules = cli.setup(cfg.run)
    sft_path = cfg.model.path or str(pathlib.Path(cfg.run.out) / "sft" / "hf")
    if not pathlib.Path(sft_path).exists():
        raise FileNotFoundError(f"no backbone at {sft_path}: run experiments/sft.py first or pass --model.path")
    model_cfg, backbone, tokenizer = model_io.load_lm(dataclasses.replace(cfg.model, path=sft_path))
    d = model_cfg.d_model
    params = {"backbone": backbone, "head": models.init_scalar_head(model_cfg, jax.random.key(cfg.run.seed),
                                                                   init_scale=1.0 / np.sqrt(d + 1))}
    axes = {"backbone": models.param_logical_axes(model_cfg), "head": models.scalar_head_logical_axes()}
    simulated_rows = (simulated.pairwise_rows if cfg.feedback == "pairwise"
                      else functools.partial(simulated.ranked_rows, k=cfg.num_responses))
    train_rows = sources.rows_from(cfg.data, cfg.feedback, "train", simulated_rows)
    eval_rows = sources.rows_from(cfg.data, cfg.feedback, "eval", simulated_rows)
    cfg = resolve_config(cfg, model_cfg, tokenizer, train_rows + eval_rows)  # held-out rows must fit too
    collate = functools.partial(collate_pairs, pad_id=tokenizer.pad_token_id, length=cfg.max_len)
    if cfg.feedback == "ranked":  # K slots per prompt, K the most responses of any row: one shape, one compilation
        collate = functools.partial(collate_ranked, pad_id=tokenizer.pad_token_id, length=cfg.max_len,
                                    num_responses=max(len(r.responses) for r in train_rows + eval_rows))
    batches = BatchIterator(sources.encode_rows(cfg.data, train_rows, tokenizer, max_len=cfg.max_len, what="training rows"), collate,
                            batch_size=cfg.batch_size, seed=cfg.run.seed)

    optim_cfg = cli.optimizer_for(cfg.optim, cfg.steps)
    optimizer = make_optimizer(optim_cfg)
    trainable = Trainable.create(cfg.lora, model_cfg, lm_path=("backbone",))
    state = trainable.place(model_cfg, params, axes, optimizer, mesh, rules, donate=True)
    del params, backbone
    memory.release_freed_host_memory()  # the host copies placed on the devices
    state_sh = shardings_of(state)
    train_step = steps.make_reward_step(model_cfg, optimizer, state_sh, mesh, rules, loss_fn=LOSSES[cfg.loss],
                                        view=trainable.view)
    eval_step = steps.make_eval_step(functools.partial(objectives.reward_objective, model_cfg=model_cfg), state_sh, mesh, rules,
                                     view=trainable.view)
    if cfg.feedback == "ranked":  # the same model and state, the K-way objective (jit compiles lazily: nothing wasted)
        objective = functools.partial(objectives.ranking_reward_objective, model_cfg=model_cfg)
        train_step = steps.make_train_step(objective, optimizer, state_sh, mesh, rules, view=trainable.view)
        eval_step = steps.make_eval_step(objective, state_sh, mesh, rules, view=trainable.view)

    evaluate = trainer.held_out_eval(eval_step, eval_rows, tokenizer, collate, max_len=cfg.max_len, data=cfg.data,
                                      batch_size=cfg.batch_size, mesh=mesh, rules=rules)

    state, last_eval = trainer.train_loop(stage="rm", run=cfg.run, state=state, step_fn=train_step, batches=batches,
                                           num_steps=cfg.steps, mesh=mesh, rules=rules, config=cfg, eval_fn=evaluate,
                                           eval_every=cfg.eval_every, print_keys=("rm/loss", "rm/accuracy"),
                                           optim=optim_cfg)
    rm_params = trainable.stage_params(state)
    result = {"accuracy": last_eval.get("eval/rm/accuracy"), "eval": last_eval}
    if cfg.data.path is None and eval_rows:
        annotator = simulated.Annotator(cfg.data.seed)
        result["agreement_ceiling"] = annotator.agreement_ceiling(*implied_pairs(eval_rows))
    result["feedback"] = cfg.feedback
    if cfg.normalize_samples:  # lm-human-preferences: samples of the SFT policy score mean 0, std 1
        prompts = [r.prompt for r in train_rows][:cfg.normalize_samples]
        _, rollouts = sampling.sample(model_cfg, sft_policy(trainable, state, cfg.model, sft_path), tokenizer, prompts,
                                      key=jax.random.key(cfg.run.seed + 7), sample_args=cfg.sample)
        scores = evaluation.rm_scores(model_cfg, rm_params, rollouts)[:len(prompts)]
        gain, bias = (float(x) for x in advantages.reward_gain_bias(scores, target_mean=0.0, target_std=1.0))
        rm_params = {**rm_params, "head": model_io.fold_normalization(rm_params["head"], gain, bias)}
        result.update(raw_score_mean=float(scores.mean()), raw_score_std=float(scores.std()), gain=gain, bias=bias)
    out = cli.stage_dir(cfg.run, "rm")
    model_io.save_reward_model(out / "hf", model_cfg, {**rm_params, "backbone": trainable.merged_lm(state, deferred=True)}, tokenizer)
    result["hf"] = str(out / "hf")
    result.update(trainable.save_adapters(out, model_cfg, state, base_model=sft_path))
    trainer.write_json(out / "eval.json", result)
    print(f"[rm] held-out accuracy {result['accuracy']}, ceiling {result.get('agreement_ceiling')}", flush=True)
    return result, out, "rm"


def implied_pairs(rows) -> tuple[list, list[tuple[str, str]]]:
    """``(prompts, (better, worse) pairs)``: a comparison's own pair, a ranking's K(K−1)/2 pairs."""
    prompts, pairs = [], []
    for r in rows:
        row_pairs = ([(r.chosen, r.rejected)] if not hasattr(r, "ranking") else
                     [(r.responses[i], r.responses[j]) for i, j in losses.ranking_to_pairs(r.ranking)])
        prompts += [r.prompt] * len(row_pairs)
        pairs += row_pairs
    return prompts, pairs


def sft_policy(trainable: Trainable, state, model_args: cli.ModelArgs, sft_path: str):
    """The SFT policy the reward model is normalised on: the backbone as loaded, before reward training
    (with LoRA the frozen base; otherwise reloaded from ``sft_path``, so no copy is held while training)."""
    if trainable.lora_cfg.enabled:
        return state.frozen[lora.BASE]
    return model_io.load_lm(dataclasses.replace(model_args, path=sft_path))[1]


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
