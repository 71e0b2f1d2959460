"""Fine-tuning: `whmae-finetune` / `python -m whmae.finetune`, on the one training loop.

  python -m whmae.finetune --config configs/phenotype.py:tiny --workdir /tmp/ft \\
      --config.init.checkpoint=/tmp/pretrain --config.data.dir=/data/whmae
  python -m whmae.finetune --config configs/segmentation.py:tiny,unetr_scratch \\
      --workdir /tmp/seg --config.data.dir=/data/whmae
  python -m whmae.finetune --config configs/phenotype.py:paper --config.mode=probe ...

The task (phenotype regression or segmentation) comes from the config file; the run is
`whmae.train.loop.train` with that task's model and loss, so checkpoints, resuming,
preemption and metrics behave exactly as in pretraining. Read the result back with
`whmae.tasks.predict.load_finetuned(workdir)`.
"""

from __future__ import annotations

import sys
from typing import Any

from absl import app, flags
from etils import epath
from ml_collections import config_flags

from whmae.train import distributed
from whmae.train.loop import Task, quiet_library_logs, train

TASKS = ("phenotype", "segmentation")
_GENERATE_HINT = "whmae-generate --out {dir} --num-exams 24 --size 32 --frames 10"
_FLAGS: dict = {}


def _define_flags() -> None:
    """Flags are defined by `main` only: importing this module (tests, notebooks, beside
    whmae.pretrain's identically named flags) must not register them."""
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", None, "Experiment config, e.g. configs/phenotype.py:tiny.", lock_config=True
    )
    _FLAGS["workdir"] = flags.DEFINE_string(
        "workdir", None, "Checkpoints, metrics and TensorBoard go here."
    )
    _FLAGS["distributed"] = flags.DEFINE_enum(
        "distributed",
        "auto",
        distributed.MODES,
        "Multi-process start-up: auto (from the environment), on (force), off.",
    )
    flags.mark_flags_as_required(["config", "workdir"])


def check_data_dir(data_dir: str | None) -> str:
    """The dataset directory, or a ValueError saying how to make one."""
    if not data_dir:
        raise ValueError("no dataset given: pass --config.data.dir=DIR")
    if not epath.Path(data_dir).is_dir():  # epath: local paths and gs:// alike
        raise ValueError(
            f"dataset directory {data_dir!r} does not exist; "
            f"`{_GENERATE_HINT.format(dir=data_dir)}` makes a synthetic one for the tiny configs"
        )
    return data_dir


def finetune_task(config: Any) -> Task:
    """The `Task` of a resolved fine-tuning config (`whmae.tasks.config.resolve`)."""
    if config.task == "phenotype":
        from whmae.tasks.phenotype import phenotype_task

        return phenotype_task(config)
    if config.task == "segmentation":
        from whmae.tasks.segmentation import segmentation_task

        return segmentation_task(config)
    raise ValueError(f"config.task must be one of {TASKS}, got {config.task!r}")


def finetune(config: Any, workdir: str, *, distributed_mode: str | None = None) -> dict:
    """Train the config's task in `workdir` (resuming there); returns the loop's summary."""
    from whmae.tasks.config import resolve

    check_data_dir(config.data.get("dir"))
    config = resolve(config)
    return train(config, workdir, finetune_task(config), distributed_mode=distributed_mode)


def run(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_library_logs()
    try:
        summary = finetune(
            _FLAGS["config"].value,
            _FLAGS["workdir"].value,
            distributed_mode=_FLAGS["distributed"].value,
        )
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if summary["preempted"]:
        print(
            f"preempted: checkpoint saved at step {summary['step']} in {_FLAGS['workdir'].value}; "
            "run the same command to continue",
            file=sys.stderr,
        )
    else:
        print(f"done: step {summary['step']}, loss {summary['final_loss']}", file=sys.stderr)


def main() -> None:
    _define_flags()
    app.run(run)


if __name__ == "__main__":
    main()
