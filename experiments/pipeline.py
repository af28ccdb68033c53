"""The whole RLHF pipeline: SFT → reward model → PPO, with DPO and best-of-n beside it.

    python experiments/pipeline.py                      # embedded default (timings: README, Results)
    python experiments/pipeline.py --resume             # after an interruption: finished stages are
                                                        # kept, the interrupted one resumes from its checkpoint
    python experiments/pipeline.py --sft.steps 50 --ppo.iterations 5 --out runs/smoke   # a quick look

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
from rlhf_jax import workflow
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


def _with_run(stage_cfg, out: str, resume: bool):
    return dataclasses.replace(stage_cfg, run=dataclasses.replace(stage_cfg.run, out=out, resume=resume))


def _stage(name: str, folder: str, main, stage_cfg, cfg: PipelineConfig, timings: dict) -> dict:
    done = pathlib.Path(cfg.out) / folder / "eval.json"
    if cfg.resume and done.exists():
        print(f"[pipeline] {name}: finished earlier, kept ({done})", flush=True)
        return json.loads(done.read_text())
    print(f"[pipeline] === {name} ===", flush=True)
    t0 = time.perf_counter()
    result = main(_with_run(stage_cfg, cfg.out, cfg.resume))
    timings[name] = time.perf_counter() - t0
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
    timings["total"] = time.perf_counter() - t0
    report = write_report(pathlib.Path(cfg.out), results, timings)
    print(report.read_text(), flush=True)
    return results


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
    for name, res in results.get("best_of_n", {}).items():
        if isinstance(res, dict) and "gold" in res:
            rows.append({"method": f"best-of-{res['n']}", "gold": res["gold"], "win_rate": res["win_rate"],
                         "kl": res["kl"]})
    return rows


def write_report(out: pathlib.Path, results: dict, timings: dict) -> pathlib.Path:
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
    lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in timings.items()]

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
    if "samples" in ev:
        lines += ["", "## PPO samples (held-out prompts)", "", "| prompt | SFT | PPO |", "|---|---|---|"]
        lines += [f"| {s['prompt'].splitlines()[0][10:]} | {s['reference']} ({s['ref_gold']:.2f}) | "
                  f"{s['response']} ({s['gold']:.2f}) |" for s in ev["samples"][:5]]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    workflow.write_json(out / "results.json", {"table": rows, "rm": rm, "timings": timings})
    return report


# %%
if __name__ == "__main__":
    main(tyro.cli(PipelineConfig))
