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
        validation=pretrain_validation(model_config),
    )


def pretrain_validation(model_config):
    """Val metrics of an MAE (`whmae.train.validation`), every exam masked as in
    pretraining (the model's mask ratio) from its own fixed key:

    loss                  the masked-reconstruction training loss, pooled over the
                          subset's loss tokens as the train step pools a batch's
    mse_<type>, psnr_<type>  per plane type (long_axis, short_axis) the model sees: the
                          mean over (exam, acquired plane) of the MSE / PSNR (dB) of the
                          whole reconstructed plane in [0, 1], as
                          `whmae-evaluate reconstruction` defines them
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from whmae.evaluate.metrics import psnr_from_mse, summary
    from whmae.evaluate.reconstruction import PLANE_TYPES, reconstruction_images
    from whmae.train.validation import Validation, exam_keys

    planes = tuple(model_config.planes)

    def fn(model, batch, key):
        # Each exam's mask from its own key: the same whatever batch it sits in.
        keys = exam_keys(key, batch["val_index"])
        noise = jax.vmap(lambda k: jax.random.uniform(k, (model_config.num_tokens,)))(keys)
        ids = jnp.argsort(noise, axis=1).astype(jnp.int32)  # absent tokens go last in the model
        images = batch["images"].astype(jnp.float32) / 255.0
        out = model(images, batch["plane_mask"], ids_shuffle=ids)
        # The model's loss, per exam instead of pooled over the batch.
        per_token = out["token_loss"]
        selected, available = model.select_planes(batch["images"], batch["plane_mask"])
        recon, _ = reconstruction_images(
            model.config, selected, out["pred"], out["ids_shuffle"], out["num_kept"]
        )
        return {
            "loss_sum": jnp.sum(per_token * out["loss_mask"], axis=1),
            "loss_count": jnp.sum(out["loss_mask"], axis=1),
            "plane_mse": jnp.mean(jnp.square(recon - selected), axis=(2, 3, 4)),  # [B, S]
            "available": available,
        }

    def summarise(values):
        out = {"loss": float(values["loss_sum"].sum() / max(values["loss_count"].sum(), 1.0))}
        for plane_type, members in PLANE_TYPES.items():
            columns = [s for s, plane in enumerate(planes) if plane in members]
            if columns:
                available = values["available"][:, columns].astype(bool)
                mse = np.asarray(values["plane_mse"][:, columns], np.float64)[available]
                out[f"mse_{plane_type}"] = summary(mse)["mean"]
                out[f"psnr_{plane_type}"] = summary(psnr_from_mse(mse))["mean"]
        return out

    return Validation(fn=fn, summarise=summarise)


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
        cli.check_dataset_fits_model(config)
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
