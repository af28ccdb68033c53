"""Inter-annotator agreement: κ against hand arithmetic, α against the `krippendorff` package and the
published example, and the report on a hand-built three-annotator set."""
import json
import math

import krippendorff
import numpy as np
import pytest

from rlhf_jax.feedback.agreement import (
    agreement_report,
    cohen_kappa,
    krippendorff_alpha_nominal,
    pairwise_agreement,
    ranking_pair_labels,
)


def _labels_from_table(table, categories):
    """Two label lists whose contingency table (rows: annotator a, columns: annotator b) is ``table``."""
    a, b = [], []
    for r, row in enumerate(table):
        for c, count in enumerate(row):
            a += [categories[r]] * count
            b += [categories[c]] * count
    return a, b


def _units_from_reliability(data):
    """Coders × units matrix (nan = missing) -> {unit: {coder: label}}."""
    data = np.asarray(data, dtype=float)
    return {u: {c: data[c, u] for c in range(data.shape[0]) if not np.isnan(data[c, u])}
            for u in range(data.shape[1])}


# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", example C: 4 observers × 12 units,
# missing values; the paper reports nominal α = 0.743.
KRIPPENDORFF_2011 = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, np.nan, np.nan, np.nan],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, np.nan, 3],
    [np.nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, np.nan],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, np.nan],
]


# ---------------------------------------------------------------------------------------------- Cohen's κ


def test_kappa_3x3_table_by_hand():
    # rows: annotator a, columns: annotator b, categories A, B, tie
    table = [[6, 1, 1],
             [2, 5, 0],
             [1, 1, 3]]
    a, b = _labels_from_table(table, ["A", "B", "tie"])
    n = 20                                   # 8 + 7 + 5
    p_o = (6 + 5 + 3) / n                    # diagonal: 14 / 20 = 0.7
    # row totals (a): 8, 7, 5; column totals (b): 9, 7, 4
    p_e = (8 / n) * (9 / n) + (7 / n) * (7 / n) + (5 / n) * (4 / n)   # 141 / 400 = 0.3525
    want = (p_o - p_e) / (1 - p_e)           # 0.3475 / 0.6475 ≈ 0.5367
    assert len(a) == n
    assert cohen_kappa(a, b) == pytest.approx(want, rel=1e-12)
    assert cohen_kappa(a, b) == pytest.approx(0.3475 / 0.6475, rel=1e-12)
    # κ is symmetric in the two annotators and does not depend on the order of the units
    assert cohen_kappa(b, a) == pytest.approx(want, rel=1e-12)
    perm = np.random.default_rng(0).permutation(n)
    assert cohen_kappa([a[i] for i in perm], [b[i] for i in perm]) == pytest.approx(want, rel=1e-12)


def test_kappa_2x2_table_by_hand():
    # Wikipedia's worked example: 50 proposals, yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> κ = 0.4
    a, b = _labels_from_table([[20, 5], [10, 15]], ["yes", "no"])
    p_o = (20 + 15) / 50                          # 0.7
    p_e = (25 / 50) * (30 / 50) + (25 / 50) * (20 / 50)   # 0.3 + 0.2 = 0.5
    assert cohen_kappa(a, b) == pytest.approx((p_o - p_e) / (1 - p_e), rel=1e-12)
    assert cohen_kappa(a, b) == pytest.approx(0.4, rel=1e-12)


def test_kappa_limits_and_errors():
    assert cohen_kappa(["x", "y", "z", "x"], ["x", "y", "z", "x"]) == 1.0
    assert cohen_kappa([0, 1, 1, 0, 1], [0, 1, 1, 0, 1]) == 1.0
    # p_e = 1: both annotators use the single label "A" -> undefined
    assert math.isnan(cohen_kappa(["A"] * 5, ["A"] * 5))
    # one annotator constant, the other not: p_o = 1/2, p_e = 1·1/2 -> κ = 0, defined
    assert cohen_kappa(["A"] * 4, ["A", "B", "A", "B"]) == 0.0
    # systematic disagreement: p_o = 0, p_e = 1/2 -> κ = -1
    assert cohen_kappa(["x", "y", "x", "y"], ["y", "x", "y", "x"]) == -1.0
    assert cohen_kappa(["x", "y", "x", "y", "x"], ["y", "x", "y", "x", "x"]) < 0
    with pytest.raises(ValueError, match="3 and 2"):
        cohen_kappa([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="empty"):
        cohen_kappa([], [])


# ---------------------------------------------------------------------------------------- Krippendorff's α


def test_alpha_published_example():
    alpha = krippendorff_alpha_nominal(_units_from_reliability(KRIPPENDORFF_2011))
    assert round(alpha, 3) == 0.743
    want = krippendorff.alpha(reliability_data=KRIPPENDORFF_2011, level_of_measurement="nominal")
    assert alpha == pytest.approx(want, rel=1e-12)


def test_alpha_package_docstring_example():
    # the krippendorff package's own 3-coder example (from Wikipedia), nominal α = 0.691358
    data = [[np.nan, np.nan, np.nan, np.nan, np.nan, 3, 4, 1, 2, 1, 1, 3, 3, np.nan, 3],
            [1, np.nan, 2, 1, 3, 3, 4, 3, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan],
            [np.nan, np.nan, 2, 1, 3, 4, 4, np.nan, 2, 1, 1, 3, 3, np.nan, 4]]
    assert round(krippendorff_alpha_nominal(_units_from_reliability(data)), 6) == 0.691358


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_alpha_matches_krippendorff_package_on_random_sets(seed):
    rng = np.random.default_rng(seed)
    coders, n_units, n_labels = rng.integers(2, 7), rng.integers(5, 40), rng.integers(2, 6)
    # each unit has a "true" label most coders follow, so α is away from 0 and varies by seed
    truth = rng.integers(0, n_labels, size=n_units)
    data = np.where(rng.random((coders, n_units)) < 0.6, truth, rng.integers(0, n_labels, size=(coders, n_units)))
    data = data.astype(float)
    data[rng.random(data.shape) < 0.3] = np.nan
    want = krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")
    got = krippendorff_alpha_nominal(_units_from_reliability(data))
    assert np.isfinite(want)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    # nominal: renaming the labels (to strings) and the coders changes nothing
    renamed = {f"u{u}": {f"coder-{c}": f"label-{int(v)}" for c, v in ans.items()}
               for u, ans in _units_from_reliability(data).items()}
    assert krippendorff_alpha_nominal(renamed) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_alpha_perfect_agreement_and_unpairable_units():
    perfect = {0: {"a": "x", "b": "x", "c": "x"}, 1: {"a": "y", "b": "y"}, 2: {"b": "z", "c": "z"}}
    assert krippendorff_alpha_nominal(perfect) == 1.0

    units = _units_from_reliability(KRIPPENDORFF_2011)
    base = krippendorff_alpha_nominal(units)
    # single-label units, one with a label no pairable unit uses, are not pairable: α unchanged
    padded = dict(units, extra1={"a": 9.0}, extra2={"b": 1.0}, extra3={})
    assert krippendorff_alpha_nominal(padded) == pytest.approx(base, rel=1e-12)
    # whereas turning one of them into a pairable unit does change it
    assert krippendorff_alpha_nominal(dict(padded, extra1={"a": 9.0, "b": 1.0})) != pytest.approx(base, rel=1e-6)


def test_alpha_undefined_cases():
    assert math.isnan(krippendorff_alpha_nominal({}))
    assert math.isnan(krippendorff_alpha_nominal({0: {"a": 1}, 1: {"b": 2}}))          # nothing pairable
    assert math.isnan(krippendorff_alpha_nominal({0: {"a": 1, "b": 1}, 1: {"a": 1, "c": 1}}))  # D_e = 0


def test_pairwise_agreement():
    assert pairwise_agreement(["A", "B", "A"]) == pytest.approx(1 / 3)   # pairs (1,3) agree of 3
    assert pairwise_agreement(["A", "A", "B", "B"]) == pytest.approx(2 / 6)
    assert pairwise_agreement(["A", "A"]) == 1.0
    with pytest.raises(ValueError):
        pairwise_agreement(["A"])


# ---------------------------------------------------------------------------------------- rankings as pairs


def test_ranking_pair_labels_by_hand():
    # responses 0..3 ranked 2 > 0 > 3 > 1
    assert ranking_pair_labels(4, [2, 0, 3, 1]) == {
        (0, 1): "A", (0, 2): "B", (0, 3): "A",
        (1, 2): "B", (1, 3): "B",
        (2, 3): "A",
    }
    assert ranking_pair_labels(3, [0, 1, 2]) == {(0, 1): "A", (0, 2): "A", (1, 2): "A"}
    assert ranking_pair_labels(3, (2, 1, 0)) == {(0, 1): "B", (0, 2): "B", (1, 2): "B"}
    for bad in ([0, 1], [0, 1, 1], [0, 1, 3], [0, 1, 2, 3]):
        with pytest.raises(ValueError, match="permutation"):
            ranking_pair_labels(3, bad)


def test_rankings_feed_the_report():
    # two annotators rank the same 3 responses; they disagree only on pair (1, 2)
    rows = [((7, i, j), ann, lab) for ann, ranking in (("r1", [0, 1, 2]), ("r2", [0, 2, 1]))
            for (i, j), lab in ranking_pair_labels(3, ranking).items()]
    report = agreement_report(rows)
    assert report["units_with_overlap"] == 3
    assert report["percent_agreement"] == pytest.approx(2 / 3)
    assert report["per_unit"]["(7, 1, 2)"] == 0.0


# ---------------------------------------------------------------------------------------------- the report

# u1: A A A   u2: A B A   u3: B B -   u4: - A B   u5: B - -
ROWS = [
    ("u1", "ann1", "A"), ("u1", "ann2", "A"), ("u1", "ann3", "A"),
    ("u2", "ann1", "A"), ("u2", "ann2", "B"), ("u2", "ann3", "A"),
    ("u3", "ann1", "B"), ("u3", "ann2", "B"),
    ("u4", "ann2", "A"), ("u4", "ann3", "B"),
    ("u5", "ann1", "B"),
]
GOLD = {"u1": "A", "u2": "A", "u5": "A", "u9": "B"}  # u9 has no answers


def test_report_on_hand_built_set():
    report = agreement_report(ROWS, gold=GOLD)
    assert (report["answers"], report["annotators"], report["units"], report["units_with_overlap"]) == (11, 3, 5, 4)

    # agreeing pairs / pairs per overlapping unit: u1 3/3, u2 1/3 (only ann1-ann3), u3 1/1, u4 0/1
    assert report["per_unit"] == pytest.approx({"u1": 1.0, "u2": 1 / 3, "u3": 1.0, "u4": 0.0})
    assert report["percent_agreement"] == pytest.approx((1 + 1 / 3 + 1 + 0) / 4)   # 7/12

    # coincidences: o_AA = 3 (u1) + 1 (u2) = 4, o_AB = o_BA = 1 (u2) + 1 (u4) = 2, o_BB = 2 (u3)
    # n_A = 6, n_B = 4, n = 10: α = 1 − (n−1)·Σ_{c≠k} o_ck / Σ_{c≠k} n_c n_k = 1 − 9·4 / (2·6·4) = 0.25
    assert report["krippendorff_alpha"] == pytest.approx(0.25)
    data = [[1, 1, 2, np.nan, 2], [1, 2, 2, 1, np.nan], [1, 1, np.nan, 2, np.nan]]  # A=1, B=2, coders × units
    assert report["krippendorff_alpha"] == pytest.approx(krippendorff.alpha(reliability_data=data,
                                                                            level_of_measurement="nominal"))

    # ann1|ann2 on u1..u3: A A B vs A B B, p_o = 2/3, p_e = (2·1 + 1·2)/9 = 4/9, κ = (2/9)/(5/9) = 0.4
    # ann1|ann3 on u1, u2: all A -> p_e = 1, undefined
    # ann2|ann3 on u1, u2, u4: A B A vs A A B, p_o = 1/3, p_e = (2·2 + 1·1)/9 = 5/9, κ = (−2/9)/(4/9) = −0.5
    assert report["cohen_kappa"] == {
        "ann1|ann2": {"kappa": pytest.approx(0.4), "n": 3},
        "ann1|ann3": {"kappa": None, "n": 2},
        "ann2|ann3": {"kappa": pytest.approx(-0.5), "n": 3},
    }

    per = report["per_annotator"]
    # ann1: u1 (2 agree), u2 (ann3 agrees, ann2 not), u3 (ann2 agrees) -> 4/5; gold u1 ✓ u2 ✓ u5 ✗ -> 2/3
    assert per["ann1"] == {"answers": 4, "overlapping": 3, "agreement_with_others": pytest.approx(4 / 5),
                           "gold_agreement": pytest.approx(2 / 3)}
    # ann2: u1 2/2, u2 0/2, u3 1/1, u4 0/1 -> 3/6; gold u1 ✓ u2 ✗ -> 1/2
    assert per["ann2"] == {"answers": 4, "overlapping": 4, "agreement_with_others": pytest.approx(1 / 2),
                           "gold_agreement": pytest.approx(1 / 2)}
    # ann3: u1 2/2, u2 1/2, u4 0/1 -> 3/5; gold u1 ✓ u2 ✓ -> 1
    assert per["ann3"] == {"answers": 3, "overlapping": 3, "agreement_with_others": pytest.approx(3 / 5),
                           "gold_agreement": 1.0}

    # answers on gold units: u1 3 (3 ✓), u2 3 (2 ✓), u5 1 (0 ✓) -> 5/7; u9 has a gold label but no answer
    assert report["gold_agreement"] == pytest.approx(5 / 7)
    assert report["gold_units"] == 3
    assert report["gold_answers"] == 7
    assert json.loads(json.dumps(report, allow_nan=False)) == report


def test_report_without_gold_and_row_order():
    report = agreement_report(ROWS)
    assert report["gold_agreement"] is None and report["gold_units"] == 0
    assert all(p["gold_agreement"] is None for p in report["per_annotator"].values())
    # the same answers in another order give the same numbers
    shuffled = [ROWS[i] for i in np.random.default_rng(3).permutation(len(ROWS))]
    again = agreement_report(shuffled)
    assert again["percent_agreement"] == pytest.approx(report["percent_agreement"])
    assert again["krippendorff_alpha"] == pytest.approx(report["krippendorff_alpha"])
    assert again["cohen_kappa"] == report["cohen_kappa"]


def test_report_duplicate_answer_raises():
    with pytest.raises(ValueError, match=r"'ann2'.*'u2'"):
        agreement_report(ROWS + [("u2", "ann2", "B")])


def test_report_ids_that_print_alike_raise():
    with pytest.raises(ValueError, match="same str"):
        agreement_report([("u1", 1, "A"), ("u1", "1", "A")])


def test_report_without_overlap_is_none_and_json():
    report = agreement_report([("u1", "ann1", "A"), ("u2", "ann2", "B"), ("u3", "ann1", "B")], gold={"u4": "A"})
    assert report["units_with_overlap"] == 0
    assert report["percent_agreement"] is None
    assert report["krippendorff_alpha"] is None
    assert report["cohen_kappa"] == {} and report["per_unit"] == {}
    assert report["per_annotator"]["ann1"] == {"answers": 2, "overlapping": 0, "agreement_with_others": None,
                                               "gold_agreement": None}
    assert report["gold_agreement"] is None and report["gold_units"] == 0
    json.dumps(report, allow_nan=False)  # default json.dumps would write NaN; this raises on it


def test_report_all_one_label_has_no_nan():
    # everyone always says "A": α and κ are 0/0 -> None, percent agreement is 1
    report = agreement_report([(u, a, "A") for u in range(3) for a in ("x", "y")])
    assert report["percent_agreement"] == 1.0
    assert report["krippendorff_alpha"] is None
    assert report["cohen_kappa"] == {"x|y": {"kappa": None, "n": 3}}
    json.dumps(report, allow_nan=False)


def test_report_empty():
    report = agreement_report([])
    assert (report["answers"], report["annotators"], report["units"]) == (0, 0, 0)
    assert report["percent_agreement"] is None and report["krippendorff_alpha"] is None
    json.dumps(report, allow_nan=False)
