# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Preference losses on the embedded language model: DPO, IPO, cDPO, SimPO, KTO, RPO
#
# One briefly trained SFT model of the embedded default (the tiny Llama that answers simulated
# customer-support prompts), six preference losses trained from it on the **same** simulated comparisons
# with the **same** budget (steps, batch, learning rate and schedule), each for several seeds at once, then
# sampled on held-out prompts and judged by the simulated annotator's **gold** scorer
# (`rlhf_jax.data.simulated`: the function that defines what the simulated human wants; no loss sees it).
# For every loss we report the gold **win rate against the SFT model's samples** and the Monte-Carlo
# **KL(π ‖ π_SFT)** of its samples, each as a mean over seeds with a 95% t-interval.
#
# **Seeds in one program.** The seeds differ in the order they see the comparisons (and in the keys their
# held-out samples are drawn with). Their train states are stacked along a leading axis and one
# `jax.vmap` of the library's jitted train step (`steps.make_train_step`) updates all of them: one compiled
# program per loss, whatever the number of seeds. The notebook checks that this is the same computation as
# training one seed alone.
#
# ## What each loss optimises
#
# With the sequence log-probabilities $\log\pi(y\mid x)$ summed over response tokens, the reference
# $\pi_\text{ref}$ = the SFT model, a comparison $(x, y_w, y_l)$ ($y_w$ chosen) and
# $$h = \big[\log\pi(y_w) - \log\pi_\text{ref}(y_w)\big] - \big[\log\pi(y_l) - \log\pi_\text{ref}(y_l)\big],$$
# each loss is the batch mean of (functions in `rlhf_jax/losses/dpo.py`, by name in
# `python -m rlhf_jax.registry`):
#
# | loss | per comparison (or per thumbs row) | source |
# |---|---|---|
# | DPO | $-\log\sigma(\beta h)$ | Rafailov et al. 2023, eq. 7 |
# | cDPO | $-(1-\varepsilon)\log\sigma(\beta h) - \varepsilon\log\sigma(-\beta h)$, ε = the assumed label-flip rate | Mitchell 2023 |
# | IPO | $\big(h - \tfrac{1}{2\beta}\big)^2$ (a squared distance to a target margin: it cannot push $h$ to ∞) | Azar et al. 2023, §5 |
# | SimPO | $-\log\sigma\!\big(\beta\,[\tfrac{\log\pi(y_w)}{\lvert y_w\rvert} - \tfrac{\log\pi(y_l)}{\lvert y_l\rvert}] - \gamma\big)$: length-averaged, **no reference** | Meng et al. 2024 |
# | RPO | DPO $+\ \alpha\cdot\big(-\log\pi(y_w)/\lvert y_w\rvert\big)$: keeps the chosen responses likely | Pang et al. 2024, eq. 2 |
# | KTO | $\lambda_y - v(x,y)$ on single thumbs-up / thumbs-down rows, $v = \lambda_D\,\sigma(\beta(r - z_0))$ if desirable, $\lambda_U\,\sigma(\beta(z_0 - r))$ if not, $r = \log\pi(y) - \log\pi_\text{ref}(y)$, $z_0$ a batch estimate of KL(π ‖ π_ref) | Ethayarajh et al. 2024, §4 |
#
# KTO does not take pairs: it gets the **same comparisons split into thumbs** (each chosen response a
# thumbs-up, each rejected one a thumbs-down, as the KTO paper does with paired data), twice as many rows
# per batch, so every loss sees the same responses per step.
#
# The budget is read from `RLHF_JAX_NOTEBOOK_BUDGET`: `default` (the committed outputs) or `small` (a tiny
# SFT, a few steps, 2 seeds: what the test suite runs, numbers meaningless). Run it as a notebook or as a
# script (`python notebooks/preference_ablation.py`).

# %%
import contextlib
import functools
import io
import os
import importlib.util
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import scipy.stats

from rlhf_jax import cli, defaults, evaluation, losses, model_io, models, objectives, runtime, steps
from rlhf_jax.configs import OptimizerConfig
from rlhf_jax.data import BatchIterator, collate_binary, collate_pairs, encode, parse_row, simulated, sources
from rlhf_jax.train_state import TrainState, make_optimizer, place_train_state, shardings_of

BUDGETS = {
    # sft_*: the SFT model; pairs: training comparisons; steps x batch (comparisons per step) per loss and seed, at
    # peak learning rate lr; eval_prompts: held-out prompts every policy is sampled on.
    "default": dict(sft_steps=150, sft_batch=32, sft_rows=4800, pairs=4096, steps=40, batch=8, lr=2e-4, seeds=4,
                    eval_prompts=64),
    "small": dict(sft_steps=10, sft_batch=8, sft_rows=256, pairs=256, steps=6, batch=4, lr=1e-3, seeds=2,
                  eval_prompts=16),
}
BUDGET = os.environ.get("RLHF_JAX_NOTEBOOK_BUDGET", "default")
if BUDGET not in BUDGETS:
    raise ValueError(f"RLHF_JAX_NOTEBOOK_BUDGET={BUDGET!r}: expected one of {sorted(BUDGETS)}")
BUD = BUDGETS[BUDGET]
plt.rcParams["figure.dpi"] = 72  # small embedded images (the committed .ipynb stays small)
SEEDS = list(range(BUD["seeds"]))
OPTIM = OptimizerConfig(learning_rate=BUD["lr"], warmup_steps=max(1, BUD["steps"] // 10), total_steps=BUD["steps"],
                        b2=0.99)  # dpo.py's schedule: linear warmup, cosine decay to 0

# The repository (for experiments/sft.py): the notebook runs from notebooks/, a script from anywhere inside it.
REPO = next(p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents] if (p / "experiments" / "sft.py").exists())
CACHE = pathlib.Path(os.environ.get("RLHF_JAX_NOTEBOOK_CACHE", REPO / "runs" / "notebooks"))
runtime.setup()  # persistent compilation cache (RLHF_JAX_COMPILE_CACHE, default ~/.cache/rlhf_jax/jax_compile)
T0 = time.perf_counter()
print(f"budget {BUDGET}: {BUD}; {len(jax.devices())} {jax.devices()[0].platform} device(s)")

# %% [markdown]
# ## The SFT model
#
# `experiments/sft.py` itself, with a short budget, trained once into a cache folder named after its settings
# (`$RLHF_JAX_NOTEBOOK_CACHE`, default `runs/notebooks/`) and reused when present. It is the starting point
# of every loss and their reference.

# %%
SFT_RUN = CACHE / f"preference_ablation-sft{BUD['sft_steps']}x{BUD['sft_batch']}"
SFT_DIR = SFT_RUN / "sft" / "hf"
if (SFT_DIR / "config.json").exists():
    print(f"reusing the SFT model in {SFT_DIR}")
else:
    spec = importlib.util.spec_from_file_location("sft_script", REPO / "experiments" / "sft.py")
    sft_script = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sft_script)
    with contextlib.redirect_stderr(io.StringIO()):  # the script's progress bar; its log lines go to stdout
        sft_script.main(sft_script.SFTConfig(
            steps=BUD["sft_steps"], batch_size=BUD["sft_batch"], eval_every=0, num_eval_samples=0,
            data=cli.DataArgs(num_train=BUD["sft_rows"], num_eval=64),
            run=cli.RunArgs(out=str(SFT_RUN), log_every=max(1, BUD["sft_steps"] // 4))))
    print(f"SFT model trained in {time.perf_counter() - T0:.0f} s: {SFT_DIR}")

model_cfg, sft_params, tokenizer = model_io.load_lm(cli.ModelArgs(path=str(SFT_DIR)))
AXES = models.param_logical_axes(model_cfg)
MESH, RULES = cli.setup(cli.RunArgs())

# %% [markdown]
# ## Data: one set of comparisons for every loss
#
# The simulated annotator's comparisons that `experiments/dpo.py` trains on (seed 1): two responses per
# prompt, the chosen one drawn by Bradley–Terry on the gold score at temperature 0.4, so some labels are
# flipped against the gold score. We measure that flip rate and give it to cDPO as its ε. The held-out
# prompts are those `dpo.py` evaluates on.

# %%
pair_records = simulated.pairwise_rows(BUD["pairs"], seed=1)
gold_w = np.array([r["meta"]["gold_chosen"] for r in pair_records])
gold_l = np.array([r["meta"]["gold_rejected"] for r in pair_records])
FLIP_RATE = float(np.mean(gold_w < gold_l))
pairs = [parse_row(r, "pairwise") for r in pair_records]
thumbs = [parse_row({"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}, "binary")
          for r in pair_records for side in ("chosen", "rejected")]
pair_examples = encode(pairs, tokenizer, max_len=model_cfg.max_position_embeddings)
thumb_examples = encode(thumbs, tokenizer, max_len=model_cfg.max_position_embeddings)
LENGTH = defaults.round_up(max(e.length for e in pair_examples))  # tokens per training row (a multiple of 16)
DATA = {  # kind -> (examples, collate, rows per step)
    "pairs": (pair_examples, functools.partial(collate_pairs, pad_id=tokenizer.pad_token_id, length=LENGTH),
              BUD["batch"]),
    "thumbs": (thumb_examples, functools.partial(collate_binary, pad_id=tokenizer.pad_token_id, length=LENGTH),
               2 * BUD["batch"]),
}
PROMPTS = sources.held_out_policy_prompts(cli.DataArgs(), [], BUD["eval_prompts"], simulated.prompt_rows)
SAMPLE = cli.SampleArgs(max_prompt_len=48, max_new_tokens=48, batch_size=min(64, len(PROMPTS)))
print(f"{len(pairs)} comparisons ({len(thumbs)} thumbs rows for KTO), {LENGTH} tokens per row; "
      f"label flip rate against the gold score {FLIP_RATE:.3f}; {len(PROMPTS)} held-out prompts")
print("e.g.", repr(pairs[0].prompt), "\n  chosen:  ", repr(pairs[0].chosen), "\n  rejected:", repr(pairs[0].rejected))

# %% [markdown]
# ## The losses, as the library has them
#
# Every pairwise loss is `losses.dpo_loss` with its variant (the registry's `PREFERENCE_LOSSES`), inside
# `objectives.dpo_objective` (which computes the policy's and the reference's sequence log-probs); KTO is
# `losses.kto_loss` inside `objectives.kto_objective`. One β = 0.1 for the losses with a reference (the
# scripts' default). SimPO's β and γ are on another scale (a length-averaged log-prob margin): we take the
# SimPO paper's β = 2, γ = 1 (γ/β = ½). RPO's α = 1 (Pang et al.).

# %%
BETA = 0.1
LOSSES = {  # name -> (data kind, loss function of arrays)
    "DPO": ("pairs", functools.partial(losses.DPO_VARIANTS["dpo"], beta=BETA)),
    "IPO": ("pairs", functools.partial(losses.DPO_VARIANTS["ipo"], beta=BETA)),
    "cDPO": ("pairs", functools.partial(losses.DPO_VARIANTS["cdpo"], beta=BETA, label_smoothing=round(FLIP_RATE, 3))),
    "SimPO": ("pairs", functools.partial(losses.DPO_VARIANTS["simpo"], beta=2.0, simpo_gamma=1.0)),
    "RPO": ("pairs", functools.partial(losses.DPO_VARIANTS["dpo"], beta=BETA, nll_coef=1.0)),
    "KTO": ("thumbs", functools.partial(losses.kto_loss, beta=BETA)),
}
REFERENCE_FREE = {"SimPO"}


def objective_of(name):
    kind, loss_fn = LOSSES[name]
    wrap = objectives.dpo_objective if kind == "pairs" else objectives.kto_objective
    return functools.partial(wrap, model_cfg=model_cfg, loss_fn=loss_fn)


for name, (kind, fn) in LOSSES.items():
    print(f"{name:6s} {kind:7s} {fn.func.__name__}({', '.join(f'{k}={v}' for k, v in fn.keywords.items())})")

# %% [markdown]
# ## Training: several seeds in one compiled step
#
# `steps.make_train_step(objective, ...)` is the library's jitted step for *one* state,
# `step(state, batch) -> (state, metrics)`. `jax.vmap` over a leading seed axis of the state's `params`,
# `opt_state` and `step` and of the batch (`in_axes=TrainState(step=0, params=0, opt_state=0, frozen=None)`:
# the frozen reference is one copy shared by every seed), inside one `jax.jit`, trains every seed in one
# program. Each seed draws its batches from its own `BatchIterator(seed=s)`. For DPO we also train seed 0
# alone with the unvmapped step for a few steps and compare.

# %%
SEED_AXES = TrainState(step=0, params=0, opt_state=0, frozen=None)
CHECK_STEPS = min(3, BUD["steps"])


def stack(trees):
    """Pytrees with equal structure -> one pytree whose leaves have a new leading (seed) axis."""
    return jax.tree.map(lambda *xs: np.stack(xs) if isinstance(xs[0], np.ndarray) else jnp.stack(xs), *trees)


def seed_of(tree, s):
    return jax.tree.map(lambda x: x[s], tree)


def initial_state(name, optimizer):
    frozen = {} if name in REFERENCE_FREE else sft_params
    return place_train_state(sft_params, optimizer, MESH, RULES, AXES, frozen=frozen,
                             frozen_axes=None if name in REFERENCE_FREE else AXES)


def train(name, check=False):
    """Every seed of loss ``name`` for BUD['steps'] steps: the stacked final states and per-step losses (steps, seeds)."""
    examples, collate, batch_size = DATA[LOSSES[name][0]]
    optimizer = make_optimizer(OPTIM)
    state = initial_state(name, optimizer)
    train_step = steps.make_train_step(objective_of(name), optimizer, shardings_of(state), MESH, RULES)
    seeds_step = jax.jit(jax.vmap(train_step, in_axes=(SEED_AXES, 0), out_axes=(SEED_AXES, 0)))
    states = state.replace(step=stack([state.step] * len(SEEDS)), params=stack([state.params] * len(SEEDS)),
                           opt_state=stack([state.opt_state] * len(SEEDS)))
    iterators = [BatchIterator(examples, collate, batch_size=batch_size, seed=s) for s in SEEDS]
    history, seed0_batches = [], []
    for t in range(BUD["steps"]):
        batches = [next(it) for it in iterators]
        states, metrics = seeds_step(states, stack(batches))
        history.append(metrics["optim/loss"].mean())
        if check and t < CHECK_STEPS:
            seed0_batches.append(batches[0])
            if t + 1 == CHECK_STEPS:
                vmapped = jax.device_get(seed_of(states.params, 0)), np.stack(jax.device_get(history))[:, 0]
    history = np.asarray(jax.device_get(jnp.stack(history)))
    if check:  # seed 0 alone: the library's step, unvmapped, on the same batches
        alone = initial_state(name, optimizer)
        alone_losses = []
        for batch in seed0_batches:
            alone, metrics = train_step(alone, batch)
            alone_losses.append(float(metrics["optim/loss"].mean()))
        diff = jax.tree.leaves(jax.tree.map(lambda a, b: np.max(np.abs(a - b)), vmapped[0], jax.device_get(alone.params)))
        moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.max(np.abs(a - b)), vmapped[0], jax.device_get(sft_params)))
        print(f"vmap check ({name}, seed 0, {CHECK_STEPS} steps): max |θ_vmap − θ_alone| = {max(diff):.2e} "
              f"(max |θ − θ_SFT| = {max(moved):.2e}); max |loss_vmap − loss_alone| = "
              f"{np.max(np.abs(vmapped[1] - np.array(alone_losses))):.2e}")
    return states, history


# %% [markdown]
# ## Evaluation on held-out prompts
#
# For seed `s` of every loss: sample the trained policy on the held-out prompts (one response each, temperature
# 1, key `20000 + s`), and the SFT model (key `10000 + s`, the same SFT samples for every loss's seed `s`);
# `evaluation.compare` judges each pair with the gold scorer (win rate: P(policy > SFT) + ½ P(tie)) and
# `evaluation.kl_to_reference` gives Σ_t log π(y_t) − log π_SFT(y_t) over the policy's own samples
# (an unbiased estimate of KL(π ‖ π_SFT) per response). The **SFT** row samples the SFT model itself with
# the policy key: its KL is 0 and its win rate is 0.5 up to the evaluation's own noise.

# %%
sft_samples = [evaluation.sample_model(model_cfg, sft_params, tokenizer, PROMPTS, key=jax.random.key(10_000 + s),
                                       sample_args=SAMPLE)[0] for s in SEEDS]


def evaluate(params, s):
    samples, rollouts = evaluation.sample_model(model_cfg, params, tokenizer, PROMPTS, key=jax.random.key(20_000 + s),
                                                sample_args=SAMPLE)
    kl = evaluation.kl_to_reference(model_cfg, params, sft_params, rollouts)[:len(PROMPTS)]
    return evaluation.compare(PROMPTS, samples, sft_samples[s], kl=kl, gold=True)


results = {"SFT": [evaluate(sft_params, s) for s in SEEDS]}
curves = {}
for i, name in enumerate(LOSSES):
    t = time.perf_counter()
    states, curves[name] = train(name, check=(i == 0))
    results[name] = [evaluate(seed_of(states.params, s), s) for s in SEEDS]
    print(f"{name}: trained {len(SEEDS)} seeds x {BUD['steps']} steps and evaluated in {time.perf_counter() - t:.0f} s; "
          f"win rates {[round(r['win_rate'], 3) for r in results[name]]}, KL {[round(r['kl'], 2) for r in results[name]]}")
    del states

# %% [markdown]
# ## Results
#
# Mean over seeds ± the half-width of a 95% t-interval (t quantile with seeds − 1 degrees of freedom times the
# standard error). Gold score: the mean gold score of the policy's held-out samples (the SFT model's:
# the SFT row). Tokens: mean response length, EOS counted.

# %%
def interval(values):
    values = np.asarray(values, np.float64)
    half = scipy.stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(half)


COLUMNS = [("win rate vs SFT", "win_rate"), ("KL to SFT (nats)", "kl"), ("gold score", "gold"),
           ("response tokens", "response_tokens"), ("EOS rate", "eos_rate")]
summary = {name: {key: interval([r[key] for r in runs]) for _, key in COLUMNS} for name, runs in results.items()}
print(f"{len(SEEDS)} seeds, {BUD['steps']} steps x {BUD['batch']} comparisons, lr {BUD['lr']}, "
      f"{len(PROMPTS)} held-out prompts")
print("| loss | " + " | ".join(h for h, _ in COLUMNS) + " |")
print("|---|" + "---|" * len(COLUMNS))
for name, row in summary.items():
    print(f"| {name} | " + " | ".join(f"{row[k][0]:.3f} ± {row[k][1]:.3f}" for _, k in COLUMNS) + " |")
print("\nper seed (win rate / KL):")
for name, runs in results.items():
    print(f"  {name:6s} " + "  ".join(f"{r['win_rate']:.3f} / {r['kl']:.3f}" for r in runs))
print("\ntraining loss, first step → last step (mean over seeds):")
for name, curve in curves.items():
    print(f"  {name:6s} {curve[0].mean():.4f} → {curve[-1].mean():.4f}")
print(f"\nwhole notebook so far: {time.perf_counter() - T0:.0f} s")

# %% [markdown]
# **Figure 1** — gold win rate against the SFT model (y) versus KL(π ‖ π_SFT) (x), one point per loss at its
# mean over seeds, error bars the 95% t-intervals of both; small dots are the single seeds. The SFT model
# sits at (0, ½) up to the evaluation's noise. Up is better; right is further from the starting model. A loss
# above and to the left of another bought its improvement with less drift.

# %%
fig, ax = plt.subplots(figsize=(7, 5))
colors = dict(zip(results, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2))
for name, runs in results.items():
    (kl_m, kl_h), (win_m, win_h) = summary[name]["kl"], summary[name]["win_rate"]
    ax.errorbar(kl_m, win_m, xerr=kl_h, yerr=win_h, fmt="o", ms=7, capsize=4, color=colors[name], label=name)
    ax.scatter([r["kl"] for r in runs], [r["win_rate"] for r in runs], s=12, alpha=0.4, color=colors[name])
ax.axhline(0.5, color="gray", lw=0.8, ls="--")
ax.axvline(0.0, color="gray", lw=0.8, ls="--")
ax.set_xlabel("KL(π ‖ π_SFT) per response (nats)")
ax.set_ylabel("gold win rate vs SFT")
ax.set_title(f"Preference losses from one SFT model ({len(SEEDS)} seeds, {BUD['steps']} steps, budget {BUDGET})")
ax.legend(loc="best")
plt.tight_layout()
plt.show()

# %% [markdown]
# **Figure 2** — each loss's training loss per step (mean over seeds, band: min to max over seeds). The
# losses are on different scales, so each has its own panel; what to look for is whether the curve has
# flattened by the end of the budget.

# %%
fig, axes = plt.subplots(2, 3, figsize=(11, 5.5), sharex=True)
for ax, (name, curve) in zip(axes.flat, curves.items()):
    steps_axis = np.arange(1, len(curve) + 1)
    ax.plot(steps_axis, curve.mean(axis=1), color=colors[name])
    ax.fill_between(steps_axis, curve.min(axis=1), curve.max(axis=1), color=colors[name], alpha=0.25)
    ax.set_title(name)
for ax in axes[-1]:
    ax.set_xlabel("step")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What the committed run shows
#
# At the default budget (4 seeds, 40 steps × 8 comparisons, 64 held-out prompts; mean ± 95% half-width):
#
# - **The seeds in one program are the same computation as one seed alone**: after 3 steps seed 0's
#   parameters differ by 6e-08 between the vmapped and the plain step, against 1.5e-04 moved from the SFT model.
# - **Every loss starts where its formula says** at π = π_SFT (DPO and cDPO log 2 = 0.6931, IPO 25, KTO 0.5)
#   and lowers it.
# - **Gold score**: every loss raises the mean gold of its samples above the SFT model's −0.581 ± 0.333: KTO
#   0.108 ± 0.202, cDPO −0.009 ± 0.307, DPO −0.037 ± 0.188, RPO −0.108 ± 0.267, IPO −0.120 ± 0.434, SimPO
#   −0.159 ± 0.320. The intervals overlap: at this budget no loss is ahead of another beyond the seeds' spread.
# - **Win rate against the SFT model**: only KTO's interval clears ½ (0.602 ± 0.075). The SFT row, the SFT model
#   against its own samples under other keys, reads 0.428 ± 0.137: with 64 prompts the evaluation's own noise is
#   as large as the gaps between the losses.
# - **KL to the SFT model** separates them more clearly: RPO stays closest (0.645 ± 0.163 nats; its NLL term
#   keeps the chosen responses likely), then IPO (0.851 ± 0.473; its bounded target margin), DPO, cDPO and SimPO
#   near 1.6, and KTO moves furthest (2.860 ± 1.093), which is also where its higher gold comes from.
#
# ## Caveats
#
# - **The budget is small.** The SFT model is trained briefly and every loss gets the same short run at one
#   learning rate, chosen once and not tuned per loss; β, ε, γ and α are the papers' or the scripts' values, not
#   tuned on this data either. A loss that ranks low here may only need more steps or another learning rate;
#   read the table as "what each loss does in the same small budget", not as a verdict on the loss.
# - **The intervals are over seeds of this run**: data order and sampling keys. They do not cover the choice of
#   the SFT model, the comparisons (one draw of the simulated annotator) or the held-out prompts, which every
#   seed shares. With few seeds a t-interval is wide (4 seeds: 3.18 standard errors).
# - **Win rate and KL are Monte-Carlo estimates** on a fixed number of held-out prompts; the SFT row shows the
#   win rate's evaluation noise alone. The KL estimate is per response, summed over tokens; a policy that
#   shortens its responses lowers it.
# - **The toy world is simple.** The gold scorer is a Python function of the text and the model a 4-layer
#   Llama; how the losses rank here need not carry over to real models and human labels.
