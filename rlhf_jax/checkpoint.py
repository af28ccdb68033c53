"""Checkpoints with orbax: the train state, the data position, the RNG key and the run's config.

One checkpoint step holds four items (``ocp.args.Composite``):

- ``state``  : the :class:`~rlhf_jax.train_state.TrainState` (sharded arrays, ``StandardSave``);
- ``rng``    : the JAX PRNG key of the training loop (``JaxRandomKeySave``);
- ``data``   : the data iterator's position, a JSON dict (``JsonSave``);
- ``config`` : the experiment config, a JSON dict (``JsonSave``).

Restoring onto a different mesh only needs the target: pass the abstract state of the new mesh
(:func:`rlhf_jax.train_state.abstract_train_state`) and every array is read straight into its
new shards.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from rlhf_jax import models
from rlhf_jax.configs import CheckpointConfig
from rlhf_jax.train_state import TrainState


def make_checkpoint_manager(cfg: CheckpointConfig) -> ocp.CheckpointManager:
    """A manager saving every ``cfg.save_every`` steps and keeping the newest ``cfg.max_to_keep``."""
    options = ocp.CheckpointManagerOptions(save_interval_steps=cfg.save_every, max_to_keep=cfg.max_to_keep,
                                           enable_async_checkpointing=cfg.async_save)
    return ocp.CheckpointManager(os.path.abspath(cfg.directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: TrainState, *, rng: jax.Array,
         data_state: Mapping[str, Any], config: Mapping[str, Any] | Any, force: bool = False) -> bool:
    """Save at ``step`` if the manager's interval says so (always when ``force``); returns whether it did.

    ``config`` is a JSON-able dict or a dataclass (converted with ``dataclasses.asdict``). Saving
    may continue in the background: call ``manager.wait_until_finished()`` before reading it back.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), rng=ocp.args.JaxRandomKeySave(rng),
                              data=ocp.args.JsonSave(dict(data_state)), config=ocp.args.JsonSave(dict(config)))
    return manager.save(step, args=args, force=force)


@dataclasses.dataclass(frozen=True)
class Restored:
    """What :func:`restore` read back."""

    step: int
    state: TrainState
    rng: jax.Array
    data_state: dict[str, Any]
    config: dict[str, Any]


def restore(manager: ocp.CheckpointManager, abstract_state: TrainState, step: int | None = None) -> Restored:
    """Read checkpoint ``step`` (default: the newest) into the shapes and shardings of ``abstract_state``.

    ``abstract_state`` is a TrainState of ``jax.ShapeDtypeStruct`` with ``.sharding`` set, e.g. from
    :func:`rlhf_jax.train_state.abstract_train_state` on the mesh to resume on (which may differ
    from the mesh that saved).
    """
    manager.wait_until_finished()
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    rng_args = ocp.ArrayRestoreArgs(sharding=abstract_state.step.sharding)  # replicated on the target mesh
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              rng=ocp.args.JaxRandomKeyRestore(restore_args=rng_args),
                              data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore())
    out = manager.restore(step, args=args)
    return Restored(step=step, state=out.state, rng=out.rng, data_state=out.data, config=out.config)


def export_hf(path: str | os.PathLike, model_cfg: models.ModelConfig, params: Any) -> None:
    """Write ``params`` as a Hugging Face checkpoint (``models.save_pretrained``) from process 0.

    Sharded arrays are gathered to every host first (collective: all processes must call this).
    """
    host_params = jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))
    if jax.process_index() == 0:
        models.save_pretrained(path, model_cfg, host_params)
