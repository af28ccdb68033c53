"""Bad input to the models package: each case fails early with a message that says what and where."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import tokenizers
import transformers
from safetensors.numpy import load_file, save_file

from hf_fixtures import VOCAB, make_tiny_checkpoint
from rlhf_jax import models


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("err") / "llama")


def _copy_with_tensors(src, dst, edit):
    """Copy a checkpoint, passing its tensor dict through ``edit``."""
    shutil.copytree(src, dst)
    tensors = edit(load_file(dst / "model.safetensors"))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_unsupported_model_type_lists_supported_ones():
    with pytest.raises(ValueError) as err:
        models.ModelConfig.from_hf_config({"model_type": "bert", "vocab_size": 8}, source="ckpt/config.json")
    message = str(err.value)
    assert "ckpt/config.json" in message and "'bert'" in message
    assert all(t in message for t in models.SUPPORTED_MODEL_TYPES)


def test_unsupported_rope_type_and_missing_field():
    base = {"model_type": "llama", "vocab_size": 8, "hidden_size": 16, "num_attention_heads": 2,
            "num_hidden_layers": 1, "intermediate_size": 8}
    with pytest.raises(ValueError, match=r"rope_type 'yarn' is not supported; supported: \('default', 'linear', 'llama3'\)"):
        models.ModelConfig.from_hf_config(base | {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="field 'intermediate_size' is required"):
        models.ModelConfig.from_hf_config({k: v for k, v in base.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="sliding-window"):
        models.ModelConfig.from_hf_config(base | {"model_type": "qwen2", "use_sliding_window": True})


def test_missing_tensor_names_tensor_shape_and_files(llama_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    bad = _copy_with_tensors(llama_dir, tmp_path / "missing", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError) as err:
        models.load_pretrained(bad)
    message = str(err.value)
    assert repr(name) in message and "(48, 32)" in message and "model.safetensors" in message and str(bad) in message


def test_misshaped_tensor_names_both_shapes_and_file(llama_dir, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    bad = _copy_with_tensors(llama_dir, tmp_path / "shape", lambda t: t | {name: np.zeros((32, 32), np.float32)})
    with pytest.raises(ValueError) as err:
        models.load_pretrained(bad)
    assert re.search(rf"model\.safetensors: tensor '{re.escape(name)}' has shape \(32, 32\), expected \(16, 32\)", str(err.value))


def test_unexpected_tensor_is_not_dropped_silently(llama_dir, tmp_path):
    bad = _copy_with_tensors(llama_dir, tmp_path / "extra", lambda t: t | {"model.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"not used by this llama config.*model\.extra\.weight"):
        models.load_pretrained(bad)


def test_config_contradicting_weights(llama_dir, tmp_path):
    bad = tmp_path / "cfg"
    shutil.copytree(llama_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | {"num_key_value_heads": 4}))
    with pytest.raises(ValueError, match=r"k_proj\.weight' has shape \(16, 32\), expected \(32, 32\)"):
        models.load_pretrained(bad)


def _tokenizer(n_tokens: int) -> transformers.PreTrainedTokenizerFast:
    vocab = {f"tok{i}": i for i in range(n_tokens - 1)} | {"<unk>": n_tokens - 1}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="tok0")


def test_tokenizer_larger_than_embedding_is_rejected(llama_dir):
    cfg, _ = models.load_pretrained(llama_dir)
    models.check_tokenizer(cfg, _tokenizer(VOCAB), source="tok_dir")  # exactly fits
    with pytest.raises(ValueError, match=rf"tok_dir: tokenizer has {VOCAB + 1} tokens .* embedding has {VOCAB} rows"):
        models.check_tokenizer(cfg, _tokenizer(VOCAB + 1), source="tok_dir")


def test_decoding_rejects_batch_mismatch(llama_dir):
    cfg, params = models.load_pretrained(llama_dir)
    cache = models.init_cache(cfg, 2, 8)
    with pytest.raises(ValueError, match=r"3 rows do not match a cache of 2 rows"):
        models.prefill(cfg, params, np.ones((3, 4), np.int32), np.ones((3, 4), np.int32), cache)
    with pytest.raises(ValueError, match=r"token_ids_B \(3,\) must be \(batch,\) = \(2,\)"):
        models.decode_step(cfg, params, cache, np.ones((3,), np.int32))


def test_forward_rejects_mismatched_shapes_and_overlong_learned_positions(tmp_path):
    cfg, params = models.load_pretrained(make_tiny_checkpoint("gpt2", tmp_path / "gpt2"))
    ids = np.ones((2, 5), np.int32)
    with pytest.raises(ValueError, match=r"input_ids_BT \(2, 5\) and attention_mask_BT \(2, 4\)"):
        models.forward(cfg, params, ids, np.ones((2, 4), np.int32))
    long_ids = np.ones((1, cfg.max_position_embeddings + 1), np.int32)
    with pytest.raises(ValueError, match="exceeds the 64 learned positions"):
        models.forward(cfg, params, long_ids, long_ids)
