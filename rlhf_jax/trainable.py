"""What a stage trains: every parameter of its language model, or LoRA adapters on a frozen base."""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from rlhf_jax import lora, models
from rlhf_jax.model_io import export_lm
from rlhf_jax.train_state import TrainState, place_train_state


@dataclasses.dataclass(frozen=True)
class Trainable:
    """How a stage trains its language model: every parameter, or LoRA adapters on a frozen base
    (``--lora.rank R``). The scripts place their state, build their steps, sample and export through
    this, so the two cases share one code path.

    ``lm_path``: where the LM sits in the stage's params (``()`` SFT/DPO, ``("backbone",)`` reward
    model, ``("policy",)`` PPO). ``reference_path``: where the objective reads its reference in
    ``frozen`` (``()`` DPO, ``("reference",)`` PPO, None without one); with LoRA it is the base itself.
    """

    lora_cfg: lora.LoraConfig
    lm_path: tuple[str, ...] = ()
    reference_path: tuple[str, ...] | None = None
    initial_adapters: Any = dataclasses.field(default=None, compare=False, repr=False)
    """Adapters to start from (``--lora.load``); None: fresh ones."""

    @classmethod
    def create(cls, lora_cfg: lora.LoraConfig, model_cfg: models.ModelConfig, *, lm_path: tuple[str, ...] = (),
               reference_path: tuple[str, ...] | None = None) -> "Trainable":
        """With ``lora_cfg.load``, the PEFT adapter's rank, alpha and targets replace the flags' (dropout
        and seed are kept) and training continues from its weights."""
        adapters = None
        if lora_cfg.load:
            loaded, adapters = lora.load_peft(lora_cfg.load, model_cfg)
            lora_cfg = dataclasses.replace(loaded, dropout=lora_cfg.dropout, seed=lora_cfg.seed, load=lora_cfg.load)
            print(f"[lora] continuing from {lora_cfg.load}: rank {lora_cfg.rank}, alpha {lora_cfg.alpha}, targets "
                  f"{' '.join(lora.target_names(model_cfg, lora_cfg))}", flush=True)
        return cls(lora_cfg, lm_path, reference_path, adapters)

    @property
    def view(self) -> lora.View | None:
        """The train steps' ``view=`` (None: the state is laid out as the objective reads it)."""
        if not self.lora_cfg.enabled:
            return None
        return lora.view(self.lora_cfg, lm_path=self.lm_path, reference_path=self.reference_path)

    def place(self, model_cfg: models.ModelConfig, params: Any, axes: Any, optimizer, mesh, rules, *,
              frozen: Any = None, frozen_axes: Any = None, donate: bool = False) -> TrainState:
        """The sharded state: ``params`` (the stage's full layout, LM at ``lm_path``) and ``frozen``
        as given; with LoRA the LM at ``lm_path`` becomes fresh (or loaded) adapters, the LM itself goes
        to ``frozen[lora.BASE]`` (held once), and the reference at ``reference_path`` is dropped (the
        base is the reference)."""
        if not self.lora_cfg.enabled:
            return place_train_state(params, optimizer, mesh, rules, axes, frozen=frozen, frozen_axes=frozen_axes,
                                     donate=donate)
        lora_cfg = self.lora_cfg
        adapters = self.initial_adapters if self.initial_adapters is not None else lora.init_adapters(model_cfg, lora_cfg)
        base = lora.get_path(params, self.lm_path)
        trainable = lora.set_path(params, self.lm_path, adapters)
        trainable_axes = lora.set_path(axes, self.lm_path, lora.adapter_logical_axes(model_cfg, lora_cfg))
        frozen, frozen_axes = (frozen or {}), (frozen_axes or {})
        if self.reference_path is not None:  # the reference is the base: no copy of it is kept
            frozen = {} if not self.reference_path else {k: v for k, v in frozen.items() if k != self.reference_path[0]}
            frozen_axes = {} if not self.reference_path else {k: v for k, v in frozen_axes.items()
                                                              if k != self.reference_path[0]}
        frozen = {**frozen, lora.BASE: base}
        frozen_axes = {**frozen_axes, lora.BASE: lora.get_path(axes, self.lm_path)}
        return place_train_state(trainable, optimizer, mesh, rules, trainable_axes, frozen=frozen,
                                 frozen_axes=frozen_axes, donate=donate)

    def lm(self, state: TrainState) -> Any:
        """The trained LM's parameters (with LoRA: the base with the adapters attached, no merged copy)."""
        if not self.lora_cfg.enabled:
            return lora.get_path(state.params, self.lm_path)
        return lora.attach(state.frozen[lora.BASE], lora.get_path(state.params, self.lm_path), self.lora_cfg)

    def reference(self, state: TrainState) -> Any:
        """The frozen reference LM (with LoRA: the base, the adapter off)."""
        if self.reference_path is None:
            raise ValueError("this stage has no reference model")
        if self.lora_cfg.enabled:
            return state.frozen[lora.BASE]
        return lora.get_path(state.frozen, self.reference_path)

    def stage_params(self, state: TrainState) -> Any:
        """The stage's params in their full layout (LM attached at ``lm_path``: reward-model scoring)."""
        return state.params if not self.lora_cfg.enabled else lora.set_path(state.params, self.lm_path, self.lm(state))

    def merged_lm(self, state: TrainState, *, deferred: bool = False) -> Any:
        """The LM with the adapters merged into its kernels (``deferred``: computed one kernel at a time
        as an export writes them, see ``lora.merge``)."""
        if not self.lora_cfg.enabled:
            return lora.get_path(state.params, self.lm_path)
        return lora.merge(state.frozen[lora.BASE], lora.get_path(state.params, self.lm_path), self.lora_cfg,
                          deferred=deferred)

    def export(self, out: pathlib.Path, model_cfg: models.ModelConfig, state: TrainState, tokenizer: Any,
               base_model: str | None = None) -> dict:
        """``out/hf/`` (merged, loads in transformers) and, with LoRA, the adapters (:meth:`save_adapters`)."""
        written = {"hf": str(export_lm(out / "hf", model_cfg, self.merged_lm(state, deferred=True), tokenizer))}
        return {**written, **self.save_adapters(out, model_cfg, state, base_model)}

    def save_adapters(self, out: pathlib.Path, model_cfg: models.ModelConfig, state: TrainState,
                      base_model: str | None = None) -> dict:
        """With LoRA, ``out/peft/`` in PEFT's format (``peft.PeftModel.from_pretrained(base, out/"peft")``)
        where the family allows it (``lora.PEFT_FAMILIES``); ``{"peft": path}`` or ``{}``."""
        if not self.lora_cfg.enabled:
            return {}
        if model_cfg.model_type not in lora.PEFT_FAMILIES:
            print(f"[lora] no PEFT export for a {model_cfg.model_type} model (fused q/k/v); merged export in "
                  f"{out / 'hf'}", flush=True)
            return {}
        lora.save_peft(out / "peft", model_cfg, self.lora_cfg, lora.get_path(state.params, self.lm_path),
                       base_model=base_model)
        return {"peft": str(out / "peft")}
