"""Sampling from a decoder LM: one prefill pass, then a KV-cached decode loop in ``lax.while_loop``.

``generate`` is the single entry point: it checks its arguments on the host, then calls one jitted
function with every sampling option static, so each (batch, prompt length, options) combination
compiles once.

Layout of a :class:`Rollout` (B = prompts × num_samples, P = prompt length, R = max_new_tokens)::

    sequences_BT        [ pad pad p p p p | r r r EOS pad pad ]     T = P + R
    attention_mask_BT   [  0   0  1 1 1 1 | 1 1 1  1   0   0  ]
    response_mask_BT    [  0   0  0 0 0 0 | 1 1 1  1   0   0  ]
                                        P-1 ^ the logits here predict the first response token

Prompts are left-padded, so the response of every row starts at column P and positions are
``cumsum(attention_mask) - 1``, exactly what ``models.forward`` uses by default. A full forward pass
therefore reproduces the sampling log-probs::

    logits_BTV = models.forward(cfg, params, r.sequences_BT, r.attention_mask_BT)
    logits_BRV = logits_BTV[:, r.prompt_len - 1 : -1] / temperature
    logps_BR = jnp.take_along_axis(jax.nn.log_softmax(logits_BRV), r.response_ids_BR[..., None], -1)[..., 0]
    # == r.logps_BR where r.response_mask_BR == 1 (top_k / top_p off; see below)

``logps_BR`` are log-probs of the sampled tokens under the distribution that was sampled from:
``log_softmax(filter(logits / temperature))`` with the top-k / top-p filter applied and the kept
tokens renormalised. With top-k / top-p off this is the tempered model distribution, which a full
forward pass reproduces as above (at temperature 1: the model's own distribution, as PPO needs).
Greedy decoding (``temperature=0``) returns the log-probs of the untempered model
(``log_softmax(logits)``), since the tempered distribution is degenerate at zero temperature.
Positions after EOS hold ``pad_id``, log-prob 0 and mask 0.
"""
from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models


@flax.struct.dataclass
class Rollout:
    """Prompts and sampled responses, with explicit masks (layout in the module docstring)."""

    sequences_BT: jax.Array
    """int32 (B, P + R): left-padded prompt followed by the response, ``pad_id`` after EOS."""
    attention_mask_BT: jax.Array
    """int32 (B, P + R): 1 on real prompt tokens and on response tokens up to and including EOS."""
    response_mask_BT: jax.Array
    """float32 (B, P + R): 1 on response tokens up to and including EOS, 0 on the prompt and after."""
    response_ids_BR: jax.Array
    """int32 (B, R): ``sequences_BT[:, P:]``."""
    response_mask_BR: jax.Array
    """float32 (B, R): ``response_mask_BT[:, P:]``."""
    logps_BR: jax.Array
    """float32 (B, R): log-prob of each sampled token under the sampling distribution, 0 after EOS."""
    lengths_B: jax.Array
    """int32 (B,): number of response tokens, EOS included."""
    has_eos_B: jax.Array
    """bool (B,): the response ended with an EOS token before the limit."""
    prompt_len: int = flax.struct.field(pytree_node=False)
    """P: the response of every row starts at column P of ``sequences_BT``."""

    @property
    def scored_mask_BT(self) -> jax.Array:
        """``response_mask_BT`` shifted one column left, the mask of per-token log-probs and values
        (:mod:`rlhf_jax.types`: column t scores token t + 1): 1 at t iff token t + 1 is a response token."""
        return jnp.pad(self.response_mask_BT[:, 1:], ((0, 0), (0, 1)))


def top_k_filter(logits_BV: jax.Array, k: int) -> jax.Array:
    """Set to -inf every logit below the k-th largest of its row.

    Tokens tied with the k-th largest are all kept (as in ``transformers``' TopKLogitsWarper), so
    the result never depends on how a sort breaks ties.
    """
    # min over the top k rather than [:, -1]: XLA:CPU turns top_k followed by that slice into a full
    # sort of the row (~10 ms for 16 x 4096) instead of its TopK kernel (~0.2 ms).
    kth_B1 = jnp.min(jax.lax.top_k(logits_BV, k)[0], axis=-1, keepdims=True)
    return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def top_p_filter(logits_BV: jax.Array, p: float) -> jax.Array:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of most probable tokens whose
    total probability is >= p, and set the other logits to -inf.

    Equivalently: keep the logits >= t, where t is the largest logit value whose kept mass
    ``sum(probs[logits >= t])`` is still >= p. The most probable token is always kept, and tokens
    tied with the least probable kept token are kept too (the result never depends on tie order).
    t is found by bisection over the 2^32 float values rather than by sorting the row: XLA's CPU
    sort of a 4096-token row costs more than a whole decode step of a small model.
    """
    probs_BV = jax.nn.softmax(logits_BV.astype(jnp.float32), axis=-1)
    key_BV = _ordered_uint32(logits_BV)

    def narrow(_, bounds):  # invariant: the kept mass at lo_B is >= p; the answer lies in [lo, hi]
        lo_B, hi_B = bounds
        mid_B = lo_B + (hi_B - lo_B) // 2 + (hi_B - lo_B) % 2  # ceil of the midpoint, without overflow
        enough_B = jnp.sum(jnp.where(key_BV >= mid_B[:, None], probs_BV, 0.0), axis=-1) >= p
        return jnp.where(enough_B, mid_B, lo_B), jnp.where(enough_B, hi_B, mid_B - 1)

    lo_B, _ = jax.lax.fori_loop(0, 32, narrow, (jnp.min(key_BV, axis=-1), jnp.max(key_BV, axis=-1)))
    return jnp.where(key_BV >= lo_B[:, None], logits_BV, -jnp.inf)


def _ordered_uint32(x: jax.Array) -> jax.Array:
    """uint32 keys that sort like the float32 values of ``x`` (sign bit flipped for positives, all
    bits flipped for negatives; -0.0 counts as +0.0)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def sampling_logits(logits_BV: jax.Array, *, temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    """The logits actually sampled from: divided by the temperature, then top-k, then top-p
    (the order ``transformers`` applies its warpers in). Requires ``temperature > 0``."""
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    use_k = top_k is not None and top_k < logits_BV.shape[-1]
    use_p = top_p is not None and top_p < 1.0
    if use_k and use_p:
        return top_k_top_p_filter(logits_BV, top_k, top_p)
    if use_k:
        logits_BV = top_k_filter(logits_BV, top_k)
    if use_p:
        logits_BV = top_p_filter(logits_BV, top_p)
    return logits_BV


def top_k_top_p_filter(logits_BV: jax.Array, k: int, p: float) -> jax.Array:
    """``top_p_filter(top_k_filter(logits_BV, k), p)``, with the nucleus found among the k kept
    values instead of by bisection over the whole row (which costs more than a small model's decode
    step).

    With the top-k values v_1..v_k (plus the tokens tied with v_k beyond the k, which top-k keeps
    too) and their weights w_i = exp(v_i − v_max), the mass kept by threshold v_i is
    m_i = Σ_j w_j [v_j ≥ v_i] (+ the tied extras when v_i = v_k); the nucleus keeps the logits
    ≥ t = max{v_i : m_i ≥ p · Σ w}: the same rule as ``top_p_filter``.
    """
    top_Bk = jax.lax.top_k(logits_BV, k)[0]  # reductions over it, not slices: see top_k_filter
    kth_B1 = jnp.min(top_Bk, axis=-1, keepdims=True)
    max_B1 = jnp.max(top_Bk, axis=-1, keepdims=True)
    kept_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    ties_beyond_k_B1 = (jnp.sum(logits_BV == kth_B1, axis=-1, keepdims=True)
                        - jnp.sum(top_Bk == kth_B1, axis=-1, keepdims=True)).astype(jnp.float32)
    w_Bk = jnp.exp(top_Bk - max_B1)
    w_ties_B1 = ties_beyond_k_B1 * jnp.exp(kth_B1 - max_B1)
    total_B1 = jnp.sum(w_Bk, axis=-1, keepdims=True) + w_ties_B1
    mass_Bk = jnp.sum(jnp.where(top_Bk[:, None, :] >= top_Bk[:, :, None], w_Bk[:, None, :], 0.0), axis=-1)
    mass_Bk = mass_Bk + jnp.where(top_Bk == kth_B1, w_ties_B1, 0.0)
    enough_Bk = mass_Bk >= p * total_B1
    t_B1 = jnp.max(jnp.where(enough_Bk, top_Bk, -jnp.inf), axis=-1, keepdims=True)
    t_B1 = jnp.where(jnp.isfinite(t_B1), t_B1, kth_B1)  # rounding left no candidate: keep the top k
    return jnp.where(kept_BV >= t_B1, kept_BV, -jnp.inf)


def categorical(key: jax.Array, logits_BV: jax.Array, block: int = 64) -> jax.Array:
    """One draw per row from softmax(logits_BV) by two-level inverse-CDF sampling.

    With block masses m_j = Σ_{i in block j} p_i and their running sums M_j, draw a block as the
    first j with M_j > u₁·M_last, then a token within it as the first i with c_i > u₂·c_last, where
    c is the running sum inside the block (u₁, u₂ ~ U[0, 1) independent). P(token i in block j) =
    m_j / Σm · p_i / m_j = p_i / Σp: the same distribution as ``jax.random.categorical``, and tokens
    with probability 0 (e.g. filtered to -inf) are never drawn, since c_i > c_{i-1} only when p_i > 0.

    It needs two uniforms per row instead of V Gumbel draws, and two running sums of length V/block
    and block instead of one of length V: on CPU, a full-row cumsum or Gumbel noise over a 16 x 4096
    batch costs a noticeable part of a small model's decode step.
    """
    B, V = logits_BV.shape
    probs_BV = jax.nn.softmax(logits_BV.astype(jnp.float32), axis=-1)
    nb = -(-V // block)
    probs_BNb = jnp.pad(probs_BV, ((0, 0), (0, nb * block - V))).reshape(B, nb, block)
    u1_B1, u2_B1 = jnp.split(jax.random.uniform(key, (B, 2), jnp.float32), 2, axis=1)
    block_B = _inverse_cdf(jnp.sum(probs_BNb, axis=-1), u1_B1)
    within_Bb = jnp.take_along_axis(probs_BNb, block_B[:, None, None], axis=1)[:, 0]
    return block_B * block + _inverse_cdf(within_Bb, u2_B1)


def _inverse_cdf(weights_BN: jax.Array, u_B1: jax.Array) -> jax.Array:
    """The first index i with c_i > u·c_last, c = cumsum(weights) (u in [0, 1); rows need mass > 0).

    The threshold is kept strictly below c_last, so rounding of u·c_last can never select an index
    past the last positive weight."""
    cdf_BN = jnp.cumsum(weights_BN, axis=-1)
    total_B1 = cdf_BN[:, -1:]
    threshold_B1 = jnp.minimum(u_B1 * total_B1, jnp.nextafter(total_B1, jnp.float32(0)))
    return jnp.sum(cdf_BN <= threshold_B1, axis=-1, dtype=jnp.int32)


def greedy(logits_BV: jax.Array) -> jax.Array:
    """``jnp.argmax(logits_BV, axis=-1)`` (the first maximum; the first NaN if a row has one), as a
    max and a min over the row: XLA:CPU's variadic (value, index) reduction behind ``argmax`` is
    about twice as slow as the two plain reductions."""
    max_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
    index_BV = jax.lax.broadcasted_iota(jnp.int32, logits_BV.shape, 1)
    is_max_BV = (logits_BV == max_B1) | jnp.isnan(logits_BV)
    return jnp.min(jnp.where(is_max_BV, index_BV, logits_BV.shape[1]), axis=-1)


def _sample(logits_BV, key, *, temperature, top_k, top_p):
    """One token per row and its log-prob under the distribution sampled from (module docstring)."""
    if temperature == 0.0:
        logits_BV = logits_BV.astype(jnp.float32)
        tokens_B = greedy(logits_BV)
    else:
        logits_BV = sampling_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p)
        tokens_B = categorical(key, logits_BV)
    chosen_B = jnp.take_along_axis(logits_BV, tokens_B[:, None], axis=-1)[:, 0]
    logps_B = chosen_B - jax.nn.logsumexp(logits_BV, axis=-1)
    return tokens_B.astype(jnp.int32), logps_B


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p", "eos_ids", "pad_id", "num_samples",
                     "done_check_every", "per_layer"),
)
def _generate(cfg, params, prompt_ids_BP, prompt_mask_BP, key, *, max_new_tokens, temperature, top_k, top_p, eos_ids,
              pad_id, num_samples, done_check_every, per_layer):
    prompt_ids_BP = jnp.repeat(prompt_ids_BP.astype(jnp.int32), num_samples, axis=0)
    prompt_mask_BP = jnp.repeat(prompt_mask_BP.astype(jnp.int32), num_samples, axis=0)
    B, P = prompt_ids_BP.shape
    R = max_new_tokens
    eos_E = jnp.asarray(eos_ids, jnp.int32)
    sample = functools.partial(_sample, temperature=temperature, top_k=top_k, top_p=top_p)

    # The last sampled token is never fed back, so the cache needs P + R - 1 slots.
    phase_ends = _phase_ends(R)
    cache = models.init_cache(cfg, B, P if per_layer else P + R - 1, dtype=cfg.compute_dtype)
    logits_B1V, cache = models.prefill(cfg, params, prompt_ids_BP, prompt_mask_BP, cache, last_only=True)
    if per_layer:  # unrolled layers over per-layer weights and cache buffers (models.unstack_layers)
        params = models.unstack_layers(params)
        cache = models.unstack_cache(cache)

    def emit(t, tokens_B, logps_B, done_B, ids_BR, logps_BR, mask_BR):
        """Write step t's tokens (pad after EOS) and update which rows are done."""
        tokens_B = jnp.where(done_B, pad_id, tokens_B)
        ids_BR = ids_BR.at[:, t].set(tokens_B)
        logps_BR = logps_BR.at[:, t].set(jnp.where(done_B, 0.0, logps_B))
        mask_BR = mask_BR.at[:, t].set(jnp.where(done_B, 0.0, 1.0))
        done_B = done_B | jnp.isin(tokens_B, eos_E)
        return tokens_B, done_B, ids_BR, logps_BR, mask_BR

    tokens_B, logps_B = sample(logits_B1V[:, 0], jax.random.fold_in(key, 0))
    tokens_B, done_B, ids_BR, logps_BR, mask_BR = emit(
        0,
        tokens_B,
        logps_B,
        jnp.zeros((B,), bool),
        jnp.full((B, R), pad_id, jnp.int32),
        jnp.zeros((B, R), jnp.float32),
        jnp.zeros((B, R), jnp.float32),
    )

    # ``finished`` (all rows done) ends the loop early. With the batch split over devices it needs an
    # all-reduce, which costs as much as a tenth of a small model's decode step on a CPU mesh, so it
    # is then refreshed only every ``done_check_every`` steps (extra steps only write padding).
    def all_done(t, done_B):
        if done_check_every == 1:
            return jnp.all(done_B)
        return jax.lax.cond(t % done_check_every == 0, jnp.all, lambda _: jnp.zeros((), bool), done_B)

    state = (jnp.int32(1), tokens_B, done_B, jnp.all(done_B), ids_BR, logps_BR, mask_BR, cache)
    # Step t feeds the token of step t - 1 into slot P + t - 1 and attends to slots < P + t. The steps
    # run in a few phases, each a while_loop that reads only the cache slots its last step needs, so
    # early steps do not stream the unwritten end of the cache (exact: those slots are masked).
    # A per-layer cache instead grows to P + t_end - 1 slots at the start of each phase.
    for t_end in phase_ends:
        if per_layer:
            state = (*state[:-1], models.grow_cache(state[-1], P + t_end - 1))

        def cond(state, t_end=t_end):
            t, _, _, finished, *_ = state
            return (t < t_end) & ~finished

        def body(state, attend_slots=None if per_layer else P + t_end - 1):
            t, tokens_B, done_B, _, ids_BR, logps_BR, mask_BR, cache = state
            logits_BV, cache = models.decode_step(cfg, params, cache, tokens_B, attend_slots=attend_slots)
            tokens_B, logps_B = sample(logits_BV, jax.random.fold_in(key, t))
            tokens_B, done_B, ids_BR, logps_BR, mask_BR = emit(t, tokens_B, logps_B, done_B, ids_BR, logps_BR, mask_BR)
            return t + 1, tokens_B, done_B, all_done(t + 1, done_B), ids_BR, logps_BR, mask_BR, cache

        state = jax.lax.while_loop(cond, body, state)
    _, _, done_B, _, ids_BR, logps_BR, mask_BR, _ = state

    return Rollout(
        sequences_BT=jnp.concatenate([prompt_ids_BP, ids_BR], axis=1),
        attention_mask_BT=jnp.concatenate([prompt_mask_BP, mask_BR.astype(jnp.int32)], axis=1),
        response_mask_BT=jnp.concatenate([jnp.zeros((B, P), jnp.float32), mask_BR], axis=1),
        response_ids_BR=ids_BR,
        response_mask_BR=mask_BR,
        logps_BR=logps_BR,
        lengths_B=jnp.sum(mask_BR, axis=1).astype(jnp.int32),
        has_eos_B=done_B,
        prompt_len=P,
    )


def _phase_ends(max_new_tokens: int, min_phase: int = 32, max_phases: int = 4) -> list[int]:
    """Ends (exclusive) of the decode phases over steps 1 .. R - 1: at most ``max_phases`` phases of
    at least ``min_phase`` steps (each phase compiles its own loop body)."""
    steps = max_new_tokens - 1
    n = max(1, min(max_phases, steps // min_phase))
    return [1 + -(-steps * (i + 1) // n) for i in range(n)]


def generate(
    cfg: models.ModelConfig,
    params,
    prompt_ids_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    *,
    key: jax.Array,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    num_samples: int = 1,
    per_layer: bool | None = None,
) -> Rollout:
    """Sample ``max_new_tokens`` tokens after each left-padded prompt.

    Each prompt is repeated ``num_samples`` times (samples of one prompt are adjacent rows), the
    prompts are prefilled in one pass, and a ``lax.while_loop`` decodes one token per step until
    every row has emitted one of ``eos_ids`` or ``max_new_tokens`` is reached (empty ``eos_ids``:
    always decode to the limit). ``temperature=0`` is greedy (``top_k`` / ``top_p`` then change
    nothing); otherwise ``top_k`` / ``top_p`` (nucleus) filter the tempered logits. Log-prob
    conventions and the output layout are in the module docstring. Works under ``jax.jit`` and on
    sharded inputs; the decode loop is compiled once per (shape, options).

    ``per_layer`` decodes with unrolled layers over per-layer weights and cache buffers
    (``models.unstack_layers`` / ``unstack_cache``): XLA:CPU then stops copying every layer's
    weights out of the stacked arrays at every step, at the price of a second copy of the layer
    weights while generating. The default (None) uses it on CPU for layer weights over
    ``PER_LAYER_MIN_BYTES`` (``_default_per_layer`` has the measurements); accelerators keep the
    layer scan. Same tokens and log-probs either way.
    """
    B, P = prompt_ids_BP.shape
    if prompt_mask_BP.shape != (B, P):
        raise ValueError(f"prompt_mask_BP has shape {prompt_mask_BP.shape}, prompt_ids_BP has shape {(B, P)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if P + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt length {P} + max_new_tokens {max_new_tokens} = {P + max_new_tokens} exceeds the "
            f"model context max_position_embeddings = {cfg.max_position_embeddings}"
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    _check_left_padded(prompt_mask_BP)
    return _generate(
        cfg,
        params,
        prompt_ids_BP,
        prompt_mask_BP,
        key,
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_k=None if top_k is None else int(top_k),
        top_p=None if top_p is None else float(top_p),
        eos_ids=tuple(int(e) for e in eos_ids),
        pad_id=int(pad_id),
        num_samples=int(num_samples),
        done_check_every=_done_check_every(prompt_ids_BP),
        per_layer=_default_per_layer(params) if per_layer is None else bool(per_layer),
    )


PER_LAYER_MIN_BYTES = 8 << 20
"""``generate`` unrolls the layers on CPU when the layer weights exceed this (see ``_default_per_layer``)."""
PER_LAYER_MAX_BYTES = 64 << 20
"""... and are at most this: the unrolled layers are a copy of the layer weights for the whole call."""


def _default_per_layer(params) -> bool:
    """Per-layer decoding on the CPU backend for layer weights in (``PER_LAYER_MIN_BYTES``,
    ``PER_LAYER_MAX_BYTES``].

    Measured on a 2-core CPU (``benchmarks/generation.py`` shapes, 11 interleaved runs): 9-12% faster
    for 17 MB of layer weights on one device and 20-26% on two, where the per-step weight copies
    of the layer scan compete for memory bandwidth; 10% slower for the embedded default's 3 MB,
    whose copies stay in cache and cost less than the unrolled loop. On SmolLM2-135M (430 MB of
    layer weights, 16 prompts of 96 tokens, 48 new tokens, full and LoRA-attached weights) the two
    were within 3% of each other either way, while the unrolled copy held 400 MB more for the call
    (``memory_analysis`` temp: 552 vs 153 MB): past the upper bound the scan is kept.
    """
    if jax.default_backend() != "cpu":
        return False
    layer_bytes = sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params["layers"]))
    return PER_LAYER_MIN_BYTES < layer_bytes <= PER_LAYER_MAX_BYTES


def _done_check_every(prompt_ids_BP) -> int:
    """1 (check every step, no collective needed) unless the prompts are a jax.Array spread over
    several devices, where the check is an all-reduce: then every 4 steps."""
    if isinstance(prompt_ids_BP, jax.core.Tracer):  # under an outer jit the placement is not known here
        return 1
    devices = getattr(getattr(prompt_ids_BP, "sharding", None), "device_set", ())
    return 4 if len(devices) > 1 else 1


def _check_left_padded(prompt_mask_BP) -> None:
    """Reject empty or right-padded prompts when the mask's values are known (not under jit)."""
    if isinstance(prompt_mask_BP, jax.core.Tracer) or not getattr(prompt_mask_BP, "is_fully_addressable", True):
        return
    mask_BP = np.asarray(prompt_mask_BP) != 0
    empty = np.flatnonzero(~mask_BP[:, -1])
    if empty.size:
        raise ValueError(
            f"prompt rows {empty.tolist()} end with padding: prompts must be left-padded and non-empty "
            "(prompt_mask_BP[:, -1] == 1)"
        )
    holes = np.flatnonzero(np.any(mask_BP[:, :-1] & ~mask_BP[:, 1:], axis=1))
    if holes.size:
        raise ValueError(f"prompt rows {holes.tolist()} have padding after a real token: prompts must be left-padded")
