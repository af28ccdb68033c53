"""Run records across restarts: metrics.jsonl continues without duplicate steps, samples.md likewise,
and checkpoint saves log no orbax OCDBT warning while old checkpoints still restore."""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax import checkpoint, evaluation, trainer
from rlhf_jax.configs import CheckpointConfig
from rlhf_jax.logging import MetricsLogger, read_metrics
from rlhf_jax.train_state import TrainState


def _steps(folder) -> list[int]:
    return [m["step"] for m in read_metrics(folder)]


def test_resumed_logger_drops_entries_past_the_restored_step(tmp_path):
    with MetricsLogger(tmp_path, stage="x", console=False, resume_from=0) as log:
        for step in range(1, 6):
            log.log(step, {"a": step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "x", "step": 6, "a"')  # the killed run's half-written last line
    with MetricsLogger(tmp_path, stage="x", console=False, resume_from=3) as log:  # resumed from checkpoint 3
        log.log(4, {"a": 40})
    assert _steps(tmp_path) == [1, 2, 3, 4]
    assert read_metrics(tmp_path)[-1]["a"] == 40
    with MetricsLogger(tmp_path, stage="x", console=False) as log:  # plain append (a final evaluation)
        log.log(4, {"eval/b": 1})
    assert _steps(tmp_path) == [1, 2, 3, 4, 4]
    with MetricsLogger(tmp_path, stage="x", console=False, resume_from=0) as log:  # a fresh run starts anew
        log.log(1, {"a": 1})
    assert _steps(tmp_path) == [1]


def test_broken_line_inside_metrics_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    try:
        MetricsLogger(tmp_path, stage="x", console=False, resume_from=1)
    except ValueError as error:
        assert "metrics.jsonl:2" in str(error)
    else:
        raise AssertionError("a broken line in the middle was dropped silently")


def test_samples_file_continues_like_the_metrics(tmp_path):
    path = tmp_path / "samples.md"
    with evaluation.open_samples_file(path, resume_from=0) as f:
        for it in (1, 2, 3):
            f.write(f"\n## iteration {it} (rollout)\n\n| a |\n|---|\n| {it} |\n")
    with evaluation.open_samples_file(path, resume_from=2) as f:
        f.write("\n## iteration 3 (rollout)\n\n| a |\n|---|\n| again |\n")
    text = path.read_text()
    assert text.count("## iteration 3") == 1 and "again" in text and "| 3 |" not in text
    assert text.count("## iteration") == 3


def _state():
    return TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.arange(3.0)}, opt_state=(), frozen={})


def test_checkpoint_save_logs_no_ocdbt_warning_and_restores_the_rng(tmp_path, caplog):
    manager = checkpoint.make_checkpoint_manager(CheckpointConfig(directory=str(tmp_path), save_every=1,
                                                                  async_save=False))
    key = jax.random.fold_in(jax.random.key(3), 7)
    with caplog.at_level(logging.WARNING):
        checkpoint.save(manager, 1, _state(), rng=key, data_state={"index": 5}, config={"x": 1}, force=True)
        manager.wait_until_finished()
    assert not [r for r in caplog.records if "OCDBT" in r.getMessage()], [r.getMessage() for r in caplog.records]
    restored = checkpoint.restore(manager, trainer.abstract_of(_state()))
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(key))
    assert jax.random.key_impl(restored.rng) == jax.random.key_impl(key)
    assert restored.data_state == {"index": 5} and restored.config == {"x": 1}
    manager.close()


def test_checkpoints_written_with_orbax_random_key_item_still_restore(tmp_path):
    """The layout before this change: the key in its own ``rng`` item (JaxRandomKeySave)."""
    manager = checkpoint.make_checkpoint_manager(CheckpointConfig(directory=str(tmp_path), save_every=1,
                                                                  async_save=False))
    key = jax.random.key(11)
    args = ocp.args.Composite(state=ocp.args.StandardSave(_state()), rng=ocp.args.JaxRandomKeySave(key),
                              data=ocp.args.JsonSave({"index": 2}), config=ocp.args.JsonSave({}))
    manager.save(4, args=args, force=True)
    manager.wait_until_finished()
    restored = checkpoint.restore(manager, trainer.abstract_of(_state()))
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(key))
    assert restored.step == 4 and restored.data_state == {"index": 2}
    np.testing.assert_array_equal(restored.state.params["w"], np.arange(3.0))
    manager.close()
