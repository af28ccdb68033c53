"""Row validation: one error type that names ``file:line:field``, and a report of skipped rows.

Every check on a raw record (a dict read from JSON Lines or Parquet) lives here. A failed check
raises :class:`DataError`; callers either let it propagate (the default: bad data stops the run)
or, with ``skip_invalid=True``, count it in a :class:`ValidationReport` and go on. Nothing is
dropped without being counted.

The checkers return plain Python values; :mod:`rlhf_jax.data.formats` builds rows from them.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import warnings
from typing import Any, Callable, Iterable, Literal, Mapping, TypeVar

Reason = Literal[
    "bad_json",  # a line that is not valid JSON
    "not_an_object",  # valid JSON, but not a {...} object
    "missing_field",  # a required field is absent or null
    "wrong_type",  # e.g. a number where text is expected
    "empty_text",  # text that is empty or only whitespace
    "identical_responses",  # chosen == rejected, or repeated responses in a ranking
    "bad_ranking",  # ranking is not a permutation of range(len(responses))
    "bad_label",  # binary label is not a bool or 0/1
    "bad_margin",  # margin is NaN, infinite or negative
    "bad_messages",  # a conversation that does not have the expected roles
    "unknown_layout",  # a public-layout reader cannot tell which layout a record is in
    "prefix_mismatch",  # HH-RLHF / TRL: chosen and rejected transcripts start differently
    "chat_template",  # the tokenizer's chat template does not render the prompt as a prefix
    "too_long",  # prompt + completion exceed max_len (dropped with truncate="drop")
    "eos_inside",  # a completion holds the end-of-sequence token before its end
]


class DataError(ValueError):
    """A malformed row. ``str(err)`` is ``"{source}:{field}: {detail}"`` with source = ``file:line``.

    For Parquet files ``line`` is the 1-based row number; for rows already in memory it is what
    the caller passed as ``source`` (rows carry it in their ``source`` attribute).
    """

    def __init__(self, source: str, field: str, reason: Reason, detail: str):
        super().__init__(f"{source}:{field}: {detail}")
        self.source = source
        self.field = field
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass
class ValidationReport:
    """Records read from files, rows skipped (per reason, with the first few messages), prompts truncated.

    Pass the same report to the loader and to ``encode``, then ``print(report.summary())``.
    """

    max_examples: int = 3
    rows_read: int = 0
    truncated: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def add(self, error: DataError) -> None:
        """Count a skipped row under its reason, keeping the first ``max_examples`` messages."""
        self.skipped[error.reason] += 1
        shown = self.examples.setdefault(error.reason, [])
        if len(shown) < self.max_examples:
            shown.append(str(error))

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        lines = [f"{self.rows_read} rows read, {self.num_skipped} skipped, {self.truncated} truncated"]
        for reason, count in self.skipped.most_common():
            lines.append(f"  {reason}: {count}")
            lines.extend(f"    {message}" for message in self.examples[reason])
        return "\n".join(lines)


def warn_if_unreported(report: ValidationReport, caller_report: ValidationReport | None) -> None:
    """Rows were skipped but the caller passed no report to see them: say so loudly."""
    if caller_report is None and report.num_skipped:
        warnings.warn("skipped invalid rows:\n" + report.summary(), stacklevel=3)


T = TypeVar("T")


def collect(
    records: Iterable[tuple[str, Any]],
    parse: Callable[[Any, str], T],
    *,
    skip_invalid: bool,
    report: ValidationReport | None,
) -> list[T]:
    """``parse(record, source)`` for each ``(source, record)``; a record may be a DataError already
    (e.g. bad JSON). Errors propagate unless ``skip_invalid``, in which case they are counted."""
    counted = report if report is not None else ValidationReport()
    out = []
    for source, record in records:
        counted.rows_read += 1
        try:
            if isinstance(record, DataError):
                raise record
            out.append(parse(record, source))
        except DataError as error:
            if not skip_invalid:
                raise
            counted.add(error)
    warn_if_unreported(counted, report)
    return out


# ---- field checkers: raw record -> typed value, or DataError --------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def require(obj: Mapping[str, Any], field: str, source: str, *, prefix: str = "") -> Any:
    """``obj[field]``; a missing key and a null value are both "missing"."""
    if obj.get(field) is None:
        present = ", ".join(sorted(obj)) or "none"
        raise DataError(source, prefix + field, "missing_field", f"missing field {field!r} (fields present: {present})")
    return obj[field]


def text(value: Any, field: str, source: str) -> str:
    """A non-empty string (whitespace-only counts as empty)."""
    if not isinstance(value, str):
        raise DataError(source, field, "wrong_type", f"expected text, got {_type_name(value)}")
    if not value.strip():
        raise DataError(source, field, "empty_text", "text is empty")
    return value


def text_field(obj: Mapping[str, Any], field: str, source: str, *, prefix: str = "") -> str:
    return text(require(obj, field, source, prefix=prefix), prefix + field, source)


def messages(value: Any, field: str, source: str) -> list[tuple[str, str]]:
    """A non-empty list of ``{"role": str, "content": str}`` -> ``[(role, content), ...]``."""
    if not isinstance(value, list):
        raise DataError(source, field, "wrong_type", f"expected a list of messages, got {_type_name(value)}")
    if not value:
        raise DataError(source, field, "empty_text", "conversation has no messages")
    out = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise DataError(source, where, "wrong_type", f"expected a {{role, content}} object, got {_type_name(message)}")
        out.append((text_field(message, "role", source, prefix=where + "."), text_field(message, "content", source, prefix=where + ".")))
    return out


def prompt(value: Any, field: str, source: str) -> str | list[tuple[str, str]]:
    """A prompt is either text or a conversation (list of messages)."""
    return messages(value, field, source) if isinstance(value, list) else text(value, field, source)


def distinct(texts: list[str], field: str, source: str) -> None:
    """Responses to compare must differ: a comparison of a text with itself carries no signal."""
    seen: dict[str, int] = {}
    for i, t in enumerate(texts):
        if t in seen:
            raise DataError(source, field, "identical_responses", f"responses {seen[t]} and {i} are identical")
        seen[t] = i


def ranking(value: Any, num_responses: int, source: str) -> list[int]:
    """A permutation of ``range(num_responses)``, best first."""
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise DataError(source, "ranking", "wrong_type", f"expected a list of integers, got {value!r}")
    if sorted(value) != list(range(num_responses)):
        raise DataError(source, "ranking", "bad_ranking", f"{value} is not a permutation of range({num_responses})")
    return value


def label(value: Any, source: str) -> bool:
    """Thumbs up/down: a JSON bool or the integers 0 / 1."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise DataError(source, "label", "bad_label", f"expected true/false or 0/1, got {value!r}")


def margin(value: Any, source: str) -> float | None:
    """Optional preference strength: a finite number >= 0 (absent or null means none)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(source, "margin", "wrong_type", f"expected a number, got {_type_name(value)}")
    if not math.isfinite(value) or value < 0:
        raise DataError(source, "margin", "bad_margin", f"margin must be finite and >= 0, got {value!r}")
    return float(value)
