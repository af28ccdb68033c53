"""Supervised fine-tuning: next-token cross-entropy on demonstrations, loss on completion tokens only.

    python experiments/sft.py                                  # embedded default (tiny Llama from scratch)
    python experiments/sft.py --model.path ./Qwen2.5-0.5B --data.path demos.jsonl --run.out runs/qwen \
        --batch-size 16 --max-len 1024 --optim.learning-rate 1e-5 --run.mesh.fsdp 8

Writes <run.out>/sft/: TensorBoard events, metrics.jsonl, checkpoints/, hf/ (the policy in Hugging
Face layout, the reference and starting point of the later stages) and eval.json.
"""
# %%
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import tyro

from rlhf_jax import cli, defaults, evaluation, lora, memory, model_io, models, objectives, sampling, steps, trainer
from rlhf_jax.trainable import Trainable
from rlhf_jax.data import sources
from rlhf_jax.configs import OptimizerConfig
from rlhf_jax.data import BatchIterator, collate_sft, encode, pack, simulated
from rlhf_jax.train_state import create_train_state, make_optimizer, shardings_of


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    model: cli.ModelArgs = cli.ModelArgs()
    data: cli.DataArgs = cli.DataArgs(num_train=8192, num_eval=512)
    run: cli.RunArgs = cli.RunArgs()
    optim: OptimizerConfig = OptimizerConfig(learning_rate=None, warmup_steps=40, total_steps=500, b2=0.98,
                                             weight_decay=0.01, end_lr_ratio=0.1)
    sample: cli.SampleArgs = cli.SampleArgs()
    lora: lora.LoraConfig = lora.LoraConfig()
    """LoRA adapters instead of full fine-tuning (--lora.rank 8); exports hf/ (merged) and peft/."""
    steps: int = 500
    """Optimizer steps (sets optim.total_steps)."""
    batch_size: int = 32
    """Sequences per step (global, over all hosts)."""
    max_len: int | None = None
    """Tokens per sequence (prompts truncated from the left to fit). None: auto (see rlhf_jax.defaults;
    embedded 96, pretrained the longest training example rounded up to 16). optim.learning_rate and
    sample.max_prompt_len / max_new_tokens are auto too (embedded 2e-3, 48, 48)."""
    pack: bool = False
    """Pack several demonstrations per row (segment-masked attention)."""
    eval_every: int = 250
    """Steps between held-out loss evaluations."""
    num_eval_samples: int = 256
    """Held-out prompts sampled at the end for the gold score (embedded default only)."""


def main(cfg: SFTConfig) -> dict:
    with memory.PeakRSS() as peak:
        result, out, stage = _main(cfg)
    return trainer.record_peak_memory(stage, peak, result, out)


def _main(cfg: SFTConfig):
    mesh, rules = cli.setup(cfg.run)
    from_scratch = cfg.model.path is None and not cfg.lora.enabled  # initialised straight into the shards below
    model_cfg, params, tokenizer = model_io.load_lm(cfg.model, jax.random.key(cfg.run.seed), init=not from_scratch)
    train_rows = sources.rows_from(cfg.data, "sft", "train", simulated.sft_rows)
    eval_rows = sources.rows_from(cfg.data, "sft", "eval", simulated.sft_rows)
    cfg = resolve_config(cfg, model_cfg, tokenizer, train_rows + eval_rows)  # held-out rows must fit too
    examples = sources.encode_rows(cfg.data, train_rows, tokenizer, max_len=cfg.max_len, what="training rows")
    if cfg.pack:
        examples = pack(examples, cfg.max_len)
    collate = functools.partial(collate_sft, pad_id=tokenizer.pad_token_id, length=cfg.max_len)
    batches = BatchIterator(examples, collate, batch_size=cfg.batch_size, seed=cfg.run.seed)

    optim_cfg = cli.optimizer_for(cfg.optim, cfg.steps)
    optimizer = make_optimizer(optim_cfg)
    axes = models.param_logical_axes(model_cfg)
    trainable = Trainable.create(cfg.lora, model_cfg)
    if from_scratch:
        state = create_train_state(lambda: models.init_params(model_cfg, jax.random.key(cfg.run.seed)),
                                   optimizer, mesh, rules, axes)
    else:
        state = trainable.place(model_cfg, params, axes, optimizer, mesh, rules, donate=True)
    del params
    memory.release_freed_host_memory()  # the host copies placed on the devices
    state_sh = shardings_of(state)
    train_step = steps.make_sft_step(model_cfg, optimizer, state_sh, mesh, rules, view=trainable.view)
    eval_step = steps.make_eval_step(functools.partial(objectives.sft_objective, model_cfg=model_cfg), state_sh, mesh, rules,
                                     view=trainable.view)

    evaluate = trainer.held_out_eval(eval_step, eval_rows, tokenizer, collate, max_len=cfg.max_len, data=cfg.data,
                                      batch_size=cfg.batch_size, mesh=mesh, rules=rules)

    state, last_eval = trainer.train_loop(stage="sft", run=cfg.run, state=state, step_fn=train_step, batches=batches,
                                           num_steps=cfg.steps, mesh=mesh, rules=rules, config=cfg, eval_fn=evaluate,
                                           eval_every=cfg.eval_every, print_keys=("sft/loss", "sft/accuracy"),
                                           optim=optim_cfg)
    out = cli.stage_dir(cfg.run, "sft")
    result = {**trainable.export(out, model_cfg, state, tokenizer, base_model=cfg.model.path), **last_eval}
    if cfg.data.path is None and cfg.num_eval_samples:  # gold score of the SFT policy on held-out prompts
        prompts = sources.prompt_texts(eval_rows)[:cfg.num_eval_samples]
        texts, _ = sampling.sample(model_cfg, trainable.lm(state), tokenizer, prompts, key=jax.random.key(cfg.run.seed + 1),
                                   sample_args=cfg.sample)
        gold = evaluation.gold_eval(prompts, [t[0] for t in texts])
        result["gold/mean"] = float(np.mean(gold))
        print(f"[sft] held-out gold score {np.mean(gold):.3f}; e.g. {prompts[0]!r} ->{texts[0][0]!r}", flush=True)
    trainer.write_json(out / "eval.json", result)
    return result, out, "sft"


def resolve_config(cfg: SFTConfig, model_cfg, tokenizer, train_rows) -> SFTConfig:
    """``cfg`` with its auto fields filled for this model and data (rlhf_jax.defaults)."""
    kind = defaults.model_kind(model_cfg)
    facts = {}
    if kind == "pretrained" and defaults.unresolved(cfg, "sft"):
        facts = defaults.data_facts(encode(train_rows, tokenizer, max_len=model_cfg.max_position_embeddings),
                                    model_cfg)
    return defaults.resolve(cfg, "sft", kind=kind, facts=facts)


# %%
if __name__ == "__main__":
    main(tyro.cli(SFTConfig))
