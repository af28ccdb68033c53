"""Rows -> token ids -> padded batches (:mod:`rlhf_jax.types`).

Two steps, so that tokenization runs once per dataset and batching once per step:

1. :func:`encode` turns rows into :class:`Encoded` token ids, applying the truncation policy.
2. ``collate_*`` pads a list of encoded examples into a batch; :class:`~rlhf_jax.data.iterator.BatchIterator`
   calls it (``functools.partial(collate_pairs, pad_id=..., length=...)``).

Tokenization
------------
* A conversation prompt is rendered with the chat template (``add_generation_prompt=True``) and
  encoded without adding special tokens (the template has them). A **text** prompt is rendered the
  same way, as the messages :func:`rlhf_jax.data.chat.as_conversation` makes of it (a transcript's
  turns, else one user turn), when ``chat_template`` is "on", or "auto" (the default; None takes the
  run's ``--model.chat-template``, recorded on the tokenizer) and the tokenizer has a template; with
  "off" (or no template) it is encoded as ``tokenizer(prompt)`` does,
  with the tokenizer's own special tokens (e.g. BOS).
* A completion is encoded without special tokens and ends in exactly one EOS: appended if absent.
  For a templated prompt the completion is the text the chat template adds for the assistant turn,
  i.e. ``render(prompt + [answer])`` minus ``render(prompt)``, cut after its first EOS (a template's
  trailing ``"\\n"`` after ``<|im_end|>`` is not part of what a policy samples, and the reward model
  must be trained on the token where PPO scores a response: its EOS).
* Prompt and completion are encoded separately and concatenated, so the boundary between them is
  exact (BPE merges never straddle it).

Truncation (``max_len`` counts prompt + the longest completion of the row; ``truncate=``)
-----------------------------------------------------------------------------------------
* ``"error"``: a row that does not fit raises ``DataError`` naming ``file:line:field``.
* ``"drop"``: skip the row; counted in the report under ``too_long``.
* ``"left"`` (default): shorten the prompt, keeping the whole completion(s). A templated prompt loses
  whole turns, oldest first, after any system message: the system and the last user turn are never
  cut (a row whose last turn alone does not fit raises). A raw text prompt loses tokens from the
  left, keeping a leading BOS. Counted in ``report.truncated``.
* ``"right"``: cut the completion(s) from the end (they lose their EOS); the prompt is never cut.
  Counted in ``report.truncated``.

Padding length (``length=``): an ``int`` pads every batch to that length (static shapes: one
compilation); a sequence of ints is a set of buckets, each batch padded to the smallest bucket that
fits (one compilation per bucket; in multi-host runs use a fixed length so all hosts agree).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Sequence

import numpy as np

from rlhf_jax.data.chat import ChatTemplate, as_conversation, uses_template
from rlhf_jax.data.formats import BinaryRow, Message, PairRow, Prompt, PromptRow, RankRow, Row, SFTRow
from rlhf_jax.data.validation import DataError, ValidationReport, warn_if_unreported
from rlhf_jax.types import BinaryBatch, PairBatch, PromptBatch, RankBatch, SFTBatch

Truncate = Literal["error", "drop", "left", "right"]
TRUNCATE_MODES: tuple[Truncate, ...] = ("error", "drop", "left", "right")
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


def render(prompt: Prompt, completions: Sequence[str], tokenizer: Any, source: str = "<row>",
           chat_template: ChatTemplate | None = None) -> tuple[str, list[str]]:
    """The prompt and completion texts the model sees: the chat template applied to conversations and,
    unless ``chat_template="off"`` (or "auto" with a tokenizer that has none), to text prompts turned
    into messages (:func:`rlhf_jax.data.chat.as_conversation`). None: the tokenizer's setting
    (:func:`rlhf_jax.data.chat.uses_template`)."""
    if not uses_template(prompt, tokenizer, chat_template, source):
        return prompt, list(completions)
    if not isinstance(prompt, str):
        return _render_turns(prompt, list(completions), tokenizer, source)
    return _render_turns(as_conversation(prompt), [c.lstrip() for c in completions], tokenizer, source)


def _render_turns(turns: Sequence[Message], completions: Sequence[str], tokenizer: Any, source: str
                  ) -> tuple[str, list[str]]:
    messages = [dataclasses.asdict(m) for m in turns]
    head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    tails = []
    for completion in completions:
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=False)
        if not full.startswith(head):
            raise DataError(source, "prompt", "chat_template", "the chat template does not render the prompt "
                            "(with add_generation_prompt=True) as a prefix of prompt + answer")
        tails.append(full[len(head):])
    return head, tails


def _end_at_eos(ids: list[int], eos: int, templated: bool, tokenizer: Any, source: str) -> list[int]:
    """A completion's ids ending in exactly one EOS: appended if absent; for a templated answer, what the
    template writes after its end-of-turn EOS (e.g. ChatML's ``"\\n"`` after ``<|im_end|>``) is cut, so
    the sequence ends where a sampled response stops and the reward model is trained on the token PPO
    scores. Text after an EOS that is more than template whitespace is an error, not dropped."""
    if eos not in ids:
        return ids + [eos]
    cut = ids.index(eos) + 1
    rest = ids[cut:]
    if rest and (not templated or tokenizer.decode(rest).strip()):
        raise DataError(source, "completion", "eos_inside", f"the completion has the end-of-sequence token "
                        f"{tokenizer.convert_ids_to_tokens(eos)!r} before its end, followed by "
                        f"{tokenizer.decode(rest)!r}")
    return ids[:cut]


def _too_long(source: str, prompt: int, longest: int, max_len: int, hint: str = "") -> DataError:
    return DataError(source, "prompt", "too_long", f"prompt ({prompt} tokens) + completion ({longest}) > max_len "
                     f"{max_len}{hint}: raise the length limit or pass --data.truncate drop (skip such rows), "
                     f"left (drop the oldest turns / prompt tokens) or right (cut the completion)")


def _fit(prompt: list[int], completions: list[list[int]], *, max_len: int, truncate: Truncate,
         bos_id: int | None, turns: tuple[Message, ...] | None, encode_head: Callable[[Sequence[Message]], list[int]],
         source: str, report: ValidationReport) -> tuple[list[int], list[list[int]]]:
    """``(prompt, completions)`` with prompt + longest completion <= max_len, by ``truncate`` (module
    docstring), or DataError. ``turns``: the conversation a templated prompt was rendered from."""
    if not prompt:
        raise DataError(source, "prompt", "empty_text", "the prompt encodes to no tokens")
    longest = max(map(len, completions), default=0)
    if len(prompt) + longest <= max_len:
        return prompt, completions
    if truncate in ("error", "drop"):
        raise _too_long(source, len(prompt), longest, max_len)
    if truncate == "right":
        room = max_len - len(prompt)
        if room < 1 or not completions:
            raise DataError(source, "prompt", "too_long", f"the prompt alone has {len(prompt)} tokens (max_len "
                            f"{max_len}); --data.truncate right cuts completions only, never the prompt")
        report.truncated += 1
        return prompt, [c[:room] for c in completions]
    room = max_len - longest
    if room < 1:
        raise DataError(source, "completion", "too_long", f"the completion alone has {longest} tokens: max_len "
                        f"{max_len} leaves no room for the prompt (--data.truncate drop skips such rows, right "
                        f"cuts the completion)")
    if turns is None:  # raw text: drop tokens from the left, keeping a leading BOS
        report.truncated += 1
        head = prompt[:1] if bos_id is not None and prompt[0] == bos_id else []
        return head + prompt[len(prompt) - (room - len(head)):], completions
    # a conversation: drop whole turns after any leading system message, oldest first; never cut a turn
    system = 0
    while system < len(turns) and turns[system].role == "system":
        system += 1
    kept = list(turns[system:])
    while len(kept) > 1:
        kept = kept[1:]
        while len(kept) > 1 and kept[0].role != "user":  # a conversation restarts at a user turn
            kept = kept[1:]
        ids = encode_head(list(turns[:system]) + kept)
        if len(ids) <= room:
            report.truncated += 1
            return ids, completions
    raise DataError(source, "prompt", "too_long", f"the last turn alone leaves a {len(encode_head(list(turns[:system]) + kept))}"
                    f"-token prompt, over the {room} tokens that max_len {max_len} leaves beside the completion "
                    f"({longest}); left truncation drops whole earlier turns and never cuts the system or user turn: "
                    f"raise the length limit, or pass --data.truncate drop or right")


def _encode(rows: Sequence[Row], tokenizer: Any, max_len: int, truncate: Truncate,
            report: ValidationReport | None, with_completions: bool, chat_template: ChatTemplate) -> list[Encoded]:
    if truncate not in TRUNCATE_MODES:
        raise ValueError(f"truncate must be one of {TRUNCATE_MODES}, got {truncate!r}")
    eos = tokenizer.eos_token_id
    if with_completions and eos is None:
        raise ValueError("the tokenizer has no eos_token: completions need one to end on")
    templated = [uses_template(row.prompt, tokenizer, chat_template, row.source) for row in rows]
    rendered = [render(row.prompt, _completions(row) if with_completions else (), tokenizer, row.source, chat_template)
                for row in rows]

    def ids(texts: list[str], special: bool) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=special)["input_ids"] if texts else []

    prompts: list[list[int]] = [[] for _ in rows]
    for flag, special in ((False, True), (True, False)):  # raw text gets the tokenizer's BOS; a template has its own
        group = [i for i, t in enumerate(templated) if t == flag]
        for i, p in zip(group, ids([rendered[i][0] for i in group], special)):
            prompts[i] = p
    flat = iter(ids([c for _, tails in rendered for c in tails], False))
    counted = report if report is not None else ValidationReport()

    def encode_head(turns: Sequence[Message]) -> list[int]:
        head = tokenizer.apply_chat_template([dataclasses.asdict(m) for m in turns], tokenize=False,
                                             add_generation_prompt=True)
        return ids([head], False)[0]

    out = []
    for row, prompt, (_, tails), is_chat in zip(rows, prompts, rendered, templated):
        completions = [next(flat) for _ in tails]
        try:
            completions = [_end_at_eos(c, eos, is_chat, tokenizer, row.source) for c in completions]
            prompt, completions = _fit(prompt, completions, max_len=max_len, truncate=truncate,
                                       bos_id=tokenizer.bos_token_id,
                                       turns=as_conversation(row.prompt) if is_chat else None,
                                       encode_head=encode_head, source=row.source, report=counted)
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
           report: ValidationReport | None = None, chat_template: ChatTemplate | None = None) -> list[Encoded]:
    """Tokenize rows (any kind) into prompt + EOS-terminated completion ids fitted to ``max_len``.

    ``tokenizer`` is a ``transformers.PreTrainedTokenizerFast``. See the module docstring for the
    tokenization and truncation rules; truncated and dropped rows are counted in ``report``.
    """
    return _encode(rows, tokenizer, max_len, truncate, report, with_completions=True, chat_template=chat_template)


def encode_prompts(rows: Sequence[Row], tokenizer: Any, *, max_len: int, truncate: Truncate = "left",
                   report: ValidationReport | None = None, chat_template: ChatTemplate | None = None) -> list[Encoded]:
    """Tokenize only the prompts of ``rows`` (for generation), fitted to ``max_len``."""
    return _encode(rows, tokenizer, max_len, truncate, report, with_completions=False, chat_template=chat_template)


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
