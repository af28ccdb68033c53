"""Typed dataclass configs (CLI through tyro). Each field has a one-line docstring; checks in ``__post_init__``."""
from __future__ import annotations

import dataclasses
from typing import Literal


# --- Optimisation, mesh, checkpointing -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay, global-norm clipping and gradient accumulation."""

    learning_rate: float | None = 1e-5
    """Peak learning rate, reached at the end of warmup. None: auto (see rlhf_jax.defaults), filled by the
    experiment scripts before the optimizer is built."""
    warmup_steps: int = 0
    """Optimizer updates of linear warmup from 0 to ``learning_rate``."""
    total_steps: int = 1000
    """Optimizer updates until the cosine reaches ``end_lr_ratio * learning_rate`` (warmup included)."""
    end_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak."""
    b1: float = 0.9
    """Adam first-moment decay."""
    b2: float = 0.95
    """Adam second-moment decay."""
    eps: float = 1e-8
    """Adam denominator epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to matrices (ndim >= 2) only."""
    max_grad_norm: float | None = 1.0
    """Clip gradients to this global L2 norm; None disables clipping."""
    grad_accum_steps: int = 1
    """Micro-batches averaged per optimizer update (optax.MultiSteps); each step call is one micro-batch."""
    state_dtype: Literal["float32", "param"] = "float32"
    """Adam moments (and accumulated gradients) in float32 whatever the parameter dtype (bfloat16 parameters
    with float32 optimizer state), or in each parameter's own dtype."""

    def __post_init__(self):
        if self.learning_rate is not None and self.learning_rate < 0:
            raise ValueError(f"OptimizerConfig.learning_rate must be >= 0, got {self.learning_rate}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"OptimizerConfig needs 0 <= warmup_steps < total_steps, "
                             f"got warmup_steps={self.warmup_steps}, total_steps={self.total_steps}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"OptimizerConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"OptimizerConfig.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ``('data', 'fsdp', 'tensor')``; -1 on one axis means "all remaining devices"."""

    data: int = -1
    """Data-parallel replicas (batch split, parameters replicated)."""
    fsdp: int = 1
    """Fully-sharded data parallel: batch and parameters split (parameters gathered per layer)."""
    tensor: int = 1
    """Tensor parallel: attention heads, MLP hidden units and vocabulary split."""

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"MeshConfig sizes must be positive with at most one -1, got {self}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax CheckpointManager settings."""

    directory: str = "checkpoints"
    """Root folder; one sub-folder per saved step."""
    save_every: int = 1000
    """Save when ``step % save_every == 0``, and at the first save call (orbax's default policy, which
    also saves on a preemption signal). Scripts save their last step with ``force=True``."""
    max_to_keep: int | None = 3
    """Newest checkpoints kept; older ones are deleted. None keeps all."""
    async_save: bool = True
    """Write in a background thread while training continues."""

    def __post_init__(self):
        if self.save_every < 1:
            raise ValueError(f"CheckpointConfig.save_every must be >= 1, got {self.save_every}")
        if self.max_to_keep is not None and self.max_to_keep < 1:
            raise ValueError(f"CheckpointConfig.max_to_keep must be >= 1 or None, got {self.max_to_keep}")
