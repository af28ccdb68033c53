"""The flags every experiment script shares: model, data, run (output, mesh, checkpoints) and sampling
arguments, and :func:`setup` (compile cache, multi-host init, mesh and rule table)."""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Literal

import jax
import jax.numpy as jnp

from rlhf_jax import sharding
from rlhf_jax.lora import LoraConfig
from rlhf_jax.configs import MeshConfig, OptimizerConfig


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
    logits_chunk: Literal["auto"] | int | None = "auto"
    """Training log-probs and cross-entropy from hidden states, this many positions at a time, never forming the
    (batch, length, vocabulary) float32 logits: less memory, one more head matmul in the backward pass. None: the
    full logits; "auto": full logits up to 256 MiB, chunks of at most 256 MiB beyond (models.ModelConfig)."""
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
    """Prompts per generate call (ppo.py: None = auto, see rlhf_jax.defaults; embedded 64). Fewer prompts than
    this decode in one call of the smallest power of two rows that holds them (rlhf_jax.sampling.batch_rows)."""


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


@dataclasses.dataclass(frozen=True)
class OfflinePolicyArgs:
    """The flags of the offline policy stages (DPO family, KTO): the policy, its data, the run and the
    end-of-training evaluation. A stage's config adds its loss's own flags."""

    model: ModelArgs = ModelArgs()
    """Policy to start from, also the frozen reference (default: <run.out>/sft/hf)."""
    data: DataArgs = DataArgs(num_train=6144, num_eval=1024, seed=1)
    """Training rows (default: the simulated annotator's comparisons / thumbs)."""
    run: RunArgs = RunArgs()
    optim: OptimizerConfig = OptimizerConfig(learning_rate=None, warmup_steps=20, total_steps=300, b2=0.99)
    sample: SampleArgs = SampleArgs()
    steps: int = 300
    batch_size: int = 32
    max_len: int | None = None
    """Tokens per sequence. None: auto (see rlhf_jax.defaults; embedded 96, pretrained the longest training
    row rounded up to 16). optim.learning_rate and sample lengths are auto too (embedded 3e-5, 48, 48)."""
    eval_every: int = 150
    """Steps between held-out losses (eval/...) on the held-out rows."""
    num_eval_prompts: int = 256
    """Held-out prompts the trained policy and the reference are sampled on at the end (0 = none)."""
    lora: LoraConfig = LoraConfig()
    """LoRA adapters on the policy (--lora.rank 8); the reference is then the base with the adapter off (no
    second copy of the weights). Exports hf/ (merged) and peft/."""
    reward_model: str | None = None
    """Reward model (from reward_model.py) that judges the held-out samples (default: <run.out>/rm/hf when it
    exists; without one the evaluation reports KL, length, EOS rate and samples)."""
    gold: bool | None = None
    """Judge the held-out samples with the simulated gold scorer too. None: when the data is the simulated
    annotator's (a file of the simulated world's rows, as the iterated pipeline writes, can set it)."""
