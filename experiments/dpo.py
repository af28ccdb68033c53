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

from rlhf_jax import cli, defaults, evaluation, lora, losses, memory, model_io, models, objectives, steps, trainer
from rlhf_jax.trainable import Trainable
from rlhf_jax.data import sources
from rlhf_jax.configs import OptimizerConfig
from rlhf_jax.data import BatchIterator, collate_pairs, encode, simulated
from rlhf_jax.logging import MetricsLogger
from rlhf_jax.train_state import make_optimizer, shardings_of


STAGE = "dpo"


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    model: cli.ModelArgs = cli.ModelArgs()
    """Policy to start from, also the frozen reference (default: <run.out>/sft/hf)."""
    data: cli.DataArgs = cli.DataArgs(num_train=6144, num_eval=1024, seed=1)
    """Comparisons (the same simulated comparisons the reward model is trained on, by default)."""
    run: cli.RunArgs = cli.RunArgs()
    optim: OptimizerConfig = OptimizerConfig(learning_rate=None, warmup_steps=20, total_steps=300, b2=0.99)
    sample: cli.SampleArgs = cli.SampleArgs()
    variant: str = "dpo"
    """One of losses.DPO_VARIANTS: dpo, cdpo, robust, ipo, simpo."""
    beta: float = 0.1
    """β of the implicit reward β·log(π/π_ref)."""
    label_smoothing: float = 0.0
    """Assumed label-flip rate (cdpo / robust)."""
    nll_coef: float = 0.0
    """α of RPO: adds α × the chosen responses' per-token NLL to the loss (0 = plain DPO)."""
    steps: int = 300
    batch_size: int = 32
    max_len: int | None = None
    """Tokens per sequence. None: auto (see rlhf_jax.defaults; embedded 96, pretrained the longest training
    pair rounded up to 16). optim.learning_rate and sample lengths are auto too (embedded 3e-5, 48, 48)."""
    eval_every: int = 150
    """Steps between held-out DPO losses (eval/dpo/*) on the held-out comparisons."""
    num_eval_prompts: int = 256
    """Held-out prompts the trained policy and the reference are sampled on at the end (0 = none)."""
    lora: lora.LoraConfig = lora.LoraConfig()
    """LoRA adapters on the policy (--lora.rank 8); the reference is then the base with the adapter off (no
    second copy of the weights). Exports hf/ (merged) and peft/."""
    reward_model: str | None = None
    """Reward model (from reward_model.py) that judges the held-out samples (default: <run.out>/rm/hf when it
    exists; without one the evaluation reports KL, length, EOS rate and samples)."""


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
    state = trainable.place(model_cfg, params, axes, optimizer, mesh, rules, frozen=None if reference_free else params,
                            frozen_axes=None if reference_free else axes, donate=True)
    del params
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
    state, last_eval = trainer.train_loop(stage=stage, run=cfg.run, state=state, step_fn=train_step, batches=batches,
                                           num_steps=cfg.steps, mesh=mesh, rules=rules, config=cfg, eval_fn=evaluate,
                                           eval_every=cfg.eval_every, print_keys=("optim/loss", "dpo/accuracy", "dpo/margin"),
                                           optim=optim_cfg)
    out = cli.stage_dir(cfg.run, stage)
    result = {**trainable.export(out, model_cfg, state, tokenizer, base_model=sft_path), **last_eval}
    if not cfg.num_eval_prompts:
        prompts = []
    elif cfg.data.path is None:  # the simulated held-out prompts PPO and best-of-n are evaluated on
        prompts = sources.prompt_texts(sources.rows_from(
            dataclasses.replace(cfg.data, seed=2, num_eval=cfg.num_eval_prompts), "prompt", "eval", simulated.prompt_rows))
    else:  # the prompts of the held-out comparisons (--data.eval-path or the held-out split of --data.path)
        prompts = sources.eval_prompts(eval_rows, cfg.num_eval_prompts)
    if cfg.num_eval_prompts and prompts:
        reference = (model_io.load_lm(dataclasses.replace(cfg.model, path=sft_path))[1] if reference_free
                     else trainable.reference(state))  # the state's own reference: no second copy
        rm_path = cfg.reward_model or pathlib.Path(cfg.run.out) / "rm" / "hf"
        reward = None
        if cfg.reward_model is not None or (rm_path / model_io.REWARD_HEAD_FILE).exists():
            reward = evaluation.load_reward_model(rm_path, cfg.model, tokenizer)
            print(f"[{stage}] held-out samples judged by the reward model {rm_path}", flush=True)
        ev = evaluation.evaluate_policy(model_cfg, trainable.lm(state), reference, tokenizer, prompts,
                                        seed=cfg.run.seed + 1000, sample_args=cfg.sample, reward=reward,
                                        gold=cfg.data.path is None, mesh=mesh, rules=rules)
        result.update(ev)
        with MetricsLogger(out, stage=stage) as logger:  # appended after the training loop's entries
            logger.log(cfg.steps, evaluation.scalars(ev), print_keys=evaluation.PRINT_KEYS)
            logger.text(cfg.steps, "eval_samples", evaluation.comparison_table(ev, policy=stage.upper(), reference="SFT"))
        with evaluation.open_samples_file(out / "samples.md", resume_from=0) as samples_md:
            samples_md.write(f"## step {cfg.steps} (held-out evaluation)\n\n"
                             f"{evaluation.comparison_table(ev, policy=stage.upper(), reference='SFT')}\n")
        print(f"[{stage}] {evaluation.summary(ev)}", flush=True)
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
