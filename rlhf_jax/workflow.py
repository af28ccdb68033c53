"""Plumbing the experiment scripts share: where models and data come from, the train loop with
checkpoint/resume, sampling. Policy evaluation lives in :mod:`rlhf_jax.evaluation`.

Scripts stay short by composing these; everything here is also usable from a notebook.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Callable, Iterator, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from rlhf_jax import checkpoint, lora, memory, models, rollout, sharding, steps
from rlhf_jax.configs import CheckpointConfig, MeshConfig, OptimizerConfig
from rlhf_jax.data import (BatchIterator, PromptRow, ValidationReport, collate_prompts, encode_prompts, load_source,
                           parse_row)
from rlhf_jax.logging import MetricsLogger
from rlhf_jax.metrics import Metrics, merge, to_floats
from rlhf_jax.train_state import TrainState, place_train_state

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# --- Configs shared by the scripts ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """Which language model to start from."""

    path: str | None = None
    """Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files). None: the
    embedded default, a tiny Llama initialised at random (for SFT) with the embedded tokenizer."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype."""
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    """Activation dtype (log-probs and losses are always float32)."""
    remat: bool = False
    """Rematerialise each layer in the backward pass (less memory, more compute)."""
    chat_template: Literal["auto", "on", "off"] = "auto"
    """Text prompts through the tokenizer's chat template (as messages: a "Human:/Assistant:" or
    "Customer:/Agent:" transcript becomes its turns, other text one user turn): "auto" when the tokenizer
    has a template, "on" always, "off" never (raw text, for base models). Conversations always use it.
    Applies to every encoding of the run: training rows, rollout, evaluation and reward-model prompts."""


@dataclasses.dataclass(frozen=True)
class DataArgs:
    """Where training data comes from."""

    path: str | None = None
    """A .jsonl/.parquet file, or "tfds:NAME" (with --data.data-dir). None: the simulated annotator."""
    eval_path: str | None = None
    """Held-out file / "tfds:NAME" (default: the simulated held-out split, or none for a user file)."""
    data_dir: str | None = None
    """TFDS data directory for "tfds:" names."""
    layout: Literal["canonical", "auto", "hh_rlhf", "tldr", "trl"] = "canonical"
    """File layout: ours ("canonical") or a public one (HH-RLHF, TL;DR comparisons, TRL/UltraFeedback)."""
    skip_invalid: bool = False
    """Skip malformed rows (counted and reported) instead of stopping at the first one."""
    truncate: Literal["error", "drop", "left", "right"] = "left"
    """Rows longer than the length limit: "error" stops naming file:line; "drop" skips them; "left"
    shortens the prompt (a conversation loses whole oldest turns, never the system or last user turn;
    raw text loses tokens from the front, keeping BOS); "right" cuts the completion. Counted and printed."""
    eval_fraction: float = 0.05
    """Without --data.eval-path: share of the prompts of --data.path held out for evaluation (chosen by a
    hash of the prompt, so a prompt is held out in every file and stage it appears in; all rows of a
    held-out prompt leave training). 0: no held-out split."""
    num_train: int = 4096
    """Simulated rows to generate for training (embedded default only)."""
    num_eval: int = 512
    """Simulated held-out rows (embedded default only)."""
    seed: int = 0
    """Seed of the simulated data."""

    def __post_init__(self):
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"--data.eval-fraction must be in [0, 1), got {self.eval_fraction}")


@dataclasses.dataclass(frozen=True)
class RunArgs:
    """Output folder, mesh, checkpointing, logging."""

    out: str = "runs/default"
    """Run folder: each stage writes <out>/<stage>/ (TensorBoard events, metrics.jsonl, checkpoints, hf/)."""
    mesh: MeshConfig = MeshConfig()
    """Device mesh; the default puts every device on the data axis."""
    rules: Literal["default", "fsdp", "data_parallel"] = "default"
    """Logical-axis rule table (see rlhf_jax.sharding)."""
    save_every: int = 200
    """Checkpoint interval in steps (the last step is always saved)."""
    resume: bool = False
    """Continue from the newest checkpoint of this stage if there is one."""
    log_every: int = 20
    """Steps between logged lines."""
    seed: int = 0
    """Seed of parameter init, shuffling and sampling."""
    compile_cache: str | None = None
    """Persistent XLA compilation cache folder (default ~/.cache/rlhf_jax/jax_compile)."""
    distributed: bool = False
    """Call jax.distributed.initialize (multi-host; coordinator from JAX_COORDINATOR_ADDRESS etc.)."""


RULE_TABLES = {"default": sharding.DEFAULT_RULES, "fsdp": sharding.FSDP_RULES,
               "data_parallel": sharding.DATA_PARALLEL_RULES}


def optimizer_for(optim: OptimizerConfig, steps: int) -> OptimizerConfig:
    """``optim`` with its schedule fitted to a run of ``steps`` optimizer calls (micro-batches: with
    ``grad_accum_steps`` k, that is ``steps // k`` updates), warmup capped below the update count."""
    updates = max(1, steps // optim.grad_accum_steps)
    return dataclasses.replace(optim, total_steps=updates, warmup_steps=min(optim.warmup_steps, updates - 1))


def learning_rate(optim: OptimizerConfig, calls: int) -> float:
    """The learning rate of the last update after ``calls`` optimizer calls (``optim/lr``): optax counts
    updates from 0, and under gradient accumulation only every ``grad_accum_steps``-th call updates."""
    from rlhf_jax.train_state import make_schedule

    return float(make_schedule(optim)(max(calls // optim.grad_accum_steps - 1, 0)))


def stage_dir(run: RunArgs, stage: str) -> pathlib.Path:
    path = pathlib.Path(run.out) / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


def setup(run: RunArgs) -> tuple[jax.sharding.Mesh, sharding.Rules]:
    """Compile cache, optional multi-host init, mesh and rule table."""
    from rlhf_jax import runtime

    if run.distributed:
        sharding.initialize_distributed()
    runtime.setup(run.compile_cache)
    return sharding.make_mesh(run.mesh), RULE_TABLES[run.rules]


# --- Models and tokenizers --------------------------------------------------------------------


def embedded_model_dir() -> pathlib.Path:
    """The embedded default's tokenizer + tiny Llama config (built once, cached)."""
    from rlhf_jax.data import embedded

    return embedded.embedded_dir()


def load_lm(args: ModelArgs, key: jax.Array | None = None) -> tuple[models.ModelConfig, Any, Any]:
    """``(cfg, params, tokenizer)`` from ``args.path``, or a randomly initialised embedded model."""
    overrides = dict(compute_dtype=DTYPES[args.compute_dtype], remat=args.remat)
    if args.path is None:
        path = embedded_model_dir()
        cfg = models.ModelConfig.from_hf_config(json.loads((path / "config.json").read_text()))
        cfg = dataclasses.replace(cfg, **overrides)
        params = models.init_params(cfg, key if key is not None else jax.random.key(0), dtype=DTYPES[args.dtype])
    else:
        path = pathlib.Path(args.path)
        cfg, params = models.load_pretrained(path, dtype=DTYPES[args.dtype])
        cfg = dataclasses.replace(cfg, **overrides)
    tokenizer = models.load_tokenizer(path)  # an HF directory, a .gguf file or a directory holding one
    models.check_tokenizer(cfg, tokenizer, source=str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    from rlhf_jax.data import chat

    setattr(tokenizer, chat.TOKENIZER_ATTRIBUTE, args.chat_template)  # every encoding of this run agrees
    memory.release_freed_host_memory()  # the loader's host copies are gone: give their pages back
    return cfg, params, tokenizer


def eos_ids(cfg: models.ModelConfig, tokenizer: Any) -> tuple[int, ...]:
    ids = set(cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def export_lm(path: pathlib.Path, cfg: models.ModelConfig, params: Any, tokenizer: Any) -> pathlib.Path:
    """The policy in Hugging Face layout (weights + config + tokenizer): loads in transformers."""
    checkpoint.export_hf(path, cfg, params)
    if jax.process_index() == 0:
        tokenizer.save_pretrained(str(path))
    return path


@dataclasses.dataclass(frozen=True)
class Trainable:
    """How a stage trains its language model: every parameter, or LoRA adapters on a frozen base
    (``--lora.rank R``). The scripts place their state, build their steps, sample and export through
    this, so the two cases share one code path.

    ``lm_path``: where the LM sits in the stage's params (``()`` SFT/DPO, ``("backbone",)`` reward
    model, ``("policy",)`` PPO). ``reference_path``: where the objective reads its reference in
    ``frozen`` (``()`` DPO, ``("reference",)`` PPO, None without one); with LoRA it is the base itself.
    """

    lora_cfg: lora.LoraConfig
    lm_path: tuple[str, ...] = ()
    reference_path: tuple[str, ...] | None = None
    initial_adapters: Any = dataclasses.field(default=None, compare=False, repr=False)
    """Adapters to start from (``--lora.load``); None: fresh ones."""

    @classmethod
    def create(cls, lora_cfg: lora.LoraConfig, model_cfg: models.ModelConfig, *, lm_path: tuple[str, ...] = (),
               reference_path: tuple[str, ...] | None = None) -> "Trainable":
        """With ``lora_cfg.load``, the PEFT adapter's rank, alpha and targets replace the flags' (dropout
        and seed are kept) and training continues from its weights."""
        adapters = None
        if lora_cfg.load:
            loaded, adapters = lora.load_peft(lora_cfg.load, model_cfg)
            lora_cfg = dataclasses.replace(loaded, dropout=lora_cfg.dropout, seed=lora_cfg.seed, load=lora_cfg.load)
            print(f"[lora] continuing from {lora_cfg.load}: rank {lora_cfg.rank}, alpha {lora_cfg.alpha}, targets "
                  f"{' '.join(lora.target_names(model_cfg, lora_cfg))}", flush=True)
        return cls(lora_cfg, lm_path, reference_path, adapters)

    @property
    def view(self) -> lora.View | None:
        """The train steps' ``view=`` (None: the state is laid out as the objective reads it)."""
        if not self.lora_cfg.enabled:
            return None
        return lora.view(self.lora_cfg, lm_path=self.lm_path, reference_path=self.reference_path)

    def place(self, model_cfg: models.ModelConfig, params: Any, axes: Any, optimizer, mesh, rules, *,
              frozen: Any = None, frozen_axes: Any = None, donate: bool = False) -> TrainState:
        """The sharded state: ``params`` (the stage's full layout, LM at ``lm_path``) and ``frozen``
        as given; with LoRA the LM at ``lm_path`` becomes fresh (or loaded) adapters, the LM itself goes
        to ``frozen[lora.BASE]`` (held once), and the reference at ``reference_path`` is dropped (the
        base is the reference)."""
        if not self.lora_cfg.enabled:
            return place_train_state(params, optimizer, mesh, rules, axes, frozen=frozen, frozen_axes=frozen_axes,
                                     donate=donate)
        lora_cfg = self.lora_cfg
        adapters = self.initial_adapters if self.initial_adapters is not None else lora.init_adapters(model_cfg, lora_cfg)
        base = lora.get_path(params, self.lm_path)
        trainable = lora.set_path(params, self.lm_path, adapters)
        trainable_axes = lora.set_path(axes, self.lm_path, lora.adapter_logical_axes(model_cfg, lora_cfg))
        frozen, frozen_axes = (frozen or {}), (frozen_axes or {})
        if self.reference_path is not None:  # the reference is the base: no copy of it is kept
            frozen = {} if not self.reference_path else {k: v for k, v in frozen.items() if k != self.reference_path[0]}
            frozen_axes = {} if not self.reference_path else {k: v for k, v in frozen_axes.items()
                                                              if k != self.reference_path[0]}
        frozen = {**frozen, lora.BASE: base}
        frozen_axes = {**frozen_axes, lora.BASE: lora.get_path(axes, self.lm_path)}
        return place_train_state(trainable, optimizer, mesh, rules, trainable_axes, frozen=frozen,
                                 frozen_axes=frozen_axes, donate=donate)

    def lm(self, state: TrainState) -> Any:
        """The trained LM's parameters (with LoRA: the base with the adapters attached, no merged copy)."""
        if not self.lora_cfg.enabled:
            return lora.get_path(state.params, self.lm_path)
        return lora.attach(state.frozen[lora.BASE], lora.get_path(state.params, self.lm_path), self.lora_cfg)

    def reference(self, state: TrainState) -> Any:
        """The frozen reference LM (with LoRA: the base, the adapter off)."""
        if self.reference_path is None:
            raise ValueError("this stage has no reference model")
        if self.lora_cfg.enabled:
            return state.frozen[lora.BASE]
        return lora.get_path(state.frozen, self.reference_path)

    def stage_params(self, state: TrainState) -> Any:
        """The stage's params in their full layout (LM attached at ``lm_path``: reward-model scoring)."""
        return state.params if not self.lora_cfg.enabled else lora.set_path(state.params, self.lm_path, self.lm(state))

    def merged_lm(self, state: TrainState, *, deferred: bool = False) -> Any:
        """The LM with the adapters merged into its kernels (``deferred``: computed one kernel at a time
        as an export writes them, see ``lora.merge``)."""
        if not self.lora_cfg.enabled:
            return lora.get_path(state.params, self.lm_path)
        return lora.merge(state.frozen[lora.BASE], lora.get_path(state.params, self.lm_path), self.lora_cfg,
                          deferred=deferred)

    def export(self, out: pathlib.Path, model_cfg: models.ModelConfig, state: TrainState, tokenizer: Any,
               base_model: str | None = None) -> dict:
        """``out/hf/`` (merged, loads in transformers) and, with LoRA, the adapters (:meth:`save_adapters`)."""
        written = {"hf": str(export_lm(out / "hf", model_cfg, self.merged_lm(state, deferred=True), tokenizer))}
        return {**written, **self.save_adapters(out, model_cfg, state, base_model)}

    def save_adapters(self, out: pathlib.Path, model_cfg: models.ModelConfig, state: TrainState,
                      base_model: str | None = None) -> dict:
        """With LoRA, ``out/peft/`` in PEFT's format (``peft.PeftModel.from_pretrained(base, out/"peft")``)
        where the family allows it (``lora.PEFT_FAMILIES``); ``{"peft": path}`` or ``{}``."""
        if not self.lora_cfg.enabled:
            return {}
        if model_cfg.model_type not in lora.PEFT_FAMILIES:
            print(f"[lora] no PEFT export for a {model_cfg.model_type} model (fused q/k/v); merged export in "
                  f"{out / 'hf'}", flush=True)
            return {}
        lora.save_peft(out / "peft", model_cfg, self.lora_cfg, lora.get_path(state.params, self.lm_path),
                       base_model=base_model)
        return {"peft": str(out / "peft")}


# --- Data ---------------------------------------------------------------------------------------


def rows_from(data: DataArgs, kind: str, split: Literal["train", "eval"], simulated: Callable[[int, int, str], list[dict]]
              ) -> list:
    """Rows of ``kind``: from the user's file / TFDS name, or from the simulated annotator.

    With a user file and no ``data.eval_path``, ``data.eval_fraction`` of its prompts are held out
    (:func:`split_held_out`): "train" gives the rest, "eval" the held-out rows.
    """
    if data.path is None:
        n = data.num_train if split == "train" else data.num_eval
        records = simulated(n, data.seed, "train" if split == "train" else "eval")
        return [parse_row(r, kind, source=f"<simulated {split}>:{i + 1}") for i, r in enumerate(records)]
    if data.eval_path is not None or not data.eval_fraction:
        spec = data.path if split == "train" else data.eval_path
        return [] if spec is None else _load(spec, kind, data)
    train, held_out = split_held_out(_load(data.path, kind, data), data.eval_fraction)
    _announce(f"[data] {data.path}: {len(held_out)} rows ({len({_prompt_key(r.prompt) for r in held_out})} prompts) "
              f"held out for evaluation (--data.eval-fraction {data.eval_fraction}), {len(train)} rows for training; "
              f"--data.eval-path sets a held-out file instead")
    return train if split == "train" else held_out


def _load(spec: str, kind: str, data: DataArgs) -> list:
    report = ValidationReport()
    rows = load_source(spec, kind, data_dir=data.data_dir, layout=data.layout, skip_invalid=data.skip_invalid,
                       report=report, split="train")
    if report.skipped:
        _announce(report.summary())
    return rows


_ANNOUNCED: set[str] = set()


def _announce(message: str) -> None:
    """Print ``message`` once per process (the train and eval splits read the same file)."""
    if message not in _ANNOUNCED:
        _ANNOUNCED.add(message)
        print(message, flush=True)


def _prompt_key(prompt: Any) -> str:
    from rlhf_jax.evaluation import jsonable_prompt

    return json.dumps(jsonable_prompt(prompt), sort_keys=True, ensure_ascii=False)


def _prompt_hash(prompt: Any) -> float:
    """A uniform number in [0, 1) fixed by the prompt's content."""
    import hashlib

    return int.from_bytes(hashlib.sha256(_prompt_key(prompt).encode()).digest()[:8], "big") / 2.0 ** 64


def split_held_out(rows: Sequence[Any], fraction: float) -> tuple[list, list]:
    """``(train, held_out)``: every row whose prompt hashes below ``fraction`` is held out, so the
    split depends on the prompt alone (not on the file, its order or a seed) and all rows of one
    prompt fall on the same side. At least one prompt is held out and one kept when there are two
    or more distinct prompts; with one, nothing is held out."""
    hashes = {}
    for r in rows:
        hashes.setdefault(_prompt_key(r.prompt), _prompt_hash(r.prompt))
    held = {k for k, h in hashes.items() if h < fraction}
    if fraction > 0 and len(hashes) >= 2:
        ordered = sorted(hashes, key=hashes.get)
        if not held:
            held = {ordered[0]}
        if len(held) == len(hashes):
            held.discard(ordered[-1])
    train = [r for r in rows if _prompt_key(r.prompt) not in held]
    held_out = [r for r in rows if _prompt_key(r.prompt) in held]
    return train, held_out


def encode_rows(data: DataArgs, rows: Sequence[Any], tokenizer: Any, *, max_len: int, what: str,
                prompts_only: bool = False, flag: str = "--max-len") -> list:
    """``rows`` encoded with ``data.truncate`` (prompt + completion <= ``max_len``, or the prompts alone with
    ``prompts_only``); truncated or dropped rows are counted and printed, naming ``what`` and ``flag``."""
    from rlhf_jax.data import encode

    report = ValidationReport()
    fn = encode_prompts if prompts_only else encode
    out = fn(rows, tokenizer, max_len=max_len, truncate=data.truncate, report=report)
    announce_truncation(report, len(rows), what=what, max_len=max_len, mode=data.truncate, flag=flag)
    return out


def kept_rows(rows: Sequence[Any], encoded: Sequence[Any]) -> list:
    """The rows ``encoded`` kept, in order (``truncate="drop"`` skips rows; the rest keep their order)."""
    kept, it = [], iter(encoded)
    pending = next(it, None)
    for row in rows:
        if pending is not None and pending.source == row.source:
            kept.append(row)
            pending = next(it, None)
    if pending is not None or len(kept) != len(encoded):
        raise ValueError("kept_rows: the encoded rows are not an ordered subset of the rows (sources differ)")
    return kept


def announce_truncation(report: ValidationReport, total: int, *, what: str, max_len: int, mode: str, flag: str
                        ) -> None:
    if report.truncated or report.num_skipped:
        dropped = report.skipped.get("too_long", 0)
        _announce(f"[data] {what}: {report.truncated} of {total} rows truncated, {dropped} dropped, to fit {flag} "
                  f"{max_len} (--data.truncate {mode})" + "".join(f"; e.g. {m}" for m in
                                                               report.examples.get("too_long", [])[:1]))


def prompt_texts(rows: Sequence[Any]) -> list:
    """The prompts of ``rows`` (text or conversations)."""
    return [r.prompt for r in rows]


def eval_prompts(rows: Sequence[Any], limit: int) -> list:
    """The first ``limit`` distinct prompts of ``rows`` (pairs often share a prompt), in order."""
    seen: dict[str, Any] = {}
    for r in rows:
        seen.setdefault(_prompt_key(r.prompt), r.prompt)
        if len(seen) >= limit:
            break
    return list(seen.values())


# --- The train loop -------------------------------------------------------------------------------


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
               optim: OptimizerConfig | None = None) -> tuple[TrainState, dict[str, float]]:
    """Run ``step_fn(state, batch)`` for ``num_steps`` steps with logging, checkpoints and resume.

    Metrics are accumulated as (total, count) between log lines, so logged means are exact. The
    newest checkpoint holds the state, the iterator position and the config; with ``run.resume`` the
    loop restarts from it and yields exactly the batches the uninterrupted run would have, and
    ``metrics.jsonl`` continues from that step (entries logged after it by the interrupted run are
    dropped). ``optim`` (the fitted optimizer config) adds ``optim/lr``, the schedule's value at the
    last update. ``perf/tokens_per_s`` counts step time only (not evaluation or checkpointing).
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
    with MetricsLogger(out, stage=stage, resume_from=start) as logger:
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
            if step % run.save_every == 0 or step == num_steps:
                checkpoint.save(manager, step, state, rng=rng, data_state=batches.get_state(),
                                config=_jsonable(config), force=True)
            t0 += time.perf_counter() - t_other  # evaluation and checkpoints are not step time
    manager.wait_until_finished()
    manager.close()
    return state, last_eval


def _jsonable(config: Any) -> dict:
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


# --- Sampling and evaluation ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SampleArgs:
    """How responses are sampled (rollouts, evaluation, best-of-n)."""

    max_prompt_len: int | None = None
    """Prompts are left-padded to this many tokens (a longer one is shortened as --data.truncate left
    does, never cutting its last turn, counted and printed). None: auto (see rlhf_jax.defaults;
    embedded 48, pretrained the longest prompt of the data)."""
    max_new_tokens: int | None = None
    """Response length limit. None: auto (see rlhf_jax.defaults; embedded 48)."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    top_k: int | None = None
    """Keep the k most likely tokens (None = off)."""
    top_p: float | None = None
    """Nucleus sampling threshold (None = off)."""
    batch_size: int | None = 64
    """Prompts per generate call (ppo.py: None = auto, see rlhf_jax.defaults; embedded 64)."""


def prompt_batches(prompts: Sequence[str], tokenizer: Any, sample: SampleArgs) -> list[Any]:
    """Left-padded PromptBatches of exactly ``sample.batch_size`` rows (the last one padded with empty rows)."""
    report = ValidationReport()
    encoded = encode_prompts([PromptRow(prompt=p) for p in prompts], tokenizer, max_len=sample.max_prompt_len,
                             report=report)
    announce_truncation(report, len(prompts), what="sampled prompts", max_len=sample.max_prompt_len, mode="left",
                        flag="--sample.max-prompt-len")
    batches = []
    for i in range(0, len(encoded), sample.batch_size):
        chunk: list[Any] = list(encoded[i:i + sample.batch_size])
        chunk += [None] * (sample.batch_size - len(chunk))
        batches.append(collate_prompts(chunk, pad_id=tokenizer.pad_token_id, length=sample.max_prompt_len))
    return batches


def _fill_empty_prompts(batch: Any, pad_id: int) -> Any:
    """Rows that only pad the last batch get a one-token prompt so generation is well defined."""
    mask = np.array(batch.prompt_mask_BP)
    ids = np.array(batch.prompt_ids_BP)
    empty = mask.sum(-1) == 0
    mask[empty, -1] = 1
    ids[empty, -1] = pad_id
    return batch.replace(prompt_ids_BP=ids, prompt_mask_BP=mask), empty


def sample(cfg: models.ModelConfig, params: Any, tokenizer: Any, prompts: Sequence[str], *, key: jax.Array,
           sample_args: SampleArgs, num_samples: int = 1, mesh=None, rules=None) -> tuple[list[list[str]], list[rollout.Rollout]]:
    """``num_samples`` responses per prompt (decoded text without EOS) and the raw rollouts."""
    texts: list[list[str]] = []
    rollouts = []
    eos = eos_ids(cfg, tokenizer)
    for i, batch in enumerate(prompt_batches(prompts, tokenizer, sample_args)):
        batch, empty = _fill_empty_prompts(batch, tokenizer.pad_token_id)
        ids, mask = batch.prompt_ids_BP, batch.prompt_mask_BP
        if mesh is not None:
            ids, mask = sharding.shard_batch((ids, mask), mesh, rules)
        r = rollout.generate(cfg, params, ids, mask, key=jax.random.fold_in(key, i),
                             max_new_tokens=sample_args.max_new_tokens, temperature=sample_args.temperature,
                             top_k=sample_args.top_k, top_p=sample_args.top_p, eos_ids=eos,
                             pad_id=tokenizer.pad_token_id, num_samples=num_samples)
        rollouts.append(r)
        decoded = decode_responses(tokenizer, r)
        for b in range(len(empty)):
            if not empty[b]:
                texts.append(decoded[b * num_samples:(b + 1) * num_samples])
    return texts[:len(prompts)], rollouts


def decode_responses(tokenizer: Any, r: rollout.Rollout) -> list[str]:
    """Response text of every row, up to (not including) EOS."""
    ids_BR = np.asarray(jax.device_get(r.response_ids_BR))
    mask_BR = np.asarray(jax.device_get(r.response_mask_BR)) > 0
    has_eos = np.asarray(jax.device_get(r.has_eos_B))
    out = []
    for ids, m, eos in zip(ids_BR, mask_BR, has_eos):
        n = int(m.sum()) - int(bool(eos))
        out.append(tokenizer.decode(ids[:n].tolist(), skip_special_tokens=True))
    return out


_token_logps = jax.jit(steps.token_logps, static_argnums=0)  # compiled once per (cfg, shapes), reused by every call
_reward_scores = jax.jit(steps.reward_scores, static_argnums=0)


@jax.jit
def _sequence_kl(policy_logps_BT: jax.Array, ref_logps_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    return jnp.sum((policy_logps_BT - ref_logps_BT) * mask_BT, axis=-1)


def kl_to_reference(cfg: models.ModelConfig, params: Any, ref_params: Any, rollouts: Sequence[rollout.Rollout]
                    ) -> np.ndarray:
    """Monte-Carlo KL(π ‖ π_ref) per sampled sequence: Σ_t log π(y_t) − log π_ref(y_t) (k1, unbiased
    for the sequence KL when the samples come from π at temperature 1)."""
    out = []
    for r in rollouts:
        mask_BT = jnp.pad(r.response_mask_BT[:, 1:], ((0, 0), (0, 1)))
        out.append(np.asarray(_sequence_kl(_token_logps(cfg, params, r.sequences_BT, r.attention_mask_BT),
                                           _token_logps(cfg, ref_params, r.sequences_BT, r.attention_mask_BT), mask_BT)))
    return np.concatenate(out)


def gold_eval(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """Gold scores from the simulated annotator's scorer (embedded default only)."""
    from rlhf_jax.data.simulated import gold_scores

    return gold_scores(list(prompts), list(responses))


def record_peak_memory(stage: str, peak: Any, result: dict, out: pathlib.Path | None = None) -> dict:
    """``result`` with ``memory/peak_rss_gib`` (a :class:`rlhf_jax.memory.PeakRSS` that has exited), printed
    and, with ``out``, written into ``out/eval.json`` too."""
    result = {**result, "memory/peak_rss_gib": round(peak.gib, 3)}
    print(f"[{stage}] peak memory {peak.gib:.2f} GiB" + ("" if peak.exact else " (process peak so far)"), flush=True)
    if out is not None:
        write_json(out / "eval.json", result)
    return result


def write_json(path: pathlib.Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")



# --- Reward models on disk ------------------------------------------------------------------------

REWARD_HEAD_FILE = "reward_head.safetensors"


def save_reward_model(path: pathlib.Path, cfg: models.ModelConfig, rm_params: Any, tokenizer: Any) -> pathlib.Path:
    """Backbone in Hugging Face layout plus ``reward_head.safetensors`` (kernel (D,), bias ())."""
    from safetensors.numpy import save_file

    export_lm(path, cfg, rm_params["backbone"], tokenizer)
    head = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), rm_params["head"])
    if jax.process_index() == 0:
        save_file({"kernel": head["kernel"], "bias": np.reshape(head["bias"], (1,))}, str(path / REWARD_HEAD_FILE))
    return path


def load_reward_model(path: str | os.PathLike, args: ModelArgs = ModelArgs()) -> tuple[models.ModelConfig, Any, Any]:
    """``(cfg, {"backbone", "head"}, tokenizer)`` written by :func:`save_reward_model`."""
    from safetensors.numpy import load_file

    path = pathlib.Path(path)
    head_file = path / REWARD_HEAD_FILE
    if not head_file.exists():
        raise FileNotFoundError(f"{path} has no {REWARD_HEAD_FILE}: not a reward model written by experiments/reward_model.py")
    cfg, backbone, tokenizer = load_lm(dataclasses.replace(args, path=str(path)))
    head = load_file(str(head_file))
    return cfg, {"backbone": backbone, "head": {"kernel": jnp.asarray(head["kernel"]),
                                                "bias": jnp.asarray(head["bias"][0])}}, tokenizer


def fold_normalization(head: Any, gain: float, bias: float) -> Any:
    """Head whose scores are ``gain · score + bias`` (lm-human-preferences' reward gain and bias)."""
    return {"kernel": head["kernel"] * gain, "bias": head["bias"] * gain + bias}


def rm_scores(cfg: models.ModelConfig, rm_params: Any, rollouts: Sequence[rollout.Rollout]) -> np.ndarray:
    """Reward-model score of every sampled sequence (last real token)."""
    return np.concatenate([np.asarray(_reward_scores(cfg, rm_params, r.sequences_BT, r.attention_mask_BT)) for r in rollouts])
