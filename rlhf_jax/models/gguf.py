"""GGUF files (llama.cpp's format, how small real models ship) in: weights, config and tokenizer.

    cfg, params = models.load_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")  # or a dir holding one .gguf
    tokenizer = models.load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")      # PreTrainedTokenizerFast
    python -m rlhf_jax.models.convert model.gguf out_dir                     # -> a Hugging Face directory

A GGUF differs from a Hugging Face checkpoint in five ways; each is undone in one place here:

1. Names: ``blk.3.attn_q.weight`` is ``model.layers.3.self_attn.q_proj.weight`` (``_HF_NAMES``). The
   renamed tensors then go through ``hf_io``'s tensor table, so there is one mapping onto our params.
2. Storage: quantised blocks (Q4_1, Q8_0, K-quants, ...) are dequantised to float32 with
   ``gguf.quants.dequantize``; a type it cannot dequantise is an error naming type, tensor and file.
3. Rotary layout: llama.cpp's converter permutes the rows of Q and K of ``llama`` models so that
   each head's rotary pairs are adjacent (GPT-J style); ``_unpermute`` restores Hugging Face's
   rotate-half layout. ``qwen2`` runs NeoX-style rotary in llama.cpp and is stored unpermuted.
4. Config: ``{arch}.*`` metadata becomes a Hugging Face ``config.json`` dict (``hf_config``), read by
   ``ModelConfig.from_hf_config`` like any other checkpoint; no ``output.weight`` means tied embeddings.
5. Tokenizer: vocabulary, merges, token types and special ids are metadata (``tokenizer.ggml.*``);
   ``gguf_tokenizer`` builds a ``tokenizers`` byte-level BPE with llama.cpp's pre-tokenizer for
   ``tokenizer.ggml.pre`` and wraps it as a ``transformers.PreTrainedTokenizerFast`` with the chat template.

Needs the ``gguf`` package (``pip install gguf``), imported only when a GGUF file is opened.
"""
from __future__ import annotations

import pathlib
import re
import struct
from typing import Any

import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import hf_io
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.params import Params

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
"""``general.architecture`` values this loader maps onto rlhf_jax's model families."""

# llama.cpp tensor names -> Hugging Face names (llama / qwen2 share them).
_HF_NAMES = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_(q|k|v)\.(weight|bias)", r"model.layers.\1.self_attn.\2_proj.\3"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.(weight|bias)", r"model.layers.\1.mlp.\2_proj.\3"),
]
_HF_NAMES = [(re.compile(pattern + "$"), repl) for pattern, repl in _HF_NAMES]


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor (``None``: no counterpart in our families)."""
    for pattern, repl in _HF_NAMES:
        if pattern.match(gguf_name):
            return pattern.sub(repl, gguf_name)
    return None


# ----------------------------------------------------------------------------------------------
# Files and metadata


def find_gguf(path: str | pathlib.Path) -> pathlib.Path | None:
    """The GGUF file ``path`` names: ``path`` itself if it is a ``.gguf`` file, the one ``.gguf`` in a
    directory without safetensors, or ``None`` for a directory without any (a Hugging Face directory).

    A directory with several ``.gguf`` files, or with both a ``.gguf`` and safetensors, is an error
    listing them: which one is meant cannot be guessed.
    """
    path = pathlib.Path(path)
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix == ".gguf" and p.is_file())
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"{path}: holds {len(found)} .gguf files ({', '.join(p.name for p in found)}); "
                         "pass the file to load")
    weights = sorted(p.name for p in path.iterdir() if p.name.endswith((".safetensors", ".safetensors.index.json")))
    if weights:
        raise ValueError(f"{path}: holds both {found[0].name} and safetensors weights ({', '.join(weights)}); "
                         "pass the .gguf file, or move it out to load the safetensors")
    return found[0]


def _reader(path: pathlib.Path):
    try:
        import gguf  # noqa: PLC0415 (optional dependency)
    except ImportError as e:
        raise ImportError(f"{path}: reading GGUF files needs the `gguf` package (pip install gguf)") from e
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, struct.error) as e:  # bad magic, unknown version, truncated file
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def _field_value(field) -> Any:
    """A metadata field as a Python value (strings decoded, arrays as lists)."""
    from gguf import GGUFValueType  # noqa: PLC0415

    types = field.types
    if types[0] == GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if len(types) > 1 and types[1] == GGUFValueType.ARRAY:
            raise ValueError(f"nested array metadata is not supported (field {field.name!r})")
        return [v.item() for i in field.data for v in field.parts[i]]
    if types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    value = field.parts[field.data[0]][0]
    return bool(value) if types[0] == GGUFValueType.BOOL else value.item()


def _metadata_of(reader) -> dict[str, Any]:
    return {name: _field_value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")}


_HEADERS: dict[tuple[str, int, int], tuple[dict[str, Any], tuple[str, ...]]] = {}
_MAX_HEADERS = 4


def _file_key(path: pathlib.Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _header(path: pathlib.Path, reader=None) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``(metadata, tensor names)``, cached per file (path, size, mtime); ``reader``: an open one to use."""
    key = _file_key(path)
    if key not in _HEADERS:
        reader = reader if reader is not None else _reader(path)
        if len(_HEADERS) >= _MAX_HEADERS:
            _HEADERS.pop(next(iter(_HEADERS)))
        _HEADERS[key] = _metadata_of(reader), tuple(t.name for t in reader.tensors)
    return _HEADERS[key]


def metadata(path: str | pathlib.Path) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (``general.*``, ``{arch}.*``, ``tokenizer.*``) as Python values.

    Opening a GGUF parses its whole header (~5 s for SmolLM2's 49k-token vocabulary on a loaded 2-core
    CPU), so the result is cached per file (path, size, mtime): ``load_pretrained`` then
    ``load_tokenizer`` on one file parse it once.
    """
    return dict(_header(pathlib.Path(path))[0])


# ----------------------------------------------------------------------------------------------
# Config


def hf_config(meta: dict[str, Any], tensor_names: tuple[str, ...] | list[str], *, source: str) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict a GGUF file describes (``meta``: its metadata)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{source}: GGUF architecture {arch!r} (general.architecture) is not supported; "
                         f"supported: {SUPPORTED_ARCHITECTURES}")

    def get(key: str, default: Any = None, required: bool = False):
        full = f"{arch}.{key}"
        if required and full not in meta:
            raise ValueError(f"{source}: metadata field {full!r} is required for architecture {arch!r}")
        return meta.get(full, default)

    names = set(tensor_names)
    if "rope_freqs.weight" in names:
        raise ValueError(f"{source}: tensor 'rope_freqs.weight' (llama3-style rope frequency factors) is not supported")
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ValueError(f"{source}: rope scaling {scaling!r} ({arch}.rope.scaling.type) is not supported; "
                         "supported: none, linear")
    hidden, heads = get("embedding_length", required=True), get("attention.head_count", required=True)
    kv_heads = get("attention.head_count_kv", heads)
    for key, value in (("attention.head_count", heads), ("attention.head_count_kv", kv_heads)):
        if not isinstance(value, int):  # per-layer lists (hybrid models)
            raise ValueError(f"{source}: {arch}.{key}={value!r} varies per layer; only one value is supported")
    head_dim = get("attention.key_length", hidden // heads)
    if get("attention.value_length", head_dim) != head_dim:
        raise ValueError(f"{source}: {arch}.attention.value_length={get('attention.value_length')} differs from "
                         f"key_length={head_dim}; not supported")
    rotary = get("rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise ValueError(f"{source}: {arch}.rope.dimension_count={rotary} != head_dim {head_dim} (partial rotary) "
                         f"is not supported for {arch!r}")
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ()) or None
    if vocab is None:
        raise ValueError(f"{source}: no {arch}.vocab_size and no tokenizer.ggml.tokens: vocabulary size unknown")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0))}
    if scaling == "linear":
        rope = {"rope_type": "linear", "rope_theta": rope["rope_theta"], "factor": float(get("rope.scaling.factor", 1.0))}
    config: dict[str, Any] = {
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count", required=True),
        "intermediate_size": get("feed_forward_length", required=True),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6 if arch == "qwen2" else 1e-5)),
        "max_position_embeddings": get("context_length", 2048 if arch == "llama" else 32768),
        "rope_parameters": rope,
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    if head_dim != hidden // heads:
        config["head_dim"] = head_dim
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
        config["mlp_bias"] = "blk.0.ffn_up.bias" in names
    else:
        config["use_sliding_window"] = False
    return config


# ----------------------------------------------------------------------------------------------
# Weights


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of Q/K rows (``convert_hf_to_gguf.py``: ``reshape(n_head, 2, rows //
    n_head // 2, ...).swapaxes(1, 2)``): within each head, rows ``0, half, 1, half + 1, ...`` go back to
    ``0, 1, ..., half - 1 | half, ...``, the rotate-half layout of Hugging Face's Llama."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _GGUFTensors:
    """``hf_io``'s reader interface over a GGUF file's tensors, under their Hugging Face names."""

    def __init__(self, path: pathlib.Path, reader, cfg: ModelConfig):
        self.path, self.cfg, self.used = path, cfg, set()
        self.tensors = {t.name: t for t in reader.tensors}
        self.by_hf = {hf_name(n): n for n in self.tensors if hf_name(n) is not None}

    def has(self, name: str) -> bool:
        return name in self.by_hf

    def read(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        from gguf import GGMLQuantizationType, quants  # noqa: PLC0415

        if name not in self.by_hf:
            raise ValueError(f"{self.path}: the GGUF file has no tensor for {name!r} (expected shape {shape}; "
                             f"{len(self.tensors)} tensors, e.g. {sorted(self.tensors)[:4]})")
        gguf_name = self.by_hf[name]
        t = self.tensors[gguf_name]
        qtype = GGMLQuantizationType(t.tensor_type)
        try:
            w = quants.dequantize(t.data, qtype)
        except NotImplementedError as e:
            raise ValueError(f"{self.path}: tensor {gguf_name!r} has GGML type {qtype.name}, which gguf "
                             f"{_gguf_version()} cannot dequantise ({e})") from None
        found = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml lists the fastest axis first
        if found != shape:
            raise ValueError(f"{self.path}: tensor {gguf_name!r} has shape {found}, expected {shape} from the metadata")
        w = np.asarray(w, dtype=np.float32).reshape(found)
        if self.cfg.model_type == "llama" and re.search(r"\.self_attn\.(q|k)_proj\.", name):
            w = _unpermute(w, self.cfg.n_heads if ".q_proj." in name else self.cfg.n_kv_heads)
        self.used.add(gguf_name)
        return w.astype(dtype)

    def unused(self) -> list[str]:
        return sorted(n for n in self.tensors if n not in self.used)


def _gguf_version() -> str:
    from importlib.metadata import version  # noqa: PLC0415

    return version("gguf")


def load_gguf(path: str | pathlib.Path, dtype: Any = jnp.float32, **config_overrides) -> tuple[ModelConfig, Params]:
    """``(cfg, params)`` from a GGUF file (``models.load_pretrained`` calls this for ``.gguf`` paths).

    Every tensor is dequantised to float32 and then cast to ``dtype``; a tensor the model does not
    use (e.g. a family feature we lack) is an error naming it, never dropped.
    """
    path = pathlib.Path(path)
    reader = _reader(path)
    meta, names = _header(path, reader)
    cfg = ModelConfig.from_hf_config(hf_config(meta, names, source=str(path)), source=str(path), **config_overrides)
    params = hf_io._params_from(cfg, _GGUFTensors(path, reader, cfg), path, np.dtype(jnp.dtype(dtype)))
    return cfg, params


# ----------------------------------------------------------------------------------------------
# Tokenizer

# Pre-tokenizer splits of llama.cpp (llama-vocab.cpp) by ``tokenizer.ggml.pre``, as regexes of the
# reference tokenizers. "gpt2": GPT-2's own regex (``ByteLevel(use_regex=True)``); "digits+gpt2":
# every digit on its own first (StarCoder / SmolLM: llama.cpp splits on ``\p{N}``, then GPT-2's regex).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    "default": "gpt2", "gpt2": "gpt2", "mpt": "gpt2", "olmo": "gpt2",
    "smollm": "digits+gpt2", "starcoder": "digits+gpt2", "refact": "digits+gpt2",
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "stablelm2": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte)


def _pre_tokenizer(pre: str, add_prefix_space: bool, source: str):
    from tokenizers import Regex, pre_tokenizers  # noqa: PLC0415

    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"{source}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                         f"supported: {sorted(_PRE_TOKENIZERS)}")
    split = _PRE_TOKENIZERS[pre]
    if split == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    if split == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False)])


def gguf_tokenizer(path: str | pathlib.Path):
    """The tokenizer a GGUF file describes, as a ``transformers.PreTrainedTokenizerFast``.

    Byte-level BPE (``tokenizer.ggml.model == "gpt2"``: GPT-2, Llama 3, Qwen2, SmolLM): vocabulary
    ``tokenizer.ggml.tokens``, merges ``tokenizer.ggml.merges``, the split of ``tokenizer.ggml.pre``;
    tokens typed *control* become special tokens, *user-defined* ones added tokens (both matched whole);
    bos/eos/unk/pad from ``tokenizer.ggml.*_token_id``, ``add_bos_token`` / ``add_eos_token`` from the
    flags, the chat template from ``tokenizer.chat_template``. SentencePiece vocabularies
    (``tokenizer.ggml.model == "llama"``) are not supported yet: an error says so.
    """
    import transformers  # noqa: PLC0415
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors  # noqa: PLC0415

    path = pathlib.Path(path)
    source = str(path)
    meta = metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{source}: tokenizer model {kind!r} (tokenizer.ggml.model) is not supported; supported: "
                         "'gpt2' (byte-level BPE)")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    merges: list[str] = meta.get("tokenizer.ggml.merges") or []
    if not tokens:
        raise ValueError(f"{source}: no vocabulary (tokenizer.ggml.tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries, tokenizer.ggml.tokens "
                         f"{len(tokens)}")
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token in vocab:
            raise ValueError(f"{source}: token {token!r} appears twice in tokenizer.ggml.tokens (ids {vocab[token]} "
                             f"and {i}); the vocabulary is ambiguous")
        vocab[token] = i
    pairs = []
    for i, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{source}: tokenizer.ggml.merges[{i}] = {merge!r} is not two tokens separated by a space")
        pairs.append((parts[0], parts[1]))

    backend = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    add_prefix_space = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    backend.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), add_prefix_space, source)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == _USER_DEFINED])

    def token(field: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{field}")
        if token_id is None:
            return None
        if not 0 <= token_id < len(tokens):
            raise ValueError(f"{source}: tokenizer.ggml.{field}={token_id} is outside the {len(tokens)}-token vocabulary")
        return tokens[token_id]

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
    pair = single + " " + " ".join([f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
    specials = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    kwargs = dict(bos_token=bos, eos_token=eos, unk_token=token("unknown_token_id"), pad_token=token("padding_token_id"),
                  add_bos_token=add_bos, add_eos_token=add_eos, clean_up_tokenization_spaces=False)
    context = meta.get(f"{meta.get('general.architecture')}.context_length")
    if context:
        kwargs["model_max_length"] = int(context)
    if meta.get("tokenizer.chat_template"):
        kwargs["chat_template"] = meta["tokenizer.chat_template"]
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **{k: v for k, v in kwargs.items()
                                                                           if v is not None})
