"""Direct preference optimisation (and IPO / cDPO / robust DPO / SimPO): no explicit reward model.

    python experiments/dpo.py                                   # after sft.py; simulated comparisons
    python experiments/dpo.py --variant ipo --beta 0.5
    python experiments/dpo.py --model.path runs/qwen/sft/hf --data.path ultrafeedback.parquet --data.layout trl

Writes <run.out>/dpo/ (or dpo_<variant>/): metrics, checkpoints, hf/, eval.json.
"""
# %%
from __future__ import annotations

import dataclasses
import functools
import pathlib

import tyro

from rlhf_jax import losses, models, steps, workflow
from rlhf_jax.configs import OptimizerConfig
from rlhf_jax.data import BatchIterator, collate_pairs, encode, simulated
from rlhf_jax.train_state import make_optimizer, place_train_state, shardings_of


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    model: workflow.ModelArgs = workflow.ModelArgs()
    """Policy to start from, also the frozen reference (default: <run.out>/sft/hf)."""
    data: workflow.DataArgs = workflow.DataArgs(num_train=6144, num_eval=1024, seed=1)
    """Comparisons (the same simulated comparisons the reward model is trained on, by default)."""
    run: workflow.RunArgs = workflow.RunArgs()
    optim: OptimizerConfig = OptimizerConfig(learning_rate=3e-5, warmup_steps=20, total_steps=300, b2=0.99)
    sample: workflow.SampleArgs = workflow.SampleArgs()
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
    max_len: int = 80
    eval_every: int = 150
    num_eval_prompts: int = 256


def main(cfg: DPOConfig) -> dict:
    mesh, rules = workflow.setup(cfg.run)
    sft_path = cfg.model.path or str(pathlib.Path(cfg.run.out) / "sft" / "hf")
    model_cfg, params, tokenizer = workflow.load_lm(dataclasses.replace(cfg.model, path=sft_path))
    axes = models.param_logical_axes(model_cfg)
    reference_free = cfg.variant == "simpo"
    optimizer = make_optimizer(workflow.optimizer_for(cfg.optim, cfg.steps))
    state = place_train_state(params, optimizer, mesh, rules, axes, frozen=None if reference_free else params,
                              frozen_axes=None if reference_free else axes)
    del params
    state_sh = shardings_of(state)
    if cfg.variant not in losses.DPO_VARIANTS:
        raise ValueError(f"--variant {cfg.variant!r} is not one of {sorted(losses.DPO_VARIANTS)}")
    loss_fn = functools.partial(losses.dpo_loss, variant=cfg.variant, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                                nll_coef=cfg.nll_coef)
    train_step = steps.make_dpo_step(model_cfg, optimizer, state_sh, mesh, rules, loss_fn=loss_fn)
    eval_step = steps.make_eval_step(functools.partial(steps.dpo_objective, model_cfg=model_cfg, loss_fn=loss_fn),
                                     state_sh, mesh, rules)

    train_rows = workflow.rows_from(cfg.data, "pairwise", "train", simulated.pairwise_rows)
    eval_rows = workflow.rows_from(cfg.data, "pairwise", "eval", simulated.pairwise_rows)
    collate = functools.partial(collate_pairs, pad_id=tokenizer.pad_token_id, length=cfg.max_len)
    batches = BatchIterator(encode(train_rows, tokenizer, max_len=cfg.max_len), collate, batch_size=cfg.batch_size,
                            seed=cfg.run.seed)

    evaluate = workflow.held_out_eval(eval_step, eval_rows, tokenizer, collate, max_len=cfg.max_len,
                                      batch_size=cfg.batch_size, mesh=mesh, rules=rules)

    stage = "dpo" if cfg.variant == "dpo" else f"dpo_{cfg.variant}"
    state, last_eval = workflow.train_loop(stage=stage, run=cfg.run, state=state, step_fn=train_step, batches=batches,
                                           num_steps=cfg.steps, mesh=mesh, rules=rules, config=cfg, eval_fn=evaluate,
                                           eval_every=cfg.eval_every, print_keys=("optim/loss", "dpo/accuracy", "dpo/margin"))
    out = workflow.stage_dir(cfg.run, stage)
    workflow.export_lm(out / "hf", model_cfg, state.params, tokenizer)
    result = {"hf": str(out / "hf"), **last_eval}
    if cfg.data.path is None and cfg.num_eval_prompts:
        _, reference, _ = workflow.load_lm(dataclasses.replace(cfg.model, path=sft_path))
        prompts = workflow.prompt_texts(workflow.rows_from(
            dataclasses.replace(cfg.data, seed=2, num_eval=cfg.num_eval_prompts), "prompt", "eval", simulated.prompt_rows))
        ev = workflow.evaluate_policy(model_cfg, state.params, reference, tokenizer, prompts, seed=cfg.run.seed + 1000,
                                      sample_args=cfg.sample, mesh=mesh, rules=rules)
        result.update(ev)
        print(f"[{stage}] gold {ev['gold']:.3f} (SFT {ev['ref_gold']:.3f}), win rate {ev['win_rate']:.3f}, "
              f"KL {ev['kl']:.2f}", flush=True)
    workflow.write_json(out / "eval.json", result)
    return result


# %%
if __name__ == "__main__":
    main(tyro.cli(DPOConfig))
