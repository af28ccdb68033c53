"""Rows -> token ids -> padded batches (:mod:`rlhf_jax.types`).

Two steps, so that tokenization runs once per dataset and batching once per step:

1. :func:`encode` turns rows into :class:`Encoded` token ids, applying the truncation policy.
2. ``collate_*`` pads a list of encoded examples into a batch; :class:`~rlhf_jax.data.iterator.BatchIterator`
   calls it (``functools.partial(collate_pairs, pad_id=..., length=...)``).

Tokenization
------------
* A text prompt is encoded as ``tokenizer(prompt)`` does, with the tokenizer's own special tokens
  (e.g. BOS). A conversation prompt is rendered with the chat template
  (``add_generation_prompt=True``) and encoded without adding special tokens (the template has them).
* A completion is encoded without special tokens and EOS is appended, unless it already contains
  EOS. For a conversation the completion is the text the chat template adds for the assistant turn
  (its end-of-turn marker included), i.e. ``render(prompt + [answer])`` minus ``render(prompt)``.
* Prompt and completion are encoded separately and concatenated, so the boundary between them is
  exact (BPE merges never straddle it).

Truncation (``max_len`` counts prompt + the longest completion of the row)
-------------------------------------------------------------------------
* ``truncate="left"``: drop prompt tokens from the left, keeping a leading BOS and the whole
  completion(s); counted in ``report.truncated``. A completion that leaves no room for even one
  prompt token raises ``DataError``.
* ``truncate="drop"``: skip the row; counted in the report under ``too_long``.

Padding length (``length=``): an ``int`` pads every batch to that length (static shapes: one
compilation); a sequence of ints is a set of buckets, each batch padded to the smallest bucket that
fits (one compilation per bucket; in multi-host runs use a fixed length so all hosts agree).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, Sequence

import numpy as np

from rlhf_jax.data.formats import BinaryRow, PairRow, Prompt, PromptRow, RankRow, Row, SFTRow
from rlhf_jax.data.validation import DataError, ValidationReport, warn_if_unreported
from rlhf_jax.types import BinaryBatch, PairBatch, PromptBatch, RankBatch, SFTBatch

Truncate = Literal["left", "drop"]
Length = int | Sequence[int]


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One row as token ids (int32), already fitted to ``max_len``.

    ``completion_ids`` holds, each ending in EOS: SFT and binary (completion,), pairwise
    (chosen, rejected), ranked the responses best first, prompts-only ().
    """

    prompt_ids: np.ndarray
    completion_ids: tuple[np.ndarray, ...]
    margin: float = 0.0
    label: float = 0.0
    source: str = ""

    @property
    def length(self) -> int:
        """Tokens in the longest sequence this example becomes (prompt + longest completion)."""
        return len(self.prompt_ids) + max((len(c) for c in self.completion_ids), default=0)


def _completions(row: Row) -> tuple[str, ...]:
    if isinstance(row, (SFTRow, BinaryRow)):
        return (row.completion,)
    if isinstance(row, PairRow):
        return (row.chosen, row.rejected)
    if isinstance(row, RankRow):
        return tuple(row.responses[i] for i in row.ranking)
    if isinstance(row, PromptRow):
        raise ValueError(f"{row.source}: a prompt row has no completion to train on; use encode_prompts")
    raise TypeError(f"not a row: {type(row).__name__}")


def render(prompt: Prompt, completions: Sequence[str], tokenizer: Any, source: str = "<row>") -> tuple[str, list[str]]:
    """The prompt and completion texts the model sees (chat template applied to conversations)."""
    if isinstance(prompt, str):
        return prompt, list(completions)
    if tokenizer.chat_template is None:
        raise ValueError(f"{source}: the prompt is a conversation but the tokenizer has no chat template")
    turns = [dataclasses.asdict(m) for m in prompt]
    head = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    tails = []
    for completion in completions:
        full = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": completion}], tokenize=False)
        if not full.startswith(head):
            raise DataError(source, "prompt", "chat_template", "the chat template does not render the prompt "
                            "(with add_generation_prompt=True) as a prefix of prompt + answer")
        tails.append(full[len(head):])
    return head, tails


def _fit(prompt: list[int], completions: list[list[int]], max_len: int, truncate: Truncate, bos_id: int | None,
         source: str, report: ValidationReport) -> list[int]:
    """The prompt, left-truncated so that prompt + longest completion <= max_len (or DataError)."""
    if not prompt:
        raise DataError(source, "prompt", "empty_text", "the prompt encodes to no tokens")
    longest = max(map(len, completions), default=0)
    if len(prompt) + longest <= max_len:
        return prompt
    if truncate == "drop":
        raise DataError(source, "prompt", "too_long",
                        f"prompt ({len(prompt)} tokens) + completion ({longest}) > max_len {max_len}")
    room = max_len - longest
    if room < 1:
        raise DataError(source, "completion", "too_long", f"the completion alone has {longest} tokens: max_len "
                        f"{max_len} leaves no room for the prompt (use truncate='drop' to skip such rows)")
    report.truncated += 1
    head = prompt[:1] if bos_id is not None and prompt[0] == bos_id else []
    return head + prompt[len(prompt) - (room - len(head)):]


def _encode(rows: Sequence[Row], tokenizer: Any, max_len: int, truncate: Truncate,
            report: ValidationReport | None, with_completions: bool) -> list[Encoded]:
    if truncate not in ("left", "drop"):
        raise ValueError(f"truncate must be 'left' or 'drop', got {truncate!r}")
    eos = tokenizer.eos_token_id
    if with_completions and eos is None:
        raise ValueError("the tokenizer has no eos_token: completions need one to end on")
    rendered = [render(row.prompt, _completions(row) if with_completions else (), tokenizer, row.source) for row in rows]

    def ids(texts: list[str], special: bool) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=special)["input_ids"] if texts else []

    plain = [i for i, row in enumerate(rows) if isinstance(row.prompt, str)]
    chat = [i for i, row in enumerate(rows) if not isinstance(row.prompt, str)]
    prompts: list[list[int]] = [[] for _ in rows]
    for group, special in ((plain, True), (chat, False)):
        for i, p in zip(group, ids([rendered[i][0] for i in group], special)):
            prompts[i] = p
    flat = iter(ids([c for _, tails in rendered for c in tails], False))
    counted = report if report is not None else ValidationReport()
    out = []
    for row, prompt, (_, tails) in zip(rows, prompts, rendered):
        completions = [c if eos in c else c + [eos] for c in (next(flat) for _ in tails)]
        try:
            prompt = _fit(prompt, completions, max_len, truncate, tokenizer.bos_token_id, row.source, counted)
        except DataError as error:
            if error.reason != "too_long" or truncate != "drop":
                raise
            counted.add(error)
            continue
        out.append(Encoded(
            prompt_ids=np.asarray(prompt, np.int32),
            completion_ids=tuple(np.asarray(c, np.int32) for c in completions),
            margin=float(row.margin or 0.0) if isinstance(row, PairRow) else 0.0,
            label=float(row.label) if isinstance(row, BinaryRow) else 0.0,
            source=row.source,
        ))
    warn_if_unreported(counted, report)
    return out


def encode(rows: Sequence[Row], tokenizer: Any, *, max_len: int, truncate: Truncate = "left",
           report: ValidationReport | None = None) -> list[Encoded]:
    """Tokenize rows (any kind) into prompt + EOS-terminated completion ids fitted to ``max_len``.

    ``tokenizer`` is a ``transformers.PreTrainedTokenizerFast``. See the module docstring for the
    tokenization and truncation rules; truncated and dropped rows are counted in ``report``.
    """
    return _encode(rows, tokenizer, max_len, truncate, report, with_completions=True)


def encode_prompts(rows: Sequence[Row], tokenizer: Any, *, max_len: int, truncate: Truncate = "left",
                   report: ValidationReport | None = None) -> list[Encoded]:
    """Tokenize only the prompts of ``rows`` (for generation), fitted to ``max_len``."""
    return _encode(rows, tokenizer, max_len, truncate, report, with_completions=False)


def pack(examples: Sequence[Encoded], max_len: int) -> list[tuple[Encoded, ...]]:
    """Group SFT examples, in order, into rows of at most ``max_len`` tokens (greedy: a row is
    closed when the next example does not fit). Feed the result to :func:`collate_sft`."""
    packs: list[tuple[Encoded, ...]] = []
    current: list[Encoded] = []
    used = 0
    for example in examples:
        if len(example.completion_ids) != 1:
            raise ValueError(f"{example.source}: only SFT examples (one completion) can be packed")
        if example.length > max_len:
            raise ValueError(f"{example.source}: {example.length} tokens do not fit max_len {max_len}")
        if used + example.length > max_len:
            packs.append(tuple(current))
            current, used = [], 0
        current.append(example)
        used += example.length
    if current:
        packs.append(tuple(current))
    return packs


def pad_length(longest: int, length: Length) -> int:
    """``length`` itself, or the smallest bucket >= ``longest``."""
    sizes = [length] if isinstance(length, int) else sorted(length)
    for size in sizes:
        if size >= longest:
            return size
    raise ValueError(f"a sequence of {longest} tokens does not fit the pad length(s) {sizes}")


def _check(items: Sequence[Encoded | None], completions: int, what: str) -> None:
    for e in items:
        if e is not None and len(e.completion_ids) != completions:
            raise ValueError(f"{e.source}: {what} need {completions} completion(s), got {len(e.completion_ids)}")


def _right_padded(seqs: Sequence[tuple[np.ndarray, np.ndarray] | None], length: int, pad_id: int):
    """(prompt, completion) pairs -> right-padded ids, attention mask and shifted completion mask."""
    ids = np.full((len(seqs), length), pad_id, np.int32)
    attention = np.zeros((len(seqs), length), np.int32)
    mask = np.zeros((len(seqs), length), np.float32)
    for b, seq in enumerate(seqs):
        if seq is None:
            continue
        prompt, completion = seq
        n = len(prompt) + len(completion)
        ids[b, :n] = np.concatenate([prompt, completion])
        attention[b, :n] = 1
        mask[b, len(prompt) - 1 : n - 1] = 1.0  # position t predicts token t + 1
    return ids, attention, mask


def collate_sft(items: Sequence[Encoded | Sequence[Encoded] | None], *, pad_id: int, length: Length) -> SFTBatch:
    """SFT examples, or packs of them from :func:`pack`, into an :class:`SFTBatch` (None = empty row)."""
    rows = [() if item is None else (item,) if isinstance(item, Encoded) else tuple(item) for item in items]
    for row in rows:
        _check(row, 1, "SFT examples")
    T = pad_length(max((sum(e.length for e in row) for row in rows), default=0), length)
    ids = np.full((len(rows), T), pad_id, np.int32)
    loss, positions, segments = np.zeros((len(rows), T), np.float32), np.zeros_like(ids), np.zeros_like(ids)
    for b, row in enumerate(rows):
        start = 0
        for segment, e in enumerate(row, start=1):
            end = start + e.length
            ids[b, start:end] = np.concatenate([e.prompt_ids, e.completion_ids[0]])
            loss[b, start + len(e.prompt_ids) - 1 : end - 1] = 1.0  # position t predicts token t + 1
            positions[b, start:end] = np.arange(e.length)
            segments[b, start:end] = segment
            start = end
    return SFTBatch(input_ids_BT=ids, attention_mask_BT=(segments > 0).astype(np.int32), loss_mask_BT=loss,
                    positions_BT=positions, segment_ids_BT=segments)


def collate_pairs(items: Sequence[Encoded | None], *, pad_id: int, length: Length) -> PairBatch:
    """Pairwise examples into a :class:`PairBatch` (chosen and rejected padded to one length)."""
    _check(items, 2, "pairwise examples")
    T = pad_length(max((e.length for e in items if e is not None), default=0), length)
    sides = [_right_padded([None if e is None else (e.prompt_ids, e.completion_ids[k]) for e in items], T, pad_id)
             for k in (0, 1)]
    margin = np.array([0.0 if e is None else e.margin for e in items], np.float32)
    (c_ids, c_att, c_mask), (r_ids, r_att, r_mask) = sides
    return PairBatch(chosen_ids_BT=c_ids, chosen_attention_mask_BT=c_att, chosen_response_mask_BT=c_mask,
                     rejected_ids_BT=r_ids, rejected_attention_mask_BT=r_att, rejected_response_mask_BT=r_mask,
                     margin_B=margin)


def collate_ranked(items: Sequence[Encoded | None], *, pad_id: int, length: Length,
                   num_responses: int | None = None) -> RankBatch:
    """Ranked examples into a :class:`RankBatch`; ``N = num_responses`` (default: most in the batch).
    Fix ``num_responses`` for static shapes."""
    present = [e for e in items if e is not None]
    N = num_responses if num_responses is not None else max((len(e.completion_ids) for e in present), default=2)
    for e in present:
        if not 2 <= len(e.completion_ids) <= N:
            raise ValueError(f"{e.source}: {len(e.completion_ids)} responses; a RankBatch row holds 2..{N}")
    T = pad_length(max((e.length for e in present), default=0), length)
    flat = [None if e is None or n >= len(e.completion_ids) else (e.prompt_ids, e.completion_ids[n])
            for e in items for n in range(N)]
    ids, attention, mask = (a.reshape(len(items), N, T) for a in _right_padded(flat, T, pad_id))
    valid = np.array([[seq is not None for seq in flat[b * N:(b + 1) * N]] for b in range(len(items))], np.float32)
    return RankBatch(input_ids_BNT=ids, attention_mask_BNT=attention, response_mask_BNT=mask, valid_BN=valid)


def collate_binary(items: Sequence[Encoded | None], *, pad_id: int, length: Length) -> BinaryBatch:
    """Binary-feedback examples into a :class:`BinaryBatch`."""
    _check(items, 1, "binary examples")
    T = pad_length(max((e.length for e in items if e is not None), default=0), length)
    ids, attention, mask = _right_padded([None if e is None else (e.prompt_ids, e.completion_ids[0]) for e in items],
                                         T, pad_id)
    label = np.array([0.0 if e is None else e.label for e in items], np.float32)
    return BinaryBatch(input_ids_BT=ids, attention_mask_BT=attention, response_mask_BT=mask, label_B=label)


def collate_prompts(items: Sequence[Encoded | None], *, pad_id: int, length: Length) -> PromptBatch:
    """Prompts (completions, if any, are ignored) into a LEFT-padded :class:`PromptBatch`."""
    P = pad_length(max((len(e.prompt_ids) for e in items if e is not None), default=0), length)
    ids = np.full((len(items), P), pad_id, np.int32)
    mask = np.zeros((len(items), P), np.int32)
    for b, e in enumerate(items):
        if e is not None:
            ids[b, P - len(e.prompt_ids):] = e.prompt_ids
            mask[b, P - len(e.prompt_ids):] = 1
    return PromptBatch(prompt_ids_BP=ids, prompt_mask_BP=mask)
