"""Runs notebooks/loss_ablation_bandit.py end to end (small budget) and checks its printed table."""
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "loss_ablation_bandit.py"


@pytest.fixture(scope="module")
def output() -> str:
    env = dict(os.environ)
    env.update(
        BANDIT_ITERATIONS="40",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or str(ROOT / ".cache" / "jax_test"),  # conftest's cache
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    env.pop("XLA_FLAGS", None)  # one device is enough; avoids 8 fake devices in the child
    proc = subprocess.run([sys.executable, str(NOTEBOOK)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _table(text: str) -> dict[str, tuple[float, float, np.ndarray]]:
    rows = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\| (\w+) \| ([\d.]+) \| (-?[\d.]+) \| ([\d. ]+) \|", line.strip())
        if m:
            rows[m[1]] = (float(m[2]), float(m[3]), np.array(m[4].split(), np.float64))
    return rows


def test_table_rows_are_consistent_with_the_printed_policies(output):
    rows = _table(output)
    assert set(rows) == {"reference", "optimum", "ppo", "dpo", "ipo", "simpo"}
    ref, opt = rows["reference"][2], rows["optimum"][2]
    beta = float(re.search(r"^beta = ([\d.]+)$", output, re.M)[1])
    reward = np.array(re.search(r"^reward = \[([^\]]*)\]", output, re.M)[1].split(), np.float64)
    # π* ∝ π_ref exp(r/β), recomputed from the printed setup (reward printed to 4 decimals).
    star = ref * np.exp(reward / beta)
    np.testing.assert_allclose(opt, star / star.sum(), atol=2e-4)
    for name, (tv, kl_ref, p) in rows.items():
        assert p.shape == (8,) and np.all(p >= 0) and abs(p.sum() - 1) < 1e-4, name
        np.testing.assert_allclose(tv, 0.5 * np.abs(p - opt).sum(), atol=2e-4, err_msg=name)
        nz = p > 0
        np.testing.assert_allclose(kl_ref, np.sum(p[nz] * np.log(p[nz] / ref[nz])), atol=2e-3, err_msg=name)
    assert rows["reference"][1] == 0.0 and rows["optimum"][0] == 0.0


def test_ppo_and_dpo_move_towards_the_optimum_on_a_small_budget(output):
    rows = _table(output)
    start = rows["reference"][0]
    assert start > 0.3
    assert rows["ppo"][0] < 0.5 * start
    assert rows["dpo"][0] < 0.5 * start
