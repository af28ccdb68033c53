"""Each experiment script from its own command line, in subprocesses, on the embedded default with tiny
budgets: every stage script alone, PPO and DPO on a two-device mesh, the pipeline killed during PPO and
resumed, the scripts on a user's prompt and pair files, a stage re-run over its own folder.

They start from the session's briefly trained SFT model (tests/conftest.py ``sft_dir``, shared with
tests/test_feedback_kinds.py) and a reward model reward_model.py trains on it here (module fixture): what
they check is that the scripts compose and run, not how good the models are. The pipeline's own run is
tests/test_experiments.py; `pytest -n 2 --dist loadfile` runs the two files side by side.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from test_experiments import EVAL_KEYS, EXPERIMENTS, PIPELINE_ARGS, RM_KEYS, ROOT, _check_tables, _env, _jsonl, _run


@pytest.fixture(scope="module")
def base_run(sft_dir, tmp_path_factory) -> pathlib.Path:
    """A run folder holding sft/ (a copy of the session's SFT stage) and rm/ (reward_model.py on it, briefly)."""
    out = tmp_path_factory.mktemp("base") / "run"
    shutil.copytree(sft_dir.parent, out / "sft")
    _run("reward_model.py", "--run.out", str(out), "--steps", "16", "--eval-every", "16", "--batch-size", "16",
         "--normalize-samples", "32", "--data.num-train", "256", "--data.num-eval", "32", "--run.save-every", "1000")
    assert (out / "rm" / "eval.json").exists() and (out / "rm" / "hf" / "reward_head.safetensors").exists()
    return out


def _finished_checkpoints(folder: pathlib.Path) -> list[int]:
    """Steps of the finished orbax checkpoints in ``folder`` (in-progress ones end in -tmp)."""
    return [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []


def test_each_script_cli(base_run, tmp_path):
    """Every script runs alone from the command line with tiny arguments (on a copy of the run). PPO and DPO run on a
    two-device mesh: they start the policy and the frozen reference from the same loaded checkpoint, and on a
    multi-device mesh those must still get separate buffers, or the donated train step fails."""
    out = tmp_path / "run"
    shutil.copytree(base_run / "sft" / "hf", out / "sft" / "hf")
    shutil.copytree(base_run / "rm" / "hf", out / "rm" / "hf")
    common = ["--run.out", str(out)]
    _run("sft.py", *common, "--steps", "4", "--eval-every", "4", "--num-eval-samples", "8", "--batch-size", "8",
         "--data.num-train", "64", "--data.num-eval", "16", "--run.out", str(tmp_path / "fresh"))
    assert (tmp_path / "fresh" / "sft" / "hf" / "model.safetensors").exists()
    _run("reward_model.py", *common, "--steps", "3", "--eval-every", "3", "--batch-size", "8",
         "--normalize-samples", "16", "--data.num-train", "64", "--data.num-eval", "16", "--loss", "bt_centered",
         "--run.out", str(tmp_path / "rm_only"), "--model.path", str(out / "sft" / "hf"))
    assert json.loads((tmp_path / "rm_only" / "rm" / "eval.json").read_text())["gain"] > 0
    proc = _run("ppo.py", *common, "--iterations", "2", "--rollout-prompts", "8", "--num-minibatches", "2",
                "--epochs", "1", "--eval-every", "2", "--num-eval-prompts", "8", "--critic", "separate", "--kl.adaptive",
                host_devices=2)
    assert "[ppo] step 2" in proc.stdout and (out / "ppo" / "hf" / "model.safetensors").exists()
    proc = _run("grpo.py", *common, "--algo", "dapo", "--iterations", "2", "--rollout-prompts", "4", "--num-minibatches",
                "2", "--epochs", "1", "--eval-every", "0", "--reward", "rlhf_jax.rewards:gold=0.5",
                "--reward-model-weight", "1")
    assert "[dapo] reward: 1 x reward model + 0.5 x rlhf_jax.rewards:gold" in proc.stdout
    dapo = [json.loads(line) for line in (out / "dapo" / "metrics.jsonl").read_text().splitlines()]
    assert all("vf/loss" not in m for m in dapo) and "reward/gold" in dapo[-1] and "rollout/draws" in dapo[-1]
    _run("online_dpo.py", *common, "--judge", "annotator", "--iterations", "2", "--rollout-prompts", "4",
         "--num-minibatches", "2", "--epochs", "1", "--eval-every", "2", "--num-eval-prompts", "8")
    assert (out / "online_dpo" / "hf" / "model.safetensors").exists()
    _run("dpo.py", *common, "--steps", "3", "--eval-every", "3", "--batch-size", "8", "--variant", "ipo",
         "--data.num-train", "64", "--data.num-eval", "16", "--num-eval-prompts", "8", host_devices=2)
    assert (out / "dpo_ipo" / "hf" / "model.safetensors").exists()
    proc = _run("best_of_n.py", *common, "--n", "2", "--num-eval-prompts", "8")
    assert "n=2" in proc.stdout


def test_pipeline_resumes_after_kill_during_ppo(base_run, tmp_path):
    """Killed during PPO and restarted with --resume: finished stages are kept, PPO continues from its
    newest checkpoint and completes every iteration exactly once after it."""
    out = tmp_path / "run"
    for stage in ("sft", "rm"):
        shutil.copytree(base_run / stage, out / stage)
    # 16 prompts per iteration, half the pipeline tests' PPO: what is checked is where the run resumes
    args = ["--out", str(out), "--resume", *PIPELINE_ARGS, "--ppo.iterations", "8", "--ppo.run.save-every", "2",
            "--ppo.rollout-prompts", "16",
            "--ppo.eval-every", "8", "--ppo.num-eval-prompts", "16", "--skip-dpo", "--skip-best-of-n", "--skip-online", "--rounds", "1"]
    proc = subprocess.Popen([sys.executable, str(EXPERIMENTS / "pipeline.py"), *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ckpts = out / "ppo" / "checkpoints"
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            steps = _finished_checkpoints(ckpts)
            if steps and max(steps) >= 4:
                break
            if proc.poll() is not None:
                pytest.fail(f"pipeline ended before it could be killed:\n{proc.stdout.read()[-3000:]}")
            time.sleep(0.5)
        else:
            pytest.fail("no PPO checkpoint within 10 minutes")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    saved = max(_finished_checkpoints(ckpts))
    assert not (out / "ppo" / "eval.json").exists()

    resumed = _run("pipeline.py", *args, timeout=900)
    assert "SFT: finished earlier, kept" in resumed.stdout
    assert f"[ppo] resumed from iteration {saved}" in resumed.stdout
    logged = [json.loads(line)["step"] for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()
              if "rollout/score" in line]
    assert saved < 8, "killed too late to test resuming"
    assert logged[-(8 - saved):] == list(range(saved + 1, 9))  # the resumed run's iterations, once each
    assert (out / "ppo" / "eval.json").exists() and (out / "ppo" / "hf" / "model.safetensors").exists()


def _user_prompts(n: int) -> list[dict]:
    """Text prompts and conversations, with the characters that used to break the samples table."""
    rows = []
    for i in range(n):
        if i % 2:
            rows.append({"prompt": f"Customer: Hi | team. Order {1000 + i} is late.\nIt was due Monday.\nAgent:"})
        else:
            rows.append({"prompt": [{"role": "user", "content": f"Where is my refund for order {2000 + i}?\nThanks | bye"},
                                    {"role": "assistant", "content": "Let me check."},
                                    {"role": "user", "content": "Please hurry."}]})
    return rows


def _write_jsonl_rows(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prompt_cell(prompt) -> str:
    from rlhf_jax import evaluation

    return evaluation.prompt_text(prompt).strip()


def test_ppo_and_best_of_n_evaluate_a_user_prompt_file(base_run, tmp_path):
    """With only --data.path, PPO holds out a share of the prompts and evaluates on them (reward model,
    KL, length, EOS rate, samples); best-of-n on the same file evaluates on the same held-out prompts
    against the same reference samples."""
    out = tmp_path / "run"
    shutil.copytree(base_run / "sft" / "hf", out / "sft" / "hf")
    shutil.copytree(base_run / "rm" / "hf", out / "rm" / "hf")
    prompts = _write_jsonl_rows(tmp_path / "prompts.jsonl", _user_prompts(48))
    data = ["--data.path", str(prompts), "--data.eval-fraction", "0.25", "--run.out", str(out)]
    proc = _run("ppo.py", *data, "--iterations", "2", "--rollout-prompts", "8", "--num-minibatches", "2", "--epochs", "1",
                "--eval-every", "2", "--num-eval-prompts", "8", "--samples-every", "1")
    assert "held out for evaluation" in proc.stdout
    ev = json.loads((out / "ppo" / "eval.json").read_text())
    assert EVAL_KEYS | RM_KEYS <= set(ev) and not {"gold", "win_rate"} & set(ev), sorted(ev)
    assert ev["num_prompts"] == len(ev["samples"]) == 8
    assert 0.0 <= ev["rm_win_rate"] <= 1.0 and 0.0 <= ev["eos_rate"] <= 1.0 and ev["response_tokens"] >= 1
    assert {type(s["prompt"]) for s in ev["samples"]} == {str, list}  # both kinds of prompt were held out
    metrics = _jsonl(out / "ppo" / "metrics.jsonl")
    assert any("eval/rm_score" in m and m["step"] == 2 for m in metrics)
    tables = _check_tables((out / "ppo" / "samples.md").read_text())
    assert len(tables) == 3  # rollouts of iterations 1 and 2, then the held-out evaluation
    assert [row[0] for row in tables[-1][1:]] == [_prompt_cell(s["prompt"]) for s in ev["samples"]]

    _run("best_of_n.py", *data, "--n", "2", "--num-eval-prompts", "8")
    bon = json.loads((out / "best_of_n" / "eval.json").read_text())["bon_2"]
    assert EVAL_KEYS | RM_KEYS <= set(bon)
    assert [s["prompt"] for s in bon["samples"]] == [s["prompt"] for s in ev["samples"]]
    assert [s["reference"] for s in bon["samples"]] == [s["reference"] for s in ev["samples"]]
    assert bon["ref_rm_score"] == pytest.approx(ev["ref_rm_score"], rel=1e-5)
    _check_tables((out / "best_of_n" / "samples.md").read_text())
    assert _jsonl(out / "best_of_n" / "metrics.jsonl")[0]["step"] == 2


def test_dpo_evaluates_a_user_pair_file_without_a_reward_model(base_run, tmp_path):
    rows = [{"prompt": r["prompt"], "chosen": " I'm sorry about this. We will fix it today.", "rejected": " Okay."}
            for r in _user_prompts(40)]
    pairs = _write_jsonl_rows(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    _run("dpo.py", "--model.path", str(base_run / "sft" / "hf"), "--run.out", str(out), "--data.path", str(pairs),
         "--data.eval-fraction", "0.2", "--steps", "2", "--eval-every", "2", "--batch-size", "8", "--num-eval-prompts", "6")
    ev = json.loads((out / "dpo" / "eval.json").read_text())
    assert EVAL_KEYS <= set(ev) and not (RM_KEYS | {"gold"}) & set(ev), sorted(ev)
    assert "eval/dpo/loss" in ev  # the held-out split also gives the held-out DPO loss
    assert 1 <= ev["num_prompts"] <= 6 and len({json.dumps(s["prompt"]) for s in ev["samples"]}) == ev["num_prompts"]
    assert any("eval/kl" in m for m in _jsonl(out / "dpo" / "metrics.jsonl"))
    table = _check_tables((out / "dpo" / "samples.md").read_text())[0]
    assert table[0][:3] == ["prompt", "SFT", "DPO"]


def test_rerun_of_a_stage_continues_its_metrics_without_duplicate_steps(tmp_path):
    """A resumed run drops what the interrupted run logged after its last checkpoint; a fresh run over
    a folder without checkpoints starts metrics.jsonl anew. No figure of the disabled z-loss, and the
    logged learning rate is the fitted schedule's."""
    out = str(tmp_path / "run")
    args = ["--run.out", out, "--steps", "4", "--run.save-every", "2", "--run.log-every", "1", "--eval-every", "2",
            "--batch-size", "4", "--data.num-train", "32", "--data.num-eval", "8", "--num-eval-samples", "0",
            "--optim.warmup-steps", "1"]
    first = _run("sft.py", *args)
    assert "Skipping merge of OCDBT" not in first.stderr
    stage = tmp_path / "run" / "sft"

    def train_steps():
        return [m["step"] for m in _jsonl(stage / "metrics.jsonl") if "sft/loss" in m]

    assert train_steps() == [1, 2, 3, 4]
    shutil.rmtree(stage / "checkpoints" / "4")  # as if killed after logging step 4, before its checkpoint
    resumed = _run("sft.py", *args, "--run.resume")
    assert "resumed from step 2" in resumed.stdout
    assert train_steps() == [1, 2, 3, 4]
    metrics = _jsonl(stage / "metrics.jsonl")
    assert [m["step"] for m in metrics if "eval/sft/loss" in m] == [2, 4]
    assert not [k for m in metrics for k in m if "z_loss" in k]
    lrs = [m["optim/lr"] for m in metrics if "optim/lr" in m]
    peak = 2e-3  # sft.py's default
    assert lrs[0] == pytest.approx(0.0) and lrs[1] == pytest.approx(peak)  # warmup 1, then the peak
    assert lrs[3] < lrs[2] < peak  # cosine over the 4 steps of this run
    shutil.rmtree(stage / "checkpoints")
    _run("sft.py", *args)  # fresh run, no checkpoints left: the old entries go
    assert train_steps() == [1, 2, 3, 4]
