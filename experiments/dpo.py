"""Direct preference optimisation (and IPO / cDPO / robust DPO / SimPO): no explicit reward model.

    python experiments/dpo.py                                   # after sft.py; simulated comparisons
    python experiments/dpo.py --variant ipo --beta 0.5
    python experiments/dpo.py --model.path runs/qwen/sft/hf --data.path ultrafeedback.parquet --data.layout trl

Writes <run.out>/dpo/ (or dpo_<variant>/): metrics, checkpoints, hf/, eval.json and samples.md (the
held-out evaluation of rlhf_jax.evaluation: KL to the SFT reference, length, EOS rate, reward-model
score and win rate with --reward-model, gold score with the simulated annotator).
"""
# %%
from __future__ import annotations

import dataclasses
import functools
import pathlib

import tyro

from rlhf_jax import cli, defaults, evaluation, losses, memory, model_io, models, objectives, steps, trainer
from rlhf_jax.trainable import Trainable
from rlhf_jax.data import sources
from rlhf_jax.data import BatchIterator, collate_pairs, encode, simulated
from rlhf_jax.train_state import make_optimizer, shardings_of


STAGE = "dpo"


@dataclasses.dataclass(frozen=True)
class DPOConfig(cli.OfflinePolicyArgs):
    """DPO-family flags; the policy, data, run and evaluation flags are cli.OfflinePolicyArgs' (data: comparisons,
    by default the simulated ones the reward model is trained on)."""

    variant: str = "dpo"
    """One of losses.DPO_VARIANTS: dpo, cdpo, robust, ipo, simpo."""
    beta: float = 0.1
    """β of the implicit reward β·log(π/π_ref)."""
    label_smoothing: float = 0.0
    """Assumed label-flip rate (cdpo / robust)."""
    nll_coef: float = 0.0
    """α of RPO: adds α × the chosen responses' per-token NLL to the loss (0 = plain DPO)."""
    policy_eval_every: int = 0
    """Steps between held-out policy evaluations during training (samples of the policy and the reference: KL,
    reward-model and gold scores; the points of the over-optimisation curve). 0 = only the evaluation at the end."""
    reference: str | None = None
    """Frozen reference (default: the starting policy). Iterated DPO rounds start from the last policy and keep
    the SFT model here. Not with --lora.rank (there the base, adapter off, is the reference)."""


def main(cfg: DPOConfig) -> dict:
    with memory.PeakRSS() as peak:
        result, out, stage = _main(cfg)
    return trainer.record_peak_memory(stage, peak, result, out)


def _main(cfg: DPOConfig):
    mesh, rules = cli.setup(cfg.run)
    sft_path = cfg.model.path or str(pathlib.Path(cfg.run.out) / "sft" / "hf")
    model_cfg, params, tokenizer = model_io.load_lm(dataclasses.replace(cfg.model, path=sft_path))
    train_rows = sources.rows_from(cfg.data, "pairwise", "train", simulated.pairwise_rows)
    eval_rows = sources.rows_from(cfg.data, "pairwise", "eval", simulated.pairwise_rows)
    cfg = resolve_config(cfg, model_cfg, tokenizer, train_rows + eval_rows)  # held-out rows must fit too
    axes = models.param_logical_axes(model_cfg)
    reference_free = cfg.variant == "simpo"
    optim_cfg = cli.optimizer_for(cfg.optim, cfg.steps)
    optimizer = make_optimizer(optim_cfg)
    trainable = Trainable.create(cfg.lora, model_cfg, reference_path=None if reference_free else ())
    ref_params = params
    if cfg.reference is not None and not reference_free:
        if cfg.lora.enabled:
            raise ValueError("--reference with --lora.rank: the LoRA reference is the base with the adapter off")
        ref_cfg, ref_params, _ = model_io.load_lm(dataclasses.replace(cfg.model, path=cfg.reference))
        if ref_cfg != model_cfg:
            raise ValueError(f"--reference {cfg.reference} is not the policy's architecture:\n{ref_cfg}\nvs\n{model_cfg}")
    state = trainable.place(model_cfg, params, axes, optimizer, mesh, rules, frozen=None if reference_free else ref_params,
                            frozen_axes=None if reference_free else axes, donate=True)
    del params, ref_params
    memory.release_freed_host_memory()  # the host copies placed on the devices
    state_sh = shardings_of(state)
    if cfg.variant not in losses.DPO_VARIANTS:
        raise ValueError(f"--variant {cfg.variant!r} is not one of {sorted(losses.DPO_VARIANTS)}")
    loss_fn = functools.partial(losses.dpo_loss, variant=cfg.variant, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                                nll_coef=cfg.nll_coef)
    train_step = steps.make_dpo_step(model_cfg, optimizer, state_sh, mesh, rules, loss_fn=loss_fn, view=trainable.view)
    eval_step = steps.make_eval_step(functools.partial(objectives.dpo_objective, model_cfg=model_cfg, loss_fn=loss_fn),
                                     state_sh, mesh, rules, view=trainable.view)

    collate = functools.partial(collate_pairs, pad_id=tokenizer.pad_token_id, length=cfg.max_len)
    batches = BatchIterator(sources.encode_rows(cfg.data, train_rows, tokenizer, max_len=cfg.max_len, what="training rows"), collate, batch_size=cfg.batch_size,
                            seed=cfg.run.seed)

    evaluate = trainer.held_out_eval(eval_step, eval_rows, tokenizer, collate, max_len=cfg.max_len, data=cfg.data,
                                      batch_size=cfg.batch_size, mesh=mesh, rules=rules)

    stage = "dpo" if cfg.variant == "dpo" else f"dpo_{cfg.variant}"
    prompts = sources.held_out_policy_prompts(cfg.data, eval_rows, cfg.num_eval_prompts, simulated.prompt_rows)
    gold = cfg.gold if cfg.gold is not None else cfg.data.path is None
    policy_eval = None
    memo: dict = {}  # the reference's held-out samples and scores: sampled once, reused by every evaluation below
    if cfg.policy_eval_every and prompts:
        reward = evaluation.find_reward_model(stage, cfg.run.out, cfg.reward_model, cfg.model, tokenizer)
        sft_reference = model_io.load_lm(dataclasses.replace(cfg.model, path=sft_path))[1] if reference_free else None

        def evaluate_policy(state):
            reference = sft_reference if reference_free else trainable.reference(state)
            return evaluation.scalars(evaluation.evaluate_policy(
                model_cfg, trainable.lm(state), reference, tokenizer, prompts, seed=cfg.run.seed + 1000,
                sample_args=cfg.sample, reward=reward, gold=gold, mesh=mesh, rules=rules, reference_memo=memo))
        policy_eval = (cfg.policy_eval_every, evaluate_policy)
    state, last_eval = trainer.train_loop(stage=stage, run=cfg.run, state=state, step_fn=train_step, batches=batches,
                                           num_steps=cfg.steps, mesh=mesh, rules=rules, config=cfg, eval_fn=evaluate,
                                           eval_every=cfg.eval_every, print_keys=("optim/loss", "dpo/accuracy", "dpo/margin"),
                                           optim=optim_cfg, policy_eval=policy_eval)
    out = cli.stage_dir(cfg.run, stage)
    result = {**trainable.export(out, model_cfg, state, tokenizer, base_model=sft_path), **last_eval}
    if prompts:
        reference = (model_io.load_lm(dataclasses.replace(cfg.model, path=sft_path))[1] if reference_free
                     else trainable.reference(state))  # the state's own reference: no second copy
        result.update(evaluation.evaluate_trained_policy(
            stage=stage, name=stage.upper(), out=out, step=cfg.steps, model_cfg=model_cfg, policy=trainable.lm(state),
            reference=reference, tokenizer=tokenizer, prompts=prompts, run_out=cfg.run.out, model_args=cfg.model,
            reward_model=cfg.reward_model, sample_args=cfg.sample,
            gold=gold, seed=cfg.run.seed + 1000, mesh=mesh, rules=rules, reference_memo=memo))
    elif cfg.num_eval_prompts:
        print(f"[{stage}] no held-out prompts (pass --data.eval-path or a --data.eval-fraction > 0): no evaluation",
              flush=True)
    trainer.write_json(out / "eval.json", result)
    return result, out, stage


def resolve_config(cfg: DPOConfig, model_cfg, tokenizer, train_rows) -> DPOConfig:
    """``cfg`` with its auto fields filled for this model and data (rlhf_jax.defaults)."""
    kind = defaults.model_kind(model_cfg)
    facts = {}
    if kind == "pretrained" and (defaults.unresolved(cfg, STAGE)):
        facts = defaults.data_facts(encode(train_rows, tokenizer, max_len=model_cfg.max_position_embeddings), model_cfg=model_cfg)
    return defaults.resolve(cfg, STAGE, kind=kind, facts=facts)


# %%
if __name__ == "__main__":
    main(tyro.cli(DPOConfig))
