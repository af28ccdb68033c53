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

from tensorboardX import SummaryWriter


class NonFiniteMetricError(FloatingPointError):
    """A logged metric became NaN/inf; the message names the metric and the step where it began."""


class MetricsLogger:
    """Writes scalars to ``<logdir>/`` (TensorBoard) and ``<logdir>/metrics.jsonl``.

    ``check_finite`` raises :class:`NonFiniteMetricError` at the first NaN/inf so a run never ends
    in NaN without saying where it began.
    """

    def __init__(self, logdir: str | os.PathLike, *, stage: str, check_finite: bool = True, console: bool = True):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self.check_finite = check_finite
        self.console = console
        self._writer = SummaryWriter(str(self.logdir))
        self._jsonl = open(self.logdir / "metrics.jsonl", "a", encoding="utf-8")

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


def read_metrics(logdir: str | os.PathLike) -> list[dict]:
    """Rows of ``metrics.jsonl`` written by :class:`MetricsLogger`."""
    path = Path(logdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
