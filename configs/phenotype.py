"""Phenotype regression configs: `--config configs/phenotype.py:VARIANT`.

VARIANT is comma-separated tokens (see `whmae.tasks.config`), e.g. `paper`, `tiny`,
`tiny,probe`, `paper,resnet50`, `tiny,sa_only`:

  paper        the reference encoder (D 1025, 6 blocks; `configs/pretrain.py:paper`),
               initialised from `--config.init.checkpoint`, cls-token head, all planes
  tiny         CPU: `configs/pretrain.py:tiny`'s encoder, 32x32, 10 frames, 30 steps
  probe        linear probe: frozen encoder (also `--config.mode=probe`), lr = probe_lr
  finetune     full fine-tuning (default)
  resnet50     2D ResNet50 baseline (planes x frames as channels), no pretraining;
               `model.resnet.stem` imagenet (7x7/2 + max pool; paper) | cifar (3x3, no
               pool, stride `model.resnet.stem_stride`; tiny: cifar, stride 2)
  vit_scratch  the same ViT regressor, randomly initialised (no pretraining)
  sa_only / la_only   short-axis / long-axis planes only

Targets: `phenotypes` (default the paper's LVM, RVEF, RAEF, RVEDV, LASV; any of the 18
UK Biobank columns), standardised with the train split's mean and std; `loss` mse or
huber (`huber_delta`, standardised units); `model.pool` cls | mean | cls_mean;
`model.head_hidden` 0 = linear head. Validation every `train.eval_every` steps on
`train.eval_exams` val exams: loss, mae_std, mae_<column> in original units; the best
checkpoint by `train.best_metric` (mae_std, min).
"""

import ml_collections

from whmae.layout import PAPER_PHENOTYPES
from whmae.tasks.config import base_config, parse_variant

TASK_TOKENS = ("resnet50", "vit_scratch")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tokens = parse_variant(arg, TASK_TOKENS)
    tiny = "tiny" in tokens
    c = base_config("phenotype", tokens)
    c.phenotypes = list(PAPER_PHENOTYPES)
    c.loss = "mse"
    c.huber_delta = 1.0
    c.model.pool = "cls"
    c.model.head_hidden = 0
    # The best checkpoint: lowest val MAE on standardised targets, mean over phenotypes.
    c.train.best_metric = "mae_std"
    c.train.best_mode = "min"
    # ResNet50 (`whmae.tasks.resnet`): the paper's is the ImageNet one (7x7/2 stem + max
    # pool). At 32x32 that stem leaves 1x1 maps after the last stage, where the tiny
    # widths' 1-channel GroupNorm groups output a constant (the model predicted one value
    # for every exam): tiny uses the small-image (CIFAR) stem, 3x3 without max pool, at
    # stride 2 (2x2 final maps; ~1.5x the old step time on a CPU, where stem_stride=1,
    # the CIFAR original, costs ~7x).
    c.model.resnet = dict(
        widths=[8, 8, 16, 16] if tiny else [64, 128, 256, 512],
        blocks=[3, 4, 6, 3],
        groups=32,
        stem="cifar" if tiny else "imagenet",
        stem_stride=2,
    )
    if "resnet50" in tokens:
        c.model.arch = "resnet"
        c.init.pretrained = False
        c.optim.lr = 1e-3
    if "vit_scratch" in tokens:
        c.init.pretrained = False
    if tiny:
        c.optim.lr = 1e-3 if "resnet50" not in tokens else 3e-3
        c.optim.probe_lr = 1e-2
    return c
