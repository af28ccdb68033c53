"""Does a PPO iteration of a Qwen2.5-0.5B-shaped model with LoRA fit on this machine, and how fast is it?

    python benchmarks/qwen_shape_ppo.py                          # without and with --model.remat
    python benchmarks/qwen_shape_ppo.py --remat off --out /tmp/qwen_shape_ppo
    python benchmarks/qwen_shape_ppo.py --tiny                   # same path on a 2-layer, 64-wide Qwen2

Random weights in Qwen2.5-0.5B-Instruct's architecture (qwen2: hidden 896, MLP 4864, 24 layers,
14 query / 2 KV heads (head_dim 64), q/k/v biases, vocabulary 151,936 rows, 32,768 positions,
RoPE θ 1e6, RMSNorm ε 1e-6, tied embeddings: 494M parameters, 1.98 GB in float32). Nothing is
downloaded:

1. ``<cache>/policy``: ``config.json`` + ``model.safetensors`` written by ``models.save_pretrained``
   from a numpy draw (one leaf at a time, N(0, 0.02²) kernels and embeddings, unit norm scales, zero
   biases), plus the embedded tokenizer of ``rlhf_jax.data.embedded`` (1,024 ids, all < 151,936;
   bos/eos/pad in config.json are its ids, not Qwen's). With random weights any tokenizer is as good
   as Qwen's, and responses never stop at EOS, so every rollout runs the full ``--new-tokens``.
2. ``<cache>/rm``: the reward model PPO scores with, in ``model_io.save_reward_model``'s layout
   (the same backbone + ``reward_head.safetensors``, a random head with lm-human-preferences' scale
   1/sqrt(D+1)), i.e. what ``experiments/reward_model.py`` exports as ``rm/hf``.
3. ``experiments/ppo.py`` in its own process (so its peak is its own), LoRA rank 8, α 16 on all seven
   projections, on the simulated prompts:

       --lora.rank 8 --lora.alpha 16 --lora.targets all --iterations 2 --rollout-prompts 8 --epochs 1
       --num-minibatches 2 --sample.max-new-tokens 32 --eval-every 0 --data.num-train 32 [--model.remat]

   and reads back its own figures like ``benchmarks/memory.py``: ``memory/peak_rss_gib`` from eval.json
   (the process's high-water mark over the whole stage: loading policy and reward model, rollout,
   scoring, PPO update, checkpoint, merged HF + PEFT export) and ``perf/iteration_s`` from
   metrics.jsonl (the first iteration compiles; the figure is the median of the later ones). Each run
   gets a fresh XLA compile cache, so its first iteration includes compilation.

While the stage runs, this script also samples the child's RSS every 0.5 s and tags each sample with
the child's last printed line, so a run that dies (out of memory: return code -9) still says how far it
got and how much it held there (``rss_by_phase`` in the JSON, the full timeline in ``<run>/rss.tsv``
and the child's output in ``<run>/ppo.log``).

Results: a Markdown table on stdout and ``<out>/qwen_shape_ppo.json``. The checkpoints (2 x 2 GB) go to
``--cache`` (default under /tmp) and are reused when their config matches; each run's merged export
(another 2 GB) is deleted after the figures are read unless ``--keep``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PPO = ROOT / "experiments" / "ppo.py"

QWEN25_05B = {  # Qwen/Qwen2.5-0.5B-Instruct config.json (architecture fields)
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "hidden_act": "silu", "initializer_range": 0.02, "use_sliding_window": False,
}
TINY = {**QWEN25_05B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}  # same vocabulary (the logits are a large share of the work)


def _hf_config(tiny: bool, tokenizer) -> dict:
    return {**(TINY if tiny else QWEN25_05B), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def write_checkpoints(cache: pathlib.Path, tiny: bool, seed: int = 0) -> tuple[pathlib.Path, pathlib.Path, dict]:
    """``cache/policy`` (random-weight Qwen2 + tokenizer) and ``cache/rm`` (same backbone + head);
    reused when ``cache/spec.json`` says they were written for the same config and seed."""
    import numpy as np
    import transformers

    from rlhf_jax import model_io, models
    from rlhf_jax.data import embedded

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(embedded.embedded_dir()))
    hf_config = _hf_config(tiny, tokenizer)
    spec = {"config": hf_config, "seed": seed}
    policy, rm = cache / "policy", cache / "rm"
    done = cache / "spec.json"
    if done.exists() and json.loads(done.read_text()) == spec:
        print(f"[qwen_shape] reusing {policy} and {rm}", flush=True)
        return policy, rm, hf_config
    shutil.rmtree(cache, ignore_errors=True)
    cfg = models.ModelConfig.from_hf_config(hf_config, source="Qwen2.5-0.5B-Instruct config")
    rng = np.random.default_rng(seed)
    params = {}
    for path, s in models.param_specs(cfg).items():  # one leaf at a time: no 2 GB draw + split copies
        if s.init == "normal":
            leaf = rng.standard_normal(s.shape, dtype=np.float32)
            leaf *= np.float32(cfg.initializer_range)
        else:
            leaf = (np.ones if s.init == "ones" else np.zeros)(s.shape, np.float32)
        params[path] = leaf
    from flax import traverse_util

    params = traverse_util.unflatten_dict(params, sep="/")
    n = sum(x.size for x in traverse_util.flatten_dict(params).values())
    print(f"[qwen_shape] {n / 1e6:.1f}M parameters ({4 * n / 1e9:.2f} GB float32): writing {policy}", flush=True)
    tokenizer.model_max_length = hf_config["max_position_embeddings"]
    t0 = time.perf_counter()
    model_io.export_lm(policy, cfg, params, tokenizer)
    d = cfg.d_model
    head = {"kernel": rng.standard_normal((d,), dtype=np.float32) / np.float32(np.sqrt(d + 1)),
            "bias": np.zeros((), np.float32)}
    model_io.save_reward_model(rm, cfg, {"backbone": params, "head": head}, tokenizer)
    print(f"[qwen_shape] wrote both in {time.perf_counter() - t0:.0f} s", flush=True)
    # what transformers reads back: the Qwen2 architecture asked for
    read = transformers.AutoConfig.from_pretrained(str(policy))
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
        if getattr(read, key) != hf_config[key]:
            raise AssertionError(f"{policy}/config.json reads back {key}={getattr(read, key)!r}, wanted {hf_config[key]!r}")
    theta = (getattr(read, "rope_parameters", None) or {}).get("rope_theta", getattr(read, "rope_theta", None))
    if theta != hf_config["rope_theta"]:
        raise AssertionError(f"{policy}/config.json reads back rope_theta={theta!r}")
    done.write_text(json.dumps(spec, indent=2) + "\n")
    return policy, rm, hf_config


def _rss_gib(pid: int) -> float | None:
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError):
        return None
    return None


def _phase(line: str) -> str:
    """A stable name for the stage of the run a printed line announces ("[ppo] ...", "step 1 ...")."""
    line = line.strip()
    if line.startswith("["):
        return line[: line.find("]") + 1] + " " + " ".join(line[line.find("]") + 1:].split()[:3])
    return " ".join(line.split()[:2])


def _dir_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_ppo(policy: pathlib.Path, rm: pathlib.Path, out: pathlib.Path, *, remat: bool, args) -> dict:
    folder = out / ("remat" if remat else "no_remat")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cmd = [sys.executable, str(PPO), "--model.path", str(policy), "--reward-model", str(rm),
           "--lora.rank", str(args.rank), "--lora.alpha", str(2 * args.rank), "--lora.targets", "all",
           "--iterations", str(args.iterations), "--rollout-prompts", str(args.prompts), "--epochs", "1",
           "--num-minibatches", "2", "--sample.max-new-tokens", str(args.new_tokens), "--eval-every", "0",
           "--data.num-train", "32", "--run.out", str(folder), "--run.compile-cache", str(folder / "jax_cache"),
           "--run.save-every", str(args.iterations), *(["--model.remat"] if remat else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("XLA_FLAGS", None)
    print(f"[qwen_shape] {' '.join(cmd)}", flush=True)
    log = open(folder / "ppo.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    phase = ["start"]
    samples: list[tuple[float, float, str]] = []

    def sample():
        while proc.poll() is None:
            rss = _rss_gib(proc.pid)
            if rss is not None:
                samples.append((time.perf_counter() - t0, rss, phase[0]))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stdout:
        log.write(f"{time.perf_counter() - t0:8.1f}\t{line}")
        log.flush()
        if line.strip() and not line.startswith(" "):
            phase[0] = _phase(line)
        if args.verbose:
            print("   ", line, end="", flush=True)
    rc = proc.wait()
    sampler.join()
    log.close()
    wall = time.perf_counter() - t0
    with open(folder / "rss.tsv", "w") as f:
        f.write("seconds\trss_gib\tphase\n")
        f.writelines(f"{t:.1f}\t{r:.3f}\t{p}\n" for t, r, p in samples)
    by_phase: dict[str, float] = {}
    for _, r, p in samples:
        by_phase[p] = max(by_phase.get(p, 0.0), r)
    row = {"mode": "LoRA + remat" if remat else "LoRA", "remat": remat, "returncode": rc, "wall_s": round(wall, 1),
           "sampled_peak_rss_gib": round(max((r for _, r, _ in samples), default=0.0), 3),
           "rss_by_phase": {p: round(r, 3) for p, r in by_phase.items()}, "command": cmd, "run": str(folder)}
    if rc:
        tail = (folder / "ppo.log").read_text().splitlines()[-30:]
        row.update(error="\n".join(tail), last_phase=phase[0])
        print(f"[qwen_shape] {row['mode']}: exit {rc} after {wall:.0f} s in phase {phase[0]!r}, sampled peak RSS "
              f"{row['sampled_peak_rss_gib']:.2f} GiB" + (" (killed: out of memory?)" if rc == -9 else ""), flush=True)
        print("\n".join(tail), flush=True)
        return row
    stage = folder / "ppo"
    result = json.loads((stage / "eval.json").read_text())
    metrics = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    its = [m["perf/iteration_s"] for m in metrics if "perf/iteration_s" in m]
    gen = [m["perf/gen_tokens_per_s"] for m in metrics if "perf/gen_tokens_per_s" in m]
    checkpoints = sorted((p for p in (stage / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    row.update({"peak_rss_gib": result["memory/peak_rss_gib"], "iteration_s": its,
                "checkpoint_mb": _dir_bytes(checkpoints[-1]) / 1e6 if checkpoints else None,
                "perf/iteration_s": statistics.median(its[1:] or its), "gen_tokens_per_s": gen,
                "peft_mb": _dir_bytes(stage / "peft") / 1e6 if (stage / "peft").exists() else None})
    if not args.keep:
        shutil.rmtree(stage / "hf", ignore_errors=True)  # the merged export: 2 GB
        shutil.rmtree(folder / "jax_cache", ignore_errors=True)
    print(f"[qwen_shape] {json.dumps({k: v for k, v in row.items() if k not in ('command', 'rss_by_phase')})}",
          flush=True)
    return row


def _commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--remat", choices=["both", "off", "on"], default="both")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide Qwen2 (same vocabulary): a quick check")
    parser.add_argument("--cache", default=None, help="checkpoint folder (default /tmp/qwen_shape_ckpt[_tiny])")
    parser.add_argument("--out", default=None, help="run folder (default /tmp/qwen_shape_ppo[_tiny])")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8, help="--rollout-prompts")
    parser.add_argument("--new-tokens", type=int, default=32, help="--sample.max-new-tokens")
    parser.add_argument("--keep", action="store_true", help="keep each run's merged HF export")
    parser.add_argument("--verbose", action="store_true", help="echo the PPO runs' output")
    args = parser.parse_args(argv)
    suffix = "_tiny" if args.tiny else ""
    cache = pathlib.Path(args.cache or f"/tmp/qwen_shape_ckpt{suffix}").resolve()
    out = pathlib.Path(args.out or f"/tmp/qwen_shape_ppo{suffix}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().astimezone()
    policy, rm, hf_config = write_checkpoints(cache, args.tiny)
    rows = [run_ppo(policy, rm, out, remat=remat, args=args)
            for remat in {"both": (False, True), "off": (False,), "on": (True,)}[args.remat]]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    report = {"model": "Qwen2.5-0.5B-Instruct architecture, random weights" if not args.tiny else "tiny Qwen2",
              "config": hf_config, "policy": str(policy), "reward_model": str(rm),
              "settings": {"lora_rank": args.rank, "lora_alpha": 2 * args.rank, "lora_targets": "all",
                           "iterations": args.iterations, "rollout_prompts": args.prompts, "epochs": 1,
                           "num_minibatches": 2, "max_new_tokens": args.new_tokens, "dtype": "float32"},
              "started": started.isoformat(timespec="seconds"),
              "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "commit": _commit(), "machine": {"cpus": os.cpu_count(), "memory_gib": round(mem, 1),
                                               "platform": platform.platform()},
              "runs": rows}
    print(f"\n{report['model']}: PPO with LoRA rank {args.rank} (all projections), {args.prompts} prompts x "
          f"{args.new_tokens} new tokens, 1 epoch x 2 minibatches, float32\n")
    print("| mode | peak RSS (GiB) | iteration (s, median after the first) | first iteration (s, compiles) "
          "| whole run (s) | checkpoint (MB) | PEFT adapter (MB) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if r["returncode"]:
            print(f"| {r['mode']} | failed (exit {r['returncode']}) in {r['last_phase']!r}, sampled RSS "
                  f"{r['sampled_peak_rss_gib']:.2f} | - | - | {r['wall_s']:.0f} | - | - |")
        else:
            print(f"| {r['mode']} | {r['peak_rss_gib']:.2f} | {r['perf/iteration_s']:.1f} | {r['iteration_s'][0]:.1f} "
                  f"| {r['wall_s']:.0f} | {r['checkpoint_mb']:.1f} | {r['peft_mb']:.1f} |")
    (out / "qwen_shape_ppo.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out / 'qwen_shape_ppo.json'}")
    return report


if __name__ == "__main__":
    main()
