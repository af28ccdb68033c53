"""The supervised train loop (SFT, reward model, DPO) with logging, checkpoints and exact resume, and
held-out evaluation of a step's metrics. The RL loop is :mod:`rlhf_jax.rl.loop`."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from rlhf_jax import checkpoint, memory, sharding
from rlhf_jax.cli import DataArgs, RunArgs, learning_rate, stage_dir
from rlhf_jax.configs import CheckpointConfig, OptimizerConfig
from rlhf_jax.data import BatchIterator
from rlhf_jax.data.sources import encode_rows
from rlhf_jax.logging import MetricsLogger
from rlhf_jax.metrics import Metrics, merge, to_floats
from rlhf_jax.train_state import TrainState


def open_checkpoints(out: pathlib.Path, run: RunArgs):
    """The stage's orbax manager. Refuses, before any compute, to start over a folder that already
    holds checkpoints unless ``run.resume`` says to continue from them."""
    manager = checkpoint.make_checkpoint_manager(CheckpointConfig(directory=str(out / "checkpoints"),
                                                                  save_every=run.save_every, async_save=False))
    if not run.resume and manager.latest_step() is not None:
        raise FileExistsError(f"{out / 'checkpoints'} already holds checkpoints (newest: step {manager.latest_step()}): "
                              f"pass --run.resume to continue from it, or choose another --run.out")
    return manager


def abstract_of(state: TrainState) -> TrainState:
    """Shapes, dtypes and shardings of a live state: the restore target for a checkpoint."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def train_loop(*, stage: str, run: RunArgs, state: TrainState, step_fn: Callable, batches: BatchIterator,
               num_steps: int, mesh, rules, config: Any, eval_fn: Callable[[TrainState], dict[str, float]] | None = None,
               eval_every: int = 0, print_keys: tuple[str, ...] | None = None,
               optim: OptimizerConfig | None = None,
               policy_eval: tuple[int, Callable[[TrainState], dict[str, float]]] | None = None
               ) -> tuple[TrainState, dict[str, float]]:
    """Run ``step_fn(state, batch)`` for ``num_steps`` steps with logging, checkpoints and resume.

    Metrics are accumulated as (total, count) between log lines, so logged means are exact. The
    newest checkpoint holds the state, the iterator position and the config; with ``run.resume`` the
    loop restarts from it and yields exactly the batches the uninterrupted run would have, and
    ``metrics.jsonl`` continues from that step (entries logged after it by the interrupted run are
    dropped). ``optim`` (the fitted optimizer config) adds ``optim/lr``, the schedule's value at the
    last update. ``perf/tokens_per_s`` counts step time only (not evaluation or checkpointing).
    ``policy_eval = (every, fn)`` logs ``fn(state)`` every ``every`` steps before the last (e.g. sampled
    held-out evaluations, the points of an over-optimisation curve; the stage evaluates its final policy itself).
    Returns the final state and the last evaluation.
    """
    out = stage_dir(run, stage)
    manager = open_checkpoints(out, run)
    rng = jax.random.key(run.seed)
    start = 0
    if run.resume and manager.latest_step() is not None:
        restored = checkpoint.restore(manager, abstract_of(state), frozen=state.frozen)
        state, start = restored.state, restored.step
        batches.set_state(restored.data_state)
        print(f"[{stage}] resumed from step {start} ({out / 'checkpoints'})", flush=True)
    last_eval: dict[str, float] = {}
    pending: Metrics = {}
    t0, tokens = time.perf_counter(), 0
    # one compiled step run many times: reuse its block of temporaries (memory.reusing_freed_host_memory)
    with MetricsLogger(out, stage=stage, resume_from=start) as logger, memory.reusing_freed_host_memory():
        for step in tqdm(range(start + 1, num_steps + 1), desc=stage, initial=start, total=num_steps,
                         disable=jax.process_index() != 0, leave=False):
            host_batch = next(batches)
            tokens += int(np.asarray(jax.tree.leaves(host_batch)[0]).size)
            state, metrics = step_fn(state, sharding.shard_batch(host_batch, mesh, rules))
            pending = merge(pending, metrics)
            if step % run.log_every == 0 or step == num_steps:
                jax.block_until_ready(state)  # dispatch is asynchronous: time the work, not its launch
                values = to_floats(pending)
                values["perf/tokens_per_s"] = tokens / (time.perf_counter() - t0)
                if optim is not None:
                    values["optim/lr"] = learning_rate(optim, step)
                logger.log(step, values, print_keys=print_keys)
                pending, tokens = {}, 0
                t0 = time.perf_counter()
            t_other = time.perf_counter()
            if eval_fn is not None and eval_every and (step % eval_every == 0 or step == num_steps):
                last_eval = eval_fn(state)
                logger.log(step, last_eval)
            if policy_eval is not None and policy_eval[0] and step % policy_eval[0] == 0 and step < num_steps:
                logger.log(step, policy_eval[1](state))
            if step % run.save_every == 0 or step == num_steps:
                checkpoint.save(manager, step, state, rng=rng, data_state=batches.get_state(),
                                config=jsonable(config), force=True)
            t0 += time.perf_counter() - t_other  # evaluation and checkpoints are not step time
    manager.wait_until_finished()
    manager.close()
    return state, last_eval


def jsonable(config: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config,
                                 default=str))


def held_out_eval(eval_step: Callable, rows: Sequence[Any], tokenizer: Any, collate: Callable, *, max_len: int,
                  batch_size: int, mesh, rules, data: DataArgs = DataArgs()) -> Callable[[TrainState], dict[str, float]]:
    """``evaluate(state)``: exact metric means of ``eval_step`` over every held-out row ({} without rows),
    encoded with ``data.truncate`` (counted and printed). The last batch is padded with zero-mask rows."""
    examples = encode_rows(data, rows, tokenizer, max_len=max_len, what="held-out rows") if rows else []

    def evaluate(state: TrainState) -> dict[str, float]:
        if not examples:
            return {}
        batches = BatchIterator(examples, collate, batch_size=batch_size, seed=0, shuffle=False, last_batch="pad",
                                num_epochs=1)
        return evaluate_batches(eval_step, state, batches, mesh, rules)

    return evaluate


def evaluate_batches(eval_step: Callable, state: TrainState, batches: Iterator, mesh, rules) -> dict[str, float]:
    """Exact means of ``eval_step``'s metrics over every batch of a finite iterator."""
    total: Metrics = {}
    for host_batch in batches:
        total = merge(total, eval_step(state, sharding.shard_batch(host_batch, mesh, rules)))
    return {f"eval/{k}": v for k, v in to_floats(total).items()}


def write_json(path: pathlib.Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")


def record_peak_memory(stage: str, peak: Any, result: dict, out: pathlib.Path | None = None) -> dict:
    """``result`` with ``memory/peak_rss_gib`` (a :class:`rlhf_jax.memory.PeakRSS` that has exited), printed
    and, with ``out``, written into ``out/eval.json`` too."""
    result = {**result, "memory/peak_rss_gib": round(peak.gib, 3)}
    print(f"[{stage}] peak memory {peak.gib:.2f} GiB" + ("" if peak.exact else " (process peak so far)"), flush=True)
    if out is not None:
        write_json(out / "eval.json", result)
    return result
