"""``experiments/pipeline.py --preset overoptimise`` end to end, in a subprocess, on the session's pipeline SFT and
reward model (``pipeline_models`` of tests/test_experiments.py; this file is apart so that `pytest -n 2 --dist
loadfile` runs it beside the pipeline's own run, not after it).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from test_experiments import PIPELINE_ARGS, _jsonl, _run, copy_stages, pipeline_models  # noqa: F401 (a fixture)


# --preset overoptimise (PPO with no KL penalty, a worst-case ensemble of three reward models beside the single one)
# at a small budget: PPO's learning rate raised so that 24 iterations reach the KL (tens of nats) where the single
# reward model's gold falls; the two extra members train for the first one's 120 steps on half its batch (1,920
# comparisons: held-out accuracy 0.71 and 0.73 against its 0.76, and the worst case's gold peak 1.96 against the
# single reward model's 1.66 on 2026-12-08), half the members' cost. Much weaker members do not protect: at 40 steps of
# the full batch the worst case falls as well. PPO without a KL penalty at this learning rate is chaotic
# (float-rounding differences change where gold peaks), so the margins are set from two runs that differ only in
# rounding (full and chunked logits): gold fell 0.58 and 0.95 below its peak.
OVEROPTIMISE_ARGS = ["--preset", "overoptimise", "--ppo.iterations", "24", "--ppo.rollout-prompts", "32",
                     "--ppo.eval-every", "3", "--ppo.num-eval-prompts", "64", "--ppo.optim.learning-rate", "3e-4",
                     "--ppo.run.save-every", "100", "--bon.n", "4", "--bon.num-eval-prompts", "32", "--bon.curve-n", "4",
                     "--bon.curve-prompts", "16"]


def test_overoptimise_preset_turns_and_the_worst_case_ensemble_keeps_gold(pipeline_models, tmp_path):  # noqa: F811
    """Gao et al.'s over-optimisation, measured: without a KL penalty PPO's proxy (reward-model) score keeps rising
    while its gold score peaks and falls; judged by the worst case of three reward models (Coste et al. 2023)
    PPO's gold peak is at least the single reward model's."""
    out = copy_stages(pipeline_models, tmp_path / "run", checkpoints=False)
    rm_budget = PIPELINE_ARGS[PIPELINE_ARGS.index("--rm.steps"):PIPELINE_ARGS.index("--rm.data.num-eval") + 2]
    proc = _run("pipeline.py", "--out", str(out), "--resume", *rm_budget, "--rm.batch-size", "16", *OVEROPTIMISE_ARGS,
                timeout=2400)
    assert "PPO (worst of 3 reward models)" in proc.stdout
    assert not (out / "dpo").exists() and not (out / "grpo").exists()  # the preset skips DPO and the online methods
    assert all(m.get("kl/coef", 0.0) == 0.0 for m in _jsonl(out / "ppo" / "metrics.jsonl"))  # beta = 0
    for seed in (1, 2):  # the members: the same budget, other run seeds
        assert json.loads((out / "ensemble" / f"seed{seed}" / "rm" / "eval.json").read_text())["accuracy"] > 0.65
    curves = json.loads((out / "results.json").read_text())["overoptimisation"]
    assert {"PPO", "PPO (RM ensemble)", "best-of-n", "best-of-n (RM ensemble)"} <= set(curves), sorted(curves)

    def column(name, key):
        return np.array([p[key] for p in curves[name]["points"]])

    gold, proxy = column("PPO", "gold"), column("PPO", "proxy")
    peak = int(np.argmax(gold))
    assert 0 < peak < len(gold) - 1, gold  # an interior gold peak ...
    assert gold[-1] < gold[peak] - 0.25, gold  # ... that gold falls below by the end (the curve turns)
    assert proxy[-1] > proxy[peak] + 0.5, proxy  # while the proxy keeps rising past it
    assert column("PPO", "d")[-1] > column("PPO", "d")[peak]  # further from SFT, not back towards it
    ensemble_gold = column("PPO (RM ensemble)", "gold")
    assert ensemble_gold.max() >= gold.max(), (ensemble_gold, gold)
    assert curves["PPO"]["peak_gold"]["gold"] == pytest.approx(gold.max()) and curves["PPO"]["peak_gold"]["step"] == 3 * peak
    for name in ("PPO", "PPO (RM ensemble)"):
        assert np.isfinite(curves[name]["fit_gold"]["alpha"]), curves[name]
