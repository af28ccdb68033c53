"""LoRA (rlhf_jax.lora) against the math written out and against peft itself.

- A fresh adapter (B = 0) gives exactly the base model's logits; dropout never touches the base path.
- Attached adapters give the logits of the explicitly merged kernels W + (α/r)·A·B.
- One SFT step's loss and gradients equal those of the merged weights: dL/dA = (α/r)·G·Bᵀ and
  dL/dB = (α/r)·Aᵀ·G with G = dL/dW at the merged kernel (chain rule, per layer, in NumPy), plus a
  central finite difference of one coordinate; a train step changes only the adapters.
- PEFT interchange on a tiny transformers Llama: our adapter directory loads with
  ``peft.PeftModel.from_pretrained`` and gives our logits; an adapter peft creates and saves loads
  with ``load_peft`` and gives peft's logits; the merged export loads in AutoModelForCausalLM.
- DPO with LoRA holds the base once and its reference log-probs are the base's.
- Sharded LoRA SFT on the 8-device mesh gives the single-device loss and gradients.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from hf_fixtures import hf_logits, load_hf_model, make_tiny_checkpoint
from mesh_case import pair_batch, sft_batch, tiny_model_config

from rlhf_jax import lora, losses, models
from rlhf_jax.configs import MeshConfig, OptimizerConfig
from rlhf_jax.metrics import to_floats
from rlhf_jax.sharding import DEFAULT_RULES, make_mesh, replicated
from rlhf_jax.objectives import dpo_objective, pair_logps, sft_objective
from rlhf_jax.steps import make_dpo_step, make_sft_step, with_view
from rlhf_jax.train_state import make_optimizer, place_train_state, shardings_of

CFG = tiny_model_config()
LORA = lora.LoraConfig(rank=4, alpha=8.0, targets=("all",))


def _base(seed=0):
    return models.init_params(CFG, jax.random.key(seed))


def _trained_adapters(cfg=CFG, lora_cfg=LORA, seed=1):
    """Adapters with B != 0 too (a fresh B is 0, which would hide errors in B's layout)."""
    adapters = lora.init_adapters(cfg, lora_cfg, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _batch():
    b = sft_batch(7)
    return jnp.asarray(b.input_ids_BT), jnp.asarray(b.attention_mask_BT)


def test_shapes_axes_and_targets():
    adapters = lora.init_adapters(CFG, LORA)
    L, D, H, K, E, F = CFG.n_layers, CFG.d_model, CFG.n_heads, CFG.n_kv_heads, CFG.head_dim, CFG.mlp_dim
    assert adapters["layers"]["attn"]["q"]["a"].shape == (L, D, 4)
    assert adapters["layers"]["attn"]["k"]["b"].shape == (L, 4, K, E)
    assert adapters["layers"]["attn"]["o"]["a"].shape == (L, H, E, 4)
    assert adapters["layers"]["mlp"]["down"]["a"].shape == (L, F, 4)
    axes = lora.adapter_logical_axes(CFG, LORA)
    assert axes["layers"]["attn"]["q"]["b"] == ("layers", "lora_rank", "heads", "head_dim")
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple)) == jax.tree.structure(adapters)
    assert all(not np.any(ab["b"]) for g in adapters["layers"].values() for ab in g.values())  # B = 0
    bound = 1 / np.sqrt(D)  # PEFT's kaiming-uniform(a=√5) on (r, in): U(−1/√in, 1/√in)
    a = np.asarray(adapters["layers"]["attn"]["q"]["a"])
    assert a.min() >= -bound and a.max() <= bound and a.std() > bound / 3
    assert lora.target_names(CFG, lora.LoraConfig(rank=2, targets=("attention",))) == ("q", "k", "v", "o")
    gpt2 = models.ModelConfig.from_hf_config({"model_type": "gpt2", "vocab_size": 32, "n_embd": 16, "n_layer": 1,
                                              "n_head": 2, "n_positions": 16})
    assert lora.target_names(gpt2, lora.LoraConfig(rank=2, targets=("mlp",))) == ("up", "down")
    with pytest.raises(ValueError, match="gpt2 model has no mlp/gate"):
        lora.target_names(gpt2, lora.LoraConfig(rank=2, targets=("gate",)))
    with pytest.raises(ValueError, match=r"unknown \['qq'\]"):
        lora.LoraConfig(rank=2, targets=("qq",))


def test_fresh_adapters_give_exactly_the_base_logits():
    base = _base()
    ids, mask = _batch()
    want = models.forward(CFG, base, ids, mask)
    adapters = lora.init_adapters(CFG, LORA)
    got = models.forward(CFG, lora.attach(base, adapters, LORA), ids, mask)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    dropped = lora.attach(base, adapters, dataclasses.replace(LORA, dropout=0.5), jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(models.forward(CFG, dropped, ids, mask)), np.asarray(want))


def test_attached_adapters_equal_the_merged_kernels():
    base, adapters = _base(), _trained_adapters()
    ids, mask = _batch()
    attached = np.asarray(models.forward(CFG, lora.attach(base, adapters, LORA), ids, mask))
    merged = lora.merge(base, adapters, LORA)
    # the merge, written out per layer: W + (α/r)·A·B for the q projection of layer 1
    q = adapters["layers"]["attn"]["q"]
    w = np.asarray(base["layers"]["attn"]["q"]["kernel"][1]).reshape(CFG.d_model, -1)
    a, b = np.asarray(q["a"][1]), np.asarray(q["b"][1]).reshape(LORA.rank, -1)
    np.testing.assert_allclose(np.asarray(merged["layers"]["attn"]["q"]["kernel"][1]).reshape(CFG.d_model, -1),
                               w + LORA.alpha / LORA.rank * a @ b, rtol=1e-6, atol=1e-6)
    want = np.asarray(models.forward(CFG, merged, ids, mask))
    assert np.abs(attached - want).max() < 1e-5 * np.abs(want).max()
    base_logits = np.asarray(models.forward(CFG, base, ids, mask))
    assert np.abs(attached - base_logits).max() > 1e-2  # the adapters do something


def test_sft_gradients_equal_the_chain_rule_through_the_merged_kernels():
    base, adapters = _base(), _trained_adapters()
    batch = sft_batch(5)
    objective = functools.partial(sft_objective, model_cfg=CFG)
    view = lora.view(LORA)
    (loss, _), grads = jax.value_and_grad(with_view(objective, view), has_aux=True)(adapters, {lora.BASE: base}, batch)
    merged = lora.merge(base, adapters, LORA)
    (merged_loss, _), g_w = jax.value_and_grad(objective, has_aux=True)(merged, {}, batch)
    np.testing.assert_allclose(float(loss), float(merged_loss), rtol=1e-6)
    s = LORA.alpha / LORA.rank
    for group, projections in adapters["layers"].items():
        for name, ab in projections.items():
            a, b = np.asarray(ab["a"]), np.asarray(ab["b"])
            g = np.asarray(g_w["layers"][group][name]["kernel"])
            for layer in range(CFG.n_layers):
                a2, b2 = a[layer].reshape(-1, LORA.rank), b[layer].reshape(LORA.rank, -1)
                g2 = g[layer].reshape(a2.shape[0], b2.shape[1])
                want_a, want_b = s * g2 @ b2.T, s * a2.T @ g2
                got_a = np.asarray(grads["layers"][group][name]["a"][layer]).reshape(want_a.shape)
                got_b = np.asarray(grads["layers"][group][name]["b"][layer]).reshape(want_b.shape)
                scale = max(np.abs(want_a).max(), np.abs(want_b).max())
                assert np.abs(got_a - want_a).max() < 1e-4 * scale, (group, name, layer)
                assert np.abs(got_b - want_b).max() < 1e-4 * scale, (group, name, layer)
    # the largest coordinate of up's B by central finite differences (float32 losses: a large one)
    f = jax.jit(lambda ad: with_view(objective, view)(ad, {lora.BASE: base}, batch)[0])
    g_b = np.asarray(grads["layers"]["mlp"]["up"]["b"])
    where = np.unravel_index(np.abs(g_b).argmax(), g_b.shape)
    eps = 1e-2
    bump = jax.tree.map(jnp.zeros_like, adapters)
    bump["layers"]["mlp"]["up"]["b"] = bump["layers"]["mlp"]["up"]["b"].at[where].set(eps)
    plus = float(f(jax.tree.map(jnp.add, adapters, bump)))
    minus = float(f(jax.tree.map(jnp.subtract, adapters, bump)))
    assert abs(g_b[where]) > 1e-3
    np.testing.assert_allclose((plus - minus) / (2 * eps), g_b[where], rtol=2e-2)


def _lora_sft_state(mesh, base, adapters, optimizer):
    axes = lora.adapter_logical_axes(CFG, LORA)
    return place_train_state(adapters, optimizer, mesh, DEFAULT_RULES, axes, frozen={lora.BASE: base},
                             frozen_axes={lora.BASE: models.param_logical_axes(CFG)})


def test_lora_train_steps_change_only_the_adapters():
    """Two steps (from B = 0, A's gradient (α/r)·G·Bᵀ is 0 on the first: B moves first, then A)."""
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10, weight_decay=0.0))
    lora_cfg = dataclasses.replace(LORA, dropout=0.1)
    base, adapters = _base(), lora.init_adapters(CFG, lora_cfg)
    state = _lora_sft_state(mesh, base, adapters, optimizer)
    step = make_sft_step(CFG, optimizer, shardings_of(state), mesh, DEFAULT_RULES, view=lora.view(lora_cfg))

    def moved(state):
        return {path: bool(np.any(np.asarray(new) != np.asarray(old))) for (path, new), old
                in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(adapters))}

    state, metrics = step(state, sft_batch(1))
    assert np.isfinite(to_floats(metrics)["optim/loss"])
    first = moved(state)
    assert all(v for p, v in first.items() if p[-1].key == "b") and not any(v for p, v in first.items() if p[-1].key == "a")
    state, _ = step(state, sft_batch(2))
    assert all(moved(state).values())
    assert set(state.frozen) == {lora.BASE}
    for got, want in zip(jax.tree.leaves(state.frozen[lora.BASE]), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_sharded_lora_sft_matches_one_device():
    """8-way FSDP and a 2x4 data x tensor mesh give the single-device loss and adapter gradients."""
    base, adapters, batch = _base(), _trained_adapters(), sft_batch(2)
    objective = with_view(functools.partial(sft_objective, model_cfg=CFG), lora.view(LORA))
    results = {}
    for name, mesh_cfg in (("1", MeshConfig(data=1)), ("fsdp8", MeshConfig(data=1, fsdp=8)),
                           ("dp2tp4", MeshConfig(data=2, tensor=4))):
        mesh = make_mesh(mesh_cfg, jax.devices()[:1] if name == "1" else None)
        state = _lora_sft_state(mesh, base, adapters, optax.identity())
        fn = jax.jit(jax.value_and_grad(objective, has_aux=True), out_shardings=replicated(mesh))
        (loss, _), grads = fn(state.params, state.frozen, batch)
        results[name] = (float(loss), jax.tree.map(np.asarray, grads))
    loss1, grads1 = results["1"]
    for name in ("fsdp8", "dp2tp4"):
        loss, grads = results[name]
        assert abs(loss - loss1) < 1e-5 * abs(loss1), name
        for g, g1 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads1)):
            assert np.abs(g - g1).max() < 1e-5 * max(np.abs(g1).max(), 1e-6), name


def test_dpo_with_lora_holds_the_base_once_and_its_reference_is_the_base():
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10))
    base, adapters, batch = _base(), _trained_adapters(), pair_batch(3)
    state = _lora_sft_state(mesh, base, adapters, optimizer)
    view = lora.view(LORA, reference_path=())
    params_view, reference = view(state.params, state.frozen)
    assert reference is state.frozen[lora.BASE]  # the base itself, not a copy
    want = pair_logps(CFG, base, batch)
    got = pair_logps(CFG, reference, batch)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    # the state's arrays: the adapters, their moments, and ONE base (no reference copy)
    n_base = sum(x.size for x in jax.tree.leaves(base))
    n_state = sum(x.size for x in jax.tree.leaves(state))
    n_adapters = sum(x.size for x in jax.tree.leaves(adapters))
    assert n_state < n_base + 4 * n_adapters
    step = make_dpo_step(CFG, optimizer, shardings_of(state), mesh, DEFAULT_RULES,
                         loss_fn=functools.partial(losses.dpo_loss, beta=0.1), view=view)
    loss_first = float(with_view(functools.partial(dpo_objective, model_cfg=CFG,
                                                   loss_fn=functools.partial(losses.dpo_loss, beta=0.1)), view)(
        state.params, state.frozen, batch)[0])
    state, metrics = step(state, batch)
    assert abs(to_floats(metrics)["optim/loss"] - loss_first) < 1e-6 * abs(loss_first) + 1e-6


# --- PEFT interchange on a tiny transformers Llama -------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama") / "hf")
    cfg, params = models.load_pretrained(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 96, size=(2, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    ids[1, :3] = 0
    return path, cfg, params, ids, mask


def _rel(ours, theirs, mask):
    m = mask.astype(bool)
    return float(np.abs(ours[m] - theirs[m]).max() / np.abs(theirs[m]).max())


def test_our_peft_directory_loads_in_peft_with_our_logits(tiny_llama, tmp_path):
    import peft

    path, cfg, params, ids, mask = tiny_llama
    lora_cfg = lora.LoraConfig(rank=4, alpha=12.0, targets=("all",))
    adapters = _trained_adapters(cfg, lora_cfg, seed=4)
    ours = np.asarray(models.forward(cfg, lora.attach(params, adapters, lora_cfg), jnp.asarray(ids), jnp.asarray(mask)))
    lora.save_peft(tmp_path / "peft", cfg, lora_cfg, adapters, base_model=str(path))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 12.0
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])
    model = peft.PeftModel.from_pretrained(load_hf_model(path), str(tmp_path / "peft")).eval()
    theirs = hf_logits(model, ids, mask)
    assert _rel(ours, theirs, mask) < 1e-5
    base = hf_logits(load_hf_model(path), ids, mask)
    assert _rel(base, theirs, mask) > 1e-3  # the adapter is applied, not ignored
    # and our merged export in plain transformers
    models.save_pretrained(tmp_path / "merged", cfg, lora.merge(params, adapters, lora_cfg))
    assert _rel(ours, hf_logits(load_hf_model(tmp_path / "merged"), ids, mask), mask) < 1e-5
    # the deferred merge (what the scripts export: one kernel merged at a time) writes the same bytes
    models.save_pretrained(tmp_path / "deferred", cfg, lora.merge(params, adapters, lora_cfg, deferred=True))
    assert (tmp_path / "deferred" / "model.safetensors").read_bytes() == (tmp_path / "merged" / "model.safetensors").read_bytes()
    # load_peft gives back the same adapters
    cfg_back, adapters_back = lora.load_peft(tmp_path / "peft", cfg)
    assert (cfg_back.rank, cfg_back.alpha, set(lora.target_names(cfg, cfg_back))) == (4, 12.0, set(lora.TARGETS))
    for got, want in zip(jax.tree.leaves(adapters_back), jax.tree.leaves(adapters)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_an_adapter_made_by_peft_loads_with_peft_logits(tiny_llama, tmp_path):
    import peft

    path, cfg, params, ids, mask = tiny_llama
    torch.manual_seed(0)
    model = peft.get_peft_model(load_hf_model(path), peft.LoraConfig(
        r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # peft initialises B to 0
    model.save_pretrained(str(tmp_path / "theirs"))
    theirs = hf_logits(model.eval(), ids, mask)
    lora_cfg, adapters = lora.load_peft(tmp_path / "theirs", cfg)
    assert (lora_cfg.rank, lora_cfg.alpha) == (2, 5.0) and lora.target_names(cfg, lora_cfg) == ("q", "v", "down")
    ours = np.asarray(models.forward(cfg, lora.attach(params, adapters, lora_cfg), jnp.asarray(ids), jnp.asarray(mask)))
    assert _rel(ours, theirs, mask) < 1e-5


def test_peft_errors_name_the_file_and_the_field(tiny_llama, tmp_path):
    path, cfg, params, _, _ = tiny_llama
    lora_cfg = lora.LoraConfig(rank=2, targets=("q",))
    lora.save_peft(tmp_path / "a", cfg, lora_cfg, lora.init_adapters(cfg, lora_cfg))
    config_file = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match=r"adapter_config.json: use_dora=True is not supported"):
        lora.load_peft(tmp_path / "a", cfg)
    config_file.write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: .*q_proj.lora_A.weight has shape \(2, 32\), "
                                         r"expected \(3, 32\)"):
        lora.load_peft(tmp_path / "a", cfg)
    with pytest.raises(FileNotFoundError, match="nowhere/adapter_config.json: missing"):
        lora.load_peft(tmp_path / "nowhere", cfg)
    neox = models.ModelConfig.from_hf_config({"model_type": "gpt_neox", "vocab_size": 32, "hidden_size": 16,
                                              "intermediate_size": 32, "num_hidden_layers": 1,
                                              "num_attention_heads": 2, "max_position_embeddings": 16})
    with pytest.raises(ValueError, match="gpt_neox model fuses q, k and v"):
        lora.save_peft(tmp_path / "n", neox, lora_cfg, {})


def test_trainable_continues_a_peft_adapter_and_exports_it_again(tiny_llama, tmp_path):
    """--lora.load DIR: the adapter's own rank, alpha and targets replace the flags'; the placed state
    starts from its weights; the stage's exports (merged hf/, peft/) hold the same model."""
    from rlhf_jax import trainable

    path, cfg, params, ids, mask = tiny_llama
    saved_cfg = lora.LoraConfig(rank=3, alpha=6.0, targets=("q", "down"))
    adapters = _trained_adapters(cfg, saved_cfg, seed=9)
    lora.save_peft(tmp_path / "in", cfg, saved_cfg, adapters)
    trainable = trainable.Trainable.create(lora.LoraConfig(rank=8, dropout=0.1, load=str(tmp_path / "in")), cfg)
    assert (trainable.lora_cfg.rank, trainable.lora_cfg.alpha, trainable.lora_cfg.dropout) == (3, 6.0, 0.1)
    assert lora.target_names(cfg, trainable.lora_cfg) == ("q", "down")
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    state = trainable.place(cfg, params, models.param_logical_axes(cfg), optax.identity(), mesh, DEFAULT_RULES)
    want = np.asarray(models.forward(cfg, lora.attach(params, adapters, saved_cfg), jnp.asarray(ids), jnp.asarray(mask)))
    got = np.asarray(models.forward(cfg, trainable.lm(state), jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_array_equal(got, want)

    class _NoTokenizer:
        def save_pretrained(self, _):
            pass

    written = trainable.export(tmp_path / "out", cfg, state, _NoTokenizer())
    assert _rel(np.asarray(models.forward(cfg, models.load_pretrained(written["hf"])[1], jnp.asarray(ids),
                                          jnp.asarray(mask))), want, mask) < 1e-5
    _, again = lora.load_peft(written["peft"], cfg)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(adapters)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
