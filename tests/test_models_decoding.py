"""KV-cached decoding, jit vs no-jit, scan vs unrolled vs remat, padding, parameter tree, scalar head."""
from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import VOCAB, hf_logits, load_hf_model, make_tiny_checkpoint
from rlhf_jax import models

B, P, R = 3, 7, 5  # rows, prompt length (left-padded), tokens decoded after the prompt
FAMILIES = {"llama": {}, "gpt2": {}, "gpt_neox": {"use_parallel_residual": False}}


def _sequences(seed: int = 0):
    """Prompts left-padded to P (real lengths 7, 5, 1) followed by R generated tokens."""
    rng = np.random.default_rng(seed)
    prompt_mask = np.ones((B, P), np.int32)
    prompt_mask[1, :2] = 0
    prompt_mask[2, :6] = 0
    mask = np.concatenate([prompt_mask, np.ones((B, R), np.int32)], axis=1)
    ids = np.where(mask == 1, rng.integers(3, VOCAB, (B, P + R)), 0).astype(np.int32)
    return ids, mask


@pytest.fixture(scope="module")
def models_by_family(tmp_path_factory):
    """family -> (cfg, params, HF logits of _sequences())."""
    root = tmp_path_factory.mktemp("dec")
    ids, mask = _sequences()
    out = {}
    for family, overrides in FAMILIES.items():
        path = make_tiny_checkpoint(family, root / family, **overrides)
        cfg, params = models.load_pretrained(path)
        out[family] = (cfg, params, hf_logits(load_hf_model(path), ids, mask))
    return out


def _cached_logits(cfg, params, ids, mask, prefill, decode_step, slots):
    """Prefill the prompt, then feed the remaining tokens one at a time; logits (B, P + R, V)."""
    cache = models.init_cache(cfg, B, slots)
    logits_BPV, cache = prefill(cfg, params, ids[:, :P], mask[:, :P], cache)
    steps = [logits_BPV]
    for t in range(P, ids.shape[1]):
        logits_BV, cache = decode_step(cfg, params, cache, ids[:, t])
        steps.append(logits_BV[:, None])
    return np.concatenate([np.asarray(s) for s in steps], axis=1), cache


class JitInvarianceTest(chex.TestCase):
    """The same numbers with and without jit, both checked against the transformers oracle."""

    @pytest.fixture(autouse=True)
    def _models(self, models_by_family):
        self.models = models_by_family

    @chex.variants(with_jit=True, without_jit=True)
    def test_forward_and_cached_decoding(self):
        cfg, params, expected = self.models["llama"]
        ids, mask = _sequences()
        real = mask.astype(bool)
        forward = self.variant(models.forward, static_argnums=0)
        full = np.asarray(forward(cfg, params, ids, mask))
        np.testing.assert_allclose(full[real], expected[real], atol=1e-4, rtol=0)
        prefill = self.variant(models.prefill, static_argnums=0)
        decode_step = self.variant(models.decode_step, static_argnums=0)
        cached, _ = _cached_logits(cfg, params, ids, mask, prefill, decode_step, slots=P + R)
        np.testing.assert_allclose(cached[real], full[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_decoding_equals_full_forward(models_by_family, family):
    cfg, params, _ = models_by_family[family]
    ids, mask = _sequences()
    full = np.asarray(jax.jit(models.forward, static_argnums=0)(cfg, params, ids, mask))
    prefill = jax.jit(models.prefill, static_argnums=0)
    decode_step = jax.jit(models.decode_step, static_argnums=0, donate_argnums=2)
    slots = P + R + 3  # spare slots stay masked
    cached, cache = _cached_logits(cfg, params, ids, mask, prefill, decode_step, slots)
    real = mask.astype(bool)
    np.testing.assert_allclose(cached[real], full[real], atol=1e-5, rtol=0)
    assert int(cache.index) == P + R
    np.testing.assert_array_equal(np.asarray(cache.next_pos_B), mask.sum(1))
    np.testing.assert_array_equal(np.asarray(cache.mask_BS), np.pad(real, ((0, 0), (0, slots - P - R))))
    assert cache.keys.shape == (cfg.n_layers, B, cfg.n_kv_heads, slots, cfg.head_dim)
    # reading only the written slots (as rollout's phased decode loop does) changes nothing
    windowed = jax.jit(functools.partial(models.decode_step, attend_slots=P + R), static_argnums=0)
    cached_windowed, _ = _cached_logits(cfg, params, ids, mask, prefill, windowed, slots)
    # fp32 rounding only: a window changes the softmax's reduction length, and XLA:CPU's reduction order
    # differs between hosts (3.2e-6 on an AVX-512 EPYC); a wrong window is off by O(0.1)
    np.testing.assert_allclose(cached_windowed[real], cached[real], atol=1e-5, rtol=0)


def test_cache_overflow_is_an_error(models_by_family):
    cfg, params, _ = models_by_family["llama"]
    full = models.init_cache(cfg, B, 4).replace(index=jnp.int32(4))
    with pytest.raises(ValueError, match="cache is full: slot 4 \\+ 1 tokens > 4 slots"):
        models.decode_step(cfg, params, full, np.ones((B,), np.int32))
    with pytest.raises(ValueError, match="learned positions"):
        models.init_cache(models_by_family["gpt2"][0], B, 65)
    half = models.init_cache(cfg, B, 8).replace(index=jnp.int32(4))
    with pytest.raises(ValueError, match="slot 4 is beyond attend_slots 4"):
        models.decode_step(cfg, params, half, np.ones((B,), np.int32), attend_slots=4)
    with pytest.raises(ValueError, match="attend_slots 9 must be in \\[1, 8\\]"):
        models.decode_step(cfg, params, half, np.ones((B,), np.int32), attend_slots=9)


def test_scan_unrolled_and_remat_agree_with_gradients(models_by_family):
    cfg, params, _ = models_by_family["llama"]
    ids, mask = _sequences()

    def loss(cfg, params):
        logits_BTV = models.forward(cfg, params, ids, mask)
        logps_BT = jnp.take_along_axis(jax.nn.log_softmax(logits_BTV[:, :-1]), ids[:, 1:, None], -1)[..., 0]
        return -jnp.sum(logps_BT * mask[:, 1:]) / jnp.sum(mask[:, 1:])

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
    ref_loss, ref_grads = grad_fn(cfg, params)
    assert float(jnp.max(jnp.abs(ref_grads["layers"]["attn"]["q"]["kernel"]))) > 1e-3
    for scan_layers, remat in [(False, False), (True, True)]:
        variant = dataclasses.replace(cfg, scan_layers=scan_layers, remat=remat)
        value, grads = grad_fn(variant, params)
        np.testing.assert_allclose(value, ref_loss, atol=1e-5, rtol=0)
        jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5, rtol=1e-5), grads, ref_grads)


def test_left_padding_does_not_change_real_logits(models_by_family):
    """One row alone vs the same row left-padded inside a batch: the same logits, and no NaN anywhere."""
    cfg, params, _ = models_by_family["gpt2"]
    ids, mask = _sequences()
    forward = jax.jit(models.forward, static_argnums=0)
    batched = np.asarray(forward(cfg, params, ids, mask))
    assert np.isfinite(batched).all()
    for row in range(B):
        real = mask[row].astype(bool)
        alone = np.asarray(forward(cfg, params, ids[row : row + 1, real], mask[row : row + 1, real]))
        np.testing.assert_allclose(batched[row, real], alone[0], atol=1e-5, rtol=0)


def test_param_tree_logical_axes_and_init(models_by_family):
    for cfg, loaded, _ in models_by_family.values():
        params = jax.eval_shape(functools.partial(models.init_params, cfg), jax.random.key(0))
        axes = models.param_logical_axes(cfg)
        assert jax.tree.structure(params) == jax.tree.structure(loaded)
        is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
        for x, y, names in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), jax.tree.leaves(axes, is_leaf=is_axes)):
            assert x.shape == y.shape and len(names) == x.ndim
        if cfg.tie_embeddings:
            assert "lm_head" not in params
        assert axes["layers"]["attn"]["k"]["kernel"] == ("layers", "embed", "kv_heads", "head_dim")


def test_scalar_head(models_by_family):
    cfg, params, _ = models_by_family["llama"]
    ids, mask = _sequences()
    hidden = models.forward_hidden(cfg, params, ids, mask)
    zero = models.init_scalar_head(cfg, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(models.scalar_head(zero, hidden)), 0.0)
    head = models.init_scalar_head(cfg, jax.random.key(1), init_scale=0.1)
    head["bias"] = jnp.float32(0.5)
    values = np.asarray(models.scalar_head(head, hidden))
    expected = np.asarray(hidden, np.float64) @ np.asarray(head["kernel"], np.float64) + 0.5
    assert values.dtype == np.float32 and values.shape == (B, P + R)
    np.testing.assert_allclose(values, expected, atol=1e-5)
    assert np.std(np.asarray(head["kernel"])) > 0.05
