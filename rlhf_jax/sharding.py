"""Meshes, the logical-axis rule table, and placement of parameters and batches.

Parameters and activations name their axes logically (``("embed", "mlp")``, ``("batch", "length")``);
one table maps each logical name to mesh axes of the mesh ``('data', 'fsdp', 'tensor')``. An
ablation swaps the whole table (``DEFAULT_RULES`` / ``FSDP_RULES`` / ``DATA_PARALLEL_RULES``).

Resolution of one array's axes, dimension by dimension (as in flax ``logical_to_mesh_axes``):
a mesh axis already used by an earlier dimension is skipped, so ``("batch", "length", "embed")``
puts ``fsdp`` on the batch only. A dimension whose size is not divisible by the product of its mesh
axes is replicated instead, and a warning names the array, the dimension and the sizes.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rlhf_jax.configs import MeshConfig

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]
LogicalAxes = tuple[str | None, ...] | None

DEFAULT_RULES: Rules = {
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    # parameters (activations reuse them: hidden_BTD is ("batch", "length", "embed"))
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "pos": None,
    "lora_rank": None,  # LoRA adapters' rank dimension (rlhf_jax.lora): small, replicated
}
"""FSDP over ``embed`` plus tensor parallelism over heads, MLP units and vocabulary."""

FSDP_RULES: Rules = {name: None for name in DEFAULT_RULES} | {"batch": ("data", "fsdp"), "embed": "fsdp"}
"""ZeRO-3 style: parameters split along ``embed`` only; the ``tensor`` axis is left unused."""

DATA_PARALLEL_RULES: Rules = {name: None for name in DEFAULT_RULES} | {"batch": ("data", "fsdp")}
"""Parameters replicated on every device; only the batch is split."""


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``('data', 'fsdp', 'tensor')`` mesh with Auto axis types over ``devices`` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split as {cfg} (fixed axes need a multiple of {known})")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"{cfg} needs {math.prod(sizes)} devices, got {len(devices)}")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(logical: LogicalAxes, shape: Sequence[int], mesh: Mesh, rules: Rules,
                    name: str = "array") -> PartitionSpec:
    """PartitionSpec for one array of ``shape`` whose dimensions carry the names ``logical``."""
    if logical is None:
        return PartitionSpec()
    if len(logical) != len(shape):
        raise ValueError(f"{name}: logical axes {logical} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for dim, (axis_name, size) in enumerate(zip(logical, shape)):
        if axis_name is None:
            spec.append(None)
            continue
        if axis_name not in rules:
            raise KeyError(f"{name}: logical axis {axis_name!r} has no rule; known: {sorted(rules)}")
        mesh_axes = tuple(a for a in _as_tuple(rules[axis_name]) if a not in used and mesh.shape[a] > 1)
        shards = math.prod(mesh.shape[a] for a in mesh_axes)
        if size % shards:
            log.warning("%s: dim %d (%s, size %d) is not divisible by mesh axes %s (%d shards); replicated",
                        name, dim, axis_name, size, mesh_axes, shards)
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def _is_axes_leaf(x: Any) -> bool:
    return x is None or (isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))


def logical_to_sharding(axes_tree: Any, mesh: Mesh, rules: Rules, shapes: Any) -> Any:
    """NamedSharding tree for ``shapes`` (arrays or ShapeDtypeStructs) named by ``axes_tree``.

    ``axes_tree`` has the structure of ``shapes`` with tuples of logical names (or None) as leaves.
    """
    def one(path, logical, x):
        spec = logical_to_spec(logical, x.shape, mesh, rules, name=jax.tree_util.keystr(path))
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, axes_tree, shapes, is_leaf=_is_axes_leaf)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Leading (batch) dimension split over the ``batch`` rule's mesh axes, the rest replicated."""
    axes = tuple(a for a in _as_tuple(rules["batch"]) if mesh.shape[a] > 1)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def batch_shards(mesh: Mesh, rules: Rules) -> int:
    """How many ways :func:`shard_batch` splits a global batch (the product of the batch axes' sizes)."""
    return math.prod(mesh.shape[a] for a in _as_tuple(batch_sharding(mesh, rules).spec[0]))


def shard_batch(host_batch: Any, mesh: Mesh, rules: Rules) -> Any:
    """Host-local numpy batch (this process's rows) -> global jax Arrays split along the batch axis.

    Every process passes its own rows; the global batch is their concatenation in process order
    (``jax.make_array_from_process_local_data``), so the same call works on one host or many. This
    holds when the processes split the batch axes (``data`` / ``fsdp`` across hosts, ``tensor``
    within a host: the device order of :func:`make_mesh`).
    """
    sharding = batch_sharding(mesh, rules)
    shards = batch_shards(mesh, rules)

    def one(path, x):
        x = np.asarray(x)
        rows = x.shape[0] * jax.process_count()
        if rows % shards:
            raise ValueError(f"batch field {jax.tree_util.keystr(path)}: global batch {rows} "
                             f"({x.shape[0]} rows x {jax.process_count()} processes) is not divisible "
                             f"by the {shards} batch shards of mesh {dict(mesh.shape)}")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(one, host_batch)


def with_logical_constraint(x: jax.Array, logical: LogicalAxes, mesh: Mesh, rules: Rules) -> jax.Array:
    """``with_sharding_constraint`` for an activation named by logical axes (inside jit)."""
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical, x.shape, mesh, rules)))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, timeout_s: int = 300) -> None:
    """Join a multi-process run (``jax.distributed.initialize``); call it before any other JAX call.

    Arguments default to the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``
    and ``JAX_PROCESS_ID``; left unset, JAX detects Cloud TPU, SLURM and Open MPI clusters itself.
    CPU processes exchange data through gloo.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value is None else int(value)


def per_device_bytes(x: jax.Array) -> int:
    """Bytes of ``x`` held by the most loaded addressable device (a check that sharding really split it)."""
    return max(s.data.nbytes for s in x.addressable_shards)

