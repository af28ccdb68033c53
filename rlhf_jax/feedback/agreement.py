"""Inter-annotator agreement for feedback where several annotators answer the same items.

Pure Python and NumPy, one function per statistic:

- ``pairwise_agreement``: the fraction of annotator pairs on one unit that gave the same label;
- ``cohen_kappa``: Cohen's κ for two annotators over the same units;
- ``coincidence_matrix`` and ``krippendorff_alpha_nominal``: Krippendorff's nominal α for any number of
  annotators with missing answers (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability");
- ``ranking_pair_labels``: a K-way ranking as the K·(K−1)/2 pairwise labels annotators are compared on;
- ``agreement_report``: all of the above over ``(unit, annotator, label)`` rows, as a JSON-ready dict.

Labels are any hashable values compared with ``==`` (``1 == 1.0 == True`` are one label). Every label
counts, ``None`` included: drop skipped answers before calling.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np

Label = Hashable


def pairwise_agreement(labels: Sequence[Label]) -> float:
    """Fraction of the unordered pairs of ``labels`` (one unit's answers) that are equal.

        agreement = Σ_c m_c·(m_c − 1) / (m·(m − 1))

    with m = len(labels) and m_c the number of labels equal to c. Raises ``ValueError`` for fewer than
    two labels (no pair).
    """
    m = len(labels)
    if m < 2:
        raise ValueError(f"pairwise agreement needs at least 2 labels, got {m}")
    return sum(m_c * (m_c - 1) for m_c in Counter(labels).values()) / (m * (m - 1))


def cohen_kappa(labels_a: Sequence[Label], labels_b: Sequence[Label]) -> float:
    """Cohen's κ of two annotators who labelled the same N units (``labels_a[i]``, ``labels_b[i]``: unit i).

        κ = (p_o − p_e) / (1 − p_e),   p_o = (1/N)·Σ_i [a_i = b_i],   p_e = Σ_c (n_a(c)/N)·(n_b(c)/N)

    where n_a(c), n_b(c) count how often each annotator used label c (each annotator's own marginals,
    Cohen 1960). Computed from the integer counts as (N·agree − Σ_c n_a(c)·n_b(c)) / (N² − Σ_c n_a(c)·n_b(c)),
    so p_e = 1 is detected exactly.

    Returns ``nan`` when p_e = 1, which happens exactly when both annotators used one and the same single
    label for every unit: κ is 0/0 there (chance alone predicts the perfect agreement). Raises ``ValueError``
    on inputs of different lengths or empty inputs.
    """
    n = len(labels_a)
    if n != len(labels_b):
        raise ValueError(f"cohen_kappa needs labels for the same units: got {n} and {len(labels_b)} labels")
    if n == 0:
        raise ValueError("cohen_kappa needs at least one unit, got empty label lists")
    agree = sum(a == b for a, b in zip(labels_a, labels_b))
    count_a, count_b = Counter(labels_a), Counter(labels_b)
    chance = sum(count_a[c] * count_b[c] for c in count_a if c in count_b)  # N²·p_e
    if chance == n * n:
        return math.nan
    return (n * agree - chance) / (n * n - chance)


def coincidence_matrix(units: Mapping[Hashable, Mapping[Hashable, Label]]) -> tuple[list[Label], np.ndarray]:
    """Krippendorff's coincidence matrix of the pairable units: ``(values, o)`` with ``o[c, k]`` for
    ``values[c]``, ``values[k]``.

        o_ck = Σ_u (number of ordered pairs (i, j), i ≠ j, of u's values with value_i = c, value_j = k) / (m_u − 1)

    over units u with m_u ≥ 2 values (a unit with one value has no pair and is left out). Each pairable value
    contributes 1 in total, so the row sum n_c = Σ_k o_ck counts the pairable values equal to c. ``values``
    are in order of first appearance.
    """
    index: dict[Label, int] = {}
    per_unit: list[tuple[int, Counter]] = []
    for answers in units.values():
        if len(answers) < 2:
            continue
        counts = Counter(answers.values())
        for value in counts:
            index.setdefault(value, len(index))
        per_unit.append((len(answers), counts))
    o = np.zeros((len(index), len(index)), np.float64)
    for m_u, counts in per_unit:
        for c, m_c in counts.items():
            for k, m_k in counts.items():
                pairs = m_c * (m_c - 1) if c == k else m_c * m_k
                o[index[c], index[k]] += pairs / (m_u - 1)
    return list(index), o


def krippendorff_alpha_nominal(units: Mapping[Hashable, Mapping[Hashable, Label]]) -> float:
    """Krippendorff's α for nominal labels; ``units`` maps unit id -> {annotator id: label}, missing answers absent.

        α = 1 − D_o / D_e,   D_o = (1/n)·Σ_{c≠k} o_ck,   D_e = (1/(n·(n − 1)))·Σ_{c≠k} n_c·n_k

    with o the coincidence matrix (``coincidence_matrix``), n_c = Σ_k o_ck and n = Σ_c n_c the number of
    pairable values (Krippendorff 2011, eqs. for nominal data). Units with fewer than 2 labels are not
    pairable and are ignored. Returns ``nan`` when there are fewer than 2 pairable values or D_e = 0 (every
    pairable value is the same label, so α is 0/0).
    """
    _, o = coincidence_matrix(units)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    if n < 2 or np.count_nonzero(n_c) < 2:
        return math.nan
    d_o = (o.sum() - np.trace(o)) / n
    d_e = (n * n - np.sum(n_c * n_c)) / (n * (n - 1))
    return float(1.0 - d_o / d_e)


def ranking_pair_labels(responses_n: int, ranking: Sequence[int]) -> dict[tuple[int, int], str]:
    """A K-way ranking as pairwise labels: ``{(i, j): "A" if response i ranks above j else "B"}`` for i < j.

    ``ranking`` lists the response indices best first and must be a permutation of ``range(responses_n)``;
    position(i) < position(j) gives "A" (the first response of the pair, i, is preferred). Each ranking gives
    K·(K − 1)/2 labels, so annotators who ranked the same K responses can be compared pair by pair.
    Raises ``ValueError`` when ``ranking`` is not such a permutation.
    """
    ranking = list(ranking)
    if sorted(ranking) != list(range(responses_n)):
        raise ValueError(f"ranking {ranking} is not a permutation of the {responses_n} response indices 0..{responses_n - 1}")
    position = {response: rank for rank, response in enumerate(ranking)}
    return {(i, j): "A" if position[i] < position[j] else "B"
            for i in range(responses_n) for j in range(i + 1, responses_n)}


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _str_ids(ids: Iterable[Hashable], kind: str) -> dict[Hashable, str]:
    """``{id: str(id)}``, refusing two ids that print the same (their report entries would overwrite each other)."""
    names: dict[Hashable, str] = {}
    seen: dict[str, Hashable] = {}
    for i in ids:
        name = str(i)
        if name in seen:
            raise ValueError(f"{kind} ids {seen[name]!r} and {i!r} have the same str() {name!r}; the report keys on str()")
        seen[name] = i
        names[i] = name
    return names


def agreement_report(answers: Iterable[tuple[Hashable, Hashable, Label]], *,
                     gold: Mapping[Hashable, Label] | None = None) -> dict:
    """Agreement statistics over ``(unit id, annotator id, label)`` rows, as a JSON-serialisable dict.

    At most one row per (unit, annotator): a duplicate raises ``ValueError`` naming both. A unit *overlaps*
    when it has ≥ 2 answers. Statistics that are undefined are ``None`` (never nan). Keys:

    - ``answers``, ``annotators``, ``units``, ``units_with_overlap``: counts;
    - ``per_unit``: {str(unit): ``pairwise_agreement`` of its labels} for overlapping units;
    - ``percent_agreement``: the mean of ``per_unit`` (None without overlap);
    - ``krippendorff_alpha``: ``krippendorff_alpha_nominal`` over all units;
    - ``cohen_kappa``: {"<a>|<b>": {"kappa": κ over the units both answered, "n": that many units}} for every
      annotator pair sharing ≥ 1 unit, ids str()'d, str(a) < str(b);
    - ``per_annotator``: {str(annotator): {"answers", "overlapping" (its answers on overlapping units),
      "agreement_with_others" (agreeing / all (this annotator, other annotator, shared unit) triples),
      "gold_agreement" (fraction of its answers on gold units that equal gold)}};
    - ``gold_agreement``: fraction of all answers on gold units that equal gold (None without gold, or with no
      answer on a gold unit); ``gold_units``: gold units with ≥ 1 answer; ``gold_answers``: answers on them.

    Unit and annotator ids whose str() collide (``1`` and ``"1"``) raise ``ValueError``.
    """
    units: dict[Hashable, dict[Hashable, Label]] = {}
    annotator_units: dict[Hashable, list[Hashable]] = {}
    rows = 0
    for unit, annotator, label in answers:
        by_annotator = units.setdefault(unit, {})
        if annotator in by_annotator:
            raise ValueError(f"annotator {annotator!r} answered unit {unit!r} twice "
                             f"({by_annotator[annotator]!r} and {label!r}); keep one answer per (unit, annotator)")
        by_annotator[annotator] = label
        annotator_units.setdefault(annotator, []).append(unit)
        rows += 1
    unit_name = _str_ids(units, "unit")
    annotator_name = _str_ids(annotator_units, "annotator")
    gold = {} if gold is None else gold

    per_unit: dict[str, float] = {}
    pair_labels: dict[tuple[Hashable, Hashable], tuple[list[Label], list[Label]]] = {}
    agree_with_others = Counter()  # annotator -> agreeing (annotator, other, unit) triples
    pairs_with_others = Counter()  # annotator -> all such triples
    for unit, by_annotator in units.items():
        m = len(by_annotator)
        if m < 2:
            continue
        per_unit[unit_name[unit]] = pairwise_agreement(list(by_annotator.values()))
        counts = Counter(by_annotator.values())
        for annotator, label in by_annotator.items():
            agree_with_others[annotator] += counts[label] - 1
            pairs_with_others[annotator] += m - 1
        ordered = sorted(by_annotator, key=lambda a: annotator_name[a])
        for i, a in enumerate(ordered):
            for b in ordered[i + 1:]:
                labels_a, labels_b = pair_labels.setdefault((a, b), ([], []))
                labels_a.append(by_annotator[a])
                labels_b.append(by_annotator[b])

    cohen: dict[str, dict] = {}
    for (a, b), (labels_a, labels_b) in sorted(pair_labels.items(),
                                               key=lambda kv: (annotator_name[kv[0][0]], annotator_name[kv[0][1]])):
        key = f"{annotator_name[a]}|{annotator_name[b]}"
        if key in cohen:
            raise ValueError(f"annotator pair key {key!r} is ambiguous: an annotator id contains '|'")
        cohen[key] = {"kappa": _none_if_nan(cohen_kappa(labels_a, labels_b)), "n": len(labels_a)}

    per_annotator: dict[str, dict] = {}
    gold_hits = gold_total = 0
    for annotator, answered in annotator_units.items():
        on_gold = [units[u][annotator] == gold[u] for u in answered if u in gold]
        gold_hits += sum(on_gold)
        gold_total += len(on_gold)
        pairs = pairs_with_others[annotator]
        per_annotator[annotator_name[annotator]] = {
            "answers": len(answered),
            "overlapping": sum(len(units[u]) >= 2 for u in answered),
            "agreement_with_others": agree_with_others[annotator] / pairs if pairs else None,
            "gold_agreement": sum(on_gold) / len(on_gold) if on_gold else None,
        }

    return {
        "answers": rows,
        "annotators": len(annotator_units),
        "units": len(units),
        "units_with_overlap": len(per_unit),
        "percent_agreement": sum(per_unit.values()) / len(per_unit) if per_unit else None,
        "krippendorff_alpha": _none_if_nan(krippendorff_alpha_nominal(units)),
        "cohen_kappa": cohen,
        "per_unit": per_unit,
        "per_annotator": per_annotator,
        "gold_agreement": gold_hits / gold_total if gold_total else None,
        "gold_units": sum(u in gold for u in units),
        "gold_answers": gold_total,
    }
