"""Training metrics: one JSON line per logging step plus TensorBoard events.

Process 0 writes `workdir/metrics.jsonl` and TensorBoard event files under
`workdir/tensorboard/` (tensorboardX's record format: no TensorFlow). Every line holds
`step` (int) and `split` ("train" or "val"; rows of runs from before validation have
no `split` and are train rows). A train row holds

  step, split, loss, lr, grad_norm, step_time_s, exams_per_s

(floats) plus whatever auxiliary scalars the train step returns (e.g. `masked_loss`);
a val row (`whmae.train.validation`, every `train.eval_every` steps) holds the task's
validation metrics plus `eval_s` (seconds the evaluation took) and `eval_fraction`
(eval_s over the training time since the previous evaluation). TensorBoard tags are
`<split>/<name>`, so val curves sit next to the training ones. Other processes write
nothing. A restarted run appends to
the same files, so the history of a preempted run stays in one place; rows of steps
the restarted run redoes (those after its checkpoint) are dropped first, so each step
appears once.

Both files are written synchronously in the calling thread: no background writer
thread whose death (e.g. disk full) could leave the training thread blocked on a full
queue. A failed write raises `MetricsWriteError` (an OSError keeping the errno, so a
full disk still reads as ENOSPC) naming the step and the file.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

import jax
import numpy as np

from whmae.files import write_text_atomic

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
REQUIRED_KEYS = ("step", "loss", "lr", "grad_norm", "step_time_s", "exams_per_s")


class MetricsWriteError(OSError):
    """Metrics could not be written (errno kept from the cause, e.g. ENOSPC)."""


def _scalar(name: str, value) -> float:
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric {name!r} must be a scalar, got shape {array.shape}")
    return float(array.reshape(()))


def _split_rows(text: str) -> tuple[list[str], str]:
    """Complete lines of a metrics file, and the unterminated tail (a row cut off)."""
    lines = text.split("\n")
    return lines[:-1], lines[-1]


def truncate_metrics(workdir: str, after_step: int) -> int:
    """Drop the rows of workdir/metrics.jsonl with step > `after_step`; returns how many.

    For a run resumed from the checkpoint of `after_step`: the steps after it are redone
    and logged again. A row cut off mid-write (no newline) is dropped too. The file is
    replaced atomically (a crash leaves the old file or the new one); untouched when
    nothing needs dropping.
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines, tail = _split_rows(f.read())
    kept = []
    for line in lines:
        if not line.strip():
            continue
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            kept.append(line)  # not ours to judge: keep it as it was
            continue
        if step <= after_step:
            kept.append(line)
    dropped = len([line for line in lines if line.strip()]) - len(kept)
    if dropped or tail:
        write_text_atomic(path, "".join(line + "\n" for line in kept))
    return dropped


class MetricsWriter:
    """Appends metric rows to metrics.jsonl and TensorBoard (process 0 only).

    `resume_step`: the step the run continues from; rows logged after it by an earlier
    attempt are dropped on opening (see `truncate_metrics`). Without it, the first
    `write` drops rows at or after its own step, which covers a resume logging on the
    same interval.
    """

    def __init__(
        self, workdir: str, *, enabled: bool | None = None, resume_step: int | None = None
    ):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._workdir = workdir
        self._file = None
        self._events = None  # opened at the first write: a run that logs nothing adds no file
        self._first_write = True
        self._failed = False
        self._resume_step = resume_step
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            if resume_step is not None:
                truncate_metrics(workdir, int(resume_step))
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def _open_events(self, step: int):
        from tensorboardX.event_file_writer import EventsWriter  # only process 0 needs it
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.record_writer import directory_check

        logdir = os.path.join(self._workdir, TENSORBOARD_DIR)
        directory_check(logdir)
        events = EventsWriter(os.path.join(logdir, "events"))
        # A (re)start: TensorBoard drops the events an earlier attempt logged at or after
        # this step (its "orphaned data").
        events.write_event(
            Event(
                wall_time=time.time(),
                step=step,
                session_log=SessionLog(status=SessionLog.START),
            )
        )
        return events

    def write(self, step: int, metrics: Mapping[str, object], split: str = "train") -> dict:
        """Record the scalars of `metrics` at `step` as a `split` row; returns the row as
        written."""
        row = {"step": int(step), "split": str(split)}
        row.update({name: _scalar(name, value) for name, value in metrics.items()})
        if not self.enabled:
            return row
        # JSON has no NaN/inf; write them as strings so the line stays parseable.
        serialisable = {
            k: (v if isinstance(v, int | str) or math.isfinite(v) else repr(v))
            for k, v in row.items()
        }
        target = self.path
        try:
            if self._first_write:
                self._first_write = False
                self._file.flush()
                if truncate_metrics(self._workdir, row["step"] - 1):
                    self._file.close()
                    self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            self._file.write(json.dumps(serialisable) + "\n")
            self._file.flush()
            target = os.path.join(self._workdir, TENSORBOARD_DIR)
            if self._events is None:
                start = row["step"] if self._resume_step is None else self._resume_step + 1
                self._events = self._open_events(start)
            self._write_events(row)
        except OSError as e:
            self._failed = True
            raise MetricsWriteError(
                e.errno,
                f"cannot write the metrics of step {row['step']}: {e.strerror or e}",
                target,
            ) from e
        return row

    def _write_events(self, row: dict) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        wall_time = time.time()
        for name, value in row.items():
            if name not in ("step", "split"):
                self._events.write_event(
                    Event(
                        wall_time=wall_time,
                        step=row["step"],
                        summary=scalar(f"{row['split']}/{name}", value),
                    )
                )
        self._events.flush()

    def flush(self) -> None:
        if self.enabled and not self._failed:
            self._file.flush()
            if self._events is not None:
                self._events.flush()

    def close(self) -> None:
        """Close both files. After a failed write, errors on closing are not raised again
        (the write's error is the one to report)."""
        if not self.enabled:
            return
        self.enabled = False
        error = None
        for handle in (self._file, self._events):
            try:
                if handle is not None:
                    handle.close()
            except OSError as e:
                error = error or e
        if error is not None and not self._failed:
            raise error

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def row_split(row: Mapping) -> str:
    """The split of a metrics.jsonl row ("train" for rows written before splits existed)."""
    return str(row.get("split", "train"))


def read_metrics(workdir: str, split: str | None = "train") -> list[dict]:
    """The complete rows of workdir/metrics.jsonl of `split` ("train", "val"; None: all),
    in file order (empty if absent)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines, _ = _split_rows(f.read())
    # The text after the last newline may be a row still being written: skip it.
    rows = [json.loads(line) for line in lines if line.strip()]
    return [row for row in rows if split is None or row_split(row) == split]
