"""notebooks/bandit: every preference loss and policy-gradient choice on the one-step bandit (rlhf_jax.bandit).

Executes the notebook's cells (as notebooks/bandit.py holds them) in a fresh kernel at the small budget and checks
the figures it prints: the setup's π* is π_ref·exp(r/β) normalised, DPO (offline and online) and robust DPO at the
labels' flip rate reach π*, IPO lands on its closed-form optimum, every policy-gradient row whose analysis predicts
an optimum lands on it, and every registered variant has a row. Also: the committed .ipynb is paired with the .py,
and seeds trained side by side (vmap) equal the same seeds trained one at a time.
"""
from __future__ import annotations

import functools
import re

import jax
import numpy as np
import pytest

from notebook_runner import check_paired, execute, printed, small_env
from rlhf_jax import bandit as bd
from rlhf_jax import registry
from rlhf_jax.rl.algorithms import PRESETS

NAME = "bandit"
NUMBER = r"(-?\d+\.\d+)"
CELL = rf"{NUMBER} ± {NUMBER}"


@pytest.fixture(scope="module")
def text() -> str:
    env = small_env()
    return printed(execute(NAME, env))


def _rows(text: str) -> dict[str, tuple[float, float, float | None]]:
    """Every table row: variant -> (mean TV to π*, mean KL to π_ref, mean TV to its own optimum or None)."""
    rows = {}
    for m in re.finditer(rf"^\| (.+?) \| {CELL} \| {CELL} \| (?:{CELL}|—) \|$", text, re.M):
        assert m[1] not in rows, f"row {m[1]!r} printed twice"
        rows[m[1]] = (float(m[2]), float(m[4]), None if m[6] is None else float(m[6]))
    return rows


def _vector(text: str, name: str) -> np.ndarray:
    return np.array(re.search(rf"^{name} = \[([^\]]*)\]", text, re.M)[1].split(), np.float64)


def test_paired_and_committed_with_outputs():
    check_paired(NAME)


def test_the_setup_printed_is_the_kl_regularised_optimum(text):
    ref, reward, star = _vector(text, "pi_ref"), _vector(text, "reward"), _vector(text, "pi_star")
    beta = float(re.search(rf"^beta = {NUMBER}$", text, re.M)[1])
    unnorm = ref * np.exp(reward / beta)
    np.testing.assert_allclose(star, unnorm / unnorm.sum(), atol=3e-4)  # printed to 4 decimals
    assert 0.5 * np.abs(ref - star).sum() > 0.3  # the optimum is far from the start: reaching it means something


def test_exact_preference_losses_reach_the_optimum_and_ipo_its_own(text):
    rows = _rows(text)
    for name in ("dpo", "dpo online", "robust ε=0.2, 20% flipped"):
        tv, kl, own = rows[name]
        assert tv < 0.02 and own == tv, (name, rows[name])
    tv, kl, own = rows["ipo"]
    assert own < 0.01 and tv > 0.2, rows["ipo"]  # on its own optimum, far from π*
    assert rows["dpo, 20% flipped"][0] > 0.05  # label noise biases plain DPO: robust DPO's row means something
    assert rows["cdpo ε=0.1"][1] < rows["dpo"][1] < rows["robust ε=0.1"][1]  # flatter / sharper than π*


def test_policy_gradient_rows_land_on_their_predicted_optima(text):
    rows = _rows(text)
    predicted = {name: row for name, row in rows.items() if row[2] is not None and not name.startswith(
        ("dpo", "robust", "ipo"))}
    assert len(predicted) >= 25, sorted(predicted)
    for name, (tv, kl, own) in predicted.items():
        assert own < 0.05, (name, rows[name])
    for name in ("preset ppo", "preset rloo", "advantage=grpo", "kl=loss:k2"):  # k1 in the reward, k2 in the loss
        assert rows[name][0] < 0.02, (name, rows[name])
    for name in ("preset grpo", "kl=loss:k3", "advantage=grpo, kl=loss:k2", "advantage=reinforce_pp_baseline"):
        assert rows[name][0] > 0.05, (name, rows[name])  # ... and the ones the analysis says miss π*


def test_every_registered_variant_has_a_row(text):
    rows = _rows(text)
    expected = {f"preset {name}" for name in PRESETS}
    expected |= {f"advantage={name}" for name in registry.ADVANTAGES}
    expected |= {f"policy_loss={name}" for name in registry.POLICY_LOSSES}
    expected |= {f"aggregation={name}" for name in registry.AGGREGATIONS}
    expected |= {f"kl={p}:{e}" for p in ("reward", "loss") for e in registry.KL_ESTIMATORS} | {"kl=none"}
    assert set(registry.KL_PLACEMENTS.names()) == {"reward", "loss", "none"}
    names = {name.removesuffix(" (base)") for name in rows}
    assert expected <= names, sorted(expected - names)
    losses = {name.split()[0].rstrip(",") for name in rows if not name.startswith(("preset", "advantage", "kl=",
                                                                                   "policy_loss", "aggregation"))}
    assert set(registry.PREFERENCE_LOSSES.names()) | {bd.KTO} <= losses, sorted(losses)


# --- Seeds side by side: vmap is the same computation as a loop over seeds -------------------------------------

BANDIT = bd.make_bandit()
TRAINERS = {
    "policy gradient": functools.partial(bd.train_policy_gradient, bandit=BANDIT, algos=(PRESETS["ppo"], PRESETS["grpo"]),
                                         iterations=30, samples=256, epochs=2, minibatches=2),
    "preference": functools.partial(bd.train_preference, bandit=BANDIT, iterations=30, pairs=512,
                                    setups=(bd.PreferenceSetup("dpo", on_policy=True), bd.PreferenceSetup(bd.KTO))),
}


@pytest.mark.parametrize("kind", list(TRAINERS))
def test_vmapped_seeds_equal_seeds_trained_one_at_a_time(kind):
    train = TRAINERS[kind]
    keys_S = bd.seed_keys(3, 3)
    together = bd.over_seeds(train)
    alone = jax.jit(train)
    for variant in (0, 1):
        probs_SIV = np.asarray(together(keys_S, variant))
        one_by_one_SIV = np.stack([np.asarray(alone(key, variant)) for key in keys_S])
        assert probs_SIV.shape == (3, 30, 8)
        np.testing.assert_allclose(probs_SIV, one_by_one_SIV, rtol=0, atol=2e-6)
        assert np.abs(probs_SIV[0] - probs_SIV[1]).max() > 1e-3  # the seeds differ: the check compares something
