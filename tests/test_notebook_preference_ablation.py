"""Executes notebooks/preference_ablation (the preference-loss ablation on the embedded default) at the small
budget (a tiny SFT model trained into a fresh folder, 6 steps, 2 seeds) in a fresh kernel, and checks what it
printed: the vmapped seeds train exactly as one seed alone, each loss starts where its formula says it must at
π = π_SFT, DPO moves the policy, and the table has one finite, in-range row per loss."""
from __future__ import annotations

import math
import re

import pytest

from notebook_runner import check_paired, execute, printed, small_env

NAME = "preference_ablation"
LOSSES = ["DPO", "IPO", "cDPO", "SimPO", "RPO", "KTO"]
NUMBER = r"(-?\d+\.\d+)"


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> str:
    # the SFT model is trained anew
    env = small_env(RLHF_JAX_NOTEBOOK_CACHE=str(tmp_path_factory.mktemp("notebook_cache")))
    return printed(execute(NAME, env))


def _table(text: str) -> dict[str, dict[str, tuple[float, float]]]:
    """The results table: loss -> column -> (mean, half-width)."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    assert header[0] == "loss", lines[0]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        values = [re.fullmatch(rf"{NUMBER} ± {NUMBER}", c) for c in cells[1:]]
        assert all(values), line
        rows[cells[0]] = {h: (float(m[1]), float(m[2])) for h, m in zip(header[1:], values)}
    return rows


def test_paired_and_committed_with_outputs():
    check_paired(NAME)


def test_vmapped_seeds_train_as_one_seed_alone(text):
    m = re.search(r"vmap check \(DPO, seed 0, (\d+) steps\): max \|θ_vmap − θ_alone\| = (\S+) "
                  r"\(max \|θ − θ_SFT\| = (\S+)\); max \|loss_vmap − loss_alone\| = (\S+)", text)
    assert m, text[-3000:]
    diff, moved, loss_diff = float(m[2]), float(m[3]), float(m[4])
    assert moved > 0  # the check compares states that trained, not two copies of the SFT model
    assert diff <= 1e-3 * moved and loss_diff <= 1e-5, m[0]


def test_every_loss_starts_at_its_value_for_the_reference_policy(text):
    """At step 1 the policy is the SFT model, which is also the reference: h = 0 for every pair, so DPO and cDPO
    give log 2, IPO (0 − 1/(2β))² = 25 at β = 0.1, KTO λ − λσ(0) = 0.5; RPO adds the chosen NLL to log 2."""
    first = {m[1]: float(m[2]) for m in re.finditer(rf"^  (\w+) +{NUMBER} → {NUMBER}$", text, re.M)}
    assert sorted(first) == sorted(LOSSES), text[-3000:]
    assert first["DPO"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["cDPO"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["IPO"] == pytest.approx(25.0, abs=1e-3)
    assert first["KTO"] == pytest.approx(0.5, abs=1e-4)
    assert first["RPO"] > math.log(2) + 0.5  # the NLL of a briefly trained model is far above 0.5 nats per token
    assert math.isfinite(first["SimPO"])


def test_table_has_one_finite_row_per_loss_and_dpo_moves_the_policy(text):
    rows = _table(text)
    assert list(rows) == ["SFT", *LOSSES]
    for name, row in rows.items():
        assert all(math.isfinite(v) for pair in row.values() for v in pair), (name, row)
        assert 0.0 <= row["win rate vs SFT"][0] <= 1.0, (name, row)
        assert 0.0 <= row["EOS rate"][0] <= 1.0, (name, row)
        assert 0.0 < row["response tokens"][0] <= 48.0, (name, row)
    assert rows["SFT"]["KL to SFT (nats)"] == (0.0, 0.0)  # the SFT model against itself: log-ratios are exactly 0
    assert rows["DPO"]["KL to SFT (nats)"][0] > 0.0
