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
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from whmae import cli
from whmae.train.loop import Task, quiet_library_logs, train

TASKS = ("phenotype", "segmentation")
_CONFIG_HELP = "Experiment config, e.g. configs/phenotype.py:tiny."
_DEFAULT_CONFIG = "configs/phenotype.py:tiny"


def check_data_dir(data_dir: str | None) -> str:
    """The dataset directory, or a ValueError (cli.UsageError) saying how to make one."""
    return cli.check_data_dir(data_dir)


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
    cli.validate_train_config(config)
    cli.check_dataset_fits_model(config)
    config = resolve(config)
    return train(config, workdir, finetune_task(config), distributed_mode=distributed_mode)


def run(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_library_logs()
    workdir = flags.FLAGS.workdir
    with cli.one_line_errors(workdir):
        summary = finetune(flags.FLAGS.config, workdir, distributed_mode=flags.FLAGS.distributed)
    if summary["preempted"]:
        print(
            f"preempted: checkpoint saved at step {summary['step']} in {workdir}; "
            "run the same command to continue",
            file=sys.stderr,
        )
    else:
        print(f"done: step {summary['step']}, loss {summary['final_loss']}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point; `argv` without the program name (default: the command line).

    Flags are defined here, not on import: importing this module (tests, notebooks) must
    not register them (whmae.pretrain defines the same ones, through whmae.cli)."""
    argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli.preflight(argv, doc=__doc__, default_config=_DEFAULT_CONFIG, config_help=_CONFIG_HELP)
    cli.define_training_flags(_CONFIG_HELP)
    cli.run_absl(run, argv)


if __name__ == "__main__":
    main()
