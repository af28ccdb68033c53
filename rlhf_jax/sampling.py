"""Sampling responses to text prompts in batches (evaluation, best-of-n, feedback collection) and
decoding them."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from rlhf_jax import models, rollout, sharding
from rlhf_jax.cli import SampleArgs
from rlhf_jax.data import PromptRow, ValidationReport, collate_prompts, encode_prompts
from rlhf_jax.data.sources import announce_truncation
from rlhf_jax.model_io import eos_ids


def batch_rows(num_prompts: int, batch_size: int, multiple: int = 1) -> int:
    """Rows of each generate call for ``num_prompts`` prompts: ``batch_size``, or fewer when all the prompts fit
    in one call: the smallest power of two that holds them, rounded up to a multiple of ``multiple`` (the batch
    shards of this process's devices), never above ``batch_size``. Evaluating 4 prompts thus decodes 4 rows
    instead of 64, while the number of distinct batch shapes (compilations) stays logarithmic."""
    if num_prompts >= batch_size:
        return batch_size
    rows = 1 << max(0, num_prompts - 1).bit_length()
    rows = -(-rows // multiple) * multiple
    return min(rows, batch_size)


def prompt_batches(prompts: Sequence[str], tokenizer: Any, sample: SampleArgs, multiple: int = 1) -> list[Any]:
    """Left-padded PromptBatches of :func:`batch_rows` rows (the last one padded with empty rows)."""
    report = ValidationReport()
    encoded = encode_prompts([PromptRow(prompt=p) for p in prompts], tokenizer, max_len=sample.max_prompt_len,
                             report=report)
    announce_truncation(report, len(prompts), what="sampled prompts", max_len=sample.max_prompt_len, mode="left",
                        flag="--sample.max-prompt-len")
    batches = []
    rows = batch_rows(len(encoded), sample.batch_size, multiple)
    for i in range(0, len(encoded), rows):
        chunk: list[Any] = list(encoded[i:i + rows])
        chunk += [None] * (rows - len(chunk))
        batches.append(collate_prompts(chunk, pad_id=tokenizer.pad_token_id, length=sample.max_prompt_len))
    return batches


def _fill_empty_prompts(batch: Any, pad_id: int) -> Any:
    """Rows that only pad the last batch get a one-token prompt so generation is well defined."""
    mask = np.array(batch.prompt_mask_BP)
    ids = np.array(batch.prompt_ids_BP)
    empty = mask.sum(-1) == 0
    mask[empty, -1] = 1
    ids[empty, -1] = pad_id
    return batch.replace(prompt_ids_BP=ids, prompt_mask_BP=mask), empty


def sample(cfg: models.ModelConfig, params: Any, tokenizer: Any, prompts: Sequence[str], *, key: jax.Array,
           sample_args: SampleArgs, num_samples: int = 1, mesh=None, rules=None) -> tuple[list[list[str]], list[rollout.Rollout]]:
    """``num_samples`` responses per prompt (decoded text without EOS) and the raw rollouts."""
    texts: list[list[str]] = []
    rollouts = []
    eos = eos_ids(cfg, tokenizer)
    multiple = 1 if mesh is None else max(1, sharding.batch_shards(mesh, rules) // jax.process_count())
    for i, batch in enumerate(prompt_batches(prompts, tokenizer, sample_args, multiple)):
        batch, empty = _fill_empty_prompts(batch, tokenizer.pad_token_id)
        ids, mask = batch.prompt_ids_BP, batch.prompt_mask_BP
        if mesh is not None:
            ids, mask = sharding.shard_batch((ids, mask), mesh, rules)
        r = rollout.generate(cfg, params, ids, mask, key=jax.random.fold_in(key, i),
                             max_new_tokens=sample_args.max_new_tokens, temperature=sample_args.temperature,
                             top_k=sample_args.top_k, top_p=sample_args.top_p, eos_ids=eos,
                             pad_id=tokenizer.pad_token_id, num_samples=num_samples)
        rollouts.append(r)
        decoded = decode_responses(tokenizer, r)
        for b in range(len(empty)):
            if not empty[b]:
                texts.append(decoded[b * num_samples:(b + 1) * num_samples])
    return texts[:len(prompts)], rollouts


def decode_responses(tokenizer: Any, r: rollout.Rollout) -> list[str]:
    """Response text of every row, up to (not including) EOS."""
    ids_BR = np.asarray(jax.device_get(r.response_ids_BR))
    mask_BR = np.asarray(jax.device_get(r.response_mask_BR)) > 0
    has_eos = np.asarray(jax.device_get(r.has_eos_B))
    out = []
    for ids, m, eos in zip(ids_BR, mask_BR, has_eos):
        n = int(m.sum()) - int(bool(eos))
        out.append(tokenizer.decode(ids[:n].tolist(), skip_special_tokens=True))
    return out
