"""RLHF with PPO: maximise the reward model's score minus a per-token KL penalty to the SFT model.

Each iteration samples responses to a batch of prompts, scores them (reward model at the last
token, −β·KL at every token, GAE on a value head or a separate critic), and runs epochs ×
minibatches of clipped PPO updates inside one jitted step.

    python experiments/ppo.py                                 # after sft.py and reward_model.py
    python experiments/ppo.py --model.path runs/qwen/sft/hf --reward-model runs/qwen/rm/hf \
        --data.path prompts.jsonl --run.out runs/qwen --kl.adaptive --run.mesh.fsdp 8

Writes <run.out>/ppo/: metrics (TensorBoard + metrics.jsonl), samples.md, checkpoints, hf/, eval.json.
"""
# %%
from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from rlhf_jax import checkpoint, defaults, evaluation, kl, lora, memory, losses, models, rollout, sharding, steps, workflow
from rlhf_jax.configs import OptimizerConfig
from rlhf_jax.data import BatchIterator, collate_prompts, encode_prompts, simulated
from rlhf_jax.logging import MetricsLogger
from rlhf_jax.metrics import to_floats
from rlhf_jax.train_state import make_optimizer, shardings_of


STAGE = "ppo"


@dataclasses.dataclass(frozen=True)
class KLArgs:
    """The KL penalty between the policy and the reference (the SFT model)."""

    coef: float = 0.1
    """β: initial (adaptive) or fixed KL coefficient."""
    adaptive: bool = False
    """Adapt β towards ``target`` (Ziegler et al. 2019)."""
    target: float = 6.0
    """Target KL per sequence, nats (adaptive only)."""
    horizon: int = 10000
    """Adaptation horizon in episodes (adaptive only)."""
    estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token estimator in the reward penalty."""


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    model: workflow.ModelArgs = workflow.ModelArgs()
    """Policy to start from, also the frozen reference (default: <run.out>/sft/hf)."""
    reward_model: str | None = None
    """Reward model folder from reward_model.py (default: <run.out>/rm/hf)."""
    reference: str | None = None
    """Frozen reference of the KL penalty (default: the starting policy). Later rounds of an iterated
    pipeline start from the last policy and keep the SFT model here."""
    data: workflow.DataArgs = workflow.DataArgs(num_train=4096, num_eval=256, seed=2)
    """Prompts (any row kind with a prompt); simulated prompts by default."""
    run: workflow.RunArgs = workflow.RunArgs(save_every=10, log_every=1)
    optim: OptimizerConfig = OptimizerConfig(learning_rate=None, warmup_steps=0, total_steps=10_000, b2=0.99)
    sample: workflow.SampleArgs = workflow.SampleArgs(batch_size=None)
    lora: lora.LoraConfig = lora.LoraConfig()
    """LoRA adapters on the policy (--lora.rank 8); the value head trains beside them and the reference is the
    base with the adapter off (no second copy). Exports hf/ (merged) and peft/."""
    kl: KLArgs = KLArgs()
    iterations: int = 40
    """PPO iterations (rollout + update)."""
    rollout_prompts: int | None = None
    """Prompts sampled per iteration. None: auto (see rlhf_jax.defaults; embedded 64, pretrained
    min(64, the training prompts)). optim.learning_rate, sample.batch_size and the sample lengths are auto
    too (embedded 3e-5, 64, 32, 48)."""
    epochs: int = 4
    """Passes over each rollout batch."""
    num_minibatches: int = 4
    """Minibatches per epoch (one optimizer step each)."""
    clip_eps: float = 0.2
    """PPO ratio clip ε."""
    vf_coef: float = 0.1
    """Value-loss weight."""
    value_clip: float = 0.2
    """Value clip range."""
    entropy_coef: float = 0.0
    """Entropy bonus."""
    gamma: float = 1.0
    lam: float = 0.95
    missing_eos_penalty: float | None = -1.0
    """Score given to responses that hit the length limit without EOS (None: keep the RM score)."""
    advantage: Literal["gae", "rloo", "grpo"] = "gae"
    """GAE on the critic, or a critic-free group baseline over ``samples_per_prompt`` samples (RLOO, GRPO)."""
    samples_per_prompt: int = 4
    """Responses per prompt for rloo / grpo (the rollout then has rollout_prompts × this rows)."""
    critic: Literal["value_head", "separate"] = "value_head"
    """Value head on the policy's backbone, or a separate critic initialised from the reward model."""
    eval_every: int = 20
    """Iterations between held-out evaluations (rlhf_jax.evaluation: reward-model score, KL, length and
    EOS rate of policy and reference samples, win rates; 0 = none). Prompts: --data.eval-path, the
    held-out split of --data.path (--data.eval-fraction), or the simulated held-out prompts."""
    num_eval_prompts: int = 256
    """Held-out prompts per evaluation (at most)."""
    samples_every: int = 10
    """Iterations between sample tables in samples.md / TensorBoard."""


def main(cfg: PPOConfig) -> dict:
    with memory.PeakRSS() as peak:
        result, out, stage = _main(cfg)
    return workflow.record_peak_memory(stage, peak, result, out)


def _main(cfg: PPOConfig):
    mesh, rules = workflow.setup(cfg.run)
    run_dir = pathlib.Path(cfg.run.out)
    policy_path = cfg.model.path or str(run_dir / "sft" / "hf")
    model_cfg, sft_params, tokenizer = workflow.load_lm(dataclasses.replace(cfg.model, path=policy_path))
    train_rows = workflow.rows_from(cfg.data, "prompt", "train", simulated.prompt_rows)
    eval_rows = workflow.rows_from(cfg.data, "prompt", "eval", simulated.prompt_rows)[:cfg.num_eval_prompts]
    cfg = resolve_config(cfg, model_cfg, tokenizer, train_rows, eval_rows)
    reward_cfg, rm_params, _ = workflow.load_reward_model(cfg.reward_model or run_dir / "rm" / "hf", cfg.model)
    ref_params = sft_params
    if cfg.reference is not None:
        ref_cfg, ref_params, _ = workflow.load_lm(dataclasses.replace(cfg.model, path=cfg.reference))
        if ref_cfg != model_cfg:
            raise ValueError(f"--reference {cfg.reference} is not the policy's architecture:\n{ref_cfg}\nvs\n{model_cfg}")
    axes = models.param_logical_axes(model_cfg)
    head_axes = models.scalar_head_logical_axes()
    if cfg.critic == "value_head":
        params = {"policy": sft_params, "value_head": models.init_scalar_head(model_cfg, jax.random.key(1))}
        param_axes = {"policy": axes, "value_head": head_axes}
        critic_cfg = None
    else:
        params = {"policy": sft_params, "critic": rm_params}
        param_axes = {"policy": axes, "critic": {"backbone": models.param_logical_axes(reward_cfg), "head": head_axes}}
        critic_cfg = reward_cfg
    frozen = {"reference": ref_params, "reward": rm_params}
    frozen_axes = {"reference": axes, "reward": {"backbone": models.param_logical_axes(reward_cfg), "head": head_axes}}
    optim_cfg = cfg.optim
    optimizer = make_optimizer(optim_cfg)
    # with LoRA the reference is the frozen base (adapter off) unless --reference names another model
    trainable = workflow.Trainable.create(cfg.lora, model_cfg, lm_path=("policy",),
                                          reference_path=("reference",) if cfg.reference is None else None)
    state = trainable.place(model_cfg, params, param_axes, optimizer, mesh, rules, frozen=frozen, frozen_axes=frozen_axes,
                            donate=True)
    del params, frozen, sft_params, ref_params, rm_params
    memory.release_freed_host_memory()  # the host copies placed on the devices
    state_sh = shardings_of(state)

    policy_loss = functools.partial(losses.ppo_policy_loss, clip_eps=cfg.clip_eps, entropy_coef=cfg.entropy_coef)
    value_loss = functools.partial(losses.value_loss, clip_range=cfg.value_clip)
    grouped = cfg.advantage != "gae"
    num_samples = cfg.samples_per_prompt if grouped else 1
    score_options = (dict(num_samples=num_samples) if grouped else dict(gamma=cfg.gamma, lam=cfg.lam))
    score_step = steps.make_ppo_score_step(model_cfg, reward_cfg, state_sh, mesh, rules, critic_cfg=critic_cfg,
                                           view=trainable.view,
                                           advantage_estimator=cfg.advantage, kl_estimator=cfg.kl.estimator,
                                           missing_eos_penalty=cfg.missing_eos_penalty, **score_options)
    ppo_step = steps.make_ppo_step(model_cfg, optimizer, state_sh, mesh, rules, epochs=cfg.epochs,
                                   num_minibatches=cfg.num_minibatches, critic_cfg=critic_cfg, view=trainable.view,
                                   policy_loss_fn=policy_loss, value_loss_fn=value_loss,
                                   vf_coef=0.0 if grouped else cfg.vf_coef)
    generate = functools.partial(rollout.generate, model_cfg, max_new_tokens=cfg.sample.max_new_tokens,
                                 temperature=cfg.sample.temperature, top_k=cfg.sample.top_k, top_p=cfg.sample.top_p,
                                 eos_ids=workflow.eos_ids(model_cfg, tokenizer), pad_id=tokenizer.pad_token_id,
                                 num_samples=num_samples)

    eval_prompts = workflow.prompt_texts(eval_rows)
    if cfg.eval_every and not eval_prompts:
        print("[ppo] no held-out prompts (pass --data.eval-path or a --data.eval-fraction > 0): no evaluation",
              flush=True)
    encoded = workflow.encode_rows(cfg.data, train_rows, tokenizer, max_len=cfg.sample.max_prompt_len,
                                   what="training prompts", prompts_only=True, flag="--sample.max-prompt-len")
    train_rows = workflow.kept_rows(train_rows, encoded)  # --data.truncate drop may have skipped some

    def collate(indices):  # a left-padded PromptBatch and the prompt texts (for the gold scorer and logs)
        batch = collate_prompts([None if i is None else encoded[i] for i in indices], pad_id=tokenizer.pad_token_id,
                                length=cfg.sample.max_prompt_len)
        return batch, [train_rows[i].prompt for i in indices]

    prompts_it = BatchIterator(range(len(encoded)), collate, batch_size=cfg.rollout_prompts, seed=cfg.run.seed)

    kl_ctl = (kl.AdaptiveKLController.create(cfg.kl.coef, target=cfg.kl.target, horizon=cfg.kl.horizon)
              if cfg.kl.adaptive else kl.FixedKLController.create(cfg.kl.coef))
    out = workflow.stage_dir(cfg.run, "ppo")
    manager = workflow.open_checkpoints(out, cfg.run)
    start = 0
    if cfg.run.resume and manager.latest_step() is not None:
        restored = checkpoint.restore(manager, workflow.abstract_of(state), frozen=state.frozen)
        state, start = restored.state, restored.step
        prompts_it.set_state(restored.data_state["prompts"])
        kl_ctl = kl_ctl.replace(value=jnp.asarray(restored.data_state["kl_coef"], jnp.float32))
        print(f"[ppo] resumed from iteration {start}", flush=True)

    def reference(state):  # --reference's model, or the SFT model (with LoRA: the base, adapter off)
        return state.frozen["reference"] if "reference" in state.frozen else trainable.reference(state)

    def evaluate(state) -> dict:
        if not eval_prompts:
            return {}
        return evaluation.evaluate_policy(
            model_cfg, trainable.lm(state), reference(state), tokenizer, eval_prompts,
            seed=cfg.run.seed + 1000, sample_args=cfg.sample, gold=cfg.data.path is None, mesh=mesh, rules=rules,
            reward=evaluation.RewardModel(reward_cfg, state.frozen["reward"]))

    key = jax.random.key(cfg.run.seed)
    last_eval: dict = {}
    updates_per_iteration = cfg.epochs * cfg.num_minibatches
    with MetricsLogger(out, stage="ppo", resume_from=start) as logger, \
            evaluation.open_samples_file(out / "samples.md", resume_from=start) as samples_md:
        for it in range(start + 1, cfg.iterations + 1):
            t0 = time.perf_counter()
            it_key = jax.random.fold_in(key, it)
            prompts, texts = next(prompts_it)
            ids, mask = sharding.shard_batch((prompts.prompt_ids_BP, prompts.prompt_mask_BP), mesh, rules)
            r = jax.block_until_ready(generate(trainable.lm(state), ids, mask, key=jax.random.fold_in(it_key, 0)))
            t_gen = time.perf_counter() - t0  # after block_until_ready: generation done, not just dispatched
            batch, score_metrics = score_step(state, r, kl_ctl.value)
            state, train_metrics = ppo_step(state, batch, jax.random.fold_in(it_key, 1))
            values = to_floats({**score_metrics, **train_metrics})  # waits for the step's results
            new_tokens = float(np.asarray(r.lengths_B).sum())
            kl_ctl = kl_ctl.update(values["rollout/kl"], cfg.rollout_prompts * num_samples)
            values.update({"kl/coef": float(kl_ctl.value), "perf/gen_tokens_per_s": new_tokens / t_gen,
                           "optim/lr": workflow.learning_rate(optim_cfg, it * updates_per_iteration),
                           "perf/iteration_s": time.perf_counter() - t0})
            responses = workflow.decode_responses(tokenizer, r)
            texts = [t for t in texts for _ in range(num_samples)]  # rows are prompts x samples
            if cfg.data.path is None:
                values["rollout/gold"] = float(np.mean(workflow.gold_eval(texts, responses)))
            logger.log(it, values, print_keys=("rollout/score", "rollout/gold", "rollout/kl", "ppo/clipfrac",
                                               "vf/explained_variance", "rollout/response_length", "kl/coef"))
            if cfg.samples_every and (it % cfg.samples_every == 0 or it == 1):
                table = evaluation.samples_table([{"prompt": p, "response": s} for p, s in zip(texts[:4], responses[:4])],
                                                 [("prompt", "prompt"), ("response", "response")])
                samples_md.write(f"\n## iteration {it} (rollout)\n\n{table}\n")
                samples_md.flush()
                logger.text(it, "samples", table)
            if cfg.eval_every and (it % cfg.eval_every == 0 or it == cfg.iterations):
                last_eval = evaluate(state)
                if last_eval:
                    logger.log(it, evaluation.scalars(last_eval), print_keys=evaluation.PRINT_KEYS)
                    table = evaluation.comparison_table(last_eval, policy="PPO", reference="reference")
                    samples_md.write(f"\n## iteration {it} (held-out evaluation)\n\n{table}\n")
                    samples_md.flush()
                    logger.text(it, "eval_samples", table)
            if it % cfg.run.save_every == 0 or it == cfg.iterations:
                checkpoint.save(manager, it, state, rng=key, config=workflow._jsonable(cfg), force=True,
                                data_state={"prompts": prompts_it.get_state(), "kl_coef": float(kl_ctl.value)})
    manager.wait_until_finished()
    manager.close()
    result = {**trainable.export(out, model_cfg, state, tokenizer, base_model=policy_path), **last_eval}
    workflow.write_json(out / "eval.json", result)  # written last: its presence marks the stage as finished
    return result, out, "ppo"


def resolve_config(cfg: PPOConfig, model_cfg, tokenizer, train_rows, eval_rows=()) -> PPOConfig:
    """``cfg`` with its auto fields filled for this model and data (rlhf_jax.defaults); the prompt
    length fits the training and the held-out prompts."""
    kind = defaults.model_kind(model_cfg)
    facts = {}
    if kind == "pretrained" and (defaults.unresolved(cfg, STAGE)):
        facts = defaults.data_facts(prompts=encode_prompts(list(train_rows) + list(eval_rows), tokenizer, max_len=model_cfg.max_position_embeddings), model_cfg=model_cfg, num_prompts=len(train_rows))
    given = cfg.rollout_prompts
    cfg = defaults.resolve(cfg, STAGE, kind=kind, facts=facts)
    if cfg.rollout_prompts > len(train_rows):
        raise ValueError(f"--rollout-prompts {cfg.rollout_prompts}{'' if given else ' (auto)'} is more than the "
                         f"{len(train_rows)} training prompts{' of ' + cfg.data.path if cfg.data.path else ''}: "
                         f"pass --rollout-prompts {len(train_rows)} or fewer")
    return cfg


# %%
if __name__ == "__main__":
    main(tyro.cli(PPOConfig))
