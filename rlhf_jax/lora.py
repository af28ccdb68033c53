"""LoRA: low-rank adapters on the decoder's projections (Hu et al. 2021), as a pytree of their own.

    lora_cfg = LoraConfig(rank=8, alpha=16, targets=("q", "k", "v", "o"))
    adapters = init_adapters(model_cfg, lora_cfg, key)        # {"layers": {"attn": {"q": {"a", "b"}, ...}}}
    params = attach(base, adapters, lora_cfg)                 # the base with the adapters beside its kernels
    logits_BTV = models.forward(model_cfg, params, ids_BT, mask_BT)
    merged = merge(base, adapters, lora_cfg)                  # kernels W + (α/r)·A·B, for export / fast decoding
    save_peft("out/peft", model_cfg, lora_cfg, adapters)      # peft.PeftModel.from_pretrained loads it

A targeted projection ``y = x·W (+ b)`` with kernel ``W`` of shape (*in, *out) becomes

    y = x·W + (α/r) · (dropout(x)·A)·B  (+ b),      A: (*in, r),  B: (r, *out)

computed as two thin matmuls next to the frozen one (``models.decoder._dense``): no merged matrix is
materialised in a training step, and gradients reach only A and B. A ~ U(−1/√fan_in, 1/√fan_in)
(PEFT's default, kaiming-uniform with a = √5) and B = 0, so a fresh adapter leaves the model unchanged.
The scale α/r is folded into B when attached (``lora_b = (α/r)·B``), so the model code needs no config.

Adapters are stacked over layers like the base (``(L, *in, r)`` / ``(L, r, *out)``) and carry logical
axes (:func:`adapter_logical_axes`: the base kernel's axes plus ``"lora_rank"``, replicated), so they
shard with the same rule table as the weights they adapt.

In the train state (:func:`view`), the trainable params hold the adapters where the LM would be, and
``frozen[BASE]`` holds the base once; it is also the reference (the base with the adapter off) for
DPO and PPO, so no second copy of the weights exists.

Why not a library: qwix (Google's quantisation/LoRA library for JAX) rewrites Flax modules'
``nn.Dense``/``einsum`` calls through interception of module methods; this model is a plain function
of a parameter dict with no modules to intercept, and peft is PyTorch-only. The adapter math is two
matmuls; what matters (PEFT's file format, its initialisation, its scale α/r, merging) is reproduced
here and checked against peft itself in ``tests/test_lora.py``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.hf_io import Deferred
from rlhf_jax.models.params import Params, ParamSpec, param_specs

TARGETS: dict[str, str] = {"q": "attn/q", "k": "attn/k", "v": "attn/v", "o": "attn/o",
                           "gate": "mlp/gate", "up": "mlp/up", "down": "mlp/down"}
"""``--lora.targets`` names -> the projection (``layers/<path>/kernel``) they adapt."""

TARGET_GROUPS: dict[str, tuple[str, ...]] = {"attention": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down"),
                                              "all": tuple(TARGETS)}
"""Shorthands accepted in ``--lora.targets`` (projections a family lacks, e.g. GPT-2's gate, are skipped
for a group and an error when named one by one)."""

BASE = "lora_base"
"""Key of the frozen base LM in ``TrainState.frozen`` when adapters train."""

PEFT_NAMES: dict[str, str] = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                              "down": "mlp.down_proj"}
"""Module names of the Llama / Qwen2 families in transformers (PEFT's ``target_modules``)."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (``--lora.rank 8`` turns them on)."""

    rank: int = 0
    """Rank r of each adapter; 0 trains every parameter instead (full fine-tuning)."""
    alpha: float = 16.0
    """Scale numerator: the update is (alpha / rank)·A·B (PEFT's lora_alpha)."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training steps (PEFT's lora_dropout); off in evaluation."""
    targets: tuple[str, ...] = ("attention",)
    """Projections to adapt: q k v o gate up down, or the groups attention / mlp / all."""
    seed: int = 0
    """Seed of A's initialisation and of the dropout masks."""
    load: str | None = None
    """A PEFT LoRA directory (ours or peft's save_pretrained) to continue training; its rank, alpha and
    targets are used (the scripts: rlhf_jax.trainable.Trainable.create)."""

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"--lora.rank must be >= 0, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS and t not in TARGET_GROUPS]
        if unknown:
            raise ValueError(f"--lora.targets: unknown {unknown}; choose from {list(TARGETS)} or {list(TARGET_GROUPS)}")
        if self.rank and not self.targets:
            raise ValueError("--lora.targets is empty")

    @property
    def enabled(self) -> bool:
        return self.rank > 0 or bool(self.load)

    @property
    def scale(self) -> float:
        """α / r."""
        return self.alpha / self.rank


def target_names(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> tuple[str, ...]:
    """The projections adapted in this model, in ``TARGETS`` order."""
    kernels = param_specs(model_cfg)
    names: list[str] = []
    for t in lora_cfg.targets:
        if t in TARGET_GROUPS:
            names += [n for n in TARGET_GROUPS[t] if f"layers/{TARGETS[n]}/kernel" in kernels]
        elif f"layers/{TARGETS[t]}/kernel" not in kernels:
            raise ValueError(f"--lora.targets {t}: a {model_cfg.model_type} model has no {TARGETS[t]} projection")
        else:
            names.append(t)
    return tuple(n for n in TARGETS if n in names)


def _n_in(name: str) -> int:
    """Input dims of the kernel: o's kernel is (H, E, D), the others (D or F, *out)."""
    return 2 if name == "o" else 1


def adapter_specs(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> dict[str, ParamSpec]:
    """``"layers/attn/q/a" -> ParamSpec`` for every adapter matrix: A (L, *in, r), B (L, r, *out)."""
    kernels = param_specs(model_cfg)
    r = lora_cfg.rank
    specs = {}
    for name in target_names(model_cfg, lora_cfg):
        k = kernels[f"layers/{TARGETS[name]}/kernel"]
        n = 1 + _n_in(name)  # the layers axis, then the input dims
        specs[f"layers/{TARGETS[name]}/a"] = ParamSpec((*k.shape[:n], r), (*k.axes[:n], "lora_rank"), "uniform")
        specs[f"layers/{TARGETS[name]}/b"] = ParamSpec((k.shape[0], r, *k.shape[n:]), (k.axes[0], "lora_rank", *k.axes[n:]),
                                                       "zeros")
    return specs


def init_adapters(model_cfg: ModelConfig, lora_cfg: LoraConfig, key: jax.Array | None = None,
                  dtype: Any = jnp.float32) -> Params:
    """Fresh adapters: A ~ U(−1/√fan_in, 1/√fan_in), B = 0 (PEFT's ``init_lora_weights=True``)."""
    if not lora_cfg.enabled:
        raise ValueError("init_adapters: LoraConfig.rank is 0 (LoRA off)")
    key = jax.random.key(lora_cfg.seed) if key is None else key
    specs = adapter_specs(model_cfg, lora_cfg)
    leaves = {}
    for i, (path, spec) in enumerate(specs.items()):
        if spec.init == "zeros":
            leaves[path] = jnp.zeros(spec.shape, dtype)
        else:
            fan_in = math.prod(spec.shape[1:-1])
            bound = 1.0 / math.sqrt(fan_in)
            leaves[path] = jax.random.uniform(jax.random.fold_in(key, i), spec.shape, dtype, -bound, bound)
    return traverse_util.unflatten_dict(leaves, sep="/")


def adapter_logical_axes(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> Params:
    """Same tree as :func:`init_adapters`; leaves are logical axis names (``"lora_rank"`` on r)."""
    return traverse_util.unflatten_dict({p: s.axes for p, s in adapter_specs(model_cfg, lora_cfg).items()}, sep="/")


def _adapted(adapters: Params):
    """``(group, name, {"a", "b"})`` for every adapted projection (``("attn", "q", ...)``)."""
    for group, projections in adapters["layers"].items():
        for name, ab in projections.items():
            yield group, name, ab


def attach(base: Params, adapters: Params, lora_cfg: LoraConfig, dropout_key: jax.Array | None = None) -> Params:
    """``base`` with ``lora_a`` = A and ``lora_b`` = (α/r)·B beside each adapted kernel (no copy of the
    base's arrays: the dicts are new, the leaves shared). With ``dropout_key`` and ``lora_cfg.dropout``,
    also per-layer dropout keys and the keep probability, which ``_dense`` applies to the adapter's input."""
    layers = {g: dict(v) for g, v in base["layers"].items()}
    keys = None
    if dropout_key is not None and lora_cfg.dropout > 0:
        n_layers = jax.tree.leaves(base["layers"])[0].shape[0]
        keys = jax.random.key_data(jax.random.split(dropout_key, (len(TARGETS), n_layers)))
    for group, name, ab in _adapted(adapters):
        p = {**layers[group][name], "lora_a": ab["a"], "lora_b": ab["b"] * jnp.asarray(lora_cfg.scale, ab["b"].dtype)}
        if keys is not None:
            index = list(TARGETS.values()).index(f"{group}/{name}")
            p["lora_key"] = keys[index]
            p["lora_keep"] = jnp.full(keys.shape[1:2], 1.0 - lora_cfg.dropout, jnp.float32)
        layers[group][name] = p
    return {**base, "layers": layers}


def delta(ab: Params, scale: float) -> jax.Array:
    """The kernel update (α/r)·A·B, shape (L, *in, *out), float32."""
    a, b = ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32)
    L, r = a.shape[0], a.shape[-1]
    return scale * (a.reshape(L, -1, r) @ b.reshape(L, r, -1)).reshape(*a.shape[:-1], *b.shape[2:])


def merge(base: Params, adapters: Params, lora_cfg: LoraConfig, *, deferred: bool = False) -> Params:
    """The base with every adapted kernel replaced by ``W + (α/r)·A·B`` (float32 sum, base dtype):
    for export, and for decoding loops that should not pay the two extra matmuls.

    ``deferred``: each merged kernel is a ``models.hf_io.Deferred`` computed only when the export fetches it,
    so writing a Hugging Face checkpoint never holds a merged copy of the model beside the base."""
    layers = {g: dict(v) for g, v in base["layers"].items()}
    for group, name, ab in _adapted(adapters):
        p = layers[group][name]
        kernel = functools.partial(_merged_kernel, p["kernel"], ab, lora_cfg.scale)
        layers[group][name] = {**p, "kernel": Deferred(kernel, p["kernel"].shape, p["kernel"].dtype)
                               if deferred else kernel()}
    return {**base, "layers": layers}


@jax.jit
def _merged_kernel_jit(kernel: jax.Array, ab: Params, scale: jax.Array) -> jax.Array:
    return (kernel.astype(jnp.float32) + delta(ab, scale)).astype(kernel.dtype)


def _merged_kernel(kernel: jax.Array, ab: Params, scale: float) -> jax.Array:
    """``W + (α/r)·A·B`` in one compiled program (no float32 temporaries beyond the result's)."""
    return _merged_kernel_jit(kernel, ab, jnp.float32(scale))


# --- Train-state layout ---------------------------------------------------------------------------

Path = tuple[str, ...]


def get_path(tree: Any, path: Path) -> Any:
    """``tree[path[0]][path[1]]...`` (``()``: the tree itself)."""
    for k in path:
        tree = tree[k]
    return tree


def set_path(tree: Any, path: Path, value: Any) -> Any:
    """A copy of the dicts along ``path`` with ``value`` there (``()``: ``value`` itself); leaves shared."""
    if not path:
        return value
    return {**tree, path[0]: set_path(tree.get(path[0], {}), path[1:], value)}


View = Callable[..., tuple[Params, Params]]
"""``view(params, frozen, step=None) -> (params, frozen)`` as the task's objective expects them."""


def view(lora_cfg: LoraConfig, *, lm_path: Path = (), reference_path: Path | None = None) -> View:
    """The map from a LoRA train state to the layout an objective of :mod:`rlhf_jax.steps` reads.

    The state holds the adapters at ``lm_path`` of ``params`` (``()``: params are the adapters, as
    for SFT and DPO; ``("backbone",)`` for a reward model; ``("policy",)`` for PPO) and the base at
    ``frozen[BASE]``. The view attaches the adapters to the base at ``lm_path`` and, with
    ``reference_path`` (``()`` for DPO, whose ``frozen`` is the reference; ``("reference",)`` for PPO),
    puts the base itself there: the reference is the base with the adapter off, not a copy.
    ``step`` (the state's step counter; None in evaluation) seeds the dropout masks.
    """
    def apply(params: Params, frozen: Params, step: jax.Array | None = None) -> tuple[Params, Params]:
        base = frozen[BASE]
        key = None if step is None else jax.random.fold_in(jax.random.key(lora_cfg.seed + 1), step)
        params = set_path(params, lm_path, attach(base, get_path(params, lm_path), lora_cfg, key))
        rest = {k: v for k, v in frozen.items() if k != BASE}
        if reference_path is not None:
            rest = set_path(rest, reference_path, base)
        return params, rest
    return apply


# --- PEFT interchange -----------------------------------------------------------------------------

PEFT_CONFIG = "adapter_config.json"
_PEFT_TENSOR = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.default)?\.weight$")
PEFT_WEIGHTS = "adapter_model.safetensors"


PEFT_FAMILIES = ("llama", "qwen2")
"""Families whose q, k and v are separate layers in transformers, so each adapter is one PEFT module."""


def _check_peft_family(model_cfg: ModelConfig) -> None:
    if model_cfg.model_type not in PEFT_FAMILIES:
        raise ValueError(f"PEFT adapters are written for llama and qwen2 models (separate q/k/v projections); a "
                         f"{model_cfg.model_type} model fuses q, k and v into one layer: export the merged "
                         "checkpoint (<stage>/hf/) instead")


def _peft_key(layer: int, name: str, which: str) -> str:
    return f"base_model.model.model.layers.{layer}.{PEFT_NAMES[name]}.lora_{which}.weight"


def _name_of(group: str, proj: str) -> str:
    return next(n for n, p in TARGETS.items() if p == f"{group}/{proj}")


def save_peft(path: str | pathlib.Path, model_cfg: ModelConfig, lora_cfg: LoraConfig, adapters: Params,
              base_model: str | None = None) -> pathlib.Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's LoRA format: per layer
    ``lora_A.weight`` (r, in) = Aᵀ and ``lora_B.weight`` (out, r) = Bᵀ, so that PEFT's
    (lora_alpha / r)·lora_B·lora_A equals our update transposed into ``nn.Linear``'s (out, in)."""
    from safetensors.numpy import save_file

    _check_peft_family(model_cfg)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, names = {}, []
    for group, proj, ab in _adapted(adapters):
        name = _name_of(group, proj)
        names.append(name)
        a = np.asarray(jax.device_get(ab["a"]), np.float32)
        b = np.asarray(jax.device_get(ab["b"]), np.float32)
        r = a.shape[-1]
        for i in range(a.shape[0]):
            tensors[_peft_key(i, name, "A")] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            tensors[_peft_key(i, name, "B")] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_cfg.rank, "lora_alpha": lora_cfg.alpha,
              "lora_dropout": lora_cfg.dropout, "target_modules": sorted(PEFT_NAMES[n].split(".")[-1] for n in names),
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
              "base_model_name_or_path": base_model}
    if jax.process_index() == 0:
        (path / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(path / PEFT_WEIGHTS))
    return path


def load_peft(path: str | pathlib.Path, model_cfg: ModelConfig) -> tuple[LoraConfig, Params]:
    """``(lora_cfg, adapters)`` from a PEFT LoRA directory (ours or peft's ``save_pretrained``), to
    continue training. Unsupported settings (DoRA, rsLoRA, bias training, per-module ranks) and
    tensors of projections this model lacks are errors naming the file and the field."""
    from safetensors.numpy import load_file

    _check_peft_family(model_cfg)
    path = pathlib.Path(path)
    config_file, weights_file = path / PEFT_CONFIG, path / PEFT_WEIGHTS
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (a PEFT LoRA directory holds {PEFT_CONFIG} and {PEFT_WEIGHTS})")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: peft_type {config.get('peft_type')!r} is not LORA")
    for field, ok in (("use_dora", False), ("use_rslora", False), ("bias", "none"), ("fan_in_fan_out", False)):
        if config.get(field, ok) != ok:
            raise ValueError(f"{config_file}: {field}={config[field]!r} is not supported (only {ok!r})")
    for field in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform"):
        if config.get(field):
            raise ValueError(f"{config_file}: {field}={config[field]!r} is not supported")
    tensors = load_file(str(weights_file))
    by_module = {v.split(".")[-1]: k for k, v in PEFT_NAMES.items()}
    modules = config["target_modules"]
    modules = [modules] if isinstance(modules, str) else list(modules)
    unknown = [m for m in modules if m not in by_module]
    if unknown:
        raise ValueError(f"{config_file}: target_modules {unknown} are not projections of a {model_cfg.model_type} "
                         f"model; known: {sorted(by_module)}")
    lora_cfg = LoraConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                          dropout=float(config.get("lora_dropout", 0.0)), targets=tuple(by_module[m] for m in modules))
    found = {}
    for key in tensors:  # ours and peft's save_pretrained: ...layers.{i}.self_attn.q_proj.lora_A.weight
        m = _PEFT_TENSOR.search(key)
        if m is None or m.group(2) not in by_module:
            raise ValueError(f"{weights_file}: tensor {key!r} is not a LoRA A/B of a {model_cfg.model_type} projection")
        found[(int(m.group(1)), by_module[m.group(2)], m.group(3).lower())] = key
    leaves = {}
    for spec_path, spec in adapter_specs(model_cfg, lora_cfg).items():
        group, proj, which = spec_path.split("/")[1:]
        name = _name_of(group, proj)
        want = (lora_cfg.rank, math.prod(spec.shape[1:-1])) if which == "a" else (math.prod(spec.shape[2:]), lora_cfg.rank)
        per_layer = []
        for i in range(model_cfg.n_layers):
            key = found.pop((i, name, which), None)
            if key is None:
                raise ValueError(f"{weights_file}: no lora_{which.upper()} tensor for layer {i} {PEFT_NAMES[name]}")
            if tensors[key].shape != want:
                raise ValueError(f"{weights_file}: {key} has shape {tensors[key].shape}, expected {want}")
            per_layer.append(tensors[key].T.reshape(spec.shape[1:]))
        leaves[spec_path] = jnp.asarray(np.stack(per_layer))
    if found:
        extra = sorted(found.values())
        raise ValueError(f"{weights_file}: tensors this model would not use, e.g. {extra[:3]} ({len(extra)} in all)")
    return lora_cfg, traverse_util.unflatten_dict(leaves, sep="/")
