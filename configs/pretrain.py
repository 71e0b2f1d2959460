"""MAE pretraining configs: `--config configs/pretrain.py:VARIANT`, VARIANT one of

  paper  the reference exactly: D 1025, 5 heads, 6 encoder + 2 decoder blocks at full
         width, MLP 4100, exact GELU, LN eps 1e-5, loss over all tokens, sigmoid head,
         Adam lr 1e-4 constant, no weight decay, batch 1, float32.
  base   improved and shaped for matrix units: posembed "view_sincos", widths 1024 /
         512 (decoder, 4 blocks), 128-wide heads, MLP 4096 / 2048 (every weight
         shardable 8 ways), loss on masked tokens, norm-pix targets, AdamW warmup +
         cosine, wd 0.05, clipping, bfloat16.
  tiny   CPU tests and demo: 32x32, 10 frames, patch (5, 8, 8), a few steps.

Validation: `train.eval_every` (0: off), `train.eval_exams` (the val subset),
`train.best_metric` / `train.best_mode` (val `loss`, `mse_short_axis`, `psnr_long_axis`,
... ranking the best checkpoint).

Any field can be overridden, e.g. `--config.mesh.fsdp=8 --config.data.batch_size=256`.
`data.batch_size` is the global batch of one train-step call; with
`optim.grad_accum_steps = k` an update sees k of them and `train.steps` counts calls.
"""

import dataclasses

import ml_collections

from whmae.model.config import MAEConfig, tiny_config

VARIANTS = ("paper", "base", "tiny")


def _model(model_config: MAEConfig) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dataclasses.asdict(model_config))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "paper"
    if variant not in VARIANTS:
        raise ValueError(f"unknown pretrain variant {variant!r}; expected one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.data = dict(dir="", batch_size=1, worker_count=0, seed=0)
    c.optim = dict(
        name="adam",
        lr=1e-4,
        warmup_steps=0,
        weight_decay=0.0,
        min_lr_ratio=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        clip_norm=0.0,
        grad_accum_steps=1,
    )
    # data=-1: every device not used by fsdp/tensor does data parallelism.
    c.mesh = dict(data=-1, fsdp=1, tensor=1, rules="fsdp")
    c.train = dict(
        steps=100_000,
        seed=0,
        log_every=100,
        checkpoint_every=2_000,
        keep_checkpoints=3,
        # Validation (`whmae.train.validation`): every eval_every steps (0: off) on the
        # first eval_exams exams of the val split; the best step by val best_metric
        # (best_mode min | max) is kept beside the newest keep_checkpoints.
        eval_every=5_000,
        eval_exams=256,
        best_metric="loss",
        best_mode="min",
        distributed="auto",
    )

    if variant == "paper":
        c.model = _model(MAEConfig())
        c.mesh.rules = "dp"
    elif variant == "base":
        # Matrix-unit shaped (whmae.model.posembed "view_sincos": the axis is the sign of
        # the plane block, no flag column): widths 1024 / 512, head dim 128 (8 / 4 heads),
        # MLP 4096 / 2048: multiples of 128, every weight splits 8 ways under FSDP; the
        # decoder's 4 heads split at most 4 ways under tensor parallelism (8 heads of 64
        # would pad to 128 on the MXU: ~28 % of the FLOPs). Not the reference's weights.
        c.model = _model(
            MAEConfig(
                posembed="view_sincos",
                width=1024,
                num_heads=8,
                mlp_dim=4096,
                decoder_width=512,
                decoder_depth=4,
                decoder_num_heads=4,
                decoder_mlp_dim=2048,
                loss_on="masked",
                norm_pix_loss=True,
                dtype="bfloat16",
            )
        )
        c.data.batch_size = 64
        c.data.worker_count = 4
        c.optim.update(
            name="adamw", lr=2e-4, warmup_steps=2_000, weight_decay=0.05, b2=0.95, clip_norm=1.0
        )
    else:  # tiny
        c.model = _model(tiny_config())
        c.data.batch_size = 8
        c.optim.update(name="adamw", lr=1e-3, warmup_steps=2, weight_decay=0.05, clip_norm=1.0)
        c.train.update(steps=20, log_every=5, checkpoint_every=10, eval_every=10, eval_exams=16)
    return c
