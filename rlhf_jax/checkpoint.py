"""Checkpoints with orbax: the train state, the data position, the RNG key and the run's config.

One checkpoint step holds three items (``ocp.args.Composite``):

- ``state``  : the :class:`~rlhf_jax.train_state.TrainState` without its ``frozen`` trees (sharded arrays,
  ``StandardSave``): only what training changes (trainable params, optimizer state, step);
- ``data``   : the data iterator's position, a JSON dict (``JsonSave``), and the JAX PRNG key of the
  training loop (its implementation's name and key data, under ``"_rng"``);
- ``config`` : the experiment config, a JSON dict (``JsonSave``).

The frozen trees (a reference policy, a reward model, LoRA's base) are not written: the run that
resumes loads them again from where it loaded them the first time. The ``data`` item names each one
with a fingerprint of its content (:func:`fingerprints`), and :func:`restore` refuses to resume on
frozen weights whose fingerprint differs, naming the tree. Checkpoints written before this (frozen
trees inside ``state``) still restore.

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
import hashlib
import math
import os
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from rlhf_jax import memory, models
from rlhf_jax.configs import CheckpointConfig
from rlhf_jax.train_state import TrainState


def make_checkpoint_manager(cfg: CheckpointConfig) -> ocp.CheckpointManager:
    """A manager saving every ``cfg.save_every`` steps and keeping the newest ``cfg.max_to_keep``."""
    options = ocp.CheckpointManagerOptions(save_interval_steps=cfg.save_every, max_to_keep=cfg.max_to_keep,
                                           enable_async_checkpointing=cfg.async_save)
    return ocp.CheckpointManager(os.path.abspath(cfg.directory), options=options)


@jax.jit
def _leaf_sums(x: jax.Array, offset: jax.Array) -> jax.Array:
    """Two position-weighted uint32 sums of the bits of ``x``, whose first element sits at position
    ``offset`` of its leaf (mod 2³²; a fingerprint, on device)."""
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize])
    u = bits.astype(jnp.uint32).reshape(-1)
    i = offset + jnp.arange(u.size, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(u * (2 * i + 1), dtype=jnp.uint32), jnp.sum(u ^ (i * jnp.uint32(2654435761)),
                                                                          dtype=jnp.uint32)])


FINGERPRINT_CHUNK = 1 << 20
"""Elements per slice of a leaf summed at a time (the temporaries of one slice are all that exists)."""

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _fingerprint_sums(leaf: jax.Array, host: bool | None = None) -> tuple[int, int]:
    """:func:`_leaf_sums` of a whole leaf, :data:`FINGERPRINT_CHUNK` elements at a time (the sums add up
    mod 2³², so the value is the same as over the whole leaf, and as checkpoints written before
    recorded). A leaf on the CPU is read in place (a NumPy view of its buffer, the same arithmetic in
    NumPy: no copy of the leaf and no compilation); elsewhere slices of rows go through the jitted
    :func:`_leaf_sums` on the device (one program over a whole stacked leaf would hold twice the leaf
    in uint32 temporaries). ``host`` forces one path (tests check they agree)."""
    total, offset = np.zeros(2, np.uint64), 0
    if host is None:
        host = isinstance(leaf, np.ndarray) or (leaf.is_fully_addressable and all(d.platform == "cpu" for d in leaf.devices()))
    if host and leaf.dtype.itemsize in _UINT:
        flat = np.asarray(leaf).reshape(-1).view(_UINT[leaf.dtype.itemsize])  # one device: a view of its buffer
        for start in range(0, flat.size, FINGERPRINT_CHUNK):
            u = flat[start:start + FINGERPRINT_CHUNK].astype(np.uint32)
            i = np.arange(start, start + u.size, dtype=np.uint64).astype(np.uint32)
            total += np.array([np.sum(u * (2 * i + 1), dtype=np.uint32),
                               np.sum(u ^ (i * np.uint32(2654435761)), dtype=np.uint32)], np.uint64)
    else:
        rows = max(1, FINGERPRINT_CHUNK // max(1, math.prod(leaf.shape[1:]))) if leaf.ndim else 1
        parts = (leaf[j:j + rows] for j in range(0, leaf.shape[0], rows)) if leaf.ndim else iter([leaf])  # one alive
        for part in parts:
            total += np.asarray(jax.device_get(_leaf_sums(part, jnp.uint32(offset % 2**32))), np.uint64)
            offset += part.size * max(1, part.dtype.itemsize // 4)  # an 8-byte element is two uint32 words
    total %= 2**32
    return int(total[0]), int(total[1])


def fingerprints(frozen: Any) -> dict[str, str]:
    """``{name: hex fingerprint}`` of each top-level tree of ``frozen`` (its leaves' paths, shapes,
    dtypes and two position-weighted sums of their bits): what a checkpoint records instead of them."""
    if not isinstance(frozen, Mapping) or not frozen:
        return {}
    found = {}
    for name in sorted(frozen):
        tree = frozen[name]
        digest = hashlib.sha256()
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            s0, s1 = _fingerprint_sums(leaf)
            digest.update(f"{jax.tree_util.keystr(path)}:{tuple(leaf.shape)}:{leaf.dtype}:{s0}:{s1};".encode())
        found[str(name)] = digest.hexdigest()[:16]
    return found


FROZEN_KEY = "_frozen"
"""Key of the ``data`` item under which :func:`save` names the frozen trees (their fingerprints)."""


def save(manager: ocp.CheckpointManager, step: int, state: TrainState, *, rng: jax.Array,
         data_state: Mapping[str, Any], config: Mapping[str, Any] | Any, force: bool = False) -> bool:
    """Save at ``step`` if the manager's interval says so (always when ``force``); returns whether it did.

    ``config`` is a JSON-able dict or a dataclass (converted with ``dataclasses.asdict``). Saving
    may continue in the background: call ``manager.wait_until_finished()`` before reading it back.

    Freed heap pages go back to the OS first (:func:`rlhf_jax.memory.release_freed_host_memory`): a
    save right after a step otherwise stacks its buffers on the step's freed but still resident
    temporaries (one probe of full-parameter PPO on SmolLM2-135M: 4.85 → 4.48 GiB at the save; the
    stage's peak varies by up to 0.4 GiB between runs, so this is one reading, not a guarantee).
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not force and not manager.should_save(step):
        return False
    memory.release_freed_host_memory()
    for reserved in (RNG_KEY, FROZEN_KEY):
        if reserved in data_state:
            raise ValueError(f"data_state may not use the key {reserved!r} (the checkpoint stores its own item there)")
    key_data = np.asarray(jax.device_get(jax.random.key_data(rng)))
    data = {**data_state, RNG_KEY: {"impl": str(jax.random.key_impl(rng)), "dtype": str(key_data.dtype),
                                    "shape": list(key_data.shape), "key_data": key_data.ravel().tolist()},
            FROZEN_KEY: fingerprints(state.frozen)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state.replace(frozen={})), data=ocp.args.JsonSave(data),
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


def restore(manager: ocp.CheckpointManager, abstract_state: TrainState, step: int | None = None, *,
            frozen: Any = None) -> Restored:
    """Read checkpoint ``step`` (default: the newest) into the shapes and shardings of ``abstract_state``.

    ``abstract_state`` is a TrainState of ``jax.ShapeDtypeStruct`` with ``.sharding`` set, e.g. from
    :func:`rlhf_jax.train_state.abstract_train_state` on the mesh to resume on (which may differ
    from the mesh that saved). ``frozen``: the run's frozen trees as loaded again (the live state's
    ``frozen``); they must have the fingerprints the checkpoint recorded, or the restore is refused
    naming the tree, and become the restored state's ``frozen``.
    """
    manager.wait_until_finished()
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    saved = dict(manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data)
    trainable_only = FROZEN_KEY in saved
    if trainable_only:
        frozen = {} if frozen is None else frozen
        want, have = saved[FROZEN_KEY], fingerprints(frozen)
        for name in sorted(set(want) | set(have)):
            if want.get(name) != have.get(name):
                raise ValueError(
                    f"{manager.directory}/{step}: frozen tree {name!r} differs from the one this checkpoint was "
                    f"trained with (fingerprint {have.get(name, 'absent')} now, {want.get(name, 'absent')} saved): "
                    "refusing to resume on different frozen weights (the same --model.path / --reward-model / "
                    "--reference as the interrupted run?)")
        abstract_state = abstract_state.replace(frozen={})
    items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                 config=ocp.args.JsonRestore())
    legacy = (pathlib.Path(manager.directory) / str(step) / "rng").is_dir()  # written with JaxRandomKeySave
    if legacy:
        replicated = abstract_state.step.sharding  # the key on the target mesh
        items["rng"] = ocp.args.JaxRandomKeyRestore(restore_args=ocp.ArrayRestoreArgs(sharding=replicated))
    out = manager.restore(step, args=ocp.args.Composite(**items))
    data = dict(out.data)
    data.pop(FROZEN_KEY, None)
    state = out.state.replace(frozen=frozen) if trainable_only else out.state
    if legacy:
        rng = out.rng
    else:
        saved = data.pop(RNG_KEY)
        key_data = np.asarray(saved["key_data"], dtype=saved["dtype"]).reshape(saved["shape"])
        rng = jax.device_put(jax.random.wrap_key_data(key_data, impl=saved["impl"]), abstract_state.step.sharding)
    return Restored(step=step, state=state, rng=rng, data_state=data, config=out.config)


def export_hf(path: str | os.PathLike, model_cfg: models.ModelConfig, params: Any) -> None:
    """Write ``params`` as a Hugging Face checkpoint (``models.save_pretrained``) from process 0.

    One leaf at a time is gathered to every host (collective: all processes must call this) and
    written, so no process holds a second copy of the model.
    """
    def fetch(leaf):
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

    models.save_pretrained(path, model_cfg, params, fetch=fetch, write=jax.process_index() == 0)
