"""Meshes, the logical-axis tables, and placement of parameters and batches on 8 CPU devices."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from rlhf_jax import models
from rlhf_jax.configs import MeshConfig
from rlhf_jax.sharding import (DATA_PARALLEL_RULES, DEFAULT_RULES, FSDP_RULES, batch_sharding, initialize_distributed,
                               logical_to_sharding, logical_to_spec, make_mesh, per_device_bytes, shard_batch,
                               with_logical_constraint)

from mesh_case import tiny_model_config


def test_make_mesh_fills_the_free_axis_with_auto_axes():
    mesh = make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert dict(make_mesh(MeshConfig(data=1, fsdp=-1)).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(ValueError, match="cannot be split"):
        make_mesh(MeshConfig(tensor=3))
    with pytest.raises(ValueError, match="needs 4 devices"):
        make_mesh(MeshConfig(data=2, tensor=2))


def test_a_mesh_axis_is_used_once_per_array():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    # batch takes data+fsdp, so embed (-> fsdp) cannot take fsdp again in the same array.
    assert logical_to_spec(("batch", "length", "embed"), (8, 4, 16), mesh, DEFAULT_RULES) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("embed", "mlp"), (16, 32), mesh, DEFAULT_RULES) == P("fsdp", "tensor")
    assert logical_to_spec(("embed", "mlp"), (16, 32), mesh, FSDP_RULES) == P("fsdp", None)
    assert logical_to_spec(("embed", "mlp"), (16, 32), mesh, DATA_PARALLEL_RULES) == P(None, None)
    # Size-1 mesh axes are dropped rather than written into the spec.
    assert logical_to_spec(("embed", "mlp"), (16, 32), make_mesh(MeshConfig(tensor=8)), DEFAULT_RULES) == P(None, "tensor")


def test_indivisible_dim_is_replicated_with_a_warning(caplog):
    mesh = make_mesh(MeshConfig(data=2, tensor=4))
    with caplog.at_level(logging.WARNING, logger="rlhf_jax.sharding"):
        spec = logical_to_spec(("embed", "kv_heads", "head_dim"), (16, 2, 8), mesh, DEFAULT_RULES, name="k/kernel")
    assert spec == P(None, None, None)
    assert "k/kernel: dim 1 (kv_heads, size 2) is not divisible" in caplog.text


def test_unknown_logical_name_and_rank_mismatch_raise():
    mesh = make_mesh(MeshConfig())
    with pytest.raises(KeyError, match="'experts' has no rule"):
        logical_to_spec(("experts", "embed"), (8, 8), mesh, DEFAULT_RULES)
    with pytest.raises(ValueError, match="do not match shape"):
        logical_to_spec(("embed",), (8, 8), mesh, DEFAULT_RULES)


def test_shard_batch_splits_rows_over_data_and_fsdp():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    host = {"ids_BT": np.arange(8 * 5, dtype=np.int32).reshape(8, 5), "mask_BT": np.ones((8, 5), np.float32)}
    batch = shard_batch(host, mesh, DEFAULT_RULES)
    assert batch["ids_BT"].sharding == batch_sharding(mesh, DEFAULT_RULES)
    np.testing.assert_array_equal(np.asarray(batch["ids_BT"]), host["ids_BT"])
    # 4 batch shards, each held by the 2 devices of one tensor group.
    assert {s.data.shape for s in batch["ids_BT"].addressable_shards} == {(2, 5)}
    with pytest.raises(ValueError, match="global batch 6 .* not divisible by the 4 batch shards"):
        shard_batch({"ids_BT": np.zeros((6, 5), np.int32)}, mesh, DEFAULT_RULES)


def test_with_logical_constraint_inside_jit():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    f = jax.jit(lambda x: with_logical_constraint(x * 2, ("batch", "length", "mlp"), mesh, DEFAULT_RULES))
    y = f(jnp.ones((8, 3, 4)))
    assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")


@pytest.mark.parametrize("mesh_cfg, shards", [(MeshConfig(fsdp=8, data=1), 8), (MeshConfig(data=2, tensor=4), 4),
                                              (MeshConfig(data=1, fsdp=2, tensor=4), 8)])
def test_model_parameters_are_really_split(mesh_cfg, shards):
    cfg = tiny_model_config()
    mesh = make_mesh(mesh_cfg)
    shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
    shardings = logical_to_sharding(models.param_logical_axes(cfg), mesh, DEFAULT_RULES, shapes)
    params = jax.jit(lambda: models.init_params(cfg, jax.random.key(0)), out_shardings=shardings)()
    for path in (("layers", "mlp", "up", "kernel"), ("layers", "mlp", "down", "kernel"), ("embed", "embedding"),
                 ("layers", "attn", "q", "kernel"), ("lm_head", "kernel")):
        x = params
        for k in path:
            x = x[k]
        assert per_device_bytes(x) * shards == x.nbytes, (path, x.sharding.spec)
    norm = params["final_norm"]["scale"]
    assert per_device_bytes(norm) == norm.nbytes  # small vectors stay replicated


def test_initialize_distributed_reads_the_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    initialize_distributed(timeout_s=7)
    initialize_distributed("other:99", 2, 0)  # explicit arguments win
    assert calls == [
        {"coordinator_address": "host0:1234", "num_processes": 4, "process_id": 2, "initialization_timeout": 7},
        {"coordinator_address": "other:99", "num_processes": 2, "process_id": 0, "initialization_timeout": 300}]
