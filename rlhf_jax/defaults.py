"""Defaults that fit the model: one table for the embedded toy, one for pretrained checkpoints.

A script's config leaves the fields whose right value depends on the model at ``None`` ("auto").
After loading the model and the data, the script calls :func:`resolve`, which fills each ``None``
field from :data:`EMBEDDED` when the model *is* the embedded default's tiny Llama (same
architecture), and from :data:`PRETRAINED` (or from the data: lengths, rollout sizes) for any other
checkpoint, and prints every value it chose and why. A value given on the command line is never
replaced. So the toy's learning rate of 2e-3 can no longer silently reach a real model (on
SmolLM2-135M-Instruct it raised held-out perplexity from 6.3 to 19.0 in four steps).

    cfg = defaults.resolve(cfg, "sft", kind=defaults.model_kind(model_cfg), facts={"longest": 117})

Pretrained learning rates follow TRL's trainer defaults (SFT 2e-5, reward 1e-5, DPO 1e-6, PPO 3e-6),
halved for SFT because small instruct models forget their chat behaviour fast.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Literal, Mapping, Sequence

Kind = Literal["embedded", "pretrained"]

# A rule is a value, or a function of the data facts returning (value, why).
Rule = Any | Callable[[Mapping[str, Any]], tuple[Any, str]]


def round_up(n: int, multiple: int = 16) -> int:
    return -(-int(n) // multiple) * multiple


def _length_from(fact: str, *, cap: str = "max_positions") -> Callable[[Mapping[str, Any]], tuple[int, str]]:
    """The longest sequence of the data (a fact the script measured), rounded up to a multiple of 16."""

    def rule(facts: Mapping[str, Any]) -> tuple[int, str]:
        longest = int(facts[fact])
        value = round_up(longest)
        if "max_positions" in facts:
            value = min(value, int(facts[cap]))
        return value, f"longest {fact.removeprefix('longest_').replace('_', ' ')} in the data: {longest} tokens"

    return rule


def _fit_prompts(default: int, fact: str = "num_prompts") -> Callable[[Mapping[str, Any]], tuple[int, str]]:
    def rule(facts: Mapping[str, Any]) -> tuple[int, str]:
        n = int(facts[fact])
        if n >= default:
            return default, f"{n} {fact.replace('num_', '')} available"
        return n, f"only {n} {fact.replace('num_', '')} in the data (default {default})"

    return rule


EMBEDDED: dict[str, dict[str, Rule]] = {
    "sft": {"optim.learning_rate": 2e-3, "max_len": 96, "sample.max_prompt_len": 48, "sample.max_new_tokens": 48},
    "rm": {"optim.learning_rate": 3e-4, "max_len": 96, "sample.max_prompt_len": 48, "sample.max_new_tokens": 48},
    "dpo": {"optim.learning_rate": 3e-5, "max_len": 96, "sample.max_prompt_len": 48, "sample.max_new_tokens": 48},
    "ppo": {"optim.learning_rate": 3e-5, "sample.max_prompt_len": 48, "sample.max_new_tokens": 48,
            "rollout_prompts": 64, "sample.batch_size": 64},
    "best_of_n": {"sample.max_prompt_len": 48, "sample.max_new_tokens": 48},
}
"""The embedded default's values (tuned on the toy; the README's results table was measured with them)."""

_SAMPLING = {"sample.max_prompt_len": _length_from("longest_prompt"),
             "sample.max_new_tokens": 256}  # SmolLM2-135M-Instruct's replies run 64-200 tokens

PRETRAINED: dict[str, dict[str, Rule]] = {
    "sft": {"optim.learning_rate": 1e-5, "max_len": _length_from("longest_example"), **_SAMPLING},
    "rm": {"optim.learning_rate": 1e-5, "max_len": _length_from("longest_example"), **_SAMPLING},
    "dpo": {"optim.learning_rate": 1e-6, "max_len": _length_from("longest_example"), **_SAMPLING},
    "ppo": {"optim.learning_rate": 3e-6, **_SAMPLING, "rollout_prompts": _fit_prompts(64),
            "sample.batch_size": _fit_prompts(64)},
    "best_of_n": dict(_SAMPLING),
}
"""Values for any other checkpoint; functions derive a value from facts about the data."""


def embedded_model_config() -> dict[str, Any]:
    """The architecture fields of the embedded default's tiny Llama (from its cached config.json)."""
    from rlhf_jax import models
    from rlhf_jax.data import embedded

    cfg = models.ModelConfig.from_hf_config(json.loads((embedded.embedded_dir() / "config.json").read_text()))
    return _architecture(cfg)


def _architecture(cfg: Any) -> dict[str, Any]:
    skip = {"compute_dtype", "scan_layers", "remat", "logits_chunk"}
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in skip}


def model_kind(model_cfg: Any) -> Kind:
    """"embedded" when ``model_cfg`` is the embedded default's architecture (however trained), else "pretrained"."""
    return "embedded" if _architecture(model_cfg) == embedded_model_config() else "pretrained"


def get_path(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def replace_path(cfg: Any, path: str, value: Any) -> Any:
    head, _, rest = path.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: replace_path(getattr(cfg, head), rest, value)})


def unresolved(cfg: Any, stage: str) -> list[str]:
    """The auto (None) fields of ``cfg`` that :func:`resolve` fills for ``stage``."""
    return [p for p in EMBEDDED[stage] if get_path(cfg, p) is None]


def resolve(cfg: Any, stage: str, *, kind: Kind, facts: Mapping[str, Any] | None = None,
            printer: Callable[[str], None] | None = print) -> Any:
    """``cfg`` with every auto (None) field of ``stage``'s table filled for a model of ``kind``.

    Prints one line listing the values chosen (and what they came from) unless nothing was auto.
    Raises if a rule needs a fact the script did not measure, naming both.
    """
    table = (EMBEDDED if kind == "embedded" else PRETRAINED)[stage]
    facts = dict(facts or {})
    chosen = []
    for path in unresolved(cfg, stage):
        rule = table[path]
        why = "embedded default" if kind == "embedded" else "pretrained default"
        if callable(rule):
            try:
                value, why = rule(facts)
            except KeyError as missing:
                raise KeyError(f"[{stage}] the default of {path} needs the data fact {missing} (known: {sorted(facts)})")
        else:
            value = rule
        cfg = replace_path(cfg, path, value)
        chosen.append(f"{path}={value} ({why})")
    if chosen and printer is not None and kind == "pretrained":
        printer(f"[{stage}] defaults for a pretrained model (pass a flag to change one): " + "; ".join(chosen))
    return cfg


def data_facts(examples: Sequence[Any] = (), model_cfg: Any = None, *, prompts: Sequence[Any] = (),
               num_prompts: int | None = None) -> dict[str, int]:
    """The facts the tables' rules read, measured on ``rlhf_jax.data.Encoded`` lists encoded without
    truncation (``max_len`` = the model's positions): ``longest_example`` (prompt + longest
    completion over ``examples``), ``longest_prompt`` (over ``examples`` and ``prompts``),
    ``num_prompts`` and ``max_positions``."""
    facts: dict[str, int] = {}
    if examples:
        facts["longest_example"] = max(e.length for e in examples)
    every = list(examples) + list(prompts)
    if every:
        facts["longest_prompt"] = max(len(e.prompt_ids) for e in every)
    if num_prompts is not None:
        facts["num_prompts"] = int(num_prompts)
    if model_cfg is not None:
        facts["max_positions"] = int(model_cfg.max_position_embeddings)
    return facts
