"""Where the web app's items come from: a file of candidate responses, or a policy sampled in the background.

Each prompt becomes one item. Its task is ``tasks[prompt_index % len(tasks)]`` (one task: every item
is of that kind; several: they alternate), and it takes the first distinct non-empty responses it
needs: 2 for ``pairwise``, ``ranking_size`` for ``ranked``, 1 for ``thumbs``. A prompt without
enough of them is an error naming ``file:line:responses`` (a candidate file) or is reported on
stderr and counted (a policy that repeated itself; it is asked for twice as many samples as needed,
so this is rare at temperature 1).

With a gold judge (a reward function ``module:function``, e.g. ``rlhf_jax.rewards:gold`` for the
embedded default's simulated annotator), each item stores the gold score of every response, and the
agreement report gives each annotator's agreement with it.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from rlhf_jax.data import validation as v
from rlhf_jax.data.formats import load_rows, read_records, row_to_dict
from rlhf_jax.data.validation import DataError
from rlhf_jax.feedback.store import KINDS, Store

GoldFn = Callable[[Sequence[Any], Sequence[str]], Sequence[float]]


def needed(task: str, ranking_size: int) -> int:
    return {"pairwise": 2, "ranked": ranking_size, "thumbs": 1}[task]


def check_tasks(tasks: Sequence[str], ranking_size: int) -> None:
    if not tasks:
        raise ValueError("--tasks: give at least one of pairwise, ranked, thumbs")
    for t in tasks:
        if t not in KINDS:
            raise ValueError(f"--tasks: {t!r} is not one of {', '.join(KINDS)}")
    if "ranked" in tasks and ranking_size < 2:
        raise ValueError(f"--ranking-size must be >= 2, got {ranking_size}")


def distinct(responses: Sequence[str]) -> list[str]:
    """Non-empty responses, first occurrence of each, in order."""
    return list(dict.fromkeys(r for r in responses if r.strip()))


def make_item(prompt: Any, responses: Sequence[str], *, task: str, ranking_size: int, source: str,
              prompt_index: int, gold: GoldFn | None) -> dict[str, Any] | None:
    """The item for this prompt, or None when it has too few distinct non-empty responses."""
    chosen = distinct(responses)[:needed(task, ranking_size)]
    if len(chosen) < needed(task, ranking_size):
        return None
    item = {"kind": task, "prompt": prompt, "responses": chosen, "source": source, "prompt_index": prompt_index}
    if gold is not None:
        item["gold"] = [float(g) for g in gold([prompt] * len(chosen), chosen)]
    return item


def read_candidates(path: str | os.PathLike, tasks: Sequence[str], ranking_size: int,
                    gold: GoldFn | None = None) -> list[dict[str, Any]]:
    """Items from a JSON Lines / Parquet file of ``{"prompt": text or conversation, "responses": [text, ...]}``."""
    check_tasks(tasks, ranking_size)
    source = f"file:{os.path.abspath(path)}"
    items = []
    for index, (where, record) in enumerate(read_records(path)):
        if isinstance(record, DataError):
            raise record
        if not isinstance(record, dict):
            raise DataError(where, "<row>", "not_an_object", f"expected a JSON object, got {type(record).__name__}")
        prompt = row_to_dict(_prompt_row(record, where))["prompt"]
        responses = v.require(record, "responses", where)
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise DataError(where, "responses", "wrong_type", "expected a list of texts")
        task = tasks[index % len(tasks)]
        item = make_item(prompt, responses, task=task, ranking_size=ranking_size, source=source,
                         prompt_index=index, gold=gold)
        if item is None:
            raise DataError(where, "responses", "too_few", f"this row's task is {task}, which needs "
                            f"{needed(task, ranking_size)} distinct non-empty responses; it has {len(distinct(responses))}")
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no candidate rows")
    return items


def _prompt_row(record: dict, where: str):
    from rlhf_jax.data.formats import parse_row

    return parse_row({"prompt": v.require(record, "prompt", where)}, "prompt", where)


def read_prompts(spec: str) -> list[Any]:
    """Prompts (text or conversations) from a JSON Lines / Parquet file of ``{"prompt": ...}`` rows, or
    ``simulated:N`` for N prompts of the embedded default's simulated customer-support task."""
    if spec.startswith("simulated:"):
        from rlhf_jax.data import simulated

        n = spec.partition(":")[2]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--prompts {spec!r}: expected simulated:N with N >= 1")
        return [r["prompt"] for r in simulated.prompt_rows(int(n), 0, "train")]
    rows = load_rows(spec, "prompt")
    if not rows:
        raise ValueError(f"{spec}: no prompts")
    return [row_to_dict(r)["prompt"] for r in rows]


class PolicySampler:
    """Samples items from a policy checkpoint in a background thread, keeping ``ahead`` items open.

    Prompts are taken in order; a restarted server goes on after the last prompt stored for this
    policy (``Store.next_prompt_index``), and the responses of prompts ``[i, i + batch)`` are drawn
    under ``fold_in(key(seed), i)``, so a restart does not repeat or reshuffle anything.
    """

    def __init__(self, store: Store, policy: str, prompts: Sequence[Any], *, tasks: Sequence[str],
                 ranking_size: int, gold: GoldFn | None, ahead: int, seed: int, max_new_tokens: int,
                 temperature: float, top_p: float | None, batch_size: int, chat_template: str = "auto"):
        check_tasks(tasks, ranking_size)
        import jax

        from rlhf_jax import defaults, model_io
        from rlhf_jax.cli import ModelArgs, SampleArgs
        from rlhf_jax.data import encode_prompts
        from rlhf_jax.data.formats import parse_row

        self.store, self.prompts, self.tasks, self.ranking_size = store, list(prompts), list(tasks), ranking_size
        self.gold, self.ahead, self.seed, self.source = gold, ahead, seed, f"policy:{os.path.abspath(policy)}"
        self.cfg, self.params, self.tokenizer = model_io.load_lm(ModelArgs(path=policy, chat_template=chat_template))
        rows = [parse_row({"prompt": p}, "prompt", f"prompt {i}") for i, p in enumerate(self.prompts)]
        self._parsed = [r.prompt for r in rows]  # what the sampler encodes; items store the JSON form
        encoded = encode_prompts(rows, self.tokenizer, max_len=self.cfg.max_position_embeddings)
        longest = max(len(e.prompt_ids) for e in encoded)
        if longest + max_new_tokens > self.cfg.max_position_embeddings:
            raise ValueError(f"the longest prompt has {longest} tokens: with --max-new-tokens {max_new_tokens} that "
                             f"passes the model's {self.cfg.max_position_embeddings} positions")
        self.sample_args = SampleArgs(max_prompt_len=defaults.round_up(longest), max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, batch_size=batch_size)
        self.samples = 2 * max(needed(t, ranking_size) for t in self.tasks)
        self._key = jax.random.key(seed)
        self.skipped = 0
        self.done = False
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="policy-sampler", daemon=True)

    def start(self) -> PolicySampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def fill(self, index: int) -> int:
        """Sample one batch of prompts from ``index`` and store its items; the next prompt index."""
        import jax

        from rlhf_jax import sampling

        start = time.perf_counter()
        batch = self.prompts[index:index + self.sample_args.batch_size]
        parsed = self._parsed[index:index + self.sample_args.batch_size]
        texts, _ = sampling.sample(self.cfg, self.params, self.tokenizer, parsed, key=jax.random.fold_in(self._key, index),
                                   sample_args=self.sample_args, num_samples=self.samples)
        items = []
        for offset, (prompt, responses) in enumerate(zip(batch, texts)):
            task = self.tasks[(index + offset) % len(self.tasks)]
            item = make_item(prompt, responses, task=task, ranking_size=self.ranking_size, source=self.source,
                             prompt_index=index + offset, gold=self.gold)
            if item is None:
                self.skipped += 1
                print(f"[feedback] prompt {index + offset}: the policy gave fewer than {needed(task, self.ranking_size)} "
                      f"distinct non-empty responses in {self.samples} samples; no {task} item for it "
                      f"({self.skipped} prompts so far)", file=sys.stderr, flush=True)
            else:
                items.append(item)
        new = self.store.add_items(items)
        print(f"[feedback] sampled prompts {index}..{index + len(batch) - 1}: {new} new items "
              f"({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
        return index + len(batch)

    def _run(self) -> None:
        index = self.store.next_prompt_index(self.source)
        try:
            while not self._stop.is_set() and index < len(self.prompts):
                if self.store.open_items() >= self.ahead:
                    self._stop.wait(0.5)
                    continue
                index = self.fill(index)
            self.done = index >= len(self.prompts)
            if self.done:
                print(f"[feedback] all {len(self.prompts)} prompts sampled", file=sys.stderr, flush=True)
        except BaseException as e:  # noqa: BLE001 - reported on the admin page and stderr
            self.error = e
            print(f"[feedback] the policy sampler stopped: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def status(self) -> dict[str, Any]:
        return {"source": self.source, "prompts": len(self.prompts), "skipped_prompts": self.skipped,
                "done": self.done, "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}",
                "running": self._thread.is_alive()}


def wait_for_items(store: Store, sampler: PolicySampler | None, *, minimum: int = 1, timeout_s: float = 600) -> None:
    """Block until the store has ``minimum`` open items (or the sampler finished or failed)."""
    deadline = time.monotonic() + timeout_s
    while store.open_items() < minimum and sampler is not None and sampler.error is None and not sampler.done:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no items after {timeout_s:.0f} s of sampling")
        time.sleep(0.2)
