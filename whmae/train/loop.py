"""The one training loop: pretraining now, fine-tuning later, only the `Task` changes.

`train(config, workdir, task)` joins the multi-host job, builds the mesh, the
sharded state and the jitted step, streams Grain batches, continues from the
latest checkpoint in `workdir/checkpoints` (state and data position), logs,
checkpoints, evaluates on the `val` split every `train.eval_every` steps
(`whmae.train.validation`), and stops cleanly on SIGTERM or loudly on a non-finite loss.

Reproducibility: the per-step key is `fold_in(key(train.seed), state.step)` (inside
the step), and the data iterator position is checkpointed, so a resumed run
repeats the uninterrupted run's losses exactly; validation uses a fixed subset and a
fixed key, so its values repeat too.

Validation and the best checkpoint: at every `eval_every` step the task's val metrics
are written (metrics.jsonl rows with `split: "val"`, TensorBoard `val/*`, the progress
bar); the log line gives the evaluation's cost as a fraction of the training time since
the previous one. With `train.best_metric` set, that step is also checkpointed with its
val metrics, and the best step by that metric (`train.best_mode` min | max) is kept
beside the newest `keep_checkpoints`. Resuming always continues from the newest step.

Config fields used: `model` (through the task), `optim`, `mesh` (data, fsdp,
tensor, rules), `data` (dir, batch_size = global, seed, worker_count), `train`
(steps, seed, log_every, checkpoint_every, keep_checkpoints, optional
distributed = auto|on|off, eval_every (0: off), eval_exams, best_metric, best_mode).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from tqdm.auto import tqdm

from whmae.cli import UsageError, check_batch_splits
from whmae.data.dataset.pipeline import make_pipeline
from whmae.train import distributed
from whmae.train.checkpoint import CHECKPOINT_DIR, Checkpointer, PreemptionWatcher
from whmae.train.mesh import logical_rules, make_mesh
from whmae.train.metrics import MetricsWriter
from whmae.train.optim import make_optimizer
from whmae.train.step import (
    TrainState,
    abstract_state,
    batch_shardings_for,
    global_batch,
    init_train_state,
    make_train_step,
)
from whmae.train.validation import Evaluator, Validation

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Task:
    """What a training stage trains.

    model_fn(rngs) -> nnx.Module; loss_fn(model, batch, key) -> (loss, aux scalars);
    fields: exam fields the batches carry (see `whmae.layout`);
    init_params(state) -> state: applied once to a fresh (not resumed) state, e.g. to
    load a pretrained encoder;
    validation: what the task measures on the val split (None: no validation).
    """

    name: str
    model_fn: Callable[[nnx.Rngs], nnx.Module]
    loss_fn: Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]]
    fields: tuple[str, ...]
    init_params: Callable[[TrainState], TrainState] | None = None
    validation: Validation | None = None


class _LibraryInfoFilter(logging.Filter):
    """Drops INFO lines of checkpointing libraries (dozens per save) from a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        quiet = ("/orbax/", "/grain/")
        return record.levelno >= logging.WARNING or not any(q in record.pathname for q in quiet)


def quiet_library_logs() -> None:
    """For entry points: keep Orbax/Grain INFO chatter out of the console (absl handler)."""
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().addFilter(_LibraryInfoFilter())


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def _raise_if_model_changed(checkpointer, step: int, config: Any, error: Exception) -> None:
    """A restore that failed on shapes, explained by the config fields that changed: the
    model fields of the config saved with `step` against this run's, named one by one."""
    try:
        saved = _leaves(checkpointer.restore_config(step).get("model", {}), "model")
    except Exception:  # noqa: BLE001 - no readable saved config: the original error stands
        return
    now = _leaves(json.loads(json.dumps(_config_json(config).get("model", {}))), "model")
    changed = [f"{k}={now.get(k)!r} (checkpoint: {saved.get(k)!r})"
               for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]  # fmt: skip
    if changed:
        raise UsageError(
            f"the checkpoint in {checkpointer.directory} (step {step}) holds a different "
            f"model: {'; '.join(changed)}. Resume with the checkpoint's settings or use a new "
            "--workdir"
        ) from error


def _config_json(config: Any) -> dict:
    to_json = getattr(config, "to_json_best_effort", None)
    return json.loads(to_json()) if to_json else dict(config)


def _per_process_batch(global_batch_size: int) -> int:
    processes = jax.process_count()
    if global_batch_size % processes:
        raise ValueError(
            f"data.batch_size={global_batch_size} (global) must be divisible by the "
            f"{processes} processes"
        )
    return global_batch_size // processes


def _first_non_finite(pending: list[tuple[int, dict]]) -> tuple[int, dict] | None:
    for step, metrics in pending:
        if not all(math.isfinite(metrics[k]) for k in ("loss", "grad_norm") if k in metrics):
            return step, metrics
    return None


def _last_good(checkpointer: Checkpointer) -> str:
    step = checkpointer.latest_step()
    if step is None:
        return f"No checkpoint was saved yet in {checkpointer.directory}."
    return f"Last good checkpoint: step {step} in {checkpointer.directory}."


def train(config: Any, workdir: str, task: Task, *, distributed_mode: str | None = None) -> dict:
    """Train `task` as `config` says in `workdir`; returns a summary dict.

    Summary: start_step, step (last completed), preempted, final_loss, last_checkpoint,
    compile_s, train_s, exams_per_s, val (the newest val metrics, with their step;
    None when no evaluation ran), eval_s (seconds spent evaluating), best_step.
    `distributed_mode` (auto|on|off) overrides `config.train.distributed`.
    Raises FloatingPointError on a non-finite loss or gradient norm, naming the step;
    the newest checkpoint is then the last step saved before it.
    """
    distributed.maybe_initialize(distributed_mode or config.train.get("distributed", "auto"))
    os.makedirs(workdir, exist_ok=True)
    total_steps = int(config.train.steps)
    log_every = max(1, int(config.train.log_every))
    checkpoint_every = max(1, int(config.train.checkpoint_every))
    global_batch_size = int(config.data.batch_size)

    mesh = make_mesh(config.mesh)
    check_batch_splits(global_batch_size, mesh.shape["data"] * mesh.shape["fsdp"])
    rules = logical_rules(config.mesh.rules)
    tx, schedule = make_optimizer(config.optim, total_steps)
    batch_shardings = batch_shardings_for(mesh, tuple(task.fields))
    data_iter = make_pipeline(
        config.data.dir,
        "train",
        batch_size=_per_process_batch(global_batch_size),
        seed=int(config.data.seed),
        fields=tuple(task.fields),
        shuffle=True,
        num_epochs=None,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        worker_count=int(config.data.get("worker_count", 0)),
    )

    best_metric = config.train.get("best_metric", None) or None
    best_mode = str(config.train.get("best_mode", "min"))
    checkpointer = Checkpointer(
        os.path.join(workdir, CHECKPOINT_DIR),
        save_every=checkpoint_every,
        keep=config.train.get("keep_checkpoints", None),
        best_metric=best_metric,
        best_mode=best_mode,
    )
    # Always the newest step: the best one is for evaluation and inference.
    resume_step = checkpointer.latest_step()
    if resume_step is not None:
        graphdef, target, state_shardings = abstract_state(
            task.model_fn, tx, mesh, rules, int(config.train.seed)
        )
        try:
            state = checkpointer.restore(resume_step, target, data_iter)
        except ValueError as error:
            _raise_if_model_changed(checkpointer, resume_step, config, error)
            raise
        # A damaged newest step is moved aside and an older one restored.
        resume_step = int(jax.device_get(state.step))
        log.info("resumed from %s step %d", checkpointer.directory, resume_step)
    else:
        graphdef, state, state_shardings = init_train_state(
            task.model_fn, tx, mesh, rules, int(config.train.seed)
        )
        if task.init_params is not None:
            state = task.init_params(state)
    start_step = int(jax.device_get(state.step))
    if start_step > total_steps:
        raise ValueError(
            f"checkpoint in {checkpointer.directory} is at step {start_step}, beyond "
            f"train.steps={total_steps}"
        )

    step_fn = make_train_step(
        graphdef, task.loss_fn, tx, mesh, state_shardings, batch_shardings, schedule
    )
    evaluator = Evaluator(config, task, mesh, graphdef, state_shardings)
    if best_metric and not evaluator.enabled:
        log.warning(
            "train.best_metric=%s but no validation runs (train.eval_every=%s, task %s): "
            "no step is ranked, the best checkpoint is the newest",
            best_metric, config.train.get("eval_every"), task.name,
        )  # fmt: skip
    key = jax.random.key(int(config.train.seed))
    config_json = _config_json(config)
    summary = {
        "start_step": start_step,
        "step": start_step,
        "preempted": False,
        "final_loss": None,
        "last_checkpoint": resume_step,
        "compile_s": 0.0,
        "train_s": 0.0,
        "exams_per_s": 0.0,
        "val": None,
        "eval_s": 0.0,
        "best_step": None,
    }
    # Metrics stay on device until a log/save boundary, so steps dispatch back to back.
    pending: list[tuple[int, dict]] = []
    is_main = jax.process_index() == 0

    def flush(writer, step: int, interval_s: float, interval_steps: int, write: bool):
        """Check every pending step for non-finite values; log the newest one if `write`."""
        # One device_get of the whole list: transfers start together (one blocking fetch
        # per step made every log boundary stall for seconds with many devices).
        values = jax.device_get([m for _, m in pending])
        fetched = [
            (s, {k: float(v) for k, v in m.items()})
            for (s, _), m in zip(pending, values, strict=True)
        ]
        pending.clear()
        bad = _first_non_finite(fetched)
        if bad is not None:
            bad_step, metrics = bad
            checkpointer.wait_until_finished()
            raise FloatingPointError(
                f"non-finite training metrics at step {bad_step} ({task.name}): "
                f"loss={metrics.get('loss')}, grad_norm={metrics.get('grad_norm')}; stopped "
                f"without saving it. {_last_good(checkpointer)} Lower optim.lr, enable "
                f"optim.clip_norm or check the data."
            )
        if fetched and write:
            newest = fetched[-1][1]
            step_time = interval_s / max(interval_steps, 1)
            newest["step_time_s"] = step_time
            newest["exams_per_s"] = global_batch_size / step_time if step_time > 0 else 0.0
            summary["final_loss"] = newest["loss"]
            return writer.write(step, newest)
        return None

    watcher = PreemptionWatcher()
    writer = MetricsWriter(workdir, resume_step=start_step if resume_step is not None else None)
    progress = tqdm(
        total=total_steps,
        initial=start_step,
        desc=task.name,
        disable=not is_main,
        dynamic_ncols=True,
        smoothing=0.1,
    )
    postfix: dict[str, str] = {}

    def evaluate(step: int, since_s: float) -> dict:
        """Run validation on `state`, write its row, log its cost; the val metrics."""
        start = time.perf_counter()
        metrics = evaluator(state)
        eval_s = time.perf_counter() - start
        fraction = eval_s / since_s if since_s > 0 else math.nan
        writer.write(step, {**metrics, "eval_s": eval_s, "eval_fraction": fraction}, "val")
        summary["val"] = {"step": step, **metrics}
        summary["eval_s"] += eval_s
        shown = best_metric if best_metric in metrics else next(iter(metrics), None)
        if shown is not None:
            postfix[f"val_{shown}"] = f"{metrics[shown]:.4g}"
        log.info(
            "val step %d: %s; eval %.2f s = %.1f%% of the %.2f s of training since the "
            "previous evaluation (%d exams)",
            step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), eval_s,
            100 * fraction, since_s, evaluator.num_exams,
        )  # fmt: skip
        return metrics

    try:
        step = start_step
        train_start = time.perf_counter()
        interval_start, interval_steps = train_start, 0
        eval_since = train_start
        while step < total_steps:
            host_batch = next(data_iter)
            batch = global_batch(
                {name: host_batch[name] for name in task.fields}, mesh, batch_shardings
            )
            state, metrics = step_fn(state, batch, key)
            step += 1
            interval_steps += 1
            pending.append((step, metrics))
            if step == start_step + 1:
                # The first step includes compilation: time it apart from throughput.
                jax.block_until_ready(metrics)
                summary["compile_s"] = time.perf_counter() - train_start
            preempted = watcher.reached(step)
            boundary_log = step % log_every == 0 or step == total_steps
            boundary_eval = evaluator.due(step)
            boundary_save = (
                step % checkpoint_every == 0
                or step == total_steps
                or preempted
                or (boundary_eval and best_metric is not None)
            )
            if boundary_log or boundary_save or boundary_eval:
                jax.block_until_ready(metrics)
                now = time.perf_counter()
                row = flush(
                    writer, step, now - interval_start, interval_steps, boundary_log or preempted
                )
                interval_start, interval_steps = now, 0
                if row is not None and boundary_log:
                    postfix["loss"] = f"{row['loss']:.4g}"
            val_metrics = None
            if boundary_eval:
                start = time.perf_counter()
                val_metrics = evaluate(step, start - eval_since)
                eval_since = time.perf_counter()
                # Evaluation time is not training time: keep it out of step_time_s.
                interval_start += eval_since - start
            if postfix:
                progress.set_postfix(postfix, refresh=False)
            if boundary_save:
                checkpointer.save(
                    step, state, data_iter, config_json, force=True, metrics=val_metrics
                )
                summary["last_checkpoint"] = step
            progress.update(1)
            summary["step"] = step
            if preempted:
                summary["preempted"] = True
                log.warning("preempted: saved step %d, exiting", step)
                break
        train_s = time.perf_counter() - train_start - summary["compile_s"] - summary["eval_s"]
        timed_steps = summary["step"] - start_step - 1
        summary["train_s"] = train_s
        if timed_steps > 0 and train_s > 0:
            summary["exams_per_s"] = timed_steps * global_batch_size / train_s
        checkpointer.wait_until_finished()
        summary["best_step"] = checkpointer.best_step()
    finally:
        progress.close()
        writer.close()
        watcher.close()
        checkpointer.close()
        closer = getattr(data_iter, "close", None)
        if closer is not None:
            closer()
    summary["final_loss"] = None if summary["final_loss"] is None else float(summary["final_loss"])
    return summary
