"""Answers out of the feedback database: training rows in the project's formats, and agreement.

Rows (every answer of every annotator is its own row; ``meta`` holds ``annotator``, ``item``,
``answer``, ``source``, ``prompt_index`` and, where the item has them, the ``gold`` scores):

- ``pairwise.jsonl``: ``{prompt, chosen, rejected, [margin], meta}`` from pairwise answers A / B, read
  by ``reward_model.py`` and ``dpo.py`` (``--data.path``). The optional strength becomes the margin
  (``MARGINS``: better 1, much better 2; no strength, no margin) for ``--loss bt_margin``. Ties and
  skips make no row; they are counted in ``agreement.json``.
- ``ranked.jsonl``: ``{prompt, responses, ranking, meta}``, read by ``reward_model.py --feedback ranked``.
- ``binary.jsonl``: ``{prompt, completion, label, meta}`` (label true = thumbs up; ``meta.comment``),
  read by ``kto.py``.
- ``agreement.json``: :func:`report`.

A kind with no rows writes no file (the readers refuse empty files).
"""
from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

from rlhf_jax.feedback import agreement
from rlhf_jax.feedback.store import Answer, Store

MARGINS = {"better": 1.0, "much_better": 2.0}
FILES = {"pairwise": "pairwise.jsonl", "ranked": "ranked.jsonl", "binary": "binary.jsonl"}


def _meta(answer: Answer) -> dict[str, Any]:
    item = answer.item
    meta: dict[str, Any] = {"annotator": answer.annotator, "item": item.id, "answer": answer.id,
                            "source": item.source, "prompt_index": item.prompt_index}
    if item.gold is not None:
        meta["gold"] = item.gold
    return meta


def pairwise_rows(answers: Iterable[Answer]) -> list[dict[str, Any]]:
    rows = []
    for a in answers:
        if a.item.kind != "pairwise" or a.payload["choice"] not in ("A", "B"):
            continue
        first, second = a.item.responses
        chosen, rejected = (first, second) if a.payload["choice"] == "A" else (second, first)
        row: dict[str, Any] = {"prompt": a.item.prompt, "chosen": chosen, "rejected": rejected}
        if a.payload.get("strength"):
            row["margin"] = MARGINS[a.payload["strength"]]
        row["meta"] = {**_meta(a), "choice": a.payload["choice"], "strength": a.payload.get("strength")}
        rows.append(row)
    return rows


def ranked_rows(answers: Iterable[Answer]) -> list[dict[str, Any]]:
    return [{"prompt": a.item.prompt, "responses": a.item.responses, "ranking": a.payload["ranking"], "meta": _meta(a)}
            for a in answers if a.item.kind == "ranked" and not a.payload.get("skip")]


def binary_rows(answers: Iterable[Answer]) -> list[dict[str, Any]]:
    return [{"prompt": a.item.prompt, "completion": a.item.responses[0], "label": a.payload["thumb"] == "up",
             "meta": {**_meta(a), "comment": a.payload.get("comment")}}
            for a in answers if a.item.kind == "thumbs" and not a.payload.get("skip")]


def rows(answers: Sequence[Answer]) -> dict[str, list[dict[str, Any]]]:
    return {"pairwise": pairwise_rows(answers), "ranked": ranked_rows(answers), "binary": binary_rows(answers)}


# --- agreement -----------------------------------------------------------------------------------


def _gold_pair_label(gold: Sequence[float], i: int, j: int) -> str:
    return "A" if gold[i] > gold[j] else "B" if gold[i] < gold[j] else "tie"


def labels(answers: Iterable[Answer], kind: str) -> tuple[list[tuple[Any, str, Any]], dict[Any, Any]]:
    """``(unit, annotator, label)`` rows and gold labels of one kind, the units agreement is counted over.

    pairwise: one unit per item, labels A / B / tie (skips carry no judgement); ranked: one unit per
    pair of responses of an item (``"item:i-j"``), label A when i ranks above j, else B; thumbs: one
    unit per item, labels up / down. Gold: the gold judge's order (pairwise, ranked); thumbs have none.
    """
    out, gold = [], {}
    for a in answers:
        item, p = a.item, a.payload
        if item.kind != kind or p.get("skip") or p.get("choice") == "skip":
            continue
        if kind == "pairwise":
            out.append((item.id, a.annotator, p["choice"]))
            if item.gold is not None:
                gold[item.id] = _gold_pair_label(item.gold, 0, 1)
        elif kind == "ranked":
            for (i, j), label in agreement.ranking_pair_labels(len(item.responses), p["ranking"]).items():
                unit = f"{item.id}:{i}-{j}"
                out.append((unit, a.annotator, label))
                if item.gold is not None:
                    gold[unit] = _gold_pair_label(item.gold, i, j)
        else:
            out.append((item.id, a.annotator, p["thumb"]))
    return out, gold


def report(store: Store) -> dict[str, Any]:
    """Counts, and per kind of task the agreement statistics of ``agreement.agreement_report``
    (per-item and per-annotator agreement, Cohen's κ per annotator pair, Krippendorff's α, gold agreement)."""
    answers = store.answers()
    out: dict[str, Any] = {"counts": store.counts(), "by_kind": {}}
    for kind in ("pairwise", "ranked", "thumbs"):
        of_kind = [a for a in answers if a.item.kind == kind]
        if not of_kind:
            continue
        unit_labels, gold = labels(of_kind, kind)
        section = agreement.agreement_report(unit_labels, gold=gold or None)
        section["answers_total"] = len(of_kind)
        section["skipped"] = sum(1 for a in of_kind if a.payload.get("skip") or a.payload.get("choice") == "skip")
        if kind == "pairwise":
            section["ties"] = sum(1 for a in of_kind if a.payload["choice"] == "tie")
        out["by_kind"][kind] = section
    return out


def export(store: Store, out: str | os.PathLike) -> dict[str, Any]:
    """Write the row files and ``agreement.json`` into ``out``; ``{file name: rows written}``."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for kind, kind_rows in rows(store.answers()).items():
        path = out / FILES[kind]
        if kind_rows:
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kind_rows))
            tmp.replace(path)
            written[path.name] = len(kind_rows)
        elif path.exists():
            path.unlink()  # a stale file from an earlier export would be read as current
    (out / "agreement.json").write_text(json.dumps(report(store), indent=2))
    written["agreement.json"] = 1
    return written
