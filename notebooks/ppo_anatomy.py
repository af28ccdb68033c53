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
# # The anatomy of PPO for RLHF: KL estimator, KL placement, advantage estimator
#
# RLHF with PPO maximises the reward model's score of a response minus a KL penalty that keeps the
# policy π near the SFT model π_ref:
#
#     max_π  E_{x, y∼π}[ R(x, y) ] − β · KL(π ‖ π_ref)
#
# The library's PPO (`experiments/ppo.py`, the `ppo` preset of `rlhf_jax.rl.algorithms`) makes three
# choices that this notebook takes apart, one at a time, from the **same SFT model and reward model**,
# at the **same budget** (iterations, responses per iteration, epochs × minibatches, learning rate, β, seed):
#
# 1. **the KL estimator** — per token, with log ρ_t = log π(y_t) − log π_ref(y_t) (Schulman 2020,
#    "Approximating KL divergence"; r = 1/ρ):
#
#        k1 = log ρ_t              unbiased for KL(π ‖ π_ref), can be negative
#        k2 = ½ (log ρ_t)²         biased, ≥ 0, low variance
#        k3 = (r − 1) − log r      unbiased, ≥ 0, low variance
#
# 2. **where the KL acts** — *in the reward*: every token earns −β·k_t and the last one also earns R(x, y),
#    so the KL enters the returns and the advantages (InstructGPT, Ziegler et al. 2019); or *in the loss*:
#    L = L_PPO + β · mean_t k_t, differentiated directly (GRPO, Shao et al. 2024, eq. 3). On samples from π
#    the gradients differ in expectation: ∇k1 = ∇log π averages to **zero**, ∇k2 = log ρ · ∇log π
#    averages to ∇KL(π ‖ π_ref), and ∇k3 = (1 − r) ∇log π averages to ∇KL(π_ref ‖ π), the *forward* KL
#    (the docstring of `rlhf_jax/rl/algorithms.py`; `tests/test_bandit.py` shows where each converges).
#
# 3. **the advantage estimator** — *GAE* on a critic (δ_t = r_t + γV_{t+1} − V_t, A_t = Σ_l (γλ)^l δ_{t+l});
#    *RLOO*, the leave-one-out baseline over N samples of a prompt, A_i = R_i − 1/(N−1) Σ_{j≠i} R_j
#    (Ahmadian et al. 2024); *GRPO*'s group normalisation, A_i = (R_i − mean_j R_j) / std_j R_j, with
#    R_i = R(x, y_i) − β Σ_t k_t here (the KL stays in the reward for all three).
#
# Each run is `rlhf_jax.rl.policy_gradient.main` — what `experiments/ppo.py` runs — with one field of
# `AlgorithmArgs` overridden. The embedded default has a **gold scorer** (what the simulated annotator
# wants): every run is judged by the gold score of its samples on held-out prompts, and by its
# Monte-Carlo KL(π ‖ π_SFT) on the same prompts. The reward model is only a learned proxy of the gold score.
#
# Budget: `RLHF_JAX_NOTEBOOK_BUDGET=default` (a few minutes per run on a 2-core CPU) or `small` (seconds,
# for the tests; the numbers then mean nothing). The SFT and reward models are trained once per budget
# into `RLHF_JAX_NOTEBOOK_CACHE` (default `~/.cache/rlhf_jax/notebooks`), shared with
# `notebooks/custom_loss.py`, and reused when present.

# %%
import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import shutil
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # the scripts' progress bars; each stage's log goes to a file below

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import rlhf_jax
from rlhf_jax import kl
from rlhf_jax.cli import DataArgs, ModelArgs, RunArgs
from rlhf_jax.logging import read_metrics
from rlhf_jax.rl.algorithms import AlgorithmArgs
from rlhf_jax.rl.policy_gradient import RLConfig
from rlhf_jax.rl.policy_gradient import main as rl_main

ROOT = pathlib.Path(rlhf_jax.__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))  # the stage scripts, imported as modules
import reward_model
import sft

BUDGET = os.environ.get("RLHF_JAX_NOTEBOOK_BUDGET", "default")
BUDGETS = {
    # first line: the SFT and reward models (shared with notebooks/custom_loss.py); then every RL run
    "small": {"sft_steps": 10, "sft_batch": 8, "rm_steps": 6, "rm_batch": 8,
              "iterations": 2, "responses": 8, "epochs": 1, "minibatches": 2, "learning_rate": 1e-4, "eval_prompts": 8},
    "default": {"sft_steps": 100, "sft_batch": 32, "rm_steps": 50, "rm_batch": 32,
                "iterations": 10, "responses": 32, "epochs": 2, "minibatches": 4, "learning_rate": 1e-4,
                "eval_prompts": 128},
}
B = BUDGETS[BUDGET]
plt.rcParams["figure.dpi"] = 72  # small embedded images (the committed .ipynb stays small)
CACHE = pathlib.Path(os.environ.get("RLHF_JAX_NOTEBOOK_CACHE", "~/.cache/rlhf_jax/notebooks")).expanduser()
MODELS = CACHE / f"{BUDGET}-sft{B['sft_steps']}x{B['sft_batch']}-rm{B['rm_steps']}x{B['rm_batch']}"
print(f"budget {BUDGET}: {B}\nmodels in {MODELS}")


# %% [markdown]
# ## The three estimators on a hand case
#
# One position, a vocabulary of 5 tokens, a policy π and a reference π_ref written out by hand. Per token,
# the library's `kl.kl_penalty` (what the score step and the KL loss call) gives k1, k2 and k3; weighting them
# by π gives their exact expectation under samples from π. k1 and k3 are unbiased: both average to
# KL(π ‖ π_ref) = Σ_y π(y) log(π(y)/π_ref(y)). k2 is not (it is close only while π is close to π_ref); k1 is
# negative on every token π likes less than π_ref does, k2 and k3 never are.

# %%
pi_V = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
ref_V = np.array([0.3, 0.3, 0.2, 0.1, 0.1])
logps_1V = jnp.log(jnp.asarray(pi_V, jnp.float32))[None]  # (B, T) = (1, 5): five one-token cases
ref_logps_1V = jnp.log(jnp.asarray(ref_V, jnp.float32))[None]
print("pi =", np.array2string(pi_V, precision=6, separator=" "))
print("pi_ref =", np.array2string(ref_V, precision=6, separator=" "))
for estimator in ("k1", "k2", "k3"):
    k_V = np.asarray(kl.kl_penalty(logps_1V, ref_logps_1V, estimator=estimator), np.float64)[0]
    print(f"{estimator} per token = [{' '.join(f'{x:.6f}' for x in k_V)}]   E_pi[{estimator}] = {np.sum(pi_V * k_V):.6f}")
print(f"KL(pi || pi_ref) = {np.sum(pi_V * np.log(pi_V / ref_V)):.6f}")


# %% [markdown]
# ## The SFT model and the reward model (trained once, cached)
#
# `experiments/sft.py` and `experiments/reward_model.py` on the embedded default, with short budgets: the
# tiny Llama learns the support-reply template from mixed-quality demonstrations, and a Bradley–Terry reward
# model (from the SFT backbone) learns the simulated annotator's comparisons, normalised so SFT samples score
# mean 0, std 1. A lock lets both notebooks share the folder (the second waits for the first to build it).

# %%
def build_models(out: pathlib.Path) -> None:
    run = RunArgs(out=str(out), log_every=25)
    sft.main(sft.SFTConfig(run=run, steps=B["sft_steps"], batch_size=B["sft_batch"], eval_every=B["sft_steps"],
                           num_eval_samples=B["eval_prompts"],
                           data=DataArgs(num_train=max(256, B["sft_steps"] * B["sft_batch"]), num_eval=64)))
    reward_model.main(reward_model.RewardConfig(
        run=run, steps=B["rm_steps"], batch_size=B["rm_batch"], eval_every=B["rm_steps"],
        normalize_samples=min(128, 2 * B["rm_steps"] * B["rm_batch"]),
        data=DataArgs(num_train=max(256, B["rm_steps"] * B["rm_batch"]), num_eval=256, seed=1)))


MODELS.parent.mkdir(parents=True, exist_ok=True)
with open(f"{MODELS}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # another notebook building the same models: wait for it
    if not (MODELS / "rm" / "eval.json").exists():  # written last: the models are complete
        shutil.rmtree(MODELS, ignore_errors=True)
        MODELS.mkdir(parents=True)
        t0 = time.perf_counter()
        with (open(MODELS / "build.log", "w") as log, contextlib.redirect_stdout(log),
              contextlib.redirect_stderr(log)):
            build_models(MODELS)
        print(f"trained the SFT and reward models in {time.perf_counter() - t0:.0f} s (log: {MODELS / 'build.log'})")
SFT, RM = MODELS / "sft" / "hf", MODELS / "rm" / "hf"
sft_eval = json.loads((MODELS / "sft" / "eval.json").read_text())
rm_eval = json.loads((MODELS / "rm" / "eval.json").read_text())
print(f"SFT: held-out gold {sft_eval['gold/mean']:.3f}; reward model: held-out accuracy {rm_eval['accuracy']:.3f} "
      f"(the annotator's own agreement ceiling {rm_eval['agreement_ceiling']:.3f})")


# %% [markdown]
# ## The runs
#
# One row per variant; everything not named is the `ppo` preset: GAE on a critic initialised from the reward
# model, clipped ratio (ε 0.2), token-mean aggregation, β = 0.1, γ 1, λ 0.95, whitened advantages, −1 for a
# response without EOS. The grouped estimators sample 4 responses for each of a quarter as many prompts, so
# every run trains on the same number of responses per iteration.

# %%
ROWS = [  # folder, label, group, AlgorithmArgs overrides of the ppo preset
    ("k1_reward", "k1 in the reward (PPO)", "KL estimator, in the reward", {}),
    ("k2_reward", "k2 in the reward", "KL estimator, in the reward", {"kl_estimator": "k2"}),
    ("k3_reward", "k3 in the reward", "KL estimator, in the reward", {"kl_estimator": "k3"}),
    ("k1_loss", "k1 in the loss", "KL in the loss", {"kl_placement": "loss", "kl_estimator": "k1"}),
    ("k2_loss", "k2 in the loss", "KL in the loss", {"kl_placement": "loss", "kl_estimator": "k2"}),
    ("k3_loss", "k3 in the loss", "KL in the loss", {"kl_placement": "loss", "kl_estimator": "k3"}),
    ("rloo", "RLOO advantages", "advantage estimator", {"advantage": "rloo", "samples_per_prompt": 4}),
    ("grpo", "GRPO advantages", "advantage estimator", {"advantage": "grpo", "samples_per_prompt": 4}),
]
RUNS = MODELS / "ppo_anatomy"


def train(folder: str, overrides: dict) -> dict:
    """One PPO run with ``overrides``; returns its final held-out evaluation and its per-iteration metrics."""
    out = RUNS / folder
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = RLConfig(algo="ppo", algo_args=AlgorithmArgs(**overrides), model=ModelArgs(path=str(SFT)),
                   reward_model=str(RM), run=RunArgs(out=str(out), save_every=10**6, log_every=1),
                   data=dataclasses.replace(RLConfig().data, num_train=max(256, B["iterations"] * B["responses"]),
                                            num_eval=B["eval_prompts"]),
                   optim=dataclasses.replace(RLConfig().optim, learning_rate=B["learning_rate"]),
                   iterations=B["iterations"], rollout_prompts=B["responses"] // overrides.get("samples_per_prompt", 1),
                   epochs=B["epochs"], num_minibatches=B["minibatches"], eval_every=B["iterations"],
                   num_eval_prompts=B["eval_prompts"], samples_every=B["iterations"])
    t0 = time.perf_counter()
    # the loop's per-iteration lines (and warnings) go to the run's log
    with open(out / "log.txt", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        result = rl_main(cfg)
    result["seconds"] = time.perf_counter() - t0
    result["history"] = read_metrics(out / "ppo")
    return result


results = {}
for folder, label, group, overrides in ROWS:
    r = results[folder] = train(folder, overrides)
    print(f"{label:24s} gold {r['gold']:6.3f}  KL {r['kl']:6.3f}  RM score {r['rm_score']:6.3f}  "
          f"({r['seconds']:.0f} s; log: {RUNS / folder / 'log.txt'})")


# %% [markdown]
# ## Gold score against KL to the SFT model
#
# Gold is the mean gold score of one sample per held-out prompt (± its standard error); the win rate is
# against the SFT model's samples on the same prompts (ties count half); KL is the Monte-Carlo
# KL(π ‖ π_SFT) per response, in nats, on those samples (so it is comparable across rows whatever estimator
# the run trained with); RM is the reward model's mean score (SFT samples: about 0).

# %%
def se(x) -> float:
    x = np.asarray(x, np.float64)
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


first = results[ROWS[0][0]]
ref_gold = first["per_prompt"]["ref_gold"]
table = [("SFT", "—", "—", float(np.mean(ref_gold)), se(ref_gold), 0.5, 0.0, first["ref_rm_score"])]
for folder, label, group, overrides in ROWS:
    r = results[folder]
    table.append((label, overrides.get("advantage", "gae"),
                  f"{overrides.get('kl_estimator', 'k1')} in the {overrides.get('kl_placement', 'reward')}",
                  r["gold"], se(r["per_prompt"]["gold"]), r["win_rate"], r["kl"], r["rm_score"]))
print(f"{len(ROWS)} runs of {B['iterations']} iterations x {B['responses']} responses, {B['epochs']} epochs x "
      f"{B['minibatches']} minibatches, lr {B['learning_rate']:g}, beta 0.1; {B['eval_prompts']} held-out prompts\n")
print("| run | advantage | KL | gold | ± | win rate vs SFT | KL to SFT | RM score |")
print("|---|---|---|---|---|---|---|---|")
for label, adv, kl_where, gold, gold_se, win, kl_nats, rm in table:
    print(f"| {label} | {adv} | {kl_where} | {gold:.3f} | {gold_se:.3f} | {win:.1%} | {kl_nats:.3f} | {rm:.3f} |")

# %%
markers = {"KL estimator, in the reward": "o", "KL in the loss": "s", "advantage estimator": "^"}
fig, ax = plt.subplots(figsize=(7, 4.5))
ax.errorbar([0.0], [table[0][3]], yerr=[table[0][4]], fmt="*", ms=14, color="black", label="SFT")
for (folder, label, group, _), row in zip(ROWS, table[1:]):
    ax.errorbar([row[6]], [row[3]], yerr=[row[4]], fmt=markers[group], ms=8, capsize=3, label=label)
ax.set_xlabel("KL(π ‖ π_SFT) per response on held-out prompts (nats)")
ax.set_ylabel("held-out gold score")
ax.set_title(f"PPO's pieces, one at a time ({BUDGET} budget)")
ax.grid(alpha=0.3)
ax.legend(fontsize=8, loc="best")
fig.tight_layout()
fig.savefig(RUNS / "gold_vs_kl.png", dpi=120)
plt.show()

# %% [markdown]
# ## During training
#
# Left: the gold score of each iteration's training samples (`rollout/gold`, judged on the fly, never seen by
# the learner). Right: the k1 estimate of KL(π ‖ π_SFT) per response on those samples (`rollout/kl_k1`,
# logged whatever estimator acts), i.e. how far each leash let the policy go.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for folder, label, group, _ in ROWS:
    hist = [m for m in results[folder]["history"] if "rollout/gold" in m]
    steps = [m["step"] for m in hist]
    style = "-" if group == "KL estimator, in the reward" else ("--" if group == "KL in the loss" else ":")
    axes[0].plot(steps, [m["rollout/gold"] for m in hist], style, marker=markers[group], ms=3, label=label)
    axes[1].plot(steps, [m["rollout/kl_k1"] for m in hist], style, marker=markers[group], ms=3, label=label)
axes[0].set_ylabel("gold score of the rollout")
axes[1].set_ylabel("KL(π ‖ π_SFT), k1, per response (nats)")
for ax in axes:
    ax.set_xlabel("iteration")
    ax.grid(alpha=0.3)
axes[1].legend(fontsize=7)
fig.tight_layout()
fig.savefig(RUNS / "training_curves.png", dpi=120)
plt.show()

# %% [markdown]
# ## What the figures show
#
# From the committed run at the default budget (one seed per row, 128 held-out prompts; the gold score's
# standard error is 0.06–0.11 per row, so gaps under about 0.2 are within the noise of one run):
#
# - **Every variant learns.** Held-out gold rises from −0.249 ± 0.115 (SFT samples) to between 0.210 and
#   0.534, win rates against the SFT model 60–72%, at KL(π ‖ π_SFT) between 2.6 and 6.7 nats per response.
#   The reward model's highest scores (k3 in the reward 0.940, k1 in the loss 0.932) go with the highest gold;
#   at 10 iterations no run shows its RM score rising while its gold falls.
# - **k1 in the loss is no leash.** Its expected gradient is zero, so nothing holds the policy near π_SFT: it
#   drifts furthest (6.67 nats, the top KL curve on the right from the second iteration on). Its gold (0.534)
#   is the highest here, less than one standard error of the difference above k3 in the reward (0.452 at 5.64
#   nats).
# - **k2 and k3 in the loss hold tightest** (2.66 and 2.56 nats), for the least gold (0.210 and 0.354).
# - **In the reward**, the KL after 10 iterations grows from k1 (2.71 nats, gold 0.333) to k2 (3.78, 0.366) to
#   k3 (5.64, 0.452) at the same β.
# - **Advantages** (the KL in the reward for all three): GAE on a critic (PPO) 0.333 gold at 2.71 nats, RLOO
#   0.346 at 3.14, GRPO 0.293 at 3.11: indistinguishable at this budget and seed.
