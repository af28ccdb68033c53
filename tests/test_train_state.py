"""TrainState creation on a mesh, placement of loaded parameters, and the optimizer recipe."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import models
from rlhf_jax.configs import MeshConfig, OptimizerConfig
from rlhf_jax.sharding import DEFAULT_RULES, make_mesh, per_device_bytes
from rlhf_jax.train_state import (abstract_train_state, create_train_state, make_optimizer, make_schedule,
                                  place_train_state, shardings_of)

from mesh_case import tiny_model_config

CFG = tiny_model_config()
AXES = models.param_logical_axes(CFG)


def _init():
    return models.init_params(CFG, jax.random.key(0))


def test_create_train_state_initialises_shards_in_place():
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))
    optimizer = make_optimizer(OptimizerConfig())
    abstract = abstract_train_state(_init, optimizer, mesh, DEFAULT_RULES, AXES)
    state = create_train_state(_init, optimizer, mesh, DEFAULT_RULES, AXES)
    assert shardings_of(state) == shardings_of(abstract)
    up = state.params["layers"]["mlp"]["up"]["kernel"]
    assert per_device_bytes(up) * 8 == up.nbytes
    mu_up = state.opt_state[1][0].mu["layers"]["mlp"]["up"]["kernel"]  # chain(clip, adamw): adam moments
    assert mu_up.sharding == up.sharding
    assert state.opt_state[1][0].count.sharding.spec == jax.sharding.PartitionSpec()
    # The sharded initialisation draws the same numbers as an unsharded one (up to float rounding).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
                 jax.device_get(state.params), jax.device_get(_init()))
    assert int(state.step) == 0 and state.frozen == {}


def _assert_no_shared_buffers(state):
    """No two leaves (or a leaf and host memory the caller still holds) share a device buffer: a
    donated state with a shared buffer fails ("donate the same buffer twice") or corrupts memory."""
    seen = {}
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        for shard in x.addressable_shards:
            key = (shard.device.id, shard.data.unsafe_buffer_pointer())
            assert key not in seen, f"{jax.tree_util.keystr(path)} shares a buffer with {seen[key]}"
            seen[key] = jax.tree_util.keystr(path)


@pytest.mark.parametrize("tensor", [1, 4])  # 1: parameters replicated on every device (a data-parallel mesh)
def test_place_loaded_params_as_policy_and_reference(tensor):
    mesh = make_mesh(MeshConfig(data=8 // tensor, tensor=tensor))
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=10))
    loaded = jax.device_get(_init())  # host arrays, as from models.load_pretrained
    state = place_train_state(loaded, optimizer, mesh, DEFAULT_RULES, AXES, frozen=loaded, frozen_axes=AXES)
    q = state.params["layers"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor" if tensor > 1 else None, None)
    assert state.frozen["layers"]["attn"]["q"]["kernel"].sharding == q.sharding
    _assert_no_shared_buffers(state)
    # Reuse the device params as the reference too: still separate buffers, so donation is safe.
    state = place_train_state(state.params, optimizer, mesh, DEFAULT_RULES, AXES, frozen=state.params, frozen_axes=AXES)
    _assert_no_shared_buffers(state)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), loaded)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), loaded)
    assert state.opt_state[1][0].nu["layers"]["attn"]["q"]["kernel"].sharding == q.sharding


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    schedule = make_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=10, total_steps=110, end_lr_ratio=0.1))
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(schedule(60), 0.1 + 0.9 * 0.5, atol=1e-6)  # cosine half-way
    np.testing.assert_allclose(schedule(110), 0.1, atol=1e-6)


def _toy():
    return {"w": jnp.full((4, 3), 0.5), "norm": jnp.ones((3,))}


def test_clipping_and_matrix_only_weight_decay():
    cfg = OptimizerConfig(learning_rate=0.1, total_steps=10, max_grad_norm=1.0, weight_decay=0.5)
    params = _toy()
    grads = [jax.tree.map(lambda p: 1e3 * jnp.ones_like(p), params),
             jax.tree.map(lambda p: jnp.linspace(-1.0, 1.0, p.size).reshape(p.shape), params)]

    def last_update(tx, grads):
        state = tx.init(params)
        for g in grads:
            updates, state = tx.update(g, state, params)
        return updates

    clip = lambda g: optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())[0]
    no_clip = make_optimizer(dataclasses.replace(cfg, max_grad_norm=None))
    with_clip = last_update(make_optimizer(cfg), grads)
    jax.tree.map(np.testing.assert_allclose, with_clip, last_update(no_clip, [clip(g) for g in grads]))
    assert not np.allclose(with_clip["w"], last_update(no_clip, grads)["w"])  # clipping changed Adam's moments
    # Zero gradients at step 0 (lr = peak after no warmup): only decay acts, and only on matrices.
    tx = make_optimizer(cfg)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * params["w"], rtol=1e-6)
    np.testing.assert_array_equal(updates["norm"], 0.0)


def test_gradient_accumulation_equals_one_step_on_the_mean_gradient():
    base = dict(learning_rate=0.1, total_steps=10, max_grad_norm=0.5)
    accumulate, single = make_optimizer(OptimizerConfig(**base, grad_accum_steps=2)), make_optimizer(OptimizerConfig(**base))
    params = _toy()
    g1 = jax.tree.map(lambda p: jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape), params)
    g2 = jax.tree.map(lambda p: -0.5 * jnp.ones_like(p), params)
    state = accumulate.init(params)
    u1, state = accumulate.update(g1, state, params)
    jax.tree.map(lambda u: np.testing.assert_array_equal(u, 0.0), u1)  # no update mid-accumulation
    u2, _ = accumulate.update(g2, state, params)
    expected, _ = single.update(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), single.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u2, expected)


def test_optimizer_config_is_validated():
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        OptimizerConfig(warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        OptimizerConfig(grad_accum_steps=0)


def test_bfloat16_parameters_keep_float32_optimizer_state():
    """``state_dtype="float32"`` (the default): bfloat16 parameters, float32 Adam moments that follow
    the published recursion m ← b1·m + (1−b1)·g, v ← b2·v + (1−b2)·g² (a plain loop here), updates in
    bfloat16; ``state_dtype="param"`` keeps bfloat16 moments, whose v stalls; float32 parameters get
    optax's own AdamW bit for bit; the sharded placement (with accumulation) works on bfloat16."""
    b1, b2, lr, g = 0.9, 0.999, 1e-3, 0.37
    cfg = OptimizerConfig(learning_rate=lr, total_steps=100, b1=b1, b2=b2, max_grad_norm=None)
    params = {"w": jnp.full((4, 3), 0.5, jnp.bfloat16)}
    grads = {"w": jnp.full((4, 3), g, jnp.bfloat16)}
    moments = {}
    for dtype in ("float32", "param"):
        tx = make_optimizer(dataclasses.replace(cfg, state_dtype=dtype))
        state, update = tx.init(params), jax.jit(tx.update)
        for _ in range(2000):
            updates, state = update(grads, state, params)
        assert updates["w"].dtype == (jnp.float32 if dtype == "float32" else jnp.bfloat16)
        moments[dtype] = state[0]
    m, v = 0.0, 0.0
    g_bf16 = float(jnp.bfloat16(g))
    for _ in range(2000):
        m, v = b1 * m + (1 - b1) * g_bf16, b2 * v + (1 - b2) * g_bf16 ** 2
    assert moments["float32"].mu["w"].dtype == moments["float32"].nu["w"].dtype == jnp.float32
    np.testing.assert_allclose(moments["float32"].mu["w"], m, rtol=1e-5)
    np.testing.assert_allclose(moments["float32"].nu["w"], v, rtol=1e-5)
    assert moments["param"].nu["w"].dtype == jnp.bfloat16
    assert float(moments["param"].nu["w"][0, 0]) < 0.6 * v  # bfloat16's v stalled (~g²/3 instead of 0.86·g²)
    # float32 parameters: the wrapper is the identity
    p32, g32 = _toy(), jax.tree.map(lambda p: jnp.linspace(-1.0, 2.0, p.size).reshape(p.shape), _toy())
    tx, plain = make_optimizer(dataclasses.replace(cfg, weight_decay=0.1)), optax.adamw(
        make_schedule(cfg), b1=b1, b2=b2, eps=cfg.eps, weight_decay=0.1, mask=lambda t: jax.tree.map(lambda x: x.ndim >= 2, t))
    (u, _), (u_plain, _) = tx.update(g32, tx.init(p32), p32), plain.update(g32, plain.init(p32), p32)
    jax.tree.map(np.testing.assert_array_equal, u, u_plain)
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=10, grad_accum_steps=2))
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), jax.device_get(_init()))
    state = place_train_state(bf16, tx, mesh, DEFAULT_RULES, AXES)
    nu = state.opt_state.inner_opt_state[1][0].nu["layers"]["mlp"]["up"]["kernel"]
    assert nu.dtype == jnp.float32 and nu.sharding == state.params["layers"]["mlp"]["up"]["kernel"].sharding
    assert state.params["layers"]["mlp"]["up"]["kernel"].dtype == jnp.bfloat16


def test_bfloat16_parameters_take_updates_below_their_rounding_step():
    """Updates far below half a bfloat16 step (1e-4 on weights of 1: the step is 2^-7) vanish under
    round-to-nearest and accumulate in expectation under stochastic rounding; the rounding is unbiased
    (mean over 65,536 weights), never moves a value by more than one step, depends only on the state's
    step (a resumed run rounds the same), and float32 parameters are untouched by it."""
    from rlhf_jax.train_state import TrainState, apply_updates, stochastic_round

    n, u, steps = 1 << 16, 1e-4, 200
    params = {"w": jnp.ones((n,), jnp.bfloat16)}
    tx = optax.sgd(1.0)  # update = -grad: u per step exactly
    grads = {"w": jnp.full((n,), -u, jnp.float32)}

    @jax.jit
    def run(params):
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), frozen={})
        return jax.lax.fori_loop(0, steps, lambda _, s: s.apply_gradients(grads, tx), state)

    nearest = jax.tree.map(lambda p, g: (p - g.astype(p.dtype)), params, grads)  # bf16 + bf16: rounds to nearest
    assert float(nearest["w"][0]) == 1.0  # one update already vanishes
    w = np.asarray(run(params).params["w"], np.float64)
    np.testing.assert_allclose(w.mean(), 1.0 + steps * u, atol=4e-4)  # E = 1.02; sd of the mean ~2e-5
    x = jnp.linspace(1.0, 2.0, n, dtype=jnp.float32)
    r = np.asarray(stochastic_round(x, jnp.bfloat16, jax.random.key(1)), np.float64)
    lo = np.asarray(x.astype(jnp.bfloat16), np.float64)
    assert np.all(np.abs(r - np.asarray(x)) < 2 ** -7) and abs((r - np.asarray(x)).mean()) < 2e-5
    assert not np.array_equal(r, lo)  # not round-to-nearest
    key = jax.random.key(3)
    p32 = {"a": jnp.arange(4.0)}
    np.testing.assert_array_equal(apply_updates(p32, {"a": jnp.full((4,), 0.1)}, key)["a"], jnp.arange(4.0) + 0.1)
    same = [apply_updates(params, grads, key)["w"] for _ in range(2)]
    np.testing.assert_array_equal(*same)


def test_donated_placement_takes_loaded_arrays_without_a_copy():
    """``place_train_state(donate=True)`` on one device: a loaded device array becomes the state's leaf
    with its own buffer (no copy); the same tree passed again as the reference is copied (a donated
    state never holds one buffer twice); host arrays are copied as without ``donate``."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=1), devices=jax.devices()[:1])
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, total_steps=10))
    loaded = jax.device_put(_init(), jax.devices()[0])
    pointers = {jax.tree_util.keystr(p): x.unsafe_buffer_pointer() for p, x in jax.tree_util.tree_leaves_with_path(loaded)}
    state = place_train_state(loaded, optimizer, mesh, DEFAULT_RULES, AXES, frozen=loaded, frozen_axes=AXES, donate=True)
    got = {jax.tree_util.keystr(p): x.unsafe_buffer_pointer() for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    assert got == pointers  # the policy took the loaded buffers
    _assert_no_shared_buffers(state)  # the reference did not
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), jax.device_get(state.params))
    host = jax.device_get(_init())
    state = place_train_state(host, optimizer, mesh, DEFAULT_RULES, AXES, donate=True)
    _assert_no_shared_buffers(state)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), host)
