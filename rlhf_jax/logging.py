"""Experiment logging: TensorBoard event files, a JSONL copy, and one console line per log call.

The JSONL copy (``metrics.jsonl``) is what reports and tests read back; TensorBoard is for people.
Values are host floats: call :func:`rlhf_jax.metrics.to_floats` on device metrics first.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping


def _summary_writer_class():
    """tensorboardX's ``SummaryWriter``, imported without PyTorch: ``tensorboardX.writer`` imports torch
    when it is installed (only to accept torch tensors, which we never log), which costs about 1 s and
    0.2 GB of resident memory in every run of an environment that has torch (the test oracle's)."""
    import sys

    if "tensorboardX.writer" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError inside tensorboardX's try block
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]  # a later `import torch` works as usual
    return SummaryWriter


class NonFiniteMetricError(FloatingPointError):
    """A logged metric became NaN/inf; the message names the metric and the step where it began."""


class MetricsLogger:
    """Writes scalars to ``<logdir>/`` (TensorBoard) and ``<logdir>/metrics.jsonl``.

    ``check_finite`` raises :class:`NonFiniteMetricError` at the first NaN/inf so a run never ends
    in NaN without saying where it began.

    ``resume_from``: the step a training loop starts after (0 for a fresh run, the restored
    checkpoint's step on resume). Entries of an earlier run past that step are dropped from
    ``metrics.jsonl`` and purged from TensorBoard (``purge_step``), so a resumed run continues the
    file without a second copy of any step and a fresh run over the same folder starts it anew.
    ``None`` (default) only appends, e.g. a final evaluation logged after the loop has closed.
    """

    def __init__(self, logdir: str | os.PathLike, *, stage: str, check_finite: bool = True, console: bool = True,
                 resume_from: int | None = None):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self.check_finite = check_finite
        self.console = console
        path = self.logdir / "metrics.jsonl"
        if resume_from is not None and path.exists():
            path.write_text("".join(_entries_up_to(path, resume_from)), encoding="utf-8")
        purge = None if resume_from is None else resume_from + 1
        self._writer = _summary_writer_class()(str(self.logdir), purge_step=purge)
        self._jsonl = open(path, "a", encoding="utf-8")

    def log(self, step: int, values: Mapping[str, float], *, print_keys: tuple[str, ...] | None = None) -> None:
        if self.check_finite:
            bad = [k for k, v in values.items() if not math.isfinite(float(v))]
            if bad:
                raise NonFiniteMetricError(f"[{self.stage}] step {step}: non-finite metric(s) {bad}: "
                                           f"{ {k: values[k] for k in bad} }")
        for k, v in values.items():
            self._writer.add_scalar(f"{self.stage}/{k}", float(v), step)
        self._jsonl.write(json.dumps({"stage": self.stage, "step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n")
        self._jsonl.flush()
        if self.console:
            keys = print_keys if print_keys is not None else tuple(values)
            shown = "  ".join(f"{k}={float(values[k]):.4g}" for k in keys if k in values)
            print(f"[{self.stage}] step {step}  {shown}", flush=True)

    def text(self, step: int, tag: str, text: str) -> None:
        self._writer.add_text(f"{self.stage}/{tag}", text, step)

    def close(self) -> None:
        self._writer.close()
        self._jsonl.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _entries_up_to(path: Path, step: int) -> list[str]:
    """The lines of ``path`` logged at steps <= ``step``. A last line cut short (the run was killed
    while writing it) is dropped; a broken line elsewhere is an error naming it."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = []
    for i, line in enumerate(lines):
        try:
            entry_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError) as error:
            if i == len(lines) - 1:
                continue
            raise ValueError(f"{path}:{i + 1}: not a metrics entry ({error}): {line[:80]!r}") from error
        if entry_step <= step:
            kept.append(line + "\n")
    return kept


def read_metrics(logdir: str | os.PathLike) -> list[dict]:
    """Rows of ``metrics.jsonl`` written by :class:`MetricsLogger`."""
    path = Path(logdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
