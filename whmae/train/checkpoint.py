"""Orbax checkpoints of a training run, and saving on preemption.

One checkpoint step directory `workdir/checkpoints/<step>/` holds three items:

  state     the TrainState pytree (`ocp.args.StandardSave`); restored from an
            abstract tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`,
            so a run saved on one mesh (data=8) continues on another (data=2 x fsdp=4)
  data_iter the Grain iterator position, one small JSON file per process
  config    the run's config as JSON, to see what produced the checkpoint

Damage: when the requested step cannot be restored, `restore` reads that step back
as plain arrays, independently of the target's shapes and shardings. If that fails too
the step is damaged (e.g. a truncated data file): it is moved aside to
`<workdir>/damaged_checkpoints/step_<N>` (with `DAMAGED.txt` saying why), one warning
line names it, and the newest older step is tried. If the step reads back fine, the
target is at fault (e.g. a changed model) and the error is raised.

Saves are asynchronous (device arrays are copied, the writing happens in a
background thread); `save_every` becomes the manager's `save_interval_steps`.

Which steps stay: the newest `keep` (all when None) and, with `best_metric` (the
config's `train.best_metric` / `train.best_mode`), also the best step by that validation
metric among the steps saved with val metrics (Orbax's `best_fn` / `best_mode`; the
metrics are the manager's `metrics` item of the step). `latest_step()` is always the
newest step (what a resumed run continues from), `best_step()` the best one (what
evaluation and inference use by default, `checkpoint_step`).

Preemption: `PreemptionWatcher.reached(step)` turns True at the same step on
every process after a SIGTERM. Multi-process jobs use JAX's preemption sync
service (started by `jax.distributed.initialize`); a single process uses its own
SIGTERM handler. The loop then saves, waits for the write and exits cleanly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"


class NoIntactCheckpointError(RuntimeError):
    """Every checkpoint of a run was damaged (they were moved aside, not deleted)."""


def committed_steps(directory: str) -> list[int]:
    """The steps of the checkpoints in `directory` whose writing finished, oldest first.

    Read from the directory names alone (no Orbax manager): Orbax writes a step under a
    temporary name and renames it to the bare step number when it is complete.
    """
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(name)
        for name in os.listdir(directory)
        if name.isdigit() and os.path.isdir(os.path.join(directory, name))
    )


CHECKPOINT_STEP_CHOICES = ("best", "latest")
CHECKPOINT_STEP_HELP = (
    "checkpoint step: best (by the run's validation metric, train.best_metric; the newest "
    "step when no step was ranked), latest, or a step number"
)


def parse_checkpoint_step(text: str | int) -> str | int:
    """'best', 'latest' or a step number (argparse `type=` of `--checkpoint-step`)."""
    value = str(text).strip().lower()
    if value in CHECKPOINT_STEP_CHOICES:
        return value
    if value.isdigit():
        return int(value)
    raise ValueError(f"checkpoint step must be best, latest or a step number, got {text!r}")


def _read_json_item(where: str) -> dict:
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(where, args=ocp.args.JsonRestore())


def best_criterion(directory: str, step: int) -> tuple[str, str] | None:
    """(train.best_metric, train.best_mode) of the config saved with `step`, if any."""
    where = os.path.join(directory, str(step), "config")
    if not os.path.isdir(where):
        return None
    try:
        train = (_read_json_item(where) or {}).get("train") or {}
    except Exception:  # noqa: BLE001 - a config we cannot read names no criterion
        return None
    metric = train.get("best_metric") if isinstance(train, Mapping) else None
    return (str(metric), str(train.get("best_mode", "min"))) if metric else None


def checkpoint_step(path: str | os.PathLike, which: str | int | None = "best") -> int:
    """The step `which` ("best" | "latest" | N; None = "latest") names among a run's
    checkpoints. `path`: the run's workdir, its checkpoint directory, or one step
    directory (then that step). "best" is the best step by the run's `train.best_metric`
    among the steps saved with val metrics, else the newest step (no metric, no step
    evaluated, or a converted checkpoint)."""
    which = "latest" if which is None else parse_checkpoint_step(which)
    path = os.path.abspath(os.fspath(path))
    name = os.path.basename(path)
    if name.isdigit() and os.path.isdir(os.path.join(path, "state")):
        if isinstance(which, int) and which != int(name):
            raise ValueError(f"{path} is step {name}, but step {which} was asked for")
        return int(name)
    directory = os.path.join(path, CHECKPOINT_DIR)
    directory = directory if os.path.isdir(directory) else path
    steps = committed_steps(directory)
    if not steps:
        raise FileNotFoundError(f"{directory} holds no checkpoint steps")
    if isinstance(which, int):
        if which not in steps:
            raise FileNotFoundError(f"no checkpoint for step {which} in {directory}; have {steps}")
        return which
    if which == "latest":
        return steps[-1]
    criterion = best_criterion(directory, steps[-1])
    if criterion is None:
        return steps[-1]
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn(*criterion), best_mode=criterion[1], create=False
    )
    manager = ocp.CheckpointManager(directory, options=options)
    try:
        best = manager.best_step()
        ranked = best is not None and manager.metrics(best)
    finally:
        manager.close()
    return int(best) if ranked else steps[-1]


def _one_line(error: BaseException, limit: int = 300) -> str:
    """The innermost cause of `error` as one short line (TensorStore's status line)."""
    while error.__cause__ is not None or (
        error.__context__ is not None and not error.__suppress_context__
    ):
        error = error.__cause__ or error.__context__
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def abstract_like(state: Any) -> Any:
    """The restore target for `state`'s shapes, dtypes and shardings."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


BEST_MODES = ("min", "max")


def best_fn(metric: str, mode: str):
    """Orbax `best_fn`: a step's saved val metrics -> the value ranked by `mode`; a missing
    or non-finite value ranks worst (never "best" because it is NaN)."""
    if mode not in BEST_MODES:
        raise ValueError(f"train.best_mode must be one of {BEST_MODES}, got {mode!r}")
    worst = math.inf if mode == "min" else -math.inf

    def fn(metrics) -> float:
        value = (metrics or {}).get(metric) if isinstance(metrics, Mapping) else None
        try:
            value = float(value)
        except (TypeError, ValueError):
            return worst
        return value if math.isfinite(value) else worst

    return fn


class Checkpointer:
    """A CheckpointManager over the items state / data_iter / config (+ Orbax's metrics).

    `keep`: the newest steps kept (None: all). `best_metric` (a key of the metrics passed
    to `save`) and `best_mode` (min | max): the best step by it is kept too.
    """

    def __init__(
        self,
        directory: str,
        *,
        save_every: int,
        keep: int | None = None,
        async_save: bool = True,
        best_metric: str | None = None,
        best_mode: str = "min",
    ):
        if save_every < 1:
            raise ValueError(f"checkpoint interval must be >= 1 step, got {save_every}")
        self.directory = os.path.abspath(directory)
        self.best_metric = best_metric or None
        tracking = {}
        if self.best_metric:
            rank = best_fn(self.best_metric, best_mode)
            policy = preservation_policy.AnyPreservationPolicy(
                [
                    preservation_policy.LatestN(n=keep),
                    preservation_policy.BestN(
                        get_metric_fn=rank,
                        reverse=best_mode == "min",
                        n=1,
                        keep_checkpoints_without_metrics=False,
                    ),
                ]
            )
            tracking = dict(best_fn=rank, best_mode=best_mode, preservation_policy=policy)
        else:
            tracking = dict(max_to_keep=keep)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            enable_async_checkpointing=async_save,
            create=True,
            **tracking,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "data_iter", "config"), options=options
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The best step by `best_metric` among the steps saved with val metrics; None
        when there is none (or no `best_metric`)."""
        if not self.best_metric:
            return None
        best = self._manager.best_step()
        if best is None or self.metrics(best) is None:
            return None
        return best

    def metrics(self, step: int) -> dict | None:
        """The val metrics saved with `step` (None when it was saved without)."""
        try:
            metrics = self._manager.metrics(step)
        except Exception:  # noqa: BLE001 - no metrics item: saved without
            return None
        return dict(metrics) if metrics else None

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_iter: grain.DatasetIterator | None = None,
        config: Mapping[str, Any] | None = None,
        *,
        force: bool = False,
        metrics: Mapping[str, float] | None = None,
    ) -> bool:
        """Start saving `state` (and the iterator position) as `step`; True if it saves.

        Without `force` only steps on the `save_every` interval are written. `metrics`:
        the step's val metrics (finite floats kept), ranked when `best_metric` is set.
        """
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        if config is not None:
            items["config"] = ocp.args.JsonSave(dict(config))
        if metrics is not None and self.best_metric:
            metrics = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        else:
            metrics = None
        return self._manager.save(
            step, args=ocp.args.Composite(**items), force=force, metrics=metrics
        )

    def restore(
        self,
        step: int,
        abstract_state: Any,
        data_iter: grain.DatasetIterator | None = None,
        *,
        fall_back: bool = True,
    ) -> Any:
        """The state saved at `step`, placed as `abstract_state` says.

        `data_iter`, if given, is moved in place to the saved position (when the
        checkpoint was written by as many processes as there are now; else a warning).
        With `fall_back`, a damaged step (see the module docstring) is moved aside with a
        warning and the newest older intact step is restored instead: the returned
        state's `step` (and `latest_step()`) say which. Raises NoIntactCheckpointError
        when no step is left.
        """
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}"
            )
        moved = []
        while True:
            try:
                return self._restore_step(step, abstract_state, data_iter)
            except Exception as error:
                if not fall_back:
                    raise
                damage = self.verify(step)
                if damage is None:
                    raise  # the step reads back: the target does not fit it
                older = [s for s in self.all_steps() if s < step]
                destination = self._move_aside(step, damage)
                moved.append(destination)
                logging.warning(
                    "checkpoint step %d in %s is damaged (%s): moved it to %s; %s",
                    step,
                    self.directory,
                    damage,
                    destination,
                    f"restoring step {older[-1]} instead" if older else "no older step",
                )
                if not older:
                    raise NoIntactCheckpointError(
                        f"no intact checkpoint in {self.directory}: the damaged ones were "
                        f"moved to {', '.join(moved)}. Run again to start from step 0, or "
                        "repair them and move them back."
                    ) from error
                step = older[-1]

    def _restore_step(self, step: int, abstract_state: Any, data_iter) -> Any:
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None and self._has_data_position(step):
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        elif data_iter is not None:
            logging.warning(
                "checkpoint step %d in %s has no data position for process %d of %d (saved "
                "with another process count?): the data order restarts from the beginning",
                step,
                self.directory,
                jax.process_index(),
                jax.process_count(),
            )
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def verify(self, step: int) -> str | None:
        """None if checkpoint `step` reads back whole, else what is wrong, in one line.

        Reads every array of the state as a host numpy array (whatever the shapes and
        shardings the run now wants), this process's data position and the config.
        """
        step_dir = os.path.join(self.directory, str(step))
        try:
            metadata = self._manager.item_metadata(step)["state"]
            tree = getattr(metadata, "tree", metadata)
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            with ocp.PyTreeCheckpointer() as reader:
                reader.restore(
                    os.path.join(step_dir, "state"),
                    args=ocp.args.PyTreeRestore(restore_args=restore_args),
                )
            for item in ("data_iter", "config"):
                item_dir = os.path.join(step_dir, item)
                if not os.path.isdir(item_dir):
                    continue
                for name in os.listdir(item_dir):
                    if name.endswith(".json") or (item == "config" and name == "metadata"):
                        with open(os.path.join(item_dir, name), encoding="utf-8") as f:
                            json.load(f)
        except Exception as error:  # noqa: BLE001 - any failure to read back is damage
            return _one_line(error)
        return None

    def _move_aside(self, step: int, reason: str) -> str:
        """Move step `step` out of the manager's sight (process 0), note why; its new path."""
        parent = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
        destination = os.path.join(parent, f"step_{step}")
        if jax.process_index() == 0:
            os.makedirs(parent, exist_ok=True)
            suffix = 1
            while os.path.exists(destination):
                suffix += 1
                destination = os.path.join(parent, f"step_{step}_{suffix}")
            os.rename(os.path.join(self.directory, str(step)), destination)
            with open(os.path.join(destination, "DAMAGED.txt"), "w", encoding="utf-8") as f:
                f.write(
                    f"checkpoint step {step} of {self.directory}, moved here "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')} because it could not be read "
                    f"back:\n{reason}\n"
                )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"whmae_move_damaged_checkpoint_{step}")
        self._manager.reload()
        return destination

    def _has_data_position(self, step: int) -> bool:
        # Grain writes one file per process, named by index and count.
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return os.path.exists(os.path.join(self.directory, str(step), "data_iter", name))

    def restore_arrays(self, step: int) -> Any:
        """The raw state tree saved at `step` as host numpy arrays (for inspection)."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
        )
        return jax.tree.map(np.asarray, restored["state"])

    def restore_config(self, step: int) -> dict:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return restored["config"]

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _preemption_service_running() -> bool:
    from jax._src import distributed  # the sync manager has no public accessor

    return distributed.global_state.preemption_sync_manager is not None


class PreemptionWatcher:
    """Says, at a step boundary agreed by all processes, that a SIGTERM arrived.

    Call `reached(step)` once per step, with the same steps on every process.
    Use as a context manager so the previous SIGTERM handler comes back.
    """

    def __init__(self):
        self._signalled = threading.Event()
        self._previous_handler = None
        self._use_jax_service = jax.process_count() > 1 and _preemption_service_running()
        # JAX's service catches SIGTERM in C++; a Python handler would take it away.
        if not self._use_jax_service and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint at the next step boundary")
        self._signalled.set()

    def signal(self) -> None:
        """Act as if SIGTERM arrived (tests, schedulers with other notices)."""
        self._signalled.set()

    def reached(self, step: int) -> bool:
        if self._use_jax_service:
            return multihost_utils.reached_preemption_sync_point(step)
        if jax.process_count() > 1:
            # No JAX service: every process votes each step, so all stop together.
            flags = multihost_utils.process_allgather(np.int32(self._signalled.is_set()))
            return bool(np.max(flags))
        return self._signalled.is_set()

    def close(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def __enter__(self) -> PreemptionWatcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
