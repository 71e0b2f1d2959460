"""Masked-autoencoder pretraining: `whmae-pretrain` / `python -m whmae.pretrain`.

  python -m whmae.pretrain --config configs/pretrain.py:tiny --workdir /tmp/run \\
      --config.data.dir=/data/whmae --config.train.steps=100

Run the same command again to continue from the newest checkpoint in --workdir;
on SIGTERM the run saves a checkpoint and exits with status 0.
"""

from __future__ import annotations

import sys

from absl import app, flags
from etils import epath
from ml_collections import config_flags

from whmae.train import distributed
from whmae.train.loop import Task, quiet_library_logs, train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config, e.g. configs/pretrain.py:tiny.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard go here.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    distributed.MODES,
    "Multi-process start-up: auto (from the environment), on (force), off.",
)
flags.mark_flags_as_required(["config", "workdir"])
_GENERATE_HINT = "whmae-generate --out {dir} --num-exams 24 --size 32 --frames 10"


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
    if not data_dir:
        raise SystemExit(
            "error: no dataset given. Pass --config.data.dir=DIR; to make a synthetic "
            f"phantom dataset first run `{_GENERATE_HINT.format(dir='DIR')}`."
        )
    if not epath.Path(data_dir).is_dir():  # epath: local paths and gs:// alike
        raise SystemExit(
            f"error: dataset directory {data_dir!r} does not exist. Run "
            f"`{_GENERATE_HINT.format(dir=data_dir)}` for a synthetic one (sized for the tiny "
            "config), or point --config.data.dir at yours."
        )
    return data_dir


def run(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    check_data_dir(config.data.get("dir"))
    quiet_library_logs()
    summary = train(
        config, _WORKDIR.value, pretrain_task(config), distributed_mode=_DISTRIBUTED.value
    )
    if summary["preempted"]:
        print(
            f"preempted: checkpoint saved at step {summary['step']} in {_WORKDIR.value}; "
            "run the same command to continue",
            file=sys.stderr,
        )
    else:
        print(f"done: step {summary['step']}, loss {summary['final_loss']}", file=sys.stderr)


def main() -> None:
    app.run(run)


if __name__ == "__main__":
    main()
