"""Hugging Face checkpoints in and out: ``config.json`` + safetensors (single file or sharded).

One table per family (``_tensor_table``) says which Hugging Face tensor becomes which of our leaves
and how (transpose of ``nn.Linear`` weights, reshape into heads, split of fused q/k/v). Loading and
saving both read that table, so the two directions cannot drift apart. Every tensor is checked:
a missing one, a wrong shape, or an extra tensor the model would not use is an error naming the
tensor, both shapes and the file; nothing is dropped silently.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.params import Params, param_specs

# Non-parameter buffers that old checkpoints carry (causal-mask and rotary caches).
_BUFFERS = re.compile(r"(^|\.)(attn|attention)\.(bias|masked_bias)$|rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One Hugging Face tensor and the leaves of ours it holds."""

    name: str  # "{i}" stands for the layer index
    shape: tuple[int, ...]  # shape in the checkpoint
    paths: tuple[str, ...]  # our leaves, e.g. "layers/attn/q/kernel" (per-layer slice for "{i}" names)
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def _reshape(name: str, path: str, hf_shape: tuple[int, ...], our_shape: tuple[int, ...]) -> _Tensor:
    return _Tensor(name, hf_shape, (path,), lambda w: (w.reshape(our_shape),), lambda a: a.reshape(hf_shape))


def _linear(name: str, path: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...], conv1d: bool = False) -> _Tensor:
    """torch ``nn.Linear`` weight (out, in) — or GPT-2 ``Conv1D`` weight (in, out) — <-> kernel (*in, *out)."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    if conv1d:
        return _Tensor(name, (n_in, n_out), (path,), lambda w: (w.reshape(*in_shape, *out_shape),),
                       lambda k: k.reshape(n_in, n_out))
    return _Tensor(name, (n_out, n_in), (path,), lambda w: (w.T.reshape(*in_shape, *out_shape),),
                   lambda k: k.reshape(n_in, n_out).T)


def _fused_qkv(name: str, paths: tuple[str, ...], hf_shape: tuple[int, ...], fused_shape: tuple[int, ...], axis: int,
               transpose: bool) -> _Tensor:
    """One tensor holding q, k and v: (transpose,) reshape to ``fused_shape`` and split ``axis`` (size 3)."""
    def to_ours(w):
        w = (w.T if transpose else w).reshape(fused_shape)
        return tuple(np.take(w, j, axis=axis) for j in range(3))

    def to_hf(*parts):
        w = np.stack(parts, axis=axis)
        return w.reshape(hf_shape[::-1]).T if transpose else w.reshape(hf_shape)

    return _Tensor(name, hf_shape, paths, to_ours, to_hf)


def _tensor_table(cfg: ModelConfig) -> list[_Tensor]:
    """Hugging Face tensors of ``cfg``'s family and their mapping onto ``param_specs(cfg)``."""
    D, H, K, E, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    qkv = ("layers/attn/q/kernel", "layers/attn/k/kernel", "layers/attn/v/kernel")
    qkv_bias = ("layers/attn/q/bias", "layers/attn/k/bias", "layers/attn/v/bias")
    t: list[_Tensor] = []

    def norm(hf: str, ours: str):
        t.append(_reshape(f"{hf}.weight", f"{ours}/scale", (D,), (D,)))
        if cfg.norm_type == "layer":
            t.append(_reshape(f"{hf}.bias", f"{ours}/bias", (D,), (D,)))

    def bias(hf: str, ours: str, shape: tuple[int, ...]):
        t.append(_reshape(f"{hf}.bias", f"{ours}/bias", (math.prod(shape),), shape))

    if cfg.model_type in ("llama", "qwen2"):
        b, L = "model.", "model.layers.{i}."
        t.append(_reshape(b + "embed_tokens.weight", "embed/embedding", (V, D), (V, D)))
        norm(b + "norm", "final_norm")
        norm(L + "input_layernorm", "layers/attn_norm")
        norm(L + "post_attention_layernorm", "layers/mlp_norm")
        for proj, heads in (("q", H), ("k", K), ("v", K)):
            t.append(_linear(f"{L}self_attn.{proj}_proj.weight", f"layers/attn/{proj}/kernel", (D,), (heads, E)))
            if cfg.qkv_bias:
                bias(f"{L}self_attn.{proj}_proj", f"layers/attn/{proj}", (heads, E))
        t.append(_linear(L + "self_attn.o_proj.weight", "layers/attn/o/kernel", (H, E), (D,)))
        if cfg.o_bias:
            bias(L + "self_attn.o_proj", "layers/attn/o", (D,))
        for proj, ours, n_in, n_out in (("gate", "gate", D, F), ("up", "up", D, F), ("down", "down", F, D)):
            t.append(_linear(f"{L}mlp.{proj}_proj.weight", f"layers/mlp/{ours}/kernel", (n_in,), (n_out,)))
            if cfg.mlp_bias:
                bias(f"{L}mlp.{proj}_proj", f"layers/mlp/{ours}", (n_out,))
    elif cfg.model_type == "gpt2":
        b, L = "transformer.", "transformer.h.{i}."
        t.append(_reshape(b + "wte.weight", "embed/embedding", (V, D), (V, D)))
        P = cfg.max_position_embeddings
        t.append(_reshape(b + "wpe.weight", "pos_embed/embedding", (P, D), (P, D)))
        norm(b + "ln_f", "final_norm")
        norm(L + "ln_1", "layers/attn_norm")
        norm(L + "ln_2", "layers/mlp_norm")
        # c_attn output columns are [q | k | v], each (heads, head_dim).
        t.append(_fused_qkv(L + "attn.c_attn.weight", qkv, (D, 3 * D), (D, 3, H, E), axis=1, transpose=False))
        t.append(_fused_qkv(L + "attn.c_attn.bias", qkv_bias, (3 * D,), (3, H, E), axis=0, transpose=False))
        t.append(_linear(L + "attn.c_proj.weight", "layers/attn/o/kernel", (H, E), (D,), conv1d=True))
        bias(L + "attn.c_proj", "layers/attn/o", (D,))
        t.append(_linear(L + "mlp.c_fc.weight", "layers/mlp/up/kernel", (D,), (F,), conv1d=True))
        bias(L + "mlp.c_fc", "layers/mlp/up", (F,))
        t.append(_linear(L + "mlp.c_proj.weight", "layers/mlp/down/kernel", (F,), (D,), conv1d=True))
        bias(L + "mlp.c_proj", "layers/mlp/down", (D,))
    else:  # gpt_neox
        b, L = "gpt_neox.", "gpt_neox.layers.{i}."
        t.append(_reshape(b + "embed_in.weight", "embed/embedding", (V, D), (V, D)))
        norm(b + "final_layer_norm", "final_norm")
        norm(L + "input_layernorm", "layers/attn_norm")
        norm(L + "post_attention_layernorm", "layers/mlp_norm")
        # query_key_value output rows are per head: [q | k | v] of head_dim each.
        t.append(_fused_qkv(L + "attention.query_key_value.weight", qkv, (3 * D, D), (D, H, 3, E), axis=2, transpose=True))
        if cfg.qkv_bias:
            t.append(_fused_qkv(L + "attention.query_key_value.bias", qkv_bias, (3 * D,), (H, 3, E), axis=1, transpose=False))
        t.append(_linear(L + "attention.dense.weight", "layers/attn/o/kernel", (H, E), (D,)))
        if cfg.o_bias:
            bias(L + "attention.dense", "layers/attn/o", (D,))
        t.append(_linear(L + "mlp.dense_h_to_4h.weight", "layers/mlp/up/kernel", (D,), (F,)))
        bias(L + "mlp.dense_h_to_4h", "layers/mlp/up", (F,))
        t.append(_linear(L + "mlp.dense_4h_to_h.weight", "layers/mlp/down/kernel", (F,), (D,)))
        bias(L + "mlp.dense_4h_to_h", "layers/mlp/down", (D,))
    if not cfg.tie_embeddings:
        t.append(_linear(_output_head_name(cfg), "lm_head/kernel", (D,), (V,)))
    return t


def _output_head_name(cfg: ModelConfig) -> str:
    return "embed_out.weight" if cfg.model_type == "gpt_neox" else "lm_head.weight"


def _names(t: _Tensor, cfg: ModelConfig) -> list[str]:
    return [t.name.format(i=i) for i in range(cfg.n_layers)] if "{i}" in t.name else [t.name]


# ----------------------------------------------------------------------------------------------
# Loading


def _weight_files(path: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> safetensors file, from ``model.safetensors`` or ``model.safetensors.index.json``."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if single.exists():
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                            f"(found {sorted(p.name for p in path.iterdir())})")


class _Reader:
    """Reads named tensors across (possibly sharded) safetensors files, checking their shapes."""

    def __init__(self, path: pathlib.Path, prefix: str):
        self.path, self.files, self.used = path, _weight_files(path), set()
        # Some GPT-2 checkpoints store "h.0.attn..." instead of "transformer.h.0.attn...".
        self.prefix = prefix if prefix and not any(n.startswith(prefix) for n in self.files) else ""

    def _stored(self, name: str) -> str:
        return name[len(self.prefix):] if self.prefix and name.startswith(self.prefix) else name

    def has(self, name: str) -> bool:
        return self._stored(name) in self.files

    def read(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        stored = self._stored(name)
        if stored not in self.files:
            raise ValueError(f"{self.path}: tensor {stored!r} (expected shape {shape}) is missing from the checkpoint "
                           f"({len(self.files)} tensors in {sorted({f.name for f in self.files.values()})})")
        file = self.files[stored]
        # framework="flax" reads bfloat16 too (the numpy reader does not); the array comes back to host here.
        with safe_open(file, framework="flax") as f:
            found = tuple(f.get_slice(stored).get_shape())
            if found != shape:
                raise ValueError(f"{file}: tensor {stored!r} has shape {found}, expected {shape} from config.json")
            self.used.add(stored)
            return np.asarray(f.get_tensor(stored)).astype(dtype)

    def unused(self) -> list[str]:
        return sorted(n for n in self.files if n not in self.used and not _BUFFERS.search(n))


def load_pretrained(path: str | pathlib.Path, dtype: Any = jnp.float32, **config_overrides) -> tuple[ModelConfig, Params]:
    """``(cfg, params)`` from a local Hugging Face directory (``config.json`` + safetensors), or from a
    GGUF file / a directory holding exactly one ``.gguf`` (``rlhf_jax.models.gguf``; dequantised).

    Parameters are converted to ``dtype`` (float32 or bfloat16 checkpoints both load);
    ``config_overrides`` replace ``ModelConfig`` fields (``compute_dtype=...``, ``remat=True``).
    """
    path = pathlib.Path(path)
    from rlhf_jax.models import gguf  # noqa: PLC0415 (gguf imports this module)

    gguf_path = gguf.find_gguf(path)
    if gguf_path is not None:
        return gguf.load_gguf(gguf_path, dtype=dtype, **config_overrides)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} does not exist")
    cfg = ModelConfig.from_hf_config(json.loads(config_file.read_text()), source=str(config_file), **config_overrides)
    np_dtype = np.dtype(jnp.dtype(dtype))
    reader = _Reader(path, prefix="transformer." if cfg.model_type == "gpt2" else "")
    return cfg, _params_from(cfg, reader, path, np_dtype)


def _params_from(cfg: ModelConfig, reader: Any, path: pathlib.Path, np_dtype: np.dtype) -> Params:
    """Our params tree from ``reader`` (``has(name)``, ``read(name, shape, dtype)``, ``unused()`` over
    Hugging Face tensor names) through the tensor table; every tensor is used or it is an error."""
    flat: dict[str, Any] = {}
    for t in _tensor_table(cfg):
        # one tensor (all its layers) at a time onto the device, its host copies dropped right away: the
        # load holds about one copy of the weights, not two
        parts = [t.to_ours(reader.read(name, t.shape, np_dtype)) for name in _names(t, cfg)]
        for j, leaf in enumerate(t.paths):
            flat[leaf] = jnp.asarray(np.stack([p[j] for p in parts]) if "{i}" in t.name else parts[0][j])
        del parts
    head = _output_head_name(cfg)
    if cfg.tie_embeddings and reader.has(head):
        # A tied checkpoint may still store the head; accept it only if it is the embedding.
        V, D = cfg.vocab_size, cfg.d_model
        if not np.array_equal(reader.read(head, (V, D), np_dtype), np.asarray(flat["embed/embedding"])):
            raise ValueError(f"{path}: config.json ties the embeddings but tensor {head!r} differs from the embedding")
    unused = reader.unused()
    if unused:
        raise ValueError(f"{path}: {len(unused)} tensors are not used by this {cfg.model_type} config "
                         f"(first: {unused[:5]}); refusing to drop them")
    _check_specs(cfg, flat)
    return traverse_util.unflatten_dict(flat, sep="/")


def _check_specs(cfg: ModelConfig, flat: dict[str, Any]) -> None:
    """The table must produce exactly the leaves and shapes of ``param_specs`` (guards the table itself)."""
    specs = param_specs(cfg)
    if set(flat) != set(specs):
        raise AssertionError(f"tensor table mismatch: {sorted(set(flat) ^ set(specs))}")
    for leaf, spec in specs.items():
        if tuple(flat[leaf].shape) != spec.shape:
            raise ValueError(f"parameter {leaf!r} has shape {tuple(flat[leaf].shape)}, expected {spec.shape}")


# ----------------------------------------------------------------------------------------------
# Saving


def save_pretrained(path: str | pathlib.Path, cfg: ModelConfig, params: Params, *,
                    fetch: Callable[[Any], np.ndarray] = np.asarray, write: bool = True) -> pathlib.Path:
    """Write ``config.json`` + ``model.safetensors`` (metadata ``{"format": "pt"}``) that
    ``transformers.AutoModelForCausalLM.from_pretrained(path)`` loads with the same logits.

    The file is streamed one tensor at a time (:func:`write_safetensors`): the host holds one leaf
    (all its layers) at a time, never a second copy of the model. ``fetch(leaf)`` brings one leaf to
    the host (default ``np.asarray``; ``checkpoint.export_hf`` gathers sharded leaves); a leaf may
    also be a :class:`Deferred` (computed when fetched: a LoRA merge). ``write=False`` fetches every
    leaf in the same order and writes nothing (the other processes of a multi-host export).
    """
    path = pathlib.Path(path)
    flat = traverse_util.flatten_dict(params, sep="/")
    _check_specs(cfg, flat)
    table = _tensor_table(cfg)
    dtype = np.dtype(flat["embed/embedding"].dtype)
    header = [(name, t.shape, np.dtype(flat[t.paths[0]].dtype)) for t in table for name in _names(t, cfg)]

    def tensors():
        for t in table:
            host = [fetch(leaf() if isinstance(leaf, Deferred) else leaf) for leaf in (flat[p] for p in t.paths)]
            for i, name in enumerate(_names(t, cfg)):
                yield name, t.to_hf(*[h[i] if "{i}" in t.name else h for h in host])
            del host

    if not write:
        for _ in tensors():
            pass
        return path
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_config(dtype=dtype), indent=2) + "\n")
    write_safetensors(path / "model.safetensors", header, tensors(), metadata={"format": "pt"})
    return path


@dataclasses.dataclass(frozen=True)
class Deferred:
    """A leaf computed only when :func:`save_pretrained` fetches it (``fn()``), with its shape and dtype
    known up front: the export holds one such array at a time instead of a whole computed tree."""

    fn: Callable[[], Any]
    shape: tuple[int, ...]
    dtype: Any

    def __call__(self) -> Any:
        return self.fn()


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
                       "int32": "I32", "int64": "I64", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(file: pathlib.Path, header: list[tuple[str, tuple[int, ...], np.dtype]],
                      tensors: Any, metadata: dict[str, str] | None = None) -> None:
    """Stream ``tensors`` (``(name, array)`` in ``header``'s order) into one safetensors file.

    The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header
    length, a JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"}``
    (padded with spaces to a multiple of 8), then the tensors' bytes, C order, in offset order.
    ``safetensors.numpy.save_file`` needs every array in memory at once; this needs one.
    """
    entries, offset = {}, 0
    for name, shape, dtype in header:
        if name in entries:
            raise ValueError(f"{file}: tensor {name!r} listed twice")
        size = math.prod(shape) * dtype.itemsize
        entries[name] = {"dtype": _SAFETENSORS_DTYPES[dtype.name], "shape": list(shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps({**({"__metadata__": metadata} if metadata else {}), **entries}, separators=(",", ":"))
    blob = blob.encode() + b" " * (-len(blob.encode()) % 8)
    tmp = file.with_name(file.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for (name, shape, dtype), (got, array) in zip(header, tensors, strict=True):
                array = np.ascontiguousarray(array)
                if got != name or tuple(array.shape) != tuple(shape) or array.dtype != dtype:
                    raise AssertionError(f"{file}: tensor {got!r} {array.shape} {array.dtype} arrived where the "
                                         f"header has {name!r} {tuple(shape)} {dtype}")
                f.write(array.reshape(-1).view(np.uint8).data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(file)  # a crash mid-write never leaves a truncated model.safetensors behind


def check_tokenizer(cfg: ModelConfig, tokenizer: Any, *, source: str = "tokenizer") -> None:
    """Raise before any compute if the tokenizer can emit ids the embedding does not have.

    Checks ``len(tokenizer)`` (added tokens included) and its bos/eos/pad ids against ``vocab_size``.
    A tokenizer smaller than the embedding is fine (vocabularies are often padded).
    """
    n = len(tokenizer)
    if n > cfg.vocab_size:
        raise ValueError(f"{source}: tokenizer has {n} tokens but the {cfg.model_type} model's embedding has "
                         f"{cfg.vocab_size} rows; ids >= {cfg.vocab_size} have no embedding (wrong tokenizer "
                         "for this checkpoint, or resize the embedding)")
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, field, None)
        if token_id is not None and not 0 <= token_id < cfg.vocab_size:
            raise ValueError(f"{source}: {field}={token_id} is outside the embedding's {cfg.vocab_size} rows")


def load_tokenizer(path: str | pathlib.Path) -> Any:
    """The tokenizer of a checkpoint ``load_pretrained`` reads: ``AutoTokenizer`` for a Hugging Face
    directory, the tokenizer in the metadata of a GGUF file / a directory holding one (``gguf.gguf_tokenizer``)."""
    from rlhf_jax.models import gguf  # noqa: PLC0415

    gguf_path = gguf.find_gguf(path)
    if gguf_path is not None:
        return gguf.gguf_tokenizer(gguf_path)
    import transformers  # noqa: PLC0415

    if _plain_fast_tokenizer(pathlib.Path(path)):  # what AutoTokenizer would build, without importing torch (seconds)
        return transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
    return transformers.AutoTokenizer.from_pretrained(str(path))


PLAIN_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
"""``tokenizer_class`` values for which ``AutoTokenizer`` builds the generic fast tokenizer (no model-specific
subclass): ``load_tokenizer`` builds it directly. Every other class goes through ``AutoTokenizer``."""


def _plain_fast_tokenizer(directory: pathlib.Path) -> bool:
    """``directory`` is local, has ``tokenizer.json`` and its ``tokenizer_config.json`` names a plain class."""
    config = directory / "tokenizer_config.json"
    if not (directory / "tokenizer.json").is_file() or not config.is_file():
        return False
    return json.loads(config.read_text()).get("tokenizer_class") in PLAIN_TOKENIZER_CLASSES
