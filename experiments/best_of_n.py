"""Best-of-n: sample n responses from the SFT policy, keep the one the reward model scores highest.

No training; its KL to the SFT policy is known in closed form, KL = log n − (n − 1)/n, which makes
it the reference point for how much reward each nat of KL buys.

    python experiments/best_of_n.py --n 4 8 16                # after sft.py and reward_model.py

Writes <run.out>/best_of_n/: eval.json (per n: the figures of rlhf_jax.evaluation against the SFT
policy's own samples, the same reference samples PPO and DPO are compared with), metrics (step = n)
and samples.md.
"""
# %%
from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np
import tyro

from rlhf_jax import best_of_n, cli, defaults, evaluation, memory, model_io, trainer
from rlhf_jax.data import sources
from rlhf_jax.data import encode_prompts, simulated
from rlhf_jax.logging import MetricsLogger


STAGE = "best_of_n"


@dataclasses.dataclass(frozen=True)
class BestOfNConfig:
    model: cli.ModelArgs = cli.ModelArgs()
    """Policy to sample from (default: <run.out>/sft/hf)."""
    reward_model: str | None = None
    """Reward model folder (default: <run.out>/rm/hf)."""
    reward_ensemble: tuple[str, ...] = ()
    """Reward model folders of an ensemble instead (Coste et al. 2023: reward_model.py runs with different
    --run.seed): samples are ranked by the members' scores combined by --ensemble-rule (rlhf_jax.ensemble)."""
    ensemble_rule: str = "mean"
    """How --reward-ensemble's scores combine (rlhf_jax.registry.ENSEMBLE_RULES): mean, worst (min over
    members) or uwo (mean − λ · variance over members)."""
    ensemble_uwo_lambda: float = 0.5
    """λ of --ensemble-rule uwo (0.5: the default of Coste et al.'s best-of-n code)."""
    data: cli.DataArgs = cli.DataArgs(num_eval=256, seed=2)
    """Evaluation prompts: simulated held-out prompts by default; --data.eval-path, or the held-out split
    of --data.path (--data.eval-fraction: the same prompts ppo.py evaluates on)."""
    run: cli.RunArgs = cli.RunArgs()
    sample: cli.SampleArgs = cli.SampleArgs()
    """Sampling; max_prompt_len / max_new_tokens None: auto (see rlhf_jax.defaults; embedded 32, 48)."""
    n: tuple[int, ...] = (4, 16)
    """Sample counts to evaluate."""
    num_eval_prompts: int = 256
    curve_n: int = 0
    """N > 0: also draw N samples on each of --curve-prompts prompts and write the best-of-n curve for n = 1, 2,
    4, ..., N (proxy = reward model, gold on the embedded default, against the analytic KL; Gao et al.'s unbiased
    estimator, rlhf_jax.overoptimisation) to eval.json's "curve". 0 = no curve."""
    curve_prompts: int = 64
    """Held-out prompts of the best-of-n curve (the first of the evaluation prompts)."""


def main(cfg: BestOfNConfig) -> dict:
    with memory.PeakRSS() as peak:
        result, out, stage = _main(cfg)
    return trainer.record_peak_memory(stage, peak, result, out)


def _main(cfg: BestOfNConfig):
    mesh, rules = cli.setup(cfg.run)
    run_dir = pathlib.Path(cfg.run.out)
    model_cfg, params, tokenizer = model_io.load_lm(
        dataclasses.replace(cfg.model, path=cfg.model.path or str(run_dir / "sft" / "hf")))
    if cfg.reward_ensemble and cfg.reward_model:
        raise ValueError("best_of_n: --reward-model and --reward-ensemble both given: pass one (a single model is a "
                         "one-member --reward-ensemble)")
    reward = evaluation.load_reward_model(cfg.reward_ensemble or cfg.reward_model or run_dir / "rm" / "hf", cfg.model,
                                          tokenizer, rule=cfg.ensemble_rule, uwo_lambda=cfg.ensemble_uwo_lambda)
    eval_rows = sources.rows_from(cfg.data, "prompt", "eval", simulated.prompt_rows)[:cfg.num_eval_prompts]
    cfg = resolve_config(cfg, model_cfg, tokenizer, eval_rows)
    prompts = sources.prompt_texts(eval_rows)
    if not prompts:
        raise ValueError("best_of_n: no evaluation prompts: pass --data.eval-path, or --data.path with "
                         "--data.eval-fraction > 0 (its held-out split, the prompts PPO is evaluated on)")
    simulated_gold = cfg.data.path is None
    # the reference samples of every method's evaluation (ppo.py / dpo.py: key run.seed + 1000 + 1)
    reference, _ = evaluation.sample_model(model_cfg, params, tokenizer, prompts, key=jax.random.key(cfg.run.seed + 1001),
                                           sample_args=cfg.sample, reward=reward, mesh=mesh, rules=rules)
    out = cli.stage_dir(cfg.run, "best_of_n")
    results = {}
    with MetricsLogger(out, stage="best_of_n", resume_from=0) as logger, \
            evaluation.open_samples_file(out / "samples.md", resume_from=0) as samples_md:
        for n in cfg.n:
            samples, _ = evaluation.sample_model(model_cfg, params, tokenizer, prompts,
                                                 key=jax.random.key(cfg.run.seed + n), sample_args=cfg.sample,
                                                 reward=reward, num_samples=n, mesh=mesh, rules=rules)
            scores_BN = samples.rm_scores.reshape(len(prompts), n)
            best_B = np.asarray(best_of_n.best_of_n(scores_BN))
            chosen = samples.take(np.arange(len(prompts)) * n + best_B)
            res = {"n": n, **evaluation.compare(prompts, chosen, reference, kl=float(best_of_n.best_of_n_kl(n)),
                                                gold=simulated_gold)}
            if simulated_gold:
                res["oracle_gold"] = float(evaluation.gold_eval([p for p in prompts for _ in range(n)],
                                                              samples.texts).reshape(-1, n).max(-1).mean())
            results[f"bon_{n}"] = res
            logger.log(n, evaluation.scalars({k: v for k, v in res.items() if k != "n"}),
                       print_keys=evaluation.PRINT_KEYS)
            table = evaluation.comparison_table(res, policy=f"best-of-{n}", reference="SFT")
            samples_md.write(f"## step {n} (best-of-{n}, held-out prompts)\n\n{table}\n\n")
            logger.text(n, "eval_samples", table)
            print(f"[best_of_n] n={n}: {evaluation.summary(res)}", flush=True)
    if cfg.curve_n:
        results["curve"] = best_of_n_curve(cfg, model_cfg, params, tokenizer, prompts[:cfg.curve_prompts], reward,
                                           gold=simulated_gold, mesh=mesh, rules=rules)
    trainer.write_json(out / "eval.json", results)
    return results, out, "best_of_n"


def best_of_n_curve(cfg: BestOfNConfig, model_cfg, params, tokenizer, prompts, reward, *, gold: bool, mesh=None,
                    rules=None) -> list[dict]:
    """N = ``cfg.curve_n`` samples per prompt, scored by the reward model (and gold), as the best-of-n curve for
    n = 1, 2, 4, ..., N (rlhf_jax.overoptimisation.best_of_n_curve). Generation batches hold <= 2048 rows."""
    from rlhf_jax import overoptimisation

    N = cfg.curve_n
    sample_args = dataclasses.replace(cfg.sample, batch_size=max(1, min(len(prompts), 2048 // N)))
    samples, _ = evaluation.sample_model(model_cfg, params, tokenizer, prompts, key=jax.random.key(cfg.run.seed + 7919),
                                         sample_args=sample_args, reward=reward, num_samples=N, mesh=mesh, rules=rules)
    proxy_PN = samples.rm_scores.reshape(len(prompts), N)
    gold_PN = (evaluation.gold_eval([p for p in prompts for _ in range(N)], samples.texts).reshape(len(prompts), N)
               if gold else None)
    ns = [2 ** k for k in range(int(np.log2(N)) + 1)] + ([N] if N & (N - 1) else [])
    curve = overoptimisation.best_of_n_curve(proxy_PN, gold_PN, ns)
    for row in curve:
        print(f"[best_of_n] curve n={row['n']}: KL {row['kl']:.2f}, proxy {row['proxy']:+.3f}"
              + (f", gold {row['gold']:+.3f}" if "gold" in row else ""), flush=True)
    return curve


def resolve_config(cfg: BestOfNConfig, model_cfg, tokenizer, train_rows) -> BestOfNConfig:
    """``cfg`` with its auto fields filled for this model and data (rlhf_jax.defaults)."""
    kind = defaults.model_kind(model_cfg)
    facts = {}
    if kind == "pretrained" and (defaults.unresolved(cfg, STAGE)):
        facts = defaults.data_facts(prompts=encode_prompts(train_rows, tokenizer, max_len=model_cfg.max_position_embeddings), model_cfg=model_cfg)
    return defaults.resolve(cfg, STAGE, kind=kind, facts=facts)


# %%
if __name__ == "__main__":
    main(tyro.cli(BestOfNConfig))
