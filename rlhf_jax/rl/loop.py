"""The online RL loop, shared by PPO, the GRPO family and online DPO.

One iteration is

    draw prompts → sample responses → score (reward model and/or reward functions) → advantages / pairs → update

with held-out evaluation, TensorBoard + metrics.jsonl logging, sample tables, checkpoints and exact
resume (state, prompt iterator position, KL coefficient). What differs between methods sits in a
*learner* (:class:`Learner`): how a rollout becomes a training batch (:meth:`Learner.experience`)
and how the state learns from it (:meth:`Learner.update`). :class:`PolicyGradient` is the learner of
every :class:`~rlhf_jax.rl.algorithms.Algorithm`; :class:`rlhf_jax.rl.online_dpo.OnlineDPO` judges
pairs of samples and takes DPO steps.

:func:`run` is the loop; :func:`setup` loads the models, data and state every online method needs.
"""
from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import advantages, checkpoint, defaults, ensemble, evaluation, kl, lora, memory, model_io, models
from rlhf_jax import registry, rewards, rollout, sampling, sharding, trainer
from rlhf_jax.cli import DataArgs, ModelArgs, RunArgs, SampleArgs, setup as setup_run, stage_dir
from rlhf_jax.configs import OptimizerConfig
from rlhf_jax.data import BatchIterator, collate_prompts, encode_prompts, simulated, sources
from rlhf_jax.logging import MetricsLogger
from rlhf_jax.metrics import Metric, to_floats
from rlhf_jax.trainable import Trainable
from rlhf_jax.train_state import TrainState


@dataclasses.dataclass(frozen=True)
class KLArgs:
    """The KL coefficient's controller (the coefficient itself is the algorithm's ``kl_coef``)."""

    adaptive: bool = False
    """Adapt β towards ``target`` (Ziegler et al. 2019); KL in the reward only."""
    target: float = 6.0
    """Target KL per sequence, nats (adaptive only)."""
    horizon: int = 10000
    """Adaptation horizon in episodes (adaptive only)."""


@dataclasses.dataclass(frozen=True)
class OnlineArgs:
    """What every online method shares: models, prompts, rewards, sampling, iterations, evaluation."""

    model: ModelArgs = ModelArgs()
    """Policy to start from, also the frozen reference (default: <run.out>/sft/hf)."""
    reward_model: str | None = None
    """Reward model folder from reward_model.py (default: <run.out>/rm/hf; not loaded when its weight is 0)."""
    reward: tuple[str, ...] = ()
    """Reward functions ``module:function[=weight]`` or ``path/file.py:function[=weight]`` (rlhf_jax.rewards),
    added to the reward model's score; e.g. ``rlhf_jax.rewards:gold`` (the simulated gold scorer: an oracle run)."""
    reward_model_weight: float | None = None
    """Weight of the reward model's score. None: 1 without --reward, 0 (not loaded) with it."""
    reward_ensemble: tuple[str, ...] = ()
    """Reward model folders of an ensemble instead of --reward-model (Coste et al. 2023: reward_model.py runs with
    different --run.seed, each normalised on SFT samples); their scores combine by --ensemble-rule (rlhf_jax.ensemble),
    and rollout/rm_ensemble_mean, rollout/rm_ensemble_std and rollout/rm_member<k> are logged."""
    ensemble_rule: str = "mean"
    """How --reward-ensemble's scores combine (rlhf_jax.registry.ENSEMBLE_RULES): mean, worst (min over members) or
    uwo (mean − λ · variance over members)."""
    ensemble_uwo_lambda: float = 0.1
    """λ of --ensemble-rule uwo (0.1: the value in Coste et al.'s PPO config)."""
    reference: str | None = None
    """Frozen reference of the KL (default: the starting policy). Later rounds of an iterated pipeline start
    from the last policy and keep the SFT model here."""
    data: DataArgs = DataArgs(num_train=4096, num_eval=256, seed=2)
    """Prompts (any row kind with a prompt); simulated prompts by default."""
    run: RunArgs = RunArgs(save_every=10, log_every=1)
    optim: OptimizerConfig = OptimizerConfig(learning_rate=None, warmup_steps=0, total_steps=10_000, b2=0.99)
    sample: SampleArgs = SampleArgs(batch_size=None)
    lora: lora.LoraConfig = lora.LoraConfig()
    """LoRA adapters on the policy (--lora.rank 8); the reference is the base with the adapter off. Exports
    hf/ (merged) and peft/."""
    kl: KLArgs = KLArgs()
    iterations: int = 40
    """Iterations (rollout + update)."""
    rollout_prompts: int | None = None
    """Prompts sampled per iteration. None: auto (embedded 64 responses per iteration, i.e. 64 / samples per
    prompt; pretrained min(64, the training prompts) / samples per prompt)."""
    epochs: int = 4
    """Passes over each rollout batch."""
    num_minibatches: int = 4
    """Minibatches per epoch (one optimizer step each)."""
    missing_eos_penalty: float | None = -1.0
    """Score given to responses that hit the length limit without EOS (None: keep their score)."""
    eval_every: int = 20
    """Iterations between held-out evaluations (rlhf_jax.evaluation; 0 = none). Prompts: --data.eval-path,
    the held-out split of --data.path (--data.eval-fraction), or the simulated held-out prompts."""
    num_eval_prompts: int = 256
    """Held-out prompts per evaluation (at most)."""
    samples_every: int = 10
    """Iterations between sample tables in samples.md / TensorBoard."""


# --- One sampled batch ------------------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    """One generate call's rollout with its prompts, decoded responses and reward-function scores."""

    rollout: rollout.Rollout
    prompts: list
    """The prompt of every row (prompts × samples, adjacent)."""
    responses: list[str]
    function_scores_B: np.ndarray
    """Σ_i w_i f_i per row (zeros without reward functions)."""
    function_means: dict[str, float]
    seconds: float
    """Generation time (after block_until_ready)."""


Draw = Callable[[jax.Array], Sample]
"""``draw(key)``: the next prompts of the iterator, sampled from the current policy and decoded."""


class Learner(Protocol):
    """What a method does with samples. ``num_samples``: responses per prompt."""

    num_samples: int

    def experience(self, state: TrainState, draw: Draw, key: jax.Array, kl_coef: jax.Array
                   ) -> tuple[Any, dict[str, Any], Sample]:
        """``(batch, metrics, first sample)``: draw once (or more: DAPO's dynamic sampling) and score."""
        ...

    def update(self, state: TrainState, batch: Any, key: jax.Array) -> tuple[TrainState, dict[str, Any]]:
        ...


# --- The policy-gradient learner (PPO, GRPO family, RLOO, REINFORCE++) ---------------------------------


def _take_rows(batches: Sequence[Any], rows: np.ndarray) -> Any:
    """Rows ``rows`` of the row-wise concatenation of same-shaped batches."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0)[rows], *batches)


@dataclasses.dataclass
class PolicyGradient:
    """The learner of every :class:`~rlhf_jax.rl.algorithms.Algorithm`: score with ``score_step``
    (:func:`rlhf_jax.rl.steps.make_score_step`), update with ``update_step``
    (:func:`rlhf_jax.rl.steps.make_update_step`). With ``algo.dynamic_sampling`` it keeps drawing (up
    to ``max_draws`` generate calls) until the batch holds only groups whose scores differ; rows it
    could not fill train nothing (mask 0) and ``rollout/filled_groups`` says how many were real."""

    algo: Any
    score_step: Callable
    update_step: Callable
    mesh: Any
    rules: Any
    max_draws: int = 3

    @property
    def num_samples(self) -> int:
        return self.algo.samples_per_prompt

    def _score(self, state, sample: Sample, kl_coef):
        function_scores_B, = sharding.shard_batch((sample.function_scores_B,), self.mesh, self.rules)
        return self.score_step(state, sample.rollout, kl_coef, function_scores_B)

    def experience(self, state, draw: Draw, key, kl_coef):
        first = draw(jax.random.fold_in(key, 0))
        batch, metrics = self._score(state, first, kl_coef)
        if not self.algo.dynamic_sampling:
            return batch, metrics, first
        N = self.num_samples
        groups = first.rollout.sequences_BT.shape[0] // N
        kept_batches, kept_rows, draws = [], [], 0
        while True:
            keep_G = np.asarray(advantages.groups_with_signal(np.asarray(batch.scores_B).reshape(-1, N)))
            kept_batches.append(batch)
            offset = (len(kept_batches) - 1) * groups * N
            kept_rows += [offset + g * N + i for g in np.flatnonzero(keep_G) for i in range(N)]
            draws += 1
            if len(kept_rows) >= groups * N or draws >= self.max_draws:
                break
            batch, _ = self._score(state, draw(jax.random.fold_in(key, draws)), kl_coef)
        real = min(len(kept_rows), groups * N)
        rows = np.array(kept_rows[:real] + [0] * (groups * N - real))  # unfilled: any row, masked out below
        row_mask = (np.arange(groups * N) < real).astype(np.float32)
        merged = _take_rows(kept_batches, rows)
        merged = merged.replace(response_mask_BT=merged.response_mask_BT * row_mask[:, None],
                                advantages_BT=merged.advantages_BT * row_mask[:, None])
        merged = sharding.shard_batch(jax.device_get(merged), self.mesh, self.rules)
        metrics = {**metrics, "rollout/filled_groups": Metric.scalar(real / N),
                   "rollout/draws": Metric.scalar(draws)}
        return merged, metrics, first

    def update(self, state, batch, key):
        return self.update_step(state, batch, key)


# --- The loop ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    """Everything :func:`setup` loads for an online method."""

    cfg: Any
    """The script's config with auto fields resolved."""
    mesh: Any
    rules: Any
    model_cfg: models.ModelConfig
    reward_cfg: models.ModelConfig | None
    tokenizer: Any
    trainable: Trainable
    train_rows: list
    eval_prompts: list
    encoded: list
    rewards: list
    rm_weight: float
    policy_path: str
    out: pathlib.Path


def resolve_config(cfg: Any, stage: str, model_cfg, tokenizer, train_rows, eval_rows=(), *, num_samples: int = 1) -> Any:
    """``cfg`` with its auto fields filled for this model and data (:mod:`rlhf_jax.defaults`); the prompt length
    fits the training and held-out prompts; auto ``rollout_prompts`` keep 64 responses per iteration."""
    kind = defaults.model_kind(model_cfg)
    facts = {}
    if kind == "pretrained" and defaults.unresolved(cfg, "ppo"):
        facts = defaults.data_facts(prompts=encode_prompts(list(train_rows) + list(eval_rows), tokenizer,
                                                           max_len=model_cfg.max_position_embeddings),
                                    model_cfg=model_cfg, num_prompts=len(train_rows))
    given = cfg.rollout_prompts
    cfg = defaults.resolve(cfg, "ppo", kind=kind, facts=facts,  # every online method takes PPO's table
                           printer=lambda line: print(line.replace("[ppo]", f"[{stage}]", 1), flush=True))
    if given is None and num_samples > 1:
        cfg = dataclasses.replace(cfg, rollout_prompts=max(1, cfg.rollout_prompts // num_samples))
        print(f"[{stage}] {cfg.rollout_prompts} prompts x {num_samples} samples per iteration (auto)", flush=True)
    if cfg.rollout_prompts > len(train_rows):
        raise ValueError(f"--rollout-prompts {cfg.rollout_prompts}{'' if given else ' (auto)'} is more than the "
                         f"{len(train_rows)} training prompts{' of ' + cfg.data.path if cfg.data.path else ''}: "
                         f"pass --rollout-prompts {len(train_rows)} or fewer")
    return cfg


def setup(cfg: Any, stage: str, *, num_samples: int, lm_path: tuple[str, ...] = ("policy",),
          reference_path: tuple[str, ...] | None = ("reference",)) -> tuple[Context, dict, dict]:
    """Load the policy, reference and (when its weight is not 0) reward model, the prompts and the reward
    functions. Returns the context and the host trees ``{"policy", "reference", "reward"}`` (+ their axes)
    for the method to lay out its state."""
    mesh, rules = setup_run(cfg.run)
    run_dir = pathlib.Path(cfg.run.out)
    policy_path = cfg.model.path or str(run_dir / "sft" / "hf")
    model_cfg, sft_params, tokenizer = model_io.load_lm(dataclasses.replace(cfg.model, path=policy_path))
    train_rows = sources.rows_from(cfg.data, "prompt", "train", simulated.prompt_rows)
    eval_rows = sources.rows_from(cfg.data, "prompt", "eval", simulated.prompt_rows)[:cfg.num_eval_prompts]
    cfg = resolve_config(cfg, stage, model_cfg, tokenizer, train_rows, eval_rows, num_samples=num_samples)
    reward_fns = rewards.load_all(cfg.reward)
    rm_weight = rewards.rm_weight(cfg.reward, cfg.reward_model_weight)
    trees: dict = {"policy": sft_params, "reference": sft_params}
    axes = models.param_logical_axes(model_cfg)
    tree_axes: dict = {"policy": axes, "reference": axes}
    reward_cfg = None
    if cfg.reward_ensemble:
        registry.ENSEMBLE_RULES.check(cfg.ensemble_rule, "--ensemble-rule")
        if cfg.reward_model is not None:
            raise ValueError("--reward-model and --reward-ensemble both given: pass one (a single model is a "
                             "one-member --reward-ensemble)")
        if rm_weight == 0.0:
            raise ValueError("--reward-ensemble given but the reward model's weight is 0 (--reward functions without "
                             "--reward-model-weight): pass --reward-model-weight > 0 or drop --reward-ensemble")
    if rm_weight != 0.0:
        if cfg.reward_ensemble:
            reward_cfg, trees["reward"], _ = ensemble.load(cfg.reward_ensemble, cfg.model, rule=cfg.ensemble_rule,
                                                           uwo_lambda=cfg.ensemble_uwo_lambda)
        else:
            reward_cfg, trees["reward"], _ = model_io.load_reward_model(cfg.reward_model or run_dir / "rm" / "hf",
                                                                        cfg.model)
        tree_axes["reward"] = {"backbone": models.param_logical_axes(reward_cfg),
                               "head": models.scalar_head_logical_axes()}
        if isinstance(trees["reward"], ensemble.RewardEnsemble):
            tree_axes["reward"] = ensemble.logical_axes(tree_axes["reward"], trees["reward"])
    if cfg.reference is not None:
        ref_cfg, trees["reference"], _ = model_io.load_lm(dataclasses.replace(cfg.model, path=cfg.reference))
        if ref_cfg != model_cfg:
            raise ValueError(f"--reference {cfg.reference} is not the policy's architecture:\n{ref_cfg}\nvs\n{model_cfg}")
    rm_name = trees["reward"].describe() if isinstance(trees.get("reward"), ensemble.RewardEnsemble) else "reward model"
    print(f"[{stage}] reward: " + " + ".join(
        ([f"{rm_weight:g} x {rm_name}"] if rm_weight else []) + [f"{r.weight:g} x {r.spec.split('=')[0]}" for r in
                                                                reward_fns]), flush=True)
    if not reward_fns and rm_weight == 0.0:
        raise ValueError("--reward-model-weight 0 and no --reward function: nothing scores the responses")
    eval_prompts = sources.prompt_texts(eval_rows)
    if cfg.eval_every and not eval_prompts:
        print(f"[{stage}] no held-out prompts (pass --data.eval-path or a --data.eval-fraction > 0): no evaluation",
              flush=True)
    encoded = sources.encode_rows(cfg.data, train_rows, tokenizer, max_len=cfg.sample.max_prompt_len,
                                  what="training prompts", prompts_only=True, flag="--sample.max-prompt-len")
    train_rows = sources.kept_rows(train_rows, encoded)  # --data.truncate drop may have skipped some
    trainable = Trainable.create(cfg.lora, model_cfg, lm_path=lm_path,
                                 reference_path=reference_path if cfg.reference is None else None)
    ctx = Context(cfg=cfg, mesh=mesh, rules=rules, model_cfg=model_cfg, reward_cfg=reward_cfg, tokenizer=tokenizer,
                  trainable=trainable, train_rows=train_rows, eval_prompts=eval_prompts, encoded=encoded,
                  rewards=reward_fns, rm_weight=rm_weight, policy_path=policy_path, out=stage_dir(cfg.run, stage))
    return ctx, trees, tree_axes


def reference_of(ctx: Context, state: TrainState) -> Any:
    """--reference's model, or the starting policy (with LoRA: the base, adapter off)."""
    return state.frozen["reference"] if "reference" in state.frozen else ctx.trainable.reference(state)


def make_evaluate(ctx: Context, name: str) -> Callable[[TrainState], dict]:
    """Held-out evaluation (rlhf_jax.evaluation): RM score when there is a reward model, gold on the embedded default."""
    cfg = ctx.cfg
    memo: dict = {}  # the frozen reference's samples and scores, sampled at the first evaluation only

    def evaluate(state: TrainState) -> dict:
        if not ctx.eval_prompts:
            return {}
        reward = (evaluation.RewardModel(ctx.reward_cfg, state.frozen["reward"]) if "reward" in state.frozen else None)
        return evaluation.evaluate_policy(ctx.model_cfg, ctx.trainable.lm(state), reference_of(ctx, state),
                                          ctx.tokenizer, ctx.eval_prompts, seed=cfg.run.seed + 1000,
                                          sample_args=cfg.sample, gold=cfg.data.path is None, mesh=ctx.mesh,
                                          rules=ctx.rules, reward=reward, reference_memo=memo)
    return evaluate


def run(ctx: Context, state: TrainState, learner: Learner, *, stage: str, name: str, kl_ctl: Any,
        updates_per_iteration: int, print_keys: Sequence[str] = ()) -> tuple[TrainState, dict]:
    """Iterate ``ctx.cfg.iterations`` times: draw, :meth:`Learner.experience`, :meth:`Learner.update`; log,
    evaluate, checkpoint (resumable), then export the policy (hf/, peft/ with LoRA) and write eval.json.
    Returns the final state and the result (export paths + the last evaluation)."""
    cfg, tokenizer, out = ctx.cfg, ctx.tokenizer, ctx.out
    N = learner.num_samples
    generate = jax.jit(lambda params, ids, mask, key: rollout.generate(
        ctx.model_cfg, params, ids, mask, key=key, max_new_tokens=cfg.sample.max_new_tokens,
        temperature=cfg.sample.temperature, top_k=cfg.sample.top_k, top_p=cfg.sample.top_p,
        eos_ids=model_io.eos_ids(ctx.model_cfg, tokenizer), pad_id=tokenizer.pad_token_id, num_samples=N))

    def collate(indices):  # a left-padded PromptBatch and the prompts (for reward functions, gold and logs)
        batch = collate_prompts([None if i is None else ctx.encoded[i] for i in indices],
                                pad_id=tokenizer.pad_token_id, length=cfg.sample.max_prompt_len)
        return batch, [ctx.train_rows[i].prompt for i in indices]

    prompts_it = BatchIterator(range(len(ctx.encoded)), collate, batch_size=cfg.rollout_prompts, seed=cfg.run.seed)
    manager = trainer.open_checkpoints(out, cfg.run)
    start = 0
    if cfg.run.resume and manager.latest_step() is not None:
        restored = checkpoint.restore(manager, trainer.abstract_of(state), frozen=state.frozen)
        state, start = restored.state, restored.step
        prompts_it.set_state(restored.data_state["prompts"])
        kl_ctl = kl_ctl.replace(value=jnp.asarray(restored.data_state["kl_coef"], jnp.float32))
        print(f"[{stage}] resumed from iteration {start}", flush=True)

    def draw_from(state: TrainState) -> Draw:
        def draw(key: jax.Array) -> Sample:
            t0 = time.perf_counter()
            prompts, texts = next(prompts_it)
            ids, mask = sharding.shard_batch((prompts.prompt_ids_BP, prompts.prompt_mask_BP), ctx.mesh, ctx.rules)
            r = jax.block_until_ready(generate(ctx.trainable.lm(state), ids, mask, key))
            seconds = time.perf_counter() - t0  # after block_until_ready: generation done, not just dispatched
            responses = sampling.decode_responses(tokenizer, r)
            texts = [t for t in texts for _ in range(N)]  # rows are prompts x samples
            fn_scores, fn_means = (rewards.score(ctx.rewards, texts, responses) if ctx.rewards
                                   else (np.zeros(len(responses), np.float32), {}))
            return Sample(r, texts, responses, fn_scores, fn_means, seconds)
        return draw

    evaluate = make_evaluate(ctx, name)
    key = jax.random.key(cfg.run.seed)
    last_eval: dict = {}
    with MetricsLogger(out, stage=stage, resume_from=start) as logger, \
            evaluation.open_samples_file(out / "samples.md", resume_from=start) as samples_md:
        for it in range(start + 1, cfg.iterations + 1):
            t0 = time.perf_counter()
            it_key = jax.random.fold_in(key, it)
            batch, score_metrics, sample = learner.experience(state, draw_from(state), jax.random.fold_in(it_key, 0),
                                                              kl_ctl.value)
            state, train_metrics = learner.update(state, batch, jax.random.fold_in(it_key, 1))
            values = to_floats({**score_metrics, **train_metrics})  # waits for the step's results
            values.update(sample.function_means)
            kl_ctl = kl_ctl.update(values["rollout/kl"], cfg.rollout_prompts * N)
            values.update({"kl/coef": float(kl_ctl.value),
                           "perf/gen_tokens_per_s": float(np.asarray(sample.rollout.lengths_B).sum()) / sample.seconds,
                           "optim/lr": trainer.learning_rate(cfg.optim, it * updates_per_iteration),
                           "perf/iteration_s": time.perf_counter() - t0})
            if cfg.data.path is None:
                values["rollout/gold"] = float(np.mean(evaluation.gold_eval(sample.prompts, sample.responses)))
            logger.log(it, values, print_keys=("rollout/score", "rollout/gold", "rollout/kl", *print_keys,
                                               "rollout/response_length", "kl/coef"))
            if cfg.samples_every and (it % cfg.samples_every == 0 or it == 1):
                table = evaluation.samples_table([{"prompt": p, "response": s} for p, s in
                                                  zip(sample.prompts[:4], sample.responses[:4])],
                                                 [("prompt", "prompt"), ("response", "response")])
                samples_md.write(f"\n## iteration {it} (rollout)\n\n{table}\n")
                samples_md.flush()
                logger.text(it, "samples", table)
            if cfg.eval_every and (it % cfg.eval_every == 0 or it == cfg.iterations):
                last_eval = evaluate(state)
                if last_eval:
                    logger.log(it, evaluation.scalars(last_eval), print_keys=evaluation.PRINT_KEYS)
                    table = evaluation.comparison_table(last_eval, policy=name, reference="reference")
                    samples_md.write(f"\n## iteration {it} (held-out evaluation)\n\n{table}\n")
                    samples_md.flush()
                    logger.text(it, "eval_samples", table)
            if it % cfg.run.save_every == 0 or it == cfg.iterations:
                checkpoint.save(manager, it, state, rng=key, config=trainer.jsonable(cfg), force=True,
                                data_state={"prompts": prompts_it.get_state(), "kl_coef": float(kl_ctl.value)})
    manager.wait_until_finished()
    manager.close()
    result = {**ctx.trainable.export(out, ctx.model_cfg, state, tokenizer, base_model=ctx.policy_path), **last_eval}
    trainer.write_json(out / "eval.json", result)  # written last: its presence marks the stage as finished
    return state, result


def kl_controller(cfg: Any, kl_coef: float, *, in_reward: bool) -> Any:
    """Fixed β, or the adaptive controller (``--kl.adaptive``; meaningful with the KL in the reward)."""
    if cfg.kl.adaptive:
        if not in_reward:
            raise ValueError("--kl.adaptive steers the KL penalty in the reward: use it with --algo-args.kl-placement reward")
        return kl.AdaptiveKLController.create(kl_coef, target=cfg.kl.target, horizon=cfg.kl.horizon)
    return kl.FixedKLController.create(kl_coef)


def place_state(ctx: Context, params: dict, param_axes: dict, frozen: dict, frozen_axes: dict, optimizer) -> TrainState:
    """The sharded state (LoRA-aware); host copies released."""
    state = ctx.trainable.place(ctx.model_cfg, params, param_axes, optimizer, ctx.mesh, ctx.rules, frozen=frozen,
                                frozen_axes=frozen_axes, donate=True)
    memory.release_freed_host_memory()
    return state


__all__ = ["Context", "KLArgs", "Learner", "OnlineArgs", "PolicyGradient", "Sample", "kl_controller", "make_evaluate",
           "place_state", "reference_of", "resolve_config", "run", "setup"]
