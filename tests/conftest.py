"""Test-session setup: 8 simulated CPU devices (for mesh tests) and a persistent compile cache.

XLA_FLAGS must be set before jax is imported anywhere, which is why it lives here.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

_CACHE = os.environ.get("RLHF_JAX_TEST_COMPILE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "jax_test"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory) -> pathlib.Path:
    """A briefly trained SFT model of the embedded default (experiments/sft.py, 60 steps): the policy / backbone
    the script tests start from (tests/test_feedback_kinds.py, tests/test_experiments_scripts.py). Made once per
    test session even when pytest-xdist spreads those tests over several workers (the first one to get the lock
    trains it, the others wait and reuse it); returns its sft/hf/ folder (sft/eval.json beside it)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    out = root / "shared_sft"
    with FileLock(str(root / "shared_sft.lock")):
        if not (out / "sft" / "eval.json").exists():
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            env.pop("XLA_FLAGS", None)  # one CPU device, like a user's laptop
            env.setdefault("RLHF_JAX_COMPILE_CACHE", str(ROOT / ".cache" / "jax_scripts"))
            args = ["--steps", "60", "--eval-every", "0", "--num-eval-samples", "0", "--batch-size", "16",
                    "--data.num-train", "960", "--data.num-eval", "16", "--run.out", str(out), "--run.save-every", "1000"]
            proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "sft.py"), *args], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise AssertionError(f"sft.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                     f"{proc.stderr[-5000:]}")
    return out / "sft" / "hf"


LONGEST_FIRST = [
    "test_experiments.py", "test_smollm2_scripts.py", "test_experiments_scripts.py", "test_overoptimise_preset.py",
    "test_feedback_kinds.py", "test_steps.py", "test_fused_logps.py", "test_notebook_ppo_anatomy.py",
    "test_feedback_web.py", "test_rollout.py", "test_notebook_preference_ablation.py", "test_lora.py", "test_gguf.py",
    "test_feedback_load.py", "test_custom_policy_loss.py", "test_reward_normalisation.py",
    "test_notebook_overoptimisation.py", "test_notebook_custom_loss.py",
]
"""Test files by their time in the suite's ``--durations`` (longest first; the rest follow in collection order).
``pytest -n 2 --dist loadfile`` (with ``--no-loadscope-reorder`` from pyproject.toml) hands files to the workers
in this order, so the long ones start early instead of ending the run on one worker while the other idles.
test_overoptimise_preset.py waits for the pipeline models test_experiments.py builds first."""


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept
