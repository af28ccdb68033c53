"""Rows for a stage: from the user's file or TFDS name, or from the simulated annotator; the held-out
split by prompt hash; encoding with the truncation policy, every truncation counted and printed."""
from __future__ import annotations

import json
from typing import Any, Callable, Literal, Sequence

from rlhf_jax.cli import DataArgs
from rlhf_jax.data.batching import encode_prompts
from rlhf_jax.data.formats import parse_row
from rlhf_jax.data.tfds_builders import load_source
from rlhf_jax.data.validation import ValidationReport


def rows_from(data: DataArgs, kind: str, split: Literal["train", "eval"], simulated: Callable[[int, int, str], list[dict]]
              ) -> list:
    """Rows of ``kind``: from the user's file / TFDS name, or from the simulated annotator.

    With a user file and no ``data.eval_path``, ``data.eval_fraction`` of its prompts are held out
    (:func:`split_held_out`): "train" gives the rest, "eval" the held-out rows.
    """
    if data.path is None:
        n = data.num_train if split == "train" else data.num_eval
        records = simulated(n, data.seed, "train" if split == "train" else "eval")
        return [parse_row(r, kind, source=f"<simulated {split}>:{i + 1}") for i, r in enumerate(records)]
    if data.eval_path is not None or not data.eval_fraction:
        spec = data.path if split == "train" else data.eval_path
        return [] if spec is None else _load(spec, kind, data)
    train, held_out = split_held_out(_load(data.path, kind, data), data.eval_fraction)
    _announce(f"[data] {data.path}: {len(held_out)} rows ({len({_prompt_key(r.prompt) for r in held_out})} prompts) "
              f"held out for evaluation (--data.eval-fraction {data.eval_fraction}), {len(train)} rows for training; "
              f"--data.eval-path sets a held-out file instead")
    return train if split == "train" else held_out


def _load(spec: str, kind: str, data: DataArgs) -> list:
    report = ValidationReport()
    rows = load_source(spec, kind, data_dir=data.data_dir, layout=data.layout, skip_invalid=data.skip_invalid,
                       report=report, split="train")
    if report.skipped:
        _announce(report.summary())
    return rows


_ANNOUNCED: set[str] = set()


def _announce(message: str) -> None:
    """Print ``message`` once per process (the train and eval splits read the same file)."""
    if message not in _ANNOUNCED:
        _ANNOUNCED.add(message)
        print(message, flush=True)


def _prompt_key(prompt: Any) -> str:
    from rlhf_jax.evaluation import jsonable_prompt

    return json.dumps(jsonable_prompt(prompt), sort_keys=True, ensure_ascii=False)


def _prompt_hash(prompt: Any) -> float:
    """A uniform number in [0, 1) fixed by the prompt's content."""
    import hashlib

    return int.from_bytes(hashlib.sha256(_prompt_key(prompt).encode()).digest()[:8], "big") / 2.0 ** 64


def split_held_out(rows: Sequence[Any], fraction: float) -> tuple[list, list]:
    """``(train, held_out)``: every row whose prompt hashes below ``fraction`` is held out, so the
    split depends on the prompt alone (not on the file, its order or a seed) and all rows of one
    prompt fall on the same side. At least one prompt is held out and one kept when there are two
    or more distinct prompts; with one, nothing is held out."""
    hashes = {}
    for r in rows:
        hashes.setdefault(_prompt_key(r.prompt), _prompt_hash(r.prompt))
    held = {k for k, h in hashes.items() if h < fraction}
    if fraction > 0 and len(hashes) >= 2:
        ordered = sorted(hashes, key=hashes.get)
        if not held:
            held = {ordered[0]}
        if len(held) == len(hashes):
            held.discard(ordered[-1])
    train = [r for r in rows if _prompt_key(r.prompt) not in held]
    held_out = [r for r in rows if _prompt_key(r.prompt) in held]
    return train, held_out


def encode_rows(data: DataArgs, rows: Sequence[Any], tokenizer: Any, *, max_len: int, what: str,
                prompts_only: bool = False, flag: str = "--max-len") -> list:
    """``rows`` encoded with ``data.truncate`` (prompt + completion <= ``max_len``, or the prompts alone with
    ``prompts_only``); truncated or dropped rows are counted and printed, naming ``what`` and ``flag``."""
    from rlhf_jax.data import encode

    report = ValidationReport()
    fn = encode_prompts if prompts_only else encode
    out = fn(rows, tokenizer, max_len=max_len, truncate=data.truncate, report=report)
    announce_truncation(report, len(rows), what=what, max_len=max_len, mode=data.truncate, flag=flag)
    return out


def kept_rows(rows: Sequence[Any], encoded: Sequence[Any]) -> list:
    """The rows ``encoded`` kept, in order (``truncate="drop"`` skips rows; the rest keep their order)."""
    kept, it = [], iter(encoded)
    pending = next(it, None)
    for row in rows:
        if pending is not None and pending.source == row.source:
            kept.append(row)
            pending = next(it, None)
    if pending is not None or len(kept) != len(encoded):
        raise ValueError("kept_rows: the encoded rows are not an ordered subset of the rows (sources differ)")
    return kept


def announce_truncation(report: ValidationReport, total: int, *, what: str, max_len: int, mode: str, flag: str
                        ) -> None:
    if report.truncated or report.num_skipped:
        dropped = report.skipped.get("too_long", 0)
        _announce(f"[data] {what}: {report.truncated} of {total} rows truncated, {dropped} dropped, to fit {flag} "
                  f"{max_len} (--data.truncate {mode})" + "".join(f"; e.g. {m}" for m in
                                                               report.examples.get("too_long", [])[:1]))


def prompt_texts(rows: Sequence[Any]) -> list:
    """The prompts of ``rows`` (text or conversations)."""
    return [r.prompt for r in rows]


def eval_prompts(rows: Sequence[Any], limit: int) -> list:
    """The first ``limit`` distinct prompts of ``rows`` (pairs often share a prompt), in order."""
    seen: dict[str, Any] = {}
    for r in rows:
        seen.setdefault(_prompt_key(r.prompt), r.prompt)
        if len(seen) >= limit:
            break
    return list(seen.values())


def held_out_policy_prompts(data: DataArgs, eval_rows: Sequence[Any], limit: int,
                            simulated: Callable[[int, int, str], list[dict]] | None = None) -> list:
    """The prompts an offline policy stage is sampled on at the end: with the simulated annotator, the
    simulated held-out prompts PPO and best-of-n are evaluated on (``simulated`` = ``simulated.prompt_rows``);
    with a user's file, the distinct prompts of its held-out rows. At most ``limit``; none for ``limit`` 0."""
    if not limit:
        return []
    if data.path is None and simulated is not None:
        import dataclasses

        return prompt_texts(rows_from(dataclasses.replace(data, seed=2, num_eval=limit), "prompt", "eval", simulated))
    return eval_prompts(eval_rows, limit)
