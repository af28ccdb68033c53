"""The training state pytree, the optimizer, and sharded state creation.

State is created through ``jax.eval_shape`` and a ``jax.jit`` whose ``out_shardings`` come from the
logical-axis table, so each device only ever materialises its own shards (nanodo
``_init_train_state``, flax ``setup_initial_state``). Parameters loaded from disk take the other
path, :func:`place_train_state`.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax.configs import OptimizerConfig
from rlhf_jax.sharding import Rules, logical_to_sharding, replicated

Params = Any


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and returns; a pytree of arrays, donated to each step.

    ``frozen`` holds parameters a step reads but never trains (the reference policy of DPO, a
    reward model): they are not seen by the optimizer and come back unchanged. ``{}`` when unused.
    """

    step: jax.Array
    """Step calls so far (micro-batches when gradients are accumulated), int32."""
    params: Params
    """Trainable parameters."""
    opt_state: optax.OptState
    """Optimizer state for ``params``."""
    frozen: Params
    """Parameters read but not trained."""

    def apply_gradients(self, grads: Params, optimizer: optax.GradientTransformation) -> "TrainState":
        """One optimizer call (an update, or one accumulation micro-step under ``optax.MultiSteps``)."""
        updates, opt_state = optimizer.update(grads, self.opt_state, self.params)
        key = jax.random.fold_in(jax.random.key(ROUNDING_SEED), self.step)  # resumes round as the run would have
        params = apply_updates(self.params, updates, key)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


ROUNDING_SEED = 0x5EED
"""Seed of the stochastic rounding of 16-bit parameters (:func:`apply_updates`), folded with the step."""


def apply_updates(params: Params, updates: Params, key: jax.Array) -> Params:
    """``p + u`` for every leaf, summed in the wider of the two dtypes. A sum that must narrow to a
    16-bit float parameter (bfloat16 parameters, float32 updates from :func:`float32_state`) is
    *stochastically* rounded to bfloat16 (:func:`stochastic_round`, one key per leaf): rounding to
    nearest would drop every update below half a bfloat16 step (2⁻⁹ of the weight), which at RLHF
    learning rates is nearly all of them. Equal dtypes: exactly ``optax.apply_updates``."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))

    def one(p, u, k):
        total = p + u
        return total if total.dtype == p.dtype else stochastic_round(total, p.dtype, k)

    return jax.tree.unflatten(treedef, [one(p, u, k) for p, u, k in zip(leaves, treedef.flatten_up_to(updates), keys)])


def stochastic_round(x: jax.Array, dtype: Any, key: jax.Array) -> jax.Array:
    """float32 ``x`` to bfloat16 rounded up or down at random, up with probability equal to the
    fraction of a bfloat16 step that ``x`` lies above the value below it, so ``E[round(x)] = x``
    (Gupta et al. 2015; pure-bf16 training in Zamirai et al. 2020). bfloat16 is float32's upper 16 bits:
    adding 16 uniform random bits to the lower half and truncating does exactly this. Any other
    ``dtype`` (float16, which is not a prefix of float32) is rounded to nearest."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        return x.astype(dtype)
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
    rounded = jax.lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32)
    return jnp.where(jnp.isfinite(x), rounded, x).astype(jnp.bfloat16)


def _is_matrix(params: Params) -> Params:
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to ``end_lr_ratio * peak`` at ``total_steps``."""
    if cfg.learning_rate is None:
        raise ValueError("OptimizerConfig.learning_rate is None (auto): resolve it with rlhf_jax.defaults.resolve "
                         "(the experiment scripts do) or pass --optim.learning-rate")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_steps, end_value=cfg.end_lr_ratio * cfg.learning_rate)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """AdamW (decay on matrices only) after global-norm clipping, accumulated over ``grad_accum_steps``;
    its state in float32 unless ``cfg.state_dtype == "param"`` (:func:`float32_state`)."""
    tx = optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                     weight_decay=cfg.weight_decay, mask=_is_matrix)
    if cfg.max_grad_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), tx)
    if cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps).gradient_transformation()
    return float32_state(tx) if cfg.state_dtype == "float32" else tx


def _to_float32(tree: Any) -> Any:
    # leaves without a dtype pass through (optax.tree_map_params initialises with a placeholder object)
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(getattr(x, "dtype", jnp.int32), jnp.floating)
                        else x, tree)


def float32_state(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` run in float32 on parameters of any float dtype: its state (Adam's m and v, accumulated
    gradients) is created from float32 parameters, gradients enter it as float32, and its
    updates stay float32 (:func:`apply_updates` adds them to bfloat16 parameters with stochastic
    rounding). On float32 parameters it is ``tx`` itself, bit for bit.

    With bfloat16 parameters this halves parameter memory while the moments keep float32 precision: a
    bfloat16 moment has 8 significant bits, so any change to its running average below 1/256 of its
    value is rounded away (with ``b2 = 0.999`` and a steady gradient g, v stalls near g²/3 instead of
    reaching g², checked in ``tests/test_train_state.py``)."""
    def init(params):
        return tx.init(_to_float32(params))

    def update(grads, state, params=None):
        # params go in as they are: only weight decay reads them (λ·p, promoted against the float32 update),
        # and a float32 copy of every weight would cost as much memory as the moments
        return tx.update(_to_float32(grads), state, params)

    return optax.GradientTransformation(init, update)


def state_shardings(abstract_state: TrainState, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules: Rules, axes_tree: Any, frozen_axes: Any = None) -> TrainState:
    """NamedSharding for every leaf of a (shape-only) state.

    Optimizer moments follow their parameter (``optax.tree_map_params``); counters are replicated.
    """
    params = logical_to_sharding(axes_tree, mesh, rules, abstract_state.params)
    frozen = logical_to_sharding(frozen_axes if frozen_axes is not None else {}, mesh, rules, abstract_state.frozen)
    opt_state = _opt_state_shardings(optimizer, abstract_state.opt_state, params, mesh)
    return TrainState(step=replicated(mesh), params=params, opt_state=opt_state, frozen=frozen)


def _opt_state_shardings(optimizer: optax.GradientTransformation, abstract_opt_state: optax.OptState,
                         param_shardings: Any, mesh: Mesh) -> Any:
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract_opt_state, param_shardings,
                                 transform_non_params=lambda _: replicated(mesh))


def _state_init(init_fn: Callable[[], Params], optimizer: optax.GradientTransformation,
                frozen_init_fn: Callable[[], Params] | None) -> Callable[[], TrainState]:
    def init() -> TrainState:
        params = init_fn()
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                          frozen=frozen_init_fn() if frozen_init_fn is not None else {})
    return init


def abstract_train_state(init_fn: Callable[[], Params], optimizer: optax.GradientTransformation, mesh: Mesh,
                         rules: Rules, axes_tree: Any, *, frozen_init_fn: Callable[[], Params] | None = None,
                         frozen_axes: Any = None) -> TrainState:
    """The state as ``ShapeDtypeStruct``s carrying their target shardings; no memory is allocated.

    This is the restore target for :func:`rlhf_jax.checkpoint.restore` (on any mesh).
    """
    shapes = jax.eval_shape(_state_init(init_fn, optimizer, frozen_init_fn))
    shardings = state_shardings(shapes, optimizer, mesh, rules, axes_tree, frozen_axes)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def create_train_state(init_fn: Callable[[], Params], optimizer: optax.GradientTransformation, mesh: Mesh,
                       rules: Rules, axes_tree: Any, *, frozen_init_fn: Callable[[], Params] | None = None,
                       frozen_axes: Any = None) -> TrainState:
    """Initialise a sharded state: shapes by ``eval_shape``, values by a jit with those ``out_shardings``.

    ``init_fn()`` returns the trainable params (close over the PRNG key); ``axes_tree`` names their
    axes (``models.param_logical_axes``). ``frozen_init_fn`` / ``frozen_axes`` do the same for
    ``state.frozen``.
    """
    abstract = abstract_train_state(init_fn, optimizer, mesh, rules, axes_tree,
                                    frozen_init_fn=frozen_init_fn, frozen_axes=frozen_axes)
    return jax.jit(_state_init(init_fn, optimizer, frozen_init_fn), out_shardings=shardings_of(abstract))()


def place_train_state(params: Params, optimizer: optax.GradientTransformation, mesh: Mesh, rules: Rules,
                      axes_tree: Any, *, frozen: Params | None = None, frozen_axes: Any = None,
                      donate: bool = False) -> TrainState:
    """A sharded state around already-loaded parameters (``models.load_pretrained``, host or device).

    Parameters are copied onto their shardings into fresh buffers (``frozen`` never shares buffers
    with ``params``, so the same loaded tree can serve as both policy and reference, and nothing
    aliases the caller's host arrays); the optimizer state is created in place by a jit with
    ``out_shardings``.

    ``donate=True``: the caller hands ``params`` and ``frozen`` over and drops them (the scripts do):
    a device array already laid out as its sharding asks becomes the state's leaf as it is, with no
    copy (placing a model on one CPU device then costs no memory); an array met a second time (the
    policy that is also the reference) or laid out otherwise is copied as without ``donate``.
    """
    frozen = frozen if frozen is not None else {}
    param_sh = logical_to_sharding(axes_tree, mesh, rules, params)
    frozen_sh = logical_to_sharding(frozen_axes if frozen_axes is not None else {}, mesh, rules, frozen)
    taken: set | None = set() if donate else None
    params = _fresh_copy(params, param_sh, taken)
    frozen = _fresh_copy(frozen, frozen_sh, taken)
    opt_sh = _opt_state_shardings(optimizer, jax.eval_shape(optimizer.init, params), param_sh, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated(mesh))
    return TrainState(step=step, params=params, opt_state=opt_state, frozen=frozen)


def _buffers(x: jax.Array) -> tuple:
    return tuple((s.device.id, s.data.unsafe_buffer_pointer()) for s in x.addressable_shards)


def _fresh_copy(tree: Any, shardings: Any, taken: set | None = None) -> Any:
    """``tree`` (host or device arrays) on ``shardings``, in newly allocated device buffers.

    ``jax.device_put(..., may_alias=False)`` alone is not enough: on a CPU mesh whose devices hold
    replicated copies, a numpy array can come back aliased (zero-copy) on the first device, so the
    same host tree placed twice yields one buffer in two places, and donating the state then fails
    ("donate the same buffer twice") or writes into the caller's arrays. So the placed arrays go
    through a jitted copy, which cannot return its (non-donated) input buffers; each device copies
    only its own shards. (Placing first also keeps multi-process runs working: jit does not take
    numpy inputs with non-replicated shardings there.) Accelerators skip that copy, which would
    double the parameters' memory for a moment: their device_put always writes new device memory.

    ``taken`` (a set, ``place_train_state(donate=True)``): device arrays already on their sharding
    whose buffers are not in it keep their buffers (and add them to it); the rest are copied.
    """
    leaves, treedef = jax.tree.flatten(tree)
    shards = treedef.flatten_up_to(shardings)
    out: list[Any] = [None] * len(leaves)
    if taken is not None:
        for i, (x, sh) in enumerate(zip(leaves, shards)):
            if isinstance(x, jax.Array) and x.is_fully_addressable and x.sharding.is_equivalent_to(sh, x.ndim):
                buffers = set(_buffers(x))
                if not buffers & taken:
                    taken.update(buffers)
                    out[i] = jax.device_put(x, sh)  # an equivalent layout: the same buffers, no copy
    rest = [i for i in range(len(leaves)) if out[i] is None]
    if rest:
        placed = jax.device_put([leaves[i] for i in rest], [shards[i] for i in rest], may_alias=False)
        if any(d.platform == "cpu" for x in placed for d in x.devices()):
            placed = jax.jit(lambda t: [jnp.copy(x) for x in t], out_shardings=[shards[i] for i in rest])(placed)
        for i, x in zip(rest, placed):
            out[i] = x
            if taken is not None:
                taken.update(_buffers(x))
    return jax.tree.unflatten(treedef, out)


def shardings_of(tree: Any) -> Any:
    """The ``.sharding`` of every leaf (arrays or ShapeDtypeStructs): in/out shardings for jit."""
    return jax.tree.map(lambda x: x.sharding, tree)
