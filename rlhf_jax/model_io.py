"""Language models and reward models on disk: load (Hugging Face folder, GGUF, the embedded default),
export in Hugging Face layout, and the reward model's extra head file."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import checkpoint, memory, models
from rlhf_jax.cli import DTYPES, ModelArgs


def embedded_model_dir() -> pathlib.Path:
    """The embedded default's tokenizer + tiny Llama config (built once, cached)."""
    from rlhf_jax.data import embedded

    return embedded.embedded_dir()


def load_lm(args: ModelArgs, key: jax.Array | None = None, *, init: bool = True) -> tuple[models.ModelConfig, Any, Any]:
    """``(cfg, params, tokenizer)`` from ``args.path``, or a randomly initialised embedded model (``params`` is
    None when ``init`` is False: a caller that initialises straight into its shards skips the host copy)."""
    overrides = dict(compute_dtype=DTYPES[args.compute_dtype], remat=args.remat, logits_chunk=args.logits_chunk)
    if args.path is None:
        path = embedded_model_dir()
        cfg = models.ModelConfig.from_hf_config(json.loads((path / "config.json").read_text()))
        cfg = dataclasses.replace(cfg, **overrides)
        params = (models.init_params(cfg, key if key is not None else jax.random.key(0), dtype=DTYPES[args.dtype])
                  if init else None)
    else:
        path = pathlib.Path(args.path)
        cfg, params = models.load_pretrained(path, dtype=DTYPES[args.dtype])
        cfg = dataclasses.replace(cfg, **overrides)
    tokenizer = models.load_tokenizer(path)  # an HF directory, a .gguf file or a directory holding one
    models.check_tokenizer(cfg, tokenizer, source=str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    from rlhf_jax.data import chat

    setattr(tokenizer, chat.TOKENIZER_ATTRIBUTE, args.chat_template)  # every encoding of this run agrees
    memory.release_freed_host_memory()  # the loader's host copies are gone: give their pages back
    return cfg, params, tokenizer


def eos_ids(cfg: models.ModelConfig, tokenizer: Any) -> tuple[int, ...]:
    ids = set(cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def export_lm(path: pathlib.Path, cfg: models.ModelConfig, params: Any, tokenizer: Any) -> pathlib.Path:
    """The policy in Hugging Face layout (weights + config + tokenizer): loads in transformers."""
    checkpoint.export_hf(path, cfg, params)
    if jax.process_index() == 0:
        tokenizer.save_pretrained(str(path))
    return path


REWARD_HEAD_FILE = "reward_head.safetensors"


def save_reward_model(path: pathlib.Path, cfg: models.ModelConfig, rm_params: Any, tokenizer: Any) -> pathlib.Path:
    """Backbone in Hugging Face layout plus ``reward_head.safetensors`` (kernel (D,), bias ())."""
    from safetensors.numpy import save_file

    export_lm(path, cfg, rm_params["backbone"], tokenizer)
    head = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), rm_params["head"])
    if jax.process_index() == 0:
        save_file({"kernel": head["kernel"], "bias": np.reshape(head["bias"], (1,))}, str(path / REWARD_HEAD_FILE))
    return path


def load_reward_model(path: str | os.PathLike, args: ModelArgs = ModelArgs()) -> tuple[models.ModelConfig, Any, Any]:
    """``(cfg, {"backbone", "head"}, tokenizer)`` written by :func:`save_reward_model`."""
    from safetensors.numpy import load_file

    path = pathlib.Path(path)
    head_file = path / REWARD_HEAD_FILE
    if not head_file.exists():
        raise FileNotFoundError(f"{path} has no {REWARD_HEAD_FILE}: not a reward model written by experiments/reward_model.py")
    cfg, backbone, tokenizer = load_lm(dataclasses.replace(args, path=str(path)))
    head = load_file(str(head_file))
    return cfg, {"backbone": backbone, "head": {"kernel": jnp.asarray(head["kernel"]),
                                                "bias": jnp.asarray(head["bias"][0])}}, tokenizer


def fold_normalization(head: Any, gain: float, bias: float) -> Any:
    """Head whose scores are ``gain · score + bias`` (lm-human-preferences' reward gain and bias)."""
    return {"kernel": head["kernel"] * gain, "bias": head["bias"] * gain + bias}
