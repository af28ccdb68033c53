"""notebooks/overoptimisation: the pipeline's --preset overoptimise, read back as Gao et al.'s curves and fits.

Executes the notebook's cells (as notebooks/overoptimisation.py holds them) in a fresh kernel at the small budget and
checks what it printed: best-of-n's analytic KL is log n − (n − 1)/n and the Monte-Carlo KL of sampled best-of-n
agrees with it within three standard errors; every curve (PPO, PPO judged by the worst of three reward models,
best-of-n, best-of-n judged by the ensemble) has its points, best-of-n at the analytic KL; each printed fit is the
least-squares fit of its printed points (checked against scipy's curve_fit of Gao et al.'s R(d) written out here);
the printed peaks are the points' maxima. Also: the committed .ipynb is paired with the .py and has outputs.
"""
from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
from scipy.optimize import OptimizeWarning, curve_fit

from notebook_runner import check_paired, execute, printed, session_dir, small_env

NAME = "overoptimisation"
NUMBER = r"([-+]?\d+\.\d+)"
CURVES = ("PPO", "PPO (RM ensemble)", "best-of-n", "best-of-n (RM ensemble)")
R = {"bon": lambda d, a, b: d * (a - b * d),  # Gao et al. 2022, eq. 1 and eq. 2
     "rl": lambda d, a, b: d * (a - b * np.log(d))}


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> str:
    env = small_env(RLHF_JAX_NOTEBOOK_CACHE=str(session_dir(tmp_path_factory) / "notebook_models"))
    return printed(execute(NAME, env))


def _curves(text: str) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (form, rows of (step, KL, d, proxy, gold)) from the printed Markdown tables."""
    out = {}
    for m in re.finditer(r"^(.+) \((bon|rl)\):\n\| (?:n|iteration) \| KL \(nats\) \| d \| proxy \| gold \|\n\|---\|---\|---\|---\|---\|\n"
                         r"((?:\|.*\|\n)+)", text, re.M):
        rows = [[float(x) for x in line.strip("|").split("|")] for line in m[3].strip().splitlines()]
        out[m[1]] = (m[2], np.array(rows))
    return out


def test_paired_and_committed_with_outputs():
    check_paired(NAME)


def test_best_of_n_kl_is_analytic_and_matches_monte_carlo(text):
    found = re.findall(rf"^n = +(\d+): analytic KL {NUMBER}   Monte-Carlo {NUMBER} \+- {NUMBER} \(standard error\)$",
                       text, re.M)
    assert [int(n) for n, *_ in found] == [2, 4, 16, 64], found
    for n, analytic, mc, se in found:
        n, analytic, mc, se = int(n), float(analytic), float(mc), float(se)
        assert analytic == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-4)
        assert 0 < se < 0.05 and abs(mc - analytic) < 3 * se, (n, analytic, mc, se)


def test_every_curve_is_printed_with_its_points(text):
    curves = _curves(text)
    assert list(curves) == list(CURVES), list(curves)
    for name in ("PPO", "PPO (RM ensemble)"):
        form, rows = curves[name]
        assert form == "rl" and rows[:, 0].tolist() == [0, 1, 2, 3]  # the small budget: an evaluation per iteration
        assert np.all(rows[0, 1:] == 0) and np.all(rows[:, 1] >= 0)
        d, kl = rows[:, 2], rows[:, 1]
        assert np.all(np.abs(d ** 2 - kl) <= 0.006 + 0.002 * d), rows  # d = sqrt(KL), both printed rounded
    for name in ("best-of-n", "best-of-n (RM ensemble)"):
        form, rows = curves[name]
        n = rows[:, 0]
        assert form == "bon" and n.tolist() == [1, 2, 4]
        np.testing.assert_allclose(rows[:, 1], np.log(n) - (n - 1) / n, atol=0.005)  # the analytic KL
        assert rows[0, 3] == pytest.approx(0, abs=1e-3) and rows[0, 4] == pytest.approx(0, abs=1e-3)  # best of 1 = SFT
    # best-of-n's KL axis is analytic: the same whichever reward model picks the best
    np.testing.assert_array_equal(curves["best-of-n"][1][:, 1], curves["best-of-n (RM ensemble)"][1][:, 1])


def test_the_printed_fits_are_the_least_squares_fits_of_the_points(text):
    curves = _curves(text)
    fits = {m[1]: [float(x) for x in m.groups()[1:]] for m in re.finditer(
        rf"^\| (.+?) \| {NUMBER}, {NUMBER} \| {NUMBER}, {NUMBER} \| {NUMBER} \({NUMBER}\) \| {NUMBER} \({NUMBER}\) \| "
        rf"{NUMBER} \| {NUMBER} \|$", text, re.M)}
    assert list(fits) == list(CURVES), list(fits)
    for name, (form, rows) in curves.items():
        keep = rows[:, 2] > 0  # R(0) = 0 whatever alpha and beta are
        d = rows[keep, 2]
        for (alpha, beta), column in ((fits[name][0:2], 4), (fits[name][2:4], 3)):  # gold, then proxy
            r = rows[keep, column]
            with warnings.catch_warnings():  # two points, two parameters: no covariance, still the optimum
                warnings.simplefilter("ignore", OptimizeWarning)
                best, _ = curve_fit(R[form], d, r, p0=(0.1, 0.1))
            sse = lambda p: float(np.sum((R[form](d, *p) - r) ** 2))  # noqa: E731
            # the printed (alpha, beta) are as good as scipy's optimum, up to the 3 printed decimals of the points
            assert sse((alpha, beta)) <= sse(best) + 1e-3, (name, column, (alpha, beta), best)
        gold, proxy = rows[:, 4], rows[:, 3]
        peak = int(np.argmax(gold))
        assert fits[name][4] == pytest.approx(gold[peak], abs=1e-3) and fits[name][5] == pytest.approx(rows[peak, 1], abs=0.05)
        assert fits[name][6] == pytest.approx(gold[-1], abs=1e-3) and fits[name][9] == pytest.approx(proxy[-1], abs=1e-3)
        assert fits[name][8] == pytest.approx(proxy[peak], abs=1e-3)
    for label, name in (("single reward model", "PPO"), ("worst of 3 reward models", "PPO (RM ensemble)")):
        m = re.search(rf"^PPO, {label}: gold peak {NUMBER} at iteration (\d+), ends {NUMBER}$", text, re.M)
        gold = curves[name][1][:, 4]
        assert m and float(m[1]) == pytest.approx(gold.max(), abs=1e-3) and int(m[2]) == int(np.argmax(gold))
        assert float(m[3]) == pytest.approx(gold[-1], abs=1e-3)
