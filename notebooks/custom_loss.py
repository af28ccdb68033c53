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
# # Write your own policy loss
#
# A policy loss in rlhf_jax is a pure function of arrays,
#
#     loss_fn(logps_BT, old_logps_BT, advantages_BT, mask_BT, *, clip_eps, clip_eps_high, entropy_BT,
#             entropy_coef, aggregation, max_len, **_) -> (loss, metrics)
#
# (`rlhf_jax/losses/ppo.py` holds the stock ones). The RL update step takes one as an argument:
#
#     update_step = make_update_step(..., algo=algo, policy_loss=functools.partial(my_loss, my_option=...))
#
# and `rlhf_jax.rl.objective.rl_loss` calls it in place of the algorithm's registered loss, adding the value
# loss and (with the KL in the loss) the KL term as usual. Nothing in the library is edited: the loss lives
# in this notebook. We write one, check its gradient against PPO's on hand-made arrays, train it with the
# library's RL loop (`rlhf_jax.rl.loop.run`) from the embedded default's SFT and reward models, and compare it
# with the stock PPO loss at the same budget, judged by the gold scorer on held-out prompts.
#
# **The loss: PPO on the forking tokens only.** Wang et al. (2025, "Beyond the 80/20 Rule: High-Entropy
# Minority Tokens Drive Effective Reinforcement Learning for LLM Reasoning") found that the policy gradient
# of RL on language models does its work at a minority of high-entropy "forking" tokens, where the model
# chooses between continuations, and that restricting the loss to the top 20% of tokens by entropy matched
# or beat the full update. Here, with PPO's clipped surrogate per token (ρ_t = π(y_t) / π_old(y_t)),
#
#     ℓ_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))         (stock PPO: L = Σ_t m_t ℓ_t / Σ_t m_t)
#
# the custom loss keeps only the tokens whose entropy H_t = −Σ_v π(v | y_<t) log π(v | y_<t) is in the top
# q of the minibatch's response tokens, with the **same denominator**, so a kept token's gradient is exactly
# PPO's and the other tokens' is zero:
#
#     L = Σ_t m_t · 1[H_t ≥ τ] · ℓ_t / Σ_t m_t,     τ = the (1 − q) quantile of {H_t : m_t = 1},  q = 0.2
#
# In the embedded world a response is a template with a few choices (an empathetic opener or not, the right
# action, an offer of further help, filler, a rude remark): the question is whether the learning signal sits
# at those choices.

# Budget: `RLHF_JAX_NOTEBOOK_BUDGET=default` (a few minutes per run on a 2-core CPU) or `small` (seconds,
# for the tests). The SFT and reward models come from the cache shared with `notebooks/ppo_anatomy.py`
# (`RLHF_JAX_NOTEBOOK_CACHE`, default `~/.cache/rlhf_jax/notebooks`), trained there first if missing.

# %%
import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import pathlib
import shutil
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # the scripts' progress bars; each stage's log goes to a file below

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import rlhf_jax
from rlhf_jax.cli import DataArgs, ModelArgs, RunArgs
from rlhf_jax.logging import read_metrics
from rlhf_jax.losses import ppo_policy_loss
from rlhf_jax.metrics import Metric
from rlhf_jax.rl import loop
from rlhf_jax.rl.algorithms import PRESETS
from rlhf_jax.rl.steps import make_score_step, make_update_step
from rlhf_jax.train_state import make_optimizer, shardings_of

ROOT = pathlib.Path(rlhf_jax.__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))  # the stage scripts, imported as modules
import reward_model
import sft

BUDGET = os.environ.get("RLHF_JAX_NOTEBOOK_BUDGET", "default")
BUDGETS = {  # the same as notebooks/ppo_anatomy.py's: the first line (SFT and reward models) must match
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
# ## The SFT model and the reward model (cached, shared with `ppo_anatomy`)
#
# `experiments/sft.py` then `experiments/reward_model.py` on the embedded default, with short budgets; a lock
# lets both notebooks share the folder.

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
# ## The loss, as arrays in and (loss, metrics) out
#
# It receives what `rl_loss` passes to every policy loss (the algorithm's `clip_eps`, `aggregation`, the
# policy's per-token `entropy_BT`, ...) and binds its own option by `functools.partial`. Options bound that
# way must have other names than the ones `rl_loss` passes (a call's keyword overrides a `partial`'s),
# hence `top_fraction`. It reuses the stock `ppo_policy_loss` with the advantages of the dropped tokens set
# to 0 (their ℓ_t and gradient are then 0, and the denominator is unchanged). Its own metrics are
# `Metric(total, count)` pairs under a `forking/` prefix, so its runs are told apart in the logs.

# %%
def forking_tokens_loss(logps_BT, old_logps_BT, advantages_BT, mask_BT, *, top_fraction: float,
                        entropy_BT=None, **options):
    """PPO's clipped surrogate on the ``top_fraction`` highest-entropy response tokens of the minibatch, the
    others' advantages zeroed (Wang et al. 2025, "Beyond the 80/20 Rule"); ``options``: ppo_policy_loss's."""
    if entropy_BT is None:
        raise ValueError("forking_tokens_loss needs the policy's per-token entropies (entropy_BT)")
    mask_BT = jnp.asarray(mask_BT, jnp.float32)
    entropy_BT = jax.lax.stop_gradient(jnp.asarray(entropy_BT, jnp.float32))  # the threshold is not trained
    k = jnp.maximum(1, jnp.ceil(top_fraction * mask_BT.sum())).astype(jnp.int32)
    threshold = jnp.sort(jnp.where(mask_BT > 0, entropy_BT, -jnp.inf).ravel())[::-1][k - 1]
    keep_BT = ((entropy_BT >= threshold) & (mask_BT > 0)).astype(jnp.float32)
    loss, metrics = ppo_policy_loss(logps_BT, old_logps_BT, advantages_BT * keep_BT, mask_BT,
                                    entropy_BT=entropy_BT, **options)
    metrics.update({
        "forking/kept": Metric.masked(keep_BT, mask_BT),
        "forking/entropy_threshold": Metric.scalar(threshold),
        "forking/entropy_kept": Metric.masked(entropy_BT, keep_BT),
    })
    return loss, metrics


TOP_FRACTION = 0.2
my_loss = functools.partial(forking_tokens_loss, top_fraction=TOP_FRACTION)

# %% [markdown]
# ### Its gradient against PPO's, on hand-made arrays
#
# No model: one response of 10 tokens with entropies 0.1 … 1.0 and random ratios and advantages.
# ∂loss/∂log π per token: the custom loss's equals PPO's on the two highest-entropy tokens (the top 20%)
# and is 0 elsewhere.

# %%
rng = np.random.default_rng(0)
old_BT = jnp.asarray(np.log(rng.uniform(0.2, 0.9, (1, 10))), jnp.float32)
new_BT = old_BT + jnp.asarray(rng.normal(0.0, 0.1, (1, 10)), jnp.float32)
adv_BT = jnp.asarray(rng.normal(size=(1, 10)), jnp.float32)
mask_BT, ent_BT = jnp.ones((1, 10)), jnp.linspace(0.1, 1.0, 10)[None]
grads = {}
for name, fn in (("ppo_clip", ppo_policy_loss), ("forking", my_loss)):
    def loss_of(logps_BT, fn=fn):
        return fn(logps_BT, old_BT, adv_BT, mask_BT, clip_eps=0.2, entropy_BT=ent_BT)[0]
    grads[name] = np.asarray(jax.grad(loss_of)(new_BT))[0]
print("entropy  " + "".join(f"{x:8.1f}" for x in np.asarray(ent_BT[0])))
for name, g in grads.items():
    print(f"{name:8s} " + "".join(f"{x:8.3f}" for x in g))
assert np.allclose(grads["forking"][8:], grads["ppo_clip"][8:]) and np.all(grads["forking"][:8] == 0)
print("equal to PPO's on the top 20%, zero on the rest:", True)


# %% [markdown]
# ## Training it with the library's RL loop
#
# `train` is what `experiments/ppo.py` runs (`rlhf_jax.rl.policy_gradient.main` with the `ppo` preset on the
# embedded default), spelt out so the loss can be passed in: load the models and prompts (`loop.setup`), lay
# out the state (the policy, a critic initialised from the reward model; frozen reference and reward model),
# build the jitted score and update steps, and hand them to `loop.run` (rollouts, logging, held-out
# evaluation, checkpoints, export). The only line that differs between the two runs is
# `make_update_step(..., policy_loss=...)`: `None` is the preset's registered loss, PPO's clipped surrogate.
# Both runs share the seed, so their first rollout is the same.

# %%
ALGO = PRESETS["ppo"]  # GAE on a critic, k1 KL in the reward with beta 0.1, clip 0.2, token mean
RUNS = MODELS / "custom_loss"


def train(stage: str, policy_loss=None) -> dict:
    shutil.rmtree(RUNS / stage, ignore_errors=True)
    (RUNS / stage).mkdir(parents=True)
    cfg = loop.OnlineArgs(model=ModelArgs(path=str(SFT)), reward_model=str(RM),
                          run=RunArgs(out=str(RUNS), save_every=10**6, log_every=1),
                          data=dataclasses.replace(loop.OnlineArgs().data,
                                                   num_train=max(256, B["iterations"] * B["responses"]),
                                                   num_eval=B["eval_prompts"]),
                          optim=dataclasses.replace(loop.OnlineArgs().optim, learning_rate=B["learning_rate"]),
                          iterations=B["iterations"], rollout_prompts=B["responses"], epochs=B["epochs"],
                          num_minibatches=B["minibatches"], eval_every=B["iterations"],
                          num_eval_prompts=B["eval_prompts"], samples_every=B["iterations"])
    t0 = time.perf_counter()
    with open(RUNS / stage / "log.txt", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        ctx, trees, axes = loop.setup(cfg, stage, num_samples=ALGO.samples_per_prompt)
        params = {"policy": trees["policy"], "critic": trees["reward"]}
        param_axes = {"policy": axes["policy"], "critic": axes["reward"]}
        frozen = {"reference": trees["reference"], "reward": trees["reward"]}
        optimizer = make_optimizer(ctx.cfg.optim)
        state = loop.place_state(ctx, params, param_axes, frozen, {k: axes[k] for k in frozen}, optimizer)
        shardings = shardings_of(state)
        common = {"view": ctx.trainable.view, "algo": ALGO, "critic_cfg": ctx.reward_cfg}
        score_step = make_score_step(ctx.model_cfg, ctx.reward_cfg, shardings, ctx.mesh, ctx.rules,
                                     rm_weight=ctx.rm_weight, missing_eos_penalty=ctx.cfg.missing_eos_penalty, **common)
        update_step = make_update_step(ctx.model_cfg, optimizer, shardings, ctx.mesh, ctx.rules, epochs=ctx.cfg.epochs,
                                       num_minibatches=ctx.cfg.num_minibatches, max_len=ctx.cfg.sample.max_new_tokens,
                                       policy_loss=policy_loss, **common)  # <- the loss goes in here
        learner = loop.PolicyGradient(ALGO, score_step, update_step, ctx.mesh, ctx.rules)
        _, result = loop.run(ctx, state, learner, stage=stage, name=stage,
                             kl_ctl=loop.kl_controller(ctx.cfg, ALGO.kl_coef, in_reward=ALGO.kl_in_reward),
                             updates_per_iteration=ctx.cfg.epochs * ctx.cfg.num_minibatches,
                             print_keys=("ppo/clipfrac", "forking/kept"))
    result["seconds"] = time.perf_counter() - t0
    result["history"] = [m for m in read_metrics(RUNS / stage) if "rollout/score" in m]
    return result


results = {}
for stage, label, policy_loss in (("ppo_clip", "PPO clip (stock)", None),
                                  ("forking", "PPO on forking tokens (custom)", my_loss)):
    r = results[stage] = train(stage, policy_loss)
    print(f"{label:30s} gold {r['gold']:6.3f}  KL {r['kl']:6.3f}  RM score {r['rm_score']:6.3f}  "
          f"({r['seconds']:.0f} s; log: {RUNS / stage / 'log.txt'})")
print("iterations that logged the custom loss's forking/kept:",
      {s: sum("forking/kept" in m for m in r["history"]) for s, r in results.items()})

# %% [markdown]
# ## Stock PPO loss against PPO on the forking tokens, same budget
#
# Gold: mean gold score of one sample per held-out prompt (± standard error); win rate against the SFT
# model's samples on the same prompts; KL: Monte-Carlo KL(π ‖ π_SFT) per response, nats; RM: the reward
# model's mean score (SFT samples: about 0). "tokens trained": the share of response tokens with a gradient
# in the last iteration's updates (`forking/kept` for the custom loss).

# %%
def se(x) -> float:
    x = np.asarray(x, np.float64)
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


ref_gold = results["ppo_clip"]["per_prompt"]["ref_gold"]
print(f"{B['iterations']} iterations x {B['responses']} responses, {B['epochs']} epochs x {B['minibatches']} "
      f"minibatches, lr {B['learning_rate']:g}; {B['eval_prompts']} held-out prompts\n")
print("| policy loss | gold | ± | win rate vs SFT | KL to SFT | RM score | tokens trained |")
print("|---|---|---|---|---|---|---|")
print(f"| SFT | {np.mean(ref_gold):.3f} | {se(ref_gold):.3f} | 50.0% | 0.000 | "
      f"{results['ppo_clip']['ref_rm_score']:.3f} | — |")
for stage, label in (("ppo_clip", "PPO clip (stock)"), ("forking", "PPO on forking tokens (custom)")):
    r = results[stage]
    print(f"| {label} | {r['gold']:.3f} | {se(r['per_prompt']['gold']):.3f} | {r['win_rate']:.1%} | {r['kl']:.3f} | "
          f"{r['rm_score']:.3f} | {r['history'][-1].get('forking/kept', 1.0):.1%} |")

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
for stage, label in (("ppo_clip", "PPO clip (stock)"), ("forking", "PPO on forking tokens (custom)")):
    hist = results[stage]["history"]
    steps = [m["step"] for m in hist]
    axes[0].plot(steps, [m["rollout/gold"] for m in hist], marker="o", ms=3, label=label)
    axes[1].plot(steps, [m["rollout/kl_k1"] for m in hist], marker="o", ms=3, label=label)
    axes[2].plot(steps, [m["ppo/entropy"] for m in hist], marker="o", ms=3, label=label)
axes[0].set_ylabel("gold score of the rollout")
axes[1].set_ylabel("KL(π ‖ π_SFT), k1, per response (nats)")
axes[2].set_ylabel("mean token entropy in the updates (nats)")
for ax in axes:
    ax.set_xlabel("iteration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(RUNS / "ppo_vs_forking.png", dpi=120)
plt.show()

# %% [markdown]
# ## What the figures show
#
# From the committed run at the default budget (10 iterations of 32 responses, one seed per loss, 128 held-out
# prompts; a gold mean's standard error is about 0.08):
#
# - The gradient check holds: on the hand-made arrays the custom loss's gradient is PPO's on the two
#   highest-entropy tokens and exactly 0 on the other eight.
# - The custom loss ran inside the library's step: its own metric `forking/kept` was logged in all 10
#   iterations of its run (never in the stock run) and says it trained on 20.3% of the response tokens.
# - Trained on a fifth of the tokens, it ends close to stock PPO on the gold measures and the KL: held-out
#   gold 0.246 ± 0.083 against 0.333 ± 0.080 (the SFT model's samples: −0.249 ± 0.115), win rate against the
#   SFT model 66.8% against 65.6%, KL to it 2.65 against 2.71 nats per response; its reward-model score is
#   lower (0.552 against 0.814). With one seed each, the gold gap (0.09, about 0.8 standard errors of the difference) is within the
#   noise: the run shows the forking tokens carrying most of PPO's learning signal here, as Wang et al. report,
#   not that either loss is better.
#
# ## Taking it further
#
# - **Reach it from the command line.** Put the function in a module and register it next to the stock
#   ones: `registry.POLICY_LOSSES.register("forking", functools.partial(forking_tokens_loss, top_fraction=0.2))`;
#   then `--algo-args.policy-loss forking` selects it in `experiments/ppo.py` and `experiments/grpo.py` once that
#   module is imported (the registry imports `rlhf_jax.losses.ppo` itself, so a loss registered there is
#   always reachable).
# - **Another algorithm.** For a critic-free preset (`PRESETS["grpo"]`, `PRESETS["rloo"]`, ...) drop the
#   `critic` entry of `params` and pass `critic_cfg=None`; the loss is passed the same way.
# - **A whole objective.** `make_update_step(..., objective=fn)` replaces the entire
#   `fn(params, frozen, batch) -> (loss, metrics)` (online DPO's route), for a loss that needs more than the
#   policy's log-probs, e.g. the reference's (`batch.ref_logps_BT`).
