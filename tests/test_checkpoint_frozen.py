"""Checkpoints hold only what training changes: with LoRA (adapters trained, the base frozen) and with
DPO-style frozen references, the saved state has no frozen leaf; a resume from a LoRA checkpoint, with
the frozen trees loaded again, is bitwise the uninterrupted run (dropout on); resuming on different
frozen weights is refused naming the tree; checkpoints written with the frozen trees inside still restore.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rlhf_jax import checkpoint, lora, models
from rlhf_jax.configs import CheckpointConfig, MeshConfig, OptimizerConfig
from rlhf_jax.metrics import to_floats
from rlhf_jax.sharding import DEFAULT_RULES, make_mesh
from rlhf_jax.steps import make_sft_step
from rlhf_jax.train_state import make_optimizer, place_train_state, shardings_of

from mesh_case import sft_batch, tiny_model_config

CFG = tiny_model_config()
LORA = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=("all",))


def _setup():
    mesh = make_mesh(MeshConfig(data=2, tensor=4))
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10))
    base = models.init_params(CFG, jax.random.key(0))

    def fresh(base=base):
        return place_train_state(lora.init_adapters(CFG, LORA), optimizer, mesh, DEFAULT_RULES,
                                 lora.adapter_logical_axes(CFG, LORA), frozen={lora.BASE: base},
                                 frozen_axes={lora.BASE: models.param_logical_axes(CFG)})
    state = fresh()
    step = make_sft_step(CFG, optimizer, shardings_of(state), mesh, DEFAULT_RULES, view=lora.view(LORA))
    return fresh, step, base


def _steps(state, step, first, n):
    history = []
    for i in range(first, first + n):
        state, metrics = step(state, sft_batch(i))
        history.append(to_floats(metrics))
    return state, history


def test_lora_resume_is_bitwise_and_the_checkpoint_holds_no_frozen_leaf(tmp_path):
    fresh, step, base = _setup()
    full, full_history = _steps(fresh(), step, 1, 4)

    manager = checkpoint.make_checkpoint_manager(CheckpointConfig(directory=str(tmp_path / "ckpt"), save_every=2))
    state, history = _steps(fresh(), step, 1, 2)
    checkpoint.save(manager, 2, state, rng=jax.random.key(0), data_state={}, config={}, force=True)
    manager.wait_until_finished()
    # what the checkpoint holds, array by array (orbax's own metadata of the saved tree): the adapters,
    # their two Adam moments and the counters; no leaf of the base (file sizes carry orbax's own
    # metadata and vary from run to run, so they are not the measure here)
    saved = jax.tree_util.tree_flatten_with_path(ocp.StandardCheckpointer().metadata(tmp_path / "ckpt" / "2" / "state").item_metadata.tree)[0]
    names = [jax.tree_util.keystr(path) for path, _ in saved]
    assert not [n for n in names if "frozen" in n or "kernel" in n or "embedding" in n], names
    saved_bytes = sum(math.prod(m.shape) * np.dtype(m.dtype).itemsize for _, m in saved)
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
    assert 3 * adapter_bytes <= saved_bytes < 3 * adapter_bytes + 1024  # params + mu + nu, + step counters

    live = fresh()  # a new run: the base loaded again, fresh adapters to be overwritten
    restored = checkpoint.restore(manager, _abstract(live), frozen=live.frozen)
    assert restored.step == 2 and restored.state.frozen is live.frozen
    resumed, resumed_history = _steps(restored.state, step, 3, 2)
    assert history + resumed_history == full_history
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(full))


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_resuming_on_different_frozen_weights_is_refused_naming_the_tree(tmp_path):
    fresh, step, base = _setup()
    state, _ = _steps(fresh(), step, 1, 1)
    manager = checkpoint.make_checkpoint_manager(CheckpointConfig(directory=str(tmp_path / "ckpt")))
    checkpoint.save(manager, 1, state, rng=jax.random.key(0), data_state={}, config={}, force=True)
    manager.wait_until_finished()
    other = jax.tree.map(lambda x: x, base)
    other["layers"]["mlp"]["up"]["kernel"] = other["layers"]["mlp"]["up"]["kernel"].at[1, 5, 7].add(1e-3)
    live = fresh(other)
    with pytest.raises(ValueError, match=r"frozen tree 'lora_base' differs from the one this checkpoint was trained "
                                         r"with .*refusing to resume on different frozen weights"):
        checkpoint.restore(manager, _abstract(live), frozen=live.frozen)
    with pytest.raises(ValueError, match=r"frozen tree 'lora_base' differs .*absent now"):
        checkpoint.restore(manager, _abstract(live), frozen={})
    same = fresh()
    assert checkpoint.restore(manager, _abstract(same), frozen=same.frozen).step == 1


def test_fingerprints_see_one_bit_and_ignore_placement():
    tree = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "b": jnp.ones(4, jnp.bfloat16)}
    fp = checkpoint.fingerprints({"t": tree})["t"]
    flipped = {**tree, "w": tree["w"].at[2, 3].set(jnp.nextafter(11.0, 12.0))}
    assert checkpoint.fingerprints({"t": flipped})["t"] != fp
    swapped = {**tree, "w": tree["w"].reshape(4, 3)}
    assert checkpoint.fingerprints({"t": swapped})["t"] != fp  # same bits, other shape
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    placed = jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    assert checkpoint.fingerprints({"t": placed})["t"] == fp


def test_a_checkpoint_with_frozen_trees_inside_still_restores(tmp_path):
    """The format before frozen trees left the checkpoint: state saved whole, no fingerprints."""
    import orbax.checkpoint as ocp

    fresh, step, _ = _setup()
    state, _ = _steps(fresh(), step, 1, 1)
    manager = checkpoint.make_checkpoint_manager(CheckpointConfig(directory=str(tmp_path / "old")))
    key_data = np.asarray(jax.random.key_data(jax.random.key(5)))
    data = {checkpoint.RNG_KEY: {"impl": str(jax.random.key_impl(jax.random.key(5))), "dtype": str(key_data.dtype),
                                 "shape": list(key_data.shape), "key_data": key_data.ravel().tolist()}}
    manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                                            config=ocp.args.JsonSave({})), force=True)
    manager.wait_until_finished()
    restored = checkpoint.restore(manager, _abstract(fresh()))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.state), jax.device_get(state))


def test_fingerprint_sums_agree_on_host_and_device():
    """The host path (NumPy on the CPU buffer, a slice at a time) and the device path (jitted slices of
    rows) compute the same sums, over a chunk boundary, for float32, bfloat16, int32 and uint8 leaves."""
    rng = np.random.default_rng(0)
    leaves = [jnp.asarray(rng.normal(size=(3, (1 << 20) + 5)), jnp.float32),
              jnp.asarray(rng.normal(size=(70, 33)), jnp.bfloat16), jnp.arange(12, dtype=jnp.int32).reshape(3, 4),
              jnp.asarray(rng.integers(0, 255, size=(9,)), jnp.uint8), jnp.float32(3.5)]
    for leaf in leaves:
        assert checkpoint._fingerprint_sums(leaf, host=True) == checkpoint._fingerprint_sums(leaf, host=False), leaf.dtype
