"""Masked-autoencoder pretraining: `whmae-pretrain` / `python -m whmae.pretrain`.

  python -m whmae.pretrain --config configs/pretrain.py:tiny --workdir /tmp/run \\
      --config.data.dir=/data/whmae --config.train.steps=100

Run the same command again to continue from the newest checkpoint in --workdir;
on SIGTERM the run saves a checkpoint and exits with status 0.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app, flags

from whmae import cli
from whmae.train.loop import Task, quiet_library_logs, train

_CONFIG_HELP = "Experiment config, e.g. configs/pretrain.py:tiny."
_DEFAULT_CONFIG = "configs/pretrain.py:tiny"


def pretrain_task(config) -> Task:
    """The MAE on `images` and `plane_mask`, loss as `config.model.loss_on` says."""
    from whmae.model.mae import MAEConfig, MaskedAutoencoder
    from whmae.train.step import pretrain_loss

    model_config = MAEConfig(**config.model.to_dict())
    return Task(
        name="pretrain",
        model_fn=lambda rngs: MaskedAutoencoder(model_config, rngs=rngs),
        loss_fn=pretrain_loss,
        fields=("images", "plane_mask"),
    )


def check_data_dir(data_dir: str | None) -> str:
    """The dataset directory, or a SystemExit telling the user how to make one."""
    try:
        return cli.check_data_dir(data_dir)
    except cli.UsageError as e:
        raise SystemExit(f"error: {e}") from None


def run(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    with cli.one_line_errors(workdir):
        cli.validate_train_config(config)
        cli.check_data_dir(config.data.get("dir"))
        quiet_library_logs()
        summary = train(
            config, workdir, pretrain_task(config), distributed_mode=flags.FLAGS.distributed
        )
    if summary["preempted"]:
        print(
            f"preempted: checkpoint saved at step {summary['step']} in {workdir}; "
            "run the same command to continue",
            file=sys.stderr,
        )
    else:
        print(f"done: step {summary['step']}, loss {summary['final_loss']}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point; `argv` without the program name (default: the command line)."""
    argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli.preflight(argv, doc=__doc__, default_config=_DEFAULT_CONFIG, config_help=_CONFIG_HELP)
    cli.define_training_flags(_CONFIG_HELP)
    cli.run_absl(run, argv)


if __name__ == "__main__":
    main()
