"""Packed SFT: examples packed into one row score exactly as they do alone (segment-restricted attention)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures.tiny_tokenizer import make_tokenizer

from rlhf_jax import models
from rlhf_jax.data import SFTRow, collate_sft, encode, pack
from rlhf_jax.objectives import next_token_logps, sft_objective

LENGTH = 32
PROMPTS = ["Name a prime.", "Say hi.", "Tell a joke.", "Translate to French: cheese", "Help", "What is 2+2?"]
COMPLETIONS = [" 7", " Hi!", " No.", " fromage", " ok", " 4"]


def _config(vocab_size: int) -> models.ModelConfig:
    """A 2-layer GQA Llama; initializer_range 0.2 (not 0.02) so attending to another example visibly
    changes the log-probs (a near-uniform model would hide a leaking mask below the tolerance)."""
    return models.ModelConfig.from_hf_config({
        "model_type": "llama", "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "initializer_range": 0.2,
    })


@pytest.fixture(scope="module")
def setup():
    """(cfg, params, number of examples, packed batch, unpacked batch, outputs of both batches).

    The packed batch is padded with empty rows to the unpacked batch's shape, so that
    ``_outputs`` compiles once for both.
    """
    tok = make_tokenizer()
    examples = encode([SFTRow(p, c) for p, c in zip(PROMPTS, COMPLETIONS)], tok, max_len=LENGTH,
                      chat_template="off")  # raw text: short enough that three or more share a row
    packs = pack(examples, LENGTH)
    assert len(packs) < len(examples) and any(len(p) >= 3 for p in packs)  # really packed
    packed = collate_sft(packs + [None] * (len(examples) - len(packs)), pad_id=tok.pad_token_id, length=LENGTH)
    unpacked = collate_sft(examples, pad_id=tok.pad_token_id, length=LENGTH)
    cfg = _config(len(tok))
    params = models.init_params(cfg, jax.random.key(0))
    outputs = [jax.device_get(_outputs(cfg, params, batch)) for batch in (packed, unpacked)]
    return cfg, params, len(examples), packed, unpacked, outputs


@functools.partial(jax.jit, static_argnums=0)
def _outputs(cfg, params, batch):
    """Per-token log-probs (B, T) with the batch's segment ids, with none and with all-ones segment
    ids, and ``sft_objective``'s (loss, metrics)."""
    def logps(segment_ids_BT):
        logits_BTV = models.forward(cfg, params, batch.input_ids_BT, batch.attention_mask_BT, batch.positions_BT,
                                    segment_ids_BT=segment_ids_BT)
        return next_token_logps(logits_BTV, batch.input_ids_BT)
    return {"segments": logps(batch.segment_ids_BT), "none": logps(None),
            "ones": logps(jnp.ones_like(batch.segment_ids_BT)),
            "objective": sft_objective(params, {}, batch, model_cfg=cfg)}


def _per_example(batch, logps_BT) -> np.ndarray:
    """Summed completion log-likelihood (over the loss mask) of every example, in row-major (= pack) order."""
    masked_BT = logps_BT * batch.loss_mask_BT
    return np.asarray([masked_BT[b][batch.segment_ids_BT[b] == s].sum()
                       for b in range(masked_BT.shape[0]) for s in range(1, int(batch.segment_ids_BT[b].max()) + 1)])


def test_packed_equals_unpacked_per_example(setup):
    _, _, n_examples, packed, unpacked, (out_p, out_u) = setup
    packed_E = _per_example(packed, out_p["segments"])
    unpacked_E = _per_example(unpacked, out_u["segments"])
    assert packed_E.shape == unpacked_E.shape == (n_examples,)
    np.testing.assert_allclose(packed_E, unpacked_E, rtol=0, atol=1e-5)


def test_without_segment_ids_packed_examples_leak(setup):
    """The same packed batch without the segment mask: every example after the first of its row
    sees the previous ones, so its log-likelihood changes (the first of each row does not)."""
    _, _, _, packed, unpacked, (out_p, out_u) = setup
    leaky_E = _per_example(packed, out_p["none"])
    unpacked_E = _per_example(unpacked, out_u["segments"])
    first = np.concatenate([np.arange(1, row.max() + 1) == 1 for row in packed.segment_ids_BT])
    assert 0 < first.sum() < len(first)
    np.testing.assert_allclose(leaky_E[first], unpacked_E[first], rtol=0, atol=1e-5)
    assert np.all(np.abs(leaky_E[~first] - unpacked_E[~first]) > 1e-3), (leaky_E, unpacked_E)


def test_sft_objective_packed_equals_unpacked(setup):
    _, _, _, _, unpacked, (out_p, out_u) = setup
    (loss_p, metrics_p), (loss_u, metrics_u) = out_p["objective"], out_u["objective"]
    nll_p, nll_u = metrics_p["sft/nll"], metrics_u["sft/nll"]
    assert float(nll_p.count) == float(nll_u.count) == float(unpacked.loss_mask_BT.sum())
    np.testing.assert_allclose(float(nll_p.total), float(nll_u.total), rtol=1e-6)
    np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-6)


def test_all_ones_segments_equal_no_segments(setup):
    """One segment covering each row (padding included) is the plain causal + padding mask, at every
    position of both batches (pad queries included)."""
    *_, outputs = setup
    for out in outputs:
        np.testing.assert_allclose(out["ones"], out["none"], rtol=0, atol=1e-6)


def test_segment_ids_shape_checked(setup):
    cfg, params, *_ = setup
    ids_BT = np.ones((2, 6), np.int32)
    with pytest.raises(ValueError, match=r"segment_ids_BT \(2, 5\)"):
        models.forward(cfg, params, ids_BT, ids_BT, segment_ids_BT=np.ones((2, 5), np.int32))
