"""Where a training step's memory goes: resident memory after each phase of an SFT step (load, place,
compile, steps) and XLA's own accounting of the compiled step (arguments, outputs, temporaries).

    python benchmarks/step_memory.py runs/bench_memory/sft_hf --rank 8            # LoRA rank 8, all projections
    python benchmarks/step_memory.py runs/bench_memory/sft_hf --rank 8 --remat    # layers rematerialised
    python benchmarks/step_memory.py DIR --rank 0 --length 48                     # full fine-tuning, shorter rows

Batch 8 of random tokens at ``--length``; the step time is the second step's, after
``jax.block_until_ready``.
"""
from __future__ import annotations

import argparse
import gc
import time

import jax
import numpy as np

from rlhf_jax import cli, lora, memory, model_io, models, steps
from rlhf_jax.trainable import Trainable
from rlhf_jax.configs import MeshConfig, OptimizerConfig
from rlhf_jax.sharding import DEFAULT_RULES, make_mesh
from rlhf_jax.train_state import make_optimizer, shardings_of
from rlhf_jax.types import SFTBatch


def rss(tag: str) -> None:
    print(f"{tag:28s} rss {memory.rss_bytes() / 2**30:.2f} GiB  peak {memory._status_kib('VmHWM') / 2**20:.2f} GiB",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--remat", action="store_true")
    args = parser.parse_args()
    rss("start")
    cfg, params, _ = model_io.load_lm(cli.ModelArgs(path=args.path, remat=args.remat))
    rss("loaded (host)")
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-5, warmup_steps=0, total_steps=10))
    trainable = Trainable.create(lora.LoraConfig(rank=args.rank, targets=("all",)), cfg)
    state = trainable.place(cfg, params, models.param_logical_axes(cfg), optimizer, mesh, DEFAULT_RULES)
    rss("placed")
    del params
    gc.collect()
    rss("host copy freed")
    memory.release_freed_host_memory()
    rss("freed memory returned")
    step = steps.make_sft_step(cfg, optimizer, shardings_of(state), mesh, DEFAULT_RULES, view=trainable.view)
    B, T = args.batch, args.length
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    batch = SFTBatch(input_ids_BT=ids, attention_mask_BT=np.ones_like(ids), loss_mask_BT=np.ones((B, T), np.float32),
                     positions_BT=np.tile(np.arange(T, dtype=np.int32), (B, 1)), segment_ids_BT=np.ones_like(ids))
    analysis = step.lower(state, batch).compile().memory_analysis()
    rss("compiled")
    print(f"XLA: arguments {analysis.argument_size_in_bytes / 2**30:.2f} GiB, outputs "
          f"{analysis.output_size_in_bytes / 2**30:.2f} GiB, temporaries {analysis.temp_size_in_bytes / 2**30:.2f} GiB")
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    rss("step 1")
    t0 = time.perf_counter()
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    print(f"step 2: {time.perf_counter() - t0:.2f} s", flush=True)
    rss("step 2")


if __name__ == "__main__":
    main()
