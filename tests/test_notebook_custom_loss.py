"""notebooks/custom_loss: a policy loss written in a notebook cell (PPO on the top-20% entropy "forking" tokens),
passed by functools.partial into the library's update step and trained with the library's RL loop.

Executes the notebook's cells (as notebooks/custom_loss.py holds them) in a fresh kernel at the small budget (tiny
SFT and reward models, shared with notebooks/ppo_anatomy's test, 2 iterations per run) and checks what it printed:
the hand-made gradient check equals the clipped surrogate's gradient computed here in NumPy, and the custom loss's
is PPO's on the two highest-entropy tokens and 0 elsewhere; the custom loss really ran inside the library's step
(its own metric ``forking/kept`` was logged every iteration of its run, never in the stock run, and kept about 20%
of the tokens); the table has a finite row for SFT, the stock loss and the custom loss. Also: the committed .ipynb is
paired with the .py and has outputs.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from notebook_runner import check_paired, execute, printed, session_dir, small_env

NAME = "custom_loss"
NUMBER = r"(-?\d+\.\d+)"


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> str:
    # the SFT and reward models custom_loss and ppo_anatomy share: the notebooks' lock lets the first xdist worker
    # build them and the other reuse them
    env = small_env(RLHF_JAX_NOTEBOOK_CACHE=str(session_dir(tmp_path_factory) / "notebook_models"))
    return printed(execute(NAME, env))


def _numbers(text: str, name: str) -> np.ndarray:
    line = re.search(rf"^{name} +((?: +-?\d+\.\d+)+)$", text, re.M)
    assert line, name
    return np.array(line[1].split(), np.float64)


def test_paired_and_committed_with_outputs():
    check_paired(NAME)


def test_the_gradient_check_is_the_clipped_surrogates_and_zero_off_the_forking_tokens(text):
    # the notebook's hand-made arrays (its cell draws them from default_rng(0) in this order, as float32)
    rng = np.random.default_rng(0)
    old = np.log(rng.uniform(0.2, 0.9, (1, 10))).astype(np.float32)[0].astype(np.float64)
    new = (old.astype(np.float32) + rng.normal(0.0, 0.1, (1, 10)).astype(np.float32)[0]).astype(np.float64)
    adv = rng.normal(size=(1, 10)).astype(np.float32)[0].astype(np.float64)
    ratio = np.exp(new - old)
    # ∂/∂log π of mean_t max(−A ρ, −A clip(ρ, 0.8, 1.2)): −A ρ / T where the unclipped term is the max, else 0
    unclipped_is_max = -adv * ratio >= -adv * np.clip(ratio, 0.8, 1.2)
    expected = np.where(unclipped_is_max, -adv * ratio / 10, 0.0)
    entropy, ppo, forking = _numbers(text, "entropy"), _numbers(text, "ppo_clip"), _numbers(text, "forking")
    np.testing.assert_allclose(entropy, np.linspace(0.1, 1.0, 10), atol=0.051)
    np.testing.assert_allclose(ppo, expected, atol=6e-4)
    assert np.count_nonzero(expected) >= 5  # most tokens carry a gradient: zeros below mean something
    np.testing.assert_allclose(forking[8:], expected[8:], atol=6e-4)  # the two highest-entropy tokens (top 20%)
    assert np.all(forking[:8] == 0.0)
    assert np.any(expected[:8] != 0.0)
    assert "equal to PPO's on the top 20%, zero on the rest: True" in text


def test_the_custom_loss_ran_inside_the_librarys_step(text):
    iterations = int(re.search(r"'iterations': (\d+)", text)[1])
    logged = re.search(r"forking/kept: \{'ppo_clip': (\d+), 'forking': (\d+)\}", text)
    assert logged, text[-2000:]
    assert int(logged[1]) == 0 and int(logged[2]) == iterations >= 1


def test_the_table_has_the_stock_and_the_custom_loss(text):
    rows = {}
    for m in re.finditer(rf"^\| (.+?) \| {NUMBER} \| {NUMBER} \| {NUMBER}% \| {NUMBER} \| {NUMBER} \| (.+?) \|$",
                         text, re.M):
        rows[m[1]] = dict(gold=float(m[2]), se=float(m[3]), win=float(m[4]) / 100, kl=float(m[5]), rm=float(m[6]),
                          kept=m[7])
    assert list(rows) == ["SFT", "PPO clip (stock)", "PPO on forking tokens (custom)"], list(rows)
    for name, row in rows.items():
        assert all(math.isfinite(row[k]) for k in ("gold", "se", "kl", "rm")), (name, row)
        assert 0.0 <= row["win"] <= 1.0, (name, row)
    kept = float(rows["PPO on forking tokens (custom)"]["kept"].rstrip("%")) / 100
    assert 0.2 <= kept <= 0.35, kept  # ceil(20%) of each minibatch's response tokens
