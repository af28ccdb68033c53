"""Our decoder against transformers' PyTorch models: logits, export, sharded and bf16 checkpoints.

The oracle is transformers (nobody here wrote it): tiny random checkpoints of each family, a
LEFT-padded batch of rows of different lengths, Hugging Face given the position ids ``generate``
uses. Logits must agree within 1e-4 (fp32) on every non-pad position.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from hf_fixtures import VOCAB, hf_logits, load_hf_model, make_tiny_checkpoint
from rlhf_jax import models
from rlhf_jax.models import hf_io

CASES = {
    "llama_untied_gqa": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama_bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama3_scaled": ("llama3_scaled", {}),
    "qwen2_tied": ("qwen2", {}),
    "qwen2_untied": ("qwen2", {"tie_word_embeddings": False}),
    "gpt2_tied": ("gpt2", {}),
    "gpt_neox_parallel": ("gpt_neox", {}),
    "gpt_neox_sequential": ("gpt_neox", {"use_parallel_residual": False, "tie_word_embeddings": True}),
}

forward = jax.jit(models.forward, static_argnums=0)


def _batch(seed: int = 0, B: int = 3, T: int = 12):
    """Left-padded rows of lengths T, T-3, T-7 (pad id 0)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((B, T), np.int32)
    for row, pad in enumerate([0, 3, 7][:B]):
        mask[row, :pad] = 0
    ids = np.where(mask == 1, rng.integers(3, VOCAB, (B, T)), 0).astype(np.int32)
    return ids, mask


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """name -> checkpoint directory, built once."""
    root = tmp_path_factory.mktemp("hf")
    return {name: make_tiny_checkpoint(family, root / name, **overrides) for name, (family, overrides) in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers_on_left_padded_batch(ckpt, name):
    ids, mask = _batch()
    expected = hf_logits(load_hf_model(ckpt[name]), ids, mask)
    cfg, params = models.load_pretrained(ckpt[name])
    got = np.asarray(forward(cfg, params, ids, mask))
    assert got.dtype == np.float32 and got.shape == expected.shape
    real = mask.astype(bool)
    assert np.abs(expected[real]).max() > 1.0  # the oracle's logits are not trivially small
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=0)
    assert np.isfinite(got).all()  # padded query rows included


def test_config_reads_rope_parameters_and_legacy_rope_fields():
    new = {"model_type": "llama", "vocab_size": 8, "hidden_size": 16, "num_attention_heads": 2,
           "num_hidden_layers": 1, "intermediate_size": 8,
           "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    legacy = {k: v for k, v in new.items() if k != "rope_parameters"} | {
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}}
    a, b = models.ModelConfig.from_hf_config(new), models.ModelConfig.from_hf_config(legacy)
    assert a == b and a.rope_theta == 500000.0 and a.rope_type == "llama3" and a.rope_factor == 8.0
    neox_legacy = {"model_type": "gpt_neox", "vocab_size": 8, "hidden_size": 16, "num_attention_heads": 2,
                   "num_hidden_layers": 1, "intermediate_size": 8, "rotary_pct": 0.25, "rotary_emb_base": 777.0}
    c = models.ModelConfig.from_hf_config(neox_legacy)
    assert (c.rotary_dim, c.rope_theta, c.parallel_residual) == (2, 777.0, True)


@pytest.mark.parametrize("name", list(CASES))
def test_save_pretrained_writes_the_same_tensors_and_config(ckpt, name, tmp_path):
    cfg, params = models.load_pretrained(ckpt[name])
    out = models.save_pretrained(tmp_path / "export", cfg, params)
    original, exported = load_file(ckpt[name] / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for key in original:
        np.testing.assert_array_equal(exported[key], original[key], err_msg=key)
    assert models.load_pretrained(out)[0] == cfg
    meta = json.loads((out / "config.json").read_text())
    assert meta["model_type"] == cfg.model_type


def test_streamed_safetensors_read_back_by_safetensors(tmp_path):
    """write_safetensors (one tensor in memory at a time) against the safetensors library's own reader,
    bfloat16 included; a tensor that does not match its header entry is refused and no file is left."""
    import ml_dtypes
    from safetensors import safe_open

    rng = np.random.default_rng(0)
    arrays = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b.bf16": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
              "c": rng.normal(size=(2, 2, 3)).astype(np.float16), "d": np.arange(5, dtype=np.int32)}
    header = [(k, v.shape, v.dtype) for k, v in arrays.items()]
    hf_io.write_safetensors(tmp_path / "x.safetensors", header, iter(arrays.items()), metadata={"format": "pt"})
    with safe_open(tmp_path / "x.safetensors", framework="flax") as f:
        assert f.metadata() == {"format": "pt"} and sorted(f.keys()) == sorted(arrays)
        for k, v in arrays.items():
            got = np.asarray(f.get_tensor(k))
            assert got.dtype == v.dtype and got.shape == v.shape
            np.testing.assert_array_equal(got, v, err_msg=k)
    wrong = [("a", (3, 5), np.dtype(np.float32)), ("b", (4,), np.dtype(np.float32))]
    with pytest.raises(AssertionError, match=r"tensor 'b' \(3,\) float32 arrived where the header has 'b' \(4,\)"):
        hf_io.write_safetensors(tmp_path / "y.safetensors", wrong,
                                iter([("a", arrays["a"]), ("b", np.zeros(3, np.float32))]))
    assert not list(tmp_path.glob("y.safetensors*"))


def test_model_trained_from_scratch_exports_to_transformers(tmp_path):
    """init_params -> save_pretrained -> AutoModelForCausalLM gives our logits (config written by us)."""
    cfg = models.ModelConfig(
        model_type="llama", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
        mlp_dim=40, activation="silu", gated_mlp=True, norm_type="rms", norm_eps=1e-5, position_type="rope",
        max_position_embeddings=64, qkv_bias=True, o_bias=True, mlp_bias=False, tie_embeddings=False,
        rotary_dim=8, rope_theta=1000.0, rope_type="linear", rope_factor=2.0, initializer_range=0.3,
        eos_token_ids=(2,), pad_token_id=0)
    params = jax.jit(models.init_params, static_argnums=0)(cfg, jax.random.key(0))
    np.testing.assert_allclose(np.std(np.asarray(params["layers"]["mlp"]["up"]["kernel"])), 0.3, rtol=0.05)
    np.testing.assert_array_equal(np.asarray(params["layers"]["attn_norm"]["scale"]), 1.0)
    np.testing.assert_array_equal(np.asarray(params["layers"]["attn"]["q"]["bias"]), 0.0)
    models.save_pretrained(tmp_path, cfg, params)
    ids, mask = _batch(seed=1)
    expected = hf_logits(load_hf_model(tmp_path), ids, mask)
    got = np.asarray(forward(cfg, params, ids, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=0)


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    single = make_tiny_checkpoint("llama", tmp_path / "single", seed=3)
    sharded = make_tiny_checkpoint("llama", tmp_path / "sharded", seed=3, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    cfg_a, a = models.load_pretrained(single)
    cfg_b, b = models.load_pretrained(sharded)
    assert cfg_a == cfg_b
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_bf16_checkpoint_loads_and_compute_dtype_policy(tmp_path):
    path = make_tiny_checkpoint("qwen2", tmp_path / "bf16", dtype=torch.bfloat16)
    ids, mask = _batch(seed=2)
    expected = hf_logits(load_hf_model(path), ids, mask)  # bf16 weights, upcast to fp32 by transformers
    cfg, params = models.load_pretrained(path)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(forward(cfg, params, ids, mask))[real], expected[real], atol=1e-4, rtol=0)

    cfg16, params16 = models.load_pretrained(path, dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
    assert cfg16 == dataclasses.replace(cfg, compute_dtype=jnp.bfloat16)
    hidden = models.forward_hidden(cfg16, params16, ids, mask)
    logits = np.asarray(forward(cfg16, params16, ids, mask))
    assert hidden.dtype == jnp.bfloat16 and logits.dtype == np.float32
    # bf16 activations: close to the fp32 oracle, but not equal to it.
    err = np.abs(logits[real] - expected[real]).max()
    assert 1e-4 < err < 0.1 * np.abs(expected[real]).max()


def test_legacy_gpt2_layout_without_prefix_and_with_mask_buffers(ckpt, tmp_path):
    """Hub GPT-2 checkpoints name tensors "h.0...." (no "transformer.") and carry causal-mask buffers."""
    tensors = load_file(ckpt["gpt2_tied"] / "model.safetensors")
    legacy = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    legacy |= {f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 64, 64), np.float32)) for i in range(2)}
    (tmp_path / "config.json").write_text((ckpt["gpt2_tied"] / "config.json").read_text())
    save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg_a, a = models.load_pretrained(ckpt["gpt2_tied"])
    cfg_b, b = models.load_pretrained(tmp_path)
    assert cfg_a == cfg_b
    jax.tree.map(np.testing.assert_array_equal, a, b)
