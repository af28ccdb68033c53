"""Readers for public preference data, in the layouts users download it in.

Each layout becomes canonical :class:`~rlhf_jax.data.formats.PairRow` s (``kind="pairwise"``), or,
with ``kind="sft"``, :class:`~rlhf_jax.data.formats.SFTRow` s that keep the preferred response as
the demonstration. Every row then passes the same validation as a canonical file.

``hh_rlhf`` — Anthropic HH-RLHF (``train.jsonl.gz``): ``{"chosen": transcript, "rejected": transcript}``
with turns ``"\\n\\nHuman: ..."`` / ``"\\n\\nAssistant: ..."``. Each transcript is split after its LAST
``"\\n\\nAssistant:"``; the part up to and including it is the prompt (it must be the same in both
transcripts), the rest is the response, verbatim (usually with a leading space)::

    {"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello!", "rejected": "\\n\\nHuman: Hi\\n\\nAssistant: Go away."}
    -> prompt "\\n\\nHuman: Hi\\n\\nAssistant:", chosen " Hello!", rejected " Go away."

``tldr`` — OpenAI summarize-from-feedback comparisons (``comparisons/batch*.json``):
``{"info": {"post", "title", "subreddit", ...}, "summaries": [{"text"}, {"text"}], "choice": 0|1}``.
The prompt is :data:`TLDR_TEMPLATE` filled from ``info`` (as in Stiennon et al., 2020), chosen is
``summaries[choice]["text"]``, rejected the other summary.

``trl`` — TRL preference datasets and UltraFeedback binarized (Parquet or JSON Lines):
``{"prompt", "chosen", "rejected"}`` where each may be text or a list of ``{"role", "content"}``
messages. A ``chosen``/``rejected`` conversation may repeat the prompt (UltraFeedback:
``[user prompt, assistant answer]``) or hold only the answer (TRL: ``[assistant answer]``); what
follows the prompt must be exactly one assistant message. When responses are conversations the
prompt becomes a conversation too (a text prompt is the user's message), so the chat template
formats it. Without a ``prompt`` field ("implicit prompt"), chosen and rejected are full
conversations whose shared part before the last (assistant) message is the prompt.
"""
from __future__ import annotations

import itertools
import os
from typing import Any, Callable, Iterable, Literal, Mapping

from rlhf_jax.data import validation as v
from rlhf_jax.data.formats import PairRow, Row, SFTRow, parse_row, read_records
from rlhf_jax.data.validation import DataError, ValidationReport

Layout = Literal["hh_rlhf", "tldr", "trl"]
LAYOUTS: tuple[Layout, ...] = ("hh_rlhf", "tldr", "trl")

HH_ASSISTANT = "\n\nAssistant:"
TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


def _split_transcript(transcript: Any, field: str, source: str) -> tuple[str, str]:
    transcript = v.text(transcript, field, source)
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError(source, field, "bad_messages", f"no {HH_ASSISTANT!r} turn in the transcript")
    cut += len(HH_ASSISTANT)
    return transcript[:cut], transcript[cut:]


def parse_hh_rlhf(record: Mapping[str, Any], source: str) -> dict[str, Any]:
    """HH-RLHF record -> canonical pairwise record (split at the last ``"\\n\\nAssistant:"``)."""
    prompt, chosen = _split_transcript(v.require(record, "chosen", source), "chosen", source)
    rejected_prompt, rejected = _split_transcript(v.require(record, "rejected", source), "rejected", source)
    if rejected_prompt != prompt:
        raise DataError(source, "rejected", "prefix_mismatch",
                        "chosen and rejected transcripts differ before their last Assistant turn")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def parse_tldr(record: Mapping[str, Any], source: str, template: str = TLDR_TEMPLATE) -> dict[str, Any]:
    """summarize-from-feedback comparison -> canonical pairwise record."""
    info = v.require(record, "info", source)
    if not isinstance(info, Mapping):
        raise DataError(source, "info", "wrong_type", f"expected an object, got {type(info).__name__}")
    fields = {k: v.text_field(info, k, source, prefix="info.") for k in ("subreddit", "title", "post")}
    summaries = v.require(record, "summaries", source)
    if not isinstance(summaries, list) or len(summaries) != 2 or not all(isinstance(s, Mapping) for s in summaries):
        raise DataError(source, "summaries", "wrong_type", "expected a list of two {text} objects")
    texts = [v.text_field(s, "text", source, prefix=f"summaries[{i}].") for i, s in enumerate(summaries)]
    choice = v.require(record, "choice", source)
    if isinstance(choice, bool) or choice not in (0, 1):
        raise DataError(source, "choice", "bad_label", f"expected 0 or 1, got {choice!r}")
    return {"prompt": template.format(**fields), "chosen": texts[choice], "rejected": texts[1 - choice]}


def _answer(value: Any, prompt: list[tuple[str, str]], field: str, source: str) -> str:
    """A response given as text, or as a conversation: [prompt messages...] + one assistant message."""
    if isinstance(value, str):
        return value
    turns = v.messages(value, field, source)
    if turns[: len(prompt)] == prompt:
        turns = turns[len(prompt):]
    if len(turns) != 1 or turns[0][0] != "assistant":
        raise DataError(source, field, "bad_messages", "expected one assistant message after the prompt, "
                        f"got roles {[role for role, _ in turns]}")
    return turns[0][1]


def parse_trl(record: Mapping[str, Any], source: str) -> dict[str, Any]:
    """TRL / UltraFeedback-binarized record -> canonical pairwise record."""
    chosen, rejected = v.require(record, "chosen", source), v.require(record, "rejected", source)
    if "prompt" not in record:  # implicit prompt: two full conversations
        turns = {f: v.messages(x, f, source) for f, x in (("chosen", chosen), ("rejected", rejected))}
        if turns["chosen"][:-1] != turns["rejected"][:-1]:
            raise DataError(source, "rejected", "prefix_mismatch", "chosen and rejected differ before their last message")
        prompt = turns["chosen"][:-1]
        if not prompt:
            raise DataError(source, "chosen", "bad_messages", "a conversation needs a prompt before the answer")
    else:
        raw = v.prompt(v.require(record, "prompt", source), "prompt", source)
        conversational = not isinstance(raw, str) or isinstance(chosen, list) or isinstance(rejected, list)
        prompt = [("user", raw)] if conversational and isinstance(raw, str) else raw
    return {
        "prompt": prompt if isinstance(prompt, str) else [{"role": r, "content": c} for r, c in prompt],
        "chosen": _answer(chosen, prompt if isinstance(prompt, list) else [], "chosen", source),
        "rejected": _answer(rejected, prompt if isinstance(prompt, list) else [], "rejected", source),
    }


def detect_layout(record: Any, source: str) -> Layout:
    """Tell the layout from one record's fields (raise if none fits)."""
    if isinstance(record, Mapping):
        if "info" in record and "summaries" in record:
            return "tldr"
        if "chosen" in record and "rejected" in record:
            return "trl" if "prompt" in record or isinstance(record["chosen"], list) else "hh_rlhf"
    keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
    raise DataError(source, "<row>", "unknown_layout", f"cannot tell the layout from fields {keys}; pass layout= one of {LAYOUTS}")


def _peek(records: Iterable[tuple[str, Any]]) -> tuple[tuple[str, Any] | None, Iterable[tuple[str, Any]]]:
    """The first record that parsed as JSON (or None), and all records including it."""
    records = iter(records)
    head = []
    for item in records:
        head.append(item)
        if not isinstance(item[1], DataError):
            return item, itertools.chain(head, records)
    return None, head


def read_public(
    path: str | os.PathLike,
    layout: Layout | Literal["auto"] = "auto",
    kind: Literal["pairwise", "sft"] = "pairwise",
    *,
    skip_invalid: bool = False,
    report: ValidationReport | None = None,
    tldr_template: str = TLDR_TEMPLATE,
) -> list[Row]:
    """Read a public preference file (JSON Lines, optionally .gz, or Parquet) into canonical rows.

    ``layout="auto"`` looks at the first record; pass the layout to be explicit. ``kind="sft"``
    keeps (prompt, chosen) as demonstrations. Errors and ``skip_invalid`` behave as in
    :func:`rlhf_jax.data.formats.load_rows`.
    """
    if kind not in ("pairwise", "sft"):
        raise ValueError(f"public preference layouts hold comparisons: kind must be 'pairwise' or 'sft', got {kind!r}")
    records = read_records(path)
    if layout == "auto":
        first, records = _peek(records)
        layout = detect_layout(first[1], first[0]) if first is not None else "trl"
    to_canonical: dict[str, Callable[[Mapping[str, Any], str], dict[str, Any]]] = {
        "hh_rlhf": parse_hh_rlhf, "tldr": lambda r, s: parse_tldr(r, s, tldr_template), "trl": parse_trl,
    }
    if layout not in to_canonical:
        raise ValueError(f"unknown layout {layout!r}; expected 'auto' or one of {LAYOUTS}")

    def parse(record: Any, source: str) -> Row:
        if not isinstance(record, Mapping):
            raise DataError(source, "<row>", "not_an_object", f"expected a JSON object, got {type(record).__name__}")
        pair: PairRow = parse_row(to_canonical[layout](record, source), "pairwise", source)
        return pair if kind == "pairwise" else SFTRow(pair.prompt, pair.chosen, source=source)

    return v.collect(records, parse, skip_invalid=skip_invalid, report=report)
