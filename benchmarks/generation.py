"""New tokens per second: ``rlhf_jax.rollout.generate`` vs transformers ``generate`` (PyTorch, CPU).

Two presets, both run by default:

- ``embedded``: the embedded default's tiny Llama (hidden 128, 4 layers, 4 heads / 2 KV heads,
  vocabulary 1024, tied embeddings; random weights) at the shape PPO samples it in the pipeline:
  64 prompts of 32 tokens, 48 new tokens.
- ``d256``: a larger Llama (4 layers, d_model 256, MLP 1024, vocabulary 4096; ``--layers``,
  ``--d-model``, ``--vocab`` change it): 16 prompts of 64 tokens, 128 new tokens. Its fp32 weights
  (21 MB) and KV cache (up to 25 MB) no longer fit the caches, so decoding is memory-bound.

Both sides get the same weights (written once with transformers and loaded with
``models.load_pretrained``), the same left-padded prompts, and produce exactly the same number of
new tokens per row (no EOS on our side, ``min_new_tokens = max_new_tokens`` on theirs). Each mode
is run once to warm up (our first call includes compilation, reported separately), then ``--runs``
times, alternating between the two sides; the table gives medians.

    python benchmarks/generation.py                       # both presets, every core on each side
    python benchmarks/generation.py --preset d256 --batch 32 --new-tokens 256
    # the batch split over one XLA CPU device per core (rlhf_jax's data-parallel mesh) against
    # torch's intra-op threads on the same cores
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/generation.py --torch-threads 2

Pinned to one core (``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false taskset -c 0 ...
--torch-threads 1``) the ratios drop to 1.5-1.9x: rlhf_jax then runs 13-27% slower than with
the same flags unpinned (XLA's CPU runtime runs on more threads than the one it computes on), while
single-threaded torch loses nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from rlhf_jax import model_io, models, rollout, sharding

MODES = {  # name -> (temperature, top_k, top_p)
    "greedy": (0.0, None, None),
    "sample T=1": (1.0, None, None),
    "sample top-k 50, top-p 0.9": (1.0, 50, 0.9),
}


PRESETS = {  # name -> (batch, prompt length, new tokens)
    "embedded": (64, 32, 48),
    "d256": (16, 64, 128),
}


def model_config(preset: str, args) -> transformers.LlamaConfig:
    if preset == "embedded":
        config = transformers.AutoConfig.from_pretrained(model_io.embedded_model_dir())
    else:
        config = transformers.LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.d_model,
            intermediate_size=4 * args.d_model,
            num_hidden_layers=args.layers,
            num_attention_heads=args.d_model // 64,
            num_key_value_heads=args.d_model // 64,
            tie_word_embeddings=False,
        )
    config.max_position_embeddings = max(config.max_position_embeddings, args.prompt_len + args.new_tokens)
    config.eos_token_id = None  # no early stop on either side (and no EOS suppression changing theirs)
    return config


def write_checkpoint(out_dir: str, config: transformers.LlamaConfig) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(out_dir)
    return model


def left_padded_prompts(args, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.prompt_len // 2, args.prompt_len + 1, size=args.batch)
    ids = rng.integers(3, vocab, size=(args.batch, args.prompt_len)).astype(np.int32)
    mask = (np.arange(args.prompt_len)[None] >= args.prompt_len - lengths[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, 0), mask


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(ours, theirs, runs: int) -> tuple[float, list[float], list[float]]:
    """Our first call (compile + run), then ``runs`` timings of each side, interleaved so that both
    see the same machine load."""
    first = seconds(ours)
    seconds(theirs)  # warm-up
    ours_s, theirs_s = [], []
    for _ in range(runs):
        ours_s.append(seconds(ours))
        theirs_s.append(seconds(theirs))
    return first, ours_s, theirs_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=[*PRESETS, "all"], default="all")
    parser.add_argument("--layers", type=int, default=4, help="d256 preset")
    parser.add_argument("--d-model", type=int, default=256, help="d256 preset")
    parser.add_argument("--vocab", type=int, default=4096, help="d256 preset")
    parser.add_argument("--batch", type=int, help="default: the preset's")
    parser.add_argument("--prompt-len", type=int, help="default: the preset's")
    parser.add_argument("--new-tokens", type=int, help="default: the preset's")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", help="also write the results (per mode: every run's seconds, medians, ratio) here")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    print(f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, jax devices {jax.device_count()}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; jax {jax.__version__}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    results = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_average": {"start": os.getloadavg()},
               "versions": {"jax": jax.__version__, "torch": torch.__version__,
                            "transformers": transformers.__version__},
               "torch_threads": torch.get_num_threads(), "jax_devices": jax.device_count(), "presets": {}}
    for preset in PRESETS if args.preset == "all" else [args.preset]:
        batch, prompt_len, new_tokens = PRESETS[preset]
        run_args = argparse.Namespace(**{**vars(args), "batch": args.batch or batch,
                                         "prompt_len": args.prompt_len or prompt_len,
                                         "new_tokens": args.new_tokens or new_tokens})
        results["presets"][preset] = compare_preset(preset, run_args)
    results["load_average"]["end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def compare_preset(preset: str, args) -> dict:
    """Prints the preset's table; returns {"shape": ..., "modes": {mode: seconds per run and medians}, ...}."""
    config = model_config(preset, args)
    with tempfile.TemporaryDirectory() as ckpt:
        hf_model = write_checkpoint(ckpt, config)
        cfg, params = models.load_pretrained(ckpt)
    ids_np, mask_np = left_padded_prompts(args, config.vocab_size)
    ids_pt, mask_pt = torch.from_numpy(ids_np).long(), torch.from_numpy(mask_np).long()
    ids_in, mask_in = ids_np, mask_np
    if jax.device_count() > 1:  # batch over a data-parallel mesh of every device, parameters replicated
        mesh = sharding.make_mesh()
        ids_in, mask_in = sharding.shard_batch((ids_np, mask_np), mesh, sharding.DATA_PARALLEL_RULES)
        params = jax.device_put(params, sharding.replicated(mesh))
    R = args.new_tokens
    new_tokens = args.batch * R

    print(f"\n{preset}: Llama {config.num_hidden_layers} layers, hidden {config.hidden_size}, MLP "
          f"{config.intermediate_size}, heads {config.num_attention_heads} / {config.num_key_value_heads} KV, vocab "
          f"{config.vocab_size}; batch {args.batch}, prompt {args.prompt_len} (left-padded), {R} new tokens; "
          f"load average {os.getloadavg()[0]:.2f}")
    out = {"shape": {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "vocab": config.vocab_size,
                     "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": R}, "modes": {}}
    print("| mode | rlhf_jax tok/s | transformers tok/s | speed-up | rlhf_jax compile s |")
    print("|---|---|---|---|---|", flush=True)
    for name, (temperature, top_k, top_p) in MODES.items():
        keys = iter(jax.random.split(jax.random.key(0), args.runs + 1))

        def ours():
            out = rollout.generate(cfg, params, ids_in, mask_in, key=next(keys), max_new_tokens=R,
                                   temperature=temperature, top_k=top_k, top_p=top_p)
            return jax.block_until_ready(out)

        def theirs():
            with torch.inference_mode():
                sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0)
                out = hf_model.generate(
                    input_ids=ids_pt, attention_mask=mask_pt, max_new_tokens=R, min_new_tokens=R,
                    pad_token_id=0, use_cache=True, **(sampling if temperature > 0 else dict(do_sample=False)),
                )
            assert out.shape == (args.batch, args.prompt_len + R), out.shape
            return out

        first, ours_s, theirs_s = compare(ours, theirs, args.runs)
        ours_med, theirs_med = statistics.median(ours_s), statistics.median(theirs_s)
        print(f"| {name} | {new_tokens / ours_med:,.0f} | {new_tokens / theirs_med:,.0f} | "
              f"{theirs_med / ours_med:.1f}x | {first - ours_med:.1f} |", flush=True)
        out["modes"][name] = {"rlhf_jax_s": ours_s, "transformers_s": theirs_s, "rlhf_jax_median_s": ours_med,
                              "transformers_median_s": theirs_med, "ratio": theirs_med / ours_med,
                              "rlhf_jax_compile_s": first - ours_med}

    greedy = rollout.generate(cfg, params, ids_in, mask_in, key=jax.random.key(0), max_new_tokens=R, temperature=0.0)
    with torch.inference_mode():
        hf_greedy = hf_model.generate(input_ids=ids_pt, attention_mask=mask_pt, max_new_tokens=R, min_new_tokens=R,
                                      pad_token_id=0, do_sample=False)
    same = np.asarray(greedy.response_ids_BR) == hf_greedy[:, args.prompt_len:].numpy()
    print(f"greedy tokens identical to transformers: {same.mean():.1%} "
          f"(rows fully identical: {same.all(axis=1).sum()}/{args.batch}); load average now {os.getloadavg()[0]:.2f}")
    out["greedy_identical_fraction"] = float(same.mean())
    return out


if __name__ == "__main__":
    main()
