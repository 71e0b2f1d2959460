"""Validation inside the training loop: a fixed subset of the `val` split, every
`train.eval_every` steps.

A task says what it measures with a `Validation`: `fn(model, batch, key)` returns
per-exam values (arrays with leading dim B; jitted and sharded like the train step,
`whmae.train.step.make_eval_step`), and `summarise(values)` turns the values of the whole
subset (numpy, padding rows dropped, concatenated in dataset order) into named floats,
reusing the evaluation's metric functions (`whmae.evaluate.metrics`). Besides the task's
fields the batch holds `val_index` int32 [B], each row's position in the subset, so
anything random can be drawn per exam (`exam_keys`): values then do not depend on where
an exam sits in a batch, on the batch size or on the process count.

The subset: the first `train.eval_exams` exams of the `val` split in dataset order (no
shuffling), in global batches of `data.batch_size`; each process reads its rows of each
global batch, as in training. A short last batch is padded (repeated rows, dropped
before `summarise`), so every process runs the same number of eval steps (multi-host
safe). The key is fixed (`fold_in(key(train.seed), VAL_KEY_SALT)`): the same masks at
every evaluation, so val values change only with the parameters, and a resumed run
repeats the uninterrupted run's val values exactly.

Config fields: `train.eval_every` (0 or absent: off), `train.eval_exams`,
`train.best_metric` / `train.best_mode` (the val metric ranking checkpoints; see
`whmae.train.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from whmae.data.dataset.pipeline import dataset_info, make_pipeline
from whmae.train.step import batch_shardings_for, global_batch, make_eval_step

log = logging.getLogger(__name__)

# Folded into the run's key for validation: never equal to a training step's key.
VAL_KEY_SALT = 0x7A1


@dataclasses.dataclass(frozen=True)
class Validation:
    """What a task measures on the val split (see the module docstring).

    fn(model, batch, key) -> {name: per-exam array [B, ...]};
    summarise({name: np.ndarray [N, ...]}) -> {metric: float};
    fields: exam fields the batches carry (default: the task's).
    """

    fn: Callable[[Any, dict, jax.Array], dict[str, jax.Array]]
    summarise: Callable[[dict[str, np.ndarray]], dict[str, float]]
    fields: tuple[str, ...] | None = None


def val_size(data_dir: str) -> int:
    """Exams in the val split of `data_dir` (0 when it has none)."""
    split = dataset_info(data_dir).get("splits", {}).get("val") or {}
    return int(split.get("num_examples", 0))


def subset_batches(
    data_dir: str,
    fields: tuple[str, ...],
    global_batch_size: int,
    num_exams: int,
    *,
    process_index: int,
    process_count: int,
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """(this process's rows of each global batch, valid bool [B]) over the first
    `num_exams` val exams; every process yields ceil(num_exams / global batch) batches of
    global_batch_size / process_count rows (padding rows repeat a real one, valid False)."""
    total = val_size(data_dir)
    n = min(int(num_exams), total)
    rows = global_batch_size // process_count
    batches = math.ceil(n / global_batch_size)
    full = total // global_batch_size  # global batches the split fills completely
    it = make_pipeline(
        data_dir, "val", batch_size=rows, fields=fields, shuffle=False, num_epochs=1,
        drop_remainder=False, process_index=process_index, process_count=process_count,
        read_threads=1, prefetch_batches=2,
    )  # fmt: skip
    template = None
    for b in range(batches):
        batch = next(it, None)
        if batch is None:  # this process's share of the last partial batch is empty
            if template is None:
                template = next(
                    make_pipeline(data_dir, "val", batch_size=1, fields=fields, shuffle=False,
                                  num_epochs=1, process_index=0, process_count=1, read_threads=0)
                )  # fmt: skip
            batch = {k: v[:1] for k, v in template.items()}
            got = 0
        else:
            got = len(next(iter(batch.values())))
        if b < full:
            start = b * global_batch_size + process_index * rows
        else:  # the split's tail, split into near-equal contiguous parts (pipeline)
            start = b * global_batch_size + (total - b * global_batch_size) * process_index // (
                process_count
            )
        index = start + np.arange(rows)
        valid = (index < n) & (np.arange(rows) < got)
        if got < rows:
            batch = {k: np.concatenate([v, np.repeat(v[-1:], rows - len(v), axis=0)])
                     for k, v in batch.items()}  # fmt: skip
        batch["val_index"] = np.where(valid, index, -1).astype(np.int32)
        yield batch, valid
    closer = getattr(it, "close", None)
    if closer is not None:
        closer()


class Evaluator:
    """Runs a task's `Validation` on the val subset of a run (see the module docstring).

    Call with the train state: returns the summarised val metrics (the same on every
    process). `enabled` is False when the config turns validation off or the dataset has
    no val exam (logged once).
    """

    def __init__(self, config: Any, task: Any, mesh, graphdef, state_shardings):
        train = config.train
        self.every = int(train.get("eval_every", 0) or 0)
        self.validation: Validation | None = getattr(task, "validation", None)
        self.data_dir = str(config.data.dir)
        self.global_batch = int(config.data.batch_size)
        self.enabled = self.every > 0 and self.validation is not None
        self.num_exams = 0
        if not self.enabled:
            return
        available = val_size(self.data_dir)
        wanted = int(train.get("eval_exams", 0) or 0) or available
        self.num_exams = min(wanted, available)
        if self.num_exams == 0:
            log.warning("%s: no val exam: validation is off", self.data_dir)
            self.enabled = False
            return
        self.fields = tuple(self.validation.fields or task.fields)
        shardings = batch_shardings_for(mesh, (*self.fields, "val_index"))
        self.mesh, self.shardings = mesh, shardings
        self.step = make_eval_step(graphdef, self.validation.fn, mesh, state_shardings, shardings)
        self.key = jax.random.fold_in(jax.random.key(int(train.seed)), VAL_KEY_SALT)
        log.info(
            "validation every %d steps on %d val exams (%d batches of %d)",
            self.every, self.num_exams, math.ceil(self.num_exams / self.global_batch),
            self.global_batch,
        )  # fmt: skip

    def due(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    def __call__(self, state) -> dict[str, float]:
        outputs, masks = [], []
        batches = subset_batches(
            self.data_dir, self.fields, self.global_batch, self.num_exams,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )  # fmt: skip
        for host_batch, valid in batches:
            batch = global_batch(host_batch, self.mesh, self.shardings)
            outputs.append(self.step(state, batch, self.key))
            masks.append(valid)
        # Every process's valid rows, in global batch order (rows of process 0 first).
        masks = [_all_processes(m) for m in masks]
        fetched = jax.device_get(outputs)
        values = {
            name: np.concatenate([np.asarray(out[name])[m] for out, m in zip(fetched, masks,
                                                                              strict=True)])
            for name in fetched[0]
        }  # fmt: skip
        return {k: float(v) for k, v in self.validation.summarise(values).items()}


def _all_processes(valid: np.ndarray) -> np.ndarray:
    """The global batch's valid mask from each process's rows (process order)."""
    if jax.process_count() == 1:
        return valid
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(valid)).reshape(-1)


def exam_keys(key: jax.Array, val_index: jax.Array) -> jax.Array:
    """One key per exam [B] from the fixed val key and the rows' `val_index`."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(val_index)


def mean_finite(values) -> float:
    """Mean of the finite values (NaN when none): for means over classes or columns."""
    v = np.asarray(list(values), np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def slug(name: str) -> str:
    """A metric-name-safe form of a label, e.g. 'LVM (g)' -> 'LVM_g'."""
    out = "".join(c if c.isalnum() else "_" for c in str(name))
    return "_".join(part for part in out.split("_") if part)
