"""All-planes segmentation configs: `--config configs/segmentation.py:VARIANT`.

VARIANT is comma-separated tokens (see `whmae.tasks.config`), e.g. `paper`, `tiny`,
`tiny,unetr_scratch`, `paper,sa_only`:

  paper          the reference encoder initialised from `--config.init.checkpoint`, UNETR
                 decoder with 128 channels per plane token (1152 / 9), skips from encoder
                 blocks 1 and 3 plus the final normed output, Dice + CE
  tiny           CPU: `configs/pretrain.py:tiny`'s encoder (2 blocks: skips 0 and 1),
                 16 channels per plane token
  probe          frozen encoder (also `--config.mode=probe`): only the decoder trains
  finetune       everything trains (default)
  unetr_scratch  the same network without pretrained init (the UNETR+ baseline)
  sa_only / la_only   short-axis / long-axis planes only (segments only those)

`model.unetr` (see `whmae.tasks.segmentation`):
  per_plane       False: the reference's planes folded into channels; True: every plane
                  decoded on its own (planes in the batch, shared weights, own feature
                  maps at every stage: ~4x the tiny decoder's CPU time per step)
  token_channels  channels per plane token after the projection
  channels        one width per upsampling stage (3 for 8x8 patches), coarse first; per
                  plane when per_plane, for all planes together otherwise
  image_channels  width of the full-resolution image skip
  refine_channels per-plane full-resolution refinement: the last features split into this
                  many channels per plane, joined by the plane's image, 3x3x3 conv ->
                  logit correction (0: off)
  skip_blocks     encoder blocks whose outputs feed the coarser stages

Validation every `train.eval_every` steps on `train.eval_exams` val exams: Dice per class
(dice_<class>) and dice_mean; the best checkpoint by `train.best_metric` (dice_mean, max).
"""

import ml_collections

from whmae.tasks.config import base_config, parse_variant

TASK_TOKENS = ("unetr_scratch",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tokens = parse_variant(arg, TASK_TOKENS)
    tiny = "tiny" in tokens
    c = base_config("segmentation", tokens)
    if tiny:
        c.model.unetr = dict(
            per_plane=False,
            token_channels=16,
            channels=[16, 16, 16],
            image_channels=8,
            refine_channels=4,
            skip_blocks=[0, 1],
        )
        c.data.batch_size = 8
        c.optim.lr = 3e-3
        c.optim.probe_lr = 3e-3
    else:
        c.model.unetr = dict(
            per_plane=False,
            token_channels=128,
            channels=[256, 128, 64],
            image_channels=32,
            refine_channels=8,
            skip_blocks=[1, 3],
        )
        c.data.batch_size = 8
    # The best checkpoint: highest val Dice, mean over the classes the planes hold.
    c.train.best_metric = "dice_mean"
    c.train.best_mode = "max"
    if "unetr_scratch" in tokens:
        c.init.pretrained = False
    return c
