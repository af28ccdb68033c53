"""Every feedback kind reaches a script: KTO on thumbs up/down (experiments/kto.py) and the reward model on
K-way rankings (experiments/reward_model.py --feedback ranked).

The objectives are checked against NumPy loops of the published formulas on a tiny random Llama, with
log-probs / scores computed independently (plain forward pass, NumPy log-softmax, the mismatched KTO
sequences built explicitly); the scripts run end to end in subprocesses with tiny budgets.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from rlhf_jax import losses, models, objectives
from rlhf_jax.data import Encoded, collate_binary, collate_ranked
from rlhf_jax.metrics import to_floats

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from mesh_case import VOCAB, tiny_model_config  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CFG = tiny_model_config()


@pytest.fixture(scope="module")
def params():
    return {"policy": models.init_params(CFG, jax.random.key(0)), "reference": models.init_params(CFG, jax.random.key(1))}


def _encoded(rng: np.random.Generator, prompt_len: int, completion_lens: list[int], label: float = 0.0) -> Encoded:
    ids = lambda n: rng.integers(3, VOCAB, size=n).astype(np.int32)  # noqa: E731
    return Encoded(prompt_ids=ids(prompt_len), completion_ids=tuple(ids(n) for n in completion_lens), label=label)


ORACLE_LEN = 24
_forward = jax.jit(lambda p, ids, mask: models.forward(CFG, p, ids, mask))


def _oracle_logp(p, prompt: np.ndarray, completion: np.ndarray) -> float:
    """log π(completion | prompt): a forward pass of that one sequence, NumPy log-softmax, summed over the
    completion."""
    seq = np.concatenate([prompt, completion])
    ids = np.zeros((1, ORACLE_LEN), np.int32)
    ids[0, :len(seq)] = seq
    logits = np.asarray(_forward(p, ids, (np.arange(ORACLE_LEN) < len(seq))[None].astype(np.int32)), np.float64)[0]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float(sum(logits[len(prompt) - 1 + i, tok] - logz[len(prompt) - 1 + i] for i, tok in enumerate(completion)))


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# --- (a) KTO ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [11, 14])  # 11: the longest row's own length
def test_kto_objective_matches_a_loop_of_the_paper_formula(params, length):
    rng = np.random.default_rng(3)
    items = [_encoded(rng, 5, [4], 1.0), _encoded(rng, 3, [8], 0.0), _encoded(rng, 9, [2], 1.0),
             _encoded(rng, 2, [6], 0.0), _encoded(rng, 4, [3], 1.0), None]  # the last row only pads the batch
    batch = collate_binary(items, pad_id=0, length=length)
    beta, lam_d, lam_u = 0.5, 1.3, 0.8
    loss_fn = lambda *a: losses.kto_loss(*a, beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u)  # noqa: E731
    objective = jax.jit(lambda p, f, b: objectives.kto_objective(p, f, b, model_cfg=CFG, loss_fn=loss_fn))
    # Two models some way apart, each the policy in turn: the mismatched log-ratios change sign, so one
    # order has z_0 > 0 and the other z_0 clamped at 0.
    far = jax.tree.map(lambda a, b: a + 3.0 * (a - b), params["policy"], params["reference"])
    z0s = [_check_kto(objective, policy, reference, items, batch, beta, lam_d, lam_u)
           for policy, reference in [(far, params["reference"]), (params["reference"], far)]]
    assert max(z0s) > 0.1 and min(z0s) == 0.0, z0s
    T = batch.input_ids_BT.shape[1]  # some mismatched pairs are cut to the batch's length
    assert any(len(items[b].prompt_ids) + len(items[b - 1].completion_ids[0]) > T for b in range(1, 5))


def _check_kto(objective, policy, reference, items, batch, beta, lam_d, lam_u) -> float:
    loss, metrics = objective(policy, reference, batch)
    T = batch.input_ids_BT.shape[1]
    real = [b for b, e in enumerate(items) if e is not None]
    log_ratio = {b: _oracle_logp(policy, items[b].prompt_ids, items[b].completion_ids[0])
                 - _oracle_logp(reference, items[b].prompt_ids, items[b].completion_ids[0]) for b in real}
    kl = []  # (x_b, y_{b-1}) for consecutive real rows, row 0 taking the last real row's completion (a roll)
    for b in real:
        a = (b - 1) % len(items)
        if items[a] is None:
            continue
        prompt = items[b].prompt_ids
        completion = items[a].completion_ids[0][: T - len(prompt)]  # cut to the batch's length
        kl.append(_oracle_logp(policy, prompt, completion) - _oracle_logp(reference, prompt, completion))
    assert len(kl) == len(real) - 1  # the pair made with the padding row is left out
    z0 = max(0.0, float(np.mean(kl)))
    terms = [lam_d * (1 - _sigmoid(beta * (log_ratio[b] - z0))) if items[b].label else
             lam_u * (1 - _sigmoid(beta * (z0 - log_ratio[b]))) for b in real]
    got = to_floats(metrics)
    np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["kto/kl"], z0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["kto/chosen_reward"], np.mean([beta * log_ratio[b] for b in real if items[b].label]),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["kto/rejected_reward"],
                               np.mean([beta * log_ratio[b] for b in real if not items[b].label]), rtol=1e-4, atol=1e-5)
    return z0


def test_mismatched_pairs_are_the_rolled_completions(params):
    rng = np.random.default_rng(4)
    items = [_encoded(rng, 3, [2]), _encoded(rng, 2, [4]), _encoded(rng, 4, [1])]
    batch = collate_binary(items, pad_id=0, length=8)
    ids, attention, response = (np.asarray(x) for x in objectives.mismatched_pairs(
        batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT))
    for b in range(3):
        prompt, completion = items[b].prompt_ids, items[b - 1].completion_ids[0][: 8 - len(items[b].prompt_ids)]
        n = len(prompt) + len(completion)
        np.testing.assert_array_equal(ids[b, :n], np.concatenate([prompt, completion]))
        np.testing.assert_array_equal(attention[b], np.arange(8) < n)
        np.testing.assert_array_equal(response[b], (np.arange(8) >= len(prompt) - 1) & (np.arange(8) < n - 1))


def test_kto_gradient_ignores_padding_rows(params):
    """A batch and the same batch with padding rows appended give the same loss and gradient."""
    rng = np.random.default_rng(5)
    items = [_encoded(rng, 4, [3], float(b % 2)) for b in range(4)]
    grad = jax.jit(jax.grad(lambda p, f, b: objectives.kto_objective(p, f, b, model_cfg=CFG)[0]))
    plain = grad(params["policy"], params["reference"], collate_binary(items, pad_id=0, length=10))
    padded = grad(params["policy"], params["reference"], collate_binary(items + [None, None], pad_id=0, length=10))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(padded)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


# --- (b) K-way rankings ----------------------------------------------------------------------------


def test_ranking_reward_objective_is_the_mean_over_prompts_of_pairwise_bt(params):
    rng = np.random.default_rng(6)
    rm = {"backbone": params["policy"], "head": models.init_scalar_head(CFG, jax.random.key(2), init_scale=0.5)}
    items = [_encoded(rng, 4, [3, 5, 2, 4]), _encoded(rng, 6, [2, 3]), None, _encoded(rng, 3, [5, 1, 4])]
    batch = collate_ranked(items, pad_id=0, length=12, num_responses=4)
    loss, metrics = jax.jit(lambda p, b: objectives.ranking_reward_objective(p, {}, b, model_cfg=CFG))(rm, batch)

    def score(prompt, completion):  # the head on the last token of the unpadded sequence
        seq = np.concatenate([prompt, completion])[None]
        hidden = models.forward_hidden(CFG, rm["backbone"], seq, np.ones_like(seq))
        return float(np.asarray(models.scalar_head(rm["head"], hidden))[0, -1])

    per_prompt, correct, pairs = [], 0, 0
    for e in items:
        if e is None:
            continue
        s = [score(e.prompt_ids, c) for c in e.completion_ids]  # best first
        terms = []
        for i in range(len(s)):
            for j in range(i + 1, len(s)):
                terms.append(-math.log(_sigmoid(s[i] - s[j])))
                correct, pairs = correct + (s[i] > s[j]), pairs + 1
        assert len(terms) == len(s) * (len(s) - 1) // 2
        per_prompt.append(np.mean(terms))
    np.testing.assert_allclose(float(loss), np.mean(per_prompt), rtol=1e-4)
    got = to_floats(metrics)
    np.testing.assert_allclose(got["rm/loss"], np.mean(per_prompt), rtol=1e-4)
    np.testing.assert_allclose(got["rm/accuracy"], correct / pairs, rtol=1e-6)


# --- (c, d) the scripts, end to end ----------------------------------------------------------------


def _env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, like a user's laptop
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("RLHF_JAX_COMPILE_CACHE", str(ROOT / ".cache" / "jax_scripts"))
    return env


def _run(script: str, *args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def _metrics(stage_dir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# sft_dir: the session's briefly trained SFT model (tests/conftest.py), shared with test_experiments_scripts.py


def test_kto_script_on_simulated_thumbs(sft_dir, tmp_path):
    out = tmp_path / "run"
    proc = _run("kto.py", "--model.path", str(sft_dir), "--run.out", str(out), "--steps", "24", "--eval-every", "24",
                "--batch-size", "16", "--data.num-train", "384", "--data.num-eval", "48", "--num-eval-prompts", "8",
                "--optim.learning-rate", "1e-4", "--run.log-every", "4", "--run.save-every", "1000")
    assert "[kto] desirable" in proc.stdout
    result = json.loads((out / "kto" / "eval.json").read_text())
    assert (out / "kto" / "hf" / "model.safetensors").exists()
    logged = [m for m in _metrics(out / "kto") if "optim/loss" in m]
    assert all(math.isfinite(m["optim/loss"]) for m in logged)
    # the implicit reward β·log(π/π_ref) separates held-out thumbs up from thumbs down (both start at 0)
    assert result["eval/kto/chosen_reward"] > result["eval/kto/rejected_reward"] + 0.05, result
    assert result["num_prompts"] == 8 and math.isfinite(result["kl"])


def test_kto_script_on_a_binary_file(sft_dir, tmp_path):
    topics = ["My order 1234 has not arrived yet.", "I want a refund for order 5678.", "Please change my address."]
    rows = []
    for i in range(24):
        prompt = f"Customer: {topics[i % 3]} (ticket {i})\nAgent:"
        rows.append({"prompt": prompt, "completion": " I am sorry, let me check that for you right away.", "label": True})
        rows.append({"prompt": prompt, "completion": " Not my problem.", "label": False})
    path = _write_jsonl(tmp_path / "thumbs.jsonl", rows)
    out = tmp_path / "run"
    _run("kto.py", "--model.path", str(sft_dir), "--run.out", str(out), "--data.path", path, "--data.eval-fraction",
         "0.2", "--steps", "6", "--eval-every", "6", "--batch-size", "8", "--num-eval-prompts", "4",
         "--run.log-every", "2", "--run.save-every", "1000", "--optim.learning-rate", "1e-4")
    result = json.loads((out / "kto" / "eval.json").read_text())
    assert math.isfinite(result["eval/optim/loss"]) and result["num_prompts"] >= 1
    logged = [m for m in _metrics(out / "kto") if "optim/loss" in m]
    assert logged[-1]["optim/loss"] < logged[0]["optim/loss"]


def test_ranked_reward_model_on_simulated_rankings(sft_dir, tmp_path):
    out = tmp_path / "run"
    proc = _run("reward_model.py", "--feedback", "ranked", "--model.path", str(sft_dir), "--run.out", str(out),
                "--steps", "40", "--eval-every", "40", "--batch-size", "8", "--data.num-train", "320",
                "--data.num-eval", "64", "--normalize-samples", "16", "--run.log-every", "10", "--run.save-every", "1000")
    result = json.loads((out / "rm" / "eval.json").read_text())
    assert (out / "rm" / "hf" / "reward_head.safetensors").exists() and result["gain"] > 0
    logged = [m for m in _metrics(out / "rm") if "rm/loss" in m]
    assert all(math.isfinite(m["rm/loss"]) for m in logged)
    # held-out pairwise accuracy over all implied pairs: above chance, below the annotator's ceiling + noise
    assert 0.55 < result["accuracy"] <= result["agreement_ceiling"] + 0.1, proc.stdout[-2000:]
    assert result["feedback"] == "ranked"


def test_ranked_reward_model_on_a_ranked_file_and_a_malformed_row(sft_dir, tmp_path):
    good, bad, polite = " I am sorry, let me check that for you.", " Not my problem.", " Let me look into this."
    rows = [{"prompt": f"Customer: Where is order {1000 + i}?\nAgent:", "responses": [bad, good, polite][: 2 + i % 2],
             "ranking": [1, 2, 0] if i % 2 else [1, 0]} for i in range(40)]
    path = _write_jsonl(tmp_path / "ranked.jsonl", rows)
    out = tmp_path / "run"
    args = ["--feedback", "ranked", "--model.path", str(sft_dir), "--run.out", str(out), "--steps", "8",
            "--eval-every", "8", "--batch-size", "8", "--normalize-samples", "0", "--data.eval-fraction", "0.2",
            "--run.log-every", "2", "--run.save-every", "1000"]
    _run("reward_model.py", *args, "--data.path", path)
    result = json.loads((out / "rm" / "eval.json").read_text())
    logged = [m for m in _metrics(out / "rm") if "rm/loss" in m]
    assert logged[-1]["rm/loss"] < logged[0]["rm/loss"] and math.isfinite(result["accuracy"])
    # (d) a ranking that is not a permutation of the responses: the error names file:line:field
    rows[6]["ranking"] = [0, 0, 1]
    broken = _write_jsonl(tmp_path / "broken.jsonl", rows)
    proc = _run("reward_model.py", *args, "--data.path", broken, check=False)
    assert proc.returncode != 0 and "broken.jsonl:7:ranking" in proc.stderr, proc.stderr[-2000:]
