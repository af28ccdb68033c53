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
    assert cfg == _PPO(optim=_Optim(3e-5), sample=_Sample(32, 48, 64), rollout_prompts=64)
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
