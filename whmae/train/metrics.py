"""Training metrics: one JSON line per logging step plus TensorBoard events.

Process 0 writes `workdir/metrics.jsonl` and TensorBoard event files under
`workdir/tensorboard/` (tensorboardX: no TensorFlow). Every line holds

  step, loss, lr, grad_norm, step_time_s, exams_per_s

(floats, step an int) plus whatever auxiliary scalars the train step returns
(e.g. `masked_loss`). Other processes write nothing. A restarted run appends to
the same files, so the history of a preempted run stays in one place.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
REQUIRED_KEYS = ("step", "loss", "lr", "grad_norm", "step_time_s", "exams_per_s")


def _scalar(name: str, value) -> float:
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric {name!r} must be a scalar, got shape {array.shape}")
    return float(array.reshape(()))


class MetricsWriter:
    """Appends metric rows to metrics.jsonl and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._file = None
        self._tensorboard = None
        if self.enabled:
            from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it

            os.makedirs(workdir, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            self._tensorboard = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

    def write(self, step: int, metrics: Mapping[str, object]) -> dict:
        """Record the scalars of `metrics` at `step`; returns the row as written."""
        row = {"step": int(step)}
        row.update({name: _scalar(name, value) for name, value in metrics.items()})
        if not self.enabled:
            return row
        # JSON has no NaN/inf; write them as strings so the line stays parseable.
        serialisable = {
            k: (v if isinstance(v, int) or math.isfinite(v) else repr(v)) for k, v in row.items()
        }
        self._file.write(json.dumps(serialisable) + "\n")
        self._file.flush()
        for name, value in row.items():
            if name != "step":
                self._tensorboard.add_scalar(f"train/{name}", value, global_step=row["step"])
        return row

    def flush(self) -> None:
        if self.enabled:
            self._file.flush()
            self._tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tensorboard.close()
            self.enabled = False

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(workdir: str) -> list[dict]:
    """All complete rows of workdir/metrics.jsonl, in file order (empty if absent)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    # The text after the last newline may be a row still being written: skip it.
    return [json.loads(line) for line in lines[:-1] if line.strip()]
