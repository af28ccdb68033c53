"""experiments/pipeline.py's command line and report, in process (no training):

``--preset smollm2`` starts from SmolLM2's budgets and flags given with it override them; no preset is
the embedded default; an unknown preset is an error naming the choices. The report of a run from a
pretrained model has a "starting model" row, a "win rate vs starting model" column and a table of
the starting model's replies, in well-formed Markdown tables.
"""
from __future__ import annotations

import dataclasses
import sys

import pytest

from smollm2 import smollm2_gguf
from test_experiments import EXPERIMENTS, _check_tables

sys.path.insert(0, str(EXPERIMENTS))
import pipeline  # noqa: E402


def test_no_preset_is_the_embedded_default():
    assert pipeline.cli([]) == pipeline.PipelineConfig() == pipeline.cli(["--preset", "embedded"])
    assert pipeline.PipelineConfig().sft.model.path is None


def test_smollm2_preset_points_every_stage_at_the_wheels_gguf_and_flags_override_it():
    cfg = pipeline.cli(["--preset", "smollm2", "--ppo.iterations", "3", "--rm.steps", "5"])
    assert cfg.sft.model.path == str(smollm2_gguf())
    assert cfg.ppo.iterations == 3 and cfg.rm.steps == 5 != pipeline.smollm2_preset().rm.steps  # overridden
    preset = pipeline.smollm2_preset()
    assert dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, iterations=preset.ppo.iterations),
                               rm=dataclasses.replace(cfg.rm, steps=preset.rm.steps)) == preset  # the rest kept
    # the preset is not the toy's: pretrained learning rates and budgets
    embedded = pipeline.PipelineConfig()
    assert preset.sft.optim.learning_rate != embedded.sft.optim.learning_rate
    assert preset.ppo.iterations < embedded.ppo.iterations and preset.out != embedded.out
    assert pipeline.cli(["--ppo.iterations", "3", "--preset=smollm2"]).sft.model.path == str(smollm2_gguf())


def test_an_unknown_preset_names_the_choices():
    with pytest.raises(SystemExit, match=r"--preset 'nope': choose one of \['embedded', 'overoptimise', 'smollm2'\]"):
        pipeline.cli(["--preset", "nope"])


def _results(with_start: bool) -> dict:
    ppo = {"ref_gold": -0.2, "gold": 0.6, "win_rate": 0.74, "kl": 2.9}
    dpo = {"gold": 0.2, "win_rate": 0.63, "kl": 1.3}
    results = {"rm": {"accuracy": 0.758, "agreement_ceiling": 0.904}, "ppo": ppo, "dpo": dpo}
    if with_start:
        results["start"] = {
            "gold": -0.9,
            "methods": {"PPO": {"win_rate_vs_start": 0.896, "sft_win_rate_vs_start": 0.74, "start_gold": -0.9},
                        "DPO": {"win_rate_vs_start": 0.802, "sft_win_rate_vs_start": 0.74, "start_gold": -0.9}},
            "samples": [{"prompt": "user: What | is 2+2?\nassistant:", "response": "It is\n4.", "gold": -0.5}],
        }
    return results


def test_report_against_the_starting_model(tmp_path):
    report = pipeline.write_report(tmp_path, _results(True), {"SFT": 245.0, "total": 2342.0}, peaks={"SFT": 4.87})
    text = report.read_text()
    main, timings, samples = _check_tables(text)
    assert main[0] == ["method", "gold score", "win rate vs SFT (gold judge)", "win rate vs starting model",
                       "KL to SFT (nats)"]
    rows = {r[0]: r[1:] for r in main[1:]}
    assert list(rows) == ["starting model", "SFT", "PPO", "DPO"]
    assert rows["starting model"] == ["-0.900", "-", "50.0%", "-"]
    assert rows["SFT"] == ["-0.200", "50.0%", "74.0%", "0.00"]
    assert rows["PPO"] == ["0.600", "74.0%", "89.6%", "2.90"]
    assert rows["DPO"][2] == "80.2%"
    assert timings[1:] == [["SFT", "245", "4.87"], ["total", "2342", "-"]]
    assert "## Starting model samples" in text
    assert samples[0] == ["prompt", "starting model", "gold"] and samples[1][2] == "-0.50"
    assert "What | is 2+2?" in samples[1][0]  # the pipe stays inside its cell


def test_report_without_a_starting_model_has_no_such_column(tmp_path):
    text = pipeline.write_report(tmp_path, _results(False), {"total": 1.0}, peaks={}).read_text()
    main = _check_tables(text)[0]
    assert "win rate vs starting model" not in main[0] and [r[0] for r in main[1:]] == ["SFT", "PPO", "DPO"]
    assert "Starting model samples" not in text
