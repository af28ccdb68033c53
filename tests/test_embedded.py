"""The embedded tokenizer + tiny Llama config (rlhf_jax.data.embedded)."""
import json
import math

import numpy as np
import pytest
from transformers import AutoConfig, AutoTokenizer

from rlhf_jax import models
from rlhf_jax.data import embedded
from rlhf_jax.data.batching import encode
from rlhf_jax.data.formats import Message, SFTRow
from rlhf_jax.data.simulated import sft_rows, world


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``embedded_dir()`` built into a fresh cache root (as a first-time user would get it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLHF_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
        path = embedded.embedded_dir()
        assert path.parent == embedded.cache_root()
        assert path.name == f"{embedded.VERSION}-{embedded.fingerprint(embedded.tokenizer_corpus())}"
        mtime = (path / "tokenizer.json").stat().st_mtime_ns
        assert embedded.embedded_dir() == path and (path / "tokenizer.json").stat().st_mtime_ns == mtime  # cached
    return path


@pytest.fixture(scope="module")
def tokenizer(built):
    return AutoTokenizer.from_pretrained(built)  # conftest sets HF_HUB_OFFLINE=1


def test_layout_and_special_tokens(built, tokenizer):
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= {p.name for p in built.iterdir()}
    assert not list(built.glob("*.safetensors"))  # no weights: the model is trained from scratch
    assert len(tokenizer) == embedded.VOCAB_SIZE
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (embedded.BOS, embedded.EOS, embedded.PAD)
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    ids = tokenizer("Customer: My order 4821 has not arrived yet.\nAgent:")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer(" Check the tracking link.", add_special_tokens=False)["input_ids"][0] != tokenizer.bos_token_id


@pytest.mark.parametrize("split", world.SPLITS)
def test_round_trip_of_world_text(tokenizer, split):
    rows = sft_rows(300, seed=0, split=split)
    texts = [r["prompt"] for r in rows] + [r["completion"] for r in rows] + ["Customer: \u00e9t\u00e9 \U0001F600 #9999\nAgent:"]
    for text, ids in zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"]):
        assert tokenizer.decode(ids) == text
    # digits are split one by one, so held-out order numbers tokenize like seen ones
    assert tokenizer.tokenize(" 9876")[-4:] == ["9", "8", "7", "6"]


def test_chat_template_renders_the_world_prompt_format(tokenizer):
    row = sft_rows(1, seed=3)[0]
    complaint, completion = world.customer_text(row["prompt"]), row["completion"]
    turns = [{"role": "user", "content": complaint}]
    head = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert head == embedded.BOS + row["prompt"]
    full = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": completion.strip()}], tokenize=False)
    assert full == head + completion + embedded.EOS
    # a conversation and the same prompt as text encode to the same ids in the SFT pipeline
    text_row = SFTRow(row["prompt"], completion)
    chat_row = SFTRow((Message("user", complaint),), completion.strip())
    (a,), (b,) = encode([text_row], tokenizer, max_len=128), encode([chat_row], tokenizer, max_len=128)
    np.testing.assert_array_equal(a.prompt_ids, b.prompt_ids)
    np.testing.assert_array_equal(a.completion_ids[0], b.completion_ids[0])
    assert a.completion_ids[0][-1] == tokenizer.eos_token_id
    with pytest.raises(Exception, match="only user and assistant"):
        tokenizer.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


def test_model_config_is_the_tiny_llama(built, tokenizer):
    hf = AutoConfig.from_pretrained(built)
    assert hf.model_type == "llama"
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads,
            hf.intermediate_size, hf.max_position_embeddings) == (128, 4, 4, 2, 384, 128)
    assert hf.tie_word_embeddings and hf.vocab_size % 64 == 0 and len(tokenizer) <= hf.vocab_size < len(tokenizer) + 64
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    cfg = models.ModelConfig.from_hf_config(json.loads((built / "config.json").read_text()))
    models.check_tokenizer(cfg, tokenizer)
    n_params = sum(math.prod(spec.shape) for spec in models.param_specs(cfg).values())
    assert 0.7e6 < n_params < 1.2e6, n_params


def test_cli_build_is_reproducible_and_reports_lengths(built, capsys, tmp_path):
    embedded.main(tmp_path / "again")  # what `python -m rlhf_jax.data.embedded --out DIR` runs
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (built / name).read_bytes(), name
    out = capsys.readouterr().out
    assert "train: prompt tokens p50/p90/p99/max" in out and "eval: prompt tokens" in out


@pytest.mark.parametrize("split", world.SPLITS)
def test_token_lengths_fit_the_model_context(tokenizer, split):
    stats = embedded.length_stats(tokenizer, n=2000, split=split)
    assert stats.prompt_max <= 42 and stats.prompt_percentiles[90] <= 36, stats
    assert stats.response_percentiles[99] <= 44 and stats.response_max <= 52, stats
    assert stats.prompt_max + stats.response_max <= 128
