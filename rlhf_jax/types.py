"""Batch types: what a train step receives. Frozen pytrees with every mask explicit.

Built on the host by :mod:`rlhf_jax.data.batching` as NumPy arrays; ``jax.device_put`` them with
a sharding. Shapes are in the names (B batch, T tokens, N responses per prompt, P prompt length).

Conventions shared by all types
-------------------------------
* Token ids, positions and segment ids are ``int32``; ``attention_mask`` is ``int32`` (1 = real
  token, 0 = padding); loss / response masks, labels and margins are ``float32`` (1.0 = counts).
* Training sequences are RIGHT-padded: ``prompt + completion + EOS + pad...``.
  Generation prompts (:class:`PromptBatch`) are LEFT-padded so that every row ends at the last column.
* **Shifted masks.** The target of position ``t`` is token ``t + 1``. A loss / response mask marks
  the positions whose *prediction* is scored: ``mask[t] = 1`` iff token ``t + 1`` is a completion
  token. With ``logps_BT[:, t] = log p(input_ids[:, t + 1] | input_ids[:, :t + 1])`` (last column
  undefined), a sequence's completion log-likelihood is ``(logps_BT * mask_BT).sum(-1)``; the
  mask's last column is always 0. Example, prompt ``a b``, completion ``c EOS``, one pad::

      input_ids   a  b  c  EOS pad
      attention   1  1  1  1   0
      loss_mask   0  1  1  0   0      (b predicts c, c predicts EOS)

* A row that only pads a batch (the last batch of an epoch with ``last_batch="pad"``) has all
  masks 0. Per-row losses must weight rows by ``mask.sum(-1) > 0``.
"""
from __future__ import annotations

import flax.struct
import numpy as np

Array = np.ndarray  # host-side; a jax.Array once on device


@flax.struct.dataclass(frozen=True)
class SFTBatch:
    """Demonstrations for next-token cross-entropy, optionally packed several per row.

    ``segment_ids_BT`` numbers the examples within a row from 1 (0 = padding); ``positions_BT``
    restart at 0 for each example. A packed row needs attention restricted to its own segment:
    ``causal & (segment_ids[q] == segment_ids[k]) & (segment_ids[k] != 0)``. Unpacked rows have a
    single segment (1) and positions ``0..len-1``, so the same rule is the plain causal mask.
    """

    input_ids_BT: Array
    attention_mask_BT: Array
    loss_mask_BT: Array
    positions_BT: Array
    segment_ids_BT: Array


@flax.struct.dataclass(frozen=True)
class PairBatch:
    """Comparisons: the same prompt with the chosen and with the rejected response.

    Both sides are padded to the same ``T`` (so they can be concatenated into one forward pass).
    ``margin_B`` is the row's margin, 0.0 where the data gave none.
    """

    chosen_ids_BT: Array
    chosen_attention_mask_BT: Array
    chosen_response_mask_BT: Array
    rejected_ids_BT: Array
    rejected_attention_mask_BT: Array
    rejected_response_mask_BT: Array
    margin_B: Array


@flax.struct.dataclass(frozen=True)
class RankBatch:
    """Rankings: ``N`` responses per prompt, sorted best first (response ``i`` beats ``j`` iff ``i < j``).

    Prompts with fewer than ``N`` responses are padded with empty responses: ``valid_BN`` is 1.0
    for real responses and 0.0 for padding.
    """

    input_ids_BNT: Array
    attention_mask_BNT: Array
    response_mask_BNT: Array
    valid_BN: Array


@flax.struct.dataclass(frozen=True)
class BinaryBatch:
    """Thumbs up (``label_B = 1.0``) or down (0.0) for one completion per prompt."""

    input_ids_BT: Array
    attention_mask_BT: Array
    response_mask_BT: Array
    label_B: Array


@flax.struct.dataclass(frozen=True)
class PromptBatch:
    """Prompts for generation, LEFT-padded: ``prompt_ids_BP[:, -1]`` is every row's last prompt token.

    Positions for the model are ``cumsum(prompt_mask_BP, -1) - 1`` (clipped at 0 on padding).
    """

    prompt_ids_BP: Array
    prompt_mask_BP: Array
