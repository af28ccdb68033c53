"""Log-probs and cross-entropy from hidden states a chunk of positions at a time (``ops.chunked_*``,
``ModelConfig.logits_chunk``) equal the full-logits computation, in values and gradients, and the
compiled chunked gradient holds no (B, T, V) buffer."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import lora, losses, models, ops
from rlhf_jax.configs import MeshConfig
from rlhf_jax.models.config import AUTO_LOGITS_BYTES
from rlhf_jax.sharding import DEFAULT_RULES, logical_to_sharding, make_mesh, replicated, shard_batch
from rlhf_jax.objectives import dpo_objective, logps_and_entropy_from_hidden, sft_objective, token_logps
from rlhf_jax.steps import with_view

from mesh_case import pair_batch, sft_batch, tiny_model_config

B, T, D, V = 3, 13, 16, 50
PAD = 0


def _random_case(seed: int = 0):
    """Hidden states, head and targets where the last 4 positions of row 1 and 2 of row 2 are padding:
    their targets are the pad id and their hidden states large (as pad rows of a model can be)."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    hidden_BTD = jax.random.normal(k1, (B, T, D))
    head_DV = jax.random.normal(k2, (D, V)) * 0.5
    targets_BT = jax.random.randint(k3, (B, T), 1, V)
    mask_BT = np.ones((B, T), np.float32)
    mask_BT[1, -4:] = 0.0
    mask_BT[2, -2:] = 0.0
    targets_BT = jnp.where(mask_BT > 0, targets_BT, PAD)
    hidden_BTD = jnp.where(mask_BT[..., None] > 0, hidden_BTD, 30.0)
    return hidden_BTD, head_DV, targets_BT, jnp.asarray(mask_BT)


def _full_logps_and_entropy(hidden_BTD, head_DV, targets_BT):
    logits_BTV = jnp.einsum("btd,dv->btv", hidden_BTD, head_DV)
    return ops.token_logps(logits_BTV, targets_BT), ops.entropy_from_logits(logits_BTV)


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])  # 4 and 5 do not divide T = 13; 64 > T
def test_chunked_logps_and_entropy_equal_full_logits(chunk):
    hidden_BTD, head_DV, targets_BT, _ = _random_case()
    want_lp, want_ent = _full_logps_and_entropy(hidden_BTD, head_DV, targets_BT)
    got_lp = ops.chunked_token_logps(hidden_BTD, head_DV, targets_BT, chunk=chunk)
    got_lp2, got_ent = ops.chunked_token_logps_and_entropy(hidden_BTD, head_DV, targets_BT, chunk=chunk)
    assert got_lp.shape == got_ent.shape == (B, T) and got_lp.dtype == jnp.float32
    assert float(jnp.std(want_lp)) > 1.0  # log-probs that differ from token to token
    np.testing.assert_allclose(np.asarray(got_lp), np.asarray(want_lp), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_lp2), np.asarray(want_lp), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_ent), np.asarray(want_ent), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [4, 5])
def test_chunked_gradients_equal_full_logits(chunk):
    """d/d(hidden, head) of a weighted sum of log-probs and entropies (weights 0 on padding)."""
    hidden_BTD, head_DV, targets_BT, mask_BT = _random_case(1)
    w_BT = mask_BT * jax.random.normal(jax.random.key(7), (B, T))

    def objective(fn, h, w):
        lp, ent = fn(h, w, targets_BT)
        return jnp.sum(w_BT * lp) + 0.3 * jnp.sum(w_BT * ent)

    full = jax.grad(functools.partial(objective, _full_logps_and_entropy), argnums=(0, 1))(hidden_BTD, head_DV)
    chunked_fn = functools.partial(ops.chunked_token_logps_and_entropy, chunk=chunk)
    chunked = jax.grad(functools.partial(objective, chunked_fn), argnums=(0, 1))(hidden_BTD, head_DV)
    for name, want, got in zip(("hidden", "head"), full, chunked):
        assert float(jnp.max(jnp.abs(want))) > 1e-2, name  # gradients really flow
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=name)
    assert float(jnp.max(jnp.abs(chunked[0][1, -4:]))) == 0.0  # padding (weight 0) gets no gradient


def test_chunked_gradient_holds_no_full_logits():
    """XLA's temporaries of the chunked gradient stay below one (B, T, V) float32 tensor; the full one's do not
    (so removing the checkpoint, which makes lax.map stack every chunk's softmax, fails this test)."""
    b, t, d, v = 4, 64, 16, 8192
    hidden_BTD = jnp.ones((b, t, d))
    head_DV = jnp.ones((d, v))
    targets_BT = jnp.zeros((b, t), jnp.int32)

    def temp_bytes(fn):
        grad = jax.jit(jax.grad(lambda h, w: jnp.sum(fn(h, w, targets_BT)), argnums=(0, 1)))
        return grad.lower(hidden_BTD, head_DV).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = b * t * v * 4
    assert temp_bytes(lambda h, w, y: ops.token_logps(jnp.einsum("btd,dv->btv", h, w), y)) >= logits_bytes
    assert temp_bytes(functools.partial(ops.chunked_token_logps, chunk=8)) < logits_bytes / 2


def test_chunked_logits_map_rejects_bad_shapes():
    hidden_BTD, head_DV, targets_BT, _ = _random_case()
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        ops.chunked_token_logps(hidden_BTD, head_DV, targets_BT, chunk=0)
    with pytest.raises(ValueError, match=r"head_DV \(50, 16\)"):
        ops.chunked_token_logps(hidden_BTD, head_DV.T, targets_BT, chunk=4)
    with pytest.raises(ValueError, match="targets_BT"):
        ops.chunked_token_logps(hidden_BTD, head_DV, targets_BT[:, :-1], chunk=4)


# --- The model side: head matrix, config and the objectives that use them -------------------------------

CFG = tiny_model_config()  # untied head, vocab 128
TIED = dataclasses.replace(CFG, tie_embeddings=True)


def _params(cfg, seed=0):
    return models.init_params(cfg, jax.random.key(seed))


@pytest.mark.parametrize("cfg", [CFG, TIED], ids=["untied", "tied"])
def test_lm_head_gives_the_models_logits(cfg):
    params = _params(cfg)
    b = sft_batch(0, batch=2, length=9)
    hidden_BTD = models.forward_hidden(cfg, params, b.input_ids_BT, b.attention_mask_BT)
    logits_BTV = models.forward(cfg, params, b.input_ids_BT, b.attention_mask_BT)
    head_DV = models.lm_head(cfg, params)
    assert head_DV.shape == (cfg.d_model, cfg.vocab_size)
    want = params["embed"]["embedding"].T if cfg.tie_embeddings else params["lm_head"]["kernel"]
    np.testing.assert_array_equal(np.asarray(head_DV), np.asarray(want))
    np.testing.assert_allclose(np.asarray(jnp.einsum("btd,dv->btv", hidden_BTD, head_DV)), np.asarray(logits_BTV),
                               rtol=1e-5, atol=1e-5)


def test_auto_chunk_follows_the_size_of_the_logits():
    smol = dataclasses.replace(CFG, vocab_size=49152)  # SmolLM2's vocabulary
    assert models.logits_chunk(smol, 4, 96) is None  # 72 MiB of logits: the full path
    assert models.logits_chunk(CFG, 64, 1024) is None  # a tiny vocabulary: 32 MiB
    for batch, length in [(8, 512), (64, 300), (1, 8192), (512, 7)]:
        chunk = models.logits_chunk(smol, batch, length)
        n = -(-length // chunk)
        assert batch * chunk * smol.vocab_size * 4 <= max(AUTO_LOGITS_BYTES, batch * smol.vocab_size * 4)
        assert n * chunk - length < n  # equal chunks: the last one's padding is under one position per chunk
        assert n > 1 or batch * smol.vocab_size * 4 > AUTO_LOGITS_BYTES
    assert models.logits_chunk(dataclasses.replace(smol, logits_chunk=None), 64, 8192) is None
    assert models.logits_chunk(dataclasses.replace(CFG, logits_chunk=7), 2, 16) == 7
    with pytest.raises(ValueError, match="logits_chunk"):
        dataclasses.replace(CFG, logits_chunk=0)


def _value_and_grad(objective, params, frozen, batch):
    (loss, metrics), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params, frozen, batch)
    return float(loss), {k: float(m.mean()) for k, m in metrics.items()}, grads


def _assert_same(full, chunked):
    (loss1, metrics1, grads1), (loss2, metrics2, grads2) = full, chunked
    assert loss1 > 0.1
    np.testing.assert_allclose(loss2, loss1, rtol=1e-6, atol=1e-6)
    assert metrics1.keys() == metrics2.keys()
    for key in metrics1:
        np.testing.assert_allclose(metrics2[key], metrics1[key], rtol=1e-6, atol=1e-6, err_msg=key)
    leaves1 = jax.tree_util.tree_leaves_with_path(grads1)
    assert max(float(jnp.max(jnp.abs(g))) for _, g in leaves1) > 1e-3
    for (path, g1), g2 in zip(leaves1, jax.tree.leaves(grads2)):
        np.testing.assert_allclose(np.asarray(g2), np.asarray(g1), rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


SFT_LOSSES = {"plain": losses.sft_loss,
              "z-loss+smoothing": functools.partial(losses.sft_loss, z_loss=1e-2, label_smoothing=0.1)}


@pytest.mark.parametrize("cfg", [CFG, TIED], ids=["untied", "tied"])
@pytest.mark.parametrize("loss", list(SFT_LOSSES))
def test_sft_objective_chunked_equals_full_logits(cfg, loss):
    """Loss, metrics and gradients of the SFT objective: chunks of 5 positions (15 predicting positions:
    the last chunk padded) against the full logits, on right-padded rows with a completion-only mask."""
    params, batch = _params(cfg), sft_batch(2, batch=4, length=16)
    runs = [_value_and_grad(functools.partial(sft_objective, model_cfg=dataclasses.replace(cfg, logits_chunk=c),
                                              loss_fn=SFT_LOSSES[loss]), params, {}, batch) for c in (None, 5)]
    _assert_same(*runs)
    assert ("sft/z_loss" in runs[0][1]) == (loss != "plain")


def test_sft_objective_gives_other_losses_the_full_logits():
    """A loss_fn other than losses.sft_loss still receives the (B, T-1, V) logits when chunking is on."""
    seen = []

    def my_loss(logits_BTV, targets_BT, mask_BT):
        seen.append(logits_BTV.shape)
        return losses.sft_loss(logits_BTV, targets_BT, mask_BT)

    batch = sft_batch(2, batch=4, length=16)
    cfg = dataclasses.replace(CFG, logits_chunk=5)
    loss, _ = sft_objective(_params(CFG), {}, batch, model_cfg=cfg, loss_fn=my_loss)
    want, _ = sft_objective(_params(CFG), {}, batch, model_cfg=dataclasses.replace(CFG, logits_chunk=None))
    assert seen == [(4, 15, CFG.vocab_size)]
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)


@pytest.mark.parametrize("cfg", [CFG, TIED], ids=["untied", "tied"])
def test_dpo_objective_chunked_equals_full_logits(cfg):
    """Policy and reference log-probs through chunks of 6 positions (16 = 6 + 6 + 4) against the full logits."""
    params, ref, batch = _params(cfg), _params(cfg, 3), pair_batch(4, batch=4, length=16)
    loss_fn = functools.partial(losses.dpo_loss, beta=0.5)
    runs = [_value_and_grad(functools.partial(dpo_objective, model_cfg=dataclasses.replace(cfg, logits_chunk=c),
                                              loss_fn=loss_fn), params, ref, batch) for c in (None, 6)]
    _assert_same(*runs)


def test_lora_sft_chunked_equals_full_logits():
    """With LoRA the head is the base's (frozen): gradients reach the adapters through the chunked path alike."""
    lora_cfg = lora.LoraConfig(rank=4, targets=("all",))
    base = _params(CFG)
    adapters = lora.init_adapters(CFG, lora_cfg)
    adapters = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(5), a.shape), adapters)  # B != 0
    batch = sft_batch(6, batch=4, length=16)
    runs = [_value_and_grad(with_view(functools.partial(sft_objective, model_cfg=dataclasses.replace(CFG, logits_chunk=c)),
                                      lora.view(lora_cfg)), adapters, {lora.BASE: base}, batch) for c in (None, 4)]
    _assert_same(*runs)


def test_token_logps_and_entropy_follow_the_config():
    """The RL wrappers (token_logps, logps_and_entropy_from_hidden) take the chunk from the config by default."""
    params, b = _params(TIED), sft_batch(3, batch=3, length=11)
    ids, mask = jnp.asarray(b.input_ids_BT), jnp.asarray(b.attention_mask_BT)
    full_cfg, chunk_cfg = dataclasses.replace(TIED, logits_chunk=None), dataclasses.replace(TIED, logits_chunk=4)
    np.testing.assert_allclose(np.asarray(token_logps(chunk_cfg, params, ids, mask)),
                               np.asarray(token_logps(full_cfg, params, ids, mask)), rtol=1e-6, atol=1e-6)
    hidden_BTD = models.forward_hidden(TIED, params, ids, mask)
    want = logps_and_entropy_from_hidden(full_cfg, params, hidden_BTD, ids)
    got = logps_and_entropy_from_hidden(chunk_cfg, params, hidden_BTD, ids)
    for w, g in zip(want, got):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(got[0])[:, -1] == 0)


def test_chunked_sft_on_a_data_tensor_mesh_equals_one_device():
    """Chunked SFT on a 2 x 4 mesh (batch over data, head and logits over the vocabulary on tensor) equals the
    full logits on one device, in loss and gradients."""
    params, batch = _params(TIED), sft_batch(1, batch=4, length=16)
    one = _value_and_grad(functools.partial(sft_objective, model_cfg=dataclasses.replace(TIED, logits_chunk=None)),
                          params, {}, batch)
    mesh = make_mesh(MeshConfig(data=2, tensor=4))
    params_sh = logical_to_sharding(models.param_logical_axes(TIED), mesh, DEFAULT_RULES, jax.eval_shape(lambda: params))
    objective = functools.partial(sft_objective, model_cfg=dataclasses.replace(TIED, logits_chunk=5))
    fn = jax.jit(jax.value_and_grad(objective, has_aux=True), out_shardings=(replicated(mesh), params_sh))
    (loss, metrics), grads = fn(jax.device_put(params, params_sh), {}, shard_batch(batch, mesh, DEFAULT_RULES))
    _assert_same(one, (float(loss), {k: float(m.mean()) for k, m in metrics.items()}, jax.device_get(grads)))
