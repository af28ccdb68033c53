"""Feedback formats and prompt rows: canonical dataclasses, read and written as JSON Lines or Parquet.

Files are JSON Lines (``.jsonl``, ``.json``, optionally ``.gz``) with one object per line, or
Parquet (``.parquet``) with one row per record and the same field names. Blank lines are allowed;
fields not listed below are ignored (ids, annotator names, ...). Every **prompt** is either text or
a conversation, a list of ``{"role", "content"}`` messages that the tokenizer's chat template
renders (see :mod:`rlhf_jax.data.batching`). Every response is text.

**SFT** (``kind="sft"``): a demonstration, either prompt + completion::

    {"prompt": "Translate to French: cheese", "completion": " fromage"}

or a conversation whose last message, from the assistant, is the completion::

    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]}

**Pairwise** (``kind="pairwise"``): ``chosen`` is preferred to ``rejected``; the optional
``margin`` (a number >= 0) says by how much::

    {"prompt": "Name a prime.", "chosen": " 7", "rejected": " 8", "margin": 1.0}

**Ranked** (``kind="ranked"``): ``ranking`` lists indices into ``responses``, best first::

    {"prompt": "Rate my haiku.", "responses": [" Nice.", " Awful.", " Good."], "ranking": [2, 0, 1]}

**Binary** (``kind="binary"``): a thumbs up (``true`` / ``1``) or down (``false`` / ``0``)::

    {"prompt": "Tell a joke.", "completion": " Why did the chicken...", "label": true}

**Prompts** (``kind="prompt"``): prompts alone, to sample from (RL, evaluation)::

    {"prompt": [{"role": "user", "content": "Summarize: the cat sat on the mat."}]}

Rules (checked in :mod:`rlhf_jax.data.validation`; a broken row raises ``DataError`` naming
``file:line:field``): texts are non-empty; chosen != rejected; responses of a ranking are distinct
and ``ranking`` is a permutation of ``range(len(responses))``; ``label`` is a bool or 0/1;
``margin`` is finite and >= 0. Parquet rows are numbered from 1 in place of lines.
"""
from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import os
from typing import Any, Iterator, Literal, Mapping, Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_jax.data import validation as v
from rlhf_jax.data.validation import DataError, ValidationReport

Kind = Literal["sft", "pairwise", "ranked", "binary", "prompt"]
KINDS: tuple[Kind, ...] = ("sft", "pairwise", "ranked", "binary", "prompt")


@dataclasses.dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str
    content: str


Prompt = Union[str, tuple[Message, ...]]
"""Text, or a conversation to be rendered with the tokenizer's chat template."""

# `source` ("file:line") travels with each row so that later errors (tokenization) can point back
# at the input; it is not part of a row's value (compare=False).
_source = dataclasses.field(default="", compare=False, repr=False, kw_only=True)


@dataclasses.dataclass(frozen=True)
class SFTRow:
    """A demonstration: the model learns to produce ``completion`` after ``prompt``."""

    prompt: Prompt
    completion: str
    source: str = _source


@dataclasses.dataclass(frozen=True)
class PairRow:
    """A comparison: ``chosen`` is preferred to ``rejected`` (by ``margin`` if given)."""

    prompt: Prompt
    chosen: str
    rejected: str
    margin: float | None = None
    source: str = _source


@dataclasses.dataclass(frozen=True)
class RankRow:
    """``responses[ranking[0]]`` is best, ``responses[ranking[-1]]`` worst."""

    prompt: Prompt
    responses: tuple[str, ...]
    ranking: tuple[int, ...]
    source: str = _source


@dataclasses.dataclass(frozen=True)
class BinaryRow:
    """A thumbs up (``label=True``) or down for one completion."""

    prompt: Prompt
    completion: str
    label: bool
    source: str = _source


@dataclasses.dataclass(frozen=True)
class PromptRow:
    """A prompt to sample responses for."""

    prompt: Prompt
    source: str = _source


Row = Union[SFTRow, PairRow, RankRow, BinaryRow, PromptRow]


# ---- parsing ----------------------------------------------------------------------------------


def _prompt(record: Mapping[str, Any], source: str) -> Prompt:
    value = v.prompt(v.require(record, "prompt", source), "prompt", source)
    return value if isinstance(value, str) else tuple(Message(r, c) for r, c in value)


def _response(record: Mapping[str, Any], field: str, source: str) -> str:
    value = v.require(record, field, source)
    if isinstance(value, list):
        raise DataError(source, field, "wrong_type", "expected text, got a list (conversational "
                        "chosen/rejected are read by rlhf_jax.data.readers with layout='trl')")
    return v.text(value, field, source)


def _sft(record: Mapping[str, Any], source: str) -> SFTRow:
    if "messages" not in record:
        return SFTRow(_prompt(record, source), _response(record, "completion", source), source=source)
    if "prompt" in record or "completion" in record:
        raise DataError(source, "messages", "bad_messages", "give either messages or prompt/completion, not both")
    turns = [Message(r, c) for r, c in v.messages(record["messages"], "messages", source)]
    if len(turns) < 2 or turns[-1].role != "assistant":
        roles = [m.role for m in turns]
        raise DataError(source, "messages", "bad_messages",
                        f"need at least one prompt message followed by a final assistant message, got roles {roles}")
    return SFTRow(tuple(turns[:-1]), turns[-1].content, source=source)


def _pair(record: Mapping[str, Any], source: str) -> PairRow:
    prompt = _prompt(record, source)
    chosen, rejected = _response(record, "chosen", source), _response(record, "rejected", source)
    v.distinct([chosen, rejected], "rejected", source)
    return PairRow(prompt, chosen, rejected, v.margin(record.get("margin"), source), source=source)


def _ranked(record: Mapping[str, Any], source: str) -> RankRow:
    prompt = _prompt(record, source)
    raw = v.require(record, "responses", source)
    if not isinstance(raw, list) or len(raw) < 2:
        raise DataError(source, "responses", "wrong_type", f"expected a list of at least 2 texts, got {raw!r:.80}")
    responses = [v.text(r, f"responses[{i}]", source) for i, r in enumerate(raw)]
    v.distinct(responses, "responses", source)
    ranking = v.ranking(v.require(record, "ranking", source), len(responses), source)
    return RankRow(prompt, tuple(responses), tuple(ranking), source=source)


def _binary(record: Mapping[str, Any], source: str) -> BinaryRow:
    prompt = _prompt(record, source)
    completion = _response(record, "completion", source)
    return BinaryRow(prompt, completion, v.label(v.require(record, "label", source), source), source=source)


_PARSERS = {"sft": _sft, "pairwise": _pair, "ranked": _ranked, "binary": _binary,
            "prompt": lambda record, source: PromptRow(_prompt(record, source), source=source)}


def check_kind(kind: str) -> Kind:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return kind  # type: ignore[return-value]


def parse_row(record: Any, kind: Kind, source: str = "<row>") -> Row:
    """Validate one raw record (a dict as read from JSON) into the row type of ``kind``."""
    if not isinstance(record, Mapping):
        raise DataError(source, "<row>", "not_an_object", f"expected a JSON object, got {type(record).__name__}")
    return _PARSERS[check_kind(kind)](record, source)


# ---- files ------------------------------------------------------------------------------------


def _is_parquet(path: str) -> bool:
    return path.endswith(".parquet")


def _is_json_lines(path: str) -> bool:
    return path.removesuffix(".gz").endswith((".jsonl", ".json"))


def read_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """Yield ``("file:line", record)`` for every record of a JSON Lines or Parquet file.

    A line that is not valid JSON is yielded as a ``DataError`` (so that ``skip_invalid`` can
    count it and go on); blank lines are not records.
    """
    path = os.fspath(path)
    if _is_parquet(path):
        rows = (row for batch in pq.ParquetFile(path).iter_batches() for row in batch.to_pylist())
        yield from ((f"{path}:{i}", row) for i, row in enumerate(rows, start=1))
    elif _is_json_lines(path):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if line.strip():
                    yield f"{path}:{i}", _json(line, f"{path}:{i}")
    else:
        raise ValueError(f"{path}: unsupported file type; expected .jsonl, .json (JSON Lines, optionally .gz) or .parquet")


def _json(line: str, source: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        hint = " (a JSON array? one object per line is expected)" if line.lstrip().startswith("[") else ""
        return DataError(source, "<json>", "bad_json", f"invalid JSON: {e}{hint}")


def load_rows(
    path: str | os.PathLike, kind: Kind, *, skip_invalid: bool = False, report: ValidationReport | None = None
) -> list[Row]:
    """Read and validate every row of a canonical file (see the module docstring for formats).

    The first malformed row raises ``DataError`` ("file:line:field: what is wrong"). With
    ``skip_invalid=True`` malformed rows are skipped and counted in ``report`` (a warning with the
    counts is issued if no report was passed).
    """
    check_kind(kind)
    return v.collect(read_records(path), lambda r, s: parse_row(r, kind, s), skip_invalid=skip_invalid, report=report)


def _prompt_to_json(prompt: Prompt) -> str | list[dict[str, str]]:
    return prompt if isinstance(prompt, str) else [dataclasses.asdict(m) for m in prompt]


def row_to_dict(row: Row) -> dict[str, Any]:
    """The canonical record of a row (what ``write_rows`` writes; ``parse_row`` reads it back)."""
    out: dict[str, Any] = {"prompt": _prompt_to_json(row.prompt)}
    if isinstance(row, SFTRow):
        out["completion"] = row.completion
    elif isinstance(row, PairRow):
        out.update(chosen=row.chosen, rejected=row.rejected)
        if row.margin is not None:
            out["margin"] = row.margin
    elif isinstance(row, RankRow):
        out.update(responses=list(row.responses), ranking=list(row.ranking))
    elif isinstance(row, BinaryRow):
        out.update(completion=row.completion, label=row.label)
    elif not isinstance(row, PromptRow):
        raise TypeError(f"not a row: {type(row).__name__}")
    return out


def write_rows(path: str | os.PathLike, rows: Sequence[Row]) -> None:
    """Write rows of one kind as JSON Lines (``.jsonl``/``.json``, ``.gz`` compresses) or Parquet."""
    path = os.fspath(path)
    kinds = {type(row) for row in rows}
    if len(kinds) > 1:
        raise ValueError(f"{path}: rows of several kinds {sorted(k.__name__ for k in kinds)}; write one file per kind")
    records = [row_to_dict(row) for row in rows]
    if _is_parquet(path):
        if len({isinstance(r["prompt"], str) for r in records}) > 1:
            raise ValueError(f"{path}: Parquet needs one type per column, but some prompts are text and others "
                             "conversations; write JSON Lines instead")
        columns = dict.fromkeys(k for record in records for k in record)  # union, in order
        pq.write_table(pa.table({k: [record.get(k) for record in records] for k in columns}), path)
    elif _is_json_lines(path):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "wt", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        raise ValueError(f"{path}: unsupported file type; expected .jsonl, .json (optionally .gz) or .parquet")


def rank_to_pairs(row: RankRow) -> list[PairRow]:
    """All K·(K−1)/2 comparisons a ranking of K responses implies (better one as ``chosen``)."""
    ordered = [row.responses[i] for i in row.ranking]
    return [PairRow(row.prompt, better, worse, source=row.source) for better, worse in itertools.combinations(ordered, 2)]
