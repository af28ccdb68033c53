"""The TRL side of ``benchmarks/e2e_vs_trl.py``: one short SFT / reward-model / DPO run with TRL, process start
to exit, on the token ids that driver wrote (rlhf_jax's tokenization of the simulated rows), starting from the
driver's Hugging Face export (SFT: the embedded tiny Llama's random init; reward model and DPO: the SFT export).

Runs in TRL's own venv (never the project's; see ``benchmarks/e2e_vs_trl.py`` for the install line):

    HF_HUB_OFFLINE=1 /tmp/trlvenv/bin/python benchmarks/e2e_trl_side.py sft --model DIR --data DATA.json \
        --out OUT --steps 30 --batch-size 8 --max-len 96

The work mirrors ``benchmarks/memory_trl.py``'s full fine-tuning child: fp32 (``bf16=False``), AdamW (torch),
gradient clipping 1.0, no gradient checkpointing, every batch padded to exactly ``--max-len`` (as rlhf_jax pads to
a fixed length), no evaluation, a resumable Trainer checkpoint (model + optimizer + scheduler + RNG, the peer of
rlhf_jax's orbax checkpoint) at the last step and ``save_model`` (the peer of rlhf_jax's ``hf/`` export). The
learning rates, betas and weight decay are the ones rlhf_jax picks for the embedded model; the schedule is
constant (rlhf_jax warms up then decays: no cost difference). Logging every 20 steps, as rlhf_jax's
``--run.log-every`` default.

It imports only the standard library, torch, transformers, datasets and trl (no rlhf_jax, no peft import of its
own), and writes ``<out>/timings.json``: wall-clock marks (``time.time()``) at imports done, trainer built, first
step done, last step done, Trainer checkpoint written, ``train()`` returned and ``save_model`` done, so the
driver can split TRL's time as it splits rlhf_jax's.
"""
from __future__ import annotations

import time

T_START = time.time()

import argparse
import json
import pathlib

import datasets
import torch
import transformers
import trl

T_IMPORTS = time.time()

# rlhf_jax's settings for the embedded model (rlhf_jax/defaults.py EMBEDDED and the scripts' OptimizerConfig)
OPTIM = {"sft": dict(learning_rate=2e-3, weight_decay=0.01, adam_beta2=0.98),
         "rm": dict(learning_rate=3e-4, weight_decay=0.01, adam_beta2=0.95),
         "dpo": dict(learning_rate=3e-5, weight_decay=0.0, adam_beta2=0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=sorted(OPTIM))
    parser.add_argument("--model", required=True, help="Hugging Face directory to start from")
    parser.add_argument("--data", required=True, help="the driver's data.json (token ids)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=96)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    data = json.loads(pathlib.Path(args.data).read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    length = args.max_len
    common = dict(output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                  gradient_accumulation_steps=1, optim="adamw_torch", adam_beta1=0.9, adam_epsilon=1e-8,
                  max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0, logging_steps=20,
                  save_strategy="steps", save_steps=args.steps, save_only_model=False, report_to="none",
                  bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, seed=0,
                  dataloader_num_workers=0, disable_tqdm=True, model_init_kwargs={"dtype": "float32"},
                  max_length=length, pad_to_multiple_of=length, **OPTIM[args.stage])
    if args.stage == "sft":
        config = trl.SFTConfig(**common, packing=False, padding_free=False, completion_only_loss=True)
        trainer = trl.SFTTrainer(model=args.model, args=config, train_dataset=datasets.Dataset.from_list(data["sft"]),
                                 processing_class=tokenizer)
    elif args.stage == "rm":
        rows = [{"chosen_ids": r["prompt_ids"] + r["chosen_ids"], "rejected_ids": r["prompt_ids"] + r["rejected_ids"]}
                for r in data["pairs"]]
        config = trl.RewardConfig(**common, center_rewards_coefficient=None)
        trainer = trl.RewardTrainer(model=args.model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                                    processing_class=tokenizer)
    else:
        class TokenizedDPOTrainer(trl.DPOTrainer):
            """DPOTrainer fed token ids (memory_trl.py's subclass: DPOTrainer has no switch to skip tokenizing)."""

            def _prepare_dataset(self, dataset, *unused, **unused_kw):
                return dataset

        config = trl.DPOConfig(**common, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=False,
                               padding_free=False)
        trainer = TokenizedDPOTrainer(model=args.model, args=config,
                                      train_dataset=datasets.Dataset.from_list(data["pairs"]),
                                      processing_class=tokenizer)
    shapes: list[tuple[int, ...]] = []  # every collated batch's shape: the padded length TRL trained on
    collate = trainer.data_collator

    def collate_and_record(features):
        batch = collate(features)
        shapes.append(tuple(batch["input_ids"].shape))
        return batch

    trainer.data_collator = collate_and_record
    marks = {"start": T_START, "imports": T_IMPORTS, "trainer": time.time()}

    class Marks(transformers.TrainerCallback):
        def on_step_end(self, *unused, **unused_kw):
            marks.setdefault("first_step", time.time())
            marks["last_step"] = time.time()

        def on_save(self, *unused, **unused_kw):  # after the Trainer checkpoint of the last step is written
            marks["checkpoint"] = time.time()

    trainer.add_callback(Marks())
    trainer.train()
    marks["train"] = time.time()
    trainer.save_model(str(out / "model"))
    marks["saved"] = time.time()
    result = {"marks": marks, "batch_shapes": sorted(set(shapes)), "steps": trainer.state.global_step,
              "checkpoint": (out / "trainer" / f"checkpoint-{args.steps}").is_dir(),
              "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                           "torch": torch.__version__, "datasets": datasets.__version__,
                           "threads": torch.get_num_threads()}}
    (out / "timings.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
