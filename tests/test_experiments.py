"""The experiment scripts, end to end, in subprocesses, on the embedded default with small budgets.

One small pipeline run (module fixture) is shared: its report and results are checked, its
exports are loaded in transformers, each script's CLI runs against its outputs, and a PPO run is
killed and resumed.
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

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"

# Small but real: enough SFT for fluent templated text, a reward model well above chance, and a few
# PPO iterations. Seeds are fixed, so the outcome below is deterministic on a given machine.
PIPELINE_ARGS = [
    "--sft.steps", "160", "--sft.eval-every", "160", "--sft.num-eval-samples", "0",
    "--rm.steps", "120", "--rm.eval-every", "120", "--rm.normalize-samples", "128",
    "--rm.data.num-train", "3840", "--rm.data.num-eval", "256",
    "--ppo.iterations", "12", "--ppo.rollout-prompts", "32", "--ppo.eval-every", "12",
    "--ppo.optim.learning-rate", "1e-4",
    "--ppo.num-eval-prompts", "128", "--ppo.run.save-every", "6",
    "--dpo.steps", "40", "--dpo.eval-every", "40", "--dpo.num-eval-prompts", "128",
    "--dpo.data.num-train", "1280", "--dpo.data.num-eval", "128",
    "--bon.n", "4", "--bon.num-eval-prompts", "128",
    "--rounds", "2", "--pairs-per-round", "128",
    # the online methods: 32 responses per iteration as PPO, fewer iterations (their rows only need to exist here;
    # the README's table runs them at PPO's full budget)
    *[arg for stage, prompts in (("grpo", "8"), ("rloo", "8"), ("online-dpo", "16")) for arg in (
        f"--{stage}.iterations", "6", f"--{stage}.rollout-prompts", prompts, f"--{stage}.eval-every", "6",
        f"--{stage}.optim.learning-rate", "1e-4", f"--{stage}.num-eval-prompts", "64", f"--{stage}.epochs", "2")],
]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the scripts run on one CPU device like a user's laptop
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("RLHF_JAX_COMPILE_CACHE", str(ROOT / ".cache" / "jax_scripts"))
    return env


def _run(script: str, *args: str, timeout: int = 900, host_devices: int | None = None) -> subprocess.CompletedProcess:
    env = _env()
    if host_devices:  # a data-parallel mesh over that many simulated CPU devices (the scripts' default mesh)
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={host_devices}"
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def _finished_checkpoints(folder: pathlib.Path) -> list[int]:
    """Steps of the finished orbax checkpoints in ``folder`` (in-progress ones end in -tmp)."""
    return [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("pipeline") / "run"
    _run("pipeline.py", "--out", str(out), *PIPELINE_ARGS, timeout=2700)
    return out


def test_pipeline_writes_report_and_ppo_beats_sft(pipeline_run):
    report = (pipeline_run / "report.md").read_text()
    results = json.loads((pipeline_run / "results.json").read_text())
    methods = {row["method"]: row for row in results["table"]}
    assert {"SFT", "PPO", "DPO", "best-of-4"} <= set(methods), methods
    for png in ("gold_vs_kl.png", "training_curves.png"):
        assert (pipeline_run / png).stat().st_size > 1000
    assert "Reward model held-out accuracy" in report and "| PPO |" in report
    # The reward model learned the annotator's preferences (chance is 0.5, the ceiling about 0.9).
    assert results["rm"]["accuracy"] > 0.65
    # PPO improved the policy as judged by the gold scorer, not just by its reward model.
    assert methods["PPO"]["gold"] > methods["SFT"]["gold"] + 0.3
    assert methods["PPO"]["win_rate"] > 0.6
    assert methods["PPO"]["kl"] > 0.0
    # the online methods ran at the same budget, were gold-judged on the same held-out prompts and moved
    for name in ("GRPO", "RLOO", "online DPO"):
        assert name in methods and f"| {name} |" in report, name
        assert np.isfinite(methods[name]["gold"]) and methods[name]["kl"] > 0.0, methods[name]
    # best-of-n's KL is the closed form log n - (n-1)/n.
    assert methods["best-of-4"]["kl"] == pytest.approx(np.log(4) - 3 / 4, rel=1e-6)


def test_stage_outputs(pipeline_run):
    for stage in ("sft", "rm", "ppo", "dpo"):
        folder = pipeline_run / stage
        assert (folder / "eval.json").exists(), stage
        assert any(folder.glob("events.out.tfevents.*")), f"{stage}: no TensorBoard events"
        assert (folder / "metrics.jsonl").stat().st_size > 0
        assert (folder / "checkpoints").is_dir()
        assert (folder / "hf" / "config.json").exists()
        assert json.loads((folder / "eval.json").read_text())["memory/peak_rss_gib"] > 0, stage
    assert "peak memory (GiB)" in (pipeline_run / "report.md").read_text()
    ppo_metrics = [json.loads(line) for line in (pipeline_run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in ppo_metrics if "rollout/score" in m]
    assert [m["step"] for m in logged] == list(range(1, 13))
    # the critic learns: its values explain the returns of the last rollouts before any update on them
    ev = [m["vf/explained_variance_rollout"] for m in logged]
    assert np.mean(ev[-3:]) > 0.3 and np.mean(ev[:2]) < np.mean(ev[-3:]), ev
    for key in ("rollout/gold", "rollout/kl", "ppo/entropy", "ppo/clipfrac", "vf/loss", "vf/explained_variance",
                "rollout/response_length", "perf/gen_tokens_per_s", "ppo/approx_kl_k3"):
        assert key in logged[-1], key
    assert (pipeline_run / "ppo" / "samples.md").read_text().count("## iteration") >= 2


def _jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_iterated_round_annotates_policy_samples_and_keeps_the_sft_reference(pipeline_run):
    """Round 2 labels pairs of the round-1 policy's samples, retrains the reward model on every
    comparison so far, and continues PPO from the round-1 policy with SFT still the KL reference."""
    round2 = pipeline_run / "round2"
    new = _jsonl(round2 / "new_comparisons.jsonl")
    assert len(new) == 128 and all(row["chosen"] != row["rejected"] for row in new)
    assert len(_jsonl(round2 / "comparisons.jsonl")) == 3840 + 128  # round 1's comparisons + the new ones
    assert len(_jsonl(round2 / "comparisons_eval.jsonl")) == 32
    assert json.loads((round2 / "rm" / "eval.json").read_text())["accuracy"] is not None
    methods = {row["method"] for row in json.loads((pipeline_run / "results.json").read_text())["table"]}
    assert "PPO round 2" in methods
    assert (round2 / "ppo" / "hf" / "model.safetensors").exists()

    def kl_by_iteration(folder):
        return [m["rollout/kl"] for m in _jsonl(folder / "metrics.jsonl") if "rollout/kl" in m]

    # the retrained and the previous reward model are scored on the same held-out policy pairs; the
    # pipeline's scorer reproduces the RM stage's own held-out accuracy (one tie may flip)
    rm = json.loads((pipeline_run / "results.json").read_text())["rm_rounds"]["round2"]
    assert 0.0 <= rm["previous_rm_accuracy"] <= 1.0
    sys.path.insert(0, str(EXPERIMENTS))
    import pipeline

    config = pipeline.PipelineConfig(rm=pipeline.reward_model.RewardConfig())
    eval_pairs = pipeline.load_source(str(round2 / "comparisons_eval.jsonl"), "pairwise")
    rescored = pipeline.rm_pair_accuracy(str(round2 / "rm" / "hf"), eval_pairs, config)
    assert abs(rescored - rm["accuracy"]) <= 1 / 32 + 1e-9

    round1, round2_kl = kl_by_iteration(pipeline_run / "ppo"), kl_by_iteration(round2 / "ppo")
    assert abs(round1[0]) < 0.02  # round 1 starts at its reference: KL 0
    assert round1[-1] > 0.2
    # round 2 starts from the round-1 policy but measures KL to SFT, so it starts where round 1 ended
    assert round2_kl[0] > 0.3 * round1[-1]


def test_iterated_dpo_rounds_continue_the_latest_dpo_policy(pipeline_run, tmp_path):
    """--round-method dpo: round 2 samples pairs from round 1's DPO policy, the annotator labels them and DPO
    continues from that policy on the new pairs; the report gains a DPO round row."""
    out = tmp_path / "run"
    for stage in ("sft", "rm", "ppo", "dpo"):
        shutil.copytree(pipeline_run / stage, out / stage, ignore=shutil.ignore_patterns("checkpoints"))
    proc = _run("pipeline.py", "--out", str(out), "--resume", *PIPELINE_ARGS, "--skip-online", "--skip-best-of-n",
                "--round-method", "dpo", "--pairs-per-round", "64", "--dpo.steps", "8", "--dpo.eval-every", "8",
                "--dpo.num-eval-prompts", "32", timeout=1200)
    assert f"sampling 64 pairs from {out / 'dpo' / 'hf'}" in proc.stdout
    new = _jsonl(out / "round2" / "new_comparisons.jsonl")
    assert len(new) == 64 and not (out / "round2" / "rm").exists() and not (out / "round2" / "ppo").exists()
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["table"]}
    assert "DPO round 2" in rows and rows["DPO round 2"]["kl"] > 0, rows
    first = [json.loads(line) for line in (out / "round2" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert first and all(np.isfinite(m.get("optim/loss", 0.0)) for m in first)


def test_exported_policy_loads_in_transformers(pipeline_run):
    import torch
    import transformers

    from rlhf_jax import models

    hf_dir = pipeline_run / "ppo" / "hf"
    cfg, params = models.load_pretrained(hf_dir)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = tok(["Customer: My order 1234 has not arrived yet.\nAgent: I'm sorry"], return_tensors="np")
    ours = np.asarray(models.forward(cfg, params, ids["input_ids"], ids["attention_mask"]))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor(ids["input_ids"]), attention_mask=torch.tensor(ids["attention_mask"])).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_each_script_cli(pipeline_run, tmp_path):
    """Every script runs alone from the command line with tiny arguments (on a copy of the run)."""
    out = tmp_path / "run"
    shutil.copytree(pipeline_run / "sft" / "hf", out / "sft" / "hf")
    shutil.copytree(pipeline_run / "rm" / "hf", out / "rm" / "hf")
    common = ["--run.out", str(out)]
    _run("sft.py", *common, "--steps", "4", "--eval-every", "4", "--num-eval-samples", "8", "--batch-size", "8",
         "--data.num-train", "64", "--data.num-eval", "16", "--run.out", str(tmp_path / "fresh"))
    assert (tmp_path / "fresh" / "sft" / "hf" / "model.safetensors").exists()
    _run("reward_model.py", *common, "--steps", "3", "--eval-every", "3", "--batch-size", "8",
         "--normalize-samples", "16", "--data.num-train", "64", "--data.num-eval", "16", "--loss", "bt_centered",
         "--run.out", str(tmp_path / "rm_only"), "--model.path", str(out / "sft" / "hf"))
    assert json.loads((tmp_path / "rm_only" / "rm" / "eval.json").read_text())["gain"] > 0
    _run("ppo.py", *common, "--iterations", "2", "--rollout-prompts", "8", "--num-minibatches", "2",
         "--epochs", "1", "--eval-every", "2", "--num-eval-prompts", "8", "--critic", "separate", "--kl.adaptive")
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
         "--data.num-train", "64", "--data.num-eval", "16", "--num-eval-prompts", "8")
    assert (out / "dpo_ipo" / "hf" / "model.safetensors").exists()
    proc = _run("best_of_n.py", *common, "--n", "2", "--num-eval-prompts", "8")
    assert "n=2" in proc.stdout


def test_scripts_on_a_two_device_mesh(pipeline_run, tmp_path):
    """PPO and DPO start the policy and the frozen reference from the same loaded checkpoint; on a
    multi-device mesh they must still get separate buffers, or the donated train step fails."""
    out = tmp_path / "run"
    shutil.copytree(pipeline_run / "sft" / "hf", out / "sft" / "hf")
    shutil.copytree(pipeline_run / "rm" / "hf", out / "rm" / "hf")
    common = ["--run.out", str(out)]
    proc = _run("ppo.py", *common, "--iterations", "2", "--rollout-prompts", "8", "--num-minibatches", "2",
                "--epochs", "1", "--eval-every", "2", "--num-eval-prompts", "8", host_devices=2)
    assert "[ppo] step 2" in proc.stdout
    _run("dpo.py", *common, "--steps", "2", "--eval-every", "2", "--batch-size", "8", "--data.num-train", "32",
         "--data.num-eval", "16", "--num-eval-prompts", "8", host_devices=2)
    assert (out / "dpo" / "hf" / "model.safetensors").exists()


def test_pipeline_resumes_after_kill_during_ppo(pipeline_run, tmp_path):
    """Killed during PPO and restarted with --resume: finished stages are kept, PPO continues from its
    newest checkpoint and completes every iteration exactly once after it."""
    out = tmp_path / "run"
    for stage in ("sft", "rm"):
        shutil.copytree(pipeline_run / stage, out / stage)
    args = ["--out", str(out), "--resume", *PIPELINE_ARGS, "--ppo.iterations", "8", "--ppo.run.save-every", "2",
            "--ppo.eval-every", "8", "--skip-dpo", "--skip-best-of-n", "--skip-online", "--rounds", "1"]
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


# --- Evaluation on a user's own data (rlhf_jax.evaluation) -----------------------------------------

EVAL_KEYS = {"num_prompts", "kl", "response_tokens", "ref_response_tokens", "eos_rate", "ref_eos_rate", "samples"}
RM_KEYS = {"rm_score", "ref_rm_score", "rm_win_rate"}


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


def _check_tables(markdown: str) -> list[list[list[str]]]:
    """Every table in ``markdown`` (rendered by markdown-it's GFM tables) has as many cells in each row
    as in its header; returns the tables' rows."""
    import markdown_it
    from test_evaluation import _Cells

    tables = []
    for chunk in markdown.split("\n\n"):
        if chunk.lstrip().startswith("|"):
            parser = _Cells()
            parser.feed(markdown_it.MarkdownIt("commonmark").enable("table").render(chunk))
            assert parser.rows, f"not a table:\n{chunk}"
            assert len(parser.rows) == len(chunk.strip().splitlines()) - 1, f"rows lost:\n{chunk}"
            assert all(len(r) == len(parser.rows[0]) for r in parser.rows), f"ragged table:\n{chunk}"
            tables.append(parser.rows)
    assert tables, "no table"
    return tables


def _prompt_cell(prompt) -> str:
    from rlhf_jax import evaluation

    return evaluation.prompt_text(prompt).strip()


def test_ppo_and_best_of_n_evaluate_a_user_prompt_file(pipeline_run, tmp_path):
    """With only --data.path, PPO holds out a share of the prompts and evaluates on them (reward model,
    KL, length, EOS rate, samples); best-of-n on the same file evaluates on the same held-out prompts
    against the same reference samples."""
    out = tmp_path / "run"
    shutil.copytree(pipeline_run / "sft" / "hf", out / "sft" / "hf")
    shutil.copytree(pipeline_run / "rm" / "hf", out / "rm" / "hf")
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


def test_dpo_evaluates_a_user_pair_file_without_a_reward_model(pipeline_run, tmp_path):
    rows = [{"prompt": r["prompt"], "chosen": " I'm sorry about this. We will fix it today.", "rejected": " Okay."}
            for r in _user_prompts(40)]
    pairs = _write_jsonl_rows(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    _run("dpo.py", "--model.path", str(pipeline_run / "sft" / "hf"), "--run.out", str(out), "--data.path", str(pairs),
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
