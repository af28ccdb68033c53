"""Best-of-n: sample n responses from the SFT policy, keep the one the reward model scores highest.

No training; its KL to the SFT policy is known in closed form, KL = log n − (n − 1)/n, which makes
it the reference point for how much reward each nat of KL buys.

    python experiments/best_of_n.py --n 4 8 16                # after sft.py and reward_model.py
"""
# %%
from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np
import tyro

from rlhf_jax import best_of_n, workflow
from rlhf_jax.data import simulated


@dataclasses.dataclass(frozen=True)
class BestOfNConfig:
    model: workflow.ModelArgs = workflow.ModelArgs()
    """Policy to sample from (default: <run.out>/sft/hf)."""
    reward_model: str | None = None
    """Reward model folder (default: <run.out>/rm/hf)."""
    data: workflow.DataArgs = workflow.DataArgs(num_eval=256, seed=2)
    """Evaluation prompts (simulated held-out prompts by default; --data.eval-path for a file)."""
    run: workflow.RunArgs = workflow.RunArgs()
    sample: workflow.SampleArgs = workflow.SampleArgs()
    n: tuple[int, ...] = (4, 16)
    """Sample counts to evaluate."""
    num_eval_prompts: int = 256


def main(cfg: BestOfNConfig) -> dict:
    mesh, rules = workflow.setup(cfg.run)
    run_dir = pathlib.Path(cfg.run.out)
    model_cfg, params, tokenizer = workflow.load_lm(
        dataclasses.replace(cfg.model, path=cfg.model.path or str(run_dir / "sft" / "hf")))
    reward_cfg, rm_params, _ = workflow.load_reward_model(cfg.reward_model or run_dir / "rm" / "hf", cfg.model)
    prompts = workflow.prompt_texts(workflow.rows_from(cfg.data, "prompt", "eval", simulated.prompt_rows))
    prompts = prompts[:cfg.num_eval_prompts]
    simulated_gold = cfg.data.path is None
    ref_texts, _ = workflow.sample(model_cfg, params, tokenizer, prompts, key=jax.random.key(cfg.run.seed + 1001),
                                   sample_args=cfg.sample, mesh=mesh, rules=rules)
    ref_gold = workflow.gold_eval(prompts, [t[0] for t in ref_texts]) if simulated_gold else None
    results = {}
    for n in cfg.n:
        texts, rollouts = workflow.sample(model_cfg, params, tokenizer, prompts, key=jax.random.key(cfg.run.seed + n),
                                          sample_args=cfg.sample, num_samples=n, mesh=mesh, rules=rules)
        scores_BN = workflow.rm_scores(reward_cfg, rm_params, rollouts)[:len(prompts) * n].reshape(len(prompts), n)
        best_B = np.asarray(best_of_n.best_of_n(scores_BN))
        chosen = [t[i] for t, i in zip(texts, best_B)]
        res = {"n": n, "kl": float(best_of_n.best_of_n_kl(n)), "rm_score": float(scores_BN.max(-1).mean())}
        if simulated_gold:
            gold = workflow.gold_eval(prompts, chosen)
            res.update(gold=float(gold.mean()), ref_gold=float(ref_gold.mean()),
                       win_rate=workflow.win_rate(gold, ref_gold),
                       oracle_gold=float(workflow.gold_eval([p for p in prompts for _ in range(n)],
                                                            [s for t in texts for s in t]).reshape(-1, n).max(-1).mean()))
        results[f"bon_{n}"] = res
        print(f"[best_of_n] n={n}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items() if k != "n"), flush=True)
    out = workflow.stage_dir(cfg.run, "best_of_n")
    workflow.write_json(out / "eval.json", results)
    return results


# %%
if __name__ == "__main__":
    main(tyro.cli(BestOfNConfig))
