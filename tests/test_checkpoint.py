"""Checkpoints: exact resume of an SFT run, restore onto another mesh, retention, HF export."""
import dataclasses

import jax
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.checkpoint import export_hf, make_checkpoint_manager, restore, save
from rlhf_jax.configs import CheckpointConfig, MeshConfig, OptimizerConfig
from rlhf_jax.data.iterator import BatchIterator
from rlhf_jax.metrics import to_floats
from rlhf_jax.sharding import DEFAULT_RULES, make_mesh, shard_batch
from rlhf_jax.train_state import abstract_train_state, shardings_of

from mesh_case import SFT_OPTIMIZER, copy_state, sft_batch, sft_setup, tiny_model_config

CFG = tiny_model_config()
AXES = models.param_logical_axes(CFG)
POOL = sft_batch(seed=11, batch=24)  # the data set: 24 rows


def _init():
    return models.init_params(CFG, jax.random.key(0))


def _iterator() -> BatchIterator:
    collate = lambda rows: jax.tree.map(lambda x: x[np.asarray(rows)], POOL)
    return BatchIterator(list(range(24)), collate, batch_size=8, seed=3)


def _run(state, step, iterator, key, mesh, steps):
    """The training loop: one batch and one key split per step."""
    history = []
    for _ in range(steps):
        key, _ = jax.random.split(key)
        state, metrics = step(state, shard_batch(next(iterator), mesh, DEFAULT_RULES))
        history.append(to_floats(metrics))
    return state, key, history


def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    mesh, optimizer, initial, step = sft_setup()  # 2 data x 4 tensor, gradients accumulated over 2 micro-steps
    fresh = lambda: copy_state(initial)

    full_state, _, full_history = _run(fresh(), step, _iterator(), jax.random.key(42), mesh, steps=6)

    manager = make_checkpoint_manager(CheckpointConfig(directory=str(tmp_path / "ckpt"), save_every=3))
    state, key, it, history = fresh(), jax.random.key(42), _iterator(), []
    for i in range(1, 6):  # the interrupted run saves at step 3 and keeps stepping (donating) while it writes
        state, key, h = _run(state, step, it, key, mesh, steps=1)
        history += h
        save(manager, i, state, rng=key, data_state=it.get_state(), config={"optimizer": dataclasses.asdict(SFT_OPTIMIZER)})
    manager.wait_until_finished()
    assert manager.all_steps() == [1, 3]  # orbax always keeps the first save, then every save_every steps
    assert history == full_history[:5]

    restored = restore(make_checkpoint_manager(CheckpointConfig(directory=str(tmp_path / "ckpt"))),
                       abstract_train_state(_init, optimizer, mesh, DEFAULT_RULES, AXES))
    assert restored.step == 3 and restored.data_state == {"seed": 3, "epoch": 1, "index": 0}
    assert OptimizerConfig(**restored.config["optimizer"]) == SFT_OPTIMIZER
    it = _iterator()
    it.set_state(restored.data_state)
    state, _, resumed_history = _run(restored.state, step, it, restored.rng, mesh, steps=3)

    assert resumed_history == full_history[3:]
    assert int(state.step) == 6
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(full_state))
    assert shardings_of(state) == shardings_of(full_state)


def test_restore_onto_a_different_mesh(tmp_path):
    mesh, optimizer, initial, step = sft_setup()
    state = copy_state(initial)
    for seed in range(3):  # accumulate once, update once, accumulate again: every optimizer slot is non-trivial
        state, _ = step(state, shard_batch(sft_batch(seed), mesh, DEFAULT_RULES))
    fsdp_state = jax.device_put(state, shardings_of(abstract_train_state(  # the run that saves used 8-way FSDP
        _init, optimizer, make_mesh(MeshConfig(data=1, fsdp=8)), DEFAULT_RULES, AXES)))
    assert fsdp_state.params["layers"]["mlp"]["up"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    manager = make_checkpoint_manager(CheckpointConfig(directory=str(tmp_path / "ckpt"), async_save=False))
    save(manager, 3, fsdp_state, rng=jax.random.key(1), data_state={"index": 3}, config={})
    saved = jax.device_get(fsdp_state)

    target = abstract_train_state(_init, optimizer, mesh, DEFAULT_RULES, AXES)  # 2 data x 4 tensor
    restored = restore(manager, target)
    assert shardings_of(restored.state) == shardings_of(target)
    up = restored.state.params["layers"]["mlp"]["up"]["kernel"]
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.state), saved)
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(jax.random.key(1)))
    state, metrics = step(restored.state, shard_batch(sft_batch(3), mesh, DEFAULT_RULES))  # and it trains on
    assert np.isfinite(float(metrics["sft/loss"].mean()))


def test_save_interval_and_retention(tmp_path):
    _, _, initial, _ = sft_setup()
    manager = make_checkpoint_manager(CheckpointConfig(directory=str(tmp_path / "ckpt"), save_every=2, max_to_keep=2))
    saved = [save(manager, i, initial, rng=jax.random.key(0), data_state={}, config={}) for i in range(1, 7)]
    assert saved == [True, True, False, True, False, True]
    assert save(manager, 7, initial, rng=jax.random.key(0), data_state={}, config={}, force=True)
    manager.wait_until_finished()
    assert manager.all_steps() == [6, 7]
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        restore(make_checkpoint_manager(CheckpointConfig(directory=str(tmp_path / "empty"))), initial)


def test_export_hf_from_a_sharded_state(tmp_path):
    _, _, initial, _ = sft_setup()
    export_hf(tmp_path / "hf", CFG, initial.params)
    cfg, params = models.load_pretrained(tmp_path / "hf")
    assert cfg == CFG
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(initial.params))
