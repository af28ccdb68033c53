"""The whole RLHF pipeline: SFT → reward model → PPO, with DPO and best-of-n beside it.

    python experiments/pipeline.py                      # embedded default (timings: README, Results)
    python experiments/pipeline.py --resume             # after an interruption: finished stages are
                                                        # kept, the interrupted one resumes from its checkpoint
    python experiments/pipeline.py --sft.steps 50 --ppo.iterations 5 --out runs/smoke   # a quick look
    python experiments/pipeline.py --rounds 3            # iterated: annotate the policy's own samples,
                                                        # retrain the reward model, continue PPO

Every stage is the script of the same name, configured through its own flags (``--ppo.kl.coef 0.1``).
Writes <out>/report.md (results table, plots) next to each stage's folder.
"""
# %%
from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import tyro

import best_of_n
import dpo
import ppo
import reward_model
import sft
from rlhf_jax import defaults, evaluation, workflow
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
    ppo: ppo.PPOConfig = ppo.PPOConfig()
    dpo: dpo.DPOConfig = dpo.DPOConfig()
    bon: best_of_n.BestOfNConfig = best_of_n.BestOfNConfig()
    skip_dpo: bool = False
    skip_best_of_n: bool = False
    rounds: int = 1
    """Rounds of RLHF (embedded default only). Round 1 is SFT → RM → PPO. Each later round samples two
    responses per prompt from the latest policy, lets the simulated annotator compare them, retrains
    the reward model (from SFT) on every comparison so far and continues PPO from the latest policy;
    the KL reference stays the SFT model. Later rounds write <out>/round<r>/."""
    pairs_per_round: int = 2048
    """New comparisons of policy samples per later round (and a quarter as many on held-out prompts,
    on which the retrained reward model's accuracy is measured)."""


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
        workflow.write_json(done, result)
    return result


def main(cfg: PipelineConfig) -> dict:
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    results = {"sft": _stage("SFT", "sft", sft.main, cfg.sft, cfg, timings)}
    results["rm"] = _stage("reward model", "rm", reward_model.main, cfg.rm, cfg, timings)
    results["ppo"] = _stage("PPO", "ppo", ppo.main, cfg.ppo, cfg, timings)
    if not cfg.skip_dpo:
        results["dpo"] = _stage("DPO", "dpo" if cfg.dpo.variant == "dpo" else f"dpo_{cfg.dpo.variant}",
                                dpo.main, cfg.dpo, cfg, timings)
    if not cfg.skip_best_of_n:
        results["best_of_n"] = _stage("best-of-n", "best_of_n", best_of_n.main, cfg.bon, cfg, timings)
    for r in range(2, cfg.rounds + 1):
        results[f"round{r}"] = later_round(cfg, r, timings)
    timings["total"] = time.perf_counter() - t0
    report = write_report(pathlib.Path(cfg.out), results, timings)
    print(report.read_text(), flush=True)
    return results


# --- Iterated RLHF --------------------------------------------------------------------------------


def _round_dir(cfg: PipelineConfig, r: int) -> pathlib.Path:
    return pathlib.Path(cfg.out) if r == 1 else pathlib.Path(cfg.out) / f"round{r}"


def later_round(cfg: PipelineConfig, r: int, timings: dict) -> dict:
    """Round r >= 2: annotate pairs of the latest policy's samples, retrain the RM, continue PPO."""
    if cfg.rm.data.path is not None or cfg.ppo.data.path is not None:
        raise ValueError("--rounds > 1 needs the simulated annotator: it labels the policy's own samples "
                         "(leave --rm.data.path and --ppo.data.path unset)")
    out = _round_dir(cfg, r)
    sft_hf = str(pathlib.Path(cfg.out) / "sft" / "hf")
    policy_hf = str(_round_dir(cfg, r - 1) / "ppo" / "hf")
    t0 = time.perf_counter()
    train_file, eval_file = annotate_policy_samples(cfg, r, policy_hf, out)
    timings[f"round {r}: annotate"] = time.perf_counter() - t0
    eval_pairs = load_source(str(eval_file), "pairwise")
    rm_cfg = dataclasses.replace(cfg.rm, model=dataclasses.replace(cfg.rm.model, path=sft_hf),
                                 data=dataclasses.replace(cfg.rm.data, path=str(train_file), eval_path=str(eval_file)))
    rm = _stage(f"round {r}: reward model", "rm", reward_model.main, rm_cfg, cfg, timings, out=str(out))
    rm["agreement_ceiling"] = simulated.Annotator().agreement_ceiling([p.prompt for p in eval_pairs],
                                                                      [(p.chosen, p.rejected) for p in eval_pairs])
    # the reward model PPO used so far, on the same held-out pairs: what retraining gained
    rm["previous_rm_accuracy"] = rm_pair_accuracy(str(_round_dir(cfg, r - 1) / "rm" / "hf"), eval_pairs, cfg)
    ppo_cfg = dataclasses.replace(cfg.ppo, model=dataclasses.replace(cfg.ppo.model, path=policy_hf), reference=sft_hf,
                                  reward_model=str(out / "rm" / "hf"))
    return {"rm": rm, "ppo": _stage(f"round {r}: PPO", "ppo", ppo.main, ppo_cfg, cfg, timings, out=str(out))}


def annotate_policy_samples(cfg: PipelineConfig, r: int, policy_hf: str, out: pathlib.Path
                            ) -> tuple[pathlib.Path, pathlib.Path]:
    """Write <out>/comparisons.jsonl: round 1's comparisons, every later round's up to r (pairs of
    that round's starting policy's samples on fresh train prompts, ordered by the simulated annotator),
    and <out>/comparisons_eval.jsonl: this round's pairs on held-out prompts. Returns the two files."""
    import jax

    train_file, eval_file = out / "comparisons.jsonl", out / "comparisons_eval.jsonl"
    new_file = out / "new_comparisons.jsonl"
    if not (cfg.resume and train_file.exists() and eval_file.exists()):
        model_cfg, params, tokenizer = workflow.load_lm(dataclasses.replace(cfg.ppo.model, path=policy_hf))
        draws = iter(range(1 << 20))
        # the iterated rounds sample simulated prompts: PPO's auto sampling fields for this model
        sample_args = defaults.resolve(cfg.ppo, "ppo", kind=defaults.model_kind(model_cfg), printer=None).sample

        def policy_sampler(prompts, k):  # k distinct responses per prompt when 2k samples have them
            texts, _ = workflow.sample(model_cfg, params, tokenizer, prompts, num_samples=2 * k,
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


def rm_pair_accuracy(rm_hf: str, pairs: list, cfg: PipelineConfig) -> float:
    """Share of ``pairs`` (``PairRow``s, e.g. from ``load_source``) on which the reward model at
    ``rm_hf`` scores chosen above rejected."""
    import jax
    import numpy as np

    from rlhf_jax import steps
    from rlhf_jax.data import collate_pairs, encode

    model_cfg, rm_params, tokenizer = workflow.load_reward_model(rm_hf, cfg.rm.model)
    max_len = reward_model.resolve_config(cfg.rm, model_cfg, tokenizer, pairs).max_len
    batch = collate_pairs(encode(pairs, tokenizer, max_len=max_len), pad_id=tokenizer.pad_token_id, length=max_len)
    score = jax.jit(steps.reward_scores, static_argnums=0)
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
        if (key == "ppo" or key.startswith("dpo")) and "gold" in res:
            rows.append({"method": key.upper().replace("_", " "), "gold": res["gold"], "win_rate": res["win_rate"],
                         "kl": res["kl"]})
    for key, res in results.items():
        if key.startswith("round") and "gold" in res.get("ppo", {}):
            rows.append({"method": f"PPO round {key[5:]}", "gold": res["ppo"]["gold"],
                         "win_rate": res["ppo"]["win_rate"], "kl": res["ppo"]["kl"]})
    for name, res in results.get("best_of_n", {}).items():
        if isinstance(res, dict) and "gold" in res:
            rows.append({"method": f"best-of-{res['n']}", "gold": res["gold"], "win_rate": res["win_rate"],
                         "kl": res["kl"]})
    return rows


def write_report(out: pathlib.Path, results: dict, timings: dict, peaks: dict | None = None) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results_table(results)
    rm = results.get("rm", {})
    lines = ["# RLHF pipeline report", "", f"Run folder: `{out}`", "",
             "| method | gold score | win rate vs SFT (gold judge) | KL to SFT (nats) |", "|---|---|---|---|"]
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
                      + f"; annotator agreement ceiling {res['rm']['agreement_ceiling']:.1%}"]
    peaks = PEAK_MEMORY if peaks is None else peaks
    lines += ["", "| stage | seconds | peak memory (GiB) |", "|---|---|---|"] + [
        f"| {k} | {v:.0f} | {f'{peaks[k]:.2f}' if k in peaks else '-'} |" for k, v in timings.items()]

    if rows:
        fig, ax = plt.subplots(figsize=(5, 4))
        for r in rows:
            ax.scatter(r["kl"], r["gold"], s=40)
            ax.annotate(r["method"], (r["kl"], r["gold"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("KL to SFT (nats)")
        ax.set_ylabel("gold score (held-out prompts)")
        ax.set_title("Gold score against KL")
        fig.tight_layout()
        fig.savefig(out / "gold_vs_kl.png", dpi=120)
        plt.close(fig)
        lines += ["", "![gold score against KL](gold_vs_kl.png)"]

    curves = [("sft", "sft/loss", "SFT loss"), ("rm", "rm/accuracy", "RM train accuracy"),
              ("ppo", "rollout/score", "PPO: RM score"), ("ppo", "rollout/gold", "PPO: gold score"),
              ("ppo", "rollout/kl", "PPO: KL to SFT"), ("dpo", "dpo/accuracy", "DPO: implicit-reward accuracy")]
    available = [(s, k, t, [m for m in read_metrics(out / s) if k in m]) for s, k, t in curves]
    available = [c for c in available if c[3]]
    if available:
        fig, axes = plt.subplots(1, len(available), figsize=(3.2 * len(available), 3))
        for ax, (_, key, title, metrics) in zip(list(getattr(axes, "flat", [axes])), available):
            ax.plot([m["step"] for m in metrics], [m[key] for m in metrics])
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(out / "training_curves.png", dpi=110)
        plt.close(fig)
        lines += ["", "![training curves](training_curves.png)"]
    ev = results.get("ppo", {})
    if ev.get("samples"):
        lines += ["", "## PPO samples (held-out prompts)", "",
                  evaluation.comparison_table(ev, policy="PPO", reference="SFT", max_rows=5)]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    rm_rounds = {key: res["rm"] for key, res in results.items() if key.startswith("round") and "rm" in res}
    workflow.write_json(out / "results.json", {"table": rows, "rm": rm, "rm_rounds": rm_rounds, "timings": timings})
    return report


# %%
if __name__ == "__main__":
    main(tyro.cli(PipelineConfig))
