"""notebooks/ppo_anatomy: PPO's KL estimator, KL placement and advantage estimator taken apart on the embedded model.

Executes the notebook's cells (as notebooks/ppo_anatomy.py holds them) in a fresh kernel at the small budget (tiny SFT
and reward models trained into a fresh folder, 2 iterations per run) and checks what it printed: the hand case's k1,
k2 and k3 equal Schulman's formulas computed here in NumPy (and k1, k3 average to the exact KL under π, k2 not), and
the results table has a finite, in-range row for the SFT model and for each of the eight runs (k1/k2/k3 in the
reward, k1/k2/k3 in the loss, RLOO and GRPO advantages) with the advantage and KL placement each run claims. Also: the
committed .ipynb is paired with the .py and has outputs.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from notebook_runner import check_paired, execute, printed, session_dir, small_env

NAME = "ppo_anatomy"
NUMBER = r"(-?\d+\.\d+)"
RUNS = {  # label -> (advantage, KL placement)
    "k1 in the reward (PPO)": ("gae", "k1 in the reward"),
    "k2 in the reward": ("gae", "k2 in the reward"),
    "k3 in the reward": ("gae", "k3 in the reward"),
    "k1 in the loss": ("gae", "k1 in the loss"),
    "k2 in the loss": ("gae", "k2 in the loss"),
    "k3 in the loss": ("gae", "k3 in the loss"),
    "RLOO advantages": ("rloo", "k1 in the reward"),
    "GRPO advantages": ("grpo", "k1 in the reward"),
}


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> str:
    # the SFT and reward models custom_loss and ppo_anatomy share: the notebooks' lock lets the first xdist worker
    # build them and the other reuse them
    env = small_env(RLHF_JAX_NOTEBOOK_CACHE=str(session_dir(tmp_path_factory) / "notebook_models"))
    return printed(execute(NAME, env))


def _vector(text: str, name: str) -> np.ndarray:
    return np.array(re.search(rf"^{re.escape(name)} = \[([^\]]*)\]", text, re.M)[1].split(), np.float64)


def test_paired_and_committed_with_outputs():
    check_paired(NAME)


def test_the_printed_kl_estimators_equal_their_formulas(text):
    pi, ref = _vector(text, "pi"), _vector(text, "pi_ref")
    assert pi.shape == ref.shape == (5,) and abs(pi.sum() - 1) < 1e-9 and abs(ref.sum() - 1) < 1e-9
    log_ratio = np.log(pi) - np.log(ref)  # log ρ = log π − log π_ref
    r = np.exp(-log_ratio)  # r = π_ref / π
    formulas = {"k1": log_ratio, "k2": 0.5 * log_ratio ** 2, "k3": (r - 1) - np.log(r)}
    exact_kl = float(np.sum(pi * log_ratio))
    assert float(re.search(rf"^KL\(pi \|\| pi_ref\) = {NUMBER}$", text, re.M)[1]) == pytest.approx(exact_kl, abs=2e-6)
    expectation = {}
    for name, formula in formulas.items():
        m = re.search(rf"^{name} per token = \[([^\]]*)\]   E_pi\[{name}\] = {NUMBER}$", text, re.M)
        assert m, name
        np.testing.assert_allclose(np.array(m[1].split(), np.float64), formula, atol=2e-6, err_msg=name)
        expectation[name] = float(m[2])
        assert expectation[name] == pytest.approx(float(np.sum(pi * formula)), abs=2e-6)
    assert expectation["k1"] == pytest.approx(exact_kl, abs=2e-6)  # unbiased
    assert expectation["k3"] == pytest.approx(exact_kl, abs=2e-6)  # unbiased
    assert abs(expectation["k2"] - exact_kl) > 1e-3  # biased: the check tells the estimators apart
    assert np.any(formulas["k1"] < 0)  # the hand case has a token where k1 is negative


def test_the_table_has_a_row_per_run_with_gold_and_kl(text):
    rows = {}
    for m in re.finditer(rf"^\| (.+?) \| (\S+) \| (.+?) \| {NUMBER} \| {NUMBER} \| {NUMBER}% \| {NUMBER} \| {NUMBER} \|$",
                         text, re.M):
        assert m[1] not in rows, f"row {m[1]!r} printed twice"
        rows[m[1]] = dict(advantage=m[2], kl=m[3], gold=float(m[4]), gold_se=float(m[5]), win=float(m[6]) / 100,
                          kl_to_sft=float(m[7]), rm=float(m[8]))
    assert list(rows) == ["SFT", *RUNS], list(rows)
    assert all(math.isfinite(rows["SFT"][k]) for k in ("gold", "gold_se", "rm")), rows["SFT"]
    for label, (advantage, placement) in RUNS.items():
        row = rows[label]
        assert (row["advantage"], row["kl"]) == (advantage, placement), (label, row)
        assert all(math.isfinite(v) for v in (row["gold"], row["gold_se"], row["kl_to_sft"], row["rm"])), (label, row)
        assert 0.0 <= row["win"] <= 1.0 and row["gold_se"] >= 0.0, (label, row)
        assert abs(row["kl_to_sft"]) < 50.0, (label, row)  # nats per response of at most a few dozen tokens
    # each run trained: its policy differs from the SFT model somewhere on the held-out prompts
    assert any(rows[label]["kl_to_sft"] != 0.0 for label in RUNS)
