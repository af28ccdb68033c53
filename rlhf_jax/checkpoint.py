"""Checkpoints with orbax: the train state, the data position, the RNG key and the run's config.

One checkpoint step holds three items (``ocp.args.Composite``):

- ``state``  : the :class:`~rlhf_jax.train_state.TrainState` (sharded arrays, ``StandardSave``);
- ``data``   : the data iterator's position, a JSON dict (``JsonSave``), and the JAX PRNG key of the
  training loop (its implementation's name and key data, under ``"_rng"``);
- ``config`` : the experiment config, a JSON dict (``JsonSave``).

Restoring onto a different mesh only needs the target: pass the abstract state of the new mesh
(:func:`rlhf_jax.train_state.abstract_train_state`) and every array is read straight into its
new shards.

Why not orbax's ``JaxRandomKeySave``: it writes through ``ArrayCheckpointHandler``, which saves
without OCDBT (``_USE_OCDBT_FOR_SAVE = False``) yet runs the pytree handler's finalize, which tries
to merge per-process OCDBT files, finds none and logs "Skipping merge of OCDBT checkpoints" at
WARNING on every save (orbax-checkpoint 0.12). A key is a few integers: JSON holds them exactly.
Checkpoints written with ``JaxRandomKeySave`` (an ``rng`` item) still restore.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
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
    if RNG_KEY in data_state:
        raise ValueError(f"data_state may not use the key {RNG_KEY!r} (the checkpoint stores the RNG key there)")
    key_data = np.asarray(jax.device_get(jax.random.key_data(rng)))
    data = {**data_state, RNG_KEY: {"impl": str(jax.random.key_impl(rng)), "dtype": str(key_data.dtype),
                                    "shape": list(key_data.shape), "key_data": key_data.ravel().tolist()}}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                              config=ocp.args.JsonSave(dict(config)))
    return manager.save(step, args=args, force=force)


RNG_KEY = "_rng"
"""Key of the ``data`` item under which :func:`save` stores the PRNG key."""


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
    items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                 config=ocp.args.JsonRestore())
    legacy = (pathlib.Path(manager.directory) / str(step) / "rng").is_dir()  # written with JaxRandomKeySave
    if legacy:
        replicated = abstract_state.step.sharding  # the key on the target mesh
        items["rng"] = ocp.args.JaxRandomKeyRestore(restore_args=ocp.ArrayRestoreArgs(sharding=replicated))
    out = manager.restore(step, args=ocp.args.Composite(**items))
    data = dict(out.data)
    if legacy:
        rng = out.rng
    else:
        saved = data.pop(RNG_KEY)
        key_data = np.asarray(saved["key_data"], dtype=saved["dtype"]).reshape(saved["shape"])
        rng = jax.device_put(jax.random.wrap_key_data(key_data, impl=saved["impl"]), abstract_state.step.sharding)
    return Restored(step=step, state=out.state, rng=rng, data_state=data, config=out.config)


def export_hf(path: str | os.PathLike, model_cfg: models.ModelConfig, params: Any) -> None:
    """Write ``params`` as a Hugging Face checkpoint (``models.save_pretrained``) from process 0.

    Sharded arrays are gathered to every host first (collective: all processes must call this).
    """
    host_params = jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))
    if jax.process_index() == 0:
        models.save_pretrained(path, model_cfg, host_params)
