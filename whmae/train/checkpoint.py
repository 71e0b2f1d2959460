"""Orbax checkpoints of a training run, and saving on preemption.

One checkpoint step directory `workdir/checkpoints/<step>/` holds three items:

  state     the TrainState pytree (`ocp.args.StandardSave`); restored from an
            abstract tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`,
            so a run saved on one mesh (data=8) continues on another (data=2 x fsdp=4)
  data_iter the Grain iterator position, one small JSON file per process
  config    the run's config as JSON, to see what produced the checkpoint

Saves are asynchronous (device arrays are copied, the writing happens in a
background thread); `save_every` and `keep` become the manager's
`save_interval_steps` and `max_to_keep`.

Preemption: `PreemptionWatcher.reached(step)` turns True at the same step on
every process after a SIGTERM. Multi-process jobs use JAX's preemption sync
service (started by `jax.distributed.initialize`); a single process uses its own
SIGTERM handler. The loop then saves, waits for the write and exits cleanly.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

CHECKPOINT_DIR = "checkpoints"


def abstract_like(state: Any) -> Any:
    """The restore target for `state`'s shapes, dtypes and shardings."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


class Checkpointer:
    """A CheckpointManager over the items state / data_iter / config."""

    def __init__(
        self,
        directory: str,
        *,
        save_every: int,
        keep: int | None = None,
        async_save: bool = True,
    ):
        if save_every < 1:
            raise ValueError(f"checkpoint interval must be >= 1 step, got {save_every}")
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "data_iter", "config"), options=options
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

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
    ) -> bool:
        """Start saving `state` (and the iterator position) as `step`; True if it saves.

        Without `force` only steps on the `save_every` interval are written.
        """
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        if config is not None:
            items["config"] = ocp.args.JsonSave(dict(config))
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(
        self,
        step: int,
        abstract_state: Any,
        data_iter: grain.DatasetIterator | None = None,
    ) -> Any:
        """The state saved at `step`, placed as `abstract_state` says.

        `data_iter`, if given, is moved in place to the saved position (when the
        checkpoint was written by as many processes as there are now; else a warning).
        """
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}"
            )
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
