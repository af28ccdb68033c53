"""The TRL side of ``benchmarks/steps_vs_trl.py``: TRL 1.16's own trainers timing one optimizer step (SFT, reward
model, DPO) or one online iteration (GRPO) on a prepared batch, driven by that script over a pipe so that the two
sides can alternate.

Runs in TRL's own venv (never the project's; install line in ``benchmarks/e2e_vs_trl.py``). It imports only the
standard library, numpy, torch, transformers, datasets and trl. Started by the driver as

    HF_HUB_OFFLINE=1 /tmp/trlvenv/bin/python benchmarks/steps_trl_side.py --threads 1

it reads one JSON command per line on stdin and answers one JSON line on stdout (everything else the libraries
print goes to stderr):

    {"cmd": "build", "work": "sft" | "rm" | "dpo" | "grpo", ...}   the trainer, its optimizer and the batch
    {"cmd": "steps", "n": N}                                       N timed steps; seconds and losses of each
    {"cmd": "drop"}  /  {"cmd": "quit"}

One step is what the Trainer's ``_run_epoch`` does for one update with no gradient accumulation:
``trainer.training_step(model, batch, num_items_in_batch)`` (the trainer's own ``compute_loss`` + backward), the
Trainer's gradient clipping (``_clip_grad_norm``, max norm 1.0), ``optimizer.step()`` (torch AdamW),
``lr_scheduler.step()`` and ``model.zero_grad()``. The batch is the one TRL's own dataloader yields for a dataset
holding exactly the driver's rows (``get_train_dataloader``: the trainer's collator, padded to the driver's
length with ``max_length = pad_to_multiple_of = length``), collated once and reused every step, as the rlhf_jax side
reuses its batch; ``num_items_in_batch`` is the Trainer's ``get_batch_samples`` count. The collated arrays are
written to ``batch_npz`` so the driver can check they hold its tokens.

GRPO: one iteration is ``training_step`` on one generation batch (the prompts, each repeated ``num_generations``
times, as GRPO's ``RepeatSampler`` yields them), which generates (``_generate_single_turn``: transformers
``generate``), scores (decoding, reward function, reference log-probs, group advantages) and takes the loss and its
backward, then the optimizer step as above. ``min_new_tokens = max_completion_length`` (``generation_kwargs``), so
no completion ends early. The split is timed by wrapping ``_generate_single_turn`` (generation) and
``_generate_and_score_completions`` (generation + scoring); update = the rest.
"""
from __future__ import annotations

import os
import sys

PROTOCOL = os.fdopen(os.dup(1), "w", buffering=1)  # answers go to the original stdout ...
os.dup2(2, 1)  # ... and whatever the libraries print, to stderr

import argparse
import gc
import json
import pathlib
import shutil
import tempfile
import time
import traceback

import numpy as np

T0 = time.perf_counter()
import datasets
import torch
import transformers
import trl

IMPORT_S = time.perf_counter() - T0


def distinct_characters(prompts, completions, **unused) -> list[float]:
    """The online iteration's fixed reward (the driver gives rlhf_jax the same function): distinct characters / 10."""
    return [len(set(c)) / 10.0 for c in completions]


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


class Side:
    def __init__(self):
        self.trainer = None
        self.step = None
        self.folder = pathlib.Path(tempfile.mkdtemp(prefix="steps_trl_"))

    def drop(self) -> dict:
        self.trainer = self.step = None
        gc.collect()
        return {}

    def build(self, cmd: dict) -> dict:
        self.drop()
        t0 = time.perf_counter()
        work, length, optim = cmd["work"], cmd.get("length"), cmd["optim"]
        common = {"output_dir": str(self.folder / work), "max_steps": 10**6,
                  "per_device_train_batch_size": cmd["rows"], "gradient_accumulation_steps": 1,
                  "optim": "adamw_torch", "adam_beta1": 0.9, "adam_beta2": optim["b2"], "adam_epsilon": 1e-8,
                  "learning_rate": optim["lr"], "weight_decay": optim["weight_decay"], "max_grad_norm": 1.0,
                  "lr_scheduler_type": "constant", "warmup_steps": 0, "logging_steps": 10**6, "save_strategy": "no",
                  "report_to": "none", "bf16": False, "fp16": False, "gradient_checkpointing": False, "use_cpu": True,
                  "seed": 0, "dataloader_num_workers": 0, "disable_tqdm": True,
                  "model_init_kwargs": {"dtype": "float32"}}
        model, data = cmd["model"], cmd["data"]
        tokenizer = transformers.AutoTokenizer.from_pretrained(model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        fixed = {"max_length": length, "pad_to_multiple_of": length}
        if work == "sft":
            config = trl.SFTConfig(**common, **fixed, packing=False, padding_free=False, completion_only_loss=True)
            trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(data),
                                     processing_class=tokenizer)
        elif work == "rm":
            config = trl.RewardConfig(**common, **fixed, center_rewards_coefficient=None)
            rows = [{"chosen_ids": r["prompt_ids"] + r["chosen_ids"], "rejected_ids": r["prompt_ids"] + r["rejected_ids"]}
                    for r in data]
            trainer = trl.RewardTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                                        processing_class=tokenizer)
            with torch.no_grad():  # the driver's head: the same starting weights on both sides
                kernel = torch.tensor(np.load(cmd["head"]), dtype=torch.float32).reshape(1, -1)
                trainer.model.score.weight.copy_(kernel)
        elif work == "dpo":
            class TokenizedDPOTrainer(trl.DPOTrainer):
                """DPOTrainer fed token ids (memory_trl.py's subclass: DPOTrainer has no switch to skip tokenizing)."""

                def _prepare_dataset(self, dataset, *unused, **unused_kw):
                    return dataset

            config = trl.DPOConfig(**common, **fixed, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=False,
                                   padding_free=False)
            trainer = TokenizedDPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(data),
                                          processing_class=tokenizer)
        elif work == "grpo":
            g = cmd["grpo"]
            config = trl.GRPOConfig(**common, num_generations=g["samples"], steps_per_generation=1, num_iterations=1,
                                    max_completion_length=g["new_tokens"],
                                    generation_kwargs={"min_new_tokens": g["new_tokens"]}, temperature=1.0, top_p=1.0,
                                    beta=g["beta"], epsilon=0.2, loss_type="grpo", log_completions=False)
            trainer = trl.GRPOTrainer(model=model, reward_funcs=distinct_characters, args=config,
                                      train_dataset=datasets.Dataset.from_list(data), processing_class=tokenizer)
        else:
            raise ValueError(f"unknown work {work!r}")
        trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
        trainer.current_gradient_accumulation_steps = 1
        trainer.accelerator.gradient_state._set_sync_gradients(True)
        model_ = trainer.model
        model_.train()
        answer: dict = {"threads": torch.get_num_threads(), "pad_token_id": tokenizer.pad_token_id,
                        "eos_token_id": tokenizer.eos_token_id}
        if work == "grpo":
            batch = [row for row in data for _ in range(g["samples"])]  # RepeatSampler's order: samples adjacent
            num_items = None
            answer["prompt_ids"] = trainer._tokenize_prompts([row["prompt"] for row in data])[0]
            split = self._wrap_grpo(trainer)
        else:
            loader = trainer.get_train_dataloader()
            samples, num_items = trainer.get_batch_samples(iter(loader), 1, trainer.args.device)
            batch = samples[0]
            np.savez(cmd["batch_npz"], **{k: v.numpy() for k, v in batch.items() if isinstance(v, torch.Tensor)})
            split = None

        def step() -> dict:
            t0, c0 = time.perf_counter(), _cpu()
            if split is not None:
                split.update(generation=0.0, generation_and_scoring=0.0)
            inputs = list(batch) if isinstance(batch, list) else dict(batch)
            loss = trainer.training_step(model_, inputs, num_items)
            trainer._clip_grad_norm(model_)
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            model_.zero_grad()
            total = time.perf_counter() - t0
            out = {"s": total, "cpu_s": _cpu() - c0, "loss": float(loss)}
            if split is not None:
                out["split"] = {"generation": split["generation"],
                                "scoring": split["generation_and_scoring"] - split["generation"],
                                "update": total - split["generation_and_scoring"]}
                out["new_tokens"] = split["new_tokens"]
            return out

        self.trainer, self.step = trainer, step
        answer["build_s"] = time.perf_counter() - t0
        return answer

    @staticmethod
    def _wrap_grpo(trainer) -> dict:
        split: dict = {}
        generate_single_turn, generate_and_score = trainer._generate_single_turn, trainer._generate_and_score_completions

        def timed_generate(*a, **kw):
            t0 = time.perf_counter()
            completion_ids, logprobs = generate_single_turn(*a, **kw)
            split["generation"] += time.perf_counter() - t0
            split["new_tokens"] = sorted({len(c) for c in completion_ids})
            return completion_ids, logprobs

        def timed_generate_and_score(*a, **kw):
            t0 = time.perf_counter()
            out = generate_and_score(*a, **kw)
            split["generation_and_scoring"] += time.perf_counter() - t0
            return out

        trainer._generate_single_turn = timed_generate
        trainer._generate_and_score_completions = timed_generate_and_score
        return split

    def steps(self, cmd: dict) -> dict:
        return {"steps": [self.step() for _ in range(cmd["n"])]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    side = Side()
    versions = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                "datasets": datasets.__version__, "threads": torch.get_num_threads(), "import_s": IMPORT_S}
    PROTOCOL.write(json.dumps({"ready": True, "versions": versions}) + "\n")
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "quit":
                break
            try:
                answer = {"build": side.build, "steps": side.steps, "drop": lambda c: side.drop()}[cmd["cmd"]](cmd)
                answer["ok"] = True
            except Exception as e:  # noqa: BLE001  (reported to the driver, which stops)
                answer = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            PROTOCOL.write(json.dumps(answer) + "\n")
    finally:
        shutil.rmtree(side.folder, ignore_errors=True)


if __name__ == "__main__":
    main()
