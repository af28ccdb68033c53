"""The tiny Llama and data shared by the mesh tests, and the worker that test_multihost.py launches.

As a script it joins a ``jax.distributed`` run (``--coordinator``, ``--num-processes``,
``--process-id``), feeds its own rows of the global batch, runs one accumulation cycle of the
shared sharded SFT step, exports the result (HF format, written by process 0), places host
parameters on the global mesh, and prints a report as one JSON line. In-process tests call :func:`sft_step_report` with all rows.
"""
from __future__ import annotations

import argparse
import functools
import json
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rlhf_jax import models
from rlhf_jax.checkpoint import export_hf
from rlhf_jax.configs import MeshConfig, OptimizerConfig
from rlhf_jax.sharding import DEFAULT_RULES, initialize_distributed, make_mesh, shard_batch
from rlhf_jax.steps import make_sft_step
from rlhf_jax.train_state import TrainState, create_train_state, make_optimizer, place_train_state, shardings_of
from rlhf_jax.types import PairBatch, SFTBatch

VOCAB = 128


def tiny_model_config() -> models.ModelConfig:
    """A 2-layer Llama whose sharded dims (vocab 128, d 64, 8 heads, 4 kv heads, mlp 128) divide 8 or 4."""
    return models.ModelConfig.from_hf_config({
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 8,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    })


def _rows(rng: np.random.Generator, batch: int, length: int) -> tuple[np.ndarray, ...]:
    """Right-padded rows: random prompt then completion; shifted completion mask (types.py convention)."""
    ids = rng.integers(1, VOCAB, size=(batch, length), dtype=np.int32)
    lengths = rng.integers(length // 2, length + 1, size=batch)
    prompt_lengths = rng.integers(1, length // 2, size=batch)
    col = np.arange(length)
    attention = (col[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(attention > 0, ids, 0).astype(np.int32)
    # mask[t] = 1 iff token t+1 is a completion token
    response = ((col[None] + 1 >= prompt_lengths[:, None]) & (col[None] + 1 < lengths[:, None])).astype(np.float32)
    return ids, attention, response


def sft_batch(seed: int, batch: int = 8, length: int = 16) -> SFTBatch:
    """A deterministic host (NumPy) SFT batch of unpacked, right-padded rows."""
    ids, attention, loss_mask = _rows(np.random.default_rng(seed), batch, length)
    positions = np.maximum(np.cumsum(attention, axis=1) - 1, 0).astype(np.int32)
    return SFTBatch(input_ids_BT=ids, attention_mask_BT=attention, loss_mask_BT=loss_mask,
                    positions_BT=positions, segment_ids_BT=attention.copy())


def pair_batch(seed: int, batch: int = 8, length: int = 16) -> PairBatch:
    """A deterministic host pair batch (random chosen and rejected rows, margins in [0, 1))."""
    rng = np.random.default_rng(seed)
    chosen, rejected = _rows(rng, batch, length), _rows(rng, batch, length)
    return PairBatch(chosen_ids_BT=chosen[0], chosen_attention_mask_BT=chosen[1], chosen_response_mask_BT=chosen[2],
                     rejected_ids_BT=rejected[0], rejected_attention_mask_BT=rejected[1],
                     rejected_response_mask_BT=rejected[2], margin_B=rng.random(batch, dtype=np.float32))


SFT_MESH = MeshConfig(data=2, tensor=4)
SFT_OPTIMIZER = OptimizerConfig(learning_rate=1e-2, total_steps=20, grad_accum_steps=2)


@functools.cache
def sft_setup() -> tuple[Mesh, optax.GradientTransformation, TrainState, Callable]:
    """The 2x4 mesh, optimizer, initial state and jitted SFT step that several tests share (one compile).

    The step donates its input state: start runs from ``copy_state(initial)``.
    """
    cfg = tiny_model_config()
    mesh = make_mesh(SFT_MESH)
    optimizer = make_optimizer(SFT_OPTIMIZER)
    state = create_train_state(lambda: models.init_params(cfg, jax.random.key(0)), optimizer, mesh, DEFAULT_RULES,
                               models.param_logical_axes(cfg))
    return mesh, optimizer, state, make_sft_step(cfg, optimizer, shardings_of(state), mesh, DEFAULT_RULES)


def copy_state(state: TrainState) -> TrainState:
    """Fresh buffers with the same shardings (a donated step may then consume them)."""
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), state)


def sft_step_report(host_batch: SFTBatch, export_dir: str) -> dict[str, float]:
    """One accumulation cycle (2 micro-steps, 1 update) on this process's rows: loss, grad norm, params
    checksum; the updated params are exported as a Hugging Face checkpoint to ``export_dir``."""
    mesh, _, initial, step = sft_setup()
    state, batch = copy_state(initial), shard_batch(host_batch, mesh, DEFAULT_RULES)
    state, first = step(state, batch)
    state, second = step(state, batch)
    export_hf(export_dir, tiny_model_config(), state.params)
    checksum = jax.jit(lambda p: sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(p)))(state.params)
    global_ids = multihost_utils.process_allgather(batch.input_ids_BT, tiled=True)
    return {"loss": float(first["sft/loss"].mean()), "grad_norm": float(second["optim/grad_norm"].mean()),
            "param_abs_sum": float(checksum),
            "ids_sum_by_row": np.asarray(global_ids).sum(1).tolist(),
            "process_count": jax.process_count(), "device_count": jax.device_count()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--export-dir", required=True)
    args = parser.parse_args()
    initialize_distributed(args.coordinator, args.num_processes, args.process_id, timeout_s=60)
    full = sft_batch(seed=0)
    rows = len(full.input_ids_BT) // args.num_processes
    local = jax.tree.map(lambda x: x[args.process_id * rows:(args.process_id + 1) * rows], full)
    report = sft_step_report(local, args.export_dir)
    # Loaded (host) parameters placed on the global mesh by every process hold the same values.
    cfg, (mesh, optimizer, _, _) = tiny_model_config(), sft_setup()
    loaded = jax.device_get(models.init_params(cfg, jax.random.key(0)))
    placed = place_train_state(loaded, optimizer, mesh, DEFAULT_RULES, models.param_logical_axes(cfg))
    gathered = multihost_utils.process_allgather(placed.params, tiled=True)
    report["placed_params_match"] = all(map(np.array_equal, jax.tree.leaves(gathered), jax.tree.leaves(loaded)))
    print("REPORT " + json.dumps(report), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
