"""The pipeline script end to end, in a subprocess, on the embedded default with small budgets.

One small pipeline run (module fixture) is shared: its report and results are checked and its
exports are loaded in transformers; the iterated rounds (PPO and DPO) continue it with --resume. Its SFT and
reward model come from ``pipeline_models`` (pipeline.py --stop-after rm, made once per test session and shared
with tests/test_overoptimise_preset.py).
Each stage script's own CLI, a mesh run, kill and --resume and the scripts on a user's files are in
tests/test_experiments_scripts.py, so that `pytest -n 2 --dist loadfile` runs them beside this file.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

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
    "--ppo.iterations", "12", "--ppo.rollout-prompts", "32", "--ppo.eval-every", "4",
    "--ppo.optim.learning-rate", "1e-4",
    "--ppo.num-eval-prompts", "128", "--ppo.run.save-every", "6",
    # DPO, best-of-n and the online methods at smaller budgets than PPO: their rows only need to exist here (the
    # README's table runs them at PPO's full budget); best-of-n's KL is a closed form whatever the prompt count
    "--dpo.steps", "24", "--dpo.eval-every", "24", "--dpo.num-eval-prompts", "48",
    "--dpo.data.num-train", "768", "--dpo.data.num-eval", "64",
    "--bon.n", "4", "--bon.num-eval-prompts", "48", "--bon.curve-n", "16", "--bon.curve-prompts", "32",
    # the online methods: 32 responses per iteration as PPO, fewer iterations
    *[arg for stage, prompts in (("grpo", "8"), ("rloo", "8"), ("online-dpo", "16")) for arg in (
        f"--{stage}.iterations", "4", f"--{stage}.rollout-prompts", prompts, f"--{stage}.eval-every", "4",
        f"--{stage}.optim.learning-rate", "1e-4", f"--{stage}.num-eval-prompts", "32", f"--{stage}.epochs", "2")],
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


@pytest.fixture(scope="session")
def pipeline_models(tmp_path_factory) -> pathlib.Path:
    """A run folder with the pipeline's sft/ and rm/ at PIPELINE_ARGS' budgets (``pipeline.py --stop-after rm``),
    made once per test session even when pytest-xdist spreads its users over several workers (the first to get
    the lock trains them, the others wait and reuse them)."""
    from filelock import FileLock
    from notebook_runner import session_dir

    root = session_dir(tmp_path_factory)
    out = root / "pipeline_models"
    with FileLock(str(root / "pipeline_models.lock")):
        if not (out / "rm" / "eval.json").exists():
            shutil.rmtree(out, ignore_errors=True)
            proc = _run("pipeline.py", "--out", str(out), "--stop-after", "rm", *PIPELINE_ARGS, timeout=1800)
            assert "stopped after the reward model" in proc.stdout and not (out / "ppo").exists()
    return out


def copy_stages(src: pathlib.Path, dst: pathlib.Path, stages=("sft", "rm"), checkpoints: bool = True) -> pathlib.Path:
    """``dst`` with copies of ``src``'s stage folders (which ``pipeline.py --resume`` keeps)."""
    for stage in stages:
        shutil.copytree(src / stage, dst / stage, ignore=None if checkpoints else shutil.ignore_patterns("checkpoints"))
    return dst


@pytest.fixture(scope="module")
def pipeline_run(pipeline_models, tmp_path_factory) -> pathlib.Path:
    out = copy_stages(pipeline_models, tmp_path_factory.mktemp("pipeline") / "run")
    proc = _run("pipeline.py", "--out", str(out), "--resume", *PIPELINE_ARGS, timeout=2700)
    assert "SFT: finished earlier, kept" in proc.stdout and "reward model: finished earlier, kept" in proc.stdout
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


def test_overoptimisation_curves_in_results_and_plot(pipeline_run):
    """PPO's held-out evaluations (every 4 iterations) and best-of-n for n = 1, 2, 4, 8, 16 become curves of gold and proxy
    against d = sqrt(KL), with Gao et al.'s fits, in results.json and overoptimisation.png."""
    results = json.loads((pipeline_run / "results.json").read_text())
    curves = results["overoptimisation"]
    assert (pipeline_run / "overoptimisation.png").stat().st_size > 1000
    ppo = curves["PPO"]
    assert ppo["form"] == "rl" and [p["step"] for p in ppo["points"]] == [0, 4, 8, 12]
    evals = [m for m in _jsonl(pipeline_run / "ppo" / "metrics.jsonl") if "eval/kl" in m]
    for point, m in zip(ppo["points"][1:], evals):  # gold and proxy relative to the SFT samples' scores
        assert point["d"] == pytest.approx(np.sqrt(max(m["eval/kl"], 0.0)))
        assert point["gold"] == pytest.approx(m["eval/gold"] - m["eval/ref_gold"])
        assert point["proxy"] == pytest.approx(m["eval/rm_score"] - m["eval/ref_rm_score"])
    methods = {row["method"]: row for row in results["table"]}  # the last evaluation is PPO's row in the table
    assert ppo["points"][-1]["gold"] == pytest.approx(methods["PPO"]["gold"] - methods["SFT"]["gold"], abs=1e-6)
    bon = curves["best-of-n"]
    n = np.array([1, 2, 4, 8, 16])
    assert bon["form"] == "bon" and [p["step"] for p in bon["points"]] == n.tolist()
    np.testing.assert_allclose([p["d"] ** 2 for p in bon["points"]], np.log(n) - (n - 1) / n, atol=1e-9)
    assert bon["points"][0]["gold"] == pytest.approx(0.0, abs=1e-6)  # best-of-1 is the SFT's own sample
    for c in (ppo, bon):
        assert np.isfinite(c["fit_gold"]["alpha"]) and np.isfinite(c["fit_proxy"]["beta"]), c


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


# Round 2 of --rounds 2, resumed on a copy of the round-1 run: round 1's stages are kept (their budgets above),
# round 2's reward model and PPO take these smaller ones (what is checked of them does not depend on their length).
ROUND2_ARGS = ["--rounds", "2", "--pairs-per-round", "64", "--skip-online", "--skip-best-of-n", "--skip-dpo",
               "--rm.steps", "16", "--rm.eval-every", "16", "--rm.normalize-samples", "32",
               "--ppo.iterations", "2", "--ppo.eval-every", "2", "--ppo.num-eval-prompts", "32", "--ppo.run.save-every", "2"]


def test_iterated_round_annotates_policy_samples_and_keeps_the_sft_reference(pipeline_run, tmp_path):
    """Round 2 labels pairs of the round-1 policy's samples, retrains the reward model on every
    comparison so far, and continues PPO from the round-1 policy with SFT still the KL reference."""
    run = tmp_path / "run"
    for stage in ("sft", "rm", "ppo"):
        shutil.copytree(pipeline_run / stage, run / stage, ignore=shutil.ignore_patterns("checkpoints"))
    proc = _run("pipeline.py", "--out", str(run), "--resume", *PIPELINE_ARGS, *ROUND2_ARGS, timeout=1200)
    assert f"sampling 64 pairs from {run / 'ppo' / 'hf'}" in proc.stdout
    round2 = run / "round2"
    new = _jsonl(round2 / "new_comparisons.jsonl")
    assert len(new) == 64 and all(row["chosen"] != row["rejected"] for row in new)
    assert len(_jsonl(round2 / "comparisons.jsonl")) == 3840 + 64  # round 1's comparisons + the new ones
    assert len(_jsonl(round2 / "comparisons_eval.jsonl")) == 16
    assert json.loads((round2 / "rm" / "eval.json").read_text())["accuracy"] is not None
    methods = {row["method"] for row in json.loads((run / "results.json").read_text())["table"]}
    assert "PPO round 2" in methods
    assert (round2 / "ppo" / "hf" / "model.safetensors").exists()

    def kl_by_iteration(folder):
        return [m["rollout/kl"] for m in _jsonl(folder / "metrics.jsonl") if "rollout/kl" in m]

    # the retrained and the previous reward model are scored on the same held-out policy pairs; the
    # pipeline's scorer reproduces the RM stage's own held-out accuracy (one tie may flip)
    rm = json.loads((run / "results.json").read_text())["rm_rounds"]["round2"]
    assert 0.0 <= rm["previous_rm_accuracy"] <= 1.0
    sys.path.insert(0, str(EXPERIMENTS))
    import pipeline

    config = pipeline.PipelineConfig(rm=pipeline.reward_model.RewardConfig())
    eval_pairs = pipeline.load_source(str(round2 / "comparisons_eval.jsonl"), "pairwise")
    rescored = pipeline.rm_pair_accuracy(str(round2 / "rm" / "hf"), eval_pairs, config)
    assert abs(rescored - rm["accuracy"]) <= 1 / 16 + 1e-9  # 16 held-out pairs

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
                "--rounds", "2", "--round-method", "dpo", "--pairs-per-round", "64", "--dpo.steps", "8", "--dpo.eval-every", "8",
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


# --- Evaluation on a user's own data (rlhf_jax.evaluation) -----------------------------------------

EVAL_KEYS = {"num_prompts", "kl", "response_tokens", "ref_response_tokens", "eos_rate", "ref_eos_rate", "samples"}
RM_KEYS = {"rm_score", "ref_rm_score", "rm_win_rate"}


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


