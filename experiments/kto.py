"""KTO (Ethayarajh et al. 2024): align the policy on unpaired thumbs up / thumbs down, no reward model.

    python experiments/kto.py                                   # after sft.py; the simulated annotator's thumbs
    python experiments/kto.py --beta 0.1 --desirable-weight 1.0 --undesirable-weight 1.33
    python experiments/kto.py --model.path runs/qwen/sft/hf --data.path thumbs.jsonl --run.out runs/qwen

Rows are ``{"prompt", "completion", "label"}`` (label true = thumbs up). The KL reference point z_0 is
estimated in each batch from mismatched pairs (each prompt with the previous row's completion,
``rlhf_jax.objectives.mismatched_pairs``), so --batch-size must be at least 2.

Writes <run.out>/kto/: metrics, checkpoints, hf/, eval.json and samples.md (the held-out evaluation of
rlhf_jax.evaluation: KL to the SFT reference, length, EOS rate, reward-model score and win rate with
--reward-model, gold score with the simulated annotator).
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
from rlhf_jax.data import BatchIterator, collate_binary, encode, simulated
from rlhf_jax.train_state import make_optimizer, shardings_of


STAGE = "kto"
DEFAULTS_STAGE = "dpo"
"""KTO takes the DPO stage's auto values (learning rate, lengths): the same kind of update on the same policy."""


@dataclasses.dataclass(frozen=True)
class KTOConfig(cli.OfflinePolicyArgs):
    """KTO flags; the policy, data, run and evaluation flags are cli.OfflinePolicyArgs' (data: thumbs up / down
    rows, by default the simulated annotator's thumbs on demonstration-like responses)."""

    beta: float = 0.1
    """β of the implicit reward β·log(π/π_ref)."""
    desirable_weight: float = 1.0
    """λ_D, the weight of thumbs-up rows. The paper advises λ_D·n_D / (λ_U·n_U) in [1, 4/3] (printed at start)."""
    undesirable_weight: float = 1.0
    """λ_U, the weight of thumbs-down rows."""

    def __post_init__(self):
        if self.batch_size < 2:
            raise ValueError(f"--batch-size must be >= 2 (z_0 pairs each prompt with another row's completion), "
                             f"got {self.batch_size}")


def main(cfg: KTOConfig) -> dict:
    with memory.PeakRSS() as peak:
        result, out = _main(cfg)
    return trainer.record_peak_memory(STAGE, peak, result, out)


def _main(cfg: KTOConfig):
    mesh, rules = cli.setup(cfg.run)
    sft_path = cfg.model.path or str(pathlib.Path(cfg.run.out) / "sft" / "hf")
    model_cfg, params, tokenizer = model_io.load_lm(dataclasses.replace(cfg.model, path=sft_path))
    train_rows = sources.rows_from(cfg.data, "binary", "train", simulated.binary_rows)
    eval_rows = sources.rows_from(cfg.data, "binary", "eval", simulated.binary_rows)
    cfg = resolve_config(cfg, model_cfg, tokenizer, train_rows + eval_rows)  # held-out rows must fit too
    up = sum(r.label for r in train_rows)
    down = len(train_rows) - up
    ratio = cfg.desirable_weight * up / (cfg.undesirable_weight * down) if down else float("inf")
    print(f"[kto] desirable {up}, undesirable {down} training rows; λ_D·n_D / (λ_U·n_U) = {ratio:.2f} (the paper "
          f"advises 1 to 4/3: set --desirable-weight / --undesirable-weight)", flush=True)

    axes = models.param_logical_axes(model_cfg)
    optim_cfg = cli.optimizer_for(cfg.optim, cfg.steps)
    optimizer = make_optimizer(optim_cfg)
    trainable = Trainable.create(cfg.lora, model_cfg, reference_path=())
    state = trainable.place(model_cfg, params, axes, optimizer, mesh, rules, frozen=params, frozen_axes=axes, donate=True)
    del params
    memory.release_freed_host_memory()  # the host copies placed on the devices
    state_sh = shardings_of(state)
    loss_fn = functools.partial(losses.kto_loss, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                                undesirable_weight=cfg.undesirable_weight)
    objective = functools.partial(objectives.kto_objective, model_cfg=model_cfg, loss_fn=loss_fn)
    train_step = steps.make_train_step(objective, optimizer, state_sh, mesh, rules, view=trainable.view)
    eval_step = steps.make_eval_step(objective, state_sh, mesh, rules, view=trainable.view)

    collate = functools.partial(collate_binary, pad_id=tokenizer.pad_token_id, length=cfg.max_len)
    batches = BatchIterator(sources.encode_rows(cfg.data, train_rows, tokenizer, max_len=cfg.max_len, what="training rows"),
                            collate, batch_size=cfg.batch_size, seed=cfg.run.seed)
    evaluate = trainer.held_out_eval(eval_step, eval_rows, tokenizer, collate, max_len=cfg.max_len, data=cfg.data,
                                     batch_size=cfg.batch_size, mesh=mesh, rules=rules)

    state, last_eval = trainer.train_loop(stage=STAGE, run=cfg.run, state=state, step_fn=train_step, batches=batches,
                                          num_steps=cfg.steps, mesh=mesh, rules=rules, config=cfg, eval_fn=evaluate,
                                          eval_every=cfg.eval_every,
                                          print_keys=("optim/loss", "kto/chosen_reward", "kto/rejected_reward", "kto/kl"),
                                          optim=optim_cfg)
    out = cli.stage_dir(cfg.run, STAGE)
    result = {**trainable.export(out, model_cfg, state, tokenizer, base_model=sft_path), **last_eval}
    prompts = sources.held_out_policy_prompts(cfg.data, eval_rows, cfg.num_eval_prompts, simulated.prompt_rows)
    if prompts:
        result.update(evaluation.evaluate_trained_policy(
            stage=STAGE, name="KTO", out=out, step=cfg.steps, model_cfg=model_cfg, policy=trainable.lm(state),
            reference=trainable.reference(state), tokenizer=tokenizer, prompts=prompts, run_out=cfg.run.out,
            model_args=cfg.model, reward_model=cfg.reward_model, sample_args=cfg.sample,
            gold=cfg.gold if cfg.gold is not None else cfg.data.path is None,
            seed=cfg.run.seed + 1000, mesh=mesh, rules=rules))
    elif cfg.num_eval_prompts:
        print("[kto] no held-out prompts (pass --data.eval-path or a --data.eval-fraction > 0): no evaluation", flush=True)
    trainer.write_json(out / "eval.json", result)
    return result, out


def resolve_config(cfg: KTOConfig, model_cfg, tokenizer, train_rows) -> KTOConfig:
    """``cfg`` with its auto fields filled for this model and data (rlhf_jax.defaults, DPO's table)."""
    kind = defaults.model_kind(model_cfg)
    facts = {}
    if kind == "pretrained" and defaults.unresolved(cfg, DEFAULTS_STAGE):
        facts = defaults.data_facts(encode(train_rows, tokenizer, max_len=model_cfg.max_position_embeddings), model_cfg=model_cfg)
    return defaults.resolve(cfg, DEFAULTS_STAGE, kind=kind, facts=facts,
                            printer=lambda line: print(line.replace(f"[{DEFAULTS_STAGE}]", f"[{STAGE}]", 1), flush=True))


# %%
if __name__ == "__main__":
    main(tyro.cli(KTOConfig))
