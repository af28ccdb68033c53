"""The collector's default sampler: two responses from a Hugging Face-layout checkpoint.

Weights load with ``rlhf_jax.models.load_pretrained``, the tokenizer from the same directory, and
responses are drawn with ``rlhf_jax.rollout.generate`` under the key ``fold_in(key(seed), index)``,
so the pair shown for a prompt is the same on every run.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np
from transformers import AutoTokenizer

from rlhf_jax import models, rollout


class ModelSampler:
    """Samples two responses per prompt from the checkpoint in ``model_dir`` (a ``Sampler``).

    Every prompt is left-padded to the longest of ``prompts``, so generation compiles once.
    """

    def __init__(self, model_dir: str | os.PathLike, prompts: Sequence[str], *, max_new_tokens: int = 48,
                 temperature: float = 1.0):
        self.cfg, self.params = models.load_pretrained(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        models.check_tokenizer(self.cfg, self.tokenizer, source=str(model_dir))
        if self.tokenizer.eos_token_id is None or self.tokenizer.pad_token_id is None:
            raise ValueError(f"{model_dir}: the tokenizer needs an eos and a pad token to sample responses")
        self.pad_to = max(len(ids) for ids in self.tokenizer(list(prompts))["input_ids"])
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    def __call__(self, prompt: str, seed: int, index: int) -> tuple[str, str]:
        ids = self.tokenizer(prompt)["input_ids"]
        if len(ids) > self.pad_to:
            raise ValueError(f"prompt {index} has {len(ids)} tokens, more than the {self.pad_to} this sampler pads to")
        pad = self.pad_to - len(ids)
        prompt_ids = np.array([[self.tokenizer.pad_token_id] * pad + ids], np.int32)
        prompt_mask = np.array([[0] * pad + [1] * len(ids)], np.int32)
        out = rollout.generate(self.cfg, self.params, prompt_ids, prompt_mask,
                               key=jax.random.fold_in(jax.random.key(seed), index), max_new_tokens=self.max_new_tokens,
                               temperature=self.temperature, eos_ids=(self.tokenizer.eos_token_id,),
                               pad_id=self.tokenizer.pad_token_id, num_samples=2)
        ids_BR, mask_BR = np.asarray(out.response_ids_BR), np.asarray(out.response_mask_BR)
        first, second = (self.tokenizer.decode(row[m > 0], skip_special_tokens=True) for row, m in zip(ids_BR, mask_BR))
        return first, second
