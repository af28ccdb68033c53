# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Reward over-optimisation, measured as Gao et al. measure it, and what a reward-model ensemble does to it
#
# A reward model is a learned **proxy** of what the annotators want. Optimised hard enough, a policy finds what the
# proxy over-rates: the proxy score keeps rising while the true (**gold**) score peaks and falls. Gao et al. 2022
# ("Scaling Laws for Reward Model Overoptimization") measure this as curves: gold and proxy score, relative to the
# initial policy, against the distance d = √KL(π ‖ π_init), and fit
#
#     R_bon(d) = d (α_bon − β_bon d)          best-of-n, whose KL is analytic: KL_bon(n) = log n − (n − 1)/n
#     R_rl(d)  = d (α_rl − β_rl log d)        RL (PPO)
#
# Coste et al. 2023 ("Reward Model Ensembles Help Mitigate Overoptimization") score with an ensemble of reward models
# trained from different seeds and optimise a conservative combination: the **worst case** (min over members) or
# the uncertainty-weighted mean (mean − λ·variance).
#
# The embedded default makes this measurable: its simulated annotator has a gold scorer beside the learned reward
# model. This notebook runs the pipeline's `--preset overoptimise` (`experiments/pipeline.py`): SFT, a reward model,
# then PPO **without a KL penalty** (β = 0) evaluated on held-out prompts every few iterations, best-of-n for
# n = 1, 2, 4, …, and the same PPO and best-of-n judged by the worst case of three reward models (two more trained
# with run seeds 1 and 2: other head initialisations and batch orders). Everything is the library's: the pipeline
# writes `results.json["overoptimisation"]` (points, fits, peaks; `rlhf_jax.overoptimisation`) and this notebook
# reads it.
#
# Budget: `RLHF_JAX_NOTEBOOK_BUDGET=default` (about 8 minutes on a 2-core CPU: the budget of the test suite's
# `--preset overoptimise` check, so the figures below are the ones in the README) or `small` (seconds, for the
# tests; the numbers then mean nothing). The SFT model and the first reward model are trained once per budget into
# `RLHF_JAX_NOTEBOOK_CACHE` (default `~/.cache/rlhf_jax/notebooks`) and reused; everything after them runs each time.

# %%
import contextlib
import fcntl
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # the stages' progress bars; their log goes to a file below

import matplotlib.pyplot as plt
import numpy as np

import rlhf_jax
from rlhf_jax import overoptimisation
from rlhf_jax.best_of_n import best_of_n_kl

ROOT = pathlib.Path(rlhf_jax.__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))  # the stage scripts and the pipeline, imported as modules
import pipeline

BUDGET = os.environ.get("RLHF_JAX_NOTEBOOK_BUDGET", "default")
BUDGETS = {  # command-line flags of experiments/pipeline.py on top of --preset overoptimise
    "small": {
        "models": ["--sft.steps", "10", "--sft.batch-size", "8", "--sft.eval-every", "10", "--sft.num-eval-samples", "0",
                   "--rm.steps", "6", "--rm.batch-size", "8", "--rm.eval-every", "6", "--rm.normalize-samples", "16",
                   "--rm.data.num-train", "256", "--rm.data.num-eval", "32"],
        "rest": ["--ppo.iterations", "3", "--ppo.rollout-prompts", "8", "--ppo.num-minibatches", "2", "--ppo.epochs", "1",
                 "--ppo.eval-every", "1", "--ppo.num-eval-prompts", "8", "--ppo.optim.learning-rate", "3e-4",
                 "--bon.n", "2", "--bon.num-eval-prompts", "8", "--bon.curve-n", "4", "--bon.curve-prompts", "8"],
    },
    "default": {
        "models": ["--sft.steps", "160", "--sft.eval-every", "160", "--sft.num-eval-samples", "0",
                   "--rm.steps", "120", "--rm.eval-every", "120", "--rm.normalize-samples", "128",
                   "--rm.data.num-train", "3840", "--rm.data.num-eval", "256"],
        "rest": ["--ppo.iterations", "24", "--ppo.rollout-prompts", "32", "--ppo.eval-every", "3",
                 "--ppo.num-eval-prompts", "64", "--ppo.optim.learning-rate", "3e-4", "--ppo.run.save-every", "100",
                 "--bon.n", "4", "--bon.num-eval-prompts", "32", "--bon.curve-n", "64", "--bon.curve-prompts", "32"],
    },
}
B = BUDGETS[BUDGET]
plt.rcParams["figure.dpi"] = 72  # small embedded images (the committed .ipynb stays small)
CACHE = pathlib.Path(os.environ.get("RLHF_JAX_NOTEBOOK_CACHE", "~/.cache/rlhf_jax/notebooks")).expanduser()
MODELS = CACHE / f"overoptimisation-{BUDGET}"
print(f"budget {BUDGET}\nflags: --preset overoptimise {' '.join(B['models'] + B['rest'])}\nmodels in {MODELS}")

# %% [markdown]
# ## Best-of-n's KL is analytic
#
# Best-of-n draws n responses from π and keeps the one the reward model scores highest. For a continuous score
# its KL to π is exactly log n − (n − 1)/n, whatever π is (Stiennon et al. 2020, appendix; Gao et al. §2.2). A
# check on a categorical π with 400 outcomes and distinct scores: draw the best of n many times and average
# log π_bon(y) − log π(y), with π_bon(y) = F(y)ⁿ − F(y⁻)ⁿ exact (`overoptimisation.monte_carlo_best_of_n_kl`).
# With many outcomes, each of small probability, the discrete KL approaches the continuous formula.

# %%
rng = np.random.default_rng(0)
probs_K = rng.dirichlet(np.full(400, 50.0))
scores_K = rng.permutation(400).astype(float)
for n in (2, 4, 16, 64):
    mc, se = overoptimisation.monte_carlo_best_of_n_kl(probs_K, scores_K, n, 20_000, rng)
    print(f"n = {n:3d}: analytic KL {best_of_n_kl(n):.4f}   Monte-Carlo {mc:.4f} +- {se:.4f} (standard error)")


# %% [markdown]
# ## The SFT model and the first reward model (trained once, cached)
#
# The pipeline's first two stages: `experiments/sft.py` (the tiny Llama learns the support-reply template from
# mixed-quality demonstrations) and `experiments/reward_model.py` (Bradley–Terry on the simulated annotator's
# comparisons, normalised so SFT samples score mean 0, std 1). A lock lets several kernels share the folder.

# %%
@contextlib.contextmanager
def locked(path: pathlib.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def config(out: pathlib.Path, flags: list[str]) -> pipeline.PipelineConfig:
    """What ``python experiments/pipeline.py --preset overoptimise --out OUT --resume FLAGS`` runs."""
    return pipeline.cli(["--preset", "overoptimise", "--out", str(out), "--resume", *flags])


def logged(out: pathlib.Path, main, stage_cfg) -> float:
    """``main(stage_cfg)`` in this kernel, its log in OUT/pipeline.log; returns the seconds it took."""
    t0 = time.perf_counter()
    with open(out / "pipeline.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        main(stage_cfg)
    return time.perf_counter() - t0


with locked(CACHE / f"overoptimisation-{BUDGET}.lock"):
    if not (MODELS / "rm" / "eval.json").exists():  # the pipeline's first two stages: --stop-after rm
        shutil.rmtree(MODELS, ignore_errors=True)
        MODELS.mkdir(parents=True)
        seconds = logged(MODELS, pipeline.main, config(MODELS, [*B["models"], "--stop-after", "rm"]))
        print(f"trained the SFT and reward models in {seconds:.0f} s")
rm_eval = json.loads((MODELS / "rm" / "eval.json").read_text())
print(f"reward model: held-out accuracy {rm_eval['accuracy']:.3f} (the annotator's own agreement ceiling "
      f"{rm_eval['agreement_ceiling']:.3f})")

# %% [markdown]
# ## PPO without a KL penalty, best-of-n, and both again judged by the worst of three reward models
#
# A fresh run folder starts from copies of the cached SFT and reward model; `--resume` keeps them, and the pipeline
# runs the rest of the preset: PPO (β = 0), best-of-n, two more reward models (seeds 1 and 2) at the first one's
# budget, then PPO and best-of-n judged by the worst case of the three. Each PPO run is evaluated every few iterations
# on the same held-out prompts: gold and proxy against SFT's samples there, and the Monte-Carlo KL(π ‖ π_SFT).

# %%
RUN = pathlib.Path(tempfile.mkdtemp(prefix="overoptimisation-"))
for stage in ("sft", "rm"):
    shutil.copytree(MODELS / stage, RUN / stage, ignore=shutil.ignore_patterns("checkpoints"))
seconds = logged(RUN, pipeline.main, config(RUN, [*B["models"], *B["rest"]]))
results = json.loads((RUN / "results.json").read_text())
curves = results["overoptimisation"]
print(f"ran in {seconds:.0f} s: {', '.join(curves)}")

# %% [markdown]
# ## The curves
#
# Every held-out evaluation of each PPO run and each n of best-of-n: KL, then proxy and gold **relative to the SFT
# model's samples** on the same prompts (so the SFT model is the point (0, 0, 0)). Best-of-n's points are Gao et al.'s
# unbiased estimate for every n ≤ N from N samples per prompt (`overoptimisation.best_of_n_curve`).

# %%
def show_points(name: str) -> None:
    c = curves[name]
    unit = "n" if c["form"] == "bon" else "iteration"
    print(f"{name} ({c['form']}):")
    print(f"| {unit} | KL (nats) | d | proxy | gold |\n|---|---|---|---|---|")
    for p in c["points"]:
        print(f"| {p['step']} | {p['kl']:.2f} | {p['d']:.3f} | {p['proxy']:+.3f} | {p['gold']:+.3f} |")
    print()


for name in curves:
    show_points(name)

# %% [markdown]
# ## Gao et al.'s fits, peaks and ends
#
# Per method, least-squares fits of R(d) to the gold and to the proxy points (`overoptimisation.fit_gao`), the gold
# peak and the last point. Over-optimisation shows as a gold peak inside the run with the proxy still rising after it.

# %%
print("| method | gold α, β | proxy α, β | gold peak (KL) | gold at the end (KL) | proxy at the gold peak | proxy at the end |")
print("|---|---|---|---|---|---|---|")
for name, c in curves.items():
    peak, last = c["peak_gold"], c["points"][-1]
    print(f"| {name} | {c['fit_gold']['alpha']:.3f}, {c['fit_gold']['beta']:.3f} | {c['fit_proxy']['alpha']:.3f}, "
          f"{c['fit_proxy']['beta']:.3f} | {peak['gold']:+.3f} ({peak['kl']:.1f}) | {last['gold']:+.3f} ({last['kl']:.1f}) | "
          f"{peak['proxy']:+.3f} | {last['proxy']:+.3f} |")
single, ensemble = curves["PPO"], curves["PPO (RM ensemble)"]
print(f"\nPPO, single reward model: gold peak {single['peak_gold']['gold']:+.3f} at iteration {single['peak_gold']['step']}, "
      f"ends {single['points'][-1]['gold']:+.3f}")
print(f"PPO, worst of 3 reward models: gold peak {ensemble['peak_gold']['gold']:+.3f} at iteration "
      f"{ensemble['peak_gold']['step']}, ends {ensemble['points'][-1]['gold']:+.3f}")

# %%
fig = plt.figure(figsize=(10, 4))
pipeline.draw_overoptimisation(fig, curves)  # what the pipeline draws into overoptimisation.png
plt.show()

# %% [markdown]
# ## What the default budget shows
#
# (The figures of the committed outputs above: one seed of each run, on a 2-core CPU; scores relative to the SFT
# model's samples.)
#
# - **PPO with one reward model over-optimises it.** Gold rises to +1.08 at iteration 9 (KL 33 nats), then falls
#   (−0.27 at iteration 18, +0.50 at the end, KL 69) while the proxy keeps rising: +1.36 at the gold peak, +2.74 at
#   the end. The samples show how: replies that repeat "need" score high with the reward model and low with the gold
#   scorer (`samples.md` of the run's `ppo/` folder).
# - **Judged by the worst of three reward models, PPO keeps more of its gold.** Its gold peak is higher (+1.34 at
#   iteration 21, KL 40) and it ends at +1.24 (KL 53); its proxy, the worst case, rises more slowly (+2.20 at the
#   end). The members disagree on what one of them over-rates, and the minimum takes the most pessimistic.
# - **Best-of-n** moves far less (KL 3.2 nats at n = 64) and gains gold all the way to n = 64 here: +1.22 judged by
#   the single reward model, +1.45 by the worst case of three.
# - **Read the fits as descriptions of these runs.** PPO's learning rate is raised so that the run is short (lr
#   3e-4, no KL penalty), and at that rate PPO is chaotic: runs that differ only in float rounding put the gold peak
#   elsewhere. The README gives a second run, and the 60-iteration preset at the default learning rate, where the
#   single model's gold peaks at KL 3.2 and ends 1.25 below the SFT model. With members trained for a third of the
#   steps, the worst case fell as well: an ensemble needs members as good as the single model.
