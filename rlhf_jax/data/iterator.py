"""A deterministic, resumable, multi-host batch iterator over an in-memory list of examples.

Epoch ``e`` visits the examples in the order ``np.random.default_rng([seed, e]).permutation(n)``
(or in file order with ``shuffle=False``), cut into *global* batches of ``batch_size``. With
several hosts, host ``process_index`` collates its contiguous slice of ``batch_size //
process_count`` rows of each global batch, so the global batch is the same whatever the number
of hosts. The order depends only on ``(seed, epoch)``: the position ``{"seed", "epoch", "index"}``
(``index`` = next batch of the epoch) is all that is needed to resume exactly.

The last, partial global batch of an epoch is dropped (``last_batch="drop"``) or filled with
``None`` rows (``last_batch="pad"``) that the ``collate_*`` functions turn into all-zero-mask rows.
"""
from __future__ import annotations

import math
from typing import Callable, Generic, Literal, Sequence, TypeVar

import jax
import numpy as np

Example = TypeVar("Example")
Batch = TypeVar("Batch")


class BatchIterator(Generic[Example, Batch]):
    """``next(it)`` -> the next batch; epochs follow one another until ``num_epochs`` (None = forever).

    Usage::

        collate = functools.partial(collate_pairs, pad_id=tokenizer.pad_token_id, length=512)
        it = BatchIterator(encode(rows, tokenizer, max_len=512), collate, batch_size=32, seed=0)
        state = it.get_state()   # JSON-able; store it with the checkpoint
        it.set_state(state)      # later: continue exactly where it was
    """

    def __init__(
        self,
        examples: Sequence[Example],
        collate: Callable[[Sequence[Example | None]], Batch],
        *,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        last_batch: Literal["drop", "pad"] = "drop",
        num_epochs: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if batch_size <= 0 or batch_size % self.process_count:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of process_count {self.process_count}")
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")
        if last_batch not in ("drop", "pad"):
            raise ValueError(f"last_batch must be 'drop' or 'pad', got {last_batch!r}")
        self.examples, self.collate = examples, collate
        self.batch_size, self.shuffle, self.last_batch, self.num_epochs = batch_size, shuffle, last_batch, num_epochs
        rounding = math.floor if last_batch == "drop" else math.ceil
        self.batches_per_epoch = rounding(len(examples) / batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(examples)} examples make no batch of {batch_size} with last_batch={last_batch!r}")
        self.seed, self.epoch, self.index = seed, 0, 0
        self._order_of: tuple[tuple[int, int], np.ndarray] | None = None  # ((seed, epoch), order) cache

    def _order(self) -> np.ndarray:
        key = (self.seed, self.epoch)
        if self._order_of is None or self._order_of[0] != key:
            n = len(self.examples)
            self._order_of = key, np.random.default_rng(key).permutation(n) if self.shuffle else np.arange(n)
        return self._order_of[1]

    def __iter__(self) -> "BatchIterator[Example, Batch]":
        return self

    def __next__(self) -> Batch:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        local = self.batch_size // self.process_count
        start = self.index * self.batch_size + self.process_index * local
        ids = self._order()[start : start + local]
        rows: list[Example | None] = [self.examples[i] for i in ids]
        rows += [None] * (local - len(rows))
        self.index += 1
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return self.collate(rows)

    def get_state(self) -> dict[str, int]:
        """The position: ``{"seed", "epoch", "index"}`` (plain ints, JSON-able)."""
        return {"seed": int(self.seed), "epoch": int(self.epoch), "index": int(self.index)}

    def set_state(self, state: dict[str, int]) -> None:
        """Continue from a position returned by :meth:`get_state`."""
        if set(state) != {"seed", "epoch", "index"}:
            raise ValueError(f"expected a state with keys seed, epoch, index; got {sorted(state)}")
        if not 0 <= state["index"] < self.batches_per_epoch or state["epoch"] < 0:
            raise ValueError(f"state {state} is outside this data ({self.batches_per_epoch} batches per epoch)")
        self.seed, self.epoch, self.index = int(state["seed"]), int(state["epoch"]), int(state["index"])
