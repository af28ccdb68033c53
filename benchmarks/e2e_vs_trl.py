"""End to end, process start to exit: a short SFT / reward-model / DPO run of rlhf_jax's scripts against TRL doing
the same work, cold and warm, with ratios and a split of where rlhf_jax's time goes.

TRL lives in its own venv, never the project's (torch first, or pip pulls a CUDA build of several GB):

    python3 -m venv /tmp/trlvenv && . /tmp/trlvenv/bin/activate && pip install torch==2.13.0 && pip install trl peft accelerate datasets

then, from the repository root, in the project's venv (13 minutes on the shared 2-core CPU machine at load 4-5):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/e2e_vs_trl.py
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/e2e_vs_trl.py --repeats 5 --stages sft dpo --out /tmp/bench_e2e

The work, the same on both sides: the embedded default's tiny Llama (hidden 128, 4 layers, vocabulary 1024), fp32
weights and compute, AdamW (rlhf_jax's learning rate, betas and weight decay for that model; gradient clipping 1.0),
``--steps`` (30) steps of ``--batch-size`` (8) rows (reward model / DPO: pairs) padded to ``--max-len`` (96, the
embedded default; every row fits, so nothing is truncated), no evaluation, then a resumable checkpoint of the last
step (rlhf_jax: orbax, params + optimizer state; TRL: the Trainer's checkpoint, model + optimizer + scheduler + RNG)
and the model in Hugging Face layout (rlhf_jax: ``hf/``; TRL: ``save_model``).

- SFT starts on both sides from the same random init: ``models.init_params(cfg, key(0))``, which
  ``experiments/sft.py`` (no ``--model.path``) builds itself (inside ``jit``; equal to the eager init within 1e-8)
  and which the setup exports once for TRL (``init_hf/``).
- Reward model and DPO start from one SFT export made in the setup by ``experiments/sft.py`` with the same flags
  (``start/sft/hf``), given to both sides (``--model.path`` / TRL's ``model=``). DPO's reference is a second copy
  of it on both sides.
- Data: the simulated annotator's rows the scripts generate with ``--data.num-train 64 --data.num-eval 16`` (seeds
  0 for SFT, 1 for pairs), tokenized for TRL by ``benchmarks/memory_trl.py``'s ``_prepare_data`` (rlhf_jax's
  ``encode``: chat template, EOS-terminated completions) and handed to TRL as token ids. So rlhf_jax's timed
  process also generates, tokenizes and (16 held-out rows) encodes its data, while TRL's reads finished token ids.

Runs, interleaved, ``--repeats`` (3) times, each stage in turn: rlhf_jax **cold** (a new, empty JAX compile cache:
``RLHF_JAX_COMPILE_CACHE=<new dir>``), TRL, rlhf_jax **warm** (the same cache again), TRL again (TRL has no compile
cache: both its runs are kept, "TRL 1st" / "TRL 2nd", and pooled for the ratios). Each run is its own process
timed by ``subprocess`` from start to exit; ``os.getloadavg()`` is recorded before and after every run and the whole
benchmark. Before timing, one untimed run per side (the SFT that makes the starting model; one TRL SFT) loads both
venvs' files into the page cache. Ratios are TRL time / rlhf_jax time (> 1: rlhf_jax faster), as medians of all
runs, with the min-max of the ratios of adjacent pairs (cold: the TRL run right after a cold rlhf_jax run / that
run; warm: likewise).

The split: after the timed runs, one cold and one warm (``--split``; the warm ones are left out if they would take
the benchmark past ``--max-minutes``, the cold ones always run) rlhf_jax run of each script under
``python -X importtime`` and a small launcher (this file, ``--split-child``) that runs the script with
``runpy`` and times the library functions the script calls (``tyro.cli``, ``cli.setup``, ``model_io.load_lm``,
data building, ``train_loop`` with its first step blocked on, ``checkpoint.save``, the HF export) plus JAX's
compile events (count, seconds, persistent cache hits), so the phases add up to the process's wall time;
``-X importtime``'s self times, summed by top-level package, say which packages the imports spend on. TRL's split
comes from marks its script takes in every timed run (``e2e_trl_side.py``).

Results: Markdown tables on stdout and ``benchmarks/results/e2e_vs_trl_<date>.json`` (``--json`` to change); the run
folders under ``--out`` (default ``/tmp/bench_e2e``, emptied first).

Threads: TRL runs on one torch thread by default (``--trl-threads 1``; ``0`` gives torch's default, one per core),
rlhf_jax on XLA's defaults. This project's machine is shared and usually busy (load 3-5 on 2 cores), and there
torch's OpenMP threads thrash: with two threads TRL's SFT took 27 s for steps 2-30 against 6 s with one (load
4.7), and whole TRL runs ranged from 10 to 151 s within one benchmark (2026-12-07, kept as
``results/e2e_vs_trl_2026-12-07_torch2threads.json``; that run took 26.5 minutes). XLA's threads did not
(``--xla_cpu_multi_thread_eigen=false`` changed rlhf_jax's SFT by < 5%). On an idle machine ``--trl-threads 0``
is the fairer setting.

Note: this machine's environment sets ``PYTHONDONTWRITEBYTECODE=1``, so rlhf_jax's own modules (an editable
install) are compiled from source at every start (~0.2 s), while both venvs' site-packages hold pip's ``.pyc``.
The benchmark leaves the environment as it finds it.
"""
from __future__ import annotations

import time

_T_PROCESS = time.time()  # the split child's first mark (interpreter start-up is before it)

import argparse
import datetime
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
HERE = pathlib.Path(__file__).resolve().parent
STAGES = ("sft", "rm", "dpo")
SCRIPTS = {"sft": "sft.py", "rm": "reward_model.py", "dpo": "dpo.py"}
NAMES = {"sft": "SFT", "rm": "reward model", "dpo": "DPO"}
NUM_TRAIN, NUM_EVAL = 64, 16  # memory_trl.py's DATA: the rows its _prepare_data tokenizes


# ---------------------------------------------------------------------------------------------------------------
# setup (untimed): the init export and the token ids for TRL, in a subprocess of the project venv


def _prepare(out: str) -> None:
    sys.path[:0] = [str(ROOT), str(HERE)]
    import memory_trl

    from rlhf_jax import model_io
    from rlhf_jax.cli import ModelArgs

    cfg, params, tokenizer = model_io.load_lm(ModelArgs())  # init_params(cfg, key(0)): what sft.py starts from
    model_io.export_lm(pathlib.Path(out) / "init_hf", cfg, params, tokenizer)
    assert memory_trl.DATA["sft"][3:] == memory_trl.DATA["pairs"][3:] == (NUM_TRAIN, NUM_EVAL), memory_trl.DATA
    memory_trl._prepare_data(str(pathlib.Path(out) / "init_hf"), str(pathlib.Path(out) / "data.json"))


def rlhf_flags(stage: str, args, run_out: pathlib.Path, start: pathlib.Path | None) -> list[str]:
    flags = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-len", str(args.max_len),
             "--eval-every", "0", "--data.num-train", str(NUM_TRAIN), "--data.num-eval", str(NUM_EVAL),
             "--run.out", str(run_out), "--run.save-every", str(args.steps)]
    flags += {"sft": ["--num-eval-samples", "0"], "rm": ["--normalize-samples", "0"],
              "dpo": ["--num-eval-prompts", "0"]}[stage]
    if stage != "sft":
        flags += ["--model.path", str(start)]
    return flags


def child_env(cache: pathlib.Path | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's plain run
    env.pop("RLHF_JAX_COMPILE_CACHE", None)
    if cache is not None:
        env["RLHF_JAX_COMPILE_CACHE"] = str(cache)
    return env


def timed(cmd: list[str], env: dict, log: pathlib.Path) -> dict:
    """Run ``cmd`` to exit; wall seconds from just before the process is created to just after it is reaped."""
    load_before = os.getloadavg()
    t_start, t0 = time.time(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    t_end = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    return {"wall_s": wall, "t_start": t_start, "t_end": t_end, "load_before": load_before,
            "load_after": os.getloadavg(), "stderr": proc.stderr}


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = pathlib.Path(args.out).resolve()
        self.trl_python = args.trl_python
        self.start = self.out / "start" / "sft" / "hf"

    def rlhf(self, stage: str, name: str, cache: pathlib.Path, launcher: list[str] | None = None) -> dict:
        run_out = self.out / "runs" / name
        if run_out.exists():
            shutil.rmtree(run_out)
        script = ROOT / "experiments" / SCRIPTS[stage]
        prefix = launcher or [sys.executable]
        cmd = [*prefix, str(script), *rlhf_flags(stage, self.args, run_out, self.start)]
        result = timed(cmd, child_env(cache), self.out / "logs" / f"{name}.txt")
        if not (run_out / stage / "hf" / "config.json").exists() or not (run_out / stage / "checkpoints").is_dir():
            raise SystemExit(f"{name}: no checkpoint or hf/ export under {run_out / stage}")
        return result

    def trl(self, stage: str, name: str) -> dict:
        run_out = self.out / "runs" / name
        if run_out.exists():
            shutil.rmtree(run_out)
        model = self.out / "init_hf" if stage == "sft" else self.start
        cmd = [self.trl_python, str(HERE / "e2e_trl_side.py"), stage, "--model", str(model),
               "--data", str(self.out / "data.json"), "--out", str(run_out), "--steps", str(self.args.steps),
               "--batch-size", str(self.args.batch_size), "--max-len", str(self.args.max_len)]
        if self.args.trl_threads:
            cmd += ["--threads", str(self.args.trl_threads)]
        result = timed(cmd, child_env(), self.out / "logs" / f"{name}.txt")
        side = json.loads((run_out / "timings.json").read_text())
        expected = [[self.args.batch_size * (1 if stage == "sft" else 2), self.args.max_len]]
        if side["batch_shapes"] != expected or side["steps"] != self.args.steps or not side["checkpoint"]:
            raise SystemExit(f"{name}: TRL did other work than asked: {side}")
        result["marks"], result["versions"] = side["marks"], side["versions"]
        return result


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(s: dict) -> str:
    return f"{s['median']:.1f} s ({s['min']:.1f}–{s['max']:.1f})"


def trl_split(run: dict) -> dict:
    m = run["marks"]
    return {"interpreter start": m["start"] - run["t_start"], "imports": m["imports"] - m["start"],
            "model, tokenizer, data, Trainer": m["trainer"] - m["imports"],
            "first step": m["first_step"] - m["trainer"], "remaining steps": m["last_step"] - m["first_step"],
            "checkpoint": m["checkpoint"] - m["last_step"], "other in train()": m["train"] - m["checkpoint"],
            "export (save_model)": m["saved"] - m["train"], "exit": run["t_end"] - m["saved"]}


def importtime_top(stderr: str, top: int = 8) -> list[tuple[str, float]]:
    """Import seconds by top-level package, from ``-X importtime``: the self time of every module of the package
    (at any depth of nesting), so each module's own execution counts once, for the package it belongs to."""
    totals: dict[str, float] = {}
    for line in stderr.splitlines():
        parts = line[len("import time:"):].split("|") if line.startswith("import time:") else []
        if len(parts) != 3 or not parts[0].strip().isdigit():  # not an importtime line, or its header
            continue
        root = parts[2].strip().split(".")[0]
        totals[root] = totals.get(root, 0.0) + int(parts[0]) / 1e6
    return sorted(totals.items(), key=lambda kv: -kv[1])[:top]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=96)
    parser.add_argument("--trl-python", default="/tmp/trlvenv/bin/python")
    parser.add_argument("--trl-threads", type=int, default=1,
                        help="torch.set_num_threads on the TRL side; 0: torch's default, one thread per core (see the "
                             "docstring: on a busy machine torch's threads thrash)")
    parser.add_argument("--split", default="both", choices=["both", "cold", "none"],
                        help="instrumented rlhf_jax runs for the time split, per script: cold and warm, cold, none")
    parser.add_argument("--max-minutes", type=float, default=14.5,
                        help="no warm split runs if they would end the benchmark later than this")
    parser.add_argument("--out", default="/tmp/bench_e2e")
    parser.add_argument("--json", help="default: benchmarks/results/e2e_vs_trl_<date>.json")
    args = parser.parse_args(argv)
    if not pathlib.Path(args.trl_python).exists():
        raise SystemExit(f"no {args.trl_python}: make TRL's venv first (see this file's docstring)")
    bench = Bench(args)
    out = bench.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t_bench = time.perf_counter()
    started = datetime.datetime.now().astimezone()
    load_start = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "rlhf_jax", "experiments"],
                           cwd=ROOT, capture_output=True, text=True).stdout.split("\n")
    dirty = [line[3:] for line in dirty if line.strip()]
    print(f"[e2e] {started.isoformat(timespec='seconds')}, commit {commit}"
          f"{f' + uncommitted edits in {len(dirty)} files of rlhf_jax/ and experiments/' if dirty else ''}; "
          f"load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)

    # setup, untimed: init export + token ids for TRL; the SFT export RM and DPO start from; one TRL warm-up
    proc = subprocess.run([sys.executable, __file__, "--prepare", str(out)], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"setup failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    data = json.loads((out / "data.json").read_text())
    longest = max(data["max_len"]["sft"], data["max_len"]["rm"])
    if longest > args.max_len:
        raise SystemExit(f"rows up to {longest} tokens do not fit --max-len {args.max_len}: raise it")
    (out / "cache_setup").mkdir()
    setup = {"rlhf_sft_start": bench.rlhf("sft", "setup_rlhf_sft", out / "cache_setup")["wall_s"]}
    shutil.move(str(out / "runs" / "setup_rlhf_sft"), str(out / "start"))
    setup["trl_sft_warmup"] = bench.trl("sft", "setup_trl_sft")["wall_s"]
    print(f"[e2e] setup: rlhf_jax SFT (starting model) {setup['rlhf_sft_start']:.1f} s, TRL SFT warm-up "
          f"{setup['trl_sft_warmup']:.1f} s; {time.perf_counter() - t_bench:.0f} s so far", flush=True)

    runs: dict[str, dict[str, list[dict]]] = {s: {"rlhf_cold": [], "rlhf_warm": [], "trl_1st": [], "trl_2nd": []}
                                              for s in args.stages}
    for rep in range(args.repeats):
        for stage in args.stages:
            cache = out / "caches" / f"{stage}_{rep}"
            cache.mkdir(parents=True)
            for key in ("rlhf_cold", "trl_1st", "rlhf_warm", "trl_2nd"):  # interleaved: rlhf_jax, TRL, rlhf_jax, TRL
                name = f"{stage}_{rep}_{key}"
                result = bench.rlhf(stage, name, cache) if key.startswith("rlhf") else bench.trl(stage, name)
                result.pop("stderr")
                runs[stage][key].append(result)
            r = runs[stage]
            print(f"[e2e] repeat {rep + 1}/{args.repeats} {stage}: rlhf_jax cold {r['rlhf_cold'][-1]['wall_s']:.1f} s, "
                  f"TRL {r['trl_1st'][-1]['wall_s']:.1f} s, rlhf_jax warm {r['rlhf_warm'][-1]['wall_s']:.1f} s, "
                  f"TRL {r['trl_2nd'][-1]['wall_s']:.1f} s (load {os.getloadavg()[0]:.2f}; "
                  f"{time.perf_counter() - t_bench:.0f} s so far)", flush=True)

    # the split: one cold and one warm instrumented rlhf_jax run of each script (fewer if over --max-minutes)
    splits: dict[str, dict] = {}
    modes = {"both": ["cold", "warm"], "cold": ["cold"], "none": []}[args.split]
    elapsed = time.perf_counter() - t_bench
    while len(modes) > 1 and elapsed + sum(statistics.median(x["wall_s"] for x in runs[s][f"rlhf_{m}"])
                                  for s in args.stages for m in modes) > 60 * args.max_minutes:
        modes = modes[:-1]
        print(f"[e2e] --max-minutes {args.max_minutes}: split runs only {modes}", flush=True)
    if modes:
        for stage in args.stages:
            cache = out / "caches" / f"{stage}_split"
            cache.mkdir(parents=True)
            for mode in modes:
                marks = out / "splits" / f"{stage}_{mode}.json"
                marks.parent.mkdir(parents=True, exist_ok=True)
                launcher = [sys.executable, "-X", "importtime", __file__, "--split-child", str(marks)]
                result = bench.rlhf(stage, f"{stage}_split_{mode}", cache, launcher=launcher)
                child = json.loads(marks.read_text())
                phases = {"interpreter start": child["t_launch"] - result["t_start"], **child["phases"],
                          "exit": result["t_end"] - child["t_runpy_end"]}
                splits[f"{stage}_{mode}"] = {"wall_s": result["wall_s"], "phases": phases,
                                             "compiles": child["compiles"],
                                             "imports_by_package": importtime_top(result["stderr"]),
                                             "load_before": result["load_before"], "load_after": result["load_after"]}
        print(f"[e2e] split runs done; {time.perf_counter() - t_bench:.0f} s so far", flush=True)

    load_end = os.getloadavg()
    elapsed = time.perf_counter() - t_bench
    table = []
    for stage in args.stages:
        r = runs[stage]
        wall = {k: [x["wall_s"] for x in v] for k, v in r.items()}
        trl_all = wall["trl_1st"] + wall["trl_2nd"]
        s = {k: summary(v) for k, v in wall.items()}
        s["trl_all"] = summary(trl_all)
        cold_pairs = [t / c for t, c in zip(wall["trl_1st"], wall["rlhf_cold"], strict=True)]
        warm_pairs = [t / w for t, w in zip(wall["trl_2nd"], wall["rlhf_warm"], strict=True)]
        row = {"stage": stage, "wall": s,
               "ratio_cold": {"of_medians": s["trl_all"]["median"] / s["rlhf_cold"]["median"],
                              "paired_min": min(cold_pairs), "paired_max": max(cold_pairs)},
               "ratio_warm": {"of_medians": s["trl_all"]["median"] / s["rlhf_warm"]["median"],
                              "paired_min": min(warm_pairs), "paired_max": max(warm_pairs)},
               "trl_split_median": {k: statistics.median(trl_split(x)[k] for x in r["trl_1st"] + r["trl_2nd"])
                                    for k in trl_split(r["trl_1st"][0])}}
        table.append(row)

    versions = runs[args.stages[0]]["trl_1st"][0]["versions"]
    import_versions = subprocess.run([sys.executable, "-c", "import jax, flax, optax, orbax.checkpoint as o; "
                                      "print(jax.__version__, flax.__version__, optax.__version__, o.__version__)"],
                                     capture_output=True, text=True).stdout.split()
    print(f"\n## End to end, process start to exit: {args.steps} steps, batch {args.batch_size} (pairs for RM / DPO), "
          f"length {args.max_len}, fp32, tiny Llama\n")
    stack = ", ".join(f"{n} {v}" for n, v in zip(("jax", "flax", "optax", "orbax"), import_versions, strict=False))
    print(f"{started.date()}, commit {commit}{' (+ uncommitted edits)' if dirty else ''}; rlhf_jax on {stack}; "
          f"TRL {versions['trl']}, "
          f"transformers {versions['transformers']}, torch {versions['torch']} (torch threads: {versions['threads']}; "
          f"rlhf_jax: XLA's default); "
          f"{args.repeats} interleaved repeats, median (min–max).\n")
    print("| stage | rlhf_jax cold | rlhf_jax warm | TRL 1st | TRL 2nd | TRL / rlhf_jax cold | TRL / rlhf_jax warm |")
    print("|---|---|---|---|---|---|---|")
    for row in table:
        s, c, w = row["wall"], row["ratio_cold"], row["ratio_warm"]
        print(f"| {NAMES[row['stage']]} | {fmt(s['rlhf_cold'])} | {fmt(s['rlhf_warm'])} | {fmt(s['trl_1st'])} | "
              f"{fmt(s['trl_2nd'])} | **{c['of_medians']:.2f}×** ({c['paired_min']:.2f}–{c['paired_max']:.2f}) | "
              f"**{w['of_medians']:.2f}×** ({w['paired_min']:.2f}–{w['paired_max']:.2f}) |")
    print(f"\nRatios: median of all {2 * args.repeats} TRL runs / median of rlhf_jax's; in brackets the min–max of "
          f"adjacent pairs. > 1: rlhf_jax faster.")
    print(f"Load average (1/5/15 min): {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f} at the start, "
          f"{load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f} at the end; per run (1 min) "
          f"{min(x['load_before'][0] for r in runs.values() for v in r.values() for x in v):.2f}–"
          f"{max(x['load_before'][0] for r in runs.values() for v in r.values() for x in v):.2f}. "
          f"Benchmark wall {elapsed / 60:.1f} min.")
    if max(load_start[0], load_end[0]) > 1.5 and versions["threads"] > 1:
        print("The machine was busy and torch ran several threads: they slow down several-fold when other processes "
              "hold the cores, so these TRL times are inflated; the default --trl-threads 1 avoids that.")

    if splits:
        cols = [f"{s}_{m}" for s in args.stages for m in modes]
        print("\n## Where rlhf_jax's time goes (one instrumented run each, seconds)\n")
        print("| phase | " + " | ".join(f"{NAMES[c.rsplit('_', 1)[0]]} {c.rsplit('_', 1)[1]}" for c in cols) + " |")
        print("|---|" + "---|" * len(cols))
        for phase in splits[cols[0]]["phases"]:
            print(f"| {phase} | " + " | ".join(f"{splits[c]['phases'][phase]:.2f}" for c in cols) + " |")
        print("| **total (process wall)** | " + " | ".join(f"**{splits[c]['wall_s']:.2f}**" for c in cols) + " |")
        comp = {c: splits[c]["compiles"] for c in cols}
        first = {c: comp[c]["by_phase"].get("first step (compile + run)", [0, 0.0]) for c in cols}
        print("| XLA compiles: count / s (cache hits) | " + " | ".join(
            f"{comp[c]['count']} / {comp[c]['seconds']:.2f} ({comp[c]['cache_hits']})" for c in cols) + " |")
        print("| of which in the first step | " + " | ".join(f"{first[c][0]} / {first[c][1]:.2f}" for c in cols) + " |")
        print("\nImports by package (``-X importtime`` self times of each package's modules, cold runs): " + "; ".join(
            f"{NAMES[s]}: " + ", ".join(f"{k} {v:.2f}" for k, v in splits[f"{s}_cold"]["imports_by_package"][:6])
            for s in args.stages))
    print("\n## Where TRL's time goes (medians of its timed runs, seconds)\n")
    print("| phase | " + " | ".join(NAMES[row["stage"]] for row in table) + " |")
    print("|---|" + "---|" * len(table))
    for phase in table[0]["trl_split_median"]:
        print(f"| {phase} | " + " | ".join(f"{row['trl_split_median'][phase]:.2f}" for row in table) + " |")

    result = {"started": started.isoformat(timespec="seconds"), "commit": commit, "uncommitted_files": dirty,
              "command": " ".join([os.path.relpath(sys.executable, ROOT), *sys.argv]) if argv is None else argv,
              "settings": {k: getattr(args, k) for k in ("stages", "repeats", "steps", "batch_size", "max_len",
                                                         "trl_python", "trl_threads", "split", "max_minutes")}
              | {"split_modes_run": modes},
              "work": {"model": "embedded tiny Llama (hidden 128, 4 layers, vocab 1024)", "dtype": "float32",
                       "num_train": NUM_TRAIN, "num_eval": NUM_EVAL, "lengths_of_data": data["max_len"]},
              "versions": {"trl_side": versions, "rlhf_jax_side": import_versions},
              "load_average": {"start": load_start, "end": load_end}, "benchmark_wall_s": elapsed, "setup_s": setup,
              "table": table, "runs": runs, "splits": splits}
    path = pathlib.Path(args.json) if args.json else HERE / "results" / f"e2e_vs_trl_{started.date()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n[e2e] wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return result


# ---------------------------------------------------------------------------------------------------------------
# the split child: runs an experiment script with runpy and times what it calls


def _split_child(marks_path: str, script: str, script_args: list[str]) -> None:
    import functools
    import runpy

    t_launch = _T_PROCESS
    sys.path[0] = str(pathlib.Path(script).resolve().parent)  # as `python script.py` has it (not benchmarks/)
    import jax
    import tyro

    from rlhf_jax import checkpoint, cli, model_io, trainer  # patched below
    from rlhf_jax.data import sources
    from rlhf_jax.trainable import Trainable

    phases: dict[str, float] = {}
    marks: dict[str, float] = {}
    stack: list[str] = []
    compiles = {"count": 0, "seconds": 0.0, "cache_hits": 0, "by_phase": {}}
    BEFORE, TRAIN, AFTER = "before training, other", "remaining steps", "after training, other"
    where = {"now": "imports"}

    def current() -> str:
        return stack[-1] if stack else where["now"]

    def on_duration(event: str, duration: float, **unused) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles["count"] += 1
            compiles["seconds"] += duration
            entry = compiles["by_phase"].setdefault(current(), [0, 0.0])
            entry[0] += 1
            entry[1] += duration

    def on_event(event: str, **unused) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            compiles["cache_hits"] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)

    def phase(name: str, fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            if stack:  # nested inside another timed phase: counted there
                return fn(*a, **kw)
            stack.append(name)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
                stack.pop()
        return wrapper

    original_cli = tyro.cli

    def timed_cli(*a, **kw):
        marks["imports_done"] = time.time()
        where["now"] = "cli"
        try:
            return original_cli(*a, **kw)
        finally:
            marks["main"] = time.time()
            where["now"] = BEFORE

    tyro.cli = timed_cli
    cli.setup = phase("setup (compile cache, mesh)", cli.setup)
    model_io.load_lm = phase("model + tokenizer load", model_io.load_lm)
    for name in ("rows_from", "encode_rows"):
        setattr(sources, name, phase("data (generate, tokenize)", getattr(sources, name)))
    trainer.held_out_eval = phase("data (generate, tokenize)", trainer.held_out_eval)
    checkpoint.save = phase("checkpoint (orbax)", checkpoint.save)
    trainer.open_checkpoints = phase("checkpoint (orbax)", trainer.open_checkpoints)
    Trainable.export = phase("export (hf/)", Trainable.export)
    Trainable.save_adapters = phase("export (hf/)", Trainable.save_adapters)
    model_io.save_reward_model = phase("export (hf/)", model_io.save_reward_model)
    original_loop = trainer.train_loop

    def timed_loop(**kw):
        step_fn, calls = kw["step_fn"], [0]

        def first_step_blocked(state, batch):
            calls[0] += 1
            if calls[0] > 1:
                return step_fn(state, batch)
            stack.append("first step (compile + run)")
            t = time.perf_counter()
            try:
                return jax.block_until_ready(step_fn(state, batch))
            finally:
                phases["first step (compile + run)"] = time.perf_counter() - t
                stack.pop()

        marks["loop_start"] = time.time()
        where["now"] = TRAIN
        try:
            return original_loop(**{**kw, "step_fn": first_step_blocked})
        finally:
            marks["loop_end"] = time.time()
            where["now"] = AFTER

    trainer.train_loop = timed_loop
    sys.argv = [script, *script_args]
    runpy.run_path(script, run_name="__main__")
    t_end = time.time()
    # phases as parts of the wall time: the timed functions, and the gaps between them
    before = marks["loop_start"] - marks["main"] - sum(phases.get(k, 0.0) for k in (
        "setup (compile cache, mesh)", "model + tokenizer load", "data (generate, tokenize)"))
    ckpt_open_save = phases.get("checkpoint (orbax)", 0.0)
    loop = marks["loop_end"] - marks["loop_start"]
    after = t_end - marks["loop_end"] - phases.get("export (hf/)", 0.0)
    ordered = {"imports": marks["imports_done"] - t_launch, "cli (tyro)": marks["main"] - marks["imports_done"],
               "setup (compile cache, mesh)": phases.get("setup (compile cache, mesh)", 0.0),
               "model + tokenizer load": phases.get("model + tokenizer load", 0.0),
               "data (generate, tokenize)": phases.get("data (generate, tokenize)", 0.0),
               BEFORE + " (optimizer, state, step builders)": before,
               "first step (compile + run)": phases["first step (compile + run)"],
               TRAIN: loop - phases["first step (compile + run)"] - ckpt_open_save,
               "checkpoint (orbax)": ckpt_open_save,
               "export (hf/)": phases.get("export (hf/)", 0.0), AFTER: after}
    pathlib.Path(marks_path).write_text(json.dumps({"t_launch": t_launch, "t_runpy_end": t_end, "phases": ordered,
                                                    "compiles": compiles, "marks": marks}, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--split-child":
        _split_child(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--prepare":
        _prepare(sys.argv[2])
    else:
        main()
