"""The embedded default: a tokenizer and a tiny Llama config for the simulated customer-support world.

``embedded_dir()`` returns a directory in Hugging Face layout (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``, ``config.json``) that loads offline with
``transformers.AutoTokenizer.from_pretrained``. There are no weights: the model is trained from
scratch by SFT on ``rlhf_jax.data.simulated.sft_rows``.

- Tokenizer: byte-level BPE (``VOCAB_SIZE`` entries, digits split one by one so unseen order numbers
  tokenize like seen ones) fitted with ``tokenizers`` on text sampled from the world's train split;
  ``<|bos|>`` is prepended by the tokenizer, ``<|eos|>`` ends a response, ``<|pad|>`` pads. The chat
  template renders a user turn as ``"Customer: ...\\nAgent:"`` and an assistant turn as
  ``" ...<|eos|>"``, so a conversation and the same prompt as text encode to the same ids.
- Model: Llama, hidden 128, 4 layers, 4 heads / 2 KV heads, MLP 384, 128 positions, tied
  embeddings, vocabulary rounded up to a multiple of 64 (about 0.9M parameters).

``python -m rlhf_jax.data.embedded --out DIR`` builds it and prints the token-length distribution of
prompts and responses.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from rlhf_jax.data.simulated import world

VERSION = "embedded-v1"
"""Prefix of the cache directory (its suffix fingerprints the world's text and the settings)."""
VOCAB_SIZE = 1024
CORPUS_ROWS = 20_000
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{% if not loop.first %}\n{% endif %}Customer: {{ message['content'] }}\nAgent:"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('only user and assistant roles are supported, got ' + message['role']) }}"
    "{% endif %}{% endfor %}"
)
MODEL = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=384, max_position_embeddings=128, tie_word_embeddings=True)


@functools.cache
def tokenizer_corpus(n: int = CORPUS_ROWS, seed: int = 0) -> tuple[str, ...]:
    """Texts to fit the BPE on: ``n`` prompts and demonstrations of the train split, plus every response part."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        prompt, topic = world.sample_prompt(rng, "train")
        texts += [prompt, " " + world.sample_response(rng, topic)[0]]
    parts = [a for t in world.TOPICS for a in t.actions] + list(
        world.GENERIC_ACTIONS + world.EMPATHY_OPENERS + world.FLAT_OPENERS + world.FILLERS + world.RUDE_REMARKS
        + world.IRRELEVANT_REMARKS + world.OFFERS)
    return tuple(texts + [" " + p for p in parts])


def build_tokenizer(corpus: Sequence[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE fitted on ``corpus``, wrapped with bos/eos/pad and the chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   chat_template=CHAT_TEMPLATE, padding_side="left", model_max_length=MODEL["max_position_embeddings"])


def model_config(tokenizer: PreTrainedTokenizerFast) -> Any:
    """The tiny Llama config (a ``transformers.LlamaConfig``) for ``tokenizer`` (vocabulary rounded up to a multiple
    of 64). Imported here, not at the top: ``LlamaConfig`` imports torch (seconds), which only a build needs."""
    from transformers import LlamaConfig

    vocab = -(-len(tokenizer) // 64) * 64
    return LlamaConfig(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, **MODEL)


def build(out: str | os.PathLike, corpus: Sequence[str] | None = None) -> pathlib.Path:
    """Write the tokenizer (fitted on ``corpus``, default ``tokenizer_corpus()``) and ``config.json`` to ``out``."""
    out = pathlib.Path(out)
    tokenizer = build_tokenizer(tokenizer_corpus() if corpus is None else corpus)
    tokenizer.save_pretrained(out)
    model_config(tokenizer).save_pretrained(out)
    return out


def fingerprint(corpus: Sequence[str]) -> str:
    """12 hex digits of SHA-256 over what a build depends on: the corpus and the settings."""
    blob = json.dumps([list(corpus), VOCAB_SIZE, MODEL, CHAT_TEMPLATE, [BOS, EOS, PAD]]).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def cache_root() -> pathlib.Path:
    """``$RLHF_JAX_CACHE``, default ``~/.cache/rlhf_jax``."""
    return pathlib.Path(os.environ.get("RLHF_JAX_CACHE", pathlib.Path.home() / ".cache" / "rlhf_jax"))


def embedded_dir() -> pathlib.Path:
    """The embedded tokenizer + config directory, built once into ``cache_root() / "embedded-v1-<fingerprint>"``.

    The fingerprint changes whenever the world's text or a setting does, so a stale build is never
    reused. Concurrent callers are safe: each builds into a temporary sibling and renames it into
    place; the first rename wins and the others discard theirs (the builds are identical).
    """
    corpus = tokenizer_corpus()
    return build_once(cache_root() / f"{VERSION}-{fingerprint(corpus)}", lambda tmp: build(tmp, corpus))


def build_once(target: pathlib.Path, build_into) -> pathlib.Path:
    """``target`` (a cached directory holding ``config.json``), built by ``build_into(tmp)`` if absent.

    Safe for concurrent callers (pytest workers, parallel scripts): each builds into a temporary
    sibling and renames it into place; the first rename wins and the others discard theirs."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_into(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclasses.dataclass(frozen=True)
class LengthStats:
    """Token counts (with BOS for prompts, with EOS for responses) over a sample of world rows."""

    prompt_percentiles: dict[int, float]
    response_percentiles: dict[int, float]
    prompt_max: int
    response_max: int


def length_stats(tokenizer: Any, n: int = 2000, seed: int = 1, split: world.Split = "train") -> LengthStats:
    """Token-length distribution of prompts and of demonstration responses."""
    rng = np.random.default_rng(seed)
    texts = [world.sample_prompt(rng, split) for _ in range(n)]
    texts = [(prompt, " " + world.sample_response(rng, topic)[0]) for prompt, topic in texts]
    prompts = np.array([len(ids) for ids in tokenizer([p for p, _ in texts])["input_ids"]])
    responses = np.array([len(ids) + 1 for ids in tokenizer([r for _, r in texts], add_special_tokens=False)["input_ids"]])
    qs = (50, 90, 99, 100)
    return LengthStats({q: float(np.percentile(prompts, q)) for q in qs}, {q: float(np.percentile(responses, q)) for q in qs},
                       int(prompts.max()), int(responses.max()))


def main(out: pathlib.Path) -> None:
    """Build the embedded tokenizer + config into ``out`` and print the token-length distribution."""
    from transformers import AutoTokenizer

    build(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    print(f"wrote {out}: vocab {len(tokenizer)}, model vocab {model_config(tokenizer).vocab_size}")
    for split in world.SPLITS:
        stats = length_stats(tokenizer, split=split)
        print(f"{split}: prompt tokens p50/p90/p99/max {stats.prompt_percentiles}, "
              f"response tokens (with EOS) {stats.response_percentiles}")


if __name__ == "__main__":
    import tyro

    tyro.cli(main)
