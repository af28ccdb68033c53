"""Model-dependent defaults: the toy's values reach only the toy, and what is chosen is said."""
import dataclasses
import json

import pytest

from rlhf_jax import defaults, models
from rlhf_jax.data import embedded


@dataclasses.dataclass(frozen=True)
class _Optim:
    learning_rate: float | None = None


@dataclasses.dataclass(frozen=True)
class _Sample:
    max_prompt_len: int | None = None
    max_new_tokens: int | None = None
    batch_size: int | None = None


@dataclasses.dataclass(frozen=True)
class _PPO:
    optim: _Optim = _Optim()
    sample: _Sample = _Sample()
    rollout_prompts: int | None = None


def _embedded_cfg():
    return models.ModelConfig.from_hf_config(json.loads((embedded.embedded_dir() / "config.json").read_text()))


def test_model_kind_tells_the_toy_from_any_other_checkpoint():
    toy = _embedded_cfg()
    assert defaults.model_kind(toy) == "embedded"
    assert defaults.model_kind(dataclasses.replace(toy, remat=True)) == "embedded"  # run options are not the model
    assert defaults.model_kind(dataclasses.replace(toy, n_layers=toy.n_layers + 1)) == "pretrained"
    assert defaults.model_kind(dataclasses.replace(toy, vocab_size=49152)) == "pretrained"


def test_embedded_values_are_the_tuned_ones_and_print_nothing():
    lines = []
    cfg = defaults.resolve(_PPO(), "ppo", kind="embedded", printer=lines.append)
    assert cfg == _PPO(optim=_Optim(3e-5), sample=_Sample(48, 48, 64), rollout_prompts=64)
    assert lines == []


def test_pretrained_values_come_from_the_data_and_are_printed():
    lines = []
    cfg = defaults.resolve(_PPO(), "ppo", kind="pretrained", facts={"longest_prompt": 61, "num_prompts": 12},
                           printer=lines.append)
    assert cfg.optim.learning_rate == 3e-6
    assert cfg.sample.max_prompt_len == 64  # 61 rounded up to a multiple of 16: nothing is cut
    assert cfg.rollout_prompts == 12 and cfg.sample.batch_size == 12  # a 12-prompt file makes a batch
    assert len(lines) == 1 and "rollout_prompts=12" in lines[0] and "only 12 prompts" in lines[0]
    assert "optim.learning_rate=3e-06" in lines[0]


def test_a_value_given_by_the_user_is_kept():
    given = _PPO(optim=_Optim(1e-4), rollout_prompts=8)
    cfg = defaults.resolve(given, "ppo", kind="pretrained", facts={"longest_prompt": 10, "num_prompts": 100},
                           printer=None)
    assert cfg.optim.learning_rate == 1e-4 and cfg.rollout_prompts == 8
    assert cfg.sample.batch_size == 64


def test_a_missing_fact_is_named():
    with pytest.raises(KeyError, match="longest_prompt"):
        defaults.resolve(_PPO(), "ppo", kind="pretrained", facts={"num_prompts": 3}, printer=None)


def test_max_len_never_exceeds_the_model_positions():
    @dataclasses.dataclass(frozen=True)
    class _SFT:
        optim: _Optim = _Optim()
        sample: _Sample = _Sample()
        max_len: int | None = None

    cfg = defaults.resolve(_SFT(), "sft", kind="pretrained", printer=None,
                           facts={"longest_example": 2050, "longest_prompt": 40, "max_positions": 2048})
    assert cfg.max_len == 2048


# --- the scripts resolve their auto fields (sft.py in-process, tiny budgets) ----------------------

import importlib.util
import pathlib
import shutil
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_exp_{name}", _ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(module)
    return module


def test_sft_on_the_embedded_model_resolves_to_the_tuned_values():
    sft = _script("sft")
    from rlhf_jax import cli, model_io
    model_cfg, _, tokenizer = model_io.load_lm(cli.ModelArgs())
    cfg = sft.resolve_config(sft.SFTConfig(), model_cfg, tokenizer, [])
    assert (cfg.optim.learning_rate, cfg.max_len, cfg.sample.max_prompt_len, cfg.sample.max_new_tokens) == (2e-3, 96, 48, 48)


def test_optimizer_refuses_an_unresolved_learning_rate():
    from rlhf_jax.configs import OptimizerConfig
    from rlhf_jax.train_state import make_optimizer
    with pytest.raises(ValueError, match="learning-rate"):
        make_optimizer(OptimizerConfig(learning_rate=None))


def _pretrained_dir(tmp_path):
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from hf_fixtures import make_tiny_checkpoint
    src = embedded.embedded_dir()  # its tokenizer, on a model that is not the embedded architecture
    path = make_tiny_checkpoint("llama", tmp_path / "tiny", vocab_size=1024, bos_token_id=0, eos_token_id=1,
                                pad_token_id=2, max_position_embeddings=128)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy(src / name, path / name)
    return path


def test_sft_on_a_pretrained_model_prints_its_defaults_and_fits_max_len_to_the_data(tmp_path, capsys):
    sft = _script("sft")
    from rlhf_jax import cli, model_io
    from rlhf_jax.data import sources
    path = _pretrained_dir(tmp_path)
    data = tmp_path / "demos.jsonl"
    rows = [{"prompt": f"say {w}", "completion": f"{w} {w} {w}"} for w in ["red", "green", "blue", "yellow", "cyan", "pink", "black", "white", "grey", "brown"]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = sft.SFTConfig(model=cli.ModelArgs(path=str(path)),
                        data=cli.DataArgs(path=str(data), eval_fraction=0.0),
                        run=cli.RunArgs(out=str(tmp_path / "run"), log_every=1, save_every=100),
                        steps=2, batch_size=8, eval_every=0, num_eval_samples=0)
    model_cfg, _, tokenizer = model_io.load_lm(cfg.model)
    assert defaults.model_kind(model_cfg) == "pretrained"
    train_rows = sources.rows_from(cfg.data, "sft", "train", None)
    from rlhf_jax.data import encode
    longest = max(e.length for e in encode(train_rows, tokenizer, max_len=128))
    resolved = sft.resolve_config(cfg, model_cfg, tokenizer, train_rows)
    assert resolved.optim.learning_rate == 1e-5 != 2e-3
    assert resolved.max_len == defaults.round_up(longest) and resolved.max_len != 96
    result = sft.main(cfg)
    printed = capsys.readouterr().out
    assert "[sft] defaults for a pretrained model" in printed and f"max_len={resolved.max_len}" in printed
    assert "[sft] peak memory" in printed
    saved = json.loads((tmp_path / "run" / "sft" / "eval.json").read_text())
    assert saved["memory/peak_rss_gib"] > 0 and result["memory/peak_rss_gib"] == saved["memory/peak_rss_gib"]


def test_every_script_resolves_the_embedded_model_to_todays_values():
    from rlhf_jax import cli, model_io
    from rlhf_jax.data import PromptRow
    model_cfg, _, tokenizer = model_io.load_lm(cli.ModelArgs())
    prompts = [PromptRow(prompt=f"p{i}") for i in range(64)]
    rm = _script("reward_model").resolve_config(_script("reward_model").RewardConfig(), model_cfg, tokenizer, [])
    assert (rm.optim.learning_rate, rm.max_len, rm.sample.max_prompt_len, rm.sample.max_new_tokens) == (3e-4, 96, 48, 48)
    dpo = _script("dpo").resolve_config(_script("dpo").DPOConfig(), model_cfg, tokenizer, [])
    assert (dpo.optim.learning_rate, dpo.max_len, dpo.sample.max_prompt_len, dpo.sample.max_new_tokens) == (3e-5, 96, 48, 48)
    from rlhf_jax.rl.loop import resolve_config
    from rlhf_jax.rl.policy_gradient import RLConfig
    ppo = resolve_config(RLConfig(), "ppo", model_cfg, tokenizer, prompts)
    assert (ppo.optim.learning_rate, ppo.rollout_prompts, ppo.sample.batch_size, ppo.sample.max_prompt_len,
            ppo.sample.max_new_tokens) == (3e-5, 64, 64, 48, 48)
    bon = _script("best_of_n").resolve_config(_script("best_of_n").BestOfNConfig(), model_cfg, tokenizer, prompts)
    assert (bon.sample.max_prompt_len, bon.sample.max_new_tokens) == (48, 48)


def test_ppo_rollout_fits_a_small_prompt_file_and_a_larger_request_is_refused(tmp_path):
    from rlhf_jax import cli, model_io
    from rlhf_jax.data import PromptRow
    from rlhf_jax.rl.loop import resolve_config
    from rlhf_jax.rl.policy_gradient import RLConfig
    model_cfg, _, tokenizer = model_io.load_lm(cli.ModelArgs(path=str(_pretrained_dir(tmp_path))))
    prompts = [PromptRow(prompt=f"tell me about the number {i}") for i in range(12)]
    cfg = resolve_config(RLConfig(), "ppo", model_cfg, tokenizer, prompts)
    assert cfg.rollout_prompts == 12 and cfg.sample.batch_size == 12 and cfg.optim.learning_rate == 3e-6
    # a grouped method keeps the responses per iteration: 12 prompts' worth of rows as 3 prompts x 4 samples
    grpo = resolve_config(RLConfig(algo="grpo"), "grpo", model_cfg, tokenizer, prompts, num_samples=4)
    assert grpo.rollout_prompts == 3
    with pytest.raises(ValueError, match=r"--rollout-prompts 20 .*12 training prompts"):
        resolve_config(RLConfig(rollout_prompts=20), "ppo", model_cfg, tokenizer, prompts)
