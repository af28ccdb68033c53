"""Training-step throughput of our decoder vs transformers' PyTorch Llama, same weights and shapes.

    python benchmarks/model_throughput.py             # Llama-style, 4 layers, d 256, seq 256, batch 8
    taskset -c 0 python benchmarks/model_throughput.py   # one core each (steadier on a shared machine)

One step = forward + backward of the mean next-token cross-entropy (no optimizer update), written
the idiomatic way on both sides: labels shifted left and padded with an ignored last position
(as transformers' ``ForCausalLMLoss``), so neither side copies a sliced logits tensor. Both sides
start from the same random transformers checkpoint (loaded into JAX with ``models.load_pretrained``)
and their losses are printed side by side. JAX is timed twice, layers scanned (the default) and
unrolled. Each variant runs ``warmup`` untimed steps, then the median of ``steps`` timed steps is
reported as tokens/s (wall clock), next to the CPU time per step; JAX compile time is separate.
PyTorch uses ``torch.set_num_threads(cores available to the process)`` and its default attention
(SDPA); XLA uses the same cores.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers
import tyro

from rlhf_jax import models


@dataclasses.dataclass
class Args:
    layers: int = 4
    """Decoder blocks."""
    d_model: int = 256
    """Residual width."""
    heads: int = 4
    """Query heads."""
    kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    mlp_dim: int = 688
    """SwiGLU hidden units (~8/3 · d_model, Llama's ratio)."""
    vocab: int = 8192
    """Vocabulary size."""
    seq: int = 256
    """Tokens per row."""
    batch: int = 8
    """Rows per step."""
    warmup: int = 2
    """Untimed steps per side after compilation."""
    steps: int = 7
    """Timed steps per side (the median is reported)."""
    remat: bool = False
    """JAX: rematerialise each layer in the backward pass."""
    threads: int = len(os.sched_getaffinity(0))
    """PyTorch intra-op threads (default: the cores this process may use)."""


def _median_step_seconds(step, warmup: int, steps: int) -> tuple[float, float]:
    """Median wall-clock and CPU seconds of one step."""
    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.mlp_dim,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq), tie_word_embeddings=False)
    torch_model = transformers.LlamaForCausalLM(hf_config).train()
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        cfg, params = models.load_pretrained(tmp, remat=args.remat)
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
    tokens = args.batch * args.seq
    print(f"shape: {args.layers} layers, d_model {args.d_model}, heads {args.heads}/{args.kv_heads}, mlp {args.mlp_dim}, "
          f"vocab {args.vocab}, batch {args.batch} x seq {args.seq}; fp32; {len(os.sched_getaffinity(0))} cores "
          f"available, torch threads {args.threads}, torch attention {torch_model.config._attn_implementation}")

    # --- JAX: labels_BT = ids shifted left, last position weighted 0.
    ids_jax, mask_jax = jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32)
    labels_jax = jnp.pad(ids_jax[:, 1:], ((0, 0), (0, 1)))
    weights_jax = jnp.ones(ids.shape, jnp.float32).at[:, -1].set(0.0)
    for scan_layers in (True, False):
        variant = dataclasses.replace(cfg, scan_layers=scan_layers)

        def loss_fn(params, ids_BT, mask_BT, labels_BT, weights_BT, variant=variant):
            logits_BTV = models.forward(variant, params, ids_BT, mask_BT)
            ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, labels_BT)
            return jnp.sum(ce_BT * weights_BT) / jnp.sum(weights_BT)

        batch = (ids_jax, mask_jax, labels_jax, weights_jax)
        start = time.perf_counter()
        train_step = jax.jit(jax.value_and_grad(loss_fn)).lower(params, *batch).compile()
        compile_s = time.perf_counter() - start
        jax_loss = float(train_step(params, *batch)[0])
        jax_s, jax_cpu = _median_step_seconds(lambda: jax.block_until_ready(train_step(params, *batch)),
                                              args.warmup, args.steps)
        print(f"jax {jax.__version__} scan_layers={scan_layers!s:5} remat={cfg.remat}: compile {compile_s:5.2f} s, "
              f"step {jax_s * 1e3:6.1f} ms (cpu {jax_cpu * 1e3:6.1f} ms), {tokens / jax_s:8,.0f} tokens/s, loss {jax_loss:.6f}")
        if scan_layers:
            jax_scan_s = jax_s

    # --- PyTorch: transformers' ForCausalLMLoss convention (ignore_index=-100 on the padded label).
    ids_torch = torch.as_tensor(ids, dtype=torch.long)
    labels_torch = torch.nn.functional.pad(ids_torch[:, 1:], (0, 1), value=-100).reshape(-1)

    def torch_step() -> float:
        torch_model.zero_grad(set_to_none=True)
        logits = torch_model(input_ids=ids_torch).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, args.vocab), labels_torch, ignore_index=-100)
        loss.backward()
        return loss.item()

    torch_loss = torch_step()
    torch_s, torch_cpu = _median_step_seconds(torch_step, args.warmup, args.steps)
    print(f"torch {torch.__version__}:                          step {torch_s * 1e3:6.1f} ms (cpu {torch_cpu * 1e3:6.1f} ms), "
          f"{tokens / torch_s:8,.0f} tokens/s, loss {torch_loss:.6f}")
    print(f"ratio jax/torch tokens/s (median of {args.steps} steps after {args.warmup} warm-up): "
          f"scanned {torch_s / jax_scan_s:.2f}x, unrolled {torch_s / jax_s:.2f}x")


if __name__ == "__main__":
    main(tyro.cli(Args))
