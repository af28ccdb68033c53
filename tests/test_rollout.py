"""Rollout engine: sampling filters against NumPy loops, greedy decoding against transformers'
``generate``, sampling log-probs against a fresh full forward pass, EOS handling, keys, meshes."""
from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import torch

from hf_fixtures import FAMILIES, PAD_ID, VOCAB, load_hf_model, make_tiny_checkpoint
from rlhf_jax import models, rollout, sharding
from rlhf_jax.configs import MeshConfig


# ----------------------------------------------------------------------------- filters vs NumPy loops

top_p_filter = jax.jit(rollout.top_p_filter)  # p traced: one compilation per shape


def ref_top_k(logits_BV: np.ndarray, k: int) -> np.ndarray:
    """Sort each row; every logit below the k-th largest becomes -inf."""
    out = logits_BV.copy()
    for b, row in enumerate(logits_BV):
        kth = sorted(row.tolist(), reverse=True)[k - 1]
        for v, x in enumerate(row):
            if x < kth:
                out[b, v] = -np.inf
    return out


def ref_top_p(logits_BV: np.ndarray, p: float) -> np.ndarray:
    """Walk each row from the most probable token, adding probabilities (float64) until the total
    reaches p; keep every token at least as probable as the last one added."""
    out = logits_BV.copy()
    for b, row in enumerate(logits_BV.astype(np.float64)):
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        total, last = 0.0, None
        for v in sorted(range(len(row)), key=lambda v: -probs[v]):
            total += probs[v]
            last = probs[v]
            if total >= p:
                break
        for v in range(len(row)):
            if probs[v] < last:
                out[b, v] = -np.inf
    return out


def _random_logits(rng, shape, *, ties: bool) -> np.ndarray:
    if ties:  # few distinct values: many exact ties, also at the filter boundary
        return rng.integers(-3, 3, size=shape).astype(np.float32)
    return (2.0 * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("ties", [False, True])
def test_top_k_matches_numpy_reference(ties):
    rng = np.random.default_rng(0)
    for k in [1, 2, 5, 31, 32]:
        logits = _random_logits(rng, (6, 32), ties=ties)
        got = np.asarray(rollout.top_k_filter(jnp.asarray(logits), k))
        np.testing.assert_array_equal(got, ref_top_k(logits, k))
        assert (np.isfinite(got).sum(axis=1) >= k).all()


@pytest.mark.parametrize("ties", [False, True])
def test_top_p_matches_numpy_reference(ties):
    rng = np.random.default_rng(1)
    for p in [1e-6, 0.1, 0.5, 0.9, 0.99, *rng.uniform(0.05, 0.95, size=5)]:
        logits = _random_logits(rng, (6, 32), ties=ties)
        got = np.asarray(top_p_filter(jnp.asarray(logits), float(p)))
        np.testing.assert_array_equal(got, ref_top_p(logits, p))
        assert (np.isfinite(got).sum(axis=1) >= 1).all()


def test_top_p_edge_cases():
    # probabilities 0.4, 0.3, 0.2, 0.1 (and a -inf token that is never kept)
    logits = np.array([[np.log(0.1), np.log(0.4), np.log(0.2), np.log(0.3), -np.inf]], np.float32)
    kept = lambda p: np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits), p)))[0].tolist()
    assert kept(1e-9) == [False, True, False, False, False]  # always at least the top token
    assert kept(0.4 - 1e-4) == [False, True, False, False, False]
    assert kept(0.4 + 1e-4) == [False, True, False, True, False]  # smallest set reaching p
    assert kept(0.9 + 1e-4) == [True, True, True, True, False]
    # a tie at the boundary keeps every tied token, whatever the sort order
    tied = np.log(np.array([[0.2, 0.4, 0.2, 0.2]], np.float32))
    assert np.isfinite(np.asarray(top_p_filter(jnp.asarray(tied), 0.5))).all()
    # uniform row: everything is tied with the top token
    assert np.isfinite(np.asarray(top_p_filter(jnp.zeros((1, 7)), 1e-6))).all()
    # p = 1 and k >= V switch the filters off
    rng = np.random.default_rng(2)
    x = _random_logits(rng, (3, 32), ties=False)
    out = rollout.sampling_logits(jnp.asarray(x), temperature=1.0, top_k=32, top_p=1.0)
    np.testing.assert_array_equal(np.asarray(out), x)


def test_temperature_then_top_k_then_top_p_matches_reference():
    rng = np.random.default_rng(3)
    for ties in [False, True]:
        logits = _random_logits(rng, (8, 64), ties=ties)
        got = rollout.sampling_logits(jnp.asarray(logits), temperature=0.7, top_k=10, top_p=0.8)
        want = ref_top_p(ref_top_k(logits / np.float32(0.7), 10), 0.8)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


@pytest.mark.parametrize("ties", [False, True])
def test_top_k_then_top_p_in_one_pass_matches_reference(ties):
    """The fused top-k + top-p filter (nucleus searched among the k kept values) equals the numpy
    reference of top-k followed by top-p, ties at the k-th value beyond k included."""
    rng = np.random.default_rng(11)
    logits = _random_logits(rng, (64, 96), ties=ties)
    for k, p in [(1, 0.5), (5, 0.01), (10, 0.8), (20, 0.95), (40, 0.999), (95, 0.6)]:
        got = np.asarray(rollout.top_k_top_p_filter(jnp.asarray(logits), k, p))
        np.testing.assert_array_equal(got, ref_top_p(ref_top_k(logits, k), p), err_msg=f"k={k} p={p}")


def test_sampler_frequencies_match_reported_logps():
    """The token frequencies of the sampler equal exp(the log-probs it reports)."""
    logits_V = jnp.asarray([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, 0.2])
    n = 40_000
    keys = jax.random.split(jax.random.key(0), n)
    sample = jax.jit(jax.vmap(lambda k: rollout._sample(logits_V[None], k, temperature=0.8, top_k=6, top_p=0.9)))
    tokens, logps = sample(keys)
    tokens, logps = np.asarray(tokens[:, 0]), np.asarray(logps[:, 0])
    probs = np.zeros(8)
    probs[tokens] = np.exp(logps)  # the reported probability of each token that was drawn
    freqs = np.bincount(tokens, minlength=8) / n
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)  # every kept token was drawn at least once
    np.testing.assert_allclose(freqs, probs, atol=0.01)
    want = np.isfinite(ref_top_p(ref_top_k(np.asarray(logits_V)[None] / 0.8, 6), 0.9))[0]
    np.testing.assert_array_equal(probs > 0, want)


def test_categorical_matches_softmax_across_blocks():
    """Two-level inverse CDF: frequencies equal softmax over a vocabulary of several (ragged) blocks,
    with the mass on both sides of block boundaries, and -inf tokens (a whole block too) never drawn."""
    V, n = 300, 200_000
    logits_V = np.full(V, -np.inf, np.float32)
    kept = [0, 1, 63, 64, 100, 127, 192, 250, 298, 299]  # block 2 (128..191) is empty
    logits_V[kept] = np.linspace(1.0, -1.0, len(kept))
    draws = jax.jit(rollout.categorical)(jax.random.key(1), jnp.broadcast_to(jnp.asarray(logits_V), (n, V)))
    freqs = np.bincount(np.asarray(draws), minlength=V) / n
    probs = np.exp(logits_V - logits_V.max())
    probs /= probs.sum()
    assert set(np.flatnonzero(freqs)) == set(kept)
    np.testing.assert_allclose(freqs, probs, atol=4 * np.sqrt(probs.max() / n))


def test_greedy_is_first_argmax():
    rng = np.random.default_rng(5)
    logits = _random_logits(rng, (64, 50), ties=True)
    logits[3, [7, 20]] = np.nan  # the first NaN wins, as in argmax
    np.testing.assert_array_equal(np.asarray(rollout.greedy(jnp.asarray(logits))), np.argmax(logits, axis=-1))


# ----------------------------------------------------------------------------- generation on tiny checkpoints

P, R = 7, 12
forward = jax.jit(models.forward, static_argnums=0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"))
    return (path, *models.load_pretrained(path))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = make_tiny_checkpoint("gpt2", tmp_path_factory.mktemp("gpt2"))
    return (path, *models.load_pretrained(path))


def left_padded_prompts(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random prompts of lengths P, P-1, ..., (at least 1), left-padded with PAD_ID."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(P - np.arange(batch) * 2, 1)
    mask = (np.arange(P)[None] >= P - lengths[:, None]).astype(np.int32)
    ids = rng.integers(3, VOCAB, size=(batch, P)).astype(np.int32)
    return np.where(mask == 1, ids, PAD_ID), mask


def full_forward_logps(cfg, params, r: rollout.Rollout, logits_fn=lambda x: x) -> np.ndarray:
    """Log-probs of the response tokens from one fresh forward pass over ``r.sequences_BT``."""
    logits_BTV = forward(cfg, params, r.sequences_BT, r.attention_mask_BT)
    logits_BRV = logits_fn(np.asarray(logits_BTV[:, r.prompt_len - 1 : -1]))
    logps_BRV = jax.nn.log_softmax(jnp.asarray(logits_BRV), axis=-1)
    return np.asarray(jnp.take_along_axis(logps_BRV, r.response_ids_BR[..., None], axis=-1)[..., 0])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_matches_transformers_generate(family, request):
    path, cfg, params = request.getfixturevalue(family)
    hf_model = load_hf_model(path)
    ids, mask = left_padded_prompts(4)

    def hf_generate(**kwargs) -> np.ndarray:
        with torch.no_grad():
            out = hf_model.generate(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                                    do_sample=False, max_new_tokens=R, pad_token_id=PAD_ID, **kwargs).numpy()
        return np.pad(out, ((0, 0), (0, P + R - out.shape[1])), constant_values=PAD_ID)  # HF stops when all rows end

    # EOS: a token transformers emits in the first 4 steps of row 0 but never in some other row,
    # so both early-stopping rows and rows that run to the limit occur.
    free = hf_generate(min_new_tokens=R)[:, P:]
    eos = next(int(t) for t in free[0, :4] if not all(t in row for row in free[1:]))
    ours = rollout.generate(cfg, params, ids, mask, key=jax.random.key(0), max_new_tokens=R, temperature=0.0,
                            eos_ids=(eos,), pad_id=PAD_ID)
    np.testing.assert_array_equal(np.asarray(ours.sequences_BT), hf_generate(eos_token_id=eos))
    assert bool(ours.has_eos_B[0]) and int(ours.lengths_B[0]) <= 4
    assert not np.asarray(ours.has_eos_B).all()  # rows that never emit EOS run to the limit


EOS_IDS = tuple(range(3, 10))  # ~7% of the vocabulary: sampled rows end at different steps
SAMPLED = dict(max_new_tokens=R, eos_ids=EOS_IDS, pad_id=PAD_ID, num_samples=2)


def generate_sampled(cfg, params, temperature: float) -> rollout.Rollout:
    ids, mask = left_padded_prompts(4)
    return rollout.generate(cfg, params, ids, mask, key=jax.random.key(4), temperature=temperature, **SAMPLED)


@pytest.fixture(scope="module")
def sampled(llama) -> rollout.Rollout:
    """Shared by several tests (one compilation): 4 prompts x 2 samples at temperature 1, with EOS."""
    _, cfg, params = llama
    return generate_sampled(cfg, params, 1.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_logps_equal_full_forward_pass(llama, sampled, temperature):
    """PPO recomputes log-probs on sequences_BT with one forward pass: same numbers (fp32)."""
    _, cfg, params = llama
    r = sampled if temperature == 1.0 else generate_sampled(cfg, params, temperature)
    scale = 1.0 if temperature == 0.0 else temperature  # greedy reports the untempered model log-probs
    want = full_forward_logps(cfg, params, r, lambda x: x / np.float32(scale))
    m = np.asarray(r.response_mask_BR) == 1
    assert 0 < m.sum() < m.size  # some rows stop at EOS, so padding is exercised too
    np.testing.assert_allclose(np.asarray(r.logps_BR)[m], want[m], atol=1e-5, rtol=0)
    assert (np.asarray(r.logps_BR)[~m] == 0).all()


@pytest.mark.parametrize("per_layer", [False, True])
def test_long_responses_decode_in_phases_with_exact_logps_and_greedy_parity(llama, per_layer):
    """Past 64 new tokens the decode loop runs in phases that read only part of the cache (stacked)
    or grow it (per layer): the log-probs still equal a full forward pass, and greedy still equals
    transformers."""
    path, cfg, params = llama
    long_r = 100
    assert len(rollout._phase_ends(long_r)) == 3
    ids, mask = left_padded_prompts(3)
    gen = functools.partial(rollout.generate, cfg, params, ids, mask, key=jax.random.key(1), max_new_tokens=long_r,
                            per_layer=per_layer)
    r = gen(temperature=1.0)
    assert (np.asarray(r.lengths_B) == long_r).all()
    np.testing.assert_allclose(np.asarray(r.logps_BR), full_forward_logps(cfg, params, r), atol=1e-5, rtol=0)
    greedy = gen(temperature=0.0)
    with torch.no_grad():
        want = load_hf_model(path).generate(input_ids=torch.from_numpy(ids).long(),
                                            attention_mask=torch.from_numpy(mask).long(), do_sample=False,
                                            max_new_tokens=long_r, min_new_tokens=long_r, pad_token_id=PAD_ID).numpy()
    np.testing.assert_array_equal(np.asarray(greedy.sequences_BT), want)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_decoding_equals_the_layer_scan(family, tmp_path):
    """Unrolled layers over per-layer weights and cache buffers give the stacked scan's rollout:
    every family (GQA, biases, learned positions, parallel residual, partial rotary), EOS padding,
    several samples per prompt."""
    cfg, params = models.load_pretrained(make_tiny_checkpoint(family, tmp_path))
    ids, mask = left_padded_prompts(3)
    runs = [rollout.generate(cfg, params, ids, mask, key=jax.random.key(2), temperature=1.0, per_layer=per_layer,
                             **SAMPLED) for per_layer in (False, True)]
    for field in ("sequences_BT", "response_mask_BR", "lengths_B", "has_eos_B"):
        np.testing.assert_array_equal(np.asarray(getattr(runs[1], field)), np.asarray(getattr(runs[0], field)), field)
    np.testing.assert_allclose(np.asarray(runs[1].logps_BR), np.asarray(runs[0].logps_BR), atol=1e-6, rtol=0)


def test_per_layer_cache_helpers(llama):
    _, cfg, params = llama
    ids, mask = left_padded_prompts(2)
    cache = models.init_cache(cfg, 2, P + 3)
    _, cache = models.prefill(cfg, params, ids, mask, cache)
    per_layer = models.unstack_cache(cache, P + 1)
    assert len(per_layer.keys) == cfg.n_layers and per_layer.keys[0].shape == (2, cfg.n_kv_heads, P + 1, cfg.head_dim)
    np.testing.assert_array_equal(np.asarray(per_layer.values[1]), np.asarray(cache.values[1, :, :, :P + 1]))
    grown = models.grow_cache(per_layer, P + 3)
    assert grown.mask_BS.shape == (2, P + 3) and not np.asarray(grown.mask_BS[:, P:]).any()
    token = jnp.asarray([5, 6], jnp.int32)
    stacked_logits, _ = models.decode_step(cfg, params, cache, token)
    layer_logits, _ = models.decode_step(cfg, models.unstack_layers(params), grown, token)
    np.testing.assert_allclose(np.asarray(layer_logits), np.asarray(stacked_logits), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="per-layer parameters"):
        models.decode_step(cfg, params, grown, token)
    with pytest.raises(ValueError, match="attend_slots is for a stacked cache"):
        models.decode_step(cfg, models.unstack_layers(params), grown, token, attend_slots=P + 1)
    with pytest.raises(ValueError, match="must hold the 7 written ones"):
        models.unstack_cache(cache, P - 1)
    with pytest.raises(ValueError, match="cannot shrink"):
        models.grow_cache(per_layer, P)


def test_top_k_top_p_logps_are_those_of_the_filtered_distribution(llama):
    _, cfg, params = llama
    ids, mask = left_padded_prompts(3)
    r = rollout.generate(cfg, params, ids, mask, key=jax.random.key(2), max_new_tokens=R, temperature=0.7,
                         top_k=20, top_p=0.6)

    def filtered(logits_BRV):
        flat = logits_BRV.reshape(-1, logits_BRV.shape[-1]) / np.float32(0.7)
        return ref_top_p(ref_top_k(flat, 20), 0.6).reshape(logits_BRV.shape)

    want = full_forward_logps(cfg, params, r, filtered)
    assert np.isfinite(want).all()  # every sampled token survived both filters
    np.testing.assert_allclose(np.asarray(r.logps_BR), want, atol=1e-5, rtol=0)


def test_keys_and_samples(llama):
    _, cfg, params = llama
    ids, mask = left_padded_prompts(2)
    run = lambda seed: rollout.generate(cfg, params, ids, mask, key=jax.random.key(seed), max_new_tokens=R,
                                        num_samples=3)
    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(np.asarray(a.sequences_BT), np.asarray(b.sequences_BT))
    np.testing.assert_array_equal(np.asarray(a.logps_BR), np.asarray(b.logps_BR))
    assert (np.asarray(a.response_ids_BR) != np.asarray(c.response_ids_BR)).any()
    seqs = np.asarray(a.sequences_BT)
    np.testing.assert_array_equal(seqs[:, :P], np.repeat(ids, 3, axis=0))  # samples of a prompt are adjacent
    for prompt in range(2):
        rows = [tuple(s) for s in seqs[3 * prompt : 3 * prompt + 3, P:]]
        assert len(set(rows)) == 3
    # no eos_ids: every row decodes to the limit
    assert (np.asarray(a.lengths_B) == R).all() and not np.asarray(a.has_eos_B).any()
    assert (np.asarray(a.response_mask_BR) == 1).all()


def test_eos_padding_masks_and_lengths(sampled):
    r = sampled
    _, mask = left_padded_prompts(4)
    resp, seqs = np.asarray(r.response_ids_BR), np.asarray(r.sequences_BT)
    assert 0 < np.asarray(r.has_eos_B).sum() < len(resp)  # both kinds of rows occur
    for b, row in enumerate(resp):
        hits = [t for t, tok in enumerate(row) if tok in EOS_IDS]
        length = hits[0] + 1 if hits else R
        assert int(r.lengths_B[b]) == length and bool(r.has_eos_B[b]) == bool(hits)
        assert (row[length:] == PAD_ID).all()
        in_response = np.arange(R) < length
        np.testing.assert_array_equal(np.asarray(r.response_mask_BR[b]), in_response)
        np.testing.assert_array_equal(np.asarray(r.logps_BR[b, length:]), 0.0)
        assert (np.asarray(r.logps_BR[b, :length]) < 0).all()
        np.testing.assert_array_equal(np.asarray(r.attention_mask_BT[b]), np.concatenate([mask[b // 2], in_response]))
        np.testing.assert_array_equal(np.asarray(r.response_mask_BT[b]), np.concatenate([np.zeros(P), in_response]))
    np.testing.assert_array_equal(seqs[:, P:], resp)


def test_bad_input(llama):
    _, cfg, params = llama
    ids, mask = left_padded_prompts(2)
    too_many = cfg.max_position_embeddings - P + 1
    with pytest.raises(ValueError, match=rf"prompt length {P} \+ max_new_tokens {too_many} .* {cfg.max_position_embeddings}"):
        rollout.generate(cfg, params, ids, mask, key=jax.random.key(0), max_new_tokens=too_many)
    with pytest.raises(ValueError, match="left-padded"):
        rollout.generate(cfg, params, ids, mask[:, ::-1], key=jax.random.key(0), max_new_tokens=R)
    empty = mask.copy()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        rollout.generate(cfg, params, ids, empty, key=jax.random.key(0), max_new_tokens=R)


def test_sharded_generate_on_8_device_mesh_equals_single_device(llama, sampled):
    _, cfg, params = llama
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = sharding.DEFAULT_RULES
    sharded_params = jax.device_put(params, sharding.logical_to_sharding(models.param_logical_axes(cfg), mesh, rules, params))
    up_kernel = lambda p: p["layers"]["mlp"]["up"]["kernel"]  # (L, D, F): D over fsdp, F over tensor
    assert sharding.per_device_bytes(up_kernel(sharded_params)) * 4 == up_kernel(params).nbytes
    ids, mask = sharding.shard_batch(left_padded_prompts(4), mesh, rules)
    assert len(ids.sharding.device_set) == 8

    generate = jax.jit(lambda p, i, m: rollout.generate(cfg, p, i, m, key=jax.random.key(4), temperature=1.0, **SAMPLED))
    # Under an outer jit, and called directly on the sharded arrays (which checks for all-finished
    # rows only every few steps, since that check is a collective): the same rollout either way.
    assert rollout._done_check_every(ids) > 1
    direct = rollout.generate(cfg, sharded_params, ids, mask, key=jax.random.key(4), temperature=1.0, **SAMPLED)
    for multi in (generate(sharded_params, ids, mask), direct):
        np.testing.assert_array_equal(np.asarray(multi.sequences_BT), np.asarray(sampled.sequences_BT))
        np.testing.assert_array_equal(np.asarray(multi.response_mask_BR), np.asarray(sampled.response_mask_BR))
        np.testing.assert_allclose(np.asarray(multi.logps_BR), np.asarray(sampled.logps_BR), atol=1e-5, rtol=0)
    # Every row ends within a few steps (most tokens are EOS), so the sharded loop runs past the
    # last EOS until its next check: those extra steps must only write padding.
    early = dict(SAMPLED, eos_ids=tuple(range(3, 80)))
    single = rollout.generate(cfg, params, *left_padded_prompts(4), key=jax.random.key(5), **early)
    assert int(np.asarray(single.lengths_B).max()) < 4
    multi = rollout.generate(cfg, sharded_params, ids, mask, key=jax.random.key(5), **early)
    for field in ("sequences_BT", "response_mask_BR", "lengths_B", "has_eos_B"):
        np.testing.assert_array_equal(np.asarray(getattr(multi, field)), np.asarray(getattr(single, field)), field)
    np.testing.assert_allclose(np.asarray(multi.logps_BR), np.asarray(single.logps_BR), atol=1e-5, rtol=0)
